/* What the training commands (`kvpred train`, `train-kvp`, `prune`,
 * `models`) share: the training-schedule flags, loading and tokenizing a
 * corpus with a one-line summary, stopping on Ctrl-C with a checkpoint, and
 * describing a model's size. */
#ifndef KVP_TRAIN_TOOL_H
#define KVP_TRAIN_TOOL_H

#include <getopt.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "kvp_corpus.h"
#include "kvp_model.h"
#include "kvp_tokenizer.h"
#include "kvp_tool_util.h"
#include "kvp_trainer.h"

/* Set by SIGINT/SIGTERM once kvp_train_tool_catch_signals() ran; a second
 * signal ends the process at once. */
extern volatile sig_atomic_t kvp_train_tool_stop;
void kvp_train_tool_catch_signals(void);

/* ---- the training-schedule flags ----------------------------------------- */

/* getopt_long codes of the training-schedule flags, clear of each command's
 * own codes (256 up) and of the corpus flags' (kvp_tool_util.h). */
enum {
    KVP_TRAIN_OPT_CTX = 0x1100,
    KVP_TRAIN_OPT_BATCH,
    KVP_TRAIN_OPT_ACCUM,
    KVP_TRAIN_OPT_STEPS,
    KVP_TRAIN_OPT_LR,
    KVP_TRAIN_OPT_MIN_LR,
    KVP_TRAIN_OPT_WARMUP,
    KVP_TRAIN_OPT_WD,
    KVP_TRAIN_OPT_BETA2,
    KVP_TRAIN_OPT_CLIP,
    KVP_TRAIN_OPT_SEED,
    KVP_TRAIN_OPT_EVAL_EVERY,
    KVP_TRAIN_OPT_EVAL_TOKENS,
    KVP_TRAIN_OPT_FINAL_EVAL,
    KVP_TRAIN_OPT_CKPT,
    KVP_TRAIN_OPT_CKPT_EVERY,
    KVP_TRAIN_OPT_RESUME,
    KVP_TRAIN_OPT_LOG,
    KVP_TRAIN_OPT_TIME_LIMIT,
    KVP_TRAIN_OPT_STOP_AFTER,
    KVP_TRAIN_OPT_PROG_INT,
    KVP_TRAIN_OPT_QUIET,
};

/* Every training-schedule flag as getopt_long table entries, for the
 * commands that train a whole run (train, train-kvp); a command with fewer
 * lists its own entries with these codes. */
// clang-format off
#define KVP_TRAIN_TOOL_OPTIONS                                                                     \
    {"ctx", required_argument, 0, KVP_TRAIN_OPT_CTX},                                              \
    {"batch", required_argument, 0, KVP_TRAIN_OPT_BATCH},                                          \
    {"accum", required_argument, 0, KVP_TRAIN_OPT_ACCUM},                                          \
    {"steps", required_argument, 0, KVP_TRAIN_OPT_STEPS},                                          \
    {"lr", required_argument, 0, KVP_TRAIN_OPT_LR},                                                \
    {"min-lr", required_argument, 0, KVP_TRAIN_OPT_MIN_LR},                                        \
    {"warmup", required_argument, 0, KVP_TRAIN_OPT_WARMUP},                                        \
    {"wd", required_argument, 0, KVP_TRAIN_OPT_WD},                                                \
    {"beta2", required_argument, 0, KVP_TRAIN_OPT_BETA2},                                          \
    {"clip", required_argument, 0, KVP_TRAIN_OPT_CLIP},                                            \
    {"seed", required_argument, 0, KVP_TRAIN_OPT_SEED},                                            \
    {"eval-every", required_argument, 0, KVP_TRAIN_OPT_EVAL_EVERY},                                \
    {"eval-tokens", required_argument, 0, KVP_TRAIN_OPT_EVAL_TOKENS},                              \
    {"final-eval-tokens", required_argument, 0, KVP_TRAIN_OPT_FINAL_EVAL},                         \
    {"ckpt", required_argument, 0, KVP_TRAIN_OPT_CKPT},                                            \
    {"ckpt-every", required_argument, 0, KVP_TRAIN_OPT_CKPT_EVERY},                                \
    {"resume", no_argument, 0, KVP_TRAIN_OPT_RESUME},                                              \
    {"log", required_argument, 0, KVP_TRAIN_OPT_LOG},                                              \
    {"time-limit", required_argument, 0, KVP_TRAIN_OPT_TIME_LIMIT},                                \
    {"stop-after", required_argument, 0, KVP_TRAIN_OPT_STOP_AFTER},                                \
    {"progress-interval", required_argument, 0, KVP_TRAIN_OPT_PROG_INT},                           \
    {"quiet", no_argument, 0, KVP_TRAIN_OPT_QUIET}
// clang-format on

/* The schedule as the flags give it. Each command sets its own defaults
 * into tc (and seed) after kvp_train_tool_flags_init. */
typedef struct kvp_train_tool_flags {
    kvp_trainer_config_t tc;
    const char *ckpt, *log;   /* --ckpt, --log; NULL: named after OUT */
    char *own_ckpt, *own_log; /* those names, from kvp_train_tool_flags_apply */
    float time_limit;         /* --time-limit, seconds (0: none) */
    uint64_t seed;            /* --seed; its use is the command's */
    bool min_lr_set, quiet;
} kvp_train_tool_flags_t;

/* kvp_trainer_config_default and seed 1. */
void kvp_train_tool_flags_init(kvp_train_tool_flags_t *f);

/* One flag (code KVP_TRAIN_OPT_*) with its argument (NULL for those without
 * one); prints kvp_parse_*'s message and returns -1 on a bad value. */
int kvp_train_tool_flags_parse(kvp_train_tool_flags_t *f, int code, const char *arg);

/* A flag of a command that trains on a corpus: the corpus flags
 * (kvp_tool_corpus_flag) or the schedule's (kvp_train_tool_flags_parse). */
int kvp_train_tool_parse(kvp_tool_corpus_t *c, kvp_train_tool_flags_t *f, const char *who, int code,
                         const char *arg);

/* After the flags: --min-lr defaults to lr/10; "WHO: --min-lr A is above
 * --lr B" and -1 when it is. */
int kvp_train_tool_flags_check(kvp_train_tool_flags_t *f, const char *who);

/* For a whole run written to OUT: the checkpoint and the log default to OUT
 * (its ending `drop` removed, kvp_tool_derive_path) with .ckpt and .csv; the
 * data order comes from seed + 1 (seed itself is for initial weights); Ctrl-C
 * (kvp_train_tool_catch_signals) and --time-limit stop; progress on stderr
 * unless --quiet. "WHO: out of memory" and -1 when a name cannot be made. */
int kvp_train_tool_flags_apply(kvp_train_tool_flags_t *f, const char *who, const char *out,
                               const char *drop);

void kvp_train_tool_flags_free(kvp_train_tool_flags_t *f);

/* ---- the run --------------------------------------------------------------- */

/* "kvpred ARGV..." into buf, the command line recorded in the written model. */
void kvp_train_tool_command_line(int argc, char **argv, char *buf, size_t cap);

/* A run that stopped before its last step: tells how to go on and returns
 * the exit status (130 after Ctrl-C, else 0). */
int kvp_train_tool_stopped(const char *who, int step, int steps);

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
