// wl-files: file descriptors whose offsets, flags and contents must survive.
//
//   wl-files --report PATH --dir DIR
//
// Opens (in this order, so normally fds 3..6):
//   data  DIR/data.bin   O_RDWR|O_CREAT|O_CLOEXEC, truncated; one 64-byte record per
//                        step, written with write() at the file offset (never lseek)
//   log   DIR/log.txt    O_WRONLY|O_APPEND|O_CREAT, truncated; one line per record
//   null  /dev/null      O_WRONLY; each record is also written here
//   input DIR/input.txt  O_RDONLY; created at start with 100 known lines of varied
//                        length; one line is read per record, and at EOF it lseeks to 0
// Every 5 ms it writes one record (progress = records written). Record i holds
// magic, i, the input line number it consumed (i % 100), a payload derived from i
// and a checksum; log line i is "record i line L sum S".
//
// On SIGUSR1 it checks lseek(fd,0,SEEK_CUR) of every fd against its in-memory
// expectation, the fd flags (FD_CLOEXEC only on data; access modes; O_APPEND on
// log), that each fd is still the same file (inode / rdev), that data.bin and
// log.txt hold exactly the expected records and nothing more, and reports any
// error seen while reading the input. Report, written PATH.tmp + rename:
//   {"ok":true,"progress":N,"pid":P,"tids":[P],"fds":{"data":3,"log":4,"null":5,
//    "input":6},"checks":K,"detail":"..."}
// The file "ready" is written the same way after setup. SIGTERM: exit 0.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "workload_support.h"

#define NLINES 100
#define MAGIC 0x57A515F11E5EC0DEULL

struct rec {
    uint64_t magic, index;
    uint32_t line, linelen;
    uint8_t payload[32];
    uint64_t sum;
};
_Static_assert(sizeof(struct rec) == 64, "record size");

static char dir[2048];
static int fd_data, fd_log, fd_null, fd_in;
static uint64_t records, log_off, in_off, in_size;
static int in_line;
static char loop_err[512]; // first error seen while writing/reading records
static uint64_t loop_errs;
static char detail[4096];
static size_t dlen;
static int nbad;
static volatile sig_atomic_t got_usr1, got_term;

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
static void loop_bad(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void loop_bad(const char *fmt, ...) {
    if (loop_errs++)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(loop_err, sizeof loop_err, fmt, ap);
    va_end(ap);
}

static int input_line(int i, char *buf) { // returns the length, newline included
    int n = snprintf(buf, 128, "input line %03d: ", i);
    int extra = (i * 37) % 50;
    memset(buf + n, 'a' + i % 26, (size_t)extra);
    buf[n + extra] = '\n';
    return n + extra + 1;
}
static uint64_t fnv(const void *p, size_t n) {
    const uint8_t *b = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ULL;
    return h;
}
static void make_rec(struct rec *r, uint64_t i) {
    char tmp[128];
    memset(r, 0, sizeof *r);
    r->magic = MAGIC;
    r->index = i;
    r->line = (uint32_t)(i % NLINES);
    r->linelen = (uint32_t)input_line((int)r->line, tmp);
    for (int k = 0; k < 32; k++)
        r->payload[k] = (uint8_t)(i * 31 + (uint64_t)k * 7);
    r->sum = fnv(r, offsetof(struct rec, sum));
}
static int log_line(uint64_t i, char *buf) {
    struct rec r;
    make_rec(&r, i);
    return snprintf(buf, 96, "record %llu line %u sum %016llx\n", (unsigned long long)i, r.line,
                    (unsigned long long)r.sum);
}

static int write_full(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}
static ssize_t read_full(int fd, void *p, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)p + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0)
            break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

static void step(void) {
    char want[128], got[128], line[96];
    if (in_line == NLINES) { // the input must be at EOF here; wrap around
        ssize_t r = read_full(fd_in, got, 1);
        if (r != 0)
            loop_bad("input.txt: expected EOF at offset %llu, read returned %zd", (unsigned long long)in_off, r);
        if (lseek(fd_in, 0, SEEK_SET) != 0)
            loop_bad("input.txt: lseek to 0 failed: %s", strerror(errno));
        in_line = 0;
        in_off = 0;
    }
    int len = input_line(in_line, want);
    ssize_t r = read_full(fd_in, got, (size_t)len);
    if (r != len || memcmp(got, want, (size_t)len))
        loop_bad("input.txt: record %llu read line %d at offset %llu: expected \"%.*s\", got %zd bytes \"%.*s\"",
                 (unsigned long long)records, in_line, (unsigned long long)in_off, len - 1, want,
                 r, r > 1 ? (int)r - 1 : 0, got);
    in_line++;
    in_off += (uint64_t)len;

    struct rec rec;
    make_rec(&rec, records);
    int ll = log_line(records, line);
    if (write_full(fd_data, &rec, sizeof rec) || write_full(fd_log, line, (size_t)ll) ||
        write_full(fd_null, &rec, sizeof rec))
        loop_bad("record %llu: write failed: %s", (unsigned long long)records, strerror(errno));
    records++;
    log_off += (uint64_t)ll;
}

static void check_fd(const char *name, int fd, const char *path, uint64_t want_off, int want_cloexec, int want_fl) {
    off_t off = lseek(fd, 0, SEEK_CUR);
    if (off < 0 || (uint64_t)off != want_off)
        bad("%s (fd %d): offset %lld, expected %llu%s%s", name, fd, (long long)off, (unsigned long long)want_off,
            off < 0 ? ": " : "", off < 0 ? strerror(errno) : "");
    int fdfl = fcntl(fd, F_GETFD), fl = fcntl(fd, F_GETFL);
    if (fdfl < 0 || fl < 0) {
        bad("%s (fd %d): fcntl failed: %s", name, fd, strerror(errno));
        return;
    }
    if (!!(fdfl & FD_CLOEXEC) != want_cloexec)
        bad("%s (fd %d): FD_CLOEXEC is %d, expected %d", name, fd, !!(fdfl & FD_CLOEXEC), want_cloexec);
    if ((fl & (O_ACCMODE | O_APPEND)) != want_fl)
        bad("%s (fd %d): flags 0%o, expected access mode/append 0%o", name, fd, fl & (O_ACCMODE | O_APPEND), want_fl);
    struct stat a, b;
    if (fstat(fd, &a) || stat(path, &b) || a.st_dev != b.st_dev || a.st_ino != b.st_ino)
        bad("%s (fd %d): not the file %s any more", name, fd, path);
}

static void check_all(void) {
    char p[2100], want[128];
    dlen = 0;
    nbad = 0;
    detail[0] = 0;
    if (loop_errs)
        bad("%s (%llu errors while running)", loop_err, (unsigned long long)loop_errs);
    snprintf(p, sizeof p, "%s/data.bin", dir);
    check_fd("data.bin", fd_data, p, records * 64, 1, O_RDWR);
    struct stat st;
    if (fstat(fd_data, &st) == 0 && (uint64_t)st.st_size != records * 64)
        bad("data.bin: size %lld, expected %llu (%llu records)", (long long)st.st_size,
            (unsigned long long)records * 64, (unsigned long long)records);
    for (uint64_t i = 0; i < records; i++) {
        struct rec got, exp;
        make_rec(&exp, i);
        if (pread(fd_data, &got, 64, (off_t)(i * 64)) != 64) {
            bad("data.bin: cannot read record %llu: %s", (unsigned long long)i, strerror(errno));
            break;
        }
        if (memcmp(&got, &exp, 64)) {
            bad("data.bin: record %llu at offset %llu is wrong (index %llu, line %u, sum %s)", (unsigned long long)i,
                (unsigned long long)i * 64, (unsigned long long)got.index, got.line,
                got.sum == fnv(&got, offsetof(struct rec, sum)) ? "ok" : "bad");
            break;
        }
    }
    snprintf(p, sizeof p, "%s/log.txt", dir);
    check_fd("log.txt", fd_log, p, log_off, 0, O_WRONLY | O_APPEND);
    FILE *f = fopen(p, "r");
    if (!f) {
        bad("log.txt: cannot open for reading: %s", strerror(errno));
    } else {
        char got[200];
        uint64_t i = 0;
        for (; fgets(got, sizeof got, f); i++) {
            if (i >= records) {
                bad("log.txt: extra line %llu after %llu records: %s", (unsigned long long)i,
                    (unsigned long long)records, got);
                break;
            }
            log_line(i, want);
            if (strcmp(got, want)) {
                got[strcspn(got, "\n")] = 0;
                bad("log.txt: line %llu is \"%s\", expected \"%.*s\"", (unsigned long long)i, got,
                    (int)strlen(want) - 1, want);
                break;
            }
        }
        if (i < records && nbad == 0)
            bad("log.txt: only %llu lines for %llu records", (unsigned long long)i, (unsigned long long)records);
        fclose(f);
    }
    check_fd("/dev/null", fd_null, "/dev/null", 0, 0, O_WRONLY);
    if (fstat(fd_null, &st) || !S_ISCHR(st.st_mode) || st.st_rdev != makedev(1, 3))
        bad("/dev/null (fd %d): not the null device", fd_null);
    snprintf(p, sizeof p, "%s/input.txt", dir);
    check_fd("input.txt", fd_in, p, in_off, 0, O_RDONLY);
    if (fstat(fd_in, &st) == 0 && (uint64_t)st.st_size != in_size)
        bad("input.txt: size %lld, expected %llu", (long long)st.st_size, (unsigned long long)in_size);
}

static void on_signal(int sig) {
    if (sig == SIGUSR1)
        got_usr1 = 1;
    else
        got_term = 1;
}

static int open_in_dir(const char *name, int flags) {
    char p[2100];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    int fd = open(p, flags, 0644);
    if (fd < 0) {
        fprintf(stderr, "wl-files: %s: %s\n", p, strerror(errno));
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--report") && i + 1 < argc) path = argv[++i];
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc) snprintf(dir, sizeof dir, "%s", argv[++i]);
        else path = NULL, i = argc;
    }
    if (!path || !dir[0]) {
        fprintf(stderr, "usage: wl-files --report PATH --dir DIR\n");
        return 2;
    }
    mkdir(dir, 0755); // fine if it exists
    // input.txt first, through a temporary fd that is closed again
    int t = open_in_dir("input.txt", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC);
    for (int i = 0; i < NLINES; i++) {
        char buf[128];
        int n = input_line(i, buf);
        if (write_full(t, buf, (size_t)n))
            return 1;
        in_size += (uint64_t)n;
    }
    close(t);
    fd_data = open_in_dir("data.bin", O_RDWR | O_CREAT | O_CLOEXEC);
    fd_log = open_in_dir("log.txt", O_WRONLY | O_APPEND | O_CREAT);
    fd_null = open("/dev/null", O_WRONLY);
    fd_in = open_in_dir("input.txt", O_RDONLY);
    if (fd_null < 0 || ftruncate(fd_data, 0) || ftruncate(fd_log, 0)) {
        perror("wl-files: setup");
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    if (write_atomic(path, "ready\n")) {
        perror("wl-files: writing ready");
        return 1;
    }
    uint64_t checks = 0;
    while (!got_term) {
        if (got_usr1) {
            got_usr1 = 0;
            check_all();
            if (!nbad)
                snprintf(detail, sizeof detail, "%llu records; offsets, flags and contents of 4 fds ok",
                         (unsigned long long)records);
            char esc[sizeof detail * 2], out[sizeof esc + 512];
            size_t o = 0;
            for (const char *s = detail; *s && o + 2 < sizeof esc; s++) {
                if (*s == '"' || *s == '\\') esc[o++] = '\\';
                esc[o++] = ((unsigned char)*s >= 0x20) ? *s : ' ';
            }
            esc[o] = 0;
            snprintf(out, sizeof out,
                     "{\"ok\":%s,\"progress\":%llu,\"pid\":%d,\"tids\":[%d],\"fds\":{\"data\":%d,\"log\":%d,"
                     "\"null\":%d,\"input\":%d},\"checks\":%llu,\"detail\":\"%s\"}\n",
                     nbad ? "false" : "true", (unsigned long long)records, (int)getpid(), (int)gettid(), fd_data,
                     fd_log, fd_null, fd_in, (unsigned long long)++checks, esc);
            if (write_atomic(path, out))
                perror("wl-files: writing report");
            continue;
        }
        step();
        struct timespec ts = {0, 5000000}; // 5 ms; an early (EINTR) wake-up just shortens it
        nanosleep(&ts, NULL);
    }
    return 0;
}
