/* kvp_kvptrain: KV Prediction training — the joint forward/backward of one
 * micro-batch, validation on the predicted cache, and the training loop (see
 * kvp_kvptrain.h).
 *
 * The loop mirrors kvp_trainer.c step for step (sampling, accumulation,
 * clipping, AdamW, schedule, checkpoints, CSV log, progress) with two
 * parameter groups instead of one; what the two loops share (validation
 * windows, settings checks, checkpoint metadata, the log, the loop's
 * bookkeeping) is in kvp_trainutil. */
#include "kvp_kvptrain.h"
#include "kvp_trainutil.h"

#include <cblas.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvp_adamw.h"
#include "kvp_ckpt.h"
#include "kvp_progress.h"
#include "kvp_rng.h"
#include "kvp_time.h"
#include "kvp_train.h"

#define LN2 KVP_TRAINUTIL_LN2
#define CSV_HEADER                                                                                 \
    "step,tokens,lr,loss,base_loss,aux_loss,kv_loss,grad_norm,val_base_bpb,val_aux_bpb,val_kv,"    \
    "tok_per_s,elapsed_s"

void kvp_kvptrain_weights_default(kvp_kvptrain_weights_t *w) {
    *w = (kvp_kvptrain_weights_t){.base_w = 1.0f, .aux_w = 1.0f, .kv_w = 1.0f, .zloss = 1e-4f};
}

static int check_dim(const char *field, int in_pred, int in_model, const char *model,
                     kvp_err_t *err) {
    if (in_pred == in_model) return KVP_OK;
    return kvp_err_set(err, KVP_ESHAPE,
                       "predictor/model mismatch: %s is %d in the predictor but %d in the %s model",
                       field, in_pred, in_model, model);
}

int kvp_kvptrain_check(const kvp_model_t *aux, const kvp_model_t *base, const kvp_predictor_t *p,
                       kvp_err_t *err) {
    if (aux->cfg.n_vocab != base->cfg.n_vocab)
        return kvp_err_set(err, KVP_ESHAPE,
                           "the auxiliary model's vocabulary has %d tokens but the base model's "
                           "%d: KV Prediction needs one shared vocabulary",
                           aux->cfg.n_vocab, base->cfg.n_vocab);
    kvp_kv_shape_t a = kvp_kv_shape_of(aux), b = kvp_kv_shape_of(base);
    int rc = check_dim("aux.n_layer", p->aux.n_layer, a.n_layer, "auxiliary", err);
    if (!rc) rc = check_dim("aux.n_kv_head", p->aux.n_kv_head, a.n_kv_head, "auxiliary", err);
    if (!rc) rc = check_dim("aux.head_dim", p->aux.head_dim, a.head_dim, "auxiliary", err);
    if (!rc) rc = check_dim("base.n_layer", p->base.n_layer, b.n_layer, "base", err);
    if (!rc) rc = check_dim("base.n_kv_head", p->base.n_kv_head, b.n_kv_head, "base", err);
    if (!rc) rc = check_dim("base.head_dim", p->base.head_dim, b.head_dim, "base", err);
    return rc;
}

void kvp_kvptrain_init_predictor(kvp_predictor_t *p, uint64_t seed) {
    kvp_rng_t r;
    kvp_rng_seed(&r, seed);
    const float bound = 1.0f / sqrtf((float)p->d_in);
    const size_t nw = (size_t)p->d_out * p->d_in, nb = (size_t)p->d_out;
    /* through the views in base-layer order, not in the arena's order (which
     * groups base layers by aux layer): a seed gives the predictor it gave
     * before the arena was grouped */
    for (int l = 0; l < p->base.n_layer; l++) {
        kvp_predictor_layer_t *L = &p->layers[l];
        float *t[4] = {L->k_w, L->k_b, L->v_w, L->v_b};
        for (int i = 0; i < 4; i++)
            for (size_t j = 0; j < (i % 2 ? nb : nw); j++)
                t[i][j] = (2.0f * kvp_rng_uniform(&r) - 1.0f) * bound;
    }
}

/* ---- one micro-batch -------------------------------------------------------- */

struct kvp_kvptrain_ctx {
    const kvp_model_t *aux, *base;
    const kvp_predictor_t *p;
    kvp_kvptrain_weights_t w;
    int B, T, N;
    int d_in, d_out, n_aux, n_base;
    kvp_train_ctx_t *atc, *btc;
    bool have_fwd; /* a training forward ran: backward may follow */
    /* [n_base][N][d_out]: predicted and true base K/V */
    float *pk, *pv, *tk, *tv;
    float *dy;        /* [N][d_out]: d loss / d one predicted map's output */
    float *xgk, *xgv; /* [n_aux][N][d_in]: d loss / d aux K (un-rotated), V via the predictor */
    float *arena;
};

int kvp_kvptrain_ctx_new(kvp_kvptrain_ctx_t **out, const kvp_model_t *aux, const kvp_model_t *base,
                         const kvp_predictor_t *p, int B, int T, const kvp_kvptrain_weights_t *w,
                         kvp_err_t *err) {
    *out = NULL;
    int rc = kvp_kvptrain_check(aux, base, p, err);
    if (rc) return rc;
    kvp_kvptrain_ctx_t *x = calloc(1, sizeof *x);
    if (!x) return kvp_err_set(err, KVP_ENOMEM, "KV-prediction training: out of memory");
    *x = (kvp_kvptrain_ctx_t){.aux = aux,
                              .base = base,
                              .p = p,
                              .w = *w,
                              .B = B,
                              .T = T,
                              .N = B * T,
                              .d_in = p->d_in,
                              .d_out = p->d_out,
                              .n_aux = p->aux.n_layer,
                              .n_base = p->base.n_layer};
    rc = kvp_train_ctx_new(&x->atc, aux, B, T, err);
    if (!rc) rc = kvp_train_ctx_new(&x->btc, base, B, T, err);
    if (rc) {
        kvp_kvptrain_ctx_free(&x);
        return rc;
    }
    const size_t N = (size_t)x->N, nb = (size_t)x->n_base * N * x->d_out,
                 na = (size_t)x->n_aux * N * x->d_in;
    x->arena = malloc(sizeof(float) * (4 * nb + N * x->d_out + 2 * na));
    if (!x->arena) {
        kvp_kvptrain_ctx_free(&x);
        return kvp_err_set(err, KVP_ENOMEM, "KV-prediction training: cannot allocate %zu MiB",
                           sizeof(float) * (4 * nb + N * x->d_out + 2 * na) >> 20);
    }
    x->pk = x->arena;
    x->pv = x->pk + nb;
    x->tk = x->pv + nb;
    x->tv = x->tk + nb;
    x->dy = x->tv + nb;
    x->xgk = x->dy + N * x->d_out;
    x->xgv = x->xgk + na;
    kvp_train_set_zloss(x->atc, w->zloss);
    kvp_train_set_zloss(x->btc, w->zloss);
    for (int a = 0; a < x->n_aux; a++)
        kvp_train_set_kv_grad(x->atc, a, x->xgk + (size_t)a * N * x->d_in,
                              x->xgv + (size_t)a * N * x->d_in);
    *out = x;
    return KVP_OK;
}

void kvp_kvptrain_ctx_free(kvp_kvptrain_ctx_t **ctx) {
    if (!ctx || !*ctx) return;
    kvp_train_ctx_free(&(*ctx)->atc);
    kvp_train_ctx_free(&(*ctx)->btc);
    free((*ctx)->arena);
    free(*ctx);
    *ctx = NULL;
}

static float *layer_rows(float *buf, const kvp_kvptrain_ctx_t *x, int l) {
    return buf + (size_t)l * x->N * x->d_out;
}

/* The base reads the predicted K/V on every layer (on) or its own (off). */
static void base_reads_predicted(kvp_kvptrain_ctx_t *x, bool on) {
    for (int l = 0; l < x->n_base; l++)
        kvp_train_set_external_kv(x->btc, l, on ? layer_rows(x->pk, x, l) : NULL,
                                  on ? layer_rows(x->pv, x, l) : NULL);
}

/* Every base layer's K/V predicted from the aux forward that just ran. */
static void predict(kvp_kvptrain_ctx_t *x) {
    for (int l = 0; l < x->n_base; l++) {
        int a = x->p->layer_map[l];
        kvp_predictor_apply_layer(x->p, l, x->N, kvp_train_true_k(x->atc, a),
                                  kvp_train_true_v(x->atc, a), layer_rows(x->pk, x, l),
                                  layer_rows(x->pv, x, l));
    }
}

/* Sum of |a - b| over the first n values. */
static double abs_diff_sum(const float *a, const float *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += fabs((double)a[i] - (double)b[i]);
    return s;
}

int kvp_kvptrain_forward(kvp_kvptrain_ctx_t *x, const int32_t *tokens, const int32_t *targets,
                         kvp_kvptrain_loss_t *loss, kvp_err_t *err) {
    x->have_fwd = false;
    if (!targets)
        return kvp_err_set(err, KVP_EINVAL, "KV-prediction training forward needs targets");
    const size_t n = (size_t)x->N * x->d_out;
    float la = 0.0f, lb = 0.0f;
    int rc = kvp_train_forward(x->atc, tokens, targets, &la, err);
    if (rc) return rc;
    predict(x);
    /* the consistency target: the base on its own K/V, no loss */
    base_reads_predicted(x, false);
    rc = kvp_train_forward(x->btc, tokens, NULL, NULL, err);
    if (rc) return rc;
    double kv = 0.0;
    for (int l = 0; l < x->n_base; l++) {
        memcpy(layer_rows(x->tk, x, l), kvp_train_true_k(x->btc, l), sizeof(float) * n);
        memcpy(layer_rows(x->tv, x, l), kvp_train_true_v(x->btc, l), sizeof(float) * n);
        kv += abs_diff_sum(layer_rows(x->pk, x, l), layer_rows(x->tk, x, l), n) / (double)n;
        kv += abs_diff_sum(layer_rows(x->pv, x, l), layer_rows(x->tv, x, l), n) / (double)n;
    }
    base_reads_predicted(x, true);
    rc = kvp_train_forward(x->btc, tokens, targets, &lb, err);
    if (rc) return rc;
    loss->base = lb;
    loss->aux = la;
    loss->kv = kv;
    loss->total = x->w.base_w * loss->base + x->w.aux_w * loss->aux + x->w.kv_w * loss->kv;
    x->have_fwd = true;
    return KVP_OK;
}

/* Backward of one predictor map y = x W^T + b over N rows, given dy:
 * dW += dy^T x, db += column sums of dy, dx += dy W. */
static void map_backward(const float *dy, const float *xin, const float *W, float *dW, float *db,
                         float *dx, int N, int d_in, int d_out) {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d_out, d_in, N, 1.0f, dy, d_out, xin, d_in,
                1.0f, dW, d_in);
    for (int r = 0; r < N; r++) {
        const float *row = dy + (size_t)r * d_out;
        for (int o = 0; o < d_out; o++)
            db[o] += row[o];
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, d_in, d_out, 1.0f, dy, d_out, W, d_in,
                1.0f, dx, d_in);
}

int kvp_kvptrain_backward(kvp_kvptrain_ctx_t *x, float *g_aux, float *g_pred, float scale,
                          kvp_err_t *err) {
    if (!x->have_fwd)
        return kvp_err_set(err, KVP_EINVAL,
                           "KV-prediction backward: no forward with targets to differentiate");
    const kvp_predictor_t *p = x->p;
    const int N = x->N, d_in = x->d_in, d_out = x->d_out;
    const size_t n = (size_t)N * d_out;
    /* the frozen base: only d loss / d predicted K/V */
    int rc = kvp_train_backward(x->btc, NULL, scale * x->w.base_w, err);
    if (rc) return rc;
    memset(x->xgk, 0, sizeof(float) * (size_t)x->n_aux * N * d_in);
    memset(x->xgv, 0, sizeof(float) * (size_t)x->n_aux * N * d_in);
    /* d (kv_w * mean |pred - true|) / d pred = kv_w sign(pred - true) / n */
    const float c = scale * x->w.kv_w / (float)n;
    for (int l = 0; l < x->n_base; l++) {
        const int a = p->layer_map[l];
        const kvp_predictor_layer_t *L = &p->layers[l];
        for (int kv = 0; kv < 2; kv++) {
            const float *gb = kv ? kvp_train_kv_grad_v(x->btc, l) : kvp_train_kv_grad_k(x->btc, l);
            const float *pr = layer_rows(kv ? x->pv : x->pk, x, l);
            const float *tr = layer_rows(kv ? x->tv : x->tk, x, l);
            for (size_t i = 0; i < n; i++)
                x->dy[i] = gb[i] + (pr[i] > tr[i] ? c : (pr[i] < tr[i] ? -c : 0.0f));
            const float *W = kv ? L->v_w : L->k_w, *b = kv ? L->v_b : L->k_b;
            const float *xin = kv ? kvp_train_true_v(x->atc, a) : kvp_train_true_k(x->atc, a);
            float *dx = (kv ? x->xgv : x->xgk) + (size_t)a * N * d_in;
            map_backward(x->dy, xin, W, g_pred + (W - p->params), g_pred + (b - p->params), dx, N,
                         d_in, d_out);
        }
    }
    /* the aux: its own loss, plus xgk/xgv on its K/V (set in ctx_new) */
    return kvp_train_backward(x->atc, g_aux, scale * x->w.aux_w, err);
}

const float *kvp_kvptrain_pred_k(const kvp_kvptrain_ctx_t *x, int l) {
    return layer_rows(x->pk, x, l);
}
const float *kvp_kvptrain_pred_v(const kvp_kvptrain_ctx_t *x, int l) {
    return layer_rows(x->pv, x, l);
}
const float *kvp_kvptrain_true_k(const kvp_kvptrain_ctx_t *x, int l) {
    return layer_rows(x->tk, x, l);
}
const float *kvp_kvptrain_true_v(const kvp_kvptrain_ctx_t *x, int l) {
    return layer_rows(x->tv, x, l);
}

/* ---- validation ------------------------------------------------------------- */

/* One batch of evaluation windows (the first n_real rows are real windows):
 * adds the nats of the scored tokens of the three models to nats[3] and the
 * absolute K/V differences of the real rows, every layer, to *abs_sum. */
static int eval_batch(kvp_kvptrain_ctx_t *x, const int32_t *tok, const int32_t *tgt,
                      uint64_t scored, int n_real, double nats[3], double *abs_sum,
                      kvp_err_t *err) {
    float la = 0, lb = 0, lo = 0;
    int rc = kvp_train_forward(x->atc, tok, tgt, &la, err);
    if (rc) return rc;
    predict(x);
    base_reads_predicted(x, true);
    rc = kvp_train_forward(x->btc, tok, tgt, &lb, err);
    base_reads_predicted(x, false);
    if (!rc) rc = kvp_train_forward(x->btc, tok, tgt, &lo, err);
    if (rc) return rc;
    nats[0] += (double)lb * (double)scored;
    nats[1] += (double)la * (double)scored;
    nats[2] += (double)lo * (double)scored;
    const size_t n = (size_t)n_real * x->T * x->d_out;
    for (int l = 0; l < x->n_base; l++) {
        *abs_sum += abs_diff_sum(layer_rows(x->pk, x, l), kvp_train_true_k(x->btc, l), n);
        *abs_sum += abs_diff_sum(layer_rows(x->pv, x, l), kvp_train_true_v(x->btc, l), n);
    }
    return KVP_OK;
}

/* The windows of kvp_trainer_evaluate: about max_tokens tokens of s in evenly
 * spaced windows of T, B a forward; cross-entropy without z-loss. */
static int evaluate(kvp_kvptrain_ctx_t *x, const kvp_corpus_stream_t *s, const uint32_t *tb,
                    uint64_t max_tokens, int32_t *tokens, int32_t *targets,
                    kvp_kvptrain_eval_t *out, kvp_err_t *err) {
    const int B = x->B, T = x->T, V = x->base->cfg.n_vocab;
    memset(out, 0, sizeof *out);
    kvp_trainutil_windows_t win;
    int rc = kvp_trainutil_windows_init(&win, s, T, max_tokens, err);
    if (rc) return rc;
    double nats[3] = {0, 0, 0}, abs_sum = 0.0;
    uint64_t n_tok = 0, n_bytes = 0, n_rows = 0;
    kvp_train_set_zloss(x->atc, 0.0f);
    kvp_train_set_zloss(x->btc, 0.0f);
    for (size_t j0 = 0; !rc && j0 < win.k; j0 += (size_t)B) {
        kvp_trainutil_batch_t b;
        rc = kvp_trainutil_windows_fill(&win, j0, B, tb, V, "models'", tokens, targets, &b, err);
        n_bytes += b.bytes;
        if (rc || !b.scored) continue;
        rc = eval_batch(x, tokens, targets, b.scored, b.n_real, nats, &abs_sum, err);
        n_tok += b.scored;
        n_rows += (uint64_t)b.n_real * T;
    }
    kvp_train_set_zloss(x->atc, x->w.zloss);
    kvp_train_set_zloss(x->btc, x->w.zloss);
    if (rc) return rc;
    kvp_trainutil_eval_set(&out->base_pred, nats[0], n_tok, n_bytes);
    kvp_trainutil_eval_set(&out->aux, nats[1], n_tok, n_bytes);
    kvp_trainutil_eval_set(&out->base_own, nats[2], n_tok, n_bytes);
    out->kv = n_rows ? abs_sum / ((double)n_rows * x->d_out) : NAN;
    return KVP_OK;
}

int kvp_kvptrain_evaluate(const kvp_model_t *aux, const kvp_model_t *base, const kvp_predictor_t *p,
                          const kvp_corpus_stream_t *s, const kvp_tokenizer_t *tok, int B, int T,
                          uint64_t max_tokens, kvp_kvptrain_eval_t *out, kvp_err_t *err) {
    if (B <= 0 || T <= 0)
        return kvp_err_set(err, KVP_EINVAL, "evaluation: batch %d and context %d must be > 0", B,
                           T);
    kvp_kvptrain_weights_t w;
    kvp_kvptrain_weights_default(&w);
    kvp_kvptrain_ctx_t *x = NULL;
    int rc = kvp_kvptrain_ctx_new(&x, aux, base, p, B, T, &w, err);
    uint32_t *tb = rc ? NULL : kvp_trainutil_token_bytes_new(tok, base->cfg.n_vocab);
    int32_t *tokens = malloc(sizeof(int32_t) * (size_t)B * T);
    int32_t *targets = malloc(sizeof(int32_t) * (size_t)B * T);
    if (!rc && (!tb || !tokens || !targets))
        rc = kvp_err_set(err, KVP_ENOMEM, "evaluation: out of memory");
    if (!rc) rc = evaluate(x, s, tb, max_tokens, tokens, targets, out, err);
    free(tb);
    free(tokens);
    free(targets);
    kvp_kvptrain_ctx_free(&x);
    return rc;
}

/* ---- checkpoint metadata -------------------------------------------------------
 * A text section of key=value lines (kvp_trainutil), as kvp_trainer's with
 * the keys of two parameter groups, the losses and the evaluations. */

static const kvp_trainutil_ckpt_kind_t CKPT_KIND = {.format = "kvpred-kvptrain 1",
                                                    .name = "KV-prediction training",
                                                    .same = "models, settings and corpus"};

/* FNV-1a-64 of bytes, continuing from h. */
static uint64_t fnv(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* The starting predictor's hash: its map, then each base layer's k_w, k_b,
 * v_w, v_b — base-layer order, independent of the arena's layout, so that a
 * checkpoint of the old layout passes the settings check and is refused by
 * the layout check below with a message that says why. */
static uint64_t pred_hash(const kvp_predictor_t *p) {
    const size_t nw = sizeof(float) * p->d_out * p->d_in, nb = sizeof(float) * p->d_out;
    uint64_t h =
        fnv(14695981039346656037ull, p->layer_map, sizeof(int32_t) * (size_t)p->base.n_layer);
    for (int l = 0; l < p->base.n_layer; l++) {
        const kvp_predictor_layer_t *L = &p->layers[l];
        h = fnv(fnv(fnv(fnv(h, L->k_w, nw), L->k_b, nb), L->v_w, nw), L->v_b, nb);
    }
    return h;
}

/* Section "pred.layout" of a checkpoint: how pred.params and its AdamW
 * moments are laid out (kvp_predictor.h). Checkpoints without it hold the
 * arena per base layer, which read as grouped would silently mix up weights. */
#define PRED_LAYOUT "grouped by aux layer"

/* ---- the run -------------------------------------------------------------------- */

typedef struct run {
    kvp_model_t *aux;
    const kvp_model_t *base;
    kvp_predictor_t *p;
    const kvp_corpus_t *c;
    const kvp_trainer_config_t *cfg;
    const kvp_kvptrain_weights_t *w;
    int warmup;
    char aux_start[17], base_fp[17]; /* fingerprints of the starting aux and of the base */
    uint64_t pred_start;             /* hash of the starting predictor (map and weights) */
    kvp_adamw_t *opt_a, *opt_p;
    kvp_rng_t rng;
    int step;
    uint64_t tokens;
    double elapsed_before, t0;
    kvp_kvptrain_loss_t loss;
    bool have_before, have_val;
    kvp_kvptrain_eval_t before, val;
    kvp_progress_t *prog;
} run_t;

/* The settings a resumed run must share with its checkpoint. */
static void meta_settings(kvp_trainutil_meta_t *mt, const run_t *r) {
    const kvp_predictor_t *p = r->p;
    kvp_trainutil_meta_add_model(mt, "aux_", r->aux);
    kvp_trainutil_meta_add(mt, "aux_start", "%s", r->aux_start);
    kvp_trainutil_meta_add(mt, "base", "%s", r->base_fp);
    kvp_trainutil_meta_add(mt, "predictor", "aux %dx%dx%d base %dx%dx%d start %016" PRIx64,
                           p->aux.n_layer, p->aux.n_kv_head, p->aux.head_dim, p->base.n_layer,
                           p->base.n_kv_head, p->base.head_dim, r->pred_start);
    kvp_trainutil_meta_add_schedule(mt, r->cfg, r->warmup);
    kvp_trainutil_meta_add(mt, "weights", "base %.9g aux %.9g kv %.9g zloss %.9g", r->w->base_w,
                           r->w->aux_w, r->w->kv_w, r->w->zloss);
    kvp_trainutil_meta_add_corpus(mt, r->c);
}

static void meta_eval(kvp_trainutil_meta_t *mt, const char *prefix, const kvp_kvptrain_eval_t *e) {
    char k[64];
    const struct {
        const char *name;
        const kvp_eval_t *e;
    } parts[] = {{"base_pred", &e->base_pred}, {"aux", &e->aux}, {"base_own", &e->base_own}};
    for (size_t i = 0; i < 3; i++) {
        snprintf(k, sizeof k, "%s_%s_loss", prefix, parts[i].name);
        kvp_trainutil_meta_add(mt, k, "%.17g", parts[i].e->loss);
        snprintf(k, sizeof k, "%s_%s_bpb", prefix, parts[i].name);
        kvp_trainutil_meta_add(mt, k, "%.17g", parts[i].e->bpb);
        snprintf(k, sizeof k, "%s_%s_tokens", prefix, parts[i].name);
        kvp_trainutil_meta_add(mt, k, "%" PRIu64, parts[i].e->tokens);
    }
    snprintf(k, sizeof k, "%s_kv", prefix);
    kvp_trainutil_meta_add(mt, k, "%.17g", e->kv);
}

static void meta_get_eval(const char *text, size_t n, const char *prefix, kvp_kvptrain_eval_t *e) {
    char k[64];
    kvp_eval_t *parts[] = {&e->base_pred, &e->aux, &e->base_own};
    const char *names[] = {"base_pred", "aux", "base_own"};
    for (size_t i = 0; i < 3; i++) {
        snprintf(k, sizeof k, "%s_%s_loss", prefix, names[i]);
        parts[i]->loss = kvp_trainutil_meta_double(text, n, k);
        snprintf(k, sizeof k, "%s_%s_bpb", prefix, names[i]);
        parts[i]->bpb = kvp_trainutil_meta_double(text, n, k);
        snprintf(k, sizeof k, "%s_%s_tokens", prefix, names[i]);
        parts[i]->tokens = kvp_trainutil_meta_u64(text, n, k);
    }
    snprintf(k, sizeof k, "%s_kv", prefix);
    e->kv = kvp_trainutil_meta_double(text, n, k);
}

static int save_ckpt(run_t *r, kvp_err_t *err) {
    kvp_trainutil_meta_t mt = {.n = 0};
    const kvp_trainutil_pos_t pos = {.step = r->step,
                                     .tokens = r->tokens,
                                     .elapsed = r->elapsed_before + (kvp_now() - r->t0),
                                     .adam_t = r->opt_a->t};
    kvp_trainutil_meta_add_pos(&mt, CKPT_KIND.format, &pos);
    kvp_trainutil_meta_add(&mt, "loss", "%.17g", r->loss.total);
    kvp_trainutil_meta_add(&mt, "loss_base", "%.17g", r->loss.base);
    kvp_trainutil_meta_add(&mt, "loss_aux", "%.17g", r->loss.aux);
    kvp_trainutil_meta_add(&mt, "loss_kv", "%.17g", r->loss.kv);
    kvp_trainutil_meta_add(&mt, "have_before", "%d", (int)r->have_before);
    if (r->have_before) meta_eval(&mt, "before", &r->before);
    kvp_trainutil_meta_add(&mt, "have_val", "%d", (int)r->have_val);
    if (r->have_val) meta_eval(&mt, "val", &r->val);
    meta_settings(&mt, r);
    const uint64_t na = (uint64_t)r->aux->n_params * sizeof(float),
                   np = (uint64_t)r->p->n_params * sizeof(float);
    kvp_ckpt_section_t s[] = {
        {"meta", mt.buf, mt.n},
        {"rng", r->rng.s, sizeof r->rng.s},
        {"aux.params", r->aux->params, na},
        {"pred.layout", PRED_LAYOUT, sizeof PRED_LAYOUT - 1},
        {"pred.params", r->p->params, np},
        {"aux.adam.m", r->opt_a->m, na},
        {"aux.adam.v", r->opt_a->v, na},
        {"pred.adam.m", r->opt_p->m, np},
        {"pred.adam.v", r->opt_p->v, np},
    };
    return kvp_ckpt_write(r->cfg->ckpt_path, s, sizeof s / sizeof s[0], err);
}

static int load_ckpt(run_t *r, kvp_err_t *err) {
    kvp_trainutil_meta_t want = {.n = 0};
    meta_settings(&want, r);
    kvp_ckpt_t *ck = NULL;
    kvp_trainutil_pos_t pos;
    const char *text;
    size_t ml;
    int rc = kvp_trainutil_ckpt_open(&ck, r->cfg->ckpt_path, &CKPT_KIND, &want, r->cfg->steps, &pos,
                                     &text, &ml, err);
    if (rc) return rc;
    uint64_t n_layout = 0;
    const char *layout = kvp_ckpt_find(ck, "pred.layout", &n_layout);
    if (!layout || n_layout != sizeof PRED_LAYOUT - 1 || memcmp(layout, PRED_LAYOUT, n_layout)) {
        kvp_ckpt_free(&ck);
        return kvp_err_set(err, KVP_EUNSUPPORTED,
                           "checkpoint %s predates the grouped predictor layout; restart "
                           "training (without resuming from it)",
                           r->cfg->ckpt_path);
    }
    r->step = pos.step;
    r->tokens = pos.tokens;
    r->elapsed_before = pos.elapsed;
    r->opt_a->t = r->opt_p->t = pos.adam_t;
    r->loss.total = kvp_trainutil_meta_double(text, ml, "loss");
    r->loss.base = kvp_trainutil_meta_double(text, ml, "loss_base");
    r->loss.aux = kvp_trainutil_meta_double(text, ml, "loss_aux");
    r->loss.kv = kvp_trainutil_meta_double(text, ml, "loss_kv");
    r->have_before = kvp_trainutil_meta_u64(text, ml, "have_before") != 0;
    if (r->have_before) meta_get_eval(text, ml, "before", &r->before);
    r->have_val = kvp_trainutil_meta_u64(text, ml, "have_val") != 0;
    if (r->have_val) meta_get_eval(text, ml, "val", &r->val);
    const uint64_t na = (uint64_t)r->aux->n_params * sizeof(float),
                   np = (uint64_t)r->p->n_params * sizeof(float);
    rc = kvp_ckpt_get(ck, "rng", r->rng.s, sizeof r->rng.s, err);
    if (!rc) rc = kvp_ckpt_get(ck, "aux.params", r->aux->params, na, err);
    if (!rc) rc = kvp_ckpt_get(ck, "pred.params", r->p->params, np, err);
    if (!rc) rc = kvp_ckpt_get(ck, "aux.adam.m", r->opt_a->m, na, err);
    if (!rc) rc = kvp_ckpt_get(ck, "aux.adam.v", r->opt_a->v, na, err);
    if (!rc) rc = kvp_ckpt_get(ck, "pred.adam.m", r->opt_p->m, np, err);
    if (!rc) rc = kvp_ckpt_get(ck, "pred.adam.v", r->opt_p->v, np, err);
    kvp_ckpt_free(&ck);
    return rc;
}

static void log_val(FILE *log, const kvp_kvptrain_eval_t *e) {
    fprintf(log, "%.6f,%.6f,%.6f", e->base_pred.bpb, e->aux.bpb, e->kv);
}

static int check_config(const run_t *r, kvp_err_t *err) {
    static const char who[] = "KV-prediction training";
    int rc = kvp_trainutil_check_config(r->cfg, who, err);
    if (rc) return rc;
    if (!(r->w->base_w >= 0) || !(r->w->aux_w >= 0) || !(r->w->kv_w >= 0) || !(r->w->zloss >= 0))
        return kvp_err_set(err, KVP_EINVAL,
                           "%s: loss weights must be >= 0 (base %g, aux %g, kv %g, z %g)", who,
                           r->w->base_w, r->w->aux_w, r->w->kv_w, r->w->zloss);
    rc = kvp_kvptrain_check(r->aux, r->base, r->p, err);
    if (!rc)
        rc = kvp_trainutil_check_train_stream(r->c, r->cfg->ctx, r->aux->cfg.n_vocab, who,
                                              "models'", err);
    return rc;
}

/* Weight decay off for the aux model's norm weights (as kvp_trainer) and the
 * predictor's biases. */
static void set_decay_masks(run_t *r) {
    kvp_trainutil_no_decay_norms(r->opt_a, r->aux);
    const kvp_predictor_t *p = r->p;
    for (int l = 0; l < p->base.n_layer; l++) {
        kvp_adamw_set_decay(r->opt_p, (size_t)(p->layers[l].k_b - p->params), (size_t)p->d_out,
                            false);
        kvp_adamw_set_decay(r->opt_p, (size_t)(p->layers[l].v_b - p->params), (size_t)p->d_out,
                            false);
    }
}

/* Scales both gradients so that their joint norm is at most max_norm (<= 0:
 * none); returns the joint norm before. */
static double clip_joint(float *ga, size_t na, float *gp, size_t np, float max_norm) {
    double a = kvp_grad_norm(ga, na), b = kvp_grad_norm(gp, np);
    double norm = sqrt(a * a + b * b);
    if (max_norm > 0.0f && norm > (double)max_norm) {
        float s = (float)((double)max_norm / norm);
        for (size_t i = 0; i < na; i++)
            ga[i] *= s;
        for (size_t i = 0; i < np; i++)
            gp[i] *= s;
    }
    return norm;
}

int kvp_kvptrain_run(kvp_model_t *aux, const kvp_model_t *base, kvp_predictor_t *p,
                     const kvp_corpus_t *c, const kvp_trainer_config_t *cfg,
                     const kvp_kvptrain_weights_t *w, kvp_kvptrain_result_t *res, kvp_err_t *err) {
    memset(res, 0, sizeof *res);
    const kvp_kvptrain_loss_t no_loss = {NAN, NAN, NAN, NAN};
    res->loss = no_loss;
    run_t r = {.aux = aux, .base = base, .p = p, .c = c, .cfg = cfg, .w = w, .loss = no_loss};
    int rc = check_config(&r, err);
    if (rc) return rc;
    kvp_model_drop_half(aux); /* training changes the f32 weights the copy mirrors */
    const int B = cfg->batch, T = cfg->ctx;
    const size_t BT = (size_t)B * T, na = aux->n_params, np = p->n_params;
    const kvp_corpus_stream_t *train = kvp_corpus_stream(c, KVP_SPLIT_TRAIN);
    const kvp_corpus_stream_t *val = kvp_corpus_stream(c, KVP_SPLIT_VAL);
    const bool can_eval = val->n >= 2;
    const double train_tok_per_byte = train->bytes ? (double)train->n / (double)train->bytes : 1.0;
    r.warmup = kvp_trainutil_warmup(cfg);
    kvp_rng_seed(&r.rng, cfg->seed);
    kvp_model_fingerprint(aux, r.aux_start);
    kvp_model_fingerprint(base, r.base_fp);
    r.pred_start = pred_hash(p);

    kvp_kvptrain_ctx_t *x = NULL;
    float *ga = calloc(na, sizeof *ga), *gp = calloc(np, sizeof *gp);
    int32_t *tokens = malloc(BT * sizeof *tokens), *targets = malloc(BT * sizeof *targets);
    uint32_t *tb = kvp_trainutil_token_bytes_new(cfg->tok, aux->cfg.n_vocab);
    FILE *log = NULL;
    if (!ga || !gp || !tokens || !targets || !tb)
        rc = kvp_err_set(err, KVP_ENOMEM, "KV-prediction training: out of memory");
    if (!rc) rc = kvp_adamw_new(&r.opt_a, na, &cfg->adamw, err);
    if (!rc) rc = kvp_adamw_new(&r.opt_p, np, &cfg->adamw, err);
    if (!rc) set_decay_masks(&r);
    if (!rc && cfg->resume && access(cfg->ckpt_path, F_OK) == 0) {
        rc = load_ckpt(&r, err);
        res->resumed = rc == 0;
    }
    r.t0 = kvp_now();
    if (!rc) rc = kvp_kvptrain_ctx_new(&x, aux, base, p, B, T, w, err);
    if (!rc)
        rc = kvp_trainutil_session_open(cfg, CSV_HEADER, res->resumed, r.step, &log, &r.prog, err);
    /* where the run starts from: the base on the predicted cache before training */
    if (!rc && can_eval && r.step == 0 && !r.have_before) {
        rc =
            evaluate(x, val, tb, (uint64_t)cfg->final_eval_tokens, tokens, targets, &r.before, err);
        if (!rc) {
            r.have_before = true;
            kvp_progress_message(r.prog,
                                 "before: base on predicted cache %.4f bpb (own cache %.4f), aux "
                                 "%.4f bpb, K/V L1 %.4f",
                                 r.before.base_pred.bpb, r.before.base_own.bpb, r.before.aux.bpb,
                                 r.before.kv);
            if (log) {
                fprintf(log, "0,0,,,,,,,");
                log_val(log, &r.before);
                fprintf(log, ",,%.2f\n", r.elapsed_before + (kvp_now() - r.t0));
                fflush(log);
            }
        }
    }

    const int start_step = r.step;
    const double t_train0 = kvp_now();
    bool stopped = false;
    while (!rc && r.step < cfg->steps) {
        if (kvp_trainutil_should_stop(cfg, r.step, start_step, r.t0)) {
            stopped = true;
            break;
        }
        memset(ga, 0, na * sizeof *ga);
        memset(gp, 0, np * sizeof *gp);
        kvp_kvptrain_loss_t sum = {0, 0, 0, 0};
        for (int a = 0; !rc && a < cfg->accum; a++) {
            kvp_kvptrain_loss_t l;
            rc = kvp_corpus_sample(train, &r.rng, B, T, tokens, targets, err);
            if (!rc) rc = kvp_kvptrain_forward(x, tokens, targets, &l, err);
            if (!rc) rc = kvp_kvptrain_backward(x, ga, gp, 1.0f / (float)cfg->accum, err);
            if (rc) break;
            sum.total += l.total, sum.base += l.base, sum.aux += l.aux, sum.kv += l.kv;
        }
        if (rc) break;
        r.loss = (kvp_kvptrain_loss_t){sum.total / cfg->accum, sum.base / cfg->accum,
                                       sum.aux / cfg->accum, sum.kv / cfg->accum};
        if (!isfinite(r.loss.total)) {
            rc = kvp_err_set(err, KVP_ERANGE,
                             "KV-prediction training: the loss became %g at step %d (try a lower "
                             "--lr)",
                             r.loss.total, r.step + 1);
            break;
        }
        double gnorm = clip_joint(ga, na, gp, np, cfg->clip);
        float lr = kvp_lr_at(r.step, r.warmup, cfg->steps, cfg->lr, cfg->min_lr);
        kvp_adamw_step(r.opt_a, aux->params, ga, lr);
        kvp_adamw_step(r.opt_p, p->params, gp, lr);
        r.step++;
        r.tokens += BT * (uint64_t)cfg->accum;

        bool new_val = false;
        uint64_t cap;
        if (can_eval && kvp_trainutil_eval_due(cfg, r.step, &cap)) {
            rc = evaluate(x, val, tb, cap, tokens, targets, &r.val, err);
            if (rc) break;
            r.have_val = new_val = true;
        }
        double session = kvp_now() - r.t0, trained = kvp_now() - t_train0;
        double tps = kvp_trainutil_tok_per_s(r.step - start_step, BT, cfg->accum, trained);
        double eta = kvp_trainutil_eta(r.step - start_step, cfg->steps - r.step, trained);
        double base_bpb = r.loss.base / LN2 * train_tok_per_byte;
        if (log) {
            fprintf(log, "%d,%" PRIu64 ",%.6g,%.6f,%.6f,%.6f,%.6f,%.6g,", r.step, r.tokens, lr,
                    r.loss.total, r.loss.base, r.loss.aux, r.loss.kv, gnorm);
            if (new_val)
                log_val(log, &r.val);
            else
                fprintf(log, ",,");
            fprintf(log, ",%.1f,%.2f\n", tps, r.elapsed_before + session);
            fflush(log);
        }
        kvp_progress_info_t pi = {.step = r.step,
                                  .total = cfg->steps,
                                  .loss_bpb = base_bpb,
                                  .val_bpb = r.have_val ? r.val.base_pred.bpb : NAN,
                                  .tok_per_s = tps,
                                  .eta_s = eta,
                                  .new_val = new_val};
        kvp_progress_update(r.prog, &pi);
        if (kvp_trainutil_ckpt_due(cfg, r.step)) rc = save_ckpt(&r, err);
    }
    /* a checkpoint at the end, or where the run stopped */
    if (!rc && cfg->ckpt_path && (r.step > start_step || stopped)) rc = save_ckpt(&r, err);
    if (!rc && stopped) kvp_trainutil_stopped_message(r.prog, cfg, r.step);

    double session = kvp_now() - r.t0, trained = kvp_now() - t_train0;
    res->step = r.step;
    res->completed = r.step == cfg->steps;
    res->loss = r.loss;
    res->have_before = r.have_before;
    res->before = r.before;
    res->have_val = r.have_val;
    res->val = r.val;
    res->tokens = r.tokens;
    res->tok_per_s = kvp_trainutil_tok_per_s(r.step - start_step, BT, cfg->accum, trained);
    res->elapsed_s = r.elapsed_before + session;

    kvp_progress_free(&r.prog);
    if (log) fclose(log);
    kvp_kvptrain_ctx_free(&x);
    kvp_adamw_free(&r.opt_a);
    kvp_adamw_free(&r.opt_p);
    free(ga);
    free(gp);
    free(tokens);
    free(targets);
    free(tb);
    return rc;
}

/* ---- output ------------------------------------------------------------------ */

int kvp_kvptrain_save_aux(const kvp_model_t *aux, const char *path, const kvp_gguf_t *vocab_from,
                          const kvp_trainer_config_t *cfg, const kvp_kvptrain_weights_t *w,
                          const kvp_kvptrain_result_t *res, const char *command, kvp_err_t *err) {
    kvp_gguf_writer_t *wr = kvp_gguf_writer_new();
    if (!wr) return kvp_err_set(err, KVP_ENOMEM, "out of memory");
    int rc = kvp_model_to_gguf(aux, wr, KVP_GGML_F32, err);
    if (!rc && vocab_from) {
        for (uint64_t i = 0; !rc && i < kvp_gguf_n_kv(vocab_from); i++) {
            const kvp_gguf_kv_t *kv = kvp_gguf_kv_at(vocab_from, i);
            if (kv->key.len > 10 && !memcmp(kv->key.ptr, "tokenizer.", 10) &&
                kvp_gguf_writer_copy_kv(wr, kv))
                rc = kvp_err_set(err, KVP_ENOMEM, "out of memory");
        }
    } else if (!rc) {
        rc = kvp_tokenizer_write_bytelevel(wr, NULL, 0, err);
    }
    int bad = 0;
    if (!rc)
        bad |= kvp_gguf_writer_set_str(wr, "general.name", "kvpred auxiliary model (KVP-trained)");
    if (!rc && cfg && w && res) {
        bad |= kvp_gguf_writer_set_u32(wr, "kvpred.kvptrain.step", (uint32_t)res->step);
        bad |= kvp_gguf_writer_set_u32(wr, "kvpred.kvptrain.steps", (uint32_t)cfg->steps);
        bad |= kvp_gguf_writer_set_u32(wr, "kvpred.kvptrain.batch", (uint32_t)cfg->batch);
        bad |= kvp_gguf_writer_set_u32(wr, "kvpred.kvptrain.ctx", (uint32_t)cfg->ctx);
        bad |= kvp_gguf_writer_set_u32(wr, "kvpred.kvptrain.accum", (uint32_t)cfg->accum);
        bad |= kvp_gguf_writer_set_u64(wr, "kvpred.kvptrain.seed", cfg->seed);
        bad |= kvp_gguf_writer_set_u64(wr, "kvpred.kvptrain.tokens", res->tokens);
        bad |= kvp_gguf_writer_set_f32(wr, "kvpred.kvptrain.lr", cfg->lr);
        bad |= kvp_gguf_writer_set_f32(wr, "kvpred.kvptrain.base_w", w->base_w);
        bad |= kvp_gguf_writer_set_f32(wr, "kvpred.kvptrain.aux_w", w->aux_w);
        bad |= kvp_gguf_writer_set_f32(wr, "kvpred.kvptrain.kv_w", w->kv_w);
        bad |= kvp_gguf_writer_set_f32(wr, "kvpred.kvptrain.loss", (float)res->loss.total);
        if (res->have_val) {
            bad |= kvp_gguf_writer_set_f32(wr, "kvpred.kvptrain.val_base_pred_bpb",
                                           (float)res->val.base_pred.bpb);
            bad |=
                kvp_gguf_writer_set_f32(wr, "kvpred.kvptrain.val_aux_bpb", (float)res->val.aux.bpb);
        }
        if (res->have_before) {
            bad |= kvp_gguf_writer_set_f32(wr, "kvpred.kvptrain.before_base_pred_bpb",
                                           (float)res->before.base_pred.bpb);
            bad |= kvp_gguf_writer_set_f32(wr, "kvpred.kvptrain.before_aux_bpb",
                                           (float)res->before.aux.bpb);
        }
        bad |= kvp_gguf_writer_set_f32(wr, "kvpred.kvptrain.seconds", (float)res->elapsed_s);
    }
    if (!rc && command) bad |= kvp_gguf_writer_set_str(wr, "kvpred.kvptrain.command", command);
    if (!rc && bad) rc = kvp_err_set(err, KVP_ENOMEM, "out of memory");
    if (!rc) rc = kvp_gguf_writer_write(wr, path, err);
    kvp_gguf_writer_free(&wr);
    return rc;
}

int kvp_kvptrain_save_predictor(const kvp_predictor_t *p, const kvp_model_t *aux,
                                const kvp_model_t *base, const char *path, kvp_err_t *err) {
    /* a fresh copy: the ridge fit's record of a closed-form start no longer
     * describes these weights */
    kvp_predictor_t *q = NULL;
    int rc = kvp_predictor_new(&q, p->aux, p->base, p->layer_map, err);
    if (rc) return rc;
    memcpy(q->params, p->params, sizeof(float) * p->n_params);
    rc = kvp_predictor_bind(q, aux, base, err);
    if (!rc) rc = kvp_predictor_save(q, path, err);
    kvp_predictor_free(&q);
    return rc;
}
