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

/// Takes a snapshot of one process: freeze, capture, (live: clone the memory copy-on-write and
/// release the process), stream the pages, then run/stop/kill it.
///
/// Guarantees: on any failure or cancellation before the image is complete, the snapshot is
/// discarded — the process is released exactly as it was (running, or stopped if it was
/// stopped; no tracer; no scratch mapping; no clone, zombie or extra memory), the partial image
/// file is removed — and the error names what failed. The image's pages are the process's
/// memory at the instant of the freeze in both modes.
public enum Snapshotter {
    public static func snapshot(
        pid: pid_t, to destination: ImageDestination, mode: SnapshotMode = .live, after: AfterSnapshot,
        tracerThread: TracerThread
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
            return try tracerThread.perform { tracer in
                switch mode {
                case .live:
                    try live(pid: pid, sink: sink, temporaryPath: temporaryPath, destination: destination,
                             after: after, tracer: tracer, start: start)
                case .stopTheWorld:
                    try stopTheWorld(pid: pid, sink: sink, temporaryPath: temporaryPath, destination: destination,
                                     after: after, tracer: tracer, start: start)
                }
            }
        } catch {
            if let temporaryPath { unlink(temporaryPath) }
            throw error
        }
    }

    private static func live(
        pid: pid_t, sink: FileHandle, temporaryPath: String?, destination: ImageDestination,
        after: AfterSnapshot, tracer: Tracer, start: UInt64
    ) throws -> SnapshotStats {
        try FrozenProcess.checkTraceable(pid)
        // Read before the freeze: the VmFlags (smaps walks every page table).
        let earlier = try? ProcFS.mappings(pid)
        try Cancellation.check()
        let frozen = try FrozenProcess.freeze(pid: pid, tracer: tracer)
        var clone: CopyOnWriteClone?
        var state: CapturedState
        var preserved: [Int: PreservedPages] = [:]
        let captureStart = monotonicNanoseconds()
        var cloneStart: UInt64 = 0
        do {
            state = try ProcessCapture.capture(frozen, earlierMappings: earlier, signalsFromClone: true)
            // Mappings a fork does not carry are read now, while frozen.
            let notCarried = state.mappings.indices.filter {
                state.mappings[$0].flags.contains("dc") || state.mappings[$0].flags.contains("wf")
            }
            try ProcessCapture.planPages(&state, scanning: pid, indices: notCarried)
            for index in notCarried where !state.pageRanges[index].isEmpty {
                preserved[index] = try PreservedPages(pid: pid, ranges: state.pageRanges[index])
            }
            try Cancellation.check()
            cloneStart = monotonicNanoseconds()
            do {
                clone = try CopyOnWriteClone.create(from: frozen, syscallInstruction: state.syscallInstruction)
            } catch let unavailable as CopyOnWriteClone.Unavailable {
                // Still frozen and unchanged: finish as a stop-the-world snapshot instead.
                // Ask the process itself what the clone would have told.
                try ProcessCapture.askSignalsAndBrk(&state, of: pid, tracer: tracer)
                var stats = try streamWhileFrozen(frozen, state: &state, sink: sink, temporaryPath: temporaryPath,
                                                  destination: destination, after: after, start: start, captureStart: captureStart)
                stats.fallback = "\(unavailable); the process stayed frozen until the image was complete"
                return stats
            }
            try frozen.release()
        } catch {
            try? frozen.release()
            clone?.destroy(reapInParent: true)
            throw discarded(pid, error)
        }
        let releasedAt = monotonicNanoseconds()
        let cloned = clone!
        let preservedBytes = preserved.values.reduce(UInt64(0)) { $0 + UInt64($1.byteCount) }
        do {
            let streamStart = monotonicNanoseconds()
            try ProcessCapture.askSignalsAndBrk(&state, of: cloned.pid, tracer: tracer)
            let carried = state.mappings.indices.filter { preserved[$0] == nil }
            try ProcessCapture.planPages(&state, scanning: cloned.pid, indices: carried)
            let writer = try ImageWriter(sink: sink)
            try writeRecords(state, to: writer)
            let dumper = PageDumper(source: cloned.pid)
            // The clone's own memory is sampled (smaps_rollup walks its page tables, ~13 ms/GiB)
            // at most every 200 ms, and once after the last block.
            var peakExtra: UInt64 = 0
            var lastSample: UInt64 = 0
            dumper.afterBlock = { runs in
                let now = monotonicNanoseconds()
                if now - lastSample > 200_000_000 {
                    peakExtra = max(peakExtra, cloned.extraBytes())
                    lastSample = now
                }
                try cloned.giveBack(runs)
            }
            try dumper.dump(state, preserved: preserved, to: writer)
            peakExtra = max(peakExtra, cloned.extraBytes())
            let trailer = try writer.finish()
            try complete(sink: sink, temporaryPath: temporaryPath, destination: destination)
            let streamEnd = monotonicNanoseconds()
            // The image is complete: the clone goes, and its zombie is reaped inside the process.
            let cleanupStop = cloned.destroy(reapInParent: after != .kill)
            try finishProcess(pid, after: after)
            return SnapshotStats(
                mode: .live,
                freeze_ms: milliseconds(releasedAt - frozen.frozenAt),
                total_ms: milliseconds(streamEnd - start),
                capture_ms: milliseconds(cloneStart - captureStart),
                cow_ms: milliseconds(releasedAt - cloneStart),
                stream_ms: milliseconds(streamEnd - streamStart),
                write_ms: milliseconds(streamEnd - streamStart),
                cow_pages: cloned.preservedPages,
                peak_extra_bytes: peakExtra + preservedBytes + UInt64(ImageFormat.maxPagesPerBlock * 4096),
                cleanup_stop_ms: milliseconds(cleanupStop),
                pages: trailer.pages, bytes: writer.offset, zero_pages: dumper.zeroPagesSkipped,
                threads: state.threads.count, mappings: state.mappings.count, pid: pid)
        } catch {
            cloned.destroy(reapInParent: true)
            throw discarded(pid, error)
        }
    }

    private static func stopTheWorld(
        pid: pid_t, sink: FileHandle, temporaryPath: String?, destination: ImageDestination,
        after: AfterSnapshot, tracer: Tracer, start: UInt64
    ) throws -> SnapshotStats {
        let frozen = try FrozenProcess.freeze(pid: pid, tracer: tracer)
        do {
            let captureStart = monotonicNanoseconds()
            var state = try ProcessCapture.capture(frozen)
            return try streamWhileFrozen(frozen, state: &state, sink: sink, temporaryPath: temporaryPath,
                                         destination: destination, after: after, start: start, captureStart: captureStart)
        } catch {
            try? frozen.release()
            throw discarded(pid, error)
        }
    }

    /// Plans and streams the pages of a frozen, captured process, then runs, stops or kills it.
    private static func streamWhileFrozen(
        _ frozen: FrozenProcess, state: inout CapturedState, sink: FileHandle, temporaryPath: String?,
        destination: ImageDestination, after: AfterSnapshot, start: UInt64, captureStart: UInt64
    ) throws -> SnapshotStats {
        let pid = frozen.pid
        var releasedAt: UInt64 = 0
        try ProcessCapture.planPages(&state, scanning: pid)
        let captureEnd = monotonicNanoseconds()
        let writer = try ImageWriter(sink: sink)
        try writeRecords(state, to: writer)
        let dumper = PageDumper(source: pid)
        try dumper.dump(state, to: writer)
        let trailer = try writer.finish()
        try complete(sink: sink, temporaryPath: temporaryPath, destination: destination)
        let writeEnd = monotonicNanoseconds()
        switch after {
        case .run: try frozen.release()
        case .stop: try frozen.releaseStopped()
        case .kill:
            // The process never runs again: its freeze ends when SIGKILL is sent,
            // not when its parent gets round to reaping it.
            let cgroup = StasisCgroup.of(pid: pid)
            releasedAt = monotonicNanoseconds()
            try frozen.kill()
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
            peak_extra_bytes: UInt64(ImageFormat.maxPagesPerBlock * 4096),
            cleanup_stop_ms: 0,
            pages: trailer.pages, bytes: writer.offset, zero_pages: dumper.zeroPagesSkipped,
            threads: state.threads.count, mappings: state.mappings.count, pid: pid)
    }

    private static func writeRecords(_ state: CapturedState, to writer: ImageWriter) throws {
        try writer.writeRecord(.process, state.process)
        for thread in state.threads { try writer.writeRecord(.thread, thread) }
        try writer.writeRecord(.mappings, MappingTable(mappings: state.mappings))
        try writer.writeRecord(.files, state.files)
    }

    /// Makes a file image durable under its final name.
    private static func complete(sink: FileHandle, temporaryPath: String?, destination: ImageDestination) throws {
        if let temporaryPath, case let .file(path) = destination {
            try sink.fsync()
            _ = try checked(Int(rename(temporaryPath, path)).negatedErrnoIfFailed(), "rename", temporaryPath)
            try syncDirectory(of: path)
        }
    }

    /// After a live snapshot: leaves the (untraced, running) process running, stopped or dead.
    private static func finishProcess(_ pid: pid_t, after: AfterSnapshot) throws {
        switch after {
        case .run: break
        case .stop: _ = Glibc.kill(pid, SIGSTOP)
        case .kill:
            let cgroup = StasisCgroup.of(pid: pid)
            let startTime = try? ProcFS.stat(pid)[22]
            _ = Glibc.kill(pid, SIGKILL)
            // Gone, or its PID already reused (`snapshot --kill -o - | restore -` restores it
            // as soon as it is free).
            try waitForPIDToBeFree(pid, timeoutSeconds: 30, orUntil: { (try? ProcFS.stat(pid)[22]) != startTime })
            cgroup?.removeIfEmpty()
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
