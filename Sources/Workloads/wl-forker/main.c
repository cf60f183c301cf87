// wl-forker: a tree that keeps forking and exiting, as fast as its pids limit lets it.
//
//   wl-forker [--lifetime-ms N]     (default 200)
//
// Every process loops forever: it reaps any child that has exited (waitpid WNOHANG), forks a
// new child (which runs the same loop), and on EAGAIN — the cgroup's pids.max reached —
// sleeps 2 ms and tries again. A child (never the first process) exits after about N ms, so
// the tree is always changing: processes appear, become zombies and are reaped while a
// snapshot freezes it. For tests that a tree forking during a freeze is frozen whole or
// refused cleanly. SIGTERM (default action) ends a process; children get SIGKILL when their
// parent dies (PR_SET_PDEATHSIG).
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "workload_support.h"

int main(int argc, char **argv) {
    long lifetime = 200;
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--lifetime-ms") == 0) lifetime = atol(argv[++i]);
    }
    signal(SIGCHLD, SIG_DFL);
    int isRoot = 1;
    long long born = mono_ms();
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) {}
        if (!isRoot && mono_ms() - born > lifetime) _exit(0);
        pid_t parent = getpid();
        pid_t child = fork();
        if (child == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent) _exit(0);
            isRoot = 0;
            born = mono_ms();
            continue;
        }
        if (child < 0) sleep_ms(2);
    }
}
