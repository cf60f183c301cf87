import CStasis
import Glibc

/// Finds which pages of a process hold data of its own, with the PAGEMAP_SCAN ioctl on
/// /proc/PID/pagemap (Linux 6.7+): one call returns whole runs of pages by category instead of
/// one 8-byte entry per page.
///
/// "Data of its own" is: present or swapped, and not the shared zero page (a page that was only
/// ever read); in a private file mapping, additionally not a page-cache page (only pages the
/// process wrote, which copy-on-write made anonymous). Pages never touched are not reported.
public final class PageScanner {
    private let handle: FileHandle
    public let pid: pid_t
    private var regions: [stasis_page_region]

    public init(pid: pid_t) throws {
        self.pid = pid
        self.handle = try FileHandle.open("/proc/\(pid)/pagemap", O_RDONLY)
        self.regions = Array(repeating: stasis_page_region(), count: 4096)
    }

    /// The runs of pages in [start, end) that hold the process's own data, as half-open
    /// address ranges in ascending order. `privateFile` selects the file-mapping rule.
    public func ownedRanges(start: UInt64, end: UInt64, privateFile: Bool) throws -> [Range<UInt64>] {
        let anyOf = UInt64(STASIS_PAGE_IS_PRESENT | STASIS_PAGE_IS_SWAPPED)
        let excluded = UInt64(STASIS_PAGE_IS_PFNZERO) | (privateFile ? UInt64(STASIS_PAGE_IS_FILE) : 0)
        var ranges: [Range<UInt64>] = []
        var cursor = start
        while cursor < end {
            var walkEnd: UInt64 = 0
            let count = try regions.withUnsafeMutableBufferPointer { (buffer) throws in
                try checked(
                    stasis_pagemap_scan(handle.rawValue, cursor, end, excluded, excluded, anyOf, anyOf,
                                        buffer.baseAddress!, UInt64(buffer.count), &walkEnd),
                    "ioctl(PAGEMAP_SCAN)",
                    "pid \(pid) range 0x\(String(cursor, radix: 16))-0x\(String(end, radix: 16))")
            }
            for index in 0..<count {
                let region = regions[index]
                if let last = ranges.last, last.upperBound == region.start {
                    ranges[ranges.count - 1] = last.lowerBound..<region.end
                } else {
                    ranges.append(region.start..<region.end)
                }
            }
            if walkEnd <= cursor { break }
            cursor = walkEnd
        }
        return ranges
    }
}
