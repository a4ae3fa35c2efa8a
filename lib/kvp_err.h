/* kvp_err: error codes and messages shared by every kvpred module.
 *
 * Functions that can fail return 0 (KVP_OK) or a negative KVP_E* code, and
 * fill a caller-owned kvp_err_t with a one-line message that names what was
 * wrong (a file offset, a key, a field and both values). Passing NULL for the
 * kvp_err_t is allowed: the code is still returned. */
#ifndef KVP_ERR_H
#define KVP_ERR_H

#include <stddef.h>

enum {
    KVP_OK = 0,
    KVP_EINVAL = -1,       /* bad argument or setting */
    KVP_EIO = -2,          /* read/write/open failed */
    KVP_EFORMAT = -3,      /* malformed file or message */
    KVP_ENOMEM = -4,       /* allocation failed or a size exceeds a limit */
    KVP_EUNSUPPORTED = -5, /* well-formed but not supported (type, version, architecture) */
    KVP_ESHAPE = -6,       /* shape or model mismatch */
    KVP_ERANGE = -7,       /* index or position out of range */
    KVP_ETIMEOUT = -8,     /* a deadline passed / a peer went silent */
    KVP_EBUSY = -9,        /* no room: try again later */
    KVP_EPEER = -10,       /* the other side reported an error */
};

#define KVP_ERR_MSG_MAX 512

typedef struct kvp_err {
    int code;
    char msg[KVP_ERR_MSG_MAX];
} kvp_err_t;

/* Records code and a printf-style message in err (if not NULL); returns code so
 * that callers can write `return kvp_err_set(err, KVP_EIO, "...")`. */
int kvp_err_set(kvp_err_t *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prefixes the message already in err with more context ("loading X: ..."). */
int kvp_err_wrap(kvp_err_t *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A short name for a code ("format error", "out of memory", ...). */
const char *kvp_err_name(int code);

#endif
