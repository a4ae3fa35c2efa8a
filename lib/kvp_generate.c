#include "kvp_generate.h"

#include <stdlib.h>

#include "kvp_time.h"

int kvp_generate_from_logits(kvp_model_ctx_t *ctx, kvp_kvcache_t *cache, float *logits,
                             const kvp_gen_params_t *p, int32_t eos, kvp_token_cb cb, void *user,
                             kvp_gen_stats_t *st, kvp_err_t *err) {
    const kvp_model_t *m = kvp_model_ctx_model(ctx);
    kvp_sampler_t *s;
    int rc = kvp_sampler_new(&s, &p->sampler, m->cfg.n_vocab, err);
    if (rc) return rc;
    double t0 = kvp_now(), t1 = t0;
    for (int i = 0; i < p->n_predict; i++) {
        int32_t tok = kvp_sampler_sample(s, logits);
        if (i == 0) {
            t1 = kvp_now();
            if (st) st->t_first += t1 - t0; /* the caller counted the time before */
        }
        if (st) st->n_generated++;
        bool stop =
            (cb && cb(user, tok)) || (p->stop_at_eos && tok == eos) || i + 1 == p->n_predict;
        if (stop) break;
        if (cache->len >= cache->cap) break; /* context full: end as if n_predict were reached */
        if ((rc = kvp_model_forward(ctx, cache, &tok, 1, logits, KVP_LOGITS_LAST, err))) break;
    }
    if (st) /* from the first token to the last: n_generated - 1 decode steps */
        st->t_decode = kvp_now() - t1;
    kvp_sampler_free(&s);
    return rc;
}

int kvp_generate(const kvp_model_t *m, const int32_t *prompt, int n_prompt,
                 const kvp_gen_params_t *p, int32_t eos, kvp_token_cb cb, void *user,
                 kvp_gen_stats_t *st, kvp_err_t *err) {
    if (n_prompt <= 0) return kvp_err_set(err, KVP_EINVAL, "generate: empty prompt");
    int cap = n_prompt + (p->n_predict > 0 ? p->n_predict : 0);
    int chunk = p->chunk > 0 ? p->chunk : 512;
    kvp_model_ctx_t *ctx = NULL;
    kvp_kvcache_t *cache = NULL;
    float *logits = malloc(sizeof(float) * (size_t)m->cfg.n_vocab);
    int rc = logits ? 0 : kvp_err_set(err, KVP_ENOMEM, "generate: out of memory");
    if (!rc) rc = kvp_model_ctx_new(&ctx, m, chunk, cap, err);
    if (!rc) rc = kvp_model_new_cache(m, cap, &cache, err);
    if (rc) goto done;
    kvp_gen_stats_t local = {0};
    if (!st) st = &local;
    *st = (kvp_gen_stats_t){.n_prompt = n_prompt};
    double t0 = kvp_now();
    if ((rc = kvp_model_forward(ctx, cache, prompt, n_prompt, logits, KVP_LOGITS_LAST, err)))
        goto done;
    st->t_prefill = kvp_now() - t0;
    st->t_first = st->t_prefill;
    if (p->n_predict > 0)
        rc = kvp_generate_from_logits(ctx, cache, logits, p, eos, cb, user, st, err);
done:
    free(logits);
    kvp_kvcache_free(&cache);
    kvp_model_ctx_free(&ctx);
    return rc;
}
