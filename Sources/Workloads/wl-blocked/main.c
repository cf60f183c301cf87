// wl-blocked: processes and threads that spend nearly all their time blocked in one
// system call each, to check that blocking calls resume correctly after a restore.
//
//   wl-blocked --report PATH
//
// Roles (the children use PR_SET_PDEATHSIG SIGKILL and also exit when getppid() changes):
//  reader   child A: loops on read(2) of 16-byte messages {seq, seq ^ MAGIC} from a pipe
//           whose only writer is the parent (full-read loop: short reads are fine). Every
//           message must be intact (a corrupt one is skipped) and seq == previous seq + 1
//           (the first is 1; after a gap the sequence resynchronises). EOF means the parent
//           is gone: exit.
//  sleeper  child B: loops on nanosleep(2 s, &rem), resuming with rem after EINTR (SIGUSR1
//           sent to B interrupts it, to exercise that path). Each completed sleep must have
//           lasted >= 2 s of CLOCK_MONOTONIC from its start (longer is fine: a freeze).
//  waker    the parent's main thread: every 200 ms writes the next message into A's pipe
//           (non-blocking; a full pipe just delays it), and every 300 ms increments a
//           generation under a mutex and signals a condition variable.
//  waiter   parent thread 1: waits for the generation to change, alternately with
//           pthread_cond_wait and pthread_cond_clockwait (CLOCK_MONOTONIC, 1 s; timeouts
//           are counted, not errors), and counts the wakeups that saw a new generation.
//  reaper   parent thread 2: forks child C, which sleeps 1 s (nanosleep with rem) and
//           exits with status 7, blocks in waitpid(C) and checks that waitpid returned C
//           with exit status 7 no sooner than 1 s after the fork; then forks the next C.
// The schedules never burst: after a freeze the next event comes at once, the following
// ones at the normal period. The children report their counters and their first failure
// (with a failure count) through a MAP_SHARED|MAP_ANONYMOUS area set up before the forks.
//
// Protocol: writes "ready" to PATH (PATH.tmp + rename) once A has read a message, B has
// started sleeping, thread 1 is waiting and thread 2 has forked a C. On SIGUSR1 the parent
// (still doing its 200/300 ms duties) waits until each of the four counters (A's reads,
// B's sleeps, thread 1's wakeups, thread 2's completed waits) has advanced since the
// signal, for at most 3.5 s of running time (see wait_budget; a report can take ~2 s,
// B's period), then checks: A and B alive and still its children (a dead one is reaped
// and described, now and in every later report), no failure flagged by any role, all four
// advanced, A never read beyond the last sequence number written, getpid() unchanged.
// It writes one JSON line to PATH the same way:
//   {"ok":true,"progress":N,"pid":P,"reader":A,"sleeper":B,"exiter":C,"reads":R,
//    "sleeps":S,"wakeups":W,"exits":E,"written":SEQ,"timeouts":T,"interrupts":I,
//    "pdeathsig":[a,b],"detail":"..."}
// progress = R + S + W + E (completed blocking operations); exiter = the current C;
// written = messages written to the pipe; timeouts = timed condvar waits that timed
// out; interrupts = B's EINTRs; pdeathsig = PR_GET_PDEATHSIG last seen by A and B (9 as
// set at fork; reported, not part of ok). detail: the problems, or a summary when ok.
// SIGTERM: the parent SIGKILLs A, B and the current C and exits 0.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
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

#define MSG_MAGIC 0xB10C4EDC0FFEE5EDULL
#define WRITE_MS 200
#define SIGNAL_MS 300
#define SLEEP_S 2
#define C_SLEEP_MS 1000
#define C_STATUS 7

// Counters and the first failure of one role; written by that role only.
struct role {
    _Atomic uint64_t count;
    _Atomic uint64_t extra;   // A: last seq read; B: EINTRs; thread 1: timeouts
    _Atomic int pdeathsig;    // children: PR_GET_PDEATHSIG, -1 before the first look
    _Atomic int started;
    struct failure_note fail;
} __attribute__((aligned(64)));

struct shared {              // MAP_SHARED, so that the children's writes reach the parent
    struct role reader, sleeper;
};

static struct shared *sh;
static struct role waiter, reaper; // the parent's threads (ordinary memory)
static pid_t parent_pid, reader_pid, sleeper_pid;
static _Atomic pid_t exiter_pid;
static int pipe_w = -1;
static volatile sig_atomic_t got_usr1;

static pthread_mutex_t gen_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gen_cv;   // initialised for CLOCK_MONOTONIC in main
static uint64_t generation;     // under gen_mu

static long long mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void note_pdeathsig(struct role *r) {
    int sig = -1;
    prctl(PR_GET_PDEATHSIG, &sig);
    atomic_store(&r->pdeathsig, sig);
}

// Sleeps `ns` with nanosleep, resuming with the remainder after EINTR. Returns the number
// of EINTRs, or -1 (errno set) on another error.
static long sleep_fully(long long ns) {
    struct timespec req = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)}, rem;
    long interrupts = 0;
    while (nanosleep(&req, &rem) != 0) {
        if (errno != EINTR)
            return -1;
        interrupts++;
        req = rem;
    }
    return interrupts;
}

// ---- child A: the reader ----------------------------------------------------------------
static _Noreturn void reader_main(int fd) {
    struct role *r = &sh->reader;
    uint64_t last = 0;
    note_pdeathsig(r);
    atomic_store(&r->started, 1);
    for (;;) {
        uint64_t msg[2];
        ssize_t n = read_all(fd, msg, sizeof msg);
        if (n == 0 || (n > 0 && n < (ssize_t)sizeof msg))
            _exit(0); // EOF: the parent is gone
        if (n < 0) {
            note_failure(&r->fail, "reader (pid %d): read: %s", (int)getpid(), strerror(errno));
            sleep_ms(100);
            continue;
        }
        if (msg[1] != (msg[0] ^ MSG_MAGIC)) { // counted, but the sequence goes on from the last good one
            note_failure(&r->fail,
                         "reader (pid %d): corrupt message after seq %" PRIu64 ": {0x%" PRIx64 ", 0x%" PRIx64 "}",
                         (int)getpid(), last, msg[0], msg[1]);
            continue;
        }
        if (msg[0] != last + 1)
            note_failure(&r->fail, "reader (pid %d): expected seq %" PRIu64 ", read %" PRIu64 " (%s)", (int)getpid(),
                         last + 1, msg[0], msg[0] > last + 1 ? "messages lost" : "messages repeated");
        last = msg[0];
        atomic_store(&r->extra, last);
        atomic_fetch_add(&r->count, 1);
        note_pdeathsig(r);
        if (getppid() != parent_pid)
            _exit(1);
    }
}

// ---- child B: the sleeper ---------------------------------------------------------------
static void on_b_signal(int sig) { (void)sig; } // only there to make nanosleep return EINTR

static _Noreturn void sleeper_main(void) {
    struct role *r = &sh->sleeper;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_b_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL); // no SA_RESTART
    note_pdeathsig(r);
    atomic_store(&r->started, 1);
    for (uint64_t k = 1;; k++) {
        long long t0 = mono_ns();
        long intr = sleep_fully((long long)SLEEP_S * 1000000000LL);
        long long took = mono_ns() - t0;
        if (intr < 0) {
            note_failure(&r->fail, "sleeper (pid %d): nanosleep: %s", (int)getpid(), strerror(errno));
            sleep_ms(100);
            continue;
        }
        atomic_fetch_add(&r->extra, (uint64_t)intr);
        if (took < (long long)SLEEP_S * 1000000000LL)
            note_failure(&r->fail,
                         "sleeper (pid %d): sleep %" PRIu64 " of %d s lasted only %lld.%09lld s of CLOCK_MONOTONIC "
                         "(%ld EINTRs)", (int)getpid(), k, SLEEP_S, took / 1000000000LL, took % 1000000000LL, intr);
        atomic_fetch_add(&r->count, 1);
        note_pdeathsig(r);
        if (getppid() != parent_pid)
            _exit(1);
    }
}

// ---- parent thread 1: the condition-variable waiter --------------------------------------
static void *waiter_main(void *arg) {
    (void)arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&gen_mu);
    atomic_store(&waiter.started, 1);
    for (uint64_t k = 0;; k++) {
        while (generation == seen) {
            int r;
            if (k & 1) {
                struct timespec ts;
                clock_gettime(CLOCK_MONOTONIC, &ts);
                ts.tv_sec += 1;
                r = pthread_cond_clockwait(&gen_cv, &gen_mu, CLOCK_MONOTONIC, &ts);
                if (r == ETIMEDOUT) {
                    atomic_fetch_add(&waiter.extra, 1);
                    r = 0;
                }
            } else {
                r = pthread_cond_wait(&gen_cv, &gen_mu);
            }
            if (r != 0) {
                note_failure(&waiter.fail, "waiter thread: pthread_cond_%swait: %s", k & 1 ? "clock" : "", strerror(r));
                pthread_mutex_unlock(&gen_mu);
                sleep_ms(100);
                pthread_mutex_lock(&gen_mu);
            }
        }
        seen = generation;
        atomic_fetch_add(&waiter.count, 1);
    }
    return NULL;
}

// ---- parent thread 2: the reaper, and child C -------------------------------------------
static void *reaper_main(void *arg) {
    (void)arg;
    for (;;) {
        long long t0 = mono_ms();
        pid_t c = fork();
        if (c < 0) {
            note_failure(&reaper.fail, "reaper thread: fork: %s", strerror(errno));
            sleep_ms(1000);
            continue;
        }
        if (c == 0) { // only async-signal-safe calls from here: the parent has threads
            child_setup(parent_pid);
            close(pipe_w); // A must see EOF when the parent dies
            _exit(sleep_fully((long long)C_SLEEP_MS * 1000000LL) < 0 ? 8 : C_STATUS);
        }
        atomic_store(&exiter_pid, c);
        atomic_store(&reaper.started, 1);
        int st = 0;
        pid_t r;
        do
            r = waitpid(c, &st, 0);
        while (r < 0 && errno == EINTR);
        long long took = mono_ms() - t0;
        if (r != c) {
            note_failure(&reaper.fail, "reaper thread: waitpid(%d): %s", (int)c,
                         r < 0 ? strerror(errno) : "returned another pid");
            sleep_ms(1000);
        } else if (!WIFEXITED(st) || WEXITSTATUS(st) != C_STATUS) {
            char s[96];
            describe_status(st, s, sizeof s);
            note_failure(&reaper.fail, "reaper thread: child C (pid %d) %s, expected exit status %d", (int)c, s,
                         C_STATUS);
        } else if (took < C_SLEEP_MS) {
            note_failure(&reaper.fail, "reaper thread: child C (pid %d) exited %lld ms after the fork; it sleeps %d ms",
                         (int)c, took, C_SLEEP_MS);
        } else {
            atomic_fetch_add(&reaper.count, 1);
        }
    }
    return NULL;
}

// ---- parent main thread -----------------------------------------------------------------
static void on_signal(int sig) {
    if (sig == SIGUSR1) {
        got_usr1 = 1;
        return;
    }
    pid_t c = atomic_load(&exiter_pid);
    if (reader_pid > 0)
        kill(reader_pid, SIGKILL);
    if (sleeper_pid > 0)
        kill(sleeper_pid, SIGKILL);
    if (c > 0)
        kill(c, SIGKILL);
    _exit(0);
}

static uint64_t seq_written;
static struct detail write_problems; // the main thread's own failures
static uint64_t write_failures;

static void write_message(void) {
    uint64_t msg[2] = {seq_written + 1, (seq_written + 1) ^ MSG_MAGIC};
    ssize_t n = write(pipe_w, msg, sizeof msg); // <= PIPE_BUF: all or nothing
    if (n == (ssize_t)sizeof msg) {
        seq_written++;
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return; // pipe full (A not reading: its counter shows it) or interrupted: next time
    if (write_failures++ == 0)
        detail_add(&write_problems, "writing message %" PRIu64 " to the reader's pipe: %s", seq_written + 1,
                   n < 0 ? strerror(errno) : "short write");
}

static void wake_waiter(void) {
    pthread_mutex_lock(&gen_mu);
    generation++;
    pthread_cond_signal(&gen_cv);
    pthread_mutex_unlock(&gen_mu);
}

// Runs one event when due; after a freeze the next one is due at once, then every period.
static void every(long long now, long long *next, long period, void (*fn)(void)) {
    if (now < *next)
        return;
    fn();
    *next += period;
    if (*next <= now)
        *next = now + period;
}

struct counters {
    uint64_t reads, sleeps, wakeups, exits;
};

static struct counters snapshot(void) {
    return (struct counters){atomic_load(&sh->reader.count), atomic_load(&sh->sleeper.count),
                             atomic_load(&waiter.count), atomic_load(&reaper.count)};
}

static int all_advanced(const struct counters *now, const struct counters *base) {
    return now->reads > base->reads && now->sleeps > base->sleeps && now->wakeups > base->wakeups &&
           now->exits > base->exits;
}

static int reader_dead, sleeper_dead;
static char reader_why[128], sleeper_why[128];

static void report(const char *path, const struct counters *base) {
    static struct detail d;
    static char buf[8192], esc[8192];
    detail_clear(&d);
    if (getpid() != parent_pid)
        detail_add(&d, "getpid() is %d, was %d at start", (int)getpid(), (int)parent_pid);
    if (!reader_dead && !child_alive(reader_pid, reader_why, sizeof reader_why, NULL))
        reader_dead = 1;
    if (reader_dead)
        detail_add(&d, "reader A (pid %d) is gone: %s", (int)reader_pid, reader_why);
    if (!sleeper_dead && !child_alive(sleeper_pid, sleeper_why, sizeof sleeper_why, NULL))
        sleeper_dead = 1;
    if (sleeper_dead)
        detail_add(&d, "sleeper B (pid %d) is gone: %s", (int)sleeper_pid, sleeper_why);
    struct role *roles[] = {&sh->reader, &sh->sleeper, &waiter, &reaper};
    for (int i = 0; i < 4; i++) {
        const char *first = failure_text(&roles[i]->fail);
        if (first)
            detail_add(&d, "%s (%" PRIu64 " failures)", first, atomic_load(&roles[i]->fail.count));
    }
    if (write_failures)
        detail_add(&d, "%s (%" PRIu64 " failures)", write_problems.text, write_failures);
    struct counters now = snapshot();
    const char *names[] = {"reader A's reads", "sleeper B's completed sleeps", "waiter thread's wakeups",
                           "reaper thread's completed waits for C"};
    uint64_t n_now[] = {now.reads, now.sleeps, now.wakeups, now.exits};
    uint64_t n_base[] = {base->reads, base->sleeps, base->wakeups, base->exits};
    for (int i = 0; i < 4; i++)
        if (n_now[i] <= n_base[i])
            detail_add(&d, "%s did not advance in 3.5 s (stuck at %" PRIu64 ")", names[i], n_now[i]);
    uint64_t last_read = atomic_load(&sh->reader.extra);
    if (last_read > seq_written)
        detail_add(&d, "reader A read seq %" PRIu64 " but only %" PRIu64 " were written", last_read, seq_written);
    uint64_t progress = now.reads + now.sleeps + now.wakeups + now.exits;
    int ok = d.problems == 0;
    if (ok)
        snprintf(d.text, sizeof d.text,
                 "all blocked roles advancing: %" PRIu64 " reads, %" PRIu64 " sleeps, %" PRIu64 " wakeups, %" PRIu64
                 " exits of C", now.reads, now.sleeps, now.wakeups, now.exits);
    json_str(esc, sizeof esc, d.text);
    snprintf(buf, sizeof buf,
             "{\"ok\":%s,\"progress\":%" PRIu64 ",\"pid\":%d,\"reader\":%d,\"sleeper\":%d,\"exiter\":%d,"
             "\"reads\":%" PRIu64 ",\"sleeps\":%" PRIu64 ",\"wakeups\":%" PRIu64 ",\"exits\":%" PRIu64
             ",\"written\":%" PRIu64 ",\"timeouts\":%" PRIu64 ",\"interrupts\":%" PRIu64
             ",\"pdeathsig\":[%d,%d],\"detail\":\"%s\"}\n",
             ok ? "true" : "false", progress, (int)getpid(), (int)reader_pid, (int)sleeper_pid,
             (int)atomic_load(&exiter_pid), now.reads, now.sleeps, now.wakeups, now.exits, seq_written,
             atomic_load(&waiter.extra), atomic_load(&sh->sleeper.extra), atomic_load(&sh->reader.pdeathsig),
             atomic_load(&sh->sleeper.pdeathsig), esc);
    if (write_atomic(path, buf) != 0)
        perror("wl-blocked: writing report");
}

static void kill_children(void) {
    if (reader_pid > 0)
        kill(reader_pid, SIGKILL);
    if (sleeper_pid > 0)
        kill(sleeper_pid, SIGKILL);
    pid_t c = atomic_load(&exiter_pid);
    if (c > 0)
        kill(c, SIGKILL);
}

static pid_t fork_child(void (*body)(int), int arg) {
    pid_t p = spawn_child(parent_pid, body, arg);
    if (p < 0) {
        perror("wl-blocked: fork");
        kill_children();
        exit(1);
    }
    return p;
}

static int pipe_r = -1;

static void reader_body(int fd) {
    close(pipe_w);
    reader_main(fd);
}

static void sleeper_body(int unused) {
    (void)unused;
    close(pipe_r);
    close(pipe_w);
    sleeper_main();
}

int main(int argc, char **argv) {
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--report") && i + 1 < argc)
            path = argv[++i];
        else {
            fprintf(stderr, "usage: wl-blocked --report PATH\n");
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "usage: wl-blocked --report PATH\n");
        return 2;
    }
    signal(SIGCHLD, SIG_DFL); // an inherited SIG_IGN would make waitpid(C) fail with ECHILD
    signal(SIGPIPE, SIG_IGN); // a dead reader shows as EPIPE
    parent_pid = getpid();
    sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) {
        perror("wl-blocked: mmap");
        return 1;
    }
    atomic_store(&sh->reader.pdeathsig, -1);
    atomic_store(&sh->sleeper.pdeathsig, -1);
    int fds[2];
    if (pipe(fds) != 0) {
        perror("wl-blocked: pipe");
        return 1;
    }
    pipe_r = fds[0];
    pipe_w = fds[1];
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&gen_cv, &ca);
    pthread_condattr_destroy(&ca);
    detail_clear(&write_problems);

    sigset_t old;
    install_report_signals(on_signal, &old); // blocked here and in the threads created below
    reader_pid = fork_child(reader_body, pipe_r);
    sleeper_pid = fork_child(sleeper_body, 0);
    close(pipe_r);
    if (fcntl(pipe_w, F_SETFL, O_NONBLOCK) != 0) {
        perror("wl-blocked: fcntl");
        kill_children();
        return 1;
    }
    pthread_t t1, t2;
    if (pthread_create(&t1, NULL, waiter_main, NULL) != 0 || pthread_create(&t2, NULL, reaper_main, NULL) != 0) {
        perror("wl-blocked: pthread_create");
        kill_children();
        return 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    long long now = mono_ms(), next_write = now, next_signal = now + SIGNAL_MS;
    struct wait_budget budget;
    budget_start(&budget, 30000);
    while (!(atomic_load(&sh->reader.count) > 0 && atomic_load(&sh->sleeper.started) &&
             atomic_load(&waiter.started) && atomic_load(&reaper.started))) {
        char why[128];
        if (!child_alive(reader_pid, why, sizeof why, NULL) || !child_alive(sleeper_pid, why, sizeof why, NULL) ||
            budget_left(&budget) == 0) {
            fprintf(stderr, "wl-blocked: did not start: %s\n", why[0] ? why : "not all roles running after 30 s");
            kill_children();
            return 1;
        }
        now = mono_ms();
        every(now, &next_write, WRITE_MS, write_message);
        sleep_ms(5);
    }
    if (write_atomic(path, "ready\n") != 0) {
        perror("wl-blocked: writing ready");
        kill_children();
        return 1;
    }
    int pending = 0;
    struct counters base = {0, 0, 0, 0};
    for (;;) {
        now = mono_ms();
        every(now, &next_write, WRITE_MS, write_message);
        every(now, &next_signal, SIGNAL_MS, wake_waiter);
        if (got_usr1) {
            got_usr1 = 0;
            if (!pending) {
                pending = 1;
                base = snapshot();
                budget_start(&budget, 3500);
            }
        }
        if (pending) {
            struct counters c = snapshot();
            if (all_advanced(&c, &base) || budget_left(&budget) == 0) {
                report(path, &base);
                pending = 0;
                continue;
            }
        }
        sleep_ms(10); // a signal ends it early
    }
}
