/* kvpred info: print a GGUF file's header, metadata and tensor table.
 *
 * Everything printed comes from kvp_gguf, which has already validated the
 * file; names and strings are still escaped on output, because a file may
 * carry control characters that would otherwise reach the terminal. */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_cmds.h"
#include "kvp_gguf.h"

#define INFO_STR_MAX 64      /* bytes of a string value shown before "..." */
#define INFO_ELEM_STR_MAX 24 /* bytes of each string shown in an array */
#define INFO_ARR_SHOWN 8     /* array elements shown */

static void usage(FILE *f) {
    fprintf(f, "usage: kvpred info MODEL.gguf\n"
               "\n"
               "Prints a GGUF file's version, alignment, every metadata pair (arrays: element\n"
               "type, count and the first elements) and the tensor table (name, type, shape,\n"
               "offset in the data section, bytes), then the parameter and byte totals.\n"
               "\n"
               "options:\n"
               "  -h, --help   print this help and exit\n");
}

/* Prints s quoted, escaping quotes, backslashes and control bytes, cut after
 * max bytes (at a UTF-8 character boundary) with "...". Returns the width
 * printed, in characters. */
static int print_quoted(kvp_gguf_str_t s, uint64_t max) {
    uint64_t n = s.len;
    bool cut = n > max;
    if (cut) {
        n = max;
        while (n > 0 && ((unsigned char)s.ptr[n] & 0xC0) == 0x80)
            n--; /* do not split a multi-byte character */
    }
    int w = 2;
    putchar('"');
    for (uint64_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s.ptr[i];
        const char *esc = c == '"'    ? "\\\""
                          : c == '\\' ? "\\\\"
                          : c == '\n' ? "\\n"
                          : c == '\t' ? "\\t"
                          : c == '\r' ? "\\r"
                                      : NULL;
        if (esc)
            w += printf("%s", esc);
        else if (c < 0x20 || c == 0x7f)
            w += printf("\\x%02x", c);
        else {
            putchar(c);
            w += (c & 0xC0) != 0x80; /* count characters, not continuation bytes */
        }
    }
    putchar('"');
    if (cut) w += printf("...");
    return w;
}

/* A key or tensor name: shown as is unless it holds bytes that need escaping. */
static void print_name(kvp_gguf_str_t s, int width) {
    bool plain = s.len <= 200;
    for (uint64_t i = 0; plain && i < s.len; i++) {
        unsigned char c = (unsigned char)s.ptr[i];
        plain = c > 0x20 && c != 0x7f && c != '"' && c != '\\';
    }
    if (plain) {
        printf("%-*.*s", width, (int)s.len, s.ptr);
        return;
    }
    int w = print_quoted(s, 200);
    if (w < width) printf("%*s", width - w, "");
}

/* The shortest decimal that reads back as the same value: 1e-05, not
 * 9.99999975e-06. */
static void print_f32(float v) {
    char buf[32];
    for (int p = 6; p <= 9; p++) {
        snprintf(buf, sizeof buf, "%.*g", p, (double)v);
        if (strtof(buf, NULL) == v || v != v) break;
    }
    fputs(buf, stdout);
}

static void print_f64(double v) {
    char buf[40];
    for (int p = 15; p <= 17; p++) {
        snprintf(buf, sizeof buf, "%.*g", p, v);
        if (strtod(buf, NULL) == v || v != v) break;
    }
    fputs(buf, stdout);
}

static void print_scalar(const kvp_gguf_kv_t *kv) {
    switch (kv->type) {
    case KVP_GGUF_U8:
    case KVP_GGUF_U16:
    case KVP_GGUF_U32:
    case KVP_GGUF_U64:
        printf("%" PRIu64, kv->v.u64);
        break;
    case KVP_GGUF_I8:
    case KVP_GGUF_I16:
    case KVP_GGUF_I32:
    case KVP_GGUF_I64:
        printf("%" PRId64, kv->v.i64);
        break;
    case KVP_GGUF_F32:
        print_f32((float)kv->v.f64);
        break;
    case KVP_GGUF_F64:
        print_f64(kv->v.f64);
        break;
    case KVP_GGUF_BOOL:
        fputs(kv->v.u64 ? "true" : "false", stdout);
        break;
    case KVP_GGUF_STRING:
        print_quoted(kv->v.str, INFO_STR_MAX);
        break;
    default:
        break;
    }
}

static void print_array(const kvp_gguf_kv_t *kv) {
    kvp_gguf_vtype_t e = kv->v.arr.elem_type;
    uint64_t n = kv->v.arr.count;
    if (e == KVP_GGUF_ARRAY) {
        fputs("(nested arrays: not shown)", stdout);
        return;
    }
    putchar('[');
    for (uint64_t i = 0; i < n && i < INFO_ARR_SHOWN; i++) {
        if (i) fputs(", ", stdout);
        if (e == KVP_GGUF_STRING)
            print_quoted(kv->v.arr.strs[i], INFO_ELEM_STR_MAX);
        else if (e == KVP_GGUF_F32)
            print_f32((float)kvp_gguf_arr_f64(kv, i));
        else if (e == KVP_GGUF_F64)
            print_f64(kvp_gguf_arr_f64(kv, i));
        else if (e == KVP_GGUF_BOOL)
            fputs(kvp_gguf_arr_i64(kv, i) ? "true" : "false", stdout);
        else if (e == KVP_GGUF_U64)
            printf("%" PRIu64, (uint64_t)kvp_gguf_arr_i64(kv, i));
        else
            printf("%" PRId64, kvp_gguf_arr_i64(kv, i));
    }
    if (n > INFO_ARR_SHOWN) printf(", ... (%" PRIu64 " more)", n - INFO_ARR_SHOWN);
    putchar(']');
}

/* 1234567 -> "1.23 M": for the totals line only. */
static const char *human(double v, const char *const *units, double step, char *buf, size_t cap) {
    int u = 0;
    while (v >= step && units[u + 1]) {
        v /= step;
        u++;
    }
    snprintf(buf, cap, u ? "%.2f %s" : "%.0f%s", v, units[u]);
    return buf;
}

static void print_kvs(const kvp_gguf_t *g) {
    uint64_t n = kvp_gguf_n_kv(g);
    int width = 8;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t len = kvp_gguf_kv_at(g, i)->key.len;
        if (len > (uint64_t)width) width = len > 48 ? 48 : (int)len;
    }
    printf("\nmetadata: %" PRIu64 " pairs\n", n);
    for (uint64_t i = 0; i < n; i++) {
        const kvp_gguf_kv_t *kv = kvp_gguf_kv_at(g, i);
        char type[48];
        if (kv->type == KVP_GGUF_ARRAY)
            snprintf(type, sizeof type, "%s[%" PRIu64 "]", kvp_gguf_vtype_name(kv->v.arr.elem_type),
                     kv->v.arr.count);
        else
            snprintf(type, sizeof type, "%s", kvp_gguf_vtype_name(kv->type));
        fputs("  ", stdout);
        print_name(kv->key, width);
        printf("  %-16s ", type);
        if (kv->type == KVP_GGUF_ARRAY)
            print_array(kv);
        else
            print_scalar(kv);
        putchar('\n');
    }
}

static void print_tensors(const kvp_gguf_t *g) {
    uint64_t n = kvp_gguf_n_tensors(g), params = 0, bytes = 0;
    int width = 4;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t len = kvp_gguf_tensor_at(g, i)->name.len;
        if (len > (uint64_t)width) width = len > 48 ? 48 : (int)len;
    }
    printf("\ntensors: %" PRIu64 "\n", n);
    if (n)
        printf("  %5s  %-*s  %-5s  %-24s %14s %14s\n", "#", width, "name", "type", "shape",
               "offset", "bytes");
    for (uint64_t i = 0; i < n; i++) {
        const kvp_gguf_tensor_t *t = kvp_gguf_tensor_at(g, i);
        char shape[128];
        size_t o = (size_t)snprintf(shape, sizeof shape, "[");
        for (uint32_t d = 0; d < t->n_dims; d++)
            o += (size_t)snprintf(shape + o, sizeof shape - o, "%s%" PRIu64, d ? ", " : "",
                                  t->ne[d]);
        snprintf(shape + o, sizeof shape - o, "]");
        printf("  %5" PRIu64 "  ", i);
        print_name(t->name, width);
        printf("  %-5s  %-24s %14" PRIu64 " %14" PRIu64 "\n", kvp_ggml_type_name(t->type), shape,
               t->offset, t->nbytes);
        params += t->n_elems;
        bytes += t->nbytes;
    }
    static const char *const count_units[] = {"", "K", "M", "B", "T", NULL};
    static const char *const byte_units[] = {" B", "KiB", "MiB", "GiB", "TiB", NULL};
    char hp[32], hb[32];
    printf("\ntotal: %" PRIu64 " tensors, %" PRIu64 " parameters", n, params);
    if (params >= 1000) printf(" (%s)", human((double)params, count_units, 1000, hp, sizeof hp));
    printf(", %" PRIu64 " bytes of tensor data", bytes);
    if (bytes >= 1024) printf(" (%s)", human((double)bytes, byte_units, 1024, hb, sizeof hb));
    putchar('\n');
}

int kvp_cmd_info(int argc, char **argv) {
    const char *path = NULL;
    bool options = true; /* until "--" */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (options && !strcmp(a, "--")) {
            options = false;
            continue;
        }
        if (options && (!strcmp(a, "-h") || !strcmp(a, "--help"))) {
            usage(stdout);
            return 0;
        }
        if (options && a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "kvpred info: unknown option '%s' (see kvpred info --help)\n", a);
            return 2;
        }
        if (path) {
            fprintf(stderr,
                    "kvpred info: one file at a time (got '%s' and '%s'; see kvpred info --help)\n",
                    path, a);
            return 2;
        }
        path = a;
    }
    if (!path) {
        usage(stderr);
        return 2;
    }

    kvp_gguf_t *g = NULL;
    kvp_err_t err = {0};
    if (kvp_gguf_open(&g, path, &err) != 0) {
        fprintf(stderr, "kvpred info: %s\n", err.msg);
        return 1;
    }
    printf("file:      %s\n", kvp_gguf_path(g));
    printf("size:      %" PRIu64 " bytes\n", kvp_gguf_file_size(g));
    printf("version:   %" PRIu32 "\n", kvp_gguf_version(g));
    printf("alignment: %" PRIu32 "\n", kvp_gguf_alignment(g));
    printf("data at:   offset %" PRIu64 "%s\n", kvp_gguf_data_offset(g),
           kvp_gguf_data_offset(g) >= kvp_gguf_file_size(g) ? " (end of file: no tensor data)"
                                                            : "");
    print_kvs(g);
    print_tensors(g);
    kvp_gguf_free(&g);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "kvpred info: error writing the output\n");
        return 1;
    }
    return 0;
}
