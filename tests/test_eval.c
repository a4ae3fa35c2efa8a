/* Tests of lib/kvp_eval (scorers, the HumanEval-like extractor, cache-quality
 * metrics, TTFT FLOPs, the test data, the runner) and lib/kvp_prune. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvp_eval.h"
#include "kvp_prune.h"
#include "kvp_rng.h"

static char g_dir[1024];

static int setup(void **state) {
    (void)state;
    const char *base = getenv("KVP_TEST_TMP");
    snprintf(g_dir, sizeof g_dir, "%s/eval-%ld", base ? base : "/tmp", (long)getpid());
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s/corpus'", g_dir, g_dir);
    return system(cmd) ? -1 : 0;
}

static int teardown(void **state) {
    (void)state;
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    return system(cmd) ? -1 : 0;
}

static void put(const char *rel, const char *text) {
    char p[2400];
    snprintf(p, sizeof p, "%s/%s", g_dir, rel);
    FILE *f = fopen(p, "w");
    if (!f) fail_msg("cannot write %s", p);
    fputs(text, f);
    fclose(f);
}

/* A GGUF holding only kvpred's byte-level vocabulary, opened. */
static kvp_gguf_t *vocab_file(void) {
    char p[2400];
    snprintf(p, sizeof p, "%s/vocab.gguf", g_dir);
    kvp_err_t err = {0};
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    if (kvp_tokenizer_write_bytelevel(w, NULL, 0, &err) || kvp_gguf_writer_write(w, p, &err))
        fail_msg("%s", err.msg);
    kvp_gguf_writer_free(&w);
    kvp_gguf_t *g = NULL;
    if (kvp_gguf_open(&g, p, &err)) fail_msg("%s", err.msg);
    return g;
}

static kvp_model_t *model(int vocab, int embd, int layers, int heads, int kv_heads, int ffn,
                          uint64_t seed, float std) {
    kvp_model_config_t c = {.n_vocab = vocab,
                            .n_embd = embd,
                            .n_layer = layers,
                            .n_head = heads,
                            .n_kv_head = kv_heads,
                            .n_ff = ffn,
                            .n_ctx_train = 256};
    kvp_model_t *m = NULL;
    kvp_err_t err = {0};
    if (kvp_model_new_random(&m, &c, seed, std, &err)) fail_msg("%s", err.msg);
    return m;
}

/* ---- scoring ------------------------------------------------------------ */

static void test_accuracy_counts_matching_positions(void **state) {
    (void)state;
    int32_t truth[] = {5, 6, 7, 8};
    int32_t same[] = {5, 6, 7, 8}, half[] = {5, 0, 7, 0}, shifted[] = {6, 7, 8, 9};
    assert_true(kvp_eval_token_accuracy(same, truth, 4) == 1.0);
    assert_true(kvp_eval_token_accuracy(half, truth, 4) == 0.5);
    /* one token off at the start: every position differs, as the metric intends */
    assert_true(kvp_eval_token_accuracy(shifted, truth, 4) == 0.0);
    assert_true(kvp_eval_token_accuracy(half, truth, 1) == 1.0);
    assert_true(kvp_eval_token_accuracy(half, truth, 0) == 0.0);
}

static void test_log_prob_is_a_log_softmax(void **state) {
    (void)state;
    float l[3] = {0.0f, 0.0f, 0.0f};
    assert_true(fabs(kvp_eval_log_prob(l, 3, 1) - log(1.0 / 3)) < 1e-12);
    float big[2] = {1000.0f, 0.0f}; /* stable: no overflow */
    assert_true(fabs(kvp_eval_log_prob(big, 2, 0)) < 1e-12);
    assert_true(fabs(kvp_eval_log_prob(big, 2, 1) + 1000.0) < 1e-9);
}

static void test_first_lines_strip_and_skip_blank_lines(void **state) {
    (void)state;
    char out[64];
    const char *t = "  a = 1  \n\n\t b()\nc";
    assert_int_equal(kvp_eval_first_lines(t, strlen(t), 2, false, out, sizeof out), 2);
    assert_string_equal(out, "a = 1\nb()");
    assert_int_equal(kvp_eval_first_lines(t, strlen(t), 1, false, out, sizeof out), 1);
    assert_string_equal(out, "a = 1");
    /* an unfinished last line counts only when the text is final */
    assert_int_equal(kvp_eval_first_lines("x", 1, 1, false, out, sizeof out), 0);
    assert_string_equal(out, "");
    assert_int_equal(kvp_eval_first_lines("x", 1, 1, true, out, sizeof out), 1);
    assert_string_equal(out, "x");
    assert_int_equal(kvp_eval_first_lines("abcdef\n", 7, 1, false, out, 4), 1);
    assert_string_equal(out, "abc"); /* truncated to the buffer */
}

/* ---- HumanEval-like items ------------------------------------------------ */

static const char *SNIPPET = "import os\n"
                             "\n"
                             "def add(a, b):\n"
                             "    \"\"\"Add two numbers.\"\"\"\n"
                             "    return a + b\n"
                             "\n"
                             "class K:\n"
                             "    def method(self,\n"
                             "               x: int) -> int:\n"
                             "        '''Multi-line\n"
                             "        docstring.\n"
                             "        '''\n"
                             "\n"
                             "        y = x * 2\n"
                             "        return y\n"
                             "\n"
                             "    def nodoc(self):\n"
                             "        return 1\n"
                             "\n"
                             "    async def co(self):\n"
                             "        r\"\"\"Raw doc.\"\"\"\n"
                             "        await thing()\n"
                             "\n"
                             "def empty():\n"
                             "    \"\"\"Only a docstring.\"\"\"\n"
                             "\n"
                             "def bad():\n"
                             "    \"\"\"Closing quotes then code\"\"\"; x = 1\n"
                             "    return x\n";

static void test_humaneval_extracts_def_and_docstring_prompts(void **state) {
    (void)state;
    kvp_eval_he_item_t *it = NULL;
    size_t n = 0;
    kvp_err_t err = {0};
    assert_int_equal(kvp_eval_he_extract(SNIPPET, strlen(SNIPPET), 1, &it, &n, &err), 0);
    assert_int_equal(n, 3);
    assert_string_equal(it[0].name, "add");
    char buf[256];
    snprintf(buf, sizeof buf, "%.*s", (int)(it[0].end - it[0].begin), SNIPPET + it[0].begin);
    assert_string_equal(buf, "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n");
    assert_string_equal(it[0].target, "return a + b");
    assert_string_equal(it[1].name, "method");
    snprintf(buf, sizeof buf, "%.*s", (int)(it[1].end - it[1].begin), SNIPPET + it[1].begin);
    assert_string_equal(buf, "    def method(self,\n               x: int) -> int:\n"
                             "        '''Multi-line\n        docstring.\n        '''\n");
    assert_string_equal(it[1].target, "y = x * 2");
    assert_string_equal(it[2].name, "co");
    assert_string_equal(it[2].target, "await thing()");
    kvp_eval_he_items_free(&it, n);
    assert_null(it);

    /* two body lines: only `method` has them */
    assert_int_equal(kvp_eval_he_extract(SNIPPET, strlen(SNIPPET), 2, &it, &n, &err), 0);
    assert_int_equal(n, 1);
    assert_string_equal(it[0].target, "y = x * 2\nreturn y");
    kvp_eval_he_items_free(&it, n);

    assert_int_equal(kvp_eval_he_extract("x = 1\n", 6, 1, &it, &n, &err), 0);
    assert_int_equal(n, 0);
    assert_int_equal(kvp_eval_he_extract(SNIPPET, strlen(SNIPPET), 0, &it, &n, &err), KVP_EINVAL);
}

/* ---- cache quality ------------------------------------------------------------ */

static void test_cache_quality_of_known_vectors(void **state) {
    (void)state;
    float t[8] = {1, -2, 3, 0.5f, -1, 4, 0, 2}, neg[8], zero[8] = {0};
    for (int i = 0; i < 8; i++)
        neg[i] = -t[i];
    kvp_eval_cq_t q = {0};
    kvp_eval_cq_add(&q, t, t, 2, 4);
    assert_true(fabs(kvp_eval_cq_cos(&q) - 1.0) < 1e-12);
    assert_true(kvp_eval_cq_rel_l1(&q) == 0.0);
    q = (kvp_eval_cq_t){0};
    kvp_eval_cq_add(&q, neg, t, 2, 4);
    assert_true(fabs(kvp_eval_cq_cos(&q) + 1.0) < 1e-12);
    assert_true(fabs(kvp_eval_cq_rel_l1(&q) - 2.0) < 1e-12);
    /* orthogonal halves: cosine 0; a zero prediction: L1 error 1, no cosine */
    float a[2] = {1, 0}, b[2] = {0, 3};
    q = (kvp_eval_cq_t){0};
    kvp_eval_cq_add(&q, a, b, 1, 2);
    assert_true(fabs(kvp_eval_cq_cos(&q)) < 1e-12);
    q = (kvp_eval_cq_t){0};
    kvp_eval_cq_add(&q, zero, t, 2, 4);
    assert_true(isnan(kvp_eval_cq_cos(&q)));
    assert_true(fabs(kvp_eval_cq_rel_l1(&q) - 1.0) < 1e-12);
    /* merging sums: identical (cos 1) + negated (cos -1) vectors average to 0 */
    kvp_eval_cq_t x = {0}, y = {0};
    kvp_eval_cq_add(&x, t, t, 2, 4);
    kvp_eval_cq_add(&y, neg, t, 2, 4);
    kvp_eval_cq_merge(&x, &y);
    assert_true(fabs(kvp_eval_cq_cos(&x)) < 1e-12);
    assert_true(fabs(kvp_eval_cq_rel_l1(&x) - 1.0) < 1e-12);
}

/* ---- pruning ------------------------------------------------------------------ */

static void check_layers(int n, int num, int den, const int32_t *want, int n_want) {
    int32_t keep[64];
    assert_int_equal(kvp_prune_layers(n, num, den, keep), n_want);
    assert_memory_equal(keep, want, sizeof(int32_t) * (size_t)n_want);
}

static void test_prune_keeps_every_kth_layer(void **state) {
    (void)state;
    check_layers(4, 1, 4, (int32_t[]){0}, 1);
    check_layers(4, 1, 2, (int32_t[]){0, 2}, 2);
    check_layers(4, 3, 4, (int32_t[]){0, 1, 2}, 3);
    check_layers(4, 1, 1, (int32_t[]){0, 1, 2, 3}, 4);
    check_layers(28, 1, 4, (int32_t[]){0, 4, 8, 12, 16, 20, 24}, 7);
    check_layers(8, 3, 4, (int32_t[]){0, 1, 2, 4, 5, 6}, 6);
    check_layers(2, 1, 4, (int32_t[]){0}, 1); /* at least one layer */
    int32_t keep[8], map[8];
    kvp_prune_layer_map((int32_t[]){0, 1, 2}, 3, 4, map);
    assert_memory_equal(map, ((int32_t[]){0, 1, 2, 2}), 4 * sizeof(int32_t));
    kvp_prune_layer_map((int32_t[]){0, 2}, 2, 4, map);
    assert_memory_equal(map, ((int32_t[]){0, 0, 1, 1}), 4 * sizeof(int32_t));
    kvp_prune_layer_map((int32_t[]){0, 4}, 2, 8, map);
    assert_memory_equal(map, ((int32_t[]){0, 0, 0, 0, 1, 1, 1, 1}), 8 * sizeof(int32_t));
    assert_true(kvp_prune_layers(4, 3, 2, keep) < 0);
    assert_true(kvp_prune_layers(4, 0, 2, keep) < 0);
    int num, den;
    kvp_err_t err = {0};
    assert_int_equal(kvp_prune_parse_fraction("3/4", &num, &den, &err), 0);
    assert_true(num == 3 && den == 4);
    assert_int_equal(kvp_prune_parse_fraction("1", &num, &den, &err), 0);
    assert_true(num == 1 && den == 1);
    assert_int_equal(kvp_prune_parse_fraction("5/4", &num, &den, &err), KVP_EINVAL);
    assert_int_equal(kvp_prune_parse_fraction("1/", &num, &den, &err), KVP_EINVAL);
    assert_int_equal(kvp_prune_parse_fraction("x", &num, &den, &err), KVP_EINVAL);
}

static void assert_layer_equal(const kvp_model_config_t *c, const kvp_layer_t *a,
                               const kvp_layer_t *b) {
    size_t E = c->n_embd, nq = (size_t)c->n_head * c->head_dim,
           nkv = (size_t)c->n_kv_head * c->head_dim, F = c->n_ff;
    assert_memory_equal(a->attn_norm, b->attn_norm, sizeof(float) * E);
    assert_memory_equal(a->wq, b->wq, sizeof(float) * nq * E);
    assert_memory_equal(a->wk, b->wk, sizeof(float) * nkv * E);
    assert_memory_equal(a->wv, b->wv, sizeof(float) * nkv * E);
    assert_memory_equal(a->wo, b->wo, sizeof(float) * E * nq);
    assert_memory_equal(a->ffn_norm, b->ffn_norm, sizeof(float) * E);
    assert_memory_equal(a->w_gate, b->w_gate, sizeof(float) * F * E);
    assert_memory_equal(a->w_up, b->w_up, sizeof(float) * F * E);
    assert_memory_equal(a->w_down, b->w_down, sizeof(float) * E * F);
}

static void test_pruned_model_holds_the_kept_layers_and_survives_a_file(void **state) {
    (void)state;
    kvp_model_t *src = model(258, 16, 4, 2, 1, 32, 3, 0.1f), *m = NULL, *back = NULL;
    /* non-trivial norms, so a copied norm is told from a fresh one */
    for (int l = 0; l < 4; l++)
        for (int i = 0; i < 16; i++)
            src->layers[l].attn_norm[i] = (float)(l * 100 + i);
    kvp_err_t err = {0};
    int32_t keep[] = {0, 2};
    assert_int_equal(kvp_prune_model(src, keep, 2, &m, &err), 0);
    assert_int_equal(m->cfg.n_layer, 2);
    assert_int_equal(m->cfg.n_embd, 16);
    assert_memory_equal(m->tok_embd, src->tok_embd, sizeof(float) * 258 * 16);
    assert_memory_equal(m->output_norm, src->output_norm, sizeof(float) * 16);
    assert_layer_equal(&src->cfg, &m->layers[0], &src->layers[0]);
    assert_layer_equal(&src->cfg, &m->layers[1], &src->layers[2]);
    kvp_model_t *none = NULL;
    assert_int_equal(kvp_prune_model(src, (int32_t[]){4}, 1, &none, &err), KVP_ERANGE);
    assert_null(none);

    kvp_gguf_t *vocab = vocab_file();
    char p[2400];
    snprintf(p, sizeof p, "%s/pruned.gguf", g_dir);
    assert_int_equal(
        kvp_prune_save(m, vocab, p, "pruned", keep, 2, "0123456789abcdef", NULL, NULL, &err), 0);
    kvp_gguf_t *g = NULL;
    kvp_tokenizer_t *tok = NULL;
    assert_int_equal(kvp_gguf_open(&g, p, &err), 0);
    assert_int_equal(kvp_model_from_gguf(&back, g, &err), 0);
    assert_int_equal(back->n_params, m->n_params);
    assert_memory_equal(back->params, m->params, sizeof(float) * m->n_params);
    assert_int_equal(kvp_tokenizer_from_gguf(&tok, g, &err), 0);
    assert_int_equal(kvp_tokenizer_n_vocab(tok), 258);
    const kvp_gguf_kv_t *kv = NULL;
    assert_int_equal(kvp_gguf_get_arr(g, "kvpred.prune.layers", KVP_GGUF_I32, &kv, &err), 0);
    assert_int_equal(kv->v.arr.count, 2);
    assert_int_equal(kvp_gguf_arr_i64(kv, 0), 0);
    assert_int_equal(kvp_gguf_arr_i64(kv, 1), 2);
    kvp_tokenizer_free(&tok);
    kvp_gguf_free(&g);
    kvp_gguf_free(&vocab);
    kvp_model_free(&back);
    kvp_model_free(&m);
    kvp_model_free(&src);
}

/* ---- TTFT FLOPs ---------------------------------------------------------------- */

/* Hand counts (2 FLOPs per multiply-add; attention QK^T and PV, 2 x n_q each
 * per attended position; one output head per forward):
 * base  V 10, E 8, 2 layers, 2 heads of 4 (1 kv), F 16: dense per token and
 *       layer 2(8*16 + 8*8 + 3*8*16) = 1152
 *   prefill of 5: 2 (1152*5 + 4*8*15) + 2*8*10 = 12640
 *   one step after 4 cached: 2 (1152 + 4*8*5) + 160 = 2784
 * aux   V 10, E 4, 1 layer, 1 head of 4 (1 kv), F 8: dense 2(4*12 + 16 + 96) = 320
 *   alone, prefill of 5: 320*5 + 4*4*15 + 2*4*10 = 1920
 *   prefill of 4 without its head: 320*4 + 4*4*10 = 1440
 * predictor 4 -> 4, K and V, 2 base layers, 4 positions: 2*2*4*4*2*4 = 512
 * KV Prediction at 5: 1440 + 512 + 2784 = 4736 */
static void test_ttft_flops_match_hand_counts(void **state) {
    (void)state;
    kvp_model_t *base = model(10, 8, 2, 2, 1, 16, 1, 0.1f),
                *aux = model(10, 4, 1, 1, 1, 8, 2, 0.1f);
    kvp_predictor_t *p = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_predictor_new(&p, kvp_kv_shape_of(aux), kvp_kv_shape_of(base), NULL, &err),
                     0);
    kvp_eval_method_t mb = {.kind = KVP_EVAL_BASE};
    kvp_eval_method_t ma = {.kind = KVP_EVAL_ALONE, .model = aux};
    kvp_eval_method_t mk = {.kind = KVP_EVAL_KVP, .model = aux, .pred = p};
    assert_true(kvp_eval_ttft_flops(&mb, base, 5) == 12640.0);
    assert_true(kvp_eval_ttft_flops(&ma, base, 5) == 1920.0);
    assert_true(kvp_eval_ttft_flops(&mk, base, 5) == 4736.0);
    kvp_predictor_free(&p);
    kvp_model_free(&aux);
    kvp_model_free(&base);
}

/* ---- the test data ------------------------------------------------------------------ */

/* A relative name of the given split under holdout 10. */
static void name_in(kvp_split_t s, char *buf, size_t cap) {
    for (int i = 0;; i++) {
        snprintf(buf, cap, "corpus/f%d.py", i);
        if (kvp_corpus_split_of(buf + 7, 10) == s) return;
    }
}

static void test_data_comes_from_test_files_only(void **state) {
    (void)state;
    char test_name[64], train_name[64], text[8192] = "";
    name_in(KVP_SPLIT_TEST, test_name, sizeof test_name);
    name_in(KVP_SPLIT_TRAIN, train_name, sizeof train_name);
    for (int i = 0; i < 6; i++) {
        char f[256];
        snprintf(f, sizeof f,
                 "def f%d(x):\n    \"\"\"Doc %d.\"\"\"\n    return x + %d\n\n# filler line %d\n", i,
                 i, i, i);
        strcat(text, f);
    }
    put(test_name, text);
    char train[2048];
    memset(train, 'Z', sizeof train - 1);
    train[sizeof train - 1] = 0;
    put(train_name, train);

    kvp_gguf_t *vg = vocab_file();
    kvp_tokenizer_t *tok = NULL;
    kvp_corpus_t *c = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_tokenizer_from_gguf(&tok, vg, &err), 0);
    char dir[2400];
    snprintf(dir, sizeof dir, "%s/corpus", g_dir);
    const char *paths[] = {dir};
    kvp_corpus_opts_t co = {.ext = ".py", .holdout_pct = 10};
    assert_int_equal(kvp_corpus_new(&c, paths, 1, &co, &err), 0);
    kvp_eval_opts_t o;
    kvp_eval_opts_default(&o);
    o.prompt_len = 24, o.n_cont = 8, o.n_prompts = 20, o.he_max_prompt = 64;
    kvp_eval_data_t d;
    if (kvp_eval_data_build(&d, c, tok, &o, &err)) fail_msg("%s", err.msg);
    assert_int_equal(d.n_test_files, 1);
    assert_int_equal(d.test_tokens, strlen(text));
    for (int p = 0; p < d.n_prompts; p++) {
        const int32_t *pr = d.prompts + p * d.P, *tr = d.truth + p * d.K;
        assert_int_equal(pr[0], kvp_tokenizer_bos(tok));
        char s[64];
        int k = 0;
        for (int i = 1; i < d.P; i++)
            s[k++] = (char)pr[i];
        for (int i = 0; i < d.K; i++)
            s[k++] = (char)tr[i];
        s[k] = 0;
        assert_non_null(strstr(text, s)); /* prompt + truth: one span of the test file */
    }
    assert_int_equal(d.n_he, 6);
    assert_int_equal(d.n_he_found, 6);
    assert_string_equal(d.he_target[3], "return x + 3");
    assert_int_equal(d.he_tok[0][0], kvp_tokenizer_bos(tok));
    assert_int_equal(d.he_len[0], 1 + (int)strlen("def f0(x):\n    \"\"\"Doc 0.\"\"\"\n"));
    kvp_eval_data_free(&d);

    /* too long a prompt for any test file */
    o.prompt_len = 4096;
    assert_int_equal(kvp_eval_data_build(&d, c, tok, &o, &err), KVP_EINVAL);
    kvp_corpus_free(&c);
    kvp_tokenizer_free(&tok);
    kvp_gguf_free(&vg);
}

/* ---- the runner -------------------------------------------------------------------- */

/* KV Prediction with a perfect predictor (the base as its own auxiliary
 * model, identity maps) must score exactly as the base: same tokens, same
 * log-likelihood, cosine 1 and L1 error 0 on every layer; the base alone as
 * a "cheap" model too. */
static void test_perfect_predictor_scores_as_the_base(void **state) {
    (void)state;
    kvp_gguf_t *vg = vocab_file();
    kvp_tokenizer_t *tok = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_tokenizer_from_gguf(&tok, vg, &err), 0);
    kvp_model_t *base = model(258, 32, 2, 4, 2, 64, 5, 0.3f);
    kvp_model_t *other = model(258, 16, 1, 2, 1, 32, 6, 0.3f);
    kvp_predictor_t *id = NULL, *zero = NULL;
    assert_int_equal(kvp_predictor_new_identity(&id, kvp_kv_shape_of(base), &err), 0);
    assert_int_equal(
        kvp_predictor_new(&zero, kvp_kv_shape_of(other), kvp_kv_shape_of(base), NULL, &err), 0);

    kvp_eval_opts_t o;
    kvp_eval_opts_default(&o);
    o.pos_bucket = 8, o.ttft_reps = 1, o.he_max_gen = 12, o.cq_prompts = 3;
    enum { P = 20, K = 6, N = 4 };
    int32_t prompts[N * P], truth[N * K];
    kvp_rng_t r;
    kvp_rng_seed(&r, 11);
    for (int i = 0; i < N * P; i++)
        prompts[i] = (int32_t)kvp_rng_below(&r, 256);
    for (int i = 0; i < N * K; i++)
        truth[i] = (int32_t)kvp_rng_below(&r, 256);
    const char *he = "def f(x):\n    \"\"\"Doc.\"\"\"\n";
    int32_t he_tok[64];
    int he_len = 0;
    he_tok[he_len++] = kvp_tokenizer_bos(tok);
    for (const char *s = he; *s; s++)
        he_tok[he_len++] = (unsigned char)*s;
    int32_t *he_toks[1] = {he_tok};
    char *he_target[1] = {"return x"};
    kvp_eval_data_t d = {.P = P,
                         .K = K,
                         .n_prompts = N,
                         .prompts = prompts,
                         .truth = truth,
                         .n_he = 1,
                         .he_tok = he_toks,
                         .he_len = &he_len,
                         .he_target = he_target};
    kvp_eval_method_t m[4] = {
        {.name = "base", .kind = KVP_EVAL_BASE},
        {.name = "base alone", .kind = KVP_EVAL_ALONE, .model = base},
        {.name = "kvp identity", .kind = KVP_EVAL_KVP, .model = base, .pred = id},
        {.name = "kvp zero", .kind = KVP_EVAL_KVP, .model = other, .pred = zero},
    };
    kvp_eval_result_t res[4];
    if (kvp_eval_run(base, tok, m, 4, &d, &o, res, &err)) fail_msg("%s", err.msg);
    for (int i = 1; i < 3; i++) {
        assert_true(res[i].acc == res[0].acc);
        assert_true(res[i].first_acc == res[0].first_acc);
        assert_string_equal(res[i].he_out[0], res[0].he_out[0]);
        assert_true(res[i].he_agree == 1.0);
    }
    assert_true(isnan(res[1].loglik));
    assert_true(fabs(res[1].decode_loglik - res[0].loglik) < 1e-9); /* the base, on its own */
    assert_true(res[0].decode_loglik == res[0].loglik);
    assert_true(fabs(res[2].loglik - res[0].loglik) < 1e-4);
    assert_true(res[0].loglik < 0);
    assert_null(res[0].cq);
    assert_int_equal(res[2].n_layer, 2);
    assert_int_equal(res[2].n_bucket, 3); /* 19 predicted positions in buckets of 8 */
    for (int l = 0; l < 2; l++)
        for (int b = 0; b < 3; b++)
            for (int k = 0; k < 2; k++) {
                const kvp_eval_cq_t *q = &res[2].cq[(l * 3 + b) * 2 + k];
                assert_true(fabs(kvp_eval_cq_cos(q) - 1.0) < 1e-5);
                assert_true(kvp_eval_cq_rel_l1(q) < 1e-5);
            }
    /* a zero predictor: every predicted K/V is 0, so the L1 error is exactly 1 */
    for (int i = 0; i < 2 * 2 * 3; i++)
        assert_true(fabs(kvp_eval_cq_rel_l1(&res[3].cq[i]) - 1.0) < 1e-12);
    assert_true(res[0].flops > res[3].flops);

    /* goals: "kvp identity" equals the base, so it closes the whole gap */
    kvp_eval_goal_t g[4];
    assert_int_equal(kvp_eval_goals(m, res, 4, g), 2);
    assert_int_equal(g[0].method, 2);
    assert_int_equal(g[0].alone, 1);
    assert_int_equal(g[0].best_acc, 1);
    assert_true(g[0].margin == 0.0 && g[0].margin_se == 0.0); /* same tokens on every prompt */
    assert_true(isnan(g[0].gap_closed));                      /* no gap: base == alone */
    char p[2400];
    snprintf(p, sizeof p, "%s/results.csv", g_dir);
    assert_int_equal(kvp_eval_write_csv(p, m, res, 4, res[0].flops, &err), 0);
    snprintf(p, sizeof p, "%s/cq.csv", g_dir);
    assert_int_equal(kvp_eval_write_cq_csv(p, m, res, 4, 8, P - 1, &err), 0);
    FILE *f = fopen(p, "r");
    int lines = 0;
    for (int ch; (ch = fgetc(f)) != EOF;)
        lines += ch == '\n';
    fclose(f);
    /* header + per KVP method: 2 layers + 3 buckets x (2 layers + all) */
    assert_int_equal(lines, 1 + 2 * (2 + 3 * 3));
    for (int i = 0; i < 4; i++)
        kvp_eval_result_free(&res[i]);
    kvp_predictor_free(&id);
    kvp_predictor_free(&zero);
    kvp_model_free(&other);
    kvp_model_free(&base);
    kvp_tokenizer_free(&tok);
    kvp_gguf_free(&vg);
}

/* Budgets 20 and 41 (KVP x and y), baselines a (10) and b (40): at 41 the
 * front takes x, which is cheaper and better than y, against b. */
static void test_fronts_take_the_best_of_each_family_at_or_below_each_budget(void **state) {
    (void)state;
    double each[6][2] = {{.3, .3}, {.2, .2}, {.2, .28}, {.25, .29}, {.24, .26}, {.9, .9}};
    const double acc[6] = {.30, .20, .24, .27, .25, .90}, flops[6] = {100, 10, 40, 20, 41, 200};
    kvp_eval_method_t m[6] = {
        {.name = "base", .kind = KVP_EVAL_BASE}, {.name = "a", .kind = KVP_EVAL_ALONE},
        {.name = "b", .kind = KVP_EVAL_ALONE},   {.name = "x", .kind = KVP_EVAL_KVP},
        {.name = "y", .kind = KVP_EVAL_KVP},     {.name = "z", .kind = KVP_EVAL_ALONE},
    };
    kvp_eval_result_t r[6] = {0};
    for (int i = 0; i < 6; i++)
        r[i] = (kvp_eval_result_t){
            .acc = acc[i], .flops = flops[i], .acc_each = each[i], .n_prompts = 2};
    kvp_eval_front_t f[6];
    assert_int_equal(kvp_eval_fronts(m, r, 6, f), 2);
    kvp_eval_front_t g[7];
    kvp_eval_method_t m7[7];
    kvp_eval_result_t r7[7];
    memcpy(m7, m, sizeof m);
    memcpy(r7, r, sizeof r);
    m7[6] = (kvp_eval_method_t){.name = "x2", .kind = KVP_EVAL_KVP};
    r7[6] = r[4]; /* a second KVP point at y's budget: still one front there */
    assert_int_equal(kvp_eval_fronts(m7, r7, 7, g), 2);
    assert_int_equal(f[0].budget, 3);
    assert_int_equal(f[0].kvp, 3);
    assert_int_equal(f[0].baseline, 1); /* b costs 40 > 20 */
    assert_true(fabs(f[0].margin - 0.07) < 1e-12);
    assert_true(fabs(f[0].gap_closed - 0.7) < 1e-12); /* (.27 - .20) / (.30 - .20) */
    /* differences .05 and .09: mean .07, sample sd .0283, se .02 */
    assert_true(fabs(f[0].margin_se - 0.02) < 1e-12);
    assert_int_equal(f[1].budget, 4);
    assert_int_equal(f[1].kvp, 3); /* y (0.25) is beaten by the cheaper x */
    assert_int_equal(f[1].baseline, 2);
    assert_true(fabs(f[1].gap_closed - 0.5) < 1e-12); /* (.27 - .24) / (.30 - .24) */
    assert_true(fabs(f[1].gap - 0.06) < 1e-12);
    assert_true(fabs(f[1].gap_se - 0.04) < 1e-12); /* base - b: .10 and .02 */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accuracy_counts_matching_positions),
        cmocka_unit_test(test_log_prob_is_a_log_softmax),
        cmocka_unit_test(test_first_lines_strip_and_skip_blank_lines),
        cmocka_unit_test(test_humaneval_extracts_def_and_docstring_prompts),
        cmocka_unit_test(test_cache_quality_of_known_vectors),
        cmocka_unit_test(test_prune_keeps_every_kth_layer),
        cmocka_unit_test(test_pruned_model_holds_the_kept_layers_and_survives_a_file),
        cmocka_unit_test(test_ttft_flops_match_hand_counts),
        cmocka_unit_test(test_data_comes_from_test_files_only),
        cmocka_unit_test(test_perfect_predictor_scores_as_the_base),
        cmocka_unit_test(test_fronts_take_the_best_of_each_family_at_or_below_each_budget),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
