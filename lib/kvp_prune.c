#include "kvp_prune.h"

#include <stdlib.h>
#include <string.h>

int kvp_prune_layers(int n_layer, int num, int den, int32_t *keep) {
    if (n_layer <= 0 || num <= 0 || den <= 0 || num > den || den > KVP_PRUNE_MAX_DEN)
        return KVP_EINVAL;
    /* round half up, at least one layer */
    int k = (int)(((long long)2 * n_layer * num + den) / (2LL * den));
    if (k < 1) k = 1;
    for (int i = 0; i < k; i++)
        keep[i] = (int32_t)((long long)i * n_layer / k);
    return k;
}

void kvp_prune_layer_map(const int32_t *keep, int n_keep, int n_base, int32_t *map) {
    int i = 0;
    for (int l = 0; l < n_base; l++) {
        while (i + 1 < n_keep && keep[i + 1] <= l)
            i++;
        map[l] = i;
    }
}

int kvp_prune_parse_fraction(const char *s, int *num, int *den, kvp_err_t *err) {
    char *end;
    long a = strtol(s, &end, 10), b = 1;
    if (end != s && *end == '/') {
        const char *t = end + 1;
        b = strtol(t, &end, 10);
        if (end == t) b = 0;
    }
    if (end == s || *end || a <= 0 || b <= 0 || a > b || b > KVP_PRUNE_MAX_DEN)
        return kvp_err_set(err, KVP_EINVAL,
                           "'%s' is not a fraction of the layers to keep (1/4, 1/2, 3/4 or 1)", s);
    *num = (int)a;
    *den = (int)b;
    return KVP_OK;
}

/* One layer's tensors, copied one by one so nothing depends on the arena's
 * layout beyond what kvp_layer_t names. */
static void copy_layer(const kvp_model_config_t *c, const kvp_layer_t *s, kvp_layer_t *d) {
    size_t E = c->n_embd, nq = (size_t)c->n_head * c->head_dim,
           nkv = (size_t)c->n_kv_head * c->head_dim, F = c->n_ff;
    memcpy(d->attn_norm, s->attn_norm, sizeof(float) * E);
    memcpy(d->wqkv, s->wqkv, sizeof(float) * (nq + 2 * nkv) * E);
    memcpy(d->wo, s->wo, sizeof(float) * E * nq);
    memcpy(d->ffn_norm, s->ffn_norm, sizeof(float) * E);
    memcpy(d->w_gate_up, s->w_gate_up, sizeof(float) * 2 * F * E);
    memcpy(d->w_down, s->w_down, sizeof(float) * E * F);
}

int kvp_prune_model(const kvp_model_t *src, const int32_t *keep, int n_keep, kvp_model_t **out,
                    kvp_err_t *err) {
    *out = NULL;
    const kvp_model_config_t *c = &src->cfg;
    if (n_keep < 1 || n_keep > c->n_layer)
        return kvp_err_set(err, KVP_EINVAL, "prune: %d layers kept of %d", n_keep, c->n_layer);
    for (int i = 0; i < n_keep; i++)
        if (keep[i] < 0 || keep[i] >= c->n_layer)
            return kvp_err_set(err, KVP_ERANGE, "prune: layer %d is not in [0, %d)", (int)keep[i],
                               c->n_layer);
    kvp_model_config_t pc = *c;
    pc.n_layer = n_keep;
    kvp_model_t *m;
    /* std 1: every weight is overwritten below */
    int rc = kvp_model_new_random(&m, &pc, 1, 1.0f, err);
    if (rc) return rc;
    size_t E = c->n_embd, V = c->n_vocab;
    memcpy(m->tok_embd, src->tok_embd, sizeof(float) * V * E);
    if (!c->tied_output) memcpy(m->output, src->output, sizeof(float) * V * E);
    memcpy(m->output_norm, src->output_norm, sizeof(float) * E);
    for (int i = 0; i < n_keep; i++)
        copy_layer(c, &src->layers[keep[i]], &m->layers[i]);
    *out = m;
    return KVP_OK;
}

static int key_is(const kvp_gguf_kv_t *kv, const char *prefix) {
    size_t n = strlen(prefix);
    return kv->key.len >= n && !memcmp(kv->key.ptr, prefix, n);
}

int kvp_prune_save(const kvp_model_t *m, const kvp_gguf_t *vocab_from, const char *path,
                   const char *name, const int32_t *keep, int n_keep, const char *source_fp,
                   int (*extra)(kvp_gguf_writer_t *w, void *user), void *user, kvp_err_t *err) {
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    if (!w) return kvp_err_set(err, KVP_ENOMEM, "out of memory");
    int rc = kvp_model_to_gguf(m, w, KVP_GGML_F32, err);
    for (uint64_t i = 0; !rc && i < kvp_gguf_n_kv(vocab_from); i++) {
        const kvp_gguf_kv_t *kv = kvp_gguf_kv_at(vocab_from, i);
        if (key_is(kv, "tokenizer.") && kvp_gguf_writer_copy_kv(w, kv))
            rc = kvp_err_set(err, KVP_ENOMEM, "copying the vocabulary: out of memory");
    }
    int bad = 0;
    if (!rc && name) bad |= kvp_gguf_writer_set_str(w, "general.name", name);
    if (!rc && keep) bad |= kvp_gguf_writer_set_arr_i32(w, "kvpred.prune.layers", keep, n_keep);
    if (!rc && source_fp) bad |= kvp_gguf_writer_set_str(w, "kvpred.prune.source", source_fp);
    if (!rc && bad) rc = kvp_err_set(err, KVP_ENOMEM, "out of memory");
    if (!rc && extra && extra(w, user)) rc = kvp_err_set(err, KVP_ENOMEM, "out of memory");
    if (!rc) rc = kvp_gguf_writer_write(w, path, err);
    kvp_gguf_writer_free(&w);
    return rc;
}
