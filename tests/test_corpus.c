/* Tests of lib/kvp_corpus: a recursive listing in byte order that skips
 * symbolic links and binary files, the split rule (a hash of the relative
 * path, the same wherever the corpus lives), streams with BOS/EOS around
 * each file, evaluation windows that score every token once, repeatable
 * random batches, and clear errors for missing or empty corpora. */
#include <errno.h>
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

#include "kvp_corpus.h"

static char g_dir[1024];

static void put(const char *rel, const char *text, size_t n) {
    char p[1200];
    snprintf(p, sizeof p, "%s/%s", g_dir, rel);
    FILE *f = fopen(p, "wb");
    if (!f) fail_msg("cannot write %s: %s", p, strerror(errno));
    fwrite(text, 1, n, f);
    fclose(f);
}

static void sub(const char *rel) {
    char p[1200];
    snprintf(p, sizeof p, "%s/%s", g_dir, rel);
    mkdir(p, 0755);
}

/* tree:  b.txt "bb"  a.py "a"  z/c.py "ccc"  z/y/d.txt "dddd"  bin.dat (NUL)
 *        link.py -> a.py (skipped) */
static int setup(void **state) {
    (void)state;
    const char *base = getenv("KVP_TEST_TMP");
    snprintf(g_dir, sizeof g_dir, "%s/corpus-%ld", base ? base : "/tmp", (long)getpid());
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", g_dir, g_dir);
    if (system(cmd)) fail_msg("cannot make %s", g_dir);
    put("b.txt", "bb", 2);
    put("a.py", "a", 1);
    sub("z");
    sub("z/y");
    put("z/c.py", "ccc", 3);
    put("z/y/d.txt", "dddd", 4);
    put("bin.dat", "x\0y", 3);
    char target[1200], link[1200];
    snprintf(target, sizeof target, "%s/a.py", g_dir);
    snprintf(link, sizeof link, "%s/link.py", g_dir);
    if (symlink(target, link)) fail_msg("symlink: %s", strerror(errno));
    return 0;
}

static int teardown(void **state) {
    (void)state;
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    return system(cmd) ? -1 : 0;
}

static void test_lists_text_files_in_byte_order_without_links_or_binaries(void **state) {
    (void)state;
    kvp_corpus_t *c = NULL;
    kvp_err_t err = {0};
    const char *paths[] = {g_dir};
    kvp_corpus_opts_t o = {.holdout_pct = 0};
    assert_int_equal(kvp_corpus_new(&c, paths, 1, &o, &err), 0);
    assert_int_equal(kvp_corpus_n_files(c), 4);
    assert_string_equal(kvp_corpus_file(c, 0)->rel, "a.py");
    assert_string_equal(kvp_corpus_file(c, 1)->rel, "b.txt");
    assert_string_equal(kvp_corpus_file(c, 2)->rel, "z/c.py");
    assert_string_equal(kvp_corpus_file(c, 3)->rel, "z/y/d.txt");
    assert_int_equal(kvp_corpus_file(c, 3)->size, 4);
    assert_int_equal(kvp_corpus_split_files(c, KVP_SPLIT_TRAIN), 4);
    kvp_corpus_free(&c);
    assert_null(c);

    o.ext = ".py";
    assert_int_equal(kvp_corpus_new(&c, paths, 1, &o, &err), 0);
    assert_int_equal(kvp_corpus_n_files(c), 2);
    assert_string_equal(kvp_corpus_file(c, 1)->rel, "z/c.py");
    kvp_corpus_free(&c);
}

/* FNV-1a-64 of the relative path, mod 100: <90 train, <95 validation, else
 * test (hold-out 5). Recomputed here independently of the library. */
static int bucket(const char *s) {
    uint64_t h = 14695981039346656037ull;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ull;
    }
    return (int)(h % 100);
}

static void test_split_rule_is_a_hash_of_the_relative_path(void **state) {
    (void)state;
    int count[3] = {0};
    char name[64];
    for (int i = 0; i < 20000; i++) {
        snprintf(name, sizeof name, "pkg%d/mod_%d.py", i % 37, i);
        kvp_split_t s = kvp_corpus_split_of(name, 5);
        int b = bucket(name);
        assert_int_equal(s, b < 90 ? KVP_SPLIT_TRAIN : b < 95 ? KVP_SPLIT_VAL : KVP_SPLIT_TEST);
        count[s]++;
        /* hold-out 0: everything trains */
        assert_int_equal(kvp_corpus_split_of(name, 0), KVP_SPLIT_TRAIN);
    }
    /* about 90/5/5 */
    assert_in_range(count[KVP_SPLIT_TRAIN], 17600, 18400);
    assert_in_range(count[KVP_SPLIT_VAL], 800, 1200);
    assert_in_range(count[KVP_SPLIT_TEST], 800, 1200);
    /* a file named directly is split by its base name: the same as in a walk */
    kvp_corpus_t *c = NULL;
    char p[1200];
    snprintf(p, sizeof p, "%s/z/c.py", g_dir);
    const char *paths[] = {p};
    kvp_corpus_opts_t o = {.holdout_pct = 33};
    assert_int_equal(kvp_corpus_new(&c, paths, 1, &o, NULL), 0);
    assert_string_equal(kvp_corpus_file(c, 0)->rel, "c.py");
    assert_int_equal(kvp_corpus_file(c, 0)->split, kvp_corpus_split_of("c.py", 33));
    kvp_corpus_free(&c);
}

static void test_stream_wraps_each_file_in_bos_and_eos(void **state) {
    (void)state;
    kvp_corpus_t *c = NULL;
    kvp_err_t err = {0};
    const char *paths[] = {g_dir};
    kvp_corpus_opts_t o = {.ext = ".py", .holdout_pct = 0};
    assert_int_equal(kvp_corpus_new(&c, paths, 1, &o, &err), 0);
    assert_int_equal(kvp_corpus_tokenize(c, KVP_SPLIT_TRAIN, NULL, &err), 0);
    const kvp_corpus_stream_t *s = kvp_corpus_stream(c, KVP_SPLIT_TRAIN);
    const int32_t want[] = {256, 'a', 257, 256, 'c', 'c', 'c', 257};
    assert_int_equal(s->n, 8);
    assert_memory_equal(s->tok, want, sizeof want);
    assert_int_equal(s->bytes, 4);
    assert_int_equal(s->n_docs, 2);
    assert_int_equal(kvp_corpus_stream(c, KVP_SPLIT_VAL)->n, 0);

    /* windows of 3 score tokens 1..7 exactly once, padding past the end */
    assert_int_equal(kvp_corpus_n_windows(s, 3), 3);
    int32_t tk[3], tg[3];
    kvp_corpus_window(s, 2, 3, -5, tk, tg);
    assert_int_equal(tk[0], 'c');
    assert_int_equal(tk[1], 257);
    assert_int_equal(tk[2], -5);
    assert_int_equal(tg[0], 257);
    assert_int_equal(tg[1], -1);
    assert_int_equal(tg[2], -1);
    kvp_corpus_free(&c);
}

static void test_sampling_is_repeatable_and_shifted_by_one(void **state) {
    (void)state;
    kvp_corpus_stream_t s = {0};
    int32_t tok[1000];
    for (int i = 0; i < 1000; i++)
        tok[i] = i;
    s.tok = tok;
    s.n = 1000;
    int32_t a[4 * 16], at[4 * 16], b[4 * 16], bt[4 * 16];
    kvp_rng_t r1, r2;
    kvp_rng_seed(&r1, 7);
    kvp_rng_seed(&r2, 7);
    assert_int_equal(kvp_corpus_sample(&s, &r1, 4, 16, a, at, NULL), 0);
    assert_int_equal(kvp_corpus_sample(&s, &r2, 4, 16, b, bt, NULL), 0);
    assert_memory_equal(a, b, sizeof a);
    assert_memory_equal(r1.s, r2.s, sizeof r1.s);
    for (int i = 0; i < 4 * 16; i++) {
        assert_int_equal(at[i], a[i] + 1);
        assert_in_range(a[i], 0, 998);
    }
    /* too short a stream */
    kvp_err_t err = {0};
    s.n = 16;
    assert_int_equal(kvp_corpus_sample(&s, &r1, 1, 16, a, at, &err), KVP_EINVAL);
    assert_non_null(strstr(err.msg, "16+1"));
}

static void test_missing_and_empty_corpora_are_clear_errors(void **state) {
    (void)state;
    kvp_corpus_t *c = NULL;
    kvp_err_t err = {0};
    const char *missing[] = {"/nonexistent/kvpred-corpus"};
    assert_int_equal(kvp_corpus_new(&c, missing, 1, NULL, &err), KVP_EIO);
    assert_null(c);
    assert_non_null(strstr(err.msg, "/nonexistent/kvpred-corpus"));
    assert_non_null(strstr(err.msg, "No such file"));

    const char *paths[] = {g_dir};
    kvp_corpus_opts_t o = {.ext = ".rs"};
    assert_int_equal(kvp_corpus_new(&c, paths, 1, &o, &err), KVP_EINVAL);
    assert_non_null(strstr(err.msg, "no *.rs files"));

    o.holdout_pct = 40;
    assert_int_equal(kvp_corpus_new(&c, paths, 1, &o, &err), KVP_EINVAL);

    /* a file that vanished between listing and reading */
    o = (kvp_corpus_opts_t){.ext = ".txt", .holdout_pct = 0};
    assert_int_equal(kvp_corpus_new(&c, paths, 1, &o, &err), 0);
    char p[1200];
    snprintf(p, sizeof p, "%s/b.txt", g_dir);
    unlink(p);
    assert_int_equal(kvp_corpus_tokenize(c, KVP_SPLIT_TRAIN, NULL, &err), KVP_EIO);
    assert_non_null(strstr(err.msg, "b.txt"));
    assert_int_equal(kvp_corpus_stream(c, KVP_SPLIT_TRAIN)->n, 0);
    kvp_corpus_free(&c);
    put("b.txt", "bb", 2);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lists_text_files_in_byte_order_without_links_or_binaries),
        cmocka_unit_test(test_split_rule_is_a_hash_of_the_relative_path),
        cmocka_unit_test(test_stream_wraps_each_file_in_bos_and_eos),
        cmocka_unit_test(test_sampling_is_repeatable_and_shifted_by_one),
        cmocka_unit_test(test_missing_and_empty_corpora_are_clear_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
