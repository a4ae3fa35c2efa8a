/* kvp_predictor: the predictor object, applying it, and its GGUF file.
 * The ridge fit lives in kvp_predictor_fit.c. */
#include "kvp_predictor.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PARAMS ((size_t)1 << 30) /* 4 GiB of f32 */
#define KEY(suffix) KVP_PREDICTOR_ARCH "." suffix

/* ---- construction ----------------------------------------------------- */

kvp_kv_shape_t kvp_kv_shape_of(const kvp_model_t *m) {
    return (kvp_kv_shape_t){m->cfg.n_layer, m->cfg.n_kv_head, m->cfg.head_dim};
}

void kvp_predictor_default_layer_map(int n_aux, int n_base, int32_t *map) {
    int64_t shift = n_aux - 1 - (int64_t)(n_base - 1) * n_aux / n_base;
    for (int i = 0; i < n_base; i++)
        map[i] = (int32_t)((int64_t)i * n_aux / n_base + shift);
}

static int check_shape(const char *which, kvp_kv_shape_t s, kvp_err_t *err) {
    if (s.n_layer < 1 || s.n_layer > KVP_PREDICTOR_MAX_LAYERS || s.n_kv_head < 1 ||
        s.head_dim < 1 || (int64_t)s.n_kv_head * s.head_dim > KVP_PREDICTOR_MAX_WIDTH)
        return kvp_err_set(err, KVP_EINVAL,
                           "predictor: bad %s shape (%d layers, %d KV heads of %d; at most %d "
                           "layers and %d values a token)",
                           which, s.n_layer, s.n_kv_head, s.head_dim, KVP_PREDICTOR_MAX_LAYERS,
                           KVP_PREDICTOR_MAX_WIDTH);
    return KVP_OK;
}

static int check_layer_map(const int32_t *map, int n_aux, int n_base, kvp_err_t *err) {
    for (int i = 0; i < n_base; i++)
        if (map[i] < 0 || map[i] >= n_aux)
            return kvp_err_set(err, KVP_ERANGE,
                               "predictor: layer_map[%d] = %d is outside the auxiliary model's "
                               "layers [0, %d)",
                               i, (int)map[i], n_aux);
    return KVP_OK;
}

/* The base layers aux layer a feeds: their number, and in *first (if not
 * NULL) the lowest of them (-1 if none). */
static int group_of(const kvp_predictor_t *p, int a, int *first) {
    int g = 0;
    if (first) *first = -1;
    for (int l = 0; l < p->base.n_layer; l++) {
        if (p->layer_map[l] != a) continue;
        if (first && *first < 0) *first = l;
        g++;
    }
    return g;
}

/* Points the per-layer views into the arena, grouped by aux layer: for each
 * aux layer a, the K weights of the base layers it feeds (in increasing l),
 * then their V weights, K biases and V biases. A group's weights are thus one
 * [n_group * d_out][d_in] matrix, so apply_cache predicts all of them with one
 * sgemm. The layout depends on the layer map, which must therefore be set
 * before this is called and never changed after; other code goes through the
 * views. */
static void set_views(kvp_predictor_t *p) {
    size_t nw = (size_t)p->d_out * p->d_in, nb = (size_t)p->d_out;
    float *q = p->params;
    for (int a = 0; a < p->aux.n_layer; a++) {
        size_t g = (size_t)group_of(p, a, NULL), j = 0;
        for (int l = 0; l < p->base.n_layer; l++) {
            if (p->layer_map[l] != a) continue;
            kvp_predictor_layer_t *L = &p->layers[l];
            L->k_w = q + j * nw;
            L->v_w = q + (g + j) * nw;
            L->k_b = q + 2 * g * nw + j * nb;
            L->v_b = q + 2 * g * nw + (g + j) * nb;
            j++;
        }
        q += 2 * g * (nw + nb);
    }
}

int kvp_predictor_new(kvp_predictor_t **out, kvp_kv_shape_t aux, kvp_kv_shape_t base,
                      const int32_t *layer_map, kvp_err_t *err) {
    *out = NULL;
    int rc = check_shape("auxiliary", aux, err);
    if (!rc) rc = check_shape("base", base, err);
    if (!rc && layer_map) rc = check_layer_map(layer_map, aux.n_layer, base.n_layer, err);
    if (rc) return rc;
    int d_in = aux.n_kv_head * aux.head_dim, d_out = base.n_kv_head * base.head_dim;
    size_t n = (size_t)base.n_layer * 2 * ((size_t)d_out * d_in + d_out);
    if (n > MAX_PARAMS)
        return kvp_err_set(err, KVP_ENOMEM, "predictor: %zu weights exceed the limit of %zu", n,
                           MAX_PARAMS);
    kvp_predictor_t *p = calloc(1, sizeof *p);
    if (!p) return kvp_err_set(err, KVP_ENOMEM, "predictor: out of memory");
    *p = (kvp_predictor_t){.aux = aux, .base = base, .d_in = d_in, .d_out = d_out, .n_params = n};
    p->layer_map = malloc(sizeof(int32_t) * (size_t)base.n_layer);
    p->layers = calloc((size_t)base.n_layer, sizeof *p->layers);
    p->params = calloc(n, sizeof(float));
    if (!p->layer_map || !p->layers || !p->params) {
        kvp_predictor_free(&p);
        return kvp_err_set(err, KVP_ENOMEM, "predictor: cannot allocate %zu MiB",
                           n * sizeof(float) >> 20);
    }
    if (layer_map)
        memcpy(p->layer_map, layer_map, sizeof(int32_t) * (size_t)base.n_layer);
    else
        kvp_predictor_default_layer_map(aux.n_layer, base.n_layer, p->layer_map);
    set_views(p);
    *out = p;
    return KVP_OK;
}

int kvp_predictor_new_identity(kvp_predictor_t **out, kvp_kv_shape_t shape, kvp_err_t *err) {
    *out = NULL;
    int rc = check_shape("identity", shape, err);
    if (rc) return rc;
    /* the map decides the arena layout, so it is given to new(), not set after */
    int32_t *map = malloc(sizeof(int32_t) * (size_t)shape.n_layer);
    if (!map) return kvp_err_set(err, KVP_ENOMEM, "predictor: out of memory");
    for (int l = 0; l < shape.n_layer; l++)
        map[l] = l;
    rc = kvp_predictor_new(out, shape, shape, map, err);
    free(map);
    if (rc) return rc;
    kvp_predictor_t *p = *out;
    for (int l = 0; l < shape.n_layer; l++)
        for (int i = 0; i < p->d_out; i++) {
            p->layers[l].k_w[(size_t)i * p->d_in + i] = 1.0f;
            p->layers[l].v_w[(size_t)i * p->d_in + i] = 1.0f;
        }
    return KVP_OK;
}

static void fitinfo_free(kvp_predictor_fitinfo_t **fi) {
    if (!*fi) return;
    free((*fi)->lambda_k);
    free((*fi)->lambda_v);
    free((*fi)->val_rse_k);
    free((*fi)->val_rse_v);
    free(*fi);
    *fi = NULL;
}

void kvp_predictor_free(kvp_predictor_t **p) {
    if (!p || !*p) return;
    fitinfo_free(&(*p)->fit);
    free((*p)->layer_map);
    free((*p)->layers);
    free((*p)->params);
    free(*p);
    *p = NULL;
}

/* ---- the model pair --------------------------------------------------- */

static int check_field(const char *field, int in_pred, int in_model, const char *model,
                       kvp_err_t *err) {
    if (in_pred == in_model) return KVP_OK;
    return kvp_err_set(err, KVP_ESHAPE,
                       "predictor/model mismatch: %s is %d in the predictor but %d in the %s model",
                       field, in_pred, in_model, model);
}

static int check_shapes(const kvp_predictor_t *p, const kvp_model_t *aux, const kvp_model_t *base,
                        kvp_err_t *err) {
    const kvp_model_config_t *a = &aux->cfg, *b = &base->cfg;
    int rc = check_field("aux.n_layer", p->aux.n_layer, a->n_layer, "auxiliary", err);
    if (!rc) rc = check_field("aux.n_kv_head", p->aux.n_kv_head, a->n_kv_head, "auxiliary", err);
    if (!rc) rc = check_field("aux.head_dim", p->aux.head_dim, a->head_dim, "auxiliary", err);
    if (!rc) rc = check_field("base.n_layer", p->base.n_layer, b->n_layer, "base", err);
    if (!rc) rc = check_field("base.n_kv_head", p->base.n_kv_head, b->n_kv_head, "base", err);
    if (!rc) rc = check_field("base.head_dim", p->base.head_dim, b->head_dim, "base", err);
    return rc;
}

static int check_fingerprint(const char *field, const char *in_pred, const kvp_model_t *m,
                             const char *model, kvp_err_t *err) {
    char fp[17];
    kvp_model_fingerprint(m, fp);
    if (!in_pred[0] || !strcmp(in_pred, fp)) return KVP_OK;
    return kvp_err_set(err, KVP_ESHAPE,
                       "predictor/model mismatch: %s is %s in the predictor but %s for the %s "
                       "model (the predictor was made for another model pair)",
                       field, in_pred, fp, model);
}

int kvp_predictor_check_pair(const kvp_predictor_t *p, const kvp_model_t *aux,
                             const kvp_model_t *base, kvp_err_t *err) {
    int rc = check_shapes(p, aux, base, err);
    if (!rc) rc = check_fingerprint("aux_fingerprint", p->aux_fingerprint, aux, "auxiliary", err);
    if (!rc) rc = check_fingerprint("base_fingerprint", p->base_fingerprint, base, "base", err);
    return rc;
}

int kvp_predictor_bind(kvp_predictor_t *p, const kvp_model_t *aux, const kvp_model_t *base,
                       kvp_err_t *err) {
    int rc = check_shapes(p, aux, base, err);
    if (rc) return rc;
    kvp_model_fingerprint(aux, p->aux_fingerprint);
    kvp_model_fingerprint(base, p->base_fingerprint);
    return KVP_OK;
}

/* ---- applying --------------------------------------------------------- */

/* y[n][d_out] = x[n][d_in] · w^T + b */
static void linear_bias(int n, int d_in, int d_out, const float *x, const float *w, const float *b,
                        float *y) {
    for (int t = 0; t < n; t++)
        memcpy(y + (size_t)t * d_out, b, sizeof(float) * (size_t)d_out);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d_out, d_in, 1.0f, x, d_in, w, d_in,
                1.0f, y, d_out);
}

void kvp_predictor_apply_layer(const kvp_predictor_t *p, int layer, int n_tok, const float *aux_k,
                               const float *aux_v, float *base_k, float *base_v) {
    if (n_tok <= 0) return;
    const kvp_predictor_layer_t *L = &p->layers[layer];
    linear_bias(n_tok, p->d_in, p->d_out, aux_k, L->k_w, L->k_b, base_k);
    linear_bias(n_tok, p->d_in, p->d_out, aux_v, L->v_w, L->v_b, base_v);
}

int kvp_predictor_apply(const kvp_predictor_t *p, int n_tok, const float *const *aux_k,
                        const float *const *aux_v, float *const *base_k, float *const *base_v,
                        kvp_err_t *err) {
    if (n_tok < 0) return kvp_err_set(err, KVP_EINVAL, "predictor: %d tokens", n_tok);
    for (int l = 0; l < p->base.n_layer; l++) {
        int a = p->layer_map[l];
        kvp_predictor_apply_layer(p, l, n_tok, aux_k[a], aux_v[a], base_k[l], base_v[l]);
    }
    return KVP_OK;
}

static int check_caches(const kvp_predictor_t *p, const kvp_kvcache_t *aux,
                        const kvp_kvcache_t *base, kvp_err_t *err) {
    if (aux->n_layer != p->aux.n_layer || aux->n_kv_head != p->aux.n_kv_head ||
        aux->head_dim != p->aux.head_dim || base->n_layer != p->base.n_layer ||
        base->n_kv_head != p->base.n_kv_head || base->head_dim != p->base.head_dim)
        return kvp_err_set(err, KVP_ESHAPE,
                           "predictor expects caches of %dx%dx%d (aux) and %dx%dx%d (base) "
                           "but got %dx%dx%d and %dx%dx%d (layers x KV heads x head dim)",
                           p->aux.n_layer, p->aux.n_kv_head, p->aux.head_dim, p->base.n_layer,
                           p->base.n_kv_head, p->base.head_dim, aux->n_layer, aux->n_kv_head,
                           aux->head_dim, base->n_layer, base->n_kv_head, base->head_dim);
    return KVP_OK;
}

/* Tokens a pass of apply_cache handles at most: bounds its scratch (the
 * group's outputs, n_group * d_out floats a token). No smaller: each pass
 * repacks the group's weights inside sgemm, which costs more than passes small
 * enough to keep the outputs in L2 save (256 rows: 4-15% slower, measured). */
enum { APPLY_ROWS = 2048 };

/* Reads each aux layer once per pass and predicts every base layer it feeds
 * with one sgemm for K and one for V over the group's contiguous weights
 * (set_views), beta = 0; the bias is added as the rows go into the base cache,
 * so the outputs are touched once more, not twice. */
int kvp_predictor_apply_cache(const kvp_predictor_t *p, const kvp_kvcache_t *aux,
                              kvp_kvcache_t *base, int pos0, int n_tok, kvp_err_t *err) {
    int rc = check_caches(p, aux, base, err);
    if (rc || n_tok == 0) return rc;
    /* both spans checked up front: a failure must not leave a partial write */
    rc = kvp_kvcache_check_range(aux, 0, pos0, n_tok, err);
    if (!rc) rc = kvp_kvcache_check_range(base, 0, pos0, n_tok, err);
    if (rc) return rc;
    int g_max = 0;
    for (int a = 0; a < p->aux.n_layer; a++) {
        int g = group_of(p, a, NULL);
        g_max = g > g_max ? g : g_max;
    }
    const int rows = n_tok < APPLY_ROWS ? n_tok : APPLY_ROWS;
    size_t n_in = (size_t)rows * p->d_in, n_out = (size_t)rows * g_max * p->d_out;
    float *buf = malloc(sizeof(float) * (2 * n_in + n_out));
    if (!buf) return kvp_err_set(err, KVP_ENOMEM, "predictor: out of memory for %d tokens", n_tok);
    float *xk = buf, *xv = xk + n_in, *y = xv + n_in;
    for (int a = 0; a < p->aux.n_layer && !rc; a++) {
        int first, g = group_of(p, a, &first);
        if (!g) continue;
        const int ld = g * p->d_out;
        for (int t0 = 0; t0 < n_tok && !rc; t0 += rows) {
            const int n = n_tok - t0 < rows ? n_tok - t0 : rows;
            rc = kvp_kvcache_read(aux, a, pos0 + t0, n, xk, xv, err);
            for (int kv = 0; kv < 2 && !rc; kv++) {
                const float *w = kv ? p->layers[first].v_w : p->layers[first].k_w;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, ld, p->d_in, 1.0f,
                            kv ? xv : xk, p->d_in, w, p->d_in, 0.0f, y, ld);
                for (int l = first, j = 0; l < p->base.n_layer && !rc; l++) {
                    if (p->layer_map[l] != a) continue;
                    const kvp_predictor_layer_t *L = &p->layers[l];
                    const float *yj = y + (size_t)j++ * p->d_out;
                    rc = kv ? kvp_kvcache_write_rows(base, l, pos0 + t0, n, NULL, 0, NULL, yj, ld,
                                                     L->v_b, err)
                            : kvp_kvcache_write_rows(base, l, pos0 + t0, n, yj, ld, L->k_b, NULL, 0,
                                                     NULL, err);
                }
            }
        }
    }
    free(buf);
    return rc;
}

/* ---- saving ----------------------------------------------------------- */

static int put_shape(kvp_gguf_writer_t *w, const char *which, kvp_kv_shape_t s) {
    char key[96];
    int rc = 0;
    snprintf(key, sizeof key, KVP_PREDICTOR_ARCH ".%s.block_count", which);
    rc |= kvp_gguf_writer_set_u32(w, key, (uint32_t)s.n_layer);
    snprintf(key, sizeof key, KVP_PREDICTOR_ARCH ".%s.head_count_kv", which);
    rc |= kvp_gguf_writer_set_u32(w, key, (uint32_t)s.n_kv_head);
    snprintf(key, sizeof key, KVP_PREDICTOR_ARCH ".%s.head_dim", which);
    rc |= kvp_gguf_writer_set_u32(w, key, (uint32_t)s.head_dim);
    return rc;
}

static int put_fitinfo(kvp_gguf_writer_t *w, const kvp_predictor_fitinfo_t *fi, int n) {
    int rc = kvp_gguf_writer_set_arr_f32(w, KEY("fit.lambda_k"), fi->lambda_k, (uint64_t)n);
    rc |= kvp_gguf_writer_set_arr_f32(w, KEY("fit.lambda_v"), fi->lambda_v, (uint64_t)n);
    rc |= kvp_gguf_writer_set_arr_f32(w, KEY("fit.val_rse_k"), fi->val_rse_k, (uint64_t)n);
    rc |= kvp_gguf_writer_set_arr_f32(w, KEY("fit.val_rse_v"), fi->val_rse_v, (uint64_t)n);
    rc |= kvp_gguf_writer_set_u64(w, KEY("fit.train_tokens"), fi->train_tokens);
    rc |= kvp_gguf_writer_set_u64(w, KEY("fit.val_tokens"), fi->val_tokens);
    return rc;
}

static int put_metadata(kvp_gguf_writer_t *w, const kvp_predictor_t *p) {
    int rc = kvp_gguf_writer_set_str(w, "general.architecture", KVP_PREDICTOR_ARCH);
    rc |= put_shape(w, "aux", p->aux);
    rc |= put_shape(w, "base", p->base);
    rc |= kvp_gguf_writer_set_arr_i32(w, KEY("layer_map"), p->layer_map, (uint64_t)p->base.n_layer);
    rc |= kvp_gguf_writer_set_str(w, KEY("aux_fingerprint"), p->aux_fingerprint);
    rc |= kvp_gguf_writer_set_str(w, KEY("base_fingerprint"), p->base_fingerprint);
    if (p->fit) rc |= put_fitinfo(w, p->fit, p->base.n_layer);
    return rc;
}

static int put_tensors(kvp_gguf_writer_t *w, const kvp_predictor_t *p, kvp_err_t *err) {
    const uint64_t ne_w[2] = {(uint64_t)p->d_in, (uint64_t)p->d_out},
                   ne_b[1] = {(uint64_t)p->d_out};
    int rc = KVP_OK;
    char name[64];
    for (int l = 0; l < p->base.n_layer && !rc; l++) {
        const kvp_predictor_layer_t *L = &p->layers[l];
        const float *data[4] = {L->k_w, L->k_b, L->v_w, L->v_b};
        static const char *const fmt[4] = {"blk.%d.k_map.weight", "blk.%d.k_map.bias",
                                           "blk.%d.v_map.weight", "blk.%d.v_map.bias"};
        for (int i = 0; i < 4 && !rc; i++) {
            snprintf(name, sizeof name, fmt[i], l);
            rc = kvp_gguf_writer_add_tensor(w, name, i % 2 ? 1 : 2, i % 2 ? ne_b : ne_w,
                                            KVP_GGML_F32, data[i], err);
        }
    }
    return rc;
}

int kvp_predictor_save(const kvp_predictor_t *p, const char *path, kvp_err_t *err) {
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    if (!w) return kvp_err_set(err, KVP_ENOMEM, "predictor: out of memory");
    int rc = put_metadata(w, p) ? kvp_err_set(err, KVP_ENOMEM, "predictor: out of memory") : 0;
    if (!rc) rc = put_tensors(w, p, err);
    if (!rc) rc = kvp_gguf_writer_write(w, path, err);
    kvp_gguf_writer_free(&w);
    if (rc) kvp_err_wrap(err, "saving predictor %s", path);
    return rc;
}

/* ---- loading ---------------------------------------------------------- */

static int get_dim(const kvp_gguf_t *g, const char *which, const char *what, int *out,
                   kvp_err_t *err) {
    char key[96];
    snprintf(key, sizeof key, KVP_PREDICTOR_ARCH ".%s.%s", which, what);
    uint32_t v;
    int rc = kvp_gguf_get_u32(g, key, &v, err);
    if (rc) return rc;
    if (v < 1 || v > KVP_PREDICTOR_MAX_WIDTH)
        return kvp_err_set(err, KVP_EFORMAT, "%s = %u is out of range [1, %d]", key, v,
                           KVP_PREDICTOR_MAX_WIDTH);
    *out = (int)v;
    return KVP_OK;
}

static int get_shape(const kvp_gguf_t *g, const char *which, kvp_kv_shape_t *s, kvp_err_t *err) {
    int rc = get_dim(g, which, "block_count", &s->n_layer, err);
    if (!rc) rc = get_dim(g, which, "head_count_kv", &s->n_kv_head, err);
    if (!rc) rc = get_dim(g, which, "head_dim", &s->head_dim, err);
    return rc;
}

static int check_arch(const kvp_gguf_t *g, kvp_err_t *err) {
    char arch[64];
    int rc = kvp_gguf_get_str(g, "general.architecture", arch, sizeof arch, err);
    if (rc) return rc;
    if (strcmp(arch, KVP_PREDICTOR_ARCH))
        return kvp_err_set(err, KVP_EUNSUPPORTED,
                           "general.architecture is '%s', expected '" KVP_PREDICTOR_ARCH
                           "' (not a KV predictor file)",
                           arch);
    return KVP_OK;
}

static int get_layer_map(const kvp_gguf_t *g, int n_base, int32_t *map, kvp_err_t *err) {
    const kvp_gguf_kv_t *kv;
    int rc = kvp_gguf_get_arr(g, KEY("layer_map"), KVP_GGUF_I32, &kv, err);
    if (rc) return rc;
    if (kv->v.arr.count != (uint64_t)n_base)
        return kvp_err_set(err, KVP_EFORMAT,
                           KEY("layer_map") " has %llu entries, expected one per base layer (%d)",
                           (unsigned long long)kv->v.arr.count, n_base);
    for (int i = 0; i < n_base; i++) {
        int64_t v = kvp_gguf_arr_i64(kv, (uint64_t)i);
        map[i] = v < INT32_MIN || v > INT32_MAX ? -1 : (int32_t)v;
    }
    return KVP_OK;
}

static int get_fingerprint(const kvp_gguf_t *g, const char *key, char out[17], kvp_err_t *err) {
    int rc = kvp_gguf_get_str(g, key, out, 17, err);
    if (rc) return rc;
    size_t n = strlen(out);
    int hex = 1;
    for (size_t i = 0; i < n; i++)
        hex &= (out[i] >= '0' && out[i] <= '9') || (out[i] >= 'a' && out[i] <= 'f');
    if ((n != 0 && n != 16) || !hex)
        return kvp_err_set(err, KVP_EFORMAT, "%s '%s' is not 16 hex digits", key, out);
    return KVP_OK;
}

static int get_f32_arr(const kvp_gguf_t *g, const char *key, int n, float **out, kvp_err_t *err) {
    const kvp_gguf_kv_t *kv;
    int rc = kvp_gguf_get_arr(g, key, KVP_GGUF_F32, &kv, err);
    if (rc) return rc;
    if (kv->v.arr.count != (uint64_t)n)
        return kvp_err_set(err, KVP_EFORMAT, "%s has %llu entries, expected %d", key,
                           (unsigned long long)kv->v.arr.count, n);
    *out = malloc(sizeof(float) * (size_t)n);
    if (!*out) return kvp_err_set(err, KVP_ENOMEM, "predictor: out of memory");
    for (int i = 0; i < n; i++)
        (*out)[i] = (float)kvp_gguf_arr_f64(kv, (uint64_t)i);
    return KVP_OK;
}

/* The optional fit info: present iff fit.lambda_k is. */
static int get_fitinfo(const kvp_gguf_t *g, kvp_predictor_t *p, kvp_err_t *err) {
    if (!kvp_gguf_find(g, KEY("fit.lambda_k"))) return KVP_OK;
    kvp_predictor_fitinfo_t *fi = p->fit = calloc(1, sizeof *fi);
    if (!fi) return kvp_err_set(err, KVP_ENOMEM, "predictor: out of memory");
    int n = p->base.n_layer;
    int rc = get_f32_arr(g, KEY("fit.lambda_k"), n, &fi->lambda_k, err);
    if (!rc) rc = get_f32_arr(g, KEY("fit.lambda_v"), n, &fi->lambda_v, err);
    if (!rc) rc = get_f32_arr(g, KEY("fit.val_rse_k"), n, &fi->val_rse_k, err);
    if (!rc) rc = get_f32_arr(g, KEY("fit.val_rse_v"), n, &fi->val_rse_v, err);
    if (!rc) rc = kvp_gguf_get_u64(g, KEY("fit.train_tokens"), &fi->train_tokens, err);
    if (!rc) rc = kvp_gguf_get_u64(g, KEY("fit.val_tokens"), &fi->val_tokens, err);
    return rc;
}

/* Finds tensor `name` and checks it is [ne0] (n_dims 1) or [ne0, ne1]. */
static int find_tensor(const kvp_gguf_t *g, const char *name, uint32_t n_dims, uint64_t ne0,
                       uint64_t ne1, const kvp_gguf_tensor_t **out, kvp_err_t *err) {
    const kvp_gguf_tensor_t *t = *out = kvp_gguf_find_tensor(g, name);
    if (!t) return kvp_err_set(err, KVP_EFORMAT, "missing tensor %s", name);
    if (t->n_dims != n_dims || t->ne[0] != ne0 || (n_dims == 2 && t->ne[1] != ne1)) {
        if (n_dims == 1)
            return kvp_err_set(err, KVP_EFORMAT,
                               "tensor %s has %u dims [%llu, %llu], expected [%llu]", name,
                               t->n_dims, (unsigned long long)t->ne[0],
                               (unsigned long long)t->ne[1], (unsigned long long)ne0);
        return kvp_err_set(err, KVP_EFORMAT,
                           "tensor %s has %u dims [%llu, %llu], expected [%llu, %llu] "
                           "(ne0 = aux width, ne1 = base width)",
                           name, t->n_dims, (unsigned long long)t->ne[0],
                           (unsigned long long)t->ne[1], (unsigned long long)ne0,
                           (unsigned long long)ne1);
    }
    return KVP_OK;
}

/* Finds every tensor and checks its shape; with p, also converts it into p.
 * Called once without p before anything is allocated for the weights. */
static int get_tensors(const kvp_gguf_t *g, int n_base, int d_in, int d_out, kvp_predictor_t *p,
                       kvp_err_t *err) {
    static const char *const fmt[4] = {"blk.%d.k_map.weight", "blk.%d.k_map.bias",
                                       "blk.%d.v_map.weight", "blk.%d.v_map.bias"};
    char name[64];
    const kvp_gguf_tensor_t *t;
    for (int l = 0; l < n_base; l++)
        for (int i = 0; i < 4; i++) {
            snprintf(name, sizeof name, fmt[i], l);
            int rc = find_tensor(g, name, i % 2 ? 1 : 2, (uint64_t)(i % 2 ? d_out : d_in),
                                 (uint64_t)d_out, &t, err);
            if (!rc && p) {
                kvp_predictor_layer_t *L = &p->layers[l];
                float *dst[4] = {L->k_w, L->k_b, L->v_w, L->v_b};
                rc = kvp_gguf_tensor_to_f32(t, dst[i], err);
            }
            if (rc) return rc;
        }
    return KVP_OK;
}

/* Shapes and layer map, then the predictor itself. */
static int read_header(const kvp_gguf_t *g, kvp_predictor_t **out, kvp_err_t *err) {
    kvp_kv_shape_t aux, base;
    int rc = check_arch(g, err);
    if (!rc) rc = get_shape(g, "aux", &aux, err);
    if (!rc) rc = get_shape(g, "base", &base, err);
    if (rc) return rc;
    int32_t *map = malloc(sizeof(int32_t) * (size_t)base.n_layer);
    if (!map) return kvp_err_set(err, KVP_ENOMEM, "predictor: out of memory");
    rc = get_layer_map(g, base.n_layer, map, err);
    if (!rc) rc = check_shape("auxiliary", aux, err);
    if (!rc) rc = check_shape("base", base, err);
    if (!rc) rc = check_layer_map(map, aux.n_layer, base.n_layer, err);
    if (!rc)
        rc = get_tensors(g, base.n_layer, aux.n_kv_head * aux.head_dim,
                         base.n_kv_head * base.head_dim, NULL, err);
    if (!rc) rc = kvp_predictor_new(out, aux, base, map, err);
    free(map);
    return rc;
}

int kvp_predictor_from_gguf(kvp_predictor_t **out, const kvp_gguf_t *g, kvp_err_t *err) {
    *out = NULL;
    kvp_predictor_t *p = NULL;
    int rc = read_header(g, &p, err);
    if (!rc) rc = get_fingerprint(g, KEY("aux_fingerprint"), p->aux_fingerprint, err);
    if (!rc) rc = get_fingerprint(g, KEY("base_fingerprint"), p->base_fingerprint, err);
    if (!rc) rc = get_fitinfo(g, p, err);
    if (!rc) rc = get_tensors(g, p->base.n_layer, p->d_in, p->d_out, p, err);
    if (rc) {
        kvp_predictor_free(&p);
        kvp_err_wrap(err, "predictor %s", kvp_gguf_path(g));
        return rc;
    }
    *out = p;
    return KVP_OK;
}

int kvp_predictor_load(kvp_predictor_t **out, const char *path, kvp_err_t *err) {
    *out = NULL;
    kvp_gguf_t *g;
    int rc = kvp_gguf_open(&g, path, err);
    if (rc) return rc;
    rc = kvp_predictor_from_gguf(out, g, err);
    kvp_gguf_free(&g);
    return rc;
}
