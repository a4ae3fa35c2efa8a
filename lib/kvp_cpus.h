/* kvp_cpus: pinning a process to a CPU list ("0-3,6"), so stages sharing a
 * machine can be given core clusters of their own (--cpus of the services,
 * --stage-cpus of kvpred bench handoff). */
#ifndef KVP_CPUS_H
#define KVP_CPUS_H

#include <stddef.h>

#include "kvp_err.h"

/* Checks a CPU list: comma-separated numbers or ranges a-b, each below
 * CPU_SETSIZE, at least one CPU. */
int kvp_cpus_check(const char *list, kvp_err_t *err);

/* Pins every thread the process has now (OpenBLAS starts its pool when the
 * library loads, before main) and, through inheritance, every thread it
 * starts later, to the CPUs of list. */
int kvp_cpus_pin_process(const char *list, kvp_err_t *err);

/* Per-stage settings of a three-stage pipeline (aux-prefill, predictor,
 * decoder), as kvpred up and kvpred bench handoff take them:
 * "N" (every stage) or "A,P,D" thread counts in [1, 1024] into threads[];
 * "L" (every stage) or "LA/LP/LD" CPU lists into cpus[], pointing into buf
 * (a copy of s). Each returns -1 on a bad value. */
int kvp_cpus_parse_threads3(const char *s, int threads[3]);
int kvp_cpus_parse_lists3(const char *s, char *buf, size_t n_buf, const char *cpus[3]);

#endif
