import Glibc

/// Where an image goes.
public enum ImageDestination {
    /// A file: written under a temporary name beside it, fsynced, then renamed into place, so a
    /// partly written image never carries the final name.
    case file(String)
    /// An open descriptor (a pipe, stdout): written front to back.
    case descriptor(FileHandle)
}

/// What happens to the process once its image is complete.
public enum AfterSnapshot: String, Sendable {
    /// It runs on (the default).
    case run
    /// It is left stopped, as by SIGSTOP.
    case stop
    /// It is killed once the image is complete and synced, and its PID is free again on return.
    case kill
}

/// Takes a snapshot of the process tree under one PID (every process, thread and zombie below
/// it): freeze them all, capture each and what they share, (live: clone each one's memory
/// copy-on-write and release them), stream the pages, then run/stop/kill them.
///
/// Guarantees: on any failure or cancellation before the image is complete, the snapshot is
/// discarded — every process is released exactly as it was (running, or stopped if it was
/// stopped; no tracer; no scratch mapping; no clone, zombie or extra memory), the partial image
/// file is removed — and the error names what failed. The image is every process's memory,
/// and the bytes in the pipes between them, at one instant (the freeze) in both modes.
public enum Snapshotter {
    /// With `filesystems` (`--fs`), the directories are kept at the instant of the freeze too
    /// (while the tree is stopped), registered once the image is complete, and removed if the
    /// snapshot is discarded.
    public static func snapshot(
        pid: pid_t, to destination: ImageDestination, mode: SnapshotMode = .live, after: AfterSnapshot,
        tracerThread: TracerThread, filesystems: FilesystemCapture? = nil
    ) throws -> SnapshotStats {
        let start = monotonicNanoseconds()
        try Cancellation.check()
        let sink: FileHandle
        var temporaryPath: String?
        switch destination {
        case let .file(path) where isSpecialFile(path):
            // A device or FIFO (`-o /dev/null`, `-o /dev/stdout`, a named pipe) is written in
            // place: renaming a temporary file over it would replace the device node.
            sink = try FileHandle.open(path, O_WRONLY)
            if sink.isPipe { enlargePipe(sink) }
        case let .file(path):
            let temporary = path + ".partial"
            sink = try FileHandle.open(temporary, O_WRONLY | O_CREAT | O_TRUNC, permissions: 0o600)
            temporaryPath = temporary
        case let .descriptor(handle):
            sink = handle
            if handle.isPipe { enlargePipe(handle) }
        }
        do {
            var stats = try tracerThread.perform { tracer in
                switch mode {
                case .live:
                    try live(pid: pid, sink: sink, temporaryPath: temporaryPath, destination: destination,
                             after: after, tracer: tracer, start: start, filesystems: filesystems)
                case .stopTheWorld:
                    try stopTheWorld(pid: pid, sink: sink, temporaryPath: temporaryPath, destination: destination,
                                     after: after, tracer: tracer, start: start, filesystems: filesystems)
                }
            }
            if let filesystems, !filesystems.targets.isEmpty {
                stats.fs_ms = filesystems.milliseconds
                stats.fs = filesystems.records.map { "\($0.path): \($0.mechanism.rawValue) (\($0.filesystemType))" }
                stats.fs_id = filesystems.id
            }
            return stats
        } catch {
            if let temporaryPath { unlink(temporaryPath) }
            filesystems?.discard()
            throw error
        }
    }

    private static func live(
        pid: pid_t, sink: FileHandle, temporaryPath: String?, destination: ImageDestination,
        after: AfterSnapshot, tracer: Tracer, start: UInt64, filesystems: FilesystemCapture?
    ) throws -> SnapshotStats {
        try FrozenProcess.checkTraceable(pid)
        let pidNamespace = try TreeNamespace.isOwnNamespace(root: pid)
        let expected = [pid] + descendants(of: pid)
        try PipeOwnership.checkNoOutsideHolders(tree: expected)
        // Read before the freeze: the VmFlags (smaps walks every page table).
        var earlier: [pid_t: [ProcFS.MapEntry]] = [:]
        for member in expected { earlier[member] = try? ProcFS.mappings(member) }
        try Cancellation.check()
        let tree = try PhaseTimer.measure("freeze tree") { try FrozenTree.freeze(root: pid, tracer: tracer, pidNamespace: pidNamespace) }
        var clones: [CopyOnWriteClone] = []
        var states: [CapturedState] = []
        var preserved: [[Int: PreservedPages]] = []
        var treeRecord: TreeRecord
        var shared: SharedObjectContents
        let captureStart = monotonicNanoseconds()
        var cloneStart: UInt64 = 0
        do {
            states = try PhaseTimer.measure("capture processes") {
                try ProcessCapture.captureAll(tree.processes, earlierMappings: earlier, fromClone: true, namespaced: pidNamespace)
            }
            for (index, process) in tree.processes.enumerated() {
                // Mappings a fork does not carry are read now, while frozen.
                let notCarried = states[index].mappings.indices.filter {
                    states[index].mappings[$0].flags.contains("dc") || states[index].mappings[$0].flags.contains("wf")
                }
                try ProcessCapture.planPages(&states[index], scanning: process.pid, indices: notCarried)
                var kept: [Int: PreservedPages] = [:]
                for mapping in notCarried where !states[index].pageRanges[mapping].isEmpty {
                    kept[mapping] = try PreservedPages(pid: process.pid, ranges: states[index].pageRanges[mapping])
                }
                preserved.append(kept)
            }
            try TreeNamespace.checkMembers(tree, pidNamespace: pidNamespace)
            (treeRecord, shared) = try PhaseTimer.measure("capture tree") { try TreeCapture.capture(tree, states: &states, pidNamespace: pidNamespace) }
            // The directories of `--fs`, at the same instant (the tree is stopped).
            try PhaseTimer.measure("filesystems") { try filesystems?.take() }
            treeRecord.filesystems = filesystems.flatMap { $0.records.isEmpty ? nil : $0.records }
            try Cancellation.check()
            cloneStart = monotonicNanoseconds()
            do {
                for (index, process) in tree.processes.enumerated() {
                    clones.append(try PhaseTimer.measure("clone") { try CopyOnWriteClone.create(from: process, syscallInstruction: states[index].syscallInstruction) })
                }
            } catch let unavailable as CopyOnWriteClone.Unavailable {
                // Still frozen and unchanged but for the clones made so far: drop them and finish
                // as a stop-the-world snapshot. Ask each process what its clone would have told.
                for clone in clones { clone.destroy(reapInParent: true) }
                clones = []
                try ProcessCapture.completeFromClones(&states, clones: tree.processes.map(\.pid), tracer: tracer)
                var stats = try streamWhileFrozen(tree, states: &states, tree: treeRecord, shared: shared, sink: sink,
                                                  temporaryPath: temporaryPath, destination: destination, after: after,
                                                  start: start, captureStart: captureStart, filesystems: filesystems)
                stats.fallback = "\(unavailable); the tree stayed frozen until the image was complete"
                return stats
            }
            try PhaseTimer.measure("release") { try tree.release() }
        } catch {
            try? tree.release()
            for clone in clones { clone.destroy(reapInParent: true) }
            throw discarded(pid, error)
        }
        let releasedAt = monotonicNanoseconds()
        let preservedBytes = preserved.reduce(UInt64(0)) { total, kept in kept.values.reduce(total) { $0 + UInt64($1.byteCount) } }
        do {
            let streamStart = monotonicNanoseconds()
            try PhaseTimer.measure("stream: complete from clones") {
                try ProcessCapture.completeFromClones(&states, clones: clones.map(\.pid), tracer: tracer)
            }
            for (index, clone) in clones.enumerated() {
                let carried = states[index].mappings.indices.filter { preserved[index][$0] == nil }
                try PhaseTimer.measure("stream: plan pages") { try ProcessCapture.planPages(&states[index], scanning: clone.pid, indices: carried) }
            }
            let writer = try ImageWriter(sink: sink)
            try writeRecords(treeRecord, states, shared, to: writer)
            // Each clone's own memory is sampled (smaps_rollup walks its page tables, ~13 ms/GiB)
            // at most every 200 ms while it streams, and once after; the peak is the largest sum
            // of the clones' latest samples. Each clone goes as soon as its pages are out: it
            // is killed and its zombie reaped inside its process.
            var extra = [UInt64](repeating: 0, count: clones.count)
            var peakExtra: UInt64 = 0
            var lastSample: UInt64 = 0
            var zeroPages: UInt64 = 0
            var cleanupStop: UInt64 = 0
            for (index, clone) in clones.enumerated() {
                try writer.writeRecord(.processPages, ProcessPagesRecord(pid: states[index].process.pid))
                let dumper = PageDumper(source: clone.pid)
                dumper.afterBlock = { runs in
                    let now = monotonicNanoseconds()
                    if now - lastSample > 200_000_000 {
                        extra[index] = clone.extraBytes()
                        peakExtra = max(peakExtra, extra.reduce(0, +))
                        lastSample = now
                    }
                    try PhaseTimer.measure("stream: give back") { try clone.giveBack(runs) }
                }
                try PhaseTimer.measure("stream: dump") { try dumper.dump(states[index], preserved: preserved[index], to: writer) }
                zeroPages += dumper.zeroPagesSkipped
                extra[index] = clone.extraBytes()
                peakExtra = max(peakExtra, extra.reduce(0, +))
                extra[index] = 0
                try clone.finishStream()
                cleanupStop = max(cleanupStop, PhaseTimer.measure("stream: destroy clone") { clone.destroy(reapInParent: after != .kill) })
            }
            let trailer = try writer.finish()
            try complete(sink: sink, temporaryPath: temporaryPath, destination: destination)
            try filesystems?.commit(image: imagePath(destination))
            let streamEnd = monotonicNanoseconds()
            try finishTree(tree.members, after: after)
            return SnapshotStats(
                mode: .live,
                freeze_ms: milliseconds(releasedAt - tree.frozenAt),
                total_ms: milliseconds(streamEnd - start),
                capture_ms: milliseconds(cloneStart - captureStart),
                cow_ms: milliseconds(releasedAt - cloneStart),
                stream_ms: milliseconds(streamEnd - streamStart),
                write_ms: milliseconds(streamEnd - streamStart),
                cow_pages: clones.reduce(0) { $0 + $1.preservedPages },
                peak_extra_bytes: peakExtra + preservedBytes + UInt64(shared.byteCount) + UInt64(ImageFormat.maxPagesPerBlock * 4096),
                cleanup_stop_ms: milliseconds(cleanupStop),
                pages: trailer.pages, bytes: writer.offset, zero_pages: zeroPages,
                threads: states.reduce(0) { $0 + $1.threads.count }, mappings: states.reduce(0) { $0 + $1.mappings.count },
                pid: pid, processes: tree.members.count, zombies: tree.members.count - tree.processes.count,
                shared_bytes: UInt64(shared.byteCount))
        } catch {
            for clone in clones { clone.destroy(reapInParent: true) }
            throw discarded(pid, error)
        }
    }

    private static func stopTheWorld(
        pid: pid_t, sink: FileHandle, temporaryPath: String?, destination: ImageDestination,
        after: AfterSnapshot, tracer: Tracer, start: UInt64, filesystems: FilesystemCapture?
    ) throws -> SnapshotStats {
        try FrozenProcess.checkTraceable(pid)
        let pidNamespace = try TreeNamespace.isOwnNamespace(root: pid)
        try PipeOwnership.checkNoOutsideHolders(tree: [pid] + descendants(of: pid))
        let tree = try FrozenTree.freeze(root: pid, tracer: tracer, pidNamespace: pidNamespace)
        do {
            let captureStart = monotonicNanoseconds()
            var states = try ProcessCapture.captureAll(tree.processes, namespaced: pidNamespace)
            try TreeNamespace.checkMembers(tree, pidNamespace: pidNamespace)
            var (treeRecord, shared) = try TreeCapture.capture(tree, states: &states, pidNamespace: pidNamespace)
            try filesystems?.take()
            treeRecord.filesystems = filesystems.flatMap { $0.records.isEmpty ? nil : $0.records }
            return try streamWhileFrozen(tree, states: &states, tree: treeRecord, shared: shared, sink: sink,
                                         temporaryPath: temporaryPath, destination: destination, after: after,
                                         start: start, captureStart: captureStart, filesystems: filesystems)
        } catch {
            try? tree.release()
            throw discarded(pid, error)
        }
    }

    /// Plans and streams the pages of a frozen, captured tree, then runs, stops or kills it.
    private static func streamWhileFrozen(
        _ frozen: FrozenTree, states: inout [CapturedState], tree: TreeRecord, shared: SharedObjectContents,
        sink: FileHandle, temporaryPath: String?, destination: ImageDestination, after: AfterSnapshot,
        start: UInt64, captureStart: UInt64, filesystems: FilesystemCapture?
    ) throws -> SnapshotStats {
        var releasedAt: UInt64 = 0
        for (index, process) in frozen.processes.enumerated() { try ProcessCapture.planPages(&states[index], scanning: process.pid) }
        let captureEnd = monotonicNanoseconds()
        let writer = try ImageWriter(sink: sink)
        try writeRecords(tree, states, shared, to: writer)
        var zeroPages: UInt64 = 0
        for (index, process) in frozen.processes.enumerated() {
            try writer.writeRecord(.processPages, ProcessPagesRecord(pid: states[index].process.pid))
            let dumper = PageDumper(source: process.pid)
            try dumper.dump(states[index], to: writer)
            zeroPages += dumper.zeroPagesSkipped
        }
        let trailer = try writer.finish()
        try complete(sink: sink, temporaryPath: temporaryPath, destination: destination)
        try filesystems?.commit(image: imagePath(destination))
        let writeEnd = monotonicNanoseconds()
        switch after {
        case .run: try frozen.release()
        case .stop: try frozen.releaseStopped()
        case .kill:
            // The processes never run again: the freeze ends when SIGKILL is sent, not when
            // their parents get round to reaping them.
            let cgroup = StasisCgroup.of(pid: frozen.root)
            releasedAt = monotonicNanoseconds()
            try frozen.kill()
            try waitForZombiesToGo(frozen.members)
            cgroup?.removeIfEmpty()
        }
        if releasedAt == 0 { releasedAt = monotonicNanoseconds() }
        return SnapshotStats(
            mode: .stopTheWorld,
            freeze_ms: milliseconds(releasedAt - frozen.frozenAt),
            total_ms: milliseconds(writeEnd - start),
            capture_ms: milliseconds(captureEnd - captureStart),
            cow_ms: 0,
            stream_ms: milliseconds(writeEnd - captureEnd),
            write_ms: milliseconds(writeEnd - captureEnd),
            cow_pages: 0,
            peak_extra_bytes: UInt64(shared.byteCount) + UInt64(ImageFormat.maxPagesPerBlock * 4096),
            cleanup_stop_ms: 0,
            pages: trailer.pages, bytes: writer.offset, zero_pages: zeroPages,
            threads: states.reduce(0) { $0 + $1.threads.count }, mappings: states.reduce(0) { $0 + $1.mappings.count },
            pid: frozen.root, processes: frozen.members.count, zombies: frozen.members.count - frozen.processes.count,
            shared_bytes: UInt64(shared.byteCount))
    }

    /// The metadata of the whole tree, ahead of every page: the tree record, each process's
    /// records, then the shared objects' contents.
    private static func writeRecords(_ tree: TreeRecord, _ states: [CapturedState], _ shared: SharedObjectContents,
                                     to writer: ImageWriter) throws {
        try writer.writeRecord(.tree, tree)
        try EmbeddedFiles.write(tree.filesystems ?? [], to: writer)
        for state in states {
            try writer.writeRecord(.process, state.process)
            for thread in state.threads { try writer.writeRecord(.thread, thread) }
            try writer.writeRecord(.mappings, MappingTable(mappings: state.mappings))
            try writer.writeRecord(.files, state.files)
        }
        try shared.write(to: writer)
    }

    /// The descendants of `pid` as /proc lists them now (not frozen: a hint for reading ahead).
    static func descendants(of pid: pid_t) -> [pid_t] {
        var result: [pid_t] = []
        var queue = [pid]
        while let next = queue.popLast() {
            let children = (try? FrozenTree.children(of: next)) ?? []
            result += children
            queue += children
            if result.count > 100_000 { break }
        }
        return result
    }

    /// The image's path, for a regular file destination.
    private static func imagePath(_ destination: ImageDestination) -> String? {
        guard case let .file(path) = destination, !isSpecialFile(path), let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// Makes a file image durable under its final name.
    private static func complete(sink: FileHandle, temporaryPath: String?, destination: ImageDestination) throws {
        if let temporaryPath, case let .file(path) = destination {
            try sink.fsync()
            _ = try checked(Int(rename(temporaryPath, path)).negatedErrnoIfFailed(), "rename", temporaryPath)
            try syncDirectory(of: path)
        }
    }

    /// After a live snapshot: leaves the (untraced, running) processes running, stopped or dead.
    private static func finishTree(_ members: [TreeMember], after: AfterSnapshot) throws {
        let live = members.filter { $0.zombie == nil }
        switch after {
        case .run: break
        case .stop: for member in live { _ = Glibc.kill(member.pid, SIGSTOP) }
        case .kill:
            let cgroup = members.first.flatMap { StasisCgroup.of(pid: $0.pid) }
            let startTimes = live.map { (try? ProcFS.stat($0.pid))?[22] }
            // A root started by this very process (the demo, a library user) is ours to reap.
            let rootIsOurs = live.first.map { (try? ProcFS.stat($0.pid))?[4] == "\(getpid())" } ?? false
            for member in live { _ = Glibc.kill(member.pid, SIGKILL) }
            if rootIsOurs, let root = live.first {
                var status: Int32 = 0
                while waitpid(root.pid, &status, 0) < 0 && errno == EINTR {}
            }
            // Gone, or their PIDs already reused (`snapshot --kill -o - | restore -` restores
            // them as soon as they are free).
            for (member, startTime) in zip(live, startTimes) {
                try waitForPIDToBeFree(member.pid, timeoutSeconds: 30, orUntil: { (try? ProcFS.stat(member.pid)[22]) != startTime })
            }
            try waitForZombiesToGo(members)
            cgroup?.removeIfEmpty()
        }
    }

    /// Once their parents are dead, the tree's zombies are reaped by whoever adopts them.
    private static func waitForZombiesToGo(_ members: [TreeMember]) throws {
        for member in members where member.zombie != nil {
            try waitForPIDToBeFree(member.pid, timeoutSeconds: 30, orUntil: { FrozenTree.zombieStatus(member.pid) == nil })
        }
    }

    /// Refusals and cancellations pass through as they are; other failures after the freeze
    /// are reported as a discarded snapshot.
    private static func discarded(_ pid: pid_t, _ error: Error) -> Error {
        if let error = error as? StasisError {
            switch error {
            case .cancelled, .discarded, .unsupported, .notTraceable, .noSuchProcess: return error
            default: break
            }
        }
        return StasisError.discarded(pid: pid, reason: "\(error)")
    }

    /// Whether `path` names something other than a regular file or nothing (a device, a FIFO).
    static func isSpecialFile(_ path: String) -> Bool {
        guard let st = try? statPath(path) else { return false }
        return (st.st_mode & S_IFMT) != S_IFREG
    }

    /// Grows an output pipe to the system's maximum (best effort): with the default 64 KiB,
    /// the reader must be woken every 64 KiB, which bounds throughput (docs/benchmarks.md).
    static func enlargePipe(_ handle: FileHandle) {
        guard let text = try? readTextFile("/proc/sys/fs/pipe-max-size"),
              let maximum = Int32(text.trimmingCharacters()) else { return }
        _ = fcntl(handle.rawValue, 1031 /* F_SETPIPE_SZ */, maximum)
    }

    static func syncDirectory(of path: String) throws {
        let directory = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        let handle = try FileHandle.open(directory.isEmpty ? "/" : directory, O_RDONLY | O_DIRECTORY)
        try handle.fsync()
    }
}

func milliseconds(_ nanoseconds: UInt64) -> Double { Double(nanoseconds) / 1e6 }
