/* The predictor stage: between aux-prefill and the decoder. It passes
 * requests' control messages through in both directions and maps each
 * auxiliary K/V chunk to base K/V as it arrives (kvp_predictor_apply), so
 * chunk i is mapped while aux-prefill computes chunk i+1. */
#include <stdlib.h>
#include <string.h>

#include "kvp_svc.h"
#include "kvp_svc_util.h"
#include "kvp_time.h"

typedef struct pred_req {
    kvp_svc_req_t req; /* first (kvp_svc_req_t); req.peer is the aux-prefill stage */
    uint8_t *pending;  /* a packed Reserve waiting for the decoder link's handshake */
    size_t pending_len;
    double pending_since;
    int64_t offset_ns, offset_err_ns; /* our clock minus the entry clock */
} pred_req_t;

typedef struct pred {
    const kvp_pred_cfg_t *cfg;
    kvp_stage_t stage;
    kvp_link_router_t *up;
    kvp_link_dealer_t *down;
    kvp_wire_limits_t lim_up, lim_down;
    kvp_svc_reqs_t reqs;
    float **aux_k, **aux_v;         /* [aux layers] one chunk each */
    char link_err[KVP_ERR_MSG_MAX]; /* the last thing the decoder link reported */
} pred_t;

static pred_req_t *find(pred_t *p, const char *id) {
    return (pred_req_t *)kvp_svc_reqs_find(&p->reqs, id);
}

static void drop(pred_t *p, pred_req_t *r) {
    kvp_svc_reqs_remove(&p->reqs, &r->req);
    free(r->pending);
    free(r);
    if (p->stage.trace) kvp_trace_flush(p->stage.trace, NULL);
}

static void error_up(pred_t *p, const kvp_wire_id_t *to, const char *id, int code,
                     const char *msg) {
    kvp_svc_send_error(&p->stage, p->up, to, id, code, msg);
}

/* ---- from aux-prefill --------------------------------------------------- */

/* Forwards a request's Reserve to the decoder once the link is up; fails it
 * when the link was refused or stays down past the peer timeout. */
static void send_pending(pred_t *p, pred_req_t *r) {
    kvp_err_t err = {0};
    char msg[KVP_ERR_MSG_MAX + 128];
    int go = kvp_svc_link_wait(&p->stage, p->down, KVP_STAGE_DECODER, p->link_err, r->pending_since,
                               msg, sizeof msg);
    if (go == 0) return;
    if (go < 0) {
        error_up(p, &r->req.peer, r->req.id, KVP_EPEER, msg);
        return drop(p, r);
    }
    Kvpred__Envelope *env = kvpred__envelope__unpack(NULL, r->pending_len, r->pending);
    free(r->pending);
    r->pending = NULL;
    if (!env || env->body_case != KVPRED__ENVELOPE__BODY_RESERVE) {
        if (env) kvpred__envelope__free_unpacked(env, NULL);
        error_up(p, &r->req.peer, r->req.id, KVP_ENOMEM, "predictor: lost a reserve");
        return drop(p, r);
    }
    /* The decoder's offset to the entry clock = ours + (decoder - us). */
    int64_t off = 0, rtt = 0;
    kvp_link_dealer_clock(p->down, &off, &rtt);
    env->reserve->clock_offset_ns = r->offset_ns + off;
    env->reserve->clock_offset_err_ns = r->offset_err_ns + rtt / 2;
    int rc = kvp_wire_send(kvp_link_dealer_socket(p->down), env, NULL, 0, &err);
    kvpred__envelope__free_unpacked(env, NULL);
    if (rc) {
        error_up(p, &r->req.peer, r->req.id, KVP_EPEER, err.msg);
        drop(p, r);
    }
}

static void on_reserve(pred_t *p, const kvp_wire_msg_t *m) {
    Kvpred__Reserve *rs = m->env->reserve;
    char id[KVP_TRACE_ID_MAX], msg[256];
    if (!kvp_copy_id(id, sizeof id, rs->request_id))
        return error_up(p, &m->from, "", KVP_EINVAL, "reserve: request_id empty or too long");
    if (find(p, id)) return error_up(p, &m->from, id, KVP_EINVAL, "request id already in flight");
    if (p->reqs.n >= p->cfg->c.max_requests) {
        snprintf(msg, sizeof msg, "predictor busy: %d of %d requests in flight", p->reqs.n,
                 p->cfg->c.max_requests);
        return error_up(p, &m->from, id, KVP_EBUSY, msg);
    }
    pred_req_t *r = calloc(1, sizeof *r);
    if (!r) return error_up(p, &m->from, id, KVP_ENOMEM, "predictor: out of memory");
    memcpy(r->req.id, id, sizeof id);
    r->req.peer = m->from;
    r->offset_ns = rs->clock_offset_ns;
    r->offset_err_ns = rs->clock_offset_err_ns;
    r->req.deadline = kvp_now() + (p->cfg->c.deadline_ms > 0 ? p->cfg->c.deadline_ms : 60000) / 1e3;
    kvp_svc_reqs_add(&p->reqs, &r->req);
    /* Keep the Reserve until the decoder link is up (it usually is). */
    r->pending_len = kvpred__envelope__get_packed_size(m->env);
    r->pending = malloc(r->pending_len);
    if (!r->pending) {
        error_up(p, &m->from, id, KVP_ENOMEM, "predictor: out of memory");
        return drop(p, r);
    }
    kvpred__envelope__pack(m->env, r->pending);
    r->pending_since = kvp_now();
    send_pending(p, r);
}

/* Maps one auxiliary chunk to base K/V and sends it on: the predictor's job. */
static void on_chunk(pred_t *p, const kvp_wire_msg_t *m) {
    const Kvpred__Chunk *c = m->env->chunk;
    pred_req_t *r = find(p, c->request_id ? c->request_id : "");
    if (!r) return; /* a request that failed or was cancelled: drop quietly */
    const kvp_predictor_t *pr = p->cfg->pred;
    kvp_err_t err = {0};
    kvp_events_t ev = {0};
    kvp_events_add_proto(&ev, c->trace, c->n_trace, r->req.id);
    kvp_events_mark(&p->stage, &ev, r->req.id, KVP_EV_PRED_RECV, (int32_t)c->seq, r->offset_ns,
                    r->offset_err_ns);
    int n = (int)(c->pos_end - c->pos_begin);
    char msg[600];
    if (c->layer_begin != 0 || c->layer_end != (uint32_t)pr->aux.n_layer) {
        snprintf(msg, sizeof msg, "chunk %u carries layers [%u, %u); the predictor needs all %d",
                 c->seq, c->layer_begin, c->layer_end, pr->aux.n_layer);
        goto fail;
    }
    for (int l = 0; l < pr->aux.n_layer; l++)
        if (kvp_wire_chunk_read(m, 0, (uint32_t)l, p->aux_k[l], (size_t)n * pr->d_in, &err) ||
            kvp_wire_chunk_read(m, 1, (uint32_t)l, p->aux_v[l], (size_t)n * pr->d_in, &err)) {
            snprintf(msg, sizeof msg, "chunk %u: %s", c->seq, err.msg);
            goto fail;
        }
    int nb = pr->base.n_layer;
    kvp_wire_tensor_t *t = calloc(2 * (size_t)nb, sizeof *t);
    float **bk = calloc((size_t)nb, sizeof *bk), **bv = calloc((size_t)nb, sizeof *bv);
    int oom = !t || !bk || !bv;
    for (int l = 0; l < nb && !oom; l++) {
        bk[l] = malloc(sizeof(float) * (size_t)n * pr->d_out);
        bv[l] = malloc(sizeof(float) * (size_t)n * pr->d_out);
        oom = !bk[l] || !bv[l];
    }
    if (oom || kvp_predictor_apply(pr, n, (const float *const *)p->aux_k,
                                   (const float *const *)p->aux_v, bk, bv, &err)) {
        for (int l = 0; bk && bv && l < nb; l++)
            free(bk[l]), free(bv[l]);
        free(t), free(bk), free(bv);
        snprintf(msg, sizeof msg, "chunk %u: %s", c->seq, oom ? "out of memory" : err.msg);
        goto fail;
    }
    kvp_events_mark(&p->stage, &ev, r->req.id, KVP_EV_PRED_MAPPED, (int32_t)c->seq, r->offset_ns,
                    r->offset_err_ns);
    for (int l = 0; l < nb; l++) { /* ownership passes to the wire */
        t[l] = (kvp_wire_tensor_t){bk[l], (size_t)n * pr->d_out, kvp_svc_free_frame, NULL};
        t[nb + l] = (kvp_wire_tensor_t){bv[l], (size_t)n * pr->d_out, kvp_svc_free_frame, NULL};
    }
    free(bk), free(bv);
    kvp_events_mark(&p->stage, &ev, r->req.id, KVP_EV_PRED_SENT, (int32_t)c->seq, r->offset_ns,
                    r->offset_err_ns);
    Kvpred__Chunk out = *c;
    out.layer_begin = 0;
    out.layer_end = (uint32_t)nb;
    out.n_kv_head = (uint32_t)pr->base.n_kv_head;
    out.head_dim = (uint32_t)pr->base.head_dim;
    int rc = kvp_svc_send_chunk(p->down, &out, &ev, t, 2 * (size_t)nb, &err);
    free(t);
    kvp_events_free(&ev);
    if (rc) {
        snprintf(msg, sizeof msg, "sending chunk %u to the decoder: %s", c->seq, err.msg);
        error_up(p, &r->req.peer, r->req.id, KVP_EPEER, msg);
        kvp_svc_send_cancel(p->down, r->req.id, msg);
        drop(p, r);
    }
    return;
fail:
    kvp_events_free(&ev);
    kvp_stage_log(&p->stage, "request %s failed: %s", r->req.id, msg);
    error_up(p, &r->req.peer, r->req.id, KVP_EFORMAT, msg);
    kvp_svc_send_cancel(p->down, r->req.id, msg);
    drop(p, r);
}

static void on_up(void *stage, kvp_wire_msg_t *m) {
    pred_t *p = stage;
    Kvpred__Envelope *env = m->env;
    switch (env->body_case) {
    case KVPRED__ENVELOPE__BODY_RESERVE:
        return on_reserve(p, m);
    case KVPRED__ENVELOPE__BODY_CHUNK:
        return on_chunk(p, m);
    case KVPRED__ENVELOPE__BODY_CANCEL: {
        pred_req_t *r = find(p, kvp_wire_request_id(env));
        if (r) {
            kvp_err_t err = {0};
            kvp_wire_send(kvp_link_dealer_socket(p->down), env, NULL, 0, &err);
            drop(p, r);
        }
        return;
    }
    default:
        kvp_svc_refuse_body(&p->stage, p->up, m, "the predictor", " from upstream");
    }
}

/* ---- from the decoder ---------------------------------------------------- */

static void on_down(void *stage, kvp_wire_msg_t *m) {
    pred_t *p = stage;
    Kvpred__Envelope *env = m->env;
    pred_req_t *r = find(p, kvp_wire_request_id(env));
    if (!r) return; /* about a request we no longer track */
    kvp_err_t err = {0};
    if (kvp_wire_send_to(kvp_link_router_socket(p->up), &r->req.peer, env, NULL, 0, &err))
        kvp_stage_log(&p->stage, "relaying %s of %s: %s", kvp_wire_body_name(env->body_case),
                      r->req.id, err.msg);
    if (env->body_case == KVPRED__ENVELOPE__BODY_DONE ||
        env->body_case == KVPRED__ENVELOPE__BODY_ERROR)
        drop(p, r);
}

/* ---- the loop ----------------------------------------------------------- */

/* The decoder link failed or went silent: every request fails, and those
 * that arrive while it is down are told why. */
static void lost_down(void *stage, const char *why) {
    pred_t *p = stage;
    kvp_stage_log(&p->stage, "%s", why);
    snprintf(p->link_err, sizeof p->link_err, "%s", why);
    while (p->reqs.head) {
        pred_req_t *r = (pred_req_t *)p->reqs.head;
        error_up(p, &r->req.peer, r->req.id, KVP_EPEER, why);
        drop(p, r);
    }
}

static void refused_up(void *stage, kvp_wire_msg_t *m, int code, const char *why) {
    pred_t *p = stage;
    const char *id = m->env ? kvp_wire_request_id(m->env) : "";
    error_up(p, &m->from, id, code, why);
    pred_req_t *r = find(p, id);
    if (r) {
        kvp_svc_send_cancel(p->down, r->req.id, why);
        drop(p, r);
    }
}

static const kvp_svc_inbox_t up_inbox = {
    .refused = "refused a message", .on_refused = refused_up, .on_message = on_up};
/* A message from the decoder that the wire refuses is only logged: the
 * request it names, if any, is left to its deadline. */
static const kvp_svc_inbox_t down_inbox = {.refused = "refused a message from the decoder",
                                           .on_link_error = lost_down,
                                           .on_message = on_down};

static void check_timers(pred_t *p) {
    double now = kvp_now();
    kvp_err_t err = {0};
    if (kvp_link_dealer_tick(p->down, now, &err) == KVP_ETIMEOUT) lost_down(p, err.msg);
    for (kvp_svc_req_t *q = p->reqs.head, *nx; q; q = nx) {
        pred_req_t *r = (pred_req_t *)q;
        nx = q->next;
        if (r->pending) send_pending(p, r);
    }
    kvp_wire_id_t dead;
    while (kvp_link_router_tick(p->up, now, &dead, &err) == 1) {
        kvp_stage_log(&p->stage, "%s", err.msg);
        kvp_svc_req_t *q;
        while ((q = kvp_svc_reqs_from_peer(&p->reqs, &dead))) {
            kvp_svc_send_cancel(p->down, q->id, "aux-prefill went silent");
            drop(p, (pred_req_t *)q);
        }
    }
    /* A request the decoder never finished is failed upstream by the decoder
     * or by aux-prefill's deadline; this only bounds our own table. */
    kvp_svc_req_t *q;
    while ((q = kvp_svc_reqs_expired(&p->reqs, now, 5.0)))
        drop(p, (pred_req_t *)q);
}

static void hello_base(Kvpred__Hello *h, const pred_t *p, Kvpred__CacheShape *aux,
                       Kvpred__CacheShape *base) {
    const kvp_predictor_t *pr = p->cfg->pred;
    kvp_svc_hello_init(h, &p->stage);
    kvpred__cache_shape__init(aux);
    kvpred__cache_shape__init(base);
    aux->n_layer = (uint32_t)pr->aux.n_layer;
    aux->n_kv_head = (uint32_t)pr->aux.n_kv_head;
    aux->head_dim = (uint32_t)pr->aux.head_dim;
    base->n_layer = (uint32_t)pr->base.n_layer;
    base->n_kv_head = (uint32_t)pr->base.n_kv_head;
    base->head_dim = (uint32_t)pr->base.head_dim;
    h->aux_fingerprint = (char *)pr->aux_fingerprint;
    h->base_fingerprint = (char *)pr->base_fingerprint;
    h->aux_shape = aux;
    h->base_shape = base;
    h->layer_map = (int32_t *)pr->layer_map;
    h->n_layer_map = (size_t)pr->base.n_layer;
}

static int pred_open(pred_t *p, const kvp_pred_cfg_t *cfg, kvp_err_t *err) {
    const kvp_predictor_t *pr = cfg->pred;
    int rc = kvp_stage_open(&p->stage, &cfg->c, KVP_STAGE_PREDICTOR, err);
    if (rc) return rc;
    Kvpred__Hello h;
    Kvpred__CacheShape as, bs;
    hello_base(&h, p, &as, &bs);
    /* aux-prefill must run the auxiliary model this predictor was fitted for */
    unsigned mask = KVP_WIRE_HELLO_PROTOCOL_VERSION | KVP_WIRE_HELLO_AUX_SHAPE |
                    KVP_WIRE_HELLO_DTYPE | KVP_WIRE_HELLO_MAX_CHUNK_TOKENS |
                    (pr->aux_fingerprint[0] ? KVP_WIRE_HELLO_AUX_FINGERPRINT : 0);
    rc = kvp_svc_listen(&p->stage, cfg->listen ? cfg->listen : KVP_SVC_PRED_ENDPOINT, &h, mask,
                        &p->up, err);
    if (rc) return rc;
    rc = kvp_svc_connect(&p->stage, cfg->downstream ? cfg->downstream : KVP_SVC_DEC_ENDPOINT,
                         KVP_STAGE_DECODER, &h, &p->down, err);
    if (rc) return rc;
    kvp_wire_limits_init(&p->lim_up, (uint32_t)pr->aux.n_layer, (uint32_t)pr->aux.n_kv_head,
                         (uint32_t)pr->aux.head_dim, (uint32_t)cfg->c.max_chunk_tokens);
    kvp_wire_limits_init(&p->lim_down, 0, 0, 0, 0);
    p->aux_k = calloc((size_t)pr->aux.n_layer, sizeof *p->aux_k);
    p->aux_v = calloc((size_t)pr->aux.n_layer, sizeof *p->aux_v);
    if (!p->aux_k || !p->aux_v) return kvp_err_set(err, KVP_ENOMEM, "predictor: out of memory");
    for (int l = 0; l < pr->aux.n_layer; l++) {
        p->aux_k[l] = malloc(sizeof(float) * (size_t)cfg->c.max_chunk_tokens * pr->d_in);
        p->aux_v[l] = malloc(sizeof(float) * (size_t)cfg->c.max_chunk_tokens * pr->d_in);
        if (!p->aux_k[l] || !p->aux_v[l])
            return kvp_err_set(err, KVP_ENOMEM, "predictor: out of memory");
    }
    return KVP_OK;
}

static void pred_close(pred_t *p) {
    while (p->reqs.head)
        drop(p, (pred_req_t *)p->reqs.head);
    for (int l = 0; p->aux_k && l < p->cfg->pred->aux.n_layer; l++)
        free(p->aux_k[l]);
    for (int l = 0; p->aux_v && l < p->cfg->pred->aux.n_layer; l++)
        free(p->aux_v[l]);
    free(p->aux_k);
    free(p->aux_v);
    kvp_link_dealer_free(&p->down);
    kvp_link_router_free(&p->up);
    kvp_stage_close(&p->stage);
}

int kvp_svc_pred_run(const kvp_pred_cfg_t *cfg, kvp_err_t *err) {
    pred_t p = {.cfg = cfg};
    int rc = pred_open(&p, cfg, err);
    if (rc) {
        pred_close(&p);
        return rc;
    }
    kvp_stage_log(&p.stage, "listening on %s, decoder at %s (%d aux -> %d base layers)",
                  kvp_link_router_endpoint(p.up), kvp_link_dealer_endpoint(p.down),
                  cfg->pred->aux.n_layer, cfg->pred->base.n_layer);
    kvp_stage_ready(&p.stage);
    kvp_wire_msg_t m;
    kvp_wire_msg_init(&m);
    while (!kvp_stage_stopped(&p.stage)) {
        kvp_svc_poll(p.up, p.down, 0);
        /* credits and tokens first: they unblock the others */
        kvp_svc_drain_dealer(&p.stage, p.down, &p.lim_down, &m, &down_inbox, &p);
        kvp_svc_drain_router(&p.stage, p.up, &p.lim_up, &m, &up_inbox, &p);
        check_timers(&p);
    }
    kvp_wire_msg_free(&m);
    pred_close(&p);
    return KVP_OK;
}
