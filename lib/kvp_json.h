/* kvp_json: a tiny writer for the flat JSON objects that `--json FILE` of
 * every benchmark produces (one object, keys in the order written). */
#ifndef KVP_JSON_H
#define KVP_JSON_H

#include <stdio.h>

typedef struct kvp_json {
    FILE *f;
    int n; /* fields written at the current level */
    int depth;
} kvp_json_t;

void kvp_json_begin(kvp_json_t *j, FILE *f); /* { */
void kvp_json_num(kvp_json_t *j, const char *key, double v);
void kvp_json_int(kvp_json_t *j, const char *key, long long v);
void kvp_json_str(kvp_json_t *j, const char *key, const char *v);
void kvp_json_obj(kvp_json_t *j, const char *key); /* "key": { */
void kvp_json_arr(kvp_json_t *j, const char *key); /* "key": [ */
void kvp_json_item_obj(kvp_json_t *j);             /* { inside an array */
void kvp_json_close_obj(kvp_json_t *j);            /* } */
void kvp_json_close_arr(kvp_json_t *j);            /* ] */
void kvp_json_end(kvp_json_t *j);                  /* }\n */

#endif
