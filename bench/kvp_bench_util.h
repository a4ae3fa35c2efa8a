/* What several benchmarks share: the options that mean the same in each
 * (model files, --lens, --reps, --small, --json, --help) and the loop that
 * parses them, the opening of their JSON and BLAS lines, the reference sgemm
 * figure every speed is set against, and the model pair of the KV-Prediction
 * benchmarks. */
#ifndef KVP_BENCH_UTIL_H
#define KVP_BENCH_UTIL_H

#include <getopt.h>
#include <stdio.h>

#include "kvp_json.h"
#include "kvp_model.h"
#include "kvp_predictor.h"

#define KVP_BENCH_MAX_LIST 16

/* Codes of the shared options in a benchmark's struct option table; above
 * any letter, so a benchmark's own codes never collide with them. */
enum {
    KVP_BENCH_OPT_AUX = 1000,
    KVP_BENCH_OPT_BASE,
    KVP_BENCH_OPT_PREDICTOR,
    KVP_BENCH_OPT_LENS,
    KVP_BENCH_OPT_REPS,
    KVP_BENCH_OPT_SMALL,
    KVP_BENCH_OPT_JSON,
};

/* The three model-file options, which go together (all or none). */
#define KVP_BENCH_MODEL_LONGOPTS                                                                   \
    {"aux", required_argument, 0, KVP_BENCH_OPT_AUX},                                              \
        {"base", required_argument, 0, KVP_BENCH_OPT_BASE}, {                                      \
        "predictor", required_argument, 0, KVP_BENCH_OPT_PREDICTOR                                 \
    }

/* What the shared options set. A benchmark fills in its defaults (reps,
 * lens) and max_lens before parsing; the *_set flags tell a default from a
 * value given on the command line. */
typedef struct kvp_bench_opts {
    const char *aux, *base, *predictor; /* model files: all three or none */
    const char *json;                   /* --json FILE: the figures as one JSON object */
    int reps, reps_set;
    int small;
    int lens[KVP_BENCH_MAX_LIST], n_lens, lens_set;
    int max_lens; /* --lens keeps at most this many (<= KVP_BENCH_MAX_LIST) */
} kvp_bench_opts_t;

/* A benchmark's own options: returns 0 when it took the option, 2 when the
 * value is bad (after printing why), -1 when the code is not its own. */
typedef int (*kvp_bench_own_opt_fn)(void *own, int code, const char *arg);

/* Parses argv with the table lo (getopt_long, from argv[1]): shared codes
 * into *b, 'h' (--help) to usage, the rest through own_opt(own, ...). Returns 0; 1 after --help
 * (usage on stdout); 2 on a bad command line (usage on stderr for an unknown
 * option, own_opt's message for a bad value). */
int kvp_bench_parse(int argc, char **argv, const struct option *lo, kvp_bench_opts_t *b,
                    kvp_bench_own_opt_fn own_opt, void *own, void (*usage)(FILE *));

/* A weight type by the name the benchmarks' flags use (f32, f16, bf16,
 * q8_0); -1 for any other name, leaving *t as it was. */
int kvp_bench_parse_type(const char *s, kvp_ggml_type_t *t);

/* Up to max whole numbers from a comma-separated list into out; their count. */
int kvp_bench_parse_list(const char *s, int *out, int max);

/* 0 when every --lens is a prompt length the benchmarks can run ([2, 65536]);
 * else prints so under prog ("kvpred bench NAME") and returns 2. */
int kvp_bench_check_lens(const kvp_bench_opts_t *b, const char *prog);

/* True when some but not all of --aux, --base, --predictor were given. */
int kvp_bench_models_partial(const kvp_bench_opts_t *b);

/* What bench engine and bench train open with: the BLAS kernels and threads
 * the figures come from, then the reference sgemm (512x2048x2048, best of 5)
 * measured; returns its GFLOP/s for the caller to print with what it adds. */
double kvp_bench_blas_ref(void);

/* Opens path for a benchmark's JSON and writes the keys every one begins
 * with ("bench", "blas_core"); NULL, with "PROG: cannot write PATH" printed,
 * when it cannot. Close with kvp_bench_json_close. */
FILE *kvp_bench_json_open(kvp_json_t *j, const char *path, const char *bench, const char *prog);
void kvp_bench_json_close(kvp_json_t *j);

/* GFLOP/s of C[M][N] = A[M][K] B[N][K]^T, best of reps after one warm-up
 * call (which starts OpenBLAS's threads and warms the caches); 0 when the
 * matrices cannot be allocated. */
double kvp_bench_sgemm_gflops(int M, int N, int K, int reps);

/* The shape of the ~110M Llama base the benchmarks time (12 layers, d 768,
 * 12 heads, ffn 2048, vocab 32000, context 4096, tied output), so that bench
 * engine and the KV-Prediction benchmarks measure the same model. */
kvp_model_config_t kvp_bench_config_110m(void);

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
