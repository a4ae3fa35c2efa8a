/* Helpers the kvpred subcommands share: strict number parsing for flags,
 * reading a text file, and loading a model with its vocabulary. */
#ifndef KVP_TOOL_UTIL_H
#define KVP_TOOL_UTIL_H

#include <stdint.h>

#include "kvp_bundle.h"
#include "kvp_model.h"
#include "kvp_tokenizer.h"

/* Each prints "kvpred: FLAG: reason" and returns -1 on a bad value. */
int kvp_parse_int(const char *flag, const char *s, int lo, int hi, int *out);
int kvp_parse_float(const char *flag, const char *s, float lo, float hi, float *out);
int kvp_parse_u64(const char *flag, const char *s, uint64_t *out);

/* Reads a whole file ("-" = standard input) into a NUL-terminated buffer. */
int kvp_read_text(const char *path, char **out, size_t *out_len);

/* The tools' name for a model with its vocabulary (lib/kvp_bundle.h). */
typedef kvp_bundle_t kvp_loaded_t;

static inline int kvp_load_model_and_vocab(const char *path, kvp_loaded_t *out, kvp_err_t *err) {
    return kvp_bundle_load(path, out, err);
}

static inline void kvp_loaded_free(kvp_loaded_t *l) {
    kvp_bundle_free(l);
}

#endif
