/* kvpred train-kvp: KV Prediction's training — the auxiliary model and the
 * predictor trained together against the frozen base model (see
 * docs/training.md, "KV-Prediction training", and lib/kvp_kvptrain.h).
 *
 * The story: load both models (one vocabulary), the predictor to start from
 * (--init, e.g. `kvpred fit-predictor`'s closed-form one; else a fresh one),
 * tokenize the corpus with the shared vocabulary, run kvp_kvptrain_run, and
 * write OUT-aux.gguf (the fine-tuned aux with the vocabulary) and
 * OUT-predictor.gguf (bound to the new aux and the base). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_cmds.h"
#include "kvp_kvptrain.h"
#include "kvp_tool_util.h"
#include "kvp_train_tool.h"

#define MAX_CORPUS 256
#define CMD "kvpred train-kvp"

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvpred train-kvp --aux A.gguf --base B.gguf [--init P.gguf] -o OUT [options]\n"
            "writes OUT-aux.gguf and OUT-predictor.gguf (checkpoint OUT.ckpt, log OUT.csv)\n"
            "models\n"
            "  --aux FILE      auxiliary model to fine-tune\n"
            "  --base FILE     base model (frozen); same vocabulary as the aux\n"
            "  --init FILE     predictor to start from (e.g. from kvpred fit-predictor; must\n"
            "                  be made for this pair); default: uniform(+-1/sqrt(d_in)) weights\n"
            "  --layer-map L   without --init: aux layer per base layer, e.g. 0,0,1,1\n"
            "                  (default: spread evenly, ending on the last aux layer)\n"
            "corpus (default " KVP_CORPUS_DEFAULT_DIR " with --ext " KVP_CORPUS_DEFAULT_EXT ")\n"
            "  --corpus P      a directory or a file; repeatable\n"
            "  --ext E         in directories take only names ending in E\n"
            "  --holdout P     percent of files for validation and again for test (default 5)\n"
            "loss\n"
            "  --base-w W      weight of the base loss on the predicted cache (default 1)\n"
            "  --aux-w W       weight of the aux model's own loss (default 1)\n"
            "  --kv-w W        weight of the K/V consistency (L1) loss (default 1)\n"
            "  --zloss Z       z-loss coefficient of both models (default 1e-4)\n"
            "training\n"
            "  --ctx T         tokens per sequence (default 256)\n"
            "  --batch B       sequences per micro-batch (default 8)\n"
            "  --accum N       micro-batches per step (default 1)\n"
            "  --steps S       optimiser steps (default 200)\n"
            "  --lr LR         peak learning rate (default 3e-4)\n"
            "  --min-lr LR     final learning rate of the cosine (default lr/10)\n"
            "  --warmup W      warm-up steps (default steps/20)\n"
            "  --wd W          AdamW weight decay, not on norms or predictor biases (0.1)\n"
            "  --beta2 B       AdamW beta2 (default 0.95; beta1 0.9, eps 1e-8)\n"
            "  --clip C        joint gradient norm limit, 0 = none (default 1)\n"
            "  --seed S        predictor init from S (without --init), data order S+1 (1)\n"
            "evaluation, checkpoints, logs\n"
            "  --eval-every N  validation every N steps, 0 = only before and at the end (50)\n"
            "  --eval-tokens N tokens per periodic validation, 0 = all (default 32768)\n"
            "  --final-eval-tokens N  tokens for the first and last validation (131072)\n"
            "  --ckpt FILE     checkpoint path (default OUT.ckpt)\n"
            "  --ckpt-every N  checkpoint every N steps, 0 = only at the end (default 50)\n"
            "  --resume        continue from the checkpoint if it exists (same settings)\n"
            "  --log CSV       per-step log (default OUT.csv)\n"
            "  --time-limit S  stop after S seconds with a checkpoint (resume later)\n"
            "  --stop-after K  stop after step K with a checkpoint (for tests)\n"
            "  --progress-interval S  seconds between progress lines off a terminal (10)\n"
            "  --quiet         no progress display\n");
}

typedef struct opts {
    const char *aux, *base, *init, *out, *ext, *ckpt, *log;
    const char *corpus[MAX_CORPUS];
    int n_corpus, holdout;
    int32_t *layer_map;
    int n_map;
    bool min_lr_set, quiet;
    float time_limit;
    uint64_t seed;
    kvp_trainer_config_t tc;
    kvp_kvptrain_weights_t w;
} opts_t;

static int parse_layer_map(const char *s, opts_t *o) {
    size_t n = 1;
    for (const char *c = s; *c; c++)
        n += *c == ',';
    if (n > KVP_PREDICTOR_MAX_LAYERS) {
        fprintf(stderr, CMD ": --layer-map: more than %d entries\n", KVP_PREDICTOR_MAX_LAYERS);
        return -1;
    }
    free(o->layer_map);
    o->n_map = 0;
    o->layer_map = malloc(sizeof(int32_t) * n);
    if (!o->layer_map) return -1;
    char buf[32];
    for (const char *c = s; o->n_map < (int)n; o->n_map++) {
        size_t len = strcspn(c, ",");
        snprintf(buf, sizeof buf, "%.*s", (int)(len < 31 ? len : 31), c);
        int v;
        if (kvp_parse_int("--layer-map", buf, 0, KVP_PREDICTOR_MAX_LAYERS - 1, &v)) return -1;
        o->layer_map[o->n_map] = v;
        c += len + (c[len] == ',');
    }
    return 0;
}

enum {
    O_AUX = 256,
    O_BASE,
    O_INIT,
    O_MAP,
    O_CORPUS,
    O_EXT,
    O_HOLDOUT,
    O_BASE_W,
    O_AUX_W,
    O_KV_W,
    O_ZLOSS,
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

static int parse_one(int c, opts_t *o) {
    kvp_trainer_config_t *tc = &o->tc;
    switch (c) {
    case 'o':
        return o->out = optarg, 0;
    case O_AUX:
        return o->aux = optarg, 0;
    case O_BASE:
        return o->base = optarg, 0;
    case O_INIT:
        return o->init = optarg, 0;
    case O_MAP:
        return parse_layer_map(optarg, o);
    case O_CORPUS:
        if (o->n_corpus == MAX_CORPUS) {
            fprintf(stderr, CMD ": more than %d --corpus paths\n", MAX_CORPUS);
            return -1;
        }
        return o->corpus[o->n_corpus++] = optarg, 0;
    case O_EXT:
        return o->ext = optarg, 0;
    case O_HOLDOUT:
        return kvp_parse_int("--holdout", optarg, 0, 33, &o->holdout);
    case O_BASE_W:
        return kvp_parse_float("--base-w", optarg, 0.0f, 1e6f, &o->w.base_w);
    case O_AUX_W:
        return kvp_parse_float("--aux-w", optarg, 0.0f, 1e6f, &o->w.aux_w);
    case O_KV_W:
        return kvp_parse_float("--kv-w", optarg, 0.0f, 1e6f, &o->w.kv_w);
    case O_ZLOSS:
        return kvp_parse_float("--zloss", optarg, 0.0f, 1.0f, &o->w.zloss);
    case O_CTX:
        return kvp_parse_int("--ctx", optarg, 2, 1 << 16, &tc->ctx);
    case O_BATCH:
        return kvp_parse_int("--batch", optarg, 1, 1 << 16, &tc->batch);
    case O_ACCUM:
        return kvp_parse_int("--accum", optarg, 1, 1 << 16, &tc->accum);
    case O_STEPS:
        return kvp_parse_int("--steps", optarg, 1, 1 << 30, &tc->steps);
    case O_LR:
        return kvp_parse_float("--lr", optarg, 1e-8f, 1.0f, &tc->lr);
    case O_MIN_LR:
        o->min_lr_set = true;
        return kvp_parse_float("--min-lr", optarg, 0.0f, 1.0f, &tc->min_lr);
    case O_WARMUP:
        return kvp_parse_int("--warmup", optarg, 0, 1 << 30, &tc->warmup);
    case O_WD:
        return kvp_parse_float("--wd", optarg, 0.0f, 10.0f, &tc->adamw.weight_decay);
    case O_BETA2:
        return kvp_parse_float("--beta2", optarg, 0.0f, 0.99999f, &tc->adamw.beta2);
    case O_CLIP:
        return kvp_parse_float("--clip", optarg, 0.0f, 1e6f, &tc->clip);
    case O_SEED:
        return kvp_parse_u64("--seed", optarg, &o->seed);
    case O_EVAL_EVERY:
        return kvp_parse_int("--eval-every", optarg, 0, 1 << 30, &tc->eval_every);
    case O_EVAL_TOKENS:
        return kvp_parse_int("--eval-tokens", optarg, 0, 1 << 30, &tc->eval_tokens);
    case O_FINAL_EVAL:
        return kvp_parse_int("--final-eval-tokens", optarg, 0, 1 << 30, &tc->final_eval_tokens);
    case O_CKPT:
        return o->ckpt = optarg, 0;
    case O_CKPT_EVERY:
        return kvp_parse_int("--ckpt-every", optarg, 0, 1 << 30, &tc->ckpt_every);
    case O_RESUME:
        return tc->resume = true, 0;
    case O_LOG:
        return o->log = optarg, 0;
    case O_TIME_LIMIT:
        return kvp_parse_float("--time-limit", optarg, 0.0f, 1e9f, &o->time_limit);
    case O_STOP_AFTER:
        return kvp_parse_int("--stop-after", optarg, 1, 1 << 30, &tc->stop_after);
    case O_PROG_INT: {
        float v;
        int bad = kvp_parse_float("--progress-interval", optarg, 0.01f, 1e6f, &v);
        tc->progress_interval = v;
        return bad;
    }
    case O_QUIET:
        return o->quiet = true, 0;
    default:
        return -1;
    }
}

/* 0 = go on, 1 = --help printed, 2 = bad arguments. */
static int parse_args(int argc, char **argv, opts_t *o) {
    static const struct option lo[] = {{"out", required_argument, 0, 'o'},
                                       {"aux", required_argument, 0, O_AUX},
                                       {"base", required_argument, 0, O_BASE},
                                       {"init", required_argument, 0, O_INIT},
                                       {"layer-map", required_argument, 0, O_MAP},
                                       {"corpus", required_argument, 0, O_CORPUS},
                                       {"ext", required_argument, 0, O_EXT},
                                       {"holdout", required_argument, 0, O_HOLDOUT},
                                       {"base-w", required_argument, 0, O_BASE_W},
                                       {"aux-w", required_argument, 0, O_AUX_W},
                                       {"kv-w", required_argument, 0, O_KV_W},
                                       {"zloss", required_argument, 0, O_ZLOSS},
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
    memset(o, 0, sizeof *o);
    o->holdout = KVP_CORPUS_DEFAULT_HOLDOUT;
    o->seed = 1;
    kvp_trainer_config_default(&o->tc);
    o->tc.steps = 200;
    o->tc.lr = 3e-4f;
    o->tc.eval_every = 50;
    o->tc.ckpt_every = 50;
    kvp_kvptrain_weights_default(&o->w);
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:h", lo, NULL)) != -1) {
        if (c == 'h') return usage(stdout), 1;
        if (c == '?') return usage(stderr), 2;
        if (parse_one(c, o)) return 2;
    }
    if (optind < argc) {
        fprintf(stderr, CMD ": unexpected argument '%s' (see --help)\n", argv[optind]);
        return 2;
    }
    if (!o->aux || !o->base || !o->out) {
        fprintf(stderr, CMD ": --aux, --base and -o OUT are required (see --help)\n");
        return 2;
    }
    if (o->init && o->layer_map) {
        fprintf(stderr, CMD ": --layer-map comes with the --init predictor; give one of them\n");
        return 2;
    }
    if (!o->min_lr_set) o->tc.min_lr = o->tc.lr / 10;
    if (o->tc.min_lr > o->tc.lr) {
        fprintf(stderr, CMD ": --min-lr %g is above --lr %g\n", o->tc.min_lr, o->tc.lr);
        return 2;
    }
    if (o->n_corpus == 0) {
        o->corpus[o->n_corpus++] = KVP_CORPUS_DEFAULT_DIR;
        if (!o->ext) o->ext = KVP_CORPUS_DEFAULT_EXT;
    }
    return 0;
}

/* ---- models ------------------------------------------------------------- */

typedef struct model_file {
    kvp_gguf_t *g; /* kept open: the aux's vocabulary is copied into the output */
    kvp_model_t *m;
    kvp_tokenizer_t *tok;
} model_file_t;

static int open_model(const char *path, model_file_t *mf, kvp_err_t *err) {
    memset(mf, 0, sizeof *mf);
    int rc = kvp_gguf_open(&mf->g, path, err);
    if (!rc) rc = kvp_model_from_gguf(&mf->m, mf->g, err);
    if (!rc) rc = kvp_tokenizer_from_gguf(&mf->tok, mf->g, err);
    if (rc) kvp_err_wrap(err, "%s", path);
    return rc;
}

static void close_model(model_file_t *mf) {
    kvp_tokenizer_free(&mf->tok);
    kvp_model_free(&mf->m);
    kvp_gguf_free(&mf->g);
}

/* The predictor to start from: --init (made for this very pair) or new. */
static int start_predictor(const opts_t *o, const model_file_t *aux, const model_file_t *base,
                           kvp_predictor_t **p, kvp_err_t *err) {
    int rc;
    if (o->init) {
        rc = kvp_predictor_load(p, o->init, err);
        if (!rc) rc = kvp_predictor_check_pair(*p, aux->m, base->m, err);
        if (rc) kvp_err_wrap(err, "--init %s", o->init);
        return rc;
    }
    if (o->layer_map && o->n_map != base->m->cfg.n_layer)
        return kvp_err_set(err, KVP_EINVAL,
                           "--layer-map has %d entries but the base model has %d layers", o->n_map,
                           base->m->cfg.n_layer);
    rc = kvp_predictor_new(p, kvp_kv_shape_of(aux->m), kvp_kv_shape_of(base->m), o->layer_map, err);
    if (!rc) kvp_kvptrain_init_predictor(*p, o->seed);
    return rc;
}

static char *join(const char *a, const char *b) {
    char *s = malloc(strlen(a) + strlen(b) + 1);
    if (s) strcat(strcpy(s, a), b);
    return s;
}

static void print_eval(const char *when, const kvp_kvptrain_eval_t *e) {
    printf("%-7s base on predicted cache %.4f bpb (%.4f nats/token), aux %.4f bpb (%.4f), "
           "K/V L1 %.4f; base on its own cache %.4f bpb; %llu tokens\n",
           when, e->base_pred.bpb, e->base_pred.loss, e->aux.bpb, e->aux.loss, e->kv,
           e->base_own.bpb, (unsigned long long)e->base_pred.tokens);
}

int kvp_cmd_train_kvp(int argc, char **argv) {
    opts_t o;
    int prc = parse_args(argc, argv, &o);
    if (prc) {
        free(o.layer_map);
        return prc == 1 ? 0 : 2;
    }
    char *aux_out = join(o.out, "-aux.gguf"), *pred_out = join(o.out, "-predictor.gguf");
    char *ckpt_own = o.ckpt ? NULL : join(o.out, ".ckpt");
    char *log_own = o.log ? NULL : join(o.out, ".csv");
    kvp_trainer_config_t *tc = &o.tc;
    tc->ckpt_path = o.ckpt ? o.ckpt : ckpt_own;
    tc->log_path = o.log ? o.log : log_own;
    tc->seed = o.seed + 1;
    tc->time_limit_s = o.time_limit;
    tc->stop_flag = &kvp_train_tool_stop;
    tc->progress = o.quiet ? NULL : stderr;

    kvp_err_t err = {0};
    model_file_t aux = {0}, base = {0};
    kvp_predictor_t *p = NULL;
    kvp_corpus_t *corp = NULL;
    int status = 1, rc = 0;
    if (!aux_out || !pred_out || !tc->ckpt_path || !tc->log_path) {
        fprintf(stderr, CMD ": out of memory\n");
        goto done;
    }
    rc = open_model(o.aux, &aux, &err);
    if (!rc) rc = open_model(o.base, &base, &err);
    if (!rc && kvp_tokenizer_n_vocab(aux.tok) != kvp_tokenizer_n_vocab(base.tok))
        rc = kvp_err_set(&err, KVP_ESHAPE,
                         "the auxiliary model's vocabulary has %d tokens but the base model's "
                         "%d: KV Prediction needs one shared vocabulary",
                         kvp_tokenizer_n_vocab(aux.tok), kvp_tokenizer_n_vocab(base.tok));
    if (!rc) rc = start_predictor(&o, &aux, &base, &p, &err);
    if (!rc) rc = kvp_kvptrain_check(aux.m, base.m, p, &err);
    if (rc) {
        fprintf(stderr, CMD ": %s\n", err.msg[0] ? err.msg : kvp_err_name(rc));
        goto done;
    }
    if (kvp_train_tool_load_corpus(CMD, o.corpus, o.n_corpus, o.ext, o.holdout, aux.tok,
                                   o.quiet ? NULL : stderr, &corp))
        goto done;
    tc->tok = aux.tok;
    if (!o.quiet) {
        char da[160], db[160];
        kvp_train_tool_describe(&aux.m->cfg, aux.m->n_params, da, sizeof da);
        kvp_train_tool_describe(&base.m->cfg, base.m->n_params, db, sizeof db);
        fprintf(stderr,
                "aux: %s\nbase (frozen): %s\npredictor: %zu params from %s; %d steps of %d x %d "
                "x %d tokens; loss weights base %g aux %g kv %g; checkpoint %s, log %s\n",
                da, db, p->n_params, o.init ? o.init : "a fresh init", tc->steps, tc->accum,
                tc->batch, tc->ctx, o.w.base_w, o.w.aux_w, o.w.kv_w, tc->ckpt_path, tc->log_path);
    }
    kvp_train_tool_catch_signals();
    kvp_kvptrain_result_t res;
    rc = kvp_kvptrain_run(aux.m, base.m, p, corp, tc, &o.w, &res, &err);
    if (rc) {
        fprintf(stderr, CMD ": %s\n", err.msg[0] ? err.msg : kvp_err_name(rc));
        goto done;
    }
    if (!res.completed) {
        fprintf(stderr,
                CMD ": stopped at step %d of %d; the same command with --resume continues\n",
                res.step, tc->steps);
        status = kvp_train_tool_stop ? 130 : 0;
        goto done;
    }
    char command[2048] = "kvpred";
    for (int i = 0; i < argc; i++) {
        size_t l = strlen(command);
        snprintf(command + l, sizeof command - l, " %s", argv[i]);
    }
    rc = kvp_kvptrain_save_aux(aux.m, aux_out, aux.g, tc, &o.w, &res, command, &err);
    if (!rc) rc = kvp_kvptrain_save_predictor(p, aux.m, base.m, pred_out, &err);
    if (rc) {
        fprintf(stderr, CMD ": %s\n", err.msg);
        goto done;
    }
    if (res.have_before) print_eval("before:", &res.before);
    if (res.have_val) print_eval("after:", &res.val);
    printf("wrote %s and %s: %d steps, %.0f tokens, %.0f tok/s, %.1f s; last step loss %.4f "
           "(base %.4f, aux %.4f, K/V L1 %.4f)\n",
           aux_out, pred_out, res.step, (double)res.tokens, res.tok_per_s, res.elapsed_s,
           res.loss.total, res.loss.base, res.loss.aux, res.loss.kv);
    status = 0;
done:
    kvp_corpus_free(&corp);
    kvp_predictor_free(&p);
    close_model(&aux);
    close_model(&base);
    free(aux_out);
    free(pred_out);
    free(ckpt_own);
    free(log_own);
    free(o.layer_map);
    return status;
}
