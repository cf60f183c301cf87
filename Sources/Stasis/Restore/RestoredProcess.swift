import CStasis
import Glibc

/// A process being rebuilt: the stub Stasis created with the image's PID, seized by the
/// tracer thread, into which the image's state is injected.
///
/// Guarantees: until `detachAll()` succeeds, `abandon()` kills the stub and every thread made
/// in it and reaps it, leaving nothing behind; the stub dies by itself (PR_SET_PDEATHSIG and
/// PTRACE_O_EXITKILL) if Stasis dies first.
final class RestoredProcess {
    let pid: pid_t
    let tracer: Tracer
    /// Threads attached so far, main thread first.
    private(set) var threads: [pid_t]
    private var finished = false

    private init(pid: pid_t, tracer: Tracer) {
        self.pid = pid
        self.tracer = tracer
        self.threads = [pid]
    }

    /// Creates the stub with `pid` (in the caller's PID namespace), in `cgroupFD` when given,
    /// and stops it under ptrace.
    static func spawn(pid: pid_t, cgroupFD: Int32, tracer: Tracer) throws -> RestoredProcess {
        let child = stasis_spawn_restore_stub(pid, cgroupFD)
        if child == -Int(EEXIST) {
            throw StasisError.pidTaken(pid: pid, by: describeProcess(pid))
        }
        _ = try checked(child, "clone3(set_tid=\(pid))", "pid \(pid)")
        let process = RestoredProcess(pid: pid, tracer: tracer)
        do {
            try waitUntilPaused(pid)
            try tracer.seize(pid, options: Int32(STASIS_PTRACE_O_TRACESYSGOOD | STASIS_PTRACE_O_TRACECLONE | STASIS_PTRACE_O_EXITKILL))
            try tracer.interrupt(pid)
            while true {
                let event = try tracer.waitForEvent(pid)
                guard case let .stopped(signal, eventCode) = event else {
                    throw StasisError.restoreFailed(pid: pid, step: "starting the restore stub", reason: "it ended: \(event)")
                }
                if eventCode == Int32(STASIS_PTRACE_EVENT_STOP) { break }
                _ = signal
                try tracer.resume(pid)
            }
        } catch {
            process.abandon()
            throw error
        }
        return process
    }

    /// Waits until the stub has finished its own set-up (signals, fds, parent-death signal)
    /// and sits in pause(2): /proc/PID/syscall then starts with pause's number, 34.
    private static func waitUntilPaused(_ pid: pid_t) throws {
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while true {
            if let text = try? readTextFile("/proc/\(pid)/syscall"), text.hasPrefix("34 ") { return }
            if monotonicNanoseconds() > deadline {
                throw StasisError.restoreFailed(pid: pid, step: "starting the restore stub", reason: "it did not reach pause() within 5 s")
            }
            sched_yield()
        }
    }

    /// Records a thread created inside the process (already attached through TRACECLONE) and
    /// waits for its first stop.
    func adopt(thread tid: pid_t) throws {
        threads.append(tid)
        while true {
            let event = try tracer.waitForEvent(tid)
            guard case let .stopped(_, eventCode) = event else {
                throw StasisError.restoreFailed(pid: pid, step: "creating thread \(tid)", reason: "it ended: \(event)")
            }
            if eventCode == Int32(STASIS_PTRACE_EVENT_STOP) { return }
            try tracer.resume(tid)
        }
    }

    /// Lets every thread run: the restore is complete.
    func detachAll() throws {
        for tid in threads { try tracer.detach(tid) }
        finished = true
    }

    /// Kills and reaps the half-built process.
    func abandon() {
        guard !finished else { return }
        finished = true
        _ = kill(pid, SIGKILL)
        var status: Int32 = 0
        // The stub is our child: reap it (this also reaps the traced threads' notifications).
        for tid in threads.reversed() where tid != pid { _ = stasis_waitpid(tid, &status, Int32(STASIS_WALL)) }
        while true {
            let result = stasis_waitpid(pid, &status, Int32(STASIS_WALL))
            if result < 0 && result != -Int(EINTR) { break }
            if result == pid && (stasis_wifexited(status) != 0 || stasis_wifsignaled(status) != 0) { break }
        }
    }
}

/// "process 123 (name)" for messages about a PID that is in use.
func describeProcess(_ pid: pid_t) -> String {
    let name = (try? readTextFile("/proc/\(pid)/comm"))?.trimmingCharacters() ?? "?"
    if let tgid = try? ProcFS.status("/proc/\(pid)/status")["Tgid"], tgid != "\(pid)" {
        return "thread \(pid) of process \(tgid) (\(name))"
    }
    return "process \(pid) (\(name))"
}
