/* kvpred-predictor: maps each auxiliary K/V chunk to base K/V as it arrives
 * and passes it to the decoder (lib/kvp_svc_pred.c tells the story). */
#include <stdio.h>
#include <string.h>

#include "kvp_blas.h"
#include "kvp_service_main.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvpred-predictor --predictor P.gguf [options]\n"
            "  --predictor FILE      the KV predictor (kvpred fit-predictor / train-kvp), or\n"
            "  --identity A.gguf     identity maps for a model and itself (tests, wiring)\n"
            "  defaults: --listen %s --downstream %s\n%s",
            KVP_SVC_PRED_ENDPOINT, KVP_SVC_DEC_ENDPOINT, KVP_SERVICE_COMMON_HELP);
}

int main(int argc, char **argv) {
    kvp_blas_init(argv);
    kvp_service_opts_t o;
    kvp_service_opts_init(&o);
    const char *pred_path = NULL, *identity = NULL;
    static const struct option lo[] = {{"predictor", required_argument, 0, 'p'},
                                       {"identity", required_argument, 0, 'i'},
                                       {"help", no_argument, 0, 'h'},
                                       KVP_SERVICE_LONGOPTS,
                                       {0, 0, 0, 0}};
    int c, status;
    while ((c = kvp_service_next_opt(&o, argc, argv, "p:h", lo, usage, &status)) != -1) {
        if (c == 'p')
            pred_path = optarg;
        else if (c == 'i')
            identity = optarg;
    }
    if (status >= 0) return status;
    if (!pred_path == !identity || optind < argc) {
        usage(stderr);
        return 2;
    }
    if (kvp_service_start(&o, "kvpred-predictor")) return 2;
    kvp_err_t err = {0};
    kvp_predictor_t *p = NULL;
    int rc;
    if (identity) {
        kvp_model_t *m = NULL;
        rc = kvp_model_load(&m, identity, &err);
        if (!rc) rc = kvp_predictor_new_identity(&p, kvp_kv_shape_of(m), &err);
        if (!rc) rc = kvp_predictor_bind(p, m, m, &err);
        kvp_model_free(&m);
    } else {
        rc = kvp_predictor_load(&p, pred_path, &err);
    }
    if (!rc) {
        kvp_service_signals(o.c.stop);
        kvp_pred_cfg_t cfg = {.c = o.c, .listen = o.listen, .downstream = o.downstream, .pred = p};
        rc = kvp_svc_pred_run(&cfg, &err);
    }
    kvp_predictor_free(&p);
    return kvp_service_exit(rc, &err, "kvpred-predictor");
}
