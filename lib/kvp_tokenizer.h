/* kvp_tokenizer: the tokenizers a GGUF file names in tokenizer.ggml.model.
 *
 *   "llama" - SentencePiece-style BPE over scores, with <0xXX> byte fallback
 *   "gpt2"  - byte-level BPE with tokenizer.ggml.merges and a regex
 *             pre-tokenizer chosen by tokenizer.ggml.pre (gpt-2, llama-bpe, ...)
 *
 * Verified against llama.cpp's vocabulary test vectors
 * (../shared/reference/vocab). kvpred's own models use a gpt2-kind vocabulary
 * made by kvp_tokenizer_write_bytelevel(). */
#ifndef KVP_TOKENIZER_H
#define KVP_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvp_err.h"
#include "kvp_gguf.h"

typedef struct kvp_tokenizer kvp_tokenizer_t;

/* Builds a tokenizer from the file's tokenizer.ggml.* keys (copied: the
 * tokenizer outlives g). Unknown model or pre-tokenizer -> KVP_EUNSUPPORTED. */
int kvp_tokenizer_from_gguf(kvp_tokenizer_t **out, const kvp_gguf_t *g, kvp_err_t *err);
void kvp_tokenizer_free(kvp_tokenizer_t **t);

int32_t kvp_tokenizer_n_vocab(const kvp_tokenizer_t *t);
int32_t kvp_tokenizer_bos(const kvp_tokenizer_t *t); /* -1 if none */
int32_t kvp_tokenizer_eos(const kvp_tokenizer_t *t); /* -1 if none */
/* Whether BOS is added when add_special is true (tokenizer.ggml.add_bos_token,
 * default true for llama, false for gpt2 unless the file says so). */
bool kvp_tokenizer_adds_bos(const kvp_tokenizer_t *t);
bool kvp_tokenizer_is_control(const kvp_tokenizer_t *t, int32_t id);

/* Tokenizes len bytes of text into a newly allocated array (*out_tokens, freed
 * by the caller with free()). add_special adds BOS/EOS as the vocabulary asks;
 * special-token text inside `text` is never parsed as special. */
int kvp_tokenizer_encode(const kvp_tokenizer_t *t, const char *text, size_t len, bool add_special,
                         int32_t **out_tokens, size_t *out_n, kvp_err_t *err);

/* The bytes one token stands for (byte tokens as their byte, SentencePiece's
 * U+2581 as a space, GPT-2's byte-to-unicode mapping reversed; control tokens
 * give 0 bytes). Writes at most cap bytes, returns the full length or a
 * negative code for an id out of range. Not NUL-terminated. */
int kvp_tokenizer_piece(const kvp_tokenizer_t *t, int32_t id, char *buf, size_t cap);

/* Decodes a whole sequence into a newly allocated NUL-terminated string. For
 * "llama" vocabularies the leading space that add_space_prefix adds is removed. */
int kvp_tokenizer_decode(const kvp_tokenizer_t *t, const int32_t *tokens, size_t n, char **out,
                         size_t *out_len, kvp_err_t *err);

/* kvpred's own vocabulary: the 256 byte tokens (in GPT-2's byte-to-unicode
 * mapping, token id = byte value), then one token per merge (in order), then
 * BOS "<|bos|>" and EOS "<|eos|>". Writes every tokenizer.ggml.* key so that
 * any GGUF reader, llama.cpp included, loads it (model "gpt2", pre "gpt-2").
 * merges are strings "left right" in the byte-to-unicode alphabet. */
int kvp_tokenizer_write_bytelevel(kvp_gguf_writer_t *w, const char *const *merges,
                                  size_t n_merges, kvp_err_t *err);
/* Vocabulary size kvp_tokenizer_write_bytelevel() gives for n_merges merges. */
int32_t kvp_tokenizer_bytelevel_n_vocab(size_t n_merges);

#endif
