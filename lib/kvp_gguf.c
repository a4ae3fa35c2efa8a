/* kvp_gguf: GGUF v2/v3 reader (mmap, validate everything up front) and writer
 * (in memory, then temp file + fsync + rename).
 *
 * The reader trusts nothing in the file: every length and count is checked
 * against the bytes that remain before it is used, and before anything is
 * allocated for it, so a hostile file costs at most a few times its own size
 * in memory and never a crash. Every error names the byte offset and the key
 * or tensor being read. */
#include "kvp_gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvp_half.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvp_gguf reads GGUF's little-endian fields in host order: port it first"
#endif

#define GGUF_MAGIC "GGUF"
#define GGUF_HEADER_BYTES 24
#define GGUF_MAX_NESTING 8 /* arrays of arrays deeper than this are refused */
/* The fewest bytes a metadata pair (key length, type, 1-byte value) and a
 * tensor info (name length, n_dims, one ne, type, offset) can take: counts in
 * the header are checked against these before anything is allocated. */
#define GGUF_MIN_KV_BYTES (8 + 4 + 1)
#define GGUF_MIN_TENSOR_BYTES (8 + 4 + 8 + 4 + 8)

/* A hash index over names (keys or tensor names): open addressing, slots hold
 * index+1, 0 = empty. Used to refuse duplicates at open and for lookups. */
typedef struct name_index {
    uint64_t *slots;
    uint64_t mask;
    uint64_t seed; /* differs per open, so a crafted file cannot aim at collisions */
} name_index_t;

struct kvp_gguf {
    char *path;
    const uint8_t *map; /* NULL for an empty file */
    uint64_t size;
    uint32_t version;
    uint32_t alignment;
    uint64_t data_offset;
    uint64_t n_kv;
    kvp_gguf_kv_t *kvs;
    uint64_t n_tensors;
    kvp_gguf_tensor_t *tensors;
    name_index_t kv_index;
    name_index_t tensor_index;
};

/* ------------------------------------------------------------------------ */
/* Names */

const char *kvp_gguf_vtype_name(kvp_gguf_vtype_t t) {
    switch (t) {
    case KVP_GGUF_U8:
        return "u8";
    case KVP_GGUF_I8:
        return "i8";
    case KVP_GGUF_U16:
        return "u16";
    case KVP_GGUF_I16:
        return "i16";
    case KVP_GGUF_U32:
        return "u32";
    case KVP_GGUF_I32:
        return "i32";
    case KVP_GGUF_F32:
        return "f32";
    case KVP_GGUF_BOOL:
        return "bool";
    case KVP_GGUF_STRING:
        return "string";
    case KVP_GGUF_ARRAY:
        return "array";
    case KVP_GGUF_U64:
        return "u64";
    case KVP_GGUF_I64:
        return "i64";
    case KVP_GGUF_F64:
        return "f64";
    }
    return "unknown";
}

/* All of ggml's type ids, so that a message about a type kvpred cannot read
 * still says which one it is. */
const char *kvp_ggml_type_name(kvp_ggml_type_t t) {
    static const char *const names[] = {
        [0] = "f32",     [1] = "f16",      [2] = "q4_0",   [3] = "q4_1",    [6] = "q5_0",
        [7] = "q5_1",    [8] = "q8_0",     [9] = "q8_1",   [10] = "q2_k",   [11] = "q3_k",
        [12] = "q4_k",   [13] = "q5_k",    [14] = "q6_k",  [15] = "q8_k",   [16] = "iq2_xxs",
        [17] = "iq2_xs", [18] = "iq3_xxs", [19] = "iq1_s", [20] = "iq4_nl", [21] = "iq3_s",
        [22] = "iq2_s",  [23] = "iq4_xs",  [24] = "i8",    [25] = "i16",    [26] = "i32",
        [27] = "i64",    [28] = "f64",     [29] = "iq1_m", [30] = "bf16",   [34] = "tq1_0",
        [35] = "tq2_0",  [39] = "mxfp4",
    };
    unsigned u = (unsigned)t;
    if (u < sizeof names / sizeof names[0] && names[u]) return names[u];
    return "unknown";
}

static bool type_supported(uint32_t t) {
    return t == KVP_GGML_F32 || t == KVP_GGML_F16 || t == KVP_GGML_BF16 || t == KVP_GGML_Q8_0;
}

uint64_t kvp_ggml_type_nbytes(kvp_ggml_type_t t, uint64_t n) {
    switch (t) {
    case KVP_GGML_F32:
        return n <= UINT64_MAX / 4 ? n * 4 : 0;
    case KVP_GGML_F16:
    case KVP_GGML_BF16:
        return n <= UINT64_MAX / 2 ? n * 2 : 0;
    case KVP_GGML_Q8_0:
        return n % KVP_Q8_0_BLOCK == 0 ? n / KVP_Q8_0_BLOCK * 34 : 0;
    }
    return 0;
}

/* Size of a fixed-size metadata value; 0 for STRING, ARRAY and unknown types. */
static uint64_t vtype_size(uint32_t t) {
    switch (t) {
    case KVP_GGUF_U8:
    case KVP_GGUF_I8:
    case KVP_GGUF_BOOL:
        return 1;
    case KVP_GGUF_U16:
    case KVP_GGUF_I16:
        return 2;
    case KVP_GGUF_U32:
    case KVP_GGUF_I32:
    case KVP_GGUF_F32:
        return 4;
    case KVP_GGUF_U64:
    case KVP_GGUF_I64:
    case KVP_GGUF_F64:
        return 8;
    }
    return 0;
}

static bool vtype_known(uint32_t t) {
    return t <= KVP_GGUF_F64;
}

static bool vtype_is_int(kvp_gguf_vtype_t t) {
    switch (t) {
    case KVP_GGUF_U8:
    case KVP_GGUF_I8:
    case KVP_GGUF_U16:
    case KVP_GGUF_I16:
    case KVP_GGUF_U32:
    case KVP_GGUF_I32:
    case KVP_GGUF_U64:
    case KVP_GGUF_I64:
        return true;
    default:
        return false;
    }
}

static bool vtype_is_signed(kvp_gguf_vtype_t t) {
    return t == KVP_GGUF_I8 || t == KVP_GGUF_I16 || t == KVP_GGUF_I32 || t == KVP_GGUF_I64;
}

/* Writes a file-supplied name into buf for a message: at most 80 bytes,
 * control characters, quotes and backslashes escaped, "..." when cut. */
static const char *name_for_msg(kvp_gguf_str_t s, char *buf, size_t cap) {
    size_t o = 0;
    uint64_t i;
    for (i = 0; i < s.len && i < 80 && o + 5 < cap; i++) {
        unsigned char c = (unsigned char)s.ptr[i];
        if (c < 0x20 || c == 0x7f || c == '\'' || c == '\\')
            o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", c);
        else
            buf[o++] = (char)c;
    }
    if (i < s.len && o + 4 < cap) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o] = '\0';
    return buf;
}

/* ------------------------------------------------------------------------ */
/* Name index */

static uint64_t hash_bytes(uint64_t seed, const char *p, uint64_t n) {
    uint64_t h = 1469598103934665603ull ^ seed; /* FNV-1a, seeded */
    for (uint64_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ull;
    }
    return h;
}

static int index_init(name_index_t *ix, uint64_t n) {
    uint64_t cap = 16;
    while (cap < 2 * n)
        cap *= 2;
    ix->slots = calloc(cap, sizeof *ix->slots);
    ix->mask = cap - 1;
    ix->seed = (uint64_t)(uintptr_t)ix->slots * 0x9e3779b97f4a7c15ull; /* ASLR as entropy */
    return ix->slots ? 0 : KVP_ENOMEM;
}

/* Returns the slot where name is, or the empty slot where it would go.
 * name_at(ctx, i) gives the name stored for index i. */
static uint64_t *index_slot(const name_index_t *ix, const char *p, uint64_t n,
                            kvp_gguf_str_t (*name_at)(const void *, uint64_t), const void *ctx) {
    uint64_t h = hash_bytes(ix->seed, p, n) & ix->mask;
    for (;;) {
        uint64_t *s = &ix->slots[h];
        if (*s == 0) return s;
        kvp_gguf_str_t o = name_at(ctx, *s - 1);
        if (o.len == n && (n == 0 || memcmp(o.ptr, p, n) == 0)) return s;
        h = (h + 1) & ix->mask;
    }
}

static kvp_gguf_str_t kv_name_at(const void *ctx, uint64_t i) {
    return ((const kvp_gguf_t *)ctx)->kvs[i].key;
}

static kvp_gguf_str_t tensor_name_at(const void *ctx, uint64_t i) {
    return ((const kvp_gguf_t *)ctx)->tensors[i].name;
}

/* ------------------------------------------------------------------------ */
/* Cursor over the mapping, with the context that error messages name */

typedef enum {
    CTX_HEADER,
    CTX_KEY,   /* the key of metadata pair #index */
    CTX_VALUE, /* the type or value of key 'name' */
    CTX_TNAME, /* the name of tensor #index */
    CTX_TINFO, /* the info of tensor 'name' */
} ctx_kind_t;

typedef struct cursor {
    const uint8_t *p;
    uint64_t size;
    uint64_t pos;
    const char *path;
    kvp_err_t *err;
    ctx_kind_t kind;
    const char *field; /* "magic", "type", "value", "n_dims", ... */
    uint64_t index;
    kvp_gguf_str_t name;
} cursor_t;

static const char *ctx_describe(const cursor_t *c, char *buf, size_t cap) {
    char nm[400];
    switch (c->kind) {
    case CTX_HEADER:
        snprintf(buf, cap, "the header's %s", c->field);
        break;
    case CTX_KEY:
        snprintf(buf, cap, "the key of metadata pair #%" PRIu64, c->index);
        break;
    case CTX_VALUE:
        snprintf(buf, cap, "the %s of key '%s'", c->field, name_for_msg(c->name, nm, sizeof nm));
        break;
    case CTX_TNAME:
        snprintf(buf, cap, "the name of tensor #%" PRIu64, c->index);
        break;
    case CTX_TINFO:
        snprintf(buf, cap, "the %s of tensor '%s'", c->field, name_for_msg(c->name, nm, sizeof nm));
        break;
    }
    return buf;
}

static int cur_truncated(cursor_t *c, uint64_t need) {
    char what[600];
    kvp_err_set(c->err, KVP_EFORMAT,
                "%s: truncated at offset %" PRIu64 " while reading %s (%" PRIu64
                " bytes needed, file is %" PRIu64 " bytes)",
                c->path, c->pos, ctx_describe(c, what, sizeof what), need, c->size);
    return KVP_EFORMAT; /* a constant, so the compiler sees reads succeed on 0 */
}

static uint64_t cur_left(const cursor_t *c) {
    return c->size - c->pos;
}

static int cur_bytes(cursor_t *c, void *dst, uint64_t n) {
    if (cur_left(c) < n) return cur_truncated(c, n);
    memcpy(dst, c->p + c->pos, n);
    c->pos += n;
    return 0;
}

static int cur_u32(cursor_t *c, uint32_t *v) {
    return cur_bytes(c, v, 4);
}

static int cur_u64(cursor_t *c, uint64_t *v) {
    return cur_bytes(c, v, 8);
}

/* A string: u64 length, then the bytes. The length is checked against the
 * bytes left, and the result points into the mapping. */
static int cur_str(cursor_t *c, kvp_gguf_str_t *s) {
    uint64_t at = c->pos, len = 0;
    int rc = cur_u64(c, &len);
    if (rc) return rc;
    if (len > cur_left(c)) {
        char what[600];
        return kvp_err_set(c->err, KVP_EFORMAT,
                           "%s: string length %" PRIu64 " at offset %" PRIu64
                           " runs past the end of the file while reading %s (file is %" PRIu64
                           " bytes)",
                           c->path, len, at, ctx_describe(c, what, sizeof what), c->size);
    }
    s->ptr = (const char *)c->p + c->pos;
    s->len = len;
    c->pos += len;
    return 0;
}

/* A count of elements of elem_min bytes each, checked against the bytes left
 * before the caller allocates or loops over it. */
static int cur_check_count(cursor_t *c, uint64_t at, uint64_t count, uint64_t elem_min,
                           const char *what_count) {
    if (count > cur_left(c) / elem_min) {
        char what[600];
        return kvp_err_set(c->err, KVP_EFORMAT,
                           "%s: %s %" PRIu64 " at offset %" PRIu64 " (reading %s) cannot fit "
                           "in the %" PRIu64
                           " bytes that remain (each element takes at least %" PRIu64
                           "; file is %" PRIu64 " bytes)",
                           c->path, what_count, count, at, ctx_describe(c, what, sizeof what),
                           cur_left(c), elem_min, c->size);
    }
    return 0;
}

static int cur_bad_vtype(cursor_t *c, uint64_t at, uint32_t t) {
    char what[600];
    return kvp_err_set(c->err, KVP_EFORMAT,
                       "%s: unknown value type %" PRIu32 " at offset %" PRIu64
                       " while reading %s (valid types are 0..12)",
                       c->path, t, at, ctx_describe(c, what, sizeof what));
}

/* Validates and skips the body of an array (after its element type and count
 * were read) whose elements are themselves arrays, strings or scalars. Used
 * for nested arrays, which kvpred does not index. Work is bounded by the
 * file size: every element consumes at least one byte. */
static int skip_array_body(cursor_t *c, uint32_t elem, uint64_t count, int depth) {
    if (elem == KVP_GGUF_ARRAY) {
        if (depth >= GGUF_MAX_NESTING) {
            char what[600];
            return kvp_err_set(
                c->err, KVP_EFORMAT,
                "%s: arrays nested deeper than %d levels at offset %" PRIu64 " while reading %s",
                c->path, GGUF_MAX_NESTING, c->pos, ctx_describe(c, what, sizeof what));
        }
        for (uint64_t i = 0; i < count; i++) {
            uint64_t at = c->pos;
            uint32_t sub = 0;
            uint64_t n = 0;
            int rc = cur_u32(c, &sub);
            if (rc) return rc;
            if (!vtype_known(sub)) return cur_bad_vtype(c, at, sub);
            at = c->pos;
            if ((rc = cur_u64(c, &n))) return rc;
            uint64_t min = vtype_size(sub) ? vtype_size(sub) : sub == KVP_GGUF_STRING ? 8 : 12;
            if ((rc = cur_check_count(c, at, n, min, "array count"))) return rc;
            if ((rc = skip_array_body(c, sub, n, depth + 1))) return rc;
        }
        return 0;
    }
    if (elem == KVP_GGUF_STRING) {
        for (uint64_t i = 0; i < count; i++) {
            kvp_gguf_str_t s;
            int rc = cur_str(c, &s);
            if (rc) return rc;
        }
        return 0;
    }
    c->pos += count * vtype_size(elem); /* checked by cur_check_count */
    return 0;
}

/* Widens a fixed-size scalar of type t, given as little-endian bytes at p
 * (any alignment), into kv->v. The one decoder for metadata scalars and for
 * array elements. */
static void load_scalar(kvp_gguf_kv_t *kv, kvp_gguf_vtype_t t, const uint8_t *p) {
    uint64_t raw = 0;
    memcpy(&raw, p, (size_t)vtype_size(t));
    switch (t) {
    case KVP_GGUF_I8:
        kv->v.i64 = (int8_t)raw;
        break;
    case KVP_GGUF_I16:
        kv->v.i64 = (int16_t)raw;
        break;
    case KVP_GGUF_I32:
        kv->v.i64 = (int32_t)raw;
        break;
    case KVP_GGUF_I64:
        kv->v.i64 = (int64_t)raw;
        break;
    case KVP_GGUF_BOOL:
        kv->v.u64 = raw != 0;
        break;
    case KVP_GGUF_F64:
        memcpy(&kv->v.f64, &raw, 8);
        break;
    case KVP_GGUF_F32: {
        float f;
        memcpy(&f, p, 4);
        kv->v.f64 = f;
        break;
    }
    default:
        kv->v.u64 = raw;
        break; /* U8 U16 U32 U64 */
    }
}

/* Reads the value of one pair (its type already in kv->type and known). */
static int read_value(cursor_t *c, kvp_gguf_kv_t *kv) {
    uint64_t at = c->pos;
    int rc;
    c->field = "value";
    if (kv->type == KVP_GGUF_STRING) return cur_str(c, &kv->v.str);
    if (kv->type != KVP_GGUF_ARRAY) {
        uint64_t size = vtype_size(kv->type);
        if (cur_left(c) < size) return cur_truncated(c, size);
        load_scalar(kv, kv->type, c->p + c->pos);
        c->pos += size;
        return 0;
    }
    uint32_t elem = 0;
    uint64_t count = 0;
    c->field = "array element type";
    if ((rc = cur_u32(c, &elem))) return rc;
    if (!vtype_known(elem)) return cur_bad_vtype(c, at, elem);
    c->field = "array count";
    at = c->pos;
    if ((rc = cur_u64(c, &count))) return rc;
    c->field = "value";
    kv->v.arr.elem_type = (kvp_gguf_vtype_t)elem;
    kv->v.arr.count = count;
    uint64_t esize = vtype_size(elem);
    uint64_t min = esize ? esize : elem == KVP_GGUF_STRING ? 8 : 12;
    if ((rc = cur_check_count(c, at, count, min, "array count"))) return rc;
    if (esize) {
        kv->v.arr.data = c->p + c->pos;
        c->pos += count * esize;
        return 0;
    }
    if (elem == KVP_GGUF_ARRAY) return skip_array_body(c, elem, count, 1);
    /* strings: build the index once; count <= bytes left / 8 here */
    kvp_gguf_str_t *strs = calloc(count ? count : 1, sizeof *strs);
    if (!strs)
        return kvp_err_set(c->err, KVP_ENOMEM, "%s: out of memory indexing %" PRIu64 " strings",
                           c->path, count);
    kv->v.arr.strs = strs;
    for (uint64_t i = 0; i < count; i++)
        if ((rc = cur_str(c, &strs[i]))) return rc;
    return 0;
}

/* general.alignment: any integer type holding a nonzero power of two that
 * fits in u32 (the spec says u32; being lenient about the width costs
 * nothing). */
static int read_alignment(kvp_gguf_t *g, kvp_err_t *err) {
    g->alignment = KVP_GGUF_DEFAULT_ALIGNMENT;
    const kvp_gguf_kv_t *kv = kvp_gguf_find(g, "general.alignment");
    if (!kv) return 0;
    uint64_t v = 0;
    bool ok = vtype_is_int(kv->type);
    if (ok && vtype_is_signed(kv->type))
        ok = kv->v.i64 > 0, v = (uint64_t)kv->v.i64;
    else if (ok)
        v = kv->v.u64;
    if (!ok || v == 0 || v > UINT32_MAX || (v & (v - 1)) != 0) {
        char val[64];
        if (vtype_is_int(kv->type))
            snprintf(val, sizeof val, "%s%" PRIu64,
                     vtype_is_signed(kv->type) && kv->v.i64 < 0 ? "-" : "",
                     vtype_is_signed(kv->type) && kv->v.i64 < 0 ? (uint64_t)0 - (uint64_t)kv->v.i64
                                                                : v);
        else
            snprintf(val, sizeof val, "of type %s", kvp_gguf_vtype_name(kv->type));
        return kvp_err_set(err, KVP_EFORMAT,
                           "%s: general.alignment (key at offset %" PRIu64 ") is %s; it must "
                           "be a nonzero power of two that fits in u32",
                           g->path, (uint64_t)((const uint8_t *)kv->key.ptr - 8 - g->map), val);
    }
    g->alignment = (uint32_t)v;
    return 0;
}

static int read_tensor_info(cursor_t *c, kvp_gguf_t *g, kvp_gguf_tensor_t *t) {
    int rc;
    char nm[400];
    uint64_t at = c->pos;
    uint32_t n_dims = 0, type = 0;
    if ((rc = cur_str(c, &t->name))) return rc;
    c->kind = CTX_TINFO;
    c->name = t->name;
    name_for_msg(t->name, nm, sizeof nm);
    c->field = "n_dims";
    if ((rc = cur_u32(c, &n_dims))) return rc;
    if (n_dims < 1 || n_dims > KVP_GGUF_MAX_DIMS)
        return kvp_err_set(c->err, KVP_EFORMAT,
                           "%s: tensor '%s' (info at offset %" PRIu64 ") has n_dims %" PRIu32
                           "; it must be 1..%d",
                           c->path, nm, at, n_dims, KVP_GGUF_MAX_DIMS);
    t->n_dims = n_dims;
    c->field = "shape";
    uint64_t n_elems = 1;
    for (uint32_t d = 0; d < KVP_GGUF_MAX_DIMS; d++)
        t->ne[d] = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        uint64_t ne_at = c->pos;
        if ((rc = cur_u64(c, &t->ne[d]))) return rc;
        if (t->ne[d] == 0)
            return kvp_err_set(c->err, KVP_EFORMAT,
                               "%s: tensor '%s' has ne[%" PRIu32 "] = 0 at offset %" PRIu64
                               " (every dimension must be at least 1)",
                               c->path, nm, d, ne_at);
        if (__builtin_mul_overflow(n_elems, t->ne[d], &n_elems) || n_elems > INT64_MAX)
            return kvp_err_set(c->err, KVP_EFORMAT,
                               "%s: tensor '%s' shape overflows at ne[%" PRIu32 "] = %" PRIu64
                               " (offset %" PRIu64 ")",
                               c->path, nm, d, t->ne[d], ne_at);
    }
    t->n_elems = n_elems;
    c->field = "type";
    uint64_t type_at = c->pos;
    if ((rc = cur_u32(c, &type))) return rc;
    if (!type_supported(type))
        return kvp_err_set(c->err, KVP_EUNSUPPORTED,
                           "%s: tensor '%s' has type %" PRIu32 " (%s) at offset %" PRIu64
                           "; kvpred reads f32, f16, bf16 and q8_0 only",
                           c->path, nm, type, kvp_ggml_type_name((kvp_ggml_type_t)type), type_at);
    t->type = (kvp_ggml_type_t)type;
    if (type == KVP_GGML_Q8_0 && t->ne[0] % KVP_Q8_0_BLOCK != 0)
        return kvp_err_set(c->err, KVP_EFORMAT,
                           "%s: tensor '%s' (info at offset %" PRIu64
                           ") is q8_0 with ne[0] = %" PRIu64 ", which is not a multiple of %d",
                           c->path, nm, at, t->ne[0], KVP_Q8_0_BLOCK);
    c->field = "offset";
    uint64_t off_at = c->pos;
    if ((rc = cur_u64(c, &t->offset))) return rc;
    if (t->offset % g->alignment != 0)
        return kvp_err_set(c->err, KVP_EFORMAT,
                           "%s: tensor '%s' has data offset %" PRIu64 " (field at offset %" PRIu64
                           "), which is not aligned to %" PRIu32,
                           c->path, nm, t->offset, off_at, g->alignment);
    return 0;
}

/* Checks that every tensor's bytes lie inside the file, once the start of the
 * data section is known. Every supported type takes at least one byte per
 * value, so n_elems > size already proves the tensor does not fit (and keeps
 * nbytes from overflowing). */
static int check_tensor_data(kvp_gguf_t *g, kvp_err_t *err) {
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        kvp_gguf_tensor_t *t = &g->tensors[i];
        char nm[400];
        uint64_t avail = g->data_offset <= g->size ? g->size - g->data_offset : 0;
        t->nbytes = t->n_elems <= g->size ? kvp_ggml_type_nbytes(t->type, t->n_elems) : 0;
        if (t->n_elems > g->size || t->offset > avail || t->nbytes > avail - t->offset)
            return kvp_err_set(
                err, KVP_EFORMAT,
                "%s: tensor '%s' data at offset %" PRIu64 " (data section at %" PRIu64 " + %" PRIu64
                ") with %" PRIu64 " values of %s lies "
                "outside the file (file is %" PRIu64 " bytes)",
                g->path, name_for_msg(t->name, nm, sizeof nm), g->data_offset + t->offset,
                g->data_offset, t->offset, t->n_elems, kvp_ggml_type_name(t->type), g->size);
        t->data = g->map + g->data_offset + t->offset;
    }
    return 0;
}

static int parse(kvp_gguf_t *g, kvp_err_t *err) {
    cursor_t c = {.p = g->map, .size = g->size, .path = g->path, .err = err};
    char magic[4];
    int rc;
    c.kind = CTX_HEADER;
    c.field = "magic";
    if ((rc = cur_bytes(&c, magic, 4))) return rc;
    if (memcmp(magic, GGUF_MAGIC, 4) != 0)
        return kvp_err_set(err, KVP_EFORMAT,
                           "%s: not a GGUF file: bad magic %02x %02x %02x %02x at offset 0 "
                           "(expected 47 47 55 46, \"GGUF\")",
                           g->path, (unsigned char)magic[0], (unsigned char)magic[1],
                           (unsigned char)magic[2], (unsigned char)magic[3]);
    c.field = "version";
    if ((rc = cur_u32(&c, &g->version))) return rc;
    if (g->version != 2 && g->version != 3) {
        const char *hint = "";
        if (g->version == 1)
            hint = " (GGUF v1, with 32-bit counts, is obsolete)";
        else if ((g->version & 0xffff) == 0 && g->version != 0)
            hint = " (a big-endian GGUF file? kvpred reads little-endian files only)";
        return kvp_err_set(err, KVP_EUNSUPPORTED,
                           "%s: unsupported GGUF version %" PRIu32 " at offset 4%s; kvpred "
                           "reads versions 2 and 3",
                           g->path, g->version, hint);
    }
    c.field = "tensor count";
    if ((rc = cur_u64(&c, &g->n_tensors))) return rc;
    c.field = "metadata pair count";
    if ((rc = cur_u64(&c, &g->n_kv))) return rc;
    /* Both counts against the bytes left, before allocating anything. */
    uint64_t left = cur_left(&c);
    if (g->n_tensors > left / GGUF_MIN_TENSOR_BYTES || g->n_kv > left / GGUF_MIN_KV_BYTES ||
        g->n_tensors * GGUF_MIN_TENSOR_BYTES + g->n_kv * GGUF_MIN_KV_BYTES > left)
        return kvp_err_set(err, KVP_EFORMAT,
                           "%s: header (offset 8) claims %" PRIu64 " tensors and %" PRIu64
                           " metadata pairs, which cannot fit in the %" PRIu64
                           " bytes after offset %d (file is %" PRIu64
                           " bytes: truncated, or corrupt counts)",
                           g->path, g->n_tensors, g->n_kv, left, GGUF_HEADER_BYTES, g->size);

    g->kvs = calloc(g->n_kv ? g->n_kv : 1, sizeof *g->kvs);
    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensors);
    if (!g->kvs || !g->tensors || index_init(&g->kv_index, g->n_kv) ||
        index_init(&g->tensor_index, g->n_tensors))
        return kvp_err_set(err, KVP_ENOMEM,
                           "%s: out of memory for %" PRIu64 " metadata pairs "
                           "and %" PRIu64 " tensors",
                           g->path, g->n_kv, g->n_tensors);

    for (uint64_t i = 0; i < g->n_kv; i++) {
        kvp_gguf_kv_t *kv = &g->kvs[i];
        uint64_t at = c.pos;
        uint32_t type = 0;
        c.kind = CTX_KEY;
        c.index = i;
        if ((rc = cur_str(&c, &kv->key))) return rc;
        uint64_t *slot = index_slot(&g->kv_index, kv->key.ptr, kv->key.len, kv_name_at, g);
        if (*slot) {
            char nm[400];
            return kvp_err_set(err, KVP_EFORMAT,
                               "%s: duplicate key '%s' at offset %" PRIu64
                               " (metadata pairs #%" PRIu64 " and #%" PRIu64 ")",
                               g->path, name_for_msg(kv->key, nm, sizeof nm), at, *slot - 1, i);
        }
        *slot = i + 1;
        c.kind = CTX_VALUE;
        c.name = kv->key;
        c.field = "type";
        uint64_t type_at = c.pos;
        if ((rc = cur_u32(&c, &type))) return rc;
        if (!vtype_known(type)) return cur_bad_vtype(&c, type_at, type);
        kv->type = (kvp_gguf_vtype_t)type;
        if ((rc = read_value(&c, kv))) return rc;
    }
    if ((rc = read_alignment(g, err))) return rc;

    for (uint64_t i = 0; i < g->n_tensors; i++) {
        kvp_gguf_tensor_t *t = &g->tensors[i];
        uint64_t at = c.pos;
        c.kind = CTX_TNAME;
        c.index = i;
        if ((rc = read_tensor_info(&c, g, t))) return rc;
        uint64_t *slot = index_slot(&g->tensor_index, t->name.ptr, t->name.len, tensor_name_at, g);
        if (*slot) {
            char nm[400];
            return kvp_err_set(err, KVP_EFORMAT,
                               "%s: duplicate tensor name '%s' at offset %" PRIu64
                               " (tensors #%" PRIu64 " and #%" PRIu64 ")",
                               g->path, name_for_msg(t->name, nm, sizeof nm), at, *slot - 1, i);
        }
        *slot = i + 1;
    }
    /* The data section starts at the next multiple of the alignment. A file
     * without tensors may end before it (vocabulary-only files do). */
    uint64_t a = g->alignment;
    g->data_offset = c.pos + (a - c.pos % a) % a;
    return check_tensor_data(g, err);
}

int kvp_gguf_open(kvp_gguf_t **out, const char *path, kvp_err_t *err) {
    if (!out || !path) return kvp_err_set(err, KVP_EINVAL, "kvp_gguf_open: NULL argument");
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return kvp_err_set(err, KVP_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return kvp_err_set(err, KVP_EIO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return kvp_err_set(err, KVP_EIO, "%s: not a regular file", path);
    }
    kvp_gguf_t *g = calloc(1, sizeof *g);
    if (!g || !(g->path = strdup(path))) {
        free(g);
        close(fd);
        return kvp_err_set(err, KVP_ENOMEM, "%s: out of memory", path);
    }
    g->size = (uint64_t)st.st_size;
    if (g->size > 0) {
        void *m = mmap(NULL, (size_t)g->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            close(fd);
            kvp_gguf_free(&g);
            return kvp_err_set(err, KVP_EIO, "%s: cannot map %" PRIu64 " bytes: %s", path,
                               (uint64_t)st.st_size, strerror(e));
        }
        g->map = m;
    }
    close(fd);
    int rc = parse(g, err);
    if (rc) {
        kvp_gguf_free(&g);
        return rc;
    }
    *out = g;
    return 0;
}

void kvp_gguf_free(kvp_gguf_t **gp) {
    if (!gp || !*gp) return;
    kvp_gguf_t *g = *gp;
    if (g->kvs)
        for (uint64_t i = 0; i < g->n_kv; i++)
            if (g->kvs[i].type == KVP_GGUF_ARRAY) free((void *)g->kvs[i].v.arr.strs);
    free(g->kvs);
    free(g->tensors);
    free(g->kv_index.slots);
    free(g->tensor_index.slots);
    if (g->map) munmap((void *)g->map, (size_t)g->size);
    free(g->path);
    free(g);
    *gp = NULL;
}

/* ------------------------------------------------------------------------ */
/* Accessors */

uint32_t kvp_gguf_version(const kvp_gguf_t *g) {
    return g->version;
}

uint32_t kvp_gguf_alignment(const kvp_gguf_t *g) {
    return g->alignment;
}

const char *kvp_gguf_path(const kvp_gguf_t *g) {
    return g->path;
}

uint64_t kvp_gguf_file_size(const kvp_gguf_t *g) {
    return g->size;
}

uint64_t kvp_gguf_data_offset(const kvp_gguf_t *g) {
    return g->data_offset;
}

uint64_t kvp_gguf_n_kv(const kvp_gguf_t *g) {
    return g->n_kv;
}

const kvp_gguf_kv_t *kvp_gguf_kv_at(const kvp_gguf_t *g, uint64_t i) {
    return i < g->n_kv ? &g->kvs[i] : NULL;
}

const kvp_gguf_kv_t *kvp_gguf_find(const kvp_gguf_t *g, const char *key) {
    if (!g || !key) return NULL;
    uint64_t *s = index_slot(&g->kv_index, key, strlen(key), kv_name_at, g);
    return *s ? &g->kvs[*s - 1] : NULL;
}

uint64_t kvp_gguf_n_tensors(const kvp_gguf_t *g) {
    return g->n_tensors;
}

const kvp_gguf_tensor_t *kvp_gguf_tensor_at(const kvp_gguf_t *g, uint64_t i) {
    return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const kvp_gguf_tensor_t *kvp_gguf_find_tensor(const kvp_gguf_t *g, const char *name) {
    if (!g || !name) return NULL;
    uint64_t *s = index_slot(&g->tensor_index, name, strlen(name), tensor_name_at, g);
    return *s ? &g->tensors[*s - 1] : NULL;
}

/* ------------------------------------------------------------------------ */
/* Typed getters */

static int missing(const kvp_gguf_t *g, const char *key, kvp_err_t *err) {
    return kvp_err_set(err, KVP_ERANGE, "%s: missing key '%s'", g->path, key);
}

static int wrong_type(const kvp_gguf_t *g, const kvp_gguf_kv_t *kv, const char *key,
                      const char *wanted, kvp_err_t *err) {
    char val[96] = "";
    if (vtype_is_int(kv->type) && vtype_is_signed(kv->type))
        snprintf(val, sizeof val, " %" PRId64, kv->v.i64);
    else if (vtype_is_int(kv->type) || kv->type == KVP_GGUF_BOOL)
        snprintf(val, sizeof val, " %" PRIu64, kv->v.u64);
    else if (kv->type == KVP_GGUF_F32 || kv->type == KVP_GGUF_F64)
        snprintf(val, sizeof val, " %g", kv->v.f64);
    else if (kv->type == KVP_GGUF_ARRAY)
        snprintf(val, sizeof val, " of %s", kvp_gguf_vtype_name(kv->v.arr.elem_type));
    return kvp_err_set(err, KVP_EFORMAT, "%s: key '%s' is %s%s, wanted %s", g->path, key,
                       kvp_gguf_vtype_name(kv->type), val, wanted);
}

/* An integer (or bool) value as a signed 128-bit-free pair: *neg tells whether
 * it is below zero, *mag its magnitude. False for non-integer types. */
static bool int_value(const kvp_gguf_kv_t *kv, bool *neg, uint64_t *mag) {
    if (kv->type == KVP_GGUF_BOOL || (vtype_is_int(kv->type) && !vtype_is_signed(kv->type))) {
        *neg = false;
        *mag = kv->v.u64;
        return true;
    }
    if (vtype_is_int(kv->type)) {
        *neg = kv->v.i64 < 0;
        *mag = *neg ? (uint64_t)0 - (uint64_t)kv->v.i64 : (uint64_t)kv->v.i64;
        return true;
    }
    return false;
}

int kvp_gguf_get_u64(const kvp_gguf_t *g, const char *key, uint64_t *out, kvp_err_t *err) {
    const kvp_gguf_kv_t *kv = kvp_gguf_find(g, key);
    bool neg;
    uint64_t mag;
    if (!kv) return missing(g, key, err);
    if (!int_value(kv, &neg, &mag) || (neg && mag != 0)) return wrong_type(g, kv, key, "u64", err);
    *out = mag;
    return 0;
}

int kvp_gguf_get_u32(const kvp_gguf_t *g, const char *key, uint32_t *out, kvp_err_t *err) {
    const kvp_gguf_kv_t *kv = kvp_gguf_find(g, key);
    bool neg;
    uint64_t mag;
    if (!kv) return missing(g, key, err);
    if (!int_value(kv, &neg, &mag) || (neg && mag != 0) || mag > UINT32_MAX)
        return wrong_type(g, kv, key, "u32", err);
    *out = (uint32_t)mag;
    return 0;
}

int kvp_gguf_get_i64(const kvp_gguf_t *g, const char *key, int64_t *out, kvp_err_t *err) {
    const kvp_gguf_kv_t *kv = kvp_gguf_find(g, key);
    bool neg;
    uint64_t mag;
    if (!kv) return missing(g, key, err);
    if (!int_value(kv, &neg, &mag) || (!neg && mag > INT64_MAX))
        return wrong_type(g, kv, key, "i64", err);
    *out = neg ? kv->v.i64 : (int64_t)mag;
    return 0;
}

int kvp_gguf_get_f32(const kvp_gguf_t *g, const char *key, float *out, kvp_err_t *err) {
    const kvp_gguf_kv_t *kv = kvp_gguf_find(g, key);
    if (!kv) return missing(g, key, err);
    if (kv->type == KVP_GGUF_F32 || kv->type == KVP_GGUF_F64)
        *out = (float)kv->v.f64;
    else if (vtype_is_int(kv->type) && vtype_is_signed(kv->type))
        *out = (float)kv->v.i64;
    else if (vtype_is_int(kv->type))
        *out = (float)kv->v.u64;
    else
        return wrong_type(g, kv, key, "f32", err);
    return 0;
}

int kvp_gguf_get_bool(const kvp_gguf_t *g, const char *key, bool *out, kvp_err_t *err) {
    const kvp_gguf_kv_t *kv = kvp_gguf_find(g, key);
    bool neg;
    uint64_t mag;
    if (!kv) return missing(g, key, err);
    if (!int_value(kv, &neg, &mag) || mag > 1) return wrong_type(g, kv, key, "bool", err);
    *out = mag != 0;
    return 0;
}

int kvp_gguf_get_str(const kvp_gguf_t *g, const char *key, char *buf, size_t cap, kvp_err_t *err) {
    const kvp_gguf_kv_t *kv = kvp_gguf_find(g, key);
    if (!kv) return missing(g, key, err);
    if (kv->type != KVP_GGUF_STRING) return wrong_type(g, kv, key, "string", err);
    if (cap == 0 || kv->v.str.len > cap - 1)
        return kvp_err_set(err, KVP_ERANGE,
                           "%s: key '%s' holds a string of %" PRIu64
                           " bytes, longer than the %zu-byte buffer",
                           g->path, key, kv->v.str.len, cap);
    memcpy(buf, kv->v.str.ptr, (size_t)kv->v.str.len);
    buf[kv->v.str.len] = '\0';
    return 0;
}

int kvp_gguf_get_u32_or(const kvp_gguf_t *g, const char *key, uint32_t def, uint32_t *out,
                        kvp_err_t *err) {
    if (!kvp_gguf_find(g, key)) {
        *out = def;
        return 0;
    }
    return kvp_gguf_get_u32(g, key, out, err);
}

int kvp_gguf_get_f32_or(const kvp_gguf_t *g, const char *key, float def, float *out,
                        kvp_err_t *err) {
    if (!kvp_gguf_find(g, key)) {
        *out = def;
        return 0;
    }
    return kvp_gguf_get_f32(g, key, out, err);
}

int kvp_gguf_get_bool_or(const kvp_gguf_t *g, const char *key, bool def, bool *out,
                         kvp_err_t *err) {
    if (!kvp_gguf_find(g, key)) {
        *out = def;
        return 0;
    }
    return kvp_gguf_get_bool(g, key, out, err);
}

int kvp_gguf_get_arr(const kvp_gguf_t *g, const char *key, kvp_gguf_vtype_t elem_type,
                     const kvp_gguf_kv_t **out_kv, kvp_err_t *err) {
    const kvp_gguf_kv_t *kv = kvp_gguf_find(g, key);
    if (!kv) return missing(g, key, err);
    bool ok = kv->type == KVP_GGUF_ARRAY;
    if (ok) {
        kvp_gguf_vtype_t e = kv->v.arr.elem_type;
        ok = e == elem_type ||
             (vtype_is_int(e) && vtype_is_int(elem_type) && vtype_size(e) == vtype_size(elem_type));
    }
    if (!ok) {
        char wanted[48];
        snprintf(wanted, sizeof wanted, "array of %s", kvp_gguf_vtype_name(elem_type));
        return wrong_type(g, kv, key, wanted, err);
    }
    *out_kv = kv;
    return 0;
}

/* Element i of a fixed-size array, widened into a scratch pair; false if i or
 * the array does not hold one. Elements sit at any offset in the file. */
static bool arr_elem(const kvp_gguf_kv_t *kv, uint64_t i, kvp_gguf_kv_t *e) {
    if (!kv || kv->type != KVP_GGUF_ARRAY || i >= kv->v.arr.count || !kv->v.arr.data) return false;
    uint64_t size = vtype_size(kv->v.arr.elem_type);
    if (size == 0) return false;
    e->type = kv->v.arr.elem_type;
    load_scalar(e, e->type, (const uint8_t *)kv->v.arr.data + i * size);
    return true;
}

int64_t kvp_gguf_arr_i64(const kvp_gguf_kv_t *kv, uint64_t i) {
    kvp_gguf_kv_t e;
    if (!arr_elem(kv, i, &e)) return 0;
    if (e.type == KVP_GGUF_F32 || e.type == KVP_GGUF_F64) /* truncated; NaN, huge -> 0 */
        return (e.v.f64 > -9.2e18 && e.v.f64 < 9.2e18) ? (int64_t)e.v.f64 : 0;
    return vtype_is_signed(e.type) ? e.v.i64 : (int64_t)e.v.u64;
}

double kvp_gguf_arr_f64(const kvp_gguf_kv_t *kv, uint64_t i) {
    kvp_gguf_kv_t e;
    if (!arr_elem(kv, i, &e)) return 0.0;
    if (e.type == KVP_GGUF_F32 || e.type == KVP_GGUF_F64) return e.v.f64;
    return vtype_is_signed(e.type) ? (double)e.v.i64 : (double)e.v.u64;
}

/* ------------------------------------------------------------------------ */
/* Tensor data */

int kvp_gguf_tensor_to_f32(const kvp_gguf_tensor_t *t, float *dst, kvp_err_t *err) {
    if (!t || !dst || !t->data)
        return kvp_err_set(err, KVP_EINVAL, "kvp_gguf_tensor_to_f32: NULL argument");
    size_t n = (size_t)t->n_elems;
    switch (t->type) {
    case KVP_GGML_F32:
        memcpy(dst, t->data, n * sizeof(float));
        return 0;
    case KVP_GGML_Q8_0:
        kvp_q8_0_to_f32_row(t->data, dst, n);
        return 0;
    case KVP_GGML_F16:
    case KVP_GGML_BF16:
        break;
    default: {
        char nm[400];
        return kvp_err_set(err, KVP_EUNSUPPORTED, "tensor '%s': cannot convert type %d (%s)",
                           name_for_msg(t->name, nm, sizeof nm), (int)t->type,
                           kvp_ggml_type_name(t->type));
    }
    }
    void (*row)(const uint16_t *, float *, size_t) =
        t->type == KVP_GGML_F16 ? kvp_f16_to_f32_row : kvp_bf16_to_f32_row;
    if ((uintptr_t)t->data % sizeof(uint16_t) == 0) {
        row(t->data, dst, n);
        return 0;
    }
    /* alignment 1 in the file: go through an aligned bounce buffer */
    uint16_t tmp[256];
    const uint8_t *src = t->data;
    for (size_t i = 0; i < n; i += 256) {
        size_t m = n - i < 256 ? n - i : 256;
        memcpy(tmp, src + i * 2, m * 2);
        row(tmp, dst + i, m);
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Writer */

/* A growable byte buffer. */
typedef struct buf {
    uint8_t *p;
    size_t len, cap;
    bool oom;
} buf_t;

static void buf_put(buf_t *b, const void *src, size_t n) {
    if (b->oom) return;
    if (n > SIZE_MAX - b->len) {
        b->oom = true;
        return;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap = cap > SIZE_MAX / 2 ? b->len + n : cap * 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, src, n);
    b->len += n;
}

static void buf_u32(buf_t *b, uint32_t v) {
    buf_put(b, &v, 4);
}

static void buf_u64(buf_t *b, uint64_t v) {
    buf_put(b, &v, 8);
}

static void buf_str(buf_t *b, const char *s, uint64_t len) {
    buf_u64(b, len);
    buf_put(b, s, (size_t)len);
}

/* A pair: the key and the value already serialised as it goes after the
 * type field, so that writing is a copy and every setter is one encoder. */
typedef struct wkv {
    char *key;
    kvp_gguf_vtype_t type;
    buf_t val;
} wkv_t;

typedef struct wtensor {
    char *name;
    uint32_t n_dims;
    uint64_t ne[KVP_GGUF_MAX_DIMS];
    kvp_ggml_type_t type;
    uint8_t *bytes;
    uint64_t nbytes;
} wtensor_t;

struct kvp_gguf_writer {
    wkv_t *kvs;
    size_t n_kv, cap_kv;
    wtensor_t *tensors;
    size_t n_tensors, cap_tensors;
};

kvp_gguf_writer_t *kvp_gguf_writer_new(void) {
    return calloc(1, sizeof(kvp_gguf_writer_t));
}

void kvp_gguf_writer_free(kvp_gguf_writer_t **wp) {
    if (!wp || !*wp) return;
    kvp_gguf_writer_t *w = *wp;
    for (size_t i = 0; i < w->n_kv; i++) {
        free(w->kvs[i].key);
        free(w->kvs[i].val.p);
    }
    for (size_t i = 0; i < w->n_tensors; i++) {
        free(w->tensors[i].name);
        free(w->tensors[i].bytes);
    }
    free(w->kvs);
    free(w->tensors);
    free(w);
    *wp = NULL;
}

/* Stores (key, type, serialised value), replacing an earlier value of the
 * same key in place so the order of first setting is kept. Takes ownership
 * of val's memory in every case. */
static int writer_put(kvp_gguf_writer_t *w, const char *key, kvp_gguf_vtype_t type, buf_t val) {
    if (val.oom) {
        free(val.p);
        return KVP_ENOMEM;
    }
    for (size_t i = 0; i < w->n_kv; i++)
        if (!strcmp(w->kvs[i].key, key)) {
            free(w->kvs[i].val.p);
            w->kvs[i].type = type;
            w->kvs[i].val = val;
            return 0;
        }
    if (w->n_kv == w->cap_kv) {
        size_t cap = w->cap_kv ? w->cap_kv * 2 : 32;
        wkv_t *p = realloc(w->kvs, cap * sizeof *p);
        if (!p) {
            free(val.p);
            return KVP_ENOMEM;
        }
        w->kvs = p;
        w->cap_kv = cap;
    }
    char *k = strdup(key);
    if (!k) {
        free(val.p);
        return KVP_ENOMEM;
    }
    w->kvs[w->n_kv++] = (wkv_t){.key = k, .type = type, .val = val};
    return 0;
}

int kvp_gguf_writer_set_raw(kvp_gguf_writer_t *w, const char *key, kvp_gguf_vtype_t type,
                            const void *v) {
    uint64_t n = vtype_size(type);
    if (!w || !key || !v || n == 0) return KVP_EINVAL;
    buf_t b = {0};
    buf_put(&b, v, (size_t)n);
    return writer_put(w, key, type, b);
}

int kvp_gguf_writer_set_u32(kvp_gguf_writer_t *w, const char *key, uint32_t v) {
    return kvp_gguf_writer_set_raw(w, key, KVP_GGUF_U32, &v);
}

int kvp_gguf_writer_set_i32(kvp_gguf_writer_t *w, const char *key, int32_t v) {
    return kvp_gguf_writer_set_raw(w, key, KVP_GGUF_I32, &v);
}

int kvp_gguf_writer_set_u64(kvp_gguf_writer_t *w, const char *key, uint64_t v) {
    return kvp_gguf_writer_set_raw(w, key, KVP_GGUF_U64, &v);
}

int kvp_gguf_writer_set_f32(kvp_gguf_writer_t *w, const char *key, float v) {
    return kvp_gguf_writer_set_raw(w, key, KVP_GGUF_F32, &v);
}

int kvp_gguf_writer_set_bool(kvp_gguf_writer_t *w, const char *key, bool v) {
    uint8_t b = v ? 1 : 0;
    return kvp_gguf_writer_set_raw(w, key, KVP_GGUF_BOOL, &b);
}

static int set_str_n(kvp_gguf_writer_t *w, const char *key, const char *v, uint64_t len) {
    if (!w || !key || (!v && len)) return KVP_EINVAL;
    buf_t b = {0};
    buf_str(&b, v, len);
    return writer_put(w, key, KVP_GGUF_STRING, b);
}

int kvp_gguf_writer_set_str(kvp_gguf_writer_t *w, const char *key, const char *v) {
    if (!v) return KVP_EINVAL;
    return set_str_n(w, key, v, strlen(v));
}

int kvp_gguf_writer_set_arr_raw(kvp_gguf_writer_t *w, const char *key, kvp_gguf_vtype_t elem_type,
                                const void *v, uint64_t n) {
    uint64_t es = vtype_size(elem_type);
    if (!w || !key || es == 0 || (!v && n) || n > SIZE_MAX / es) return KVP_EINVAL;
    buf_t b = {0};
    buf_u32(&b, elem_type);
    buf_u64(&b, n);
    buf_put(&b, v, (size_t)(n * es));
    return writer_put(w, key, KVP_GGUF_ARRAY, b);
}

int kvp_gguf_writer_set_arr_i32(kvp_gguf_writer_t *w, const char *key, const int32_t *v,
                                uint64_t n) {
    return kvp_gguf_writer_set_arr_raw(w, key, KVP_GGUF_I32, v, n);
}

int kvp_gguf_writer_set_arr_f32(kvp_gguf_writer_t *w, const char *key, const float *v, uint64_t n) {
    return kvp_gguf_writer_set_arr_raw(w, key, KVP_GGUF_F32, v, n);
}

int kvp_gguf_writer_set_arr_str(kvp_gguf_writer_t *w, const char *key, const char *const *v,
                                uint64_t n) {
    if (!w || !key || (!v && n)) return KVP_EINVAL;
    buf_t b = {0};
    buf_u32(&b, KVP_GGUF_STRING);
    buf_u64(&b, n);
    for (uint64_t i = 0; i < n; i++) {
        if (!v[i]) {
            free(b.p);
            return KVP_EINVAL;
        }
        buf_str(&b, v[i], strlen(v[i]));
    }
    return writer_put(w, key, KVP_GGUF_ARRAY, b);
}

int kvp_gguf_writer_copy_kv(kvp_gguf_writer_t *w, const kvp_gguf_kv_t *kv) {
    if (!w || !kv || !kv->key.ptr || memchr(kv->key.ptr, '\0', (size_t)kv->key.len))
        return KVP_EINVAL;
    char *key = strndup(kv->key.ptr, (size_t)kv->key.len);
    if (!key) return KVP_ENOMEM;
    int rc;
    uint8_t raw[8];
    switch (kv->type) {
    case KVP_GGUF_U8:
    case KVP_GGUF_I8:
    case KVP_GGUF_BOOL:
    case KVP_GGUF_U16:
    case KVP_GGUF_I16:
    case KVP_GGUF_U32:
    case KVP_GGUF_I32:
    case KVP_GGUF_U64:
    case KVP_GGUF_I64:
        /* little-endian: the low bytes of the widened value are the value */
        memcpy(raw, &kv->v.u64, 8);
        rc = kvp_gguf_writer_set_raw(w, key, kv->type, raw);
        break;
    case KVP_GGUF_F32: {
        float f = (float)kv->v.f64;
        rc = kvp_gguf_writer_set_raw(w, key, kv->type, &f);
        break;
    }
    case KVP_GGUF_F64:
        rc = kvp_gguf_writer_set_raw(w, key, kv->type, &kv->v.f64);
        break;
    case KVP_GGUF_STRING:
        rc = set_str_n(w, key, kv->v.str.ptr, kv->v.str.len);
        break;
    case KVP_GGUF_ARRAY:
        if (kv->v.arr.elem_type == KVP_GGUF_STRING) {
            buf_t b = {0};
            buf_u32(&b, KVP_GGUF_STRING);
            buf_u64(&b, kv->v.arr.count);
            for (uint64_t i = 0; i < kv->v.arr.count; i++)
                buf_str(&b, kv->v.arr.strs[i].ptr, kv->v.arr.strs[i].len);
            rc = writer_put(w, key, KVP_GGUF_ARRAY, b);
        } else if (vtype_size(kv->v.arr.elem_type)) {
            rc = kvp_gguf_writer_set_arr_raw(w, key, kv->v.arr.elem_type, kv->v.arr.data,
                                             kv->v.arr.count);
        } else {
            rc = KVP_EUNSUPPORTED; /* nested arrays are not kept by the reader */
        }
        break;
    default:
        rc = KVP_EINVAL;
    }
    free(key);
    return rc;
}

/* Validates a tensor for the writer; on success *nbytes is its size. */
static int check_new_tensor(const kvp_gguf_writer_t *w, const char *name, uint32_t n_dims,
                            const uint64_t *ne, kvp_ggml_type_t type, uint64_t *nbytes,
                            kvp_err_t *err) {
    if (!w || !name || !ne) return kvp_err_set(err, KVP_EINVAL, "gguf writer: NULL argument");
    if (n_dims < 1 || n_dims > KVP_GGUF_MAX_DIMS)
        return kvp_err_set(err, KVP_EINVAL,
                           "gguf writer: tensor '%s' has n_dims %" PRIu32 "; it must be 1..%d",
                           name, n_dims, KVP_GGUF_MAX_DIMS);
    if (!type_supported(type))
        return kvp_err_set(err, KVP_EUNSUPPORTED,
                           "gguf writer: tensor '%s': type %d (%s) is not "
                           "supported (f32, f16, bf16, q8_0)",
                           name, (int)type, kvp_ggml_type_name(type));
    uint64_t n = 1;
    for (uint32_t d = 0; d < n_dims; d++)
        if (ne[d] == 0 || __builtin_mul_overflow(n, ne[d], &n) || n > INT64_MAX)
            return kvp_err_set(err, KVP_EINVAL,
                               "gguf writer: tensor '%s': ne[%" PRIu32 "] = %" PRIu64
                               " is zero or overflows the size",
                               name, d, ne[d]);
    if (type == KVP_GGML_Q8_0 && ne[0] % KVP_Q8_0_BLOCK)
        return kvp_err_set(err, KVP_EINVAL,
                           "gguf writer: tensor '%s': q8_0 needs ne[0] a "
                           "multiple of %d, got %" PRIu64,
                           name, KVP_Q8_0_BLOCK, ne[0]);
    *nbytes = kvp_ggml_type_nbytes(type, n);
    if (*nbytes == 0 || *nbytes > SIZE_MAX)
        return kvp_err_set(err, KVP_ENOMEM, "gguf writer: tensor '%s' is too large", name);
    for (size_t i = 0; i < w->n_tensors; i++)
        if (!strcmp(w->tensors[i].name, name))
            return kvp_err_set(err, KVP_EINVAL, "gguf writer: duplicate tensor name '%s'", name);
    return 0;
}

/* Appends a tensor that owns `bytes` (freed here on failure). */
static int writer_add(kvp_gguf_writer_t *w, const char *name, uint32_t n_dims, const uint64_t *ne,
                      kvp_ggml_type_t type, uint8_t *bytes, uint64_t nbytes, kvp_err_t *err) {
    if (w->n_tensors == w->cap_tensors) {
        size_t cap = w->cap_tensors ? w->cap_tensors * 2 : 64;
        wtensor_t *p = realloc(w->tensors, cap * sizeof *p);
        if (!p) {
            free(bytes);
            return kvp_err_set(err, KVP_ENOMEM, "gguf writer: out of memory");
        }
        w->tensors = p;
        w->cap_tensors = cap;
    }
    wtensor_t t = {
        .name = strdup(name), .n_dims = n_dims, .type = type, .bytes = bytes, .nbytes = nbytes};
    if (!t.name) {
        free(bytes);
        return kvp_err_set(err, KVP_ENOMEM, "gguf writer: out of memory");
    }
    for (uint32_t d = 0; d < KVP_GGUF_MAX_DIMS; d++)
        t.ne[d] = d < n_dims ? ne[d] : 1;
    w->tensors[w->n_tensors++] = t;
    return 0;
}

int kvp_gguf_writer_add_tensor(kvp_gguf_writer_t *w, const char *name, uint32_t n_dims,
                               const uint64_t *ne, kvp_ggml_type_t type, const float *data,
                               kvp_err_t *err) {
    uint64_t nbytes = 0;
    int rc = check_new_tensor(w, name, n_dims, ne, type, &nbytes, err);
    if (rc) return rc;
    if (!data) return kvp_err_set(err, KVP_EINVAL, "gguf writer: tensor '%s': NULL data", name);
    uint8_t *bytes = malloc((size_t)nbytes);
    if (!bytes)
        return kvp_err_set(err, KVP_ENOMEM,
                           "gguf writer: out of memory for tensor '%s' (%" PRIu64 " bytes)", name,
                           nbytes);
    size_t n = 1;
    for (uint32_t d = 0; d < n_dims; d++)
        n *= (size_t)ne[d];
    switch (type) {
    case KVP_GGML_F32:
        memcpy(bytes, data, n * sizeof(float));
        break;
    case KVP_GGML_F16:
        kvp_f32_to_f16_row(data, (uint16_t *)(void *)bytes, n);
        break;
    case KVP_GGML_BF16:
        kvp_f32_to_bf16_row(data, (uint16_t *)(void *)bytes, n);
        break;
    case KVP_GGML_Q8_0:
        kvp_f32_to_q8_0_row(data, bytes, n);
        break;
    }
    return writer_add(w, name, n_dims, ne, type, bytes, nbytes, err);
}

int kvp_gguf_writer_add_tensor_raw(kvp_gguf_writer_t *w, const char *name, uint32_t n_dims,
                                   const uint64_t *ne, kvp_ggml_type_t type, const void *bytes,
                                   kvp_err_t *err) {
    uint64_t nbytes = 0;
    int rc = check_new_tensor(w, name, n_dims, ne, type, &nbytes, err);
    if (rc) return rc;
    if (!bytes) return kvp_err_set(err, KVP_EINVAL, "gguf writer: tensor '%s': NULL data", name);
    uint8_t *copy = malloc((size_t)nbytes);
    if (!copy)
        return kvp_err_set(err, KVP_ENOMEM,
                           "gguf writer: out of memory for tensor '%s' (%" PRIu64 " bytes)", name,
                           nbytes);
    memcpy(copy, bytes, (size_t)nbytes);
    return writer_add(w, name, n_dims, ne, type, copy, nbytes, err);
}

/* The alignment the file will use: general.alignment if set (any unsigned or
 * non-negative integer type), else the default. 0 if the value is unusable. */
static uint64_t writer_alignment(const kvp_gguf_writer_t *w) {
    for (size_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kvs[i].key, "general.alignment")) continue;
        uint64_t size = vtype_size(w->kvs[i].type), v = 0;
        if (!vtype_is_int(w->kvs[i].type)) return 0;
        memcpy(&v, w->kvs[i].val.p, (size_t)size);
        if (vtype_is_signed(w->kvs[i].type) && (v >> (size * 8 - 1)) & 1) return 0;
        return (v && v <= UINT32_MAX && !(v & (v - 1))) ? v : 0;
    }
    return KVP_GGUF_DEFAULT_ALIGNMENT;
}

static int write_all(int fd, const void *p, size_t n) {
    const uint8_t *b = p;
    while (n) {
        ssize_t k = write(fd, b, n > (1u << 30) ? (1u << 30) : n);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

static int write_zeros(int fd, uint64_t n) {
    static const uint8_t zeros[64];
    while (n) {
        size_t k = n < sizeof zeros ? (size_t)n : sizeof zeros;
        if (write_all(fd, zeros, k)) return -1;
        n -= k;
    }
    return 0;
}

/* Best effort: makes the rename itself durable. */
static void fsync_dir_of(const char *path) {
    char *dup = strdup(path);
    if (!dup) return;
    char *slash = strrchr(dup, '/');
    const char *dir = ".";
    if (slash == dup)
        dir = "/";
    else if (slash) {
        *slash = '\0';
        dir = dup;
    }
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(dup);
}

int kvp_gguf_writer_write(const kvp_gguf_writer_t *w, const char *path, kvp_err_t *err) {
    if (!w || !path) return kvp_err_set(err, KVP_EINVAL, "gguf writer: NULL argument");
    uint64_t align = writer_alignment(w);
    if (align == 0)
        return kvp_err_set(err, KVP_EINVAL,
                           "%s: general.alignment must be a nonzero power of "
                           "two that fits in u32",
                           path);

    /* Everything before the data section, in memory. */
    buf_t h = {0};
    buf_put(&h, GGUF_MAGIC, 4);
    buf_u32(&h, 3);
    buf_u64(&h, w->n_tensors);
    buf_u64(&h, w->n_kv);
    for (size_t i = 0; i < w->n_kv; i++) {
        buf_str(&h, w->kvs[i].key, strlen(w->kvs[i].key));
        buf_u32(&h, w->kvs[i].type);
        buf_put(&h, w->kvs[i].val.p, w->kvs[i].val.len);
    }
    uint64_t off = 0;
    for (size_t i = 0; i < w->n_tensors; i++) {
        const wtensor_t *t = &w->tensors[i];
        buf_str(&h, t->name, strlen(t->name));
        buf_u32(&h, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++)
            buf_u64(&h, t->ne[d]);
        buf_u32(&h, t->type);
        buf_u64(&h, off);
        off += t->nbytes + (align - t->nbytes % align) % align;
    }
    if (h.oom) {
        free(h.p);
        return kvp_err_set(err, KVP_ENOMEM, "%s: out of memory building the header", path);
    }

    size_t tlen = strlen(path) + 32;
    char *tmp = malloc(tlen);
    if (!tmp) {
        free(h.p);
        return kvp_err_set(err, KVP_ENOMEM, "%s: out of memory", path);
    }
    snprintf(tmp, tlen, "%s.tmp.%ld", path, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        int e = errno;
        free(h.p);
        free(tmp);
        return kvp_err_set(err, KVP_EIO, "%s: cannot create temporary file: %s", path, strerror(e));
    }
    int ok =
        write_all(fd, h.p, h.len) == 0 && write_zeros(fd, (align - h.len % align) % align) == 0;
    for (size_t i = 0; ok && i < w->n_tensors; i++) {
        const wtensor_t *t = &w->tensors[i];
        ok = write_all(fd, t->bytes, (size_t)t->nbytes) == 0 &&
             write_zeros(fd, (align - t->nbytes % align) % align) == 0;
    }
    int e = errno;
    if (ok && fsync(fd) != 0) ok = 0, e = errno;
    if (close(fd) != 0 && ok) ok = 0, e = errno;
    if (ok && rename(tmp, path) != 0) ok = 0, e = errno;
    free(h.p);
    if (!ok) {
        unlink(tmp);
        free(tmp);
        return kvp_err_set(err, KVP_EIO, "%s: write failed: %s", path, strerror(e));
    }
    free(tmp);
    fsync_dir_of(path);
    return 0;
}
