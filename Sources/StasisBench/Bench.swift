import ArgumentParser
import Glibc
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Stasis

/// `stasis-bench`: measures the real `stasis` binary on wl-bench workloads and prints Markdown.
/// `core` (the default, so `stasis-bench --quick` still works) is the snapshot/restore benchmark;
/// `live` measures live snapshots: the freeze against the copy-on-write floor (LiveBench.swift);
/// `tree` measures process trees: freeze and restore time against processes and threads (TreeBench.swift).
/// `fs` measures `snapshot --fs`: fs_ms, freeze and restore against files and mechanism (FsBench.swift).
struct StasisBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stasis-bench",
        abstract: "Benchmark stasis against in-run limits and floors; prints Markdown tables.",
        subcommands: [CoreBench.self, LiveBench.self, TreeBench.self, FsBench.self],
        defaultSubcommand: CoreBench.self)
}

/// `stasis-bench [core]`: snapshot throughput and restore time against in-run limits.
struct CoreBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "core",
        abstract: "Snapshot/restore throughput and restore time against in-run limits.",
        discussion: """
            For each workload size: starts `stasis run -- wl-bench --mb N`, measures `stasis snapshot` to a \
            file and to a pipe, interleaved with the limit (process_vm_readv of the same memory written \
            to the same destination), then `stasis snapshot --kill` and `stasis restore --detach`, \
            interleaved with the cost of fresh anonymous memory of that size. Medians are reported; \
            progress goes to stderr, the report to stdout. Snapshots are live (stasis' default) \
            unless --stop-the-world is given.
            """)

    @Option(help: "Workload sizes in MiB, comma-separated.")
    var sizes = "64,1024,4096"
    @Option(help: "Repetitions: one number for every size, or one per size, comma-separated (default 5 below 1024 MiB, else 3).")
    var reps: String?
    @Flag(help: "64 MiB only, 3 repetitions.")
    var quick = false
    @Option(help: "Directory for image files (a stasis-bench-XXXXXX directory is made in it and removed).")
    var dir = "/var/tmp"
    @Option(help: "Capacity of the pipe in bytes (F_SETPIPE_SZ); 0 keeps the kernel's default (64 KiB).")
    var pipeSize = 0
    @Option(help: "The stasis executable (default: next to stasis-bench).")
    var stasis: String?
    @Option(help: "The wl-bench executable (default: next to stasis-bench).")
    var workload: String?
    @Flag(help: "Do not check that restored processes hold the workload's data.")
    var noVerify = false
    @Flag(help: "Do not populate and free memory of the workload's size before each measured file write (see docs/benchmarks.md).")
    var noPrewarm = false
    @Flag(name: .customLong("stop-the-world"), help: "Pass --stop-the-world to every `stasis snapshot` (the semantics of the first reference run).")
    var stopTheWorld = false

    @Option(help: .hidden)
    var serveMemory: Int?
    @Flag(help: .hidden)
    var populate = false

    func run() throws {
        if let serveMemory { runMemoryHelper(bytes: serveMemory << 20, populate: populate) }
        Emergency.setUp()
        let sizeList = quick ? [64] : try parseList(sizes, "--sizes")
        let repList: [Int]
        if quick && reps == nil {
            repList = [3]
        } else if let reps {
            let parsed = try parseList(reps, "--reps")
            guard parsed.count == 1 || parsed.count == sizeList.count else {
                throw ValidationError("--reps needs one number or one per size")
            }
            repList = parsed.count == 1 ? Array(repeating: parsed[0], count: sizeList.count) : parsed
        } else {
            repList = sizeList.map { $0 < 1024 ? 5 : 3 }
        }
        let directory = try executableDirectory()
        let config = BenchConfig(
            stasis: stasis ?? directory + "/stasis", workload: workload ?? directory + "/wl-bench",
            pipeSize: pipeSize, verify: !noVerify, prewarm: !noPrewarm, selfPath: try executablePath(),
            stopTheWorld: stopTheWorld)
        for tool in [config.stasis, config.workload] where access(tool, X_OK) != 0 {
            throw ValidationError("\(tool) is missing; build with `swift build -c release`")
        }
        var template = Array((dir + "/stasis-bench-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw BenchError("cannot create a directory in \(dir): \(errnoText())") }
        let work = String(cString: made)

        let runner = BenchRunner(config: config, work: work)
        var results: [SizeResult] = []
        var failure: Error?
        let startedAt = now()
        let machine = MachineInfo.collect(directory: work, pipeSize: pipeSize)
        progress("stasis-bench: sizes \(sizeList.map { "\($0) MiB" }.joined(separator: ", ")), repetitions \(repList.map(String.init).joined(separator: ", ")); work directory \(work)")
        if machine.backgroundBusyPercent > 15 {
            progress("warning: the CPUs were \(Int(machine.backgroundBusyPercent))% busy before the benchmark started; results will be disturbed")
        }
        do {
            for (size, count) in zip(sizeList, repList) {
                let result = SizeResult(mebibytes: size, repetitions: count)
                results.append(result)  // reported even if this size fails part-way
                try runner.measure(result)
            }
        } catch {
            failure = error
        }
        runner.cleanUp()
        let elapsed = Double(now() - startedAt) / 1e9
        var endMachine = machine
        endMachine.backgroundBusyPercentAtEnd = MachineInfo.busyPercent(seconds: 0.5)
        if !results.isEmpty {
            print(Report(results: results, machine: endMachine, config: config, elapsedSeconds: elapsed,
                         arguments: CommandLine.arguments, invocations: runner.invocations, crashes: runner.crashes).markdown())
        }
        if let failure {
            progress("stasis-bench: \(interrupted != 0 ? "interrupted (\(failure))" : "\(failure)")")
            throw ExitCode(1)
        }
    }
}

func parseList(_ text: String, _ name: String) throws -> [Int] {
    let values = text.split(separator: ",").map { Int(String($0).trimmingCharacters(in: " ")) }
    guard !values.isEmpty, values.allSatisfy({ ($0 ?? 0) > 0 }) else { throw ValidationError("\(name): expected positive numbers, comma-separated") }
    return values.map { $0! }
}

func executablePath() throws -> String {
    var buffer = [CChar](repeating: 0, count: 4097)
    let count = readlink("/proc/self/exe", &buffer, 4096)
    guard count > 0 else { throw BenchError("cannot read /proc/self/exe") }
    return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

func executableDirectory() throws -> String {
    let path = try executablePath()
    return String(path[..<path.lastIndex(of: "/")!])
}

func progress(_ text: String) {
    let bytes = Array((text + "\n").utf8)
    bytes.withUnsafeBytes { _ = write(2, $0.baseAddress!, $0.count) }
}

struct BenchConfig {
    var stasis: String
    var workload: String
    var pipeSize: Int
    var verify: Bool
    var prewarm: Bool
    var selfPath: String
    /// `--stop-the-world` for the core benchmark's snapshots.
    var stopTheWorld = false
    var modeArguments: [String] { stopTheWorld ? ["--stop-the-world"] : [] }
}

// MARK: - Results

// The `--stats` files decode into the engine's own `Stasis.SnapshotStats` and
// `Stasis.RestoreStats`, which is what the CLI writes.

struct SnapshotSample {
    var stats: SnapshotStats
    var peakRSS: UInt64
    var wallNs: UInt64
    var polledHWM: UInt64
    var benchRSS: UInt64
    var gibPerSecond: Double { Double(stats.bytes) / 1073741824 / (stats.total_ms / 1000) }
    var writePhaseGibPerSecond: Double { Double(stats.bytes) / 1073741824 / (stats.write_ms / 1000) }
}

struct RestoreSample {
    var stats: RestoreStats
    var peakRSS: UInt64
    var wallNs: UInt64
    var polledHWM: UInt64
    var benchRSS: UInt64
    var verifiedPages: Int
}

final class SizeResult {
    let mebibytes: Int
    let repetitions: Int
    var fillNs: UInt64 = 0
    var mappingBytes: UInt64 = 0
    var pipeCapacity = 0
    var snapshotFile: [SnapshotSample] = []
    var snapshotPipe: [SnapshotSample] = []
    var limitFile: [LimitResult] = []
    var limitPipe: [LimitResult] = []
    var killSnapshot: SnapshotSample?
    var restores: [RestoreSample] = []
    var fresh: [FreshMemoryResult] = []
    var imageReads: [ImageReadResult] = []
    var passCosts: PassCosts?
    var captureCosts: [CaptureCosts] = []

    init(mebibytes: Int, repetitions: Int) {
        self.mebibytes = mebibytes
        self.repetitions = repetitions
    }
}

// MARK: - Driving stasis

final class BenchRunner {
    let config: BenchConfig
    let work: String
    let children = Children()
    let buffer = Buffer()
    /// Processes the bench inherited (workloads, restored processes) that may still be alive.
    private var liveOrphans: Set<pid_t> = []
    /// cgroup directories created for those processes.
    private var cgroups: Set<String> = []

    init(config: BenchConfig, work: String) {
        self.config = config
        self.work = work
    }

    func timeout(_ mebibytes: Int) -> Double { 60 + 20 * Double(mebibytes) / 1024 }

    func measure(_ result: SizeResult) throws {
        let mebibytes = result.mebibytes, repetitions = result.repetitions
        let label = "\(mebibytes) MiB"
        result.passCosts = measurePassCosts(buffer: buffer)

        // Start the workload and wait until its memory is filled.
        let output = "\(work)/wl-\(mebibytes).out"
        var (pid, fillNs) = try startWorkload(mebibytes: mebibytes, output: output)
        result.fillNs = fillNs
        let mapping = try workloadMemory(pid, mebibytes: mebibytes)
        result.mappingBytes = mapping.size
        progress("\(label): workload pid \(pid) ready after \(fmt(ms(result.fillNs), 0)) ms (\(mapping.size >> 20) MiB mapping)")

        // Warm-up, not measured: brings stasis' code into the page cache and the pipe path up.
        _ = try retryingCrashes("stasis snapshot -o -") { try snapshotToPipe(pid: pid, mebibytes: mebibytes) }
        _ = try limitToPipe(pid: pid, mapping: mapping)
        // Files too: the VM's balloon makes the first page-cache allocation after a pause slow,
        // and that must not land on whichever side happens to go first.
        do {
            let path = "\(work)/limit.img"
            defer { unlink(path); sync() }
            _ = try copyLimit(pid: pid, mapping: mapping, to: .file(path), buffer: buffer)
        }
        _ = try retryingCrashes("stasis snapshot -o FILE") { try snapshotToFile(pid: pid, mebibytes: mebibytes, kill: false) }
        for _ in 0..<3 { result.captureCosts.append(try measureCaptureCosts(pid: pid, mapping: mapping)) }

        enum Kind: CaseIterable { case limitFile, snapshotFile, snapshotPipe, limitPipe }
        for rep in 0..<repetitions {
            // ABBA order: drift (page cache, disk discard, balloon) does not favour one side.
            let order = rep % 2 == 0 ? Kind.allCases : Kind.allCases.reversed()
            for kind in order {
                try Emergency.check()
                switch kind {
                case .limitFile:
                    let path = "\(work)/limit.img"
                    defer { unlink(path); sync() }
                    if config.prewarm { prewarmFreeMemory(bytes: (mebibytes + 16) << 20) }
                    let limit = try copyLimit(pid: pid, mapping: mapping, to: .file(path), buffer: buffer)
                    result.limitFile.append(limit)
                    progress("\(label) #\(rep + 1): limit to file  \(fmt(ms(limit.totalNs), 1)) ms, \(fmt(limit.gibPerSecond, 2)) GiB/s")
                case .snapshotFile:
                    if config.prewarm { prewarmFreeMemory(bytes: (mebibytes + 16) << 20) }
                    let sample = try retryingCrashes("stasis snapshot -o FILE") { try snapshotToFile(pid: pid, mebibytes: mebibytes, kill: false) }
                    result.snapshotFile.append(sample)
                    progress("\(label) #\(rep + 1): stasis to file \(fmt(sample.stats.total_ms, 1)) ms, \(fmt(sample.gibPerSecond, 2)) GiB/s, freeze \(fmt(sample.stats.freeze_ms, 1)) ms")
                case .snapshotPipe:
                    let (sample, capacity) = try retryingCrashes("stasis snapshot -o -") { try snapshotToPipe(pid: pid, mebibytes: mebibytes) }
                    result.snapshotPipe.append(sample)
                    result.pipeCapacity = capacity
                    progress("\(label) #\(rep + 1): stasis to pipe \(fmt(sample.stats.total_ms, 1)) ms, \(fmt(sample.gibPerSecond, 2)) GiB/s, freeze \(fmt(sample.stats.freeze_ms, 1)) ms")
                case .limitPipe:
                    let limit = try limitToPipe(pid: pid, mapping: mapping)
                    result.limitPipe.append(limit)
                    progress("\(label) #\(rep + 1): limit to pipe  \(fmt(ms(limit.totalNs), 1)) ms, \(fmt(limit.gibPerSecond, 2)) GiB/s")
                }
            }
        }

        // Snapshot and kill, then restore the same image `repetitions` times.
        let image = "\(work)/restore.stasis"
        defer { unlink(image); unlink(output) }
        var killed: SnapshotSample?
        for attempt in 0..<3 {
            invocations["stasis snapshot --kill", default: 0] += 1
            do {
                killed = try snapshotToFile(pid: pid, mebibytes: mebibytes, kill: true, keep: image)
                break
            } catch let failure as ToolFailure where failure.crashed {
                crashes.append(("stasis snapshot --kill", "\(failure.run.exit.summary): \(failure.message)"))
                let dead = access("/proc/\(pid)", F_OK) != 0 || children.hasExited(pid)
                if dead && access(image, F_OK) == 0 {
                    // The image was completed and renamed before the crash: restore from it, without stats.
                    progress("warning: stasis snapshot --kill crashed (\(failure.message)) after completing the image; restoring from it")
                    break
                }
                guard attempt < 2 else { throw failure }
                progress("warning: stasis snapshot --kill crashed (\(failure.message)); retrying")
                if dead {
                    // No workload left for the next try: start a new one.
                    let cgroup = cgroupPath(of: pid)
                    _ = try? children.wait(for: pid, timeoutSeconds: 5, what: "the killed workload")
                    liveOrphans.remove(pid)
                    if let cgroup { removeCgroup(cgroup) }
                    unlink(output)
                    (pid, _) = try startWorkload(mebibytes: mebibytes, output: output)
                }
            }
        }
        result.killSnapshot = killed
        let cgroup = cgroupPath(of: pid)
        _ = try children.wait(for: pid, timeoutSeconds: 30, what: "the killed workload")
        liveOrphans.remove(pid)
        if let cgroup { removeCgroup(cgroup) }
        guard access("/proc/\(pid)", F_OK) != 0 else { throw BenchError("pid \(pid) still exists after snapshot --kill returned") }
        if let killed { progress("\(label): snapshot --kill \(fmt(killed.stats.total_ms, 1)) ms (command \(fmt(ms(killed.wallNs), 1)) ms)") }
        for rep in 0..<repetitions {
            try Emergency.check()
            // Alternate the order: whatever runs second finds the memory the first just freed
            // still warm (see prewarmFreeMemory).
            func floors() throws -> (FreshMemoryResult, ImageReadResult) {
                var fresh = try freshMemory(bytes: mebibytes << 20)
                fresh.remoteWriteFreshNs = try remoteWriteIntoHelper(mebibytes: mebibytes, populated: false)
                fresh.remoteWriteResidentNs = try remoteWriteIntoHelper(mebibytes: mebibytes, populated: true)
                return (fresh, try readImage(image, buffer: buffer))
            }
            func restoreOnce() throws -> RestoreSample {
                try retryingCrashes("stasis restore", repair: {
                    // The restored process (or stub) may be alive, re-parented to the bench.
                    let cgroup = cgroupPath(of: pid)
                    if access("/proc/\(pid)", F_OK) == 0 { try children.killAndReap(pid, what: "a half-restored workload") }
                    liveOrphans.remove(pid)
                    if let cgroup { removeCgroup(cgroup) }
                }) { try restore(image: image, expectedPID: pid, mebibytes: mebibytes) }
            }
            let restored: RestoreSample
            let fresh: FreshMemoryResult
            let read: ImageReadResult
            if rep % 2 == 0 {
                (fresh, read) = try floors()
                restored = try restoreOnce()
            } else {
                restored = try restoreOnce()
                (fresh, read) = try floors()
            }
            result.fresh.append(fresh)
            result.restores.append(restored)
            result.imageReads.append(read)
            progress("\(label) #\(rep + 1): restore \(fmt(restored.stats.restore_ms, 1)) ms (pages \(fmt(restored.stats.pages_ms, 1)) ms); fresh memory populate \(fmt(ms(fresh.populateNs), 1)) ms, process_vm_writev into fresh \(fmt(ms(fresh.remoteWriteFreshNs), 1)) ms, into resident \(fmt(ms(fresh.remoteWriteResidentNs), 1)) ms; image read \(fmt(ms(read.intoBufferNs), 1)) ms, into fresh memory \(fmt(ms(read.intoFreshNs), 1)) ms, mapped private \(fmt(ms(read.mapPrivateNs), 1)) ms")
        }
    }

    /// stasis invocations per kind, and the crashes among them (a crash is retried, twice at most).
    private(set) var invocations: [String: Int] = [:]
    private(set) var crashes: [(what: String, message: String)] = []

    func retryingCrashes<T>(_ what: String, repair: () throws -> Void = {}, _ body: () throws -> T) throws -> T {
        var attempt = 0
        while true {
            invocations[what, default: 0] += 1
            do {
                return try body()
            } catch let failure as ToolFailure where failure.crashed && attempt < 3 {
                crashes.append((what, "\(failure.run.exit.summary): \(failure.message)"))
                progress("warning: \(what) crashed (\(failure.run.exit.summary)): \(failure.message); retrying")
                attempt += 1
                try repair()
            }
        }
    }

    func startWorkload(mebibytes: Int, output: String, extra: [String] = []) throws -> (pid_t, UInt64) {
        let start = now()
        let pid = try launch([config.workload, "--mb", String(mebibytes)] + extra, stdout: output, timeoutSeconds: 30)
        try waitForReady(pid: pid, output: output, timeoutSeconds: timeout(mebibytes))
        return (pid, now() - start)
    }

    /// `stasis run --stdout OUTPUT -- COMMAND…`: starts the command detached, in a cgroup of its
    /// own; returns its PID, adopted (killed by `cleanUp` if still alive).
    func launch(_ command: [String], stdout output: String, stderr errors: String? = nil, timeoutSeconds: Double) throws -> pid_t {
        let launched = try runTool([config.stasis, "run", "--stdout", output] + (errors.map { ["--stderr", $0] } ?? []) + ["--"] + command,
                                   children: children, scratch: work, timeoutSeconds: timeoutSeconds, what: "stasis run")
        guard let pid = pid_t(launched.stdout.trimmingTrailingNewlines()) else {
            throw BenchError("stasis run printed \(launched.stdout.debugDescription), not a PID")
        }
        adopt(pid)
        return pid
    }

    /// Times process_vm_writev into a helper process's anonymous mapping of the workload's size
    /// (fresh, or populated by the helper first).
    func remoteWriteIntoHelper(mebibytes: Int, populated: Bool) throws -> UInt64 {
        let output = "\(work)/helper.out"
        defer { unlink(output) }
        let out = try openOutput(output)
        let err = open("/dev/null", O_WRONLY | O_CLOEXEC)
        let pid: pid_t
        do {
            pid = try children.spawn([config.selfPath, "--serve-memory", String(mebibytes)] + (populated ? ["--populate"] : []),
                                     stdout: out, stderr: err)
        } catch {
            close(out); close(err)
            throw error
        }
        close(out); close(err)
        defer { try? children.killAndReap(pid, what: "the memory helper") }
        let deadline = now() + UInt64(timeout(mebibytes) * 1e9)
        var text = ""
        while !text.hasSuffix("\n") {
            try Emergency.check()
            if children.hasExited(pid) { throw BenchError("the memory helper (pid \(pid)) exited early") }
            if now() > deadline { throw BenchError("the memory helper (pid \(pid)) did not start") }
            usleep(2000)
            text = readTextFile(output)
        }
        guard let address = UInt64(text.trimmingTrailingNewlines().dropFirst(2), radix: 16) else {
            throw BenchError("the memory helper printed \(text.debugDescription)")
        }
        return try remoteWrite(buffer, pid: pid, address: address, bytes: mebibytes << 20)
    }

    /// Records a process the bench will inherit, so it is killed on failure.
    func adopt(_ pid: pid_t) {
        liveOrphans.insert(pid)
        Emergency.add(pid)
        if let cgroup = cgroupPath(of: pid) { cgroups.insert(cgroup) }
    }

    /// Forgets an adopted process that is known to be gone (reaped, its PID free).
    func disown(_ pid: pid_t) {
        liveOrphans.remove(pid)
        Emergency.remove(pid)
    }

    /// Waits until `output` holds a line "ready" (wl-bench prints it, wl-tree writes it).
    func waitForReady(pid: pid_t, output: String, timeoutSeconds: Double) throws {
        let deadline = now() + UInt64(timeoutSeconds * 1e9)
        while !readTextFile(output).contains("ready\n") {
            try Emergency.check()
            if children.hasExited(pid) { throw BenchError("the workload (pid \(pid)) exited before it was ready") }
            if now() > deadline { throw BenchError("the workload (pid \(pid)) was not ready after \(Int(timeoutSeconds)) s") }
            usleep(5000)
        }
    }

    func readSnapshotStats(_ path: String) throws -> SnapshotStats {
        defer { unlink(path) }
        do { return try JSONDecoder().decode(SnapshotStats.self, from: Data(readTextFile(path).utf8)) } catch {
            throw BenchError("cannot decode \(path): \(error)")
        }
    }

    func readRestoreStats(_ path: String) throws -> RestoreStats {
        defer { unlink(path) }
        do { return try JSONDecoder().decode(RestoreStats.self, from: Data(readTextFile(path).utf8)) } catch {
            throw BenchError("cannot decode \(path): \(error)")
        }
    }

    /// `stasis snapshot PID -o FILE`, in the benchmark's mode unless `stopTheWorld` says which,
    /// with the time limit for `mebibytes` unless `timeoutSeconds` is given.
    func snapshotToFile(pid: pid_t, mebibytes: Int, kill: Bool, keep: String? = nil,
                        stopTheWorld: Bool? = nil, timeoutSeconds: Double? = nil) throws -> SnapshotSample {
        let image = keep ?? "\(work)/snapshot.stasis"
        let statsPath = "\(work)/snapshot.json"
        defer {
            if keep == nil { unlink(image); sync() }
        }
        let mode = stopTheWorld.map { $0 ? ["--stop-the-world"] : [] } ?? config.modeArguments
        let what = "stasis snapshot" + (kill ? " --kill" : "") + (mode.isEmpty ? "" : " " + mode.joined(separator: " "))
        let run = try runTool([config.stasis, "snapshot", String(pid), "-o", image, "--stats", statsPath] + (kill ? ["--kill"] : []) + mode,
                              children: children, scratch: work, timeoutSeconds: timeoutSeconds ?? timeout(mebibytes), what: what)
        let stats = try readSnapshotStats(statsPath)
        var info = stat()
        guard stat(image, &info) == 0, UInt64(info.st_size) == stats.bytes else {
            throw BenchError("the image \(image) is missing or not \(stats.bytes) bytes")
        }
        return SnapshotSample(stats: stats, peakRSS: run.exit.peakRSSBytes, wallNs: run.exit.wallNs,
                              polledHWM: run.exit.polledHWM, benchRSS: run.exit.benchRSSAtSpawn)
    }

    func snapshotToPipe(pid: pid_t, mebibytes: Int) throws -> (SnapshotSample, Int) {
        let statsPath = "\(work)/snapshot.json"
        let pipe = try DrainedPipe(size: config.pipeSize)
        let capacity = pipe.capacity
        try pipe.startDraining()
        let run = try runTool([config.stasis, "snapshot", String(pid), "-o", "-", "--stats", statsPath] + config.modeArguments,
                              children: children, scratch: work, stdoutFD: pipe.writeFD,
                              timeoutSeconds: timeout(mebibytes), what: "stasis snapshot -o -")
        let drained = pipe.finish()
        let stats = try readSnapshotStats(statsPath)
        guard drained == stats.bytes else { throw BenchError("drained \(drained) bytes from the pipe, stasis reports \(stats.bytes)") }
        return (SnapshotSample(stats: stats, peakRSS: run.exit.peakRSSBytes, wallNs: run.exit.wallNs,
                              polledHWM: run.exit.polledHWM, benchRSS: run.exit.benchRSSAtSpawn), capacity)
    }

    func limitToPipe(pid: pid_t, mapping: MapEntry) throws -> LimitResult {
        let pipe = try DrainedPipe(size: config.pipeSize)
        try pipe.startDraining()
        let limit = try copyLimit(pid: pid, mapping: mapping, to: .pipe(pipe), buffer: buffer)
        let drained = pipe.finish()
        guard drained == limit.bytes else { throw BenchError("drained \(drained) bytes, wrote \(limit.bytes)") }
        return limit
    }

    func restore(image: String, expectedPID: pid_t, mebibytes: Int) throws -> RestoreSample {
        let statsPath = "\(work)/restore.json"
        defer { unlink(statsPath) }
        let run = try runTool([config.stasis, "restore", image, "--detach", "--stats", statsPath],
                              children: children, scratch: work, timeoutSeconds: timeout(mebibytes), what: "stasis restore")
        guard let pid = pid_t(run.stdout.trimmingTrailingNewlines()) else {
            throw BenchError("stasis restore --detach printed \(run.stdout.debugDescription), not a PID")
        }
        adopt(pid)
        defer {
            let cgroup = cgroupPath(of: pid)
            if (try? children.killAndReap(pid, what: "the restored workload")) != nil { liveOrphans.remove(pid) }
            if let cgroup { removeCgroup(cgroup) }
        }
        let stats = try readRestoreStats(statsPath)
        guard pid == expectedPID else { throw BenchError("restored as pid \(pid), expected \(expectedPID)") }
        // It must be running (sleeping in its loop), not stopped or dead.
        usleep(20000)
        let state = processState(pid)
        guard state == "S" || state == "R" else {
            throw BenchError("the restored process \(pid) is in state \(state ?? "gone") 20 ms after restore")
        }
        let verified = config.verify ? try verifyWorkloadMemory(pid: pid, mebibytes: mebibytes, buffer: buffer) : 0
        return RestoreSample(stats: stats, peakRSS: run.exit.peakRSSBytes, wallNs: run.exit.wallNs,
                             polledHWM: run.exit.polledHWM, benchRSS: run.exit.benchRSSAtSpawn, verifiedPages: verified)
    }

    /// Kills a workload the bench started (or inherited), reaps it and removes its cgroup.
    func stopWorkload(_ pid: pid_t) throws {
        let cgroup = cgroupPath(of: pid)
        try children.killAndReap(pid, what: "the workload")
        liveOrphans.remove(pid)
        if let cgroup { removeCgroup(cgroup) }
    }

    func processState(_ pid: pid_t) -> String? {
        let text = readTextFile("/proc/\(pid)/stat")
        guard let close = text.lastIndex(of: ")") else { return nil }
        return text[text.index(after: close)...].split(separator: " ").first.map(String.init)
    }

    // MARK: cgroups and clean-up

    /// The cgroup v2 directory of a process, if it is one stasis made (under <mount>/stasis/).
    func cgroupPath(of pid: pid_t) -> String? {
        guard let line = readTextFile("/proc/\(pid)/cgroup").split(separator: "\n").first(where: { $0.hasPrefix("0::") }) else { return nil }
        let relative = String(line.dropFirst(3))
        guard relative.hasPrefix("/stasis/"), let mount = Self.cgroup2Mount else { return nil }
        let path = mount + relative
        cgroups.insert(path)
        return path
    }

    static let cgroup2Mount: String? = {
        for line in readTextFile("/proc/self/mounts").split(separator: "\n") {
            let fields = line.split(separator: " ")
            if fields.count > 2 && fields[2] == "cgroup2" { return String(fields[1]) }
        }
        return nil
    }()

    func removeCgroup(_ path: String) {
        for _ in 0..<200 {
            if rmdir(path) == 0 || errno == ENOENT { cgroups.remove(path); return }
            usleep(5000)  // a just-reaped process can keep it busy for a moment
        }
        progress("warning: could not remove cgroup \(path): \(errnoText())")
    }

    /// Kills every process the bench made or inherited, removes their cgroups, its files and
    /// its directory. Called on success and on failure.
    func cleanUp() {
        children.killEverything(Array(liveOrphans))
        liveOrphans.removeAll()
        for path in cgroups { removeCgroup(path) }
        for name in directoryNames(work) { unlink("\(work)/\(name)") }
        if rmdir(work) != 0 { progress("warning: could not remove \(work): \(errnoText())") }
    }
}
