/* kvpred fit-predictor: the closed-form start of a KV predictor — ridge
 * regression from the auxiliary model's K/V to the base model's, on
 * calibration windows of the corpus's train split.
 *
 * The story: load both models (they must share a vocabulary), tokenize the
 * train split with the aux tokenizer, cut evenly spread windows of T tokens
 * (BOS first, as a prompt starts), run both models over each window, read
 * both caches un-rotated and add the rows to the streaming sums (every
 * eleventh window to the validation sums instead), solve, then run the
 * validation windows once more to report each layer's fit quality, and save. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvp_cmds.h"
#include "kvp_corpus.h"
#include "kvp_predictor.h"
#include "kvp_time.h"
#include "kvp_tool_util.h"

#define MAX_GRID 16

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvpred fit-predictor --aux A.gguf --base B.gguf -o P.gguf [options]\n"
            "  --aux FILE        auxiliary model (GGUF, architecture llama)\n"
            "  --base FILE       base model; same vocabulary as the auxiliary model\n"
            "  -o, --out FILE    predictor file to write\n"
            "  --corpus PATH     corpus directory or file (default " KVP_CORPUS_DEFAULT_DIR ");\n"
            "                    only its train split is read (split rule: docs/training.md)\n"
            "  --ext EXT         file names taken in directories (default " KVP_CORPUS_DEFAULT_EXT
            "; '' = all text)\n"
            "  --holdout H       validation/test percentage of the corpus split (default %d)\n"
            "  --tokens N        calibration tokens (default 200000); validation rows are\n"
            "                    one window in eleven on top of these\n"
            "  --ctx T           window length in tokens (default 256)\n"
            "  --layer-map LIST  aux layer per base layer, e.g. 0,0,1,1 (default: spread evenly,\n"
            "                    ending on the last aux layer)\n"
            "  --lambda L|grid   ridge lambda relative to the mean diagonal of X^T X, or 'grid'\n"
            "                    (default): each map picks from 1e-4 .. 1e2 by validation error\n",
            KVP_CORPUS_DEFAULT_HOLDOUT);
}

typedef struct opts {
    const char *aux, *base, *out;
    kvp_tool_corpus_t corpus;
    int ctx;
    uint64_t tokens;
    int32_t *layer_map;
    int n_map;
    double lambdas[MAX_GRID];
    int n_lambdas;
} opts_t;

/* ---- options ---------------------------------------------------------- */

static int parse_lambda(const char *s, opts_t *o) {
    if (!strcmp(s, "grid")) {
        o->n_lambdas = 7;
        for (int i = 0; i < 7; i++)
            o->lambdas[i] = pow(10.0, i - 4);
        return 0;
    }
    float v;
    if (kvp_parse_float("--lambda", s, 0.0f, 1e6f, &v)) return -1;
    o->lambdas[0] = v;
    o->n_lambdas = 1;
    return 0;
}

enum { OPT_AUX = 256, OPT_BASE, OPT_TOKENS, OPT_CTX, OPT_MAP, OPT_LAMBDA };

static int parse_one(int c, void *opts) {
    opts_t *o = opts;
    switch (c) {
    case OPT_AUX:
        return o->aux = optarg, 0;
    case OPT_BASE:
        return o->base = optarg, 0;
    case 'o':
        return o->out = optarg, 0;
    case KVP_TOOL_OPT_CORPUS:
    case KVP_TOOL_OPT_EXT:
    case KVP_TOOL_OPT_HOLDOUT:
        return kvp_tool_corpus_flag(&o->corpus, "kvpred fit-predictor", c, optarg);
    case OPT_TOKENS:
        return kvp_parse_count("kvpred", "--tokens", optarg, 40, &o->tokens);
    case OPT_CTX:
        return kvp_parse_int("--ctx", optarg, 2, 1 << 16, &o->ctx);
    case OPT_MAP:
        return kvp_parse_layer_map("kvpred", optarg, &o->layer_map, &o->n_map);
    case OPT_LAMBDA:
        return parse_lambda(optarg, o);
    default:
        return -1;
    }
}

/* 0 = go on, 1 = --help printed, 2 = bad arguments. */
static int parse_args(int argc, char **argv, opts_t *o) {
    static const struct option lo[] = {{"aux", required_argument, 0, OPT_AUX},
                                       {"base", required_argument, 0, OPT_BASE},
                                       {"out", required_argument, 0, 'o'},
                                       KVP_TOOL_CORPUS_OPTIONS,
                                       {"tokens", required_argument, 0, OPT_TOKENS},
                                       {"ctx", required_argument, 0, OPT_CTX},
                                       {"layer-map", required_argument, 0, OPT_MAP},
                                       {"lambda", required_argument, 0, OPT_LAMBDA},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    *o = (opts_t){.ctx = 256, .tokens = 200000};
    kvp_tool_corpus_init(&o->corpus, false, 0);
    parse_lambda("grid", o);
    int rc = kvp_tool_getopt(argc, argv, "o:h", lo, usage, parse_one, o);
    if (rc) return rc;
    if (!o->aux || !o->base || !o->out || optind < argc) return usage(stderr), 2;
    return 0;
}

/* ---- progress on stderr ---------------------------------------------- */

typedef struct progress {
    uint64_t total, done;
    double t0, last;
    int tty;
} progress_t;

static void progress_draw(progress_t *p, int final) {
    double now = kvp_now(), el = now - p->t0;
    if (!final && now - p->last < (p->tty ? 0.1 : 15.0)) return;
    p->last = now;
    double rate = el > 0 ? p->done / el : 0, eta = rate > 0 ? (p->total - p->done) / rate : 0;
    int w = 30, fill = p->total ? (int)(w * (double)p->done / p->total) : w;
    char bar[32];
    for (int i = 0; i < w; i++)
        bar[i] = i < fill ? '#' : '.';
    bar[w] = 0;
    fprintf(stderr, "%s[%s] %llu/%llu tokens  %.0f tok/s  ETA %dm%02ds%s", p->tty ? "\r" : "", bar,
            (unsigned long long)p->done, (unsigned long long)p->total, rate, (int)eta / 60,
            (int)eta % 60, p->tty && !final ? "" : "\n");
    fflush(stderr);
}

/* ---- the corpus as windows --------------------------------------------- */

typedef struct plan {
    const int32_t *tok;
    size_t n_tok;
    int T;
    int32_t bos;
    size_t n_win, n_val;
} plan_t;

/* Windows are spread evenly over the stream; one in eleven is validation. */
static int plan_is_val(const plan_t *pl, size_t w) {
    return (w + 1) * pl->n_val / pl->n_win > w * pl->n_val / pl->n_win;
}

/* BOS, then T-1 stream tokens (a BOS the stream has there is not doubled). */
static void plan_window(const plan_t *pl, size_t w, int32_t *out) {
    size_t span = (size_t)pl->T, room = pl->n_tok > span ? pl->n_tok - span : 0;
    size_t at = pl->n_win > 1 ? w * room / (pl->n_win - 1) : 0;
    int t = 0;
    if (pl->bos >= 0) {
        out[t++] = pl->bos;
        if (pl->tok[at] == pl->bos) at++;
    }
    for (; t < pl->T; t++)
        out[t] = pl->tok[at++ % pl->n_tok];
}

static int make_plan(const kvp_corpus_stream_t *s, const opts_t *o, int32_t bos, plan_t *pl) {
    *pl = (plan_t){.tok = s->tok, .n_tok = s->n, .T = o->ctx, .bos = bos};
    size_t n_fit = (size_t)((o->tokens + (uint64_t)o->ctx - 1) / (uint64_t)o->ctx);
    pl->n_val = (n_fit + 9) / 10;
    pl->n_win = n_fit + pl->n_val;
    if (s->n < (size_t)o->ctx + 1) {
        fprintf(stderr,
                "kvpred fit-predictor: the train split has %zu tokens, fewer than one "
                "window of %d\n",
                s->n, o->ctx);
        return -1;
    }
    if (s->n < pl->n_win * (size_t)o->ctx)
        fprintf(stderr,
                "kvpred fit-predictor: warning: the train split has %zu tokens, fewer than "
                "the %zu asked for; windows overlap\n",
                s->n, pl->n_win * (size_t)o->ctx);
    return 0;
}

/* ---- models ----------------------------------------------------------- */

typedef struct run {
    kvp_loaded_t aux, base;
    kvp_model_ctx_t *actx, *bctx;
    kvp_kvcache_t *acache, *bcache;
} run_t;

static void run_free(run_t *r) {
    kvp_kvcache_free(&r->acache);
    kvp_kvcache_free(&r->bcache);
    kvp_model_ctx_free(&r->actx);
    kvp_model_ctx_free(&r->bctx);
    kvp_loaded_free(&r->aux);
    kvp_loaded_free(&r->base);
}

static int run_open(run_t *r, const opts_t *o, kvp_err_t *err) {
    memset(r, 0, sizeof *r);
    int rc = kvp_load_model_and_vocab(o->aux, &r->aux, err);
    if (!rc) rc = kvp_load_model_and_vocab(o->base, &r->base, err);
    if (!rc) rc = kvp_tool_check_vocab_pair(r->aux.tok, r->base.tok, err);
    if (!rc) rc = kvp_model_ctx_new(&r->actx, r->aux.model, o->ctx, o->ctx, err);
    if (!rc) rc = kvp_model_ctx_new(&r->bctx, r->base.model, o->ctx, o->ctx, err);
    if (!rc) rc = kvp_model_new_cache(r->aux.model, o->ctx, &r->acache, err);
    if (!rc) rc = kvp_model_new_cache(r->base.model, o->ctx, &r->bcache, err);
    return rc;
}

/* Both models over one window, from empty caches. */
static int run_window(run_t *r, const int32_t *tok, int T, kvp_err_t *err) {
    r->acache->len = r->bcache->len = 0;
    int rc = kvp_model_forward(r->actx, r->acache, tok, T, NULL, KVP_LOGITS_NONE, err);
    if (!rc) rc = kvp_model_forward(r->bctx, r->bcache, tok, T, NULL, KVP_LOGITS_NONE, err);
    return rc;
}

static int load_corpus(const opts_t *o, const kvp_tokenizer_t *tok, kvp_corpus_t **c,
                       kvp_err_t *err) {
    int rc = kvp_tool_corpus_open(&o->corpus, c, err);
    if (!rc) rc = kvp_corpus_tokenize(*c, KVP_SPLIT_TRAIN, tok, err);
    return rc;
}

/* ---- fit quality on the validation windows ----------------------------- */

typedef struct quality {
    double l1_diff, l1_true, cos_sum;
    uint64_t n_cos;
} quality_t;

static void quality_add(quality_t *q, const float *pred, const float *truth, int n_tok, int n_head,
                        int hd) {
    for (size_t r = 0; r < (size_t)n_tok * n_head; r++) {
        const float *a = pred + r * hd, *b = truth + r * hd;
        double dot = 0, na = 0, nb = 0;
        for (int i = 0; i < hd; i++) {
            q->l1_diff += fabs((double)a[i] - b[i]);
            q->l1_true += fabs((double)b[i]);
            dot += (double)a[i] * b[i], na += (double)a[i] * a[i], nb += (double)b[i] * b[i];
        }
        if (na > 0 && nb > 0) q->cos_sum += dot / sqrt(na * nb), q->n_cos++;
    }
}

typedef struct qbuf {
    float *xk, *xv, *pk, *pv, *tk, *tv;
} qbuf_t;

/* Every base layer of the window just run: predicted against true K/V. */
static int quality_window(const kvp_predictor_t *p, const run_t *r, int T, qbuf_t *b, quality_t *q,
                          kvp_err_t *err) {
    for (int l = 0; l < p->base.n_layer; l++) {
        int rc = kvp_kvcache_read(r->acache, p->layer_map[l], 0, T, b->xk, b->xv, err);
        if (!rc) rc = kvp_kvcache_read(r->bcache, l, 0, T, b->tk, b->tv, err);
        if (rc) return rc;
        kvp_predictor_apply_layer(p, l, T, b->xk, b->xv, b->pk, b->pv);
        quality_add(&q[2 * l], b->pk, b->tk, T, p->base.n_kv_head, p->base.head_dim);
        quality_add(&q[2 * l + 1], b->pv, b->tv, T, p->base.n_kv_head, p->base.head_dim);
    }
    return KVP_OK;
}

static void print_quality(const kvp_predictor_t *p, const quality_t *q) {
    const kvp_predictor_fitinfo_t *fi = p->fit;
    printf("layer  aux  lambda_K   relL1_K  cos_K    lambda_V   relL1_V  cos_V\n");
    double s[4] = {0};
    for (int l = 0; l < p->base.n_layer; l++) {
        const quality_t *k = &q[2 * l], *v = &q[2 * l + 1];
        double v4[4] = {k->l1_diff / k->l1_true, k->n_cos ? k->cos_sum / k->n_cos : NAN,
                        v->l1_diff / v->l1_true, v->n_cos ? v->cos_sum / v->n_cos : NAN};
        printf("%5d %4d  %8.0e  %7.4f  %7.4f  %8.0e  %7.4f  %7.4f\n", l, (int)p->layer_map[l],
               fi->lambda_k[l], v4[0], v4[1], fi->lambda_v[l], v4[2], v4[3]);
        for (int i = 0; i < 4; i++)
            s[i] += v4[i] / p->base.n_layer;
    }
    printf("mean                 %7.4f  %7.4f            %7.4f  %7.4f\n", s[0], s[1], s[2], s[3]);
}

/* ---- the two passes ---------------------------------------------------- */

static int fit_pass(run_t *r, const plan_t *pl, kvp_predictor_fit_t *f, int32_t *win,
                    progress_t *pr, kvp_err_t *err) {
    for (size_t w = 0; w < pl->n_win; w++) {
        plan_window(pl, w, win);
        int rc = run_window(r, win, pl->T, err);
        if (!rc)
            rc = kvp_predictor_fit_add_cache(f, r->acache, r->bcache, 0, pl->T, plan_is_val(pl, w),
                                             err);
        if (rc) return rc;
        pr->done += (uint64_t)pl->T;
        progress_draw(pr, 0);
    }
    return KVP_OK;
}

static int quality_pass(run_t *r, const plan_t *pl, const kvp_predictor_t *p, int32_t *win,
                        quality_t *q, progress_t *pr, kvp_err_t *err) {
    size_t ni = (size_t)pl->T * p->d_in, no = (size_t)pl->T * p->d_out;
    float *mem = malloc(sizeof(float) * 2 * (ni + 2 * no));
    if (!mem) return kvp_err_set(err, KVP_ENOMEM, "out of memory");
    qbuf_t b = {mem,
                mem + ni,
                mem + 2 * ni,
                mem + 2 * ni + no,
                mem + 2 * ni + 2 * no,
                mem + 2 * ni + 3 * no};
    int rc = KVP_OK;
    for (size_t w = 0; w < pl->n_win && !rc; w++) {
        if (!plan_is_val(pl, w)) continue;
        plan_window(pl, w, win);
        rc = run_window(r, win, pl->T, err);
        if (!rc) rc = quality_window(p, r, pl->T, &b, q, err);
        pr->done += (uint64_t)pl->T;
        progress_draw(pr, 0);
    }
    free(mem);
    return rc;
}

/* Everything after the models and the corpus are loaded. */
static int fit_and_save(run_t *r, const opts_t *o, const plan_t *pl, kvp_err_t *err) {
    kvp_predictor_fit_t *f = NULL;
    kvp_predictor_t *p = NULL;
    int32_t *win = malloc(sizeof(int32_t) * (size_t)pl->T);
    quality_t *q = calloc(2 * (size_t)r->base.model->cfg.n_layer, sizeof *q);
    progress_t pr = {
        .total = (uint64_t)(pl->n_win + pl->n_val) * pl->T, .t0 = kvp_now(), .tty = isatty(2)};
    int rc = win && q ? KVP_OK : kvp_err_set(err, KVP_ENOMEM, "out of memory");
    if (!rc) rc = kvp_tool_check_layer_map(o->layer_map, o->n_map, r->base.model->cfg.n_layer, err);
    if (!rc)
        rc = kvp_predictor_fit_new(&f, kvp_kv_shape_of(r->aux.model),
                                   kvp_kv_shape_of(r->base.model), o->layer_map, err);
    if (!rc) rc = fit_pass(r, pl, f, win, &pr, err);
    double t_solve = kvp_now();
    if (!rc) rc = kvp_predictor_fit_solve(f, o->lambdas, o->n_lambdas, &p, err);
    t_solve = kvp_now() - t_solve;
    if (!rc) rc = quality_pass(r, pl, p, win, q, &pr, err);
    if (!rc) progress_draw(&pr, 1);
    if (rc && pr.tty && pr.done) fputc('\n', stderr);
    if (!rc) rc = kvp_predictor_bind(p, r->aux.model, r->base.model, err);
    if (!rc) rc = kvp_predictor_save(p, o->out, err);
    if (!rc) {
        printf("fitted on %llu tokens, validated on %llu (%zu windows of %d); solve %.1f s\n",
               (unsigned long long)p->fit->train_tokens, (unsigned long long)p->fit->val_tokens,
               pl->n_win, pl->T, t_solve);
        print_quality(p, q);
        printf("wrote %s\n", o->out);
    }
    kvp_predictor_fit_free(&f);
    kvp_predictor_free(&p);
    free(win);
    free(q);
    return rc;
}

int kvp_cmd_fit_predictor(int argc, char **argv) {
    opts_t o;
    int rc = parse_args(argc, argv, &o);
    if (rc) {
        free(o.layer_map);
        return rc == 1 ? 0 : 2;
    }
    kvp_err_t err = {0};
    run_t r;
    kvp_corpus_t *corpus = NULL;
    plan_t pl;
    rc = run_open(&r, &o, &err);
    if (!rc) rc = load_corpus(&o, r.aux.tok, &corpus, &err);
    if (!rc && make_plan(kvp_corpus_stream(corpus, KVP_SPLIT_TRAIN), &o,
                         kvp_tokenizer_bos(r.aux.tok), &pl))
        rc = KVP_EINVAL, err.msg[0] = 0;
    if (!rc) rc = fit_and_save(&r, &o, &pl, &err);
    if (rc && err.msg[0]) fprintf(stderr, "kvpred fit-predictor: %s\n", err.msg);
    kvp_corpus_free(&corpus);
    run_free(&r);
    free(o.layer_map);
    return rc ? 1 : 0;
}
