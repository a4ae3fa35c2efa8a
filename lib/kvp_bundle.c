#include "kvp_bundle.h"

#include <string.h>

int kvp_bundle_load(const char *path, kvp_bundle_t *out, kvp_err_t *err) {
    memset(out, 0, sizeof *out);
    kvp_gguf_t *g;
    int rc = kvp_gguf_open(&g, path, err);
    if (rc)
        return rc;
    rc = kvp_model_from_gguf(&out->model, g, err);
    if (!rc)
        rc = kvp_tokenizer_from_gguf(&out->tok, g, err);
    if (!rc && kvp_tokenizer_n_vocab(out->tok) > out->model->cfg.n_vocab)
        rc = kvp_err_set(err, KVP_ESHAPE,
                         "the vocabulary has %d tokens but the model's embedding only %d",
                         kvp_tokenizer_n_vocab(out->tok), out->model->cfg.n_vocab);
    if (rc) {
        kvp_err_wrap(err, "%s", path);
        kvp_bundle_free(out);
    }
    kvp_gguf_free(&g);
    return rc;
}

void kvp_bundle_free(kvp_bundle_t *b) {
    kvp_model_free(&b->model);
    kvp_tokenizer_free(&b->tok);
}
