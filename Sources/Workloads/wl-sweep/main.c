// wl-sweep: threads that rewrite their memory non-idempotently and check every page on
// every pass, to prove that a live (copy-on-write) snapshot is a point-in-time image.
//
//   wl-sweep --report PATH [--mib N] [--threads T] [--hugepages] [--hot-percent P]
//            (defaults N = 64, T = 2, P = 100; 1 <= T <= 256, 1 <= P <= 100)
//
// One anonymous private mmap of N MiB (with --hugepages aligned to 2 MiB and
// MADV_HUGEPAGE, otherwise MADV_NOHUGEPAGE) is split into T equal contiguous slices, one
// per thread (pages left over by the division belong to no thread and stay cold). Every
// 4 KiB page starts with {uint64 counter, uint64 tag}, tag = hash(thread, page, counter),
// never zero; all pages are written (counter 0) before "ready", so all are resident.
// A thread sweeps the hot part of its slice (the first P% of its pages, at least one)
// forever. For page j = position it expects counter == pass and the matching tag
// (a mismatch is counted, the first one recorded, and the page resynchronised), stores
// counter = pass + 1 and the new tag, then position = j + 1 (release); at the end of
// the hot part pass += 1 and position = 0. pass, position, the pages-swept count and
// the violation record live in the thread's 64-byte-aligned struct in .bss and are
// re-read from memory for every page. Invariant: pages before position hold pass + 1,
// the rest hold pass. An image that mixes memory from before and after its instant (a
// page or the bookkeeping copied late) breaks it, and the restored thread detects that
// on its next visit of the page; the count never goes back to zero.
// Cold pages (beyond the hot part) keep counter 0 and are checked, read-only, by the
// main thread on SIGUSR1.
//
// Protocol: writes "ready" to PATH (PATH.tmp + rename) once every page is initialised
// and every thread sweeps. On SIGUSR1 the main thread asks each worker for gettid()
// (answered between pages, no syscall otherwise), waits up to 2 s for every worker to
// answer and to sweep more pages, checks all cold pages, and writes one JSON line to
// PATH the same way:
//   {"ok":true,"progress":N,"passes_min":M,"pid":PID,"tids":[..],"threads":T,"mib":N,
//    "hot_percent":P,"violations":V,"cold_checked":C,"detail":""}
// progress = pages swept by all threads (monotonic); passes_min = fewest completed
// passes of any thread; violations = pages the sweepers found wrong (total over the
// process's life) + cold pages wrong now; cold_checked = cold pages checked this time.
// ok = no violation, every worker kept its TID and advanced. detail is "" when ok,
// otherwise the first violation's description first, then the other problems.
// SIGTERM: exit 0.
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "workload_support.h"

#define PAGE 4096UL
#define HUGE_ALIGN (2UL << 20)
#define MAXTHREADS 256
#define MAXMIB (1L << 22)   // 4 TiB: keeps the byte count far from overflow
#define PREFETCH 16         // pages ahead
#define POLL_PAGES 1024     // pages between looks at a pending TID request

struct page_header {       // at the start of every page
    _Atomic uint64_t counter;
    _Atomic uint64_t tag;
};

struct sweeper {
    // written by the worker for every page; one cache line
    _Atomic uint64_t pass;       // completed passes
    _Atomic uint64_t position;   // next page of the hot part
    _Atomic uint64_t swept;      // pages swept in total
    _Atomic uint64_t violations;
    _Atomic uint64_t answered;   // last TID request answered
    _Atomic int seen_tid;        // gettid() at that answer
    _Atomic int running;
    unsigned char *base;         // set up by main before the thread starts
    uint64_t hot;
    // next line: the rest of the set-up, the thread's start TID, the first violation
    uint64_t pages __attribute__((aligned(64)));
    int idx;
    pid_t tid;
    pthread_t th;
    _Atomic int failed;          // set (release) once the fields below are written
    uint64_t v_page, v_pass, v_want_counter, v_want_tag, v_got_counter, v_got_tag;
    uintptr_t v_addr;
} __attribute__((aligned(64)));
_Static_assert(offsetof(struct sweeper, hot) < 64, "hot fields in the first cache line");

static struct sweeper sweepers[MAXTHREADS];
static _Atomic uint64_t tid_request;
static unsigned char *region;
static uint64_t total_pages, slice_pages;
static int nthreads = 2, hot_percent = 100;
static long mib = 64;
static volatile sig_atomic_t got_usr1;

static inline uint64_t tag_for(uint64_t idx, uint64_t page, uint64_t counter) {
    uint64_t x = (idx << 48) ^ page ^ (counter * 0x9E3779B97F4A7C15ULL);
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return x ? x : 0x5157A5;
}

static inline struct page_header *page_at(unsigned char *base, uint64_t j) {
    return (struct page_header *)(base + j * PAGE);
}

// ---- worker -----------------------------------------------------------------------
static void answer_tid_request(struct sweeper *s) {
    uint64_t req = atomic_load_explicit(&tid_request, memory_order_acquire);
    if (req != atomic_load_explicit(&s->answered, memory_order_relaxed)) {
        atomic_store_explicit(&s->seen_tid, gettid(), memory_order_relaxed);
        atomic_store_explicit(&s->answered, req, memory_order_release);
    }
}

__attribute__((noinline, cold)) static void violation(struct sweeper *s, uint64_t j, uint64_t pass,
                                                       uint64_t got_counter, uint64_t got_tag) {
    uint64_t v = atomic_load_explicit(&s->violations, memory_order_relaxed);
    atomic_store_explicit(&s->violations, v + 1, memory_order_relaxed);
    if (atomic_load_explicit(&s->failed, memory_order_relaxed))
        return;
    s->v_page = j;
    s->v_pass = pass;
    s->v_want_counter = pass;
    s->v_want_tag = tag_for((uint64_t)s->idx, j, pass);
    s->v_got_counter = got_counter;
    s->v_got_tag = got_tag;
    s->v_addr = (uintptr_t)page_at(s->base, j);
    atomic_store_explicit(&s->failed, 1, memory_order_release);
}

static void *sweep_main(void *arg) {
    struct sweeper *s = arg;
    const uint64_t idx = (uint64_t)s->idx;
    for (uint64_t j = 0; j < s->pages; j++) { // first touch by the owner, in parallel
        struct page_header *h = page_at(s->base, j);
        atomic_store_explicit(&h->counter, 0, memory_order_relaxed);
        atomic_store_explicit(&h->tag, tag_for(idx, j, 0), memory_order_relaxed);
    }
    s->tid = gettid();
    atomic_store_explicit(&s->seen_tid, s->tid, memory_order_relaxed);
    atomic_store_explicit(&s->running, 1, memory_order_release);

    unsigned poll = 0;
    for (;;) {
        // The bookkeeping is re-read from memory for every page, never carried in registers.
        uint64_t pass = atomic_load_explicit(&s->pass, memory_order_relaxed);
        uint64_t j = atomic_load_explicit(&s->position, memory_order_relaxed);
        unsigned char *base = s->base;
        uint64_t hot = s->hot;
        if (j >= hot) {
            atomic_store_explicit(&s->pass, pass + 1, memory_order_relaxed);
            atomic_store_explicit(&s->position, 0, memory_order_release);
            answer_tid_request(s);
            continue;
        }
        if (j + PREFETCH < hot)
            __builtin_prefetch(base + (j + PREFETCH) * PAGE, 1, 3);
        struct page_header *h = page_at(base, j);
        uint64_t c = atomic_load_explicit(&h->counter, memory_order_relaxed);
        uint64_t t = atomic_load_explicit(&h->tag, memory_order_relaxed);
        if (__builtin_expect(c != pass || t != tag_for(idx, j, pass), 0))
            violation(s, j, pass, c, t); // the stores below resynchronise the page
        atomic_store_explicit(&h->counter, pass + 1, memory_order_relaxed);
        atomic_store_explicit(&h->tag, tag_for(idx, j, pass + 1), memory_order_relaxed);
        atomic_store_explicit(&s->position, j + 1, memory_order_release);
        atomic_store_explicit(&s->swept, atomic_load_explicit(&s->swept, memory_order_relaxed) + 1,
                              memory_order_relaxed);
        if (++poll == POLL_PAGES) {
            poll = 0;
            answer_tid_request(s);
        }
    }
    return NULL;
}

// ---- main thread ----------------------------------------------------------------------
static void on_signal(int sig) {
    if (sig == SIGUSR1)
        got_usr1 = 1;
    else
        _exit(0);
}

static char detail[4096];
static size_t detail_len;
static void add_detail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void add_detail(const char *fmt, ...) {
    if (detail_len >= sizeof detail)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(detail + detail_len, sizeof detail - detail_len, fmt, ap);
    va_end(ap);
    if (n > 0)
        detail_len += (size_t)n;
}

static void report(const char *path) {
    static char buf[32768], esc[8192];
    int ok = 1;
    detail_len = 0;
    detail[0] = 0;

    // Ask every worker for its TID and wait (up to 2 s) until each answered and advanced.
    uint64_t req = atomic_fetch_add(&tid_request, 1) + 1;
    uint64_t start[MAXTHREADS];
    for (int i = 0; i < nthreads; i++)
        start[i] = atomic_load(&sweepers[i].swept);
    long long deadline = mono_ms() + 2000;
    for (int i = 0; i < nthreads; i++)
        while ((atomic_load(&sweepers[i].swept) == start[i] ||
                atomic_load_explicit(&sweepers[i].answered, memory_order_acquire) != req) &&
               mono_ms() < deadline)
            sleep_ms(1);

    // Sweep violations first, so that detail starts with the first one.
    uint64_t violations = 0;
    for (int i = 0; i < nthreads; i++) {
        struct sweeper *s = &sweepers[i];
        uint64_t v = atomic_load(&s->violations);
        violations += v;
        if (atomic_load_explicit(&s->failed, memory_order_acquire)) {
            ok = 0;
            add_detail("thread %d (tid %d): page %llu of its slice (page %llu of the region, address 0x%llx) in "
                       "pass %llu: expected counter %llu tag 0x%016llx, found counter %llu tag 0x%016llx "
                       "(violations in this thread: %llu); ",
                       i, (int)s->tid, (unsigned long long)s->v_page,
                       (unsigned long long)((uint64_t)i * slice_pages + s->v_page), (unsigned long long)s->v_addr,
                       (unsigned long long)s->v_pass, (unsigned long long)s->v_want_counter,
                       (unsigned long long)s->v_want_tag, (unsigned long long)s->v_got_counter,
                       (unsigned long long)s->v_got_tag, (unsigned long long)v);
        } else if (v) {
            ok = 0;
            add_detail("thread %d: %llu violations; ", i, (unsigned long long)v);
        }
    }

    // Cold pages: never written after start, read-only here.
    uint64_t cold_checked = 0, cold_bad = 0;
    for (int i = 0; i <= nthreads; i++) { // i == nthreads: the pages no thread owns
        uint64_t first = i < nthreads ? sweepers[i].hot : 0;
        uint64_t end = i < nthreads ? slice_pages : total_pages - (uint64_t)nthreads * slice_pages;
        unsigned char *base = region + (uint64_t)i * slice_pages * PAGE;
        for (uint64_t j = first; j < end; j++) {
            struct page_header *h = page_at(base, j);
            uint64_t c = atomic_load_explicit(&h->counter, memory_order_relaxed);
            uint64_t t = atomic_load_explicit(&h->tag, memory_order_relaxed);
            uint64_t want = tag_for((uint64_t)i, j, 0);
            cold_checked++;
            if (c != 0 || t != want) {
                if (!cold_bad++)
                    add_detail("cold page %llu of %s %d (page %llu of the region, address 0x%llx): expected "
                               "counter 0 tag 0x%016llx, found counter %llu tag 0x%016llx; ",
                               (unsigned long long)j, i < nthreads ? "thread" : "leftover slice", i,
                               (unsigned long long)((uint64_t)i * slice_pages + j), (unsigned long long)(uintptr_t)h,
                               (unsigned long long)want, (unsigned long long)c, (unsigned long long)t);
                ok = 0;
            }
        }
    }
    if (cold_bad > 1)
        add_detail("%llu cold pages wrong; ", (unsigned long long)cold_bad);
    violations += cold_bad;

    uint64_t progress = 0, passes_min = UINT64_MAX;
    for (int i = 0; i < nthreads; i++) {
        struct sweeper *s = &sweepers[i];
        uint64_t now = atomic_load(&s->swept);
        progress += now;
        uint64_t p = atomic_load(&s->pass);
        if (p < passes_min)
            passes_min = p;
        if (now == start[i]) {
            ok = 0;
            add_detail("thread %d (tid %d) made no progress in 2 s (stuck at %llu pages swept); ", i, (int)s->tid,
                       (unsigned long long)now);
        }
        if (atomic_load_explicit(&s->answered, memory_order_acquire) != req) {
            ok = 0;
            add_detail("thread %d (tid %d) did not report its TID within 2 s; ", i, (int)s->tid);
        } else if (atomic_load(&s->seen_tid) != s->tid) {
            ok = 0;
            add_detail("thread %d: gettid() is %d, was %d at start; ", i, atomic_load(&s->seen_tid), (int)s->tid);
        }
    }
    if (ok)
        detail[0] = 0;
    else if (detail_len >= 2 && detail_len < sizeof detail && detail[detail_len - 2] == ';')
        detail[detail_len - 2] = 0; // drop the last "; "
    json_str(esc, sizeof esc, detail);
    size_t n = (size_t)snprintf(buf, sizeof buf, "{\"ok\":%s,\"progress\":%llu,\"passes_min\":%llu,\"pid\":%d,\"tids\":[",
                                ok ? "true" : "false", (unsigned long long)progress,
                                (unsigned long long)passes_min, (int)getpid());
    for (int i = 0; i < nthreads; i++)
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%d", i ? "," : "", (int)sweepers[i].tid);
    snprintf(buf + n, sizeof buf - n,
             "],\"threads\":%d,\"mib\":%ld,\"hot_percent\":%d,\"violations\":%llu,\"cold_checked\":%llu,"
             "\"detail\":\"%s\"}\n",
             nthreads, mib, hot_percent, (unsigned long long)violations, (unsigned long long)cold_checked, esc);
    if (write_atomic(path, buf) != 0)
        perror("wl-sweep: writing report");
}

static void usage(void) {
    fprintf(stderr, "usage: wl-sweep --report PATH [--mib N (>= 1)] [--threads T (1..%d)] [--hugepages] "
                    "[--hot-percent P (1..100)]\n", MAXTHREADS);
    exit(2);
}

static long parse_num(const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        usage();
    return v;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    int huge = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--report") && i + 1 < argc)
            path = argv[++i];
        else if (!strcmp(argv[i], "--mib") && i + 1 < argc)
            mib = parse_num(argv[++i], 1, MAXMIB);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            nthreads = (int)parse_num(argv[++i], 1, MAXTHREADS);
        else if (!strcmp(argv[i], "--hot-percent") && i + 1 < argc)
            hot_percent = (int)parse_num(argv[++i], 1, 100);
        else if (!strcmp(argv[i], "--hugepages"))
            huge = 1;
        else
            usage();
    }
    size_t bytes = (size_t)mib << 20;
    total_pages = bytes / PAGE;
    slice_pages = total_pages / (uint64_t)nthreads;
    if (!path || slice_pages < 1)
        usage();

    // One private anonymous mapping; with --hugepages over-allocate and trim to 2 MiB alignment.
    size_t extra = huge ? HUGE_ALIGN : 0;
    unsigned char *raw = mmap(NULL, bytes + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
        perror("wl-sweep: mmap");
        return 1;
    }
    region = raw;
    if (huge) {
        region = (unsigned char *)(((uintptr_t)raw + HUGE_ALIGN - 1) & ~(uintptr_t)(HUGE_ALIGN - 1));
        size_t head = (size_t)(region - raw), tail = extra - head;
        if (head)
            munmap(raw, head);
        if (tail)
            munmap(region + bytes, tail);
    }
    if (madvise(region, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0)
        fprintf(stderr, "wl-sweep: madvise(%s): %s (continuing)\n", huge ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE",
                strerror(errno));
    // Pages no thread owns (when T does not divide the page count): written once, checked as cold.
    unsigned char *left = region + (uint64_t)nthreads * slice_pages * PAGE;
    for (uint64_t j = 0; j < total_pages - (uint64_t)nthreads * slice_pages; j++) {
        struct page_header *h = page_at(left, j);
        atomic_store_explicit(&h->counter, 0, memory_order_relaxed);
        atomic_store_explicit(&h->tag, tag_for((uint64_t)nthreads, j, 0), memory_order_relaxed);
    }

    sigset_t old;
    install_report_signals(on_signal, &old); // threads inherit the block: signals go to main

    for (int i = 0; i < nthreads; i++) {
        struct sweeper *s = &sweepers[i];
        s->idx = i;
        s->base = region + (uint64_t)i * slice_pages * PAGE;
        s->pages = slice_pages;
        s->hot = slice_pages * (uint64_t)hot_percent / 100;
        if (s->hot < 1)
            s->hot = 1;
        if (pthread_create(&s->th, NULL, sweep_main, s) != 0) {
            perror("wl-sweep: pthread_create");
            return 1;
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    for (int i = 0; i < nthreads; i++)
        while (!atomic_load_explicit(&sweepers[i].running, memory_order_acquire) ||
               atomic_load(&sweepers[i].swept) == 0)
            sleep_ms(1);
    if (write_atomic(path, "ready\n") != 0) {
        perror("wl-sweep: writing ready");
        return 1;
    }
    for (;;) { // SIGTERM exits from the handler
        if (got_usr1) {
            got_usr1 = 0;
            report(path);
            continue;
        }
        sleep_ms(10);
    }
}
