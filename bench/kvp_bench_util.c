#include "kvp_bench_util.h"

#include <stdlib.h>

#include <cblas.h>

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
    kvp_model_config_t bc = {.n_vocab = 32000,
                             .n_embd = 768,
                             .n_layer = 12,
                             .n_head = 12,
                             .n_kv_head = 12,
                             .n_ff = 2048,
                             .n_ctx_train = 4096,
                             .tied_output = true};
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
