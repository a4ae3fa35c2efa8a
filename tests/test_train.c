/* Tests of lib/kvp_train: the training forward is the engine's forward, the
 * loss is the mean cross-entropy (plus z-loss) over scored targets, and the
 * backward pass gives the gradient of that loss — checked against finite
 * differences of an independent double-precision reference for every
 * parameter of small models (so every layer kind's backward is covered), and
 * against finite differences of the trainer's own float loss for a sample.
 * External K/V: the same loss when fed the true K/V, and d loss / d K, V
 * against finite differences. Also the scale argument, accumulation, bad
 * input and the FLOP count. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvp_model.h"
#include "kvp_rng.h"
#include "kvp_train.h"

#include "kvp_test_util.h"

enum { B_ = 2, T_ = 7 };

/* vocab 37, d 16, 2 layers, 4 heads over 2 kv heads of 4, ffn 24 */
static kvp_model_config_t tiny_cfg(int rope_dim, bool tied) {
    return (kvp_model_config_t){.n_vocab = 37,
                                .n_embd = 16,
                                .n_layer = 2,
                                .n_head = 4,
                                .n_kv_head = 2,
                                .head_dim = 4,
                                .rope_dim = rope_dim,
                                .n_ff = 24,
                                .n_ctx_train = 64,
                                .rope_base = 10000.0f,
                                .tied_output = tied};
}

static kvp_model_t *make_model(kvp_model_config_t cfg, uint64_t seed) {
    /* std 0.3: attention far from uniform, activations far from zero */
    return kvp_test_model(cfg, seed, 0.3f);
}

/* tokens and targets [n]; every fifth target (and target 3) is -1 */
static void make_batch(int32_t *tok, int32_t *tgt, int n, int n_vocab, uint64_t seed) {
    kvp_rng_t r;
    kvp_rng_seed(&r, seed);
    for (int i = 0; i < n; i++) {
        tok[i] = (int32_t)kvp_rng_below(&r, (uint64_t)n_vocab);
        tgt[i] = (i % 5 == 4 || i == 3) ? -1 : (int32_t)kvp_rng_below(&r, (uint64_t)n_vocab);
    }
}

static kvp_train_ctx_t *make_ctx(const kvp_model_t *m, int B, int T) {
    kvp_train_ctx_t *ctx = NULL;
    kvp_err_t err = {0};
    if (kvp_train_ctx_new(&ctx, m, B, T, &err)) fail_msg("kvp_train_ctx_new: %s", err.msg);
    return ctx;
}

static float train_loss(kvp_train_ctx_t *ctx, const int32_t *tok, const int32_t *tgt) {
    kvp_err_t err = {0};
    float loss = NAN;
    if (kvp_train_forward(ctx, tok, tgt, &loss, &err)) fail_msg("kvp_train_forward: %s", err.msg);
    return loss;
}

/* A fresh gradient array: forward + backward with the given scale. */
static float *train_grads(kvp_train_ctx_t *ctx, const kvp_model_t *m, const int32_t *tok,
                          const int32_t *tgt, float scale) {
    float *g = calloc(m->n_params, sizeof(float));
    kvp_err_t err = {0};
    train_loss(ctx, tok, tgt);
    if (kvp_train_backward(ctx, g, scale, &err)) fail_msg("kvp_train_backward: %s", err.msg);
    return g;
}

/* ---- a plain double-precision reference of the training loss ------------- */

static void ref_rmsnorm(double *y, const double *x, const double *w, int n, double eps) {
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    double s = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++)
        y[i] = x[i] * s * w[i];
}

static void ref_matvec(double *y, const double *x, const double *w, int n_in, int n_out) {
    for (int o = 0; o < n_out; o++) {
        double s = 0;
        for (int i = 0; i < n_in; i++)
            s += w[(size_t)o * n_in + i] * x[i];
        y[o] = s;
    }
}

static void ref_rope(double *x, int n_head, int hd, int rope_dim, int pos, const float *inv_freq) {
    for (int h = 0; h < n_head; h++)
        for (int i = 0; i < rope_dim / 2; i++) {
            double a = pos * (double)inv_freq[i];
            double *p = x + h * hd + 2 * i, x0 = p[0], x1 = p[1];
            p[0] = x0 * cos(a) - x1 * sin(a);
            p[1] = x0 * sin(a) + x1 * cos(a);
        }
}

typedef struct {
    const kvp_model_t *m; /* shapes and arena offsets */
    const double *p;      /* parameters, laid out as m->params */
    int B, T;
    double z;
    double *ext_k[4], *ext_v[4]; /* [B*T][nkv] un-rotated, or NULL */
} ref_t;

#define RP(r, ptr) ((r)->p + ((ptr) - (r)->m->params))

/* The loss of the batch (and its logits if asked), from scratch in double. */
static double ref_loss(const ref_t *r, const int32_t *tok, const int32_t *tgt, double *logits) {
    const kvp_model_t *m = r->m;
    const kvp_model_config_t *c = &m->cfg;
    const int T = r->T, E = c->n_embd, hd = c->head_dim, nq = c->n_head * hd,
              nkv = c->n_kv_head * hd, F = c->n_ff, V = c->n_vocab, grp = c->n_head / c->n_kv_head;
    double *x = malloc(sizeof(double) * T * E), *xn = malloc(sizeof(double) * E),
           *q = malloc(sizeof(double) * T * nq), *k = malloc(sizeof(double) * T * nkv),
           *v = malloc(sizeof(double) * T * nkv), *kv = malloc(sizeof(double) * 2 * nkv),
           *att = malloc(sizeof(double) * nq), *o = malloc(sizeof(double) * E),
           *gu = malloc(sizeof(double) * 2 * F), *sc = malloc(sizeof(double) * T),
           *lg = malloc(sizeof(double) * V);
    double ce = 0, zl = 0;
    int n_scored = 0;
    for (int b = 0; b < r->B; b++) {
        const int32_t *tk = tok + b * T, *tg = tgt + b * T;
        for (int t = 0; t < T; t++)
            memcpy(x + t * E, RP(r, m->tok_embd) + (size_t)tk[t] * E, sizeof(double) * E);
        for (int l = 0; l < c->n_layer; l++) {
            const kvp_layer_t *L = &m->layers[l];
            for (int t = 0; t < T; t++) {
                ref_rmsnorm(xn, x + t * E, RP(r, L->attn_norm), E, c->norm_eps);
                ref_matvec(q + t * nq, xn, RP(r, L->wq), E, nq);
                ref_matvec(kv, xn, RP(r, L->wk), E, 2 * nkv); /* wk and wv are adjacent */
                const double *ks = r->ext_k[l] ? r->ext_k[l] + (size_t)(b * T + t) * nkv : kv;
                const double *vs = r->ext_v[l] ? r->ext_v[l] + (size_t)(b * T + t) * nkv : kv + nkv;
                memcpy(k + t * nkv, ks, sizeof(double) * nkv);
                memcpy(v + t * nkv, vs, sizeof(double) * nkv);
                ref_rope(q + t * nq, c->n_head, hd, c->rope_dim, t, m->inv_freq);
                ref_rope(k + t * nkv, c->n_kv_head, hd, c->rope_dim, t, m->inv_freq);
            }
            for (int t = 0; t < T; t++) {
                for (int h = 0; h < c->n_head; h++) {
                    int kh = h / grp;
                    double mx = -1e300, sum = 0;
                    for (int j = 0; j <= t; j++) {
                        double s = 0;
                        for (int d = 0; d < hd; d++)
                            s += q[t * nq + h * hd + d] * k[j * nkv + kh * hd + d];
                        sc[j] = s / sqrt((double)hd);
                        mx = fmax(mx, sc[j]);
                    }
                    for (int j = 0; j <= t; j++)
                        sum += (sc[j] = exp(sc[j] - mx));
                    for (int d = 0; d < hd; d++) {
                        double s = 0;
                        for (int j = 0; j <= t; j++)
                            s += sc[j] / sum * v[j * nkv + kh * hd + d];
                        att[h * hd + d] = s;
                    }
                }
                ref_matvec(o, att, RP(r, L->wo), nq, E);
                for (int i = 0; i < E; i++)
                    x[t * E + i] += o[i];
                ref_rmsnorm(xn, x + t * E, RP(r, L->ffn_norm), E, c->norm_eps);
                ref_matvec(gu, xn, RP(r, L->w_gate_up), E, 2 * F);
                for (int i = 0; i < F; i++)
                    gu[i] = gu[i] / (1 + exp(-gu[i])) * gu[F + i];
                ref_matvec(o, gu, RP(r, L->w_down), F, E);
                for (int i = 0; i < E; i++)
                    x[t * E + i] += o[i];
            }
        }
        for (int t = 0; t < T; t++) {
            ref_rmsnorm(xn, x + t * E, RP(r, m->output_norm), E, c->norm_eps);
            ref_matvec(lg, xn, RP(r, m->output), E, V);
            if (logits) memcpy(logits + (size_t)(b * T + t) * V, lg, sizeof(double) * V);
            if (tg[t] < 0) continue;
            double mx = -1e300, sum = 0;
            for (int i = 0; i < V; i++)
                mx = fmax(mx, lg[i]);
            for (int i = 0; i < V; i++)
                sum += exp(lg[i] - mx);
            double lse = mx + log(sum);
            ce += lse - lg[tg[t]];
            zl += lse * lse;
            n_scored++;
        }
    }
    free(x), free(xn), free(q), free(k), free(v), free(kv), free(att), free(o), free(gu);
    free(sc), free(lg);
    return n_scored ? (ce + r->z * zl) / n_scored : 0.0;
}

static double *to_double(const float *a, size_t n) {
    double *d = malloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++)
        d[i] = a[i];
    return d;
}

/* Central difference of the reference loss with respect to *x. */
static double ref_fd(const ref_t *r, double *x, const int32_t *tok, const int32_t *tgt) {
    const double eps = 1e-5, x0 = *x;
    *x = x0 + eps;
    double lp = ref_loss(r, tok, tgt, NULL);
    *x = x0 - eps;
    double lm = ref_loss(r, tok, tgt, NULL);
    *x = x0;
    return (lp - lm) / (2 * eps);
}

/* The analytic gradient g of an entry against the numeric one fd, given the
 * largest numeric gradient of its tensor (float rounding in the backward pass
 * is relative to the tensor's scale, not to each tiny entry). */
static bool grad_close(double g, double fd, double tensor_max, double rel, double abs_tol) {
    double d = fabs(g - fd);
    return d <= rel * fabs(fd) + rel * 0.1 * tensor_max + abs_tol;
}

/* ---- 1. the training forward is the engine's forward -------------------- */

static void test_forward_logits_equal_engine_forward(void **state) {
    (void)state;
    for (int cfg_i = 0; cfg_i < 2; cfg_i++) {
        kvp_model_t *m = make_model(tiny_cfg(cfg_i ? 2 : 4, cfg_i == 0), 10 + cfg_i);
        const int V = m->cfg.n_vocab, N = B_ * T_;
        int32_t tok[B_ * T_], tgt[B_ * T_];
        make_batch(tok, tgt, N, V, 3);
        kvp_train_ctx_t *ctx = make_ctx(m, B_, T_);
        train_loss(ctx, tok, tgt);
        const float *lt = kvp_train_logits(ctx);

        kvp_err_t err = {0};
        kvp_model_ctx_t *mctx;
        assert_int_equal(kvp_model_ctx_new(&mctx, m, T_, T_, &err), 0);
        float *le = malloc(sizeof(float) * T_ * V);
        for (int b = 0; b < B_; b++) {
            kvp_kvcache_t *cache;
            assert_int_equal(kvp_model_new_cache(m, T_, &cache, &err), 0);
            assert_int_equal(
                kvp_model_forward(mctx, cache, tok + b * T_, T_, le, KVP_LOGITS_ALL, &err), 0);
            double d = 0, mx = 0;
            for (int i = 0; i < T_ * V; i++) {
                d = fmax(d, fabs((double)lt[(size_t)b * T_ * V + i] - le[i]));
                mx = fmax(mx, fabs((double)le[i]));
            }
            assert_true(d <= 1e-5 * mx);
            kvp_kvcache_free(&cache);
        }
        /* and the double reference gives the same logits */
        double *pd = to_double(m->params, m->n_params), *lr = malloc(sizeof(double) * N * V);
        ref_t r = {.m = m, .p = pd, .B = B_, .T = T_};
        ref_loss(&r, tok, tgt, lr);
        double d = 0, mx = 0;
        for (int i = 0; i < N * V; i++) {
            d = fmax(d, fabs(lt[i] - lr[i]));
            mx = fmax(mx, fabs(lr[i]));
        }
        assert_true(d <= 1e-5 * mx);
        free(pd), free(lr), free(le);
        kvp_model_ctx_free(&mctx);
        kvp_train_ctx_free(&ctx);
        kvp_model_free(&m);
    }
}

/* ---- 2. the loss is the mean cross-entropy over scored targets ----------- */

static void test_loss_is_mean_cross_entropy_over_scored_targets(void **state) {
    (void)state;
    kvp_model_t *m = make_model(tiny_cfg(4, false), 20);
    const int V = m->cfg.n_vocab, N = B_ * T_;
    int32_t tok[B_ * T_], tgt[B_ * T_];
    make_batch(tok, tgt, N, V, 4);
    kvp_train_ctx_t *ctx = make_ctx(m, B_, T_);
    for (int zi = 0; zi < 2; zi++) {
        const float z = zi ? 0.01f : 0.0f;
        kvp_train_set_zloss(ctx, z);
        float loss = train_loss(ctx, tok, tgt);
        const float *lg = kvp_train_logits(ctx);
        double ce = 0, zl = 0;
        int n = 0;
        for (int i = 0; i < N; i++) {
            if (tgt[i] < 0) continue;
            double mx = -1e30, s = 0;
            for (int j = 0; j < V; j++)
                mx = fmax(mx, lg[(size_t)i * V + j]);
            for (int j = 0; j < V; j++)
                s += exp(lg[(size_t)i * V + j] - mx);
            double lse = mx + log(s);
            ce += lse - lg[(size_t)i * V + tgt[i]];
            zl += lse * lse;
            n++;
        }
        assert_true(n < N); /* some targets are ignored */
        double want = (ce + z * zl) / n;
        assert_true(fabs(loss - want) <= 1e-5 * fabs(want));
        /* changing an ignored position's target to a real one changes the loss */
        int32_t tgt2[B_ * T_];
        memcpy(tgt2, tgt, sizeof tgt);
        tgt2[3] = 5;
        assert_true(fabs(train_loss(ctx, tok, tgt2) - loss) > 1e-4);
    }
    /* nothing scored: loss 0 and no gradient */
    kvp_train_set_zloss(ctx, 0.01f);
    int32_t none[B_ * T_];
    for (int i = 0; i < N; i++)
        none[i] = -1;
    assert_true(train_loss(ctx, tok, none) == 0.0f);
    float *g = train_grads(ctx, m, tok, none, 1.0f);
    for (size_t i = 0; i < m->n_params; i++)
        assert_true(g[i] == 0.0f);
    free(g);
    kvp_train_ctx_free(&ctx);
    kvp_model_free(&m);
}

/* ---- 3. whole-model gradients against finite differences ---------------- */

/* Every parameter of the model (a double-precision central difference of the
 * reference loss) against the trainer's gradient. A wrong line in any
 * backward step (RMSNorm, SwiGLU, attention, RoPE, a matmul, the loss)
 * changes the gradients of the tensors before it, so each layer kind is
 * covered; per tensor, report the worst entry. */
static void check_all_grads_double(kvp_model_config_t cfg, float z, uint64_t seed) {
    kvp_model_t *m = make_model(cfg, seed);
    const int N = B_ * T_;
    int32_t tok[B_ * T_], tgt[B_ * T_];
    make_batch(tok, tgt, N, m->cfg.n_vocab, seed + 7);
    kvp_train_ctx_t *ctx = make_ctx(m, B_, T_);
    kvp_train_set_zloss(ctx, z);
    float *g = train_grads(ctx, m, tok, tgt, 1.0f);
    double *pd = to_double(m->params, m->n_params);
    ref_t r = {.m = m, .p = pd, .B = B_, .T = T_, .z = z};
    double lf = train_loss(ctx, tok, tgt), lr = ref_loss(&r, tok, tgt, NULL);
    assert_true(fabs(lf - lr) <= 1e-5 * fabs(lr));
    kvp_test_tensor_t ts[64];
    int nt = kvp_test_model_tensors(m, ts), bad = 0;
    double *fd = malloc(sizeof(double) * m->n_params);
    for (int t = 0; t < nt; t++) {
        size_t off = (size_t)(ts[t].p - m->params);
        double tmax = 0, worst = 0;
        for (size_t i = 0; i < ts[t].n; i++) {
            fd[off + i] = ref_fd(&r, pd + off + i, tok, tgt);
            tmax = fmax(tmax, fabs(fd[off + i]));
        }
        assert_true(tmax > 1e-4); /* the tensor matters: the check can see errors */
        for (size_t i = 0; i < ts[t].n; i++) {
            double d = fabs(g[off + i] - fd[off + i]);
            worst = fmax(worst, d / (fabs(fd[off + i]) + 0.1 * tmax));
            if (!grad_close(g[off + i], fd[off + i], tmax, 2e-4, 1e-7)) {
                if (bad++ < 10)
                    print_error("rope %d tied %d z %g: %s[%zu]: backward %.7g, numeric %.7g\n",
                                cfg.rope_dim, cfg.tied_output, z, ts[t].name, i, g[off + i],
                                fd[off + i]);
            }
        }
        if (getenv("KVP_TEST_VERBOSE"))
            printf("rope %d tied %d z %g %-12s max |fd| %.3g  worst err/(|fd|+0.1max) %.2g\n",
                   cfg.rope_dim, cfg.tied_output, z, ts[t].name, tmax, worst);
    }
    assert_int_equal(bad, 0);
    free(fd), free(pd), free(g);
    kvp_train_ctx_free(&ctx);
    kvp_model_free(&m);
}

static void test_every_gradient_matches_double_finite_differences(void **state) {
    (void)state;
    check_all_grads_double(tiny_cfg(4, true), 0.0f, 30);
    check_all_grads_double(tiny_cfg(4, false), 0.05f, 31);
    check_all_grads_double(tiny_cfg(2, false), 0.0f, 32); /* partial RoPE */
    check_all_grads_double(tiny_cfg(2, true), 0.05f, 33);
}

/* ~200 parameters, ~10 from each tensor, against central differences of the
 * trainer's own float loss (eps 1e-2 on weights of std 0.3: small enough
 * that the curvature error is well under the tolerance, large enough that
 * float rounding of the loss is, too). */
static void check_sampled_grads_float(kvp_model_config_t cfg, float z, uint64_t seed) {
    kvp_model_t *m = make_model(cfg, seed);
    const int N = B_ * T_;
    int32_t tok[B_ * T_], tgt[B_ * T_];
    make_batch(tok, tgt, N, m->cfg.n_vocab, seed + 7);
    kvp_train_ctx_t *ctx = make_ctx(m, B_, T_);
    kvp_train_set_zloss(ctx, z);
    float *g = train_grads(ctx, m, tok, tgt, 1.0f);
    kvp_test_tensor_t ts[64];
    int nt = kvp_test_model_tensors(m, ts), bad = 0, checked = 0;
    kvp_rng_t r;
    kvp_rng_seed(&r, seed + 9);
    const float eps = 1e-2f;
    double worst_rel = 0;
    for (int t = 0; t < nt; t++) {
        for (int s = 0; s < 10; s++) {
            size_t i = (size_t)kvp_rng_below(&r, ts[t].n);
            float *p = ts[t].p + i, p0 = *p;
            *p = p0 + eps;
            double lp = train_loss(ctx, tok, tgt);
            *p = p0 - eps;
            double lm = train_loss(ctx, tok, tgt);
            *p = p0;
            double fd = (lp - lm) / (2.0 * eps), gi = g[p - m->params];
            checked++;
            worst_rel = fmax(worst_rel, fabs(gi - fd) / fmax(fmax(fabs(gi), fabs(fd)), 1e-2));
            if (fabs(gi - fd) > 2e-2 * fmax(fabs(gi), fabs(fd)) && fabs(gi - fd) > 2e-4) {
                if (bad++ < 10)
                    print_error("float fd: %s[%zu]: backward %.7g, numeric %.7g\n", ts[t].name, i,
                                gi, fd);
            }
        }
    }
    if (getenv("KVP_TEST_VERBOSE"))
        printf("float fd: worst |g - fd| / max(|g|, |fd|, 1e-2) = %.3g\n", worst_rel);
    assert_true(checked >= 200);
    assert_int_equal(bad, 0);
    free(g);
    kvp_train_ctx_free(&ctx);
    kvp_model_free(&m);
}

static void test_sampled_gradients_match_float_finite_differences(void **state) {
    (void)state;
    check_sampled_grads_float(tiny_cfg(4, false), 0.0f, 40);
    check_sampled_grads_float(tiny_cfg(2, true), 0.05f, 41);
}

/* ---- 5. external K/V ------------------------------------------------------ */

static void test_external_kv_equal_to_true_kv_gives_same_loss(void **state) {
    (void)state;
    kvp_model_t *m = make_model(tiny_cfg(2, false), 50);
    const kvp_model_config_t *c = &m->cfg;
    const int N = B_ * T_, nkv = c->n_kv_head * c->head_dim;
    int32_t tok[B_ * T_], tgt[B_ * T_];
    make_batch(tok, tgt, N, c->n_vocab, 51);
    kvp_train_ctx_t *ctx = make_ctx(m, B_, T_);
    kvp_err_t err = {0};
    float *ek[2], *ev[2];
    /* a forward without targets is enough to read the true K/V */
    assert_int_equal(kvp_train_forward(ctx, tok, NULL, NULL, &err), 0);
    for (int l = 0; l < c->n_layer; l++) {
        ek[l] = malloc(sizeof(float) * N * nkv);
        ev[l] = malloc(sizeof(float) * N * nkv);
        memcpy(ek[l], kvp_train_true_k(ctx, l), sizeof(float) * N * nkv);
        memcpy(ev[l], kvp_train_true_v(ctx, l), sizeof(float) * N * nkv);
    }
    /* the true K equal the engine's cache, un-rotated */
    kvp_model_ctx_t *mctx;
    assert_int_equal(kvp_model_ctx_new(&mctx, m, T_, T_, &err), 0);
    float *k = malloc(sizeof(float) * T_ * nkv), *v = malloc(sizeof(float) * T_ * nkv);
    for (int b = 0; b < B_; b++) {
        kvp_kvcache_t *cache;
        assert_int_equal(kvp_model_new_cache(m, T_, &cache, &err), 0);
        assert_int_equal(
            kvp_model_forward(mctx, cache, tok + b * T_, T_, NULL, KVP_LOGITS_NONE, &err), 0);
        for (int l = 0; l < c->n_layer; l++) {
            assert_int_equal(kvp_kvcache_read(cache, l, 0, T_, k, v, &err), 0);
            for (int i = 0; i < T_ * nkv; i++) {
                assert_true(fabsf(k[i] - ek[l][b * T_ * nkv + i]) <= 1e-5f);
                assert_true(fabsf(v[i] - ev[l][b * T_ * nkv + i]) <= 1e-5f);
            }
        }
        kvp_kvcache_free(&cache);
    }
    free(k), free(v);
    kvp_model_ctx_free(&mctx);

    float loss = train_loss(ctx, tok, tgt);
    float *g_own = train_grads(ctx, m, tok, tgt, 1.0f);
    for (int l = 0; l < c->n_layer; l++)
        kvp_train_set_external_kv(ctx, l, ek[l], ev[l]);
    assert_true(train_loss(ctx, tok, tgt) == loss);
    /* the projections' K/V are still reported, and unchanged */
    for (int l = 0; l < c->n_layer; l++)
        assert_memory_equal(kvp_train_true_k(ctx, l), ek[l], sizeof(float) * N * nkv);
    float *g_ext = train_grads(ctx, m, tok, tgt, 1.0f);
    /* the K/V rows of wqkv get nothing */
    for (int l = 0; l < c->n_layer; l++) {
        const kvp_layer_t *L = &m->layers[l];
        size_t o = (size_t)(L->wk - m->params), n = (size_t)2 * nkv * c->n_embd;
        for (size_t i = 0; i < n; i++)
            assert_true(g_ext[o + i] == 0.0f);
    }
    /* the last layer's wq, wo and FFN see the same gradient as with its own
     * K/V (earlier layers differ: the path through K/V now ends outside) */
    const kvp_layer_t *L = &m->layers[c->n_layer - 1];
    const size_t from = (size_t)(L->wq - m->params), to = (size_t)(L->wk - m->params),
                 from2 = (size_t)(L->wo - m->params),
                 to2 = from2 + (size_t)(L->w_down - L->wo) + (size_t)c->n_embd * c->n_ff;
    for (size_t i = 0; i < m->n_params; i++)
        if ((i >= from && i < to) || (i >= from2 && i < to2))
            assert_true(fabsf(g_ext[i] - g_own[i]) <= 1e-6f + 1e-4f * fabsf(g_own[i]));
    /* restoring the layers' own K/V restores the gradients */
    for (int l = 0; l < c->n_layer; l++)
        kvp_train_set_external_kv(ctx, l, NULL, NULL);
    float *g_back = train_grads(ctx, m, tok, tgt, 1.0f);
    assert_memory_equal(g_back, g_own, sizeof(float) * m->n_params);
    for (int l = 0; l < c->n_layer; l++)
        free(ek[l]), free(ev[l]);
    free(g_own), free(g_ext), free(g_back);
    kvp_train_ctx_free(&ctx);
    kvp_model_free(&m);
}

/* d loss / d K and V of external K/V (one layer, then both) against central
 * differences: of the double reference for every entry, and of the
 * trainer's float loss for a sample. Also the queries' gradient (wq) with
 * external K/V against the reference. This is the attention backward's check
 * in isolation: dK, dV and (through wq) dQ of each layer. */
static void check_external_kv_grads(kvp_model_config_t cfg, int first_layer, uint64_t seed) {
    kvp_model_t *m = make_model(cfg, seed);
    const kvp_model_config_t *c = &m->cfg;
    const int N = B_ * T_, nkv = c->n_kv_head * c->head_dim;
    int32_t tok[B_ * T_], tgt[B_ * T_];
    make_batch(tok, tgt, N, c->n_vocab, seed + 1);
    kvp_train_ctx_t *ctx = make_ctx(m, B_, T_);
    kvp_train_set_zloss(ctx, 0.02f);
    /* external K/V: the true ones plus noise, so they differ from the own */
    train_loss(ctx, tok, tgt);
    float *ek[2] = {0}, *ev[2] = {0};
    kvp_rng_t r;
    kvp_rng_seed(&r, seed + 2);
    ref_t ref = {.m = m, .B = B_, .T = T_, .z = 0.02f};
    for (int l = first_layer; l < c->n_layer; l++) {
        ek[l] = malloc(sizeof(float) * N * nkv);
        ev[l] = malloc(sizeof(float) * N * nkv);
        for (int i = 0; i < N * nkv; i++) {
            ek[l][i] = kvp_train_true_k(ctx, l)[i] + 0.3f * kvp_rng_normal(&r);
            ev[l][i] = kvp_train_true_v(ctx, l)[i] + 0.3f * kvp_rng_normal(&r);
        }
        kvp_train_set_external_kv(ctx, l, ek[l], ev[l]);
        ref.ext_k[l] = to_double(ek[l], (size_t)N * nkv);
        ref.ext_v[l] = to_double(ev[l], (size_t)N * nkv);
    }
    float *g = train_grads(ctx, m, tok, tgt, 1.0f);
    double *pd = to_double(m->params, m->n_params);
    ref.p = pd;
    assert_true(fabs(train_loss(ctx, tok, tgt) - ref_loss(&ref, tok, tgt, NULL)) < 1e-5);
    int bad = 0;
    for (int l = first_layer; l < c->n_layer; l++) {
        for (int kv = 0; kv < 2; kv++) {
            const float *ga = kv ? kvp_train_kv_grad_v(ctx, l) : kvp_train_kv_grad_k(ctx, l);
            double *x = kv ? ref.ext_v[l] : ref.ext_k[l];
            float *xf = kv ? ev[l] : ek[l];
            double *fd = malloc(sizeof(double) * N * nkv), tmax = 0;
            for (int i = 0; i < N * nkv; i++) {
                fd[i] = ref_fd(&ref, x + i, tok, tgt);
                tmax = fmax(tmax, fabs(fd[i]));
            }
            assert_true(tmax > 1e-4);
            for (int i = 0; i < N * nkv; i++)
                if (!grad_close(ga[i], fd[i], tmax, 2e-4, 1e-7) && bad++ < 10)
                    print_error("layer %d d%c[%d]: backward %.7g, numeric %.7g\n", l,
                                kv ? 'V' : 'K', i, ga[i], fd[i]);
            /* a sample against the float loss itself */
            for (int s = 0; s < 12; s++) {
                int i = (int)kvp_rng_below(&r, (uint64_t)N * nkv);
                const float eps = 1e-2f, x0 = xf[i];
                xf[i] = x0 + eps;
                double lp = train_loss(ctx, tok, tgt);
                xf[i] = x0 - eps;
                double lm = train_loss(ctx, tok, tgt);
                xf[i] = x0;
                double f = (lp - lm) / (2.0 * eps);
                if (fabs(ga[i] - f) > 2e-2 * fmax(fabs(ga[i]), fabs(f)) && fabs(ga[i] - f) > 2e-4 &&
                    bad++ < 10)
                    print_error("layer %d d%c[%d] float fd: backward %.7g, numeric %.7g\n", l,
                                kv ? 'V' : 'K', i, ga[i], f);
            }
            free(fd);
        }
        /* the queries still learn: wq's gradient against the reference */
        const kvp_layer_t *L = &m->layers[l];
        size_t o = (size_t)(L->wq - m->params), n = (size_t)c->n_head * c->head_dim * c->n_embd;
        double *fd = malloc(sizeof(double) * n), tmax = 0;
        for (size_t i = 0; i < n; i++) {
            fd[i] = ref_fd(&ref, pd + o + i, tok, tgt);
            tmax = fmax(tmax, fabs(fd[i]));
        }
        assert_true(tmax > 1e-4);
        for (size_t i = 0; i < n; i++)
            if (!grad_close(g[o + i], fd[i], tmax, 2e-4, 1e-7) && bad++ < 10)
                print_error("layer %d wq[%zu]: backward %.7g, numeric %.7g\n", l, i, g[o + i],
                            fd[i]);
        free(fd);
    }
    assert_int_equal(bad, 0);
    for (int l = 0; l < c->n_layer; l++) {
        free(ek[l]), free(ev[l]);
        free(ref.ext_k[l]), free(ref.ext_v[l]);
    }
    free(pd), free(g);
    kvp_train_ctx_free(&ctx);
    kvp_model_free(&m);
}

static void test_external_kv_gradients_match_finite_differences(void **state) {
    (void)state;
    check_external_kv_grads(tiny_cfg(4, true), 1, 60);  /* last layer only */
    check_external_kv_grads(tiny_cfg(2, false), 0, 61); /* both layers, partial RoPE */
}

/* Gradients with external K/V in some layers still match the reference for
 * every parameter, including the layers before them (through the queries). */
static void test_external_kv_model_gradients_match_finite_differences(void **state) {
    (void)state;
    kvp_model_t *m = make_model(tiny_cfg(4, false), 70);
    const kvp_model_config_t *c = &m->cfg;
    const int N = B_ * T_, nkv = c->n_kv_head * c->head_dim;
    int32_t tok[B_ * T_], tgt[B_ * T_];
    make_batch(tok, tgt, N, c->n_vocab, 71);
    kvp_train_ctx_t *ctx = make_ctx(m, B_, T_);
    float *ek = malloc(sizeof(float) * N * nkv), *ev = malloc(sizeof(float) * N * nkv);
    kvp_rng_t r;
    kvp_rng_seed(&r, 72);
    for (int i = 0; i < N * nkv; i++)
        ek[i] = kvp_rng_normal(&r), ev[i] = kvp_rng_normal(&r);
    kvp_train_set_external_kv(ctx, 1, ek, ev);
    float *g = train_grads(ctx, m, tok, tgt, 1.0f);
    double *pd = to_double(m->params, m->n_params);
    ref_t ref = {.m = m, .p = pd, .B = B_, .T = T_};
    ref.ext_k[1] = to_double(ek, (size_t)N * nkv);
    ref.ext_v[1] = to_double(ev, (size_t)N * nkv);
    kvp_test_tensor_t ts[64];
    int nt = kvp_test_model_tensors(m, ts), bad = 0;
    for (int t = 0; t < nt; t++) {
        size_t off = (size_t)(ts[t].p - m->params);
        double *fd = malloc(sizeof(double) * ts[t].n), tmax = 0;
        for (size_t i = 0; i < ts[t].n; i++) {
            fd[i] = ref_fd(&ref, pd + off + i, tok, tgt);
            tmax = fmax(tmax, fabs(fd[i]));
        }
        for (size_t i = 0; i < ts[t].n; i++)
            if (!grad_close(g[off + i], fd[i], tmax, 2e-4, 1e-7) && bad++ < 10)
                print_error("%s[%zu]: backward %.7g, numeric %.7g\n", ts[t].name, i, g[off + i],
                            fd[i]);
        free(fd);
    }
    assert_int_equal(bad, 0);
    free(ref.ext_k[1]), free(ref.ext_v[1]), free(pd), free(g), free(ek), free(ev);
    kvp_train_ctx_free(&ctx);
    kvp_model_free(&m);
}

/* Sequences longer than one attention tile (the trainer tiles query rows by
 * at most 128): the logits still equal the engine's, and gradients of a
 * sample of parameters and of external K/V entries on both sides of tile
 * boundaries match the reference. */
static void test_long_sequences_over_several_attention_tiles(void **state) {
    (void)state;
    enum { B = 2, T = 150 };
    kvp_model_t *m = make_model(tiny_cfg(2, false), 75);
    const kvp_model_config_t *c = &m->cfg;
    const int N = B * T, V = c->n_vocab, nkv = c->n_kv_head * c->head_dim;
    int32_t *tok = malloc(sizeof(int32_t) * N), *tgt = malloc(sizeof(int32_t) * N);
    make_batch(tok, tgt, N, V, 76);
    kvp_train_ctx_t *ctx = make_ctx(m, B, T);
    kvp_train_set_zloss(ctx, 0.01f);
    train_loss(ctx, tok, tgt);
    kvp_err_t err = {0};
    kvp_model_ctx_t *mctx;
    assert_int_equal(kvp_model_ctx_new(&mctx, m, T, T, &err), 0);
    float *le = malloc(sizeof(float) * T * V);
    for (int b = 0; b < B; b++) {
        kvp_kvcache_t *cache;
        assert_int_equal(kvp_model_new_cache(m, T, &cache, &err), 0);
        assert_int_equal(kvp_model_forward(mctx, cache, tok + b * T, T, le, KVP_LOGITS_ALL, &err),
                         0);
        const float *lt = kvp_train_logits(ctx) + (size_t)b * T * V;
        double d = 0, mx = 0;
        for (int i = 0; i < T * V; i++) {
            d = fmax(d, fabs((double)lt[i] - le[i]));
            mx = fmax(mx, fabs((double)le[i]));
        }
        assert_true(d <= 1e-5 * mx);
        kvp_kvcache_free(&cache);
    }
    free(le);
    kvp_model_ctx_free(&mctx);

    /* external K/V in layer 1 */
    float *ek = malloc(sizeof(float) * N * nkv), *ev = malloc(sizeof(float) * N * nkv);
    kvp_rng_t r;
    kvp_rng_seed(&r, 77);
    for (int i = 0; i < N * nkv; i++) {
        ek[i] = kvp_train_true_k(ctx, 1)[i] + 0.3f * kvp_rng_normal(&r);
        ev[i] = kvp_train_true_v(ctx, 1)[i] + 0.3f * kvp_rng_normal(&r);
    }
    kvp_train_set_external_kv(ctx, 1, ek, ev);
    float *g = train_grads(ctx, m, tok, tgt, 1.0f);
    double *pd = to_double(m->params, m->n_params);
    ref_t ref = {.m = m, .p = pd, .B = B, .T = T, .z = 0.01f};
    ref.ext_k[1] = to_double(ek, (size_t)N * nkv);
    ref.ext_v[1] = to_double(ev, (size_t)N * nkv);
    assert_true(fabs(train_loss(ctx, tok, tgt) - ref_loss(&ref, tok, tgt, NULL)) < 1e-5);
    kvp_test_tensor_t ts[64];
    int nt = kvp_test_model_tensors(m, ts), bad = 0;
    for (int t = 0; t < nt; t++)
        for (int s = 0; s < 3; s++) {
            size_t i = (ts[t].p - m->params) + (size_t)kvp_rng_below(&r, ts[t].n);
            double fd = ref_fd(&ref, pd + i, tok, tgt);
            if (fabs(g[i] - fd) > 1e-3 * fabs(fd) + 1e-5 && bad++ < 10)
                print_error("%s: backward %.7g, numeric %.7g\n", ts[t].name, g[i], fd);
        }
    /* K/V entries of rows around the tile boundary 128 and at the ends */
    const int rows[] = {0, 1, 127, 128, 129, 149, T, T + 127, T + 128, N - 1};
    for (size_t ri = 0; ri < sizeof rows / sizeof rows[0]; ri++)
        for (int j = 0; j < nkv; j += 3) {
            size_t i = (size_t)rows[ri] * nkv + j;
            double fk = ref_fd(&ref, ref.ext_k[1] + i, tok, tgt);
            double fv = ref_fd(&ref, ref.ext_v[1] + i, tok, tgt);
            double gk = kvp_train_kv_grad_k(ctx, 1)[i], gv = kvp_train_kv_grad_v(ctx, 1)[i];
            if ((fabs(gk - fk) > 1e-3 * fabs(fk) + 1e-6 ||
                 fabs(gv - fv) > 1e-3 * fabs(fv) + 1e-6) &&
                bad++ < 10)
                print_error("row %d col %d: dK %.7g vs %.7g, dV %.7g vs %.7g\n", rows[ri], j, gk,
                            fk, gv, fv);
        }
    assert_int_equal(bad, 0);
    free(ref.ext_k[1]), free(ref.ext_v[1]), free(pd), free(g), free(ek), free(ev);
    free(tok), free(tgt);
    kvp_train_ctx_free(&ctx);
    kvp_model_free(&m);
}

/* ---- 6. scale and accumulation -------------------------------------------- */

static void test_scale_scales_and_backward_accumulates(void **state) {
    (void)state;
    kvp_model_t *m = make_model(tiny_cfg(4, true), 80);
    const kvp_model_config_t *c = &m->cfg;
    const int N = B_ * T_, nkv = c->n_kv_head * c->head_dim;
    int32_t tok[B_ * T_], tgt[B_ * T_];
    make_batch(tok, tgt, N, c->n_vocab, 81);
    kvp_train_ctx_t *ctx = make_ctx(m, B_, T_);
    kvp_train_set_zloss(ctx, 1e-4f);
    float *ek = malloc(sizeof(float) * N * nkv), *ev = malloc(sizeof(float) * N * nkv);
    train_loss(ctx, tok, tgt);
    memcpy(ek, kvp_train_true_k(ctx, 0), sizeof(float) * N * nkv);
    memcpy(ev, kvp_train_true_v(ctx, 0), sizeof(float) * N * nkv);
    kvp_train_set_external_kv(ctx, 0, ek, ev);

    kvp_err_t err = {0};
    float *g1 = train_grads(ctx, m, tok, tgt, 1.0f);
    float *dk1 = malloc(sizeof(float) * N * nkv);
    memcpy(dk1, kvp_train_kv_grad_k(ctx, 0), sizeof(float) * N * nkv);
    float *g3 = train_grads(ctx, m, tok, tgt, 0.25f);
    const float *dk3 = kvp_train_kv_grad_k(ctx, 0);
    double gmax = 0;
    for (size_t i = 0; i < m->n_params; i++)
        gmax = fmax(gmax, fabsf(g1[i]));
    for (size_t i = 0; i < m->n_params; i++)
        assert_true(fabsf(g3[i] - 0.25f * g1[i]) <= 1e-6 * gmax);
    for (int i = 0; i < N * nkv; i++) /* overwritten, scaled */
        assert_true(fabsf(dk3[i] - 0.25f * dk1[i]) <= 1e-6f * (1e-3f + fabsf(dk1[i])));
    /* two backward calls, with and without a forward in between, add up */
    float *g2 = calloc(m->n_params, sizeof(float));
    train_loss(ctx, tok, tgt);
    assert_int_equal(kvp_train_backward(ctx, g2, 1.0f, &err), 0);
    assert_int_equal(kvp_train_backward(ctx, g2, 1.0f, &err), 0);
    for (size_t i = 0; i < m->n_params; i++)
        assert_true(fabsf(g2[i] - 2.0f * g1[i]) <= 1e-6 * gmax);
    train_loss(ctx, tok, tgt);
    assert_int_equal(kvp_train_backward(ctx, g2, 1.0f, &err), 0);
    for (size_t i = 0; i < m->n_params; i++)
        assert_true(fabsf(g2[i] - 3.0f * g1[i]) <= 2e-6 * gmax);
    for (int i = 0; i < N * nkv; i++) /* K/V gradients are not accumulated */
        assert_true(fabsf(kvp_train_kv_grad_k(ctx, 0)[i] - dk1[i]) <=
                    1e-6f + 1e-5f * fabsf(dk1[i]));
    /* the backward differentiates the forward that ran, even if the external
     * K/V are switched off in between */
    train_loss(ctx, tok, tgt);
    kvp_train_set_external_kv(ctx, 0, NULL, NULL);
    float *g4 = calloc(m->n_params, sizeof(float));
    assert_int_equal(kvp_train_backward(ctx, g4, 1.0f, &err), 0);
    assert_memory_equal(g4, g1, sizeof(float) * m->n_params);
    assert_memory_equal(kvp_train_kv_grad_k(ctx, 0), dk1, sizeof(float) * N * nkv);
    free(g4);
    free(g1), free(g2), free(g3), free(dk1), free(ek), free(ev);
    kvp_train_ctx_free(&ctx);
    kvp_model_free(&m);
}

/* ---- errors and the FLOP count --------------------------------------------- */

static void test_refuses_bad_input(void **state) {
    (void)state;
    kvp_model_t *m = make_model(tiny_cfg(4, true), 90);
    const int N = B_ * T_;
    int32_t tok[B_ * T_], tgt[B_ * T_];
    make_batch(tok, tgt, N, m->cfg.n_vocab, 91);
    kvp_err_t err = {0};
    kvp_train_ctx_t *ctx = NULL;
    assert_int_equal(kvp_train_ctx_new(&ctx, m, 0, T_, &err), KVP_EINVAL);
    assert_null(ctx);
    ctx = make_ctx(m, B_, T_);
    float *g = calloc(m->n_params, sizeof(float)), loss;
    /* no forward yet, then a forward without targets: nothing to differentiate */
    assert_int_equal(kvp_train_backward(ctx, g, 1.0f, &err), KVP_EINVAL);
    assert_int_equal(kvp_train_forward(ctx, tok, NULL, &loss, &err), 0);
    assert_int_equal(kvp_train_backward(ctx, g, 1.0f, &err), KVP_EINVAL);
    tok[5] = m->cfg.n_vocab;
    assert_int_equal(kvp_train_forward(ctx, tok, tgt, &loss, &err), KVP_ERANGE);
    assert_non_null(strstr(err.msg, "token"));
    tok[5] = 1;
    tgt[6] = -2;
    assert_int_equal(kvp_train_forward(ctx, tok, tgt, &loss, &err), KVP_ERANGE);
    tgt[6] = m->cfg.n_vocab;
    assert_int_equal(kvp_train_forward(ctx, tok, tgt, &loss, &err), KVP_ERANGE);
    /* a failed forward leaves nothing to differentiate */
    assert_int_equal(kvp_train_backward(ctx, g, 1.0f, &err), KVP_EINVAL);
    for (size_t i = 0; i < m->n_params; i++)
        assert_true(g[i] == 0.0f);
    free(g);
    kvp_train_ctx_free(&ctx);
    kvp_train_ctx_free(&ctx); /* idempotent */
    kvp_model_free(&m);
}

static void test_step_flops_match_hand_count(void **state) {
    (void)state;
    kvp_model_config_t c = {
        .n_vocab = 10, .n_embd = 4, .n_layer = 2, .n_head = 2, .n_kv_head = 1, .n_ff = 6};
    kvp_err_t err = {0};
    assert_int_equal(kvp_model_config_check(&c, &err), 0);
    /* matmul weights per layer: q 16, k 8, v 8, o 16, ffn 72 = 120; head 40 */
    double p_mm = 2 * 120 + 40;
    /* attention per sequence of 3 and layer: 1+2+3 = 6 (query, key) pairs x 2 products x
     * 2 nq (nq = 4) = 96 forward, three times that with the backward; 2 sequences, 2 layers */
    double want = 6 * p_mm * 2 * 3 + 3 * 96.0 * 2 * 2;
    assert_true(fabs(kvp_train_step_flops(&c, 2, 3) - want) < 1e-9);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_logits_equal_engine_forward),
        cmocka_unit_test(test_loss_is_mean_cross_entropy_over_scored_targets),
        cmocka_unit_test(test_every_gradient_matches_double_finite_differences),
        cmocka_unit_test(test_sampled_gradients_match_float_finite_differences),
        cmocka_unit_test(test_external_kv_equal_to_true_kv_gives_same_loss),
        cmocka_unit_test(test_external_kv_gradients_match_finite_differences),
        cmocka_unit_test(test_external_kv_model_gradients_match_finite_differences),
        cmocka_unit_test(test_long_sequences_over_several_attention_tiles),
        cmocka_unit_test(test_scale_scales_and_backward_accumulates),
        cmocka_unit_test(test_refuses_bad_input),
        cmocka_unit_test(test_step_flops_match_hand_count),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
