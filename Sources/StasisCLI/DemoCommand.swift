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
        guard let first = after.first else {
            throw StasisError.usage("demo: the restored process printed nothing; see \(log)")
        }
        guard first == atSnapshot + 1 else {
            throw StasisError.usage("demo: the count restarted at \(first), expected \(atSnapshot + 1)")
        }
        say("   ✓ The count went on from \(atSnapshot) to \(first): the memory, registers and open file survived the cycle.\n")
        try demoTree(directory: directory, work: work, tracer: tracer)
        tracer.shutdown()
    }

    /// A pipeline in its own PID namespace: snapshot, kill, restore twice side by side.
    func demoTree(directory: String, work: String, tracer: TracerThread) throws {
        let pipe = directory + "/wl-pipe"
        guard access(pipe, X_OK) == 0 else {
            throw StasisError.usage("demo: the workload \(pipe) is missing; build everything with `swift build`")
        }
        let report = work + "/consumer.json", image = work + "/pipeline.stasis"
        defer { unlink(report); unlink(report + ".tmp"); unlink(image) }
        let command = "\(pipe) produce | \(pipe) filter | \(pipe) consume --report \(report)"
        let (root, cgroup) = try Launcher.launch(["/bin/sh", "-c", command], options: .init(pidNamespace: true))
        var roots = [root]
        var cgroups = [cgroup]
        defer {
            for pid in roots { _ = kill(pid, SIGKILL) }
            var status: Int32 = 0
            for pid in roots { while waitpid(pid, &status, 0) < 0 && errno == EINTR {} }
            for cgroup in cgroups { cgroup?.removeIfEmpty() }
        }
        say("4. A process tree: `sh -c 'wl-pipe produce | wl-pipe filter | wl-pipe consume'` started as PID \(root), PID 1 of its own PID namespace.")
        say("   The consumer checks that every number arrives once, in order, through two pipes.")
        usleep(1_000_000)
        let snapshot = try Snapshotter.snapshot(pid: root, to: .file(image), mode: .live, after: .kill, tracerThread: tracer)
        say("   Live snapshot of all \(snapshot.processes ?? 0) processes: frozen together for \(format(snapshot.freeze_ms)) ms (bytes in the pipes included), then killed.")
        var copies: [RestoredWorkload] = []
        for _ in 0..<2 {
            let copy = try Restorer.restore(from: try Stasis.FileHandle.open(image, O_RDONLY), tracerThread: tracer)
            roots.append(copy.waitPID)
            cgroups.append(copy.cgroup)
            copies.append(copy)
        }
        say("5. Restored it twice, side by side, each in a fresh PID namespace: roots \(copies.map { "PID \($0.pid)" }.joined(separator: " and ")) (\(format(copies[0].stats.restore_ms)) ms and \(format(copies[1].stats.restore_ms)) ms); inside, each has the original PIDs.")
        for copy in copies {
            guard let consumer = descendants(of: copy.pid).first(where: { isConsumer($0) }) else {
                throw StasisError.usage("demo: no consumer in the copy under PID \(copy.pid)")
            }
            unlink(report)
            _ = kill(consumer, SIGUSR1)
            var text = ""
            for _ in 0..<100 where !text.hasPrefix("{") {
                usleep(50_000)
                text = (try? String(decoding: readAll(report), as: UTF8.self)) ?? ""
            }
            guard text.contains("\"ok\":true") else { throw StasisError.usage("demo: the copy under PID \(copy.pid) reports: \(text)") }
            let detail = text.components(separatedBy: "\"detail\":\"").last?.split(separator: "\"").first ?? ""
            say("   copy \(copy.pid): consumer \(consumer) says \(detail)")
        }
        say("\n✓ Both copies carry on from the same instant, no number lost or repeated.")
    }

    func descendants(of pid: pid_t) -> [pid_t] {
        var result: [pid_t] = []
        var queue = [pid]
        while let next = queue.popLast() {
            let text = (try? String(decoding: readAll("/proc/\(next)/task/\(next)/children"), as: UTF8.self)) ?? ""
            let children = text.split(separator: " ").compactMap { pid_t($0) }
            result += children
            queue += children
        }
        return result
    }

    func isConsumer(_ pid: pid_t) -> Bool {
        let words = ((try? readAll("/proc/\(pid)/cmdline")) ?? []).split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        return words.contains("consume")
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
