// CStasis: the thin C layer under the Stasis engine.
//
// It holds only what Swift cannot call or declare directly: variadic calls (ptrace, prctl,
// syscall, ioctl), GNU extensions and raw syscalls glibc does not wrap, function-like macros
// (wait status decoding), kernel structures newer than Debian 12's 6.1 headers, and a few
// hot loops (checksum, zero-page test). Every function returns the kernel's result or
// -errno; it never touches the thread's `errno`.
#ifndef CSTASIS_H
#define CSTASIS_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/user.h>
#include <sys/uio.h>
#include <signal.h>

// MARK: ptrace

/// ptrace(2) with the -errno convention. For PEEK requests, use `stasis_ptrace_peek`.
long stasis_ptrace(int request, pid_t pid, uint64_t addr, uint64_t data);

/// PTRACE_GETREGSET/SETREGSET for one register set; `*size` is updated with the kernel's size.
long stasis_ptrace_getregset(pid_t tid, int type, void *buffer, size_t *size);
long stasis_ptrace_setregset(pid_t tid, int type, const void *buffer, size_t size);

enum {
    STASIS_PTRACE_SEIZE = 0x4206,
    STASIS_PTRACE_INTERRUPT = 0x4207,
    STASIS_PTRACE_LISTEN = 0x4208,
    STASIS_PTRACE_PEEKSIGINFO = 0x4209,
    STASIS_PTRACE_GETSIGMASK = 0x420a,
    STASIS_PTRACE_SETSIGMASK = 0x420b,
    STASIS_PTRACE_GET_RSEQ_CONFIGURATION = 0x420f,
    STASIS_PTRACE_GETREGS = 12,
    STASIS_PTRACE_SETREGS = 13,
    STASIS_PTRACE_CONT = 7,
    STASIS_PTRACE_SYSCALL = 24,
    STASIS_PTRACE_DETACH = 17,
    STASIS_PTRACE_GETEVENTMSG = 0x4201,
    STASIS_PTRACE_SETOPTIONS = 0x4200,
    STASIS_PTRACE_O_TRACESYSGOOD = 1,
    STASIS_PTRACE_O_TRACECLONE = 8,
    STASIS_PTRACE_O_EXITKILL = 0x100000,
    STASIS_PTRACE_EVENT_FORK = 1,
    STASIS_PTRACE_EVENT_CLONE = 3,
    STASIS_PTRACE_O_TRACEFORK = 2,
    STASIS_PTRACE_EVENT_STOP = 128,
    STASIS_PTRACE_PEEKSIGINFO_SHARED = 1,
    STASIS_NT_X86_XSTATE = 0x202,
};

/// struct ptrace_peeksiginfo_args
struct stasis_peeksiginfo_args {
    uint64_t off;
    uint32_t flags;
    int32_t nr;
};

/// struct ptrace_rseq_configuration (Linux 5.13+)
struct stasis_rseq_configuration {
    uint64_t rseq_abi_pointer;
    uint32_t rseq_abi_size;
    uint32_t signature;
    uint32_t flags;
    uint32_t pad;
};

// MARK: waitpid status decoding (function-like macros do not import)

int stasis_wifexited(int status);
int stasis_wexitstatus(int status);
int stasis_wifsignaled(int status);
int stasis_wtermsig(int status);
int stasis_wifstopped(int status);
int stasis_wstopsig(int status);
/// The PTRACE_EVENT_* in a ptrace stop status (status >> 16), 0 if none.
int stasis_wptrace_event(int status);
/// waitpid with -errno; `options` may include __WALL (0x40000000).
long stasis_waitpid(pid_t pid, int *status, int options);
enum { STASIS_WALL = 0x40000000, STASIS_WNOHANG = 1 };

// MARK: raw syscalls and GNU extensions

long stasis_syscall6(long number, long a1, long a2, long a3, long a4, long a5, long a6);
long stasis_gettid(void);
long stasis_tgkill(pid_t tgid, pid_t tid, int sig);
long stasis_pidfd_open(pid_t pid, unsigned int flags);
long stasis_get_robust_list(pid_t tid, uint64_t *head, uint64_t *length);
long stasis_prctl(int option, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5);
long stasis_ioctl(int fd, unsigned long request, void *argument);
long stasis_prlimit(pid_t pid, int resource, const void *newLimit, void *oldLimit);

/// process_vm_readv/writev with caller-provided iovec arrays (bytes transferred, or -errno).
long stasis_process_vm_readv(pid_t pid, const struct iovec *local, unsigned long localCount,
                             const struct iovec *remote, unsigned long remoteCount);
long stasis_process_vm_writev(pid_t pid, const struct iovec *local, unsigned long localCount,
                              const struct iovec *remote, unsigned long remoteCount);

/// pread/pwrite on /proc/PID/mem and plain fds, -errno convention.
long stasis_pread(int fd, void *buffer, size_t count, uint64_t offset);
long stasis_pwrite(int fd, const void *buffer, size_t count, uint64_t offset);

// MARK: PAGEMAP_SCAN (Linux 6.7+, not in Debian 12's headers)

#define STASIS_PAGEMAP_SCAN 0xC0606610UL
enum {
    STASIS_PAGE_IS_WPALLOWED = 1 << 0,
    STASIS_PAGE_IS_WRITTEN = 1 << 1,
    STASIS_PAGE_IS_FILE = 1 << 2,
    STASIS_PAGE_IS_PRESENT = 1 << 3,
    STASIS_PAGE_IS_SWAPPED = 1 << 4,
    STASIS_PAGE_IS_PFNZERO = 1 << 5,
    STASIS_PAGE_IS_HUGE = 1 << 6,
    STASIS_PAGE_IS_SOFT_DIRTY = 1 << 7,
    STASIS_PM_SCAN_WP_MATCHING = 1 << 0,
    STASIS_PM_SCAN_CHECK_WPASYNC = 1 << 1,
};

/// struct page_region
struct stasis_page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

/// One PAGEMAP_SCAN call on an open /proc/PID/pagemap. Fills `regions` with up to `capacity`
/// runs of pages in [start, end) whose categories match; returns the number of regions or
/// -errno, and stores where the walk stopped in `*walkEnd` (less than `end` when `regions` filled up).
long stasis_pagemap_scan(int pagemapFD, uint64_t start, uint64_t end,
                         uint64_t categoryInverted, uint64_t categoryMask,
                         uint64_t categoryAnyOf, uint64_t returnMask,
                         struct stasis_page_region *regions, uint64_t capacity,
                         uint64_t *walkEnd);

// MARK: restore stub

/// Creates, with clone3(set_tid), a child process with PID `pid` (in the caller's PID
/// namespace) that immediately blocks every signal, resets every disposition to SIG_DFL, asks to be SIGKILLed when the calling
/// thread dies, closes every file descriptor but `keepFD` (-1: none), and then waits in pause() for a tracer to seize
/// it and rebuild it. Only raw syscalls run in the child. If `cgroupFD` >= 0 the child starts in
/// that cgroup (CLONE_INTO_CGROUP). With `newNamespaces`, the child is instead PID 1 of new PID
/// and mount namespaces (`pid` is not used), with its mounts private and a /proc of its own.
/// Returns the child's PID (in the caller's namespace) or -errno.
long stasis_spawn_restore_stub(pid_t pid, int cgroupFD, int keepFD, int newNamespaces);

/// Creates new PID and mount namespaces whose init (a child of the caller, in `cgroupFD` if >= 0,
/// with a private /proc) creates a restore stub (as above, keeping `keepFD`) with PID `rootPID`
/// inside the namespace, then reaps every process of the namespace and exits as the stub's process
/// does (its exit code, or 128 + its signal). Returns the init's PID in the caller's namespace or
/// -errno; the stub is the init's only child.
long stasis_spawn_namespace_init(pid_t rootPID, int cgroupFD, int keepFD);

// MARK: process trees

/// kcmp(KCMP_FILE): 0 when fd1 of pid1 and fd2 of pid2 are the same open file description.
long stasis_kcmp_files(pid_t pid1, pid_t pid2, int fd1, int fd2);
/// tee(2): copies up to `length` bytes buffered in pipe `from` into pipe `to` without consuming them.
long stasis_tee(int from, int to, size_t length, unsigned int flags);
long stasis_memfd_create(const char *name, unsigned int flags);
long stasis_fcntl(int fd, int command, long argument);
long stasis_pipe2(int fds[2], int flags);
/// mmap(MAP_SHARED | MAP_ANONYMOUS) of `size` bytes in this process; the address in `*address`.
long stasis_mmap_shared_anonymous(uint64_t size, uint64_t *address);
long stasis_munmap(uint64_t address, uint64_t size);

// MARK: filesystem snapshots

long stasis_syncfs(int fd);
/// ioctl(FICLONE): makes `destinationFD`'s file share `sourceFD`'s extents (a reflink copy).
long stasis_ficlone(int destinationFD, int sourceFD);
/// copy_file_range from the current offsets; returns bytes copied (0 at the end) or -errno.
long stasis_copy_file_range(int from, int to, size_t length);
/// fstatfs: the filesystem's magic number (f_type).
long stasis_statfs_type(int fd, int64_t *type);
/// BTRFS_IOC_SNAP_CREATE_V2: a snapshot of the subvolume open at `sourceFD`, named `name` in
/// the directory open at `parentDirFD` (read-only if `readOnly`).
long stasis_btrfs_snapshot(int sourceFD, int parentDirFD, const char *name, int readOnly);
/// BTRFS_IOC_SNAP_DESTROY: deletes the subvolume `name` in the directory open at `parentDirFD`.
long stasis_btrfs_destroy_subvolume(int parentDirFD, const char *name);

// MARK: cancellation

/// Installs a handler for `signo` (without SA_RESTART, so blocking calls return EINTR) that
/// records the signal for `stasis_cancel_signal`. Returns 0 or -errno.
int stasis_install_cancel_handler(int signo);

/// The first signal recorded by the cancel handler, or 0.
int stasis_cancel_signal(void);

/// The handler also sends the signal to this thread (when it runs on another), so that a
/// blocking call there returns EINTR. 0 for none.
void stasis_set_cancel_interrupt_thread(pid_t tid);

/// Installs handlers for SIGINT, SIGTERM and SIGHUP that send the same signal to `pid`.
int stasis_forward_signals_to(pid_t pid);

/// posix_spawn of `path` with the caller's fds 0-2 (and any fd without FD_CLOEXEC), an empty
/// signal mask and default dispositions. Returns the child's PID or -errno.
long stasis_spawn_plain(const char *path, char *const argv[], char *const envp[]);

// MARK: data integrity

/// CRC-32C (Castagnoli), continuing from `crc` (start with 0). Uses SSE4.2 when available.
uint32_t stasis_crc32c(uint32_t crc, const void *data, size_t length);

/// 1 when the 4096-byte page at `page` holds only zero bytes.
int stasis_page_is_zero(const void *page);

#endif

#ifndef CSTASIS_SPAWN_H
#define CSTASIS_SPAWN_H
// MARK: detached spawn (stasis run)

/// Starts `path` with `argv`/`envp` as a new session leader (setsid), with stdin/stdout/stderr
/// dup'ed from the three given fds, an empty signal mask and default dispositions, in the
/// cgroup `cgroupFD` (if >= 0) from its first instruction (clone3 CLONE_INTO_CGROUP), and
/// with no other fds. With `newNamespaces` it is PID 1 of new PID and mount namespaces, with
/// its mounts private and a /proc of its own. Returns the child's PID (in the caller's
/// namespace) once execve succeeded, or -errno of the first
/// step that failed (clone3 in the parent, or mount/dup/setsid/execve in the child, reported back
/// through a close-on-exec pipe). The child is not waited for.
long stasis_spawn_detached(const char *path, char *const argv[], char *const envp[],
                           int stdinFD, int stdoutFD, int stderrFD, int cgroupFD, int newNamespaces);
#endif
