/* kvp_model: a Llama-family transformer — weights, loading from GGUF, saving
 * to GGUF, and the forward pass over a chunk of tokens.
 *
 * All weights live in one float arena (`params`), in a fixed order, so the
 * trainer can treat them as one vector. Q, K and V projections are stored
 * fused as one [n_q + 2*n_kv][n_embd] matrix and gate/up as one
 * [2*n_ff][n_embd] matrix: prefill then runs one large sgemm for each instead
 * of three or two smaller ones. The separate views (wq, wk, wv, w_gate, w_up)
 * point into them.
 *
 * A model may also hold a compact copy of its big matrices — wqkv, wo,
 * w_gate_up, w_down and the output head, in the same fused layouts — in a
 * second arena (`params16`), of one type (`type16`): F16 or BF16 values, or
 * Q8_0 blocks (an f16 scale and 32 int8, 34 bytes for 32 weights, rows laid
 * out as in a GGUF file). Single-token forward steps (decode, the base step
 * of KV Prediction) read the copy instead: such a step streams every weight
 * once, so half the bytes (16 bits) is nearly half the time, and Q8_0 nearly
 * halves them again. Everything else (prefill's sgemm, training, the
 * fingerprint) uses the f32 arena. Both copies hold the same values: a model
 * loaded from an F16/BF16/Q8_0 file gets the file's bits (the f32 arena its
 * conversion), and kvp_model_make_half() rounds or quantises the f32
 * weights before copying them.
 *
 * The arena counts 16-bit units whatever the type: a Q8_0 block is 17 of
 * them, which keeps every block's scale 2-byte aligned. Q8_0 blocks do not
 * cross rows, so a matrix whose rows (n_in) are not a multiple of 32 has no
 * Q8_0 copy: its pointer is NULL and its single-row products stay f32
 * sgemv. With F16/BF16 every matrix has a copy. */
#ifndef KVP_MODEL_H
#define KVP_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvp_err.h"
#include "kvp_gguf.h"
#include "kvp_kvcache.h"
#include "kvp_matvec16.h"

typedef struct kvp_model_config {
    int n_vocab;
    int n_embd;
    int n_layer;
    int n_head;
    int n_kv_head;
    int head_dim;
    int n_ff;
    int n_ctx_train;
    int rope_dim;
    float rope_base;
    float norm_eps;
    bool tied_output;
} kvp_model_config_t;

typedef struct kvp_layer {
    float *attn_norm;     /* [n_embd] */
    float *wqkv;          /* [n_q + 2*n_kv][n_embd] */
    float *wq, *wk, *wv;  /* views into wqkv */
    float *wo;            /* [n_embd][n_q] */
    float *ffn_norm;      /* [n_embd] */
    float *w_gate_up;     /* [2*n_ff][n_embd] */
    float *w_gate, *w_up; /* views into w_gate_up */
    float *w_down;        /* [n_embd][n_ff] */
    /* copies of wqkv, wo, w_gate_up, w_down in kvp_model_t.type16 (16-bit
     * values or Q8_0 blocks, see above); NULL without a copy */
    uint16_t *wqkv16, *wo16, *w_gate_up16, *w_down16;
} kvp_layer_t;

typedef struct kvp_model {
    kvp_model_config_t cfg;
    float *params; /* the arena */
    size_t n_params;
    float *tok_embd;    /* [n_vocab][n_embd] */
    float *output_norm; /* [n_embd] */
    float *output;      /* [n_vocab][n_embd]; == tok_embd when tied */
    kvp_layer_t *layers;
    float *inv_freq;        /* [rope_dim / 2] */
    uint16_t *params16;     /* the copy's arena, or NULL */
    size_t n_params16;      /* its size in 16-bit units */
    kvp_ggml_type_t type16; /* KVP_GGML_F16, _BF16 or _Q8_0 when params16 is set */
    uint16_t *output16;     /* copy of the output head [n_vocab][n_embd], or NULL */
} kvp_model_t;

/* Fills derived fields and checks a configuration. */
int kvp_model_config_check(kvp_model_config_t *cfg, kvp_err_t *err);

/* A model with the given shape: weights N(0, std) (std 0.02 if 0), norms 1. */
int kvp_model_new_random(kvp_model_t **out, const kvp_model_config_t *cfg, uint64_t seed, float std,
                         kvp_err_t *err);
/* Loads architecture `llama` from an open GGUF file (any of F32, F16, BF16,
 * Q8_0 tensors, converted to f32). Shapes are checked against the metadata.
 * When every big matrix (attention, feed-forward, output head) is F16, or
 * every one is BF16, or every one is Q8_0, their bits are also kept as the
 * model's compact copy. */
int kvp_model_from_gguf(kvp_model_t **out, const kvp_gguf_t *g, kvp_err_t *err);
int kvp_model_load(kvp_model_t **out, const char *path, kvp_err_t *err);
void kvp_model_free(kvp_model_t **m);

/* Gives a model compact weights of `type` for its single-token steps:
 * KVP_GGML_F16 or KVP_GGML_BF16 (16-bit values), or KVP_GGML_Q8_0 (blocks
 * quantised as llama.cpp's quantize_row_q8_0_reference: d = max|x| / 127,
 * q = round(x / d)). Rounds or quantises in place the f32 matrices that a
 * GGUF file of that type would store so (every 2-D tensor; norms stay f32),
 * then keeps the copy. The model then equals what writing it as `type` and
 * loading it back would give. For Q8_0, matrices whose rows are not a
 * multiple of 32 values stay f32, unrounded and without a copy (a Q8_0 file
 * cannot hold them); a model with no such matrix at all is KVP_EINVAL.
 * Replaces an existing copy. Call it before making contexts for the model
 * (kvp_model_ctx_new starts the kernel's threads only for a model that has
 * the copy). */
int kvp_model_make_half(kvp_model_t *m, kvp_ggml_type_t type, kvp_err_t *err);
/* Frees the copy: forward steps go back to the f32 weights. Anyone who
 * changes the f32 weights (training) calls this first, since the copy would
 * no longer match them. */
void kvp_model_drop_half(kvp_model_t *m);
/* Bytes of weights a single-token step streams: every matrix but the token
 * embedding (of which it reads one row), in its copy's type (2 bytes a
 * weight for F16/BF16, 34 per 32 for Q8_0) or 4 bytes without a copy. */
size_t kvp_model_step_weight_bytes(const kvp_model_t *m);

/* Adds the llama.* metadata and every tensor, stored as `type`, to w. The
 * caller adds the vocabulary (kvp_tokenizer_write_bytelevel) and writes. */
int kvp_model_to_gguf(const kvp_model_t *m, kvp_gguf_writer_t *w, kvp_ggml_type_t type,
                      kvp_err_t *err);

/* Matmul FLOPs of a forward pass over n_tok tokens after n_past cached ones
 * (2 per multiply-add; attention counted causally; logits for one token). */
double kvp_model_flops(const kvp_model_config_t *cfg, int n_past, int n_tok);

/* A 64-bit content fingerprint of the model — its configuration and every
 * weight as loaded (f32) — written as 16 hex digits into out[17]. Two files
 * holding the same weights agree; any changed weight or shape changes it.
 * Predictors and pipeline handshakes use it to refuse a mismatched pair. */
void kvp_model_fingerprint(const kvp_model_t *m, char out[17]);

/* A new KV cache of capacity cap for this model. */
int kvp_model_new_cache(const kvp_model_t *m, int cap, kvp_kvcache_t **out, kvp_err_t *err);

/* Run state: activation buffers for up to max_tok tokens at a time and
 * caches of capacity up to max_ctx, allocated once. */
typedef struct kvp_model_ctx kvp_model_ctx_t;

int kvp_model_ctx_new(kvp_model_ctx_t **out, const kvp_model_t *m, int max_tok, int max_ctx,
                      kvp_err_t *err);
void kvp_model_ctx_free(kvp_model_ctx_t **ctx);
const kvp_model_t *kvp_model_ctx_model(const kvp_model_ctx_t *ctx);
/* The compact-weight kernel's runner (kvp_matvec16.h: its ISA and thread
 * count), NULL when the model had no copy when the context was made. */
const kvp_matvec16_t *kvp_model_ctx_matvec16(const kvp_model_ctx_t *ctx);

typedef enum kvp_logits_mode {
    KVP_LOGITS_NONE = 0, /* only fill the cache */
    KVP_LOGITS_LAST = 1, /* logits [n_vocab] of the last token */
    KVP_LOGITS_ALL = 2,  /* logits [n_tok][n_vocab] */
} kvp_logits_mode_t;

/* Runs n_tok tokens at positions cache->len .. cache->len+n_tok-1, appends
 * their K/V to the cache (len grows by n_tok) and writes logits as asked.
 * Longer inputs than max_tok are processed in chunks of max_tok. Products
 * over a single row (a one-token chunk; the output head of one row) use the
 * compact copy of a matrix when the model has one, all others sgemm on the
 * f32 weights. */
int kvp_model_forward(kvp_model_ctx_t *ctx, kvp_kvcache_t *cache, const int32_t *tokens, int n_tok,
                      float *logits, kvp_logits_mode_t mode, kvp_err_t *err);

#endif
