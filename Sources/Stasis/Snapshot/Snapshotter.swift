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

/// Measurements of one snapshot, written by `--stats` as JSON.
public struct SnapshotStats: Codable, Sendable {
    /// How long any thread of the workload was kept from running (first stop to last release), ms.
    public var freeze_ms: Double
    /// From the start of the command's work to the image being complete, ms.
    public var total_ms: Double
    /// Time spent capturing registers, kernel state and the page plan while frozen, ms.
    public var capture_ms: Double
    /// Time spent writing pages, ms.
    public var write_ms: Double
    /// Pages stored in the image.
    public var pages: UInt64
    /// Bytes of the image.
    public var bytes: UInt64
    /// Resident pages not stored because they held only zeros.
    public var zero_pages: UInt64
    public var threads: Int
    public var mappings: Int
    public var pid: Int32
}

/// Takes a snapshot of one process: freeze, capture, stream pages, then run/stop/kill it.
///
/// Guarantees: on any failure before the image is complete, the process is released exactly
/// as it was (running, or stopped if it was stopped; no tracer; no scratch mapping), the
/// partial image file is removed, and the error names what failed.
public enum Snapshotter {
    public static func snapshot(
        pid: pid_t, to destination: ImageDestination, after: AfterSnapshot, tracerThread: TracerThread
    ) throws -> SnapshotStats {
        let start = monotonicNanoseconds()
        let sink: FileHandle
        var temporaryPath: String?
        switch destination {
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
                let frozen = try FrozenProcess.freeze(pid: pid, tracer: tracer)
                var releasedAt: UInt64 = 0
                do {
                    let captureStart = monotonicNanoseconds()
                    let state = try ProcessCapture.capture(frozen)
                    let captureEnd = monotonicNanoseconds()
                    let writer = try ImageWriter(sink: sink)
                    try writer.writeRecord(.process, state.process)
                    for thread in state.threads { try writer.writeRecord(.thread, thread) }
                    try writer.writeRecord(.mappings, MappingTable(mappings: state.mappings))
                    try writer.writeRecord(.files, state.files)
                    let dumper = PageDumper(pid: pid)
                    try dumper.dump(state, to: writer)
                    let trailer = try writer.finish()
                    if let temporaryPath, case let .file(path) = destination {
                        try sink.fsync()
                        _ = try checked(Int(rename(temporaryPath, path)).negatedErrnoIfFailed(), "rename", temporaryPath)
                        try syncDirectory(of: path)
                    }
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
                        freeze_ms: milliseconds(releasedAt - frozen.frozenAt),
                        total_ms: milliseconds(writeEnd - start),
                        capture_ms: milliseconds(captureEnd - captureStart),
                        write_ms: milliseconds(writeEnd - captureEnd),
                        pages: trailer.pages, bytes: writer.offset, zero_pages: dumper.zeroPagesSkipped,
                        threads: state.threads.count, mappings: state.mappings.count, pid: pid)
                } catch {
                    try? frozen.release()
                    throw error
                }
            }
        } catch {
            if let temporaryPath { unlink(temporaryPath) }
            throw error
        }
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
