#include "kvp_trainer.h"
#include "kvp_trainutil.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvp_ckpt.h"
#include "kvp_progress.h"
#include "kvp_rng.h"
#include "kvp_time.h"
#include "kvp_train.h"

#define LN2 0.69314718055994530942
#define CSV_HEADER "step,tokens,lr,loss,train_bpb,grad_norm,val_loss,val_bpb,tok_per_s,elapsed_s"

void kvp_trainer_config_default(kvp_trainer_config_t *c) {
    memset(c, 0, sizeof *c);
    c->batch = 8;
    c->ctx = 256;
    c->accum = 1;
    c->steps = 1000;
    c->warmup = -1;
    c->lr = 3e-3f;
    c->min_lr = 3e-4f;
    kvp_adamw_config_default(&c->adamw);
    c->clip = 1.0f;
    c->seed = 1;
    c->eval_every = 100;
    c->eval_tokens = 32768;
    c->final_eval_tokens = 131072;
    c->ckpt_every = 100;
    c->progress_tty = -1;
}

/* ---- model initialisation ------------------------------------------------ */

int kvp_trainer_init_model(kvp_model_t **out, const kvp_model_config_t *cfg, uint64_t seed,
                           kvp_err_t *err) {
    int rc = kvp_model_new_random(out, cfg, seed, 0.02f, err);
    if (rc) return rc;
    kvp_model_t *m = *out;
    const kvp_model_config_t *c = &m->cfg;
    /* Each block adds two outputs to the residual stream; scaling their
     * projections keeps its variance from growing with depth at the start. */
    float s = 1.0f / sqrtf(2.0f * (float)c->n_layer);
    size_t n_o = (size_t)c->n_embd * c->n_head * c->head_dim, n_d = (size_t)c->n_embd * c->n_ff;
    for (int l = 0; l < c->n_layer; l++) {
        for (size_t i = 0; i < n_o; i++)
            m->layers[l].wo[i] *= s;
        for (size_t i = 0; i < n_d; i++)
            m->layers[l].w_down[i] *= s;
    }
    return 0;
}

/* ---- bytes per token and evaluation -------------------------------------- */

/* Scores about max_tokens tokens of s in evenly spaced windows of T, B a
 * forward, with tc (made for B x T). */
static int evaluate(kvp_train_ctx_t *tc, const kvp_corpus_stream_t *s, const uint32_t *tb,
                    int n_vocab, int B, int T, uint64_t max_tokens, int32_t *tokens,
                    int32_t *targets, kvp_eval_t *out, kvp_err_t *err) {
    memset(out, 0, sizeof *out);
    size_t n_win = kvp_corpus_n_windows(s, T);
    if (n_win == 0)
        return kvp_err_set(err, KVP_EINVAL, "evaluation: the validation split is empty");
    size_t k = n_win;
    if (max_tokens > 0 && (max_tokens + (uint64_t)T - 1) / (uint64_t)T < k)
        k = (size_t)((max_tokens + (uint64_t)T - 1) / (uint64_t)T);
    int32_t pad = s->tok[0];
    double nats = 0.0;
    for (size_t j0 = 0; j0 < k; j0 += (size_t)B) {
        uint64_t scored = 0;
        for (int b = 0; b < B; b++) {
            int32_t *tk = tokens + (size_t)b * T, *tg = targets + (size_t)b * T;
            size_t j = j0 + (size_t)b;
            if (j < k) {
                /* window j of k spread evenly over the n_win there are */
                size_t w = (size_t)((unsigned __int128)j * n_win / k);
                kvp_corpus_window(s, w, T, pad, tk, tg);
            } else {
                for (int t = 0; t < T; t++)
                    tk[t] = pad, tg[t] = -1;
            }
            for (int t = 0; t < T; t++)
                if (tg[t] >= 0) {
                    if (tg[t] >= n_vocab)
                        return kvp_err_set(err, KVP_ERANGE,
                                           "evaluation: token %d is outside the model's "
                                           "vocabulary of %d",
                                           (int)tg[t], n_vocab);
                    scored++;
                    out->bytes += tb[tg[t]];
                }
        }
        if (!scored) continue;
        float loss;
        int rc = kvp_train_forward(tc, tokens, targets, &loss, err);
        if (rc) return rc;
        nats += (double)loss * (double)scored;
        out->tokens += scored;
    }
    out->loss = out->tokens ? nats / (double)out->tokens : NAN;
    out->bpb = out->bytes ? nats / LN2 / (double)out->bytes : NAN;
    return 0;
}

int kvp_trainer_evaluate(const kvp_model_t *m, const kvp_corpus_stream_t *s,
                         const kvp_tokenizer_t *tok, int B, int T, uint64_t max_tokens,
                         kvp_eval_t *out, kvp_err_t *err) {
    if (B <= 0 || T <= 0)
        return kvp_err_set(err, KVP_EINVAL, "evaluation: batch %d and context %d must be > 0", B,
                           T);
    kvp_train_ctx_t *tc = NULL;
    int rc = kvp_train_ctx_new(&tc, m, B, T, err);
    uint32_t *tb = rc ? NULL : kvp_trainutil_token_bytes_new(tok, m->cfg.n_vocab);
    int32_t *tokens = malloc(sizeof(int32_t) * (size_t)B * T);
    int32_t *targets = malloc(sizeof(int32_t) * (size_t)B * T);
    if (!rc && (!tb || !tokens || !targets))
        rc = kvp_err_set(err, KVP_ENOMEM, "evaluation: out of memory");
    if (!rc) rc = evaluate(tc, s, tb, m->cfg.n_vocab, B, T, max_tokens, tokens, targets, out, err);
    free(tb);
    free(tokens);
    free(targets);
    kvp_train_ctx_free(&tc);
    return rc;
}

/* ---- checkpoint metadata ---------------------------------------------------
 * A text section of key=value lines. Keys in the first group describe where
 * the run is; the second group are the settings that decide the weights,
 * which a resumed run must share. Floats are printed with enough digits to
 * read back exactly. */

/* The settings a resumed run must share with the checkpoint. */
static void meta_settings(kvp_trainutil_meta_t *mt, const kvp_model_t *m, const kvp_corpus_t *c,
                          const kvp_trainer_config_t *cfg, int warmup) {
    const kvp_model_config_t *mc = &m->cfg;
    kvp_trainutil_meta_add(mt, "n_params", "%zu", m->n_params);
    kvp_trainutil_meta_add(
        mt, "model",
        "vocab %d embd %d layers %d heads %d kv_heads %d head_dim %d ffn %d rope_dim %d "
        "rope_base %.9g norm_eps %.9g tied %d",
        mc->n_vocab, mc->n_embd, mc->n_layer, mc->n_head, mc->n_kv_head, mc->head_dim, mc->n_ff,
        mc->rope_dim, mc->rope_base, mc->norm_eps, (int)mc->tied_output);
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
    kvp_trainutil_meta_add(mt, "corpus", "%016" PRIx64 " (%zu files)", kvp_corpus_fingerprint(c),
                           kvp_corpus_n_files(c));
}

/* ---- the run ------------------------------------------------------------- */

typedef struct run {
    kvp_model_t *m;
    const kvp_corpus_t *c;
    const kvp_trainer_config_t *cfg;
    int warmup;
    kvp_adamw_t *opt;
    kvp_rng_t rng;
    int step;
    uint64_t tokens;
    double elapsed_before; /* seconds of earlier sessions */
    double t0;             /* this session's start */
    double loss;           /* of the last step done */
    double val_loss, val_bpb;
    uint64_t val_tokens;
    kvp_progress_t *prog;
} run_t;

static int save_ckpt(run_t *r, kvp_err_t *err) {
    const kvp_trainer_config_t *cfg = r->cfg;
    kvp_trainutil_meta_t mt = {.n = 0};
    kvp_trainutil_meta_add(&mt, "format", "kvpred-trainer 1");
    kvp_trainutil_meta_add(&mt, "step", "%d", r->step);
    kvp_trainutil_meta_add(&mt, "tokens", "%" PRIu64, r->tokens);
    kvp_trainutil_meta_add(&mt, "elapsed", "%.17g", r->elapsed_before + (kvp_now() - r->t0));
    kvp_trainutil_meta_add(&mt, "adam_t", "%" PRId64, r->opt->t);
    kvp_trainutil_meta_add(&mt, "loss", "%.17g", r->loss);
    kvp_trainutil_meta_add(&mt, "val_loss", "%.17g", r->val_loss);
    kvp_trainutil_meta_add(&mt, "val_bpb", "%.17g", r->val_bpb);
    kvp_trainutil_meta_add(&mt, "val_tokens", "%" PRIu64, r->val_tokens);
    meta_settings(&mt, r->m, r->c, cfg, r->warmup);
    uint64_t nb = (uint64_t)r->m->n_params * sizeof(float);
    kvp_ckpt_section_t s[] = {
        {"meta", mt.buf, mt.n},    {"rng", r->rng.s, sizeof r->rng.s}, {"params", r->m->params, nb},
        {"adam.m", r->opt->m, nb}, {"adam.v", r->opt->v, nb},
    };
    return kvp_ckpt_write(cfg->ckpt_path, s, sizeof s / sizeof s[0], err);
}

static int load_ckpt(run_t *r, kvp_err_t *err) {
    const char *path = r->cfg->ckpt_path;
    kvp_ckpt_t *ck = NULL;
    int rc = kvp_ckpt_read(&ck, path, err);
    if (rc) return rc;
    uint64_t ml = 0;
    const char *text = kvp_ckpt_find(ck, "meta", &ml);
    char fmt[64], val[512];
    if (!text || !kvp_trainutil_meta_get(text, (size_t)ml, "format", fmt, sizeof fmt) ||
        strcmp(fmt, "kvpred-trainer 1")) {
        kvp_ckpt_free(&ck);
        return kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: not a kvpred trainer checkpoint",
                           path);
    }
    /* every setting that decides the weights must be the same */
    kvp_trainutil_meta_t want = {.n = 0};
    meta_settings(&want, r->m, r->c, r->cfg, r->warmup);
    for (char *line = want.buf; *line;) {
        char *nl = strchr(line, '\n');
        *nl = 0;
        char *eq = strchr(line, '=');
        *eq = 0;
        if (!kvp_trainutil_meta_get(text, (size_t)ml, line, val, sizeof val) ||
            strcmp(val, eq + 1)) {
            rc = kvp_err_set(err, KVP_ESHAPE,
                             "checkpoint %s was written with %s=%s, this run has %s=%s: resume "
                             "with the same settings and corpus, or start afresh",
                             path, line,
                             kvp_trainutil_meta_get(text, (size_t)ml, line, val, sizeof val) ? val
                                                                                             : "?",
                             line, eq + 1);
            kvp_ckpt_free(&ck);
            return rc;
        }
        line = nl + 1;
    }
    char v[4][64];
    if (!kvp_trainutil_meta_get(text, (size_t)ml, "step", v[0], sizeof v[0]) ||
        !kvp_trainutil_meta_get(text, (size_t)ml, "tokens", v[1], sizeof v[1]) ||
        !kvp_trainutil_meta_get(text, (size_t)ml, "elapsed", v[2], sizeof v[2]) ||
        !kvp_trainutil_meta_get(text, (size_t)ml, "adam_t", v[3], sizeof v[3])) {
        kvp_ckpt_free(&ck);
        return kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: metadata incomplete", path);
    }
    r->step = atoi(v[0]);
    r->tokens = strtoull(v[1], NULL, 10);
    r->elapsed_before = strtod(v[2], NULL);
    r->opt->t = strtoll(v[3], NULL, 10);
    if (kvp_trainutil_meta_get(text, (size_t)ml, "loss", val, sizeof val))
        r->loss = strtod(val, NULL);
    if (kvp_trainutil_meta_get(text, (size_t)ml, "val_loss", val, sizeof val))
        r->val_loss = strtod(val, NULL);
    if (kvp_trainutil_meta_get(text, (size_t)ml, "val_bpb", val, sizeof val))
        r->val_bpb = strtod(val, NULL);
    if (kvp_trainutil_meta_get(text, (size_t)ml, "val_tokens", val, sizeof val))
        r->val_tokens = strtoull(val, NULL, 10);
    if (r->step < 0 || r->step > r->cfg->steps) {
        kvp_ckpt_free(&ck);
        return kvp_err_set(err, KVP_EFORMAT, "checkpoint %s: step %d outside [0, %d]", path,
                           r->step, r->cfg->steps);
    }
    uint64_t nb = (uint64_t)r->m->n_params * sizeof(float);
    rc = kvp_ckpt_get(ck, "rng", r->rng.s, sizeof r->rng.s, err);
    if (!rc) rc = kvp_ckpt_get(ck, "params", r->m->params, nb, err);
    if (!rc) rc = kvp_ckpt_get(ck, "adam.m", r->opt->m, nb, err);
    if (!rc) rc = kvp_ckpt_get(ck, "adam.v", r->opt->v, nb, err);
    kvp_ckpt_free(&ck);
    return rc;
}

/* ---- the CSV log ----------------------------------------------------------- */

/* ---- the loop -------------------------------------------------------------- */

static int check_config(const kvp_model_t *m, const kvp_corpus_t *c,
                        const kvp_trainer_config_t *cfg, kvp_err_t *err) {
    if (cfg->batch <= 0 || cfg->ctx <= 1 || cfg->accum <= 0 || cfg->steps <= 0)
        return kvp_err_set(err, KVP_EINVAL,
                           "trainer: batch %d, context %d, accumulation %d and steps %d must be "
                           "positive (context at least 2)",
                           cfg->batch, cfg->ctx, cfg->accum, cfg->steps);
    if (!(cfg->lr > 0) || !(cfg->min_lr >= 0) || cfg->min_lr > cfg->lr)
        return kvp_err_set(err, KVP_EINVAL,
                           "trainer: learning rates must satisfy 0 <= min_lr <= lr, lr > 0 (lr "
                           "%g, min_lr %g)",
                           cfg->lr, cfg->min_lr);
    if ((cfg->resume || cfg->ckpt_every > 0) && !cfg->ckpt_path)
        return kvp_err_set(err, KVP_EINVAL, "trainer: checkpoints asked for without a path");
    const kvp_corpus_stream_t *tr = kvp_corpus_stream(c, KVP_SPLIT_TRAIN);
    if (tr->n <= (size_t)cfg->ctx)
        return kvp_err_set(err, KVP_EINVAL,
                           "trainer: the train split has %zu tokens, fewer than one window of "
                           "%d+1 (%zu of %zu files are in it)",
                           tr->n, cfg->ctx, kvp_corpus_split_files(c, KVP_SPLIT_TRAIN),
                           kvp_corpus_n_files(c));
    for (size_t i = 0; i < tr->n; i++)
        if (tr->tok[i] < 0 || tr->tok[i] >= m->cfg.n_vocab)
            return kvp_err_set(err, KVP_ERANGE,
                               "trainer: token %d in the train stream is outside the model's "
                               "vocabulary of %d",
                               (int)tr->tok[i], m->cfg.n_vocab);
    return 0;
}

static void no_decay(kvp_adamw_t *o, const kvp_model_t *m, const float *p, size_t n) {
    kvp_adamw_set_decay(o, (size_t)(p - m->params), n, false);
}

int kvp_trainer_run(kvp_model_t *m, const kvp_corpus_t *c, const kvp_trainer_config_t *cfg,
                    kvp_trainer_result_t *res, kvp_err_t *err) {
    memset(res, 0, sizeof *res);
    res->val_loss = res->val_bpb = NAN;
    int rc = check_config(m, c, cfg, err);
    if (rc) return rc;
    kvp_model_drop_half(m); /* training changes the f32 weights the copy mirrors */
    const int B = cfg->batch, T = cfg->ctx;
    const size_t BT = (size_t)B * T, n = m->n_params;
    const kvp_corpus_stream_t *train = kvp_corpus_stream(c, KVP_SPLIT_TRAIN);
    const kvp_corpus_stream_t *val = kvp_corpus_stream(c, KVP_SPLIT_VAL);
    const bool can_eval = val->n >= 2;
    const double train_tok_per_byte = train->bytes ? (double)train->n / (double)train->bytes : 1.0;

    run_t r = {.m = m, .c = c, .cfg = cfg, .loss = NAN, .val_loss = NAN, .val_bpb = NAN};
    r.warmup = cfg->warmup >= 0 ? cfg->warmup : cfg->steps / 20;
    kvp_rng_seed(&r.rng, cfg->seed);

    kvp_train_ctx_t *tc = NULL;
    float *grads = calloc(n, sizeof *grads);
    int32_t *tokens = malloc(BT * sizeof *tokens), *targets = malloc(BT * sizeof *targets);
    uint32_t *tb = kvp_trainutil_token_bytes_new(cfg->tok, m->cfg.n_vocab);
    FILE *log = NULL;
    if (!grads || !tokens || !targets || !tb)
        rc = kvp_err_set(err, KVP_ENOMEM, "trainer: out of memory");
    if (!rc) rc = kvp_adamw_new(&r.opt, n, &cfg->adamw, err);
    if (!rc) {
        no_decay(r.opt, m, m->output_norm, (size_t)m->cfg.n_embd);
        for (int l = 0; l < m->cfg.n_layer; l++) {
            no_decay(r.opt, m, m->layers[l].attn_norm, (size_t)m->cfg.n_embd);
            no_decay(r.opt, m, m->layers[l].ffn_norm, (size_t)m->cfg.n_embd);
        }
    }
    if (!rc && cfg->resume && access(cfg->ckpt_path, F_OK) == 0) {
        rc = load_ckpt(&r, err);
        res->resumed = rc == 0;
    }
    r.t0 = kvp_now();
    if (!rc) rc = kvp_train_ctx_new(&tc, m, B, T, err);
    if (!rc && cfg->log_path &&
        !(log = kvp_trainutil_log_open(cfg->log_path, CSV_HEADER, res->resumed, r.step, err)))
        rc = err ? err->code : KVP_EIO;
    if (!rc && cfg->progress)
        r.prog = kvp_progress_new(cfg->progress, cfg->progress_tty, cfg->progress_interval);
    if (!rc && res->resumed)
        kvp_progress_message(r.prog, "resumed from %s at step %d of %d", cfg->ckpt_path, r.step,
                             cfg->steps);

    const int start_step = r.step;
    bool stopped = false;
    while (!rc && r.step < cfg->steps) {
        if ((cfg->stop_after > 0 && r.step >= cfg->stop_after) ||
            (cfg->stop_flag && *cfg->stop_flag) ||
            (cfg->time_limit_s > 0 && r.step > start_step &&
             kvp_now() - r.t0 >= cfg->time_limit_s)) {
            stopped = true;
            break;
        }
        memset(grads, 0, n * sizeof *grads);
        double loss_sum = 0.0;
        for (int a = 0; !rc && a < cfg->accum; a++) {
            float l = 0.0f;
            rc = kvp_corpus_sample(train, &r.rng, B, T, tokens, targets, err);
            if (!rc) rc = kvp_train_forward(tc, tokens, targets, &l, err);
            if (!rc) rc = kvp_train_backward(tc, grads, 1.0f / (float)cfg->accum, err);
            loss_sum += l;
        }
        if (rc) break;
        double loss = loss_sum / cfg->accum;
        r.loss = loss;
        if (!isfinite(loss)) {
            rc = kvp_err_set(err, KVP_ERANGE,
                             "trainer: the loss became %g at step %d (try a lower --lr)", loss,
                             r.step + 1);
            break;
        }
        double gnorm = kvp_grad_clip(grads, n, cfg->clip);
        float lr = kvp_lr_at(r.step, r.warmup, cfg->steps, cfg->lr, cfg->min_lr);
        kvp_adamw_step(r.opt, m->params, grads, lr);
        r.step++;
        r.tokens += BT * (uint64_t)cfg->accum;

        bool last = r.step == cfg->steps;
        bool new_val = false;
        if (can_eval && (last || (cfg->eval_every > 0 && r.step % cfg->eval_every == 0))) {
            kvp_eval_t ev;
            uint64_t cap = (uint64_t)(last ? cfg->final_eval_tokens : cfg->eval_tokens);
            rc = evaluate(tc, val, tb, m->cfg.n_vocab, B, T, cap, tokens, targets, &ev, err);
            if (rc) break;
            r.val_loss = ev.loss;
            r.val_bpb = ev.bpb;
            r.val_tokens = ev.tokens;
            new_val = true;
        }
        double session = kvp_now() - r.t0;
        double tps = session > 0 ? (double)(r.step - start_step) * BT * cfg->accum / session : 0;
        double eta =
            (r.step > start_step) ? session / (r.step - start_step) * (cfg->steps - r.step) : -1.0;
        double loss_bpb = loss / LN2 * train_tok_per_byte;
        if (log) {
            fprintf(log, "%d,%" PRIu64 ",%.6g,%.6f,%.6f,%.6g,", r.step, r.tokens, lr, loss,
                    loss_bpb, gnorm);
            if (new_val)
                fprintf(log, "%.6f,%.6f", r.val_loss, r.val_bpb);
            else
                fputc(',', log);
            fprintf(log, ",%.1f,%.2f\n", tps, r.elapsed_before + session);
            fflush(log);
        }
        kvp_progress_info_t pi = {.step = r.step,
                                  .total = cfg->steps,
                                  .loss_bpb = loss_bpb,
                                  .val_bpb = r.val_bpb,
                                  .tok_per_s = tps,
                                  .eta_s = eta,
                                  .new_val = new_val};
        kvp_progress_update(r.prog, &pi);
        if (!last && cfg->ckpt_path && cfg->ckpt_every > 0 && r.step % cfg->ckpt_every == 0)
            rc = save_ckpt(&r, err);
    }
    /* a checkpoint at the end, or where the run stopped */
    if (!rc && cfg->ckpt_path && (r.step > start_step || stopped)) rc = save_ckpt(&r, err);
    if (!rc && stopped)
        kvp_progress_message(r.prog, "stopped at step %d of %d; checkpoint %s", r.step, cfg->steps,
                             cfg->ckpt_path ? cfg->ckpt_path : "(none)");

    double session = kvp_now() - r.t0;
    res->step = r.step;
    res->completed = r.step == cfg->steps;
    res->loss = r.loss;
    res->loss_bpb = r.loss / LN2 * train_tok_per_byte;
    res->val_loss = r.val_loss;
    res->val_bpb = r.val_bpb;
    res->val_tokens = r.val_tokens;
    res->tokens = r.tokens;
    res->tok_per_s = session > 0 ? (double)(r.step - start_step) * BT * cfg->accum / session : 0.0;
    res->elapsed_s = r.elapsed_before + session;

    kvp_progress_free(&r.prog);
    if (log) fclose(log);
    kvp_train_ctx_free(&tc);
    kvp_adamw_free(&r.opt);
    free(grads);
    free(tokens);
    free(targets);
    free(tb);
    return rc;
}

/* ---- output ---------------------------------------------------------------- */

int kvp_trainer_save_gguf(const kvp_model_t *m, const char *path, const char *name,
                          const char *const *merges, size_t n_merges,
                          const kvp_trainer_config_t *cfg, const kvp_trainer_result_t *res,
                          const char *command, kvp_err_t *err) {
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    if (!w) return kvp_err_set(err, KVP_ENOMEM, "out of memory");
    int rc = kvp_model_to_gguf(m, w, KVP_GGML_F32, err);
    if (!rc) rc = kvp_tokenizer_write_bytelevel(w, merges, n_merges, err);
    if (!rc && name && kvp_gguf_writer_set_str(w, "general.name", name))
        rc = kvp_err_set(err, KVP_ENOMEM, "out of memory");
    if (!rc && cfg && res) {
        int bad = 0;
        bad |= kvp_gguf_writer_set_u32(w, "kvpred.train.step", (uint32_t)res->step);
        bad |= kvp_gguf_writer_set_u32(w, "kvpred.train.steps", (uint32_t)cfg->steps);
        bad |= kvp_gguf_writer_set_u32(w, "kvpred.train.batch", (uint32_t)cfg->batch);
        bad |= kvp_gguf_writer_set_u32(w, "kvpred.train.ctx", (uint32_t)cfg->ctx);
        bad |= kvp_gguf_writer_set_u32(w, "kvpred.train.accum", (uint32_t)cfg->accum);
        bad |= kvp_gguf_writer_set_u64(w, "kvpred.train.seed", cfg->seed);
        bad |= kvp_gguf_writer_set_u64(w, "kvpred.train.tokens", res->tokens);
        bad |= kvp_gguf_writer_set_f32(w, "kvpred.train.lr", cfg->lr);
        bad |= kvp_gguf_writer_set_f32(w, "kvpred.train.loss", (float)res->loss);
        bad |= kvp_gguf_writer_set_f32(w, "kvpred.train.val_loss", (float)res->val_loss);
        bad |= kvp_gguf_writer_set_f32(w, "kvpred.train.val_bpb", (float)res->val_bpb);
        bad |= kvp_gguf_writer_set_u64(w, "kvpred.train.val_tokens", res->val_tokens);
        bad |= kvp_gguf_writer_set_f32(w, "kvpred.train.seconds", (float)res->elapsed_s);
        bad |= kvp_gguf_writer_set_f32(w, "kvpred.train.tok_per_s", (float)res->tok_per_s);
        if (bad) rc = kvp_err_set(err, KVP_ENOMEM, "out of memory");
    }
    if (!rc && command && kvp_gguf_writer_set_str(w, "kvpred.train.command", command))
        rc = kvp_err_set(err, KVP_ENOMEM, "out of memory");
    if (!rc) rc = kvp_gguf_writer_write(w, path, err);
    kvp_gguf_writer_free(&w);
    return rc;
}
