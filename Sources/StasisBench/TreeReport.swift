import Glibc
import Stasis

// The Markdown report of `stasis-bench tree`.

/// `value` with as many decimals as its size calls for (3 below 1, 2 below 10, 1 below 1000).
func autoFmt(_ value: Double) -> String {
    guard value.isFinite else { return "–" }
    let size = abs(value)
    return fmt(value, size < 1 ? 3 : size < 10 ? 2 : size < 1000 ? 1 : 0)
}

/// "median (min–max)" of a set of samples; the value alone for one sample, "–" for none.
func spread(_ values: [Double]) -> String {
    guard let low = values.min(), let high = values.max() else { return "–" }
    return values.count == 1 ? autoFmt(low) : "\(autoFmt(median(values))) (\(autoFmt(low))–\(autoFmt(high)))"
}

struct TreeReport {
    var plan: TreePlan
    var runs: [TreeRun]
    var failures: [TreeFailure]
    var notes: [String]
    var busy: [TreePoint: Double]
    var cleanUp: TreeCleanUp
    var machine: MachineInfo
    var date: String
    var commit: String?
    var directory: String
    var arguments: [String]
    var stasis: String
    var workload: String
    var elapsedSeconds: Double

    /// The point at which the restore goal applies, and the goal.
    static let goalPoint = TreePoint(procs: 100, threads: 1)
    static let goalMs = 1000.0

    func samples(_ point: TreePoint, _ mode: TreeMode) -> [TreeRun] { runs.filter { $0.point == point && $0.mode == mode } }

    func med(_ point: TreePoint, _ mode: TreeMode, _ value: (TreeRun) -> Double?) -> Double {
        median(samples(point, mode).compactMap(value))
    }

    /// "×9.70 (n^0.99)": how much a median grew from one point to the next, and the exponent b
    /// of time ∝ n^b over that step.
    func growth(_ from: Double, _ to: Double, countRatio: Double) -> String {
        guard from.isFinite, to.isFinite, from > 0, to > 0 else { return "–" }
        let factor = to / from
        return "×\(fmt(factor, factor < 10 ? 2 : 1)) (n^\(fmt(log(factor) / log(countRatio), 2)))"
    }

    /// Least squares through (n, median): fixed cost + cost per unit.
    func fit(_ points: [(Double, Double)]) -> (intercept: Double, slope: Double)? {
        let usable = points.filter { $0.1.isFinite }
        guard usable.count >= 2 else { return nil }
        let xs = usable.map(\.0), ys = usable.map(\.1)
        let mx = xs.reduce(0, +) / Double(xs.count), my = ys.reduce(0, +) / Double(ys.count)
        let sxy = zip(xs, ys).map { ($0 - mx) * ($1 - my) }.reduce(0, +)
        let sxx = xs.map { ($0 - mx) * ($0 - mx) }.reduce(0, +)
        guard sxx > 0 else { return nil }
        return (my - sxy / sxx * mx, sxy / sxx)
    }

    func markdown() -> String {
        var out: [String] = []
        func line(_ text: String = "") { out.append(text) }

        line("## stasis-bench tree results")
        line()
        line("Command (in `\(directory)`): `\(shellCommand(arguments))`")
        line()
        line("Date: \(date); kernel (`uname -r`): \(machine.kernel); git commit: \(commit ?? "unknown (no git checkout)"); wall time \(fmt(elapsedSeconds, 0)) s.")
        line("Machine: \(machine.cpus) × \(machine.cpu), \(machine.memory) RAM; images on \(machine.filesystem). stasis: `\(stasis)`; workload: `\(workload)`.")
        line("CPU busy (all processes) just before the run: \(fmt(machine.backgroundBusyPercent, 0)) %, just after: \(fmt(machine.backgroundBusyPercentAtEnd, 0)) %.")
        if !failures.isEmpty {
            line()
            line("**\(failures.count) measurement\(failures.count == 1 ? "" : "s") failed** (see *Failures* below; after a failure the remaining runs of that point are skipped). The tables hold what was measured.")
        }
        line()
        line("Every tree is `wl-tree --report FILE --procs N --threads M --mb \(plan.mebibytes)` started with `stasis run` (so it is in a cgroup of its own, as users run workloads): the parent and its N − 1 children, every one with M threads, all asleep but for a counter every 50 ms. Each point is measured \(plan.runs) time\(plan.runs == 1 ? "" : "s"); a run takes two measurements, each on a fresh tree that has written \"ready\", in alternating order (live first in odd runs, stop-the-world first in even ones):")
        line()
        line("- **live** — `stasis snapshot ROOT -o FILE --kill --stats S.json` (the default, live mode: the tree is frozen while its state is captured and its memory made copy-on-write, then runs while the pages stream, and is killed once the image is complete), then `stasis restore FILE --detach --stats R.json`. The restored tree must have the same N PIDs under its root (walked through `/proc/PID/task/TID/children`), N × M threads (`/proc/PID/task`), the counts in both stats files, and pass wl-tree's own check (SIGUSR1: every process alive and still its parent's child, every thread advancing, the memory intact). It is then SIGKILLed, process by process, and waited for until every PID is free, and its cgroup removed.")
        line("- **stop-the-world** — `stasis snapshot ROOT -o FILE --stop-the-world --stats S.json` without `--kill`, for the freeze of the classic checkpoint: the tree stays frozen until the image is written, then runs on; it must still be whole and pass the check afterwards, and is then killed the same way.")
        line()
        line("Images go to a file in the work directory (written, fsynced, renamed). Before the first point, one unrecorded 2 × 2 tree goes through both (stasis' code into the page cache). Cells give the median and, in parentheses, the minimum–maximum of the runs; per-process and per-thread costs divide the median by the number of processes (threads in all). `freeze_ms`: first thread stopped to last thread running again (for the live snapshot, before the stream; for stop-the-world, until the last page is written); `capture_ms`: state capture while frozen; `cow_ms`: making the memory copy-on-write (live only); `stream_ms`: the page data; `total_ms`: the whole snapshot; `restore_ms`: from opening the image to every thread running; `pages_ms`: its page data.")
        line()

        // MARK: goal
        line("### Goal: a 100-process tree of small processes restores in under 1 s")
        line()
        let goalRuns = samples(Self.goalPoint, .live).compactMap { $0.restore?.restore_ms }
        if goalRuns.isEmpty {
            line("Not evaluated: no live run of 100 × 1 was measured\(plan.processCounts.contains(100) ? " (it failed)" : " (100 is not in --procs)").")
        } else {
            let value = median(goalRuns)
            let verdict = value < Self.goalMs ? "met" : "NOT met"
            line("- **\(verdict)**: `wl-tree --procs 100 --threads 1 --mb \(plan.mebibytes)` restores in \(fmt(value, 1)) ms (median of \(goalRuns.count) runs; fastest \(fmt(goalRuns.min()!, 1)) ms, slowest \(fmt(goalRuns.max()!, 1)) ms; \(goalRuns.filter { $0 < Self.goalMs }.count) of \(goalRuns.count) runs under 1000 ms). Goal: `restore_ms` < 1000 ms.")
        }
        line()

        section(&out, title: "Processes: `wl-tree --procs N --threads 1 --mb \(plan.mebibytes)`", points: plan.processSeries,
                unit: "process", units: "processes", count: { $0.procs })
        section(&out, title: "Threads: `wl-tree --procs 1 --threads M --mb \(plan.mebibytes)`", points: plan.threadSeries,
                unit: "thread", units: "threads", count: { $0.threads })

        // MARK: every run
        line("### Every run")
        line()
        line("| processes × threads | run | mode (order) | tree start ms | freeze ms | capture ms | cow ms | stream ms | total ms | image MiB | snapshot command ms | restore ms | pages ms | restore command ms | found after: processes / threads | teardown ms | stasis peak RSS MiB (snapshot / restore) |")
        line("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in runs {
            let s = r.snapshot
            let mode = r.mode.rawValue + (s.fallback != nil ? " (fell back to stop-the-world)" : "")
            line("| \(r.point.label) | \(r.run) | \(mode) (\(r.position)) | \(fmt(r.start_ms, 0)) | \(autoFmt(s.freeze_ms)) | \(autoFmt(s.capture_ms)) | \(autoFmt(s.cow_ms)) | \(autoFmt(s.stream_ms)) | \(autoFmt(s.total_ms)) | \(mib(s.bytes)) | \(autoFmt(r.snapshot_wall_ms)) | \(r.restore.map { autoFmt($0.restore_ms) } ?? "–") | \(r.restore.map { autoFmt($0.pages_ms) } ?? "–") | \(r.restore_wall_ms.map(autoFmt) ?? "–") | \(r.processes_found) / \(r.threads_found) | \(fmt(r.teardown_ms, 0)) | \(mib(r.snapshot_peak_rss_bytes)) / \(r.restore_peak_rss_bytes.map(mib) ?? "–") |")
        }
        line()
        line("*snapshot / restore command ms*: the `stasis` process from spawn to exit (its start-up included). *tree start*: `stasis run` until wl-tree wrote \"ready\". *teardown*: SIGKILL of every process until the last PID was free.")
        line()
        let busyPoints = plan.points.filter { busy[$0] != nil }
        if !busyPoints.isEmpty {
            line("CPU busy while each point ran (all processes: the bench's, stasis' and the trees' own work included, and anything else on the machine): " + busyPoints.map { "\($0.label) \(fmt(busy[$0]!, 0)) %" }.joined(separator: ", ") + ".")
            line()
        }

        out += failureAndNoteLines(failures.map { failure in
            let whereText = failure.procs.map { "\($0) × \(failure.threads ?? 1)" + (failure.run.map { " run \($0)" } ?? "") + " " } ?? ""
            return (whereText + failure.mode, failure.message)
        }, notes: notes)
        line("### Clean-up")
        line()
        line("After the run: \(cleanUp.processes) wl-tree processes of this bench still running; of the \(cleanUp.cgroupsUsed) cgroups its trees were in, \(cleanUp.cgroups.count) still present\(cleanUp.cgroups.isEmpty ? "" : " (\(cleanUp.cgroups.joined(separator: ", ")))")\(cleanUp.otherWorkloads > 0 ? "; \(cleanUp.otherWorkloads) wl-tree processes of someone else's were running on the machine" : "").")
        return out.joined(separator: "\n")
    }

    /// The tables of one series: live, stop-the-world, growth.
    func section(_ out: inout [String], title: String, points allPoints: [TreePoint], unit: String, units: String,
                 count: (TreePoint) -> Int) {
        func line(_ text: String = "") { out.append(text) }
        let points = allPoints.filter { !samples($0, .live).isEmpty || !samples($0, .stopTheWorld).isEmpty }
        guard !points.isEmpty else { return }
        line("### \(title)")
        line()
        line("#### Live snapshot (`--kill`) and restore")
        line()
        line("| \(units) | runs | freeze ms | capture ms | cow ms | stream ms | total ms | freeze per \(unit) ms | restore ms | pages ms | restore per \(unit) ms | image MiB |")
        line("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for point in points {
            let live = samples(point, .live)
            guard !live.isEmpty else { continue }
            let n = Double(count(point))
            let restores = live.compactMap(\.restore)
            line("| \(count(point)) | \(live.count) | \(spread(live.map(\.snapshot.freeze_ms))) | \(spread(live.map(\.snapshot.capture_ms))) | \(spread(live.map(\.snapshot.cow_ms))) | \(spread(live.map(\.snapshot.stream_ms))) | \(spread(live.map(\.snapshot.total_ms))) | \(autoFmt(median(live.map(\.snapshot.freeze_ms)) / n)) | \(spread(restores.map(\.restore_ms))) | \(spread(restores.map(\.pages_ms))) | \(autoFmt(median(restores.map(\.restore_ms)) / n)) | \(fmt(median(live.map { Double($0.snapshot.bytes) / 1048576 }), 1)) |")
        }
        line()
        line("#### Stop-the-world snapshot (no `--kill`; the tree runs on)")
        line()
        line("| \(units) | runs | freeze ms | capture ms | stream ms | total ms | freeze per \(unit) ms | stop-the-world ÷ live freeze |")
        line("|---|---|---|---|---|---|---|---|")
        for point in points {
            let stw = samples(point, .stopTheWorld)
            guard !stw.isEmpty else { continue }
            let freeze = median(stw.map(\.snapshot.freeze_ms))
            line("| \(count(point)) | \(stw.count) | \(spread(stw.map(\.snapshot.freeze_ms))) | \(spread(stw.map(\.snapshot.capture_ms))) | \(spread(stw.map(\.snapshot.stream_ms))) | \(spread(stw.map(\.snapshot.total_ms))) | \(autoFmt(freeze / Double(count(point)))) | \(fmt(freeze / med(point, .live) { $0.snapshot.freeze_ms }, 2)) |")
        }
        line()
        if points.count >= 2 {
            line("#### How it grows (ratio of the medians from one point to the next; n^b: the exponent over that step, 1 = linear)")
            line()
            line("| step | \(units) | live freeze | … capture | … cow | stop-the-world freeze | restore | … pages | live total |")
            line("|---|---|---|---|---|---|---|---|---|")
            for (from, to) in zip(points, points.dropFirst()) {
                let ratio = Double(count(to)) / Double(count(from))
                func g(_ mode: TreeMode, _ value: @escaping (TreeRun) -> Double?) -> String {
                    growth(med(from, mode, value), med(to, mode, value), countRatio: ratio)
                }
                line("| \(count(from)) → \(count(to)) | ×\(autoFmt(ratio)) | \(g(.live) { $0.snapshot.freeze_ms }) | \(g(.live) { $0.snapshot.capture_ms }) | \(g(.live) { $0.snapshot.cow_ms }) | \(g(.stopTheWorld) { $0.snapshot.freeze_ms }) | \(g(.live) { $0.restore?.restore_ms }) | \(g(.live) { $0.restore?.pages_ms }) | \(g(.live) { $0.snapshot.total_ms }) |")
            }
            line()
            var fits: [String] = []
            for (name, mode, value) in [("live freeze", TreeMode.live, { (r: TreeRun) -> Double? in r.snapshot.freeze_ms }),
                                        ("stop-the-world freeze", .stopTheWorld, { $0.snapshot.freeze_ms }),
                                        ("restore", .live, { $0.restore?.restore_ms })] {
                if let f = fit(points.map { (Double(count($0)), med($0, mode, value)) }) {
                    fits.append("\(name) ≈ \(autoFmt(f.intercept)) ms + \(autoFmt(f.slope)) ms per \(unit)")
                }
            }
            if !fits.isEmpty {
                line("Least squares through the medians (\(points.map { String(count($0)) }.joined(separator: ", ")) \(units)): " + fits.joined(separator: "; ") + ".")
                line()
            }
        }
    }
}
