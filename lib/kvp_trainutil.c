#include "kvp_trainutil.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

uint32_t *kvp_trainutil_token_bytes_new(const kvp_tokenizer_t *tok, int n_vocab) {
    uint32_t *tb = calloc((size_t)n_vocab, sizeof *tb);
    if (!tb) return NULL;
    for (int i = 0; i < n_vocab; i++) {
        if (!tok) {
            tb[i] = i < 256 ? 1 : 0;
        } else if (i < kvp_tokenizer_n_vocab(tok) && !kvp_tokenizer_is_control(tok, i)) {
            int n = kvp_tokenizer_piece(tok, i, NULL, 0);
            tb[i] = n > 0 ? (uint32_t)n : 0;
        }
    }
    return tb;
}

void kvp_trainutil_meta_add(kvp_trainutil_meta_t *m, const char *key, const char *fmt, ...) {
    if (m->n >= sizeof m->buf) return;
    int k = snprintf(m->buf + m->n, sizeof m->buf - m->n, "%s=", key);
    if (k > 0) m->n += (size_t)k;
    if (m->n >= sizeof m->buf) return;
    va_list ap;
    va_start(ap, fmt);
    k = vsnprintf(m->buf + m->n, sizeof m->buf - m->n, fmt, ap);
    va_end(ap);
    if (k > 0) m->n += (size_t)k;
    if (m->n < sizeof m->buf - 1) m->buf[m->n++] = '\n';
    if (m->n >= sizeof m->buf) m->n = sizeof m->buf - 1;
    m->buf[m->n] = 0;
}

bool kvp_trainutil_meta_get(const char *text, size_t n, const char *key, char *val, size_t cap) {
    size_t kl = strlen(key);
    const char *p = text, *end = text + n;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        if ((size_t)(le - p) > kl && !memcmp(p, key, kl) && p[kl] == '=') {
            size_t vl = (size_t)(le - p) - kl - 1;
            if (vl >= cap) vl = cap - 1;
            memcpy(val, p + kl + 1, vl);
            val[vl] = 0;
            return true;
        }
        p = le + 1;
    }
    return false;
}

FILE *kvp_trainutil_log_open(const char *path, const char *header, bool resumed, int step,
                             kvp_err_t *err) {
    if (resumed) {
        FILE *in = fopen(path, "rb");
        if (in) {
            char *keep = NULL;
            size_t kn = 0;
            FILE *mem = open_memstream(&keep, &kn);
            char line[1024];
            bool header = true;
            while (mem && fgets(line, sizeof line, in)) {
                if (header || atoi(line) <= step) fputs(line, mem);
                header = false;
            }
            fclose(in);
            if (mem) fclose(mem);
            FILE *out = fopen(path, "wb");
            if (out && keep) fwrite(keep, 1, kn, out);
            free(keep);
            if (!out) kvp_err_set(err, KVP_EIO, "log %s: %s", path, strerror(errno));
            return out;
        }
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        kvp_err_set(err, KVP_EIO, "log %s: %s", path, strerror(errno));
        return NULL;
    }
    fprintf(f, "%s\n", header);
    return f;
}
