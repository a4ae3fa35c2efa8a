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

#define MAX_CORPUS 256

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

/* OUT with its .gguf suffix replaced by suffix (or suffix appended). */
static char *derive(const char *out, const char *suffix) {
    size_t n = strlen(out);
    if (n > 5 && !strcmp(out + n - 5, ".gguf")) n -= 5;
    char *p = malloc(n + strlen(suffix) + 1);
    if (p) {
        memcpy(p, out, n);
        strcpy(p + n, suffix);
    }
    return p;
}

int kvp_cmd_train(int argc, char **argv) {
    enum {
        O_CORPUS = 256,
        O_EXT,
        O_HOLDOUT,
        O_LAYERS,
        O_EMBD,
        O_HEADS,
        O_KV_HEADS,
        O_FFN,
        O_CTX,
        O_BATCH,
        O_ACCUM,
        O_STEPS,
        O_LR,
        O_MIN_LR,
        O_WARMUP,
        O_WD,
        O_BETA2,
        O_CLIP,
        O_SEED,
        O_EVAL_EVERY,
        O_EVAL_TOKENS,
        O_FINAL_EVAL,
        O_CKPT,
        O_CKPT_EVERY,
        O_RESUME,
        O_LOG,
        O_TIME_LIMIT,
        O_STOP_AFTER,
        O_PROG_INT,
        O_QUIET,
    };
    static const struct option lo[] = {{"out", required_argument, 0, 'o'},
                                       {"corpus", required_argument, 0, O_CORPUS},
                                       {"ext", required_argument, 0, O_EXT},
                                       {"holdout", required_argument, 0, O_HOLDOUT},
                                       {"layers", required_argument, 0, O_LAYERS},
                                       {"embd", required_argument, 0, O_EMBD},
                                       {"heads", required_argument, 0, O_HEADS},
                                       {"kv-heads", required_argument, 0, O_KV_HEADS},
                                       {"ffn", required_argument, 0, O_FFN},
                                       {"ctx", required_argument, 0, O_CTX},
                                       {"batch", required_argument, 0, O_BATCH},
                                       {"accum", required_argument, 0, O_ACCUM},
                                       {"steps", required_argument, 0, O_STEPS},
                                       {"lr", required_argument, 0, O_LR},
                                       {"min-lr", required_argument, 0, O_MIN_LR},
                                       {"warmup", required_argument, 0, O_WARMUP},
                                       {"wd", required_argument, 0, O_WD},
                                       {"beta2", required_argument, 0, O_BETA2},
                                       {"clip", required_argument, 0, O_CLIP},
                                       {"seed", required_argument, 0, O_SEED},
                                       {"eval-every", required_argument, 0, O_EVAL_EVERY},
                                       {"eval-tokens", required_argument, 0, O_EVAL_TOKENS},
                                       {"final-eval-tokens", required_argument, 0, O_FINAL_EVAL},
                                       {"ckpt", required_argument, 0, O_CKPT},
                                       {"ckpt-every", required_argument, 0, O_CKPT_EVERY},
                                       {"resume", no_argument, 0, O_RESUME},
                                       {"log", required_argument, 0, O_LOG},
                                       {"time-limit", required_argument, 0, O_TIME_LIMIT},
                                       {"stop-after", required_argument, 0, O_STOP_AFTER},
                                       {"progress-interval", required_argument, 0, O_PROG_INT},
                                       {"quiet", no_argument, 0, O_QUIET},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    kvp_model_config_t mc = {.n_layer = 4, .n_embd = 256, .n_head = 4, .tied_output = true};
    kvp_trainer_config_t tc;
    kvp_trainer_config_default(&tc);
    const char *corpus[MAX_CORPUS];
    int n_corpus = 0;
    const char *out = NULL, *ext = NULL, *ckpt = NULL, *log = NULL;
    int holdout = KVP_CORPUS_DEFAULT_HOLDOUT;
    bool min_lr_set = false, quiet = false;
    float time_limit = 0;
    uint64_t seed = 1;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:h", lo, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case 'o':
            out = optarg;
            break;
        case O_CORPUS:
            if (n_corpus == MAX_CORPUS) {
                fprintf(stderr, "kvpred train: more than %d --corpus paths\n", MAX_CORPUS);
                return 2;
            }
            corpus[n_corpus++] = optarg;
            break;
        case O_EXT:
            ext = optarg;
            break;
        case O_HOLDOUT:
            bad = kvp_parse_int("--holdout", optarg, 0, 33, &holdout);
            break;
        case O_LAYERS:
            bad = kvp_parse_int("--layers", optarg, 1, 256, &mc.n_layer);
            break;
        case O_EMBD:
            bad = kvp_parse_int("--embd", optarg, 8, 8192, &mc.n_embd);
            break;
        case O_HEADS:
            bad = kvp_parse_int("--heads", optarg, 1, 256, &mc.n_head);
            break;
        case O_KV_HEADS:
            bad = kvp_parse_int("--kv-heads", optarg, 1, 256, &mc.n_kv_head);
            break;
        case O_FFN:
            bad = kvp_parse_int("--ffn", optarg, 1, 1 << 16, &mc.n_ff);
            break;
        case O_CTX:
            bad = kvp_parse_int("--ctx", optarg, 2, 1 << 16, &tc.ctx);
            break;
        case O_BATCH:
            bad = kvp_parse_int("--batch", optarg, 1, 1 << 16, &tc.batch);
            break;
        case O_ACCUM:
            bad = kvp_parse_int("--accum", optarg, 1, 1 << 16, &tc.accum);
            break;
        case O_STEPS:
            bad = kvp_parse_int("--steps", optarg, 1, 1 << 30, &tc.steps);
            break;
        case O_LR:
            bad = kvp_parse_float("--lr", optarg, 1e-8f, 1.0f, &tc.lr);
            break;
        case O_MIN_LR:
            bad = kvp_parse_float("--min-lr", optarg, 0.0f, 1.0f, &tc.min_lr);
            min_lr_set = true;
            break;
        case O_WARMUP:
            bad = kvp_parse_int("--warmup", optarg, 0, 1 << 30, &tc.warmup);
            break;
        case O_WD:
            bad = kvp_parse_float("--wd", optarg, 0.0f, 10.0f, &tc.adamw.weight_decay);
            break;
        case O_BETA2:
            bad = kvp_parse_float("--beta2", optarg, 0.0f, 0.99999f, &tc.adamw.beta2);
            break;
        case O_CLIP:
            bad = kvp_parse_float("--clip", optarg, 0.0f, 1e6f, &tc.clip);
            break;
        case O_SEED:
            bad = kvp_parse_u64("--seed", optarg, &seed);
            break;
        case O_EVAL_EVERY:
            bad = kvp_parse_int("--eval-every", optarg, 0, 1 << 30, &tc.eval_every);
            break;
        case O_EVAL_TOKENS:
            bad = kvp_parse_int("--eval-tokens", optarg, 0, 1 << 30, &tc.eval_tokens);
            break;
        case O_FINAL_EVAL:
            bad = kvp_parse_int("--final-eval-tokens", optarg, 0, 1 << 30, &tc.final_eval_tokens);
            break;
        case O_CKPT:
            ckpt = optarg;
            break;
        case O_CKPT_EVERY:
            bad = kvp_parse_int("--ckpt-every", optarg, 0, 1 << 30, &tc.ckpt_every);
            break;
        case O_RESUME:
            tc.resume = true;
            break;
        case O_LOG:
            log = optarg;
            break;
        case O_TIME_LIMIT:
            bad = kvp_parse_float("--time-limit", optarg, 0.0f, 1e9f, &time_limit);
            break;
        case O_STOP_AFTER:
            bad = kvp_parse_int("--stop-after", optarg, 1, 1 << 30, &tc.stop_after);
            break;
        case O_PROG_INT: {
            float v;
            bad = kvp_parse_float("--progress-interval", optarg, 0.01f, 1e6f, &v);
            tc.progress_interval = v;
            break;
        }
        case O_QUIET:
            quiet = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (bad) return 2;
    }
    for (; optind < argc; optind++) {
        if (n_corpus == MAX_CORPUS) {
            fprintf(stderr, "kvpred train: more than %d corpus paths\n", MAX_CORPUS);
            return 2;
        }
        corpus[n_corpus++] = argv[optind];
    }
    if (!out) {
        fprintf(stderr, "kvpred train: -o OUT.gguf is required (see kvpred train --help)\n");
        return 2;
    }
    if (n_corpus == 0) {
        corpus[n_corpus++] = KVP_CORPUS_DEFAULT_DIR;
        if (!ext) ext = KVP_CORPUS_DEFAULT_EXT;
    }
    if (!min_lr_set) tc.min_lr = tc.lr / 10;
    if (tc.min_lr > tc.lr) {
        fprintf(stderr, "kvpred train: --min-lr %g is above --lr %g\n", tc.min_lr, tc.lr);
        return 2;
    }
    if (mc.n_embd % mc.n_head) {
        fprintf(stderr, "kvpred train: --embd %d is not a multiple of --heads %d\n", mc.n_embd,
                mc.n_head);
        return 2;
    }
    if (mc.n_ff == 0) mc.n_ff = (mc.n_embd * 8 / 3 + 31) / 32 * 32;
    mc.n_ctx_train = tc.ctx;
    mc.n_vocab = kvp_tokenizer_bytelevel_n_vocab(0);

    char *ckpt_own = ckpt ? NULL : derive(out, ".ckpt");
    char *log_own = log ? NULL : derive(out, ".csv");
    tc.ckpt_path = ckpt ? ckpt : ckpt_own;
    tc.log_path = log ? log : log_own;
    tc.seed = seed + 1;
    tc.time_limit_s = time_limit;
    tc.stop_flag = &kvp_train_tool_stop;
    tc.progress = quiet ? NULL : stderr;

    kvp_err_t err = {0};
    kvp_corpus_t *corp = NULL;
    kvp_model_t *m = NULL;
    int status = 1;
    if (!tc.ckpt_path || !tc.log_path) {
        fprintf(stderr, "kvpred train: out of memory\n");
        goto done;
    }
    if (kvp_train_tool_load_corpus("kvpred train", corpus, n_corpus, ext, holdout, NULL,
                                   quiet ? NULL : stderr, &corp))
        goto done;
    int rc = kvp_trainer_init_model(&m, &mc, seed, &err);
    if (rc) {
        fprintf(stderr, "kvpred train: %s\n", err.msg);
        goto done;
    }
    if (!quiet) {
        char desc[160];
        kvp_train_tool_describe(&m->cfg, m->n_params, desc, sizeof desc);
        fprintf(stderr,
                "model: %s; %d steps of %d x %d x %d tokens, %.2f GFLOP a step; checkpoint %s, "
                "log %s\n",
                desc, tc.steps, tc.accum, tc.batch, tc.ctx,
                tc.accum * kvp_train_step_flops(&m->cfg, tc.batch, tc.ctx) / 1e9, tc.ckpt_path,
                tc.log_path);
    }
    kvp_train_tool_catch_signals();
    kvp_trainer_result_t res;
    rc = kvp_trainer_run(m, corp, &tc, &res, &err);
    if (rc) {
        fprintf(stderr, "kvpred train: %s\n", err.msg[0] ? err.msg : kvp_err_name(rc));
        goto done;
    }
    if (!res.completed) {
        fprintf(stderr,
                "kvpred train: stopped at step %d of %d; the same command with --resume "
                "continues\n",
                res.step, tc.steps);
        status = kvp_train_tool_stop ? 130 : 0;
        goto done;
    }
    /* the command line, for the record */
    char command[2048] = "kvpred";
    for (int i = 0; i < argc; i++) {
        size_t l = strlen(command);
        snprintf(command + l, sizeof command - l, " %s", argv[i]);
    }
    rc = kvp_trainer_save_gguf(m, out, "kvpred trained model", NULL, 0, &tc, &res, command, &err);
    if (rc) {
        fprintf(stderr, "kvpred train: %s\n", err.msg);
        goto done;
    }
    printf("wrote %s: %zu parameters, %d steps, %.0f tokens; train %.4f bpb, validation %.4f "
           "bpb (%.4f nats/token over %llu tokens); %.0f tok/s, %.1f s\n",
           out, m->n_params, res.step, (double)res.tokens, res.loss_bpb, res.val_bpb, res.val_loss,
           (unsigned long long)res.val_tokens, res.tok_per_s, res.elapsed_s);
    status = 0;
done:
    kvp_model_free(&m);
    kvp_corpus_free(&corp);
    free(ckpt_own);
    free(log_own);
    return status;
}
