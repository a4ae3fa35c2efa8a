#include "kvp_err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int kvp_err_set(kvp_err_t *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

int kvp_err_wrap(kvp_err_t *err, const char *fmt, ...) {
    if (!err) return KVP_EINVAL;
    char buf[2 * KVP_ERR_MSG_MAX + 2];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, KVP_ERR_MSG_MAX, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if (n >= KVP_ERR_MSG_MAX) n = KVP_ERR_MSG_MAX - 1;
    buf[n++] = ':';
    buf[n++] = ' ';
    memcpy(buf + n, err->msg, KVP_ERR_MSG_MAX);
    buf[n + KVP_ERR_MSG_MAX - 1] = 0;
    /* the message is cut at the end, where the least specific detail is */
    memcpy(err->msg, buf, KVP_ERR_MSG_MAX - 1);
    err->msg[KVP_ERR_MSG_MAX - 1] = 0;
    return err->code;
}

const char *kvp_err_name(int code) {
    switch (code) {
    case KVP_OK:
        return "ok";
    case KVP_EINVAL:
        return "invalid argument";
    case KVP_EIO:
        return "i/o error";
    case KVP_EFORMAT:
        return "format error";
    case KVP_ENOMEM:
        return "out of memory or over limit";
    case KVP_EUNSUPPORTED:
        return "unsupported";
    case KVP_ESHAPE:
        return "shape or model mismatch";
    case KVP_ERANGE:
        return "out of range";
    case KVP_ETIMEOUT:
        return "timed out";
    case KVP_EBUSY:
        return "busy";
    case KVP_EPEER:
        return "peer error";
    default:
        return "unknown error";
    }
}
