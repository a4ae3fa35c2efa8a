/* What several benchmarks share: the reference sgemm figure every speed is
 * set against. */
#ifndef KVP_BENCH_UTIL_H
#define KVP_BENCH_UTIL_H

/* GFLOP/s of C[M][N] = A[M][K] B[N][K]^T, best of reps after one warm-up
 * call (which starts OpenBLAS's threads and warms the caches); 0 when the
 * matrices cannot be allocated. */
double kvp_bench_sgemm_gflops(int M, int N, int K, int reps);

#endif
