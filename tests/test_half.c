/* Tests for kvp_half: f16, bf16 and Q8_0 conversions against known bit
 * patterns, hand-computed blocks and (where the compiler has _Float16) the
 * compiler's own conversion. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvp_half.h"

static uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* xorshift64*: deterministic random numbers for the tests */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static void f16_known_values_decode(void **state) {
    (void)state;
    assert_true(kvp_f16_to_f32(0x3C00) == 1.0f);
    assert_true(kvp_f16_to_f32(0xBC00) == -1.0f);
    assert_true(kvp_f16_to_f32(0x4000) == 2.0f);
    assert_true(kvp_f16_to_f32(0x3555) == 0.333251953125f);
    assert_true(kvp_f16_to_f32(0x7BFF) == 65504.0f);
    assert_true(kvp_f16_to_f32(0x0400) == 0x1p-14f);        /* smallest normal */
    assert_true(kvp_f16_to_f32(0x0001) == 0x1p-24f);        /* smallest subnormal */
    assert_true(kvp_f16_to_f32(0x03FF) == 1023 * 0x1p-24f); /* largest subnormal */
    assert_true(kvp_f16_to_f32(0x8001) == -0x1p-24f);
    assert_int_equal(bits(kvp_f16_to_f32(0x0000)), 0x00000000);
    assert_int_equal(bits(kvp_f16_to_f32(0x8000)), 0x80000000); /* -0 keeps its sign */
    assert_true(isinf(kvp_f16_to_f32(0x7C00)) && kvp_f16_to_f32(0x7C00) > 0);
    assert_true(isinf(kvp_f16_to_f32(0xFC00)) && kvp_f16_to_f32(0xFC00) < 0);
    assert_true(isnan(kvp_f16_to_f32(0x7E00)));
    assert_true(isnan(kvp_f16_to_f32(0x7C01))); /* signalling NaN stays NaN */
    assert_true(isnan(kvp_f16_to_f32(0xFFFF)));
}

static void f16_known_values_encode(void **state) {
    (void)state;
    assert_int_equal(kvp_f32_to_f16(1.0f), 0x3C00);
    assert_int_equal(kvp_f32_to_f16(-2.0f), 0xC000);
    assert_int_equal(kvp_f32_to_f16(65504.0f), 0x7BFF);
    assert_int_equal(kvp_f32_to_f16(0.0f), 0x0000);
    assert_int_equal(kvp_f32_to_f16(-0.0f), 0x8000);
    assert_int_equal(kvp_f32_to_f16(0x1p-14f), 0x0400);
    assert_int_equal(kvp_f32_to_f16(0x1p-24f), 0x0001);
    assert_int_equal(kvp_f32_to_f16(1.0f / 3.0f), 0x3555);
    /* overflow: 65519.99 rounds down to 65504, 65520 (a tie) rounds to inf */
    assert_int_equal(kvp_f32_to_f16(65519.0f), 0x7BFF);
    assert_int_equal(kvp_f32_to_f16(65520.0f), 0x7C00);
    assert_int_equal(kvp_f32_to_f16(1e10f), 0x7C00);
    assert_int_equal(kvp_f32_to_f16(-1e10f), 0xFC00);
    assert_int_equal(kvp_f32_to_f16(INFINITY), 0x7C00);
    assert_int_equal(kvp_f32_to_f16(-INFINITY), 0xFC00);
    /* NaN stays NaN (exponent all ones, mantissa nonzero), sign kept */
    uint16_t n = kvp_f32_to_f16(NAN);
    assert_int_equal(n & 0x7C00, 0x7C00);
    assert_true((n & 0x3FF) != 0);
    uint16_t sn = kvp_f32_to_f16(from_bits(0xFF800001)); /* signalling NaN, low payload */
    assert_int_equal(sn & 0xFC00, 0xFC00);
    assert_true((sn & 0x3FF) != 0);
    /* subnormal rounding: 2^-25 is a tie between 0 and 2^-24 -> 0 (even);
     * just above it -> 2^-24; 1.5 * 2^-24 is a tie -> 2 * 2^-24 (even) */
    assert_int_equal(kvp_f32_to_f16(0x1p-25f), 0x0000);
    assert_int_equal(kvp_f32_to_f16(from_bits(0x33000001)), 0x0001);
    assert_int_equal(kvp_f32_to_f16(0x1.8p-24f), 0x0002);
    assert_int_equal(kvp_f32_to_f16(0x1.4p-24f), 0x0001);
    assert_int_equal(kvp_f32_to_f16(1e-30f), 0x0000);
    /* largest subnormal + half ulp rounds up into the smallest normal */
    assert_int_equal(kvp_f32_to_f16(1023.5f * 0x1p-24f), 0x0400);
    /* normal ties: 1 + 2^-11 is halfway between 1 and 1+2^-10 -> 1 (even);
     * 1 + 3*2^-11 is halfway between 1+2^-10 and 1+2^-9 -> 1+2^-9 (even) */
    assert_int_equal(kvp_f32_to_f16(1.0f + 0x1p-11f), 0x3C00);
    assert_int_equal(kvp_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3C02);
    assert_int_equal(kvp_f32_to_f16(1.0f + 0x1p-11f + 0x1p-20f), 0x3C01);
}

/* Every half value survives half -> float -> half (NaNs stay NaN). */
static void f16_roundtrip_exhaustive(void **state) {
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kvp_f16_to_f32((uint16_t)h);
        uint16_t back = kvp_f32_to_f16(f);
        if ((h & 0x7C00) == 0x7C00 && (h & 0x3FF)) {
            assert_true(isnan(f));
            assert_int_equal(back & 0x7C00, 0x7C00);
            assert_true((back & 0x3FF) != 0);
            assert_int_equal(back & 0x8000, h & 0x8000);
        } else {
            assert_int_equal(back, h);
        }
    }
}

#ifdef __FLT16_MAX__
/* The compiler's float -> _Float16 conversion rounds to nearest even too:
 * compare on random bit patterns over the whole float range, and densely
 * around the half range (subnormals, the overflow edge). */
static void f16_matches_compiler(void **state) {
    (void)state;
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = (uint32_t)rng();
        if (i & 1) /* focus: exponents from 2^-26 to 2^17 */
            u = (u & 0x807fffff) | ((uint32_t)(101 + (rng() % 44)) << 23);
        float f = from_bits(u);
        if (isnan(f)) continue;
        _Float16 h = (_Float16)f;
        uint16_t want;
        memcpy(&want, &h, 2);
        if (kvp_f32_to_f16(f) != want)
            fail_msg("f32 0x%08x: got 0x%04x, compiler 0x%04x", u, kvp_f32_to_f16(f), want);
    }
}
#endif

static void bf16_known_values(void **state) {
    (void)state;
    assert_true(kvp_bf16_to_f32(0x3F80) == 1.0f);
    assert_true(kvp_bf16_to_f32(0xC000) == -2.0f);
    assert_true(kvp_bf16_to_f32(0x7F7F) == from_bits(0x7F7F0000)); /* largest finite */
    assert_true(isinf(kvp_bf16_to_f32(0x7F80)));
    assert_true(isnan(kvp_bf16_to_f32(0x7FC0)));
    assert_true(kvp_bf16_to_f32(0x0001) == from_bits(0x00010000)); /* subnormal */
    assert_int_equal(kvp_f32_to_bf16(1.0f), 0x3F80);
    assert_int_equal(kvp_f32_to_bf16(-0.0f), 0x8000);
    assert_int_equal(kvp_f32_to_bf16(3.140625f), 0x4049);
    assert_int_equal(kvp_f32_to_bf16(INFINITY), 0x7F80);
    assert_int_equal(kvp_f32_to_bf16(-INFINITY), 0xFF80);
    /* NaN stays NaN and quiet, also for a signalling NaN whose payload is all
     * in the low 16 bits (plain truncation would turn it into infinity) */
    uint16_t n = kvp_f32_to_bf16(from_bits(0x7F800001));
    assert_int_equal(n & 0x7F80, 0x7F80);
    assert_true((n & 0x40) != 0);
    assert_int_equal(kvp_f32_to_bf16(from_bits(0xFFC00000)), 0xFFC0);
    /* overflow by rounding: the largest float rounds up to infinity */
    assert_int_equal(kvp_f32_to_bf16(from_bits(0x7F7FFFFF)), 0x7F80);
}

static void bf16_rounding_ties(void **state) {
    (void)state;
    /* exactly halfway: ties go to the even kept pattern */
    assert_int_equal(kvp_f32_to_bf16(from_bits(0x3F808000)), 0x3F80); /* 0x3F80 even: down */
    assert_int_equal(kvp_f32_to_bf16(from_bits(0x3F818000)), 0x3F82); /* 0x3F81 odd: up */
    assert_int_equal(kvp_f32_to_bf16(from_bits(0xBF818000)), 0xBF82); /* sign irrelevant */
    /* just below and above half */
    assert_int_equal(kvp_f32_to_bf16(from_bits(0x3F807FFF)), 0x3F80);
    assert_int_equal(kvp_f32_to_bf16(from_bits(0x3F808001)), 0x3F81);
    /* a carry through the mantissa into the exponent */
    assert_int_equal(kvp_f32_to_bf16(from_bits(0x3FFFFFFF)), 0x4000);
    /* random values: the result is one of the two neighbours, the nearer one */
    for (int i = 0; i < 1000000; i++) {
        float f = from_bits((uint32_t)rng());
        if (isnan(f) || isinf(f)) continue;
        uint16_t r = kvp_f32_to_bf16(f);
        uint32_t lo = bits(f) >> 16;
        assert_true(r == lo || r == lo + 1);
        double x = f, a = kvp_bf16_to_f32((uint16_t)lo);
        double b = isinf(kvp_bf16_to_f32((uint16_t)(lo + 1))) ? ldexp(copysign(1.0, x), 128)
                                                              : kvp_bf16_to_f32((uint16_t)(lo + 1));
        double da = fabs(x - a), db = fabs(x - b);
        uint16_t want = da < db ? lo : db < da ? lo + 1 : (lo & 1) ? lo + 1 : lo;
        if (r != want) fail_msg("f32 0x%08x: got 0x%04x want 0x%04x", bits(f), r, want);
    }
}

static void half_rows(void **state) {
    (void)state;
    float src[5] = {1.0f, -2.5f, 0.1f, 65504.0f, 1e-6f};
    uint16_t h[5], b[5];
    float back[5];
    kvp_f32_to_f16_row(src, h, 5);
    kvp_f32_to_bf16_row(src, b, 5);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(h[i], kvp_f32_to_f16(src[i]));
        assert_int_equal(b[i], kvp_f32_to_bf16(src[i]));
    }
    kvp_f16_to_f32_row(h, back, 5);
    for (int i = 0; i < 5; i++)
        assert_true(back[i] == kvp_f16_to_f32(h[i]));
    kvp_bf16_to_f32_row(b, back, 5);
    for (int i = 0; i < 5; i++)
        assert_true(back[i] == kvp_bf16_to_f32(b[i]));
}

/* A block worked out by hand: amax 127 gives d = 1.0 (f16 0x3C00), and q is
 * x rounded half away from zero, as ggml's roundf does. */
static void q8_0_hand_block(void **state) {
    (void)state;
    float x[32] = {127.0f, -127.0f, 2.5f, -2.5f, 0.5f, -0.5f, 0.49f, 1.5f, 100.4f, -3.6f};
    for (int j = 10; j < 32; j++)
        x[j] = (float)(j - 20);
    uint8_t blk[34];
    kvp_f32_to_q8_0_row(x, blk, 32);
    assert_int_equal(blk[0], 0x00);
    assert_int_equal(blk[1], 0x3C);
    const int8_t want[10] = {127, -127, 3, -3, 1, -1, 0, 2, 100, -4};
    for (int j = 0; j < 10; j++)
        assert_int_equal((int8_t)blk[2 + j], want[j]);
    for (int j = 10; j < 32; j++)
        assert_int_equal((int8_t)blk[2 + j], j - 20);
    float y[32];
    kvp_q8_0_to_f32_row(blk, y, 32);
    assert_true(y[0] == 127.0f && y[2] == 3.0f && y[3] == -3.0f && y[9] == -4.0f);

    /* second block: x = j - 16, amax 16, d = 16/127 = 0.12598 -> f16 0x3008
     * (0.1259765625); q = roundf((j - 16) * 127 / 16) */
    float x2[32];
    for (int j = 0; j < 32; j++)
        x2[j] = (float)(j - 16);
    kvp_f32_to_q8_0_row(x2, blk, 32);
    assert_int_equal(blk[0] | (blk[1] << 8), 0x3008);
    assert_int_equal((int8_t)blk[2 + 0], -127);
    assert_int_equal((int8_t)blk[2 + 1], -119); /* -15 * 7.9375 = -119.06 */
    assert_int_equal((int8_t)blk[2 + 2], -111); /* -111.125 */
    assert_int_equal((int8_t)blk[2 + 14], -16); /* -2 * 7.9375 = -15.875 */
    assert_int_equal((int8_t)blk[2 + 16], 0);
    assert_int_equal((int8_t)blk[2 + 31], 119);
    kvp_q8_0_to_f32_row(blk, y, 32);
    assert_true(y[0] == -127 * 0.1259765625f);

    /* all zeros: d = 0, q = 0, decodes to zeros */
    float z[32] = {0};
    kvp_f32_to_q8_0_row(z, blk, 32);
    for (int j = 0; j < 34; j++)
        assert_int_equal(blk[j], 0);
}

/* Round trip over many random blocks: every value comes back within half a
 * quantisation step, plus the error the f16 rounding of d adds (q <= 127
 * steps of |d - f16(d)|, at most 2^-11 relative). */
static void q8_0_roundtrip_bound(void **state) {
    (void)state;
    enum { N = 32 * 4096 };
    float *x = malloc(N * sizeof *x), *y = malloc(N * sizeof *y);
    uint8_t *q = malloc(N / 32 * 34);
    assert_non_null(x);
    assert_non_null(y);
    assert_non_null(q);
    for (int i = 0; i < N; i++) {
        double u = (double)(rng() >> 11) / 9007199254740992.0; /* [0, 1) */
        double scale = ldexp(1.0, (int)(rng() % 20) - 10);     /* per-value magnitude */
        x[i] = (float)((u * 2 - 1) * scale);
    }
    kvp_f32_to_q8_0_row(x, q, N);
    kvp_q8_0_to_f32_row(q, y, N);
    for (int k = 0; k < N / 32; k++) {
        float amax = 0;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(x[k * 32 + j]));
        float d = amax / 127.0f;
        float dh = kvp_f16_to_f32((uint16_t)(q[k * 34] | (q[k * 34 + 1] << 8)));
        if (d >= 0x1p-14f) /* normal f16: relative error at most 2^-11 */
            assert_true(fabsf(dh - d) <= d * 0x1p-11f * 1.0001f);
        float bound = d / 2 + 127 * fabsf(dh - d) + 1e-6f * amax;
        for (int j = 0; j < 32; j++) {
            float e = fabsf(x[k * 32 + j] - y[k * 32 + j]);
            if (e > bound)
                fail_msg("block %d value %d: |%g - %g| = %g > %g", k, j, x[k * 32 + j],
                         y[k * 32 + j], e, bound);
        }
    }
    free(x);
    free(y);
    free(q);
}

/* NaN and infinity inputs must not cause undefined behaviour (ggml does not
 * expect them; we only require a defined, finite-or-not result). */
static void q8_0_nonfinite_inputs(void **state) {
    (void)state;
    float x[32];
    for (int j = 0; j < 32; j++)
        x[j] = (float)j;
    x[3] = NAN;
    x[4] = INFINITY;
    uint8_t blk[34];
    kvp_f32_to_q8_0_row(x, blk, 32);
    for (int j = 0; j < 32; j++) {
        int8_t v = (int8_t)blk[2 + j];
        assert_true(v != -128); /* clamped to [-127, 127] */
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(f16_known_values_decode),
        cmocka_unit_test(f16_known_values_encode),
        cmocka_unit_test(f16_roundtrip_exhaustive),
#ifdef __FLT16_MAX__
        cmocka_unit_test(f16_matches_compiler),
#endif
        cmocka_unit_test(bf16_known_values),
        cmocka_unit_test(bf16_rounding_ties),
        cmocka_unit_test(half_rows),
        cmocka_unit_test(q8_0_hand_block),
        cmocka_unit_test(q8_0_roundtrip_bound),
        cmocka_unit_test(q8_0_nonfinite_inputs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
