/* kvp_predictor_fit: the closed-form ridge fit of the KV predictor from
 * streamed sums (see kvp_predictor.h).
 *
 * Per aux layer j and per K/V, one `sums_t` holds, over every row added:
 *   A = X^T X      [d_in+1][d_in+1]  (upper triangle; last column = bias 1s)
 *   B = X^T Y      [d_in+1][d_y]     Y = the rows of every base layer fed by
 *                                    j, side by side (d_y = members * d_out)
 *   ysq[c] = sum of Y[:, c]^2
 * in double. A calibration and a validation copy of each. Solving with
 * lambda gives S = (A + lambda' I_features)^-1 B, whose column c holds one
 * output's weights (rows 0..d_in-1) and bias (row d_in); on validation sums
 * its squared error is S_c^T A S_c - 2 S_c^T B_c + ysq[c]. */
#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_predictor.h"

#define BLOCK_ROWS 256 /* rows converted to double at a time */

typedef struct sums {
    double *a, *b, *ysq;
} sums_t;

typedef struct group {
    int aux_layer;
    int n_members;
    int *members;   /* base layers fed by aux_layer, ascending */
    sums_t s[2][2]; /* [calibration / validation][K / V] */
} group_t;

struct kvp_predictor_fit {
    kvp_kv_shape_t aux, base;
    int d_in, d_out, d_in1, max_dy;
    int32_t *layer_map;
    int n_groups;
    group_t *groups;
    double *xd, *yd; /* [BLOCK_ROWS][d_in1], [BLOCK_ROWS][max_dy] */
    uint64_t rows[2];
};

/* ---- set-up ----------------------------------------------------------- */

static void group_free(group_t *g) {
    free(g->members);
    for (int i = 0; i < 4; i++) {
        sums_t *s = &g->s[i / 2][i % 2];
        free(s->a);
        free(s->b);
        free(s->ysq);
    }
}

void kvp_predictor_fit_free(kvp_predictor_fit_t **f) {
    if (!f || !*f) return;
    for (int i = 0; i < (*f)->n_groups; i++)
        group_free(&(*f)->groups[i]);
    free((*f)->groups);
    free((*f)->layer_map);
    free((*f)->xd);
    free((*f)->yd);
    free(*f);
    *f = NULL;
}

static int group_init(kvp_predictor_fit_t *f, group_t *g, int aux_layer) {
    g->aux_layer = aux_layer;
    g->members = malloc(sizeof(int) * (size_t)f->base.n_layer);
    if (!g->members) return -1;
    for (int l = 0; l < f->base.n_layer; l++)
        if (f->layer_map[l] == aux_layer) g->members[g->n_members++] = l;
    size_t d1 = (size_t)f->d_in1, dy = (size_t)g->n_members * f->d_out;
    for (int i = 0; i < 4; i++) {
        sums_t *s = &g->s[i / 2][i % 2];
        s->a = calloc(d1 * d1, sizeof(double));
        s->b = calloc(d1 * dy, sizeof(double));
        s->ysq = calloc(dy, sizeof(double));
        if (!s->a || !s->b || !s->ysq) return -1;
    }
    if ((int)dy > f->max_dy) f->max_dy = (int)dy;
    return 0;
}

/* One group per aux layer that feeds at least one base layer. */
static int make_groups(kvp_predictor_fit_t *f) {
    f->groups = calloc((size_t)f->aux.n_layer, sizeof *f->groups);
    if (!f->groups) return -1;
    for (int a = 0; a < f->aux.n_layer; a++) {
        int used = 0;
        for (int l = 0; l < f->base.n_layer; l++)
            used |= f->layer_map[l] == a;
        if (!used) continue;
        if (group_init(f, &f->groups[f->n_groups++], a)) return -1;
    }
    return 0;
}

int kvp_predictor_fit_new(kvp_predictor_fit_t **out, kvp_kv_shape_t aux, kvp_kv_shape_t base,
                          const int32_t *layer_map, kvp_err_t *err) {
    *out = NULL;
    /* a zero predictor validates the shapes and the map and fills the default */
    kvp_predictor_t *probe;
    int rc = kvp_predictor_new(&probe, aux, base, layer_map, err);
    if (rc) return rc;
    kvp_predictor_fit_t *f = calloc(1, sizeof *f);
    if (f) {
        *f = (kvp_predictor_fit_t){.aux = aux,
                                   .base = base,
                                   .d_in = probe->d_in,
                                   .d_out = probe->d_out,
                                   .d_in1 = probe->d_in + 1};
        f->layer_map = malloc(sizeof(int32_t) * (size_t)base.n_layer);
    }
    if (f && f->layer_map)
        memcpy(f->layer_map, probe->layer_map, sizeof(int32_t) * (size_t)base.n_layer);
    kvp_predictor_free(&probe);
    if (!f || !f->layer_map || make_groups(f) ||
        !(f->xd = malloc(sizeof(double) * BLOCK_ROWS * (size_t)f->d_in1)) ||
        !(f->yd = malloc(sizeof(double) * BLOCK_ROWS * (size_t)f->max_dy))) {
        kvp_predictor_fit_free(&f);
        return kvp_err_set(err, KVP_ENOMEM, "predictor fit: out of memory for the sums");
    }
    *out = f;
    return KVP_OK;
}

uint64_t kvp_predictor_fit_rows(const kvp_predictor_fit_t *f, int validation) {
    return f->rows[validation ? 1 : 0];
}

/* ---- accumulating ----------------------------------------------------- */

/* Adds rows [t0, t0+n) of one group's X and Y (K or V) to s. */
static void add_block(kvp_predictor_fit_t *f, const group_t *g, sums_t *s, int t0, int n,
                      const float *x, const float *const *ys) {
    const int d1 = f->d_in1, dy = g->n_members * f->d_out;
    for (int t = 0; t < n; t++) {
        const float *xr = x + (size_t)(t0 + t) * f->d_in;
        double *xo = f->xd + (size_t)t * d1, *yo = f->yd + (size_t)t * dy;
        for (int i = 0; i < f->d_in; i++)
            xo[i] = xr[i];
        xo[f->d_in] = 1.0;
        for (int m = 0; m < g->n_members; m++) {
            const float *yr = ys[g->members[m]] + (size_t)(t0 + t) * f->d_out;
            for (int o = 0; o < f->d_out; o++) {
                double v = yr[o];
                yo[m * f->d_out + o] = v;
                s->ysq[m * f->d_out + o] += v * v;
            }
        }
    }
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, d1, n, 1.0, f->xd, d1, 1.0, s->a, d1);
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d1, dy, n, 1.0, f->xd, d1, f->yd, dy, 1.0,
                s->b, dy);
}

int kvp_predictor_fit_add(kvp_predictor_fit_t *f, int n_tok, const float *const *aux_k,
                          const float *const *aux_v, const float *const *base_k,
                          const float *const *base_v, int validation, kvp_err_t *err) {
    if (n_tok < 0) return kvp_err_set(err, KVP_EINVAL, "predictor fit: %d rows", n_tok);
    int which = validation ? 1 : 0;
    for (int gi = 0; gi < f->n_groups; gi++) {
        group_t *g = &f->groups[gi];
        for (int t0 = 0; t0 < n_tok; t0 += BLOCK_ROWS) {
            int n = n_tok - t0 < BLOCK_ROWS ? n_tok - t0 : BLOCK_ROWS;
            add_block(f, g, &g->s[which][0], t0, n, aux_k[g->aux_layer], base_k);
            add_block(f, g, &g->s[which][1], t0, n, aux_v[g->aux_layer], base_v);
        }
    }
    f->rows[which] += (uint64_t)n_tok;
    return KVP_OK;
}

/* Reads n rows of every layer of a cache into bufs (k then v per layer). */
static int read_layers(const kvp_kvcache_t *c, int pos0, int n, int width, float *buf, float **k,
                       float **v, kvp_err_t *err) {
    for (int l = 0; l < c->n_layer; l++) {
        k[l] = buf + (size_t)(2 * l) * BLOCK_ROWS * width;
        v[l] = k[l] + (size_t)BLOCK_ROWS * width;
        int rc = kvp_kvcache_read(c, l, pos0, n, k[l], v[l], err);
        if (rc) return rc;
    }
    return KVP_OK;
}

int kvp_predictor_fit_add_cache(kvp_predictor_fit_t *f, const kvp_kvcache_t *aux,
                                const kvp_kvcache_t *base, int pos0, int n_tok, int validation,
                                kvp_err_t *err) {
    if (aux->n_layer != f->aux.n_layer || aux->n_kv_head * aux->head_dim != f->d_in ||
        base->n_layer != f->base.n_layer || base->n_kv_head * base->head_dim != f->d_out)
        return kvp_err_set(err, KVP_ESHAPE, "predictor fit: the caches do not match its shapes");
    size_t n_aux = (size_t)2 * aux->n_layer * BLOCK_ROWS * f->d_in;
    size_t n_base = (size_t)2 * base->n_layer * BLOCK_ROWS * f->d_out;
    float *buf = malloc(sizeof(float) * (n_aux + n_base));
    float **ptr = malloc(sizeof(float *) * 2 * (size_t)(aux->n_layer + base->n_layer));
    int rc = buf && ptr ? KVP_OK : kvp_err_set(err, KVP_ENOMEM, "predictor fit: out of memory");
    float **ak = ptr, **av = ak + aux->n_layer, **bk = av + aux->n_layer, **bv = bk + base->n_layer;
    for (int t0 = 0; t0 < n_tok && !rc; t0 += BLOCK_ROWS) {
        int n = n_tok - t0 < BLOCK_ROWS ? n_tok - t0 : BLOCK_ROWS;
        rc = read_layers(aux, pos0 + t0, n, f->d_in, buf, ak, av, err);
        if (!rc) rc = read_layers(base, pos0 + t0, n, f->d_out, buf + n_aux, bk, bv, err);
        if (!rc)
            rc = kvp_predictor_fit_add(f, n, (const float *const *)ak, (const float *const *)av,
                                       (const float *const *)bk, (const float *const *)bv,
                                       validation, err);
    }
    free(buf);
    free(ptr);
    return rc;
}

/* ---- solving ---------------------------------------------------------- */

typedef struct solve_ws {
    double *m, *s, *t, *col_err; /* [d1][d1], [d1][dy], [d1][dy], [dy] */
} solve_ws_t;

/* Mean of the features' diagonal of A (the bias entry excluded). */
static double mean_diag(const double *a, int d_in) {
    double sum = 0;
    for (int i = 0; i < d_in; i++)
        sum += a[(size_t)i * (d_in + 1) + i];
    return sum > 0 ? sum / d_in : 1.0;
}

/* ws->s = ridge solution for absolute lambda; returns LAPACKE's info. */
static int ridge_solve(const sums_t *s, int d_in, int dy, double lambda, solve_ws_t *ws) {
    int d1 = d_in + 1;
    memcpy(ws->m, s->a, sizeof(double) * (size_t)d1 * d1);
    memcpy(ws->s, s->b, sizeof(double) * (size_t)d1 * dy);
    for (int i = 0; i < d_in; i++) /* the bias (index d_in) is not regularised */
        ws->m[(size_t)i * d1 + i] += lambda;
    return LAPACKE_dposv(LAPACK_ROW_MAJOR, 'U', d1, dy, ws->m, d1, ws->s, dy);
}

/* ws->col_err[c] = squared error of column c of ws->s on the sums v. */
static void column_errors(const sums_t *v, int d1, int dy, solve_ws_t *ws) {
    cblas_dsymm(CblasRowMajor, CblasLeft, CblasUpper, d1, dy, 1.0, v->a, d1, ws->s, dy, 0.0, ws->t,
                dy);
    for (int c = 0; c < dy; c++)
        ws->col_err[c] = v->ysq[c];
    for (int i = 0; i < d1; i++) {
        const double *sr = ws->s + (size_t)i * dy, *tr = ws->t + (size_t)i * dy;
        const double *br = v->b + (size_t)i * dy;
        for (int c = 0; c < dy; c++)
            ws->col_err[c] += sr[c] * (tr[c] - 2.0 * br[c]);
    }
}

/* Copies member m's columns of ws->s into w [d_out][d_in] and b [d_out]. */
static void take_member(const solve_ws_t *ws, int m, int d_in, int d_out, int dy, float *w,
                        float *b) {
    for (int o = 0; o < d_out; o++) {
        int c = m * d_out + o;
        for (int i = 0; i < d_in; i++)
            w[(size_t)o * d_in + i] = (float)ws->s[(size_t)i * dy + c];
        b[o] = (float)ws->s[(size_t)d_in * dy + c];
    }
}

typedef struct solve_job {
    const kvp_predictor_fit_t *f;
    const group_t *g;
    int kv; /* 0 = K, 1 = V */
    const double *lambdas;
    int n_lambdas;
    kvp_predictor_t *p;
} solve_job_t;

/* Validation error of member m: sum of its columns' errors. */
static double member_err(const solve_ws_t *ws, const sums_t *v, int m, int d_out, double *ysq) {
    double e = 0, y = 0;
    for (int o = 0; o < d_out; o++) {
        e += ws->col_err[m * d_out + o];
        y += v->ysq[m * d_out + o];
    }
    *ysq = y;
    return e;
}

static void record(const solve_job_t *j, int l, double lambda, double rse) {
    kvp_predictor_fitinfo_t *fi = j->p->fit;
    (j->kv ? fi->lambda_v : fi->lambda_k)[l] = (float)lambda;
    (j->kv ? fi->val_rse_v : fi->val_rse_k)[l] = (float)rse;
}

/* One group, K or V: every lambda, each member keeping its best. */
static int solve_group(const solve_job_t *j, solve_ws_t *ws, kvp_err_t *err) {
    const kvp_predictor_fit_t *f = j->f;
    const group_t *g = j->g;
    const sums_t *cal = &g->s[0][j->kv], *val = &g->s[1][j->kv];
    int dy = g->n_members * f->d_out, have_val = f->rows[1] > 0, solved = 0, bad_info = 0;
    double scale = mean_diag(cal->a, f->d_in), best[KVP_PREDICTOR_MAX_LAYERS];
    for (int li = 0; li < j->n_lambdas; li++) {
        int info = ridge_solve(cal, f->d_in, dy, j->lambdas[li] * scale, ws);
        if (info) {
            bad_info = info;
            continue;
        }
        if (have_val) column_errors(val, f->d_in1, dy, ws);
        for (int m = 0; m < g->n_members; m++) {
            double ysq = 0, e = have_val ? member_err(ws, val, m, f->d_out, &ysq) : NAN;
            if (solved && !(e < best[m])) continue;
            best[m] = e;
            int l = g->members[m];
            const kvp_predictor_layer_t *L = &j->p->layers[l];
            take_member(ws, m, f->d_in, f->d_out, dy, j->kv ? L->v_w : L->k_w,
                        j->kv ? L->v_b : L->k_b);
            record(j, l, j->lambdas[li], ysq > 0 ? e / ysq : (e > 0 ? INFINITY : e));
        }
        solved = 1;
    }
    if (!solved)
        return kvp_err_set(err, KVP_EINVAL,
                           "predictor fit: aux layer %d %s: X^T X + lambda I is not positive "
                           "definite for any lambda (LAPACKE_dposv info %d); use a larger lambda",
                           g->aux_layer, j->kv ? "V" : "K", bad_info);
    return KVP_OK;
}

static int fitinfo_alloc(kvp_predictor_t *p, const kvp_predictor_fit_t *f) {
    kvp_predictor_fitinfo_t *fi = p->fit = calloc(1, sizeof *fi);
    if (!fi) return -1;
    size_t n = (size_t)p->base.n_layer;
    fi->lambda_k = calloc(n, sizeof(float));
    fi->lambda_v = calloc(n, sizeof(float));
    fi->val_rse_k = calloc(n, sizeof(float));
    fi->val_rse_v = calloc(n, sizeof(float));
    fi->train_tokens = f->rows[0];
    fi->val_tokens = f->rows[1];
    return fi->lambda_k && fi->lambda_v && fi->val_rse_k && fi->val_rse_v ? 0 : -1;
}

static int check_lambdas(const kvp_predictor_fit_t *f, const double *lambdas, int n,
                         kvp_err_t *err) {
    if (n < 1) return kvp_err_set(err, KVP_EINVAL, "predictor fit: no lambda given");
    for (int i = 0; i < n; i++)
        if (!(lambdas[i] >= 0) || !isfinite(lambdas[i]))
            return kvp_err_set(err, KVP_EINVAL, "predictor fit: lambda %g is not >= 0", lambdas[i]);
    if (f->rows[0] == 0) return kvp_err_set(err, KVP_EINVAL, "predictor fit: no calibration rows");
    if (n > 1 && f->rows[1] == 0)
        return kvp_err_set(err, KVP_EINVAL,
                           "predictor fit: choosing among %d lambdas needs validation rows", n);
    return KVP_OK;
}

int kvp_predictor_fit_solve(const kvp_predictor_fit_t *f, const double *lambdas, int n_lambdas,
                            kvp_predictor_t **out, kvp_err_t *err) {
    *out = NULL;
    int rc = check_lambdas(f, lambdas, n_lambdas, err);
    if (rc) return rc;
    kvp_predictor_t *p;
    rc = kvp_predictor_new(&p, f->aux, f->base, f->layer_map, err);
    if (rc) return rc;
    size_t d1 = (size_t)f->d_in1, dy = (size_t)f->max_dy;
    solve_ws_t ws = {malloc(sizeof(double) * d1 * d1), malloc(sizeof(double) * d1 * dy),
                     malloc(sizeof(double) * d1 * dy), malloc(sizeof(double) * dy)};
    if (!ws.m || !ws.s || !ws.t || !ws.col_err || fitinfo_alloc(p, f))
        rc = kvp_err_set(err, KVP_ENOMEM, "predictor fit: out of memory for the solve");
    for (int gi = 0; gi < f->n_groups && !rc; gi++)
        for (int kv = 0; kv < 2 && !rc; kv++) {
            solve_job_t j = {f, &f->groups[gi], kv, lambdas, n_lambdas, p};
            rc = solve_group(&j, &ws, err);
        }
    free(ws.m);
    free(ws.s);
    free(ws.t);
    free(ws.col_err);
    if (rc)
        kvp_predictor_free(&p);
    else
        *out = p;
    return rc;
}
