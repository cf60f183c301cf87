// stasis-counter: the demo workload. Prints "pid P" once, then "count N"
// every 200 ms forever. Usage: stasis-counter [START]   (default 0)
//
// Each tick measures 200 ms of CLOCK_MONOTONIC from the tick's start, so a
// nanosleep that returns early (EINTR, e.g. around a checkpoint) just sleeps
// again for the remainder. If the clock jumps (restore after a long pause, or
// on another machine) at most one tick is cut short; it never bursts.
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long long ns_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    const long long period = 200000000LL; // 200 ms
    long long count = argc > 1 ? strtoll(argv[1], NULL, 10) : 0;

    printf("pid %d\n", (int)getpid());
    fflush(stdout);
    for (;;) {
        long long start = ns_now();
        for (;;) {
            long long elapsed = ns_now() - start;
            if (elapsed >= period)
                break;
            if (elapsed < 0) { // clock went backwards: restart this tick
                start = ns_now();
                elapsed = 0;
            }
            long long left = period - elapsed;
            struct timespec ts = {left / 1000000000LL, left % 1000000000LL};
            if (nanosleep(&ts, NULL) != 0 && errno != EINTR)
                return 1;
        }
        count++;
        printf("count %lld\n", count);
        fflush(stdout);
    }
}
