/* Tests for the stages' shared request list (lib/kvp_svc_util): lookup,
 * removal passing the turn on, and round-robin fairness — two requests that
 * both have work must take turns, which a loop asking "busy?" with
 * next_work used to break (the turn moved twice per unit). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "kvp_svc_util.h"

typedef struct {
    kvp_svc_req_t h; /* first, as in every stage's request record */
    int work;
} req_t;

static int has_work(const kvp_svc_req_t *q) {
    return ((const req_t *)q)->work;
}

static void make(kvp_svc_reqs_t *l, req_t *r, int n) {
    memset(l, 0, sizeof *l);
    for (int i = 0; i < n; i++) {
        memset(&r[i], 0, sizeof r[i]);
        snprintf(r[i].h.id, sizeof r[i].h.id, "r%d", i);
        r[i].work = 1;
        kvp_svc_reqs_add(l, &r[i].h);
    }
}

/* What a stage loop does once per turn: ask whether it is busy, then take
 * the next request with work. */
static kvp_svc_req_t *loop_turn(kvp_svc_reqs_t *l) {
    if (!kvp_svc_reqs_any_work(l, has_work)) return NULL;
    return kvp_svc_reqs_next_work(l, has_work);
}

static void test_two_requests_alternate(void **state) {
    (void)state;
    kvp_svc_reqs_t l;
    req_t r[2];
    make(&l, r, 2);
    int served[2] = {0, 0};
    kvp_svc_req_t *prev = NULL;
    for (int i = 0; i < 10; i++) {
        kvp_svc_req_t *q = loop_turn(&l);
        assert_non_null(q);
        assert_ptr_not_equal(q, prev);
        served[q == &r[1].h]++;
        prev = q;
    }
    assert_int_equal(served[0], 5);
    assert_int_equal(served[1], 5);
}

static void test_three_rotate_and_skip_idle(void **state) {
    (void)state;
    kvp_svc_reqs_t l;
    req_t r[3];
    make(&l, r, 3);
    int served[3] = {0, 0, 0};
    for (int i = 0; i < 9; i++) {
        kvp_svc_req_t *q = loop_turn(&l);
        served[(req_t *)q - r]++;
    }
    assert_true(served[0] == 3 && served[1] == 3 && served[2] == 3);
    r[1].work = 0;
    for (int i = 0; i < 6; i++)
        assert_ptr_not_equal(loop_turn(&l), &r[1].h);
    r[0].work = r[2].work = 0;
    assert_null(loop_turn(&l));
    assert_false(kvp_svc_reqs_any_work(&l, has_work));
}

static void test_find_and_remove(void **state) {
    (void)state;
    kvp_svc_reqs_t l;
    req_t r[3];
    make(&l, r, 3);
    assert_int_equal(l.n, 3);
    assert_ptr_equal(kvp_svc_reqs_find(&l, "r1"), &r[1].h);
    assert_null(kvp_svc_reqs_find(&l, "r9"));
    kvp_svc_req_t *q = kvp_svc_reqs_next_work(&l, has_work);
    kvp_svc_reqs_remove(&l, q);
    assert_int_equal(l.n, 2);
    assert_null(kvp_svc_reqs_find(&l, q->id));
    assert_ptr_not_equal(l.turn, q);
    /* the two left still alternate */
    kvp_svc_req_t *a = loop_turn(&l), *b = loop_turn(&l);
    assert_non_null(a);
    assert_non_null(b);
    assert_ptr_not_equal(a, b);
}

static void test_expired(void **state) {
    (void)state;
    kvp_svc_reqs_t l;
    req_t r[2];
    make(&l, r, 2);
    r[0].h.deadline = 10.0;
    r[1].h.deadline = 20.0;
    assert_null(kvp_svc_reqs_expired(&l, 9.0, 0.5));
    assert_ptr_equal(kvp_svc_reqs_expired(&l, 10.6, 0.5), &r[0].h);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_requests_alternate),
        cmocka_unit_test(test_three_rotate_and_skip_idle),
        cmocka_unit_test(test_find_and_remove),
        cmocka_unit_test(test_expired),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
