#include "kvp_tool_util.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_predictor.h"

int kvp_tool_getopt(int argc, char **argv, const char *shortopts, const struct option *lo,
                    void (*usage)(FILE *), int (*one)(int code, void *opts), void *opts) {
    int c;
    optind = 1; /* getopt keeps its place between calls: each subcommand starts over */
    while ((c = getopt_long(argc, argv, shortopts, lo, NULL)) != -1) {
        if (c == 'h') return usage(stdout), 1;
        if (c == '?') return usage(stderr), 2;
        if (one(c, opts)) return 2;
    }
    return 0;
}

int kvp_parse_int(const char *flag, const char *s, int lo, int hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "kvpred: %s: '%s' is not a whole number in [%d, %d]\n", flag, s, lo, hi);
        return -1;
    }
    *out = (int)v;
    return 0;
}

int kvp_parse_float(const char *flag, const char *s, float lo, float hi, float *out) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) {
        fprintf(stderr, "kvpred: %s: '%s' is not a number in [%g, %g]\n", flag, s, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

int kvp_parse_u64(const char *flag, const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-') {
        fprintf(stderr, "kvpred: %s: '%s' is not a non-negative whole number\n", flag, s);
        return -1;
    }
    *out = v;
    return 0;
}

int kvp_parse_count(const char *who, const char *flag, const char *s, int max_log2, uint64_t *out) {
    if (kvp_parse_u64(flag, s, out)) return -1;
    if (*out >= 1 && *out <= ((uint64_t)1 << max_log2)) return 0;
    fprintf(stderr, "%s: %s: '%s' is not in [1, 2^%d]\n", who, flag, s, max_log2);
    return -1;
}

int kvp_parse_layer_map(const char *who, const char *s, int32_t **map, int *n_map) {
    size_t n = 1;
    for (const char *c = s; *c; c++)
        n += *c == ',';
    if (n > KVP_PREDICTOR_MAX_LAYERS) {
        fprintf(stderr, "%s: --layer-map: more than %d entries\n", who, KVP_PREDICTOR_MAX_LAYERS);
        return -1;
    }
    free(*map);
    *n_map = 0;
    *map = malloc(sizeof(int32_t) * n);
    if (!*map) return -1;
    char buf[32];
    for (const char *c = s; *n_map < (int)n; (*n_map)++) {
        size_t len = strcspn(c, ",");
        snprintf(buf, sizeof buf, "%.*s", (int)(len < 31 ? len : 31), c);
        int v;
        if (kvp_parse_int("--layer-map", buf, 0, KVP_PREDICTOR_MAX_LAYERS - 1, &v)) return -1;
        (*map)[*n_map] = v;
        c += len + (c[len] == ',');
    }
    return 0;
}

int kvp_tool_check_layer_map(const int32_t *map, int n_map, int n_base_layers, kvp_err_t *err) {
    if (!map || n_map == n_base_layers) return KVP_OK;
    return kvp_err_set(err, KVP_EINVAL,
                       "--layer-map has %d entries but the base model has %d layers", n_map,
                       n_base_layers);
}

int kvp_read_text(const char *path, char **out, size_t *out_len) {
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!f) {
        fprintf(stderr, "kvpred: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t n;
    while (buf && (n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (cap - len < 2) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    int bad = ferror(f) || !buf;
    if (f != stdin) fclose(f);
    if (bad) {
        free(buf);
        fprintf(stderr, "kvpred: reading %s failed\n", path);
        return -1;
    }
    buf[len] = 0;
    *out = buf;
    if (out_len) *out_len = len;
    return 0;
}

char *kvp_tool_derive_path(const char *path, const char *drop, const char *add) {
    size_t n = strlen(path), nd = drop ? strlen(drop) : 0;
    if (nd && n > nd && !strcmp(path + n - nd, drop)) n -= nd;
    char *p = malloc(n + strlen(add) + 1);
    if (p) {
        memcpy(p, path, n);
        strcpy(p + n, add);
    }
    return p;
}

/* ---- models ------------------------------------------------------------ */

int kvp_tool_model_open(const char *path, kvp_tool_model_t *mf, kvp_err_t *err) {
    memset(mf, 0, sizeof *mf);
    int rc = kvp_gguf_open(&mf->g, path, err);
    if (!rc) rc = kvp_model_from_gguf(&mf->m, mf->g, err);
    if (!rc) rc = kvp_tokenizer_from_gguf(&mf->tok, mf->g, err);
    if (rc) kvp_err_wrap(err, "%s", path);
    return rc;
}

void kvp_tool_model_close(kvp_tool_model_t *mf) {
    kvp_tokenizer_free(&mf->tok);
    kvp_model_free(&mf->m);
    kvp_gguf_free(&mf->g);
}

int kvp_tool_check_vocab_pair(const kvp_tokenizer_t *aux, const kvp_tokenizer_t *base,
                              kvp_err_t *err) {
    int na = kvp_tokenizer_n_vocab(aux), nb = kvp_tokenizer_n_vocab(base);
    if (na == nb) return KVP_OK;
    return kvp_err_set(err, KVP_ESHAPE,
                       "the auxiliary model's vocabulary has %d tokens but the base model's "
                       "%d: KV Prediction needs one shared vocabulary",
                       na, nb);
}

/* ---- the corpus flags ---------------------------------------------------- */

void kvp_tool_corpus_init(kvp_tool_corpus_t *c, bool many, int holdout_min) {
    memset(c, 0, sizeof *c);
    c->many = many;
    c->holdout = KVP_CORPUS_DEFAULT_HOLDOUT;
    c->holdout_min = holdout_min;
    if (many) return; /* the default corpus only if no --corpus comes */
    c->path[c->n_path++] = KVP_CORPUS_DEFAULT_DIR;
    c->ext = KVP_CORPUS_DEFAULT_EXT;
}

int kvp_tool_corpus_add(kvp_tool_corpus_t *c, const char *who, const char *what, const char *path) {
    if (!c->many) {
        c->path[0] = path;
        return 0;
    }
    if (c->n_path == KVP_TOOL_MAX_CORPUS) {
        fprintf(stderr, "%s: more than %d %s\n", who, KVP_TOOL_MAX_CORPUS, what);
        return -1;
    }
    c->path[c->n_path++] = path;
    return 0;
}

int kvp_tool_corpus_flag(kvp_tool_corpus_t *c, const char *who, int code, const char *arg) {
    switch (code) {
    case KVP_TOOL_OPT_CORPUS:
        return kvp_tool_corpus_add(c, who, "--corpus paths", arg);
    case KVP_TOOL_OPT_EXT:
        return c->ext = arg, 0;
    case KVP_TOOL_OPT_HOLDOUT:
        return kvp_parse_int("--holdout", arg, c->holdout_min, 33, &c->holdout);
    default:
        return -1;
    }
}

void kvp_tool_corpus_finish(kvp_tool_corpus_t *c) {
    if (c->n_path > 0) return;
    c->path[c->n_path++] = KVP_CORPUS_DEFAULT_DIR;
    if (!c->ext) c->ext = KVP_CORPUS_DEFAULT_EXT;
}

int kvp_tool_corpus_open(const kvp_tool_corpus_t *c, kvp_corpus_t **out, kvp_err_t *err) {
    kvp_corpus_opts_t co = {.ext = c->ext, .holdout_pct = c->holdout};
    return kvp_corpus_new(out, c->path, c->n_path, &co, err);
}

const kvp_tokenizer_t *kvp_tool_corpus_tok(const kvp_tokenizer_t *t) {
    bool plain = kvp_tokenizer_n_vocab(t) == kvp_tokenizer_bytelevel_n_vocab(0) &&
                 kvp_tokenizer_bos(t) == 256 && kvp_tokenizer_eos(t) == 257;
    return plain ? NULL : t;
}
