/* kvpred up: starts the three pipeline stages as separate processes on this
 * machine (the kvpred-<stage> programs beside this one), waits until a client
 * can talk to them, and keeps them running until interrupted. If one stage
 * dies the others are stopped and the reason is printed. */
#include <errno.h>
#include <getopt.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvp_client.h"
#include "kvp_cmds.h"
#include "kvp_cpus.h"
#include "kvp_svc.h"
#include "kvp_time.h"
#include "kvp_tool_util.h"

typedef struct {
    const char *dir, *aux, *base, *predictor, *transport, *trace_dir, *dtype, *ready_file;
    int port, chunk, identity, verbose, max_requests;
    int threads[3];      /* per stage; 0: the stage's default */
    const char *cpus[3]; /* per stage; NULL: any CPU */
    char cpus_buf[128];
    char ep[3][320];
} up_opts_t;

static const char *const STAGES[3] = {"aux-prefill", "predictor", "decoder"};

static void usage(FILE *f) {
    fprintf(f, "usage: kvpred up [options]\n"
               "  Starts kvpred-aux-prefill, kvpred-predictor and kvpred-decoder as processes\n"
               "  and keeps them running until Ctrl-C (or SIGTERM).\n"
               "  --dir DIR           where the default models are (default models/)\n"
               "  --aux F --base F    the models (default DIR/aux.gguf, DIR/base.gguf)\n"
               "  --predictor F       the predictor (default DIR/predictor.gguf)\n"
               "  --identity          identity predictor: --aux and --base are one model\n"
               "  --transport T       tcp (default) or ipc\n"
               "  --port P            first tcp port (default 7601: aux-prefill, then +1, +2)\n"
               "  --trace-dir DIR     each stage appends its trace log to DIR/<stage>.trace\n"
               "  --dtype f32|f16     K/V on the wire (default f32)\n"
               "  --chunk N           prompt tokens per chunk (default 128)\n"
               "  --max-requests N    requests in flight per stage (default 8)\n"
               "  --threads N|A,P,D   OpenBLAS threads of every stage, or of aux-prefill,\n"
               "                      predictor, decoder (default: one per core each)\n"
               "  --cpus L|LA/LP/LD   pin every stage, or each, to a CPU list (e.g. 0-1/1/0-1)\n"
               "  --ready-file F      write aux-prefill's endpoint to F once the pipeline answers\n"
               "  --verbose           stages log every request\n");
}

static int parse(int argc, char **argv, up_opts_t *o) {
    static const struct option lo[] = {{"dir", required_argument, 0, 'd'},
                                       {"aux", required_argument, 0, 'a'},
                                       {"base", required_argument, 0, 'b'},
                                       {"predictor", required_argument, 0, 'p'},
                                       {"identity", no_argument, 0, 'i'},
                                       {"transport", required_argument, 0, 't'},
                                       {"port", required_argument, 0, 'P'},
                                       {"trace-dir", required_argument, 0, 'T'},
                                       {"dtype", required_argument, 0, 'D'},
                                       {"chunk", required_argument, 0, 'c'},
                                       {"max-requests", required_argument, 0, 'm'},
                                       {"ready-file", required_argument, 0, 'r'},
                                       {"verbose", no_argument, 0, 'v'},
                                       {"threads", required_argument, 0, 'n'},
                                       {"cpus", required_argument, 0, 'C'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    memset(o, 0, sizeof *o);
    o->dir = "models";
    o->transport = "tcp";
    o->port = 7601;
    o->chunk = 128;
    o->max_requests = 8;
    o->dtype = "f32";
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case 'd':
            o->dir = optarg;
            break;
        case 'a':
            o->aux = optarg;
            break;
        case 'b':
            o->base = optarg;
            break;
        case 'p':
            o->predictor = optarg;
            break;
        case 'i':
            o->identity = 1;
            break;
        case 't':
            o->transport = optarg;
            break;
        case 'P':
            bad = kvp_parse_int("--port", optarg, 1, 65533, &o->port);
            break;
        case 'T':
            o->trace_dir = optarg;
            break;
        case 'D':
            o->dtype = optarg;
            break;
        case 'c':
            bad = kvp_parse_int("--chunk", optarg, 1, 65536, &o->chunk);
            break;
        case 'm':
            bad = kvp_parse_int("--max-requests", optarg, 1, 4096, &o->max_requests);
            break;
        case 'r':
            o->ready_file = optarg;
            break;
        case 'n':
            if (kvp_cpus_parse_threads3(optarg, o->threads)) {
                fprintf(stderr, "kvpred up: --threads wants N or A,P,D in [1, 1024], not '%s'\n",
                        optarg);
                bad = 1;
            }
            break;
        case 'C':
            if (kvp_cpus_parse_lists3(optarg, o->cpus_buf, sizeof o->cpus_buf, o->cpus)) {
                fprintf(stderr, "kvpred up: --cpus wants a CPU list (0-1, 0,2) or three as "
                                "LA/LP/LD, not '%s'\n",
                        optarg);
                bad = 1;
            }
            break;
        case 'v':
            o->verbose = 1;
            break;
        case 'h':
            usage(stdout);
            return 1;
        default:
            usage(stderr);
            return 2;
        }
        if (bad) return 2;
    }
    if (optind < argc || (strcmp(o->transport, "tcp") && strcmp(o->transport, "ipc"))) {
        usage(stderr);
        return 2;
    }
    return 0;
}

static char *path_in(const char *dir, const char *name) {
    char *p = malloc(strlen(dir) + strlen(name) + 2);
    sprintf(p, "%s/%s", dir, name);
    return p;
}

static int exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0;
}

static atomic_int g_stop; /* set by SIGINT/SIGTERM */

static void on_signal(int sig) {
    (void)sig;
    atomic_store(&g_stop, 1);
}

/* argv for one stage's program. */
static pid_t spawn(const char *bin, char *const *args) {
    pid_t pid = fork();
    if (pid == 0) {
        execv(bin, args);
        fprintf(stderr, "kvpred up: cannot run %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    return pid;
}

static void stop_all(pid_t *pids) {
    for (int i = 0; i < 3; i++)
        if (pids[i] > 0) kill(pids[i], SIGTERM);
    double end = kvp_now() + 5.0;
    for (int i = 0; i < 3; i++) {
        while (pids[i] > 0) {
            if (waitpid(pids[i], NULL, WNOHANG) == pids[i])
                pids[i] = 0;
            else if (kvp_now() > end) {
                kill(pids[i], SIGKILL);
                waitpid(pids[i], NULL, 0);
                pids[i] = 0;
            } else
                usleep(20000);
        }
    }
}

int kvp_cmd_up(int argc, char **argv) {
    up_opts_t o;
    int prc = parse(argc, argv, &o);
    if (prc) return prc == 1 ? 0 : 2;
    char *aux = o.aux ? strdup(o.aux) : path_in(o.dir, "aux.gguf");
    char *base = o.base ? strdup(o.base) : path_in(o.dir, "base.gguf");
    char *pred = o.predictor ? strdup(o.predictor) : path_in(o.dir, "predictor.gguf");
    int rc = 0;
    const char *missing = !exists(aux)                     ? aux
                          : !exists(base)                  ? base
                          : (!o.identity && !exists(pred)) ? pred
                                                           : NULL;
    if (missing) {
        fprintf(stderr,
                "kvpred up: %s not found (kvpred models makes the default pair, kvpred "
                "fit-predictor the predictor; or pass --aux/--base/--predictor)\n",
                missing);
        free(aux), free(base), free(pred);
        return 1;
    }
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    self[n > 0 ? n : 0] = 0;
    char *bindir = dirname(self);
    char bins[3][PATH_MAX];
    for (int i = 0; i < 3; i++)
        snprintf(bins[i], sizeof bins[i], "%s/kvpred-%s", bindir, STAGES[i]);
    for (int i = 0; i < 3; i++) {
        if (!strcmp(o.transport, "tcp"))
            snprintf(o.ep[i], sizeof o.ep[i], "tcp://127.0.0.1:%d", o.port + i);
        else
            snprintf(o.ep[i], sizeof o.ep[i], "ipc:///tmp/kvpred-%d-%s.sock", (int)getuid(),
                     STAGES[i]);
    }
    char traces[3][PATH_MAX], chunk[16], maxr[16], threads[3][16];
    for (int i = 0; i < 3; i++)
        snprintf(threads[i], sizeof threads[i], "%d", o.threads[i]);
    snprintf(chunk, sizeof chunk, "%d", o.chunk);
    snprintf(maxr, sizeof maxr, "%d", o.max_requests);
    for (int i = 0; i < 3; i++)
        snprintf(traces[i], sizeof traces[i], "%s/%s.trace", o.trace_dir ? o.trace_dir : ".",
                 STAGES[i]);
    if (o.trace_dir) mkdir(o.trace_dir, 0755);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    /* downstream first, so each stage finds its peer listening */
    char *a_dec[24] = {bins[2],         "--model",        base, "--listen", o.ep[2], "--dtype",
                       (char *)o.dtype, "--max-requests", maxr};
    char *a_pred[24] = {bins[1],
                        o.identity ? "--identity" : "--predictor",
                        o.identity ? base : pred,
                        "--listen",
                        o.ep[1],
                        "--downstream",
                        o.ep[2],
                        "--dtype",
                        (char *)o.dtype,
                        "--max-requests",
                        maxr};
    char *a_aux[24] = {bins[0],        "--model",        aux,       "--listen",      o.ep[0],
                       "--downstream", o.ep[1],          "--dtype", (char *)o.dtype, "--chunk",
                       chunk,          "--max-requests", maxr};
    char **args[3] = {a_aux, a_pred, a_dec};
    for (int i = 0; i < 3; i++) {
        int k = 0;
        while (args[i][k])
            k++;
        if (o.trace_dir) {
            args[i][k++] = "--trace-log";
            args[i][k++] = traces[i];
        }
        if (o.verbose) args[i][k++] = "--verbose";
        if (o.threads[i]) {
            args[i][k++] = "--threads";
            args[i][k++] = threads[i];
        }
        if (o.cpus[i]) {
            args[i][k++] = "--cpus";
            args[i][k++] = (char *)o.cpus[i];
        }
        args[i][k] = NULL;
    }
    pid_t pids[3] = {0, 0, 0};
    for (int i = 2; i >= 0; i--)
        pids[i] = spawn(bins[i], args[i]);

    kvp_err_t err = {0};
    kvp_client_t *c = NULL;
    if (kvp_client_new(&c, NULL, o.ep[0], NULL, 60.0, &err)) {
        fprintf(stderr, "kvpred up: the pipeline did not come up: %s\n", err.msg);
        stop_all(pids);
        free(aux), free(base), free(pred);
        return 1;
    }
    kvp_client_free(&c);
    printf("kvpred up: pipeline running; clients connect to %s\n", o.ep[0]);
    for (int i = 0; i < 3; i++)
        printf("  %-12s pid %d  %s\n", STAGES[i], (int)pids[i], o.ep[i]);
    fflush(stdout);
    if (o.ready_file) {
        FILE *f = fopen(o.ready_file, "w");
        if (f) {
            fprintf(f, "%s\n", o.ep[0]);
            fclose(f);
        }
    }
    while (!atomic_load(&g_stop)) {
        int status;
        pid_t p = waitpid(-1, &status, WNOHANG);
        for (int i = 0; p > 0 && i < 3; i++)
            if (p == pids[i]) {
                fprintf(stderr, "kvpred up: %s (pid %d) exited (%s %d); stopping the others\n",
                        STAGES[i], (int)p, WIFEXITED(status) ? "status" : "signal",
                        WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
                pids[i] = 0;
                rc = 1;
                atomic_store(&g_stop, 1);
            }
        usleep(100000);
    }
    stop_all(pids);
    if (o.ready_file) unlink(o.ready_file);
    if (!rc) printf("kvpred up: stopped\n");
    free(aux), free(base), free(pred);
    return rc;
}
