/* kvp_client: the pipeline's client side — connects to aux-prefill, sends
 * requests (several in flight at once), collects their tokens as they stream
 * back and each request's trace (the stages' events, carried in Done, plus
 * the client's own send / first-token / done times on the entry clock). Used
 * by `kvpred client`, the integration tests and `kvpred bench handoff`. */
#ifndef KVP_CLIENT_H
#define KVP_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "kvp_err.h"
#include "kvp_link.h"
#include "kvp_trace.h"

typedef struct kvp_client_req {
    const char *id;        /* unique among requests in flight */
    const char *prompt;    /* text, or */
    const int32_t *tokens; /* token ids (n_tokens > 0) */
    size_t n_tokens;
    int mode; /* KVPRED__MODE__* */
    int n_predict;
    float temp; /* 0: greedy */
    int top_k;
    float top_p;
    uint64_t seed;
    int ignore_eos;
    int deadline_ms;  /* 0: the stage's default */
    int chunk_tokens; /* 0: the stage's default */
} kvp_client_req_t;

typedef struct kvp_client_result {
    char id[KVP_TRACE_ID_MAX];
    int32_t *tokens; /* generated ids */
    int n_tokens;
    char *text; /* generated text (NUL-terminated) */
    size_t text_len;
    int code;       /* 0, or the KVP_E* code of the Error that ended it */
    char stage[32]; /* the stage that reported the error */
    char error[512];
    kvp_trace_rec_t *events; /* every stage's events and the client's */
    size_t n_events;
} kvp_client_result_t;

void kvp_client_result_free(kvp_client_result_t *r);

typedef struct kvp_client kvp_client_t;

/* Connects (zmq_ctx NULL: its own context) and waits up to wait_s for the
 * handshake with aux-prefill; a refused or silent peer is a named error. */
int kvp_client_new(kvp_client_t **out, void *zmq_ctx, const char *endpoint,
                   const kvp_link_curve_t *curve, double wait_s, kvp_err_t *err);
void kvp_client_free(kvp_client_t **c);

/* Called for each token as it arrives (may be NULL). */
typedef void (*kvp_client_token_cb)(void *user, size_t req_index, int32_t token,
                                    const uint8_t *piece, size_t len);

/* Runs n requests with at most `concurrency` in flight, until each has ended
 * in Done or an Error, or timeout_s passes (the rest end with KVP_ETIMEOUT).
 * results[n] are filled (free each with kvp_client_result_free). Returns 0
 * when every request was answered (answers may be errors), else an error. */
int kvp_client_run(kvp_client_t *c, const kvp_client_req_t *reqs, size_t n, int concurrency,
                   double timeout_s, kvp_client_token_cb cb, void *user,
                   kvp_client_result_t *results, kvp_err_t *err);

#endif
