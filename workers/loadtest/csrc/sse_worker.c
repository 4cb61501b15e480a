/*
 * sse_worker: the load tool's subscriber worker, compiled.
 *
 * A drop-in for workers/loadtest/worker.py: the same JSON lines on stdin and
 * stdout (see that module's docstring), the same EventSource behaviour and
 * the same exact accounting per topic (delivered, duplicated, out of order,
 * lost against what the publisher accepted). It exists because a load
 * client must out-run the server it measures: the Python worker spends about
 * 3 us per read, so against a server that writes once per event per socket
 * (nchan) the client, not the server, sets the figure. Here a read costs a
 * syscall and a memchr per line.
 *
 * Design, and why:
 *   - one thread, one epoll loop, level-triggered, one read() per ready
 *     socket per wake-up: fair between sockets, no starvation;
 *   - the SSE stream is parsed line by line (the spec's way), straight out of
 *     the read buffer; only a line split across reads is copied;
 *   - HTTP/1.1 chunked bodies are decoded in place, as a small state machine;
 *   - latencies go into the same log-linear histogram as histogram.py
 *     (same bucket layout, so the parent merges them unchanged), one per
 *     (node, second since publishing started), handed over every tick;
 *   - commands beyond worker.py's: "disconnect" (close every stream, stay
 *     down) and "reconnect" (all reconnect at once with Last-Event-ID), for
 *     the reconnect-storm benchmark; "caught_up" is sent the moment the last
 *     subscriber has the events it expects, with the time ("at_ns");
 *   - why a connect gave no stream is counted by cause, in the same words as
 *     the Python worker (wire.py: answer_cause, errno_cause): "503 broker
 *     unavailable" (a JSON detail, up to its first colon), "502 from the
 *     proxy", "connection refused", "timeout" (no answer within 10 s),
 *     "closed before answering", "200 but not text/event-stream"; a 200
 *     stream that ends cleanly within 1 s with only retry: was "told to
 *     retry" ("told_to_retry" in the result), not an error, and does not
 *     count as the subscriber being back;
 *   - Herald's Mercure hub (--protocol mercure) streams the same frames (its
 *     data-less "id: #<n>" position frame is a cursor, nothing to count); a
 *     resume answered "Mercure-Last-Event-ID: earliest" (history lost, all
 *     retained updates replayed) counts as a reset, reason "earliest";
 *   - the setup's optional "token" (Herald with access control on) goes to
 *     every subscriber as "Authorization: Bearer", a header rather than
 *     ?access_token=, so the request line is as short as without one; a
 *     refused token counts as "401 ..." / "403 ..." like any other answer;
 *   - the setup's optional "silence" (seconds; absent or 0: never): an open
 *     stream that delivers no byte for that long (a Herald node writes one at
 *     least every heartbeat) is on a node that hangs; it is closed, counted
 *     as ended "silent", and resumed with Last-Event-ID (subscriber.py). It is
 *     looked for with the answer timeouts, every 0.5 s.
 *
 * Build: gcc -O2 -o sse-worker sse_worker.c -lcjson   (see native.py)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <ctype.h>

#define PROGRAM_NAME "sse-worker"
#include "common.h"

#define ANSWER_TIMEOUT 10.0    /* seconds from a connect's start to the response head (subscriber.py) */
#define RETRY_ONLY_SECONDS 1.0 /* a 200 stream ending this soon with only retry: was told to retry */
#define ERROR_BODY_LIMIT 4096  /* bytes of a refused answer read for its cause */
#define MAX_TOKEN 4096         /* longest access token the setup may give (a JWT is a few hundred bytes) */

/* ------------------------------------------ growable buffer (more in common.h) */

/* A JSON string: node names and reasons come from servers, so escape them. */
static void sb_str(sbuf *b, const char *s) {
    sb_add(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            sb_add(b, e, 2);
        } else if (c < 0x20 || c >= 0x7f) {
            sb_printf(b, "\\u%04x", c);
        } else {
            sb_add(b, (const char *)&c, 1);
        }
    }
    sb_add(b, "\"", 1);
}

/* ------------------------------------------------ small string -> count map */

typedef struct {
    char **names;
    int64_t *counts;
    int n;
} counter_t;

static int name_index(counter_t *c, const char *name) {
    for (int i = 0; i < c->n; i++)
        if (strcmp(c->names[i], name) == 0) return i;
    c->names = xrealloc(c->names, sizeof(char *) * (size_t)(c->n + 1));
    c->counts = xrealloc(c->counts, sizeof(int64_t) * (size_t)(c->n + 1));
    c->names[c->n] = strdup(name);
    c->counts[c->n] = 0;
    return c->n++;
}

static void count(counter_t *c, const char *name) {
    int i = name_index(c, name); /* first: it may move c->counts */
    c->counts[i]++;
}

static int64_t counter_sum(const counter_t *c) {
    int64_t s = 0;
    for (int i = 0; i < c->n; i++) s += c->counts[i];
    return s;
}

static void sb_counter(sbuf *b, const counter_t *c) {
    sb_add(b, "{", 1);
    for (int i = 0; i < c->n; i++) {
        if (i) sb_add(b, ",", 1);
        sb_str(b, c->names[i]);
        sb_printf(b, ":%lld", (long long)c->counts[i]);
    }
    sb_add(b, "}", 1);
}

/* ------------------------------------------------------------ subscribers */

enum { S_NEW, S_CONNECTING, S_HEAD, S_ANSWER, S_BODY, S_WAITING, S_PAUSED, S_STOPPED };
enum { CH_SIZE, CH_DATA, CH_CRLF, CH_DONE };

typedef struct {
    int64_t *v;
    int n, cap;
} iset; /* skipped sequence numbers of one topic: empty while nothing goes wrong */

typedef struct {
    int index, port, ntopics;
    char *target, *host, *path;
    int *topics;
    int64_t *next_seq;
    iset *missing;
    int64_t delivered, duplicated, out_of_order, unknown, resets;
    char last_id[256];
    int has_last_id, retry_ms, node, state, fd, chunked, ch_state, caught;
    int64_t ch_left;
    char ch_line[24];
    int ch_line_len;
    char *line; /* a line split across reads */
    size_t line_len, line_cap;
    char *head; /* the response head; for a refused answer, its body after it (from body_at) */
    size_t head_len, body_at;
    int64_t left;                         /* body bytes still to come (Content-Length), or -1 */
    int evented, retry_seen, gap_opened; /* this stream: an event came; retry: came; its 200 closed a gap */
    double opened_at;
    char frame_id[256];
    int frame_id_len, frame_has_id;
    double first_ready, down_at, connect_started, reconnect_at;
    double last_read; /* mono() of the last read: the silence limit counts from it */
    double *gaps; /* (lost, back) pairs, wall seconds */
    int ngaps;
    hist_t *hist; /* the (node, second) histogram in use, cached */
    int64_t hist_sec;
    unsigned hist_gen;
} sub_t;

typedef struct {
    int node;
    int64_t sec;
    hist_t *h;
} bucket_t;

static struct {
    int worker, nsubs, ntopics_total, ready, epfd, go, expecting, caught, caught_sent;
    double ramp, connect_timeout, tick, connect_begin, ramp_done_at, last_ready_at, next_tick, next_lag;
    double counted_from, cpu_wall;
    int64_t t0_ns, last_delivery_ns, reconnects, told_to_retry;
    int64_t body_bytes; /* event-stream bytes read (after de-chunking): beside the nodes' bytes sent */
    double next_scan; /* the next look for connects without an answer (ANSWER_TIMEOUT) and silent streams */
    double silence;   /* seconds an open stream may deliver nothing before it is closed and resumed; 0: never */
    int next_connect; /* subscribers below this index have been started */
    sub_t *subs;
    counter_t nodes, connects, connect_errors, drops, reset_reasons;
    bucket_t *buckets;
    int nbuckets;
    unsigned generation;
    hist_t connect_time, lag;
    int64_t *expect; /* last accepted seq per topic, once "expect" came */
    int fd_exhausted, ready_sent, any_waiting;
    double cpu_used;
    char *auth; /* "Authorization: Bearer <token>\r\n" from the setup's "token", or "" */
} W;

static double cpu_seconds(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec + u.ru_stime.tv_usec / 1e6;
}

static hist_t *bucket(int node, int64_t sec) {
    for (int i = W.nbuckets - 1; i >= 0; i--)
        if (W.buckets[i].node == node && W.buckets[i].sec == sec) return W.buckets[i].h;
    W.buckets = xrealloc(W.buckets, sizeof(bucket_t) * (size_t)(W.nbuckets + 1));
    hist_t *h = calloc(1, sizeof(hist_t));
    if (!h) exit(3);
    W.buckets[W.nbuckets++] = (bucket_t){node, sec, h};
    return h;
}

static void sb_take_buckets(sbuf *b) {
    sb_add(b, "[", 1);
    for (int i = 0; i < W.nbuckets; i++) {
        if (i) sb_add(b, ",", 1);
        sb_add(b, "[", 1);
        sb_str(b, W.nodes.names[W.buckets[i].node]);
        sb_printf(b, ",%lld,", (long long)W.buckets[i].sec);
        sb_hist(b, W.buckets[i].h);
        sb_add(b, "]", 1);
        free(W.buckets[i].h);
    }
    sb_add(b, "]", 1);
    W.nbuckets = 0;
    W.generation++; /* subscribers drop the histogram they hold */
}

static int iset_discard(iset *s, int64_t v) {
    for (int i = 0; i < s->n; i++)
        if (s->v[i] == v) {
            s->v[i] = s->v[--s->n];
            return 1;
        }
    return 0;
}

static void iset_add(iset *s, int64_t v) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 16;
        s->v = xrealloc(s->v, sizeof(int64_t) * (size_t)s->cap);
    }
    s->v[s->n++] = v;
}

static int sub_caught_up(const sub_t *s) {
    for (int j = 0; j < s->ntopics; j++) {
        int t = s->topics[j];
        int64_t last = t < W.ntopics_total ? W.expect[t] : 0;
        if (s->next_seq[j] <= last) return 0;
    }
    return 1;
}

static int count_connected(void) {
    int n = 0;
    for (int i = 0; i < W.nsubs; i++) n += W.subs[i].state == S_BODY;
    return n;
}

static void sb_totals(sbuf *b) {
    sb_printf(b, ",\"connected\":%d,\"reconnects\":%lld,\"resets\":%lld", count_connected(), (long long)W.reconnects,
              (long long)counter_sum(&W.reset_reasons));
}

static void check_caught_up(void);

/* Recount which subscribers (of those that ever connected) have what "expect" named, then report if all do. */
static void recount_caught(void) {
    W.caught = 0;
    for (int i = 0; i < W.nsubs; i++) {
        sub_t *s = &W.subs[i];
        s->caught = s->first_ready > 0 && sub_caught_up(s);
        W.caught += s->caught;
    }
    check_caught_up();
}

static void check_caught_up(void) {
    /* Every subscriber that ever connected (W.ready of them) must have caught up. */
    if (!W.expecting || W.caught_sent || W.caught < W.ready) return;
    W.caught_sent = 1;
    sbuf b = {0};
    sb_printf(&b, "{\"type\":\"caught_up\",\"at_ns\":%lld}", (long long)wall_ns());
    emit(&b);
}

/* One data line of an event. Load events are "<topic> <seq> <sent ns> <pad>". */
static void on_data(sub_t *s, const char *p, size_t n, int64_t now_ns) {
    int64_t f[3] = {0, 0, 0};
    size_t i = 0;
    int k = 0;
    for (; k < 3; k++) {
        size_t start = i;
        while (i < n && p[i] >= '0' && p[i] <= '9') f[k] = f[k] * 10 + (p[i++] - '0');
        if (i == start || i >= n || p[i] != ' ') break;
        i++;
    }
    if (k < 3) {
        static const char reset[] = "{\"reason\":\"";
        if (n > sizeof reset - 1 && memcmp(p, reset, sizeof reset - 1) == 0) {
            size_t a = sizeof reset - 1, e = a;
            while (e < n && p[e] != '"' && e - a < 63) e++;
            char reason[64];
            memcpy(reason, p + a, e - a);
            reason[e - a] = 0;
            s->resets++;
            count(&W.reset_reasons, reason);
        } else {
            s->unknown++;
        }
        return;
    }
    int j = 0;
    while (j < s->ntopics && s->topics[j] != f[0]) j++;
    if (j == s->ntopics) {
        s->unknown++; /* an event of a topic this subscriber never asked for */
        return;
    }
    int64_t seq = f[1], expected = s->next_seq[j];
    if (seq == expected) {
        s->next_seq[j] = seq + 1;
    } else if (seq > expected) {
        for (int64_t m = expected; m < seq; m++) iset_add(&s->missing[j], m);
        s->next_seq[j] = seq + 1;
    } else if (iset_discard(&s->missing[j], seq)) {
        s->out_of_order++;
    } else {
        s->duplicated++;
        return;
    }
    s->delivered++;
    W.last_delivery_ns = now_ns;
    int64_t delta = now_ns - W.t0_ns;
    int64_t sec = delta >= 0 ? delta / 1000000000 : -((-delta + 999999999) / 1000000000);
    if (!s->hist || s->hist_sec != sec || s->hist_gen != W.generation) {
        s->hist = bucket(s->node, sec);
        s->hist_sec = sec;
        s->hist_gen = W.generation;
    }
    hist_record(s->hist, (now_ns - f[2]) / 1000);
    if (W.expecting && !s->caught && s->first_ready > 0 && sub_caught_up(s)) {
        s->caught = 1;
        W.caught++;
    }
}

static void on_line(sub_t *s, const char *p, size_t n, int64_t now_ns) {
    if (n && p[n - 1] == '\r') n--;
    if (n == 0) { /* end of a frame: its id becomes the one to resume from */
        if (s->frame_has_id) {
            memcpy(s->last_id, s->frame_id, (size_t)s->frame_id_len);
            s->last_id[s->frame_id_len] = 0;
            s->has_last_id = 1;
            s->frame_has_id = 0;
        }
        return;
    }
    if (n >= 5 && memcmp(p, "data:", 5) == 0) {
        s->evented = 1;
        size_t a = (n > 5 && p[5] == ' ') ? 6 : 5;
        on_data(s, p + a, n - a, now_ns);
    } else if (n >= 3 && memcmp(p, "id:", 3) == 0) {
        size_t a = (n > 3 && p[3] == ' ') ? 4 : 3;
        size_t len = n - a < sizeof s->frame_id - 1 ? n - a : sizeof s->frame_id - 1;
        memcpy(s->frame_id, p + a, len);
        s->frame_id_len = (int)len;
        s->frame_has_id = 1;
    } else if (n >= 6 && memcmp(p, "retry:", 6) == 0) {
        size_t a = (n > 6 && p[6] == ' ') ? 7 : 6;
        int v = 0, ok = a < n;
        for (size_t i = a; i < n; i++) {
            if (p[i] < '0' || p[i] > '9') ok = 0;
            else v = v * 10 + (p[i] - '0');
        }
        if (ok) s->retry_ms = v;
        s->retry_seen = 1;
    } /* event:, comments and anything else: nothing to count */
}

/* Keep the start of a line that a read split. */
static void line_append(sub_t *s, const char *p, size_t n) {
    if (s->line_len + n > s->line_cap) {
        s->line_cap = (s->line_len + n) * 2;
        s->line = xrealloc(s->line, s->line_cap);
    }
    memcpy(s->line + s->line_len, p, n);
    s->line_len += n;
}

/* Event-stream bytes (after any chunked decoding). */
static void on_body(sub_t *s, const char *p, size_t n, int64_t now_ns) {
    W.body_bytes += (int64_t)n;
    while (n) {
        const char *nl = memchr(p, '\n', n);
        if (!nl) {
            line_append(s, p, n);
            return;
        }
        size_t len = (size_t)(nl - p);
        if (s->line_len) {
            line_append(s, p, len);
            on_line(s, s->line, s->line_len, now_ns);
            s->line_len = 0;
        } else {
            on_line(s, p, len, now_ns);
        }
        p = nl + 1;
        n -= len + 1;
    }
}

/* HTTP/1.1 chunked transfer decoding, feeding on_body with each chunk's data. */
static void on_chunked(sub_t *s, const char *p, size_t n, int64_t now_ns) {
    while (n) {
        switch (s->ch_state) {
        case CH_SIZE: {
            char c = *p++;
            n--;
            if (c == '\n') {
                s->ch_line[s->ch_line_len] = 0;
                s->ch_left = strtoll(s->ch_line, NULL, 16);
                s->ch_line_len = 0;
                s->ch_state = s->ch_left ? CH_DATA : CH_DONE;
            } else if (s->ch_line_len < (int)sizeof s->ch_line - 1) {
                s->ch_line[s->ch_line_len++] = c;
            }
            break;
        }
        case CH_DATA: {
            size_t take = (size_t)s->ch_left < n ? (size_t)s->ch_left : n;
            on_body(s, p, take, now_ns);
            p += take;
            n -= take;
            s->ch_left -= (int64_t)take;
            if (!s->ch_left) s->ch_state = CH_CRLF;
            break;
        }
        case CH_CRLF:
            if (*p == '\n') s->ch_state = CH_SIZE;
            p++;
            n--;
            break;
        default:
            return; /* the last chunk came: the server ended the stream */
        }
    }
}

/* ------------------------------------------------------------- connections */

/* Why a connect failed, in wire.py's words (ERRNO_CAUSES). */
static const char *errcause(int e) {
    switch (e) {
    case ECONNREFUSED: return "connection refused";
    case ECONNRESET: return "connection reset";
    case ETIMEDOUT: return "timeout";
    case EMFILE:
    case ENFILE: return "out of file descriptors";
    case EADDRNOTAVAIL: return "no local port free";
    case EHOSTUNREACH:
    case ENETUNREACH: return "unreachable";
    default: {
        const char *name = strerrorname_np(e); /* as Python's errno.errorcode: "EPIPE" */
        return name ? name : "OSError";
    }
    }
}

static const char *header(const char *head, const char *name, size_t *len);

/* The cause of a refused answer (wire.py's answer_cause): the status and a few words. */
static void answer_cause(sub_t *s, char *out, size_t cap) {
    int status = 0;
    sscanf(s->head, "HTTP/%*s %d", &status);
    if (status == 200) {
        snprintf(out, cap, "200 but not text/event-stream");
        return;
    }
    size_t n = s->head_len - s->body_at;
    if (n > ERROR_BODY_LIMIT) n = ERROR_BODY_LIMIT;
    char body[ERROR_BODY_LIMIT + 1];
    memcpy(body, s->head + s->body_at, n);
    body[n] = 0;
    const char *d = strstr(body, "\"detail\"");
    if (d) { /* "detail" : "text: more" -> "text", lower case, at most 48 characters */
        d += 8;
        while (*d == ' ' || *d == '\t' || *d == '\n' || *d == '\r') d++;
        if (*d == ':') {
            d++;
            while (*d == ' ' || *d == '\t' || *d == '\n' || *d == '\r') d++;
        } else {
            d = NULL;
        }
        if (d && *d == '"') {
            d++;
            char text[201];
            size_t k = 0;
            while (k < 200 && d[k] && d[k] != '"' && d[k] != '\\') {
                text[k] = d[k];
                k++;
            }
            text[k] = 0;
            char *colon = strchr(text, ':');
            if (colon) *colon = 0;
            char *a = text, *e = text + strlen(text);
            while (*a && isspace((unsigned char)*a)) a++;
            while (e > a && isspace((unsigned char)e[-1])) e--;
            *e = 0;
            if (strlen(a) > 48) a[48] = 0;
            for (char *c = a; *c; c++) *c = (char)tolower((unsigned char)*c);
            if (k > 0 && *a) {
                snprintf(out, cap, "%d %s", status, a);
                return;
            }
        }
    }
    size_t len = 0;
    const char *server = header(s->head, "server", &len);
    if (!header(s->head, "x-node-id", &len) && server && strncasecmp(server, "nginx", 5) == 0)
        snprintf(out, cap, "%d from the proxy", status);
    else
        snprintf(out, cap, "%d from the server", status);
}

static void count_answer(sub_t *s) {
    char why[128];
    answer_cause(s, why, sizeof why);
    count(&W.connect_errors, why);
}

static void mark_down(sub_t *s) {
    if (s->down_at == 0 && s->first_ready > 0) s->down_at = wall_ns() / 1e9;
}

static void close_fd(sub_t *s) {
    if (s->fd >= 0) {
        epoll_ctl(W.epfd, EPOLL_CTL_DEL, s->fd, NULL);
        close(s->fd);
        s->fd = -1;
    }
    s->line_len = s->head_len = 0;
    s->frame_has_id = 0;
}

static void wait_retry(sub_t *s) {
    s->state = S_WAITING;
    W.any_waiting = 1;
    s->reconnect_at = mono() + s->retry_ms / 1000.0;
}

static void start_connect(sub_t *s);

/* The stream (or the attempt) ended; EventSource waits `retry` and reconnects.
 * `why`: an open stream's end ("eof", or the error); `clean`: the response ended as HTTP lets it
 * (the last chunk, Content-Length bytes, or EOF of a body without either). */
static void ended(sub_t *s, const char *why, int clean) {
    if (s->state == S_BODY && why) {
        if (clean && !s->evented && s->retry_seen && mono() - s->opened_at < RETRY_ONLY_SECONDS) {
            W.told_to_retry++; /* "come back later", not an error: nor was the subscriber back */
            W.connects.counts[name_index(&W.connects, W.nodes.names[s->node])]--; /* nor a connect to a node */
            if (s->gap_opened) {
                s->ngaps--;
                s->down_at = s->gaps[2 * s->ngaps];
                s->gap_opened = 0;
            }
        } else {
            count(&W.drops, why);
        }
    }
    close_fd(s);
    if (s->state == S_STOPPED || s->state == S_PAUSED) return;
    mark_down(s);
    W.reconnects++;
    wait_retry(s);
}

static void connect_failed(sub_t *s, int e) {
    if (e == EMFILE || e == ENFILE) W.fd_exhausted = 1;
    count(&W.connect_errors, errcause(e));
    close_fd(s);
    mark_down(s);
    wait_retry(s);
}

static void start_connect(sub_t *s) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s->port)};
    if (inet_pton(AF_INET, s->host, &addr.sin_addr) != 1) {
        struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res = NULL;
        if (getaddrinfo(s->host, NULL, &hints, &res) != 0 || !res) {
            count(&W.connect_errors, "gaierror");
            wait_retry(s);
            return;
        }
        addr.sin_addr = ((struct sockaddr_in *)res->ai_addr)->sin_addr;
        freeaddrinfo(res);
    }
    s->connect_started = mono();
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        connect_failed(s, errno);
        return;
    }
    s->state = S_CONNECTING;
    if (connect(s->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        connect_failed(s, errno);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)(s - W.subs)};
    epoll_ctl(W.epfd, EPOLL_CTL_ADD, s->fd, &ev);
}

static void send_request(sub_t *s) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        connect_failed(s, err);
        return;
    }
    char req[2048 + MAX_TOKEN];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n%s%s%s%s\r\n",
                     s->path, s->target, W.auth, s->has_last_id ? "Last-Event-ID: " : "",
                     s->has_last_id ? s->last_id : "", s->has_last_id ? "\r\n" : "");
    if (n <= 0 || n >= (int)sizeof req || write(s->fd, req, (size_t)n) != n) {
        connect_failed(s, errno ? errno : EIO);
        return;
    }
    s->state = S_HEAD;
    s->head_len = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)(s - W.subs)};
    epoll_ctl(W.epfd, EPOLL_CTL_MOD, s->fd, &ev);
}

static const char *header(const char *head, const char *name, size_t *len) {
    size_t nl = strlen(name);
    for (const char *p = strstr(head, "\r\n"); p; p = strstr(p + 2, "\r\n")) {
        const char *line = p + 2;
        if (strncasecmp(line, name, nl) == 0 && line[nl] == ':') {
            const char *v = line + nl + 1;
            while (*v == ' ' || *v == '\t') v++;
            const char *e = strstr(v, "\r\n");
            *len = e ? (size_t)(e - v) : strlen(v);
            return v;
        }
    }
    return NULL;
}

/* Whether a refused answer's body is all here (or as much as is read of it). */
static int answer_complete(sub_t *s) {
    size_t n = s->head_len - s->body_at, len = 0;
    if (n >= ERROR_BODY_LIMIT) return 1;
    const char *te = header(s->head, "transfer-encoding", &len);
    if (te && memmem(te, len, "chunked", 7)) {
        const char *body = s->head + s->body_at;
        return (n >= 3 && memcmp(body, "0\r\n", 3) == 0) || memmem(body, n, "\r\n0\r\n", 5) != NULL;
    }
    const char *cl = header(s->head, "content-length", &len);
    return cl && (size_t)strtoll(cl, NULL, 10) <= n;
}

/* The response head is complete at `end` (its blank line excluded).
 * 1: a stream; 0: refused, counted; 2: refused, its body still to read for the cause. */
static int on_head(sub_t *s, size_t end) {
    s->head[end] = 0;
    int status = 0;
    if (strncmp(s->head, "HTTP/", 5) != 0 || sscanf(s->head, "HTTP/%*s %d", &status) != 1) {
        count(&W.connect_errors, "not an HTTP response");
        return 0;
    }
    size_t len = 0;
    const char *ct = header(s->head, "content-type", &len);
    int sse = ct && len >= 17 && strncasecmp(ct, "text/event-stream", 17) == 0 &&
              (len == 17 || ct[17] == ';' || ct[17] == ' ');
    if (status != 200 || !sse) {
        s->body_at = end + 4;
        return 2;
    }
    const char *te = header(s->head, "transfer-encoding", &len);
    s->chunked = te && memmem(te, len, "chunked", 7) != NULL;
    const char *cl = s->chunked ? NULL : header(s->head, "content-length", &len);
    s->left = cl ? strtoll(cl, NULL, 10) : -1;
    s->evented = s->retry_seen = 0;
    s->opened_at = mono();
    s->ch_state = CH_SIZE;
    s->ch_line_len = 0;
    char node[128];
    const char *id = header(s->head, "x-node-id", &len);
    if (id && len < sizeof node) {
        memcpy(node, id, len);
        node[len] = 0;
    } else {
        snprintf(node, sizeof node, "%s", s->target);
    }
    double now = wall_ns() / 1e9;
    s->node = name_index(&W.nodes, node);
    count(&W.connects, node);
    hist_record(&W.connect_time, (int64_t)((mono() - s->connect_started) * 1e6));
    s->hist = NULL;
    s->state = S_BODY;
    if (s->first_ready == 0) {
        s->first_ready = now;
        W.ready++;
        W.last_ready_at = mono();
        if (W.expecting && !s->caught && sub_caught_up(s)) {
            s->caught = 1;
            W.caught++;
        }
    }
    /* A Mercure hub answers a resume it cannot make exact (history lost) with "Mercure-Last-Event-ID:
     * earliest", and replays everything it retains: Mercure's reset (subscriber.py's history_lost). */
    const char *mercure = header(s->head, "mercure-last-event-id", &len);
    if (mercure && len == 8 && memcmp(mercure, "earliest", 8) == 0 && s->has_last_id &&
        strcmp(s->last_id, "earliest") != 0) {
        s->resets++;
        count(&W.reset_reasons, "earliest");
    }
    s->gap_opened = s->down_at > 0;
    if (s->down_at > 0) {
        s->gaps = xrealloc(s->gaps, sizeof(double) * 2 * (size_t)(s->ngaps + 1));
        s->gaps[2 * s->ngaps] = s->down_at;
        s->gaps[2 * s->ngaps + 1] = now;
        s->ngaps++;
        s->down_at = 0;
    }
    return 1;
}

static char readbuf[1 << 18];

static void on_readable(sub_t *s) {
    ssize_t n = read(s->fd, readbuf, sizeof readbuf);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n > 0) s->last_read = mono();
    if (n <= 0) {
        int e = n == 0 ? 0 : errno;
        if (s->state == S_HEAD)
            count(&W.connect_errors, e ? errcause(e) : "closed before answering");
        else if (s->state == S_ANSWER)
            count_answer(s); /* the body ended with the connection */
        ended(s, n == 0 ? "eof" : (e == ECONNRESET ? "ConnectionResetError" : "OSError"),
              n == 0 && !s->chunked && s->left < 0);
        return;
    }
    int64_t now_ns = wall_ns();
    const char *p = readbuf;
    size_t len = (size_t)n;
    if (s->state == S_HEAD || s->state == S_ANSWER) {
        s->head = xrealloc(s->head, s->head_len + len + 1);
        memcpy(s->head + s->head_len, p, len);
        s->head_len += len;
        s->head[s->head_len] = 0;
        if (s->state == S_ANSWER) {
            if (answer_complete(s)) {
                count_answer(s);
                ended(s, NULL, 0);
            }
            return;
        }
        char *end = memmem(s->head, s->head_len, "\r\n\r\n", 4);
        if (!end) return;
        size_t head_end = (size_t)(end - s->head), rest = s->head_len - head_end - 4;
        memmove(readbuf, end + 4, rest); /* the first body bytes, after the head */
        int opened = on_head(s, head_end);
        if (opened == 2) { /* refused: its cause is in its body */
            s->state = S_ANSWER;
            if (answer_complete(s)) {
                count_answer(s);
                ended(s, NULL, 0);
            }
            return;
        }
        if (!opened) {
            ended(s, NULL, 0);
            return;
        }
        s->head_len = 0;
        len = rest;
    }
    if (s->left >= 0) {
        if ((int64_t)len > s->left) len = (size_t)s->left;
        s->left -= (int64_t)len;
    }
    if (s->chunked) {
        on_chunked(s, p, len, now_ns);
        if (s->ch_state == CH_DONE) ended(s, "eof", 1);
    } else {
        on_body(s, p, len, now_ns);
        if (s->left == 0) ended(s, "eof", 1); /* Content-Length bytes: the response is over */
    }
}

/* Connects without an answer after ANSWER_TIMEOUT give up, as "timeout" (a refused answer: its cause);
 * open streams silent for W.silence seconds end, as "silent", and are resumed. */
static void scan_timeouts(double now) {
    for (int i = 0; i < W.nsubs; i++) {
        sub_t *s = &W.subs[i];
        if (s->state == S_BODY) {
            if (W.silence > 0 && now - s->last_read >= W.silence) ended(s, "silent", 0);
            continue;
        }
        if ((s->state != S_CONNECTING && s->state != S_HEAD && s->state != S_ANSWER) ||
            now - s->connect_started < ANSWER_TIMEOUT)
            continue;
        if (s->state == S_ANSWER) count_answer(s);
        else count(&W.connect_errors, "timeout");
        ended(s, NULL, 0);
    }
}

/* ---------------------------------------------------------------- commands */

static void emit_ready(void) {
    W.ready_sent = 1;
    sbuf b = {0};
    double span = W.last_ready_at > 0 ? W.last_ready_at - W.connect_begin : 0;
    sb_printf(&b, "{\"type\":\"ready\",\"ready\":%d,\"of\":%d,\"connect_all_s\":%.4f", W.ready, W.nsubs, span);
    sb_totals(&b);
    sb_add(&b, "}", 1);
    emit(&b);
}

static void emit_progress(void) {
    double now = mono(), used = cpu_seconds();
    double share = (used - W.cpu_used) / (now - W.cpu_wall > 1e-6 ? now - W.cpu_wall : 1e-6);
    W.cpu_used = used;
    W.cpu_wall = now;
    sbuf b = {0};
    sb_printf(&b, "{\"type\":\"progress\",\"cpu\":%.3f,\"buckets\":", share);
    sb_take_buckets(&b);
    sb_totals(&b);
    sb_add(&b, "}", 1);
    emit(&b);
    if (W.expecting && !W.caught_sent) recount_caught(); /* covers subscribers that came late */
}

static void read_last(cJSON *obj, int64_t *out) {
    memset(out, 0, sizeof(int64_t) * (size_t)W.ntopics_total);
    cJSON *item;
    cJSON_ArrayForEach(item, obj) {
        long t = strtol(item->string, NULL, 10);
        if (t >= 0 && t < W.ntopics_total) out[t] = (int64_t)item->valuedouble;
    }
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int64_t refused_between(const int64_t *v, int n, int64_t lo, int64_t hi) {
    int64_t c = 0;
    for (int i = 0; i < n; i++) c += v[i] >= lo && v[i] <= hi;
    return c;
}

static void finish(cJSON *cmd) {
    int64_t *last = calloc((size_t)W.ntopics_total + 1, sizeof(int64_t));
    read_last(cJSON_GetObjectItem(cmd, "last"), last);
    int64_t **refused = calloc((size_t)W.ntopics_total + 1, sizeof(int64_t *));
    int *nrefused = calloc((size_t)W.ntopics_total + 1, sizeof(int));
    cJSON *item;
    cJSON_ArrayForEach(item, cJSON_GetObjectItem(cmd, "unaccepted")) {
        long t = strtol(item->string, NULL, 10);
        if (t < 0 || t >= W.ntopics_total) continue;
        int n = cJSON_GetArraySize(item), k = 0;
        refused[t] = calloc((size_t)n + 1, sizeof(int64_t));
        cJSON *v;
        cJSON_ArrayForEach(v, item) refused[t][k++] = (int64_t)v->valuedouble;
        qsort(refused[t], (size_t)k, sizeof(int64_t), cmp64);
        nrefused[t] = k;
    }
    for (int i = 0; i < W.nsubs; i++) {
        W.subs[i].state = S_STOPPED;
        close_fd(&W.subs[i]);
    }
    sbuf b = {0};
    sb_printf(&b, "{\"type\":\"result\",\"worker\":%d,\"subscribers\":[", W.worker);
    for (int i = 0; i < W.nsubs; i++) {
        sub_t *s = &W.subs[i];
        int late = s->first_ready == 0 || s->first_ready > W.counted_from;
        int64_t expected = 0, lost = 0;
        for (int j = 0; j < s->ntopics && !late; j++) {
            int t = s->topics[j];
            int64_t *r = refused[t];
            int nr = nrefused[t];
            expected += last[t] - nr;
            for (int m = 0; m < s->missing[j].n; m++) {
                int64_t v = s->missing[j].v[m];
                lost += !(r && bsearch(&v, r, (size_t)nr, sizeof(int64_t), cmp64));
            }
            int64_t from = s->next_seq[j], to = last[t];
            if (to >= from) lost += to - from + 1 - refused_between(r, nr, from, to);
        }
        sb_printf(&b, "%s{\"index\":%d,\"node\":", i ? "," : "", s->index);
        sb_str(&b, s->first_ready > 0 ? W.nodes.names[s->node] : "");
        sb_printf(&b,
                  ",\"topics\":%d,\"connected\":%s,\"late\":%s,\"delivered\":%lld,\"expected\":%lld,\"lost\":%lld,"
                  "\"duplicated\":%lld,\"out_of_order\":%lld,\"unknown\":%lld,\"reconnects\":%d,\"resets\":%lld,"
                  "\"gaps\":[",
                  s->ntopics, s->first_ready > 0 ? "true" : "false", late ? "true" : "false",
                  (long long)s->delivered, (long long)expected, (long long)lost, (long long)s->duplicated,
                  (long long)s->out_of_order, (long long)s->unknown, s->ngaps + (s->down_at > 0),
                  (long long)s->resets);
        for (int g = 0; g < s->ngaps; g++)
            sb_printf(&b, "%s[%.4f,%.4f]", g ? "," : "", s->gaps[2 * g], s->gaps[2 * g + 1]);
        if (s->down_at > 0) sb_printf(&b, "],\"down_at\":%.4f}", s->down_at);
        else sb_add(&b, "],\"down_at\":null}", 17);
    }
    sb_add(&b, "],\"buckets\":", 12);
    sb_take_buckets(&b);
    sb_add(&b, ",\"connect_time\":", 16);
    sb_hist(&b, &W.connect_time);
    sb_add(&b, ",\"connects\":", 12);
    sb_counter(&b, &W.connects);
    sb_add(&b, ",\"connect_errors\":", 18);
    sb_counter(&b, &W.connect_errors);
    sb_add(&b, ",\"drops\":", 9);
    sb_counter(&b, &W.drops);
    sb_add(&b, ",\"reset_reasons\":", 17);
    sb_counter(&b, &W.reset_reasons);
    sb_printf(&b, ",\"told_to_retry\":%lld,\"fd_exhausted\":%s,\"last_delivery_ns\":%lld,\"body_bytes\":%lld,\"lag\":",
              (long long)W.told_to_retry, W.fd_exhausted ? "true" : "false", (long long)W.last_delivery_ns,
              (long long)W.body_bytes);
    sb_hist(&b, &W.lag);
    sb_add(&b, "}", 1);
    emit(&b);
    exit(0);
}

static void setup(cJSON *raw) {
    W.worker = cJSON_GetObjectItem(raw, "worker")->valueint;
    W.ramp = cJSON_GetObjectItem(raw, "ramp")->valuedouble;
    W.connect_timeout = cJSON_GetObjectItem(raw, "connect_timeout")->valuedouble;
    cJSON *tick = cJSON_GetObjectItem(raw, "tick");
    W.tick = tick ? tick->valuedouble : 0.5;
    cJSON *silence = cJSON_GetObjectItem(raw, "silence");
    W.silence = cJSON_IsNumber(silence) && silence->valuedouble > 0 ? silence->valuedouble : 0;
    /* An access token for every subscriber (Herald with access control on): sent as a header, so the
     * request line stays as short as without one. Never echoed anywhere. */
    cJSON *token = cJSON_GetObjectItem(raw, "token");
    W.auth = "";
    if (cJSON_IsString(token) && token->valuestring[0]) {
        size_t len = strlen(token->valuestring);
        if (len > MAX_TOKEN - 32 || strpbrk(token->valuestring, "\r\n")) {
            fprintf(stderr, "sse-worker: the access token is too long or holds a line break\n");
            exit(2);
        }
        sbuf header = {0};
        sb_printf(&header, "Authorization: Bearer %s\r\n", token->valuestring);
        W.auth = header.p;
    }
    cJSON *list = cJSON_GetObjectItem(raw, "subscribers");
    W.nsubs = cJSON_GetArraySize(list);
    W.subs = calloc((size_t)W.nsubs + 1, sizeof(sub_t));
    int i = 0;
    cJSON *entry;
    cJSON_ArrayForEach(entry, list) {
        sub_t *s = &W.subs[i++];
        s->index = cJSON_GetArrayItem(entry, 0)->valueint;
        s->target = strdup(cJSON_GetArrayItem(entry, 1)->valuestring);
        s->path = strdup(cJSON_GetArrayItem(entry, 2)->valuestring);
        char *colon = strrchr(s->target, ':');
        s->host = strndup(s->target, colon ? (size_t)(colon - s->target) : strlen(s->target));
        s->port = colon ? atoi(colon + 1) : 80;
        cJSON *topics = cJSON_GetArrayItem(entry, 3);
        s->ntopics = cJSON_GetArraySize(topics);
        s->topics = calloc((size_t)s->ntopics + 1, sizeof(int));
        s->next_seq = calloc((size_t)s->ntopics + 1, sizeof(int64_t));
        s->missing = calloc((size_t)s->ntopics + 1, sizeof(iset));
        for (int j = 0; j < s->ntopics; j++) {
            s->topics[j] = cJSON_GetArrayItem(topics, j)->valueint;
            s->next_seq[j] = 1;
            if (s->topics[j] + 1 > W.ntopics_total) W.ntopics_total = s->topics[j] + 1;
        }
        s->fd = -1;
        s->left = -1;
        s->retry_ms = 2000;
        s->state = S_NEW;
    }
    W.expect = calloc((size_t)W.ntopics_total + 1, sizeof(int64_t));
    W.connect_begin = mono();
    W.ramp_done_at = W.connect_begin + W.ramp;
}

static void on_command(char *line) {
    cJSON *msg = cJSON_Parse(line);
    if (!msg) {
        fprintf(stderr, "sse-worker: not JSON: %.80s\n", line);
        exit(2);
    }
    cJSON *raw = cJSON_GetObjectItem(msg, "setup");
    if (raw) {
        setup(raw);
        cJSON_Delete(msg);
        return;
    }
    const char *cmd = cJSON_GetStringValue(cJSON_GetObjectItem(msg, "cmd"));
    if (!cmd) cmd = "";
    if (strcmp(cmd, "go") == 0) {
        W.t0_ns = (int64_t)cJSON_GetObjectItem(msg, "t0_ns")->valuedouble;
        W.counted_from = W.t0_ns / 1e9;
        W.go = 1;
        W.generation++;
        W.cpu_used = cpu_seconds();
        W.cpu_wall = mono();
        W.next_tick = mono() + W.tick;
    } else if (strcmp(cmd, "expect") == 0) {
        read_last(cJSON_GetObjectItem(msg, "last"), W.expect);
        W.expecting = 1;
        W.caught_sent = 0;
        recount_caught();
    } else if (strcmp(cmd, "disconnect") == 0) {
        for (int i = 0; i < W.nsubs; i++) {
            sub_t *s = &W.subs[i];
            close_fd(s);
            mark_down(s);
            s->state = S_PAUSED;
        }
        sbuf b = {0};
        sb_add(&b, "{\"type\":\"disconnected\"}", 23);
        emit(&b);
    } else if (strcmp(cmd, "reconnect") == 0) {
        for (int i = 0; i < W.nsubs; i++)
            if (W.subs[i].state == S_PAUSED) {
                W.reconnects++;
                start_connect(&W.subs[i]);
            }
    } else if (strcmp(cmd, "finish") == 0) {
        finish(msg);
    }
    cJSON_Delete(msg);
}

static char *in_buf;
static size_t in_len, in_cap;

static void on_stdin(void) {
    if (in_len + 65536 > in_cap) {
        in_cap = (in_len + 65536) * 2;
        in_buf = xrealloc(in_buf, in_cap);
    }
    ssize_t n = read(STDIN_FILENO, in_buf + in_len, in_cap - in_len - 1);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) exit(0); /* the parent closed our stdin: the run is over */
    in_len += (size_t)n;
    char *start = in_buf, *nl;
    while ((nl = memchr(start, '\n', in_len - (size_t)(start - in_buf)))) {
        *nl = 0;
        on_command(start);
        start = nl + 1;
    }
    in_len -= (size_t)(start - in_buf);
    memmove(in_buf, start, in_len);
}

/* ---------------------------------------------------------------- the loop */

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    W.epfd = epoll_create1(EPOLL_CLOEXEC);
    fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) | O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(W.epfd, EPOLL_CTL_ADD, STDIN_FILENO, &ev);
    W.next_lag = mono() + 0.05;
    static struct epoll_event events[1024];
    for (;;) {
        double now = mono(), wake = W.next_lag;
        /* connects of the ramp that are due */
        while (W.subs && W.next_connect < W.nsubs) {
            double at = W.connect_begin + W.ramp * W.next_connect / W.nsubs;
            if (at > now) {
                if (at < wake) wake = at;
                break;
            }
            start_connect(&W.subs[W.next_connect++]);
        }
        if (W.subs && !W.ready_sent &&
            (W.ready == W.nsubs || (W.next_connect == W.nsubs && now >= W.ramp_done_at + W.connect_timeout)))
            emit_ready();
        if (W.go && now >= W.next_tick) {
            W.next_tick += W.tick;
            if (W.next_tick < now) W.next_tick = now + W.tick;
            emit_progress();
        }
        if (W.go && W.next_tick < wake) wake = W.next_tick;
        if (now >= W.next_scan) {
            scan_timeouts(now);
            W.next_scan = now + 0.5;
        }
        if (W.next_scan < wake) wake = W.next_scan;
        if (now >= W.next_lag) {
            hist_record(&W.lag, (int64_t)((now - W.next_lag) * 1e6));
            W.next_lag = now + 0.05;
        }
        if (W.any_waiting) { /* reconnects after `retry`: rare, so a scan while any wait */
            W.any_waiting = 0;
            for (int i = 0; i < W.nsubs; i++) {
                sub_t *s = &W.subs[i];
                if (s->state != S_WAITING) continue;
                if (s->reconnect_at <= now) {
                    start_connect(s);
                } else {
                    W.any_waiting = 1;
                    if (s->reconnect_at < wake) wake = s->reconnect_at;
                }
            }
        }
        int timeout = (int)ceil((wake - mono()) * 1000);
        int n = epoll_wait(W.epfd, events, 1024, timeout > 0 ? timeout : 0);
        for (int i = 0; i < n; i++) {
            uint32_t id = events[i].data.u32;
            if (id == UINT32_MAX) {
                on_stdin();
                continue;
            }
            sub_t *s = &W.subs[id];
            if (s->fd < 0) continue;
            if (s->state == S_CONNECTING) {
                /* only the connect's own readiness: a stale event of a socket closed in this batch is not it */
                if (events[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) send_request(s);
            } else if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                on_readable(s);
            }
        }
        check_caught_up();
    }
}
