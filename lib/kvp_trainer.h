/* kvp_trainer: the training loop that turns a corpus into a model.
 *
 * One step: `accum` micro-batches of B random windows of T+1 tokens from the
 * train stream (kvp_corpus_sample with the run's data RNG), forward and
 * backward through kvp_train (gradients averaged over the micro-batches),
 * clipping to a global norm, AdamW (no decay on norm weights) with the
 * learning rate of kvp_lr_at. Every eval_every steps the validation loss;
 * every ckpt_every steps and at the end (or when stopped) a checkpoint.
 *
 * Repeatable: the weights after step k depend only on the initial weights,
 * the corpus, the settings and the seed — not on how often the run was
 * stopped and resumed, nor on evaluations in between.
 *
 * Losses are reported in nats per token and in bits per byte: the summed
 * cross-entropy of the scored tokens / ln 2 / the text bytes those tokens
 * stand for (BOS/EOS stand for none). */
#ifndef KVP_TRAINER_H
#define KVP_TRAINER_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "kvp_adamw.h"
#include "kvp_corpus.h"
#include "kvp_err.h"
#include "kvp_model.h"
#include "kvp_tokenizer.h"

typedef struct kvp_trainer_config {
    int batch;    /* B sequences per micro-batch */
    int ctx;      /* T tokens per sequence */
    int accum;    /* micro-batches per optimiser step */
    int steps;    /* optimiser steps in the whole run */
    int warmup;   /* warm-up steps (< 0: steps / 20) */
    float lr;     /* peak learning rate */
    float min_lr; /* learning rate at the end of the cosine */
    kvp_adamw_config_t adamw;
    float clip;    /* global gradient norm limit (<= 0: none) */
    uint64_t seed; /* data order; the caller seeds the initial weights */

    int eval_every;        /* steps between validation runs (0: only at the end) */
    int eval_tokens;       /* tokens scored per periodic validation (0: the whole split) */
    int final_eval_tokens; /* tokens scored by the final validation (0: the whole split;
                              default 131072) */

    const char *ckpt_path; /* NULL: no checkpoints */
    int ckpt_every;        /* steps between checkpoints (0: only at the end / stop) */
    bool resume;           /* continue from ckpt_path if it exists */

    const char *log_path; /* CSV log (NULL: none) */

    /* Stopping early, with a checkpoint, to be resumed later. */
    double time_limit_s;                    /* 0: none */
    int stop_after;                         /* stop after this step (0: never) */
    const volatile sig_atomic_t *stop_flag; /* set by a signal handler (may be NULL) */

    /* Progress display (NULL: silent); tty as in kvp_progress_new. */
    FILE *progress;
    int progress_tty;
    double progress_interval;

    /* The vocabulary the corpus was tokenized with, for bytes per token
     * (NULL: the byte-level one without merges). */
    const kvp_tokenizer_t *tok;
} kvp_trainer_config_t;

typedef struct kvp_trainer_result {
    int step;            /* steps done in the whole run */
    bool completed;      /* step == steps */
    bool resumed;        /* this session started from a checkpoint */
    double loss;         /* training loss of the last step, nats/token */
    double loss_bpb;     /* the same in bits per byte (train split's tokens per byte) */
    double val_loss;     /* last validation: nats/token (NAN: none) */
    double val_bpb;      /* last validation: bits per byte (NAN: none) */
    uint64_t val_tokens; /* tokens the last validation scored */
    uint64_t tokens;     /* tokens trained on in the whole run */
    double tok_per_s;    /* training throughput of this session */
    double elapsed_s;    /* wall time of the whole run, across resumes */
} kvp_trainer_result_t;

void kvp_trainer_config_default(kvp_trainer_config_t *c);

/* A model of shape cfg with initial weights from seed: N(0, 0.02), the
 * residual output projections (wo, w_down) scaled by 1/sqrt(2 n_layer) as in
 * GPT-2, norms 1. */
int kvp_trainer_init_model(kvp_model_t **out, const kvp_model_config_t *cfg, uint64_t seed,
                           kvp_err_t *err);

/* Trains m in place on c's train stream (tokenized beforehand; the validation
 * stream too when it is to be evaluated). On return m holds the weights of
 * the last step done; res says how far the run got. A run stopped early
 * (time limit, stop_after, stop_flag) returns 0 with res->completed false. */
int kvp_trainer_run(kvp_model_t *m, const kvp_corpus_t *c, const kvp_trainer_config_t *cfg,
                    kvp_trainer_result_t *res, kvp_err_t *err);

/* Validation loss of m over stream s (windows of T tokens, B per forward,
 * evenly spaced windows covering about max_tokens tokens; 0 = all). */
typedef struct kvp_eval {
    double loss;     /* nats per scored token */
    double bpb;      /* bits per byte */
    uint64_t tokens; /* scored */
    uint64_t bytes;  /* text bytes of the scored tokens */
} kvp_eval_t;
int kvp_trainer_evaluate(const kvp_model_t *m, const kvp_corpus_stream_t *s,
                         const kvp_tokenizer_t *tok, int B, int T, uint64_t max_tokens,
                         kvp_eval_t *out, kvp_err_t *err);

/* Writes m as a GGUF file with kvpred's byte-level vocabulary (merges may be
 * NULL) and the training record under kvpred.train.* (steps, tokens, seed,
 * val_bpb, tok_per_s, ...) when res/cfg are given, and the command that made
 * it as kvpred.train.command (may be NULL). Tensors are F32. */
int kvp_trainer_save_gguf(const kvp_model_t *m, const char *path, const char *name,
                          const char *const *merges, size_t n_merges,
                          const kvp_trainer_config_t *cfg, const kvp_trainer_result_t *res,
                          const char *command, kvp_err_t *err);

#endif
