/* kvpred-aux-prefill: the pipeline's front door. Runs the auxiliary model
 * over each client's prompt in chunks and streams the chunks' K/V to the
 * predictor (lib/kvp_svc_aux.c tells the story). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_blas.h"
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
    kvp_service_opts_t o;
    kvp_service_opts_init(&o);
    const char *model_path = NULL;
    int chunk = 128;
    static const struct option lo[] = {{"model", required_argument, 0, 'm'},
                                       {"chunk", required_argument, 0, 'c'},
                                       {"help", no_argument, 0, 'h'},
                                       KVP_SERVICE_LONGOPTS,
                                       {0, 0, 0, 0}};
    int c, status;
    while ((c = kvp_service_next_opt(&o, argc, argv, "m:h", lo, usage, &status)) != -1) {
        if (c == 'm')
            model_path = optarg;
        else if (c == 'c')
            chunk = atoi(optarg);
    }
    if (status >= 0) return status;
    if (!model_path || chunk < 1 || optind < argc) {
        usage(stderr);
        return 2;
    }
    if (kvp_service_start(&o, "kvpred-aux-prefill")) return 2;
    kvp_err_t err = {0};
    kvp_bundle_t b;
    int rc = kvp_service_load_model(&o, model_path, &b, &err);
    if (!rc) {
        kvp_aux_cfg_t cfg = {.c = o.c,
                             .listen = o.listen,
                             .downstream = o.downstream,
                             .model = b.model,
                             .tok = b.tok,
                             .chunk_tokens = chunk};
        rc = kvp_svc_aux_run(&cfg, &err);
    }
    kvp_bundle_free(&b);
    return kvp_service_exit(rc, &err, "kvpred-aux-prefill");
}
