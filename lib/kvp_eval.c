/* kvp_eval: scorers, the HumanEval-like extractor, cache-quality sums, TTFT
 * FLOPs of each method and the test data. The runner is in kvp_eval_run.c,
 * the CSV files and tables in kvp_eval_report.c. */
#include "kvp_eval.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_kvpgen.h"
#include "kvp_rng.h"

/* ---- scoring ---------------------------------------------------------- */

double kvp_eval_token_accuracy(const int32_t *gen, const int32_t *truth, int k) {
    if (k <= 0) return 0.0;
    int hit = 0;
    for (int i = 0; i < k; i++)
        hit += gen[i] == truth[i];
    return (double)hit / k;
}

double kvp_eval_log_prob(const float *logits, int n, int32_t target) {
    float mx = logits[0];
    for (int i = 1; i < n; i++)
        if (logits[i] > mx) mx = logits[i];
    double s = 0.0;
    for (int i = 0; i < n; i++)
        s += exp((double)logits[i] - mx);
    return (double)logits[target] - mx - log(s);
}

static void append(char *out, size_t cap, size_t *o, const char *s, size_t n) {
    for (size_t i = 0; i < n && *o + 1 < cap; i++)
        out[(*o)++] = s[i];
    if (cap) out[*o] = 0;
}

int kvp_eval_first_lines(const char *text, size_t len, int n_lines, bool final, char *out,
                         size_t cap) {
    size_t o = 0;
    int found = 0;
    if (cap) out[0] = 0;
    for (size_t i = 0; i < len && found < n_lines;) {
        size_t e = i;
        while (e < len && text[e] != '\n')
            e++;
        if (e == len && !final) break; /* the line may go on */
        size_t a = i, b = e;
        while (a < b && isspace((unsigned char)text[a]))
            a++;
        while (b > a && isspace((unsigned char)text[b - 1]))
            b--;
        if (b > a) {
            if (found) append(out, cap, &o, "\n", 1);
            append(out, cap, &o, text + a, b - a);
            found++;
        }
        i = e + 1;
    }
    return found;
}

/* ---- HumanEval-like items ------------------------------------------------ */

typedef struct line {
    size_t b, e; /* [b, e): without the newline */
    size_t s;    /* first non-blank character (== e for a blank line) */
} line_t;

static int split_lines(const char *t, size_t len, line_t **out, size_t *n_out) {
    size_t n = 0, cap = 256;
    line_t *L = malloc(cap * sizeof *L);
    if (!L) return KVP_ENOMEM;
    for (size_t i = 0; i < len;) {
        size_t e = i;
        while (e < len && t[e] != '\n')
            e++;
        if (n == cap) {
            line_t *nl = realloc(L, 2 * cap * sizeof *L);
            if (!nl) return free(L), KVP_ENOMEM;
            L = nl, cap *= 2;
        }
        size_t s = i;
        while (s < e && (t[s] == ' ' || t[s] == '\t' || t[s] == '\r' || t[s] == '\f'))
            s++;
        L[n++] = (line_t){i, e, s};
        i = e + 1;
    }
    *out = L;
    *n_out = n;
    return KVP_OK;
}

static bool starts(const char *t, size_t at, size_t end, const char *w) {
    size_t n = strlen(w);
    return end - at >= n && !memcmp(t + at, w, n);
}

/* The line that ends the signature starting at line i (brackets balanced and
 * the line's code ends in ':'), or (size_t)-1. Strings on one line are
 * skipped; comments end the line's code. */
static size_t signature_end(const char *t, const line_t *L, size_t n, size_t i) {
    int depth = 0;
    for (size_t j = i; j < n && j < i + 20; j++) {
        size_t code_end = L[j].s; /* one past the last code character */
        for (size_t k = L[j].s; k < L[j].e; k++) {
            char c = t[k];
            if (c == '#') break;
            if (c == '"' || c == '\'') {
                size_t q = k + 1;
                while (q < L[j].e && t[q] != c)
                    q += t[q] == '\\' ? 2 : 1;
                k = q < L[j].e ? q : L[j].e;
                code_end = k + 1;
                continue;
            }
            if (c == '(' || c == '[' || c == '{') depth++;
            if (c == ')' || c == ']' || c == '}') depth--;
            if (depth < 0) return (size_t)-1;
            if (!isspace((unsigned char)c)) code_end = k + 1;
        }
        if (depth == 0 && code_end > L[j].s && t[code_end - 1] == ':') return j;
    }
    return (size_t)-1;
}

/* Where a docstring opening at line k ends: the index of its closing line, or
 * (size_t)-1 when line k opens none or the closing quotes are not the end of
 * their line. */
static size_t docstring_end(const char *t, const line_t *L, size_t n, size_t k) {
    size_t p = L[k].s, e = L[k].e;
    for (int i = 0; i < 2 && p < e && strchr("rRuUbB", t[p]); i++)
        p++;
    const char *q;
    if (starts(t, p, e, "\"\"\""))
        q = "\"\"\"";
    else if (starts(t, p, e, "'''"))
        q = "'''";
    else
        return (size_t)-1;
    p += 3; /* the closing quotes are searched from here on */
    for (size_t j = k; j < n && j < k + 400; j++) {
        for (size_t a = j == k ? p : L[j].b; a + 3 <= L[j].e; a++) {
            if (t[a] == '\\') {
                a++;
                continue;
            }
            if (!memcmp(t + a, q, 3)) {
                size_t r = a + 3;
                while (r < L[j].e && isspace((unsigned char)t[r]))
                    r++;
                return r == L[j].e ? j : (size_t)-1;
            }
        }
    }
    return (size_t)-1;
}

static int item_add(kvp_eval_he_item_t **items, size_t *n, size_t *cap, kvp_eval_he_item_t it) {
    if (*n == *cap) {
        size_t nc = *cap ? 2 * *cap : 16;
        kvp_eval_he_item_t *ni = realloc(*items, nc * sizeof *ni);
        if (!ni) return KVP_ENOMEM;
        *items = ni, *cap = nc;
    }
    (*items)[(*n)++] = it;
    return KVP_OK;
}

/* The item for a def at line i, if it is one: 1 = made, 0 = not an item. */
static int he_item_at(const char *t, size_t len, const line_t *L, size_t n, size_t i, int n_lines,
                      kvp_eval_he_item_t *it) {
    size_t s = L[i].s, e = L[i].e, indent = s - L[i].b;
    if (starts(t, s, e, "async ")) {
        s += 6;
        while (s < e && t[s] == ' ')
            s++;
    }
    if (!starts(t, s, e, "def ")) return 0;
    size_t nb = s + 4, ne;
    while (nb < e && t[nb] == ' ')
        nb++;
    for (ne = nb; ne < e && (isalnum((unsigned char)t[ne]) || t[ne] == '_'); ne++)
        ;
    if (ne == nb) return 0;
    size_t j = signature_end(t, L, n, i);
    if (j == (size_t)-1 || j + 1 >= n) return 0;
    size_t d = docstring_end(t, L, n, j + 1);
    if (d == (size_t)-1 || L[d].e >= len) return 0; /* no newline after it: no body */
    /* the body's first n_lines non-empty lines, all deeper than the def */
    int got = 0;
    for (size_t b = d + 1; b < n && got < n_lines; b++) {
        if (L[b].s == L[b].e) continue;
        if (L[b].s - L[b].b <= indent) break;
        got++;
    }
    if (got < n_lines) return 0;
    size_t body = L[d].e + 1, cap = len - body + 1;
    it->begin = L[i].b;
    it->end = body;
    it->name = malloc(ne - nb + 1);
    it->target = malloc(cap);
    if (!it->name || !it->target) {
        free(it->name), free(it->target);
        return KVP_ENOMEM;
    }
    memcpy(it->name, t + nb, ne - nb);
    it->name[ne - nb] = 0;
    kvp_eval_first_lines(t + body, len - body, n_lines, true, it->target, cap);
    return 1;
}

int kvp_eval_he_extract(const char *text, size_t len, int n_lines, kvp_eval_he_item_t **items,
                        size_t *n_items, kvp_err_t *err) {
    *items = NULL;
    *n_items = 0;
    if (n_lines < 1) return kvp_err_set(err, KVP_EINVAL, "humaneval: n_lines %d < 1", n_lines);
    line_t *L;
    size_t n, cap = 0;
    if (split_lines(text, len, &L, &n)) return kvp_err_set(err, KVP_ENOMEM, "out of memory");
    int rc = KVP_OK;
    for (size_t i = 0; i < n && !rc; i++) {
        kvp_eval_he_item_t it;
        int r = he_item_at(text, len, L, n, i, n_lines, &it);
        if (r < 0) rc = r;
        if (r == 1 && (rc = item_add(items, n_items, &cap, it))) {
            free(it.name);
            free(it.target);
        }
    }
    free(L);
    if (rc) {
        kvp_eval_he_items_free(items, *n_items);
        *n_items = 0;
        return kvp_err_set(err, KVP_ENOMEM, "humaneval: out of memory");
    }
    return KVP_OK;
}

void kvp_eval_he_items_free(kvp_eval_he_item_t **items, size_t n) {
    if (!items || !*items) return;
    for (size_t i = 0; i < n; i++) {
        free((*items)[i].name);
        free((*items)[i].target);
    }
    free(*items);
    *items = NULL;
}

/* ---- cache quality --------------------------------------------------------- */

void kvp_eval_cq_add(kvp_eval_cq_t *q, const float *pred, const float *truth, size_t n_vec,
                     int dim) {
    for (size_t r = 0; r < n_vec; r++) {
        const float *a = pred + r * dim, *b = truth + r * dim;
        double dot = 0, na = 0, nb = 0;
        for (int i = 0; i < dim; i++) {
            q->l1_diff += fabs((double)a[i] - b[i]);
            q->l1_true += fabs((double)b[i]);
            dot += (double)a[i] * b[i];
            na += (double)a[i] * a[i];
            nb += (double)b[i] * b[i];
        }
        if (na > 0 && nb > 0) q->cos_sum += dot / sqrt(na * nb), q->n_cos++;
    }
}

void kvp_eval_cq_merge(kvp_eval_cq_t *into, const kvp_eval_cq_t *q) {
    into->l1_diff += q->l1_diff;
    into->l1_true += q->l1_true;
    into->cos_sum += q->cos_sum;
    into->n_cos += q->n_cos;
}

double kvp_eval_cq_cos(const kvp_eval_cq_t *q) {
    return q->n_cos ? q->cos_sum / (double)q->n_cos : NAN;
}

double kvp_eval_cq_rel_l1(const kvp_eval_cq_t *q) {
    return q->l1_true > 0 ? q->l1_diff / q->l1_true : NAN;
}

/* ---- methods ------------------------------------------------------------------ */

double kvp_eval_ttft_flops(const kvp_eval_method_t *m, const kvp_model_t *base, int n) {
    switch (m->kind) {
    case KVP_EVAL_BASE:
        return kvp_model_flops(&base->cfg, 0, n);
    case KVP_EVAL_ALONE:
        return kvp_model_flops(&m->model->cfg, 0, n);
    case KVP_EVAL_KVP:
        return kvp_kvp_ttft_flops(&m->model->cfg, &base->cfg, m->pred, n);
    }
    return NAN;
}

/* ---- the test data -------------------------------------------------------------- */

void kvp_eval_opts_default(kvp_eval_opts_t *o) {
    *o = (kvp_eval_opts_t){.prompt_len = 192,
                           .n_cont = 16,
                           .n_prompts = 200,
                           .seed = 1,
                           .he_max = 200,
                           .he_lines = 1,
                           .he_max_prompt = 192,
                           .he_max_gen = 64,
                           .cq_prompts = 32,
                           .pos_bucket = 16,
                           .ttft_reps = 3,
                           .chunk = 512};
}

typedef struct file_tok {
    int32_t *tok;
    size_t n;
} file_tok_t;

typedef struct he_cand {
    int32_t *tok;
    int len;
    char *target;
} he_cand_t;

typedef struct builder {
    file_tok_t *files;
    size_t n_files;
    he_cand_t *he;
    size_t n_he, cap_he;
} builder_t;

static void builder_free(builder_t *b) {
    for (size_t i = 0; i < b->n_files; i++)
        free(b->files[i].tok);
    for (size_t i = 0; i < b->n_he; i++)
        free(b->he[i].tok), free(b->he[i].target);
    free(b->files);
    free(b->he);
}

/* The file's HumanEval-like items, tokenized with BOS; those too long counted. */
static int add_he(builder_t *b, kvp_eval_data_t *d, const char *text, size_t len,
                  const kvp_tokenizer_t *tok, const kvp_eval_opts_t *o, kvp_err_t *err) {
    kvp_eval_he_item_t *items;
    size_t n;
    int rc = kvp_eval_he_extract(text, len, o->he_lines, &items, &n, err);
    int32_t bos = kvp_tokenizer_bos(tok);
    for (size_t i = 0; !rc && i < n; i++) {
        int32_t *t = NULL;
        size_t nt = 0;
        rc = kvp_tokenizer_encode(tok, text + items[i].begin, items[i].end - items[i].begin, false,
                                  &t, &nt, err);
        if (rc) break;
        size_t total = nt + (bos >= 0);
        d->n_he_found++;
        if (total > (size_t)o->he_max_prompt || total == 0) {
            d->n_he_long++;
            free(t);
            continue;
        }
        if (b->n_he == b->cap_he) {
            size_t nc = b->cap_he ? 2 * b->cap_he : 64;
            he_cand_t *nh = realloc(b->he, nc * sizeof *nh);
            if (!nh) {
                free(t);
                rc = kvp_err_set(err, KVP_ENOMEM, "out of memory");
                break;
            }
            b->he = nh, b->cap_he = nc;
        }
        int32_t *pt = malloc(sizeof(int32_t) * total);
        char *tg = strdup(items[i].target);
        if (!pt || !tg) {
            free(t), free(pt), free(tg);
            rc = kvp_err_set(err, KVP_ENOMEM, "out of memory");
            break;
        }
        size_t k = 0;
        if (bos >= 0) pt[k++] = bos;
        if (nt) memcpy(pt + k, t, nt * sizeof *t);
        free(t);
        b->he[b->n_he++] = (he_cand_t){pt, (int)total, tg};
    }
    kvp_eval_he_items_free(&items, n);
    return rc;
}

static int read_test_files(builder_t *b, kvp_eval_data_t *d, const kvp_corpus_t *c,
                           const kvp_tokenizer_t *tok, const kvp_eval_opts_t *o, kvp_err_t *err) {
    size_t nf = kvp_corpus_split_files(c, KVP_SPLIT_TEST);
    b->files = calloc(nf ? nf : 1, sizeof *b->files);
    if (!b->files) return kvp_err_set(err, KVP_ENOMEM, "out of memory");
    int rc = KVP_OK;
    for (size_t i = 0; !rc && i < kvp_corpus_n_files(c); i++) {
        const kvp_corpus_file_t *f = kvp_corpus_file(c, i);
        if (f->split != KVP_SPLIT_TEST) continue;
        char *text;
        size_t len;
        if ((rc = kvp_corpus_read_file(f->path, &text, &len, err))) break;
        file_tok_t *ft = &b->files[b->n_files++];
        rc = kvp_tokenizer_encode(tok, text, len, false, &ft->tok, &ft->n, err);
        if (rc) kvp_err_wrap(err, "%s", f->path);
        if (!rc) rc = add_he(b, d, text, len, tok, o, err);
        d->test_tokens += ft->n;
        free(text);
    }
    d->n_test_files = b->n_files;
    return rc;
}

/* N prompts at positions drawn uniformly over every start that leaves room
 * for the prompt and its continuation in one file. */
static int cut_prompts(const builder_t *b, kvp_eval_data_t *d, int32_t bos, uint64_t seed,
                       kvp_err_t *err) {
    size_t nb = bos >= 0, need = (size_t)d->P - nb + (size_t)d->K;
    uint64_t total = 0;
    for (size_t i = 0; i < b->n_files; i++)
        if (b->files[i].n >= need) total += b->files[i].n - need + 1;
    if (total == 0)
        return kvp_err_set(err, KVP_EINVAL,
                           "no test file holds %zu tokens (prompt %d + continuation %d)", need,
                           d->P, d->K);
    d->prompts = malloc(sizeof(int32_t) * (size_t)d->n_prompts * d->P);
    d->truth = malloc(sizeof(int32_t) * (size_t)d->n_prompts * d->K);
    if (!d->prompts || !d->truth) return kvp_err_set(err, KVP_ENOMEM, "out of memory");
    kvp_rng_t rng;
    kvp_rng_seed(&rng, seed);
    for (int p = 0; p < d->n_prompts; p++) {
        uint64_t r = kvp_rng_below(&rng, total);
        size_t f = 0;
        for (;; f++) {
            if (b->files[f].n < need) continue;
            uint64_t starts = b->files[f].n - need + 1;
            if (r < starts) break;
            r -= starts;
        }
        const int32_t *src = b->files[f].tok + r;
        int32_t *pr = d->prompts + (size_t)p * d->P;
        size_t k = 0;
        if (bos >= 0) pr[k++] = bos;
        memcpy(pr + k, src, sizeof(int32_t) * ((size_t)d->P - k));
        memcpy(d->truth + (size_t)p * d->K, src + (d->P - k), sizeof(int32_t) * (size_t)d->K);
    }
    return KVP_OK;
}

/* At most he_max items, evenly spread over those found (in file order). */
static int pick_he(builder_t *b, kvp_eval_data_t *d, int he_max, kvp_err_t *err) {
    size_t n = b->n_he < (size_t)he_max ? b->n_he : (size_t)he_max;
    d->n_he = (int)n;
    if (!n) return KVP_OK;
    d->he_tok = calloc(n, sizeof *d->he_tok);
    d->he_len = calloc(n, sizeof *d->he_len);
    d->he_target = calloc(n, sizeof *d->he_target);
    if (!d->he_tok || !d->he_len || !d->he_target)
        return kvp_err_set(err, KVP_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        he_cand_t *c = &b->he[i * b->n_he / n];
        d->he_tok[i] = c->tok, d->he_len[i] = c->len, d->he_target[i] = c->target;
        c->tok = NULL, c->target = NULL; /* moved */
    }
    return KVP_OK;
}

int kvp_eval_data_build(kvp_eval_data_t *d, const kvp_corpus_t *c, const kvp_tokenizer_t *tok,
                        const kvp_eval_opts_t *o, kvp_err_t *err) {
    memset(d, 0, sizeof *d);
    if (o->prompt_len < 2 || o->n_cont < 1 || o->n_prompts < 1)
        return kvp_err_set(err, KVP_EINVAL,
                           "eval: prompt length %d (>= 2), continuation %d and prompts %d (>= 1)",
                           o->prompt_len, o->n_cont, o->n_prompts);
    d->P = o->prompt_len, d->K = o->n_cont, d->n_prompts = o->n_prompts;
    builder_t b = {0};
    int rc = read_test_files(&b, d, c, tok, o, err);
    if (!rc) rc = cut_prompts(&b, d, kvp_tokenizer_bos(tok), o->seed, err);
    if (!rc) rc = pick_he(&b, d, o->he_max, err);
    builder_free(&b);
    if (rc) kvp_eval_data_free(d);
    return rc;
}

void kvp_eval_data_free(kvp_eval_data_t *d) {
    free(d->prompts);
    free(d->truth);
    for (int i = 0; i < d->n_he; i++) {
        if (d->he_tok) free(d->he_tok[i]);
        if (d->he_target) free(d->he_target[i]);
    }
    free(d->he_tok);
    free(d->he_len);
    free(d->he_target);
    memset(d, 0, sizeof *d);
}
