import CStasis
import Glibc

// The floor of a copy-on-write freeze: what the kernel alone needs to make N MiB of touched
// anonymous memory copy-on-write, measured in a throwaway process (a helper: stasis-bench itself
// in a hidden mode) that holds that much memory, on 4 KiB pages or on transparent huge pages.
// Two ways, each timed on its own:
//   * fork: a raw clone(SIGCHLD) whose child _exits at once; the parent's clock stops when the
//     call returns in the parent (the kernel has copied every page-table entry and
//     write-protected the parent's); the child's exit and reaping are timed separately;
//   * userfaultfd write-protection: userfaultfd(), UFFDIO_API with
//     UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFDIO_REGISTER in write-protect mode over the range,
//     UFFDIO_WRITEPROTECT of the range (the kernel write-protects every entry); then, not in
//     the floor, un-protect, unregister and close.
// The helper keeps its memory between measurements, so the bench interleaves them with the
// snapshots it compares them with.

/// One measurement in the helper, ns.
struct CowFloorSample {
    /// clone(SIGCHLD) until it returned in the parent.
    var forkNs: UInt64 = 0
    /// From the child's creation until it exited and was reaped (its page tables torn down).
    var forkExitNs: UInt64 = 0
    /// userfaultfd() + UFFDIO_API + UFFDIO_REGISTER(WP) + UFFDIO_WRITEPROTECT.
    var uffdNs: UInt64 = 0
    /// UFFDIO_REGISTER alone.
    var uffdRegisterNs: UInt64 = 0
    /// UFFDIO_WRITEPROTECT alone.
    var uffdProtectNs: UInt64 = 0
    /// Un-protect + UFFDIO_UNREGISTER + close (not part of the floor).
    var uffdUndoNs: UInt64 = 0
}

/// What the helper reported once its memory was in place.
struct CowFloorInfo {
    var bytes: UInt64
    /// AnonHugePages of /proc/self/smaps_rollup.
    var anonHugeBytes: UInt64
    /// VmPTE of /proc/self/status: the page tables a fork copies.
    var pageTableBytes: UInt64
    var fillNs: UInt64
}

// linux/userfaultfd.h (x86-64); Swift does not import the _IOWR macros.
private let sysUserfaultfd = 323
private let sysClone = 56
private let uffdAPI: UInt64 = 0xAA
private let uffdFeaturePagefaultFlagWP: UInt64 = 1 << 0
private let uffdioAPI: UInt = 0xC018_AA3F  // _IOWR(0xAA, 0x3F, struct uffdio_api), 24 bytes
private let uffdioRegister: UInt = 0xC020_AA00  // _IOWR(0xAA, 0x00, struct uffdio_register), 32 bytes
private let uffdioUnregister: UInt = 0x8010_AA01  // _IOR(0xAA, 0x01, struct uffdio_range), 16 bytes
private let uffdioWriteprotect: UInt = 0xC018_AA06  // _IOWR(0xAA, 0x06, struct uffdio_writeprotect), 24 bytes
private let uffdioRegisterModeWP: UInt64 = 1 << 1
private let uffdioWriteprotectModeWP: UInt64 = 1 << 0

/// The hidden helper mode (`stasis-bench live --cow-floor-helper MIB [--helper-huge]`): maps and
/// populates the memory, reports it on stdout, then runs one measurement per command byte read
/// from stdin ('f' fork, 'u' userfaultfd) and prints its result line; exits at end of input.
func runCowFloorHelper(mebibytes: Int, huge: Bool) -> Never {
    func say(_ text: String) {
        let bytes = Array((text + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(1, $0.baseAddress!, $0.count) }
    }
    func fail(_ text: String) -> Never {
        say("error \(text): \(errnoText())")
        exit(1)
    }
    let length = mebibytes << 20
    let hugeSize = 2 << 20
    let start = now()
    guard let raw = mmap(nil, length + (huge ? hugeSize : 0), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
          raw != MAP_FAILED
    else { fail("mmap") }
    var base = UInt(bitPattern: raw)
    if huge {
        // Trim to a 2 MiB aligned range, as wl-bench --huge does.
        let aligned = (base + UInt(hugeSize) - 1) & ~UInt(hugeSize - 1)
        if aligned > base { munmap(UnsafeMutableRawPointer(bitPattern: base), Int(aligned - base)) }
        let tail = aligned + UInt(length)
        let rawEnd = base + UInt(length + hugeSize)
        if rawEnd > tail { munmap(UnsafeMutableRawPointer(bitPattern: tail), Int(rawEnd - tail)) }
        base = aligned
    }
    let memory = UnsafeMutableRawPointer(bitPattern: base)!
    guard madvise(memory, length, huge ? 14 /* MADV_HUGEPAGE */ : 15 /* MADV_NOHUGEPAGE */) == 0 else { fail("madvise") }
    guard madvise(memory, length, 23 /* MADV_POPULATE_WRITE */) == 0 else { fail("MADV_POPULATE_WRITE") }
    // Non-zero data in every page, like wl-bench's.
    for page in stride(from: 0, to: length, by: 4096) { memory.storeBytes(of: UInt64(page) | 1, toByteOffset: page, as: UInt64.self) }
    let fillNs = now() - start
    var anonHuge: UInt64 = 0
    for line in readTextFile("/proc/self/smaps_rollup").split(separator: "\n") where line.hasPrefix("AnonHugePages:") {
        anonHuge = (UInt64(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) * 1024
    }
    say("ready \(length) \(anonHuge) \(statusField("self", "VmPTE")) \(fillNs)")

    let address = UInt64(base), bytes = UInt64(length)
    var command: UInt8 = 0
    while true {
        let got = read(0, &command, 1)
        if got < 0 && errno == EINTR { continue }
        if got <= 0 { exit(0) }
        switch command {
        case UInt8(ascii: "f"):
            let t0 = now()
            let child = stasis_syscall6(sysClone, Int(SIGCHLD), 0, 0, 0, 0, 0)
            if child == 0 { _exit(0) }  // the child: nothing but the exit system call
            let t1 = now()
            guard child > 0 else { errno = Int32(-child); fail("clone") }
            var status: Int32 = 0
            while waitpid(pid_t(child), &status, 0) < 0 && errno == EINTR {}
            let t2 = now()
            say("fork \(t1 - t0) \(t2 - t0)")
        case UInt8(ascii: "u"):
            let t0 = now()
            let fd = Int32(stasis_syscall6(sysUserfaultfd, Int(O_CLOEXEC | O_NONBLOCK), 0, 0, 0, 0, 0))
            guard fd >= 0 else { errno = -fd; fail("userfaultfd") }
            var api: [UInt64] = [uffdAPI, uffdFeaturePagefaultFlagWP, 0]
            var result = stasis_ioctl(fd, uffdioAPI, &api)
            guard result == 0 else { errno = Int32(-result); fail("UFFDIO_API") }
            let t1 = now()
            var register: [UInt64] = [address, bytes, uffdioRegisterModeWP, 0]
            result = stasis_ioctl(fd, uffdioRegister, &register)
            guard result == 0 else { errno = Int32(-result); fail("UFFDIO_REGISTER") }
            let t2 = now()
            var protect: [UInt64] = [address, bytes, uffdioWriteprotectModeWP]
            result = stasis_ioctl(fd, uffdioWriteprotect, &protect)
            guard result == 0 else { errno = Int32(-result); fail("UFFDIO_WRITEPROTECT") }
            let t3 = now()
            var unprotect: [UInt64] = [address, bytes, 0]
            result = stasis_ioctl(fd, uffdioWriteprotect, &unprotect)
            guard result == 0 else { errno = Int32(-result); fail("UFFDIO_WRITEPROTECT (un-protect)") }
            var range: [UInt64] = [address, bytes]
            result = stasis_ioctl(fd, uffdioUnregister, &range)
            guard result == 0 else { errno = Int32(-result); fail("UFFDIO_UNREGISTER") }
            close(fd)
            let t4 = now()
            say("uffd \(t3 - t0) \(t2 - t1) \(t3 - t2) \(t4 - t3)")
        default:
            exit(0)
        }
    }
}

/// The bench's side of one helper process.
final class CowFloorHelper {
    let pid: pid_t
    let huge: Bool
    let mebibytes: Int
    private(set) var info = CowFloorInfo(bytes: 0, anonHugeBytes: 0, pageTableBytes: 0, fillNs: 0)
    private var commands: Int32
    private var replies: Int32
    private let children: Children
    private var pending: [UInt8] = []

    /// Starts the helper and waits until its memory is populated.
    init(children: Children, selfPath: String, mebibytes: Int, huge: Bool) throws {
        self.children = children
        self.huge = huge
        self.mebibytes = mebibytes
        var toHelper: [Int32] = [0, 0], fromHelper: [Int32] = [0, 0]
        guard pipe(&toHelper) == 0 else { throw BenchError("pipe: \(errnoText())") }
        guard pipe(&fromHelper) == 0 else {
            close(toHelper[0]); close(toHelper[1])
            throw BenchError("pipe: \(errnoText())")
        }
        for fd in toHelper + fromHelper { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let null = open("/dev/null", O_WRONLY | O_CLOEXEC)
        do {
            pid = try children.spawn([selfPath, "live", "--cow-floor-helper", String(mebibytes)] + (huge ? ["--helper-huge"] : []),
                                     stdin: toHelper[0], stdout: fromHelper[1], stderr: null)
        } catch {
            for fd in toHelper + fromHelper + [null] { close(fd) }
            throw error
        }
        close(toHelper[0]); close(fromHelper[1]); close(null)
        commands = toHelper[1]
        replies = fromHelper[0]
        do {
            let fields = try reply(timeoutSeconds: 60 + 20 * Double(mebibytes) / 1024, expecting: "ready")
            guard fields.count == 4 else { throw BenchError("the floor helper said \(fields)") }
            info = CowFloorInfo(bytes: fields[0], anonHugeBytes: fields[1], pageTableBytes: fields[2], fillNs: fields[3])
        } catch {
            stop()
            throw error
        }
    }

    /// One fork measurement and one userfaultfd measurement, in the order given.
    func measure(forkFirst: Bool) throws -> CowFloorSample {
        var sample = CowFloorSample()
        for step in forkFirst ? ["f", "u"] : ["u", "f"] {
            try send(step)
            if step == "f" {
                let fields = try reply(timeoutSeconds: 60, expecting: "fork")
                guard fields.count == 2 else { throw BenchError("the floor helper said \(fields)") }
                sample.forkNs = fields[0]
                sample.forkExitNs = fields[1]
            } else {
                let fields = try reply(timeoutSeconds: 60, expecting: "uffd")
                guard fields.count == 4 else { throw BenchError("the floor helper said \(fields)") }
                sample.uffdNs = fields[0]
                sample.uffdRegisterNs = fields[1]
                sample.uffdProtectNs = fields[2]
                sample.uffdUndoNs = fields[3]
            }
        }
        return sample
    }

    private func send(_ command: String) throws {
        let bytes = Array(command.utf8)
        let wrote = bytes.withUnsafeBytes { write(commands, $0.baseAddress!, $0.count) }
        guard wrote == bytes.count else { throw BenchError("cannot write to the floor helper (pid \(pid)): \(errnoText())") }
    }

    /// Reads one line; it must start with `word`; returns its numbers.
    private func reply(timeoutSeconds: Double, expecting word: String) throws -> [UInt64] {
        let deadline = now() + UInt64(timeoutSeconds * 1e9)
        while !pending.contains(UInt8(ascii: "\n")) {
            try Emergency.check()
            var poller = pollfd(fd: replies, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, 100)
            if ready < 0 && errno == EINTR { continue }
            if ready > 0 {
                var chunk = [UInt8](repeating: 0, count: 256)
                let got = chunk.withUnsafeMutableBytes { read(replies, $0.baseAddress!, $0.count) }
                if got > 0 { pending += chunk[0..<got]; continue }
                if got < 0 && errno == EINTR { continue }
                throw BenchError("the floor helper (pid \(pid)) closed its output")
            }
            if children.hasExited(pid) { throw BenchError("the floor helper (pid \(pid)) exited") }
            if now() > deadline { throw BenchError("the floor helper (pid \(pid)) did not answer within \(Int(timeoutSeconds)) s") }
        }
        let end = pending.firstIndex(of: UInt8(ascii: "\n"))!
        let text = String(decoding: pending[..<end], as: UTF8.self)
        pending.removeSubrange(...end)
        let fields = text.split(separator: " ")
        guard fields.first.map(String.init) == word else { throw BenchError("the floor helper (pid \(pid)) said \(text.debugDescription)") }
        return fields.dropFirst().compactMap { UInt64($0) }
    }

    private var stopped = false

    /// Ends the helper (closing its input makes it exit) and reaps it. Idempotent: once the
    /// helper is reaped its PID may belong to someone else.
    func stop() {
        guard !stopped else { return }
        stopped = true
        if commands >= 0 { close(commands); commands = -1 }
        if replies >= 0 { close(replies); replies = -1 }
        try? children.killAndReap(pid, what: "the floor helper")
    }

    deinit { stop() }
}
