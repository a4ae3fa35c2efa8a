/* Tests for kvp_sampler and kvp_rng: greedy is argmax, a seed fixes the
 * sequence, top-k and top-p keep only what they should, the empirical
 * distribution matches softmax(logits / temp), bad parameters are refused,
 * and the generator's uniform, normal and bounded draws have the right
 * range and moments. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvp_rng.h"
#include "kvp_sampler.h"

static kvp_sampler_t *new_sampler(float temp, int top_k, float top_p, uint64_t seed, int n_vocab) {
    kvp_sampler_params_t p = {.temp = temp, .top_k = top_k, .top_p = top_p, .seed = seed};
    kvp_sampler_t *s = NULL;
    kvp_err_t err = {0};
    int rc = kvp_sampler_new(&s, &p, n_vocab, &err);
    if (rc) print_error("kvp_sampler_new: %s\n", err.msg);
    assert_int_equal(rc, KVP_OK);
    assert_non_null(s);
    return s;
}

/* logits in [-4, 4) from the library's generator with a fixed seed */
static void fill_logits(float *x, int n, uint64_t seed) {
    kvp_rng_t r;
    kvp_rng_seed(&r, seed);
    for (int i = 0; i < n; i++)
        x[i] = 8.0f * kvp_rng_uniform(&r) - 4.0f;
}

/* softmax(logits / temp) in double */
static void ref_probs(double *p, const float *logits, int n, double temp) {
    double mx = -INFINITY, sum = 0.0;
    for (int i = 0; i < n; i++)
        mx = fmax(mx, logits[i]);
    for (int i = 0; i < n; i++)
        sum += p[i] = exp((logits[i] - mx) / temp);
    for (int i = 0; i < n; i++)
        p[i] /= sum;
}

/* Draws n times and returns the frequency of each token. */
static void sample_freq(kvp_sampler_t *s, const float *logits, int n_vocab, int n, double *freq) {
    for (int i = 0; i < n_vocab; i++)
        freq[i] = 0.0;
    for (int i = 0; i < n; i++) {
        int32_t t = kvp_sampler_sample(s, logits);
        assert_true(t >= 0 && t < n_vocab);
        freq[t] += 1.0;
    }
    for (int i = 0; i < n_vocab; i++)
        freq[i] /= n;
}

static void assert_freq_near(const double *freq, const double *want, int n, double tol) {
    for (int i = 0; i < n; i++)
        if (!(fabs(freq[i] - want[i]) <= tol)) {
            print_error("token %d: frequency %.4f, expected %.4f\n", i, freq[i], want[i]);
            fail();
        }
}

/* ---- argmax and greedy ---- */

static void argmax_returns_first_of_ties(void **state) {
    (void)state;
    const float a[] = {1.0f, 3.0f, 3.0f, 2.0f};
    assert_int_equal(kvp_argmax(a, 4), 1);
    const float b[] = {-5.0f, -5.0f, -5.0f};
    assert_int_equal(kvp_argmax(b, 3), 0);
    const float c[] = {-INFINITY, -1e30f, 7.0f};
    assert_int_equal(kvp_argmax(c, 3), 2);
    const float d[] = {42.0f};
    assert_int_equal(kvp_argmax(d, 1), 0);
    const float e[] = {0.0f, 0.5f, 0.25f, 0.5f, 0.5f};
    assert_int_equal(kvp_argmax(e, 5), 1);
}

static void zero_or_negative_temperature_is_greedy(void **state) {
    (void)state;
    enum { N = 64 };
    float logits[N];
    const float temps[] = {0.0f, -1.0f};
    for (int ti = 0; ti < 2; ti++)
        for (uint64_t seed = 1; seed <= 20; seed++) {
            fill_logits(logits, N, seed);
            if (seed % 2) logits[N - 1] = logits[kvp_argmax(logits, N)]; /* a tie: first one wins */
            kvp_sampler_t *s = new_sampler(temps[ti], 5, 0.5f, seed, N);
            for (int i = 0; i < 10; i++)
                assert_int_equal(kvp_sampler_sample(s, logits), kvp_argmax(logits, N));
            kvp_sampler_free(&s);
            assert_null(s);
        }
}

/* ---- seeding ---- */

static void same_seed_gives_same_sequence_and_other_seed_differs(void **state) {
    (void)state;
    enum { N = 100, DRAWS = 1000 };
    float logits[N];
    for (int i = 0; i < N; i++)
        logits[i] = 0.0f; /* flat: every draw is a fresh choice among 100 */
    kvp_sampler_t *a = new_sampler(1.0f, 0, 1.0f, 42, N);
    kvp_sampler_t *b = new_sampler(1.0f, 0, 1.0f, 42, N);
    kvp_sampler_t *c = new_sampler(1.0f, 0, 1.0f, 43, N);
    int differ = 0;
    for (int i = 0; i < DRAWS; i++) {
        int32_t x = kvp_sampler_sample(a, logits);
        assert_int_equal(kvp_sampler_sample(b, logits), x);
        differ += kvp_sampler_sample(c, logits) != x;
    }
    assert_true(differ > DRAWS / 2); /* about 99% expected */
    kvp_sampler_free(&a);
    kvp_sampler_free(&b);
    kvp_sampler_free(&c);
}

/* ---- top-k ---- */

static void top_k_one_is_greedy_at_any_temperature(void **state) {
    (void)state;
    enum { N = 50 };
    float logits[N];
    const float temps[] = {0.01f, 0.5f, 1.0f, 2.0f, 100.0f, 1e6f};
    for (int ti = 0; ti < 6; ti++)
        for (uint64_t seed = 1; seed <= 10; seed++) {
            fill_logits(logits, N, seed * 7);
            kvp_sampler_t *s = new_sampler(temps[ti], 1, 1.0f, seed, N);
            for (int i = 0; i < 20; i++)
                assert_int_equal(kvp_sampler_sample(s, logits), kvp_argmax(logits, N));
            kvp_sampler_free(&s);
        }
    /* nearly tied logits whose probabilities round to the same float: the
     * larger logit (token 1) must still win */
    float near[2] = {nextafterf(0.1f, 0.0f), 0.1f};
    float far[2] = {4.9f, 5.0f};
    for (int ti = 0; ti < 6; ti++) {
        kvp_sampler_t *s = new_sampler(temps[ti], 1, 1.0f, 9, 2);
        assert_int_equal(kvp_sampler_sample(s, near), 1);
        assert_int_equal(kvp_sampler_sample(s, far), 1);
        kvp_sampler_free(&s);
    }
}

/* Draws at a hot temperature (so that the others would show up) and checks
 * that only the K largest logits occur, all of them, at their renormalised
 * probabilities. */
static void check_top_k(int k) {
    enum { N = 50, DRAWS = 20000 };
    float logits[N];
    fill_logits(logits, N, 1234);
    /* the k largest by selection, independent of the sampler's sort */
    int in_top[N] = {0};
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int i = 0; i < N; i++)
            if (!in_top[i] && (best < 0 || logits[i] > logits[best])) best = i;
        in_top[best] = 1;
    }
    kvp_sampler_t *s = new_sampler(3.0f, k, 1.0f, 5, N);
    double freq[N];
    sample_freq(s, logits, N, DRAWS, freq);
    int seen = 0;
    for (int i = 0; i < N; i++) {
        if (!in_top[i] && freq[i] > 0.0) {
            print_error("token %d (logit %g) is outside the top %d\n", i, (double)logits[i], k);
            fail();
        }
        seen += in_top[i] && freq[i] > 0.0;
    }
    assert_int_equal(seen, k);
    double p[N], mass = 0.0;
    ref_probs(p, logits, N, 3.0);
    for (int i = 0; i < N; i++)
        mass += in_top[i] ? p[i] : 0.0;
    for (int i = 0; i < N; i++)
        p[i] = in_top[i] ? p[i] / mass : 0.0;
    assert_freq_near(freq, p, N, 0.015);
    kvp_sampler_free(&s);
}

static void top_k_never_returns_a_token_outside_the_top_k(void **state) {
    (void)state;
    check_top_k(5);
    check_top_k(49); /* all but the smallest */
}

/* ---- top-p ---- */

static void small_top_p_returns_only_the_top_token(void **state) {
    (void)state;
    enum { N = 50 };
    float logits[N];
    fill_logits(logits, N, 77);
    int32_t top = kvp_argmax(logits, N);
    const float top_ps[] = {1e-6f, 0.01f};
    for (int i = 0; i < 2; i++) {
        kvp_sampler_t *s = new_sampler(2.0f, 0, top_ps[i], 3, N);
        for (int d = 0; d < 5000; d++)
            assert_int_equal(kvp_sampler_sample(s, logits), top);
        kvp_sampler_free(&s);
    }
}

static void top_p_keeps_the_smallest_prefix_reaching_p(void **state) {
    (void)state;
    /* probabilities 0.5, 0.3, 0.15, 0.05: the prefix reaching 0.75 is {0, 1} */
    const float logits[4] = {logf(0.15f), logf(0.5f), logf(0.05f), logf(0.3f)};
    kvp_sampler_t *s = new_sampler(1.0f, 0, 0.75f, 11, 4);
    double freq[4];
    sample_freq(s, logits, 4, 100000, freq);
    const double want[4] = {0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8};
    assert_true(freq[0] == 0.0 && freq[2] == 0.0);
    assert_freq_near(freq, want, 4, 0.01);
    kvp_sampler_free(&s);
}

/* ---- distribution and temperature ---- */

static const float dist_logits[8] = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f, 0.0f, -0.5f, 2.2f};

static void temperature_one_matches_softmax(void **state) {
    (void)state;
    double p[8], freq[8];
    ref_probs(p, dist_logits, 8, 1.0);
    kvp_sampler_t *s = new_sampler(1.0f, 0, 1.0f, 2024, 8);
    sample_freq(s, dist_logits, 8, 200000, freq);
    assert_freq_near(freq, p, 8, 0.01);
    kvp_sampler_free(&s);
}

static void lower_temperature_sharpens_the_distribution(void **state) {
    (void)state;
    double p1[8], p05[8], f1[8], f05[8];
    ref_probs(p1, dist_logits, 8, 1.0);
    ref_probs(p05, dist_logits, 8, 0.5);
    kvp_sampler_t *s1 = new_sampler(1.0f, 0, 1.0f, 99, 8);
    kvp_sampler_t *s05 = new_sampler(0.5f, 0, 1.0f, 99, 8);
    sample_freq(s1, dist_logits, 8, 200000, f1);
    sample_freq(s05, dist_logits, 8, 200000, f05);
    const int top = kvp_argmax(dist_logits, 8);
    assert_true(f05[top] > f1[top] + 0.05); /* 0.49 against 0.28 expected */
    assert_freq_near(f05, p05, 8, 0.01);
    kvp_sampler_free(&s1);
    kvp_sampler_free(&s05);
}

static void sampling_does_not_modify_logits(void **state) {
    (void)state;
    enum { N = 40 };
    float logits[N], copy[N];
    fill_logits(logits, N, 8);
    memcpy(copy, logits, sizeof copy);
    kvp_sampler_t *s = new_sampler(0.7f, 10, 0.9f, 1, N);
    for (int i = 0; i < 100; i++)
        kvp_sampler_sample(s, logits);
    assert_memory_equal(logits, copy, sizeof copy);
    kvp_sampler_free(&s);
}

/* ---- parameters ---- */

static void invalid_parameters_are_refused(void **state) {
    (void)state;
    const kvp_sampler_params_t bad[] = {
        {.temp = 1.0f, .top_k = -1, .top_p = 1.0f}, {.temp = 1.0f, .top_k = 0, .top_p = 0.0f},
        {.temp = 1.0f, .top_k = 0, .top_p = -0.5f}, {.temp = 1.0f, .top_k = 0, .top_p = NAN},
        {.temp = NAN, .top_k = 0, .top_p = 1.0f},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kvp_sampler_t *s = (kvp_sampler_t *)&bad; /* must be reset to NULL */
        kvp_err_t err = {0};
        assert_int_equal(kvp_sampler_new(&s, &bad[i], 10, &err), KVP_EINVAL);
        assert_int_equal(err.code, KVP_EINVAL);
        assert_true(err.msg[0] != '\0');
        assert_null(s);
    }
    const kvp_sampler_params_t ok = {.temp = 1.0f, .top_k = 0, .top_p = 1.0f};
    kvp_sampler_t *s = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_sampler_new(&s, &ok, 0, &err), KVP_EINVAL);
    assert_non_null(strstr(err.msg, "vocabulary"));
    assert_null(s);
    assert_int_equal(kvp_sampler_new(&s, &ok, -3, NULL), KVP_EINVAL);
    kvp_sampler_free(&s); /* NULL is fine */
    kvp_sampler_free(NULL);
}

/* ---- rng ---- */

static void rng_same_seed_same_stream_other_seed_differs(void **state) {
    (void)state;
    kvp_rng_t a, b, c;
    kvp_rng_seed(&a, 7);
    kvp_rng_seed(&b, 7);
    kvp_rng_seed(&c, 8);
    uint64_t first[100];
    int differ = 0;
    for (int i = 0; i < 100; i++) {
        first[i] = kvp_rng_u64(&a);
        assert_true(kvp_rng_u64(&b) == first[i]);
        differ += kvp_rng_u64(&c) != first[i];
    }
    assert_int_equal(differ, 100);
    kvp_rng_seed(&a, 7); /* re-seeding restarts the stream */
    for (int i = 0; i < 100; i++)
        assert_true(kvp_rng_u64(&a) == first[i]);
    /* seed 0 is a working seed, not the all-zero state */
    kvp_rng_seed(&a, 0);
    uint64_t any = 0;
    for (int i = 0; i < 4; i++)
        any |= kvp_rng_u64(&a);
    assert_true(any != 0);
}

static void rng_uniform_is_in_unit_interval(void **state) {
    (void)state;
    enum { N = 100000 };
    kvp_rng_t r;
    kvp_rng_seed(&r, 1);
    double sum = 0.0, sq = 0.0;
    float lo = 1.0f, hi = 0.0f;
    for (int i = 0; i < N; i++) {
        float u = kvp_rng_uniform(&r);
        assert_true(u >= 0.0f && u < 1.0f);
        lo = fminf(lo, u);
        hi = fmaxf(hi, u);
        sum += u;
        sq += (double)u * u;
    }
    double mean = sum / N, var = sq / N - mean * mean;
    assert_true(fabs(mean - 0.5) < 0.02);
    assert_true(fabs(var - 1.0 / 12.0) < 0.02);
    assert_true(lo < 0.001f && hi > 0.999f);
}

static void rng_normal_has_mean_zero_and_variance_one(void **state) {
    (void)state;
    enum { N = 100000 };
    kvp_rng_t r;
    kvp_rng_seed(&r, 2);
    double sum = 0.0, sq = 0.0;
    int beyond_2sd = 0;
    for (int i = 0; i < N; i++) {
        float x = kvp_rng_normal(&r);
        assert_true(isfinite(x));
        sum += x;
        sq += (double)x * x;
        beyond_2sd += fabsf(x) > 2.0f;
    }
    double mean = sum / N, var = sq / N - mean * mean;
    assert_true(fabs(mean) < 0.02);
    assert_true(fabs(var - 1.0) < 0.02);
    /* a normal tail, not some other unit-variance shape: 4.55% beyond 2 sd */
    assert_true(fabs((double)beyond_2sd / N - 0.0455) < 0.005);
}

static void rng_below_is_in_range_and_roughly_uniform(void **state) {
    (void)state;
    enum { N = 100000, BINS = 10 };
    kvp_rng_t r;
    kvp_rng_seed(&r, 3);
    int count[BINS] = {0};
    for (int i = 0; i < N; i++) {
        uint64_t x = kvp_rng_below(&r, BINS);
        assert_true(x < BINS);
        count[x]++;
    }
    for (int i = 0; i < BINS; i++)
        assert_true(abs(count[i] - N / BINS) < N / BINS / 10); /* within 10% (about 10 sd) */
    for (int i = 0; i < 100; i++)
        assert_true(kvp_rng_below(&r, 1) == 0);
    /* a bound just past 2^63 exercises the rejection of the biased tail */
    const uint64_t big = (UINT64_C(1) << 63) + 1;
    int upper = 0;
    for (int i = 0; i < 10000; i++) {
        uint64_t x = kvp_rng_below(&r, big);
        assert_true(x < big);
        upper += x >= big / 2;
    }
    assert_true(abs(upper - 5000) < 300);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(argmax_returns_first_of_ties),
        cmocka_unit_test(zero_or_negative_temperature_is_greedy),
        cmocka_unit_test(same_seed_gives_same_sequence_and_other_seed_differs),
        cmocka_unit_test(top_k_one_is_greedy_at_any_temperature),
        cmocka_unit_test(top_k_never_returns_a_token_outside_the_top_k),
        cmocka_unit_test(small_top_p_returns_only_the_top_token),
        cmocka_unit_test(top_p_keeps_the_smallest_prefix_reaching_p),
        cmocka_unit_test(temperature_one_matches_softmax),
        cmocka_unit_test(lower_temperature_sharpens_the_distribution),
        cmocka_unit_test(sampling_does_not_modify_logits),
        cmocka_unit_test(invalid_parameters_are_refused),
        cmocka_unit_test(rng_same_seed_same_stream_other_seed_differs),
        cmocka_unit_test(rng_uniform_is_in_unit_interval),
        cmocka_unit_test(rng_normal_has_mean_zero_and_variance_one),
        cmocka_unit_test(rng_below_is_in_range_and_roughly_uniform),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
