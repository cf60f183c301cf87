import ArgumentParser
import Glibc
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Stasis

/// `stasis-bench tree`: how the freeze and the restore of a whole process tree grow with its
/// number of processes and of threads (wl-tree workloads), live and stop-the-world.
struct TreeBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tree",
        abstract: "Process trees: freeze and restore time against the number of processes and of threads (wl-tree).",
        discussion: """
            Two series of wl-tree workloads, each started with `stasis run` (a cgroup of its own): \
            processes — `wl-tree --procs N --threads 1` for each N of --procs; threads — \
            `wl-tree --procs 1 --threads M` for each M of --threads. Each point is measured --runs \
            times; every run starts a fresh tree for each of its two measurements, whose order \
            alternates from run to run (ABBA): live — `stasis snapshot ROOT -o FILE --kill`, then \
            `stasis restore FILE --detach`; the restored tree must hold the same N processes (found \
            through /proc/PID/task/TID/children) with N×M threads and pass wl-tree's SIGUSR1 check, \
            and is then SIGKILLed and waited for until its PIDs are free; stop-the-world — `stasis \
            snapshot ROOT -o FILE --stop-the-world` without --kill: the tree must still be whole and \
            pass the check afterwards. Medians, minima and maxima are reported, with the cost per \
            process (per thread) and the growth from each point to the next. Report on stdout \
            (Markdown), progress on stderr.
            """)

    @Option(help: "Runs per point.")
    var runs = 5
    @Option(help: "Process counts of the process series (one thread each), comma-separated.")
    var procs = "1,10,100,1000"
    @Option(help: "Thread counts of the thread series (one process), comma-separated.")
    var threads = "1,8,64,512"
    @Option(help: "MiB of private memory per process (wl-tree --mb).")
    var mb = 0
    @Flag(help: "Do not run the thread series.")
    var skipThreads = false
    @Flag(help: "Do not run the process series.")
    var skipProcs = false
    @Option(help: "Time limit in seconds for each stasis command, for a tree to be ready, and for a killed tree to be gone.")
    var timeout = 300.0
    @Option(help: "Directory for image files (a stasis-bench-XXXXXX directory is made in it and removed; default $TMPDIR, else /var/tmp).")
    var dir: String?
    @Option(help: "The stasis executable (default: next to stasis-bench).")
    var stasis: String?
    @Option(help: "The wl-tree executable (default: next to stasis-bench).")
    var workload: String?
    @Option(help: "Also write the Markdown report to this file.")
    var output: String?
    @Option(help: "Write every run's raw numbers as JSON to this file.")
    var json: String?

    func run() throws {
        Emergency.setUp()
        guard runs > 0 else { throw ValidationError("--runs must be at least 1") }
        guard mb >= 0 else { throw ValidationError("--mb must be 0 or more") }
        guard timeout > 0 else { throw ValidationError("--timeout must be positive") }
        guard !(skipProcs && skipThreads) else { throw ValidationError("--skip-procs and --skip-threads leave nothing to run") }
        var plan = TreePlan(runs: runs, mebibytes: mb, timeoutSeconds: timeout)
        if !skipProcs { plan.processCounts = try parseList(procs, "--procs") }
        if !skipThreads { plan.threadCounts = try parseList(threads, "--threads") }
        guard plan.processCounts.allSatisfy({ $0 <= 4096 }) else { throw ValidationError("--procs: wl-tree takes at most 4096 processes") }
        guard plan.threadCounts.allSatisfy({ $0 <= 1024 }) else { throw ValidationError("--threads: wl-tree takes at most 1024 threads per process") }

        let directory = try executableDirectory()
        let config = BenchConfig(
            stasis: stasis ?? directory + "/stasis", workload: workload ?? directory + "/wl-tree",
            pipeSize: 0, verify: false, prewarm: false, selfPath: try executablePath())
        for tool in [config.stasis, config.workload] where access(tool, X_OK) != 0 {
            throw ValidationError("\(tool) is missing; build with `swift build -c release --product stasis` (and `--product wl-tree`)")
        }
        let environment = getenv("TMPDIR").map { String(cString: $0) } ?? ""
        let parent = dir ?? (environment.isEmpty ? "/var/tmp" : environment)
        var template = Array((parent + "/stasis-bench-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw BenchError("cannot create a directory in \(parent): \(errnoText())") }
        let work = String(cString: made)

        let base = BenchRunner(config: config, work: work)
        let runner = TreeRunner(base: base, plan: plan)
        let startedAt = now()
        let date = utcDate()
        let commit = gitCommit(in: directory, children: base.children, scratch: work)
        let machine = MachineInfo.collect(directory: work, pipeSize: 0)
        progress("stasis-bench tree: \(plan.points.count) points × \(plan.runs) runs; work directory \(work)")
        if machine.backgroundBusyPercent > 15 {
            progress("warning: the CPUs were \(Int(machine.backgroundBusyPercent))% busy before the benchmark started; results will be disturbed")
        }
        runner.runAll()
        runner.finish()
        base.cleanUp()
        let cleanUp = runner.checkNothingLeft()
        let elapsed = Double(now() - startedAt) / 1e9
        var endMachine = machine
        endMachine.backgroundBusyPercentAtEnd = MachineInfo.busyPercent(seconds: 0.5)

        let report = TreeReport(
            plan: plan, runs: runner.runs, failures: runner.failures, notes: runner.notes, busy: runner.busy, cleanUp: cleanUp,
            machine: endMachine, date: date, commit: commit, directory: currentDirectory(), arguments: CommandLine.arguments,
            stasis: config.stasis, workload: config.workload, elapsedSeconds: elapsed).markdown()
        print(report)
        if let output { try writeTextFile(output, report + "\n") }
        if let json {
            let document = TreeDocument(
                command: CommandLine.arguments, directory: currentDirectory(), date: date, kernel: machine.kernel, commit: commit,
                stasis: config.stasis, workload: config.workload, runs_per_point: plan.runs, mb: plan.mebibytes,
                process_counts: plan.processCounts, thread_counts: plan.threadCounts, runs: runner.runs,
                failures: runner.failures, notes: runner.notes,
                cpu_busy_percent: Dictionary(uniqueKeysWithValues: runner.busy.map { ("\($0.key.procs)x\($0.key.threads)", $0.value) }),
                leftover_processes: cleanUp.processes,
                leftover_cgroups: cleanUp.cgroups)
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try writeTextFile(json, String(decoding: try encoder.encode(document), as: UTF8.self) + "\n")
        }
        if !runner.failures.isEmpty || cleanUp.processes > 0 || !cleanUp.cgroups.isEmpty {
            progress("stasis-bench tree: \(interrupted != 0 ? "interrupted; " : "")\(runner.failures.count) failures, \(cleanUp.processes) processes and \(cleanUp.cgroups.count) cgroups left behind")
            throw ExitCode(1)
        }
    }
}

// MARK: - Plan and results

/// One wl-tree shape: `--procs procs --threads threads`.
struct TreePoint: Hashable, Codable {
    var procs: Int
    var threads: Int
    var totalThreads: Int { procs * threads }
    var label: String { "\(procs) × \(threads)" }
}

/// What `stasis-bench tree` runs.
struct TreePlan {
    var runs = 5
    var mebibytes = 0
    var timeoutSeconds = 300.0
    var processCounts: [Int] = []
    var threadCounts: [Int] = []
    var processSeries: [TreePoint] { processCounts.map { TreePoint(procs: $0, threads: 1) } }
    var threadSeries: [TreePoint] { threadCounts.map { TreePoint(procs: 1, threads: $0) } }
    /// Every point once, in series order (1 × 1 belongs to both series and is measured once).
    var points: [TreePoint] {
        var seen = Set<TreePoint>()
        return (processSeries + threadSeries).filter { seen.insert($0).inserted }
    }
}

/// The two measurements of a run.
enum TreeMode: String, Codable {
    /// `stasis snapshot --kill` (live, the default mode), then `stasis restore --detach`.
    case live
    /// `stasis snapshot --stop-the-world`; the tree keeps running afterwards.
    case stopTheWorld = "stop-the-world"
}

/// One measurement (the raw numbers of `--json`).
struct TreeRun: Codable {
    var procs: Int
    var threads: Int
    var mb: Int
    /// 1-based run number, and whether this mode went first (1) or second (2) in its run.
    var run: Int
    var position: Int
    var mode: TreeMode
    /// From `stasis run` to wl-tree's "ready", ms.
    var start_ms: Double
    var snapshot: SnapshotStats
    /// The `stasis snapshot` command from spawn to exit (process start-up included), ms; its peak RSS.
    var snapshot_wall_ms: Double
    var snapshot_peak_rss_bytes: UInt64
    /// Live runs only: the restore.
    var restore: RestoreStats?
    var restore_wall_ms: Double?
    var restore_peak_rss_bytes: UInt64?
    /// Original processes that still existed when `snapshot --kill` returned (0 expected).
    var original_left_after_kill: Int?
    /// Processes and threads found under the root afterwards (the restored tree, or the tree that
    /// kept running after the stop-the-world snapshot), and wl-tree's answer to SIGUSR1.
    var processes_found: Int
    var threads_found: Int
    var check_detail: String
    /// SIGKILL of every process of the tree until its last PID was free, ms.
    var teardown_ms: Double

    var point: TreePoint { TreePoint(procs: procs, threads: threads) }
}

struct TreeFailure: Codable {
    var procs: Int?
    var threads: Int?
    var run: Int?
    var mode: String
    var message: String
}

/// What was left once everything was cleaned up (all zero when the bench is well behaved).
struct TreeCleanUp {
    /// wl-tree processes started by this bench (their command line names its work directory).
    var processes = 0
    /// cgroups a tree of this bench was in that still exist, and how many there were.
    var cgroups: [String] = []
    var cgroupsUsed = 0
    /// wl-tree processes of anyone else on the machine (not this bench's).
    var otherWorkloads = 0
}

/// The `--json` document.
struct TreeDocument: Encodable {
    var command: [String]
    var directory: String
    var date: String
    var kernel: String
    var commit: String?
    var stasis: String
    var workload: String
    var runs_per_point: Int
    var mb: Int
    var process_counts: [Int]
    var thread_counts: [Int]
    var runs: [TreeRun]
    var failures: [TreeFailure]
    var notes: [String]
    /// CPU busy (all processes) while each point ran, by "PROCSxTHREADS".
    var cpu_busy_percent: [String: Double]
    var leftover_processes: Int
    var leftover_cgroups: [String]
}

/// wl-tree's answer to SIGUSR1.
struct WlTreeCheck: Decodable {
    var ok: Bool
    var progress: UInt64
    var pid: Int32
    var procs: Int
    var threads: Int
    var pids: [Int32]
    var pdeathsig_lost: Int
    var detail: String
}

// MARK: - Process trees in /proc

/// Every process of the tree under `root`, root first, from /proc/PID/task/TID/children.
func treeProcesses(_ root: pid_t) -> [pid_t] {
    var found: [pid_t] = []
    var seen = Set<pid_t>()
    var pending = [root]
    while let pid = pending.popLast() {
        guard seen.insert(pid).inserted, access("/proc/\(pid)", F_OK) == 0 else { continue }
        found.append(pid)
        for task in directoryNames("/proc/\(pid)/task") {
            for word in readTextFile("/proc/\(pid)/task/\(task)/children").split(whereSeparator: { $0 == " " || $0 == "\n" }) {
                if let child = pid_t(word) { pending.append(child) }
            }
        }
    }
    return found
}

/// Threads of a process (entries of /proc/PID/task).
func threadCount(_ pid: pid_t) -> Int { directoryNames("/proc/\(pid)/task").count }

/// The PIDs in a cgroup (its cgroup.procs).
func cgroupMembers(_ cgroup: String?) -> [pid_t] {
    guard let cgroup else { return [] }
    return readTextFile("\(cgroup)/cgroup.procs").split(separator: "\n").compactMap { pid_t($0) }
}

/// A wl-tree the bench started or restored, until every process of it is gone.
final class TreeProcesses {
    let root: pid_t
    /// wl-tree's --report file.
    let report: String
    let cgroup: String?
    /// Its processes, as last found.
    var pids: [pid_t] = []
    var gone = false

    init(root: pid_t, report: String, cgroup: String?) {
        self.root = root
        self.report = report
        self.cgroup = cgroup
    }
}

// MARK: - Running

final class TreeRunner {
    let base: BenchRunner
    let plan: TreePlan
    private(set) var runs: [TreeRun] = []
    private(set) var failures: [TreeFailure] = []
    private(set) var notes: [String] = []
    /// CPU busy (all processes, the bench's and stasis' own work included) while each point ran, %.
    private(set) var busy: [TreePoint: Double] = [:]
    /// Trees that may still have processes (torn down by `finish` whatever happened).
    private var alive: [TreeProcesses] = []
    /// Every cgroup a tree of the bench was in (each must be gone at the end).
    private var cgroupsSeen: Set<String> = []
    private var serial = 0
    var config: BenchConfig { base.config }
    var work: String { base.work }

    init(base: BenchRunner, plan: TreePlan) {
        self.base = base
        self.plan = plan
    }

    func runAll() {
        // Not recorded: stasis' code into the page cache, and the restore path once through.
        do {
            let point = TreePoint(procs: 2, threads: 2)
            _ = try measure(point, .live, run: 0, position: 1)
            _ = try measure(point, .stopTheWorld, run: 0, position: 2)
            progress("warm-up (2 × 2, live and stop-the-world): done")
        } catch {
            failures.append(TreeFailure(procs: 2, threads: 2, run: nil, mode: "warm-up", message: "\(error)"))
            progress("warm-up: FAILED: \(error)")
            removeStrays()
            return
        }
        removeStrays()
        for point in plan.points {
            let cpu = cpuJiffies()
            defer {
                let end = cpuJiffies()
                if end.total > cpu.total { busy[point] = 100 * (end.busy - cpu.busy) / (end.total - cpu.total) }
            }
            runs: for run in 1...plan.runs {
                let modes: [TreeMode] = run % 2 == 1 ? [.live, .stopTheWorld] : [.stopTheWorld, .live]
                for (index, mode) in modes.enumerated() {
                    if interrupted != 0 { return }
                    do {
                        let record = try measure(point, mode, run: run, position: index + 1)
                        runs.append(record)
                        progress(summary(record))
                    } catch {
                        failures.append(TreeFailure(procs: point.procs, threads: point.threads, run: run, mode: mode.rawValue, message: "\(error)"))
                        progress("\(point.label) run \(run) \(mode.rawValue): FAILED: \(error)")
                        removeStrays()
                        break runs  // on to the next point
                    }
                    removeStrays()
                }
            }
        }
    }

    func measure(_ point: TreePoint, _ mode: TreeMode, run: Int, position: Int) throws -> TreeRun {
        try Emergency.check()
        let name = "\(point.procs)x\(point.threads)-r\(run)-\(mode == .live ? "live" : "stw")"
        let (tree, startNs) = try startTree(point, name)
        defer { tearDownQuietly(tree) }
        let original = try expectWhole(tree, point, "the tree \(tree.root) before the snapshot").pids
        let image = "\(work)/tree.stasis"
        defer { unlink(image) }
        let mebibytes = point.procs * plan.mebibytes
        switch mode {
        case .stopTheWorld:
            let snapshot = try base.snapshotToFile(pid: tree.root, mebibytes: mebibytes, kill: false,
                                                   stopTheWorld: true, timeoutSeconds: plan.timeoutSeconds)
            try checkSnapshot(snapshot.stats, point, mode, run: run)
            let (after, afterThreads) = try expectWhole(tree, point, "the tree \(tree.root) after its stop-the-world snapshot")
            guard Set(after) == Set(original) else { throw BenchError("the tree \(tree.root) has other processes after its stop-the-world snapshot than before") }
            let check = try checkTree(tree, point, "the tree \(tree.root) after its stop-the-world snapshot")
            let teardownNs = try tearDown(tree)
            return TreeRun(procs: point.procs, threads: point.threads, mb: plan.mebibytes, run: run, position: position, mode: mode,
                           start_ms: ms(startNs), snapshot: snapshot.stats, snapshot_wall_ms: ms(snapshot.wallNs),
                           snapshot_peak_rss_bytes: snapshot.peakRSS, processes_found: after.count,
                           threads_found: afterThreads, check_detail: check, teardown_ms: ms(teardownNs))
        case .live:
            let snapshot = try base.snapshotToFile(pid: tree.root, mebibytes: mebibytes, kill: true, keep: image,
                                                   stopTheWorld: false, timeoutSeconds: plan.timeoutSeconds)
            try checkSnapshot(snapshot.stats, point, mode, run: run)
            // --kill returns once the tree's PIDs are free: they must be, for the restore.
            let left = original.filter { access("/proc/\($0)", F_OK) == 0 }.count
            _ = try base.children.wait(for: tree.root, timeoutSeconds: 30, what: "the root of the snapshotted tree")
            if left > 0 {
                notes.append("\(point.label) run \(run): \(left) of the \(point.procs) original processes still existed when `stasis snapshot --kill` returned")
            }
            _ = try waitGone(original, what: "the tree \(tree.root) killed by snapshot --kill", cgroup: nil)
            finished(tree, extra: original)

            let (restored, restoreRun, stats) = try restoreTree(image, like: tree)
            defer { tearDownQuietly(restored) }
            let (found, foundThreads) = try expectWhole(restored, point, "the restored tree \(restored.root)")
            guard Set(found) == Set(original) else {
                throw BenchError("the restored tree's PIDs differ from the original's (\(Set(found).subtracting(original).count) new, \(Set(original).subtracting(found).count) missing)")
            }
            let check = try checkTree(restored, point, "the restored tree \(restored.root)")
            guard stats.processes == point.procs, stats.threads == point.totalThreads else {
                throw BenchError("stasis restore reports \(stats.processes.map(String.init) ?? "no") processes and \(stats.threads) threads, expected \(point.procs) and \(point.totalThreads)")
            }
            let teardownNs = try tearDown(restored)
            return TreeRun(procs: point.procs, threads: point.threads, mb: plan.mebibytes, run: run, position: position, mode: mode,
                           start_ms: ms(startNs), snapshot: snapshot.stats, snapshot_wall_ms: ms(snapshot.wallNs),
                           snapshot_peak_rss_bytes: snapshot.peakRSS, restore: stats, restore_wall_ms: ms(restoreRun.exit.wallNs),
                           restore_peak_rss_bytes: restoreRun.exit.peakRSSBytes, original_left_after_kill: left,
                           processes_found: found.count, threads_found: foundThreads,
                           check_detail: check, teardown_ms: ms(teardownNs))
        }
    }

    // MARK: steps

    /// `stasis run -- wl-tree …`, until it wrote "ready".
    func startTree(_ point: TreePoint, _ name: String) throws -> (TreeProcesses, UInt64) {
        serial += 1
        let report = "\(work)/tree-\(serial)-\(name).report"
        // Every tree's stdout and stderr (appended; open in the tree, restored ones too, until it dies).
        let output = "\(work)/wl-tree.log"
        let start = now()
        let root = try base.launch([config.workload, "--report", report, "--procs", String(point.procs),
                                    "--threads", String(point.threads), "--mb", String(plan.mebibytes)],
                                   stdout: output, stderr: output, timeoutSeconds: plan.timeoutSeconds)
        let tree = track(TreeProcesses(root: root, report: report, cgroup: base.cgroupPath(of: root)))
        do {
            try base.waitForReady(pid: root, output: report, timeoutSeconds: plan.timeoutSeconds)
        } catch {
            let said = readTextFile(output).split(separator: "\n").suffix(5).joined(separator: " / ")
            tearDownQuietly(tree)
            throw BenchError("\(error)" + (said.isEmpty ? "" : "; wl-tree said: \(said)"))
        }
        return (tree, now() - start)
    }

    func track(_ tree: TreeProcesses) -> TreeProcesses {
        alive.append(tree)
        if let cgroup = tree.cgroup { cgroupsSeen.insert(cgroup) }
        return tree
    }

    /// `stasis restore IMAGE --detach --stats …`: the restored tree (tracked), the command, its stats.
    func restoreTree(_ image: String, like original: TreeProcesses) throws -> (TreeProcesses, ToolRun, RestoreStats) {
        let statsPath = "\(work)/restore.json"
        defer { unlink(statsPath) }
        let run = try runTool([config.stasis, "restore", image, "--detach", "--stats", statsPath],
                              children: base.children, scratch: work, timeoutSeconds: plan.timeoutSeconds, what: "stasis restore --detach")
        guard let pid = pid_t(run.stdout.trimmingTrailingNewlines()) else {
            throw BenchError("stasis restore --detach printed \(run.stdout.debugDescription), not a PID")
        }
        base.adopt(pid)
        let tree = track(TreeProcesses(root: pid, report: original.report, cgroup: base.cgroupPath(of: pid)))
        tree.pids = original.pids
        do {
            guard pid == original.root else { throw BenchError("restored as pid \(pid), expected \(original.root)") }
            return (tree, run, try base.readRestoreStats(statsPath))
        } catch {
            tearDownQuietly(tree)
            throw error
        }
    }

    /// The tree must have `point.procs` processes with `point.totalThreads` threads; returns its PIDs.
    func expectWhole(_ tree: TreeProcesses, _ point: TreePoint, _ what: String) throws -> (pids: [pid_t], threads: Int) {
        let found = treeProcesses(tree.root)
        tree.pids = Array(Set(tree.pids).union(found))
        guard found.count == point.procs else { throw BenchError("\(what) has \(found.count) processes, expected \(point.procs)") }
        let threads = found.map(threadCount).reduce(0, +)
        guard threads == point.totalThreads else { throw BenchError("\(what) has \(threads) threads, expected \(point.totalThreads)") }
        return (found, threads)
    }

    func checkSnapshot(_ stats: SnapshotStats, _ point: TreePoint, _ mode: TreeMode, run: Int) throws {
        if let fallback = stats.fallback {
            notes.append("\(point.label) run \(run) \(mode.rawValue): the snapshot fell back to stop-the-world: \(fallback)")
        } else if stats.mode != (mode == .live ? .live : .stopTheWorld) {
            throw BenchError("stasis snapshot reports mode \(stats.mode.rawValue), expected \(mode.rawValue)")
        }
        guard stats.processes == point.procs, stats.threads == point.totalThreads else {
            throw BenchError("stasis snapshot reports \(stats.processes.map(String.init) ?? "no") processes and \(stats.threads) threads, expected \(point.procs) and \(point.totalThreads)")
        }
    }

    /// wl-tree's own check (SIGUSR1): every process alive and its child, every thread advancing,
    /// the memory intact. Returns its summary.
    func checkTree(_ tree: TreeProcesses, _ point: TreePoint, _ what: String) throws -> String {
        unlink(tree.report)
        guard kill(tree.root, SIGUSR1) == 0 else { throw BenchError("kill(\(tree.root), SIGUSR1): \(errnoText())") }
        let deadline = now() + UInt64((15 + Double(plan.mebibytes) / 1000) * 1e9)
        var text = readTextFile(tree.report)
        while !text.hasSuffix("}\n") {
            try Emergency.check()
            if access("/proc/\(tree.root)", F_OK) != 0 { throw BenchError("\(what): the root \(tree.root) died before answering SIGUSR1") }
            if now() > deadline { throw BenchError("\(what): wl-tree did not answer SIGUSR1 within 15 s") }
            usleep(2000)
            text = readTextFile(tree.report)
        }
        let check: WlTreeCheck
        do { check = try JSONDecoder().decode(WlTreeCheck.self, from: Data(text.utf8)) } catch {
            throw BenchError("\(what): cannot decode wl-tree's report \(text.prefix(200).debugDescription): \(error)")
        }
        guard check.ok, check.procs == point.procs, check.threads == point.threads, check.pid == tree.root else {
            throw BenchError("\(what) failed wl-tree's check: \(check.detail)")
        }
        if check.pdeathsig_lost > 0 { notes.append("\(what): \(check.pdeathsig_lost) children lost their PR_SET_PDEATHSIG") }
        return check.detail
    }

    /// SIGKILLs every process of the tree (found from its root, in its cgroup, or seen before and
    /// still a wl-tree of this bench), waits until every PID is free, removes its cgroup.
    @discardableResult
    func tearDown(_ tree: TreeProcesses) throws -> UInt64 {
        guard !tree.gone else { return 0 }
        let start = now()
        var targets = Set(treeProcesses(tree.root))
        targets.formUnion(cgroupMembers(tree.cgroup))
        targets.formUnion(tree.pids.filter(isOurs))
        for pid in targets { kill(pid, SIGKILL) }
        try waitGone(Array(targets), what: "the tree \(tree.root)", cgroup: tree.cgroup)
        finished(tree, extra: Array(targets))
        return now() - start
    }

    func tearDownQuietly(_ tree: TreeProcesses) {
        do { try tearDown(tree) } catch {
            failures.append(TreeFailure(procs: nil, threads: nil, run: nil, mode: "clean-up", message: "\(error)"))
            progress("warning: \(error)")
        }
    }

    /// Waits until none of `pids` exists (reaping those re-parented to the bench); SIGKILLs any
    /// process that turns up in `cgroup` meanwhile.
    @discardableResult
    func waitGone(_ pids: [pid_t], what: String, cgroup: String?) throws -> UInt64 {
        let start = now()
        let deadline = start + UInt64(plan.timeoutSeconds * 1e9)
        var pending = Set(pids)
        var pause: UInt32 = 100
        while true {
            base.children.reapAvailable()
            for pid in cgroupMembers(cgroup) where !pending.contains(pid) {
                kill(pid, SIGKILL)
                pending.insert(pid)
            }
            pending = pending.filter { access("/proc/\($0)", F_OK) == 0 }
            if pending.isEmpty { return now() - start }
            if now() > deadline {
                throw BenchError("\(what): \(pending.count) processes still exist \(Int(plan.timeoutSeconds)) s after SIGKILL (\(pending.sorted().prefix(8).map(String.init).joined(separator: ", ")))")
            }
            usleep(pause)
            pause = min(pause * 2, 2000)
        }
    }

    /// The tree is gone: forget its exits and its root, remove its cgroup.
    func finished(_ tree: TreeProcesses, extra: [pid_t]) {
        base.children.forget(tree.pids + extra + [tree.root])
        base.disown(tree.root)
        if let cgroup = tree.cgroup { base.removeCgroup(cgroup) }
        tree.gone = true
        alive.removeAll { $0 === tree }
    }

    /// A wl-tree started by this bench (its --report argument lies in the work directory).
    func isOurs(_ pid: pid_t) -> Bool {
        let command = readTextFile("/proc/\(pid)/cmdline", limit: 64 << 10)
        return command.contains("wl-tree") && command.contains(work + "/")
    }

    func strays() -> [pid_t] { directoryNames("/proc").compactMap { pid_t($0) }.filter(isOurs) }

    /// Kills wl-tree processes of the bench's that no tree accounts for (there should be none).
    func removeStrays() {
        let found = strays()
        guard !found.isEmpty else { return }
        notes.append("\(found.count) wl-tree processes of this bench were still running after a measurement and were killed: \(found.prefix(8).map(String.init).joined(separator: ", "))")
        progress("warning: \(found.count) stray wl-tree processes; killing them")
        for pid in found { kill(pid, SIGKILL) }
        do { try waitGone(found, what: "stray wl-tree processes", cgroup: nil) } catch {
            failures.append(TreeFailure(procs: nil, threads: nil, run: nil, mode: "clean-up", message: "\(error)"))
        }
        base.children.forget(found)
    }

    /// Ends whatever is still running (also after a failure).
    func finish() {
        for tree in alive { tearDownQuietly(tree) }
        removeStrays()
    }

    /// After `finish` and `BenchRunner.cleanUp`: what is left.
    func checkNothingLeft() -> TreeCleanUp {
        var result = TreeCleanUp()
        result.processes = strays().count
        result.cgroups = cgroupsSeen.filter { access($0, F_OK) == 0 }.sorted()
        result.cgroupsUsed = cgroupsSeen.count
        result.otherWorkloads = directoryNames("/proc").compactMap { pid_t($0) }.filter { pid in
            let command = readTextFile("/proc/\(pid)/cmdline", limit: 64 << 10)
            return command.contains("wl-tree") && !command.contains(work + "/") && command.contains("--report")
        }.count
        if result.processes > 0 { progress("error: \(result.processes) wl-tree processes of this bench are still running") }
        for cgroup in result.cgroups { progress("error: cgroup \(cgroup) still exists") }
        return result
    }

    func summary(_ r: TreeRun) -> String {
        var text = "\(r.point.label) run \(r.run) \(r.mode.rawValue): freeze \(fmt(r.snapshot.freeze_ms, 2)) ms (capture \(fmt(r.snapshot.capture_ms, 2)), cow \(fmt(r.snapshot.cow_ms, 2))), stream \(fmt(r.snapshot.stream_ms, 1)) ms, total \(fmt(r.snapshot.total_ms, 1)) ms"
        if let restore = r.restore { text += "; restore \(fmt(restore.restore_ms, 1)) ms (pages \(fmt(restore.pages_ms, 1)) ms)" }
        text += "; \(r.processes_found) processes / \(r.threads_found) threads found after; tree start \(fmt(r.start_ms, 0)) ms, teardown \(fmt(r.teardown_ms, 0)) ms"
        return text
    }
}
