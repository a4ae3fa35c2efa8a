/* kvp_tokenizer: loading a vocabulary from GGUF, the shared machinery (hash
 * tables, merge queue, GPT-2's byte map), decoding, and the writer for
 * kvpred's own byte-level vocabularies. The two encoders live in
 * kvp_tok_spm.c ("llama") and kvp_tok_bpe.c ("gpt2"). */
#include "kvp_tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_tok_internal.h"

/* Limits on what a file may ask us to allocate. */
#define TOK_MAX_VOCAB (1 << 24)
#define TOK_MAX_MERGES (1 << 24)
#define TOK_MAX_TEXT (1u << 20) /* bytes of one token or merge */

#define KEY_MODEL "tokenizer.ggml.model"
#define KEY_PRE "tokenizer.ggml.pre"
#define KEY_TOKENS "tokenizer.ggml.tokens"
#define KEY_SCORES "tokenizer.ggml.scores"
#define KEY_TYPES "tokenizer.ggml.token_type"
#define KEY_MERGES "tokenizer.ggml.merges"
#define KEY_BOS "tokenizer.ggml.bos_token_id"
#define KEY_EOS "tokenizer.ggml.eos_token_id"
#define KEY_UNK "tokenizer.ggml.unknown_token_id"
#define KEY_ADD_BOS "tokenizer.ggml.add_bos_token"
#define KEY_ADD_EOS "tokenizer.ggml.add_eos_token"
#define KEY_SPACE_PREFIX "tokenizer.ggml.add_space_prefix"

#define BOS_TEXT "<|bos|>"
#define EOS_TEXT "<|eos|>"

/* ---- small shared pieces ------------------------------------------------ */

uint64_t kvp_tok_hash(uint64_t h, const void *p, size_t n) {
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t pair_hash(const char *l, size_t ln, const char *r, size_t rn) {
    uint64_t h = kvp_tok_hash(KVP_TOK_FNV_SEED, l, ln);
    h ^= (uint64_t)ln + 0x9e3779b97f4a7c15ull; /* so "ab"+"c" and "a"+"bc" differ */
    h *= 1099511628211ull;
    return kvp_tok_hash(h, r, rn);
}

static bool span_eq(kvp_tok_span_t k, const char *s, size_t n) {
    return k.n == n && (n == 0 || memcmp(k.p, s, n) == 0);
}

/* A table with room for n keys at load factor <= 1/2. */
static int table_init(kvp_tok_table_t *tab, size_t n) {
    size_t cap = 16;
    while (cap < 2 * n)
        cap *= 2;
    tab->slots = calloc(cap, sizeof *tab->slots);
    tab->mask = cap - 1;
    return tab->slots ? 0 : KVP_ENOMEM;
}

/* The slot that holds key s, or the empty slot where it would go. keys[v-1]
 * is the key of slot value v. */
static size_t text_slot(const kvp_tok_table_t *tab, const kvp_tok_span_t *keys, const char *s,
                        size_t n) {
    size_t i = (size_t)kvp_tok_hash(KVP_TOK_FNV_SEED, s, n) & tab->mask;
    for (;;) {
        uint32_t v = tab->slots[i];
        if (!v || span_eq(keys[v - 1], s, n)) return i;
        i = (i + 1) & tab->mask;
    }
}

static size_t pair_slot(const kvp_tok_table_t *tab, const kvp_tok_span_t *lk,
                        const kvp_tok_span_t *rk, const char *l, size_t ln, const char *r,
                        size_t rn) {
    size_t i = (size_t)pair_hash(l, ln, r, rn) & tab->mask;
    for (;;) {
        uint32_t v = tab->slots[i];
        if (!v || (span_eq(lk[v - 1], l, ln) && span_eq(rk[v - 1], r, rn))) return i;
        i = (i + 1) & tab->mask;
    }
}

int32_t kvp_tok_lookup(const kvp_tokenizer_t *t, const char *s, size_t n) {
    uint32_t v = t->ids.slots[text_slot(&t->ids, t->tok, s, n)];
    return v ? (int32_t)(v - 1) : -1;
}

int32_t kvp_tok_merge_rank(const kvp_tokenizer_t *t, const char *l, size_t ln, const char *r,
                           size_t rn) {
    if (!t->n_merges) return -1;
    uint32_t v = t->ranks.slots[pair_slot(&t->ranks, t->merge_l, t->merge_r, l, ln, r, rn)];
    return v ? (int32_t)(v - 1) : -1;
}

/* GPT-2 maps the 188 printable bytes to themselves and the other 68 (controls,
 * space, DEL..NBSP, soft hyphen) to U+0100.. in byte order, so that every
 * byte is a visible character in vocab files. */
uint32_t kvp_tok_byte_to_cp(unsigned char b) {
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE) return b;
    if (b <= 0x20) return 256u + b;
    if (b <= 0xA0) return 256u + 33u + (b - 0x7Fu);
    return 256u + 67u; /* 0xAD */
}

/* The byte GPT-2's map sends to cp, or -1. */
static int cp_to_byte(uint32_t cp) {
    if ((cp >= 0x21 && cp <= 0x7E) || (cp >= 0xA1 && cp <= 0xAC) || (cp >= 0xAE && cp <= 0xFF))
        return (int)cp;
    if (cp < 256 || cp >= 256 + 68) return -1;
    uint32_t n = cp - 256;
    if (n <= 0x20) return (int)n;
    if (n < 67) return (int)(0x7F + n - 33);
    return 0xAD;
}

size_t kvp_tok_byte_to_utf8(unsigned char b, char *out) {
    uint32_t cp = kvp_tok_byte_to_cp(b);
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

/* Decodes one UTF-8 sequence of at most 4 bytes at s (n > 0 bytes left);
 * returns its length, or 0 if it is not valid UTF-8. */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    size_t len = kvp_tok_utf8_len(s[0]);
    if (len == 1) {
        *cp = s[0];
        return s[0] < 0x80 ? 1 : 0;
    }
    if (len > n) return 0;
    uint32_t c = s[0] & (0x7F >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        c = (c << 6) | (s[i] & 0x3F);
    }
    *cp = c;
    return len;
}

int kvp_tok_out_push(kvp_tok_out_t *o, int32_t id) {
    if (o->n == o->cap) {
        size_t cap = o->cap ? 2 * o->cap : 64;
        int32_t *ids = realloc(o->ids, cap * sizeof *ids);
        if (!ids) return KVP_ENOMEM;
        o->ids = ids;
        o->cap = cap;
    }
    o->ids[o->n++] = id;
    return 0;
}

/* a comes out of the heap before b */
static bool bigram_before(const kvp_tok_bigram_t *a, const kvp_tok_bigram_t *b) {
    return a->prio > b->prio || (a->prio == b->prio && a->left < b->left);
}

int kvp_tok_heap_push(kvp_tok_heap_t *h, kvp_tok_bigram_t b) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? 2 * h->cap : 64;
        kvp_tok_bigram_t *v = realloc(h->v, cap * sizeof *v);
        if (!v) return KVP_ENOMEM;
        h->v = v;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!bigram_before(&b, &h->v[parent])) break;
        h->v[i] = h->v[parent];
        i = parent;
    }
    h->v[i] = b;
    return 0;
}

kvp_tok_bigram_t kvp_tok_heap_pop(kvp_tok_heap_t *h) {
    kvp_tok_bigram_t top = h->v[0];
    kvp_tok_bigram_t last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && bigram_before(&h->v[c + 1], &h->v[c])) c++;
        if (!bigram_before(&h->v[c], &last)) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (h->n) h->v[i] = last;
    return top;
}

/* ---- loading ------------------------------------------------------------ */

void kvp_tokenizer_free(kvp_tokenizer_t **tp) {
    if (!tp || !*tp) return;
    kvp_tokenizer_t *t = *tp;
    kvp_tok_bpe_release(t);
    free(t->text);
    free(t->tok);
    free(t->type);
    free(t->score);
    free(t->ids.slots);
    free(t->piece_text);
    free(t->piece);
    free(t->merge_text);
    free(t->merge_l);
    free(t->merge_r);
    free(t->ranks.slots);
    free(t);
    *tp = NULL;
}

static bool is_int_type(kvp_gguf_vtype_t ty) {
    return ty == KVP_GGUF_U8 || ty == KVP_GGUF_I8 || ty == KVP_GGUF_U16 || ty == KVP_GGUF_I16 ||
           ty == KVP_GGUF_U32 || ty == KVP_GGUF_I32 || ty == KVP_GGUF_U64 || ty == KVP_GGUF_I64;
}

/* An optional numeric array of exactly n elements: NULL if absent. */
static int optional_arr(const kvp_gguf_t *g, const char *key, bool want_float, uint64_t n,
                        const kvp_gguf_kv_t **out, kvp_err_t *err) {
    const kvp_gguf_kv_t *kv = kvp_gguf_find(g, key);
    *out = NULL;
    if (!kv) return 0;
    if (kv->type != KVP_GGUF_ARRAY)
        return kvp_err_set(err, KVP_EFORMAT, "%s: expected an array, got %s", key,
                           kvp_gguf_vtype_name(kv->type));
    kvp_gguf_vtype_t et = kv->v.arr.elem_type;
    bool ok = want_float ? (et == KVP_GGUF_F32 || et == KVP_GGUF_F64) : is_int_type(et);
    if (!ok || (kv->v.arr.count && !kv->v.arr.data))
        return kvp_err_set(err, KVP_EFORMAT, "%s: unexpected element type %s", key,
                           kvp_gguf_vtype_name(et));
    if (kv->v.arr.count != n)
        return kvp_err_set(err, KVP_EFORMAT, "%s has %llu entries but there are %llu tokens", key,
                           (unsigned long long)kv->v.arr.count, (unsigned long long)n);
    *out = kv;
    return 0;
}

/* A special token id: def when absent, -1 when negative; must be < n_vocab. */
static int special_id(const kvp_gguf_t *g, const char *key, int32_t def, int32_t n_vocab,
                      int32_t *out, kvp_err_t *err) {
    *out = def < n_vocab ? def : -1;
    if (!kvp_gguf_find(g, key)) return 0;
    int64_t v;
    int rc = kvp_gguf_get_i64(g, key, &v, err);
    if (rc) return rc;
    if (v >= n_vocab)
        return kvp_err_set(err, KVP_EFORMAT, "%s = %lld is out of range (%d tokens)", key,
                           (long long)v, n_vocab);
    *out = v < 0 ? -1 : (int32_t)v;
    return 0;
}

/* Copies n strings into one arena and points spans at the copies. */
static int copy_strings(const kvp_gguf_str_t *strs, size_t n, const char *what, char **arena,
                        kvp_tok_span_t *spans, kvp_err_t *err) {
    size_t total = 1;
    for (size_t i = 0; i < n; i++) {
        if (strs[i].len > TOK_MAX_TEXT)
            return kvp_err_set(err, KVP_ENOMEM, "%s[%zu] is %llu bytes (limit %u)", what, i,
                               (unsigned long long)strs[i].len, TOK_MAX_TEXT);
        total += strs[i].len;
    }
    char *a = malloc(total);
    if (!a) return kvp_err_set(err, KVP_ENOMEM, "%s: out of memory", what);
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        if (strs[i].len) memcpy(a + off, strs[i].ptr, strs[i].len);
        spans[i].p = a + off;
        spans[i].n = (uint32_t)strs[i].len;
        off += strs[i].len;
    }
    *arena = a;
    return 0;
}

/* SPM pieces: U+2581 back to a space, <0xXX> to its byte. */
static size_t spm_piece(const kvp_tokenizer_t *t, int32_t id, char *dst) {
    kvp_tok_span_t s = t->tok[id];
    switch (t->type[id]) {
    case KVP_TOK_CONTROL:
        return 0;
    case KVP_TOK_UNKNOWN:
        memcpy(dst, "\xe2\x96\x85", 3);
        return 3; /* as llama.cpp */
    case KVP_TOK_BYTE:
        if (s.n == 6 && !memcmp(s.p, "<0x", 3) && s.p[5] == '>') {
            char hex[3] = {s.p[3], s.p[4], 0}, *end;
            unsigned long b = strtoul(hex, &end, 16);
            if (*end == 0) {
                dst[0] = (char)b;
                return 1;
            }
        }
        break;
    default:
        break;
    }
    size_t n = 0;
    for (size_t i = 0; i < s.n;) {
        if (i + 3 <= s.n && !memcmp(s.p + i, "\xe2\x96\x81", 3)) {
            dst[n++] = ' ';
            i += 3;
        } else {
            dst[n++] = s.p[i++];
        }
    }
    return n;
}

/* BPE pieces: each character of GPT-2's byte alphabet back to its byte; any
 * other character (or invalid byte) is kept as it is. */
static size_t bpe_piece(const kvp_tokenizer_t *t, int32_t id, char *dst) {
    kvp_tok_span_t s = t->tok[id];
    int ty = t->type[id];
    if (ty == KVP_TOK_CONTROL) return 0;
    if (ty == KVP_TOK_USER_DEFINED) {
        memcpy(dst, s.p, s.n);
        return s.n;
    }
    size_t n = 0;
    const unsigned char *p = (const unsigned char *)s.p;
    for (size_t i = 0; i < s.n;) {
        uint32_t cp;
        size_t len = utf8_decode(p + i, s.n - i, &cp);
        int b = len ? cp_to_byte(cp) : -1;
        if (b >= 0) {
            dst[n++] = (char)b;
        } else {
            if (!len) len = 1;
            memcpy(dst + n, p + i, len);
            n += len;
        }
        i += len;
    }
    return n;
}

/* Precomputes every token's bytes: pieces are never longer than their text
 * except the unknown token's 3-byte mark. */
static int build_pieces(kvp_tokenizer_t *t, kvp_err_t *err) {
    size_t total = 0;
    for (int32_t i = 0; i < t->n_vocab; i++)
        total += t->tok[i].n + 3;
    t->piece_text = malloc(total + 1);
    t->piece = malloc((size_t)t->n_vocab * sizeof *t->piece);
    if (!t->piece_text || !t->piece)
        return kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory for pieces");
    size_t off = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        char *dst = t->piece_text + off;
        size_t n = t->kind == KVP_TOK_SPM ? spm_piece(t, i, dst) : bpe_piece(t, i, dst);
        t->piece[i].p = dst;
        t->piece[i].n = (uint32_t)n;
        off += n;
    }
    return 0;
}

static int load_vocab(kvp_tokenizer_t *t, const kvp_gguf_t *g, kvp_err_t *err) {
    const kvp_gguf_kv_t *kv;
    int rc = kvp_gguf_get_arr(g, KEY_TOKENS, KVP_GGUF_STRING, &kv, err);
    if (rc) return kvp_err_wrap(err, "tokenizer: no token list");
    uint64_t n = kv->v.arr.count;
    if (n == 0 || n > TOK_MAX_VOCAB)
        return kvp_err_set(err, KVP_EFORMAT, "%s has %llu tokens (want 1..%d)", KEY_TOKENS,
                           (unsigned long long)n, TOK_MAX_VOCAB);
    t->n_vocab = (int32_t)n;
    t->tok = malloc(n * sizeof *t->tok);
    t->type = malloc(n * sizeof *t->type);
    t->score = calloc(n, sizeof *t->score);
    if (!t->tok || !t->type || !t->score)
        return kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory for %llu tokens",
                           (unsigned long long)n);
    if ((rc = copy_strings(kv->v.arr.strs, n, KEY_TOKENS, &t->text, t->tok, err))) return rc;

    const kvp_gguf_kv_t *types, *scores;
    if ((rc = optional_arr(g, KEY_TYPES, false, n, &types, err)) ||
        (rc = optional_arr(g, KEY_SCORES, true, n, &scores, err)))
        return rc;
    for (uint64_t i = 0; i < n; i++) {
        t->type[i] = types ? (int32_t)kvp_gguf_arr_i64(types, i) : KVP_TOK_NORMAL;
        if (scores) t->score[i] = (float)kvp_gguf_arr_f64(scores, i);
    }

    /* text -> id; a text listed twice maps to its last id, as in llama.cpp */
    if (table_init(&t->ids, n))
        return kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory for the token table");
    for (uint64_t i = 0; i < n; i++) {
        size_t s = text_slot(&t->ids, t->tok, t->tok[i].p, t->tok[i].n);
        t->ids.slots[s] = (uint32_t)i + 1;
    }
    return 0;
}

/* Merges "left right" (split at the first space after the first byte, as
 * llama.cpp does); rank = position in the list. */
static int load_merges(kvp_tokenizer_t *t, const kvp_gguf_t *g, kvp_err_t *err) {
    const kvp_gguf_kv_t *kv;
    int rc = kvp_gguf_get_arr(g, KEY_MERGES, KVP_GGUF_STRING, &kv, err);
    if (rc) return kvp_err_wrap(err, "tokenizer: gpt2 vocabulary without merges");
    uint64_t n = kv->v.arr.count;
    if (n > TOK_MAX_MERGES)
        return kvp_err_set(err, KVP_ENOMEM, "%s has %llu entries (limit %d)", KEY_MERGES,
                           (unsigned long long)n, TOK_MAX_MERGES);
    t->n_merges = n;
    if (!n) return 0;
    t->merge_l = malloc(n * sizeof *t->merge_l);
    t->merge_r = malloc(n * sizeof *t->merge_r);
    if (!t->merge_l || !t->merge_r)
        return kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory for %llu merges",
                           (unsigned long long)n);
    if ((rc = copy_strings(kv->v.arr.strs, n, KEY_MERGES, &t->merge_text, t->merge_l, err)))
        return rc;
    if (table_init(&t->ranks, n))
        return kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory for the merge table");
    for (uint64_t i = 0; i < n; i++) {
        kvp_tok_span_t m = t->merge_l[i];
        const char *sp = m.n > 1 ? memchr(m.p + 1, ' ', m.n - 1) : NULL;
        if (!sp)
            return kvp_err_set(err, KVP_EFORMAT, "%s[%llu] = '%.*s' is not \"left right\"",
                               KEY_MERGES, (unsigned long long)i, (int)(m.n < 64 ? m.n : 64), m.p);
        t->merge_l[i].n = (uint32_t)(sp - m.p);
        t->merge_r[i].p = sp + 1;
        t->merge_r[i].n = m.n - t->merge_l[i].n - 1;
        size_t s = pair_slot(&t->ranks, t->merge_l, t->merge_r, t->merge_l[i].p, t->merge_l[i].n,
                             t->merge_r[i].p, t->merge_r[i].n);
        if (!t->ranks.slots[s]) /* a repeated merge keeps its first (best) rank */
            t->ranks.slots[s] = (uint32_t)i + 1;
    }
    return 0;
}

/* SPM byte fallback: <0xXX>, else the byte itself as a token, else unknown. */
static void spm_byte_tokens(kvp_tokenizer_t *t) {
    for (int b = 0; b < 256; b++) {
        char buf[8];
        snprintf(buf, sizeof buf, "<0x%02X>", b);
        int32_t id = kvp_tok_lookup(t, buf, 6);
        if (id < 0) {
            char c = (char)b;
            id = kvp_tok_lookup(t, &c, 1);
        }
        t->byte_tok[b] = id >= 0 ? id : t->unk;
    }
}

static int from_gguf(kvp_tokenizer_t *t, const kvp_gguf_t *g, kvp_err_t *err) {
    const kvp_gguf_kv_t *model = kvp_gguf_find(g, KEY_MODEL);
    if (!model) return kvp_err_set(err, KVP_EFORMAT, "tokenizer: missing key %s", KEY_MODEL);
    if (model->type != KVP_GGUF_STRING)
        return kvp_err_set(err, KVP_EFORMAT, "tokenizer: %s is %s, not a string", KEY_MODEL,
                           kvp_gguf_vtype_name(model->type));
    kvp_gguf_str_t m = model->v.str;
    if (m.len == 5 && !memcmp(m.ptr, "llama", 5)) {
        t->kind = KVP_TOK_SPM;
    } else if (m.len == 4 && !memcmp(m.ptr, "gpt2", 4)) {
        t->kind = KVP_TOK_BPE;
    } else {
        return kvp_err_set(err, KVP_EUNSUPPORTED,
                           "tokenizer: unsupported %s '%.*s' (supported: llama, gpt2)", KEY_MODEL,
                           (int)(m.len < 64 ? m.len : 64), m.ptr);
    }

    int rc = load_vocab(t, g, err);
    if (rc) return rc;
    bool spm = t->kind == KVP_TOK_SPM;
    /* SentencePiece's conventional ids (<unk> <s> </s>) when the file is silent */
    if ((rc = special_id(g, KEY_BOS, spm ? 1 : -1, t->n_vocab, &t->bos, err)) ||
        (rc = special_id(g, KEY_EOS, spm ? 2 : -1, t->n_vocab, &t->eos, err)) ||
        (rc = special_id(g, KEY_UNK, spm ? 0 : -1, t->n_vocab, &t->unk, err)))
        return rc;

    bool default_add_bos = spm;
    if (spm) {
        if ((rc = kvp_gguf_get_bool_or(g, KEY_SPACE_PREFIX, true, &t->add_space_prefix, err)))
            return rc;
        spm_byte_tokens(t);
    } else {
        const kvp_gguf_kv_t *pre = kvp_gguf_find(g, KEY_PRE);
        const char *name = "default";
        size_t name_len = 7;
        if (pre && pre->type == KVP_GGUF_STRING) {
            name = pre->v.str.ptr;
            name_len = pre->v.str.len;
        } else if (pre) {
            return kvp_err_set(err, KVP_EFORMAT, "tokenizer: %s is %s, not a string", KEY_PRE,
                               kvp_gguf_vtype_name(pre->type));
        }
        size_t cp = name_len < sizeof t->pre - 1 ? name_len : sizeof t->pre - 1;
        memcpy(t->pre, name, cp);
        t->pre[cp] = 0;
        if (name_len != cp || memchr(name, 0, name_len))
            return kvp_err_set(err, KVP_EUNSUPPORTED, "tokenizer: unsupported %s '%s...'", KEY_PRE,
                               t->pre);
        if ((rc = kvp_tok_bpe_init(t, &default_add_bos, err)) || (rc = load_merges(t, g, err)))
            return rc;
    }
    if ((rc = kvp_gguf_get_bool_or(g, KEY_ADD_BOS, default_add_bos, &t->add_bos, err)) ||
        (rc = kvp_gguf_get_bool_or(g, KEY_ADD_EOS, false, &t->add_eos, err)))
        return rc;
    return build_pieces(t, err);
}

int kvp_tokenizer_from_gguf(kvp_tokenizer_t **out, const kvp_gguf_t *g, kvp_err_t *err) {
    *out = NULL;
    if (!g) return kvp_err_set(err, KVP_EINVAL, "tokenizer: no GGUF file");
    kvp_tokenizer_t *t = calloc(1, sizeof *t);
    if (!t) return kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory");
    t->bos = t->eos = t->unk = -1;
    int rc = from_gguf(t, g, err);
    if (rc) {
        kvp_tokenizer_free(&t);
        return rc;
    }
    *out = t;
    return 0;
}

/* ---- queries ------------------------------------------------------------ */

int32_t kvp_tokenizer_n_vocab(const kvp_tokenizer_t *t) {
    return t->n_vocab;
}

int32_t kvp_tokenizer_bos(const kvp_tokenizer_t *t) {
    return t->bos;
}

int32_t kvp_tokenizer_eos(const kvp_tokenizer_t *t) {
    return t->eos;
}

bool kvp_tokenizer_adds_bos(const kvp_tokenizer_t *t) {
    return t->add_bos && t->bos >= 0;
}

bool kvp_tokenizer_is_control(const kvp_tokenizer_t *t, int32_t id) {
    return id >= 0 && id < t->n_vocab && t->type[id] == KVP_TOK_CONTROL;
}

/* ---- encoding and decoding ---------------------------------------------- */

int kvp_tokenizer_encode(const kvp_tokenizer_t *t, const char *text, size_t len, bool add_special,
                         int32_t **out_tokens, size_t *out_n, kvp_err_t *err) {
    *out_tokens = NULL;
    *out_n = 0;
    if (!text && len) return kvp_err_set(err, KVP_EINVAL, "tokenizer: NULL text of %zu bytes", len);
    kvp_tok_out_t o = {0};
    int rc = 0;
    if (add_special && t->add_bos && t->bos >= 0 && kvp_tok_out_push(&o, t->bos)) goto oom;
    if (len && (rc = t->kind == KVP_TOK_SPM ? kvp_tok_spm_encode(t, text, len, &o, err)
                                            : kvp_tok_bpe_encode(t, text, len, &o, err))) {
        free(o.ids);
        return rc;
    }
    if (add_special && t->add_eos && t->eos >= 0 && kvp_tok_out_push(&o, t->eos)) goto oom;
    /* an empty result is still an allocation the caller frees */
    if (!o.ids && !(o.ids = malloc(sizeof *o.ids))) goto oom;
    *out_tokens = o.ids;
    *out_n = o.n;
    return 0;
oom:
    free(o.ids);
    return kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory encoding %zu bytes", len);
}

int kvp_tokenizer_piece(const kvp_tokenizer_t *t, int32_t id, char *buf, size_t cap) {
    if (id < 0 || id >= t->n_vocab) return KVP_ERANGE;
    kvp_tok_span_t p = t->piece[id];
    if (buf && cap) memcpy(buf, p.p, p.n < cap ? p.n : cap);
    return (int)p.n;
}

int kvp_tokenizer_decode(const kvp_tokenizer_t *t, const int32_t *tokens, size_t n, char **out,
                         size_t *out_len, kvp_err_t *err) {
    *out = NULL;
    if (out_len) *out_len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= t->n_vocab)
            return kvp_err_set(err, KVP_ERANGE,
                               "tokenizer: token %zu is id %d, out of range "
                               "(%d tokens)",
                               i, tokens[i], t->n_vocab);
        total += t->piece[tokens[i]].n;
    }
    char *s = malloc(total + 1);
    if (!s) return kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory decoding %zu tokens", n);
    size_t len = 0;
    /* the space add_space_prefix put before the text is in the first piece
     * that has any bytes (after BOS, which has none) */
    bool strip = t->kind == KVP_TOK_SPM && t->add_space_prefix;
    for (size_t i = 0; i < n; i++) {
        kvp_tok_span_t p = t->piece[tokens[i]];
        if (!p.n) continue;
        if (strip && p.p[0] == ' ') {
            p.p++;
            p.n--;
        }
        strip = false;
        memcpy(s + len, p.p, p.n);
        len += p.n;
    }
    s[len] = 0;
    *out = s;
    if (out_len) *out_len = len;
    return 0;
}

/* ---- kvpred's byte-level vocabulary ------------------------------------- */

int32_t kvp_tokenizer_bytelevel_n_vocab(size_t n_merges) {
    return (int32_t)(256 + n_merges + 2);
}

typedef struct bl_vocab {
    char **text; /* owned, NUL-terminated */
    kvp_tok_span_t *keys;
    kvp_tok_table_t tab;
    size_t n;
} bl_vocab_t;

static void bl_free(bl_vocab_t *v, size_t n_alloc) {
    for (size_t i = 0; i < n_alloc && v->text; i++)
        free(v->text[i]);
    free(v->text);
    free(v->keys);
    free(v->tab.slots);
}

/* Adds s (taking ownership); KVP_EINVAL if it is already a token. */
static int bl_add(bl_vocab_t *v, char *s) {
    size_t n = strlen(s);
    size_t slot = text_slot(&v->tab, v->keys, s, n);
    v->text[v->n] = s;
    if (v->tab.slots[slot]) return KVP_EINVAL;
    v->keys[v->n].p = s;
    v->keys[v->n].n = (uint32_t)n;
    v->tab.slots[slot] = (uint32_t)++v->n;
    return 0;
}

static bool bl_has(const bl_vocab_t *v, const char *s, size_t n) {
    return v->tab.slots[text_slot(&v->tab, v->keys, s, n)] != 0;
}

/* Builds the token list and checks the merges: each side must be a byte or
 * the result of an earlier merge, and each result must be new (a duplicate
 * would make two ids for one text). */
static int bl_build(bl_vocab_t *v, const char *const *merges, size_t n_merges, kvp_err_t *err) {
    for (int b = 0; b < 256; b++) {
        char *s = calloc(3, 1);
        if (!s) return kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory");
        kvp_tok_byte_to_utf8((unsigned char)b, s);
        if (bl_add(v, s))
            return kvp_err_set(err, KVP_EINVAL, "tokenizer: byte map is not one-to-one");
    }
    for (size_t i = 0; i < n_merges; i++) {
        const char *m = merges[i];
        size_t len = m ? strlen(m) : 0;
        const char *sp = len > 1 ? strchr(m + 1, ' ') : NULL;
        if (!sp || !sp[1])
            return kvp_err_set(err, KVP_EINVAL, "tokenizer: merge %zu '%s' is not \"left right\"",
                               i, m ? m : "(null)");
        size_t ln = (size_t)(sp - m), rn = len - ln - 1;
        if (len > TOK_MAX_TEXT)
            return kvp_err_set(err, KVP_EINVAL, "tokenizer: merge %zu is %zu bytes (limit %u)", i,
                               len, TOK_MAX_TEXT);
        if (!bl_has(v, m, ln) || !bl_has(v, sp + 1, rn))
            return kvp_err_set(err, KVP_EINVAL,
                               "tokenizer: merge %zu '%s': each side must be a byte or an "
                               "earlier merge's token",
                               i, m);
        char *s = malloc(len);
        if (!s) return kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory");
        memcpy(s, m, ln);
        memcpy(s + ln, sp + 1, rn);
        s[len - 1] = 0;
        if (bl_add(v, s))
            return kvp_err_set(err, KVP_EINVAL, "tokenizer: merge %zu '%s' makes token '%s' twice",
                               i, m, s);
    }
    char *bos = strdup(BOS_TEXT), *eos = bos ? strdup(EOS_TEXT) : NULL;
    if (!eos) {
        free(bos);
        return kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory");
    }
    if (bl_add(v, bos)) {
        free(eos);
        return kvp_err_set(err, KVP_EINVAL, "tokenizer: a merge makes the BOS text " BOS_TEXT);
    }
    if (bl_add(v, eos))
        return kvp_err_set(err, KVP_EINVAL, "tokenizer: a merge makes the EOS text " EOS_TEXT);
    return 0;
}

int kvp_tokenizer_write_bytelevel(kvp_gguf_writer_t *w, const char *const *merges, size_t n_merges,
                                  kvp_err_t *err) {
    if (!w || (n_merges && !merges))
        return kvp_err_set(err, KVP_EINVAL, "tokenizer: write_bytelevel: NULL argument");
    if (n_merges > TOK_MAX_MERGES)
        return kvp_err_set(err, KVP_EINVAL, "tokenizer: %zu merges (limit %d)", n_merges,
                           TOK_MAX_MERGES);
    size_t n_vocab = (size_t)kvp_tokenizer_bytelevel_n_vocab(n_merges);
    bl_vocab_t v = {0};
    int32_t *types = NULL;
    v.text = calloc(n_vocab, sizeof *v.text);
    v.keys = malloc(n_vocab * sizeof *v.keys);
    int rc = (!v.text || !v.keys || table_init(&v.tab, n_vocab))
                 ? kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory")
                 : bl_build(&v, merges, n_merges, err);
    if (!rc && !(types = malloc(n_vocab * sizeof *types)))
        rc = kvp_err_set(err, KVP_ENOMEM, "tokenizer: out of memory");
    if (!rc) {
        /* GPT-2 vocabularies mark byte tokens normal too: the alphabet is text */
        for (size_t i = 0; i < n_vocab; i++)
            types[i] = i + 2 < n_vocab ? KVP_TOK_NORMAL : KVP_TOK_CONTROL;
        int32_t bos = (int32_t)n_vocab - 2, eos = (int32_t)n_vocab - 1;
        if (kvp_gguf_writer_set_str(w, KEY_MODEL, "gpt2") ||
            kvp_gguf_writer_set_str(w, KEY_PRE, "gpt-2") ||
            kvp_gguf_writer_set_arr_str(w, KEY_TOKENS, (const char *const *)v.text, n_vocab) ||
            kvp_gguf_writer_set_arr_i32(w, KEY_TYPES, types, n_vocab) ||
            kvp_gguf_writer_set_arr_str(w, KEY_MERGES, merges, n_merges) ||
            kvp_gguf_writer_set_u32(w, KEY_BOS, (uint32_t)bos) ||
            kvp_gguf_writer_set_u32(w, KEY_EOS, (uint32_t)eos) ||
            kvp_gguf_writer_set_bool(w, KEY_ADD_BOS, true) ||
            kvp_gguf_writer_set_bool(w, KEY_ADD_EOS, false))
            rc = kvp_err_set(err, KVP_ENOMEM, "tokenizer: could not set the vocabulary keys");
    }
    free(types);
    bl_free(&v, n_vocab);
    return rc;
}
