// Helpers shared by the test workloads (Sources/Workloads/*): the report protocol's atomic
// file writes, JSON string escaping, and simple timing.
#ifndef WORKLOAD_SUPPORT_H
#define WORKLOAD_SUPPORT_H
#include <signal.h>
#include <stddef.h>

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

#endif
