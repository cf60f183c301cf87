import Foundation
import Glibc
import Stasis

/// Where the package's built executables are: beside the test bundle.
enum Products {
    static let directory: String = {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        var dir = (exe as NSString).deletingLastPathComponent
        // swift test runs the .xctest bundle from the products directory.
        if dir.hasSuffix(".xctest/Contents/MacOS") { dir = ((dir as NSString).deletingLastPathComponent as NSString).deletingLastPathComponent }
        return dir
    }()

    static func path(_ name: String) -> String { directory + "/" + name }
    static var stasis: String { path("stasis") }
    static let python = "/usr/bin/python3"
    static var pythonWorkload: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Workloads/py_workload.py").path
    }
}

/// The outcome of running a command to completion.
struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
    var succeeded: Bool { status == 0 }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Runs a command with a time limit (killed past it), collecting its output.
@discardableResult
func runCommand(_ arguments: [String], stdin: Foundation.FileHandle? = nil, timeout: TimeInterval = 60) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: arguments[0])
    process.arguments = Array(arguments.dropFirst())
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = stdin ?? Foundation.FileHandle(forReadingAtPath: "/dev/null")
    try process.run()
    let outBox = DataBox(), errBox = DataBox()
    let group = DispatchGroup()
    group.enter()
    DispatchQueue.global().async { outBox.data = out.fileHandleForReading.readDataToEndOfFile(); group.leave() }
    group.enter()
    DispatchQueue.global().async { errBox.data = err.fileHandleForReading.readDataToEndOfFile(); group.leave() }
    let deadline = Date().addingTimeInterval(timeout)
    while process.isRunning && Date() < deadline { usleep(5000) }
    if process.isRunning {
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        group.wait()
        throw TestFailure("\(arguments.joined(separator: " ")) did not finish within \(timeout) s")
    }
    process.waitUntilExit()
    group.wait()
    let status = process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus
    return CommandResult(status: status, stdout: String(decoding: outBox.data, as: UTF8.self),
                         stderr: String(decoding: errBox.data, as: UTF8.self))
}

/// `stasis ARGS` running in the background, its stdout and stderr on pipes the test reads (or,
/// with `closedOutput`, stdout a pipe whose reader is already gone). Killed when released if it
/// still runs.
final class BackgroundStasis {
    let process = Process()
    let output = Pipe(), errors = Pipe()

    init(_ arguments: [String], closedOutput: Bool = false) throws {
        process.executableURL = URL(fileURLWithPath: Products.stasis)
        process.arguments = arguments
        process.standardOutput = output
        process.standardError = errors
        if closedOutput { try output.fileHandleForReading.close() }
        try process.run()
    }

    deinit { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }

    var pid: pid_t { process.processIdentifier }

    /// Waits for the image header in the output pipe: the stream has started.
    func waitForHeader() -> Bool {
        String(decoding: output.fileHandleForReading.readData(ofLength: 8), as: UTF8.self) == "STASISIM"
    }

    /// Waits (at most `seconds`) for it to exit; returns its status and what it wrote on stderr.
    func finish(within seconds: Double = 20) throws -> (status: Int32, stderr: String) {
        let process = self.process
        try waitUntil(seconds, "stasis to exit") { !process.isRunning }
        return (process.terminationStatus, String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
    }
}

/// Output collected on another thread; read only after the DispatchGroup is done.
final class DataBox: @unchecked Sendable {
    var data = Data()
}

extension String {
    var trimmed: String {
        String(drop(while: { $0 == " " || $0 == "\n" || $0 == "\t" }).reversed().drop(while: { $0 == " " || $0 == "\n" || $0 == "\t" }).reversed())
    }
}

/// Runs `stasis ARGS`.
@discardableResult
func stasis(_ arguments: String..., timeout: TimeInterval = 60) throws -> CommandResult {
    try runCommand([Products.stasis] + arguments, timeout: timeout)
}

func stasis(_ arguments: [String], timeout: TimeInterval = 60) throws -> CommandResult {
    try runCommand([Products.stasis] + arguments, timeout: timeout)
}

/// A scratch directory removed (with everything in it) when the test ends.
final class ScratchDirectory {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "stasis-test-" + UUID().uuidString.prefix(8)
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { path + "/" + name }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Processes and cgroups a test made, all killed and removed when it ends, also on failure.
final class Cleanup {
    private var pids: [pid_t] = []

    func track(_ pid: pid_t) { pids.append(pid) }

    deinit {
        for pid in pids { killAndForget(pid) }
    }
}

/// Kills a process and all its descendants (and whatever else is in its Stasis cgroup), waits
/// until their PIDs are free (reaped by whoever is their parent), and removes the cgroup.
func killAndForget(_ pid: pid_t) {
    guard pid > 1 else { return }
    let cgroup = StasisCgroup.of(pid: pid)
    var members = treeOf(pid)
    if let cgroup {
        members += contents(cgroup.path + "/cgroup.procs").split(separator: "\n").compactMap { pid_t($0) }
    }
    for member in Set(members) + [pid] where member > 1 {
        if kill(member, SIGKILL) == 0 || errno != ESRCH {
            var status: Int32 = 0
            _ = waitpid(member, &status, WNOHANG)
        }
    }
    for member in Set(members + [pid]) where member > 1 { try? waitForPIDToBeFree(member, timeoutSeconds: 10) }
    cgroup?.removeIfEmpty()
}

/// Reads a file, or "" if it does not exist.
func contents(_ path: String) -> String {
    (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
}

/// Waits until `condition` holds, for at most `seconds`.
func waitUntil(_ seconds: Double = 10, _ what: String, _ condition: () -> Bool) throws {
    let deadline = Date().addingTimeInterval(seconds)
    while !condition() {
        if Date() > deadline { throw TestFailure("timed out after \(seconds) s waiting for \(what)") }
        usleep(10_000)
    }
}

/// A verifying workload (wl-threads, wl-memory, wl-files, py_workload.py): started with
/// `stasis run`, it writes `ready` to its report file, and on SIGUSR1 a one-line JSON report.
struct Report: Decodable {
    var ok: Bool
    var progress: Int
    var pid: Int32
    var tids: [Int32]?
    var detail: String
    /// wl-sweep: the fewest full passes any thread has completed.
    var passes_min: Int?
    /// wl-shared: each worker's parent-death signal.
    var pdeathsig: [Int]?
}

final class VerifyingWorkload {
    let pid: pid_t
    let reportPath: String

    /// Starts `command` (which must accept `--report PATH`) through `stasis run` (with `runOptions`)
    /// and waits for it to be ready.
    init(_ command: [String], scratch: ScratchDirectory, cleanup: Cleanup, stdout: String? = nil, runOptions: [String] = []) throws {
        reportPath = scratch.file("report-\(UUID().uuidString.prefix(6)).json")
        var arguments = ["run"] + runOptions
        if let stdout { arguments += ["--stdout", stdout, "--stderr", stdout] }
        let result = try runCommand([Products.stasis] + arguments + ["--"] + command + ["--report", reportPath])
        guard result.succeeded, let pid = pid_t(result.stdout.trimmed) else {
            throw TestFailure("stasis run failed: \(result.stderr)")
        }
        self.pid = pid
        cleanup.track(pid)
        let path = reportPath
        try waitUntil(30, "workload \(command[0]) to be ready") { contents(path) == "ready\n" }
    }

    /// Asks for a self-check and returns the report.
    func check(pid: pid_t? = nil) throws -> Report {
        let target = pid ?? self.pid
        try? FileManager.default.removeItem(atPath: reportPath)
        guard kill(target, SIGUSR1) == 0 else { throw TestFailure("PID \(target) is not running") }
        let path = reportPath
        try waitUntil(30, "a report from \(target)") { contents(path).hasPrefix("{") }
        return try JSONDecoder().decode(Report.self, from: Data(contents(path).utf8))
    }
}

/// Snapshot → kill → restore of a running workload; returns the restored PID.
@discardableResult
/// Snapshot with `--kill` (live unless `extra` says otherwise), then restore detached.
/// Workloads whose output outside memory (files, logs) must continue exactly use
/// `--stop-the-world`: in a live snapshot, what they write after the freeze is not undone.
func cycle(_ pid: pid_t, image: String, cleanup: Cleanup, extra: [String] = []) throws -> pid_t {
    let snap = try stasis(["snapshot", "\(pid)", "-o", image, "--kill"] + extra)
    guard snap.succeeded else { throw TestFailure("snapshot failed: \(snap.stderr)") }
    guard access("/proc/\(pid)", F_OK) != 0 else { throw TestFailure("PID \(pid) still exists after snapshot --kill") }
    let restore = try stasis("restore", image, "--detach")
    guard restore.succeeded, let restored = pid_t(restore.stdout.trimmed) else {
        throw TestFailure("restore failed: \(restore.stderr)")
    }
    cleanup.track(restored)
    return restored
}

/// What /proc says about a process, to prove a refused or discarded snapshot — or a live one —
/// left it exactly as it was: run state, tracer, per-thread signal masks, dispositions, maps,
/// open files, and children (a live snapshot's clone must be gone and reaped).
struct ProcessCondition: Equatable {
    var state: String
    var tracerPID: String
    var blockedSignals: [String]
    var dispositions: [String]
    var maps: String
    var files: [String]
    var children: [String]

    init(_ pid: pid_t) throws {
        let status = contents("/proc/\(pid)/status")
        func field(_ key: String) -> String {
            status.split(separator: "\n").first { $0.hasPrefix(key + ":") }.map { String($0.dropFirst(key.count + 1)).trimmed } ?? ""
        }
        let letter = field("State").prefix(1)
        state = letter == "T" || letter == "t" ? "stopped" : "running"
        tracerPID = field("TracerPid")
        blockedSignals = (try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")).sorted().map {
            contents("/proc/\(pid)/task/\($0)/status").split(separator: "\n").first { $0.hasPrefix("SigBlk:") }.map(String.init) ?? ""
        }
        maps = contents("/proc/\(pid)/maps")
        dispositions = [field("SigIgn"), field("SigCgt")]
        files = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []).sorted().map {
            "\($0) -> \((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)")) ?? "?")"
        }
        children = (try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")).flatMap {
            contents("/proc/\(pid)/task/\($0)/children").split(separator: " ").map(String.init)
        }.sorted()
    }
}
