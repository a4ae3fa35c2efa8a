/* kvpred bench train: the speed of one training step (kvp_train forward +
 * backward) next to OpenBLAS sgemm on the same machine. The lead wires it
 * into `kvpred bench train` (tools/cmd_bench.c). */
#ifndef KVP_BENCH_TRAIN_H
#define KVP_BENCH_TRAIN_H

int kvp_bench_train(int argc, char **argv);

#endif
