/* Tests of lib/kvp_matvec16 and of the models' 16-bit weights: the kernel
 * against a plain double-precision loop for F16 and BF16 on odd shapes, on
 * the AVX-512 and the plain path and on several threads; the widening of
 * every 16-bit pattern; a long run of products of changing shapes shared
 * with worker threads; the runner's parallel-for; then a model with 16-bit
 * weights against the f32 forward of the same rounded weights (its
 * single-token steps run attention on the runner too), its generation, its
 * GGUF loading and the rule of which products use the copy. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cblas.h>
#include <cmocka.h>

#include "kvp_generate.h"
#include "kvp_gguf.h"
#include "kvp_half.h"
#include "kvp_matvec16.h"
#include "kvp_model.h"
#include "kvp_rng.h"
#include "kvp_test_util.h"

static const kvp_ggml_type_t TYPES[2] = {KVP_GGML_F16, KVP_GGML_BF16};

static float to_f32(uint16_t h, kvp_ggml_type_t t) {
    return t == KVP_GGML_BF16 ? kvp_bf16_to_f32(h) : kvp_f16_to_f32(h);
}

static uint16_t to_16(float f, kvp_ggml_type_t t) {
    return t == KVP_GGML_BF16 ? kvp_f32_to_bf16(f) : kvp_f32_to_f16(f);
}

/* ---- the kernel ------------------------------------------------------- */

/* K = 1, x = 1: y[r] is weight r widened, for all 65536 patterns of each
 * type. Checks the conversions themselves (subnormals, infinities, NaNs). */
static void test_every_16_bit_pattern_widens_exactly(void **state) {
    (void)state;
    const int N = 65536;
    uint16_t *w = malloc(sizeof(uint16_t) * N);
    float *y = malloc(sizeof(float) * N), one = 1.0f;
    for (int i = 0; i < N; i++)
        w[i] = (uint16_t)i;
    kvp_mv16_isa_t is[2];
    int n_isa = kvp_test_isas(is);
    for (int a = 0; a < n_isa; a++)
        for (int ti = 0; ti < 2; ti++) {
            kvp_matvec16_t *mv = kvp_test_runner(2, is[a]);
            kvp_matvec16(mv, y, &one, w, TYPES[ti], 1, 1, N);
            for (int i = 0; i < N; i++) {
                float want = to_f32((uint16_t)i, TYPES[ti]);
                if (isnan(want) ? !isnan(y[i]) : y[i] != want)
                    fail_msg("%s %s: pattern 0x%04x gave %g, want %g", kvp_matvec16_isa_name(mv),
                             kvp_ggml_type_name(TYPES[ti]), i, y[i], want);
            }
            kvp_matvec16_free(&mv);
            assert_null(mv);
        }
    free(w);
    free(y);
}

typedef struct problem {
    int n_tok, K, N;
    kvp_ggml_type_t type;
    uint16_t *w;
    float *x;
    double *ref, *mag; /* sum of w*x and of |w*x| per output, in double */
} problem_t;

static problem_t make_problem(int n_tok, int K, int N, kvp_ggml_type_t type, uint64_t seed) {
    problem_t p = {.n_tok = n_tok, .K = K, .N = N, .type = type};
    p.w = malloc(sizeof(uint16_t) * (size_t)N * K);
    p.x = malloc(sizeof(float) * (size_t)n_tok * K);
    p.ref = malloc(sizeof(double) * (size_t)n_tok * N);
    p.mag = malloc(sizeof(double) * (size_t)n_tok * N);
    kvp_rng_t r;
    kvp_rng_seed(&r, seed);
    for (size_t i = 0; i < (size_t)N * K; i++)
        p.w[i] = to_16(kvp_rng_normal(&r), type);
    for (size_t i = 0; i < (size_t)n_tok * K; i++)
        p.x[i] = 2.0f * kvp_rng_uniform(&r) - 1.0f;
    for (int t = 0; t < n_tok; t++)
        for (int o = 0; o < N; o++) {
            double s = 0, m = 0;
            for (int k = 0; k < K; k++) {
                double v = (double)to_f32(p.w[(size_t)o * K + k], type) * p.x[(size_t)t * K + k];
                s += v;
                m += fabs(v);
            }
            p.ref[(size_t)t * N + o] = s;
            p.mag[(size_t)t * N + o] = m;
        }
    return p;
}

static void free_problem(problem_t *p) {
    free(p->w), free(p->x), free(p->ref), free(p->mag);
}

/* Runs p on mv into a buffer with guard values after it; checks every output
 * against the double reference (f32 accumulation: 1e-5 of the sum of
 * magnitudes) and that nothing past y was written. */
static void check_problem(kvp_matvec16_t *mv, const problem_t *p) {
    size_t n = (size_t)p->n_tok * p->N;
    float *y = malloc(sizeof(float) * (n + 16));
    for (size_t i = 0; i < n + 16; i++)
        y[i] = -12345.0f;
    kvp_matvec16(mv, y, p->x, p->w, p->type, p->n_tok, p->K, p->N);
    for (size_t i = 0; i < n; i++)
        if (!(fabs(y[i] - p->ref[i]) <= 1e-5 * p->mag[i] + 1e-30))
            fail_msg("%s %s, %d threads, n_tok %d, K %d, N %d: y[%zu] = %.9g, want %.9g",
                     kvp_matvec16_isa_name(mv), kvp_ggml_type_name(p->type),
                     kvp_matvec16_threads(mv), p->n_tok, p->K, p->N, i, y[i], p->ref[i]);
    for (size_t i = n; i < n + 16; i++)
        assert_true(y[i] == -12345.0f);
    free(y);
}

static void test_kernel_matches_double_reference(void **state) {
    (void)state;
    /* K and N around and off the 16-wide vectors, the 4-row tiles and the
     * 32-row chunks the threads share */
    const int shapes[][2] = {{1, 1},   {17, 5},   {45, 37}, {64, 64}, {513, 100},
                             {15, 33}, {16, 129}, {31, 67}, {100, 1}, {768, 250}};
    const int n_toks[] = {1, 2, 3, 4, 5, 7};
    const int threads[] = {1, 2, 3};
    kvp_mv16_isa_t is[2];
    int n_isa = kvp_test_isas(is);
    uint64_t seed = 1;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t nt = 0; nt < sizeof n_toks / sizeof n_toks[0]; nt++)
            for (int ti = 0; ti < 2; ti++) {
                problem_t p =
                    make_problem(n_toks[nt], shapes[s][0], shapes[s][1], TYPES[ti], seed++);
                for (int a = 0; a < n_isa; a++)
                    for (size_t th = 0; th < sizeof threads / sizeof threads[0]; th++) {
                        kvp_matvec16_t *mv = kvp_test_runner(threads[th], is[a]);
                        check_problem(mv, &p);
                        kvp_matvec16_free(&mv);
                    }
                free_problem(&p);
            }
}

/* Several hundred products of alternating shapes through one runner with
 * workers: each result must be bit-identical to the single-thread one (a
 * row is computed the same way whichever thread takes it), so a worker
 * acting on a stale or half-written job would show. */
static void test_threads_share_many_products_exactly(void **state) {
    (void)state;
    kvp_mv16_isa_t is[2];
    int n_isa = kvp_test_isas(is);
    problem_t ps[3] = {make_problem(1, 200, 1000, KVP_GGML_BF16, 11),
                       make_problem(1, 96, 40, KVP_GGML_F16, 12),
                       make_problem(2, 64, 333, KVP_GGML_F16, 13)};
    for (int a = 0; a < n_isa; a++) {
        kvp_matvec16_t *one = kvp_test_runner(1, is[a]), *many = kvp_test_runner(3, is[a]);
        float *want[3], *got = malloc(sizeof(float) * 2 * 1000);
        for (int i = 0; i < 3; i++) {
            want[i] = malloc(sizeof(float) * (size_t)ps[i].n_tok * ps[i].N);
            kvp_matvec16(one, want[i], ps[i].x, ps[i].w, ps[i].type, ps[i].n_tok, ps[i].K, ps[i].N);
        }
        for (int rep = 0; rep < 600; rep++) {
            const problem_t *p = &ps[rep % 3];
            memset(got, 0, sizeof(float) * (size_t)p->n_tok * p->N);
            kvp_matvec16(many, got, p->x, p->w, p->type, p->n_tok, p->K, p->N);
            if (memcmp(got, want[rep % 3], sizeof(float) * (size_t)p->n_tok * p->N))
                fail_msg("%s: product %d differs from the single-thread result",
                         kvp_matvec16_isa_name(many), rep);
            if (rep % 50 == 49) usleep(2000); /* let the workers fall asleep now and then */
        }
        for (int i = 0; i < 3; i++)
            free(want[i]);
        free(got);
        kvp_matvec16_free(&one);
        kvp_matvec16_free(&many);
    }
    for (int i = 0; i < 3; i++)
        free_problem(&ps[i]);
}

typedef struct visits {
    atomic_int count[200];
} visits_t;

static void visit(void *arg, int item) {
    visits_t *v = arg;
    atomic_fetch_add(&v->count[item], 1);
}

/* kvp_matvec16_for runs every item exactly once, on 1, 2 and 3 threads, for
 * hundreds of calls in a row of changing sizes, mixed with products through
 * the same runner (a worker must not mistake one kind of job for the other
 * or act on a stale one). */
static void test_for_runs_every_item_exactly_once(void **state) {
    (void)state;
    const int threads[] = {1, 2, 3}, sizes[] = {0, 1, 2, 3, 12, 31, 200};
    const int n_sizes = sizeof sizes / sizeof sizes[0];
    problem_t p = make_problem(1, 64, 300, KVP_GGML_F16, 21);
    float *want = malloc(sizeof(float) * 300), *got = malloc(sizeof(float) * 300);
    visits_t *v = malloc(sizeof *v);
    for (size_t th = 0; th < sizeof threads / sizeof threads[0]; th++) {
        kvp_matvec16_t *mv = kvp_test_runner(threads[th], KVP_MV16_AUTO);
        kvp_matvec16(mv, want, p.x, p.w, p.type, 1, p.K, p.N);
        for (int rep = 0; rep < 700; rep++) {
            int n = sizes[rep % n_sizes];
            for (int i = 0; i < 200; i++)
                atomic_init(&v->count[i], 0);
            kvp_matvec16_for(mv, n, visit, v);
            for (int i = 0; i < 200; i++)
                if (atomic_load(&v->count[i]) != (i < n))
                    fail_msg("%d threads, call %d of %d items: item %d ran %d times", threads[th],
                             rep, n, i, atomic_load(&v->count[i]));
            if (rep % 3 == 0) {
                kvp_matvec16(mv, got, p.x, p.w, p.type, 1, p.K, p.N);
                assert_memory_equal(got, want, sizeof(float) * 300);
            }
            if (rep % 100 == 99) usleep(3000); /* let the workers fall asleep now and then */
        }
        kvp_matvec16_free(&mv);
    }
    free(v);
    free(want);
    free(got);
    free_problem(&p);
}

static void test_runner_refuses_missing_avx512_and_names_its_path(void **state) {
    (void)state;
    kvp_matvec16_t *mv = NULL;
    kvp_err_t err = {0};
    int rc = kvp_matvec16_new(&mv, 1, KVP_MV16_AVX512, &err);
    if (kvp_matvec16_cpu_has_avx512()) {
        assert_int_equal(rc, 0);
        assert_string_equal(kvp_matvec16_isa_name(mv), "avx512");
    } else {
        assert_int_equal(rc, KVP_EUNSUPPORTED);
        assert_null(mv);
    }
    kvp_matvec16_free(&mv);
    assert_int_equal(kvp_matvec16_new(&mv, 0, KVP_MV16_AUTO, &err), 0);
    assert_int_equal(kvp_matvec16_threads(mv), 1);
    assert_string_equal(kvp_matvec16_isa_name(mv),
                        kvp_matvec16_cpu_has_avx512() ? "avx512" : "plain");
    kvp_matvec16_free(&mv);
}

/* ---- models with 16-bit weights ---------------------------------------- */

/* Sizes off every vector width: n_embd 40 (head dim 10), ffn 52, vocab 301. */
static kvp_model_config_t odd_cfg(bool tied) {
    return (kvp_model_config_t){.n_vocab = 301,
                                .n_embd = 40,
                                .n_layer = 3,
                                .n_head = 4,
                                .n_kv_head = 2,
                                .n_ff = 52,
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

/* The same weights twice, rounded to `type`: `h` keeps the 16-bit copy, `f`
 * (its f32 twin) does not. */
static void make_pair(kvp_model_config_t cfg, kvp_ggml_type_t type, kvp_model_t **h,
                      kvp_model_t **f) {
    kvp_err_t err = {0};
    *h = make_model(cfg, 3);
    *f = make_model(cfg, 3);
    if (kvp_model_make_half(*h, type, &err) || kvp_model_make_half(*f, type, &err))
        fail_msg("kvp_model_make_half: %s", err.msg);
    kvp_model_drop_half(*f);
    assert_non_null((*h)->params16);
    assert_null((*f)->params16);
    assert_memory_equal((*h)->params, (*f)->params, sizeof(float) * (*h)->n_params);
}

static void test_make_half_rounds_weights_and_keeps_their_bits(void **state) {
    (void)state;
    for (int tied = 0; tied < 2; tied++)
        for (int ti = 0; ti < 2; ti++) {
            kvp_model_config_t cfg = odd_cfg(tied);
            kvp_model_t *orig = make_model(cfg, 3), *m = make_model(cfg, 3);
            kvp_err_t err = {0};
            assert_int_equal(kvp_model_make_half(m, TYPES[ti], &err), 0);
            assert_int_equal(m->type16, TYPES[ti]);
            const kvp_layer_t *L = &m->layers[1];
            const size_t E = cfg.n_embd, F = cfg.n_ff;
            /* the fused gate/up copy: every value is the rounded original and
             * its bits are the 16-bit copy's */
            for (size_t i = 0; i < 2 * F * E; i++) {
                float want = to_f32(to_16(orig->layers[1].w_gate_up[i], TYPES[ti]), TYPES[ti]);
                assert_true(L->w_gate_up[i] == want);
                assert_true(to_f32(L->w_gate_up16[i], TYPES[ti]) == want);
            }
            for (size_t i = 0; i < (size_t)cfg.n_vocab * E; i++) {
                assert_true(to_f32(m->output16[i], TYPES[ti]) == m->output[i]);
                /* the token embedding is rounded too, tied or not */
                assert_true(m->tok_embd[i] ==
                            to_f32(to_16(orig->tok_embd[i], TYPES[ti]), TYPES[ti]));
            }
            /* norms stay as they were */
            assert_memory_equal(m->layers[2].ffn_norm, orig->layers[2].ffn_norm, sizeof(float) * E);
            /* bytes a step streams: exactly half those of the f32 twin */
            size_t n16 = m->n_params16;
            assert_int_equal(kvp_model_step_weight_bytes(m), 2 * n16);
            kvp_model_drop_half(m);
            assert_null(m->params16);
            assert_null(m->layers[0].wqkv16);
            assert_int_equal(kvp_model_step_weight_bytes(m), 4 * n16);
            kvp_model_free(&orig);
            kvp_model_free(&m);
        }
    kvp_model_t *m = make_model(odd_cfg(true), 3);
    kvp_err_t err = {0};
    assert_int_equal(kvp_model_make_half(m, KVP_GGML_F32, &err), KVP_EINVAL);
    assert_null(m->params16);
    kvp_model_free(&m);
}

/* Prefill of a prompt, then single-token steps: the model with the 16-bit
 * copy against its f32 twin, logits of every step within 1e-5. */
static void test_single_token_steps_match_f32_twin(void **state) {
    (void)state;
    for (int tied = 0; tied < 2; tied++)
        for (int ti = 0; ti < 2; ti++) {
            kvp_model_t *h, *f;
            make_pair(odd_cfg(tied), TYPES[ti], &h, &f);
            const int V = h->cfg.n_vocab;
            int32_t tok[24];
            kvp_rng_t r;
            kvp_rng_seed(&r, 17);
            for (int i = 0; i < 24; i++)
                tok[i] = (int32_t)kvp_rng_below(&r, (uint64_t)V);
            kvp_test_stepper_t sh = kvp_test_stepper_new(h, 24), sf = kvp_test_stepper_new(f, 24);
            assert_non_null(kvp_model_ctx_matvec16(sh.ctx));
            assert_null(kvp_model_ctx_matvec16(sf.ctx));
            kvp_test_step(&sh, tok, 8, KVP_LOGITS_LAST);
            kvp_test_step(&sf, tok, 8, KVP_LOGITS_LAST);
            assert_true(kvp_test_rel_err(sh.logits, sf.logits, V) < 1e-5);
            for (int i = 8; i < 24; i++) {
                kvp_test_step(&sh, tok + i, 1, KVP_LOGITS_LAST);
                kvp_test_step(&sf, tok + i, 1, KVP_LOGITS_LAST);
                double e = kvp_test_rel_err(sh.logits, sf.logits, V);
                if (!(e < 1e-5))
                    fail_msg("%s, tied %d: step %d differs by %g", kvp_ggml_type_name(TYPES[ti]),
                             tied, i, e);
            }
            /* both caches were filled from the same keys and values */
            assert_true(kvp_test_rel_err(kvp_kvcache_k(sh.cache, 2), kvp_kvcache_k(sf.cache, 2),
                                         (size_t)sh.cache->cap * h->cfg.n_kv_head *
                                             h->cfg.head_dim) < 1e-5);
            kvp_test_stepper_free(&sh);
            kvp_test_stepper_free(&sf);
            kvp_model_free(&h);
            kvp_model_free(&f);
        }
}

/* A context whose runner has `threads` threads (the context takes
 * OpenBLAS's count), over a cache of cap positions. */
static kvp_test_stepper_t stepper_with_threads(const kvp_model_t *m, int cap, int threads) {
    int was = openblas_get_num_threads();
    openblas_set_num_threads(threads);
    kvp_test_stepper_t s = kvp_test_stepper_new(m, cap);
    openblas_set_num_threads(was);
    return s;
}

/* A long context, where attention over the cache weighs most: after a
 * 200-token prefill, single-token steps (attention shared among the
 * runner's threads head by head) match the f32 twin (kvp_attention on
 * sgemm) within 1e-5; and a run of 210 single-token steps gives the same
 * logits bit for bit on 1 and on 3 runner threads. */
static void test_long_context_steps_match_twin_and_any_thread_count(void **state) {
    (void)state;
    enum { N = 210, PROMPT = 200 };
    kvp_model_t *h, *f;
    make_pair(odd_cfg(false), KVP_GGML_BF16, &h, &f);
    const int V = h->cfg.n_vocab;
    int32_t tok[N];
    kvp_rng_t r;
    kvp_rng_seed(&r, 23);
    for (int i = 0; i < N; i++)
        tok[i] = (int32_t)kvp_rng_below(&r, (uint64_t)V);
    kvp_test_stepper_t sh = kvp_test_stepper_new(h, N), sf = kvp_test_stepper_new(f, N);
    kvp_test_step(&sh, tok, PROMPT, KVP_LOGITS_LAST);
    kvp_test_step(&sf, tok, PROMPT, KVP_LOGITS_LAST);
    for (int i = PROMPT; i < N; i++) {
        kvp_test_step(&sh, tok + i, 1, KVP_LOGITS_LAST);
        kvp_test_step(&sf, tok + i, 1, KVP_LOGITS_LAST);
        double e = kvp_test_rel_err(sh.logits, sf.logits, V);
        if (!(e < 1e-5)) fail_msg("step at position %d differs from the f32 twin by %g", i, e);
    }
    kvp_test_stepper_free(&sh);
    kvp_test_stepper_free(&sf);

    kvp_test_stepper_t s1 = stepper_with_threads(h, N, 1), s3 = stepper_with_threads(h, N, 3);
    assert_int_equal(kvp_matvec16_threads(kvp_model_ctx_matvec16(s1.ctx)), 1);
    int t3 = kvp_matvec16_threads(kvp_model_ctx_matvec16(s3.ctx));
    if (t3 != 3) print_message("OpenBLAS gave %d threads, not 3: comparing 1 with %d\n", t3, t3);
    assert_true(t3 > 1);
    for (int i = 0; i < N; i++) {
        kvp_test_step(&s1, tok + i, 1, KVP_LOGITS_LAST);
        kvp_test_step(&s3, tok + i, 1, KVP_LOGITS_LAST);
        if (memcmp(s1.logits, s3.logits, sizeof(float) * V))
            fail_msg("position %d: logits on %d threads differ from those on 1", i, t3);
    }
    kvp_test_stepper_free(&s1);
    kvp_test_stepper_free(&s3);
    kvp_model_free(&h);
    kvp_model_free(&f);
}

/* Which products use the copy: spoil the copy of one matrix and only
 * single-row products may change. */
static void test_only_single_rows_read_the_copy(void **state) {
    (void)state;
    kvp_model_t *h, *f;
    make_pair(odd_cfg(true), KVP_GGML_BF16, &h, &f);
    const int V = h->cfg.n_vocab, E = h->cfg.n_embd, F = h->cfg.n_ff;
    for (size_t i = 0; i < (size_t)E * F; i++)
        h->layers[1].w_down16[i] = 0;
    int32_t tok[6] = {5, 77, 300, 0, 12, 140};
    kvp_test_stepper_t sh = kvp_test_stepper_new(h, 8), sf = kvp_test_stepper_new(f, 8);
    /* rows > 1 (all logits): sgemm on f32 everywhere, bit for bit the same */
    kvp_test_step(&sh, tok, 5, KVP_LOGITS_ALL);
    kvp_test_step(&sf, tok, 5, KVP_LOGITS_ALL);
    assert_memory_equal(sh.logits, sf.logits, sizeof(float) * 5 * V);
    /* one token: the spoiled copy shows */
    kvp_test_step(&sh, tok + 5, 1, KVP_LOGITS_LAST);
    kvp_test_step(&sf, tok + 5, 1, KVP_LOGITS_LAST);
    assert_true(kvp_test_rel_err(sh.logits, sf.logits, V) > 1e-3);
    /* without the copy the same context is back on f32 */
    kvp_model_drop_half(h);
    sh.cache->len = sf.cache->len = 5;
    kvp_test_step(&sh, tok + 5, 1, KVP_LOGITS_LAST);
    kvp_test_step(&sf, tok + 5, 1, KVP_LOGITS_LAST);
    assert_memory_equal(sh.logits, sf.logits, sizeof(float) * V);
    kvp_test_stepper_free(&sh);
    kvp_test_stepper_free(&sf);
    kvp_model_free(&h);
    kvp_model_free(&f);
}

typedef struct collected {
    int32_t tok[64];
    int n;
} collected_t;

static int collect(void *user, int32_t t) {
    collected_t *c = user;
    if (c->n < 64) c->tok[c->n++] = t;
    return 0;
}

static void test_greedy_generation_gives_same_tokens(void **state) {
    (void)state;
    for (int ti = 0; ti < 2; ti++) {
        kvp_model_t *h, *f;
        make_pair(odd_cfg(false), TYPES[ti], &h, &f);
        const int32_t prompt[7] = {3, 1, 4, 1, 5, 9, 2};
        kvp_gen_params_t gp = {
            .n_predict = 40, .sampler = {.temp = 0.0f, .top_p = 1.0f}, .chunk = 4};
        collected_t ch = {0}, cf = {0};
        kvp_err_t err = {0};
        if (kvp_generate(h, prompt, 7, &gp, -1, collect, &ch, NULL, &err) ||
            kvp_generate(f, prompt, 7, &gp, -1, collect, &cf, NULL, &err))
            fail_msg("generate: %s", err.msg);
        assert_int_equal(ch.n, 40);
        assert_int_equal(cf.n, 40);
        assert_memory_equal(ch.tok, cf.tok, sizeof(int32_t) * 40);
        /* not a degenerate run of one token */
        int distinct = 0;
        for (int i = 1; i < 40; i++)
            distinct += ch.tok[i] != ch.tok[0];
        assert_true(distinct > 0);
        kvp_model_free(&h);
        kvp_model_free(&f);
    }
}

/* ---- loading from GGUF ------------------------------------------------- */

static void tmp_path(char *buf, size_t cap, const char *name) {
    kvp_test_tmp_path(buf, cap, "test_matvec16", name);
}

/* A file of 16-bit matrices loads with the copy, holding the file's bits:
 * the same model as kvp_model_make_half gives, down to the fingerprint. */
static void test_16_bit_files_load_with_the_copy(void **state) {
    (void)state;
    for (int tied = 0; tied < 2; tied++)
        for (int ti = 0; ti < 2; ti++) {
            kvp_model_t *m = make_model(odd_cfg(tied), 5);
            char path[512];
            tmp_path(path, sizeof path, kvp_ggml_type_name(TYPES[ti]));
            kvp_test_save_model(m, TYPES[ti], path);
            kvp_err_t err = {0};
            assert_int_equal(kvp_model_make_half(m, TYPES[ti], &err), 0);
            kvp_model_t *r = kvp_test_load_model(path);
            unlink(path);
            assert_non_null(r->params16);
            assert_int_equal(r->type16, TYPES[ti]);
            assert_int_equal(r->n_params16, m->n_params16);
            assert_memory_equal(r->params16, m->params16, sizeof(uint16_t) * m->n_params16);
            char fa[17], fb[17];
            kvp_model_fingerprint(m, fa);
            kvp_model_fingerprint(r, fb);
            assert_string_equal(fa, fb);
            kvp_model_free(&r);
            kvp_model_free(&m);
        }
}

/* An F32 file, and a file whose matrices mix F16 and BF16, load without a
 * copy. (Q8_0 files load with theirs: tests/test_q8.c.) */
static void test_other_files_load_without_the_copy(void **state) {
    (void)state;
    kvp_model_config_t cfg = odd_cfg(true);
    kvp_model_t *m = make_model(cfg, 6);
    char path[512], mixed[512];
    tmp_path(path, sizeof path, "f32");
    kvp_test_save_model(m, KVP_GGML_F32, path);
    kvp_model_t *r = kvp_test_load_model(path);
    unlink(path);
    assert_null(r->params16);
    assert_null(r->output16);
    kvp_model_free(&r);
    /* an F16 file with one matrix rewritten as BF16 */
    tmp_path(path, sizeof path, "f16");
    tmp_path(mixed, sizeof mixed, "mixed");
    kvp_test_save_model(m, KVP_GGML_F16, path);
    kvp_gguf_t *g = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_gguf_open(&g, path, &err), 0);
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    for (uint64_t i = 0; i < kvp_gguf_n_kv(g); i++)
        assert_int_equal(kvp_gguf_writer_copy_kv(w, kvp_gguf_kv_at(g, i)), 0);
    for (uint64_t i = 0; i < kvp_gguf_n_tensors(g); i++) {
        const kvp_gguf_tensor_t *t = kvp_gguf_tensor_at(g, i);
        char name[128];
        snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
        int rc;
        if (!strcmp(name, "blk.2.ffn_up.weight")) {
            float *f = malloc(sizeof(float) * t->n_elems);
            assert_int_equal(kvp_gguf_tensor_to_f32(t, f, &err), 0);
            rc = kvp_gguf_writer_add_tensor(w, name, t->n_dims, t->ne, KVP_GGML_BF16, f, &err);
            free(f);
        } else {
            rc = kvp_gguf_writer_add_tensor_raw(w, name, t->n_dims, t->ne, t->type, t->data, &err);
        }
        if (rc) fail_msg("copying %s: %s", name, err.msg);
    }
    if (kvp_gguf_writer_write(w, mixed, &err)) fail_msg("writing: %s", err.msg);
    kvp_gguf_writer_free(&w);
    kvp_gguf_free(&g);
    r = kvp_test_load_model(path);
    assert_int_equal(r->type16, KVP_GGML_F16); /* the untouched file has it */
    kvp_model_free(&r);
    r = kvp_test_load_model(mixed);
    assert_null(r->params16);
    kvp_model_free(&r);
    unlink(path);
    unlink(mixed);
    kvp_model_free(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_16_bit_pattern_widens_exactly),
        cmocka_unit_test(test_kernel_matches_double_reference),
        cmocka_unit_test(test_threads_share_many_products_exactly),
        cmocka_unit_test(test_for_runs_every_item_exactly_once),
        cmocka_unit_test(test_runner_refuses_missing_avx512_and_names_its_path),
        cmocka_unit_test(test_make_half_rounds_weights_and_keeps_their_bits),
        cmocka_unit_test(test_single_token_steps_match_f32_twin),
        cmocka_unit_test(test_long_context_steps_match_twin_and_any_thread_count),
        cmocka_unit_test(test_only_single_rows_read_the_copy),
        cmocka_unit_test(test_greedy_generation_gives_same_tokens),
        cmocka_unit_test(test_16_bit_files_load_with_the_copy),
        cmocka_unit_test(test_other_files_load_without_the_copy),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
