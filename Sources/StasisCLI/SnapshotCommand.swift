import ArgumentParser
import Glibc
import Stasis

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Snapshot a process and all its threads to an image file or stream.",
        discussion: """
            Live by default: the process is frozen only while its registers and kernel state are \
            captured and its memory is made copy-on-write, then runs on while the pages stream \
            out. The image is the process as it was at the freeze. With --kill or --stop, the \
            process runs while the image streams and is killed or stopped once it is complete: \
            whatever it did after the freeze is not in the image (use --stop-the-world to keep \
            it from running meanwhile). SIGINT, SIGTERM or a failure discards the snapshot and \
            leaves the process running as before.
            """)

    @Argument(help: "The process to snapshot.")
    var pid: Int32
    @Option(name: .shortAndLong, help: "Image file, or - for standard output.")
    var output: String
    @Flag(help: "Leave the process stopped (as by SIGSTOP) once the image is complete.")
    var stop = false
    @Flag(help: "Kill the process once the image is complete and synced; return when its PID is free.")
    var kill = false
    @Flag(name: .customLong("stop-the-world"), help: "Keep the process frozen until every page is written (no copy-on-write).")
    var stopTheWorld = false
    @Option(help: "Write measurements (freeze_ms, stream_ms, cow_pages, peak_extra_bytes, …) as JSON to this file.")
    var stats: String?
    @Option(name: .customLong("fs"), help: ArgumentHelp("A directory whose contents belong to the snapshot, kept at the instant of the freeze (btrfs snapshot, reflink copy, or plain copy); restore rolls it back. Repeatable.", valueName: "path"))
    var filesystems: [String] = []
    @Flag(name: .customLong("fs-embed"), help: "Carry the --fs directories' contents inside the image (for restoring on another machine) instead of keeping them on this one.")
    var embedFilesystems = false

    func validate() throws {
        if embedFilesystems && filesystems.isEmpty { throw ValidationError("--fs-embed needs at least one --fs PATH") }
        if stop && kill { throw ValidationError("--stop and --kill exclude each other") }
        if output == "-" && isatty(1) != 0 { throw ValidationError("refusing to write an image to a terminal; redirect standard output") }
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        guard let supervisor = SnapshotWorker.supervisorPID else {
            SnapshotWorker.superviseWorker()
        }
        SnapshotWorker.becomeWorker(of: supervisor)
        let tracer = TracerThread()
        Cancellation.interruptBlockingCalls(of: tracer)
        do {
            let destination: ImageDestination = output == "-" ? .descriptor(.standardOutput) : .file(output)
            let capture = filesystems.isEmpty ? nil : try FilesystemCapture(paths: filesystems, root: pid, embed: embedFilesystems)
            for target in capture?.targets ?? [] where target.mechanism == .copy {
                FileHandle.standardError.write(line: "stasis: warning: --fs \(target.path) is on \(target.filesystemType), which has neither snapshots nor reflinks: it is copied byte by byte while the tree is frozen, so the freeze grows with its data")
            }
            let result = try Snapshotter.snapshot(
                pid: pid, to: destination, mode: stopTheWorld ? .stopTheWorld : .live,
                after: kill ? .kill : (stop ? .stop : .run), tracerThread: tracer, filesystems: capture)
            if let fallback = result.fallback { FileHandle.standardError.write(line: "stasis: warning: \(fallback)") }
            if let stats { try writeJSON(result, to: stats) }
        } catch { fail(error) }
    }
}
