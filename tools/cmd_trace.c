/* kvpred trace: merge the stages' trace logs, print each request's TTFT
 * breakdown and write a Chrome/Perfetto trace. All the work is in kvp_trace;
 * this file parses the command line and prints. */
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_cmds.h"
#include "kvp_json.h"
#include "kvp_trace.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvpred trace LOG... [-o trace.json] [--json SUMMARY.json]\n"
            "\n"
            "Merges the trace logs the pipeline's stages write (MessagePack, one per stage\n"
            "and host), puts every time on the entry stage's clock using the clock offset\n"
            "each record carries, prints each request's TTFT breakdown and a summary, and\n"
            "writes a Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing).\n"
            "\n"
            "options:\n"
            "  -o, --output FILE   Chrome trace JSON (default trace.json)\n"
            "      --json FILE     the breakdown and summary as JSON\n"
            "  -h, --help          print this help and exit\n"
            "\n"
            "columns (ms): TTFT = first_token - accepted = queue + prefill + predict +\n"
            "transfer + 1st-step exactly; prefill is the aux model's (kvp, aux-only) or the\n"
            "base model's (baseline); handoff = cache_complete - last aux_chunk_end; client =\n"
            "client_first_token - client_send; clk-err = largest clock-offset error bound (us).\n"
            "See docs/tracing.md.\n");
}

/* Milliseconds with three decimals, "-" when not measured. */
static const char *ms(int64_t ns, char *buf, size_t cap) {
    if (ns == KVP_TRACE_NONE)
        snprintf(buf, cap, "-");
    else
        snprintf(buf, cap, "%.3f", (double)ns * 1e-6);
    return buf;
}

static double ms_or_nan(int64_t ns) {
    return ns == KVP_TRACE_NONE ? NAN : (double)ns * 1e-6;
}

static void print_table(const kvp_trace_req_t *q, size_t n) {
    int w = 8;
    for (size_t i = 0; i < n; i++) {
        int l = (int)strlen(q[i].request_id);
        if (l > w) w = l < 36 ? l : 36;
    }
    printf("%-*s %-8s %9s %8s %9s %8s %8s %8s %8s %9s %6s %7s\n", w, "request", "mode", "TTFT",
           "queue", "prefill", "predict", "transfer", "1st-step", "handoff", "client", "tokens",
           "clk-err");
    char b[10][32];
    for (size_t i = 0; i < n; i++) {
        const kvp_trace_req_t *r = &q[i];
        printf("%-*.*s %-8s ", w, w, r->request_id, kvp_trace_mode_name(r->mode));
        if (!r->complete) {
            printf("incomplete: %s\n", r->reason);
            continue;
        }
        printf("%9s %8s %9s %8s %8s %8s %8s %9s %6d %7.1f%s%s\n", ms(r->ttft_ns, b[0], 32),
               ms(r->queueing_ns, b[1], 32), ms(r->prefill_ns, b[2], 32),
               ms(r->prediction_ns, b[3], 32), ms(r->transfer_ns, b[4], 32),
               ms(r->first_step_ns, b[5], 32), ms(r->handoff_ns, b[6], 32),
               ms(r->client_ttft_ns, b[7], 32), r->n_tokens, (double)r->max_offset_err_ns * 1e-3,
               r->failed ? "  " : "", r->failed ? r->reason : "");
    }
}

static void print_stats(const char *what, const kvp_trace_stats_t *s) {
    if (s->n == 0) return;
    printf("  %-16s mean %9.3f  p50 %9.3f  p90 %9.3f  (n=%zu)\n", what, s->mean_ms, s->p50_ms,
           s->p90_ms, s->n);
}

static void json_stats(kvp_json_t *j, const char *key, const kvp_trace_stats_t *s) {
    kvp_json_obj(j, key);
    kvp_json_int(j, "n", (long long)s->n);
    kvp_json_num(j, "mean_ms", s->mean_ms);
    kvp_json_num(j, "p50_ms", s->p50_ms);
    kvp_json_num(j, "p90_ms", s->p90_ms);
    kvp_json_close_obj(j);
}

static int write_json(const char *path, const kvp_trace_set_t *set, const kvp_trace_req_t *q,
                      size_t n, const char *chrome_path) {
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        return -1;
    }
    kvp_json_t j;
    kvp_json_begin(&j, f);
    kvp_json_int(&j, "logs", set->n_logs);
    kvp_json_int(&j, "records", (long long)set->n);
    kvp_json_int(&j, "truncated_logs", (long long)set->n_truncated);
    kvp_json_int(&j, "skipped_records", (long long)set->n_skipped);
    kvp_json_str(&j, "chrome_trace", chrome_path);
    kvp_json_arr(&j, "requests");
    for (size_t i = 0; i < n; i++) {
        const kvp_trace_req_t *r = &q[i];
        kvp_json_item_obj(&j);
        kvp_json_str(&j, "request_id", r->request_id);
        kvp_json_str(&j, "mode", kvp_trace_mode_name(r->mode));
        kvp_json_int(&j, "complete", r->complete);
        kvp_json_int(&j, "failed", r->failed);
        kvp_json_str(&j, "reason", r->reason);
        kvp_json_num(&j, "ttft_ms", ms_or_nan(r->ttft_ns));
        kvp_json_num(&j, "queueing_ms", ms_or_nan(r->queueing_ns));
        kvp_json_num(&j, "prefill_ms", ms_or_nan(r->prefill_ns));
        kvp_json_num(&j, "prediction_ms", ms_or_nan(r->prediction_ns));
        kvp_json_num(&j, "transfer_ms", ms_or_nan(r->transfer_ns));
        kvp_json_num(&j, "first_step_ms", ms_or_nan(r->first_step_ns));
        kvp_json_num(&j, "handoff_ms", ms_or_nan(r->handoff_ns));
        kvp_json_num(&j, "client_ttft_ms", ms_or_nan(r->client_ttft_ns));
        if (r->sum_err_ns != KVP_TRACE_NONE) kvp_json_int(&j, "sum_err_ns", r->sum_err_ns);
        kvp_json_int(&j, "chunks", r->n_chunks);
        kvp_json_int(&j, "tokens", r->n_tokens);
        kvp_json_num(&j, "max_offset_err_us", (double)r->max_offset_err_ns * 1e-3);
        kvp_json_close_obj(&j);
    }
    kvp_json_close_arr(&j);
    kvp_json_obj(&j, "summary");
    for (int m = KVP_TRACE_MODE_KVP; m <= KVP_TRACE_MODE_AUX_ONLY; m++) {
        kvp_trace_summary_t s;
        kvp_trace_summarize(q, n, (kvp_trace_mode_t)m, &s);
        if (s.n_requests == 0) continue;
        kvp_json_obj(&j, kvp_trace_mode_name((kvp_trace_mode_t)m));
        kvp_json_int(&j, "requests", (long long)s.n_requests);
        kvp_json_int(&j, "complete", (long long)s.n_complete);
        json_stats(&j, "ttft", &s.ttft);
        json_stats(&j, "handoff", &s.handoff);
        json_stats(&j, "client_ttft", &s.client_ttft);
        kvp_json_close_obj(&j);
    }
    kvp_json_close_obj(&j);
    kvp_json_end(&j);
    if (fclose(f) != 0) {
        perror(path);
        return -1;
    }
    return 0;
}

int kvp_cmd_trace(int argc, char **argv) {
    static const struct option lo[] = {{"output", required_argument, 0, 'o'},
                                       {"json", required_argument, 0, 'j'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    const char *out_path = "trace.json", *json_path = NULL;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:h", lo, NULL)) != -1) {
        switch (c) {
        case 'o':
            out_path = optarg;
            break;
        case 'j':
            json_path = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return 2;
    }
    kvp_trace_set_t *set = kvp_trace_set_new();
    if (!set) {
        fprintf(stderr, "kvpred trace: out of memory\n");
        return 1;
    }
    kvp_err_t err = {0};
    int status = 1;
    kvp_trace_req_t *reqs = NULL;
    size_t n_reqs = 0, n_events = 0;
    for (int i = optind; i < argc; i++) {
        kvp_trace_read_info_t info;
        if (kvp_trace_set_read(set, argv[i], &info, &err)) {
            fprintf(stderr, "kvpred trace: %s\n", err.msg);
            goto done;
        }
        if (info.truncated_bytes)
            fprintf(stderr, "kvpred trace: warning: %s: last record cut off (%zu bytes ignored)\n",
                    argv[i], info.truncated_bytes);
        if (info.n_skipped)
            fprintf(stderr,
                    "kvpred trace: warning: %s: %zu records without the required fields "
                    "skipped\n",
                    argv[i], info.n_skipped);
    }
    if (kvp_trace_analyze(set, &reqs, &n_reqs, &err) ||
        kvp_trace_write_chrome(set, out_path, &n_events, &err)) {
        fprintf(stderr, "kvpred trace: %s\n", err.msg);
        goto done;
    }
    printf("%d logs, %zu records, %zu requests (times on the entry stage's clock)\n\n", set->n_logs,
           set->n, n_reqs);
    print_table(reqs, n_reqs);

    int64_t worst = 0;
    for (size_t i = 0; i < n_reqs; i++)
        if (reqs[i].complete && reqs[i].sum_err_ns > worst) worst = reqs[i].sum_err_ns;
    printf("\nparts sum to TTFT: max |sum - TTFT| = %" PRId64 " ns%s\n", worst,
           worst >= 1000000 ? "  (WARNING: 1 ms or more)" : "");
    for (int m = KVP_TRACE_MODE_KVP; m <= KVP_TRACE_MODE_AUX_ONLY; m++) {
        kvp_trace_summary_t s;
        kvp_trace_summarize(reqs, n_reqs, (kvp_trace_mode_t)m, &s);
        if (s.n_requests == 0) continue;
        printf("%s: %zu requests, %zu complete (ms)\n", kvp_trace_mode_name((kvp_trace_mode_t)m),
               s.n_requests, s.n_complete);
        print_stats("TTFT", &s.ttft);
        print_stats("exposed handoff", &s.handoff);
        print_stats("client TTFT", &s.client_ttft);
    }
    if (json_path && write_json(json_path, set, reqs, n_reqs, out_path)) goto done;
    printf("wrote %s (%zu events)%s%s\n", out_path, n_events, json_path ? " and " : "",
           json_path ? json_path : "");
    status = 0;
done:
    free(reqs);
    kvp_trace_set_free(&set);
    return status;
}
