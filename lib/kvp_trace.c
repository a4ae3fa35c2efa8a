/* kvp_trace: trace logs (write, read), the TTFT breakdown and the Chrome
 * trace. The file format, the events and the breakdown are described in
 * docs/tracing.md; this file is the only place that packs or unpacks them. */
#include "kvp_trace.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <msgpack.h>

#include "kvp_time.h"

#define TRACE_FLUSH_BYTES (256u * 1024u)        /* emit writes the buffer out past this */
#define TRACE_PENDING_MAX (64u * 1024u * 1024u) /* unwritable buffer dropped past this */
#define TRACE_REC_MAX (64u * 1024u)             /* bytes of one record in a log */
#define TRACE_LOG_MAX (1024ull * 1024u * 1024u) /* bytes of one log */
#define TRACE_RECS_MAX (1u << 24)               /* records in one set */

/* Times are checked against these on reading so that every difference of two
 * entry-clock times fits in an int64. */
#define TRACE_WALL_MAX (INT64_C(1) << 62)
#define TRACE_OFFSET_MAX (INT64_C(1) << 56)
#define TRACE_CHUNK_MAX (1 << 24)

/* Keys of the MessagePack maps (short: they are in every record). */
#define K_VERSION "kvptrace"
#define K_REQ "req"
#define K_STAGE "stage"
#define K_HOST "host"
#define K_PID "pid"
#define K_EVENT "ev"
#define K_CHUNK "chunk"
#define K_WALL "wall_ns"
#define K_OFFSET "off_ns"
#define K_OFFSET_ERR "off_err_ns"
#define K_NUMS "nums"
#define K_CLOCK "clock"

static const char *const STAGES[] = {KVP_STAGE_CLIENT, KVP_STAGE_AUX, KVP_STAGE_PREDICTOR,
                                     KVP_STAGE_DECODER};

static bool known_stage(const char *s) {
    for (size_t i = 0; i < sizeof STAGES / sizeof STAGES[0]; i++)
        if (!strcmp(s, STAGES[i])) return true;
    return false;
}

/* Copies s into dst[cap]; false (dst untouched) when it does not fit. */
static bool copy_str(char *dst, size_t cap, const char *s) {
    size_t n = strlen(s);
    if (n >= cap) return false;
    memcpy(dst, s, n + 1);
    return true;
}

static bool terminated(const char *s, size_t cap) {
    return memchr(s, 0, cap) != NULL;
}

/* ====================================================================== */
/* writing                                                                */
/* ====================================================================== */

struct kvp_trace_writer {
    pthread_mutex_t mu; /* guards everything below */
    int fd;
    char stage[KVP_TRACE_NAME_MAX];
    char host[KVP_TRACE_HOST_MAX];
    int32_t pid;
    int64_t offset_ns, offset_err_ns;
    msgpack_sbuffer buf; /* packed records not yet written */
    msgpack_packer pk;
    uint64_t n_dropped; /* records lost because the file could not be written */
};

static int pk_str(msgpack_packer *pk, const char *s) {
    return msgpack_pack_str_with_body(pk, s, strlen(s));
}

static int pk_key_str(msgpack_packer *pk, const char *k, const char *v) {
    return pk_str(pk, k) | pk_str(pk, v);
}

static int pk_key_int(msgpack_packer *pk, const char *k, int64_t v) {
    return pk_str(pk, k) | msgpack_pack_int64(pk, v);
}

/* Numbers are stored as integers when they are integers (exactly), else as
 * float64. */
static int pk_num(msgpack_packer *pk, double v) {
    if (isfinite(v) && v == floor(v) && fabs(v) < 9007199254740992.0)
        return msgpack_pack_int64(pk, (int64_t)v);
    return msgpack_pack_double(pk, v);
}

static int pack_header(kvp_trace_writer_t *w) {
    msgpack_packer *pk = &w->pk;
    int rc = msgpack_pack_map(pk, 6);
    rc |= pk_key_int(pk, K_VERSION, KVP_TRACE_FORMAT_VERSION);
    rc |= pk_key_str(pk, K_STAGE, w->stage);
    rc |= pk_key_str(pk, K_HOST, w->host);
    rc |= pk_key_int(pk, K_PID, w->pid);
    rc |= pk_key_int(pk, K_WALL, kvp_wall_ns());
    rc |= pk_key_str(pk, K_CLOCK, "CLOCK_REALTIME");
    return rc;
}

static int pack_rec(msgpack_packer *pk, const kvp_trace_rec_t *r) {
    int rc = msgpack_pack_map(pk, r->n_nums > 0 ? 10 : 9);
    rc |= pk_key_str(pk, K_REQ, r->request_id);
    rc |= pk_key_str(pk, K_STAGE, r->stage);
    rc |= pk_key_str(pk, K_HOST, r->host);
    rc |= pk_key_int(pk, K_PID, r->pid);
    rc |= pk_key_str(pk, K_EVENT, r->event);
    rc |= pk_key_int(pk, K_CHUNK, r->chunk);
    rc |= pk_key_int(pk, K_WALL, r->wall_ns);
    rc |= pk_key_int(pk, K_OFFSET, r->offset_ns);
    rc |= pk_key_int(pk, K_OFFSET_ERR, r->offset_err_ns);
    if (r->n_nums > 0) {
        rc |= pk_str(pk, K_NUMS) | msgpack_pack_map(pk, (size_t)r->n_nums);
        for (int i = 0; i < r->n_nums; i++)
            rc |= pk_str(pk, r->nums[i].key) | pk_num(pk, r->nums[i].v);
    }
    return rc;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Writes the buffer out; the caller holds w->mu. A buffer that cannot be
 * written is kept for a later try, up to TRACE_PENDING_MAX, then dropped (a
 * full disk must not grow a service's memory without bound). */
static int flush_locked(kvp_trace_writer_t *w, kvp_err_t *err) {
    if (w->buf.size == 0) return KVP_OK;
    if (write_all(w->fd, w->buf.data, w->buf.size) == 0) {
        msgpack_sbuffer_clear(&w->buf);
        return KVP_OK;
    }
    int e = errno;
    if (w->buf.size > TRACE_PENDING_MAX) {
        msgpack_sbuffer_clear(&w->buf);
        w->n_dropped++;
    }
    return kvp_err_set(err, KVP_EIO, "writing trace log: %s", strerror(e));
}

int kvp_trace_writer_new(const char *path, const char *stage, const char *host,
                         kvp_trace_writer_t **out, kvp_err_t *err) {
    *out = NULL;
    if (!path || !stage || !known_stage(stage))
        return kvp_err_set(err, KVP_EINVAL,
                           "trace writer: unknown stage '%s' (client, aux-prefill, predictor, "
                           "decoder)",
                           stage ? stage : "(null)");
    char hbuf[KVP_TRACE_HOST_MAX];
    if (!host) {
        if (gethostname(hbuf, sizeof hbuf) != 0) snprintf(hbuf, sizeof hbuf, "unknown");
        hbuf[sizeof hbuf - 1] = 0;
        host = hbuf;
    }
    kvp_trace_writer_t *w = calloc(1, sizeof *w);
    if (!w) return kvp_err_set(err, KVP_ENOMEM, "trace writer: out of memory");
    if (!copy_str(w->host, sizeof w->host, host)) {
        free(w);
        return kvp_err_set(err, KVP_EINVAL, "trace writer: host name longer than %d bytes",
                           KVP_TRACE_HOST_MAX - 1);
    }
    copy_str(w->stage, sizeof w->stage, stage);
    w->pid = (int32_t)getpid();
    w->fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        int e = errno;
        free(w);
        return kvp_err_set(err, KVP_EIO, "cannot open trace log %s: %s", path, strerror(e));
    }
    pthread_mutex_init(&w->mu, NULL);
    msgpack_sbuffer_init(&w->buf);
    msgpack_packer_init(&w->pk, &w->buf, msgpack_sbuffer_write);
    int rc = pack_header(w) ? kvp_err_set(err, KVP_ENOMEM, "trace writer: out of memory")
                            : flush_locked(w, err);
    if (rc) {
        kvp_err_wrap(err, "%s", path);
        kvp_trace_writer_free(&w);
        return rc;
    }
    *out = w;
    return KVP_OK;
}

void kvp_trace_writer_free(kvp_trace_writer_t **pw) {
    if (!pw || !*pw) return;
    kvp_trace_writer_t *w = *pw;
    pthread_mutex_lock(&w->mu);
    flush_locked(w, NULL);
    pthread_mutex_unlock(&w->mu);
    close(w->fd);
    msgpack_sbuffer_destroy(&w->buf);
    pthread_mutex_destroy(&w->mu);
    free(w);
    *pw = NULL;
}

void kvp_trace_writer_set_offset(kvp_trace_writer_t *w, int64_t offset_ns, int64_t err_ns) {
    pthread_mutex_lock(&w->mu);
    w->offset_ns = offset_ns;
    w->offset_err_ns = err_ns;
    pthread_mutex_unlock(&w->mu);
}

/* Packs a checked record and writes the buffer out when it is large. */
static int emit_checked(kvp_trace_writer_t *w, kvp_trace_rec_t *r, bool stamp) {
    pthread_mutex_lock(&w->mu);
    if (stamp) {
        r->offset_ns = w->offset_ns;
        r->offset_err_ns = w->offset_err_ns;
    }
    int rc = pack_rec(&w->pk, r) ? KVP_ENOMEM : KVP_OK;
    if (rc == KVP_OK && w->buf.size >= TRACE_FLUSH_BYTES) rc = flush_locked(w, NULL);
    pthread_mutex_unlock(&w->mu);
    return rc;
}

int kvp_trace_emit(kvp_trace_writer_t *w, const char *request_id, const char *event, int32_t chunk,
                   int64_t wall_ns, const kvp_trace_num_t *nums, int n_nums) {
    if (!w || !event || !*event || n_nums < 0 || n_nums > KVP_TRACE_NUMS_MAX ||
        (n_nums > 0 && !nums))
        return KVP_EINVAL;
    kvp_trace_rec_t r;
    memset(&r, 0, sizeof r);
    if (!copy_str(r.request_id, sizeof r.request_id, request_id ? request_id : "") ||
        !copy_str(r.event, sizeof r.event, event))
        return KVP_EINVAL;
    for (int i = 0; i < n_nums; i++) {
        if (!nums[i].key[0] || !terminated(nums[i].key, sizeof nums[i].key)) return KVP_EINVAL;
        r.nums[i] = nums[i];
    }
    r.n_nums = n_nums;
    memcpy(r.stage, w->stage, sizeof r.stage); /* fixed after _new: no lock needed */
    memcpy(r.host, w->host, sizeof r.host);
    r.pid = w->pid;
    r.chunk = chunk;
    r.wall_ns = wall_ns ? wall_ns : kvp_wall_ns();
    return emit_checked(w, &r, true);
}

int kvp_trace_mark(kvp_trace_writer_t *w, const char *request_id, const char *event,
                   int32_t chunk) {
    return kvp_trace_emit(w, request_id, event, chunk, 0, NULL, 0);
}

int kvp_trace_emit_rec(kvp_trace_writer_t *w, const kvp_trace_rec_t *rec) {
    if (!w || !rec || !terminated(rec->request_id, sizeof rec->request_id) ||
        !terminated(rec->stage, sizeof rec->stage) || !terminated(rec->host, sizeof rec->host) ||
        !terminated(rec->event, sizeof rec->event) || !rec->event[0] || !rec->stage[0] ||
        rec->n_nums < 0 || rec->n_nums > KVP_TRACE_NUMS_MAX)
        return KVP_EINVAL;
    for (int i = 0; i < rec->n_nums; i++)
        if (!rec->nums[i].key[0] || !terminated(rec->nums[i].key, sizeof rec->nums[i].key))
            return KVP_EINVAL;
    kvp_trace_rec_t r = *rec;
    return emit_checked(w, &r, false);
}

int kvp_trace_flush(kvp_trace_writer_t *w, kvp_err_t *err) {
    pthread_mutex_lock(&w->mu);
    int rc = flush_locked(w, err);
    pthread_mutex_unlock(&w->mu);
    return rc;
}

/* ====================================================================== */
/* reading                                                                */
/* ====================================================================== */

kvp_trace_set_t *kvp_trace_set_new(void) {
    return calloc(1, sizeof(kvp_trace_set_t));
}

void kvp_trace_set_free(kvp_trace_set_t **s) {
    if (!s || !*s) return;
    free((*s)->recs);
    free(*s);
    *s = NULL;
}

/* The ranges that make every later time difference fit in an int64. */
static bool rec_in_range(const kvp_trace_rec_t *r) {
    return r->wall_ns >= 0 && r->wall_ns <= TRACE_WALL_MAX && r->offset_ns >= -TRACE_OFFSET_MAX &&
           r->offset_ns <= TRACE_OFFSET_MAX && r->offset_err_ns >= 0 &&
           r->offset_err_ns <= TRACE_OFFSET_MAX && r->chunk >= -1 && r->chunk <= TRACE_CHUNK_MAX &&
           r->n_nums >= 0 && r->n_nums <= KVP_TRACE_NUMS_MAX;
}

int kvp_trace_set_add(kvp_trace_set_t *s, const kvp_trace_rec_t *rec, kvp_err_t *err) {
    if (!rec_in_range(rec) || !terminated(rec->request_id, sizeof rec->request_id) ||
        !terminated(rec->stage, sizeof rec->stage) || !terminated(rec->host, sizeof rec->host) ||
        !terminated(rec->event, sizeof rec->event))
        return kvp_err_set(err, KVP_EINVAL, "trace record out of range");
    if (s->n == s->cap) {
        if (s->cap >= TRACE_RECS_MAX)
            return kvp_err_set(err, KVP_ENOMEM, "more than %u trace records", TRACE_RECS_MAX);
        size_t cap = s->cap ? 2 * s->cap : 1024;
        kvp_trace_rec_t *p = realloc(s->recs, cap * sizeof *p);
        if (!p) return kvp_err_set(err, KVP_ENOMEM, "out of memory for trace records");
        s->recs = p;
        s->cap = cap;
    }
    s->recs[s->n++] = *rec;
    return KVP_OK;
}

/* Walks one MessagePack object starting at p[start] without building it, to
 * check every declared length before msgpack-c allocates for it (the unpacker
 * allocates a container's element array as soon as it reads the count).
 * Returns 1 (complete, ends at *end), 0 (cut off by the end of the data), -1
 * (a byte that is not MessagePack, at *end) or -2 (longer than
 * TRACE_REC_MAX). Counting the objects still owed makes recursion
 * unnecessary: each element takes at least one byte, so a count larger than
 * the bytes left cannot be complete. */
static int scan_record(const uint8_t *p, size_t len, size_t start, size_t *end) {
    bool capped = len - start > TRACE_REC_MAX;
    size_t lim = capped ? start + TRACE_REC_MAX : len;
    int short_data = capped ? -2 : 0;
    size_t pos = start;
    uint64_t owed = 1;
    while (owed > 0) {
        if (pos >= lim) return short_data;
        uint8_t b = p[pos];
        uint64_t body = 0, kids = 0;
        int lenbytes = 0, kind = 0; /* kind: 1 body bytes, 2 array, 3 map */
        size_t extra = 0;
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            /* fixint, nil, bool: the byte alone */
        } else if (b <= 0x8f) {
            kids = 2u * (b & 0x0fu);
        } else if (b <= 0x9f) {
            kids = b & 0x0fu;
        } else if (b <= 0xbf) {
            body = b & 0x1fu;
        } else {
            switch (b) {
            case 0xc4: /* bin8 */
            case 0xd9: /* str8 */
                lenbytes = 1, kind = 1;
                break;
            case 0xc5:
            case 0xda:
                lenbytes = 2, kind = 1;
                break;
            case 0xc6:
            case 0xdb:
                lenbytes = 4, kind = 1;
                break;
            case 0xc7: /* ext8, ext16, ext32: length, then a type byte */
                lenbytes = 1, kind = 1, extra = 1;
                break;
            case 0xc8:
                lenbytes = 2, kind = 1, extra = 1;
                break;
            case 0xc9:
                lenbytes = 4, kind = 1, extra = 1;
                break;
            case 0xcc:
            case 0xd0:
                body = 1;
                break;
            case 0xcd:
            case 0xd1:
                body = 2;
                break;
            case 0xca:
            case 0xce:
            case 0xd2:
                body = 4;
                break;
            case 0xcb:
            case 0xcf:
            case 0xd3:
                body = 8;
                break;
            case 0xd4: /* fixext 1, 2, 4, 8, 16: type byte + data */
                body = 2;
                break;
            case 0xd5:
                body = 3;
                break;
            case 0xd6:
                body = 5;
                break;
            case 0xd7:
                body = 9;
                break;
            case 0xd8:
                body = 17;
                break;
            case 0xdc:
                lenbytes = 2, kind = 2;
                break;
            case 0xdd:
                lenbytes = 4, kind = 2;
                break;
            case 0xde:
                lenbytes = 2, kind = 3;
                break;
            case 0xdf:
                lenbytes = 4, kind = 3;
                break;
            default: /* 0xc1: never used */
                *end = pos;
                return -1;
            }
        }
        size_t hdr = 1 + (size_t)lenbytes + extra;
        if (hdr > lim - pos) return short_data;
        if (lenbytes) {
            uint64_t n = 0;
            for (int i = 0; i < lenbytes; i++)
                n = n << 8 | p[pos + 1 + (size_t)i];
            if (kind == 1)
                body = n;
            else
                kids = kind == 2 ? n : 2 * n;
        }
        if (body > lim - pos - hdr) return short_data;
        pos += hdr + (size_t)body;
        if (kids > lim - pos) return short_data;
        owed = owed - 1 + kids;
    }
    *end = pos;
    return 1;
}

static bool key_is(const msgpack_object *k, const char *name) {
    size_t n = strlen(name);
    return k->type == MSGPACK_OBJECT_STR && k->via.str.size == n &&
           !memcmp(k->via.str.ptr, name, n);
}

static bool obj_str(const msgpack_object *o, char *dst, size_t cap) {
    if (o->type != MSGPACK_OBJECT_STR || o->via.str.size >= cap) return false;
    memcpy(dst, o->via.str.ptr, o->via.str.size);
    dst[o->via.str.size] = 0;
    return true;
}

static bool obj_int(const msgpack_object *o, int64_t *v) {
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= (uint64_t)INT64_MAX) {
        *v = (int64_t)o->via.u64;
        return true;
    }
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *v = o->via.i64;
        return true;
    }
    return false;
}

static bool obj_num(const msgpack_object *o, double *v) {
    int64_t i;
    if (obj_int(o, &i)) {
        *v = (double)i;
        return true;
    }
    if (o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_FLOAT32) {
        *v = o->via.f64;
        return true;
    }
    return false;
}

/* What the current header says: records may leave these out. */
typedef struct {
    char stage[KVP_TRACE_NAME_MAX];
    char host[KVP_TRACE_HOST_MAX];
    int64_t pid;
} header_t;

/* A record from a map; false when a field has the wrong type, is too long or
 * out of range, or a required one (req, stage, ev, wall_ns) is missing.
 * Unknown keys are ignored, so later versions may add fields. */
static bool rec_from_obj(const msgpack_object *o, const header_t *h, kvp_trace_rec_t *r) {
    memset(r, 0, sizeof *r);
    memcpy(r->stage, h->stage, sizeof r->stage);
    memcpy(r->host, h->host, sizeof r->host);
    int64_t pid = h->pid, chunk = -1;
    bool has_req = false, has_ev = false, has_wall = false;
    for (uint32_t i = 0; i < o->via.map.size; i++) {
        const msgpack_object *k = &o->via.map.ptr[i].key, *v = &o->via.map.ptr[i].val;
        bool ok = true;
        if (key_is(k, K_REQ))
            ok = has_req = obj_str(v, r->request_id, sizeof r->request_id);
        else if (key_is(k, K_STAGE))
            ok = obj_str(v, r->stage, sizeof r->stage);
        else if (key_is(k, K_HOST))
            ok = obj_str(v, r->host, sizeof r->host);
        else if (key_is(k, K_EVENT))
            ok = has_ev = obj_str(v, r->event, sizeof r->event);
        else if (key_is(k, K_PID))
            ok = obj_int(v, &pid);
        else if (key_is(k, K_CHUNK))
            ok = obj_int(v, &chunk);
        else if (key_is(k, K_WALL))
            ok = has_wall = obj_int(v, &r->wall_ns);
        else if (key_is(k, K_OFFSET))
            ok = obj_int(v, &r->offset_ns);
        else if (key_is(k, K_OFFSET_ERR))
            ok = obj_int(v, &r->offset_err_ns);
        else if (key_is(k, K_NUMS)) {
            if (v->type != MSGPACK_OBJECT_MAP || v->via.map.size > KVP_TRACE_NUMS_MAX) return false;
            for (uint32_t j = 0; j < v->via.map.size; j++) {
                kvp_trace_num_t *n = &r->nums[j];
                if (!obj_str(&v->via.map.ptr[j].key, n->key, sizeof n->key) ||
                    !obj_num(&v->via.map.ptr[j].val, &n->v))
                    return false;
            }
            r->n_nums = (int)v->via.map.size;
        }
        if (!ok) return false;
    }
    if (!has_req || !has_ev || !has_wall || !r->event[0] || !r->stage[0]) return false;
    if (pid < 0 || pid > INT32_MAX || chunk < -1 || chunk > TRACE_CHUNK_MAX) return false;
    r->pid = (int32_t)pid;
    r->chunk = (int32_t)chunk;
    return rec_in_range(r);
}

/* A header is a map with the K_VERSION key. Returns 1 (a header, read into
 * h), 0 (not a header) or a negative code (a header of an unknown version). */
static int header_from_obj(const msgpack_object *o, header_t *h, kvp_err_t *err) {
    if (o->type != MSGPACK_OBJECT_MAP) return 0;
    int64_t version = -1;
    bool found = false;
    header_t nh = {.pid = 0};
    for (uint32_t i = 0; i < o->via.map.size; i++) {
        const msgpack_object *k = &o->via.map.ptr[i].key, *v = &o->via.map.ptr[i].val;
        if (key_is(k, K_VERSION)) {
            found = true;
            if (!obj_int(v, &version)) version = -1;
        } else if (key_is(k, K_STAGE)) {
            obj_str(v, nh.stage, sizeof nh.stage);
        } else if (key_is(k, K_HOST)) {
            obj_str(v, nh.host, sizeof nh.host);
        } else if (key_is(k, K_PID)) {
            obj_int(v, &nh.pid);
        }
    }
    if (!found) return 0;
    if (version < 1 || version > KVP_TRACE_FORMAT_VERSION)
        return kvp_err_set(err, KVP_EUNSUPPORTED,
                           "trace log format version %" PRId64 " (this build reads 1 to %d)",
                           version, KVP_TRACE_FORMAT_VERSION);
    *h = nh;
    return 1;
}

static int read_file(const char *path, uint8_t **out, size_t *len, kvp_err_t *err) {
    *out = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return kvp_err_set(err, KVP_EIO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return kvp_err_set(err, KVP_EIO, "%s: not a regular file", path);
    }
    if ((unsigned long long)st.st_size > TRACE_LOG_MAX) {
        close(fd);
        return kvp_err_set(err, KVP_ENOMEM,
                           "%s: %lld bytes, more than the %llu a trace log may have", path,
                           (long long)st.st_size, TRACE_LOG_MAX);
    }
    size_t cap = (size_t)st.st_size, n = 0;
    uint8_t *buf = malloc(cap ? cap : 1);
    if (!buf) {
        close(fd);
        return kvp_err_set(err, KVP_ENOMEM, "%s: out of memory", path);
    }
    while (n < cap) { /* a log still being written may grow: read what was there */
        ssize_t k = read(fd, buf + n, cap - n);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) {
            int e = errno;
            free(buf);
            close(fd);
            return kvp_err_set(err, KVP_EIO, "reading %s: %s", path, strerror(e));
        }
        if (k == 0) break;
        n += (size_t)k;
    }
    close(fd);
    *out = buf;
    *len = n;
    return KVP_OK;
}

#define NOT_A_TRACE "not a kvpred trace log"

/* Decodes one checked object and adds it to s (a header updates h). */
static int take_object(kvp_trace_set_t *s, const msgpack_object *o, bool first, header_t *h,
                       kvp_trace_read_info_t *info, const char *path, kvp_err_t *err) {
    int hr = header_from_obj(o, h, err);
    if (hr < 0) return kvp_err_wrap(err, "%s", path);
    if (hr == 1) {
        info->n_headers++;
        return KVP_OK;
    }
    if (first)
        return kvp_err_set(err, KVP_EFORMAT,
                           "%s: " NOT_A_TRACE " (it does not start with a trace header)", path);
    kvp_trace_rec_t r;
    if (o->type != MSGPACK_OBJECT_MAP || !rec_from_obj(o, h, &r)) {
        info->n_skipped++;
        return KVP_OK;
    }
    int rc = kvp_trace_set_add(s, &r, err);
    info->n_records += rc == KVP_OK;
    return rc;
}

/* Each object is first checked by scan_record, then its bytes (and only
 * those) are fed to msgpack-c's unpacker, which decodes it. */
int kvp_trace_set_read(kvp_trace_set_t *s, const char *path, kvp_trace_read_info_t *info,
                       kvp_err_t *err) {
    kvp_trace_read_info_t tmp;
    if (!info) info = &tmp;
    memset(info, 0, sizeof *info);
    uint8_t *buf;
    size_t len;
    int rc = read_file(path, &buf, &len, err);
    if (rc) return rc;
    if (len == 0) {
        free(buf);
        return kvp_err_set(err, KVP_EFORMAT, "%s: empty file, " NOT_A_TRACE, path);
    }
    msgpack_unpacker u;
    if (!msgpack_unpacker_init(&u, 64 * 1024)) {
        free(buf);
        return kvp_err_set(err, KVP_ENOMEM, "%s: out of memory", path);
    }
    msgpack_unpacked obj;
    msgpack_unpacked_init(&obj);
    header_t h = {.pid = 0};
    size_t pos = 0, n_before = s->n;
    while (rc == KVP_OK && pos < len) {
        size_t end = 0;
        int r = scan_record(buf, len, pos, &end);
        if (r == 0 && pos > 0) { /* the last record was cut off: keep what came before */
            info->truncated_bytes = len - pos;
            break;
        }
        if (r != 1) {
            if (pos == 0)
                rc = kvp_err_set(err, KVP_EFORMAT, "%s: " NOT_A_TRACE "%s", path,
                                 r == 0 ? " (or one cut inside its header)" : "");
            else if (r == -2)
                rc = kvp_err_set(err, KVP_EFORMAT,
                                 "%s: record at offset %zu is longer than %u bytes: corrupt log",
                                 path, pos, TRACE_REC_MAX);
            else
                rc = kvp_err_set(err, KVP_EFORMAT,
                                 "%s: byte 0x%02x at offset %zu is not MessagePack: corrupt log",
                                 path, buf[end], end);
            break;
        }
        if (!msgpack_unpacker_reserve_buffer(&u, end - pos)) {
            rc = kvp_err_set(err, KVP_ENOMEM, "%s: out of memory", path);
            break;
        }
        memcpy(msgpack_unpacker_buffer(&u), buf + pos, end - pos);
        msgpack_unpacker_buffer_consumed(&u, end - pos);
        msgpack_unpack_return ur = msgpack_unpacker_next(&u, &obj);
        if (ur != MSGPACK_UNPACK_SUCCESS)
            rc = pos == 0
                     ? kvp_err_set(err, KVP_EFORMAT, "%s: " NOT_A_TRACE, path)
                     : kvp_err_set(err, KVP_EFORMAT,
                                   "%s: cannot decode the record at offset %zu%s: corrupt log",
                                   path, pos,
                                   ur == MSGPACK_UNPACK_NOMEM_ERROR ? " (nested too deeply)" : "");
        else
            rc = take_object(s, &obj.data, pos == 0, &h, info, path, err);
        pos = end;
    }
    msgpack_unpacked_destroy(&obj);
    msgpack_unpacker_destroy(&u);
    free(buf);
    if (rc) {
        s->n = n_before; /* all of a log or nothing */
        return rc;
    }
    s->n_logs++;
    s->n_truncated += info->truncated_bytes > 0;
    s->n_skipped += info->n_skipped;
    return KVP_OK;
}

/* ====================================================================== */
/* analysis                                                               */
/* ====================================================================== */

/* Entry-clock time of a record. */
static int64_t t_of(const kvp_trace_rec_t *r) {
    return r->wall_ns - r->offset_ns;
}

static int cmp_rec(const void *a, const void *b) {
    const kvp_trace_rec_t *x = *(const kvp_trace_rec_t *const *)a;
    const kvp_trace_rec_t *y = *(const kvp_trace_rec_t *const *)b;
    int c = strcmp(x->request_id, y->request_id);
    if (c) return c;
    int64_t tx = t_of(x), ty = t_of(y);
    if (tx != ty) return tx < ty ? -1 : 1;
    return x < y ? -1 : x > y; /* same time: the order they were read in */
}

/* Pointers to the records that belong to a request, sorted by request id and
 * then entry-clock time, so that each request is one run. */
static int sorted_requests(const kvp_trace_set_t *s, const kvp_trace_rec_t ***out, size_t *n_out,
                           kvp_err_t *err) {
    const kvp_trace_rec_t **p = malloc((s->n ? s->n : 1) * sizeof *p);
    if (!p) return kvp_err_set(err, KVP_ENOMEM, "out of memory sorting trace records");
    size_t n = 0;
    for (size_t i = 0; i < s->n; i++)
        if (s->recs[i].request_id[0]) p[n++] = &s->recs[i];
    qsort(p, n, sizeof *p, cmp_rec);
    *out = p;
    *n_out = n;
    return KVP_OK;
}

typedef struct {
    const kvp_trace_rec_t *const *r;
    size_t n;
} group_t;

#define ANY_CHUNK (-2)

/* The earliest (or latest) record of an event, for one chunk or any. */
static const kvp_trace_rec_t *find(group_t g, const char *event, int chunk, bool latest) {
    for (size_t k = 0; k < g.n; k++) {
        const kvp_trace_rec_t *r = g.r[latest ? g.n - 1 - k : k];
        if (!strcmp(r->event, event) && (chunk == ANY_CHUNK || r->chunk == chunk)) return r;
    }
    return NULL;
}

static bool rec_num(const kvp_trace_rec_t *r, const char *key, double *v) {
    for (int i = 0; r && i < r->n_nums; i++)
        if (!strcmp(r->nums[i].key, key)) {
            *v = r->nums[i].v;
            return true;
        }
    return false;
}

static bool is_chunk_event(const char *ev) {
    static const char *const evs[] = {
        KVP_EV_AUX_CHUNK_START, KVP_EV_AUX_CHUNK_END, KVP_EV_CHUNK_SENT, KVP_EV_PRED_RECV,
        KVP_EV_PRED_MAPPED,     KVP_EV_PRED_SENT,     KVP_EV_DEC_RECV,   KVP_EV_DEC_WRITTEN};
    for (size_t i = 0; i < sizeof evs / sizeof evs[0]; i++)
        if (!strcmp(ev, evs[i])) return true;
    return false;
}

const char *kvp_trace_mode_name(kvp_trace_mode_t m) {
    switch (m) {
    case KVP_TRACE_MODE_KVP:
        return "kvp";
    case KVP_TRACE_MODE_BASELINE:
        return "baseline";
    case KVP_TRACE_MODE_AUX_ONLY:
        return "aux-only";
    default:
        return "?";
    }
}

/* The mode the accepted record names, else the one its events imply. */
static kvp_trace_mode_t infer_mode(group_t g, const kvp_trace_rec_t *acc) {
    double m;
    if (rec_num(acc, KVP_NUM_MODE, &m) && (m == 0 || m == 1 || m == 2)) return (kvp_trace_mode_t)m;
    if (find(g, KVP_EV_CACHE_COMPLETE, ANY_CHUNK, false) ||
        find(g, KVP_EV_PRED_RECV, ANY_CHUNK, false) || find(g, KVP_EV_DEC_RECV, ANY_CHUNK, false))
        return KVP_TRACE_MODE_KVP;
    if (find(g, KVP_EV_DEC_PREFILL_START, ANY_CHUNK, false) ||
        find(g, KVP_EV_DEC_PREFILL_END, ANY_CHUNK, false))
        return KVP_TRACE_MODE_BASELINE;
    if (find(g, KVP_EV_AUX_DECODE, ANY_CHUNK, false)) return KVP_TRACE_MODE_AUX_ONLY;
    return KVP_TRACE_MODE_UNKNOWN;
}

/* Appends "name" or "name[k]" to the request's list of missing events. */
static void need(kvp_trace_req_t *q, const kvp_trace_rec_t *r, const char *event, int chunk) {
    if (r) return;
    q->complete = false;
    size_t n = strlen(q->reason);
    const char *sep = n == 0 ? "missing " : ", ";
    if (chunk >= 0)
        snprintf(q->reason + n, sizeof q->reason - n, "%s%s[%d]", sep, event, chunk);
    else
        snprintf(q->reason + n, sizeof q->reason - n, "%s%s", sep, event);
}

/* Sums in uint64 (wrap-around is defined) so that garbage input cannot
 * overflow; for real traces this is the plain sum. */
static int64_t sum_parts(const int64_t *v, int n) {
    uint64_t s = 0;
    for (int i = 0; i < n; i++)
        if (v[i] != KVP_TRACE_NONE) s += (uint64_t)v[i];
    return (int64_t)s;
}

static void analyze_one(group_t g, kvp_trace_req_t *q) {
    memset(q, 0, sizeof *q);
    snprintf(q->request_id, sizeof q->request_id, "%s", g.r[0]->request_id);
    q->complete = true;
    q->ttft_ns = q->queueing_ns = q->prefill_ns = q->prediction_ns = q->transfer_ns =
        q->first_step_ns = q->handoff_ns = q->sum_err_ns = q->client_ttft_ns = KVP_TRACE_NONE;

    const kvp_trace_rec_t *acc = find(g, KVP_EV_ACCEPTED, ANY_CHUNK, false);
    q->start_ns = t_of(acc ? acc : g.r[0]);
    q->mode = infer_mode(g, acc);

    int max_chunk = -1, n_tok = 0;
    const kvp_trace_rec_t *failed = NULL;
    for (size_t i = 0; i < g.n; i++) {
        const kvp_trace_rec_t *r = g.r[i];
        if (r->offset_err_ns > q->max_offset_err_ns) q->max_offset_err_ns = r->offset_err_ns;
        if (is_chunk_event(r->event) && r->chunk > max_chunk) max_chunk = r->chunk;
        if (!strcmp(r->event, KVP_EV_TOKEN)) n_tok++;
        if (!failed && !strcmp(r->event, KVP_EV_ERROR)) failed = r;
    }
    double v;
    q->n_chunks = max_chunk + 1;
    bool no_chunks = false; /* aux-prefill said the prompt needs none */
    if (rec_num(find(g, KVP_EV_TOKENIZED, ANY_CHUNK, false), KVP_NUM_CHUNKS, &v) && v >= 0 &&
        v <= TRACE_CHUNK_MAX) {
        q->n_chunks = (int)v;
        no_chunks = v == 0;
    }
    const kvp_trace_rec_t *ft = find(g, KVP_EV_FIRST_TOKEN, ANY_CHUNK, false);
    if (rec_num(find(g, KVP_EV_DONE, ANY_CHUNK, true), KVP_NUM_TOKENS, &v) && v >= 0 && v < 1e9)
        q->n_tokens = (int)v;
    else
        q->n_tokens = n_tok > 0 ? n_tok : ft != NULL;

    const kvp_trace_rec_t *cs = find(g, KVP_EV_CLIENT_SEND, ANY_CHUNK, false);
    const kvp_trace_rec_t *cft = find(g, KVP_EV_CLIENT_FIRST_TOKEN, ANY_CHUNK, false);
    if (cs && cft) q->client_ttft_ns = t_of(cft) - t_of(cs);

    need(q, acc, KVP_EV_ACCEPTED, -1);
    int last = q->n_chunks - 1;
    switch (q->mode) {
    case KVP_TRACE_MODE_KVP:
        if (no_chunks) {
            /* a one-token prompt: nothing to prefill or predict; the decoder's
             * cache is complete (empty) when its reservation is made */
            const kvp_trace_rec_t *cc = find(g, KVP_EV_CACHE_COMPLETE, ANY_CHUNK, false);
            need(q, cc, KVP_EV_CACHE_COMPLETE, -1);
            need(q, ft, KVP_EV_FIRST_TOKEN, -1);
            if (!q->complete) break;
            q->queueing_ns = t_of(cc) - t_of(acc);
            q->prefill_ns = q->prediction_ns = q->transfer_ns = 0;
            q->first_step_ns = t_of(ft) - t_of(cc);
            break;
        }
        /* fall through */
    case KVP_TRACE_MODE_AUX_ONLY: {
        const kvp_trace_rec_t *s0 = find(g, KVP_EV_AUX_CHUNK_START, ANY_CHUNK, false);
        const kvp_trace_rec_t *e_last = find(g, KVP_EV_AUX_CHUNK_END, ANY_CHUNK, true);
        need(q, s0, KVP_EV_AUX_CHUNK_START, -1);
        if (last >= 0)
            need(q, find(g, KVP_EV_AUX_CHUNK_END, last, true), KVP_EV_AUX_CHUNK_END, last);
        else
            need(q, NULL, KVP_EV_AUX_CHUNK_END, -1);
        if (q->mode == KVP_TRACE_MODE_AUX_ONLY) {
            need(q, ft, KVP_EV_FIRST_TOKEN, -1);
            if (!q->complete) break;
            q->queueing_ns = t_of(s0) - t_of(acc);
            q->prefill_ns = t_of(e_last) - t_of(s0);
            q->first_step_ns = t_of(ft) - t_of(e_last);
            break;
        }
        const kvp_trace_rec_t *pr = last >= 0 ? find(g, KVP_EV_PRED_RECV, last, false) : NULL;
        const kvp_trace_rec_t *pm = last >= 0 ? find(g, KVP_EV_PRED_MAPPED, last, true) : NULL;
        const kvp_trace_rec_t *cc = find(g, KVP_EV_CACHE_COMPLETE, ANY_CHUNK, false);
        if (last >= 0) {
            need(q, pr, KVP_EV_PRED_RECV, last);
            need(q, pm, KVP_EV_PRED_MAPPED, last);
        }
        need(q, cc, KVP_EV_CACHE_COMPLETE, -1);
        need(q, ft, KVP_EV_FIRST_TOKEN, -1);
        if (e_last && cc) q->handoff_ns = t_of(cc) - t_of(e_last);
        if (!q->complete) break;
        q->queueing_ns = t_of(s0) - t_of(acc);
        q->prefill_ns = t_of(e_last) - t_of(s0);
        q->prediction_ns = t_of(pm) - t_of(pr);
        q->transfer_ns = q->handoff_ns - q->prediction_ns;
        q->first_step_ns = t_of(ft) - t_of(cc);
        break;
    }
    case KVP_TRACE_MODE_BASELINE: {
        const kvp_trace_rec_t *ps = find(g, KVP_EV_DEC_PREFILL_START, ANY_CHUNK, false);
        const kvp_trace_rec_t *pe = find(g, KVP_EV_DEC_PREFILL_END, ANY_CHUNK, true);
        need(q, ps, KVP_EV_DEC_PREFILL_START, -1);
        need(q, pe, KVP_EV_DEC_PREFILL_END, -1);
        need(q, ft, KVP_EV_FIRST_TOKEN, -1);
        if (!q->complete) break;
        q->queueing_ns = t_of(ps) - t_of(acc);
        q->prefill_ns = t_of(pe) - t_of(ps);
        q->first_step_ns = t_of(ft) - t_of(pe);
        break;
    }
    default:
        q->complete = false;
        need(q, ft, KVP_EV_FIRST_TOKEN, -1);
        {
            size_t n = strlen(q->reason);
            snprintf(q->reason + n, sizeof q->reason - n,
                     "%sunknown mode (no chunk, dec_prefill or aux_decode events)", n ? "; " : "");
        }
        break;
    }
    if (acc && ft) q->ttft_ns = t_of(ft) - t_of(acc);
    if (q->complete) {
        int64_t parts[] = {q->queueing_ns, q->prefill_ns, q->prediction_ns, q->transfer_ns,
                           q->first_step_ns};
        uint64_t d = (uint64_t)sum_parts(parts, 5) - (uint64_t)q->ttft_ns;
        int64_t sd = (int64_t)d;
        q->sum_err_ns = sd == INT64_MIN ? INT64_MAX : sd < 0 ? -sd : sd;
    }
    if (failed) {
        q->failed = true;
        size_t n = strlen(q->reason);
        snprintf(q->reason + n, sizeof q->reason - n, "%serror at %s", n ? "; " : "",
                 failed->stage);
    }
}

static int cmp_req(const void *a, const void *b) {
    const kvp_trace_req_t *x = a, *y = b;
    if (x->start_ns != y->start_ns) return x->start_ns < y->start_ns ? -1 : 1;
    return strcmp(x->request_id, y->request_id);
}

/* Calls fn for each request's run of sorted records. */
typedef int (*group_fn)(group_t g, void *user);
static int for_each_group(const kvp_trace_rec_t **p, size_t n, group_fn fn, void *user) {
    for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        while (j < n && !strcmp(p[j]->request_id, p[i]->request_id))
            j++;
        int rc = fn((group_t){p + i, j - i}, user);
        if (rc) return rc;
        i = j;
    }
    return 0;
}

typedef struct {
    kvp_trace_req_t *reqs;
    size_t n;
} req_list_t;

static int analyze_group(group_t g, void *user) {
    req_list_t *l = user;
    analyze_one(g, &l->reqs[l->n++]);
    return 0;
}

int kvp_trace_analyze(const kvp_trace_set_t *s, kvp_trace_req_t **out, size_t *n_out,
                      kvp_err_t *err) {
    *out = NULL;
    *n_out = 0;
    const kvp_trace_rec_t **p = NULL;
    size_t n = 0;
    int rc = sorted_requests(s, &p, &n, err);
    if (rc) return rc;
    size_t n_groups = 0;
    for (size_t i = 0; i < n; i++)
        n_groups += i == 0 || strcmp(p[i]->request_id, p[i - 1]->request_id) != 0;
    req_list_t l = {calloc(n_groups ? n_groups : 1, sizeof(kvp_trace_req_t)), 0};
    if (!l.reqs) {
        free(p);
        return kvp_err_set(err, KVP_ENOMEM, "out of memory for trace requests");
    }
    for_each_group(p, n, analyze_group, &l);
    free(p);
    qsort(l.reqs, l.n, sizeof *l.reqs, cmp_req);
    *out = l.reqs;
    *n_out = l.n;
    return KVP_OK;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Mean and percentiles of v (sorted in place), in milliseconds. */
static kvp_trace_stats_t stats_of(int64_t *v, size_t n) {
    kvp_trace_stats_t st = {.n = n};
    if (n == 0) {
        st.mean_ms = st.p50_ms = st.p90_ms = NAN;
        return st;
    }
    qsort(v, n, sizeof *v, cmp_i64);
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += (double)v[i];
    st.mean_ms = sum / (double)n * 1e-6;
    double qs[2] = {0.5, 0.9}, *outs[2] = {&st.p50_ms, &st.p90_ms};
    for (int k = 0; k < 2; k++) {
        double pos = qs[k] * (double)(n - 1);
        size_t lo = (size_t)pos, hi = lo + 1 < n ? lo + 1 : lo;
        *outs[k] = ((double)v[lo] + ((double)v[hi] - (double)v[lo]) * (pos - (double)lo)) * 1e-6;
    }
    return st;
}

void kvp_trace_summarize(const kvp_trace_req_t *reqs, size_t n, kvp_trace_mode_t mode,
                         kvp_trace_summary_t *out) {
    memset(out, 0, sizeof *out);
    int64_t *v = malloc(3 * (n ? n : 1) * sizeof *v);
    if (!v) {
        out->ttft = out->handoff = out->client_ttft = stats_of(NULL, 0);
        return;
    }
    int64_t *ttft = v, *hand = v + n, *cli = v + 2 * n;
    size_t nt = 0, nh = 0, nc = 0;
    for (size_t i = 0; i < n; i++) {
        const kvp_trace_req_t *q = &reqs[i];
        if (q->mode != mode) continue;
        out->n_requests++;
        if (!q->complete || q->failed) continue;
        out->n_complete++;
        ttft[nt++] = q->ttft_ns;
        if (q->handoff_ns != KVP_TRACE_NONE) hand[nh++] = q->handoff_ns;
        if (q->client_ttft_ns != KVP_TRACE_NONE) cli[nc++] = q->client_ttft_ns;
    }
    out->ttft = stats_of(ttft, nt);
    out->handoff = stats_of(hand, nh);
    out->client_ttft = stats_of(cli, nc);
    free(v);
}

/* ====================================================================== */
/* Chrome / Perfetto trace                                                */
/* ====================================================================== */

/* A track is a (host, pid, label) where label is a stage, or "transfer" or
 * "requests" for spans that belong to no single stage. Spans on one track that
 * overlap go to further lanes (threads), because trace viewers expect a
 * thread's spans to nest. */
typedef struct {
    int host;    /* index into the host list: the process */
    int32_t pid; /* the stage's own pid */
    const char *label;
    int order; /* thread sort order */
    int n_lanes, first_tid;
    int64_t *lane_end; /* lane_end[n_lanes] */
} track_t;

typedef struct {
    int track, lane;
    char name[48];
    int64_t t0, t1;
    const kvp_trace_rec_t *rec; /* its request id and chunk go into args */
} span_t;

typedef struct {
    int track;
    const kvp_trace_rec_t *rec;
} instant_t;

typedef struct {
    const char **hosts;
    int n_hosts, cap_hosts;
    track_t *tracks;
    int n_tracks, cap_tracks;
    span_t *spans;
    size_t n_spans, cap_spans;
    instant_t *instants;
    size_t n_instants, cap_instants;
    bool oom;
} chrome_t;

static bool grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return true;
    size_t c = *cap ? *cap * 2 : 64;
    while (c < need)
        c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return false;
    *p = q;
    *cap = c;
    return true;
}

static int track_order(const char *label) {
    static const char *const order[] = {"requests",          KVP_STAGE_CLIENT, KVP_STAGE_AUX,
                                        KVP_STAGE_PREDICTOR, "transfer",       KVP_STAGE_DECODER};
    for (int i = 0; i < (int)(sizeof order / sizeof order[0]); i++)
        if (!strcmp(label, order[i])) return i;
    return 99;
}

/* The track of (r's host, r's pid, label), created on first use; -1 when out
 * of memory. */
static int track_of(chrome_t *c, const kvp_trace_rec_t *r, const char *label) {
    int h = 0;
    while (h < c->n_hosts && strcmp(c->hosts[h], r->host))
        h++;
    if (h == c->n_hosts) {
        size_t cap = (size_t)c->cap_hosts;
        if (!grow((void **)&c->hosts, &cap, (size_t)h + 1, sizeof *c->hosts)) return -1;
        c->cap_hosts = (int)cap;
        c->hosts[c->n_hosts++] = r->host;
    }
    for (int t = 0; t < c->n_tracks; t++)
        if (c->tracks[t].host == h && c->tracks[t].pid == r->pid &&
            !strcmp(c->tracks[t].label, label))
            return t;
    size_t cap = (size_t)c->cap_tracks;
    if (!grow((void **)&c->tracks, &cap, (size_t)c->n_tracks + 1, sizeof *c->tracks)) return -1;
    c->cap_tracks = (int)cap;
    c->tracks[c->n_tracks] =
        (track_t){.host = h, .pid = r->pid, .label = label, .order = track_order(label)};
    return c->n_tracks++;
}

static void add_span(chrome_t *c, const kvp_trace_rec_t *where, const char *label,
                     const kvp_trace_rec_t *a, const kvp_trace_rec_t *b, const char *name,
                     int chunk) {
    if (!a || !b) return;
    int t = track_of(c, where, label);
    if (t < 0 || !grow((void **)&c->spans, &c->cap_spans, c->n_spans + 1, sizeof *c->spans)) {
        c->oom = true;
        return;
    }
    span_t *s = &c->spans[c->n_spans++];
    memset(s, 0, sizeof *s);
    s->track = t;
    if (chunk >= 0)
        snprintf(s->name, sizeof s->name, "%s %d", name, chunk);
    else
        snprintf(s->name, sizeof s->name, "%s", name);
    s->t0 = t_of(a);
    s->t1 = t_of(b);
    if (s->t1 < s->t0) s->t1 = s->t0; /* clock error larger than the span: show it empty */
    s->rec = a;
}

/* Events that are ends of spans rather than instants of their own. */
static bool is_span_end(const char *ev) {
    static const char *const evs[] = {
        KVP_EV_AUX_CHUNK_START, KVP_EV_AUX_CHUNK_END,     KVP_EV_PRED_RECV,
        KVP_EV_PRED_MAPPED,     KVP_EV_DEC_RECV,          KVP_EV_DEC_WRITTEN,
        KVP_EV_CHUNK_SENT,      KVP_EV_DEC_PREFILL_START, KVP_EV_DEC_PREFILL_END};
    for (size_t i = 0; i < sizeof evs / sizeof evs[0]; i++)
        if (!strcmp(ev, evs[i])) return true;
    return false;
}

static int chrome_group(group_t g, void *user) {
    chrome_t *c = user;
    for (size_t i = 0; i < g.n; i++) {
        const kvp_trace_rec_t *r = g.r[i];
        const char *ev = r->event;
        int k = r->chunk;
        if (!strcmp(ev, KVP_EV_AUX_CHUNK_START))
            add_span(c, r, r->stage, r, find(g, KVP_EV_AUX_CHUNK_END, k, false), "aux chunk", k);
        else if (!strcmp(ev, KVP_EV_PRED_RECV))
            add_span(c, r, r->stage, r, find(g, KVP_EV_PRED_MAPPED, k, false), "predict", k);
        else if (!strcmp(ev, KVP_EV_DEC_RECV))
            add_span(c, r, r->stage, r, find(g, KVP_EV_DEC_WRITTEN, k, false), "decoder write", k);
        else if (!strcmp(ev, KVP_EV_DEC_PREFILL_START))
            add_span(c, r, r->stage, r, find(g, KVP_EV_DEC_PREFILL_END, ANY_CHUNK, true),
                     "base prefill", -1);
        else if (!strcmp(ev, KVP_EV_CHUNK_SENT)) {
            const kvp_trace_rec_t *d = find(g, KVP_EV_DEC_RECV, k, false);
            if (d) add_span(c, d, "transfer", r, d, "transfer", k); /* on the receiver's host */
        }
        if (!is_span_end(ev)) {
            int t = track_of(c, r, r->stage);
            if (t < 0 || !grow((void **)&c->instants, &c->cap_instants, c->n_instants + 1,
                               sizeof *c->instants)) {
                c->oom = true;
                continue;
            }
            c->instants[c->n_instants++] = (instant_t){t, r};
        }
    }
    /* first step: from whatever ended the prefill to the first token */
    const kvp_trace_rec_t *ft = find(g, KVP_EV_FIRST_TOKEN, ANY_CHUNK, false);
    if (ft) {
        const kvp_trace_rec_t *from = find(g, KVP_EV_CACHE_COMPLETE, ANY_CHUNK, false);
        if (!from) from = find(g, KVP_EV_DEC_PREFILL_END, ANY_CHUNK, true);
        if (!from && find(g, KVP_EV_AUX_DECODE, ANY_CHUNK, false))
            from = find(g, KVP_EV_AUX_CHUNK_END, ANY_CHUNK, true);
        add_span(c, ft, ft->stage, from, ft, "first step", -1);
    }
    const kvp_trace_rec_t *acc = find(g, KVP_EV_ACCEPTED, ANY_CHUNK, false);
    const kvp_trace_rec_t *done = find(g, KVP_EV_DONE, ANY_CHUNK, true);
    if (acc && done) {
        char name[48];
        snprintf(name, sizeof name, "request %.38s", acc->request_id);
        add_span(c, acc, "requests", acc, done, name, -1);
    }
    return 0;
}

static int cmp_span(const void *a, const void *b) {
    const span_t *x = a, *y = b;
    if (x->track != y->track) return x->track - y->track;
    if (x->t0 != y->t0) return x->t0 < y->t0 ? -1 : 1;
    return (x->t1 < y->t1) - (x->t1 > y->t1); /* longer first */
}

/* Order of threads: by process, then stages in pipeline order. */
static bool track_before(const track_t *x, const track_t *y) {
    if (x->host != y->host) return x->host < y->host;
    if (x->order != y->order) return x->order < y->order;
    return x->pid < y->pid;
}

/* First-fit lanes: a span goes to the first lane whose last span has ended. */
static bool assign_lanes(chrome_t *c) {
    qsort(c->spans, c->n_spans, sizeof *c->spans, cmp_span);
    for (size_t i = 0; i < c->n_spans; i++) {
        span_t *s = &c->spans[i];
        track_t *t = &c->tracks[s->track];
        int l = 0;
        while (l < t->n_lanes && t->lane_end[l] > s->t0)
            l++;
        if (l == t->n_lanes) {
            int64_t *p = realloc(t->lane_end, (size_t)(l + 1) * sizeof *p);
            if (!p) return false;
            t->lane_end = p;
            t->n_lanes++;
        }
        t->lane_end[l] = s->t1;
        s->lane = l;
    }
    /* thread ids in that order */
    int *idx = malloc((size_t)(c->n_tracks ? c->n_tracks : 1) * sizeof *idx);
    if (!idx) return false;
    for (int i = 0; i < c->n_tracks; i++) { /* insertion sort: a handful of tracks */
        int j = i;
        while (j > 0 && track_before(&c->tracks[i], &c->tracks[idx[j - 1]])) {
            idx[j] = idx[j - 1];
            j--;
        }
        idx[j] = i;
    }
    int tid = 1;
    for (int i = 0; i < c->n_tracks; i++) {
        track_t *t = &c->tracks[idx[i]];
        if (t->n_lanes == 0) t->n_lanes = 1; /* instants only */
        t->first_tid = tid;
        tid += t->n_lanes;
    }
    free(idx);
    return true;
}

static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20 || ch == 0x7f)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

/* Nanoseconds as microseconds with three decimals, exactly. */
static void json_us(FILE *f, int64_t ns) {
    fprintf(f, "%" PRId64 ".%03d", ns / 1000, (int)(ns % 1000));
}

static void json_args(FILE *f, const kvp_trace_rec_t *r) {
    fputs(",\"args\":{\"request\":", f);
    json_str(f, r->request_id);
    fprintf(f, ",\"stage\":");
    json_str(f, r->stage);
    if (r->chunk >= 0) fprintf(f, ",\"chunk\":%d", (int)r->chunk);
    for (int i = 0; i < r->n_nums; i++) {
        fputc(',', f);
        json_str(f, r->nums[i].key);
        if (isfinite(r->nums[i].v))
            fprintf(f, ":%.17g", r->nums[i].v);
        else
            fputs(":null", f);
    }
    fprintf(f, ",\"offset_err_us\":");
    json_us(f, r->offset_err_ns);
    fputc('}', f);
}

static void chrome_free(chrome_t *c) {
    for (int t = 0; t < c->n_tracks; t++)
        free(c->tracks[t].lane_end);
    free(c->hosts);
    free(c->tracks);
    free(c->spans);
    free(c->instants);
}

int kvp_trace_write_chrome(const kvp_trace_set_t *s, const char *path, size_t *n_events,
                           kvp_err_t *err) {
    if (n_events) *n_events = 0;
    const kvp_trace_rec_t **p = NULL;
    size_t n = 0;
    int rc = sorted_requests(s, &p, &n, err);
    if (rc) return rc;
    chrome_t c = {0};
    for_each_group(p, n, chrome_group, &c);
    /* records about no request: instants on their stage's track */
    for (size_t i = 0; i < s->n && !c.oom; i++) {
        if (s->recs[i].request_id[0]) continue;
        int t = track_of(&c, &s->recs[i], s->recs[i].stage);
        if (t < 0 ||
            !grow((void **)&c.instants, &c.cap_instants, c.n_instants + 1, sizeof *c.instants))
            c.oom = true;
        else
            c.instants[c.n_instants++] = (instant_t){t, &s->recs[i]};
    }
    free(p);
    if (c.oom || !assign_lanes(&c)) {
        chrome_free(&c);
        return kvp_err_set(err, KVP_ENOMEM, "out of memory building the Chrome trace");
    }
    int64_t t_min = INT64_MAX;
    for (size_t i = 0; i < s->n; i++)
        if (t_of(&s->recs[i]) < t_min) t_min = t_of(&s->recs[i]);

    FILE *f = fopen(path, "w");
    if (!f) {
        rc = kvp_err_set(err, KVP_EIO, "cannot write %s: %s", path, strerror(errno));
        chrome_free(&c);
        return rc;
    }
    size_t count = 0;
    fputs("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n", f);
#define SEP() fputs(count++ ? ",\n" : "", f)
    for (int h = 0; h < c.n_hosts; h++) {
        int first = 99; /* hosts in pipeline order of the first stage they run */
        for (int t = 0; t < c.n_tracks; t++)
            if (c.tracks[t].host == h && c.tracks[t].order < first) first = c.tracks[t].order;
        SEP();
        fprintf(f,
                "{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":%d,\"tid\":0,\"args\":{\"name\":",
                h + 1);
        json_str(f, c.hosts[h]);
        fputs("}}", f);
        SEP();
        fprintf(f,
                "{\"ph\":\"M\",\"name\":\"process_sort_index\",\"pid\":%d,\"tid\":0,"
                "\"args\":{\"sort_index\":%d}}",
                h + 1, first * 1000 + h);
    }
    for (int t = 0; t < c.n_tracks; t++) {
        const track_t *tr = &c.tracks[t];
        for (int l = 0; l < tr->n_lanes; l++) {
            char name[KVP_TRACE_NAME_MAX + 48];
            int m = snprintf(name, sizeof name, "%s", tr->label);
            if (tr->pid > 0)
                m += snprintf(name + m, sizeof name - (size_t)m, " (pid %d)", (int)tr->pid);
            if (l > 0) snprintf(name + m, sizeof name - (size_t)m, " #%d", l + 1);
            SEP();
            fprintf(
                f,
                "{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":%d,\"tid\":%d,\"args\":{\"name\":",
                tr->host + 1, tr->first_tid + l);
            json_str(f, name);
            fputs("}}", f);
            SEP();
            fprintf(f,
                    "{\"ph\":\"M\",\"name\":\"thread_sort_index\",\"pid\":%d,\"tid\":%d,"
                    "\"args\":{\"sort_index\":%d}}",
                    tr->host + 1, tr->first_tid + l, tr->first_tid + l);
        }
    }
    for (size_t i = 0; i < c.n_spans; i++) {
        const span_t *sp = &c.spans[i];
        const track_t *tr = &c.tracks[sp->track];
        SEP();
        fputs("{\"ph\":\"X\",\"cat\":\"kvpred\",\"name\":", f);
        json_str(f, sp->name);
        fputs(",\"ts\":", f);
        json_us(f, sp->t0 - t_min);
        fputs(",\"dur\":", f);
        json_us(f, sp->t1 - sp->t0);
        fprintf(f, ",\"pid\":%d,\"tid\":%d", tr->host + 1, tr->first_tid + sp->lane);
        json_args(f, sp->rec);
        fputc('}', f);
    }
    for (size_t i = 0; i < c.n_instants; i++) {
        const instant_t *in = &c.instants[i];
        const track_t *tr = &c.tracks[in->track];
        SEP();
        fputs("{\"ph\":\"i\",\"s\":\"t\",\"cat\":\"kvpred\",\"name\":", f);
        if (in->rec->chunk >= 0 && !strcmp(in->rec->event, KVP_EV_TOKEN)) {
            char name[48];
            snprintf(name, sizeof name, "token %d", (int)in->rec->chunk);
            json_str(f, name);
        } else {
            json_str(f, in->rec->event);
        }
        fputs(",\"ts\":", f);
        json_us(f, t_of(in->rec) - t_min);
        fprintf(f, ",\"pid\":%d,\"tid\":%d", tr->host + 1, tr->first_tid);
        json_args(f, in->rec);
        fputc('}', f);
    }
#undef SEP
    fputs("\n]}\n", f);
    bool bad = ferror(f) != 0;
    if (fclose(f) != 0) bad = true;
    chrome_free(&c);
    if (bad) return kvp_err_set(err, KVP_EIO, "writing %s failed", path);
    if (n_events) *n_events = count;
    return KVP_OK;
}
