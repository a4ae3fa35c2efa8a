#include "kvp_client.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <zmq.h>

#include "kvp_time.h"
#include "kvp_wire.h"

struct kvp_client {
    void *ctx;
    int own_ctx;
    kvp_link_dealer_t *link;
    kvp_wire_limits_t lim;
    char host[KVP_TRACE_HOST_MAX];
};

void kvp_client_result_free(kvp_client_result_t *r) {
    free(r->tokens);
    free(r->text);
    free(r->events);
    memset(r, 0, sizeof *r);
}

static int pump(kvp_client_t *c, int timeout_ms, kvp_wire_msg_t *m, kvp_err_t *err);

int kvp_client_new(kvp_client_t **out, void *zmq_ctx, const char *endpoint,
                   const kvp_link_curve_t *curve, double wait_s, kvp_err_t *err) {
    *out = NULL;
    kvp_client_t *c = calloc(1, sizeof *c);
    if (!c) return kvp_err_set(err, KVP_ENOMEM, "client: out of memory");
    if (gethostname(c->host, sizeof c->host - 1)) snprintf(c->host, sizeof c->host, "localhost");
    c->ctx = zmq_ctx;
    if (!c->ctx) {
        c->ctx = zmq_ctx_new();
        c->own_ctx = 1;
    }
    Kvpred__Hello h = KVPRED__HELLO__INIT;
    h.role = (char *)KVP_STAGE_CLIENT;
    kvp_link_settings_t ls;
    kvp_link_settings_init(&ls);
    ls.name = KVP_STAGE_CLIENT;
    ls.peer_name = KVP_STAGE_AUX;
    ls.curve = curve;
    kvp_wire_limits_init(&c->lim, 0, 0, 0, 0);
    int rc = kvp_link_dealer_new(&c->link, c->ctx, endpoint, &h, &ls, kvp_now(), err);
    kvp_wire_msg_t m;
    kvp_wire_msg_init(&m);
    double end = kvp_now() + wait_s;
    while (!rc && kvp_link_dealer_state(c->link) != KVP_LINK_READY) {
        if (kvp_now() > end) {
            rc = kvp_err_set(err, KVP_ETIMEOUT,
                             "no answer from aux-prefill at %s within %.1f s (is the pipeline "
                             "running? `kvpred up` starts it)",
                             endpoint, wait_s);
            break;
        }
        rc = pump(c, 20, &m, err);
        if (!rc && kvp_link_dealer_state(c->link) == KVP_LINK_REFUSED)
            rc = kvp_err_set(err, KVP_EPEER, "aux-prefill at %s refused the handshake", endpoint);
    }
    kvp_wire_msg_free(&m);
    if (rc) {
        kvp_client_free(&c);
        return rc;
    }
    *out = c;
    return KVP_OK;
}

void kvp_client_free(kvp_client_t **c) {
    if (!c || !*c) return;
    kvp_link_dealer_free(&(*c)->link);
    if ((*c)->own_ctx) zmq_ctx_term((*c)->ctx);
    free(*c);
    *c = NULL;
}

/* Link housekeeping only (handshake, pings): used while waiting to connect. */
static int pump(kvp_client_t *c, int timeout_ms, kvp_wire_msg_t *m, kvp_err_t *err) {
    zmq_pollitem_t it = {kvp_link_dealer_socket(c->link), 0, ZMQ_POLLIN, 0};
    zmq_poll(&it, 1, timeout_ms);
    for (;;) {
        int rc = kvp_wire_recv(kvp_link_dealer_socket(c->link), &c->lim, 0, m, err);
        if (rc == KVP_ETIMEOUT) break;
        if (rc) continue;
        rc = kvp_link_dealer_handle(c->link, m, kvp_now(), err);
        if (rc < 0) return rc;
    }
    kvp_link_dealer_tick(c->link, kvp_now(), err);
    return KVP_OK;
}

/* ---- running requests ----------------------------------------------------- */

typedef struct {
    kvp_client_t *c;
    const kvp_client_req_t *reqs;
    kvp_client_result_t *res;
    size_t n, next, done;
    int *state; /* 0 not sent, 1 in flight, 2 ended */
    size_t cap_text;
} run_t;

static void add_event(kvp_client_t *c, kvp_client_result_t *r, const char *event) {
    kvp_trace_rec_t *e = realloc(r->events, (r->n_events + 1) * sizeof *e);
    if (!e) return;
    r->events = e;
    kvp_trace_rec_t *x = &e[r->n_events++];
    memset(x, 0, sizeof *x);
    snprintf(x->request_id, sizeof x->request_id, "%s", r->id);
    snprintf(x->stage, sizeof x->stage, "%s", KVP_STAGE_CLIENT);
    snprintf(x->host, sizeof x->host, "%s", c->host);
    snprintf(x->event, sizeof x->event, "%s", event);
    x->pid = (int32_t)getpid();
    x->chunk = -1;
    x->wall_ns = kvp_wall_ns();
    /* our clock minus the entry clock: minus (aux-prefill's clock minus ours) */
    int64_t off = 0, rtt = 0;
    if (!kvp_link_dealer_clock(c->link, &off, &rtt)) {
        x->offset_ns = -off;
        x->offset_err_ns = rtt / 2;
    }
}

static int send_req(run_t *rn, size_t i, kvp_err_t *err) {
    const kvp_client_req_t *q = &rn->reqs[i];
    kvp_client_result_t *r = &rn->res[i];
    snprintf(r->id, sizeof r->id, "%s", q->id);
    Kvpred__GenParams gp = KVPRED__GEN_PARAMS__INIT;
    gp.n_predict = (uint32_t)q->n_predict;
    gp.temp = q->temp;
    gp.top_k = (uint32_t)q->top_k;
    gp.top_p = q->top_p > 0 ? q->top_p : 1.0f;
    gp.seed = q->seed;
    gp.ignore_eos = q->ignore_eos;
    Kvpred__Request rq = KVPRED__REQUEST__INIT;
    rq.request_id = (char *)q->id;
    rq.prompt = (char *)(q->prompt ? q->prompt : "");
    rq.tokens = (int32_t *)q->tokens;
    rq.n_tokens = q->n_tokens;
    rq.params = &gp;
    rq.mode = (Kvpred__Mode)q->mode;
    rq.deadline_ms = (uint32_t)q->deadline_ms;
    rq.chunk_tokens = (uint32_t)q->chunk_tokens;
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    env.body_case = KVPRED__ENVELOPE__BODY_REQUEST;
    env.request = &rq;
    add_event(rn->c, r, KVP_EV_CLIENT_SEND);
    int rc = kvp_wire_send(kvp_link_dealer_socket(rn->c->link), &env, NULL, 0, err);
    rn->state[i] = rc ? 2 : 1;
    if (rc) {
        r->code = rc;
        snprintf(r->stage, sizeof r->stage, "client");
        snprintf(r->error, sizeof r->error, "sending: %.480s", err->msg);
        rn->done++;
    }
    return KVP_OK;
}

static long find(run_t *rn, const char *id) {
    for (size_t i = 0; i < rn->n; i++)
        if (rn->state[i] == 1 && !strcmp(rn->res[i].id, id)) return (long)i;
    return -1;
}

static void on_token(run_t *rn, size_t i, const Kvpred__Token *t, kvp_client_token_cb cb,
                     void *user) {
    kvp_client_result_t *r = &rn->res[i];
    int32_t *nt = realloc(r->tokens, sizeof(int32_t) * (size_t)(r->n_tokens + 1));
    char *tx = realloc(r->text, r->text_len + t->piece.len + 1);
    if (nt) r->tokens = nt;
    if (tx) r->text = tx;
    if (!nt || !tx) return;
    if (r->n_tokens == 0) add_event(rn->c, r, KVP_EV_CLIENT_FIRST_TOKEN);
    r->tokens[r->n_tokens++] = t->id;
    if (t->piece.len) /* an empty piece (a control token) may have no data */
        memcpy(r->text + r->text_len, t->piece.data, t->piece.len);
    r->text_len += t->piece.len;
    r->text[r->text_len] = 0;
    if (cb) cb(user, i, t->id, t->piece.data, t->piece.len);
}

static void on_done(run_t *rn, size_t i, const Kvpred__Done *d) {
    kvp_client_result_t *r = &rn->res[i];
    add_event(rn->c, r, KVP_EV_CLIENT_DONE);
    kvp_trace_rec_t *e = realloc(r->events, (r->n_events + d->n_trace) * sizeof *e);
    if (e) {
        r->events = e;
        for (size_t k = 0; k < d->n_trace; k++) {
            const Kvpred__TraceEvent *t = d->trace[k];
            kvp_trace_rec_t *x = &e[r->n_events++];
            memset(x, 0, sizeof *x);
            snprintf(x->request_id, sizeof x->request_id, "%s", r->id);
            snprintf(x->stage, sizeof x->stage, "%s", t->stage ? t->stage : "");
            snprintf(x->host, sizeof x->host, "%s", t->host ? t->host : "");
            snprintf(x->event, sizeof x->event, "%s", t->event ? t->event : "");
            x->chunk = t->chunk;
            x->wall_ns = t->wall_ns;
            x->offset_ns = t->clock_offset_ns;
            x->offset_err_ns = t->clock_offset_err_ns;
            for (size_t j = 0; j < t->n_nums && x->n_nums < KVP_TRACE_NUMS_MAX; j++) {
                snprintf(x->nums[x->n_nums].key, sizeof x->nums[0].key, "%s",
                         t->nums[j]->key ? t->nums[j]->key : "");
                x->nums[x->n_nums++].v = t->nums[j]->value;
            }
        }
    }
    if (!r->text) r->text = calloc(1, 1);
    rn->state[i] = 2;
    rn->done++;
}

static void on_error(run_t *rn, size_t i, const Kvpred__Error *e) {
    kvp_client_result_t *r = &rn->res[i];
    r->code = e->code ? e->code : KVP_EPEER;
    snprintf(r->stage, sizeof r->stage, "%s", e->stage ? e->stage : "?");
    snprintf(r->error, sizeof r->error, "%s", e->message ? e->message : "");
    rn->state[i] = 2;
    rn->done++;
}

static void fail_open(run_t *rn, int code, const char *msg) {
    for (size_t i = 0; i < rn->n; i++)
        if (rn->state[i] != 2) {
            kvp_client_result_t *r = &rn->res[i];
            snprintf(r->id, sizeof r->id, "%s", rn->reqs[i].id);
            r->code = code;
            snprintf(r->stage, sizeof r->stage, "client");
            snprintf(r->error, sizeof r->error, "%s", msg);
            rn->state[i] = 2;
            rn->done++;
        }
}

int kvp_client_run(kvp_client_t *c, const kvp_client_req_t *reqs, size_t n, int concurrency,
                   double timeout_s, kvp_client_token_cb cb, void *user,
                   kvp_client_result_t *results, kvp_err_t *err) {
    memset(results, 0, n * sizeof *results);
    run_t rn = {.c = c, .reqs = reqs, .res = results, .n = n, .state = calloc(n + 1, sizeof(int))};
    if (!rn.state) return kvp_err_set(err, KVP_ENOMEM, "client: out of memory");
    if (concurrency < 1) concurrency = 1;
    kvp_wire_msg_t m;
    kvp_wire_msg_init(&m);
    double end = kvp_now() + timeout_s;
    int rc = KVP_OK;
    while (rn.done < n) {
        while (rn.next < n && (int)(rn.next - rn.done) < concurrency)
            send_req(&rn, rn.next++, err);
        double now = kvp_now();
        if (now > end) {
            char msg[128];
            snprintf(msg, sizeof msg, "no answer within %.1f s", timeout_s);
            fail_open(&rn, KVP_ETIMEOUT, msg);
            break;
        }
        zmq_pollitem_t it = {kvp_link_dealer_socket(c->link), 0, ZMQ_POLLIN, 0};
        zmq_poll(&it, 1, 50);
        for (;;) {
            kvp_err_t e2 = {0};
            int r = kvp_wire_recv(kvp_link_dealer_socket(c->link), &c->lim, 0, &m, &e2);
            if (r == KVP_ETIMEOUT) break;
            if (r) continue;
            r = kvp_link_dealer_handle(c->link, &m, kvp_now(), &e2);
            if (r < 0) {
                fail_open(&rn, r, e2.msg);
                continue;
            }
            if (r != KVP_LINK_APP) continue;
            long i = find(&rn, kvp_wire_request_id(m.env));
            if (i < 0) continue;
            switch (m.env->body_case) {
            case KVPRED__ENVELOPE__BODY_TOKEN:
                on_token(&rn, (size_t)i, m.env->token, cb, user);
                break;
            case KVPRED__ENVELOPE__BODY_DONE:
                on_done(&rn, (size_t)i, m.env->done);
                break;
            case KVPRED__ENVELOPE__BODY_ERROR:
                on_error(&rn, (size_t)i, m.env->error);
                break;
            default:
                break;
            }
        }
        kvp_err_t e3 = {0};
        if (kvp_link_dealer_tick(c->link, kvp_now(), &e3) == KVP_ETIMEOUT)
            fail_open(&rn, KVP_ETIMEOUT, e3.msg);
    }
    kvp_wire_msg_free(&m);
    free(rn.state);
    return rc;
}
