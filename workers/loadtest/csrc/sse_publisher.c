/*
 * sse_publisher: the load tool's publisher, compiled (`--publisher native`).
 *
 * Why it exists: a benchmark's publisher must never be what limits the
 * server it measures. The Python publisher (publisher.py) spends a few
 * hundred microseconds of CPU per request; against a server that answers a
 * publish in well under a millisecond (nchan) it, not the server, set the
 * figure, and when it fell behind it sent Herald JSON batches while the peers
 * got single events. This one sends one event per request (or exactly
 * `batch` events per request, for Herald's batch rows, which say so) at a
 * paced rate, and its CPU per request is a few microseconds.
 *
 * Contract (JSON lines on stdin and stdout, like the subscriber worker):
 *   stdin  {"setup": {"host", "port", "system": "herald"|"nchan"|"sse-starlette"|"mercure",
 *                     "topics": [names...], "rate", "duration", "pacers",
 *                     "pipeline", "batch", "size", "answer_timeout", "token"?}}
 *          -> connects `pacers` keep-alive HTTP/1.1 connections, then
 *   stdout {"type": "ready", "connected": n}
 *   stdin  {"cmd": "go"}  -> publishing starts (the run's time zero)
 *   stdout {"type": "progress", "accepted", "failed", "cpu"}   about every second
 *   stdout {"type": "result", ...}  once publishing is over, then it exits.
 *
 * Publishing, and why:
 *   - pacer i owns topics t with t % pacers == i (publisher.py's pacers_for) and
 *     one connection; its events are numbered per topic from 1, and the
 *     topics of a pacer take turns;
 *   - closed loop (pipeline 1): one request in flight per connection, the
 *     next sent only once the answer is in, as a notification service
 *     publishes; pipelined (pipeline K): up to K requests in flight on the
 *     connection. HTTP/1.1 answers requests of one connection in order, and
 *     a topic belongs to one connection, so a topic's order holds either way;
 *   - paced: a pacer sends what is due by `rate x elapsed` (never ahead of
 *     schedule), as fast as answers allow when behind; it never sends more
 *     than `rate x duration` events, and stops sending when `duration` is up,
 *     so a target that cannot keep up shows as an achieved rate below the
 *     asked one;
 *   - no retries: a 2xx is accepted, a 4xx (but 408/425/429) refused, and
 *     anything else (5xx, a reset, no answer within `answer_timeout`) leaves
 *     the events uncertain; both kinds are handed back per topic
 *     ("unaccepted") so the subscribers count neither as lost. Local servers
 *     under a benchmark do not refuse; if one does, the achieved rate shows it;
 *   - its own CPU (getrusage) is reported per second and over the whole run,
 *     so a step can tell when the publisher, not the server, was the bound;
 *   - "mercure": Herald's Mercure hub, one update per request, a form POSTed to
 *     /.well-known/mercure (topic, data), answered 200 with the update's id;
 *   - an optional "token" (Herald with access control on) is sent with every
 *     request as "Authorization: Bearer"; a refused one is a 401/403 like any
 *     other refusal (every event refused). It is never printed.
 *
 * Build: gcc -O2 -o sse-publisher sse_publisher.c -lcjson   (see native.py)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
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

#define PROGRAM_NAME "sse-publisher"
#include "common.h"

#define RECONNECT_DELAY 0.05 /* seconds before a pacer whose connection failed connects again */
#define MAX_SECONDS 86400    /* per-second counters: a run is at most a day (config.py) */

/* ------------------------------------------------- clocks (more in common.h) */

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* ------------------------------------------ growable buffer (more in common.h) */

static void sb_consume(sbuf *b, size_t n) {
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
}

/* ------------------------------------------------------------------ state */

enum system { HERALD, NCHAN, SSE_STARLETTE, MERCURE };

typedef struct {
    int topic;
    int64_t seq;
} item_t;

typedef struct {
    double sent_at; /* monotonic, for the request's latency */
    int n;          /* events in it */
} request_t;

typedef struct {
    int index;
    int fd;            /* -1: not connected */
    int connecting;    /* a non-blocking connect in progress */
    double retry_at;   /* when to connect again after a failure */
    int *topics;       /* the topics this pacer owns */
    int ntopics, next; /* round robin over them */
    double rate;       /* events/s of this pacer */
    int64_t quota;     /* events it publishes in the whole run */
    int64_t sent;
    request_t *ring; /* requests in flight, oldest first (pipeline slots) */
    item_t *items;   /* ring slot i holds items[i*batch ... i*batch + n) */
    int head, inflight;
    double waiting_since; /* when the oldest in-flight request was sent */
    sbuf out, in;
} pacer_t;

static struct {
    enum system system;
    char host[64];
    int port;
    char **names;
    int ntopics;
    double rate, duration, answer_timeout;
    int npacers, pipeline, batch, size;
    char *auth; /* "Authorization: Bearer <token>\r\n", or "" */
} cfg;

static pacer_t *pacers;
static int64_t *last_seq;        /* per topic: the highest sequence number handed out */
static int64_t **unaccepted;     /* per topic: sequence numbers not accepted */
static int *unaccepted_n, *unaccepted_cap;
static int64_t accepted, refused, uncertain, requests;
static int64_t accepted_at[MAX_SECONDS], errors_at[MAX_SECONDS];
static char *err_names[64];
static int64_t err_counts[64];
static int nerr;
static hist_t latency; /* request time of accepted requests, us */
static int epfd;
static double t0 = -1, last_answer;
static int going;

static void count_error(const char *name, double now) {
    int i;
    for (i = 0; i < nerr; i++)
        if (strcmp(err_names[i], name) == 0) break;
    if (i == nerr) {
        if (nerr == 64) i = 63; /* a pathological server: lump the rest together */
        else err_names[nerr++] = strdup(name);
    }
    err_counts[i]++;
    int64_t sec = (int64_t)(now - t0);
    if (sec >= 0 && sec < MAX_SECONDS) errors_at[sec]++;
}

static void give_up(const item_t *items, int n, int was_refused) {
    for (int i = 0; i < n; i++) {
        int t = items[i].topic;
        if (unaccepted_n[t] == unaccepted_cap[t]) {
            unaccepted_cap[t] = unaccepted_cap[t] ? unaccepted_cap[t] * 2 : 16;
            unaccepted[t] = xrealloc(unaccepted[t], sizeof(int64_t) * (size_t)unaccepted_cap[t]);
        }
        unaccepted[t][unaccepted_n[t]++] = items[i].seq;
    }
    if (was_refused) refused += n;
    else uncertain += n;
}

/* ------------------------------------------------------------ connections */

static void watch(pacer_t *l, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = l};
    epoll_ctl(epfd, op, l->fd, &ev);
}

static void want_write(pacer_t *l, int on) { watch(l, EPOLLIN | (on ? EPOLLOUT : 0), EPOLL_CTL_MOD); }

static void start_connect(pacer_t *l) {
    l->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (l->fd < 0) {
        perror("sse-publisher: socket");
        exit(5);
    }
    int one = 1;
    setsockopt(l->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* one small request: send it now */
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)cfg.port)};
    inet_pton(AF_INET, cfg.host, &addr.sin_addr);
    l->connecting = 1;
    l->out.len = l->in.len = 0;
    if (connect(l->fd, (struct sockaddr *)&addr, sizeof addr) == 0) l->connecting = 0;
    else if (errno != EINPROGRESS) l->connecting = 2; /* failed at once: handled on the next writable */
    watch(l, EPOLLIN | EPOLLOUT, EPOLL_CTL_ADD);
}

/* The connection is gone (reset, closed, timed out): what was in flight is uncertain, connect again soon. */
static void drop(pacer_t *l, const char *why, double now) {
    if (l->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, l->fd, NULL);
        close(l->fd);
    }
    l->fd = -1;
    l->connecting = 0;
    for (int k = 0; k < l->inflight; k++) {
        int slot = (l->head + k) % cfg.pipeline;
        requests++;
        count_error(why, now);
        give_up(l->items + (size_t)slot * (size_t)cfg.batch, l->ring[slot].n, 0);
    }
    l->inflight = 0;
    l->retry_at = now + RECONNECT_DELAY;
}

/* ---------------------------------------------------------------- requests */

static void append_payload(sbuf *b, int topic, int64_t seq, int64_t sent_ns) {
    /* wire.py payload(): "<topic> <seq> <sent_ns> " padded with x to `size` bytes. */
    size_t start = b->len;
    sb_printf(b, "%d %lld %lld ", topic, (long long)seq, (long long)sent_ns);
    size_t head = b->len - start;
    if ((size_t)cfg.size > head) {
        size_t pad = (size_t)cfg.size - head;
        sb_reserve(b, pad);
        memset(b->p + b->len, 'x', pad);
        b->len += pad;
        b->p[b->len] = 0;
    }
}

/* A form value, percent-encoded (application/x-www-form-urlencoded; unreserved characters as they are). */
static void append_form_value(sbuf *b, const char *v) {
    static const char hex[] = "0123456789ABCDEF";
    for (; *v; v++) {
        unsigned char c = (unsigned char)*v;
        if (isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
            sb_add(b, (const char *)&c, 1);
        } else {
            char e[3] = {'%', hex[c >> 4], hex[c & 15]};
            sb_add(b, e, 3);
        }
    }
}

/* One request of `n` events (the pacer's next topics and sequence numbers) appended to the pacer's output. */
static void queue_request(pacer_t *l, int n, double now) {
    int slot = (l->head + l->inflight) % cfg.pipeline;
    item_t *items = l->items + (size_t)slot * (size_t)cfg.batch;
    int64_t sent_ns = wall_ns();
    static sbuf body;
    body.len = 0;
    if (n > 1) sb_add(&body, "[", 1);
    for (int i = 0; i < n; i++) {
        int t = l->topics[l->next];
        l->next = (l->next + 1) % l->ntopics;
        items[i] = (item_t){t, ++last_seq[t]};
        if (cfg.system == MERCURE) {
            /* A form: topic=<name>&data=<payload>, the payload's spaces as "+" (digits and x need nothing). */
            sb_add(&body, "topic=", 6);
            append_form_value(&body, cfg.names[t]);
            sb_add(&body, "&data=", 6);
            size_t from = body.len;
            append_payload(&body, t, items[i].seq, sent_ns);
            for (size_t k = from; k < body.len; k++)
                if (body.p[k] == ' ') body.p[k] = '+';
        } else if (cfg.system == HERALD) {
            /* The payload is digits, spaces and x: nothing to escape in JSON. */
            sb_printf(&body, "%s{\"topic\":\"%s\",\"data\":\"", i ? "," : "", cfg.names[t]);
            append_payload(&body, t, items[i].seq, sent_ns);
            sb_add(&body, "\"}", 2);
        } else {
            append_payload(&body, t, items[i].seq, sent_ns);
        }
    }
    if (n > 1) sb_add(&body, "]", 1);
    const char *name = cfg.names[items[0].topic];
    if (cfg.system == HERALD)
        sb_printf(&l->out, "POST /publish HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n", cfg.host,
                  cfg.port);
    else if (cfg.system == MERCURE)
        sb_printf(&l->out,
                  "POST /.well-known/mercure HTTP/1.1\r\nHost: %s:%d\r\n"
                  "Content-Type: application/x-www-form-urlencoded\r\n",
                  cfg.host, cfg.port);
    else if (cfg.system == NCHAN)
        sb_printf(&l->out, "POST /pub/%s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: text/plain\r\n", name, cfg.host,
                  cfg.port);
    else
        sb_printf(&l->out, "POST /publish?topic=%s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: text/plain\r\n", name,
                  cfg.host, cfg.port);
    sb_printf(&l->out, "%sContent-Length: %zu\r\n\r\n", cfg.auth, body.len);
    sb_add(&l->out, body.p, body.len);
    l->ring[slot] = (request_t){now, n};
    if (l->inflight == 0) l->waiting_since = now;
    l->inflight++;
    l->sent += n;
}

static void flush_out(pacer_t *l, double now) {
    while (l->out.len) {
        ssize_t n = send(l->fd, l->out.p, l->out.len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            want_write(l, 1);
            return;
        }
        if (n <= 0) {
            drop(l, errno == EPIPE ? "connection closed" : "connection reset", now);
            return;
        }
        sb_consume(&l->out, (size_t)n);
    }
    want_write(l, 0);
}

/* Events this pacer owes by now; how many the next request carries (0: none yet). */
static int next_request_size(pacer_t *l, double now) {
    if (l->sent >= l->quota) return 0;
    int64_t due = (int64_t)(l->rate * (now - t0)) + 1;
    if (due > l->quota) due = l->quota;
    due -= l->sent;
    if (due <= 0) return 0;
    if (due >= cfg.batch) return cfg.batch;
    /* A batch row sends full batches; only the run's last one may be short. */
    return l->sent + due == l->quota ? (int)due : 0;
}

static void pump(pacer_t *l, double now) {
    if (!going || l->fd < 0 || l->connecting || now - t0 >= cfg.duration) return;
    int queued = 0, n;
    while (l->inflight < cfg.pipeline && (n = next_request_size(l, now)) > 0) {
        queue_request(l, n, now);
        queued = 1;
    }
    if (queued) flush_out(l, now);
}

/* ---------------------------------------------------------------- answers */

static const char *find_header(const char *head, size_t len, const char *name) {
    size_t nl = strlen(name);
    for (const char *p = head; p + nl < head + len; p++) {
        if (p[0] == '\n' && strncasecmp(p + 1, name, nl) == 0) return p + 1 + nl;
    }
    return NULL;
}

/* Length of the complete response at the start of `b` (0: not all here yet; -1: not HTTP). */
static ssize_t response_length(const char *b, size_t len, int *status, int *closing) {
    const char *end = memmem(b, len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = (size_t)(end - b) + 4;
    if (len < 12 || strncmp(b, "HTTP/1.", 7) != 0) return -1;
    *status = atoi(b + 9);
    const char *conn = find_header(b, head, "connection:");
    *closing = conn && strncasecmp(conn + strspn(conn, " "), "close", 5) == 0;
    const char *te = find_header(b, head, "transfer-encoding:");
    if (te && strncasecmp(te + strspn(te, " "), "chunked", 7) == 0) {
        size_t at = head;
        for (;;) { /* chunk-size CRLF data CRLF ... 0 CRLF CRLF (small bodies: parsed whole each time) */
            const char *crlf = memmem(b + at, len - at, "\r\n", 2);
            if (!crlf) return 0;
            size_t size = strtoul(b + at, NULL, 16);
            at = (size_t)(crlf - b) + 2;
            if (size == 0) {
                const char *trailer_end = memmem(b + at, len - at, "\r\n", 2);
                return trailer_end ? (ssize_t)((size_t)(trailer_end - b) + 2) : 0;
            }
            at += size + 2;
            if (at > len) return 0;
        }
    }
    const char *cl = find_header(b, head, "content-length:");
    size_t body = cl ? strtoul(cl, NULL, 10) : 0;
    return head + body <= len ? (ssize_t)(head + body) : 0;
}

static void on_answer(pacer_t *l, int status, double now) {
    int slot = l->head;
    request_t *r = &l->ring[slot];
    item_t *items = l->items + (size_t)slot * (size_t)cfg.batch;
    requests++;
    if (status >= 200 && status < 300) {
        accepted += r->n;
        hist_record(&latency, (int64_t)((now - r->sent_at) * 1e6));
        int64_t sec = (int64_t)(now - t0);
        if (sec >= 0 && sec < MAX_SECONDS) accepted_at[sec] += r->n;
    } else {
        char name[16];
        snprintf(name, sizeof name, "%d", status);
        count_error(name, now);
        int is_refused = status >= 400 && status < 500 && status != 408 && status != 425 && status != 429;
        give_up(items, r->n, is_refused);
    }
    l->head = (l->head + 1) % cfg.pipeline;
    l->inflight--;
    l->waiting_since = now; /* the next oldest was sent no later: time its answer from here at the latest */
    last_answer = now;
}

static void on_readable(pacer_t *l, double now) {
    sb_reserve(&l->in, 65536);
    ssize_t n = recv(l->fd, l->in.p + l->in.len, l->in.cap - l->in.len - 1, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) {
        drop(l, n == 0 ? "connection closed" : "connection reset", now);
        return;
    }
    l->in.len += (size_t)n;
    for (;;) {
        int status = 0, closing = 0;
        ssize_t size = response_length(l->in.p, l->in.len, &status, &closing);
        if (size == 0) break;
        if (size < 0 || l->inflight == 0) {
            drop(l, "not an HTTP response", now);
            return;
        }
        sb_consume(&l->in, (size_t)size);
        on_answer(l, status, now);
        if (closing) {
            drop(l, "connection closed", now);
            return;
        }
    }
    pump(l, now);
}

static void on_writable(pacer_t *l, double now) {
    if (l->connecting) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(l->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || l->connecting == 2) {
            drop(l, "connect failed", now);
            return;
        }
        l->connecting = 0;
        want_write(l, 0);
        pump(l, now);
        return;
    }
    flush_out(l, now);
}

/* ------------------------------------------------------------- messages */

static int connected(void) {
    int n = 0;
    for (int i = 0; i < cfg.npacers; i++) n += pacers[i].fd >= 0 && !pacers[i].connecting;
    return n;
}

static double cpu_mark, wall_mark;

static void emit_progress(double now) {
    double cpu = cpu_seconds();
    sbuf b = {0};
    int64_t failed = 0;
    for (int i = 0; i < nerr; i++) failed += err_counts[i];
    sb_printf(&b, "{\"type\":\"progress\",\"accepted\":%lld,\"failed\":%lld,\"cpu\":%.3f}", (long long)accepted,
              (long long)failed, (cpu - cpu_mark) / (now - wall_mark > 1e-6 ? now - wall_mark : 1e-6));
    cpu_mark = cpu;
    wall_mark = now;
    emit(&b);
}

static void emit_result(double start_cpu, double end) {
    double seconds = end - t0;
    double cpu = cpu_seconds() - start_cpu;
    sbuf b = {0};
    sb_printf(&b,
              "{\"type\":\"result\",\"seconds\":%.6f,\"cpu\":%.3f,\"accepted\":%lld,\"refused\":%lld,"
              "\"uncertain\":%lld,\"requests\":%lld,\"errors\":{",
              seconds, cpu / (seconds > 1e-6 ? seconds : 1e-6), (long long)accepted, (long long)refused,
              (long long)uncertain, (long long)requests);
    for (int i = 0; i < nerr; i++) sb_printf(&b, "%s\"%s\":%lld", i ? "," : "", err_names[i], (long long)err_counts[i]);
    sb_add(&b, "},\"last\":{", 10);
    int first = 1;
    for (int t = 0; t < cfg.ntopics; t++) {
        if (!last_seq[t]) continue;
        sb_printf(&b, "%s\"%d\":%lld", first ? "" : ",", t, (long long)last_seq[t]);
        first = 0;
    }
    sb_add(&b, "},\"unaccepted\":{", 16);
    first = 1;
    for (int t = 0; t < cfg.ntopics; t++) {
        if (!unaccepted_n[t]) continue;
        sb_printf(&b, "%s\"%d\":[", first ? "" : ",", t);
        for (int i = 0; i < unaccepted_n[t]; i++) sb_printf(&b, "%s%lld", i ? "," : "", (long long)unaccepted[t][i]);
        sb_add(&b, "]", 1);
        first = 0;
    }
    const char *names[2] = {"accepted_at", "errors_at"};
    int64_t *per_second[2] = {accepted_at, errors_at};
    for (int k = 0; k < 2; k++) {
        sb_printf(&b, "},\"%s\":{", names[k]);
        first = 1;
        for (int s = 0; s < MAX_SECONDS && s <= (int)seconds + 1; s++) {
            if (!per_second[k][s]) continue;
            sb_printf(&b, "%s\"%d\":%lld", first ? "" : ",", s, (long long)per_second[k][s]);
            first = 0;
        }
    }
    sb_add(&b, "},\"latency\":", 12);
    sb_hist(&b, &latency);
    sb_add(&b, "}", 1);
    emit(&b);
}

/* ------------------------------------------------------------------ setup */

static double num(cJSON *o, const char *key, double fallback) {
    cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : fallback;
}

static void setup(cJSON *s) {
    cJSON *system = cJSON_GetObjectItemCaseSensitive(s, "system");
    cJSON *host = cJSON_GetObjectItemCaseSensitive(s, "host");
    cJSON *topics = cJSON_GetObjectItemCaseSensitive(s, "topics");
    if (!cJSON_IsString(system) || !cJSON_IsString(host) || !cJSON_IsArray(topics) || !cJSON_GetArraySize(topics)) {
        fprintf(stderr, "sse-publisher: setup needs system, host and topics\n");
        exit(2);
    }
    cfg.system = strcmp(system->valuestring, "nchan") == 0           ? NCHAN
                 : strcmp(system->valuestring, "sse-starlette") == 0 ? SSE_STARLETTE
                 : strcmp(system->valuestring, "mercure") == 0       ? MERCURE
                                                                     : HERALD;
    snprintf(cfg.host, sizeof cfg.host, "%s", host->valuestring);
    cfg.port = (int)num(s, "port", 80);
    cfg.rate = num(s, "rate", 100);
    cfg.duration = num(s, "duration", 10);
    cfg.answer_timeout = num(s, "answer_timeout", 10);
    cfg.pipeline = (int)num(s, "pipeline", 1);
    cfg.batch = (int)num(s, "batch", 1);
    cfg.size = (int)num(s, "size", 100);
    cfg.ntopics = cJSON_GetArraySize(topics);
    cfg.npacers = (int)num(s, "pacers", 1);
    if (cfg.npacers > cfg.ntopics) cfg.npacers = cfg.ntopics; /* a pacer owns at least one topic */
    if (cfg.pipeline < 1 || cfg.batch < 1 || cfg.npacers < 1 || cfg.rate <= 0 || cfg.duration <= 0 ||
        cfg.duration > MAX_SECONDS - 2 || (cfg.batch > 1 && cfg.system != HERALD)) {
        fprintf(stderr, "sse-publisher: bad setup (batches are Herald's only)\n");
        exit(2);
    }
    cJSON *token = cJSON_GetObjectItemCaseSensitive(s, "token");
    cfg.auth = "";
    if (cJSON_IsString(token) && token->valuestring[0]) {
        if (strpbrk(token->valuestring, "\r\n")) {
            fprintf(stderr, "sse-publisher: the access token holds a line break\n");
            exit(2);
        }
        sbuf header = {0};
        sb_printf(&header, "Authorization: Bearer %s\r\n", token->valuestring);
        cfg.auth = header.p;
    }
    cfg.names = xrealloc(NULL, sizeof(char *) * (size_t)cfg.ntopics);
    for (int t = 0; t < cfg.ntopics; t++) cfg.names[t] = strdup(cJSON_GetArrayItem(topics, t)->valuestring);
    last_seq = calloc((size_t)cfg.ntopics, sizeof(int64_t));
    unaccepted = calloc((size_t)cfg.ntopics, sizeof(int64_t *));
    unaccepted_n = calloc((size_t)cfg.ntopics, sizeof(int));
    unaccepted_cap = calloc((size_t)cfg.ntopics, sizeof(int));
    pacers = calloc((size_t)cfg.npacers, sizeof(pacer_t));
    for (int i = 0; i < cfg.npacers; i++) {
        pacer_t *l = &pacers[i];
        l->index = i;
        for (int t = i; t < cfg.ntopics; t += cfg.npacers) {
            l->topics = xrealloc(l->topics, sizeof(int) * (size_t)(l->ntopics + 1));
            l->topics[l->ntopics++] = t;
        }
        /* publisher.py's share: rate x (this pacer's topics / all topics); quota rounded down like its Pacer. */
        l->rate = cfg.rate * l->ntopics / cfg.ntopics;
        l->quota = (int64_t)(l->rate * cfg.duration);
        l->ring = calloc((size_t)cfg.pipeline, sizeof(request_t));
        l->items = calloc((size_t)cfg.pipeline * (size_t)cfg.batch, sizeof(item_t));
        l->fd = -1;
        start_connect(l);
    }
}

/* One line from stdin: the setup, or "go". Returns 1 once "go" was read. */
static int on_line(char *line) {
    cJSON *msg = cJSON_Parse(line);
    if (!msg) return 0;
    cJSON *s = cJSON_GetObjectItemCaseSensitive(msg, "setup");
    cJSON *cmd = cJSON_GetObjectItemCaseSensitive(msg, "cmd");
    int go = 0;
    if (cJSON_IsObject(s)) setup(s);
    else if (cJSON_IsString(cmd) && strcmp(cmd->valuestring, "go") == 0) go = 1;
    cJSON_Delete(msg);
    return go;
}

static int all_sent(void) {
    for (int i = 0; i < cfg.npacers; i++)
        if (pacers[i].sent < pacers[i].quota) return 0;
    return 1;
}

/* Seconds (monotonic) when something next needs doing without a socket event: an event falling due on a
   pacer that may send, a pacer to connect again, the end of publishing. */
static double next_wake(double now) {
    double wake = now + 1.0;
    if (going && t0 + cfg.duration < wake) wake = t0 + cfg.duration;
    for (int i = 0; i < cfg.npacers; i++) {
        pacer_t *l = &pacers[i];
        if (l->fd < 0) {
            if (l->retry_at < wake) wake = l->retry_at;
            continue;
        }
        if (l->inflight) {
            double limit = l->waiting_since + cfg.answer_timeout;
            if (limit < wake) wake = limit;
        }
        /* A pacer with every pipeline slot taken waits for an answer, not for the clock (no busy loop). */
        if (!going || l->connecting || l->inflight >= cfg.pipeline || l->sent >= l->quota) continue;
        int64_t need = l->sent + cfg.batch - 1;
        if (need > l->quota - 1) need = l->quota - 1;
        double at = t0 + (double)need / l->rate;
        if (at < wake) wake = at;
    }
    return wake;
}

int main(void) {
    epfd = epoll_create1(EPOLL_CLOEXEC);
    fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) | O_NONBLOCK);
    struct epoll_event in_ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, STDIN_FILENO, &in_ev);
    sbuf stdin_buf = {0};
    int ready_sent = 0;
    double start_cpu = 0, next_progress = 0;
    struct epoll_event events[256];
    for (;;) {
        double now = mono();
        int timeout = 1000;
        if (pacers) {
            int busy = 0;
            for (int i = 0; i < cfg.npacers; i++) {
                pacer_t *l = &pacers[i];
                if (l->fd < 0 && now >= l->retry_at && (!going || now - t0 < cfg.duration)) start_connect(l);
                if (l->fd >= 0 && l->inflight && now - l->waiting_since > cfg.answer_timeout) drop(l, "timeout", now);
                pump(l, now);
                busy |= l->inflight > 0;
            }
            if (going && !busy && (now - t0 >= cfg.duration || all_sent())) {
                /* Publishing is over: everything due was sent and answered, or time is up. */
                emit_result(start_cpu, last_answer > now ? last_answer : now);
                return 0;
            }
            if (going && now >= next_progress) {
                emit_progress(now);
                next_progress = now + 1.0;
            }
            if (!going && !ready_sent && connected() == cfg.npacers) {
                sbuf b = {0};
                sb_printf(&b, "{\"type\":\"ready\",\"connected\":%d}", cfg.npacers);
                emit(&b);
                ready_sent = 1;
            }
            double wake = next_wake(now);
            if (going && next_progress < wake) wake = next_progress;
            /* Round up to the next millisecond: never wake early and spin. */
            timeout = wake <= now ? 0 : (int)((wake - now) * 1000) + 1;
        }
        int n = epoll_wait(epfd, events, 256, timeout);
        now = mono();
        for (int i = 0; i < n; i++) {
            pacer_t *l = events[i].data.ptr;
            if (!l) {
                sb_reserve(&stdin_buf, 65536);
                ssize_t r = read(STDIN_FILENO, stdin_buf.p + stdin_buf.len, stdin_buf.cap - stdin_buf.len - 1);
                if (r <= 0) {
                    if (r == 0 || errno != EAGAIN) {
                        if (!going) return 1; /* the parent went away before "go" */
                        epoll_ctl(epfd, EPOLL_CTL_DEL, STDIN_FILENO, NULL); /* nothing more to read */
                    }
                    continue;
                }
                stdin_buf.len += (size_t)r;
                stdin_buf.p[stdin_buf.len] = 0;
                char *nl;
                while ((nl = memchr(stdin_buf.p, '\n', stdin_buf.len))) {
                    *nl = 0;
                    if (on_line(stdin_buf.p) && !going && pacers) {
                        going = 1;
                        t0 = mono();
                        start_cpu = cpu_mark = cpu_seconds();
                        wall_mark = t0;
                        next_progress = t0 + 1.0;
                    }
                    sb_consume(&stdin_buf, (size_t)(nl - stdin_buf.p) + 1);
                }
                continue;
            }
            if (l->fd < 0) continue; /* dropped earlier in this batch of events */
            if (events[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP) && (l->connecting || l->out.len))
                on_writable(l, now);
            if (l->fd >= 0 && !l->connecting && events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(l, now);
        }
    }
}
