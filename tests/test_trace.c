/* Tests for kvp_trace: logs of four stages whose clocks disagree (predictor
 * +5 s, decoder -3 s, client +0.25 s against the entry stage) are written,
 * read back and merged; the TTFT breakdown must equal hand-computed values and
 * telescope to TTFT; damaged and foreign files must be handled; the Chrome
 * trace must hold the expected events; and `kvpred trace` must run. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvp_trace.h"

#define T0 INT64_C(1700000000000000000) /* entry-clock origin of the test requests */
#define US INT64_C(1000)
#define MS INT64_C(1000000)

/* Each stage's clock minus the entry clock, and the estimate's error bound. */
#define OFF_AUX INT64_C(0)
#define OFF_PRED (5000 * MS)
#define OFF_DEC (-3000 * MS)
#define OFF_CLIENT (250 * MS)
#define ERR_PRED (20 * US)
#define ERR_DEC (35 * US)
#define ERR_CLIENT (50 * US)

static char g_dir[512];
static char g_aux[600], g_pred[600], g_dec[600], g_client[600];

static void path_in(char *out, size_t cap, const char *name) {
    snprintf(out, cap, "%s/%s", g_dir, name);
}

typedef struct {
    kvp_trace_writer_t *w;
    int64_t off;
} stage_t;

/* An event at t_us microseconds after T0 on the entry clock, stamped with the
 * stage's own clock. */
static void ev(stage_t *s, const char *id, const char *event, int chunk, int64_t t_us) {
    assert_int_equal(kvp_trace_emit(s->w, id, event, chunk, T0 + t_us * US + s->off, NULL, 0), 0);
}

static void ev_num(stage_t *s, const char *id, const char *event, int chunk, int64_t t_us,
                   const char *k1, double v1, const char *k2, double v2) {
    kvp_trace_num_t nums[2];
    memset(nums, 0, sizeof nums);
    snprintf(nums[0].key, sizeof nums[0].key, "%s", k1);
    nums[0].v = v1;
    int n = 1;
    if (k2) {
        snprintf(nums[1].key, sizeof nums[1].key, "%s", k2);
        nums[1].v = v2;
        n = 2;
    }
    assert_int_equal(kvp_trace_emit(s->w, id, event, chunk, T0 + t_us * US + s->off, nums, n), 0);
}

/* A KV Prediction request of n_chunks chunks starting at t (us); with_cc
 * false leaves out cache_complete. Chunk k: aux prefill [t+2000+3000k,
 * t+4500+3000k], sent +100, predictor receives +300 and has mapped +1000,
 * decoder receives +1250 and has written +1550 after the aux chunk end. */
static void kvp_request(stage_t *aux, stage_t *pred, stage_t *dec, const char *id, int64_t t,
                        int n_chunks, bool with_cc) {
    ev_num(aux, id, KVP_EV_ACCEPTED, -1, t, KVP_NUM_MODE, 0, NULL, 0);
    ev_num(aux, id, KVP_EV_TOKENIZED, -1, t + 500, KVP_NUM_CHUNKS, n_chunks, KVP_NUM_TOKENS, 512);
    ev(aux, id, KVP_EV_RESERVED, -1, t + 1000);
    int64_t end = 0;
    for (int k = 0; k < n_chunks; k++) {
        int64_t start = t + 2000 + 3000 * k;
        end = t + 4500 + 3000 * k;
        ev(aux, id, KVP_EV_AUX_CHUNK_START, k, start);
        ev(aux, id, KVP_EV_AUX_CHUNK_END, k, end);
        ev_num(aux, id, KVP_EV_CHUNK_SENT, k, end + 100, KVP_NUM_BYTES, 65536, NULL, 0);
        ev(pred, id, KVP_EV_PRED_RECV, k, end + 300);
        ev(pred, id, KVP_EV_PRED_MAPPED, k, end + 1000);
        ev(pred, id, KVP_EV_PRED_SENT, k, end + 1050);
        ev(dec, id, KVP_EV_DEC_RECV, k, end + 1250);
        ev(dec, id, KVP_EV_DEC_WRITTEN, k, end + 1550);
    }
    int64_t cc = end + 1560, ft = cc + 4000;
    if (with_cc) ev(dec, id, KVP_EV_CACHE_COMPLETE, -1, cc);
    ev(dec, id, KVP_EV_FIRST_TOKEN, -1, ft);
    for (int i = 0; i < 8; i++)
        ev(dec, id, KVP_EV_TOKEN, i, ft + 2000 * i);
    ev_num(dec, id, KVP_EV_DONE, -1, ft + 14010, KVP_NUM_TOKENS, 8, NULL, 0);
}

static int write_logs(void **state) {
    (void)state;
    const char *tmp = getenv("KVP_TEST_TMP");
    if (!tmp || !*tmp) tmp = "/tmp";
    mkdir(tmp, 0755);
    snprintf(g_dir, sizeof g_dir, "%s/test_trace_%d", tmp, (int)getpid());
    if (mkdir(g_dir, 0755) != 0 && errno != EEXIST) return -1;
    path_in(g_aux, sizeof g_aux, "aux.msgpack");
    path_in(g_pred, sizeof g_pred, "pred.msgpack");
    path_in(g_dec, sizeof g_dec, "dec.msgpack");
    path_in(g_client, sizeof g_client, "client.msgpack");
    unlink(g_aux), unlink(g_pred), unlink(g_dec), unlink(g_client);

    kvp_err_t err = {0};
    stage_t aux = {NULL, OFF_AUX}, pred = {NULL, OFF_PRED}, dec = {NULL, OFF_DEC},
            cli = {NULL, OFF_CLIENT};
    if (kvp_trace_writer_new(g_aux, KVP_STAGE_AUX, "hostA", &aux.w, &err) ||
        kvp_trace_writer_new(g_pred, KVP_STAGE_PREDICTOR, "hostB", &pred.w, &err) ||
        kvp_trace_writer_new(g_dec, KVP_STAGE_DECODER, "hostC", &dec.w, &err) ||
        kvp_trace_writer_new(g_client, KVP_STAGE_CLIENT, "hostD", &cli.w, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    kvp_trace_writer_set_offset(pred.w, OFF_PRED, ERR_PRED);
    kvp_trace_writer_set_offset(dec.w, OFF_DEC, ERR_DEC);
    kvp_trace_writer_set_offset(cli.w, OFF_CLIENT, ERR_CLIENT);

    /* r-kvp: 4 chunks, with client records */
    ev(&cli, "r-kvp", KVP_EV_CLIENT_SEND, -1, -300);
    kvp_request(&aux, &pred, &dec, "r-kvp", 0, 4, true);
    ev(&cli, "r-kvp", KVP_EV_CLIENT_FIRST_TOKEN, -1, 19300);
    ev(&cli, "r-kvp", KVP_EV_CLIENT_DONE, -1, 33400);

    /* r-base: baseline, the decoder prefills itself */
    ev_num(&aux, "r-base", KVP_EV_ACCEPTED, -1, 100000, KVP_NUM_MODE, 1, NULL, 0);
    ev(&aux, "r-base", KVP_EV_TOKENIZED, -1, 100400);
    ev(&aux, "r-base", KVP_EV_RESERVED, -1, 100900);
    ev(&dec, "r-base", KVP_EV_DEC_PREFILL_START, -1, 101200);
    ev(&dec, "r-base", KVP_EV_DEC_PREFILL_END, -1, 131200);
    ev(&dec, "r-base", KVP_EV_FIRST_TOKEN, -1, 133000);
    for (int i = 0; i < 4; i++)
        ev(&dec, "r-base", KVP_EV_TOKEN, i, 133000 + 1500 * i);
    ev(&dec, "r-base", KVP_EV_DONE, -1, 138000);

    /* r-aux: aux-only (mode inferred from aux_decode: no mode number) */
    ev(&aux, "r-aux", KVP_EV_ACCEPTED, -1, 200000);
    ev(&aux, "r-aux", KVP_EV_TOKENIZED, -1, 200300);
    ev(&aux, "r-aux", KVP_EV_AUX_CHUNK_START, 0, 200800);
    ev(&aux, "r-aux", KVP_EV_AUX_CHUNK_END, 0, 205800);
    ev(&aux, "r-aux", KVP_EV_AUX_DECODE, -1, 205900);
    ev(&aux, "r-aux", KVP_EV_FIRST_TOKEN, -1, 207000);
    for (int i = 0; i < 3; i++)
        ev(&aux, "r-aux", KVP_EV_TOKEN, i, 207000 + 1000 * i);
    ev(&aux, "r-aux", KVP_EV_DONE, -1, 210000);

    /* r-miss: a KVP request whose cache_complete was never recorded */
    kvp_request(&aux, &pred, &dec, "r-miss", 300000, 2, false);

    /* r-err: the predictor failed */
    ev_num(&aux, "r-err", KVP_EV_ACCEPTED, -1, 400000, KVP_NUM_MODE, 0, NULL, 0);
    ev_num(&pred, "r-err", KVP_EV_ERROR, -1, 400500, KVP_NUM_CODE, -6, NULL, 0);

    int rc = 0;
    stage_t *all[] = {&aux, &pred, &dec, &cli};
    for (int i = 0; i < 4; i++) {
        if (kvp_trace_flush(all[i]->w, &err)) rc = -1;
        kvp_trace_writer_free(&all[i]->w);
    }
    return rc;
}

/* Removes the test's files unless KVP_TEST_KEEP is set (to look at them). */
static int remove_logs(void **state) {
    (void)state;
    if (getenv("KVP_TEST_KEEP") || !g_dir[0]) return 0;
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static kvp_trace_set_t *read_all(void) {
    kvp_trace_set_t *s = kvp_trace_set_new();
    assert_non_null(s);
    kvp_err_t err = {0};
    const char *logs[] = {g_aux, g_pred, g_dec, g_client};
    for (int i = 0; i < 4; i++) {
        kvp_trace_read_info_t info;
        if (kvp_trace_set_read(s, logs[i], &info, &err)) fail_msg("%s", err.msg);
        assert_int_equal(info.n_headers, 1);
        assert_int_equal(info.truncated_bytes, 0);
        assert_int_equal(info.n_skipped, 0);
    }
    return s;
}

static const kvp_trace_req_t *req(const kvp_trace_req_t *q, size_t n, const char *id) {
    for (size_t i = 0; i < n; i++)
        if (!strcmp(q[i].request_id, id)) return &q[i];
    fail_msg("request %s not found", id);
    return NULL;
}

static void records_round_trip_with_every_field(void **state) {
    (void)state;
    kvp_trace_set_t *s = read_all();
    const kvp_trace_rec_t *tok = NULL, *pm = NULL;
    for (size_t i = 0; i < s->n; i++) {
        const kvp_trace_rec_t *r = &s->recs[i];
        if (!strcmp(r->request_id, "r-kvp") && !strcmp(r->event, KVP_EV_TOKENIZED)) tok = r;
        if (!strcmp(r->request_id, "r-kvp") && !strcmp(r->event, KVP_EV_PRED_MAPPED) &&
            r->chunk == 3)
            pm = r;
    }
    assert_non_null(tok);
    assert_string_equal(tok->stage, KVP_STAGE_AUX);
    assert_string_equal(tok->host, "hostA");
    assert_int_equal(tok->pid, getpid());
    assert_int_equal(tok->chunk, -1);
    assert_true(tok->wall_ns == T0 + 500 * US);
    assert_int_equal(tok->n_nums, 2);
    assert_string_equal(tok->nums[0].key, KVP_NUM_CHUNKS);
    assert_true(tok->nums[0].v == 4.0);
    assert_string_equal(tok->nums[1].key, KVP_NUM_TOKENS);
    assert_true(tok->nums[1].v == 512.0);
    assert_non_null(pm);
    assert_string_equal(pm->stage, KVP_STAGE_PREDICTOR);
    assert_string_equal(pm->host, "hostB");
    assert_true(pm->offset_ns == OFF_PRED);
    assert_true(pm->offset_err_ns == ERR_PRED);
    assert_true(pm->wall_ns == T0 + 14500 * US + OFF_PRED);
    kvp_trace_set_free(&s);
    assert_null(s);
}

static void kvp_breakdown_equals_hand_computed_values(void **state) {
    (void)state;
    kvp_trace_set_t *s = read_all();
    kvp_trace_req_t *q;
    size_t n;
    assert_int_equal(kvp_trace_analyze(s, &q, &n, NULL), 0);
    assert_int_equal(n, 5);
    /* ordered by accepted time */
    assert_string_equal(q[0].request_id, "r-kvp");
    assert_string_equal(q[4].request_id, "r-err");

    const kvp_trace_req_t *r = req(q, n, "r-kvp");
    assert_int_equal(r->mode, KVP_TRACE_MODE_KVP);
    assert_true(r->complete);
    assert_false(r->failed);
    assert_int_equal(r->n_chunks, 4);
    assert_int_equal(r->n_tokens, 8);
    /* chunk 3 of the aux prefill ends at 13500; the predictor maps it in
     * [13800, 14500]; the decoder has the whole cache at 15060 and the first
     * token at 19060 (all on the entry clock, despite +5 s and -3 s). */
    assert_true(r->queueing_ns == 2000 * US);
    assert_true(r->prefill_ns == 11500 * US);
    assert_true(r->prediction_ns == 700 * US);
    assert_true(r->transfer_ns == 860 * US);
    assert_true(r->first_step_ns == 4000 * US);
    assert_true(r->ttft_ns == 19060 * US);
    assert_true(r->handoff_ns == 1560 * US);
    assert_true(r->client_ttft_ns == 19600 * US);
    assert_true(r->max_offset_err_ns == ERR_CLIENT);
    int64_t sum =
        r->queueing_ns + r->prefill_ns + r->prediction_ns + r->transfer_ns + r->first_step_ns;
    assert_true(sum == r->ttft_ns);
    assert_true(r->sum_err_ns == 0);
    free(q);
    kvp_trace_set_free(&s);
}

static void baseline_and_aux_only_breakdowns(void **state) {
    (void)state;
    kvp_trace_set_t *s = read_all();
    kvp_trace_req_t *q;
    size_t n;
    assert_int_equal(kvp_trace_analyze(s, &q, &n, NULL), 0);

    const kvp_trace_req_t *b = req(q, n, "r-base");
    assert_int_equal(b->mode, KVP_TRACE_MODE_BASELINE);
    assert_true(b->complete);
    assert_true(b->queueing_ns == 1200 * US);
    assert_true(b->prefill_ns == 30000 * US);
    assert_true(b->first_step_ns == 1800 * US);
    assert_true(b->ttft_ns == 33000 * US);
    assert_true(b->prediction_ns == KVP_TRACE_NONE);
    assert_true(b->transfer_ns == KVP_TRACE_NONE);
    assert_true(b->handoff_ns == KVP_TRACE_NONE);
    assert_true(b->client_ttft_ns == KVP_TRACE_NONE);
    assert_true(b->queueing_ns + b->prefill_ns + b->first_step_ns == b->ttft_ns);
    assert_true(b->sum_err_ns < MS);
    assert_int_equal(b->n_tokens, 4);

    const kvp_trace_req_t *a = req(q, n, "r-aux");
    assert_int_equal(a->mode, KVP_TRACE_MODE_AUX_ONLY);
    assert_true(a->complete);
    assert_true(a->queueing_ns == 800 * US);
    assert_true(a->prefill_ns == 5000 * US);
    assert_true(a->first_step_ns == 1200 * US);
    assert_true(a->ttft_ns == 7000 * US);
    assert_true(a->sum_err_ns == 0);
    assert_int_equal(a->n_tokens, 3);

    /* every complete request: the parts sum to TTFT within 1 ms */
    for (size_t i = 0; i < n; i++)
        if (q[i].complete) assert_true(q[i].sum_err_ns >= 0 && q[i].sum_err_ns < MS);

    kvp_trace_summary_t sum;
    kvp_trace_summarize(q, n, KVP_TRACE_MODE_KVP, &sum);
    assert_int_equal(sum.n_requests, 3); /* r-kvp, r-miss, r-err */
    assert_int_equal(sum.n_complete, 1);
    assert_int_equal(sum.ttft.n, 1);
    assert_float_equal(sum.ttft.p50_ms, 19.06, 1e-9);
    assert_float_equal(sum.handoff.p90_ms, 1.56, 1e-9);
    assert_float_equal(sum.client_ttft.mean_ms, 19.6, 1e-9);
    free(q);
    kvp_trace_set_free(&s);
}

static void percentiles_interpolate_between_ranks(void **state) {
    (void)state;
    kvp_trace_req_t q[5];
    memset(q, 0, sizeof q);
    for (int i = 0; i < 5; i++) {
        q[i].mode = KVP_TRACE_MODE_BASELINE;
        q[i].complete = true;
        q[i].ttft_ns = (int64_t)(5 - i) * 10 * MS; /* 50, 40, 30, 20, 10 ms */
        q[i].handoff_ns = q[i].client_ttft_ns = KVP_TRACE_NONE;
    }
    kvp_trace_summary_t s;
    kvp_trace_summarize(q, 5, KVP_TRACE_MODE_BASELINE, &s);
    assert_float_equal(s.ttft.mean_ms, 30.0, 1e-9);
    assert_float_equal(s.ttft.p50_ms, 30.0, 1e-9);
    assert_float_equal(s.ttft.p90_ms, 46.0, 1e-9);
    assert_int_equal(s.handoff.n, 0);
}

static void missing_cache_complete_is_reported_incomplete(void **state) {
    (void)state;
    kvp_trace_set_t *s = read_all();
    kvp_trace_req_t *q;
    size_t n;
    assert_int_equal(kvp_trace_analyze(s, &q, &n, NULL), 0);
    const kvp_trace_req_t *m = req(q, n, "r-miss");
    assert_int_equal(m->mode, KVP_TRACE_MODE_KVP);
    assert_false(m->complete);
    assert_string_equal(m->reason, "missing cache_complete");
    assert_true(m->handoff_ns == KVP_TRACE_NONE);
    assert_true(m->ttft_ns == 13060 * US); /* still known: first_token - accepted */

    const kvp_trace_req_t *e = req(q, n, "r-err");
    assert_false(e->complete);
    assert_true(e->failed);
    assert_non_null(strstr(e->reason, "error at predictor"));
    assert_non_null(strstr(e->reason, "first_token"));
    assert_non_null(strstr(e->reason, "aux_chunk_start"));
    free(q);
    kvp_trace_set_free(&s);
}

static long file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

static void copy_prefix(const char *from, const char *to, long n) {
    FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");
    assert_non_null(in);
    assert_non_null(out);
    for (long i = 0; i < n; i++) {
        int c = fgetc(in);
        assert_true(c != EOF);
        fputc(c, out);
    }
    fclose(in);
    assert_int_equal(fclose(out), 0);
}

static void truncated_log_keeps_the_complete_records(void **state) {
    (void)state;
    kvp_err_t err = {0};
    kvp_trace_set_t *s = kvp_trace_set_new();
    kvp_trace_read_info_t full, cut;
    assert_int_equal(kvp_trace_set_read(s, g_dec, &full, &err), 0);
    char path[700];
    path_in(path, sizeof path, "dec-cut.msgpack");
    copy_prefix(g_dec, path, file_size(g_dec) - 7); /* inside the last record */
    kvp_trace_set_t *t = kvp_trace_set_new();
    if (kvp_trace_set_read(t, path, &cut, &err)) fail_msg("%s", err.msg);
    assert_int_equal(cut.n_records, full.n_records - 1);
    assert_true(cut.truncated_bytes > 0);
    assert_int_equal(t->n_truncated, 1);
    for (size_t i = 0; i < t->n; i++) /* the kept records are the originals */
        assert_memory_equal(&t->recs[i], &s->recs[i], sizeof t->recs[i]);
    kvp_trace_set_free(&s);
    kvp_trace_set_free(&t);
}

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static void expect_refused(const char *name, const void *bytes, size_t n, const char *msg) {
    char path[700];
    path_in(path, sizeof path, name);
    write_bytes(path, bytes, n);
    kvp_trace_set_t *s = kvp_trace_set_new();
    kvp_err_t err = {0};
    int rc = kvp_trace_set_read(s, path, NULL, &err);
    assert_int_equal(rc, KVP_EFORMAT);
    if (!strstr(err.msg, msg)) fail_msg("'%s' lacks '%s'", err.msg, msg);
    assert_int_equal(s->n, 0);
    kvp_trace_set_free(&s);
}

static void foreign_files_are_refused_with_a_clear_message(void **state) {
    (void)state;
    const char text[] = "hello, this is not a trace log\n";
    expect_refused("text.txt", text, sizeof text - 1, "not a kvpred trace log");
    const unsigned char bad[] = {0xc1, 0x00, 0x01};
    expect_refused("bad.bin", bad, sizeof bad, "not a kvpred trace log");
    const unsigned char map[] = {0x81, 0xa1, 'a', 0x01}; /* {"a": 1}: MessagePack, no header */
    expect_refused("map.msgpack", map, sizeof map, "not a kvpred trace log");
    expect_refused("empty", "", 0, "not a kvpred trace log");

    kvp_trace_set_t *s = kvp_trace_set_new();
    kvp_err_t err = {0};
    char path[700];
    path_in(path, sizeof path, "does-not-exist.msgpack");
    assert_int_equal(kvp_trace_set_read(s, path, NULL, &err), KVP_EIO);
    assert_non_null(strstr(err.msg, "cannot open"));
    kvp_trace_set_free(&s);
}

/* A log of one header followed by tail bytes. */
static void header_then(const char *path, const unsigned char *tail, size_t n) {
    unlink(path);
    kvp_trace_writer_t *w;
    kvp_err_t err = {0};
    assert_int_equal(kvp_trace_writer_new(path, KVP_STAGE_AUX, "h", &w, &err), 0);
    kvp_trace_writer_free(&w);
    FILE *f = fopen(path, "ab");
    assert_non_null(f);
    assert_int_equal(fwrite(tail, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* A record that declares 2^32 - 1 map entries must be refused before msgpack-c
 * allocates for them (ASan would abort on the allocation). */
static void huge_declared_sizes_are_refused_before_allocation(void **state) {
    (void)state;
    size_t tail = 70000;
    unsigned char *junk = calloc(1, tail);
    assert_non_null(junk);
    junk[0] = 0xdf, junk[1] = junk[2] = junk[3] = junk[4] = 0xff; /* map32, 2^32-1 entries */
    char path[700];
    path_in(path, sizeof path, "huge.msgpack");
    kvp_err_t err = {0};
    kvp_trace_set_t *s = kvp_trace_set_new();
    header_then(path, junk, tail);
    assert_int_equal(kvp_trace_set_read(s, path, NULL, &err), KVP_EFORMAT);
    assert_non_null(strstr(err.msg, "longer than"));
    /* the same declared size at the very end of a log: a cut-off record */
    header_then(path, junk, 64);
    kvp_trace_read_info_t info;
    assert_int_equal(kvp_trace_set_read(s, path, &info, &err), 0);
    assert_int_equal(info.truncated_bytes, 64);
    assert_int_equal(info.n_headers, 1);
    /* a nesting deeper than msgpack-c's stack: an error, not a crash */
    unsigned char deep[200];
    memset(deep, 0x91, sizeof deep); /* [[[[...]]]] */
    deep[sizeof deep - 1] = 0x01;
    header_then(path, deep, sizeof deep);
    assert_int_equal(kvp_trace_set_read(s, path, NULL, &err), KVP_EFORMAT);
    assert_non_null(strstr(err.msg, "corrupt log"));
    assert_int_equal(s->n, 0);
    free(junk);
    kvp_trace_set_free(&s);
}

static void writer_refuses_bad_arguments(void **state) {
    (void)state;
    kvp_trace_writer_t *w = NULL;
    kvp_err_t err = {0};
    char path[700];
    path_in(path, sizeof path, "args.msgpack");
    assert_int_equal(kvp_trace_writer_new(path, "prefill", NULL, &w, &err), KVP_EINVAL);
    assert_non_null(strstr(err.msg, "unknown stage"));
    assert_null(w);
    assert_int_equal(kvp_trace_writer_new(path, KVP_STAGE_DECODER, NULL, &w, &err), 0);
    char long_id[KVP_TRACE_ID_MAX + 8];
    memset(long_id, 'x', sizeof long_id - 1);
    long_id[sizeof long_id - 1] = 0;
    assert_int_equal(kvp_trace_mark(w, long_id, KVP_EV_DONE, -1), KVP_EINVAL);
    assert_int_equal(kvp_trace_mark(w, "ok", "", -1), KVP_EINVAL);
    assert_int_equal(kvp_trace_emit(w, "ok", KVP_EV_DONE, -1, 0, NULL, 1), KVP_EINVAL);
    assert_int_equal(kvp_trace_mark(w, "ok", KVP_EV_DONE, -1), 0);
    kvp_trace_writer_free(&w);
    assert_null(w);
    kvp_trace_set_t *s = kvp_trace_set_new();
    assert_int_equal(kvp_trace_set_read(s, path, NULL, &err), 0);
    assert_int_equal(s->n, 1);
    kvp_trace_set_free(&s);
}

typedef struct {
    kvp_trace_writer_t *w;
    int id;
} thread_arg_t;

#define N_THREAD_EVENTS 600

static void *emit_many(void *p) {
    thread_arg_t *a = p;
    char id[32];
    snprintf(id, sizeof id, "t%d", a->id);
    for (int i = 0; i < N_THREAD_EVENTS; i++)
        if (kvp_trace_emit(a->w, id, KVP_EV_TOKEN, i, 0, NULL, 0)) return (void *)1;
    return NULL;
}

/* Three stages in one process, three writers; the decoder's written from
 * three threads at once. Every record comes back whole. */
static void writers_are_independent_and_thread_safe(void **state) {
    (void)state;
    const char *stages[] = {KVP_STAGE_AUX, KVP_STAGE_PREDICTOR, KVP_STAGE_DECODER};
    char paths[3][700];
    kvp_trace_writer_t *w[3];
    kvp_err_t err = {0};
    for (int i = 0; i < 3; i++) {
        char name[32];
        snprintf(name, sizeof name, "threads-%d.msgpack", i);
        path_in(paths[i], sizeof paths[i], name);
        unlink(paths[i]);
        assert_int_equal(kvp_trace_writer_new(paths[i], stages[i], NULL, &w[i], &err), 0);
    }
    pthread_t th[5];
    thread_arg_t args[5] = {{w[0], 0}, {w[1], 1}, {w[2], 2}, {w[2], 3}, {w[2], 4}};
    for (int i = 0; i < 5; i++)
        assert_int_equal(pthread_create(&th[i], NULL, emit_many, &args[i]), 0);
    for (int i = 0; i < 5; i++) {
        void *ret;
        pthread_join(th[i], &ret);
        assert_null(ret);
    }
    for (int i = 0; i < 3; i++) {
        assert_int_equal(kvp_trace_flush(w[i], &err), 0);
        kvp_trace_writer_free(&w[i]);
    }
    size_t want[3] = {N_THREAD_EVENTS, N_THREAD_EVENTS, 3 * N_THREAD_EVENTS};
    for (int i = 0; i < 3; i++) {
        kvp_trace_set_t *s = kvp_trace_set_new();
        kvp_trace_read_info_t info;
        assert_int_equal(kvp_trace_set_read(s, paths[i], &info, &err), 0);
        assert_int_equal(s->n, want[i]);
        assert_int_equal(info.n_skipped, 0);
        for (size_t k = 0; k < s->n; k++)
            assert_string_equal(s->recs[k].stage, stages[i]);
        kvp_trace_set_free(&s);
    }
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)n + 1);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, (size_t)n, f), (size_t)n);
    p[n] = 0;
    fclose(f);
    return p;
}

static int count(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

static bool have_python(void) {
    return system("python3 -c 'import json' >/dev/null 2>&1") == 0;
}

static void check_json_syntax(const char *path) {
    if (!have_python()) {
        printf("# skipped: python3 not found, JSON syntax of %s not checked\n", path);
        return;
    }
    char cmd[1600];
    snprintf(cmd, sizeof cmd, "python3 -c 'import json,sys; json.load(open(sys.argv[1]))' '%s'",
             path);
    assert_int_equal(system(cmd), 0);
}

static void chrome_trace_holds_the_expected_events(void **state) {
    (void)state;
    kvp_trace_set_t *s = read_all();
    char path[700];
    path_in(path, sizeof path, "trace.json");
    size_t n_events = 0;
    kvp_err_t err = {0};
    if (kvp_trace_write_chrome(s, path, &n_events, &err)) fail_msg("%s", err.msg);
    char *j = slurp(path);
    assert_true(!strncmp(j, "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[", 38));
    /* r-kvp: 4 aux chunks, 4 predict, 4 decoder writes, 4 transfers, first
     * step, request = 18; r-base: prefill, first step, request = 3; r-aux: aux
     * chunk, first step, request = 3; r-miss: 2 x 4 + request = 9 */
    assert_int_equal(count(j, "\"ph\":\"X\""), 33);
    /* a process per host, a thread per stage (and transfer, requests) */
    assert_int_equal(count(j, "\"name\":\"process_name\""), 4);
    assert_int_equal(count(j, "\"name\":\"thread_name\""), 6);
    const char *tracks[] = {"\"name\":\"aux-prefill (pid ", "\"name\":\"predictor (pid ",
                            "\"name\":\"decoder (pid ",     "\"name\":\"client (pid ",
                            "\"name\":\"transfer (pid ",    "\"name\":\"requests (pid "};
    for (int i = 0; i < 6; i++)
        if (!strstr(j, tracks[i])) fail_msg("no track %s", tracks[i]);
    /* times on the entry clock, from the earliest record (client_send, -300 us) */
    assert_non_null(strstr(j, "\"name\":\"aux chunk 0\",\"ts\":2300.000,\"dur\":2500.000"));
    assert_non_null(strstr(j, "\"name\":\"predict 3\",\"ts\":14100.000,\"dur\":700.000"));
    assert_non_null(strstr(j, "\"name\":\"decoder write 3\",\"ts\":15050.000,\"dur\":300.000"));
    assert_non_null(strstr(j, "\"name\":\"transfer 3\",\"ts\":13900.000,\"dur\":1150.000"));
    assert_non_null(strstr(j, "\"name\":\"first step\",\"ts\":15360.000,\"dur\":4000.000"));
    assert_non_null(strstr(j, "\"name\":\"base prefill\""));
    assert_non_null(strstr(j, "\"ph\":\"i\",\"s\":\"t\",\"cat\":\"kvpred\",\"name\":\"accepted\""));
    assert_non_null(strstr(j, "\"name\":\"token 7\""));
    assert_int_equal(count(j, "\"ph\":\"i\""), count(j, "\"ph\":") - 33 - 2 * 4 - 2 * 6);
    assert_int_equal((size_t)count(j, "\"ph\":"), n_events);
    free(j);
    check_json_syntax(path);
    kvp_trace_set_free(&s);
}

/* Runs a shell command; returns its exit status and its output in out. */
static int run(const char *cmd, const char *out_path, char **out) {
    char full[10000];
    snprintf(full, sizeof full, "%s >'%s' 2>&1", cmd, out_path);
    int st = system(full);
    *out = slurp(out_path);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void kvpred_trace_command(void **state) {
    (void)state;
    const char *kvpred = getenv("KVPRED");
    if (!kvpred || access(kvpred, X_OK) != 0) {
        printf("# skipped: KVPRED not set or not executable; `kvpred trace` not run\n");
        return;
    }
    char out_path[700], chrome[700], summary[700], junk[700], cmd[8192];
    path_in(out_path, sizeof out_path, "cli.out");
    path_in(chrome, sizeof chrome, "cli-trace.json");
    path_in(summary, sizeof summary, "cli-summary.json");
    path_in(junk, sizeof junk, "text.txt"); /* written by the foreign-files test */
    write_bytes(junk, "not a trace\n", 12);
    char *o;

    snprintf(cmd, sizeof cmd, "'%s' trace '%s' '%s' '%s' '%s' -o '%s' --json '%s'", kvpred, g_aux,
             g_pred, g_dec, g_client, chrome, summary);
    int rc = run(cmd, out_path, &o);
    if (rc != 0) fail_msg("exit %d: %s", rc, o);
    assert_non_null(strstr(o, "r-kvp"));
    assert_non_null(strstr(o, "19.060")); /* TTFT */
    assert_non_null(strstr(o, "1.560"));  /* exposed handoff */
    assert_non_null(strstr(o, "incomplete: missing cache_complete"));
    assert_non_null(strstr(o, "max |sum - TTFT| = 0 ns"));
    free(o);
    check_json_syntax(chrome);
    check_json_syntax(summary);
    char *sj = slurp(summary);
    assert_non_null(strstr(sj, "\"ttft_ms\":19.06"));
    free(sj);

    snprintf(cmd, sizeof cmd, "'%s' trace '%s/none.msgpack'", kvpred, g_dir);
    assert_int_equal(run(cmd, out_path, &o), 1);
    assert_non_null(strstr(o, "cannot open"));
    assert_int_equal(count(o, "\n"), 1);
    free(o);
    snprintf(cmd, sizeof cmd, "'%s' trace '%s' '%s' -o '%s'", kvpred, g_aux, junk, chrome);
    assert_int_equal(run(cmd, out_path, &o), 1);
    assert_non_null(strstr(o, "not a kvpred trace log"));
    assert_int_equal(count(o, "\n"), 1);
    free(o);
    snprintf(cmd, sizeof cmd, "'%s' trace --help", kvpred);
    assert_int_equal(run(cmd, out_path, &o), 0);
    assert_non_null(strstr(o, "usage: kvpred trace"));
    free(o);
    snprintf(cmd, sizeof cmd, "'%s' trace", kvpred);
    assert_int_equal(run(cmd, out_path, &o), 2);
    free(o);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(records_round_trip_with_every_field),
        cmocka_unit_test(kvp_breakdown_equals_hand_computed_values),
        cmocka_unit_test(baseline_and_aux_only_breakdowns),
        cmocka_unit_test(percentiles_interpolate_between_ranks),
        cmocka_unit_test(missing_cache_complete_is_reported_incomplete),
        cmocka_unit_test(truncated_log_keeps_the_complete_records),
        cmocka_unit_test(foreign_files_are_refused_with_a_clear_message),
        cmocka_unit_test(huge_declared_sizes_are_refused_before_allocation),
        cmocka_unit_test(writer_refuses_bad_arguments),
        cmocka_unit_test(writers_are_independent_and_thread_safe),
        cmocka_unit_test(chrome_trace_holds_the_expected_events),
        cmocka_unit_test(kvpred_trace_command),
    };
    return cmocka_run_group_tests(tests, write_logs, remove_logs);
}
