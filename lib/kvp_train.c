/* kvp_train: forward and backward passes for training (see kvp_train.h).
 *
 * The forward pass is kvp_model.c's block_forward run over B*T rows at once
 * (every sequence at positions 0..T-1, attention causal within a sequence),
 * with each activation the backward pass needs kept per layer. The backward
 * pass walks the same steps in reverse; each *_backward function below sits
 * next to the forward step it differentiates.
 *
 * Speed: every projection is one sgemm over all B*T rows, forward and both
 * backward products (dX = dY W, dW += dY^T X). Attention runs per
 * (sequence, head) and per tile of query rows, so a tile multiplies
 * only against the keys it can see; its probabilities are not stored but
 * recomputed in the backward pass (one extra QK^T product), which keeps
 * memory at O(T) per row instead of O(T^2) per head and layer. */
#include "kvp_train.h"

#include <cblas.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_ops.h"

/* Attention works on tiles of query rows. OpenBLAS runs an sgemm with
 * M*N*K <= 2^18 on the calling thread and splits bigger ones over its
 * threads, whose hand-off costs more than these small products gain
 * (64x256x32 measured 22 us on two threads, 14 us on one). Tiles are sized so
 * that rows * T * head_dim stays under that threshold, within these bounds: */
enum { ATT_TILE_MIN = 16, ATT_TILE_MAX = 128, ATT_SGEMM_SERIAL = 1 << 18 };

struct kvp_train_ctx {
    const kvp_model_t *m;
    int B, T, N; /* N = B*T rows */
    int tile;    /* query rows per attention tile */
    float zloss;
    const float **ext_k, **ext_v; /* [n_layer]: external un-rotated K and V, or NULL */
    const float **fwd_k, **fwd_v; /* [n_layer]: ext_k/ext_v as the last forward used them */
    const float **add_k, **add_v; /* [n_layer]: extra d loss / d own K (un-rotated), V, or NULL */
    bool have_loss;               /* a forward with targets ran: backward may follow */
    bool have_probs;              /* d_logits holds the softmax of logits (until a backward) */
    int n_scored;
    int32_t *tokens, *targets; /* [N] copies of the last forward's input */

    /* activations of the last forward (per-layer arrays are [n_layer][N][..]) */
    float *rope_cs; /* [T][rope_dim] cos/sin of each position */
    float *res;     /* [n_layer + 1][N][E]: residual stream entering each layer; last = final */
    float *res_mid; /* [n_layer][N][E]: residual stream after attention */
    float *xn_att;  /* [n_layer][N][E]: attention RMSNorm output */
    float *q_rot;   /* [n_layer][N][nq]: rotated queries */
    float *k_true;  /* [n_layer][N][nkv]: the projection's un-rotated keys */
    float *v_true;  /* [n_layer][N][nkv]: the projection's values */
    float *k_rot;   /* [n_layer][N][nkv]: rotated keys the attention used */
    float *att;     /* [n_layer][N][nq]: attention output (before wo) */
    float *xn_ffn;  /* [n_layer][N][E]: FFN RMSNorm output */
    float *gu;      /* [n_layer][N][2F]: gate and up projections */
    float *ffh;     /* [n_layer][N][F]: SwiGLU output */
    float *xn_out;  /* [N][E]: final RMSNorm output */
    float *logits;  /* [N][V] */
    float *lse;     /* [N]: logsumexp of each row of logits */

    /* gradients of activations, reused by every layer */
    float *d_logits; /* [N][V]: softmax of logits after a forward, then d logits */
    float *d_res;    /* [N][E] d loss / d residual stream */
    float *d_xn;     /* [N][E] */
    float *d_att;    /* [N][nq] */
    float *d_qkv;    /* [N][nq + 2*nkv]; also the forward's QKV projection output */
    float *d_gu;     /* [N][2F] */
    float *d_ffh;    /* [N][F] */
    float *kv_grad;  /* [n_layer][2][N][nkv]: d loss / d external K (un-rotated) and V */
    float *scratch;  /* [2][tile][T]: attention probabilities and their gradient */
    float *arena;    /* one allocation holding every buffer above */
};

/* ---- construction ------------------------------------------------------ */

int kvp_train_ctx_new(kvp_train_ctx_t **out, const kvp_model_t *m, int B, int T, kvp_err_t *err) {
    *out = NULL;
    const kvp_model_config_t *c = &m->cfg;
    if (B <= 0 || T <= 0 || (int64_t)B * T > (1 << 24))
        return kvp_err_set(err, KVP_EINVAL,
                           "train context: batch %d x %d tokens must be positive and at most "
                           "2^24 tokens",
                           B, T);
    kvp_train_ctx_t *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return kvp_err_set(err, KVP_ENOMEM, "train context: out of memory");
    ctx->m = m;
    ctx->B = B;
    ctx->T = T;
    ctx->N = B * T;
    const size_t N = (size_t)ctx->N, E = c->n_embd, nq = (size_t)c->n_head * c->head_dim,
                 nkv = (size_t)c->n_kv_head * c->head_dim, F = c->n_ff, V = c->n_vocab,
                 L = c->n_layer;
    int64_t tile = ATT_SGEMM_SERIAL / ((int64_t)T * c->head_dim);
    tile = tile < ATT_TILE_MIN ? ATT_TILE_MIN : (tile > ATT_TILE_MAX ? ATT_TILE_MAX : tile);
    ctx->tile = tile < T ? (int)tile : T;
    struct {
        float **p;
        size_t n;
    } bufs[] = {
        {&ctx->rope_cs, (size_t)T * c->rope_dim},
        {&ctx->res, (L + 1) * N * E},
        {&ctx->res_mid, L * N * E},
        {&ctx->xn_att, L * N * E},
        {&ctx->q_rot, L * N * nq},
        {&ctx->k_true, L * N * nkv},
        {&ctx->v_true, L * N * nkv},
        {&ctx->k_rot, L * N * nkv},
        {&ctx->att, L * N * nq},
        {&ctx->xn_ffn, L * N * E},
        {&ctx->gu, L * N * 2 * F},
        {&ctx->ffh, L * N * F},
        {&ctx->xn_out, N * E},
        {&ctx->logits, N * V},
        {&ctx->lse, N},
        {&ctx->d_logits, N * V},
        {&ctx->d_res, N * E},
        {&ctx->d_xn, N * E},
        {&ctx->d_att, N * nq},
        {&ctx->d_qkv, N * (nq + 2 * nkv)},
        {&ctx->d_gu, N * 2 * F},
        {&ctx->d_ffh, N * F},
        {&ctx->kv_grad, L * 2 * N * nkv},
        {&ctx->scratch, 2 * (size_t)ctx->tile * T},
    };
    size_t total = 0;
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        total += (bufs[i].n + 15) & ~(size_t)15; /* 64-byte aligned starts */
    ctx->arena = aligned_alloc(64, sizeof(float) * total);
    ctx->ext_k = calloc(L, sizeof *ctx->ext_k);
    ctx->ext_v = calloc(L, sizeof *ctx->ext_v);
    ctx->fwd_k = calloc(L, sizeof *ctx->fwd_k);
    ctx->fwd_v = calloc(L, sizeof *ctx->fwd_v);
    ctx->add_k = calloc(L, sizeof *ctx->add_k);
    ctx->add_v = calloc(L, sizeof *ctx->add_v);
    ctx->tokens = malloc(sizeof(int32_t) * N);
    ctx->targets = malloc(sizeof(int32_t) * N);
    if (!ctx->arena || !ctx->ext_k || !ctx->ext_v || !ctx->fwd_k || !ctx->fwd_v || !ctx->add_k ||
        !ctx->add_v || !ctx->tokens || !ctx->targets) {
        kvp_train_ctx_free(&ctx);
        return kvp_err_set(err, KVP_ENOMEM, "train context: cannot allocate %zu MiB",
                           (sizeof(float) * total) >> 20);
    }
    /* zeroed so that kv_grad of layers never run with external K/V reads as 0 */
    memset(ctx->arena, 0, sizeof(float) * total);
    float *p = ctx->arena;
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        *bufs[i].p = p;
        p += (bufs[i].n + 15) & ~(size_t)15;
    }
    for (int t = 0; t < T; t++)
        kvp_rope_table(ctx->rope_cs + (size_t)t * c->rope_dim, c->rope_dim, t, m->inv_freq);
    *out = ctx;
    return KVP_OK;
}

void kvp_train_ctx_free(kvp_train_ctx_t **ctx) {
    if (!ctx || !*ctx) return;
    kvp_train_ctx_t *c = *ctx;
    free(c->arena);
    free(c->ext_k);
    free(c->ext_v);
    free(c->fwd_k);
    free(c->fwd_v);
    free(c->add_k);
    free(c->add_v);
    free(c->tokens);
    free(c->targets);
    free(c);
    *ctx = NULL;
}

void kvp_train_set_zloss(kvp_train_ctx_t *ctx, float z) {
    ctx->zloss = z;
}

void kvp_train_set_external_kv(kvp_train_ctx_t *ctx, int layer, const float *k_unrot,
                               const float *v) {
    if (layer < 0 || layer >= ctx->m->cfg.n_layer) return;
    /* both or neither: a layer reads K and V from the same place */
    bool ext = k_unrot && v;
    ctx->ext_k[layer] = ext ? k_unrot : NULL;
    ctx->ext_v[layer] = ext ? v : NULL;
}

void kvp_train_set_kv_grad(kvp_train_ctx_t *ctx, int layer, const float *dk_unrot,
                           const float *dv) {
    if (layer < 0 || layer >= ctx->m->cfg.n_layer) return;
    bool on = dk_unrot && dv;
    ctx->add_k[layer] = on ? dk_unrot : NULL;
    ctx->add_v[layer] = on ? dv : NULL;
}

/* ---- operators and their backward passes ------------------------------- */

/* y[n][n_out] = x[n][n_in] w[n_out][n_in]^T. Backward: dx = dy w (dx
 * overwritten) and dw += dy^T x (skipped when dw is NULL: a frozen model),
 * each one sgemm over all n rows; dy rows are ld_dy floats apart (the Q part
 * of the QKV gradient is a column block). */
static void matmul_backward(float *dx, float *dw, const float *dy, int ld_dy, const float *x,
                            const float *w, int n, int n_in, int n_out) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n_in, n_out, 1.0f, dy, ld_dy, w, n_in,
                0.0f, dx, n_in);
    if (!dw) return;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n_out, n_in, n, 1.0f, dy, ld_dy, x, n_in,
                1.0f, dw, n_in);
}

/* y = x * r * w with r = 1/sqrt(mean(x^2) + eps) per row (kvp_rmsnorm).
 * Backward: with g = dy * w, dx += r * (g - x r^2 mean(g x)) and
 * dw += sum over rows of dy * x * r (dw NULL: skipped). r is recomputed
 * from x exactly as the forward computed it. */
static void rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                             int n_rows, int n, float eps) {
    for (int r = 0; r < n_rows; r++) {
        const float *xr = x + (size_t)r * n, *dyr = dy + (size_t)r * n;
        float *dxr = dx + (size_t)r * n;
        float ss = 0.0f, dot = 0.0f;
        for (int i = 0; i < n; i++) {
            ss += xr[i] * xr[i];
            dot += dyr[i] * w[i] * xr[i];
        }
        float rs = 1.0f / sqrtf(ss / (float)n + eps);
        float c = rs * rs * rs * dot / (float)n;
        for (int i = 0; i < n; i++)
            dxr[i] += rs * dyr[i] * w[i] - c * xr[i];
        if (dw)
            for (int i = 0; i < n; i++)
                dw[i] += dyr[i] * xr[i] * rs;
    }
}

/* h = silu(g) * u (kvp_swiglu) with gate and up side by side in gu rows of
 * 2n. Backward: dg = dh u silu'(g), du = dh silu(g), where
 * silu'(g) = s (1 + g (1 - s)) and s = sigmoid(g). */
static void swiglu_backward(float *dgu, const float *dh, const float *gu, int n_rows, int n) {
    for (int r = 0; r < n_rows; r++) {
        const float *g = gu + (size_t)r * 2 * n, *u = g + n, *d = dh + (size_t)r * n;
        float *dg = dgu + (size_t)r * 2 * n, *du = dg + n;
        for (int i = 0; i < n; i++) {
            float s = 1.0f / (1.0f + kvp_expf(-g[i]));
            dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
            du[i] = d[i] * g[i] * s;
        }
    }
}

/* RoPE of n_rows token rows (ld floats apart, n_head heads at the start of
 * each row), row t at position t % T (sequences of T back to back). The rotation is
 * orthogonal, so its backward is the rotation by the opposite angle
 * (sign -1). */
static void rope_rows(const kvp_train_ctx_t *ctx, float *x, int ld, int n_head, int n_rows,
                      float sign) {
    const kvp_model_config_t *c = &ctx->m->cfg;
    for (int t = 0; t < n_rows; t++)
        kvp_rope_apply(x + (size_t)t * ld, n_head, c->head_dim, c->rope_dim,
                       ctx->rope_cs + (size_t)(t % ctx->T) * c->rope_dim, sign);
}

/* Attention probabilities p[rows][n_ctx] of query rows t0..t0+rows-1 of one
 * (sequence, head) over keys 0..n_ctx-1 (n_ctx = t0 + rows): scaled scores,
 * softmax over the causally visible positions, zeros beyond them — the same
 * function as kvp_attention. */
static void attention_probs(float *p, const float *q, int ld_q, const float *k, int ld_k, int t0,
                            int rows, int head_dim) {
    const int n_ctx = t0 + rows;
    const float scale = 1.0f / sqrtf((float)head_dim);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n_ctx, head_dim, scale, q, ld_q, k,
                ld_k, 0.0f, p, n_ctx);
    for (int r = 0; r < rows; r++) {
        float *s = p + (size_t)r * n_ctx;
        int seen = t0 + r + 1;
        kvp_softmax(s, seen);
        memset(s + seen, 0, sizeof(float) * (size_t)(n_ctx - seen));
    }
}

/* Causal GQA attention of layer l over every (sequence, head):
 * att = softmax(Q K^T / sqrt(hd)) V, query head h reading kv head h/group. */
static void attention_forward(kvp_train_ctx_t *ctx, int l, const float *v) {
    const kvp_model_config_t *c = &ctx->m->cfg;
    const int T = ctx->T, hd = c->head_dim, nq = c->n_head * hd, nkv = c->n_kv_head * hd;
    const int group = c->n_head / c->n_kv_head, tile = ctx->tile;
    const size_t N = (size_t)ctx->N;
    const float *q = ctx->q_rot + l * N * nq, *k = ctx->k_rot + l * N * nkv;
    float *out = ctx->att + l * N * nq, *p = ctx->scratch;
    for (int b = 0; b < ctx->B; b++)
        for (int h = 0; h < c->n_head; h++) {
            const size_t kv_off = (size_t)b * T * nkv + (size_t)(h / group) * hd;
            for (int t0 = 0; t0 < T; t0 += tile) {
                int rows = T - t0 < tile ? T - t0 : tile, n_ctx = t0 + rows;
                size_t q_off = ((size_t)b * T + t0) * nq + (size_t)h * hd;
                attention_probs(p, q + q_off, nq, k + kv_off, nkv, t0, rows, hd);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, n_ctx, 1.0f, p,
                            n_ctx, v + kv_off, nkv, 0.0f, out + q_off, nq);
            }
        }
}

/* Backward of attention_forward given d_att: per tile, with P recomputed,
 *   dP = dO V^T, dV += P^T dO, dS = P * (dP - rowsum(P * dP)),
 *   dQ = scale dS K, dK += scale dS^T Q.
 * dQ (rotated) goes to dq (rows ld_dq apart); dK (rotated) and dV accumulate
 * into dk and dv (rows ld_dkv apart), which the caller zeroes. */
static void attention_backward(kvp_train_ctx_t *ctx, int l, const float *v, float *dq, int ld_dq,
                               float *dk, float *dv, int ld_dkv) {
    const kvp_model_config_t *c = &ctx->m->cfg;
    const int T = ctx->T, hd = c->head_dim, nq = c->n_head * hd, nkv = c->n_kv_head * hd;
    const int group = c->n_head / c->n_kv_head;
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t N = (size_t)ctx->N;
    const int tile = ctx->tile;
    const float *q = ctx->q_rot + l * N * nq, *k = ctx->k_rot + l * N * nkv, *d_o = ctx->d_att;
    float *p = ctx->scratch, *dp = ctx->scratch + (size_t)tile * T;
    for (int b = 0; b < ctx->B; b++)
        for (int h = 0; h < c->n_head; h++) {
            const int kvh = h / group;
            const size_t kv_off = (size_t)b * T * nkv + (size_t)kvh * hd;
            const size_t dkv_off = (size_t)b * T * ld_dkv + (size_t)kvh * hd;
            for (int t0 = 0; t0 < T; t0 += tile) {
                int rows = T - t0 < tile ? T - t0 : tile, n_ctx = t0 + rows;
                size_t q_off = ((size_t)b * T + t0) * nq + (size_t)h * hd;
                size_t dq_off = ((size_t)b * T + t0) * ld_dq + (size_t)h * hd;
                attention_probs(p, q + q_off, nq, k + kv_off, nkv, t0, rows, hd);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n_ctx, hd, 1.0f,
                            d_o + q_off, nq, v + kv_off, nkv, 0.0f, dp, n_ctx);
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n_ctx, hd, rows, 1.0f, p,
                            n_ctx, d_o + q_off, nq, 1.0f, dv + dkv_off, ld_dkv);
                for (int r = 0; r < rows; r++) {
                    const float *pr = p + (size_t)r * n_ctx;
                    float *dr = dp + (size_t)r * n_ctx;
                    float dot = 0.0f;
                    for (int j = 0; j < n_ctx; j++)
                        dot += pr[j] * dr[j];
                    for (int j = 0; j < n_ctx; j++)
                        dr[j] = pr[j] * (dr[j] - dot);
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, n_ctx, scale, dp,
                            n_ctx, k + kv_off, nkv, 0.0f, dq + dq_off, ld_dq);
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n_ctx, hd, rows, scale, dp,
                            n_ctx, q + q_off, nq, 1.0f, dk + dkv_off, ld_dkv);
            }
        }
}

/* Softmax cross-entropy of each row of logits against its target (< 0: not
 * scored). Keeps each row's logsumexp and softmax (in d_logits: the backward
 * pass turns it into the gradient in place, so the step computes each exp
 * once); returns the number of scored rows and the sums of
 * (lse - logit[target]) and lse^2 over them. */
static int crossentropy_forward(kvp_train_ctx_t *ctx, double *ce, double *lse2) {
    const int V = ctx->m->cfg.n_vocab;
    int n_scored = 0;
    *ce = *lse2 = 0.0;
    for (int i = 0; i < ctx->N; i++) {
        const float *lg = ctx->logits + (size_t)i * V;
        float *p = ctx->d_logits + (size_t)i * V;
        float mx = -INFINITY, sum = 0.0f;
        for (int j = 0; j < V; j++)
            mx = lg[j] > mx ? lg[j] : mx;
        for (int j = 0; j < V; j++)
            p[j] = kvp_expf(lg[j] - mx);
        for (int j = 0; j < V; j++)
            sum += p[j];
        const float inv = 1.0f / sum, lse = mx + logf(sum);
        for (int j = 0; j < V; j++)
            p[j] *= inv;
        ctx->lse[i] = lse;
        int tgt = ctx->targets[i];
        if (tgt >= 0) {
            *ce += (double)lse - (double)lg[tgt];
            *lse2 += (double)lse * lse;
            n_scored++;
        }
    }
    ctx->have_probs = true;
    return n_scored;
}

/* d loss / d logits, over the softmax p in d_logits: for a scored row
 * c (p (1 + 2 z lse) - onehot(target)), since d lse / d logits = p, with
 * c = scale / n_scored (the mean and the caller's scale); unscored rows get
 * 0. A second backward of the same forward first recomputes p from the
 * logits. */
static void crossentropy_backward(kvp_train_ctx_t *ctx, float scale) {
    const int V = ctx->m->cfg.n_vocab;
    const float cf = ctx->n_scored ? scale / (float)ctx->n_scored : 0.0f;
    for (int i = 0; i < ctx->N; i++) {
        float *d = ctx->d_logits + (size_t)i * V;
        int tgt = ctx->targets[i];
        if (tgt < 0) {
            memset(d, 0, sizeof(float) * V);
            continue;
        }
        const float lse = ctx->lse[i], a = cf * (1.0f + 2.0f * ctx->zloss * lse);
        if (!ctx->have_probs) {
            const float *lg = ctx->logits + (size_t)i * V;
            for (int j = 0; j < V; j++)
                d[j] = kvp_expf(lg[j] - lse);
        }
        for (int j = 0; j < V; j++)
            d[j] *= a;
        d[tgt] -= cf;
    }
    ctx->have_probs = false;
}

static void add_rows(float *y, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        y[i] = a[i] + b[i];
}

/* ---- forward ------------------------------------------------------------ */

/* One block over all N rows, as kvp_model.c's block_forward: */
static void block_forward(kvp_train_ctx_t *ctx, int l) {
    const kvp_model_t *m = ctx->m;
    const kvp_model_config_t *c = &m->cfg;
    const kvp_layer_t *L = &m->layers[l];
    const int N = ctx->N, E = c->n_embd, F = c->n_ff, nq = c->n_head * c->head_dim,
              nkv = c->n_kv_head * c->head_dim, ld_qkv = nq + 2 * nkv;
    const size_t lN = (size_t)l * N;
    const float *x = ctx->res + lN * E;
    float *xn = ctx->xn_att + lN * E, *q = ctx->q_rot + lN * nq, *kt = ctx->k_true + lN * nkv,
          *vt = ctx->v_true + lN * nkv, *kr = ctx->k_rot + lN * nkv, *qkv = ctx->d_qkv;

    /* attention: RMSNorm, fused QKV, RoPE on q and k, attention, wo, residual */
    kvp_rmsnorm(xn, x, L->attn_norm, N, E, c->norm_eps);
    kvp_matmul(qkv, xn, L->wqkv, N, E, ld_qkv);
    for (int t = 0; t < N; t++) {
        const float *row = qkv + (size_t)t * ld_qkv;
        memcpy(q + (size_t)t * nq, row, sizeof(float) * nq);
        memcpy(kt + (size_t)t * nkv, row + nq, sizeof(float) * nkv);
        memcpy(vt + (size_t)t * nkv, row + nq + nkv, sizeof(float) * nkv);
    }
    const float *k_src = ctx->fwd_k[l] ? ctx->fwd_k[l] : kt;
    const float *v_src = ctx->fwd_v[l] ? ctx->fwd_v[l] : vt;
    memcpy(kr, k_src, sizeof(float) * N * nkv);
    rope_rows(ctx, q, nq, c->n_head, N, 1.0f);
    rope_rows(ctx, kr, nkv, c->n_kv_head, N, 1.0f);
    attention_forward(ctx, l, v_src);
    float *proj = ctx->d_xn, *mid = ctx->res_mid + lN * E;
    kvp_matmul(proj, ctx->att + lN * nq, L->wo, N, nq, E);
    add_rows(mid, x, proj, (size_t)N * E);

    /* FFN: RMSNorm, fused gate/up, SwiGLU, down, residual */
    float *xf = ctx->xn_ffn + lN * E, *gu = ctx->gu + lN * 2 * F, *h = ctx->ffh + lN * F;
    kvp_rmsnorm(xf, mid, L->ffn_norm, N, E, c->norm_eps);
    kvp_matmul(gu, xf, L->w_gate_up, N, E, 2 * F);
    kvp_swiglu(h, F, gu, gu + F, 2 * F, N, F);
    kvp_matmul(proj, h, L->w_down, N, F, E);
    add_rows(ctx->res + (lN + N) * E, mid, proj, (size_t)N * E);
}

int kvp_train_forward(kvp_train_ctx_t *ctx, const int32_t *tokens, const int32_t *targets,
                      float *loss, kvp_err_t *err) {
    const kvp_model_t *m = ctx->m;
    const kvp_model_config_t *c = &m->cfg;
    const int N = ctx->N, E = c->n_embd, V = c->n_vocab;
    ctx->have_loss = ctx->have_probs = false;
    for (int i = 0; i < N; i++) {
        if (tokens[i] < 0 || tokens[i] >= V)
            return kvp_err_set(err, KVP_ERANGE,
                               "train forward: token %d (id %d) outside vocab of %d", i, tokens[i],
                               V);
        if (targets && (targets[i] < -1 || targets[i] >= V))
            return kvp_err_set(err, KVP_ERANGE,
                               "train forward: target %d (id %d) outside vocab of %d (-1 = not "
                               "scored)",
                               i, targets[i], V);
    }
    memcpy(ctx->tokens, tokens, sizeof(int32_t) * N);
    /* the backward pass differentiates what this forward computed, even if
     * the caller switches external K/V in between */
    memcpy(ctx->fwd_k, ctx->ext_k, sizeof(*ctx->ext_k) * c->n_layer);
    memcpy(ctx->fwd_v, ctx->ext_v, sizeof(*ctx->ext_v) * c->n_layer);
    for (int i = 0; i < N; i++) {
        ctx->targets[i] = targets ? targets[i] : -1;
        memcpy(ctx->res + (size_t)i * E, m->tok_embd + (size_t)tokens[i] * E, sizeof(float) * E);
    }
    for (int l = 0; l < c->n_layer; l++)
        block_forward(ctx, l);
    kvp_rmsnorm(ctx->xn_out, ctx->res + (size_t)c->n_layer * N * E, m->output_norm, N, E,
                c->norm_eps);
    kvp_matmul(ctx->logits, ctx->xn_out, m->output, N, E, V);
    if (!targets) {
        if (loss) *loss = 0.0f;
        return KVP_OK;
    }
    double ce, lse2;
    ctx->n_scored = crossentropy_forward(ctx, &ce, &lse2);
    ctx->have_loss = true;
    if (loss) *loss = ctx->n_scored ? (float)((ce + ctx->zloss * lse2) / ctx->n_scored) : 0.0f;
    return KVP_OK;
}

/* ---- backward ----------------------------------------------------------- */

static void block_backward(kvp_train_ctx_t *ctx, int l, float *grads) {
    const kvp_model_t *m = ctx->m;
    const kvp_model_config_t *c = &m->cfg;
    const kvp_layer_t *L = &m->layers[l];
    const int N = ctx->N, E = c->n_embd, F = c->n_ff, nq = c->n_head * c->head_dim,
              nkv = c->n_kv_head * c->head_dim, ld_qkv = nq + 2 * nkv;
    const size_t lN = (size_t)l * N;
#define G(ptr) (grads ? grads + ((ptr)-m->params) : NULL)
    float *d_res = ctx->d_res, *d_xn = ctx->d_xn;

    /* FFN, in reverse: down, SwiGLU, gate/up, RMSNorm (+= into the residual) */
    matmul_backward(ctx->d_ffh, G(L->w_down), d_res, E, ctx->ffh + lN * F, L->w_down, N, F, E);
    swiglu_backward(ctx->d_gu, ctx->d_ffh, ctx->gu + lN * 2 * F, N, F);
    matmul_backward(d_xn, G(L->w_gate_up), ctx->d_gu, 2 * F, ctx->xn_ffn + lN * E, L->w_gate_up, N,
                    E, 2 * F);
    rmsnorm_backward(d_res, G(L->ffn_norm), d_xn, ctx->res_mid + lN * E, L->ffn_norm, N, E,
                     c->norm_eps);

    /* attention, in reverse: wo, attention, RoPE, QKV, RMSNorm */
    matmul_backward(ctx->d_att, G(L->wo), d_res, E, ctx->att + lN * nq, L->wo, N, nq, E);
    const bool ext = ctx->fwd_k[l] != NULL;
    const float *v_src = ext ? ctx->fwd_v[l] : ctx->v_true + lN * nkv;
    float *dq = ctx->d_qkv, *dk, *dv;
    int ld_dkv;
    if (ext) {
        dk = ctx->kv_grad + lN * 2 * nkv;
        dv = dk + (size_t)N * nkv;
        ld_dkv = nkv;
        memset(dk, 0, sizeof(float) * 2 * N * nkv);
    } else {
        dk = ctx->d_qkv + nq;
        dv = dk + nkv;
        ld_dkv = ld_qkv;
        for (int t = 0; t < N; t++)
            memset(dk + (size_t)t * ld_qkv, 0, sizeof(float) * 2 * nkv);
    }
    attention_backward(ctx, l, v_src, dq, ld_qkv, dk, dv, ld_dkv);
    rope_rows(ctx, dq, ld_qkv, c->n_head, N, -1.0f);
    rope_rows(ctx, dk, ld_dkv, c->n_kv_head, N, -1.0f);
    /* a gradient from outside on the projections' own K/V (kvp_train_set_kv_grad)
     * joins attention's; with external K/V it is their only one */
    const float *xk = ctx->add_k[l], *xv = ctx->add_v[l];
    if (xk)
        for (int t = 0; t < N; t++) {
            float *row = ctx->d_qkv + (size_t)t * ld_qkv + nq;
            const float *gk = xk + (size_t)t * nkv, *gv = xv + (size_t)t * nkv;
            if (ext) {
                memcpy(row, gk, sizeof(float) * nkv);
                memcpy(row + nkv, gv, sizeof(float) * nkv);
            } else {
                for (int j = 0; j < nkv; j++) {
                    row[j] += gk[j];
                    row[nkv + j] += gv[j];
                }
            }
        }
    /* with external K/V (and nothing from outside) only the Q rows of wqkv
     * see a gradient */
    matmul_backward(d_xn, G(L->wqkv), ctx->d_qkv, ld_qkv, ctx->xn_att + lN * E, L->wqkv, N, E,
                    ext && !xk ? nq : ld_qkv);
    rmsnorm_backward(d_res, G(L->attn_norm), d_xn, ctx->res + lN * E, L->attn_norm, N, E,
                     c->norm_eps);
#undef G
}

int kvp_train_backward(kvp_train_ctx_t *ctx, float *grads, float scale, kvp_err_t *err) {
    if (!ctx->have_loss)
        return kvp_err_set(err, KVP_EINVAL,
                           "train backward: no loss to differentiate (run kvp_train_forward with "
                           "targets first)");
    const kvp_model_t *m = ctx->m;
    const kvp_model_config_t *c = &m->cfg;
    const int N = ctx->N, E = c->n_embd, V = c->n_vocab;
    crossentropy_backward(ctx, scale);
    float *d_logits = ctx->d_logits;
    /* output head (for tied weights this lands on the embedding rows) */
    matmul_backward(ctx->d_xn, grads ? grads + (m->output - m->params) : NULL, d_logits, V,
                    ctx->xn_out, m->output, N, E, V);
    memset(ctx->d_res, 0, sizeof(float) * N * E);
    rmsnorm_backward(ctx->d_res, grads ? grads + (m->output_norm - m->params) : NULL, ctx->d_xn,
                     ctx->res + (size_t)c->n_layer * N * E, m->output_norm, N, E, c->norm_eps);
    for (int l = c->n_layer - 1; l >= 0; l--)
        block_backward(ctx, l, grads);
    if (!grads) return KVP_OK;
    float *g_embd = grads + (m->tok_embd - m->params);
    for (int i = 0; i < N; i++) {
        float *g = g_embd + (size_t)ctx->tokens[i] * E;
        const float *d = ctx->d_res + (size_t)i * E;
        for (int j = 0; j < E; j++)
            g[j] += d[j];
    }
    return KVP_OK;
}

/* ---- accessors ----------------------------------------------------------- */

static size_t kv_size(const kvp_train_ctx_t *ctx) {
    return (size_t)ctx->N * ctx->m->cfg.n_kv_head * ctx->m->cfg.head_dim;
}

const float *kvp_train_true_k(const kvp_train_ctx_t *ctx, int layer) {
    return ctx->k_true + (size_t)layer * kv_size(ctx);
}

const float *kvp_train_true_v(const kvp_train_ctx_t *ctx, int layer) {
    return ctx->v_true + (size_t)layer * kv_size(ctx);
}

const float *kvp_train_kv_grad_k(const kvp_train_ctx_t *ctx, int layer) {
    return ctx->kv_grad + (size_t)layer * 2 * kv_size(ctx);
}

const float *kvp_train_kv_grad_v(const kvp_train_ctx_t *ctx, int layer) {
    return ctx->kv_grad + ((size_t)layer * 2 + 1) * kv_size(ctx);
}

const float *kvp_train_logits(const kvp_train_ctx_t *ctx) {
    return ctx->logits;
}

/* Per token: 6 FLOPs per weight of every matmul (2 forward, 2 for dX, 2 for
 * dW), i.e. 6 * P_mm with
 *   P_mm = n_layer * (E (nq + 2 nkv) + nq E + 3 E F) + V E
 * (the embedding lookup is no matmul; a tied head counts once, as a matmul).
 * Attention per sequence and layer: forward QK^T and PV are 2 nq FLOPs per
 * (query, visible key) pair each, 4 nq T(T+1)/2 in all with the causal mask;
 * the backward has four such products (dP, dV, dQ, dK), twice the forward.
 *   flops = 6 P_mm B T + 3 * 4 nq T(T+1)/2 * B * n_layer
 * The recomputation of QK^T in the backward and the masked work inside tiles
 * are not counted: this is the useful work, as in the 6N rule. */
double kvp_train_step_flops(const kvp_model_config_t *c, int B, int T) {
    double E = c->n_embd, nq = (double)c->n_head * c->head_dim,
           nkv = (double)c->n_kv_head * c->head_dim, F = c->n_ff, V = c->n_vocab;
    double p_mm = c->n_layer * (E * (nq + 2 * nkv) + nq * E + 3 * E * F) + V * E;
    double tokens = (double)B * T;
    double attn = 3.0 * 4.0 * nq * ((double)T * (T + 1) / 2.0) * B * c->n_layer;
    return 6.0 * p_mm * tokens + attn;
}
