/* kvp_generate: the generation loop on one model — prefill the prompt, then
 * sample token by token, handing each token to a callback as it is made.
 * The decode loop is its own function so that paths whose cache is filled
 * some other way (KV Prediction, the decoder service) reuse it unchanged. */
#ifndef KVP_GENERATE_H
#define KVP_GENERATE_H

#include <stdbool.h>
#include <stdint.h>

#include "kvp_model.h"
#include "kvp_sampler.h"
#include "kvp_tokenizer.h"

typedef struct kvp_gen_params {
    int n_predict;    /* tokens to generate at most */
    bool stop_at_eos; /* end early on the vocabulary's EOS token */
    kvp_sampler_params_t sampler;
    int chunk; /* prefill chunk size (tokens per forward call); 0: 512 */
} kvp_gen_params_t;

typedef struct kvp_gen_stats {
    int n_prompt, n_generated;
    double t_prefill; /* s: prompt processing up to the first token's logits */
    double t_first;   /* s: TTFT, start to the first token sampled */
    double t_decode;  /* s: every later token */
} kvp_gen_stats_t;

/* Called with each new token; a non-zero return stops generation. */
typedef int (*kvp_token_cb)(void *user, int32_t token);

/* Samples from logits, then runs the model on each sampled token until
 * n_predict tokens, EOS or the callback says stop. The cache must already hold
 * the prompt; logits are the last prompt position's. */
int kvp_generate_from_logits(kvp_model_ctx_t *ctx, kvp_kvcache_t *cache, float *logits,
                             const kvp_gen_params_t *p, int32_t eos, kvp_token_cb cb, void *user,
                             kvp_gen_stats_t *st, kvp_err_t *err);

/* Prefill + decode on one model. eos < 0: none. */
int kvp_generate(const kvp_model_t *m, const int32_t *prompt, int n_prompt,
                 const kvp_gen_params_t *p, int32_t eos, kvp_token_cb cb, void *user,
                 kvp_gen_stats_t *st, kvp_err_t *err);

#endif
