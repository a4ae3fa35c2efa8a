/* kvp_tok_internal: what kvp_tokenizer.c, kvp_tok_spm.c and kvp_tok_bpe.c
 * share. Not part of the public API: only these three files include it.
 *
 * The tokenizer owns copies of everything it reads from the GGUF file: one
 * arena of token texts, one of decoded pieces, one of merge pairs, and two
 * open-addressing hash tables over them (text -> id, pair -> rank). */
#ifndef KVP_TOK_INTERNAL_H
#define KVP_TOK_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvp_err.h"
#include "kvp_tokenizer.h"

/* tokenizer.ggml.token_type values */
enum {
    KVP_TOK_NORMAL = 1,
    KVP_TOK_UNKNOWN = 2,
    KVP_TOK_CONTROL = 3,
    KVP_TOK_USER_DEFINED = 4,
    KVP_TOK_UNUSED = 5,
    KVP_TOK_BYTE = 6,
};

typedef enum kvp_tok_kind { KVP_TOK_SPM, KVP_TOK_BPE } kvp_tok_kind_t;

/* A string that is not NUL-terminated; p is never NULL (empty strings point
 * into an arena), so memcmp on it is always defined. */
typedef struct kvp_tok_span {
    const char *p;
    uint32_t n;
} kvp_tok_span_t;

/* An open-addressing table of uint32 values (0 = empty slot); the keys live
 * elsewhere (token texts, merge pairs) and are compared by the owner. */
typedef struct kvp_tok_table {
    uint32_t *slots;
    size_t mask; /* capacity - 1, capacity a power of two */
} kvp_tok_table_t;

struct kvp_tokenizer {
    kvp_tok_kind_t kind;
    int32_t n_vocab;

    /* token texts as in the file */
    char *text;          /* arena */
    kvp_tok_span_t *tok; /* n_vocab spans into text */
    int32_t *type;       /* KVP_TOK_* */
    float *score;        /* SPM only (0 when the file has none) */
    kvp_tok_table_t ids; /* text -> id + 1 */

    /* the bytes each token decodes to (precomputed: piece() is a copy) */
    char *piece_text;      /* arena */
    kvp_tok_span_t *piece; /* n_vocab spans into piece_text */

    /* BPE merges: pair (left, right) -> rank */
    char *merge_text;        /* arena */
    kvp_tok_span_t *merge_l; /* n_merges spans into merge_text */
    kvp_tok_span_t *merge_r;
    size_t n_merges;
    kvp_tok_table_t ranks; /* pair -> rank + 1 */

    int32_t bos, eos, unk;
    bool add_bos, add_eos;
    bool add_space_prefix; /* SPM */
    bool ignore_merges;    /* BPE (llama-bpe) */
    int32_t byte_tok[256]; /* SPM byte fallback: <0xXX> id, or -1 */

    /* BPE pre-tokenizer: a compiled pcre2_code (void * keeps pcre2.h private
     * to kvp_tok_bpe.c) and its name for messages */
    void *regex;
    char pre[64];
};

/* FNV-1a, continued from h (start with KVP_TOK_FNV_SEED). */
#define KVP_TOK_FNV_SEED 1469598103934665603ull
uint64_t kvp_tok_hash(uint64_t h, const void *p, size_t n);

/* The id of the token whose text is exactly s[0..n), or -1. */
int32_t kvp_tok_lookup(const kvp_tokenizer_t *t, const char *s, size_t n);
/* The rank of merge (left, right), or -1. */
int32_t kvp_tok_merge_rank(const kvp_tokenizer_t *t, const char *l, size_t ln, const char *r,
                           size_t rn);

/* Bytes of the UTF-8 sequence that lead byte c starts (1 for continuation
 * and invalid bytes, as llama.cpp counts). */
static inline size_t kvp_tok_utf8_len(unsigned char c) {
    static const unsigned char lens[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return lens[c >> 4];
}

/* GPT-2's byte-to-unicode map: the code point byte b stands for. */
uint32_t kvp_tok_byte_to_cp(unsigned char b);
/* Writes the UTF-8 of the code point for byte b into out (2 bytes at most);
 * returns its length. */
size_t kvp_tok_byte_to_utf8(unsigned char b, char *out);

/* A growable array of token ids. */
typedef struct kvp_tok_out {
    int32_t *ids;
    size_t n, cap;
} kvp_tok_out_t;
int kvp_tok_out_push(kvp_tok_out_t *o, int32_t id);

/* A max-heap of candidate merges ("bigrams"), shared by both tokenizers:
 * highest prio first, ties to the leftmost, as llama.cpp's queues order them. */
typedef struct kvp_tok_bigram {
    int left, right;
    size_t size; /* bytes of the merged text: a stale entry no longer adds up */
    double prio; /* SPM: the merged token's score; BPE: -rank */
} kvp_tok_bigram_t;

typedef struct kvp_tok_heap {
    kvp_tok_bigram_t *v;
    size_t n, cap;
} kvp_tok_heap_t;
int kvp_tok_heap_push(kvp_tok_heap_t *h, kvp_tok_bigram_t b);
kvp_tok_bigram_t kvp_tok_heap_pop(kvp_tok_heap_t *h);

/* One symbol of a word being merged: a span of the word, linked to its
 * neighbours; n == 0 once merged into its left neighbour. */
typedef struct kvp_tok_sym {
    const char *text;
    size_t n;
    int prev, next;
} kvp_tok_sym_t;

/* SentencePiece BPE (kvp_tok_spm.c): appends the ids of text to out. */
int kvp_tok_spm_encode(const kvp_tokenizer_t *t, const char *text, size_t len, kvp_tok_out_t *o,
                       kvp_err_t *err);

/* Byte-level BPE (kvp_tok_bpe.c). init compiles the pre-tokenizer regex for
 * t->pre (KVP_EUNSUPPORTED for an unknown one) and sets t->ignore_merges;
 * release frees it. */
int kvp_tok_bpe_init(kvp_tokenizer_t *t, bool *default_add_bos, kvp_err_t *err);
void kvp_tok_bpe_release(kvp_tokenizer_t *t);
int kvp_tok_bpe_encode(const kvp_tokenizer_t *t, const char *text, size_t len, kvp_tok_out_t *o,
                       kvp_err_t *err);

#endif
