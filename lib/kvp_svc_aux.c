/* The aux-prefill stage: the pipeline's front door. It tokenizes a client's
 * request, asks the decoder (through the predictor) to reserve a cache, then
 * runs the auxiliary model over the prompt — all tokens but the last — in
 * chunks, sending each chunk's K/V downstream as soon as it is computed and
 * as far as the decoder's credits allow, so that transfer and prediction of
 * chunk i overlap the computation of chunk i+1. Tokens and the final Done
 * come back the same way and go to the client. In aux-only mode the
 * auxiliary model answers by itself. */
#include <stdlib.h>
#include <string.h>

#include "kvp_sampler.h"
#include "kvp_svc.h"
#include "kvp_svc_util.h"
#include "kvp_time.h"

typedef enum {
    A_PENDING, /* the link to the predictor is still shaking hands */
    A_RESERVING,
    A_STREAMING,
    A_WAITING,
    A_AUX_PREFILL,
    A_AUX_DECODE
} aux_state_t;

typedef struct aux_req {
    kvp_svc_req_t req; /* first (kvp_svc_req_t); req.peer is the client */
    int mode;
    aux_state_t st;
    int32_t *toks;
    int n_prompt, chunk, n_chunks, next_chunk, credits;
    int *starts; /* [n_chunks + 1] chunk boundaries (kvp_svc_plan_chunks) */
    Kvpred__GenParams params;
    kvp_kvcache_t *cache;
    double pending_since;
    int deadline_ms;
    kvp_events_t ev; /* this stage's events that do not travel with a chunk */
    /* aux-only */
    kvp_sampler_t *sampler;
    float *logits;
    int prefilled, n_generated;
    int32_t last;
} aux_req_t;

typedef struct aux {
    const kvp_aux_cfg_t *cfg;
    kvp_stage_t stage;
    kvp_link_router_t *front;
    kvp_link_dealer_t *down;
    kvp_wire_limits_t lim_front, lim_down;
    kvp_model_ctx_t *mctx;
    kvp_svc_reqs_t reqs;
    char link_err[KVP_ERR_MSG_MAX]; /* the last thing the predictor link reported */
} aux_t;

static const char *mode_name(int mode) {
    return mode == KVPRED__MODE__MODE_BASELINE   ? "baseline"
           : mode == KVPRED__MODE__MODE_AUX_ONLY ? "aux-only"
                                                 : "kvp";
}

static aux_req_t *find(aux_t *a, const char *id) {
    return (aux_req_t *)kvp_svc_reqs_find(&a->reqs, id);
}

static void drop(aux_t *a, aux_req_t *r) {
    kvp_svc_reqs_remove(&a->reqs, &r->req);
    free(r->toks);
    free(r->starts);
    free(r->logits);
    kvp_kvcache_free(&r->cache);
    kvp_sampler_free(&r->sampler);
    kvp_events_free(&r->ev);
    free(r);
    if (a->stage.trace) kvp_trace_flush(a->stage.trace, NULL);
}

static void mark(aux_t *a, aux_req_t *r, kvp_events_t *ev, const char *event, int32_t chunk) {
    kvp_events_mark(&a->stage, ev, r->req.id, event, chunk, 0, 0); /* the entry clock */
}

static void fail(aux_t *a, aux_req_t *r, int code, const char *stage, const char *msg) {
    kvp_err_t err = {0};
    mark(a, r, NULL, KVP_EV_ERROR, -1);
    kvp_wire_send_error(kvp_link_router_socket(a->front), &r->req.peer, r->req.id, code, stage, msg,
                        &err);
    if (r->mode != KVPRED__MODE__MODE_AUX_ONLY) kvp_svc_send_cancel(a->down, r->req.id, msg);
    kvp_stage_log(&a->stage, "request %s failed: %s", r->req.id, msg);
    drop(a, r);
}

static void send_client(aux_t *a, aux_req_t *r, Kvpred__Envelope *env) {
    kvp_err_t err = {0};
    if (kvp_wire_send_to(kvp_link_router_socket(a->front), &r->req.peer, env, NULL, 0, &err))
        kvp_stage_log(&a->stage, "to client of %s: %s", r->req.id, err.msg);
}

/* ---- a new request -------------------------------------------------------- */

static int tokenize(aux_t *a, aux_req_t *r, const Kvpred__Request *q, char *why, size_t cap) {
    const kvp_model_config_t *mc = &a->cfg->model->cfg;
    kvp_err_t err = {0};
    if (q->n_tokens) {
        r->toks = malloc(sizeof(int32_t) * q->n_tokens);
        if (!r->toks) return snprintf(why, cap, "out of memory");
        for (size_t i = 0; i < q->n_tokens; i++) {
            if (q->tokens[i] < 0 || q->tokens[i] >= mc->n_vocab)
                return snprintf(why, cap, "token %d at %zu outside the vocabulary of %d",
                                q->tokens[i], i, mc->n_vocab);
            r->toks[i] = q->tokens[i];
        }
        r->n_prompt = (int)q->n_tokens;
    } else {
        const char *text = q->prompt ? q->prompt : "";
        size_t n = 0;
        if (kvp_tokenizer_encode(a->cfg->tok, text, strlen(text), true, &r->toks, &n, &err))
            return snprintf(why, cap, "tokenizing the prompt: %s", err.msg);
        r->n_prompt = (int)n;
    }
    int n_predict = q->params ? (int)q->params->n_predict : 16;
    if (r->n_prompt < 1) return snprintf(why, cap, "the prompt is empty");
    if ((int64_t)r->n_prompt + n_predict > mc->n_ctx_train)
        return snprintf(why, cap, "%d prompt + %d new tokens exceed the context of %d", r->n_prompt,
                        n_predict, mc->n_ctx_train);
    return 0;
}

static void send_reserve(aux_t *a, aux_req_t *r) {
    Kvpred__Reserve rs = KVPRED__RESERVE__INIT;
    rs.request_id = r->req.id;
    rs.n_prompt = (uint32_t)r->n_prompt;
    rs.mode = (Kvpred__Mode)r->mode;
    rs.params = &r->params;
    rs.n_chunks = (uint32_t)r->n_chunks;
    rs.chunk_tokens = (uint32_t)r->chunk;
    /* KV Prediction: the decoder needs only the last prompt token */
    int baseline = r->mode == KVPRED__MODE__MODE_BASELINE;
    rs.tokens = baseline ? r->toks : r->toks + r->n_prompt - 1;
    rs.n_tokens = baseline ? (size_t)r->n_prompt : 1;
    rs.deadline_wall_ns = kvp_wall_ns() + (int64_t)r->deadline_ms * 1000000;
    int64_t off = 0, rtt = 0;
    kvp_link_dealer_clock(a->down, &off, &rtt); /* predictor clock minus ours */
    rs.clock_offset_ns = off;
    rs.clock_offset_err_ns = rtt / 2;
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    env.body_case = KVPRED__ENVELOPE__BODY_RESERVE;
    env.reserve = &rs;
    kvp_err_t err = {0};
    if (kvp_wire_send(kvp_link_dealer_socket(a->down), &env, NULL, 0, &err))
        fail(a, r, KVP_EPEER, a->stage.name, err.msg);
}

/* Sends the Reserve once the predictor link is up; fails the request when the
 * link was refused or stays down past the peer timeout. */
static void start_pending(aux_t *a, aux_req_t *r) {
    char why[KVP_ERR_MSG_MAX + 128];
    int go = kvp_svc_link_wait(&a->stage, a->down, KVP_STAGE_PREDICTOR, a->link_err,
                               r->pending_since, why, sizeof why);
    if (go > 0) {
        r->st = A_RESERVING;
        send_reserve(a, r);
    } else if (go < 0) {
        fail(a, r, KVP_EPEER, a->stage.name, why);
    }
}

static int setup_aux_only(aux_t *a, aux_req_t *r, kvp_err_t *err) {
    const kvp_model_t *m = a->cfg->model;
    kvp_sampler_params_t sp = {.temp = r->params.temp,
                               .top_k = (int)r->params.top_k,
                               .top_p = r->params.top_p > 0 ? r->params.top_p : 1.0f,
                               .seed = r->params.seed};
    r->logits = malloc(sizeof(float) * (size_t)m->cfg.n_vocab);
    if (!r->logits) return kvp_err_set(err, KVP_ENOMEM, "out of memory");
    int rc = kvp_sampler_new(&r->sampler, &sp, m->cfg.n_vocab, err);
    if (!rc)
        rc = kvp_model_new_cache(m, r->n_prompt + (int)r->params.n_predict + 1, &r->cache, err);
    r->st = A_AUX_PREFILL;
    return rc;
}

static void on_request(aux_t *a, const kvp_wire_id_t *from, const Kvpred__Request *q) {
    char id[KVP_TRACE_ID_MAX], why[320];
    kvp_err_t err = {0};
    void *fs = kvp_link_router_socket(a->front);
    if (!kvp_copy_id(id, sizeof id, q->request_id))
        return (void)kvp_wire_send_error(fs, from, "", KVP_EINVAL, a->stage.name,
                                         "request_id empty or longer than 63 bytes", &err);
    if (find(a, id))
        return (void)kvp_wire_send_error(fs, from, id, KVP_EINVAL, a->stage.name,
                                         "request id already in flight", &err);
    if (a->reqs.n >= a->cfg->c.max_requests) {
        snprintf(why, sizeof why, "aux-prefill busy: %d of %d requests in flight", a->reqs.n,
                 a->cfg->c.max_requests);
        return (void)kvp_wire_send_error(fs, from, id, KVP_EBUSY, a->stage.name, why, &err);
    }
    aux_req_t *r = calloc(1, sizeof *r);
    if (!r)
        return (void)kvp_wire_send_error(fs, from, id, KVP_ENOMEM, a->stage.name, "out of memory",
                                         &err);
    memcpy(r->req.id, id, sizeof id);
    r->req.peer = *from;
    r->mode = q->mode;
    kvp_svc_reqs_add(&a->reqs, &r->req);
    kvp_events_mark_num(&a->stage, &r->ev, r->req.id, KVP_EV_ACCEPTED, -1, 0, 0, KVP_NUM_MODE,
                        q->mode);
    kvpred__gen_params__init(&r->params);
    if (q->params) {
        r->params.n_predict = q->params->n_predict;
        r->params.temp = q->params->temp;
        r->params.top_k = q->params->top_k;
        r->params.top_p = q->params->top_p;
        r->params.seed = q->params->seed;
        r->params.ignore_eos = q->params->ignore_eos;
    } else {
        r->params.n_predict = 16;
    }
    r->deadline_ms = q->deadline_ms ? (int)q->deadline_ms : a->cfg->c.deadline_ms;
    r->req.deadline = kvp_now() + r->deadline_ms / 1e3;
    int max_chunk = a->cfg->c.max_chunk_tokens;
    r->chunk = q->chunk_tokens ? (int)q->chunk_tokens : a->cfg->chunk_tokens;
    if (r->chunk <= 0 || r->chunk > max_chunk) r->chunk = r->chunk <= 0 ? 128 : max_chunk;
    if (q->mode > KVPRED__MODE__MODE_AUX_ONLY)
        return fail(a, r, KVP_EINVAL, a->stage.name, "unknown mode");
    if (tokenize(a, r, q, why, sizeof why)) return fail(a, r, KVP_EINVAL, a->stage.name, why);
    r->starts = malloc(sizeof(int) * (size_t)(r->n_prompt / r->chunk + 36));
    if (!r->starts) return fail(a, r, KVP_ENOMEM, a->stage.name, "out of memory");
    r->n_chunks = kvp_svc_plan_chunks(r->n_prompt - 1, r->chunk,
                                      a->cfg->tail_tokens ? a->cfg->tail_tokens : 16, r->starts);
    if (r->mode == KVPRED__MODE__MODE_AUX_ONLY) /* it prefills every prompt token */
        r->n_chunks = (r->n_prompt + r->chunk - 1) / r->chunk;
    kvp_events_mark_num(&a->stage, &r->ev, r->req.id, KVP_EV_TOKENIZED, -1, 0, 0, KVP_NUM_CHUNKS,
                        r->mode == KVPRED__MODE__MODE_BASELINE ? 0 : r->n_chunks);
    if (a->cfg->c.verbose)
        kvp_stage_log(&a->stage, "request %s: %d tokens, %s, %d chunks", r->req.id, r->n_prompt,
                      mode_name(r->mode), r->n_chunks);
    if (r->mode == KVPRED__MODE__MODE_AUX_ONLY) {
        if (setup_aux_only(a, r, &err)) fail(a, r, err.code, a->stage.name, err.msg);
        return;
    }
    if (r->mode == KVPRED__MODE__MODE_KVP && r->n_prompt > 1 &&
        kvp_model_new_cache(a->cfg->model, r->n_prompt - 1, &r->cache, &err))
        return fail(a, r, err.code, a->stage.name, err.msg);
    r->st = A_PENDING;
    r->pending_since = kvp_now();
    start_pending(a, r);
}

/* ---- model work ---------------------------------------------------------- */

/* Computes the next chunk of the auxiliary prefill and sends its K/V. */
static void work_chunk(aux_t *a, aux_req_t *r) {
    const kvp_model_config_t *mc = &a->cfg->model->cfg;
    int k = r->next_chunk, p0 = r->starts[k], n = r->starts[k + 1] - p0;
    kvp_events_t ev = {0};
    kvp_err_t err = {0};
    mark(a, r, &ev, KVP_EV_AUX_CHUNK_START, k);
    if (kvp_model_forward(a->mctx, r->cache, r->toks + p0, n, NULL, KVP_LOGITS_NONE, &err)) {
        kvp_events_free(&ev);
        return fail(a, r, err.code, a->stage.name, err.msg);
    }
    mark(a, r, &ev, KVP_EV_AUX_CHUNK_END, k);
    int L = mc->n_layer;
    size_t vals = (size_t)n * mc->n_kv_head * mc->head_dim;
    kvp_wire_tensor_t *t = calloc(2 * (size_t)L, sizeof *t);
    int oom = !t;
    for (int l = 0; l < L && !oom; l++) {
        float *kb = malloc(sizeof(float) * vals), *vb = malloc(sizeof(float) * vals);
        if (!kb || !vb || kvp_kvcache_read(r->cache, l, p0, n, kb, vb, &err)) {
            free(kb), free(vb);
            oom = 1;
            for (int j = 0; j < l; j++)
                free((void *)t[j].data), free((void *)t[L + j].data);
            break;
        }
        t[l] = (kvp_wire_tensor_t){kb, vals, kvp_svc_free_frame, NULL};
        t[L + l] = (kvp_wire_tensor_t){vb, vals, kvp_svc_free_frame, NULL};
    }
    if (oom) {
        free(t);
        kvp_events_free(&ev);
        return fail(a, r, KVP_ENOMEM, a->stage.name, "out of memory for a chunk");
    }
    mark(a, r, &ev, KVP_EV_CHUNK_SENT, k);
    Kvpred__Chunk c = KVPRED__CHUNK__INIT;
    c.request_id = r->req.id;
    c.seq = (uint32_t)k;
    c.layer_begin = 0;
    c.layer_end = (uint32_t)L;
    c.pos_begin = (uint32_t)p0;
    c.pos_end = (uint32_t)(p0 + n);
    c.dtype = (Kvpred__DType)a->cfg->c.dtype;
    c.n_kv_head = (uint32_t)mc->n_kv_head;
    c.head_dim = (uint32_t)mc->head_dim;
    c.last = k + 1 == r->n_chunks;
    int rc = kvp_svc_send_chunk(a->down, &c, &ev, t, 2 * (size_t)L, &err);
    free(t);
    kvp_events_free(&ev);
    if (rc) return fail(a, r, KVP_EPEER, a->stage.name, err.msg);
    r->credits--;
    if (++r->next_chunk == r->n_chunks) {
        r->st = A_WAITING;
        kvp_kvcache_free(&r->cache); /* the auxiliary cache is not needed any more */
    }
}

static void send_token(aux_t *a, aux_req_t *r, int32_t tok) {
    kvp_svc_token_msg_t tm;
    kvp_svc_token_msg(&tm, a->cfg->tok, r->req.id, r->n_generated, tok);
    send_client(a, r, &tm.env);
}

static void send_done(aux_t *a, aux_req_t *r, Kvpred__TraceEvent *const *down, size_t n_down,
                      uint32_t n_generated) {
    kvp_events_t all = {0};
    kvp_events_add_proto(&all, down, n_down, r->req.id);
    kvp_events_append(&all, r->ev.recs, r->ev.n); /* ours: accepted, tokenized, ... */
    kvp_svc_done_msg_t dm;
    kvp_svc_done_msg(&dm, r->req.id, n_generated, &all);
    send_client(a, r, &dm.env);
    kvp_svc_done_msg_free(&dm);
    kvp_events_free(&all);
}

/* Aux-only: prefill in chunks, then one token per unit of work. */
static void work_aux_only(aux_t *a, aux_req_t *r) {
    kvp_err_t err = {0};
    if (r->st == A_AUX_PREFILL) {
        int p0 = r->prefilled, n = r->n_prompt - p0 < r->chunk ? r->n_prompt - p0 : r->chunk;
        int last = p0 + n == r->n_prompt;
        mark(a, r, &r->ev, KVP_EV_AUX_CHUNK_START, p0 / r->chunk);
        if (kvp_model_forward(a->mctx, r->cache, r->toks + p0, n, r->logits,
                              last ? KVP_LOGITS_LAST : KVP_LOGITS_NONE, &err))
            return fail(a, r, err.code, a->stage.name, err.msg);
        mark(a, r, &r->ev, KVP_EV_AUX_CHUNK_END, p0 / r->chunk);
        r->prefilled += n;
        if (!last) return;
        mark(a, r, &r->ev, KVP_EV_AUX_DECODE, -1);
        r->st = A_AUX_DECODE;
    } else if (kvp_model_forward(a->mctx, r->cache, &r->last, 1, r->logits, KVP_LOGITS_LAST,
                                 &err)) {
        return fail(a, r, err.code, a->stage.name, err.msg);
    }
    int32_t tok = kvp_sampler_sample(r->sampler, r->logits);
    if (r->n_generated == 0) mark(a, r, &r->ev, KVP_EV_FIRST_TOKEN, -1);
    mark(a, r, &r->ev, KVP_EV_TOKEN, r->n_generated);
    send_token(a, r, tok);
    r->n_generated++;
    r->last = tok;
    int eos = !r->params.ignore_eos && tok == kvp_tokenizer_eos(a->cfg->tok);
    if (r->n_generated >= (int)r->params.n_predict || eos || r->cache->len >= r->cache->cap) {
        mark(a, r, &r->ev, KVP_EV_DONE, -1);
        send_done(a, r, NULL, 0, (uint32_t)r->n_generated);
        drop(a, r);
    }
}

static int has_work(const kvp_svc_req_t *q) {
    const aux_req_t *r = (const aux_req_t *)q;
    return (r->st == A_STREAMING && r->credits > 0 && r->next_chunk < r->n_chunks) ||
           r->st == A_AUX_PREFILL || r->st == A_AUX_DECODE;
}

static aux_req_t *next_work(aux_t *a) {
    return (aux_req_t *)kvp_svc_reqs_next_work(&a->reqs, has_work);
}

static void work(aux_t *a, aux_req_t *r) {
    if (r->st == A_STREAMING)
        work_chunk(a, r);
    else
        work_aux_only(a, r);
}

/* ---- messages ------------------------------------------------------------ */

static void on_front(void *stage, kvp_wire_msg_t *m) {
    aux_t *a = stage;
    Kvpred__Envelope *env = m->env;
    switch (env->body_case) {
    case KVPRED__ENVELOPE__BODY_REQUEST:
        return on_request(a, &m->from, env->request);
    case KVPRED__ENVELOPE__BODY_CANCEL: {
        aux_req_t *r = find(a, kvp_wire_request_id(env));
        if (r && kvp_svc_same_peer(&r->req.peer, &m->from)) {
            if (r->mode != KVPRED__MODE__MODE_AUX_ONLY)
                kvp_svc_send_cancel(a->down, r->req.id, "cancelled by the client");
            drop(a, r);
        }
        return;
    }
    default:
        kvp_svc_refuse_body(&a->stage, a->front, m, "aux-prefill", " from clients");
    }
}

static void on_down(void *stage, kvp_wire_msg_t *m) {
    aux_t *a = stage;
    Kvpred__Envelope *env = m->env;
    aux_req_t *r = find(a, kvp_wire_request_id(env));
    if (!r || r->mode == KVPRED__MODE__MODE_AUX_ONLY) return;
    switch (env->body_case) {
    case KVPRED__ENVELOPE__BODY_RESERVED:
        if (r->st != A_RESERVING) return;
        mark(a, r, &r->ev, KVP_EV_RESERVED, -1);
        r->credits = (int)env->reserved->credits;
        r->st = r->mode == KVPRED__MODE__MODE_KVP && r->n_chunks > 0 ? A_STREAMING : A_WAITING;
        return;
    case KVPRED__ENVELOPE__BODY_CREDIT:
        r->credits += (int)env->credit->credits;
        return;
    case KVPRED__ENVELOPE__BODY_TOKEN:
        send_client(a, r, env);
        return;
    case KVPRED__ENVELOPE__BODY_DONE:
        send_done(a, r, env->done->trace, env->done->n_trace, env->done->n_generated);
        if (a->cfg->c.verbose) kvp_stage_log(&a->stage, "request %s done", r->req.id);
        drop(a, r);
        return;
    case KVPRED__ENVELOPE__BODY_ERROR: {
        Kvpred__Error *e = env->error;
        kvp_err_t err = {0};
        kvp_wire_send_error(kvp_link_router_socket(a->front), &r->req.peer, r->req.id, e->code,
                            e->stage, e->message, &err);
        kvp_stage_log(&a->stage, "request %s failed at %s: %s", r->req.id, e->stage, e->message);
        drop(a, r);
        return;
    }
    default:
        return;
    }
}

/* The predictor link failed or went silent: every request that needs it
 * fails, and those that arrive while it is down are told why. */
static void lost_down(void *stage, const char *why) {
    aux_t *a = stage;
    kvp_stage_log(&a->stage, "%s", why);
    snprintf(a->link_err, sizeof a->link_err, "%s", why);
    for (kvp_svc_req_t *q = a->reqs.head, *nx; q; q = nx) {
        aux_req_t *r = (aux_req_t *)q;
        nx = q->next;
        if (r->mode != KVPRED__MODE__MODE_AUX_ONLY) fail(a, r, KVP_EPEER, a->stage.name, why);
    }
}

static void refused_front(void *stage, kvp_wire_msg_t *m, int code, const char *why) {
    aux_t *a = stage;
    kvp_svc_send_error(&a->stage, a->front, &m->from, m->env ? kvp_wire_request_id(m->env) : "",
                       code, why);
}

static void refused_down(void *stage, kvp_wire_msg_t *m, int code, const char *why) {
    aux_t *a = stage;
    aux_req_t *r = m->env ? find(a, kvp_wire_request_id(m->env)) : NULL;
    if (r) fail(a, r, code, a->stage.name, why);
}

static const kvp_svc_inbox_t front_inbox = {
    .refused = "refused a client message", .on_refused = refused_front, .on_message = on_front};
static const kvp_svc_inbox_t down_inbox = {.refused = "refused a message from the predictor",
                                           .on_refused = refused_down,
                                           .on_link_error = lost_down,
                                           .on_message = on_down};

static void check_timers(aux_t *a) {
    double now = kvp_now();
    kvp_err_t err = {0};
    if (kvp_link_dealer_tick(a->down, now, &err) == KVP_ETIMEOUT) lost_down(a, err.msg);
    for (kvp_svc_req_t *q = a->reqs.head, *nx; q; q = nx) {
        aux_req_t *r = (aux_req_t *)q;
        nx = q->next;
        if (r->st == A_PENDING) start_pending(a, r);
    }
    kvp_wire_id_t dead;
    while (kvp_link_router_tick(a->front, now, &dead, &err) == 1) {
        kvp_svc_req_t *q;
        while ((q = kvp_svc_reqs_from_peer(&a->reqs, &dead))) {
            aux_req_t *r = (aux_req_t *)q;
            if (r->mode != KVPRED__MODE__MODE_AUX_ONLY)
                kvp_svc_send_cancel(a->down, r->req.id, "the client went silent");
            drop(a, r);
        }
    }
    static const char *const states[] = {"waiting for the link to the predictor",
                                         "waiting for the decoder's reservation",
                                         "streaming chunks",
                                         "waiting for tokens",
                                         "aux prefill",
                                         "aux decoding"};
    kvp_svc_req_t *q;
    while ((q = kvp_svc_reqs_expired(&a->reqs, now, 0))) {
        aux_req_t *r = (aux_req_t *)q;
        char msg[256];
        snprintf(msg, sizeof msg, "deadline of %d ms passed while %s (chunk %d of %d)",
                 r->deadline_ms, states[r->st], r->next_chunk, r->n_chunks);
        fail(a, r, KVP_ETIMEOUT, a->stage.name, msg);
    }
}

static int aux_open(aux_t *a, const kvp_aux_cfg_t *cfg, kvp_err_t *err) {
    const kvp_model_t *m = cfg->model;
    int rc = kvp_stage_open(&a->stage, &cfg->c, KVP_STAGE_AUX, err);
    if (rc) return rc;
    char fp[17];
    kvp_model_fingerprint(m, fp);
    Kvpred__Hello h;
    Kvpred__CacheShape as;
    kvp_svc_hello_init(&h, &a->stage);
    kvp_cache_shape_of(&as, m);
    h.aux_fingerprint = fp;
    h.aux_shape = &as;
    /* clients know no fingerprints */
    rc = kvp_svc_listen(&a->stage, cfg->listen ? cfg->listen : KVP_SVC_AUX_ENDPOINT, &h,
                        KVP_WIRE_HELLO_PROTOCOL_VERSION, &a->front, err);
    if (rc) return rc;
    rc = kvp_svc_connect(&a->stage, cfg->downstream ? cfg->downstream : KVP_SVC_PRED_ENDPOINT,
                         KVP_STAGE_PREDICTOR, &h, &a->down, err);
    if (rc) return rc;
    kvp_wire_limits_init(&a->lim_front, 0, 0, 0, 0);
    kvp_wire_limits_init(&a->lim_down, 0, 0, 0, 0);
    int chunk =
        cfg->c.max_chunk_tokens > cfg->chunk_tokens ? cfg->c.max_chunk_tokens : cfg->chunk_tokens;
    return kvp_model_ctx_new(&a->mctx, m, chunk > 0 ? chunk : 512, m->cfg.n_ctx_train + 1, err);
}

static void aux_close(aux_t *a) {
    while (a->reqs.head)
        drop(a, (aux_req_t *)a->reqs.head);
    kvp_model_ctx_free(&a->mctx);
    kvp_link_dealer_free(&a->down);
    kvp_link_router_free(&a->front);
    kvp_stage_close(&a->stage);
}

int kvp_svc_aux_run(const kvp_aux_cfg_t *cfg, kvp_err_t *err) {
    aux_t a = {.cfg = cfg};
    int rc = aux_open(&a, cfg, err);
    if (rc) {
        aux_close(&a);
        return rc;
    }
    kvp_stage_log(&a.stage, "listening on %s, predictor at %s (aux model %d layers)",
                  kvp_link_router_endpoint(a.front), kvp_link_dealer_endpoint(a.down),
                  cfg->model->cfg.n_layer);
    kvp_stage_ready(&a.stage);
    kvp_wire_msg_t m;
    kvp_wire_msg_init(&m);
    while (!kvp_stage_stopped(&a.stage)) {
        kvp_svc_poll(a.front, a.down, kvp_svc_reqs_any_work(&a.reqs, has_work));
        kvp_svc_drain_dealer(&a.stage, a.down, &a.lim_down, &m, &down_inbox, &a);
        kvp_svc_drain_router(&a.stage, a.front, &a.lim_front, &m, &front_inbox, &a);
        check_timers(&a);
        aux_req_t *r = next_work(&a);
        if (r) work(&a, r);
    }
    kvp_wire_msg_free(&m);
    aux_close(&a);
    return KVP_OK;
}
