/* kvp_kvpgen: KV Prediction generation in one process — the hand-over of the
 * reference code (../shared/reference/kv-prediction.md, "Inference"):
 *
 *   1. the auxiliary model runs over every prompt token but the last, chunk
 *      by chunk;
 *   2. as each chunk finishes, the predictor maps its auxiliary K/V to base
 *      K/V for the same positions, written into the base model's cache;
 *   3. the base model runs one step on the last prompt token over the
 *      predicted cache; its logits give the first output token;
 *   4. the base model generates alone from there.
 *
 * The pipeline services do the same steps in three processes; tests check
 * that both give the same tokens. */
#ifndef KVP_KVPGEN_H
#define KVP_KVPGEN_H

#include "kvp_generate.h"
#include "kvp_model.h"
#include "kvp_predictor.h"

typedef struct kvp_kvp_stats {
    int n_prompt, n_generated;
    double t_aux_prefill; /* s: auxiliary prefill of n_prompt - 1 tokens */
    double t_predict;     /* s: the predictor over those positions */
    double t_base_step;   /* s: the base step on the last prompt token */
    double t_first;       /* s: TTFT, start to the first token sampled */
    double t_decode;      /* s: every later token */
} kvp_kvp_stats_t;

/* Fills base_cache positions [0, n_prompt-1) by auxiliary prefill + prediction
 * in chunks of `chunk` tokens and runs the base step on the last prompt token,
 * leaving its logits in `logits` [n_vocab]. aux_ctx must hold caches of
 * n_prompt - 1 positions. aux_cache, if not NULL, is the auxiliary model's
 * cache to fill (emptied first; at least n_prompt - 1 positions): a caller
 * that runs many prompts keeps one, as it keeps base_cache, instead of
 * paying for a fresh one (allocation, first-touch page faults, RoPE table)
 * inside every TTFT. NULL: one is made and freed here. st may be NULL. */
int kvp_kvp_prefill(kvp_model_ctx_t *aux_ctx, kvp_model_ctx_t *base_ctx, const kvp_predictor_t *p,
                    kvp_kvcache_t *aux_cache, kvp_kvcache_t *base_cache, const int32_t *prompt,
                    int n_prompt, int chunk, float *logits, kvp_kvp_stats_t *st, kvp_err_t *err);

/* The whole hand-over: prefill as above, then base generation. The predictor
 * must fit the pair (kvp_predictor_check_pair). */
int kvp_kvp_generate(const kvp_model_t *aux, const kvp_model_t *base, const kvp_predictor_t *p,
                     const int32_t *prompt, int n_prompt, const kvp_gen_params_t *gp, int32_t eos,
                     kvp_token_cb cb, void *user, kvp_kvp_stats_t *st, kvp_err_t *err);

/* TTFT FLOPs of the hand-over for an n-token prompt: auxiliary prefill of
 * n - 1 tokens (no output head) + predictor (2 x d_in x d_out x 2 maps per
 * base layer and token) + one base step after n - 1 cached tokens. */
double kvp_kvp_ttft_flops(const kvp_model_config_t *aux, const kvp_model_config_t *base,
                          const kvp_predictor_t *p, int n);

#endif
