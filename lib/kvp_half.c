/* kvp_half: float <-> IEEE half, bfloat16 and Q8_0 blocks.
 *
 * Plain bit manipulation, no lookup tables and no CPU-specific intrinsics:
 * the same results on every machine, and the rounding rules are visible in
 * the code. Rounding is to nearest, ties to even, like the hardware
 * conversions; Q8_0 follows ggml's reference quantiser bit for bit so that
 * files we write match files llama.cpp writes. */
#include "kvp_half.h"

#include <math.h>
#include <string.h>

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float kvp_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24, exact in float */
        float v = (float)mant * 0x1p-24f;
        return sign ? -v : v;
    }
    if (exp == 31) /* inf or NaN: keep the payload */
        return f32_from_bits(sign | 0x7f800000u | (mant << 13));
    return f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t kvp_f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) {
        if (x == 0x7f800000u) return sign | 0x7c00;
        /* NaN: keep the top payload bits and force the quiet bit so that the
         * result is never mistaken for infinity. */
        return sign | 0x7e00 | (uint16_t)((x >> 13) & 0x3ff);
    }
    /* 65520 is halfway between 65504 (largest half) and 65536: the tie goes
     * to the even mantissa, which is the overflow to infinity. */
    if (x >= 0x477ff000u) return sign | 0x7c00;
    if (x < 0x38800000u) {    /* below 2^-14: a half subnormal or zero */
        if (x <= 0x33000000u) /* <= 2^-25: half the smallest subnormal, ties to 0 */
            return sign;
        uint32_t e = x >> 23;
        uint32_t mant = (x & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t r = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1)))
            r++; /* may carry into the smallest normal, which is correct */
        return sign | (uint16_t)r;
    }
    uint32_t r = (x >> 13) - (112u << 10);
    uint32_t rem = x & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1)))
        r++; /* a carry into the exponent is the correct next binade */
    return sign | (uint16_t)r;
}

float kvp_bf16_to_f32(uint16_t h) {
    return f32_from_bits((uint32_t)h << 16);
}

uint16_t kvp_f32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40); /* NaN: set the quiet bit */
    /* add just under half an ulp, plus one if the kept part is odd: ties to
     * even; overflow rounds into the infinity encoding as it should */
    x += 0x7fffu + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

void kvp_f16_to_f32_row(const uint16_t *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++)
        dst[i] = kvp_f16_to_f32(src[i]);
}

void kvp_f32_to_f16_row(const float *src, uint16_t *dst, size_t n) {
    for (size_t i = 0; i < n; i++)
        dst[i] = kvp_f32_to_f16(src[i]);
}

void kvp_bf16_to_f32_row(const uint16_t *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++)
        dst[i] = kvp_bf16_to_f32(src[i]);
}

void kvp_f32_to_bf16_row(const float *src, uint16_t *dst, size_t n) {
    for (size_t i = 0; i < n; i++)
        dst[i] = kvp_f32_to_bf16(src[i]);
}

#define Q8_0_BLOCK 32
#define Q8_0_BYTES 34

/* One block is read and written bytewise: a block's scale sits at offset
 * 34*k, so it is not 2-byte aligned in general. */
void kvp_q8_0_to_f32_row(const void *src, float *dst, size_t n) {
    const uint8_t *b = src;
    for (size_t k = 0; k < n / Q8_0_BLOCK; k++, b += Q8_0_BYTES) {
        float d = kvp_f16_to_f32((uint16_t)(b[0] | (b[1] << 8)));
        const int8_t *q = (const int8_t *)(b + 2);
        for (int j = 0; j < Q8_0_BLOCK; j++)
            dst[k * Q8_0_BLOCK + j] = d * (float)q[j];
    }
}

/* As ggml's quantize_row_q8_0_ref: d = amax/127 is rounded to half for
 * storage, but the values are scaled by 1/d of the unrounded d, and rounded
 * half away from zero (roundf). Non-finite inputs (which ggml does not
 * expect) give a clamped, defined result instead of undefined behaviour. */
void kvp_f32_to_q8_0_row(const float *src, void *dst, size_t n) {
    uint8_t *b = dst;
    for (size_t k = 0; k < n / Q8_0_BLOCK; k++, b += Q8_0_BYTES) {
        const float *x = src + k * Q8_0_BLOCK;
        float amax = 0.0f;
        for (int j = 0; j < Q8_0_BLOCK; j++) {
            float a = fabsf(x[j]);
            if (a > amax) amax = a;
        }
        float d = amax / 127.0f;
        float id = (d != 0.0f) ? 1.0f / d : 0.0f;
        uint16_t dh = kvp_f32_to_f16(d);
        b[0] = (uint8_t)(dh & 0xff);
        b[1] = (uint8_t)(dh >> 8);
        for (int j = 0; j < Q8_0_BLOCK; j++) {
            float v = roundf(x[j] * id);
            if (!(v == v)) /* NaN */
                v = 0.0f;
            else if (v > 127.0f)
                v = 127.0f;
            else if (v < -127.0f)
                v = -127.0f;
            b[2 + j] = (uint8_t)(int8_t)v;
        }
    }
}
