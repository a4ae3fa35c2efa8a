/* Tests of lib/kvp_ckpt: sections written and read back byte for byte, no
 * temp file left behind, and truncated, corrupt or foreign files refused with
 * a message that says which. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvp_ckpt.h"

static char g_path[1024];

static int setup(void **state) {
    (void)state;
    const char *base = getenv("KVP_TEST_TMP");
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", base ? base : "/tmp");
    if (system(cmd)) return -1;
    snprintf(g_path, sizeof g_path, "%s/ckpt-%ld.bin", base ? base : "/tmp", (long)getpid());
    return 0;
}

static int teardown(void **state) {
    (void)state;
    unlink(g_path);
    return 0;
}

static float g_a[1000];
static const char g_meta[] = "step=3\nlr=0.001\n";

static void write_sample(void) {
    for (int i = 0; i < 1000; i++)
        g_a[i] = (float)i * 0.25f - 7.0f;
    kvp_ckpt_section_t s[] = {
        {"meta", g_meta, sizeof g_meta - 1}, {"params", g_a, sizeof g_a}, {"empty", NULL, 0}};
    kvp_err_t err = {0};
    if (kvp_ckpt_write(g_path, s, 3, &err)) fail_msg("write: %s", err.msg);
}

static long file_size(const char *p) {
    struct stat st;
    return stat(p, &st) ? -1 : (long)st.st_size;
}

static void test_round_trip(void **state) {
    (void)state;
    write_sample();
    /* the temp file was renamed away */
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", g_path, (long)getpid());
    assert_int_equal(access(tmp, F_OK), -1);

    kvp_ckpt_t *c = NULL;
    kvp_err_t err = {0};
    assert_int_equal(kvp_ckpt_read(&c, g_path, &err), 0);
    float back[1000];
    assert_int_equal(kvp_ckpt_get(c, "params", back, sizeof back, &err), 0);
    assert_memory_equal(back, g_a, sizeof g_a);
    uint64_t n = 0;
    const char *m = kvp_ckpt_find(c, "meta", &n);
    assert_non_null(m);
    assert_int_equal(n, sizeof g_meta - 1);
    assert_memory_equal(m, g_meta, n);
    assert_non_null(kvp_ckpt_find(c, "empty", &n));
    assert_int_equal(n, 0);
    assert_null(kvp_ckpt_find(c, "nothing", NULL));
    /* another length is refused, naming both */
    float small[10];
    assert_int_equal(kvp_ckpt_get(c, "params", small, sizeof small, &err), KVP_ESHAPE);
    assert_non_null(strstr(err.msg, "4000 bytes"));
    assert_non_null(strstr(err.msg, "40"));
    assert_int_equal(kvp_ckpt_get(c, "nothing", small, sizeof small, &err), KVP_EFORMAT);
    assert_non_null(strstr(err.msg, "no section 'nothing'"));
    kvp_ckpt_free(&c);
    assert_null(c);
}

static void expect_refused(const char *what) {
    kvp_ckpt_t *c = NULL;
    kvp_err_t err = {0};
    int rc = kvp_ckpt_read(&c, g_path, &err);
    assert_true(rc < 0);
    assert_null(c);
    if (!strstr(err.msg, what)) fail_msg("message '%s' does not say '%s'", err.msg, what);
    assert_non_null(strstr(err.msg, g_path));
}

static void test_truncated_file_is_refused(void **state) {
    (void)state;
    write_sample();
    long n = file_size(g_path);
    assert_int_equal(truncate(g_path, n - 1), 0);
    expect_refused("truncated");
    assert_int_equal(truncate(g_path, 10), 0);
    expect_refused("too short");
    assert_int_equal(truncate(g_path, 0), 0);
    expect_refused("not a kvpred checkpoint");
}

static void test_flipped_byte_is_refused(void **state) {
    (void)state;
    write_sample();
    FILE *f = fopen(g_path, "r+b");
    assert_non_null(f);
    fseek(f, 2000, SEEK_SET);
    int ch = fgetc(f);
    fseek(f, 2000, SEEK_SET);
    fputc(ch ^ 0x10, f);
    fclose(f);
    expect_refused("checksum");
}

static void test_foreign_file_is_refused(void **state) {
    (void)state;
    FILE *f = fopen(g_path, "wb");
    assert_non_null(f);
    for (int i = 0; i < 100; i++)
        fputs("GGUF is not a checkpoint ", f);
    fclose(f);
    expect_refused("bad magic");
}

static void test_unwritable_path_is_a_clear_error(void **state) {
    (void)state;
    kvp_err_t err = {0};
    kvp_ckpt_section_t s = {"x", "y", 1};
    assert_int_equal(kvp_ckpt_write("/nonexistent-dir/a.ckpt", &s, 1, &err), KVP_EIO);
    assert_non_null(strstr(err.msg, "/nonexistent-dir/a.ckpt"));
    kvp_ckpt_t *c = NULL;
    assert_int_equal(kvp_ckpt_read(&c, "/nonexistent-dir/a.ckpt", &err), KVP_EIO);
    assert_non_null(strstr(err.msg, "No such file"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_truncated_file_is_refused),
        cmocka_unit_test(test_flipped_byte_is_refused),
        cmocka_unit_test(test_foreign_file_is_refused),
        cmocka_unit_test(test_unwritable_path_is_a_clear_error),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
