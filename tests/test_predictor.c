/* Tests of lib/kvp_predictor: the default layer map, chunked against whole
 * application, the arena grouped by aux layer, the cache path against a plain
 * reference on an uneven layer map, the perfect (identity) predictor through
 * the base model, the ridge fit recovering an exact linear map (in one chunk
 * or many), the analytic validation error, the file round trip (also with an
 * uneven map), refusal of a wrong model pair and of malformed files, and
 * refusal of a training checkpoint from before the grouped arena. */
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

#include "kvp_ckpt.h"
#include "kvp_gguf.h"
#include "kvp_kvptrain.h"
#include "kvp_model.h"
#include "kvp_ops.h"
#include "kvp_predictor.h"
#include "kvp_rng.h"
#include "kvp_tokenizer.h"
#include "kvp_trainer.h"

#include "kvp_test_util.h"

static const kvp_kv_shape_t AUX = {2, 2, 8};  /* d_in 16 */
static const kvp_kv_shape_t BASE = {3, 3, 4}; /* d_out 12 */

static kvp_model_config_t small_cfg(int n_layer) {
    return (kvp_model_config_t){.n_vocab = 300,
                                .n_embd = 64,
                                .n_layer = n_layer,
                                .n_head = 4,
                                .n_kv_head = 2,
                                .n_ff = 96,
                                .n_ctx_train = 256,
                                .rope_base = 10000.0f,
                                .tied_output = true};
}

static kvp_model_t *make_model(int n_layer, uint64_t seed) {
    kvp_model_config_t cfg = small_cfg(n_layer);
    kvp_model_t *m = NULL;
    kvp_err_t err = {0};
    if (kvp_model_new_random(&m, &cfg, seed, 0.1f, &err)) fail_msg("model: %s", err.msg);
    return m;
}

static float *randn(size_t n, float std, kvp_rng_t *r) {
    float *x = malloc(sizeof(float) * n);
    assert_non_null(x);
    for (size_t i = 0; i < n; i++)
        x[i] = std * kvp_rng_normal(r);
    return x;
}

static void fill_randn(float *x, size_t n, float std, kvp_rng_t *r) {
    for (size_t i = 0; i < n; i++)
        x[i] = std * kvp_rng_normal(r);
}

/* max |a-b| / max |b| */
static double rel_err(const float *a, const float *b, size_t n) {
    double d = 0, mx = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        mx = fmax(mx, fabs((double)b[i]));
    }
    return d / (mx > 0 ? mx : 1);
}

static void tmp_path(char *buf, size_t cap, const char *name) {
    const char *dir = getenv("KVP_TEST_TMP");
    if (!dir || !*dir) dir = "/tmp";
    mkdir(dir, 0755);
    snprintf(buf, cap, "%s/test_predictor_%d_%s", dir, (int)getpid(), name);
}

/* map NULL: the default layer map */
static kvp_predictor_t *random_predictor_map(kvp_kv_shape_t aux, kvp_kv_shape_t base,
                                             const int32_t *map, uint64_t seed) {
    kvp_predictor_t *p;
    kvp_err_t err = {0};
    if (kvp_predictor_new(&p, aux, base, map, &err)) fail_msg("%s", err.msg);
    kvp_rng_t r;
    kvp_rng_seed(&r, seed);
    fill_randn(p->params, p->n_params, 0.3f, &r);
    return p;
}

static kvp_predictor_t *random_predictor(kvp_kv_shape_t aux, kvp_kv_shape_t base, uint64_t seed) {
    return random_predictor_map(aux, base, NULL, seed);
}

/* ---- synthetic data: base K/V an exact linear function of aux K/V ------ */

typedef struct synth {
    int n;                  /* rows */
    float *ak[4], *av[4];   /* aux layers [n][d_in] */
    float *bk[4], *bv[4];   /* base layers [n][d_out] */
    kvp_predictor_t *truth; /* the map that made bk/bv from ak/av */
} synth_t;

/* noise > 0 adds N(0, noise) to the base rows. */
static synth_t synth_new(int n, uint64_t seed, float noise, const kvp_predictor_t *truth) {
    synth_t s = {.n = n};
    kvp_rng_t r;
    kvp_rng_seed(&r, seed);
    int d_in = truth->d_in, d_out = truth->d_out;
    for (int a = 0; a < truth->aux.n_layer; a++) {
        s.ak[a] = randn((size_t)n * d_in, 1.0f, &r);
        s.av[a] = randn((size_t)n * d_in, 1.0f, &r);
        for (size_t i = 0; i < (size_t)n * d_in; i++) /* features with a mean, as real K have */
            s.ak[a][i] += 0.5f * (float)(i % d_in) / d_in;
    }
    for (int l = 0; l < truth->base.n_layer; l++) {
        s.bk[l] = malloc(sizeof(float) * (size_t)n * d_out);
        s.bv[l] = malloc(sizeof(float) * (size_t)n * d_out);
    }
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_apply(truth, n, (const float *const *)s.ak,
                                         (const float *const *)s.av, s.bk, s.bv, &err),
                     0);
    for (int l = 0; l < truth->base.n_layer && noise > 0; l++)
        for (size_t i = 0; i < (size_t)n * d_out; i++) {
            s.bk[l][i] += noise * kvp_rng_normal(&r);
            s.bv[l][i] += noise * kvp_rng_normal(&r);
        }
    return s;
}

static void synth_free(synth_t *s) {
    for (int i = 0; i < 4; i++)
        free(s->ak[i]), free(s->av[i]), free(s->bk[i]), free(s->bv[i]);
}

/* Rows [t0, t0+n) of s as pointer arrays. */
static void synth_slice(const synth_t *s, int t0, int d_in, int d_out, const float **ak,
                        const float **av, const float **bk, const float **bv) {
    for (int i = 0; i < 4; i++) {
        ak[i] = s->ak[i] ? s->ak[i] + (size_t)t0 * d_in : NULL;
        av[i] = s->av[i] ? s->av[i] + (size_t)t0 * d_in : NULL;
        bk[i] = s->bk[i] ? s->bk[i] + (size_t)t0 * d_out : NULL;
        bv[i] = s->bv[i] ? s->bv[i] + (size_t)t0 * d_out : NULL;
    }
}

static void fit_add(kvp_predictor_fit_t *f, const synth_t *s, int t0, int n, int validation,
                    int d_in, int d_out) {
    const float *ak[4], *av[4], *bk[4], *bv[4];
    synth_slice(s, t0, d_in, d_out, ak, av, bk, bv);
    kvp_err_t err = {0};
    if (kvp_predictor_fit_add(f, n, ak, av, bk, bv, validation, &err)) fail_msg("%s", err.msg);
}

/* ---- tests ------------------------------------------------------------ */

static void test_default_layer_map_known_values(void **state) {
    (void)state;
    int32_t m[28];
    kvp_predictor_default_layer_map(2, 4, m);
    assert_memory_equal(m, ((int32_t[]){0, 0, 1, 1}), 4 * sizeof(int32_t));
    kvp_predictor_default_layer_map(16, 28, m);
    assert_int_equal(m[0], 0);
    assert_int_equal(m[27], 15);
    for (int i = 1; i < 28; i++)
        assert_true(m[i] >= m[i - 1] && m[i] - m[i - 1] <= 1);
    kvp_predictor_default_layer_map(16, 4, m);
    assert_memory_equal(m, ((int32_t[]){3, 7, 11, 15}), 4 * sizeof(int32_t));
    kvp_predictor_default_layer_map(5, 5, m);
    assert_memory_equal(m, ((int32_t[]){0, 1, 2, 3, 4}), 5 * sizeof(int32_t));
    kvp_predictor_default_layer_map(7, 1, m);
    assert_int_equal(m[0], 6);
}

/* Token by token: three chunks give what one call gives. */
static void test_apply_in_chunks_equals_at_once(void **state) {
    (void)state;
    kvp_predictor_t *p = random_predictor(AUX, BASE, 1);
    kvp_rng_t r;
    kvp_rng_seed(&r, 2);
    int n = 45, cuts[4] = {0, 7, 30, 45};
    const float *ak[2], *av[2];
    float *whole_k[3], *whole_v[3], *part_k[3], *part_v[3];
    for (int a = 0; a < 2; a++)
        ak[a] = randn((size_t)n * p->d_in, 1, &r), av[a] = randn((size_t)n * p->d_in, 1, &r);
    for (int l = 0; l < 3; l++) {
        whole_k[l] = malloc(sizeof(float) * n * p->d_out);
        whole_v[l] = malloc(sizeof(float) * n * p->d_out);
        part_k[l] = malloc(sizeof(float) * n * p->d_out);
        part_v[l] = malloc(sizeof(float) * n * p->d_out);
    }
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_apply(p, n, ak, av, whole_k, whole_v, &err), 0);
    for (int c = 0; c < 3; c++) {
        int t0 = cuts[c], m = cuts[c + 1] - t0;
        const float *ck[2], *cv[2];
        float *ok[3], *ov[3];
        for (int a = 0; a < 2; a++)
            ck[a] = ak[a] + t0 * p->d_in, cv[a] = av[a] + t0 * p->d_in;
        for (int l = 0; l < 3; l++)
            ok[l] = part_k[l] + t0 * p->d_out, ov[l] = part_v[l] + t0 * p->d_out;
        assert_int_equal(kvp_predictor_apply(p, m, ck, cv, ok, ov, &err), 0);
    }
    for (int l = 0; l < 3; l++) {
        assert_true(rel_err(part_k[l], whole_k[l], (size_t)n * p->d_out) < 1e-6);
        assert_true(rel_err(part_v[l], whole_v[l], (size_t)n * p->d_out) < 1e-6);
        /* against a plain loop, for one row */
        const float *x = ak[p->layer_map[l]] + 9 * p->d_in;
        for (int o = 0; o < p->d_out; o++) {
            double y = p->layers[l].k_b[o];
            for (int i = 0; i < p->d_in; i++)
                y += (double)p->layers[l].k_w[o * p->d_in + i] * x[i];
            assert_true(fabs(y - whole_k[l][9 * p->d_out + o]) < 1e-4);
        }
        free(whole_k[l]), free(whole_v[l]), free(part_k[l]), free(part_v[l]);
    }
    for (int a = 0; a < 2; a++)
        free((void *)ak[a]), free((void *)av[a]);
    kvp_predictor_free(&p);
}

/* The cache path in chunks equals it in one call (and the caches' RoPE is
 * undone and redone on the way). */
static void test_apply_cache_in_chunks_equals_at_once(void **state) {
    (void)state;
    kvp_model_t *am = make_model(2, 3);
    kvp_predictor_t *p = random_predictor(kvp_kv_shape_of(am), (kvp_kv_shape_t){3, 2, 16}, 4);
    kvp_err_t err = {0};
    int n = 37;
    kvp_kvcache_t *aux, *b1, *b2;
    assert_int_equal(kvp_model_new_cache(am, 64, &aux, &err), 0);
    float inv_freq[8];
    for (int i = 0; i < 8; i++)
        inv_freq[i] = powf(500.0f, -(float)i / 8);
    assert_int_equal(kvp_kvcache_new(&b1, 3, 2, 16, 64, 16, inv_freq, &err), 0);
    assert_int_equal(kvp_kvcache_new(&b2, 3, 2, 16, 64, 16, inv_freq, &err), 0);
    kvp_model_ctx_t *ctx;
    assert_int_equal(kvp_model_ctx_new(&ctx, am, 64, 64, &err), 0);
    int32_t tok[37];
    for (int i = 0; i < n; i++)
        tok[i] = (i * 37 + 11) % 300;
    assert_int_equal(kvp_model_forward(ctx, aux, tok, n, NULL, KVP_LOGITS_NONE, &err), 0);
    assert_int_equal(kvp_predictor_apply_cache(p, aux, b1, 0, n, &err), 0);
    assert_int_equal(kvp_predictor_apply_cache(p, aux, b2, 20, n - 20, &err), 0);
    assert_int_equal(kvp_predictor_apply_cache(p, aux, b2, 0, 20, &err), 0);
    size_t sz = (size_t)3 * 2 * 64 * 16;
    assert_true(rel_err(b2->k, b1->k, sz) < 1e-6);
    assert_true(rel_err(b2->v, b1->v, sz) < 1e-6);
    assert_int_equal(b1->len, 0); /* the caller sets the length */
    /* a base cache of the wrong shape is refused */
    assert_int_equal(kvp_predictor_apply_cache(p, aux, aux, 0, n, &err), KVP_ESHAPE);
    kvp_model_ctx_free(&ctx);
    kvp_kvcache_free(&aux), kvp_kvcache_free(&b1), kvp_kvcache_free(&b2);
    kvp_predictor_free(&p);
    kvp_model_free(&am);
}

/* KV Prediction's hand-over with a perfect predictor: the identity from a
 * model's own cache, then one base step, equals plain prefill. */
static void test_identity_predictor_gives_base_prefill_logits(void **state) {
    (void)state;
    kvp_model_t *m = make_model(3, 5);
    int n = 33, V = m->cfg.n_vocab;
    int32_t tok[33];
    for (int i = 0; i < n; i++)
        tok[i] = (i * 53 + 7) % V;
    kvp_err_t err = {0};
    kvp_predictor_t *p;
    assert_int_equal(kvp_predictor_new_identity(&p, kvp_kv_shape_of(m), &err), 0);
    assert_int_equal(kvp_predictor_bind(p, m, m, &err), 0);
    assert_int_equal(kvp_predictor_check_pair(p, m, m, &err), 0);
    kvp_model_ctx_t *ctx;
    kvp_kvcache_t *plain, *aux, *pred;
    assert_int_equal(kvp_model_ctx_new(&ctx, m, 64, 64, &err), 0);
    assert_int_equal(kvp_model_new_cache(m, 64, &plain, &err), 0);
    assert_int_equal(kvp_model_new_cache(m, 64, &aux, &err), 0);
    assert_int_equal(kvp_model_new_cache(m, 64, &pred, &err), 0);
    float *want = malloc(sizeof(float) * V), *got = malloc(sizeof(float) * V);
    assert_int_equal(kvp_model_forward(ctx, plain, tok, n, want, KVP_LOGITS_LAST, &err), 0);
    assert_int_equal(kvp_model_forward(ctx, aux, tok, n - 1, NULL, KVP_LOGITS_NONE, &err), 0);
    assert_int_equal(kvp_predictor_apply_cache(p, aux, pred, 0, 12, &err), 0);
    assert_int_equal(kvp_predictor_apply_cache(p, aux, pred, 12, n - 13, &err), 0);
    assert_int_equal(kvp_kvcache_set_len(pred, n - 1, &err), 0);
    assert_int_equal(kvp_model_forward(ctx, pred, tok + n - 1, 1, got, KVP_LOGITS_LAST, &err), 0);
    assert_true(rel_err(got, want, (size_t)V) < 1e-5);
    free(want), free(got);
    kvp_kvcache_free(&plain), kvp_kvcache_free(&aux), kvp_kvcache_free(&pred);
    kvp_model_ctx_free(&ctx);
    kvp_predictor_free(&p);
    kvp_model_free(&m);
}

/* ---- an uneven layer map -------------------------------------------------- */

/* aux layer 1 feeds base layers 0 and 2, aux 0 feeds 1 and 3, aux 2 feeds 4:
 * groups that are neither contiguous in l nor in map order */
static const kvp_kv_shape_t UAUX = {3, 2, 8};  /* d_in 16 */
static const kvp_kv_shape_t UBASE = {5, 3, 4}; /* d_out 12 */
static const int32_t UMAP[5] = {1, 0, 1, 0, 2};
enum { UCAP = 320 };

/* A cache of shape s, partial RoPE (4 of head_dim) */
static kvp_kvcache_t *uneven_cache(kvp_kv_shape_t s) {
    float inv_freq[2];
    kvp_rope_inv_freq(inv_freq, 4, 10000.0f, NULL);
    kvp_kvcache_t *c;
    kvp_err_t err = {0};
    if (kvp_kvcache_new(&c, s.n_layer, s.n_kv_head, s.head_dim, UCAP, 4, inv_freq, &err))
        fail_msg("%s", err.msg);
    return c;
}

/* The views cover the arena exactly once, and a group's K weights (likewise
 * V weights, K and V biases) are adjacent in increasing base layer: aux 0's
 * block (layers 1, 3) first, then aux 1's (0, 2), then aux 2's (4). */
static void test_arena_is_grouped_by_aux_layer(void **state) {
    (void)state;
    kvp_predictor_t *p = random_predictor_map(UAUX, UBASE, UMAP, 20);
    const size_t nw = (size_t)p->d_out * p->d_in, nb = (size_t)p->d_out;
    unsigned char *seen = calloc(p->n_params, 1);
    for (int l = 0; l < 5; l++) {
        const kvp_predictor_layer_t *L = &p->layers[l];
        const float *t[4] = {L->k_w, L->k_b, L->v_w, L->v_b};
        for (int i = 0; i < 4; i++)
            for (size_t j = 0; j < (i % 2 ? nb : nw); j++) {
                size_t at = (size_t)(t[i] - p->params) + j;
                assert_true(at < p->n_params);
                assert_int_equal(seen[at]++, 0);
            }
    }
    for (size_t i = 0; i < p->n_params; i++)
        assert_int_equal(seen[i], 1);
    free(seen);
    const kvp_predictor_layer_t *L = p->layers;
    assert_ptr_equal(L[1].k_w, p->params);
    assert_ptr_equal(L[3].k_w, L[1].k_w + nw);
    assert_ptr_equal(L[1].v_w, L[3].k_w + nw);
    assert_ptr_equal(L[3].v_w, L[1].v_w + nw);
    assert_ptr_equal(L[1].k_b, L[3].v_w + nw);
    assert_ptr_equal(L[3].k_b, L[1].k_b + nb);
    assert_ptr_equal(L[1].v_b, L[3].k_b + nb);
    assert_ptr_equal(L[3].v_b, L[1].v_b + nb);
    assert_ptr_equal(L[0].k_w, L[3].v_b + nb);
    assert_ptr_equal(L[2].k_w, L[0].k_w + nw);
    assert_ptr_equal(L[4].v_b + nb, p->params + p->n_params);
    kvp_predictor_free(&p);
    /* the identity predictor's map is i -> i, with W = I through the views */
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_new_identity(&p, UBASE, &err), 0);
    for (int l = 0; l < 5; l++) {
        assert_int_equal(p->layer_map[l], l);
        assert_true(p->layers[l].k_w[1 * p->d_in + 1] == 1.0f && p->layers[l].k_w[1] == 0.0f);
        assert_true(p->layers[l].v_w[5 * p->d_in + 5] == 1.0f && p->layers[l].v_b[5] == 0.0f);
    }
    kvp_predictor_free(&p);
}

/* apply_cache on the uneven map equals, for every base layer, the map written
 * out in double on the aux rows it reads; positions outside the span stay
 * untouched. 300 tokens: more than one of apply_cache's passes. */
static void test_apply_and_apply_cache_match_plain_reference_on_uneven_map(void **state) {
    (void)state;
    kvp_predictor_t *p = random_predictor_map(UAUX, UBASE, UMAP, 21);
    kvp_kvcache_t *aux = uneven_cache(UAUX), *base = uneven_cache(UBASE);
    kvp_rng_t r;
    kvp_rng_seed(&r, 22);
    const int pos0 = 7, n = 300, d_in = p->d_in, d_out = p->d_out;
    kvp_err_t err = {0};
    for (int a = 0; a < 3; a++) {
        float *k = randn((size_t)UCAP * d_in, 1.0f, &r), *v = randn((size_t)UCAP * d_in, 1.0f, &r);
        assert_int_equal(kvp_kvcache_write(aux, a, 0, UCAP, k, v, &err), 0);
        free(k), free(v);
    }
    assert_int_equal(kvp_predictor_apply_cache(p, aux, base, pos0, n, &err), 0);
    /* kvp_predictor_apply on the same rows, as the pipeline's predictor runs it */
    float *ak[3], *av[3], *ok[5], *ov[5];
    for (int a = 0; a < 3; a++) {
        ak[a] = malloc(sizeof(float) * n * d_in), av[a] = malloc(sizeof(float) * n * d_in);
        assert_int_equal(kvp_kvcache_read(aux, a, pos0, n, ak[a], av[a], &err), 0);
    }
    for (int l = 0; l < 5; l++)
        ok[l] = malloc(sizeof(float) * n * d_out), ov[l] = malloc(sizeof(float) * n * d_out);
    assert_int_equal(
        kvp_predictor_apply(p, n, (const float *const *)ak, (const float *const *)av, ok, ov, &err),
        0);
    float *xk = malloc(sizeof(float) * n * d_in), *xv = malloc(sizeof(float) * n * d_in);
    float *gk = malloc(sizeof(float) * n * d_out), *gv = malloc(sizeof(float) * n * d_out);
    float *wk = malloc(sizeof(float) * n * d_out), *wv = malloc(sizeof(float) * n * d_out);
    for (int l = 0; l < 5; l++) {
        const kvp_predictor_layer_t *L = &p->layers[l];
        assert_int_equal(kvp_kvcache_read(aux, UMAP[l], pos0, n, xk, xv, &err), 0);
        for (int t = 0; t < n; t++)
            for (int o = 0; o < d_out; o++) {
                double yk = L->k_b[o], yv = L->v_b[o];
                for (int i = 0; i < d_in; i++) {
                    yk += (double)L->k_w[o * d_in + i] * xk[t * d_in + i];
                    yv += (double)L->v_w[o * d_in + i] * xv[t * d_in + i];
                }
                wk[t * d_out + o] = (float)yk, wv[t * d_out + o] = (float)yv;
            }
        assert_int_equal(kvp_kvcache_read(base, l, pos0, n, gk, gv, &err), 0);
        double ek = rel_err(gk, wk, (size_t)n * d_out), ev = rel_err(gv, wv, (size_t)n * d_out);
        if (ek > 1e-4 || ev > 1e-4) fail_msg("base layer %d: K error %g, V error %g", l, ek, ev);
        ek = rel_err(ok[l], wk, (size_t)n * d_out), ev = rel_err(ov[l], wv, (size_t)n * d_out);
        if (ek > 1e-4 || ev > 1e-4)
            fail_msg("apply, base layer %d: K error %g, V error %g", l, ek, ev);
        free(ok[l]), free(ov[l]);
        /* positions before and after the span were not written */
        for (int h = 0; h < UBASE.n_kv_head; h++) {
            const float *kh = kvp_kvcache_k(base, l) + (size_t)h * UCAP * UBASE.head_dim;
            const float *vh = kvp_kvcache_v(base, l) + (size_t)h * UCAP * UBASE.head_dim;
            for (int pos = 0; pos < UCAP; pos++) {
                if (pos >= pos0 && pos < pos0 + n) continue;
                for (int i = 0; i < UBASE.head_dim; i++)
                    assert_true(kh[pos * UBASE.head_dim + i] == 0 &&
                                vh[pos * UBASE.head_dim + i] == 0);
            }
        }
    }
    /* a span past the base cache's end is refused before anything is written */
    kvp_kvcache_t *fresh = uneven_cache(UBASE);
    assert_int_equal(kvp_predictor_apply_cache(p, aux, fresh, UCAP - 10, 11, &err), KVP_ERANGE);
    for (size_t i = 0; i < (size_t)5 * 3 * UCAP * 4; i++)
        assert_true(fresh->k[i] == 0 && fresh->v[i] == 0);
    kvp_kvcache_free(&fresh);
    free(xk), free(xv), free(gk), free(gv), free(wk), free(wv);
    for (int a = 0; a < 3; a++)
        free(ak[a]), free(av[a]);
    kvp_kvcache_free(&aux), kvp_kvcache_free(&base);
    kvp_predictor_free(&p);
}

/* A predictor with the uneven map, saved and loaded, has the same map and
 * weights per layer and fills a base cache bit for bit as the original. */
static void test_save_load_with_uneven_map_gives_identical_outputs(void **state) {
    (void)state;
    kvp_predictor_t *p = random_predictor_map(UAUX, UBASE, UMAP, 23), *q;
    char path[512];
    tmp_path(path, sizeof path, "uneven.gguf");
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_save(p, path, &err), 0);
    if (kvp_predictor_load(&q, path, &err)) fail_msg("%s", err.msg);
    unlink(path);
    assert_memory_equal(q->layer_map, UMAP, sizeof UMAP);
    const size_t nw = (size_t)p->d_out * p->d_in, nb = (size_t)p->d_out;
    for (int l = 0; l < 5; l++) {
        assert_memory_equal(q->layers[l].k_w, p->layers[l].k_w, sizeof(float) * nw);
        assert_memory_equal(q->layers[l].v_w, p->layers[l].v_w, sizeof(float) * nw);
        assert_memory_equal(q->layers[l].k_b, p->layers[l].k_b, sizeof(float) * nb);
        assert_memory_equal(q->layers[l].v_b, p->layers[l].v_b, sizeof(float) * nb);
    }
    kvp_kvcache_t *aux = uneven_cache(UAUX), *b1 = uneven_cache(UBASE), *b2 = uneven_cache(UBASE);
    kvp_rng_t r;
    kvp_rng_seed(&r, 24);
    for (int a = 0; a < 3; a++) {
        float *k = randn((size_t)UCAP * p->d_in, 1.0f, &r);
        float *v = randn((size_t)UCAP * p->d_in, 1.0f, &r);
        assert_int_equal(kvp_kvcache_write(aux, a, 0, UCAP, k, v, &err), 0);
        free(k), free(v);
    }
    assert_int_equal(kvp_predictor_apply_cache(p, aux, b1, 3, 100, &err), 0);
    assert_int_equal(kvp_predictor_apply_cache(q, aux, b2, 3, 100, &err), 0);
    size_t sz = sizeof(float) * 5 * 3 * UCAP * 4;
    assert_memory_equal(b1->k, b2->k, sz);
    assert_memory_equal(b1->v, b2->v, sz);
    kvp_kvcache_free(&aux), kvp_kvcache_free(&b1), kvp_kvcache_free(&b2);
    kvp_predictor_free(&q), kvp_predictor_free(&p);
}

/* ---- the KV-prediction trainer's checkpoint ------------------------------- */

/* A checkpoint of train-kvp holds the raw arena; one written before the arena
 * was grouped by aux layer (no "pred.layout" section) must be refused on
 * resume with a message naming the reason, not read as grouped. (Here rather
 * than in test_kvptrain.c: the layout is this module's.) */
static void make_kvp_run(kvp_model_t **aux, kvp_model_t **base, kvp_predictor_t **p) {
    kvp_model_config_t bc = {.n_vocab = kvp_tokenizer_bytelevel_n_vocab(0),
                             .n_embd = 16,
                             .n_layer = 2,
                             .n_head = 2,
                             .n_ff = 32,
                             .n_ctx_train = 16,
                             .tied_output = true};
    kvp_model_config_t ac = bc;
    ac.n_layer = 1;
    *base = kvp_test_model(bc, 30, 0.1f);
    *aux = kvp_test_model(ac, 31, 0.1f);
    kvp_err_t err = {0};
    if (kvp_predictor_new(p, kvp_kv_shape_of(*aux), kvp_kv_shape_of(*base), NULL, &err))
        fail_msg("%s", err.msg);
    kvp_kvptrain_init_predictor(*p, 32);
}

static int run_kvp(kvp_corpus_t *c, kvp_trainer_config_t *t, kvp_err_t *err) {
    kvp_model_t *aux, *base;
    kvp_predictor_t *p;
    make_kvp_run(&aux, &base, &p);
    kvp_kvptrain_weights_t w;
    kvp_kvptrain_weights_default(&w);
    kvp_kvptrain_result_t r;
    int rc = kvp_kvptrain_run(aux, base, p, c, t, &w, &r, err);
    if (!rc && t->resume) assert_true(r.resumed);
    kvp_predictor_free(&p);
    kvp_model_free(&aux), kvp_model_free(&base);
    return rc;
}

static void test_kvptrain_refuses_checkpoint_before_grouped_layout(void **state) {
    (void)state;
    kvp_test_scratch_t s;
    kvp_test_scratch_init(&s, "test_predictor_ckpt");
    kvp_corpus_t *c = kvp_test_load_corpus(s.corpus);
    kvp_trainer_config_t t;
    kvp_trainer_config_default(&t);
    t.batch = 2, t.ctx = 16, t.steps = 4, t.warmup = 1, t.seed = 33;
    t.eval_every = 0, t.eval_tokens = 64, t.final_eval_tokens = 64;
    t.ckpt_path = kvp_test_path(&s, "run.ckpt");
    t.ckpt_every = 1;
    t.stop_after = 2;
    kvp_err_t err = {0};
    if (run_kvp(c, &t, &err)) fail_msg("first run: %s", err.msg);
    /* a current checkpoint resumes */
    t.resume = true, t.stop_after = 3;
    if (run_kvp(c, &t, &err)) fail_msg("resume: %s", err.msg);
    /* the same without its layout section: what older versions wrote */
    static const char *const names[] = {"meta",       "rng",        "aux.params",  "pred.params",
                                        "aux.adam.m", "aux.adam.v", "pred.adam.m", "pred.adam.v"};
    kvp_ckpt_t *ck;
    assert_int_equal(kvp_ckpt_read(&ck, t.ckpt_path, &err), 0);
    uint64_t n;
    assert_non_null(kvp_ckpt_find(ck, "pred.layout", &n));
    kvp_ckpt_section_t sec[8];
    for (int i = 0; i < 8; i++) {
        sec[i].name = names[i];
        sec[i].data = kvp_ckpt_find(ck, names[i], &sec[i].size);
        assert_non_null(sec[i].data);
    }
    assert_int_equal(kvp_ckpt_write(t.ckpt_path, sec, 8, &err), 0);
    kvp_ckpt_free(&ck);
    t.stop_after = 0;
    assert_int_equal(run_kvp(c, &t, &err), KVP_EUNSUPPORTED);
    assert_non_null(strstr(err.msg, "predates the grouped predictor layout; restart training"));
    kvp_corpus_free(&c);
    assert_int_equal(kvp_test_scratch_remove(&s), 0);
}

static void assert_predictors_close(const kvp_predictor_t *a, const kvp_predictor_t *b,
                                    double tol) {
    assert_int_equal(a->n_params, b->n_params);
    assert_memory_equal(a->layer_map, b->layer_map, sizeof(int32_t) * a->base.n_layer);
    double d = 0;
    for (size_t i = 0; i < a->n_params; i++)
        d = fmax(d, fabs((double)a->params[i] - b->params[i]));
    if (d > tol) fail_msg("max weight difference %g > %g", d, tol);
}

static kvp_predictor_t *solve(kvp_predictor_fit_t *f, const double *lambdas, int n) {
    kvp_predictor_t *p;
    kvp_err_t err = {0};
    if (kvp_predictor_fit_solve(f, lambdas, n, &p, &err)) fail_msg("%s", err.msg);
    return p;
}

static void test_fit_recovers_exact_linear_map(void **state) {
    (void)state;
    kvp_predictor_t *truth = random_predictor(AUX, BASE, 6);
    synth_t s = synth_new(300, 7, 0, truth);
    kvp_predictor_fit_t *f;
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_fit_new(&f, AUX, BASE, NULL, &err), 0);
    fit_add(f, &s, 0, s.n, 0, truth->d_in, truth->d_out);
    double lambda = 1e-9;
    kvp_predictor_t *p = solve(f, &lambda, 1);
    assert_predictors_close(p, truth, 1e-4);
    assert_non_null(p->fit);
    assert_int_equal(p->fit->train_tokens, 300);
    assert_true(isnan(p->fit->val_rse_k[0]));
    kvp_predictor_free(&p);
    kvp_predictor_fit_free(&f);
    synth_free(&s);
    kvp_predictor_free(&truth);
}

/* Sums fed chunk by chunk (odd sizes, across the internal 256-row blocks)
 * equal them fed at once. A custom layer map is kept. */
static void test_fit_in_chunks_equals_one_chunk(void **state) {
    (void)state;
    int32_t map[3] = {1, 0, 1};
    kvp_predictor_t *truth;
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_new(&truth, AUX, BASE, map, &err), 0);
    kvp_rng_t r;
    kvp_rng_seed(&r, 8);
    fill_randn(truth->params, truth->n_params, 0.3f, &r);
    synth_t s = synth_new(700, 9, 0.05f, truth);
    kvp_predictor_fit_t *one, *many;
    assert_int_equal(kvp_predictor_fit_new(&one, AUX, BASE, map, &err), 0);
    assert_int_equal(kvp_predictor_fit_new(&many, AUX, BASE, map, &err), 0);
    fit_add(one, &s, 0, s.n, 0, truth->d_in, truth->d_out);
    int cuts[] = {0, 1, 38, 300, 555, 700};
    for (int c = 0; c < 5; c++)
        fit_add(many, &s, cuts[c], cuts[c + 1] - cuts[c], 0, truth->d_in, truth->d_out);
    assert_int_equal(kvp_predictor_fit_rows(many, 0), 700);
    double lambda = 1e-3;
    kvp_predictor_t *p1 = solve(one, &lambda, 1), *p2 = solve(many, &lambda, 1);
    assert_predictors_close(p2, p1, 1e-6);
    assert_memory_equal(p1->layer_map, map, sizeof map);
    assert_predictors_close(p1, truth, 2e-2); /* noisy, but close */
    kvp_predictor_free(&p1), kvp_predictor_free(&p2);
    kvp_predictor_fit_free(&one), kvp_predictor_fit_free(&many);
    synth_free(&s);
    kvp_predictor_free(&truth);
}

/* The grid: each map's validation error from the sums equals the error of
 * the chosen weights computed on the rows themselves, and it is the least
 * over the grid. */
static void test_fit_grid_validation_error_matches_rows(void **state) {
    (void)state;
    kvp_predictor_t *truth = random_predictor(AUX, BASE, 10);
    synth_t cal = synth_new(60, 11, 0.5f, truth), val = synth_new(200, 12, 0.5f, truth);
    kvp_predictor_fit_t *f;
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_fit_new(&f, AUX, BASE, NULL, &err), 0);
    fit_add(f, &cal, 0, cal.n, 0, truth->d_in, truth->d_out);
    double grid[] = {1e-4, 1e-3, 1e-2, 1e-1, 1, 10, 100};
    kvp_predictor_t *bad;
    assert_int_equal(kvp_predictor_fit_solve(f, grid, 7, &bad, &err), KVP_EINVAL);
    assert_non_null(strstr(err.msg, "validation rows"));
    fit_add(f, &val, 0, val.n, 1, truth->d_in, truth->d_out);
    kvp_predictor_t *p = solve(f, grid, 7);
    float *yk[3], *yv[3];
    for (int l = 0; l < 3; l++)
        yk[l] = malloc(sizeof(float) * val.n * p->d_out),
        yv[l] = malloc(sizeof(float) * val.n * p->d_out);
    assert_int_equal(kvp_predictor_apply(p, val.n, (const float *const *)val.ak,
                                         (const float *const *)val.av, yk, yv, &err),
                     0);
    for (int l = 0; l < 3; l++) {
        double e = 0, y2 = 0;
        for (size_t i = 0; i < (size_t)val.n * p->d_out; i++) {
            e += pow((double)yk[l][i] - val.bk[l][i], 2);
            y2 += pow((double)val.bk[l][i], 2);
        }
        assert_true(fabs(e / y2 - p->fit->val_rse_k[l]) < 1e-4 * (e / y2));
        for (int g = 0; g < 7; g++) { /* the chosen lambda is the best single one */
            kvp_predictor_t *q = solve(f, &grid[g], 1);
            assert_true(p->fit->val_rse_k[l] <= q->fit->val_rse_k[l] * (1 + 1e-6));
            assert_true(p->fit->val_rse_v[l] <= q->fit->val_rse_v[l] * (1 + 1e-6));
            kvp_predictor_free(&q);
        }
        free(yk[l]), free(yv[l]);
    }
    /* 60 noisy rows for 17 unknowns: some regularisation beats almost none */
    assert_true(p->fit->lambda_k[0] > 1e-4f);
    kvp_predictor_free(&p);
    kvp_predictor_fit_free(&f);
    synth_free(&cal), synth_free(&val);
    kvp_predictor_free(&truth);
}

static void test_save_load_round_trip_is_exact(void **state) {
    (void)state;
    kvp_predictor_t *truth = random_predictor(AUX, BASE, 13);
    synth_t s = synth_new(100, 14, 0.1f, truth);
    kvp_predictor_fit_t *f;
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_fit_new(&f, AUX, BASE, NULL, &err), 0);
    fit_add(f, &s, 0, 80, 0, truth->d_in, truth->d_out);
    fit_add(f, &s, 80, 20, 1, truth->d_in, truth->d_out);
    double grid[] = {1e-3, 1e-1};
    kvp_predictor_t *p = solve(f, grid, 2), *q;
    strcpy(p->aux_fingerprint, "0123456789abcdef");
    strcpy(p->base_fingerprint, "fedcba9876543210");
    char path[512];
    tmp_path(path, sizeof path, "rt.gguf");
    assert_int_equal(kvp_predictor_save(p, path, &err), 0);
    if (kvp_predictor_load(&q, path, &err)) fail_msg("%s", err.msg);
    assert_memory_equal(&q->aux, &p->aux, sizeof p->aux);
    assert_memory_equal(&q->base, &p->base, sizeof p->base);
    assert_memory_equal(q->params, p->params, sizeof(float) * p->n_params);
    assert_memory_equal(q->layer_map, p->layer_map, sizeof(int32_t) * 3);
    assert_string_equal(q->aux_fingerprint, p->aux_fingerprint);
    assert_string_equal(q->base_fingerprint, p->base_fingerprint);
    assert_non_null(q->fit);
    assert_memory_equal(q->fit->lambda_k, p->fit->lambda_k, 3 * sizeof(float));
    assert_memory_equal(q->fit->val_rse_v, p->fit->val_rse_v, 3 * sizeof(float));
    assert_int_equal(q->fit->train_tokens, 80);
    assert_int_equal(q->fit->val_tokens, 20);
    kvp_predictor_free(&q);
    /* an unfitted, unbound predictor too */
    kvp_predictor_free(&p);
    p = random_predictor(BASE, AUX, 15);
    assert_int_equal(kvp_predictor_save(p, path, &err), 0);
    if (kvp_predictor_load(&q, path, &err)) fail_msg("%s", err.msg);
    assert_memory_equal(q->params, p->params, sizeof(float) * p->n_params);
    assert_null(q->fit);
    assert_string_equal(q->aux_fingerprint, "");
    unlink(path);
    kvp_predictor_free(&q), kvp_predictor_free(&p);
    kvp_predictor_fit_free(&f);
    synth_free(&s);
    kvp_predictor_free(&truth);
}

static void test_other_model_pair_is_refused(void **state) {
    (void)state;
    kvp_model_t *aux = make_model(2, 20), *base = make_model(3, 21);
    kvp_model_t *other = make_model(3, 22), *deeper = make_model(4, 23);
    kvp_err_t err = {0};
    kvp_predictor_t *p, *q;
    assert_int_equal(kvp_predictor_new(&p, kvp_kv_shape_of(aux), kvp_kv_shape_of(base), NULL, &err),
                     0);
    assert_int_equal(kvp_predictor_check_pair(p, aux, other, &err), 0); /* unbound: shapes only */
    assert_int_equal(kvp_predictor_bind(p, aux, base, &err), 0);
    char path[512];
    tmp_path(path, sizeof path, "pair.gguf");
    assert_int_equal(kvp_predictor_save(p, path, &err), 0);
    assert_int_equal(kvp_predictor_load(&q, path, &err), 0);
    assert_int_equal(kvp_predictor_check_pair(q, aux, base, &err), 0);
    char fp_base[17], fp_other[17];
    kvp_model_fingerprint(base, fp_base);
    kvp_model_fingerprint(other, fp_other);
    assert_int_equal(kvp_predictor_check_pair(q, aux, other, &err), KVP_ESHAPE);
    assert_non_null(strstr(err.msg, "base_fingerprint"));
    assert_non_null(strstr(err.msg, fp_base));
    assert_non_null(strstr(err.msg, fp_other));
    assert_int_equal(kvp_predictor_check_pair(q, other, base, &err), KVP_ESHAPE);
    assert_non_null(strstr(err.msg, "aux"));
    assert_int_equal(kvp_predictor_check_pair(q, aux, deeper, &err), KVP_ESHAPE);
    assert_non_null(strstr(err.msg, "base.n_layer is 3 in the predictor but 4"));
    assert_int_equal(kvp_predictor_bind(q, aux, deeper, &err), KVP_ESHAPE);
    unlink(path);
    kvp_predictor_free(&p), kvp_predictor_free(&q);
    kvp_model_free(&aux), kvp_model_free(&base), kvp_model_free(&other), kvp_model_free(&deeper);
}

/* ---- malformed files -------------------------------------------------- */

enum breakage { WRONG_ARCH, MISSING_TENSOR, BAD_SHAPE, MAP_OUT_OF_RANGE, SHORT_MAP, BAD_FP };

/* A predictor file for AUX -> BASE written by hand, broken one way. */
static void write_broken(const char *path, enum breakage how) {
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    kvp_err_t err = {0};
    kvp_gguf_writer_set_str(w, "general.architecture",
                            how == WRONG_ARCH ? "llama" : "kvpred-predictor");
    const char *which[2] = {"aux", "base"};
    kvp_kv_shape_t sh[2] = {AUX, BASE};
    char key[96];
    for (int i = 0; i < 2; i++) {
        snprintf(key, sizeof key, "kvpred-predictor.%s.block_count", which[i]);
        kvp_gguf_writer_set_u32(w, key, (uint32_t)sh[i].n_layer);
        snprintf(key, sizeof key, "kvpred-predictor.%s.head_count_kv", which[i]);
        kvp_gguf_writer_set_u32(w, key, (uint32_t)sh[i].n_kv_head);
        snprintf(key, sizeof key, "kvpred-predictor.%s.head_dim", which[i]);
        kvp_gguf_writer_set_u32(w, key, (uint32_t)sh[i].head_dim);
    }
    int32_t map[3] = {0, 1, how == MAP_OUT_OF_RANGE ? 2 : 1};
    kvp_gguf_writer_set_arr_i32(w, "kvpred-predictor.layer_map", map, how == SHORT_MAP ? 2 : 3);
    kvp_gguf_writer_set_str(w, "kvpred-predictor.aux_fingerprint",
                            how == BAD_FP ? "xyz" : "0123456789abcdef");
    kvp_gguf_writer_set_str(w, "kvpred-predictor.base_fingerprint", "");
    float zeros[16 * 12] = {0};
    char name[64];
    for (int l = 0; l < 3; l++) {
        const char *kv[2] = {"k", "v"};
        for (int j = 0; j < 2; j++) {
            uint64_t ne_w[2] = {16, how == BAD_SHAPE && l == 1 && j == 1 ? 11 : 12}, ne_b[1] = {12};
            snprintf(name, sizeof name, "blk.%d.%s_map.weight", l, kv[j]);
            assert_int_equal(
                kvp_gguf_writer_add_tensor(w, name, 2, ne_w, KVP_GGML_F32, zeros, &err), 0);
            if (how == MISSING_TENSOR && l == 2 && j == 0) continue;
            snprintf(name, sizeof name, "blk.%d.%s_map.bias", l, kv[j]);
            assert_int_equal(
                kvp_gguf_writer_add_tensor(w, name, 1, ne_b, KVP_GGML_F32, zeros, &err), 0);
        }
    }
    assert_int_equal(kvp_gguf_writer_write(w, path, &err), 0);
    kvp_gguf_writer_free(&w);
}

static void expect_refused(enum breakage how, int code, const char *needle) {
    char path[512];
    tmp_path(path, sizeof path, "broken.gguf");
    write_broken(path, how);
    kvp_predictor_t *p = (kvp_predictor_t *)&p; /* must be reset to NULL */
    kvp_err_t err = {0};
    int rc = kvp_predictor_load(&p, path, &err);
    unlink(path);
    if (rc != code || !strstr(err.msg, needle))
        fail_msg("breakage %d: got %d '%s', want %d with '%s'", how, rc, err.msg, code, needle);
    assert_null(p);
    assert_non_null(strstr(err.msg, path)); /* the message names the file */
}

static void test_malformed_files_are_refused(void **state) {
    (void)state;
    expect_refused(WRONG_ARCH, KVP_EUNSUPPORTED, "general.architecture is 'llama'");
    expect_refused(MISSING_TENSOR, KVP_EFORMAT, "missing tensor blk.2.k_map.bias");
    expect_refused(BAD_SHAPE, KVP_EFORMAT, "tensor blk.1.v_map.weight has 2 dims [16, 11]");
    expect_refused(MAP_OUT_OF_RANGE, KVP_ERANGE, "layer_map[2] = 2 is outside");
    expect_refused(SHORT_MAP, KVP_EFORMAT, "layer_map has 2 entries");
    expect_refused(BAD_FP, KVP_EFORMAT, "aux_fingerprint 'xyz'");
    /* a model file is not a predictor */
    char path[512];
    tmp_path(path, sizeof path, "model.gguf");
    kvp_model_t *m = make_model(2, 30);
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    kvp_err_t err = {0};
    assert_int_equal(kvp_model_to_gguf(m, w, KVP_GGML_F32, &err), 0);
    assert_int_equal(kvp_gguf_writer_write(w, path, &err), 0);
    kvp_gguf_writer_free(&w);
    kvp_predictor_t *p;
    assert_int_equal(kvp_predictor_load(&p, path, &err), KVP_EUNSUPPORTED);
    unlink(path);
    kvp_model_free(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_default_layer_map_known_values),
        cmocka_unit_test(test_apply_in_chunks_equals_at_once),
        cmocka_unit_test(test_apply_cache_in_chunks_equals_at_once),
        cmocka_unit_test(test_arena_is_grouped_by_aux_layer),
        cmocka_unit_test(test_apply_and_apply_cache_match_plain_reference_on_uneven_map),
        cmocka_unit_test(test_save_load_with_uneven_map_gives_identical_outputs),
        cmocka_unit_test(test_identity_predictor_gives_base_prefill_logits),
        cmocka_unit_test(test_fit_recovers_exact_linear_map),
        cmocka_unit_test(test_fit_in_chunks_equals_one_chunk),
        cmocka_unit_test(test_fit_grid_validation_error_matches_rows),
        cmocka_unit_test(test_save_load_round_trip_is_exact),
        cmocka_unit_test(test_other_model_pair_is_refused),
        cmocka_unit_test(test_malformed_files_are_refused),
        cmocka_unit_test(test_kvptrain_refuses_checkpoint_before_grouped_layout),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
