#include "kvp_test_util.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvp_ckpt.h"
#include "kvp_gguf.h"
#include "kvp_rng.h"

extern char **environ;

static void write_corpus(const char *dir) {
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", dir, dir);
    if (system(cmd)) fail_msg("cannot make %s", dir);
    for (int f = 0; f < 40; f++) {
        char p[1300];
        snprintf(p, sizeof p, "%s/mod_%02d.py", dir, f);
        FILE *o = fopen(p, "w");
        if (!o) fail_msg("cannot write %s: %s", p, strerror(errno));
        fprintf(o, "\"\"\"Module %d.\"\"\"\n\nimport os\n\n", f);
        for (int i = 0; i < 12; i++)
            fprintf(o, "def func_%d_%d(x, y):\n    return x * %d + y - %d\n\n", f, i, i, f);
        fclose(o);
    }
}

void kvp_test_scratch_init(kvp_test_scratch_t *s, const char *name) {
    const char *base = getenv("KVP_TEST_TMP");
    memset(s, 0, sizeof *s);
    snprintf(s->dir, sizeof s->dir, "%s/%s-%ld", base ? base : "/tmp", name, (long)getpid());
    snprintf(s->corpus, sizeof s->corpus, "%s/corpus", s->dir);
    write_corpus(s->corpus);
}

int kvp_test_scratch_remove(const kvp_test_scratch_t *s) {
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", s->dir);
    return system(cmd) ? -1 : 0;
}

const char *kvp_test_path(kvp_test_scratch_t *s, const char *name) {
    const size_t n = sizeof s->paths / sizeof s->paths[0];
    char *p = s->paths[(size_t)s->next++ % n];
    char buf[sizeof s->paths[0]]; /* not straight into p: it lies in *s, as s->dir does */
    snprintf(buf, sizeof buf, "%s/%s", s->dir, name);
    memcpy(p, buf, sizeof buf);
    return p;
}

kvp_corpus_t *kvp_test_load_corpus(const char *dir) {
    kvp_corpus_t *c = NULL;
    kvp_err_t err = {0};
    const char *paths[] = {dir};
    kvp_corpus_opts_t o = {.ext = ".py", .holdout_pct = 10};
    if (kvp_corpus_new(&c, paths, 1, &o, &err) ||
        kvp_corpus_tokenize(c, KVP_SPLIT_TRAIN, NULL, &err) ||
        kvp_corpus_tokenize(c, KVP_SPLIT_VAL, NULL, &err))
        fail_msg("corpus: %s", err.msg);
    return c;
}

kvp_model_t *kvp_test_model(kvp_model_config_t cfg, uint64_t seed, float std) {
    kvp_model_t *m = NULL;
    kvp_err_t err = {0};
    if (kvp_model_new_random(&m, &cfg, seed, std, &err))
        fail_msg("kvp_model_new_random: %s", err.msg);
    kvp_rng_t r;
    kvp_rng_seed(&r, seed + 1);
    for (int i = 0; i < m->cfg.n_embd; i++) {
        m->output_norm[i] = 0.5f + kvp_rng_uniform(&r);
        for (int l = 0; l < m->cfg.n_layer; l++) {
            m->layers[l].attn_norm[i] = 0.5f + kvp_rng_uniform(&r);
            m->layers[l].ffn_norm[i] = 0.5f + kvp_rng_uniform(&r);
        }
    }
    return m;
}

int kvp_test_model_tensors(const kvp_model_t *m, kvp_test_tensor_t *ts) {
    const kvp_model_config_t *c = &m->cfg;
    size_t E = c->n_embd, nq = (size_t)c->n_head * c->head_dim,
           nkv = (size_t)c->n_kv_head * c->head_dim, F = c->n_ff, V = c->n_vocab;
    int n = 0;
    ts[n++] = (kvp_test_tensor_t){"tok_embd", m->tok_embd, V * E};
    if (!c->tied_output) ts[n++] = (kvp_test_tensor_t){"output", m->output, V * E};
    ts[n++] = (kvp_test_tensor_t){"output_norm", m->output_norm, E};
    for (int l = 0; l < c->n_layer; l++) {
        const kvp_layer_t *L = &m->layers[l];
        const struct {
            const char *s;
            float *p;
            size_t n;
        } k[] = {
            {"attn_norm", L->attn_norm, E}, {"wq", L->wq, nq * E},    {"wk", L->wk, nkv * E},
            {"wv", L->wv, nkv * E},         {"wo", L->wo, E * nq},    {"ffn_norm", L->ffn_norm, E},
            {"w_gate", L->w_gate, F * E},   {"w_up", L->w_up, F * E}, {"w_down", L->w_down, E * F}};
        for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) {
            snprintf(ts[n].name, sizeof ts[n].name, "%d.%s", l, k[i].s);
            ts[n].p = k[i].p;
            ts[n++].n = k[i].n;
        }
    }
    return n;
}

void kvp_test_need_kvpred(void) {
    if (!getenv("KVPRED")) {
        print_message("skipped: KVPRED (the kvpred binary) is not set\n");
        skip();
    }
}

pid_t kvp_test_spawn(const char *const *argv, const char *errfile) {
    pid_t pid;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    if (errfile)
        posix_spawn_file_actions_addopen(&fa, 2, errfile, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc) fail_msg("cannot start %s: %s", argv[0], strerror(rc));
    return pid;
}

int kvp_test_wait(pid_t pid) {
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR) fail_msg("waitpid: %s", strerror(errno));
    return st;
}

int kvp_test_ckpt_step(const char *path) {
    kvp_ckpt_t *ck = NULL;
    uint64_t n = 0;
    const char *meta;
    int step = -1;
    if (!kvp_ckpt_read(&ck, path, NULL) && (meta = kvp_ckpt_find(ck, "meta", &n))) {
        const char *s = strstr(meta, "\nstep=");
        step = s ? atoi(s + 6) : -1;
    }
    kvp_ckpt_free(&ck);
    return step;
}

int kvp_test_count_lines(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) fail_msg("cannot read %s: %s", path, strerror(errno));
    int rows = 0, c, last = '\n';
    while ((c = fgetc(f)) != EOF) {
        if (c == '\n') rows++;
        last = c;
    }
    fclose(f);
    return rows + (last != '\n');
}

void kvp_test_read_text(const char *path, char *buf, size_t cap) {
    FILE *f = fopen(path, "r");
    if (!f) fail_msg("cannot read %s: %s", path, strerror(errno));
    size_t n = fread(buf, 1, cap - 1, f);
    fclose(f);
    buf[n] = 0;
}

/* ---- forward steps ---------------------------------------------------------- */

double kvp_test_rel_err(const float *a, const float *b, size_t n) {
    double d = 0, mx = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        mx = fmax(mx, fabs((double)b[i]));
    }
    return d / (mx > 0 ? mx : 1);
}

kvp_test_stepper_t kvp_test_stepper_new(const kvp_model_t *m, int cap) {
    kvp_test_stepper_t s = {0};
    kvp_err_t err = {0};
    if (kvp_model_ctx_new(&s.ctx, m, 16, cap, &err) || kvp_model_new_cache(m, cap, &s.cache, &err))
        fail_msg("context: %s", err.msg);
    s.logits = malloc(sizeof(float) * (size_t)cap * m->cfg.n_vocab);
    return s;
}

void kvp_test_stepper_free(kvp_test_stepper_t *s) {
    kvp_model_ctx_free(&s->ctx);
    kvp_kvcache_free(&s->cache);
    free(s->logits);
}

void kvp_test_step(kvp_test_stepper_t *s, const int32_t *tok, int n, kvp_logits_mode_t mode) {
    kvp_err_t err = {0};
    if (kvp_model_forward(s->ctx, s->cache, tok, n, s->logits, mode, &err))
        fail_msg("forward: %s", err.msg);
}

void kvp_test_tmp_path(char *buf, size_t cap, const char *test, const char *name) {
    const char *dir = getenv("KVP_TEST_TMP");
    if (!dir) dir = "/tmp";
    mkdir(dir, 0755);
    snprintf(buf, cap, "%s/%s_%d_%s", dir, test, (int)getpid(), name);
}

void kvp_test_save_model(const kvp_model_t *m, kvp_ggml_type_t type, const char *path) {
    kvp_err_t err = {0};
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    if (!w) fail_msg("saving %s: out of memory", path);
    if (kvp_model_to_gguf(m, w, type, &err) || kvp_gguf_writer_write(w, path, &err))
        fail_msg("saving %s: %s", path, err.msg);
    kvp_gguf_writer_free(&w);
}

kvp_model_t *kvp_test_load_model(const char *path) {
    kvp_model_t *r = NULL;
    kvp_err_t err = {0};
    if (kvp_model_load(&r, path, &err)) fail_msg("loading %s: %s", path, err.msg);
    return r;
}

int kvp_test_isas(kvp_mv16_isa_t out[2]) {
    int n = 0;
    out[n++] = KVP_MV16_PLAIN;
    if (kvp_matvec16_cpu_has_avx512())
        out[n++] = KVP_MV16_AVX512;
    else
        print_message("no AVX-512 on this CPU: only the plain path is tested\n");
    return n;
}

kvp_matvec16_t *kvp_test_runner(int threads, kvp_mv16_isa_t isa) {
    kvp_matvec16_t *mv = NULL;
    kvp_err_t err = {0};
    if (kvp_matvec16_new(&mv, threads, isa, &err)) fail_msg("kvp_matvec16_new: %s", err.msg);
    assert_int_equal(kvp_matvec16_threads(mv), threads);
    return mv;
}
