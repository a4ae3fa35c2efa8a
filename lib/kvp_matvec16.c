#include "kvp_matvec16.h"

#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_time.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KVP_MV16_HAVE_AVX512 1
#endif

/* Output rows handed out at a time: 32 rows of a 768-wide matrix are 48 KB
 * of weights, long enough to make the atomic counter's cost vanish, short
 * enough that the last chunks balance the threads. 32 floats of y are two
 * cache lines, so threads do not write into each other's lines (given a
 * 64-byte aligned y). */
enum { CHUNK_ROWS = 32 };

/* How long an idle worker spins before it sleeps: longer than the gaps
 * between the products of one token (norms, RoPE; attention, ~1.2 ms a layer
 * at 2048 positions for the 110M model) and between the tokens of a
 * generation (sampling), so that a decoding worker needs no wake-up call.
 * Not much longer: a worker spinning (or, as tried, polling in 0.1 ms naps)
 * through a prefill slowed OpenBLAS's sgemm there by 10-15%. */
enum { SPIN_US = 2000 };

/* A caller that had to wait this long for a worker's chunk (a chunk takes a
 * few microseconds) waited for a worker that lost its core mid-chunk: to
 * another process, or to OpenBLAS's pool, whose idle threads spin (yielding)
 * for ~0.1 s after each call, so right after a prefill a third thread wants
 * one of two cores. The runner then works alone for SOLO_MS, about that
 * spin: the caller alone (9.4-11.7 ms for the 110M model's step after a
 * 512-token KV-Prediction prefill) beats sharing the product with a worker
 * that gets a core only some of the time (15-19 ms in half the runs without
 * this rule). */
enum { STALL_US = 200, SOLO_MS = 100 };

/* Bytes of a Q8_0 block: an f16 scale, then KVP_Q8_0_BLOCK int8. */
enum { Q8_BYTES = 2 + KVP_Q8_0_BLOCK };

/* The weight types a kernel distinguishes. */
typedef enum wtype { W_F16, W_BF16, W_Q8 } wtype_t;

/* rows [r0, r1) of y[n_tok][ldy] = x[n_tok][n_in] * w[][n_in]^T */
typedef void (*rows_fn)(float *y, int ldy, const float *x, int n_tok, const void *w, int n_in,
                        int r0, int r1, wtype_t wt);

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* ---- plain C ---------------------------------------------------------- */

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Exact half -> float without branches, so that the dot loop vectorises:
 * shifting exponent and mantissa into place and multiplying by 2^112
 * rebiases the exponent and normalises subnormals in one exact step; values
 * that were inf/NaN come out >= 2^16 and get the all-ones exponent back.
 * Agrees bit for bit with kvp_f16_to_f32 (tests check all 65536). */
static inline float f16_to_f32(uint16_t h) {
    float f = float_of((uint32_t)(h & 0x7fff) << 13) * 0x1p112f;
    uint32_t u = bits_of(f);
    u |= f >= 65536.0f ? 0x7f800000u : 0;
    return float_of(u | (uint32_t)(h & 0x8000) << 16);
}

static inline float bf16_to_f32(uint16_t h) {
    return float_of((uint32_t)h << 16);
}

/* Eight partial sums, so the compiler may keep them in one vector without
 * reassociating anything itself. */
static float plain_dot(const uint16_t *w, const float *x, int n, bool bf16) {
    float s[8] = {0};
    int k = 0;
    for (; k + 8 <= n; k += 8)
        for (int j = 0; j < 8; j++)
            s[j] += (bf16 ? bf16_to_f32(w[k + j]) : f16_to_f32(w[k + j])) * x[k + j];
    float tail = 0.0f;
    for (; k < n; k++)
        tail += (bf16 ? bf16_to_f32(w[k]) : f16_to_f32(w[k])) * x[k];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

/* The scale of the Q8_0 block at b (little-endian f16, read bytewise: the
 * kernel does not rely on the caller's alignment). */
static inline uint16_t q8_scale_bits(const uint8_t *b) {
    return (uint16_t)(b[0] | b[1] << 8);
}

/* A Q8_0 row against x, n a multiple of 32: each block dequantised (d * q is
 * exact in f32: 11 bits of d times 8 of q) and added into the same eight
 * partial sums as plain_dot. */
static float plain_dot_q8(const uint8_t *b, const float *x, int n) {
    float s[8] = {0};
    for (int k = 0; k < n; k += KVP_Q8_0_BLOCK, b += Q8_BYTES) {
        float d = f16_to_f32(q8_scale_bits(b));
        const int8_t *q = (const int8_t *)(b + 2);
        for (int j = 0; j < KVP_Q8_0_BLOCK; j += 8)
            for (int i = 0; i < 8; i++)
                s[i] += d * (float)q[j + i] * x[k + j + i];
    }
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

static void plain_rows(float *y, int ldy, const float *x, int n_tok, const void *w, int n_in,
                       int r0, int r1, wtype_t wt) {
    if (wt == W_Q8) {
        const size_t row_bytes = (size_t)n_in / KVP_Q8_0_BLOCK * Q8_BYTES;
        for (int r = r0; r < r1; r++)
            for (int t = 0; t < n_tok; t++)
                y[(size_t)t * ldy + r] = plain_dot_q8((const uint8_t *)w + (size_t)r * row_bytes,
                                                      x + (size_t)t * n_in, n_in);
        return;
    }
    const uint16_t *w16 = w;
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < n_tok; t++)
            y[(size_t)t * ldy + r] =
                plain_dot(w16 + (size_t)r * n_in, x + (size_t)t * n_in, n_in, wt == W_BF16);
}

/* ---- AVX-512 ---------------------------------------------------------- */

#ifdef KVP_MV16_HAVE_AVX512
/* Compiled for AVX-512 whatever the build's -march, and only called after
 * kvp_matvec16_cpu_has_avx512() said yes. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define INLINE static inline __attribute__((always_inline))

/* 16 weights to f32: F16 by the hardware conversion, BF16 by moving its
 * bits into the high half of each 32-bit lane. */
INLINE AVX512 __m512 widen16(__m256i h, bool bf16) {
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                : _mm512_cvtph_ps(h);
}

/* One weight row against T token rows (T <= 4): each weight vector is loaded
 * and widened once and used T times. One row at a time keeps the weights a
 * single linear stream, which the hardware prefetcher follows at full memory
 * speed; interleaving four rows (four streams 1.5 KB apart) measured at half
 * of it. Two accumulators per token hide the FMA latency. T is a constant
 * after inlining and the token loops unroll completely (-O3 does it unasked,
 * -O2 needs the pragma), so acc lives in registers. */
INLINE AVX512 void avx512_row(float *y, int ldy, const float *x, int K, const uint16_t *w, int T,
                              bool bf16) {
    __m512 acc[4][2];
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
        acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 w0 = widen16(_mm256_loadu_si256((const __m256i *)(w + k)), bf16);
        __m512 w1 = widen16(_mm256_loadu_si256((const __m256i *)(w + k + 16)), bf16);
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * K + k;
            acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xt), acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xt + 16), acc[t][1]);
        }
    }
    if (k + 16 <= K) {
        __m512 w0 = widen16(_mm256_loadu_si256((const __m256i *)(w + k)), bf16);
#pragma GCC unroll 4
        for (int t = 0; t < T; t++)
            acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + (size_t)t * K + k), acc[t][0]);
        k += 16;
    }
    if (k < K) { /* the last K % 16 columns, through masked loads (zeros beyond) */
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
        __m512 w0 = widen16(_mm256_maskz_loadu_epi16(m, w + k), bf16);
#pragma GCC unroll 4
        for (int t = 0; t < T; t++)
            acc[t][1] =
                _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x + (size_t)t * K + k), acc[t][1]);
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
        y[(size_t)t * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}

INLINE AVX512 void avx512_rows_t(float *y, int ldy, const float *x, int K, const uint16_t *w,
                                 int r0, int r1, int T, bool bf16) {
    for (int r = r0; r < r1; r++)
        avx512_row(y + r, ldy, x, K, w + (size_t)r * K, T, bf16);
}

/* 16 int8 weights to f32 (sign-extended from memory in one instruction). */
INLINE AVX512 __m512 widen_q8(const uint8_t *q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
}

/* The scale of the Q8_0 block at b, in every lane. */
INLINE AVX512 __m512 q8_scale(const uint8_t *b) {
    return _mm512_cvtph_ps(_mm256_set1_epi16((short)q8_scale_bits(b)));
}

/* A Q8_0 row against T token rows, as avx512_row: a block's 32 int8 are
 * widened to f32 once and used T times. Each block's dot product with x is
 * summed unscaled, then added to the accumulator times the block's scale d:
 * one FMA-unit operation fewer per block and token than scaling the weights
 * first (measured 21.3 against 18.7 G weights/s on one Zen 4 core with the
 * matrix in cache; the conversions, not memory, bound this kernel on one
 * core). q * x is exact in the one-hot case, and the sum differs from that
 * of the dequantised weights only in rounding. Blocks alternate between two
 * accumulators per token, which hides the FMA latency of the scaled adds.
 * K is a multiple of 32: there is no tail of columns. */
INLINE AVX512 void avx512_q8_row(float *y, int ldy, const float *x, int K, const uint8_t *b,
                                 int T) {
    __m512 acc[4][2];
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
        acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 2 * KVP_Q8_0_BLOCK <= K; k += 2 * KVP_Q8_0_BLOCK, b += 2 * Q8_BYTES) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const uint8_t *bh = b + h * Q8_BYTES;
            __m512 q0 = widen_q8(bh + 2), q1 = widen_q8(bh + 18), d = q8_scale(bh);
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                const float *xt = x + (size_t)t * K + k + h * KVP_Q8_0_BLOCK;
                __m512 s = _mm512_mul_ps(q0, _mm512_loadu_ps(xt));
                s = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xt + 16), s);
                acc[t][h] = _mm512_fmadd_ps(d, s, acc[t][h]);
            }
        }
    }
    if (k < K) { /* an odd number of blocks: the last one */
        __m512 q0 = widen_q8(b + 2), q1 = widen_q8(b + 18), d = q8_scale(b);
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * K + k;
            __m512 s = _mm512_mul_ps(q0, _mm512_loadu_ps(xt));
            s = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xt + 16), s);
            acc[t][0] = _mm512_fmadd_ps(d, s, acc[t][0]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
        y[(size_t)t * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}

INLINE AVX512 void avx512_q8_rows_t(float *y, int ldy, const float *x, int K, const uint8_t *w,
                                    int r0, int r1, int T) {
    const size_t row_bytes = (size_t)K / KVP_Q8_0_BLOCK * Q8_BYTES;
    for (int r = r0; r < r1; r++)
        avx512_q8_row(y + r, ldy, x, K, w + (size_t)r * row_bytes, T);
}

/* Tiles of up to 4 tokens, one inlined copy per tile height so that the
 * token loops unroll with constant bounds. */
static AVX512 void avx512_q8_rows(float *y, int ldy, const float *x, int n_tok, const uint8_t *w,
                                  int K, int r0, int r1) {
    for (int t0 = 0; t0 < n_tok; t0 += 4) {
        float *yt = y + (size_t)t0 * ldy;
        const float *xt = x + (size_t)t0 * K;
        switch (n_tok - t0 < 4 ? n_tok - t0 : 4) {
        case 1:
            avx512_q8_rows_t(yt, ldy, xt, K, w, r0, r1, 1);
            break;
        case 2:
            avx512_q8_rows_t(yt, ldy, xt, K, w, r0, r1, 2);
            break;
        case 3:
            avx512_q8_rows_t(yt, ldy, xt, K, w, r0, r1, 3);
            break;
        default:
            avx512_q8_rows_t(yt, ldy, xt, K, w, r0, r1, 4);
            break;
        }
    }
}

static AVX512 void avx512_rows(float *y, int ldy, const float *x, int n_tok, const void *wv, int K,
                               int r0, int r1, wtype_t wt) {
    if (wt == W_Q8) {
        avx512_q8_rows(y, ldy, x, n_tok, wv, K, r0, r1);
        return;
    }
    const uint16_t *w = wv;
    const bool bf16 = wt == W_BF16;
    for (int t0 = 0; t0 < n_tok; t0 += 4) {
        float *yt = y + (size_t)t0 * ldy;
        const float *xt = x + (size_t)t0 * K;
        int T = n_tok - t0 < 4 ? n_tok - t0 : 4;
        /* one inlined copy per (T, type), so every loop bound is a constant */
        switch (T * 2 + bf16) {
        case 2:
            avx512_rows_t(yt, ldy, xt, K, w, r0, r1, 1, false);
            break;
        case 3:
            avx512_rows_t(yt, ldy, xt, K, w, r0, r1, 1, true);
            break;
        case 4:
            avx512_rows_t(yt, ldy, xt, K, w, r0, r1, 2, false);
            break;
        case 5:
            avx512_rows_t(yt, ldy, xt, K, w, r0, r1, 2, true);
            break;
        case 6:
            avx512_rows_t(yt, ldy, xt, K, w, r0, r1, 3, false);
            break;
        case 7:
            avx512_rows_t(yt, ldy, xt, K, w, r0, r1, 3, true);
            break;
        case 8:
            avx512_rows_t(yt, ldy, xt, K, w, r0, r1, 4, false);
            break;
        default:
            avx512_rows_t(yt, ldy, xt, K, w, r0, r1, 4, true);
            break;
        }
    }
}
#endif

bool kvp_matvec16_cpu_has_avx512(void) {
#ifdef KVP_MV16_HAVE_AVX512
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#else
    return false;
#endif
}

/* ---- the runner ------------------------------------------------------- */

/* A product (fn NULL: chunks of output rows) or a parallel-for (fn: one
 * item a chunk). */
typedef struct job {
    float *y;
    const float *x;
    const void *w;
    wtype_t wt;
    int n_tok, n_in, n_out, n_chunks;
    kvp_matvec16_item_fn fn;
    void *arg;
} job_t;

/* The caller writes `job` only while no worker can read it: `open` is false
 * and no worker is `busy`. A worker announces itself in `busy` before it
 * looks at `open`; the caller clears `open` before it waits for `busy` to
 * drain. Both sides use sequentially consistent operations for this, so at
 * least one of them sees the other: a worker either joins the job it saw
 * open (whose fields stay put until it leaves) or stays out. */
struct kvp_matvec16 {
    kvp_mv16_isa_t isa;
    rows_fn rows;
    int n_threads;
    int n_workers; /* threads started, n_threads - 1 unless start-up failed */
    pthread_t *workers;
    double solo_until; /* kvp_now() before which the caller works alone */
    job_t job;
    /* Each counter on its own cache line: the spinning workers read `gen`
     * all the time, and next/done change with every chunk; sharing a line
     * would make every claim a cross-core miss (the two vCPUs of a VM may sit
     * on different CCDs). */
    alignas(64) atomic_uint gen; /* bumped for every job and for shutdown */
    atomic_bool open, stop;
    alignas(64) atomic_int next;
    alignas(64) atomic_int done;
    alignas(64) atomic_int busy;
    atomic_int sleepers;
    alignas(64) pthread_mutex_t mu;
    pthread_cond_t cv;
};

static void run_chunk(const kvp_matvec16_t *mv, const job_t *j, int c) {
    if (j->fn) {
        j->fn(j->arg, c);
        return;
    }
    int r0 = c * CHUNK_ROWS, r1 = r0 + CHUNK_ROWS < j->n_out ? r0 + CHUNK_ROWS : j->n_out;
    mv->rows(j->y, j->n_out, j->x, j->n_tok, j->w, j->n_in, r0, r1, j->wt);
}

/* Takes chunks of the current job until none is left; returns how many this
 * thread ran. */
static int run_chunks(kvp_matvec16_t *mv) {
    const job_t *j = &mv->job;
    int c, n = 0;
    while ((c = atomic_fetch_add_explicit(&mv->next, 1, memory_order_relaxed)) < j->n_chunks) {
        run_chunk(mv, j, c);
        atomic_fetch_add_explicit(&mv->done, 1, memory_order_release);
        n++;
    }
    return n;
}

/* Returns the first generation different from `seen`: spinning first, then
 * asleep on the condition variable. The spin yields the core every 64 turns:
 * a worker the scheduler put beside the caller (or beside OpenBLAS's pool)
 * then hands the core over at once instead of holding it for a time slice.
 * Without the yield the KV-Prediction base step of the 110M model took
 * 15-18 ms instead of 8-10 in about half the runs after a 128-token prompt
 * (44-51 ms instead of 22-25 after 2048), and decode ran at 90-98 tokens/s
 * instead of 100-104. */
static unsigned wait_for_job(kvp_matvec16_t *mv, unsigned seen) {
    double t0 = kvp_now();
    unsigned g;
    for (unsigned i = 1;; i++) {
        if ((g = atomic_load_explicit(&mv->gen, memory_order_acquire)) != seen) return g;
        cpu_relax();
        if (i % 64 == 0) {
            if (kvp_now() - t0 > SPIN_US * 1e-6) break;
            sched_yield();
        }
    }
    pthread_mutex_lock(&mv->mu);
    atomic_fetch_add(&mv->sleepers, 1);
    while ((g = atomic_load(&mv->gen)) == seen)
        pthread_cond_wait(&mv->cv, &mv->mu);
    atomic_fetch_sub(&mv->sleepers, 1);
    pthread_mutex_unlock(&mv->mu);
    return g;
}

static void *worker_main(void *arg) {
    kvp_matvec16_t *mv = arg;
    /* gen was 0 when the workers were made: a job or a shutdown that came
     * before this thread first ran still counts as new */
    unsigned seen = 0;
    for (;;) {
        seen = wait_for_job(mv, seen);
        if (atomic_load(&mv->stop)) return NULL;
        atomic_fetch_add(&mv->busy, 1);
        if (atomic_load(&mv->open)) run_chunks(mv);
        atomic_fetch_sub_explicit(&mv->busy, 1, memory_order_release);
    }
}

static void wake_workers(kvp_matvec16_t *mv) {
    if (atomic_load(&mv->sleepers) == 0) return;
    pthread_mutex_lock(&mv->mu);
    pthread_cond_broadcast(&mv->cv);
    pthread_mutex_unlock(&mv->mu);
}

int kvp_matvec16_new(kvp_matvec16_t **out, int n_threads, kvp_mv16_isa_t isa, kvp_err_t *err) {
    *out = NULL;
    bool simd = kvp_matvec16_cpu_has_avx512();
    if (isa == KVP_MV16_AVX512 && !simd)
        return kvp_err_set(err, KVP_EUNSUPPORTED, "16-bit matvec: this CPU has no AVX-512");
    /* sizeof is a multiple of the 64-byte alignment, as aligned_alloc wants */
    kvp_matvec16_t *mv = aligned_alloc(alignof(kvp_matvec16_t), sizeof *mv);
    if (!mv) return kvp_err_set(err, KVP_ENOMEM, "16-bit matvec: out of memory");
    memset(mv, 0, sizeof *mv);
    mv->isa = isa == KVP_MV16_AUTO ? (simd ? KVP_MV16_AVX512 : KVP_MV16_PLAIN) : isa;
    mv->rows = plain_rows;
#ifdef KVP_MV16_HAVE_AVX512
    if (mv->isa == KVP_MV16_AVX512) mv->rows = avx512_rows;
#endif
    mv->n_threads = n_threads > 1 ? n_threads : 1;
    pthread_mutex_init(&mv->mu, NULL);
    pthread_cond_init(&mv->cv, NULL);
    if (mv->n_threads > 1) {
        mv->workers = calloc((size_t)mv->n_threads - 1, sizeof *mv->workers);
        if (!mv->workers) {
            kvp_matvec16_free(&mv);
            return kvp_err_set(err, KVP_ENOMEM, "16-bit matvec: out of memory");
        }
        for (; mv->n_workers < mv->n_threads - 1; mv->n_workers++)
            if (pthread_create(&mv->workers[mv->n_workers], NULL, worker_main, mv)) {
                kvp_matvec16_free(&mv);
                return kvp_err_set(err, KVP_ENOMEM, "16-bit matvec: cannot start a worker thread");
            }
    }
    *out = mv;
    return KVP_OK;
}

void kvp_matvec16_free(kvp_matvec16_t **pmv) {
    if (!pmv || !*pmv) return;
    kvp_matvec16_t *mv = *pmv;
    atomic_store(&mv->stop, true);
    pthread_mutex_lock(&mv->mu);
    atomic_fetch_add(&mv->gen, 1);
    pthread_cond_broadcast(&mv->cv);
    pthread_mutex_unlock(&mv->mu);
    for (int i = 0; i < mv->n_workers; i++)
        pthread_join(mv->workers[i], NULL);
    free(mv->workers);
    pthread_mutex_destroy(&mv->mu);
    pthread_cond_destroy(&mv->cv);
    free(mv);
    *pmv = NULL;
}

/* Whether the caller runs job j alone: no workers, too little to share, or
 * within SOLO_MS of a stall. */
static bool run_alone(const kvp_matvec16_t *mv, const job_t *j) {
    return mv->n_workers == 0 || j->n_chunks < 2 ||
           (mv->solo_until > 0 && kvp_now() < mv->solo_until);
}

/* Publishes j, takes chunks of it with the workers and returns once every
 * chunk is done and no worker looks at it any more. A chunk of a product
 * takes microseconds but an item of a parallel-for may take much longer (a
 * head's attention over 8192 positions reads 4 MB), and the caller may
 * rightly wait for one chunk a worker is in the middle of: a stall is a wait
 * beyond STALL_US plus twice the caller's own average chunk. */
static void run_shared(kvp_matvec16_t *mv, const job_t *j) {
    mv->job = *j;
    const int n_chunks = j->n_chunks;
    atomic_store_explicit(&mv->next, 0, memory_order_relaxed);
    atomic_store_explicit(&mv->done, 0, memory_order_relaxed);
    atomic_store(&mv->open, true); /* publishes job, next and done */
    atomic_fetch_add(&mv->gen, 1);
    wake_workers(mv);
    double t_start = kvp_now();
    int mine = run_chunks(mv);
    /* chunks taken by workers and still running */
    if (atomic_load_explicit(&mv->done, memory_order_acquire) < n_chunks) {
        double t0 = kvp_now();
        while (atomic_load_explicit(&mv->done, memory_order_acquire) < n_chunks)
            cpu_relax();
        double t1 = kvp_now();
        double chunk_s = mine > 0 ? (t0 - t_start) / mine : 0.0;
        mv->solo_until = t1 - t0 > STALL_US * 1e-6 + 2.0 * chunk_s ? t1 + SOLO_MS * 1e-3 : 0;
    }
    atomic_store(&mv->open, false);
    while (atomic_load(&mv->busy) > 0)
        cpu_relax();
}

void kvp_matvec16(kvp_matvec16_t *mv, float *y, const float *x, const void *w, kvp_ggml_type_t type,
                  int n_tok, int n_in, int n_out) {
    wtype_t wt = type == KVP_GGML_Q8_0 ? W_Q8 : type == KVP_GGML_BF16 ? W_BF16 : W_F16;
    job_t j = {.y = y,
               .x = x,
               .w = w,
               .wt = wt,
               .n_tok = n_tok,
               .n_in = n_in,
               .n_out = n_out,
               .n_chunks = (n_out + CHUNK_ROWS - 1) / CHUNK_ROWS};
    if (run_alone(mv, &j))
        mv->rows(y, n_out, x, n_tok, w, n_in, 0, n_out, wt);
    else
        run_shared(mv, &j);
}

void kvp_matvec16_for(kvp_matvec16_t *mv, int n_items, kvp_matvec16_item_fn fn, void *arg) {
    job_t j = {.fn = fn, .arg = arg, .n_chunks = n_items};
    if (!run_alone(mv, &j)) {
        run_shared(mv, &j);
        return;
    }
    for (int i = 0; i < n_items; i++)
        fn(arg, i);
}

int kvp_matvec16_threads(const kvp_matvec16_t *mv) {
    return mv->n_workers + 1;
}

const char *kvp_matvec16_isa_name(const kvp_matvec16_t *mv) {
    return mv->isa == KVP_MV16_AVX512 ? "avx512" : "plain";
}
