/* Helpers the kvpred subcommands share: strict number parsing for flags,
 * reading a text file, and loading a model with its vocabulary. */
#ifndef KVP_TOOL_UTIL_H
#define KVP_TOOL_UTIL_H

#include <stdint.h>

#include "kvp_model.h"
#include "kvp_tokenizer.h"

/* Each prints "kvpred: FLAG: reason" and returns -1 on a bad value. */
int kvp_parse_int(const char *flag, const char *s, int lo, int hi, int *out);
int kvp_parse_float(const char *flag, const char *s, float lo, float hi, float *out);
int kvp_parse_u64(const char *flag, const char *s, uint64_t *out);

/* Reads a whole file ("-" = standard input) into a NUL-terminated buffer. */
int kvp_read_text(const char *path, char **out, size_t *out_len);

typedef struct kvp_loaded {
    kvp_model_t *model;
    kvp_tokenizer_t *tok;
} kvp_loaded_t;

/* Opens path once and builds both the model and its tokenizer. */
int kvp_load_model_and_vocab(const char *path, kvp_loaded_t *out, kvp_err_t *err);
void kvp_loaded_free(kvp_loaded_t *l);

#endif
