/* Tests of Q8_0 weights in single-token steps: kvp_matvec16's Q8_0 kernel
 * (AVX-512 when the CPU has it, and plain C) against a double-precision loop
 * over the dequantised weights, exact on one-hot inputs, bit-identical
 * whatever the thread count; the quantiser against llama.cpp's reference
 * formula; then models given a Q8_0 copy by kvp_model_make_half or by a Q8_0
 * GGUF file, against f32 twins holding the dequantised weights, and the
 * rule that rows of partial blocks stay f32. The 16-bit types are tested in
 * tests/test_matvec16.c. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvp_gguf.h"
#include "kvp_half.h"
#include "kvp_matvec16.h"
#include "kvp_model.h"
#include "kvp_rng.h"
#include "kvp_test_util.h"

enum { QK = KVP_Q8_0_BLOCK, QB = 34 }; /* values and bytes of a block */

static size_t q8_bytes(size_t rows, size_t n_in) {
    return rows * (n_in / QK) * QB;
}

/* ---- quantisation ------------------------------------------------------ */

/* llama.cpp's quantize_row_q8_0_reference, written out again: d = amax/127
 * stored as f16, q = round(x * (1/d)) with the unrounded d. */
static void reference_q8_0(const float *x, uint8_t *b, int n) {
    for (int k = 0; k < n / QK; k++, b += QB) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++)
            amax = fmaxf(amax, fabsf(x[k * QK + j]));
        const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
        uint16_t dh = kvp_f32_to_f16(d);
        b[0] = (uint8_t)(dh & 0xff), b[1] = (uint8_t)(dh >> 8);
        for (int j = 0; j < QK; j++)
            b[2 + j] = (uint8_t)(int8_t)roundf(x[k * QK + j] * id);
    }
}

static float block_scale(const uint8_t *b) {
    return kvp_f16_to_f32((uint16_t)(b[0] | b[1] << 8));
}

/* Known values: amax 127 gives d = 1 (f16 0x3C00) and the integers
 * themselves; the dequantised values are d * q; random blocks agree with
 * the reference formula byte for byte. */
static void test_q8_0_round_trip_follows_the_reference_formula(void **state) {
    (void)state;
    float x[QK];
    for (int j = 0; j < QK; j++)
        x[j] = (float)(j * 8 - 127 + (j == 31 ? 6 : 0)); /* -127 .. 127 */
    uint8_t b[QB];
    kvp_f32_to_q8_0_row(x, b, QK);
    assert_int_equal(b[0] | b[1] << 8, 0x3C00);
    float y[QK];
    kvp_q8_0_to_f32_row(b, y, QK);
    for (int j = 0; j < QK; j++) {
        assert_int_equal((int8_t)b[2 + j], (int)x[j]);
        assert_true(y[j] == x[j]);
    }

    /* halving every value halves d exactly and keeps q */
    for (int j = 0; j < QK; j++)
        x[j] *= 0.5f;
    kvp_f32_to_q8_0_row(x, b, QK);
    assert_true(block_scale(b) == 0.5f);
    kvp_q8_0_to_f32_row(b, y, QK);
    assert_memory_equal(y, x, sizeof x);

    enum { N = QK * 512 };
    float *r = malloc(sizeof(float) * N), *back = malloc(sizeof(float) * N);
    uint8_t *q = malloc(N / QK * QB), *qr = malloc(N / QK * QB);
    kvp_rng_t rng;
    kvp_rng_seed(&rng, 21);
    for (int i = 0; i < N; i++) /* magnitudes from 2^-12 to 2^4 across blocks */
        r[i] = kvp_rng_normal(&rng) * ldexpf(1.0f, (i / QK) % 17 - 12);
    kvp_f32_to_q8_0_row(r, q, N);
    reference_q8_0(r, qr, N);
    assert_memory_equal(q, qr, N / QK * QB);
    kvp_q8_0_to_f32_row(q, back, N);
    for (int i = 0; i < N; i++) {
        const uint8_t *blk = q + (size_t)(i / QK) * QB;
        assert_true(back[i] == block_scale(blk) * (float)(int8_t)blk[2 + i % QK]);
    }
    free(r), free(back), free(q), free(qr);
}

/* ---- the kernel -------------------------------------------------------- */

typedef struct problem {
    int n_tok, K, N;
    uint8_t *w; /* N rows of K / 32 blocks */
    float *wf;  /* the same, dequantised */
    float *x;
    double *ref, *mag; /* sum of w*x and of |w*x| per output, in double */
} problem_t;

/* Rows of different magnitudes (2^-8 .. 2^7), a block of zeros (d = 0) in
 * every fifth row, x in [-1, 1). */
static problem_t make_problem(int n_tok, int K, int N, uint64_t seed) {
    problem_t p = {.n_tok = n_tok, .K = K, .N = N};
    size_t nw = (size_t)N * K;
    float *f = malloc(sizeof(float) * nw);
    p.w = malloc(q8_bytes((size_t)N, (size_t)K));
    p.wf = malloc(sizeof(float) * nw);
    p.x = malloc(sizeof(float) * (size_t)n_tok * K);
    p.ref = malloc(sizeof(double) * (size_t)n_tok * N);
    p.mag = malloc(sizeof(double) * (size_t)n_tok * N);
    kvp_rng_t r;
    kvp_rng_seed(&r, seed);
    for (int o = 0; o < N; o++)
        for (int k = 0; k < K; k++)
            f[(size_t)o * K + k] =
                o % 5 == 4 && k < QK ? 0.0f : kvp_rng_normal(&r) * ldexpf(1.0f, o % 16 - 8);
    kvp_f32_to_q8_0_row(f, p.w, nw);
    kvp_q8_0_to_f32_row(p.w, p.wf, nw);
    for (size_t i = 0; i < (size_t)n_tok * K; i++)
        p.x[i] = 2.0f * kvp_rng_uniform(&r) - 1.0f;
    for (int t = 0; t < n_tok; t++)
        for (int o = 0; o < N; o++) {
            double s = 0, m = 0;
            for (int k = 0; k < K; k++) {
                double v = (double)p.wf[(size_t)o * K + k] * p.x[(size_t)t * K + k];
                s += v;
                m += fabs(v);
            }
            p.ref[(size_t)t * N + o] = s;
            p.mag[(size_t)t * N + o] = m;
        }
    free(f);
    return p;
}

static void free_problem(problem_t *p) {
    free(p->w), free(p->wf), free(p->x), free(p->ref), free(p->mag);
}

/* Runs p on mv into a buffer with guard values after it; checks every output
 * against the double reference (f32 accumulation: 1e-5 of the sum of
 * magnitudes) and that nothing past y was written. */
static void check_problem(kvp_matvec16_t *mv, const problem_t *p) {
    size_t n = (size_t)p->n_tok * p->N;
    float *y = malloc(sizeof(float) * (n + 16));
    for (size_t i = 0; i < n + 16; i++)
        y[i] = -12345.0f;
    kvp_matvec16(mv, y, p->x, p->w, KVP_GGML_Q8_0, p->n_tok, p->K, p->N);
    for (size_t i = 0; i < n; i++)
        if (!(fabs(y[i] - p->ref[i]) <= 1e-5 * p->mag[i] + 1e-30))
            fail_msg("%s q8_0, %d threads, n_tok %d, K %d, N %d: y[%zu] = %.9g, want %.9g",
                     kvp_matvec16_isa_name(mv), kvp_matvec16_threads(mv), p->n_tok, p->K, p->N, i,
                     y[i], p->ref[i]);
    for (size_t i = n; i < n + 16; i++)
        assert_true(y[i] == -12345.0f);
    free(y);
}

static void test_q8_kernel_matches_double_reference(void **state) {
    (void)state;
    /* K of one block, two, and a long row; odd N around the 32-row chunks
     * the threads share */
    const int Ks[] = {32, 64, 4096};
    const int Ns[] = {1, 7, 33, 67};
    const int threads[] = {1, 2, 3};
    kvp_mv16_isa_t is[2];
    int n_isa = kvp_test_isas(is);
    uint64_t seed = 1;
    for (size_t ki = 0; ki < sizeof Ks / sizeof Ks[0]; ki++)
        for (size_t ni = 0; ni < sizeof Ns / sizeof Ns[0]; ni++)
            for (int n_tok = 1; n_tok <= 5; n_tok++) {
                problem_t p = make_problem(n_tok, Ks[ki], Ns[ni], seed++);
                for (int a = 0; a < n_isa; a++)
                    for (size_t th = 0; th < sizeof threads / sizeof threads[0]; th++) {
                        kvp_matvec16_t *mv = kvp_test_runner(threads[th], is[a]);
                        check_problem(mv, &p);
                        kvp_matvec16_free(&mv);
                    }
                free_problem(&p);
            }
}

/* x one-hot at column c: each output is exactly the dequantised weight
 * w[r][c] (every other product is an exact zero), for every column, so a
 * mistake in where a block, a scale or a row starts cannot hide in the
 * tolerance. Five tokens hot at different columns cover the token tiles. */
static void test_q8_kernel_is_exact_on_one_hot_inputs(void **state) {
    (void)state;
    enum { K = 96, N = 37, T = 5 };
    problem_t p = make_problem(1, K, N, 99);
    float x[T * K], y[T * N];
    kvp_mv16_isa_t is[2];
    int n_isa = kvp_test_isas(is);
    for (int a = 0; a < n_isa; a++) {
        kvp_matvec16_t *mv = kvp_test_runner(2, is[a]);
        for (int c = 0; c < K; c++) {
            memset(x, 0, sizeof x);
            for (int t = 0; t < T; t++)
                x[t * K + (c + 7 * t) % K] = 1.0f;
            kvp_matvec16(mv, y, x, p.w, KVP_GGML_Q8_0, T, K, N);
            for (int t = 0; t < T; t++)
                for (int r = 0; r < N; r++)
                    if (y[t * N + r] != p.wf[(size_t)r * K + (c + 7 * t) % K])
                        fail_msg("%s: token %d row %d column %d gave %g, want %g",
                                 kvp_matvec16_isa_name(mv), t, r, (c + 7 * t) % K, y[t * N + r],
                                 p.wf[(size_t)r * K + (c + 7 * t) % K]);
        }
        kvp_matvec16_free(&mv);
    }
    free_problem(&p);
}

/* Hundreds of products of alternating shapes, Q8_0 and F16 mixed, through
 * one runner with workers: each result bit-identical to the single-thread
 * one (an output is computed whole by one thread, the same way whichever). */
static void test_q8_threads_match_one_thread_bit_for_bit(void **state) {
    (void)state;
    kvp_mv16_isa_t is[2];
    int n_isa = kvp_test_isas(is);
    problem_t ps[3] = {make_problem(1, 768, 1001, 11), make_problem(1, 64, 45, 12),
                       make_problem(3, 2048, 129, 13)};
    /* an F16 matrix between them: the job's type must not leak */
    enum { HK = 200, HN = 300 };
    uint16_t *h = malloc(sizeof(uint16_t) * HK * HN);
    for (int i = 0; i < HK * HN; i++)
        h[i] = kvp_f32_to_f16(ps[0].wf[i] * 0.5f);
    for (int a = 0; a < n_isa; a++) {
        kvp_matvec16_t *one = kvp_test_runner(1, is[a]), *many = kvp_test_runner(3, is[a]);
        float *want[3], *got = malloc(sizeof(float) * 3 * 1001), hw[HN], hg[HN];
        for (int i = 0; i < 3; i++) {
            want[i] = malloc(sizeof(float) * (size_t)ps[i].n_tok * ps[i].N);
            kvp_matvec16(one, want[i], ps[i].x, ps[i].w, KVP_GGML_Q8_0, ps[i].n_tok, ps[i].K,
                         ps[i].N);
        }
        kvp_matvec16(one, hw, ps[0].x, h, KVP_GGML_F16, 1, HK, HN);
        for (int rep = 0; rep < 450; rep++) {
            const problem_t *p = &ps[rep % 3];
            memset(got, 0, sizeof(float) * (size_t)p->n_tok * p->N);
            kvp_matvec16(many, got, p->x, p->w, KVP_GGML_Q8_0, p->n_tok, p->K, p->N);
            if (memcmp(got, want[rep % 3], sizeof(float) * (size_t)p->n_tok * p->N))
                fail_msg("%s: product %d differs from the single-thread result",
                         kvp_matvec16_isa_name(many), rep);
            if (rep % 7 == 0) {
                kvp_matvec16(many, hg, ps[0].x, h, KVP_GGML_F16, 1, HK, HN);
                assert_memory_equal(hg, hw, sizeof hw);
            }
            if (rep % 50 == 49) usleep(2000); /* let the workers fall asleep now and then */
        }
        for (int i = 0; i < 3; i++)
            free(want[i]);
        free(got);
        kvp_matvec16_free(&one);
        kvp_matvec16_free(&many);
    }
    free(h);
    for (int i = 0; i < 3; i++)
        free_problem(&ps[i]);
}

/* ---- models with Q8_0 weights ------------------------------------------- */

/* Rows of whole blocks everywhere (n_embd 64, head dim 16, ffn 96) unless
 * n_ff says otherwise; vocab 301 keeps the head's row count odd. */
static kvp_model_config_t q8_cfg(bool tied, int n_ff) {
    return (kvp_model_config_t){.n_vocab = 301,
                                .n_embd = 64,
                                .n_layer = 3,
                                .n_head = 4,
                                .n_kv_head = 2,
                                .n_ff = n_ff,
                                .n_ctx_train = 256,
                                .tied_output = tied};
}

static kvp_model_t *make_model(kvp_model_config_t cfg, uint64_t seed) {
    kvp_model_t *m = NULL;
    kvp_err_t err = {0};
    /* std 0.1 so that attention is far from uniform and errors would show */
    if (kvp_model_new_random(&m, &cfg, seed, 0.1f, &err))
        fail_msg("kvp_model_new_random: %s", err.msg);
    return m;
}

static void make_q8(kvp_model_t *m) {
    kvp_err_t err = {0};
    if (kvp_model_make_half(m, KVP_GGML_Q8_0, &err)) fail_msg("kvp_model_make_half: %s", err.msg);
}

/* orig quantised: the blocks `copy` must hold (unless NULL) and the values
 * `f32` must */
static void expect_quantised(const float *orig, const float *f32, const uint16_t *copy, size_t n) {
    uint8_t *q = malloc(q8_bytes(1, n));
    float *back = malloc(sizeof(float) * n);
    kvp_f32_to_q8_0_row(orig, q, n);
    kvp_q8_0_to_f32_row(q, back, n);
    if (copy) assert_memory_equal(copy, q, q8_bytes(1, n));
    assert_memory_equal(f32, back, sizeof(float) * n);
    free(q);
    free(back);
}

static void test_make_half_q8_0_quantises_and_keeps_the_blocks(void **state) {
    (void)state;
    for (int tied = 0; tied < 2; tied++) {
        kvp_model_config_t cfg = q8_cfg(tied, 96);
        kvp_model_t *orig = make_model(cfg, 3), *m = make_model(cfg, 3);
        make_q8(m);
        assert_int_equal(m->type16, KVP_GGML_Q8_0);
        const size_t E = cfg.n_embd, F = cfg.n_ff, V = cfg.n_vocab, nq = 64, nkv = 32;
        const kvp_layer_t *L = &m->layers[1], *O = &orig->layers[1];
        /* the fused copies: K starts nq rows of blocks into wqkv's, up F
         * rows into gate/up's */
        expect_quantised(O->wk, L->wk, L->wqkv16 + q8_bytes(nq, E) / 2, nkv * E);
        expect_quantised(O->w_up, L->w_up, L->w_gate_up16 + q8_bytes(F, E) / 2, F * E);
        expect_quantised(O->w_down, L->w_down, L->w_down16, E * F);
        expect_quantised(orig->output, m->output, m->output16, V * E);
        /* the token embedding has no copy but is quantised too, tied or not */
        expect_quantised(orig->tok_embd, m->tok_embd, NULL, V * E);
        /* norms stay as they were */
        assert_memory_equal(m->layers[2].ffn_norm, orig->layers[2].ffn_norm, sizeof(float) * E);
        /* bytes a step streams: 34 for every 32 weights */
        size_t weights = 3 * ((nq + 2 * nkv) * E + E * nq + 3 * F * E) + V * E;
        assert_int_equal(kvp_model_step_weight_bytes(m), weights / 32 * 34);
        assert_int_equal(2 * m->n_params16, weights / 32 * 34);
        kvp_model_drop_half(m);
        assert_int_equal(kvp_model_step_weight_bytes(m), 4 * weights);
        kvp_model_free(&orig);
        kvp_model_free(&m);
    }
}

/* n_ff 52: w_down's rows (52 values) are not whole blocks, so it has no
 * copy and keeps its f32 values; the other matrices are Q8_0. A model with
 * no such matrix at all (n_embd 40) is refused and left as it was, a 16-bit
 * copy included. */
static void test_rows_of_partial_blocks_stay_f32(void **state) {
    (void)state;
    kvp_model_config_t cfg = q8_cfg(false, 52);
    kvp_model_t *orig = make_model(cfg, 4), *m = make_model(cfg, 4);
    make_q8(m);
    const size_t E = cfg.n_embd, F = cfg.n_ff;
    for (int l = 0; l < cfg.n_layer; l++) {
        assert_null(m->layers[l].w_down16);
        assert_non_null(m->layers[l].w_gate_up16);
        assert_memory_equal(m->layers[l].w_down, orig->layers[l].w_down, sizeof(float) * E * F);
    }
    assert_int_equal(kvp_model_step_weight_bytes(m),
                     2 * m->n_params16 + 4 * (size_t)cfg.n_layer * E * F);
    kvp_model_free(&orig);
    kvp_model_free(&m);

    kvp_model_config_t odd = q8_cfg(true, 52);
    odd.n_embd = 40; /* head dim 10: no matrix has rows of whole blocks */
    m = make_model(odd, 5);
    orig = make_model(odd, 5);
    kvp_err_t err = {0};
    assert_int_equal(kvp_model_make_half(m, KVP_GGML_BF16, &err), 0);
    uint16_t *bf = m->params16;
    size_t n_bf = m->n_params16;
    float *rounded = malloc(sizeof(float) * m->n_params);
    memcpy(rounded, m->params, sizeof(float) * m->n_params);
    assert_int_equal(kvp_model_make_half(m, KVP_GGML_Q8_0, &err), KVP_EINVAL);
    assert_non_null(strstr(err.msg, "32"));
    assert_ptr_equal(m->params16, bf);
    assert_int_equal(m->n_params16, n_bf);
    assert_int_equal(m->type16, KVP_GGML_BF16);
    assert_memory_equal(m->params, rounded, sizeof(float) * m->n_params);
    free(rounded);
    kvp_model_free(&orig);
    kvp_model_free(&m);
}

/* Prefill of a prompt, then single-token steps: the model with the Q8_0
 * copy against its f32 twin holding the dequantised weights, logits of
 * every step within 1e-4 (the two differ only in the order of additions);
 * also with w_down left on f32 (n_ff 52). */
static void test_q8_0_steps_match_dequantised_f32_twin(void **state) {
    (void)state;
    const int n_ffs[2] = {96, 52};
    for (int fi = 0; fi < 2; fi++)
        for (int tied = 0; tied < 2; tied++) {
            kvp_model_config_t cfg = q8_cfg(tied, n_ffs[fi]);
            kvp_model_t *q = make_model(cfg, 3), *f = make_model(cfg, 3);
            make_q8(q);
            make_q8(f);
            kvp_model_drop_half(f);
            assert_memory_equal(q->params, f->params, sizeof(float) * q->n_params);
            const int V = cfg.n_vocab;
            int32_t tok[24];
            kvp_rng_t r;
            kvp_rng_seed(&r, 17);
            for (int i = 0; i < 24; i++)
                tok[i] = (int32_t)kvp_rng_below(&r, (uint64_t)V);
            kvp_test_stepper_t sq = kvp_test_stepper_new(q, 24), sf = kvp_test_stepper_new(f, 24);
            assert_non_null(kvp_model_ctx_matvec16(sq.ctx));
            kvp_test_step(&sq, tok, 8, KVP_LOGITS_LAST);
            kvp_test_step(&sf, tok, 8, KVP_LOGITS_LAST);
            assert_true(kvp_test_rel_err(sq.logits, sf.logits, V) < 1e-4);
            for (int i = 8; i < 24; i++) {
                kvp_test_step(&sq, tok + i, 1, KVP_LOGITS_LAST);
                kvp_test_step(&sf, tok + i, 1, KVP_LOGITS_LAST);
                double e = kvp_test_rel_err(sq.logits, sf.logits, V);
                if (!(e < 1e-4))
                    fail_msg("n_ff %d, tied %d: step %d differs by %g", n_ffs[fi], tied, i, e);
            }
            kvp_test_stepper_free(&sq);
            kvp_test_stepper_free(&sf);
            kvp_model_free(&q);
            kvp_model_free(&f);
        }
}

/* Which products read the copy: spoil one matrix's blocks and only
 * single-row products change. */
static void test_only_single_rows_read_the_q8_0_copy(void **state) {
    (void)state;
    kvp_model_config_t cfg = q8_cfg(true, 96);
    kvp_model_t *q = make_model(cfg, 8), *f = make_model(cfg, 8);
    make_q8(q);
    make_q8(f);
    kvp_model_drop_half(f);
    memset(q->layers[1].w_down16, 0, q8_bytes((size_t)cfg.n_embd, (size_t)cfg.n_ff));
    const int V = cfg.n_vocab;
    int32_t tok[6] = {5, 77, 300, 0, 12, 140};
    kvp_test_stepper_t sq = kvp_test_stepper_new(q, 8), sf = kvp_test_stepper_new(f, 8);
    kvp_test_step(&sq, tok, 5, KVP_LOGITS_ALL);
    kvp_test_step(&sf, tok, 5, KVP_LOGITS_ALL);
    assert_memory_equal(sq.logits, sf.logits, sizeof(float) * 5 * V);
    kvp_test_step(&sq, tok + 5, 1, KVP_LOGITS_LAST);
    kvp_test_step(&sf, tok + 5, 1, KVP_LOGITS_LAST);
    assert_true(kvp_test_rel_err(sq.logits, sf.logits, V) > 1e-3);
    kvp_test_stepper_free(&sq);
    kvp_test_stepper_free(&sf);
    kvp_model_free(&q);
    kvp_model_free(&f);
}

/* ---- Q8_0 GGUF files ----------------------------------------------------- */

static void tmp_path(char *buf, size_t cap, const char *name) {
    kvp_test_tmp_path(buf, cap, "test_q8", name);
}

/* A Q8_0 file loads with its blocks as the copy: the same model as
 * kvp_model_make_half(Q8_0) gives, down to the fingerprint, and the same
 * logits bit for bit, prefill and single-token steps. */
static void test_q8_0_file_loads_with_its_blocks(void **state) {
    (void)state;
    for (int tied = 0; tied < 2; tied++) {
        kvp_model_t *m = make_model(q8_cfg(tied, 96), 5);
        char path[512];
        tmp_path(path, sizeof path, tied ? "tied.gguf" : "untied.gguf");
        kvp_test_save_model(m, KVP_GGML_Q8_0, path);
        make_q8(m);
        kvp_model_t *r = kvp_test_load_model(path);
        unlink(path);
        assert_non_null(r->params16);
        assert_int_equal(r->type16, KVP_GGML_Q8_0);
        assert_int_equal(r->n_params16, m->n_params16);
        assert_memory_equal(r->params16, m->params16, sizeof(uint16_t) * m->n_params16);
        assert_int_equal(kvp_model_step_weight_bytes(r), kvp_model_step_weight_bytes(m));
        char fa[17], fb[17];
        kvp_model_fingerprint(m, fa);
        kvp_model_fingerprint(r, fb);
        assert_string_equal(fa, fb);
        const int V = m->cfg.n_vocab;
        int32_t tok[12] = {1, 2, 3, 250, 4, 5, 9, 100, 33, 7, 300, 0};
        kvp_test_stepper_t sm = kvp_test_stepper_new(m, 12), sr = kvp_test_stepper_new(r, 12);
        kvp_test_step(&sm, tok, 6, KVP_LOGITS_LAST);
        kvp_test_step(&sr, tok, 6, KVP_LOGITS_LAST);
        assert_memory_equal(sm.logits, sr.logits, sizeof(float) * V);
        for (int i = 6; i < 12; i++) {
            kvp_test_step(&sm, tok + i, 1, KVP_LOGITS_LAST);
            kvp_test_step(&sr, tok + i, 1, KVP_LOGITS_LAST);
            assert_memory_equal(sm.logits, sr.logits, sizeof(float) * V);
        }
        kvp_test_stepper_free(&sm);
        kvp_test_stepper_free(&sr);
        kvp_model_free(&r);
        kvp_model_free(&m);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_q8_0_round_trip_follows_the_reference_formula),
        cmocka_unit_test(test_q8_kernel_matches_double_reference),
        cmocka_unit_test(test_q8_kernel_is_exact_on_one_hot_inputs),
        cmocka_unit_test(test_q8_threads_match_one_thread_bit_for_bit),
        cmocka_unit_test(test_make_half_q8_0_quantises_and_keeps_the_blocks),
        cmocka_unit_test(test_rows_of_partial_blocks_stay_f32),
        cmocka_unit_test(test_q8_0_steps_match_dequantised_f32_twin),
        cmocka_unit_test(test_only_single_rows_read_the_q8_0_copy),
        cmocka_unit_test(test_q8_0_file_loads_with_its_blocks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
