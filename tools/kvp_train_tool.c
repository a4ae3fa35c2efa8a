#include "kvp_train_tool.h"

#include <string.h>

volatile sig_atomic_t kvp_train_tool_stop = 0;

static void on_signal(int sig) {
    (void)sig;
    kvp_train_tool_stop = 1;
}

void kvp_train_tool_catch_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    /* the handler is used once: a second Ctrl-C ends the process at once */
    sa.sa_flags = SA_RESETHAND;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

int kvp_train_tool_load_corpus(const char *cmd, const char *const *paths, int n_paths,
                               const char *ext, int holdout_pct, const kvp_tokenizer_t *tok,
                               FILE *f, kvp_corpus_t **out) {
    kvp_err_t err = {0};
    kvp_corpus_opts_t o = {.ext = ext, .holdout_pct = holdout_pct};
    kvp_corpus_t *c = NULL;
    int rc = kvp_corpus_new(&c, paths, n_paths, &o, &err);
    if (!rc) rc = kvp_corpus_tokenize(c, KVP_SPLIT_TRAIN, tok, &err);
    if (!rc) rc = kvp_corpus_tokenize(c, KVP_SPLIT_VAL, tok, &err);
    if (rc) {
        fprintf(stderr, "%s: %s\n", cmd, err.msg[0] ? err.msg : kvp_err_name(rc));
        kvp_corpus_free(&c);
        return -1;
    }
    if (f) {
        const kvp_corpus_stream_t *tr = kvp_corpus_stream(c, KVP_SPLIT_TRAIN);
        const kvp_corpus_stream_t *va = kvp_corpus_stream(c, KVP_SPLIT_VAL);
        fprintf(f,
                "corpus: %zu files; train %zu files %.2f MB %zu tokens, validation %zu files "
                "%.2f MB, test %zu files %.2f MB (held out)\n",
                kvp_corpus_n_files(c), kvp_corpus_split_files(c, KVP_SPLIT_TRAIN),
                (double)tr->bytes / 1e6, tr->n, kvp_corpus_split_files(c, KVP_SPLIT_VAL),
                (double)va->bytes / 1e6, kvp_corpus_split_files(c, KVP_SPLIT_TEST),
                (double)kvp_corpus_split_bytes(c, KVP_SPLIT_TEST) / 1e6);
    }
    *out = c;
    return 0;
}

void kvp_train_tool_describe(const kvp_model_config_t *c, size_t n_params, char *buf, size_t cap) {
    snprintf(buf, cap, "%d layers, d %d, %d heads (%d kv), ffn %d: %.2fM params", c->n_layer,
             c->n_embd, c->n_head, c->n_kv_head, c->n_ff, (double)n_params / 1e6);
}

double kvp_train_tool_prefill_flops(const kvp_model_config_t *cfg, int n) {
    return kvp_model_flops(cfg, 0, n) / (double)n;
}
