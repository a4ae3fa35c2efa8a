/* kvp_tok_spm: the "llama" tokenizer, SentencePiece BPE as llama.cpp's
 * llm_tokenizer_spm runs it.
 *
 * Spaces become U+2581 (and one is put in front when add_space_prefix), the
 * text is split into UTF-8 characters, and then the adjacent pair whose
 * concatenation is the best-scoring token in the vocabulary is merged, again
 * and again, until no pair is a token. Whatever is left that is not a token
 * comes out as <0xXX> byte tokens. */
#include <stdlib.h>
#include <string.h>

#include "kvp_tok_internal.h"

/* Pieces the input may turn into: control, unknown and byte tokens are never
 * made from text ("<s>" in the input stays text). */
static int32_t text_token(const kvp_tokenizer_t *t, const char *s, size_t n) {
    int32_t id = kvp_tok_lookup(t, s, n);
    if (id < 0) return -1;
    int ty = t->type[id];
    return (ty == KVP_TOK_CONTROL || ty == KVP_TOK_UNKNOWN || ty == KVP_TOK_BYTE) ? -1 : id;
}

typedef struct spm_session {
    const kvp_tokenizer_t *t;
    kvp_tok_sym_t *sym;
    kvp_tok_heap_t heap;
} spm_session_t;

/* Queues the merge of symbols left and right if their text is a token. The
 * symbols are adjacent spans of one buffer, so their text is contiguous. */
static int try_add_bigram(spm_session_t *s, int left, int right) {
    if (left < 0 || right < 0) return 0;
    size_t n = s->sym[left].n + s->sym[right].n;
    int32_t id = text_token(s->t, s->sym[left].text, n);
    if (id < 0) return 0;
    kvp_tok_bigram_t b = {.left = left, .right = right, .size = n, .prio = s->t->score[id]};
    return kvp_tok_heap_push(&s->heap, b);
}

static int emit_symbol(const kvp_tokenizer_t *t, const kvp_tok_sym_t *sym, kvp_tok_out_t *o,
                       kvp_err_t *err) {
    int32_t id = text_token(t, sym->text, sym->n);
    if (id >= 0) return kvp_tok_out_push(o, id);
    for (size_t j = 0; j < sym->n; j++) {
        unsigned char b = (unsigned char)sym->text[j];
        if (t->byte_tok[b] < 0)
            return kvp_err_set(err, KVP_EFORMAT,
                               "tokenizer: no token for byte 0x%02X and no unknown token", b);
        int rc = kvp_tok_out_push(o, t->byte_tok[b]);
        if (rc) return rc;
    }
    return 0;
}

int kvp_tok_spm_encode(const kvp_tokenizer_t *t, const char *text, size_t len, kvp_tok_out_t *o,
                       kvp_err_t *err) {
    static const char SPACE[3] = {'\xe2', '\x96', '\x81'}; /* U+2581 */
    if (len > (size_t)INT32_MAX / 4)
        return kvp_err_set(err, KVP_ENOMEM, "tokenizer: text of %zu bytes is too long", len);

    /* escaped text: every space is 3 bytes */
    size_t n = 0;
    char *buf = malloc(3 * len + 3);
    kvp_tok_sym_t *sym = malloc((len + 1) * sizeof *sym);
    spm_session_t s = {.t = t, .sym = sym};
    int rc = (!buf || !sym) ? KVP_ENOMEM : 0;
    if (!rc) {
        if (t->add_space_prefix) {
            memcpy(buf, SPACE, 3);
            n = 3;
        }
        for (size_t i = 0; i < len; i++) {
            if (text[i] == ' ') {
                memcpy(buf + n, SPACE, 3);
                n += 3;
            } else {
                buf[n++] = text[i];
            }
        }
    }

    /* one symbol per UTF-8 character (a stray byte is a character of its own) */
    int n_sym = 0;
    for (size_t off = 0; !rc && off < n; n_sym++) {
        size_t cl = kvp_tok_utf8_len((unsigned char)buf[off]);
        sym[n_sym].text = buf + off;
        sym[n_sym].n = cl < n - off ? cl : n - off;
        off += sym[n_sym].n;
        sym[n_sym].prev = n_sym - 1;
        sym[n_sym].next = off == n ? -1 : n_sym + 1;
    }
    for (int i = 1; !rc && i < n_sym; i++)
        rc = try_add_bigram(&s, i - 1, i);

    while (!rc && s.heap.n) {
        kvp_tok_bigram_t b = kvp_tok_heap_pop(&s.heap);
        kvp_tok_sym_t *l = &sym[b.left], *r = &sym[b.right];
        /* stale: one side was merged away or has grown since it was queued */
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue;
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) sym[r->next].prev = b.left;
        rc = try_add_bigram(&s, l->prev, b.left);
        if (!rc) rc = try_add_bigram(&s, b.left, l->next);
    }

    for (int i = 0; !rc && n_sym > 0 && i != -1; i = sym[i].next)
        rc = emit_symbol(t, &sym[i], o, err);

    free(s.heap.v);
    free(sym);
    free(buf);
    if (rc == KVP_ENOMEM) kvp_err_set(err, rc, "tokenizer: out of memory encoding %zu bytes", len);
    return rc;
}
