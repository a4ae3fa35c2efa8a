/* kvp_link: the connection between two pipeline stages, for a zmq_poll loop.
 *
 * Each link has a bound side (a ROUTER: kvp_link_router) and a connecting
 * side (a DEALER: kvp_link_dealer). The link owns its socket; the caller
 * polls it, receives with kvp_wire_recv / kvp_wire_recv_from, hands every
 * message to *_handle (which consumes the link's own messages: Hello,
 * HelloReply, Ping, Pong) and calls *_tick each time round the loop (pings,
 * timeouts). *_deadline gives the time the next tick is due, for the poll
 * timeout (kvp_link_poll_ms). Nothing here blocks or starts a thread.
 *
 * The connecting side sends Hello at start; the bound side compares it with
 * its own Hello (kvp_wire_hello_compare) and answers HelloReply ok or refused
 * naming the first differing field. Then the connecting side pings every
 * ping_interval; the Pongs give the round-trip time and the peer's clock
 * offset. Either side declares a peer that stays silent past peer_timeout
 * dead; the connecting side then keeps retrying the handshake (libzmq
 * reconnects the transport by itself).
 *
 * Times: `now` is kvp_now() (monotonic seconds); clock samples use
 * kvp_wall_ns() (the clocks being compared). */
#ifndef KVP_LINK_H
#define KVP_LINK_H

#include <stdint.h>

#include "kvp_err.h"
#include "kvp_wire.h"

#define KVP_LINK_DEFAULT_HOST "127.0.0.1"

/* Samples the clock estimate looks back over (4 s at the default interval). */
#define KVP_LINK_CLOCK_WINDOW 16

/* ---- endpoints ---- */

/* Checks "tcp://host:port", "ipc://path" or "inproc://name" and says what is
 * wrong with it. For binding (bind != 0), an ephemeral port ("*") and a
 * random ipc path (a "*" path) are allowed, and a tcp wildcard address
 * ("*", 0.0.0.0, [::]) is refused unless allow_any: services listen on
 * loopback unless told otherwise (--bind-any). Returns 0 or KVP_EINVAL. */
int kvp_link_endpoint_check(const char *endpoint, int bind, int allow_any, kvp_err_t *err);

/* ---- CurveZMQ ---- */

/* Keys as 40-character z85 text. The server authenticates itself to clients
 * holding its public key and the traffic is encrypted; clients are not
 * authorised by key (that would need a ZAP handler). */
typedef struct kvp_link_curve {
    int enabled;
    char public_key[41]; /* this socket's long-term keypair */
    char secret_key[41];
    char server_key[41]; /* connecting side: the server's public key */
} kvp_link_curve_t;

/* Writes a new keypair (zmq_curve_keypair) as z85 text files, the secret one
 * readable by its owner only. */
int kvp_link_curve_keygen(const char *public_path, const char *secret_path, kvp_err_t *err);

/* Reads a key file: the first line that is not empty or a '#' comment, which
 * must be 40 z85 characters. */
int kvp_link_curve_read_key(const char *path, char key[41], kvp_err_t *err);

/* Bound side: its own keypair. */
int kvp_link_curve_load_server(kvp_link_curve_t *c, const char *public_path,
                               const char *secret_path, kvp_err_t *err);

/* Connecting side: the server's public key, and its own keypair from files
 * or, when both paths are NULL, a fresh one. */
int kvp_link_curve_load_client(kvp_link_curve_t *c, const char *server_public_path,
                               const char *public_path, const char *secret_path, kvp_err_t *err);

/* Sets the socket's CURVE options (server != 0: as server); before bind or
 * connect. A disabled c leaves the socket plaintext. */
int kvp_link_curve_apply(void *sock, const kvp_link_curve_t *c, int server, kvp_err_t *err);

/* ---- settings ---- */

typedef struct kvp_link_settings {
    const char *name;              /* this stage ("predictor"): Error.stage, messages */
    const char *peer_name;         /* dealer: the stage it connects to ("decoder") */
    double ping_interval;          /* seconds between Pings (default 0.25) */
    double peer_timeout;           /* seconds of silence before a peer is dead (default 2) */
    unsigned hello_mask;           /* router: Hello fields that must agree (default all) */
    int bind_any;                  /* router: allow binding a wildcard ("*", 0.0.0.0) */
    int64_t max_frame_bytes;       /* ZMQ_MAXMSGSIZE: libzmq drops the connection of a peer
                                      sending a bigger frame, before allocating it; 0: none */
    const kvp_link_curve_t *curve; /* NULL or disabled: plaintext */
} kvp_link_settings_t;

void kvp_link_settings_init(kvp_link_settings_t *s);

/* What *_handle returns for a message that is the caller's (negative values
 * are errors: the message was the link's, and err says what happened). */
enum { KVP_LINK_APP = 0, KVP_LINK_CONSUMED = 1 };

/* Milliseconds to pass zmq_poll to wake at `deadline` (-1 for none). */
int kvp_link_poll_ms(double deadline, double now);

/* ---- connecting side (DEALER) ---- */

typedef enum kvp_link_state {
    KVP_LINK_HANDSHAKE, /* Hello sent (or to be sent), no HelloReply yet */
    KVP_LINK_READY,     /* handshake done, peer alive */
    KVP_LINK_REFUSED,   /* the peer refused our Hello; retried every peer_timeout */
    KVP_LINK_DEAD,      /* silent past peer_timeout; retrying the handshake */
} kvp_link_state_t;

typedef struct kvp_link_dealer kvp_link_dealer_t;

/* Creates a DEALER (linger 0, ZMQ_IMMEDIATE: nothing is queued for a peer
 * that is not connected), applies settings and CURVE, connects to endpoint
 * and sends hello (copied; protocol_version 0 becomes
 * KVP_WIRE_PROTOCOL_VERSION, empty host the host name, wall_ns is set on
 * each send). */
int kvp_link_dealer_new(kvp_link_dealer_t **out, void *zmq_ctx, const char *endpoint,
                        const Kvpred__Hello *hello, const kvp_link_settings_t *s, double now,
                        kvp_err_t *err);
void kvp_link_dealer_free(kvp_link_dealer_t **d);

void *kvp_link_dealer_socket(const kvp_link_dealer_t *d);
const char *kvp_link_dealer_endpoint(const kvp_link_dealer_t *d);

/* Takes a message received on the socket. Returns KVP_LINK_CONSUMED (a link
 * message), KVP_LINK_APP (the caller's), or a negative code with err for a
 * link event the caller must act on, e.g. KVP_EPEER "handshake refused by
 * decoder: base_fingerprint differs (ours 1a2b..., theirs 9f8e...)" or the
 * peer answering "no handshake" (it restarted, or declared us dead): its
 * requests in flight are lost. An Error "no handshake" that names a request
 * is returned as KVP_LINK_APP (fail that request) and restarts the
 * handshake too. */
int kvp_link_dealer_handle(kvp_link_dealer_t *d, const kvp_wire_msg_t *m, double now,
                           kvp_err_t *err);

/* Sends a due Hello or Ping and checks the peer's silence. Returns 0, or
 * KVP_ETIMEOUT once when the peer is declared dead (or never answered the
 * handshake) with err naming the peer and endpoint; the caller fails the
 * requests in flight on this link. */
int kvp_link_dealer_tick(kvp_link_dealer_t *d, double now, kvp_err_t *err);

/* When the next tick is due (kvp_now() seconds). */
double kvp_link_dealer_deadline(const kvp_link_dealer_t *d);

kvp_link_state_t kvp_link_dealer_state(const kvp_link_dealer_t *d);
const char *kvp_link_state_name(kvp_link_state_t s);

/* The host name the peer gave in its last HelloReply ("" before). */
const char *kvp_link_dealer_peer_host(const kvp_link_dealer_t *d);

/* Completed handshakes so far: a change means the peer may have lost state. */
unsigned kvp_link_dealer_epoch(const kvp_link_dealer_t *d);

/* The peer's clock minus ours (offset_ns) and the round trip (rtt_ns), from
 * the minimum-RTT Pong of the last KVP_LINK_CLOCK_WINDOW. The offset is
 * right to within rtt_ns / 2. Returns 0, or KVP_EBUSY before the first Pong. */
int kvp_link_dealer_clock(const kvp_link_dealer_t *d, int64_t *offset_ns, int64_t *rtt_ns);

/* ---- bound side (ROUTER) ---- */

typedef struct kvp_link_router kvp_link_router_t;

/* Checks the endpoint (kvp_link_endpoint_check with s->bind_any), creates a
 * ROUTER (linger 0, ZMQ_ROUTER_MANDATORY: sends to a gone peer fail),
 * applies settings and CURVE (server) and binds. `ours` is the Hello that
 * peers' Hellos are compared with (copied as in kvp_link_dealer_new). */
int kvp_link_router_new(kvp_link_router_t **out, void *zmq_ctx, const char *endpoint,
                        const Kvpred__Hello *ours, const kvp_link_settings_t *s, kvp_err_t *err);
void kvp_link_router_free(kvp_link_router_t **r);

void *kvp_link_router_socket(const kvp_link_router_t *r);
/* The bound endpoint as libzmq resolved it (the port of tcp://...:*). */
const char *kvp_link_router_endpoint(const kvp_link_router_t *r);

/* Takes a message received with kvp_wire_recv_from. Answers Hello (adding or
 * refusing the peer) and Ping (Pong with t1 = receipt, t2 = reply time);
 * refuses other messages from peers without a handshake with an Error "no
 * handshake". Returns KVP_LINK_APP for a handshaken peer's message,
 * KVP_LINK_CONSUMED, or a negative code with err for something worth a log
 * line (a refused Hello, a message refused for no handshake, a failed
 * reply). */
int kvp_link_router_handle(kvp_link_router_t *r, const kvp_wire_msg_t *m, double now,
                           kvp_err_t *err);

/* Declares peers silent past peer_timeout dead and forgets them, one per
 * call: returns 1 with *dead and err (naming the peer) filled, 0 when there
 * are no more. Call until 0, failing the requests of each dead peer. */
int kvp_link_router_tick(kvp_link_router_t *r, double now, kvp_wire_id_t *dead, kvp_err_t *err);

double kvp_link_router_deadline(const kvp_link_router_t *r);

/* 1 when the peer has completed the handshake and is not dead. */
int kvp_link_router_peer_ready(const kvp_link_router_t *r, const kvp_wire_id_t *id);
size_t kvp_link_router_n_peers(const kvp_link_router_t *r);

#endif
