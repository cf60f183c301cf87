import Glibc
import Stasis

// The Markdown report of `stasis-bench fs`.

struct FsReport {
    var runs: [FsRun]
    var points: [FsPoint]
    var failures: [FsFailure]
    var notes: [String]
    var cleanUp: FsCleanUp
    var machine: MachineInfo
    var date: String
    var commit: String?
    var directory: String
    var arguments: [String]
    var stasis: String
    var workload: String
    var runsPerPoint: Int
    var elapsedSeconds: Double

    func samples(_ point: FsPoint, _ kind: FsRunKind) -> [FsRun] {
        runs.filter { $0.mechanism == point.mechanism && $0.files == point.files && $0.kind == kind }
    }

    func markdown() -> String {
        var out: [String] = []
        func line(_ text: String = "") { out.append(text) }

        line("## stasis-bench fs results")
        line()
        line("Command (in `\(directory)`): `\(shellCommand(arguments))`")
        line()
        line("Date: \(date); kernel (`uname -r`): \(machine.kernel); git commit: \(commit ?? "unknown (no git checkout)"); wall time \(fmt(elapsedSeconds, 0)) s.")
        line("Machine: \(machine.cpus) × \(machine.cpu), \(machine.memory) RAM. stasis: `\(stasis)`; workload: `\(workload)`.")
        if !failures.isEmpty {
            line()
            line("**\(failures.count) step\(failures.count == 1 ? "" : "s") failed** (see *Failures* below; a failed point is torn down and the next one measured). The tables hold what was measured.")
        }
        line()
        line("Each point (mechanism × N files) gets a fresh filesystem: a 2 GiB sparse image (`truncate -s 2G`), `mkfs.btrfs -q` / `mkfs.xfs -q` / `mkfs.ext4 -q -i 4096` (one inode per 4 KiB, so that 100 000 files and their copy fit), `mount -o loop`, the directory DATA = `MNT/data` (`btrfs subvolume create` on btrfs, so stasis takes a read-only btrfs snapshot; `mkdir` elsewhere), N files of 4 KiB of non-zero data in subdirectories of 1000, then `sync`. The workload is `wl-tree --report R --procs 1` started with `stasis run --stdout DATA/wl-tree.out` (one process holding a file open in DATA; it does not write to DATA, so what is measured is the directory capture).")
        line()
        line("- **with --fs**: `stasis snapshot ROOT -o IMG --fs DATA --stats S.json` (live, no `--kill`: the workload runs on), then `stasis fs drop <fs_id>`, so kept copies do not pile up.")
        line("- **without --fs** (baseline, same workload, same run): `stasis snapshot ROOT -o IMG --stats S.json`. The two alternate (with first in odd runs, without first in even ones); \(runsPerPoint) run\(runsPerPoint == 1 ? "" : "s") each.")
        line("- **restore with rollback**, once per point: `stasis snapshot ROOT -o IMG --fs DATA --kill --stats S.json`; then DATA is changed (one file deleted, one created); `stasis restore IMG --detach --stats R.json` rolls DATA back before the processes resume. The bench checks that the deleted file is back, the created one gone, the restored workload has its PID and is running; then kills it and drops the fs snapshot.")
        line()
        line("`fs_ms`: how long keeping DATA kept the tree frozen (part of `freeze_ms`); `freeze_ms`: first thread stopped to last thread running again; `total_ms`: the whole snapshot; `restore_ms`: from opening the image to every thread running, the rollback of DATA included. Cells: median (min–max) of the runs. Stasis flushes the filesystem (`syncfs`) once before the freeze and keeps the directory inside it; it does not use FIFREEZE (why is explained in docs/architecture.md, see there).")
        line()

        line("### Per mechanism and number of files")
        line()
        line("| mechanism (fs) | files | runs | fs_ms | freeze_ms with --fs | freeze_ms without --fs | freeze added by --fs (medians) | total_ms with --fs | restore_ms with rollback | `snapshot --kill` fs_ms / freeze_ms | `fs drop` ms | stasis reported |")
        line("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for point in points {
            let with = samples(point, .withFs), without = samples(point, .baseline), restores = samples(point, .restore)
            guard !with.isEmpty || !without.isEmpty || !restores.isEmpty else { continue }
            let added = median(with.map(\.snapshot.freeze_ms)) - median(without.map(\.snapshot.freeze_ms))
            let kill = restores.first.map { "\(autoFmt($0.snapshot.fs_ms ?? .nan)) / \(autoFmt($0.snapshot.freeze_ms))" } ?? "–"
            let drops = (with + restores).compactMap(\.drop_ms)
            line("| \(point.mechanism.mechanism) (\(point.mechanism.rawValue)) | \(point.files) | \(with.count) + \(without.count) | \(spread(with.compactMap(\.snapshot.fs_ms))) | \(spread(with.map(\.snapshot.freeze_ms))) | \(spread(without.map(\.snapshot.freeze_ms))) | \(autoFmt(added)) | \(spread(with.map(\.snapshot.total_ms))) | \(spread(restores.compactMap { $0.restore?.restore_ms })) | \(kill) | \(spread(drops)) | \(point.reported.map { "`\($0)`" } ?? "–") |")
        }
        line()
        line("runs: with --fs + without. *freeze added by --fs*: median with − median without. *`fs drop` ms*: the `stasis fs drop` command from spawn to exit. *stasis reported*: the `fs` field of the stats.")
        line()

        line("### Setting up each filesystem")
        line()
        line("| mechanism | files | truncate + mkfs ms | fill ms | sync ms | commands |")
        line("|---|---|---|---|---|---|")
        for point in points {
            line("| \(point.mechanism.rawValue) | \(point.files) | \(fmt(point.mkfs_ms, 0)) | \(fmt(point.fill_ms, 0)) | \(fmt(point.sync_ms, 0)) | " + point.commands.map { "`\($0)`" }.joined(separator: "; ") + " |")
        }
        line()

        line("### Every run")
        line()
        line("| mechanism | files | run | kind | fs_ms | freeze_ms | capture_ms | total_ms | snapshot command ms | restore_ms | restore command ms | drop ms |")
        line("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in runs {
            let s = r.snapshot
            line("| \(r.mechanism.rawValue) | \(r.files) | \(r.run) | \(r.kind.rawValue)\(s.fallback != nil ? " (fell back to stop-the-world)" : "") | \(s.fs_ms.map(autoFmt) ?? "–") | \(autoFmt(s.freeze_ms)) | \(autoFmt(s.capture_ms)) | \(autoFmt(s.total_ms)) | \(autoFmt(r.snapshot_wall_ms)) | \(r.restore.map { autoFmt($0.restore_ms) } ?? "–") | \(r.restore_wall_ms.map(autoFmt) ?? "–") | \(r.drop_ms.map(autoFmt) ?? "–") |")
        }
        line()

        out += failureAndNoteLines(failures.map { failure in
            let whereText = failure.mechanism.map { "\($0.rawValue) \(failure.files.map { "\($0) files" } ?? "") " } ?? ""
            return (whereText + failure.step, failure.message)
        }, notes: notes)
        line("### Clean-up")
        line()
        line("After the run: \(cleanUp.mounts.count) mounts from the bench's images (`/proc/mounts`), \(cleanUp.loopDevices.count) loop devices backed by them, \(cleanUp.processes) wl-tree processes of this bench, \(cleanUp.fsSnapshots.count) fs snapshots of its directories (`stasis fs list --json`), \(cleanUp.imagesLeft.count) images, mount points or work directories left. `grep /var/tmp /proc/mounts`: \(cleanUp.varTmpMounts.isEmpty ? "nothing" : cleanUp.varTmpMounts.map { "`\($0)`" }.joined(separator: ", ")).")
        for item in cleanUp.mounts + cleanUp.loopDevices + cleanUp.fsSnapshots + cleanUp.imagesLeft { line("- left: \(item)") }
        return out.joined(separator: "\n")
    }
}
