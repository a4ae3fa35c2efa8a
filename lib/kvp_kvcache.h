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
 * kvp_kvcache_set_len(). */
#ifndef KVP_KVCACHE_H
#define KVP_KVCACHE_H

#include "kvp_err.h"

typedef struct kvp_kvcache {
    int n_layer, n_kv_head, head_dim, cap;
    int len;
    int rope_dim;
    float *inv_freq; /* [rope_dim / 2] */
    float *k, *v;    /* [n_layer][n_kv_head][cap][head_dim] each */
} kvp_kvcache_t;

/* inv_freq (rope_dim/2 values, see kvp_rope_inv_freq) is copied. */
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
/* Reads them back un-rotated, token-major. Either output may be NULL. */
int kvp_kvcache_read(const kvp_kvcache_t *c, int layer, int pos0, int n_tok, float *k, float *v,
                     kvp_err_t *err);

int kvp_kvcache_set_len(kvp_kvcache_t *c, int len, kvp_err_t *err);
/* Bytes of K+V per token over all layers (for sizing and wire limits). */
size_t kvp_kvcache_bytes_per_token(const kvp_kvcache_t *c);

#endif
