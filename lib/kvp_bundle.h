/* kvp_bundle: a model and its vocabulary, loaded from one GGUF file (opened
 * once). What the generate command and the aux-prefill and decoder services
 * load. */
#ifndef KVP_BUNDLE_H
#define KVP_BUNDLE_H

#include "kvp_model.h"
#include "kvp_tokenizer.h"

typedef struct kvp_bundle {
    kvp_model_t *model;
    kvp_tokenizer_t *tok;
} kvp_bundle_t;

/* Loads both, and checks that the vocabulary fits the embedding. On error
 * nothing is left allocated and err names the file. */
int kvp_bundle_load(const char *path, kvp_bundle_t *out, kvp_err_t *err);
void kvp_bundle_free(kvp_bundle_t *b);

#endif
