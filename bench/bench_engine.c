/* kvpred bench engine: OpenBLAS sgemm GFLOP/s on this machine, then the
 * engine's prefill and decode speed on a ~110M-parameter Llama-shape model
 * stored as F32, F16, BF16 and Q8_0 GGUF files, in one run so the ratios
 * compare like with like. Decode of an F16, BF16 or Q8_0 file runs on the
 * model's copy of its weights in that type (kvp_matvec16), so it streams
 * half the bytes of f32 (F16/BF16) or 34 for every 128 (Q8_0). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cblas.h>

#include "kvp_bench.h"
#include "kvp_bench_util.h"
#include "kvp_blas.h"
#include "kvp_json.h"
#include "kvp_model.h"
#include "kvp_rng.h"
#include "kvp_time.h"
#include "kvp_tokenizer.h"

typedef struct {
    kvp_bench_opts_t b; /* --reps, --small, --json */
    int prompt, decode;
    const char *types, *dir;
    kvp_model_config_t cfg;
} opts_t;

static void usage(FILE *f) {
    fprintf(f, "usage: kvpred bench engine [--prompt N] [--decode N] [--reps R]\n"
               "                           [--types f32,f16,bf16,q8_0] [--dir DIR] [--json FILE]\n"
               "                           [--small]\n"
               "  Measures sgemm GFLOP/s, then prefill of an N-token prompt (default 512) and\n"
               "  decode of N tokens (default 64) on a random-weight 110M Llama-shape model\n"
               "  (12 layers, d 768, 12 heads, ffn 2048, vocab 32000, tied output) written as\n"
               "  GGUF files of each type in DIR (default /tmp/kvpred-bench; all four types\n"
               "  by default). F16, BF16 and Q8_0 files decode on the file's weights\n"
               "  (16-bit values, Q8_0 blocks), F32 on f32 (sgemv); prefill is f32 sgemm\n"
               "  for all. --small uses a tiny model (for a quick check).\n");
}

/* GB/s of reading a buffer much larger than the caches (what decode of an
 * F32 model must do with its weights every token), best of reps. */
static double read_bandwidth(size_t bytes, int reps) {
    size_t n = bytes / sizeof(float);
    float *a = malloc(bytes);
    for (size_t i = 0; i < n; i++)
        a[i] = (float)(i & 7);
    double best = 1e30, sink = 0;
    for (int r = 0; r < reps + 1; r++) {
        double t0 = kvp_now();
        /* the same matrix-vector product decode runs, on a tall thin matrix */
        float x[256], y[1];
        for (int i = 0; i < 256; i++)
            x[i] = 1.0f;
        size_t rows = n / 256;
        for (size_t off = 0; off < rows; off += 65536) {
            int m = (int)(rows - off < 65536 ? rows - off : 65536);
            float *yy = malloc(sizeof(float) * (size_t)m);
            cblas_sgemv(CblasRowMajor, CblasNoTrans, m, 256, 1.0f, a + off * 256, 256, x, 1, 0.0f,
                        yy, 1);
            sink += yy[0];
            free(yy);
        }
        y[0] = (float)sink;
        (void)y;
        double dt = kvp_now() - t0;
        if (r && dt < best) best = dt;
    }
    free(a);
    return (double)bytes / best / 1e9;
}

static int write_model(const kvp_model_t *m, kvp_ggml_type_t type, const char *path,
                       kvp_err_t *err) {
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    if (!w) return kvp_err_set(err, KVP_ENOMEM, "out of memory");
    int rc = kvp_model_to_gguf(m, w, type, err);
    if (!rc) rc = kvp_gguf_writer_write(w, path, err);
    kvp_gguf_writer_free(&w);
    return rc;
}

typedef struct {
    const char *type;
    double load_s, prefill_s, prefill_tps, prefill_gflops, decode_tps;
    double step_bytes; /* weight bytes a decode step streams */
    char path[40];     /* how decode multiplies: "sgemv f32" or e.g. "avx512 q8_0 x2" */
} result_t;

static void describe_path(const kvp_model_t *m, const kvp_model_ctx_t *ctx, char *buf, size_t cap) {
    const kvp_matvec16_t *mv = kvp_model_ctx_matvec16(ctx);
    if (m->params16 && mv)
        snprintf(buf, cap, "%s %s x%d", kvp_matvec16_isa_name(mv), kvp_ggml_type_name(m->type16),
                 kvp_matvec16_threads(mv));
    else
        snprintf(buf, cap, "sgemv f32");
}

static int run_one(const opts_t *o, const char *path, result_t *res, kvp_err_t *err) {
    double t0 = kvp_now();
    kvp_model_t *m = NULL;
    kvp_model_ctx_t *ctx = NULL;
    kvp_kvcache_t *cache = NULL;
    int32_t *toks = malloc(sizeof(int32_t) * (size_t)(o->prompt + o->decode));
    float *logits = NULL;
    int rc = kvp_model_load(&m, path, err);
    if (rc) goto done;
    res->load_s = kvp_now() - t0;
    int cap = o->prompt + o->decode;
    if ((rc = kvp_model_ctx_new(&ctx, m, o->prompt, cap, err)) ||
        (rc = kvp_model_new_cache(m, cap, &cache, err)))
        goto done;
    res->step_bytes = (double)kvp_model_step_weight_bytes(m);
    describe_path(m, ctx, res->path, sizeof res->path);
    logits = malloc(sizeof(float) * (size_t)m->cfg.n_vocab);
    kvp_rng_t r;
    kvp_rng_seed(&r, 7);
    for (int i = 0; i < cap; i++)
        toks[i] = (int32_t)kvp_rng_below(&r, (uint64_t)m->cfg.n_vocab);
    double best = 1e30;
    for (int rep = 0; rep < o->b.reps + 1; rep++) {
        cache->len = 0;
        double t = kvp_now();
        if ((rc = kvp_model_forward(ctx, cache, toks, o->prompt, logits, KVP_LOGITS_LAST, err)))
            goto done;
        double dt = kvp_now() - t;
        if (rep && dt < best) best = dt;
    }
    res->prefill_s = best;
    res->prefill_tps = o->prompt / best;
    res->prefill_gflops = kvp_model_flops(&m->cfg, 0, o->prompt) / best / 1e9;
    double t = kvp_now();
    for (int i = 0; i < o->decode; i++)
        if ((rc = kvp_model_forward(ctx, cache, toks + o->prompt + i, 1, logits, KVP_LOGITS_LAST,
                                    err)))
            goto done;
    res->decode_tps = o->decode / (kvp_now() - t);
done:
    free(toks);
    free(logits);
    kvp_kvcache_free(&cache);
    kvp_model_ctx_free(&ctx);
    kvp_model_free(&m);
    return rc;
}

/* bench engine's own options: the prompt and decode lengths, the weight
 * types and where their files go. */
static int own_opt(void *own, int code, const char *arg) {
    opts_t *o = own;
    switch (code) {
    case 'p':
        o->prompt = atoi(arg);
        return 0;
    case 'n':
        o->decode = atoi(arg);
        return 0;
    case 't':
        o->types = arg;
        return 0;
    case 'd':
        o->dir = arg;
        return 0;
    default:
        return -1;
    }
}

static int parse_args(int argc, char **argv, opts_t *o) {
    static const struct option lo[] = {{"prompt", required_argument, 0, 'p'},
                                       {"decode", required_argument, 0, 'n'},
                                       {"reps", required_argument, 0, KVP_BENCH_OPT_REPS},
                                       {"types", required_argument, 0, 't'},
                                       {"dir", required_argument, 0, 'd'},
                                       {"json", required_argument, 0, KVP_BENCH_OPT_JSON},
                                       {"small", no_argument, 0, KVP_BENCH_OPT_SMALL},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    *o = (opts_t){.b = {.reps = 3},
                  .prompt = 512,
                  .decode = 64,
                  .types = "f32,f16,bf16,q8_0",
                  .dir = "/tmp/kvpred-bench",
                  .cfg = kvp_bench_config_110m()};
    int rc = kvp_bench_parse(argc, argv, lo, &o->b, own_opt, o, usage);
    if (rc) return rc;
    if (o->b.small)
        o->cfg = (kvp_model_config_t){.n_vocab = 512,
                                      .n_embd = 64,
                                      .n_layer = 2,
                                      .n_head = 4,
                                      .n_kv_head = 2,
                                      .n_ff = 128,
                                      .n_ctx_train = 1024,
                                      .tied_output = true};
    if (o->prompt < 1 || o->decode < 1 || o->b.reps < 1) {
        fprintf(stderr, "kvpred bench engine: --prompt, --decode and --reps must be >= 1\n");
        return 2;
    }
    return 0;
}

int kvp_bench_engine(int argc, char **argv) {
    opts_t o;
    int prc = parse_args(argc, argv, &o);
    if (prc) return prc == 1 ? 0 : 2;
    kvp_err_t err = {0};
    mkdir(o.dir, 0755);

    double ref = kvp_bench_blas_ref();
    double mix = kvp_bench_sgemm_gflops(o.prompt, 3 * o.cfg.n_embd, o.cfg.n_embd, 5);
    printf("sgemm 512x2048x2048: %.1f GFLOP/s   (%dx%dx%d, the QKV shape: %.1f GFLOP/s)\n", ref,
           o.prompt, 3 * o.cfg.n_embd, o.cfg.n_embd, mix);
    double bw = read_bandwidth((size_t)1 << 30, 3);
    printf("memory read bandwidth (sgemv over 1 GiB): %.1f GB/s\n", bw);

    kvp_model_t *m = NULL;
    printf("building a random model (%d layers, d %d, %d heads, ffn %d, vocab %d)...\n",
           o.cfg.n_layer, o.cfg.n_embd, o.cfg.n_head, o.cfg.n_ff, o.cfg.n_vocab);
    fflush(stdout);
    if (kvp_model_new_random(&m, &o.cfg, 42, 0.02f, &err)) {
        fprintf(stderr, "kvpred bench engine: %s\n", err.msg);
        return 1;
    }
    double flops = kvp_model_flops(&m->cfg, 0, o.prompt);
    size_t n_params = m->n_params;
    printf("parameters: %.1fM; prefill of %d tokens: %.1f GFLOP\n\n", m->n_params / 1e6, o.prompt,
           flops / 1e9);

    result_t res[4];
    int n_res = 0;
    char types[64];
    snprintf(types, sizeof types, "%s", o.types);
    int rc = 0;
    for (char *save = NULL, *tok = strtok_r(types, ",", &save); tok && n_res < 4;
         tok = strtok_r(NULL, ",", &save)) {
        kvp_ggml_type_t t;
        if (kvp_bench_parse_type(tok, &t)) {
            fprintf(stderr, "kvpred bench engine: unknown type '%s' (f32, f16, bf16, q8_0)\n", tok);
            rc = 2;
            break;
        }
        char path[512];
        snprintf(path, sizeof path, "%s/bench-%zum-%s.gguf", o.dir, (n_params + 500000) / 1000000,
                 tok);
        printf("writing %s ...\n", path);
        fflush(stdout);
        result_t *r = &res[n_res];
        memset(r, 0, sizeof *r);
        r->type = tok;
        if (write_model(m, t, path, &err) || run_one(&o, path, r, &err)) {
            fprintf(stderr, "kvpred bench engine: %s\n", err.msg);
            rc = 1;
            break;
        }
        n_res++;
    }
    kvp_model_free(&m);
    if (rc) return rc;

    /* decode reads every matrix once a token: 4 bytes a weight from the f32
     * arena, 2 from the 16-bit copy an F16/BF16 file gives, 34/32 from the
     * blocks of a Q8_0 file */
    printf("\n%-6s %8s %12s %12s %10s %12s %16s %10s %12s\n", "type", "load s", "prefill ms",
           "prefill t/s", "GFLOP/s", "decode t/s", "decode path", "MB/token", "decode GB/s");
    for (int i = 0; i < n_res; i++)
        printf("%-6s %8.2f %12.1f %12.0f %10.1f %12.1f %16s %10.0f %12.1f\n", res[i].type,
               res[i].load_s, res[i].prefill_s * 1e3, res[i].prefill_tps, res[i].prefill_gflops,
               res[i].decode_tps, res[i].path, res[i].step_bytes / 1e6,
               res[i].decode_tps * res[i].step_bytes / 1e9);
    if (n_res) {
        printf("\nprefill reaches %.0f%% of the sgemm figure (%s weights)\n",
               100.0 * res[0].prefill_gflops / ref, res[0].type);
        for (int i = 0; i < n_res; i++) {
            printf("%s decode streams weights at %.0f%% of the measured read bandwidth",
                   res[i].type, 100.0 * res[i].decode_tps * res[i].step_bytes / 1e9 / bw);
            if (i)
                printf("; %.2fx the %s decode speed", res[i].decode_tps / res[0].decode_tps,
                       res[0].type);
            printf("\n");
        }
    }

    if (o.b.json) {
        kvp_json_t j;
        if (!kvp_bench_json_open(&j, o.b.json, "engine", "kvpred bench engine")) return 1;
        kvp_json_int(&j, "blas_threads", kvp_blas_threads());
        kvp_json_num(&j, "sgemm_gflops", ref);
        kvp_json_num(&j, "sgemm_qkv_gflops", mix);
        kvp_json_num(&j, "read_bandwidth_gbs", bw);
        kvp_json_int(&j, "params", (long long)n_params);
        kvp_json_int(&j, "prompt_tokens", o.prompt);
        kvp_json_int(&j, "decode_tokens", o.decode);
        kvp_json_num(&j, "prefill_gflop", flops / 1e9);
        kvp_json_arr(&j, "results");
        for (int i = 0; i < n_res; i++) {
            kvp_json_item_obj(&j);
            kvp_json_str(&j, "type", res[i].type);
            kvp_json_num(&j, "load_s", res[i].load_s);
            kvp_json_num(&j, "prefill_ms", res[i].prefill_s * 1e3);
            kvp_json_num(&j, "prefill_tokens_per_s", res[i].prefill_tps);
            kvp_json_num(&j, "prefill_gflops", res[i].prefill_gflops);
            kvp_json_num(&j, "prefill_fraction_of_sgemm", res[i].prefill_gflops / ref);
            kvp_json_num(&j, "decode_tokens_per_s", res[i].decode_tps);
            kvp_json_str(&j, "decode_path", res[i].path);
            kvp_json_num(&j, "decode_weight_bytes_per_token", res[i].step_bytes);
            kvp_json_num(&j, "decode_gbs", res[i].decode_tps * res[i].step_bytes / 1e9);
            kvp_json_close_obj(&j);
        }
        kvp_json_close_arr(&j);
        kvp_bench_json_close(&j);
    }
    return 0;
}
