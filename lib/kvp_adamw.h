/* kvp_adamw: the optimiser and the learning-rate schedule of kvpred's trainer.
 *
 * AdamW as in Loshchilov & Hutter and PyTorch's torch.optim.AdamW: weight
 * decay is decoupled from the gradient (the weight shrinks by lr*wd*w before
 * the Adam step) and applied only where the decay mask says so (the trainer
 * clears it for norm weights). Parameters and gradients are flat vectors,
 * like kvp_model's parameter arena.
 *
 * Everything here is plain sequential float arithmetic, so a step is
 * bit-identical however often a run is stopped and resumed. */
#ifndef KVP_ADAMW_H
#define KVP_ADAMW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvp_err.h"

typedef struct kvp_adamw_config {
    float beta1;        /* default 0.9 */
    float beta2;        /* default 0.95 (KV Prediction's recipe) */
    float eps;          /* default 1e-8 */
    float weight_decay; /* default 0.1 */
} kvp_adamw_config_t;

typedef struct kvp_adamw {
    kvp_adamw_config_t cfg;
    size_t n;
    float *m;       /* first moments [n] */
    float *v;       /* second moments [n] */
    uint8_t *decay; /* 1 where weight decay applies [n] */
    int64_t t;      /* steps taken */
} kvp_adamw_t;

void kvp_adamw_config_default(kvp_adamw_config_t *c);

/* An optimiser for n parameters: moments 0, t 0, decay on everywhere. */
int kvp_adamw_new(kvp_adamw_t **out, size_t n, const kvp_adamw_config_t *cfg, kvp_err_t *err);
void kvp_adamw_free(kvp_adamw_t **o);

/* Turns weight decay on or off for parameters [off, off+count). */
void kvp_adamw_set_decay(kvp_adamw_t *o, size_t off, size_t count, bool on);

/* One step: t += 1, then for each i
 *   p -= lr * wd * p                        (where decay[i])
 *   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
 *   p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) */
void kvp_adamw_step(kvp_adamw_t *o, float *params, const float *grads, float lr);

/* L2 norm of g (summed in double, in order). */
double kvp_grad_norm(const float *g, size_t n);
/* Scales g so its norm is at most max_norm (max_norm <= 0: no clipping);
 * returns the norm before clipping. */
double kvp_grad_clip(float *g, size_t n, float max_norm);

/* Learning rate for 0-based step `step` of `total`: linear warm-up
 * lr_max*(step+1)/warmup over the first `warmup` steps, then a cosine from
 * lr_max (at step warmup) down to lr_min (at step total-1), lr_min after. */
float kvp_lr_at(int step, int warmup, int total, float lr_max, float lr_min);

#endif
