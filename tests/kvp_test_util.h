/* kvp_test_util: fixtures the training tests share (tests/test_train.c,
 * test_trainer.c, test_kvptrain.c): a scratch directory with a small
 * synthetic corpus, small models with non-trivial norm weights, the
 * parameter tensors by name, and starting and waiting for a real `kvpred`.
 * Failures end the calling test through cmocka (fail_msg), so a helper is
 * used like an assertion. Not a test itself: linked into the tests as a
 * library. */
#ifndef KVP_TEST_UTIL_H
#define KVP_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "kvp_corpus.h"
#include "kvp_matvec16.h"
#include "kvp_model.h"

/* ---- scratch directory and corpus ------------------------------------------ */

typedef struct kvp_test_scratch {
    char dir[1024];    /* $KVP_TEST_TMP (or /tmp) / NAME-PID */
    char corpus[1100]; /* DIR/corpus: 40 small "Python" files */
    char paths[32][1200];
    int next;
} kvp_test_scratch_t;

/* Makes the directory afresh and writes the corpus: 40 files with a regular
 * structure, so that a tiny model learns a lot of it in a few dozen steps. */
void kvp_test_scratch_init(kvp_test_scratch_t *s, const char *name);
/* Removes the directory; 0 on success (for a cmocka teardown). */
int kvp_test_scratch_remove(const kvp_test_scratch_t *s);
/* DIR/name, in one of 32 rotating buffers. */
const char *kvp_test_path(kvp_test_scratch_t *s, const char *name);

/* The corpus of `dir` (*.py, holdout 10%), train and validation splits
 * tokenized with the byte-level vocabulary. */
kvp_corpus_t *kvp_test_load_corpus(const char *dir);

/* ---- models --------------------------------------------------------------- */

/* A random model (weights N(0, std)) whose norm weights are drawn from
 * [0.5, 1.5) with seed+1, so that the norms' gradients are not trivial. */
kvp_model_t *kvp_test_model(kvp_model_config_t cfg, uint64_t seed, float std);

/* A named parameter tensor of a model. */
typedef struct kvp_test_tensor {
    char name[32];
    float *p;
    size_t n;
} kvp_test_tensor_t;

/* Every parameter tensor of m in ts (room for 2 + 9 x n_layer); the count. */
int kvp_test_model_tensors(const kvp_model_t *m, kvp_test_tensor_t *ts);

/* ---- a real kvpred ----------------------------------------------------------- */

/* Skips the calling test unless KVPRED names the kvpred binary. */
void kvp_test_need_kvpred(void);
/* Starts argv[0] with argv; stdout to /dev/null, stderr to errfile (NULL:
 * inherited). */
pid_t kvp_test_spawn(const char *const *argv, const char *errfile);
/* Waits for pid; its wait status. */
int kvp_test_wait(pid_t pid);
/* The step= of a checkpoint's metadata (-1: no readable checkpoint). */
int kvp_test_ckpt_step(const char *path);
/* The lines of a text file (fails the test if it cannot be read). */
int kvp_test_count_lines(const char *path);
/* The start of a text file, NUL-terminated, in buf. */
void kvp_test_read_text(const char *path, char *buf, size_t cap);

/* ---- forward steps and model files (tests/test_matvec16.c, test_q8.c) -------- */

/* The kvp_matvec16 ISAs this CPU can run (out[0] plain); the AVX-512 one is
 * left out, and said so, on a CPU without it. */
int kvp_test_isas(kvp_mv16_isa_t out[2]);
/* A runner of `threads` threads on `isa`; failures fail the test. */
kvp_matvec16_t *kvp_test_runner(int threads, kvp_mv16_isa_t isa);

/* $KVP_TEST_TMP (or /tmp, made if missing) / TEST_PID_NAME in buf. */
void kvp_test_tmp_path(char *buf, size_t cap, const char *test, const char *name);
/* m written as a GGUF file with its matrices in `type`; failures fail the test. */
void kvp_test_save_model(const kvp_model_t *m, kvp_ggml_type_t type, const char *path);
kvp_model_t *kvp_test_load_model(const char *path);

/* max |a - b| over max |b| (over 1 when b is all zero). */
double kvp_test_rel_err(const float *a, const float *b, size_t n);

/* A context, a cache of cap positions and room for cap rows of logits. */
typedef struct kvp_test_stepper {
    kvp_model_ctx_t *ctx;
    kvp_kvcache_t *cache;
    float *logits;
} kvp_test_stepper_t;

kvp_test_stepper_t kvp_test_stepper_new(const kvp_model_t *m, int cap);
void kvp_test_stepper_free(kvp_test_stepper_t *s);
/* n tokens forward into s->logits; a failure fails the test. */
void kvp_test_step(kvp_test_stepper_t *s, const int32_t *tok, int n, kvp_logits_mode_t mode);

#endif
