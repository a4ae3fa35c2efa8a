/* kvp_trainutil: what the two training loops (kvp_trainer: one model;
 * kvp_kvptrain: auxiliary model + predictor) share: bytes per token for bits
 * per byte, the key=value metadata text of their checkpoints, and their CSV
 * logs that a resumed run continues. */
#ifndef KVP_TRAINUTIL_H
#define KVP_TRAINUTIL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "kvp_err.h"
#include "kvp_tokenizer.h"

/* Text bytes each token id stands for (control tokens: 0; tok NULL: the
 * first 256 ids are bytes). Freed with free(). */
uint32_t *kvp_trainutil_token_bytes_new(const kvp_tokenizer_t *tok, int n_vocab);

#define KVP_TRAINUTIL_META_MAX 8192

/* A text section of key=value lines (checkpoint metadata). Floats should be
 * printed with enough digits to read back exactly. */
typedef struct kvp_trainutil_meta {
    char buf[KVP_TRAINUTIL_META_MAX];
    size_t n;
} kvp_trainutil_meta_t;

void kvp_trainutil_meta_add(kvp_trainutil_meta_t *m, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Finds key in a key=value text (n bytes, not NUL-terminated) and copies its
 * value into val. */
bool kvp_trainutil_meta_get(const char *text, size_t n, const char *key, char *val, size_t cap);

/* Opens a CSV log for appending. A fresh run starts it anew with `header`; a
 * resumed run keeps the rows up to the checkpoint's step and drops later ones
 * (a killed run may have logged steps its checkpoint does not hold). */
FILE *kvp_trainutil_log_open(const char *path, const char *header, bool resumed, int step,
                             kvp_err_t *err);

#endif
