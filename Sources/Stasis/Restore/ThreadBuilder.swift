import CStasis
import Glibc

/// Recreates a process's threads with their original TIDs and gives every thread its
/// kernel-held state (robust futex list, clear_child_tid, sigaltstack, name, rseq) and finally
/// its registers and signal mask.
enum ThreadBuilder {
    static let threadFlags: UInt64 = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000
    // CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM

    /// Creates every thread after the first with clone3(set_tid) injected into the main thread;
    /// `localTID` is each thread's TID as the process sees it.
    static func createThreads(_ threads: [ThreadRecord], process: RestoredProcess, caller: RemoteSyscaller, scratch: RemoteScratch,
                              localTID: (ThreadRecord) -> pid_t) throws {
        for thread in threads.dropFirst() {
            let tid = localTID(thread)
            scratch.reset()
            let tidArray = try scratch.place(words: [UInt64(UInt32(bitPattern: tid))])
            // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack,
            // stack_size, tls, set_tid, set_tid_size, cgroup
            let args = try scratch.place(words: [threadFlags, 0, 0, 0, 0, 0, 0, 0, tidArray, 1, 0])
            let created: UInt64
            let before = caller.createdTasks.count
            do {
                created = try caller.call(.clone3, args, 88, what: "clone3(set_tid=\(tid))")
            } catch {
                if tid == thread.tid && pathExists("/proc/\(tid)") {
                    throw StasisError.pidTaken(pid: tid, by: describeProcess(tid))
                }
                throw error
            }
            guard created == UInt64(UInt32(bitPattern: tid)), caller.createdTasks.count == before + 1, let attached = caller.createdTasks.last else {
                throw StasisError.restoreFailed(pid: process.localPID, step: "creating thread \(tid)", reason: "the kernel gave TID \(created)")
            }
            try process.adopt(thread: attached, localTID: tid)
        }
    }

    /// Gives one thread (`tid`, as Stasis sees it) its kernel-held state, in one batch run in
    /// that thread: robust futex list, clear_child_tid, sigaltstack, name, rseq, parent-death signal.
    static func restoreKernelState(_ thread: ThreadRecord, tid: pid_t, executor: StubExecutor, scratch: RemoteScratch,
                                   parentDeathSignal: Int32) throws {
        scratch.reset()
        var calls: [StubExecutor.Call] = []
        if thread.robustListHead != 0 {
            calls.append(.init(.setRobustList, thread.robustListHead, thread.robustListLength, what: "set_robust_list"))
        }
        calls.append(.init(.setTIDAddress, thread.clearChildTID, what: "set_tid_address"))
        var stack: [UInt8] = []
        let disabled = thread.alternateStack.flags & 2 != 0
        stack.appendLE(disabled ? 0 : thread.alternateStack.base)
        stack.appendLE(disabled ? Int32(2) : thread.alternateStack.flags & Int32(bitPattern: 0x8000_0000))  // keep SS_AUTODISARM
        stack.appendLE(Int32(0))
        stack.appendLE(disabled ? 0 : thread.alternateStack.size)
        calls.append(.init(.sigaltstack, try scratch.place(stack), 0, what: "sigaltstack"))
        let name = Array(thread.name.utf8.prefix(15)) + [0]
        calls.append(.init(.prctl, 15 /* PR_SET_NAME */, try scratch.place(name), 0, 0, 0, what: "PR_SET_NAME"))
        if let rseq = thread.rseq {
            calls.append(.init(.rseq, rseq.address, UInt64(rseq.length), 0, UInt64(rseq.signature), what: "rseq registration"))
        }
        calls.append(.init(.prctl, 1 /* PR_SET_PDEATHSIG */, UInt64(UInt32(bitPattern: parentDeathSignal)), 0, 0, 0, what: "PR_SET_PDEATHSIG"))
        try executor.run(calls, in: tid)
    }

    /// `tid` is the thread's TID as Stasis sees it.
    static func restoreCPUState(_ thread: ThreadRecord, tid: pid_t, tracer: Tracer) throws {
        try tracer.setExtendedState(tid, thread.extendedState)
        try tracer.setRegisters(tid, thread.registers)
        try tracer.setSignalMask(tid, thread.blockedSignals)
    }
}
