/* kvp_predictor: the KV predictor of KV Prediction (Horton et al. 2024; see
 * ../shared/reference/kv-prediction.md, "The predictor").
 *
 * For every base layer l, two linear maps with bias, token by token:
 *
 *   K_base[l][t] = W_k[l] · K_aux[map[l]][t] + b_k[l]
 *   V_base[l][t] = W_v[l] · V_aux[map[l]][t] + b_v[l]
 *
 * Inputs and outputs are one token's keys (un-rotated, before RoPE) or values
 * with all KV heads concatenated — exactly the token-major rows
 * [n_tok][n_kv_head * head_dim] that kvp_kvcache_read/write speak. W is
 * [d_out][d_in] row-major (d_in = aux n_kv_head*head_dim, d_out = base's).
 * Because each position is mapped on its own, any span [a, b) of the base
 * cache is predicted from the same span of the auxiliary cache: callers may
 * stream chunks in any order.
 *
 * File format (its own GGUF, general.architecture "kvpred-predictor"):
 *   kvpred-predictor.aux.block_count / .aux.head_count_kv / .aux.head_dim
 *   kvpred-predictor.base.block_count / ...            u32
 *   kvpred-predictor.layer_map                         i32[base block_count]
 *   kvpred-predictor.aux_fingerprint / base_fingerprint  string ("" = unbound)
 *   optional fit info: kvpred-predictor.fit.lambda_k / lambda_v (f32[n_base],
 *   relative ridge lambda), .fit.val_rse_k / val_rse_v (f32[n_base], relative
 *   squared error on validation rows), .fit.train_tokens / .fit.val_tokens
 *   tensors blk.N.k_map.weight [ne0 = d_in, ne1 = d_out], blk.N.k_map.bias
 *   [d_out], blk.N.v_map.* likewise; written as F32. */
#ifndef KVP_PREDICTOR_H
#define KVP_PREDICTOR_H

#include <stddef.h>
#include <stdint.h>

#include "kvp_err.h"
#include "kvp_kvcache.h"
#include "kvp_model.h"

#define KVP_PREDICTOR_ARCH "kvpred-predictor"
#define KVP_PREDICTOR_MAX_LAYERS 1024
#define KVP_PREDICTOR_MAX_WIDTH 65536 /* n_kv_head * head_dim */

/* The KV shape of one model: what the predictor reads or writes. */
typedef struct kvp_kv_shape {
    int n_layer, n_kv_head, head_dim;
} kvp_kv_shape_t;

typedef struct kvp_predictor_layer {
    float *k_w, *k_b; /* [d_out][d_in], [d_out]: views into params */
    float *v_w, *v_b;
} kvp_predictor_layer_t;

/* What a ridge fit recorded (kvp_predictor_fit_solve); NULL if never fitted. */
typedef struct kvp_predictor_fitinfo {
    float *lambda_k, *lambda_v;   /* [n_base] chosen lambda, relative to mean diag of X^T X */
    float *val_rse_k, *val_rse_v; /* [n_base] sum sq err / sum sq target on validation rows;
                                     NaN when there were none */
    uint64_t train_tokens, val_tokens;
} kvp_predictor_fitinfo_t;

typedef struct kvp_predictor {
    kvp_kv_shape_t aux, base;
    int d_in, d_out;    /* aux and base n_kv_head * head_dim */
    int32_t *layer_map; /* [base.n_layer]: aux layer feeding base layer l */
    float *params;      /* arena, grouped by aux layer (see below) */
    size_t n_params;
    kvp_predictor_layer_t *layers;                  /* [base.n_layer] */
    char aux_fingerprint[17], base_fingerprint[17]; /* "" = not bound to a model */
    kvp_predictor_fitinfo_t *fit;
} kvp_predictor_t;

/* The arena: for each aux layer a in turn, the k_w of every base layer l with
 * layer_map[l] == a (increasing l), then their v_w, their k_b, their v_b. So
 * one aux layer's K weights form one [n_group * d_out][d_in] matrix and its
 * base layers are predicted with one sgemm. The layout follows from the layer
 * map, which is therefore fixed at creation; code outside this module reaches
 * weights only through the views in layers[] (offsets from params computed
 * from a view are fine, e.g. for gradients laid out as params). */

/* The KV shape of a model. */
kvp_kv_shape_t kvp_kv_shape_of(const kvp_model_t *m);

/* The default layer map: base layer i takes aux layer
 *   floor(i * n_aux / n_base) + s,   s = n_aux - 1 - floor((n_base - 1) * n_aux / n_base)
 * i.e. the aux layers spread evenly over the base layers, the whole map shifted
 * by s so that the last base layer takes the last aux layer. s = 0 whenever
 * n_aux <= n_base (aux 2 -> base 4 gives [0,0,1,1]; aux 16 -> base 28 ends on
 * 15); with more aux than base layers each base layer takes the last aux layer
 * of its group (aux 16 -> base 4 gives [3,7,11,15]). */
void kvp_predictor_default_layer_map(int n_aux, int n_base, int32_t *map);

/* A predictor with all weights zero. layer_map (base.n_layer entries, each in
 * [0, aux.n_layer)) is copied; NULL = the default map. */
int kvp_predictor_new(kvp_predictor_t **out, kvp_kv_shape_t aux, kvp_kv_shape_t base,
                      const int32_t *layer_map, kvp_err_t *err);
/* Aux and base of the same shape: W = I, b = 0, map i -> i. */
int kvp_predictor_new_identity(kvp_predictor_t **out, kvp_kv_shape_t shape, kvp_err_t *err);
void kvp_predictor_free(kvp_predictor_t **p);

/* Records the fingerprints of the pair the predictor was made for (after
 * checking their shapes against it). */
int kvp_predictor_bind(kvp_predictor_t *p, const kvp_model_t *aux, const kvp_model_t *base,
                       kvp_err_t *err);
/* Fails with KVP_ESHAPE naming the first field that differs (aux.n_layer,
 * base.head_dim, aux_fingerprint, ...) with the predictor's and the model's
 * value. An unbound predictor (empty fingerprints) is checked on shapes only. */
int kvp_predictor_check_pair(const kvp_predictor_t *p, const kvp_model_t *aux,
                             const kvp_model_t *base, kvp_err_t *err);

/* One base layer over n_tok rows: aux_k/aux_v are the rows of its aux layer
 * (p->layer_map[layer]), [n_tok][d_in]; base_k/base_v get [n_tok][d_out].
 * One sgemm per map. */
void kvp_predictor_apply_layer(const kvp_predictor_t *p, int layer, int n_tok, const float *aux_k,
                               const float *aux_v, float *base_k, float *base_v);
/* Every base layer over one chunk: aux_k[j], aux_v[j] for each aux layer j
 * ([n_tok][d_in]); base_k[l], base_v[l] for each base layer ([n_tok][d_out]). */
int kvp_predictor_apply(const kvp_predictor_t *p, int n_tok, const float *const *aux_k,
                        const float *const *aux_v, float *const *base_k, float *const *base_v,
                        kvp_err_t *err);
/* Positions [pos0, pos0+n_tok) of the aux cache -> the same positions of the
 * base cache, every layer (kvp_kvcache_read / kvp_kvcache_write, so keys are
 * un-rotated on the way out and rotated by the base RoPE on the way in). Does
 * not change base->len: call kvp_kvcache_set_len when all chunks are in. */
int kvp_predictor_apply_cache(const kvp_predictor_t *p, const kvp_kvcache_t *aux,
                              kvp_kvcache_t *base, int pos0, int n_tok, kvp_err_t *err);

/* Save / load (format above). Loading checks the architecture, shapes,
 * layer map and every tensor before allocating the weights. */
int kvp_predictor_save(const kvp_predictor_t *p, const char *path, kvp_err_t *err);
int kvp_predictor_from_gguf(kvp_predictor_t **out, const kvp_gguf_t *g, kvp_err_t *err);
int kvp_predictor_load(kvp_predictor_t **out, const char *path, kvp_err_t *err);

/* ---- closed-form ridge fit with streaming sums ------------------------
 *
 * Each map solves min ||X W^T + 1 b^T - Y||^2 + lambda ||W||^2 (the bias is not
 * regularised) from the sums X^T X and X^T Y over an appended bias column,
 * accumulated in double chunk by chunk, so no caller ever holds all
 * activations. Base layers fed by the same aux layer share X, so the fit keeps
 * one X^T X per aux layer (for K and for V) and the X^T Y of those base layers
 * side by side; solving is one Cholesky (LAPACKE_dposv) per aux layer, K/V and
 * lambda. Validation rows get the same sums, from which each map's validation
 * error follows without the rows: err = tr(W^T A W) - 2 tr(W^T B) + tr(C). */
typedef struct kvp_predictor_fit kvp_predictor_fit_t;

/* layer_map NULL = the default map. */
int kvp_predictor_fit_new(kvp_predictor_fit_t **out, kvp_kv_shape_t aux, kvp_kv_shape_t base,
                          const int32_t *layer_map, kvp_err_t *err);
void kvp_predictor_fit_free(kvp_predictor_fit_t **f);

/* Adds n_tok rows (same layout as kvp_predictor_apply: aux rows of every aux
 * layer, base rows of every base layer) to the calibration sums, or to the
 * validation sums when validation != 0. */
int kvp_predictor_fit_add(kvp_predictor_fit_t *f, int n_tok, const float *const *aux_k,
                          const float *const *aux_v, const float *const *base_k,
                          const float *const *base_v, int validation, kvp_err_t *err);
/* The same, reading positions [pos0, pos0+n_tok) of both caches un-rotated. */
int kvp_predictor_fit_add_cache(kvp_predictor_fit_t *f, const kvp_kvcache_t *aux,
                                const kvp_kvcache_t *base, int pos0, int n_tok, int validation,
                                kvp_err_t *err);
uint64_t kvp_predictor_fit_rows(const kvp_predictor_fit_t *f, int validation);

/* Solves into a new predictor (with fit info). lambdas are relative to the mean
 * diagonal of the features' X^T X; with more than one, each map takes the one
 * with the least validation error (validation rows required). */
int kvp_predictor_fit_solve(const kvp_predictor_fit_t *f, const double *lambdas, int n_lambdas,
                            kvp_predictor_t **out, kvp_err_t *err);

#endif
