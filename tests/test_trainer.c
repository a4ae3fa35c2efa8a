/* Tests of lib/kvp_trainer: a short run on a small synthetic corpus cuts the
 * loss by a stated margin; a run stopped after step k (in-process) or killed
 * with SIGKILL (a real `kvpred train` child) and resumed ends with weights
 * bit-identical to an uninterrupted run with the same seed; checkpoints that
 * are truncated, corrupt or from other settings are refused with a clear
 * error; the CSV log is cut back to the checkpoint on resume; and the GGUF
 * output loads with its vocabulary and training record. */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvp_ckpt.h"
#include "kvp_corpus.h"
#include "kvp_gguf.h"
#include "kvp_model.h"
#include "kvp_tokenizer.h"
#include "kvp_trainer.h"

#include "kvp_test_util.h"

static kvp_test_scratch_t g_s; /* scratch directory and synthetic corpus */

static int setup(void **state) {
    (void)state;
    kvp_test_scratch_init(&g_s, "trainer");
    return 0;
}

static int teardown(void **state) {
    (void)state;
    return kvp_test_scratch_remove(&g_s);
}

static const char *path_in(const char *name) {
    return kvp_test_path(&g_s, name);
}

static kvp_corpus_t *load_corpus(void) {
    return kvp_test_load_corpus(g_s.corpus);
}

static kvp_model_config_t tiny_cfg(void) {
    return (kvp_model_config_t){.n_vocab = kvp_tokenizer_bytelevel_n_vocab(0),
                                .n_embd = 32,
                                .n_layer = 2,
                                .n_head = 2,
                                .n_ff = 64,
                                .n_ctx_train = 32,
                                .tied_output = true};
}

static kvp_model_t *tiny_model(uint64_t seed) {
    kvp_model_t *m = NULL;
    kvp_err_t err = {0};
    kvp_model_config_t cfg = tiny_cfg();
    if (kvp_trainer_init_model(&m, &cfg, seed, &err)) fail_msg("init: %s", err.msg);
    return m;
}

static kvp_trainer_config_t tiny_train(int steps) {
    kvp_trainer_config_t t;
    kvp_trainer_config_default(&t);
    t.batch = 4;
    t.ctx = 32;
    t.steps = steps;
    t.warmup = 4;
    t.lr = 1e-2f;
    t.min_lr = 1e-3f;
    t.seed = 11;
    t.eval_every = 10;
    t.eval_tokens = 1024;
    t.ckpt_every = 0;
    return t;
}

/* ln(258) = 5.553 nats/token is where a fresh model starts (uniform). Sixty
 * steps of 4 x 32 tokens must at least halve the validation loss and the
 * training loss (measured: 5.49 -> 1.71 nats validation, a cut of 69%). */
static void test_short_run_cuts_the_loss(void **state) {
    (void)state;
    kvp_corpus_t *c = load_corpus();
    assert_true(kvp_corpus_stream(c, KVP_SPLIT_VAL)->n > 100);
    kvp_model_t *m = tiny_model(5);
    kvp_err_t err = {0};
    kvp_eval_t before;
    assert_int_equal(
        kvp_trainer_evaluate(m, kvp_corpus_stream(c, KVP_SPLIT_VAL), NULL, 4, 32, 0, &before, &err),
        0);
    assert_true(fabs(before.loss - log(258.0)) < 0.1);
    kvp_trainer_config_t t = tiny_train(60);
    t.log_path = path_in("short.csv");
    kvp_trainer_result_t r;
    if (kvp_trainer_run(m, c, &t, &r, &err)) fail_msg("run: %s", err.msg);
    assert_true(r.completed);
    assert_int_equal(r.step, 60);
    assert_int_equal(r.tokens, 60 * 4 * 32);
    print_message("val loss %.3f -> %.3f nats/token (%.3f bpb), train loss %.3f\n", before.loss,
                  r.val_loss, r.val_bpb, r.loss);
    assert_true(r.val_loss <= 0.5 * before.loss);
    assert_true(r.loss <= 0.5 * before.loss);
    /* bits per byte: nats / ln 2 over the bytes the scored tokens stand for */
    assert_true(r.val_bpb > r.val_loss / log(2.0));
    /* the log: a header and a row per step, validation every 10 */
    FILE *f = fopen(t.log_path, "r");
    assert_non_null(f);
    char line[512];
    int rows = 0, vals = 0;
    assert_non_null(fgets(line, sizeof line, f));
    assert_non_null(strstr(line, "step,tokens,lr,loss,train_bpb"));
    while (fgets(line, sizeof line, f)) {
        rows++;
        vals += strstr(line, ",,") == NULL;
    }
    fclose(f);
    assert_int_equal(rows, 60);
    assert_int_equal(vals, 6);
    kvp_model_free(&m);
    kvp_corpus_free(&c);
}

/* Uninterrupted: 12 steps. Interrupted: stop after 7 (checkpoints every 5,
 * evaluations every 4 in between), then resume to 12. Weights must be equal
 * bit for bit. */
static void test_stop_and_resume_is_bit_identical(void **state) {
    (void)state;
    kvp_corpus_t *c = load_corpus();
    kvp_err_t err = {0};
    kvp_trainer_result_t r;

    kvp_model_t *ref = tiny_model(3);
    kvp_trainer_config_t t = tiny_train(12);
    t.eval_every = 4;
    t.ckpt_path = path_in("ref.ckpt");
    t.ckpt_every = 5;
    if (kvp_trainer_run(ref, c, &t, &r, &err)) fail_msg("reference run: %s", err.msg);
    assert_true(r.completed);

    kvp_model_t *m = tiny_model(3);
    t.ckpt_path = path_in("stop.ckpt");
    t.log_path = path_in("stop.csv");
    t.stop_after = 7;
    if (kvp_trainer_run(m, c, &t, &r, &err)) fail_msg("first half: %s", err.msg);
    assert_false(r.completed);
    assert_int_equal(r.step, 7);
    assert_int_equal(memcmp(m->params, ref->params, m->n_params * sizeof(float)) != 0, 1);
    kvp_model_free(&m);

    /* a fresh process would start from new random weights: so do we */
    m = tiny_model(999);
    t.stop_after = 0;
    t.resume = true;
    if (kvp_trainer_run(m, c, &t, &r, &err)) fail_msg("resume: %s", err.msg);
    assert_true(r.resumed);
    assert_true(r.completed);
    assert_int_equal(r.step, 12);
    assert_int_equal(r.tokens, 12 * 4 * 32);
    assert_int_equal(m->n_params, ref->n_params);
    assert_memory_equal(m->params, ref->params, m->n_params * sizeof(float));

    /* the log holds each step once */
    assert_int_equal(kvp_test_count_lines(t.log_path), 1 + 12);
    kvp_model_free(&m);
    kvp_model_free(&ref);
    kvp_corpus_free(&c);
}

static void test_bad_checkpoints_are_refused(void **state) {
    (void)state;
    kvp_corpus_t *c = load_corpus();
    kvp_err_t err = {0};
    kvp_trainer_result_t r;
    kvp_model_t *m = tiny_model(1);
    kvp_trainer_config_t t = tiny_train(6);
    t.ckpt_path = path_in("bad.ckpt");
    t.stop_after = 3;
    if (kvp_trainer_run(m, c, &t, &r, &err)) fail_msg("run: %s", err.msg);
    t.stop_after = 0;
    t.resume = true;

    /* other settings */
    t.lr = 2e-2f;
    assert_int_not_equal(kvp_trainer_run(m, c, &t, &r, &err), 0);
    assert_non_null(strstr(err.msg, "lr=0.00999999978"));
    assert_non_null(strstr(err.msg, "lr=0.0199999996"));
    t.lr = 1e-2f;

    /* another model shape */
    kvp_model_config_t wide = tiny_cfg();
    wide.n_embd = 64;
    kvp_model_t *w = NULL;
    assert_int_equal(kvp_trainer_init_model(&w, &wide, 1, &err), 0);
    assert_int_not_equal(kvp_trainer_run(w, c, &t, &r, &err), 0);
    assert_non_null(strstr(err.msg, "n_params="));
    kvp_model_free(&w);

    /* truncated */
    struct stat st;
    assert_int_equal(stat(t.ckpt_path, &st), 0);
    assert_int_equal(truncate(t.ckpt_path, st.st_size / 2), 0);
    assert_int_equal(kvp_trainer_run(m, c, &t, &r, &err), KVP_EFORMAT);
    assert_non_null(strstr(err.msg, "truncated"));
    assert_non_null(strstr(err.msg, "bad.ckpt"));

    /* not a checkpoint at all */
    FILE *f = fopen(t.ckpt_path, "wb");
    fputs("hello", f);
    fclose(f);
    assert_int_equal(kvp_trainer_run(m, c, &t, &r, &err), KVP_EFORMAT);
    assert_non_null(strstr(err.msg, "not a kvpred checkpoint"));
    kvp_model_free(&m);
    kvp_corpus_free(&c);
}

static void test_output_gguf_loads_with_vocabulary_and_record(void **state) {
    (void)state;
    kvp_corpus_t *c = load_corpus();
    kvp_err_t err = {0};
    kvp_trainer_result_t r;
    kvp_model_t *m = tiny_model(2);
    kvp_trainer_config_t t = tiny_train(4);
    if (kvp_trainer_run(m, c, &t, &r, &err)) fail_msg("run: %s", err.msg);
    const char *out = path_in("out.gguf");
    if (kvp_trainer_save_gguf(m, out, "test model", NULL, 0, &t, &r, "kvpred train -o x", &err))
        fail_msg("save: %s", err.msg);
    kvp_gguf_t *g = NULL;
    assert_int_equal(kvp_gguf_open(&g, out, &err), 0);
    kvp_model_t *back = NULL;
    kvp_tokenizer_t *tok = NULL;
    assert_int_equal(kvp_model_from_gguf(&back, g, &err), 0);
    assert_int_equal(kvp_tokenizer_from_gguf(&tok, g, &err), 0);
    assert_memory_equal(back->params, m->params, m->n_params * sizeof(float));
    assert_int_equal(kvp_tokenizer_n_vocab(tok), 258);
    uint32_t steps = 0;
    float bpb = 0;
    assert_int_equal(kvp_gguf_get_u32(g, "kvpred.train.step", &steps, &err), 0);
    assert_int_equal(steps, 4);
    assert_int_equal(kvp_gguf_get_f32(g, "kvpred.train.val_bpb", &bpb, &err), 0);
    assert_true(fabs(bpb - r.val_bpb) < 1e-4);
    kvp_tokenizer_free(&tok);
    kvp_model_free(&back);
    kvp_gguf_free(&g);
    kvp_model_free(&m);
    kvp_corpus_free(&c);
}

/* ---- a real kill ------------------------------------------------------------ */

static pid_t spawn_train(const char *out, const char *ckpt, bool resume, int ckpt_every) {
    char every[16];
    snprintf(every, sizeof every, "%d", ckpt_every);
    const char *argv[] = {getenv("KVPRED"),
                          "train",
                          "--corpus",
                          g_s.corpus,
                          "--ext",
                          ".py",
                          "--holdout",
                          "10",
                          "--layers",
                          "2",
                          "--embd",
                          "32",
                          "--heads",
                          "2",
                          "--ffn",
                          "64",
                          "--ctx",
                          "32",
                          "--batch",
                          "4",
                          "--steps",
                          "200",
                          "--lr",
                          "0.01",
                          "--warmup",
                          "4",
                          "--seed",
                          "7",
                          "--ckpt",
                          ckpt,
                          "--ckpt-every",
                          every,
                          "--eval-every",
                          "0",
                          "--quiet",
                          "-o",
                          out,
                          resume ? "--resume" : NULL,
                          NULL};
    return kvp_test_spawn(argv, NULL);
}

static kvp_model_t *load(const char *path) {
    kvp_model_t *m = NULL;
    kvp_err_t err = {0};
    if (kvp_model_load(&m, path, &err)) fail_msg("load %s: %s", path, err.msg);
    return m;
}

static void test_killed_process_resumes_bit_identical(void **state) {
    (void)state;
    kvp_test_need_kvpred();
    const char *ref_out = path_in("kill-ref.gguf"), *ref_ckpt = path_in("kill-ref.ckpt");
    int st = kvp_test_wait(spawn_train(ref_out, ref_ckpt, false, 1));
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);

    const char *out = path_in("kill.gguf"), *ckpt = path_in("kill.ckpt");
    unlink(ckpt);
    pid_t pid = spawn_train(out, ckpt, false, 1);
    /* kill it once a few checkpoints exist, mid-run */
    struct timespec ts = {0, 2000000};
    for (int waited = 0; waited < 10000 && kvp_test_ckpt_step(ckpt) < 5; waited++)
        nanosleep(&ts, NULL);
    kill(pid, SIGKILL);
    st = kvp_test_wait(pid);
    assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    assert_int_equal(access(out, F_OK), -1); /* it never finished */

    st = kvp_test_wait(spawn_train(out, ckpt, true, 1));
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    kvp_model_t *a = load(ref_out), *b = load(out);
    assert_int_equal(a->n_params, b->n_params);
    assert_memory_equal(a->params, b->params, a->n_params * sizeof(float));
    kvp_model_free(&a);
    kvp_model_free(&b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_short_run_cuts_the_loss),
        cmocka_unit_test(test_stop_and_resume_is_bit_identical),
        cmocka_unit_test(test_bad_checkpoints_are_refused),
        cmocka_unit_test(test_output_gguf_loads_with_vocabulary_and_record),
        cmocka_unit_test(test_killed_process_resumes_bit_identical),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
