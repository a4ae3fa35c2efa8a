/* kvpred plot-loss: draws the loss curves of one or more training logs (the
 * CSV that `kvpred train` writes) to a PNG image with gnuplot: training and
 * validation loss in bits per byte against the step. The data go to gnuplot
 * inline, through a pipe, so no temporary files are left behind. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvp_cmds.h"

#define MAX_LOGS 16
#define GNUPLOT_PACKAGE "gnuplot-nox"

static void usage(FILE *f) {
    fprintf(f, "usage: kvpred plot-loss LOG.csv [LOG2.csv ...] -o OUT.png [--title TEXT]\n"
               "  [--width W --height H]\n"
               "Draws train and validation loss (bits per byte) against the step with gnuplot\n"
               "(Debian package " GNUPLOT_PACKAGE ").\n");
}

typedef struct series {
    double *x, *y;
    size_t n, cap;
} series_t;

static int series_add(series_t *s, double x, double y) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 256;
        double *nx = realloc(s->x, cap * sizeof *nx);
        if (!nx) return -1;
        s->x = nx;
        double *ny = realloc(s->y, cap * sizeof *ny);
        if (!ny) return -1;
        s->y = ny;
        s->cap = cap;
    }
    s->x[s->n] = x;
    s->y[s->n] = y;
    s->n++;
    return 0;
}

static void series_free(series_t *s) {
    free(s->x);
    free(s->y);
}

/* Column index of name in a CSV header line, -1 if absent. */
static int column(const char *header, const char *name) {
    int i = 0;
    size_t nl = strlen(name);
    for (const char *p = header;; i++) {
        size_t len = strcspn(p, ",\r\n");
        if (len == nl && !memcmp(p, name, nl)) return i;
        if (p[len] != ',') return -1;
        p += len + 1;
    }
}

/* Field i of a CSV line as a number; false when empty or not a number. */
static bool field(const char *line, int i, double *out) {
    const char *p = line;
    for (int k = 0; k < i; k++) {
        p = strchr(p, ',');
        if (!p) return false;
        p++;
    }
    char *end;
    double v = strtod(p, &end);
    if (end == p || (*end && *end != ',' && *end != '\n' && *end != '\r') || !isfinite(v))
        return false;
    *out = v;
    return true;
}

/* Reads a training log into train and validation series. */
static int read_log(const char *path, series_t *train, series_t *val) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "kvpred plot-loss: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    char line[4096];
    int rc = 0;
    if (!fgets(line, sizeof line, f)) {
        fprintf(stderr, "kvpred plot-loss: %s is empty\n", path);
        rc = -1;
    }
    int cs = -1, ct = -1, cv = -1;
    if (!rc) {
        cs = column(line, "step");
        ct = column(line, "train_bpb");
        cv = column(line, "val_bpb");
        if (cs < 0 || ct < 0 || cv < 0) {
            fprintf(stderr,
                    "kvpred plot-loss: %s: not a kvpred training log (the header needs step, "
                    "train_bpb and val_bpb columns)\n",
                    path);
            rc = -1;
        }
    }
    for (int ln = 2; !rc && fgets(line, sizeof line, f); ln++) {
        double s, y;
        if (!field(line, cs, &s)) {
            if (line[0] == '\n' || line[0] == '\r') continue;
            fprintf(stderr, "kvpred plot-loss: %s:%d: no step number\n", path, ln);
            rc = -1;
            break;
        }
        if (field(line, ct, &y) && series_add(train, s, y)) rc = -1;
        if (!rc && field(line, cv, &y) && series_add(val, s, y)) rc = -1;
        if (rc) fprintf(stderr, "kvpred plot-loss: out of memory\n");
    }
    fclose(f);
    if (!rc && train->n == 0) {
        fprintf(stderr, "kvpred plot-loss: %s has no rows with a training loss\n", path);
        rc = -1;
    }
    return rc;
}

/* Whether an executable `name` is on PATH. */
static bool on_path(const char *name) {
    const char *path = getenv("PATH");
    if (!path || !*path) path = "/usr/local/bin:/usr/bin:/bin";
    char buf[4096];
    for (const char *p = path; *p;) {
        size_t len = strcspn(p, ":");
        if (len > 0 && len + strlen(name) + 2 < sizeof buf) {
            snprintf(buf, sizeof buf, "%.*s/%s", (int)len, p, name);
            if (access(buf, X_OK) == 0) return true;
        }
        p += len;
        if (*p == ':') p++;
    }
    return false;
}

/* s as a gnuplot single-quoted string ('' stands for a quote). */
static void put_quoted(FILE *g, const char *s) {
    fputc('\'', g);
    for (; *s; s++) {
        if (*s == '\'') fputc('\'', g);
        if (*s != '\n') fputc(*s, g);
    }
    fputc('\'', g);
}

/* A short label for a log: its base name without .csv. */
static void label_of(const char *path, char *buf, size_t cap) {
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    size_t n = strlen(b);
    if (n > 4 && !strcmp(b + n - 4, ".csv")) n -= 4;
    snprintf(buf, cap, "%.*s", (int)n, b);
}

int kvp_cmd_plot_loss(int argc, char **argv) {
    static const struct option lo[] = {
        {"out", required_argument, 0, 'o'},   {"title", required_argument, 0, 't'},
        {"width", required_argument, 0, 'W'}, {"height", required_argument, 0, 'H'},
        {"help", no_argument, 0, 'h'},        {0, 0, 0, 0}};
    const char *out = NULL, *title = "kvpred training loss";
    int width = 960, height = 600;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:h", lo, NULL)) != -1) {
        char *end;
        switch (c) {
        case 'o':
            out = optarg;
            break;
        case 't':
            title = optarg;
            break;
        case 'W':
        case 'H': {
            long v = strtol(optarg, &end, 10);
            if (*end || v < 64 || v > 8192) {
                fprintf(stderr, "kvpred plot-loss: --%s: '%s' is not a size in [64, 8192]\n",
                        c == 'W' ? "width" : "height", optarg);
                return 2;
            }
            *(c == 'W' ? &width : &height) = (int)v;
            break;
        }
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    int n_logs = argc - optind;
    if (!out || n_logs < 1) {
        usage(stderr);
        return 2;
    }
    if (n_logs > MAX_LOGS) {
        fprintf(stderr, "kvpred plot-loss: at most %d logs\n", MAX_LOGS);
        return 2;
    }
    series_t train[MAX_LOGS] = {{0}}, val[MAX_LOGS] = {{0}};
    int status = 1;
    for (int i = 0; i < n_logs; i++)
        if (read_log(argv[optind + i], &train[i], &val[i])) goto done;
    if (!on_path("gnuplot")) {
        fprintf(stderr, "kvpred plot-loss: gnuplot is not installed: install the Debian "
                        "package " GNUPLOT_PACKAGE " (apt-get install " GNUPLOT_PACKAGE ")\n");
        goto done;
    }
    /* gnuplot writes into OUT itself; remove an old image first so a failed
     * run cannot leave it looking fresh */
    unlink(out);
    FILE *g = popen("gnuplot", "w");
    if (!g) {
        fprintf(stderr, "kvpred plot-loss: cannot start gnuplot: %s\n", strerror(errno));
        goto done;
    }
    fprintf(g,
            "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) "
            "{ set terminal pngcairo size %d,%d } else { set terminal png size %d,%d }\n",
            width, height, width, height);
    fputs("set output ", g);
    put_quoted(g, out);
    fputs("\nset title ", g);
    put_quoted(g, title);
    fputs("\nset xlabel 'step'\nset ylabel 'loss (bits per byte)'\nset grid\n"
          "set key top right\n",
          g);
    for (int i = 0; i < n_logs; i++) {
        fprintf(g, "$train%d << EOD\n", i);
        for (size_t k = 0; k < train[i].n; k++)
            fprintf(g, "%.9g %.9g\n", train[i].x[k], train[i].y[k]);
        fprintf(g, "EOD\n$val%d << EOD\n", i);
        for (size_t k = 0; k < val[i].n; k++)
            fprintf(g, "%.9g %.9g\n", val[i].x[k], val[i].y[k]);
        fputs("EOD\n", g);
    }
    /* training curves thin and first, validation thick on top of them */
    fputs("plot ", g);
    for (int i = 0; i < n_logs; i++) {
        char label[256], t[300];
        label_of(argv[optind + i], label, sizeof label);
        fprintf(g, "%s$train%d using 1:2 with lines lw 1 lc %d title ", i ? ", " : "", i, i + 1);
        snprintf(t, sizeof t, "%s%strain", n_logs > 1 ? label : "", n_logs > 1 ? " " : "");
        put_quoted(g, t);
    }
    for (int i = 0; i < n_logs; i++) {
        char label[256], t[300];
        label_of(argv[optind + i], label, sizeof label);
        if (!val[i].n) continue;
        fprintf(g, ", $val%d using 1:2 with linespoints lw 3 pt 7 ps 1.2 lc %d title ", i, i + 1);
        snprintf(t, sizeof t, "%s%svalidation", n_logs > 1 ? label : "", n_logs > 1 ? " " : "");
        put_quoted(g, t);
    }
    fputs("\n", g);
    int ws = pclose(g);
    struct stat st;
    if (ws == -1 || !WIFEXITED(ws) || WEXITSTATUS(ws) != 0 || stat(out, &st) || st.st_size == 0) {
        fprintf(stderr, "kvpred plot-loss: gnuplot failed to draw %s (its message is above)\n",
                out);
        goto done;
    }
    printf("wrote %s\n", out);
    status = 0;
done:
    for (int i = 0; i < n_logs; i++) {
        series_free(&train[i]);
        series_free(&val[i]);
    }
    return status;
}
