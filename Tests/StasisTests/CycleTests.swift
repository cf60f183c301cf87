import Foundation
import Glibc
import Stasis
import Testing

/// Snapshot → kill → restore of real processes, checked by the processes themselves.
@Suite("snapshot, kill, restore", .serialized, .timeLimit(.minutes(3)))
struct CycleTests {
    @Test("a counter resumes counting from where it was")
    func counterContinues() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let log = scratch.file("counter.log")
        let run = try stasis("run", "--stdout", log, "--", Products.path("stasis-counter"))
        let pid = try #require(pid_t(run.stdout.trimmed))
        cleanup.track(pid)
        try waitUntil(10, "three counts") { contents(log).components(separatedBy: "count ").count > 3 }
        let restored = try cycle(pid, image: scratch.file("counter.stasis"), cleanup: cleanup, extra: ["--stop-the-world"])
        #expect(restored == pid)
        let last = counts(contents(log)).last!
        try waitUntil(10, "counting after restore") { counts(contents(log)).last! > last + 2 }
        let all = counts(contents(log))
        // Exactly one more than the last count before the snapshot: no restart, no gap.
        #expect(all == Array(1...all.count), "counts must go on without a gap or a repeat: \(all)")
    }

    @Test("threads keep their TIDs, TLS and SSE/AVX register state", arguments: [1, 8])
    func threads(count: Int) throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-threads"), "--threads", "\(count)"], scratch: scratch, cleanup: cleanup)
        let before = try workload.check()
        #expect(before.ok, "\(before.detail)")
        let tasksBefore = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(workload.pid)/task").sorted()
        try cycle(workload.pid, image: scratch.file("threads.stasis"), cleanup: cleanup)
        let after = try workload.check()
        #expect(after.ok, "\(after.detail)")
        #expect(after.tids == before.tids)
        #expect(after.progress > before.progress, "work must continue, not restart")
        let tasksAfter = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(workload.pid)/task").sorted()
        #expect(tasksAfter == tasksBefore)
    }

    @Test("heap, brk, anonymous, sparse, file-backed, read-only memory and thread stacks survive")
    func memory() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-memory"), "--mb", "48", "--file", scratch.file("mapped.data")],
                                             scratch: scratch, cleanup: cleanup)
        let before = try workload.check()
        #expect(before.ok, "\(before.detail)")
        let image = scratch.file("memory.stasis")
        try cycle(workload.pid, image: image, cleanup: cleanup)
        let after = try workload.check()
        #expect(after.ok, "\(after.detail)")
        #expect(after.progress >= before.progress)
        // Untouched and zero pages are not stored: 64 MiB of sparse memory costs little.
        let summary = try inspect(image)
        #expect(summary.total_page_bytes < 100 << 20)
        #expect(summary.mappings.contains { $0.name == "[heap]" && $0.stored_bytes > 0 })
    }

    @Test("file offsets, O_APPEND, close-on-exec and /dev/null survive")
    func files() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-files"), "--dir", scratch.file("data")], scratch: scratch, cleanup: cleanup,
                                             stdout: scratch.file("out.log"))
        usleep(300_000)
        let fdinfoBefore = fdFlags(workload.pid)
        try cycle(workload.pid, image: scratch.file("files.stasis"), cleanup: cleanup, extra: ["--stop-the-world"])
        let after = try workload.check()
        #expect(after.ok, "\(after.detail)")
        #expect(after.progress > 0)
        #expect(fdFlags(workload.pid) == fdinfoBefore)
    }

    @Test("a Python interpreter with a large dict and a worker thread carries on")
    func python() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.python, Products.pythonWorkload], scratch: scratch, cleanup: cleanup)
        let before = try workload.check()
        #expect(before.ok, "\(before.detail)")
        try cycle(workload.pid, image: scratch.file("python.stasis"), cleanup: cleanup)
        let after = try workload.check()
        #expect(after.ok, "\(after.detail)")
        #expect(after.progress > before.progress)
    }

    @Test("the image is a stream: snapshot -o - | restore - works through a pipe")
    func throughPipe() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-threads"), "--threads", "3"], scratch: scratch, cleanup: cleanup)
        let before = try workload.check()
        let script = "'\(Products.stasis)' snapshot \(workload.pid) -o - --kill | '\(Products.stasis)' restore - --detach"
        let result = try runCommand(["/bin/sh", "-c", script], timeout: 60)
        #expect(result.succeeded, "\(result.stderr)")
        #expect(result.stdout.trimmed == "\(workload.pid)")
        let after = try workload.check()
        #expect(after.ok, "\(after.detail)")
        #expect(after.progress > before.progress)
    }

    @Test("without --detach, restore waits and exits with the workload's status")
    func restoreWaits() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-threads"), "--threads", "2"], scratch: scratch, cleanup: cleanup)
        let image = scratch.file("wait.stasis")
        #expect(try stasis("snapshot", "\(workload.pid)", "-o", image, "--kill").succeeded)
        let restore = Process()
        restore.executableURL = URL(fileURLWithPath: Products.stasis)
        restore.arguments = ["restore", image]
        try restore.run()
        defer { if restore.isRunning { restore.terminate() } }
        cleanup.track(workload.pid)
        try waitUntil(10, "the restored process") { access("/proc/\(workload.pid)", F_OK) == 0 }
        let report = try workload.check()
        #expect(report.ok, "\(report.detail)")
        kill(workload.pid, SIGTERM)  // wl-threads exits 0 on SIGTERM
        let deadline = Date().addingTimeInterval(20)
        while restore.isRunning && Date() < deadline { usleep(10_000) }
        #expect(!restore.isRunning)
        #expect(restore.terminationStatus == 0)
    }

    @Test("snapshot without --kill leaves the process running, untraced and unchanged")
    func liveProcessUntouched() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-memory"), "--mb", "8"], scratch: scratch, cleanup: cleanup)
        let before = try ProcessCondition(workload.pid)
        let stats = scratch.file("stats.json")
        let result = try stasis("snapshot", "\(workload.pid)", "-o", scratch.file("live.stasis"), "--stats", stats)
        #expect(result.succeeded, "\(result.stderr)")
        #expect(try ProcessCondition(workload.pid) == before)
        let report = try workload.check()
        #expect(report.ok, "\(report.detail)")
        let json = try JSONSerialization.jsonObject(with: Data(contents(stats).utf8)) as! [String: Any]
        for key in ["freeze_ms", "total_ms", "pages", "bytes"] { #expect(json[key] != nil, "stats lack \(key)") }
        #expect(!FileManager.default.fileExists(atPath: scratch.file("live.stasis.partial")))
    }

    @Test("--stop leaves the process stopped; SIGCONT lets it go on")
    func stopAfterSnapshot() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-threads"), "--threads", "2"], scratch: scratch, cleanup: cleanup)
        #expect(try stasis("snapshot", "\(workload.pid)", "-o", scratch.file("stop.stasis"), "--stop").succeeded)
        try waitUntil(5, "the process to be stopped") { (try? ProcessCondition(workload.pid).state) == "stopped" }
        #expect(try ProcessCondition(workload.pid).tracerPID == "0")
        kill(workload.pid, SIGCONT)
        let report = try workload.check()
        #expect(report.ok, "\(report.detail)")
    }

    @Test("restore --stats reports restore_ms; inspect --json describes the image")
    func statsAndInspect() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-threads"), "--threads", "4"], scratch: scratch, cleanup: cleanup)
        let image = scratch.file("s.stasis")
        #expect(try stasis("snapshot", "\(workload.pid)", "-o", image, "--kill").succeeded)
        let summary = try inspect(image)
        #expect(summary.pid == workload.pid)
        #expect(summary.threads.count == 5)
        #expect(summary.mappings.contains { $0.name == "[stack]" })
        #expect(summary.mappings.contains { $0.backing == "vdso" })
        #expect(summary.files.map(\.fd) == [0, 1, 2])
        let text = try stasis("inspect", image)
        #expect(text.succeeded && text.stdout.contains("threads (5)") && text.stdout.contains("[heap]"))
        let stats = scratch.file("restore.json")
        let restore = try stasis("restore", image, "--detach", "--stats", stats)
        cleanup.track(workload.pid)
        #expect(restore.succeeded, "\(restore.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(contents(stats).utf8)) as! [String: Any]
        #expect((json["restore_ms"] as? Double ?? 0) > 0)
        #expect(try workload.check().ok)
    }
}

func counts(_ log: String) -> [Int] {
    log.split(separator: "\n").compactMap { $0.hasPrefix("count ") ? Int($0.dropFirst(6)) : nil }
}

func inspect(_ image: String) throws -> ImageSummary {
    let result = try stasis("inspect", image, "--json")
    guard result.succeeded else { throw TestFailure("inspect failed: \(result.stderr)") }
    return try JSONDecoder().decode(ImageSummary.self, from: Data(result.stdout.utf8))
}

/// fd → "flags" line of fdinfo, for every fd of a process.
func fdFlags(_ pid: pid_t) -> [String: String] {
    var result: [String: String] = [:]
    for fd in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? [] {
        result[fd] = contents("/proc/\(pid)/fdinfo/\(fd)").split(separator: "\n").first { $0.hasPrefix("flags:") }.map(String.init)
    }
    return result
}
