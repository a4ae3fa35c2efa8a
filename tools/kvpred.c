/* kvpred: one command, many subcommands. This file only dispatches. */
#include <stdio.h>
#include <string.h>

#include "kvp_blas.h"
#include "kvp_cmds.h"

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} kvp_cmd_t;

static const kvp_cmd_t CMDS[] = {
    {"generate", kvp_cmd_generate, "generate text from a prompt with a GGUF model"},
    {"info", kvp_cmd_info, "print a GGUF file's metadata and tensor table"},
    {"tokenize", kvp_cmd_tokenize, "text to token ids (or back, with --decode)"},
    {"make-model", kvp_cmd_make_model, "write a random-weight Llama-family GGUF model"},
    {"bench", kvp_cmd_bench, "benchmarks: `kvpred bench engine`"},
    {"trace", kvp_cmd_trace, "merge trace logs: TTFT breakdown per request, Chrome trace"},
    {"train", kvp_cmd_train, "train a model from scratch on a corpus of text files"},
    {"models", kvp_cmd_models, "train (once) and cache the default base and auxiliary models"},
    {"plot-loss", kvp_cmd_plot_loss, "draw training logs' loss curves to a PNG (gnuplot)"},
    {"fit-predictor", kvp_cmd_fit_predictor, "fit a KV predictor by ridge regression"},
    {"train-kvp", kvp_cmd_train_kvp, "train the aux model and the predictor (KV Prediction)"},
    {"up", kvp_cmd_up, "start the pipeline's three stages as local processes"},
    {"client", kvp_cmd_client, "send prompts to a running pipeline; --trace for TTFT parts"},
    {"prune", kvp_cmd_prune, "a layer-pruned copy of a model, optionally fine-tuned"},
    {"eval", kvp_cmd_eval, "KV Prediction against its baselines at equal TTFT FLOPs"},
};

static void usage(FILE *f) {
    fprintf(f, "usage: kvpred COMMAND [options]   (kvpred COMMAND --help for more)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof CMDS / sizeof CMDS[0]; i++)
        fprintf(f, "  %-12s %s\n", CMDS[i].name, CMDS[i].summary);
}

int main(int argc, char **argv) {
    /* Before anything else: make sure OpenBLAS runs its best kernels for this
     * CPU (may re-execute this program once; see kvp_blas.h). */
    kvp_blas_init(argv);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof CMDS / sizeof CMDS[0]; i++)
        if (!strcmp(argv[1], CMDS[i].name)) return CMDS[i].run(argc - 1, argv + 1);
    fprintf(stderr, "kvpred: unknown command '%s' (see kvpred --help)\n", argv[1]);
    return 2;
}
