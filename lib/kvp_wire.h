/* kvp_wire: the only place that encodes and decodes the messages between the
 * pipeline stages (proto/kvpred.proto).
 *
 * A message is one multipart ZeroMQ message:
 *   [identity]            ROUTER sockets only (kvp_wire_send_to / kvp_wire_recv_from)
 *   Envelope              protobuf-c, one frame
 *   tensor frames         Chunk only: 2 * (layer_end - layer_begin) frames, K of each
 *                         layer then V of each layer, each [pos_end - pos_begin]
 *                         [n_kv_head * head_dim] token-major values of the chunk's
 *                         dtype (f32 or f16, little-endian), keys un-rotated.
 *
 * Receiving checks everything a peer controls against caller limits before
 * the header is unpacked or any tensor is decoded: frame count, total bytes,
 * header size, then (after unpacking the small header) the chunk's ranges,
 * shape and every frame's byte size. A refused message is drained from the
 * socket and reported as KVP_EFORMAT (malformed) or KVP_ENOMEM (over a limit)
 * with a message naming the field and the values, so the caller can reply
 * with an Error (kvp_wire_send_error) and carry on.
 *
 * All sends and receives are non-blocking on the socket (ZMQ_DONTWAIT), so
 * they fit a zmq_poll loop. */
#ifndef KVP_WIRE_H
#define KVP_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include <zmq.h>

#include "kvp_err.h"
#include "kvpred.pb-c.h"

/* Bumped on any incompatible change of the schema or framing. */
#define KVP_WIRE_PROTOCOL_VERSION 1

/* Error.message prefix a bound side uses for messages from a peer that has
 * not completed the Hello handshake (see kvp_link). */
#define KVP_WIRE_NO_HANDSHAKE "no handshake"

/* A ZeroMQ routing id (ROUTER sockets): at most 255 bytes. */
typedef struct kvp_wire_id {
    uint8_t bytes[255];
    size_t len;
} kvp_wire_id_t;

/* Limits and the expected chunk shape for one receiving socket. */
typedef struct kvp_wire_limits {
    uint32_t max_frames;       /* frames after the identity: header + tensors */
    uint64_t max_bytes;        /* all those frames together */
    uint32_t max_header_bytes; /* the Envelope frame */
    uint32_t max_chunk_tokens; /* pos_end - pos_begin of a Chunk */
    uint32_t max_pos;          /* pos_end bound (context length); 0: unchecked */
    /* The shape of chunks on this link; n_layer == 0: chunks are refused. */
    uint32_t n_layer;
    uint32_t n_kv_head;
    uint32_t head_dim;
} kvp_wire_limits_t;

/* Fills limits for a link that carries chunks of the given shape (n_layer 0:
 * no chunks): max_frames = 1 + 2 * n_layer, max_header_bytes = 4 MiB,
 * max_bytes = header + a full f32 chunk of max_chunk_tokens on every layer. */
void kvp_wire_limits_init(kvp_wire_limits_t *lim, uint32_t n_layer, uint32_t n_kv_head,
                          uint32_t head_dim, uint32_t max_chunk_tokens);

/* Bytes of one tensor frame of a chunk header (tokens x heads x dims x dtype
 * size), 0 for an unknown dtype. */
uint64_t kvp_wire_chunk_frame_bytes(const Kvpred__Chunk *c);

/* "Request", "Chunk", ... for an Envelope body case ("none" / "unknown"). */
const char *kvp_wire_body_name(Kvpred__Envelope__BodyCase body);

/* The request_id of a message body that has one, else "" (never NULL). */
const char *kvp_wire_request_id(const Kvpred__Envelope *env);

/* ---- sending ---- */

/* Called by libzmq when it no longer needs a buffer handed over with
 * free_fn: from an arbitrary (I/O) thread, so it must be thread-safe. */
typedef void kvp_wire_free_fn(void *data, void *hint);

/* One tensor frame to send: n_values f32 values, [n_tok][n_kv_head*head_dim].
 * free_fn NULL: the data is copied (or converted) during the call and stays
 * the caller's. free_fn set: ownership passes to the wire on the call, on
 * every return path — f32 frames go out zero-copy and free_fn runs once
 * libzmq is done; f16 frames are converted and free_fn runs before return. */
typedef struct kvp_wire_tensor {
    const float *data;
    size_t n_values;
    kvp_wire_free_fn *free_fn;
    void *hint;
} kvp_wire_tensor_t;

/* Sends env (+ tensors: exactly 2 * (layer_end - layer_begin) of them, each of
 * the chunk's n_tok * n_kv_head * head_dim values, for a Chunk; none
 * otherwise) on a DEALER (or any non-ROUTER) socket. A Chunk whose dtype is
 * F16 has its f32 tensors converted. Returns 0; KVP_EBUSY when the socket
 * cannot take a message now (high-water mark, or no connected peer with
 * ZMQ_IMMEDIATE) and nothing was sent; KVP_EINVAL for tensors not matching
 * the header; KVP_EIO for other socket errors. */
int kvp_wire_send(void *sock, const Kvpred__Envelope *env, const kvp_wire_tensor_t *tensors,
                  size_t n_tensors, kvp_err_t *err);

/* As kvp_wire_send on a ROUTER socket, to the peer with routing id `to`.
 * KVP_EIO names an unreachable peer (with ZMQ_ROUTER_MANDATORY set). */
int kvp_wire_send_to(void *sock, const kvp_wire_id_t *to, const Kvpred__Envelope *env,
                     const kvp_wire_tensor_t *tensors, size_t n_tensors, kvp_err_t *err);

/* Points env at e and fills an Error (no allocation: strings are borrowed). */
void kvp_wire_error_init(Kvpred__Envelope *env, Kvpred__Error *e, const char *request_id, int code,
                         const char *stage, const char *message);

/* Sends Error{request_id, code, stage, message}; to == NULL on a DEALER. */
int kvp_wire_send_error(void *sock, const kvp_wire_id_t *to, const char *request_id, int code,
                        const char *stage, const char *message, kvp_err_t *err);

/* ---- receiving ---- */

/* One received message. Initialise once with kvp_wire_msg_init; every
 * receive resets it; kvp_wire_msg_free at the end. */
typedef struct kvp_wire_msg {
    Kvpred__Envelope *env; /* unpacked header, or NULL */
    kvp_wire_id_t from;    /* routing id (kvp_wire_recv_from), len 0 otherwise */
    int64_t rx_wall_ns;    /* wall clock when the message was taken off the socket */
    size_t n_tensors;      /* tensor frames (after the header) */
    zmq_msg_t *frames;     /* [0] header, [1..n_tensors] tensors; libzmq's buffers */
    size_t n_frames, cap_frames;
} kvp_wire_msg_t;

void kvp_wire_msg_init(kvp_wire_msg_t *m);
void kvp_wire_msg_reset(kvp_wire_msg_t *m); /* closes frames, frees env; keeps the array */
void kvp_wire_msg_free(kvp_wire_msg_t *m);

/* Receives one whole message from a DEALER socket, waiting at most
 * timeout_ms (0: only if one is waiting; -1: forever). Returns 0 with m->env
 * set; KVP_ETIMEOUT when none arrived (or a signal interrupted the wait); KVP_EFORMAT / KVP_ENOMEM
 * for a refused message (drained; err names the field and values; m->env may still be set when only
 * the frames were wrong, so the request_id is at hand for the reply); KVP_EIO for socket errors. */
int kvp_wire_recv(void *sock, const kvp_wire_limits_t *lim, int timeout_ms, kvp_wire_msg_t *m,
                  kvp_err_t *err);

/* As kvp_wire_recv on a ROUTER socket: m->from holds the sender's routing id,
 * also when the message was refused. */
int kvp_wire_recv_from(void *sock, const kvp_wire_limits_t *lim, int timeout_ms, kvp_wire_msg_t *m,
                       kvp_err_t *err);

/* Decodes the tensor frame of a received Chunk for absolute layer `layer`
 * (K when v == 0, V when v == 1) into dst: n_dst must be n_tok * n_kv_head *
 * head_dim floats; f16 frames are widened. */
int kvp_wire_chunk_read(const kvp_wire_msg_t *m, int v, uint32_t layer, float *dst, size_t n_dst,
                        kvp_err_t *err);

/* The raw bytes of tensor frame i (0-based, after the header), or NULL.
 * Not necessarily aligned for float access. */
const void *kvp_wire_tensor_bytes(const kvp_wire_msg_t *m, size_t i, size_t *n_bytes);

/* ---- handshake ---- */

/* Hello fields kvp_wire_hello_compare can check, in the order it checks. */
enum {
    KVP_WIRE_HELLO_PROTOCOL_VERSION = 1u << 0,
    KVP_WIRE_HELLO_AUX_FINGERPRINT = 1u << 1,
    KVP_WIRE_HELLO_BASE_FINGERPRINT = 1u << 2,
    KVP_WIRE_HELLO_PREDICTOR_FINGERPRINT = 1u << 3,
    KVP_WIRE_HELLO_LAYER_MAP = 1u << 4,
    KVP_WIRE_HELLO_DTYPE = 1u << 5,
    KVP_WIRE_HELLO_AUX_SHAPE = 1u << 6,
    KVP_WIRE_HELLO_BASE_SHAPE = 1u << 7,
    KVP_WIRE_HELLO_MAX_MESSAGE_BYTES = 1u << 8,
    KVP_WIRE_HELLO_MAX_CHUNK_TOKENS = 1u << 9,
    KVP_WIRE_HELLO_ALL = (1u << 10) - 1,
};

/* The first differing field of two Hellos, both values as text. */
typedef struct kvp_wire_hello_diff {
    char field[40];   /* "base_fingerprint", "aux_shape.n_kv_head", ... */
    char ours[160];   /* value in `ours`, cut with "..." when long */
    char theirs[160]; /* value in `theirs` */
} kvp_wire_hello_diff_t;

/* Compares the fields selected by mask (KVP_WIRE_HELLO_*) in the order of
 * the enum. Returns 0 when they agree; 1 and fills diff (if not NULL) with
 * the first difference. A missing shape compares as 0/0/0. Layer maps are
 * printed from near their first difference when long. */
int kvp_wire_hello_compare(const Kvpred__Hello *ours, const Kvpred__Hello *theirs, unsigned mask,
                           kvp_wire_hello_diff_t *diff);

#endif
