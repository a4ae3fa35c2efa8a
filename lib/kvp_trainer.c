#include "kvp_trainer.h"
#include "kvp_trainutil.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvp_ckpt.h"
#include "kvp_progress.h"
#include "kvp_rng.h"
#include "kvp_time.h"
#include "kvp_train.h"

#define LN2 KVP_TRAINUTIL_LN2
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
    kvp_trainutil_windows_t w;
    int rc = kvp_trainutil_windows_init(&w, s, T, max_tokens, err);
    if (rc) return rc;
    double nats = 0.0;
    uint64_t n_tok = 0, n_bytes = 0;
    for (size_t j0 = 0; j0 < w.k; j0 += (size_t)B) {
        kvp_trainutil_batch_t b;
        rc =
            kvp_trainutil_windows_fill(&w, j0, B, tb, n_vocab, "model's", tokens, targets, &b, err);
        if (rc) return rc;
        n_bytes += b.bytes;
        if (!b.scored) continue;
        float loss;
        rc = kvp_train_forward(tc, tokens, targets, &loss, err);
        if (rc) return rc;
        nats += (double)loss * (double)b.scored;
        n_tok += b.scored;
    }
    kvp_trainutil_eval_set(out, nats, n_tok, n_bytes);
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
 * A text section of key=value lines (kvp_trainutil). Keys in the first group
 * describe where the run is; the second group are the settings that decide
 * the weights, which a resumed run must share. */

static const kvp_trainutil_ckpt_kind_t CKPT_KIND = {
    .format = "kvpred-trainer 1", .name = "trainer", .same = "settings and corpus"};

/* The settings a resumed run must share with the checkpoint. */
static void meta_settings(kvp_trainutil_meta_t *mt, const kvp_model_t *m, const kvp_corpus_t *c,
                          const kvp_trainer_config_t *cfg, int warmup) {
    kvp_trainutil_meta_add_model(mt, "", m);
    kvp_trainutil_meta_add_schedule(mt, cfg, warmup);
    kvp_trainutil_meta_add_corpus(mt, c);
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
    const kvp_trainutil_pos_t pos = {.step = r->step,
                                     .tokens = r->tokens,
                                     .elapsed = r->elapsed_before + (kvp_now() - r->t0),
                                     .adam_t = r->opt->t};
    kvp_trainutil_meta_add_pos(&mt, CKPT_KIND.format, &pos);
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
    kvp_trainutil_meta_t want = {.n = 0};
    meta_settings(&want, r->m, r->c, r->cfg, r->warmup);
    kvp_ckpt_t *ck = NULL;
    kvp_trainutil_pos_t pos;
    const char *text;
    size_t ml;
    int rc = kvp_trainutil_ckpt_open(&ck, r->cfg->ckpt_path, &CKPT_KIND, &want, r->cfg->steps, &pos,
                                     &text, &ml, err);
    if (rc) return rc;
    r->step = pos.step;
    r->tokens = pos.tokens;
    r->elapsed_before = pos.elapsed;
    r->opt->t = pos.adam_t;
    r->loss = kvp_trainutil_meta_double(text, ml, "loss");
    r->val_loss = kvp_trainutil_meta_double(text, ml, "val_loss");
    r->val_bpb = kvp_trainutil_meta_double(text, ml, "val_bpb");
    r->val_tokens = kvp_trainutil_meta_u64(text, ml, "val_tokens");
    uint64_t nb = (uint64_t)r->m->n_params * sizeof(float);
    rc = kvp_ckpt_get(ck, "rng", r->rng.s, sizeof r->rng.s, err);
    if (!rc) rc = kvp_ckpt_get(ck, "params", r->m->params, nb, err);
    if (!rc) rc = kvp_ckpt_get(ck, "adam.m", r->opt->m, nb, err);
    if (!rc) rc = kvp_ckpt_get(ck, "adam.v", r->opt->v, nb, err);
    kvp_ckpt_free(&ck);
    return rc;
}

/* ---- the loop -------------------------------------------------------------- */

static int check_config(const kvp_model_t *m, const kvp_corpus_t *c,
                        const kvp_trainer_config_t *cfg, kvp_err_t *err) {
    int rc = kvp_trainutil_check_config(cfg, "trainer", err);
    if (!rc)
        rc = kvp_trainutil_check_train_stream(c, cfg->ctx, m->cfg.n_vocab, "trainer", "model's",
                                              err);
    return rc;
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
    r.warmup = kvp_trainutil_warmup(cfg);
    kvp_rng_seed(&r.rng, cfg->seed);

    kvp_train_ctx_t *tc = NULL;
    float *grads = calloc(n, sizeof *grads);
    int32_t *tokens = malloc(BT * sizeof *tokens), *targets = malloc(BT * sizeof *targets);
    uint32_t *tb = kvp_trainutil_token_bytes_new(cfg->tok, m->cfg.n_vocab);
    FILE *log = NULL;
    if (!grads || !tokens || !targets || !tb)
        rc = kvp_err_set(err, KVP_ENOMEM, "trainer: out of memory");
    if (!rc) rc = kvp_adamw_new(&r.opt, n, &cfg->adamw, err);
    if (!rc) kvp_trainutil_no_decay_norms(r.opt, m);
    if (!rc && cfg->resume && access(cfg->ckpt_path, F_OK) == 0) {
        rc = load_ckpt(&r, err);
        res->resumed = rc == 0;
    }
    r.t0 = kvp_now();
    if (!rc) rc = kvp_train_ctx_new(&tc, m, B, T, err);
    if (!rc)
        rc = kvp_trainutil_session_open(cfg, CSV_HEADER, res->resumed, r.step, &log, &r.prog, err);

    const int start_step = r.step;
    bool stopped = false;
    while (!rc && r.step < cfg->steps) {
        if (kvp_trainutil_should_stop(cfg, r.step, start_step, r.t0)) {
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

        bool new_val = false;
        uint64_t cap;
        if (can_eval && kvp_trainutil_eval_due(cfg, r.step, &cap)) {
            kvp_eval_t ev;
            rc = evaluate(tc, val, tb, m->cfg.n_vocab, B, T, cap, tokens, targets, &ev, err);
            if (rc) break;
            r.val_loss = ev.loss;
            r.val_bpb = ev.bpb;
            r.val_tokens = ev.tokens;
            new_val = true;
        }
        double session = kvp_now() - r.t0;
        double tps = kvp_trainutil_tok_per_s(r.step - start_step, BT, cfg->accum, session);
        double eta = kvp_trainutil_eta(r.step - start_step, cfg->steps - r.step, session);
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
        if (kvp_trainutil_ckpt_due(cfg, r.step)) rc = save_ckpt(&r, err);
    }
    /* a checkpoint at the end, or where the run stopped */
    if (!rc && cfg->ckpt_path && (r.step > start_step || stopped)) rc = save_ckpt(&r, err);
    if (!rc && stopped) kvp_trainutil_stopped_message(r.prog, cfg, r.step);

    double session = kvp_now() - r.t0;
    res->step = r.step;
    res->completed = r.step == cfg->steps;
    res->loss = r.loss;
    res->loss_bpb = r.loss / LN2 * train_tok_per_byte;
    res->val_loss = r.val_loss;
    res->val_bpb = r.val_bpb;
    res->val_tokens = r.val_tokens;
    res->tokens = r.tokens;
    res->tok_per_s = kvp_trainutil_tok_per_s(r.step - start_step, BT, cfg->accum, session);
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
