/* kvp_gguf: GGUF v3 reader (mmap) and writer.
 *
 * The reader maps the whole file, validates the header, every metadata pair
 * and every tensor info against the file size before anything else may use
 * them, and then hands out pointers into the mapping. Nothing it returns
 * outlives kvp_gguf_free(). See ../shared/reference/gguf.md and docs/formats.md.
 *
 * The writer collects metadata and tensors in memory and writes the file
 * atomically (temp file in the same directory + rename), so a reader never
 * sees a half-written model. */
#ifndef KVP_GGUF_H
#define KVP_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvp_err.h"

/* Metadata value types, as numbered in the file. */
typedef enum kvp_gguf_vtype {
    KVP_GGUF_U8 = 0,
    KVP_GGUF_I8 = 1,
    KVP_GGUF_U16 = 2,
    KVP_GGUF_I16 = 3,
    KVP_GGUF_U32 = 4,
    KVP_GGUF_I32 = 5,
    KVP_GGUF_F32 = 6,
    KVP_GGUF_BOOL = 7,
    KVP_GGUF_STRING = 8,
    KVP_GGUF_ARRAY = 9,
    KVP_GGUF_U64 = 10,
    KVP_GGUF_I64 = 11,
    KVP_GGUF_F64 = 12,
} kvp_gguf_vtype_t;

/* Tensor types kvpred reads and writes (ggml numbering). */
typedef enum kvp_ggml_type {
    KVP_GGML_F32 = 0,
    KVP_GGML_F16 = 1,
    KVP_GGML_Q8_0 = 8,
    KVP_GGML_BF16 = 30,
} kvp_ggml_type_t;

#define KVP_GGUF_MAX_DIMS 4
#define KVP_GGUF_DEFAULT_ALIGNMENT 32
#define KVP_Q8_0_BLOCK 32 /* values per Q8_0 block; 34 bytes per block */

/* A string inside the mapping: not NUL-terminated. */
typedef struct kvp_gguf_str {
    const char *ptr;
    uint64_t len;
} kvp_gguf_str_t;

/* One metadata pair. Scalars are widened into the union; arrays point into the
 * mapping (fixed-size element types) or into an index of strings the reader
 * builds once (string arrays). Nested arrays are validated and skipped:
 * arr.data is NULL for them. */
typedef struct kvp_gguf_kv {
    kvp_gguf_str_t key;
    kvp_gguf_vtype_t type;
    union {
        uint64_t u64; /* U8 U16 U32 U64 BOOL */
        int64_t i64;  /* I8 I16 I32 I64 */
        double f64;   /* F32 F64 */
        kvp_gguf_str_t str;
        struct {
            kvp_gguf_vtype_t elem_type;
            uint64_t count;
            /* raw little-endian elements (fixed-size types); may be unaligned:
             * read them with kvp_gguf_arr_i64/_f64 or memcpy */
            const void *data;
            const kvp_gguf_str_t *strs; /* for STRING arrays: count entries */
        } arr;
    } v;
} kvp_gguf_kv_t;

typedef struct kvp_gguf_tensor {
    kvp_gguf_str_t name;
    uint32_t n_dims;
    uint64_t ne[KVP_GGUF_MAX_DIMS]; /* ne[0] fastest-varying; unused dims are 1 */
    kvp_ggml_type_t type;
    uint64_t offset;  /* from the start of the data section */
    const void *data; /* into the mapping */
    uint64_t nbytes;
    uint64_t n_elems;
} kvp_gguf_tensor_t;

typedef struct kvp_gguf kvp_gguf_t;

/* Opens and validates path. On error *out is NULL and err names the problem
 * with its byte offset (and key or tensor name where there is one). */
int kvp_gguf_open(kvp_gguf_t **out, const char *path, kvp_err_t *err);
void kvp_gguf_free(kvp_gguf_t **g);

uint32_t kvp_gguf_version(const kvp_gguf_t *g);
uint32_t kvp_gguf_alignment(const kvp_gguf_t *g);
const char *kvp_gguf_path(const kvp_gguf_t *g);
uint64_t kvp_gguf_file_size(const kvp_gguf_t *g);
/* File offset where the data section starts (tensor offsets are relative to it). */
uint64_t kvp_gguf_data_offset(const kvp_gguf_t *g);

/* Metadata */
uint64_t kvp_gguf_n_kv(const kvp_gguf_t *g);
const kvp_gguf_kv_t *kvp_gguf_kv_at(const kvp_gguf_t *g, uint64_t i);
const kvp_gguf_kv_t *kvp_gguf_find(const kvp_gguf_t *g, const char *key); /* NULL if absent */

/* Typed getters. Integer getters accept any integer type whose value fits
 * (and BOOL); float getters accept F32/F64 and integers. They return
 * KVP_ERANGE if the key is absent (err says "missing key K"), KVP_EFORMAT if
 * the type does not fit (err names the key, wanted and actual type). */
int kvp_gguf_get_u32(const kvp_gguf_t *g, const char *key, uint32_t *out, kvp_err_t *err);
int kvp_gguf_get_u64(const kvp_gguf_t *g, const char *key, uint64_t *out, kvp_err_t *err);
int kvp_gguf_get_i64(const kvp_gguf_t *g, const char *key, int64_t *out, kvp_err_t *err);
int kvp_gguf_get_f32(const kvp_gguf_t *g, const char *key, float *out, kvp_err_t *err);
int kvp_gguf_get_bool(const kvp_gguf_t *g, const char *key, bool *out, kvp_err_t *err);
/* Copies a STRING value into buf (NUL-terminated); KVP_ERANGE if it does not fit. */
int kvp_gguf_get_str(const kvp_gguf_t *g, const char *key, char *buf, size_t cap, kvp_err_t *err);
/* The same with defaults: absent key -> *out = def, return 0; wrong type -> error. */
int kvp_gguf_get_u32_or(const kvp_gguf_t *g, const char *key, uint32_t def, uint32_t *out,
                        kvp_err_t *err);
int kvp_gguf_get_f32_or(const kvp_gguf_t *g, const char *key, float def, float *out,
                        kvp_err_t *err);
int kvp_gguf_get_bool_or(const kvp_gguf_t *g, const char *key, bool def, bool *out,
                         kvp_err_t *err);
/* Finds an ARRAY value with the given element type (any integer type of the same
 * width is accepted for integers). *out_kv points at the pair. */
int kvp_gguf_get_arr(const kvp_gguf_t *g, const char *key, kvp_gguf_vtype_t elem_type,
                     const kvp_gguf_kv_t **out_kv, kvp_err_t *err);
/* Element i of an integer or float array, widened (any numeric element type). */
int64_t kvp_gguf_arr_i64(const kvp_gguf_kv_t *kv, uint64_t i);
double kvp_gguf_arr_f64(const kvp_gguf_kv_t *kv, uint64_t i);

/* Names for messages and `kvpred info`. */
const char *kvp_gguf_vtype_name(kvp_gguf_vtype_t t);
const char *kvp_ggml_type_name(kvp_ggml_type_t t);

/* Tensors */
uint64_t kvp_gguf_n_tensors(const kvp_gguf_t *g);
const kvp_gguf_tensor_t *kvp_gguf_tensor_at(const kvp_gguf_t *g, uint64_t i);
const kvp_gguf_tensor_t *kvp_gguf_find_tensor(const kvp_gguf_t *g, const char *name);

/* Bytes needed to store n values of type t (n a multiple of 32 for Q8_0);
 * 0 for an unsupported type. */
uint64_t kvp_ggml_type_nbytes(kvp_ggml_type_t t, uint64_t n);

/* Dequantises/converts the whole tensor into dst (t->n_elems floats). */
int kvp_gguf_tensor_to_f32(const kvp_gguf_tensor_t *t, float *dst, kvp_err_t *err);

/* Writer */
typedef struct kvp_gguf_writer kvp_gguf_writer_t;

kvp_gguf_writer_t *kvp_gguf_writer_new(void);
void kvp_gguf_writer_free(kvp_gguf_writer_t **w);

/* Setters copy their arguments. Setting a key twice replaces the value. */
int kvp_gguf_writer_set_u32(kvp_gguf_writer_t *w, const char *key, uint32_t v);
int kvp_gguf_writer_set_i32(kvp_gguf_writer_t *w, const char *key, int32_t v);
int kvp_gguf_writer_set_u64(kvp_gguf_writer_t *w, const char *key, uint64_t v);
int kvp_gguf_writer_set_f32(kvp_gguf_writer_t *w, const char *key, float v);
int kvp_gguf_writer_set_bool(kvp_gguf_writer_t *w, const char *key, bool v);
int kvp_gguf_writer_set_str(kvp_gguf_writer_t *w, const char *key, const char *v);
/* Any scalar type, value given as raw little-endian bytes of that type (for tests
 * that need every type, and for copying pairs from one file to another). */
int kvp_gguf_writer_set_raw(kvp_gguf_writer_t *w, const char *key, kvp_gguf_vtype_t type,
                            const void *v);
int kvp_gguf_writer_set_arr_i32(kvp_gguf_writer_t *w, const char *key, const int32_t *v,
                                uint64_t n);
int kvp_gguf_writer_set_arr_f32(kvp_gguf_writer_t *w, const char *key, const float *v,
                                uint64_t n);
/* An array of any fixed-size element type (not STRING or ARRAY), elements given
 * as n raw little-endian values of that type. */
int kvp_gguf_writer_set_arr_raw(kvp_gguf_writer_t *w, const char *key, kvp_gguf_vtype_t elem_type,
                                const void *v, uint64_t n);
int kvp_gguf_writer_set_arr_str(kvp_gguf_writer_t *w, const char *key, const char *const *v,
                                uint64_t n);
/* Copies one pair (any type, arrays included) read from another file. */
int kvp_gguf_writer_copy_kv(kvp_gguf_writer_t *w, const kvp_gguf_kv_t *kv);

/* Adds a tensor converted from f32 data to `type` (F32, F16, BF16 or Q8_0,
 * round-to-nearest-even). ne has n_dims entries, ne[0] fastest. */
int kvp_gguf_writer_add_tensor(kvp_gguf_writer_t *w, const char *name, uint32_t n_dims,
                               const uint64_t *ne, kvp_ggml_type_t type, const float *data,
                               kvp_err_t *err);
/* Adds a tensor whose bytes are already in `type` (copied). */
int kvp_gguf_writer_add_tensor_raw(kvp_gguf_writer_t *w, const char *name, uint32_t n_dims,
                                   const uint64_t *ne, kvp_ggml_type_t type, const void *bytes,
                                   kvp_err_t *err);

/* Writes the file (general.alignment if set, else 32) via temp file + rename. */
int kvp_gguf_writer_write(const kvp_gguf_writer_t *w, const char *path, kvp_err_t *err);

#endif
