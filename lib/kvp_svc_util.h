/* kvp_svc_util: what the three pipeline stages (kvp_svc_*.c) share: a
 * stage's environment (ZeroMQ context, trace log, log lines), its requests in
 * flight, its links and how it drains them, event lists that travel in-band
 * with chunks and Done messages, and the messages more than one stage builds
 * (Hello, Token, Done, Chunk, Cancel). Not part of the public API. */
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

/* ---- requests in flight ------------------------------------------------- */

/* What every stage keeps of a request, whatever else it holds. A stage's
 * record (aux_req_t, pred_req_t, dec_req_t) has one as its first member, so
 * that one list serves all three stages and a kvp_svc_req_t * converts back
 * to the stage's record (C11 6.7.2.1p15). */
typedef struct kvp_svc_req {
    char id[KVP_TRACE_ID_MAX];
    kvp_wire_id_t peer; /* who sent it to our ROUTER: a client, or the stage upstream */
    double deadline;    /* kvp_now() seconds */
    struct kvp_svc_req *next;
} kvp_svc_req_t;

/* A stage's requests in flight, newest first. */
typedef struct kvp_svc_reqs {
    kvp_svc_req_t *head;
    kvp_svc_req_t *turn; /* the one last given model work (kvp_svc_reqs_next_work) */
    int n;
} kvp_svc_reqs_t;

kvp_svc_req_t *kvp_svc_reqs_find(const kvp_svc_reqs_t *l, const char *id);
void kvp_svc_reqs_add(kvp_svc_reqs_t *l, kvp_svc_req_t *r);
/* Takes r out of the list (the caller frees it); the turn passes to the next. */
void kvp_svc_reqs_remove(kvp_svc_reqs_t *l, kvp_svc_req_t *r);
/* The first request that came from peer, or NULL. A stage calls it until
 * NULL, removing each one, to end the requests of a peer that went silent. */
kvp_svc_req_t *kvp_svc_reqs_from_peer(const kvp_svc_reqs_t *l, const kvp_wire_id_t *peer);
/* The first request whose deadline plus grace seconds is before now, or
 * NULL; called the same way. */
kvp_svc_req_t *kvp_svc_reqs_expired(const kvp_svc_reqs_t *l, double now, double grace);
/* Round-robin: the first request after the turn (wrapping round) for which
 * has_work is true, which becomes the turn; NULL when none has work. */
kvp_svc_req_t *kvp_svc_reqs_next_work(kvp_svc_reqs_t *l, int (*has_work)(const kvp_svc_req_t *r));
/* Whether any request has work, without moving the turn: a loop that asks
 * "busy?" before polling must not use next_work, or with two requests ready
 * the turn would move twice per unit and one of them would always be
 * skipped. */
int kvp_svc_reqs_any_work(const kvp_svc_reqs_t *l, int (*has_work)(const kvp_svc_req_t *r));
int kvp_svc_same_peer(const kvp_wire_id_t *a, const kvp_wire_id_t *b);

/* ---- links -------------------------------------------------------------- */

/* Binds the stage's ROUTER for the side upstream (clients, or the stage
 * before) with the stage's server CURVE keys; a peer's Hello must agree with
 * ours on the fields in hello_mask (KVP_WIRE_HELLO_*). */
int kvp_svc_listen(const kvp_stage_t *s, const char *endpoint, const Kvpred__Hello *ours,
                   unsigned hello_mask, kvp_link_router_t **out, kvp_err_t *err);
/* Connects the stage's DEALER to the next stage (peer_name, KVP_STAGE_*)
 * with the stage's client CURVE keys and sends it our Hello. */
int kvp_svc_connect(const kvp_stage_t *s, const char *endpoint, const char *peer_name,
                    const Kvpred__Hello *ours, kvp_link_dealer_t **out, kvp_err_t *err);

/* Waits for a message on the stage's ROUTER and DEALER (down may be NULL)
 * until the links' next timer is due, or not at all when busy (model work is
 * waiting); never longer than 100 ms, so that the stop flag and deadlines
 * are looked at. */
void kvp_svc_poll(const kvp_link_router_t *up, const kvp_link_dealer_t *down, int busy);

/* What a stage does with the messages arriving on one of its links; `stage`
 * is the stage's own state, given to kvp_svc_drain_*. */
typedef struct kvp_svc_inbox {
    const char *refused; /* log line for a message the wire refused:
                            "refused a message from the decoder" (": why" follows) */
    /* After the log line: the wire refused a message with code; m->env, when
     * set, names the request. NULL: only logged. */
    void (*on_refused)(void *stage, kvp_wire_msg_t *m, int code, const char *why);
    /* The link reported a failure (kvp_link_*_handle < 0). NULL: it is logged;
     * a stage that must act on it (its link downstream is lost) logs it too. */
    void (*on_link_error)(void *stage, const char *why);
    /* An application message from a handshaken peer. */
    void (*on_message)(void *stage, kvp_wire_msg_t *m);
} kvp_svc_inbox_t;

/* Takes every message waiting on the link, without blocking: refused ones
 * and link messages (Hello, Ping, Pong) as the inbox says, the rest to
 * in->on_message. m is the stage's reusable message. Stops early at a socket
 * error (KVP_EIO), which the next poll would only repeat. */
void kvp_svc_drain_router(kvp_stage_t *s, kvp_link_router_t *l, const kvp_wire_limits_t *lim,
                          kvp_wire_msg_t *m, const kvp_svc_inbox_t *in, void *stage);
void kvp_svc_drain_dealer(kvp_stage_t *s, kvp_link_dealer_t *l, const kvp_wire_limits_t *lim,
                          kvp_wire_msg_t *m, const kvp_svc_inbox_t *in, void *stage);

/* For a request waiting since `since` to be sent to the next stage: 1 when
 * the link is up; 0 while its handshake may still finish (within the peer
 * timeout); -1 when it was refused, died or took too long, with why naming
 * the peer, its endpoint, the link's state and link_err (the last failure
 * the link reported, may be ""). */
int kvp_svc_link_wait(const kvp_stage_t *s, const kvp_link_dealer_t *down, const char *peer_name,
                      const char *link_err, double since, char *why, size_t cap);

/* ---- messages more than one stage sends ---------------------------------- */

/* A stage's Hello with what every stage states: its role, the dtype on the
 * wire and the largest chunk. The caller adds fingerprints and shapes. */
void kvp_svc_hello_init(Kvpred__Hello *h, const kvp_stage_t *s);

/* Asks the next stage to drop a request. Best effort: a lost Cancel only
 * leaves the request to the next stage's deadline. */
void kvp_svc_send_cancel(kvp_link_dealer_t *down, const char *request_id, const char *reason);

/* Answers a peer of the stage's ROUTER with an Error from this stage. Best
 * effort: a peer that is gone cannot be told. */
void kvp_svc_send_error(const kvp_stage_t *s, kvp_link_router_t *up, const kvp_wire_id_t *to,
                        const char *request_id, int code, const char *msg);

/* Refuses a message of a kind the stage does not take, with an Error naming
 * it: "<who> does not take <Body> messages<from_whom>". */
void kvp_svc_refuse_body(const kvp_stage_t *s, kvp_link_router_t *up, const kvp_wire_msg_t *m,
                         const char *who, const char *from_whom);

/* Sends a Chunk downstream with its K/V tensors (ownership as in
 * kvp_wire_send) and the request's events so far in c->trace (which points
 * into a copy freed before return). */
int kvp_svc_send_chunk(kvp_link_dealer_t *down, Kvpred__Chunk *c, const kvp_events_t *ev,
                       const kvp_wire_tensor_t *t, size_t n_t, kvp_err_t *err);
/* kvp_wire_free_fn for a malloc'ed tensor handed to the wire. */
void kvp_svc_free_frame(void *data, void *hint);

/* The Token message for token id, the index-th of the request, with its
 * text piece; env points into the struct, which must stay where it is. */
typedef struct kvp_svc_token_msg {
    Kvpred__Envelope env;
    Kvpred__Token token;
    char piece[256];
} kvp_svc_token_msg_t;

void kvp_svc_token_msg(kvp_svc_token_msg_t *tm, const kvp_tokenizer_t *tok, const char *request_id,
                       int index, int32_t id);

/* The Done message with the events in ev (kept alive until sent); freed with
 * kvp_svc_done_msg_free. */
typedef struct kvp_svc_done_msg {
    Kvpred__Envelope env;
    Kvpred__Done done;
    kvp_events_proto_t ep;
} kvp_svc_done_msg_t;

void kvp_svc_done_msg(kvp_svc_done_msg_t *dm, const char *request_id, uint32_t n_generated,
                      const kvp_events_t *ev);
void kvp_svc_done_msg_free(kvp_svc_done_msg_t *dm);

#endif
