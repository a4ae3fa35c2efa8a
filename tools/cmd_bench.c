/* kvpred bench NAME: dispatches to the benchmarks in bench/. */
#include <stdio.h>
#include <string.h>

#include "kvp_bench.h"
#include "kvp_bench_train.h"
#include "kvp_cmds.h"

int kvp_cmd_bench(int argc, char **argv) {
    static const struct {
        const char *name;
        int (*run)(int, char **);
        const char *what;
    } benches[] = {
        {"engine", kvp_bench_engine, "sgemm GFLOP/s, prefill and decode of a 110M model"},
        {"kvp", kvp_bench_kvp, "TTFT of base prefill vs KV Prediction, time and FLOPs ratios"},
        {"handoff", kvp_bench_handoff,
         "pipeline TTFT and exposed handoff vs in-process KV Prediction, KV wire vs raw libzmq"},
        {"train", kvp_bench_train, "training step tokens/s and fraction of sgemm GFLOP/s"},
    };
    const size_t n = sizeof benches / sizeof benches[0];
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        FILE *f = argc < 2 ? stderr : stdout;
        fprintf(f, "usage: kvpred bench NAME [options] [--json FILE]\n\nbenchmarks:\n");
        for (size_t i = 0; i < n; i++)
            fprintf(f, "  %-10s %s\n", benches[i].name, benches[i].what);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < n; i++)
        if (!strcmp(argv[1], benches[i].name)) return benches[i].run(argc - 1, argv + 1);
    fprintf(stderr, "kvpred bench: unknown benchmark '%s' (see kvpred bench --help)\n", argv[1]);
    return 2;
}
