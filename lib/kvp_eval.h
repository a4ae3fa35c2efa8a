/* kvp_eval: the evaluation of KV Prediction against its baselines, as the
 * paper does it (../shared/reference/kv-prediction.md, "Evaluation in the
 * paper"), on the held-out test files of a corpus.
 *
 * A *method* is how the first token's cache and logits are produced, after
 * which one model decodes greedily:
 *   BASE   the base model prefills the prompt and decodes;
 *   ALONE  a cheaper model (the auxiliary model, a layer-pruned base) prefills
 *          and decodes by itself — the paper's baselines;
 *   KVP    KV Prediction: the auxiliary model prefills all but the last prompt
 *          token, the predictor maps its cache to the base's, the base runs one
 *          step on the last token and decodes from there (kvp_kvpgen.h).
 *
 * Each method is placed at its TTFT FLOPs for a P-token prompt (docs/results.md
 * gives the formula; kvp_model_flops counts 2 per multiply-add):
 *   BASE   F_base(0, P)                         base prefill incl. one output head
 *   ALONE  F_m(0, P)                            the cheap model's prefill
 *   KVP    F_aux(0, P-1) - 2 E_aux V            aux prefill without an output head
 *          + 2 * 2 * d_in * d_out * L_base * (P-1)  the K and V maps of every base layer
 *          + F_base(P-1, 1)                     one base step after P-1 cached tokens
 *
 * Tasks, each on prompts from the test split only:
 *   continuation  N prompts of P tokens (BOS + P-1 tokens of a test file at a
 *                 seeded position); the next K tokens of the file are the truth.
 *                 accuracy = fraction of the K greedy tokens equal to the truth,
 *                 position by position; first-token accuracy; and the mean
 *                 log-likelihood of the true continuation teacher-forced through
 *                 the model that decodes, on the cache the method left: for BASE
 *                 and KVP the base model's (on its own or on the predicted
 *                 cache), for ALONE the cheap model's own.
 *   HumanEval-like  prompts = a function's `def` line(s) through its docstring;
 *                 target = the body's first non-empty line(s); scored by exact
 *                 match (stripped) and by agreement with the base's own greedy
 *                 line(s).
 *   cache quality for KVP methods: predicted against true base K and V
 *                 (un-rotated), cosine per (token, head) vector and relative L1
 *                 (sum |pred - true| / sum |true|), per layer and per position
 *                 bucket.
 *   measured TTFT  best of a few runs, on the first continuation prompt. */
#ifndef KVP_EVAL_H
#define KVP_EVAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kvp_corpus.h"
#include "kvp_err.h"
#include "kvp_model.h"
#include "kvp_predictor.h"
#include "kvp_tokenizer.h"

/* ---- scoring ------------------------------------------------------------ */

/* Fraction of the k positions where gen[i] == truth[i] (0 for k <= 0). */
double kvp_eval_token_accuracy(const int32_t *gen, const int32_t *truth, int k);

/* log p(target) under softmax(logits[n]), computed stably. */
double kvp_eval_log_prob(const float *logits, int n, int32_t target);

/* The first n_lines non-empty lines of text[0, len), each stripped of
 * surrounding white space, joined by '\n' into out (always NUL-terminated,
 * truncated to cap). A line counts once a newline ends it, or at the end of
 * the text when `final`. Returns the number of lines found (<= n_lines). */
int kvp_eval_first_lines(const char *text, size_t len, int n_lines, bool final, char *out,
                         size_t cap);

/* ---- HumanEval-like items ------------------------------------------------ */

typedef struct kvp_eval_he_item {
    size_t begin, end; /* prompt = text[begin, end): def line(s) .. docstring's closing line
                          (its newline included) */
    char *name;        /* the function's name */
    char *target;      /* kvp_eval_first_lines of the body: n_lines lines, stripped */
} kvp_eval_he_item_t;

/* Every function in a Python source whose `def` (or `async def`) line(s) are
 * followed directly by a docstring ("""...""" or '''...''', optional r/u/b
 * prefix) that ends on a line of its own or on the opening line, and whose
 * body has at least n_lines non-empty lines indented deeper than the def.
 * Nested functions and methods count too. *items is a new array (free with
 * kvp_eval_he_items_free); an empty result is not an error. */
int kvp_eval_he_extract(const char *text, size_t len, int n_lines, kvp_eval_he_item_t **items,
                        size_t *n_items, kvp_err_t *err);
void kvp_eval_he_items_free(kvp_eval_he_item_t **items, size_t n);

/* ---- cache quality -------------------------------------------------------- */

typedef struct kvp_eval_cq {
    double l1_diff, l1_true; /* sums of |pred - true| and |true| */
    double cos_sum;          /* sum of per-vector cosines */
    uint64_t n_cos;          /* vectors with both norms non-zero */
} kvp_eval_cq_t;

/* Adds n_vec vectors of dim floats (rows one after another). */
void kvp_eval_cq_add(kvp_eval_cq_t *q, const float *pred, const float *truth, size_t n_vec,
                     int dim);
void kvp_eval_cq_merge(kvp_eval_cq_t *into, const kvp_eval_cq_t *q);
double kvp_eval_cq_cos(const kvp_eval_cq_t *q);    /* mean cosine; NaN if none */
double kvp_eval_cq_rel_l1(const kvp_eval_cq_t *q); /* NaN if sum |true| is 0 */

/* ---- methods ---------------------------------------------------------------- */

typedef enum kvp_eval_kind { KVP_EVAL_BASE, KVP_EVAL_ALONE, KVP_EVAL_KVP } kvp_eval_kind_t;

typedef struct kvp_eval_method {
    char name[64];   /* e.g. "kvp aux (ridge)" */
    char family[32]; /* plot series: "base", "aux alone", "pruned alone", "kvp ridge", ... */
    kvp_eval_kind_t kind;
    const kvp_model_t *model;    /* ALONE: the model that generates; KVP: the auxiliary */
    const kvp_predictor_t *pred; /* KVP only */
} kvp_eval_method_t;

/* TTFT FLOPs of a method for an n-token prompt (formulas above). */
double kvp_eval_ttft_flops(const kvp_eval_method_t *m, const kvp_model_t *base, int n);

/* ---- the test data ------------------------------------------------------------ */

typedef struct kvp_eval_opts {
    int prompt_len;    /* P tokens per continuation prompt, BOS included (192) */
    int n_cont;        /* K tokens of continuation scored (16) */
    int n_prompts;     /* N continuation prompts (200) */
    uint64_t seed;     /* prompt positions (1) */
    int he_max;        /* HumanEval-like items at most, evenly over those found (200) */
    int he_lines;      /* body lines scored (1) */
    int he_max_prompt; /* longer prompts (tokens, BOS included) are skipped (192) */
    int he_max_gen;    /* tokens generated at most per item (64) */
    int cq_prompts;    /* continuation prompts used for cache quality (32) */
    int pos_bucket;    /* positions per cache-quality bucket (16) */
    int ttft_reps;     /* measured TTFT: best of this many runs (3) */
    int chunk;         /* prefill chunk (512) */
    FILE *progress;    /* a line per method (NULL: silent) */
} kvp_eval_opts_t;

void kvp_eval_opts_default(kvp_eval_opts_t *o);

typedef struct kvp_eval_data {
    int P, K, n_prompts;
    int32_t *prompts; /* [n_prompts][P] */
    int32_t *truth;   /* [n_prompts][K] */
    int n_he;
    int32_t **he_tok; /* [n_he][he_len[i]] */
    int *he_len;
    char **he_target;
    size_t n_test_files, n_he_found, n_he_long;
    uint64_t test_tokens;
} kvp_eval_data_t;

/* Reads and tokenizes the test split of c (tok's encoder, BOS from tok) and
 * cuts the continuation prompts and HumanEval-like items. Fails when no test
 * file holds P - 1 + K tokens. */
int kvp_eval_data_build(kvp_eval_data_t *d, const kvp_corpus_t *c, const kvp_tokenizer_t *tok,
                        const kvp_eval_opts_t *o, kvp_err_t *err);
void kvp_eval_data_free(kvp_eval_data_t *d);

/* ---- running -------------------------------------------------------------------- */

typedef struct kvp_eval_result {
    double flops;          /* TTFT FLOPs at P */
    double ttft_ms;        /* measured, best of ttft_reps */
    double acc, first_acc; /* continuation */
    double loglik;         /* base's mean log p per true token, nats (NaN for ALONE) */
    double decode_loglik;  /* the same under the model that decodes: = loglik for BASE and
                              KVP, the cheap model's own for ALONE */
    double first_loglik;   /* decode_loglik of the first true token alone: the hand-over */
    double *acc_each;      /* [n_prompts] per-prompt accuracy */
    double *ll_each;       /* [n_prompts] per-prompt decode_loglik */
    double he_exact;       /* NaN without items */
    double he_agree;       /* with the base's greedy line(s); NaN without items */
    int n_prompts, n_he;
    int n_layer, n_bucket; /* cache quality (KVP only) */
    kvp_eval_cq_t *cq;     /* [n_layer][n_bucket][2]: K, V; NULL unless KVP */
    char **he_out;         /* [n_he] generated line(s) */
    double seconds;        /* wall time of this method's evaluation */
} kvp_eval_result_t;

/* Runs every method over d (res[i] for methods[i]; free each with
 * kvp_eval_result_free). Agreement is measured against the first BASE
 * method (NaN without one). tok decodes HumanEval-like output; eos < 0: none. */
int kvp_eval_run(const kvp_model_t *base, const kvp_tokenizer_t *tok,
                 const kvp_eval_method_t *methods, int n_methods, const kvp_eval_data_t *d,
                 const kvp_eval_opts_t *o, kvp_eval_result_t *res, kvp_err_t *err);
void kvp_eval_result_free(kvp_eval_result_t *r);

/* ---- a closed-form predictor fitted in-process ------------------------------------- */

/* Ridge fit (kvp_predictor_fit_*) of aux -> base on about `tokens` tokens of
 * the stream in evenly spread windows of T tokens (BOS first when bos >= 0),
 * one window in eleven for validation, each map choosing its lambda from
 * 1e-4 .. 1e2; bound to the pair; layer_map NULL = the default. What
 * `kvpred fit-predictor` does, without its report. */
int kvp_eval_fit_predictor(const kvp_model_t *aux, const kvp_model_t *base,
                           const int32_t *layer_map, const kvp_corpus_stream_t *s, int32_t bos,
                           uint64_t tokens, int T, kvp_predictor_t **out, kvp_err_t *err);

/* ---- reports ---------------------------------------------------------------------- */

/* One row per method: method,family,kind,ttft_flops,flops_vs_base,ttft_ms,
 * continuation_acc,first_token_acc,base_loglik,decode_loglik,first_token_loglik,
 * humaneval_exact,humaneval_agree,
 * n_prompts,n_humaneval,cos_k,rel_l1_k,cos_v,rel_l1_v. */
int kvp_eval_write_csv(const char *path, const kvp_eval_method_t *m, const kvp_eval_result_t *r,
                       int n, double base_flops, kvp_err_t *err);
/* Cache quality: method,layer,pos_lo,pos_hi,cos_k,rel_l1_k,cos_v,rel_l1_v; per
 * layer over all positions (pos "all"), per layer and bucket, and per bucket
 * over all layers (layer "all"). */
int kvp_eval_write_cq_csv(const char *path, const kvp_eval_method_t *m, const kvp_eval_result_t *r,
                          int n, int pos_bucket, int n_pos, kvp_err_t *err);
/* HumanEval-like outputs, one row per item: item,target, then each method's
 * generated line(s) (newlines and quotes escaped as \n and ""). */
int kvp_eval_write_he_csv(const char *path, const kvp_eval_method_t *m, const kvp_eval_result_t *r,
                          int n, const kvp_eval_data_t *d, kvp_err_t *err);
/* The terminal table (its loglik column is decode_loglik). */
void kvp_eval_print_table(FILE *f, const kvp_eval_method_t *m, const kvp_eval_result_t *r, int n,
                          double base_flops);

/* The goals: for every KVP method, the best baseline (ALONE) at the same or
 * a smaller TTFT budget and the margin over it, with the standard error of
 * the paired per-prompt differences; and the share of the gap between its
 * auxiliary model alone and the base that it closes. Both on continuation
 * accuracy and on the decoding model's log-likelihood. */
typedef struct kvp_eval_goal {
    int method;               /* index of the KVP method */
    int alone;                /* index of its auxiliary model alone, -1: not evaluated */
    int best_acc, best_ll;    /* best ALONE at <= its FLOPs by each metric, -1: none */
    double margin, margin_se; /* acc - best baseline's (NaN without one) */
    double ll_margin, ll_margin_se;
    double gap_closed, ll_gap_closed; /* (x - alone) / (base - alone); NaN unless base > alone */
    double he_margin; /* exact-match margin on HumanEval-like items over the best there */
} kvp_eval_goal_t;

/* Fills goals[] (room for n) and returns how many KVP methods there are. */
int kvp_eval_goals(const kvp_eval_method_t *m, const kvp_eval_result_t *r, int n,
                   kvp_eval_goal_t *goals);
void kvp_eval_print_goals(FILE *f, const kvp_eval_method_t *m, const kvp_eval_result_t *r, int n,
                          double min_gap);

/* The goals read on the Pareto fronts (the paper's curves): at each KVP
 * method's TTFT budget, the most accurate KVP method and the most accurate
 * baseline (ALONE) at that budget or a smaller one. A KVP configuration that
 * a cheaper one beats is then not held against the method, and neither
 * family is: each gets its best point. The gap is the stricter one, from the
 * best baseline to the base. */
typedef struct kvp_eval_front {
    int budget;               /* the KVP method whose TTFT FLOPs set the budget */
    int kvp, baseline;        /* best of each family at <= the budget; baseline -1: none */
    double margin, margin_se; /* accuracy, kvp - baseline */
    double gap, gap_se;       /* base - baseline, and its paired standard error */
    double gap_closed;        /* (kvp - baseline) / gap; NaN unless gap > 0 */
} kvp_eval_front_t;

/* Fills fronts[] (room for n), one per distinct KVP budget in increasing
 * order, and returns how many. */
int kvp_eval_fronts(const kvp_eval_method_t *m, const kvp_eval_result_t *r, int n,
                    kvp_eval_front_t *fronts);

#endif
