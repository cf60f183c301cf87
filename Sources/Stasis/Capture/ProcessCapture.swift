import CStasis
import Glibc

/// Everything about a frozen process except its page contents: the records that precede the
/// page blocks in an image, and the plan of which pages to store.
public struct CapturedState {
    public var process: ProcessRecord
    public var threads: [ThreadRecord]
    public var mappings: [MappingRecord]
    public var files: FileTable
    /// For each entry of `mappings`, the page ranges that hold the process's own data (empty
    /// until `ProcessCapture.planPages` ran).
    public var pageRanges: [[Range<UInt64>]]
    /// A `syscall` instruction in the process's [vdso], for system calls made on its behalf.
    var syscallInstruction: UInt64 = 0
}

/// Reads the state of a `FrozenProcess`: /proc, ptrace register sets, and a few system calls
/// executed inside the process for what only the process itself can ask the kernel
/// (signal dispositions, sigaltstack, clear_child_tid, the parent-death signal, the current brk).
///
/// Guarantees: refuses, with `StasisError.unsupported` naming the PID and the object, anything
/// it cannot restore faithfully; leaves no mapping, register or signal change behind in the
/// process (the scratch page it maps is unmapped, injected registers are put back).
enum ProcessCapture {
    /// Captures the frozen process. `earlierMappings`, read from /proc/PID/smaps before the
    /// freeze, saves walking the page tables again while frozen: the freeze reads only
    /// /proc/PID/maps and takes each mapping's VmFlags from the earlier read, unless any mapping
    /// changed meanwhile (then smaps is read again). Pages are not planned (see `planPages`).
    ///
    /// With `signalsFromClone`, the signal dispositions and the current brk are not asked while
    /// frozen: `askSignalsAndBrk` asks the copy-on-write clone for them after the release (a
    /// clone gets a copy of both at the instant it is made), which shortens the freeze by one
    /// injected system call per caught signal.
    static func capture(_ frozen: FrozenProcess, earlierMappings: [ProcFS.MapEntry]? = nil,
                        signalsFromClone: Bool = false) throws -> CapturedState {
        let pid = frozen.pid
        let entries = try currentMappings(pid, earlier: earlierMappings)
        let mappings = try MappingClassifier.classify(entries, pid: pid)
        let files = try FileTableCapture.capture(pid: pid)
        guard let vdso = entries.first(where: { $0.name == "[vdso]" }),
              let syscallInstruction = try findSyscallInstruction(pid: pid, in: vdso)
        else {
            throw StasisError.unsupported(pid: pid, what: "no [vdso] mapping with a syscall instruction")
        }

        // What only the process can tell: ask through its own threads.
        let status = try ProcFS.status("/proc/\(pid)/status")
        let caught = UInt64(status["SigCgt"] ?? "0", radix: 16) ?? 0
        let ignored = UInt64(status["SigIgn"] ?? "0", radix: 16) ?? 0
        let main = try RemoteSyscaller(tracer: frozen.tracer, tid: pid, syscallInstruction: syscallInstruction)
        // Scratch memory: 32 bytes for the main thread's queries, then 64 bytes per thread.
        let scratchSize = UInt64((64 + 64 * frozen.threads.count + 4095) / 4096 * 4096)
        let scratch = try main.call(.mmap, 0, scratchSize, UInt64(PROT_READ | PROT_WRITE),
                                    UInt64(MAP_PRIVATE | MAP_ANONYMOUS), UInt64.max, 0, what: "scratch memory")
        let memory = RemoteMemory(pid: pid)
        var actions: [SignalAction] = []
        var threadExtras: [pid_t: (AlternateStack, UInt64, Int32)] = [:]
        var currentBrk: UInt64 = 0
        var others: [RemoteSyscaller] = []
        do {
            if !signalsFromClone {
                (actions, currentBrk) = try signalActionsAndBrk(main, memory: memory, scratch: scratch, caught: caught, ignored: ignored)
            }
            // Per-thread queries, issued in every thread at once (each its own 64-byte slot).
            for tid in frozen.threads where tid != pid {
                others.append(try RemoteSyscaller(tracer: frozen.tracer, tid: tid, syscallInstruction: syscallInstruction))
            }
            let callers = [main] + others
            func slot(_ index: Int) -> UInt64 { scratch + 64 + UInt64(64 * index) }
            let stackResults = try RemoteSyscaller.callInEach(callers, .sigaltstack) { [0, slot($0)] }
            let addressResults = try RemoteSyscaller.callInEach(callers, .prctl) { [40 /* PR_GET_TID_ADDRESS */, slot($0) + 32] }
            let deathSignalResults = try RemoteSyscaller.callInEach(callers, .prctl) { [2 /* PR_GET_PDEATHSIG */, slot($0) + 40] }
            let slots = try memory.read(scratch + 64, count: 64 * callers.count)
            for (index, caller) in callers.enumerated() {
                for (name, result) in [("read sigaltstack", stackResults[index]), ("PR_GET_TID_ADDRESS", addressResults[index]),
                                       ("PR_GET_PDEATHSIG", deathSignalResults[index])]
                where result < 0 && result > -4096 {
                    throw RemoteCallError(call: name, tid: caller.tid, detail: String(cString: strerror(Int32(-result))))
                }
                let base = 64 * index
                threadExtras[caller.tid] = (AlternateStack(base: slots.readLE(UInt64.self, at: base),
                                                           flags: slots.readLE(Int32.self, at: base + 8),
                                                           size: slots.readLE(UInt64.self, at: base + 16)),
                                            slots.readLE(UInt64.self, at: base + 32), slots.readLE(Int32.self, at: base + 40))
            }
            for caller in others { try caller.finish() }
        } catch {
            for caller in others { try? caller.finish() }
            _ = try? main.call(.munmap, scratch, scratchSize)
            try? main.finish()
            throw error
        }
        try main.call(.munmap, scratch, scratchSize, what: "scratch memory")
        try main.finish()

        var threads: [ThreadRecord] = []
        let namespaceTIDs = TreeNamespace.namespaceTIDs(pid, threads: frozen.threads)
        for tid in frozen.threads {
            let (alternateStack, clearTID, deathSignal) = threadExtras[tid]!
            var robustHead: UInt64 = 0, robustLength: UInt64 = 0
            _ = try checked(stasis_get_robust_list(tid, &robustHead, &robustLength), "get_robust_list", "tid \(tid)")
            threads.append(ThreadRecord(
                tid: tid,
                name: (try? readTextFile("/proc/\(pid)/task/\(tid)/comm"))?.trimmingCharacters() ?? "",
                registers: frozen.registersAtFreeze(tid).normalizedForResume(keepRestartBlock: false),
                extendedState: try frozen.tracer.extendedState(tid),
                blockedSignals: frozen.originalMask(tid),
                pendingSignals: try frozen.tracer.pendingSignals(tid, shared: false),
                alternateStack: alternateStack,
                rseq: try frozen.tracer.rseqConfiguration(tid),
                robustListHead: robustHead,
                robustListLength: robustLength,
                clearChildTID: clearTID,
                namespaceTID: namespaceTIDs[tid],
                parentDeathSignal: deathSignal))
        }

        let process = try captureProcessRecord(frozen, status: status, actions: actions, brk: currentBrk)
        var state = CapturedState(process: process, threads: threads, mappings: mappings, files: files,
                                  pageRanges: Array(repeating: [], count: mappings.count))
        state.syscallInstruction = syscallInstruction
        return state
    }

    /// Asks `caller`'s process for each caught (and SIGCHLD's) disposition and its current brk;
    /// ignored signals come from the SigIgn mask.
    private static func signalActionsAndBrk(
        _ caller: RemoteSyscaller, memory: RemoteMemory, scratch: UInt64, caught: UInt64, ignored: UInt64
    ) throws -> ([SignalAction], UInt64) {
        var actions: [SignalAction] = []
        for signal in Int32(1)...64 where signal != SIGKILL && signal != SIGSTOP {
            let bit = UInt64(1) << UInt64(signal - 1)
            if caught & bit != 0 || signal == SIGCHLD {
                try caller.call(.rtSigaction, UInt64(signal), 0, scratch, 8, what: "signal \(signal)")
                let raw = try memory.read(scratch, count: 32)
                let action = SignalAction(signal: signal, handler: raw.readLE(UInt64.self, at: 0),
                                          flags: raw.readLE(UInt64.self, at: 8), restorer: raw.readLE(UInt64.self, at: 16),
                                          mask: raw.readLE(UInt64.self, at: 24))
                if action.handler != 0 || action.flags != 0 || action.mask != 0 { actions.append(action) }
            } else if ignored & bit != 0 {
                actions.append(SignalAction(signal: signal, handler: 1, flags: 0, restorer: 0, mask: 0))
            }
        }
        return (actions, try caller.call(.brk, 0))
    }

    /// Fills in what `capture(signalsFromClone: true)` left out — signal dispositions and the
    /// brk — by asking `pid` through a scratch page mapped and unmapped in it: the never-running
    /// clone, whose copies of both are the process's at the freeze, or (when no clone could be
    /// made) the still-frozen process itself.
    static func askSignalsAndBrk(_ state: inout CapturedState, of clone: pid_t, tracer: Tracer) throws {
        let status = try ProcFS.status("/proc/\(clone)/status")
        let caught = UInt64(status["SigCgt"] ?? "0", radix: 16) ?? 0
        let ignored = UInt64(status["SigIgn"] ?? "0", radix: 16) ?? 0
        let caller = try RemoteSyscaller(tracer: tracer, tid: clone, syscallInstruction: state.syscallInstruction)
        defer { try? caller.finish() }
        let scratch = try caller.call(.mmap, 0, 4096, UInt64(PROT_READ | PROT_WRITE),
                                      UInt64(MAP_PRIVATE | MAP_ANONYMOUS), UInt64.max, 0, what: "scratch page in the clone")
        let (actions, brk) = try signalActionsAndBrk(caller, memory: RemoteMemory(pid: clone), scratch: scratch,
                                                     caught: caught, ignored: ignored)
        try caller.call(.munmap, scratch, 4096, what: "scratch page in the clone")
        state.process.signalActions = actions
        state.process.memoryLayout.brk = brk
    }

    /// The frozen process's mappings with their VmFlags, reusing `earlier` when nothing changed.
    private static func currentMappings(_ pid: pid_t, earlier: [ProcFS.MapEntry]?) throws -> [ProcFS.MapEntry] {
        guard let earlier else { return try ProcFS.mappings(pid) }
        var current = try ProcFS.mapEntries(pid)
        var flagsByMapping: [String: [String]] = [:]
        // Written out: interpolating the struct itself goes through reflection (milliseconds).
        func key(_ entry: ProcFS.MapEntry) -> String {
            "\(entry.start)-\(entry.end) \(entry.readable)\(entry.writable)\(entry.executable)\(entry.shared) \(entry.offset) \(entry.deviceMajor):\(entry.deviceMinor) \(entry.inode) \(entry.name)"
        }
        for entry in earlier { flagsByMapping[key(entry)] = entry.vmFlags }
        for index in current.indices {
            guard let flags = flagsByMapping[key(current[index])] else { return try ProcFS.mappings(pid) }
            current[index].vmFlags = flags
        }
        return current
    }

    /// Finds, for each mapping in `indices` (all when nil), which pages hold the process's own
    /// data, scanning the page tables of `scanPID` — the process itself, or its copy-on-write
    /// clone, whose page tables are a copy of the process's at the freeze — and records the
    /// counts in the mapping records.
    static func planPages(_ state: inout CapturedState, scanning scanPID: pid_t, indices: [Int]? = nil) throws {
        let scanner = try PageScanner(pid: scanPID)
        for index in indices ?? Array(state.mappings.indices) {
            let mapping = state.mappings[index]
            switch mapping.backing {
            case .anonymous, .privateFile:
                let found = try scanner.ownedRanges(start: mapping.start, end: mapping.end,
                                                    privateFile: mapping.backing == .privateFile)
                state.pageRanges[index] = found
                state.mappings[index].residentPages = found.reduce(0) { $0 + ($1.upperBound - $1.lowerBound) / 4096 }
            default:
                state.pageRanges[index] = []
            }
        }
    }

    private static func captureProcessRecord(
        _ frozen: FrozenProcess, status: [String: String], actions: [SignalAction], brk: UInt64
    ) throws -> ProcessRecord {
        let pid = frozen.pid
        let stat = try ProcFS.stat(pid)
        func field(_ number: Int) -> UInt64 { UInt64(stat[number] ?? "0") ?? 0 }
        let layout = MemoryLayoutRecord(
            startCode: field(26), endCode: field(27), startData: field(45), endData: field(46),
            startBrk: field(47), brk: brk, startStack: field(28), argStart: field(48), argEnd: field(49),
            envStart: field(50), envEnd: field(51))
        let auxvBytes = try ProcFS.auxiliaryVector(pid)
        var auxv: [UInt64] = []
        for index in stride(from: 0, to: auxvBytes.count - 7, by: 8) { auxv.append(auxvBytes.readLE(UInt64.self, at: index)) }
        let limits = try ProcFS.limits(pid)
        func ids(_ key: String) -> [UInt32] { (status[key] ?? "").split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { UInt32($0) } }
        let cmdline = (try? readTextFile("/proc/\(pid)/cmdline")) ?? ""
        let executable = try readLink("/proc/\(pid)/exe")
        if executable.hasSuffix(" (deleted)") {
            throw StasisError.unsupported(pid: pid, what: "its executable \(executable) was deleted")
        }
        var utsname = utsname()
        uname(&utsname)
        let release = withUnsafeBytes(of: utsname.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return ProcessRecord(
            pid: pid,
            name: (try? readTextFile("/proc/\(pid)/comm"))?.trimmingCharacters() ?? "",
            commandLine: cmdline.split(separator: "\0", omittingEmptySubsequences: false).dropLast().map(String.init),
            executable: executable,
            executableIdentity: try? FileIdentity.of("/proc/\(pid)/exe"),
            workingDirectory: try readLink("/proc/\(pid)/cwd"),
            umask: UInt32(status["Umask"] ?? "22", radix: 8) ?? 0o22,
            personality: UInt32((try? readTextFile("/proc/\(pid)/personality"))?.trimmingCharacters() ?? "0", radix: 16) ?? 0,
            credentials: Credentials(uids: ids("Uid"), gids: ids("Gid"), groups: ids("Groups")),
            limits: limits,
            memoryLayout: layout,
            auxiliaryVector: auxv,
            signalActions: actions,
            sharedPendingSignals: try frozen.tracer.pendingSignals(pid, shared: true),
            kernelRelease: release,
            snapshotTimeNanoseconds: Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec),
            startTime: field(22),
            bootID: currentBootID())
    }
}

extension FileIdentity {
    /// The identity of the file at `path` (following links, as /proc/PID/fd/N and map_files do).
    static func of(_ path: String) throws -> FileIdentity {
        let st = try statPath(path)
        return FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino), size: Int64(st.st_size),
                            modifiedNanoseconds: Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec))
    }
}

/// This boot's random ID, from /proc/sys/kernel/random/boot_id.
func currentBootID() -> String? {
    (try? readTextFile("/proc/sys/kernel/random/boot_id"))?.trimmingCharacters()
}
