/* kvpred-aux-prefill: the pipeline's front door. Runs the auxiliary model
 * over each client's prompt in chunks and streams the chunks' K/V to the
 * predictor (lib/kvp_svc_aux.c tells the story). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_blas.h"
#include "kvp_bundle.h"
#include "kvp_service_main.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvpred-aux-prefill --model AUX.gguf [options]\n"
            "  --model FILE          the auxiliary model (GGUF, with its vocabulary)\n"
            "  --chunk N             prompt tokens per chunk (default 128)\n"
            "  defaults: --listen %s --downstream %s\n%s",
            KVP_SVC_AUX_ENDPOINT, KVP_SVC_PRED_ENDPOINT, KVP_SERVICE_COMMON_HELP);
}

int main(int argc, char **argv) {
    kvp_blas_init(argv);
    static atomic_int stop;
    kvp_service_opts_t o;
    kvp_service_opts_init(&o, &stop);
    const char *model_path = NULL;
    int chunk = 128;
    static const struct option lo[] = {{"model", required_argument, 0, 'm'},
                                       {"chunk", required_argument, 0, 'c'},
                                       {"help", no_argument, 0, 'h'},
                                       KVP_SERVICE_LONGOPTS,
                                       {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "m:h", lo, NULL)) != -1) {
        int r = kvp_service_opt(&o, c, optarg, argv[0]);
        if (r < 0) return 2;
        if (r) continue;
        if (c == 'm')
            model_path = optarg;
        else if (c == 'c')
            chunk = atoi(optarg);
        else if (c == 'h') {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (!model_path || chunk < 1 || optind < argc) {
        usage(stderr);
        return 2;
    }
    if (kvp_service_curve(&o, "kvpred-aux-prefill")) return 2;
    if (kvp_service_cpu(&o, "kvpred-aux-prefill")) return 2;
    kvp_err_t err = {0};
    kvp_bundle_t b;
    int rc = kvp_bundle_load(model_path, &b, &err);
    const kvp_model_t *m = b.model;
    const kvp_tokenizer_t *tok = b.tok;
    if (!rc) {
        kvp_service_signals(&stop);
        kvp_aux_cfg_t cfg = {.c = o.c,
                             .listen = o.listen,
                             .downstream = o.downstream,
                             .model = m,
                             .tok = tok,
                             .chunk_tokens = chunk};
        rc = kvp_svc_aux_run(&cfg, &err);
    }
    if (rc) fprintf(stderr, "kvpred-aux-prefill: %s\n", err.msg);
    kvp_bundle_free(&b);
    return rc ? 1 : 0;
}
