/* kvp_eval_report: the evaluation's CSV files, its terminal table and the
 * reading against the goals (kvp_eval.h). */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_eval.h"

static const char *kind_name(kvp_eval_kind_t k) {
    return k == KVP_EVAL_BASE ? "base" : k == KVP_EVAL_ALONE ? "alone" : "kvp";
}

/* A number, or an empty field for NaN. */
static void put_num(FILE *f, double v) {
    if (isfinite(v))
        fprintf(f, ",%.6g", v);
    else
        fputc(',', f);
}

/* Sums of a KVP result's cache quality over layers [l0, l1) and buckets
 * [b0, b1): q[0] K, q[1] V. */
static void cq_sum(const kvp_eval_result_t *r, int l0, int l1, int b0, int b1, kvp_eval_cq_t q[2]) {
    memset(q, 0, 2 * sizeof *q);
    for (int l = l0; l < l1; l++)
        for (int b = b0; b < b1; b++)
            for (int k = 0; k < 2; k++)
                kvp_eval_cq_merge(&q[k], &r->cq[((size_t)l * r->n_bucket + b) * 2 + k]);
}

static FILE *open_out(const char *path, kvp_err_t *err) {
    FILE *f = fopen(path, "w");
    if (!f) kvp_err_set(err, KVP_EIO, "cannot write %s: %s", path, strerror(errno));
    return f;
}

static int close_out(FILE *f, const char *path, kvp_err_t *err) {
    int bad = ferror(f);
    if (fclose(f) || bad) return kvp_err_set(err, KVP_EIO, "writing %s failed", path);
    return KVP_OK;
}

int kvp_eval_write_csv(const char *path, const kvp_eval_method_t *m, const kvp_eval_result_t *r,
                       int n, double base_flops, kvp_err_t *err) {
    FILE *f = open_out(path, err);
    if (!f) return KVP_EIO;
    fputs("method,family,kind,ttft_flops,flops_vs_base,ttft_ms,continuation_acc,first_token_acc,"
          "base_loglik,decode_loglik,first_token_loglik,humaneval_exact,humaneval_agree,n_prompts,"
          "n_humaneval,cos_k,"
          "rel_l1_k,"
          "cos_v,rel_l1_v\n",
          f);
    for (int i = 0; i < n; i++) {
        fprintf(f, "\"%s\",\"%s\",%s,%.6g", m[i].name, m[i].family, kind_name(m[i].kind),
                r[i].flops);
        put_num(f, r[i].flops / base_flops);
        put_num(f, r[i].ttft_ms);
        put_num(f, r[i].acc);
        put_num(f, r[i].first_acc);
        put_num(f, r[i].loglik);
        put_num(f, r[i].decode_loglik);
        put_num(f, r[i].first_loglik);
        put_num(f, r[i].he_exact);
        put_num(f, r[i].he_agree);
        fprintf(f, ",%d,%d", r[i].n_prompts, r[i].n_he);
        kvp_eval_cq_t q[2] = {{0}};
        if (r[i].cq) cq_sum(&r[i], 0, r[i].n_layer, 0, r[i].n_bucket, q);
        put_num(f, r[i].cq ? kvp_eval_cq_cos(&q[0]) : NAN);
        put_num(f, r[i].cq ? kvp_eval_cq_rel_l1(&q[0]) : NAN);
        put_num(f, r[i].cq ? kvp_eval_cq_cos(&q[1]) : NAN);
        put_num(f, r[i].cq ? kvp_eval_cq_rel_l1(&q[1]) : NAN);
        fputc('\n', f);
    }
    return close_out(f, path, err);
}

static void cq_row(FILE *f, const char *name, const char *layer, const char *pos, int pos_hi,
                   const kvp_eval_cq_t q[2]) {
    fprintf(f, "\"%s\",%s,%s,", name, layer, pos);
    if (pos_hi >= 0)
        fprintf(f, "%d", pos_hi);
    else
        fputs("all", f);
    put_num(f, kvp_eval_cq_cos(&q[0]));
    put_num(f, kvp_eval_cq_rel_l1(&q[0]));
    put_num(f, kvp_eval_cq_cos(&q[1]));
    put_num(f, kvp_eval_cq_rel_l1(&q[1]));
    fputc('\n', f);
}

int kvp_eval_write_cq_csv(const char *path, const kvp_eval_method_t *m, const kvp_eval_result_t *r,
                          int n, int pos_bucket, int n_pos, kvp_err_t *err) {
    FILE *f = open_out(path, err);
    if (!f) return KVP_EIO;
    fputs("method,layer,pos_lo,pos_hi,cos_k,rel_l1_k,cos_v,rel_l1_v\n", f);
    for (int i = 0; i < n; i++) {
        const kvp_eval_result_t *x = &r[i];
        if (!x->cq) continue;
        kvp_eval_cq_t q[2];
        char ls[16], ps[16];
        for (int l = 0; l < x->n_layer; l++) {
            snprintf(ls, sizeof ls, "%d", l);
            cq_sum(x, l, l + 1, 0, x->n_bucket, q);
            cq_row(f, m[i].name, ls, "all", -1, q);
        }
        for (int b = 0; b < x->n_bucket; b++) {
            int lo = b * pos_bucket, hi = lo + pos_bucket < n_pos ? lo + pos_bucket : n_pos;
            snprintf(ps, sizeof ps, "%d", lo);
            for (int l = 0; l < x->n_layer; l++) {
                snprintf(ls, sizeof ls, "%d", l);
                cq_sum(x, l, l + 1, b, b + 1, q);
                cq_row(f, m[i].name, ls, ps, hi, q);
            }
            cq_sum(x, 0, x->n_layer, b, b + 1, q);
            cq_row(f, m[i].name, "all", ps, hi, q);
        }
    }
    return close_out(f, path, err);
}

/* A CSV string field: quoted, quotes doubled, newlines as \n. */
static void put_str(FILE *f, const char *s) {
    fputs(",\"", f);
    for (; s && *s; s++) {
        if (*s == '"')
            fputs("\"\"", f);
        else if (*s == '\n')
            fputs("\\n", f);
        else
            fputc(*s, f);
    }
    fputc('"', f);
}

int kvp_eval_write_he_csv(const char *path, const kvp_eval_method_t *m, const kvp_eval_result_t *r,
                          int n, const kvp_eval_data_t *d, kvp_err_t *err) {
    FILE *f = open_out(path, err);
    if (!f) return KVP_EIO;
    fputs("item,target", f);
    for (int i = 0; i < n; i++)
        put_str(f, m[i].name);
    fputc('\n', f);
    for (int k = 0; k < d->n_he; k++) {
        fprintf(f, "%d", k);
        put_str(f, d->he_target[k]);
        for (int i = 0; i < n; i++)
            put_str(f, r[i].he_out ? r[i].he_out[k] : NULL);
        fputc('\n', f);
    }
    return close_out(f, path, err);
}

/* "0.412" or "-" for NaN, in a field of width w. */
static void put_cell(FILE *f, int w, const char *fmt, double v) {
    char b[32];
    if (isfinite(v))
        snprintf(b, sizeof b, fmt, v);
    else
        snprintf(b, sizeof b, "-");
    fprintf(f, " %*s", w, b);
}

void kvp_eval_print_table(FILE *f, const kvp_eval_method_t *m, const kvp_eval_result_t *r, int n,
                          double base_flops) {
    fprintf(f, "%-26s %5s %9s %6s %8s %6s %6s %7s %7s %6s %6s %6s %6s\n", "method", "kind",
            "MFLOPs", "xbase", "TTFT ms", "acc", "first", "loglik", "ll1st", "HE", "agree", "cosK",
            "cosV");
    for (int i = 0; i < n; i++) {
        const kvp_eval_result_t *x = &r[i];
        kvp_eval_cq_t q[2] = {{0}};
        if (x->cq) cq_sum(x, 0, x->n_layer, 0, x->n_bucket, q);
        fprintf(f, "%-26s %5s", m[i].name, kind_name(m[i].kind));
        put_cell(f, 9, "%.1f", x->flops / 1e6);
        put_cell(f, 6, "%.3f", x->flops / base_flops);
        put_cell(f, 8, "%.2f", x->ttft_ms);
        put_cell(f, 6, "%.3f", x->acc);
        put_cell(f, 6, "%.3f", x->first_acc);
        put_cell(f, 7, "%.3f", x->decode_loglik);
        put_cell(f, 7, "%.3f", x->first_loglik);
        put_cell(f, 6, "%.3f", x->he_exact);
        put_cell(f, 6, "%.3f", x->he_agree);
        put_cell(f, 6, "%.3f", x->cq ? kvp_eval_cq_cos(&q[0]) : NAN);
        put_cell(f, 6, "%.3f", x->cq ? kvp_eval_cq_cos(&q[1]) : NAN);
        fputc('\n', f);
    }
}

/* Standard error of the mean of a[i] - b[i] (NaN without both). */
static double paired_se(const double *a, const double *b, int n) {
    if (!a || !b || n < 2) return NAN;
    double m = 0, s = 0;
    for (int i = 0; i < n; i++)
        m += a[i] - b[i];
    m /= n;
    for (int i = 0; i < n; i++)
        s += (a[i] - b[i] - m) * (a[i] - b[i] - m);
    return sqrt(s / (n - 1) / n);
}

static double metric(const kvp_eval_result_t *r, int ll) {
    return ll ? r->decode_loglik : r->acc;
}

/* The best method of `kind` at <= flops by accuracy (ll 0) or
 * log-likelihood (ll 1); -1 if none. */
static int best_of_kind(const kvp_eval_method_t *m, const kvp_eval_result_t *r, int n,
                        kvp_eval_kind_t kind, double flops, int ll) {
    int best = -1;
    for (int j = 0; j < n; j++)
        if (m[j].kind == kind && r[j].flops <= flops && isfinite(metric(&r[j], ll)) &&
            (best < 0 || metric(&r[j], ll) > metric(&r[best], ll)))
            best = j;
    return best;
}

static double gap(const kvp_eval_result_t *r, int i, int base, int alone, int ll) {
    if (base < 0 || alone < 0) return NAN;
    double b = metric(&r[base], ll), a = metric(&r[alone], ll);
    /* only meaningful when the base is better than the model alone */
    return b > a ? (metric(&r[i], ll) - a) / (b - a) : NAN;
}

int kvp_eval_goals(const kvp_eval_method_t *m, const kvp_eval_result_t *r, int n,
                   kvp_eval_goal_t *goals) {
    int base = -1, ng = 0;
    for (int i = 0; i < n && base < 0; i++)
        if (m[i].kind == KVP_EVAL_BASE) base = i;
    for (int i = 0; i < n; i++) {
        if (m[i].kind != KVP_EVAL_KVP) continue;
        kvp_eval_goal_t g = {.method = i, .alone = -1};
        for (int j = 0; j < n; j++)
            if (m[j].kind == KVP_EVAL_ALONE && m[j].model == m[i].model) g.alone = j;
        g.best_acc = best_of_kind(m, r, n, KVP_EVAL_ALONE, r[i].flops, 0);
        g.best_ll = best_of_kind(m, r, n, KVP_EVAL_ALONE, r[i].flops, 1);
        int ba = g.best_acc, bl = g.best_ll, np = r[i].n_prompts;
        g.margin = ba >= 0 ? r[i].acc - r[ba].acc : NAN;
        g.margin_se = ba >= 0 ? paired_se(r[i].acc_each, r[ba].acc_each, np) : NAN;
        g.ll_margin = bl >= 0 ? r[i].decode_loglik - r[bl].decode_loglik : NAN;
        g.ll_margin_se = bl >= 0 ? paired_se(r[i].ll_each, r[bl].ll_each, np) : NAN;
        g.gap_closed = gap(r, i, base, g.alone, 0);
        g.ll_gap_closed = gap(r, i, base, g.alone, 1);
        double he_best = NAN;
        for (int j = 0; j < n; j++)
            if (m[j].kind == KVP_EVAL_ALONE && r[j].flops <= r[i].flops &&
                isfinite(r[j].he_exact) && !(r[j].he_exact <= he_best))
                he_best = r[j].he_exact;
        g.he_margin = r[i].he_exact - he_best;
        goals[ng++] = g;
    }
    return ng;
}

int kvp_eval_fronts(const kvp_eval_method_t *m, const kvp_eval_result_t *r, int n,
                    kvp_eval_front_t *fronts) {
    int base = -1, nf = 0;
    for (int i = 0; i < n && base < 0; i++)
        if (m[i].kind == KVP_EVAL_BASE) base = i;
    for (int i = 0; i < n; i++) {
        if (m[i].kind != KVP_EVAL_KVP) continue;
        bool seen = false; /* one front per budget: ridge and trained share theirs */
        for (int k = 0; k < nf && !seen; k++)
            seen = r[fronts[k].budget].flops == r[i].flops;
        if (seen) continue;
        kvp_eval_front_t f = {.budget = i};
        f.kvp = best_of_kind(m, r, n, KVP_EVAL_KVP, r[i].flops, 0);
        f.baseline = best_of_kind(m, r, n, KVP_EVAL_ALONE, r[i].flops, 0);
        int k = f.kvp, b = f.baseline;
        f.margin = b >= 0 ? r[k].acc - r[b].acc : NAN;
        f.margin_se = b >= 0 ? paired_se(r[k].acc_each, r[b].acc_each, r[k].n_prompts) : NAN;
        f.gap = b >= 0 && base >= 0 ? r[base].acc - r[b].acc : NAN;
        f.gap_se = b >= 0 && base >= 0
                       ? paired_se(r[base].acc_each, r[b].acc_each, r[base].n_prompts)
                       : NAN;
        f.gap_closed = b >= 0 ? gap(r, k, base, b, 0) : NAN;
        /* insertion by budget keeps the fronts in the order they are read */
        int at = nf++;
        for (; at > 0 && r[fronts[at - 1].budget].flops > r[i].flops; at--)
            fronts[at] = fronts[at - 1];
        fronts[at] = f;
    }
    return nf;
}

static void print_fronts(FILE *f, const kvp_eval_method_t *m, const kvp_eval_result_t *r, int n,
                         double base_flops, double min_gap) {
    kvp_eval_front_t *fr = calloc((size_t)n, sizeof *fr);
    if (!fr) return;
    int nf = kvp_eval_fronts(m, r, n, fr), met = 0;
    fprintf(f, "on the fronts: at each KV Prediction budget, the best KV Prediction point and the "
               "best baseline at or below it (gap from that baseline to the base)\n");
    for (int k = 0; k < nf; k++) {
        const kvp_eval_front_t *x = &fr[k];
        fprintf(f, "  %.3f x base: %s %.4f", r[x->budget].flops / base_flops, m[x->kvp].name,
                r[x->kvp].acc);
        if (x->baseline < 0) {
            fprintf(f, " (no baseline at <= this budget)\n");
            met++;
            continue;
        }
        fprintf(f, " vs %s %.4f: %+.4f +- %.4f", m[x->baseline].name, r[x->baseline].acc, x->margin,
                x->margin_se);
        /* a gap within two standard errors has no share worth printing */
        bool measurable = isfinite(x->gap_closed) && !(x->gap < 2 * x->gap_se);
        if (measurable)
            fprintf(f, "; closes %.0f%% of the gap %.4f", 100 * x->gap_closed, x->gap);
        else
            fprintf(f, "; gap %.4f +- %.4f to the base: not measurable", x->gap, x->gap_se);
        fputc('\n', f);
        met += x->margin > 0 && (!measurable || x->gap_closed >= min_gap);
    }
    fprintf(f,
            "  accuracy on the fronts: %d of %d budgets above the baselines and closing >= %.0f%% "
            "(or no measurable gap)\n",
            met, nf, 100 * min_gap);
    free(fr);
}

/* "acc 0.235 vs aux alone 0.241: -0.006 +- 0.004, gap closed -43%" */
static void print_metric(FILE *f, const char *what, const char *fmt, double v,
                         const kvp_eval_method_t *m, const kvp_eval_result_t *r, int best,
                         double margin, double se, double gap_closed) {
    fprintf(f, "    %-7s ", what);
    fprintf(f, fmt, v);
    if (best >= 0) {
        fprintf(f, " vs best baseline %s ", m[best].name);
        fprintf(f, fmt, what[0] == 'a' ? r[best].acc : r[best].decode_loglik);
        fprintf(f, ": %+.4f +- %.4f", margin, se);
    } else {
        fprintf(f, " (no baseline at <= its budget)");
    }
    if (isfinite(gap_closed)) fprintf(f, "; closes %.0f%% of the gap", 100 * gap_closed);
    fputc('\n', f);
}

void kvp_eval_print_goals(FILE *f, const kvp_eval_method_t *m, const kvp_eval_result_t *r, int n,
                          double min_gap) {
    kvp_eval_goal_t *g = calloc((size_t)n, sizeof *g);
    if (!g) return;
    int ng = kvp_eval_goals(m, r, n, g);
    fprintf(f,
            "goals: each KV Prediction point above the best baseline at the same or a smaller "
            "TTFT budget, and closing >= %.0f%% of the gap from its auxiliary model alone to "
            "the base (margins +- one paired standard error over the prompts)\n",
            100 * min_gap);
    int above[2] = {0}, closed[2] = {0};
    for (int k = 0; k < ng; k++) {
        const kvp_eval_goal_t *x = &g[k];
        const kvp_eval_result_t *y = &r[x->method];
        fprintf(f, "  %s\n", m[x->method].name);
        print_metric(f, "acc", "%.4f", y->acc, m, r, x->best_acc, x->margin, x->margin_se,
                     x->gap_closed);
        print_metric(f, "loglik", "%.4f", y->decode_loglik, m, r, x->best_ll, x->ll_margin,
                     x->ll_margin_se, x->ll_gap_closed);
        if (isfinite(x->he_margin))
            fprintf(f, "    HumanEval-like exact match over the best baseline: %+.3f\n",
                    x->he_margin);
        above[0] += x->best_acc < 0 || x->margin > 0;
        above[1] += x->best_ll < 0 || x->ll_margin > 0;
        closed[0] += isfinite(x->gap_closed) && x->gap_closed >= min_gap;
        closed[1] += isfinite(x->ll_gap_closed) && x->ll_gap_closed >= min_gap;
    }
    fprintf(f,
            "  accuracy: %d of %d points above the baselines, %d of %d close >= %.0f%%; "
            "log-likelihood: %d of %d above, %d of %d close >= %.0f%%\n",
            above[0], ng, closed[0], ng, 100 * min_gap, above[1], ng, closed[1], ng, 100 * min_gap);
    free(g);
    for (int i = 0; i < n; i++)
        if (m[i].kind == KVP_EVAL_BASE) print_fronts(f, m, r, n, r[i].flops, min_gap);
}
