#include "kvp_sampler.h"

#include <math.h>
#include <stdlib.h>

#include "kvp_rng.h"

typedef struct {
    float logit;
    float p;
    int32_t id;
} cand_t;

struct kvp_sampler {
    kvp_sampler_params_t p;
    int n_vocab;
    kvp_rng_t rng;
    cand_t *cand; /* [n_vocab] */
};

int kvp_sampler_new(kvp_sampler_t **out, const kvp_sampler_params_t *p, int n_vocab,
                    kvp_err_t *err) {
    *out = NULL;
    if (n_vocab <= 0) return kvp_err_set(err, KVP_EINVAL, "sampler: vocabulary size %d", n_vocab);
    if (p->top_k < 0 || !(p->top_p > 0.0f) || isnan(p->temp))
        return kvp_err_set(err, KVP_EINVAL,
                           "sampler: top-k must be >= 0 (got %d) and top-p > 0 (got %g)", p->top_k,
                           p->top_p);
    kvp_sampler_t *s = calloc(1, sizeof *s);
    if (!s || !(s->cand = malloc(sizeof(cand_t) * (size_t)n_vocab))) {
        free(s);
        return kvp_err_set(err, KVP_ENOMEM, "sampler: out of memory");
    }
    s->p = *p;
    s->n_vocab = n_vocab;
    kvp_rng_seed(&s->rng, p->seed);
    *out = s;
    return KVP_OK;
}

void kvp_sampler_free(kvp_sampler_t **s) {
    if (!s || !*s) return;
    free((*s)->cand);
    free(*s);
    *s = NULL;
}

int32_t kvp_argmax(const float *x, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* Descending by logit (so by probability), ties by id so the order is
 * deterministic. The logit, not p, decides: nearly equal logits can round to
 * the same p, and top-k = 1 must still pick the argmax. */
static int cand_cmp(const void *a, const void *b) {
    const cand_t *x = a, *y = b;
    if (x->logit != y->logit) return x->logit < y->logit ? 1 : -1;
    return x->id < y->id ? -1 : (x->id > y->id);
}

int32_t kvp_sampler_sample(kvp_sampler_t *s, const float *logits) {
    const int n = s->n_vocab;
    if (s->p.temp <= 0.0f) return kvp_argmax(logits, n);
    float mx = logits[kvp_argmax(logits, n)];
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        s->cand[i].id = i;
        s->cand[i].logit = logits[i];
        s->cand[i].p = expf((logits[i] - mx) / s->p.temp);
        sum += s->cand[i].p;
    }
    int keep = n;
    if (s->p.top_k > 0 || s->p.top_p < 1.0f) {
        qsort(s->cand, (size_t)n, sizeof(cand_t), cand_cmp);
        if (s->p.top_k > 0 && s->p.top_k < keep) keep = s->p.top_k;
        sum = 0.0;
        for (int i = 0; i < keep; i++)
            sum += s->cand[i].p;
        if (s->p.top_p < 1.0f) {
            /* smallest prefix whose mass reaches top_p of the kept mass */
            double acc = 0.0;
            for (int i = 0; i < keep; i++) {
                acc += s->cand[i].p;
                if (acc >= s->p.top_p * sum) {
                    keep = i + 1;
                    sum = acc;
                    break;
                }
            }
        }
    }
    double r = (double)kvp_rng_uniform(&s->rng) * sum;
    double acc = 0.0;
    for (int i = 0; i < keep; i++) {
        acc += s->cand[i].p;
        if (r < acc) return s->cand[i].id;
    }
    return s->cand[keep - 1].id;
}
