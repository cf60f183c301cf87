// wl-threads: worker threads whose state lives in vector registers.
//
//   wl-threads --report PATH [--threads N] [--sse2]   (default N = 4;
//                                    --sse2 forces the SSE2 path, for testing)
//
// Each worker runs an asm loop that keeps 13 accumulators in ymm3..ymm15
// (AVX2; xmm3..xmm15 with SSE2 when AVX2 is missing) plus the increment in
// ymm2/xmm2 and the iteration number in %rax, for CHUNK iterations per asm
// block. Every iteration it adds the increment to each accumulator and checks,
// still inside the asm, that acc - base == n * inc exactly (all values are
// multiples of 1/4 below 2^51, so the arithmetic is exact under any rounding
// mode; this holds for the first 2^45 iterations of a thread, about 3 days of a
// full core at the ~1.2e8 iterations/s measured here). Between asm blocks the C code checks the stored state again, the
// thread's TLS magic, gettid() against the TID recorded at start, and the
// thread's MXCSR and x87 control word (set to per-thread non-default values).
// A mismatch is recorded (first one in detail, all counted), the state is
// resynchronised, and the thread carries on: workers never stop on their own.
//
// Protocol: writes "ready" to PATH (PATH.tmp + rename) once every worker is
// running; on SIGUSR1 the main thread checks everything (including that each
// worker advances within 2 s and that /proc/self/task/<tid> exists) and
// writes one JSON line to PATH the same way:
//   {"ok":true,"progress":N,"pid":P,"tids":[..],"iterations":[..],
//    "threads":N,"isa":"avx2","checks":K,"detail":"..."}
// SIGTERM: exit 0.
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "workload_support.h"

#define CHUNK 4096     // iterations per asm block
#define MAXTHREADS 256

struct fpstate {       // layout is hard-coded in the asm below
    double acc[16][4];   // offset 0; index = register number (3..15 used)
    double base[16][4];  // offset 512
    double inc[4];       // offset 1024
    uint64_t n;          // offset 1056: iterations done
} __attribute__((aligned(64)));
_Static_assert(offsetof(struct fpstate, base) == 512 && offsetof(struct fpstate, inc) == 1024 &&
               offsetof(struct fpstate, n) == 1056, "asm offsets");

struct worker {
    struct fpstate st;
    int idx;
    pid_t tid;
    pthread_t th;
    unsigned mxcsr;
    unsigned short fpucw;
    _Atomic uint64_t iters;
    struct failure_note fail;
} __attribute__((aligned(64)));

static struct worker *workers;
static int nthreads = 4;
static int use_avx2;
static volatile sig_atomic_t got_usr1, got_term;
static __thread volatile uint64_t tls_magic;
static __thread void *volatile tls_self;

static uint64_t magic_for(int idx) { return 0x5157A515C0FFEE00ULL ^ ((uint64_t)(idx + 1) * 0x9E3779B97F4A7C15ULL); }

// ---- the register loops: return 0 if every iteration matched ----------------
#define REGS "3,4,5,6,7,8,9,10,11,12,13,14,15"

__attribute__((target("avx2"), noinline)) static int run_avx2(struct fpstate *s, long count) {
    int fail;
    __asm__ volatile(
        "mov 1056(%%rsi), %%rax\n\t"
        "vmovapd 1024(%%rsi), %%ymm2\n\t"
        ".irp r," REGS "\n\t vmovapd (\\r*32)(%%rsi), %%ymm\\r\n\t .endr\n"
        "1:\n\t"
        "inc %%rax\n\t"
        ".irp r," REGS "\n\t vaddpd %%ymm2, %%ymm\\r, %%ymm\\r\n\t .endr\n\t"
        "vcvtsi2sdq %%rax, %%xmm0, %%xmm0\n\t"
        "vbroadcastsd %%xmm0, %%ymm0\n\t"
        "vmulpd %%ymm2, %%ymm0, %%ymm0\n\t"          // ymm0 = n * inc
        ".irp r," REGS "\n\t"
        "  vsubpd (512+\\r*32)(%%rsi), %%ymm\\r, %%ymm1\n\t"
        "  vcmppd $0, %%ymm0, %%ymm1, %%ymm1\n\t"
        "  vmovmskpd %%ymm1, %%edx\n\t"
        "  cmp $15, %%edx\n\t"
        "  jne 2f\n\t"
        ".endr\n\t"
        "dec %%rcx\n\t"
        "jnz 1b\n\t"
        "xor %%edx, %%edx\n\t"
        "jmp 3f\n"
        "2:\n\t"
        "mov $1, %%edx\n"
        "3:\n\t"
        ".irp r," REGS "\n\t vmovapd %%ymm\\r, (\\r*32)(%%rsi)\n\t .endr\n\t"
        "mov %%rax, 1056(%%rsi)\n\t"
        "vzeroupper\n\t"
        : "=d"(fail), "+c"(count)
        : "S"(s)
        : "rax", "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
          "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    return fail;
}

__attribute__((noinline)) static int run_sse2(struct fpstate *s, long count) {
    int fail;
    __asm__ volatile(
        "mov 1056(%%rsi), %%rax\n\t"
        "movapd 1024(%%rsi), %%xmm2\n\t"
        ".irp r," REGS "\n\t movapd (\\r*32)(%%rsi), %%xmm\\r\n\t .endr\n"
        "1:\n\t"
        "inc %%rax\n\t"
        ".irp r," REGS "\n\t addpd %%xmm2, %%xmm\\r\n\t .endr\n\t"
        "cvtsi2sdq %%rax, %%xmm0\n\t"
        "unpcklpd %%xmm0, %%xmm0\n\t"
        "mulpd %%xmm2, %%xmm0\n\t"                  // xmm0 = n * inc
        ".irp r," REGS "\n\t"
        "  movapd %%xmm\\r, %%xmm1\n\t"
        "  subpd (512+\\r*32)(%%rsi), %%xmm1\n\t"
        "  cmpeqpd %%xmm0, %%xmm1\n\t"
        "  movmskpd %%xmm1, %%edx\n\t"
        "  cmp $3, %%edx\n\t"
        "  jne 2f\n\t"
        ".endr\n\t"
        "dec %%rcx\n\t"
        "jnz 1b\n\t"
        "xor %%edx, %%edx\n\t"
        "jmp 3f\n"
        "2:\n\t"
        "mov $1, %%edx\n"
        "3:\n\t"
        ".irp r," REGS "\n\t movapd %%xmm\\r, (\\r*32)(%%rsi)\n\t .endr\n\t"
        "mov %%rax, 1056(%%rsi)\n\t"
        : "=d"(fail), "+c"(count)
        : "S"(s)
        : "rax", "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
          "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    return fail;
}

// ---- worker -------------------------------------------------------------------
// Check the stored accumulators against n; resync them if they are wrong.
static void check_state(struct worker *w, int lanes, int asm_failed) {
    struct fpstate *s = &w->st;
    double nd = (double)s->n;
    int bad = 0;
    for (int r = 3; r <= 15; r++)
        for (int l = 0; l < lanes; l++) {
            double want = s->base[r][l] + nd * s->inc[l];
            if (s->acc[r][l] != want) {
                if (!bad)
                    note_failure(&w->fail,
                                 "thread %d (tid %d): %s%d lane %d at iteration %llu: expected %.17g got %.17g",
                                 w->idx, (int)w->tid, lanes == 4 ? "ymm" : "xmm", r, l,
                                 (unsigned long long)s->n, want, s->acc[r][l]);
                bad = 1;
                s->acc[r][l] = want;
            }
        }
    if (asm_failed && !bad) // the asm saw a mismatch the stored values no longer show
        note_failure(&w->fail, "thread %d (tid %d): in-register check failed at iteration %llu",
                     w->idx, (int)w->tid, (unsigned long long)s->n);
}

static void *worker_main(void *arg) {
    struct worker *w = arg;
    int lanes = use_avx2 ? 4 : 2;
    tls_magic = magic_for(w->idx);
    tls_self = w;
    for (int r = 3; r <= 15; r++)
        for (int l = 0; l < 4; l++)
            w->st.acc[r][l] = w->st.base[r][l] = (double)(w->idx * 100000 + r * 1000 + l * 10) + 0.75;
    for (int l = 0; l < 4; l++)
        w->st.inc[l] = (double)(l + 1 + (w->idx % 7)) + 0.25 * (1 + l % 3);
    w->st.n = 0;
    // Per-thread non-default FP control state (all exceptions stay masked).
    w->mxcsr = 0x1F80u | ((unsigned)(w->idx % 4) << 13) | ((w->idx & 4) ? 0x8040u : 0);
    w->fpucw = (w->idx & 1) ? 0x027F : 0x0E7F; // 53-bit precision / round-toward-zero
    __asm__ volatile("ldmxcsr %0" ::"m"(w->mxcsr));
    __asm__ volatile("fldcw %0" ::"m"(w->fpucw));
    w->tid = gettid();

    for (;;) {
        int f = use_avx2 ? run_avx2(&w->st, CHUNK) : run_sse2(&w->st, CHUNK);
        check_state(w, lanes, f);
        atomic_store_explicit(&w->iters, w->st.n, memory_order_release);
        if (tls_magic != magic_for(w->idx) || tls_self != w) {
            note_failure(&w->fail, "thread %d (tid %d): TLS magic 0x%llx self %p, expected 0x%llx self %p", w->idx,
                         (int)w->tid, (unsigned long long)tls_magic, tls_self, (unsigned long long)magic_for(w->idx),
                         (void *)w);
            tls_magic = magic_for(w->idx);
            tls_self = w;
        }
        pid_t now = gettid();
        if (now != w->tid)
            note_failure(&w->fail, "thread %d: gettid() is %d, was %d at start", w->idx, (int)now, (int)w->tid);
        unsigned m;
        unsigned short cw;
        __asm__ volatile("stmxcsr %0" : "=m"(m));
        __asm__ volatile("fnstcw %0" : "=m"(cw));
        if (m != w->mxcsr || cw != w->fpucw) {
            note_failure(&w->fail, "thread %d (tid %d): MXCSR 0x%x expected 0x%x, x87 CW 0x%x expected 0x%x", w->idx,
                         (int)w->tid, m, w->mxcsr, cw, w->fpucw);
            __asm__ volatile("ldmxcsr %0" ::"m"(w->mxcsr));
            __asm__ volatile("fldcw %0" ::"m"(w->fpucw));
        }
    }
    return NULL;
}

// ---- main thread ------------------------------------------------------------
static void on_signal(int sig) {
    if (sig == SIGUSR1)
        got_usr1 = 1;
    else
        got_term = 1;
}

static void report(const char *path, uint64_t checks) {
    static char detail[4096], buf[32768], esc[8192];
    size_t dl = 0;
    int ok = 1;
    detail[0] = 0;
#define ADD(...) do { ok = 0; if (dl < sizeof detail) dl += (size_t)snprintf(detail + dl, sizeof detail - dl, __VA_ARGS__); } while (0)
    if (tls_magic != magic_for(-1) || tls_self != &workers)
        ADD("main thread TLS magic 0x%llx, expected 0x%llx; ", (unsigned long long)tls_magic,
            (unsigned long long)magic_for(-1));
    if (gettid() != getpid())
        ADD("main thread gettid() %d != getpid() %d; ", (int)gettid(), (int)getpid());
    uint64_t start[MAXTHREADS];
    for (int i = 0; i < nthreads; i++)
        start[i] = atomic_load(&workers[i].iters);
    // Every worker must make progress (a thread left stopped after restore fails here).
    long long deadline = mono_ms() + 2000;
    for (int i = 0; i < nthreads; i++)
        while (atomic_load(&workers[i].iters) == start[i] && mono_ms() < deadline)
            sleep_ms(1);
    uint64_t total = 0;
    for (int i = 0; i < nthreads; i++) {
        struct worker *w = &workers[i];
        uint64_t it = atomic_load(&w->iters);
        total += it;
        if (it == start[i])
            ADD("thread %d (tid %d) made no progress in 2 s (stuck at %llu); ", i, (int)w->tid,
                (unsigned long long)it);
        const char *first = failure_text(&w->fail);
        if (first)
            ADD("%s (%llu failures); ", first, (unsigned long long)atomic_load(&w->fail.count));
        char p[64];
        struct stat st;
        snprintf(p, sizeof p, "/proc/self/task/%d", (int)w->tid);
        if (stat(p, &st) != 0)
            ADD("thread %d: %s missing; ", i, p);
    }
    if (ok)
        snprintf(detail, sizeof detail, "%d threads ok (%s), %llu iterations", nthreads,
                 use_avx2 ? "avx2" : "sse2", (unsigned long long)total);
    json_str(esc, sizeof esc, detail);
    size_t n = (size_t)snprintf(buf, sizeof buf, "{\"ok\":%s,\"progress\":%llu,\"pid\":%d,\"tids\":[",
                                ok ? "true" : "false", (unsigned long long)total, (int)getpid());
    for (int i = 0; i < nthreads; i++)
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%d", i ? "," : "", (int)workers[i].tid);
    n += (size_t)snprintf(buf + n, sizeof buf - n, "],\"iterations\":[");
    for (int i = 0; i < nthreads; i++)
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%llu", i ? "," : "",
                              (unsigned long long)atomic_load(&workers[i].iters));
    snprintf(buf + n, sizeof buf - n, "],\"threads\":%d,\"isa\":\"%s\",\"checks\":%llu,\"detail\":\"%s\"}\n",
             nthreads, use_avx2 ? "avx2" : "sse2", (unsigned long long)checks, esc);
    if (write_atomic(path, buf) != 0)
        perror("wl-threads: writing report");
#undef ADD
}

int main(int argc, char **argv) {
    const char *path = NULL;
    int force_sse2 = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--report") && i + 1 < argc)
            path = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            nthreads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--sse2")) // testing aid: force the SSE2 path
            force_sse2 = 1;
        else {
            fprintf(stderr, "usage: wl-threads --report PATH [--threads N]\n");
            return 2;
        }
    }
    if (!path || nthreads < 1 || nthreads > MAXTHREADS) {
        fprintf(stderr, "usage: wl-threads --report PATH [--threads N (1..%d)]\n", MAXTHREADS);
        return 2;
    }
    use_avx2 = !force_sse2 && __builtin_cpu_supports("avx2");
    tls_magic = magic_for(-1);
    tls_self = &workers;

    sigset_t old;
    install_report_signals(on_signal, &old); // threads inherit the block: signals go to main

    workers = aligned_alloc(64, sizeof(struct worker) * (size_t)nthreads);
    if (!workers)
        return 1;
    memset(workers, 0, sizeof(struct worker) * (size_t)nthreads);
    for (int i = 0; i < nthreads; i++) {
        workers[i].idx = i;
        if (pthread_create(&workers[i].th, NULL, worker_main, &workers[i]) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    for (int i = 0; i < nthreads; i++)
        while (atomic_load(&workers[i].iters) == 0)
            sleep_ms(1);
    if (write_atomic(path, "ready\n") != 0) {
        perror("wl-threads: writing ready");
        return 1;
    }
    uint64_t checks = 0;
    while (!got_term) {
        if (got_usr1) {
            got_usr1 = 0;
            report(path, ++checks);
            continue;
        }
        sleep_ms(10);
    }
    return 0;
}
