// wl-tree: a tree of processes of configurable size, every thread mostly asleep, for
// benchmarks (how checkpoint and restore scale with processes, threads and memory).
//
//   wl-tree --report PATH --procs N [--threads M] [--mb K]
//     (1 <= N <= 4096 processes in all, the parent included; 1 <= M <= 1024 threads per
//      process, the main thread included, default 1; N*M <= 65536; 0 <= K <= 1048576 MiB
//      of private memory per process, default 0)
//
// Before forking, the parent maps one MAP_SHARED|MAP_ANONYMOUS area: a header (a ready
// count and a check-request generation), one 64-byte record per process and one 64-bit
// counter per thread. It then forks N - 1 children (process 1..N-1; PR_SET_PDEATHSIG
// SIGKILL, and each exits when getppid() changes). Every process (the parent is process
// 0) maps K MiB of private anonymous memory and writes word 0 of every page with
// tag(process, page), creates its M - 1 extra threads (64 KiB stacks), and counts itself
// ready once all of them run. Every thread loops: counter += 1, sleep 50 ms (the parent's
// main thread: every 10 ms). A child's main thread also answers check requests: it checks
// word 0 of every page of its memory, that /proc/self/task has exactly M entries and
// PR_GET_PDEATHSIG, records the first failure (and a count) in its record, then
// acknowledges the request's generation.
//
// Protocol: writes "ready" to PATH (PATH.tmp + rename) once all N processes and all
// their threads are up (setup fails with exit 1 if a child dies, or after 120 s). On
// SIGUSR1 the parent posts a check request and waits (at most 3 s + 1 ms per MiB of K of
// running time, see wait_budget) until every child acknowledged it and every thread's
// counter advanced since the signal; it checks its own memory and threads the same way,
// that every child is alive and still its child (waitpid WNOHANG returns 0, kill(pid, 0)
// works; a dead one is reaped and described, now and in every later report), that no
// process recorded a failure, and getpid() unchanged. It writes one JSON line to PATH
// the same way:
//   {"ok":true,"progress":N,"pid":P,"procs":N,"threads":M,"mb":K,"pids":[..],
//    "pdeathsig_lost":L,"detail":"..."}
// progress = sum of all the threads' counters; pids = the N processes (parent first);
// pdeathsig_lost = children whose PR_GET_PDEATHSIG was no longer SIGKILL at their last
// check (reported, not part of ok). detail: the problems (the first few of each kind),
// or a summary when ok.
// SIGTERM: the parent SIGKILLs the children and exits 0.
#define _GNU_SOURCE
#include <dirent.h>
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
#include <unistd.h>

#include "workload_support.h"

#define MAXPROCS 4096
#define MAXTHREADS 1024
#define MAXTOTAL 65536
#define MAXMB (1L << 20)
#define PAGE 4096UL
#define THREAD_MS 50
#define THREAD_STACK (64 * 1024)
#define MAX_LISTED 5 // problems of one kind described in detail (all are counted)

struct header {
    _Atomic int ready;             // processes fully up
    _Atomic uint64_t check_req;    // generation of the latest check request
};

struct proc {
    _Atomic int threads_up;
    _Atomic int pdeathsig;         // at the last check; -1 before
    _Atomic uint64_t check_ack;    // generation of the last check done
    struct failure_note fail;
} __attribute__((aligned(64)));

static struct header *hdr;
static struct proc *procs;
static _Atomic uint64_t *counters; // [process * nthreads + thread]
static int nprocs, nthreads = 1;
static long mb;
static pid_t parent_pid;
static pid_t *pids;                 // the parent's list: pids[0] = itself
static volatile sig_atomic_t forked; // children forked so far (for the SIGTERM handler)
static volatile sig_atomic_t got_usr1;
static uint64_t *memory;            // this process's K MiB
static size_t mem_pages;

static uint64_t tag(uint64_t proc, uint64_t page) {
    uint64_t z = (proc << 40 ^ page) * 0x9E3779B97F4A7C15ULL + 0x7EE0000000000001ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// ---- every process --------------------------------------------------------------------
struct thread_arg {
    int proc, thread;
};

static void *thread_main(void *arg) {
    struct thread_arg *a = arg;
    _Atomic uint64_t *c = &counters[(size_t)a->proc * (size_t)nthreads + (size_t)a->thread];
    atomic_fetch_add(&procs[a->proc].threads_up, 1);
    for (;;) {
        atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
        sleep_ms(THREAD_MS);
    }
    return NULL;
}

static int count_tasks(void) {
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

// The check a process does on itself: its memory, its thread count, its pdeathsig.
static void self_check(int p) {
    struct proc *r = &procs[p];
    for (size_t j = 0; j < mem_pages; j++) {
        uint64_t v = memory[j * (PAGE / 8)];
        if (v != tag((uint64_t)p, j)) {
            note_failure(&r->fail,
                         "process %d (pid %d): page %zu of its %ld MiB holds 0x%016" PRIx64 ", expected 0x%016" PRIx64,
                         p, (int)getpid(), j, mb, v, tag((uint64_t)p, j));
            break;
        }
    }
    int tasks = count_tasks();
    if (tasks != nthreads)
        note_failure(&r->fail, "process %d (pid %d): /proc/self/task has %d entries, expected %d threads", p,
                     (int)getpid(), tasks, nthreads);
    if (p > 0) {
        int sig = -1;
        prctl(PR_GET_PDEATHSIG, &sig);
        atomic_store(&r->pdeathsig, sig);
    }
}

// Maps and touches the memory, starts the extra threads, and counts the process ready.
// Returns 0, or -1 after printing why.
static int setup_process(int p) {
    mem_pages = (size_t)mb * (1024 * 1024 / PAGE);
    if (mem_pages) {
        memory = mmap(NULL, mem_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (memory == MAP_FAILED) {
            fprintf(stderr, "wl-tree: process %d: mmap %ld MiB: %s\n", p, mb, strerror(errno));
            return -1;
        }
        for (size_t j = 0; j < mem_pages; j++)
            memory[j * (PAGE / 8)] = tag((uint64_t)p, j);
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, THREAD_STACK);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    static struct thread_arg args[MAXTHREADS];
    for (int t = 1; t < nthreads; t++) {
        args[t] = (struct thread_arg){p, t};
        pthread_t th;
        int e = pthread_create(&th, &attr, thread_main, &args[t]);
        if (e != 0) {
            fprintf(stderr, "wl-tree: process %d: pthread_create (thread %d of %d): %s\n", p, t, nthreads, strerror(e));
            return -1;
        }
    }
    pthread_attr_destroy(&attr);
    atomic_fetch_add(&procs[p].threads_up, 1); // the main thread
    while (atomic_load(&procs[p].threads_up) < nthreads)
        sleep_ms(1);
    atomic_fetch_add(&hdr->ready, 1);
    return 0;
}

static _Noreturn void child_main(int p) {
    if (setup_process(p) != 0)
        _exit(3);
    _Atomic uint64_t *c = &counters[(size_t)p * (size_t)nthreads];
    for (;;) {
        atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
        uint64_t req = atomic_load_explicit(&hdr->check_req, memory_order_acquire);
        if (req != atomic_load_explicit(&procs[p].check_ack, memory_order_relaxed)) {
            self_check(p);
            atomic_store_explicit(&procs[p].check_ack, req, memory_order_release);
        }
        if (getppid() != parent_pid)
            _exit(1);
        sleep_ms(THREAD_MS);
    }
}

// ---- the parent -----------------------------------------------------------------------
static void kill_children(void) {
    for (int i = 1; i <= forked; i++)
        kill(pids[i], SIGKILL);
}

static void on_signal(int sig) {
    if (sig == SIGUSR1) {
        got_usr1 = 1;
        return;
    }
    kill_children();
    _exit(0);
}

static int *dead;     // per process: reaped or lost
static char (*dead_why)[128];

static int checks_done(uint64_t req, const uint64_t *base) {
    for (int p = 1; p < nprocs; p++)
        if (!dead[p] && atomic_load_explicit(&procs[p].check_ack, memory_order_acquire) != req)
            return 0;
    for (size_t i = 0; i < (size_t)nprocs * (size_t)nthreads; i++)
        if (atomic_load_explicit(&counters[i], memory_order_relaxed) <= base[i])
            return 0;
    return 1;
}

static void report(const char *path, uint64_t req, const uint64_t *base) {
    static struct detail d;
    static char esc[8192];
    detail_clear(&d);
    if (getpid() != parent_pid)
        detail_add(&d, "getpid() is %d, was %d at start", (int)getpid(), (int)parent_pid);
    self_check(0);
    int gone = 0, unanswered = 0, stuck = 0, failed = 0, lost = 0;
    for (int p = 1; p < nprocs; p++) {
        if (!dead[p] && !child_alive(pids[p], dead_why[p], sizeof dead_why[p], NULL))
            dead[p] = 1;
        if (dead[p] && gone++ < MAX_LISTED)
            detail_add(&d, "process %d (pid %d) is gone: %s", p, (int)pids[p], dead_why[p]);
        else if (!dead[p] && atomic_load(&procs[p].check_ack) != req && unanswered++ < MAX_LISTED)
            detail_add(&d, "process %d (pid %d) did not answer the check request", p, (int)pids[p]);
        int sig = atomic_load(&procs[p].pdeathsig);
        if (sig != -1 && sig != SIGKILL)
            lost++;
    }
    uint64_t progress = 0;
    for (int p = 0; p < nprocs; p++) {
        struct proc *r = &procs[p];
        const char *first = failure_text(&r->fail);
        if (first && failed++ < MAX_LISTED)
            detail_add(&d, "%s (%" PRIu64 " failures)", first, atomic_load(&r->fail.count));
        for (int t = 0; t < nthreads; t++) {
            size_t i = (size_t)p * (size_t)nthreads + (size_t)t;
            uint64_t c = atomic_load(&counters[i]);
            progress += c;
            if (c <= base[i] && stuck++ < MAX_LISTED)
                detail_add(&d, "process %d (pid %d) thread %d made no progress (counter stuck at %" PRIu64 ")", p,
                           (int)pids[p], t, c);
        }
    }
    if (gone > MAX_LISTED)
        detail_add(&d, "%d processes gone in all", gone);
    if (unanswered > MAX_LISTED)
        detail_add(&d, "%d processes did not answer in all", unanswered);
    if (failed > MAX_LISTED)
        detail_add(&d, "%d processes recorded failures in all", failed);
    if (stuck > MAX_LISTED)
        detail_add(&d, "%d threads made no progress in all", stuck);
    int ok = d.problems == 0;
    if (ok)
        snprintf(d.text, sizeof d.text, "%d processes x %d threads alive and advancing, %ld MiB each verified", nprocs,
                 nthreads, mb);
    json_str(esc, sizeof esc, d.text);
    size_t cap = 1024 + sizeof esc + (size_t)nprocs * 12, n;
    char *buf = malloc(cap);
    if (!buf) {
        perror("wl-tree: report buffer");
        return;
    }
    n = (size_t)snprintf(buf, cap, "{\"ok\":%s,\"progress\":%" PRIu64 ",\"pid\":%d,\"procs\":%d,\"threads\":%d,"
                         "\"mb\":%ld,\"pids\":[", ok ? "true" : "false", progress, (int)getpid(), nprocs, nthreads, mb);
    for (int p = 0; p < nprocs; p++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%d", p ? "," : "", (int)pids[p]);
    snprintf(buf + n, cap - n, "],\"pdeathsig_lost\":%d,\"detail\":\"%s\"}\n", lost, esc);
    if (write_atomic(path, buf) != 0)
        perror("wl-tree: writing report");
    free(buf);
}

static void usage(void) {
    fprintf(stderr, "usage: wl-tree --report PATH --procs N (1..%d) [--threads M (1..%d)] [--mb K (0..%ld)]\n"
                    "       (N*M <= %d)\n", MAXPROCS, MAXTHREADS, MAXMB, MAXTOTAL);
    exit(2);
}

static int setup_shared(void) {
    size_t total = (size_t)nprocs * (size_t)nthreads;
    size_t bytes = 64 + (size_t)nprocs * sizeof(struct proc) + total * sizeof(uint64_t);
    unsigned char *area = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED) {
        perror("wl-tree: mmap shared");
        return -1;
    }
    hdr = (struct header *)area;
    procs = (struct proc *)(area + 64);
    counters = (_Atomic uint64_t *)(area + 64 + (size_t)nprocs * sizeof(struct proc));
    for (int p = 0; p < nprocs; p++)
        atomic_store(&procs[p].pdeathsig, p ? -1 : SIGKILL);
    pids = calloc((size_t)nprocs, sizeof *pids);
    dead = calloc((size_t)nprocs, sizeof *dead);
    dead_why = calloc((size_t)nprocs, sizeof *dead_why);
    if (!pids || !dead || !dead_why) {
        perror("wl-tree: calloc");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    long v;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--report") && i + 1 < argc)
            path = argv[++i];
        else if (!strcmp(argv[i], "--procs") && i + 1 < argc && parse_long(argv[++i], 1, MAXPROCS, &v) == 0)
            nprocs = (int)v;
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc && parse_long(argv[++i], 1, MAXTHREADS, &v) == 0)
            nthreads = (int)v;
        else if (!strcmp(argv[i], "--mb") && i + 1 < argc && parse_long(argv[++i], 0, MAXMB, &v) == 0)
            mb = v;
        else
            usage();
    }
    if (!path || nprocs < 1 || (long)nprocs * nthreads > MAXTOTAL)
        usage();
    signal(SIGCHLD, SIG_DFL); // an inherited SIG_IGN would reap dead children behind our back
    if (setup_shared() != 0)
        return 1;
    parent_pid = getpid();
    pids[0] = parent_pid;
    sigset_t old;
    install_report_signals(on_signal, &old); // blocked until the parent's threads exist
    for (int p = 1; p < nprocs; p++) {
        pid_t c = spawn_child(parent_pid, child_main, p);
        if (c < 0) {
            perror("wl-tree: fork");
            kill_children();
            return 1;
        }
        pids[p] = c;
        forked = p;
    }
    if (setup_process(0) != 0) {
        kill_children();
        return 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    struct wait_budget budget;
    budget_start(&budget, 120000);
    while (atomic_load(&hdr->ready) < nprocs) {
        int st;
        pid_t r = waitpid(-1, &st, WNOHANG);
        if (r > 0 || budget_left(&budget) == 0) {
            char s[96] = "";
            if (r > 0)
                describe_status(st, s, sizeof s);
            fprintf(stderr, "wl-tree: setup failed: %s%s%d of %d processes ready\n", r > 0 ? "a child " : "", s,
                    atomic_load(&hdr->ready), nprocs);
            if (r > 0)
                fprintf(stderr, "wl-tree: (child pid %d)\n", (int)r);
            kill_children();
            return 1;
        }
        atomic_fetch_add_explicit(&counters[0], 1, memory_order_relaxed);
        sleep_ms(5);
    }
    if (write_atomic(path, "ready\n") != 0) {
        perror("wl-tree: writing ready");
        kill_children();
        return 1;
    }
    uint64_t *base = malloc((size_t)nprocs * (size_t)nthreads * sizeof *base);
    if (!base) {
        perror("wl-tree: malloc");
        kill_children();
        return 1;
    }
    int pending = 0;
    uint64_t req = 0;
    for (;;) {
        atomic_fetch_add_explicit(&counters[0], 1, memory_order_relaxed);
        if (got_usr1) {
            got_usr1 = 0;
            if (!pending) {
                pending = 1;
                for (size_t i = 0; i < (size_t)nprocs * (size_t)nthreads; i++)
                    base[i] = atomic_load_explicit(&counters[i], memory_order_relaxed);
                req = atomic_fetch_add(&hdr->check_req, 1) + 1;
                budget_start(&budget, 3000 + mb);
            }
        }
        if (pending && (checks_done(req, base) || budget_left(&budget) == 0)) {
            report(path, req, base);
            pending = 0;
            continue;
        }
        sleep_ms(10); // a signal ends it early
    }
}
