#include "kvp_adamw.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void kvp_adamw_config_default(kvp_adamw_config_t *c) {
    c->beta1 = 0.9f;
    c->beta2 = 0.95f;
    c->eps = 1e-8f;
    c->weight_decay = 0.1f;
}

int kvp_adamw_new(kvp_adamw_t **out, size_t n, const kvp_adamw_config_t *cfg, kvp_err_t *err) {
    *out = NULL;
    if (!(cfg->beta1 >= 0.0f && cfg->beta1 < 1.0f && cfg->beta2 >= 0.0f && cfg->beta2 < 1.0f &&
          cfg->eps > 0.0f && cfg->weight_decay >= 0.0f))
        return kvp_err_set(err, KVP_EINVAL,
                           "adamw: betas must be in [0, 1), eps > 0 and weight decay >= 0 (got "
                           "%g, %g, %g, %g)",
                           cfg->beta1, cfg->beta2, cfg->eps, cfg->weight_decay);
    kvp_adamw_t *o = calloc(1, sizeof *o);
    if (!o) return kvp_err_set(err, KVP_ENOMEM, "adamw: out of memory");
    o->cfg = *cfg;
    o->n = n;
    o->m = calloc(n ? n : 1, sizeof *o->m);
    o->v = calloc(n ? n : 1, sizeof *o->v);
    o->decay = malloc(n ? n : 1);
    if (!o->m || !o->v || !o->decay) {
        kvp_adamw_free(&o);
        return kvp_err_set(err, KVP_ENOMEM, "adamw: cannot allocate state for %zu parameters", n);
    }
    memset(o->decay, 1, n);
    *out = o;
    return 0;
}

void kvp_adamw_free(kvp_adamw_t **op) {
    kvp_adamw_t *o = op ? *op : NULL;
    if (!o) return;
    free(o->m);
    free(o->v);
    free(o->decay);
    free(o);
    *op = NULL;
}

void kvp_adamw_set_decay(kvp_adamw_t *o, size_t off, size_t count, bool on) {
    if (off >= o->n) return;
    if (count > o->n - off) count = o->n - off;
    memset(o->decay + off, on ? 1 : 0, count);
}

void kvp_adamw_step(kvp_adamw_t *o, float *p, const float *g, float lr) {
    o->t++;
    const float b1 = o->cfg.beta1, b2 = o->cfg.beta2, eps = o->cfg.eps;
    /* bias corrections in double: b^t underflows gracefully and stays exact
     * enough for any t a run reaches */
    const float bc1 = (float)(1.0 - pow((double)b1, (double)o->t));
    const float bc2 = (float)(1.0 - pow((double)b2, (double)o->t));
    const float shrink = 1.0f - lr * o->cfg.weight_decay;
    float *m = o->m, *v = o->v;
    const uint8_t *decay = o->decay;
    for (size_t i = 0; i < o->n; i++) {
        float gi = g[i];
        float w = decay[i] ? p[i] * shrink : p[i];
        m[i] = b1 * m[i] + (1.0f - b1) * gi;
        v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
        float mhat = m[i] / bc1, vhat = v[i] / bc2;
        p[i] = w - lr * mhat / (sqrtf(vhat) + eps);
    }
}

double kvp_grad_norm(const float *g, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += (double)g[i] * (double)g[i];
    return sqrt(s);
}

double kvp_grad_clip(float *g, size_t n, float max_norm) {
    double norm = kvp_grad_norm(g, n);
    if (max_norm > 0.0f && norm > (double)max_norm) {
        float scale = (float)((double)max_norm / norm);
        for (size_t i = 0; i < n; i++)
            g[i] *= scale;
    }
    return norm;
}

float kvp_lr_at(int step, int warmup, int total, float lr_max, float lr_min) {
    if (step < 0) step = 0;
    if (step < warmup) return lr_max * (float)(step + 1) / (float)warmup;
    int span = total - 1 - warmup;
    if (span <= 0) /* no room for a decay: constant after the warm-up */
        return lr_max;
    if (step >= total - 1) return lr_min;
    double progress = (double)(step - warmup) / (double)span;
    double c = 0.5 * (1.0 + cos(3.14159265358979323846 * progress));
    return (float)((double)lr_min + c * ((double)lr_max - (double)lr_min));
}
