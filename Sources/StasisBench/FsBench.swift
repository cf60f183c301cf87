import ArgumentParser
import Glibc
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Stasis

/// `stasis-bench fs`: what `snapshot --fs DIR` costs (fs_ms, the freeze with and without it,
/// the restore with its rollback) against the number of files under DIR, per mechanism
/// (btrfs snapshot, reflink copy on xfs, plain copy on ext4), on loop-mounted images.
struct FsBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fs",
        abstract: "Filesystem-consistent snapshots: fs_ms, freeze and restore time against the files under --fs DIR, per mechanism.",
        discussion: """
            For each mechanism and file count N: a fresh 2 GiB image in the work directory \
            (truncate, mkfs, mount -o loop), a directory DATA in it (a btrfs subvolume on btrfs) \
            holding N files of 4 KiB of non-zero data in subdirectories of 1000, then sync. A \
            `wl-tree --procs 1` is started with `stasis run`, its stdout appended to a file in DATA \
            (so it holds a file open there). --runs times, in alternating order: `stasis snapshot \
            ROOT -o IMG --fs DATA --stats S.json` (live, the workload runs on; its fs snapshot is \
            then dropped with `stasis fs drop ID`) and the same without --fs (the baseline). Once \
            per point: `snapshot --fs DATA --kill`, DATA changed, `stasis restore IMG --detach \
            --stats R.json` (rolls DATA back), the rollback checked, the restored workload checked \
            running and killed, the fs snapshot dropped. Everything is unmounted and deleted at \
            the end, on failure too. Report on stdout (Markdown), progress on stderr.
            """)

    @Option(help: "Runs per point (with and without --fs each).")
    var runs = 3
    @Option(help: "Numbers of files under the directory, comma-separated.")
    var files = "1,10000,100000"
    @Option(help: "Mechanisms (filesystems), comma-separated: btrfs (btrfsSnapshot), xfs (reflink), ext4 (copy).")
    var mechanisms = "btrfs,xfs,ext4"
    @Option(help: "Time limit in seconds for each command.")
    var timeout = 600.0
    @Option(help: "Directory for the work directory, images and mount points (a stasis-bench-fs-XXXXXX directory is made in it and removed).")
    var dir = "/var/tmp"
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
        let counts = try parseList(files, "--files")
        let kinds = try mechanisms.split(separator: ",").map { word -> FsKind in
            guard let kind = FsKind(rawValue: String(word).trimmingCharacters(in: " ")) else {
                throw ValidationError("--mechanisms: \(word) is not one of btrfs, xfs, ext4")
            }
            return kind
        }
        guard geteuid() == 0 else { throw ValidationError("stasis-bench fs mounts loop images: run it as root") }
        for tool in ["truncate", "mount", "umount"] + kinds.map(\.mkfs) + (kinds.contains(.btrfs) ? ["btrfs"] : []) where findOnPath(tool) == nil {
            throw ValidationError("\(tool) is not on $PATH")
        }
        let directory = try executableDirectory()
        let config = BenchConfig(
            stasis: stasis ?? directory + "/stasis", workload: workload ?? directory + "/wl-tree",
            pipeSize: 0, verify: false, prewarm: false, selfPath: try executablePath())
        for tool in [config.stasis, config.workload] where access(tool, X_OK) != 0 {
            throw ValidationError("\(tool) is missing; build with `swift build -c release --product stasis` (and `--product wl-tree`)")
        }
        var template = Array((dir + "/stasis-bench-fs-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw BenchError("cannot create a directory in \(dir): \(errnoText())") }
        let work = String(cString: made)

        let base = BenchRunner(config: config, work: work)
        let runner = FsRunner(base: base, runs: runs, timeoutSeconds: timeout)
        let startedAt = now()
        let date = utcDate()
        let commit = gitCommit(in: directory, children: base.children, scratch: work)
        let machine = MachineInfo.collect(directory: work, pipeSize: 0)
        progress("stasis-bench fs: \(kinds.map(\.rawValue).joined(separator: ", ")) × \(counts.map(String.init).joined(separator: ", ")) files × \(runs) runs; work directory \(work)")
        for kind in kinds {
            for count in counts {
                if interrupted != 0 { break }
                runner.measurePoint(kind, files: count)
            }
        }
        runner.removeStrays()
        var cleanUp = runner.checkNothingLeft()
        base.cleanUp()
        if access(work, F_OK) == 0 { cleanUp.imagesLeft.append(work) }
        let elapsed = Double(now() - startedAt) / 1e9

        let report = FsReport(
            runs: runner.results, points: runner.points, failures: runner.failures, notes: runner.notes, cleanUp: cleanUp,
            machine: machine, date: date, commit: commit, directory: currentDirectory(), arguments: CommandLine.arguments,
            stasis: config.stasis, workload: config.workload, runsPerPoint: runs, elapsedSeconds: elapsed).markdown()
        print(report)
        if let output { try writeTextFile(output, report + "\n") }
        if let json {
            let document = FsDocument(
                command: CommandLine.arguments, directory: currentDirectory(), date: date, kernel: machine.kernel, commit: commit,
                stasis: config.stasis, workload: config.workload, runs_per_point: runs, points: runner.points, runs: runner.results,
                failures: runner.failures, notes: runner.notes, leftover_mounts: cleanUp.mounts,
                leftover_loop_devices: cleanUp.loopDevices, leftover_processes: cleanUp.processes,
                leftover_fs_snapshots: cleanUp.fsSnapshots)
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try writeTextFile(json, String(decoding: try encoder.encode(document), as: UTF8.self) + "\n")
        }
        if !runner.failures.isEmpty || !cleanUp.clean {
            progress("stasis-bench fs: \(interrupted != 0 ? "interrupted; " : "")\(runner.failures.count) failures; left behind: \(cleanUp.mounts.count) mounts, \(cleanUp.loopDevices.count) loop devices, \(cleanUp.processes) wl-tree processes, \(cleanUp.fsSnapshots.count) fs snapshots")
            throw ExitCode(1)
        }
    }
}

// MARK: - Plan and results

/// The filesystem of a point, and the mechanism stasis is expected to pick on it.
enum FsKind: String, Codable, CaseIterable {
    case btrfs, xfs, ext4
    var mkfs: String { "mkfs.\(rawValue)" }
    /// ext4's default of one inode per 16 KiB is too few for 100 000 files and their copy.
    var mkfsArguments: [String] { self == .ext4 ? ["-q", "-i", "4096"] : ["-q"] }
    var mechanism: String {
        switch self {
        case .btrfs: return "btrfsSnapshot"
        case .xfs: return "reflink"
        case .ext4: return "copy"
        }
    }
}

enum FsRunKind: String, Codable {
    /// `snapshot --fs DATA` (live, no --kill).
    case withFs = "fs"
    /// The same without --fs.
    case baseline
    /// `snapshot --fs DATA --kill`, then `restore --detach` with the rollback.
    case restore
}

/// One measurement (the raw numbers of `--json`).
struct FsRun: Codable {
    var mechanism: FsKind
    var files: Int
    var run: Int
    var kind: FsRunKind
    var snapshot: SnapshotStats
    var snapshot_wall_ms: Double
    var restore: RestoreStats?
    var restore_wall_ms: Double?
    /// `stasis fs drop ID` from spawn to exit, ms.
    var drop_ms: Double?
}

/// What was set up for a point.
struct FsPoint: Codable {
    var mechanism: FsKind
    var files: Int
    /// What stasis reported ("PATH: mechanism (type)"), from the first --fs snapshot.
    var reported: String?
    var mkfs_ms: Double
    var fill_ms: Double
    var sync_ms: Double
    var commands: [String]
}

struct FsFailure: Codable {
    var mechanism: FsKind?
    var files: Int?
    var step: String
    var message: String
}

struct FsCleanUp {
    var mounts: [String] = []
    /// `grep /var/tmp /proc/mounts` at the end (anyone's).
    var varTmpMounts: [String] = []
    var loopDevices: [String] = []
    var processes = 0
    var fsSnapshots: [String] = []
    var imagesLeft: [String] = []
    var clean: Bool { mounts.isEmpty && loopDevices.isEmpty && processes == 0 && fsSnapshots.isEmpty && imagesLeft.isEmpty }
}

struct FsDocument: Encodable {
    var command: [String]
    var directory: String
    var date: String
    var kernel: String
    var commit: String?
    var stasis: String
    var workload: String
    var runs_per_point: Int
    var points: [FsPoint]
    var runs: [FsRun]
    var failures: [FsFailure]
    var notes: [String]
    var leftover_mounts: [String]
    var leftover_loop_devices: [String]
    var leftover_processes: Int
    var leftover_fs_snapshots: [String]
}

// MARK: - Running

final class FsRunner {
    let base: BenchRunner
    let runs: Int
    let timeoutSeconds: Double
    private(set) var results: [FsRun] = []
    private(set) var points: [FsPoint] = []
    private(set) var failures: [FsFailure] = []
    private(set) var notes: [String] = []
    /// Every mount point and image this bench made (all must be gone at the end).
    private var mountPoints: [String] = []
    private var images: [String] = []
    var config: BenchConfig { base.config }
    var work: String { base.work }
    var children: Children { base.children }

    init(base: BenchRunner, runs: Int, timeoutSeconds: Double) {
        self.base = base
        self.runs = runs
        self.timeoutSeconds = timeoutSeconds
    }

    @discardableResult
    func tool(_ argv: [String], _ what: String? = nil) throws -> ToolRun {
        let path = argv[0].hasPrefix("/") ? argv[0] : (findOnPath(argv[0]) ?? argv[0])
        return try runTool([path] + argv.dropFirst(), children: children, scratch: work, timeoutSeconds: timeoutSeconds,
                           what: what ?? argv.prefix(2).joined(separator: " "))
    }

    func fail(_ kind: FsKind?, _ files: Int?, _ step: String, _ error: Error) {
        failures.append(FsFailure(mechanism: kind, files: files, step: step, message: "\(error)"))
        progress("\(kind?.rawValue ?? "-") \(files.map(String.init) ?? "-") files: \(step): FAILED: \(error)")
    }

    /// One mechanism × file count: a fresh filesystem, measured, then torn down whatever happened.
    func measurePoint(_ kind: FsKind, files: Int) {
        let label = "\(kind.rawValue) \(files) files"
        let image = "\(work)/\(kind.rawValue)-\(files).img"
        let mount = "\(work)/mnt-\(kind.rawValue)-\(files)"
        let data = mount + "/data"
        var workload: pid_t?
        var mounted = false
        defer {
            if let workload { try? base.stopWorkload(workload) }
            removeStrays()
            dropFsSnapshots(under: mount)
            if mounted { unmount(mount, kind, files) }
            rmdir(mount)
            unlink(image)
        }
        do {
            try Emergency.check()
            images.append(image)
            mountPoints.append(mount)
            var commands: [String] = []
            func step(_ argv: [String]) throws {
                commands.append(shellCommand(argv))
                try tool(argv)
            }
            let mkfsStart = now()
            try step(["truncate", "-s", "2G", image])
            try step([kind.mkfs] + kind.mkfsArguments + [image])
            let mkfsNs = now() - mkfsStart
            guard mkdir(mount, 0o755) == 0 else { throw BenchError("mkdir \(mount): \(errnoText())") }
            try step(["mount", "-o", "loop", image, mount])
            mounted = true
            if kind == .btrfs {
                try step(["btrfs", "subvolume", "create", data])
            } else {
                guard mkdir(data, 0o755) == 0 else { throw BenchError("mkdir \(data): \(errnoText())") }
            }
            let fillStart = now()
            try fill(data, files: files)
            let fillNs = now() - fillStart
            let syncStart = now()
            sync()
            let syncNs = now() - syncStart
            commands.append("(\(files) files of 4 KiB in \(data)/dNNNN/, 1000 per subdirectory; sync)")
            points.append(FsPoint(mechanism: kind, files: files, mkfs_ms: ms(mkfsNs), fill_ms: ms(fillNs), sync_ms: ms(syncNs), commands: commands))
            let pointIndex = points.count - 1
            progress("\(label): filesystem ready (mkfs \(fmt(ms(mkfsNs), 0)) ms, fill \(fmt(ms(fillNs), 0)) ms, sync \(fmt(ms(syncNs), 0)) ms)")

            workload = try startWorkload(data: data, name: "\(kind.rawValue)-\(files)")
            let root = workload!
            for run in 1...runs {
                let order: [FsRunKind] = run % 2 == 1 ? [.withFs, .baseline] : [.baseline, .withFs]
                for what in order {
                    try Emergency.check()
                    let record = try snapshotRun(root: root, data: data, kind: kind, files: files, run: run, what: what)
                    if what == .withFs && points[pointIndex].reported == nil { points[pointIndex].reported = record.snapshot.fs?.first }
                    results.append(record)
                    progress("\(label) run \(run) \(what == .withFs ? "--fs    " : "no --fs "): freeze \(fmt(record.snapshot.freeze_ms, 2)) ms, fs \(fmt(record.snapshot.fs_ms ?? 0, 2)) ms, total \(fmt(record.snapshot.total_ms, 1)) ms")
                }
            }
            // The restore with rollback: the workload is killed by the snapshot and restored.
            workload = nil
            let record = try restoreRun(root: root, data: data, kind: kind, files: files)
            results.append(record)
            progress("\(label) restore: snapshot --kill freeze \(fmt(record.snapshot.freeze_ms, 2)) ms, fs \(fmt(record.snapshot.fs_ms ?? 0, 2)) ms; restore (with rollback) \(fmt(record.restore?.restore_ms ?? .nan, 1)) ms")
        } catch {
            fail(kind, files, "measurement", error)
        }
    }

    /// N files of 4 KiB of non-zero bytes, 1000 per subdirectory d0000, d0001, …
    func fill(_ data: String, files: Int) throws {
        var block = [UInt8](repeating: 0, count: 4096)
        for index in 0..<files {
            let directory = data + "/d" + pad(index / 1000)
            if index % 1000 == 0 {
                guard mkdir(directory, 0o755) == 0 else { throw BenchError("mkdir \(directory): \(errnoText())") }
            }
            let path = directory + "/f" + pad(index % 1000)
            for offset in 0..<block.count { block[offset] = UInt8(1 + (index &+ offset) % 251) }
            let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw BenchError("create \(path): \(errnoText())") }
            let wrote = block.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
            close(fd)
            guard wrote == block.count else { throw BenchError("write \(path): \(errnoText())") }
        }
    }

    func pad(_ value: Int) -> String {
        let text = String(value)
        return String(repeating: "0", count: max(0, 4 - text.count)) + text
    }

    /// `stasis run --stdout DATA/wl-tree.out -- wl-tree --report R --procs 1`, until "ready".
    func startWorkload(data: String, name: String) throws -> pid_t {
        let report = "\(work)/\(name).report"
        let root = try base.launch([config.workload, "--report", report, "--procs", "1"], stdout: data + "/wl-tree.out",
                                   timeoutSeconds: timeoutSeconds)
        try base.waitForReady(pid: root, output: report, timeoutSeconds: 60)
        return root
    }

    func snapshot(root: pid_t, data: String?, kill: Bool, image: String) throws -> (SnapshotStats, ToolRun) {
        let statsPath = "\(work)/snapshot.json"
        let run = try tool([config.stasis, "snapshot", String(root), "-o", image] + (data.map { ["--fs", $0] } ?? [])
                           + (kill ? ["--kill"] : []) + ["--stats", statsPath],
                           "stasis snapshot" + (data == nil ? "" : " --fs") + (kill ? " --kill" : ""))
        let stats = try base.readSnapshotStats(statsPath)
        if let data {
            guard let id = stats.fs_id, !id.isEmpty else { throw BenchError("stasis snapshot --fs \(data) wrote no fs_id in its stats") }
            guard stats.fs?.count == 1 else { throw BenchError("stasis snapshot --fs \(data) reports fs \(stats.fs ?? [])") }
        }
        return (stats, run)
    }

    /// `stasis fs drop ID`: its time, ms.
    func drop(_ id: String) throws -> Double {
        let run = try tool([config.stasis, "fs", "drop", id], "stasis fs drop")
        return ms(run.exit.wallNs)
    }

    func snapshotRun(root: pid_t, data: String, kind: FsKind, files: Int, run: Int, what: FsRunKind) throws -> FsRun {
        let image = "\(work)/snapshot.stasis"
        defer { unlink(image) }
        let (stats, tool) = try snapshot(root: root, data: what == .withFs ? data : nil, kill: false, image: image)
        var record = FsRun(mechanism: kind, files: files, run: run, kind: what, snapshot: stats, snapshot_wall_ms: ms(tool.exit.wallNs))
        if let fallback = stats.fallback { notes.append("\(kind.rawValue) \(files) files run \(run): fell back to stop-the-world: \(fallback)") }
        if what == .withFs, let id = stats.fs_id {
            record.drop_ms = try drop(id)
            if let reported = stats.fs?.first, !reported.contains(": \(kind.mechanism) ") {
                notes.append("\(kind.rawValue) \(files) files: stasis used \(reported), expected \(kind.mechanism)")
            }
        }
        let state = base.processState(root)
        guard state == "S" || state == "R" else { throw BenchError("the workload \(root) is in state \(state ?? "gone") after the snapshot") }
        return record
    }

    func restoreRun(root: pid_t, data: String, kind: FsKind, files: Int) throws -> FsRun {
        let image = "\(work)/restore.stasis"
        defer { unlink(image) }
        let cgroup = base.cgroupPath(of: root)
        let (stats, snapshotTool): (SnapshotStats, ToolRun)
        do {
            (stats, snapshotTool) = try snapshot(root: root, data: data, kill: true, image: image)
        } catch {
            try? base.stopWorkload(root)
            throw error
        }
        _ = try? children.wait(for: root, timeoutSeconds: 30, what: "the workload killed by snapshot --kill")
        base.disown(root)
        if let cgroup { base.removeCgroup(cgroup) }
        let id = stats.fs_id!
        var dropped = false
        defer { if !dropped { _ = try? drop(id) } }

        // Change the directory after the snapshot, so that the rollback has something to undo.
        let victim = data + "/d0000/f0000"
        let marker = data + "/after-snapshot"
        guard unlink(victim) == 0 else { throw BenchError("unlink \(victim): \(errnoText())") }
        try writeTextFile(marker, "written after the snapshot\n")

        let statsPath = "\(work)/restore.json"
        let run = try tool([config.stasis, "restore", image, "--detach", "--stats", statsPath], "stasis restore --detach")
        guard let pid = pid_t(run.stdout.trimmingTrailingNewlines()) else {
            throw BenchError("stasis restore --detach printed \(run.stdout.debugDescription), not a PID")
        }
        base.adopt(pid)
        var stopped = false
        defer { if !stopped { try? base.stopWorkload(pid) } }
        let restoreStats = try base.readRestoreStats(statsPath)
        guard pid == root else { throw BenchError("restored as pid \(pid), expected \(root)") }
        usleep(20000)
        let state = base.processState(pid)
        guard state == "S" || state == "R" else { throw BenchError("the restored workload \(pid) is in state \(state ?? "gone") 20 ms after restore") }
        guard access(victim, F_OK) == 0, access(marker, F_OK) != 0 else {
            throw BenchError("the rollback did not restore \(data): \(victim) \(access(victim, F_OK) == 0 ? "is back" : "is missing"), \(marker) \(access(marker, F_OK) == 0 ? "still exists" : "is gone")")
        }
        stopped = true
        try base.stopWorkload(pid)
        var record = FsRun(mechanism: kind, files: files, run: 1, kind: .restore, snapshot: stats, snapshot_wall_ms: ms(snapshotTool.exit.wallNs),
                           restore: restoreStats, restore_wall_ms: ms(run.exit.wallNs))
        dropped = true
        record.drop_ms = try drop(id)
        return record
    }

    // MARK: clean-up

    /// `stasis fs list --json`, as decoded entries (empty if it fails).
    func fsList() -> [FilesystemSnapshots.RegistryEntry] {
        guard let run = try? tool([config.stasis, "fs", "list", "--json"], "stasis fs list") else { return [] }
        return (try? JSONDecoder().decode([FilesystemSnapshots.RegistryEntry].self, from: Data(run.stdout.utf8))) ?? []
    }

    /// Drops every fs snapshot of a directory under `mount` (left by a failed run).
    func dropFsSnapshots(under mount: String) {
        for entry in fsList() where entry.directories.contains(where: { $0.path.hasPrefix(mount + "/") }) {
            do { _ = try drop(entry.id) } catch { fail(nil, nil, "clean-up: stasis fs drop \(entry.id)", error) }
        }
    }

    func unmount(_ mount: String, _ kind: FsKind, _ files: Int) {
        for attempt in 0..<10 {
            do {
                try tool(["umount", mount])
                return
            } catch {
                if attempt == 9 {
                    fail(kind, files, "clean-up: umount", error)
                    _ = try? tool(["umount", "-l", mount])
                    notes.append("\(mount) had to be unmounted lazily (umount -l)")
                }
                usleep(200_000)
            }
        }
    }

    func isOurs(_ pid: pid_t) -> Bool {
        let command = readTextFile("/proc/\(pid)/cmdline", limit: 64 << 10)
        return command.contains("wl-tree") && command.contains(work + "/")
    }

    func strays() -> [pid_t] { directoryNames("/proc").compactMap { pid_t($0) }.filter(isOurs) }

    func removeStrays() {
        let found = strays()
        guard !found.isEmpty else { return }
        notes.append("\(found.count) wl-tree processes of this bench were left running and were killed")
        for pid in found { kill(pid, SIGKILL) }
        let deadline = now() + 10_000_000_000
        while now() < deadline && found.contains(where: { access("/proc/\($0)", F_OK) == 0 }) {
            children.reapAvailable()
            usleep(2000)
        }
        children.forget(found)
    }

    /// After everything: mounts from the work directory (`/proc/mounts`), loop devices backed by
    /// its images, wl-tree processes of this bench, fs snapshots of its directories.
    func checkNothingLeft() -> FsCleanUp {
        var result = FsCleanUp()
        let mounts = readTextFile("/proc/mounts").split(separator: "\n").map(String.init)
        result.mounts = mounts.filter { $0.contains(work) }
        result.varTmpMounts = mounts.filter { $0.contains("/var/tmp") }
        for device in directoryNames("/sys/block") where device.hasPrefix("loop") {
            let backing = readTextFile("/sys/block/\(device)/loop/backing_file").trimmingTrailingNewlines()
            if backing.contains(work) { result.loopDevices.append("/dev/\(device) → \(backing)") }
        }
        result.processes = strays().count
        result.fsSnapshots = fsList().filter { entry in entry.directories.contains(where: { $0.path.hasPrefix(work + "/") }) }.map(\.id)
        result.imagesLeft = images.filter { access($0, F_OK) == 0 } + mountPoints.filter { access($0, F_OK) == 0 }
        for mount in result.mounts { progress("error: still mounted: \(mount)") }
        for device in result.loopDevices { progress("error: loop device left: \(device)") }
        if result.processes > 0 { progress("error: \(result.processes) wl-tree processes of this bench are still running") }
        for id in result.fsSnapshots { progress("error: fs snapshot \(id) still kept") }
        for path in result.imagesLeft { progress("error: \(path) still exists") }
        return result
    }
}
