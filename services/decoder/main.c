/* kvpred-decoder: holds the base model; writes predicted K/V chunks into a
 * reserved cache, then generates from it (lib/kvp_svc_dec.c tells the story). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_blas.h"
#include "kvp_service_main.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvpred-decoder --model BASE.gguf [options]\n"
            "  --model FILE          the base model (GGUF, with its vocabulary)\n"
            "  --credits N           chunks a producer may have in flight (default 4)\n"
            "  --prefill-chunk N     baseline mode: tokens per prefill step (default 512)\n"
            "  default: --listen %s\n%s",
            KVP_SVC_DEC_ENDPOINT, KVP_SERVICE_COMMON_HELP);
}

int main(int argc, char **argv) {
    kvp_blas_init(argv);
    kvp_service_opts_t o;
    kvp_service_opts_init(&o);
    const char *model_path = NULL;
    int credits = 4, prefill = 512;
    static const struct option lo[] = {{"model", required_argument, 0, 'm'},
                                       {"credits", required_argument, 0, 'c'},
                                       {"prefill-chunk", required_argument, 0, 'P'},
                                       {"help", no_argument, 0, 'h'},
                                       KVP_SERVICE_LONGOPTS,
                                       {0, 0, 0, 0}};
    int c, status;
    while ((c = kvp_service_next_opt(&o, argc, argv, "m:h", lo, usage, &status)) != -1) {
        if (c == 'm')
            model_path = optarg;
        else if (c == 'c')
            credits = atoi(optarg);
        else if (c == 'P')
            prefill = atoi(optarg);
    }
    if (status >= 0) return status;
    /* the decoder is the last stage: it has nothing downstream */
    if (!model_path || credits < 1 || prefill < 1 || optind < argc || o.downstream) {
        usage(stderr);
        return 2;
    }
    if (kvp_service_start(&o, "kvpred-decoder")) return 2;
    kvp_err_t err = {0};
    kvp_bundle_t b;
    int rc = kvp_service_load_model(&o, model_path, &b, &err);
    if (!rc) {
        kvp_dec_cfg_t cfg = {.c = o.c,
                             .listen = o.listen,
                             .model = b.model,
                             .tok = b.tok,
                             .credits = credits,
                             .prefill_chunk = prefill};
        rc = kvp_svc_dec_run(&cfg, &err);
    }
    kvp_bundle_free(&b);
    return kvp_service_exit(rc, &err, "kvpred-decoder");
}
