/* kvp_ops: the transformer's operators on plain float buffers.
 *
 * Shapes are in the argument names. Activations are token-major:
 * x[n_tok][n] is n_tok rows of n contiguous floats. Weights are row-major
 * [n_out][n_in], as GGUF stores them (ne = [n_in, n_out]). Every matrix
 * product goes through OpenBLAS. */
#ifndef KVP_OPS_H
#define KVP_OPS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* y[n_tok][n_out] = x[n_tok][n_in] * w[n_out][n_in]^T (sgemm; sgemv for one token) */
void kvp_matmul(float *y, const float *x, const float *w, int n_tok, int n_in, int n_out);

/* y = x / rms(x) * w for each of n_rows rows of n (y may alias x) */
void kvp_rmsnorm(float *y, const float *x, const float *w, int n_rows, int n, float eps);

/* x = softmax(x) over n values, in place */
void kvp_softmax(float *x, int n);

/* exp(x), vectorisable, relative error < 2e-7 for x in [-87, 88]; 0 below -87.3,
 * exp(88.3) above 88.3 (callers pass x - max, always <= 0). */
/* Cephes' expf polynomial on a range-reduced argument; written without
 * branches so that the compiler vectorises loops that call it (softmax over
 * attention scores is the only exp-heavy loop of the engine). */
static inline float kvp_expf(float x) {
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    float n = floorf(xc * log2e + 0.5f);
    float r = xc - n * ln2_hi - n * ln2_lo;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union {
        uint32_t u;
        float f;
    } s;
    s.u = (uint32_t)((int32_t)n + 127) << 23;
    float res = p * s.f;
    return x < -87.3f ? 0.0f : res;
}


/* Rotary position embedding in the "normal" (adjacent pairs) mode of the
 * llama architecture: for each of n_head heads of head_dim floats in x, the
 * pair (x[2i], x[2i+1]), 2i < rope_dim, turns by angle pos * inv_freq[i]
 * (times sign: +1 applies the embedding, -1 undoes it). */
void kvp_rope(float *x, int n_head, int head_dim, int rope_dim, int pos, const float *inv_freq,
              float sign);

/* The same rotation with the angles' cos/sin precomputed (cs = [rope_dim/2]
 * cosines then [rope_dim/2] sines, for one position): the forward pass makes
 * one table per position and uses it for every layer's queries and keys. */
void kvp_rope_table(float *cs, int rope_dim, int pos, const float *inv_freq);
void kvp_rope_apply(float *x, int n_head, int head_dim, int rope_dim, const float *cs, float sign);

/* inv_freq[i] = base^(-2i/rope_dim) / factors[i] (factors may be NULL), i < rope_dim/2 */
void kvp_rope_inv_freq(float *inv_freq, int rope_dim, float base, const float *factors);

/* out[i] = silu(gate[i]) * up[i] for n_rows rows of n; rows of gate and up are
 * ld_in apart, rows of out ld_out apart. */
void kvp_swiglu(float *out, int ld_out, const float *gate, const float *up, int ld_in, int n_rows,
                int n);

/* Causal grouped-query attention of n_tok query tokens at positions
 * pos0 .. pos0+n_tok-1 over a cache that holds positions 0 .. pos0+n_tok-1.
 *   q   [n_tok] rows of ld_q floats, head h at q + h*head_dim (rotated)
 *   k,v [n_kv_head][cap][head_dim] for one layer (keys rotated)
 *   out [n_tok] rows of ld_out floats, head h at out + h*head_dim
 *   scratch: kvp_attention_scratch(n_tok, pos0 + n_tok) floats
 * Query head h reads kv head h / (n_head / n_kv_head). */
void kvp_attention(float *out, int ld_out, const float *q, int ld_q, const float *k, const float *v,
                   int n_tok, int pos0, int n_head, int n_kv_head, int head_dim, int cap,
                   float *scratch);
size_t kvp_attention_scratch(int n_tok, int n_ctx);

/* The attention of one query row for one head, the unit a single-token step
 * shares among threads (one call per head, each on one thread):
 *   q      [head_dim] (rotated)
 *   kh, vh [n_ctx][head_dim]: the keys (rotated) and values of the head's kv
 *          head at positions 0 .. n_ctx-1 (the cache's layout for one kv head)
 *   out    [head_dim]
 *   scores n_ctx floats of scratch
 * Scores are scaled by 1/sqrt(head_dim). Every sum is in float in a fixed
 * order, so the result does not depend on which thread runs it. */
void kvp_attention_row(float *out, const float *q, const float *kh, const float *vh, int n_ctx,
                       int head_dim, float *scores);

#endif
