#include "kvp_progress.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvp_time.h"

#define BAR_WIDTH 20
#define TTY_MIN_INTERVAL 0.1

struct kvp_progress {
    FILE *f;
    bool tty;
    double interval;
    double last;  /* time of the last draw (-1: never) */
    bool on_line; /* a bar is drawn on the current line (tty) */
};

kvp_progress_t *kvp_progress_new(FILE *f, int tty, double interval) {
    kvp_progress_t *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->f = f;
    p->tty = tty < 0 ? isatty(fileno(f)) != 0 : tty != 0;
    p->interval = interval > 0 ? interval : 10.0;
    p->last = -1.0;
    return p;
}

void kvp_progress_free(kvp_progress_t **pp) {
    kvp_progress_t *p = pp ? *pp : NULL;
    if (!p) return;
    if (p->tty && p->on_line) {
        fputc('\n', p->f);
        fflush(p->f);
    }
    free(p);
    *pp = NULL;
}

void kvp_progress_fmt_duration(double s, char *buf, size_t cap) {
    if (!(s >= 0) || !isfinite(s)) {
        snprintf(buf, cap, "?");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, cap, "%ldh%02ldm", t / 3600, t / 60 % 60);
    else if (t >= 60)
        snprintf(buf, cap, "%ldm%02lds", t / 60, t % 60);
    else
        snprintf(buf, cap, "%lds", t);
}

static void fmt_rate(double r, char *buf, size_t cap) {
    if (r >= 1e6)
        snprintf(buf, cap, "%.2fM", r / 1e6);
    else if (r >= 1e4)
        snprintf(buf, cap, "%.1fk", r / 1e3);
    else
        snprintf(buf, cap, "%.0f", r);
}

static void format(const kvp_progress_info_t *in, bool bar, char *buf, size_t cap) {
    int total = in->total > 0 ? in->total : 1;
    double frac = (double)in->step / total;
    if (frac > 1) frac = 1;
    char loss[32], val[32], rate[32], eta[32], b[BAR_WIDTH + 3] = "";
    if (isnan(in->loss_bpb))
        snprintf(loss, sizeof loss, "-");
    else
        snprintf(loss, sizeof loss, "%.3f", in->loss_bpb);
    if (isnan(in->val_bpb))
        snprintf(val, sizeof val, "-");
    else
        snprintf(val, sizeof val, "%.3f", in->val_bpb);
    fmt_rate(in->tok_per_s, rate, sizeof rate);
    kvp_progress_fmt_duration(in->eta_s, eta, sizeof eta);
    if (bar) {
        int fill = (int)(frac * BAR_WIDTH);
        b[0] = '[';
        for (int i = 0; i < BAR_WIDTH; i++)
            b[1 + i] = i < fill ? '#' : '.';
        b[BAR_WIDTH + 1] = ']';
        b[BAR_WIDTH + 2] = 0;
    }
    int w = snprintf(NULL, 0, "%d", total);
    snprintf(buf, cap, "step %*d/%d %s%s%3.0f%% loss %s val %s bpb %s tok/s ETA %s", w, in->step,
             total, b, bar ? " " : "", 100.0 * frac, loss, val, rate, eta);
}

void kvp_progress_update(kvp_progress_t *p, const kvp_progress_info_t *in) {
    if (!p) return;
    double now = kvp_now();
    bool last = in->step >= in->total;
    char line[256];
    if (p->tty) {
        if (!last && !in->new_val && p->last >= 0 && now - p->last < TTY_MIN_INTERVAL) return;
        format(in, true, line, sizeof line);
        /* \r and erase-line: redraws in place whatever was there */
        fprintf(p->f, "\r\033[K%s", line);
        p->on_line = true;
    } else {
        if (!last && !in->new_val && p->last >= 0 && now - p->last < p->interval) return;
        format(in, false, line, sizeof line);
        fprintf(p->f, "%s\n", line);
    }
    fflush(p->f);
    p->last = now;
}

void kvp_progress_message(kvp_progress_t *p, const char *fmt, ...) {
    if (!p) return;
    if (p->tty && p->on_line) {
        fputs("\r\033[K", p->f);
        p->on_line = false;
        p->last = -1.0; /* redraw the bar at the next update */
    }
    va_list ap;
    va_start(ap, fmt);
    vfprintf(p->f, fmt, ap);
    va_end(ap);
    fputc('\n', p->f);
    fflush(p->f);
}
