/* Tests for kvp_cpus: CPU lists and per-stage settings are parsed or refused
 * as the flags of kvpred up, the services and bench handoff promise, and
 * pinning really changes the process's affinity. */
#include <sched.h>
#include <stdio.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "kvp_cpus.h"

static void test_check_accepts_lists(void **state) {
    (void)state;
    kvp_err_t err = {0};
    const char *good[] = {"0", "0-1", "0,2", "0-3,6", "1,3-4,7"};
    for (size_t i = 0; i < sizeof good / sizeof *good; i++)
        assert_int_equal(kvp_cpus_check(good[i], &err), KVP_OK);
}

static void test_check_refuses_with_message(void **state) {
    (void)state;
    const char *bad[] = {"", "x", "-1", "3-1", "0,", "0-", "0;1", "1-2x", "99999"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        kvp_err_t err = {0};
        assert_int_equal(kvp_cpus_check(bad[i], &err), KVP_EINVAL);
        assert_non_null(strstr(err.msg, "is not a CPU list"));
    }
}

static void test_threads3(void **state) {
    (void)state;
    int t[3] = {0, 0, 0};
    assert_int_equal(kvp_cpus_parse_threads3("2", t), 0);
    assert_true(t[0] == 2 && t[1] == 2 && t[2] == 2);
    assert_int_equal(kvp_cpus_parse_threads3("2,1,4", t), 0);
    assert_true(t[0] == 2 && t[1] == 1 && t[2] == 4);
    const char *bad[] = {"", "0", "1,2", "1,2,3,4", "1,,2", "a", "2,1,x", "1025", "1,2,3,"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(kvp_cpus_parse_threads3(bad[i], t), -1);
}

static void test_lists3(void **state) {
    (void)state;
    char buf[64];
    const char *c[3] = {NULL, NULL, NULL};
    assert_int_equal(kvp_cpus_parse_lists3("0-1", buf, sizeof buf, c), 0);
    assert_string_equal(c[0], "0-1");
    assert_string_equal(c[2], "0-1");
    assert_int_equal(kvp_cpus_parse_lists3("0-1/1/0,1", buf, sizeof buf, c), 0);
    assert_string_equal(c[0], "0-1");
    assert_string_equal(c[1], "1");
    assert_string_equal(c[2], "0,1");
    const char *bad[] = {"0/1", "0/1/2/3", "0//1", "a/b/c", ""};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(kvp_cpus_parse_lists3(bad[i], buf, sizeof buf, c), -1);
    char tiny[4];
    assert_int_equal(kvp_cpus_parse_lists3("0-1/1/0", tiny, sizeof tiny, c), -1);
}

/* Pins to the first CPU we may run on, reads the mask back, restores. */
static void test_pin_process(void **state) {
    (void)state;
    cpu_set_t old, now;
    assert_int_equal(sched_getaffinity(0, sizeof old, &old), 0);
    int first = -1;
    for (int i = 0; i < CPU_SETSIZE && first < 0; i++)
        if (CPU_ISSET(i, &old)) first = i;
    assert_true(first >= 0);
    char list[16];
    snprintf(list, sizeof list, "%d", first);
    kvp_err_t err = {0};
    assert_int_equal(kvp_cpus_pin_process(list, &err), KVP_OK);
    assert_int_equal(sched_getaffinity(0, sizeof now, &now), 0);
    assert_int_equal(CPU_COUNT(&now), 1);
    assert_true(CPU_ISSET(first, &now));
    assert_int_equal(sched_setaffinity(0, sizeof old, &old), 0);
    assert_int_equal(kvp_cpus_pin_process("nope", &err), KVP_EINVAL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_check_accepts_lists),
        cmocka_unit_test(test_check_refuses_with_message),
        cmocka_unit_test(test_threads3),
        cmocka_unit_test(test_lists3),
        cmocka_unit_test(test_pin_process),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
