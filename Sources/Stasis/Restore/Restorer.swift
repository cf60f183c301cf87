import CStasis
import Glibc

/// Measurements of one restore, written by `--stats` as JSON.
public struct RestoreStats: Codable, Sendable {
    /// From opening the image to every thread of the restored process running, ms.
    public var restore_ms: Double
    /// Time spent reading and writing page data, ms.
    public var pages_ms: Double
    public var pages: UInt64
    /// Threads of all processes.
    public var threads: Int
    /// The root's PID as the caller sees it.
    public var pid: Int32
    /// Processes restored (zombies included).
    public var processes: Int?
}

/// What `restore` produced.
public struct RestoredWorkload: Sendable {
    /// The root process's PID, as the caller (Stasis's PID namespace) sees it.
    public var pid: pid_t
    /// Stasis's own child, to wait for: the root, or the init of the PID namespace it was
    /// restored into (which exits as the root does).
    public var waitPID: pid_t
    public var stats: RestoreStats
    /// The cgroup the processes were placed in, if one was made.
    public var cgroup: StasisCgroup?
}

/// Where a restored tree's processes get their PIDs.
public enum RestoreNamespace: Sendable {
    /// A new PID namespace for images of one (`stasis run --pidns`), Stasis's own otherwise.
    case asImaged
    /// Always a new PID (and mount) namespace, with the image's PIDs inside it (`--pidns`).
    case new
}

/// Recreates a process tree from an image: same PIDs and TIDs (in Stasis's PID namespace, or
/// inside a new one), same parents, sessions and process groups, zombies, memory at the same
/// addresses, the open files, pipes and shared memory they shared, signal state and registers,
/// every process resuming at the instruction where it was frozen.
///
/// Guarantees: before anything is created, all the image's metadata is read and checked, the
/// PIDs/TIDs are checked free (outside a new namespace) and every mapped file is checked to be
/// the same file as at snapshot time. If anything fails after a process was created, every
/// process made is killed and its cgroup removed: nothing is left behind, half-built or otherwise.
public enum Restorer {
    public static func restore(from source: FileHandle, tracerThread: TracerThread, useCgroup: Bool = true,
                               namespace: RestoreNamespace = .asImaged) throws -> RestoredWorkload {
        let start = monotonicNanoseconds()
        let reader = try ImageReader(source: source)
        // Embedded `--fs` contents are staged beside their directories as they stream in.
        let embedded = EmbeddedFilesReceiver()
        let metadata = try TreeMetadata.read(from: reader) { tree, item in try embedded.receive(tree, item, reader: reader) }
        let root = metadata.processes[0].process
        let newNamespace = namespace == .new || metadata.tree.pidNamespace
        // `stasis snapshot --kill -o - | stasis restore -`: the originals are still alive while
        // their image streams in, and die only once the stream is complete. Keep the rest of
        // the stream in an unnamed temporary file until then, and restore from it.
        var rest: ImageReader = reader
        var spool: FileHandle?
        if source.isPipe, !newNamespace, originalIsRunning(root) {
            (rest, spool) = try spoolRest(of: reader)
            for member in metadata.tree.members {
                try waitForPIDToBeFree(member.pid, timeoutSeconds: 10, what: "the original process \(member.pid), whose image is being restored,")
            }
        }
        _ = spool
        let kept = metadata.tree.filesystems ?? []
        try FilesystemSnapshots.checkKept(kept)
        try preflightIDs(metadata, newNamespace: newNamespace)
        // The `--fs` directories go back to the instant of the freeze before anything runs; the
        // files in them are then the kept ones (new inodes, the same sizes and times).
        for record in kept where record.embedded != true { try FilesystemSnapshots.rollBack(record) }
        if kept.contains(where: { $0.embedded == true }) { try embedded.install() }
        for process in metadata.processes { try preflight(process, rolledBack: kept) }
        let cgroup = useCgroup && StasisCgroup.root != nil ? try StasisCgroup.create(prefix: "\(root.pid)") : nil
        do {
            let cgroupHandle = try cgroup?.open()
            let result = try tracerThread.perform { tracer in
                try TreeBuilder(metadata: metadata, tracer: tracer, newNamespace: newNamespace,
                                cgroupFD: cgroupHandle?.rawValue ?? -1).build(pages: rest)
            }
            let stats = RestoreStats(restore_ms: milliseconds(monotonicNanoseconds() - start), pages_ms: result.pagesMilliseconds,
                                     pages: rest.trailer?.pages ?? 0, threads: metadata.processes.reduce(0) { $0 + $1.threads.count },
                                     pid: result.rootPID, processes: metadata.tree.members.count)
            return RestoredWorkload(pid: result.rootPID, waitPID: result.topPID, stats: stats, cgroup: cgroup)
        } catch {
            cgroup?.removeIfEmpty()
            throw error
        }
    }

    /// Whether the process the image was taken from is alive (same PID, start time and boot).
    static func originalIsRunning(_ record: ProcessRecord) -> Bool {
        guard let startTime = record.startTime, let bootID = record.bootID, bootID == currentBootID(),
              let stat = try? ProcFS.stat(record.pid), let now = stat[22].flatMap({ UInt64($0) })
        else { return false }
        return now == startTime
    }

    /// Copies the rest of `reader` (object data and page blocks) into an unnamed temporary file
    /// and returns a reader positioned after that file's header.
    static func spoolRest(of reader: ImageReader) throws -> (ImageReader, FileHandle) {
        let directory = getenv("TMPDIR").map { String(cString: $0) } ?? "/var/tmp"
        let spool = try FileHandle.open(directory, O_RDWR | 0o20200000 /* O_TMPFILE */, permissions: 0o600)
        let writer = try ImageWriter(sink: spool)
        while let item = try reader.next() {
            switch item {
            case let .pages(runs, data): try writer.writePageBlock(runs: runs, data: data.baseAddress!)
            case let .record(kind, _) where kind == .end: break
            case let .record(kind, payload) where kind == .objectData: try writer.writeBinaryRecord(kind, payload)
            case let .record(kind, payload) where kind == .processPages: try writer.writeBinaryRecord(kind, payload)
            case let .record(kind, _): throw reader.malformed("unexpected \(kind) record among page blocks", kind: kind)
            }
        }
        try writer.finish()
        _ = try checked(Int(lseek(spool.rawValue, 0, SEEK_SET)).negatedErrnoIfFailed(), "lseek", "spool file")
        return (try ImageReader(source: spool), spool)
    }

    /// Whether the task holding `tid` is on its way out (a zombie, or already unreadable) and
    /// disappears within a few seconds — e.g. the original of a `--kill` snapshot whose parent
    /// has not reaped it yet.
    static func vanishesSoon(_ tid: pid_t) -> Bool {
        let state = (try? ProcFS.status("/proc/\(tid)/status"))?["State"] ?? "X"
        guard state.hasPrefix("Z") || state.hasPrefix("X") else { return false }
        return (try? waitForPIDToBeFree(tid, timeoutSeconds: 5)) != nil
    }

    /// Checks, before creating anything, that the restore can succeed as far as can be known.
    /// Outside a new namespace, every PID and TID must be free.
    static func preflightIDs(_ tree: TreeMetadata, newNamespace: Bool) throws {
        if !newNamespace {
            let ids = tree.tree.members.map(\.pid) + tree.processes.flatMap { $0.threads.map(\.tid) }
            for tid in Set(ids).sorted() where pathExists("/proc/\(tid)") && !vanishesSoon(tid) {
                throw StasisError.pidTaken(pid: tid, by: describeProcess(tid))
            }
        }
    }

    /// Every mapped file and the executable must be the file of the snapshot (in a rolled-back
    /// `--fs` directory: the same size and modification time); every regular fd path must exist.
    static func preflight(_ metadata: ImageMetadata, rolledBack: [FilesystemSnapshotRecord] = []) throws {
        var checked = Set<String>()
        for mapping in metadata.mappings {
            guard let identity = mapping.fileIdentity, checked.insert(mapping.name).inserted else { continue }
            try checkSameFile(mapping.name, identity, sameInode: !FilesystemSnapshots.isUnder(mapping.name, rolledBack))
        }
        if let identity = metadata.process.executableIdentity, checked.insert(metadata.process.executable).inserted {
            try checkSameFile(metadata.process.executable, identity,
                              sameInode: !FilesystemSnapshots.isUnder(metadata.process.executable, rolledBack))
        }
        for record in metadata.files.descriptors where record.kind == .regular && checked.insert(record.path).inserted {
            guard pathExists(record.path) else {
                throw StasisError.fileChanged(path: record.path, reason: "(fd \(record.fd) of PID \(metadata.process.pid)) no longer exists")
            }
            // A file the process had open must still be the file of the snapshot: resuming on
            // top of changed data (a log that grew after a live snapshot's freeze, records
            // appended since) would make the process's memory and the file disagree.
            // `snapshot --fs` keeps such files with the memory; `--stop-the-world --kill` keeps
            // the process from writing after the freeze.
            if let identity = record.identity {
                do {
                    try checkSameFile(record.path, identity, sameInode: !FilesystemSnapshots.isUnder(record.path, rolledBack), what: "is open")
                } catch let error as StasisError {
                    throw error.explainingOpenFile(fd: record.fd, pid: metadata.process.pid)
                }
            }
        }
    }

    static func checkSameFile(_ path: String, _ identity: FileIdentity, sameInode: Bool = true, what: String = "is mapped") throws {
        let now: FileIdentity
        do { now = try FileIdentity.of(path) } catch {
            throw StasisError.fileChanged(path: path, reason: "\(what) by the process but cannot be opened now: \(error)")
        }
        if sameInode && (now.device != identity.device || now.inode != identity.inode) {
            throw StasisError.fileChanged(path: path, reason: "was replaced by another file since the snapshot (inode \(identity.inode) → \(now.inode))")
        }
        if now.size != identity.size || now.modifiedNanoseconds != identity.modifiedNanoseconds {
            throw StasisError.fileChanged(path: path, reason: "was modified since the snapshot (size \(identity.size) → \(now.size), mtime changed: \(now.modifiedNanoseconds != identity.modifiedNanoseconds))")
        }
    }

    static func restoreLimits(_ limits: [ResourceLimit], pid: pid_t) throws {
        for limit in limits {
            var value = rlimit(rlim_cur: rlim_t(limit.soft), rlim_max: rlim_t(limit.hard))
            let result = stasis_prlimit(pid, limit.resource, &value, nil)
            if result == -Int(EPERM) {
                // Raising a hard limit needs CAP_SYS_RESOURCE; keep ours but honour the soft limit.
                var current = rlimit()
                _ = stasis_prlimit(pid, limit.resource, nil, &current)
                value = rlimit(rlim_cur: min(rlim_t(limit.soft), current.rlim_max), rlim_max: current.rlim_max)
                _ = try checked(stasis_prlimit(pid, limit.resource, &value, nil), "prlimit", "pid \(pid) resource \(limit.resource)")
            } else {
                _ = try checked(result, "prlimit", "pid \(pid) resource \(limit.resource)")
            }
        }
    }

    /// Queues the recorded pending signals; `localTID` gives each thread's TID as the process sees it.
    static func queuePendingSignals(_ metadata: ImageMetadata, caller: RemoteSyscaller, scratch: RemoteScratch, pid: pid_t,
                                    localTID: (ThreadRecord) -> pid_t) throws {
        for info in metadata.process.sharedPendingSignals {
            scratch.reset()
            let signal = info.readLE(Int32.self, at: 0)
            try caller.call(.rtSigqueueinfo, UInt64(pid), UInt64(signal), try scratch.place(info), what: "queue signal \(signal)")
        }
        for thread in metadata.threads {
            for info in thread.pendingSignals {
                scratch.reset()
                let signal = info.readLE(Int32.self, at: 0)
                let tid = localTID(thread)
                try caller.call(.rtTgsigqueueinfo, UInt64(pid), UInt64(tid), UInt64(signal), try scratch.place(info),
                                what: "queue signal \(signal) for tid \(tid)")
            }
        }
    }

    /// setgroups, setresgid, setresuid — last, once nothing needs root any more.
    static func restoreCredentials(_ credentials: Credentials, executor: StubExecutor, scratch: RemoteScratch) throws {
        guard credentials.uids.count >= 3, credentials.gids.count >= 3 else { return }
        scratch.reset()
        var groups: [UInt8] = []
        for group in credentials.groups { groups.appendLE(group) }
        let list = groups.isEmpty ? 0 : try scratch.place(groups)
        try executor.run([
            .init(.setgroups, UInt64(credentials.groups.count), list, what: "setgroups"),
            .init(.setresgid, UInt64(credentials.gids[0]), UInt64(credentials.gids[1]), UInt64(credentials.gids[2]), what: "setresgid"),
            .init(.setresuid, UInt64(credentials.uids[0]), UInt64(credentials.uids[1]), UInt64(credentials.uids[2]), what: "setresuid"),
        ])
    }
}

extension StasisError {
    /// A changed-file refusal about an open fd, with what to do about it.
    func explainingOpenFile(fd: Int32, pid: pid_t) -> StasisError {
        guard case let .fileChanged(path, reason) = self else { return self }
        return .fileChanged(path: path, reason: "(fd \(fd) of PID \(pid)) \(reason); take the snapshot with --fs for its directory, or with --stop-the-world --kill so that nothing is written after the freeze")
    }
}
