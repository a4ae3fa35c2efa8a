/* Tests for kvp_kvcache: un-rotated keys and values round-trip through
 * write/read, the stored keys are the RoPE-rotated ones at the documented
 * [n_kv_head][cap][head_dim] layout, the cache's cos/sin table rotates bit for
 * bit as kvp_rope does per call, write_rows (strides and bias), the model's
 * store() path, and every range and shape check with its message. */
#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvp_kvcache.h"
#include "kvp_ops.h"

enum { N_LAYER = 3, N_KV_HEAD = 2, HEAD_DIM = 8, CAP = 40, WIDTH = N_KV_HEAD * HEAD_DIM };

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static float *rand_rows(int n_tok, int ld) {
    float *p = malloc(sizeof(float) * (size_t)n_tok * ld);
    assert_non_null(p);
    for (size_t i = 0; i < (size_t)n_tok * ld; i++)
        p[i] = (float)((double)(rng() >> 11) * (2.0 / 9007199254740992.0) - 1.0);
    return p;
}

static kvp_kvcache_t *new_cache(int rope_dim, int cap, float *inv_freq) {
    kvp_kvcache_t *c = NULL;
    kvp_err_t err = {0};
    if (rope_dim) kvp_rope_inv_freq(inv_freq, rope_dim, 10000.0f, NULL);
    int rc = kvp_kvcache_new(&c, N_LAYER, N_KV_HEAD, HEAD_DIM, cap, rope_dim,
                             rope_dim ? inv_freq : NULL, &err);
    if (rc) print_error("kvp_kvcache_new: %s\n", err.msg);
    assert_int_equal(rc, KVP_OK);
    assert_non_null(c);
    return c;
}

/* Fails unless each row of got equals want to rtol relative to the row's
 * largest value. */
static void assert_rows_close(const float *got, const float *want, int n_tok, double rtol) {
    for (int t = 0; t < n_tok; t++) {
        const float *g = got + (size_t)t * WIDTH, *w = want + (size_t)t * WIDTH;
        double mx = 0.0;
        for (int i = 0; i < WIDTH; i++)
            mx = fmax(mx, fabs(w[i]));
        for (int i = 0; i < WIDTH; i++)
            if (!(fabs((double)g[i] - w[i]) <= rtol * mx)) {
                print_error("row %d element %d: %.9g, want %.9g\n", t, i, (double)g[i],
                            (double)w[i]);
                fail();
            }
    }
}

static int all_zero(const float *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != 0.0f) return 0;
    return 1;
}

static void write_then_read_returns_unrotated_keys_and_values(void **state) {
    (void)state;
    const int rope_dims[] = {HEAD_DIM, 4, 0}; /* full, partial, none */
    const int ranges[][2] = {
        {0, 1}, {5, 13}, {27, 13}, {0, CAP}}; /* pos0, n_tok; last two end at cap */
    for (int ri = 0; ri < 3; ri++)
        for (int pi = 0; pi < 4; pi++) {
            float inv_freq[HEAD_DIM / 2];
            kvp_kvcache_t *c = new_cache(rope_dims[ri], CAP, inv_freq);
            int pos0 = ranges[pi][0], n_tok = ranges[pi][1];
            float *k = rand_rows(n_tok, WIDTH), *v = rand_rows(n_tok, WIDTH);
            float *k2 = rand_rows(n_tok, WIDTH), *v2 = rand_rows(n_tok, WIDTH);
            kvp_err_t err = {0};
            assert_int_equal(kvp_kvcache_write(c, 1, pos0, n_tok, k, v, &err), KVP_OK);
            assert_int_equal(c->len, 0); /* write does not change len */
            assert_int_equal(kvp_kvcache_read(c, 1, pos0, n_tok, k2, v2, &err), KVP_OK);
            assert_rows_close(k2, k, n_tok, 1e-5);
            assert_memory_equal(v2, v, sizeof(float) * (size_t)n_tok * WIDTH);
            /* either output may be NULL */
            float *k3 = rand_rows(n_tok, WIDTH);
            assert_int_equal(kvp_kvcache_read(c, 1, pos0, n_tok, k3, NULL, &err), KVP_OK);
            assert_memory_equal(k3, k2, sizeof(float) * (size_t)n_tok * WIDTH);
            assert_int_equal(kvp_kvcache_read(c, 1, pos0, n_tok, NULL, k3, &err), KVP_OK);
            assert_memory_equal(k3, v, sizeof(float) * (size_t)n_tok * WIDTH);
            /* the other layers are untouched */
            size_t layer = (size_t)N_KV_HEAD * CAP * HEAD_DIM;
            assert_true(all_zero(kvp_kvcache_k(c, 0), layer) &&
                        all_zero(kvp_kvcache_v(c, 0), layer));
            assert_true(all_zero(kvp_kvcache_k(c, 2), layer) &&
                        all_zero(kvp_kvcache_v(c, 2), layer));
            free(k);
            free(v);
            free(k2);
            free(v2);
            free(k3);
            kvp_kvcache_free(&c);
            assert_null(c);
        }
}

static void write_stores_rotated_keys_head_major(void **state) {
    (void)state;
    float inv_freq[HEAD_DIM / 2];
    kvp_kvcache_t *c = new_cache(HEAD_DIM, CAP, inv_freq);
    const int pos0 = 6, n_tok = 9, layer = 2;
    float *k = rand_rows(n_tok, WIDTH), *v = rand_rows(n_tok, WIDTH);
    assert_int_equal(kvp_kvcache_write(c, layer, pos0, n_tok, k, v, NULL), KVP_OK);
    const float *kb = kvp_kvcache_k(c, layer), *vb = kvp_kvcache_v(c, layer);
    assert_true(kb == c->k + (size_t)layer * N_KV_HEAD * CAP * HEAD_DIM);
    assert_true(vb == c->v + (size_t)layer * N_KV_HEAD * CAP * HEAD_DIM);
    for (int t = 0; t < n_tok; t++) {
        float rot[WIDTH];
        memcpy(rot, k + (size_t)t * WIDTH, sizeof rot);
        kvp_rope(rot, N_KV_HEAD, HEAD_DIM, HEAD_DIM, pos0 + t, inv_freq, 1.0f);
        if (t > 0) /* the rotation is not the identity, so the comparison means something */
            assert_true(fabs(rot[0] - k[(size_t)t * WIDTH]) > 1e-4 ||
                        fabs(rot[1] - k[(size_t)t * WIDTH + 1]) > 1e-4);
        for (int h = 0; h < N_KV_HEAD; h++)
            for (int d = 0; d < HEAD_DIM; d++) {
                size_t at = ((size_t)h * CAP + pos0 + t) * HEAD_DIM + d;
                assert_true(fabs(kb[at] - rot[h * HEAD_DIM + d]) <= 1e-6);
                assert_true(vb[at] == v[(size_t)t * WIDTH + h * HEAD_DIM + d]);
            }
    }
    /* slots outside [pos0, pos0 + n_tok) of each head stay empty */
    for (int h = 0; h < N_KV_HEAD; h++) {
        assert_true(all_zero(kb + (size_t)h * CAP * HEAD_DIM, (size_t)pos0 * HEAD_DIM));
        assert_true(all_zero(kb + ((size_t)h * CAP + pos0 + n_tok) * HEAD_DIM,
                             (size_t)(CAP - pos0 - n_tok) * HEAD_DIM));
    }
    free(k);
    free(v);
    kvp_kvcache_free(&c);
}

/* The per-cache cos/sin table must not change a single bit against rotating
 * with kvp_rope per call (what write/read did before the table): cached keys
 * written by one version are read by the other. Far positions too, where the
 * angles are large. */
static void rope_table_rotates_bit_for_bit_as_kvp_rope(void **state) {
    (void)state;
    const int rope_dims[] = {HEAD_DIM, 4}; /* full, partial */
    const int cap = 5000, pos0s[] = {0, 3, cap - 9};
    for (int ri = 0; ri < 2; ri++)
        for (int pi = 0; pi < 3; pi++) {
            const int rope_dim = rope_dims[ri], pos0 = pos0s[pi], n_tok = 9, layer = 2;
            float inv_freq[HEAD_DIM / 2];
            kvp_kvcache_t *c = new_cache(rope_dim, cap, inv_freq);
            float *k = rand_rows(n_tok, WIDTH), *v = rand_rows(n_tok, WIDTH);
            float *got = rand_rows(n_tok, WIDTH);
            kvp_err_t err = {0};
            assert_int_equal(kvp_kvcache_write(c, layer, pos0, n_tok, k, v, &err), KVP_OK);
            const float *kb = kvp_kvcache_k(c, layer);
            for (int t = 0; t < n_tok; t++) {
                float cs[HEAD_DIM], want[WIDTH];
                kvp_rope_table(cs, rope_dim, pos0 + t, inv_freq);
                assert_memory_equal(kvp_kvcache_rope_cs(c, pos0 + t), cs,
                                    sizeof(float) * (size_t)rope_dim);
                /* write: the stored key is kvp_rope's rotation of the row */
                memcpy(want, k + (size_t)t * WIDTH, sizeof want);
                kvp_rope(want, N_KV_HEAD, HEAD_DIM, rope_dim, pos0 + t, inv_freq, 1.0f);
                for (int h = 0; h < N_KV_HEAD; h++)
                    assert_memory_equal(kb + ((size_t)h * cap + pos0 + t) * HEAD_DIM,
                                        want + h * HEAD_DIM, sizeof(float) * HEAD_DIM);
            }
            /* read: kvp_rope's inverse rotation of the stored key */
            assert_int_equal(kvp_kvcache_read(c, layer, pos0, n_tok, got, NULL, &err), KVP_OK);
            for (int t = 0; t < n_tok; t++) {
                float want[WIDTH];
                for (int h = 0; h < N_KV_HEAD; h++)
                    memcpy(want + h * HEAD_DIM, kb + ((size_t)h * cap + pos0 + t) * HEAD_DIM,
                           sizeof(float) * HEAD_DIM);
                kvp_rope(want, N_KV_HEAD, HEAD_DIM, rope_dim, pos0 + t, inv_freq, -1.0f);
                assert_memory_equal(got + (size_t)t * WIDTH, want, sizeof want);
            }
            free(k), free(v), free(got);
            kvp_kvcache_free(&c);
        }
}

/* write_rows with strided rows and a bias stores what write stores for the
 * rows with the bias added first; NULL k or v leaves that half alone. */
static void write_rows_equals_adding_the_bias_then_writing(void **state) {
    (void)state;
    float inv_freq[HEAD_DIM / 2];
    kvp_kvcache_t *a = new_cache(4, CAP, inv_freq), *b = new_cache(4, CAP, inv_freq);
    const int pos0 = 6, n_tok = 5, layer = 1, ld = 3 * WIDTH + 1;
    float *k = rand_rows(n_tok, ld), *v = rand_rows(n_tok, ld);
    float *kb = rand_rows(1, WIDTH), *vb = rand_rows(1, WIDTH);
    float *k2 = rand_rows(n_tok, WIDTH), *v2 = rand_rows(n_tok, WIDTH);
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < WIDTH; i++) {
            k2[t * WIDTH + i] = k[(size_t)t * ld + i] + kb[i];
            v2[t * WIDTH + i] = v[(size_t)t * ld + i] + vb[i];
        }
    kvp_err_t err = {0};
    assert_int_equal(kvp_kvcache_write_rows(a, layer, pos0, n_tok, k, ld, kb, NULL, 0, NULL, &err),
                     KVP_OK);
    assert_true(all_zero(a->v, (size_t)N_LAYER * N_KV_HEAD * CAP * HEAD_DIM));
    assert_int_equal(kvp_kvcache_write_rows(a, layer, pos0, n_tok, NULL, 0, NULL, v, ld, vb, &err),
                     KVP_OK);
    assert_int_equal(kvp_kvcache_write(b, layer, pos0, n_tok, k2, v2, &err), KVP_OK);
    size_t n = (size_t)N_LAYER * N_KV_HEAD * CAP * HEAD_DIM;
    assert_memory_equal(a->k, b->k, sizeof(float) * n);
    assert_memory_equal(a->v, b->v, sizeof(float) * n);
    /* and its range is checked like write's */
    assert_int_equal(kvp_kvcache_write_rows(a, layer, CAP - 2, 3, k, ld, kb, v, ld, vb, &err),
                     KVP_ERANGE);
    assert_int_equal(kvp_kvcache_check_range(a, layer, CAP - 3, 3, &err), KVP_OK);
    assert_int_equal(kvp_kvcache_check_range(a, N_LAYER, 0, 1, &err), KVP_ERANGE);
    free(k), free(v), free(kb), free(vb), free(k2), free(v2);
    kvp_kvcache_free(&a), kvp_kvcache_free(&b);
}

static void store_places_rotated_rows_with_strides(void **state) {
    (void)state;
    float inv_freq[HEAD_DIM / 2];
    kvp_kvcache_t *c = new_cache(HEAD_DIM, CAP, inv_freq);
    const int pos0 = 11, n_tok = 4, layer = 1, ld_k = WIDTH + 3, ld_v = 2 * WIDTH;
    float *k_rot = rand_rows(n_tok, ld_k), *v = rand_rows(n_tok, ld_v);
    kvp_kvcache_store(c, layer, pos0, n_tok, k_rot, ld_k, v, ld_v);
    const float *kb = kvp_kvcache_k(c, layer), *vb = kvp_kvcache_v(c, layer);
    for (int t = 0; t < n_tok; t++)
        for (int h = 0; h < N_KV_HEAD; h++) {
            size_t at = ((size_t)h * CAP + pos0 + t) * HEAD_DIM;
            assert_memory_equal(kb + at, k_rot + (size_t)t * ld_k + h * HEAD_DIM,
                                sizeof(float) * HEAD_DIM);
            assert_memory_equal(vb + at, v + (size_t)t * ld_v + h * HEAD_DIM,
                                sizeof(float) * HEAD_DIM);
        }
    /* read() undoes the rotation that store() was given */
    float got[4 * WIDTH];
    assert_int_equal(kvp_kvcache_read(c, layer, pos0, n_tok, got, NULL, NULL), KVP_OK);
    for (int t = 0; t < n_tok; t++) {
        float want[WIDTH];
        memcpy(want, k_rot + (size_t)t * ld_k, sizeof want);
        kvp_rope(want, N_KV_HEAD, HEAD_DIM, HEAD_DIM, pos0 + t, inv_freq, -1.0f);
        assert_rows_close(got + t * WIDTH, want, 1, 1e-6);
    }
    free(k_rot);
    free(v);
    kvp_kvcache_free(&c);
}

/* Calls write and read with one bad range; both must return KVP_ERANGE with
 * a message containing `needle`, and the cache must not change. */
static void expect_range_error(kvp_kvcache_t *c, int layer, int pos0, int n_tok,
                               const char *needle) {
    float *buf = calloc((size_t)CAP * WIDTH, sizeof(float));
    assert_non_null(buf);
    for (size_t i = 0; i < (size_t)CAP * WIDTH; i++)
        buf[i] = 1.0f;
    size_t total = (size_t)N_LAYER * N_KV_HEAD * CAP * HEAD_DIM;
    kvp_err_t err = {0};
    assert_int_equal(kvp_kvcache_write(c, layer, pos0, n_tok, buf, buf, &err), KVP_ERANGE);
    assert_int_equal(err.code, KVP_ERANGE);
    if (!strstr(err.msg, needle)) {
        print_error("write message \"%s\" does not name \"%s\"\n", err.msg, needle);
        fail();
    }
    memset(&err, 0, sizeof err);
    assert_int_equal(kvp_kvcache_read(c, layer, pos0, n_tok, buf, buf, &err), KVP_ERANGE);
    assert_int_equal(err.code, KVP_ERANGE);
    if (!strstr(err.msg, needle)) {
        print_error("read message \"%s\" does not name \"%s\"\n", err.msg, needle);
        fail();
    }
    assert_true(all_zero(c->k, total) && all_zero(c->v, total));
    /* the read did not write its outputs either */
    assert_true(buf[0] == 1.0f && buf[(size_t)CAP * WIDTH - 1] == 1.0f);
    /* NULL err is allowed */
    assert_int_equal(kvp_kvcache_write(c, layer, pos0, n_tok, buf, buf, NULL), KVP_ERANGE);
    free(buf);
}

static void write_and_read_reject_ranges_outside_the_cache(void **state) {
    (void)state;
    float inv_freq[HEAD_DIM / 2];
    kvp_kvcache_t *c = new_cache(HEAD_DIM, CAP, inv_freq);
    expect_range_error(c, -1, 0, 1, "layer -1 out of range [0, 3)");
    expect_range_error(c, N_LAYER, 0, 1, "layer 3 out of range [0, 3)");
    expect_range_error(c, 0, -1, 2, "positions [-1, 1) outside the capacity of 40");
    expect_range_error(c, 0, CAP - 3, 4, "positions [37, 41) outside the capacity of 40");
    expect_range_error(c, 0, CAP, 1, "positions [40, 41) outside the capacity of 40");
    expect_range_error(c, 0, 0, CAP + 1, "positions [0, 41) outside the capacity of 40");
    expect_range_error(c, 0, 5, -1, "outside the capacity of 40");
    expect_range_error(c, 0, INT_MAX, 1, "positions [2147483647, 2147483648) outside");
    expect_range_error(c, 0, 1, INT_MAX, "positions [1, 2147483648) outside");
    kvp_kvcache_free(&c);
}

static void write_and_read_accept_ranges_up_to_the_capacity(void **state) {
    (void)state;
    float inv_freq[HEAD_DIM / 2];
    kvp_kvcache_t *c = new_cache(HEAD_DIM, CAP, inv_freq);
    float *k = rand_rows(1, WIDTH);
    assert_int_equal(kvp_kvcache_write(c, N_LAYER - 1, CAP - 1, 1, k, k, NULL), KVP_OK);
    assert_int_equal(kvp_kvcache_read(c, N_LAYER - 1, CAP - 1, 1, k, k, NULL), KVP_OK);
    /* an empty range at the end is valid and touches nothing */
    assert_int_equal(kvp_kvcache_write(c, 0, CAP, 0, k, k, NULL), KVP_OK);
    assert_int_equal(kvp_kvcache_read(c, 0, CAP, 0, k, k, NULL), KVP_OK);
    free(k);
    kvp_kvcache_free(&c);
}

static void set_len_accepts_zero_to_cap_only(void **state) {
    (void)state;
    float inv_freq[HEAD_DIM / 2];
    kvp_kvcache_t *c = new_cache(HEAD_DIM, CAP, inv_freq);
    kvp_err_t err = {0};
    assert_int_equal(kvp_kvcache_set_len(c, CAP, &err), KVP_OK);
    assert_int_equal(c->len, CAP);
    assert_int_equal(kvp_kvcache_set_len(c, 0, &err), KVP_OK);
    assert_int_equal(c->len, 0);
    assert_int_equal(kvp_kvcache_set_len(c, 17, &err), KVP_OK);
    assert_int_equal(c->len, 17);
    const int bad[] = {-1, CAP + 1, INT_MIN, INT_MAX};
    for (int i = 0; i < 4; i++) {
        memset(&err, 0, sizeof err);
        assert_int_equal(kvp_kvcache_set_len(c, bad[i], &err), KVP_ERANGE);
        assert_int_equal(err.code, KVP_ERANGE);
        assert_non_null(strstr(err.msg, "[0, 40]"));
        assert_int_equal(c->len, 17); /* unchanged */
    }
    kvp_kvcache_free(&c);
}

static void bytes_per_token_counts_k_and_v_of_all_layers(void **state) {
    (void)state;
    float inv_freq[HEAD_DIM / 2];
    kvp_kvcache_t *c = new_cache(HEAD_DIM, CAP, inv_freq);
    assert_int_equal(kvp_kvcache_bytes_per_token(c),
                     2 * sizeof(float) * N_LAYER * N_KV_HEAD * HEAD_DIM);
    assert_int_equal(kvp_kvcache_bytes_per_token(c), 384);
    kvp_kvcache_free(&c);
}

static void new_rejects_bad_shape(void **state) {
    (void)state;
    float inv_freq[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    /* n_layer, n_kv_head, head_dim, cap, rope_dim */
    const int bad[]
                 [5] = {
                     {0, 2, 8, 4, 8},  {-1, 2, 8, 4, 8}, {1, 0, 8, 4, 8},
                     {1, 2, 0, 4, 0},  {1, 2, -8, 4, 0}, {1, 2, 8, 0, 8},
                     {1, 2, 8, -4, 8}, {1, 2, 8, 4, -2}, {1, 2, 8, 4, 10}, /* rope_dim > head_dim */
                     {1, 2, 8, 4, 3},                                      /* odd rope_dim */
                 };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kvp_kvcache_t *c = (kvp_kvcache_t *)&inv_freq; /* must be reset to NULL */
        kvp_err_t err = {0};
        int rc = kvp_kvcache_new(&c, bad[i][0], bad[i][1], bad[i][2], bad[i][3], bad[i][4],
                                 inv_freq, &err);
        if (rc != KVP_EINVAL) print_error("shape %zu accepted\n", i);
        assert_int_equal(rc, KVP_EINVAL);
        assert_int_equal(err.code, KVP_EINVAL);
        assert_null(c);
        assert_non_null(strstr(err.msg, "bad shape"));
    }
}

static void free_accepts_null(void **state) {
    (void)state;
    kvp_kvcache_t *c = NULL;
    kvp_kvcache_free(&c);
    kvp_kvcache_free(NULL);
    assert_null(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(write_then_read_returns_unrotated_keys_and_values),
        cmocka_unit_test(write_stores_rotated_keys_head_major),
        cmocka_unit_test(rope_table_rotates_bit_for_bit_as_kvp_rope),
        cmocka_unit_test(write_rows_equals_adding_the_bias_then_writing),
        cmocka_unit_test(store_places_rotated_rows_with_strides),
        cmocka_unit_test(write_and_read_reject_ranges_outside_the_cache),
        cmocka_unit_test(write_and_read_accept_ranges_up_to_the_capacity),
        cmocka_unit_test(set_len_accepts_zero_to_cap_only),
        cmocka_unit_test(bytes_per_token_counts_k_and_v_of_all_layers),
        cmocka_unit_test(new_rejects_bad_shape),
        cmocka_unit_test(free_accepts_null),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
