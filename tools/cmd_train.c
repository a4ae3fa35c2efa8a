/* kvpred train: trains a Llama-family model from scratch on a corpus of text
 * files and writes it as GGUF with kvpred's byte-level vocabulary. See
 * docs/training.md for the recipe, the split rule and resuming. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_cmds.h"
#include "kvp_tool_util.h"
#include "kvp_train.h"
#include "kvp_train_tool.h"
#include "kvp_trainer.h"

#define CMD "kvpred train"

static void usage(FILE *f) {
    fprintf(f, "usage: kvpred train -o OUT.gguf [--corpus DIR|FILE]... [options]\n"
               "corpus (default " KVP_CORPUS_DEFAULT_DIR " with --ext " KVP_CORPUS_DEFAULT_EXT ")\n"
               "  --corpus P      a directory (walked recursively) or a file; repeatable;\n"
               "                  extra arguments after the options are corpus paths too\n"
               "  --ext E         in directories take only names ending in E (default: every\n"
               "                  text file; " KVP_CORPUS_DEFAULT_EXT " for the default corpus)\n"
               "  --holdout P     percent of files for validation and again for test (default 5)\n"
               "model\n"
               "  --layers N      transformer blocks (default 4)\n"
               "  --embd D        width (default 256)\n"
               "  --heads H       attention heads (default 4)\n"
               "  --kv-heads K    key/value heads (default H)\n"
               "  --ffn F         feed-forward width (default 8D/3 rounded up to 32)\n"
               "training\n"
               "  --ctx T         tokens per sequence (default 256)\n"
               "  --batch B       sequences per micro-batch (default 8)\n"
               "  --accum N       micro-batches per step (default 1)\n"
               "  --steps S       optimiser steps (default 1000)\n"
               "  --lr LR         peak learning rate (default 3e-3)\n"
               "  --min-lr LR     final learning rate of the cosine (default lr/10)\n"
               "  --warmup W      warm-up steps (default steps/20)\n"
               "  --wd W          AdamW weight decay, not on norms (default 0.1)\n"
               "  --beta2 B       AdamW beta2 (default 0.95; beta1 0.9, eps 1e-8)\n"
               "  --clip C        gradient global-norm limit, 0 = none (default 1)\n"
               "  --seed S        initial weights from S, data order from S+1 (default 1)\n"
               "evaluation, checkpoints, logs\n"
               "  --eval-every N  validation every N steps, 0 = only at the end (default 100)\n"
               "  --eval-tokens N tokens per periodic validation, 0 = all (default 32768)\n"
               "  --final-eval-tokens N  tokens for the final validation, 0 = all (131072)\n"
               "  --ckpt FILE     checkpoint path (default OUT with .ckpt for .gguf)\n"
               "  --ckpt-every N  checkpoint every N steps, 0 = only at the end (default 100)\n"
               "  --resume        continue from the checkpoint if it exists (same settings)\n"
               "  --log CSV       per-step log (default OUT with .csv for .gguf)\n"
               "  --time-limit S  stop after S seconds with a checkpoint (resume later)\n"
               "  --stop-after K  stop after step K with a checkpoint (for tests)\n"
               "  --progress-interval S  seconds between progress lines off a terminal (10)\n"
               "  --quiet         no progress display\n"
               "Ctrl-C stops at the next step with a checkpoint; --resume continues exactly.\n");
}

typedef struct opts {
    const char *out;
    kvp_model_config_t mc;
    kvp_tool_corpus_t corpus;
    kvp_train_tool_flags_t train;
} opts_t;

enum { O_LAYERS = 256, O_EMBD, O_HEADS, O_KV_HEADS, O_FFN };

/* The model's shape; the corpus and schedule flags go to their helpers. */
static int parse_one(int c, void *opts) {
    opts_t *o = opts;
    kvp_model_config_t *mc = &o->mc;
    switch (c) {
    case 'o':
        return o->out = optarg, 0;
    case O_LAYERS:
        return kvp_parse_int("--layers", optarg, 1, 256, &mc->n_layer);
    case O_EMBD:
        return kvp_parse_int("--embd", optarg, 8, 8192, &mc->n_embd);
    case O_HEADS:
        return kvp_parse_int("--heads", optarg, 1, 256, &mc->n_head);
    case O_KV_HEADS:
        return kvp_parse_int("--kv-heads", optarg, 1, 256, &mc->n_kv_head);
    case O_FFN:
        return kvp_parse_int("--ffn", optarg, 1, 1 << 16, &mc->n_ff);
    default:
        return kvp_train_tool_parse(&o->corpus, &o->train, CMD, c, optarg);
    }
}

/* 0 = go on, 1 = --help printed, 2 = bad arguments. */
static int parse_args(int argc, char **argv, opts_t *o) {
    static const struct option lo[] = {{"out", required_argument, 0, 'o'},
                                       KVP_TOOL_CORPUS_OPTIONS,
                                       {"layers", required_argument, 0, O_LAYERS},
                                       {"embd", required_argument, 0, O_EMBD},
                                       {"heads", required_argument, 0, O_HEADS},
                                       {"kv-heads", required_argument, 0, O_KV_HEADS},
                                       {"ffn", required_argument, 0, O_FFN},
                                       KVP_TRAIN_TOOL_OPTIONS,
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    memset(o, 0, sizeof *o);
    o->mc = (kvp_model_config_t){.n_layer = 4, .n_embd = 256, .n_head = 4, .tied_output = true};
    kvp_tool_corpus_init(&o->corpus, true, 0);
    kvp_train_tool_flags_init(&o->train);
    int rc = kvp_tool_getopt(argc, argv, "o:h", lo, usage, parse_one, o);
    if (rc) return rc;
    /* extra arguments after the options are corpus paths too */
    for (; optind < argc; optind++)
        if (kvp_tool_corpus_add(&o->corpus, CMD, "corpus paths", argv[optind])) return 2;
    if (!o->out) {
        fprintf(stderr, CMD ": -o OUT.gguf is required (see kvpred train --help)\n");
        return 2;
    }
    kvp_tool_corpus_finish(&o->corpus);
    if (kvp_train_tool_flags_check(&o->train, CMD)) return 2;
    kvp_model_config_t *mc = &o->mc;
    if (mc->n_embd % mc->n_head) {
        fprintf(stderr, CMD ": --embd %d is not a multiple of --heads %d\n", mc->n_embd,
                mc->n_head);
        return 2;
    }
    if (mc->n_ff == 0) mc->n_ff = (mc->n_embd * 8 / 3 + 31) / 32 * 32;
    mc->n_ctx_train = o->train.tc.ctx;
    mc->n_vocab = kvp_tokenizer_bytelevel_n_vocab(0);
    return 0;
}

int kvp_cmd_train(int argc, char **argv) {
    opts_t o;
    int prc = parse_args(argc, argv, &o);
    if (prc) return prc == 1 ? 0 : 2;
    kvp_trainer_config_t *tc = &o.train.tc;
    bool quiet = o.train.quiet;
    kvp_err_t err = {0};
    kvp_corpus_t *corp = NULL;
    kvp_model_t *m = NULL;
    int status = 1;
    /* checkpoint and log beside OUT: a.gguf -> a.ckpt, a.csv */
    if (kvp_train_tool_flags_apply(&o.train, CMD, o.out, ".gguf")) goto done;
    const kvp_tool_corpus_t *cp = &o.corpus;
    if (kvp_train_tool_load_corpus(CMD, cp->path, cp->n_path, cp->ext, cp->holdout, NULL,
                                   quiet ? NULL : stderr, &corp))
        goto done;
    int rc = kvp_trainer_init_model(&m, &o.mc, o.train.seed, &err);
    if (rc) {
        fprintf(stderr, CMD ": %s\n", err.msg);
        goto done;
    }
    if (!quiet) {
        char desc[160];
        kvp_train_tool_describe(&m->cfg, m->n_params, desc, sizeof desc);
        fprintf(stderr,
                "model: %s; %d steps of %d x %d x %d tokens, %.2f GFLOP a step; checkpoint %s, "
                "log %s\n",
                desc, tc->steps, tc->accum, tc->batch, tc->ctx,
                tc->accum * kvp_train_step_flops(&m->cfg, tc->batch, tc->ctx) / 1e9, tc->ckpt_path,
                tc->log_path);
    }
    kvp_train_tool_catch_signals();
    kvp_trainer_result_t res;
    rc = kvp_trainer_run(m, corp, tc, &res, &err);
    if (rc) {
        fprintf(stderr, CMD ": %s\n", err.msg[0] ? err.msg : kvp_err_name(rc));
        goto done;
    }
    if (!res.completed) {
        status = kvp_train_tool_stopped(CMD, res.step, tc->steps);
        goto done;
    }
    char command[2048]; /* the command line, for the record */
    kvp_train_tool_command_line(argc, argv, command, sizeof command);
    rc = kvp_trainer_save_gguf(m, o.out, "kvpred trained model", NULL, 0, tc, &res, command, &err);
    if (rc) {
        fprintf(stderr, CMD ": %s\n", err.msg);
        goto done;
    }
    printf("wrote %s: %zu parameters, %d steps, %.0f tokens; train %.4f bpb, validation %.4f "
           "bpb (%.4f nats/token over %llu tokens); %.0f tok/s, %.1f s\n",
           o.out, m->n_params, res.step, (double)res.tokens, res.loss_bpb, res.val_bpb,
           res.val_loss, (unsigned long long)res.val_tokens, res.tok_per_s, res.elapsed_s);
    status = 0;
done:
    kvp_model_free(&m);
    kvp_corpus_free(&corp);
    kvp_train_tool_flags_free(&o.train);
    return status;
}
