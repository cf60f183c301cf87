import CStasis
import Glibc

/// Pages read from a process during its freeze and kept in memory until they are streamed:
/// the live snapshot's copy of mappings a fork does not carry (MADV_DONTFORK, MADV_WIPEONFORK).
final class PreservedPages {
    let runs: [PageRun]
    let data: UnsafeMutableRawPointer
    var byteCount: Int { runs.reduce(0) { $0 + Int($1.pages) } * 4096 }

    /// Reads `ranges` (of one mapping) from `pid` now.
    init(pid: pid_t, ranges: [Range<UInt64>]) throws {
        var runs: [PageRun] = []
        for range in ranges { runs.append(PageRun(address: range.lowerBound, pages: (range.upperBound - range.lowerBound) / 4096)) }
        self.runs = runs
        let total = runs.reduce(0) { $0 + Int($1.pages) } * 4096
        data = UnsafeMutableRawPointer.allocate(byteCount: max(total, 4096), alignment: 4096)
        var procMem: FileHandle?
        try PageDumper.read(pid: pid, runs: runs, into: data, procMem: &procMem)
    }

    deinit { data.deallocate() }
}

/// Streams the pages a `CapturedState` planned into an image, in page blocks of at most
/// 4 MiB, skipping pages whose contents are all zero.
///
/// Pages are read from `source`: the process itself in a stop-the-world snapshot, its
/// `CopyOnWriteClone` in a live one, through /proc/PID/mem (see `read`). Mappings with
/// `PreservedPages` are taken from memory instead.
final class PageDumper {
    let source: pid_t
    private let buffer: UnsafeMutableRawPointer
    private let capacityPages = ImageFormat.maxPagesPerBlock
    private var procMem: FileHandle?
    /// Pages written, and pages skipped because they were all zero.
    private(set) var pagesWritten: UInt64 = 0
    private(set) var zeroPagesSkipped: UInt64 = 0
    /// Called after each block read from `source` is written, with the runs it covered.
    var afterBlock: (([PageRun]) throws -> Void)?

    init(source: pid_t) {
        self.source = source
        buffer = UnsafeMutableRawPointer.allocate(byteCount: ImageFormat.maxPagesPerBlock * 4096, alignment: 4096)
    }

    deinit { buffer.deallocate() }

    func dump(_ state: CapturedState, preserved: [Int: PreservedPages] = [:], to writer: ImageWriter) throws {
        for (index, mapping) in state.mappings.enumerated() {
            let fromMemory = preserved[index]
            let ranges = fromMemory.map { $0.runs.map { $0.address..<($0.address + $0.pages * 4096) } } ?? state.pageRanges[index]
            if ranges.isEmpty { continue }
            var pendingRuns: [PageRun] = []
            var pendingPages = 0
            var memoryOffset = 0
            func flushPending() throws {
                if pendingPages > 0 {
                    try Cancellation.check()
                    if let fromMemory {
                        buffer.copyMemory(from: fromMemory.data + memoryOffset, byteCount: pendingPages * 4096)
                        memoryOffset += pendingPages * 4096
                    } else {
                        try Self.read(pid: source, runs: pendingRuns, into: buffer, procMem: &procMem)
                    }
                    try emit(pendingRuns, writer: writer)
                    if fromMemory == nil { try afterBlock?(pendingRuns) }
                }
                pendingRuns.removeAll(keepingCapacity: true)
                pendingPages = 0
            }
            for range in ranges {
                var address = range.lowerBound
                while address < range.upperBound {
                    if pendingPages == capacityPages || pendingRuns.count == ImageFormat.maxRunsPerBlock { try flushPending() }
                    let pages = min(Int((range.upperBound - address) / 4096), capacityPages - pendingPages)
                    pendingRuns.append(PageRun(address: address, pages: UInt64(pages)))
                    pendingPages += pages
                    address += UInt64(pages) * 4096
                }
            }
            try flushPending()
        }
    }

    /// Reads `runs` of `pid`, contiguously, into `destination`, through /proc/PID/mem.
    ///
    /// Not process_vm_readv: it pins the pages it reads (FOLL_PIN), and pinning an anonymous
    /// page shared copy-on-write makes the kernel "unshare" it first — copy it — in the process
    /// read. Reading a clone that way would copy every page (twice the memory, at the speed of
    /// fresh allocations); reading a process whose pages are shared with its own children would
    /// change its memory. /proc/PID/mem reads as a debugger does, without pinning, and also
    /// reads mappings the process itself cannot (PROT_NONE, write-only).
    static func read(pid: pid_t, runs: [PageRun], into destination: UnsafeMutableRawPointer,
                     procMem: inout FileHandle?) throws {
        if procMem == nil { procMem = try FileHandle.open("/proc/\(pid)/mem", O_RDONLY) }
        var offset = 0
        for run in runs {
            let count = Int(run.pages) * 4096
            var done = 0
            while done < count {
                let got = try procMem!.pread(into: destination + offset + done, count: count - done, offset: run.address + UInt64(done))
                if got == 0 { throw SystemCallError(call: "pread", subject: "/proc/\(pid)/mem at 0x\(String(run.address + UInt64(done), radix: 16))", errno: .ioError) }
                done += got
            }
            offset += count
        }
    }

    /// Drops the zero pages of the block in the buffer and writes what is left.
    private func emit(_ runs: [PageRun], writer: ImageWriter) throws {
        // Compact away zero pages, splitting runs around them.
        var kept: [PageRun] = []
        var keptPages = 0
        var source = 0
        for run in runs {
            for page in 0..<Int(run.pages) {
                let pointer = buffer + source * 4096
                source += 1
                if stasis_page_is_zero(pointer) != 0 {
                    zeroPagesSkipped += 1
                    continue
                }
                if keptPages != source - 1 {
                    (buffer + keptPages * 4096).copyMemory(from: pointer, byteCount: 4096)
                }
                let address = run.address + UInt64(page) * 4096
                if let last = kept.last, last.address + last.pages * 4096 == address {
                    kept[kept.count - 1].pages += 1
                } else {
                    kept.append(PageRun(address: address, pages: 1))
                }
                keptPages += 1
            }
        }
        if keptPages > 0 {
            try writer.writePageBlock(runs: kept, data: buffer)
            pagesWritten += UInt64(keptPages)
        }
    }
}
