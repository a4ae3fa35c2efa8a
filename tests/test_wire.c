/* Tests for kvp_wire: every message type round-trips over inproc, tcp and
 * ipc in both directions; chunk tensors in f32 (exact) and f16 (within
 * rounding) with the zero-copy hand-over; every kind of malformed message
 * (crafted frame by frame) is refused naming the field, leaves the socket at
 * a message boundary and can be answered with an Error; Hello comparison
 * names the first differing field with both values. */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvp_half.h"
#include "kvp_time.h"
#include "kvp_wire.h"

/* The chunk shape of the test link: 4 layers of 2 KV heads of 8. */
enum { N_LAYER = 4, N_KV_HEAD = 2, HEAD_DIM = 8, WIDTH = N_KV_HEAD * HEAD_DIM, MAX_TOK = 16 };

static void *ctx;
static int pair_seq;

static const char *tmp_dir(void) {
    const char *d = getenv("KVP_TEST_TMP");
    if (!d || !*d) d = "/tmp";
    mkdir(d, 0700);
    return d;
}

typedef struct pair {
    void *router, *dealer;
    char endpoint[256];
} pair_t;

/* A ROUTER bound on the transport (ephemeral tcp port, a fresh ipc path or
 * inproc name) and a DEALER connected to it. */
static void pair_open(pair_t *p, const char *transport) {
    char ep[256];
    int seq = pair_seq++;
    if (strcmp(transport, "tcp") == 0)
        snprintf(ep, sizeof ep, "tcp://127.0.0.1:*");
    else if (strcmp(transport, "ipc") == 0)
        snprintf(ep, sizeof ep, "ipc://%s/wire-%d-%d.sock", tmp_dir(), (int)getpid(), seq);
    else
        snprintf(ep, sizeof ep, "inproc://wire-%d", seq);
    int zero = 0;
    p->router = zmq_socket(ctx, ZMQ_ROUTER);
    p->dealer = zmq_socket(ctx, ZMQ_DEALER);
    assert_non_null(p->router);
    assert_non_null(p->dealer);
    zmq_setsockopt(p->router, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(p->dealer, ZMQ_LINGER, &zero, sizeof zero);
    assert_int_equal(zmq_bind(p->router, ep), 0);
    size_t len = sizeof p->endpoint;
    assert_int_equal(zmq_getsockopt(p->router, ZMQ_LAST_ENDPOINT, p->endpoint, &len), 0);
    assert_int_equal(zmq_connect(p->dealer, p->endpoint), 0);
}

static void pair_close(pair_t *p) {
    zmq_close(p->router);
    zmq_close(p->dealer);
    if (strncmp(p->endpoint, "ipc://", 6) == 0) unlink(p->endpoint + 6);
}

static void limits(kvp_wire_limits_t *lim) {
    kvp_wire_limits_init(lim, N_LAYER, N_KV_HEAD, HEAD_DIM, MAX_TOK);
}

/* ---- one of every message, filled with non-default values ---- */

typedef struct samples {
    Kvpred__CacheShape aux, base;
    int32_t layer_map[4], tokens[3];
    Kvpred__GenParams params;
    Kvpred__TraceEvent ev[2];
    Kvpred__TraceEvent *evp[2];
    Kvpred__Hello hello;
    Kvpred__HelloReply hello_reply;
    Kvpred__Request request;
    Kvpred__Reserve reserve;
    Kvpred__Reserved reserved;
    Kvpred__Credit credit;
    Kvpred__Token token;
    Kvpred__Done done;
    Kvpred__Error error;
    Kvpred__Cancel cancel;
    Kvpred__Ping ping;
    Kvpred__Pong pong;
} samples_t;

static void samples_init(samples_t *s) {
    kvpred__cache_shape__init(&s->aux);
    s->aux.n_layer = 4, s->aux.n_kv_head = 2, s->aux.head_dim = 8;
    kvpred__cache_shape__init(&s->base);
    s->base.n_layer = 8, s->base.n_kv_head = 4, s->base.head_dim = 16;
    for (int i = 0; i < 4; i++)
        s->layer_map[i] = i / 2;
    for (int i = 0; i < 3; i++)
        s->tokens[i] = 100 + i;
    kvpred__gen_params__init(&s->params);
    s->params.n_predict = 32, s->params.temp = 0.7f, s->params.top_k = 40;
    s->params.top_p = 0.9f, s->params.seed = 1234567890123ull, s->params.ignore_eos = 1;
    for (int i = 0; i < 2; i++) {
        kvpred__trace_event__init(&s->ev[i]);
        s->ev[i].stage = "predictor", s->ev[i].event = i ? "sent" : "mapped";
        s->ev[i].wall_ns = 1700000000000000000ll + i, s->ev[i].chunk = i - 1;
        s->ev[i].host = "h1", s->ev[i].clock_offset_ns = -1234;
        s->evp[i] = &s->ev[i];
    }
    kvpred__hello__init(&s->hello);
    s->hello.protocol_version = KVP_WIRE_PROTOCOL_VERSION, s->hello.role = "predictor";
    s->hello.aux_fingerprint = "0123456789abcdef", s->hello.base_fingerprint = "fedcba9876543210";
    s->hello.predictor_fingerprint = "00112233aabbccdd";
    s->hello.n_layer_map = 4, s->hello.layer_map = s->layer_map;
    s->hello.dtype = KVPRED__DTYPE__DTYPE_F16, s->hello.aux_shape = &s->aux;
    s->hello.base_shape = &s->base, s->hello.max_message_bytes = 1ull << 33;
    s->hello.max_chunk_tokens = 64, s->hello.host = "node-a", s->hello.wall_ns = 42;
    kvpred__hello_reply__init(&s->hello_reply);
    s->hello_reply.ok = 0, s->hello_reply.field = "dtype", s->hello_reply.ours = "f32";
    s->hello_reply.theirs = "f16", s->hello_reply.message = "dtype differs";
    s->hello_reply.wall_ns = -5, s->hello_reply.host = "node-b";
    kvpred__request__init(&s->request);
    s->request.request_id = "req-1", s->request.prompt = "Once upon a time";
    s->request.n_tokens = 3, s->request.tokens = s->tokens, s->request.params = &s->params;
    s->request.mode = KVPRED__MODE__MODE_BASELINE, s->request.deadline_ms = 5000;
    s->request.chunk_tokens = 128;
    kvpred__reserve__init(&s->reserve);
    s->reserve.request_id = "req-1", s->reserve.n_prompt = 17, s->reserve.n_tokens = 1;
    s->reserve.tokens = s->tokens, s->reserve.params = &s->params;
    s->reserve.mode = KVPRED__MODE__MODE_AUX_ONLY, s->reserve.n_chunks = 3;
    s->reserve.deadline_wall_ns = 1700000000123456789ll;
    kvpred__reserved__init(&s->reserved);
    s->reserved.request_id = "req-1", s->reserved.credits = 4;
    kvpred__credit__init(&s->credit);
    s->credit.request_id = "req-1", s->credit.credits = 2;
    kvpred__token__init(&s->token);
    s->token.request_id = "req-1", s->token.index = 7, s->token.id = 31999;
    s->token.piece.data = (uint8_t *)"\xe2\x96\x81the\x00x", s->token.piece.len = 8;
    s->token.wall_ns = 99;
    kvpred__done__init(&s->done);
    s->done.request_id = "req-1", s->done.n_generated = 32, s->done.n_trace = 2;
    s->done.trace = s->evp;
    kvpred__error__init(&s->error);
    s->error.request_id = "req-1", s->error.code = KVP_ESHAPE, s->error.stage = "decoder";
    s->error.message = "chunk.n_kv_head: 3, expected 4";
    kvpred__cancel__init(&s->cancel);
    s->cancel.request_id = "req-1", s->cancel.reason = "client went away";
    kvpred__ping__init(&s->ping);
    s->ping.t0_ns = 123456789;
    kvpred__pong__init(&s->pong);
    s->pong.t0_ns = 1, s->pong.t1_ns = 2, s->pong.t2_ns = 3;
}

/* Sets env to sample body `i` (0..11); returns 0 past the last one. */
static int sample_env(samples_t *s, int i, Kvpred__Envelope *env) {
    kvpred__envelope__init(env);
    switch (i) {
    case 0:
        env->body_case = KVPRED__ENVELOPE__BODY_HELLO, env->hello = &s->hello;
        return 1;
    case 1:
        env->body_case = KVPRED__ENVELOPE__BODY_HELLO_REPLY, env->hello_reply = &s->hello_reply;
        return 1;
    case 2:
        env->body_case = KVPRED__ENVELOPE__BODY_REQUEST, env->request = &s->request;
        return 1;
    case 3:
        env->body_case = KVPRED__ENVELOPE__BODY_RESERVE, env->reserve = &s->reserve;
        return 1;
    case 4:
        env->body_case = KVPRED__ENVELOPE__BODY_RESERVED, env->reserved = &s->reserved;
        return 1;
    case 5:
        env->body_case = KVPRED__ENVELOPE__BODY_CREDIT, env->credit = &s->credit;
        return 1;
    case 6:
        env->body_case = KVPRED__ENVELOPE__BODY_TOKEN, env->token = &s->token;
        return 1;
    case 7:
        env->body_case = KVPRED__ENVELOPE__BODY_DONE, env->done = &s->done;
        return 1;
    case 8:
        env->body_case = KVPRED__ENVELOPE__BODY_ERROR, env->error = &s->error;
        return 1;
    case 9:
        env->body_case = KVPRED__ENVELOPE__BODY_CANCEL, env->cancel = &s->cancel;
        return 1;
    case 10:
        env->body_case = KVPRED__ENVELOPE__BODY_PING, env->ping = &s->ping;
        return 1;
    case 11:
        env->body_case = KVPRED__ENVELOPE__BODY_PONG, env->pong = &s->pong;
        return 1;
    default:
        return 0;
    }
}

/* Two envelopes are equal when they encode to the same bytes. */
static void assert_same_env(const Kvpred__Envelope *a, const Kvpred__Envelope *b) {
    size_t na = kvpred__envelope__get_packed_size(a), nb = kvpred__envelope__get_packed_size(b);
    assert_int_equal(na, nb);
    uint8_t *ba = malloc(na + 1), *bb = malloc(nb + 1);
    kvpred__envelope__pack(a, ba);
    kvpred__envelope__pack(b, bb);
    assert_memory_equal(ba, bb, na);
    free(ba);
    free(bb);
}

static void round_trip_all(const char *transport) {
    pair_t p;
    pair_open(&p, transport);
    kvp_wire_limits_t lim;
    limits(&lim);
    samples_t s;
    samples_init(&s);
    kvp_wire_msg_t m;
    kvp_wire_msg_init(&m);
    kvp_err_t err = {0};
    Kvpred__Envelope env;
    int n = 0;
    for (int i = 0; sample_env(&s, i, &env); i++, n++) {
        /* downstream: DEALER -> ROUTER */
        assert_int_equal(kvp_wire_send(p.dealer, &env, NULL, 0, &err), 0);
        int rc = kvp_wire_recv_from(p.router, &lim, 2000, &m, &err);
        if (rc) fail_msg("%s %s: %s", transport, kvp_wire_body_name(env.body_case), err.msg);
        assert_true(m.from.len > 0);
        assert_true(m.rx_wall_ns > 0);
        assert_int_equal(m.n_tensors, 0);
        assert_int_equal(m.env->body_case, env.body_case);
        assert_same_env(m.env, &env);
        /* and back: ROUTER -> DEALER, to the identity it came from */
        kvp_wire_id_t from = m.from;
        assert_int_equal(kvp_wire_send_to(p.router, &from, &env, NULL, 0, &err), 0);
        rc = kvp_wire_recv(p.dealer, &lim, 2000, &m, &err);
        if (rc) fail_msg("%s back %s: %s", transport, kvp_wire_body_name(env.body_case), err.msg);
        assert_int_equal(m.from.len, 0);
        assert_same_env(m.env, &env);
    }
    assert_int_equal(n, 12);
    /* the request_id accessor knows every body that has one */
    sample_env(&s, 2, &env);
    assert_string_equal(kvp_wire_request_id(&env), "req-1");
    sample_env(&s, 10, &env);
    assert_string_equal(kvp_wire_request_id(&env), "");
    /* nothing left over */
    assert_int_equal(kvp_wire_recv(p.dealer, &lim, 0, &m, &err), KVP_ETIMEOUT);
    assert_int_equal(kvp_wire_recv_from(p.router, &lim, 0, &m, &err), KVP_ETIMEOUT);
    kvp_wire_msg_free(&m);
    pair_close(&p);
}

static void every_message_round_trips_inproc(void **state) {
    (void)state;
    round_trip_all("inproc");
}
static void every_message_round_trips_tcp(void **state) {
    (void)state;
    round_trip_all("tcp");
}
static void every_message_round_trips_ipc(void **state) {
    (void)state;
    round_trip_all("ipc");
}

/* ---- chunks ---- */

static atomic_int n_freed;
static void count_free(void *data, void *hint) {
    (void)hint;
    free(data);
    atomic_fetch_add(&n_freed, 1);
}

static float value(int v, int layer, int t, int j) {
    return sinf(0.37f * (float)(v * 1000 + layer * 100 + t * WIDTH + j)) * 3.0f;
}

/* Sends layers [1, 3), positions [5, 12) of a chunk in the dtype over the
 * transport, handing the tensors over (zero-copy for f32), then checks the
 * decoded values and that every buffer was released exactly once. */
static void chunk_round_trip(const char *transport, Kvpred__DType dtype) {
    pair_t p;
    pair_open(&p, transport);
    kvp_wire_limits_t lim;
    limits(&lim);
    enum { LB = 1, LE = 3, PB = 5, PE = 12, NT = PE - PB, NL = LE - LB };
    Kvpred__Chunk c = KVPRED__CHUNK__INIT;
    Kvpred__TraceEvent ev = KVPRED__TRACE_EVENT__INIT, *evp = &ev;
    ev.stage = "aux-prefill", ev.event = "computed", ev.wall_ns = 77, ev.chunk = 0;
    c.request_id = "req-c", c.seq = 3, c.layer_begin = LB, c.layer_end = LE;
    c.pos_begin = PB, c.pos_end = PE, c.dtype = dtype, c.n_kv_head = N_KV_HEAD;
    c.head_dim = HEAD_DIM, c.last = 1, c.n_trace = 1, c.trace = &evp;
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    env.body_case = KVPRED__ENVELOPE__BODY_CHUNK, env.chunk = &c;
    kvp_wire_tensor_t t[2 * NL];
    for (int v = 0; v < 2; v++)
        for (int l = 0; l < NL; l++) {
            float *buf = malloc(NT * WIDTH * sizeof *buf);
            for (int i = 0; i < NT; i++)
                for (int j = 0; j < WIDTH; j++)
                    buf[i * WIDTH + j] = value(v, LB + l, PB + i, j);
            t[v * NL + l] = (kvp_wire_tensor_t){buf, NT * WIDTH, count_free, NULL};
        }
    atomic_store(&n_freed, 0);
    kvp_err_t err = {0};
    assert_int_equal(kvp_wire_send(p.dealer, &env, t, 2 * NL, &err), 0);
    kvp_wire_msg_t m;
    kvp_wire_msg_init(&m);
    int rc = kvp_wire_recv_from(p.router, &lim, 2000, &m, &err);
    if (rc) fail_msg("%s: %s", transport, err.msg);
    assert_int_equal(m.n_tensors, 2 * NL);
    assert_same_env(m.env, &env);
    size_t nb;
    assert_non_null(kvp_wire_tensor_bytes(&m, 0, &nb));
    assert_int_equal(nb, NT * WIDTH * (dtype == KVPRED__DTYPE__DTYPE_F16 ? 2 : 4));
    assert_int_equal(kvp_wire_chunk_frame_bytes(m.env->chunk), nb);
    float got[NT * WIDTH];
    for (int v = 0; v < 2; v++)
        for (int l = LB; l < LE; l++) {
            assert_int_equal(kvp_wire_chunk_read(&m, v, (uint32_t)l, got, NT * WIDTH, &err), 0);
            for (int i = 0; i < NT; i++)
                for (int j = 0; j < WIDTH; j++) {
                    float want = value(v, l, PB + i, j), g = got[i * WIDTH + j];
                    if (dtype == KVPRED__DTYPE__DTYPE_F32)
                        assert_true(g == want);
                    else
                        assert_true(fabsf(g - want) <= fabsf(want) * 0x1p-11f + 0x1p-24f);
                }
        }
    /* out of range / wrong buffer */
    assert_int_equal(kvp_wire_chunk_read(&m, 0, 0, got, NT * WIDTH, &err), KVP_ERANGE);
    assert_non_null(strstr(err.msg, "layer 0 outside [1, 3)"));
    assert_int_equal(kvp_wire_chunk_read(&m, 0, 1, got, 5, &err), KVP_EINVAL);
    kvp_wire_msg_free(&m);
    /* every handed-over buffer is released once (from an I/O thread on tcp/ipc) */
    double t0 = kvp_now();
    while (atomic_load(&n_freed) < 2 * NL && kvp_now() - t0 < 2.0)
        usleep(1000);
    assert_int_equal(atomic_load(&n_freed), 2 * NL);
    pair_close(&p);
}

static void chunk_f32_round_trips_exactly(void **state) {
    (void)state;
    chunk_round_trip("inproc", KVPRED__DTYPE__DTYPE_F32);
    chunk_round_trip("tcp", KVPRED__DTYPE__DTYPE_F32);
    chunk_round_trip("ipc", KVPRED__DTYPE__DTYPE_F32);
}

static void chunk_f16_round_trips_within_rounding(void **state) {
    (void)state;
    chunk_round_trip("inproc", KVPRED__DTYPE__DTYPE_F16);
    chunk_round_trip("tcp", KVPRED__DTYPE__DTYPE_F16);
    chunk_round_trip("ipc", KVPRED__DTYPE__DTYPE_F16);
}

/* Copied tensors (no free_fn) stay the caller's; a send refused for a
 * mismatch still releases handed-over buffers. */
static void chunk_send_checks_tensors_and_keeps_ownership_rules(void **state) {
    (void)state;
    pair_t p;
    pair_open(&p, "inproc");
    Kvpred__Chunk c = KVPRED__CHUNK__INIT;
    c.request_id = "r", c.layer_begin = 0, c.layer_end = 1, c.pos_begin = 0, c.pos_end = 2;
    c.n_kv_head = N_KV_HEAD, c.head_dim = HEAD_DIM;
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    env.body_case = KVPRED__ENVELOPE__BODY_CHUNK, env.chunk = &c;
    float k[2 * WIDTH], v[2 * WIDTH];
    for (int i = 0; i < 2 * WIDTH; i++)
        k[i] = (float)i, v[i] = -(float)i;
    kvp_wire_tensor_t t[2] = {{k, 2 * WIDTH, NULL, NULL}, {v, 2 * WIDTH, NULL, NULL}};
    kvp_err_t err = {0};
    assert_int_equal(kvp_wire_send(p.dealer, &env, t, 2, &err), 0);
    k[0] = 1000.0f; /* copied at send: changing it now does not matter */
    kvp_wire_limits_t lim;
    limits(&lim);
    kvp_wire_msg_t m;
    kvp_wire_msg_init(&m);
    assert_int_equal(kvp_wire_recv_from(p.router, &lim, 1000, &m, &err), 0);
    float got[2 * WIDTH];
    assert_int_equal(kvp_wire_chunk_read(&m, 0, 0, got, 2 * WIDTH, &err), 0);
    assert_true(got[0] == 0.0f && got[5] == 5.0f);
    /* one tensor too few: refused, the handed-over buffer is freed */
    atomic_store(&n_freed, 0);
    float *owned = malloc(2 * WIDTH * sizeof *owned);
    kvp_wire_tensor_t one = {owned, 2 * WIDTH, count_free, NULL};
    assert_int_equal(kvp_wire_send(p.dealer, &env, &one, 1, &err), KVP_EINVAL);
    assert_non_null(strstr(err.msg, "1 tensor frames, layers [0, 1) need 2"));
    assert_int_equal(atomic_load(&n_freed), 1);
    /* wrong size */
    t[1].n_values = 3;
    assert_int_equal(kvp_wire_send(p.dealer, &env, t, 2, &err), KVP_EINVAL);
    assert_non_null(strstr(err.msg, "tensor 1 has 3 values, expected 32"));
    /* tensors on a message that is not a chunk */
    Kvpred__Ping ping = KVPRED__PING__INIT;
    env.body_case = KVPRED__ENVELOPE__BODY_PING, env.ping = &ping;
    assert_int_equal(kvp_wire_send(p.dealer, &env, t, 2, &err), KVP_EINVAL);
    /* ROUTER to a peer that is not there (ROUTER_MANDATORY) */
    int one_i = 1;
    zmq_setsockopt(p.router, ZMQ_ROUTER_MANDATORY, &one_i, sizeof one_i);
    kvp_wire_id_t nobody = {.bytes = {9, 9, 9}, .len = 3};
    assert_int_equal(kvp_wire_send_to(p.router, &nobody, &env, NULL, 0, &err), KVP_EIO);
    assert_non_null(strstr(err.msg, "peer 090909 unreachable"));
    kvp_wire_msg_free(&m);
    pair_close(&p);
}

/* ---- malformed messages ---- */

/* Sends n raw frames on sock as one message. */
static void send_raw(void *sock, const void *const *data, const size_t *len, int n) {
    for (int i = 0; i < n; i++)
        assert_true(zmq_send(sock, data[i], len[i], i + 1 < n ? ZMQ_SNDMORE : 0) >= 0);
}

static size_t pack_env(const Kvpred__Envelope *env, uint8_t **out) {
    size_t n = kvpred__envelope__get_packed_size(env);
    *out = malloc(n + 1);
    kvpred__envelope__pack(env, *out);
    return n;
}

static void chunk_header(Kvpred__Chunk *c, Kvpred__Envelope *env) {
    kvpred__chunk__init(c);
    c->request_id = "req-bad", c->layer_begin = 0, c->layer_end = 1;
    c->pos_begin = 0, c->pos_end = 4, c->dtype = KVPRED__DTYPE__DTYPE_F16;
    c->n_kv_head = N_KV_HEAD, c->head_dim = HEAD_DIM;
    kvpred__envelope__init(env);
    env->body_case = KVPRED__ENVELOPE__BODY_CHUNK, env->chunk = c;
}

typedef struct bad_ctx {
    pair_t p;
    kvp_wire_limits_t lim;
    kvp_wire_msg_t m;
    char last_request_id[64]; /* of the last refused message, as the Error carried it */
} bad_ctx_t;

/* Receives what was sent, expects code and `field` in the message, then
 * replies with an Error naming it (the dealer must see it) and checks that
 * the next message on the socket arrives intact. */
static void expect_refused(bad_ctx_t *b, int code, const char *field) {
    kvp_err_t err = {0};
    int rc = kvp_wire_recv_from(b->p.router, &b->lim, 1000, &b->m, &err);
    if (rc != code || !strstr(err.msg, field))
        fail_msg("expected %d naming '%s', got %d: %s", code, field, rc, err.msg);
    assert_true(b->m.from.len > 0);
    kvp_wire_id_t from = b->m.from;
    char msg[KVP_ERR_MSG_MAX];
    snprintf(msg, sizeof msg, "%s", err.msg);
    kvp_err_t e2 = {0};
    assert_int_equal(kvp_wire_send_error(b->p.router, &from, kvp_wire_request_id(b->m.env), rc,
                                         "predictor", msg, &e2),
                     0);
    kvp_wire_msg_t r;
    kvp_wire_msg_init(&r);
    assert_int_equal(kvp_wire_recv(b->p.dealer, &b->lim, 1000, &r, &e2), 0);
    assert_int_equal(r.env->body_case, KVPRED__ENVELOPE__BODY_ERROR);
    assert_int_equal(r.env->error->code, code);
    assert_string_equal(r.env->error->stage, "predictor");
    assert_non_null(strstr(r.env->error->message, field));
    snprintf(b->last_request_id, sizeof b->last_request_id, "%s", r.env->error->request_id);
    kvp_wire_msg_free(&r);
    /* the socket is at a message boundary */
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    Kvpred__Ping ping = KVPRED__PING__INIT;
    ping.t0_ns = 5;
    env.body_case = KVPRED__ENVELOPE__BODY_PING, env.ping = &ping;
    assert_int_equal(kvp_wire_send(b->p.dealer, &env, NULL, 0, &e2), 0);
    assert_int_equal(kvp_wire_recv_from(b->p.router, &b->lim, 1000, &b->m, &e2), 0);
    assert_int_equal(b->m.env->body_case, KVPRED__ENVELOPE__BODY_PING);
    assert_int_equal(b->m.env->ping->t0_ns, 5);
}

static int bad_setup(void **state) {
    bad_ctx_t *b = calloc(1, sizeof *b);
    pair_open(&b->p, "inproc");
    limits(&b->lim);
    kvp_wire_msg_init(&b->m);
    *state = b;
    return 0;
}

static int bad_teardown(void **state) {
    bad_ctx_t *b = *state;
    kvp_wire_msg_free(&b->m);
    pair_close(&b->p);
    free(b);
    return 0;
}

static void garbage_and_truncated_protobuf_refused(void **state) {
    bad_ctx_t *b = *state;
    const char garbage[] = "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01garbage";
    const void *d[] = {garbage};
    size_t l[] = {sizeof garbage - 1};
    send_raw(b->p.dealer, d, l, 1);
    expect_refused(b, KVP_EFORMAT, "Envelope: not a valid protobuf");

    samples_t s;
    samples_init(&s);
    Kvpred__Envelope env;
    sample_env(&s, 2, &env);
    uint8_t *buf;
    size_t n = pack_env(&env, &buf);
    d[0] = buf, l[0] = n / 2;
    send_raw(b->p.dealer, d, l, 1);
    expect_refused(b, KVP_EFORMAT, "Envelope: not a valid protobuf");
    free(buf);

    /* an empty frame: a valid, empty Envelope without a body */
    d[0] = "", l[0] = 0;
    send_raw(b->p.dealer, d, l, 1);
    expect_refused(b, KVP_EFORMAT, "Envelope body: none set");
}

static void unknown_body_refused(void **state) {
    bad_ctx_t *b = *state;
    /* field 20 (tag varint 0xa0 0x01), varint 1: a body this version does not know */
    const uint8_t unknown[] = {0xa0, 0x01, 0x01};
    const void *d[] = {unknown};
    size_t l[] = {sizeof unknown};
    send_raw(b->p.dealer, d, l, 1);
    expect_refused(b, KVP_EFORMAT, "Envelope body: none set, or unknown");
}

static void too_many_frames_refused(void **state) {
    bad_ctx_t *b = *state;
    Kvpred__Chunk c;
    Kvpred__Envelope env;
    chunk_header(&c, &env);
    uint8_t *hdr;
    size_t n = pack_env(&env, &hdr);
    const void *d[12];
    size_t l[12];
    d[0] = hdr, l[0] = n;
    for (int i = 1; i < 12; i++)
        d[i] = "x", l[i] = 1;
    send_raw(b->p.dealer, d, l, 12);
    expect_refused(b, KVP_ENOMEM, "message frames: 12, over max_frames 9");
    /* a non-chunk message with a tensor frame */
    Kvpred__Ping ping = KVPRED__PING__INIT;
    kvpred__envelope__init(&env);
    env.body_case = KVPRED__ENVELOPE__BODY_PING, env.ping = &ping;
    free(hdr);
    n = pack_env(&env, &hdr);
    d[0] = hdr, l[0] = n;
    send_raw(b->p.dealer, d, l, 2);
    expect_refused(b, KVP_EFORMAT, "Ping frames: 1 after the header, expected none");
    free(hdr);
}

/* Sends a chunk header with the given frames, each `bytes` long except
 * frame `short_one` (one byte less). */
static void send_chunk(bad_ctx_t *b, const Kvpred__Envelope *env, int n_frames, size_t bytes,
                       int short_one) {
    uint8_t *hdr;
    size_t n = pack_env(env, &hdr);
    const void *d[16];
    size_t l[16];
    static uint8_t zeros[1 << 16];
    d[0] = hdr, l[0] = n;
    for (int i = 0; i < n_frames; i++)
        d[1 + i] = zeros, l[1 + i] = bytes - (i == short_one);
    send_raw(b->p.dealer, d, l, 1 + n_frames);
    free(hdr);
}

static void chunk_frames_wrong_count_or_size_refused(void **state) {
    bad_ctx_t *b = *state;
    Kvpred__Chunk c;
    Kvpred__Envelope env;
    chunk_header(&c, &env);
    size_t fb = 4 * WIDTH * 2; /* 4 tokens, f16 */
    send_chunk(b, &env, 2, fb, -1);
    kvp_err_t err;
    assert_int_equal(kvp_wire_recv_from(b->p.router, &b->lim, 1000, &b->m, &err), 0);
    send_chunk(b, &env, 3, fb, -1);
    expect_refused(b, KVP_EFORMAT, "chunk frames: 3 tensor frames, layers [0, 1) need 2");
    send_chunk(b, &env, 1, fb, -1);
    expect_refused(b, KVP_EFORMAT, "chunk frames: 1 tensor frames");
    send_chunk(b, &env, 2, fb, 1);
    expect_refused(b, KVP_EFORMAT,
                   "chunk frame 1 (V layer 0): 127 bytes, expected 128 "
                   "(4 tokens x 2 heads x 8 dims x f16)");
    c.dtype = KVPRED__DTYPE__DTYPE_F32; /* f16-sized frames under an f32 header */
    send_chunk(b, &env, 2, fb, -1);
    expect_refused(b, KVP_EFORMAT, "chunk frame 0 (K layer 0): 128 bytes, expected 256");
    /* the refused message still gives the request id for the Error */
    assert_string_equal(b->last_request_id, "req-bad");
    c.dtype = 7;
    send_chunk(b, &env, 2, fb, -1);
    expect_refused(b, KVP_EFORMAT, "chunk.dtype: 7 unknown");
}

static void chunk_ranges_and_shape_refused(void **state) {
    bad_ctx_t *b = *state;
    Kvpred__Chunk c;
    Kvpred__Envelope env;
    size_t fb = 4 * WIDTH * 2;

    chunk_header(&c, &env);
    c.layer_begin = 3, c.layer_end = 1;
    send_chunk(b, &env, 2, fb, -1);
    expect_refused(b, KVP_EFORMAT, "chunk layer range: layer_begin 3 >= layer_end 1");

    chunk_header(&c, &env);
    c.layer_begin = 3, c.layer_end = 5;
    send_chunk(b, &env, 4, fb, -1);
    expect_refused(b, KVP_EFORMAT, "chunk.layer_end: 5 beyond n_layer 4");

    chunk_header(&c, &env);
    c.pos_begin = 9, c.pos_end = 2;
    send_chunk(b, &env, 2, fb, -1);
    expect_refused(b, KVP_EFORMAT, "chunk pos range: pos_begin 9 >= pos_end 2");

    chunk_header(&c, &env);
    c.pos_begin = 100, c.pos_end = 117;
    send_chunk(b, &env, 2, 17 * WIDTH * 2, -1);
    expect_refused(b, KVP_ENOMEM,
                   "chunk pos range: [100, 117) is 17 tokens, over max_chunk_tokens 16");

    b->lim.max_pos = 64;
    chunk_header(&c, &env);
    c.pos_begin = 62, c.pos_end = 66;
    send_chunk(b, &env, 2, fb, -1);
    expect_refused(b, KVP_EFORMAT, "chunk.pos_end: 66 beyond max_pos 64");
    b->lim.max_pos = 0;

    chunk_header(&c, &env);
    c.n_kv_head = 3;
    send_chunk(b, &env, 2, 4 * 3 * HEAD_DIM * 2, -1);
    expect_refused(b, KVP_EFORMAT, "chunk.n_kv_head: 3, expected 2");

    chunk_header(&c, &env);
    c.head_dim = 16;
    send_chunk(b, &env, 2, 4 * N_KV_HEAD * 16 * 2, -1);
    expect_refused(b, KVP_EFORMAT, "chunk.head_dim: 16, expected 8");

    /* a link without a chunk shape takes no chunks (nor their frames) */
    kvp_wire_limits_init(&b->lim, 0, 0, 0, 0);
    chunk_header(&c, &env);
    send_chunk(b, &env, 2, fb, -1);
    expect_refused(b, KVP_ENOMEM, "message frames: 3, over max_frames 1");
    send_chunk(b, &env, 0, fb, -1);
    expect_refused(b, KVP_EFORMAT, "Chunk: not expected on this link");
}

static void oversized_messages_refused(void **state) {
    bad_ctx_t *b = *state;
    /* a Request over the total byte limit */
    size_t big = 100000;
    char *prompt = malloc(big + 1);
    memset(prompt, 'a', big);
    prompt[big] = 0;
    Kvpred__Request req = KVPRED__REQUEST__INIT;
    req.request_id = "req-big", req.prompt = prompt;
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    env.body_case = KVPRED__ENVELOPE__BODY_REQUEST, env.request = &req;
    uint8_t *hdr;
    size_t n = pack_env(&env, &hdr);
    b->lim.max_bytes = 65536;
    const void *d[] = {hdr};
    size_t l[] = {n};
    send_raw(b->p.dealer, d, l, 1);
    char want[128];
    snprintf(want, sizeof want, "message bytes: %zu, over max_bytes 65536", n);
    expect_refused(b, KVP_ENOMEM, want);
    /* the header frame over its own limit */
    limits(&b->lim);
    b->lim.max_header_bytes = 4096;
    send_raw(b->p.dealer, d, l, 1);
    snprintf(want, sizeof want, "Envelope frame: %zu bytes, over max_header_bytes 4096", n);
    expect_refused(b, KVP_ENOMEM, want);
    free(hdr);
    free(prompt);
}

/* ---- Hello comparison ---- */

static void hello_compare_names_first_difference(void **state) {
    (void)state;
    samples_t a, b;
    samples_init(&a);
    samples_init(&b);
    kvp_wire_hello_diff_t d;
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 0);
    /* role, host and wall_ns are not compared */
    b.hello.role = "decoder", b.hello.host = "elsewhere", b.hello.wall_ns = 1;
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 0);

    b.hello.base_fingerprint = "9f8e7d6c5b4a3921";
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 1);
    assert_string_equal(d.field, "base_fingerprint");
    assert_string_equal(d.ours, "fedcba9876543210");
    assert_string_equal(d.theirs, "9f8e7d6c5b4a3921");
    /* masked out: agrees */
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello,
                                            KVP_WIRE_HELLO_ALL & ~KVP_WIRE_HELLO_BASE_FINGERPRINT,
                                            &d),
                     0);
    /* an earlier field wins */
    b.hello.protocol_version = 2;
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 1);
    assert_string_equal(d.field, "protocol_version");
    assert_string_equal(d.theirs, "2");
    samples_init(&b);

    int32_t map2[4] = {0, 0, 1, 2};
    b.hello.layer_map = map2;
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 1);
    assert_string_equal(d.field, "layer_map");
    assert_string_equal(d.ours, "[0,0,1,1]");
    assert_string_equal(d.theirs, "[0,0,1,2]");
    b.hello.n_layer_map = 3;
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 1);
    assert_string_equal(d.theirs, "[0,0,1]");
    /* long maps print from near the first difference */
    int32_t big1[80], big2[80];
    for (int i = 0; i < 80; i++)
        big1[i] = big2[i] = i / 2;
    big2[60] = 99;
    a.hello.layer_map = big1, a.hello.n_layer_map = 80;
    b.hello.layer_map = big2, b.hello.n_layer_map = 80;
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 1);
    assert_non_null(strstr(d.ours, "[@58: 29,29,30,"));
    assert_non_null(strstr(d.theirs, "[@58: 29,29,99,"));
    assert_non_null(strstr(d.theirs, "(n=80)"));
    samples_init(&a);
    samples_init(&b);

    b.hello.dtype = KVPRED__DTYPE__DTYPE_F32;
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 1);
    assert_string_equal(d.field, "dtype");
    assert_string_equal(d.ours, "f16");
    assert_string_equal(d.theirs, "f32");
    samples_init(&b);

    b.base.n_kv_head = 12;
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 1);
    assert_string_equal(d.field, "base_shape.n_kv_head");
    assert_string_equal(d.ours, "4");
    assert_string_equal(d.theirs, "12");
    b.hello.base_shape = NULL; /* missing compares as zeros */
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 1);
    assert_string_equal(d.field, "base_shape.n_layer");
    assert_string_equal(d.theirs, "0");
    samples_init(&b);

    b.hello.max_chunk_tokens = 65;
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 1);
    assert_string_equal(d.field, "max_chunk_tokens");
    b.hello.max_chunk_tokens = 64, b.hello.max_message_bytes = 1;
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 1);
    assert_string_equal(d.field, "max_message_bytes");
    assert_string_equal(d.ours, "8589934592");

    /* long strings are cut, not overrun */
    char longfp[400];
    memset(longfp, 'f', sizeof longfp - 1);
    longfp[sizeof longfp - 1] = 0;
    samples_init(&b);
    b.hello.aux_fingerprint = longfp;
    assert_int_equal(kvp_wire_hello_compare(&a.hello, &b.hello, KVP_WIRE_HELLO_ALL, &d), 1);
    assert_int_equal(strlen(d.theirs), sizeof d.theirs - 1);
    assert_string_equal(d.theirs + sizeof d.theirs - 4, "...");
}

static void recv_times_out_when_nothing_arrives(void **state) {
    (void)state;
    pair_t p;
    pair_open(&p, "inproc");
    kvp_wire_limits_t lim;
    limits(&lim);
    kvp_wire_msg_t m;
    kvp_wire_msg_init(&m);
    kvp_err_t err;
    assert_int_equal(kvp_wire_recv(p.dealer, &lim, 0, &m, &err), KVP_ETIMEOUT);
    double t0 = kvp_now();
    assert_int_equal(kvp_wire_recv_from(p.router, &lim, 30, &m, &err), KVP_ETIMEOUT);
    assert_true(kvp_now() - t0 >= 0.025);
    assert_non_null(strstr(err.msg, "no message within 30 ms"));
    kvp_wire_msg_free(&m);
    pair_close(&p);
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
        cmocka_unit_test(every_message_round_trips_inproc),
        cmocka_unit_test(every_message_round_trips_tcp),
        cmocka_unit_test(every_message_round_trips_ipc),
        cmocka_unit_test(chunk_f32_round_trips_exactly),
        cmocka_unit_test(chunk_f16_round_trips_within_rounding),
        cmocka_unit_test(chunk_send_checks_tensors_and_keeps_ownership_rules),
        cmocka_unit_test_setup_teardown(garbage_and_truncated_protobuf_refused, bad_setup,
                                        bad_teardown),
        cmocka_unit_test_setup_teardown(unknown_body_refused, bad_setup, bad_teardown),
        cmocka_unit_test_setup_teardown(too_many_frames_refused, bad_setup, bad_teardown),
        cmocka_unit_test_setup_teardown(chunk_frames_wrong_count_or_size_refused, bad_setup,
                                        bad_teardown),
        cmocka_unit_test_setup_teardown(chunk_ranges_and_shape_refused, bad_setup, bad_teardown),
        cmocka_unit_test_setup_teardown(oversized_messages_refused, bad_setup, bad_teardown),
        cmocka_unit_test(hello_compare_names_first_difference),
        cmocka_unit_test(recv_times_out_when_nothing_arrives),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
