/* Tests for kvp_link: endpoint rules (loopback unless told otherwise), the
 * Hello handshake accepted and refused naming the field with both values,
 * messages refused before a handshake, Ping/Pong clock estimates, silent
 * peers declared dead within timeout + one interval and the handshake
 * retried, and CurveZMQ with the right and the wrong server key. Both ends
 * run in this thread, driven by one zmq_poll loop as a stage would. */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvp_link.h"
#include "kvp_time.h"

static void *ctx;
static int seq;

static const char *tmp_dir(void) {
    const char *d = getenv("KVP_TEST_TMP");
    if (!d || !*d) d = "/tmp";
    mkdir(d, 0700);
    return d;
}

/* A Hello with storage for its parts. */
typedef struct hello {
    Kvpred__Hello h;
    Kvpred__CacheShape aux, base;
    int32_t map[4];
} hello_t;

static void hello_init(hello_t *x, const char *role) {
    kvpred__hello__init(&x->h);
    kvpred__cache_shape__init(&x->aux);
    kvpred__cache_shape__init(&x->base);
    x->aux.n_layer = 4, x->aux.n_kv_head = 2, x->aux.head_dim = 8;
    x->base.n_layer = 4, x->base.n_kv_head = 4, x->base.head_dim = 16;
    for (int i = 0; i < 4; i++)
        x->map[i] = i;
    x->h.role = (char *)role;
    x->h.aux_fingerprint = "0123456789abcdef";
    x->h.base_fingerprint = "1a2b3c4d5e6f7081";
    x->h.predictor_fingerprint = "aabbccddeeff0011";
    x->h.n_layer_map = 4, x->h.layer_map = x->map;
    x->h.dtype = KVPRED__DTYPE__DTYPE_F16;
    x->h.aux_shape = &x->aux, x->h.base_shape = &x->base;
    x->h.max_message_bytes = 1 << 24, x->h.max_chunk_tokens = 64;
}

/* One link: both ends, the loop's view of them and what it saw. */
typedef struct link {
    kvp_link_router_t *r;
    kvp_link_dealer_t *d;
    int poll_router, poll_dealer;
    kvp_wire_limits_t lim;
    kvp_wire_msg_t m;
    int d_app, r_app;   /* application messages handed to the caller */
    int d_errs, r_errs; /* negative returns from handle */
    int d_dead, r_dead; /* timeouts reported by tick */
    double d_dead_at, r_dead_at;
    kvp_err_t d_err, r_err; /* the last of those */
    kvp_wire_id_t r_dead_id;
} link_t;

static void settings(kvp_link_settings_t *s, double interval, double timeout) {
    kvp_link_settings_init(s);
    s->name = "decoder";
    s->peer_name = "decoder";
    s->ping_interval = interval;
    s->peer_timeout = timeout;
}

static char *endpoint_for(const char *transport, char *buf, size_t cap) {
    int n = seq++;
    if (strcmp(transport, "tcp") == 0)
        snprintf(buf, cap, "tcp://127.0.0.1:*");
    else if (strcmp(transport, "ipc") == 0)
        snprintf(buf, cap, "ipc://%s/link-%d-%d.sock", tmp_dir(), (int)getpid(), n);
    else
        snprintf(buf, cap, "inproc://link-%d", n);
    return buf;
}

static void link_open(link_t *l, const char *transport, const Kvpred__Hello *ours,
                      const Kvpred__Hello *theirs, const kvp_link_settings_t *s) {
    memset(l, 0, sizeof *l);
    l->poll_router = l->poll_dealer = 1;
    kvp_wire_limits_init(&l->lim, 0, 0, 0, 0);
    kvp_wire_msg_init(&l->m);
    char ep[256];
    kvp_err_t err = {0};
    if (kvp_link_router_new(&l->r, ctx, endpoint_for(transport, ep, sizeof ep), ours, s, &err))
        fail_msg("router: %s", err.msg);
    if (kvp_link_dealer_new(&l->d, ctx, kvp_link_router_endpoint(l->r), theirs, s, kvp_now(), &err))
        fail_msg("dealer: %s", err.msg);
}

static void link_close(link_t *l) {
    const char *ep = l->r ? kvp_link_router_endpoint(l->r) : "";
    if (strncmp(ep, "ipc://", 6) == 0) unlink(ep + 6);
    kvp_link_router_free(&l->r);
    kvp_link_dealer_free(&l->d);
    kvp_wire_msg_free(&l->m);
}

/* One turn of a stage's loop: poll both sockets until the earliest
 * deadline (at most `max_wait` s), drain them through handle, tick. */
static void turn(link_t *l, double max_wait) {
    double now = kvp_now(), deadline = now + max_wait;
    zmq_pollitem_t items[2];
    int n = 0, ri = -1, di = -1;
    if (l->r && l->poll_router) {
        double t = kvp_link_router_deadline(l->r);
        if (t < deadline) deadline = t;
        items[n] = (zmq_pollitem_t){kvp_link_router_socket(l->r), 0, ZMQ_POLLIN, 0};
        ri = n++;
    }
    if (l->d && l->poll_dealer) {
        double t = kvp_link_dealer_deadline(l->d);
        if (t < deadline) deadline = t;
        items[n] = (zmq_pollitem_t){kvp_link_dealer_socket(l->d), 0, ZMQ_POLLIN, 0};
        di = n++;
    }
    if (n == 0) {
        usleep((useconds_t)(max_wait * 1e6));
        return;
    }
    zmq_poll(items, n, kvp_link_poll_ms(deadline, now));
    kvp_err_t err;
    if (ri >= 0 && (items[ri].revents & ZMQ_POLLIN)) {
        int rc;
        while ((rc = kvp_wire_recv_from(kvp_link_router_socket(l->r), &l->lim, 0, &l->m, &err)) !=
               KVP_ETIMEOUT) {
            if (rc < 0) fail_msg("router recv: %s", err.msg);
            rc = kvp_link_router_handle(l->r, &l->m, kvp_now(), &err);
            if (rc == KVP_LINK_APP) l->r_app++;
            if (rc < 0) l->r_errs++, l->r_err = err;
        }
    }
    if (di >= 0 && (items[di].revents & ZMQ_POLLIN)) {
        int rc;
        while ((rc = kvp_wire_recv(kvp_link_dealer_socket(l->d), &l->lim, 0, &l->m, &err)) !=
               KVP_ETIMEOUT) {
            if (rc < 0) fail_msg("dealer recv: %s", err.msg);
            rc = kvp_link_dealer_handle(l->d, &l->m, kvp_now(), &err);
            if (rc == KVP_LINK_APP) l->d_app++;
            if (rc < 0) l->d_errs++, l->d_err = err;
        }
    }
    now = kvp_now();
    if (l->r && l->poll_router) {
        kvp_wire_id_t id;
        while (kvp_link_router_tick(l->r, now, &id, &err) == 1) {
            l->r_dead++, l->r_err = err, l->r_dead_id = id;
            l->r_dead_at = now;
        }
    }
    if (l->d && l->poll_dealer && kvp_link_dealer_tick(l->d, now, &err) == KVP_ETIMEOUT) {
        l->d_dead++, l->d_err = err;
        l->d_dead_at = now;
    }
}

/* Runs the loop until cond holds, failing the test if it does not within
 * `seconds`. */
#define EXPECT_WITHIN(l, seconds, cond)                                                            \
    do {                                                                                           \
        double until_ = kvp_now() + (seconds);                                                     \
        while (!(cond) && kvp_now() < until_)                                                      \
            turn((l), 0.05);                                                                       \
        if (!(cond))                                                                               \
            fail_msg("line %d: not within %.1f s: %s (last: dealer '%s', router '%s')", __LINE__,  \
                     (double)(seconds), #cond, (l)->d_err.msg, (l)->r_err.msg);                    \
    } while (0)

static void run_for(link_t *l, double seconds) {
    double until = kvp_now() + seconds;
    while (kvp_now() < until)
        turn(l, until - kvp_now());
}

/* ---- endpoints ---- */

static void endpoints_are_checked_with_named_errors(void **state) {
    (void)state;
    kvp_err_t err;
    assert_int_equal(kvp_link_endpoint_check("tcp://127.0.0.1:5555", 1, 0, &err), 0);
    assert_int_equal(kvp_link_endpoint_check("tcp://127.0.0.1:*", 1, 0, &err), 0);
    assert_int_equal(kvp_link_endpoint_check("tcp://localhost:5555", 0, 0, &err), 0);
    assert_int_equal(kvp_link_endpoint_check("tcp://[::1]:5555", 0, 0, &err), 0);
    assert_int_equal(kvp_link_endpoint_check("ipc:///tmp/x.sock", 0, 0, &err), 0);
    assert_int_equal(kvp_link_endpoint_check("inproc://stage", 0, 0, &err), 0);
    static const struct {
        const char *ep;
        int bind;
        const char *says;
    } bad[] = {
        {"", 1, "endpoint: empty"},
        {"http://127.0.0.1:80", 0, "unknown transport"},
        {"127.0.0.1:5555", 0, "unknown transport"},
        {"tcp://127.0.0.1", 0, "no port"},
        {"tcp://:5555", 1, "no host"},
        {"tcp://127.0.0.1:70000", 0, "port '70000' is not 1..65535"},
        {"tcp://127.0.0.1:abc", 1, "port 'abc' is not 1..65535 or *"},
        {"tcp://127.0.0.1:*", 0, "port * (ephemeral) is for binding only"},
        {"tcp://*:5555", 0, "cannot connect to a wildcard address"},
        {"tcp://[::1:5555", 0, "IPv6 address without its closing ']'"},
        {"ipc://", 0, "no path"},
        {"inproc://", 0, "no name"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = kvp_link_endpoint_check(bad[i].ep, bad[i].bind, 0, &err);
        if (rc != KVP_EINVAL || !strstr(err.msg, bad[i].says))
            fail_msg("%s: got %d '%s', want '%s'", bad[i].ep, rc, err.msg, bad[i].says);
    }
    char longp[200];
    snprintf(longp, sizeof longp, "ipc:///%0150d", 0);
    assert_int_equal(kvp_link_endpoint_check(longp, 1, 0, &err), KVP_EINVAL);
    assert_non_null(strstr(err.msg, "over the 107 a unix socket allows"));
}

static void binding_every_interface_needs_the_allow_flag(void **state) {
    (void)state;
    hello_t h;
    hello_init(&h, "decoder");
    kvp_link_settings_t s;
    kvp_link_settings_init(&s);
    kvp_err_t err;
    kvp_link_router_t *r = NULL;
    const char *wild[] = {"tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://[::]:5555", "tcp://*:*"};
    for (size_t i = 0; i < 4; i++) {
        assert_int_equal(kvp_link_router_new(&r, ctx, wild[i], &h.h, &s, &err), KVP_EINVAL);
        assert_null(r);
        assert_non_null(strstr(err.msg, "binds every network interface"));
        assert_non_null(strstr(err.msg, "--bind-any"));
        assert_non_null(strstr(err.msg, KVP_LINK_DEFAULT_HOST));
    }
    /* told otherwise: binds (an ephemeral port, closed at once) */
    s.bind_any = 1;
    if (kvp_link_router_new(&r, ctx, "tcp://0.0.0.0:*", &h.h, &s, &err))
        fail_msg("bind-any: %s", err.msg);
    assert_non_null(strstr(kvp_link_router_endpoint(r), "tcp://0.0.0.0:"));
    kvp_link_router_free(&r);
    assert_null(r);
    /* settings are checked too */
    kvp_link_dealer_t *d = NULL;
    s.ping_interval = 3.0, s.peer_timeout = 2.0;
    assert_int_equal(kvp_link_dealer_new(&d, ctx, "tcp://127.0.0.1:5", &h.h, &s, kvp_now(), &err),
                     KVP_EINVAL);
    assert_non_null(strstr(err.msg, "ping_interval"));
}

/* ---- handshake ---- */

static void handshake_accepted(const char *transport) {
    hello_t ours, theirs;
    hello_init(&ours, "decoder");
    hello_init(&theirs, "predictor");
    kvp_link_settings_t s;
    settings(&s, 0.05, 1.0);
    link_t l;
    link_open(&l, transport, &ours.h, &theirs.h, &s);
    assert_int_equal(kvp_link_dealer_state(l.d), KVP_LINK_HANDSHAKE);
    EXPECT_WITHIN(&l, 3.0, kvp_link_dealer_state(l.d) == KVP_LINK_READY);
    assert_int_equal(kvp_link_dealer_epoch(l.d), 1);
    assert_true(kvp_link_dealer_peer_host(l.d)[0] != 0); /* filled from gethostname */
    assert_int_equal(kvp_link_router_n_peers(l.r), 1);
    assert_int_equal(l.d_errs + l.r_errs + l.d_dead + l.r_dead, 0);

    /* application messages pass both ways */
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    Kvpred__Request req = KVPRED__REQUEST__INIT;
    req.request_id = "r1";
    env.body_case = KVPRED__ENVELOPE__BODY_REQUEST, env.request = &req;
    kvp_err_t err;
    assert_int_equal(kvp_wire_send(kvp_link_dealer_socket(l.d), &env, NULL, 0, &err), 0);
    kvp_wire_msg_t m;
    kvp_wire_msg_init(&m);
    assert_int_equal(kvp_wire_recv_from(kvp_link_router_socket(l.r), &l.lim, 1000, &m, &err), 0);
    while (m.env->body_case != KVPRED__ENVELOPE__BODY_REQUEST) { /* Pings in between */
        assert_int_equal(kvp_link_router_handle(l.r, &m, kvp_now(), &err), KVP_LINK_CONSUMED);
        assert_int_equal(kvp_wire_recv_from(kvp_link_router_socket(l.r), &l.lim, 1000, &m, &err),
                         0);
    }
    assert_true(kvp_link_router_peer_ready(l.r, &m.from));
    assert_int_equal(kvp_link_router_handle(l.r, &m, kvp_now(), &err), KVP_LINK_APP);
    Kvpred__Token tok = KVPRED__TOKEN__INIT;
    tok.request_id = "r1", tok.id = 7;
    env.body_case = KVPRED__ENVELOPE__BODY_TOKEN, env.token = &tok;
    kvp_wire_id_t from = m.from;
    assert_int_equal(kvp_wire_send_to(kvp_link_router_socket(l.r), &from, &env, NULL, 0, &err), 0);
    EXPECT_WITHIN(&l, 1.0, l.d_app == 1);
    kvp_wire_msg_free(&m);
    link_close(&l);
}

static void handshake_accepted_inproc(void **state) {
    (void)state;
    handshake_accepted("inproc");
}
static void handshake_accepted_tcp(void **state) {
    (void)state;
    handshake_accepted("tcp");
}
static void handshake_accepted_ipc(void **state) {
    (void)state;
    handshake_accepted("ipc");
}

/* The dealer's Hello differs from the router's in one field: both sides
 * name it with both values, from their own point of view. */
static void expect_refusal(hello_t *ours, hello_t *theirs, const char *dealer_says,
                           const char *router_says) {
    kvp_link_settings_t s;
    settings(&s, 0.05, 1.0);
    link_t l;
    link_open(&l, "inproc", &ours->h, &theirs->h, &s);
    EXPECT_WITHIN(&l, 2.0, l.d_errs > 0 && l.r_errs > 0);
    assert_int_equal(l.d_err.code, KVP_EPEER);
    if (!strstr(l.d_err.msg, dealer_says))
        fail_msg("dealer said '%s', want '%s'", l.d_err.msg, dealer_says);
    if (!strstr(l.r_err.msg, router_says))
        fail_msg("router said '%s', want '%s'", l.r_err.msg, router_says);
    assert_int_equal(kvp_link_dealer_state(l.d), KVP_LINK_REFUSED);
    assert_int_equal(kvp_link_router_n_peers(l.r), 0);
    assert_int_equal(kvp_link_dealer_epoch(l.d), 0);
    link_close(&l);
}

static void handshake_refused_naming_field_and_values(void **state) {
    (void)state;
    hello_t ours, theirs;
    hello_init(&ours, "decoder");
    hello_init(&theirs, "predictor");
    theirs.h.base_fingerprint = "9f8e7d6c5b4a3921";
    expect_refusal(&ours, &theirs, "handshake refused by decoder at inproc://link-",
                   "refused handshake from predictor on ");
    expect_refusal(&ours, &theirs,
                   "base_fingerprint differs (ours 9f8e7d6c5b4a3921, theirs 1a2b3c4d5e6f7081)",
                   "base_fingerprint differs (ours 1a2b3c4d5e6f7081, theirs 9f8e7d6c5b4a3921)");

    hello_init(&theirs, "predictor");
    theirs.map[2] = 1;
    expect_refusal(&ours, &theirs, "layer_map differs (ours [0,1,1,3], theirs [0,1,2,3])",
                   "layer_map differs (ours [0,1,2,3], theirs [0,1,1,3])");

    hello_init(&theirs, "predictor");
    theirs.h.dtype = KVPRED__DTYPE__DTYPE_F32;
    expect_refusal(&ours, &theirs, "dtype differs (ours f32, theirs f16)",
                   "dtype differs (ours f16, theirs f32)");

    hello_init(&theirs, "predictor");
    theirs.h.protocol_version = KVP_WIRE_PROTOCOL_VERSION + 1;
    expect_refusal(&ours, &theirs, "protocol_version differs", "protocol_version differs");
}

/* A peer that sends anything before its Hello gets Error "no handshake",
 * with the request id when the message had one. */
static void messages_before_handshake_refused(void **state) {
    (void)state;
    hello_t ours;
    hello_init(&ours, "decoder");
    kvp_link_settings_t s;
    settings(&s, 0.05, 1.0);
    kvp_link_router_t *r;
    kvp_err_t err;
    char ep[64];
    assert_int_equal(
        kvp_link_router_new(&r, ctx, endpoint_for("inproc", ep, sizeof ep), &ours.h, &s, &err), 0);
    void *raw = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(raw, ZMQ_LINGER, &zero, sizeof zero);
    assert_int_equal(zmq_connect(raw, kvp_link_router_endpoint(r)), 0);
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    Kvpred__Reserve res = KVPRED__RESERVE__INIT;
    res.request_id = "early";
    env.body_case = KVPRED__ENVELOPE__BODY_RESERVE, env.reserve = &res;
    assert_int_equal(kvp_wire_send(raw, &env, NULL, 0, &err), 0);
    kvp_wire_limits_t lim;
    kvp_wire_limits_init(&lim, 0, 0, 0, 0);
    kvp_wire_msg_t m;
    kvp_wire_msg_init(&m);
    assert_int_equal(kvp_wire_recv_from(kvp_link_router_socket(r), &lim, 1000, &m, &err), 0);
    assert_int_equal(kvp_link_router_handle(r, &m, kvp_now(), &err), KVP_EPEER);
    assert_non_null(strstr(err.msg, "decoder refused Reserve from peer (id "));
    assert_non_null(strstr(err.msg, "no handshake"));
    assert_int_equal(kvp_wire_recv(raw, &lim, 1000, &m, &err), 0);
    assert_int_equal(m.env->body_case, KVPRED__ENVELOPE__BODY_ERROR);
    assert_string_equal(m.env->error->request_id, "early");
    assert_string_equal(m.env->error->stage, "decoder");
    assert_non_null(strstr(m.env->error->message, KVP_WIRE_NO_HANDSHAKE ": Reserve"));
    /* a Ping without a handshake is answered the same way, not with a Pong */
    Kvpred__Ping ping = KVPRED__PING__INIT;
    env.body_case = KVPRED__ENVELOPE__BODY_PING, env.ping = &ping;
    assert_int_equal(kvp_wire_send(raw, &env, NULL, 0, &err), 0);
    assert_int_equal(kvp_wire_recv_from(kvp_link_router_socket(r), &lim, 1000, &m, &err), 0);
    assert_int_equal(kvp_link_router_handle(r, &m, kvp_now(), &err), KVP_LINK_CONSUMED);
    assert_int_equal(kvp_wire_recv(raw, &lim, 1000, &m, &err), 0);
    assert_int_equal(m.env->body_case, KVPRED__ENVELOPE__BODY_ERROR);
    assert_string_equal(m.env->error->request_id, "");
    kvp_wire_msg_free(&m);
    zmq_close(raw);
    kvp_link_router_free(&r);
}

/* ---- clock ---- */

static void ping_pong_estimates_rtt_and_zero_offset(void **state) {
    (void)state;
    hello_t ours, theirs;
    hello_init(&ours, "decoder");
    hello_init(&theirs, "predictor");
    kvp_link_settings_t s;
    settings(&s, 0.02, 1.0);
    link_t l;
    link_open(&l, "tcp", &ours.h, &theirs.h, &s);
    int64_t off, rtt;
    assert_int_equal(kvp_link_dealer_clock(l.d, &off, &rtt), KVP_EBUSY);
    EXPECT_WITHIN(&l, 2.0, kvp_link_dealer_state(l.d) == KVP_LINK_READY);
    run_for(&l, 0.4); /* about 20 pings */
    assert_int_equal(kvp_link_dealer_clock(l.d, &off, &rtt), 0);
    /* one machine, one clock: the offset is 0 to within rtt / 2 */
    if (!(rtt > 0 && rtt < 20000000 && llabs(off) <= rtt / 2 + 1000 && llabs(off) < 3000000))
        fail_msg("offset %lld ns, rtt %lld ns", (long long)off, (long long)rtt);
    assert_int_equal(l.d_dead + l.r_dead + l.d_errs + l.r_errs, 0);
    link_close(&l);
}

/* ---- silent peers ---- */

/* The router stops polling (a wedged stage): the dealer declares it dead
 * within timeout + one interval of the last time it answered, then
 * completes a new handshake once the router answers again. */
static void silent_router_declared_dead_then_handshake_retried(void **state) {
    (void)state;
    hello_t ours, theirs;
    hello_init(&ours, "decoder");
    hello_init(&theirs, "predictor");
    const double interval = 0.05, timeout = 0.3;
    kvp_link_settings_t s;
    settings(&s, interval, timeout);
    link_t l;
    link_open(&l, "tcp", &ours.h, &theirs.h, &s);
    EXPECT_WITHIN(&l, 2.0, kvp_link_dealer_state(l.d) == KVP_LINK_READY);
    run_for(&l, 0.1);
    l.poll_router = 0;
    double stop = kvp_now();
    EXPECT_WITHIN(&l, 2.0, l.d_dead == 1);
    double took = l.d_dead_at - stop;
    if (!(took <= timeout + interval + 0.03)) fail_msg("declared dead after %.3f s", took);
    assert_true(took >= timeout - interval);
    assert_int_equal(l.d_err.code, KVP_ETIMEOUT);
    assert_non_null(strstr(l.d_err.msg, "decoder at tcp://127.0.0.1:"));
    assert_non_null(strstr(l.d_err.msg, "silent for"));
    assert_int_equal(kvp_link_dealer_state(l.d), KVP_LINK_DEAD);
    /* the router wakes up: the retried handshake completes */
    l.poll_router = 1;
    EXPECT_WITHIN(&l, 2.0, kvp_link_dealer_state(l.d) == KVP_LINK_READY);
    assert_int_equal(kvp_link_dealer_epoch(l.d), 2);
    assert_int_equal(l.d_dead, 1);
    link_close(&l);
}

/* The dealer goes away: the router declares that peer dead within
 * timeout + one interval and forgets it. */
static void closed_dealer_declared_dead_by_router(void **state) {
    (void)state;
    hello_t ours, theirs;
    hello_init(&ours, "decoder");
    hello_init(&theirs, "predictor");
    const double interval = 0.05, timeout = 0.3;
    kvp_link_settings_t s;
    settings(&s, interval, timeout);
    link_t l;
    link_open(&l, "ipc", &ours.h, &theirs.h, &s);
    EXPECT_WITHIN(&l, 2.0, kvp_link_dealer_state(l.d) == KVP_LINK_READY);
    run_for(&l, 0.1);
    assert_int_equal(kvp_link_router_n_peers(l.r), 1);
    kvp_link_dealer_free(&l.d);
    double stop = kvp_now();
    EXPECT_WITHIN(&l, 2.0, l.r_dead == 1);
    double took = l.r_dead_at - stop;
    if (!(took <= timeout + interval + 0.03)) fail_msg("declared dead after %.3f s", took);
    assert_int_equal(l.r_err.code, KVP_ETIMEOUT);
    assert_non_null(strstr(l.r_err.msg, "predictor on "));
    assert_non_null(strstr(l.r_err.msg, "declared dead"));
    assert_int_equal(kvp_link_router_n_peers(l.r), 0);
    assert_false(kvp_link_router_peer_ready(l.r, &l.r_dead_id));
    link_close(&l);
}

/* Binds a new router where the old one was: libzmq closes the old
 * listening socket in the background, so the port may take a moment. */
static void router_rebind(link_t *l, const char *ep, const Kvpred__Hello *ours,
                          const kvp_link_settings_t *s) {
    kvp_err_t err;
    double until = kvp_now() + 2.0;
    while (kvp_link_router_new(&l->r, ctx, ep, ours, s, &err) != 0) {
        if (kvp_now() > until) fail_msg("rebind %s: %s", ep, err.msg);
        usleep(10000);
    }
}

/* The bound side restarts on the same endpoint: libzmq reconnects, the new
 * router answers "no handshake", the dealer reports the lost state and
 * handshakes again without waiting for the timeout. A router gone for
 * longer than the timeout is declared dead first. */
static void restarted_router_gets_a_new_handshake(void **state) {
    (void)state;
    hello_t ours, theirs;
    hello_init(&ours, "decoder");
    hello_init(&theirs, "predictor");
    kvp_link_settings_t s;
    settings(&s, 0.05, 1.0);
    link_t l;
    link_open(&l, "tcp", &ours.h, &theirs.h, &s);
    EXPECT_WITHIN(&l, 2.0, kvp_link_dealer_state(l.d) == KVP_LINK_READY);
    char ep[256];
    snprintf(ep, sizeof ep, "%s", kvp_link_router_endpoint(l.r));
    kvp_link_router_free(&l.r);
    router_rebind(&l, ep, &ours.h, &s);
    EXPECT_WITHIN(&l, 3.0, kvp_link_dealer_epoch(l.d) == 2);
    assert_int_equal(kvp_link_dealer_state(l.d), KVP_LINK_READY);
    assert_int_equal(l.d_errs, 1);
    assert_non_null(strstr(l.d_err.msg, "lost our handshake"));
    assert_int_equal(l.d_dead, 0);

    /* gone for longer than the timeout */
    kvp_link_router_free(&l.r);
    double stop = kvp_now();
    EXPECT_WITHIN(&l, 3.0, l.d_dead == 1);
    assert_true(l.d_dead_at - stop <= 1.0 + 0.05 + 0.03);
    assert_int_equal(kvp_link_dealer_state(l.d), KVP_LINK_DEAD);
    run_for(&l, 0.2);
    assert_int_equal(l.d_dead, 1); /* reported once */
    router_rebind(&l, ep, &ours.h, &s);
    EXPECT_WITHIN(&l, 3.0, kvp_link_dealer_state(l.d) == KVP_LINK_READY);
    assert_int_equal(kvp_link_dealer_epoch(l.d), 3);
    link_close(&l);
}

/* Nobody listening: the missing HelloReply is reported once, after the
 * timeout, naming the peer and endpoint. */
static void no_peer_reports_missing_hello_reply(void **state) {
    (void)state;
    hello_t h;
    hello_init(&h, "predictor");
    kvp_link_settings_t s;
    settings(&s, 0.05, 0.2);
    link_t l;
    memset(&l, 0, sizeof l);
    l.poll_dealer = 1;
    kvp_wire_limits_init(&l.lim, 0, 0, 0, 0);
    kvp_wire_msg_init(&l.m);
    kvp_err_t err;
    double t0 = kvp_now();
    assert_int_equal(
        kvp_link_dealer_new(&l.d, ctx, "ipc:///nonexistent/kvp-test.sock", &h.h, &s, t0, &err), 0);
    EXPECT_WITHIN(&l, 2.0, l.d_dead == 1);
    assert_true(l.d_dead_at - t0 >= 0.2 && l.d_dead_at - t0 <= 0.2 + 0.05 + 0.03);
    assert_non_null(strstr(l.d_err.msg, "decoder at ipc:///nonexistent/kvp-test.sock: no "
                                        "HelloReply within 0.20 s"));
    run_for(&l, 0.3);
    assert_int_equal(l.d_dead, 1);
    kvp_link_dealer_free(&l.d);
    kvp_wire_msg_free(&l.m);
}

/* ---- CurveZMQ ---- */

static void curve_right_key_connects_wrong_key_times_out(void **state) {
    (void)state;
    if (!zmq_has("curve")) skip();
    char spub[256], ssec[256], opub[256], osec[256], junk[256];
    snprintf(spub, sizeof spub, "%s/link-%d-server.key", tmp_dir(), (int)getpid());
    snprintf(ssec, sizeof ssec, "%s/link-%d-server.key_secret", tmp_dir(), (int)getpid());
    snprintf(opub, sizeof opub, "%s/link-%d-other.key", tmp_dir(), (int)getpid());
    snprintf(osec, sizeof osec, "%s/link-%d-other.key_secret", tmp_dir(), (int)getpid());
    snprintf(junk, sizeof junk, "%s/link-%d-junk.key", tmp_dir(), (int)getpid());
    kvp_err_t err;
    assert_int_equal(kvp_link_curve_keygen(spub, ssec, &err), 0);
    assert_int_equal(kvp_link_curve_keygen(opub, osec, &err), 0);
    struct stat st;
    assert_int_equal(stat(ssec, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    FILE *f = fopen(junk, "w");
    fputs("# a comment\n\nnot-a-key\n", f);
    fclose(f);
    char key[41];
    assert_int_equal(kvp_link_curve_read_key(junk, key, &err), KVP_EFORMAT);
    assert_non_null(strstr(err.msg, "9 characters, expected 40 of z85"));
    assert_int_equal(kvp_link_curve_read_key("/nonexistent/k", key, &err), KVP_EIO);

    kvp_link_curve_t server, right, wrong;
    assert_int_equal(kvp_link_curve_load_server(&server, spub, ssec, &err), 0);
    assert_int_equal(kvp_link_curve_load_client(&right, spub, NULL, NULL, &err), 0);
    assert_int_equal(kvp_link_curve_load_client(&wrong, opub, NULL, NULL, &err), 0);

    hello_t ours, theirs;
    hello_init(&ours, "decoder");
    hello_init(&theirs, "predictor");
    kvp_link_settings_t rs, ds;
    settings(&rs, 0.05, 0.5);
    rs.curve = &server;
    settings(&ds, 0.05, 0.5);

    /* right key */
    link_t l;
    memset(&l, 0, sizeof l);
    l.poll_router = l.poll_dealer = 1;
    kvp_wire_limits_init(&l.lim, 0, 0, 0, 0);
    kvp_wire_msg_init(&l.m);
    assert_int_equal(kvp_link_router_new(&l.r, ctx, "tcp://127.0.0.1:*", &ours.h, &rs, &err), 0);
    ds.curve = &right;
    assert_int_equal(kvp_link_dealer_new(&l.d, ctx, kvp_link_router_endpoint(l.r), &theirs.h, &ds,
                                         kvp_now(), &err),
                     0);
    EXPECT_WITHIN(&l, 3.0, kvp_link_dealer_state(l.d) == KVP_LINK_READY);
    kvp_link_dealer_free(&l.d);

    /* wrong key: the CURVE handshake never completes, so no HelloReply */
    ds.curve = &wrong;
    l.d_dead = 0;
    assert_int_equal(kvp_link_dealer_new(&l.d, ctx, kvp_link_router_endpoint(l.r), &theirs.h, &ds,
                                         kvp_now(), &err),
                     0);
    EXPECT_WITHIN(&l, 2.0, l.d_dead == 1);
    assert_int_equal(l.d_err.code, KVP_ETIMEOUT);
    assert_non_null(strstr(l.d_err.msg, "no HelloReply within 0.50 s"));
    assert_non_null(strstr(l.d_err.msg, "CurveZMQ"));
    assert_int_not_equal(kvp_link_dealer_state(l.d), KVP_LINK_READY);

    /* and a plaintext client cannot talk to a CURVE server either */
    kvp_link_dealer_free(&l.d);
    ds.curve = NULL;
    l.d_dead = 0;
    assert_int_equal(kvp_link_dealer_new(&l.d, ctx, kvp_link_router_endpoint(l.r), &theirs.h, &ds,
                                         kvp_now(), &err),
                     0);
    EXPECT_WITHIN(&l, 2.0, l.d_dead == 1);
    assert_int_not_equal(kvp_link_dealer_state(l.d), KVP_LINK_READY);
    link_close(&l);
    unlink(spub), unlink(ssec), unlink(opub), unlink(osec), unlink(junk);
}

static int group_setup(void **state) {
    (void)state;
    ctx = zmq_ctx_new();
    return ctx ? 0 : -1;
}

static int group_teardown(void **state) {
    (void)state;
    zmq_ctx_term(ctx);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(endpoints_are_checked_with_named_errors),
        cmocka_unit_test(binding_every_interface_needs_the_allow_flag),
        cmocka_unit_test(handshake_accepted_inproc),
        cmocka_unit_test(handshake_accepted_tcp),
        cmocka_unit_test(handshake_accepted_ipc),
        cmocka_unit_test(handshake_refused_naming_field_and_values),
        cmocka_unit_test(messages_before_handshake_refused),
        cmocka_unit_test(ping_pong_estimates_rtt_and_zero_offset),
        cmocka_unit_test(silent_router_declared_dead_then_handshake_retried),
        cmocka_unit_test(closed_dealer_declared_dead_by_router),
        cmocka_unit_test(restarted_router_gets_a_new_handshake),
        cmocka_unit_test(no_peer_reports_missing_hello_reply),
        cmocka_unit_test(curve_right_key_connects_wrong_key_times_out),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
