/* kvpred generate: text from a prompt with one GGUF model, streamed as it is
 * generated. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_blas.h"
#include "kvp_cmds.h"
#include "kvp_generate.h"
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
               "      --stats         print prompt tokens/s, TTFT and decode tokens/s to stderr\n");
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

int kvp_cmd_generate(int argc, char **argv) {
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'}, {"prompt", required_argument, 0, 'p'},
        {"file", required_argument, 0, 'f'},  {"n-predict", required_argument, 0, 'n'},
        {"temp", required_argument, 0, 't'},  {"top-k", required_argument, 0, 'k'},
        {"top-p", required_argument, 0, 'P'}, {"seed", required_argument, 0, 's'},
        {"greedy", no_argument, 0, 'g'},      {"chunk", required_argument, 0, 'c'},
        {"ignore-eos", no_argument, 0, 'e'},  {"stats", no_argument, 0, 'S'},
        {"help", no_argument, 0, 'h'},        {0, 0, 0, 0}};
    const char *model_path = NULL, *prompt = NULL, *prompt_file = NULL;
    kvp_gen_params_t gp = {.n_predict = 64,
                           .stop_at_eos = true,
                           .sampler = {.temp = 0.8f, .top_k = 40, .top_p = 0.95f, .seed = 42}};
    bool stats = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:p:f:n:h", lo, NULL)) != -1) {
        switch (c) {
        case 'm':
            model_path = optarg;
            break;
        case 'p':
            prompt = optarg;
            break;
        case 'f':
            prompt_file = optarg;
            break;
        case 'n':
            if (kvp_parse_int("--n-predict", optarg, 0, 1 << 20, &gp.n_predict)) return 2;
            break;
        case 't':
            if (kvp_parse_float("--temp", optarg, 0.0f, 100.0f, &gp.sampler.temp)) return 2;
            break;
        case 'k':
            if (kvp_parse_int("--top-k", optarg, 0, 1 << 24, &gp.sampler.top_k)) return 2;
            break;
        case 'P':
            if (kvp_parse_float("--top-p", optarg, 1e-6f, 1.0f, &gp.sampler.top_p)) return 2;
            break;
        case 's':
            if (kvp_parse_u64("--seed", optarg, &gp.sampler.seed)) return 2;
            break;
        case 'g':
            gp.sampler.temp = 0.0f;
            break;
        case 'c':
            if (kvp_parse_int("--chunk", optarg, 1, 1 << 16, &gp.chunk)) return 2;
            break;
        case 'e':
            gp.stop_at_eos = false;
            break;
        case 'S':
            stats = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!model_path || (!prompt && !prompt_file) || optind < argc) {
        usage(stderr);
        return 2;
    }
    char *file_text = NULL;
    if (prompt_file) {
        if (kvp_read_text(prompt_file, &file_text, NULL)) return 1;
        prompt = file_text;
    }
    kvp_err_t err = {0};
    kvp_loaded_t ld;
    if (kvp_load_model_and_vocab(model_path, &ld, &err)) {
        fprintf(stderr, "kvpred generate: %s\n", err.msg);
        free(file_text);
        return 1;
    }
    int32_t *toks = NULL;
    size_t n_tok = 0;
    int rc = kvp_tokenizer_encode(ld.tok, prompt, strlen(prompt), true, &toks, &n_tok, &err);
    if (!rc && n_tok == 0) rc = kvp_err_set(&err, KVP_EINVAL, "the prompt is empty");
    if (!rc && (int)n_tok + gp.n_predict > ld.model->cfg.n_ctx_train)
        fprintf(stderr,
                "kvpred generate: warning: %zu prompt + %d new tokens exceed the "
                "model's trained context of %d\n",
                n_tok, gp.n_predict, ld.model->cfg.n_ctx_train);
    kvp_gen_stats_t st = {0};
    stream_t s = {.tok = ld.tok};
    if (!rc) {
        fputs(prompt, stdout);
        fflush(stdout);
        rc = kvp_generate(ld.model, toks, (int)n_tok, &gp, kvp_tokenizer_eos(ld.tok), print_token,
                          &s, &st, &err);
        fputc('\n', stdout);
    }
    if (rc)
        fprintf(stderr, "kvpred generate: %s\n", err.msg);
    else if (stats) {
        fprintf(stderr, "prompt:  %d tokens, prefill %.1f ms (%.0f tokens/s)\n", st.n_prompt,
                st.t_prefill * 1e3, st.n_prompt / st.t_prefill);
        fprintf(stderr, "TTFT:    %.1f ms\n", st.t_first * 1e3);
        if (st.n_generated > 1)
            fprintf(stderr, "decode:  %d tokens in %.1f ms (%.1f tokens/s)\n", st.n_generated - 1,
                    st.t_decode * 1e3, (st.n_generated - 1) / st.t_decode);
        fprintf(stderr, "BLAS:    OpenBLAS %s kernels%s, %d threads\n", kvp_blas_corename(),
                kvp_blas_was_switched() ? " (auto-selected for this CPU)" : "", kvp_blas_threads());
    }
    free(toks);
    free(file_text);
    kvp_loaded_free(&ld);
    return rc ? 1 : 0;
}
