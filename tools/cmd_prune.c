/* kvpred prune: a layer-pruned copy of a model (kvp_prune.h), optionally
 * fine-tuned on the corpus's train split the way `kvpred train` trains — the
 * paper's layer-pruned baseline, also usable as an auxiliary model.
 *
 * The story: open the model, pick the layers to keep, copy them with the
 * embeddings and head, measure the copy's validation loss, fine-tune it for
 * --finetune-steps steps (kvp_trainer_run), measure again and save with the
 * source's vocabulary and the kept layers recorded in the file. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvp_cmds.h"
#include "kvp_prune.h"
#include "kvp_tool_util.h"
#include "kvp_train_tool.h"
#include "kvp_trainer.h"

#define EVAL_TOKENS 32768 /* validation tokens before and after fine-tuning */

static void usage(FILE *f) {
    fprintf(
        f,
        "usage: kvpred prune --base B.gguf --keep 1/4|1/2|3/4|1 -o OUT.gguf [options]\n"
        "Keeps every k-th layer of B (1/4: layers 0,4,8,...; 1/2: 0,2,4,...; 3/4: all but\n"
        "the last of each four; 1: all, for fine-tuning a copy), with its embeddings,\n"
        "final norm and output head, then optionally fine-tunes the copy.\n"
        "  --base FILE, -m FILE  the model to prune (GGUF, architecture llama)\n"
        "  --keep FRAC           fraction of the layers to keep\n"
        "  -o, --out FILE        the pruned model\n"
        "  --finetune-steps N    fine-tuning steps on the corpus's train split (default 0)\n"
        "  --corpus PATH         corpus directory or file (default " KVP_CORPUS_DEFAULT_DIR ")\n"
        "  --ext EXT             file names taken in directories (default " KVP_CORPUS_DEFAULT_EXT
        ")\n"
        "  --holdout H           validation/test percentage (default %d)\n"
        "  --batch B --ctx T     sequences of T tokens per step (default 8 x 256)\n"
        "  --lr LR               peak learning rate (default 5e-4); --min-lr (default lr/10)\n"
        "  --warmup W            warm-up steps (default steps/10)\n"
        "  --seed S              data order (default 7)\n"
        "  --log CSV             per-step fine-tuning log (default: none)\n"
        "  --quiet               no progress display\n",
        KVP_CORPUS_DEFAULT_HOLDOUT);
}

typedef struct opts {
    const char *base, *out, *keep_s;
    int num, den;
    kvp_tool_corpus_t corpus;
    kvp_train_tool_flags_t train; /* the fine-tuning; tc.steps from --finetune-steps */
} opts_t;

enum { OPT_KEEP = 256, OPT_STEPS };

static int parse_one(int c, void *opts) {
    opts_t *o = opts;
    kvp_err_t err = {0};
    switch (c) {
    case 'm':
        return o->base = optarg, 0;
    case 'o':
        return o->out = optarg, 0;
    case OPT_KEEP:
        o->keep_s = optarg;
        if (!kvp_prune_parse_fraction(optarg, &o->num, &o->den, &err)) return 0;
        fprintf(stderr, "kvpred prune: --keep: %s\n", err.msg);
        return -1;
    case OPT_STEPS:
        return kvp_parse_int("--finetune-steps", optarg, 0, 1 << 30, &o->train.tc.steps);
    default:
        return kvp_train_tool_parse(&o->corpus, &o->train, "kvpred prune", c, optarg);
    }
}

/* 0 = go on, 1 = --help printed, 2 = bad arguments. */
static int parse_args(int argc, char **argv, opts_t *o) {
    /* of the schedule flags only those a short fine-tuning needs */
    static const struct option lo[] = {{"base", required_argument, 0, 'm'},
                                       {"out", required_argument, 0, 'o'},
                                       {"keep", required_argument, 0, OPT_KEEP},
                                       {"finetune-steps", required_argument, 0, OPT_STEPS},
                                       KVP_TOOL_CORPUS_OPTIONS,
                                       {"batch", required_argument, 0, KVP_TRAIN_OPT_BATCH},
                                       {"ctx", required_argument, 0, KVP_TRAIN_OPT_CTX},
                                       {"lr", required_argument, 0, KVP_TRAIN_OPT_LR},
                                       {"min-lr", required_argument, 0, KVP_TRAIN_OPT_MIN_LR},
                                       {"warmup", required_argument, 0, KVP_TRAIN_OPT_WARMUP},
                                       {"seed", required_argument, 0, KVP_TRAIN_OPT_SEED},
                                       {"log", required_argument, 0, KVP_TRAIN_OPT_LOG},
                                       {"quiet", no_argument, 0, KVP_TRAIN_OPT_QUIET},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    memset(o, 0, sizeof *o);
    kvp_tool_corpus_init(&o->corpus, false, 1); /* the validation split must not be empty */
    kvp_train_tool_flags_init(&o->train);
    o->train.tc.steps = 0; /* no fine-tuning unless asked */
    o->train.tc.lr = 5e-4f;
    o->train.seed = 7;
    int rc = kvp_tool_getopt(argc, argv, "m:o:h", lo, usage, parse_one, o);
    if (rc) return rc;
    if (optind < argc) {
        fprintf(stderr, "kvpred prune: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!o->base || !o->out || !o->keep_s) {
        fprintf(stderr, "kvpred prune: --base, --keep and -o are required (see --help)\n");
        return 2;
    }
    if (kvp_train_tool_flags_check(&o->train, "kvpred prune")) return 2;
    kvp_trainer_config_t *tc = &o->train.tc;
    if (tc->warmup < 0) tc->warmup = tc->steps / 10; /* a short run warms up longer */
    return 0;
}

typedef struct record {
    int steps;
    double bpb_before, bpb_after, seconds;
} record_t;

static int add_record(kvp_gguf_writer_t *w, void *user) {
    const record_t *r = user;
    int bad = kvp_gguf_writer_set_u32(w, "kvpred.prune.finetune_steps", (uint32_t)r->steps);
    if (isfinite(r->bpb_before))
        bad |= kvp_gguf_writer_set_f32(w, "kvpred.prune.val_bpb_before", (float)r->bpb_before);
    if (isfinite(r->bpb_after))
        bad |= kvp_gguf_writer_set_f32(w, "kvpred.prune.val_bpb", (float)r->bpb_after);
    return bad;
}

static int finetune(kvp_model_t *m, const kvp_tokenizer_t *tok, const opts_t *o, record_t *rec,
                    kvp_err_t *err) {
    kvp_corpus_t *c = NULL;
    const kvp_tokenizer_t *ct = kvp_tool_corpus_tok(tok);
    const kvp_tool_corpus_t *cp = &o->corpus;
    if (kvp_train_tool_load_corpus("kvpred prune", cp->path, cp->n_path, cp->ext, cp->holdout, ct,
                                   o->train.quiet ? NULL : stderr, &c))
        return kvp_err_set(err, KVP_EINVAL, "%s", "");
    kvp_trainer_config_t t = o->train.tc; /* batch, ctx, steps, warmup, lr, min-lr */
    const kvp_corpus_stream_t *val = kvp_corpus_stream(c, KVP_SPLIT_VAL);
    kvp_eval_t ev;
    int rc = kvp_trainer_evaluate(m, val, ct, t.batch, t.ctx, EVAL_TOKENS, &ev, err);
    rec->bpb_before = rc ? NAN : ev.bpb;
    t.seed = o->train.seed; /* no weights to start here: --seed is the data order alone */
    t.eval_every = 0, t.eval_tokens = EVAL_TOKENS, t.final_eval_tokens = EVAL_TOKENS;
    t.ckpt_every = 0; /* a short run: no checkpoints */
    t.log_path = o->train.log;
    t.stop_flag = &kvp_train_tool_stop;
    t.progress = o->train.quiet ? NULL : stderr;
    t.tok = ct;
    kvp_trainer_result_t res;
    if (!rc) {
        kvp_train_tool_catch_signals();
        rc = kvp_trainer_run(m, c, &t, &res, err);
    }
    if (!rc && !res.completed) rc = kvp_err_set(err, KVP_EINVAL, "stopped at step %d", res.step);
    if (!rc) rec->bpb_after = res.val_bpb, rec->seconds = res.elapsed_s;
    kvp_corpus_free(&c);
    return rc;
}

/* The kept layers and the layer map that makes the copy an auxiliary model
 * of its source (of n_layer layers). */
static void print_kept(const kvp_model_t *m, const int32_t *keep, int n_keep, int n_layer) {
    char desc[160], list[512] = "";
    for (int i = 0; i < n_keep; i++) {
        size_t l = strlen(list);
        snprintf(list + l, sizeof list - l, "%s%d", i ? "," : "", (int)keep[i]);
    }
    kvp_train_tool_describe(&m->cfg, m->n_params, desc, sizeof desc);
    printf("kept layers [%s] of %d: %s\n", list, n_layer, desc);
    int32_t *map = malloc(sizeof(int32_t) * (size_t)n_layer);
    if (!map) return;
    kvp_prune_layer_map(keep, n_keep, n_layer, map);
    list[0] = 0;
    for (int i = 0; i < n_layer; i++) {
        size_t l = strlen(list);
        snprintf(list + l, sizeof list - l, "%s%d", i ? "," : "", (int)map[i]);
    }
    printf("as an auxiliary model of its source: kvpred fit-predictor --layer-map %s\n", list);
    free(map);
}

int kvp_cmd_prune(int argc, char **argv) {
    opts_t o;
    int rc = parse_args(argc, argv, &o);
    if (rc) return rc == 1 ? 0 : 2;
    kvp_err_t err = {0};
    kvp_tool_model_t src; /* its file kept open: the copy takes its vocabulary */
    kvp_model_t *m = NULL;
    int32_t *keep = NULL;
    int steps = o.train.tc.steps;
    record_t rec = {.steps = steps, .bpb_before = NAN, .bpb_after = NAN};
    rc = kvp_tool_model_open(o.base, &src, &err);
    int n_layer = rc ? 0 : src.m->cfg.n_layer, n_keep = 0;
    if (!rc) {
        keep = malloc(sizeof(int32_t) * (size_t)n_layer);
        n_keep = keep ? kvp_prune_layers(n_layer, o.num, o.den, keep) : KVP_ENOMEM;
        if (n_keep < 0) rc = kvp_err_set(&err, n_keep, "cannot keep %s of the layers", o.keep_s);
    }
    if (!rc) rc = kvp_prune_model(src.m, keep, n_keep, &m, &err);
    if (!rc) print_kept(m, keep, n_keep, n_layer);
    if (!rc && steps > 0) rc = finetune(m, src.tok, &o, &rec, &err);
    char fp[17] = "", name[128];
    if (!rc) {
        kvp_model_fingerprint(src.m, fp);
        snprintf(name, sizeof name, "kvpred pruned %s (%s of the layers)", o.base, o.keep_s);
        rc = kvp_prune_save(m, src.g, o.out, name, keep, n_keep, fp, add_record, &rec, &err);
    }
    if (!rc) {
        if (steps > 0)
            printf("fine-tuned %d steps (%.1f s): validation %.4f -> %.4f bits per byte\n", steps,
                   rec.seconds, rec.bpb_before, rec.bpb_after);
        printf("wrote %s\n", o.out);
    } else if (err.msg[0]) {
        fprintf(stderr, "kvpred prune: %s\n", err.msg);
    }
    free(keep);
    kvp_model_free(&m);
    kvp_tool_model_close(&src);
    return rc ? 1 : 0;
}
