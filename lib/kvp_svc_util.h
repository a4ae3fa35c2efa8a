/* kvp_svc_util: what the three pipeline stages (kvp_svc_*.c) and the client
 * share: a stage's environment (ZeroMQ context, trace log, log lines), event
 * lists that travel in-band with chunks and Done messages, and Hello
 * builders. Not part of the public API. */
#ifndef KVP_SVC_UTIL_H
#define KVP_SVC_UTIL_H

#include <stdint.h>

#include "kvp_svc.h"
#include "kvp_trace.h"
#include "kvp_wire.h"

/* A stage's environment. */
typedef struct kvp_stage {
    const kvp_svc_common_t *c;
    const char *name; /* KVP_STAGE_* */
    void *ctx;
    int own_ctx;
    kvp_trace_writer_t *trace;
    char host[KVP_TRACE_HOST_MAX];
    FILE *log;
} kvp_stage_t;

int kvp_stage_open(kvp_stage_t *s, const kvp_svc_common_t *c, const char *name, kvp_err_t *err);
void kvp_stage_close(kvp_stage_t *s);
void kvp_stage_log(const kvp_stage_t *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void kvp_stage_ready(const kvp_stage_t *s);
int kvp_stage_stopped(const kvp_stage_t *s);
void kvp_link_settings_from(kvp_link_settings_t *ls, const kvp_svc_common_t *c, const char *name,
                            const char *peer_name);

/* Events of one request, kept to travel in-band (Chunk.trace, Done.trace). */
typedef struct kvp_events {
    kvp_trace_rec_t *recs;
    size_t n, cap;
} kvp_events_t;

void kvp_events_free(kvp_events_t *e);
/* Records an event of this stage now: in the trace log (if any) and in e (if
 * not NULL). offset/err: this stage's clock minus the entry clock. */
void kvp_events_mark(kvp_stage_t *s, kvp_events_t *e, const char *request_id, const char *event,
                     int32_t chunk, int64_t offset_ns, int64_t offset_err_ns);
/* The same with one number attached (KVP_NUM_*). */
void kvp_events_mark_num(kvp_stage_t *s, kvp_events_t *e, const char *request_id, const char *event,
                         int32_t chunk, int64_t offset_ns, int64_t offset_err_ns, const char *key,
                         double value);
/* Appends events received in a message. */
void kvp_events_add_proto(kvp_events_t *e, Kvpred__TraceEvent *const *evs, size_t n,
                          const char *request_id);
/* Appends records as they are. */
void kvp_events_append(kvp_events_t *e, const kvp_trace_rec_t *recs, size_t n);
/* Proto TraceEvents of e[from..] for sending, pointing into e (keep e alive
 * until sent); freed with kvp_events_proto_free. */
typedef struct kvp_events_proto {
    Kvpred__TraceEvent **ptrs;
    Kvpred__TraceEvent *evs;
    Kvpred__TraceNum *nums;
    Kvpred__TraceNum **num_ptrs;
    size_t n;
} kvp_events_proto_t;

int kvp_events_to_proto(const kvp_events_t *e, size_t from, kvp_events_proto_t *out);
void kvp_events_proto_free(kvp_events_proto_t *p);

/* The KV shape of a model as the wire carries it. */
void kvp_cache_shape_of(Kvpred__CacheShape *cs, const kvp_model_t *m);

/* Copies at most cap-1 bytes of a request id; 0 if it was empty or too long. */
int kvp_copy_id(char *dst, size_t cap, const char *id);

#endif
