/* Tests of lib/kvp_model: the forward pass against a plain double-precision
 * reference of the Llama architecture, chunked prefill against whole-prompt
 * prefill and token-by-token decoding, the cache hand-over path, GGUF save and
 * load in every tensor type, and refusal of bad models. */
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
#include "kvp_model.h"
#include "kvp_rng.h"
#include "kvp_test_util.h"
#include "kvp_tokenizer.h"

static kvp_model_config_t small_cfg(void) {
    return (kvp_model_config_t){.n_vocab = 300,
                                .n_embd = 64,
                                .n_layer = 3,
                                .n_head = 4,
                                .n_kv_head = 2,
                                .n_ff = 96,
                                .n_ctx_train = 256,
                                .rope_base = 10000.0f,
                                .tied_output = true};
}

/* std 0.1 so that attention is far from uniform and errors would show;
 * norms not all 1, to test that they are applied */
static kvp_model_t *make_model(kvp_model_config_t cfg, uint64_t seed) {
    return kvp_test_model(cfg, seed, 0.1f);
}

static int32_t *random_tokens(int n, int n_vocab, uint64_t seed) {
    int32_t *t = malloc(sizeof(int32_t) * (size_t)n);
    kvp_rng_t r;
    kvp_rng_seed(&r, seed);
    for (int i = 0; i < n; i++)
        t[i] = (int32_t)kvp_rng_below(&r, (uint64_t)n_vocab);
    return t;
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

/* ---- a plain reference of the architecture, in double ----------------- */

static void ref_rmsnorm(double *y, const double *x, const float *w, int n, double eps) {
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    double s = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++)
        y[i] = x[i] * s * w[i];
}

static void ref_matvec(double *y, const double *x, const float *w, int n_in, int n_out) {
    for (int o = 0; o < n_out; o++) {
        double s = 0;
        for (int i = 0; i < n_in; i++)
            s += (double)w[(size_t)o * n_in + i] * x[i];
        y[o] = s;
    }
}

/* llama "normal" rope: adjacent pairs (2i, 2i+1), angle pos * base^(-2i/rope_dim) */
static void ref_rope(double *x, int n_head, int hd, int rope_dim, int pos, double base) {
    for (int h = 0; h < n_head; h++)
        for (int i = 0; i < rope_dim / 2; i++) {
            double a = pos * pow(base, -2.0 * i / rope_dim);
            double *p = x + h * hd + 2 * i, x0 = p[0], x1 = p[1];
            p[0] = x0 * cos(a) - x1 * sin(a);
            p[1] = x0 * sin(a) + x1 * cos(a);
        }
}

/* Logits [n][n_vocab] of the whole sequence, from scratch. */
static void ref_forward(const kvp_model_t *m, const int32_t *tok, int n, float *logits) {
    const kvp_model_config_t *c = &m->cfg;
    int E = c->n_embd, hd = c->head_dim, nq = c->n_head * hd, nkv = c->n_kv_head * hd, F = c->n_ff,
        grp = c->n_head / c->n_kv_head;
    double *x = calloc((size_t)n * E, sizeof(double)), *xn = malloc(sizeof(double) * E),
           *q = malloc(sizeof(double) * (size_t)n * nq),
           *k = malloc(sizeof(double) * (size_t)n * nkv),
           *v = malloc(sizeof(double) * (size_t)n * nkv), *att = malloc(sizeof(double) * nq),
           *o = malloc(sizeof(double) * E), *g = malloc(sizeof(double) * F),
           *u = malloc(sizeof(double) * F), *sc = malloc(sizeof(double) * n);
    for (int t = 0; t < n; t++)
        for (int i = 0; i < E; i++)
            x[(size_t)t * E + i] = m->tok_embd[(size_t)tok[t] * E + i];
    for (int l = 0; l < c->n_layer; l++) {
        const kvp_layer_t *L = &m->layers[l];
        for (int t = 0; t < n; t++) {
            ref_rmsnorm(xn, x + (size_t)t * E, L->attn_norm, E, c->norm_eps);
            ref_matvec(q + (size_t)t * nq, xn, L->wq, E, nq);
            ref_matvec(k + (size_t)t * nkv, xn, L->wk, E, nkv);
            ref_matvec(v + (size_t)t * nkv, xn, L->wv, E, nkv);
            ref_rope(q + (size_t)t * nq, c->n_head, hd, c->rope_dim, t, c->rope_base);
            ref_rope(k + (size_t)t * nkv, c->n_kv_head, hd, c->rope_dim, t, c->rope_base);
        }
        for (int t = 0; t < n; t++) {
            for (int h = 0; h < c->n_head; h++) {
                int kh = h / grp;
                double mx = -1e300, sum = 0;
                for (int j = 0; j <= t; j++) {
                    double s = 0;
                    for (int d = 0; d < hd; d++)
                        s += q[(size_t)t * nq + h * hd + d] * k[(size_t)j * nkv + kh * hd + d];
                    sc[j] = s / sqrt((double)hd);
                    mx = fmax(mx, sc[j]);
                }
                for (int j = 0; j <= t; j++)
                    sum += (sc[j] = exp(sc[j] - mx));
                for (int d = 0; d < hd; d++) {
                    double s = 0;
                    for (int j = 0; j <= t; j++)
                        s += sc[j] / sum * v[(size_t)j * nkv + kh * hd + d];
                    att[h * hd + d] = s;
                }
            }
            ref_matvec(o, att, L->wo, nq, E);
            for (int i = 0; i < E; i++)
                x[(size_t)t * E + i] += o[i];
            ref_rmsnorm(xn, x + (size_t)t * E, L->ffn_norm, E, c->norm_eps);
            ref_matvec(g, xn, L->w_gate, E, F);
            ref_matvec(u, xn, L->w_up, E, F);
            for (int i = 0; i < F; i++)
                g[i] = g[i] / (1 + exp(-g[i])) * u[i];
            ref_matvec(o, g, L->w_down, F, E);
            for (int i = 0; i < E; i++)
                x[(size_t)t * E + i] += o[i];
        }
    }
    double *lg = malloc(sizeof(double) * c->n_vocab);
    for (int t = 0; t < n; t++) {
        ref_rmsnorm(xn, x + (size_t)t * E, m->output_norm, E, c->norm_eps);
        ref_matvec(lg, xn, m->output, E, c->n_vocab);
        for (int i = 0; i < c->n_vocab; i++)
            logits[(size_t)t * c->n_vocab + i] = (float)lg[i];
    }
    free(lg);
    free(x), free(xn), free(q), free(k), free(v), free(att), free(o), free(g), free(u), free(sc);
}

/* Logits of every position, feeding the prompt in the given chunk sizes. */
static float *run_chunks(const kvp_model_t *m, const int32_t *tok, int n, const int *chunks,
                         int n_chunks, int max_tok) {
    kvp_err_t err = {0};
    kvp_model_ctx_t *ctx;
    kvp_kvcache_t *cache;
    assert_int_equal(kvp_model_ctx_new(&ctx, m, max_tok, n, &err), 0);
    assert_int_equal(kvp_model_new_cache(m, n, &cache, &err), 0);
    float *logits = malloc(sizeof(float) * (size_t)n * m->cfg.n_vocab);
    int off = 0;
    for (int i = 0; off < n; i = (i + 1) % n_chunks) {
        int len = chunks[i] < n - off ? chunks[i] : n - off;
        int rc = kvp_model_forward(ctx, cache, tok + off, len,
                                   logits + (size_t)off * m->cfg.n_vocab, KVP_LOGITS_ALL, &err);
        if (rc) fail_msg("forward: %s", err.msg);
        off += len;
    }
    assert_int_equal(cache->len, n);
    kvp_kvcache_free(&cache);
    kvp_model_ctx_free(&ctx);
    return logits;
}

static void test_forward_matches_plain_reference(void **state) {
    (void)state;
    kvp_model_config_t cfgs[3] = {small_cfg(), small_cfg(), small_cfg()};
    cfgs[1].n_kv_head = 4; /* plain multi-head */
    cfgs[2].rope_dim = 8;  /* partial rotary (head_dim 16) */
    cfgs[2].tied_output = false;
    cfgs[2].n_kv_head = 1; /* multi-query */
    for (int ci = 0; ci < 3; ci++) {
        kvp_model_t *m = make_model(cfgs[ci], 10 + ci);
        int n = 29;
        int32_t *tok = random_tokens(n, m->cfg.n_vocab, 3);
        float *want = malloc(sizeof(float) * (size_t)n * m->cfg.n_vocab);
        ref_forward(m, tok, n, want);
        int all[1] = {n};
        float *got = run_chunks(m, tok, n, all, 1, 64);
        double e = rel_err(got, want, (size_t)n * m->cfg.n_vocab);
        if (e > 1e-4) fail_msg("config %d: relative error %g against the reference", ci, e);
        free(got);
        free(want);
        free(tok);
        kvp_model_free(&m);
    }
}

static void test_chunked_and_token_by_token_equal_whole_prompt(void **state) {
    (void)state;
    kvp_model_t *m = make_model(small_cfg(), 5);
    int n = 200; /* > the attention tile of 128 */
    size_t nl = (size_t)n * m->cfg.n_vocab;
    int32_t *tok = random_tokens(n, m->cfg.n_vocab, 4);
    int whole[1] = {n}, ones[1] = {1}, uneven[4] = {5, 11, 1, 37};
    float *a = run_chunks(m, tok, n, whole, 1, n);
    float *b = run_chunks(m, tok, n, ones, 1, n);
    float *c = run_chunks(m, tok, n, uneven, 4, n);
    float *d = run_chunks(m, tok, n, whole, 1, 48); /* the context splits it */
    assert_true(rel_err(b, a, nl) < 1e-4);
    assert_true(rel_err(c, a, nl) < 1e-4);
    assert_true(rel_err(d, a, nl) < 1e-4);
    free(a), free(b), free(c), free(d), free(tok);
    kvp_model_free(&m);
}

static void test_last_logits_equal_last_row_of_all(void **state) {
    (void)state;
    kvp_model_t *m = make_model(small_cfg(), 6);
    int n = 17, V = m->cfg.n_vocab;
    int32_t *tok = random_tokens(n, V, 5);
    int whole[1] = {n};
    float *all = run_chunks(m, tok, n, whole, 1, n);
    kvp_err_t err = {0};
    kvp_model_ctx_t *ctx;
    kvp_kvcache_t *cache;
    assert_int_equal(kvp_model_ctx_new(&ctx, m, 8, n, &err), 0);
    assert_int_equal(kvp_model_new_cache(m, n, &cache, &err), 0);
    float *last = malloc(sizeof(float) * V);
    assert_int_equal(kvp_model_forward(ctx, cache, tok, n, last, KVP_LOGITS_LAST, &err), 0);
    assert_true(rel_err(last, all + (size_t)(n - 1) * V, V) < 1e-5);
    free(last), free(all), free(tok);
    kvp_kvcache_free(&cache);
    kvp_model_ctx_free(&ctx);
    kvp_model_free(&m);
}

/* The hand-over path of KV Prediction with a perfect predictor: K/V read out
 * of one cache (un-rotated) and written into a fresh one give the same next
 * logits as the original cache. */
static void test_cache_written_from_outside_gives_same_logits(void **state) {
    (void)state;
    kvp_model_t *m = make_model(small_cfg(), 7);
    const kvp_model_config_t *c = &m->cfg;
    int n = 40, V = c->n_vocab, width = c->n_kv_head * c->head_dim;
    int32_t *tok = random_tokens(n + 1, V, 6);
    kvp_err_t err = {0};
    kvp_model_ctx_t *ctx;
    kvp_kvcache_t *a, *b;
    assert_int_equal(kvp_model_ctx_new(&ctx, m, 64, n + 1, &err), 0);
    assert_int_equal(kvp_model_new_cache(m, n + 1, &a, &err), 0);
    assert_int_equal(kvp_model_new_cache(m, n + 1, &b, &err), 0);
    float *la = malloc(sizeof(float) * V), *lb = malloc(sizeof(float) * V);
    assert_int_equal(kvp_model_forward(ctx, a, tok, n, NULL, KVP_LOGITS_NONE, &err), 0);
    float *k = malloc(sizeof(float) * (size_t)n * width), *v = malloc(sizeof(float) * n * width);
    for (int l = 0; l < c->n_layer; l++) {
        assert_int_equal(kvp_kvcache_read(a, l, 0, n, k, v, &err), 0);
        /* in two pieces, as a stream of chunks would arrive */
        assert_int_equal(kvp_kvcache_write(b, l, 0, 13, k, v, &err), 0);
        assert_int_equal(kvp_kvcache_write(b, l, 13, n - 13, k + 13 * width, v + 13 * width, &err),
                         0);
    }
    assert_int_equal(kvp_kvcache_set_len(b, n, &err), 0);
    assert_int_equal(kvp_model_forward(ctx, a, tok + n, 1, la, KVP_LOGITS_LAST, &err), 0);
    assert_int_equal(kvp_model_forward(ctx, b, tok + n, 1, lb, KVP_LOGITS_LAST, &err), 0);
    assert_true(rel_err(lb, la, V) < 1e-5);
    free(k), free(v), free(la), free(lb), free(tok);
    kvp_kvcache_free(&a);
    kvp_kvcache_free(&b);
    kvp_model_ctx_free(&ctx);
    kvp_model_free(&m);
}

static void test_forward_refuses_bad_input(void **state) {
    (void)state;
    kvp_model_t *m = make_model(small_cfg(), 8);
    kvp_err_t err = {0};
    kvp_model_ctx_t *ctx;
    kvp_kvcache_t *cache, *other;
    assert_int_equal(kvp_model_ctx_new(&ctx, m, 8, 16, &err), 0);
    assert_int_equal(kvp_model_new_cache(m, 16, &cache, &err), 0);
    int32_t bad[2] = {1, 300};
    assert_int_equal(kvp_model_forward(ctx, cache, bad, 2, NULL, KVP_LOGITS_NONE, &err),
                     KVP_ERANGE);
    assert_non_null(strstr(err.msg, "id 300"));
    assert_int_equal(cache->len, 0);
    int32_t many[17] = {0};
    assert_int_equal(kvp_model_forward(ctx, cache, many, 17, NULL, KVP_LOGITS_NONE, &err),
                     KVP_ERANGE);
    assert_non_null(strstr(err.msg, "capacity 16"));
    assert_int_equal(kvp_kvcache_new(&other, 2, 2, 16, 16, 16, m->inv_freq, &err), 0);
    assert_int_equal(kvp_model_forward(ctx, other, many, 1, NULL, KVP_LOGITS_NONE, &err),
                     KVP_ESHAPE);
    kvp_kvcache_free(&other);
    kvp_kvcache_free(&cache);
    kvp_model_ctx_free(&ctx);
    kvp_model_free(&m);
}

/* ---- GGUF ------------------------------------------------------------- */

static void tmp_path(char *buf, size_t cap, const char *name) {
    const char *dir = getenv("KVP_TEST_TMP");
    if (!dir) dir = "/tmp";
    mkdir(dir, 0755);
    snprintf(buf, cap, "%s/test_model_%d_%s", dir, (int)getpid(), name);
}

static void save(const kvp_model_t *m, kvp_ggml_type_t type, const char *path, bool vocab) {
    kvp_err_t err = {0};
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    assert_non_null(w);
    if (kvp_model_to_gguf(m, w, type, &err) ||
        (vocab && kvp_tokenizer_write_bytelevel(w, NULL, 0, &err)) ||
        kvp_gguf_writer_write(w, path, &err))
        fail_msg("saving: %s", err.msg);
    kvp_gguf_writer_free(&w);
}

static float round_trip(float x, kvp_ggml_type_t t) {
    switch (t) {
    case KVP_GGML_F16:
        return kvp_f16_to_f32(kvp_f32_to_f16(x));
    case KVP_GGML_BF16:
        return kvp_bf16_to_f32(kvp_f32_to_bf16(x));
    default:
        return x;
    }
}

static void test_gguf_round_trip_every_type(void **state) {
    (void)state;
    kvp_model_config_t cfg = small_cfg();
    cfg.tied_output = false;
    cfg.n_vocab = 258;
    kvp_model_t *m = make_model(cfg, 9);
    kvp_ggml_type_t types[4] = {KVP_GGML_F32, KVP_GGML_F16, KVP_GGML_BF16, KVP_GGML_Q8_0};
    for (int ti = 0; ti < 4; ti++) {
        char path[512];
        tmp_path(path, sizeof path, kvp_ggml_type_name(types[ti]));
        save(m, types[ti], path, true);
        kvp_model_t *r = NULL;
        kvp_err_t err = {0};
        if (kvp_model_load(&r, path, &err)) fail_msg("loading %s: %s", path, err.msg);
        assert_memory_equal(&r->cfg, &m->cfg, sizeof m->cfg);
        assert_int_equal(r->n_params, m->n_params);
        /* norms are stored F32 whatever the type */
        assert_memory_equal(r->output_norm, m->output_norm, sizeof(float) * cfg.n_embd);
        const float *w0 = m->layers[1].wk, *w1 = r->layers[1].wk;
        size_t n = (size_t)cfg.n_kv_head * cfg.head_dim * cfg.n_embd;
        for (size_t i = 0; i < n; i++) {
            if (types[ti] == KVP_GGML_Q8_0)
                assert_true(fabsf(w1[i] - w0[i]) < 0.5f / 127.0f * 0.6f); /* |w| < ~0.5 */
            else
                assert_true(w1[i] == round_trip(w0[i], types[ti]));
        }
        kvp_model_free(&r);
        unlink(path);
    }
    kvp_model_free(&m);
}

static void expect_load_error(const char *path, int code, const char *needle) {
    kvp_model_t *r = NULL;
    kvp_err_t err = {0};
    int rc = kvp_model_load(&r, path, &err);
    if (rc != code || !strstr(err.msg, needle))
        fail_msg("load %s: got %d '%s', want %d with '%s'", path, rc, err.msg, code, needle);
    assert_null(r);
}

static void test_load_refuses_bad_models(void **state) {
    (void)state;
    kvp_model_t *m = make_model(small_cfg(), 11);
    char path[512];
    tmp_path(path, sizeof path, "bad.gguf");
    kvp_err_t err = {0};

    /* wrong architecture */
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    assert_int_equal(kvp_model_to_gguf(m, w, KVP_GGML_F32, &err), 0);
    kvp_gguf_writer_set_str(w, "general.architecture", "gptneox");
    assert_int_equal(kvp_gguf_writer_write(w, path, &err), 0);
    kvp_gguf_writer_free(&w);
    expect_load_error(path, KVP_EUNSUPPORTED, "gptneox");

    /* metadata that disagrees with a tensor's shape */
    w = kvp_gguf_writer_new();
    assert_int_equal(kvp_model_to_gguf(m, w, KVP_GGML_F32, &err), 0);
    kvp_gguf_writer_set_u32(w, "llama.feed_forward_length", 100);
    assert_int_equal(kvp_gguf_writer_write(w, path, &err), 0);
    kvp_gguf_writer_free(&w);
    expect_load_error(path, KVP_ESHAPE, "blk.0.ffn_gate.weight");

    /* a missing metadata key */
    w = kvp_gguf_writer_new();
    kvp_gguf_writer_set_str(w, "general.architecture", "llama");
    assert_int_equal(kvp_gguf_writer_write(w, path, &err), 0);
    kvp_gguf_writer_free(&w);
    expect_load_error(path, KVP_ERANGE, "llama.block_count");

    /* heads that do not divide */
    w = kvp_gguf_writer_new();
    assert_int_equal(kvp_model_to_gguf(m, w, KVP_GGML_F32, &err), 0);
    kvp_gguf_writer_set_u32(w, "llama.attention.head_count_kv", 3);
    assert_int_equal(kvp_gguf_writer_write(w, path, &err), 0);
    kvp_gguf_writer_free(&w);
    expect_load_error(path, KVP_EINVAL, "head_count_kv 3");

    unlink(path);
    kvp_model_free(&m);
}

static void test_flops_count_matches_hand_count(void **state) {
    (void)state;
    kvp_model_config_t c = {
        .n_vocab = 10, .n_embd = 4, .n_layer = 2, .n_head = 2, .n_kv_head = 1, .n_ff = 6};
    kvp_err_t err = {0};
    assert_int_equal(kvp_model_config_check(&c, &err), 0);
    /* per token per layer: q 4x4, k 4x2, v 4x2, o 4x4, ffn 3 x 4x6 = 16+8+8+16+72 = 120 MACs */
    /* attention for 3 tokens from scratch: 1+2+3 = 6 positions x 2 products x nq=4 MACs */
    double want = 2.0 * (2 * (120.0 * 3 + 6 * 2 * 4)) + 2.0 * 4 * 10;
    assert_true(fabs(kvp_model_flops(&c, 0, 3) - want) < 1e-9);
}

static void test_fingerprint_tracks_weights_and_shape(void **state) {
    (void)state;
    kvp_model_t *a = make_model(small_cfg(), 21), *b = make_model(small_cfg(), 21);
    char fa[17], fb[17];
    kvp_model_fingerprint(a, fa);
    kvp_model_fingerprint(b, fb);
    assert_int_equal(strlen(fa), 16);
    assert_string_equal(fa, fb);
    b->layers[2].w_down[5] += 1e-6f;
    kvp_model_fingerprint(b, fb);
    assert_string_not_equal(fa, fb);
    kvp_model_free(&b);
    kvp_model_config_t cfg = small_cfg();
    cfg.rope_base = 500000.0f;
    b = make_model(cfg, 21);
    kvp_model_fingerprint(b, fb);
    assert_string_not_equal(fa, fb);
    kvp_model_free(&a);
    kvp_model_free(&b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_matches_plain_reference),
        cmocka_unit_test(test_chunked_and_token_by_token_equal_whole_prompt),
        cmocka_unit_test(test_last_logits_equal_last_row_of_all),
        cmocka_unit_test(test_cache_written_from_outside_gives_same_logits),
        cmocka_unit_test(test_forward_refuses_bad_input),
        cmocka_unit_test(test_gguf_round_trip_every_type),
        cmocka_unit_test(test_load_refuses_bad_models),
        cmocka_unit_test(test_flops_count_matches_hand_count),
        cmocka_unit_test(test_fingerprint_tracks_weights_and_shape),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
