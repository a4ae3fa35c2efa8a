/* Tests of lib/kvp_kvpgen: the in-process KV Prediction hand-over. With a
 * perfect predictor (the auxiliary model is the base model, identity maps)
 * it must give the base model's own tokens; chunking must not change them. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvp_kvpgen.h"
#include "kvp_rng.h"

typedef struct {
    int32_t toks[256];
    int n;
} collect_t;

static int collect(void *user, int32_t tok) {
    collect_t *c = user;
    c->toks[c->n++] = tok;
    return 0;
}

static kvp_model_t *model(uint64_t seed, int n_layer) {
    kvp_model_config_t cfg = {.n_vocab = 97,
                              .n_embd = 48,
                              .n_layer = n_layer,
                              .n_head = 4,
                              .n_kv_head = 2,
                              .n_ff = 80,
                              .n_ctx_train = 512};
    kvp_model_t *m = NULL;
    kvp_err_t err = {0};
    /* large weights so the greedy tokens are not all the same one */
    if (kvp_model_new_random(&m, &cfg, seed, 0.3f, &err)) fail_msg("%s", err.msg);
    return m;
}

static void prompt_of(int32_t *p, int n, uint64_t seed) {
    kvp_rng_t r;
    kvp_rng_seed(&r, seed);
    for (int i = 0; i < n; i++)
        p[i] = (int32_t)kvp_rng_below(&r, 97);
}

static void test_perfect_predictor_equals_base_generation(void **state) {
    (void)state;
    kvp_model_t *base = model(1, 3);
    kvp_predictor_t *p = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_new_identity(&p, kvp_kv_shape_of(base), &err), 0);
    int32_t prompt[70];
    prompt_of(prompt, 70, 2);
    kvp_gen_params_t gp = {.n_predict = 40, .sampler = {.temp = 0.0f, .top_p = 1.0f}, .chunk = 16};
    int lens[] = {1, 2, 17, 70};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        collect_t a = {0}, b = {0};
        kvp_kvp_stats_t st;
        assert_int_equal(kvp_generate(base, prompt, lens[i], &gp, -1, collect, &a, NULL, &err), 0);
        if (kvp_kvp_generate(base, base, p, prompt, lens[i], &gp, -1, collect, &b, &st, &err))
            fail_msg("%s", err.msg);
        assert_int_equal(a.n, 40);
        assert_int_equal(b.n, 40);
        assert_memory_equal(a.toks, b.toks, sizeof(int32_t) * 40);
        assert_int_equal(st.n_prompt, lens[i]);
        assert_int_equal(st.n_generated, 40);
    }
    kvp_predictor_free(&p);
    kvp_model_free(&base);
}

/* A different auxiliary model with a zero predictor gives a base cache of
 * zero keys and values: the tokens must then differ from plain base
 * generation — the predicted cache is really what the base model reads. */
static void test_generation_reads_the_predicted_cache(void **state) {
    (void)state;
    kvp_model_t *base = model(1, 3), *aux = model(9, 2);
    kvp_predictor_t *p = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_new(&p, kvp_kv_shape_of(aux), kvp_kv_shape_of(base), NULL, &err),
                     0);
    int32_t prompt[60];
    prompt_of(prompt, 60, 3);
    kvp_gen_params_t gp = {.n_predict = 30, .sampler = {.temp = 0.0f, .top_p = 1.0f}, .chunk = 7};
    collect_t a = {0}, b = {0};
    assert_int_equal(kvp_generate(base, prompt, 60, &gp, -1, collect, &a, NULL, &err), 0);
    assert_int_equal(kvp_kvp_generate(aux, base, p, prompt, 60, &gp, -1, collect, &b, NULL, &err),
                     0);
    assert_int_equal(b.n, 30);
    assert_memory_not_equal(a.toks, b.toks, sizeof(int32_t) * 30);
    kvp_predictor_free(&p);
    kvp_model_free(&aux);
    kvp_model_free(&base);
}

static void test_mismatched_predictor_is_refused(void **state) {
    (void)state;
    kvp_model_t *base = model(1, 3), *aux = model(9, 2);
    kvp_predictor_t *p = NULL;
    kvp_err_t err = {0};
    /* identity for the base's shape does not fit a 2-layer auxiliary model */
    assert_int_equal(kvp_predictor_new_identity(&p, kvp_kv_shape_of(base), &err), 0);
    int32_t prompt[5] = {1, 2, 3, 4, 5};
    kvp_gen_params_t gp = {.n_predict = 3};
    assert_int_equal(kvp_kvp_generate(aux, base, p, prompt, 5, &gp, -1, NULL, NULL, NULL, &err),
                     KVP_ESHAPE);
    assert_non_null(strstr(err.msg, "n_layer"));
    kvp_predictor_free(&p);
    kvp_model_free(&aux);
    kvp_model_free(&base);
}

/* One auxiliary cache kept across prompts of different lengths (longest
 * first, then shorter, as an evaluation or a benchmark runs them) gives the
 * logits of a fresh cache per prompt, bit for bit: nothing of the previous
 * prompt leaks through the reused cache. */
static void test_reused_aux_cache_equals_a_fresh_one(void **state) {
    (void)state;
    kvp_model_t *base = model(1, 3), *aux = model(9, 2);
    kvp_predictor_t *p = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_new(&p, kvp_kv_shape_of(aux), kvp_kv_shape_of(base), NULL, &err),
                     0);
    kvp_rng_t r;
    kvp_rng_seed(&r, 4);
    for (size_t i = 0; i < p->n_params; i++)
        p->params[i] = 0.2f * (2.0f * kvp_rng_uniform(&r) - 1.0f);
    enum { N = 50 };
    int32_t prompt[N];
    prompt_of(prompt, N, 5);
    kvp_model_ctx_t *actx = NULL, *bctx = NULL;
    kvp_kvcache_t *acache = NULL, *bcache = NULL;
    assert_int_equal(kvp_model_ctx_new(&actx, aux, 8, N - 1, &err), 0);
    assert_int_equal(kvp_model_ctx_new(&bctx, base, 8, N, &err), 0);
    assert_int_equal(kvp_model_new_cache(aux, N - 1, &acache, &err), 0);
    assert_int_equal(kvp_model_new_cache(base, N, &bcache, &err), 0);
    float want[97], got[97];
    const int lens[] = {N, 31, 2, N};
    for (int i = 0; i < 4; i++) {
        bcache->len = 0;
        assert_int_equal(
            kvp_kvp_prefill(actx, bctx, p, NULL, bcache, prompt, lens[i], 8, want, NULL, &err), 0);
        bcache->len = 0;
        assert_int_equal(
            kvp_kvp_prefill(actx, bctx, p, acache, bcache, prompt, lens[i], 8, got, NULL, &err), 0);
        assert_memory_equal(got, want, sizeof want);
        assert_int_equal(acache->len, lens[i] - 1);
    }
    kvp_kvcache_free(&acache), kvp_kvcache_free(&bcache);
    kvp_model_ctx_free(&actx), kvp_model_ctx_free(&bctx);
    kvp_predictor_free(&p);
    kvp_model_free(&aux), kvp_model_free(&base);
}

static void test_ttft_flops_formula(void **state) {
    (void)state;
    kvp_model_t *base = model(1, 3), *aux = model(9, 2);
    kvp_predictor_t *p = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_new(&p, kvp_kv_shape_of(aux), kvp_kv_shape_of(base), NULL, &err),
                     0);
    int n = 100;
    double want = kvp_model_flops(&aux->cfg, 0, n - 1) - 2.0 * 48 * 97 +
                  2.0 * 2.0 * 24 * 24 * 3 * (n - 1) + kvp_model_flops(&base->cfg, n - 1, 1);
    assert_true(kvp_kvp_ttft_flops(&aux->cfg, &base->cfg, p, n) == want);
    /* one-token prompt: only the base step */
    assert_true(kvp_kvp_ttft_flops(&aux->cfg, &base->cfg, p, 1) ==
                kvp_model_flops(&base->cfg, 0, 1));
    kvp_predictor_free(&p);
    kvp_model_free(&aux);
    kvp_model_free(&base);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_perfect_predictor_equals_base_generation),
        cmocka_unit_test(test_generation_reads_the_predicted_cache),
        cmocka_unit_test(test_mismatched_predictor_is_refused),
        cmocka_unit_test(test_reused_aux_cache_equals_a_fresh_one),
        cmocka_unit_test(test_ttft_flops_formula),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
