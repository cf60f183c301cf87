// wl-bench: a memory workload for benchmarks.
//
//   wl-bench --mb N [--threads T] [--hot-percent P] [--huge] [--write-rate R]
//
// Maps N MiB of anonymous memory (--huge: 2 MiB aligned + MADV_HUGEPAGE) and fills
// every 8-byte word with xorshift64 output (seeded per page, never zero, no
// repeated pages), starts T threads (default 1), then prints "ready" on stdout.
// Threads sleep in 10 ms steps, unless --hot-percent P is given: then the first
// P% of the pages are split between the threads, and each thread keeps writing
// one word in every page of its share, as fast as it can or, with
// --write-rate R, at R MiB/s of dirtied pages in total (R*256 page writes/s;
// --write-rate alone implies --hot-percent 100). On SIGUSR1 it prints
// "progress X" (total page writes so far). SIGTERM: exit 0.
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "workload_support.h"

#define PG 4096UL
#define HUGE_SZ (2UL * 1024 * 1024)

struct worker {
    _Atomic uint64_t writes; // completed page writes
    size_t first, end;       // page range
    int idx;
} __attribute__((aligned(64)));

static uint64_t *mem;
static double rate_per_ns; // page writes per ns per thread; 0 = unlimited
static volatile sig_atomic_t got_usr1, got_term;

static void on_signal(int sig) {
    if (sig == SIGUSR1)
        got_usr1 = 1;
    else
        got_term = 1;
}
static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}
static uint64_t seed(uint64_t x) { // splitmix64; | 1 keeps xorshift away from 0
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return (x ^ (x >> 31)) | 1;
}
static inline uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void *worker_main(void *arg) {
    struct worker *w = arg;
    uint64_t x = seed(0xB3AC4ULL + (uint64_t)w->idx), n = 0, pass = 0;
    if (w->first == w->end)
        for (;;)
            sleep_ms(10);
    size_t pg = w->first;
    double credit = 0;
    int64_t last = now_ns();
    for (;;) {
        size_t todo = (size_t)-1;
        if (rate_per_ns > 0) {
            int64_t t = now_ns(), dt = t - last;
            last = t;
            if (dt < 0 || dt > 100000000) // clock jump (e.g. restored after a pause): no burst
                dt = 1000000;
            credit += (double)dt * rate_per_ns;
            if (credit > rate_per_ns * 20e6) // at most 20 ms worth of backlog
                credit = rate_per_ns * 20e6;
            todo = (size_t)credit;
            credit -= (double)todo;
        }
        for (size_t i = 0; i < todo; i++) {
            mem[pg * (PG / 8) + (pass & (PG / 8 - 1))] = xorshift(&x);
            atomic_store_explicit(&w->writes, ++n, memory_order_relaxed);
            if (++pg == w->end) {
                pg = w->first;
                pass++;
                if (rate_per_ns == 0)
                    break; // look at nothing else, just go round again
            }
        }
        if (rate_per_ns > 0)
            sleep_ms(1);
    }
    return NULL;
}

int main(int argc, char **argv) {
    long mb = 0, threads = 1;
    double hot = -1, rate = 0;
    int huge = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mb") && i + 1 < argc) mb = atol(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atol(argv[++i]);
        else if (!strcmp(argv[i], "--hot-percent") && i + 1 < argc) hot = atof(argv[++i]);
        else if (!strcmp(argv[i], "--write-rate") && i + 1 < argc) rate = atof(argv[++i]);
        else if (!strcmp(argv[i], "--huge")) huge = 1;
        else mb = -1, i = argc;
    }
    if (hot < 0)
        hot = rate > 0 ? 100 : 0;
    if (mb < 1 || threads < 1 || threads > 1024 || hot > 100 || rate < 0) {
        fprintf(stderr, "usage: wl-bench --mb N [--threads T] [--hot-percent P] [--huge] [--write-rate MiB/s]\n");
        return 2;
    }
    size_t len = (size_t)mb << 20, npages = len / PG;
    char *p = mmap(NULL, len + (huge ? HUGE_SZ : 0), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("wl-bench: mmap");
        return 1;
    }
    if (huge) { // trim to a 2 MiB aligned range
        char *a = (char *)(((uintptr_t)p + HUGE_SZ - 1) & ~(HUGE_SZ - 1));
        if (a > p)
            munmap(p, (size_t)(a - p));
        if (a + len < p + len + HUGE_SZ)
            munmap(a + len, (size_t)(p + len + HUGE_SZ - (a + len)));
        p = a;
        if (madvise(p, len, MADV_HUGEPAGE))
            perror("wl-bench: madvise(MADV_HUGEPAGE)");
    }
    mem = (uint64_t *)p;
    for (size_t pg = 0; pg < npages; pg++) {
        uint64_t x = seed(pg), *w = mem + pg * (PG / 8);
        for (size_t i = 0; i < PG / 8; i++)
            w[i] = xorshift(&x);
    }

    sigset_t old;
    install_report_signals(on_signal, &old); // threads inherit the block: signals go to main

    size_t hot_pages = (size_t)((double)npages * hot / 100.0);
    if (hot > 0 && hot_pages == 0)
        hot_pages = 1;
    rate_per_ns = rate * 256.0 / (double)threads / 1e9;
    struct worker *ws = aligned_alloc(64, sizeof *ws * (size_t)threads);
    if (!ws)
        return 1;
    memset(ws, 0, sizeof *ws * (size_t)threads);
    for (long t = 0; t < threads; t++) {
        pthread_t th;
        ws[t].idx = (int)t;
        ws[t].first = hot_pages * (size_t)t / (size_t)threads;
        ws[t].end = hot_pages * (size_t)(t + 1) / (size_t)threads;
        if (pthread_create(&th, NULL, worker_main, &ws[t])) {
            perror("wl-bench: pthread_create");
            return 1;
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    printf("ready\n");
    fflush(stdout);
    while (!got_term) {
        if (got_usr1) {
            got_usr1 = 0;
            uint64_t total = 0;
            for (long t = 0; t < threads; t++)
                total += atomic_load_explicit(&ws[t].writes, memory_order_relaxed);
            printf("progress %llu\n", (unsigned long long)total);
            fflush(stdout);
        }
        sleep_ms(10);
    }
    return 0;
}
