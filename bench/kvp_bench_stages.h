/* kvp_bench_stages: the three pipeline stages started by a benchmark, either
 * as separate processes (fork, the default: each stage has its own OpenBLAS
 * thread pool and ZeroMQ context, as kvpred up's services do) or as threads of
 * the benchmark's own process (one shared OpenBLAS pool).
 *
 * Forked stages run the same stage loops (kvp_svc_*_run) as the service
 * programs, on the models the benchmark already holds in memory (copy-on-write
 * after fork), so random-weight models need no files. Their control block
 * (stop flag, ready flags, exit codes, error messages) lives in a shared
 * anonymous mapping; a forked stage also dies with its parent
 * (PR_SET_PDEATHSIG), so an interrupted benchmark leaves nothing behind. */
#ifndef KVP_BENCH_STAGES_H
#define KVP_BENCH_STAGES_H

#include <stdatomic.h>
#include <stdio.h>
#include <sys/types.h>

#include "kvp_svc.h"

enum { KVP_BSTAGE_AUX, KVP_BSTAGE_PRED, KVP_BSTAGE_DEC, KVP_BSTAGES };

typedef struct kvp_bench_stages_opts {
    int procs;                   /* 1: forked processes; 0: threads */
    int threads[KVP_BSTAGES];   /* OpenBLAS threads per stage (procs only; 0: default) */
    const char *cpus[KVP_BSTAGES]; /* CPU list per stage, "0-1" or "1" (procs only; NULL: any) */
    int port;                    /* stages on port, port+1, port+2; 0: free ports */
    int dtype;                   /* KVPRED__DTYPE__* on the wire */
    int max_chunk;               /* the largest chunk a request will name */
    int credits;                 /* chunks in flight per request (decoder's grant; 0: its default) */
    int tail;                    /* aux-prefill's halving tail (kvp_aux_cfg_t.tail_tokens; 0: default, -1: off) */
    int verbose;                 /* stage log lines on stderr */
} kvp_bench_stages_opts_t;

typedef struct kvp_bench_stages kvp_bench_stages_t;

/* Starts the stages (downstream first) and waits until each has bound its
 * socket; on failure nothing is left running. */
int kvp_bench_stages_start(kvp_bench_stages_t **out, const kvp_bench_stages_opts_t *o,
                           const kvp_model_t *aux, const kvp_model_t *base,
                           const kvp_predictor_t *p, const kvp_tokenizer_t *tok, kvp_err_t *err);
/* Stops every stage (each ends its loop within 100 ms), reports a stage's
 * error on stderr, and frees. */
void kvp_bench_stages_stop(kvp_bench_stages_t **s);

/* The endpoint stage i listens on (clients use KVP_BSTAGE_AUX's). */
const char *kvp_bench_stages_endpoint(const kvp_bench_stages_t *s, int stage);

#endif
