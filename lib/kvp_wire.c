/* kvp_wire: encode, send, receive, check and decode pipeline messages.
 * See kvp_wire.h for the framing. */
#include "kvp_wire.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_half.h"
#include "kvp_time.h"

/* Conversions go through an aligned block on the stack: zmq frame buffers
 * have no alignment guarantee (received frames point into libzmq's shared
 * receive buffer at arbitrary offsets). */
#define WIRE_CONV_BLOCK 1024

void kvp_wire_limits_init(kvp_wire_limits_t *lim, uint32_t n_layer, uint32_t n_kv_head,
                          uint32_t head_dim, uint32_t max_chunk_tokens) {
    memset(lim, 0, sizeof *lim);
    lim->n_layer = n_layer;
    lim->n_kv_head = n_kv_head;
    lim->head_dim = head_dim;
    lim->max_chunk_tokens = max_chunk_tokens;
    lim->max_frames = 1 + 2 * n_layer;
    lim->max_header_bytes = 4u << 20;
    lim->max_bytes = (uint64_t)lim->max_header_bytes +
                     2ull * n_layer * max_chunk_tokens * n_kv_head * head_dim * sizeof(float);
}

static size_t dtype_size(Kvpred__DType d) {
    switch (d) {
    case KVPRED__DTYPE__DTYPE_F32:
        return 4;
    case KVPRED__DTYPE__DTYPE_F16:
        return 2;
    default:
        return 0;
    }
}

static const char *dtype_name(Kvpred__DType d) {
    switch (d) {
    case KVPRED__DTYPE__DTYPE_F32:
        return "f32";
    case KVPRED__DTYPE__DTYPE_F16:
        return "f16";
    default:
        return "unknown";
    }
}

uint64_t kvp_wire_chunk_frame_bytes(const Kvpred__Chunk *c) {
    uint64_t n_tok = c->pos_end > c->pos_begin ? c->pos_end - c->pos_begin : 0;
    return n_tok * c->n_kv_head * c->head_dim * dtype_size(c->dtype);
}

const char *kvp_wire_body_name(Kvpred__Envelope__BodyCase body) {
    switch (body) {
    case KVPRED__ENVELOPE__BODY__NOT_SET:
        return "none";
    case KVPRED__ENVELOPE__BODY_HELLO:
        return "Hello";
    case KVPRED__ENVELOPE__BODY_HELLO_REPLY:
        return "HelloReply";
    case KVPRED__ENVELOPE__BODY_REQUEST:
        return "Request";
    case KVPRED__ENVELOPE__BODY_RESERVE:
        return "Reserve";
    case KVPRED__ENVELOPE__BODY_RESERVED:
        return "Reserved";
    case KVPRED__ENVELOPE__BODY_CHUNK:
        return "Chunk";
    case KVPRED__ENVELOPE__BODY_CREDIT:
        return "Credit";
    case KVPRED__ENVELOPE__BODY_TOKEN:
        return "Token";
    case KVPRED__ENVELOPE__BODY_DONE:
        return "Done";
    case KVPRED__ENVELOPE__BODY_ERROR:
        return "Error";
    case KVPRED__ENVELOPE__BODY_CANCEL:
        return "Cancel";
    case KVPRED__ENVELOPE__BODY_PING:
        return "Ping";
    case KVPRED__ENVELOPE__BODY_PONG:
        return "Pong";
    default:
        return "unknown";
    }
}

/* The body pointer of an envelope (every case is a message pointer). */
static const void *body_ptr(const Kvpred__Envelope *env) {
    switch (env->body_case) {
    case KVPRED__ENVELOPE__BODY_HELLO:
        return env->hello;
    case KVPRED__ENVELOPE__BODY_HELLO_REPLY:
        return env->hello_reply;
    case KVPRED__ENVELOPE__BODY_REQUEST:
        return env->request;
    case KVPRED__ENVELOPE__BODY_RESERVE:
        return env->reserve;
    case KVPRED__ENVELOPE__BODY_RESERVED:
        return env->reserved;
    case KVPRED__ENVELOPE__BODY_CHUNK:
        return env->chunk;
    case KVPRED__ENVELOPE__BODY_CREDIT:
        return env->credit;
    case KVPRED__ENVELOPE__BODY_TOKEN:
        return env->token;
    case KVPRED__ENVELOPE__BODY_DONE:
        return env->done;
    case KVPRED__ENVELOPE__BODY_ERROR:
        return env->error;
    case KVPRED__ENVELOPE__BODY_CANCEL:
        return env->cancel;
    case KVPRED__ENVELOPE__BODY_PING:
        return env->ping;
    case KVPRED__ENVELOPE__BODY_PONG:
        return env->pong;
    default:
        return NULL;
    }
}

const char *kvp_wire_request_id(const Kvpred__Envelope *env) {
    if (!env || !body_ptr(env)) return "";
    const char *id = NULL;
    switch (env->body_case) {
    case KVPRED__ENVELOPE__BODY_REQUEST:
        id = env->request->request_id;
        break;
    case KVPRED__ENVELOPE__BODY_RESERVE:
        id = env->reserve->request_id;
        break;
    case KVPRED__ENVELOPE__BODY_RESERVED:
        id = env->reserved->request_id;
        break;
    case KVPRED__ENVELOPE__BODY_CHUNK:
        id = env->chunk->request_id;
        break;
    case KVPRED__ENVELOPE__BODY_CREDIT:
        id = env->credit->request_id;
        break;
    case KVPRED__ENVELOPE__BODY_TOKEN:
        id = env->token->request_id;
        break;
    case KVPRED__ENVELOPE__BODY_DONE:
        id = env->done->request_id;
        break;
    case KVPRED__ENVELOPE__BODY_ERROR:
        id = env->error->request_id;
        break;
    case KVPRED__ENVELOPE__BODY_CANCEL:
        id = env->cancel->request_id;
        break;
    default:
        break;
    }
    return id ? id : "";
}

/* A routing id as hex for messages (ids are binary: libzmq's own are 5 bytes). */
static const char *id_hex(const kvp_wire_id_t *id, char *buf, size_t cap) {
    size_t n = 0;
    buf[0] = 0;
    for (size_t i = 0; i < id->len && n + 3 < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%02x", id->bytes[i]);
    return buf;
}

/* ---------------------------------------------------------------- sending */

/* Hands every owned tensor back to its free_fn: the ownership contract holds
 * on error paths before any frame was built. */
static void release_tensors(const kvp_wire_tensor_t *t, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (t[i].free_fn) t[i].free_fn((void *)t[i].data, t[i].hint);
}

/* Checks tensors against the envelope: a Chunk needs 2 * layers frames of
 * n_tok * n_kv_head * head_dim values; any other body none. */
static int check_tensors(const Kvpred__Envelope *env, const kvp_wire_tensor_t *t, size_t n,
                         kvp_err_t *err) {
    if (!env || !body_ptr(env)) return kvp_err_set(err, KVP_EINVAL, "send: envelope has no body");
    if (env->body_case != KVPRED__ENVELOPE__BODY_CHUNK) {
        if (n != 0)
            return kvp_err_set(err, KVP_EINVAL, "send %s: %zu tensor frames, only a Chunk has any",
                               kvp_wire_body_name(env->body_case), n);
        return 0;
    }
    const Kvpred__Chunk *c = env->chunk;
    if (!dtype_size(c->dtype))
        return kvp_err_set(err, KVP_EINVAL, "send chunk: dtype %d unknown", (int)c->dtype);
    if (c->layer_begin >= c->layer_end || c->pos_begin >= c->pos_end)
        return kvp_err_set(err, KVP_EINVAL,
                           "send chunk: layers [%u, %u) or positions [%u, %u) empty or inverted",
                           c->layer_begin, c->layer_end, c->pos_begin, c->pos_end);
    size_t want = 2 * (size_t)(c->layer_end - c->layer_begin);
    if (n != want)
        return kvp_err_set(err, KVP_EINVAL,
                           "send chunk: %zu tensor frames, layers [%u, %u) need %zu", n,
                           c->layer_begin, c->layer_end, want);
    size_t vals = (size_t)(c->pos_end - c->pos_begin) * c->n_kv_head * c->head_dim;
    for (size_t i = 0; i < n; i++) {
        if (!t[i].data || t[i].n_values != vals)
            return kvp_err_set(err, KVP_EINVAL,
                               "send chunk: tensor %zu has %zu values, expected %zu "
                               "(%u tokens x %u heads x %u dims)",
                               i, t[i].data ? t[i].n_values : 0, vals, c->pos_end - c->pos_begin,
                               c->n_kv_head, c->head_dim);
    }
    return 0;
}

/* Builds the zmq frame of one tensor per the ownership rules in kvp_wire.h. */
static int build_tensor(zmq_msg_t *msg, const kvp_wire_tensor_t *t, Kvpred__DType dtype,
                        kvp_err_t *err) {
    size_t bytes = t->n_values * dtype_size(dtype);
    if (dtype == KVPRED__DTYPE__DTYPE_F32 && t->free_fn) {
        if (zmq_msg_init_data(msg, (void *)t->data, bytes, t->free_fn, t->hint) == 0) return 0;
        t->free_fn((void *)t->data, t->hint); /* libzmq did not take it */
        return kvp_err_set(err, KVP_ENOMEM, "send chunk: zmq_msg_init_data: %s",
                           zmq_strerror(errno));
    }
    if (zmq_msg_init_size(msg, bytes) != 0) {
        if (t->free_fn) t->free_fn((void *)t->data, t->hint);
        return kvp_err_set(err, KVP_ENOMEM, "send chunk: %zu-byte frame: %s", bytes,
                           zmq_strerror(errno));
    }
    uint8_t *dst = zmq_msg_data(msg);
    if (dtype == KVPRED__DTYPE__DTYPE_F32) {
        memcpy(dst, t->data, bytes);
    } else {
        uint16_t block[WIRE_CONV_BLOCK];
        for (size_t i = 0; i < t->n_values; i += WIRE_CONV_BLOCK) {
            size_t k = t->n_values - i < WIRE_CONV_BLOCK ? t->n_values - i : WIRE_CONV_BLOCK;
            kvp_f32_to_f16_row(t->data + i, block, k);
            memcpy(dst + 2 * i, block, 2 * k);
        }
    }
    if (t->free_fn) t->free_fn((void *)t->data, t->hint);
    return 0;
}

static int send_errno(const kvp_wire_id_t *to, const char *what, kvp_err_t *err) {
    char hex[80];
    if (errno == EAGAIN)
        return kvp_err_set(err, KVP_EBUSY, "send %s: socket cannot take a message now", what);
    if (errno == EHOSTUNREACH && to)
        return kvp_err_set(err, KVP_EIO, "send %s: peer %s unreachable", what,
                           id_hex(to, hex, sizeof hex));
    return kvp_err_set(err, KVP_EIO, "send %s: %s", what, zmq_strerror(errno));
}

static int wire_send(void *sock, const kvp_wire_id_t *to, const Kvpred__Envelope *env,
                     const kvp_wire_tensor_t *tensors, size_t n_tensors, kvp_err_t *err) {
    int rc = check_tensors(env, tensors, n_tensors, err);
    if (rc < 0) {
        release_tensors(tensors, n_tensors);
        return rc;
    }
    const char *what = kvp_wire_body_name(env->body_case);
    size_t n_frames = 1 + n_tensors;
    zmq_msg_t stack_frames[8];
    zmq_msg_t *frames = n_frames <= 8 ? stack_frames : malloc(n_frames * sizeof *frames);
    if (!frames) {
        release_tensors(tensors, n_tensors);
        return kvp_err_set(err, KVP_ENOMEM, "send %s: %zu frames", what, n_frames);
    }
    size_t built = 0; /* frames [0, built) are initialised */
    size_t hdr = kvpred__envelope__get_packed_size(env);
    if (zmq_msg_init_size(&frames[0], hdr) != 0) {
        release_tensors(tensors, n_tensors);
        rc = kvp_err_set(err, KVP_ENOMEM, "send %s: %zu-byte header", what, hdr);
        goto out;
    }
    kvpred__envelope__pack(env, zmq_msg_data(&frames[0]));
    built = 1;
    for (size_t i = 0; i < n_tensors; i++) {
        rc = build_tensor(&frames[1 + i], &tensors[i], env->chunk->dtype, err);
        if (rc < 0) {
            release_tensors(tensors + i + 1, n_tensors - i - 1);
            goto out;
        }
        built++;
    }
    if (to) {
        /* The identity frame is sent first; with ZMQ_ROUTER_MANDATORY an
         * unknown peer fails here, before anything is queued. */
        if (zmq_send(sock, to->bytes, to->len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
            rc = send_errno(to, what, err);
            goto out;
        }
    }
    size_t sent = 0;
    for (; sent < n_frames; sent++) {
        int flags = ZMQ_DONTWAIT | (sent + 1 < n_frames ? ZMQ_SNDMORE : 0);
        if (zmq_msg_send(&frames[sent], sock, flags) < 0) {
            /* Only the first frame can fail on a full pipe: libzmq accepts the
             * rest of a multipart message once its first part is in. */
            rc = send_errno(to, what, err);
            break;
        }
    }
out:
    for (size_t i = 0; i < built; i++)
        zmq_msg_close(&frames[i]); /* no-op for sent frames */
    if (frames != stack_frames) free(frames);
    return rc;
}

int kvp_wire_send(void *sock, const Kvpred__Envelope *env, const kvp_wire_tensor_t *tensors,
                  size_t n_tensors, kvp_err_t *err) {
    return wire_send(sock, NULL, env, tensors, n_tensors, err);
}

int kvp_wire_send_to(void *sock, const kvp_wire_id_t *to, const Kvpred__Envelope *env,
                     const kvp_wire_tensor_t *tensors, size_t n_tensors, kvp_err_t *err) {
    if (!to || to->len == 0 || to->len > sizeof to->bytes) {
        release_tensors(tensors, n_tensors);
        return kvp_err_set(err, KVP_EINVAL, "send: routing id missing or over 255 bytes");
    }
    return wire_send(sock, to, env, tensors, n_tensors, err);
}

void kvp_wire_error_init(Kvpred__Envelope *env, Kvpred__Error *e, const char *request_id, int code,
                         const char *stage, const char *message) {
    kvpred__envelope__init(env);
    kvpred__error__init(e);
    e->request_id = (char *)(request_id ? request_id : "");
    e->code = code;
    e->stage = (char *)(stage ? stage : "");
    e->message = (char *)(message ? message : "");
    env->body_case = KVPRED__ENVELOPE__BODY_ERROR;
    env->error = e;
}

int kvp_wire_send_error(void *sock, const kvp_wire_id_t *to, const char *request_id, int code,
                        const char *stage, const char *message, kvp_err_t *err) {
    Kvpred__Envelope env;
    Kvpred__Error e;
    kvp_wire_error_init(&env, &e, request_id, code, stage, message);
    return to ? kvp_wire_send_to(sock, to, &env, NULL, 0, err)
              : kvp_wire_send(sock, &env, NULL, 0, err);
}

/* -------------------------------------------------------------- receiving */

void kvp_wire_msg_init(kvp_wire_msg_t *m) {
    memset(m, 0, sizeof *m);
}

void kvp_wire_msg_reset(kvp_wire_msg_t *m) {
    for (size_t i = 0; i < m->n_frames; i++)
        zmq_msg_close(&m->frames[i]);
    m->n_frames = 0;
    m->n_tensors = 0;
    if (m->env) kvpred__envelope__free_unpacked(m->env, NULL);
    m->env = NULL;
    m->from.len = 0;
    m->rx_wall_ns = 0;
}

void kvp_wire_msg_free(kvp_wire_msg_t *m) {
    kvp_wire_msg_reset(m);
    free(m->frames);
    m->frames = NULL;
    m->cap_frames = 0;
}

/* Checks a Chunk header against the link's shape and limits, then every
 * tensor frame's byte size against the header. */
static int check_chunk(const kvp_wire_msg_t *m, const kvp_wire_limits_t *lim, kvp_err_t *err) {
    const Kvpred__Chunk *c = m->env->chunk;
    if (lim->n_layer == 0)
        return kvp_err_set(err, KVP_EFORMAT,
                           "Chunk: not expected on this link (no chunk shape configured)");
    if (!dtype_size(c->dtype))
        return kvp_err_set(err, KVP_EFORMAT, "chunk.dtype: %d unknown (0 f32, 1 f16)",
                           (int)c->dtype);
    if (c->layer_begin >= c->layer_end)
        return kvp_err_set(err, KVP_EFORMAT,
                           "chunk layer range: layer_begin %u >= layer_end %u (empty or inverted)",
                           c->layer_begin, c->layer_end);
    if (c->layer_end > lim->n_layer)
        return kvp_err_set(err, KVP_EFORMAT, "chunk.layer_end: %u beyond n_layer %u", c->layer_end,
                           lim->n_layer);
    if (c->pos_begin >= c->pos_end)
        return kvp_err_set(err, KVP_EFORMAT,
                           "chunk pos range: pos_begin %u >= pos_end %u (empty or inverted)",
                           c->pos_begin, c->pos_end);
    uint32_t n_tok = c->pos_end - c->pos_begin;
    if (n_tok > lim->max_chunk_tokens)
        return kvp_err_set(err, KVP_ENOMEM,
                           "chunk pos range: [%u, %u) is %u tokens, over max_chunk_tokens %u",
                           c->pos_begin, c->pos_end, n_tok, lim->max_chunk_tokens);
    if (lim->max_pos && c->pos_end > lim->max_pos)
        return kvp_err_set(err, KVP_EFORMAT, "chunk.pos_end: %u beyond max_pos %u", c->pos_end,
                           lim->max_pos);
    if (c->n_kv_head != lim->n_kv_head)
        return kvp_err_set(err, KVP_EFORMAT, "chunk.n_kv_head: %u, expected %u", c->n_kv_head,
                           lim->n_kv_head);
    if (c->head_dim != lim->head_dim)
        return kvp_err_set(err, KVP_EFORMAT, "chunk.head_dim: %u, expected %u", c->head_dim,
                           lim->head_dim);
    uint32_t n_layer = c->layer_end - c->layer_begin;
    if (m->n_tensors != 2 * (size_t)n_layer)
        return kvp_err_set(err, KVP_EFORMAT,
                           "chunk frames: %zu tensor frames, layers [%u, %u) need %u (K and V)",
                           m->n_tensors, c->layer_begin, c->layer_end, 2 * n_layer);
    uint64_t want = kvp_wire_chunk_frame_bytes(c);
    for (size_t i = 0; i < m->n_tensors; i++) {
        size_t got = zmq_msg_size(&m->frames[1 + i]);
        if (got != want)
            return kvp_err_set(err, KVP_EFORMAT,
                               "chunk frame %zu (%c layer %u): %zu bytes, expected %" PRIu64
                               " (%u tokens x %u heads x %u dims x %s)",
                               i, i < n_layer ? 'K' : 'V', c->layer_begin + (uint32_t)(i % n_layer),
                               got, want, n_tok, c->n_kv_head, c->head_dim, dtype_name(c->dtype));
    }
    return 0;
}

/* Receives all parts of one message. Parts past the limits are received and
 * dropped at once (libzmq delivers a multipart message whole, so this never
 * waits): the next receive starts at a message boundary. */
static int wire_recv(void *sock, int router, const kvp_wire_limits_t *lim, int timeout_ms,
                     kvp_wire_msg_t *m, kvp_err_t *err) {
    kvp_wire_msg_reset(m);
    if (timeout_ms != 0) {
        zmq_pollitem_t it = {sock, 0, ZMQ_POLLIN, 0};
        int n = zmq_poll(&it, 1, timeout_ms);
        if (n < 0 && errno == EINTR)
            return kvp_err_set(err, KVP_ETIMEOUT, "recv: interrupted by a signal");
        if (n < 0) return kvp_err_set(err, KVP_EIO, "recv: zmq_poll: %s", zmq_strerror(errno));
        if (n == 0)
            return kvp_err_set(err, KVP_ETIMEOUT, "recv: no message within %d ms", timeout_ms);
    }
    int rc = 0;
    size_t max_frames = lim->max_frames ? lim->max_frames : 1; /* 0: the header alone */
    uint64_t total = 0;
    size_t n_parts = 0; /* parts after the identity */
    int first = 1, more = 1;
    while (more) {
        zmq_msg_t part;
        zmq_msg_init(&part);
        if (zmq_msg_recv(&part, sock, ZMQ_DONTWAIT) < 0) {
            int e = errno;
            zmq_msg_close(&part);
            if (first && (e == EAGAIN || e == EINTR))
                return kvp_err_set(err, KVP_ETIMEOUT, "recv: no message waiting");
            return kvp_err_set(err, KVP_EIO, "recv: %s", zmq_strerror(e));
        }
        more = zmq_msg_more(&part);
        if (first) m->rx_wall_ns = kvp_wall_ns();
        if (first && router) {
            first = 0;
            size_t len = zmq_msg_size(&part);
            if (len > sizeof m->from.bytes) len = sizeof m->from.bytes;
            memcpy(m->from.bytes, zmq_msg_data(&part), len);
            m->from.len = len;
            zmq_msg_close(&part);
            if (!more) rc = kvp_err_set(err, KVP_EFORMAT, "message: routing id without frames");
            continue;
        }
        first = 0;
        n_parts++;
        total += zmq_msg_size(&part);
        if (rc == 0 && n_parts > max_frames)
            rc = KVP_ENOMEM;
        else if (rc == 0 && total > lim->max_bytes)
            rc = KVP_ENOMEM;
        if (rc == 0 && m->n_frames == m->cap_frames) {
            size_t cap = m->cap_frames ? 2 * m->cap_frames : 4;
            zmq_msg_t *f = realloc(m->frames, cap * sizeof *f);
            if (!f) {
                rc = kvp_err_set(err, KVP_ENOMEM, "recv: %zu frames", cap);
            } else {
                m->frames = f;
                m->cap_frames = cap;
            }
        }
        if (rc == 0) {
            /* zmq_msg_t may not be copied, only moved into a fresh one */
            zmq_msg_init(&m->frames[m->n_frames]);
            zmq_msg_move(&m->frames[m->n_frames], &part);
            m->n_frames++;
        }
        zmq_msg_close(&part);
    }
    if (rc == KVP_ENOMEM && n_parts > max_frames)
        return kvp_err_set(err, KVP_ENOMEM, "message frames: %zu, over max_frames %zu", n_parts,
                           max_frames);
    if (rc == KVP_ENOMEM && total > lim->max_bytes)
        return kvp_err_set(err, KVP_ENOMEM, "message bytes: %" PRIu64 ", over max_bytes %" PRIu64,
                           total, lim->max_bytes);
    if (rc < 0) return rc;

    size_t hdr = zmq_msg_size(&m->frames[0]);
    if (hdr > lim->max_header_bytes)
        return kvp_err_set(err, KVP_ENOMEM, "Envelope frame: %zu bytes, over max_header_bytes %u",
                           hdr, lim->max_header_bytes);
    m->env = kvpred__envelope__unpack(NULL, hdr, zmq_msg_data(&m->frames[0]));
    if (!m->env)
        return kvp_err_set(err, KVP_EFORMAT, "Envelope: not a valid protobuf message (%zu bytes)",
                           hdr);
    if (!body_ptr(m->env))
        return kvp_err_set(err, KVP_EFORMAT, "Envelope body: none set, or unknown (case %d)",
                           (int)m->env->body_case);
    m->n_tensors = m->n_frames - 1;
    if (m->env->body_case == KVPRED__ENVELOPE__BODY_CHUNK) return check_chunk(m, lim, err);
    if (m->n_tensors != 0)
        return kvp_err_set(err, KVP_EFORMAT, "%s frames: %zu after the header, expected none",
                           kvp_wire_body_name(m->env->body_case), m->n_tensors);
    return 0;
}

int kvp_wire_recv(void *sock, const kvp_wire_limits_t *lim, int timeout_ms, kvp_wire_msg_t *m,
                  kvp_err_t *err) {
    return wire_recv(sock, 0, lim, timeout_ms, m, err);
}

int kvp_wire_recv_from(void *sock, const kvp_wire_limits_t *lim, int timeout_ms, kvp_wire_msg_t *m,
                       kvp_err_t *err) {
    return wire_recv(sock, 1, lim, timeout_ms, m, err);
}

const void *kvp_wire_tensor_bytes(const kvp_wire_msg_t *m, size_t i, size_t *n_bytes) {
    if (i >= m->n_tensors || 1 + i >= m->n_frames) return NULL;
    zmq_msg_t *f = &((kvp_wire_msg_t *)m)->frames[1 + i];
    if (n_bytes) *n_bytes = zmq_msg_size(f);
    return zmq_msg_data(f);
}

int kvp_wire_chunk_read(const kvp_wire_msg_t *m, int v, uint32_t layer, float *dst, size_t n_dst,
                        kvp_err_t *err) {
    if (!m->env || m->env->body_case != KVPRED__ENVELOPE__BODY_CHUNK)
        return kvp_err_set(err, KVP_EINVAL, "chunk read: message is not a Chunk");
    const Kvpred__Chunk *c = m->env->chunk;
    if (v != 0 && v != 1) return kvp_err_set(err, KVP_EINVAL, "chunk read: v %d not 0 or 1", v);
    if (layer < c->layer_begin || layer >= c->layer_end)
        return kvp_err_set(err, KVP_ERANGE, "chunk read: layer %u outside [%u, %u)", layer,
                           c->layer_begin, c->layer_end);
    size_t n_layer = c->layer_end - c->layer_begin;
    size_t n_vals = (size_t)(c->pos_end - c->pos_begin) * c->n_kv_head * c->head_dim;
    if (n_dst != n_vals)
        return kvp_err_set(err, KVP_EINVAL, "chunk read: buffer of %zu floats, frame has %zu",
                           n_dst, n_vals);
    size_t bytes;
    const uint8_t *src =
        kvp_wire_tensor_bytes(m, (size_t)v * n_layer + (layer - c->layer_begin), &bytes);
    if (!src || bytes != n_vals * dtype_size(c->dtype))
        return kvp_err_set(err, KVP_EFORMAT,
                           "chunk read: frame for %c layer %u missing or sized "
                           "wrong (message not checked by kvp_wire_recv?)",
                           v ? 'V' : 'K', layer);
    if (c->dtype == KVPRED__DTYPE__DTYPE_F32) {
        memcpy(dst, src, bytes);
    } else {
        uint16_t block[WIRE_CONV_BLOCK];
        for (size_t i = 0; i < n_vals; i += WIRE_CONV_BLOCK) {
            size_t k = n_vals - i < WIRE_CONV_BLOCK ? n_vals - i : WIRE_CONV_BLOCK;
            memcpy(block, src + 2 * i, 2 * k);
            kvp_f16_to_f32_row(block, dst + i, k);
        }
    }
    return 0;
}

/* -------------------------------------------------------------- handshake */

/* Copies s into out, cut with "..." when it does not fit. */
static void put_str(char *out, size_t cap, const char *s) {
    size_t n = strlen(s ? s : "");
    if (n < cap) {
        memcpy(out, s ? s : "", n + 1);
        return;
    }
    snprintf(out, cap, "%.*s...", (int)(cap - 4), s);
}

/* "[0,0,1,1]"; long maps start near their first difference `d`:
 * "[@40: 13,14,15,...] (n=64)". */
static void put_map(char *out, size_t cap, const int32_t *v, size_t n, size_t d) {
    size_t start = d > 8 ? d - 2 : 0;
    if (start >= n) start = n ? n - 1 : 0;
    size_t len = 1;
    out[0] = '[';
    out[1] = 0;
    if (start) len = (size_t)snprintf(out, cap, "[@%zu: ", start);
    size_t i = start;
    for (; i < n; i++) {
        char item[16];
        int k = snprintf(item, sizeof item, "%s%d", i > start ? "," : "", (int)v[i]);
        if (len + (size_t)k + 24 >= cap) break; /* room for ",...] (n=...)" */
        memcpy(out + len, item, (size_t)k + 1);
        len += (size_t)k;
    }
    if (start || i < n)
        snprintf(out + len, cap - len, "%s] (n=%zu)", i < n ? ",..." : "", n);
    else
        snprintf(out + len, cap - len, "]");
}

static int diff_u64(kvp_wire_hello_diff_t *d, const char *field, uint64_t a, uint64_t b) {
    if (a == b) return 0;
    if (d) {
        put_str(d->field, sizeof d->field, field);
        snprintf(d->ours, sizeof d->ours, "%" PRIu64, a);
        snprintf(d->theirs, sizeof d->theirs, "%" PRIu64, b);
    }
    return 1;
}

static int diff_str(kvp_wire_hello_diff_t *d, const char *field, const char *a, const char *b) {
    if (!a) a = "";
    if (!b) b = "";
    if (strcmp(a, b) == 0) return 0;
    if (d) {
        put_str(d->field, sizeof d->field, field);
        put_str(d->ours, sizeof d->ours, *a ? a : "(empty)");
        put_str(d->theirs, sizeof d->theirs, *b ? b : "(empty)");
    }
    return 1;
}

static int diff_shape(kvp_wire_hello_diff_t *d, const char *name, const Kvpred__CacheShape *a,
                      const Kvpred__CacheShape *b) {
    static const Kvpred__CacheShape zero = KVPRED__CACHE_SHAPE__INIT;
    if (!a) a = &zero;
    if (!b) b = &zero;
    char field[40];
    snprintf(field, sizeof field, "%s.n_layer", name);
    if (diff_u64(d, field, a->n_layer, b->n_layer)) return 1;
    snprintf(field, sizeof field, "%s.n_kv_head", name);
    if (diff_u64(d, field, a->n_kv_head, b->n_kv_head)) return 1;
    snprintf(field, sizeof field, "%s.head_dim", name);
    return diff_u64(d, field, a->head_dim, b->head_dim);
}

int kvp_wire_hello_compare(const Kvpred__Hello *ours, const Kvpred__Hello *theirs, unsigned mask,
                           kvp_wire_hello_diff_t *diff) {
    if (diff) memset(diff, 0, sizeof *diff);
    if ((mask & KVP_WIRE_HELLO_PROTOCOL_VERSION) &&
        diff_u64(diff, "protocol_version", ours->protocol_version, theirs->protocol_version))
        return 1;
    if ((mask & KVP_WIRE_HELLO_AUX_FINGERPRINT) &&
        diff_str(diff, "aux_fingerprint", ours->aux_fingerprint, theirs->aux_fingerprint))
        return 1;
    if ((mask & KVP_WIRE_HELLO_BASE_FINGERPRINT) &&
        diff_str(diff, "base_fingerprint", ours->base_fingerprint, theirs->base_fingerprint))
        return 1;
    if ((mask & KVP_WIRE_HELLO_PREDICTOR_FINGERPRINT) &&
        diff_str(diff, "predictor_fingerprint", ours->predictor_fingerprint,
                 theirs->predictor_fingerprint))
        return 1;
    if (mask & KVP_WIRE_HELLO_LAYER_MAP) {
        size_t na = ours->n_layer_map, nb = theirs->n_layer_map, i = 0;
        while (i < na && i < nb && ours->layer_map[i] == theirs->layer_map[i])
            i++;
        if (i < na || i < nb) {
            if (diff) {
                put_str(diff->field, sizeof diff->field, "layer_map");
                put_map(diff->ours, sizeof diff->ours, ours->layer_map, na, i);
                put_map(diff->theirs, sizeof diff->theirs, theirs->layer_map, nb, i);
            }
            return 1;
        }
    }
    if ((mask & KVP_WIRE_HELLO_DTYPE) && ours->dtype != theirs->dtype) {
        if (diff) {
            put_str(diff->field, sizeof diff->field, "dtype");
            snprintf(diff->ours, sizeof diff->ours, "%s", dtype_name(ours->dtype));
            snprintf(diff->theirs, sizeof diff->theirs, "%s", dtype_name(theirs->dtype));
        }
        return 1;
    }
    if ((mask & KVP_WIRE_HELLO_AUX_SHAPE) &&
        diff_shape(diff, "aux_shape", ours->aux_shape, theirs->aux_shape))
        return 1;
    if ((mask & KVP_WIRE_HELLO_BASE_SHAPE) &&
        diff_shape(diff, "base_shape", ours->base_shape, theirs->base_shape))
        return 1;
    if ((mask & KVP_WIRE_HELLO_MAX_MESSAGE_BYTES) &&
        diff_u64(diff, "max_message_bytes", ours->max_message_bytes, theirs->max_message_bytes))
        return 1;
    if ((mask & KVP_WIRE_HELLO_MAX_CHUNK_TOKENS) &&
        diff_u64(diff, "max_chunk_tokens", ours->max_chunk_tokens, theirs->max_chunk_tokens))
        return 1;
    return 0;
}
