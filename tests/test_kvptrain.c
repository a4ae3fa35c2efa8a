/* Tests of lib/kvp_kvptrain (KV Prediction training) and of the two
 * additions to lib/kvp_train it rests on (an extra gradient on a layer's own
 * K/V, and a backward without weight gradients for the frozen base):
 *
 *   - kvp_train_set_kv_grad: the parameter gradient against central
 *     differences of loss*scale + sum(G . K_true) + sum(H . V_true), with and
 *     without external K/V on the layer; a NULL gradient array gives the same
 *     K/V gradients;
 *   - the whole KV-prediction loss: its gradient with respect to every
 *     predictor weight and bias and a sample of aux parameters against
 *     central differences;
 *   - aux = base with an identity predictor: consistency 0, CE_base equal to
 *     the base's plain loss;
 *   - a short run on a small synthetic corpus cuts the loss by a stated
 *     margin and leaves the base untouched;
 *   - a run stopped in-process, and a real `kvpred train-kvp` killed with
 *     SIGKILL, resume bit-identical;
 *   - bad input (vocabularies, predictor shapes, other settings on resume)
 *     refused with clear errors, in the library and on the command line. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvp_ckpt.h"
#include "kvp_corpus.h"
#include "kvp_kvptrain.h"
#include "kvp_model.h"
#include "kvp_predictor.h"
#include "kvp_rng.h"
#include "kvp_tokenizer.h"
#include "kvp_train.h"
#include "kvp_trainer.h"

#include "kvp_test_util.h"

enum { B_ = 2, T_ = 8 };

static kvp_test_scratch_t g_s; /* scratch directory and synthetic corpus */

/* ---- tiny models --------------------------------------------------------- */

/* aux: vocab 40, d 16, 2 layers, 4 heads over 2 KV heads of 4 (d_in 8) */
static kvp_model_config_t aux_cfg(int n_vocab) {
    return (kvp_model_config_t){.n_vocab = n_vocab,
                                .n_embd = 16,
                                .n_layer = 2,
                                .n_head = 4,
                                .n_kv_head = 2,
                                .head_dim = 4,
                                .n_ff = 24,
                                .n_ctx_train = 64,
                                .tied_output = true};
}

/* base: vocab 40, d 16, 3 layers, 4 heads over 2 KV heads of 6 (d_out 12),
 * partial RoPE */
static kvp_model_config_t base_cfg(int n_vocab) {
    return (kvp_model_config_t){.n_vocab = n_vocab,
                                .n_embd = 16,
                                .n_layer = 3,
                                .n_head = 4,
                                .n_kv_head = 2,
                                .head_dim = 6,
                                .rope_dim = 4,
                                .n_ff = 24,
                                .n_ctx_train = 64,
                                .tied_output = false};
}

static kvp_model_t *make_model(kvp_model_config_t cfg, uint64_t seed, float std) {
    return kvp_test_model(cfg, seed, std);
}

static kvp_model_t *copy_model(const kvp_model_t *m) {
    kvp_model_t *c = NULL;
    kvp_err_t err = {0};
    if (kvp_model_new_random(&c, &m->cfg, 1, 0.0f, &err)) fail_msg("copy: %s", err.msg);
    memcpy(c->params, m->params, sizeof(float) * m->n_params);
    return c;
}

static kvp_predictor_t *make_predictor(const kvp_model_t *aux, const kvp_model_t *base,
                                       uint64_t seed) {
    kvp_predictor_t *p = NULL;
    kvp_err_t err = {0};
    if (kvp_predictor_new(&p, kvp_kv_shape_of(aux), kvp_kv_shape_of(base), NULL, &err))
        fail_msg("predictor: %s", err.msg);
    kvp_kvptrain_init_predictor(p, seed);
    return p;
}

static kvp_predictor_t *copy_predictor(const kvp_predictor_t *p) {
    kvp_predictor_t *q = NULL;
    kvp_err_t err = {0};
    if (kvp_predictor_new(&q, p->aux, p->base, p->layer_map, &err))
        fail_msg("predictor: %s", err.msg);
    memcpy(q->params, p->params, sizeof(float) * p->n_params);
    return q;
}

/* tokens and targets [n]; every fifth target is -1 */
static void make_batch(int32_t *tok, int32_t *tgt, int n, int n_vocab, uint64_t seed) {
    kvp_rng_t r;
    kvp_rng_seed(&r, seed);
    for (int i = 0; i < n; i++) {
        tok[i] = (int32_t)kvp_rng_below(&r, (uint64_t)n_vocab);
        tgt[i] = i % 5 == 4 ? -1 : (int32_t)kvp_rng_below(&r, (uint64_t)n_vocab);
    }
}

static bool close_enough(double g, double fd, double rel, double abs_tol) {
    return fabs(g - fd) <= rel * fmax(fabs(g), fabs(fd)) + abs_tol;
}

/* ---- 1. kvp_train_set_kv_grad and a backward without weight gradients ---- */

/* loss * scale + sum over layers with an extra gradient of G . K_true + H . V_true */
static double extra_loss(kvp_train_ctx_t *ctx, const int32_t *tok, const int32_t *tgt, float scale,
                         float *const *G, float *const *H, int n_layer, size_t nkv_n) {
    kvp_err_t err = {0};
    float loss;
    if (kvp_train_forward(ctx, tok, tgt, &loss, &err)) fail_msg("forward: %s", err.msg);
    double s = (double)scale * loss;
    for (int l = 0; l < n_layer; l++) {
        if (!G[l]) continue;
        const float *k = kvp_train_true_k(ctx, l), *v = kvp_train_true_v(ctx, l);
        for (size_t i = 0; i < nkv_n; i++)
            s += (double)G[l][i] * k[i] + (double)H[l][i] * v[i];
    }
    return s;
}

static void check_kv_grad_input(bool external_on_1, uint64_t seed) {
    kvp_model_t *m = make_model(aux_cfg(40), seed, 0.3f);
    const kvp_model_config_t *c = &m->cfg;
    const int N = B_ * T_;
    const size_t nkv_n = (size_t)N * c->n_kv_head * c->head_dim;
    int32_t tok[B_ * T_], tgt[B_ * T_];
    make_batch(tok, tgt, N, c->n_vocab, seed + 2);
    kvp_err_t err = {0};
    kvp_train_ctx_t *ctx = NULL;
    assert_int_equal(kvp_train_ctx_new(&ctx, m, B_, T_, &err), 0);
    kvp_train_set_zloss(ctx, 0.01f);
    kvp_rng_t r;
    kvp_rng_seed(&r, seed + 3);
    float *G[2], *H[2], *ek = NULL, *ev = NULL;
    for (int l = 0; l < 2; l++) {
        G[l] = malloc(sizeof(float) * nkv_n);
        H[l] = malloc(sizeof(float) * nkv_n);
        for (size_t i = 0; i < nkv_n; i++)
            G[l][i] = 0.05f * kvp_rng_normal(&r), H[l][i] = 0.05f * kvp_rng_normal(&r);
        kvp_train_set_kv_grad(ctx, l, G[l], H[l]);
    }
    if (external_on_1) {
        ek = malloc(sizeof(float) * nkv_n), ev = malloc(sizeof(float) * nkv_n);
        for (size_t i = 0; i < nkv_n; i++)
            ek[i] = kvp_rng_normal(&r), ev[i] = kvp_rng_normal(&r);
        kvp_train_set_external_kv(ctx, 1, ek, ev);
    }
    const float scale = 0.5f;
    float *g = calloc(m->n_params, sizeof(float));
    extra_loss(ctx, tok, tgt, scale, G, H, 2, nkv_n);
    assert_int_equal(kvp_train_backward(ctx, g, scale, &err), 0);
    /* the K/V gradients of an external layer are the same without weight
     * gradients (the frozen-model path) */
    float *dk = NULL;
    if (external_on_1) {
        dk = malloc(sizeof(float) * nkv_n);
        memcpy(dk, kvp_train_kv_grad_k(ctx, 1), sizeof(float) * nkv_n);
        extra_loss(ctx, tok, tgt, scale, G, H, 2, nkv_n);
        assert_int_equal(kvp_train_backward(ctx, NULL, scale, &err), 0);
        assert_memory_equal(kvp_train_kv_grad_k(ctx, 1), dk, sizeof(float) * nkv_n);
    }
    kvp_test_tensor_t ts[64];
    int nt = kvp_test_model_tensors(m, ts), bad = 0, checked = 0;
    const float eps = 3e-3f; /* float noise ~2e-5, curvature error ~1e-5 here */
    for (int t = 0; t < nt; t++)
        for (int s = 0; s < 8; s++) {
            size_t i = (size_t)kvp_rng_below(&r, ts[t].n);
            float *p = ts[t].p + i, p0 = *p;
            *p = p0 + eps;
            double lp = extra_loss(ctx, tok, tgt, scale, G, H, 2, nkv_n);
            *p = p0 - eps;
            double lm = extra_loss(ctx, tok, tgt, scale, G, H, 2, nkv_n);
            *p = p0;
            double fd = (lp - lm) / (2.0 * eps), gi = g[p - m->params];
            checked++;
            if (!close_enough(gi, fd, 2e-2, 2e-4) && bad++ < 10)
                print_error("external %d: %s[%zu]: backward %.7g, numeric %.7g\n", external_on_1,
                            ts[t].name, i, gi, fd);
        }
    assert_true(checked >= 150);
    assert_int_equal(bad, 0);
    /* with external K/V on layer 1 its K/V rows of wqkv learn only from outside */
    if (external_on_1) {
        kvp_train_set_kv_grad(ctx, 1, NULL, NULL);
        float *g2 = calloc(m->n_params, sizeof(float));
        extra_loss(ctx, tok, tgt, scale, G, H, 2, nkv_n);
        assert_int_equal(kvp_train_backward(ctx, g2, scale, &err), 0);
        size_t o = (size_t)(m->layers[1].wk - m->params), n = 2 * nkv_n / N * c->n_embd;
        for (size_t i = 0; i < n; i++)
            assert_true(g2[o + i] == 0.0f);
        free(g2);
    }
    for (int l = 0; l < 2; l++)
        free(G[l]), free(H[l]);
    free(ek), free(ev), free(dk), free(g);
    kvp_train_ctx_free(&ctx);
    kvp_model_free(&m);
}

static void test_train_kv_grad_input_matches_finite_differences(void **state) {
    (void)state;
    check_kv_grad_input(false, 100);
    check_kv_grad_input(true, 110);
}

/* ---- 2. the whole KV-prediction loss against finite differences ----------- */

typedef struct {
    kvp_kvptrain_ctx_t *ctx;
    const kvp_predictor_t *p;
    const int32_t *tok, *tgt;
    kvp_kvptrain_weights_t w;
    size_t n;                 /* values per layer of predicted K (or V) */
    float *pk, *pv, *tk, *tv; /* [n_base][n]: a forward's K/V, copied */
} joint_t;

static kvp_kvptrain_loss_t joint_forward(joint_t *j) {
    kvp_kvptrain_loss_t l;
    kvp_err_t err = {0};
    if (kvp_kvptrain_forward(j->ctx, j->tok, j->tgt, &l, &err)) fail_msg("forward: %s", err.msg);
    for (int b = 0; b < j->p->base.n_layer; b++) {
        memcpy(j->pk + b * j->n, kvp_kvptrain_pred_k(j->ctx, b), sizeof(float) * j->n);
        memcpy(j->pv + b * j->n, kvp_kvptrain_pred_v(j->ctx, b), sizeof(float) * j->n);
        memcpy(j->tk + b * j->n, kvp_kvptrain_true_k(j->ctx, b), sizeof(float) * j->n);
        memcpy(j->tv + b * j->n, kvp_kvptrain_true_v(j->ctx, b), sizeof(float) * j->n);
    }
    return l;
}

/* The numeric derivative of the loss in *x. The smooth part (CE and z-loss
 * terms) by central differences; the L1 part through its sign at the
 * unperturbed point times central differences of K_pred - K_true (a central
 * difference across one of its kinks would measure the mean of the two
 * one-sided slopes, not the derivative). s0 holds the signs at x. */
static double joint_fd(joint_t *j, float *x, float eps, const int8_t *s0) {
    const size_t nb = (size_t)j->p->base.n_layer * j->n;
    const float x0 = *x;
    *x = x0 + eps;
    kvp_kvptrain_loss_t lp = joint_forward(j);
    float *save = malloc(sizeof(float) * 4 * nb);
    memcpy(save, j->pk, sizeof(float) * nb);
    memcpy(save + nb, j->pv, sizeof(float) * nb);
    memcpy(save + 2 * nb, j->tk, sizeof(float) * nb);
    memcpy(save + 3 * nb, j->tv, sizeof(float) * nb);
    *x = x0 - eps;
    kvp_kvptrain_loss_t lm = joint_forward(j);
    *x = x0;
    double smooth = (lp.total - j->w.kv_w * lp.kv) - (lm.total - j->w.kv_w * lm.kv), l1 = 0;
    for (size_t i = 0; i < nb; i++) {
        l1 += s0[i] * (((double)save[i] - save[2 * nb + i]) - ((double)j->pk[i] - j->tk[i]));
        l1 += s0[nb + i] *
              (((double)save[nb + i] - save[3 * nb + i]) - ((double)j->pv[i] - j->tv[i]));
    }
    free(save);
    return (smooth + j->w.kv_w * l1 / (double)j->n) / (2.0 * eps);
}

static void test_joint_gradient_matches_finite_differences(void **state) {
    (void)state;
    kvp_model_t *aux = make_model(aux_cfg(40), 200, 0.3f),
                *base = make_model(base_cfg(40), 201, 0.3f);
    kvp_predictor_t *p = make_predictor(aux, base, 202);
    assert_int_equal(p->layer_map[0], 0); /* aux layer 0 feeds two base layers */
    assert_int_equal(p->layer_map[1], 0);
    assert_int_equal(p->layer_map[2], 1);
    const int N = B_ * T_;
    int32_t tok[B_ * T_], tgt[B_ * T_];
    make_batch(tok, tgt, N, 40, 203);
    joint_t j = {.p = p, .tok = tok, .tgt = tgt, .n = (size_t)N * p->d_out};
    j.w = (kvp_kvptrain_weights_t){.base_w = 1.0f, .aux_w = 0.7f, .kv_w = 1.3f, .zloss = 0.01f};
    kvp_err_t err = {0};
    assert_int_equal(kvp_kvptrain_ctx_new(&j.ctx, aux, base, p, B_, T_, &j.w, &err), 0);
    const size_t nb = (size_t)base->cfg.n_layer * j.n;
    j.pk = malloc(sizeof(float) * nb), j.pv = malloc(sizeof(float) * nb);
    j.tk = malloc(sizeof(float) * nb), j.tv = malloc(sizeof(float) * nb);

    kvp_kvptrain_loss_t l0 = joint_forward(&j);
    assert_true(fabs(l0.total - (l0.base + j.w.aux_w * l0.aux + j.w.kv_w * l0.kv)) < 1e-9);
    assert_true(l0.kv > 0.1);
    int8_t *s0 = malloc(2 * nb);
    for (size_t i = 0; i < nb; i++) {
        s0[i] = (int8_t)((j.pk[i] > j.tk[i]) - (j.pk[i] < j.tk[i]));
        s0[nb + i] = (int8_t)((j.pv[i] > j.tv[i]) - (j.pv[i] < j.tv[i]));
    }
    float *ga = calloc(aux->n_params, sizeof(float)), *gp = calloc(p->n_params, sizeof(float));
    const float scale = 0.5f;
    assert_int_equal(kvp_kvptrain_backward(j.ctx, ga, gp, scale, &err), 0);
    /* the base's weights are untouched and get nothing: there is no array for them */

    int bad = 0;
    double worst = 0;
    /* central differences converge on the backward's value as eps shrinks
     * (one bias: 0.04333 at eps 1e-2, 0.04191 at 3e-3, 0.04179 at 2e-3 against
     * 0.04174); 3e-3 keeps both that error and float noise under the tolerance */
    const float eps = 3e-3f;
    /* every predictor weight and bias */
    for (size_t i = 0; i < p->n_params; i++) {
        double fd = scale * joint_fd(&j, p->params + i, eps, s0), g = gp[i];
        worst = fmax(worst, fabs(g - fd) / (fmax(fabs(g), fabs(fd)) + 1e-3));
        if (!close_enough(g, fd, 2e-2, 2e-4) && bad++ < 10)
            print_error("predictor param %zu: backward %.7g, numeric %.7g\n", i, g, fd);
    }
    /* ~8 entries of each aux tensor */
    kvp_test_tensor_t ts[64];
    int nt = kvp_test_model_tensors(aux, ts), checked = 0;
    kvp_rng_t r;
    kvp_rng_seed(&r, 204);
    for (int t = 0; t < nt; t++)
        for (int s = 0; s < 8; s++) {
            size_t i = (size_t)kvp_rng_below(&r, ts[t].n);
            float *x = ts[t].p + i;
            double fd = scale * joint_fd(&j, x, eps, s0), g = ga[x - aux->params];
            worst = fmax(worst, fabs(g - fd) / (fmax(fabs(g), fabs(fd)) + 1e-3));
            checked++;
            if (!close_enough(g, fd, 2e-2, 2e-4) && bad++ < 10)
                print_error("aux %s[%zu]: backward %.7g, numeric %.7g\n", ts[t].name, i, g, fd);
        }
    if (getenv("KVP_TEST_VERBOSE"))
        printf("joint gradient: %zu predictor + %d aux entries, worst relative error %.3g\n",
               p->n_params, checked, worst);
    assert_int_equal(bad, 0);
    /* the aux K/V projections learn from the predictor path: with the base and
     * consistency terms off their gradient changes */
    kvp_kvptrain_ctx_t *only_aux = NULL;
    kvp_kvptrain_weights_t wa = {.base_w = 0.0f, .aux_w = 0.7f, .kv_w = 0.0f, .zloss = 0.01f};
    assert_int_equal(kvp_kvptrain_ctx_new(&only_aux, aux, base, p, B_, T_, &wa, &err), 0);
    float *ga2 = calloc(aux->n_params, sizeof(float)), *gp2 = calloc(p->n_params, sizeof(float));
    kvp_kvptrain_loss_t l2;
    assert_int_equal(kvp_kvptrain_forward(only_aux, tok, tgt, &l2, &err), 0);
    assert_int_equal(kvp_kvptrain_backward(only_aux, ga2, gp2, scale, &err), 0);
    for (size_t i = 0; i < p->n_params; i++)
        assert_true(gp2[i] == 0.0f);
    size_t wk0 = (size_t)(aux->layers[0].wk - aux->params);
    assert_true(fabsf(ga2[wk0] - ga[wk0]) > 1e-6f);
    free(ga2), free(gp2);
    kvp_kvptrain_ctx_free(&only_aux);

    free(s0), free(ga), free(gp), free(j.pk), free(j.pv), free(j.tk), free(j.tv);
    kvp_kvptrain_ctx_free(&j.ctx);
    kvp_predictor_free(&p);
    kvp_model_free(&aux);
    kvp_model_free(&base);
}

/* ---- 3. aux = base, identity predictor -------------------------------------- */

static void test_identity_predictor_on_a_copy_of_the_base_is_exact(void **state) {
    (void)state;
    kvp_model_config_t bc = base_cfg(40);
    kvp_model_t *base = make_model(bc, 300, 0.3f), *aux = copy_model(base);
    kvp_predictor_t *p = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_new_identity(&p, kvp_kv_shape_of(base), &err), 0);
    const int N = B_ * T_;
    int32_t tok[B_ * T_], tgt[B_ * T_];
    make_batch(tok, tgt, N, 40, 301);
    kvp_kvptrain_weights_t w;
    kvp_kvptrain_weights_default(&w);
    kvp_kvptrain_ctx_t *x = NULL;
    assert_int_equal(kvp_kvptrain_ctx_new(&x, aux, base, p, B_, T_, &w, &err), 0);
    kvp_kvptrain_loss_t l;
    assert_int_equal(kvp_kvptrain_forward(x, tok, tgt, &l, &err), 0);
    assert_true(l.kv == 0.0);
    /* the base's plain loss, z-loss included */
    kvp_train_ctx_t *tc = NULL;
    assert_int_equal(kvp_train_ctx_new(&tc, base, B_, T_, &err), 0);
    kvp_train_set_zloss(tc, w.zloss);
    float plain;
    assert_int_equal(kvp_train_forward(tc, tok, tgt, &plain, &err), 0);
    assert_true(l.base == plain);
    assert_true(l.aux == plain);
    assert_true(fabs(l.total - 2.0 * plain) < 1e-12);
    for (int b = 0; b < bc.n_layer; b++)
        assert_memory_equal(kvp_kvptrain_pred_k(x, b), kvp_kvptrain_true_k(x, b),
                            sizeof(float) * N * p->d_out);
    kvp_train_ctx_free(&tc);
    kvp_kvptrain_ctx_free(&x);
    kvp_predictor_free(&p);
    kvp_model_free(&aux);
    kvp_model_free(&base);
}

/* ---- a synthetic corpus and byte-level models ---------------------------------- */

static int setup(void **state) {
    (void)state;
    kvp_test_scratch_init(&g_s, "kvptrain");
    return 0;
}

static int teardown(void **state) {
    (void)state;
    return kvp_test_scratch_remove(&g_s);
}

static const char *path_in(const char *name) {
    return kvp_test_path(&g_s, name);
}

static kvp_corpus_t *load_corpus(void) {
    return kvp_test_load_corpus(g_s.corpus);
}

static kvp_trainer_config_t tiny_train(int steps) {
    kvp_trainer_config_t t;
    kvp_trainer_config_default(&t);
    t.batch = 4;
    t.ctx = 32;
    t.steps = steps;
    t.warmup = 2;
    t.lr = 1e-2f;
    t.min_lr = 1e-3f;
    t.seed = 11;
    t.eval_every = 10;
    t.eval_tokens = 512;
    t.final_eval_tokens = 1024;
    t.ckpt_every = 0;
    return t;
}

/* A byte-level pair, briefly pre-trained with kvp_trainer so that the base
 * means something: base 2 layers d 32 (KV 2 x 16), aux 1 layer d 16 (KV 2 x 8). */
static void make_pair(kvp_corpus_t *c, kvp_model_t **aux, kvp_model_t **base) {
    kvp_model_config_t bc = {.n_vocab = kvp_tokenizer_bytelevel_n_vocab(0),
                             .n_embd = 32,
                             .n_layer = 2,
                             .n_head = 2,
                             .n_ff = 64,
                             .n_ctx_train = 32,
                             .tied_output = true};
    kvp_model_config_t ac = bc;
    ac.n_embd = 16, ac.n_layer = 1, ac.n_ff = 32;
    kvp_err_t err = {0};
    kvp_trainer_result_t r;
    if (kvp_trainer_init_model(base, &bc, 21, &err) || kvp_trainer_init_model(aux, &ac, 22, &err))
        fail_msg("init: %s", err.msg);
    kvp_trainer_config_t t = tiny_train(40);
    t.eval_every = 0;
    t.final_eval_tokens = 256;
    if (kvp_trainer_run(*base, c, &t, &r, &err)) fail_msg("base pre-training: %s", err.msg);
    t.steps = 20;
    if (kvp_trainer_run(*aux, c, &t, &r, &err)) fail_msg("aux pre-training: %s", err.msg);
}

/* ---- 4. a short run ----------------------------------------------------------- */

/* 40 steps from a fresh predictor. Measured: total 7.74 -> 4.86 on the train
 * batches; on validation the base on the predicted cache 2.500 -> 2.147
 * nats/token (on its own cache 2.118), the aux 3.50 -> 2.32, K/V L1 2.01 ->
 * 0.64. The stated margins: the last step's total loss at most 75% of the
 * first's; on validation the base on the predicted cache at least 0.2
 * nats/token better, the aux at least 0.5, the consistency term halved. */
static void test_short_run_cuts_the_loss(void **state) {
    (void)state;
    kvp_corpus_t *c = load_corpus();
    kvp_model_t *aux = NULL, *base = NULL;
    make_pair(c, &aux, &base);
    kvp_model_t *base0 = copy_model(base);
    kvp_predictor_t *p = make_predictor(aux, base, 23);
    kvp_trainer_config_t t = tiny_train(40);
    t.log_path = path_in("short.csv");
    kvp_kvptrain_weights_t w;
    kvp_kvptrain_weights_default(&w);
    kvp_kvptrain_result_t r;
    kvp_err_t err = {0};
    if (kvp_kvptrain_run(aux, base, p, c, &t, &w, &r, &err)) fail_msg("run: %s", err.msg);
    assert_true(r.completed && r.have_before && r.have_val);
    assert_int_equal(r.tokens, 40 * 4 * 32);
    /* the base is frozen */
    assert_memory_equal(base->params, base0->params, sizeof(float) * base->n_params);
    /* the first step's loss, from the log (row 0 is the evaluation before) */
    FILE *f = fopen(t.log_path, "r");
    assert_non_null(f);
    char line[1024];
    int rows = 0;
    double first = NAN;
    assert_non_null(fgets(line, sizeof line, f));
    assert_non_null(strstr(line, "step,tokens,lr,loss,base_loss,aux_loss,kv_loss"));
    while (fgets(line, sizeof line, f)) {
        if (rows == 1) {
            int step;
            double lr;
            assert_int_equal(sscanf(line, "%d,%*d,%lf,%lf", &step, &lr, &first), 3);
            assert_int_equal(step, 1);
        }
        rows++;
    }
    fclose(f);
    assert_int_equal(rows, 1 + 40);
    print_message("train loss %.3f -> %.3f; validation: base on predicted cache %.3f -> %.3f "
                  "nats/token (own cache %.3f), aux %.3f -> %.3f, K/V L1 %.3f -> %.3f\n",
                  first, r.loss.total, r.before.base_pred.loss, r.val.base_pred.loss,
                  r.val.base_own.loss, r.before.aux.loss, r.val.aux.loss, r.before.kv, r.val.kv);
    assert_true(r.loss.total <= 0.75 * first);
    assert_true(r.val.base_pred.loss <= r.before.base_pred.loss - 0.2);
    assert_true(r.val.aux.loss <= r.before.aux.loss - 0.5);
    assert_true(r.val.kv <= r.before.kv * 0.5);
    assert_true(fabs(r.val.base_own.loss - r.before.base_own.loss) < 1e-9);
    /* the library's evaluation agrees with the run's */
    kvp_kvptrain_eval_t e;
    assert_int_equal(kvp_kvptrain_evaluate(aux, base, p, kvp_corpus_stream(c, KVP_SPLIT_VAL), NULL,
                                           t.batch, t.ctx, (uint64_t)t.final_eval_tokens, &e, &err),
                     0);
    assert_true(fabs(e.base_pred.loss - r.val.base_pred.loss) < 1e-9);
    assert_true(e.base_pred.bpb > e.base_pred.loss / log(2.0));

    /* the outputs: the aux with the vocabulary, the predictor bound to the pair */
    const char *ao = path_in("out-aux.gguf"), *po = path_in("out-predictor.gguf");
    assert_int_equal(kvp_kvptrain_save_aux(aux, ao, NULL, &t, &w, &r, "test", &err), 0);
    assert_int_equal(kvp_kvptrain_save_predictor(p, aux, base, po, &err), 0);
    kvp_gguf_t *g = NULL;
    kvp_model_t *back = NULL;
    kvp_tokenizer_t *tok = NULL;
    kvp_predictor_t *pb = NULL;
    assert_int_equal(kvp_gguf_open(&g, ao, &err), 0);
    assert_int_equal(kvp_model_from_gguf(&back, g, &err), 0);
    assert_int_equal(kvp_tokenizer_from_gguf(&tok, g, &err), 0);
    assert_int_equal(kvp_tokenizer_n_vocab(tok), 258);
    assert_memory_equal(back->params, aux->params, sizeof(float) * aux->n_params);
    assert_int_equal(kvp_predictor_load(&pb, po, &err), 0);
    assert_int_equal(kvp_predictor_check_pair(pb, back, base, &err), 0);
    assert_memory_equal(pb->params, p->params, sizeof(float) * p->n_params);
    assert_int_not_equal(kvp_predictor_check_pair(pb, base0, base, &err), 0); /* not the old aux */
    kvp_predictor_free(&pb);
    kvp_tokenizer_free(&tok);
    kvp_model_free(&back);
    kvp_gguf_free(&g);

    kvp_predictor_free(&p);
    kvp_model_free(&aux);
    kvp_model_free(&base);
    kvp_model_free(&base0);
    kvp_corpus_free(&c);
}

/* ---- 5. stop and resume --------------------------------------------------------- */

/* Uninterrupted: 12 steps. Interrupted: stop after 7 (checkpoints every 5,
 * evaluations every 4), resume from copies of the starting models. */
static void test_stop_and_resume_is_bit_identical(void **state) {
    (void)state;
    kvp_corpus_t *c = load_corpus();
    kvp_model_t *aux0 = NULL, *base = NULL;
    make_pair(c, &aux0, &base);
    kvp_predictor_t *p0 = make_predictor(aux0, base, 31);
    kvp_kvptrain_weights_t w;
    kvp_kvptrain_weights_default(&w);
    kvp_kvptrain_result_t r;
    kvp_err_t err = {0};
    kvp_trainer_config_t t = tiny_train(12);
    t.eval_every = 4;
    t.accum = 2;

    kvp_model_t *ra = copy_model(aux0);
    kvp_predictor_t *rp = copy_predictor(p0);
    t.ckpt_path = path_in("ref.ckpt");
    t.ckpt_every = 5;
    if (kvp_kvptrain_run(ra, base, rp, c, &t, &w, &r, &err)) fail_msg("reference: %s", err.msg);
    assert_true(r.completed);

    kvp_model_t *a = copy_model(aux0);
    kvp_predictor_t *pp = copy_predictor(p0);
    t.ckpt_path = path_in("stop.ckpt");
    t.log_path = path_in("stop.csv");
    t.stop_after = 7;
    if (kvp_kvptrain_run(a, base, pp, c, &t, &w, &r, &err)) fail_msg("first half: %s", err.msg);
    assert_false(r.completed);
    assert_int_equal(r.step, 7);
    kvp_model_free(&a);
    kvp_predictor_free(&pp);

    a = copy_model(aux0);
    pp = copy_predictor(p0);
    t.stop_after = 0;
    t.resume = true;
    if (kvp_kvptrain_run(a, base, pp, c, &t, &w, &r, &err)) fail_msg("resume: %s", err.msg);
    assert_true(r.resumed && r.completed && r.have_before);
    assert_int_equal(r.step, 12);
    assert_int_equal(r.tokens, 12 * 2 * 4 * 32);
    assert_memory_equal(a->params, ra->params, sizeof(float) * a->n_params);
    assert_memory_equal(pp->params, rp->params, sizeof(float) * pp->n_params);
    /* header, the evaluation before, 12 steps */
    assert_int_equal(kvp_test_count_lines(t.log_path), 1 + 1 + 12);

    /* resuming with other settings, or from another start, is refused */
    kvp_model_free(&a);
    kvp_predictor_free(&pp);
    a = copy_model(aux0);
    pp = copy_predictor(p0);
    w.kv_w = 2.0f;
    assert_int_equal(kvp_kvptrain_run(a, base, pp, c, &t, &w, &r, &err), KVP_ESHAPE);
    assert_non_null(strstr(err.msg, "weights="));
    w.kv_w = 1.0f;
    kvp_model_t *other = copy_model(aux0);
    other->params[0] += 1.0f;
    kvp_predictor_t *p2 = copy_predictor(p0);
    assert_int_equal(kvp_kvptrain_run(other, base, p2, c, &t, &w, &r, &err), KVP_ESHAPE);
    assert_non_null(strstr(err.msg, "aux_start="));
    kvp_model_free(&other);
    kvp_predictor_free(&p2);

    kvp_model_free(&a);
    kvp_predictor_free(&pp);
    kvp_model_free(&ra);
    kvp_predictor_free(&rp);
    kvp_predictor_free(&p0);
    kvp_model_free(&aux0);
    kvp_model_free(&base);
    kvp_corpus_free(&c);
}

/* ---- 6. bad input ---------------------------------------------------------------- */

static void test_bad_inputs_are_refused(void **state) {
    (void)state;
    kvp_err_t err = {0};
    kvp_kvptrain_weights_t w;
    kvp_kvptrain_weights_default(&w);
    kvp_kvptrain_ctx_t *x = NULL;
    /* vocabularies differ */
    kvp_model_t *aux = make_model(aux_cfg(41), 400, 0.3f),
                *base = make_model(base_cfg(40), 401, 0.3f);
    kvp_predictor_t *p = make_predictor(aux, base, 402);
    assert_int_equal(kvp_kvptrain_ctx_new(&x, aux, base, p, B_, T_, &w, &err), KVP_ESHAPE);
    assert_null(x);
    assert_non_null(strstr(err.msg, "vocabulary has 41 tokens but the base model's 40"));
    kvp_model_free(&aux);
    /* a predictor made for other shapes */
    aux = make_model(aux_cfg(40), 403, 0.3f);
    kvp_model_config_t other = aux_cfg(40);
    other.n_kv_head = 4;
    kvp_model_t *aux4 = make_model(other, 404, 0.3f);
    kvp_predictor_t *p4 = make_predictor(aux4, base, 405);
    assert_int_equal(kvp_kvptrain_ctx_new(&x, aux, base, p4, B_, T_, &w, &err), KVP_ESHAPE);
    assert_non_null(strstr(err.msg, "aux.n_kv_head is 4 in the predictor but 2"));
    /* no backward before a forward; no forward without targets */
    assert_int_equal(kvp_kvptrain_ctx_new(&x, aux, base, p, B_, T_, &w, &err), 0);
    float *ga = calloc(aux->n_params, sizeof(float)), *gp = calloc(p->n_params, sizeof(float));
    assert_int_equal(kvp_kvptrain_backward(x, ga, gp, 1.0f, &err), KVP_EINVAL);
    int32_t tok[B_ * T_], tgt[B_ * T_];
    make_batch(tok, tgt, B_ * T_, 40, 406);
    kvp_kvptrain_loss_t l;
    assert_int_equal(kvp_kvptrain_forward(x, tok, NULL, &l, &err), KVP_EINVAL);
    tok[3] = 40;
    assert_int_equal(kvp_kvptrain_forward(x, tok, tgt, &l, &err), KVP_ERANGE);
    assert_int_equal(kvp_kvptrain_backward(x, ga, gp, 1.0f, &err), KVP_EINVAL);
    free(ga), free(gp);
    kvp_kvptrain_ctx_free(&x);
    kvp_kvptrain_ctx_free(&x); /* idempotent */
    /* the run refuses the same, and a corpus outside the vocabulary */
    kvp_corpus_t *c = load_corpus();
    kvp_trainer_config_t t = tiny_train(2);
    kvp_kvptrain_result_t r;
    assert_int_equal(kvp_kvptrain_run(aux, base, p4, c, &t, &w, &r, &err), KVP_ESHAPE);
    assert_int_equal(kvp_kvptrain_run(aux, base, p, c, &t, &w, &r, &err), KVP_ERANGE);
    assert_non_null(strstr(err.msg, "vocabulary of 40"));
    w.kv_w = -1.0f;
    assert_int_equal(kvp_kvptrain_run(aux, base, p, c, &t, &w, &r, &err), KVP_EINVAL);
    kvp_corpus_free(&c);
    kvp_predictor_free(&p);
    kvp_predictor_free(&p4);
    kvp_model_free(&aux);
    kvp_model_free(&aux4);
    kvp_model_free(&base);
}

/* ---- 7. the command: a real kill, and its errors ---------------------------------- */

/* Writes the pair (and a predictor of the wrong shape, and an aux with
 * another vocabulary) as files for the command. */
static void write_model_files(void) {
    kvp_corpus_t *c = load_corpus();
    kvp_model_t *aux = NULL, *base = NULL;
    make_pair(c, &aux, &base);
    kvp_err_t err = {0};
    if (kvp_trainer_save_gguf(aux, path_in("aux.gguf"), "aux", NULL, 0, NULL, NULL, NULL, &err) ||
        kvp_trainer_save_gguf(base, path_in("base.gguf"), "base", NULL, 0, NULL, NULL, NULL, &err))
        fail_msg("save: %s", err.msg);
    /* a predictor for a base with 3 layers */
    kvp_model_config_t bc = base->cfg;
    bc.n_layer = 3;
    kvp_model_t *b3 = make_model(bc, 500, 0.02f);
    kvp_predictor_t *p = make_predictor(aux, b3, 501);
    if (kvp_predictor_save(p, path_in("wrong-predictor.gguf"), &err)) fail_msg("%s", err.msg);
    kvp_predictor_free(&p);
    kvp_model_free(&b3);
    /* an aux with one merge: 259 tokens */
    kvp_model_config_t ac = aux->cfg;
    ac.n_vocab = 259;
    kvp_model_t *a259 = make_model(ac, 502, 0.02f);
    const char *merges[] = {"a b"};
    if (kvp_trainer_save_gguf(a259, path_in("aux259.gguf"), "aux", merges, 1, NULL, NULL, NULL,
                              &err))
        fail_msg("save: %s", err.msg);
    kvp_model_free(&a259);
    kvp_model_free(&aux);
    kvp_model_free(&base);
    kvp_corpus_free(&c);
}

/* Starts `kvpred train-kvp` with the common arguments and extra ones (NULL-
 * terminated); stdout to /dev/null, stderr to errfile (NULL: /dev/null). */
static pid_t spawn_kvp(const char *errfile, const char *const *extra) {
    const char *argv[64] = {getenv("KVPRED"),
                            "train-kvp",
                            "--corpus",
                            g_s.corpus,
                            "--ext",
                            ".py",
                            "--holdout",
                            "10",
                            "--ctx",
                            "32",
                            "--batch",
                            "4",
                            "--lr",
                            "0.01",
                            "--warmup",
                            "2",
                            "--seed",
                            "7",
                            "--eval-every",
                            "0",
                            "--final-eval-tokens",
                            "256",
                            "--quiet"};
    int n = 0;
    while (argv[n])
        n++;
    for (int i = 0; extra[i]; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    return kvp_test_spawn(argv, errfile ? errfile : "/dev/null");
}

static void test_killed_process_resumes_bit_identical(void **state) {
    (void)state;
    kvp_test_need_kvpred();
    write_model_files();
    char aux[1200], base[1200];
    snprintf(aux, sizeof aux, "%s", path_in("aux.gguf"));
    snprintf(base, sizeof base, "%s", path_in("base.gguf"));
    const char *ref[] = {"--aux",        aux, "--base", base,           "--steps", "120",
                         "--ckpt-every", "1", "-o",     path_in("ref"), NULL};
    int st = kvp_test_wait(spawn_kvp(NULL, ref));
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);

    const char *out = path_in("kill"), *ckpt = path_in("kill.ckpt");
    const char *run[] = {"--aux",        aux, "--base", base, "--steps", "120",
                         "--ckpt-every", "1", "-o",     out,  NULL};
    pid_t pid = spawn_kvp(NULL, run);
    struct timespec ts = {0, 2000000};
    for (int waited = 0; waited < 20000 && kvp_test_ckpt_step(ckpt) < 5; waited++)
        nanosleep(&ts, NULL);
    kill(pid, SIGKILL);
    st = kvp_test_wait(pid);
    assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    assert_int_equal(access(path_in("kill-aux.gguf"), F_OK), -1); /* it never finished */

    const char *resume[] = {"--aux",        aux, "--base", base, "--steps",  "120",
                            "--ckpt-every", "1", "-o",     out,  "--resume", NULL};
    st = kvp_test_wait(spawn_kvp(NULL, resume));
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    kvp_model_t *a = NULL, *b = NULL;
    kvp_predictor_t *pa = NULL, *pb = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_model_load(&a, path_in("ref-aux.gguf"), &err), 0);
    assert_int_equal(kvp_model_load(&b, path_in("kill-aux.gguf"), &err), 0);
    assert_memory_equal(a->params, b->params, sizeof(float) * a->n_params);
    assert_int_equal(kvp_predictor_load(&pa, path_in("ref-predictor.gguf"), &err), 0);
    assert_int_equal(kvp_predictor_load(&pb, path_in("kill-predictor.gguf"), &err), 0);
    assert_memory_equal(pa->params, pb->params, sizeof(float) * pa->n_params);
    assert_string_equal(pa->aux_fingerprint, pb->aux_fingerprint);
    kvp_predictor_free(&pa);
    kvp_predictor_free(&pb);
    kvp_model_free(&a);
    kvp_model_free(&b);

    /* --init from the trained predictor: made for the trained aux, not this one */
    const char *errf = path_in("stderr.txt");
    const char *wrong_pair[] = {
        "--aux",   aux, "--base", base,           "--init", path_in("ref-predictor.gguf"),
        "--steps", "2", "-o",     path_in("bad"), NULL};
    st = kvp_test_wait(spawn_kvp(errf, wrong_pair));
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 1);
    char msg[2048];
    kvp_test_read_text(errf, msg, sizeof msg);
    assert_non_null(strstr(msg, "aux_fingerprint"));
    assert_non_null(strstr(msg, "--init"));
}

static void expect_refusal(const char *const *args, const char *needle) {
    const char *errf = path_in("stderr.txt");
    int st = kvp_test_wait(spawn_kvp(errf, args));
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) != 0);
    char msg[2048];
    kvp_test_read_text(errf, msg, sizeof msg);
    if (!strstr(msg, needle)) fail_msg("expected '%s' in: %s", needle, msg);
}

static void test_command_refuses_bad_inputs(void **state) {
    (void)state;
    kvp_test_need_kvpred();
    if (access(path_in("aux.gguf"), F_OK)) write_model_files();
    char aux[1200], base[1200];
    snprintf(aux, sizeof aux, "%s", path_in("aux.gguf"));
    snprintf(base, sizeof base, "%s", path_in("base.gguf"));
    const char *vocab[] = {"--aux", path_in("aux259.gguf"), "--base", base,
                           "-o",    path_in("x"),           NULL};
    expect_refusal(vocab, "vocabulary has 259 tokens but the base model's 258");
    const char *shape[] = {"--aux", aux,          "--base",
                           base,    "--init",     path_in("wrong-predictor.gguf"),
                           "-o",    path_in("x"), NULL};
    expect_refusal(shape, "base.n_layer is 3 in the predictor but 2 in the base model");
    const char *map[] = {"--aux", aux,  "--base",     base, "--layer-map",
                         "0,0,0", "-o", path_in("x"), NULL};
    expect_refusal(map, "--layer-map has 3 entries but the base model has 2 layers");
    const char *noout[] = {"--aux", aux, "--base", base, NULL};
    expect_refusal(noout, "-o OUT are required");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_train_kv_grad_input_matches_finite_differences),
        cmocka_unit_test(test_joint_gradient_matches_finite_differences),
        cmocka_unit_test(test_identity_predictor_on_a_copy_of_the_base_is_exact),
        cmocka_unit_test(test_short_run_cuts_the_loss),
        cmocka_unit_test(test_stop_and_resume_is_bit_identical),
        cmocka_unit_test(test_bad_inputs_are_refused),
        cmocka_unit_test(test_killed_process_resumes_bit_identical),
        cmocka_unit_test(test_command_refuses_bad_inputs),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
