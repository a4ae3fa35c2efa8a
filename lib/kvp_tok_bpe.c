/* kvp_tok_bpe: the "gpt2" tokenizer, byte-level BPE as llama.cpp's
 * llm_tokenizer_bpe runs it.
 *
 * A regex (chosen by tokenizer.ggml.pre) splits the text into words; each
 * word's bytes become characters of GPT-2's byte alphabet, and then the
 * adjacent pair with the lowest merge rank is merged until no pair has a
 * rank. The regexes are llama.cpp's, run by PCRE2 as written (lookahead
 * included). PCRE2_MATCH_INVALID_UTF lets invalid UTF-8 through: no pattern
 * matches it, so it ends up between matches and is tokenized as a word of its
 * own, byte for byte, which keeps encode/decode lossless for any input. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_tok_internal.h"

static const char RE_GPT2[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char RE_LLAMA3[] =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char RE_QWEN2[] =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* tokenizer.ggml.pre values, with llama.cpp's settings for each */
static const struct {
    const char *name;
    const char *regex;
    bool ignore_merges; /* a word that is a token is emitted as it is */
    bool add_bos;       /* default for tokenizer.ggml.add_bos_token */
} PRE[] = {
    {"default", RE_GPT2, false, false},   {"gpt-2", RE_GPT2, false, false},
    {"llama-bpe", RE_LLAMA3, true, true}, {"llama3", RE_LLAMA3, true, true},
    {"llama-v3", RE_LLAMA3, true, true},  {"qwen2", RE_QWEN2, false, false},
};

int kvp_tok_bpe_init(kvp_tokenizer_t *t, bool *default_add_bos, kvp_err_t *err) {
    size_t i = 0, n = sizeof PRE / sizeof PRE[0];
    while (i < n && strcmp(PRE[i].name, t->pre))
        i++;
    if (i == n)
        return kvp_err_set(err, KVP_EUNSUPPORTED,
                           "tokenizer: unsupported tokenizer.ggml.pre '%s' (supported: default, "
                           "gpt-2, llama-bpe, llama3, llama-v3, qwen2)",
                           t->pre);
    int code;
    PCRE2_SIZE off;
    pcre2_code *re =
        pcre2_compile((PCRE2_SPTR)PRE[i].regex, PCRE2_ZERO_TERMINATED,
                      PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &code, &off, NULL);
    if (!re) {
        PCRE2_UCHAR msg[128];
        pcre2_get_error_message(code, msg, sizeof msg);
        return kvp_err_set(err, KVP_EUNSUPPORTED, "tokenizer: pre-tokenizer '%s': %s at %zu",
                           t->pre, (const char *)msg, (size_t)off);
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* the interpreter does without */
    t->regex = re;
    t->ignore_merges = PRE[i].ignore_merges;
    *default_add_bos = PRE[i].add_bos;
    return 0;
}

void kvp_tok_bpe_release(kvp_tokenizer_t *t) {
    pcre2_code_free(t->regex);
    t->regex = NULL;
}

/* A token the text may turn into (never a control or the unknown token). */
static int32_t text_token(const kvp_tokenizer_t *t, const char *s, size_t n) {
    int32_t id = kvp_tok_lookup(t, s, n);
    if (id < 0) return -1;
    int ty = t->type[id];
    return (ty == KVP_TOK_CONTROL || ty == KVP_TOK_UNKNOWN) ? -1 : id;
}

/* Scratch space for one encode call, sized for the whole text. */
typedef struct bpe_session {
    const kvp_tokenizer_t *t;
    char *mapped;       /* a word in the byte alphabet */
    kvp_tok_sym_t *sym; /* one per byte of the word */
    kvp_tok_heap_t heap;
    kvp_tok_out_t *o;
    kvp_err_t *err;
} bpe_session_t;

static int add_bigram(bpe_session_t *s, int left, int right) {
    if (left < 0 || right < 0) return 0;
    const kvp_tok_sym_t *l = &s->sym[left], *r = &s->sym[right];
    int32_t rank = kvp_tok_merge_rank(s->t, l->text, l->n, r->text, r->n);
    if (rank < 0) return 0;
    kvp_tok_bigram_t b = {.left = left, .right = right, .size = l->n + r->n, .prio = -rank};
    return kvp_tok_heap_push(&s->heap, b);
}

/* A symbol that is not a token: one token per character (= input byte), as
 * every complete byte-level vocabulary has. */
static int emit_chars(bpe_session_t *s, const kvp_tok_sym_t *sym) {
    for (size_t j = 0; j < sym->n;) {
        size_t cl = kvp_tok_utf8_len((unsigned char)sym->text[j]);
        if (cl > sym->n - j) cl = sym->n - j;
        int32_t id = text_token(s->t, sym->text + j, cl);
        if (id < 0) id = s->t->unk;
        if (id < 0)
            return kvp_err_set(s->err, KVP_EFORMAT,
                               "tokenizer: the vocabulary has no token for '%.*s' (byte "
                               "alphabet incomplete) and no unknown token",
                               (int)cl, sym->text + j);
        int rc = kvp_tok_out_push(s->o, id);
        if (rc) return rc;
        j += cl;
    }
    return 0;
}

/* Tokenizes one word (bytes w[0..n)). */
static int bpe_word(bpe_session_t *s, const char *w, size_t n) {
    const kvp_tokenizer_t *t = s->t;
    if (n == 0) return 0;
    size_t m = 0;
    int n_sym = 0;
    for (size_t i = 0; i < n; i++, n_sym++) {
        size_t cl = kvp_tok_byte_to_utf8((unsigned char)w[i], s->mapped + m);
        s->sym[n_sym] = (kvp_tok_sym_t){s->mapped + m, cl, n_sym - 1, i + 1 < n ? n_sym + 1 : -1};
        m += cl;
    }
    if (t->ignore_merges) {
        int32_t id = text_token(t, s->mapped, m);
        if (id >= 0) return kvp_tok_out_push(s->o, id);
    }

    s->heap.n = 0;
    int rc = 0;
    for (int i = 1; !rc && i < n_sym; i++)
        rc = add_bigram(s, i - 1, i);
    while (!rc && s->heap.n) {
        kvp_tok_bigram_t b = kvp_tok_heap_pop(&s->heap);
        kvp_tok_sym_t *l = &s->sym[b.left], *r = &s->sym[b.right];
        /* stale: one side was merged away or has grown since it was queued */
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue;
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) s->sym[r->next].prev = b.left;
        rc = add_bigram(s, l->prev, b.left);
        if (!rc) rc = add_bigram(s, b.left, l->next);
    }
    for (int i = 0; !rc && i != -1; i = s->sym[i].next) {
        int32_t id = text_token(t, s->sym[i].text, s->sym[i].n);
        rc = id >= 0 ? kvp_tok_out_push(s->o, id) : emit_chars(s, &s->sym[i]);
    }
    return rc;
}

/* One regex match from pos; PCRE2_ERROR_NOMATCH or a negative code when none.
 * A JIT stack overflow (very long runs) falls back to the interpreter, which
 * uses the heap. */
static int next_match(const pcre2_code *re, const char *text, size_t len, size_t pos,
                      pcre2_match_data *md) {
    int rc = pcre2_match(re, (PCRE2_SPTR)text, len, pos, 0, md, NULL);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
        rc = pcre2_match(re, (PCRE2_SPTR)text, len, pos, PCRE2_NO_JIT, md, NULL);
    return rc;
}

int kvp_tok_bpe_encode(const kvp_tokenizer_t *t, const char *text, size_t len, kvp_tok_out_t *o,
                       kvp_err_t *err) {
    if (len > (size_t)INT32_MAX / 4)
        return kvp_err_set(err, KVP_ENOMEM, "tokenizer: text of %zu bytes is too long", len);
    bpe_session_t s = {.t = t, .o = o, .err = err};
    s.mapped = malloc(2 * len);
    s.sym = malloc(len * sizeof *s.sym);
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(t->regex, NULL);
    int rc = (!s.mapped || !s.sym || !md) ? KVP_ENOMEM : 0;

    size_t pos = 0;
    while (!rc && pos < len) {
        int m = next_match(t->regex, text, len, pos, md);
        if (m == PCRE2_ERROR_NOMATCH) {
            rc = bpe_word(&s, text + pos, len - pos); /* trailing bytes no pattern takes */
            break;
        }
        if (m < 0) {
            PCRE2_UCHAR msg[128];
            pcre2_get_error_message(m, msg, sizeof msg);
            rc = kvp_err_set(err, KVP_EINVAL, "tokenizer: pre-tokenizer '%s' at byte %zu: %s",
                             t->pre, pos, (const char *)msg);
            break;
        }
        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t start = ov[0], end = ov[1];
        if (start > pos) /* bytes between matches: invalid UTF-8 */
            rc = bpe_word(&s, text + pos, start - pos);
        if (end == start && start == len) break;
        if (end == start) { /* no pattern here matches empty; guard anyway */
            size_t cl = kvp_tok_utf8_len((unsigned char)text[start]);
            end = start + (cl < len - start ? cl : len - start);
        }
        if (!rc) rc = bpe_word(&s, text + start, end - start);
        pos = end;
    }

    pcre2_match_data_free(md);
    free(s.heap.v);
    free(s.sym);
    free(s.mapped);
    if (rc == KVP_ENOMEM) kvp_err_set(err, rc, "tokenizer: out of memory encoding %zu bytes", len);
    return rc;
}
