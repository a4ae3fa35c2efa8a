#include "kvp_kvcache.h"

#include <stdlib.h>
#include <string.h>

#include "kvp_ops.h"

int kvp_kvcache_new(kvp_kvcache_t **out, int n_layer, int n_kv_head, int head_dim, int cap,
                    int rope_dim, const float *inv_freq, kvp_err_t *err) {
    *out = NULL;
    if (n_layer <= 0 || n_kv_head <= 0 || head_dim <= 0 || cap <= 0 || rope_dim < 0 ||
        rope_dim > head_dim || rope_dim % 2 || head_dim > 1024)
        return kvp_err_set(err, KVP_EINVAL,
                           "kv cache: bad shape (layers %d, kv heads %d, head dim %d, capacity "
                           "%d, rope dim %d)",
                           n_layer, n_kv_head, head_dim, cap, rope_dim);
    size_t n = (size_t)n_layer * n_kv_head * cap * head_dim;
    kvp_kvcache_t *c = calloc(1, sizeof *c);
    if (!c) return kvp_err_set(err, KVP_ENOMEM, "kv cache: out of memory");
    c->n_layer = n_layer;
    c->n_kv_head = n_kv_head;
    c->head_dim = head_dim;
    c->cap = cap;
    c->rope_dim = rope_dim;
    c->inv_freq = malloc(sizeof(float) * (size_t)(rope_dim / 2 + 1));
    c->rope_cs = malloc(sizeof(float) * ((size_t)cap * rope_dim + 1));
    c->k = calloc(n, sizeof(float));
    c->v = calloc(n, sizeof(float));
    if (!c->inv_freq || !c->rope_cs || !c->k || !c->v) {
        kvp_kvcache_free(&c);
        return kvp_err_set(err, KVP_ENOMEM, "kv cache: cannot allocate %zu MiB",
                           2 * n * sizeof(float) >> 20);
    }
    if (rope_dim) memcpy(c->inv_freq, inv_freq, sizeof(float) * (size_t)(rope_dim / 2));
    /* kvp_rope_table is what kvp_rope computes per call, so rows read or
     * written through the table are bit-identical to rotating with kvp_rope */
    for (int pos = 0; pos < cap && rope_dim; pos++)
        kvp_rope_table(c->rope_cs + (size_t)pos * rope_dim, rope_dim, pos, c->inv_freq);
    *out = c;
    return KVP_OK;
}

void kvp_kvcache_free(kvp_kvcache_t **c) {
    if (!c || !*c) return;
    free((*c)->inv_freq);
    free((*c)->rope_cs);
    free((*c)->k);
    free((*c)->v);
    free(*c);
    *c = NULL;
}

static size_t layer_stride(const kvp_kvcache_t *c) {
    return (size_t)c->n_kv_head * c->cap * c->head_dim;
}

float *kvp_kvcache_k(const kvp_kvcache_t *c, int layer) {
    return c->k + (size_t)layer * layer_stride(c);
}

float *kvp_kvcache_v(const kvp_kvcache_t *c, int layer) {
    return c->v + (size_t)layer * layer_stride(c);
}

/* Token-major row (heads concatenated) <-> head-major cache slots. */
static void scatter_row(const kvp_kvcache_t *c, float *base, int pos, const float *row) {
    for (int h = 0; h < c->n_kv_head; h++)
        memcpy(base + ((size_t)h * c->cap + pos) * c->head_dim, row + (size_t)h * c->head_dim,
               sizeof(float) * (size_t)c->head_dim);
}

static void gather_row(const kvp_kvcache_t *c, const float *base, int pos, float *row) {
    for (int h = 0; h < c->n_kv_head; h++)
        memcpy(row + (size_t)h * c->head_dim, base + ((size_t)h * c->cap + pos) * c->head_dim,
               sizeof(float) * (size_t)c->head_dim);
}

void kvp_kvcache_store(kvp_kvcache_t *c, int layer, int pos0, int n_tok, const float *k_rot,
                       int ld_k, const float *v, int ld_v) {
    float *kb = kvp_kvcache_k(c, layer), *vb = kvp_kvcache_v(c, layer);
    for (int t = 0; t < n_tok; t++) {
        scatter_row(c, kb, pos0 + t, k_rot + (size_t)t * ld_k);
        scatter_row(c, vb, pos0 + t, v + (size_t)t * ld_v);
    }
}

int kvp_kvcache_check_range(const kvp_kvcache_t *c, int layer, int pos0, int n_tok,
                            kvp_err_t *err) {
    if (layer < 0 || layer >= c->n_layer)
        return kvp_err_set(err, KVP_ERANGE, "kv cache: layer %d out of range [0, %d)", layer,
                           c->n_layer);
    if (pos0 < 0 || n_tok < 0 || pos0 > c->cap - n_tok)
        /* the end in long long: pos0 and n_tok come from callers (and the
         * wire) and their int sum can overflow */
        return kvp_err_set(err, KVP_ERANGE,
                           "kv cache: positions [%d, %lld) outside the capacity of %d", pos0,
                           (long long)pos0 + n_tok, c->cap);
    return KVP_OK;
}

const float *kvp_kvcache_rope_cs(const kvp_kvcache_t *c, int pos) {
    return c->rope_cs + (size_t)pos * c->rope_dim;
}

/* One key head: src (+ bias b, if any) rotated by the table cs into dst, in
 * one pass that the compiler vectorises (the pairs de-interleave into lanes);
 * the same products and sums as kvp_rope_apply, so the same bits. Dims past
 * rope_dim are copied. */
static void put_key_head(float *restrict dst, const float *restrict src, const float *restrict b,
                         const float *restrict cs, int hd, int rope_dim) {
    const int half = rope_dim / 2;
    const float *sn = cs + half;
    if (b)
        for (int i = 0; i < half; i++) {
            float x0 = src[2 * i] + b[2 * i], x1 = src[2 * i + 1] + b[2 * i + 1];
            dst[2 * i] = x0 * cs[i] - x1 * sn[i];
            dst[2 * i + 1] = x0 * sn[i] + x1 * cs[i];
        }
    else
        for (int i = 0; i < half; i++) {
            float x0 = src[2 * i], x1 = src[2 * i + 1];
            dst[2 * i] = x0 * cs[i] - x1 * sn[i];
            dst[2 * i + 1] = x0 * sn[i] + x1 * cs[i];
        }
    for (int i = rope_dim; i < hd; i++) /* not + 0 without a bias: -0 stays -0 */
        dst[i] = b ? src[i] + b[i] : src[i];
}

/* Rows of one layer's K or V into its head-major slots, plus bias, keys
 * rotated on the way. Token by token, so the rows are read in order (faster
 * than head by head when they are a wide sgemm output). */
static void put_rows(const kvp_kvcache_t *c, float *base, int pos0, int n_tok, const float *rows,
                     int ld, const float *bias, int rotate) {
    const int hd = c->head_dim;
    for (int t = 0; t < n_tok; t++) {
        const float *cs = kvp_kvcache_rope_cs(c, pos0 + t);
        for (int h = 0; h < c->n_kv_head; h++) {
            float *dst = base + ((size_t)h * c->cap + pos0 + t) * hd;
            const float *src = rows + (size_t)t * ld + (size_t)h * hd;
            const float *b = bias ? bias + (size_t)h * hd : NULL;
            if (rotate)
                put_key_head(dst, src, b, cs, hd, c->rope_dim);
            else if (b)
                for (int i = 0; i < hd; i++)
                    dst[i] = src[i] + b[i];
            else /* not + 0: that would turn -0 into +0 */
                memcpy(dst, src, sizeof(float) * (size_t)hd);
        }
    }
}

int kvp_kvcache_write_rows(kvp_kvcache_t *c, int layer, int pos0, int n_tok, const float *k,
                           int ld_k, const float *k_bias, const float *v, int ld_v,
                           const float *v_bias, kvp_err_t *err) {
    int rc = kvp_kvcache_check_range(c, layer, pos0, n_tok, err);
    if (rc) return rc;
    if (k) put_rows(c, kvp_kvcache_k(c, layer), pos0, n_tok, k, ld_k, k_bias, c->rope_dim > 0);
    if (v) put_rows(c, kvp_kvcache_v(c, layer), pos0, n_tok, v, ld_v, v_bias, 0);
    return KVP_OK;
}

int kvp_kvcache_write(kvp_kvcache_t *c, int layer, int pos0, int n_tok, const float *k,
                      const float *v, kvp_err_t *err) {
    const int width = c->n_kv_head * c->head_dim;
    return kvp_kvcache_write_rows(c, layer, pos0, n_tok, k, width, NULL, v, width, NULL, err);
}

int kvp_kvcache_read(const kvp_kvcache_t *c, int layer, int pos0, int n_tok, float *k, float *v,
                     kvp_err_t *err) {
    int rc = kvp_kvcache_check_range(c, layer, pos0, n_tok, err);
    if (rc) return rc;
    const int width = c->n_kv_head * c->head_dim;
    const float *kb = kvp_kvcache_k(c, layer), *vb = kvp_kvcache_v(c, layer);
    for (int t = 0; t < n_tok; t++) {
        if (k) {
            float *row = k + (size_t)t * width;
            gather_row(c, kb, pos0 + t, row);
            kvp_rope_apply(row, c->n_kv_head, c->head_dim, c->rope_dim,
                           kvp_kvcache_rope_cs(c, pos0 + t), -1.0f);
        }
        if (v) gather_row(c, vb, pos0 + t, v + (size_t)t * width);
    }
    return KVP_OK;
}

int kvp_kvcache_set_len(kvp_kvcache_t *c, int len, kvp_err_t *err) {
    if (len < 0 || len > c->cap)
        return kvp_err_set(err, KVP_ERANGE, "kv cache: length %d outside [0, %d]", len, c->cap);
    c->len = len;
    return KVP_OK;
}

size_t kvp_kvcache_bytes_per_token(const kvp_kvcache_t *c) {
    return 2 * sizeof(float) * (size_t)c->n_layer * c->n_kv_head * c->head_dim;
}
