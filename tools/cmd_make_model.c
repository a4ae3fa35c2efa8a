/* kvpred make-model: a random-weight Llama-family GGUF model with kvpred's
 * byte-level vocabulary — for tests, benchmarks and trying the tools before
 * any model is trained. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "kvp_cmds.h"
#include "kvp_model.h"
#include "kvp_tokenizer.h"
#include "kvp_tool_util.h"

static void usage(FILE *f) {
    fprintf(f, "usage: kvpred make-model -o OUT.gguf [options]\n"
               "  --layers N      transformer blocks (default 4)\n"
               "  --embd D        model width (default 128)\n"
               "  --heads H       attention heads (default 4)\n"
               "  --kv-heads K    key/value heads, H a multiple of K (default H)\n"
               "  --ffn F         feed-forward width (default 4*D*2/3 rounded to 32)\n"
               "  --ctx N         context length recorded in the file (default 2048)\n"
               "  --rope-base B   rotary base (default 10000)\n"
               "  --untied        separate output head instead of the tied embedding\n"
               "  --type T        f32, f16, bf16 or q8_0 for the matrices (default f32)\n"
               "  --seed S        weight seed (default 1)\n"
               "  --std S         weight standard deviation (default 0.02)\n"
               "The vocabulary is kvpred's byte-level one: 256 byte tokens, BOS, EOS.\n");
}

static int parse_type(const char *s, kvp_ggml_type_t *t) {
    static const struct {
        const char *name;
        kvp_ggml_type_t type;
    } types[] = {{"f32", KVP_GGML_F32},
                 {"f16", KVP_GGML_F16},
                 {"bf16", KVP_GGML_BF16},
                 {"q8_0", KVP_GGML_Q8_0}};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (!strcmp(s, types[i].name)) {
            *t = types[i].type;
            return 0;
        }
    fprintf(stderr, "kvpred make-model: --type: '%s' is not one of f32, f16, bf16, q8_0\n", s);
    return -1;
}

int kvp_cmd_make_model(int argc, char **argv) {
    static const struct option lo[] = {
        {"out", required_argument, 0, 'o'},      {"layers", required_argument, 0, 'l'},
        {"embd", required_argument, 0, 'd'},     {"heads", required_argument, 0, 'H'},
        {"kv-heads", required_argument, 0, 'K'}, {"ffn", required_argument, 0, 'F'},
        {"ctx", required_argument, 0, 'c'},      {"rope-base", required_argument, 0, 'r'},
        {"untied", no_argument, 0, 'u'},         {"type", required_argument, 0, 't'},
        {"seed", required_argument, 0, 's'},     {"std", required_argument, 0, 'S'},
        {"help", no_argument, 0, 'h'},           {0, 0, 0, 0}};
    kvp_model_config_t cfg = {
        .n_layer = 4, .n_embd = 128, .n_head = 4, .n_ctx_train = 2048, .tied_output = true};
    const char *out = NULL;
    kvp_ggml_type_t type = KVP_GGML_F32;
    uint64_t seed = 1;
    float std = 0.02f;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:h", lo, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case 'o':
            out = optarg;
            break;
        case 'l':
            bad = kvp_parse_int("--layers", optarg, 1, 1024, &cfg.n_layer);
            break;
        case 'd':
            bad = kvp_parse_int("--embd", optarg, 2, 65536, &cfg.n_embd);
            break;
        case 'H':
            bad = kvp_parse_int("--heads", optarg, 1, 1024, &cfg.n_head);
            break;
        case 'K':
            bad = kvp_parse_int("--kv-heads", optarg, 1, 1024, &cfg.n_kv_head);
            break;
        case 'F':
            bad = kvp_parse_int("--ffn", optarg, 1, 1 << 18, &cfg.n_ff);
            break;
        case 'c':
            bad = kvp_parse_int("--ctx", optarg, 1, 1 << 24, &cfg.n_ctx_train);
            break;
        case 'r':
            bad = kvp_parse_float("--rope-base", optarg, 1.0f, 1e9f, &cfg.rope_base);
            break;
        case 'u':
            cfg.tied_output = false;
            break;
        case 't':
            bad = parse_type(optarg, &type);
            break;
        case 's':
            bad = kvp_parse_u64("--seed", optarg, &seed);
            break;
        case 'S':
            bad = kvp_parse_float("--std", optarg, 0.0f, 10.0f, &std);
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (bad) return 2;
    }
    if (!out || optind < argc) {
        usage(stderr);
        return 2;
    }
    if (cfg.n_ff == 0) cfg.n_ff = (cfg.n_embd * 8 / 3 + 31) / 32 * 32;
    cfg.n_vocab = kvp_tokenizer_bytelevel_n_vocab(0);
    kvp_err_t err = {0};
    kvp_model_t *m = NULL;
    kvp_gguf_writer_t *w = kvp_gguf_writer_new();
    int rc = w ? kvp_model_new_random(&m, &cfg, seed, std, &err)
               : kvp_err_set(&err, KVP_ENOMEM, "out of memory");
    if (!rc) rc = kvp_model_to_gguf(m, w, type, &err);
    if (!rc) rc = kvp_tokenizer_write_bytelevel(w, NULL, 0, &err);
    if (!rc) rc = kvp_gguf_writer_set_str(w, "general.name", "kvpred random model");
    if (!rc) rc = kvp_gguf_writer_write(w, out, &err);
    if (rc)
        fprintf(stderr, "kvpred make-model: %s\n", err.msg[0] ? err.msg : kvp_err_name(rc));
    else
        printf("wrote %s: %zu parameters, %d layers, d %d, %d heads (%d kv), ffn %d, vocab %d\n",
               out, m->n_params, m->cfg.n_layer, m->cfg.n_embd, m->cfg.n_head, m->cfg.n_kv_head,
               m->cfg.n_ff, m->cfg.n_vocab);
    kvp_model_free(&m);
    kvp_gguf_writer_free(&w);
    return rc ? 1 : 0;
}
