/* kvpred bench kvp: time to first token of plain base prefill against KV
 * Prediction's (auxiliary prefill + prediction + one base step) at several
 * prompt lengths, with the ratio of their TTFT FLOPs beside the ratio of
 * their times. Both run in this process on the same machine, one after the
 * other, so the ratio compares like with like. --dtype f16|bf16|q8_0 gives
 * the base model 16-bit or Q8_0 weights for its single-token step
 * (kvp_matvec16); its prefill stays on f32 sgemm but for the one row of its
 * output head. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_bench.h"
#include "kvp_bench_util.h"
#include "kvp_blas.h"
#include "kvp_json.h"
#include "kvp_kvpgen.h"
#include "kvp_rng.h"
#include "kvp_time.h"

#define MAX_LENS 8 /* rows of the table */

typedef struct {
    kvp_bench_opts_t b;    /* model files, --lens, --reps, --json */
    kvp_ggml_type_t dtype; /* of the base model's single-token step */
    int chunk;
} opts_t;

typedef struct {
    int n;
    double base_s, kvp_s, aux_s, pred_s, step_s, flops_base, flops_kvp;
} row_t;

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvpred bench kvp [--aux A.gguf --base B.gguf --predictor P.gguf]\n"
            "                        [--lens 128,512,2048] [--reps R] [--chunk C] [--json FILE]\n"
            "                        [--dtype f32|f16|bf16|q8_0]\n"
            "  Without model files it uses random weights in the shapes of a 110M base\n"
            "  (12 layers, d 768) and a 4-layer d 384 auxiliary model: times do not depend\n"
            "  on what the weights are. --dtype: the base model's weights for its\n"
            "  single-token step (default f32; f16/bf16 round and q8_0 quantises the\n"
            "  weights when the model does not already hold them in that type; q8_0\n"
            "  leaves matrices whose rows are not a multiple of 32 on f32).\n");
}

/* bench kvp's own options: the base step's weight type and the chunk size. */
static int own_opt(void *own, int code, const char *arg) {
    opts_t *o = own;
    switch (code) {
    case 'c':
        o->chunk = atoi(arg);
        return 0;
    case 'd':
        if (kvp_bench_parse_type(arg, &o->dtype)) {
            fprintf(stderr, "kvpred bench kvp: --dtype is f32, f16, bf16 or q8_0, not '%s'\n", arg);
            return 2;
        }
        return 0;
    default:
        return -1;
    }
}

static int parse(int argc, char **argv, opts_t *o) {
    static const struct option lo[] = {KVP_BENCH_MODEL_LONGOPTS,
                                       {"lens", required_argument, 0, KVP_BENCH_OPT_LENS},
                                       {"reps", required_argument, 0, KVP_BENCH_OPT_REPS},
                                       {"chunk", required_argument, 0, 'c'},
                                       {"json", required_argument, 0, KVP_BENCH_OPT_JSON},
                                       {"dtype", required_argument, 0, 'd'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    *o = (opts_t){.b = {.reps = 3, .lens = {128, 512, 2048}, .n_lens = 3, .max_lens = MAX_LENS},
                  .chunk = 512,
                  .dtype = KVP_GGML_F32};
    int rc = kvp_bench_parse(argc, argv, lo, &o->b, own_opt, o, usage);
    if (rc) return rc;
    if (kvp_bench_check_lens(&o->b, "kvpred bench kvp")) return 2;
    if (o->b.reps < 1 || o->chunk < 1 || kvp_bench_models_partial(&o->b)) {
        fprintf(stderr, "kvpred bench kvp: give all of --aux, --base, --predictor or none; "
                        "--reps and --chunk >= 1\n");
        return 2;
    }
    return 0;
}

/* Puts the base model's single-token step on o->dtype: f32 drops a compact
 * copy a file gave it; f16/bf16/q8_0 keep one of that type or round the
 * weights into one (after the predictor's pair check, which fingerprints the
 * file's weights: timing does not depend on the values). */
static int set_dtype(const opts_t *o, kvp_model_t *base, bool *rounded, kvp_err_t *err) {
    *rounded = false;
    if (o->dtype == KVP_GGML_F32) {
        kvp_model_drop_half(base);
        return KVP_OK;
    }
    if (base->params16 && base->type16 == o->dtype) return KVP_OK;
    *rounded = o->b.aux != NULL;
    return kvp_model_make_half(base, o->dtype, err);
}

static int measure(const opts_t *o, const kvp_model_t *aux, const kvp_model_t *base,
                   const kvp_predictor_t *p, int n, row_t *r, kvp_err_t *err) {
    kvp_model_ctx_t *actx = NULL, *bctx = NULL;
    kvp_kvcache_t *cache = NULL, *acache = NULL;
    int32_t *toks = malloc(sizeof(int32_t) * (size_t)n);
    float *logits = malloc(sizeof(float) * (size_t)base->cfg.n_vocab);
    kvp_rng_t rng;
    kvp_rng_seed(&rng, 5);
    for (int i = 0; i < n; i++)
        toks[i] = (int32_t)kvp_rng_below(&rng, (uint64_t)base->cfg.n_vocab);
    int rc = kvp_model_ctx_new(&actx, aux, o->chunk, n, err);
    if (!rc) rc = kvp_model_ctx_new(&bctx, base, o->chunk, n, err);
    if (!rc) rc = kvp_model_new_cache(base, n, &cache, err);
    /* made once, as the base's cache is: not part of a TTFT */
    if (!rc) rc = kvp_model_new_cache(aux, n > 1 ? n - 1 : 1, &acache, err);
    *r = (row_t){.n = n, .base_s = 1e30, .kvp_s = 1e30};
    /* alternate the two methods so that drift in machine load hits both */
    for (int rep = 0; !rc && rep <= o->b.reps; rep++) {
        cache->len = 0;
        double t0 = kvp_now();
        rc = kvp_model_forward(bctx, cache, toks, n, logits, KVP_LOGITS_LAST, err);
        kvp_argmax(logits, base->cfg.n_vocab);
        double dt = kvp_now() - t0;
        if (rep && dt < r->base_s) r->base_s = dt;
        cache->len = 0;
        kvp_kvp_stats_t st = {0};
        if (!rc)
            rc = kvp_kvp_prefill(actx, bctx, p, acache, cache, toks, n, o->chunk, logits, &st, err);
        kvp_argmax(logits, base->cfg.n_vocab);
        if (rep && st.t_first < r->kvp_s) {
            r->kvp_s = st.t_first;
            r->aux_s = st.t_aux_prefill;
            r->pred_s = st.t_predict;
            r->step_s = st.t_base_step;
        }
    }
    r->flops_base = kvp_model_flops(&base->cfg, 0, n);
    r->flops_kvp = kvp_kvp_ttft_flops(&aux->cfg, &base->cfg, p, n);
    free(toks);
    free(logits);
    kvp_kvcache_free(&cache);
    kvp_kvcache_free(&acache);
    kvp_model_ctx_free(&actx);
    kvp_model_ctx_free(&bctx);
    return rc;
}

static void write_json(const opts_t *o, const row_t *rows, int n_rows, const kvp_model_t *aux,
                       const kvp_model_t *base) {
    kvp_json_t j;
    if (!kvp_bench_json_open(&j, o->b.json, "kvp", "kvpred bench kvp")) return;
    kvp_json_str(&j, "base_step_dtype", kvp_ggml_type_name(o->dtype));
    kvp_json_int(&j, "aux_params", (long long)aux->n_params);
    kvp_json_int(&j, "base_params", (long long)base->n_params);
    kvp_json_arr(&j, "results");
    for (int i = 0; i < n_rows; i++) {
        const row_t *r = &rows[i];
        kvp_json_item_obj(&j);
        kvp_json_int(&j, "prompt_tokens", r->n);
        kvp_json_num(&j, "base_ttft_ms", r->base_s * 1e3);
        kvp_json_num(&j, "kvp_ttft_ms", r->kvp_s * 1e3);
        kvp_json_num(&j, "aux_prefill_ms", r->aux_s * 1e3);
        kvp_json_num(&j, "predict_ms", r->pred_s * 1e3);
        kvp_json_num(&j, "base_step_ms", r->step_s * 1e3);
        kvp_json_num(&j, "time_ratio", r->base_s / r->kvp_s);
        kvp_json_num(&j, "flops_ratio", r->flops_base / r->flops_kvp);
        kvp_json_num(&j, "speedup_fraction_of_flops_ratio",
                     (r->base_s / r->kvp_s) / (r->flops_base / r->flops_kvp));
        kvp_json_close_obj(&j);
    }
    kvp_json_close_arr(&j);
    kvp_bench_json_close(&j);
}

int kvp_bench_kvp(int argc, char **argv) {
    opts_t o;
    int prc = parse(argc, argv, &o);
    if (prc) return prc == 1 ? 0 : 2;
    kvp_err_t err = {0};
    kvp_model_t *aux = NULL, *base = NULL;
    kvp_predictor_t *p = NULL;
    row_t rows[MAX_LENS];
    int n_rows = 0;
    bool rounded = false;
    int rc = kvp_bench_model_pair(o.b.aux, o.b.base, o.b.predictor, 0, &aux, &base, &p, &err);
    if (!rc) rc = set_dtype(&o, base, &rounded, &err);
    if (!rc) {
        printf("OpenBLAS kernels: %s, %d threads\n", kvp_blas_corename(), kvp_blas_threads());
        printf("base %.1fM params (%d layers, d %d; step on %s weights%s), aux %.1fM params (%d "
               "layers, d %d)%s\n\n",
               base->n_params / 1e6, base->cfg.n_layer, base->cfg.n_embd,
               kvp_ggml_type_name(o.dtype), rounded ? ", rounded from the file's" : "",
               aux->n_params / 1e6, aux->cfg.n_layer, aux->cfg.n_embd,
               o.b.aux ? "" : ", random weights");
        printf("%7s %10s %10s %9s %9s %9s %10s %11s %9s\n", "prompt", "base ms", "kvp ms", "aux ms",
               "pred ms", "step ms", "time x", "FLOPs x", "time/FLOPs");
    }
    for (int i = 0; !rc && i < o.b.n_lens; i++) {
        row_t *r = &rows[n_rows];
        rc = measure(&o, aux, base, p, o.b.lens[i], r, &err);
        if (rc) break;
        n_rows++;
        double tr = r->base_s / r->kvp_s, fr = r->flops_base / r->flops_kvp;
        printf("%7d %10.1f %10.1f %9.1f %9.1f %9.1f %9.2fx %10.2fx %8.0f%%\n", r->n,
               r->base_s * 1e3, r->kvp_s * 1e3, r->aux_s * 1e3, r->pred_s * 1e3, r->step_s * 1e3,
               tr, fr, 100.0 * tr / fr);
        fflush(stdout);
    }
    if (rc)
        fprintf(stderr, "kvpred bench kvp: %s\n", err.msg);
    else if (o.b.json)
        write_json(&o, rows, n_rows, aux, base);
    kvp_predictor_free(&p);
    kvp_model_free(&aux);
    kvp_model_free(&base);
    return rc ? 1 : 0;
}
