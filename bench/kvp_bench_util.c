#include "kvp_bench_util.h"

#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "kvp_blas.h"
#include "kvp_rng.h"
#include "kvp_time.h"

double kvp_bench_sgemm_gflops(int M, int N, int K, int reps) {
    float *a = malloc(sizeof(float) * (size_t)M * K), *b = malloc(sizeof(float) * (size_t)N * K),
          *c = malloc(sizeof(float) * (size_t)M * N);
    if (!a || !b || !c) {
        free(a), free(b), free(c);
        return 0.0;
    }
    kvp_rng_t r;
    kvp_rng_seed(&r, 1);
    for (size_t i = 0; i < (size_t)M * K; i++)
        a[i] = kvp_rng_uniform(&r) - 0.5f;
    for (size_t i = 0; i < (size_t)N * K; i++)
        b[i] = kvp_rng_uniform(&r) - 0.5f;
    double best = 1e30;
    for (int i = 0; i < reps + 1; i++) {
        double t0 = kvp_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, a, K, b, K, 0.0f, c, N);
        double dt = kvp_now() - t0;
        if (i && dt < best) best = dt;
    }
    free(a), free(b), free(c);
    return 2.0 * M * N * K / best / 1e9;
}

kvp_model_config_t kvp_bench_config_110m(void) {
    return (kvp_model_config_t){.n_vocab = 32000,
                                .n_embd = 768,
                                .n_layer = 12,
                                .n_head = 12,
                                .n_kv_head = 12,
                                .n_ff = 2048,
                                .n_ctx_train = 4096,
                                .tied_output = true};
}

int kvp_bench_model_pair(const char *aux_path, const char *base_path, const char *pred_path,
                         int small, kvp_model_t **aux, kvp_model_t **base, kvp_predictor_t **p,
                         kvp_err_t *err) {
    if (aux_path) {
        int rc = kvp_model_load(aux, aux_path, err);
        if (!rc) rc = kvp_model_load(base, base_path, err);
        if (!rc) rc = kvp_predictor_load(p, pred_path, err);
        if (!rc) rc = kvp_predictor_check_pair(*p, *aux, *base, err);
        return rc;
    }
    kvp_model_config_t bc = kvp_bench_config_110m();
    kvp_model_config_t ac = {.n_vocab = 32000,
                             .n_embd = 384,
                             .n_layer = 4,
                             .n_head = 6,
                             .n_kv_head = 6,
                             .n_ff = 1024,
                             .n_ctx_train = 4096,
                             .tied_output = true};
    if (small) {
        bc = (kvp_model_config_t){.n_vocab = 512,
                                  .n_embd = 128,
                                  .n_layer = 2,
                                  .n_head = 4,
                                  .n_kv_head = 4,
                                  .n_ff = 256,
                                  .n_ctx_train = 4096,
                                  .tied_output = true};
        ac = (kvp_model_config_t){.n_vocab = 512,
                                  .n_embd = 64,
                                  .n_layer = 1,
                                  .n_head = 2,
                                  .n_kv_head = 2,
                                  .n_ff = 128,
                                  .n_ctx_train = 4096,
                                  .tied_output = true};
    }
    int rc = kvp_model_new_random(base, &bc, 1, 0.02f, err);
    if (!rc) rc = kvp_model_new_random(aux, &ac, 2, 0.02f, err);
    if (!rc) rc = kvp_predictor_new(p, kvp_kv_shape_of(*aux), kvp_kv_shape_of(*base), NULL, err);
    if (rc) return rc;
    /* small random maps: the times do not depend on the values, but zeros
     * would make every predicted key the same */
    kvp_rng_t r;
    kvp_rng_seed(&r, 3);
    for (size_t i = 0; i < (*p)->n_params; i++)
        (*p)->params[i] = 0.02f * kvp_rng_normal(&r);
    return kvp_predictor_bind(*p, *aux, *base, err);
}

int kvp_bench_parse_type(const char *s, kvp_ggml_type_t *t) {
    if (!strcmp(s, "f32"))
        *t = KVP_GGML_F32;
    else if (!strcmp(s, "f16"))
        *t = KVP_GGML_F16;
    else if (!strcmp(s, "bf16"))
        *t = KVP_GGML_BF16;
    else if (!strcmp(s, "q8_0"))
        *t = KVP_GGML_Q8_0;
    else
        return -1;
    return 0;
}

int kvp_bench_parse_list(const char *s, int *out, int max) {
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    int n = 0;
    for (char *sp = NULL, *t = strtok_r(buf, ",", &sp); t && n < max; t = strtok_r(NULL, ",", &sp))
        out[n++] = atoi(t);
    return n;
}

/* 1 when code is a shared option (stored in *b), 0 when it is not. Help is
 * left to the caller, which knows the usage text. */
static int shared_opt(kvp_bench_opts_t *b, int code, const char *arg) {
    switch (code) {
    case KVP_BENCH_OPT_AUX:
        b->aux = arg;
        return 1;
    case KVP_BENCH_OPT_BASE:
        b->base = arg;
        return 1;
    case KVP_BENCH_OPT_PREDICTOR:
        b->predictor = arg;
        return 1;
    case KVP_BENCH_OPT_JSON:
        b->json = arg;
        return 1;
    case KVP_BENCH_OPT_REPS:
        b->reps = atoi(arg);
        b->reps_set = 1;
        return 1;
    case KVP_BENCH_OPT_SMALL:
        b->small = 1;
        return 1;
    case KVP_BENCH_OPT_LENS:
        b->n_lens = kvp_bench_parse_list(arg, b->lens, b->max_lens);
        b->lens_set = 1;
        return 1;
    default:
        return 0;
    }
}

int kvp_bench_parse(int argc, char **argv, const struct option *lo, kvp_bench_opts_t *b,
                    kvp_bench_own_opt_fn own_opt, void *own, void (*usage)(FILE *)) {
    if (b->max_lens < 1 || b->max_lens > KVP_BENCH_MAX_LIST) b->max_lens = KVP_BENCH_MAX_LIST;
    int c;
    optind = 1; /* the kvpred command may have run getopt before */
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        if (shared_opt(b, c, optarg)) continue;
        if (c == 'h') {
            usage(stdout);
            return 1;
        }
        int r = own_opt(own, c, optarg);
        if (r == 2) return 2;
        if (r < 0) {
            usage(stderr);
            return 2;
        }
    }
    return 0;
}

int kvp_bench_check_lens(const kvp_bench_opts_t *b, const char *prog) {
    for (int i = 0; i < b->n_lens; i++)
        if (b->lens[i] < 2 || b->lens[i] > 1 << 16) {
            fprintf(stderr, "%s: prompt lengths must be in [2, 65536]\n", prog);
            return 2;
        }
    return 0;
}

int kvp_bench_models_partial(const kvp_bench_opts_t *b) {
    return (!b->aux != !b->base) || (!b->aux != !b->predictor);
}

double kvp_bench_blas_ref(void) {
    printf("OpenBLAS kernels: %s%s, %d threads\n", kvp_blas_corename(),
           kvp_blas_was_switched() ? " (auto-selected by kvpred)" : "", kvp_blas_threads());
    return kvp_bench_sgemm_gflops(512, 2048, 2048, 5);
}

FILE *kvp_bench_json_open(kvp_json_t *j, const char *path, const char *bench, const char *prog) {
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "%s: cannot write %s\n", prog, path);
        return NULL;
    }
    kvp_json_begin(j, f);
    kvp_json_str(j, "bench", bench);
    kvp_json_str(j, "blas_core", kvp_blas_corename());
    return f;
}

void kvp_bench_json_close(kvp_json_t *j) {
    kvp_json_end(j);
    fclose(j->f);
}
