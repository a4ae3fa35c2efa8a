#include "kvp_ops.h"

#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

void kvp_matmul(float *y, const float *x, const float *w, int n_tok, int n_in, int n_out) {
    if (n_tok == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, n_out, n_in, 1.0f, w, n_in, x, 1, 0.0f, y, 1);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n_tok, n_out, n_in, 1.0f, x, n_in, w, n_in,
                0.0f, y, n_out);
}

void kvp_rmsnorm(float *y, const float *x, const float *w, int n_rows, int n, float eps) {
    for (int r = 0; r < n_rows; r++) {
        const float *xr = x + (size_t)r * n;
        float *yr = y + (size_t)r * n;
        float ss = 0.0f;
        for (int i = 0; i < n; i++)
            ss += xr[i] * xr[i];
        float scale = 1.0f / sqrtf(ss / (float)n + eps);
        for (int i = 0; i < n; i++)
            yr[i] = xr[i] * scale * w[i];
    }
}

/* The max and the sum keep 16 running lanes: without -ffast-math the compiler
 * may not reorder a float reduction, so a single accumulator would keep both
 * loops scalar. Softmax over attention scores runs on one thread between
 * OpenBLAS calls, so its speed shows in prefill time (2.6x faster this way). */
enum { SM_LANES = 16 };

static float max_lanes(const float *x, int n) {
    float m[SM_LANES], mx = -INFINITY;
    for (int j = 0; j < SM_LANES; j++)
        m[j] = -INFINITY;
    int i = 0;
    for (; i + SM_LANES <= n; i += SM_LANES)
        for (int j = 0; j < SM_LANES; j++)
            m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
    for (; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    for (int j = 0; j < SM_LANES; j++)
        mx = m[j] > mx ? m[j] : mx;
    return mx;
}

static float sum_lanes(const float *x, int n) {
    float a[SM_LANES] = {0}, sum = 0.0f;
    int i = 0;
    for (; i + SM_LANES <= n; i += SM_LANES)
        for (int j = 0; j < SM_LANES; j++)
            a[j] += x[i + j];
    for (; i < n; i++)
        sum += x[i];
    for (int j = 0; j < SM_LANES; j++)
        sum += a[j];
    return sum;
}

void kvp_softmax(float *x, int n) {
    float mx = max_lanes(x, n);
    for (int i = 0; i < n; i++)
        x[i] = kvp_expf(x[i] - mx);
    float inv = 1.0f / sum_lanes(x, n);
    for (int i = 0; i < n; i++)
        x[i] *= inv;
}

void kvp_rope_inv_freq(float *inv_freq, int rope_dim, float base, const float *factors) {
    for (int i = 0; i < rope_dim / 2; i++) {
        double f = pow((double)base, -2.0 * i / (double)rope_dim);
        if (factors) f /= factors[i];
        inv_freq[i] = (float)f;
    }
}

void kvp_rope_table(float *cs, int rope_dim, int pos, const float *inv_freq) {
    const int half = rope_dim / 2;
    for (int i = 0; i < half; i++) {
        /* angle in double: positions reach tens of thousands and float loses
         * the low bits of pos * freq there. */
        double a = (double)pos * (double)inv_freq[i];
        cs[i] = (float)cos(a);
        cs[half + i] = (float)sin(a);
    }
}

void kvp_rope_apply(float *x, int n_head, int head_dim, int rope_dim, const float *cs, float sign) {
    const int half = rope_dim / 2;
    for (int h = 0; h < n_head; h++) {
        float *p = x + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            float c = cs[i], s = sign * cs[half + i];
            float x0 = p[2 * i], x1 = p[2 * i + 1];
            p[2 * i] = x0 * c - x1 * s;
            p[2 * i + 1] = x0 * s + x1 * c;
        }
    }
}

void kvp_rope(float *x, int n_head, int head_dim, int rope_dim, int pos, const float *inv_freq,
              float sign) {
    float cs[1024]; /* rope_dim <= head_dim <= 1024, checked when models are made */
    if (rope_dim > 1024) rope_dim = 1024;
    kvp_rope_table(cs, rope_dim, pos, inv_freq);
    kvp_rope_apply(x, n_head, head_dim, rope_dim, cs, sign);
}

void kvp_swiglu(float *out, int ld_out, const float *gate, const float *up, int ld_in, int n_rows,
                int n) {
    for (int r = 0; r < n_rows; r++) {
        const float *g = gate + (size_t)r * ld_in;
        const float *u = up + (size_t)r * ld_in;
        float *o = out + (size_t)r * ld_out;
        for (int i = 0; i < n; i++)
            o[i] = g[i] / (1.0f + kvp_expf(-g[i])) * u[i];
    }
}

/* Query rows are processed in tiles so that a tile only multiplies against
 * the keys it can see: with the causal mask, tile [t0, t1) needs positions
 * [0, pos0 + t1). This halves the attention FLOPs of a long prefill compared
 * with one full square product. */
enum { ATT_TILE = 128 };

size_t kvp_attention_scratch(int n_tok, int n_ctx) {
    int rows = n_tok < ATT_TILE ? n_tok : ATT_TILE;
    return (size_t)rows * (size_t)n_ctx;
}

void kvp_attention(float *out, int ld_out, const float *q, int ld_q, const float *k, const float *v,
                   int n_tok, int pos0, int n_head, int n_kv_head, int head_dim, int cap,
                   float *scratch) {
    const int group = n_head / n_kv_head;
    const float scale = 1.0f / sqrtf((float)head_dim);
    for (int h = 0; h < n_head; h++) {
        const float *kh = k + (size_t)(h / group) * cap * head_dim;
        const float *vh = v + (size_t)(h / group) * cap * head_dim;
        for (int t0 = 0; t0 < n_tok; t0 += ATT_TILE) {
            int rows = n_tok - t0 < ATT_TILE ? n_tok - t0 : ATT_TILE;
            int n_ctx = pos0 + t0 + rows;
            const float *qt = q + (size_t)t0 * ld_q + (size_t)h * head_dim;
            float *ot = out + (size_t)t0 * ld_out + (size_t)h * head_dim;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n_ctx, head_dim, scale, qt,
                        ld_q, kh, head_dim, 0.0f, scratch, n_ctx);
            for (int r = 0; r < rows; r++) {
                float *s = scratch + (size_t)r * n_ctx;
                int seen = pos0 + t0 + r + 1; /* causal: positions <= own */
                kvp_softmax(s, seen);
                memset(s + seen, 0, sizeof(float) * (size_t)(n_ctx - seen));
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, head_dim, n_ctx, 1.0f,
                        scratch, n_ctx, vh, head_dim, 0.0f, ot, ld_out);
        }
    }
}

/* q . k over n values in DOT_LANES running sums: as in softmax, a single
 * accumulator would keep the loop scalar (no reordering without
 * -ffast-math); 16 lanes fill one AVX-512 vector or two AVX2 ones. */
enum { DOT_LANES = 16 };

static float dot_lanes(const float *a, const float *b, int n) {
    float s[DOT_LANES] = {0}, tail = 0.0f;
    int i = 0;
    for (; i + DOT_LANES <= n; i += DOT_LANES)
        for (int j = 0; j < DOT_LANES; j++)
            s[j] += a[i + j] * b[i + j];
    for (; i < n; i++)
        tail += a[i] * b[i];
    for (int w = DOT_LANES / 2; w > 0; w /= 2) /* pairwise, as a vector reduction does */
        for (int j = 0; j < w; j++)
            s[j] += s[j + w];
    return s[0] + tail;
}

/* Why not the sgemm of kvp_attention with one row: OpenBLAS runs products
 * this small on one thread and pays its call overhead twice per head; here a
 * head is a plain loop that one of the runner's threads takes whole. The
 * weighted sum of values takes four positions a step, so out is read and
 * written once per four rows of V (both loops are bound by reading K and V). */
void kvp_attention_row(float *restrict out, const float *q, const float *kh, const float *vh,
                       int n_ctx, int head_dim, float *restrict scores) {
    const float scale = 1.0f / sqrtf((float)head_dim);
    for (int j = 0; j < n_ctx; j++)
        scores[j] = scale * dot_lanes(q, kh + (size_t)j * head_dim, head_dim);
    kvp_softmax(scores, n_ctx);
    for (int d = 0; d < head_dim; d++)
        out[d] = 0.0f;
    int j = 0;
    for (; j + 4 <= n_ctx; j += 4) {
        const float *v0 = vh + (size_t)j * head_dim, *v1 = v0 + head_dim, *v2 = v1 + head_dim,
                    *v3 = v2 + head_dim;
        const float p0 = scores[j], p1 = scores[j + 1], p2 = scores[j + 2], p3 = scores[j + 3];
        for (int d = 0; d < head_dim; d++)
            out[d] += (p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d]);
    }
    for (; j < n_ctx; j++) {
        const float *vj = vh + (size_t)j * head_dim;
        for (int d = 0; d < head_dim; d++)
            out[d] += scores[j] * vj[d];
    }
}
