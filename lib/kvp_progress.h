/* kvp_progress: the trainer's progress display on stderr (or any stream).
 *
 * On a terminal one line is redrawn in place (at most ten times a second):
 *   step  340/1200 [#######.............]  28% loss 2.412 val 2.518 bpb 18.2k tok/s ETA 3m05s
 * Anywhere else (a log file, CI) the same text is printed as plain lines, one
 * every `interval` seconds and whenever a validation result arrives, so logs
 * stay short and readable. */
#ifndef KVP_PROGRESS_H
#define KVP_PROGRESS_H

#include <stdbool.h>
#include <stdio.h>

typedef struct kvp_progress_info {
    int step;        /* steps done */
    int total;       /* steps planned */
    double loss_bpb; /* training loss, bits per byte (NAN: none yet) */
    double val_bpb;  /* last validation loss, bits per byte (NAN: none yet) */
    double tok_per_s;
    double eta_s; /* < 0: unknown */
    bool new_val; /* a validation result arrived with this step */
} kvp_progress_info_t;

typedef struct kvp_progress kvp_progress_t;

/* tty: 1 redraw in place, 0 plain lines, -1 decide by isatty(f). interval:
 * seconds between plain lines (<= 0: 10). */
kvp_progress_t *kvp_progress_new(FILE *f, int tty, double interval);
/* Ends the in-place line (newline) and frees. */
void kvp_progress_free(kvp_progress_t **p);

void kvp_progress_update(kvp_progress_t *p, const kvp_progress_info_t *info);
/* Prints a message on its own line without garbling the bar (the bar is
 * redrawn with the next update). */
void kvp_progress_message(kvp_progress_t *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* "1h02m", "3m05s", "12s" */
void kvp_progress_fmt_duration(double s, char *buf, size_t cap);

#endif
