/* Tests for kvp_gguf: the writer and reader round-trip every metadata type
 * and every tensor type, and the reader refuses damaged or hostile files
 * with a message that says what and where (never a crash; under ASan, never
 * a huge allocation). */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvp_gguf.h"
#include "kvp_half.h"

/* ------------------------------------------------------------------------ */
/* Helpers */

static char tmp_dir[1024];

static void mkdir_p(const char *path) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') {
            *p = '\0';
            mkdir(buf, 0755);
            *p = '/';
        }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST)
        fail_msg("cannot create %s: %s", buf, strerror(errno));
}

static int setup_tmp(void **state) {
    (void)state;
    const char *base = getenv("KVP_TEST_TMP");
    snprintf(tmp_dir, sizeof tmp_dir, "%s/test_gguf", base && *base ? base : "/tmp/kvp-test-tmp");
    mkdir_p(tmp_dir);
    return 0;
}

static const char *tmp_path(const char *name) {
    static char buf[4][1200];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmp_dir, name);
    return buf[k];
}

static uint8_t *read_whole(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

static void write_whole(const char *path, const void *b, size_t len) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

/* Opens bytes written to a scratch file; returns the code, err filled. */
static int open_bytes(const void *b, size_t len, kvp_err_t *err) {
    const char *p = tmp_path("scratch.gguf");
    write_whole(p, b, len);
    kvp_gguf_t *g = NULL;
    memset(err, 0, sizeof *err);
    int rc = kvp_gguf_open(&g, p, err);
    if (rc == 0) {
        assert_non_null(g);
        kvp_gguf_free(&g);
    } else {
        assert_null(g);
        assert_int_equal(err->code, rc);
    }
    return rc;
}

/* Asserts that msg contains every one of the given substrings (NULL-ended). */
static void assert_msg_has(const char *msg, ...) {
    va_list ap;
    va_start(ap, msg);
    for (const char *s; (s = va_arg(ap, const char *));)
        if (!strstr(msg, s)) fail_msg("message lacks \"%s\": %s", s, msg);
    va_end(ap);
}

/* Offset of the first occurrence of a string's bytes in a buffer. */
static size_t find_bytes(const uint8_t *b, size_t len, const char *s) {
    size_t n = strlen(s);
    for (size_t i = 0; i + n <= len; i++)
        if (!memcmp(b + i, s, n)) return i;
    fail_msg("\"%s\" not in the file", s);
    return 0;
}

static void put_u32(uint8_t *b, size_t off, uint32_t v) {
    memcpy(b + off, &v, 4);
}

static void put_u64(uint8_t *b, size_t off, uint64_t v) {
    memcpy(b + off, &v, 8);
}

/* Field offsets inside a tensor info found by its name. */
static size_t tinfo_ndims(const uint8_t *b, size_t len, const char *name) {
    return find_bytes(b, len, name) + strlen(name);
}
static size_t tinfo_ne(const uint8_t *b, size_t len, const char *name, int d) {
    return tinfo_ndims(b, len, name) + 4 + 8 * (size_t)d;
}
static size_t tinfo_type(const uint8_t *b, size_t len, const char *name) {
    uint32_t nd;
    memcpy(&nd, b + tinfo_ndims(b, len, name), 4);
    return tinfo_ne(b, len, name, (int)nd);
}
static size_t tinfo_offset(const uint8_t *b, size_t len, const char *name) {
    return tinfo_type(b, len, name) + 4;
}
/* Offset of a key's type field, found by the key. */
static size_t kv_type_at(const uint8_t *b, size_t len, const char *key) {
    return find_bytes(b, len, key) + strlen(key);
}

static uint64_t rng_state = 0x2545f4914f6cdd1dull;
static uint64_t rng(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}
static float rnd_float(void) {
    return (float)((double)(rng() >> 11) / 9007199254740992.0 * 4.0 - 2.0);
}

/* ------------------------------------------------------------------------ */
/* The reference file: every metadata type, every tensor type */

typedef struct ref_tensor {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    kvp_ggml_type_t type;
    float *data;
    uint64_t n;
} ref_tensor_t;

static ref_tensor_t ref_tensors[] = {
    {"w.f32", 1, {7}, KVP_GGML_F32, NULL, 0},
    {"w.f16", 2, {5, 3}, KVP_GGML_F16, NULL, 0},
    {"w.bf16", 3, {3, 2, 4}, KVP_GGML_BF16, NULL, 0},
    {"w.q8", 2, {64, 3}, KVP_GGML_Q8_0, NULL, 0},
    {"w.q8b", 3, {32, 2, 2}, KVP_GGML_Q8_0, NULL, 0},
    {"w.f32b", 3, {2, 3, 5}, KVP_GGML_F32, NULL, 0},
};
#define N_REF_TENSORS (sizeof ref_tensors / sizeof ref_tensors[0])

static const int32_t ref_i32[] = {0, -1, 2147483647, -2147483647 - 1, 42};
static const float ref_f32[] = {0.0f, -1.5f, 3.0e38f, 1e-40f};
static const char *const ref_strs[] = {"a", "", "ccc", "d\303\251f", "<0x0A>"};
static const uint8_t ref_u8s[] = {0, 1, 255};

static void fill_ref_data(void) {
    for (size_t i = 0; i < N_REF_TENSORS; i++) {
        ref_tensor_t *t = &ref_tensors[i];
        t->n = 1;
        for (uint32_t d = 0; d < t->n_dims; d++)
            t->n *= t->ne[d];
        free(t->data);
        t->data = malloc(t->n * sizeof(float));
        assert_non_null(t->data);
        for (uint64_t j = 0; j < t->n; j++)
            t->data[j] = rnd_float();
    }
}

static int teardown_ref(void **state) {
    (void)state;
    for (size_t i = 0; i < N_REF_TENSORS; i++) {
        free(ref_tensors[i].data);
        ref_tensors[i].data = NULL;
    }
    return 0;
}

/* Writes the reference file; alignment 0 = leave general.alignment unset. */
static void write_ref(const char *path, uint32_t alignment) {
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    kvp_err_t err = {0};
    assert_non_null(w);
    uint8_t u8 = 200;
    int8_t i8 = -100;
    uint16_t u16 = 60000;
    int16_t i16 = -30000;
    uint32_t u32 = 4000000000u;
    int32_t i32 = -2000000000;
    float f32 = 3.25f;
    uint8_t b = 1;
    uint64_t u64 = (1ull << 63) + 5;
    int64_t i64 = -(1ll << 62) - 3;
    double f64 = 2.718281828459045;
    assert_int_equal(kvp_gguf_writer_set_str(w, "general.architecture", "llama"), 0);
    if (alignment) assert_int_equal(kvp_gguf_writer_set_u32(w, "general.alignment", alignment), 0);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "t.u8", KVP_GGUF_U8, &u8), 0);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "t.i8", KVP_GGUF_I8, &i8), 0);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "t.u16", KVP_GGUF_U16, &u16), 0);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "t.i16", KVP_GGUF_I16, &i16), 0);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "t.u32", KVP_GGUF_U32, &u32), 0);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "t.i32", KVP_GGUF_I32, &i32), 0);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "t.f32", KVP_GGUF_F32, &f32), 0);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "t.bool", KVP_GGUF_BOOL, &b), 0);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "t.u64", KVP_GGUF_U64, &u64), 0);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "t.i64", KVP_GGUF_I64, &i64), 0);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "t.f64", KVP_GGUF_F64, &f64), 0);
    assert_int_equal(kvp_gguf_writer_set_u32(w, "s.u32", 7), 0);
    assert_int_equal(kvp_gguf_writer_set_i32(w, "s.i32", -7), 0);
    assert_int_equal(kvp_gguf_writer_set_u64(w, "s.u64", 1ull << 40), 0);
    assert_int_equal(kvp_gguf_writer_set_f32(w, "s.f32", 1e-5f), 0);
    assert_int_equal(kvp_gguf_writer_set_bool(w, "s.bool", false), 0);
    assert_int_equal(kvp_gguf_writer_set_str(w, "s.str", "h\xc3\xa9llo \"world\"\n"), 0);
    assert_int_equal(kvp_gguf_writer_set_str(w, "s.empty", ""), 0);
    assert_int_equal(kvp_gguf_writer_set_u32(w, "s.replaced", 1), 0);
    assert_int_equal(kvp_gguf_writer_set_arr_i32(w, "a.i32", ref_i32, 5), 0);
    assert_int_equal(kvp_gguf_writer_set_arr_f32(w, "a.f32", ref_f32, 4), 0);
    assert_int_equal(kvp_gguf_writer_set_arr_str(w, "a.str", ref_strs, 5), 0);
    assert_int_equal(kvp_gguf_writer_set_arr_raw(w, "a.u8", KVP_GGUF_U8, ref_u8s, 3), 0);
    assert_int_equal(kvp_gguf_writer_set_arr_i32(w, "a.empty", NULL, 0), 0);
    assert_int_equal(kvp_gguf_writer_set_str(w, "s.replaced", "two"), 0); /* replaces */
    for (size_t i = 0; i < N_REF_TENSORS; i++) {
        ref_tensor_t *t = &ref_tensors[i];
        assert_int_equal(
            kvp_gguf_writer_add_tensor(w, t->name, t->n_dims, t->ne, t->type, t->data, &err), 0);
    }
    int rc = kvp_gguf_writer_write(w, path, &err);
    if (rc) fail_msg("write %s: %s", path, err.msg);
    kvp_gguf_writer_free(&w);
    assert_null(w);
}

/* Dequantised tensor data must be what kvp_half makes of the original. */
static void check_ref_tensors(const kvp_gguf_t *g) {
    kvp_err_t err = {0};
    assert_int_equal(kvp_gguf_n_tensors(g), N_REF_TENSORS);
    uint32_t align = kvp_gguf_alignment(g);
    for (size_t i = 0; i < N_REF_TENSORS; i++) {
        const ref_tensor_t *r = &ref_tensors[i];
        const kvp_gguf_tensor_t *t = kvp_gguf_find_tensor(g, r->name);
        assert_non_null(t);
        assert_ptr_equal(t, kvp_gguf_tensor_at(g, i)); /* file order kept */
        assert_int_equal(t->name.len, strlen(r->name));
        assert_memory_equal(t->name.ptr, r->name, t->name.len);
        assert_int_equal(t->n_dims, r->n_dims);
        for (uint32_t d = 0; d < KVP_GGUF_MAX_DIMS; d++)
            assert_int_equal(t->ne[d], d < r->n_dims ? r->ne[d] : 1);
        assert_int_equal(t->type, r->type);
        assert_int_equal(t->n_elems, r->n);
        assert_int_equal(t->nbytes, kvp_ggml_type_nbytes(r->type, r->n));
        assert_int_equal(t->offset % align, 0);
        assert_int_equal((kvp_gguf_data_offset(g) + t->offset) % align, 0);
        float *y = malloc(r->n * sizeof *y);
        assert_non_null(y);
        assert_int_equal(kvp_gguf_tensor_to_f32(t, y, &err), 0);
        for (uint64_t j = 0; j < r->n; j++) {
            float x = r->data[j], want;
            switch (r->type) {
            case KVP_GGML_F32:
                want = x;
                break;
            case KVP_GGML_F16:
                want = kvp_f16_to_f32(kvp_f32_to_f16(x));
                break;
            case KVP_GGML_BF16:
                want = kvp_bf16_to_f32(kvp_f32_to_bf16(x));
                break;
            default: {
                /* Q8_0: within half a step of the block's stored scale d,
                 * plus the f16 rounding of d over at most 127 steps */
                const uint8_t *blk = (const uint8_t *)t->data + j / 32 * 34;
                float d = kvp_f16_to_f32((uint16_t)(blk[0] | (blk[1] << 8)));
                float tol = d * (0.5f + 127.0f * 0x1p-11f) + 1e-6f;
                if (fabsf(y[j] - x) > tol)
                    fail_msg("%s[%llu]: %g vs %g (d %g)", r->name, (unsigned long long)j, y[j], x,
                             d);
                want = y[j];
            }
            }
            if (y[j] != want)
                fail_msg("%s[%llu]: %g, want %g", r->name, (unsigned long long)j, y[j], want);
        }
        free(y);
    }
    assert_null(kvp_gguf_find_tensor(g, "w.none"));
    assert_null(kvp_gguf_find_tensor(g, "w.f3")); /* prefix of a name */
    assert_null(kvp_gguf_tensor_at(g, N_REF_TENSORS));
}

static const kvp_gguf_kv_t *must_find(const kvp_gguf_t *g, const char *key, kvp_gguf_vtype_t type) {
    const kvp_gguf_kv_t *kv = kvp_gguf_find(g, key);
    if (!kv) fail_msg("key %s not found", key);
    assert_int_equal(kv->type, type);
    assert_int_equal(kv->key.len, strlen(key));
    assert_memory_equal(kv->key.ptr, key, kv->key.len);
    return kv;
}

static void check_ref_kvs(const kvp_gguf_t *g, bool with_alignment) {
    assert_int_equal(kvp_gguf_n_kv(g), 25 + (with_alignment ? 1 : 0));
    assert_int_equal(must_find(g, "t.u8", KVP_GGUF_U8)->v.u64, 200);
    assert_int_equal(must_find(g, "t.i8", KVP_GGUF_I8)->v.i64, -100);
    assert_int_equal(must_find(g, "t.u16", KVP_GGUF_U16)->v.u64, 60000);
    assert_int_equal(must_find(g, "t.i16", KVP_GGUF_I16)->v.i64, -30000);
    assert_int_equal(must_find(g, "t.u32", KVP_GGUF_U32)->v.u64, 4000000000u);
    assert_int_equal(must_find(g, "t.i32", KVP_GGUF_I32)->v.i64, -2000000000);
    assert_true(must_find(g, "t.f32", KVP_GGUF_F32)->v.f64 == 3.25);
    assert_int_equal(must_find(g, "t.bool", KVP_GGUF_BOOL)->v.u64, 1);
    assert_true(must_find(g, "t.u64", KVP_GGUF_U64)->v.u64 == (1ull << 63) + 5);
    assert_true(must_find(g, "t.i64", KVP_GGUF_I64)->v.i64 == -(1ll << 62) - 3);
    assert_true(must_find(g, "t.f64", KVP_GGUF_F64)->v.f64 == 2.718281828459045);
    assert_int_equal(must_find(g, "s.u32", KVP_GGUF_U32)->v.u64, 7);
    assert_int_equal(must_find(g, "s.i32", KVP_GGUF_I32)->v.i64, -7);
    assert_true(must_find(g, "s.u64", KVP_GGUF_U64)->v.u64 == 1ull << 40);
    assert_true(must_find(g, "s.f32", KVP_GGUF_F32)->v.f64 == (double)1e-5f);
    assert_int_equal(must_find(g, "s.bool", KVP_GGUF_BOOL)->v.u64, 0);
    const kvp_gguf_kv_t *kv = must_find(g, "s.str", KVP_GGUF_STRING);
    assert_int_equal(kv->v.str.len, strlen("h\xc3\xa9llo \"world\"\n"));
    assert_memory_equal(kv->v.str.ptr, "h\xc3\xa9llo \"world\"\n", kv->v.str.len);
    assert_int_equal(must_find(g, "s.empty", KVP_GGUF_STRING)->v.str.len, 0);
    kv = must_find(g, "s.replaced", KVP_GGUF_STRING);
    assert_int_equal(kv->v.str.len, 3);
    assert_memory_equal(kv->v.str.ptr, "two", 3);
    /* the first key set keeps its place in the file */
    kv = kvp_gguf_kv_at(g, 0);
    assert_int_equal(kv->key.len, strlen("general.architecture"));
    assert_memory_equal(kv->key.ptr, "general.architecture", kv->key.len);
    assert_null(kvp_gguf_kv_at(g, kvp_gguf_n_kv(g)));

    kv = must_find(g, "a.i32", KVP_GGUF_ARRAY);
    assert_int_equal(kv->v.arr.elem_type, KVP_GGUF_I32);
    assert_int_equal(kv->v.arr.count, 5);
    for (int i = 0; i < 5; i++) {
        assert_true(kvp_gguf_arr_i64(kv, (uint64_t)i) == ref_i32[i]);
        assert_true(kvp_gguf_arr_f64(kv, (uint64_t)i) == ref_i32[i]);
    }
    assert_true(kvp_gguf_arr_i64(kv, 5) == 0); /* out of range */
    kv = must_find(g, "a.f32", KVP_GGUF_ARRAY);
    assert_int_equal(kv->v.arr.elem_type, KVP_GGUF_F32);
    assert_int_equal(kv->v.arr.count, 4);
    for (int i = 0; i < 4; i++)
        assert_true(kvp_gguf_arr_f64(kv, (uint64_t)i) == ref_f32[i]);
    kv = must_find(g, "a.str", KVP_GGUF_ARRAY);
    assert_int_equal(kv->v.arr.elem_type, KVP_GGUF_STRING);
    assert_int_equal(kv->v.arr.count, 5);
    assert_non_null(kv->v.arr.strs);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(kv->v.arr.strs[i].len, strlen(ref_strs[i]));
        assert_memory_equal(kv->v.arr.strs[i].ptr, ref_strs[i], kv->v.arr.strs[i].len);
    }
    kv = must_find(g, "a.u8", KVP_GGUF_ARRAY);
    assert_int_equal(kv->v.arr.elem_type, KVP_GGUF_U8);
    for (int i = 0; i < 3; i++)
        assert_true(kvp_gguf_arr_i64(kv, (uint64_t)i) == ref_u8s[i]);
    kv = must_find(g, "a.empty", KVP_GGUF_ARRAY);
    assert_int_equal(kv->v.arr.count, 0);
    assert_null(kvp_gguf_find(g, "t.u"));
    assert_null(kvp_gguf_find(g, "nope"));
}

/* ------------------------------------------------------------------------ */
/* Round trip */

static void roundtrip_every_type(void **state) {
    (void)state;
    fill_ref_data();
    const char *p = tmp_path("ref.gguf");
    write_ref(p, 0);
    kvp_gguf_t *g = NULL;
    kvp_err_t err = {0};
    int rc = kvp_gguf_open(&g, p, &err);
    if (rc) fail_msg("open: %s", err.msg);
    assert_int_equal(kvp_gguf_version(g), 3);
    assert_int_equal(kvp_gguf_alignment(g), KVP_GGUF_DEFAULT_ALIGNMENT);
    assert_string_equal(kvp_gguf_path(g), p);
    struct stat st;
    assert_int_equal(stat(p, &st), 0);
    assert_int_equal(kvp_gguf_file_size(g), (uint64_t)st.st_size);
    check_ref_kvs(g, false);
    check_ref_tensors(g);
    kvp_gguf_free(&g);
    assert_null(g);
    kvp_gguf_free(&g); /* freeing NULL is a no-op */
    /* no temp file left behind */
    char tmp[1300];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", p, (long)getpid());
    assert_int_not_equal(access(tmp, F_OK), 0);
}

/* general.alignment 64 and 1 (1 puts 2-byte values at odd addresses). */
static void roundtrip_custom_alignment(void **state) {
    (void)state;
    fill_ref_data();
    const uint32_t aligns[] = {64, 1, 4096};
    for (size_t k = 0; k < 3; k++) {
        const char *p = tmp_path("aligned.gguf");
        write_ref(p, aligns[k]);
        kvp_gguf_t *g = NULL;
        kvp_err_t err = {0};
        int rc = kvp_gguf_open(&g, p, &err);
        if (rc) fail_msg("open: %s", err.msg);
        assert_int_equal(kvp_gguf_alignment(g), aligns[k]);
        assert_int_equal(kvp_gguf_data_offset(g) % aligns[k], 0);
        check_ref_kvs(g, true);
        check_ref_tensors(g);
        kvp_gguf_free(&g);
    }
}

static void typed_getters(void **state) {
    (void)state;
    fill_ref_data();
    const char *p = tmp_path("ref.gguf");
    write_ref(p, 0);
    kvp_gguf_t *g = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_gguf_open(&g, p, &err), 0);
    uint32_t u32;
    uint64_t u64;
    int64_t i64;
    float f;
    bool b;
    char s[64];
    assert_int_equal(kvp_gguf_get_u32(g, "t.u8", &u32, &err), 0);
    assert_int_equal(u32, 200);
    assert_int_equal(kvp_gguf_get_u32(g, "t.u32", &u32, &err), 0);
    assert_int_equal(u32, 4000000000u);
    assert_int_equal(kvp_gguf_get_u32(g, "s.i32", &u32, &err), KVP_EFORMAT); /* -7 */
    assert_msg_has(err.msg, "s.i32", "i32", "-7", "wanted u32", NULL);
    assert_int_equal(kvp_gguf_get_u32(g, "t.u64", &u32, &err), KVP_EFORMAT); /* too big */
    assert_msg_has(err.msg, "t.u64", "u64", "wanted u32", NULL);
    assert_int_equal(kvp_gguf_get_u32(g, "t.bool", &u32, &err), 0);
    assert_int_equal(u32, 1);
    assert_int_equal(kvp_gguf_get_u32(g, "t.f32", &u32, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "t.f32", "f32", NULL);
    assert_int_equal(kvp_gguf_get_u32(g, "no.such.key", &u32, &err), KVP_ERANGE);
    assert_msg_has(err.msg, "missing key", "no.such.key", NULL);
    assert_int_equal(kvp_gguf_get_u64(g, "t.u64", &u64, &err), 0);
    assert_true(u64 == (1ull << 63) + 5);
    assert_int_equal(kvp_gguf_get_u64(g, "t.i16", &u64, &err), KVP_EFORMAT);
    assert_int_equal(kvp_gguf_get_i64(g, "t.i64", &i64, &err), 0);
    assert_true(i64 == -(1ll << 62) - 3);
    assert_int_equal(kvp_gguf_get_i64(g, "t.u32", &i64, &err), 0);
    assert_true(i64 == 4000000000ll);
    assert_int_equal(kvp_gguf_get_i64(g, "t.u64", &i64, &err), KVP_EFORMAT); /* > INT64_MAX */
    assert_int_equal(kvp_gguf_get_f32(g, "t.f64", &f, &err), 0);
    assert_true(f == (float)2.718281828459045);
    assert_int_equal(kvp_gguf_get_f32(g, "t.i32", &f, &err), 0);
    assert_true(f == -2000000000.0f);
    assert_int_equal(kvp_gguf_get_f32(g, "s.str", &f, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "s.str", "string", "wanted f32", NULL);
    assert_int_equal(kvp_gguf_get_bool(g, "t.bool", &b, &err), 0);
    assert_true(b);
    assert_int_equal(kvp_gguf_get_bool(g, "t.u8", &b, &err), KVP_EFORMAT); /* 200 */
    assert_int_equal(kvp_gguf_get_str(g, "general.architecture", s, sizeof s, &err), 0);
    assert_string_equal(s, "llama");
    assert_int_equal(kvp_gguf_get_str(g, "general.architecture", s, 5, &err), KVP_ERANGE);
    assert_int_equal(kvp_gguf_get_str(g, "general.architecture", s, 6, &err), 0);
    assert_int_equal(kvp_gguf_get_str(g, "s.empty", s, 1, &err), 0);
    assert_string_equal(s, "");
    assert_int_equal(kvp_gguf_get_str(g, "t.u8", s, sizeof s, &err), KVP_EFORMAT);
    assert_int_equal(kvp_gguf_get_str(g, "absent", s, sizeof s, &err), KVP_ERANGE);
    /* defaults: absent -> default; present -> value; wrong type -> error */
    assert_int_equal(kvp_gguf_get_u32_or(g, "absent", 99, &u32, &err), 0);
    assert_int_equal(u32, 99);
    assert_int_equal(kvp_gguf_get_u32_or(g, "s.u32", 99, &u32, &err), 0);
    assert_int_equal(u32, 7);
    assert_int_equal(kvp_gguf_get_u32_or(g, "s.str", 99, &u32, &err), KVP_EFORMAT);
    assert_int_equal(kvp_gguf_get_f32_or(g, "absent", 10000.0f, &f, &err), 0);
    assert_true(f == 10000.0f);
    assert_int_equal(kvp_gguf_get_f32_or(g, "s.f32", 0, &f, &err), 0);
    assert_true(f == 1e-5f);
    assert_int_equal(kvp_gguf_get_bool_or(g, "absent", true, &b, &err), 0);
    assert_true(b);
    assert_int_equal(kvp_gguf_get_bool_or(g, "s.bool", true, &b, &err), 0);
    assert_false(b);
    assert_int_equal(kvp_gguf_get_bool_or(g, "s.str", true, &b, &err), KVP_EFORMAT);
    /* arrays: same-width integers are interchangeable, other types are not */
    const kvp_gguf_kv_t *kv = NULL;
    assert_int_equal(kvp_gguf_get_arr(g, "a.i32", KVP_GGUF_I32, &kv, &err), 0);
    assert_non_null(kv);
    assert_int_equal(kvp_gguf_get_arr(g, "a.i32", KVP_GGUF_U32, &kv, &err), 0);
    assert_int_equal(kvp_gguf_get_arr(g, "a.i32", KVP_GGUF_F32, &kv, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "a.i32", "array of i32", "wanted array of f32", NULL);
    assert_int_equal(kvp_gguf_get_arr(g, "a.i32", KVP_GGUF_I64, &kv, &err), KVP_EFORMAT);
    assert_int_equal(kvp_gguf_get_arr(g, "a.str", KVP_GGUF_STRING, &kv, &err), 0);
    assert_int_equal(kv->v.arr.count, 5);
    assert_int_equal(kvp_gguf_get_arr(g, "t.u8", KVP_GGUF_U8, &kv, &err), KVP_EFORMAT);
    assert_int_equal(kvp_gguf_get_arr(g, "absent", KVP_GGUF_U8, &kv, &err), KVP_ERANGE);
    /* names */
    assert_string_equal(kvp_gguf_vtype_name(KVP_GGUF_F64), "f64");
    assert_string_equal(kvp_ggml_type_name(KVP_GGML_BF16), "bf16");
    assert_string_equal(kvp_ggml_type_name((kvp_ggml_type_t)2), "q4_0");
    assert_string_equal(kvp_ggml_type_name((kvp_ggml_type_t)1000), "unknown");
    assert_int_equal(kvp_ggml_type_nbytes(KVP_GGML_Q8_0, 64), 68);
    assert_int_equal(kvp_ggml_type_nbytes(KVP_GGML_Q8_0, 33), 0);
    assert_int_equal(kvp_ggml_type_nbytes((kvp_ggml_type_t)2, 32), 0);
    kvp_gguf_free(&g);
}

/* Pairs and tensors copied from one file into a writer make the same file. */
static void copy_kv_roundtrip(void **state) {
    (void)state;
    fill_ref_data();
    const char *p = tmp_path("ref.gguf");
    const char *q = tmp_path("copy.gguf");
    write_ref(p, 64);
    kvp_gguf_t *g = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_gguf_open(&g, p, &err), 0);
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    for (uint64_t i = 0; i < kvp_gguf_n_kv(g); i++)
        assert_int_equal(kvp_gguf_writer_copy_kv(w, kvp_gguf_kv_at(g, i)), 0);
    for (uint64_t i = 0; i < kvp_gguf_n_tensors(g); i++) {
        const kvp_gguf_tensor_t *t = kvp_gguf_tensor_at(g, i);
        char name[64];
        snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
        assert_int_equal(
            kvp_gguf_writer_add_tensor_raw(w, name, t->n_dims, t->ne, t->type, t->data, &err), 0);
    }
    assert_int_equal(kvp_gguf_writer_write(w, q, &err), 0);
    kvp_gguf_writer_free(&w);
    kvp_gguf_free(&g);
    size_t la, lb;
    uint8_t *a = read_whole(p, &la), *b = read_whole(q, &lb);
    assert_int_equal(la, lb);
    assert_memory_equal(a, b, la);
    free(a);
    free(b);
}

static void writer_refuses_bad_input(void **state) {
    (void)state;
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    kvp_err_t err = {0};
    float x[64] = {0};
    uint64_t ne[5] = {32, 2, 1, 1, 1};
    uint64_t ne33[1] = {33}, ne0[2] = {4, 0};
    assert_int_equal(kvp_gguf_writer_add_tensor(w, "a", 0, ne, KVP_GGML_F32, x, &err), KVP_EINVAL);
    assert_msg_has(err.msg, "'a'", "n_dims 0", NULL);
    assert_int_equal(kvp_gguf_writer_add_tensor(w, "a", 5, ne, KVP_GGML_F32, x, &err), KVP_EINVAL);
    assert_int_equal(kvp_gguf_writer_add_tensor(w, "a", 2, ne0, KVP_GGML_F32, x, &err), KVP_EINVAL);
    assert_int_equal(kvp_gguf_writer_add_tensor(w, "a", 1, ne33, KVP_GGML_Q8_0, x, &err),
                     KVP_EINVAL);
    assert_msg_has(err.msg, "q8_0", "33", NULL);
    assert_int_equal(kvp_gguf_writer_add_tensor(w, "a", 1, ne, (kvp_ggml_type_t)2, x, &err),
                     KVP_EUNSUPPORTED);
    assert_msg_has(err.msg, "q4_0", NULL);
    assert_int_equal(kvp_gguf_writer_add_tensor(w, "a", 2, ne, KVP_GGML_Q8_0, x, &err), 0);
    assert_int_equal(kvp_gguf_writer_add_tensor(w, "a", 1, ne, KVP_GGML_F32, x, &err), KVP_EINVAL);
    assert_msg_has(err.msg, "duplicate", "'a'", NULL);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "k", KVP_GGUF_STRING, "x"), KVP_EINVAL);
    assert_int_equal(kvp_gguf_writer_set_raw(w, "k", KVP_GGUF_ARRAY, x), KVP_EINVAL);
    assert_int_equal(kvp_gguf_writer_set_arr_raw(w, "k", KVP_GGUF_STRING, x, 1), KVP_EINVAL);
    /* a bad general.alignment is refused when writing */
    assert_int_equal(kvp_gguf_writer_set_u32(w, "general.alignment", 48), 0);
    assert_int_equal(kvp_gguf_writer_write(w, tmp_path("bad-align.gguf"), &err), KVP_EINVAL);
    assert_msg_has(err.msg, "general.alignment", NULL);
    assert_int_equal(kvp_gguf_writer_set_u32(w, "general.alignment", 16), 0);
    /* a failed rename (the target is a directory) leaves no temp file */
    const char *dir = tmp_path("a-directory");
    mkdir(dir, 0755);
    assert_int_equal(kvp_gguf_writer_write(w, dir, &err), KVP_EIO);
    assert_msg_has(err.msg, "a-directory", NULL);
    char tmp[1300];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", dir, (long)getpid());
    assert_int_not_equal(access(tmp, F_OK), 0);
    assert_int_equal(kvp_gguf_writer_write(w, "/nonexistent-dir/x.gguf", &err), KVP_EIO);
    kvp_gguf_writer_free(&w);
}

/* ------------------------------------------------------------------------ */
/* Damaged and hostile files */

/* A tiny hand-made GGUF builder for what the writer cannot produce. */
typedef struct hb {
    uint8_t b[4096];
    size_t n;
} hb_t;
static void hb_u32(hb_t *h, uint32_t v) {
    memcpy(h->b + h->n, &v, 4);
    h->n += 4;
}
static void hb_u64(hb_t *h, uint64_t v) {
    memcpy(h->b + h->n, &v, 8);
    h->n += 8;
}
static void hb_str(hb_t *h, const char *s) {
    hb_u64(h, strlen(s));
    memcpy(h->b + h->n, s, strlen(s));
    h->n += strlen(s);
}
static void hb_header(hb_t *h, uint64_t n_tensors, uint64_t n_kv) {
    h->n = 0;
    memcpy(h->b, "GGUF", 4);
    h->n = 4;
    hb_u32(h, 3);
    hb_u64(h, n_tensors);
    hb_u64(h, n_kv);
}

static uint8_t *ref_bytes(size_t *len) {
    fill_ref_data();
    const char *p = tmp_path("ref.gguf");
    write_ref(p, 0);
    return read_whole(p, len);
}

/* Truncated anywhere before the end of the last tensor's data -> refused. */
static void truncated_files_refused(void **state) {
    (void)state;
    size_t len;
    uint8_t *b = ref_bytes(&len);
    kvp_gguf_t *g = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_gguf_open(&g, tmp_path("ref.gguf"), &err), 0);
    uint64_t data_at = kvp_gguf_data_offset(g);
    const kvp_gguf_tensor_t *last = kvp_gguf_tensor_at(g, N_REF_TENSORS - 1);
    uint64_t end = data_at + last->offset + last->nbytes;
    kvp_gguf_free(&g);
    int n = 0;
    for (uint64_t cut = 0; cut < end; cut += cut < data_at + 64 ? 1 : 13, n++) {
        int rc = open_bytes(b, (size_t)cut, &err);
        if (rc != KVP_EFORMAT)
            fail_msg("cut at %llu: rc %d (%s)", (unsigned long long)cut, rc, err.msg);
        if (!strstr(err.msg, "offset") && !strstr(err.msg, "truncated"))
            fail_msg("cut at %llu: message lacks offset: %s", (unsigned long long)cut, err.msg);
        assert_non_null(strstr(err.msg, "scratch.gguf"));
    }
    assert_true(n > 600);
    /* a cut inside a key's value names that key, the offset and the file size */
    hb_t h;
    hb_header(&h, 0, 1);
    hb_str(&h, "t.u64");
    hb_u32(&h, KVP_GGUF_U64);
    hb_u32(&h, 0);
    hb_u32(&h, 0);
    assert_int_equal(open_bytes(h.b, h.n - 5, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "truncated at offset 41 while reading the value of key 't.u64'",
                   "file is 44 bytes", NULL);
    /* a cut in the data section names the tensor */
    assert_int_equal(open_bytes(b, (size_t)(end - 1), &err), KVP_EFORMAT);
    assert_msg_has(err.msg, ref_tensors[N_REF_TENSORS - 1].name, "outside the file", NULL);
    /* the whole file, and the file without its final padding, are fine */
    assert_int_equal(open_bytes(b, len, &err), 0);
    assert_int_equal(open_bytes(b, (size_t)end, &err), 0);
    free(b);
}

static void bad_header_refused(void **state) {
    (void)state;
    size_t len;
    uint8_t *b = ref_bytes(&len);
    kvp_err_t err;
    uint8_t *c = malloc(len);
    assert_non_null(c);

    memcpy(c, b, len);
    memcpy(c, "GGML", 4);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "magic", "offset 0", NULL);

    memcpy(c, b, len);
    put_u32(c, 4, 99);
    assert_int_equal(open_bytes(c, len, &err), KVP_EUNSUPPORTED);
    assert_msg_has(err.msg, "version 99", NULL);
    put_u32(c, 4, 1);
    assert_int_equal(open_bytes(c, len, &err), KVP_EUNSUPPORTED);
    assert_msg_has(err.msg, "version 1", NULL);
    put_u32(c, 4, 0x03000000);
    assert_int_equal(open_bytes(c, len, &err), KVP_EUNSUPPORTED);
    assert_msg_has(err.msg, "big-endian", NULL);
    put_u32(c, 4, 2); /* v2 has the same layout: accepted */
    assert_int_equal(open_bytes(c, len, &err), 0);

    /* hostile counts: refused from the header alone (under ASan a 2^60-entry
     * allocation would abort the test) */
    memcpy(c, b, len);
    put_u64(c, 8, 1ull << 60);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "1152921504606846976 tensors", "cannot fit", "offset", NULL);
    memcpy(c, b, len);
    put_u64(c, 16, 1ull << 60);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "1152921504606846976 metadata pairs", "cannot fit", NULL);
    memcpy(c, b, len);
    put_u64(c, 16, UINT64_MAX);
    put_u64(c, 8, UINT64_MAX);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    /* a count that fits the file but exceeds what is there -> truncated */
    memcpy(c, b, len);
    put_u64(c, 16, 30);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "offset", NULL);

    /* huge string length: the first key's length at offset 24 */
    memcpy(c, b, len);
    put_u64(c, 24, 1ull << 62);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "string length 4611686018427387904", "offset 24",
                   "key of metadata pair #0", NULL);
    /* a string value that runs one byte past the end of the file */
    memcpy(c, b, len);
    size_t at = kv_type_at(b, len, "s.str") + 4;
    put_u64(c, at, len - at - 8 + 1);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "runs past the end", "'s.str'", NULL);
    free(c);
    free(b);
}

static void bad_metadata_refused(void **state) {
    (void)state;
    size_t len;
    uint8_t *b = ref_bytes(&len);
    kvp_err_t err;
    uint8_t *c = malloc(len);
    assert_non_null(c);

    /* huge array counts: refused before the string index is allocated */
    memcpy(c, b, len);
    size_t at = kv_type_at(b, len, "a.str") + 4 + 4;
    put_u64(c, at, 1ull << 60);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "array count 1152921504606846976", "'a.str'", "offset", NULL);
    memcpy(c, b, len);
    at = kv_type_at(b, len, "a.i32") + 4 + 4;
    put_u64(c, at, 1ull << 62); /* 4-byte elements: the byte count would overflow */
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "'a.i32'", NULL);
    /* a string inside a string array with a huge length */
    memcpy(c, b, len);
    at = kv_type_at(b, len, "a.str") + 4 + 4 + 8;
    put_u64(c, at, UINT64_MAX);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "string length", "'a.str'", NULL);

    /* unknown value type, and unknown array element type */
    memcpy(c, b, len);
    put_u32(c, kv_type_at(b, len, "t.u8"), 13);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "unknown value type 13", "'t.u8'", "offset", NULL);
    memcpy(c, b, len);
    put_u32(c, kv_type_at(b, len, "a.u8") + 4, 77);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "unknown value type 77", "'a.u8'", NULL);

    /* duplicate key: rename t.u16 to t.i16 */
    memcpy(c, b, len);
    memcpy(c + find_bytes(b, len, "t.u16"), "t.i16", 5);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "duplicate key 't.i16'", "offset", NULL);
    free(c);
    free(b);

    /* general.alignment that is not a power of two, or zero */
    fill_ref_data();
    write_ref(tmp_path("a64.gguf"), 64);
    b = read_whole(tmp_path("a64.gguf"), &len);
    at = kv_type_at(b, len, "general.alignment") + 4;
    put_u32(b, at, 48);
    assert_int_equal(open_bytes(b, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "general.alignment", "48", "power of two", "offset", NULL);
    put_u32(b, at, 0);
    assert_int_equal(open_bytes(b, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "general.alignment", NULL);
    put_u32(b, at - 4, KVP_GGUF_F32);
    put_u32(b, at, 0x42800000); /* 64.0f: a float is not an alignment */
    assert_int_equal(open_bytes(b, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "general.alignment", "f32", NULL);
    free(b);
}

static void bad_tensor_info_refused(void **state) {
    (void)state;
    size_t len;
    uint8_t *b = ref_bytes(&len);
    kvp_err_t err;
    uint8_t *c = malloc(len);
    assert_non_null(c);

    /* unsupported type 2 (q4_0) */
    memcpy(c, b, len);
    put_u32(c, tinfo_type(b, len, "w.f32b"), 2);
    assert_int_equal(open_bytes(c, len, &err), KVP_EUNSUPPORTED);
    assert_msg_has(err.msg, "'w.f32b'", "type 2", "q4_0", "offset", NULL);
    put_u32(c, tinfo_type(b, len, "w.f32b"), 0x12345);
    assert_int_equal(open_bytes(c, len, &err), KVP_EUNSUPPORTED);
    assert_msg_has(err.msg, "'w.f32b'", "type 74565", NULL);

    /* misaligned data offset */
    memcpy(c, b, len);
    size_t off = tinfo_offset(b, len, "w.bf16");
    uint64_t v;
    memcpy(&v, b + off, 8);
    put_u64(c, off, v + 2);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "'w.bf16'", "not aligned to 32", "offset", NULL);

    /* data outside the file, including offsets where offset + size overflows */
    const uint64_t far[] = {1ull << 40, UINT64_MAX - 31, UINT64_MAX - 63};
    for (int i = 0; i < 3; i++) {
        memcpy(c, b, len);
        put_u64(c, off, far[i]);
        assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
        assert_msg_has(err.msg, "'w.bf16'", "outside the file", "offset", NULL);
    }

    /* duplicate tensor name: w.f16 renamed to w.f32 */
    memcpy(c, b, len);
    memcpy(c + find_bytes(b, len, "w.f16"), "w.f32", 5);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "duplicate tensor name 'w.f32'", "offset", NULL);

    /* n_dims 0 and 5 */
    const uint32_t dims[] = {0, 5, 0xffffffffu};
    for (int i = 0; i < 3; i++) {
        memcpy(c, b, len);
        put_u32(c, tinfo_ndims(b, len, "w.q8b"), dims[i]);
        assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
        assert_msg_has(err.msg, "'w.q8b'", "n_dims", "offset", NULL);
    }
    /* a zero dimension; a shape whose element count overflows */
    memcpy(c, b, len);
    put_u64(c, tinfo_ne(b, len, "w.f16", 1), 0);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "'w.f16'", "ne[1] = 0", "offset", NULL);
    memcpy(c, b, len);
    put_u64(c, tinfo_ne(b, len, "w.f16", 0), 1ull << 62);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "'w.f16'", "overflows", NULL);
    memcpy(c, b, len);
    put_u64(c, tinfo_ne(b, len, "w.f16", 0), 1ull << 40); /* fits, but not in the file */
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "'w.f16'", "outside the file", NULL);
    /* Q8_0 whose rows are not whole blocks */
    memcpy(c, b, len);
    put_u64(c, tinfo_ne(b, len, "w.q8", 0), 48);
    assert_int_equal(open_bytes(c, len, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "'w.q8'", "q8_0", "48", "multiple of 32", NULL);
    free(c);
    free(b);
}

static void nested_arrays_skipped(void **state) {
    (void)state;
    hb_t h;
    kvp_err_t err;
    hb_header(&h, 0, 2);
    hb_str(&h, "n.nested");
    hb_u32(&h, KVP_GGUF_ARRAY);
    hb_u32(&h, KVP_GGUF_ARRAY);
    hb_u64(&h, 3);
    hb_u32(&h, KVP_GGUF_I32); /* [1, 2, 3] */
    hb_u64(&h, 3);
    hb_u32(&h, 1);
    hb_u32(&h, 2);
    hb_u32(&h, 3);
    hb_u32(&h, KVP_GGUF_U8); /* [] */
    hb_u64(&h, 0);
    hb_u32(&h, KVP_GGUF_STRING); /* ["x", "yz"] */
    hb_u64(&h, 2);
    hb_str(&h, "x");
    hb_str(&h, "yz");
    hb_str(&h, "n.after");
    hb_u32(&h, KVP_GGUF_U32);
    hb_u32(&h, 7);
    const char *p = tmp_path("nested.gguf");
    write_whole(p, h.b, h.n);
    kvp_gguf_t *g = NULL;
    int rc = kvp_gguf_open(&g, p, &err);
    if (rc) fail_msg("%s", err.msg);
    const kvp_gguf_kv_t *kv = must_find(g, "n.nested", KVP_GGUF_ARRAY);
    assert_int_equal(kv->v.arr.elem_type, KVP_GGUF_ARRAY);
    assert_int_equal(kv->v.arr.count, 3);
    assert_null(kv->v.arr.data);
    assert_null(kv->v.arr.strs);
    assert_int_equal(must_find(g, "n.after", KVP_GGUF_U32)->v.u64, 7);
    assert_int_equal(kvp_gguf_n_tensors(g), 0);
    /* a nested array cannot be copied (its elements are not kept) */
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    assert_int_equal(kvp_gguf_writer_copy_kv(w, kv), KVP_EUNSUPPORTED);
    kvp_gguf_writer_free(&w);
    kvp_gguf_free(&g);

    /* every truncation of it is refused */
    for (size_t cut = 0; cut < h.n; cut++)
        assert_int_equal(open_bytes(h.b, cut, &err), KVP_EFORMAT);

    /* a bad type inside a nested array */
    hb_header(&h, 0, 1);
    hb_str(&h, "n.bad");
    hb_u32(&h, KVP_GGUF_ARRAY);
    hb_u32(&h, KVP_GGUF_ARRAY);
    hb_u64(&h, 1);
    hb_u32(&h, 99);
    hb_u64(&h, 0);
    assert_int_equal(open_bytes(h.b, h.n, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "unknown value type 99", "'n.bad'", NULL);

    /* nesting 100 deep is refused, not recursed into */
    hb_header(&h, 0, 1);
    hb_str(&h, "n.deep");
    hb_u32(&h, KVP_GGUF_ARRAY);
    for (int i = 0; i < 100; i++) {
        hb_u32(&h, KVP_GGUF_ARRAY);
        hb_u64(&h, 1);
    }
    hb_u32(&h, KVP_GGUF_U8);
    hb_u64(&h, 0);
    assert_int_equal(open_bytes(h.b, h.n, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "nested deeper", "'n.deep'", NULL);

    /* a nested array count too large for the file */
    hb_header(&h, 0, 1);
    hb_str(&h, "n.big");
    hb_u32(&h, KVP_GGUF_ARRAY);
    hb_u32(&h, KVP_GGUF_ARRAY);
    hb_u64(&h, 1);
    hb_u32(&h, KVP_GGUF_STRING);
    hb_u64(&h, 1ull << 61);
    assert_int_equal(open_bytes(h.b, h.n, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "array count", "'n.big'", NULL);
}

static void not_a_file_refused(void **state) {
    (void)state;
    kvp_gguf_t *g = NULL;
    kvp_err_t err;
    assert_int_equal(kvp_gguf_open(&g, tmp_path("does-not-exist.gguf"), &err), KVP_EIO);
    assert_msg_has(err.msg, "does-not-exist.gguf", NULL);
    assert_null(g);
    assert_int_equal(kvp_gguf_open(&g, tmp_dir, &err), KVP_EIO);
    assert_msg_has(err.msg, "not a regular file", NULL);
    assert_int_equal(open_bytes("", 0, &err), KVP_EFORMAT);
    assert_msg_has(err.msg, "truncated at offset 0", "magic", "file is 0 bytes", NULL);
    /* a header-only file with no pairs and no tensors is valid */
    hb_t h;
    hb_header(&h, 0, 0);
    assert_int_equal(open_bytes(h.b, h.n, &err), 0);
}

/* Random damage to the header, metadata and tensor table: open either
 * refuses with a message or succeeds, and everything it then hands out is
 * readable (ASan checks the reads). */
static void random_damage_never_crashes(void **state) {
    (void)state;
    size_t len;
    uint8_t *b = ref_bytes(&len);
    kvp_gguf_t *g = NULL;
    kvp_err_t err;
    assert_int_equal(kvp_gguf_open(&g, tmp_path("ref.gguf"), &err), 0);
    size_t hdr = (size_t)kvp_gguf_data_offset(g);
    kvp_gguf_free(&g);
    uint8_t *c = malloc(len);
    assert_non_null(c);
    const char *p = tmp_path("fuzz.gguf");
    int opened = 0, refused = 0;
    for (int it = 0; it < 3000; it++) {
        memcpy(c, b, len);
        int flips = 1 + (int)(rng() % 4);
        for (int k = 0; k < flips; k++) {
            size_t at = (size_t)(rng() % hdr);
            switch (rng() % 4) {
            case 0:
                c[at] ^= (uint8_t)(1u << (rng() % 8));
                break;
            case 1:
                c[at] = (uint8_t)rng();
                break;
            case 2:
                c[at] = 0xff;
                break;
            default:
                c[at] = 0;
                break;
            }
        }
        size_t n = rng() % 8 == 0 ? (size_t)(rng() % len) : len;
        write_whole(p, c, n);
        memset(&err, 0, sizeof err);
        if (kvp_gguf_open(&g, p, &err) != 0) {
            assert_true(err.msg[0] != '\0');
            refused++;
            continue;
        }
        opened++;
        for (uint64_t i = 0; i < kvp_gguf_n_kv(g); i++) {
            const kvp_gguf_kv_t *kv = kvp_gguf_kv_at(g, i);
            volatile char sink = 0;
            for (uint64_t j = 0; j < kv->key.len; j++)
                sink ^= kv->key.ptr[j];
            if (kv->type == KVP_GGUF_ARRAY && kv->v.arr.strs)
                for (uint64_t j = 0; j < kv->v.arr.count; j++)
                    if (kv->v.arr.strs[j].len)
                        sink ^= kv->v.arr.strs[j].ptr[kv->v.arr.strs[j].len - 1];
            if (kv->type == KVP_GGUF_ARRAY && kv->v.arr.data)
                for (uint64_t j = 0; j < kv->v.arr.count; j++)
                    sink ^= (char)kvp_gguf_arr_i64(kv, j);
            (void)sink;
        }
        for (uint64_t i = 0; i < kvp_gguf_n_tensors(g); i++) {
            const kvp_gguf_tensor_t *t = kvp_gguf_tensor_at(g, i);
            float *y = malloc(t->n_elems * sizeof *y);
            assert_non_null(y);
            assert_int_equal(kvp_gguf_tensor_to_f32(t, y, &err), 0);
            free(y);
        }
        kvp_gguf_free(&g);
    }
    assert_true(refused > 0);
    print_message("random damage: %d opened, %d refused\n", opened, refused);
    free(c);
    free(b);
}

/* ------------------------------------------------------------------------ */
/* Real files: the tokenizer test vocabularies from llama.cpp */

static void reference_vocab_files(void **state) {
    (void)state;
    const char *dir = KVP_SHARED_DIR "/reference/vocab";
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        print_message("skipped: %s not found\n", dir);
        skip();
    }
    static const struct {
        const char *file, *model, *pre;
        uint64_t n_vocab;
    } files[] = {
        {"ggml-vocab-llama-spm.gguf", "llama", NULL, 32000},
        {"ggml-vocab-llama-bpe.gguf", "gpt2", "llama-bpe", 128256},
        {"ggml-vocab-gpt-2.gguf", "gpt2", "gpt-2", 50257},
    };
    for (size_t i = 0; i < 3; i++) {
        char path[1200];
        snprintf(path, sizeof path, "%s/%s", dir, files[i].file);
        kvp_gguf_t *g = NULL;
        kvp_err_t err = {0};
        int rc = kvp_gguf_open(&g, path, &err);
        if (rc) fail_msg("%s", err.msg);
        assert_int_equal(kvp_gguf_version(g), 3);
        assert_int_equal(kvp_gguf_n_tensors(g), 0);
        char s[64];
        assert_int_equal(kvp_gguf_get_str(g, "tokenizer.ggml.model", s, sizeof s, &err), 0);
        assert_string_equal(s, files[i].model);
        if (files[i].pre) {
            assert_int_equal(kvp_gguf_get_str(g, "tokenizer.ggml.pre", s, sizeof s, &err), 0);
            assert_string_equal(s, files[i].pre);
        }
        const kvp_gguf_kv_t *tok = NULL, *tt = NULL;
        assert_int_equal(kvp_gguf_get_arr(g, "tokenizer.ggml.tokens", KVP_GGUF_STRING, &tok, &err),
                         0);
        assert_int_equal(tok->v.arr.count, files[i].n_vocab);
        assert_int_equal(kvp_gguf_get_arr(g, "tokenizer.ggml.token_type", KVP_GGUF_I32, &tt, &err),
                         0);
        assert_int_equal(tt->v.arr.count, files[i].n_vocab);
        if (!strcmp(files[i].model, "llama")) {
            const kvp_gguf_kv_t *sc = NULL;
            assert_int_equal(kvp_gguf_get_arr(g, "tokenizer.ggml.scores", KVP_GGUF_F32, &sc, &err),
                             0);
            assert_int_equal(sc->v.arr.count, 32000);
            /* SentencePiece layout: <unk>, <s>, </s>, then the byte tokens */
            assert_int_equal(tok->v.arr.strs[1].len, 3);
            assert_memory_equal(tok->v.arr.strs[1].ptr, "<s>", 3);
            assert_memory_equal(tok->v.arr.strs[3].ptr, "<0x00>", 6);
            assert_int_equal(kvp_gguf_arr_i64(tt, 3), 6); /* byte token */
        } else {
            const kvp_gguf_kv_t *m = NULL;
            assert_int_equal(
                kvp_gguf_get_arr(g, "tokenizer.ggml.merges", KVP_GGUF_STRING, &m, &err), 0);
            assert_true(m->v.arr.count > 1000);
            assert_non_null(memchr(m->v.arr.strs[0].ptr, ' ', m->v.arr.strs[0].len));
        }
        kvp_gguf_free(&g);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(roundtrip_every_type),
        cmocka_unit_test(roundtrip_custom_alignment),
        cmocka_unit_test(typed_getters),
        cmocka_unit_test(copy_kv_roundtrip),
        cmocka_unit_test(writer_refuses_bad_input),
        cmocka_unit_test(truncated_files_refused),
        cmocka_unit_test(bad_header_refused),
        cmocka_unit_test(bad_metadata_refused),
        cmocka_unit_test(bad_tensor_info_refused),
        cmocka_unit_test(nested_arrays_skipped),
        cmocka_unit_test(not_a_file_refused),
        cmocka_unit_test(random_damage_never_crashes),
        cmocka_unit_test(reference_vocab_files),
    };
    return cmocka_run_group_tests(tests, setup_tmp, teardown_ref);
}
