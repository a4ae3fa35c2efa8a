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
    const char *aux, *base, *init, *out;
    int32_t *layer_map;
    int n_map;
    kvp_tool_corpus_t corpus;
    kvp_train_tool_flags_t train;
    kvp_kvptrain_weights_t w;
} opts_t;

enum { O_AUX = 256, O_BASE, O_INIT, O_MAP, O_BASE_W, O_AUX_W, O_KV_W, O_ZLOSS };

/* The models and the loss weights; the corpus and schedule flags go to
 * their helpers. */
static int parse_one(int c, void *opts) {
    opts_t *o = opts;
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
        return kvp_parse_layer_map(CMD, optarg, &o->layer_map, &o->n_map);
    case O_BASE_W:
        return kvp_parse_float("--base-w", optarg, 0.0f, 1e6f, &o->w.base_w);
    case O_AUX_W:
        return kvp_parse_float("--aux-w", optarg, 0.0f, 1e6f, &o->w.aux_w);
    case O_KV_W:
        return kvp_parse_float("--kv-w", optarg, 0.0f, 1e6f, &o->w.kv_w);
    case O_ZLOSS:
        return kvp_parse_float("--zloss", optarg, 0.0f, 1.0f, &o->w.zloss);
    default:
        return kvp_train_tool_parse(&o->corpus, &o->train, CMD, c, optarg);
    }
}

/* 0 = go on, 1 = --help printed, 2 = bad arguments. */
static int parse_args(int argc, char **argv, opts_t *o) {
    static const struct option lo[] = {{"out", required_argument, 0, 'o'},
                                       {"aux", required_argument, 0, O_AUX},
                                       {"base", required_argument, 0, O_BASE},
                                       {"init", required_argument, 0, O_INIT},
                                       {"layer-map", required_argument, 0, O_MAP},
                                       KVP_TOOL_CORPUS_OPTIONS,
                                       {"base-w", required_argument, 0, O_BASE_W},
                                       {"aux-w", required_argument, 0, O_AUX_W},
                                       {"kv-w", required_argument, 0, O_KV_W},
                                       {"zloss", required_argument, 0, O_ZLOSS},
                                       KVP_TRAIN_TOOL_OPTIONS,
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    memset(o, 0, sizeof *o);
    kvp_tool_corpus_init(&o->corpus, true, 0);
    kvp_train_tool_flags_init(&o->train);
    /* the aux is fine-tuned, not trained from scratch: fewer steps and a
     * lower rate than kvpred train's */
    o->train.tc.steps = 200;
    o->train.tc.lr = 3e-4f;
    o->train.tc.eval_every = 50;
    o->train.tc.ckpt_every = 50;
    kvp_kvptrain_weights_default(&o->w);
    int rc = kvp_tool_getopt(argc, argv, "o:h", lo, usage, parse_one, o);
    if (rc) return rc;
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
    if (kvp_train_tool_flags_check(&o->train, CMD)) return 2;
    kvp_tool_corpus_finish(&o->corpus);
    return 0;
}

/* ---- models ------------------------------------------------------------- */

/* The predictor to start from: --init (made for this very pair) or new. */
static int start_predictor(const opts_t *o, const kvp_tool_model_t *aux,
                           const kvp_tool_model_t *base, kvp_predictor_t **p, kvp_err_t *err) {
    int rc;
    if (o->init) {
        rc = kvp_predictor_load(p, o->init, err);
        if (!rc) rc = kvp_predictor_check_pair(*p, aux->m, base->m, err);
        if (rc) kvp_err_wrap(err, "--init %s", o->init);
        return rc;
    }
    rc = kvp_tool_check_layer_map(o->layer_map, o->n_map, base->m->cfg.n_layer, err);
    if (!rc)
        rc = kvp_predictor_new(p, kvp_kv_shape_of(aux->m), kvp_kv_shape_of(base->m), o->layer_map,
                               err);
    if (!rc) kvp_kvptrain_init_predictor(*p, o->train.seed);
    return rc;
}

static void print_eval(const char *when, const kvp_kvptrain_eval_t *e) {
    printf("%-7s base on predicted cache %.4f bpb (%.4f nats/token), aux %.4f bpb (%.4f), "
           "K/V L1 %.4f; base on its own cache %.4f bpb; %llu tokens\n",
           when, e->base_pred.bpb, e->base_pred.loss, e->aux.bpb, e->aux.loss, e->kv,
           e->base_own.bpb, (unsigned long long)e->base_pred.tokens);
}

/* Both models (they must share one vocabulary), the predictor to start from,
 * and the check that the three fit together. */
static int open_models(const opts_t *o, kvp_tool_model_t *aux, kvp_tool_model_t *base,
                       kvp_predictor_t **p, kvp_err_t *err) {
    int rc = kvp_tool_model_open(o->aux, aux, err);
    if (!rc) rc = kvp_tool_model_open(o->base, base, err);
    if (!rc) rc = kvp_tool_check_vocab_pair(aux->tok, base->tok, err);
    if (!rc) rc = start_predictor(o, aux, base, p, err);
    if (!rc) rc = kvp_kvptrain_check(aux->m, base->m, *p, err);
    return rc;
}

int kvp_cmd_train_kvp(int argc, char **argv) {
    opts_t o;
    int prc = parse_args(argc, argv, &o);
    if (prc) {
        free(o.layer_map);
        return prc == 1 ? 0 : 2;
    }
    char *aux_out = kvp_tool_derive_path(o.out, NULL, "-aux.gguf");
    char *pred_out = kvp_tool_derive_path(o.out, NULL, "-predictor.gguf");
    kvp_trainer_config_t *tc = &o.train.tc;
    bool quiet = o.train.quiet;
    kvp_err_t err = {0};
    kvp_tool_model_t aux = {0}, base = {0};
    kvp_predictor_t *p = NULL;
    kvp_corpus_t *corp = NULL;
    int status = 1, rc = 0;
    if (!aux_out || !pred_out) {
        fprintf(stderr, CMD ": out of memory\n");
        goto done;
    }
    /* checkpoint and log: OUT.ckpt, OUT.csv */
    if (kvp_train_tool_flags_apply(&o.train, CMD, o.out, NULL)) goto done;
    rc = open_models(&o, &aux, &base, &p, &err);
    if (rc) {
        fprintf(stderr, CMD ": %s\n", err.msg[0] ? err.msg : kvp_err_name(rc));
        goto done;
    }
    const kvp_tool_corpus_t *cp = &o.corpus;
    if (kvp_train_tool_load_corpus(CMD, cp->path, cp->n_path, cp->ext, cp->holdout, aux.tok,
                                   quiet ? NULL : stderr, &corp))
        goto done;
    tc->tok = aux.tok;
    if (!quiet) {
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
        status = kvp_train_tool_stopped(CMD, res.step, tc->steps);
        goto done;
    }
    char command[2048];
    kvp_train_tool_command_line(argc, argv, command, sizeof command);
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
    kvp_tool_model_close(&aux);
    kvp_tool_model_close(&base);
    free(aux_out);
    free(pred_out);
    kvp_train_tool_flags_free(&o.train);
    free(o.layer_map);
    return status;
}
