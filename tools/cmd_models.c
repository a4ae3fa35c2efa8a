/* kvpred models: the default base and auxiliary models of KV Prediction,
 * trained once on the default corpus and cached.
 *
 * Both come from fixed recipes (below; docs/training.md gives the same runs
 * as `kvpred train` command lines). A model whose file exists, finished its
 * steps and carries the current recipe is reused, so a second run takes
 * seconds. An interrupted run (Ctrl-C, kill) leaves a checkpoint that the
 * next run resumes. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvp_cmds.h"
#include "kvp_json.h"
#include "kvp_train.h"
#include "kvp_train_tool.h"
#include "kvp_trainer.h"

/* Validation for comparing the two: the same evenly spaced windows of the
 * validation split for both (see kvp_trainer_evaluate). */
#define FINAL_EVAL_TOKENS 131072
#define FLOPS_PROMPT 256 /* prompt length for the prefill FLOPs comparison */

typedef struct recipe {
    const char *name;
    int layers, embd, heads, kv_heads, ffn;
    int ctx, batch, accum, steps, warmup;
    float lr, min_lr;
    uint64_t seed;
} recipe_t;

/* Measured on the 2-core development machine: see docs/training.md. */
static const recipe_t RECIPES[] = {
    {.name = "base",
     .layers = 4,
     .embd = 256,
     .heads = 4,
     .kv_heads = 4,
     .ffn = 704,
     .ctx = 256,
     .batch = 8,
     .accum = 1,
     .steps = 600,
     .warmup = 30,
     .lr = 1e-3f,
     .min_lr = 1e-4f,
     .seed = 1},
    {.name = "aux",
     .layers = 2,
     .embd = 128,
     .heads = 2,
     .kv_heads = 2,
     .ffn = 352,
     .ctx = 256,
     .batch = 8,
     .accum = 1,
     .steps = 600,
     .warmup = 30,
     .lr = 3e-3f,
     .min_lr = 3e-4f,
     .seed = 1},
};
#define N_RECIPES (int)(sizeof RECIPES / sizeof RECIPES[0])

static void usage(FILE *f) {
    fprintf(f, "usage: kvpred models [--dir DIR] [--force] [--quiet]\n"
               "Trains the default base and auxiliary models on the default corpus\n"
               "(" KVP_CORPUS_DEFAULT_DIR "/**/*" KVP_CORPUS_DEFAULT_EXT
               ") unless DIR (default models) already holds them,\n"
               "then prints their sizes, prefill FLOPs and validation bits per byte.\n"
               "  --dir DIR   where the models, logs and checkpoints live (default models)\n"
               "  --force     train again even if the models are there\n"
               "  --quiet     no progress display\n"
               "Ctrl-C stops with a checkpoint; the next run resumes it.\n");
}

static kvp_model_config_t recipe_model(const recipe_t *r) {
    return (kvp_model_config_t){.n_vocab = kvp_tokenizer_bytelevel_n_vocab(0),
                                .n_embd = r->embd,
                                .n_layer = r->layers,
                                .n_head = r->heads,
                                .n_kv_head = r->kv_heads,
                                .n_ff = r->ffn,
                                .n_ctx_train = r->ctx,
                                .tied_output = true};
}

static void recipe_train(const recipe_t *r, kvp_trainer_config_t *t) {
    kvp_trainer_config_default(t);
    t->ctx = r->ctx;
    t->batch = r->batch;
    t->accum = r->accum;
    t->steps = r->steps;
    t->warmup = r->warmup;
    t->lr = r->lr;
    t->min_lr = r->min_lr;
    t->seed = r->seed + 1; /* as `kvpred train --seed S` does */
    t->final_eval_tokens = FINAL_EVAL_TOKENS;
}

/* The recipe as the `kvpred train` command that makes the same model; it is
 * also stored in the file, so a changed recipe is noticed. */
static void recipe_command(const recipe_t *r, const char *out, char *buf, size_t cap) {
    snprintf(buf, cap,
             "kvpred train -o %s --layers %d --embd %d --heads %d --kv-heads %d --ffn %d "
             "--ctx %d --batch %d --accum %d --steps %d --warmup %d --lr %g --min-lr %g "
             "--seed %llu --final-eval-tokens %d",
             out, r->layers, r->embd, r->heads, r->kv_heads, r->ffn, r->ctx, r->batch, r->accum,
             r->steps, r->warmup, r->lr, r->min_lr, (unsigned long long)r->seed, FINAL_EVAL_TOKENS);
}

typedef struct outcome {
    bool cached;
    size_t n_params;
    kvp_model_config_t cfg;
    float val_bpb, val_loss, seconds;
    double tok_per_s;
    uint64_t tokens;
} outcome_t;

/* Reads a finished model of this recipe from path; false if absent, from
 * another recipe or unfinished (why goes to *why). */
static bool read_cached(const recipe_t *r, const char *path, const char *command, outcome_t *o,
                        const char **why) {
    *why = NULL;
    if (access(path, F_OK)) return false;
    kvp_gguf_t *g = NULL;
    kvp_model_t *m = NULL;
    kvp_err_t err = {0};
    char stored[1024];
    uint32_t step = 0, steps = 0;
    bool ok = false;
    if (kvp_gguf_open(&g, path, &err) || kvp_model_from_gguf(&m, g, &err))
        *why = "unreadable";
    else if (kvp_gguf_get_str(g, "kvpred.train.command", stored, sizeof stored, NULL) ||
             strcmp(stored, command))
        *why = "from another recipe";
    else if (kvp_gguf_get_u32(g, "kvpred.train.step", &step, NULL) ||
             kvp_gguf_get_u32(g, "kvpred.train.steps", &steps, NULL) || step != steps ||
             steps != (uint32_t)r->steps)
        *why = "unfinished";
    else {
        uint64_t tokens = 0;
        float tps = 0;
        kvp_gguf_get_f32(g, "kvpred.train.val_bpb", &o->val_bpb, NULL);
        kvp_gguf_get_f32(g, "kvpred.train.val_loss", &o->val_loss, NULL);
        kvp_gguf_get_f32(g, "kvpred.train.seconds", &o->seconds, NULL);
        kvp_gguf_get_f32_or(g, "kvpred.train.tok_per_s", 0, &tps, NULL);
        kvp_gguf_get_u64(g, "kvpred.train.tokens", &tokens, NULL);
        o->tok_per_s = tps;
        o->tokens = tokens;
        o->cfg = m->cfg;
        o->n_params = m->n_params;
        o->cached = true;
        ok = true;
    }
    kvp_model_free(&m);
    kvp_gguf_free(&g);
    return ok;
}

static int train_one(const recipe_t *r, const char *dir, const char *path, const char *command,
                     kvp_corpus_t *corpus, bool quiet, outcome_t *o) {
    char ckpt[4096], log[4096], tmp[4200];
    snprintf(ckpt, sizeof ckpt, "%s/%s.ckpt", dir, r->name);
    snprintf(log, sizeof log, "%s/%s.csv", dir, r->name);
    kvp_model_config_t mc = recipe_model(r);
    kvp_trainer_config_t t;
    recipe_train(r, &t);
    t.ckpt_path = ckpt;
    t.log_path = log;
    t.resume = true;
    t.stop_flag = &kvp_train_tool_stop;
    t.progress = quiet ? NULL : stderr;
    kvp_err_t err = {0};
    kvp_model_t *m = NULL;
    int rc = kvp_trainer_init_model(&m, &mc, r->seed, &err);
    if (!rc && !quiet) {
        char desc[160];
        kvp_train_tool_describe(&m->cfg, m->n_params, desc, sizeof desc);
        fprintf(stderr, "%s: %s\n  = %s\n", r->name, desc, command);
    }
    kvp_trainer_result_t res;
    if (!rc) rc = kvp_trainer_run(m, corpus, &t, &res, &err);
    if (!rc && !res.completed) {
        fprintf(stderr, "kvpred models: %s stopped at step %d of %d; run again to resume\n",
                r->name, res.step, r->steps);
        kvp_model_free(&m);
        return 130;
    }
    if (!rc) {
        snprintf(tmp, sizeof tmp, "kvpred %s model", r->name);
        rc = kvp_trainer_save_gguf(m, path, tmp, NULL, 0, &t, &res, command, &err);
    }
    if (rc) {
        fprintf(stderr, "kvpred models: %s: %s\n", r->name,
                err.msg[0] ? err.msg : kvp_err_name(rc));
        kvp_model_free(&m);
        return 1;
    }
    unlink(ckpt); /* the model file is the cache now */
    o->cached = false;
    o->n_params = m->n_params;
    o->cfg = m->cfg;
    o->val_bpb = (float)res.val_bpb;
    o->val_loss = (float)res.val_loss;
    o->seconds = (float)res.elapsed_s;
    o->tok_per_s = res.tok_per_s;
    o->tokens = res.tokens;
    kvp_model_free(&m);
    return 0;
}

int kvp_cmd_models(int argc, char **argv) {
    static const struct option lo[] = {{"dir", required_argument, 0, 'd'},
                                       {"force", no_argument, 0, 'f'},
                                       {"quiet", no_argument, 0, 'q'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    const char *dir = "models";
    bool force = false, quiet = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (c) {
        case 'd':
            dir = optarg;
            break;
        case 'f':
            force = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kvpred models: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (strlen(dir) > 3000) {
        fprintf(stderr, "kvpred models: --dir path too long\n");
        return 2;
    }
    if (mkdir(dir, 0755) && errno != EEXIST) {
        fprintf(stderr, "kvpred models: cannot create %s: %s\n", dir, strerror(errno));
        return 1;
    }
    outcome_t out[N_RECIPES];
    memset(out, 0, sizeof out);
    kvp_corpus_t *corpus = NULL;
    int status = 0;
    kvp_train_tool_catch_signals();
    for (int i = 0; i < N_RECIPES && !status; i++) {
        const recipe_t *r = &RECIPES[i];
        char path[4096], command[5200];
        snprintf(path, sizeof path, "%s/%s.gguf", dir, r->name);
        recipe_command(r, path, command, sizeof command);
        const char *why = NULL;
        if (!force && read_cached(r, path, command, &out[i], &why)) continue;
        if (why && !quiet) fprintf(stderr, "%s is %s: training it again\n", path, why);
        if (force) {
            char ckpt[4200];
            snprintf(ckpt, sizeof ckpt, "%s/%s.ckpt", dir, r->name);
            unlink(ckpt);
        }
        if (!corpus) {
            const char *paths[] = {KVP_CORPUS_DEFAULT_DIR};
            if (kvp_train_tool_load_corpus("kvpred models", paths, 1, KVP_CORPUS_DEFAULT_EXT,
                                           KVP_CORPUS_DEFAULT_HOLDOUT, NULL, quiet ? NULL : stderr,
                                           &corpus)) {
                status = 1;
                break;
            }
        }
        status = train_one(r, dir, path, command, corpus, quiet, &out[i]);
    }
    kvp_corpus_free(&corpus);
    if (status) return status;

    double flops[N_RECIPES];
    printf("%-5s %-28s %9s %12s %10s %9s %8s %s\n", "model", "shape", "params", "MFLOP/token",
           "val bpb", "tok/s", "seconds", "file");
    for (int i = 0; i < N_RECIPES; i++) {
        const outcome_t *o = &out[i];
        flops[i] = kvp_train_tool_prefill_flops(&o->cfg, FLOPS_PROMPT);
        char shape[64];
        snprintf(shape, sizeof shape, "%dL d%d h%d/%d ffn%d", o->cfg.n_layer, o->cfg.n_embd,
                 o->cfg.n_head, o->cfg.n_kv_head, o->cfg.n_ff);
        printf("%-5s %-28s %9zu %12.3f %10.4f %9.0f %8.1f %s/%s.gguf%s\n", RECIPES[i].name, shape,
               o->n_params, flops[i] / 1e6, o->val_bpb, o->tok_per_s, o->seconds, dir,
               RECIPES[i].name, o->cached ? " (cached)" : "");
    }
    printf("prefill FLOPs per token over a %d-token prompt: base / aux = %.2f\n", FLOPS_PROMPT,
           flops[0] / flops[1]);
    printf("validation: %d tokens of the held-out split (%d%% of files by path hash); "
           "base %.4f vs aux %.4f bits per byte\n",
           FINAL_EVAL_TOKENS, KVP_CORPUS_DEFAULT_HOLDOUT, out[0].val_bpb, out[1].val_bpb);

    /* the same numbers for scripts */
    char jp[4096];
    snprintf(jp, sizeof jp, "%s/models.json", dir);
    FILE *jf = fopen(jp, "w");
    if (jf) {
        kvp_json_t j;
        kvp_json_begin(&j, jf);
        kvp_json_int(&j, "flops_prompt_tokens", FLOPS_PROMPT);
        kvp_json_num(&j, "prefill_flops_ratio", flops[0] / flops[1]);
        kvp_json_int(&j, "val_tokens", FINAL_EVAL_TOKENS);
        for (int i = 0; i < N_RECIPES; i++) {
            char path[4096];
            snprintf(path, sizeof path, "%s/%s.gguf", dir, RECIPES[i].name);
            kvp_json_obj(&j, RECIPES[i].name);
            kvp_json_str(&j, "file", path);
            kvp_json_int(&j, "params", (long long)out[i].n_params);
            kvp_json_int(&j, "layers", out[i].cfg.n_layer);
            kvp_json_int(&j, "embd", out[i].cfg.n_embd);
            kvp_json_num(&j, "prefill_flops_per_token", flops[i]);
            kvp_json_num(&j, "val_bpb", out[i].val_bpb);
            kvp_json_num(&j, "val_loss_nats", out[i].val_loss);
            kvp_json_int(&j, "tokens_trained", (long long)out[i].tokens);
            kvp_json_num(&j, "train_seconds", out[i].seconds);
            kvp_json_num(&j, "tok_per_s", out[i].tok_per_s);
            kvp_json_close_obj(&j);
        }
        kvp_json_end(&j);
        fclose(jf);
    }
    return 0;
}
