/* The decoder stage: holds the base model. For each request it reserves a KV
 * cache when the Reserve arrives, writes the predicted K/V chunks into it as
 * they arrive (granting a credit back for each), and once every position is
 * in runs the base model's first step on the last prompt token — the
 * hand-over of KV Prediction — then generates token by token, streaming each
 * one upstream. In baseline mode it prefills the prompt itself instead. */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_sampler.h"
#include "kvp_svc.h"
#include "kvp_svc_util.h"
#include "kvp_time.h"

typedef enum { D_CHUNKS, D_PREFILL, D_FIRST_STEP, D_DECODE } dec_state_t;

typedef struct dec_req {
    kvp_svc_req_t req; /* first (kvp_svc_req_t); req.peer is the predictor it came through */
    int mode;
    dec_state_t st;
    int n_prompt, n_ctx; /* n_ctx: positions the chunks fill (n_prompt - 1) */
    int32_t *tokens;     /* baseline: the prompt; kvp: only the last token */
    int n_tokens;
    int prefilled; /* baseline: prompt tokens done */
    uint8_t *have; /* [n_ctx] position received */
    int n_have;
    int n_predict, n_generated, ignore_eos;
    int32_t last; /* the token to run next */
    kvp_kvcache_t *cache;
    kvp_sampler_t *sampler;
    float *logits;
    int64_t offset_ns, offset_err_ns; /* our clock minus the entry clock */
    kvp_events_t ev;
} dec_req_t;

typedef struct dec {
    const kvp_dec_cfg_t *cfg;
    kvp_stage_t stage;
    kvp_link_router_t *up;
    kvp_wire_limits_t lim;
    kvp_model_ctx_t *mctx;
    float *kbuf, *vbuf; /* one layer of one chunk */
    kvp_svc_reqs_t reqs;
} dec_t;

static void req_free(dec_req_t *r) {
    free(r->tokens);
    free(r->have);
    free(r->logits);
    kvp_kvcache_free(&r->cache);
    kvp_sampler_free(&r->sampler);
    kvp_events_free(&r->ev);
    free(r);
}

static dec_req_t *find(dec_t *d, const char *id) {
    return (dec_req_t *)kvp_svc_reqs_find(&d->reqs, id);
}

static void drop(dec_t *d, dec_req_t *r) {
    kvp_svc_reqs_remove(&d->reqs, &r->req);
    if (d->stage.trace) kvp_trace_flush(d->stage.trace, NULL);
    req_free(r);
}

static void send_env(dec_t *d, const kvp_wire_id_t *to, Kvpred__Envelope *env) {
    kvp_err_t err = {0};
    if (kvp_wire_send_to(kvp_link_router_socket(d->up), to, env, NULL, 0, &err))
        kvp_stage_log(&d->stage, "send %s: %s", kvp_wire_body_name(env->body_case), err.msg);
}

static void fail(dec_t *d, dec_req_t *r, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void fail(dec_t *d, dec_req_t *r, int code, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    kvp_events_mark(&d->stage, NULL, r->req.id, KVP_EV_ERROR, -1, r->offset_ns, r->offset_err_ns);
    kvp_svc_send_error(&d->stage, d->up, &r->req.peer, r->req.id, code, msg);
    kvp_stage_log(&d->stage, "request %s failed: %s", r->req.id, msg);
    drop(d, r);
}

/* ---- Reserve ------------------------------------------------------------ */

static int reserve_check(dec_t *d, const Kvpred__Reserve *rs, char *why, size_t cap) {
    const kvp_model_config_t *mc = &d->cfg->model->cfg;
    int n_predict = rs->params ? (int)rs->params->n_predict : 0;
    if (rs->n_prompt < 1 || rs->n_prompt > (uint32_t)mc->n_ctx_train)
        return snprintf(why, cap, "n_prompt %u outside [1, %d]", rs->n_prompt, mc->n_ctx_train);
    if (n_predict < 0 || (int64_t)rs->n_prompt + n_predict > mc->n_ctx_train)
        return snprintf(why, cap, "%u prompt + %d new tokens exceed the context of %d",
                        rs->n_prompt, n_predict, mc->n_ctx_train);
    size_t want = rs->mode == KVPRED__MODE__MODE_BASELINE ? rs->n_prompt : 1;
    if (rs->mode == KVPRED__MODE__MODE_AUX_ONLY)
        return snprintf(why, cap, "aux-only requests are answered by aux-prefill");
    if (rs->n_tokens != want)
        return snprintf(why, cap, "reserve carries %zu tokens, mode needs %zu", rs->n_tokens, want);
    for (size_t i = 0; i < rs->n_tokens; i++)
        if (rs->tokens[i] < 0 || rs->tokens[i] >= mc->n_vocab)
            return snprintf(why, cap, "token %d outside the vocabulary of %d", rs->tokens[i],
                            mc->n_vocab);
    return 0;
}

static int req_alloc(dec_t *d, dec_req_t *r, const Kvpred__Reserve *rs, kvp_err_t *err) {
    const kvp_model_t *m = d->cfg->model;
    const Kvpred__GenParams *gp = rs->params;
    r->n_prompt = (int)rs->n_prompt;
    r->n_ctx = r->n_prompt - 1;
    r->n_predict = gp ? (int)gp->n_predict : 16;
    r->ignore_eos = gp ? gp->ignore_eos : 0;
    r->n_tokens = (int)rs->n_tokens;
    r->tokens = malloc(sizeof(int32_t) * rs->n_tokens);
    r->have = calloc((size_t)r->n_ctx + 1, 1);
    r->logits = malloc(sizeof(float) * (size_t)m->cfg.n_vocab);
    if (!r->tokens || !r->have || !r->logits) return kvp_err_set(err, KVP_ENOMEM, "out of memory");
    memcpy(r->tokens, rs->tokens, sizeof(int32_t) * rs->n_tokens);
    kvp_sampler_params_t sp = {.temp = gp ? gp->temp : 0.0f,
                               .top_k = gp ? (int)gp->top_k : 0,
                               .top_p = gp && gp->top_p > 0 ? gp->top_p : 1.0f,
                               .seed = gp ? gp->seed : 0};
    int rc = kvp_sampler_new(&r->sampler, &sp, m->cfg.n_vocab, err);
    if (!rc) /* +1: a request of n_predict 0 still samples the first token */
        rc = kvp_model_new_cache(m, r->n_prompt + r->n_predict + 1, &r->cache, err);
    return rc;
}

static void on_reserve(dec_t *d, const kvp_wire_id_t *from, const Kvpred__Reserve *rs) {
    char id[KVP_TRACE_ID_MAX], why[256];
    kvp_err_t err = {0};
    if (!kvp_copy_id(id, sizeof id, rs->request_id))
        return kvp_svc_send_error(&d->stage, d->up, from, "", KVP_EINVAL,
                                  "reserve: request_id empty or longer than 63 bytes");
    if (find(d, id) || reserve_check(d, rs, why, sizeof why) ||
        d->reqs.n >= d->cfg->c.max_requests) {
        int busy = !find(d, id) && d->reqs.n >= d->cfg->c.max_requests;
        char msg[320];
        if (find(d, id))
            snprintf(msg, sizeof msg, "request id %s is already in flight", id);
        else if (busy)
            snprintf(msg, sizeof msg, "decoder busy: %d of %d caches in use", d->reqs.n,
                     d->cfg->c.max_requests);
        else
            snprintf(msg, sizeof msg, "reserve refused: %s", why);
        return kvp_svc_send_error(&d->stage, d->up, from, id, busy ? KVP_EBUSY : KVP_EINVAL, msg);
    }
    dec_req_t *r = calloc(1, sizeof *r);
    if (!r || req_alloc(d, r, rs, &err)) {
        kvp_svc_send_error(&d->stage, d->up, from, id, KVP_ENOMEM, r ? err.msg : "out of memory");
        if (r) req_free(r);
        return;
    }
    memcpy(r->req.id, id, sizeof id);
    r->req.peer = *from;
    r->mode = rs->mode;
    r->offset_ns = rs->clock_offset_ns;
    r->offset_err_ns = rs->clock_offset_err_ns;
    int timeout_ms = d->cfg->c.deadline_ms;
    if (rs->deadline_wall_ns > 0) /* the request's own deadline, on our clock */
        timeout_ms = (int)((rs->deadline_wall_ns + r->offset_ns - kvp_wall_ns()) / 1000000);
    r->req.deadline = kvp_now() + (timeout_ms > 0 ? timeout_ms : 0) / 1e3;
    if (r->mode == KVPRED__MODE__MODE_BASELINE)
        r->st = D_PREFILL;
    else
        r->st = r->n_ctx == 0 ? D_FIRST_STEP : D_CHUNKS;
    if (r->mode == KVPRED__MODE__MODE_KVP && r->n_ctx == 0) /* a one-token prompt */
        kvp_events_mark(&d->stage, &r->ev, r->req.id, KVP_EV_CACHE_COMPLETE, -1, r->offset_ns,
                        r->offset_err_ns);
    r->last = r->tokens[r->n_tokens - 1];
    kvp_svc_reqs_add(&d->reqs, &r->req);
    Kvpred__Reserved ok = KVPRED__RESERVED__INIT;
    ok.request_id = r->req.id;
    ok.credits = (uint32_t)(d->cfg->credits > 0 ? d->cfg->credits : 4);
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    env.body_case = KVPRED__ENVELOPE__BODY_RESERVED;
    env.reserved = &ok;
    send_env(d, from, &env);
    if (d->cfg->c.verbose)
        kvp_stage_log(&d->stage, "request %s: %d prompt tokens, mode %d", r->req.id, r->n_prompt,
                      r->mode);
}

/* ---- Chunk -------------------------------------------------------------- */

static void on_chunk(dec_t *d, const kvp_wire_msg_t *m) {
    const Kvpred__Chunk *c = m->env->chunk;
    dec_req_t *r = find(d, c->request_id ? c->request_id : "");
    kvp_err_t err = {0};
    if (!r) { /* late chunk of a request that failed or was cancelled: no reply */
        if (d->cfg->c.verbose)
            kvp_stage_log(&d->stage, "chunk for unknown request %s dropped", c->request_id);
        return;
    }
    kvp_events_add_proto(&r->ev, c->trace, c->n_trace, r->req.id);
    kvp_events_mark(&d->stage, &r->ev, r->req.id, KVP_EV_DEC_RECV, (int32_t)c->seq, r->offset_ns,
                    r->offset_err_ns);
    const kvp_model_config_t *mc = &d->cfg->model->cfg;
    if (r->st != D_CHUNKS)
        return fail(d, r, KVP_EFORMAT, "chunk %u arrived for a request not waiting for chunks",
                    c->seq);
    if (c->pos_end > (uint32_t)r->n_ctx || c->layer_begin != 0 ||
        c->layer_end != (uint32_t)mc->n_layer)
        return fail(d, r, KVP_EFORMAT,
                    "chunk %u: positions [%u, %u) layers [%u, %u) do not fit the reservation "
                    "(%d positions, %d layers)",
                    c->seq, c->pos_begin, c->pos_end, c->layer_begin, c->layer_end, r->n_ctx,
                    mc->n_layer);
    int n = (int)(c->pos_end - c->pos_begin);
    size_t n_vals = (size_t)n * mc->n_kv_head * mc->head_dim;
    for (int l = 0; l < mc->n_layer; l++) {
        if (kvp_wire_chunk_read(m, 0, (uint32_t)l, d->kbuf, n_vals, &err) ||
            kvp_wire_chunk_read(m, 1, (uint32_t)l, d->vbuf, n_vals, &err) ||
            kvp_kvcache_write(r->cache, l, (int)c->pos_begin, n, d->kbuf, d->vbuf, &err))
            return fail(d, r, KVP_EFORMAT, "chunk %u: %s", c->seq, err.msg);
    }
    for (uint32_t p = c->pos_begin; p < c->pos_end; p++)
        if (!r->have[p]) {
            r->have[p] = 1;
            r->n_have++;
        }
    kvp_events_mark(&d->stage, &r->ev, r->req.id, KVP_EV_DEC_WRITTEN, (int32_t)c->seq, r->offset_ns,
                    r->offset_err_ns);
    Kvpred__Credit cr = KVPRED__CREDIT__INIT;
    cr.request_id = r->req.id;
    cr.credits = 1;
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    env.body_case = KVPRED__ENVELOPE__BODY_CREDIT;
    env.credit = &cr;
    send_env(d, &r->req.peer, &env);
    if (r->n_have == r->n_ctx) {
        kvp_events_mark(&d->stage, &r->ev, r->req.id, KVP_EV_CACHE_COMPLETE, -1, r->offset_ns,
                        r->offset_err_ns);
        r->st = D_FIRST_STEP;
    }
}

/* ---- model work --------------------------------------------------------- */

static void send_token(dec_t *d, dec_req_t *r, int32_t tok) {
    kvp_svc_token_msg_t tm;
    kvp_svc_token_msg(&tm, d->cfg->tok, r->req.id, r->n_generated, tok);
    send_env(d, &r->req.peer, &tm.env);
}

static void finish(dec_t *d, dec_req_t *r) {
    kvp_events_mark(&d->stage, &r->ev, r->req.id, KVP_EV_DONE, -1, r->offset_ns, r->offset_err_ns);
    kvp_svc_done_msg_t dm;
    kvp_svc_done_msg(&dm, r->req.id, (uint32_t)r->n_generated, &r->ev);
    send_env(d, &r->req.peer, &dm.env);
    kvp_svc_done_msg_free(&dm);
    if (d->cfg->c.verbose)
        kvp_stage_log(&d->stage, "request %s done: %d tokens", r->req.id, r->n_generated);
    drop(d, r);
}

/* Samples from r->logits and streams the token; ends the request when it is
 * the last. Returns 1 when the request was finished (and freed). */
static int emit(dec_t *d, dec_req_t *r) {
    int32_t tok = kvp_sampler_sample(r->sampler, r->logits);
    if (r->n_generated == 0)
        kvp_events_mark(&d->stage, &r->ev, r->req.id, KVP_EV_FIRST_TOKEN, -1, r->offset_ns,
                        r->offset_err_ns);
    kvp_events_mark(&d->stage, &r->ev, r->req.id, KVP_EV_TOKEN, r->n_generated, r->offset_ns,
                    r->offset_err_ns);
    send_token(d, r, tok);
    r->n_generated++;
    r->last = tok;
    int eos = !r->ignore_eos && tok == kvp_tokenizer_eos(d->cfg->tok);
    if (r->n_generated >= r->n_predict || eos || r->cache->len >= r->cache->cap) {
        finish(d, r);
        return 1;
    }
    r->st = D_DECODE;
    return 0;
}

static void work_prefill(dec_t *d, dec_req_t *r, kvp_err_t *err) {
    int chunk = d->cfg->prefill_chunk > 0 ? d->cfg->prefill_chunk : 512;
    int a = r->prefilled, n = r->n_prompt - a < chunk ? r->n_prompt - a : chunk;
    if (a == 0)
        kvp_events_mark(&d->stage, &r->ev, r->req.id, KVP_EV_DEC_PREFILL_START, -1, r->offset_ns,
                        r->offset_err_ns);
    int last = a + n == r->n_prompt;
    if (kvp_model_forward(d->mctx, r->cache, r->tokens + a, n, r->logits,
                          last ? KVP_LOGITS_LAST : KVP_LOGITS_NONE, err))
        return fail(d, r, err->code, "base prefill: %s", err->msg);
    r->prefilled += n;
    if (last) {
        kvp_events_mark(&d->stage, &r->ev, r->req.id, KVP_EV_DEC_PREFILL_END, -1, r->offset_ns,
                        r->offset_err_ns);
        emit(d, r);
    }
}

/* One unit of model work for one request: a prefill chunk, the first base
 * step, or one decode step. */
static void work(dec_t *d, dec_req_t *r) {
    kvp_err_t err = {0};
    switch (r->st) {
    case D_CHUNKS:
        return;
    case D_PREFILL:
        return work_prefill(d, r, &err);
    case D_FIRST_STEP:
        if (kvp_kvcache_set_len(r->cache, r->n_ctx, &err))
            return fail(d, r, err.code, "%s", err.msg);
        /* the first step is a decode step on the last prompt token */
        __attribute__((fallthrough));
    case D_DECODE:
        if (kvp_model_forward(d->mctx, r->cache, &r->last, 1, r->logits, KVP_LOGITS_LAST, &err))
            return fail(d, r, err.code, "base step: %s", err.msg);
        emit(d, r);
        return;
    }
}

static int has_work(const kvp_svc_req_t *q) {
    return ((const dec_req_t *)q)->st != D_CHUNKS;
}

/* The next request with work after the last one served. */
static dec_req_t *next_work(dec_t *d) {
    return (dec_req_t *)kvp_svc_reqs_next_work(&d->reqs, has_work);
}

/* ---- the loop ----------------------------------------------------------- */

static void on_message(void *stage, kvp_wire_msg_t *m) {
    dec_t *d = stage;
    Kvpred__Envelope *env = m->env;
    switch (env->body_case) {
    case KVPRED__ENVELOPE__BODY_RESERVE:
        return on_reserve(d, &m->from, env->reserve);
    case KVPRED__ENVELOPE__BODY_CHUNK:
        return on_chunk(d, m);
    case KVPRED__ENVELOPE__BODY_CANCEL: {
        dec_req_t *r = find(d, env->cancel->request_id ? env->cancel->request_id : "");
        if (r) {
            kvp_stage_log(&d->stage, "request %s cancelled: %s", r->req.id, env->cancel->reason);
            drop(d, r);
        }
        return;
    }
    default:
        kvp_svc_refuse_body(&d->stage, d->up, m, "the decoder", "");
    }
}

static void refused(void *stage, kvp_wire_msg_t *m, int code, const char *why) {
    dec_t *d = stage;
    const char *id = m->env ? kvp_wire_request_id(m->env) : "";
    dec_req_t *r = find(d, id);
    if (r)
        fail(d, r, code, "refused a message: %s", why);
    else
        kvp_svc_send_error(&d->stage, d->up, &m->from, id, code, why);
}

static const kvp_svc_inbox_t inbox = {
    .refused = "refused a message", .on_refused = refused, .on_message = on_message};

static void check_timers(dec_t *d) {
    double now = kvp_now();
    kvp_wire_id_t dead;
    kvp_err_t err = {0};
    kvp_svc_req_t *q;
    while (kvp_link_router_tick(d->up, now, &dead, &err) == 1) {
        kvp_stage_log(&d->stage, "%s", err.msg);
        while ((q = kvp_svc_reqs_from_peer(&d->reqs, &dead)))
            drop(d, (dec_req_t *)q); /* nobody is left to answer */
    }
    while ((q = kvp_svc_reqs_expired(&d->reqs, now, 0))) {
        dec_req_t *r = (dec_req_t *)q;
        fail(d, r, KVP_ETIMEOUT,
             "deadline passed with %d of %d positions received and %d tokens generated", r->n_have,
             r->n_ctx, r->n_generated);
    }
}

static int dec_open(dec_t *d, const kvp_dec_cfg_t *cfg, kvp_err_t *err) {
    const kvp_model_t *m = cfg->model;
    int rc = kvp_stage_open(&d->stage, &cfg->c, KVP_STAGE_DECODER, err);
    if (rc) return rc;
    Kvpred__Hello ours;
    Kvpred__CacheShape base;
    char fp[17];
    kvp_model_fingerprint(m, fp);
    kvp_svc_hello_init(&ours, &d->stage);
    kvp_cache_shape_of(&base, m);
    ours.base_fingerprint = fp;
    ours.base_shape = &base;
    unsigned mask = KVP_WIRE_HELLO_PROTOCOL_VERSION | KVP_WIRE_HELLO_BASE_FINGERPRINT |
                    KVP_WIRE_HELLO_BASE_SHAPE | KVP_WIRE_HELLO_DTYPE |
                    KVP_WIRE_HELLO_MAX_CHUNK_TOKENS;
    rc = kvp_svc_listen(&d->stage, cfg->listen ? cfg->listen : KVP_SVC_DEC_ENDPOINT, &ours, mask,
                        &d->up, err);
    kvp_wire_limits_init(&d->lim, (uint32_t)m->cfg.n_layer, (uint32_t)m->cfg.n_kv_head,
                         (uint32_t)m->cfg.head_dim, (uint32_t)cfg->c.max_chunk_tokens);
    d->lim.max_pos = (uint32_t)m->cfg.n_ctx_train;
    size_t n = (size_t)cfg->c.max_chunk_tokens * m->cfg.n_kv_head * m->cfg.head_dim;
    int prefill = cfg->prefill_chunk > 0 ? cfg->prefill_chunk : 512;
    if (!rc) rc = kvp_model_ctx_new(&d->mctx, m, prefill, m->cfg.n_ctx_train + 1, err);
    d->kbuf = malloc(sizeof(float) * n);
    d->vbuf = malloc(sizeof(float) * n);
    if (!rc && (!d->kbuf || !d->vbuf)) rc = kvp_err_set(err, KVP_ENOMEM, "decoder: out of memory");
    return rc;
}

static void dec_close(dec_t *d) {
    while (d->reqs.head)
        drop(d, (dec_req_t *)d->reqs.head);
    free(d->kbuf);
    free(d->vbuf);
    kvp_model_ctx_free(&d->mctx);
    kvp_link_router_free(&d->up);
    kvp_stage_close(&d->stage);
}

int kvp_svc_dec_run(const kvp_dec_cfg_t *cfg, kvp_err_t *err) {
    dec_t d = {.cfg = cfg};
    int rc = dec_open(&d, cfg, err);
    if (rc) {
        dec_close(&d);
        return rc;
    }
    kvp_stage_log(&d.stage, "listening on %s (base model %d layers, %s on the wire)",
                  kvp_link_router_endpoint(d.up), cfg->model->cfg.n_layer,
                  cfg->c.dtype == KVPRED__DTYPE__DTYPE_F16 ? "f16" : "f32");
    kvp_stage_ready(&d.stage);
    kvp_wire_msg_t m;
    kvp_wire_msg_init(&m);
    while (!kvp_stage_stopped(&d.stage)) {
        kvp_svc_poll(d.up, NULL, kvp_svc_reqs_any_work(&d.reqs, has_work));
        kvp_svc_drain_router(&d.stage, d.up, &d.lim, &m, &inbox, &d);
        check_timers(&d);
        dec_req_t *r = next_work(&d);
        if (r) work(&d, r);
    }
    kvp_wire_msg_free(&m);
    dec_close(&d);
    return KVP_OK;
}
