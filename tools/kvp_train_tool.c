#include "kvp_train_tool.h"

#include <stdlib.h>
#include <string.h>

#include "kvp_tool_util.h"

volatile sig_atomic_t kvp_train_tool_stop = 0;

static void on_signal(int sig) {
    (void)sig;
    kvp_train_tool_stop = 1;
}

void kvp_train_tool_catch_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    /* the handler is used once: a second Ctrl-C ends the process at once */
    sa.sa_flags = SA_RESETHAND;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* ---- the training-schedule flags ----------------------------------------- */

void kvp_train_tool_flags_init(kvp_train_tool_flags_t *f) {
    memset(f, 0, sizeof *f);
    kvp_trainer_config_default(&f->tc);
    f->seed = 1;
}

/* The flags that set a number of the schedule. */
static int parse_number(kvp_train_tool_flags_t *f, int code, const char *arg) {
    kvp_trainer_config_t *tc = &f->tc;
    switch (code) {
    case KVP_TRAIN_OPT_CTX:
        return kvp_parse_int("--ctx", arg, 2, 1 << 16, &tc->ctx);
    case KVP_TRAIN_OPT_BATCH:
        return kvp_parse_int("--batch", arg, 1, 1 << 16, &tc->batch);
    case KVP_TRAIN_OPT_ACCUM:
        return kvp_parse_int("--accum", arg, 1, 1 << 16, &tc->accum);
    case KVP_TRAIN_OPT_STEPS:
        return kvp_parse_int("--steps", arg, 1, 1 << 30, &tc->steps);
    case KVP_TRAIN_OPT_LR:
        return kvp_parse_float("--lr", arg, 1e-8f, 1.0f, &tc->lr);
    case KVP_TRAIN_OPT_MIN_LR:
        f->min_lr_set = true;
        return kvp_parse_float("--min-lr", arg, 0.0f, 1.0f, &tc->min_lr);
    case KVP_TRAIN_OPT_WARMUP:
        return kvp_parse_int("--warmup", arg, 0, 1 << 30, &tc->warmup);
    case KVP_TRAIN_OPT_WD:
        return kvp_parse_float("--wd", arg, 0.0f, 10.0f, &tc->adamw.weight_decay);
    case KVP_TRAIN_OPT_BETA2:
        return kvp_parse_float("--beta2", arg, 0.0f, 0.99999f, &tc->adamw.beta2);
    case KVP_TRAIN_OPT_CLIP:
        return kvp_parse_float("--clip", arg, 0.0f, 1e6f, &tc->clip);
    case KVP_TRAIN_OPT_SEED:
        return kvp_parse_u64("--seed", arg, &f->seed);
    default:
        return -1;
    }
}

/* The flags of evaluation, checkpoints, logs and stopping. */
static int parse_run(kvp_train_tool_flags_t *f, int code, const char *arg) {
    kvp_trainer_config_t *tc = &f->tc;
    switch (code) {
    case KVP_TRAIN_OPT_EVAL_EVERY:
        return kvp_parse_int("--eval-every", arg, 0, 1 << 30, &tc->eval_every);
    case KVP_TRAIN_OPT_EVAL_TOKENS:
        return kvp_parse_int("--eval-tokens", arg, 0, 1 << 30, &tc->eval_tokens);
    case KVP_TRAIN_OPT_FINAL_EVAL:
        return kvp_parse_int("--final-eval-tokens", arg, 0, 1 << 30, &tc->final_eval_tokens);
    case KVP_TRAIN_OPT_CKPT:
        return f->ckpt = arg, 0;
    case KVP_TRAIN_OPT_CKPT_EVERY:
        return kvp_parse_int("--ckpt-every", arg, 0, 1 << 30, &tc->ckpt_every);
    case KVP_TRAIN_OPT_RESUME:
        return tc->resume = true, 0;
    case KVP_TRAIN_OPT_LOG:
        return f->log = arg, 0;
    case KVP_TRAIN_OPT_TIME_LIMIT:
        return kvp_parse_float("--time-limit", arg, 0.0f, 1e9f, &f->time_limit);
    case KVP_TRAIN_OPT_STOP_AFTER:
        return kvp_parse_int("--stop-after", arg, 1, 1 << 30, &tc->stop_after);
    case KVP_TRAIN_OPT_PROG_INT: {
        float v; /* the config holds a double */
        if (kvp_parse_float("--progress-interval", arg, 0.01f, 1e6f, &v)) return -1;
        return tc->progress_interval = v, 0;
    }
    case KVP_TRAIN_OPT_QUIET:
        return f->quiet = true, 0;
    default:
        return -1;
    }
}

int kvp_train_tool_flags_parse(kvp_train_tool_flags_t *f, int code, const char *arg) {
    /* the enum lists the schedule's numbers first, then the run's flags */
    return code < KVP_TRAIN_OPT_EVAL_EVERY ? parse_number(f, code, arg) : parse_run(f, code, arg);
}

int kvp_train_tool_parse(kvp_tool_corpus_t *c, kvp_train_tool_flags_t *f, const char *who, int code,
                         const char *arg) {
    switch (code) {
    case KVP_TOOL_OPT_CORPUS:
    case KVP_TOOL_OPT_EXT:
    case KVP_TOOL_OPT_HOLDOUT:
        return kvp_tool_corpus_flag(c, who, code, arg);
    default:
        return kvp_train_tool_flags_parse(f, code, arg);
    }
}

int kvp_train_tool_flags_check(kvp_train_tool_flags_t *f, const char *who) {
    kvp_trainer_config_t *tc = &f->tc;
    if (!f->min_lr_set) tc->min_lr = tc->lr / 10;
    if (tc->min_lr > tc->lr) {
        fprintf(stderr, "%s: --min-lr %g is above --lr %g\n", who, tc->min_lr, tc->lr);
        return -1;
    }
    return 0;
}

int kvp_train_tool_flags_apply(kvp_train_tool_flags_t *f, const char *who, const char *out,
                               const char *drop) {
    kvp_trainer_config_t *tc = &f->tc;
    if (!f->ckpt) f->own_ckpt = kvp_tool_derive_path(out, drop, ".ckpt");
    if (!f->log) f->own_log = kvp_tool_derive_path(out, drop, ".csv");
    tc->ckpt_path = f->ckpt ? f->ckpt : f->own_ckpt;
    tc->log_path = f->log ? f->log : f->own_log;
    tc->seed = f->seed + 1;
    tc->time_limit_s = f->time_limit;
    tc->stop_flag = &kvp_train_tool_stop;
    tc->progress = f->quiet ? NULL : stderr;
    if (tc->ckpt_path && tc->log_path) return 0;
    fprintf(stderr, "%s: out of memory\n", who);
    return -1;
}

void kvp_train_tool_flags_free(kvp_train_tool_flags_t *f) {
    free(f->own_ckpt);
    free(f->own_log);
    f->own_ckpt = f->own_log = NULL;
}

/* ---- the run --------------------------------------------------------------- */

void kvp_train_tool_command_line(int argc, char **argv, char *buf, size_t cap) {
    snprintf(buf, cap, "kvpred");
    for (int i = 0; i < argc; i++) {
        size_t l = strlen(buf);
        snprintf(buf + l, cap - l, " %s", argv[i]);
    }
}

int kvp_train_tool_stopped(const char *who, int step, int steps) {
    fprintf(stderr, "%s: stopped at step %d of %d; the same command with --resume continues\n", who,
            step, steps);
    return kvp_train_tool_stop ? 130 : 0;
}

int kvp_train_tool_load_corpus(const char *cmd, const char *const *paths, int n_paths,
                               const char *ext, int holdout_pct, const kvp_tokenizer_t *tok,
                               FILE *f, kvp_corpus_t **out) {
    kvp_err_t err = {0};
    kvp_corpus_opts_t o = {.ext = ext, .holdout_pct = holdout_pct};
    kvp_corpus_t *c = NULL;
    int rc = kvp_corpus_new(&c, paths, n_paths, &o, &err);
    if (!rc) rc = kvp_corpus_tokenize(c, KVP_SPLIT_TRAIN, tok, &err);
    if (!rc) rc = kvp_corpus_tokenize(c, KVP_SPLIT_VAL, tok, &err);
    if (rc) {
        fprintf(stderr, "%s: %s\n", cmd, err.msg[0] ? err.msg : kvp_err_name(rc));
        kvp_corpus_free(&c);
        return -1;
    }
    if (f) {
        const kvp_corpus_stream_t *tr = kvp_corpus_stream(c, KVP_SPLIT_TRAIN);
        const kvp_corpus_stream_t *va = kvp_corpus_stream(c, KVP_SPLIT_VAL);
        fprintf(f,
                "corpus: %zu files; train %zu files %.2f MB %zu tokens, validation %zu files "
                "%.2f MB, test %zu files %.2f MB (held out)\n",
                kvp_corpus_n_files(c), kvp_corpus_split_files(c, KVP_SPLIT_TRAIN),
                (double)tr->bytes / 1e6, tr->n, kvp_corpus_split_files(c, KVP_SPLIT_VAL),
                (double)va->bytes / 1e6, kvp_corpus_split_files(c, KVP_SPLIT_TEST),
                (double)kvp_corpus_split_bytes(c, KVP_SPLIT_TEST) / 1e6);
    }
    *out = c;
    return 0;
}

void kvp_train_tool_describe(const kvp_model_config_t *c, size_t n_params, char *buf, size_t cap) {
    snprintf(buf, cap, "%d layers, d %d, %d heads (%d kv), ffn %d: %.2fM params", c->n_layer,
             c->n_embd, c->n_head, c->n_kv_head, c->n_ff, (double)n_params / 1e6);
}

double kvp_train_tool_prefill_flops(const kvp_model_config_t *cfg, int n) {
    return kvp_model_flops(cfg, 0, n) / (double)n;
}
