import ArgumentParser
import Glibc
import Stasis

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Snapshot a process and all its threads to an image file or stream.")

    @Argument(help: "The process to snapshot.")
    var pid: Int32
    @Option(name: .shortAndLong, help: "Image file, or - for standard output.")
    var output: String
    @Flag(help: "Leave the process stopped (as by SIGSTOP) once the image is complete.")
    var stop = false
    @Flag(help: "Kill the process once the image is complete and synced; return when its PID is free.")
    var kill = false
    @Option(help: "Write measurements (freeze_ms, total_ms, pages, bytes, …) as JSON to this file.")
    var stats: String?

    func validate() throws {
        if stop && kill { throw ValidationError("--stop and --kill exclude each other") }
        if output == "-" && isatty(1) != 0 { throw ValidationError("refusing to write an image to a terminal; redirect standard output") }
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        let tracer = TracerThread()
        do {
            let destination: ImageDestination = output == "-" ? .descriptor(.standardOutput) : .file(output)
            let result = try Snapshotter.snapshot(
                pid: pid, to: destination, after: kill ? .kill : (stop ? .stop : .run), tracerThread: tracer)
            if let stats { try writeJSON(result, to: stats) }
        } catch { fail(error) }
    }
}
