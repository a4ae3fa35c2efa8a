#include "kvp_bench_stages.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cblas.h>

#include "kvp_cpus.h"
#include "kvp_time.h"
#include "kvpred.pb-c.h"

static const char *const NAMES[KVP_BSTAGES] = {"aux-prefill", "predictor", "decoder"};

/* Everything a stage touches after it starts. With forked stages it lives in
 * a MAP_SHARED mapping: the atomics, exit codes and messages written by a
 * child are what the parent reads. */
/* What a stage thread is started with. */
typedef struct {
    struct kvp_bench_stages *s;
    int i;
} stage_arg_t;

struct kvp_bench_stages {
    atomic_int stop;
    atomic_int ready[KVP_BSTAGES];
    atomic_int done[KVP_BSTAGES]; /* the stage's loop has returned */
    int rc[KVP_BSTAGES];
    kvp_err_t err[KVP_BSTAGES];
    kvp_aux_cfg_t aux;
    kvp_pred_cfg_t pred;
    kvp_dec_cfg_t dec;
    kvp_bench_stages_opts_t o;
    pthread_t th[KVP_BSTAGES];
    stage_arg_t arg[KVP_BSTAGES];
    pid_t pid[KVP_BSTAGES];
    int started[KVP_BSTAGES];
    char ep[KVP_BSTAGES][64];
    FILE *log;
};

static void run_stage(kvp_bench_stages_t *s, int i) {
    if (i == KVP_BSTAGE_AUX)
        s->rc[i] = kvp_svc_aux_run(&s->aux, &s->err[i]);
    else if (i == KVP_BSTAGE_PRED)
        s->rc[i] = kvp_svc_pred_run(&s->pred, &s->err[i]);
    else
        s->rc[i] = kvp_svc_dec_run(&s->dec, &s->err[i]);
    atomic_store(&s->done[i], 1);
}

static void *thread_main(void *arg) {
    stage_arg_t *a = arg;
    run_stage(a->s, a->i);
    return NULL;
}

/* The child: pin, size the BLAS pool, run the loop, leave without running the
 * parent's atexit handlers or flushing its stdio buffers twice. */
static void child_main(kvp_bench_stages_t *s, int i) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (s->o.cpus[i] && (s->rc[i] = kvp_cpus_pin_process(s->o.cpus[i], &s->err[i]))) {
        atomic_store(&s->done[i], 1);
        _exit(1);
    }
    if (s->o.threads[i] > 0) openblas_set_num_threads(s->o.threads[i]);
    run_stage(s, i);
    if (s->log) fflush(s->log);
    _exit(s->rc[i] ? 1 : 0);
}

static int start_one(kvp_bench_stages_t *s, int i, kvp_err_t *err) {
    if (s->o.procs) {
        fflush(NULL); /* or the child would inherit, and later flush, our buffers */
        pid_t pid = fork();
        if (pid < 0) return kvp_err_set(err, KVP_EIO, "cannot fork the %s stage: %s", NAMES[i],
                                        strerror(errno));
        if (pid == 0) child_main(s, i);
        s->pid[i] = pid;
    } else {
        s->arg[i] = (stage_arg_t){s, i};
        if (pthread_create(&s->th[i], NULL, thread_main, &s->arg[i]))
            return kvp_err_set(err, KVP_EIO, "cannot start the %s thread", NAMES[i]);
    }
    s->started[i] = 1;
    return KVP_OK;
}

/* Three distinct free tcp ports on loopback: bound to port 0 together (so the
 * kernel gives three different ones), read back, closed. Another program could
 * take one before a stage binds it; the stage would then fail with the port
 * named, and --port picks them by hand. */
static int free_ports(int ports[KVP_BSTAGES], kvp_err_t *err) {
    int fds[KVP_BSTAGES] = {-1, -1, -1}, rc = KVP_OK;
    for (int i = 0; i < KVP_BSTAGES && !rc; i++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t len = sizeof a;
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&a, sizeof a) ||
            getsockname(fds[i], (struct sockaddr *)&a, &len))
            rc = kvp_err_set(err, KVP_EIO, "cannot find a free tcp port on 127.0.0.1");
        else
            ports[i] = ntohs(a.sin_port);
    }
    for (int i = 0; i < KVP_BSTAGES; i++)
        if (fds[i] >= 0) close(fds[i]);
    return rc;
}

static void common_cfg(kvp_bench_stages_t *s, kvp_svc_common_t *c, int i) {
    kvp_svc_common_init(c);
    c->zmq_ctx = NULL; /* each stage its own context, as separate processes */
    c->stop = &s->stop;
    c->ready = &s->ready[i];
    c->log = s->log;
    c->verbose = s->o.verbose;
    c->dtype = s->o.dtype;
    if (s->o.max_chunk > c->max_chunk_tokens) c->max_chunk_tokens = s->o.max_chunk;
    /* the benchmark's in-process runs between requests keep every core busy
     * for seconds: a stage must not declare its peer dead meanwhile */
    c->peer_timeout = 30.0;
}

static void configure(kvp_bench_stages_t *s, const kvp_model_t *aux, const kvp_model_t *base,
                      const kvp_predictor_t *p, const kvp_tokenizer_t *tok) {
    common_cfg(s, &s->aux.c, KVP_BSTAGE_AUX);
    s->aux.listen = s->ep[KVP_BSTAGE_AUX];
    s->aux.downstream = s->ep[KVP_BSTAGE_PRED];
    s->aux.model = aux;
    s->aux.tok = tok;
    s->aux.chunk_tokens = 128;
    s->aux.tail_tokens = s->o.tail;
    common_cfg(s, &s->pred.c, KVP_BSTAGE_PRED);
    s->pred.listen = s->ep[KVP_BSTAGE_PRED];
    s->pred.downstream = s->ep[KVP_BSTAGE_DEC];
    s->pred.pred = p;
    common_cfg(s, &s->dec.c, KVP_BSTAGE_DEC);
    s->dec.listen = s->ep[KVP_BSTAGE_DEC];
    s->dec.model = base;
    s->dec.tok = tok;
    s->dec.credits = s->o.credits;
}

/* Whether stage i is gone: its loop returned, or (forked) its process died. */
static int stage_gone(kvp_bench_stages_t *s, int i) {
    if (atomic_load(&s->done[i])) return 1;
    if (!s->o.procs) return 0;
    int status;
    if (waitpid(s->pid[i], &status, WNOHANG) != s->pid[i]) return 0;
    s->pid[i] = 0;
    s->started[i] = 0;
    if (!s->rc[i])
        s->rc[i] = kvp_err_set(&s->err[i], KVP_EIO, "the %s process died (%s %d)", NAMES[i],
                               WIFSIGNALED(status) ? "signal" : "status",
                               WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
    return 1;
}

static int wait_ready(kvp_bench_stages_t *s, kvp_err_t *err) {
    double end = kvp_now() + 30.0;
    for (int i = 0; i < KVP_BSTAGES; i++) {
        while (!atomic_load(&s->ready[i]) && !stage_gone(s, i) && kvp_now() < end)
            usleep(1000);
        if (!atomic_load(&s->ready[i]))
            return kvp_err_set(err, s->rc[i] ? s->rc[i] : KVP_ETIMEOUT, "%s on %s: %s", NAMES[i],
                               s->ep[i], s->rc[i] ? s->err[i].msg : "did not come up within 30 s");
    }
    return KVP_OK;
}

static kvp_bench_stages_t *alloc_block(int shared) {
    if (!shared) return calloc(1, sizeof(kvp_bench_stages_t));
    void *m = mmap(NULL, sizeof(kvp_bench_stages_t), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    return m == MAP_FAILED ? NULL : m; /* zero-filled */
}

int kvp_bench_stages_start(kvp_bench_stages_t **out, const kvp_bench_stages_opts_t *o,
                           const kvp_model_t *aux, const kvp_model_t *base,
                           const kvp_predictor_t *p, const kvp_tokenizer_t *tok, kvp_err_t *err) {
    *out = NULL;
    kvp_bench_stages_t *s = alloc_block(o->procs);
    if (!s) return kvp_err_set(err, KVP_ENOMEM, "out of memory for the stages' control block");
    s->o = *o;
    atomic_init(&s->stop, 0);
    for (int i = 0; i < KVP_BSTAGES; i++) {
        atomic_init(&s->ready[i], 0);
        atomic_init(&s->done[i], 0);
    }
    s->log = o->verbose ? stderr : fopen("/dev/null", "w");
    int ports[KVP_BSTAGES] = {o->port, o->port + 1, o->port + 2};
    int rc = s->log ? KVP_OK : kvp_err_set(err, KVP_EIO, "cannot open /dev/null for the log");
    if (!rc && !o->port) rc = free_ports(ports, err);
    for (int i = 0; i < KVP_BSTAGES; i++)
        snprintf(s->ep[i], sizeof s->ep[i], "tcp://127.0.0.1:%d", ports[i]);
    if (!rc) configure(s, aux, base, p, tok);
    for (int i = KVP_BSTAGES - 1; !rc && i >= 0; i--) /* downstream first */
        rc = start_one(s, i, err);
    if (!rc) rc = wait_ready(s, err);
    *out = s;
    if (rc) kvp_bench_stages_stop(out);
    return rc;
}

/* A forked stage that does not end within 5 s of the stop flag is killed. */
static void reap(kvp_bench_stages_t *s, int i) {
    double end = kvp_now() + 5.0;
    while (s->pid[i] && !stage_gone(s, i) && kvp_now() < end)
        usleep(2000);
    if (s->pid[i]) {
        kill(s->pid[i], SIGKILL);
        waitpid(s->pid[i], NULL, 0);
        s->pid[i] = 0;
    }
}

void kvp_bench_stages_stop(kvp_bench_stages_t **sp) {
    kvp_bench_stages_t *s = *sp;
    if (!s) return;
    *sp = NULL;
    atomic_store(&s->stop, 1);
    for (int i = 0; i < KVP_BSTAGES; i++) {
        if (!s->started[i] && !s->rc[i]) continue;
        if (s->o.procs)
            reap(s, i);
        else if (s->started[i])
            pthread_join(s->th[i], NULL);
        s->started[i] = 0;
        if (s->rc[i])
            fprintf(stderr, "kvpred bench: stage %s: %s\n", NAMES[i], s->err[i].msg);
    }
    if (s->log && s->log != stderr) fclose(s->log);
    if (s->o.procs)
        munmap(s, sizeof *s);
    else
        free(s);
}

const char *kvp_bench_stages_endpoint(const kvp_bench_stages_t *s, int stage) {
    return s->ep[stage];
}
