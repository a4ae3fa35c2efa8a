/* What `kvpred train` and `kvpred models` share: loading and tokenizing a
 * corpus with a one-line summary, stopping on Ctrl-C with a checkpoint, and
 * describing a model's size. */
#ifndef KVP_TRAIN_TOOL_H
#define KVP_TRAIN_TOOL_H

#include <signal.h>
#include <stdio.h>

#include "kvp_corpus.h"
#include "kvp_model.h"
#include "kvp_tokenizer.h"

/* Set by SIGINT/SIGTERM once kvp_train_tool_catch_signals() ran; a second
 * signal ends the process at once. */
extern volatile sig_atomic_t kvp_train_tool_stop;
void kvp_train_tool_catch_signals(void);

/* Lists the corpus, tokenizes its train and validation splits (tok NULL:
 * byte-level) and prints a summary line to f (prefix "kvpred CMD"). Prints
 * the error and returns -1 on failure. */
int kvp_train_tool_load_corpus(const char *cmd, const char *const *paths, int n_paths,
                               const char *ext, int holdout_pct, const kvp_tokenizer_t *tok,
                               FILE *f, kvp_corpus_t **out);

/* "4 layers, d 256, 4 heads (4 kv), ffn 704, ctx 256: 3.21M params" */
void kvp_train_tool_describe(const kvp_model_config_t *cfg, size_t n_params, char *buf, size_t cap);

/* Prefill FLOPs per token over a prompt of n tokens (kvp_model_flops / n). */
double kvp_train_tool_prefill_flops(const kvp_model_config_t *cfg, int n);

#endif
