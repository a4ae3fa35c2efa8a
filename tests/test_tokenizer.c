/* Tests for kvp_tokenizer: llama.cpp's vocabulary test vectors (every input
 * must give exactly the expected ids), lossless round trips, kvpred's own
 * byte-level vocabulary, and the errors a bad vocabulary gives. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <cmocka.h>

#include "kvp_gguf.h"
#include "kvp_tokenizer.h"

#define VOCAB_DIR KVP_SHARED_DIR "/reference/vocab"
#define SEP "\n__ggml_vocab_test__\n"

/* ---- helpers ------------------------------------------------------------ */

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (n + 1 >= cap) buf = realloc(buf, cap *= 2);
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        if (!r) break;
        n += r;
    }
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

static void mkdir_p(const char *path) {
    char tmp[1024];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            mkdir(tmp, 0755);
            *p = '/';
        }
    }
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) fail_msg("cannot create %s", tmp);
}

/* A path in the test's scratch directory (KVP_TEST_TMP). */
static void tmp_path(char *buf, size_t cap, const char *name) {
    const char *dir = getenv("KVP_TEST_TMP");
    if (!dir || !*dir) dir = "/tmp/kvp-test-tmp";
    mkdir_p(dir);
    snprintf(buf, cap, "%s/%s", dir, name);
}

/* Prints bytes with C escapes, for failure messages. */
static void print_escaped(const char *label, const char *s, size_t n) {
    printf("%s\"", label);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\n')
            printf("\\n");
        else if (c == '\t')
            printf("\\t");
        else if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20 || c == 0x7f)
            printf("\\x%02x", c);
        else
            putchar(c);
    }
    printf("\" (%zu bytes)\n", n);
}

static void print_ids(const char *label, const int32_t *ids, size_t n) {
    printf("%s[", label);
    for (size_t i = 0; i < n; i++)
        printf(i ? " %d" : "%d", ids[i]);
    printf("] (%zu ids)\n", n);
}

static kvp_tokenizer_t *open_tokenizer(const char *path) {
    kvp_err_t err = {0};
    kvp_gguf_t *g = NULL;
    if (kvp_gguf_open(&g, path, &err)) fail_msg("open %s: %s", path, err.msg);
    kvp_tokenizer_t *t = NULL;
    int rc = kvp_tokenizer_from_gguf(&t, g, &err);
    kvp_gguf_free(&g); /* the tokenizer keeps copies */
    if (rc) fail_msg("tokenizer from %s: %s", path, err.msg);
    return t;
}

static void assert_round_trip(const kvp_tokenizer_t *t, const char *s, size_t n) {
    kvp_err_t err = {0};
    int32_t *ids;
    size_t n_ids;
    assert_int_equal(kvp_tokenizer_encode(t, s, n, false, &ids, &n_ids, &err), 0);
    char *back;
    size_t back_len;
    assert_int_equal(kvp_tokenizer_decode(t, ids, n_ids, &back, &back_len, &err), 0);
    if (back_len != n || memcmp(back, s, n) != 0) {
        print_escaped("input:   ", s, n);
        print_escaped("decoded: ", back, back_len);
        print_ids("ids:     ", ids, n_ids);
        free(back);
        free(ids);
        fail_msg("decode(encode(x)) != x");
    }
    assert_int_equal(back[back_len], 0);
    free(back);
    free(ids);
}

/* ---- llama.cpp's test vectors ------------------------------------------- */

/* Tokenizes every input of VOCAB_DIR/name.inp and compares with name.out. */
static void check_vectors(const char *name) {
    struct stat st;
    if (stat(VOCAB_DIR, &st) != 0) {
        printf("skipped: %s not found\n", VOCAB_DIR);
        skip();
    }
    char path[1024], inp_path[1100], out_path[1100];
    snprintf(path, sizeof path, "%s/%s", VOCAB_DIR, name);
    snprintf(inp_path, sizeof inp_path, "%s.inp", path);
    snprintf(out_path, sizeof out_path, "%s.out", path);
    size_t inp_len, out_len;
    char *inp = read_file(inp_path, &inp_len);
    char *out = read_file(out_path, &out_len);
    if (!inp || !out) fail_msg("cannot read %s or %s", inp_path, out_path);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    kvp_tokenizer_t *t = open_tokenizer(path);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double load_s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);

    /* inputs end at each separator; .out has one line per input */
    size_t n_inputs = 0, n_match = 0, n_round = 0, n_mismatch = 0;
    char *s = inp, *line = out;
    for (char *sep; (sep = strstr(s, SEP)) != NULL; s = sep + strlen(SEP), n_inputs++) {
        size_t len = (size_t)(sep - s);
        char *eol = strchr(line, '\n');
        if (!eol) fail_msg("%s.out has fewer lines than inputs (%zu)", name, n_inputs + 1);
        *eol = 0;
        int32_t want[1024];
        size_t n_want = 0;
        for (char *p = line, *end;; p = end) {
            long v = strtol(p, &end, 10);
            if (end == p) break;
            assert_true(n_want < 1024);
            want[n_want++] = (int32_t)v;
        }
        line = eol + 1;

        kvp_err_t err = {0};
        int32_t *got;
        size_t n_got;
        if (kvp_tokenizer_encode(t, s, len, false, &got, &n_got, &err))
            fail_msg("%s input %zu: %s", name, n_inputs, err.msg);
        if (n_got == n_want && !memcmp(got, want, n_got * sizeof *got)) {
            n_match++;
        } else if (n_mismatch++ == 0) {
            printf("%s: first mismatch, input %zu\n", name, n_inputs);
            print_escaped("  input:    ", s, len);
            print_ids("  expected: ", want, n_want);
            print_ids("  got:      ", got, n_got);
        }
        char *back;
        size_t back_len;
        assert_int_equal(kvp_tokenizer_decode(t, got, n_got, &back, &back_len, &err), 0);
        if (back_len == len && !memcmp(back, s, len)) {
            n_round++;
        } else {
            printf("%s: input %zu does not round-trip\n", name, n_inputs);
            print_escaped("  input:   ", s, len);
            print_escaped("  decoded: ", back, back_len);
        }
        free(back);
        free(got);
    }
    printf("%s: %zu/%zu inputs match, %zu/%zu round-trip, vocabulary of %d loaded in %.3f s\n",
           name, n_match, n_inputs, n_round, n_inputs, kvp_tokenizer_n_vocab(t), load_s);
    kvp_tokenizer_free(&t);
    free(inp);
    free(out);
    assert_true(n_inputs > 0);
    assert_int_equal(n_match, n_inputs);
    assert_int_equal(n_round, n_inputs);
    /* "well under a second" in a release build; sanitizers cost a few times that */
    assert_true(load_s < 3.0);
}

static void test_vectors_llama_spm(void **state) {
    (void)state;
    check_vectors("ggml-vocab-llama-spm.gguf");
}

static void test_vectors_llama_bpe(void **state) {
    (void)state;
    check_vectors("ggml-vocab-llama-bpe.gguf");
}

static void test_vectors_gpt2(void **state) {
    (void)state;
    check_vectors("ggml-vocab-gpt-2.gguf");
}

/* The real vocabularies round-trip any bytes too: invalid UTF-8, NULs. */
static void test_real_bpe_vocab_is_lossless_on_invalid_utf8(void **state) {
    (void)state;
    struct stat st;
    if (stat(VOCAB_DIR, &st) != 0) {
        printf("skipped: %s not found\n", VOCAB_DIR);
        skip();
    }
    static const char *names[] = {"ggml-vocab-llama-bpe.gguf", "ggml-vocab-gpt-2.gguf"};
    static const char nasty[] = "a\xff\xfe b\xc3 \xe2\x82 \x80\x80x\0y \xf0\x9f\xa6 'S's \r\n\xed"
                                "\xa0\x80 \xc0\xaf 123456 \t\v\f";
    for (size_t k = 0; k < 2; k++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", VOCAB_DIR, names[k]);
        kvp_tokenizer_t *t = open_tokenizer(path);
        assert_round_trip(t, nasty, sizeof nasty - 1);
        kvp_tokenizer_free(&t);
    }
}

/* Special tokens of the real files: Llama 3 adds <|begin_of_text|>. */
static void test_real_special_tokens(void **state) {
    (void)state;
    struct stat st;
    if (stat(VOCAB_DIR, &st) != 0) {
        printf("skipped: %s not found\n", VOCAB_DIR);
        skip();
    }
    kvp_tokenizer_t *t = open_tokenizer(VOCAB_DIR "/ggml-vocab-llama-bpe.gguf");
    assert_int_equal(kvp_tokenizer_bos(t), 128000);
    assert_int_equal(kvp_tokenizer_eos(t), 128001);
    assert_true(kvp_tokenizer_adds_bos(t));
    assert_true(kvp_tokenizer_is_control(t, 128000));
    assert_false(kvp_tokenizer_is_control(t, 9906));
    assert_int_equal(kvp_tokenizer_piece(t, 128000, NULL, 0), 0);
    int32_t *ids;
    size_t n;
    kvp_err_t err = {0};
    /* special-token text in the input is text */
    const char *s = "<|begin_of_text|>Hello";
    assert_int_equal(kvp_tokenizer_encode(t, s, strlen(s), true, &ids, &n, &err), 0);
    assert_true(n > 2);
    assert_int_equal(ids[0], 128000);
    for (size_t i = 1; i < n; i++)
        assert_false(kvp_tokenizer_is_control(t, ids[i]));
    free(ids);
    kvp_tokenizer_free(&t);

    t = open_tokenizer(VOCAB_DIR "/ggml-vocab-llama-spm.gguf");
    assert_int_equal(kvp_tokenizer_bos(t), 1);
    assert_int_equal(kvp_tokenizer_eos(t), 2);
    assert_true(kvp_tokenizer_adds_bos(t));
    s = "<s>Hello";
    assert_int_equal(kvp_tokenizer_encode(t, s, strlen(s), true, &ids, &n, &err), 0);
    assert_int_equal(ids[0], 1);
    for (size_t i = 1; i < n; i++)
        assert_false(kvp_tokenizer_is_control(t, ids[i]));
    char *back;
    size_t back_len;
    assert_int_equal(kvp_tokenizer_decode(t, ids, n, &back, &back_len, &err), 0);
    assert_string_equal(back, "<s>Hello"); /* BOS has no text, prefix space removed */
    free(back);
    free(ids);
    kvp_tokenizer_free(&t);
}

/* ---- kvpred's byte-level vocabulary ------------------------------------- */

/* Merges in the byte alphabet: "Ġ" is the space byte 0x20. */
static const char *const MERGES[] = {"h e",        "l l", "he ll",       "hell o",
                                     "\xc4\xa0 w", "o r", "\xc4\xa0w or"};
#define N_MERGES (sizeof MERGES / sizeof MERGES[0])
enum { T_HE = 256, T_LL, T_HELL, T_HELLO, T_SW, T_OR, T_SWOR, T_BOS, T_EOS };

static kvp_tokenizer_t *bytelevel_tokenizer(void) {
    char path[1024];
    tmp_path(path, sizeof path, "tok_bytelevel.gguf");
    kvp_err_t err = {0};
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    assert_non_null(w);
    if (kvp_tokenizer_write_bytelevel(w, MERGES, N_MERGES, &err))
        fail_msg("write_bytelevel: %s", err.msg);
    if (kvp_gguf_writer_write(w, path, &err)) fail_msg("write %s: %s", path, err.msg);
    kvp_gguf_writer_free(&w);
    return open_tokenizer(path);
}

static void expect_ids(const kvp_tokenizer_t *t, const char *s, bool special, const int32_t *want,
                       size_t n_want) {
    kvp_err_t err = {0};
    int32_t *got;
    size_t n_got;
    assert_int_equal(kvp_tokenizer_encode(t, s, strlen(s), special, &got, &n_got, &err), 0);
    if (n_got != n_want || (n_got && want && memcmp(got, want, n_got * sizeof *got))) {
        print_escaped("input:    ", s, strlen(s));
        print_ids("expected: ", want, n_want);
        print_ids("got:      ", got, n_got);
        free(got);
        fail_msg("wrong ids");
    }
    free(got);
}

static void test_bytelevel_applies_merges_by_rank(void **state) {
    (void)state;
    kvp_tokenizer_t *t = bytelevel_tokenizer();
    assert_int_equal(kvp_tokenizer_n_vocab(t), kvp_tokenizer_bytelevel_n_vocab(N_MERGES));
    assert_int_equal(kvp_tokenizer_n_vocab(t), 256 + (int)N_MERGES + 2);

    expect_ids(t, "hello", false, (int32_t[]){T_HELLO}, 1);
    expect_ids(t, "hell", false, (int32_t[]){T_HELL}, 1);
    expect_ids(t, "ohell", false, (int32_t[]){'o', T_HELL}, 2);
    expect_ids(t, "hello world", false, (int32_t[]){T_HELLO, T_SWOR, 'l', 'd'}, 4);
    expect_ids(t, "hehe", false, (int32_t[]){T_HE, T_HE}, 2);
    /* the pre-tokenizer splits " he" from "a"; no merge joins the space to "he" */
    expect_ids(t, "a he", false, (int32_t[]){'a', ' ', T_HE}, 3);
    expect_ids(t, "", false, NULL, 0);
    expect_ids(t, "\n", false, (int32_t[]){'\n'}, 1);

    char piece[8];
    assert_int_equal(kvp_tokenizer_piece(t, T_SWOR, piece, sizeof piece), 4);
    assert_memory_equal(piece, " wor", 4);
    assert_int_equal(kvp_tokenizer_piece(t, 0, piece, sizeof piece), 1);
    assert_int_equal(piece[0], 0);
    assert_int_equal(kvp_tokenizer_piece(t, T_HELLO, piece, 2), 5); /* full length, 2 written */
    assert_true(kvp_tokenizer_piece(t, -1, piece, sizeof piece) < 0);
    assert_true(kvp_tokenizer_piece(t, T_EOS + 1, piece, sizeof piece) < 0);
    kvp_tokenizer_free(&t);
}

static void test_bytelevel_special_tokens(void **state) {
    (void)state;
    kvp_tokenizer_t *t = bytelevel_tokenizer();
    assert_int_equal(kvp_tokenizer_bos(t), T_BOS);
    assert_int_equal(kvp_tokenizer_eos(t), T_EOS);
    assert_true(kvp_tokenizer_adds_bos(t));
    assert_true(kvp_tokenizer_is_control(t, T_BOS));
    assert_true(kvp_tokenizer_is_control(t, T_EOS));
    assert_false(kvp_tokenizer_is_control(t, 'a'));
    assert_false(kvp_tokenizer_is_control(t, -1));
    assert_int_equal(kvp_tokenizer_piece(t, T_BOS, NULL, 0), 0);
    assert_int_equal(kvp_tokenizer_piece(t, T_EOS, NULL, 0), 0);

    expect_ids(t, "hello", true, (int32_t[]){T_BOS, T_HELLO}, 2);
    expect_ids(t, "", true, (int32_t[]){T_BOS}, 1);
    /* "<|bos|>" typed in the text is text */
    expect_ids(t, "<|bos|>", false, (int32_t[]){'<', '|', 'b', 'o', 's', '|', '>'}, 7);

    kvp_err_t err = {0};
    char *s;
    size_t len;
    int32_t ids[] = {T_BOS, T_HELLO, T_SWOR, 'l', 'd', T_EOS};
    assert_int_equal(kvp_tokenizer_decode(t, ids, 6, &s, &len, &err), 0);
    assert_string_equal(s, "hello world");
    assert_int_equal(len, 11);
    free(s);
    int32_t bad[] = {T_HELLO, 9999};
    assert_int_equal(kvp_tokenizer_decode(t, bad, 2, &s, &len, &err), KVP_ERANGE);
    assert_null(s);
    assert_non_null(strstr(err.msg, "9999"));
    kvp_tokenizer_free(&t);
}

static uint64_t rng_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Random bytes, and random mixes of the pieces that stress the regex
 * (spaces, newlines, digits, letters, multi-byte and broken sequences). */
static void test_bytelevel_round_trips_random_bytes(void **state) {
    (void)state;
    kvp_tokenizer_t *t = bytelevel_tokenizer();
    static const char *bits[] = {" ",
                                 "  ",
                                 "\n",
                                 "\r\n",
                                 "\t",
                                 "h",
                                 "e",
                                 "llo",
                                 "123",
                                 "'s",
                                 "'LL",
                                 "\xc3\xa9",
                                 "\xe2\x96\x81",
                                 "\xf0\x9f\xa6\x99",
                                 "\xff",
                                 "\xc3",
                                 "\x80",
                                 "\0",
                                 "!?",
                                 "\xe2\x82"};
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    char buf[512];
    for (int iter = 0; iter < 400; iter++) {
        size_t n = 0, want = rng_next(&seed) % 300;
        if (iter % 2) {
            while (n < want)
                buf[n++] = (char)(rng_next(&seed) & 0xFF);
        } else {
            while (n < want) {
                const char *b = bits[rng_next(&seed) % (sizeof bits / sizeof bits[0])];
                size_t bl = b[0] ? strlen(b) : 1;
                if (n + bl > sizeof buf) break;
                memcpy(buf + n, b, bl);
                n += bl;
            }
        }
        assert_round_trip(t, buf, n);
    }
    kvp_tokenizer_free(&t);
}

/* Long runs: the regex backtracks over whole runs of spaces. */
static void test_bytelevel_long_runs(void **state) {
    (void)state;
    kvp_tokenizer_t *t = bytelevel_tokenizer();
    size_t n = 200000;
    char *s = malloc(n);
    memset(s, ' ', n);
    s[n - 1] = 'x';
    assert_round_trip(t, s, n);
    memset(s, 'h', n);
    assert_round_trip(t, s, n);
    for (size_t i = 0; i < n; i++)
        s[i] = "\xff\n7"[i % 3];
    assert_round_trip(t, s, n);
    free(s);
    kvp_tokenizer_free(&t);
}

static void test_bytelevel_rejects_bad_merges(void **state) {
    (void)state;
    kvp_err_t err = {0};
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    const char *no_space[] = {"he"};
    assert_int_equal(kvp_tokenizer_write_bytelevel(w, no_space, 1, &err), KVP_EINVAL);
    const char *unknown_side[] = {"he llo"}; /* "he" and "llo" are not tokens yet */
    assert_int_equal(kvp_tokenizer_write_bytelevel(w, unknown_side, 1, &err), KVP_EINVAL);
    assert_non_null(strstr(err.msg, "he llo"));
    const char *twice[] = {"h e", "h e"};
    assert_int_equal(kvp_tokenizer_write_bytelevel(w, twice, 2, &err), KVP_EINVAL);
    const char *raw_space[] = {"a  b"}; /* a real space is not in the byte alphabet */
    assert_int_equal(kvp_tokenizer_write_bytelevel(w, raw_space, 1, &err), KVP_EINVAL);
    kvp_gguf_writer_free(&w);
}

/* ---- a small SentencePiece vocabulary ----------------------------------- */

/* <unk> <s> </s>, the 256 byte tokens, then pieces with scores. */
static kvp_tokenizer_t *spm_tokenizer(bool space_prefix) {
    static const char *pieces[] = {"\xe2\x96\x81",
                                   "a",
                                   "b",
                                   "c",
                                   "\xe2\x96\x81"
                                   "a",
                                   "ab",
                                   "bc",
                                   "\xe2\x96\x81"
                                   "ab",
                                   "abc"};
    static const float piece_scores[] = {-1, -2, -2, -2, -3, -4, -1, -5, -6};
    enum { N_PIECES = sizeof pieces / sizeof pieces[0], N = 3 + 256 + N_PIECES };
    const char *tokens[N];
    char bytes[256][8];
    float scores[N];
    int32_t types[N];
    tokens[0] = "<unk>";
    tokens[1] = "<s>";
    tokens[2] = "</s>";
    types[0] = 2;
    types[1] = types[2] = 3;
    for (int b = 0; b < 256; b++) {
        snprintf(bytes[b], sizeof bytes[b], "<0x%02X>", b);
        tokens[3 + b] = bytes[b];
        types[3 + b] = 6;
    }
    for (int i = 0; i < N; i++)
        scores[i] = 0;
    for (int i = 0; i < N_PIECES; i++) {
        tokens[259 + i] = pieces[i];
        types[259 + i] = 1;
        scores[259 + i] = piece_scores[i];
    }
    char path[1024];
    tmp_path(path, sizeof path, space_prefix ? "tok_spm.gguf" : "tok_spm_noprefix.gguf");
    kvp_err_t err = {0};
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    assert_int_equal(kvp_gguf_writer_set_str(w, "tokenizer.ggml.model", "llama"), 0);
    assert_int_equal(kvp_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", tokens, N), 0);
    assert_int_equal(kvp_gguf_writer_set_arr_f32(w, "tokenizer.ggml.scores", scores, N), 0);
    assert_int_equal(kvp_gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", types, N), 0);
    if (!space_prefix)
        assert_int_equal(kvp_gguf_writer_set_bool(w, "tokenizer.ggml.add_space_prefix", false), 0);
    if (kvp_gguf_writer_write(w, path, &err)) fail_msg("write %s: %s", path, err.msg);
    kvp_gguf_writer_free(&w);
    return open_tokenizer(path);
}

enum { S_SP = 259, S_A, S_B, S_C, S_SPA, S_AB, S_BC, S_SPAB, S_ABC };

static void test_spm_merges_by_score_with_byte_fallback(void **state) {
    (void)state;
    kvp_tokenizer_t *t = spm_tokenizer(true);
    /* defaults when the file is silent: <s> </s>, BOS added */
    assert_int_equal(kvp_tokenizer_bos(t), 1);
    assert_int_equal(kvp_tokenizer_eos(t), 2);
    assert_true(kvp_tokenizer_adds_bos(t));
    /* "▁abc": bc (-1) beats ▁a (-3) and ab (-4); then ▁a + bc is not a piece */
    expect_ids(t, "abc", false, (int32_t[]){S_SPA, S_BC}, 2);
    expect_ids(t, "ab", false, (int32_t[]){S_SPAB}, 1);
    expect_ids(t, "abc", true, (int32_t[]){1, S_SPA, S_BC}, 3);
    /* é is not a piece: its two UTF-8 bytes as <0xC3> <0xA9> */
    expect_ids(t, "a\xc3\xa9", false, (int32_t[]){S_SPA, 3 + 0xC3, 3 + 0xA9}, 3);
    expect_ids(t, "a b", false, (int32_t[]){S_SPA, S_SP, S_B}, 3);
    expect_ids(t, "", false, NULL, 0);
    /* "<s>" in the text is text */
    expect_ids(t, "<s>", false, (int32_t[]){S_SP, 3 + '<', 3 + 's', 3 + '>'}, 4);
    assert_round_trip(t, "a b  c\xc3\xa9<s>", 11);
    assert_round_trip(t, " ab", 3);
    kvp_tokenizer_free(&t);

    t = spm_tokenizer(false);
    /* "abc": bc (-1), then a + bc = abc (-6) */
    expect_ids(t, "abc", false, (int32_t[]){S_ABC}, 1);
    expect_ids(t, "ab c", false, (int32_t[]){S_AB, S_SP, S_C}, 3);
    assert_round_trip(t, "abc b", 5);
    kvp_tokenizer_free(&t);
}

/* ---- errors ------------------------------------------------------------- */

/* Writes a vocabulary with the given model and pre (NULL: absent) and the
 * byte tokens (unless no_tokens), and tries to build a tokenizer from it. */
static int try_vocab(const char *model, const char *pre, bool no_tokens, kvp_err_t *err) {
    char path[1024];
    tmp_path(path, sizeof path, "tok_bad.gguf");
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    kvp_tokenizer_write_bytelevel(w, NULL, 0, err);
    if (model) kvp_gguf_writer_set_str(w, "tokenizer.ggml.model", model);
    if (pre) kvp_gguf_writer_set_str(w, "tokenizer.ggml.pre", pre);
    if (no_tokens) kvp_gguf_writer_set_str(w, "tokenizer.ggml.tokens", "not an array");
    if (kvp_gguf_writer_write(w, path, err)) fail_msg("write %s: %s", path, err->msg);
    kvp_gguf_writer_free(&w);
    kvp_gguf_t *g = NULL;
    if (kvp_gguf_open(&g, path, err)) fail_msg("open %s: %s", path, err->msg);
    kvp_tokenizer_t *t = (kvp_tokenizer_t *)0x1;
    int rc = kvp_tokenizer_from_gguf(&t, g, err);
    assert_true(rc != 0 || t != NULL);
    if (rc) assert_null(t);
    kvp_tokenizer_free(&t);
    kvp_gguf_free(&g);
    return rc;
}

static void test_unsupported_model_names_it(void **state) {
    (void)state;
    kvp_err_t err = {0};
    assert_int_equal(try_vocab("xyz", NULL, false, &err), KVP_EUNSUPPORTED);
    assert_non_null(strstr(err.msg, "'xyz'"));
    assert_int_equal(try_vocab("gpt2", "not-a-pre", false, &err), KVP_EUNSUPPORTED);
    assert_non_null(strstr(err.msg, "'not-a-pre'"));
    assert_int_equal(try_vocab("gpt2", "llama-bpe", false, &err), 0);
    assert_int_equal(try_vocab("gpt2", "default", false, &err), 0);

    /* a hand-made gpt2 vocabulary without tokenizer.ggml.pre: the GPT-2 rule */
    char path[1024];
    tmp_path(path, sizeof path, "tok_nopre.gguf");
    char bytes[256][3] = {{0}};
    const char *tokens[256];
    for (int b = 0; b < 256; b++) {
        tokens[b] = bytes[b];
        bytes[b][0] = (char)(b < 33 ? 0xC4 : b);
        bytes[b][b < 33 ? 1 : 0] = (char)(b < 33 ? 0x80 + b : b);
    }
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    kvp_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2");
    kvp_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", tokens, 128); /* ASCII only */
    kvp_gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", NULL, 0);
    assert_int_equal(kvp_gguf_writer_write(w, path, &err), 0);
    kvp_gguf_writer_free(&w);
    kvp_tokenizer_t *t = open_tokenizer(path);
    assert_int_equal(kvp_tokenizer_bos(t), -1);
    assert_false(kvp_tokenizer_adds_bos(t));
    expect_ids(t, "hi there", false, (int32_t[]){'h', 'i', ' ', 't', 'h', 'e', 'r', 'e'}, 8);
    /* a byte with no token and no unknown token: an error, not a crash */
    int32_t *ids = NULL;
    size_t n;
    assert_int_equal(kvp_tokenizer_encode(t, "\xe9", 1, false, &ids, &n, &err), KVP_EFORMAT);
    assert_null(ids);
    kvp_tokenizer_free(&t);
}

static void test_missing_or_bad_token_list_is_an_error(void **state) {
    (void)state;
    kvp_err_t err = {0};
    /* tokens replaced by a string */
    int rc = try_vocab("gpt2", NULL, true, &err);
    assert_int_equal(rc, KVP_EFORMAT);
    assert_non_null(strstr(err.msg, "tokenizer.ggml.tokens"));

    /* no tokenizer keys at all */
    char path[1024];
    tmp_path(path, sizeof path, "tok_empty.gguf");
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    kvp_gguf_writer_set_str(w, "tokenizer.ggml.model", "llama");
    assert_int_equal(kvp_gguf_writer_write(w, path, &err), 0);
    kvp_gguf_writer_free(&w);
    kvp_gguf_t *g = NULL;
    assert_int_equal(kvp_gguf_open(&g, path, &err), 0);
    kvp_tokenizer_t *t = NULL;
    rc = kvp_tokenizer_from_gguf(&t, g, &err);
    assert_true(rc < 0);
    assert_null(t);
    printf("missing tokens: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "tokenizer.ggml.tokens"));
    kvp_gguf_free(&g);

    /* no model key */
    w = kvp_gguf_writer_new();
    kvp_gguf_writer_set_str(w, "general.architecture", "llama");
    assert_int_equal(kvp_gguf_writer_write(w, path, &err), 0);
    kvp_gguf_writer_free(&w);
    assert_int_equal(kvp_gguf_open(&g, path, &err), 0);
    assert_int_equal(kvp_tokenizer_from_gguf(&t, g, &err), KVP_EFORMAT);
    assert_non_null(strstr(err.msg, "tokenizer.ggml.model"));
    kvp_gguf_free(&g);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vectors_llama_spm),
        cmocka_unit_test(test_vectors_llama_bpe),
        cmocka_unit_test(test_vectors_gpt2),
        cmocka_unit_test(test_real_bpe_vocab_is_lossless_on_invalid_utf8),
        cmocka_unit_test(test_real_special_tokens),
        cmocka_unit_test(test_bytelevel_applies_merges_by_rank),
        cmocka_unit_test(test_bytelevel_special_tokens),
        cmocka_unit_test(test_bytelevel_round_trips_random_bytes),
        cmocka_unit_test(test_bytelevel_long_runs),
        cmocka_unit_test(test_bytelevel_rejects_bad_merges),
        cmocka_unit_test(test_spm_merges_by_score_with_byte_fallback),
        cmocka_unit_test(test_unsupported_model_names_it),
        cmocka_unit_test(test_missing_or_bad_token_list_is_an_error),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
