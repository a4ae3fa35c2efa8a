/* kvp_kvptrain: KV Prediction's own training (Horton et al. 2024; see
 * ../shared/reference/kv-prediction.md, "Training"): the auxiliary model and
 * the predictor are trained together, the base model is frozen.
 *
 * One micro-batch of B sequences of T tokens:
 *
 *   aux forward (with targets)           -> CE_aux + z_aux, aux K (un-rotated), V
 *   predictor, per base layer l          -> K_pred[l], V_pred[l] from aux layer map[l]
 *   base forward, no loss                -> K_true[l], V_true[l] (the consistency target)
 *   base forward reading K_pred/V_pred on
 *   every layer (its queries its own)    -> CE_base + z_base
 *
 *   loss = base_w (CE_base + z_base) + aux_w (CE_aux + z_aux)
 *        + kv_w * sum over base layers of (L1(K_pred, K_true) + L1(V_pred, V_true))
 *
 * with L1 the mean absolute error over the layer's B*T*n_kv_head*head_dim
 * values and z the z-loss 1e-4 * mean(logsumexp^2). The backward pass runs
 * the base backward without weight gradients (kvp_train_backward with NULL)
 * for d loss / d K_pred, V_pred, adds the consistency term's gradient, goes
 * back through the predictor's maps (dW += dY^T X, db += sum dY, dX = dY W)
 * and hands dX to the aux model's backward as an extra gradient on its K/V
 * projections (kvp_train_set_kv_grad), summed over the base layers that read
 * the same aux layer. Causality is the external-K/V path's: position t of the
 * base attends to predicted K/V of positions <= t only.
 *
 * The run (kvp_kvptrain_run) is kvp_trainer's loop for two parameter groups —
 * the aux model's arena and the predictor's — with one AdamW each (no decay
 * on norm weights or predictor biases), clipping on their joint norm, the same
 * schedule, accumulation, checkpoints and resuming bit for bit. Validation
 * measures what KV Prediction is for: the base model's bits per byte when it
 * reads the predicted cache. */
#ifndef KVP_KVPTRAIN_H
#define KVP_KVPTRAIN_H

#include <stdbool.h>
#include <stdint.h>

#include "kvp_corpus.h"
#include "kvp_err.h"
#include "kvp_gguf.h"
#include "kvp_model.h"
#include "kvp_predictor.h"
#include "kvp_tokenizer.h"
#include "kvp_trainer.h"

typedef struct kvp_kvptrain_weights {
    float base_w, aux_w, kv_w; /* loss weights (default 1, as the published configs) */
    float zloss;               /* z-loss coefficient of both models (default 1e-4) */
} kvp_kvptrain_weights_t;

void kvp_kvptrain_weights_default(kvp_kvptrain_weights_t *w);

/* Whether aux, base and p can be trained together: one vocabulary size, the
 * predictor's shapes equal to the models' KV shapes (fingerprints are not
 * compared: the aux changes during training). KVP_ESHAPE naming the field. */
int kvp_kvptrain_check(const kvp_model_t *aux, const kvp_model_t *base, const kvp_predictor_t *p,
                       kvp_err_t *err);

/* The predictor's start without a closed-form fit: every weight and bias
 * uniform in [-1/sqrt(d_in), 1/sqrt(d_in)] (torch.nn.Linear's default, what
 * the reference code's predictor layers start from), from seed. */
void kvp_kvptrain_init_predictor(kvp_predictor_t *p, uint64_t seed);

/* ---- one micro-batch ---------------------------------------------------- */

typedef struct kvp_kvptrain_ctx kvp_kvptrain_ctx_t;

/* Buffers for B x T. The models and the predictor are read at every forward
 * (the optimiser may change their weights in between); all three must
 * outlive the context. */
int kvp_kvptrain_ctx_new(kvp_kvptrain_ctx_t **out, const kvp_model_t *aux, const kvp_model_t *base,
                         const kvp_predictor_t *p, int B, int T, const kvp_kvptrain_weights_t *w,
                         kvp_err_t *err);
void kvp_kvptrain_ctx_free(kvp_kvptrain_ctx_t **ctx);

typedef struct kvp_kvptrain_loss {
    double total; /* the weighted sum */
    double base;  /* CE_base + z_base, nats: the base model on the predicted K/V */
    double aux;   /* CE_aux + z_aux */
    double kv;    /* sum over base layers of L1(K) + L1(V), unweighted */
} kvp_kvptrain_loss_t;

/* Forward over tokens/targets [B][T] (targets -1: not scored). */
int kvp_kvptrain_forward(kvp_kvptrain_ctx_t *ctx, const int32_t *tokens, const int32_t *targets,
                         kvp_kvptrain_loss_t *loss, kvp_err_t *err);
/* Backward of the last forward: g_aux[aux->n_params] += scale * d loss / d aux
 * params, g_pred[p->n_params] (laid out as p->params) += scale * d loss / d
 * predictor params. The base model gets no gradient. */
int kvp_kvptrain_backward(kvp_kvptrain_ctx_t *ctx, float *g_aux, float *g_pred, float scale,
                          kvp_err_t *err);

/* After a forward: base layer l's predicted and true K (un-rotated) and V,
 * [B*T][base n_kv_head*head_dim]. */
const float *kvp_kvptrain_pred_k(const kvp_kvptrain_ctx_t *ctx, int layer);
const float *kvp_kvptrain_pred_v(const kvp_kvptrain_ctx_t *ctx, int layer);
const float *kvp_kvptrain_true_k(const kvp_kvptrain_ctx_t *ctx, int layer);
const float *kvp_kvptrain_true_v(const kvp_kvptrain_ctx_t *ctx, int layer);

/* ---- validation --------------------------------------------------------- */

typedef struct kvp_kvptrain_eval {
    kvp_eval_t base_pred; /* the base model reading the predicted K/V: what KV Prediction is
                             about */
    kvp_eval_t aux;       /* the aux model alone */
    kvp_eval_t base_own;  /* the base model on its own K/V (the bound from above) */
    double kv;            /* the consistency term (sum over layers of L1 K + L1 V) */
} kvp_kvptrain_eval_t;

/* Cross-entropy without z-loss over the same evenly spaced windows of s as
 * kvp_trainer_evaluate (B x T, about max_tokens tokens; 0 = all). tok: the
 * vocabulary for bytes per token (NULL = byte-level). */
int kvp_kvptrain_evaluate(const kvp_model_t *aux, const kvp_model_t *base, const kvp_predictor_t *p,
                          const kvp_corpus_stream_t *s, const kvp_tokenizer_t *tok, int B, int T,
                          uint64_t max_tokens, kvp_kvptrain_eval_t *out, kvp_err_t *err);

/* ---- the run -------------------------------------------------------------- */

typedef struct kvp_kvptrain_result {
    int step;       /* steps done in the whole run */
    bool completed; /* step == steps */
    bool resumed;
    kvp_kvptrain_loss_t loss; /* of the last step (NAN: none) */
    bool have_before, have_val;
    kvp_kvptrain_eval_t before; /* validation before step 1 (final_eval_tokens) */
    kvp_kvptrain_eval_t val;    /* the last validation */
    uint64_t tokens;            /* tokens trained on (each through all three models) */
    double tok_per_s;           /* this session's training throughput */
    double elapsed_s;           /* wall time of the whole run, across resumes */
} kvp_kvptrain_result_t;

/* Trains aux and p in place on c's train stream, with cfg's loop settings
 * (batch, ctx, accum, steps, warmup, lr, min_lr, adamw, clip, seed for the
 * data order, eval_*, ckpt_*, resume, log_path, time_limit_s, stop_after,
 * stop_flag, progress*, tok) and w's loss weights. base is only read. When
 * the validation split is there, the run evaluates once before its first
 * step (final_eval_tokens), every eval_every steps (eval_tokens) and at the
 * end (final_eval_tokens). A checkpoint holds both parameter groups, both
 * optimisers, the step and the data RNG; resuming checks every setting that
 * decides the weights, the starting aux and predictor, the base model and the
 * corpus. */
int kvp_kvptrain_run(kvp_model_t *aux, const kvp_model_t *base, kvp_predictor_t *p,
                     const kvp_corpus_t *c, const kvp_trainer_config_t *cfg,
                     const kvp_kvptrain_weights_t *w, kvp_kvptrain_result_t *res, kvp_err_t *err);

/* ---- output ---------------------------------------------------------------- */

/* The trained aux as a GGUF file (F32): its tensors and llama.* keys, the
 * vocabulary copied key by key from vocab_from's tokenizer.* keys (NULL:
 * kvpred's byte-level one), general.name, a training record under
 * kvpred.kvptrain.* when cfg/res are given, and the command (may be NULL). */
int kvp_kvptrain_save_aux(const kvp_model_t *aux, const char *path, const kvp_gguf_t *vocab_from,
                          const kvp_trainer_config_t *cfg, const kvp_kvptrain_weights_t *w,
                          const kvp_kvptrain_result_t *res, const char *command, kvp_err_t *err);

/* The trained predictor, without the fit record of a closed-form start and
 * bound to the fingerprints of aux (as trained) and base. */
int kvp_kvptrain_save_predictor(const kvp_predictor_t *p, const kvp_model_t *aux,
                                const kvp_model_t *base, const char *path, kvp_err_t *err);

#endif
