import Glibc

// The Markdown report: medians per configuration, the in-run limits and floors beside them,
// the goals, and every individual sample.

func median(_ values: [Double]) -> Double {
    guard !values.isEmpty else { return .nan }
    let sorted = values.sorted()
    let middle = sorted.count / 2
    return sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
}

/// `value` with exactly `digits` decimals ("–" if not finite).
func fmt(_ value: Double, _ digits: Int) -> String {
    guard value.isFinite else { return "–" }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let scaled = (abs(value) * scale).rounded()
    let whole = UInt64(scaled / scale)
    let fraction = UInt64(scaled - Double(whole) * scale)
    var text = (value < 0 && scaled > 0 ? "-" : "") + String(whole)
    if digits > 0 {
        let digitsText = String(fraction)
        text += "." + String(repeating: "0", count: digits - digitsText.count) + digitsText
    }
    return text
}

/// A command line as it would be typed into a POSIX shell (words quoted only where needed).
func shellCommand(_ arguments: [String]) -> String {
    let plain = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:,+@%")
    return arguments.map { word in
        !word.isEmpty && word.allSatisfy({ plain.contains($0) }) ? word
            : "'" + word.split(separator: "'", omittingEmptySubsequences: false).joined(separator: "'\\''") + "'"
    }.joined(separator: " ")
}

/// The current time in UTC, "2025-01-31 14:05:09 UTC".
func utcDate() -> String {
    var seconds = time(nil)
    var parts = tm()
    gmtime_r(&seconds, &parts)
    var text = [CChar](repeating: 0, count: 64)
    let count = strftime(&text, text.count, "%Y-%m-%d %H:%M:%S UTC", &parts)
    return String(decoding: text[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// The current working directory ("?" if unknown).
func currentDirectory() -> String {
    var buffer = [CChar](repeating: 0, count: 4097)
    guard getcwd(&buffer, buffer.count) != nil else { return "?" }
    return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

func mib(_ bytes: UInt64) -> String { fmt(Double(bytes) / 1048576, 1) }
func sizeLabel(_ mebibytes: Int) -> String { mebibytes % 1024 == 0 ? "\(mebibytes / 1024) GiB" : "\(mebibytes) MiB" }

struct MachineInfo {
    var kernel = ""
    var cpu = ""
    var cpus = 0
    var memory = ""
    var filesystem = ""
    var backgroundBusyPercent = 0.0
    var backgroundBusyPercentAtEnd = 0.0
    var pipeCapacity = 0

    static func collect(directory: String, pipeSize: Int) -> MachineInfo {
        var info = MachineInfo()
        var names = utsname()
        uname(&names)
        info.kernel = withUnsafeBytes(of: names.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        let cpuinfo = readTextFile("/proc/cpuinfo")
        info.cpu = cpuinfo.split(separator: "\n").first(where: { $0.hasPrefix("model name") })
            .map { String($0.split(separator: ":", maxSplits: 1).last ?? "").trimmingCharacters(in: " ") } ?? "unknown"
        info.cpus = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        if let line = readTextFile("/proc/meminfo").split(separator: "\n").first(where: { $0.hasPrefix("MemTotal:") }),
           let kib = Double(line.split(separator: " ").dropFirst().first ?? "") {
            info.memory = fmt(kib / 1048576, 1) + " GiB"
        }
        var best = ""
        for line in readTextFile("/proc/self/mounts").split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count >= 4 else { continue }
            let mount = String(fields[1])
            let prefix = mount == "/" ? "/" : mount + "/"
            if (directory.hasPrefix(prefix) || directory == mount) && mount.count >= best.count {
                best = mount
                info.filesystem = "\(fields[2]) on \(fields[0]) mounted at \(mount) (\(fields[3]))"
            }
        }
        info.backgroundBusyPercent = busyPercent(seconds: 1)
        return info
    }

    /// How busy the CPUs are (all processes, not only the bench's), sampled from /proc/stat.
    static func busyPercent(seconds: Double) -> Double {
        func sample() -> (busy: Double, total: Double) {
            guard let line = readTextFile("/proc/stat").split(separator: "\n").first else { return (0, 0) }
            let values = line.split(separator: " ").dropFirst().compactMap { Double($0) }
            guard values.count >= 5 else { return (0, 0) }
            let total = values.prefix(8).reduce(0, +)
            return (total - values[3] - values[4], total)
        }
        let a = sample()
        usleep(UInt32(seconds * 1e6))
        let b = sample()
        return b.total > a.total ? 100 * (b.busy - a.busy) / (b.total - a.total) : 0
    }
}

struct Report {
    var results: [SizeResult]
    var machine: MachineInfo
    var config: BenchConfig
    var elapsedSeconds: Double
    var arguments: [String]
    var invocations: [String: Int]
    var crashes: [(what: String, message: String)]

    func markdown() -> String {
        var out: [String] = []
        func line(_ text: String = "") { out.append(text) }
        let pipeCapacity = results.first(where: { $0.pipeCapacity > 0 })?.pipeCapacity ?? 0

        line("## stasis-bench results")
        line()
        line("Command: `\(shellCommand(arguments))`; wall time \(fmt(elapsedSeconds, 0)) s.")
        line("Machine: Linux \(machine.kernel), \(machine.cpus) × \(machine.cpu), \(machine.memory) RAM; images on \(machine.filesystem); pipe capacity \(pipeCapacity / 1024) KiB.")
        line("CPU busy (all processes) just before the run: \(fmt(machine.backgroundBusyPercent, 0)) %, just after: \(fmt(machine.backgroundBusyPercentAtEnd, 0)) %.")
        if config.prewarm {
            line("Before each measured file write (stasis' and the limit's), the bench populated and freed anonymous memory of the workload's size, so that both allocate page cache from equally warm free memory (this VM's balloon makes memory freed seconds ago slow to touch again).")
        }
        line(config.stopTheWorld
             ? "Snapshots: `stasis snapshot --stop-the-world` (the workload is frozen until the last page is written)."
             : "Snapshots: `stasis snapshot` in its default live mode (the workload is frozen only while its state is captured and its memory made copy-on-write; the pages stream while it runs). `--stop-the-world` gives the first version's semantics.")
        line("Medians of the repetitions (the mean of the middle two for an even count). GiB = 2^30 bytes, MiB = 2^20.")
        line()

        for (title, pick, limitPick, destination) in [
            ("Snapshot to a file (written, fsynced, renamed)", { (r: SizeResult) in r.snapshotFile }, { (r: SizeResult) in r.limitFile }, "file"),
            ("Snapshot to a pipe (drained by a reader thread)", { (r: SizeResult) in r.snapshotPipe }, { (r: SizeResult) in r.limitPipe }, "pipe"),
        ] {
            line("### \(title)")
            line()
            line("| workload | runs | image MiB | freeze ms | capture ms | write ms | total ms | stasis GiB/s | limit ms | limit GiB/s | stasis ÷ limit | best ÷ best | stasis peak RSS MiB (ru_maxrss / VmHWM) |")
            line("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for r in results {
                let samples = pick(r)
                let limits = limitPick(r)
                guard !samples.isEmpty, !limits.isEmpty else { continue }
                let speed = median(samples.map(\.gibPerSecond))
                let limitSpeed = median(limits.map(\.gibPerSecond))
                line("| \(sizeLabel(r.mebibytes)) | \(samples.count) | \(mib(samples[0].stats.bytes)) | \(fmt(median(samples.map(\.stats.freeze_ms)), 1)) | \(fmt(median(samples.map(\.stats.capture_ms)), 1)) | \(fmt(median(samples.map(\.stats.write_ms)), 1)) | \(fmt(median(samples.map(\.stats.total_ms)), 1)) | \(fmt(speed, 2)) | \(fmt(median(limits.map { ms($0.totalNs) }), 1)) | \(fmt(limitSpeed, 2)) | \(fmt(speed / limitSpeed, 2)) | \(fmt(samples.map(\.gibPerSecond).max()! / limits.map(\.gibPerSecond).max()!, 2)) | \(mib(samples.map(\.peakRSS).max()!)) / \(mib(samples.map(\.polledHWM).max()!)) |")
            }
            line()
            line("stasis GiB/s = image bytes ÷ `total_ms` of `--stats` (from the start of the command's work to the image being complete\(destination == "file" ? ", fsynced and renamed" : "")); it excludes only process start-up. The limit reads the same workload's memory with `process_vm_readv` (4 MiB buffer) and writes it to \(destination == "file" ? "a new file in the same directory, then fsyncs it" : "the same kind of pipe with the same reader"); limit GiB/s = mapping bytes ÷ its time. stasis ÷ limit compares the medians; best ÷ best the fastest run of each.")
            line()
        }

        line("### Where stasis' snapshot time goes")
        line()
        line("| workload | destination | total ms | capture ms (frozen, before any page is read) | write ms | … of which the limit's work (readv + write, + fsync for a file) | … CRC-32C of the data (estimated) | … zero-page test (estimated) | … remainder | total − capture − write |")
        line("|---|---|---|---|---|---|---|---|---|---|")
        for r in results {
            guard let passes = r.passCosts else { continue }
            for (name, samples, limits) in [("file", r.snapshotFile, r.limitFile), ("pipe", r.snapshotPipe, r.limitPipe)] where !samples.isEmpty && !limits.isEmpty {
                let total = median(samples.map(\.stats.total_ms))
                let capture = median(samples.map(\.stats.capture_ms))
                let write = median(samples.map(\.stats.write_ms))
                let gib = Double(samples[0].stats.bytes) / 1073741824
                let limit = median(limits.map { ms($0.totalNs) }) * Double(samples[0].stats.bytes) / Double(limits[0].bytes)
                let crc = passes.crcNsPerGiB / 1e6 * gib
                let zero = passes.zeroTestNsPerGiB / 1e6 * gib
                let rest = median(samples.map { $0.stats.total_ms - $0.stats.capture_ms - $0.stats.write_ms })
                line("| \(sizeLabel(r.mebibytes)) | \(name) | \(fmt(total, 1)) | \(fmt(capture, 1)) | \(fmt(write, 1)) | \(fmt(limit, 1)) | \(fmt(crc, 1)) | \(fmt(zero, 1)) | \(fmt(write - limit - crc - zero, 1)) | \(fmt(rest, 1)) |")
            }
        }
        line()
        line("The limit's time is scaled to the image's size. The CRC-32C and zero-test estimates are the per-GiB costs measured below times the image size. The remainder is what is left of write ms; with this much noise it can be negative. " + (config.stopTheWorld
            ? "Everything from the first thread stopped to the last page written happens with the workload frozen: freeze ms ≈ total ms."
            : "The snapshots were live: capture ms lies inside the freeze, write ms (the stream) does not; total − capture − write is the freeze's remainder (seizing, the copy-on-write clone, the release) plus set-up."))
        line()

        line("### Where the limit's time goes")
        line()
        line("| workload | destination | process_vm_readv ms | write ms | fsync ms | total ms |")
        line("|---|---|---|---|---|---|")
        for r in results {
            for (name, limits) in [("file", r.limitFile), ("pipe", r.limitPipe)] where !limits.isEmpty {
                line("| \(sizeLabel(r.mebibytes)) | \(name) | \(fmt(median(limits.map { ms($0.readNs) }), 1)) | \(fmt(median(limits.map { ms($0.writeNs) }), 1)) | \(name == "file" ? fmt(median(limits.map { ms($0.syncNs) }), 1) : "–") | \(fmt(median(limits.map { ms($0.totalNs) }), 1)) |")
            }
        }
        line()

        line("### Restore")
        line()
        line("| workload | runs | restore ms | pages ms | rest ms | restored GiB/s | stasis peak RSS MiB (ru_maxrss / VmHWM) | fresh memory: populate ms | + write ms | process_vm_writev into fresh memory ms | … into resident memory ms | image read ms | image read into fresh memory ms | image mmap MAP_PRIVATE + populate ms |")
        line("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results where !r.restores.isEmpty {
            let restoreMs = median(r.restores.map(\.stats.restore_ms))
            let pagesMs = median(r.restores.map(\.stats.pages_ms))
            let rest = median(r.restores.map { $0.stats.restore_ms - $0.stats.pages_ms })
            let bytes = Double(r.restores[0].stats.pages) * 4096
            line("| \(sizeLabel(r.mebibytes)) | \(r.restores.count) | \(fmt(restoreMs, 1)) | \(fmt(pagesMs, 1)) | \(fmt(rest, 1)) | \(fmt(bytes / 1073741824 / (restoreMs / 1000), 2)) | \(mib(r.restores.map(\.peakRSS).max()!)) / \(mib(r.restores.map(\.polledHWM).max()!)) | \(fmt(median(r.fresh.map { ms($0.populateNs) }), 1)) | \(fmt(median(r.fresh.map { ms($0.writeResidentNs) }), 1)) | \(fmt(median(r.fresh.map { ms($0.remoteWriteFreshNs) }), 1)) | \(fmt(median(r.fresh.map { ms($0.remoteWriteResidentNs) }), 1)) | \(fmt(median(r.imageReads.map { ms($0.intoBufferNs) }), 1)) | \(fmt(median(r.imageReads.map { ms($0.intoFreshNs) }), 1)) | \(fmt(median(r.imageReads.map { ms($0.mapPrivateNs) }), 1)) |")
        }
        line()
        line("`restore_ms` and `pages_ms` come from `stasis restore --detach --stats` (from opening the image to every thread running; pages_ms = reading, checking and writing page data); rest = restore_ms − pages_ms. The image was written by `stasis snapshot --kill` just before, so it is in the page cache. In-run floors, measured between restores (before the restore in odd-numbered runs, after it in even-numbered ones): *fresh memory* = mmap + MADV_POPULATE_WRITE of the workload's size, then writing it once resident; *process_vm_writev into fresh memory* = the bench writing a 4 MiB buffer over and over with process_vm_writev into a fresh anonymous mapping of that size in a helper process (the kernel path stasis uses to fill the restored process), and *… into resident memory* the same into a mapping the helper populated first; *image read* = reading the image file with 4 MiB read()s into one resident buffer, and straight into fresh anonymous memory (the floor of any restore that copies every page into new anonymous memory); *image mmap* = mapping the whole image file MAP_PRIVATE and MADV_POPULATE_READ (page-cache pages mapped copy-on-write: what a restore that maps the image's page-aligned data would pay instead).")
        line()
        if config.verify {
            let verified = results.flatMap(\.restores).map(\.verifiedPages).reduce(0, +)
            line("Every restored process was checked: running 20 ms after restore, and the first word of each of its \(verified) pages in total matched wl-bench's data.")
            line()
        }

        line("### Snapshot with --kill (the image restored above)")
        line()
        line("| workload | freeze ms | capture ms | write ms | total ms | command wall ms | peak RSS MiB (ru_maxrss / VmHWM) |")
        line("|---|---|---|---|---|---|---|")
        for r in results {
            guard let k = r.killSnapshot else { continue }
            line("| \(sizeLabel(r.mebibytes)) | \(fmt(k.stats.freeze_ms, 1)) | \(fmt(k.stats.capture_ms, 1)) | \(fmt(k.stats.write_ms, 1)) | \(fmt(k.stats.total_ms, 1)) | \(fmt(ms(k.wallNs), 1)) | \(mib(k.peakRSS)) / \(mib(k.polledHWM)) |")
        }
        line()

        line("### What the capture phase's /proc reads cost (bench, on the running workload)")
        line()
        line("| workload | read /proc/PID/smaps ms | read /proc/PID/maps ms | PAGEMAP_SCAN of the data ms (regions) |")
        line("|---|---|---|---|")
        for r in results where !r.captureCosts.isEmpty {
            line("| \(sizeLabel(r.mebibytes)) | \(fmt(median(r.captureCosts.map { ms($0.smapsNs) }), 2)) | \(fmt(median(r.captureCosts.map { ms($0.mapsNs) }), 2)) | \(fmt(median(r.captureCosts.map { ms($0.pagemapScanNs) }), 2)) (\(r.captureCosts[0].scanRegions)) |")
        }
        line()
        line("stasis reads /proc/PID/smaps (for VmFlags) while the process is frozen; smaps walks every page of every mapping.")
        line()

        line("### CPU cost of stasis' per-byte passes (bench process, cache-warm 4 MiB buffer)")
        line()
        line("| workload | CRC-32C ms per GiB | zero-page test ms per GiB |")
        line("|---|---|---|")
        for r in results {
            guard let p = r.passCosts else { continue }
            line("| measured before \(sizeLabel(r.mebibytes)) | \(fmt(p.crcNsPerGiB / 1e6, 1)) | \(fmt(p.zeroTestNsPerGiB / 1e6, 1)) |")
        }
        line()

        line("### Goals")
        line()
        for r in results {
            for (name, samples, limits) in [("file", r.snapshotFile, r.limitFile), ("pipe", r.snapshotPipe, r.limitPipe)] where !samples.isEmpty && !limits.isEmpty {
                let ratio = median(samples.map(\.gibPerSecond)) / median(limits.map(\.gibPerSecond))
                line("- \(ratio >= 0.5 ? "MET" : "NOT MET"): \(sizeLabel(r.mebibytes)) snapshot to a \(name) reaches \(fmt(ratio * 100, 0)) % of the limit (goal ≥ 50 %).")
            }
        }
        for r in results where r.mebibytes == 1024 && !r.restores.isEmpty {
            let restoreMs = median(r.restores.map(\.stats.restore_ms))
            line("- \(restoreMs < 500 ? "MET" : "NOT MET"): 1 GiB restore takes \(fmt(restoreMs, 0)) ms (goal < 500 ms).")
        }
        let snapshots = results.flatMap { r in r.snapshotFile + r.snapshotPipe + (r.killSnapshot.map { [$0] } ?? []) }
        let restores = results.flatMap(\.restores)
        let peaks = snapshots.map(\.peakRSS) + restores.map(\.peakRSS)
        if let peak = peaks.max() {
            line("- \(peak < 64 << 20 ? "MET" : "NOT MET"): stasis' peak RSS over every snapshot and restore is \(mib(peak)) MiB (goal < 64 MiB; ru_maxrss from wait4).")
        }
        line()
        if let benchMax = (snapshots.map(\.benchRSS) + restores.map(\.benchRSS)).max(), let hwm = (snapshots.map(\.polledHWM) + restores.map(\.polledHWM)).max() {
            line("About the RSS figures: glibc's posix_spawn uses vfork, and at execve Linux records the parent's RSS high-water mark in the child's ru_maxrss, so ru_maxrss is max(stasis' own peak, the bench's RSS when it spawned stasis). The bench resets its own high-water mark (`/proc/self/clear_refs` = 5) before each spawn; its RSS at spawn was at most \(mib(benchMax)) MiB. VmHWM is stasis' own high-water mark, read from /proc/PID/status while polling for its exit (≤ 1 ms apart; a lower bound that misses only the last moment): at most \(mib(hwm)) MiB.")
            line()
        }

        line("### Crashes")
        line()
        let total = invocations.values.reduce(0, +)
        if crashes.isEmpty {
            line("None: \(total) stasis snapshot/restore invocations, all succeeded.")
        } else {
            line("\(crashes.count) of \(total) stasis snapshot/restore invocations crashed and were retried (their runs are not in the tables):")
            line()
            for crash in crashes { line("- `\(crash.what)`: \(crash.message)") }
        }
        line()

        line("### Every sample")
        line()
        line("| workload | run | stasis→file total/freeze ms | limit→file ms | stasis→pipe total/freeze ms | limit→pipe ms | restore/pages ms | fresh populate ms | stasis RSS MiB (file/pipe/restore) |")
        line("|---|---|---|---|---|---|---|---|---|")
        for r in results {
            for i in 0..<r.repetitions {
                func at<T>(_ a: [T]) -> T? { i < a.count ? a[i] : nil }
                let sf = at(r.snapshotFile).map { "\(fmt($0.stats.total_ms, 1)) / \(fmt($0.stats.freeze_ms, 1))" } ?? "–"
                let lf = at(r.limitFile).map { fmt(ms($0.totalNs), 1) } ?? "–"
                let sp = at(r.snapshotPipe).map { "\(fmt($0.stats.total_ms, 1)) / \(fmt($0.stats.freeze_ms, 1))" } ?? "–"
                let lp = at(r.limitPipe).map { fmt(ms($0.totalNs), 1) } ?? "–"
                let rs = at(r.restores).map { "\(fmt($0.stats.restore_ms, 1)) / \(fmt($0.stats.pages_ms, 1))" } ?? "–"
                let fr = at(r.fresh).map { fmt(ms($0.populateNs), 1) } ?? "–"
                let rss = [at(r.snapshotFile)?.peakRSS, at(r.snapshotPipe)?.peakRSS, at(r.restores)?.peakRSS].map { $0.map(mib) ?? "–" }.joined(separator: " / ")
                line("| \(sizeLabel(r.mebibytes)) | \(i + 1) | \(sf) | \(lf) | \(sp) | \(lp) | \(rs) | \(fr) | \(rss) |")
            }
        }
        line()
        line("Workload fill times (wl-bench writing its memory the first time): " + results.map { "\(sizeLabel($0.mebibytes)) \(fmt(ms($0.fillNs), 0)) ms" }.joined(separator: ", ") + ".")
        return out.joined(separator: "\n")
    }
}

/// The "Failures" and "Notes" sections a report ends with (before its clean-up): each failure
/// as "- PLACE:" and its message in a code block.
func failureAndNoteLines(_ failures: [(place: String, message: String)], notes: [String]) -> [String] {
    var out: [String] = []
    if !failures.isEmpty {
        out += ["### Failures", ""]
        for failure in failures {
            out += ["- \(failure.place):", "", "  ```"]
            for text in failure.message.split(separator: "\n", omittingEmptySubsequences: false) { out.append("  \(text)") }
            out.append("  ```")
        }
        out.append("")
    }
    if !notes.isEmpty {
        out += ["### Notes", ""]
        for note in notes { out.append("- \(note)") }
        out.append("")
    }
    return out
}
