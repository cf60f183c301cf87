#define _GNU_SOURCE
#include "workload_support.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

long long mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int write_atomic(const char *path, const char *text) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return -1;
    fputs(text, f);
    if (fclose(f) != 0)
        return -1;
    return rename(tmp, path);
}

void json_str(char *out, size_t cap, const char *s) {
    size_t o = 0;
    for (; *s && o + 7 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20) {
            o += (size_t)snprintf(out + o, cap - o, "\\u%04x", c);
        } else {
            out[o++] = (char)c;
        }
    }
    out[o] = 0;
}

void install_report_signals(void (*handler)(int), sigset_t *old) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, old);
}

int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

ssize_t read_all(int fd, void *buf, size_t len) {
    char *p = buf;
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, p + got, len - got);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    return (ssize_t)got;
}

int parse_long(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

void child_setup(pid_t parent) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = SIG_DFL;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGPIPE, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    sigset_t none;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, NULL);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
        _exit(1);
}

void describe_status(int status, char *out, size_t cap) {
    if (WIFEXITED(status))
        snprintf(out, cap, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(out, cap, "killed by signal %d (%s)%s", WTERMSIG(status), strsignal(WTERMSIG(status)),
                 WCOREDUMP(status) ? ", core dumped" : "");
    else if (WIFSTOPPED(status))
        snprintf(out, cap, "stopped by signal %d", WSTOPSIG(status));
    else
        snprintf(out, cap, "wait status 0x%x", (unsigned)status);
}

int child_alive(pid_t pid, char *why, size_t cap, int *status) {
    int st = 0;
    if (status)
        *status = -1;
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r < 0) {
        snprintf(why, cap, "waitpid(%d): %s (not our child any more)", (int)pid, strerror(errno));
        return 0;
    }
    if (r == pid) {
        char s[96];
        describe_status(st, s, sizeof s);
        snprintf(why, cap, "child %d %s", (int)pid, s);
        if (status)
            *status = st;
        return 0;
    }
    if (kill(pid, 0) != 0) {
        snprintf(why, cap, "kill(%d, 0): %s", (int)pid, strerror(errno));
        return 0;
    }
    why[0] = 0;
    return 1;
}

void detail_clear(struct detail *d) {
    d->text[0] = 0;
    d->len = 0;
    d->problems = 0;
}

void detail_add(struct detail *d, const char *fmt, ...) {
    d->problems++;
    size_t cap = sizeof d->text - 4; // room for "..."
    if (d->len >= cap)
        return;
    if (d->len > 0)
        d->len += (size_t)snprintf(d->text + d->len, cap - d->len, "; ");
    if (d->len < cap) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(d->text + d->len, cap - d->len, fmt, ap);
        va_end(ap);
        if (n > 0)
            d->len += (size_t)n;
    }
    if (d->len >= cap) { // truncated: text holds cap - 1 characters; mark the cut
        memcpy(d->text + cap - 1, "...", 4);
        d->len = cap + 2;
    }
}

void budget_start(struct wait_budget *b, long long ms) {
    b->last = mono_ms();
    b->left = ms;
}

long long budget_left(struct wait_budget *b) {
    long long now = mono_ms(), d = now - b->last;
    b->last = now;
    if (d < 0)
        d = 0;
    if (d > 100)
        d = 100;
    b->left -= d;
    return b->left > 0 ? b->left : 0;
}

void note_failure(struct failure_note *n, const char *fmt, ...) {
    atomic_fetch_add(&n->count, 1);
    if (atomic_load_explicit(&n->set, memory_order_relaxed))
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(n->text, sizeof n->text, fmt, ap);
    va_end(ap);
    atomic_store_explicit(&n->set, 1, memory_order_release);
}

const char *failure_text(struct failure_note *n) {
    return atomic_load_explicit(&n->set, memory_order_acquire) ? n->text : NULL;
}

pid_t spawn_child(pid_t parent, void (*body)(int), int arg) {
    pid_t p = fork();
    if (p == 0) {
        child_setup(parent);
        body(arg);
        _exit(1);
    }
    return p;
}

ssize_t read_small_file(const char *path, char *buf, size_t cap) {
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, cap - 1, f);
    fclose(f);
    buf[n] = 0;
    return (ssize_t)n;
}
