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
    /// Captures every frozen process of a tree. `earlierMappings`, read from /proc/PID/smaps
    /// before the freeze, saves walking the page tables again while frozen: the freeze reads
    /// only /proc/PID/maps and takes each mapping's VmFlags from the earlier read, unless any
    /// mapping changed meanwhile (then smaps is read again). Pages are not planned (see
    /// `planPages`). The system calls injected to ask what only a process can tell are issued in
    /// every thread of every process at once, so their round trips through the tracer overlap.
    ///
    /// With `fromClone`, what a copy-on-write clone holds a copy of — signal dispositions, brk,
    /// limits, auxv, command line, executable, personality, the mm layout — is not read while
    /// frozen: `completeFromClone` reads it from the clone after the release, which shortens the
    /// freeze. What the clone shares with the process instead (cwd, umask) or lacks (the
    /// process-wide signal queue, the start time) is read now.
    static func captureAll(_ processes: [FrozenProcess], earlierMappings: [pid_t: [ProcFS.MapEntry]] = [:],
                           fromClone: Bool = false, namespaced: Bool = false) throws -> [CapturedState] {
        struct Partial {
            var frozen: FrozenProcess
            var mappings: [MappingRecord]
            var files: FileTable
            var instruction: UInt64
            var status: [String: String]
        }
        var partials: [Partial] = []
        let fileCache = MappingClassifier.FileCache()
        for frozen in processes {
            let pid = frozen.pid
            let entries = try PhaseTimer.measure("capture: maps") { try currentMappings(pid, earlier: earlierMappings[pid]) }
            let mappings = try PhaseTimer.measure("capture: classify") { try MappingClassifier.classify(entries, pid: pid, cache: fileCache) }
            let files = try PhaseTimer.measure("capture: files") { try FileTableCapture.capture(pid: pid) }
            guard let vdso = entries.first(where: { $0.name == "[vdso]" }),
                  let instruction = try findSyscallInstruction(pid: pid, in: vdso)
            else {
                throw StasisError.unsupported(pid: pid, what: "no [vdso] mapping with a syscall instruction")
            }
            partials.append(Partial(frozen: frozen, mappings: mappings, files: files, instruction: instruction,
                                    status: try ProcFS.status("/proc/\(pid)/status")))
        }
        let phaseStart = PhaseTimer.now()
        let answers = try askEveryThread(partials.map { ($0.frozen, $0.instruction, $0.status) }, signalsAndBrk: !fromClone)
        PhaseTimer.add("capture: injected", since: phaseStart)
        return try partials.enumerated().map { index, partial in
            let frozen = partial.frozen
            let pid = frozen.pid
            let threadStart = PhaseTimer.now()
            var threads: [ThreadRecord] = []
            let namespaceTIDs = namespaced ? TreeNamespace.namespaceTIDs(pid, threads: frozen.threads) : [:]
            for tid in frozen.threads {
                let extras = answers[index].threads[tid]!
                var robustHead: UInt64 = 0, robustLength: UInt64 = 0
                _ = try checked(stasis_get_robust_list(tid, &robustHead, &robustLength), "get_robust_list", "tid \(tid)")
                threads.append(ThreadRecord(
                    tid: tid,
                    name: (try? readTextFile("/proc/\(pid)/task/\(tid)/comm"))?.trimmingCharacters() ?? "",
                    registers: frozen.registersAtFreeze(tid).normalizedForResume(keepRestartBlock: false),
                    extendedState: try frozen.tracer.extendedState(tid),
                    blockedSignals: frozen.originalMask(tid),
                    pendingSignals: try frozen.tracer.pendingSignals(tid, shared: false),
                    alternateStack: extras.alternateStack,
                    rseq: try frozen.tracer.rseqConfiguration(tid),
                    robustListHead: robustHead,
                    robustListLength: robustLength,
                    clearChildTID: extras.clearChildTID,
                    namespaceTID: namespaceTIDs[tid],
                    parentDeathSignal: extras.parentDeathSignal))
            }
            PhaseTimer.add("capture: threads", since: threadStart)
            var process = try PhaseTimer.measure("capture: process record") {
                try frozenProcessRecord(frozen, status: partial.status)
            }
            if !fromClone {
                process.signalActions = answers[index].actions
                try completeProcessRecord(&process, from: pid)
                process.memoryLayout.brk = answers[index].brk
            }
            var state = CapturedState(process: process, threads: threads, mappings: partial.mappings, files: partial.files,
                                      pageRanges: Array(repeating: [], count: partial.mappings.count))
            state.syscallInstruction = partial.instruction
            return state
        }
    }

    /// What each thread told about itself.
    struct ThreadAnswers {
        var alternateStack: AlternateStack
        var clearChildTID: UInt64
        var parentDeathSignal: Int32
    }

    struct ProcessAnswers {
        var threads: [pid_t: ThreadAnswers] = [:]
        var actions: [SignalAction] = []
        var brk: UInt64 = 0
    }

    /// Asks every thread of every process, through injected system calls, for its sigaltstack,
    /// its clear_child_tid address and its parent-death signal (and, with `signalsAndBrk`, each
    /// process for its signal dispositions and brk). Each process gets a scratch mapping for the
    /// answers (64 bytes a thread), unmapped again; every register is put back.
    private static func askEveryThread(_ processes: [(frozen: FrozenProcess, instruction: UInt64, status: [String: String])],
                                       signalsAndBrk: Bool) throws -> [ProcessAnswers] {
        guard let tracer = processes.first?.frozen.tracer else { return [] }
        var mains: [RemoteSyscaller] = []
        var everyThread: [(caller: RemoteSyscaller, process: Int, slot: Int)] = []
        var scratches: [UInt64] = []
        func sizeOfScratch(_ index: Int) -> UInt64 { UInt64((64 * processes[index].frozen.threads.count + 4095) / 4096 * 4096) }
        defer {
            // Whatever happened: scratch memory unmapped, registers back.
            if !scratches.isEmpty {
                _ = try? RemoteSyscaller.callInEach(Array(mains.prefix(scratches.count)), .munmap) { [scratches[$0], sizeOfScratch($0)] }
            }
            for (caller, process, _) in everyThread where caller !== mains[process] { try? caller.finish() }
            for main in mains { try? main.finish() }
        }
        for (frozen, instruction, _) in processes {
            mains.append(try RemoteSyscaller(tracer: tracer, tid: frozen.pid, syscallInstruction: instruction))
        }
        let mapped = try RemoteSyscaller.callInEach(mains, .mmap) {
            [0, sizeOfScratch($0), UInt64(PROT_READ | PROT_WRITE), UInt64(MAP_PRIVATE | MAP_ANONYMOUS), UInt64.max, 0]
        }
        for (index, result) in mapped.enumerated() {
            if result < 0 && result > -4096 {
                // Unmap only what was mapped: the ones before this one.
                throw RemoteCallError(call: "mmap (scratch memory)", tid: mains[index].tid, detail: String(cString: strerror(Int32(-result))))
            }
            scratches.append(UInt64(bitPattern: result))
        }
        for (index, (frozen, _, _)) in processes.enumerated() {
            for (slot, tid) in frozen.threads.enumerated() {
                let caller = tid == frozen.pid ? mains[index]
                    : try RemoteSyscaller(tracer: tracer, tid: tid, syscallInstruction: mains[index].syscallInstruction)
                everyThread.append((caller, index, slot))
            }
        }
        let callers = everyThread.map(\.caller)
        func slotAddress(_ index: Int) -> UInt64 { scratches[everyThread[index].process] + UInt64(64 * everyThread[index].slot) }
        let stacks = try RemoteSyscaller.callInEach(callers, .sigaltstack) { [0, slotAddress($0)] }
        let addresses = try RemoteSyscaller.callInEach(callers, .prctl) { [40 /* PR_GET_TID_ADDRESS */, slotAddress($0) + 32] }
        let deathSignals = try RemoteSyscaller.callInEach(callers, .prctl) { [2 /* PR_GET_PDEATHSIG */, slotAddress($0) + 40] }
        var answers = [ProcessAnswers](repeating: ProcessAnswers(), count: processes.count)
        var slotsRead: [Int: [UInt8]] = [:]
        for (index, entry) in everyThread.enumerated() {
            for (name, result) in [("read sigaltstack", stacks[index]), ("PR_GET_TID_ADDRESS", addresses[index]),
                                   ("PR_GET_PDEATHSIG", deathSignals[index])]
            where result < 0 && result > -4096 {
                throw RemoteCallError(call: name, tid: entry.caller.tid, detail: String(cString: strerror(Int32(-result))))
            }
            let frozen = processes[entry.process].frozen
            if slotsRead[entry.process] == nil {
                slotsRead[entry.process] = try RemoteMemory(pid: frozen.pid).read(scratches[entry.process], count: 64 * frozen.threads.count)
            }
            let slots = slotsRead[entry.process]!
            let base = 64 * entry.slot
            answers[entry.process].threads[entry.caller.tid] = ThreadAnswers(
                alternateStack: AlternateStack(base: slots.readLE(UInt64.self, at: base), flags: slots.readLE(Int32.self, at: base + 8),
                                               size: slots.readLE(UInt64.self, at: base + 16)),
                clearChildTID: slots.readLE(UInt64.self, at: base + 32),
                parentDeathSignal: slots.readLE(Int32.self, at: base + 40))
        }
        if signalsAndBrk {
            let found = try signalActionsAndBrk(mains, scratches: scratches, statuses: processes.map(\.status))
            for index in answers.indices { (answers[index].actions, answers[index].brk) = found[index] }
        }
        return answers
    }

    /// Asks each caller's process for each caught (and SIGCHLD's) disposition and its current
    /// brk, all processes at once (one round per signal number); ignored signals come from the
    /// SigIgn mask. `scratches[i]` is 32 writable bytes in the i-th process.
    private static func signalActionsAndBrk(_ callers: [RemoteSyscaller], scratches: [UInt64], statuses: [[String: String]])
        throws -> [([SignalAction], UInt64)] {
        let caught = statuses.map { UInt64($0["SigCgt"] ?? "0", radix: 16) ?? 0 }
        let ignored = statuses.map { UInt64($0["SigIgn"] ?? "0", radix: 16) ?? 0 }
        var actions = [[SignalAction]](repeating: [], count: callers.count)
        for signal in Int32(1)...64 where signal != SIGKILL && signal != SIGSTOP {
            let bit = UInt64(1) << UInt64(signal - 1)
            let asking = callers.indices.filter { caught[$0] & bit != 0 || signal == SIGCHLD }
            let results = try RemoteSyscaller.callInEach(asking.map { callers[$0] }, .rtSigaction) { [UInt64(signal), 0, scratches[asking[$0]], 8] }
            for (slot, index) in asking.enumerated() {
                if results[slot] < 0 {
                    throw RemoteCallError(call: "rtSigaction (signal \(signal))", tid: callers[index].tid, detail: String(cString: strerror(Int32(-results[slot]))))
                }
                let raw = try RemoteMemory(pid: callers[index].tid).read(scratches[index], count: 32)
                let action = SignalAction(signal: signal, handler: raw.readLE(UInt64.self, at: 0),
                                          flags: raw.readLE(UInt64.self, at: 8), restorer: raw.readLE(UInt64.self, at: 16),
                                          mask: raw.readLE(UInt64.self, at: 24))
                if action.handler != 0 || action.flags != 0 || action.mask != 0 { actions[index].append(action) }
            }
            for index in callers.indices where !asking.contains(index) && ignored[index] & bit != 0 {
                actions[index].append(SignalAction(signal: signal, handler: 1, flags: 0, restorer: 0, mask: 0))
            }
        }
        let breaks = try RemoteSyscaller.callInEach(callers, .brk) { _ in [0] }
        return callers.indices.map { (actions[$0], UInt64(bitPattern: breaks[$0])) }
    }

    /// Fills in what `captureAll(fromClone: true)` left out — signal dispositions, the brk, and
    /// the process record's other copied parts — from `clones[i]` for `states[i]`: the
    /// never-running clones, whose copies are their processes' at the freeze, or (when no clone
    /// could be made) the still-frozen processes themselves. Dispositions and brk are asked in
    /// all of them at once, through a scratch page mapped and unmapped in each.
    static func completeFromClones(_ states: inout [CapturedState], clones: [pid_t], tracer: Tracer) throws {
        var statuses: [[String: String]] = []
        for (index, clone) in clones.enumerated() {
            try completeProcessRecord(&states[index].process, from: clone)
            statuses.append(try ProcFS.status("/proc/\(clone)/status"))
        }
        var callers: [RemoteSyscaller] = []
        for (index, clone) in clones.enumerated() {
            callers.append(try RemoteSyscaller(tracer: tracer, tid: clone, syscallInstruction: states[index].syscallInstruction))
        }
        var scratches: [UInt64] = []
        defer {
            if !scratches.isEmpty {
                _ = try? RemoteSyscaller.callInEach(Array(callers.prefix(scratches.count)), .munmap) { [scratches[$0], 4096] }
            }
            for caller in callers { try? caller.finish() }
        }
        let mapped = try RemoteSyscaller.callInEach(callers, .mmap) { _ in
            [0, 4096, UInt64(PROT_READ | PROT_WRITE), UInt64(MAP_PRIVATE | MAP_ANONYMOUS), UInt64.max, 0]
        }
        for (index, result) in mapped.enumerated() {
            if result < 0 && result > -4096 {
                throw RemoteCallError(call: "mmap (scratch page)", tid: callers[index].tid, detail: String(cString: strerror(Int32(-result))))
            }
            scratches.append(UInt64(bitPattern: result))
        }
        let found = try signalActionsAndBrk(callers, scratches: scratches, statuses: statuses)
        for index in states.indices {
            states[index].process.signalActions = found[index].0
            states[index].process.memoryLayout.brk = found[index].1
        }
    }

    /// The frozen process's mappings with their VmFlags, reusing `earlier` when nothing changed.
    private static func currentMappings(_ pid: pid_t, earlier: [ProcFS.MapEntry]?) throws -> [ProcFS.MapEntry] {
        guard let earlier else { return try ProcFS.mappings(pid) }
        var current = try ProcFS.mapEntries(pid)
        // Usually nothing changed: the same entries in the same order.
        if current.count == earlier.count {
            var same = true
            for index in current.indices {
                var flagged = current[index]
                flagged.vmFlags = earlier[index].vmFlags
                if flagged != earlier[index] { same = false; break }
                current[index] = flagged
            }
            if same { return current }
        }
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

    /// The parts of the process record a clone would not have as they were at the freeze: the
    /// working directory and umask (shared with a CLONE_FS clone), credentials, the process-wide
    /// signal queue, the start time, the time of the freeze.
    private static func frozenProcessRecord(_ frozen: FrozenProcess, status: [String: String]) throws -> ProcessRecord {
        let pid = frozen.pid
        func ids(_ key: String) -> [UInt32] { (status[key] ?? "").split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { UInt32($0) } }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let stat = try ProcFS.stat(pid)
        let empty = MemoryLayoutRecord(startCode: 0, endCode: 0, startData: 0, endData: 0, startBrk: 0, brk: 0, startStack: 0,
                                       argStart: 0, argEnd: 0, envStart: 0, envEnd: 0)
        return ProcessRecord(
            pid: pid, name: "", commandLine: [], executable: "", executableIdentity: nil,
            workingDirectory: try readLink("/proc/\(pid)/cwd"),
            umask: UInt32(status["Umask"] ?? "22", radix: 8) ?? 0o22,
            personality: 0,
            credentials: Credentials(uids: ids("Uid"), gids: ids("Gid"), groups: ids("Groups")),
            limits: [], memoryLayout: empty, auxiliaryVector: [], signalActions: [],
            sharedPendingSignals: try frozen.tracer.pendingSignals(pid, shared: true),
            kernelRelease: "",
            snapshotTimeNanoseconds: Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec),
            startTime: UInt64(stat[22] ?? "0") ?? 0,
            bootID: currentBootID())
    }

    /// The parts of the process record that a fork copies, read from `source`: the process
    /// itself, or its copy-on-write clone. The brk is not here (`askSignalsAndBrk`).
    static func completeProcessRecord(_ record: inout ProcessRecord, from source: pid_t) throws {
        let stat = try ProcFS.stat(source)
        func field(_ number: Int) -> UInt64 { UInt64(stat[number] ?? "0") ?? 0 }
        let brk = record.memoryLayout.brk
        record.memoryLayout = MemoryLayoutRecord(
            startCode: field(26), endCode: field(27), startData: field(45), endData: field(46),
            startBrk: field(47), brk: brk, startStack: field(28), argStart: field(48), argEnd: field(49),
            envStart: field(50), envEnd: field(51))
        let auxvBytes = try ProcFS.auxiliaryVector(source)
        var auxv: [UInt64] = []
        for index in stride(from: 0, to: auxvBytes.count - 7, by: 8) { auxv.append(auxvBytes.readLE(UInt64.self, at: index)) }
        record.auxiliaryVector = auxv
        record.limits = try ProcFS.limits(source)
        let cmdline = (try? readTextFile("/proc/\(source)/cmdline")) ?? ""
        record.commandLine = cmdline.split(separator: "\0", omittingEmptySubsequences: false).dropLast().map(String.init)
        let executable = try readLink("/proc/\(source)/exe")
        if executable.hasSuffix(" (deleted)") {
            throw StasisError.unsupported(pid: record.pid, what: "its executable \(executable) was deleted")
        }
        record.executable = executable
        record.executableIdentity = try? FileIdentity.of("/proc/\(source)/exe")
        record.name = (try? readTextFile("/proc/\(source)/comm"))?.trimmingCharacters() ?? ""
        record.personality = UInt32((try? readTextFile("/proc/\(source)/personality"))?.trimmingCharacters() ?? "0", radix: 16) ?? 0
        var utsname = utsname()
        uname(&utsname)
        record.kernelRelease = withUnsafeBytes(of: utsname.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
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
func currentBootID() -> String? { bootID }

private let bootID = (try? readTextFile("/proc/sys/kernel/random/boot_id"))?.trimmingCharacters()
