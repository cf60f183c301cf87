// wl-memory: memory in many kinds of places, each verifiable after restore.
//
//   wl-memory --report PATH [--mb N] [--file PATH2]   (N default 16, PATH2 default PATH.data)
//
// Every 8-byte word holds pat(address, tag) unless said otherwise:
//  heap     6000 malloc'd nodes (16..1008-byte payloads) in a linked list, with
//           6000 more freed in between them (holes in the heap)
//  bigmalloc  one 4 MiB malloc (mmap'd by glibc)
//  sbrk     1 MiB from sbrk()
//  anon     N MiB anonymous mmap, every page touched; pages i%7==3 are written
//           zeros, i%7==5 zeros except the last word, i%7==6 zeros except the first
//  sparse   64 MiB anonymous mmap, every 16th page filled, the rest never touched
//           (verified zero; non-resident ones per /proc/self/pagemap are skipped
//           so that the check does not fault them in)
//  file     1 MiB MAP_PRIVATE mapping of PATH2 (written at start with a pattern by
//           file offset); pages i%4==1 overwritten in memory, pages i%8==3 have one
//           word changed; the file on disk must stay unchanged
//  prot     256 KiB rw | 64 KiB PROT_NONE | 256 KiB read-only (filled, then
//           mprotect'ed), permissions checked in /proc/self/maps
//  stack    256 KiB array on a helper thread's stack (verified by that thread),
//           64 KiB on the main thread's stack
//  gen      1 MiB rewritten every 10 ms by a thread for generation g (progress)
//  globals  .data / .bss values
// The check also exercises brk (kernel brk == glibc's sbrk(0), sbrk(4096) works)
// and malloc/free of fresh small/medium/large blocks. It runs once at startup as
// a self-test (exit 1 on failure) before "ready", which also maps every page a
// check reads, so checks do not change the memory layout. PATH2 is left behind.
//
// Protocol: "ready" then, on SIGUSR1, one JSON line, both written PATH.tmp+rename:
//   {"ok":true,"progress":GEN,"pid":P,"tids":[main,gen,stack],"checks":K,"mb":N,"detail":"..."}
// SIGTERM: exit 0.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "workload_support.h"

#define PG 4096UL
#define MiB (1024UL * 1024)
#define NOBJ 6000
#define SPARSE_LEN (64 * MiB)

static uint64_t pat(const void *addr, uint64_t tag) {
    uint64_t z = (uint64_t)(uintptr_t)addr + tag * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return (z ^ (z >> 31)) | 1; // never zero
}
static void fill(void *p, size_t len, uint64_t tag) {
    uint64_t *w = p;
    for (size_t i = 0; i < len / 8; i++)
        w[i] = pat(&w[i], tag);
}

// ---- failure reporting (main thread only) -----------------------------------
static char detail[8192];
static size_t dlen;
static int nbad;
static void bad(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void bad(const char *fmt, ...) {
    nbad++;
    if (dlen + 2 >= sizeof detail)
        return;
    va_list ap;
    va_start(ap, fmt);
    dlen += (size_t)vsnprintf(detail + dlen, sizeof detail - dlen, fmt, ap);
    va_end(ap);
    if (dlen < sizeof detail - 2)
        dlen += (size_t)snprintf(detail + dlen, sizeof detail - dlen, "; ");
}

// Expected value of the word at addr, which is at byte offset off in its region.
typedef uint64_t (*expect_fn)(const uint64_t *addr, size_t off, uint64_t tag);
static uint64_t exp_pat(const uint64_t *a, size_t off, uint64_t tag) { (void)off; return pat(a, tag); }
static uint64_t exp_zero(const uint64_t *a, size_t off, uint64_t tag) { (void)a; (void)off; (void)tag; return 0; }

// Verify words [from, from+len) of region `what` starting at base; report first mismatch.
static size_t verify_fn(char *out, size_t cap, const char *what, const void *base, size_t from, size_t len,
                        expect_fn f, uint64_t tag) {
    const uint64_t *w = (const uint64_t *)((const char *)base + from);
    size_t nb = 0, first = 0;
    uint64_t want0 = 0, got0 = 0;
    for (size_t i = 0; i < len / 8; i++) {
        uint64_t want = f(&w[i], from + i * 8, tag);
        if (w[i] != want && nb++ == 0) {
            first = from + i * 8;
            want0 = want;
            got0 = w[i];
        }
    }
    if (nb)
        snprintf(out, cap, "%s: %zu bad words, first at offset 0x%zx (page %zu, addr %p): expected 0x%016llx got 0x%016llx",
                 what, nb, first, first / PG, (const char *)base + first, (unsigned long long)want0,
                 (unsigned long long)got0);
    return nb;
}
static void verify(const char *what, const void *base, size_t from, size_t len, expect_fn f, uint64_t tag) {
    char msg[512];
    if (verify_fn(msg, sizeof msg, what, base, from, len, f, tag))
        bad("%s", msg);
}

// ---- the regions ---------------------------------------------------------------
struct node {
    struct node *next;
    uint32_t idx, size; // size of w[] in bytes
    uint64_t w[];
};
static struct node *head, **nodes;
static uint32_t node_size(uint32_t i) { return 16 + (i * 7919u) % 1000 / 8 * 8; }

static char *bigm, *sbrk_area, *anon, *sparse, *fmap, *prot;
static size_t anon_len;
static const size_t SBRK_LEN = MiB, BIGM_LEN = 4 * MiB, FMAP_LEN = MiB, PROT_A = 256 * 1024, PROT_B = 64 * 1024;
static const char *fpath;

static uint64_t exp_anon(const uint64_t *a, size_t off, uint64_t tag) {
    size_t pg = off / PG, in = off % PG;
    if (pg % 7 == 3 || (pg % 7 == 5 && in != PG - 8) || (pg % 7 == 6 && in != 0))
        return 0;
    return pat(a, tag);
}
static uint64_t filepat(size_t off) { return pat((const void *)(uintptr_t)off, 0xF11E); }
static uint64_t exp_fmap(const uint64_t *a, size_t off, uint64_t tag) {
    size_t pg = off / PG;
    if (pg % 4 == 1 || (pg % 8 == 3 && off % PG == 800))
        return pat(a, tag);
    return filepat(off);
}

static pthread_mutex_t gen_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t *gen_area;
static volatile uint64_t gen_stored;

static _Atomic int stack_req; // 1: main asks, 0: helper answered
static char stack_msg[512];
static pid_t gen_tid, stack_tid;

static volatile uint64_t data_magic = 0xDA7A0123456789ABULL; // .data
static volatile uint64_t bss_value;                           // .bss, set at start

static void *gen_thread(void *arg) {
    (void)arg;
    gen_tid = gettid();
    for (;;) {
        sleep_ms(10);
        pthread_mutex_lock(&gen_lock);
        fill(gen_area, MiB, gen_stored + 1);
        gen_stored = gen_stored + 1;
        pthread_mutex_unlock(&gen_lock);
    }
    return NULL;
}

static void *stack_thread(void *arg) {
    volatile uint64_t buf[256 * 1024 / 8];
    (void)arg;
    for (size_t i = 0; i < sizeof buf / 8; i++)
        buf[i] = pat((const void *)&buf[i], 0x57AC);
    stack_tid = gettid();
    for (;;) {
        if (atomic_load(&stack_req)) {
            stack_msg[0] = 0;
            verify_fn(stack_msg, sizeof stack_msg, "thread stack", (const void *)buf, 0, sizeof buf, exp_pat, 0x57AC);
            atomic_store(&stack_req, 0);
        }
        sleep_ms(10);
    }
    return NULL;
}

// Check the mapping containing addr in /proc/self/maps: its permissions ("rw-p"
// etc.) and, when lo/hi are non-NULL, its exact bounds.
static void check_vma(const char *what, const void *addr, const char *want, const void *lo, const void *hi) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512], perms[5] = "";
    unsigned long a = 0, b = 0;
    int found = 0;
    while (f && !found && fgets(line, sizeof line, f))
        found = sscanf(line, "%lx-%lx %4s", &a, &b, perms) == 3 && (uintptr_t)addr >= a && (uintptr_t)addr < b;
    if (f)
        fclose(f);
    if (!found)
        bad("%s: no mapping at %p in /proc/self/maps", what, addr);
    else if (strcmp(perms, want))
        bad("%s: mapping at %p has permissions %s, expected %s", what, addr, perms, want);
    else if (lo && hi && (a != (uintptr_t)lo || b != (uintptr_t)hi))
        bad("%s: mapping is %lx-%lx, expected %p-%p", what, a, b, lo, hi);
}

static void check_sparse(void) {
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    size_t npages = SPARSE_LEN / PG;
    for (size_t pg = 0; pg < npages; pg++) {
        if (pg % 16 == 0) {
            verify("sparse (touched page)", sparse, pg * PG, PG, exp_pat, 0xE);
            continue;
        }
        uint64_t e = 0;
        off_t at = (off_t)(((uintptr_t)sparse / PG + pg) * 8);
        if (pm >= 0 && pread(pm, &e, 8, at) == 8 && !(e >> 62)) // neither present nor swapped
            continue;
        verify("sparse (untouched page)", sparse, pg * PG, PG, exp_zero, 0);
    }
    if (pm >= 0)
        close(pm);
    check_vma("sparse", sparse + SPARSE_LEN - 1, "rw-p", NULL, NULL);
}

static void check_brk_malloc(void) {
    void *cur = sbrk(0), *kern = (void *)syscall(SYS_brk, 0);
    if (cur != kern)
        bad("brk: glibc sbrk(0) %p but kernel brk %p", cur, kern);
    if ((char *)cur < sbrk_area + SBRK_LEN)
        bad("brk: sbrk(0) %p is below the end of the sbrk area %p", cur, sbrk_area + SBRK_LEN);
    char *p = sbrk(4096);
    if (p == (void *)-1) {
        bad("brk: sbrk(4096) failed: %s", strerror(errno));
    } else {
        if (p != cur)
            bad("brk: sbrk(4096) returned %p, expected %p", (void *)p, cur);
        fill(p, 4096, 0x5B);
        verify("new sbrk page", p, 0, 4096, exp_pat, 0x5B);
        if (sbrk(0) == p + 4096)
            sbrk(-4096);
    }
    static const size_t sizes[] = {100, 64 * 1024, 8 * MiB};
    for (int i = 0; i < 3; i++) {
        char *m = malloc(sizes[i]);
        if (!m) {
            bad("malloc(%zu) failed", sizes[i]);
            continue;
        }
        fill(m, sizes[i], 0x3A110C + (uint64_t)i);
        verify("fresh malloc", m, 0, sizes[i], exp_pat, 0x3A110C + (uint64_t)i);
        free(m);
    }
}

static void check_all(uint64_t *mainstack, size_t mslen) {
    dlen = 0;
    nbad = 0;
    detail[0] = 0;
    atomic_store(&stack_req, 1);
    // heap list
    struct node *n = head;
    for (uint32_t i = 0; i < NOBJ; i++) {
        if (n != nodes[i]) {
            bad("heap: node %u is at %p, expected %p", i, (void *)n, (void *)nodes[i]);
            break;
        }
        if (n->idx != i || n->size != node_size(i))
            bad("heap: node %u at %p has idx %u size %u, expected size %u", i, (void *)n, n->idx, n->size, node_size(i));
        else
            verify("heap node payload", n->w, 0, n->size, exp_pat, 0xA000 + i);
        n = n->next;
    }
    if (nbad == 0 && n != NULL)
        bad("heap: list does not end after %d nodes (next %p)", NOBJ, (void *)n);
    verify("bigmalloc", bigm, 0, BIGM_LEN, exp_pat, 0xB);
    verify("sbrk", sbrk_area, 0, SBRK_LEN, exp_pat, 0xC);
    verify("anon", anon, 0, anon_len, exp_anon, 0xD);
    check_sparse();
    verify("file mapping", fmap, 0, FMAP_LEN, exp_fmap, 0x6A);
    int fd = open(fpath, O_RDONLY | O_CLOEXEC);
    uint64_t *fb = malloc(FMAP_LEN);
    if (fd < 0 || !fb || pread(fd, fb, FMAP_LEN, 0) != (ssize_t)FMAP_LEN) {
        bad("file %s: cannot read 1 MiB back: %s", fpath, strerror(errno));
    } else {
        for (size_t i = 0; i < FMAP_LEN / 8; i++)
            if (fb[i] != filepat(i * 8)) {
                bad("file %s changed on disk at offset 0x%zx: expected 0x%016llx got 0x%016llx", fpath, i * 8,
                    (unsigned long long)filepat(i * 8), (unsigned long long)fb[i]);
                break;
            }
    }
    free(fb);
    if (fd >= 0)
        close(fd);
    check_vma("file mapping", fmap, "rw-p", fmap, fmap + FMAP_LEN);
    verify("prot rw part", prot, 0, PROT_A, exp_pat, 0x4A);
    verify("prot read-only part", prot, PROT_A + PROT_B, PROT_A, exp_pat, 0x4C);
    check_vma("prot rw part", prot + PROT_A - 1, "rw-p", NULL, NULL);
    check_vma("prot guard", prot + PROT_A, "---p", prot + PROT_A, prot + PROT_A + PROT_B);
    check_vma("prot read-only part", prot + PROT_A + PROT_B, "r--p", NULL, NULL);
    check_vma("prot read-only part (end)", prot + 2 * PROT_A + PROT_B - 1, "r--p", NULL, NULL);
    verify("main thread stack", mainstack, 0, mslen, exp_pat, 0x3A1);
    if (data_magic != 0xDA7A0123456789ABULL || bss_value != pat((const void *)(uintptr_t)&bss_value, 0xB55))
        bad("globals: .data 0x%llx .bss 0x%llx", (unsigned long long)data_magic, (unsigned long long)bss_value);
    pthread_mutex_lock(&gen_lock);
    char what[64];
    snprintf(what, sizeof what, "gen area (generation %llu)", (unsigned long long)gen_stored);
    verify(what, gen_area, 0, MiB, exp_pat, gen_stored);
    pthread_mutex_unlock(&gen_lock);
    check_brk_malloc();
    for (int i = 0; i < 200 && atomic_load(&stack_req); i++) // up to 2 s
        sleep_ms(10);
    if (atomic_load(&stack_req))
        bad("stack thread (tid %d) did not answer within 2 s", (int)stack_tid);
    else if (stack_msg[0])
        bad("%s", stack_msg);
}

static volatile sig_atomic_t got_usr1, got_term;
static void on_signal(int sig) {
    if (sig == SIGUSR1)
        got_usr1 = 1;
    else
        got_term = 1;
}

static void *map(size_t len, int prot_flags, int extra) {
    void *p = mmap(NULL, len, prot_flags, MAP_PRIVATE | MAP_ANONYMOUS | extra, -1, 0);
    if (p == MAP_FAILED) {
        perror("wl-memory: mmap");
        exit(1);
    }
    return p;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    long mb = 16;
    char fbuf[4096];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--report") && i + 1 < argc) path = argv[++i];
        else if (!strcmp(argv[i], "--mb") && i + 1 < argc) mb = atol(argv[++i]);
        else if (!strcmp(argv[i], "--file") && i + 1 < argc) fpath = argv[++i];
        else path = NULL, i = argc;
    }
    if (!path || mb < 1) {
        fprintf(stderr, "usage: wl-memory --report PATH [--mb N] [--file PATH2]\n");
        return 2;
    }
    if (!fpath) {
        snprintf(fbuf, sizeof fbuf, "%s.data", path);
        fpath = fbuf;
    }
    bss_value = pat((const void *)(uintptr_t)&bss_value, 0xB55);
    // A fixed threshold turns off glibc's dynamic one, so the malloc/free done by
    // each check leaves the heap's shape unchanged (large blocks stay mmap'd).
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);
    // (a) heap objects, with freed holes between them
    nodes = malloc(NOBJ * sizeof *nodes);
    struct node **link = &head;
    for (uint32_t i = 0; i < NOBJ; i++) {
        void *hole = malloc(node_size(i * 3 + 1) + 16);
        struct node *n = malloc(sizeof *n + node_size(i));
        if (!n || !hole || !nodes)
            return 1;
        free(hole);
        n->idx = i;
        n->size = node_size(i);
        fill(n->w, n->size, 0xA000 + i);
        *link = nodes[i] = n;
        link = &n->next;
    }
    *link = NULL;
    // (b) big malloc, (c) sbrk
    bigm = malloc(BIGM_LEN);
    sbrk_area = sbrk((intptr_t)SBRK_LEN);
    if (!bigm || sbrk_area == (void *)-1) {
        perror("wl-memory: malloc/sbrk");
        return 1;
    }
    fill(bigm, BIGM_LEN, 0xB);
    fill(sbrk_area, SBRK_LEN, 0xC);
    // (d) anon + (f) deliberate zero pages
    anon_len = (size_t)mb * MiB;
    anon = map(anon_len, PROT_READ | PROT_WRITE, 0);
    fill(anon, anon_len, 0xD);
    for (size_t pg = 0; pg < anon_len / PG; pg++) {
        if (pg % 7 == 3) memset(anon + pg * PG, 0, PG);
        if (pg % 7 == 5) memset(anon + pg * PG, 0, PG - 8);
        if (pg % 7 == 6) memset(anon + pg * PG + 8, 0, PG - 8);
    }
    // (e) sparse
    sparse = map(SPARSE_LEN, PROT_READ | PROT_WRITE, MAP_NORESERVE);
    for (size_t pg = 0; pg < SPARSE_LEN / PG; pg += 16)
        fill(sparse + pg * PG, PG, 0xE);
    // (g) private file mapping
    int fd = open(fpath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    uint64_t *fb = malloc(FMAP_LEN);
    if (fd < 0 || !fb) {
        perror(fpath);
        return 1;
    }
    for (size_t i = 0; i < FMAP_LEN / 8; i++)
        fb[i] = filepat(i * 8);
    if (write(fd, fb, FMAP_LEN) != (ssize_t)FMAP_LEN) {
        perror("wl-memory: writing data file");
        return 1;
    }
    free(fb);
    fmap = mmap(NULL, FMAP_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (fmap == MAP_FAILED) {
        perror("wl-memory: mmap file");
        return 1;
    }
    close(fd);
    for (size_t pg = 0; pg < FMAP_LEN / PG; pg++) {
        if (pg % 4 == 1) fill(fmap + pg * PG, PG, 0x6A);
        if (pg % 8 == 3) *(uint64_t *)(fmap + pg * PG + 800) = pat(fmap + pg * PG + 800, 0x6A);
    }
    // (h) rw | PROT_NONE | read-only
    prot = map(2 * PROT_A + PROT_B, PROT_READ | PROT_WRITE, 0);
    fill(prot, PROT_A, 0x4A);
    fill(prot + PROT_A + PROT_B, PROT_A, 0x4C);
    if (mprotect(prot + PROT_A, PROT_B, PROT_NONE) || mprotect(prot + PROT_A + PROT_B, PROT_A, PROT_READ)) {
        perror("wl-memory: mprotect");
        return 1;
    }
    // main thread stack
    uint64_t mainstack[64 * 1024 / 8];
    fill(mainstack, sizeof mainstack, 0x3A1);
    // generation area, threads (signals blocked in them so they go to main)
    gen_area = map(MiB, PROT_READ | PROT_WRITE, 0);
    fill(gen_area, MiB, 0);
    sigset_t old;
    install_report_signals(on_signal, &old); // threads inherit the block: signals go to main
    pthread_t t1, t2;
    if (pthread_create(&t1, NULL, gen_thread, NULL) || pthread_create(&t2, NULL, stack_thread, NULL))
        return 1;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    while (!gen_tid || !stack_tid)
        sleep_ms(1);
    // Self-test once before "ready"; this also maps every page a check reads, so
    // the memory layout does not change on later checks.
    check_all(mainstack, sizeof mainstack);
    if (nbad) {
        fprintf(stderr, "wl-memory: startup self-check failed: %s\n", detail);
        return 1;
    }
    if (write_atomic(path, "ready\n")) {
        perror("wl-memory: writing ready");
        return 1;
    }
    uint64_t checks = 0;
    while (!got_term) {
        if (!got_usr1) {
            sleep_ms(10);
            continue;
        }
        got_usr1 = 0;
        check_all(mainstack, sizeof mainstack);
        if (nbad == 0)
            snprintf(detail, sizeof detail, "all regions ok (heap, bigmalloc, sbrk, anon %ld MiB, sparse, file, prot, stacks, gen, brk, malloc)", mb);
        char esc[sizeof detail * 2], out[sizeof esc + 512];
        size_t o = 0;
        for (const char *s = detail; *s && o + 2 < sizeof esc; s++) {
            if (*s == '"' || *s == '\\') esc[o++] = '\\';
            esc[o++] = (*s >= 0x20) ? *s : ' ';
        }
        esc[o] = 0;
        snprintf(out, sizeof out,
                 "{\"ok\":%s,\"progress\":%llu,\"pid\":%d,\"tids\":[%d,%d,%d],\"checks\":%llu,\"mb\":%ld,\"detail\":\"%s\"}\n",
                 nbad ? "false" : "true", (unsigned long long)gen_stored, (int)getpid(), (int)gettid(), (int)gen_tid,
                 (int)stack_tid, (unsigned long long)++checks, mb, esc);
        if (write_atomic(path, out))
            perror("wl-memory: writing report");
    }
    return 0;
}
