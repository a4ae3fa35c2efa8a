#include "kvp_kvpgen.h"

#include <stdlib.h>

#include "kvp_time.h"

int kvp_kvp_prefill(kvp_model_ctx_t *aux_ctx, kvp_model_ctx_t *base_ctx, const kvp_predictor_t *p,
                    kvp_kvcache_t *given_aux, kvp_kvcache_t *base_cache, const int32_t *prompt,
                    int n_prompt, int chunk, float *logits, kvp_kvp_stats_t *st, kvp_err_t *err) {
    if (n_prompt <= 0) return kvp_err_set(err, KVP_EINVAL, "kv prediction: empty prompt");
    if (chunk <= 0) chunk = 512;
    const int n_ctx = n_prompt - 1; /* positions the predictor fills */
    kvp_kvp_stats_t local = {0};
    if (!st) st = &local;
    st->n_prompt = n_prompt;
    kvp_kvcache_t *aux_cache = given_aux;
    int rc = KVP_OK;
    double t_start = kvp_now();
    if (n_ctx > 0) {
        if (aux_cache)
            aux_cache->len = 0; /* forward() checks its shape and room */
        else
            rc = kvp_model_new_cache(kvp_model_ctx_model(aux_ctx), n_ctx, &aux_cache, err);
        for (int a = 0; !rc && a < n_ctx; a += chunk) {
            int n = n_ctx - a < chunk ? n_ctx - a : chunk;
            double t0 = kvp_now();
            rc = kvp_model_forward(aux_ctx, aux_cache, prompt + a, n, NULL, KVP_LOGITS_NONE, err);
            double t1 = kvp_now();
            if (!rc) rc = kvp_predictor_apply_cache(p, aux_cache, base_cache, a, n, err);
            st->t_aux_prefill += t1 - t0;
            st->t_predict += kvp_now() - t1;
        }
        if (aux_cache != given_aux) kvp_kvcache_free(&aux_cache);
    }
    if (!rc) rc = kvp_kvcache_set_len(base_cache, n_ctx, err);
    double t0 = kvp_now();
    if (!rc)
        rc = kvp_model_forward(base_ctx, base_cache, prompt + n_ctx, 1, logits, KVP_LOGITS_LAST,
                               err);
    st->t_base_step = kvp_now() - t0;
    st->t_first = kvp_now() - t_start;
    return rc;
}

int kvp_kvp_generate(const kvp_model_t *aux, const kvp_model_t *base, const kvp_predictor_t *p,
                     const int32_t *prompt, int n_prompt, const kvp_gen_params_t *gp, int32_t eos,
                     kvp_token_cb cb, void *user, kvp_kvp_stats_t *st, kvp_err_t *err) {
    int rc = kvp_predictor_check_pair(p, aux, base, err);
    if (rc) return rc;
    if (n_prompt <= 0) return kvp_err_set(err, KVP_EINVAL, "kv prediction: empty prompt");
    int chunk = gp->chunk > 0 ? gp->chunk : 512;
    int cap = n_prompt + (gp->n_predict > 0 ? gp->n_predict : 0);
    kvp_model_ctx_t *actx = NULL, *bctx = NULL;
    kvp_kvcache_t *bcache = NULL;
    float *logits = malloc(sizeof(float) * (size_t)base->cfg.n_vocab);
    rc = logits ? 0 : kvp_err_set(err, KVP_ENOMEM, "kv prediction: out of memory");
    if (!rc) rc = kvp_model_ctx_new(&actx, aux, chunk, n_prompt > 1 ? n_prompt - 1 : 1, err);
    if (!rc) rc = kvp_model_ctx_new(&bctx, base, chunk, cap, err);
    if (!rc) rc = kvp_model_new_cache(base, cap, &bcache, err);
    kvp_kvp_stats_t local = {0};
    if (!st) st = &local;
    *st = (kvp_kvp_stats_t){0};
    if (!rc)
        rc = kvp_kvp_prefill(actx, bctx, p, NULL, bcache, prompt, n_prompt, chunk, logits, st, err);
    if (!rc && gp->n_predict > 0) {
        kvp_gen_stats_t gs = {.n_prompt = n_prompt, .t_first = st->t_first};
        rc = kvp_generate_from_logits(bctx, bcache, logits, gp, eos, cb, user, &gs, err);
        st->t_first = gs.t_first;
        st->t_decode = gs.t_decode;
        st->n_generated = gs.n_generated;
    }
    free(logits);
    kvp_kvcache_free(&bcache);
    kvp_model_ctx_free(&actx);
    kvp_model_ctx_free(&bctx);
    return rc;
}

double kvp_kvp_ttft_flops(const kvp_model_config_t *aux, const kvp_model_config_t *base,
                          const kvp_predictor_t *p, int n) {
    double f = 0.0;
    if (n > 1) {
        /* auxiliary prefill without its output head */
        f += kvp_model_flops(aux, 0, n - 1) - 2.0 * aux->n_embd * aux->n_vocab;
        f += 2.0 * 2.0 * (double)p->d_in * p->d_out * p->base.n_layer * (n - 1);
    }
    return f + kvp_model_flops(base, n - 1, 1);
}
