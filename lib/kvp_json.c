#include "kvp_json.h"

#include <math.h>

static void sep(kvp_json_t *j) {
    if (j->n++) fputc(',', j->f);
}

static void put_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

static void key(kvp_json_t *j, const char *k) {
    sep(j);
    put_string(j->f, k);
    fputc(':', j->f);
}

void kvp_json_begin(kvp_json_t *j, FILE *f) {
    j->f = f;
    j->n = 0;
    j->depth = 1;
    fputc('{', f);
}

void kvp_json_num(kvp_json_t *j, const char *k, double v) {
    key(j, k);
    if (isfinite(v))
        fprintf(j->f, "%.6g", v);
    else
        fputs("null", j->f);
}

void kvp_json_int(kvp_json_t *j, const char *k, long long v) {
    key(j, k);
    fprintf(j->f, "%lld", v);
}

void kvp_json_str(kvp_json_t *j, const char *k, const char *v) {
    key(j, k);
    put_string(j->f, v);
}

void kvp_json_obj(kvp_json_t *j, const char *k) {
    key(j, k);
    fputc('{', j->f);
    j->n = 0;
    j->depth++;
}

void kvp_json_arr(kvp_json_t *j, const char *k) {
    key(j, k);
    fputc('[', j->f);
    j->n = 0;
    j->depth++;
}

void kvp_json_item_obj(kvp_json_t *j) {
    sep(j);
    fputc('{', j->f);
    j->n = 0;
    j->depth++;
}

void kvp_json_close_obj(kvp_json_t *j) {
    fputc('}', j->f);
    j->n = 1;
    j->depth--;
}

void kvp_json_close_arr(kvp_json_t *j) {
    fputc(']', j->f);
    j->n = 1;
    j->depth--;
}

void kvp_json_end(kvp_json_t *j) {
    fputs("}\n", j->f);
}
