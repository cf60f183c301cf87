import Glibc
import Stasis

// The Markdown report of `stasis-bench live`.

struct LiveReport {
    var results: LiveResults
    var plan: LivePlan
    var machine: MachineInfo
    var elapsedSeconds: Double
    var arguments: [String]
    var invocations: [String: Int]
    var crashes: [(what: String, message: String)]
    var failure: String?

    /// The floor of a group: the cheaper mechanism's median, and the smallest single sample.
    func floor(_ group: String) -> (median: Double, min: Double, fork: [Double], uffd: [Double])? {
        guard let samples = results.floors[group], !samples.isEmpty else { return nil }
        let fork = samples.map { ms($0.forkNs) }, uffd = samples.map { ms($0.uffdNs) }
        return (Swift.min(median(fork), median(uffd)), Swift.min(fork.min()!, uffd.min()!), fork, uffd)
    }

    func snaps(_ key: String) -> [LiveSnap] { results.snaps[key] ?? [] }
    func med(_ key: String, _ value: (SnapshotStats) -> Double) -> Double { median(snaps(key).map { value($0.stats) }) }
    func minMed(_ values: [Double]) -> String { values.isEmpty ? "–" : "\(fmt(values.min()!, 2)) / \(fmt(median(values), 2))" }

    func markdown() -> String {
        var out: [String] = []
        func line(_ text: String = "") { out.append(text) }
        var goals: [String] = []

        line("## stasis-bench live results")
        line()
        line("Command: `\(shellCommand(arguments))`; wall time \(fmt(elapsedSeconds, 0)) s.")
        line("Machine: Linux \(machine.kernel), \(machine.cpus) × \(machine.cpu), \(machine.memory) RAM; files on \(machine.filesystem).")
        line("CPU busy (all processes) just before the run: \(fmt(machine.backgroundBusyPercent, 0)) %, just after: \(fmt(machine.backgroundBusyPercentAtEnd, 0)) %.")
        if let failure { line("**The run failed part-way: \(failure).** The tables hold what was measured until then.") }
        line("Medians of the repetitions (the mean of the middle two for an even count); \"min / med\" gives the smallest sample and the median. GiB = 2^30 bytes, MiB = 2^20. Snapshots for freeze measurements go to /dev/null (`stasis snapshot PID -o - --stats F` with stdout on /dev/null), so no disk or page-cache noise lands in the stream, and the stop-the-world freeze is as short as stasis can make it.")
        line()
        line("**Floor** = the cost of making the same amount of touched memory copy-on-write in a throwaway helper process (the bench itself in a hidden mode) holding exactly that: *fork* = a raw `clone(SIGCHLD)` whose child `_exit`s at once, timed until it returns in the parent; *userfaultfd WP* = `userfaultfd()` + `UFFDIO_API` (UFFD_FEATURE_PAGEFAULT_FLAG_WP) + `UFFDIO_REGISTER` (mode WP) + `UFFDIO_WRITEPROTECT` of the whole range. The floor is the cheaper of the two medians. The helper runs alongside the workload, and its measurements are interleaved with the snapshots (ABBA order).")
        line()

        // MARK: sizes
        let sizeGroups = plan.sizes.map { "size/\($0)" }.filter { !snaps("\($0)/live").isEmpty }
        if !sizeGroups.isEmpty {
            line("### Live freeze against the copy-on-write floor and against stop-the-world (4 KiB pages, idle workload)")
            line()
            line("`wl-bench --mb N` (one idle worker thread; its memory on 4 KiB pages), helper with `MADV_NOHUGEPAGE`.")
            line()
            line("| workload | runs | page tables MiB (workload / helper) | fork ms min / med | userfaultfd WP ms min / med (WRITEPROTECT alone, med) | floor ms | goal: 1.5 × floor + 3 ms | live freeze ms min / med | verdict | stop-the-world freeze ms | live ÷ stop-the-world | live ÷ floor |")
            line("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for group in sizeGroups {
                let size = Int(group.split(separator: "/")[1])!
                let live = snaps("\(group)/live").map(\.stats.freeze_ms)
                let stw = snaps("\(group)/stw").map(\.stats.freeze_ms)
                let tables = "\(mib(results.workloads[group]?.pageTableBytes ?? 0)) / \(results.floorInfo[group].map { mib($0.pageTableBytes) } ?? "–")"
                let protect = results.floors[group].map { median($0.map { ms($0.uffdProtectNs) }) } ?? .nan
                if let f = floor(group) {
                    let goal = 1.5 * f.median + 3
                    let met = median(live) <= goal
                    line("| \(sizeLabel(size)) | \(live.count) | \(tables) | \(minMed(f.fork)) | \(minMed(f.uffd)) (\(fmt(protect, 2))) | \(fmt(f.median, 2)) | ≤ \(fmt(goal, 1)) | \(minMed(live)) | \(met ? "met" : "**not met**") | \(fmt(median(stw), 1)) | \(fmt(median(live) / median(stw), 3)) | \(fmt(median(live) / f.median, 2)) |")
                    goals.append("- \(met ? "MET" : "NOT MET"): \(sizeLabel(size)) live freeze \(fmt(median(live), 1)) ms (median) against 1.5 × floor + 3 ms = \(fmt(goal, 1)) ms (floor \(fmt(f.median, 2)) ms; with the smallest floor sample, \(fmt(f.min, 2)) ms, the bound is \(fmt(1.5 * f.min + 3, 1)) ms).")
                } else {
                    line("| \(sizeLabel(size)) | \(live.count) | \(tables) | – | – | – | – | \(minMed(live)) | – | \(fmt(median(stw), 1)) | \(fmt(median(live) / median(stw), 3)) | – |")
                }
                if size == 1024 && !stw.isEmpty {
                    let ratio = median(live) / median(stw)
                    goals.append("- \(ratio <= 0.1 ? "MET" : "NOT MET"): 1 GiB live freeze is \(fmt(ratio * 100, 1)) % of the stop-the-world freeze (\(fmt(median(live), 1)) vs \(fmt(median(stw), 1)) ms; goal ≤ 10 %).")
                }
            }
            line()
            if !results.sequentialFloors.isEmpty {
                line("Floors measured after the snapshots rather than interleaved (not enough memory for the helper alongside the workload): \(results.sequentialFloors.sorted().joined(separator: ", ")).")
                line()
            }

            line("#### Where the live freeze goes (medians, ms)")
            line()
            line("| workload | freeze | seize + per-thread mask/registers (freeze − capture − cow) | capture | cow (clone + release) | … fork floor (median) | … cow − fork floor | cleanup after the stream (`cleanup_stop_ms`) | freeze per GiB | fork floor per GiB |")
            line("|---|---|---|---|---|---|---|---|---|---|")
            for group in sizeGroups {
                let size = Int(group.split(separator: "/")[1])!
                let key = "\(group)/live"
                let fork = results.floors[group].map { median($0.map { ms($0.forkNs) }) } ?? .nan
                let gib = Double(size) / 1024
                line("| \(sizeLabel(size)) | \(fmt(med(key) { $0.freeze_ms }, 2)) | \(fmt(med(key) { $0.freeze_ms - $0.capture_ms - $0.cow_ms }, 2)) | \(fmt(med(key) { $0.capture_ms }, 2)) | \(fmt(med(key) { $0.cow_ms }, 2)) | \(fmt(fork, 2)) | \(fmt(med(key) { $0.cow_ms } - fork, 2)) | \(fmt(med(key) { $0.cleanup_stop_ms }, 2)) | \(fmt(med(key) { $0.freeze_ms } / gib, 1)) | \(fmt(fork / gib, 1)) |")
            }
            line()
            // Growth with size: least-squares line through the medians (sizes of 1 GiB and more).
            let points = sizeGroups.compactMap { group -> (Double, Double, Double)? in
                let size = Double(group.split(separator: "/")[1])! / 1024
                guard size >= 1, let fork = results.floors[group].map({ median($0.map { ms($0.forkNs) }) }) else { return nil }
                return (size, med("\(group)/live") { $0.freeze_ms }, fork)
            }
            if points.count >= 2 {
                func fit(_ ys: [Double]) -> (slope: Double, intercept: Double) {
                    let xs = points.map(\.0)
                    let mx = xs.reduce(0, +) / Double(xs.count), my = ys.reduce(0, +) / Double(ys.count)
                    let sxy = zip(xs, ys).map { ($0 - mx) * ($1 - my) }.reduce(0, +)
                    let sxx = xs.map { ($0 - mx) * ($0 - mx) }.reduce(0, +)
                    return (sxy / sxx, my - sxy / sxx * mx)
                }
                let live = fit(points.map(\.1)), fork = fit(points.map(\.2))
                line("Growth with size (least squares through the medians at \(points.map { fmt($0.0, 0) + " GiB" }.joined(separator: ", "))): live freeze ≈ \(fmt(live.intercept, 1)) ms + \(fmt(live.slope, 1)) ms/GiB; fork floor ≈ \(fmt(fork.intercept, 1)) ms + \(fmt(fork.slope, 1)) ms/GiB.")
                line()
            }
            line("`freeze_ms` runs from the first thread seized to the last one detached. `capture_ms` covers /proc/PID/maps, the fd table, the injected system calls (scratch page, `rt_sigaction` per caught signal, `brk`, per thread `sigaltstack` and `PR_GET_TID_ADDRESS`), registers and the /proc files. `cow_ms` covers the injected `clone` (the kernel's page-table copy, which the fork floor measures), waiting for the clone's first stop, its options, and the release of every thread. `cleanup_stop_ms` is the second, short stop after the stream: one thread stopped for the injected `wait4` that reaps the clone (stasis before 4703f20 timed the whole clean-up, killing the clone and waiting for its exit included).")
            line()

            line("#### Streaming (live snapshot, image to /dev/null) against the read limit")
            line()
            line("| workload | image MiB | live stream ms | live GiB/s | stop-the-world stream ms | stop-the-world GiB/s | read limit: /proc/PID/mem GiB/s | process_vm_readv GiB/s | live ÷ /proc/PID/mem limit | stop-the-world ÷ limit |")
            line("|---|---|---|---|---|---|---|---|---|---|")
            for group in sizeGroups {
                let size = Int(group.split(separator: "/")[1])!
                let live = snaps("\(group)/live"), stw = snaps("\(group)/stw")
                guard !live.isEmpty else { continue }
                let bytes = Double(live[0].stats.bytes)
                let liveSpeed = median(live.map { Double($0.stats.bytes) / 1073741824 / ($0.stats.stream_ms / 1000) })
                let stwSpeed = median(stw.map { Double($0.stats.bytes) / 1073741824 / ($0.stats.stream_ms / 1000) })
                let reads = results.reads[group] ?? []
                let procMem = median(reads.map { Double($0.bytes) / 1073741824 / (Double($0.procMemNs) / 1e9) })
                let readv = median(reads.map { Double($0.bytes) / 1073741824 / (Double($0.readvNs) / 1e9) })
                line("| \(sizeLabel(size)) | \(fmt(bytes / 1048576, 1)) | \(fmt(median(live.map(\.stats.stream_ms)), 1)) | \(fmt(liveSpeed, 2)) | \(fmt(median(stw.map(\.stats.stream_ms)), 1)) | \(fmt(stwSpeed, 2)) | \(fmt(procMem, 2)) | \(fmt(readv, 2)) | \(fmt(liveSpeed / procMem, 2)) | \(fmt(stwSpeed / procMem, 2)) |")
            }
            line()
            line("GiB/s = image bytes ÷ `stream_ms` (from the page plan to the last byte written). The read limit reads the same workload's data mapping in 4 MiB chunks and discards it, in the same loop.")
            line()

            let fileGroups = sizeGroups.filter { !snaps("\($0)/file").isEmpty }
            if !fileGroups.isEmpty {
                line("#### Live snapshot to a file against the limit to a file")
                line()
                line("| workload | runs | live freeze ms | live stream ms | live total ms | live GiB/s (total) | limit ms | limit GiB/s | live ÷ limit | best ÷ best |")
                line("|---|---|---|---|---|---|---|---|---|---|")
                for group in fileGroups {
                    let size = Int(group.split(separator: "/")[1])!
                    let file = snaps("\(group)/file")
                    let limits = results.fileLimits[group] ?? []
                    let speeds = file.map { $0.sample.gibPerSecond }
                    let limitSpeeds = limits.map(\.gibPerSecond)
                    line("| \(sizeLabel(size)) | \(file.count) | \(fmt(median(file.map(\.stats.freeze_ms)), 1)) | \(fmt(median(file.map(\.stats.stream_ms)), 1)) | \(fmt(median(file.map(\.stats.total_ms)), 1)) | \(fmt(median(speeds), 2)) | \(fmt(median(limits.map { ms($0.totalNs) }), 1)) | \(fmt(median(limitSpeeds), 2)) | \(fmt(median(speeds) / median(limitSpeeds), 2)) | \(fmt((speeds.max() ?? .nan) / (limitSpeeds.max() ?? .nan), 2)) |")
                    goals.append("- \(median(speeds) / median(limitSpeeds) >= 0.5 ? "MET" : "NOT MET"): \(sizeLabel(size)) live snapshot to a file reaches \(fmt(median(speeds) / median(limitSpeeds) * 100, 0)) % of the limit to a file (core goal ≥ 50 %).")
                }
                line()
                line("As in the core benchmark: GiB/s = image bytes ÷ `total_ms` (fsync and rename included); the limit reads the mapping with `process_vm_readv` and writes it to a new file in the same directory, fsynced. Before each, the bench populates and frees memory of the workload's size.")
                line()
            }
        }

        // MARK: THP
        let hugeGroups = plan.hugeSizes.map { "thp/\($0)" }.filter { !snaps("\($0)/live").isEmpty }
        if !hugeGroups.isEmpty {
            line("### Transparent huge pages (`wl-bench --mb N --huge`)")
            line()
            line("| workload | runs | AnonHugePages MiB (workload / helper) | page tables MiB (workload / helper) | fork ms min / med | userfaultfd WP ms min / med | floor ms | live freeze ms min / med | capture ms | cow ms | stop-the-world freeze ms | goal |")
            line("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for group in hugeGroups {
                let size = Int(group.split(separator: "/")[1])!
                let key = "\(group)/live"
                let live = snaps(key).map(\.stats.freeze_ms)
                let info = results.workloads[group]
                let helper = results.floorInfo[group]
                let f = floor(group)
                var goal = "–"
                if size == 4096 {
                    let met = median(live) < 5
                    goal = met ? "< 5 ms: met" : "< 5 ms: **not met**"
                    goals.append("- \(met ? "MET" : "NOT MET"): 4 GiB on transparent huge pages: live freeze \(fmt(median(live), 2)) ms (goal < 5 ms).")
                }
                let floorText = f.map { fmt($0.median, 3) } ?? "–"
                line("| \(sizeLabel(size)) | \(live.count) | \(mib(info?.anonHugeBytes ?? 0)) / \(helper.map { mib($0.anonHugeBytes) } ?? "–") | \(mib(info?.pageTableBytes ?? 0)) / \(helper.map { mib($0.pageTableBytes) } ?? "–") | \(f.map { minMed($0.fork) } ?? "–") | \(f.map { minMed($0.uffd) } ?? "–") | \(floorText) | \(minMed(live)) | \(fmt(med(key) { $0.capture_ms }, 2)) | \(fmt(med(key) { $0.cow_ms }, 2)) | \(fmt(med("\(group)/stw") { $0.freeze_ms }, 1)) | \(goal) |")
            }
            line()
            for note in results.notes where note.hasPrefix("thp/") { line("- \(note)") }
            line()
        }

        // MARK: threads
        let threadKeys = plan.threadCounts.map { "threads/\($0)" }.filter { !snaps("\($0)/live").isEmpty }
        if !threadKeys.isEmpty {
            line("### Thread count (`wl-bench --mb \(plan.threadsMebibytes) --threads T`, idle threads)")
            line()
            if let f = floor("threads") {
                line("Floor at \(sizeLabel(plan.threadsMebibytes)) in the same loop: fork \(minMed(f.fork)) ms, userfaultfd WP \(minMed(f.uffd)) ms (min / med).")
                line()
            }
            line("| threads | runs | live freeze ms min / med | seize + masks ms | capture ms | cow ms | cleanup ms | capture − capture(first row), per extra thread µs | freeze − freeze(first row), per extra thread µs |")
            line("|---|---|---|---|---|---|---|---|---|")
            let first = threadKeys[0]
            let firstCount = Int(first.split(separator: "/")[1])!
            for key in threadKeys {
                let count = Int(key.split(separator: "/")[1])!
                let s = "\(key)/live"
                let extra = Double(count - firstCount)
                let perCapture = extra > 0 ? (med(s) { $0.capture_ms } - med("\(first)/live") { $0.capture_ms }) / extra * 1000 : .nan
                let perFreeze = extra > 0 ? (med(s) { $0.freeze_ms } - med("\(first)/live") { $0.freeze_ms }) / extra * 1000 : .nan
                line("| \(count) | \(snaps(s).count) | \(minMed(snaps(s).map(\.stats.freeze_ms))) | \(fmt(med(s) { $0.freeze_ms - $0.capture_ms - $0.cow_ms }, 2)) | \(fmt(med(s) { $0.capture_ms }, 2)) | \(fmt(med(s) { $0.cow_ms }, 2)) | \(fmt(med(s) { $0.cleanup_stop_ms }, 2)) | \(fmt(perCapture, 0)) | \(fmt(perFreeze, 0)) |")
            }
            line()
            line("`threads` counts wl-bench's worker threads; the process has one more (main).")
            line()
        }

        // MARK: hot set
        if !snaps("hot/hot").isEmpty {
            let hot = snaps("hot/hot")
            line("### Hot set: \(sizeLabel(plan.hotMebibytes)) resident, \(fmt(plan.hotPercent, 1)) % of the pages written continuously (`wl-bench --mb \(plan.hotMebibytes) --hot-percent \(fmt(plan.hotPercent, 3))`)")
            line()
            if let f = floor("hot") {
                line("Floor (4 KiB pages, \(sizeLabel(plan.hotMebibytes))) in the same loop: fork \(minMed(f.fork)) ms, userfaultfd WP \(minMed(f.uffd)) ms (min / med).")
                line()
            }
            line("| workload | runs | live freeze ms min / med | capture ms | cow ms | seize + masks ms | cow_pages | peak extra MiB | stream ms |")
            line("|---|---|---|---|---|---|---|---|---|")
            for (name, key) in [("hot set (\(fmt(plan.hotPercent, 1)) % written)", "hot/hot"), ("idle, same size, same loop", "hot/idle")] where !snaps(key).isEmpty {
                line("| \(name) | \(snaps(key).count) | \(minMed(snaps(key).map(\.stats.freeze_ms))) | \(fmt(med(key) { $0.capture_ms }, 2)) | \(fmt(med(key) { $0.cow_ms }, 2)) | \(fmt(med(key) { $0.freeze_ms - $0.capture_ms - $0.cow_ms }, 2)) | \(fmt(med(key) { Double($0.cow_pages) }, 0)) | \(fmt(med(key) { Double($0.peak_extra_bytes) / 1048576 }, 1)) | \(fmt(med(key) { $0.stream_ms }, 1)) |")
            }
            line()
            let freeze = median(hot.map(\.stats.freeze_ms))
            goals.append("- \(freeze < 5 ? "MET" : "NOT MET"): \(sizeLabel(plan.hotMebibytes)) resident with a \(fmt(plan.hotPercent, 1)) % hot set on 4 KiB pages: live freeze \(fmt(freeze, 1)) ms (goal < 5 ms; the freeze grows with all mapped memory, not with the memory written recently).")
            for note in results.notes where note.hasPrefix("hot:") { line("- \(note)") }
            line()
        }

        // MARK: throughput
        if let baselines = results.baselines["tput"], !baselines.isEmpty {
            let base = median(baselines)
            line("### The workload's own throughput during a snapshot (`wl-bench --mb \(plan.throughputMebibytes) --hot-percent 100`)")
            line()
            line("One worker thread writes one word in every page of its \(sizeLabel(plan.throughputMebibytes)), round and round, as fast as it can. Page writes per second come from its `progress` counter (SIGUSR1), read just before `stasis snapshot` starts and just after it exits; the no-snapshot windows (\(fmt(plan.baselineSeconds, 1)) s) come before every snapshot, 0.3 s after the previous one.")
            line()
            line("| variant | runs | M page writes/s | ÷ no snapshot | excluding the freeze: ÷ no snapshot | window ms | freeze ms | stream ms | cow_pages | cow_pages ÷ pages | peak extra MiB |")
            line("|---|---|---|---|---|---|---|---|---|---|---|")
            line("| no snapshot | \(baselines.count) | \(fmt(base / 1e6, 2)) | 1.00 | – | \(fmt(plan.baselineSeconds * 1000, 0)) | – | – | – | – | – |")
            for (name, key) in [("live, image to /dev/null", "tput/live"), ("stop-the-world, image to /dev/null", "tput/stw"), ("live, image to a file", "tput/file")] {
                let s = snaps(key)
                guard !s.isEmpty else { continue }
                let rates = s.compactMap(\.rate)
                let running = median(s.map { ($0.rate ?? 0) * Double($0.windowNs) / 1e9 / ((Double($0.windowNs) / 1e6 - $0.stats.freeze_ms) / 1000) })
                line("| \(name) | \(s.count) | \(fmt(median(rates) / 1e6, 2)) | \(fmt(median(rates) / base, 2)) | \(fmt(running / base, 2)) | \(fmt(median(s.map { ms($0.windowNs) }), 0)) | \(fmt(med(key) { $0.freeze_ms }, 1)) | \(fmt(med(key) { $0.stream_ms }, 1)) | \(fmt(med(key) { Double($0.cow_pages) }, 0)) | \(fmt(med(key) { Double($0.cow_pages) / Double($0.pages) }, 2)) | \(fmt(med(key) { Double($0.peak_extra_bytes) / 1048576 }, 1)) |")
            }
            line()
            line("*Excluding the freeze* divides the writes by the window minus `freeze_ms`: the rate while the workload was allowed to run. The window also holds stasis' start-up (≈ 20–40 ms, supervisor and worker) before the freeze and its clean-up after the stream.")
            line()
        }

        // MARK: peak memory
        let memoryRows = results.snaps.keys.sorted().filter { $0.hasSuffix("/live") || $0.hasSuffix("/file") || $0.hasPrefix("hot/") || $0 == "tput/live" }
        if !memoryRows.isEmpty {
            line("### Extra memory at the peak (`peak_extra_bytes`, sampled by stasis during the stream) and pages kept for the snapshot (`cow_pages`)")
            line()
            line("| snapshot | runs | peak extra MiB min / med / max | cow_pages med (max) | workload page tables MiB |")
            line("|---|---|---|---|---|")
            for key in memoryRows {
                let s = snaps(key)
                let extra = s.map { Double($0.stats.peak_extra_bytes) / 1048576 }
                let group = key.split(separator: "/").dropLast().joined(separator: "/")
                let workloadKey = results.workloads[group] != nil ? group : key
                line("| \(key) | \(s.count) | \(fmt(extra.min()!, 1)) / \(fmt(median(extra), 1)) / \(fmt(extra.max()!, 1)) | \(fmt(median(s.map { Double($0.stats.cow_pages) }), 0)) (\(s.map(\.stats.cow_pages).max()!)) | \(results.workloads[workloadKey].map { mib($0.pageTableBytes) } ?? "–") |")
            }
            line()
            line("`peak_extra_bytes` = the clone's private pages (Private_Dirty of its smaps_rollup: pages the workload replaced while their block was not yet streamed) + the clone's page tables (VmPTE) + pages read during the freeze + stasis' 4 MiB block buffer.")
            line()
        }

        line("### Goals")
        line()
        if goals.isEmpty { line("No goal could be evaluated from the parts that ran.") }
        for goal in goals { line(goal) }
        line()

        line("### Workloads and helpers")
        line()
        line("| workload | wl-bench arguments | fill ms | RSS MiB | AnonHugePages MiB | page tables MiB |")
        line("|---|---|---|---|---|---|")
        for (key, info) in results.workloads.sorted(by: { $0.key < $1.key }) {
            line("| \(key) | `\(info.arguments.joined(separator: " "))` | \(fmt(ms(info.fillNs), 0)) | \(mib(info.rssBytes)) | \(mib(info.anonHugeBytes)) | \(mib(info.pageTableBytes)) |")
        }
        for (key, info) in results.floorInfo.sorted(by: { $0.key < $1.key }) {
            line("| floor helper \(key) | \(mib(info.bytes)) MiB \(info.anonHugeBytes > 0 ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE") | \(fmt(ms(info.fillNs), 0)) | – | \(mib(info.anonHugeBytes)) | \(mib(info.pageTableBytes)) |")
        }
        line()
        if !results.busy.isEmpty {
            line("CPU busy during each part (all processes, the bench's own work included): " + results.busy.sorted(by: { $0.key < $1.key }).map { "\($0.key) \(fmt($0.value, 0)) %" }.joined(separator: ", ") + ".")
            line()
        }

        line("### Crashes")
        line()
        let total = invocations.values.reduce(0, +)
        if crashes.isEmpty {
            line("None: \(total) stasis snapshot invocations, all succeeded.")
        } else {
            line("\(crashes.count) of \(total) stasis invocations crashed and were retried (their runs are not in the tables):")
            line()
            for crash in crashes { line("- `\(crash.what)`: \(crash.message)") }
        }
        line()

        line("### Every sample")
        line()
        line("| snapshot | freeze ms (capture / cow / cleanup) per run |")
        line("|---|---|")
        for key in results.snaps.keys.sorted() {
            let cells = snaps(key).map { "\(fmt($0.stats.freeze_ms, 1)) (\(fmt($0.stats.capture_ms, 1)) / \(fmt($0.stats.cow_ms, 1)) / \(fmt($0.stats.cleanup_stop_ms, 1)))" }
            line("| \(key) | \(cells.joined(separator: "; ")) |")
        }
        line()
        line("| floor | fork ms (from the fork until the child was reaped, ms) per run | userfaultfd WP ms (WRITEPROTECT ms; undo ms) per run |")
        line("|---|---|---|")
        for (key, samples) in results.floors.sorted(by: { $0.key < $1.key }) {
            line("| \(key) | \(samples.map { "\(fmt(ms($0.forkNs), 2)) (\(fmt(ms($0.forkExitNs), 1)))" }.joined(separator: "; ")) | \(samples.map { "\(fmt(ms($0.uffdNs), 2)) (\(fmt(ms($0.uffdProtectNs), 2)); \(fmt(ms($0.uffdUndoNs), 1)))" }.joined(separator: "; ")) |")
        }
        line()
        if let baselines = results.baselines["tput"] {
            line("Throughput part, M page writes/s — no snapshot: \(baselines.map { fmt($0 / 1e6, 2) }.joined(separator: ", ")); " +
                 ["live", "stw", "file"].map { variant in "\(variant): " + snaps("tput/\(variant)").map { fmt(($0.rate ?? .nan) / 1e6, 2) }.joined(separator: ", ") }.joined(separator: "; ") + ".")
            line()
        }
        for note in results.notes where !note.hasPrefix("thp/") && !note.hasPrefix("hot:") { line("- \(note)") }
        return out.joined(separator: "\n")
    }
}
