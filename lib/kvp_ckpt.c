#include "kvp_ckpt.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CKPT_MAGIC "KVPCKPT\n"
#define CKPT_HEADER 24
#define CKPT_MAX_SECTIONS 4096
#define CKPT_MAX_NAME 255
#define CKPT_MAX_BYTES (1ull << 36)

#define FNV_SEED 14695981039346656037ull
#define FNV_PRIME 1099511628211ull

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= FNV_PRIME;
    }
    return h;
}

static void put_u32(unsigned char *b, uint32_t v) {
    for (int i = 0; i < 4; i++)
        b[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *b, uint64_t v) {
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_u32(const unsigned char *b) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)b[i] << (8 * i);
    return v;
}
static uint64_t get_u64(const unsigned char *b) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)b[i] << (8 * i);
    return v;
}

/* ---- writer ---------------------------------------------------------------- */

typedef struct out {
    FILE *f;
    uint64_t h;
    int bad;
} out_t;

static void out_write(out_t *o, const void *p, size_t n) {
    if (o->bad || n == 0) return;
    o->h = fnv1a(o->h, p, n);
    if (fwrite(p, 1, n, o->f) != n) o->bad = errno ? errno : EIO;
}

/* fsync of the directory, so the rename itself survives a crash. Best effort:
 * some file systems refuse it, and the data is already safe by then. */
static void sync_dir_of(const char *path) {
    char *copy = strdup(path);
    if (!copy) return;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(copy);
}

int kvp_ckpt_write(const char *path, const kvp_ckpt_section_t *s, size_t n, kvp_err_t *err) {
    if (n > CKPT_MAX_SECTIONS)
        return kvp_err_set(err, KVP_EINVAL, "checkpoint: %zu sections (limit %d)", n,
                           CKPT_MAX_SECTIONS);
    uint64_t total = CKPT_HEADER + 8;
    for (size_t i = 0; i < n; i++) {
        size_t nl = strlen(s[i].name);
        if (nl == 0 || nl > CKPT_MAX_NAME)
            return kvp_err_set(err, KVP_EINVAL, "checkpoint: section name '%s' is empty or long",
                               s[i].name);
        total += 4 + nl + 8 + s[i].size;
    }
    size_t tl = strlen(path) + 32;
    char *tmp = malloc(tl);
    if (!tmp) return kvp_err_set(err, KVP_ENOMEM, "checkpoint: out of memory");
    snprintf(tmp, tl, "%s.tmp.%ld", path, (long)getpid());
    out_t o = {.f = fopen(tmp, "wb"), .h = FNV_SEED};
    if (!o.f) {
        int rc =
            kvp_err_set(err, KVP_EIO, "checkpoint: cannot create %s: %s", tmp, strerror(errno));
        free(tmp);
        return rc;
    }
    unsigned char hdr[CKPT_HEADER];
    memcpy(hdr, CKPT_MAGIC, 8);
    put_u32(hdr + 8, KVP_CKPT_VERSION);
    put_u32(hdr + 12, (uint32_t)n);
    put_u64(hdr + 16, total);
    errno = 0;
    out_write(&o, hdr, sizeof hdr);
    for (size_t i = 0; i < n; i++) {
        unsigned char b[8];
        uint32_t nl = (uint32_t)strlen(s[i].name);
        put_u32(b, nl);
        out_write(&o, b, 4);
        out_write(&o, s[i].name, nl);
        put_u64(b, s[i].size);
        out_write(&o, b, 8);
        out_write(&o, s[i].data, (size_t)s[i].size);
    }
    unsigned char sum[8];
    put_u64(sum, o.h);
    if (!o.bad && fwrite(sum, 1, 8, o.f) != 8) o.bad = errno ? errno : EIO;
    if (!o.bad && (fflush(o.f) || fsync(fileno(o.f)))) o.bad = errno ? errno : EIO;
    if (fclose(o.f) && !o.bad) o.bad = errno ? errno : EIO;
    if (!o.bad && rename(tmp, path)) o.bad = errno ? errno : EIO;
    int rc = 0;
    if (o.bad) {
        rc = kvp_err_set(err, KVP_EIO, "checkpoint: writing %s failed: %s", path, strerror(o.bad));
        unlink(tmp);
    } else {
        sync_dir_of(path);
    }
    free(tmp);
    return rc;
}

/* ---- reader ---------------------------------------------------------------- */

typedef struct sec {
    char name[CKPT_MAX_NAME + 1];
    const unsigned char *data;
    uint64_t size;
} sec_t;

struct kvp_ckpt {
    unsigned char *buf;
    uint64_t len;
    sec_t *secs;
    uint32_t n;
    char *path;
};

void kvp_ckpt_free(kvp_ckpt_t **cp) {
    kvp_ckpt_t *c = cp ? *cp : NULL;
    if (!c) return;
    free(c->buf);
    free(c->secs);
    free(c->path);
    free(c);
    *cp = NULL;
}

static int parse(kvp_ckpt_t *c, const char *path, kvp_err_t *err) {
    const unsigned char *b = c->buf;
    uint64_t len = c->len;
    if (len < CKPT_HEADER + 8 || memcmp(b, CKPT_MAGIC, 8))
        return kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: not a kvpred checkpoint%s", path,
                           len < CKPT_HEADER + 8 ? " (too short)" : " (bad magic)");
    uint32_t version = get_u32(b + 8);
    if (version != KVP_CKPT_VERSION)
        return kvp_err_set(err, KVP_EUNSUPPORTED,
                           "checkpoint %s: version %u (this kvpred reads %d)", path, version,
                           KVP_CKPT_VERSION);
    uint64_t want = get_u64(b + 16);
    if (want != len)
        return kvp_err_set(err, KVP_EFORMAT,
                           "checkpoint %s: truncated or corrupt: header says %llu bytes, file has "
                           "%llu",
                           path, (unsigned long long)want, (unsigned long long)len);
    uint64_t sum = fnv1a(FNV_SEED, b, (size_t)(len - 8));
    if (sum != get_u64(b + len - 8))
        return kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: corrupt: checksum mismatch", path);
    c->n = get_u32(b + 12);
    if (c->n > CKPT_MAX_SECTIONS)
        return kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: %u sections (limit %d)", path, c->n,
                           CKPT_MAX_SECTIONS);
    c->secs = calloc(c->n ? c->n : 1, sizeof *c->secs);
    if (!c->secs) return kvp_err_set(err, KVP_ENOMEM, "checkpoint: out of memory");
    uint64_t off = CKPT_HEADER, end = len - 8;
    for (uint32_t i = 0; i < c->n; i++) {
        if (end - off < 4)
            return kvp_err_set(err, KVP_EFORMAT,
                               "checkpoint %s: section %u header at %llu runs "
                               "past the end",
                               path, i, (unsigned long long)off);
        uint32_t nl = get_u32(b + off);
        off += 4;
        if (nl == 0 || nl > CKPT_MAX_NAME || end - off < (uint64_t)nl + 8)
            return kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: bad name of section %u at %llu",
                               path, i, (unsigned long long)off);
        memcpy(c->secs[i].name, b + off, nl);
        off += nl;
        uint64_t size = get_u64(b + off);
        off += 8;
        if (size > end - off)
            return kvp_err_set(err, KVP_EFORMAT,
                               "checkpoint %s: section '%s' (%llu bytes) runs past the end", path,
                               c->secs[i].name, (unsigned long long)size);
        c->secs[i].data = b + off;
        c->secs[i].size = size;
        off += size;
    }
    if (off != end)
        return kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: %llu stray bytes after the sections",
                           path, (unsigned long long)(end - off));
    return 0;
}

int kvp_ckpt_read(kvp_ckpt_t **out, const char *path, kvp_err_t *err) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return kvp_err_set(err, KVP_EIO, "checkpoint: cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) || (uint64_t)st.st_size > CKPT_MAX_BYTES) {
        fclose(f);
        return kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: cannot size it or too large", path);
    }
    kvp_ckpt_t *c = calloc(1, sizeof *c);
    if (c) {
        c->len = (uint64_t)st.st_size;
        c->buf = malloc(c->len ? (size_t)c->len : 1);
        c->path = strdup(path);
    }
    if (!c || !c->buf || !c->path) {
        fclose(f);
        kvp_ckpt_free(&c);
        return kvp_err_set(err, KVP_ENOMEM, "checkpoint %s: out of memory", path);
    }
    size_t got = fread(c->buf, 1, (size_t)c->len, f);
    int bad = ferror(f);
    fclose(f);
    int rc = 0;
    if (bad || got != c->len) rc = kvp_err_set(err, KVP_EIO, "checkpoint %s: read failed", path);
    if (!rc) rc = parse(c, path, err);
    if (rc) {
        kvp_ckpt_free(&c);
        return rc;
    }
    *out = c;
    return 0;
}

const void *kvp_ckpt_find(const kvp_ckpt_t *c, const char *name, uint64_t *size) {
    for (uint32_t i = 0; i < c->n; i++)
        if (!strcmp(c->secs[i].name, name)) {
            if (size) *size = c->secs[i].size;
            return c->secs[i].data;
        }
    return NULL;
}

int kvp_ckpt_get(const kvp_ckpt_t *c, const char *name, void *dst, uint64_t size, kvp_err_t *err) {
    uint64_t have;
    const void *p = kvp_ckpt_find(c, name, &have);
    if (!p) return kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: no section '%s'", c->path, name);
    if (have != size)
        return kvp_err_set(err, KVP_ESHAPE,
                           "checkpoint %s: section '%s' has %llu bytes, this run needs %llu",
                           c->path, name, (unsigned long long)have, (unsigned long long)size);
    if (size) memcpy(dst, p, (size_t)size);
    return 0;
}
