/* What several benchmarks share: the reference sgemm figure every speed is
 * set against. */
#ifndef KVP_BENCH_UTIL_H
#define KVP_BENCH_UTIL_H

#include "kvp_model.h"
#include "kvp_predictor.h"

/* GFLOP/s of C[M][N] = A[M][K] B[N][K]^T, best of reps after one warm-up
 * call (which starts OpenBLAS's threads and warms the caches); 0 when the
 * matrices cannot be allocated. */
double kvp_bench_sgemm_gflops(int M, int N, int K, int reps);

/* The model pair a KV-Prediction benchmark runs: loaded from files (all three
 * paths given; the predictor must be made for the pair), or random weights in
 * the shapes of a 110M base (12 layers, d 768, vocab 32000) and a 4-layer
 * d 384 auxiliary model — small: base 2 layers d 128, aux 1 layer d 64, vocab
 * 512 — with a small random predictor bound to them (timing does not depend
 * on the values; all-zero maps would make every predicted key the same). */
int kvp_bench_model_pair(const char *aux_path, const char *base_path, const char *pred_path,
                         int small, kvp_model_t **aux, kvp_model_t **base, kvp_predictor_t **p,
                         kvp_err_t *err);

#endif
