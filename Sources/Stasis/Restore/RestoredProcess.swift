import CStasis
import Glibc

/// A process being rebuilt: a stub Stasis created with the image's PID (by clone3 from Stasis,
/// or by a clone3 injected into its restored parent), seized by the tracer thread, into which
/// the image's state is injected.
///
/// IDs: `pid` and `threads` are as Stasis sees them (ptrace, /proc); `localPID` and the keys of
/// `localThreads` are as the process itself sees them — the image's — which differ when the
/// tree is restored into a PID namespace of its own.
///
/// Guarantees: until `detachAll()` succeeds, `abandon()` kills the stub and every thread made
/// in it, leaving nothing half-built running; stubs die by themselves (PTRACE_O_EXITKILL, and
/// PR_SET_PDEATHSIG for Stasis's own children) if Stasis dies first.
final class RestoredProcess {
    let pid: pid_t
    let localPID: pid_t
    let tracer: Tracer
    /// Threads attached so far, main thread first (Stasis's TIDs).
    private(set) var threads: [pid_t]
    /// Stasis's TID for each of the process's own TIDs.
    private(set) var localThreads: [pid_t: pid_t]
    private var finished = false
    /// Set once the stub has exited as the zombie it was.
    private(set) var isZombie = false
    /// Whether Stasis is its parent (and so reaps it when abandoning it).
    let isChildOfStasis: Bool
    /// A `syscall` instruction and a scratch page, while the stub is only a stub (for forking
    /// its children and leading its session); the address space builder replaces both.
    private var stubCaller: RemoteSyscaller?

    /// The `syscall` instruction in the stub's [vdso], as `prepareStub` (or the parent's, for a
    /// forked child) found it.
    var syscallInstruction: UInt64? { stubCaller?.syscallInstruction }
    private var stubScratch: RemoteScratch?

    static let options = Int32(STASIS_PTRACE_O_TRACESYSGOOD | STASIS_PTRACE_O_TRACECLONE | STASIS_PTRACE_O_TRACEFORK
                               | STASIS_PTRACE_O_EXITKILL)

    private init(pid: pid_t, localPID: pid_t, tracer: Tracer, isChildOfStasis: Bool) {
        self.pid = pid
        self.localPID = localPID
        self.tracer = tracer
        self.threads = [pid]
        self.localThreads = [localPID: pid]
        self.isChildOfStasis = isChildOfStasis
    }

    /// How the root of a restored tree comes to exist.
    enum RootPlacement {
        /// With its own PID, in Stasis's PID namespace.
        case samePIDNamespace
        /// As PID 1 (the init) of new PID and mount namespaces.
        case namespaceInit
        /// With its own PID inside new PID and mount namespaces whose init is a small reaper
        /// Stasis starts (`stasis_spawn_namespace_init`).
        case belowNamespaceInit
    }

    /// Creates the root stub with `localPID`, in `cgroupFD` when given, keeping `keepFD` open in
    /// it, and stops it under ptrace. Returns it and the PID of Stasis's direct child (the stub
    /// itself, or the namespace's reaper).
    static func spawnRoot(localPID: pid_t, placement: RootPlacement, cgroupFD: Int32, keepFD: Int32,
                          tracer: Tracer) throws -> (RestoredProcess, topPID: pid_t) {
        let created: Int
        switch placement {
        case .samePIDNamespace: created = stasis_spawn_restore_stub(localPID, cgroupFD, keepFD, 0)
        case .namespaceInit: created = stasis_spawn_restore_stub(1, cgroupFD, keepFD, 1)
        case .belowNamespaceInit: created = stasis_spawn_namespace_init(localPID, cgroupFD, keepFD)
        }
        if created == -Int(EEXIST) {
            throw StasisError.pidTaken(pid: localPID, by: describeProcess(localPID))
        }
        let top = pid_t(try checked(created, "clone3(set_tid=\(localPID))", "pid \(localPID)"))
        var stubPID = top
        if placement == .belowNamespaceInit {
            do { stubPID = try waitForOnlyChild(of: top) } catch {
                _ = kill(top, SIGKILL)
                var status: Int32 = 0
                _ = stasis_waitpid(top, &status, 0)
                throw error
            }
        }
        let process = RestoredProcess(pid: stubPID, localPID: placement == .namespaceInit ? 1 : localPID, tracer: tracer,
                                      isChildOfStasis: placement != .belowNamespaceInit)
        do {
            try waitUntilPaused(stubPID)
            try tracer.seize(stubPID, options: options)
            try tracer.interrupt(stubPID)
            try process.waitForFirstStop(stubPID)
        } catch {
            process.abandon()
            if placement == .belowNamespaceInit {
                _ = kill(top, SIGKILL)
                var status: Int32 = 0
                _ = stasis_waitpid(top, &status, 0)
            }
            throw error
        }
        return (process, top)
    }

    /// The PID (in Stasis's namespace) of the one child the namespace reaper creates.
    private static func waitForOnlyChild(of reaper: pid_t) throws -> pid_t {
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while true {
            if let text = try? readTextFile("/proc/\(reaper)/task/\(reaper)/children"),
               let child = text.split(separator: " ").first.flatMap({ pid_t($0.trimmingCharacters()) }) {
                return child
            }
            if !pathExists("/proc/\(reaper)") || monotonicNanoseconds() > deadline {
                throw StasisError.restoreFailed(pid: reaper, step: "starting the PID namespace", reason: "its init did not create the root's stub")
            }
            sched_yield()
        }
    }

    /// Waits until a stub has finished its own set-up (signals, fds, parent-death signal)
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

    private func waitForFirstStop(_ tid: pid_t) throws {
        while true {
            let event = try tracer.waitForEvent(tid)
            guard case let .stopped(_, eventCode) = event else {
                throw StasisError.restoreFailed(pid: localPID, step: "starting task \(tid)", reason: "it ended: \(event)")
            }
            if eventCode == Int32(STASIS_PTRACE_EVENT_STOP) { return }
            try tracer.resume(tid)
        }
    }

    // MARK: the stub stage

    /// Makes the freshly created stub small and ready to fork: finds a `syscall` instruction in
    /// its [vdso], drops the rseq registration it inherited, unmaps everything but the vDSO
    /// pieces (a copy of Stasis's own memory, for a root stub), and maps one scratch page.
    func prepareStub() throws {
        let maps = try ProcFS.mapEntries(pid)
        guard let vdso = maps.first(where: { $0.name == "[vdso]" }),
              let instruction = try findSyscallInstruction(pid: pid, in: vdso) else {
            throw StasisError.restoreFailed(pid: localPID, step: "preparing the stub", reason: "it has no [vdso] with a syscall instruction")
        }
        let caller = try RemoteSyscaller(tracer: tracer, tid: pid, syscallInstruction: instruction)
        if let rseq = try tracer.rseqConfiguration(pid) {
            try caller.call(.rseq, rseq.address, UInt64(rseq.length), 1 /* RSEQ_FLAG_UNREGISTER */, UInt64(rseq.signature),
                            what: "unregister the stub's rseq")
        }
        try AddressSpaceBuilder.unmapAllButVDSO(maps, caller: caller)
        let page = try caller.call(.mmap, 0, 4096, UInt64(PROT_READ | PROT_WRITE), UInt64(MAP_PRIVATE | MAP_ANONYMOUS),
                                   UInt64.max, 0, what: "stub scratch page")
        stubCaller = caller
        stubScratch = RemoteScratch(address: page, size: 4096, pid: pid)
    }

    /// setsid() in the stub, before it forks the children that share its session.
    func leadSession() throws {
        try stubCaller!.call(.setsid, what: "setsid")
    }

    /// Creates a child of this stub with the process's own PID `childPID` (clone3 with set_tid,
    /// injected here), attached through PTRACE_O_TRACEFORK and stopped; it is a stub too.
    func fork(childPID: pid_t) throws -> RestoredProcess {
        let caller = stubCaller!, scratch = stubScratch!
        scratch.reset()
        let tidArray = try scratch.place(words: [UInt64(UInt32(bitPattern: childPID))])
        // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
        // tls, set_tid, set_tid_size, cgroup
        let args = try scratch.place(words: [0, 0, 0, 0, UInt64(SIGCHLD), 0, 0, 0, tidArray, 1, 0])
        let before = caller.createdTasks.count
        let result = try caller.callRaw(.clone3, [args, 88])
        if result == -Int64(EEXIST) {
            throw StasisError.pidTaken(pid: childPID, by: "another process")
        }
        guard result == Int64(childPID), caller.createdTasks.count == before + 1, let child = caller.createdTasks.last else {
            throw StasisError.restoreFailed(pid: localPID, step: "creating child \(childPID)",
                                            reason: result < 0 ? String(cString: strerror(Int32(-result))) : "the kernel gave PID \(result)")
        }
        let process = RestoredProcess(pid: child, localPID: childPID, tracer: tracer, isChildOfStasis: false)
        do {
            try process.waitForFirstStop(child)
            // The child is a copy of this stub as it is now: the same vDSO and its own private
            // copy of the scratch page, at the same addresses. It is ready to fork in turn.
            process.stubCaller = try RemoteSyscaller(tracer: tracer, tid: child, syscallInstruction: caller.syscallInstruction)
            process.stubScratch = RemoteScratch(address: scratch.address, size: scratch.size, pid: child)
        } catch {
            process.abandon()
            throw error
        }
        return process
    }

    /// setpgid(0, group) in the stub.
    func joinProcessGroup(_ group: pid_t) throws {
        try stubCaller!.call(.setpgid, 0, UInt64(UInt32(bitPattern: group)), what: "setpgid(0, \(group))")
    }

    /// Ends the stub as the zombie it was: it exits with `status`'s code, or dies of its signal
    /// (with RLIMIT_CORE 0, so no core is dumped). Its parent then holds it as a zombie, and
    /// gets a SIGCHLD that `drainChildSignal` takes back.
    func exitAsZombie(waitStatus status: Int32) throws {
        finished = true
        isZombie = true
        let signal = status & 0x7f
        var noCore = rlimit(rlim_cur: 0, rlim_max: 0)
        _ = stasis_prlimit(pid, Int32(RLIMIT_CORE.rawValue), &noCore, nil)
        if signal == 0 {
            var regs = try tracer.registers(pid)
            regs.rax = SyscallNumber.exitGroup.rawValue
            regs.orig_rax = GeneralRegisters.noSystemCall
            regs.rdi = UInt64((status >> 8) & 0xff)
            regs.rip = stubCaller!.syscallInstruction
            try tracer.setRegisters(pid, regs)
            try tracer.resume(pid)
        } else {
            try tracer.setSignalMask(pid, 0)
            _ = stasis_tgkill(pid, pid, signal)
            // SIGKILL ends it at once; any other signal is delivered when it runs.
            if signal != SIGKILL { try tracer.resume(pid) }
        }
        while true {
            switch try tracer.waitForEvent(pid) {
            case .exited, .killed: return
            case let .stopped(delivered, event):
                try tracer.resume(pid, signal: event == 0 ? delivered : 0)
            }
        }
    }

    /// Takes back the SIGCHLD its restored zombie children sent it (the stub blocks every signal),
    /// so that only the pending signals the image recorded are pending when it resumes.
    func drainChildSignal() throws {
        let caller = stubCaller!, scratch = stubScratch!
        scratch.reset()
        let set = try scratch.place(words: [UInt64(1) << UInt64(SIGCHLD - 1)])
        let timeout = try scratch.place(words: [0, 0])
        _ = try caller.callRaw(.rtSigtimedwait, [set, 0, timeout, 8])
    }

    // MARK: threads and the end

    /// Records a thread created inside the process (already attached through TRACECLONE) and
    /// waits for its first stop.
    func adopt(thread tid: pid_t, localTID: pid_t) throws {
        threads.append(tid)
        localThreads[localTID] = tid
        try waitForFirstStop(tid)
    }

    /// Lets every thread run: the restore is complete.
    func detachAll() throws {
        for tid in threads { try tracer.detach(tid) }
        finished = true
    }

    /// Kills the half-built process and consumes its notifications (reaping it if it is
    /// Stasis's child).
    func abandon() {
        guard !finished else { return }
        finished = true
        _ = kill(pid, SIGKILL)
        var status: Int32 = 0
        for tid in threads.reversed() where tid != pid { _ = stasis_waitpid(tid, &status, Int32(STASIS_WALL)) }
        while true {
            let result = stasis_waitpid(pid, &status, Int32(STASIS_WALL))
            if result < 0 && result != -Int(EINTR) { break }
            // Stasis's own child is reaped by this; a traced non-child is reported to its tracer
            // first and stays a zombie of its (dying) parent.
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
