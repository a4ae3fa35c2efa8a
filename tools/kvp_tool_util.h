/* Helpers the kvpred subcommands share: strict number parsing for flags,
 * reading a text file, loading a model with its vocabulary, the corpus flags
 * (--corpus, --ext, --holdout), a --layer-map value, and the checks a pair of
 * an auxiliary and a base model must pass. */
#ifndef KVP_TOOL_UTIL_H
#define KVP_TOOL_UTIL_H

#include <getopt.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "kvp_bundle.h"
#include "kvp_corpus.h"
#include "kvp_gguf.h"
#include "kvp_model.h"
#include "kvp_tokenizer.h"

/* Reads argv's flags (argv[0] the subcommand) with getopt_long, each
 * through one(code, opts), which prints the reason and returns nonzero for a
 * bad value. Returns 0 to go on (optind at the first non-flag argument), 1
 * when -h/--help printed the usage to stdout, 2 for an unknown flag (the
 * usage to stderr) or a bad value. */
int kvp_tool_getopt(int argc, char **argv, const char *shortopts, const struct option *lo,
                    void (*usage)(FILE *), int (*one)(int code, void *opts), void *opts);

/* Each prints "kvpred: FLAG: reason" and returns -1 on a bad value. */
int kvp_parse_int(const char *flag, const char *s, int lo, int hi, int *out);
int kvp_parse_float(const char *flag, const char *s, float lo, float hi, float *out);
int kvp_parse_u64(const char *flag, const char *s, uint64_t *out);

/* A count in [1, 2^max_log2]: kvp_parse_u64's message for what is no whole
 * number, "WHO: FLAG: 's' is not in [1, 2^N]" for one out of range. */
int kvp_parse_count(const char *who, const char *flag, const char *s, int max_log2, uint64_t *out);

/* A --layer-map value "0,0,1,1": the aux layer per base layer, into a new
 * *map (the old one freed; the caller frees the new one even on failure).
 * Prints "WHO: --layer-map: reason" or kvp_parse_int's message; -1 on error. */
int kvp_parse_layer_map(const char *who, const char *s, int32_t **map, int *n_map);

/* KVP_EINVAL unless the map (NULL: none given) has one entry per base layer. */
int kvp_tool_check_layer_map(const int32_t *map, int n_map, int n_base_layers, kvp_err_t *err);

/* Reads a whole file ("-" = standard input) into a NUL-terminated buffer. */
int kvp_read_text(const char *path, char **out, size_t *out_len);

/* PATH without its ending `drop` (when PATH is longer than it; drop NULL:
 * nothing dropped) and with `add` appended, in a new string (NULL: out of
 * memory). "a.gguf", ".gguf", ".ckpt" gives "a.ckpt". */
char *kvp_tool_derive_path(const char *path, const char *drop, const char *add);

/* ---- models ------------------------------------------------------------ */

/* The tools' name for a model with its vocabulary (lib/kvp_bundle.h). */
typedef kvp_bundle_t kvp_loaded_t;

static inline int kvp_load_model_and_vocab(const char *path, kvp_loaded_t *out, kvp_err_t *err) {
    return kvp_bundle_load(path, out, err);
}

static inline void kvp_loaded_free(kvp_loaded_t *l) {
    kvp_bundle_free(l);
}

/* A model with its vocabulary and its file kept open, for the commands that
 * copy the vocabulary's keys into the file they write. */
typedef struct kvp_tool_model {
    kvp_gguf_t *g;
    kvp_model_t *m;
    kvp_tokenizer_t *tok;
} kvp_tool_model_t;

/* On error err names the file; kvp_tool_model_close frees what was opened. */
int kvp_tool_model_open(const char *path, kvp_tool_model_t *mf, kvp_err_t *err);
void kvp_tool_model_close(kvp_tool_model_t *mf);

/* KV Prediction runs the base on the aux's tokens: KVP_ESHAPE unless both
 * vocabularies have the same size. */
int kvp_tool_check_vocab_pair(const kvp_tokenizer_t *aux, const kvp_tokenizer_t *base,
                              kvp_err_t *err);

/* ---- the corpus flags ---------------------------------------------------- */

#define KVP_TOOL_MAX_CORPUS 256

/* getopt_long codes of the corpus flags, clear of each command's own codes
 * (256 up) and of kvp_train_tool.h's. */
enum { KVP_TOOL_OPT_CORPUS = 0x1000, KVP_TOOL_OPT_EXT, KVP_TOOL_OPT_HOLDOUT };

/* Their entries in a getopt_long table. */
// clang-format off
#define KVP_TOOL_CORPUS_OPTIONS                                                                    \
    {"corpus", required_argument, 0, KVP_TOOL_OPT_CORPUS},                                         \
    {"ext", required_argument, 0, KVP_TOOL_OPT_EXT},                                               \
    {"holdout", required_argument, 0, KVP_TOOL_OPT_HOLDOUT}
// clang-format on

/* The corpus as the flags name it. Training commands (`many`) take --corpus
 * again and again and read every text file unless --ext says otherwise; with
 * no --corpus they read the default directory with the default extension.
 * The others read one path, the last --corpus, with the default extension
 * unless --ext says otherwise. */
typedef struct kvp_tool_corpus {
    const char *path[KVP_TOOL_MAX_CORPUS];
    int n_path;
    const char *ext;
    int holdout;
    int holdout_min; /* 1 where the command reads the validation or test split */
    bool many;
} kvp_tool_corpus_t;

void kvp_tool_corpus_init(kvp_tool_corpus_t *c, bool many, int holdout_min);

/* One corpus flag (code KVP_TOOL_OPT_*) with its argument; prints the reason
 * ("WHO: ..." or kvp_parse_int's) and returns -1 on a bad one. */
int kvp_tool_corpus_flag(kvp_tool_corpus_t *c, const char *who, int code, const char *arg);

/* One more corpus path; a one-path corpus takes it instead of its path.
 * Past the limit "WHO: more than 256 WHAT" (WHAT e.g. "--corpus paths"), -1. */
int kvp_tool_corpus_add(kvp_tool_corpus_t *c, const char *who, const char *what, const char *path);

/* After the flags: a `many` corpus without paths becomes the default one. */
void kvp_tool_corpus_finish(kvp_tool_corpus_t *c);

/* Lists the corpus (kvp_corpus_new), not yet tokenized. */
int kvp_tool_corpus_open(const kvp_tool_corpus_t *c, kvp_corpus_t **out, kvp_err_t *err);

/* The tokenizer to tokenize a corpus with for a model's vocabulary: NULL
 * (the corpus's byte-level fast path, the same tokens) for kvpred's plain
 * byte-level vocabulary without merges, else t itself. */
const kvp_tokenizer_t *kvp_tool_corpus_tok(const kvp_tokenizer_t *t);

#endif
