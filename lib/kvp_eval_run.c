/* kvp_eval_run: runs each method over the test data (kvp_eval.h) and fits a
 * closed-form predictor in-process for auxiliary models that come without
 * one. Buffers are allocated once per method; every prompt reuses them. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_eval.h"
#include "kvp_kvpgen.h"
#include "kvp_sampler.h"
#include "kvp_time.h"

typedef struct runner {
    const kvp_model_t *base;
    const kvp_tokenizer_t *tok;
    const kvp_eval_opts_t *o;
    const kvp_eval_data_t *d;
    int cap, max_prompt, n_vocab;
    kvp_model_ctx_t *bctx;          /* the base model */
    kvp_kvcache_t *bcache, *tcache; /* its cache, and the true cache for cache quality */
    kvp_model_ctx_t *cctx;          /* the method's cheaper model (ALONE, KVP) */
    kvp_kvcache_t *ccache;          /* its cache (ALONE; KVP: the auxiliary cache) */
    float *logits, *logits0, *lall; /* [V], [V], [K-1][V] */
    int32_t *gen;                   /* [max(K, he_max_gen)] */
    char *text;                     /* decoded HumanEval-like output */
    size_t text_cap;
    float *pk, *pv, *tk, *tv; /* [P-1][base n_kv_head * head_dim] */
} runner_t;

static void runner_free(runner_t *r) {
    kvp_model_ctx_free(&r->bctx);
    kvp_model_ctx_free(&r->cctx);
    kvp_kvcache_free(&r->bcache);
    kvp_kvcache_free(&r->tcache);
    kvp_kvcache_free(&r->ccache);
    free(r->logits), free(r->logits0), free(r->lall), free(r->gen), free(r->text);
    free(r->pk), free(r->pv), free(r->tk), free(r->tv);
}

static int runner_new(runner_t *r, const kvp_model_t *base, const kvp_tokenizer_t *tok,
                      const kvp_eval_data_t *d, const kvp_eval_opts_t *o, kvp_err_t *err) {
    memset(r, 0, sizeof *r);
    r->base = base, r->tok = tok, r->d = d, r->o = o;
    r->n_vocab = base->cfg.n_vocab;
    r->max_prompt = d->P;
    for (int i = 0; i < d->n_he; i++)
        if (d->he_len[i] > r->max_prompt) r->max_prompt = d->he_len[i];
    int gen_max = d->K > o->he_max_gen ? d->K : o->he_max_gen;
    r->cap = r->max_prompt + gen_max;
    size_t row = (size_t)base->cfg.n_kv_head * base->cfg.head_dim * (size_t)(d->P - 1);
    r->logits = malloc(sizeof(float) * (size_t)r->n_vocab);
    r->logits0 = malloc(sizeof(float) * (size_t)r->n_vocab);
    r->lall = malloc(sizeof(float) * (size_t)r->n_vocab * (size_t)(d->K > 1 ? d->K - 1 : 1));
    r->gen = malloc(sizeof(int32_t) * (size_t)gen_max);
    r->text_cap = 16 * (size_t)gen_max + 64;
    r->text = malloc(r->text_cap);
    r->pk = malloc(sizeof(float) * row), r->pv = malloc(sizeof(float) * row);
    r->tk = malloc(sizeof(float) * row), r->tv = malloc(sizeof(float) * row);
    if (!r->logits || !r->logits0 || !r->lall || !r->gen || !r->text || !r->pk || !r->pv ||
        !r->tk || !r->tv)
        return kvp_err_set(err, KVP_ENOMEM, "eval: out of memory");
    int chunk = o->chunk > 0 ? o->chunk : 512;
    int rc = kvp_model_ctx_new(&r->bctx, base, chunk, r->cap, err);
    if (!rc) rc = kvp_model_new_cache(base, r->cap, &r->bcache, err);
    if (!rc) rc = kvp_model_new_cache(base, d->P, &r->tcache, err);
    return rc;
}

/* The method's cheaper model: a context and a cache (for KVP, the
 * auxiliary cache every prompt's prefill reuses). */
static int runner_method(runner_t *r, const kvp_eval_method_t *m, kvp_err_t *err) {
    kvp_model_ctx_free(&r->cctx);
    kvp_kvcache_free(&r->ccache);
    if (m->kind == KVP_EVAL_BASE) return KVP_OK;
    if (!m->model || m->model->cfg.n_vocab != r->n_vocab)
        return kvp_err_set(err, KVP_ESHAPE,
                           "eval: %s: the model's vocabulary (%d) is not the "
                           "base's (%d)",
                           m->name, m->model ? m->model->cfg.n_vocab : 0, r->n_vocab);
    int chunk = r->o->chunk > 0 ? r->o->chunk : 512;
    if (m->kind == KVP_EVAL_ALONE) {
        int rc = kvp_model_ctx_new(&r->cctx, m->model, chunk, r->cap, err);
        if (!rc) rc = kvp_model_new_cache(m->model, r->cap, &r->ccache, err);
        return rc;
    }
    if (!m->pred) return kvp_err_set(err, KVP_EINVAL, "eval: %s: no predictor", m->name);
    int rc = kvp_predictor_check_pair(m->pred, m->model, r->base, err);
    if (rc) return kvp_err_wrap(err, "eval: %s", m->name);
    const int n_aux = r->max_prompt > 1 ? r->max_prompt - 1 : 1; /* what the aux prefills */
    rc = kvp_model_ctx_new(&r->cctx, m->model, chunk, n_aux, err);
    if (!rc) rc = kvp_model_new_cache(m->model, n_aux, &r->ccache, err);
    return rc;
}

/* The method's prompt processing: leaves the first token's logits in
 * r->logits and says which model and cache decode from there. */
static int prefill(runner_t *r, const kvp_eval_method_t *m, const int32_t *prompt, int n,
                   kvp_model_ctx_t **gctx, kvp_kvcache_t **gcache, kvp_err_t *err) {
    switch (m->kind) {
    case KVP_EVAL_BASE:
        *gctx = r->bctx, *gcache = r->bcache;
        r->bcache->len = 0;
        return kvp_model_forward(r->bctx, r->bcache, prompt, n, r->logits, KVP_LOGITS_LAST, err);
    case KVP_EVAL_ALONE:
        *gctx = r->cctx, *gcache = r->ccache;
        r->ccache->len = 0;
        return kvp_model_forward(r->cctx, r->ccache, prompt, n, r->logits, KVP_LOGITS_LAST, err);
    case KVP_EVAL_KVP:
        *gctx = r->bctx, *gcache = r->bcache;
        r->bcache->len = 0;
        /* the cheap model's cache serves as the auxiliary cache: a KVP
         * method decodes on the base's */
        return kvp_kvp_prefill(r->cctx, r->bctx, m->pred, r->ccache, r->bcache, prompt, n,
                               r->o->chunk, r->logits, NULL, err);
    }
    return kvp_err_set(err, KVP_EINVAL, "eval: unknown method kind");
}

/* Greedy decoding from r->logits: up to max_new tokens into r->gen. With
 * stop_lines > 0 the text is decoded into r->text as it grows and decoding
 * ends once it holds that many complete non-empty lines, or at EOS. */
static int greedy(runner_t *r, kvp_model_ctx_t *ctx, kvp_kvcache_t *cache, int max_new,
                  int stop_lines, int *n_gen, size_t *text_len, kvp_err_t *err) {
    int32_t eos = kvp_tokenizer_eos(r->tok);
    size_t tl = 0;
    char line[8];
    *n_gen = 0;
    for (int i = 0; i < max_new; i++) {
        int32_t tok = kvp_argmax(r->logits, r->n_vocab);
        r->gen[(*n_gen)++] = tok;
        if (stop_lines > 0) {
            if (tok == eos) break;
            int np = kvp_tokenizer_piece(r->tok, tok, r->text + tl, r->text_cap - tl - 1);
            if (np > 0) tl += (size_t)np < r->text_cap - tl - 1 ? (size_t)np : r->text_cap - tl - 1;
            if (kvp_eval_first_lines(r->text, tl, stop_lines, false, line, sizeof line) >=
                stop_lines)
                break;
        }
        if (i + 1 == max_new || cache->len >= cache->cap) break;
        int rc = kvp_model_forward(ctx, cache, &tok, 1, r->logits, KVP_LOGITS_LAST, err);
        if (rc) return rc;
    }
    if (text_len) *text_len = tl;
    return KVP_OK;
}

/* The decoding model's mean log-likelihood of the true continuation,
 * teacher-forced on the cache the method left (len P; for BASE and KVP the
 * base model's cache, for ALONE the cheap model's own); restores len. */
static int decode_loglik(runner_t *r, kvp_model_ctx_t *ctx, kvp_kvcache_t *cache,
                         const int32_t *truth, double *out, double *first, kvp_err_t *err) {
    const int K = r->d->K, V = r->n_vocab, len = cache->len;
    double lp = kvp_eval_log_prob(r->logits, V, truth[0]);
    *first = lp;
    if (K > 1) {
        int rc = kvp_model_forward(ctx, cache, truth, K - 1, r->lall, KVP_LOGITS_ALL, err);
        if (rc) return rc;
        for (int t = 1; t < K; t++)
            lp += kvp_eval_log_prob(r->lall + (size_t)(t - 1) * V, V, truth[t]);
    }
    *out = lp / K;
    return kvp_kvcache_set_len(cache, len, err);
}

/* Predicted (r->bcache) against true base K/V over the prompt's first P-1
 * positions, per layer and position bucket. */
static int cache_quality(runner_t *r, const int32_t *prompt, kvp_eval_result_t *res,
                         kvp_err_t *err) {
    const int n = r->d->P - 1, w = r->o->pos_bucket;
    const int nh = r->base->cfg.n_kv_head, hd = r->base->cfg.head_dim, row = nh * hd;
    if (n <= 0) return KVP_OK;
    r->tcache->len = 0;
    int rc = kvp_model_forward(r->bctx, r->tcache, prompt, n, NULL, KVP_LOGITS_NONE, err);
    for (int l = 0; !rc && l < res->n_layer; l++) {
        rc = kvp_kvcache_read(r->bcache, l, 0, n, r->pk, r->pv, err);
        if (!rc) rc = kvp_kvcache_read(r->tcache, l, 0, n, r->tk, r->tv, err);
        for (int b = 0; !rc && b < res->n_bucket; b++) {
            int a = b * w, e = a + w < n ? a + w : n;
            size_t off = (size_t)a * row, nv = (size_t)(e - a) * nh;
            kvp_eval_cq_t *q = &res->cq[((size_t)l * res->n_bucket + b) * 2];
            kvp_eval_cq_add(&q[0], r->pk + off, r->tk + off, nv, hd);
            kvp_eval_cq_add(&q[1], r->pv + off, r->tv + off, nv, hd);
        }
    }
    return rc;
}

static int run_continuation(runner_t *r, const kvp_eval_method_t *m, kvp_eval_result_t *res,
                            kvp_err_t *err) {
    const kvp_eval_data_t *d = r->d;
    res->acc_each = malloc(sizeof(double) * (size_t)d->n_prompts);
    res->ll_each = malloc(sizeof(double) * (size_t)d->n_prompts);
    if (!res->acc_each || !res->ll_each) return kvp_err_set(err, KVP_ENOMEM, "eval: out of memory");
    double acc = 0, first = 0, ll = 0, ll1 = 0;
    for (int p = 0; p < d->n_prompts; p++) {
        const int32_t *prompt = d->prompts + (size_t)p * d->P, *truth = d->truth + (size_t)p * d->K;
        kvp_model_ctx_t *gctx;
        kvp_kvcache_t *gcache;
        int rc = prefill(r, m, prompt, d->P, &gctx, &gcache, err);
        if (!rc && m->kind == KVP_EVAL_KVP && p < r->o->cq_prompts)
            rc = cache_quality(r, prompt, res, err);
        double lp = 0, lp1 = 0;
        if (!rc) {
            /* greedy decoding below starts from the first token's logits again */
            memcpy(r->logits0, r->logits, sizeof(float) * (size_t)r->n_vocab);
            rc = decode_loglik(r, gctx, gcache, truth, &lp, &lp1, err);
            memcpy(r->logits, r->logits0, sizeof(float) * (size_t)r->n_vocab);
        }
        int n_gen = 0;
        if (!rc) rc = greedy(r, gctx, gcache, d->K, 0, &n_gen, NULL, err);
        if (rc) return kvp_err_wrap(err, "eval: %s: prompt %d", m->name, p);
        res->acc_each[p] = kvp_eval_token_accuracy(r->gen, truth, d->K);
        res->ll_each[p] = lp;
        acc += res->acc_each[p];
        first += r->gen[0] == truth[0];
        ll += lp;
        ll1 += lp1;
    }
    res->n_prompts = d->n_prompts;
    res->acc = acc / d->n_prompts;
    res->first_acc = first / d->n_prompts;
    res->decode_loglik = ll / d->n_prompts;
    res->first_loglik = ll1 / d->n_prompts;
    res->loglik = m->kind == KVP_EVAL_ALONE ? NAN : res->decode_loglik;
    return KVP_OK;
}

static int run_humaneval(runner_t *r, const kvp_eval_method_t *m, kvp_eval_result_t *res,
                         kvp_err_t *err) {
    const kvp_eval_data_t *d = r->d;
    res->n_he = d->n_he;
    res->he_exact = res->he_agree = NAN;
    if (!d->n_he) return KVP_OK;
    res->he_out = calloc((size_t)d->n_he, sizeof *res->he_out);
    if (!res->he_out) return kvp_err_set(err, KVP_ENOMEM, "eval: out of memory");
    int exact = 0;
    size_t cap = r->text_cap;
    for (int i = 0; i < d->n_he; i++) {
        kvp_model_ctx_t *gctx;
        kvp_kvcache_t *gcache;
        int n_gen = 0;
        size_t tl = 0;
        int rc = prefill(r, m, d->he_tok[i], d->he_len[i], &gctx, &gcache, err);
        if (!rc) rc = greedy(r, gctx, gcache, r->o->he_max_gen, r->o->he_lines, &n_gen, &tl, err);
        if (rc) return kvp_err_wrap(err, "eval: %s: humaneval item %d", m->name, i);
        char *out = malloc(cap);
        if (!out) return kvp_err_set(err, KVP_ENOMEM, "eval: out of memory");
        kvp_eval_first_lines(r->text, tl, r->o->he_lines, true, out, cap);
        res->he_out[i] = out;
        exact += !strcmp(out, d->he_target[i]);
    }
    res->he_exact = (double)exact / d->n_he;
    return KVP_OK;
}

/* Best of ttft_reps: from the start of prompt processing to the first token. */
static int measure_ttft(runner_t *r, const kvp_eval_method_t *m, kvp_eval_result_t *res,
                        kvp_err_t *err) {
    double best = INFINITY;
    kvp_model_ctx_t *gctx;
    kvp_kvcache_t *gcache;
    /* one run unmeasured: first-touch page faults and BLAS thread start-up */
    int rc = prefill(r, m, r->d->prompts, r->d->P, &gctx, &gcache, err);
    if (rc) return rc;
    for (int i = 0; i < (r->o->ttft_reps > 0 ? r->o->ttft_reps : 1); i++) {
        double t0 = kvp_now();
        rc = prefill(r, m, r->d->prompts, r->d->P, &gctx, &gcache, err);
        if (rc) return rc;
        volatile int32_t tok = kvp_argmax(r->logits, r->n_vocab);
        (void)tok;
        double t = kvp_now() - t0;
        if (t < best) best = t;
    }
    res->ttft_ms = 1e3 * best;
    return KVP_OK;
}

static int run_method(runner_t *r, const kvp_eval_method_t *m, kvp_eval_result_t *res,
                      kvp_err_t *err) {
    memset(res, 0, sizeof *res);
    double t0 = kvp_now();
    res->flops = kvp_eval_ttft_flops(m, r->base, r->d->P);
    int rc = runner_method(r, m, err);
    if (!rc && m->kind == KVP_EVAL_KVP) {
        res->n_layer = r->base->cfg.n_layer;
        res->n_bucket = (r->d->P - 1 + r->o->pos_bucket - 1) / r->o->pos_bucket;
        if (res->n_bucket < 1) res->n_bucket = 1;
        res->cq = calloc((size_t)res->n_layer * res->n_bucket * 2, sizeof *res->cq);
        if (!res->cq) rc = kvp_err_set(err, KVP_ENOMEM, "eval: out of memory");
    }
    if (!rc) rc = measure_ttft(r, m, res, err);
    if (!rc) rc = run_continuation(r, m, res, err);
    if (!rc) rc = run_humaneval(r, m, res, err);
    res->seconds = kvp_now() - t0;
    return rc;
}

int kvp_eval_run(const kvp_model_t *base, const kvp_tokenizer_t *tok,
                 const kvp_eval_method_t *methods, int n_methods, const kvp_eval_data_t *d,
                 const kvp_eval_opts_t *o, kvp_eval_result_t *res, kvp_err_t *err) {
    if (o->pos_bucket < 1) return kvp_err_set(err, KVP_EINVAL, "eval: position bucket < 1");
    if (o->he_lines < 1 || o->he_max_gen < 1)
        return kvp_err_set(err, KVP_EINVAL, "eval: humaneval lines and tokens must be >= 1");
    memset(res, 0, sizeof *res * (size_t)n_methods);
    runner_t r;
    int rc = runner_new(&r, base, tok, d, o, err);
    for (int i = 0; !rc && i < n_methods; i++) {
        rc = run_method(&r, &methods[i], &res[i], err);
        if (!rc && o->progress) {
            fprintf(o->progress,
                    "eval [%d/%d] %-28s acc %.3f  first %.3f  humaneval %.3f  ttft %.2f ms  "
                    "(%.1f s)\n",
                    i + 1, n_methods, methods[i].name, res[i].acc, res[i].first_acc,
                    res[i].he_exact, res[i].ttft_ms, res[i].seconds);
            fflush(o->progress);
        }
    }
    runner_free(&r);
    if (rc) return rc;
    /* agreement with the base's own greedy line(s) */
    int b = -1;
    for (int i = 0; i < n_methods && b < 0; i++)
        if (methods[i].kind == KVP_EVAL_BASE) b = i;
    for (int i = 0; b >= 0 && i < n_methods && d->n_he; i++) {
        int agree = 0;
        for (int k = 0; k < d->n_he; k++)
            agree += !strcmp(res[i].he_out[k], res[b].he_out[k]);
        res[i].he_agree = (double)agree / d->n_he;
    }
    return KVP_OK;
}

void kvp_eval_result_free(kvp_eval_result_t *r) {
    if (r->he_out)
        for (int i = 0; i < r->n_he; i++)
            free(r->he_out[i]);
    free(r->he_out);
    free(r->cq);
    free(r->acc_each);
    free(r->ll_each);
    memset(r, 0, sizeof *r);
}

/* ---- the in-process ridge fit ------------------------------------------------ */

int kvp_eval_fit_predictor(const kvp_model_t *aux, const kvp_model_t *base,
                           const int32_t *layer_map, const kvp_corpus_stream_t *s, int32_t bos,
                           uint64_t tokens, int T, kvp_predictor_t **out, kvp_err_t *err) {
    *out = NULL;
    if (T < 2 || s->n < (size_t)T + 1)
        return kvp_err_set(err, KVP_EINVAL,
                           "fit: the stream has %zu tokens, fewer than a "
                           "window of %d",
                           s->n, T);
    size_t n_fit = (size_t)((tokens + (uint64_t)T - 1) / (uint64_t)T);
    size_t n_val = (n_fit + 9) / 10, n_win = n_fit + n_val;
    size_t room = s->n - (size_t)T;
    kvp_model_ctx_t *actx = NULL, *bctx = NULL;
    kvp_kvcache_t *ac = NULL, *bc = NULL;
    kvp_predictor_fit_t *f = NULL;
    int32_t *win = malloc(sizeof(int32_t) * (size_t)T);
    int rc = win ? KVP_OK : kvp_err_set(err, KVP_ENOMEM, "fit: out of memory");
    if (!rc) rc = kvp_model_ctx_new(&actx, aux, T, T, err);
    if (!rc) rc = kvp_model_ctx_new(&bctx, base, T, T, err);
    if (!rc) rc = kvp_model_new_cache(aux, T, &ac, err);
    if (!rc) rc = kvp_model_new_cache(base, T, &bc, err);
    if (!rc)
        rc = kvp_predictor_fit_new(&f, kvp_kv_shape_of(aux), kvp_kv_shape_of(base), layer_map, err);
    for (size_t w = 0; !rc && w < n_win; w++) {
        size_t at = n_win > 1 ? w * room / (n_win - 1) : 0;
        int t = 0;
        if (bos >= 0) {
            win[t++] = bos;
            if (s->tok[at] == bos) at++;
        }
        for (; t < T; t++)
            win[t] = s->tok[at++ % s->n];
        int val = (w + 1) * n_val / n_win > w * n_val / n_win; /* one in eleven */
        ac->len = bc->len = 0;
        rc = kvp_model_forward(actx, ac, win, T, NULL, KVP_LOGITS_NONE, err);
        if (!rc) rc = kvp_model_forward(bctx, bc, win, T, NULL, KVP_LOGITS_NONE, err);
        if (!rc) rc = kvp_predictor_fit_add_cache(f, ac, bc, 0, T, val, err);
    }
    double lambdas[7];
    for (int i = 0; i < 7; i++)
        lambdas[i] = pow(10.0, i - 4);
    if (!rc) rc = kvp_predictor_fit_solve(f, lambdas, 7, out, err);
    if (!rc) rc = kvp_predictor_bind(*out, aux, base, err);
    if (rc) kvp_predictor_free(out);
    kvp_predictor_fit_free(&f);
    kvp_kvcache_free(&ac);
    kvp_kvcache_free(&bc);
    kvp_model_ctx_free(&actx);
    kvp_model_ctx_free(&bctx);
    free(win);
    return rc;
}
