/* The pipeline's three stages as threads of this process over inproc://
 * (the same code the service processes run): their greedy tokens must equal
 * in-process KV Prediction token for token, baseline mode must equal the base
 * model alone and aux-only mode the auxiliary model alone, with several
 * requests in flight; every trace must be complete with parts summing to the
 * TTFT; a predictor fitted for another auxiliary model is refused at the
 * handshake; a missing decoder is a named error, not a hang.
 * tests/cli_pipeline.sh runs the same checks on real processes over tcp and
 * ipc. */
#include <pthread.h>
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
#include <zmq.h>

#include "kvp_client.h"
#include "kvp_kvpgen.h"
#include "kvp_rng.h"
#include "kvp_svc.h"
#include "kvpred.pb-c.h"

typedef struct {
    kvp_model_t *base, *aux, *aux2;
    kvp_tokenizer_t *tok;
    kvp_predictor_t *pred;
} fixture_t;

static kvp_model_t *model(int n_layer, int n_embd, int n_kv, uint64_t seed) {
    kvp_model_config_t cfg = {.n_vocab = kvp_tokenizer_bytelevel_n_vocab(0),
                              .n_embd = n_embd,
                              .n_layer = n_layer,
                              .n_head = 4,
                              .n_kv_head = n_kv,
                              .n_ff = 2 * n_embd,
                              .n_ctx_train = 512};
    kvp_model_t *m = NULL;
    kvp_err_t err = {0};
    if (kvp_model_new_random(&m, &cfg, seed, 0.25f, &err)) fail_msg("%s", err.msg);
    return m;
}

static int setup(void **state) {
    fixture_t *f = calloc(1, sizeof *f);
    kvp_err_t err = {0};
    f->base = model(3, 64, 2, 1);
    f->aux = model(2, 32, 2, 2);
    f->aux2 = model(2, 32, 2, 3);
    assert_int_equal(
        kvp_predictor_new(&f->pred, kvp_kv_shape_of(f->aux), kvp_kv_shape_of(f->base), NULL, &err),
        0);
    kvp_rng_t r;
    kvp_rng_seed(&r, 4);
    for (size_t i = 0; i < f->pred->n_params; i++)
        f->pred->params[i] = 0.3f * kvp_rng_normal(&r);
    assert_int_equal(kvp_predictor_bind(f->pred, f->aux, f->base, &err), 0);
    /* the byte-level vocabulary, through a file as a model would carry it */
    const char *dir = getenv("KVP_TEST_TMP") ? getenv("KVP_TEST_TMP") : "/tmp";
    mkdir(dir, 0755);
    char path[512];
    snprintf(path, sizeof path, "%s/test_pipeline_vocab_%d.gguf", dir, (int)getpid());
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    assert_int_equal(kvp_tokenizer_write_bytelevel(w, NULL, 0, &err), 0);
    assert_int_equal(kvp_gguf_writer_write(w, path, &err), 0);
    kvp_gguf_writer_free(&w);
    kvp_gguf_t *g;
    assert_int_equal(kvp_gguf_open(&g, path, &err), 0);
    assert_int_equal(kvp_tokenizer_from_gguf(&f->tok, g, &err), 0);
    kvp_gguf_free(&g);
    unlink(path);
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture_t *f = *state;
    kvp_model_free(&f->base);
    kvp_model_free(&f->aux);
    kvp_model_free(&f->aux2);
    kvp_tokenizer_free(&f->tok);
    kvp_predictor_free(&f->pred);
    free(f);
    return 0;
}

/* ---- a pipeline of threads ---------------------------------------------- */

typedef struct {
    void *ctx;
    atomic_int stop;
    kvp_aux_cfg_t aux;
    kvp_pred_cfg_t pred;
    kvp_dec_cfg_t dec;
    pthread_t th[3];
    int started[3];
    int rc[3];
    kvp_err_t err[3];
    char ep[3][64];
    FILE *log;
} pipe_t;

static void *run_aux(void *p) {
    pipe_t *x = p;
    x->rc[0] = kvp_svc_aux_run(&x->aux, &x->err[0]);
    return NULL;
}
static void *run_pred(void *p) {
    pipe_t *x = p;
    x->rc[1] = kvp_svc_pred_run(&x->pred, &x->err[1]);
    return NULL;
}
static void *run_dec(void *p) {
    pipe_t *x = p;
    x->rc[2] = kvp_svc_dec_run(&x->dec, &x->err[2]);
    return NULL;
}

static void common(pipe_t *x, kvp_svc_common_t *c) {
    kvp_svc_common_init(c);
    c->zmq_ctx = x->ctx;
    c->stop = &x->stop;
    c->log = x->log;
    c->ping_interval = 0.05;
    c->peer_timeout = 0.5;
}

/* Starts the stages named in `which` ("apd": aux, predictor, decoder). */
static pipe_t *pipe_start(fixture_t *f, const kvp_model_t *aux, const char *which, int tag) {
    pipe_t *x = calloc(1, sizeof *x);
    x->ctx = zmq_ctx_new();
    x->log = tmpfile();
    atomic_init(&x->stop, 0);
    for (int i = 0; i < 3; i++)
        snprintf(x->ep[i], sizeof x->ep[i], "inproc://pipe-%d-%d", tag, i);
    common(x, &x->aux.c);
    x->aux.listen = x->ep[0];
    x->aux.downstream = x->ep[1];
    x->aux.model = aux;
    x->aux.tok = f->tok;
    x->aux.chunk_tokens = 24; /* with the default tail of 16: uneven chunks */
    common(x, &x->pred.c);
    x->pred.listen = x->ep[1];
    x->pred.downstream = x->ep[2];
    x->pred.pred = f->pred;
    common(x, &x->dec.c);
    x->dec.listen = x->ep[2];
    x->dec.model = f->base;
    x->dec.tok = f->tok;
    x->dec.credits = 2;
    void *(*fn[3])(void *) = {run_aux, run_pred, run_dec};
    for (int i = 2; i >= 0; i--)
        if (strchr(which, "apd"[i])) {
            pthread_create(&x->th[i], NULL, fn[i], x);
            x->started[i] = 1;
        }
    return x;
}

static void pipe_stop(pipe_t *x) {
    atomic_store(&x->stop, 1);
    for (int i = 0; i < 3; i++)
        if (x->started[i]) {
            pthread_join(x->th[i], NULL);
            if (x->rc[i]) fail_msg("stage %d: %s", i, x->err[i].msg);
        }
    fclose(x->log);
    zmq_ctx_term(x->ctx);
    free(x);
}

typedef struct {
    int32_t toks[64];
    int n;
} collect_t;

static int collect(void *user, int32_t tok) {
    collect_t *c = user;
    c->toks[c->n++] = tok;
    return 0;
}

static void prompt_of(int32_t *p, int n, uint64_t seed) {
    kvp_rng_t r;
    kvp_rng_seed(&r, seed);
    for (int i = 0; i < n; i++)
        p[i] = (int32_t)kvp_rng_below(&r, 256);
}

/* The expected tokens of each mode, from the in-process code paths. */
static void expected(fixture_t *f, int mode, const int32_t *prompt, int n, int n_predict,
                     collect_t *out) {
    kvp_gen_params_t gp = {.n_predict = n_predict, .sampler = {.top_p = 1.0f}};
    kvp_err_t err = {0};
    memset(out, 0, sizeof *out);
    int rc = mode == KVPRED__MODE__MODE_KVP ? kvp_kvp_generate(f->aux, f->base, f->pred, prompt, n,
                                                               &gp, -1, collect, out, NULL, &err)
             : mode == KVPRED__MODE__MODE_BASELINE
                 ? kvp_generate(f->base, prompt, n, &gp, -1, collect, out, NULL, &err)
                 : kvp_generate(f->aux, prompt, n, &gp, -1, collect, out, NULL, &err);
    if (rc) fail_msg("%s", err.msg);
}

static void test_pipeline_tokens_equal_in_process_generation(void **state) {
    fixture_t *f = *state;
    pipe_t *x = pipe_start(f, f->aux, "apd", 1);
    kvp_client_t *c = NULL;
    kvp_err_t err = {0};
    if (kvp_client_new(&c, x->ctx, x->ep[0], NULL, 5.0, &err)) fail_msg("%s", err.msg);
    enum { N = 9 };
    static const int lens[N] = {1, 2, 17, 40, 130, 33, 5, 64, 16};
    static const int modes[N] = {0, 0, 0, 0, 0, 1, 1, 2, 2};
    int32_t prompts[N][130];
    kvp_client_req_t reqs[N];
    char ids[N][16];
    for (int i = 0; i < N; i++) {
        prompt_of(prompts[i], lens[i], 10 + i);
        snprintf(ids[i], sizeof ids[i], "r%d", i);
        reqs[i] = (kvp_client_req_t){.id = ids[i],
                                     .tokens = prompts[i],
                                     .n_tokens = lens[i],
                                     .mode = modes[i],
                                     .n_predict = 12,
                                     .ignore_eos = 1,
                                     .chunk_tokens = i == 4 ? 7 : 0};
    }
    kvp_client_result_t res[N];
    assert_int_equal(kvp_client_run(c, reqs, N, 3, 60.0, NULL, NULL, res, &err), 0);
    for (int i = 0; i < N; i++) {
        if (res[i].code) fail_msg("request %d failed at %s: %s", i, res[i].stage, res[i].error);
        collect_t want;
        expected(f, modes[i], prompts[i], lens[i], 12, &want);
        assert_int_equal(res[i].n_tokens, 12);
        if (memcmp(res[i].tokens, want.toks, sizeof(int32_t) * 12))
            fail_msg("request %d (mode %d, %d tokens): pipeline tokens differ", i, modes[i],
                     lens[i]);
        /* the trace is complete and its parts add up to the TTFT */
        kvp_trace_set_t *s = kvp_trace_set_new();
        for (size_t k = 0; k < res[i].n_events; k++)
            kvp_trace_set_add(s, &res[i].events[k], &err);
        kvp_trace_req_t *tr = NULL;
        size_t n_tr = 0;
        assert_int_equal(kvp_trace_analyze(s, &tr, &n_tr, &err), 0);
        assert_int_equal(n_tr, 1);
        if (!tr[0].complete) fail_msg("request %d: trace incomplete: %s", i, tr[0].reason);
        assert_true(tr[0].sum_err_ns < 1000000);
        assert_true(tr[0].ttft_ns > 0);
        assert_int_equal((int)tr[0].mode, modes[i]);
        if (modes[i] == 0 && lens[i] > 1) {
            int st[64];
            assert_int_equal(tr[0].n_chunks,
                             kvp_svc_plan_chunks(lens[i] - 1, i == 4 ? 7 : 24, 16, st));
        }
        free(tr);
        kvp_trace_set_free(&s);
        kvp_client_result_free(&res[i]);
    }
    kvp_client_free(&c);
    pipe_stop(x);
}

static void test_mismatched_auxiliary_model_refused_at_handshake(void **state) {
    fixture_t *f = *state;
    /* aux2 has the aux's shape but other weights: the predictor was not fitted for it */
    pipe_t *x = pipe_start(f, f->aux2, "apd", 2);
    kvp_client_t *c = NULL;
    kvp_err_t err = {0};
    if (kvp_client_new(&c, x->ctx, x->ep[0], NULL, 5.0, &err)) fail_msg("%s", err.msg);
    usleep(300000); /* let aux-prefill's handshake with the predictor be refused */
    int32_t p[5] = {1, 2, 3, 4, 5};
    kvp_client_req_t q = {.id = "m1", .tokens = p, .n_tokens = 5, .n_predict = 4};
    kvp_client_result_t res;
    assert_int_equal(kvp_client_run(c, &q, 1, 1, 10.0, NULL, NULL, &res, &err), 0);
    assert_int_not_equal(res.code, 0);
    if (!strstr(res.error, "aux_fingerprint") && !strstr(res.error, "refused"))
        fail_msg("error does not name the refusal: %s", res.error);
    /* the log names the field and both values */
    fflush(x->log);
    rewind(x->log);
    char line[1024];
    int named = 0;
    while (fgets(line, sizeof line, x->log))
        named |= strstr(line, "aux_fingerprint") != NULL;
    assert_true(named);
    kvp_client_result_free(&res);
    kvp_client_free(&c);
    pipe_stop(x);
}

static void test_missing_decoder_is_a_named_error(void **state) {
    fixture_t *f = *state;
    pipe_t *x = pipe_start(f, f->aux, "ap", 3);
    kvp_client_t *c = NULL;
    kvp_err_t err = {0};
    if (kvp_client_new(&c, x->ctx, x->ep[0], NULL, 5.0, &err)) fail_msg("%s", err.msg);
    usleep(200000);
    int32_t p[20];
    prompt_of(p, 20, 1);
    kvp_client_req_t q = {
        .id = "d1", .tokens = p, .n_tokens = 20, .n_predict = 4, .deadline_ms = 3000};
    kvp_client_result_t res;
    assert_int_equal(kvp_client_run(c, &q, 1, 1, 10.0, NULL, NULL, &res, &err), 0);
    assert_int_not_equal(res.code, 0);
    if (!strstr(res.error, "decoder")) fail_msg("error does not name the decoder: %s", res.error);
    kvp_client_result_free(&res);
    /* aux-only still works without the others */
    kvp_client_req_t q2 = {.id = "d2", .tokens = p, .n_tokens = 20, .n_predict = 4, .mode = 2};
    assert_int_equal(kvp_client_run(c, &q2, 1, 1, 10.0, NULL, NULL, &res, &err), 0);
    assert_int_equal(res.code, 0);
    assert_int_equal(res.n_tokens, 4);
    kvp_client_result_free(&res);
    kvp_client_free(&c);
    pipe_stop(x);
}

static void test_busy_decoder_answers_at_once(void **state) {
    fixture_t *f = *state;
    pipe_t *x = pipe_start(f, f->aux, "", 4);
    x->dec.c.max_requests = 1;
    x->aux.c.max_requests = 8;
    x->pred.c.max_requests = 8;
    void *(*fn[3])(void *) = {run_aux, run_pred, run_dec};
    for (int i = 2; i >= 0; i--) {
        pthread_create(&x->th[i], NULL, fn[i], x);
        x->started[i] = 1;
    }
    kvp_client_t *c = NULL;
    kvp_err_t err = {0};
    if (kvp_client_new(&c, x->ctx, x->ep[0], NULL, 5.0, &err)) fail_msg("%s", err.msg);
    usleep(200000);
    int32_t p[30];
    prompt_of(p, 30, 2);
    kvp_client_req_t q[3];
    for (int i = 0; i < 3; i++)
        q[i] = (kvp_client_req_t){.id = i == 0   ? "b0"
                                        : i == 1 ? "b1"
                                                 : "b2",
                                  .tokens = p,
                                  .n_tokens = 30,
                                  .n_predict = 60,
                                  .ignore_eos = 1};
    kvp_client_result_t res[3];
    assert_int_equal(kvp_client_run(c, q, 3, 3, 30.0, NULL, NULL, res, &err), 0);
    int ok = 0, busy = 0;
    for (int i = 0; i < 3; i++) {
        ok += res[i].code == 0;
        busy += res[i].code == KVP_EBUSY && strstr(res[i].error, "busy") != NULL;
        kvp_client_result_free(&res[i]);
    }
    assert_true(ok >= 1);
    assert_true(busy >= 1);
    assert_int_equal(ok + busy, 3);
    kvp_client_free(&c);
    pipe_stop(x);
}

static void test_chunk_plan_halves_toward_the_end(void **state) {
    (void)state;
    int st[64];
    int want1[] = {0, 128, 256, 278, 284, 300};
    assert_int_equal(kvp_svc_plan_chunks(300, 128, 16, st), 5);
    assert_memory_equal(st, want1, sizeof want1);
    int want2[] = {0, 128, 256, 300};
    assert_int_equal(kvp_svc_plan_chunks(300, 128, -1, st), 3);
    assert_memory_equal(st, want2, sizeof want2);
    assert_int_equal(kvp_svc_plan_chunks(0, 128, 16, st), 0);
    assert_int_equal(st[0], 0);
    assert_int_equal(kvp_svc_plan_chunks(5, 128, 16, st), 1);
    /* every plan covers [0, n) with increasing boundaries and a last chunk <= tail */
    for (int n = 1; n < 2000; n += 37) {
        int k = kvp_svc_plan_chunks(n, 100, 16, st);
        assert_true(k <= n / 100 + 34);
        assert_int_equal(st[0], 0);
        assert_int_equal(st[k], n);
        for (int i = 0; i < k; i++)
            assert_true(st[i + 1] > st[i] && st[i + 1] - st[i] <= 100);
        assert_true(st[k] - st[k - 1] <= 16);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chunk_plan_halves_toward_the_end),
        cmocka_unit_test(test_pipeline_tokens_equal_in_process_generation),
        cmocka_unit_test(test_mismatched_auxiliary_model_refused_at_handshake),
        cmocka_unit_test(test_missing_decoder_is_a_named_error),
        cmocka_unit_test(test_busy_decoder_answers_at_once),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
