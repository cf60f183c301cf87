// wl-zombies: a parent whose exited children stay zombies (it never reaps them unless
// asked), to check that a restore recreates them with the right exit statuses, and that
// a parent that waits afterwards still gets those statuses.
//
//   wl-zombies --report PATH [--children N]   (default N = 4; 1 <= N <= 200)
//
// The parent sets SIGCHLD to SIG_DFL (an inherited SIG_IGN would have the kernel reap the
// children) and forks N + 1 children: child i (0 <= i < N) calls _exit(10 + i); child N
// kills itself with SIGKILL. It then runs a counter loop (one tick per 10 ms; progress =
// ticks) and never waits for the children by itself.
//
// Protocol: writes "ready" to PATH (PATH.tmp + rename) once every child is a zombie
// (waitid(P_PID, child, WEXITED|WNOHANG|WNOWAIT) reports it, and /proc/<child>/stat says
// state Z). SIGUSR2 reaps: waitpid(child, WNOHANG) for every child not reaped yet,
// recording each status (a child that is not a zombie then, or not our child, is an error
// reported from then on). On SIGUSR1 it checks and writes one JSON line to PATH the same
// way:
//   {"ok":true,"progress":TICKS,"pid":P,"children":[pids],"zombies":[pids],"reaped":false,
//    "statuses":["exited with status 10",...],"detail":"..."}
// Before the reap: for every child, waitid(..., WNOWAIT) must report it exited with exactly
// the expected si_code and si_status (CLD_EXITED / 10 + i, or CLD_KILLED / SIGKILL), and
// /proc/<child>/stat must say state Z with this process as its parent. After the reap:
// every recorded status must be the expected one (WIFEXITED with 10 + i, or WIFSIGNALED
// with SIGKILL), and waitid(P_ALL, ..., WNOHANG|WNOWAIT) must fail with ECHILD: no child
// is left, zombie or not. Always: the set of PIDs in /proc/<pid>/task/<pid>/children (if
// the kernel has it) must be exactly the children not reaped yet, SIGCHLD must still be
// SIG_DFL without SA_NOCLDWAIT, and getpid() must be the PID it had at start.
// children = all the children's PIDs; zombies = the ones waitid reported as exited and
// not reaped this time; reaped = SIGUSR2 has been handled; statuses = the reaped
// statuses (empty before). detail: the problems found, or a summary when ok.
// SIGTERM: exit 0.
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "workload_support.h"

#define MAXCHILDREN 200

struct child {
    pid_t pid;
    int want_code;    // CLD_EXITED or CLD_KILLED
    int want_status;  // exit status or signal number
    int reaped;       // waitpid returned it
    int status;       // its wait status, once reaped
    char reap_error[160];
};

static struct child kids[MAXCHILDREN + 1];
static int nkids; // N + 1
static pid_t self_pid;
static volatile sig_atomic_t got_usr1, got_usr2;

static void on_signal(int sig) {
    if (sig == SIGUSR1)
        got_usr1 = 1;
    else if (sig == SIGUSR2)
        got_usr2 = 1;
    else
        _exit(0);
}

static const char *code_name(int code) {
    switch (code) {
    case CLD_EXITED: return "CLD_EXITED";
    case CLD_KILLED: return "CLD_KILLED";
    case CLD_DUMPED: return "CLD_DUMPED";
    case CLD_STOPPED: return "CLD_STOPPED";
    case CLD_TRAPPED: return "CLD_TRAPPED";
    case CLD_CONTINUED: return "CLD_CONTINUED";
    default: return "unknown si_code";
    }
}

static void describe_want(const struct child *k, char *out, size_t cap) {
    if (k->want_code == CLD_EXITED)
        snprintf(out, cap, "exited with status %d", k->want_status);
    else
        snprintf(out, cap, "killed by signal %d", k->want_status);
}

// /proc/<pid>/stat: the state letter and the parent's PID; 0, or -1 if unreadable.
static int proc_state(pid_t pid, char *state, pid_t *ppid) {
    char p[64], buf[1024];
    snprintf(p, sizeof p, "/proc/%d/stat", (int)pid);
    if (read_small_file(p, buf, sizeof buf) < 0)
        return -1;
    char *close = strrchr(buf, ')'); // the command name may contain anything
    int pp;
    if (!close || sscanf(close + 1, " %c %d", state, &pp) != 2)
        return -1;
    *ppid = pp;
    return 0;
}

// Is child k a zombie with the expected status, as waitid(WNOWAIT) sees it? 1 if it
// exited (whatever the status), 0 if not; problems go to d (if not NULL).
static int check_zombie(const struct child *k, int idx, struct detail *d) {
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (waitid(P_PID, (id_t)k->pid, &si, WEXITED | WNOHANG | WNOWAIT) != 0) {
        if (d)
            detail_add(d, "child %d (pid %d): waitid: %s (not our child any more)", idx, (int)k->pid,
                       strerror(errno));
        return 0;
    }
    if (si.si_pid == 0) {
        if (d)
            detail_add(d, "child %d (pid %d) has not exited (waitid reports no state change): not a zombie", idx,
                       (int)k->pid);
        return 0;
    }
    if (d && (si.si_pid != k->pid || si.si_code != k->want_code || si.si_status != k->want_status)) {
        char want[64];
        describe_want(k, want, sizeof want);
        detail_add(d, "child %d (pid %d): waitid reports pid %d, %s, si_status %d; expected %s", idx, (int)k->pid,
                   (int)si.si_pid, code_name(si.si_code), si.si_status, want);
    }
    return 1;
}

// The children file lists the PIDs of the main thread's children, zombies included.
// Returns 0 if it matched, -1 if it is unavailable; mismatches go to d.
static int check_children_file(struct detail *d) {
    char p[64], buf[8192];
    snprintf(p, sizeof p, "/proc/%d/task/%d/children", (int)getpid(), (int)getpid());
    if (read_small_file(p, buf, sizeof buf) < 0)
        return -1;
    int listed[MAXCHILDREN + 1] = {0};
    char *save = NULL;
    for (char *t = strtok_r(buf, " \n", &save); t; t = strtok_r(NULL, " \n", &save)) {
        int pid = atoi(t), found = 0;
        for (int i = 0; i < nkids; i++)
            if (kids[i].pid == pid) {
                listed[i] = found = 1;
                if (kids[i].reaped)
                    detail_add(d, "%s lists child %d (pid %d), which was reaped", p, i, pid);
            }
        if (!found)
            detail_add(d, "%s lists pid %d, which is not one of our children", p, pid);
    }
    for (int i = 0; i < nkids; i++)
        if (!kids[i].reaped && !listed[i])
            detail_add(d, "%s does not list child %d (pid %d)", p, i, (int)kids[i].pid);
    return 0;
}

static void reap_all(void) {
    for (int i = 0; i < nkids; i++) {
        struct child *k = &kids[i];
        if (k->reaped)
            continue;
        int st = 0;
        pid_t r = waitpid(k->pid, &st, WNOHANG);
        if (r == k->pid) {
            k->reaped = 1;
            k->status = st;
            k->reap_error[0] = 0;
        } else if (r == 0) {
            snprintf(k->reap_error, sizeof k->reap_error, "child %d (pid %d) was still running when reaped", i,
                     (int)k->pid);
        } else {
            snprintf(k->reap_error, sizeof k->reap_error, "child %d (pid %d): waitpid: %s", i, (int)k->pid,
                     r < 0 ? strerror(errno) : "returned another pid");
        }
    }
}

static void report(const char *path, uint64_t ticks, int reaped) {
    static struct detail d;
    static char buf[32768], esc[8192];
    detail_clear(&d);
    if (getpid() != self_pid)
        detail_add(&d, "getpid() is %d, was %d at start", (int)getpid(), (int)self_pid);
    struct sigaction sa;
    if (sigaction(SIGCHLD, NULL, &sa) != 0 || sa.sa_handler != SIG_DFL || (sa.sa_flags & SA_NOCLDWAIT))
        detail_add(&d, "SIGCHLD disposition is no longer SIG_DFL without SA_NOCLDWAIT (handler %p, flags 0x%x)",
                   (void *)sa.sa_handler, (unsigned)sa.sa_flags);
    int zombie[MAXCHILDREN + 1] = {0};
    for (int i = 0; i < nkids; i++) {
        struct child *k = &kids[i];
        if (k->reap_error[0])
            detail_add(&d, "%s", k->reap_error);
        if (k->reaped) {
            int good = k->want_code == CLD_EXITED
                           ? WIFEXITED(k->status) && WEXITSTATUS(k->status) == k->want_status
                           : WIFSIGNALED(k->status) && WTERMSIG(k->status) == k->want_status;
            if (!good) {
                char got[96], want[64];
                describe_status(k->status, got, sizeof got);
                describe_want(k, want, sizeof want);
                detail_add(&d, "child %d (pid %d) reaped: %s, expected %s", i, (int)k->pid, got, want);
            }
            continue;
        }
        zombie[i] = check_zombie(k, i, &d);
        char state = '?';
        pid_t ppid = 0;
        if (proc_state(k->pid, &state, &ppid) != 0)
            detail_add(&d, "child %d (pid %d): /proc/%d/stat unreadable", i, (int)k->pid, (int)k->pid);
        else if (state != 'Z' || ppid != getpid())
            detail_add(&d, "child %d (pid %d): /proc says state %c, parent %d; expected a zombie (Z) of %d", i,
                       (int)k->pid, state, (int)ppid, (int)getpid());
    }
    if (reaped) {
        siginfo_t si;
        memset(&si, 0, sizeof si);
        if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) == 0) {
            if (si.si_pid == 0)
                detail_add(&d, "after the reap, waitid(P_ALL) finds a running child");
            else
                detail_add(&d, "after the reap, waitid(P_ALL) finds an exited child, pid %d", (int)si.si_pid);
        } else if (errno != ECHILD) {
            detail_add(&d, "after the reap, waitid(P_ALL): %s", strerror(errno));
        }
    }
    int listed = check_children_file(&d) == 0;
    int ok = d.problems == 0;
    if (ok)
        snprintf(d.text, sizeof d.text, "%d children %s with the expected statuses%s", nkids,
                 reaped ? "reaped" : "are zombies", listed ? "" : " (no /proc/.../children to cross-check)");
    json_str(esc, sizeof esc, d.text);
    size_t n = (size_t)snprintf(buf, sizeof buf, "{\"ok\":%s,\"progress\":%" PRIu64 ",\"pid\":%d,\"children\":[",
                                ok ? "true" : "false", ticks, (int)getpid());
    for (int i = 0; i < nkids; i++)
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%d", i ? "," : "", (int)kids[i].pid);
    n += (size_t)snprintf(buf + n, sizeof buf - n, "],\"zombies\":[");
    for (int i = 0, first = 1; i < nkids; i++)
        if (zombie[i]) {
            n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%d", first ? "" : ",", (int)kids[i].pid);
            first = 0;
        }
    n += (size_t)snprintf(buf + n, sizeof buf - n, "],\"reaped\":%s,\"statuses\":[", reaped ? "true" : "false");
    for (int i = 0, first = 1; i < nkids; i++)
        if (kids[i].reaped) {
            char s[96];
            describe_status(kids[i].status, s, sizeof s);
            n += (size_t)snprintf(buf + n, sizeof buf - n, "%s\"%s\"", first ? "" : ",", s);
            first = 0;
        }
    snprintf(buf + n, sizeof buf - n, "],\"detail\":\"%s\"}\n", esc);
    if (write_atomic(path, buf) != 0)
        perror("wl-zombies: writing report");
}

static void usage(void) {
    fprintf(stderr, "usage: wl-zombies --report PATH [--children N (1..%d)]\n", MAXCHILDREN);
    exit(2);
}

int main(int argc, char **argv) {
    const char *path = NULL;
    long n = 4;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--report") && i + 1 < argc)
            path = argv[++i];
        else if (!strcmp(argv[i], "--children") && i + 1 < argc && parse_long(argv[++i], 1, MAXCHILDREN, &n) == 0)
            continue;
        else
            usage();
    }
    if (!path)
        usage();
    self_pid = getpid();
    signal(SIGCHLD, SIG_DFL);
    sigset_t old;
    install_report_signals(on_signal, &old); // also blocks SIGUSR1/SIGTERM until the forks are done
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR2, &sa, NULL);

    nkids = (int)n + 1;
    for (int i = 0; i < nkids; i++) {
        struct child *k = &kids[i];
        k->want_code = i < n ? CLD_EXITED : CLD_KILLED;
        k->want_status = i < n ? 10 + i : SIGKILL;
        pid_t p = fork();
        if (p < 0) {
            perror("wl-zombies: fork");
            return 1;
        }
        if (p == 0) {
            if (i < n)
                _exit(10 + i);
            raise(SIGKILL);
            _exit(99); // not reached
        }
        k->pid = p;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    // Ready once every child is a zombie, by waitid and by /proc.
    struct wait_budget budget;
    budget_start(&budget, 30000);
    for (int i = 0; i < nkids; i++) {
        char state = '?';
        pid_t ppid;
        while (!check_zombie(&kids[i], i, NULL) || proc_state(kids[i].pid, &state, &ppid) != 0 || state != 'Z') {
            if (budget_left(&budget) == 0) {
                fprintf(stderr, "wl-zombies: child %d (pid %d) did not become a zombie in 30 s\n", i,
                        (int)kids[i].pid);
                return 1;
            }
            sleep_ms(1);
        }
    }
    if (write_atomic(path, "ready\n") != 0) {
        perror("wl-zombies: writing ready");
        return 1;
    }
    uint64_t ticks = 0;
    int reaped = 0;
    for (;;) {
        if (got_usr2) { // first, so that a SIGUSR1 sent right after it reports the reap
            got_usr2 = 0;
            reap_all();
            reaped = 1;
        }
        if (got_usr1) {
            got_usr1 = 0;
            report(path, ticks, reaped);
            continue;
        }
        sleep_ms(10);
        ticks++;
    }
}
