import CStasis
import Glibc

/// Streams the pages a `CapturedState` planned into an image, in page blocks of at most
/// 4 MiB, skipping pages whose contents are all zero.
///
/// Pages of readable mappings are read with process_vm_readv (one call per block, one iovec
/// per run); pages of mappings the process cannot read itself (PROT_NONE, write-only) through
/// /proc/PID/mem, which reads them as a debugger does.
final class PageDumper {
    let pid: pid_t
    private let buffer: UnsafeMutableRawPointer
    private let capacityPages = ImageFormat.maxPagesPerBlock
    private var procMem: FileHandle?
    /// Pages written, and pages skipped because they were all zero.
    private(set) var pagesWritten: UInt64 = 0
    private(set) var zeroPagesSkipped: UInt64 = 0

    init(pid: pid_t) {
        self.pid = pid
        buffer = UnsafeMutableRawPointer.allocate(byteCount: ImageFormat.maxPagesPerBlock * 4096, alignment: 4096)
    }

    deinit { buffer.deallocate() }

    func dump(_ state: CapturedState, to writer: ImageWriter) throws {
        for (index, mapping) in state.mappings.enumerated() {
            let ranges = state.pageRanges[index]
            if ranges.isEmpty { continue }
            var pendingRuns: [PageRun] = []
            var pendingPages = 0
            func flushPending() throws {
                if pendingPages > 0 {
                    try transfer(pendingRuns, pages: pendingPages, readable: mapping.readable, writer: writer)
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

    /// Reads the runs into the buffer, drops zero pages, and writes what is left as one block.
    private func transfer(_ runs: [PageRun], pages: Int, readable: Bool, writer: ImageWriter) throws {
        if readable {
            var local = iovec(iov_base: buffer, iov_len: pages * 4096)
            let remote = runs.map { iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt($0.address)), iov_len: Int($0.pages) * 4096) }
            let got = try checked(stasis_process_vm_readv(pid, &local, 1, remote, UInt(remote.count)),
                                  "process_vm_readv", "pid \(pid) at 0x\(String(runs[0].address, radix: 16))")
            if got != pages * 4096 {
                throw SystemCallError(call: "process_vm_readv", subject: "pid \(pid): read \(got) of \(pages * 4096) bytes at 0x\(String(runs[0].address, radix: 16))", errno: .badAddress)
            }
        } else {
            if procMem == nil { procMem = try FileHandle.open("/proc/\(pid)/mem", O_RDONLY) }
            var offset = 0
            for run in runs {
                let count = Int(run.pages) * 4096
                var done = 0
                while done < count {
                    let got = try procMem!.pread(into: buffer + offset + done, count: count - done, offset: run.address + UInt64(done))
                    if got == 0 { throw SystemCallError(call: "pread", subject: "/proc/\(pid)/mem at 0x\(String(run.address, radix: 16))", errno: .ioError) }
                    done += got
                }
                offset += count
            }
        }
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
