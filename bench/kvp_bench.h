/* Benchmarks run by `kvpred bench NAME`. Each prints a table and, with
 * --json FILE, writes its figures as one JSON object. */
#ifndef KVP_BENCH_H
#define KVP_BENCH_H

int kvp_bench_engine(int argc, char **argv);
int kvp_bench_kvp(int argc, char **argv);
int kvp_bench_handoff(int argc, char **argv);

#endif
