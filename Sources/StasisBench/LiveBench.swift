import ArgumentParser
import CStasis
import Glibc
import Stasis

/// `stasis-bench live`: live snapshots (stasis' default mode) against the copy-on-write floor
/// and against `--stop-the-world`, all measured in the same run, variants interleaved.
struct LiveBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "live",
        abstract: "Live snapshots: freeze time against the copy-on-write floor and --stop-the-world; workload and streaming throughput.",
        discussion: """
            Parts (--parts, comma-separated, default all): \
            sizes — per size, an idle `wl-bench --mb N`: the copy-on-write floor (fork and userfaultfd \
            write-protection in a helper process holding N MiB of touched 4 KiB pages), live and \
            stop-the-world snapshots to /dev/null, the read limit; for --file-sizes also live snapshots \
            to a file against the limit to a file. huge — the same on THP-backed memory (wl-bench --huge). \
            threads — live snapshots of wl-bench --threads T. hot — a workload whose threads keep writing \
            --hot-percent of its pages. throughput — a workload writing all its pages as fast as it can: \
            its page writes per second with no snapshot, during a live snapshot and during a \
            stop-the-world snapshot. Within each part the variants are interleaved (ABBA order) and \
            medians are reported. Report on stdout (Markdown), progress on stderr.
            """)

    @Option(help: "Workload sizes in MiB for the sizes part, comma-separated.")
    var sizes = "64,1024,4096,8192"
    @Option(help: "Repetitions: one number for everything, or one per size of --sizes (default: 7 below 1 GiB, 5 at 1 GiB, 3 above).")
    var reps: String?
    @Flag(help: "Every part at 64 MiB, 2 repetitions: a smoke test (about 20 s).")
    var quick = false
    @Option(help: "Which parts to run: sizes, huge, threads, hot, throughput (comma-separated).")
    var parts = "sizes,huge,threads,hot,throughput"
    @Option(help: "Sizes (MiB) at which live snapshots to a file are compared with the limit to a file (none: no file part).")
    var fileSizes = "64,1024,4096"
    @Option(help: "Sizes (MiB) of the THP-backed workloads (huge part).")
    var hugeSizes = "1024,4096"
    @Option(help: "Thread counts (threads part).")
    var threads = "1,8,64"
    @Option(help: "Workload size in MiB for the threads part.")
    var threadsMb = 1024
    @Option(help: "Workload size in MiB for the hot part.")
    var hotMb = 4096
    @Option(help: "Percentage of the pages the hot workload keeps writing.")
    var hotPercent = 1.0
    @Option(help: "Workload size in MiB for the throughput part (it writes all its pages).")
    var throughputMb = 1024
    @Option(help: "Seconds of each no-snapshot window in the throughput part.")
    var baselineSeconds = 1.0
    @Option(help: "Directory for image files (a stasis-bench-XXXXXX directory is made in it and removed).")
    var dir = "/var/tmp"
    @Option(help: "The stasis executable (default: next to stasis-bench).")
    var stasis: String?
    @Option(help: "The wl-bench executable (default: next to stasis-bench).")
    var workload: String?
    @Flag(help: "Do not populate and free memory of the workload's size before each measured file write.")
    var noPrewarm = false

    @Option(help: .hidden)
    var cowFloorHelper: Int?
    @Flag(help: .hidden)
    var helperHuge = false

    func run() throws {
        if let cowFloorHelper { runCowFloorHelper(mebibytes: cowFloorHelper, huge: helperHuge) }
        Emergency.setUp()
        var plan = LivePlan()
        plan.parts = Set(parts.split(separator: ",").map { String($0).trimmingCharacters(in: " ") })
        let known: Set<String> = ["sizes", "huge", "threads", "hot", "throughput"]
        guard !plan.parts.isEmpty, plan.parts.isSubset(of: known) else {
            throw ValidationError("--parts: choose among \(known.sorted().joined(separator: ", "))")
        }
        if quick {
            plan.sizes = [64]
            plan.fileSizes = fileSizes == "none" ? [] : [64]
            plan.hugeSizes = [64]
            plan.threadCounts = [1, 8]
            plan.threadsMebibytes = 64
            plan.hotMebibytes = 64
            plan.throughputMebibytes = 64
        } else {
            plan.sizes = try parseList(sizes, "--sizes")
            plan.fileSizes = fileSizes == "none" ? [] : try parseList(fileSizes, "--file-sizes")
            plan.hugeSizes = try parseList(hugeSizes, "--huge-sizes")
            plan.threadCounts = try parseList(threads, "--threads")
            plan.threadsMebibytes = threadsMb
            plan.hotMebibytes = hotMb
            plan.throughputMebibytes = throughputMb
        }
        plan.hotPercent = hotPercent
        plan.baselineSeconds = baselineSeconds
        if let reps {
            let parsed = try parseList(reps, "--reps")
            if parsed.count == 1 {
                plan.fixedReps = parsed[0]
            } else {
                guard parsed.count == plan.sizes.count else { throw ValidationError("--reps needs one number or one per size") }
                plan.sizeReps = Dictionary(zip(plan.sizes, parsed), uniquingKeysWith: { a, _ in a })
            }
        } else if quick {
            plan.fixedReps = 2
        }

        let directory = try executableDirectory()
        let config = BenchConfig(
            stasis: stasis ?? directory + "/stasis", workload: workload ?? directory + "/wl-bench",
            pipeSize: 0, verify: false, prewarm: !noPrewarm, selfPath: try executablePath())
        for tool in [config.stasis, config.workload] where access(tool, X_OK) != 0 {
            throw ValidationError("\(tool) is missing; build with `swift build -c release`")
        }
        var template = Array((dir + "/stasis-bench-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw BenchError("cannot create a directory in \(dir): \(errnoText())") }
        let work = String(cString: made)

        let base = BenchRunner(config: config, work: work)
        let runner = LiveRunner(base: base, plan: plan)
        let startedAt = now()
        let machine = MachineInfo.collect(directory: work, pipeSize: 0)
        progress("stasis-bench live: parts \(plan.parts.sorted().joined(separator: ", ")); work directory \(work)")
        if machine.backgroundBusyPercent > 15 {
            progress("warning: the CPUs were \(Int(machine.backgroundBusyPercent))% busy before the benchmark started; results will be disturbed")
        }
        var failure: Error?
        do { try runner.runAll() } catch { failure = error }
        runner.finish()
        base.cleanUp()
        let elapsed = Double(now() - startedAt) / 1e9
        var endMachine = machine
        endMachine.backgroundBusyPercentAtEnd = MachineInfo.busyPercent(seconds: 0.5)
        print(LiveReport(results: runner.results, plan: plan, machine: endMachine, elapsedSeconds: elapsed,
                         arguments: CommandLine.arguments, invocations: base.invocations, crashes: base.crashes,
                         failure: failure.map { "\($0)" }).markdown())
        if let failure {
            progress("stasis-bench live: \(interrupted != 0 ? "interrupted (\(failure))" : "\(failure)")")
            throw ExitCode(1)
        }
    }
}

/// What `stasis-bench live` runs.
struct LivePlan {
    var parts: Set<String> = []
    var sizes: [Int] = []
    var fileSizes: [Int] = []
    var hugeSizes: [Int] = []
    var threadCounts: [Int] = []
    var threadsMebibytes = 1024
    var hotMebibytes = 4096
    var hotPercent = 1.0
    var throughputMebibytes = 1024
    var baselineSeconds = 1.0
    var fixedReps: Int?
    var sizeReps: [Int: Int] = [:]

    func reps(_ mebibytes: Int) -> Int {
        if let fixedReps { return fixedReps }
        if let given = sizeReps[mebibytes] { return given }
        return mebibytes < 1024 ? 7 : (mebibytes == 1024 ? 5 : 3)
    }
}

// MARK: - Results

/// A snapshot and, in the throughput part, the workload's page writes per second meanwhile.
struct LiveSnap {
    var sample: SnapshotSample
    var stats: SnapshotStats { sample.stats }
    /// Page writes per second of the workload from just before stasis started to just after it exited.
    var rate: Double?
    var windowNs: UInt64 = 0
}

/// Reading the workload's memory, discarding it: the read limit of a stream to /dev/null.
struct ReadLimitSample {
    var bytes: UInt64
    /// pread of /proc/PID/mem in 4 MiB chunks (how stasis reads pages).
    var procMemNs: UInt64
    /// process_vm_readv in 4 MiB chunks.
    var readvNs: UInt64
}

struct WorkloadInfo {
    var arguments: [String]
    var fillNs: UInt64
    var rssBytes: UInt64
    var anonHugeBytes: UInt64
    var pageTableBytes: UInt64
}

final class LiveResults {
    /// Snapshots by "group/variant", e.g. "size/1024/live", "size/1024/stw", "size/1024/file".
    var snaps: [String: [LiveSnap]] = [:]
    /// Floor measurements by group, and what the helper held.
    var floors: [String: [CowFloorSample]] = [:]
    var floorInfo: [String: CowFloorInfo] = [:]
    var reads: [String: [ReadLimitSample]] = [:]
    var fileLimits: [String: [LimitResult]] = [:]
    /// Page writes per second with no snapshot running (throughput part).
    var baselines: [String: [Double]] = [:]
    var workloads: [String: WorkloadInfo] = [:]
    /// Groups whose floor was not measured alongside the snapshots (not enough memory for both).
    var sequentialFloors: Set<String> = []
    var notes: [String] = []
    var busy: [String: Double] = [:]
}

/// Available memory in MiB (MemAvailable).
func memoryAvailableMiB() -> Int {
    for line in readTextFile("/proc/meminfo").split(separator: "\n") where line.hasPrefix("MemAvailable:") {
        return (Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) / 1024
    }
    return 0
}

/// CPU time (all processes) from /proc/stat: busy and total jiffies.
func cpuJiffies() -> (busy: Double, total: Double) {
    guard let line = readTextFile("/proc/stat").split(separator: "\n").first else { return (0, 0) }
    let values = line.split(separator: " ").dropFirst().compactMap { Double($0) }
    guard values.count >= 5 else { return (0, 0) }
    let total = values.prefix(8).reduce(0, +)
    return (total - values[3] - values[4], total)
}

// MARK: - Running

final class LiveRunner {
    let base: BenchRunner
    let plan: LivePlan
    let results = LiveResults()
    var config: BenchConfig { base.config }
    var work: String { base.work }
    private let devNull: Int32
    private var workloads: [pid_t] = []
    private var helpers: [CowFloorHelper] = []

    init(base: BenchRunner, plan: LivePlan) {
        self.base = base
        self.plan = plan
        devNull = open("/dev/null", O_WRONLY | O_CLOEXEC)
    }

    func runAll() throws {
        if plan.parts.contains("sizes") { for size in plan.sizes { try measureSize(size) } }
        if plan.parts.contains("huge") { for size in plan.hugeSizes { try measureHuge(size) } }
        if plan.parts.contains("threads") { try measureThreads() }
        if plan.parts.contains("hot") { try measureHot() }
        if plan.parts.contains("throughput") { try measureThroughput() }
    }

    /// Ends whatever is still running (also after a failure).
    func finish() {
        for helper in helpers { helper.stop() }
        helpers.removeAll()
        for pid in workloads { try? base.stopWorkload(pid) }
        workloads.removeAll()
        close(devNull)
    }

    // MARK: parts

    func measureSize(_ size: Int) throws {
        let group = "size/\(size)"
        let reps = plan.reps(size)
        let cpu = cpuJiffies()
        defer { recordBusy(group, since: cpu) }
        let (pid, _) = try startWorkload(group, mebibytes: size, extra: [])
        let mapping = try workloadMemory(pid, mebibytes: size)
        // The floor helper runs alongside when there is memory for both.
        let together = memoryAvailableMiB() > size + 3072
        var helper: CowFloorHelper?
        if together {
            helper = try startHelper(group, mebibytes: size, huge: false)
        } else {
            results.sequentialFloors.insert(group)
            progress("\(group): \(memoryAvailableMiB()) MiB available: the floor is measured after the snapshots, not interleaved")
        }
        try warmUp(pid, size, stopTheWorld: true)
        var variants: [(String, (Int) throws -> Void)] = []
        if let helper { variants.append(("floor", { rep in try self.floor(group, helper, rep) })) }
        variants += [
            ("live", { rep in try self.snapshotToNull(group, "live", pid: pid, mebibytes: size, rep: rep) }),
            ("stw", { rep in try self.snapshotToNull(group, "stw", pid: pid, mebibytes: size, rep: rep, stopTheWorld: true) }),
            ("read", { rep in
                let sample = try self.readLimit(pid: pid, mapping: mapping, procMemFirst: rep % 2 == 0)
                self.results.reads[group, default: []].append(sample)
                progress("\(group) #\(rep + 1): read limit /proc/PID/mem \(fmt(ms(sample.procMemNs), 1)) ms, process_vm_readv \(fmt(ms(sample.readvNs), 1)) ms")
            }),
        ]
        try interleave(reps, variants)
        if let helper { stopHelper(helper) }

        if plan.fileSizes.contains(size) {
            try interleave(reps, [
                ("file", { rep in
                    if self.config.prewarm { prewarmFreeMemory(bytes: (size + 16) << 20) }
                    let sample = try self.base.retryingCrashes("stasis snapshot -o FILE") {
                        try self.base.snapshotToFile(pid: pid, mebibytes: size, kill: false)
                    }
                    self.results.snaps["\(group)/file", default: []].append(LiveSnap(sample: sample))
                    progress("\(group) #\(rep + 1): live to file total \(fmt(sample.stats.total_ms, 1)) ms (stream \(fmt(sample.stats.stream_ms, 1)) ms), freeze \(fmt(sample.stats.freeze_ms, 2)) ms")
                }),
                ("limit", { rep in
                    let path = "\(self.work)/limit.img"
                    defer { unlink(path); sync() }
                    if self.config.prewarm { prewarmFreeMemory(bytes: (size + 16) << 20) }
                    let limit = try copyLimit(pid: pid, mapping: mapping, to: .file(path), buffer: self.base.buffer)
                    self.results.fileLimits[group, default: []].append(limit)
                    progress("\(group) #\(rep + 1): limit to file \(fmt(ms(limit.totalNs), 1)) ms")
                }),
            ])
        }
        try stopWorkload(pid)

        if !together {
            let helper = try startHelper(group, mebibytes: size, huge: false)
            try interleave(reps, [("floor", { rep in try self.floor(group, helper, rep) })])
            stopHelper(helper)
        }
    }

    func measureHuge(_ size: Int) throws {
        let group = "thp/\(size)"
        let reps = plan.reps(size)
        let cpu = cpuJiffies()
        defer { recordBusy(group, since: cpu) }
        let (pid, _) = try startWorkload(group, mebibytes: size, extra: ["--huge"])
        let together = memoryAvailableMiB() > size + 3072
        var helper: CowFloorHelper?
        if together { helper = try startHelper(group, mebibytes: size, huge: true) } else { results.sequentialFloors.insert(group) }
        try warmUp(pid, size, stopTheWorld: true)
        var variants: [(String, (Int) throws -> Void)] = []
        if let helper { variants.append(("floor", { rep in try self.floor(group, helper, rep) })) }
        variants += [
            ("live", { rep in try self.snapshotToNull(group, "live", pid: pid, mebibytes: size, rep: rep) }),
            ("stw", { rep in try self.snapshotToNull(group, "stw", pid: pid, mebibytes: size, rep: rep, stopTheWorld: true) }),
        ]
        try interleave(reps, variants)
        // Still huge after the snapshots? (A split would show here.)
        let (_, hugeAfter, _) = memoryFacts(pid)
        results.notes.append("\(group): the workload's AnonHugePages after the snapshots: \(mib(hugeAfter)) MiB")
        if let helper { stopHelper(helper) }
        try stopWorkload(pid)
        if !together {
            let helper = try startHelper(group, mebibytes: size, huge: true)
            try interleave(reps, [("floor", { rep in try self.floor(group, helper, rep) })])
            stopHelper(helper)
        }
    }

    func measureThreads() throws {
        let size = plan.threadsMebibytes
        let reps = plan.reps(size)
        let cpu = cpuJiffies()
        defer { recordBusy("threads", since: cpu) }
        var pids: [(Int, pid_t)] = []
        for count in plan.threadCounts {
            let (pid, _) = try startWorkload("threads/\(count)", mebibytes: size, extra: ["--threads", String(count)])
            pids.append((count, pid))
        }
        let helper = try startHelper("threads", mebibytes: size, huge: false)
        for (_, pid) in pids { try warmUp(pid, size, stopTheWorld: false) }
        var variants: [(String, (Int) throws -> Void)] = [("floor", { rep in try self.floor("threads", helper, rep) })]
        for (count, pid) in pids {
            variants.append(("\(count)", { rep in try self.snapshotToNull("threads/\(count)", "live", pid: pid, mebibytes: size, rep: rep) }))
        }
        try interleave(reps, variants)
        stopHelper(helper)
        for (_, pid) in pids { try stopWorkload(pid) }
    }

    func measureHot() throws {
        let size = plan.hotMebibytes
        let reps = plan.reps(size)
        let cpu = cpuJiffies()
        defer { recordBusy("hot", since: cpu) }
        let (hot, _) = try startWorkload("hot/hot", mebibytes: size, extra: ["--hot-percent", fmt(plan.hotPercent, 3)])
        // An idle workload of the same size in the same loop, and the floor, if memory allows.
        var idle: pid_t?
        if memoryAvailableMiB() > 2 * size + 3072 {
            idle = try startWorkload("hot/idle", mebibytes: size, extra: []).0
        } else {
            results.notes.append("hot: not enough memory for an idle workload of the same size in the same loop")
        }
        var helper: CowFloorHelper?
        if memoryAvailableMiB() > size + 3072 {
            helper = try startHelper("hot", mebibytes: size, huge: false)
        } else {
            results.notes.append("hot: not enough memory for the floor helper in the same loop")
        }
        try warmUp(hot, size, stopTheWorld: false)
        if let idle { try warmUp(idle, size, stopTheWorld: false) }
        var variants: [(String, (Int) throws -> Void)] = []
        if let helper { variants.append(("floor", { rep in try self.floor("hot", helper, rep) })) }
        variants.append(("hot", { rep in try self.snapshotToNull("hot", "hot", pid: hot, mebibytes: size, rep: rep) }))
        if let idle { variants.append(("idle", { rep in try self.snapshotToNull("hot", "idle", pid: idle, mebibytes: size, rep: rep) })) }
        try interleave(reps, variants)
        if let helper { stopHelper(helper) }
        if let idle { try stopWorkload(idle) }
        try stopWorkload(hot)
    }

    func measureThroughput() throws {
        let size = plan.throughputMebibytes
        let reps = plan.reps(size)
        let group = "tput"
        let cpu = cpuJiffies()
        defer { recordBusy(group, since: cpu) }
        let output = "\(work)/wl-tput.out"
        let (pid, _) = try startWorkload(group, mebibytes: size, extra: ["--hot-percent", "100"], output: output)
        try warmUp(pid, size, stopTheWorld: false)
        func baseline(_ rep: Int, _ before: String) throws {
            usleep(300_000)  // let the writer get past the last snapshot's after-effects
            let first = try sampleProgress(pid: pid, output: output)
            usleep(UInt32(plan.baselineSeconds * 1e6))
            let second = try sampleProgress(pid: pid, output: output)
            let rate = Double(second.count - first.count) / (Double(second.time - first.time) / 1e9)
            results.baselines[group, default: []].append(rate)
            progress("\(group) #\(rep + 1): no snapshot (before \(before)): \(fmt(rate / 1e6, 2)) M page writes/s")
        }
        func during(_ variant: String, _ rep: Int, _ body: () throws -> SnapshotSample) throws {
            try baseline(rep, variant)
            if variant == "file" && config.prewarm { prewarmFreeMemory(bytes: (size + 16) << 20) }
            usleep(300_000)
            let first = try sampleProgress(pid: pid, output: output)
            let sample = try body()
            let second = try sampleProgress(pid: pid, output: output)
            let window = second.time - first.time
            let rate = Double(second.count - first.count) / (Double(window) / 1e9)
            results.snaps["\(group)/\(variant)", default: []].append(LiveSnap(sample: sample, rate: rate, windowNs: window))
            progress("\(group) #\(rep + 1): during \(variant): \(fmt(rate / 1e6, 2)) M page writes/s over \(fmt(ms(window), 0)) ms; freeze \(fmt(sample.stats.freeze_ms, 1)) ms, stream \(fmt(sample.stats.stream_ms, 1)) ms, cow_pages \(sample.stats.cow_pages), peak extra \(mib(sample.stats.peak_extra_bytes)) MiB")
        }
        try interleave(reps, [
            ("live", { rep in try during("live", rep) { try self.nullSnapshot(pid: pid, mebibytes: size, stopTheWorld: false) } }),
            ("stw", { rep in try during("stw", rep) { try self.nullSnapshot(pid: pid, mebibytes: size, stopTheWorld: true) } }),
            ("file", { rep in
                try during("file", rep) {
                    try self.base.retryingCrashes("stasis snapshot -o FILE") { try self.base.snapshotToFile(pid: pid, mebibytes: size, kill: false) }
                }
            }),
        ])
        try baseline(reps, "the end")
        try stopWorkload(pid)
    }

    // MARK: steps

    /// Runs each variant once per repetition, in ABBA order.
    func interleave(_ reps: Int, _ variants: [(String, (Int) throws -> Void)]) throws {
        for rep in 0..<reps {
            for (_, body) in rep % 2 == 0 ? variants : variants.reversed() {
                try Emergency.check()
                try body(rep)
            }
        }
    }

    func floor(_ group: String, _ helper: CowFloorHelper, _ rep: Int) throws {
        let sample = try helper.measure(forkFirst: rep % 2 == 0)
        results.floors[group, default: []].append(sample)
        progress("\(group) #\(rep + 1): floor: fork \(fmt(ms(sample.forkNs), 2)) ms (until the child was reaped \(fmt(ms(sample.forkExitNs), 2)) ms), userfaultfd WP \(fmt(ms(sample.uffdNs), 2)) ms (WRITEPROTECT \(fmt(ms(sample.uffdProtectNs), 2)) ms)")
    }

    func snapshotToNull(_ group: String, _ variant: String, pid: pid_t, mebibytes: Int, rep: Int, stopTheWorld: Bool = false) throws {
        let sample = try nullSnapshot(pid: pid, mebibytes: mebibytes, stopTheWorld: stopTheWorld)
        results.snaps["\(group)/\(variant)", default: []].append(LiveSnap(sample: sample))
        let s = sample.stats
        progress("\(group) #\(rep + 1): \(variant) freeze \(fmt(s.freeze_ms, 2)) ms (capture \(fmt(s.capture_ms, 2)), cow \(fmt(s.cow_ms, 2))), stream \(fmt(s.stream_ms, 1)) ms, cleanup stop \(fmt(s.cleanup_stop_ms, 2)) ms, cow_pages \(s.cow_pages), peak extra \(mib(s.peak_extra_bytes)) MiB")
    }

    /// `stasis snapshot PID -o -` with stdout on /dev/null.
    func nullSnapshot(pid: pid_t, mebibytes: Int, stopTheWorld: Bool) throws -> SnapshotSample {
        let what = stopTheWorld ? "stasis snapshot --stop-the-world -o -" : "stasis snapshot -o -"
        return try base.retryingCrashes(what) {
            let statsPath = "\(work)/live.json"
            let run = try runTool([config.stasis, "snapshot", String(pid), "-o", "-", "--stats", statsPath] + (stopTheWorld ? ["--stop-the-world"] : []),
                                  children: base.children, scratch: work, stdoutFD: devNull,
                                  timeoutSeconds: base.timeout(mebibytes), what: what)
            let stats = try base.readSnapshotStats(statsPath)
            return SnapshotSample(stats: stats, peakRSS: run.exit.peakRSSBytes, wallNs: run.exit.wallNs,
                                  polledHWM: run.exit.polledHWM, benchRSS: run.exit.benchRSSAtSpawn)
        }
    }

    /// One unrecorded live snapshot (and a stop-the-world one): stasis' code in the page cache,
    /// the workload's page tables in the state every later snapshot finds them in.
    func warmUp(_ pid: pid_t, _ mebibytes: Int, stopTheWorld: Bool) throws {
        _ = try nullSnapshot(pid: pid, mebibytes: mebibytes, stopTheWorld: false)
        if stopTheWorld { _ = try nullSnapshot(pid: pid, mebibytes: mebibytes, stopTheWorld: true) }
    }

    func readLimit(pid: pid_t, mapping: MapEntry, procMemFirst: Bool) throws -> ReadLimitSample {
        let buffer = base.buffer
        func viaProcMem() throws -> UInt64 {
            let fd = open("/proc/\(pid)/mem", O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw BenchError("open /proc/\(pid)/mem: \(errnoText())") }
            defer { close(fd) }
            let start = now()
            var address = mapping.start
            while address < mapping.end {
                let count = Int(min(UInt64(buffer.size), mapping.end - address))
                let got = stasis_pread(fd, buffer.pointer, count, address)
                if got == -Int(EINTR) { continue }
                guard got > 0 else { throw BenchError("pread /proc/\(pid)/mem: \(errnoText(Int32(-got)))") }
                address += UInt64(got)
            }
            return now() - start
        }
        func viaReadv() throws -> UInt64 {
            let start = now()
            var address = mapping.start
            while address < mapping.end {
                let count = Int(min(UInt64(buffer.size), mapping.end - address))
                try readRemote(pid, address, into: buffer.pointer, count: count)
                address += UInt64(count)
            }
            return now() - start
        }
        var sample = ReadLimitSample(bytes: mapping.size, procMemNs: 0, readvNs: 0)
        if procMemFirst {
            sample.procMemNs = try viaProcMem()
            sample.readvNs = try viaReadv()
        } else {
            sample.readvNs = try viaReadv()
            sample.procMemNs = try viaProcMem()
        }
        return sample
    }

    /// Asks wl-bench for its page-write count (SIGUSR1 → "progress N"); the time is the middle of
    /// the request and the answer.
    func sampleProgress(pid: pid_t, output: String) throws -> (time: UInt64, count: UInt64) {
        func lines() -> [Substring] { readTextFile(output, limit: 16 << 20).split(separator: "\n").filter { $0.hasPrefix("progress ") } }
        let before = lines().count
        let sent = now()
        guard kill(pid, SIGUSR1) == 0 else { throw BenchError("kill(\(pid), SIGUSR1): \(errnoText())") }
        let deadline = sent + 10_000_000_000
        while true {
            let current = lines()
            if current.count > before, let count = UInt64(current.last!.dropFirst("progress ".count)) {
                return ((sent + now()) / 2, count)
            }
            if now() > deadline { throw BenchError("wl-bench (pid \(pid)) did not answer SIGUSR1") }
            try Emergency.check()
            usleep(200)
        }
    }

    // MARK: processes

    func startWorkload(_ key: String, mebibytes: Int, extra: [String], output: String? = nil) throws -> (pid_t, UInt64) {
        let path = output ?? "\(work)/wl-\(key.replacingSlashes()).out"
        let (pid, fillNs) = try base.startWorkload(mebibytes: mebibytes, output: path, extra: extra)
        workloads.append(pid)
        let (rss, huge, tables) = memoryFacts(pid)
        results.workloads[key] = WorkloadInfo(arguments: ["--mb", String(mebibytes)] + extra, fillNs: fillNs,
                                              rssBytes: rss, anonHugeBytes: huge, pageTableBytes: tables)
        progress("\(key): wl-bench --mb \(mebibytes) \(extra.joined(separator: " ")) pid \(pid) ready after \(fmt(ms(fillNs), 0)) ms; RSS \(mib(rss)) MiB, AnonHugePages \(mib(huge)) MiB, page tables \(mib(tables)) MiB")
        return (pid, fillNs)
    }

    func stopWorkload(_ pid: pid_t) throws {
        workloads.removeAll { $0 == pid }
        try base.stopWorkload(pid)
    }

    func startHelper(_ group: String, mebibytes: Int, huge: Bool) throws -> CowFloorHelper {
        let helper = try CowFloorHelper(children: base.children, selfPath: config.selfPath, mebibytes: mebibytes, huge: huge)
        helpers.append(helper)
        results.floorInfo[group] = helper.info
        progress("\(group): floor helper pid \(helper.pid) holds \(mib(helper.info.bytes)) MiB (AnonHugePages \(mib(helper.info.anonHugeBytes)) MiB, page tables \(mib(helper.info.pageTableBytes)) MiB), filled in \(fmt(ms(helper.info.fillNs), 0)) ms")
        return helper
    }

    func stopHelper(_ helper: CowFloorHelper) {
        helper.stop()
        helpers.removeAll { $0 === helper }
    }

    /// RSS, AnonHugePages and page-table bytes of a process.
    func memoryFacts(_ pid: pid_t) -> (UInt64, UInt64, UInt64) {
        var huge: UInt64 = 0
        for line in readTextFile("/proc/\(pid)/smaps_rollup").split(separator: "\n") where line.hasPrefix("AnonHugePages:") {
            huge = (UInt64(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) * 1024
        }
        return (statusField(String(pid), "VmRSS"), huge, statusField(String(pid), "VmPTE"))
    }

    func recordBusy(_ group: String, since start: (busy: Double, total: Double)) {
        let end = cpuJiffies()
        if end.total > start.total { results.busy[group] = 100 * (end.busy - start.busy) / (end.total - start.total) }
    }
}

extension String {
    func replacingSlashes() -> String { String(map { $0 == "/" ? "-" : $0 }) }
}
