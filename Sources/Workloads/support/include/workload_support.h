// Helpers shared by the test workloads (Sources/Workloads/*): the report protocol's atomic
// file writes, JSON string escaping, and simple timing.
#ifndef WORKLOAD_SUPPORT_H
#define WORKLOAD_SUPPORT_H
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// Sleeps one step of `ms` milliseconds; a signal (EINTR) just ends it early.
void sleep_ms(long ms);

/// CLOCK_MONOTONIC in milliseconds.
long long mono_ms(void);

/// Writes `text` to PATH.tmp and renames it to PATH, so a reader never sees a partial report.
/// Returns 0, or -1 with errno set.
int write_atomic(const char *path, const char *text);

/// Escapes `s` into the body of a JSON string (without quotes), truncating to fit `cap`.
void json_str(char *out, size_t cap, const char *s);

/// Installs `handler` for SIGUSR1 and SIGTERM and blocks both in the calling thread, so that
/// threads created afterwards inherit the block and the signals reach the thread that later
/// restores `*old` (the main thread). Call before creating threads.
void install_report_signals(void (*handler)(int), sigset_t *old);

// ---- added for the multi-process workloads (wl-pipe, wl-shared, wl-zombies, wl-blocked,
// wl-tree); all generic ----------------------------------------------------------------

/// Writes all `len` bytes of `buf` to `fd`, retrying after short writes and EINTR.
/// Returns 0, or -1 with errno set (EPIPE, EAGAIN on a non-blocking fd, ...).
int write_all(int fd, const void *buf, size_t len);

/// Reads until `len` bytes have arrived or EOF, retrying after short reads and EINTR.
/// Returns the byte count (less than `len` only at EOF), or -1 with errno set.
ssize_t read_all(int fd, void *buf, size_t len);

/// Parses all of `s` as a decimal number in [lo, hi] into *out. Returns 0, or -1.
int parse_long(const char *s, long lo, long hi, long *out);

/// For a child right after fork(): SIGTERM back to its default action, SIGUSR1 and
/// SIGUSR2 ignored (reports are the parent's business), SIGPIPE default, no signal
/// blocked; PR_SET_PDEATHSIG SIGKILL, then _exit(1) if the parent is already gone
/// (getppid() != parent). PR_SET_PDEATHSIG fires when the *thread* that forked exits.
void child_setup(pid_t parent);

/// Describes a wait(2) status: "exited with status 3", "killed by signal 9 (Killed)", ...
void describe_status(int status, char *out, size_t cap);

/// Is `pid` a live child of the caller? Returns 1 if waitpid(pid, WNOHANG) says it is
/// running (0) and kill(pid, 0) succeeds. Otherwise returns 0 and describes why in `why`;
/// a child that had exited is reaped by the call, and its status stored in *status
/// (if not NULL; -1 when there is none, e.g. ECHILD).
int child_alive(pid_t pid, char *why, size_t cap, int *status);

/// Problems found by one check, joined with "; " (truncated with "..." if too long).
struct detail {
    char text[4096];
    size_t len;
    int problems;
};
void detail_clear(struct detail *d);
void detail_add(struct detail *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/// A time limit for a wait that counts only time the process gets to run: each call of
/// budget_left charges the time since the previous call but at most 100 ms, so a freeze
/// (checkpoint, SIGSTOP) between two polls is not mistaken for a lack of progress.
/// Poll well under every 100 ms.
struct wait_budget {
    long long last, left;
};
void budget_start(struct wait_budget *b, long long ms);
/// Milliseconds left (0 once spent).
long long budget_left(struct wait_budget *b);

/// The first failure of one role (a thread, or a process writing into MAP_SHARED memory)
/// and how many it had, for the process that reports. Zero-initialised = no failure.
/// One writer per note: note_failure counts every call and keeps only the first message;
/// the message is complete before `set` is stored (release), so a reader that sees it
/// through failure_text (acquire) reads the whole text. The atomics are lock-free, so a
/// note in MAP_SHARED memory works across processes.
struct failure_note {
    _Atomic uint64_t count; // failures so far
    _Atomic int set;        // 1 once text holds the first one
    char text[256];         // the first failure's message (truncated to fit)
};
void note_failure(struct failure_note *n, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/// The first failure's message, or NULL if no failure was noted yet.
const char *failure_text(struct failure_note *n);

/// fork()s a child that runs child_setup(parent) and then body(arg), and _exit(1)s should
/// body return. Only async-signal-safe work happens in the child before body, so this is
/// fine in a process with threads. Returns the child's PID, or -1 with errno set.
pid_t spawn_child(pid_t parent, void (*body)(int), int arg);

/// Reads the start of a small file (a /proc one, typically) into `buf`, at most cap - 1
/// bytes, and NUL-terminates it. Returns the length, or -1 if the file cannot be opened.
ssize_t read_small_file(const char *path, char *buf, size_t cap);

#endif
