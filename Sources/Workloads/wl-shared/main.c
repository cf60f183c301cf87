// wl-shared: worker processes that share a process-shared mutex and counters in a
// MAP_SHARED region, and each own a private copy of memory inherited across fork.
//
//   wl-shared --report PATH [--workers N]   (default N = 16; 1 <= N <= 256)
//
// Before forking, the parent maps one MAP_SHARED|MAP_ANONYMOUS region holding a robust,
// PTHREAD_PROCESS_SHARED mutex, a 64-bit counter and one 64-byte-aligned slot per worker,
// and fills a 1 MiB MAP_PRIVATE anonymous buffer with a known pattern (word w of the
// buffer = pattern(w)). It then forks the N workers (PR_SET_PDEATHSIG SIGKILL, and each
// also exits when getppid() changes).
//
// Worker i first checks that its inherited copy of the buffer is exactly the pattern, then
// writes word 0 of every page with tag(i, gen 0, page) = 0x5AFE << 48 | i << 32 |
// (gen & 0xffff) << 16 | page. Then it loops forever:
//   lock; counter = counter + 1; slot[i].count = slot[i].count + 1; unlock
// The two updates are plain load + store (not atomic read-modify-writes), so only mutual
// exclusion keeps counter == sum of slots: if two workers ever ran the critical section at
// once, an increment of counter would be lost. Every 100 increments the worker does one
// check pass and sleeps 1 ms. A pass checks, on every page, that word 0 is tag(i, gen,
// page) (a tag of another worker, the parent's pattern or anything else is a failure,
// decoded in the message) and rewrites it with gen + 1, and that word 1 and word
// 1 + gen % 511 still hold the pattern (so all the untouched words are covered every 511
// passes). It also reads PR_GET_PDEATHSIG. A failure sets the slot's flag and message (the
// first one; all are counted) and the worker carries on.
//
// Protocol: writes "ready" to PATH (PATH.tmp + rename) once every worker has incremented.
// On SIGUSR1 the parent waits (up to 2 s of running time, see wait_budget) until every
// worker has incremented since the signal, then checks: each worker is alive and still
// its child (waitpid WNOHANG returns 0, kill(pid, 0) works; a dead one is reaped and its
// status described, now and in every later report), no worker flagged a failure, every
// worker advanced, the mutex can be taken (within 2 s; EOWNERDEAD = a worker died holding
// it) and under it counter == sum of slots, counter advanced since the previous report,
// the parent's own copy of the buffer is still entirely the pattern, and getpid() is the
// PID it had at start. It writes one JSON line to PATH the same way:
//   {"ok":true,"progress":COUNTER,"pid":P,"workers":[pids],"counts":[..],
//    "passes":[..],"pdeathsig":[..],"detail":"..."}
// progress = the shared counter; counts = slot[i].count; passes = check passes of
// worker i; pdeathsig = PR_GET_PDEATHSIG each worker last saw (9 = SIGKILL as set at
// fork; 0 means a restore lost it). pdeathsig is reported but does not affect ok.
// detail: the problems found, or a summary when ok.
// SIGTERM: the parent SIGKILLs the workers and exits 0.
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "workload_support.h"

#define MAXWORKERS 256
#define PRIV_BYTES (1UL << 20)
#define PAGE 4096UL
#define PAGES (PRIV_BYTES / PAGE)
#define WORDS (PAGE / 8)       // 64-bit words per page
#define TAG_MAGIC 0x5AFEULL
#define PASS_EVERY 100         // increments between check passes (and 1 ms pauses)

struct slot {
    _Atomic uint64_t count;    // this worker's increments; written only under the mutex
    _Atomic uint64_t passes;   // check passes done
    _Atomic int pdeathsig;     // PR_GET_PDEATHSIG at the last pass (-1 before the first)
    struct failure_note fail;
} __attribute__((aligned(64)));

struct shared {
    pthread_mutex_t mu;
    _Atomic uint64_t counter;  // all increments; written only under the mutex
    struct slot slot[];
};

static struct shared *sh;
static uint64_t *priv;        // the private buffer (PRIV_BYTES)
static int nworkers = 16;
static pid_t parent_pid;
static pid_t pids[MAXWORKERS];
static volatile sig_atomic_t forked; // workers forked so far (for the SIGTERM handler)
static volatile sig_atomic_t got_usr1;

static uint64_t pattern(uint64_t w) {
    uint64_t z = w * 0x9E3779B97F4A7C15ULL + 0x51A7ED0000000001ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static uint64_t tag(uint64_t worker, uint64_t gen, uint64_t page) {
    return TAG_MAGIC << 48 | (worker & 0xffff) << 32 | (gen & 0xffff) << 16 | (page & 0xffff);
}

// Describes what a word 0 holds instead of the expected tag.
static void describe_word(char *out, size_t cap, uint64_t v, uint64_t page) {
    if (v == pattern(page * WORDS))
        snprintf(out, cap, "the parent's original pattern");
    else if (v >> 48 == TAG_MAGIC)
        snprintf(out, cap, "worker %" PRIu64 "'s tag for its page %" PRIu64 ", generation %" PRIu64 " (mod 2^16)",
                 (v >> 32) & 0xffff, v & 0xffff, (v >> 16) & 0xffff);
    else
        snprintf(out, cap, "0x%016" PRIx64 ", neither a tag nor the pattern", v);
}

// ---- worker ---------------------------------------------------------------------------
static void check_pass(int i, struct slot *s, uint64_t gen) {
    int bad_tag = 0, bad_pattern = 0;
    uint64_t probe = 1 + gen % (WORDS - 1);
    for (uint64_t j = 0; j < PAGES; j++) {
        volatile uint64_t *page = priv + j * WORDS;
        uint64_t want = tag((uint64_t)i, gen, j), v = page[0];
        if (v != want && !bad_tag++) {
            char what[160];
            describe_word(what, sizeof what, v, j);
            note_failure(&s->fail,
                         "worker %d (pid %d), private page %" PRIu64 ": expected its own tag (generation %" PRIu64
                         "), found %s", i, (int)getpid(), j, gen, what);
        }
        page[0] = tag((uint64_t)i, gen + 1, j);
        uint64_t words[2] = {1, probe};
        for (int k = 0; k < 2; k++) {
            uint64_t w = j * WORDS + words[k];
            if (page[words[k]] != pattern(w) && !bad_pattern++)
                note_failure(&s->fail, "worker %d (pid %d), private page %" PRIu64 " word %" PRIu64
                                       ": expected the inherited pattern 0x%016" PRIx64 ", found 0x%016" PRIx64,
                             i, (int)getpid(), j, words[k], pattern(w), page[words[k]]);
        }
    }
    int sig = -1;
    prctl(PR_GET_PDEATHSIG, &sig);
    atomic_store(&s->pdeathsig, sig);
    atomic_fetch_add(&s->passes, 1);
}

static _Noreturn void worker(int i) {
    struct slot *s = &sh->slot[i];
    for (uint64_t w = 0; w < PRIV_BYTES / 8; w++)
        if (priv[w] != pattern(w)) {
            note_failure(&s->fail, "worker %d (pid %d): inherited private word %" PRIu64 " is 0x%016" PRIx64
                                   ", expected 0x%016" PRIx64, i, (int)getpid(), w, priv[w], pattern(w));
            break;
        }
    for (uint64_t j = 0; j < PAGES; j++)
        priv[j * WORDS] = tag((uint64_t)i, 0, j);
    uint64_t gen = 0;
    for (uint64_t k = 1;; k++) {
        int r = pthread_mutex_lock(&sh->mu);
        if (r == EOWNERDEAD) {
            note_failure(&s->fail, "worker %d (pid %d): the mutex's previous owner died holding it", i, (int)getpid());
            pthread_mutex_consistent(&sh->mu);
        } else if (r != 0) {
            note_failure(&s->fail, "worker %d (pid %d): pthread_mutex_lock: %s", i, (int)getpid(), strerror(r));
            sleep_ms(100);
            continue;
        }
        atomic_store_explicit(&sh->counter, atomic_load_explicit(&sh->counter, memory_order_relaxed) + 1,
                              memory_order_relaxed);
        atomic_store_explicit(&s->count, atomic_load_explicit(&s->count, memory_order_relaxed) + 1,
                              memory_order_relaxed);
        r = pthread_mutex_unlock(&sh->mu);
        if (r != 0)
            note_failure(&s->fail, "worker %d (pid %d): pthread_mutex_unlock: %s", i, (int)getpid(), strerror(r));
        if (k % PASS_EVERY == 0) {
            if (getppid() != parent_pid) // the parent died and PR_SET_PDEATHSIG did not fire
                _exit(1);
            check_pass(i, s, gen++);
            sleep_ms(1);
        }
    }
}

// ---- parent ---------------------------------------------------------------------------
static void on_signal(int sig) {
    if (sig == SIGUSR1) {
        got_usr1 = 1;
        return;
    }
    for (int i = 0; i < forked; i++)
        kill(pids[i], SIGKILL);
    _exit(0);
}

static int dead[MAXWORKERS];          // reaped or lost: no more waitpid on it
static char dead_why[MAXWORKERS][128];

// Takes the mutex within 2 s of running time; 0, or an error number (ETIMEDOUT, ...).
static int lock_within_2s(int *owner_died) {
    struct wait_budget b;
    budget_start(&b, 2000);
    *owner_died = 0;
    for (;;) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += 50 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        int r = pthread_mutex_clocklock(&sh->mu, CLOCK_MONOTONIC, &ts);
        if (r == EOWNERDEAD) {
            *owner_died = 1;
            pthread_mutex_consistent(&sh->mu);
            return 0;
        }
        if (r != ETIMEDOUT || budget_left(&b) == 0)
            return r;
    }
}

static int check_buffer(struct detail *d) {
    for (uint64_t w = 0; w < PRIV_BYTES / 8; w++)
        if (priv[w] != pattern(w)) {
            char what[160] = "";
            if (w % WORDS == 0)
                describe_word(what, sizeof what, priv[w], w / WORDS);
            detail_add(d, "the parent's private buffer changed: page %" PRIu64 " word %" PRIu64 " is 0x%016" PRIx64
                          " (%s), expected the pattern 0x%016" PRIx64,
                       w / WORDS, w % WORDS, priv[w], what[0] ? what : "not the pattern", pattern(w));
            return 0;
        }
    return 1;
}

static void report(const char *path, const uint64_t *baseline, uint64_t *prev_counter, int *first) {
    static struct detail d;
    static char buf[65536], esc[8192];
    detail_clear(&d);
    if (getpid() != parent_pid)
        detail_add(&d, "getpid() is %d, was %d at start", (int)getpid(), (int)parent_pid);
    for (int i = 0; i < nworkers; i++) {
        if (!dead[i] && !child_alive(pids[i], dead_why[i], sizeof dead_why[i], NULL))
            dead[i] = 1;
        if (dead[i])
            detail_add(&d, "worker %d (pid %d) is gone: %s", i, (int)pids[i], dead_why[i]);
    }
    for (int i = 0; i < nworkers; i++) {
        struct slot *s = &sh->slot[i];
        const char *first = failure_text(&s->fail);
        if (first)
            detail_add(&d, "%s (%" PRIu64 " failures)", first, atomic_load(&s->fail.count));
        uint64_t c = atomic_load(&s->count);
        if (c <= baseline[i])
            detail_add(&d, "worker %d (pid %d) made no progress in 2 s (count stuck at %" PRIu64 ")", i,
                       (int)pids[i], c);
    }
    uint64_t counter = 0, sum = 0;
    uint64_t counts[MAXWORKERS];
    int owner_died, r = lock_within_2s(&owner_died);
    if (r != 0) {
        detail_add(&d, "could not take the shared mutex: %s",
                   r == ETIMEDOUT ? "still held after 2 s (its holder is stuck)" : strerror(r));
        counter = atomic_load(&sh->counter);
        for (int i = 0; i < nworkers; i++)
            counts[i] = atomic_load(&sh->slot[i].count);
    } else {
        counter = atomic_load(&sh->counter);
        for (int i = 0; i < nworkers; i++) {
            counts[i] = atomic_load(&sh->slot[i].count);
            sum += counts[i];
        }
        pthread_mutex_unlock(&sh->mu);
        if (owner_died)
            detail_add(&d, "a worker died holding the shared mutex (EOWNERDEAD)");
        if (counter != sum)
            detail_add(&d, "shared counter %" PRIu64 " != sum of the workers' counts %" PRIu64
                           " (increments lost, e.g. mutual exclusion failed, or the counter corrupted)", counter, sum);
    }
    if (!*first && counter <= *prev_counter)
        detail_add(&d, "shared counter did not advance since the previous report (%" PRIu64 " -> %" PRIu64 ")",
                   *prev_counter, counter);
    *first = 0;
    *prev_counter = counter;
    check_buffer(&d);
    int ok = d.problems == 0;
    if (ok)
        snprintf(d.text, sizeof d.text, "%d workers alive and advancing; counter %" PRIu64 " == sum of slots",
                 nworkers, counter);
    json_str(esc, sizeof esc, d.text);
    size_t n = (size_t)snprintf(buf, sizeof buf, "{\"ok\":%s,\"progress\":%" PRIu64 ",\"pid\":%d,\"workers\":[",
                                ok ? "true" : "false", counter, (int)getpid());
    for (int i = 0; i < nworkers; i++)
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%d", i ? "," : "", (int)pids[i]);
    n += (size_t)snprintf(buf + n, sizeof buf - n, "],\"counts\":[");
    for (int i = 0; i < nworkers; i++)
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%" PRIu64, i ? "," : "", counts[i]);
    n += (size_t)snprintf(buf + n, sizeof buf - n, "],\"passes\":[");
    for (int i = 0; i < nworkers; i++)
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%" PRIu64, i ? "," : "",
                              atomic_load(&sh->slot[i].passes));
    n += (size_t)snprintf(buf + n, sizeof buf - n, "],\"pdeathsig\":[");
    for (int i = 0; i < nworkers; i++)
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%d", i ? "," : "", atomic_load(&sh->slot[i].pdeathsig));
    snprintf(buf + n, sizeof buf - n, "],\"detail\":\"%s\"}\n", esc);
    if (write_atomic(path, buf) != 0)
        perror("wl-shared: writing report");
}

static void usage(void) {
    fprintf(stderr, "usage: wl-shared --report PATH [--workers N (1..%d)]\n", MAXWORKERS);
    exit(2);
}

static int setup_shared(void) {
    size_t bytes = sizeof(struct shared) + (size_t)nworkers * sizeof(struct slot);
    sh = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) {
        perror("wl-shared: mmap shared");
        return -1;
    }
    pthread_mutexattr_t a;
    int r;
    if ((r = pthread_mutexattr_init(&a)) || (r = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED)) ||
        (r = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST)) || (r = pthread_mutex_init(&sh->mu, &a))) {
        fprintf(stderr, "wl-shared: mutex setup: %s\n", strerror(r));
        return -1;
    }
    pthread_mutexattr_destroy(&a);
    for (int i = 0; i < nworkers; i++)
        atomic_store(&sh->slot[i].pdeathsig, -1);
    priv = mmap(NULL, PRIV_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (priv == MAP_FAILED) {
        perror("wl-shared: mmap private");
        return -1;
    }
    for (uint64_t w = 0; w < PRIV_BYTES / 8; w++)
        priv[w] = pattern(w);
    return 0;
}

static void kill_workers(void) {
    for (int i = 0; i < forked; i++)
        kill(pids[i], SIGKILL);
}

int main(int argc, char **argv) {
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        long v;
        if (!strcmp(argv[i], "--report") && i + 1 < argc)
            path = argv[++i];
        else if (!strcmp(argv[i], "--workers") && i + 1 < argc && parse_long(argv[++i], 1, MAXWORKERS, &v) == 0)
            nworkers = (int)v;
        else
            usage();
    }
    if (!path)
        usage();
    signal(SIGCHLD, SIG_DFL); // an inherited SIG_IGN would reap the workers behind our back
    if (setup_shared() != 0)
        return 1;
    parent_pid = getpid();
    sigset_t old;
    install_report_signals(on_signal, &old);
    for (int i = 0; i < nworkers; i++) {
        pid_t p = spawn_child(parent_pid, worker, i);
        if (p < 0) {
            perror("wl-shared: fork");
            kill_workers();
            return 1;
        }
        pids[i] = p;
        forked = i + 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    uint64_t baseline[MAXWORKERS];
    struct wait_budget budget;
    budget_start(&budget, 30000);
    for (int i = 0; i < nworkers; i++) {
        char why[128];
        while (atomic_load(&sh->slot[i].count) == 0) {
            if (!child_alive(pids[i], why, sizeof why, NULL) || budget_left(&budget) == 0) {
                fprintf(stderr, "wl-shared: worker %d did not start: %s\n", i, why[0] ? why : "no increment in 30 s");
                kill_workers();
                return 1;
            }
            sleep_ms(1);
        }
    }
    if (write_atomic(path, "ready\n") != 0) {
        perror("wl-shared: writing ready");
        kill_workers();
        return 1;
    }
    uint64_t prev_counter = 0;
    int first = 1, pending = 0;
    for (;;) {
        if (got_usr1) {
            got_usr1 = 0;
            if (!pending) {
                pending = 1;
                for (int i = 0; i < nworkers; i++)
                    baseline[i] = atomic_load(&sh->slot[i].count);
                budget_start(&budget, 2000);
            }
        }
        if (pending) {
            int all = 1;
            for (int i = 0; i < nworkers && all; i++)
                all = atomic_load(&sh->slot[i].count) > baseline[i];
            if (all || budget_left(&budget) == 0) {
                report(path, baseline, &prev_counter, &first);
                pending = 0;
                continue;
            }
            sleep_ms(1);
            continue;
        }
        sleep_ms(100); // a signal ends it early
    }
}
