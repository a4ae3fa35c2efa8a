#include "kvp_svc_util.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <zmq.h>

#include "kvp_time.h"

void kvp_svc_common_init(kvp_svc_common_t *c) {
    memset(c, 0, sizeof *c);
    c->ping_interval = 0.25;
    c->peer_timeout = 2.0;
    c->max_requests = 8;
    c->deadline_ms = 60000;
    c->max_chunk_tokens = 512;
    c->dtype = KVPRED__DTYPE__DTYPE_F32;
}

int kvp_stage_open(kvp_stage_t *s, const kvp_svc_common_t *c, const char *name, kvp_err_t *err) {
    memset(s, 0, sizeof *s);
    s->c = c;
    s->name = name;
    s->log = c->log ? c->log : stderr;
    if (c->host)
        snprintf(s->host, sizeof s->host, "%s", c->host);
    else if (gethostname(s->host, sizeof s->host - 1))
        snprintf(s->host, sizeof s->host, "localhost");
    s->ctx = c->zmq_ctx;
    if (!s->ctx) {
        s->ctx = zmq_ctx_new();
        s->own_ctx = 1;
        if (!s->ctx) return kvp_err_set(err, KVP_EIO, "%s: cannot create a ZeroMQ context", name);
    }
    if (c->trace_path) {
        int rc = kvp_trace_writer_new(c->trace_path, name, s->host, &s->trace, err);
        if (rc) {
            kvp_stage_close(s);
            return rc;
        }
    }
    return KVP_OK;
}

void kvp_stage_close(kvp_stage_t *s) {
    kvp_trace_writer_free(&s->trace);
    if (s->own_ctx && s->ctx) zmq_ctx_term(s->ctx);
    s->ctx = NULL;
}

void kvp_stage_log(const kvp_stage_t *s, const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(s->log, "[%s] %s\n", s->name, line);
    fflush(s->log);
}

void kvp_stage_ready(const kvp_stage_t *s) {
    if (s->c->ready) atomic_store(s->c->ready, 1);
}

int kvp_stage_stopped(const kvp_stage_t *s) {
    return s->c->stop && atomic_load(s->c->stop);
}

void kvp_link_settings_from(kvp_link_settings_t *ls, const kvp_svc_common_t *c, const char *name,
                            const char *peer_name) {
    kvp_link_settings_init(ls);
    ls->name = name;
    ls->peer_name = peer_name;
    if (c->ping_interval > 0) ls->ping_interval = c->ping_interval;
    if (c->peer_timeout > 0) ls->peer_timeout = c->peer_timeout;
    ls->bind_any = c->bind_any;
}

/* ---- events ----------------------------------------------------------- */

void kvp_events_free(kvp_events_t *e) {
    free(e->recs);
    memset(e, 0, sizeof *e);
}

static kvp_trace_rec_t *events_push(kvp_events_t *e) {
    if (e->n == e->cap) {
        size_t cap = e->cap ? 2 * e->cap : 16;
        kvp_trace_rec_t *r = realloc(e->recs, cap * sizeof *r);
        if (!r) return NULL;
        e->recs = r;
        e->cap = cap;
    }
    kvp_trace_rec_t *r = &e->recs[e->n++];
    memset(r, 0, sizeof *r);
    return r;
}

void kvp_events_mark_num(kvp_stage_t *s, kvp_events_t *e, const char *request_id, const char *event,
                         int32_t chunk, int64_t offset_ns, int64_t offset_err_ns, const char *key,
                         double value) {
    int64_t now = kvp_wall_ns();
    kvp_trace_num_t num = {.v = value};
    if (key) snprintf(num.key, sizeof num.key, "%s", key);
    if (s->trace) {
        kvp_trace_writer_set_offset(s->trace, offset_ns, offset_err_ns);
        kvp_trace_emit(s->trace, request_id, event, chunk, now, key ? &num : NULL, key ? 1 : 0);
    }
    kvp_trace_rec_t *r = e ? events_push(e) : NULL;
    if (!r) return;
    snprintf(r->request_id, sizeof r->request_id, "%s", request_id);
    snprintf(r->stage, sizeof r->stage, "%s", s->name);
    snprintf(r->host, sizeof r->host, "%s", s->host);
    snprintf(r->event, sizeof r->event, "%s", event);
    r->pid = (int32_t)getpid();
    r->chunk = chunk;
    r->wall_ns = now;
    r->offset_ns = offset_ns;
    r->offset_err_ns = offset_err_ns;
    if (key) {
        r->nums[0] = num;
        r->n_nums = 1;
    }
}

void kvp_events_mark(kvp_stage_t *s, kvp_events_t *e, const char *request_id, const char *event,
                     int32_t chunk, int64_t offset_ns, int64_t offset_err_ns) {
    kvp_events_mark_num(s, e, request_id, event, chunk, offset_ns, offset_err_ns, NULL, 0);
}

void kvp_events_add_proto(kvp_events_t *e, Kvpred__TraceEvent *const *evs, size_t n,
                          const char *request_id) {
    for (size_t i = 0; i < n; i++) {
        kvp_trace_rec_t *r = events_push(e);
        if (!r) return;
        const Kvpred__TraceEvent *t = evs[i];
        snprintf(r->request_id, sizeof r->request_id, "%s", request_id);
        snprintf(r->stage, sizeof r->stage, "%s", t->stage ? t->stage : "");
        snprintf(r->host, sizeof r->host, "%s", t->host ? t->host : "");
        snprintf(r->event, sizeof r->event, "%s", t->event ? t->event : "");
        r->chunk = t->chunk;
        r->wall_ns = t->wall_ns;
        r->offset_ns = t->clock_offset_ns;
        r->offset_err_ns = t->clock_offset_err_ns;
        for (size_t k = 0; k < t->n_nums && r->n_nums < KVP_TRACE_NUMS_MAX; k++) {
            snprintf(r->nums[r->n_nums].key, sizeof r->nums[0].key, "%s",
                     t->nums[k]->key ? t->nums[k]->key : "");
            r->nums[r->n_nums++].v = t->nums[k]->value;
        }
    }
}

void kvp_events_append(kvp_events_t *e, const kvp_trace_rec_t *recs, size_t n) {
    for (size_t i = 0; i < n; i++) {
        kvp_trace_rec_t *r = events_push(e);
        if (!r) return;
        *r = recs[i];
    }
}

int kvp_events_to_proto(const kvp_events_t *e, size_t from, kvp_events_proto_t *p) {
    memset(p, 0, sizeof *p);
    size_t n = from < e->n ? e->n - from : 0, n_nums = 0;
    for (size_t i = 0; i < n; i++)
        n_nums += (size_t)e->recs[from + i].n_nums;
    p->ptrs = calloc(n + 1, sizeof *p->ptrs);
    p->evs = calloc(n + 1, sizeof *p->evs);
    p->nums = calloc(n_nums + 1, sizeof *p->nums);
    p->num_ptrs = calloc(n_nums + 1, sizeof *p->num_ptrs);
    if (!p->ptrs || !p->evs || !p->nums || !p->num_ptrs) {
        kvp_events_proto_free(p);
        return -1;
    }
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const kvp_trace_rec_t *r = &e->recs[from + i];
        Kvpred__TraceEvent *t = &p->evs[i];
        kvpred__trace_event__init(t);
        t->stage = (char *)r->stage;
        t->event = (char *)r->event;
        t->host = (char *)r->host;
        t->wall_ns = r->wall_ns;
        t->chunk = r->chunk;
        t->clock_offset_ns = r->offset_ns;
        t->clock_offset_err_ns = r->offset_err_ns;
        t->nums = &p->num_ptrs[k];
        for (int j = 0; j < r->n_nums; j++, k++) {
            kvpred__trace_num__init(&p->nums[k]);
            p->nums[k].key = (char *)r->nums[j].key;
            p->nums[k].value = r->nums[j].v;
            p->num_ptrs[k] = &p->nums[k];
        }
        t->n_nums = (size_t)r->n_nums;
        p->ptrs[i] = t;
    }
    p->n = n;
    return (int)n;
}

void kvp_events_proto_free(kvp_events_proto_t *p) {
    free(p->ptrs);
    free(p->evs);
    free(p->nums);
    free(p->num_ptrs);
    memset(p, 0, sizeof *p);
}

void kvp_cache_shape_of(Kvpred__CacheShape *cs, const kvp_model_t *m) {
    kvpred__cache_shape__init(cs);
    cs->n_layer = (uint32_t)m->cfg.n_layer;
    cs->n_kv_head = (uint32_t)m->cfg.n_kv_head;
    cs->head_dim = (uint32_t)m->cfg.head_dim;
}

int kvp_copy_id(char *dst, size_t cap, const char *id) {
    if (!id || !id[0] || strlen(id) >= cap) return 0;
    memcpy(dst, id, strlen(id) + 1);
    return 1;
}

int kvp_svc_plan_chunks(int n, int chunk, int tail, int *starts) {
    int k = 0, p = 0;
    if (chunk < 1) chunk = 1;
    while (n - p > chunk) {
        starts[k++] = p;
        p += chunk;
    }
    int r = n - p;
    while (tail > 0 && r > tail) { /* halve toward the end */
        int half = r / 2 > tail ? r / 2 : tail;
        starts[k++] = p;
        p += r - half;
        r = half;
    }
    if (r > 0) starts[k++] = p;
    starts[k] = n;
    return k;
}

/* ---- requests in flight ------------------------------------------------- */

kvp_svc_req_t *kvp_svc_reqs_find(const kvp_svc_reqs_t *l, const char *id) {
    for (kvp_svc_req_t *r = l->head; r; r = r->next)
        if (!strcmp(r->id, id)) return r;
    return NULL;
}

void kvp_svc_reqs_add(kvp_svc_reqs_t *l, kvp_svc_req_t *r) {
    r->next = l->head;
    l->head = r;
    l->n++;
}

void kvp_svc_reqs_remove(kvp_svc_reqs_t *l, kvp_svc_req_t *r) {
    for (kvp_svc_req_t **p = &l->head; *p; p = &(*p)->next)
        if (*p == r) {
            *p = r->next;
            break;
        }
    if (l->turn == r) l->turn = r->next;
    l->n--;
}

int kvp_svc_same_peer(const kvp_wire_id_t *a, const kvp_wire_id_t *b) {
    return a->len == b->len && !memcmp(a->bytes, b->bytes, a->len);
}

kvp_svc_req_t *kvp_svc_reqs_from_peer(const kvp_svc_reqs_t *l, const kvp_wire_id_t *peer) {
    for (kvp_svc_req_t *r = l->head; r; r = r->next)
        if (kvp_svc_same_peer(&r->peer, peer)) return r;
    return NULL;
}

kvp_svc_req_t *kvp_svc_reqs_expired(const kvp_svc_reqs_t *l, double now, double grace) {
    for (kvp_svc_req_t *r = l->head; r; r = r->next)
        if (now > r->deadline + grace) return r;
    return NULL;
}

kvp_svc_req_t *kvp_svc_reqs_next_work(kvp_svc_reqs_t *l, int (*has_work)(const kvp_svc_req_t *r)) {
    kvp_svc_req_t *start = l->turn && l->turn->next ? l->turn->next : l->head;
    for (kvp_svc_req_t *r = start; r; r = r->next)
        if (has_work(r)) return l->turn = r;
    for (kvp_svc_req_t *r = l->head; r && r != start; r = r->next)
        if (has_work(r)) return l->turn = r;
    return NULL;
}

int kvp_svc_reqs_any_work(const kvp_svc_reqs_t *l, int (*has_work)(const kvp_svc_req_t *r)) {
    for (const kvp_svc_req_t *r = l->head; r; r = r->next)
        if (has_work(r)) return 1;
    return 0;
}

/* ---- links -------------------------------------------------------------- */

int kvp_svc_listen(const kvp_stage_t *s, const char *endpoint, const Kvpred__Hello *ours,
                   unsigned hello_mask, kvp_link_router_t **out, kvp_err_t *err) {
    kvp_link_settings_t ls;
    kvp_link_settings_from(&ls, s->c, s->name, NULL);
    ls.curve = s->c->curve_server;
    ls.hello_mask = hello_mask;
    return kvp_link_router_new(out, s->ctx, endpoint, ours, &ls, err);
}

int kvp_svc_connect(const kvp_stage_t *s, const char *endpoint, const char *peer_name,
                    const Kvpred__Hello *ours, kvp_link_dealer_t **out, kvp_err_t *err) {
    kvp_link_settings_t ls;
    kvp_link_settings_from(&ls, s->c, s->name, peer_name);
    ls.curve = s->c->curve_client;
    return kvp_link_dealer_new(out, s->ctx, endpoint, ours, &ls, kvp_now(), err);
}

void kvp_svc_poll(const kvp_link_router_t *up, const kvp_link_dealer_t *down, int busy) {
    double now = kvp_now();
    double due = kvp_link_router_deadline(up), down_due = down ? kvp_link_dealer_deadline(down) : 0;
    if (down && down_due < due) due = down_due;
    int timeout = busy ? 0 : kvp_link_poll_ms(due, now);
    if (timeout < 0 || timeout > 100) timeout = 100;
    zmq_pollitem_t it[2] = {{kvp_link_router_socket(up), 0, ZMQ_POLLIN, 0},
                            {down ? kvp_link_dealer_socket(down) : NULL, 0, ZMQ_POLLIN, 0}};
    zmq_poll(it, down ? 2 : 1, timeout);
}

/* The two drains differ only in the calls that receive and handle a message
 * (a ROUTER's carry the sender's identity), so one loop serves both: exactly
 * one of router and dealer is set. */
static void drain(kvp_stage_t *s, kvp_link_router_t *router, kvp_link_dealer_t *dealer,
                  const kvp_wire_limits_t *lim, kvp_wire_msg_t *m, const kvp_svc_inbox_t *in,
                  void *stage) {
    for (;;) {
        kvp_err_t err = {0};
        int rc = router ? kvp_wire_recv_from(kvp_link_router_socket(router), lim, 0, m, &err)
                        : kvp_wire_recv(kvp_link_dealer_socket(dealer), lim, 0, m, &err);
        if (rc == KVP_ETIMEOUT) return;
        if (rc) {
            kvp_stage_log(s, "%s: %s", in->refused, err.msg);
            if (in->on_refused) in->on_refused(stage, m, rc, err.msg);
            if (rc == KVP_EIO) return;
            continue;
        }
        rc = router ? kvp_link_router_handle(router, m, kvp_now(), &err)
                    : kvp_link_dealer_handle(dealer, m, kvp_now(), &err);
        if (rc < 0 && in->on_link_error)
            in->on_link_error(stage, err.msg);
        else if (rc < 0)
            kvp_stage_log(s, "%s", err.msg);
        else if (rc == KVP_LINK_APP)
            in->on_message(stage, m);
    }
}

void kvp_svc_drain_router(kvp_stage_t *s, kvp_link_router_t *l, const kvp_wire_limits_t *lim,
                          kvp_wire_msg_t *m, const kvp_svc_inbox_t *in, void *stage) {
    drain(s, l, NULL, lim, m, in, stage);
}

void kvp_svc_drain_dealer(kvp_stage_t *s, kvp_link_dealer_t *l, const kvp_wire_limits_t *lim,
                          kvp_wire_msg_t *m, const kvp_svc_inbox_t *in, void *stage) {
    drain(s, NULL, l, lim, m, in, stage);
}

int kvp_svc_link_wait(const kvp_stage_t *s, const kvp_link_dealer_t *down, const char *peer_name,
                      const char *link_err, double since, char *why, size_t cap) {
    kvp_link_state_t st = kvp_link_dealer_state(down);
    if (st == KVP_LINK_READY) return 1;
    double wait = s->c->peer_timeout > 0 ? s->c->peer_timeout : 2.0;
    if (st == KVP_LINK_HANDSHAKE && kvp_now() - since < wait) return 0;
    snprintf(why, cap, "the link to the %s at %s is %s%s%.400s", peer_name,
             kvp_link_dealer_endpoint(down), kvp_link_state_name(st), link_err[0] ? ": " : "",
             link_err);
    return -1;
}

/* ---- messages more than one stage sends ---------------------------------- */

void kvp_svc_hello_init(Kvpred__Hello *h, const kvp_stage_t *s) {
    kvpred__hello__init(h);
    h->role = (char *)s->name;
    h->dtype = (Kvpred__DType)s->c->dtype;
    h->max_chunk_tokens = (uint32_t)s->c->max_chunk_tokens;
}

void kvp_svc_send_cancel(kvp_link_dealer_t *down, const char *request_id, const char *reason) {
    Kvpred__Cancel c = KVPRED__CANCEL__INIT;
    c.request_id = (char *)request_id;
    c.reason = (char *)reason;
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    env.body_case = KVPRED__ENVELOPE__BODY_CANCEL;
    env.cancel = &c;
    kvp_err_t err = {0};
    kvp_wire_send(kvp_link_dealer_socket(down), &env, NULL, 0, &err);
}

void kvp_svc_send_error(const kvp_stage_t *s, kvp_link_router_t *up, const kvp_wire_id_t *to,
                        const char *request_id, int code, const char *msg) {
    kvp_err_t err = {0};
    kvp_wire_send_error(kvp_link_router_socket(up), to, request_id, code, s->name, msg, &err);
}

void kvp_svc_refuse_body(const kvp_stage_t *s, kvp_link_router_t *up, const kvp_wire_msg_t *m,
                         const char *who, const char *from_whom) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s does not take %s messages%s", who,
             kvp_wire_body_name(m->env->body_case), from_whom);
    kvp_svc_send_error(s, up, &m->from, kvp_wire_request_id(m->env), KVP_EINVAL, msg);
}

int kvp_svc_send_chunk(kvp_link_dealer_t *down, Kvpred__Chunk *c, const kvp_events_t *ev,
                       const kvp_wire_tensor_t *t, size_t n_t, kvp_err_t *err) {
    kvp_events_proto_t ep;
    int n_ev = kvp_events_to_proto(ev, 0, &ep);
    c->trace = ep.ptrs;
    c->n_trace = n_ev > 0 ? (size_t)n_ev : 0;
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    env.body_case = KVPRED__ENVELOPE__BODY_CHUNK;
    env.chunk = c;
    int rc = kvp_wire_send(kvp_link_dealer_socket(down), &env, t, n_t, err);
    kvp_events_proto_free(&ep);
    c->trace = NULL;
    c->n_trace = 0;
    return rc;
}

void kvp_svc_free_frame(void *data, void *hint) {
    (void)hint;
    free(data);
}

void kvp_svc_token_msg(kvp_svc_token_msg_t *tm, const kvp_tokenizer_t *tok, const char *request_id,
                       int index, int32_t id) {
    int n = kvp_tokenizer_piece(tok, id, tm->piece, sizeof tm->piece);
    kvpred__token__init(&tm->token);
    tm->token.request_id = (char *)request_id;
    tm->token.index = (uint32_t)index;
    tm->token.id = id;
    tm->token.piece.data = (uint8_t *)tm->piece;
    tm->token.piece.len =
        n > 0 ? (size_t)(n < (int)sizeof tm->piece ? n : (int)sizeof tm->piece) : 0;
    tm->token.wall_ns = kvp_wall_ns();
    kvpred__envelope__init(&tm->env);
    tm->env.body_case = KVPRED__ENVELOPE__BODY_TOKEN;
    tm->env.token = &tm->token;
}

void kvp_svc_done_msg(kvp_svc_done_msg_t *dm, const char *request_id, uint32_t n_generated,
                      const kvp_events_t *ev) {
    int n = kvp_events_to_proto(ev, 0, &dm->ep);
    kvpred__done__init(&dm->done);
    dm->done.request_id = (char *)request_id;
    dm->done.n_generated = n_generated;
    dm->done.trace = dm->ep.ptrs;
    dm->done.n_trace = n > 0 ? (size_t)n : 0;
    kvpred__envelope__init(&dm->env);
    dm->env.body_case = KVPRED__ENVELOPE__BODY_DONE;
    dm->env.done = &dm->done;
}

void kvp_svc_done_msg_free(kvp_svc_done_msg_t *dm) {
    kvp_events_proto_free(&dm->ep);
}
