/* kvp_sampler: picks the next token from logits — greedy, or temperature
 * with top-k and top-p (nucleus) filtering, from a seeded generator so that
 * the same seed gives the same text. */
#ifndef KVP_SAMPLER_H
#define KVP_SAMPLER_H

#include <stdint.h>

#include "kvp_err.h"

typedef struct kvp_sampler_params {
    float temp;  /* <= 0: greedy (argmax) */
    int top_k;   /* 0: off */
    float top_p; /* >= 1: off */
    uint64_t seed;
} kvp_sampler_params_t;

typedef struct kvp_sampler kvp_sampler_t;

int kvp_sampler_new(kvp_sampler_t **out, const kvp_sampler_params_t *p, int n_vocab,
                    kvp_err_t *err);
void kvp_sampler_free(kvp_sampler_t **s);

/* The next token for logits[n_vocab] (logits are not modified). */
int32_t kvp_sampler_sample(kvp_sampler_t *s, const float *logits);

/* Index of the largest value (first one on ties). */
int32_t kvp_argmax(const float *x, int n);

#endif
