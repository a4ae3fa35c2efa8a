#include "kvp_service_main.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "kvp_cpus.h"
#include "kvpred.pb-c.h"

const char KVP_SERVICE_COMMON_HELP[] =
    "  --listen EP           endpoint to bind (tcp://HOST:PORT, ipc://PATH)\n"
    "  --downstream EP       the next stage's endpoint\n"
    "  --trace-log FILE      append MessagePack trace records (kvpred trace reads them)\n"
    "  --host LABEL          this stage's name in traces (default: the host name)\n"
    "  --dtype f32|f16       K/V on the wire (default f32; all stages must agree)\n"
    "  --max-requests N      requests in flight before answering busy (default 8)\n"
    "  --deadline-ms N       a request's deadline unless it names one (default 60000)\n"
    "  --max-chunk N         the largest chunk in tokens (default 512; all must agree)\n"
    "  --ping-ms N           heartbeat interval (default 250)\n"
    "  --peer-timeout-ms N   silence before a peer is dead (default 2000)\n"
    "  --bind-any            allow binding all interfaces (default: loopback only)\n"
    "  --curve-public F --curve-secret F   this stage's CurveZMQ keypair (bound side)\n"
    "  --curve-server-key F  the downstream stage's public key (encrypts that link)\n"
    "  --verbose             log every request\n"
    "  --threads N           OpenBLAS threads of this stage (default: one per core; stages\n"
    "                        sharing a small machine run best with fewer)\n"
    "  --cpus LIST           pin this stage to CPUs, e.g. 0-3 or 0,2 (default: any)\n";

static atomic_int *g_stop; /* the one global: signal handlers reach nothing else */

static void on_signal(int sig) {
    (void)sig;
    if (g_stop) atomic_store(g_stop, 1);
}

void kvp_service_signals(atomic_int *stop) {
    g_stop = stop;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

void kvp_service_opts_init(kvp_service_opts_t *o) {
    memset(o, 0, sizeof *o);
    kvp_svc_common_init(&o->c);
    atomic_init(&o->stop, 0);
    o->c.stop = &o->stop;
}

static int parse_int(const char *prog, const char *flag, const char *s, int lo, int hi, int *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "%s: --%s: '%s' is not a whole number in [%d, %d]\n", prog, flag, s, lo,
                hi);
        return -1;
    }
    *out = (int)v;
    return 1;
}

int kvp_service_opt(kvp_service_opts_t *o, int code, const char *arg, const char *prog) {
    int v;
    switch (code) {
    case 1000:
        o->listen = arg;
        return 1;
    case 1001:
        o->downstream = arg;
        return 1;
    case 1002:
        o->c.trace_path = arg;
        return 1;
    case 1003:
        o->c.host = arg;
        return 1;
    case 1004:
        if (!strcmp(arg, "f32"))
            o->c.dtype = KVPRED__DTYPE__DTYPE_F32;
        else if (!strcmp(arg, "f16"))
            o->c.dtype = KVPRED__DTYPE__DTYPE_F16;
        else {
            fprintf(stderr, "%s: --dtype: '%s' is not f32 or f16\n", prog, arg);
            return -1;
        }
        return 1;
    case 1005:
        return parse_int(prog, "max-requests", arg, 1, 4096, &o->c.max_requests);
    case 1006:
        return parse_int(prog, "deadline-ms", arg, 1, 86400000, &o->c.deadline_ms);
    case 1007:
        return parse_int(prog, "max-chunk", arg, 1, 65536, &o->c.max_chunk_tokens);
    case 1008:
        if (parse_int(prog, "ping-ms", arg, 1, 60000, &v) < 0) return -1;
        o->c.ping_interval = v / 1e3;
        return 1;
    case 1009:
        if (parse_int(prog, "peer-timeout-ms", arg, 10, 600000, &v) < 0) return -1;
        o->c.peer_timeout = v / 1e3;
        return 1;
    case 1010:
        o->c.bind_any = 1;
        return 1;
    case 1011:
        o->curve_public = arg;
        return 1;
    case 1012:
        o->curve_secret = arg;
        return 1;
    case 1013:
        o->curve_server_key = arg;
        return 1;
    case 1014:
        o->c.verbose = 1;
        return 1;
    case 1015:
        return parse_int(prog, "threads", arg, 1, 1024, &o->threads);
    case 1016: {
        kvp_err_t err = {0};
        if (kvp_cpus_check(arg, &err)) {
            fprintf(stderr, "%s: --cpus: %s\n", prog, err.msg);
            return -1;
        }
        o->cpus = arg;
        return 1;
    }
    default:
        return 0;
    }
}

int kvp_service_cpu(const kvp_service_opts_t *o, const char *prog) {
    kvp_err_t err = {0};
    if (o->cpus && kvp_cpus_pin_process(o->cpus, &err)) {
        fprintf(stderr, "%s: %s\n", prog, err.msg);
        return -1;
    }
    if (o->threads > 0) openblas_set_num_threads(o->threads);
    return 0;
}

int kvp_service_curve(kvp_service_opts_t *o, const char *prog) {
    kvp_err_t err = {0};
    if (!o->curve_public != !o->curve_secret) {
        fprintf(stderr, "%s: --curve-public and --curve-secret go together\n", prog);
        return -1;
    }
    if (o->curve_public) {
        if (kvp_link_curve_load_server(&o->curve_server, o->curve_public, o->curve_secret, &err)) {
            fprintf(stderr, "%s: %s\n", prog, err.msg);
            return -1;
        }
        o->c.curve_server = &o->curve_server;
    }
    if (o->curve_server_key) {
        if (kvp_link_curve_load_client(&o->curve_client, o->curve_server_key, NULL, NULL, &err)) {
            fprintf(stderr, "%s: %s\n", prog, err.msg);
            return -1;
        }
        o->c.curve_client = &o->curve_client;
    }
    return 0;
}

int kvp_service_next_opt(kvp_service_opts_t *o, int argc, char **argv, const char *shortopts,
                         const struct option *lo, void (*usage)(FILE *), int *status) {
    int c;
    *status = -1;
    while ((c = getopt_long(argc, argv, shortopts, lo, NULL)) != -1) {
        int r = kvp_service_opt(o, c, optarg, argv[0]);
        if (r < 0) {
            *status = 2;
            return -1;
        }
        if (r) continue;
        if (c == 'h' || c == '?') {
            usage(c == 'h' ? stdout : stderr);
            *status = c == 'h' ? 0 : 2;
            return -1;
        }
        return c;
    }
    return -1;
}

int kvp_service_start(kvp_service_opts_t *o, const char *prog) {
    if (kvp_service_curve(o, prog)) return -1;
    return kvp_service_cpu(o, prog);
}

int kvp_service_load_model(kvp_service_opts_t *o, const char *path, kvp_bundle_t *b,
                           kvp_err_t *err) {
    int rc = kvp_bundle_load(path, b, err);
    if (!rc) kvp_service_signals(o->c.stop);
    return rc;
}

int kvp_service_exit(int rc, const kvp_err_t *err, const char *prog) {
    if (!rc) return 0;
    fprintf(stderr, "%s: %s\n", prog, err->msg);
    return 1;
}
