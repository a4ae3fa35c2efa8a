/* kvpred client: sends prompts to a running pipeline (aux-prefill's
 * endpoint), streams the answers, and with --trace prints each request's TTFT
 * breakdown from the events the stages sent back with it. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvp_client.h"
#include "kvp_cmds.h"
#include "kvp_json.h"
#include "kvp_svc.h"
#include "kvp_tool_util.h"
#include "kvpred.pb-c.h"

#define MAX_PROMPTS 256

typedef struct {
    const char *endpoint, *json, *server_key;
    const char *prompts[MAX_PROMPTS];
    int n_prompts;
    char *file_text;
    kvp_client_req_t base;
    int concurrency, trace, baseline, quiet;
    double timeout;
} client_opts_t;

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvpred client [-e ENDPOINT] -p PROMPT [-p PROMPT ...] [options]\n"
            "  -e, --endpoint EP     aux-prefill's endpoint (default %s)\n"
            "  -p, --prompt TEXT     a prompt (repeatable)\n"
            "  -f, --file FILE       prompts, one per line ('\\n' is a newline, '\\\\' a backslash)\n"
            "  -n, --n-predict N     tokens to generate (default 32)\n"
            "      --mode M          kvp (default), baseline or aux-only\n"
            "      --baseline        also run every prompt in baseline mode and print both TTFTs\n"
            "      --greedy | --temp T --top-k K --top-p P --seed S\n"
            "      --concurrency K   requests in flight at once (default 1)\n"
            "      --chunk C         prompt tokens per chunk (default: aux-prefill's)\n"
            "      --deadline-ms N   the request's deadline (default: the stages')\n"
            "      --timeout S       give up waiting after S seconds (default 120)\n"
            "      --trace           print each request's TTFT breakdown\n"
            "      --json FILE       write every request's result and breakdown as JSON\n"
            "      --curve-server-key F  aux-prefill's CurveZMQ public key\n"
            "      --quiet           do not print the answers\n",
            KVP_SVC_AUX_ENDPOINT);
}

static int parse_mode(const char *s, int *mode) {
    if (!strcmp(s, "kvp"))
        *mode = KVPRED__MODE__MODE_KVP;
    else if (!strcmp(s, "baseline"))
        *mode = KVPRED__MODE__MODE_BASELINE;
    else if (!strcmp(s, "aux-only"))
        *mode = KVPRED__MODE__MODE_AUX_ONLY;
    else {
        fprintf(stderr, "kvpred client: --mode: '%s' is not kvp, baseline or aux-only\n", s);
        return -1;
    }
    return 0;
}

/* Splits the file into lines; "\n" inside a line stands for a newline and
 * "\\" for a backslash. */
static int read_prompts(client_opts_t *o, const char *path) {
    if (kvp_read_text(path, &o->file_text, NULL)) return -1;
    for (char *save = NULL, *line = strtok_r(o->file_text, "\n", &save); line;
         line = strtok_r(NULL, "\n", &save)) {
        char *w = line;
        for (char *r = line; *r; r++) {
            if (r[0] == '\\' && (r[1] == 'n' || r[1] == '\\')) {
                *w++ = r[1] == 'n' ? '\n' : '\\';
                r++;
            } else {
                *w++ = *r;
            }
        }
        *w = 0;
        if (line[0] && o->n_prompts < MAX_PROMPTS) o->prompts[o->n_prompts++] = line;
    }
    return 0;
}

static int parse(int argc, char **argv, client_opts_t *o) {
    static const struct option lo[] = {{"endpoint", required_argument, 0, 'e'},
                                       {"prompt", required_argument, 0, 'p'},
                                       {"file", required_argument, 0, 'f'},
                                       {"n-predict", required_argument, 0, 'n'},
                                       {"mode", required_argument, 0, 'M'},
                                       {"baseline", no_argument, 0, 'B'},
                                       {"greedy", no_argument, 0, 'g'},
                                       {"temp", required_argument, 0, 't'},
                                       {"top-k", required_argument, 0, 'k'},
                                       {"top-p", required_argument, 0, 'P'},
                                       {"seed", required_argument, 0, 's'},
                                       {"concurrency", required_argument, 0, 'c'},
                                       {"chunk", required_argument, 0, 'C'},
                                       {"deadline-ms", required_argument, 0, 'd'},
                                       {"timeout", required_argument, 0, 'T'},
                                       {"trace", no_argument, 0, 'r'},
                                       {"json", required_argument, 0, 'j'},
                                       {"curve-server-key", required_argument, 0, 'K'},
                                       {"quiet", no_argument, 0, 'q'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    memset(o, 0, sizeof *o);
    o->endpoint = KVP_SVC_AUX_ENDPOINT;
    o->concurrency = 1;
    o->timeout = 120;
    o->base =
        (kvp_client_req_t){.n_predict = 32, .temp = 0.8f, .top_k = 40, .top_p = 0.95f, .seed = 42};
    float timeout = 120;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "e:p:f:n:h", lo, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case 'e':
            o->endpoint = optarg;
            break;
        case 'p':
            if (o->n_prompts < MAX_PROMPTS) o->prompts[o->n_prompts++] = optarg;
            break;
        case 'f':
            bad = read_prompts(o, optarg);
            break;
        case 'n':
            bad = kvp_parse_int("--n-predict", optarg, 0, 1 << 20, &o->base.n_predict);
            break;
        case 'M':
            bad = parse_mode(optarg, &o->base.mode);
            break;
        case 'B':
            o->baseline = 1;
            break;
        case 'g':
            o->base.temp = 0.0f;
            break;
        case 't':
            bad = kvp_parse_float("--temp", optarg, 0, 100, &o->base.temp);
            break;
        case 'k':
            bad = kvp_parse_int("--top-k", optarg, 0, 1 << 24, &o->base.top_k);
            break;
        case 'P':
            bad = kvp_parse_float("--top-p", optarg, 1e-6f, 1, &o->base.top_p);
            break;
        case 's':
            bad = kvp_parse_u64("--seed", optarg, &o->base.seed);
            break;
        case 'c':
            bad = kvp_parse_int("--concurrency", optarg, 1, 1024, &o->concurrency);
            break;
        case 'C':
            bad = kvp_parse_int("--chunk", optarg, 1, 65536, &o->base.chunk_tokens);
            break;
        case 'd':
            bad = kvp_parse_int("--deadline-ms", optarg, 1, 86400000, &o->base.deadline_ms);
            break;
        case 'T':
            bad = kvp_parse_float("--timeout", optarg, 0.1f, 86400, &timeout);
            break;
        case 'r':
            o->trace = 1;
            break;
        case 'j':
            o->json = optarg;
            break;
        case 'K':
            o->server_key = optarg;
            break;
        case 'q':
            o->quiet = 1;
            break;
        case 'h':
            usage(stdout);
            return 1;
        default:
            usage(stderr);
            return 2;
        }
        if (bad) return 2;
    }
    o->timeout = timeout;
    if (!o->n_prompts || optind < argc) {
        if (!o->n_prompts) fprintf(stderr, "kvpred client: no prompt (-p TEXT or -f FILE)\n");
        usage(stderr);
        return 2;
    }
    return 0;
}

/* Streams the tokens of a single request as they arrive. */
static void stream(void *user, size_t i, int32_t tok, const uint8_t *piece, size_t len) {
    (void)user, (void)i, (void)tok;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
}

static double ms(int64_t ns) {
    return ns == KVP_TRACE_NONE ? -1.0 : ns / 1e6;
}

static void print_ms(int64_t ns) {
    if (ns == KVP_TRACE_NONE)
        printf(" %8s", "-");
    else
        printf(" %8.2f", ns / 1e6);
}

static int breakdown(const kvp_client_result_t *r, kvp_trace_req_t *out) {
    kvp_trace_set_t *s = kvp_trace_set_new();
    kvp_err_t err = {0};
    for (size_t k = 0; s && k < r->n_events; k++)
        kvp_trace_set_add(s, &r->events[k], &err);
    kvp_trace_req_t *q = NULL;
    size_t n = 0;
    int ok = s && !kvp_trace_analyze(s, &q, &n, &err) && n == 1;
    if (ok) *out = q[0];
    free(q);
    kvp_trace_set_free(&s);
    return ok ? 0 : -1;
}

static void print_table(const kvp_client_result_t *res, size_t n) {
    printf("\n%-10s %-9s %8s %8s %8s %8s %8s %8s %8s %8s %5s\n", "request", "mode", "TTFT", "queue",
           "prefill", "predict", "transfer", "1st step", "handoff", "client", "toks");
    for (size_t i = 0; i < n; i++) {
        kvp_trace_req_t q;
        if (res[i].code || breakdown(&res[i], &q)) {
            printf("%-10s %s\n", res[i].id, res[i].code ? "failed" : "no trace");
            continue;
        }
        printf("%-10s %-9s", q.request_id, kvp_trace_mode_name(q.mode));
        print_ms(q.ttft_ns), print_ms(q.queueing_ns), print_ms(q.prefill_ns);
        print_ms(q.prediction_ns), print_ms(q.transfer_ns), print_ms(q.first_step_ns);
        print_ms(q.handoff_ns), print_ms(q.client_ttft_ns);
        printf(" %5d%s\n", res[i].n_tokens, q.complete ? "" : "  (incomplete trace)");
    }
    printf("(milliseconds; TTFT = queue + prefill + predict + transfer + 1st step; handoff = "
           "cache complete - last aux chunk end; client = TTFT seen by this client)\n");
}

static void write_json(const char *path, const kvp_client_result_t *res, size_t n) {
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "kvpred client: cannot write %s\n", path);
        return;
    }
    kvp_json_t j;
    kvp_json_begin(&j, f);
    kvp_json_arr(&j, "requests");
    for (size_t i = 0; i < n; i++) {
        kvp_json_item_obj(&j);
        kvp_json_str(&j, "id", res[i].id);
        kvp_json_int(&j, "code", res[i].code);
        if (res[i].code) kvp_json_str(&j, "error", res[i].error);
        kvp_json_str(&j, "text", res[i].text ? res[i].text : "");
        kvp_json_int(&j, "tokens", res[i].n_tokens);
        kvp_trace_req_t q;
        if (!res[i].code && !breakdown(&res[i], &q)) {
            kvp_json_str(&j, "mode", kvp_trace_mode_name(q.mode));
            kvp_json_num(&j, "ttft_ms", ms(q.ttft_ns));
            kvp_json_num(&j, "queueing_ms", ms(q.queueing_ns));
            kvp_json_num(&j, "prefill_ms", ms(q.prefill_ns));
            kvp_json_num(&j, "prediction_ms", ms(q.prediction_ns));
            kvp_json_num(&j, "transfer_ms", ms(q.transfer_ns));
            kvp_json_num(&j, "first_step_ms", ms(q.first_step_ns));
            kvp_json_num(&j, "handoff_ms", ms(q.handoff_ns));
            kvp_json_num(&j, "client_ttft_ms", ms(q.client_ttft_ns));
            kvp_json_num(&j, "sum_err_ms", ms(q.sum_err_ns));
        }
        kvp_json_close_obj(&j);
    }
    kvp_json_close_arr(&j);
    kvp_json_end(&j);
    fclose(f);
}

int kvp_cmd_client(int argc, char **argv) {
    client_opts_t o;
    int prc = parse(argc, argv, &o);
    if (prc) {
        free(o.file_text);
        return prc == 1 ? 0 : 2;
    }
    kvp_err_t err = {0};
    kvp_link_curve_t curve = {0};
    if (o.server_key && kvp_link_curve_load_client(&curve, o.server_key, NULL, NULL, &err)) {
        fprintf(stderr, "kvpred client: %s\n", err.msg);
        free(o.file_text);
        return 1;
    }
    kvp_client_t *c = NULL;
    if (kvp_client_new(&c, NULL, o.endpoint, o.server_key ? &curve : NULL, 10.0, &err)) {
        fprintf(stderr, "kvpred client: %s\n", err.msg);
        free(o.file_text);
        return 1;
    }
    size_t per = (size_t)o.n_prompts, n = per * (o.baseline ? 2 : 1);
    kvp_client_req_t *reqs = calloc(n, sizeof *reqs);
    kvp_client_result_t *res = calloc(n, sizeof *res);
    char(*ids)[32] = calloc(n, sizeof *ids);
    for (size_t i = 0; i < n; i++) {
        reqs[i] = o.base;
        reqs[i].prompt = o.prompts[i % per];
        if (i >= per) reqs[i].mode = KVPRED__MODE__MODE_BASELINE;
        snprintf(ids[i], sizeof ids[i], "%s%zu-%d", i >= per ? "b" : "r", i % per, (int)getpid());
        reqs[i].id = ids[i];
    }
    int live = n == 1 && !o.quiet;
    if (live) {
        fputs(o.prompts[0], stdout);
        fflush(stdout);
    }
    kvp_client_run(c, reqs, n, o.concurrency, o.timeout, live ? stream : NULL, NULL, res, &err);
    if (live) fputc('\n', stdout);
    int failed = 0;
    for (size_t i = 0; i < n; i++) {
        if (res[i].code) {
            failed++;
            fprintf(stderr, "kvpred client: request %s failed at %s: %s\n", res[i].id, res[i].stage,
                    res[i].error);
        } else if (!live && !o.quiet && i < per) {
            printf("--- %s\n%s%s\n", res[i].id, o.prompts[i], res[i].text ? res[i].text : "");
        }
    }
    if (o.trace) print_table(res, n);
    if (o.baseline) {
        printf("\n%-10s %12s %14s %9s\n", "prompt", "kvp TTFT ms", "base TTFT ms", "speed-up");
        for (size_t i = 0; i < per; i++) {
            kvp_trace_req_t a, b;
            if (res[i].code || res[i + per].code || breakdown(&res[i], &a) ||
                breakdown(&res[i + per], &b) || a.ttft_ns <= 0)
                continue;
            printf("%-10zu %12.2f %14.2f %8.2fx\n", i, a.ttft_ns / 1e6, b.ttft_ns / 1e6,
                   (double)b.ttft_ns / a.ttft_ns);
        }
    }
    if (o.json) write_json(o.json, res, n);
    for (size_t i = 0; i < n; i++)
        kvp_client_result_free(&res[i]);
    free(res);
    free(reqs);
    free(ids);
    free(o.file_text);
    kvp_client_free(&c);
    return failed ? 1 : 0;
}
