/* kvp_trace: per-request timestamps at every pipeline stage boundary, written
 * by each stage to its own MessagePack log, read back, merged on one clock and
 * turned into a TTFT breakdown and a Chrome/Perfetto trace.
 *
 * Every record carries the stage's own CLOCK_REALTIME (wall_ns) and the link
 * layer's estimate of that clock minus the entry stage's (aux-prefill) clock
 * (offset_ns), with the estimate's error bound (offset_err_ns). Analysis puts
 * every time on the entry clock: t = wall_ns - offset_ns. docs/tracing.md
 * describes the events, the file format and the breakdown. */
#ifndef KVP_TRACE_H
#define KVP_TRACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kvp_err.h"

/* Version of the log format, in every header record. */
#define KVP_TRACE_FORMAT_VERSION 1

/* Stages. */
#define KVP_STAGE_CLIENT "client"
#define KVP_STAGE_AUX "aux-prefill"
#define KVP_STAGE_PREDICTOR "predictor"
#define KVP_STAGE_DECODER "decoder"

/* Events: the only place their names are spelled. "chunk k" events carry the
 * chunk index in the record's chunk field; others carry -1 (except token). */
#define KVP_EV_ACCEPTED "accepted"                   /* aux-prefill received the request */
#define KVP_EV_TOKENIZED "tokenized"                 /* aux-prefill: prompt tokenized */
#define KVP_EV_RESERVED "reserved"                   /* aux-prefill: decoder's reservation back */
#define KVP_EV_AUX_CHUNK_START "aux_chunk_start"     /* aux-prefill: chunk k prefill begins */
#define KVP_EV_AUX_CHUNK_END "aux_chunk_end"         /* aux-prefill: chunk k prefill ends */
#define KVP_EV_CHUNK_SENT "chunk_sent"               /* aux-prefill: chunk k handed to the link */
#define KVP_EV_PRED_RECV "pred_recv"                 /* predictor: chunk k received */
#define KVP_EV_PRED_MAPPED "pred_mapped"             /* predictor: chunk k mapped to base K/V */
#define KVP_EV_PRED_SENT "pred_sent"                 /* predictor: chunk k handed to the link */
#define KVP_EV_DEC_RECV "dec_recv"                   /* decoder: chunk k received */
#define KVP_EV_DEC_WRITTEN "dec_written"             /* decoder: chunk k written into the cache */
#define KVP_EV_CACHE_COMPLETE "cache_complete"       /* decoder: every chunk written */
#define KVP_EV_DEC_PREFILL_START "dec_prefill_start" /* baseline: decoder prefills itself */
#define KVP_EV_DEC_PREFILL_END "dec_prefill_end"
#define KVP_EV_AUX_DECODE "aux_decode"   /* aux-only: aux-prefill starts decoding */
#define KVP_EV_FIRST_TOKEN "first_token" /* the stage that decodes: token 0 sampled */
#define KVP_EV_TOKEN "token"             /* token i sampled (i in the chunk field) */
#define KVP_EV_DONE "done"               /* generation finished */
#define KVP_EV_ERROR "error"             /* the request failed at this stage */
#define KVP_EV_CLIENT_SEND "client_send" /* client: request sent */
#define KVP_EV_CLIENT_FIRST_TOKEN "client_first_token"
#define KVP_EV_CLIENT_DONE "client_done"

/* Names of optional numbers a record may carry. */
#define KVP_NUM_MODE "mode"     /* on accepted: the proto Mode (0 kvp, 1 baseline, 2 aux-only) */
#define KVP_NUM_CHUNKS "chunks" /* on tokenized: number of chunks the prompt is cut into */
#define KVP_NUM_TOKENS "tokens" /* prompt tokens (tokenized, chunk events) or generated (done) */
#define KVP_NUM_BYTES "bytes"   /* bytes sent or received */
#define KVP_NUM_CODE "code"     /* on error: the KVP_E* code */

#define KVP_TRACE_ID_MAX 64   /* request id bytes + NUL */
#define KVP_TRACE_NAME_MAX 32 /* stage, event */
#define KVP_TRACE_KEY_MAX 16  /* number key */
#define KVP_TRACE_HOST_MAX 72 /* host name (Linux: up to 64 bytes) */
#define KVP_TRACE_NUMS_MAX 4  /* numbers on one record */

/* A value not measured (a part of the breakdown that does not apply). */
#define KVP_TRACE_NONE INT64_MIN

typedef struct kvp_trace_num {
    char key[KVP_TRACE_KEY_MAX];
    double v;
} kvp_trace_num_t;

typedef struct kvp_trace_rec {
    char request_id[KVP_TRACE_ID_MAX]; /* empty: not about a request */
    char stage[KVP_TRACE_NAME_MAX];
    char host[KVP_TRACE_HOST_MAX];
    int32_t pid;
    char event[KVP_TRACE_NAME_MAX];
    int32_t chunk;         /* chunk k, token index i, or -1 */
    int64_t wall_ns;       /* the stage's own CLOCK_REALTIME */
    int64_t offset_ns;     /* stage clock minus entry clock */
    int64_t offset_err_ns; /* bound on the offset estimate's error */
    int n_nums;
    kvp_trace_num_t nums[KVP_TRACE_NUMS_MAX];
} kvp_trace_rec_t;

/* ---- writing ---------------------------------------------------------- */

typedef struct kvp_trace_writer kvp_trace_writer_t;

/* Opens path for appending (created if absent) and writes a header record
 * (format version, stage, host, pid) at once. stage is one of KVP_STAGE_*;
 * host NULL means this machine's name. A writer has no shared state with any
 * other: three stages in one process use three writers. */
int kvp_trace_writer_new(const char *path, const char *stage, const char *host,
                         kvp_trace_writer_t **out, kvp_err_t *err);

/* Flushes what is buffered (errors ignored: call kvp_trace_flush first to see
 * them), closes the file and sets *w to NULL. */
void kvp_trace_writer_free(kvp_trace_writer_t **w);

/* The clock offset (this stage minus the entry stage) and its error bound
 * stamped on every following record; the link layer calls this when its
 * estimate improves. Default 0, 0 (right for the entry stage). */
void kvp_trace_writer_set_offset(kvp_trace_writer_t *w, int64_t offset_ns, int64_t err_ns);

/* Buffers one record of this writer's stage. wall_ns 0 means now. nums may be
 * NULL when n_nums is 0. Thread-safe. Writes to the file only when the buffer
 * passes 256 KiB; otherwise the record stays in memory until kvp_trace_flush.
 * Fails (KVP_EINVAL) on a request id, event or key too long for the format. */
int kvp_trace_emit(kvp_trace_writer_t *w, const char *request_id, const char *event, int32_t chunk,
                   int64_t wall_ns, const kvp_trace_num_t *nums, int n_nums);

/* kvp_trace_emit at the current time, without numbers. */
int kvp_trace_mark(kvp_trace_writer_t *w, const char *request_id, const char *event, int32_t chunk);

/* Buffers a record as given (its own stage, host, pid and offset): for
 * relaying events another stage reported (proto TraceEvent). */
int kvp_trace_emit_rec(kvp_trace_writer_t *w, const kvp_trace_rec_t *rec);

/* Writes every buffered record to the file (one write(2) of whole records, in
 * append mode, so a reader never sees half a record unless the process dies
 * inside the write). Thread-safe. */
int kvp_trace_flush(kvp_trace_writer_t *w, kvp_err_t *err);

/* ---- reading ---------------------------------------------------------- */

/* Records merged from any number of logs. */
typedef struct kvp_trace_set {
    kvp_trace_rec_t *recs;
    size_t n, cap;
    int n_logs;
    size_t n_truncated; /* logs whose last record was cut off */
    size_t n_skipped;   /* records without the required fields (skipped) */
} kvp_trace_set_t;

kvp_trace_set_t *kvp_trace_set_new(void);
void kvp_trace_set_free(kvp_trace_set_t **s);

/* What one kvp_trace_set_read found. */
typedef struct kvp_trace_read_info {
    size_t n_records;       /* records added */
    size_t n_headers;       /* header records (one per writer session) */
    size_t truncated_bytes; /* bytes of an incomplete last record, ignored */
    size_t n_skipped;       /* records without the required fields */
} kvp_trace_read_info_t;

/* Appends the records of the log at path to s. A file that does not start with
 * a trace header is refused (KVP_EFORMAT, "not a kvpred trace log"); a cut-off
 * last record is ignored and counted in info->truncated_bytes (the records
 * before it are kept). info may be NULL. */
int kvp_trace_set_read(kvp_trace_set_t *s, const char *path, kvp_trace_read_info_t *info,
                       kvp_err_t *err);

/* Appends one record (tests, relaying). */
int kvp_trace_set_add(kvp_trace_set_t *s, const kvp_trace_rec_t *rec, kvp_err_t *err);

/* ---- analysis --------------------------------------------------------- */

typedef enum kvp_trace_mode {
    KVP_TRACE_MODE_KVP = 0, /* same numbers as the proto Mode */
    KVP_TRACE_MODE_BASELINE = 1,
    KVP_TRACE_MODE_AUX_ONLY = 2,
    KVP_TRACE_MODE_UNKNOWN = 3,
} kvp_trace_mode_t;

const char *kvp_trace_mode_name(kvp_trace_mode_t m); /* "kvp", "baseline", "aux-only", "?" */

/* One request's TTFT breakdown, all on the entry clock, in nanoseconds. Parts
 * that do not apply to the mode are KVP_TRACE_NONE. When complete, the parts
 * telescope: queueing + prefill + prediction + transfer + first_step == ttft
 * (docs/tracing.md). */
typedef struct kvp_trace_req {
    char request_id[KVP_TRACE_ID_MAX];
    kvp_trace_mode_t mode;
    bool complete;    /* every event the breakdown needs is present */
    bool failed;      /* an error event was recorded */
    char reason[256]; /* when not complete: "missing cache_complete, ..." */
    int64_t start_ns; /* accepted (or the earliest record), entry clock */
    int64_t ttft_ns;  /* first_token - accepted */
    int64_t queueing_ns;
    int64_t prefill_ns; /* aux prefill (kvp, aux-only) or base prefill (baseline) */
    int64_t prediction_ns;
    int64_t transfer_ns;
    int64_t first_step_ns;
    int64_t handoff_ns;     /* exposed handoff: cache_complete - last aux_chunk_end */
    int64_t sum_err_ns;     /* |sum of parts - ttft| */
    int64_t client_ttft_ns; /* client_first_token - client_send, or NONE */
    int n_chunks;
    int n_tokens;
    int64_t max_offset_err_ns; /* largest offset error bound among its records */
} kvp_trace_req_t;

/* Groups s's records by request id and computes each request's breakdown.
 * *out (free() it) holds *n_out requests ordered by start time. Missing events
 * make a request incomplete (with a reason), never an error. */
int kvp_trace_analyze(const kvp_trace_set_t *s, kvp_trace_req_t **out, size_t *n_out,
                      kvp_err_t *err);

typedef struct kvp_trace_stats {
    size_t n;
    double mean_ms, p50_ms, p90_ms; /* percentiles interpolate between ranks */
} kvp_trace_stats_t;

/* Statistics of the complete requests of one mode. */
typedef struct kvp_trace_summary {
    size_t n_requests, n_complete;
    kvp_trace_stats_t ttft, handoff, client_ttft;
} kvp_trace_summary_t;

void kvp_trace_summarize(const kvp_trace_req_t *reqs, size_t n, kvp_trace_mode_t mode,
                         kvp_trace_summary_t *out);

/* ---- Chrome / Perfetto ------------------------------------------------ */

/* Writes {"traceEvents":[...]}: a process per host, a thread per stage, "X"
 * spans (aux chunk k, predict k, decoder write k, transfer k, prefill, first
 * step, the request), "i" instants (accepted, tokens, done, ...), times in
 * microseconds on the entry clock from the earliest record. *n_events (may be
 * NULL) gets the number of events written. */
int kvp_trace_write_chrome(const kvp_trace_set_t *s, const char *path, size_t *n_events,
                           kvp_err_t *err);

#endif
