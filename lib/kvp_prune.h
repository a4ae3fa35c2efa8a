/* kvp_prune: a layer-pruned copy of a model — the paper's second baseline
 * and second kind of auxiliary model (../shared/reference/kv-prediction.md,
 * "Auxiliary models in the paper").
 *
 * Keeping a fraction num/den of n layers keeps k = round(n * num / den)
 * layers (at least 1), layer i of the copy being layer floor(i * n / k) of the
 * original: every fourth layer [0, 4, 8, ...] for 1/4, every second for 1/2,
 * and for 3/4 every layer but the last of each group of four ([0,1,2,4,5,6,...]).
 * The embeddings, the final norm and the output head are copied whole, so the
 * copy is a working model of the same width and vocabulary; it usually needs
 * some fine-tuning (kvp_trainer_run) to be useful. */
#ifndef KVP_PRUNE_H
#define KVP_PRUNE_H

#include <stdint.h>

#include "kvp_err.h"
#include "kvp_gguf.h"
#include "kvp_model.h"

#define KVP_PRUNE_MAX_DEN 64

/* Layers kept from n_layer for the fraction num/den (0 < num <= den <=
 * KVP_PRUNE_MAX_DEN): writes the indices into keep[] (room for n_layer) and
 * returns how many, or a negative KVP_E* code for a bad fraction. */
int kvp_prune_layers(int n_layer, int num, int den, int32_t *keep);

/* The predictor layer map from a pruned model to its source: base layer l
 * takes the pruned layer that holds the last kept layer <= l (keep [0,1,2]
 * of 4 gives [0,1,2,2]; keep [0,2] gives [0,0,1,1]). keep must be increasing
 * and start at 0. */
void kvp_prune_layer_map(const int32_t *keep, int n_keep, int n_base, int32_t *map);

/* Parses "1/4", "1/2", "3/4", "1" (= 1/1) into num/den. */
int kvp_prune_parse_fraction(const char *s, int *num, int *den, kvp_err_t *err);

/* A new model holding the layers keep[0..n_keep-1] of src (in that order),
 * with src's embeddings, final norm and output head. */
int kvp_prune_model(const kvp_model_t *src, const int32_t *keep, int n_keep, kvp_model_t **out,
                    kvp_err_t *err);

/* Writes m as F32 GGUF with the vocabulary of `vocab_from` (every
 * tokenizer.* key copied), general.name `name` (may be NULL) and
 * kvpred.prune.layers = keep (i32[n_keep]) and kvpred.prune.source = the
 * source's fingerprint when keep is given. `extra` (may be NULL) adds more
 * keys to the writer before it is written. */
int kvp_prune_save(const kvp_model_t *m, const kvp_gguf_t *vocab_from, const char *path,
                   const char *name, const int32_t *keep, int n_keep, const char *source_fp,
                   int (*extra)(kvp_gguf_writer_t *w, void *user), void *user, kvp_err_t *err);

#endif
