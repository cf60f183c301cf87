import Foundation
import Glibc
import Stasis
import Testing

/// Live snapshots: the image is the memory at the freeze even though the workload keeps
/// rewriting it while the image streams; a failed, cancelled or killed snapshot is discarded
/// and leaves the workload as it was.
///
/// The workload is wl-sweep: its threads add 1 to a counter in every page of their slice, in
/// order, recording their position after each page, and check each page's counter against the
/// pass number before incrementing it. Any page copied after the freeze breaks that for good,
/// and the restored workload finds it on its next pass.
@Suite("live snapshots", .serialized, .timeLimit(.minutes(6)))
struct LiveSnapshotTests {
    static let sweep = Products.path("wl-sweep")

    @Test("a 1 GiB workload snapshotted live at full speed restores to a point-in-time state")
    func pointInTimeAtOneGiB() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Self.sweep, "--mib", "1024", "--threads", "2"], scratch: scratch, cleanup: cleanup)
        #expect(try workload.check().ok)
        let stats = scratch.file("stats.json")
        let image = scratch.file("sweep.stasis")
        let snap = try stasis(["snapshot", "\(workload.pid)", "-o", image, "--kill", "--stats", stats], timeout: 120)
        try #require(snap.succeeded, "\(snap.stderr)")
        let json = try statsJSON(stats)
        #expect(json["mode"] as? String == "live")
        for key in ["freeze_ms", "stream_ms", "cow_pages", "peak_extra_bytes"] { #expect(json[key] != nil, "stats lack \(key)") }
        // The sweepers write every page of their slices many times a second: some of them
        // before the stream got there.
        #expect((json["cow_pages"] as? Int ?? 0) > 0)
        try restoreAndVerify(image, workload, cleanup: cleanup)
    }

    @Test("a slowly drained pipe: most pages are rewritten before they are streamed, the image is still point-in-time")
    func slowReader() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Self.sweep, "--mib", "160", "--threads", "2"], scratch: scratch, cleanup: cleanup)
        let image = scratch.file("slow.stasis"), stats = scratch.file("stats.json")
        // About 6 MiB/s: the 160 MiB stream takes ~25 s while the sweepers pass over every page
        // many times.
        let drain = "import sys,time\nstart=time.time();n=0\nwhile True:\n d=sys.stdin.buffer.read1(65536)\n if not d: break\n sys.stdout.buffer.write(d);n+=len(d)\n ahead=n/(6<<20)-(time.time()-start)\n if ahead>0: time.sleep(ahead)\n"
        let script = "'\(Products.stasis)' snapshot \(workload.pid) -o - --stats '\(stats)' | '\(Products.python)' -c '\(drain)' > '\(image)'"
        let result = try runCommand(["/bin/sh", "-c", script], timeout: 180)
        try #require(result.succeeded, "\(result.stderr)")
        let json = try statsJSON(stats)
        let pages = json["pages"] as? Int ?? 0
        let preserved = json["cow_pages"] as? Int ?? 0
        #expect(preserved > pages / 2, "only \(preserved) of \(pages) pages were written during the stream")
        // The original ran on meanwhile, unharmed.
        let during = try workload.check()
        #expect(during.ok, "\(during.detail)")
        killAndForget(workload.pid)
        try restoreAndVerify(image, workload, cleanup: cleanup)
    }

    @Test("the reader closes the pipe: the snapshot is discarded, the workload runs on untouched")
    func readerGoesAway() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Self.sweep, "--mib", "128", "--threads", "2"], scratch: scratch, cleanup: cleanup)
        let before = try ProcessCondition(workload.pid)
        let script = "'\(Products.stasis)' snapshot \(workload.pid) -o - | head -c 3000000 > /dev/null; exit ${PIPESTATUS[0]}"
        let result = try runCommand(["/bin/bash", "-c", script], timeout: 60)
        #expect(!result.succeeded)
        #expect(result.stderr.contains("discarded"), "\(result.stderr)")
        #expect(result.stderr.contains("Broken pipe") || result.stderr.contains("EPIPE") || result.stderr.contains("broken pipe"), "\(result.stderr)")
        try expectUntouched(workload, before: before)
    }

    @Test("the disk fills up: the snapshot is discarded, no partial image is left, the workload runs on")
    func diskFull() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let mountPoint = scratch.file("small")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        let mounted = try runCommand(["/bin/mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mountPoint])
        try #require(mounted.succeeded, "\(mounted.stderr)")
        defer { _ = try? runCommand(["/bin/umount", "-l", mountPoint]) }
        let workload = try VerifyingWorkload([Self.sweep, "--mib", "64", "--threads", "2"], scratch: scratch, cleanup: cleanup)
        let before = try ProcessCondition(workload.pid)
        let result = try stasis(["snapshot", "\(workload.pid)", "-o", mountPoint + "/full.stasis"])
        #expect(!result.succeeded)
        #expect(result.stderr.contains("discarded") && result.stderr.contains("No space left"), "\(result.stderr)")
        let left = (try? FileManager.default.contentsOfDirectory(atPath: mountPoint)) ?? []
        #expect(left.isEmpty, "left behind: \(left)")
        try expectUntouched(workload, before: before)
    }

    @Test("SIGINT or SIGTERM while the image streams: discarded, non-zero exit, workload untouched",
          arguments: [SIGINT, SIGTERM])
    func interrupted(signal: Int32) throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Self.sweep, "--mib", "128", "--threads", "2"], scratch: scratch, cleanup: cleanup)
        let before = try ProcessCondition(workload.pid)
        // Nobody reads the pipe: the snapshot blocks once it is full, mid-stream.
        let snapshot = try BackgroundStasis(["snapshot", "\(workload.pid)", "-o", "-"])
        // Wait until the stream has started: the image header is in the pipe.
        #expect(snapshot.waitForHeader())
        kill(snapshot.pid, signal)
        let (status, message) = try snapshot.finish()
        #expect(status != 0)
        #expect(message.contains("cancelled") && message.contains("discarded"), "\(message)")
        try expectUntouched(workload, before: before)
    }

    @Test("stasis killed with SIGKILL at random moments of freeze and stream: the workload runs on with nothing left")
    func killedAtRandomMoments() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Self.sweep, "--mib", "96", "--threads", "2"], scratch: scratch, cleanup: cleanup)
        let before = try ProcessCondition(workload.pid)
        var generator = SystemRandomNumberGenerator()
        var completed = 0
        // Delays from 0 (the worker not started yet, or freezing) to past the whole snapshot.
        let delays: [UInt32] = [0, 2_000, 10_000, 25_000, 50_000] + (0..<7).map { _ in UInt32.random(in: 0..<600_000, using: &generator) }
        for (round, delay) in delays.enumerated() {
            let image = scratch.file("killed-\(round).stasis")
            let process = Process()
            process.executableURL = URL(fileURLWithPath: Products.stasis)
            process.arguments = ["snapshot", "\(workload.pid)", "-o", image]
            process.standardOutput = Foundation.FileHandle(forWritingAtPath: "/dev/null")
            process.standardError = Foundation.FileHandle(forWritingAtPath: "/dev/null")
            try process.run()
            let supervisor = process.processIdentifier
            usleep(delay)
            kill(supervisor, SIGKILL)
            process.waitUntilExit()
            // The worker (if it had started) finishes discarding and exits on its own.
            try waitUntil(20, "the snapshot worker of round \(round) to exit") { snapshotWorkers(of: supervisor).isEmpty }
            try waitUntil(10, "the workload to be released (round \(round))") { (try? ProcessCondition(workload.pid)) == before }
            #expect(!FileManager.default.fileExists(atPath: image + ".partial"), "round \(round) left a partial image")
            if FileManager.default.fileExists(atPath: image) {
                // Killed after the image was complete: then it must be whole.
                completed += 1
                let inspect = try stasis("inspect", image)
                #expect(inspect.succeeded, "round \(round): \(inspect.stderr)")
            }
            let report = try workload.check()
            #expect(report.ok, "round \(round) (killed after \(delay) µs): \(report.detail)")
        }
        #expect(completed < delays.count, "every snapshot finished before it was killed; the test killed nothing")
    }

    @Test("a live snapshot leaves no trace: no child, zombie, fd, mapping, signal change or tracer")
    func noTrace() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Self.sweep, "--mib", "64", "--threads", "3"], scratch: scratch, cleanup: cleanup)
        let before = try ProcessCondition(workload.pid)
        for round in 0..<3 {
            let result = try stasis("snapshot", "\(workload.pid)", "-o", scratch.file("trace-\(round).stasis"))
            #expect(result.succeeded, "\(result.stderr)")
            #expect(try ProcessCondition(workload.pid) == before, "round \(round)")
        }
        let report = try workload.check()
        #expect(report.ok, "\(report.detail)")
    }

    @Test("a pids limit that forbids the clone: the snapshot is taken stop-the-world instead, with a warning")
    func pidsLimitFallsBack() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Self.sweep, "--mib", "32", "--threads", "2"], scratch: scratch, cleanup: cleanup)
        let root = "/sys/fs/cgroup/pids"
        try #require(FileManager.default.fileExists(atPath: root + "/cgroup.procs"), "no cgroup v1 pids hierarchy")
        let group = root + "/stasis-test-\(getpid())-\(workload.pid)"
        try FileManager.default.createDirectory(atPath: group, withIntermediateDirectories: false)
        defer {
            try? "\(workload.pid)".write(toFile: root + "/cgroup.procs", atomically: false, encoding: .utf8)
            rmdir(group)
        }
        try "\(workload.pid)".write(toFile: group + "/cgroup.procs", atomically: false, encoding: .utf8)
        let tasks = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(workload.pid)/task").count
        try "\(tasks)".write(toFile: group + "/pids.max", atomically: false, encoding: .utf8)
        let stats = scratch.file("stats.json"), image = scratch.file("limited.stasis")
        let result = try stasis("snapshot", "\(workload.pid)", "-o", image, "--kill", "--stats", stats)
        try #require(result.succeeded, "\(result.stderr)")
        #expect(result.stderr.contains("could not be cloned"), "\(result.stderr)")
        #expect(try statsJSON(stats)["mode"] as? String == "stop-the-world")
        try restoreAndVerify(image, workload, cleanup: cleanup)
    }

    @Test("-o naming a device or a FIFO writes into it instead of replacing it")
    func deviceAndFIFODestinations() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Self.sweep, "--mib", "16", "--threads", "1"], scratch: scratch, cleanup: cleanup)
        // A private null device node, so that a failure cannot damage the real /dev/null.
        let device = scratch.file("null")
        try #require(mknod(device, S_IFCHR | 0o666, dev_t(0x103)) == 0)  // major 1, minor 3
        #expect(try stasis("snapshot", "\(workload.pid)", "-o", device).succeeded)
        let st = try FileManager.default.attributesOfItem(atPath: device)
        #expect(st[.type] as? FileAttributeType == .typeCharacterSpecial, "the device node was replaced")
        let fifo = scratch.file("fifo"), copy = scratch.file("from-fifo.stasis")
        try #require(mkfifo(fifo, 0o600) == 0)
        let reader = Process()
        reader.executableURL = URL(fileURLWithPath: "/bin/sh")
        reader.arguments = ["-c", "cat '\(fifo)' > '\(copy)'"]
        try reader.run()
        // If stasis never opens the FIFO, cat would wait for a writer forever.
        defer { if reader.isRunning { kill(reader.processIdentifier, SIGKILL) } }
        let result = try stasis("snapshot", "\(workload.pid)", "-o", fifo, "--kill")
        #expect(result.succeeded, "\(result.stderr)")
        try waitUntil(20, "the FIFO reader to finish") { !reader.isRunning }
        try restoreAndVerify(copy, workload, cleanup: cleanup)
    }

    @Test("--stop-the-world keeps the process frozen until the image is complete")
    func stopTheWorld() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Self.sweep, "--mib", "64", "--threads", "2"], scratch: scratch, cleanup: cleanup)
        let stats = scratch.file("stats.json"), image = scratch.file("stw.stasis")
        let result = try stasis("snapshot", "\(workload.pid)", "-o", image, "--kill", "--stop-the-world", "--stats", stats)
        try #require(result.succeeded, "\(result.stderr)")
        let json = try statsJSON(stats)
        #expect(json["mode"] as? String == "stop-the-world")
        #expect(json["cow_pages"] as? Int == 0)
        // Frozen through the whole stream.
        #expect((json["freeze_ms"] as? Double ?? 0) >= (json["stream_ms"] as? Double ?? 1))
        try restoreAndVerify(image, workload, cleanup: cleanup)
    }
}

private func statsJSON(_ path: String) throws -> [String: Any] {
    guard let json = try JSONSerialization.jsonObject(with: Data(contents(path).utf8)) as? [String: Any] else {
        throw TestFailure("no stats JSON in \(path)")
    }
    return json
}

/// Restores `image` detached (the sweeper comes back under its PID) and verifies every page.
private func restoreAndVerify(_ image: String, _ workload: VerifyingWorkload, cleanup: Cleanup) throws {
    let restore = try stasis(["restore", image, "--detach"], timeout: 120)
    cleanup.track(workload.pid)
    guard restore.succeeded else { throw TestFailure("restore of \(image) failed: \(restore.stderr)") }
    try expectEveryPageVerified(workload)
}

/// Waits until every thread of the (restored) sweeper has completed two more passes — each
/// page checked at least once since the restore — then expects a clean report.
private func expectEveryPageVerified(_ workload: VerifyingWorkload) throws {
    let first = try workload.check()
    #expect(first.ok, "\(first.detail)")
    let target = (first.passes_min ?? 0) + 2
    var last = first
    let deadline = Date().addingTimeInterval(90)
    while (last.passes_min ?? 0) < target && Date() < deadline {
        usleep(200_000)
        last = try workload.check()
    }
    #expect((last.passes_min ?? 0) >= target, "the restored sweeper did not complete two passes")
    #expect(last.ok, "\(last.detail)")
}

/// The workload is exactly as before (no tracer, clone, zombie, fd, mapping or signal change),
/// still consistent, and still working.
private func expectUntouched(_ workload: VerifyingWorkload, before: ProcessCondition) throws {
    try waitUntil(20, "the workload to be released") { (try? ProcessCondition(workload.pid)) == before }
    let first = try workload.check()
    usleep(300_000)
    let second = try workload.check()
    #expect(second.ok, "\(second.detail)")
    #expect(second.progress > first.progress)
}

/// Snapshot workers (re-executed `stasis snapshot`) whose supervisor was `supervisor`.
private func snapshotWorkers(of supervisor: pid_t) -> [pid_t] {
    let marker = "STASIS_SNAPSHOT_SUPERVISOR=\(supervisor)"
    return ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { pid_t($0) }.filter { pid in
        let environment = (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/environ"))) ?? Data()
        return environment.split(separator: 0).contains { String(decoding: $0, as: UTF8.self) == marker }
    }
}
