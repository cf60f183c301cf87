import CStasis
import Glibc

/// Measurements of one restore, written by `--stats` as JSON.
public struct RestoreStats: Codable, Sendable {
    /// From opening the image to every thread of the restored process running, ms.
    public var restore_ms: Double
    /// Time spent reading and writing page data, ms.
    public var pages_ms: Double
    public var pages: UInt64
    public var threads: Int
    public var pid: Int32
}

/// What `restore` produced.
public struct RestoredWorkload: Sendable {
    public var pid: pid_t
    public var stats: RestoreStats
    /// The cgroup the process was placed in, if one was made.
    public var cgroup: StasisCgroup?
}

/// Recreates a process from an image: same PID and TIDs, same memory at the same addresses,
/// same files, signal state and registers, resuming at the instruction where it was frozen.
///
/// Guarantees: before anything is created, the image's metadata is read and checked, the
/// PIDs/TIDs are checked free and every mapped file is checked to be the same file as at
/// snapshot time. If anything fails after the process was created, it is killed and reaped and
/// its cgroup removed: no process is left behind, half-built or otherwise.
public enum Restorer {
    public static func restore(from source: FileHandle, tracerThread: TracerThread, useCgroup: Bool = true) throws -> RestoredWorkload {
        let start = monotonicNanoseconds()
        let reader = try ImageReader(source: source)
        let metadata = try ImageMetadata.read(from: reader)
        let pid = metadata.process.pid
        // `stasis snapshot --kill -o - | stasis restore -`: the original is still alive while
        // its image streams in, and dies only once the stream is complete. Keep the pages in
        // an unnamed temporary file until then, and restore from it.
        var pages: ImageReader = reader
        var spool: FileHandle?
        if source.isPipe, originalIsRunning(metadata.process) {
            (pages, spool) = try spoolPages(from: reader)
            try waitForPIDToBeFree(pid, timeoutSeconds: 10, what: "the original process \(pid), whose image is being restored,")
        }
        _ = spool
        try preflight(metadata)
        let cgroup = useCgroup && StasisCgroup.root != nil ? try StasisCgroup.create(prefix: "\(pid)") : nil
        do {
            let cgroupHandle = try cgroup?.open()
            let result = try tracerThread.perform { tracer in
                let process = try RestoredProcess.spawn(pid: pid, cgroupFD: cgroupHandle?.rawValue ?? -1, tracer: tracer)
                do {
                    let pagesMilliseconds = try rebuild(process, metadata: metadata, reader: pages)
                    try process.detachAll()
                    return (pagesMilliseconds, pages.trailer?.pages ?? 0)
                } catch {
                    process.abandon()
                    throw error
                }
            }
            let stats = RestoreStats(restore_ms: milliseconds(monotonicNanoseconds() - start), pages_ms: result.0,
                                     pages: result.1, threads: metadata.threads.count, pid: pid)
            return RestoredWorkload(pid: pid, stats: stats, cgroup: cgroup)
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

    /// Copies the remaining page blocks of `reader` into an unnamed temporary file and returns
    /// a reader positioned at its first page block.
    static func spoolPages(from reader: ImageReader) throws -> (ImageReader, FileHandle) {
        let directory = getenv("TMPDIR").map { String(cString: $0) } ?? "/var/tmp"
        let spool = try FileHandle.open(directory, O_RDWR | 0o20200000 /* O_TMPFILE */, permissions: 0o600)
        let writer = try ImageWriter(sink: spool)
        while let item = try reader.next() {
            switch item {
            case let .pages(runs, data): try writer.writePageBlock(runs: runs, data: data.baseAddress!)
            case let .record(kind, _) where kind == .end: break
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
    static func preflight(_ metadata: ImageMetadata) throws {
        for tid in [metadata.process.pid] + metadata.threads.map(\.tid) where pathExists("/proc/\(tid)") && !vanishesSoon(tid) {
            throw StasisError.pidTaken(pid: tid, by: describeProcess(tid))
        }
        var checked = Set<String>()
        for mapping in metadata.mappings {
            guard let identity = mapping.fileIdentity, checked.insert(mapping.name).inserted else { continue }
            try checkSameFile(mapping.name, identity)
        }
        if let identity = metadata.process.executableIdentity, checked.insert(metadata.process.executable).inserted {
            try checkSameFile(metadata.process.executable, identity)
        }
        for record in metadata.files.descriptors where record.kind == .regular && !pathExists(record.path) {
            throw StasisError.fileChanged(path: record.path, reason: "(fd \(record.fd)) no longer exists")
        }
    }

    static func checkSameFile(_ path: String, _ identity: FileIdentity) throws {
        let now: FileIdentity
        do { now = try FileIdentity.of(path) } catch {
            throw StasisError.fileChanged(path: path, reason: "is mapped by the process but cannot be opened now: \(error)")
        }
        if now.device != identity.device || now.inode != identity.inode {
            throw StasisError.fileChanged(path: path, reason: "was replaced by another file since the snapshot (inode \(identity.inode) → \(now.inode))")
        }
        if now.size != identity.size || now.modifiedNanoseconds != identity.modifiedNanoseconds {
            throw StasisError.fileChanged(path: path, reason: "was modified since the snapshot (size \(identity.size) → \(now.size), mtime changed: \(now.modifiedNanoseconds != identity.modifiedNanoseconds))")
        }
    }

    /// Injects the whole image into the stopped stub. Returns the milliseconds spent on pages.
    static func rebuild(_ process: RestoredProcess, metadata: ImageMetadata, reader: ImageReader) throws -> Double {
        let builder = try AddressSpaceBuilder(process: process, metadata: metadata)
        try builder.prepareMappings()
        let pagesStart = monotonicNanoseconds()
        while let item = try reader.next() {
            switch item {
            case let .pages(runs, data):
                try builder.writePages(runs, data: data, reader: reader)
            case let .record(kind, _) where kind == .end:
                break
            case let .record(kind, _):
                throw reader.malformed("unexpected \(kind) record among page blocks", kind: kind)
            }
        }
        let pagesMilliseconds = milliseconds(monotonicNanoseconds() - pagesStart)
        try builder.finishMappings()
        try builder.restoreMemoryLayout()

        let caller = builder.caller
        let scratch = builder.scratch!
        let record = metadata.process
        try FileTableRestore.restore(metadata.files, caller: caller, scratch: scratch, pid: process.pid)
        scratch.reset()
        try caller.call(.chdir, try scratch.place(cString: record.workingDirectory), what: "chdir \(record.workingDirectory)")
        try caller.call(.umask, UInt64(record.umask))
        try caller.call(.personality, UInt64(record.personality))
        try restoreLimits(record.limits, pid: process.pid)
        try restoreSignalActions(record.signalActions, caller: caller, scratch: scratch)

        try ThreadBuilder.createThreads(metadata.threads, process: process, caller: caller, scratch: scratch)
        for thread in metadata.threads {
            let threadCaller = thread.tid == process.pid ? caller
                : try RemoteSyscaller(tracer: process.tracer, tid: thread.tid, syscallInstruction: caller.syscallInstruction)
            try ThreadBuilder.restoreKernelState(thread, caller: threadCaller, scratch: scratch)
        }
        try queuePendingSignals(metadata, caller: caller, scratch: scratch, pid: process.pid)
        try caller.call(.prctl, 1 /* PR_SET_PDEATHSIG */, 0, 0, 0, 0)
        try restoreCredentials(record.credentials, caller: caller, scratch: scratch)
        try caller.call(.munmap, scratch.address, scratch.size, what: "drop the scratch area")
        for thread in metadata.threads { try ThreadBuilder.restoreCPUState(thread, tracer: process.tracer) }
        return pagesMilliseconds
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

    static func restoreSignalActions(_ actions: [SignalAction], caller: RemoteSyscaller, scratch: RemoteScratch) throws {
        // The stub reset every disposition to SIG_DFL; set the ones the process had changed.
        for action in actions {
            scratch.reset()
            let address = try scratch.place(words: [action.handler, action.flags, action.restorer, action.mask])
            try caller.call(.rtSigaction, UInt64(action.signal), address, 0, 8, what: "sigaction \(action.signal)")
        }
    }

    static func queuePendingSignals(_ metadata: ImageMetadata, caller: RemoteSyscaller, scratch: RemoteScratch, pid: pid_t) throws {
        for info in metadata.process.sharedPendingSignals {
            scratch.reset()
            let signal = info.readLE(Int32.self, at: 0)
            try caller.call(.rtSigqueueinfo, UInt64(pid), UInt64(signal), try scratch.place(info), what: "queue signal \(signal)")
        }
        for thread in metadata.threads {
            for info in thread.pendingSignals {
                scratch.reset()
                let signal = info.readLE(Int32.self, at: 0)
                try caller.call(.rtTgsigqueueinfo, UInt64(pid), UInt64(thread.tid), UInt64(signal), try scratch.place(info),
                                what: "queue signal \(signal) for tid \(thread.tid)")
            }
        }
    }

    static func restoreCredentials(_ credentials: Credentials, caller: RemoteSyscaller, scratch: RemoteScratch) throws {
        guard credentials.uids.count >= 3, credentials.gids.count >= 3 else { return }
        scratch.reset()
        var groups: [UInt8] = []
        for group in credentials.groups { groups.appendLE(group) }
        let list = groups.isEmpty ? 0 : try scratch.place(groups)
        try caller.call(.setgroups, UInt64(credentials.groups.count), list, what: "setgroups")
        try caller.call(.setresgid, UInt64(credentials.gids[0]), UInt64(credentials.gids[1]), UInt64(credentials.gids[2]), what: "setresgid")
        try caller.call(.setresuid, UInt64(credentials.uids[0]), UInt64(credentials.uids[1]), UInt64(credentials.uids[2]), what: "setresuid")
    }
}
