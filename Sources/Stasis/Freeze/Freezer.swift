import CStasis
import Glibc

/// The threads of one process, each held in a ptrace-stop by the tracer thread.
///
/// Guarantees: after `freeze` returns, every thread of the process is stopped and attached
/// (threads created while freezing are caught through PTRACE_O_TRACECLONE and a re-listing of
/// /proc/PID/task until it stops changing), and every thread's signals are blocked, so that no
/// signal is delivered on registers Stasis is using. `release` puts back each thread's
/// registers and signal mask and detaches it; the process then runs on as if never stopped.
/// If freezing fails half-way, every thread attached so far is released before the error is
/// thrown. If Stasis dies, the kernel detaches every thread (no PTRACE_O_EXITKILL is used).
public final class FrozenProcess {
    public let pid: pid_t
    let tracer: Tracer
    /// The frozen threads, main thread first.
    public private(set) var threads: [pid_t] = []
    /// Each thread's blocked-signal mask before the freeze.
    private(set) var originalMasks: [pid_t: UInt64] = [:]
    /// Each thread's registers at the freeze.
    private(set) var frozenRegisters: [pid_t: GeneralRegisters] = [:]
    /// When the first thread was stopped (CLOCK_MONOTONIC ns).
    public private(set) var frozenAt: UInt64 = 0
    private var released = false
    private var onlyOneThread = false

    static let seizeOptions = Int32(STASIS_PTRACE_O_TRACESYSGOOD | STASIS_PTRACE_O_TRACECLONE)

    private init(pid: pid_t, tracer: Tracer) {
        self.pid = pid
        self.tracer = tracer
    }

    /// Checks that `pid` is a live user process Stasis may trace, then stops all its threads —
    /// or, with `onlyOneThread`, just one live thread (the main thread if it still runs), which
    /// is enough to issue system calls on the process's behalf.
    public static func freeze(pid: pid_t, tracer: Tracer, onlyOneThread: Bool = false) throws -> FrozenProcess {
        let frozen = try beginFreeze(pid: pid, tracer: tracer, onlyOneThread: onlyOneThread)
        try frozen.completeFreeze()
        return frozen
    }

    /// The first half of `freeze`: checks the process and asks every thread listed now to stop
    /// (seize and interrupt), without waiting. Freezing many processes, Stasis begins them all
    /// and then completes each, so that their stops overlap. On failure, what was attached is
    /// released before the error is thrown.
    static func beginFreeze(pid: pid_t, tracer: Tracer, onlyOneThread: Bool = false) throws -> FrozenProcess {
        try checkTraceable(pid)
        let frozen = FrozenProcess(pid: pid, tracer: tracer)
        frozen.onlyOneThread = onlyOneThread
        do {
            _ = try frozen.attachListedThreads()
        } catch {
            frozen.releaseAfterFailure()
            throw error
        }
        return frozen
    }

    /// The second half of `freeze`: waits until every thread is stopped (catching threads created
    /// meanwhile), then records masks and registers and blocks every signal.
    func completeFreeze() throws {
        do {
            try stopAllThreads()
            for tid in threads {
                originalMasks[tid] = try tracer.signalMask(tid)
                frozenRegisters[tid] = try tracer.registers(tid)
                try tracer.setSignalMask(tid, ~0)
            }
        } catch {
            releaseAfterFailure()
            throw error
        }
    }

    static func checkTraceable(_ pid: pid_t) throws {
        guard pid > 0, pathExists("/proc/\(pid)") else { throw StasisError.noSuchProcess(pid: pid) }
        if pid == getpid() { throw StasisError.notTraceable(pid: pid, reason: "it is this stasis process") }
        let status: [String: String]
        do { status = try ProcFS.status("/proc/\(pid)/status") } catch { throw StasisError.noSuchProcess(pid: pid) }
        if let tgid = status["Tgid"], tgid != "\(pid)" {
            throw StasisError.notTraceable(pid: pid, reason: "it is a thread of process \(tgid); snapshot the process")
        }
        if let state = status["State"], state.hasPrefix("Z") || state.hasPrefix("X") {
            throw StasisError.notTraceable(pid: pid, reason: "it has exited (state \(state))")
        }
        if let tracer = status["TracerPid"], tracer != "0" {
            throw StasisError.notTraceable(pid: pid, reason: "it is already traced by PID \(tracer)")
        }
        if status["VmSize"] == nil {
            throw StasisError.notTraceable(pid: pid, reason: "it is a kernel thread")
        }
    }

    /// Threads attached, stopped, and the order they were found in (while freezing).
    private var attached = Set<pid_t>()
    private var stopped = Set<pid_t>()
    private var order: [pid_t] = []

    /// Lists the threads and seizes and interrupts those not attached yet. Returns false when
    /// nothing new was listed and every attached thread has stopped (the freeze is complete).
    private func attachListedThreads() throws -> Bool {
        var listed: [pid_t]
        do { listed = try ProcFS.threadIDs(pid) } catch { throw StasisError.noSuchProcess(pid: pid) }
        if onlyOneThread {
            if !order.isEmpty { return false }
            let live = listed.filter { tid in
                !((try? ProcFS.status("/proc/\(pid)/task/\(tid)/status"))?["State"]?.hasPrefix("Z") ?? true)
            }
            guard let chosen = live.contains(pid) ? pid : live.first else { throw StasisError.noSuchProcess(pid: pid) }
            listed = [chosen]
        }
        let fresh = listed.filter { !attached.contains($0) }
        if fresh.isEmpty && stopped == attached { return false }
        for tid in fresh {
            do {
                try tracer.seize(tid, options: onlyOneThread ? Int32(STASIS_PTRACE_O_TRACESYSGOOD) : Self.seizeOptions)
            } catch let error as SystemCallError where error.errno == .noSuchProcess {
                continue  // the thread exited between listing and seizing
            } catch let error as SystemCallError where error.errno == .notPermitted {
                throw StasisError.notTraceable(pid: pid, reason: "ptrace(PTRACE_SEIZE) of tid \(tid) was refused (\(error.errno))")
            }
            if frozenAt == 0 { frozenAt = monotonicNanoseconds() }
            attached.insert(tid)
            order.append(tid)
            do {
                try tracer.interrupt(tid)
            } catch let error as SystemCallError where error.errno == .noSuchProcess {
                continue  // it exited after the seize; waitUntilStopped sees the exit
            }
        }
        return true
    }

    private func stopAllThreads() throws {
        while true {
            for tid in order where attached.contains(tid) && !stopped.contains(tid) {
                try waitUntilStopped(tid, attached: &attached, stopped: &stopped, order: &order)
            }
            if try !attachListedThreads() { break }
        }
        threads = order.filter { attached.contains($0) }
        if onlyOneThread {
            if threads.isEmpty { throw StasisError.noSuchProcess(pid: pid) }
            return
        }
        if let main = threads.firstIndex(of: pid) {
            threads.swapAt(0, main)
        } else {
            throw StasisError.notTraceable(pid: pid, reason: "its main thread exited while it was being frozen")
        }
    }

    /// Waits for `tid` to reach a ptrace-stop, passing on signals and catching new threads.
    private func waitUntilStopped(_ tid: pid_t, attached: inout Set<pid_t>, stopped: inout Set<pid_t>, order: inout [pid_t]) throws {
        while true {
            switch try tracer.waitForEvent(tid) {
            case .exited, .killed:
                attached.remove(tid)
                return
            case let .stopped(signal, event) where event == Int32(STASIS_PTRACE_EVENT_STOP):
                _ = signal
                stopped.insert(tid)
                return
            case let .stopped(_, event) where event == Int32(STASIS_PTRACE_EVENT_CLONE):
                // A new thread: it is attached already and will report its own stop.
                let child = pid_t(truncatingIfNeeded: try tracer.eventMessage(tid))
                if !attached.contains(child) {
                    attached.insert(child)
                    order.append(child)
                }
                try tracer.resume(tid)
            case let .stopped(signal, _):
                // A signal on its way to the thread: let it through; the pending interrupt
                // stops the thread right after.
                try tracer.resume(tid, signal: signal)
            }
        }
    }

    /// Registers each thread had when frozen.
    public func registersAtFreeze(_ tid: pid_t) -> GeneralRegisters { frozenRegisters[tid]! }

    /// The signal mask each thread had before the freeze.
    public func originalMask(_ tid: pid_t) -> UInt64 { originalMasks[tid]! }

    /// Lets every thread run on from where it was frozen.
    public func release() throws {
        guard !released else { return }
        released = true
        var firstError: Error?
        for tid in threads {
            do {
                if let regs = frozenRegisters[tid] {
                    try tracer.setRegisters(tid, regs.normalizedForResume(keepRestartBlock: true))
                }
                if let mask = originalMasks[tid] { try tracer.setSignalMask(tid, mask) }
                try tracer.detach(tid)
            } catch {
                if firstError == nil { firstError = error }
                try? tracer.detach(tid)
            }
        }
        if let firstError { throw firstError }
    }

    private func releaseAfterFailure() {
        threads = threads.isEmpty ? (try? ProcFS.threadIDs(pid)) ?? [] : threads
        try? release()
    }

    /// Leaves the process stopped (SIGSTOP) and detached.
    public func releaseStopped() throws {
        _ = Glibc.kill(pid, SIGSTOP)
        try release()
    }

    /// Kills the process and returns once its PID is free again (reaped by its parent).
    public func kill(timeoutSeconds: Double = 30) throws {
        guard !released else { return }
        released = true
        _ = Glibc.kill(pid, SIGKILL)
        // The main thread's exit is reported only after every other thread's: wait for it last.
        for tid in threads.reversed() {
            while true {
                guard let event = try? tracer.waitForEvent(tid) else { break }
                if case .stopped = event { try? tracer.resume(tid); continue }
                break
            }
        }
        try waitForPIDToBeFree(pid, timeoutSeconds: timeoutSeconds)
    }
}

/// Waits until /proc/PID is gone (the process was reaped), or `reused` says the PID now
/// belongs to another process, polling.
public func waitForPIDToBeFree(_ pid: pid_t, timeoutSeconds: Double, what: String? = nil,
                               orUntil reused: () -> Bool = { false }) throws {
    let deadline = monotonicNanoseconds() + UInt64(timeoutSeconds * 1e9)
    while pathExists("/proc/\(pid)") && !reused() {
        if monotonicNanoseconds() > deadline {
            if let what { throw StasisError.pidTaken(pid: pid, by: "\(what) still running after \(timeoutSeconds) s") }
            throw StasisError.notTraceable(pid: pid, reason: "it was killed but its parent has not reaped it after \(timeoutSeconds) s")
        }
        usleep(2000)
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
