import ArgumentParser
import Glibc
import Stasis

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the whole cycle on a built-in workload: start, snapshot, kill, restore, and watch it go on.")

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        do { try DemoScript().perform() } catch { fail(error) }
    }
}

/// The narrated demo: a counter is snapshotted, killed, restored, and counts on.
struct DemoScript {
    func say(_ text: String) {
        print(text)
        fflush(nil)
    }

    func lastCounts(_ path: String) -> [Int] {
        let text = (try? String(decoding: readAll(path), as: UTF8.self)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            line.hasPrefix("count ") ? Int(line.dropFirst(6)) : nil
        }
    }

    func readAll(_ path: String) throws -> [UInt8] {
        let handle = try Stasis.FileHandle.open(path, O_RDONLY)
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let got = try chunk.withUnsafeMutableBytes { try handle.read(into: $0.baseAddress!, count: $0.count) }
            if got == 0 { return bytes }
            bytes += chunk[0..<got]
        }
    }

    func perform() throws {
        let executable = try readLinkSelf()
        let directory = String(executable[..<executable.lastIndex(of: "/")!])
        let counter = directory + "/stasis-counter"
        guard access(counter, X_OK) == 0 else {
            throw StasisError.usage("demo: the workload \(counter) is missing; build everything with `swift build`")
        }
        var template = Array("/tmp/stasis-demo-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw StasisError.usage("demo: cannot create a temporary directory") }
        let work = String(cString: made)
        let log = work + "/counter.log"
        let image = work + "/counter.stasis"
        defer {
            unlink(log); unlink(image); rmdir(work)
        }

        say("Stasis demo: snapshot a running process, kill it, restore it, and watch it carry on.\n")
        let (pid, cgroup) = try Launcher.launch([counter], options: .init(standardOutput: log))
        say("1. Started stasis-counter as PID \(pid) (in cgroup \(cgroup?.path ?? "none")). It prints `count N` every 200 ms.")
        usleep(1_500_000)
        let before = lastCounts(log)
        say("   Its output so far ends with: \(before.suffix(3).map { "count \($0)" }.joined(separator: ", "))")

        let tracer = TracerThread()
        let live = try Snapshotter.snapshot(pid: pid, to: .file(work + "/live.stasis"), mode: .live, after: .run, tracerThread: tracer)
        unlink(work + "/live.stasis")
        say("   A live snapshot first: frozen for \(format(live.freeze_ms)) ms, then the image (\(live.pages) pages) streamed in \(format(live.stream_ms)) ms from a copy-on-write clone while the process kept counting.")
        usleep(400_000)
        let snapshot = try Snapshotter.snapshot(pid: pid, to: .file(image), mode: .stopTheWorld, after: .kill, tracerThread: tracer)
        let atSnapshot = lastCounts(log).last ?? 0
        say("2. Snapshotted PID \(pid) to \(image): \(snapshot.pages) pages, \(snapshot.bytes / 1024) KiB, \(snapshot.threads) thread(s), \(snapshot.mappings) mappings.")
        say("   This one was stop-the-world (--stop-the-world --kill): frozen for \(format(snapshot.freeze_ms)) ms while the image was written and fsynced, then killed, so nothing it did after the freeze is lost.")
        say("   PID \(pid) exists now: \(access("/proc/\(pid)", F_OK) == 0 ? "yes" : "no"). Last count printed: \(atSnapshot).")
        usleep(1_000_000)
        say("   One second later, still \(lastCounts(log).last ?? 0): nothing is counting.")

        let restored = try Restorer.restore(from: try Stasis.FileHandle.open(image, O_RDONLY), tracerThread: tracer)
        say("3. Restored the image in \(format(restored.stats.restore_ms)) ms: PID \(restored.pid) is back, same PID, resuming at the instruction where it was frozen.")
        usleep(1_500_000)
        let after = lastCounts(log).filter { $0 > atSnapshot }
        say("   Its output goes on: \(after.prefix(4).map { "count \($0)" }.joined(separator: ", "))\(after.count > 4 ? ", …" : "")")
        _ = kill(restored.pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(restored.pid, &status, 0) < 0 && errno == EINTR {}
        restored.cgroup?.removeIfEmpty()
        tracer.shutdown()
        guard let first = after.first else {
            throw StasisError.usage("demo: the restored process printed nothing; see \(log)")
        }
        if first == atSnapshot + 1 {
            say("\n✓ The count went on from \(atSnapshot) to \(first): the memory, registers and open file survived the cycle.")
        } else {
            throw StasisError.usage("demo: the count restarted at \(first), expected \(atSnapshot + 1)")
        }
    }

    func readLinkSelf() throws -> String {
        var buffer = [CChar](repeating: 0, count: 4097)
        let count = readlink("/proc/self/exe", &buffer, 4096)
        guard count > 0 else { throw StasisError.usage("demo: cannot find the stasis executable") }
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    func format(_ value: Double) -> String {
        let rounded = (value * 10).rounded() / 10
        return "\(rounded)"
    }
}
