import CStasis
import Glibc

/// A copy-on-write twin of a frozen process's memory, from which a live snapshot reads its
/// pages while the process runs on.
///
/// How: while the process is frozen, one of its threads is made to call
/// `clone(CLONE_FILES | CLONE_FS, exit signal 0)`. The kernel gives the new child a copy of
/// the address space that shares every page with the process until one side writes it; from
/// then on each side has its own copy. The child never runs: it is auto-attached through
/// PTRACE_O_TRACECLONE and held in a ptrace-stop, and Stasis only reads its memory (and, to
/// give memory back early, injects `madvise(MADV_DONTNEED)` into it for ranges already
/// streamed).
///
/// Guarantees:
/// - Pages read from the clone are the process's pages at the instant of the clone, whatever
///   the process writes, unmaps or discards afterwards.
/// - The clone holds no extra reference to any open file (it shares the process's file table),
///   so pipes still see end-of-file and locks go away as before; it has exit signal 0, so the
///   process gets no SIGCHLD and `wait` without `__WALL` never reports it; it is the first
///   candidate of the OOM killer (oom_score_adj 1000).
/// - It is traced with PTRACE_O_EXITKILL: if the tracer dies, the kernel kills it.
/// - `destroy` kills it and reaps its zombie from inside the process (a `wait4` injected into
///   one briefly stopped thread), so no child, zombie, register or signal change remains.
///
/// Not kept in the clone (so read from the process during the freeze instead): mappings marked
/// MADV_DONTFORK (absent in a child) and MADV_WIPEONFORK (empty in a child).
final class CopyOnWriteClone {
    /// The clone's PID.
    let pid: pid_t
    /// The process it was cloned from.
    let parent: pid_t
    private let tracer: Tracer
    private let syscallInstruction: UInt64
    private var syscaller: RemoteSyscaller?
    private var pagemap: FileHandle?
    private var destroyed = false
    /// The clone's PID as its parent sees it (for the wait4 that reaps it there).
    private var localPID: pid_t = 0
    /// Pages the process wrote after the clone that the clone therefore had to keep (counted
    /// as each range is given back).
    private(set) var preservedPages: UInt64 = 0

    private init(pid: pid_t, parent: pid_t, tracer: Tracer, syscallInstruction: UInt64) {
        self.pid = pid
        self.parent = parent
        self.tracer = tracer
        self.syscallInstruction = syscallInstruction
    }

    static let cloneFiles: UInt64 = 0x400, cloneFS: UInt64 = 0x200

    /// The process could not be cloned (a pids limit, no memory for page tables); nothing was
    /// changed in it.
    struct Unavailable: Error, CustomStringConvertible {
        var pid: pid_t
        var reason: String
        var description: String { "PID \(pid) could not be cloned for a copy-on-write snapshot: \(reason)" }
    }
    static let waitAll: UInt64 = 0x4000_0000  // __WALL

    /// Clones the frozen process. Must run on the tracer thread that froze it.
    static func create(from frozen: FrozenProcess, syscallInstruction: UInt64) throws -> CopyOnWriteClone {
        let caller = try RemoteSyscaller(tracer: frozen.tracer, tid: frozen.pid, syscallInstruction: syscallInstruction)
        // The child's stack pointer is set to an address that is never mapped (below
        // mmap_min_addr): should the child ever be let run (the tracer killed before
        // PTRACE_O_EXITKILL is set), its first stack access faults and it dies.
        let result: Int64
        do {
            result = try caller.callRaw(.clone, [cloneFiles | cloneFS, 8, 0, 0, 0])
            try caller.finish()
        } catch {
            try? caller.finish()
            throw error
        }
        if result < 0 {
            throw Unavailable(pid: frozen.pid, reason: String(cString: strerror(Int32(-result))))
        }
        // The clone's PID as Stasis sees it (the event message) may differ from the one the
        // process sees (the result), inside a PID namespace.
        guard let child = caller.createdTasks.last else {
            throw Unavailable(pid: frozen.pid, reason: "the kernel reported no new task for clone \(result)")
        }
        let clone = CopyOnWriteClone(pid: child, parent: frozen.pid, tracer: frozen.tracer, syscallInstruction: syscallInstruction)
        clone.localPID = pid_t(result)
        do {
            // The auto-attached child reports a PTRACE_EVENT_STOP before it runs anything.
            while true {
                let event = try frozen.tracer.waitForEvent(child)
                guard case let .stopped(signal, eventCode) = event else {
                    throw StasisError.notTraceable(pid: frozen.pid, reason: "its copy-on-write clone \(child) ended: \(event)")
                }
                if eventCode == Int32(STASIS_PTRACE_EVENT_STOP) || signal == SIGSTOP { break }
                try frozen.tracer.resume(child)
            }
            try frozen.tracer.setOptions(child, Int32(STASIS_PTRACE_O_TRACESYSGOOD | STASIS_PTRACE_O_EXITKILL))
            try? writeTextFile("/proc/\(child)/oom_score_adj", "1000")
        } catch {
            clone.destroy(reapInParent: true)
            throw error
        }
        return clone
    }

    /// Streamed blocks not given back yet, and how many pages they cover.
    private var pending: [[PageRun]] = []
    private var pendingPages: UInt64 = 0
    /// Give back once this many streamed pages are pending (4 MiB): a small process's clone
    /// costs no injected call for it at all (`finishStream` and `destroy` end it instead).
    static let giveBackThreshold: UInt64 = 1024

    /// Records that the pages in `runs` (all in one mapping, ascending) have been streamed. Once
    /// 4 MiB are pending, gives them back: counts those the process had already written since
    /// the clone (they exist only in the clone), then discards each block's range in the clone,
    /// so that the memory is freed and the process's next writes there need no copy.
    func giveBack(_ runs: [PageRun]) throws {
        guard !runs.isEmpty else { return }
        pending.append(runs)
        pendingPages += runs.reduce(0) { $0 + $1.pages }
        guard pendingPages >= Self.giveBackThreshold else { return }
        if syscaller == nil {
            syscaller = try RemoteSyscaller(tracer: tracer, tid: pid, syscallInstruction: syscallInstruction)
        }
        for block in pending {
            preservedPages += try countExclusivePages(block)
            let first = block.first!, last = block.last!
            let end = last.address + last.pages * 4096
            try syscaller!.call(.madvise, first.address, end - first.address, 4 /* MADV_DONTNEED */,
                                what: "give back 0x\(String(first.address, radix: 16))-0x\(String(end, radix: 16)) of clone \(pid)")
        }
        pending.removeAll(keepingCapacity: true)
        pendingPages = 0
    }

    /// After the clone's last block: counts the pending blocks' exclusive pages (the clone is
    /// destroyed next, which frees them).
    func finishStream() throws {
        for block in pending { preservedPages += try countExclusivePages(block) }
        pending.removeAll()
        pendingPages = 0
    }

    /// Pages in `runs` that the clone maps exclusively (pagemap bit 56) and that are anonymous
    /// (bit 61 clear): the process has replaced its copy of them since the clone.
    private func countExclusivePages(_ runs: [PageRun]) throws -> UInt64 {
        if pagemap == nil { pagemap = try FileHandle.open("/proc/\(pid)/pagemap", O_RDONLY) }
        var count: UInt64 = 0
        var entries = [UInt64](repeating: 0, count: ImageFormat.maxPagesPerBlock)
        for run in runs {
            let pages = Int(run.pages)
            let got = try entries.withUnsafeMutableBytes { buffer in
                try pagemap!.pread(into: buffer.baseAddress!, count: pages * 8, offset: run.address / 4096 * 8)
            }
            for index in 0..<(got / 8) {
                let entry = entries[index]
                if entry & (1 << 63) != 0 && entry & (1 << 56) != 0 && entry & (1 << 61) == 0 { count += 1 }
            }
        }
        return count
    }

    /// Bytes of memory the clone holds on its own right now: pages the process has written
    /// since the clone (Private_Dirty) and the clone's page tables.
    func extraBytes() -> UInt64 {
        var total: UInt64 = 0
        if let rollup = try? readTextFile("/proc/\(pid)/smaps_rollup") {
            for line in rollup.split(separator: "\n") where line.hasPrefix("Private_Dirty:") {
                total += kilobytes(line) * 1024
            }
        }
        if let status = try? ProcFS.status("/proc/\(pid)/status"), let tables = status["VmPTE"] {
            total += (UInt64(tables.split(separator: " ").first ?? "0") ?? 0) * 1024
        }
        return total
    }

    private func kilobytes(_ line: Substring) -> UInt64 {
        UInt64(line.split(separator: " ").dropFirst().first ?? "0") ?? 0
    }

    /// Kills the clone and, if `reapInParent` and the process still exists, reaps the clone's
    /// zombie from inside the process. Returns how long (ns) a thread of the process was
    /// stopped for that. Safe to call more than once. Must run on the tracer thread.
    @discardableResult
    func destroy(reapInParent: Bool) -> UInt64 {
        guard !destroyed else { return 0 }
        destroyed = true
        syscaller = nil
        pagemap = nil
        _ = Glibc.kill(pid, SIGKILL)
        while true {
            guard let event = try? tracer.waitForEvent(pid) else { break }
            if case .stopped = event { try? tracer.resume(pid); continue }
            break
        }
        guard reapInParent, pathExists("/proc/\(parent)") else { return 0 }
        // The zombie now belongs to the process (its real parent), which is not told (exit
        // signal 0). Reap it there: stop one thread for one injected wait4.
        // Found before the stop: the process may have exec'd a new image (and [vdso]).
        guard let entries = try? ProcFS.mapEntries(parent), let vdso = entries.first(where: { $0.name == "[vdso]" }),
              let instruction = try? findSyscallInstruction(pid: parent, in: vdso) else { return 0 }
        guard let held = try? FrozenProcess.freeze(pid: parent, tracer: tracer, onlyOneThread: true),
              let tid = held.threads.first else { return 0 }
        if let caller = try? RemoteSyscaller(tracer: tracer, tid: tid, syscallInstruction: instruction) {
            _ = try? caller.callRaw(.wait4, [UInt64(localPID), 0, Self.waitAll, 0])
            try? caller.finish()
        }
        try? held.release()
        return monotonicNanoseconds() - held.frozenAt
    }
}
