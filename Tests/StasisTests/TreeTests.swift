import Foundation
import Glibc
import Stasis
import Testing

/// Process trees: pipelines, shared memory, zombies, blocking calls, PID namespaces.
@Suite("process trees", .serialized, .timeLimit(.minutes(4)))
struct TreeTests {
    static let pipeProgram = Products.path("wl-pipe")

    /// `sh -c 'wl-pipe produce | wl-pipe filter | wl-pipe consume --report R'` through `stasis run`.
    struct Pipeline {
        let root: pid_t
        let report: String

        init(scratch: ScratchDirectory, cleanup: Cleanup, pidNamespace: Bool = false) throws {
            report = scratch.file("consumer.json")
            let command = "\(TreeTests.pipeProgram) produce | \(TreeTests.pipeProgram) filter | \(TreeTests.pipeProgram) consume --report \(report)"
            let run = try stasis(["run"] + (pidNamespace ? ["--pidns"] : []) + ["--", "/bin/sh", "-c", command])
            guard let pid = pid_t(run.stdout.trimmed) else { throw TestFailure("stasis run failed: \(run.stderr)") }
            root = pid
            cleanup.track(pid)
            let path = report
            try waitUntil(20, "the consumer to be ready") { contents(path) == "ready\n" }
            try waitUntil(10, "the pipeline's four processes") { treeOf(pid).count == 4 }
        }

        /// The consumer's PID as Stasis sees it, in the tree under `root`.
        func consumer(under root: pid_t? = nil) throws -> pid_t {
            guard let pid = treeOf(root ?? self.root).first(where: { contents("/proc/\($0)/cmdline").split(separator: "\0").contains("consume") }) else {
                throw TestFailure("no consumer under \(root ?? self.root)")
            }
            return pid
        }

        func check(under root: pid_t? = nil) throws -> Report {
            let target = try consumer(under: root)
            try? FileManager.default.removeItem(atPath: report)
            guard kill(target, SIGUSR1) == 0 else { throw TestFailure("consumer \(target) is not running") }
            let path = report
            try waitUntil(20, "a report from the consumer \(target)") { contents(path).hasPrefix("{") }
            return try JSONDecoder().decode(Report.self, from: Data(contents(path).utf8))
        }
    }

    @Test("a three-process pipeline: no number lost or repeated, same PIDs, parents, groups and sessions")
    func pipeline() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let pipeline = try Pipeline(scratch: scratch, cleanup: cleanup)
        let before = try pipeline.check()
        #expect(before.ok, "\(before.detail)")
        let shapeBefore = treeShape(pipeline.root)
        let image = scratch.file("pipeline.stasis")
        let restored = try cycle(pipeline.root, image: image, cleanup: cleanup)
        #expect(restored == pipeline.root)
        #expect(treeShape(restored) == shapeBefore, "PIDs, parents, process groups and sessions must be as before")
        // Two checks a while apart: numbers keep flowing without a gap or a repeat.
        let first = try pipeline.check()
        #expect(first.ok, "\(first.detail)")
        usleep(500_000)
        let second = try pipeline.check()
        #expect(second.ok, "\(second.detail)")
        #expect(second.progress > first.progress && first.progress >= before.progress)
        let summary = try inspect(image)
        #expect(summary.processes.count == 4)
        #expect(summary.pipes.count == 2)
    }

    @Test("16 workers keep a counter in shared memory under a process-shared mutex; private memory stays private")
    func sharedMemory() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-shared"), "--workers", "16"], scratch: scratch, cleanup: cleanup)
        let before = try workload.check()
        #expect(before.ok, "\(before.detail)")
        let children = treeOf(workload.pid).filter { $0 != workload.pid }
        #expect(children.count == 16)
        try cycle(workload.pid, image: scratch.file("shared.stasis"), cleanup: cleanup)
        let after = try workload.check()
        #expect(after.ok, "\(after.detail)")
        #expect(after.progress > before.progress)
        #expect(after.pdeathsig == before.pdeathsig && before.pdeathsig == Array(repeating: Int(SIGKILL), count: 16),
                "each worker keeps its parent-death signal: \(after.pdeathsig ?? [])")
        // After the restore the workers still map one object: the same inode in every process.
        let inodes = Set(([workload.pid] + children).map { sharedInode(of: $0) })
        #expect(inodes.count == 1 && inodes.first != nil && inodes.first! != "", "shared memory inodes: \(inodes)")
        usleep(300_000)
        let later = try workload.check()
        #expect(later.ok, "\(later.detail)")
    }

    @Test("a memfd mapped by a parent and its child (running as another user) stays one shared object")
    func memfdAndCredentials() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let program = URL(fileURLWithPath: Products.pythonWorkload).deletingLastPathComponent().appendingPathComponent("py_memfd_tree.py").path
        let workload = try VerifyingWorkload([Products.python, program], scratch: scratch, cleanup: cleanup)
        let before = try workload.check()
        #expect(before.ok, "\(before.detail)")
        let image = scratch.file("memfd.stasis")
        try cycle(workload.pid, image: image, cleanup: cleanup)
        let after = try workload.check()
        #expect(after.ok, "\(after.detail)")
        #expect(after.progress > before.progress)
        let summary = try inspect(image)
        #expect(summary.shared_memory.count == 1 && summary.shared_memory.first?.kind == "memfd")
    }

    @Test("unreaped zombies come back with their exit statuses, and their parent can still wait for them")
    func zombies() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-zombies"), "--children", "4"], scratch: scratch, cleanup: cleanup)
        let before = try workload.check()
        #expect(before.ok, "\(before.detail)")
        let zombiesBefore = treeOf(workload.pid).filter { state(of: $0) == "Z" }.sorted()
        #expect(zombiesBefore.count == 5)
        let image = scratch.file("zombies.stasis")
        try cycle(workload.pid, image: image, cleanup: cleanup)
        #expect(treeOf(workload.pid).filter { state(of: $0) == "Z" }.sorted() == zombiesBefore)
        let after = try workload.check()
        #expect(after.ok, "\(after.detail)")
        // Reap them now: each status must be the one it died with before the snapshot.
        try? FileManager.default.removeItem(atPath: workload.reportPath)
        #expect(kill(workload.pid, SIGUSR2) == 0)
        try waitUntil(10, "the zombies to be reaped") { treeOf(workload.pid).filter { state(of: $0) == "Z" }.isEmpty }
        let reaped = try workload.check()
        #expect(reaped.ok, "\(reaped.detail)")
        #expect(try inspect(image).processes.filter { $0.zombie_wait_status != nil }.count == 5)
    }

    @Test("two writers sharing one open file description keep sharing its offset; a FIFO keeps its buffered bytes")
    func sharedOffsetAndFIFO() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let out = scratch.file("out.txt"), fifo = scratch.file("fifo")
        try #require(mkfifo(fifo, 0o600) == 0)
        // fd 3 (no O_APPEND) is inherited by both writers: one offset, so no line overwrites another.
        let script = "exec 3>'\(out)' 4<>'\(fifo)'; echo queued >&4; "
            + "w() { i=0; while :; do i=$((i+1)); echo \"$1 $i\" >&3; sleep 0.005; done; }; w a & w b & wait"
        let run = try stasis("run", "--", "/bin/sh", "-c", script)
        let pid = try #require(pid_t(run.stdout.trimmed))
        cleanup.track(pid)
        try waitUntil(10, "both writers") { contents(out).contains("a 20\n") && contents(out).contains("b 20\n") }
        // Stop-the-world: nothing they write after the freeze may reach the file before the kill.
        try cycle(pid, image: scratch.file("offsets.stasis"), cleanup: cleanup, extra: ["--stop-the-world"])
        let written = contents(out).count
        try waitUntil(10, "writing to go on") { contents(out).count > written + 200 }
        // The restored shell holds the FIFO open: its buffered line is still there.
        let reader = open(fifo, O_RDONLY | O_NONBLOCK)
        try #require(reader >= 0)
        var buffer = [UInt8](repeating: 0, count: 64)
        let got = read(reader, &buffer, 64)
        #expect(got == 7 && String(decoding: buffer.prefix(max(got, 0)), as: UTF8.self) == "queued\n", "the FIFO's bytes: \(got)")
        close(reader)
        killAndForget(pid)
        var last: [Substring: Int] = ["a": 0, "b": 0]
        for line in contents(out).split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count == 2, let writer = fields.first, let count = Int(fields[1]), last[writer] != nil else {
                Issue.record("garbled line \"\(line)\": the writers overwrote each other")
                return
            }
            #expect(count == last[writer]! + 1, "\(writer): \(count) after \(last[writer]!)")
            last[writer] = count
        }
        #expect(last["a"]! > 20 && last["b"]! > 20)
    }

    @Test("processes blocked in read, nanosleep, futex and wait4 resume correctly")
    func blockedCalls() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-blocked")], scratch: scratch, cleanup: cleanup)
        usleep(2_500_000)
        let before = try workload.check()
        #expect(before.ok, "\(before.detail)")
        try cycle(workload.pid, image: scratch.file("blocked.stasis"), cleanup: cleanup)
        usleep(3_000_000)
        let after = try workload.check()
        #expect(after.ok, "\(after.detail)")
        #expect(after.progress > before.progress)
    }

    @Test("a tree started with --pidns restores into new namespaces, three copies at once, each working and independent")
    func threeNamespaces() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let pipeline = try Pipeline(scratch: scratch, cleanup: cleanup, pidNamespace: true)
        #expect(namespacePIDs(pipeline.root).last == 1, "the root is PID 1 of its own namespace")
        #expect(try pipeline.check().ok)
        let image = scratch.file("namespace.stasis")
        let snap = try stasis("snapshot", "\(pipeline.root)", "-o", image, "--kill")
        try #require(snap.succeeded, "\(snap.stderr)")
        #expect(try inspect(image).pid_namespace)
        var copies: [pid_t] = []
        for _ in 0..<3 {
            let restore = try stasis("restore", image, "--detach")
            try #require(restore.succeeded, "\(restore.stderr)")
            let root = try #require(pid_t(restore.stdout.trimmed))
            cleanup.track(root)
            copies.append(root)
        }
        #expect(Set(copies).count == 3)
        for root in copies {
            #expect(namespacePIDs(root).last == 1)
            #expect(treeOf(root).count == 4)
            let report = try pipeline.check(under: root)
            #expect(report.ok, "copy \(root): \(report.detail)")
        }
        // Independent: killing one copy leaves the others working.
        killAndForget(copies[1])
        usleep(300_000)
        for root in [copies[0], copies[2]] {
            let report = try pipeline.check(under: root)
            #expect(report.ok, "copy \(root) after another was killed: \(report.detail)")
        }
    }

    @Test("threads of a process in its own PID namespace keep their TIDs inside it, and their register state")
    func threadsInNamespace() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-threads"), "--threads", "4"], scratch: scratch, cleanup: cleanup,
                                             runOptions: ["--pidns"])
        let before = try workload.check()
        #expect(before.ok, "\(before.detail)")
        #expect(before.pid == 1, "it sees itself as PID 1")
        let image = scratch.file("threads-ns.stasis")
        let snap = try stasis("snapshot", "\(workload.pid)", "-o", image, "--kill")
        try #require(snap.succeeded, "\(snap.stderr)")
        let restore = try stasis("restore", image, "--detach")
        try #require(restore.succeeded, "\(restore.stderr)")
        let root = try #require(pid_t(restore.stdout.trimmed))
        cleanup.track(root)
        let after = try workload.check(pid: root)
        #expect(after.ok, "\(after.detail)")
        #expect(after.tids == before.tids, "TIDs inside the namespace")
        #expect(after.progress > before.progress)
    }

    @Test("restore --pidns puts an ordinary tree into a fresh namespace with its original PIDs inside")
    func restoreIntoNamespace() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-shared"), "--workers", "3"], scratch: scratch, cleanup: cleanup)
        let image = scratch.file("plain.stasis")
        let snap = try stasis("snapshot", "\(workload.pid)", "-o", image)
        try #require(snap.succeeded, "\(snap.stderr)")
        let restore = try stasis("restore", image, "--detach", "--pidns")
        try #require(restore.succeeded, "\(restore.stderr)")
        let root = try #require(pid_t(restore.stdout.trimmed))
        cleanup.track(root)
        #expect(root != workload.pid)
        #expect(namespacePIDs(root).last == workload.pid, "inside its namespace the root has its original PID")
        #expect(try workload.check(pid: root).ok)
        #expect(try workload.check().ok, "the original runs on")
    }

    @Test("a tree that keeps forking at its pids limit is frozen whole or refused, and left running")
    func forkingAtTheLimit() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let root = "/sys/fs/cgroup/pids"
        try #require(FileManager.default.fileExists(atPath: root + "/cgroup.procs"), "no cgroup v1 pids hierarchy")
        let group = root + "/stasis-test-bomb-\(getpid())"
        try FileManager.default.createDirectory(atPath: group, withIntermediateDirectories: false)
        defer {
            for _ in 0..<50 {
                let pids = contents(group + "/cgroup.procs").split(separator: "\n").compactMap { pid_t($0) }
                if pids.isEmpty { break }
                for pid in pids { kill(pid, SIGKILL) }
                usleep(100_000)
            }
            rmdir(group)
        }
        try "24".write(toFile: group + "/pids.max", atomically: false, encoding: .utf8)
        // Every process forks as fast as it can, children exit after 200 ms; at the limit the
        // forks fail and are retried.
        let run = try stasis("run", "--", "/bin/sh", "-c", "echo $$ > \(group)/cgroup.procs; exec \(Products.path("wl-forker"))")
        let pid = try #require(pid_t(run.stdout.trimmed))
        cleanup.track(pid)
        try waitUntil(20, "the tree to reach its limit") { contents(group + "/pids.events") != "max 0\n" }
        #expect(kill(pid, 0) == 0, "the forking tree's root runs")
        let image = scratch.file("bomb.stasis")
        let result = try stasis("snapshot", "\(pid)", "-o", image, timeout: 120)
        if result.succeeded {
            // Whole: every process's parent is in the image, and the root is the one asked for.
            let summary = try inspect(image)
            #expect(summary.processes.count >= 2 && summary.processes.count <= 24, "\(summary.processes.count) processes")
            let pids = Set(summary.processes.map(\.pid))
            #expect(summary.processes.first?.pid == pid)
            for process in summary.processes.dropFirst() {
                #expect(pids.contains(process.parent), "PID \(process.pid)'s parent \(process.parent) is missing")
            }
        } else {
            #expect(result.stderr.contains("PID "), "a refusal names the PID: \(result.stderr)")
            #expect(!FileManager.default.fileExists(atPath: image))
        }
        // Either way nothing is left traced or stopped.
        for member in contents(group + "/cgroup.procs").split(separator: "\n").compactMap({ pid_t($0) }) {
            let status = contents("/proc/\(member)/status")
            #expect(status.isEmpty || status.contains("TracerPid:\t0"), "PID \(member) is still traced")
        }
    }

    @Test("a member that uses something unsupported is refused by its PID; the tree runs on untouched")
    func memberRefused() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let ready = scratch.file("ready")
        let child = "import socket, time; s = socket.socket(); open('\(ready)', 'w').close(); time.sleep(120)"
        let run = try stasis("run", "--", "/bin/sh", "-c", "\(Products.python) -c \"\(child)\" & wait")
        let pid = try #require(pid_t(run.stdout.trimmed))
        cleanup.track(pid)
        try waitUntil(10, "the child to start") { FileManager.default.fileExists(atPath: ready) }
        let python = try #require(treeOf(pid).first { $0 != pid })
        let before = [try ProcessCondition(pid), try ProcessCondition(python)]
        let result = try stasis("snapshot", "\(pid)", "-o", scratch.file("x.stasis"))
        #expect(!result.succeeded)
        #expect(result.stderr.contains("PID \(python)") && result.stderr.contains("socket"), "\(result.stderr)")
        #expect([try ProcessCondition(pid), try ProcessCondition(python)] == before, "the tree must be left exactly as it was")
    }

    @Test("SIGTERM while a tree's image streams: discarded, every process exactly as before, every clone gone")
    func treeDiscarded() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        // Five processes of 8 MiB each: far more than the 1 MiB pipe nobody reads.
        let workload = try VerifyingWorkload([Products.path("wl-tree"), "--procs", "5", "--mb", "8"], scratch: scratch, cleanup: cleanup)
        let members = treeOf(workload.pid)
        try #require(members.count == 5)
        let before = try members.map { try ProcessCondition($0) }
        let snapshot = try BackgroundStasis(["snapshot", "\(workload.pid)", "-o", "-"])
        #expect(snapshot.waitForHeader())
        usleep(200_000)
        kill(snapshot.pid, SIGTERM)
        let (status, message) = try snapshot.finish()
        #expect(status != 0)
        #expect(message.contains("cancelled") && message.contains("discarded"), "\(message)")
        try waitUntil(20, "every process to be released as it was") {
            (try? members.map { try ProcessCondition($0) }) == before
        }
        let report = try workload.check()
        #expect(report.ok, "\(report.detail)")
    }

    @Test("an image of format 1.x (one process, no tree record) still restores")
    func formatOneImage() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-threads"), "--threads", "2"], scratch: scratch, cleanup: cleanup)
        let current = scratch.file("v2.stasis"), old = scratch.file("v1.stasis")
        let snap = try stasis("snapshot", "\(workload.pid)", "-o", current, "--kill")
        try #require(snap.succeeded, "\(snap.stderr)")
        // Rewrite it the way format 1.0 laid it out: the process section, its page blocks, the end
        // record; no tree, object-data or process-pages records, no fd descriptions; major 1.
        let reader = try ImageReader(source: try Stasis.FileHandle.open(current, O_RDONLY))
        let metadata = try TreeMetadata.read(from: reader)
        try #require(metadata.processes.count == 1)
        let section = metadata.processes[0]
        let writer = try ImageWriter(sink: try Stasis.FileHandle.open(old, O_WRONLY | O_CREAT | O_TRUNC, permissions: 0o600))
        try writer.writeRecord(.process, section.process)
        for thread in section.threads { try writer.writeRecord(.thread, thread) }
        try writer.writeRecord(.mappings, MappingTable(mappings: section.mappings))
        var files = section.files
        for index in files.descriptors.indices { files.descriptors[index].description = nil }
        try writer.writeRecord(.files, files)
        while let item = try reader.next() {
            if case let .pages(runs, data) = item { try writer.writePageBlock(runs: runs, data: data.baseAddress!) }
        }
        try writer.finish()
        var bytes = Array(FileManager.default.contents(atPath: old)!)
        bytes[8] = 1; bytes[9] = 0; bytes[10] = 0; bytes[11] = 0
        let crc = bytes.withUnsafeBytes { crc32c($0.baseAddress, 28) }
        withUnsafeBytes(of: crc.littleEndian) { for (offset, byte) in $0.enumerated() { bytes[28 + offset] = byte } }
        try Data(bytes).write(to: URL(fileURLWithPath: old))
        #expect(try inspect(old).format_version == "1.0")
        let restore = try stasis("restore", old, "--detach")
        try #require(restore.succeeded, "\(restore.stderr)")
        cleanup.track(workload.pid)
        let after = try workload.check()
        #expect(after.ok, "\(after.detail)")
    }

    @Test("a pipe shared with a process outside the tree is refused before anything is frozen")
    func pipeToOutside() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        var ends: [Int32] = [0, 0]
        try #require(pipe(&ends) == 0)
        defer { close(ends[0]); close(ends[1]) }
        let pipePath = "/proc/\(getpid())/fd/\(ends[1])"
        let run = try stasis("run", "--stdout", pipePath, "--", "/bin/sh", "-c", "while :; do sleep 1; done")
        let pid = try #require(pid_t(run.stdout.trimmed))
        cleanup.track(pid)
        let result = try stasis("snapshot", "\(pid)", "-o", scratch.file("x.stasis"))
        #expect(!result.succeeded)
        #expect(result.stderr.contains("PID \(pid)") && result.stderr.contains("outside the tree"), "\(result.stderr)")
        #expect(contents("/proc/\(pid)/status").contains("TracerPid:\t0"))
    }
}

/// `pid` and all its descendants, as /proc lists them now.
func treeOf(_ pid: pid_t) -> [pid_t] {
    var result: [pid_t] = []
    var queue = [pid]
    while let next = queue.first {
        queue.removeFirst()
        guard FileManager.default.fileExists(atPath: "/proc/\(next)") else { continue }
        result.append(next)
        for task in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(next)/task")) ?? [] {
            queue += contents("/proc/\(next)/task/\(task)/children").split(separator: " ").compactMap { pid_t($0) }
        }
    }
    return result
}

/// "pid ppid pgid sid" of every process of the tree, sorted.
func treeShape(_ pid: pid_t) -> [String] {
    treeOf(pid).map { member in
        let text = contents("/proc/\(member)/stat")
        let fields = text[text.index(after: text.lastIndex(of: ")")!)...].split(separator: " ")
        return "\(member) \(fields[1]) \(fields[2]) \(fields[3])"
    }.sorted()
}

func state(of pid: pid_t) -> String {
    let text = contents("/proc/\(pid)/stat")
    guard let close = text.lastIndex(of: ")") else { return "" }
    return String(text[text.index(close, offsetBy: 2)])
}

func namespacePIDs(_ pid: pid_t) -> [pid_t] {
    let line = contents("/proc/\(pid)/status").split(separator: "\n").first { $0.hasPrefix("NSpid:") } ?? ""
    return line.dropFirst(6).split(whereSeparator: { $0 == "\t" || $0 == " " }).compactMap { pid_t($0) }
}

/// The inode of the first MAP_SHARED anonymous mapping of `pid` ("/dev/zero (deleted)").
func sharedInode(of pid: pid_t) -> String {
    let line = contents("/proc/\(pid)/maps").split(separator: "\n").first { $0.contains("/dev/zero") && $0.contains("rw-s") } ?? ""
    let fields = line.split(separator: " ", omittingEmptySubsequences: true)
    return fields.count > 4 ? String(fields[4]) : ""
}
