#include "kvp_trainutil.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_time.h"

uint32_t *kvp_trainutil_token_bytes_new(const kvp_tokenizer_t *tok, int n_vocab) {
    uint32_t *tb = calloc((size_t)n_vocab, sizeof *tb);
    if (!tb) return NULL;
    for (int i = 0; i < n_vocab; i++) {
        if (!tok) {
            tb[i] = i < 256 ? 1 : 0;
        } else if (i < kvp_tokenizer_n_vocab(tok) && !kvp_tokenizer_is_control(tok, i)) {
            int n = kvp_tokenizer_piece(tok, i, NULL, 0);
            tb[i] = n > 0 ? (uint32_t)n : 0;
        }
    }
    return tb;
}

void kvp_trainutil_meta_add(kvp_trainutil_meta_t *m, const char *key, const char *fmt, ...) {
    if (m->n >= sizeof m->buf) return;
    int k = snprintf(m->buf + m->n, sizeof m->buf - m->n, "%s=", key);
    if (k > 0) m->n += (size_t)k;
    if (m->n >= sizeof m->buf) return;
    va_list ap;
    va_start(ap, fmt);
    k = vsnprintf(m->buf + m->n, sizeof m->buf - m->n, fmt, ap);
    va_end(ap);
    if (k > 0) m->n += (size_t)k;
    if (m->n < sizeof m->buf - 1) m->buf[m->n++] = '\n';
    if (m->n >= sizeof m->buf) m->n = sizeof m->buf - 1;
    m->buf[m->n] = 0;
}

bool kvp_trainutil_meta_get(const char *text, size_t n, const char *key, char *val, size_t cap) {
    size_t kl = strlen(key);
    const char *p = text, *end = text + n;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        if ((size_t)(le - p) > kl && !memcmp(p, key, kl) && p[kl] == '=') {
            size_t vl = (size_t)(le - p) - kl - 1;
            if (vl >= cap) vl = cap - 1;
            memcpy(val, p + kl + 1, vl);
            val[vl] = 0;
            return true;
        }
        p = le + 1;
    }
    return false;
}

double kvp_trainutil_meta_double(const char *text, size_t n, const char *key) {
    char v[64];
    return kvp_trainutil_meta_get(text, n, key, v, sizeof v) ? strtod(v, NULL) : NAN;
}

uint64_t kvp_trainutil_meta_u64(const char *text, size_t n, const char *key) {
    char v[64];
    return kvp_trainutil_meta_get(text, n, key, v, sizeof v) ? strtoull(v, NULL, 10) : 0;
}

/* ---- settings ------------------------------------------------------------ */

int kvp_trainutil_warmup(const kvp_trainer_config_t *cfg) {
    return cfg->warmup >= 0 ? cfg->warmup : cfg->steps / 20;
}

int kvp_trainutil_check_config(const kvp_trainer_config_t *cfg, const char *who, kvp_err_t *err) {
    if (cfg->batch <= 0 || cfg->ctx <= 1 || cfg->accum <= 0 || cfg->steps <= 0)
        return kvp_err_set(err, KVP_EINVAL,
                           "%s: batch %d, context %d, accumulation %d and steps %d must be "
                           "positive (context at least 2)",
                           who, cfg->batch, cfg->ctx, cfg->accum, cfg->steps);
    if (!(cfg->lr > 0) || !(cfg->min_lr >= 0) || cfg->min_lr > cfg->lr)
        return kvp_err_set(err, KVP_EINVAL,
                           "%s: learning rates must satisfy 0 <= min_lr <= lr, lr > 0 (lr %g, "
                           "min_lr %g)",
                           who, cfg->lr, cfg->min_lr);
    if ((cfg->resume || cfg->ckpt_every > 0) && !cfg->ckpt_path)
        return kvp_err_set(err, KVP_EINVAL, "%s: checkpoints asked for without a path", who);
    return KVP_OK;
}

int kvp_trainutil_check_train_stream(const kvp_corpus_t *c, int ctx, int n_vocab, const char *who,
                                     const char *whose, kvp_err_t *err) {
    const kvp_corpus_stream_t *tr = kvp_corpus_stream(c, KVP_SPLIT_TRAIN);
    if (tr->n <= (size_t)ctx)
        return kvp_err_set(err, KVP_EINVAL,
                           "%s: the train split has %zu tokens, fewer than one window of %d+1 "
                           "(%zu of %zu files are in it)",
                           who, tr->n, ctx, kvp_corpus_split_files(c, KVP_SPLIT_TRAIN),
                           kvp_corpus_n_files(c));
    for (size_t i = 0; i < tr->n; i++)
        if (tr->tok[i] < 0 || tr->tok[i] >= n_vocab)
            return kvp_err_set(err, KVP_ERANGE,
                               "%s: token %d in the train stream is outside the %s vocabulary "
                               "of %d",
                               who, (int)tr->tok[i], whose, n_vocab);
    return KVP_OK;
}

static void no_decay(kvp_adamw_t *o, const kvp_model_t *m, const float *p, size_t n) {
    kvp_adamw_set_decay(o, (size_t)(p - m->params), n, false);
}

void kvp_trainutil_no_decay_norms(kvp_adamw_t *opt, const kvp_model_t *m) {
    const size_t E = (size_t)m->cfg.n_embd;
    no_decay(opt, m, m->output_norm, E);
    for (int l = 0; l < m->cfg.n_layer; l++) {
        no_decay(opt, m, m->layers[l].attn_norm, E);
        no_decay(opt, m, m->layers[l].ffn_norm, E);
    }
}

/* ---- checkpoint metadata ----------------------------------------------------- */

void kvp_trainutil_meta_add_model(kvp_trainutil_meta_t *mt, const char *prefix,
                                  const kvp_model_t *m) {
    const kvp_model_config_t *mc = &m->cfg;
    char key[64];
    snprintf(key, sizeof key, "%sn_params", prefix);
    kvp_trainutil_meta_add(mt, key, "%zu", m->n_params);
    snprintf(key, sizeof key, "%smodel", prefix);
    kvp_trainutil_meta_add(
        mt, key,
        "vocab %d embd %d layers %d heads %d kv_heads %d head_dim %d ffn %d rope_dim %d "
        "rope_base %.9g norm_eps %.9g tied %d",
        mc->n_vocab, mc->n_embd, mc->n_layer, mc->n_head, mc->n_kv_head, mc->head_dim, mc->n_ff,
        mc->rope_dim, mc->rope_base, mc->norm_eps, (int)mc->tied_output);
}

void kvp_trainutil_meta_add_schedule(kvp_trainutil_meta_t *mt, const kvp_trainer_config_t *cfg,
                                     int warmup) {
    kvp_trainutil_meta_add(mt, "batch", "%d", cfg->batch);
    kvp_trainutil_meta_add(mt, "ctx", "%d", cfg->ctx);
    kvp_trainutil_meta_add(mt, "accum", "%d", cfg->accum);
    kvp_trainutil_meta_add(mt, "steps", "%d", cfg->steps);
    kvp_trainutil_meta_add(mt, "warmup", "%d", warmup);
    kvp_trainutil_meta_add(mt, "lr", "%.9g", cfg->lr);
    kvp_trainutil_meta_add(mt, "min_lr", "%.9g", cfg->min_lr);
    kvp_trainutil_meta_add(mt, "beta1", "%.9g", cfg->adamw.beta1);
    kvp_trainutil_meta_add(mt, "beta2", "%.9g", cfg->adamw.beta2);
    kvp_trainutil_meta_add(mt, "eps", "%.9g", cfg->adamw.eps);
    kvp_trainutil_meta_add(mt, "weight_decay", "%.9g", cfg->adamw.weight_decay);
    kvp_trainutil_meta_add(mt, "clip", "%.9g", cfg->clip);
    kvp_trainutil_meta_add(mt, "seed", "%" PRIu64, cfg->seed);
}

void kvp_trainutil_meta_add_corpus(kvp_trainutil_meta_t *mt, const kvp_corpus_t *c) {
    kvp_trainutil_meta_add(mt, "corpus", "%016" PRIx64 " (%zu files)", kvp_corpus_fingerprint(c),
                           kvp_corpus_n_files(c));
}

void kvp_trainutil_meta_add_pos(kvp_trainutil_meta_t *mt, const char *format,
                                const kvp_trainutil_pos_t *pos) {
    kvp_trainutil_meta_add(mt, "format", "%s", format);
    kvp_trainutil_meta_add(mt, "step", "%d", pos->step);
    kvp_trainutil_meta_add(mt, "tokens", "%" PRIu64, pos->tokens);
    kvp_trainutil_meta_add(mt, "elapsed", "%.17g", pos->elapsed);
    kvp_trainutil_meta_add(mt, "adam_t", "%" PRId64, pos->adam_t);
}

/* The first line of `want` whose value differs in text (or is missing
 * there), named in err. */
static int check_same(const char *text, size_t n, const kvp_trainutil_meta_t *want,
                      const char *path, const char *same, kvp_err_t *err) {
    char key[128], val[512];
    for (const char *line = want->buf; *line;) {
        const char *nl = strchr(line, '\n'), *eq = memchr(line, '=', (size_t)(nl - line));
        snprintf(key, sizeof key, "%.*s", (int)(eq - line), line);
        const char *want_val = eq + 1;
        int want_len = (int)(nl - want_val);
        bool found = kvp_trainutil_meta_get(text, n, key, val, sizeof val);
        if (!found || strlen(val) != (size_t)want_len || memcmp(val, want_val, (size_t)want_len))
            return kvp_err_set(err, KVP_ESHAPE,
                               "checkpoint %s was written with %s=%s, this run has %s=%.*s: "
                               "resume with the same %s, or start afresh",
                               path, key, found ? val : "?", key, want_len, want_val, same);
        line = nl + 1;
    }
    return KVP_OK;
}

/* The position lines of a checkpoint's metadata; the step must lie in
 * [0, steps]. */
static int get_pos(const char *text, size_t n, const char *path, int steps,
                   kvp_trainutil_pos_t *pos, kvp_err_t *err) {
    char v[4][64];
    if (!kvp_trainutil_meta_get(text, n, "step", v[0], sizeof v[0]) ||
        !kvp_trainutil_meta_get(text, n, "tokens", v[1], sizeof v[1]) ||
        !kvp_trainutil_meta_get(text, n, "elapsed", v[2], sizeof v[2]) ||
        !kvp_trainutil_meta_get(text, n, "adam_t", v[3], sizeof v[3]))
        return kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: metadata incomplete", path);
    pos->step = atoi(v[0]);
    pos->tokens = strtoull(v[1], NULL, 10);
    pos->elapsed = strtod(v[2], NULL);
    pos->adam_t = strtoll(v[3], NULL, 10);
    if (pos->step < 0 || pos->step > steps)
        return kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: step %d outside [0, %d]", path,
                           pos->step, steps);
    return KVP_OK;
}

int kvp_trainutil_ckpt_open(kvp_ckpt_t **ck, const char *path,
                            const kvp_trainutil_ckpt_kind_t *kind, const kvp_trainutil_meta_t *want,
                            int steps, kvp_trainutil_pos_t *pos, const char **text, size_t *n,
                            kvp_err_t *err) {
    int rc = kvp_ckpt_read(ck, path, err);
    if (rc) return rc;
    uint64_t ml = 0;
    *text = kvp_ckpt_find(*ck, "meta", &ml);
    *n = (size_t)ml;
    char fmt[512];
    if (!*text || !kvp_trainutil_meta_get(*text, *n, "format", fmt, sizeof fmt) ||
        strcmp(fmt, kind->format))
        rc = kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: not a kvpred %s checkpoint", path,
                         kind->name);
    /* every setting that decides the weights must be the same */
    if (!rc) rc = check_same(*text, *n, want, path, kind->same, err);
    if (!rc) rc = get_pos(*text, *n, path, steps, pos, err);
    if (rc) kvp_ckpt_free(ck);
    return rc;
}

/* ---- validation windows ---------------------------------------------------- */

int kvp_trainutil_windows_init(kvp_trainutil_windows_t *w, const kvp_corpus_stream_t *s, int T,
                               uint64_t max_tokens, kvp_err_t *err) {
    *w = (kvp_trainutil_windows_t){.s = s, .T = T, .n_win = kvp_corpus_n_windows(s, T)};
    if (w->n_win == 0)
        return kvp_err_set(err, KVP_EINVAL, "evaluation: the validation split is empty");
    w->k = w->n_win;
    if (max_tokens > 0 && (max_tokens + (uint64_t)T - 1) / (uint64_t)T < w->k)
        w->k = (size_t)((max_tokens + (uint64_t)T - 1) / (uint64_t)T);
    return KVP_OK;
}

int kvp_trainutil_windows_fill(const kvp_trainutil_windows_t *w, size_t j0, int B,
                               const uint32_t *tb, int n_vocab, const char *whose, int32_t *tokens,
                               int32_t *targets, kvp_trainutil_batch_t *out, kvp_err_t *err) {
    const int T = w->T;
    const int32_t pad = w->s->tok[0];
    *out = (kvp_trainutil_batch_t){0};
    for (int b = 0; b < B; b++) {
        int32_t *tk = tokens + (size_t)b * T, *tg = targets + (size_t)b * T;
        size_t j = j0 + (size_t)b;
        if (j < w->k) {
            /* window j of k spread evenly over the n_win there are */
            size_t win = (size_t)((unsigned __int128)j * w->n_win / w->k);
            kvp_corpus_window(w->s, win, T, pad, tk, tg);
            out->n_real++;
        } else {
            for (int t = 0; t < T; t++)
                tk[t] = pad, tg[t] = -1;
        }
        for (int t = 0; t < T; t++)
            if (tg[t] >= 0) {
                if (tg[t] >= n_vocab)
                    return kvp_err_set(err, KVP_ERANGE,
                                       "evaluation: token %d is outside the %s vocabulary of %d",
                                       (int)tg[t], whose, n_vocab);
                out->scored++;
                out->bytes += tb[tg[t]];
            }
    }
    return KVP_OK;
}

void kvp_trainutil_eval_set(kvp_eval_t *e, double nats, uint64_t tokens, uint64_t bytes) {
    e->tokens = tokens;
    e->bytes = bytes;
    e->loss = tokens ? nats / (double)tokens : NAN;
    e->bpb = bytes ? nats / KVP_TRAINUTIL_LN2 / (double)bytes : NAN;
}

/* ---- the loop ------------------------------------------------------------- */

bool kvp_trainutil_should_stop(const kvp_trainer_config_t *cfg, int step, int start_step,
                               double t0) {
    return (cfg->stop_after > 0 && step >= cfg->stop_after) ||
           (cfg->stop_flag && *cfg->stop_flag) ||
           (cfg->time_limit_s > 0 && step > start_step && kvp_now() - t0 >= cfg->time_limit_s);
}

bool kvp_trainutil_eval_due(const kvp_trainer_config_t *cfg, int step, uint64_t *cap) {
    bool last = step == cfg->steps;
    *cap = (uint64_t)(last ? cfg->final_eval_tokens : cfg->eval_tokens);
    return last || (cfg->eval_every > 0 && step % cfg->eval_every == 0);
}

bool kvp_trainutil_ckpt_due(const kvp_trainer_config_t *cfg, int step) {
    return step != cfg->steps && cfg->ckpt_path && cfg->ckpt_every > 0 &&
           step % cfg->ckpt_every == 0;
}

double kvp_trainutil_tok_per_s(int done, size_t BT, int accum, double seconds) {
    return seconds > 0 ? (double)done * BT * accum / seconds : 0.0;
}

double kvp_trainutil_eta(int done, int left, double seconds) {
    return done > 0 ? seconds / done * left : -1.0;
}

int kvp_trainutil_session_open(const kvp_trainer_config_t *cfg, const char *header, bool resumed,
                               int step, FILE **log, kvp_progress_t **prog, kvp_err_t *err) {
    if (cfg->log_path &&
        !(*log = kvp_trainutil_log_open(cfg->log_path, header, resumed, step, err)))
        return err ? err->code : KVP_EIO;
    if (cfg->progress)
        *prog = kvp_progress_new(cfg->progress, cfg->progress_tty, cfg->progress_interval);
    if (resumed)
        kvp_progress_message(*prog, "resumed from %s at step %d of %d", cfg->ckpt_path, step,
                             cfg->steps);
    return KVP_OK;
}

void kvp_trainutil_stopped_message(kvp_progress_t *prog, const kvp_trainer_config_t *cfg,
                                   int step) {
    kvp_progress_message(prog, "stopped at step %d of %d; checkpoint %s", step, cfg->steps,
                         cfg->ckpt_path ? cfg->ckpt_path : "(none)");
}

FILE *kvp_trainutil_log_open(const char *path, const char *header, bool resumed, int step,
                             kvp_err_t *err) {
    if (resumed) {
        FILE *in = fopen(path, "rb");
        if (in) {
            char *keep = NULL;
            size_t kn = 0;
            FILE *mem = open_memstream(&keep, &kn);
            char line[1024];
            bool header = true;
            while (mem && fgets(line, sizeof line, in)) {
                if (header || atoi(line) <= step) fputs(line, mem);
                header = false;
            }
            fclose(in);
            if (mem) fclose(mem);
            FILE *out = fopen(path, "wb");
            if (out && keep) fwrite(keep, 1, kn, out);
            free(keep);
            if (!out) kvp_err_set(err, KVP_EIO, "log %s: %s", path, strerror(errno));
            return out;
        }
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        kvp_err_set(err, KVP_EIO, "log %s: %s", path, strerror(errno));
        return NULL;
    }
    fprintf(f, "%s\n", header);
    return f;
}
