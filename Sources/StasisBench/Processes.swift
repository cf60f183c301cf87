import CStasis
import Glibc

// Child processes of the benchmark: spawning `stasis` and friends, reaping them (the bench is a
// child subreaper, so detached workloads and restored processes become its children once the
// `stasis` command that made them exits), and killing everything that is left on failure or
// on Ctrl-C.

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Nanoseconds on CLOCK_MONOTONIC.
func now() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func ms(_ nanoseconds: UInt64) -> Double { Double(nanoseconds) / 1e6 }

func errnoText(_ code: Int32 = errno) -> String { String(cString: strerror(code)) }

// MARK: - Emergency registry (read by the signal handler)

/// PIDs to SIGKILL if the bench is interrupted. Touched by the main thread only, read by the
/// signal handler (kill(2) is async-signal-safe).
nonisolated(unsafe) let emergencyPIDs = UnsafeMutablePointer<pid_t>.allocate(capacity: 64)
nonisolated(unsafe) var interrupted: sig_atomic_t = 0

enum Emergency {
    static func setUp() {
        emergencyPIDs.initialize(repeating: 0, count: 64)
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in
            interrupted = 1
            for index in 0..<64 where emergencyPIDs[index] > 0 { kill(emergencyPIDs[index], SIGKILL) }
        }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0  // no SA_RESTART: blocking calls return EINTR
        for sig in [SIGINT, SIGTERM, SIGHUP] { sigaction(sig, &action, nil) }
        signal(SIGPIPE, SIG_IGN)
    }

    static func add(_ pid: pid_t) {
        for index in 0..<64 where emergencyPIDs[index] == 0 {
            emergencyPIDs[index] = pid
            return
        }
    }

    static func remove(_ pid: pid_t) {
        for index in 0..<64 where emergencyPIDs[index] == pid { emergencyPIDs[index] = 0 }
    }

    static func check() throws {
        if interrupted != 0 { throw BenchError("interrupted") }
    }
}

// MARK: - Children

struct ChildExit {
    var status: Int32
    var usage: rusage
    /// Wall time from spawn to reaping, ns (0 for processes the bench did not spawn).
    var wallNs: UInt64
    /// The bench's own resident set when it spawned the child. posix_spawn uses vfork: at
    /// execve the kernel records the *parent's* RSS high-water mark in the child's ru_maxrss, so
    /// ru_maxrss = max(the child's own peak, this). The bench resets its high-water mark right
    /// before spawning so that this is its current RSS, not its peak.
    var benchRSSAtSpawn: UInt64 = 0
    /// The largest VmHWM of the child seen while polling it (a lower bound of its own peak).
    var polledHWM: UInt64 = 0

    var exitedNormally: Bool { status & 0x7f == 0 }
    var exitCode: Int32 { (status >> 8) & 0xff }
    var signal: Int32 { status & 0x7f }
    /// Peak resident set size in bytes (ru_maxrss is in KiB on Linux).
    var peakRSSBytes: UInt64 { UInt64(max(usage.ru_maxrss, 0)) * 1024 }
    var summary: String { exitedNormally ? "exit status \(exitCode)" : "signal \(signal)" }
}

/// Reaps every child of the bench, keeping exits it was not asked about until they are.
final class Children {
    private var exited: [pid_t: ChildExit] = [:]
    private var started: [pid_t: (at: UInt64, benchRSS: UInt64)] = [:]

    init() {
        // Orphaned descendants (the workload after `stasis run` exits, the restored process after
        // `stasis restore --detach` exits) are re-parented to us, not to PID 1, which reaps late.
        _ = stasis_prctl(36 /* PR_SET_CHILD_SUBREAPER */, 1, 0, 0, 0)
    }

    /// Spawns `argv` with an empty signal mask and default dispositions (posix_spawn passes on
    /// the caller's mask otherwise), stdin from /dev/null unless given, stdout/stderr as given.
    func spawn(_ argv: [String], stdin: Int32? = nil, stdout: Int32, stderr: Int32) throws -> pid_t {
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let stdin {
            posix_spawn_file_actions_adddup2(&actions, stdin, 0)
        } else {
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        }
        posix_spawn_file_actions_adddup2(&actions, stdout, 1)
        posix_spawn_file_actions_adddup2(&actions, stderr, 2)

        var pointers: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
        pointers.append(nil)
        defer { for pointer in pointers { free(pointer) } }
        var pid: pid_t = 0
        // Make the bench's RSS high-water mark its current RSS (see ChildExit.benchRSSAtSpawn).
        try? writeTextFile("/proc/self/clear_refs", "5")
        let benchRSS = statusField("self", "VmRSS")
        let result = pointers.withUnsafeBufferPointer { buffer in
            posix_spawn(&pid, argv[0], &actions, &attributes, buffer.baseAddress!, environ)
        }
        guard result == 0 else { throw BenchError("cannot start \(argv[0]): \(errnoText(result))") }
        // The PID may have been used before (PIDs wrap): an exit kept from then is not this child's.
        exited[pid] = nil
        started[pid] = (now(), benchRSS)
        Emergency.add(pid)
        return pid
    }

    /// Reaps whatever has exited, without blocking.
    func reapAvailable() {
        while true {
            var status: Int32 = 0
            var usage = rusage()
            let pid = wait4(-1, &status, 1 /* WNOHANG */ | 0x4000_0000 /* __WALL */, &usage)
            if pid <= 0 { return }
            let start = started.removeValue(forKey: pid)
            exited[pid] = ChildExit(status: status, usage: usage, wallNs: start.map { now() - $0.at } ?? 0,
                                    benchRSSAtSpawn: start?.benchRSS ?? 0, polledHWM: polled[pid] ?? 0)
            polled[pid] = nil
            Emergency.remove(pid)
        }
    }

    private var polled: [pid_t: UInt64] = [:]

    /// Drops the kept exits of processes nobody will wait for (orphans the bench reaped: the
    /// processes of a tree), so that a later process with the same PID is not taken for dead.
    func forget<S: Sequence>(_ pids: S) where S.Element == pid_t {
        for pid in pids { exited[pid] = nil }
    }

    /// Whether `pid` has exited and was reaped (its exit is kept for `wait`).
    func hasExited(_ pid: pid_t) -> Bool {
        reapAvailable()
        return exited[pid] != nil
    }

    /// Waits until `pid` (a child, or an orphan re-parented to the bench) exits; reaps any
    /// other child meanwhile.
    func wait(for pid: pid_t, timeoutSeconds: Double, what: String) throws -> ChildExit {
        let deadline = now() + UInt64(timeoutSeconds * 1e9)
        var pause: UInt32 = 50
        while true {
            if started[pid] != nil {
                let hwm = statusField(String(pid), "VmHWM")
                if hwm > polled[pid] ?? 0 { polled[pid] = hwm }
            }
            reapAvailable()
            if let exit = exited.removeValue(forKey: pid) { return exit }
            try Emergency.check()
            if now() > deadline { throw BenchError("\(what) (pid \(pid)) did not finish within \(timeoutSeconds < 10 ? fmt(timeoutSeconds, 1) : String(Int(timeoutSeconds))) s") }
            usleep(pause)
            pause = min(pause * 2, 1000)
        }
    }

    /// SIGKILLs `pid` and waits until it is reaped and its PID is free.
    func killAndReap(_ pid: pid_t, what: String) throws {
        kill(pid, SIGKILL)
        _ = try wait(for: pid, timeoutSeconds: 30, what: what)
        // A process the bench never parented (should not happen) would leave /proc/PID behind.
        let deadline = now() + 10_000_000_000
        while access("/proc/\(pid)", F_OK) == 0 {
            if now() > deadline { throw BenchError("\(what) (pid \(pid)) still exists after SIGKILL") }
            usleep(1000)
        }
    }

    /// Kills and reaps every process the bench spawned or inherited that is still alive.
    func killEverything(_ extra: [pid_t]) {
        for pid in extra where pid > 0 { kill(pid, SIGKILL) }
        for pid in started.keys { kill(pid, SIGKILL) }
        let deadline = now() + 10_000_000_000
        while now() < deadline {
            reapAvailable()
            let alive = extra.filter { $0 > 0 && access("/proc/\($0)", F_OK) == 0 } + Array(started.keys)
            if alive.isEmpty { return }
            usleep(2000)
        }
    }
}

// MARK: - Running tools

/// A finished run of a tool (`stasis …`) with its captured output.
struct ToolRun {
    var exit: ChildExit
    var stdout: String
    var stderr: String
}

/// A "kB" field of /proc/PID/status in bytes (0 if absent).
func statusField(_ pid: String, _ name: String) -> UInt64 {
    for line in readTextFile("/proc/\(pid)/status").split(separator: "\n") where line.hasPrefix(name + ":") {
        let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
        return fields.count > 1 ? (UInt64(fields[1]) ?? 0) * 1024 : 0
    }
    return 0
}

/// Opens a file for a child's output, close-on-exec in the bench.
func openOutput(_ path: String) throws -> Int32 {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw BenchError("cannot create \(path): \(errnoText())") }
    return fd
}

/// The names in a directory, "." and ".." left out (empty if it cannot be read).
func directoryNames(_ path: String) -> [String] {
    guard let directory = opendir(path) else { return [] }
    defer { closedir(directory) }
    var names: [String] = []
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names
}

/// The first executable called `name` on $PATH.
func findOnPath(_ name: String) -> String? {
    let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
    for directory in path.split(separator: ":") where access("\(directory)/\(name)", X_OK) == 0 {
        return "\(directory)/\(name)"
    }
    return nil
}

func readTextFile(_ path: String, limit: Int = 1 << 20) -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return "" }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while bytes.count < limit {
        let got = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
        if got < 0 && errno == EINTR { continue }
        if got <= 0 { break }
        bytes += chunk[0..<got]
    }
    return String(decoding: bytes, as: UTF8.self)
}

func writeTextFile(_ path: String, _ text: String) throws {
    let fd = try openOutput(path)
    defer { close(fd) }
    let bytes = Array(text.utf8)
    var done = 0
    while done < bytes.count {
        let wrote = bytes[done...].withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
        if wrote < 0 && errno == EINTR { continue }
        guard wrote > 0 else { throw BenchError("cannot write \(path): \(errnoText())") }
        done += wrote
    }
}

/// Runs a tool to completion. Its stdout goes to `stdoutFD` if given (then `stdout` is empty),
/// else to a file in `scratch` that is read back; its stderr is always captured.
func runTool(_ argv: [String], children: Children, scratch: String, stdoutFD: Int32? = nil,
             timeoutSeconds: Double, what: String) throws -> ToolRun {
    let outPath = scratch + "/tool.stdout"
    let errPath = scratch + "/tool.stderr"
    defer { unlink(outPath); unlink(errPath) }
    let out = stdoutFD == nil ? try openOutput(outPath) : -1
    let err = try openOutput(errPath)
    let pid: pid_t
    do {
        pid = try children.spawn(argv, stdout: stdoutFD ?? out, stderr: err)
    } catch {
        if out >= 0 { close(out) }
        close(err)
        throw error
    }
    if out >= 0 { close(out) }
    close(err)
    let exit: ChildExit
    do {
        exit = try children.wait(for: pid, timeoutSeconds: timeoutSeconds, what: what)
    } catch {
        // Over its time limit (or interrupted): it must not keep running behind the bench's back.
        try? children.killAndReap(pid, what: what)
        throw error
    }
    let run = ToolRun(exit: exit, stdout: stdoutFD == nil ? readTextFile(outPath) : "", stderr: readTextFile(errPath))
    guard exit.exitedNormally && exit.exitCode == 0 else { throw ToolFailure(what: what, argv: argv, run: run) }
    return run
}

/// The git commit of the checkout `directory` is in (`git rev-parse --short HEAD`), with
/// " + uncommitted changes" if tracked files differ from it; nil without git or a checkout.
func gitCommit(in directory: String, children: Children, scratch: String) -> String? {
    guard let git = findOnPath("git") else { return nil }
    guard let head = try? runTool([git, "-C", directory, "rev-parse", "--short", "HEAD"], children: children, scratch: scratch,
                                  timeoutSeconds: 30, what: "git rev-parse") else { return nil }
    let commit = head.stdout.trimmingTrailingNewlines()
    guard !commit.isEmpty else { return nil }
    let status = try? runTool([git, "-C", directory, "status", "--porcelain", "--untracked-files=no"], children: children,
                              scratch: scratch, timeoutSeconds: 30, what: "git status")
    return commit + (status.map { $0.stdout.trimmingTrailingNewlines().isEmpty } == false ? " + uncommitted changes" : "")
}

/// A tool that exited with a non-zero status or was killed by a signal (crashed).
struct ToolFailure: Error, CustomStringConvertible {
    var what: String
    var argv: [String]
    var run: ToolRun
    var crashed: Bool { !run.exit.exitedNormally }

    /// The first lines of stderr that say what went wrong (a crash report is long).
    var message: String {
        let lines = run.stderr.split(separator: "\n").map(String.init)
        if crashed, let fatal = lines.first(where: { !$0.hasPrefix(" ") && !$0.first!.isNumber && !$0.hasPrefix("*") }) {
            let location = lines.first(where: { $0.contains(" crashed:") }).flatMap { _ in
                lines.first(where: { $0.contains(" in stasis at ") || $0.contains(" in stasis ") })
            }
            return fatal + (location.map { " — " + $0.trimmingCharacters(in: " ") } ?? "")
        }
        return lines.prefix(5).joined(separator: " / ")
    }

    var description: String {
        "\(what) failed (\(run.exit.summary)): \(message)\n  command: \(argv.joined(separator: " "))"
    }
}

extension String {
    func trimmingTrailingNewlines() -> String {
        var text = Substring(self)
        while let last = text.last, last == "\n" || last == " " { text = text.dropLast() }
        return String(text)
    }
}

// MARK: - Pipes and the drainer

/// A pipe whose read end a thread drains into a discard buffer as fast as it can.
final class DrainedPipe: @unchecked Sendable {
    let readFD: Int32
    private(set) var writeFD: Int32
    private var thread = pthread_t()
    private(set) var drained: UInt64 = 0
    private var running = false

    /// `size` > 0 sets the pipe's capacity with F_SETPIPE_SZ (at most /proc/sys/fs/pipe-max-size).
    init(size: Int) throws {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw BenchError("pipe: \(errnoText())") }
        readFD = fds[0]
        writeFD = fds[1]
        _ = fcntl(readFD, F_SETFD, FD_CLOEXEC)
        _ = fcntl(writeFD, F_SETFD, FD_CLOEXEC)
        if size > 0 && fcntl(writeFD, 1031 /* F_SETPIPE_SZ */, Int32(size)) < 0 {
            let code = errno
            close(readFD); close(writeFD)
            throw BenchError("F_SETPIPE_SZ \(size): \(errnoText(code))")
        }
    }

    /// The pipe's capacity in bytes.
    var capacity: Int { Int(fcntl(writeFD, 1032 /* F_GETPIPE_SZ */)) }

    func startDraining() throws {
        let context = Unmanaged.passRetained(self).toOpaque()
        let result = pthread_create(&thread, nil, { argument in
            let pipe = Unmanaged<DrainedPipe>.fromOpaque(argument!).takeRetainedValue()
            // This thread never handles the bench's signals.
            var all = sigset_t()
            sigfillset(&all)
            pthread_sigmask(SIG_BLOCK, &all, nil)
            pipe.drain()
            return nil
        }, context)
        guard result == 0 else {
            Unmanaged<DrainedPipe>.fromOpaque(context).release()
            throw BenchError("pthread_create: \(errnoText(result))")
        }
        running = true
    }

    private func drain() {
        let size = 1 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        defer { buffer.deallocate() }
        memset(buffer, 0, size)
        var total: UInt64 = 0
        while true {
            let got = read(readFD, buffer, size)
            if got > 0 { total += UInt64(got); continue }
            if got < 0 && errno == EINTR { continue }
            break
        }
        drained = total
    }

    /// Closes the bench's write end (a child holding a copy keeps the pipe open until it exits).
    func closeWriteEnd() {
        if writeFD >= 0 { close(writeFD); writeFD = -1 }
    }

    /// Waits for end of file on the read end; returns the bytes drained.
    func finish() -> UInt64 {
        closeWriteEnd()
        if running { pthread_join(thread, nil); running = false }
        return drained
    }

    deinit {
        _ = finish()
        close(readFD)
    }
}
