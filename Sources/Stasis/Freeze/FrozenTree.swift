import Glibc

/// Every process of the tree under one PID, each held frozen by the tracer thread, and the
/// zombies among them.
///
/// How: processes are frozen parents first (`FrozenProcess.freeze`, all threads of one process at
/// once), and a process's children are listed (from /proc/PID/task/*/children) only once it is
/// frozen, so its list can no longer grow; a child that is not frozen yet may still fork, but its
/// children are found when it is. A final pass lists the children of every frozen process again
/// (orphans of an exiting process are re-parented to a subreaper or a namespace init that may
/// have been listed already) until nothing new turns up. A process that forks during the freeze
/// has its fork either completed (the child is found) or restarted after the release
/// (-ERESTARTNOINTR, re-issued); one that exits becomes a zombie of a frozen parent, recorded as one.
///
/// Guarantees: `freeze` returns with every process of the tree stopped, or releases everything it
/// stopped and throws, naming the PID that could not be frozen. `release`, `releaseStopped` and
/// `kill` act on every process; the zombies are left to their (restored or original) parents.
public final class FrozenTree {
    public let root: pid_t
    let tracer: Tracer
    /// The frozen processes, parents before children, the root first.
    public private(set) var processes: [FrozenProcess] = []
    /// Every member, zombies included, in the same order as they were found.
    public private(set) var members: [TreeMember] = []
    /// When the first thread of the tree was stopped (CLOCK_MONOTONIC ns).
    public var frozenAt: UInt64 { processes.first?.frozenAt ?? 0 }

    private var pidNamespace = false

    private init(root: pid_t, tracer: Tracer) {
        self.root = root
        self.tracer = tracer
    }

    /// Freezes `root` and all its descendants.
    /// Freezes `root` and all its descendants; with `pidNamespace`, each member's PID inside
    /// the namespace is recorded too.
    public static func freeze(root: pid_t, tracer: Tracer, pidNamespace: Bool = false) throws -> FrozenTree {
        let tree = FrozenTree(root: root, tracer: tracer)
        tree.pidNamespace = pidNamespace
        do {
            try tree.freezeAll()
        } catch {
            tree.releaseAfterFailure()
            throw error
        }
        return tree
    }

    private func freezeAll() throws {
        let first = try FrozenProcess.freeze(pid: root, tracer: tracer)
        processes.append(first)
        members.append(try member(root, isRoot: true, zombie: nil))
        var known: Set<pid_t> = [root]
        var listed = 0
        while true {
            // Children of processes frozen since the last pass, then a pass over all of them.
            var found: [pid_t] = []
            for process in processes[listed...] { found += try Self.children(of: process.pid) }
            listed = processes.count
            if found.allSatisfy({ known.contains($0) }) {
                for process in processes { found += try Self.children(of: process.pid) }
                if found.allSatisfy({ known.contains($0) }) { return }
            }
            // Every new child is asked to stop before any is waited for: their stops overlap.
            // A begun process is released only once its threads have stopped (a seized thread
            // can be detached only in a stop): on failure, the rest are completed, then released.
            var begun: [FrozenProcess] = []
            func abandon(_ rest: ArraySlice<FrozenProcess>) {
                for other in rest {
                    try? other.completeFreeze()
                    try? other.release()
                }
            }
            for child in found where known.insert(child).inserted {
                do {
                    if let process = try begin(child) { begun.append(process) }
                } catch {
                    abandon(begun[...])
                    throw error
                }
            }
            for (index, process) in begun.enumerated() {
                do {
                    try process.completeFreeze()
                } catch {
                    abandon(begun[(index + 1)...])
                    throw error
                }
                processes.append(process)
                members.append(try member(process.pid, isRoot: false, zombie: nil))
            }
        }
    }

    /// Begins freezing a newly found child (see `FrozenProcess.beginFreeze`), or records it as
    /// a zombie and returns nil.
    private func begin(_ pid: pid_t) throws -> FrozenProcess? {
        if let zombie = Self.zombieStatus(pid) {
            members.append(try member(pid, isRoot: false, zombie: zombie))
            return nil
        }
        // A child caught in the middle of exiting (or of an exec) refuses to be seized for a
        // moment (EPERM); its parent is frozen, so it soon is a zombie, gone, or traceable.
        var attempts = 0
        while true {
            do {
                return try FrozenProcess.beginFreeze(pid: pid, tracer: tracer)
            } catch let error as StasisError {
                if case .noSuchProcess = error { return nil }
                guard case .notTraceable = error else { throw error }
                if let zombie = Self.zombieStatus(pid) {
                    members.append(try member(pid, isRoot: false, zombie: zombie))
                    return nil
                }
                if !pathExists("/proc/\(pid)") { return nil }
                let tracerPID = (try? ProcFS.status("/proc/\(pid)/status"))?["TracerPid"] ?? "0"
                attempts += 1
                if tracerPID != "0" || attempts > 200 { throw error }
                usleep(1000)
            }
        }
    }

    /// The child processes of every thread of `pid`.
    static func children(of pid: pid_t) throws -> [pid_t] {
        var result: [pid_t] = []
        for tid in (try? ProcFS.threadIDs(pid)) ?? [] {
            guard let text = try? readTextFile("/proc/\(pid)/task/\(tid)/children") else { continue }
            result += text.split(separator: " ").compactMap { pid_t($0.trimmingCharacters()) }
        }
        return result
    }

    /// The wait status of `pid` if it is a zombie (/proc/PID/stat field 52, exit_code).
    static func zombieStatus(_ pid: pid_t) -> ZombieRecord? {
        guard let stat = try? ProcFS.stat(pid), stat[3] == "Z", let code = stat[52].flatMap({ Int32($0) }) else { return nil }
        return ZombieRecord(waitStatus: code)
    }

    private func member(_ pid: pid_t, isRoot: Bool, zombie: ZombieRecord?) throws -> TreeMember {
        let stat: [Int: String]
        do { stat = try ProcFS.stat(pid) } catch { throw StasisError.noSuchProcess(pid: pid) }
        func field(_ number: Int) -> Int32 { Int32(stat[number] ?? "0") ?? 0 }
        return TreeMember(pid: pid, parent: isRoot ? 0 : field(4), processGroup: field(5), session: field(6),
                          namespacePID: pidNamespace ? TreeNamespace.namespacePID(pid) : nil, zombie: zombie)
    }

    /// Lets every process run on from where it was frozen.
    public func release() throws {
        var firstError: Error?
        for process in processes.reversed() {
            do { try process.release() } catch { if firstError == nil { firstError = error } }
        }
        if let firstError { throw firstError }
    }

    private func releaseAfterFailure() {
        for process in processes.reversed() { try? process.release() }
    }

    /// Leaves every process stopped (SIGSTOP) and detached.
    public func releaseStopped() throws {
        for process in processes { _ = Glibc.kill(process.pid, SIGSTOP) }
        try release()
    }

    /// Kills every process and returns once all their PIDs are free again.
    public func kill(timeoutSeconds: Double = 30) throws {
        for process in processes { _ = Glibc.kill(process.pid, SIGKILL) }
        for process in processes.reversed() { try process.kill(timeoutSeconds: timeoutSeconds) }
    }
}
