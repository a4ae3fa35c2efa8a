#include "kvp_corpus.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Limits on what a corpus may ask us to hold. */
#define CORPUS_MAX_FILES (1u << 22)
#define CORPUS_MAX_FILE_BYTES (1ull << 31)
#define CORPUS_MAX_TOTAL_BYTES (1ull << 33)
#define CORPUS_MAX_DEPTH 64
#define CORPUS_SNIFF_BYTES 4096

/* The byte-level vocabulary without merges (kvp_tokenizer_write_bytelevel). */
#define BYTE_BOS 256
#define BYTE_EOS 257

struct kvp_corpus {
    kvp_corpus_file_t *files;
    size_t n, cap;
    kvp_corpus_stream_t stream[KVP_SPLIT_COUNT];
};

/* ---- the split rule ----------------------------------------------------- */

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 1099511628211ull;
    }
    return h;
}
#define FNV_SEED 14695981039346656037ull

kvp_split_t kvp_corpus_split_of(const char *rel, int holdout_pct) {
    unsigned bucket = (unsigned)(fnv1a(FNV_SEED, rel, strlen(rel)) % 100);
    unsigned h = holdout_pct < 0 ? 0 : (unsigned)holdout_pct;
    if (bucket < 100 - 2 * h) return KVP_SPLIT_TRAIN;
    return bucket < 100 - h ? KVP_SPLIT_VAL : KVP_SPLIT_TEST;
}

const char *kvp_split_name(kvp_split_t s) {
    switch (s) {
    case KVP_SPLIT_TRAIN:
        return "train";
    case KVP_SPLIT_VAL:
        return "validation";
    case KVP_SPLIT_TEST:
        return "test";
    }
    return "?";
}

/* ---- listing ------------------------------------------------------------ */

static int add_file(kvp_corpus_t *c, const char *path, const char *rel, uint64_t size,
                    kvp_err_t *err) {
    if (c->n == CORPUS_MAX_FILES)
        return kvp_err_set(err, KVP_ENOMEM, "corpus: more than %u files", CORPUS_MAX_FILES);
    if (size > CORPUS_MAX_FILE_BYTES)
        return kvp_err_set(err, KVP_ENOMEM, "corpus: %s has %llu bytes (limit %llu)", path,
                           (unsigned long long)size, CORPUS_MAX_FILE_BYTES);
    if (c->n == c->cap) {
        size_t cap = c->cap ? 2 * c->cap : 256;
        kvp_corpus_file_t *f = realloc(c->files, cap * sizeof *f);
        if (!f) return kvp_err_set(err, KVP_ENOMEM, "corpus: out of memory");
        c->files = f;
        c->cap = cap;
    }
    kvp_corpus_file_t *f = &c->files[c->n];
    f->path = strdup(path);
    f->rel = strdup(rel);
    f->size = size;
    f->split = KVP_SPLIT_TRAIN;
    if (!f->path || !f->rel) {
        free(f->path);
        free(f->rel);
        return kvp_err_set(err, KVP_ENOMEM, "corpus: out of memory");
    }
    c->n++;
    return 0;
}

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !memcmp(s + n - m, suffix, m);
}

/* Whether the file's first bytes hold a NUL (then it is not text). Unreadable
 * files count as text here: reading them later gives the clear error. */
static bool looks_binary(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    char buf[CORPUS_SNIFF_BYTES];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    return memchr(buf, 0, n) != NULL;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void free_names(char **names, size_t n) {
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

/* Walks dir (path on disk) whose relative path under its root is rel ("" at
 * the root). Entries are visited in byte order, so the listing is the same
 * on every machine. */
static int walk(kvp_corpus_t *c, const char *dir, const char *rel, const char *ext, int depth,
                kvp_err_t *err) {
    if (depth > CORPUS_MAX_DEPTH)
        return kvp_err_set(err, KVP_ERANGE, "corpus: %s: directories nested deeper than %d", dir,
                           CORPUS_MAX_DEPTH);
    DIR *d = opendir(dir);
    if (!d)
        return kvp_err_set(err, KVP_EIO, "corpus: cannot open directory %s: %s", dir,
                           strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    struct dirent *e;
    while (!rc && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            char **nn = realloc(names, cap * sizeof *nn);
            if (!nn) {
                rc = kvp_err_set(err, KVP_ENOMEM, "corpus: out of memory");
                break;
            }
            names = nn;
        }
        if (!(names[n] = strdup(e->d_name)))
            rc = kvp_err_set(err, KVP_ENOMEM, "corpus: out of memory");
        else
            n++;
    }
    closedir(d);
    if (!rc) qsort(names, n, sizeof *names, cmp_str);
    for (size_t i = 0; !rc && i < n; i++) {
        size_t pl = strlen(dir) + strlen(names[i]) + 2, rl = strlen(rel) + strlen(names[i]) + 2;
        char *p = malloc(pl), *r = malloc(rl);
        if (!p || !r) {
            free(p);
            free(r);
            rc = kvp_err_set(err, KVP_ENOMEM, "corpus: out of memory");
            break;
        }
        snprintf(p, pl, "%s/%s", dir, names[i]);
        snprintf(r, rl, "%s%s%s", rel, *rel ? "/" : "", names[i]);
        struct stat st;
        if (lstat(p, &st))
            rc = kvp_err_set(err, KVP_EIO, "corpus: cannot stat %s: %s", p, strerror(errno));
        else if (S_ISDIR(st.st_mode))
            rc = walk(c, p, r, ext, depth + 1, err);
        else if (S_ISREG(st.st_mode) && (ext && *ext ? ends_with(names[i], ext) : !looks_binary(p)))
            rc = add_file(c, p, r, (uint64_t)st.st_size, err);
        free(p);
        free(r);
    }
    free_names(names, n);
    return rc;
}

int kvp_corpus_new(kvp_corpus_t **out, const char *const *paths, int n_paths,
                   const kvp_corpus_opts_t *opts, kvp_err_t *err) {
    *out = NULL;
    kvp_corpus_opts_t o = opts ? *opts : (kvp_corpus_opts_t){0};
    if (o.holdout_pct < 0 || o.holdout_pct > 33)
        return kvp_err_set(err, KVP_EINVAL, "corpus: hold-out %d%% is not in [0, 33]",
                           o.holdout_pct);
    if (n_paths <= 0) return kvp_err_set(err, KVP_EINVAL, "corpus: no paths given");
    kvp_corpus_t *c = calloc(1, sizeof *c);
    if (!c) return kvp_err_set(err, KVP_ENOMEM, "corpus: out of memory");
    int rc = 0;
    for (int i = 0; !rc && i < n_paths; i++) {
        struct stat st;
        if (stat(paths[i], &st)) {
            rc = kvp_err_set(err, KVP_EIO, "corpus: %s: %s", paths[i], strerror(errno));
        } else if (S_ISDIR(st.st_mode)) {
            size_t before = c->n;
            /* strip trailing slashes so joined paths read well */
            char *root = strdup(paths[i]);
            if (!root) rc = kvp_err_set(err, KVP_ENOMEM, "corpus: out of memory");
            for (size_t l = root ? strlen(root) : 0; l > 1 && root[l - 1] == '/'; l--)
                root[l - 1] = 0;
            if (!rc) rc = walk(c, root, "", o.ext, 0, err);
            free(root);
            if (!rc && c->n == before)
                rc = kvp_err_set(err, KVP_EINVAL, "corpus: no %s%s files under %s",
                                 o.ext && *o.ext ? "*" : "text", o.ext && *o.ext ? o.ext : "",
                                 paths[i]);
        } else if (S_ISREG(st.st_mode)) {
            const char *base = strrchr(paths[i], '/');
            rc = add_file(c, paths[i], base ? base + 1 : paths[i], (uint64_t)st.st_size, err);
        } else {
            rc = kvp_err_set(err, KVP_EINVAL, "corpus: %s is neither a file nor a directory",
                             paths[i]);
        }
    }
    uint64_t total = 0;
    for (size_t i = 0; !rc && i < c->n; i++) {
        c->files[i].split = kvp_corpus_split_of(c->files[i].rel, o.holdout_pct);
        total += c->files[i].size;
    }
    if (!rc && total > CORPUS_MAX_TOTAL_BYTES)
        rc = kvp_err_set(err, KVP_ENOMEM, "corpus: %llu bytes in all (limit %llu)",
                         (unsigned long long)total, CORPUS_MAX_TOTAL_BYTES);
    if (rc) {
        kvp_corpus_free(&c);
        return rc;
    }
    *out = c;
    return 0;
}

void kvp_corpus_free(kvp_corpus_t **cp) {
    kvp_corpus_t *c = cp ? *cp : NULL;
    if (!c) return;
    for (size_t i = 0; i < c->n; i++) {
        free(c->files[i].path);
        free(c->files[i].rel);
    }
    free(c->files);
    for (int s = 0; s < KVP_SPLIT_COUNT; s++)
        free(c->stream[s].tok);
    free(c);
    *cp = NULL;
}

size_t kvp_corpus_n_files(const kvp_corpus_t *c) {
    return c->n;
}

const kvp_corpus_file_t *kvp_corpus_file(const kvp_corpus_t *c, size_t i) {
    return i < c->n ? &c->files[i] : NULL;
}

size_t kvp_corpus_split_files(const kvp_corpus_t *c, kvp_split_t s) {
    size_t n = 0;
    for (size_t i = 0; i < c->n; i++)
        n += c->files[i].split == s;
    return n;
}

uint64_t kvp_corpus_split_bytes(const kvp_corpus_t *c, kvp_split_t s) {
    uint64_t n = 0;
    for (size_t i = 0; i < c->n; i++)
        if (c->files[i].split == s) n += c->files[i].size;
    return n;
}

uint64_t kvp_corpus_fingerprint(const kvp_corpus_t *c) {
    uint64_t h = FNV_SEED;
    for (size_t i = 0; i < c->n; i++) {
        const kvp_corpus_file_t *f = &c->files[i];
        h = fnv1a(h, f->rel, strlen(f->rel) + 1);
        h = fnv1a(h, &f->size, sizeof f->size);
        unsigned char s = (unsigned char)f->split;
        h = fnv1a(h, &s, 1);
    }
    return h;
}

/* ---- reading and tokenizing ---------------------------------------------- */

int kvp_corpus_read_file(const char *path, char **out, size_t *out_len, kvp_err_t *err) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return kvp_err_set(err, KVP_EIO, "corpus: cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) || (uint64_t)st.st_size > CORPUS_MAX_FILE_BYTES) {
        fclose(f);
        return kvp_err_set(err, KVP_EIO, "corpus: %s: cannot size it or larger than %llu bytes",
                           path, CORPUS_MAX_FILE_BYTES);
    }
    size_t size = (size_t)st.st_size;
    char *buf = malloc(size + 1);
    if (!buf) {
        fclose(f);
        return kvp_err_set(err, KVP_ENOMEM, "corpus: %s: out of memory", path);
    }
    size_t n = fread(buf, 1, size, f);
    int bad = ferror(f);
    int e = errno;
    fclose(f);
    if (bad || n != size) {
        free(buf);
        return kvp_err_set(err, KVP_EIO, "corpus: reading %s failed: %s", path,
                           bad ? strerror(e) : "file shrank while reading");
    }
    buf[n] = 0;
    *out = buf;
    if (out_len) *out_len = n;
    return 0;
}

static int stream_reserve(kvp_corpus_stream_t *s, size_t *cap, size_t extra, kvp_err_t *err) {
    if (s->n + extra <= *cap) return 0;
    size_t nc = *cap ? *cap : 1 << 16;
    while (nc < s->n + extra)
        nc *= 2;
    int32_t *t = realloc(s->tok, nc * sizeof *t);
    if (!t) return kvp_err_set(err, KVP_ENOMEM, "corpus: out of memory for %zu tokens", nc);
    s->tok = t;
    *cap = nc;
    return 0;
}

int kvp_corpus_tokenize(kvp_corpus_t *c, kvp_split_t split, const kvp_tokenizer_t *tok,
                        kvp_err_t *err) {
    if ((int)split < 0 || split >= KVP_SPLIT_COUNT)
        return kvp_err_set(err, KVP_EINVAL, "corpus: no split %d", (int)split);
    kvp_corpus_stream_t *s = &c->stream[split];
    free(s->tok);
    memset(s, 0, sizeof *s);
    int32_t bos = tok ? kvp_tokenizer_bos(tok) : BYTE_BOS;
    int32_t eos = tok ? kvp_tokenizer_eos(tok) : BYTE_EOS;
    size_t cap = 0;
    int rc = 0;
    for (size_t i = 0; !rc && i < c->n; i++) {
        const kvp_corpus_file_t *f = &c->files[i];
        if (f->split != split) continue;
        char *text;
        size_t len;
        if ((rc = kvp_corpus_read_file(f->path, &text, &len, err))) break;
        if (!tok) {
            rc = stream_reserve(s, &cap, len + 2, err);
            if (!rc) {
                s->tok[s->n++] = bos;
                for (size_t j = 0; j < len; j++)
                    s->tok[s->n++] = (unsigned char)text[j];
                s->tok[s->n++] = eos;
            }
        } else {
            int32_t *t = NULL;
            size_t nt = 0;
            rc = kvp_tokenizer_encode(tok, text, len, false, &t, &nt, err);
            if (rc) kvp_err_wrap(err, "corpus: %s", f->path);
            if (!rc) rc = stream_reserve(s, &cap, nt + 2, err);
            if (!rc) {
                if (bos >= 0) s->tok[s->n++] = bos;
                if (nt) memcpy(s->tok + s->n, t, nt * sizeof *t);
                s->n += nt;
                if (eos >= 0) s->tok[s->n++] = eos;
            }
            free(t);
        }
        free(text);
        s->bytes += len;
        s->n_docs++;
    }
    if (rc) {
        free(s->tok);
        memset(s, 0, sizeof *s);
    }
    return rc;
}

const kvp_corpus_stream_t *kvp_corpus_stream(const kvp_corpus_t *c, kvp_split_t s) {
    return (int)s >= 0 && s < KVP_SPLIT_COUNT ? &c->stream[s] : NULL;
}

/* ---- batches --------------------------------------------------------------- */

int kvp_corpus_sample(const kvp_corpus_stream_t *s, kvp_rng_t *rng, int B, int T, int32_t *tokens,
                      int32_t *targets, kvp_err_t *err) {
    if (B <= 0 || T <= 0 || s->n <= (size_t)T)
        return kvp_err_set(err, KVP_EINVAL,
                           "corpus: cannot cut windows of %d+1 tokens from a stream of %zu", T,
                           s->n);
    uint64_t n_starts = (uint64_t)(s->n - (size_t)T);
    for (int b = 0; b < B; b++) {
        size_t o = (size_t)kvp_rng_below(rng, n_starts);
        memcpy(tokens + (size_t)b * T, s->tok + o, (size_t)T * sizeof *tokens);
        memcpy(targets + (size_t)b * T, s->tok + o + 1, (size_t)T * sizeof *targets);
    }
    return 0;
}

size_t kvp_corpus_n_windows(const kvp_corpus_stream_t *s, int T) {
    if (s->n < 2 || T <= 0) return 0;
    return (s->n - 1 + (size_t)T - 1) / (size_t)T;
}

void kvp_corpus_window(const kvp_corpus_stream_t *s, size_t w, int T, int32_t pad, int32_t *tokens,
                       int32_t *targets) {
    size_t o = w * (size_t)T;
    for (int t = 0; t < T; t++) {
        size_t i = o + (size_t)t;
        tokens[t] = i < s->n ? s->tok[i] : pad;
        targets[t] = i + 1 < s->n ? s->tok[i + 1] : -1;
    }
}
