#include "kvp_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_blas.h"
#include "kvp_half.h"
#include "kvp_ops.h"
#include "kvp_rng.h"

/* ---- configuration ---------------------------------------------------- */

int kvp_model_config_check(kvp_model_config_t *c, kvp_err_t *err) {
    if (c->head_dim == 0 && c->n_head > 0) c->head_dim = c->n_embd / c->n_head;
    if (c->rope_dim == 0) c->rope_dim = c->head_dim;
    if (c->rope_base == 0.0f) c->rope_base = 10000.0f;
    if (c->norm_eps == 0.0f) c->norm_eps = 1e-5f;
    if (c->n_kv_head == 0) c->n_kv_head = c->n_head;
    if (c->n_vocab <= 0 || c->n_embd <= 0 || c->n_layer <= 0 || c->n_head <= 0 ||
        c->n_kv_head <= 0 || c->head_dim <= 0 || c->n_ff <= 0)
        return kvp_err_set(err, KVP_EINVAL,
                           "model config: every size must be positive (vocab %d, embd %d, layers "
                           "%d, heads %d, kv heads %d, head dim %d, ffn %d)",
                           c->n_vocab, c->n_embd, c->n_layer, c->n_head, c->n_kv_head, c->head_dim,
                           c->n_ff);
    if (c->n_head % c->n_kv_head)
        return kvp_err_set(err, KVP_EINVAL,
                           "model config: head_count %d is not a multiple of head_count_kv %d",
                           c->n_head, c->n_kv_head);
    if (c->rope_dim > c->head_dim || c->rope_dim % 2)
        return kvp_err_set(err, KVP_EINVAL,
                           "model config: rope dimension %d must be even and at most head dim %d",
                           c->rope_dim, c->head_dim);
    /* Keep every size well inside int arithmetic of the kernels. */
    if (c->n_vocab > (1 << 24) || c->n_embd > (1 << 16) || c->n_ff > (1 << 18) ||
        c->n_layer > 1024 || c->n_head > 1024 || c->head_dim > 1024)
        return kvp_err_set(err, KVP_ENOMEM, "model config: sizes beyond kvpred's limits");
    if (c->n_ctx_train <= 0) c->n_ctx_train = 2048;
    return KVP_OK;
}

/* ---- the weight arena ------------------------------------------------- */

static size_t arena_size(const kvp_model_config_t *c) {
    size_t E = c->n_embd, nq = (size_t)c->n_head * c->head_dim,
           nkv = (size_t)c->n_kv_head * c->head_dim, F = c->n_ff;
    size_t per_layer = E + (nq + 2 * nkv) * E + E * nq + E + 2 * F * E + E * F;
    return (size_t)c->n_vocab * E * (c->tied_output ? 1 : 2) + E + per_layer * c->n_layer;
}

static int model_alloc(kvp_model_t **out, const kvp_model_config_t *cfg, kvp_err_t *err) {
    kvp_model_t *m = calloc(1, sizeof *m);
    if (!m) return kvp_err_set(err, KVP_ENOMEM, "model: out of memory");
    m->cfg = *cfg;
    const kvp_model_config_t *c = &m->cfg;
    m->n_params = arena_size(c);
    m->params = malloc(sizeof(float) * m->n_params);
    m->layers = calloc((size_t)c->n_layer, sizeof *m->layers);
    m->inv_freq = malloc(sizeof(float) * (size_t)(c->rope_dim / 2 + 1));
    if (!m->params || !m->layers || !m->inv_freq) {
        size_t mib = (sizeof(float) * m->n_params) >> 20;
        kvp_model_free(&m);
        return kvp_err_set(err, KVP_ENOMEM, "model: cannot allocate %zu MiB of weights", mib);
    }
    size_t E = c->n_embd, nq = (size_t)c->n_head * c->head_dim,
           nkv = (size_t)c->n_kv_head * c->head_dim, F = c->n_ff;
    float *p = m->params;
    m->tok_embd = p, p += (size_t)c->n_vocab * E;
    if (c->tied_output)
        m->output = m->tok_embd;
    else
        m->output = p, p += (size_t)c->n_vocab * E;
    m->output_norm = p, p += E;
    for (int l = 0; l < c->n_layer; l++) {
        kvp_layer_t *L = &m->layers[l];
        L->attn_norm = p, p += E;
        L->wqkv = p, p += (nq + 2 * nkv) * E;
        L->wq = L->wqkv;
        L->wk = L->wq + nq * E;
        L->wv = L->wk + nkv * E;
        L->wo = p, p += E * nq;
        L->ffn_norm = p, p += E;
        L->w_gate_up = p, p += 2 * F * E;
        L->w_gate = L->w_gate_up;
        L->w_up = L->w_gate + F * E;
        L->w_down = p, p += E * F;
    }
    kvp_rope_inv_freq(m->inv_freq, c->rope_dim, c->rope_base, NULL);
    *out = m;
    return KVP_OK;
}

void kvp_model_free(kvp_model_t **m) {
    if (!m || !*m) return;
    free((*m)->params);
    free((*m)->params16);
    free((*m)->layers);
    free((*m)->inv_freq);
    free(*m);
    *m = NULL;
}

int kvp_model_new_random(kvp_model_t **out, const kvp_model_config_t *cfg_in, uint64_t seed,
                         float std, kvp_err_t *err) {
    *out = NULL;
    kvp_model_config_t cfg = *cfg_in;
    int rc = kvp_model_config_check(&cfg, err);
    if (rc) return rc;
    kvp_model_t *m;
    if ((rc = model_alloc(&m, &cfg, err))) return rc;
    if (std == 0.0f) std = 0.02f;
    kvp_rng_t rng;
    kvp_rng_seed(&rng, seed);
    for (size_t i = 0; i < m->n_params; i++)
        m->params[i] = std * kvp_rng_normal(&rng);
    const size_t E = (size_t)cfg.n_embd;
    for (size_t i = 0; i < E; i++) {
        m->output_norm[i] = 1.0f;
        for (int l = 0; l < cfg.n_layer; l++)
            m->layers[l].attn_norm[i] = m->layers[l].ffn_norm[i] = 1.0f;
    }
    *out = m;
    return KVP_OK;
}

/* ---- the compact copy ------------------------------------------------- */

/* 16-bit units of the copy of a rows x n_in matrix in `type`: one per value
 * for F16/BF16, 17 per Q8_0 block (34 bytes); 0 when Q8_0 cannot hold the
 * matrix (its blocks do not cross rows, so rows must be whole blocks). */
static size_t copy_units(kvp_ggml_type_t type, size_t rows, size_t n_in) {
    if (type != KVP_GGML_Q8_0) return rows * n_in;
    if (n_in % KVP_Q8_0_BLOCK) return 0;
    return rows * (size_t)kvp_ggml_type_nbytes(type, n_in) / sizeof(uint16_t);
}

/* The matrices a single-token step streams, as the forward pass uses them
 * (Q/K/V fused, gate/up fused): 0 is the output head, then each layer's
 * wqkv, wo, w_gate_up, w_down. */
static int n_copy_mats(const kvp_model_config_t *c) {
    return 1 + 4 * c->n_layer;
}

static void copy_shape(const kvp_model_config_t *c, int i, size_t *rows, size_t *n_in) {
    const size_t E = c->n_embd, nq = (size_t)c->n_head * c->head_dim,
                 nkv = (size_t)c->n_kv_head * c->head_dim, F = c->n_ff;
    switch (i == 0 ? -1 : (i - 1) % 4) {
    case -1: /* output head */
        *rows = (size_t)c->n_vocab, *n_in = E;
        break;
    case 0: /* wqkv */
        *rows = nq + 2 * nkv, *n_in = E;
        break;
    case 1: /* wo */
        *rows = E, *n_in = nq;
        break;
    case 2: /* w_gate_up */
        *rows = 2 * F, *n_in = E;
        break;
    default: /* w_down */
        *rows = E, *n_in = F;
        break;
    }
}

typedef struct copy_mat {
    float *f32;      /* the weights in the f32 arena */
    uint16_t **copy; /* the field pointing at its copy */
    size_t rows, n_in;
} copy_mat_t;

static copy_mat_t copy_mat(kvp_model_t *m, int i) {
    copy_mat_t cm;
    copy_shape(&m->cfg, i, &cm.rows, &cm.n_in);
    if (i == 0) {
        cm.f32 = m->output, cm.copy = &m->output16;
        return cm;
    }
    kvp_layer_t *L = &m->layers[(i - 1) / 4];
    float *f32[4] = {L->wqkv, L->wo, L->w_gate_up, L->w_down};
    uint16_t **copy[4] = {&L->wqkv16, &L->wo16, &L->w_gate_up16, &L->w_down16};
    cm.f32 = f32[(i - 1) % 4], cm.copy = copy[(i - 1) % 4];
    return cm;
}

void kvp_model_drop_half(kvp_model_t *m) {
    free(m->params16);
    m->params16 = NULL;
    m->n_params16 = 0;
    m->type16 = KVP_GGML_F32;
    for (int i = 0; i < n_copy_mats(&m->cfg); i++)
        *copy_mat(m, i).copy = NULL;
}

/* A (new) arena for a copy of `type` and its views, contents undefined;
 * matrices `type` cannot hold get no view. The old copy, if any, is dropped
 * only once the new arena exists. */
static int half_alloc(kvp_model_t *m, kvp_ggml_type_t type, kvp_err_t *err) {
    size_t n = 0, rows, n_in;
    for (int i = 0; i < n_copy_mats(&m->cfg); i++) {
        copy_shape(&m->cfg, i, &rows, &n_in);
        n += copy_units(type, rows, n_in);
    }
    if (n == 0)
        return kvp_err_set(err, KVP_EINVAL,
                           "model: no matrix has rows of a multiple of %d values, so none can "
                           "be %s",
                           KVP_Q8_0_BLOCK, kvp_ggml_type_name(type));
    uint16_t *p = malloc(sizeof(uint16_t) * n);
    if (!p)
        return kvp_err_set(err, KVP_ENOMEM, "model: cannot allocate %zu MiB of %s weights",
                           (sizeof(uint16_t) * n) >> 20, kvp_ggml_type_name(type));
    kvp_model_drop_half(m);
    m->params16 = p;
    m->n_params16 = n;
    m->type16 = type;
    for (int i = 0; i < n_copy_mats(&m->cfg); i++) {
        copy_mat_t cm = copy_mat(m, i);
        size_t u = copy_units(type, cm.rows, cm.n_in);
        *cm.copy = u ? p : NULL;
        p += u;
    }
    return KVP_OK;
}

/* Called for each GGUF tensor the copy holds: its name and where its copy
 * starts (NULL when it has none). */
typedef void (*copy_tensor_fn)(void *user, const char *name, uint16_t *copy);

static uint16_t *offset_or_null(uint16_t *p, size_t units) {
    return p ? p + units : NULL;
}

/* The GGUF tensors behind the copy's matrices: Q, K, V each a part of wqkv's
 * copy, gate and up parts of w_gate_up's (rows of whole blocks, so a part
 * starts copy_units() after the one before). */
static void each_copy_tensor(kvp_model_t *m, copy_tensor_fn fn, void *user) {
    const kvp_model_config_t *c = &m->cfg;
    const size_t E = c->n_embd, nq = (size_t)c->n_head * c->head_dim,
                 nkv = (size_t)c->n_kv_head * c->head_dim, F = c->n_ff;
    const kvp_ggml_type_t ty = m->type16;
    fn(user, c->tied_output ? "token_embd.weight" : "output.weight", m->output16);
    char name[96];
    for (int l = 0; l < c->n_layer; l++) {
        kvp_layer_t *L = &m->layers[l];
        struct {
            const char *suffix;
            uint16_t *copy;
        } ts[] = {
            {"attn_q", L->wqkv16},
            {"attn_k", offset_or_null(L->wqkv16, copy_units(ty, nq, E))},
            {"attn_v", offset_or_null(L->wqkv16, copy_units(ty, nq + nkv, E))},
            {"attn_output", L->wo16},
            {"ffn_gate", L->w_gate_up16},
            {"ffn_up", offset_or_null(L->w_gate_up16, copy_units(ty, F, E))},
            {"ffn_down", L->w_down16},
        };
        for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) {
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, ts[i].suffix);
            fn(user, name, ts[i].copy);
        }
    }
}

typedef struct copy_scan {
    const kvp_gguf_t *g;
    kvp_ggml_type_t type; /* F32 until the first tensor is seen */
    bool mixed;
} copy_scan_t;

static void scan_type(void *user, const char *name, uint16_t *copy) {
    (void)copy;
    copy_scan_t *s = user;
    const kvp_gguf_tensor_t *t = kvp_gguf_find_tensor(s->g, name);
    if (!t || (t->type != KVP_GGML_F16 && t->type != KVP_GGML_BF16 && t->type != KVP_GGML_Q8_0) ||
        (s->type != KVP_GGML_F32 && t->type != s->type))
        s->mixed = true;
    else
        s->type = t->type;
}

/* The tensor's bytes as they are in the file (its type checked by scan_type,
 * its shape by load_tensor; the reader refuses Q8_0 rows of partial
 * blocks, so every tensor has a place in the copy). */
static void copy_bits(void *user, const char *name, uint16_t *copy) {
    const copy_scan_t *s = user;
    const kvp_gguf_tensor_t *t = kvp_gguf_find_tensor(s->g, name);
    if (copy) memcpy(copy, t->data, (size_t)kvp_ggml_type_nbytes(t->type, t->n_elems));
}

/* After the f32 load: the copy when the file's matrices are all F16, all
 * BF16 or all Q8_0 (a file mixing types keeps f32 only). */
static int load_half(kvp_model_t *m, const kvp_gguf_t *g, kvp_err_t *err) {
    copy_scan_t s = {.g = g, .type = KVP_GGML_F32};
    each_copy_tensor(m, scan_type, &s);
    if (s.mixed || s.type == KVP_GGML_F32) return KVP_OK;
    int rc = half_alloc(m, s.type, err);
    if (!rc) each_copy_tensor(m, copy_bits, &s);
    return rc;
}

/* f32 -> `type` -> f32 in place through buffer `h`, which holds n values of
 * `type` (n a multiple of 32 for Q8_0) */
static void round_trip(float *f, uint16_t *h, size_t n, kvp_ggml_type_t type) {
    if (type == KVP_GGML_Q8_0) {
        kvp_f32_to_q8_0_row(f, h, n);
        kvp_q8_0_to_f32_row(h, f, n);
    } else if (type == KVP_GGML_BF16) {
        kvp_f32_to_bf16_row(f, h, n);
        kvp_bf16_to_f32_row(h, f, n);
    } else {
        kvp_f32_to_f16_row(f, h, n);
        kvp_f16_to_f32_row(h, f, n);
    }
}

int kvp_model_make_half(kvp_model_t *m, kvp_ggml_type_t type, kvp_err_t *err) {
    if (type != KVP_GGML_F16 && type != KVP_GGML_BF16 && type != KVP_GGML_Q8_0)
        return kvp_err_set(err, KVP_EINVAL, "model: compact weights are F16, BF16 or Q8_0, not %s",
                           kvp_ggml_type_name(type));
    int rc = half_alloc(m, type, err);
    if (rc) return rc;
    for (int i = 0; i < n_copy_mats(&m->cfg); i++) {
        copy_mat_t cm = copy_mat(m, i);
        if (*cm.copy) round_trip(cm.f32, *cm.copy, cm.rows * cm.n_in, type);
    }
    size_t E = (size_t)m->cfg.n_embd;
    if (!m->cfg.tied_output && copy_units(type, 1, E)) {
        /* the token embedding has no copy (a step reads one row of it) but
         * a file of this type would store it so too; chunks of 1024 values
         * are whole Q8_0 blocks (1088 bytes) and fit the buffer */
        uint16_t buf[1024];
        size_t n = (size_t)m->cfg.n_vocab * E;
        for (size_t i = 0; i < n; i += 1024)
            round_trip(m->tok_embd + i, buf, n - i < 1024 ? n - i : 1024, type);
    }
    return KVP_OK;
}

size_t kvp_model_step_weight_bytes(const kvp_model_t *m) {
    size_t bytes = 0, rows, n_in;
    for (int i = 0; i < n_copy_mats(&m->cfg); i++) {
        copy_shape(&m->cfg, i, &rows, &n_in);
        size_t u = m->params16 ? copy_units(m->type16, rows, n_in) : 0;
        bytes += u ? sizeof(uint16_t) * u : sizeof(float) * rows * n_in;
    }
    return bytes;
}

/* ---- GGUF ------------------------------------------------------------- */

static int read_config(const kvp_gguf_t *g, kvp_model_config_t *c, kvp_err_t *err) {
    char arch[64];
    int rc = kvp_gguf_get_str(g, "general.architecture", arch, sizeof arch, err);
    if (rc) return rc;
    if (strcmp(arch, "llama"))
        return kvp_err_set(err, KVP_EUNSUPPORTED,
                           "general.architecture is '%s'; kvpred runs 'llama' models", arch);
    uint32_t u;
    memset(c, 0, sizeof *c);
#define GET_U32(key, field)                                                                        \
    do {                                                                                           \
        if ((rc = kvp_gguf_get_u32(g, key, &u, err))) return rc;                                   \
        c->field = (int)u;                                                                         \
    } while (0)
    GET_U32("llama.block_count", n_layer);
    GET_U32("llama.embedding_length", n_embd);
    GET_U32("llama.feed_forward_length", n_ff);
    GET_U32("llama.attention.head_count", n_head);
#undef GET_U32
    if ((rc =
             kvp_gguf_get_u32_or(g, "llama.attention.head_count_kv", (uint32_t)c->n_head, &u, err)))
        return rc;
    c->n_kv_head = (int)u;
    uint32_t head_dim_def = c->n_head ? (uint32_t)(c->n_embd / c->n_head) : 0;
    if ((rc = kvp_gguf_get_u32_or(g, "llama.attention.key_length", head_dim_def, &u, err)))
        return rc;
    c->head_dim = (int)u;
    if ((rc = kvp_gguf_get_u32_or(g, "llama.rope.dimension_count", (uint32_t)c->head_dim, &u, err)))
        return rc;
    c->rope_dim = (int)u;
    if ((rc = kvp_gguf_get_u32_or(g, "llama.context_length", 2048, &u, err))) return rc;
    c->n_ctx_train = (int)u;
    if ((rc = kvp_gguf_get_f32_or(g, "llama.rope.freq_base", 10000.0f, &c->rope_base, err)) ||
        (rc = kvp_gguf_get_f32_or(g, "llama.attention.layer_norm_rms_epsilon", 1e-5f, &c->norm_eps,
                                  err)))
        return rc;
    const kvp_gguf_tensor_t *te = kvp_gguf_find_tensor(g, "token_embd.weight");
    if (!te) return kvp_err_set(err, KVP_EFORMAT, "missing tensor 'token_embd.weight'");
    c->n_vocab = te->n_dims == 2 ? (int)te->ne[1] : 0;
    c->tied_output = kvp_gguf_find_tensor(g, "output.weight") == NULL;
    return kvp_model_config_check(c, err);
}

/* Converts tensor `name` into dst after checking it is [ne1][ne0] (ne1 = 0: 1-D). */
static int load_tensor(const kvp_gguf_t *g, const char *name, uint64_t ne0, uint64_t ne1,
                       float *dst, kvp_err_t *err) {
    const kvp_gguf_tensor_t *t = kvp_gguf_find_tensor(g, name);
    if (!t) return kvp_err_set(err, KVP_EFORMAT, "missing tensor '%s'", name);
    uint32_t want_dims = ne1 ? 2 : 1;
    if (t->n_dims != want_dims || t->ne[0] != ne0 || (ne1 && t->ne[1] != ne1))
        return kvp_err_set(err, KVP_ESHAPE,
                           "tensor '%s' has shape [%llu, %llu] (%u dims); the metadata implies "
                           "[%llu, %llu]",
                           name, (unsigned long long)t->ne[0],
                           (unsigned long long)(t->n_dims > 1 ? t->ne[1] : 1), t->n_dims,
                           (unsigned long long)ne0, (unsigned long long)(ne1 ? ne1 : 1));
    int rc = kvp_gguf_tensor_to_f32(t, dst, err);
    if (rc) kvp_err_wrap(err, "tensor '%s'", name);
    return rc;
}

int kvp_model_from_gguf(kvp_model_t **out, const kvp_gguf_t *g, kvp_err_t *err) {
    *out = NULL;
    kvp_model_config_t cfg;
    int rc = read_config(g, &cfg, err);
    if (rc) return rc;
    kvp_model_t *m;
    if ((rc = model_alloc(&m, &cfg, err))) return rc;
    const uint64_t E = cfg.n_embd, V = cfg.n_vocab, F = cfg.n_ff,
                   nq = (uint64_t)cfg.n_head * cfg.head_dim,
                   nkv = (uint64_t)cfg.n_kv_head * cfg.head_dim;
    rc = load_tensor(g, "token_embd.weight", E, V, m->tok_embd, err);
    if (!rc && !cfg.tied_output) rc = load_tensor(g, "output.weight", E, V, m->output, err);
    if (!rc) rc = load_tensor(g, "output_norm.weight", E, 0, m->output_norm, err);
    char name[96];
    for (int l = 0; l < cfg.n_layer && !rc; l++) {
        kvp_layer_t *L = &m->layers[l];
        struct {
            const char *suffix;
            uint64_t ne0, ne1;
            float *dst;
        } ts[] = {
            {"attn_norm", E, 0, L->attn_norm}, {"attn_q", E, nq, L->wq},
            {"attn_k", E, nkv, L->wk},         {"attn_v", E, nkv, L->wv},
            {"attn_output", nq, E, L->wo},     {"ffn_norm", E, 0, L->ffn_norm},
            {"ffn_gate", E, F, L->w_gate},     {"ffn_up", E, F, L->w_up},
            {"ffn_down", F, E, L->w_down},
        };
        for (size_t i = 0; i < sizeof ts / sizeof ts[0] && !rc; i++) {
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, ts[i].suffix);
            rc = load_tensor(g, name, ts[i].ne0, ts[i].ne1, ts[i].dst, err);
        }
    }
    /* Llama 3 style per-frequency scaling. */
    const kvp_gguf_tensor_t *rf = kvp_gguf_find_tensor(g, "rope_freqs.weight");
    if (!rc && rf) {
        float *factors = malloc(sizeof(float) * (size_t)(cfg.rope_dim / 2));
        rc = factors
                 ? load_tensor(g, "rope_freqs.weight", (uint64_t)cfg.rope_dim / 2, 0, factors, err)
                 : kvp_err_set(err, KVP_ENOMEM, "out of memory");
        if (!rc) kvp_rope_inv_freq(m->inv_freq, cfg.rope_dim, cfg.rope_base, factors);
        free(factors);
    }
    if (!rc) rc = load_half(m, g, err);
    if (rc) {
        kvp_model_free(&m);
        return rc;
    }
    *out = m;
    return KVP_OK;
}

int kvp_model_load(kvp_model_t **out, const char *path, kvp_err_t *err) {
    kvp_gguf_t *g;
    *out = NULL;
    int rc = kvp_gguf_open(&g, path, err);
    if (rc) return rc;
    rc = kvp_model_from_gguf(out, g, err);
    if (rc) kvp_err_wrap(err, "%s", path);
    kvp_gguf_free(&g);
    return rc;
}

int kvp_model_to_gguf(const kvp_model_t *m, kvp_gguf_writer_t *w, kvp_ggml_type_t type,
                      kvp_err_t *err) {
    const kvp_model_config_t *c = &m->cfg;
    int rc = 0;
    rc |= kvp_gguf_writer_set_str(w, "general.architecture", "llama");
    rc |= kvp_gguf_writer_set_u32(w, "llama.block_count", (uint32_t)c->n_layer);
    rc |= kvp_gguf_writer_set_u32(w, "llama.context_length", (uint32_t)c->n_ctx_train);
    rc |= kvp_gguf_writer_set_u32(w, "llama.embedding_length", (uint32_t)c->n_embd);
    rc |= kvp_gguf_writer_set_u32(w, "llama.feed_forward_length", (uint32_t)c->n_ff);
    rc |= kvp_gguf_writer_set_u32(w, "llama.attention.head_count", (uint32_t)c->n_head);
    rc |= kvp_gguf_writer_set_u32(w, "llama.attention.head_count_kv", (uint32_t)c->n_kv_head);
    rc |= kvp_gguf_writer_set_u32(w, "llama.rope.dimension_count", (uint32_t)c->rope_dim);
    rc |= kvp_gguf_writer_set_f32(w, "llama.rope.freq_base", c->rope_base);
    rc |= kvp_gguf_writer_set_f32(w, "llama.attention.layer_norm_rms_epsilon", c->norm_eps);
    rc |= kvp_gguf_writer_set_u32(w, "llama.vocab_size", (uint32_t)c->n_vocab);
    if (c->head_dim != c->n_embd / c->n_head) {
        rc |= kvp_gguf_writer_set_u32(w, "llama.attention.key_length", (uint32_t)c->head_dim);
        rc |= kvp_gguf_writer_set_u32(w, "llama.attention.value_length", (uint32_t)c->head_dim);
    }
    if (rc) return kvp_err_set(err, KVP_ENOMEM, "writing model metadata: out of memory");
    const uint64_t E = c->n_embd, V = c->n_vocab, F = c->n_ff,
                   nq = (uint64_t)c->n_head * c->head_dim,
                   nkv = (uint64_t)c->n_kv_head * c->head_dim;
    /* 1-D norm weights stay F32, as llama.cpp's converters keep them. */
#define ADD(name, ne0, ne1, ptr)                                                                   \
    do {                                                                                           \
        uint64_t ne_[2] = {(ne0), (ne1)};                                                          \
        if ((rc = kvp_gguf_writer_add_tensor(w, name, (ne1) ? 2 : 1, ne_,                          \
                                             (ne1) ? type : KVP_GGML_F32, ptr, err)))              \
            return rc;                                                                             \
    } while (0)
    ADD("token_embd.weight", E, V, m->tok_embd);
    ADD("output_norm.weight", E, 0, m->output_norm);
    if (!c->tied_output) ADD("output.weight", E, V, m->output);
    char name[96];
    for (int l = 0; l < c->n_layer; l++) {
        const kvp_layer_t *L = &m->layers[l];
#define ADDL(suffix, ne0, ne1, ptr)                                                                \
    do {                                                                                           \
        snprintf(name, sizeof name, "blk.%d.%s.weight", l, suffix);                                \
        ADD(name, ne0, ne1, ptr);                                                                  \
    } while (0)
        ADDL("attn_norm", E, 0, L->attn_norm);
        ADDL("attn_q", E, nq, L->wq);
        ADDL("attn_k", E, nkv, L->wk);
        ADDL("attn_v", E, nkv, L->wv);
        ADDL("attn_output", nq, E, L->wo);
        ADDL("ffn_norm", E, 0, L->ffn_norm);
        ADDL("ffn_gate", E, F, L->w_gate);
        ADDL("ffn_up", E, F, L->w_up);
        ADDL("ffn_down", F, E, L->w_down);
#undef ADDL
    }
#undef ADD
    return KVP_OK;
}

double kvp_model_flops(const kvp_model_config_t *c, int n_past, int n_tok) {
    double E = c->n_embd, nq = (double)c->n_head * c->head_dim,
           nkv = (double)c->n_kv_head * c->head_dim, F = c->n_ff;
    double dense = 2.0 * (E * (nq + 2 * nkv) + nq * E + 3.0 * E * F);
    /* token t attends to n_past + t + 1 positions: QK^T and PV, each 2*nq per position */
    double positions = (double)n_tok * n_past + (double)n_tok * (n_tok + 1) / 2.0;
    double attn = 4.0 * nq * positions;
    return c->n_layer * (dense * n_tok + attn) + 2.0 * E * c->n_vocab;
}

/* A multiply-xorshift hash over 64-bit words: about a byte a cycle, so the
 * 440 MB of a 110M model take ~0.1 s; it guards against mix-ups, not attacks. */
static uint64_t hash_words(uint64_t h, const void *data, size_t n_bytes) {
    const unsigned char *p = data;
    size_t i = 0;
    for (; i + 8 <= n_bytes; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * 0x9e3779b97f4a7c15ULL;
        h ^= h >> 29;
    }
    for (; i < n_bytes; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

void kvp_model_fingerprint(const kvp_model_t *m, char out[17]) {
    const kvp_model_config_t *c = &m->cfg;
    int64_t shape[] = {c->n_vocab,  c->n_embd, c->n_layer,  c->n_head,     c->n_kv_head,
                       c->head_dim, c->n_ff,   c->rope_dim, c->tied_output};
    uint64_t h = hash_words(0xcbf29ce484222325ULL, shape, sizeof shape);
    float scalars[] = {c->rope_base, c->norm_eps};
    h = hash_words(h, scalars, sizeof scalars);
    h = hash_words(h, m->inv_freq, sizeof(float) * (size_t)(c->rope_dim / 2));
    h = hash_words(h, m->params, sizeof(float) * m->n_params);
    snprintf(out, 17, "%016llx", (unsigned long long)h);
}

int kvp_model_new_cache(const kvp_model_t *m, int cap, kvp_kvcache_t **out, kvp_err_t *err) {
    const kvp_model_config_t *c = &m->cfg;
    return kvp_kvcache_new(out, c->n_layer, c->n_kv_head, c->head_dim, cap, c->rope_dim,
                           m->inv_freq, err);
}

/* ---- forward ---------------------------------------------------------- */

struct kvp_model_ctx {
    const kvp_model_t *m;
    int max_tok, max_ctx;
    float *x;           /* [max_tok][n_embd] residual stream */
    float *xn;          /* [max_tok][n_embd] normed input / projection output */
    float *qkv;         /* [max_tok][n_q + 2*n_kv] */
    float *att;         /* [max_tok][n_q] */
    float *gu;          /* [max_tok][2*n_ff] */
    float *ffh;         /* [max_tok][n_ff] */
    float *scratch;     /* attention scores (a single-token step: n_head rows of max_ctx) */
    float *rope_cs;     /* [max_tok][rope_dim]: cos/sin of each position of the chunk */
    kvp_matvec16_t *mv; /* the compact-weight kernel and its threads; NULL without a copy */
};

int kvp_model_ctx_new(kvp_model_ctx_t **out, const kvp_model_t *m, int max_tok, int max_ctx,
                      kvp_err_t *err) {
    *out = NULL;
    if (max_tok <= 0 || max_ctx <= 0)
        return kvp_err_set(err, KVP_EINVAL, "model context: max_tok %d and max_ctx %d must be > 0",
                           max_tok, max_ctx);
    if (max_tok > max_ctx) max_tok = max_ctx;
    const kvp_model_config_t *c = &m->cfg;
    kvp_model_ctx_t *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return kvp_err_set(err, KVP_ENOMEM, "model context: out of memory");
    size_t T = (size_t)max_tok, nq = (size_t)c->n_head * c->head_dim,
           nkv = (size_t)c->n_kv_head * c->head_dim;
    ctx->m = m;
    ctx->max_tok = max_tok;
    ctx->max_ctx = max_ctx;
    ctx->x = malloc(sizeof(float) * T * c->n_embd);
    ctx->xn = malloc(sizeof(float) * T * c->n_embd);
    ctx->qkv = malloc(sizeof(float) * T * (nq + 2 * nkv));
    ctx->att = malloc(sizeof(float) * T * nq);
    ctx->gu = malloc(sizeof(float) * T * 2 * c->n_ff);
    ctx->ffh = malloc(sizeof(float) * T * c->n_ff);
    /* prefill tiles, or one row of scores per head for a single-token step
     * whose heads run on the runner's threads at once */
    size_t n_scratch = kvp_attention_scratch(max_tok, max_ctx);
    if (n_scratch < (size_t)c->n_head * max_ctx) n_scratch = (size_t)c->n_head * max_ctx;
    ctx->scratch = malloc(sizeof(float) * n_scratch);
    ctx->rope_cs = malloc(sizeof(float) * T * (size_t)(c->rope_dim + 1));
    if (!ctx->x || !ctx->xn || !ctx->qkv || !ctx->att || !ctx->gu || !ctx->ffh || !ctx->scratch ||
        !ctx->rope_cs) {
        kvp_model_ctx_free(&ctx);
        return kvp_err_set(err, KVP_ENOMEM, "model context: out of memory for %d tokens", max_tok);
    }
    /* as many threads as OpenBLAS runs (OPENBLAS_NUM_THREADS): one setting
     * for both kinds of product */
    int rc = m->params16 ? kvp_matvec16_new(&ctx->mv, kvp_blas_threads(), KVP_MV16_AUTO, err) : 0;
    if (rc) {
        kvp_model_ctx_free(&ctx);
        return rc;
    }
    *out = ctx;
    return KVP_OK;
}

void kvp_model_ctx_free(kvp_model_ctx_t **ctx) {
    if (!ctx || !*ctx) return;
    kvp_model_ctx_t *c = *ctx;
    free(c->x);
    free(c->xn);
    free(c->qkv);
    free(c->att);
    free(c->gu);
    free(c->ffh);
    free(c->scratch);
    free(c->rope_cs);
    kvp_matvec16_free(&c->mv);
    free(c);
    *ctx = NULL;
}

const kvp_model_t *kvp_model_ctx_model(const kvp_model_ctx_t *ctx) {
    return ctx->m;
}

const kvp_matvec16_t *kvp_model_ctx_matvec16(const kvp_model_ctx_t *ctx) {
    return ctx->mv;
}

/* y[n][n_out] = x[n][n_in] w^T. One row is a matrix-vector product, bound by
 * the bytes of w it streams: the matrix's compact copy (w16: F16/BF16 halves
 * them, Q8_0 takes 34 bytes for 32 weights), when it has one. More rows
 * reuse each weight and go to sgemm on f32. */
static void project(kvp_model_ctx_t *ctx, float *y, const float *x, const float *w,
                    const uint16_t *w16, int n, int n_in, int n_out) {
    if (n == 1 && w16 && ctx->mv)
        kvp_matvec16(ctx->mv, y, x, w16, ctx->m->type16, 1, n_in, n_out);
    else
        kvp_matmul(y, x, w, n, n_in, n_out);
}

/* A single-token step's attention, one runner item per query head. */
typedef struct att_heads {
    float *out;
    const float *q, *k, *v;
    float *scores; /* n_head rows of n_ctx */
    int n_ctx, head_dim, group, cap;
} att_heads_t;

static void att_head(void *arg, int h) {
    const att_heads_t *a = arg;
    const size_t hd = (size_t)a->head_dim, kv = (size_t)(h / a->group) * a->cap * hd;
    kvp_attention_row(a->out + h * hd, a->q + h * hd, a->k + kv, a->v + kv, a->n_ctx, a->head_dim,
                      a->scores + (size_t)h * a->n_ctx);
}

/* Attention of n tokens at pos0.. over layer l's cache. One token (decode,
 * the base step of KV Prediction) is memory-bound (at 2048 positions a
 * layer's K and V are 12.6 MB for the 110M model) and as two sgemm of one
 * row a head runs on one thread; with a runner, its heads are shared among
 * the runner's threads. Prefill and models without a copy stay on sgemm. */
static void attention(kvp_model_ctx_t *ctx, kvp_kvcache_t *cache, int l, int n, int pos0) {
    const kvp_model_config_t *c = &ctx->m->cfg;
    const int nq = c->n_head * c->head_dim, ld_qkv = nq + 2 * c->n_kv_head * c->head_dim;
    if (n == 1 && ctx->mv && ctx->m->params16) {
        att_heads_t a = {.out = ctx->att,
                         .q = ctx->qkv,
                         .k = kvp_kvcache_k(cache, l),
                         .v = kvp_kvcache_v(cache, l),
                         .scores = ctx->scratch,
                         .n_ctx = pos0 + 1,
                         .head_dim = c->head_dim,
                         .group = c->n_head / c->n_kv_head,
                         .cap = cache->cap};
        kvp_matvec16_for(ctx->mv, c->n_head, att_head, &a);
        return;
    }
    kvp_attention(ctx->att, nq, ctx->qkv, ld_qkv, kvp_kvcache_k(cache, l), kvp_kvcache_v(cache, l),
                  n, pos0, c->n_head, c->n_kv_head, c->head_dim, cache->cap, ctx->scratch);
}

static void add_rows(float *x, const float *y, size_t n) {
    for (size_t i = 0; i < n; i++)
        x[i] += y[i];
}

/* One transformer block over n tokens at positions pos0.. */
static void block_forward(kvp_model_ctx_t *ctx, kvp_kvcache_t *cache, int l, int n, int pos0) {
    /* the steps of one Llama block, in order */
    const kvp_model_t *m = ctx->m;
    const kvp_model_config_t *c = &m->cfg;
    const kvp_layer_t *L = &m->layers[l];
    const int E = c->n_embd, nq = c->n_head * c->head_dim, nkv = c->n_kv_head * c->head_dim;
    const int ld_qkv = nq + 2 * nkv;

    kvp_rmsnorm(ctx->xn, ctx->x, L->attn_norm, n, E, c->norm_eps);
    project(ctx, ctx->qkv, ctx->xn, L->wqkv, L->wqkv16, n, E, ld_qkv);
    for (int t = 0; t < n; t++) {
        float *row = ctx->qkv + (size_t)t * ld_qkv;
        const float *cs = ctx->rope_cs + (size_t)t * c->rope_dim;
        kvp_rope_apply(row, c->n_head, c->head_dim, c->rope_dim, cs, 1.0f);
        kvp_rope_apply(row + nq, c->n_kv_head, c->head_dim, c->rope_dim, cs, 1.0f);
    }
    kvp_kvcache_store(cache, l, pos0, n, ctx->qkv + nq, ld_qkv, ctx->qkv + nq + nkv, ld_qkv);
    attention(ctx, cache, l, n, pos0);
    project(ctx, ctx->xn, ctx->att, L->wo, L->wo16, n, nq, E);
    add_rows(ctx->x, ctx->xn, (size_t)n * E);

    kvp_rmsnorm(ctx->xn, ctx->x, L->ffn_norm, n, E, c->norm_eps);
    project(ctx, ctx->gu, ctx->xn, L->w_gate_up, L->w_gate_up16, n, E, 2 * c->n_ff);
    kvp_swiglu(ctx->ffh, c->n_ff, ctx->gu, ctx->gu + c->n_ff, 2 * c->n_ff, n, c->n_ff);
    project(ctx, ctx->xn, ctx->ffh, L->w_down, L->w_down16, n, c->n_ff, E);
    add_rows(ctx->x, ctx->xn, (size_t)n * E);
}

static void chunk_forward(kvp_model_ctx_t *ctx, kvp_kvcache_t *cache, const int32_t *tokens, int n,
                          float *logits, kvp_logits_mode_t mode) {
    const kvp_model_t *m = ctx->m;
    const kvp_model_config_t *c = &m->cfg;
    const int E = c->n_embd, pos0 = cache->len;
    for (int t = 0; t < n; t++) {
        memcpy(ctx->x + (size_t)t * E, m->tok_embd + (size_t)tokens[t] * E, sizeof(float) * E);
        kvp_rope_table(ctx->rope_cs + (size_t)t * c->rope_dim, c->rope_dim, pos0 + t, m->inv_freq);
    }
    for (int l = 0; l < c->n_layer; l++)
        block_forward(ctx, cache, l, n, pos0);
    cache->len = pos0 + n;
    if (mode == KVP_LOGITS_NONE) return;
    /* Only the rows whose logits are wanted go through the output head: for a
     * prefill that is one row instead of n. */
    int first = mode == KVP_LOGITS_ALL ? 0 : n - 1;
    int rows = n - first;
    kvp_rmsnorm(ctx->xn, ctx->x + (size_t)first * E, m->output_norm, rows, E, c->norm_eps);
    project(ctx, logits, ctx->xn, m->output, m->output16, rows, E, c->n_vocab);
}

int kvp_model_forward(kvp_model_ctx_t *ctx, kvp_kvcache_t *cache, const int32_t *tokens, int n_tok,
                      float *logits, kvp_logits_mode_t mode, kvp_err_t *err) {
    const kvp_model_config_t *c = &ctx->m->cfg;
    if (n_tok <= 0) return kvp_err_set(err, KVP_EINVAL, "forward: no tokens");
    if (cache->n_layer != c->n_layer || cache->n_kv_head != c->n_kv_head ||
        cache->head_dim != c->head_dim)
        return kvp_err_set(err, KVP_ESHAPE,
                           "forward: cache shape (%d layers, %d kv heads, head dim %d) does not "
                           "match the model (%d, %d, %d)",
                           cache->n_layer, cache->n_kv_head, cache->head_dim, c->n_layer,
                           c->n_kv_head, c->head_dim);
    if (cache->cap > ctx->max_ctx)
        return kvp_err_set(err, KVP_EINVAL,
                           "forward: cache capacity %d exceeds the context's max_ctx %d",
                           cache->cap, ctx->max_ctx);
    if (n_tok > cache->cap - cache->len)
        return kvp_err_set(err, KVP_ERANGE,
                           "forward: %d tokens after %d cached exceed the cache capacity %d", n_tok,
                           cache->len, cache->cap);
    for (int t = 0; t < n_tok; t++)
        if (tokens[t] < 0 || tokens[t] >= c->n_vocab)
            return kvp_err_set(err, KVP_ERANGE, "forward: token %d (id %d) outside vocab of %d", t,
                               tokens[t], c->n_vocab);
    for (int off = 0; off < n_tok; off += ctx->max_tok) {
        int n = n_tok - off < ctx->max_tok ? n_tok - off : ctx->max_tok;
        bool last = off + n == n_tok;
        kvp_logits_mode_t md = mode == KVP_LOGITS_ALL ? mode : (last ? mode : KVP_LOGITS_NONE);
        float *lg = mode == KVP_LOGITS_ALL ? logits + (size_t)off * c->n_vocab : logits;
        chunk_forward(ctx, cache, tokens + off, n, lg, md);
    }
    return KVP_OK;
}
