/* kvpred generate: text from a prompt with one GGUF model, streamed as it is
 * generated. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_blas.h"
#include "kvp_cmds.h"
#include "kvp_generate.h"
#include "kvp_kvpgen.h"
#include "kvp_time.h"
#include "kvp_tool_util.h"

static void usage(FILE *f) {
    fprintf(f, "usage: kvpred generate -m MODEL.gguf -p PROMPT [options]\n"
               "  -m, --model FILE    GGUF model (architecture llama)\n"
               "  -p, --prompt TEXT   prompt text (or -f FILE)\n"
               "  -f, --file FILE     read the prompt from FILE ('-' for standard input)\n"
               "  -n, --n-predict N   tokens to generate (default 64)\n"
               "      --temp T        temperature (default 0.8; 0 = greedy)\n"
               "      --top-k K       keep the K most likely tokens (default 40; 0 = off)\n"
               "      --top-p P       nucleus sampling mass (default 0.95; 1 = off)\n"
               "      --seed S        sampling seed (default 42)\n"
               "      --greedy        same as --temp 0\n"
               "      --chunk C       prefill chunk size in tokens (default 512)\n"
               "      --ignore-eos    do not stop at the end-of-sequence token\n"
               "      --stats         print prompt tokens/s, TTFT and decode tokens/s to stderr\n"
               "                      (KV Prediction: the TTFT's parts, and plain base prefill's\n"
               "                      TTFT measured beside it)\n");
}

typedef struct {
    const kvp_tokenizer_t *tok;
} stream_t;

static int print_token(void *user, int32_t token) {
    stream_t *s = user;
    char buf[256];
    int n = kvp_tokenizer_piece(s->tok, token, buf, sizeof buf);
    if (n > 0) fwrite(buf, 1, (size_t)(n < (int)sizeof buf ? n : (int)sizeof buf), stdout);
    fflush(stdout);
    return 0;
}

static void print_blas(void) {
    fprintf(stderr, "BLAS:    OpenBLAS %s kernels%s, %d threads\n", kvp_blas_corename(),
            kvp_blas_was_switched() ? " (auto-selected for this CPU)" : "", kvp_blas_threads());
}

static void print_stats(const kvp_gen_stats_t *st) {
    fprintf(stderr, "prompt:  %d tokens, prefill %.1f ms (%.0f tokens/s)\n", st->n_prompt,
            st->t_prefill * 1e3, st->n_prompt / st->t_prefill);
    fprintf(stderr, "TTFT:    %.1f ms\n", st->t_first * 1e3);
    if (st->n_generated > 1)
        fprintf(stderr, "decode:  %d tokens in %.1f ms (%.1f tokens/s)\n", st->n_generated - 1,
                st->t_decode * 1e3, (st->n_generated - 1) / st->t_decode);
    print_blas();
}

/* Plain base prefill of the same prompt, timed, for the comparison --stats
 * prints beside a KV-Prediction run. */
static int time_base_prefill(const kvp_model_t *base, const int32_t *toks, int n, int chunk,
                             double *secs, kvp_err_t *err) {
    kvp_model_ctx_t *ctx = NULL;
    kvp_kvcache_t *cache = NULL;
    float *logits = malloc(sizeof(float) * (size_t)base->cfg.n_vocab);
    int rc = logits ? kvp_model_ctx_new(&ctx, base, chunk, n, err)
                    : kvp_err_set(err, KVP_ENOMEM, "out of memory");
    if (!rc) rc = kvp_model_new_cache(base, n, &cache, err);
    double t0 = kvp_now();
    if (!rc) rc = kvp_model_forward(ctx, cache, toks, n, logits, KVP_LOGITS_LAST, err);
    if (!rc) kvp_argmax(logits, base->cfg.n_vocab); /* the first token, as TTFT counts it */
    *secs = kvp_now() - t0;
    free(logits);
    kvp_kvcache_free(&cache);
    kvp_model_ctx_free(&ctx);
    return rc;
}

static void print_kvp_stats(const kvp_kvp_stats_t *st, const kvp_model_t *aux,
                            const kvp_model_t *base, const kvp_predictor_t *p, double t_base) {
    double f_kvp = kvp_kvp_ttft_flops(&aux->cfg, &base->cfg, p, st->n_prompt);
    double f_base = kvp_model_flops(&base->cfg, 0, st->n_prompt);
    fprintf(stderr, "prompt:  %d tokens\n", st->n_prompt);
    fprintf(stderr,
            "TTFT:    %.1f ms = aux prefill %.1f + prediction %.1f + base step %.1f "
            "(+ sampling)\n",
            st->t_first * 1e3, st->t_aux_prefill * 1e3, st->t_predict * 1e3, st->t_base_step * 1e3);
    fprintf(stderr,
            "base:    plain base prefill TTFT %.1f ms -> speed-up %.2fx; TTFT FLOPs %.3g "
            "vs %.3g (ratio %.2fx)\n",
            t_base * 1e3, t_base / st->t_first, f_kvp, f_base, f_base / f_kvp);
    if (st->n_generated > 1)
        fprintf(stderr, "decode:  %d tokens in %.1f ms (%.1f tokens/s)\n", st->n_generated - 1,
                st->t_decode * 1e3, (st->n_generated - 1) / st->t_decode);
    print_blas();
}

typedef struct {
    const char *model, *aux, *base, *predictor, *prompt, *prompt_file;
    kvp_gen_params_t gp;
    bool stats;
} gen_opts_t;

static int parse_opts(int argc, char **argv, gen_opts_t *o) {
    static const struct option lo[] = {{"model", required_argument, 0, 'm'},
                                       {"prompt", required_argument, 0, 'p'},
                                       {"file", required_argument, 0, 'f'},
                                       {"n-predict", required_argument, 0, 'n'},
                                       {"temp", required_argument, 0, 't'},
                                       {"top-k", required_argument, 0, 'k'},
                                       {"top-p", required_argument, 0, 'P'},
                                       {"seed", required_argument, 0, 's'},
                                       {"greedy", no_argument, 0, 'g'},
                                       {"chunk", required_argument, 0, 'c'},
                                       {"ignore-eos", no_argument, 0, 'e'},
                                       {"stats", no_argument, 0, 'S'},
                                       {"aux", required_argument, 0, 'A'},
                                       {"base", required_argument, 0, 'B'},
                                       {"predictor", required_argument, 0, 'R'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    *o = (gen_opts_t){.gp = {.n_predict = 64,
                             .stop_at_eos = true,
                             .sampler = {.temp = 0.8f, .top_k = 40, .top_p = 0.95f, .seed = 42}}};
    kvp_gen_params_t *gp = &o->gp;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:p:f:n:h", lo, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case 'm':
            o->model = optarg;
            break;
        case 'p':
            o->prompt = optarg;
            break;
        case 'f':
            o->prompt_file = optarg;
            break;
        case 'A':
            o->aux = optarg;
            break;
        case 'B':
            o->base = optarg;
            break;
        case 'R':
            o->predictor = optarg;
            break;
        case 'n':
            bad = kvp_parse_int("--n-predict", optarg, 0, 1 << 20, &gp->n_predict);
            break;
        case 't':
            bad = kvp_parse_float("--temp", optarg, 0.0f, 100.0f, &gp->sampler.temp);
            break;
        case 'k':
            bad = kvp_parse_int("--top-k", optarg, 0, 1 << 24, &gp->sampler.top_k);
            break;
        case 'P':
            bad = kvp_parse_float("--top-p", optarg, 1e-6f, 1.0f, &gp->sampler.top_p);
            break;
        case 's':
            bad = kvp_parse_u64("--seed", optarg, &gp->sampler.seed);
            break;
        case 'g':
            gp->sampler.temp = 0.0f;
            break;
        case 'c':
            bad = kvp_parse_int("--chunk", optarg, 1, 1 << 16, &gp->chunk);
            break;
        case 'e':
            gp->stop_at_eos = false;
            break;
        case 'S':
            o->stats = true;
            break;
        case 'h':
            usage(stdout);
            return 1;
        default:
            usage(stderr);
            return 2;
        }
        if (bad) return 2;
    }
    if (o->base && !o->model) o->model = o->base;
    bool kvp = o->aux || o->base || o->predictor;
    if (!o->model || (!o->prompt && !o->prompt_file) || optind < argc ||
        (kvp && (!o->aux || !o->base || !o->predictor))) {
        if (kvp)
            fprintf(stderr, "kvpred generate: KV Prediction needs --aux, --base and --predictor\n");
        usage(stderr);
        return 2;
    }
    return 0;
}

/* Loads the auxiliary model and the predictor and checks them against the base. */
static int load_kvp(const gen_opts_t *o, const kvp_model_t *base, kvp_model_t **aux,
                    kvp_predictor_t **p, kvp_err_t *err) {
    int rc = kvp_model_load(aux, o->aux, err);
    if (!rc && (*aux)->cfg.n_vocab != base->cfg.n_vocab)
        rc = kvp_err_set(err, KVP_ESHAPE,
                         "the auxiliary model's vocabulary (%d) differs from the base's (%d)",
                         (*aux)->cfg.n_vocab, base->cfg.n_vocab);
    if (!rc && !strcmp(o->predictor, "identity"))
        rc = kvp_predictor_new_identity(p, kvp_kv_shape_of(base), err);
    else if (!rc)
        rc = kvp_predictor_load(p, o->predictor, err);
    if (!rc) rc = kvp_predictor_check_pair(*p, *aux, base, err);
    return rc;
}

int kvp_cmd_generate(int argc, char **argv) {
    gen_opts_t o;
    int prc = parse_opts(argc, argv, &o);
    if (prc) return prc == 1 ? 0 : 2;
    char *file_text = NULL;
    const char *prompt = o.prompt;
    if (o.prompt_file) {
        if (kvp_read_text(o.prompt_file, &file_text, NULL)) return 1;
        prompt = file_text;
    }
    kvp_err_t err = {0};
    kvp_loaded_t ld = {0};
    kvp_model_t *aux = NULL;
    kvp_predictor_t *pred = NULL;
    int32_t *toks = NULL;
    size_t n_tok = 0;
    int rc = kvp_load_model_and_vocab(o.model, &ld, &err);
    if (!rc && o.aux) rc = load_kvp(&o, ld.model, &aux, &pred, &err);
    if (!rc) rc = kvp_tokenizer_encode(ld.tok, prompt, strlen(prompt), true, &toks, &n_tok, &err);
    if (!rc && n_tok == 0) rc = kvp_err_set(&err, KVP_EINVAL, "the prompt is empty");
    if (!rc && (int)n_tok + o.gp.n_predict > ld.model->cfg.n_ctx_train)
        fprintf(stderr,
                "kvpred generate: warning: %zu prompt + %d new tokens exceed the model's "
                "trained context of %d\n",
                n_tok, o.gp.n_predict, ld.model->cfg.n_ctx_train);
    stream_t s = {.tok = ld.tok};
    kvp_gen_stats_t st = {0};
    kvp_kvp_stats_t kst = {0};
    if (!rc) {
        fputs(prompt, stdout);
        fflush(stdout);
        int32_t eos = kvp_tokenizer_eos(ld.tok);
        if (aux)
            rc = kvp_kvp_generate(aux, ld.model, pred, toks, (int)n_tok, &o.gp, eos, print_token,
                                  &s, &kst, &err);
        else
            rc = kvp_generate(ld.model, toks, (int)n_tok, &o.gp, eos, print_token, &s, &st, &err);
        fputc('\n', stdout);
        fflush(stdout);
    }
    double t_base = 0;
    if (!rc && o.stats && aux)
        rc = time_base_prefill(ld.model, toks, (int)n_tok, o.gp.chunk > 0 ? o.gp.chunk : 512,
                               &t_base, &err);
    if (rc)
        fprintf(stderr, "kvpred generate: %s\n", err.msg);
    else if (o.stats && aux)
        print_kvp_stats(&kst, aux, ld.model, pred, t_base);
    else if (o.stats)
        print_stats(&st);
    free(toks);
    free(file_text);
    kvp_predictor_free(&pred);
    kvp_model_free(&aux);
    kvp_loaded_free(&ld);
    return rc ? 1 : 0;
}
