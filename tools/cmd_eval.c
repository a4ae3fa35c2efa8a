/* kvpred eval: KV Prediction against its baselines at equal TTFT FLOPs, on
 * the held-out test files of the corpus (kvp_eval.h; docs/results.md).
 *
 * The story: load the base model and every cheaper model (auxiliary models,
 * layer-pruned copies of the base, the outputs of `kvpred train-kvp`), give
 * each auxiliary model without a predictor file a closed-form predictor
 * fitted here on the train split, cut the test prompts, run every method,
 * then write the CSV files, print the table and the reading against the
 * goals, and draw the accuracy against TTFT FLOPs and measured TTFT. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvp_cmds.h"
#include "kvp_eval.h"
#include "kvp_prune.h"
#include "kvp_time.h"
#include "kvp_tool_util.h"

#define MAX_ENTRIES 16
#define MAX_METHODS (1 + 2 * MAX_ENTRIES)
#define GNUPLOT_PACKAGE "gnuplot-nox"

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvpred eval --base B.gguf [--aux A.gguf [--predictor P.gguf]]...\n"
            "         [--pruned X.gguf [--predictor P.gguf]]... [--kvp-trained PREFIX]...\n"
            "         [--baseline M.gguf]... --out DIR [options]\n"
            "Methods at their TTFT FLOPs: the base alone; each auxiliary / pruned model alone; KV\n"
            "Prediction from each of them (closed-form predictor, fitted here unless --predictor\n"
            "follows the model); KV Prediction after `kvpred train-kvp` (PREFIX-aux.gguf and\n"
            "PREFIX-predictor.gguf). Tasks on the corpus's test split: continuation accuracy and\n"
            "the base's log-likelihood on each method's cache, HumanEval-like first body lines,\n"
            "cache quality per layer and position, measured TTFT.\n"
            "  --base FILE          the base model\n"
            "  --aux FILE           an auxiliary model (repeatable)\n"
            "  --pruned FILE        a layer-pruned base from `kvpred prune` (repeatable)\n"
            "  --predictor FILE     the predictor of the --aux/--pruned model just before it\n"
            "  --kvp-trained PREFIX outputs of `kvpred train-kvp` (repeatable)\n"
            "  --baseline FILE      a model evaluated alone only, e.g. the aux fine-tuned as long\n"
            "                       as train-kvp trained it (repeatable)\n"
            "  --out DIR            results.csv, cache_quality.csv, humaneval.csv, summary.txt,\n"
            "                       eval.png\n"
            "  --corpus PATH        corpus (default " KVP_CORPUS_DEFAULT_DIR
            "), --ext (default " KVP_CORPUS_DEFAULT_EXT "),\n"
            "                       --holdout H (default %d): the split of docs/training.md\n"
            "  --prompts N          continuation prompts (200)     --prompt-len P  tokens (192)\n"
            "  --continuation K     tokens scored (16)             --seed S        positions (1)\n"
            "  --humaneval N        HumanEval-like items at most (200); --he-lines L (1),\n"
            "                       --he-max-prompt T (192), --he-max-gen G (64)\n"
            "  --cq-prompts N       prompts for cache quality (32); --pos-bucket W (16)\n"
            "  --ttft-reps R        measured TTFT: best of R (3)\n"
            "  --fit-tokens N       tokens for predictors fitted here (32768); --fit-ctx T (256)\n"
            "  --goal-gap G         share of the aux-alone -> base gap to close (0.6)\n"
            "  --quick              a smoke test: 8 prompts of 48 tokens, K 4, 4 items,\n"
            "                       2048 fit tokens\n"
            "  --no-plot            no gnuplot image\n",
            KVP_CORPUS_DEFAULT_HOLDOUT);
}

/* BASELINE: evaluated alone only (e.g. the aux model fine-tuned as long as
 * train-kvp trained it, the fair baseline for that run). */
typedef enum entry_kind { ENTRY_AUX, ENTRY_PRUNED, ENTRY_TRAINED, ENTRY_BASELINE } entry_kind_t;

typedef struct entry {
    entry_kind_t kind;
    const char *path, *pred_path; /* pred_path NULL: fit here */
    char *own_path, *own_pred;    /* built from a --kvp-trained prefix */
    char label[48];
    int32_t *map; /* pruned: the layer map of its kept layers (kvp_prune_layer_map) */
    kvp_loaded_t m;
    kvp_predictor_t *pred;
} entry_t;

typedef struct opts {
    const char *base, *out;
    kvp_tool_corpus_t corpus;
    int fit_ctx, quick, no_plot;
    uint64_t fit_tokens;
    float goal_gap;
    entry_t e[MAX_ENTRIES];
    int n_e;
    kvp_eval_opts_t eo;
} opts_t;

/* ---- options ---------------------------------------------------------- */

enum {
    OPT_BASE = 256,
    OPT_AUX,
    OPT_PRUNED,
    OPT_PRED,
    OPT_TRAINED,
    OPT_BASELINE,
    OPT_PROMPTS,
    OPT_PLEN,
    OPT_CONT,
    OPT_SEED,
    OPT_HE,
    OPT_HE_LINES,
    OPT_HE_PROMPT,
    OPT_HE_GEN,
    OPT_CQ,
    OPT_BUCKET,
    OPT_REPS,
    OPT_FIT_TOKENS,
    OPT_FIT_CTX,
    OPT_GAP,
    OPT_QUICK,
    OPT_NO_PLOT
};

static int add_entry(opts_t *o, entry_kind_t kind, const char *arg) {
    if (o->n_e == MAX_ENTRIES) {
        fprintf(stderr, "kvpred eval: at most %d models besides the base\n", MAX_ENTRIES);
        return -1;
    }
    entry_t *e = &o->e[o->n_e++];
    memset(e, 0, sizeof *e);
    e->kind = kind;
    if (kind != ENTRY_TRAINED) return e->path = arg, 0;
    e->own_path = kvp_tool_derive_path(arg, NULL, "-aux.gguf");
    e->own_pred = kvp_tool_derive_path(arg, NULL, "-predictor.gguf");
    e->path = e->own_path, e->pred_path = e->own_pred;
    const char *b = strrchr(arg, '/');
    snprintf(e->label, sizeof e->label, "%s", b ? b + 1 : arg);
    return e->own_path && e->own_pred ? 0 : -1;
}

static int parse_one(int c, void *opts) {
    opts_t *o = opts;
    kvp_eval_opts_t *e = &o->eo;
    switch (c) {
    case OPT_BASE:
        return o->base = optarg, 0;
    case OPT_AUX:
        return add_entry(o, ENTRY_AUX, optarg);
    case OPT_PRUNED:
        return add_entry(o, ENTRY_PRUNED, optarg);
    case OPT_TRAINED:
        return add_entry(o, ENTRY_TRAINED, optarg);
    case OPT_BASELINE:
        return add_entry(o, ENTRY_BASELINE, optarg);
    case OPT_PRED:
        if (!o->n_e || o->e[o->n_e - 1].kind >= ENTRY_TRAINED) {
            fprintf(stderr, "kvpred eval: --predictor must follow the --aux or --pruned model "
                            "it belongs to\n");
            return -1;
        }
        return o->e[o->n_e - 1].pred_path = optarg, 0;
    case 'o':
        return o->out = optarg, 0;
    case KVP_TOOL_OPT_CORPUS:
    case KVP_TOOL_OPT_EXT:
    case KVP_TOOL_OPT_HOLDOUT:
        return kvp_tool_corpus_flag(&o->corpus, "kvpred eval", c, optarg);
    case OPT_PROMPTS:
        return kvp_parse_int("--prompts", optarg, 1, 1 << 20, &e->n_prompts);
    case OPT_PLEN:
        return kvp_parse_int("--prompt-len", optarg, 2, 1 << 16, &e->prompt_len);
    case OPT_CONT:
        return kvp_parse_int("--continuation", optarg, 1, 1 << 12, &e->n_cont);
    case OPT_SEED:
        return kvp_parse_u64("--seed", optarg, &e->seed);
    case OPT_HE:
        return kvp_parse_int("--humaneval", optarg, 0, 1 << 20, &e->he_max);
    case OPT_HE_LINES:
        return kvp_parse_int("--he-lines", optarg, 1, 64, &e->he_lines);
    case OPT_HE_PROMPT:
        return kvp_parse_int("--he-max-prompt", optarg, 2, 1 << 16, &e->he_max_prompt);
    case OPT_HE_GEN:
        return kvp_parse_int("--he-max-gen", optarg, 1, 1 << 12, &e->he_max_gen);
    case OPT_CQ:
        return kvp_parse_int("--cq-prompts", optarg, 0, 1 << 20, &e->cq_prompts);
    case OPT_BUCKET:
        return kvp_parse_int("--pos-bucket", optarg, 1, 1 << 16, &e->pos_bucket);
    case OPT_REPS:
        return kvp_parse_int("--ttft-reps", optarg, 1, 1000, &e->ttft_reps);
    case OPT_FIT_TOKENS:
        return kvp_parse_count("kvpred eval", "--fit-tokens", optarg, 32, &o->fit_tokens);
    case OPT_FIT_CTX:
        return kvp_parse_int("--fit-ctx", optarg, 2, 1 << 16, &o->fit_ctx);
    case OPT_GAP:
        return kvp_parse_float("--goal-gap", optarg, 0.0f, 1.0f, &o->goal_gap);
    case OPT_QUICK:
        return 0; /* applied before the others */
    case OPT_NO_PLOT:
        return o->no_plot = 1, 0;
    default:
        return -1;
    }
}

static void apply_quick(opts_t *o) {
    o->quick = 1;
    o->eo.n_prompts = 8, o->eo.prompt_len = 48, o->eo.n_cont = 4;
    o->eo.he_max = 4, o->eo.he_max_prompt = 96, o->eo.he_max_gen = 24;
    o->eo.cq_prompts = 4, o->eo.pos_bucket = 8, o->eo.ttft_reps = 1;
    o->fit_tokens = 2048, o->fit_ctx = 64;
}

/* 0 = go on, 1 = --help printed, 2 = bad arguments. */
static int parse_args(int argc, char **argv, opts_t *o) {
    static const struct option lo[] = {{"base", required_argument, 0, OPT_BASE},
                                       {"aux", required_argument, 0, OPT_AUX},
                                       {"pruned", required_argument, 0, OPT_PRUNED},
                                       {"predictor", required_argument, 0, OPT_PRED},
                                       {"kvp-trained", required_argument, 0, OPT_TRAINED},
                                       {"baseline", required_argument, 0, OPT_BASELINE},
                                       {"out", required_argument, 0, 'o'},
                                       KVP_TOOL_CORPUS_OPTIONS,
                                       {"prompts", required_argument, 0, OPT_PROMPTS},
                                       {"prompt-len", required_argument, 0, OPT_PLEN},
                                       {"continuation", required_argument, 0, OPT_CONT},
                                       {"seed", required_argument, 0, OPT_SEED},
                                       {"humaneval", required_argument, 0, OPT_HE},
                                       {"he-lines", required_argument, 0, OPT_HE_LINES},
                                       {"he-max-prompt", required_argument, 0, OPT_HE_PROMPT},
                                       {"he-max-gen", required_argument, 0, OPT_HE_GEN},
                                       {"cq-prompts", required_argument, 0, OPT_CQ},
                                       {"pos-bucket", required_argument, 0, OPT_BUCKET},
                                       {"ttft-reps", required_argument, 0, OPT_REPS},
                                       {"fit-tokens", required_argument, 0, OPT_FIT_TOKENS},
                                       {"fit-ctx", required_argument, 0, OPT_FIT_CTX},
                                       {"goal-gap", required_argument, 0, OPT_GAP},
                                       {"quick", no_argument, 0, OPT_QUICK},
                                       {"no-plot", no_argument, 0, OPT_NO_PLOT},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    memset(o, 0, sizeof *o);
    kvp_tool_corpus_init(&o->corpus, false, 1); /* the test split must not be empty */
    o->fit_tokens = 32768, o->fit_ctx = 256, o->goal_gap = 0.6f;
    kvp_eval_opts_default(&o->eo);
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--quick")) apply_quick(o);
    int rc = kvp_tool_getopt(argc, argv, "o:h", lo, usage, parse_one, o);
    if (rc) return rc;
    if (optind < argc) {
        fprintf(stderr, "kvpred eval: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!o->base || !o->out) {
        fprintf(stderr, "kvpred eval: --base and --out are required (see kvpred eval --help)\n");
        return 2;
    }
    if (o->eo.cq_prompts > o->eo.n_prompts) o->eo.cq_prompts = o->eo.n_prompts;
    return 0;
}

static void opts_free(opts_t *o) {
    for (int i = 0; i < o->n_e; i++) {
        kvp_loaded_free(&o->e[i].m);
        kvp_predictor_free(&o->e[i].pred);
        free(o->e[i].map);
        free(o->e[i].own_path);
        free(o->e[i].own_pred);
    }
}

/* ---- models ------------------------------------------------------------ */

/* The label of a model: "pruned K/N" for a pruned base (kvpred.prune.layers),
 * else its file name without .gguf. */
static void entry_label(entry_t *e, int n_base_layers) {
    if (e->label[0]) return;
    if (e->kind == ENTRY_PRUNED) {
        snprintf(e->label, sizeof e->label, "pruned %d/%d", e->m.model->cfg.n_layer, n_base_layers);
        return;
    }
    const char *b = strrchr(e->path, '/');
    b = b ? b + 1 : e->path;
    size_t n = strlen(b);
    if (n > 5 && !strcmp(b + n - 5, ".gguf")) n -= 5;
    snprintf(e->label, sizeof e->label, "%.*s", (int)n, b);
}

/* A pruned model's kept layers (kvpred.prune.layers) as a predictor layer
 * map onto a base of n_base layers; NULL when the file has none that fit. */
static int32_t *pruned_map(const char *path, int n_layer, int n_base) {
    kvp_gguf_t *g = NULL;
    const kvp_gguf_kv_t *kv;
    int32_t *keep = NULL, *map = NULL;
    if (kvp_gguf_open(&g, path, NULL) ||
        kvp_gguf_get_arr(g, "kvpred.prune.layers", KVP_GGUF_I32, &kv, NULL) ||
        kv->v.arr.count != (uint64_t)n_layer)
        goto done;
    keep = malloc(sizeof(int32_t) * (size_t)n_layer);
    map = malloc(sizeof(int32_t) * (size_t)n_base);
    if (!keep || !map) goto fail;
    for (int i = 0; i < n_layer; i++) {
        keep[i] = (int32_t)kvp_gguf_arr_i64(kv, (uint64_t)i);
        if (keep[i] >= n_base || (i ? keep[i] <= keep[i - 1] : keep[i] != 0)) goto fail;
    }
    kvp_prune_layer_map(keep, n_layer, n_base, map);
    goto done;
fail:
    free(map);
    map = NULL;
done:
    free(keep);
    kvp_gguf_free(&g);
    return map;
}

static int load_models(opts_t *o, kvp_loaded_t *base, kvp_err_t *err) {
    int rc = kvp_load_model_and_vocab(o->base, base, err);
    for (int i = 0; !rc && i < o->n_e; i++) {
        entry_t *e = &o->e[i];
        rc = kvp_load_model_and_vocab(e->path, &e->m, err);
        if (!rc && e->pred_path) {
            rc = kvp_predictor_load(&e->pred, e->pred_path, err);
            if (rc) kvp_err_wrap(err, "%s", e->pred_path);
        }
        if (!rc) entry_label(e, base->model->cfg.n_layer);
        if (!rc && e->kind == ENTRY_PRUNED)
            e->map = pruned_map(e->path, e->m.model->cfg.n_layer, base->model->cfg.n_layer);
    }
    return rc;
}

/* Closed-form predictors for the models that came without one, each saved
 * into DIR so the run can be repeated with --predictor. */
static int fit_missing(opts_t *o, const kvp_loaded_t *base, kvp_corpus_t *c, kvp_err_t *err) {
    int need = 0;
    for (int i = 0; i < o->n_e; i++)
        need += !o->e[i].pred && o->e[i].kind != ENTRY_BASELINE;
    if (!need) return KVP_OK;
    int rc = kvp_corpus_tokenize(c, KVP_SPLIT_TRAIN, kvp_tool_corpus_tok(base->tok), err);
    const kvp_corpus_stream_t *s = kvp_corpus_stream(c, KVP_SPLIT_TRAIN);
    for (int i = 0; !rc && i < o->n_e; i++) {
        entry_t *e = &o->e[i];
        if (e->pred || e->kind == ENTRY_BASELINE) continue;
        double t0 = kvp_now();
        rc =
            kvp_eval_fit_predictor(e->m.model, base->model, e->map, s, kvp_tokenizer_bos(base->tok),
                                   o->fit_tokens, o->fit_ctx, &e->pred, err);
        if (rc) return kvp_err_wrap(err, "fitting a predictor for %s", e->label);
        char path[4096], name[64];
        snprintf(name, sizeof name, "%s", e->label);
        for (char *p = name; *p; p++)
            if (*p == '/' || *p == ' ') *p = '_';
        snprintf(path, sizeof path, "%s/predictor-%s.gguf", o->out, name);
        rc = kvp_predictor_save(e->pred, path, err);
        fprintf(stderr, "fitted a ridge predictor %s -> base on %llu tokens in %.1f s: %s\n",
                e->label, (unsigned long long)e->pred->fit->train_tokens, kvp_now() - t0, path);
    }
    return rc;
}

/* base; every model alone; KV Prediction from every model. */
static int make_methods(const opts_t *o, kvp_eval_method_t *m) {
    int n = 0;
    m[n++] = (kvp_eval_method_t){.name = "base", .family = "base", .kind = KVP_EVAL_BASE};
    static const char *alone_family[] = {"aux alone", "pruned alone", "train-kvp aux alone",
                                         "fine-tuned baselines"};
    static const char *kvp_family[] = {"kvp ridge (aux)", "kvp ridge (pruned)", "kvp train-kvp"};
    for (int i = 0; i < o->n_e; i++) {
        const entry_t *e = &o->e[i];
        kvp_eval_method_t *x = &m[n++];
        *x = (kvp_eval_method_t){.kind = KVP_EVAL_ALONE, .model = e->m.model};
        snprintf(x->name, sizeof x->name, "%s%s alone", e->label,
                 e->kind == ENTRY_TRAINED ? "-aux" : "");
        snprintf(x->family, sizeof x->family, "%s", alone_family[e->kind]);
    }
    for (int i = 0; i < o->n_e; i++) {
        const entry_t *e = &o->e[i];
        if (e->kind == ENTRY_BASELINE) continue;
        kvp_eval_method_t *x = &m[n++];
        *x = (kvp_eval_method_t){.kind = KVP_EVAL_KVP, .model = e->m.model, .pred = e->pred};
        const char *how = e->kind == ENTRY_TRAINED ? "train-kvp" : e->pred->fit ? "ridge" : "file";
        snprintf(x->name, sizeof x->name, "kvp %s (%s)", e->label, how);
        snprintf(x->family, sizeof x->family, "%s", kvp_family[e->kind]);
    }
    return n;
}

/* ---- the image ----------------------------------------------------------- */

static bool on_path(const char *name) {
    const char *path = getenv("PATH");
    if (!path || !*path) path = "/usr/local/bin:/usr/bin:/bin";
    char buf[4096];
    for (const char *p = path; *p;) {
        size_t len = strcspn(p, ":");
        if (len > 0 && len + strlen(name) + 2 < sizeof buf) {
            snprintf(buf, sizeof buf, "%.*s/%s", (int)len, p, name);
            if (access(buf, X_OK) == 0) return true;
        }
        p += len;
        if (*p == ':') p++;
    }
    return false;
}

static void put_quoted(FILE *g, const char *s) {
    fputc('\'', g);
    for (; *s; s++) {
        if (*s == '\'') fputc('\'', g);
        if (*s != '\n') fputc(*s, g);
    }
    fputc('\'', g);
}

/* Families in order of first appearance: fam[] gets their first method. */
static int families(const kvp_eval_method_t *m, int n, int *fam) {
    int nf = 0;
    for (int i = 0; i < n; i++) {
        int seen = 0;
        for (int k = 0; k < nf && !seen; k++)
            seen = !strcmp(m[fam[k]].family, m[i].family);
        if (!seen) fam[nf++] = i;
    }
    return nf;
}

/* One panel: y column yc (3 continuation accuracy, 4 log-likelihood, 5
 * HumanEval-like agreement) against x column xc (1 FLOPs vs base, 2 measured
 * ms), a series of points per family. Against FLOPs, the two Pareto fronts
 * as steps ($front_kvp_Y, $front_alone_Y: the best KV Prediction and the best
 * baseline at or below each budget), their points labelled from column 6. */
static void plot_panel(FILE *g, int nf, const kvp_eval_method_t *m, const int *fam, int xc,
                       int yc) {
    fputs("plot ", g);
    for (int k = 0; k < nf; k++) {
        fprintf(g, "%s$f%d using %d:%d with points pt 7 ps 1.2 lc %d title ", k ? ", " : "", k, xc,
                yc, k + 1);
        put_quoted(g, m[fam[k]].family);
    }
    if (xc == 1) {
        static const char *front[2][2] = {{"kvp", "KV Prediction front"},
                                          {"alone", "baselines front"}};
        for (int f = 0; f < 2; f++)
            fprintf(g,
                    ", $front_%s_%d using 1:2 with steps lw 2.5 dt %d lc rgb '%s' title '%s'"
                    ", $front_%s_%d using 1:2:3 with labels font ',8' offset 0,0.9 notitle",
                    front[f][0], yc, f ? 2 : 1, f ? "#777777" : "#000080", front[f][1], front[f][0],
                    yc);
    }
    fputc('\n', g);
}

/* The Pareto front of one kind on metric yc (3 accuracy, 4 log-likelihood,
 * 5 HumanEval-like agreement) as a gnuplot block $front_NAME_yc: by
 * increasing FLOPs, each point that beats every cheaper one (x, y, name). */
static void put_front(FILE *g, const kvp_eval_method_t *m, const kvp_eval_result_t *r, int n,
                      kvp_eval_kind_t kind, const char *name, int yc, double base_flops) {
    int idx[MAX_METHODS], ni = 0;
    for (int i = 0; i < n; i++)
        if (m[i].kind == kind) idx[ni++] = i;
    for (int a = 1; a < ni; a++)
        for (int b = a; b > 0 && r[idx[b]].flops < r[idx[b - 1]].flops; b--) {
            int t = idx[b];
            idx[b] = idx[b - 1], idx[b - 1] = t;
        }
    fprintf(g, "$front_%s_%d << EOD\n", name, yc);
    double best = -INFINITY;
    for (int a = 0; a < ni; a++) {
        const kvp_eval_result_t *x = &r[idx[a]];
        double y = yc == 3 ? x->acc : yc == 4 ? x->decode_loglik : x->he_agree;
        if (!isfinite(y) || y <= best) continue;
        best = y;
        fprintf(g, "%.6g\t%.6g\t%s\n", x->flops / base_flops, y, m[idx[a]].name);
    }
    if (isfinite(best)) /* the last step runs on to the base's budget */
        fprintf(g, "1\t%.6g\t\n", best);
    fputs("EOD\n", g);
}

static int plot(const char *path, const kvp_eval_method_t *m, const kvp_eval_result_t *r, int n,
                double base_flops, const char *title) {
    if (!on_path("gnuplot")) {
        fprintf(stderr, "kvpred eval: gnuplot is not installed, no image drawn (the CSV files are "
                        "written): install the Debian package " GNUPLOT_PACKAGE
                        " (apt-get install " GNUPLOT_PACKAGE ")\n");
        return -1;
    }
    unlink(path);
    FILE *g = popen("gnuplot", "w");
    if (!g) {
        fprintf(stderr, "kvpred eval: cannot start gnuplot: %s\n", strerror(errno));
        return -1;
    }
    int fam[MAX_METHODS], nf = families(m, n, fam);
    fputs("if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size 1400,1000 "
          "font ',10' } else { set terminal png size 1400,1000 }\nset output ",
          g);
    put_quoted(g, path);
    /* noenhanced: names such as pruned-1_4 keep their underscores */
    fputs("\nset termoption noenhanced\nset grid\nset key bottom right font ',9'\nset datafile "
          "separator '\\t'\n"
          "set offsets graph 0.03, graph 0.03, graph 0.08, graph 0.05\n",
          g);
    /* per family, sorted by FLOPs: x FLOPs/base, x ms, y acc, y loglik, y HumanEval
     * agreement, label */
    for (int k = 0; k < nf; k++) {
        fprintf(g, "$f%d << EOD\n", k);
        int idx[MAX_METHODS], ni = 0;
        for (int i = 0; i < n; i++)
            if (!strcmp(m[i].family, m[fam[k]].family)) idx[ni++] = i;
        for (int a = 1; a < ni; a++)
            for (int b = a; b > 0 && r[idx[b]].flops < r[idx[b - 1]].flops; b--) {
                int t = idx[b];
                idx[b] = idx[b - 1], idx[b - 1] = t;
            }
        for (int a = 0; a < ni; a++) {
            const kvp_eval_result_t *x = &r[idx[a]];
            fprintf(g, "%.6g\t%.6g\t%.6g\t%.6g\t%.6g\t%s\n", x->flops / base_flops, x->ttft_ms,
                    x->acc, x->decode_loglik, isfinite(x->he_agree) ? x->he_agree : 0.0,
                    m[idx[a]].name);
        }
        fputs("EOD\n", g);
    }
    for (int yc = 3; yc <= 5; yc++) {
        put_front(g, m, r, n, KVP_EVAL_KVP, "kvp", yc, base_flops);
        put_front(g, m, r, n, KVP_EVAL_ALONE, "alone", yc, base_flops);
    }
    fputs("set multiplot layout 2,2 title ", g);
    put_quoted(g, title);
    fputs("\nset xlabel 'TTFT FLOPs (fraction of the base prefill)'\n"
          "set ylabel 'continuation accuracy (greedy tokens = test text)'\n"
          "set title 'accuracy against TTFT FLOPs'\n",
          g);
    plot_panel(g, nf, m, fam, 1, 3);
    fputs("set xlabel 'measured TTFT on this CPU (ms)'\nset title 'accuracy against measured "
          "TTFT'\n",
          g);
    plot_panel(g, nf, m, fam, 2, 3);
    fputs("set xlabel 'TTFT FLOPs (fraction of the base prefill)'\n"
          "set ylabel 'log-likelihood of the true continuation (nats/token)'\n"
          "set title 'log p(true continuation) under the decoding model, on the method''s cache'\n",
          g);
    plot_panel(g, nf, m, fam, 1, 4);
    fputs("set ylabel 'HumanEval-like: same first line as the base'\n"
          "set title 'HumanEval-like agreement with the base against TTFT FLOPs'\n",
          g);
    plot_panel(g, nf, m, fam, 1, 5);
    fputs("unset multiplot\n", g);
    int ws = pclose(g);
    struct stat st;
    if (ws == -1 || !WIFEXITED(ws) || WEXITSTATUS(ws) != 0 || stat(path, &st) || !st.st_size) {
        fprintf(stderr, "kvpred eval: gnuplot failed to draw %s (its message is above)\n", path);
        return -1;
    }
    return 0;
}

/* ---- the run -------------------------------------------------------------------- */

static void print_header(FILE *f, const opts_t *o, const kvp_eval_data_t *d) {
    fprintf(f,
            "test split: %zu files, %llu tokens; %d continuation prompts of %d tokens, %d scored "
            "tokens each; %d HumanEval-like items (of %zu found, %zu longer than %d tokens "
            "skipped)\n",
            d->n_test_files, (unsigned long long)d->test_tokens, d->n_prompts, d->P, d->K, d->n_he,
            d->n_he_found, d->n_he_long, o->eo.he_max_prompt);
}

static int report(const opts_t *o, const kvp_eval_data_t *d, const kvp_eval_method_t *m,
                  const kvp_eval_result_t *r, int n, kvp_err_t *err) {
    char path[4096];
    double bf = r[0].flops;
    snprintf(path, sizeof path, "%s/results.csv", o->out);
    int rc = kvp_eval_write_csv(path, m, r, n, bf, err);
    snprintf(path, sizeof path, "%s/cache_quality.csv", o->out);
    if (!rc) rc = kvp_eval_write_cq_csv(path, m, r, n, o->eo.pos_bucket, d->P - 1, err);
    snprintf(path, sizeof path, "%s/humaneval.csv", o->out);
    if (!rc) rc = kvp_eval_write_he_csv(path, m, r, n, d, err);
    snprintf(path, sizeof path, "%s/summary.txt", o->out);
    FILE *s = rc ? NULL : fopen(path, "w");
    if (!rc && !s) rc = kvp_err_set(err, KVP_EIO, "cannot write %s: %s", path, strerror(errno));
    FILE *outs[2] = {stdout, s};
    for (int k = 0; !rc && k < 2; k++) {
        print_header(outs[k], o, d);
        kvp_eval_print_table(outs[k], m, r, n, bf);
        kvp_eval_print_goals(outs[k], m, r, n, o->goal_gap);
    }
    if (s) fclose(s);
    if (!rc && !o->no_plot) {
        snprintf(path, sizeof path, "%s/eval.png", o->out);
        char title[256];
        snprintf(title, sizeof title,
                 "KV Prediction vs baselines: %d prompts of %d tokens, %d HumanEval-like items",
                 d->n_prompts, d->P, d->n_he);
        if (!plot(path, m, r, n, bf, title)) printf("wrote %s\n", path);
    }
    if (!rc)
        printf("wrote %s/results.csv, cache_quality.csv, humaneval.csv, summary.txt\n", o->out);
    return rc;
}

int kvp_cmd_eval(int argc, char **argv) {
    opts_t o;
    int rc = parse_args(argc, argv, &o);
    if (rc) {
        opts_free(&o);
        return rc == 1 ? 0 : 2;
    }
    if (mkdir(o.out, 0777) && errno != EEXIST) {
        fprintf(stderr, "kvpred eval: cannot create %s: %s\n", o.out, strerror(errno));
        opts_free(&o);
        return 1;
    }
    kvp_err_t err = {0};
    kvp_loaded_t base = {0};
    kvp_corpus_t *corpus = NULL;
    kvp_eval_data_t data = {0};
    kvp_eval_method_t m[MAX_METHODS];
    kvp_eval_result_t r[MAX_METHODS];
    int n = 0;
    memset(r, 0, sizeof r);
    double t0 = kvp_now();
    rc = load_models(&o, &base, &err);
    if (!rc) rc = kvp_tool_corpus_open(&o.corpus, &corpus, &err);
    o.eo.progress = stderr;
    if (!rc) rc = kvp_eval_data_build(&data, corpus, base.tok, &o.eo, &err);
    if (!rc) print_header(stderr, &o, &data);
    if (!rc) rc = fit_missing(&o, &base, corpus, &err);
    if (!rc) n = make_methods(&o, m);
    if (!rc) rc = kvp_eval_run(base.model, base.tok, m, n, &data, &o.eo, r, &err);
    if (!rc) rc = report(&o, &data, m, r, n, &err);
    if (!rc) fprintf(stderr, "kvpred eval: %.1f s in all\n", kvp_now() - t0);
    if (rc) fprintf(stderr, "kvpred eval: %s\n", err.msg[0] ? err.msg : kvp_err_name(rc));
    for (int i = 0; i < n; i++)
        kvp_eval_result_free(&r[i]);
    kvp_eval_data_free(&data);
    kvp_corpus_free(&corpus);
    kvp_loaded_free(&base);
    opts_free(&o);
    return rc ? 1 : 0;
}
