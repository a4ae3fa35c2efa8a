/* kvpred tokenize: text to token ids with a GGUF file's vocabulary, or ids
 * back to text with --decode. Only the tokenizer is built: the file may be a
 * vocabulary without weights. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvp_cmds.h"
#include "kvp_gguf.h"
#include "kvp_tokenizer.h"

#define READ_LIMIT ((size_t)1 << 30) /* bytes of standard input */

static void usage(FILE *f) {
    fprintf(f, "usage: kvpred tokenize -m MODEL.gguf [-p TEXT] [--special] [--decode]\n"
               "\n"
               "Prints the token ids of TEXT (standard input when -p is not given),\n"
               "separated by spaces, then a newline.\n"
               "\n"
               "  -m, --model FILE   GGUF file whose tokenizer.ggml.* vocabulary to use\n"
               "  -p, --prompt TEXT  the text (or, with --decode, the ids)\n"
               "  --special          add BOS/EOS as the vocabulary asks\n"
               "  --decode           read token ids (separated by spaces, commas or\n"
               "                     newlines) and print the text they stand for,\n"
               "                     byte for byte, with no newline added\n"
               "  -h, --help         this help\n");
}

static int fail(const char *fmt, const char *arg) {
    fprintf(stderr, "kvpred tokenize: ");
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    return 1;
}

/* Reads all of standard input (binary: NUL bytes are text too). */
static int read_stdin(char **out, size_t *out_len) {
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n == cap) {
            char *nb = cap < READ_LIMIT ? realloc(buf, cap * 2) : NULL;
            if (!nb) {
                free(buf);
                return fail("standard input is too large (limit %s)", "1 GiB");
            }
            buf = nb;
            cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n, stdin);
        n += r;
        if (r == 0) break;
    }
    if (!buf) return fail("%s", "out of memory reading standard input");
    if (ferror(stdin)) {
        free(buf);
        return fail("reading standard input: %s", strerror(errno));
    }
    *out = buf;
    *out_len = n;
    return 0;
}

/* Parses ids separated by white space or commas. */
static int parse_ids(const char *s, size_t len, const kvp_tokenizer_t *t, int32_t **out,
                     size_t *out_n) {
    size_t cap = 16, n = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!ids) return fail("%s", "out of memory");
    size_t i = 0;
    for (;;) {
        while (i < len && (strchr(" \t\r\n\v\f,", s[i]) && s[i]))
            i++;
        if (i == len) break;
        char word[32];
        size_t w = 0;
        while (i < len && !(strchr(" \t\r\n\v\f,", s[i]) && s[i])) {
            if (w < sizeof word - 1) word[w] = s[i];
            w++;
            i++;
        }
        word[w < sizeof word - 1 ? w : sizeof word - 1] = 0;
        char *end;
        errno = 0;
        long v = strtol(word, &end, 10);
        if (w >= sizeof word || *end || end == word || errno || word[0] == '+') {
            free(ids);
            return fail("'%s' is not a token id", word);
        }
        if (v < 0 || v >= kvp_tokenizer_n_vocab(t)) {
            free(ids);
            char msg[96];
            snprintf(msg, sizeof msg, "token id %ld is out of range (%d tokens)", v,
                     kvp_tokenizer_n_vocab(t));
            return fail("%s", msg);
        }
        if (n == cap) {
            int32_t *ni = realloc(ids, 2 * cap * sizeof *ids);
            if (!ni) {
                free(ids);
                return fail("%s", "out of memory");
            }
            ids = ni;
            cap *= 2;
        }
        ids[n++] = (int32_t)v;
    }
    *out = ids;
    *out_n = n;
    return 0;
}

static int run(const char *model, const char *text, size_t len, bool special, bool decode) {
    kvp_err_t err = {0};
    kvp_gguf_t *g = NULL;
    if (kvp_gguf_open(&g, model, &err)) return fail("%s", err.msg);
    kvp_tokenizer_t *t = NULL;
    int rc = kvp_tokenizer_from_gguf(&t, g, &err);
    kvp_gguf_free(&g);
    if (rc) return fail("%s", err.msg);

    int status = 0;
    int32_t *ids = NULL;
    size_t n = 0;
    if (decode) {
        char *out = NULL;
        size_t out_len = 0;
        status = parse_ids(text, len, t, &ids, &n);
        if (!status && kvp_tokenizer_decode(t, ids, n, &out, &out_len, &err))
            status = fail("%s", err.msg);
        if (!status) fwrite(out, 1, out_len, stdout);
        free(out);
    } else if (kvp_tokenizer_encode(t, text, len, special, &ids, &n, &err)) {
        status = fail("%s", err.msg);
    } else {
        for (size_t i = 0; i < n; i++)
            printf(i ? " %d" : "%d", ids[i]);
        putchar('\n');
    }
    free(ids);
    kvp_tokenizer_free(&t);
    if (!status && (fflush(stdout) != 0 || ferror(stdout)))
        status = fail("writing standard output: %s", strerror(errno));
    return status;
}

int kvp_cmd_tokenize(int argc, char **argv) {
    const char *model = NULL, *prompt = NULL;
    bool special = false, decode = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if ((!strcmp(a, "-m") || !strcmp(a, "--model")) && i + 1 < argc) {
            model = argv[++i];
        } else if ((!strcmp(a, "-p") || !strcmp(a, "--prompt")) && i + 1 < argc) {
            prompt = argv[++i];
        } else if (!strcmp(a, "--special")) {
            special = true;
        } else if (!strcmp(a, "--decode")) {
            decode = true;
        } else {
            bool takes_value = !strcmp(a, "-m") || !strcmp(a, "--model") || !strcmp(a, "-p") ||
                               !strcmp(a, "--prompt");
            fprintf(stderr, "kvpred tokenize: %s '%s'\n",
                    takes_value   ? "missing value for"
                    : a[0] == '-' ? "unknown option"
                                  : "unexpected argument",
                    a);
            usage(stderr);
            return 2;
        }
    }
    if (!model) {
        usage(stderr);
        return 2;
    }

    char *input = NULL;
    size_t len = 0;
    if (prompt) {
        len = strlen(prompt);
    } else if (read_stdin(&input, &len)) {
        return 1;
    }
    int status = run(model, prompt ? prompt : input, len, special, decode);
    free(input);
    return status;
}
