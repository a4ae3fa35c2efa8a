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
    const char *base, *out, *corpus, *ext, *log, *keep_s;
    int num, den, steps, holdout, batch, ctx, warmup;
    float lr, min_lr;
    uint64_t seed;
    int quiet;
} opts_t;

enum {
    OPT_KEEP = 256,
    OPT_STEPS,
    OPT_CORPUS,
    OPT_EXT,
    OPT_HOLDOUT,
    OPT_BATCH,
    OPT_CTX,
    OPT_LR,
    OPT_MIN_LR,
    OPT_WARMUP,
    OPT_SEED,
    OPT_LOG,
    OPT_QUIET
};

static int parse_one(int c, opts_t *o) {
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
        return kvp_parse_int("--finetune-steps", optarg, 0, 1 << 30, &o->steps);
    case OPT_CORPUS:
        return o->corpus = optarg, 0;
    case OPT_EXT:
        return o->ext = optarg, 0;
    case OPT_HOLDOUT:
        return kvp_parse_int("--holdout", optarg, 1, 33, &o->holdout);
    case OPT_BATCH:
        return kvp_parse_int("--batch", optarg, 1, 1 << 16, &o->batch);
    case OPT_CTX:
        return kvp_parse_int("--ctx", optarg, 2, 1 << 16, &o->ctx);
    case OPT_LR:
        return kvp_parse_float("--lr", optarg, 1e-8f, 1.0f, &o->lr);
    case OPT_MIN_LR:
        return kvp_parse_float("--min-lr", optarg, 0.0f, 1.0f, &o->min_lr);
    case OPT_WARMUP:
        return kvp_parse_int("--warmup", optarg, 0, 1 << 30, &o->warmup);
    case OPT_SEED:
        return kvp_parse_u64("--seed", optarg, &o->seed);
    case OPT_LOG:
        return o->log = optarg, 0;
    case OPT_QUIET:
        return o->quiet = 1, 0;
    default:
        return -1;
    }
}

/* 0 = go on, 1 = --help printed, 2 = bad arguments. */
static int parse_args(int argc, char **argv, opts_t *o) {
    static const struct option lo[] = {{"base", required_argument, 0, 'm'},
                                       {"out", required_argument, 0, 'o'},
                                       {"keep", required_argument, 0, OPT_KEEP},
                                       {"finetune-steps", required_argument, 0, OPT_STEPS},
                                       {"corpus", required_argument, 0, OPT_CORPUS},
                                       {"ext", required_argument, 0, OPT_EXT},
                                       {"holdout", required_argument, 0, OPT_HOLDOUT},
                                       {"batch", required_argument, 0, OPT_BATCH},
                                       {"ctx", required_argument, 0, OPT_CTX},
                                       {"lr", required_argument, 0, OPT_LR},
                                       {"min-lr", required_argument, 0, OPT_MIN_LR},
                                       {"warmup", required_argument, 0, OPT_WARMUP},
                                       {"seed", required_argument, 0, OPT_SEED},
                                       {"log", required_argument, 0, OPT_LOG},
                                       {"quiet", no_argument, 0, OPT_QUIET},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    *o = (opts_t){.corpus = KVP_CORPUS_DEFAULT_DIR,
                  .ext = KVP_CORPUS_DEFAULT_EXT,
                  .holdout = KVP_CORPUS_DEFAULT_HOLDOUT,
                  .batch = 8,
                  .ctx = 256,
                  .warmup = -1,
                  .lr = 5e-4f,
                  .min_lr = -1.0f,
                  .seed = 7};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:o:h", lo, NULL)) != -1) {
        if (c == 'h') return usage(stdout), 1;
        if (c == '?') return usage(stderr), 2;
        if (parse_one(c, o)) return 2;
    }
    if (optind < argc) {
        fprintf(stderr, "kvpred prune: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!o->base || !o->out || !o->keep_s) {
        fprintf(stderr, "kvpred prune: --base, --keep and -o are required (see --help)\n");
        return 2;
    }
    if (o->min_lr < 0) o->min_lr = o->lr / 10;
    if (o->min_lr > o->lr) {
        fprintf(stderr, "kvpred prune: --min-lr %g is above --lr %g\n", o->min_lr, o->lr);
        return 2;
    }
    if (o->warmup < 0) o->warmup = o->steps / 10;
    return 0;
}

/* kvpred's plain byte-level vocabulary (no merges) tokenizes through the
 * corpus's fast path; any other vocabulary through its encoder. */
static const kvp_tokenizer_t *corpus_tok(const kvp_tokenizer_t *t) {
    bool plain = kvp_tokenizer_n_vocab(t) == kvp_tokenizer_bytelevel_n_vocab(0) &&
                 kvp_tokenizer_bos(t) == 256 && kvp_tokenizer_eos(t) == 257;
    return plain ? NULL : t;
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
    const kvp_tokenizer_t *ct = corpus_tok(tok);
    if (kvp_train_tool_load_corpus("kvpred prune", &o->corpus, 1, o->ext, o->holdout, ct,
                                   o->quiet ? NULL : stderr, &c))
        return kvp_err_set(err, KVP_EINVAL, "%s", "");
    const kvp_corpus_stream_t *val = kvp_corpus_stream(c, KVP_SPLIT_VAL);
    kvp_eval_t ev;
    int rc = kvp_trainer_evaluate(m, val, ct, o->batch, o->ctx, EVAL_TOKENS, &ev, err);
    rec->bpb_before = rc ? NAN : ev.bpb;
    kvp_trainer_config_t t;
    kvp_trainer_config_default(&t);
    t.batch = o->batch, t.ctx = o->ctx, t.steps = o->steps, t.warmup = o->warmup;
    t.lr = o->lr, t.min_lr = o->min_lr, t.seed = o->seed;
    t.eval_every = 0, t.eval_tokens = EVAL_TOKENS, t.final_eval_tokens = EVAL_TOKENS;
    t.ckpt_every = 0; /* a short run: no checkpoints */
    t.log_path = o->log;
    t.stop_flag = &kvp_train_tool_stop;
    t.progress = o->quiet ? NULL : stderr;
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

int kvp_cmd_prune(int argc, char **argv) {
    opts_t o;
    int rc = parse_args(argc, argv, &o);
    if (rc) return rc == 1 ? 0 : 2;
    kvp_err_t err = {0};
    kvp_gguf_t *g = NULL;
    kvp_model_t *src = NULL, *m = NULL;
    kvp_tokenizer_t *tok = NULL;
    int32_t *keep = NULL;
    record_t rec = {.steps = o.steps, .bpb_before = NAN, .bpb_after = NAN};
    rc = kvp_gguf_open(&g, o.base, &err);
    if (!rc) rc = kvp_model_from_gguf(&src, g, &err);
    if (!rc) rc = kvp_tokenizer_from_gguf(&tok, g, &err);
    if (rc) kvp_err_wrap(&err, "%s", o.base);
    int n_keep = 0;
    if (!rc) {
        keep = malloc(sizeof(int32_t) * (size_t)src->cfg.n_layer);
        n_keep = keep ? kvp_prune_layers(src->cfg.n_layer, o.num, o.den, keep) : KVP_ENOMEM;
        if (n_keep < 0) rc = kvp_err_set(&err, n_keep, "cannot keep %s of the layers", o.keep_s);
    }
    if (!rc) rc = kvp_prune_model(src, keep, n_keep, &m, &err);
    if (!rc) {
        char desc[160], list[512] = "";
        for (int i = 0; i < n_keep; i++) {
            size_t l = strlen(list);
            snprintf(list + l, sizeof list - l, "%s%d", i ? "," : "", (int)keep[i]);
        }
        kvp_train_tool_describe(&m->cfg, m->n_params, desc, sizeof desc);
        printf("kept layers [%s] of %d: %s\n", list, src->cfg.n_layer, desc);
        int32_t *map = malloc(sizeof(int32_t) * (size_t)src->cfg.n_layer);
        if (map) {
            kvp_prune_layer_map(keep, n_keep, src->cfg.n_layer, map);
            list[0] = 0;
            for (int i = 0; i < src->cfg.n_layer; i++) {
                size_t l = strlen(list);
                snprintf(list + l, sizeof list - l, "%s%d", i ? "," : "", (int)map[i]);
            }
            printf("as an auxiliary model of its source: kvpred fit-predictor --layer-map %s\n",
                   list);
            free(map);
        }
    }
    if (!rc && o.steps > 0) rc = finetune(m, tok, &o, &rec, &err);
    char fp[17] = "", name[128];
    if (!rc) {
        kvp_model_fingerprint(src, fp);
        snprintf(name, sizeof name, "kvpred pruned %s (%s of the layers)", o.base, o.keep_s);
        rc = kvp_prune_save(m, g, o.out, name, keep, n_keep, fp, add_record, &rec, &err);
    }
    if (!rc) {
        if (o.steps > 0)
            printf("fine-tuned %d steps (%.1f s): validation %.4f -> %.4f bits per byte\n", o.steps,
                   rec.seconds, rec.bpb_before, rec.bpb_after);
        printf("wrote %s\n", o.out);
    } else if (err.msg[0]) {
        fprintf(stderr, "kvpred prune: %s\n", err.msg);
    }
    free(keep);
    kvp_model_free(&m);
    kvp_model_free(&src);
    kvp_tokenizer_free(&tok);
    kvp_gguf_free(&g);
    return rc ? 1 : 0;
}
