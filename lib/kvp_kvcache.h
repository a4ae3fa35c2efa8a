/* kvp_kvcache: the KV cache of one sequence.
 *
 * Layout (docs/kv-cache.md): for each layer l, K and V are each
 *   [n_kv_head][cap][head_dim]   floats, contiguous,
 * so that one head's keys for positions 0..n-1 are one row-major matrix the
 * attention multiplies against directly. Keys are stored *rotated* (RoPE
 * applied), because attention reads them at every step; KV Prediction works
 * on keys *before* RoPE, so the public read/write functions take and give
 * un-rotated keys in token-major order [n_tok][n_kv_head * head_dim] and
 * rotate/unrotate with the cache's RoPE parameters.
 *
 * Positions [0, len) are valid. The model appends after len; a predicted
 * cache is placed with kvp_kvcache_write() and made valid with
 * kvp_kvcache_set_len().
 *
 * The cos/sin of every position's RoPE angles are computed once, when the
 * cache is made (rope_cs): reading or writing a layer then costs no
 * trigonometry, which would otherwise be paid again for every layer. */
#ifndef KVP_KVCACHE_H
#define KVP_KVCACHE_H

#include "kvp_err.h"

typedef struct kvp_kvcache {
    int n_layer, n_kv_head, head_dim, cap;
    int len;
    int rope_dim;
    float *inv_freq; /* [rope_dim / 2] */
    float *rope_cs;  /* [cap][rope_dim]: per position rope_dim/2 cosines then as many
                        sines (kvp_rope_table) */
    float *k, *v;    /* [n_layer][n_kv_head][cap][head_dim] each */
} kvp_kvcache_t;

/* inv_freq (rope_dim/2 values, see kvp_rope_inv_freq) is copied. Also
 * tabulates cos/sin for positions [0, cap): about 1 ms per 2048 positions at
 * rope_dim 64 — small next to filling the cache that many positions. */
int kvp_kvcache_new(kvp_kvcache_t **out, int n_layer, int n_kv_head, int head_dim, int cap,
                    int rope_dim, const float *inv_freq, kvp_err_t *err);
void kvp_kvcache_free(kvp_kvcache_t **c);

/* One layer's K or V base pointer: [n_kv_head][cap][head_dim]. */
float *kvp_kvcache_k(const kvp_kvcache_t *c, int layer);
float *kvp_kvcache_v(const kvp_kvcache_t *c, int layer);

/* Stores already-rotated keys and values of n_tok tokens at pos0.. (rows ld_k
 * and ld_v floats apart, heads concatenated): the model's own append path. */
void kvp_kvcache_store(kvp_kvcache_t *c, int layer, int pos0, int n_tok, const float *k_rot,
                       int ld_k, const float *v, int ld_v);

/* Writes un-rotated keys and values [n_tok][n_kv_head*head_dim] at positions
 * pos0 .. pos0+n_tok-1 of one layer; keys are rotated on the way in. Does not
 * change len. */
int kvp_kvcache_write(kvp_kvcache_t *c, int layer, int pos0, int n_tok, const float *k,
                      const float *v, kvp_err_t *err);
/* The same with strided rows and an optional bias: key row t is
 * k[t*ld_k .. +width) + k_bias (NULL: no bias), likewise for values; either
 * k or v may be NULL. The bias is added before the rotation, so this equals
 * adding it to the rows first and calling kvp_kvcache_write, in one pass over
 * the cache instead of two. */
int kvp_kvcache_write_rows(kvp_kvcache_t *c, int layer, int pos0, int n_tok, const float *k,
                           int ld_k, const float *k_bias, const float *v, int ld_v,
                           const float *v_bias, kvp_err_t *err);
/* Reads them back un-rotated, token-major. Either output may be NULL. */
int kvp_kvcache_read(const kvp_kvcache_t *c, int layer, int pos0, int n_tok, float *k, float *v,
                     kvp_err_t *err);

/* KVP_ERANGE unless layer and positions [pos0, pos0+n_tok) are in the cache:
 * for callers that must check a whole span before writing part of it. */
int kvp_kvcache_check_range(const kvp_kvcache_t *c, int layer, int pos0, int n_tok, kvp_err_t *err);

/* The RoPE cos/sin of position pos (rope_dim values, kvp_rope_apply's cs). */
const float *kvp_kvcache_rope_cs(const kvp_kvcache_t *c, int pos);

int kvp_kvcache_set_len(kvp_kvcache_t *c, int len, kvp_err_t *err);
/* Bytes of K+V per token over all layers (for sizing and wire limits). */
size_t kvp_kvcache_bytes_per_token(const kvp_kvcache_t *c);

#endif
