/* kvp_corpus: the training text — which files, which split, and the token
 * streams the trainer samples from.
 *
 * A corpus is a list of files found under one or more roots (directories are
 * walked recursively in byte order of their relative paths; symbolic links
 * inside them are skipped, so a walk never loops or counts a file twice).
 * Every file goes to exactly one split by a hash of its relative path, so the
 * split does not depend on where the corpus is installed, on the file's
 * contents, or on which other files exist (rule in docs/training.md):
 *
 *   bucket = FNV-1a-64(relative path) % 100
 *   bucket <  100 - 2h  -> train,   < 100 - h -> validation,   else -> test
 *
 * with h the hold-out percentage (default 5: a 90/5/5 split). Test files are
 * tokenized only when asked for and never by the trainer.
 *
 * Each split becomes one token stream: for every file BOS, its tokens, EOS
 * (the engine adds BOS to a prompt, so the model learns from the same start). */
#ifndef KVP_CORPUS_H
#define KVP_CORPUS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvp_err.h"
#include "kvp_rng.h"
#include "kvp_tokenizer.h"

/* The default corpus: Debian's Python 3.11 standard library sources. */
#define KVP_CORPUS_DEFAULT_DIR "/usr/lib/python3.11"
#define KVP_CORPUS_DEFAULT_EXT ".py"
#define KVP_CORPUS_DEFAULT_HOLDOUT 5

typedef enum kvp_split {
    KVP_SPLIT_TRAIN = 0,
    KVP_SPLIT_VAL = 1,
    KVP_SPLIT_TEST = 2,
} kvp_split_t;
#define KVP_SPLIT_COUNT 3

typedef struct kvp_corpus_file {
    char *path; /* to open */
    char *rel;  /* relative to its root (a file given directly: its base name) */
    uint64_t size;
    kvp_split_t split;
} kvp_corpus_file_t;

typedef struct kvp_corpus_opts {
    /* In directories, only names ending in ext (NULL or "" = every file that
     * holds no NUL byte in its first 4 KiB). Files named directly are always
     * taken. */
    const char *ext;
    int holdout_pct; /* validation and test share each, 0..33; 0 = all train */
} kvp_corpus_opts_t;

/* One split's tokens. bytes = text bytes the tokens stand for. */
typedef struct kvp_corpus_stream {
    int32_t *tok;
    size_t n;
    uint64_t bytes;
    size_t n_docs;
} kvp_corpus_stream_t;

typedef struct kvp_corpus kvp_corpus_t;

/* Lists the files under paths[0..n_paths-1] (directories or files). Fails on
 * a path that does not exist, an unreadable directory, or no files at all. */
int kvp_corpus_new(kvp_corpus_t **out, const char *const *paths, int n_paths,
                   const kvp_corpus_opts_t *opts, kvp_err_t *err);
void kvp_corpus_free(kvp_corpus_t **c);

size_t kvp_corpus_n_files(const kvp_corpus_t *c);
const kvp_corpus_file_t *kvp_corpus_file(const kvp_corpus_t *c, size_t i);
/* Files and bytes in one split. */
size_t kvp_corpus_split_files(const kvp_corpus_t *c, kvp_split_t s);
uint64_t kvp_corpus_split_bytes(const kvp_corpus_t *c, kvp_split_t s);
/* A 64-bit digest of the file list (relative paths, sizes, splits): a
 * checkpoint records it so a resumed run refuses a different corpus. */
uint64_t kvp_corpus_fingerprint(const kvp_corpus_t *c);

/* The split rule above, for one relative path. */
kvp_split_t kvp_corpus_split_of(const char *rel, int holdout_pct);
const char *kvp_split_name(kvp_split_t s);

/* Reads and tokenizes every file of split s into c's stream for it. tok =
 * NULL: kvpred's byte-level vocabulary without merges (token = byte value,
 * BOS 256, EOS 257), the fast path; otherwise tok's encoder (no special
 * tokens added) and its BOS/EOS. Unreadable files are errors. */
int kvp_corpus_tokenize(kvp_corpus_t *c, kvp_split_t s, const kvp_tokenizer_t *tok, kvp_err_t *err);
/* The stream of split s (n == 0 until tokenized). */
const kvp_corpus_stream_t *kvp_corpus_stream(const kvp_corpus_t *c, kvp_split_t s);

/* Reads one file whole into a new NUL-terminated buffer (free()). */
int kvp_corpus_read_file(const char *path, char **out, size_t *out_len, kvp_err_t *err);

/* B random windows of T+1 tokens from s: tokens[b][t] = s[o_b + t],
 * targets[b][t] = s[o_b + t + 1], offsets o_b uniform over every start the
 * stream allows, drawn from rng (B calls of kvp_rng_below). Needs s->n > T. */
int kvp_corpus_sample(const kvp_corpus_stream_t *s, kvp_rng_t *rng, int B, int T, int32_t *tokens,
                      int32_t *targets, kvp_err_t *err);

/* Evaluation windows: the stream cut into kvp_corpus_n_windows(s, T)
 * consecutive windows that score every token but the first exactly once.
 * Window w: tokens s[wT .. wT+T-1], targets s[wT+1 .. wT+T]; past the end of
 * the stream tokens are `pad` and targets -1 (not scored). */
size_t kvp_corpus_n_windows(const kvp_corpus_stream_t *s, int T);
void kvp_corpus_window(const kvp_corpus_stream_t *s, size_t w, int T, int32_t pad, int32_t *tokens,
                       int32_t *targets);

#endif
