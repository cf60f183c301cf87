import ArgumentParser
import Glibc
import Stasis

struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Recreate a process tree from an image, with its PIDs and TIDs, resuming where it stopped.")

    @Argument(help: "Image file, or - for standard input.")
    var image: String
    @Flag(help: "Print the PID and return once the process runs, instead of waiting for it.")
    var detach = false
    @Option(help: "Write measurements (restore_ms, …) as JSON to this file.")
    var stats: String?
    @Flag(help: "Do not put the processes in a cgroup of its own.")
    var noCgroup = false
    @Flag(name: .customLong("pidns"), help: "Restore into a fresh PID namespace (with its own /proc), the image's PIDs inside it; repeatable. Images of `run --pidns` workloads always are.")
    var pidNamespace = false

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        let tracer = TracerThread()
        let restored: RestoredWorkload
        do {
            let source = image == "-" ? Stasis.FileHandle.standardInput : try Stasis.FileHandle.open(image, O_RDONLY)
            restored = try Restorer.restore(from: source, tracerThread: tracer, useCgroup: !noCgroup,
                                           namespace: pidNamespace ? .new : .asImaged)
            if let stats { try writeJSON(restored.stats, to: stats) }
        } catch { fail(error) }
        if detach {
            print(restored.pid)
            fflush(nil)
            tracer.shutdown()
            return
        }
        // Wait for the root (or its namespace's init, our child) and exit as it did.
        var status: Int32 = 0
        while waitpid(restored.waitPID, &status, 0) < 0 && errno == EINTR {}
        restored.cgroup?.removeIfEmpty()
        let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        Glibc.exit(code)
    }
}
