/* kvp_trainutil: what the two training loops (kvp_trainer: one model;
 * kvp_kvptrain: auxiliary model + predictor) share: bytes per token for bits
 * per byte, the validation windows, the checks of their settings, the
 * key=value metadata of their checkpoints (where the run is, the settings a
 * resume must share), their CSV logs that a resumed run continues, and the
 * bookkeeping of the loop (when to stop, validate, checkpoint; throughput).
 * Each loop keeps what is its own: its parameters, losses, log columns and
 * checkpoint sections. */
#ifndef KVP_TRAINUTIL_H
#define KVP_TRAINUTIL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "kvp_adamw.h"
#include "kvp_ckpt.h"
#include "kvp_corpus.h"
#include "kvp_err.h"
#include "kvp_model.h"
#include "kvp_progress.h"
#include "kvp_tokenizer.h"
#include "kvp_trainer.h"

#define KVP_TRAINUTIL_LN2 0.69314718055994530942

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

/* A value of a key=value text as a number: NAN (double) or 0 (u64) when the
 * key is missing. */
double kvp_trainutil_meta_double(const char *text, size_t n, const char *key);
uint64_t kvp_trainutil_meta_u64(const char *text, size_t n, const char *key);

/* ---- settings ------------------------------------------------------------ */

/* Warm-up steps: cfg->warmup, or steps / 20 when it is negative. */
int kvp_trainutil_warmup(const kvp_trainer_config_t *cfg);

/* The loop settings both loops need (positive sizes, learning rates, a
 * checkpoint path when checkpoints are asked for); messages begin with
 * `who` ("trainer", "KV-prediction training"). */
int kvp_trainutil_check_config(const kvp_trainer_config_t *cfg, const char *who, kvp_err_t *err);

/* The train stream holds at least one window of ctx+1 tokens, all inside a
 * vocabulary of n_vocab; `whose` names that vocabulary ("model's"). */
int kvp_trainutil_check_train_stream(const kvp_corpus_t *c, int ctx, int n_vocab, const char *who,
                                     const char *whose, kvp_err_t *err);

/* AdamW without weight decay on m's RMSNorm weights; opt holds m's params. */
void kvp_trainutil_no_decay_norms(kvp_adamw_t *opt, const kvp_model_t *m);

/* ---- checkpoint metadata --------------------------------------------------
 * The settings lines a resumed run must share, in the order both loops
 * write them: the model (keys PREFIXn_params, PREFIXmodel), the schedule and
 * optimiser (batch ... seed), the corpus. */
void kvp_trainutil_meta_add_model(kvp_trainutil_meta_t *mt, const char *prefix,
                                  const kvp_model_t *m);
void kvp_trainutil_meta_add_schedule(kvp_trainutil_meta_t *mt, const kvp_trainer_config_t *cfg,
                                     int warmup);
void kvp_trainutil_meta_add_corpus(kvp_trainutil_meta_t *mt, const kvp_corpus_t *c);

/* Where a run is: the first lines of both loops' metadata. */
typedef struct kvp_trainutil_pos {
    int step;
    uint64_t tokens;
    double elapsed; /* seconds of all sessions so far */
    int64_t adam_t; /* AdamW's step count */
} kvp_trainutil_pos_t;

/* Adds format=FORMAT and the position (step, tokens, elapsed, adam_t). */
void kvp_trainutil_meta_add_pos(kvp_trainutil_meta_t *mt, const char *format,
                                const kvp_trainutil_pos_t *pos);

/* What tells one loop's checkpoints from the other's. */
typedef struct kvp_trainutil_ckpt_kind {
    const char *format; /* the format= value */
    const char *name;   /* "not a kvpred NAME checkpoint" */
    const char *same;   /* "resume with the same SAME, or start afresh" */
} kvp_trainutil_ckpt_kind_t;

/* Reads checkpoint `path`, refuses it unless it is of `kind` and holds every
 * key=value line of `want` unchanged (the first difference is named), and
 * reads the position (step within [0, steps]). On success *ck is the open
 * checkpoint, for the caller's own sections and keys (its metadata in
 * *text, *n); the caller frees it. */
int kvp_trainutil_ckpt_open(kvp_ckpt_t **ck, const char *path,
                            const kvp_trainutil_ckpt_kind_t *kind, const kvp_trainutil_meta_t *want,
                            int steps, kvp_trainutil_pos_t *pos, const char **text, size_t *n,
                            kvp_err_t *err);

/* ---- validation windows ---------------------------------------------------- */

/* About max_tokens tokens (0: all) of s in evenly spaced windows of T tokens,
 * so the same T and token count score the same text in both loops. */
typedef struct kvp_trainutil_windows {
    const kvp_corpus_stream_t *s;
    int T;
    size_t n_win; /* windows in s */
    size_t k;     /* windows scored */
} kvp_trainutil_windows_t;

int kvp_trainutil_windows_init(kvp_trainutil_windows_t *w, const kvp_corpus_stream_t *s, int T,
                               uint64_t max_tokens, kvp_err_t *err);

/* What one batch of windows holds. */
typedef struct kvp_trainutil_batch {
    uint64_t scored; /* targets to score */
    uint64_t bytes;  /* text bytes those targets stand for */
    int n_real;      /* rows holding a window (the rest are padding) */
} kvp_trainutil_batch_t;

/* Fills the B rows of tokens/targets [B x T] with windows j0, j0+1, ...
 * (rows past the last window: padding, no targets). A target outside
 * n_vocab is refused (`whose` names the vocabulary). */
int kvp_trainutil_windows_fill(const kvp_trainutil_windows_t *w, size_t j0, int B,
                               const uint32_t *tb, int n_vocab, const char *whose, int32_t *tokens,
                               int32_t *targets, kvp_trainutil_batch_t *out, kvp_err_t *err);

/* A validation result from summed nats: per token and bits per byte (NAN
 * where the count is 0). */
void kvp_trainutil_eval_set(kvp_eval_t *e, double nats, uint64_t tokens, uint64_t bytes);

/* ---- the loop ------------------------------------------------------------- */

/* Whether the run stops before its next step: stop_after reached, the stop
 * flag raised, or the time limit past (only once this session has made a
 * step, so that every session makes progress). t0: the session's start. */
bool kvp_trainutil_should_stop(const kvp_trainer_config_t *cfg, int step, int start_step,
                               double t0);

/* Whether the step just done is followed by a validation (the last step,
 * every eval_every), and over how many tokens (*cap). */
bool kvp_trainutil_eval_due(const kvp_trainer_config_t *cfg, int step, uint64_t *cap);

/* Whether a periodic checkpoint follows the step just done; the last step's
 * is written after the loop, with the stopped ones. */
bool kvp_trainutil_ckpt_due(const kvp_trainer_config_t *cfg, int step);

/* Tokens per second of `done` steps of BT x accum tokens in `seconds`, and
 * the seconds the `left` steps will take at that pace (-1: unknown). */
double kvp_trainutil_tok_per_s(int done, size_t BT, int accum, double seconds);
double kvp_trainutil_eta(int done, int left, double seconds);

/* Opens the session's CSV log (cfg->log_path; NULL: *log stays NULL) and
 * progress display (cfg->progress), and tells a resumed run where it
 * continues. */
int kvp_trainutil_session_open(const kvp_trainer_config_t *cfg, const char *header, bool resumed,
                               int step, FILE **log, kvp_progress_t **prog, kvp_err_t *err);

/* Says where a stopped run stopped and which checkpoint continues it. */
void kvp_trainutil_stopped_message(kvp_progress_t *prog, const kvp_trainer_config_t *cfg, int step);

/* Opens a CSV log for appending. A fresh run starts it anew with `header`; a
 * resumed run keeps the rows up to the checkpoint's step and drops later ones
 * (a killed run may have logged steps its checkpoint does not hold). */
FILE *kvp_trainutil_log_open(const char *path, const char *header, bool resumed, int step,
                             kvp_err_t *err);

#endif
