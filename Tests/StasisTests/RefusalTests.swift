import CStasis
import Foundation
import Glibc
import Stasis
import Testing

/// Snapshots Stasis must refuse, leaving the workload exactly as it was.
@Suite("refusals leave the workload untouched", .serialized, .timeLimit(.minutes(2)))
struct RefusalTests {
    @Test("a PID that does not exist")
    func noSuchProcess() throws {
        let scratch = ScratchDirectory()
        var pid: pid_t = 32000
        while access("/proc/\(pid)", F_OK) == 0 { pid -= 1 }
        let result = try stasis("snapshot", "\(pid)", "-o", scratch.file("x.stasis"))
        #expect(!result.succeeded)
        #expect(result.stderr.contains("no such process: PID \(pid)"))
        #expect(result.stderr.split(separator: "\n").count == 1)
        #expect(try FileManager.default.contentsOfDirectory(atPath: scratch.path).isEmpty, "no image or partial file left")
    }

    @Test("a kernel thread")
    func kernelThread() throws {
        let scratch = ScratchDirectory()
        let result = try stasis("snapshot", "2", "-o", scratch.file("x.stasis"))
        #expect(!result.succeeded)
        #expect(result.stderr.contains("PID 2"))
    }

    @Test("a process another tracer holds")
    func alreadyTraced() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-threads"), "--threads", "1"], scratch: scratch, cleanup: cleanup)
        let tracerThread = TracerThread()
        defer { tracerThread.shutdown() }
        try tracerThread.perform { tracer in try tracer.seize(workload.pid, options: 0) }
        let result = try stasis("snapshot", "\(workload.pid)", "-o", scratch.file("x.stasis"))
        try tracerThread.perform { tracer in
            try tracer.interrupt(workload.pid)
            _ = try tracer.waitForEvent(workload.pid)
            try tracer.detach(workload.pid)
        }
        #expect(!result.succeeded)
        #expect(result.stderr.contains("cannot trace PID \(workload.pid)") && result.stderr.contains("already traced"), "\(result.stderr)")
        #expect(try workload.check().ok)
    }

    @Test("unsupported file descriptors are refused by PID, fd and kind", arguments: [
        ("socket", "import socket, time; s = socket.socket(); open('READY', 'w').close(); time.sleep(120)"),
        ("an anonymous inode ([eventfd])", "import os, time; e = os.eventfd(0); open('READY', 'w').close(); time.sleep(120)"),
    ])
    func unsupportedFile(kind: String, program: String) throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let pid = try startPython(program, scratch: scratch, cleanup: cleanup)
        let before = try ProcessCondition(pid)
        let result = try stasis("snapshot", "\(pid)", "-o", scratch.file("x.stasis"))
        #expect(!result.succeeded)
        #expect(result.stderr.contains("PID \(pid)") && result.stderr.contains("fd 3 is") && result.stderr.contains(kind), "\(result.stderr)")
        #expect(try ProcessCondition(pid) == before, "the workload must be left exactly as it was")
        #expect(!FileManager.default.fileExists(atPath: scratch.file("x.stasis")))
        #expect(!FileManager.default.fileExists(atPath: scratch.file("x.stasis.partial")))
    }

    @Test("System V shared memory is refused with its address range")
    func sharedMemory() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        // shmget(IPC_PRIVATE, 64 KiB, IPC_CREAT|0600), shmat, then IPC_RMID: gone once detached.
        let program = "import ctypes, time; c = ctypes.CDLL(None); c.shmat.restype = ctypes.c_void_p; i = c.shmget(0, 65536, 0o1600); "
            + "p = c.shmat(i, None, 0); c.shmctl(i, 0, None); ctypes.memset(p, 1, 16); open('READY', 'w').close(); time.sleep(120)"
        let pid = try startPython(program, scratch: scratch, cleanup: cleanup)
        let before = try ProcessCondition(pid)
        let result = try stasis("snapshot", "\(pid)", "-o", scratch.file("x.stasis"))
        #expect(!result.succeeded)
        #expect(result.stderr.contains("System V shared memory at 0x"), "\(result.stderr)")
        #expect(try ProcessCondition(pid) == before)
    }

    @Test("restore refuses when the PID is taken, and leaves nothing behind")
    func pidTaken() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try VerifyingWorkload([Products.path("wl-threads"), "--threads", "2"], scratch: scratch, cleanup: cleanup)
        let image = scratch.file("taken.stasis")
        #expect(try stasis("snapshot", "\(workload.pid)", "-o", image).succeeded)
        let result = try stasis("restore", image)
        #expect(!result.succeeded)
        #expect(result.stderr.contains("PID \(workload.pid) is taken by process \(workload.pid)"), "\(result.stderr)")
        #expect(!stasisCgroups().contains("\(workload.pid)"), "restore must not leave a cgroup behind")
        #expect(try workload.check().ok)
    }
}

/// Starts `python3 -c PROGRAM` with `stasis run`; PROGRAM creates the file named READY once set up.
func startPython(_ program: String, scratch: ScratchDirectory, cleanup: Cleanup) throws -> pid_t {
    let ready = scratch.file("ready")
    let run = try stasis("run", "--", Products.python, "-c", program.replacingOccurrences(of: "READY", with: ready))
    guard let pid = pid_t(run.stdout.trimmed) else { throw TestFailure("stasis run failed: \(run.stderr)") }
    cleanup.track(pid)
    try waitUntil(10, "python to start") { FileManager.default.fileExists(atPath: ready) }
    return pid
}

func stasisCgroups() -> [String] {
    guard let root = StasisCgroup.root else { return [] }
    return ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).filter { !$0.hasPrefix("cgroup.") && !$0.contains(".") }.sorted()
}
