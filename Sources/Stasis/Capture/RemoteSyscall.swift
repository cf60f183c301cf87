import CStasis
import Glibc

/// x86-64 system call numbers that Stasis issues inside other processes.
enum SyscallNumber: UInt64 {
    case read = 0, write = 1, open = 2, close = 3, lseek = 8, mmap = 9, mprotect = 10, munmap = 11
    case brk = 12, rtSigaction = 13, rtSigprocmask = 14, mremap = 25, madvise = 28, dup2 = 33
    case clone = 56, wait4 = 61, getpid = 39, sigaltstack = 131, personality = 135, prctl = 157, setrlimit = 160
    case chdir = 80, fchdir = 81, umask = 95, setresuid = 117, setresgid = 119, setgroups = 116
    case gettid = 186, setTIDAddress = 218, restartSyscall = 219, exitGroup = 231
    case rtTgsigqueueinfo = 297, rtSigqueueinfo = 129, openat = 257, setRobustList = 273
    case dup3 = 292, prlimit64 = 302, rseq = 334, clone3 = 435, closeRange = 436
    case fcntl = 72, setsid = 112, setpgid = 109, kill = 62, rtSigtimedwait = 128, pidfdGetfd = 438
}

/// A failure inside a remote system call: which call, in which thread, and the kernel's answer.
public struct RemoteCallError: Error, CustomStringConvertible, Sendable {
    public var call: String
    public var tid: pid_t
    public var detail: String
    public var description: String { "\(call) inside tid \(tid) failed: \(detail)" }
}

/// Executes system calls inside one ptrace-stopped thread of another process, as if that
/// thread had made them.
///
/// How: the thread's registers are pointed at a `syscall` instruction in one of its executable
/// mappings, with the call's number and arguments, and stepped with PTRACE_SYSCALL to the
/// syscall-entry and then the syscall-exit stop, where the result is read from rax. No code is
/// written into the target. `orig_rax` is set to -1 in every injected register set so that the
/// kernel's system-call restart logic never rewrites them.
///
/// Guarantees: `finish(restoring:)` puts back the register set it is given; while calls are
/// injected the caller must keep the thread's signals blocked (see `Freezer`), so that no
/// signal is delivered on injected registers.
final class RemoteSyscaller {
    let tracer: Tracer
    let tid: pid_t
    /// Address of a `syscall` instruction (0f 05) mapped executable in the target.
    var syscallInstruction: UInt64
    private let base: GeneralRegisters
    /// Threads and processes created by injected clone/clone3 calls, in order (attached through
    /// PTRACE_O_TRACECLONE/TRACEFORK; each reports its own first stop).
    private(set) var createdTasks: [pid_t] = []

    init(tracer: Tracer, tid: pid_t, syscallInstruction: UInt64) throws {
        self.tracer = tracer
        self.tid = tid
        self.syscallInstruction = syscallInstruction
        self.base = try tracer.registers(tid)
    }

    /// Issues one system call and returns the kernel's raw result (negative for -errno).
    func callRaw(_ number: SyscallNumber, _ args: [UInt64]) throws -> Int64 {
        var regs = base
        regs.rax = number.rawValue
        regs.orig_rax = GeneralRegisters.noSystemCall
        regs.rip = syscallInstruction
        let argumentRegisters: [WritableKeyPath<GeneralRegisters, UInt64>] = [\.rdi, \.rsi, \.rdx, \.r10, \.r8, \.r9]
        for (index, value) in args.enumerated() { regs[keyPath: argumentRegisters[index]] = value }
        try tracer.setRegisters(tid, regs)
        // To the syscall-entry stop …
        try tracer.resumeToSyscall(tid)
        try expectSyscallStop(number, phase: "entry")
        // … and to the exit stop, passing any clone events on the way.
        try tracer.resumeToSyscall(tid)
        while true {
            let event = try tracer.waitForEvent(tid)
            if case let .stopped(signal, eventCode) = event, signal == SIGTRAP,
               eventCode == Int32(STASIS_PTRACE_EVENT_CLONE) || eventCode == Int32(STASIS_PTRACE_EVENT_FORK) {
                let child = pid_t(truncatingIfNeeded: try tracer.eventMessage(tid))
                createdTasks.append(child)
                try tracer.resumeToSyscall(tid)
                continue
            }
            guard case let .stopped(signal, eventCode) = event, signal == (SIGTRAP | 0x80), eventCode == 0 else {
                throw RemoteCallError(call: "\(number)", tid: tid, detail: "unexpected \(event) waiting for the syscall exit")
            }
            break
        }
        return Int64(bitPattern: try tracer.registers(tid).rax)
    }

    /// Issues one system call in each of `callers`' threads at once (`arguments(i)` for the
    /// i-th), overlapping their round trips through the tracer: the threads are stepped to their
    /// entry stops together, then to their exit stops together. Returns each raw result.
    /// For calls that create no threads.
    static func callInEach(
        _ callers: [RemoteSyscaller], _ number: SyscallNumber, _ arguments: (Int) -> [UInt64]
    ) throws -> [Int64] {
        for (index, caller) in callers.enumerated() {
            var regs = caller.base
            regs.rax = number.rawValue
            regs.orig_rax = GeneralRegisters.noSystemCall
            regs.rip = caller.syscallInstruction
            let argumentRegisters: [WritableKeyPath<GeneralRegisters, UInt64>] = [\.rdi, \.rsi, \.rdx, \.r10, \.r8, \.r9]
            for (slot, value) in arguments(index).enumerated() { regs[keyPath: argumentRegisters[slot]] = value }
            try caller.tracer.setRegisters(caller.tid, regs)
            try caller.tracer.resumeToSyscall(caller.tid)
        }
        for caller in callers {
            try caller.expectSyscallStop(number, phase: "entry")
            try caller.tracer.resumeToSyscall(caller.tid)
        }
        var results: [Int64] = []
        for caller in callers {
            try caller.expectSyscallStop(number, phase: "exit")
            results.append(Int64(bitPattern: try caller.tracer.registers(caller.tid).rax))
        }
        return results
    }

    private func expectSyscallStop(_ number: SyscallNumber, phase: String) throws {
        let event = try tracer.waitForEvent(tid)
        guard case let .stopped(signal, eventCode) = event, signal == (SIGTRAP | 0x80), eventCode == 0 else {
            throw RemoteCallError(call: "\(number)", tid: tid, detail: "unexpected \(event) waiting for the syscall \(phase)")
        }
    }

    /// Issues one system call and throws if the kernel returned an error.
    @discardableResult
    func call(_ number: SyscallNumber, _ args: UInt64..., what: @autoclosure () -> String = "") throws -> UInt64 {
        let result = try callRaw(number, args)
        if result < 0 && result > -4096 {
            let reason = String(cString: strerror(Int32(-result)))
            let context = what()
            throw RemoteCallError(call: "\(number)\(context.isEmpty ? "" : " (\(context))")", tid: tid, detail: reason)
        }
        return UInt64(bitPattern: result)
    }

    /// Puts the thread's registers back (or sets the given ones) after the last injected call.
    func finish(restoring registers: GeneralRegisters? = nil) throws {
        try tracer.setRegisters(tid, registers ?? base)
    }
}

/// Finds a `syscall` instruction (0f 05) in the target's [vdso], which every process has,
/// preferring one directly followed by `ret` (c3): a thread that ever ran on from there with
/// a foreign stack pointer would fault at once rather than run on (see `CopyOnWriteClone`).
func findSyscallInstruction(pid: pid_t, in mapping: ProcFS.MapEntry) throws -> UInt64? {
    let bytes = try RemoteMemory(pid: pid).read(mapping.start, count: Int(mapping.end - mapping.start))
    guard bytes.count >= 3 else { return nil }
    var first: UInt64?
    for index in 0..<(bytes.count - 2) where bytes[index] == 0x0f && bytes[index + 1] == 0x05 {
        if bytes[index + 2] == 0xc3 { return mapping.start + UInt64(index) }
        if first == nil { first = mapping.start + UInt64(index) }
    }
    return first
}
