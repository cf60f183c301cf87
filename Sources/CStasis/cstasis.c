// Implementation of the CStasis shim. See include/cstasis.h for the contract of each call.
#define _GNU_SOURCE
#include "cstasis.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/sched.h>
#include <linux/btrfs.h>
#include <linux/fs.h>
#include <sys/vfs.h>

static long negErrno(long result) { return result == -1 ? -errno : result; }

// MARK: ptrace

long stasis_ptrace(int request, pid_t pid, uint64_t addr, uint64_t data) {
    return negErrno(ptrace((enum __ptrace_request)request, pid, (void *)addr, (void *)data));
}

long stasis_ptrace_getregset(pid_t tid, int type, void *buffer, size_t *size) {
    struct iovec iov = {.iov_base = buffer, .iov_len = *size};
    long result = negErrno(ptrace(PTRACE_GETREGSET, tid, (void *)(long)type, &iov));
    if (result == 0) *size = iov.iov_len;
    return result;
}

long stasis_ptrace_setregset(pid_t tid, int type, const void *buffer, size_t size) {
    struct iovec iov = {.iov_base = (void *)buffer, .iov_len = size};
    return negErrno(ptrace(PTRACE_SETREGSET, tid, (void *)(long)type, &iov));
}

// MARK: wait status

int stasis_wifexited(int status) { return WIFEXITED(status); }
int stasis_wexitstatus(int status) { return WEXITSTATUS(status); }
int stasis_wifsignaled(int status) { return WIFSIGNALED(status); }
int stasis_wtermsig(int status) { return WTERMSIG(status); }
int stasis_wifstopped(int status) { return WIFSTOPPED(status); }
int stasis_wstopsig(int status) { return WSTOPSIG(status); }
int stasis_wptrace_event(int status) { return (status >> 16) & 0xff; }

long stasis_waitpid(pid_t pid, int *status, int options) {
    return negErrno(waitpid(pid, status, options));
}

// MARK: raw syscalls

long stasis_syscall6(long number, long a1, long a2, long a3, long a4, long a5, long a6) {
    return negErrno(syscall(number, a1, a2, a3, a4, a5, a6));
}

long stasis_gettid(void) { return syscall(SYS_gettid); }

long stasis_tgkill(pid_t tgid, pid_t tid, int sig) {
    return negErrno(syscall(SYS_tgkill, tgid, tid, sig));
}

long stasis_pidfd_open(pid_t pid, unsigned int flags) {
    return negErrno(syscall(SYS_pidfd_open, pid, flags));
}

long stasis_get_robust_list(pid_t tid, uint64_t *head, uint64_t *length) {
    void *headPointer = NULL;
    size_t len = 0;
    long result = negErrno(syscall(SYS_get_robust_list, tid, &headPointer, &len));
    if (result == 0) {
        *head = (uint64_t)(uintptr_t)headPointer;
        *length = len;
    }
    return result;
}

long stasis_prctl(int option, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5) {
    return negErrno(prctl(option, a2, a3, a4, a5));
}

long stasis_ioctl(int fd, unsigned long request, void *argument) {
    return negErrno(ioctl(fd, request, argument));
}

long stasis_prlimit(pid_t pid, int resource, const void *newLimit, void *oldLimit) {
    return negErrno(syscall(SYS_prlimit64, pid, resource, newLimit, oldLimit));
}

long stasis_process_vm_readv(pid_t pid, const struct iovec *local, unsigned long localCount,
                             const struct iovec *remote, unsigned long remoteCount) {
    return negErrno(process_vm_readv(pid, local, localCount, remote, remoteCount, 0));
}

long stasis_process_vm_writev(pid_t pid, const struct iovec *local, unsigned long localCount,
                              const struct iovec *remote, unsigned long remoteCount) {
    return negErrno(process_vm_writev(pid, local, localCount, remote, remoteCount, 0));
}

long stasis_pread(int fd, void *buffer, size_t count, uint64_t offset) {
    return negErrno(pread(fd, buffer, count, (off_t)offset));
}

long stasis_pwrite(int fd, const void *buffer, size_t count, uint64_t offset) {
    return negErrno(pwrite(fd, buffer, count, (off_t)offset));
}

// MARK: PAGEMAP_SCAN

struct stasis_pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

long stasis_pagemap_scan(int pagemapFD, uint64_t start, uint64_t end,
                         uint64_t categoryInverted, uint64_t categoryMask,
                         uint64_t categoryAnyOf, uint64_t returnMask,
                         struct stasis_page_region *regions, uint64_t capacity,
                         uint64_t *walkEnd) {
    struct stasis_pm_scan_arg arg = {
        .size = sizeof(arg),
        .flags = 0,
        .start = start,
        .end = end,
        .vec = (uint64_t)(uintptr_t)regions,
        .vec_len = capacity,
        .max_pages = 0,
        .category_inverted = categoryInverted,
        .category_mask = categoryMask,
        .category_anyof_mask = categoryAnyOf,
        .return_mask = returnMask,
    };
    long result = negErrno(ioctl(pagemapFD, STASIS_PAGEMAP_SCAN, &arg));
    *walkEnd = arg.walk_end;
    return result;
}

// MARK: restore stub

// The child of clone3 below shares nothing with glibc's fork handlers, so it may only issue
// raw system calls; these helpers compile to a bare `syscall` instruction.
static inline long rawSyscall4(long n, long a1, long a2, long a3, long a4) {
    long ret;
    register long r10 __asm__("r10") = a4;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10)
                     : "rcx", "r11", "memory");
    return ret;
}

static inline long rawSyscall6(long n, long a1, long a2, long a3, long a4, long a5, long a6) {
    long ret;
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

static const char procName[] = "proc";
static const char procPath[] = "/proc";
static const char rootPath[] = "/";

// In a child that has just entered new PID and mount namespaces: keeps its mounts to itself and
// mounts a /proc that shows its own PID namespace. Returns 0 or -errno.
static long mountPrivateProc(void) {
    long failure = rawSyscall6(SYS_mount, 0, (long)rootPath, 0, MS_REC | MS_PRIVATE, 0, 0);
    if (failure < 0) return failure;
    return rawSyscall6(SYS_mount, (long)procName, (long)procPath, (long)procName, MS_NOSUID | MS_NODEV | MS_NOEXEC, 0, 0);
}

// Closes every fd except `keepFD` (which may be -1).
static void closeAllBut(int keepFD) {
    if (keepFD > 0) rawSyscall4(SYS_close_range, 0, keepFD - 1, 0, 0);
    if (keepFD >= 0) rawSyscall4(SYS_close_range, keepFD + 1, ~0U, 0, 0);
    else rawSyscall4(SYS_close_range, 0, ~0U, 0, 0);
}

// The restore stub's own set-up, then pause() until a tracer takes it over. Never returns.
__attribute__((noreturn)) static void becomeStub(int keepFD) {
    uint64_t all = ~0ULL;
    rawSyscall4(SYS_rt_sigprocmask, SIG_SETMASK, (long)&all, 0, sizeof(all));
    struct { uint64_t handler, flags, restorer, mask; } defaultAction = {0, 0, 0, 0};
    for (long sig = 1; sig <= 64; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP) rawSyscall4(SYS_rt_sigaction, sig, (long)&defaultAction, 0, 8);
    }
    rawSyscall4(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0);
    closeAllBut(keepFD);
    for (;;) rawSyscall4(SYS_pause, 0, 0, 0, 0);
}

long stasis_spawn_restore_stub(pid_t pid, int cgroupFD, int keepFD, int newNamespaces) {
    pid_t tids[1] = {pid};
    struct clone_args args;
    memset(&args, 0, sizeof(args));
    args.exit_signal = SIGCHLD;
    if (newNamespaces) {
        args.flags |= CLONE_NEWPID | CLONE_NEWNS;  // PID 1 of the new namespace
    } else {
        args.set_tid = (uint64_t)(uintptr_t)tids;
        args.set_tid_size = 1;
    }
    if (cgroupFD >= 0) {
        args.flags |= 0x200000000ULL; // CLONE_INTO_CGROUP
        args.cgroup = (uint64_t)cgroupFD;
    }
    long child = rawSyscall4(SYS_clone3, (long)&args, sizeof(args), 0, 0);
    if (child != 0) return child; // the parent: PID or -errno
    // The child: only raw syscalls from here on.
    if (newNamespaces && mountPrivateProc() < 0) rawSyscall4(SYS_exit_group, 126, 0, 0, 0);
    becomeStub(keepFD);
}

long stasis_spawn_namespace_init(pid_t rootPID, int cgroupFD, int keepFD) {
    struct clone_args args;
    memset(&args, 0, sizeof(args));
    args.exit_signal = SIGCHLD;
    args.flags = CLONE_NEWPID | CLONE_NEWNS;
    if (cgroupFD >= 0) {
        args.flags |= 0x200000000ULL; // CLONE_INTO_CGROUP
        args.cgroup = (uint64_t)cgroupFD;
    }
    long init = rawSyscall4(SYS_clone3, (long)&args, sizeof(args), 0, 0);
    if (init != 0) return init;
    // The namespace's init: raw syscalls only.
    uint64_t all = ~0ULL;
    rawSyscall4(SYS_rt_sigprocmask, SIG_SETMASK, (long)&all, 0, sizeof(all));
    struct { uint64_t handler, flags, restorer, mask; } defaultAction = {0, 0, 0, 0};
    for (long sig = 1; sig <= 64; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP) rawSyscall4(SYS_rt_sigaction, sig, (long)&defaultAction, 0, 8);
    }
    if (mountPrivateProc() < 0) rawSyscall4(SYS_exit_group, 126, 0, 0, 0);
    closeAllBut(keepFD);
    pid_t tids[1] = {rootPID};
    struct clone_args rootArgs;
    memset(&rootArgs, 0, sizeof(rootArgs));
    rootArgs.exit_signal = SIGCHLD;
    rootArgs.set_tid = (uint64_t)(uintptr_t)tids;
    rootArgs.set_tid_size = 1;
    long root = rawSyscall4(SYS_clone3, (long)&rootArgs, sizeof(rootArgs), 0, 0);
    if (root == 0) becomeStub(keepFD);
    if (root < 0) rawSyscall4(SYS_exit_group, 125, 0, 0, 0);
    if (keepFD >= 0) rawSyscall4(SYS_close, keepFD, 0, 0, 0);
    // Reap every orphan of the namespace; when the root ends, end as it did.
    for (;;) {
        int status = 0;
        long reaped = rawSyscall4(SYS_wait4, -1, (long)&status, 0x40000000 /* __WALL */, 0);
        if (reaped == root) {
            int signal = status & 0x7f;
            rawSyscall4(SYS_exit_group, signal == 0 ? (status >> 8) & 0xff : 128 + signal, 0, 0, 0);
        }
        if (reaped == -ECHILD) rawSyscall4(SYS_exit_group, 0, 0, 0, 0);
    }
}

long stasis_kcmp_files(pid_t pid1, pid_t pid2, int fd1, int fd2) {
    return negErrno(syscall(SYS_kcmp, pid1, pid2, 0 /* KCMP_FILE */, fd1, fd2));
}

long stasis_tee(int from, int to, size_t length, unsigned int flags) {
    return negErrno(tee(from, to, length, flags));
}

long stasis_memfd_create(const char *name, unsigned int flags) {
    return negErrno(syscall(SYS_memfd_create, name, flags));
}

long stasis_fcntl(int fd, int command, long argument) {
    return negErrno(fcntl(fd, command, argument));
}

long stasis_pipe2(int fds[2], int flags) { return negErrno(pipe2(fds, flags)); }

long stasis_mmap_shared_anonymous(uint64_t size, uint64_t *address) {
    void *placed = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (placed == MAP_FAILED) return -errno;
    *address = (uint64_t)(uintptr_t)placed;
    return 0;
}

long stasis_munmap(uint64_t address, uint64_t size) {
    return negErrno(munmap((void *)(uintptr_t)address, size));
}

// MARK: CRC-32C

static uint32_t crcTable[8][256];
static int crcTableReady;

static void buildCRCTable(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crcTable[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crcTable[t][i] = (crcTable[t - 1][i] >> 8) ^ crcTable[0][crcTable[t - 1][i] & 0xff];
    __atomic_store_n(&crcTableReady, 1, __ATOMIC_RELEASE);
}

static uint32_t crc32cSoftware(uint32_t crc, const unsigned char *p, size_t n) {
    if (!__atomic_load_n(&crcTableReady, __ATOMIC_ACQUIRE)) buildCRCTable();
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        word ^= crc;
        crc = crcTable[7][word & 0xff] ^ crcTable[6][(word >> 8) & 0xff] ^
              crcTable[5][(word >> 16) & 0xff] ^ crcTable[4][(word >> 24) & 0xff] ^
              crcTable[3][(word >> 32) & 0xff] ^ crcTable[2][(word >> 40) & 0xff] ^
              crcTable[1][(word >> 48) & 0xff] ^ crcTable[0][word >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ crcTable[0][(crc ^ *p++) & 0xff];
    return crc;
}

__attribute__((target("sse4.2"))) static uint32_t crc32cHardware(uint32_t crc, const unsigned char *p,
                                                                  size_t n) {
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}

uint32_t stasis_crc32c(uint32_t crc, const void *data, size_t length) {
    static int hasSSE42 = -1;
    if (hasSSE42 < 0) hasSSE42 = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    crc = ~crc;
    crc = hasSSE42 ? crc32cHardware(crc, data, length) : crc32cSoftware(crc, data, length);
    return ~crc;
}

int stasis_page_is_zero(const void *page) {
    const uint64_t *words = page;
    for (size_t i = 0; i < 4096 / 8; i += 8) {
        uint64_t any = words[i] | words[i + 1] | words[i + 2] | words[i + 3] | words[i + 4] |
                       words[i + 5] | words[i + 6] | words[i + 7];
        if (any) return 0;
    }
    return 1;
}

// MARK: detached spawn


long stasis_spawn_detached(const char *path, char *const argv[], char *const envp[],
                           int stdinFD, int stdoutFD, int stderrFD, int cgroupFD, int newNamespaces) {
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0) return -errno;
    struct clone_args args;
    memset(&args, 0, sizeof(args));
    args.exit_signal = SIGCHLD;
    if (newNamespaces) args.flags |= CLONE_NEWPID | CLONE_NEWNS;
    if (cgroupFD >= 0) {
        args.flags |= 0x200000000ULL; // CLONE_INTO_CGROUP
        args.cgroup = (uint64_t)cgroupFD;
    }
    long child = rawSyscall4(SYS_clone3, (long)&args, sizeof(args), 0, 0);
    if (child == 0) {
        // The child: raw syscalls only until execve.
        long failure;
        if (newNamespaces) {
            long mounted = mountPrivateProc();
            if (mounted < 0) {
                rawSyscall4(SYS_write, report[1], (long)&mounted, sizeof(mounted), 0);
                rawSyscall4(SYS_exit_group, 127, 0, 0, 0);
            }
        }
        uint64_t none = 0;
        rawSyscall4(SYS_rt_sigprocmask, SIG_SETMASK, (long)&none, 0, sizeof(none));
        struct { uint64_t handler, flags, restorer, mask; } dfl = {0, 0, 0, 0};
        for (long sig = 1; sig <= 64; sig++) {
            if (sig == SIGKILL || sig == SIGSTOP) continue;
            rawSyscall4(SYS_rt_sigaction, sig, (long)&dfl, 0, 8);
        }
        // Move the report pipe's write end out of the way of 0..2 before dup'ing onto them.
        long reportFD = rawSyscall4(SYS_fcntl, report[1], F_DUPFD_CLOEXEC, 3, 0);
        if (reportFD < 0) rawSyscall4(SYS_exit_group, 127, 0, 0, 0);
        int sources[3] = {stdinFD, stdoutFD, stderrFD};
        long moved[3];
        for (int i = 0; i < 3; i++) {
            moved[i] = rawSyscall4(SYS_fcntl, sources[i], F_DUPFD_CLOEXEC, 3, 0);
            if (moved[i] < 0) { failure = moved[i]; goto fail; }
        }
        for (int i = 0; i < 3; i++) {
            failure = rawSyscall4(SYS_dup3, moved[i], i, 0, 0);
            if (failure < 0) goto fail;
        }
        // Everything from 3 up is closed, except the report pipe (close-on-exec).
        if (reportFD > 3) rawSyscall4(SYS_close_range, 3, reportFD - 1, 0, 0);
        rawSyscall4(SYS_close_range, reportFD + 1, ~0U, 0, 0);
        failure = rawSyscall4(SYS_setsid, 0, 0, 0, 0);
        if (failure < 0) goto fail;
        failure = rawSyscall6(SYS_execve, (long)path, (long)argv, (long)envp, 0, 0, 0);
    fail:
        rawSyscall4(SYS_write, reportFD, (long)&failure, sizeof(failure), 0);
        rawSyscall4(SYS_exit_group, 127, 0, 0, 0);
    }
    close(report[1]);
    if (child < 0) {
        close(report[0]);
        return child;
    }
    long failure = 0;
    ssize_t got;
    do got = read(report[0], &failure, sizeof(failure)); while (got < 0 && errno == EINTR);
    close(report[0]);
    if (got == sizeof(failure)) {
        int status;
        waitpid((pid_t)child, &status, 0);
        return failure;
    }
    return child;
}

// MARK: cancellation

static volatile sig_atomic_t cancelSignal;
static volatile pid_t cancelInterruptThread;

static void recordCancelSignal(int signo) {
    if (cancelSignal == 0) cancelSignal = signo;
    // Make sure the thread doing the blocking work sees EINTR too.
    pid_t target = cancelInterruptThread;
    if (target > 0 && (pid_t)syscall(SYS_gettid) != target) {
        int saved = errno;
        syscall(SYS_tgkill, getpid(), target, signo);
        errno = saved;
    }
}

void stasis_set_cancel_interrupt_thread(pid_t tid) { cancelInterruptThread = tid; }

int stasis_install_cancel_handler(int signo) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = recordCancelSignal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;  // no SA_RESTART: a blocked write returns EINTR and sees the request
    return sigaction(signo, &action, NULL) == 0 ? 0 : -errno;
}

int stasis_cancel_signal(void) { return cancelSignal; }

static volatile pid_t forwardTarget;

static void forwardSignal(int signo) {
    if (forwardTarget > 0) kill(forwardTarget, signo);
}

int stasis_forward_signals_to(pid_t pid) {
    forwardTarget = pid;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = forwardSignal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    int signals[] = {SIGINT, SIGTERM, SIGHUP};
    for (unsigned i = 0; i < sizeof signals / sizeof signals[0]; i++) {
        if (sigaction(signals[i], &action, NULL) != 0) return -errno;
    }
    return 0;
}

long stasis_spawn_plain(const char *path, char *const argv[], char *const envp[]) {
    posix_spawnattr_t attributes;
    int error = posix_spawnattr_init(&attributes);
    if (error) return -error;
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attributes, &none);
    posix_spawnattr_setsigdefault(&attributes, &all);
    posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    pid_t child = 0;
    error = posix_spawn(&child, path, NULL, &attributes, argv, envp);
    posix_spawnattr_destroy(&attributes);
    return error ? -error : child;
}

// MARK: filesystem snapshots

long stasis_syncfs(int fd) { return negErrno(syncfs(fd)); }

long stasis_ficlone(int destinationFD, int sourceFD) { return negErrno(ioctl(destinationFD, FICLONE, sourceFD)); }

long stasis_copy_file_range(int from, int to, size_t length) {
    return negErrno(copy_file_range(from, NULL, to, NULL, length, 0));
}

long stasis_statfs_type(int fd, int64_t *type) {
    struct statfs info;
    long result = negErrno(fstatfs(fd, &info));
    if (result == 0) *type = (int64_t)info.f_type;
    return result;
}

long stasis_btrfs_snapshot(int sourceFD, int parentDirFD, const char *name, int readOnly) {
    struct btrfs_ioctl_vol_args_v2 args;
    memset(&args, 0, sizeof args);
    args.fd = sourceFD;
    args.flags = readOnly ? BTRFS_SUBVOL_RDONLY : 0;
    if (strlen(name) > BTRFS_SUBVOL_NAME_MAX) return -ENAMETOOLONG;
    strncpy(args.name, name, BTRFS_SUBVOL_NAME_MAX);
    return negErrno(ioctl(parentDirFD, BTRFS_IOC_SNAP_CREATE_V2, &args));
}

long stasis_btrfs_destroy_subvolume(int parentDirFD, const char *name) {
    struct btrfs_ioctl_vol_args args;
    memset(&args, 0, sizeof args);
    if (strlen(name) > BTRFS_PATH_NAME_MAX) return -ENAMETOOLONG;
    strncpy(args.name, name, BTRFS_PATH_NAME_MAX);
    return negErrno(ioctl(parentDirFD, BTRFS_IOC_SNAP_DESTROY, &args));
}
