import CStasis
import Glibc

/// How a traced thread reported itself to `waitpid`.
public enum TraceeEvent: Equatable, Sendable {
    /// A ptrace-stop: `signal` is WSTOPSIG, `event` the PTRACE_EVENT_* (0 for a plain signal stop).
    case stopped(signal: Int32, event: Int32)
    /// The thread exited with `code`.
    case exited(code: Int32)
    /// The thread was killed by `signal`.
    case killed(signal: Int32)

    var isStop: Bool { if case .stopped = self { return true } else { return false } }
}

/// The right to issue ptrace requests, held only by the `TracerThread` that created it.
///
/// Every method checks (cheaply) that it runs on that thread and is a typed wrapper over one
/// ptrace request; errors name the request and the TID.
public final class Tracer {
    /// The kernel TID of the owning tracer thread.
    public let threadTID: pid_t

    init(threadTID: pid_t) { self.threadTID = threadTID }

    @inline(__always)
    private func assertOnTracerThread() {
        assert(pid_t(stasis_gettid()) == threadTID, "ptrace request off the tracer thread")
    }

    private func request(
        _ name: String, _ request: Int32, _ tid: pid_t, _ addr: UInt64 = 0, _ data: UInt64 = 0
    ) throws {
        assertOnTracerThread()
        _ = try checked(stasis_ptrace(request, tid, addr, data), "ptrace(\(name))", "tid \(tid)")
    }

    // MARK: attaching and stopping

    /// PTRACE_SEIZE: attaches without stopping the thread.
    public func seize(_ tid: pid_t, options: Int32) throws {
        try request("PTRACE_SEIZE", Int32(STASIS_PTRACE_SEIZE), tid, 0, UInt64(options))
    }

    /// PTRACE_SETOPTIONS: replaces the thread's ptrace options.
    public func setOptions(_ tid: pid_t, _ options: Int32) throws {
        try request("PTRACE_SETOPTIONS", Int32(STASIS_PTRACE_SETOPTIONS), tid, 0, UInt64(options))
    }

    /// PTRACE_INTERRUPT: asks a seized thread to stop; `waitForEvent` reports the stop.
    public func interrupt(_ tid: pid_t) throws {
        try request("PTRACE_INTERRUPT", Int32(STASIS_PTRACE_INTERRUPT), tid)
    }

    /// waitpid(tid, __WALL) until the thread reports a stop or its end.
    public func waitForEvent(_ tid: pid_t) throws -> TraceeEvent {
        assertOnTracerThread()
        var status: Int32 = 0
        _ = try retryingInterrupts("waitpid", "tid \(tid)") {
            stasis_waitpid(tid, &status, Int32(STASIS_WALL))
        }
        return Self.decode(status)
    }

    /// waitpid(-1, __WALL | WNOHANG): the next pending event of any tracee, if any.
    public func pollAnyEvent() throws -> (pid_t, TraceeEvent)? {
        var status: Int32 = 0
        let who = try retryingInterrupts("waitpid", "any tracee") {
            stasis_waitpid(-1, &status, Int32(STASIS_WALL | STASIS_WNOHANG))
        }
        return who == 0 ? nil : (pid_t(who), Self.decode(status))
    }

    static func decode(_ status: Int32) -> TraceeEvent {
        if stasis_wifexited(status) != 0 { return .exited(code: stasis_wexitstatus(status)) }
        if stasis_wifsignaled(status) != 0 { return .killed(signal: stasis_wtermsig(status)) }
        return .stopped(signal: stasis_wstopsig(status), event: stasis_wptrace_event(status))
    }

    /// PTRACE_CONT, delivering `signal` (0 for none).
    public func resume(_ tid: pid_t, signal: Int32 = 0) throws {
        try request("PTRACE_CONT", Int32(STASIS_PTRACE_CONT), tid, 0, UInt64(signal))
    }

    /// PTRACE_SYSCALL: resume until the next syscall entry or exit.
    public func resumeToSyscall(_ tid: pid_t) throws {
        try request("PTRACE_SYSCALL", Int32(STASIS_PTRACE_SYSCALL), tid)
    }

    /// PTRACE_DETACH, delivering `signal` (0 for none).
    public func detach(_ tid: pid_t, signal: Int32 = 0) throws {
        try request("PTRACE_DETACH", Int32(STASIS_PTRACE_DETACH), tid, 0, UInt64(signal))
    }

    /// PTRACE_GETEVENTMSG (e.g. the new TID after PTRACE_EVENT_CLONE).
    public func eventMessage(_ tid: pid_t) throws -> UInt64 {
        var message: UInt64 = 0
        try withUnsafeMutablePointer(to: &message) { (pointer) throws in
            try request("PTRACE_GETEVENTMSG", Int32(STASIS_PTRACE_GETEVENTMSG), tid, 0,
                        UInt64(UInt(bitPattern: pointer)))
        }
        return message
    }

    // MARK: registers

    /// PTRACE_GETREGS.
    public func registers(_ tid: pid_t) throws -> GeneralRegisters {
        var regs = user_regs_struct()
        try withUnsafeMutablePointer(to: &regs) { (pointer) throws in
            try request("PTRACE_GETREGS", Int32(STASIS_PTRACE_GETREGS), tid, 0,
                        UInt64(UInt(bitPattern: pointer)))
        }
        return GeneralRegisters(regs)
    }

    /// PTRACE_SETREGS.
    public func setRegisters(_ tid: pid_t, _ registers: GeneralRegisters) throws {
        var regs = registers.kernelLayout
        try withUnsafeMutablePointer(to: &regs) { (pointer) throws in
            try request("PTRACE_SETREGS", Int32(STASIS_PTRACE_SETREGS), tid, 0,
                        UInt64(UInt(bitPattern: pointer)))
        }
    }

    /// PTRACE_GETREGSET(NT_X86_XSTATE): the XSAVE area (FPU, SSE, AVX, AVX-512 state).
    public func extendedState(_ tid: pid_t) throws -> [UInt8] {
        assertOnTracerThread()
        var buffer = [UInt8](repeating: 0, count: 16384)
        var size = buffer.count
        _ = try checked(
            stasis_ptrace_getregset(tid, Int32(STASIS_NT_X86_XSTATE), &buffer, &size),
            "ptrace(PTRACE_GETREGSET, NT_X86_XSTATE)", "tid \(tid)")
        return Array(buffer[0..<size])
    }

    /// PTRACE_SETREGSET(NT_X86_XSTATE).
    public func setExtendedState(_ tid: pid_t, _ state: [UInt8]) throws {
        assertOnTracerThread()
        _ = try checked(
            stasis_ptrace_setregset(tid, Int32(STASIS_NT_X86_XSTATE), state, state.count),
            "ptrace(PTRACE_SETREGSET, NT_X86_XSTATE)", "tid \(tid)")
    }

    // MARK: signals

    /// PTRACE_GETSIGMASK: the thread's blocked-signal mask (bit n-1 for signal n).
    public func signalMask(_ tid: pid_t) throws -> UInt64 {
        var mask: UInt64 = 0
        try withUnsafeMutablePointer(to: &mask) { (pointer) throws in
            try request("PTRACE_GETSIGMASK", Int32(STASIS_PTRACE_GETSIGMASK), tid, 8,
                        UInt64(UInt(bitPattern: pointer)))
        }
        return mask
    }

    /// PTRACE_SETSIGMASK.
    public func setSignalMask(_ tid: pid_t, _ mask: UInt64) throws {
        var value = mask
        try withUnsafeMutablePointer(to: &value) { (pointer) throws in
            try request("PTRACE_SETSIGMASK", Int32(STASIS_PTRACE_SETSIGMASK), tid, 8,
                        UInt64(UInt(bitPattern: pointer)))
        }
    }

    /// PTRACE_PEEKSIGINFO: the queued siginfo records (128 bytes each), without dequeuing them.
    /// `shared` selects the process-wide queue instead of the thread's own.
    public func pendingSignals(_ tid: pid_t, shared: Bool) throws -> [[UInt8]] {
        assertOnTracerThread()
        var result: [[UInt8]] = []
        var buffer = [UInt8](repeating: 0, count: 128 * 32)
        while true {
            var args = stasis_peeksiginfo_args(
                off: UInt64(result.count), flags: shared ? UInt32(STASIS_PTRACE_PEEKSIGINFO_SHARED) : 0,
                nr: 32)
            let count = try withUnsafeMutablePointer(to: &args) { (argsPointer) throws in
                try buffer.withUnsafeMutableBytes { (raw) throws in
                    try checked(
                        stasis_ptrace(Int32(STASIS_PTRACE_PEEKSIGINFO), tid,
                                      UInt64(UInt(bitPattern: argsPointer)),
                                      UInt64(UInt(bitPattern: raw.baseAddress!))),
                        "ptrace(PTRACE_PEEKSIGINFO)", "tid \(tid)")
                }
            }
            for index in 0..<count { result.append(Array(buffer[(index * 128)..<((index + 1) * 128)])) }
            if count < 32 { return result }
        }
    }

    /// PTRACE_GET_RSEQ_CONFIGURATION: the thread's restartable-sequences registration, if any.
    public func rseqConfiguration(_ tid: pid_t) throws -> RseqRegistration? {
        assertOnTracerThread()
        var config = stasis_rseq_configuration()
        let size = try withUnsafeMutablePointer(to: &config) { (pointer) throws in
            try checked(
                stasis_ptrace(Int32(STASIS_PTRACE_GET_RSEQ_CONFIGURATION), tid,
                              UInt64(MemoryLayout<stasis_rseq_configuration>.size),
                              UInt64(UInt(bitPattern: pointer))),
                "ptrace(PTRACE_GET_RSEQ_CONFIGURATION)", "tid \(tid)")
        }
        guard size > 0, config.rseq_abi_pointer != 0 else { return nil }
        return RseqRegistration(address: config.rseq_abi_pointer, length: config.rseq_abi_size,
                                signature: config.signature)
    }
}
