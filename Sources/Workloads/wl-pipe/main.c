// wl-pipe: a three-process shell pipeline whose data lives in two pipes and in the
// processes' own buffers, checked number by number at its end.
//
//   sh -c 'wl-pipe produce [--rate N] | wl-pipe filter | wl-pipe consume --report PATH'
//
// produce  writes "1\n2\n3\n..." to stdout forever, in write(2)s of at most 4 KiB
//          (full-write loops). Default: as fast as the pipe takes them, sleeping 1 ms
//          after every 1000 lines. --rate N (1..10^7): N lines per second, in batches
//          every 10 ms; after a freeze (a tick late by more than 200 ms) the schedule
//          restarts from the current line instead of catching up in a burst.
// filter   reads stdin in read(2)s of 4 KiB, keeping a partial last line across reads,
//          and turns every input line "N" into "N K D\n": K is the filter's own count of
//          lines read so far (1, 2, ...) and D = 2*N (mod 2^64). A line that is not a plain
//          decimal number (or is longer than 40 bytes) becomes "bad K\n". The output is
//          collected in an 8 KiB buffer, written (full-write loop) whenever it fills and
//          after the lines of each read are done, so unconsumed input and unwritten output
//          both live in its memory while it is blocked.
// consume  reads stdin the same way and checks every line: it must be "N K D" (plain
//          decimals, single spaces) with N == previous N + 1 (the first N == 1), K == N
//          (the filter saw every number exactly once) and D == 2*N. A failure is counted,
//          the first one described, and the check resynchronises (N becomes the new
//          previous number, K - N the new expected offset), so one fault counts once.
//          EOF on stdin (the filter died) or a read error is a failure too; the consumer
//          then keeps running so that it can report it. The consumer paces itself: it
//          sleeps 1 ms after every 500 lines, half the producer's default rate, so the
//          pipes stay mostly full and the producer and filter mostly blocked in write(2),
//          without the pipeline pegging a CPU.
//
// Protocol (consume): writes "ready" to PATH (PATH.tmp + rename) once the first line has
// arrived and been checked. SIGUSR1 (no SA_RESTART: it interrupts the blocking read(2)
// with EINTR) asks for a report: the consumer keeps reading until a number beyond the last
// one seen when the signal came has arrived (so beyond the previous report's too), for at
// most 2 s of running time (see wait_budget: a freeze does not count), then writes one
// JSON line the same way:
//   {"ok":true,"progress":N,"pid":P,"lines":L,"errors":E,"detail":"..."}
// progress = the last N seen; lines = lines read; errors = failures so far. ok = no
// failure so far and progress advanced. detail: the first failures, or a summary when ok.
// Up to ~50,000 lines can be buffered in the two pipes and the filter, so a producer that
// stopped just before the signal can still pass one report; the next one fails.
// Signals, all roles: SIGTERM exits 0; SIGPIPE is ignored (a write to a pipe without a
// reader returns EPIPE, and then produce and filter exit 0); produce and filter ignore
// SIGUSR1.
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "workload_support.h"

#define CHUNK 4096          // read(2) size, and the producer's largest write(2)
#define FILTER_OUT 8192     // the filter's output buffer
#define MAX_LINE 63         // longest line the consumer accepts (the filter: 40)
#define CONSUME_BATCH 500   // lines between the consumer's 1 ms pauses
#define PRODUCE_BATCH 1000  // lines between the producer's 1 ms pauses (default mode)

static volatile sig_atomic_t got_usr1;

static void on_signal(int sig) {
    if (sig == SIGUSR1)
        got_usr1 = 1;
    else
        _exit(0);
}

static _Noreturn void usage(void) {
    fprintf(stderr, "usage: wl-pipe produce [--rate N (1..10000000 lines/s)]\n"
                    "       wl-pipe filter\n"
                    "       wl-pipe consume --report PATH\n");
    exit(2);
}

// produce and filter: SIGTERM exits 0, SIGUSR1 and SIGPIPE are ignored.
static void plain_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGPIPE, &sa, NULL);
}

// Appends n in decimal to p; returns the number of characters written (at most 20).
static size_t put_u64(char *p, uint64_t n) {
    char tmp[20];
    size_t k = 0;
    do {
        tmp[k++] = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    for (size_t i = 0; i < k; i++)
        p[i] = tmp[k - 1 - i];
    return k;
}

// Parses a plain decimal (digits only, no leading zero, no overflow) at *p, advancing *p.
static int get_u64(const char **p, const char *end, uint64_t *out) {
    const char *s = *p;
    uint64_t v = 0;
    if (s == end || *s < '1' || *s > '9')
        return -1;
    for (; s < end && *s >= '0' && *s <= '9'; s++) {
        unsigned d = (unsigned)(*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *p = s;
    *out = v;
    return 0;
}

// Writes the *len bytes of buf to stdout (full-write loop) and empties it (*len = 0). A
// reader that went away (EPIPE) ends the process quietly (exit 0), another error with 1.
static void flush_out(const char *role, const char *buf, size_t *len) {
    if (write_all(STDOUT_FILENO, buf, *len) == 0) {
        *len = 0;
        return;
    }
    if (errno == EPIPE)
        _exit(0);
    fprintf(stderr, "wl-pipe %s: write: %s\n", role, strerror(errno));
    _exit(1);
}

// Splits a byte stream into lines across reads. A line is kept in buf without its
// newline; a line longer than cap keeps its first cap bytes and is marked too_long.
struct line_splitter {
    char *buf;
    size_t cap, len;
    int too_long;
};

// Feeds the `got` bytes of `in`: calls fn(line, len, too_long) for every line completed
// by a newline, in order; a partial last line stays in s for the next call.
static void split_lines(struct line_splitter *s, const char *in, ssize_t got,
                        void (*fn)(const char *line, size_t len, int too_long)) {
    for (ssize_t i = 0; i < got; i++) {
        char c = in[i];
        if (c == '\n') {
            fn(s->buf, s->len, s->too_long);
            s->len = 0;
            s->too_long = 0;
        } else if (s->len < s->cap) {
            s->buf[s->len++] = c;
        } else {
            s->too_long = 1;
        }
    }
}

// ---- produce ---------------------------------------------------------------------------
static char pbuf[CHUNK];
static size_t plen;

static void produce_line(uint64_t n) {
    if (plen + 21 > sizeof pbuf)
        flush_out("produce", pbuf, &plen);
    plen += put_u64(pbuf + plen, n);
    pbuf[plen++] = '\n';
}

static int produce(long rate) {
    plain_signals();
    uint64_t n = 0;
    if (rate == 0) {
        for (;;) {
            produce_line(++n);
            if (n % PRODUCE_BATCH == 0) {
                flush_out("produce", pbuf, &plen);
                sleep_ms(1);
            }
        }
    }
    long long t0 = mono_ms(), last = t0;
    uint64_t base = 0; // lines written before t0
    for (;;) {
        long long now = mono_ms();
        if (now - last > 200 || now < last) { // frozen (or clock trouble): restart the schedule
            t0 = now;
            base = n;
        }
        last = now;
        uint64_t due = base + (uint64_t)((now - t0) * (long long)rate / 1000);
        while (n < due)
            produce_line(++n);
        if (plen)
            flush_out("produce", pbuf, &plen);
        sleep_ms(10);
    }
}

// ---- filter ----------------------------------------------------------------------------
static char fout[FILTER_OUT];
static size_t flen;
static uint64_t filter_lines; // K: lines read so far

static void filter_line(const char *s, size_t len, int too_long) {
    uint64_t k = ++filter_lines;
    if (flen + 64 > sizeof fout)
        flush_out("filter", fout, &flen);
    const char *p = s, *end = s + len;
    uint64_t n;
    if (too_long || len > 40 || get_u64(&p, end, &n) != 0 || p != end) {
        memcpy(fout + flen, "bad ", 4);
        flen += 4;
        flen += put_u64(fout + flen, k);
    } else {
        flen += put_u64(fout + flen, n);
        fout[flen++] = ' ';
        flen += put_u64(fout + flen, k);
        fout[flen++] = ' ';
        flen += put_u64(fout + flen, n * 2);
    }
    fout[flen++] = '\n';
}

static int filter(void) {
    plain_signals();
    static char in[CHUNK];
    char line[48];
    struct line_splitter split = {line, sizeof line, 0, 0};
    for (;;) {
        ssize_t got = read(STDIN_FILENO, in, sizeof in);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "wl-pipe filter: read: %s\n", strerror(errno));
            return 1;
        }
        if (got == 0) { // producer gone; a partial last line is dropped
            flush_out("filter", fout, &flen);
            return 0;
        }
        split_lines(&split, in, got, filter_line);
        if (flen)
            flush_out("filter", fout, &flen);
    }
}

// ---- consume ---------------------------------------------------------------------------
static uint64_t last_n;   // the last N seen (0 before the first line)
static int64_t k_offset;  // expected K - N (0 unless a fault was seen)
static uint64_t lines, errors;
static struct detail problems;

static void failure(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void failure(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (errors++ < 8) // the first ones are described; the count has the rest
        detail_add(&problems, "%s", msg);
}

static void consume_line(const char *s, size_t len, int too_long) {
    uint64_t at = ++lines;
    if (too_long) {
        failure("line %" PRIu64 " (after N=%" PRIu64 "): longer than %d bytes", at, last_n, MAX_LINE);
        return;
    }
    if (len >= 4 && !memcmp(s, "bad ", 4)) {
        failure("line %" PRIu64 " (after N=%" PRIu64 "): the filter read a malformed line: \"%.*s\"", at, last_n,
                (int)len, s);
        return;
    }
    const char *p = s, *end = s + len;
    uint64_t n, k, d;
    if (get_u64(&p, end, &n) || p == end || *p++ != ' ' || get_u64(&p, end, &k) || p == end || *p++ != ' ' ||
        get_u64(&p, end, &d) || p != end) {
        failure("line %" PRIu64 " (after N=%" PRIu64 "): malformed: \"%.*s\"", at, last_n, (int)len, s);
        return;
    }
    uint64_t want_k = n + (uint64_t)k_offset;
    if (n != last_n + 1)
        failure("line %" PRIu64 ": expected N=%" PRIu64 ", got %" PRIu64 " (%s)", at, last_n + 1, n,
                k == want_k ? "lost or repeated between the filter and the consumer"
                            : "lost or repeated before the filter, which counts this line as its line "
                              "K accordingly");
    else if (k != want_k)
        failure("line %" PRIu64 ": N=%" PRIu64 " but the filter's line count K=%" PRIu64 ", expected %" PRIu64
                " (lines lost or repeated between the producer and the filter, or the filter's count is wrong)",
                at, n, k, want_k);
    if (d != n * 2)
        failure("line %" PRIu64 ": N=%" PRIu64 " D=%" PRIu64 ", expected %" PRIu64, at, n, d, n * 2);
    last_n = n;
    k_offset = (int64_t)(k - n);
}

static void consume_report(const char *path, uint64_t previous, int stopped) {
    static char buf[16384], esc[8192];
    static struct detail d; // the failures so far, plus this report's own
    d = problems;
    int advanced = last_n > previous;
    if (!advanced)
        detail_add(&d, "no number beyond %" PRIu64 " arrived %s", previous,
                   stopped ? "(no more input)" : "within 2 s");
    int ok = d.problems == 0;
    if (ok)
        snprintf(d.text, sizeof d.text, "%" PRIu64 " lines checked, last N %" PRIu64, lines, last_n);
    json_str(esc, sizeof esc, d.text);
    snprintf(buf, sizeof buf,
             "{\"ok\":%s,\"progress\":%" PRIu64 ",\"pid\":%d,\"lines\":%" PRIu64 ",\"errors\":%" PRIu64
             ",\"detail\":\"%s\"}\n",
             ok ? "true" : "false", last_n, (int)getpid(), lines, errors, esc);
    if (write_atomic(path, buf) != 0)
        perror("wl-pipe consume: writing report");
}

static int consume(const char *path) {
    sigset_t old;
    install_report_signals(on_signal, &old); // single-threaded: just installs the handlers
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    struct sigaction ign;
    memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &ign, NULL);
    detail_clear(&problems);

    static char in[CHUNK];
    char line[MAX_LINE];
    struct line_splitter split = {line, sizeof line, 0, 0};
    int ready = 0, stopped = 0, pending = 0;
    uint64_t baseline = 0; // last N when the pending report was asked for
    unsigned paced = 0;
    struct wait_budget budget;
    for (;;) {
        if (got_usr1) {
            got_usr1 = 0;
            if (!pending) {
                pending = 1;
                baseline = last_n;
                budget_start(&budget, 2000);
            }
        }
        if (pending && (last_n > baseline || stopped || budget_left(&budget) == 0)) {
            consume_report(path, baseline, stopped);
            pending = 0;
            continue;
        }
        if (stopped) { // nothing more will arrive; stay around to report it
            sleep_ms(pending ? 10 : 1000);
            continue;
        }
        if (pending) { // do not block for long: the report may have to say "no progress"
            struct pollfd pfd = {.fd = STDIN_FILENO, .events = POLLIN};
            if (poll(&pfd, 1, 10) <= 0)
                continue; // timeout, or EINTR
        }
        ssize_t got = read(STDIN_FILENO, in, sizeof in);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            failure("read from stdin: %s (after N=%" PRIu64 ")", strerror(errno), last_n);
            stopped = 1;
            continue;
        }
        if (got == 0) {
            failure("EOF on stdin after N=%" PRIu64 " (the filter is gone)%s", last_n,
                    split.len ? ", with a partial line" : "");
            stopped = 1;
            continue;
        }
        uint64_t before = lines;
        split_lines(&split, in, got, consume_line);
        if (!ready && lines > 0) {
            if (write_atomic(path, "ready\n") != 0) {
                perror("wl-pipe consume: writing ready");
                return 1;
            }
            ready = 1;
        }
        paced += (unsigned)(lines - before);
        while (paced >= CONSUME_BATCH) {
            paced -= CONSUME_BATCH;
            sleep_ms(1);
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 2)
        usage();
    const char *role = argv[1];
    if (!strcmp(role, "produce")) {
        long rate = 0;
        for (int i = 2; i < argc; i++) {
            if (!strcmp(argv[i], "--rate") && i + 1 < argc) {
                if (parse_long(argv[++i], 1, 10000000, &rate) != 0)
                    usage();
            } else {
                usage();
            }
        }
        return produce(rate);
    }
    if (!strcmp(role, "filter")) {
        if (argc != 2)
            usage();
        return filter();
    }
    if (!strcmp(role, "consume")) {
        const char *path = NULL;
        for (int i = 2; i < argc; i++) {
            if (!strcmp(argv[i], "--report") && i + 1 < argc)
                path = argv[++i];
            else
                usage();
        }
        if (!path)
            usage();
        return consume(path);
    }
    usage();
}
