/* kvp_svc: the three pipeline stages as functions, so that each runs as its
 * own process (services/<stage>/main.c) or, for tests, as threads of one
 * process over inproc:// endpoints sharing one ZeroMQ context.
 *
 *   client --Request--> aux-prefill --Reserve, Chunk*--> predictor --Reserve, Chunk*--> decoder
 *   client <--Token*, Done/Error-- aux-prefill <--Reserved, Credit, Token*, Done-- ...
 *
 * Each stage binds a ROUTER for its upstream and connects a DEALER to its
 * downstream (kvp_link: handshake, heartbeats, clock offsets). docs/pipeline.md
 * tells one request's story. A stage runs single-threaded: a zmq_poll loop
 * that drains messages, then does one unit of model work (one chunk, one
 * token) for one request in turn, so heartbeats are answered between units
 * and requests share the stage fairly. */
#ifndef KVP_SVC_H
#define KVP_SVC_H

#include <stdatomic.h>
#include <stdio.h>

#include "kvp_err.h"
#include "kvp_link.h"
#include "kvp_model.h"
#include "kvp_predictor.h"
#include "kvp_tokenizer.h"

#define KVP_SVC_AUX_ENDPOINT "tcp://127.0.0.1:7601"
#define KVP_SVC_PRED_ENDPOINT "tcp://127.0.0.1:7602"
#define KVP_SVC_DEC_ENDPOINT "tcp://127.0.0.1:7603"

/* Settings every stage has. */
typedef struct kvp_svc_common {
    void *zmq_ctx;          /* shared context (inproc tests); NULL: the stage makes one */
    const char *trace_path; /* MessagePack trace log; NULL: none */
    const char *host;       /* label in traces; NULL: the host name */
    double ping_interval;   /* s (default 0.25) */
    double peer_timeout;    /* s of silence before a peer is dead (default 2) */
    int bind_any;           /* allow binding a wildcard address */
    const kvp_link_curve_t *curve_server; /* the bound socket's keys, or NULL */
    const kvp_link_curve_t *curve_client; /* the connecting socket's keys, or NULL */
    int max_requests;     /* requests in flight; more are answered "busy" (default 8) */
    int deadline_ms;      /* a request's deadline unless it names one (default 60000) */
    int max_chunk_tokens; /* the largest chunk on the wire (default 512) */
    int dtype;            /* KVPRED__DTYPE__DTYPE_F32 or _F16 on the wire */
    atomic_int *stop;     /* the loop ends when this becomes non-zero */
    atomic_int *ready;    /* set to 1 once the stage has bound its socket (may be NULL) */
    FILE *log;            /* one line per notable event; NULL: stderr */
    int verbose;          /* also log every request */
} kvp_svc_common_t;

void kvp_svc_common_init(kvp_svc_common_t *c);

typedef struct kvp_aux_cfg {
    kvp_svc_common_t c;
    const char *listen;     /* clients (default KVP_SVC_AUX_ENDPOINT) */
    const char *downstream; /* the predictor (default KVP_SVC_PRED_ENDPOINT) */
    const kvp_model_t *model;
    const kvp_tokenizer_t *tok;
    int chunk_tokens; /* prompt tokens per chunk unless the request names it (128) */
    int tail_tokens;  /* the prompt's end is cut into halving chunks down to this
                         size (0: 16; -1: off); see kvp_svc_plan_chunks */
} kvp_aux_cfg_t;

/* Chunk boundaries for the n positions aux-prefill sends: chunks of `chunk`
 * tokens, except that the last stretch of at most `chunk` tokens is cut into
 * halving pieces down to at most `tail` tokens (tail <= 0: no cutting). What
 * happens after the last auxiliary chunk — predicting, sending and writing
 * it — is the exposed part of the hand-over, and while the predictor maps one
 * piece the auxiliary model computes the next, half as long. starts gets
 * n_chunks + 1 entries (starts[n_chunks] == n); it needs room for
 * n / chunk + 34. Returns n_chunks. */
int kvp_svc_plan_chunks(int n, int chunk, int tail, int *starts);

typedef struct kvp_pred_cfg {
    kvp_svc_common_t c;
    const char *listen;     /* aux-prefill stages (default KVP_SVC_PRED_ENDPOINT) */
    const char *downstream; /* the decoder (default KVP_SVC_DEC_ENDPOINT) */
    const kvp_predictor_t *pred;
} kvp_pred_cfg_t;

typedef struct kvp_dec_cfg {
    kvp_svc_common_t c;
    const char *listen; /* predictor stages (default KVP_SVC_DEC_ENDPOINT) */
    const kvp_model_t *model;
    const kvp_tokenizer_t *tok;
    int credits;       /* chunks a producer may have in flight per request (default 4) */
    int prefill_chunk; /* baseline mode: tokens per prefill step (default 512) */
} kvp_dec_cfg_t;

/* Each runs until *c.stop becomes non-zero (0) or a set-up error (bind,
 * model, trace log), returned with err. */
int kvp_svc_aux_run(const kvp_aux_cfg_t *cfg, kvp_err_t *err);
int kvp_svc_pred_run(const kvp_pred_cfg_t *cfg, kvp_err_t *err);
int kvp_svc_dec_run(const kvp_dec_cfg_t *cfg, kvp_err_t *err);

#endif
