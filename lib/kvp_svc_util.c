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
