/* kvp_matvec16: y = x W^T with W held in 16 bits (F16 or BF16) or in Q8_0
 * blocks, x and y in f32, accumulated in f32 — the matrix products of a
 * single-token forward step (decode, the base step of KV Prediction).
 *
 * Such a step reads every weight once and does two FLOPs with it, so it runs
 * at memory speed; 16-bit weights halve the bytes and so nearly halve the
 * time, Q8_0 (34 bytes for 32 weights) nearly halves them again. OpenBLAS
 * 0.3.21 has no 16-bit or 8-bit gemv, hence this module (named for the
 * 16-bit types it began with).
 *
 * Q8_0 weights are read as stored: each block's int8 are widened to f32
 * against x as it is (x is not quantised) and scaled by the block's d, so
 * the result is the product of the dequantised weights d * q, up to the
 * rounding of f32 sums.
 *
 * A kvp_matvec16_t is the runner: the kernel chosen for this CPU (AVX-512,
 * picked at run time, or plain C) and n_threads - 1 worker threads that
 * share each product with the caller. Output rows are handed out in chunks
 * from an atomic counter, so a worker that is late to start (being woken,
 * or its core busy) costs nothing: the caller takes the chunks it does not.
 * Each output is computed whole by one thread, in an order that does not
 * depend on which thread it is, so results are bit-identical whatever the
 * thread count (for one ISA: the plain and AVX-512 kernels add in different
 * orders). One that loses its core in the middle of a chunk makes the
 * caller wait for that chunk; after such a wait the caller works alone for
 * 0.1 s. Between products workers spin for 2 ms, then sleep until the next
 * product. One runner serves one caller thread at a time (it belongs to a
 * model context, as the activation buffers do). */
#ifndef KVP_MATVEC16_H
#define KVP_MATVEC16_H

#include <stdbool.h>
#include <stdint.h>

#include "kvp_err.h"
#include "kvp_gguf.h"

typedef enum kvp_mv16_isa {
    KVP_MV16_AUTO = 0, /* the fastest this CPU runs */
    KVP_MV16_PLAIN,    /* portable C (what the compiler vectorises) */
    KVP_MV16_AVX512,   /* AVX-512 F/BW/VL; needs a CPU that has it */
} kvp_mv16_isa_t;

typedef struct kvp_matvec16 kvp_matvec16_t;

/* Whether this CPU runs the AVX-512 kernel. */
bool kvp_matvec16_cpu_has_avx512(void);

/* n_threads counts the caller (1: no workers; <= 0 taken as 1). Asking for
 * AVX-512 on a CPU without it is KVP_EUNSUPPORTED. */
int kvp_matvec16_new(kvp_matvec16_t **out, int n_threads, kvp_mv16_isa_t isa, kvp_err_t *err);
void kvp_matvec16_free(kvp_matvec16_t **mv);

/* y[n_tok][n_out] = x[n_tok][n_in] * w[n_out][n_in]^T, w of `type`:
 * KVP_GGML_F16 or KVP_GGML_BF16 (n_out x n_in uint16_t; any other type but
 * Q8_0 is read as F16), or KVP_GGML_Q8_0 (n_out rows of n_in / 32 blocks of
 * 34 bytes each, as in a GGUF file; n_in must be a multiple of
 * KVP_Q8_0_BLOCK, which the caller checks). Any n_tok works; the weights
 * are read once per 4 tokens. */
void kvp_matvec16(kvp_matvec16_t *mv, float *y, const float *x, const void *w, kvp_ggml_type_t type,
                  int n_tok, int n_in, int n_out);

/* fn(arg, i) for every i in [0, n_items), shared among the caller and the
 * workers as the output rows of a product are (an atomic counter hands out
 * one item at a time; the same spin, sleep and work-alone rules); returns
 * when all are done. Each item runs whole on one thread, so results do not
 * depend on the thread count when items write disjoint memory. For work a
 * step does besides its products, such as attention over the cache, one
 * item per head. */
typedef void (*kvp_matvec16_item_fn)(void *arg, int item);
void kvp_matvec16_for(kvp_matvec16_t *mv, int n_items, kvp_matvec16_item_fn fn, void *arg);

int kvp_matvec16_threads(const kvp_matvec16_t *mv);
const char *kvp_matvec16_isa_name(const kvp_matvec16_t *mv); /* "avx512" or "plain" */

#endif
