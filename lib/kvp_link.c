/* kvp_link: handshake, liveness and clock offset between two stages over a
 * DEALER -> ROUTER connection. See kvp_link.h. */
#include "kvp_link.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvp_time.h"

#define LINK_MAX_PEERS 1024
#define LINK_IPC_PATH_MAX 107 /* sizeof sun_path - 1 */

/* ---------------------------------------------------------------- helpers */

void kvp_link_settings_init(kvp_link_settings_t *s) {
    memset(s, 0, sizeof *s);
    s->name = "";
    s->peer_name = "peer";
    s->ping_interval = 0.25;
    s->peer_timeout = 2.0;
    s->hello_mask = KVP_WIRE_HELLO_ALL;
}

int kvp_link_poll_ms(double deadline, double now) {
    if (!isfinite(deadline)) return -1;
    double ms = ceil((deadline - now) * 1e3);
    if (ms <= 0) return 0;
    if (ms > 3600e3) return 3600 * 1000;
    return (int)ms;
}

const char *kvp_link_state_name(kvp_link_state_t s) {
    switch (s) {
    case KVP_LINK_HANDSHAKE:
        return "handshake";
    case KVP_LINK_READY:
        return "ready";
    case KVP_LINK_REFUSED:
        return "refused";
    case KVP_LINK_DEAD:
        return "dead";
    }
    return "unknown";
}

/* Deep copy of a Hello through its own encoding: the caller's may point
 * into stack memory. */
static Kvpred__Hello *hello_copy(const Kvpred__Hello *h, kvp_err_t *err) {
    size_t n = kvpred__hello__get_packed_size(h);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) return NULL;
    kvpred__hello__pack(h, buf);
    Kvpred__Hello *c = kvpred__hello__unpack(NULL, n, buf);
    free(buf);
    if (!c) kvp_err_set(err, KVP_ENOMEM, "copying the Hello (%zu bytes)", n);
    return c;
}

/* The copied Hello with the defaults kvp_link.h promises; host points into
 * hostbuf when it was empty (and is put back before the copy is freed). */
static void hello_defaults(Kvpred__Hello *h, char *hostbuf, size_t cap, char **saved_host) {
    if (h->protocol_version == 0) h->protocol_version = KVP_WIRE_PROTOCOL_VERSION;
    *saved_host = NULL;
    if (!h->host || !h->host[0]) {
        if (gethostname(hostbuf, cap) != 0) snprintf(hostbuf, cap, "unknown");
        hostbuf[cap - 1] = 0;
        *saved_host = h->host;
        h->host = hostbuf;
    }
}

static int set_int(void *sock, int opt, int v, const char *name, kvp_err_t *err) {
    if (zmq_setsockopt(sock, opt, &v, sizeof v) == 0) return 0;
    return kvp_err_set(err, KVP_EIO, "zmq_setsockopt %s: %s", name, zmq_strerror(errno));
}

/* Options both sides share, before bind/connect (libzmq copies them into
 * each new connection). */
static int common_options(void *sock, const kvp_link_settings_t *s, int server, kvp_err_t *err) {
    int rc = set_int(sock, ZMQ_LINGER, 0, "ZMQ_LINGER", err);
    if (rc == 0 && s->max_frame_bytes > 0 &&
        zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &s->max_frame_bytes, sizeof s->max_frame_bytes) != 0)
        rc = kvp_err_set(err, KVP_EIO, "zmq_setsockopt ZMQ_MAXMSGSIZE: %s", zmq_strerror(errno));
    if (rc == 0 && s->curve) rc = kvp_link_curve_apply(sock, s->curve, server, err);
    return rc;
}

/* -------------------------------------------------------------- endpoints */

static int is_wildcard_host(const char *host, size_t len) {
    static const char *any[] = {"*", "0.0.0.0", "[::]", "[*]", "::", "[0:0:0:0:0:0:0:0]"};
    for (size_t i = 0; i < sizeof any / sizeof any[0]; i++)
        if (strlen(any[i]) == len && memcmp(host, any[i], len) == 0) return 1;
    return 0;
}

static int check_tcp(const char *ep, const char *rest, int bind, int allow_any, kvp_err_t *err) {
    const char *colon = strrchr(rest, ':');
    if (!colon) return kvp_err_set(err, KVP_EINVAL, "endpoint %s: no port (tcp://host:port)", ep);
    size_t host_len = (size_t)(colon - rest);
    const char *port = colon + 1;
    if (host_len == 0)
        return kvp_err_set(err, KVP_EINVAL, "endpoint %s: no host (tcp://host:port; %s)", ep,
                           bind ? "127.0.0.1 for loopback" : "e.g. 127.0.0.1");
    if (strchr(rest, ';') || memchr(rest, ' ', host_len))
        return kvp_err_set(err, KVP_EINVAL, "endpoint %s: unexpected ';' or space in the address",
                           ep);
    if (rest[0] == '[' && rest[host_len - 1] != ']')
        return kvp_err_set(err, KVP_EINVAL, "endpoint %s: IPv6 address without its closing ']'",
                           ep);
    if (strcmp(port, "*") == 0 || strcmp(port, "0") == 0) {
        if (!bind)
            return kvp_err_set(err, KVP_EINVAL,
                               "endpoint %s: port %s (ephemeral) is for binding only", ep, port);
    } else {
        char *end;
        errno = 0;
        long p = strtol(port, &end, 10);
        if (!*port || *end || errno || p < 1 || p > 65535)
            return kvp_err_set(err, KVP_EINVAL, "endpoint %s: port '%s' is not 1..65535%s", ep,
                               port, bind ? " or *" : "");
    }
    int wild = is_wildcard_host(rest, host_len);
    if (wild && !bind)
        return kvp_err_set(err, KVP_EINVAL, "endpoint %s: cannot connect to a wildcard address",
                           ep);
    if (wild && !allow_any)
        return kvp_err_set(err, KVP_EINVAL,
                           "endpoint %s: binds every network interface; bind %s (or a specific "
                           "address), or allow it explicitly (--bind-any)",
                           ep, KVP_LINK_DEFAULT_HOST);
    return 0;
}

int kvp_link_endpoint_check(const char *endpoint, int bind, int allow_any, kvp_err_t *err) {
    if (!endpoint || !*endpoint) return kvp_err_set(err, KVP_EINVAL, "endpoint: empty");
    if (strncmp(endpoint, "tcp://", 6) == 0)
        return check_tcp(endpoint, endpoint + 6, bind, allow_any, err);
    if (strncmp(endpoint, "ipc://", 6) == 0) {
        const char *path = endpoint + 6;
        if (!*path)
            return kvp_err_set(err, KVP_EINVAL, "endpoint %s: no path (ipc://path)", endpoint);
        if (strcmp(path, "*") == 0 && !bind)
            return kvp_err_set(err, KVP_EINVAL, "endpoint %s: ipc://* is for binding only",
                               endpoint);
        if (strlen(path) > LINK_IPC_PATH_MAX)
            return kvp_err_set(err, KVP_EINVAL,
                               "endpoint %s: path of %zu bytes, over the %d a unix socket allows",
                               endpoint, strlen(path), LINK_IPC_PATH_MAX);
        return 0;
    }
    if (strncmp(endpoint, "inproc://", 9) == 0) {
        if (!endpoint[9])
            return kvp_err_set(err, KVP_EINVAL, "endpoint %s: no name (inproc://name)", endpoint);
        return 0;
    }
    return kvp_err_set(err, KVP_EINVAL,
                       "endpoint '%s': unknown transport (tcp://host:port, ipc://path or "
                       "inproc://name)",
                       endpoint);
}

/* --------------------------------------------------------------- CurveZMQ */

static int write_key(const char *path, const char *key, mode_t mode, kvp_err_t *err) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);
    if (fd < 0) return kvp_err_set(err, KVP_EIO, "key file %s: %s", path, strerror(errno));
    fchmod(fd, mode); /* also when the file existed with wider permissions */
    char line[42];
    memcpy(line, key, 40);
    line[40] = '\n';
    ssize_t n = write(fd, line, 41);
    int ok = n == 41;
    if (close(fd) != 0) ok = 0;
    if (!ok) return kvp_err_set(err, KVP_EIO, "key file %s: write failed", path);
    return 0;
}

int kvp_link_curve_keygen(const char *public_path, const char *secret_path, kvp_err_t *err) {
    char pub[41], sec[41];
    if (zmq_curve_keypair(pub, sec) != 0)
        return kvp_err_set(err, KVP_EUNSUPPORTED, "zmq_curve_keypair: %s (libzmq without CURVE?)",
                           zmq_strerror(errno));
    int rc = write_key(secret_path, sec, 0600, err);
    if (rc == 0) rc = write_key(public_path, pub, 0644, err);
    memset(sec, 0, sizeof sec);
    return rc;
}

int kvp_link_curve_read_key(const char *path, char key[41], kvp_err_t *err) {
    FILE *f = fopen(path, "r");
    if (!f) return kvp_err_set(err, KVP_EIO, "key file %s: %s", path, strerror(errno));
    char line[256];
    int rc = kvp_err_set(err, KVP_EFORMAT, "key file %s: no key in it", path);
    while (fgets(line, sizeof line, f)) {
        size_t n = strlen(line);
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' ' ||
                     line[n - 1] == '\t'))
            line[--n] = 0;
        const char *s = line;
        while (*s == ' ' || *s == '\t')
            s++, n--;
        if (n == 0 || *s == '#') continue;
        uint8_t bin[32];
        if (n != 40 || !zmq_z85_decode(bin, s)) {
            rc = kvp_err_set(err, KVP_EFORMAT,
                             "key file %s: key is %zu characters, expected 40 of z85", path, n);
        } else {
            memcpy(key, s, 41);
            rc = 0;
        }
        memset(bin, 0, sizeof bin);
        break;
    }
    memset(line, 0, sizeof line);
    fclose(f);
    return rc;
}

int kvp_link_curve_load_server(kvp_link_curve_t *c, const char *public_path,
                               const char *secret_path, kvp_err_t *err) {
    memset(c, 0, sizeof *c);
    int rc = kvp_link_curve_read_key(public_path, c->public_key, err);
    if (rc == 0) rc = kvp_link_curve_read_key(secret_path, c->secret_key, err);
    c->enabled = rc == 0;
    return rc;
}

int kvp_link_curve_load_client(kvp_link_curve_t *c, const char *server_public_path,
                               const char *public_path, const char *secret_path, kvp_err_t *err) {
    memset(c, 0, sizeof *c);
    int rc = kvp_link_curve_read_key(server_public_path, c->server_key, err);
    if (rc < 0) return rc;
    if (public_path || secret_path) {
        if (!public_path || !secret_path)
            return kvp_err_set(err, KVP_EINVAL, "curve client: give both key files or neither");
        rc = kvp_link_curve_read_key(public_path, c->public_key, err);
        if (rc == 0) rc = kvp_link_curve_read_key(secret_path, c->secret_key, err);
    } else if (zmq_curve_keypair(c->public_key, c->secret_key) != 0) {
        rc = kvp_err_set(err, KVP_EUNSUPPORTED, "zmq_curve_keypair: %s", zmq_strerror(errno));
    }
    c->enabled = rc == 0;
    return rc;
}

int kvp_link_curve_apply(void *sock, const kvp_link_curve_t *c, int server, kvp_err_t *err) {
    if (!c || !c->enabled) return 0;
    if (!zmq_has("curve"))
        return kvp_err_set(err, KVP_EUNSUPPORTED, "CurveZMQ: this libzmq was built without it");
    int rc = 0;
    if (server) {
        rc = set_int(sock, ZMQ_CURVE_SERVER, 1, "ZMQ_CURVE_SERVER", err);
        if (rc == 0 && zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, c->secret_key, 40) != 0)
            rc =
                kvp_err_set(err, KVP_EINVAL, "CurveZMQ server secret key: %s", zmq_strerror(errno));
        return rc;
    }
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, c->server_key, 40) != 0)
        return kvp_err_set(err, KVP_EINVAL, "CurveZMQ server key: %s", zmq_strerror(errno));
    if (zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, c->public_key, 40) != 0)
        return kvp_err_set(err, KVP_EINVAL, "CurveZMQ client public key: %s", zmq_strerror(errno));
    if (zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, c->secret_key, 40) != 0)
        return kvp_err_set(err, KVP_EINVAL, "CurveZMQ client secret key: %s", zmq_strerror(errno));
    return 0;
}

/* ------------------------------------------------------ connecting side */

typedef struct clock_sample {
    int64_t offset_ns, rtt_ns;
} clock_sample_t;

struct kvp_link_dealer {
    void *sock;
    char endpoint[256];
    char name[64], peer_name[64];
    double ping_interval, peer_timeout;
    Kvpred__Hello *hello; /* ours, owned (hello_copy) */
    char hostbuf[256];
    char *saved_host;

    kvp_link_state_t state;
    double hs_start;   /* when the current handshake attempt began */
    int hs_reported;   /* its timeout was reported */
    double next_hello; /* when to (re)send Hello */
    double next_ping;  /* READY: when to ping */
    double last_rx;    /* last message from the peer */
    unsigned epoch;
    char peer_host[128];

    clock_sample_t samples[KVP_LINK_CLOCK_WINDOW];
    size_t n_samples, next_sample;
};

static int dealer_send_hello(kvp_link_dealer_t *d, double now) {
    Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
    env.body_case = KVPRED__ENVELOPE__BODY_HELLO;
    env.hello = d->hello;
    d->hello->wall_ns = kvp_wall_ns();
    kvp_err_t e;
    int rc = kvp_wire_send(d->sock, &env, NULL, 0, &e);
    /* Not connected yet (ZMQ_IMMEDIATE): try again soon, a failed send
     * costs nothing. Sent: a live peer answers well within peer_timeout;
     * resend after that, in case the connection was replaced underneath. */
    double retry = d->ping_interval < 0.05 ? d->ping_interval : 0.05;
    d->next_hello = now + (rc == 0 ? d->peer_timeout : retry);
    return rc;
}

static void dealer_restart_handshake(kvp_link_dealer_t *d, kvp_link_state_t state, double now) {
    d->state = state;
    d->hs_start = now;
    d->hs_reported = state == KVP_LINK_DEAD; /* a death was already reported */
    d->next_hello = now;
}

int kvp_link_dealer_new(kvp_link_dealer_t **out, void *zmq_ctx, const char *endpoint,
                        const Kvpred__Hello *hello, const kvp_link_settings_t *s, double now,
                        kvp_err_t *err) {
    *out = NULL;
    kvp_link_settings_t defaults;
    if (!s) {
        kvp_link_settings_init(&defaults);
        s = &defaults;
    }
    int rc = kvp_link_endpoint_check(endpoint, 0, 0, err);
    if (rc < 0) return rc;
    if (strlen(endpoint) >= 256)
        return kvp_err_set(err, KVP_EINVAL, "endpoint %.40s...: too long", endpoint);
    if (!(s->ping_interval > 0) || !(s->peer_timeout > s->ping_interval))
        return kvp_err_set(err, KVP_EINVAL,
                           "link settings: ping_interval %.3f s must be > 0 and below "
                           "peer_timeout %.3f s",
                           s->ping_interval, s->peer_timeout);
    kvp_link_dealer_t *d = calloc(1, sizeof *d);
    if (!d) return kvp_err_set(err, KVP_ENOMEM, "link to %s", endpoint);
    snprintf(d->endpoint, sizeof d->endpoint, "%s", endpoint);
    snprintf(d->name, sizeof d->name, "%s", s->name ? s->name : "");
    snprintf(d->peer_name, sizeof d->peer_name, "%s",
             s->peer_name && *s->peer_name ? s->peer_name : "peer");
    d->ping_interval = s->ping_interval;
    d->peer_timeout = s->peer_timeout;
    d->hello = hello_copy(hello, err);
    if (!d->hello) {
        free(d);
        return KVP_ENOMEM;
    }
    hello_defaults(d->hello, d->hostbuf, sizeof d->hostbuf, &d->saved_host);
    d->sock = zmq_socket(zmq_ctx, ZMQ_DEALER);
    if (!d->sock) {
        rc = kvp_err_set(err, KVP_EIO, "zmq_socket DEALER: %s", zmq_strerror(errno));
        goto fail;
    }
    rc = common_options(d->sock, s, 0, err);
    if (rc == 0) rc = set_int(d->sock, ZMQ_IMMEDIATE, 1, "ZMQ_IMMEDIATE", err);
    if (rc < 0) goto fail;
    if (zmq_connect(d->sock, endpoint) != 0) {
        rc = kvp_err_set(err, KVP_EIO, "connect %s: %s", endpoint, zmq_strerror(errno));
        goto fail;
    }
    dealer_restart_handshake(d, KVP_LINK_HANDSHAKE, now);
    dealer_send_hello(d, now);
    *out = d;
    return 0;
fail:
    kvp_link_dealer_free(&d);
    return rc;
}

void kvp_link_dealer_free(kvp_link_dealer_t **pd) {
    kvp_link_dealer_t *d = *pd;
    if (!d) return;
    if (d->sock) zmq_close(d->sock);
    if (d->hello) {
        if (d->hello->host == d->hostbuf) d->hello->host = d->saved_host;
        kvpred__hello__free_unpacked(d->hello, NULL);
    }
    free(d);
    *pd = NULL;
}

void *kvp_link_dealer_socket(const kvp_link_dealer_t *d) {
    return d->sock;
}
const char *kvp_link_dealer_endpoint(const kvp_link_dealer_t *d) {
    return d->endpoint;
}
kvp_link_state_t kvp_link_dealer_state(const kvp_link_dealer_t *d) {
    return d->state;
}
const char *kvp_link_dealer_peer_host(const kvp_link_dealer_t *d) {
    return d->peer_host;
}
unsigned kvp_link_dealer_epoch(const kvp_link_dealer_t *d) {
    return d->epoch;
}

/* NTP-style estimate from one Ping/Pong: t0 our send, t1 peer receipt, t2
 * peer reply, t3 our receipt (wall clocks). The round trip less the peer's
 * holding time is rtt = (t3 - t0) - (t2 - t1); if the two one-way delays were
 * equal, the peer's clock minus ours would be offset = ((t1 - t0) + (t2 -
 * t3)) / 2. They need not be equal: each lies in [0, rtt], so the true offset
 * is within offset +- rtt / 2. Queueing only ever adds delay, so the sample
 * with the smallest rtt in a sliding window carries the tightest bound, and
 * its offset is the one reported (residual error <= its rtt / 2). */
static void dealer_clock_sample(kvp_link_dealer_t *d, const Kvpred__Pong *p, int64_t t3) {
    int64_t rtt = (t3 - p->t0_ns) - (p->t2_ns - p->t1_ns);
    if (p->t0_ns <= 0 || rtt < 0) return; /* not ours, or the wall clock stepped */
    clock_sample_t s = {((p->t1_ns - p->t0_ns) + (p->t2_ns - t3)) / 2, rtt};
    d->samples[d->next_sample] = s;
    d->next_sample = (d->next_sample + 1) % KVP_LINK_CLOCK_WINDOW;
    if (d->n_samples < KVP_LINK_CLOCK_WINDOW) d->n_samples++;
}

int kvp_link_dealer_clock(const kvp_link_dealer_t *d, int64_t *offset_ns, int64_t *rtt_ns) {
    if (d->n_samples == 0) return KVP_EBUSY;
    const clock_sample_t *best = &d->samples[0];
    for (size_t i = 1; i < d->n_samples; i++)
        if (d->samples[i].rtt_ns < best->rtt_ns) best = &d->samples[i];
    if (offset_ns) *offset_ns = best->offset_ns;
    if (rtt_ns) *rtt_ns = best->rtt_ns;
    return 0;
}

int kvp_link_dealer_handle(kvp_link_dealer_t *d, const kvp_wire_msg_t *m, double now,
                           kvp_err_t *err) {
    const Kvpred__Envelope *env = m->env;
    if (!env) return kvp_err_set(err, KVP_EINVAL, "link handle: message without an envelope");
    d->last_rx = now; /* any message shows the peer alive */
    switch (env->body_case) {
    case KVPRED__ENVELOPE__BODY_HELLO_REPLY: {
        const Kvpred__HelloReply *r = env->hello_reply;
        if (r->ok) {
            if (d->state != KVP_LINK_READY) {
                d->state = KVP_LINK_READY;
                d->epoch++;
                d->next_ping = now; /* a first clock sample at once */
                d->n_samples = d->next_sample = 0;
                snprintf(d->peer_host, sizeof d->peer_host, "%s", r->host ? r->host : "");
            }
            return KVP_LINK_CONSUMED;
        }
        d->state = KVP_LINK_REFUSED;
        d->next_hello = now + d->peer_timeout;
        /* The reply's ours/theirs are the peer's view: swap them. */
        return kvp_err_set(err, KVP_EPEER,
                           "handshake refused by %s at %s: %s differs (ours %s, theirs %s)%s%s",
                           d->peer_name, d->endpoint, r->field, r->theirs, r->ours,
                           r->message && *r->message ? "; " : "", r->message ? r->message : "");
    }
    case KVPRED__ENVELOPE__BODY_PONG:
        if (d->state == KVP_LINK_READY) dealer_clock_sample(d, env->pong, m->rx_wall_ns);
        return KVP_LINK_CONSUMED;
    case KVPRED__ENVELOPE__BODY_PING: {
        Kvpred__Envelope out = KVPRED__ENVELOPE__INIT;
        Kvpred__Pong pong = KVPRED__PONG__INIT;
        pong.t0_ns = env->ping->t0_ns;
        pong.t1_ns = m->rx_wall_ns;
        pong.t2_ns = kvp_wall_ns();
        out.body_case = KVPRED__ENVELOPE__BODY_PONG;
        out.pong = &pong;
        kvp_wire_send(d->sock, &out, NULL, 0, NULL);
        return KVP_LINK_CONSUMED;
    }
    case KVPRED__ENVELOPE__BODY_HELLO:
        return KVP_LINK_CONSUMED; /* the connecting side does not answer Hellos */
    case KVPRED__ENVELOPE__BODY_ERROR: {
        const Kvpred__Error *e = env->error;
        size_t n = strlen(KVP_WIRE_NO_HANDSHAKE);
        if (!e->message || strncmp(e->message, KVP_WIRE_NO_HANDSHAKE, n) != 0) return KVP_LINK_APP;
        int was_ready = d->state == KVP_LINK_READY;
        if (was_ready || d->state == KVP_LINK_DEAD) {
            dealer_restart_handshake(d, KVP_LINK_HANDSHAKE, now);
            dealer_send_hello(d, now);
        }
        if (e->request_id && *e->request_id) return KVP_LINK_APP;
        if (!was_ready) return KVP_LINK_CONSUMED;
        return kvp_err_set(err, KVP_EPEER,
                           "%s at %s lost our handshake (restarted, or declared us dead): its "
                           "requests in flight are gone; handshaking again",
                           d->peer_name, d->endpoint);
    }
    default:
        return KVP_LINK_APP;
    }
}

int kvp_link_dealer_tick(kvp_link_dealer_t *d, double now, kvp_err_t *err) {
    if (d->state == KVP_LINK_READY) {
        if (now - d->last_rx > d->peer_timeout) {
            double silent = now - d->last_rx;
            dealer_restart_handshake(d, KVP_LINK_DEAD, now);
            dealer_send_hello(d, now);
            return kvp_err_set(err, KVP_ETIMEOUT,
                               "%s at %s: silent for %.2f s (timeout %.2f s), declared dead; "
                               "retrying the handshake",
                               d->peer_name, d->endpoint, silent, d->peer_timeout);
        }
        if (now >= d->next_ping) {
            Kvpred__Envelope env = KVPRED__ENVELOPE__INIT;
            Kvpred__Ping ping = KVPRED__PING__INIT;
            ping.t0_ns = kvp_wall_ns();
            env.body_case = KVPRED__ENVELOPE__BODY_PING;
            env.ping = &ping;
            kvp_wire_send(d->sock, &env, NULL, 0, NULL); /* a lost Ping shows as silence */
            d->next_ping = now + d->ping_interval;
        }
        return 0;
    }
    if (now >= d->next_hello) dealer_send_hello(d, now);
    if (d->state == KVP_LINK_HANDSHAKE && !d->hs_reported && now - d->hs_start > d->peer_timeout) {
        d->hs_reported = 1;
        d->state = KVP_LINK_DEAD;
        return kvp_err_set(err, KVP_ETIMEOUT,
                           "%s at %s: no HelloReply within %.2f s (peer down, or CurveZMQ keys "
                           "not matching); retrying the handshake",
                           d->peer_name, d->endpoint, d->peer_timeout);
    }
    return 0;
}

double kvp_link_dealer_deadline(const kvp_link_dealer_t *d) {
    if (d->state == KVP_LINK_READY) {
        double dead = d->last_rx + d->peer_timeout;
        /* strictly past the timeout, as tick tests it */
        dead += 1e-3;
        return d->next_ping < dead ? d->next_ping : dead;
    }
    double t = d->next_hello;
    if (d->state == KVP_LINK_HANDSHAKE && !d->hs_reported) {
        double dead = d->hs_start + d->peer_timeout + 1e-3;
        if (dead < t) t = dead;
    }
    return t;
}

/* ----------------------------------------------------------- bound side */

typedef struct link_peer {
    kvp_wire_id_t id;
    double last_rx;
    char role[32];
    char host[96];
} link_peer_t;

struct kvp_link_router {
    void *sock;
    char endpoint[256];
    char name[64];
    double peer_timeout;
    unsigned hello_mask;
    Kvpred__Hello *ours;
    char hostbuf[256];
    char *saved_host;
    link_peer_t *peers;
    size_t n_peers, cap_peers;
};

static link_peer_t *router_find(const kvp_link_router_t *r, const kvp_wire_id_t *id) {
    for (size_t i = 0; i < r->n_peers; i++)
        if (r->peers[i].id.len == id->len && memcmp(r->peers[i].id.bytes, id->bytes, id->len) == 0)
            return &r->peers[i];
    return NULL;
}

static void router_remove(kvp_link_router_t *r, link_peer_t *p) {
    size_t i = (size_t)(p - r->peers);
    r->peers[i] = r->peers[--r->n_peers];
}

static const char *peer_label(const kvp_wire_id_t *id, const link_peer_t *p, char *buf,
                              size_t cap) {
    int n = 0;
    if (p)
        n = snprintf(buf, cap, "%s on %s ", p->role[0] ? p->role : "peer", p->host);
    else
        n = snprintf(buf, cap, "peer ");
    if (n < 0 || (size_t)n >= cap) return buf;
    size_t len = (size_t)n;
    len += (size_t)snprintf(buf + len, cap - len, "(id ");
    for (size_t i = 0; i < id->len && len + 4 < cap; i++)
        len += (size_t)snprintf(buf + len, cap - len, "%02x", id->bytes[i]);
    if (len + 2 < cap) snprintf(buf + len, cap - len, ")");
    return buf;
}

int kvp_link_router_new(kvp_link_router_t **out, void *zmq_ctx, const char *endpoint,
                        const Kvpred__Hello *ours, const kvp_link_settings_t *s, kvp_err_t *err) {
    *out = NULL;
    kvp_link_settings_t defaults;
    if (!s) {
        kvp_link_settings_init(&defaults);
        s = &defaults;
    }
    int rc = kvp_link_endpoint_check(endpoint, 1, s->bind_any, err);
    if (rc < 0) return rc;
    if (!(s->peer_timeout > 0))
        return kvp_err_set(err, KVP_EINVAL, "link settings: peer_timeout %.3f s must be > 0",
                           s->peer_timeout);
    kvp_link_router_t *r = calloc(1, sizeof *r);
    if (!r) return kvp_err_set(err, KVP_ENOMEM, "link on %s", endpoint);
    snprintf(r->name, sizeof r->name, "%s", s->name ? s->name : "");
    r->peer_timeout = s->peer_timeout;
    r->hello_mask = s->hello_mask;
    r->ours = hello_copy(ours, err);
    if (!r->ours) {
        free(r);
        return KVP_ENOMEM;
    }
    hello_defaults(r->ours, r->hostbuf, sizeof r->hostbuf, &r->saved_host);
    r->sock = zmq_socket(zmq_ctx, ZMQ_ROUTER);
    if (!r->sock) {
        rc = kvp_err_set(err, KVP_EIO, "zmq_socket ROUTER: %s", zmq_strerror(errno));
        goto fail;
    }
    rc = common_options(r->sock, s, 1, err);
    if (rc == 0) rc = set_int(r->sock, ZMQ_ROUTER_MANDATORY, 1, "ZMQ_ROUTER_MANDATORY", err);
    if (rc < 0) goto fail;
    if (zmq_bind(r->sock, endpoint) != 0) {
        rc = kvp_err_set(err, KVP_EIO, "bind %s: %s", endpoint, zmq_strerror(errno));
        goto fail;
    }
    size_t len = sizeof r->endpoint;
    if (zmq_getsockopt(r->sock, ZMQ_LAST_ENDPOINT, r->endpoint, &len) != 0 || !r->endpoint[0])
        snprintf(r->endpoint, sizeof r->endpoint, "%s", endpoint);
    *out = r;
    return 0;
fail:
    kvp_link_router_free(&r);
    return rc;
}

void kvp_link_router_free(kvp_link_router_t **pr) {
    kvp_link_router_t *r = *pr;
    if (!r) return;
    if (r->sock) zmq_close(r->sock);
    if (r->ours) {
        if (r->ours->host == r->hostbuf) r->ours->host = r->saved_host;
        kvpred__hello__free_unpacked(r->ours, NULL);
    }
    free(r->peers);
    free(r);
    *pr = NULL;
}

void *kvp_link_router_socket(const kvp_link_router_t *r) {
    return r->sock;
}
const char *kvp_link_router_endpoint(const kvp_link_router_t *r) {
    return r->endpoint;
}
size_t kvp_link_router_n_peers(const kvp_link_router_t *r) {
    return r->n_peers;
}
int kvp_link_router_peer_ready(const kvp_link_router_t *r, const kvp_wire_id_t *id) {
    return router_find(r, id) != NULL;
}

static int router_reply(kvp_link_router_t *r, const kvp_wire_id_t *to, Kvpred__Envelope *env,
                        kvp_err_t *err) {
    int rc = kvp_wire_send_to(r->sock, to, env, NULL, 0, err);
    if (rc < 0) kvp_err_wrap(err, "%s link on %s", r->name, r->endpoint);
    return rc;
}

/* Answers a Hello: adds the peer when every field in the mask agrees, else
 * refuses naming the first differing field with both values. */
static int router_hello(kvp_link_router_t *r, const kvp_wire_msg_t *m, double now, kvp_err_t *err) {
    const Kvpred__Hello *h = m->env->hello;
    kvp_wire_hello_diff_t diff;
    Kvpred__Envelope out = KVPRED__ENVELOPE__INIT;
    Kvpred__HelloReply reply = KVPRED__HELLO_REPLY__INIT;
    out.body_case = KVPRED__ENVELOPE__BODY_HELLO_REPLY;
    out.hello_reply = &reply;
    reply.wall_ns = kvp_wall_ns();
    reply.host = r->ours->host;
    link_peer_t *p = router_find(r, &m->from);
    int differs = kvp_wire_hello_compare(r->ours, h, r->hello_mask, &diff);
    if (!differs && !p && r->n_peers >= LINK_MAX_PEERS) {
        differs = 1;
        snprintf(diff.field, sizeof diff.field, "peers");
        snprintf(diff.ours, sizeof diff.ours, "%d (the most this link takes)", LINK_MAX_PEERS);
        snprintf(diff.theirs, sizeof diff.theirs, "one more");
    }
    if (differs) {
        char msg[KVP_ERR_MSG_MAX], label[160];
        snprintf(msg, sizeof msg, "%s differs (ours %s, theirs %s)", diff.field, diff.ours,
                 diff.theirs);
        reply.ok = 0;
        reply.field = diff.field;
        reply.ours = diff.ours;
        reply.theirs = diff.theirs;
        reply.message = msg;
        if (p) router_remove(r, p);
        kvp_wire_id_t id = m->from;
        int rc = router_reply(r, &id, &out, err);
        if (rc < 0) return rc;
        link_peer_t tmp = {.id = m->from};
        snprintf(tmp.role, sizeof tmp.role, "%s", h->role ? h->role : "");
        snprintf(tmp.host, sizeof tmp.host, "%s", h->host ? h->host : "");
        return kvp_err_set(err, KVP_EPEER, "%s refused handshake from %s: %s",
                           r->name[0] ? r->name : "link",
                           peer_label(&id, &tmp, label, sizeof label), msg);
    }
    if (!p) {
        if (r->n_peers == r->cap_peers) {
            size_t cap = r->cap_peers ? 2 * r->cap_peers : 4;
            link_peer_t *np = realloc(r->peers, cap * sizeof *np);
            if (!np) return kvp_err_set(err, KVP_ENOMEM, "link peers: %zu", cap);
            r->peers = np;
            r->cap_peers = cap;
        }
        p = &r->peers[r->n_peers++];
        memset(p, 0, sizeof *p);
        p->id = m->from;
    }
    p->last_rx = now;
    snprintf(p->role, sizeof p->role, "%s", h->role ? h->role : "");
    snprintf(p->host, sizeof p->host, "%s", h->host ? h->host : "");
    reply.ok = 1;
    int rc = router_reply(r, &m->from, &out, err);
    return rc < 0 ? rc : KVP_LINK_CONSUMED;
}

int kvp_link_router_handle(kvp_link_router_t *r, const kvp_wire_msg_t *m, double now,
                           kvp_err_t *err) {
    const Kvpred__Envelope *env = m->env;
    if (!env || m->from.len == 0)
        return kvp_err_set(err, KVP_EINVAL, "link handle: message without envelope or routing id");
    if (env->body_case == KVPRED__ENVELOPE__BODY_HELLO) return router_hello(r, m, now, err);
    link_peer_t *p = router_find(r, &m->from);
    if (p) p->last_rx = now;
    switch (env->body_case) {
    case KVPRED__ENVELOPE__BODY_HELLO_REPLY:
    case KVPRED__ENVELOPE__BODY_PONG:
        return KVP_LINK_CONSUMED; /* the bound side neither greets nor pings */
    case KVPRED__ENVELOPE__BODY_PING:
        if (p) {
            Kvpred__Envelope out = KVPRED__ENVELOPE__INIT;
            Kvpred__Pong pong = KVPRED__PONG__INIT;
            pong.t0_ns = env->ping->t0_ns;
            pong.t1_ns = m->rx_wall_ns;
            pong.t2_ns = kvp_wall_ns();
            out.body_case = KVPRED__ENVELOPE__BODY_PONG;
            out.pong = &pong;
            int rc = router_reply(r, &m->from, &out, err);
            return rc < 0 ? rc : KVP_LINK_CONSUMED;
        }
        break;
    default:
        if (p) return KVP_LINK_APP;
        break;
    }
    /* A peer without a handshake: never seen, refused, or declared dead. */
    char msg[160], label[160];
    const char *body = kvp_wire_body_name(env->body_case);
    snprintf(msg, sizeof msg, "%s: %s from a peer that has not completed the Hello handshake",
             KVP_WIRE_NO_HANDSHAKE, body);
    int rc = kvp_wire_send_error(r->sock, &m->from, kvp_wire_request_id(env), KVP_EPEER, r->name,
                                 msg, err);
    if (rc < 0) {
        kvp_err_wrap(err, "%s link on %s", r->name, r->endpoint);
        return rc;
    }
    if (env->body_case == KVPRED__ENVELOPE__BODY_PING) return KVP_LINK_CONSUMED;
    return kvp_err_set(err, KVP_EPEER, "%s refused %s from %s: no handshake",
                       r->name[0] ? r->name : "link", body,
                       peer_label(&m->from, NULL, label, sizeof label));
}

int kvp_link_router_tick(kvp_link_router_t *r, double now, kvp_wire_id_t *dead, kvp_err_t *err) {
    for (size_t i = 0; i < r->n_peers; i++) {
        link_peer_t *p = &r->peers[i];
        double silent = now - p->last_rx;
        if (silent <= r->peer_timeout) continue;
        char label[160];
        kvp_err_set(err, KVP_ETIMEOUT, "%s: %s silent for %.2f s (timeout %.2f s), declared dead",
                    r->name[0] ? r->name : "link", peer_label(&p->id, p, label, sizeof label),
                    silent, r->peer_timeout);
        if (dead) *dead = p->id;
        router_remove(r, p);
        return 1;
    }
    return 0;
}

double kvp_link_router_deadline(const kvp_link_router_t *r) {
    double t = INFINITY;
    for (size_t i = 0; i < r->n_peers; i++)
        if (r->peers[i].last_rx + r->peer_timeout < t) t = r->peers[i].last_rx + r->peer_timeout;
    return isfinite(t) ? t + 1e-3 : t;
}
