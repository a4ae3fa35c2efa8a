/* Tests for kvp_ops: every operator against a plain loop written here in
 * double precision, plus the known values (exp, rotations, frequencies) a
 * reader can check by hand. Attention is compared with an explicit per-head
 * loop over grouped-query shapes, cache offsets and token counts that cross
 * the operator's tile size. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvp_ops.h"

/* xorshift64*: deterministic inputs, independent of the library's own rng */
static uint64_t rng_state = 0x2545f4914f6cdd1dull;
static uint64_t rng(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

/* uniform in [lo, hi) */
static float urand(float lo, float hi) {
    return lo + (hi - lo) * (float)((double)(rng() >> 11) * (1.0 / 9007199254740992.0));
}

static float *rand_buf(size_t n, float lo, float hi) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    assert_non_null(p);
    for (size_t i = 0; i < n; i++)
        p[i] = urand(lo, hi);
    return p;
}

/* Fails unless max|got - ref| <= rtol * max|ref| (a norm-wise relative error,
 * so that elements near zero do not need an impossible relative accuracy). */
static void assert_close(const char *what, const float *got, const double *ref, size_t n,
                         double rtol) {
    double max_ref = 0.0, max_err = 0.0;
    size_t worst = 0;
    for (size_t i = 0; i < n; i++) {
        if (fabs(ref[i]) > max_ref) max_ref = fabs(ref[i]);
        double e = fabs((double)got[i] - ref[i]);
        if (!(e <= max_err)) { /* also catches NaN */
            max_err = e;
            worst = i;
        }
    }
    if (!(max_err <= rtol * max_ref)) {
        print_error("%s: element %zu is %.9g, reference %.9g (error %.3g > %.3g * %.3g)\n", what,
                    worst, (double)got[worst], ref[worst], max_err, rtol, max_ref);
        fail();
    }
}

/* ---- matmul ---- */

static void ref_matmul(double *y, const float *x, const float *w, int n_tok, int n_in, int n_out) {
    for (int t = 0; t < n_tok; t++)
        for (int o = 0; o < n_out; o++) {
            double s = 0.0;
            for (int i = 0; i < n_in; i++)
                s += (double)x[(size_t)t * n_in + i] * (double)w[(size_t)o * n_in + i];
            y[(size_t)t * n_out + o] = s;
        }
}

static void check_matmul(int n_tok, int n_in, int n_out) {
    float *x = rand_buf((size_t)n_tok * n_in, -1.0f, 1.0f);
    float *w = rand_buf((size_t)n_out * n_in, -1.0f, 1.0f);
    float *y = rand_buf((size_t)n_tok * n_out, 1e6f, 2e6f); /* garbage that must be overwritten */
    double *ref = malloc(sizeof(double) * (size_t)n_tok * n_out);
    assert_non_null(ref);
    kvp_matmul(y, x, w, n_tok, n_in, n_out);
    ref_matmul(ref, x, w, n_tok, n_in, n_out);
    char what[64];
    snprintf(what, sizeof what, "matmul %dx%d -> %d", n_tok, n_in, n_out);
    assert_close(what, y, ref, (size_t)n_tok * n_out, 1e-5);
    free(x);
    free(w);
    free(y);
    free(ref);
}

static void matmul_one_token_matches_reference(void **state) {
    (void)state;
    check_matmul(1, 37, 23);
    check_matmul(1, 1, 1);
    check_matmul(1, 301, 5);
}

static void matmul_many_tokens_matches_reference(void **state) {
    (void)state;
    check_matmul(2, 37, 23);
    check_matmul(5, 67, 29);
    check_matmul(131, 33, 17);
}

/* ---- rmsnorm ---- */

static void rmsnorm_matches_reference_and_may_run_in_place(void **state) {
    (void)state;
    const int rows = 3, n = 13;
    const float eps = 1e-5f;
    float *x = rand_buf((size_t)rows * n, -3.0f, 3.0f);
    float *w = rand_buf((size_t)n, 0.5f, 1.5f);
    float *y = malloc(sizeof(float) * (size_t)rows * n);
    double ref[3 * 13];
    assert_non_null(y);
    for (int r = 0; r < rows; r++) {
        double ss = 0.0;
        for (int i = 0; i < n; i++)
            ss += (double)x[r * n + i] * x[r * n + i];
        double scale = 1.0 / sqrt(ss / n + eps);
        for (int i = 0; i < n; i++)
            ref[r * n + i] = x[r * n + i] * scale * w[i];
    }
    kvp_rmsnorm(y, x, w, rows, n, eps);
    assert_close("rmsnorm", y, ref, (size_t)rows * n, 1e-6);
    kvp_rmsnorm(x, x, w, rows, n, eps); /* y aliases x */
    assert_close("rmsnorm in place", x, ref, (size_t)rows * n, 1e-6);
    free(x);
    free(w);
    free(y);
}

static void rmsnorm_eps_keeps_zero_row_finite(void **state) {
    (void)state;
    float x[4] = {0, 0, 0, 0}, w[4] = {1, 1, 1, 1}, y[4];
    kvp_rmsnorm(y, x, w, 1, 4, 1e-6f);
    for (int i = 0; i < 4; i++)
        assert_true(y[i] == 0.0f);
}

/* ---- softmax ---- */

static void ref_softmax(double *out, const float *x, int n) {
    double mx = -INFINITY, sum = 0.0;
    for (int i = 0; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    for (int i = 0; i < n; i++)
        sum += out[i] = exp((double)x[i] - mx);
    for (int i = 0; i < n; i++)
        out[i] /= sum;
}

static void check_softmax(const char *what, const float *in, int n) {
    float *x = malloc(sizeof(float) * (size_t)n);
    double *ref = malloc(sizeof(double) * (size_t)n);
    assert_non_null(x);
    assert_non_null(ref);
    memcpy(x, in, sizeof(float) * (size_t)n);
    ref_softmax(ref, in, n);
    kvp_softmax(x, n);
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        assert_true(isfinite(x[i]) && x[i] >= 0.0f);
        /* each probability to 1e-6 absolute as well as norm-wise */
        assert_true(fabs(x[i] - ref[i]) <= 1e-6 + 1e-5 * ref[i]);
        sum += x[i];
    }
    assert_true(fabs(sum - 1.0) < 1e-5);
    assert_close(what, x, ref, (size_t)n, 1e-5);
    free(x);
    free(ref);
}

static void softmax_matches_reference(void **state) {
    (void)state;
    float *x = rand_buf(257, -8.0f, 8.0f);
    check_softmax("softmax random", x, 257);
    /* the max and the sum run in 16 lanes plus a tail: the edges of both */
    const int lens[] = {1, 15, 16, 17, 32, 33};
    for (size_t i = 0; i < sizeof lens / sizeof *lens; i++)
        check_softmax("softmax lanes", x + 7, lens[i]);
    free(x);
}

static void softmax_handles_large_and_negative_values(void **state) {
    (void)state;
    const float big[] = {1000.0f, 999.0f, -1000.0f, 0.0f, 998.5f};
    check_softmax("softmax large", big, 5);
    const float neg[] = {-1e4f, -1e4f - 1.0f, -1e4f - 3.0f, -3e4f};
    check_softmax("softmax negative", neg, 4);
    const float huge[] = {3e38f, -3e38f, 3e38f};
    check_softmax("softmax near FLT_MAX", huge, 3);
}

static void softmax_of_one_value_is_one(void **state) {
    (void)state;
    const float vals[] = {0.0f, 1e30f, -1e30f, 88.0f};
    for (int i = 0; i < 4; i++) {
        float x = vals[i];
        kvp_softmax(&x, 1);
        assert_true(x == 1.0f);
    }
}

/* ---- expf ---- */

static void expf_relative_error_below_2e7_over_range(void **state) {
    (void)state;
    double worst = 0.0;
    float worst_x = 0.0f;
    /* about 1.75 million points, plus the exact end points */
    for (int i = 0; i <= 1750000; i++) {
        float x = -87.0f + (float)((double)i * (175.0 / 1750000.0));
        if (x > 88.0f) x = 88.0f;
        double ref = exp((double)x);
        double e = fabs((double)kvp_expf(x) - ref) / ref;
        if (!(e <= worst)) {
            worst = e;
            worst_x = x;
        }
    }
    /* points in between the grid, including tiny arguments around 0 */
    for (int i = 0; i < 200000; i++) {
        float x = i % 2 ? urand(-87.0f, 88.0f) : urand(-1e-3f, 1e-3f);
        double ref = exp((double)x);
        double e = fabs((double)kvp_expf(x) - ref) / ref;
        if (!(e <= worst)) {
            worst = e;
            worst_x = x;
        }
    }
    if (!(worst < 2e-7)) {
        print_error("kvp_expf(%.9g): relative error %.3g\n", (double)worst_x, worst);
        fail();
    }
}

static void expf_known_values(void **state) {
    (void)state;
    assert_true(kvp_expf(0.0f) == 1.0f);
    assert_true(fabs(kvp_expf(1.0f) - 2.718281828459045) < 3e-7);
    assert_true(fabs(kvp_expf(-1.0f) - 0.36787944117144233) < 1e-7);
    assert_true(isfinite(kvp_expf(88.0f)));
}

static void expf_is_zero_for_very_negative_input(void **state) {
    (void)state;
    const float xs[] = {-88.0f, -100.0f, -1000.0f, -1e30f, -INFINITY};
    for (int i = 0; i < 5; i++)
        assert_true(kvp_expf(xs[i]) == 0.0f);
}

/* ---- rope ---- */

static void rope_matches_formula(void **state) {
    (void)state;
    enum { N_HEAD = 3, HEAD_DIM = 16 };
    float inv_freq[HEAD_DIM / 2];
    kvp_rope_inv_freq(inv_freq, HEAD_DIM, 10000.0f, NULL);
    const int positions[] = {0, 1, 7, 4095, 30000};
    for (int pi = 0; pi < 5; pi++) {
        int pos = positions[pi];
        float *x = rand_buf(N_HEAD * HEAD_DIM, -1.0f, 1.0f);
        double ref[N_HEAD * HEAD_DIM];
        for (int h = 0; h < N_HEAD; h++)
            for (int i = 0; i < HEAD_DIM / 2; i++) {
                double a = (double)pos * inv_freq[i];
                double x0 = x[h * HEAD_DIM + 2 * i], x1 = x[h * HEAD_DIM + 2 * i + 1];
                ref[h * HEAD_DIM + 2 * i] = x0 * cos(a) - x1 * sin(a);
                ref[h * HEAD_DIM + 2 * i + 1] = x0 * sin(a) + x1 * cos(a);
            }
        kvp_rope(x, N_HEAD, HEAD_DIM, HEAD_DIM, pos, inv_freq, 1.0f);
        char what[32];
        snprintf(what, sizeof what, "rope pos %d", pos);
        assert_close(what, x, ref, N_HEAD * HEAD_DIM, 1e-6);
        free(x);
    }
}

static void rope_rotates_unit_vector_by_pos_times_freq(void **state) {
    (void)state;
    const float one = 1.0f;
    float x[2] = {1.0f, 0.0f};
    kvp_rope(x, 1, 2, 2, 1, &one, 1.0f);
    assert_true(fabs(x[0] - cos(1.0)) < 1e-7);
    assert_true(fabs(x[1] - sin(1.0)) < 1e-7);
    /* sign -1 turns the other way */
    float y[2] = {1.0f, 0.0f};
    kvp_rope(y, 1, 2, 2, 1, &one, -1.0f);
    assert_true(fabs(y[0] - cos(1.0)) < 1e-7);
    assert_true(fabs(y[1] + sin(1.0)) < 1e-7);
    /* position 0 is the identity */
    float z[2] = {0.25f, -0.5f};
    kvp_rope(z, 1, 2, 2, 0, &one, 1.0f);
    assert_true(z[0] == 0.25f && z[1] == -0.5f);
}

static void rope_inverse_rotation_undoes_rotation(void **state) {
    (void)state;
    enum { N_HEAD = 4, HEAD_DIM = 32 };
    float inv_freq[HEAD_DIM / 2];
    kvp_rope_inv_freq(inv_freq, HEAD_DIM, 500000.0f, NULL);
    float *x = rand_buf(N_HEAD * HEAD_DIM, -1.0f, 1.0f);
    float orig[N_HEAD * HEAD_DIM];
    memcpy(orig, x, sizeof orig);
    kvp_rope(x, N_HEAD, HEAD_DIM, HEAD_DIM, 12345, inv_freq, 1.0f);
    assert_true(fabs(x[0] - orig[0]) > 1e-3 || fabs(x[1] - orig[1]) > 1e-3); /* it did turn */
    kvp_rope(x, N_HEAD, HEAD_DIM, HEAD_DIM, 12345, inv_freq, -1.0f);
    for (int i = 0; i < N_HEAD * HEAD_DIM; i++)
        assert_true(fabs(x[i] - orig[i]) < 1e-6);
    free(x);
}

static void rope_leaves_dims_past_rope_dim_untouched(void **state) {
    (void)state;
    enum { N_HEAD = 3, HEAD_DIM = 16, ROPE_DIM = 8 };
    float inv_freq[ROPE_DIM / 2];
    kvp_rope_inv_freq(inv_freq, ROPE_DIM, 10000.0f, NULL);
    float *x = rand_buf(N_HEAD * HEAD_DIM, -1.0f, 1.0f);
    float orig[N_HEAD * HEAD_DIM];
    memcpy(orig, x, sizeof orig);
    kvp_rope(x, N_HEAD, HEAD_DIM, ROPE_DIM, 3, inv_freq, 1.0f);
    for (int h = 0; h < N_HEAD; h++) {
        for (int i = 0; i < ROPE_DIM / 2; i++) {
            double a = 3.0 * inv_freq[i];
            double x0 = orig[h * HEAD_DIM + 2 * i], x1 = orig[h * HEAD_DIM + 2 * i + 1];
            assert_true(fabs(x[h * HEAD_DIM + 2 * i] - (x0 * cos(a) - x1 * sin(a))) < 1e-6);
            assert_true(fabs(x[h * HEAD_DIM + 2 * i + 1] - (x0 * sin(a) + x1 * cos(a))) < 1e-6);
        }
        assert_memory_equal(x + h * HEAD_DIM + ROPE_DIM, orig + h * HEAD_DIM + ROPE_DIM,
                            sizeof(float) * (HEAD_DIM - ROPE_DIM));
    }
    free(x);
}

static void rope_table_holds_cosines_then_sines_and_apply_matches_rope(void **state) {
    (void)state;
    enum { N_HEAD = 2, HEAD_DIM = 16, ROPE_DIM = 12 };
    float inv_freq[ROPE_DIM / 2], cs[ROPE_DIM];
    kvp_rope_inv_freq(inv_freq, ROPE_DIM, 10000.0f, NULL);
    kvp_rope_table(cs, ROPE_DIM, 29, inv_freq);
    for (int i = 0; i < ROPE_DIM / 2; i++) {
        double a = 29.0 * inv_freq[i];
        assert_true(fabs(cs[i] - cos(a)) < 1e-7);
        assert_true(fabs(cs[ROPE_DIM / 2 + i] - sin(a)) < 1e-7);
    }
    float *x = rand_buf(N_HEAD * HEAD_DIM, -1.0f, 1.0f);
    float y[N_HEAD * HEAD_DIM], orig[N_HEAD * HEAD_DIM];
    memcpy(y, x, sizeof y);
    memcpy(orig, x, sizeof orig);
    kvp_rope(x, N_HEAD, HEAD_DIM, ROPE_DIM, 29, inv_freq, 1.0f);
    kvp_rope_apply(y, N_HEAD, HEAD_DIM, ROPE_DIM, cs, 1.0f);
    for (int i = 0; i < N_HEAD * HEAD_DIM; i++)
        assert_true(fabs(x[i] - y[i]) < 1e-7);
    kvp_rope_apply(y, N_HEAD, HEAD_DIM, ROPE_DIM, cs, -1.0f);
    for (int i = 0; i < N_HEAD * HEAD_DIM; i++)
        assert_true(fabs(y[i] - orig[i]) < 1e-6);
    free(x);
}

static void rope_inv_freq_known_values(void **state) {
    (void)state;
    float f[2];
    kvp_rope_inv_freq(f, 4, 10000.0f, NULL);
    assert_true(f[0] == 1.0f);
    assert_true(fabs(f[1] - 0.01) < 1e-9);
    const float factors[2] = {1.0f, 2.0f};
    kvp_rope_inv_freq(f, 4, 10000.0f, factors);
    assert_true(f[0] == 1.0f);
    assert_true(fabs(f[1] - 0.005) < 1e-9);
    float g[64];
    kvp_rope_inv_freq(g, 128, 500000.0f, NULL);
    for (int i = 0; i < 64; i++) {
        double want = pow(500000.0, -2.0 * i / 128.0);
        assert_true(fabs(g[i] - want) <= 1e-7 * want);
    }
}

/* ---- swiglu ---- */

static void swiglu_matches_reference_with_strides(void **state) {
    (void)state;
    enum { ROWS = 4, N = 11, LD_IN = 2 * N + 3, LD_OUT = N + 5 };
    /* gate and up interleaved in one buffer, as a fused gate|up projection gives */
    float *in = rand_buf(ROWS * LD_IN, -6.0f, 6.0f);
    const float *gate = in, *up = in + N;
    float out[ROWS * LD_OUT];
    for (int i = 0; i < ROWS * LD_OUT; i++)
        out[i] = -12345.0f;
    kvp_swiglu(out, LD_OUT, gate, up, LD_IN, ROWS, N);
    for (int r = 0; r < ROWS; r++) {
        float got[N];
        double ref[N];
        for (int i = 0; i < N; i++) {
            double g = gate[r * LD_IN + i], u = up[r * LD_IN + i];
            ref[i] = g / (1.0 + exp(-g)) * u;
            got[i] = out[r * LD_OUT + i];
        }
        assert_close("swiglu row", got, ref, N, 1e-6);
        for (int i = N; i < LD_OUT; i++) /* padding between output rows is not written */
            assert_true(out[r * LD_OUT + i] == -12345.0f);
    }
    free(in);
}

/* ---- attention ---- */

/* The definition: for each token t and head h, scores over positions
 * 0..pos0+t, softmax, weighted sum of values. */
static void ref_attention(double *out, int ld_out, const float *q, int ld_q, const float *k,
                          const float *v, int n_tok, int pos0, int n_head, int n_kv_head,
                          int head_dim, int cap) {
    double *p = malloc(sizeof(double) * (size_t)(pos0 + n_tok));
    assert_non_null(p);
    const double scale = 1.0 / sqrt((double)head_dim);
    for (int t = 0; t < n_tok; t++)
        for (int h = 0; h < n_head; h++) {
            int kvh = h / (n_head / n_kv_head);
            const float *qh = q + (size_t)t * ld_q + (size_t)h * head_dim;
            int seen = pos0 + t + 1;
            double mx = -INFINITY, sum = 0.0;
            for (int j = 0; j < seen; j++) {
                const float *kj = k + ((size_t)kvh * cap + j) * head_dim;
                double s = 0.0;
                for (int d = 0; d < head_dim; d++)
                    s += (double)qh[d] * kj[d];
                p[j] = s * scale;
                mx = p[j] > mx ? p[j] : mx;
            }
            for (int j = 0; j < seen; j++)
                sum += p[j] = exp(p[j] - mx);
            double *oh = out + (size_t)t * ld_out + (size_t)h * head_dim;
            for (int d = 0; d < head_dim; d++) {
                double acc = 0.0;
                for (int j = 0; j < seen; j++)
                    acc += p[j] / sum * v[((size_t)kvh * cap + j) * head_dim + d];
                oh[d] = acc;
            }
        }
    free(p);
}

typedef struct {
    int n_tok, pos0, n_head, n_kv_head, head_dim, cap, ld_q, ld_out;
    float *q, *k, *v, *out, *scratch;
} att_case_t;

static void att_case_init(att_case_t *c, int n_tok, int pos0, int n_head, int n_kv_head,
                          int head_dim) {
    c->n_tok = n_tok;
    c->pos0 = pos0;
    c->n_head = n_head;
    c->n_kv_head = n_kv_head;
    c->head_dim = head_dim;
    c->cap = pos0 + n_tok + 9; /* room the attention must not read */
    c->ld_q = n_head * head_dim + 5;
    c->ld_out = n_head * head_dim + 3;
    c->q = rand_buf((size_t)n_tok * c->ld_q, -1.0f, 1.0f);
    size_t kv = (size_t)n_kv_head * c->cap * head_dim;
    c->k = rand_buf(kv, -1.0f, 1.0f);
    c->v = rand_buf(kv, -1.0f, 1.0f);
    /* large values at positions past the visible ones: they must not leak in */
    for (int h = 0; h < n_kv_head; h++)
        for (int j = pos0 + n_tok; j < c->cap; j++)
            for (int d = 0; d < head_dim; d++) {
                c->k[((size_t)h * c->cap + j) * head_dim + d] = 1e4f;
                c->v[((size_t)h * c->cap + j) * head_dim + d] = -1e6f;
            }
    c->out = malloc(sizeof(float) * (size_t)n_tok * c->ld_out);
    c->scratch = malloc(sizeof(float) * kvp_attention_scratch(n_tok, pos0 + n_tok));
    assert_non_null(c->out);
    assert_non_null(c->scratch);
    for (size_t i = 0; i < (size_t)n_tok * c->ld_out; i++)
        c->out[i] = 777.0f;
}

static void att_case_run(att_case_t *c) {
    kvp_attention(c->out, c->ld_out, c->q, c->ld_q, c->k, c->v, c->n_tok, c->pos0, c->n_head,
                  c->n_kv_head, c->head_dim, c->cap, c->scratch);
}

static void att_case_free(att_case_t *c) {
    free(c->q);
    free(c->k);
    free(c->v);
    free(c->out);
    free(c->scratch);
}

static void check_attention(int n_tok, int pos0, int n_head, int n_kv_head, int head_dim) {
    att_case_t c;
    att_case_init(&c, n_tok, pos0, n_head, n_kv_head, head_dim);
    att_case_run(&c);
    double *ref = calloc((size_t)n_tok * c.ld_out, sizeof(double));
    assert_non_null(ref);
    ref_attention(ref, c.ld_out, c.q, c.ld_q, c.k, c.v, n_tok, pos0, n_head, n_kv_head, head_dim,
                  c.cap);
    const int width = n_head * head_dim;
    float *got = malloc(sizeof(float) * (size_t)n_tok * width);
    double *want = malloc(sizeof(double) * (size_t)n_tok * width);
    assert_non_null(got);
    assert_non_null(want);
    for (int t = 0; t < n_tok; t++) {
        memcpy(got + (size_t)t * width, c.out + (size_t)t * c.ld_out, sizeof(float) * width);
        memcpy(want + (size_t)t * width, ref + (size_t)t * c.ld_out, sizeof(double) * width);
        for (int i = width; i < c.ld_out; i++) /* row padding is not written */
            assert_true(c.out[(size_t)t * c.ld_out + i] == 777.0f);
    }
    char what[128];
    snprintf(what, sizeof what, "attention n_tok %d pos0 %d heads %d kv heads %d head dim %d",
             n_tok, pos0, n_head, n_kv_head, head_dim);
    assert_close(what, got, want, (size_t)n_tok * width, 1e-4);
    free(got);
    free(want);
    free(ref);
    att_case_free(&c);
}

/* Every grouping (GQA 2:1, MQA 4:1, none), both head sizes, both offsets. */
static void check_attention_shapes(int n_tok, int pos0_later) {
    const int kv_heads[] = {2, 1, 4}, head_dims[] = {8, 16}, pos0s[] = {0, pos0_later};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 2; b++)
            for (int p = 0; p < 2; p++)
                check_attention(n_tok, pos0s[p], 4, kv_heads[a], head_dims[b]);
}

static void attention_one_token_matches_reference(void **state) {
    (void)state;
    check_attention_shapes(1, 37);
}

static void attention_five_tokens_matches_reference(void **state) {
    (void)state;
    check_attention_shapes(5, 12);
}

static void attention_across_tiles_matches_reference(void **state) {
    (void)state;
    check_attention_shapes(300, 131); /* 300 > the 128-row tile; pos0 not tile-aligned */
}

/* Changing the key and value at one position must leave the output of every
 * earlier query token exactly as it was, and change the later ones. */
static void attention_is_causal(void **state) {
    (void)state;
    const int n_tok = 300, pos0 = 3, head_dim = 16;
    const int changed[] = {50, 200}; /* in the first tile, and in the second */
    for (int ci = 0; ci < 2; ci++) {
        att_case_t c;
        att_case_init(&c, n_tok, pos0, 4, 2, head_dim);
        att_case_run(&c);
        float *before = malloc(sizeof(float) * (size_t)n_tok * c.ld_out);
        assert_non_null(before);
        memcpy(before, c.out, sizeof(float) * (size_t)n_tok * c.ld_out);
        int pos = pos0 + changed[ci];
        for (int h = 0; h < 2; h++)
            for (int d = 0; d < head_dim; d++) {
                c.k[((size_t)h * c.cap + pos) * head_dim + d] = 3.0f * (d % 2 ? 1.0f : -1.0f);
                c.v[((size_t)h * c.cap + pos) * head_dim + d] = 50.0f;
            }
        att_case_run(&c);
        const int width = 4 * head_dim;
        for (int t = 0; t < n_tok; t++) {
            const float *a = before + (size_t)t * c.ld_out, *b = c.out + (size_t)t * c.ld_out;
            double diff = 0.0;
            for (int i = 0; i < width; i++)
                diff = fmax(diff, fabs((double)a[i] - b[i]));
            if (pos0 + t < pos) {
                if (diff != 0.0) {
                    print_error("token %d at position %d sees position %d (change %.3g)\n", t,
                                pos0 + t, pos, diff);
                    fail();
                }
            } else {
                assert_true(diff > 1e-3); /* the change is visible from its position on */
            }
        }
        free(before);
        att_case_free(&c);
    }
}

/* kvp_attention_row, one call per head as a single-token step makes them,
 * against the double-precision definition: head h reads kv head
 * h / (n_head / n_kv_head) of the cache layout; nothing past the head's
 * output, nor the cache past n_ctx (filled with large values), is touched. */
static void check_attention_row(int n_ctx, int n_head, int n_kv_head, int head_dim) {
    att_case_t c;
    att_case_init(&c, 1, n_ctx - 1, n_head, n_kv_head, head_dim);
    float *scores = malloc(sizeof(float) * (size_t)n_ctx);
    assert_non_null(scores);
    const int group = n_head / n_kv_head;
    for (int h = 0; h < n_head; h++) {
        size_t kv = (size_t)(h / group) * c.cap * head_dim;
        kvp_attention_row(c.out + (size_t)h * head_dim, c.q + (size_t)h * head_dim, c.k + kv,
                          c.v + kv, n_ctx, head_dim, scores);
    }
    double *ref = calloc((size_t)c.ld_out, sizeof(double));
    assert_non_null(ref);
    ref_attention(ref, c.ld_out, c.q, c.ld_q, c.k, c.v, 1, n_ctx - 1, n_head, n_kv_head, head_dim,
                  c.cap);
    char what[128];
    for (int h = 0; h < n_head; h++) {
        snprintf(what, sizeof what, "attention row n_ctx %d head %d of %d (kv heads %d) dim %d",
                 n_ctx, h, n_head, n_kv_head, head_dim);
        assert_close(what, c.out + (size_t)h * head_dim, ref + (size_t)h * head_dim,
                     (size_t)head_dim, 1e-5);
    }
    for (int i = n_head * head_dim; i < c.ld_out; i++)
        assert_true(c.out[i] == 777.0f);
    free(ref);
    free(scores);
    att_case_free(&c);
}

static void attention_row_matches_reference(void **state) {
    (void)state;
    /* lengths below, at and past the 4-position steps; head sizes below,
     * off and at multiples of the 16 dot lanes; GQA 2:1, MQA 4:1, none */
    const int n_ctxs[] = {1, 2, 17, 300}, kv_heads[] = {2, 1, 4}, head_dims[] = {8, 10, 16, 64};
    for (int a = 0; a < 4; a++)
        for (int b = 0; b < 3; b++)
            for (int d = 0; d < 4; d++)
                check_attention_row(n_ctxs[a], 4, kv_heads[b], head_dims[d]);
}

/* The row kernel and kvp_attention answer the same single-token question. */
static void attention_row_agrees_with_attention(void **state) {
    (void)state;
    const int n_ctx = 200, n_head = 6, n_kv_head = 2, head_dim = 64;
    att_case_t c;
    att_case_init(&c, 1, n_ctx - 1, n_head, n_kv_head, head_dim);
    att_case_run(&c);
    float *row = malloc(sizeof(float) * (size_t)n_head * head_dim);
    float *scores = malloc(sizeof(float) * (size_t)n_ctx);
    double *want = malloc(sizeof(double) * (size_t)n_head * head_dim);
    assert_non_null(row);
    assert_non_null(scores);
    assert_non_null(want);
    for (int h = 0; h < n_head; h++) {
        size_t kv = (size_t)(h / (n_head / n_kv_head)) * c.cap * head_dim;
        kvp_attention_row(row + (size_t)h * head_dim, c.q + (size_t)h * head_dim, c.k + kv,
                          c.v + kv, n_ctx, head_dim, scores);
    }
    for (int i = 0; i < n_head * head_dim; i++)
        want[i] = c.out[i];
    assert_close("attention row against kvp_attention", row, want, (size_t)n_head * head_dim, 1e-5);
    free(row);
    free(scores);
    free(want);
    att_case_free(&c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(matmul_one_token_matches_reference),
        cmocka_unit_test(matmul_many_tokens_matches_reference),
        cmocka_unit_test(rmsnorm_matches_reference_and_may_run_in_place),
        cmocka_unit_test(rmsnorm_eps_keeps_zero_row_finite),
        cmocka_unit_test(softmax_matches_reference),
        cmocka_unit_test(softmax_handles_large_and_negative_values),
        cmocka_unit_test(softmax_of_one_value_is_one),
        cmocka_unit_test(expf_relative_error_below_2e7_over_range),
        cmocka_unit_test(expf_known_values),
        cmocka_unit_test(expf_is_zero_for_very_negative_input),
        cmocka_unit_test(rope_matches_formula),
        cmocka_unit_test(rope_rotates_unit_vector_by_pos_times_freq),
        cmocka_unit_test(rope_inverse_rotation_undoes_rotation),
        cmocka_unit_test(rope_leaves_dims_past_rope_dim_untouched),
        cmocka_unit_test(rope_table_holds_cosines_then_sines_and_apply_matches_rope),
        cmocka_unit_test(rope_inv_freq_known_values),
        cmocka_unit_test(swiglu_matches_reference_with_strides),
        cmocka_unit_test(attention_one_token_matches_reference),
        cmocka_unit_test(attention_five_tokens_matches_reference),
        cmocka_unit_test(attention_across_tiles_matches_reference),
        cmocka_unit_test(attention_is_causal),
        cmocka_unit_test(attention_row_matches_reference),
        cmocka_unit_test(attention_row_agrees_with_attention),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
