/* Herald load tool: what the compiled subscriber worker and publisher share.
 *
 * Included once by each program (each is one translation unit); define
 * PROGRAM_NAME first, for the messages. Clocks, the growable buffer the
 * JSON-lines protocol with the parent is written in, and the histogram of
 * workers/loadtest/histogram.py (same buckets, so the parent merges them).
 */
#ifndef HERALD_LOADTEST_COMMON_H
#define HERALD_LOADTEST_COMMON_H

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef PROGRAM_NAME
#error "define PROGRAM_NAME before including common.h"
#endif

/* Wall clock in ns: publish times are time.time_ns(), subscribers subtract them from theirs. */
static int64_t wall_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts); /* publish times are time.time_ns() */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        perror(PROGRAM_NAME ": out of memory");
        exit(3);
    }
    return q;
}

/* A growable string (JSON lines for the parent). */
typedef struct {
    char *p;
    size_t len, cap;
} sbuf;

static void sb_reserve(sbuf *b, size_t more) {
    if (b->len + more + 1 > b->cap) {
        b->cap = (b->len + more + 1) * 2;
        b->p = xrealloc(b->p, b->cap);
    }
}

static void sb_add(sbuf *b, const char *s, size_t n) {
    sb_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void sb_printf(sbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    sb_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* One JSON line to the parent; exits when the parent is gone. */
static void emit(sbuf *b) {
    sb_add(b, "\n", 1);
    size_t off = 0;
    while (off < b->len) {
        ssize_t n = write(STDOUT_FILENO, b->p + off, b->len - off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) exit(4); /* the parent is gone */
        off += (size_t)n;
    }
    free(b->p); /* every message is built in its own buffer, sent once */
    *b = (sbuf){0};
}

/* The histogram of histogram.py. */
#define SUB_BITS 8
#define MAX_SHIFT 40
#define HSIZE ((MAX_SHIFT << (SUB_BITS - 1)) + (1 << SUB_BITS))

typedef struct {
    uint32_t counts[HSIZE];
    int64_t count, total, max;
} hist_t;

static void hist_record(hist_t *h, int64_t v) {
    int idx;
    if (v < 256) {
        idx = v > 0 ? (int)v : 0;
    } else {
        int shift = 64 - __builtin_clzll((uint64_t)v) - SUB_BITS;
        if (shift > MAX_SHIFT) shift = MAX_SHIFT;
        idx = (shift << (SUB_BITS - 1)) + (int)(v >> shift);
    }
    h->counts[idx]++;
    h->count++;
    h->total += v;
    if (v > h->max) h->max = v;
}

static void sb_hist(sbuf *b, const hist_t *h) {
    sb_add(b, "{\"buckets\":[", 12);
    int first = 1;
    for (int i = 0; i < HSIZE; i++) {
        if (h->counts[i]) {
            sb_printf(b, "%s[%d,%u]", first ? "" : ",", i, h->counts[i]);
            first = 0;
        }
    }
    sb_printf(b, "],\"count\":%lld,\"total\":%lld,\"max\":%lld}", (long long)h->count, (long long)h->total,
              (long long)h->max);
}

#endif
