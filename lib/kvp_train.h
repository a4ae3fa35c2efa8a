/* kvp_train: the training forward and backward passes of the Llama-family
 * model in kvp_model.h, written by hand on OpenBLAS GEMMs in the manner of
 * llm.c: one forward that keeps every activation a backward pass needs, and a
 * backward that mirrors it step by step.
 *
 * Gradients are accumulated (+=) into a float array laid out exactly like the
 * model's parameter arena (m->params, m->n_params), so the optimiser treats
 * weights and gradients as two flat vectors.
 *
 * For KV Prediction training, any layer's keys and values can be supplied
 * from outside instead of from its own K/V projections (un-rotated keys,
 * token-major [B*T][n_kv_head*head_dim]); the backward pass then returns the
 * gradients of the loss with respect to them. The true K/V of every layer
 * (un-rotated, same layout) are available after each forward for the
 * consistency loss. */
#ifndef KVP_TRAIN_H
#define KVP_TRAIN_H

#include <stdint.h>

#include "kvp_err.h"
#include "kvp_model.h"

typedef struct kvp_train_ctx kvp_train_ctx_t;

/* Buffers for batches of B sequences of T tokens. */
int kvp_train_ctx_new(kvp_train_ctx_t **out, const kvp_model_t *m, int B, int T, kvp_err_t *err);
void kvp_train_ctx_free(kvp_train_ctx_t **ctx);

/* z-loss coefficient (default 0): adds z * mean over predicted tokens of
 * logsumexp(logits)^2 to the loss, as KV Prediction's recipe does (1e-4). */
void kvp_train_set_zloss(kvp_train_ctx_t *ctx, float z);

/* Makes layer l read K/V from k_unrot/v (each [B*T][n_kv_head*head_dim],
 * keys before RoPE; owned by the caller, read during forward and backward)
 * instead of its own projections; NULL restores the layer's own. */
void kvp_train_set_external_kv(kvp_train_ctx_t *ctx, int layer, const float *k_unrot,
                               const float *v);

/* Forward over tokens [B][T]. targets [B][T] (-1 = not scored); NULL for a
 * forward without loss (e.g. only to read the true K/V). *loss = mean
 * cross-entropy over scored targets (plus z-loss if set), in nats. */
int kvp_train_forward(kvp_train_ctx_t *ctx, const int32_t *tokens, const int32_t *targets,
                      float *loss, kvp_err_t *err);

/* Makes every backward add dk_unrot/dv (each [B*T][n_kv_head*head_dim], owned
 * by the caller, read during backward) to the gradient with respect to layer
 * l's own K projection output (un-rotated) and V projection output — as if
 * the loss had the extra term sum(dk_unrot * K_true) + sum(dv * V_true). They
 * are added as given, not multiplied by the backward's scale. For KV
 * Prediction training: the gradient that reaches the auxiliary model's K/V
 * through the predictor. With external K/V on the same layer they are the
 * only gradient of its K/V rows. NULL removes. */
void kvp_train_set_kv_grad(kvp_train_ctx_t *ctx, int layer, const float *dk_unrot, const float *dv);

/* Backward of the last forward: grads[n_params] += d loss / d params, scaled by
 * `scale` (e.g. 1/accumulation steps). Layers with external K/V get their
 * gradients in kvp_train_kv_grad (overwritten, also scaled). grads may be NULL
 * for a frozen model: then only those K/V gradients are computed, and the
 * weight-gradient products are skipped. */
int kvp_train_backward(kvp_train_ctx_t *ctx, float *grads, float scale, kvp_err_t *err);

/* After a forward: layer l's own K (un-rotated) and V, [B*T][n_kv_head*head_dim]
 * (for layers with external K/V, what their projections would have given). */
const float *kvp_train_true_k(const kvp_train_ctx_t *ctx, int layer);
const float *kvp_train_true_v(const kvp_train_ctx_t *ctx, int layer);
/* After a backward: d loss / d external K (un-rotated) and V of layer l. */
const float *kvp_train_kv_grad_k(const kvp_train_ctx_t *ctx, int layer);
const float *kvp_train_kv_grad_v(const kvp_train_ctx_t *ctx, int layer);

/* Logits [B*T][n_vocab] of the last forward. */
const float *kvp_train_logits(const kvp_train_ctx_t *ctx);

/* FLOPs of one training step (forward + backward) over B*T tokens: about
 * 6 x params x tokens plus attention. */
double kvp_train_step_flops(const kvp_model_config_t *cfg, int B, int T);

#endif
