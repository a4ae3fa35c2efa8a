/* Tests of lib/kvp_adamw: two AdamW steps against numbers worked by hand,
 * weight decay only where the mask allows, gradient clipping to a global
 * norm, and the warm-up + cosine learning-rate schedule at known steps. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "kvp_adamw.h"

#define assert_close(a, b, tol)                                                                    \
    do {                                                                                           \
        double a_ = (a), b_ = (b);                                                                 \
        if (!(fabs(a_ - b_) <= (tol)))                                                             \
            fail_msg("%s = %.9g, expected %.9g (tolerance %g)", #a, a_, b_, (double)(tol));        \
    } while (0)

/* Two parameters, p = (1, -2); only p0 decays. lr 0.1, beta1 0.9, beta2
 * 0.999, eps 1e-8, weight decay 0.1.
 *
 * Step 1, g = (0.5, -0.1); bias corrections 1-0.9 = 0.1 and 1-0.999 = 0.001:
 *   p0: decay 1 * (1 - 0.1*0.1) = 0.99; m = 0.1*0.5 = 0.05; v = 0.001*0.25 = 0.00025
 *       mhat = 0.05/0.1 = 0.5; vhat = 0.00025/0.001 = 0.25; sqrt = 0.5
 *       p0 = 0.99 - 0.1 * 0.5/(0.5 + 1e-8) = 0.99 - 0.1 = 0.89
 *   p1: no decay; m = -0.01; v = 0.00001; mhat = -0.1; vhat = 0.01; sqrt = 0.1
 *       p1 = -2 - 0.1 * (-0.1/0.1) = -1.9
 * Step 2, g = (0.5, 0.2); bias corrections 1-0.81 = 0.19 and 1-0.998001 = 0.001999:
 *   p0: decay 0.89 * 0.99 = 0.8811; m = 0.9*0.05 + 0.1*0.5 = 0.095;
 *       v = 0.999*0.00025 + 0.001*0.25 = 0.00049975
 *       mhat = 0.095/0.19 = 0.5; vhat = 0.00049975/0.001999 = 0.25; p0 = 0.8811 - 0.1 = 0.7811
 *   p1: m = 0.9*(-0.01) + 0.1*0.2 = 0.011; v = 0.999*0.00001 + 0.001*0.04 = 0.00004999
 *       mhat = 0.011/0.19 = 0.0578947; vhat = 0.00004999/0.001999 = 0.0250075;
 *       sqrt = 0.1581376; mhat/sqrt = 0.3661035; p1 = -1.9 - 0.03661035 = -1.93661035 */
static void test_two_steps_match_hand_worked_numbers(void **state) {
    (void)state;
    kvp_adamw_config_t c = {.beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.1f};
    kvp_adamw_t *o = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_adamw_new(&o, 2, &c, &err), 0);
    kvp_adamw_set_decay(o, 1, 1, false);
    float p[2] = {1.0f, -2.0f};
    float g1[2] = {0.5f, -0.1f};
    kvp_adamw_step(o, p, g1, 0.1f);
    assert_close(p[0], 0.89, 1e-6);
    assert_close(p[1], -1.9, 1e-6);
    assert_close(o->m[0], 0.05, 1e-7);
    assert_close(o->v[1], 0.00001, 1e-9);
    float g2[2] = {0.5f, 0.2f};
    kvp_adamw_step(o, p, g2, 0.1f);
    assert_int_equal(o->t, 2);
    assert_close(p[0], 0.7811, 1e-6);
    assert_close(p[1], -1.93661035, 2e-6);
    assert_close(o->m[1], 0.011, 1e-7);
    assert_close(o->v[1], 0.00004999, 1e-9);
    kvp_adamw_free(&o);
    assert_null(o);
}

/* A zero gradient leaves only the decay: p * (1 - lr*wd) on decayed weights. */
static void test_zero_gradient_only_decays_masked_weights(void **state) {
    (void)state;
    kvp_adamw_config_t c;
    kvp_adamw_config_default(&c);
    kvp_adamw_t *o = NULL;
    assert_int_equal(kvp_adamw_new(&o, 4, &c, NULL), 0);
    kvp_adamw_set_decay(o, 2, 100, false); /* clipped to the end */
    float p[4] = {1, 2, 3, 4}, g[4] = {0};
    kvp_adamw_step(o, p, g, 0.5f);
    assert_close(p[0], 1 * (1 - 0.5 * 0.1), 1e-7);
    assert_close(p[1], 2 * (1 - 0.5 * 0.1), 1e-7);
    assert_close(p[2], 3, 0);
    assert_close(p[3], 4, 0);
    kvp_adamw_free(&o);
}

static void test_refuses_bad_settings(void **state) {
    (void)state;
    kvp_adamw_config_t c = {.beta1 = 1.0f, .beta2 = 0.95f, .eps = 1e-8f};
    kvp_adamw_t *o = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_adamw_new(&o, 4, &c, &err), KVP_EINVAL);
    assert_null(o);
    assert_non_null(strstr(err.msg, "betas"));
}

/* g = (3, 4) has norm 5: clipped to 1 it becomes (0.6, 0.8); below the limit
 * it is left alone. */
static void test_clip_scales_to_global_norm(void **state) {
    (void)state;
    float g[2] = {3, 4};
    assert_close(kvp_grad_clip(g, 2, 1.0f), 5.0, 1e-12);
    assert_close(g[0], 0.6, 1e-7);
    assert_close(g[1], 0.8, 1e-7);
    assert_close(kvp_grad_norm(g, 2), 1.0, 1e-6);
    float h[2] = {3, 4};
    assert_close(kvp_grad_clip(h, 2, 10.0f), 5.0, 1e-12);
    assert_close(h[0], 3, 0);
    assert_close(kvp_grad_clip(h, 2, 0.0f), 5.0, 1e-12); /* 0 = no clipping */
    assert_close(h[1], 4, 0);
}

/* Warm-up 10, 111 steps, 1e-3 down to 1e-4: linear (step+1)/10 for steps
 * 0..9, the peak at 10, the cosine's midpoint (1e-3+1e-4)/2 at 60, a quarter
 * of the way 1e-4 + 0.9e-3 * (1+cos(pi/4))/2 at 35, the minimum at 110 and after. */
static void test_schedule_at_known_steps(void **state) {
    (void)state;
    const float hi = 1e-3f, lo = 1e-4f;
    assert_close(kvp_lr_at(0, 10, 111, hi, lo), 1e-4, 1e-10);
    assert_close(kvp_lr_at(4, 10, 111, hi, lo), 5e-4, 1e-10);
    assert_close(kvp_lr_at(9, 10, 111, hi, lo), 1e-3, 1e-10);
    assert_close(kvp_lr_at(10, 10, 111, hi, lo), 1e-3, 1e-10);
    assert_close(kvp_lr_at(35, 10, 111, hi, lo), 1e-4 + 0.9e-3 * (1 + cos(M_PI / 4)) / 2, 1e-9);
    assert_close(kvp_lr_at(60, 10, 111, hi, lo), 5.5e-4, 1e-9);
    assert_close(kvp_lr_at(110, 10, 111, hi, lo), 1e-4, 1e-10);
    assert_close(kvp_lr_at(500, 10, 111, hi, lo), 1e-4, 1e-10);
    /* no warm-up: the peak at step 0; a run too short to decay stays at the peak */
    assert_close(kvp_lr_at(0, 0, 101, hi, lo), 1e-3, 1e-10);
    assert_close(kvp_lr_at(0, 0, 1, hi, lo), 1e-3, 1e-10);
    /* monotone: never rises after the warm-up */
    for (int s = 11; s < 111; s++)
        assert_true(kvp_lr_at(s, 10, 111, hi, lo) <= kvp_lr_at(s - 1, 10, 111, hi, lo));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_steps_match_hand_worked_numbers),
        cmocka_unit_test(test_zero_gradient_only_decays_masked_weights),
        cmocka_unit_test(test_refuses_bad_settings),
        cmocka_unit_test(test_clip_scales_to_global_norm),
        cmocka_unit_test(test_schedule_at_known_steps),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
