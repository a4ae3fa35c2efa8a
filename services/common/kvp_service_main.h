/* What the three service programs share: the flags every stage takes, signal
 * handling, and loading a model with its vocabulary. Each services/<stage>/
 * main.c adds its own flags and calls its kvp_svc_*_run. */
#ifndef KVP_SERVICE_MAIN_H
#define KVP_SERVICE_MAIN_H

#include <getopt.h>
#include <stdatomic.h>
#include <stdio.h>

#include "kvp_bundle.h"
#include "kvp_svc.h"

typedef struct kvp_service_opts {
    kvp_svc_common_t c;
    const char *listen, *downstream;
    kvp_link_curve_t curve_server, curve_client;
    const char *curve_public, *curve_secret, *curve_server_key;
    int threads;      /* OpenBLAS threads (0: the library's default) */
    const char *cpus; /* CPU list to pin the stage to (NULL: any) */
    atomic_int stop;  /* c.stop points here: set by SIGINT / SIGTERM */
} kvp_service_opts_t;

/* The common long options, to append to a stage's own (codes 1000+). */
#define KVP_SERVICE_LONGOPTS                                                                       \
    {"listen", required_argument, 0, 1000}, {"downstream", required_argument, 0, 1001},            \
        {"trace-log", required_argument, 0, 1002}, {"host", required_argument, 0, 1003},           \
        {"dtype", required_argument, 0, 1004}, {"max-requests", required_argument, 0, 1005},       \
        {"deadline-ms", required_argument, 0, 1006}, {"max-chunk", required_argument, 0, 1007},    \
        {"ping-ms", required_argument, 0, 1008}, {"peer-timeout-ms", required_argument, 0, 1009},  \
        {"bind-any", no_argument, 0, 1010}, {"curve-public", required_argument, 0, 1011},          \
        {"curve-secret", required_argument, 0, 1012},                                              \
        {"curve-server-key", required_argument, 0, 1013}, {"verbose", no_argument, 0, 1014},       \
        {"threads", required_argument, 0, 1015}, {                                                 \
        "cpus", required_argument, 0, 1016                                                         \
    }

extern const char KVP_SERVICE_COMMON_HELP[];

/* The defaults; o must live as long as the stage runs (its signal handlers
 * reach o->stop). */
void kvp_service_opts_init(kvp_service_opts_t *o);
/* Handles a common option: 1 = handled, 0 = not common, -1 = bad value (printed). */
int kvp_service_opt(kvp_service_opts_t *o, int code, const char *arg, const char *prog);
/* Loads CurveZMQ keys named by the options. */
int kvp_service_curve(kvp_service_opts_t *o, const char *prog);
/* Pins the stage to --cpus and sizes its OpenBLAS pool to --threads; call
 * after parsing, before the stage starts. */
int kvp_service_cpu(const kvp_service_opts_t *o, const char *prog);
/* SIGINT / SIGTERM set *stop. */
void kvp_service_signals(atomic_int *stop);

/* The next option of the stage's own from getopt_long(argc, argv, shortopts,
 * lo), or -1 when there is none left. The common options are stored in *o
 * on the way (prog: argv[0], for their messages). -1 comes early, with
 * *status set to the exit status, after -h/--help (usage on stdout: 0), an
 * unknown option (usage on stderr: 2) or a bad common value (2); *status
 * stays -1 when parsing got to the end. */
int kvp_service_next_opt(kvp_service_opts_t *o, int argc, char **argv, const char *shortopts,
                         const struct option *lo, void (*usage)(FILE *), int *status);
/* After the stage has checked its own options: loads the CurveZMQ keys, pins
 * the CPUs and sizes the OpenBLAS pool (kvp_service_curve, kvp_service_cpu).
 * -1 (message printed under prog) when one of them fails. */
int kvp_service_start(kvp_service_opts_t *o, const char *prog);
/* Loads a stage's model with its vocabulary; once it is loaded, SIGINT and
 * SIGTERM stop the stage (before, they end a slow load at once). */
int kvp_service_load_model(kvp_service_opts_t *o, const char *path, kvp_bundle_t *b,
                           kvp_err_t *err);
/* A stage's exit status for the result rc of its run: 0, or 1 with the error
 * printed under prog. */
int kvp_service_exit(int rc, const kvp_err_t *err, const char *prog);

#endif
