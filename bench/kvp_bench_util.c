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
