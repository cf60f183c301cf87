import CStasis
import Glibc

// The in-run reference measurements the bench compares stasis with: the "limit" of a snapshot
// (read the workload's memory with process_vm_readv, write it to the same destination), the
// floor of a restore (fresh anonymous memory on this VM), and the CPU cost of the per-byte
// passes stasis makes on top of copying (CRC-32C, zero-page test).

/// One line of /proc/PID/maps.
struct MapEntry {
    var start: UInt64
    var end: UInt64
    var permissions: String
    var name: String
    var size: UInt64 { end - start }
}

func readMappings(_ pid: pid_t) throws -> [MapEntry] {
    let text = readTextFile("/proc/\(pid)/maps", limit: 16 << 20)
    guard !text.isEmpty else { throw BenchError("cannot read /proc/\(pid)/maps") }
    var entries: [MapEntry] = []
    for line in text.split(separator: "\n") {
        let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
        guard fields.count >= 5 else { continue }
        let bounds = fields[0].split(separator: "-")
        guard bounds.count == 2, let start = UInt64(bounds[0], radix: 16), let end = UInt64(bounds[1], radix: 16) else { continue }
        let name = fields.count > 5 ? String(fields[5]).trimmingCharacters(in: " ") : ""
        entries.append(MapEntry(start: start, end: end, permissions: String(fields[1]), name: name))
    }
    return entries
}

extension String {
    func trimmingCharacters(in set: Character) -> String {
        var text = Substring(self)
        while text.first == set { text = text.dropFirst() }
        while text.last == set { text = text.dropLast() }
        return String(text)
    }
}

/// The workload's biggest private anonymous read-write mapping: its N MiB of data.
func workloadMemory(_ pid: pid_t, mebibytes: Int) throws -> MapEntry {
    let candidates = try readMappings(pid).filter { $0.name.isEmpty && $0.permissions == "rw-p" }
    guard let biggest = candidates.max(by: { $0.size < $1.size }), biggest.size >= UInt64(mebibytes) << 20 else {
        throw BenchError("pid \(pid) has no anonymous mapping of \(mebibytes) MiB")
    }
    return biggest
}

/// A 4 MiB page-aligned buffer, touched once so its first use costs nothing.
final class Buffer {
    let size: Int
    let pointer: UnsafeMutableRawPointer
    init(size: Int = 4 << 20) {
        self.size = size
        pointer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        memset(pointer, 1, size)
    }
    deinit { pointer.deallocate() }
}

func readRemote(_ pid: pid_t, _ address: UInt64, into buffer: UnsafeMutableRawPointer, count: Int) throws {
    var done = 0
    while done < count {
        var local = iovec(iov_base: buffer + done, iov_len: count - done)
        var remote = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(address) + UInt(done)), iov_len: count - done)
        let got = stasis_process_vm_readv(pid, &local, 1, &remote, 1)
        if got == -Int(EINTR) { continue }
        guard got > 0 else { throw BenchError("process_vm_readv pid \(pid) at 0x\(String(address, radix: 16)): \(errnoText(Int32(-got)))") }
        done += got
    }
}

func writeAll(_ fd: Int32, _ data: UnsafeRawPointer, _ count: Int, what: String) throws {
    var done = 0
    while done < count {
        let wrote = write(fd, data + done, count - done)
        if wrote < 0 && errno == EINTR { try Emergency.check(); continue }
        guard wrote > 0 else { throw BenchError("write to \(what): \(errnoText())") }
        done += wrote
    }
}

/// The limit measurement: what copying the workload's memory to the destination costs.
struct LimitResult {
    var bytes: UInt64
    var readNs: UInt64 = 0
    var writeNs: UInt64 = 0
    var syncNs: UInt64 = 0
    var totalNs: UInt64 = 0
    var gibPerSecond: Double { Double(bytes) / 1073741824 / (Double(totalNs) / 1e9) }
}

enum LimitDestination {
    /// A new file (created, written, fsynced, closed and then deleted by the caller).
    case file(String)
    /// The write end of a drained pipe.
    case pipe(DrainedPipe)
}

/// Reads `mapping` of `pid` with process_vm_readv into a 4 MiB buffer and writes each chunk to
/// the destination; a file is fsynced before the clock stops, as stasis fsyncs its image.
func copyLimit(pid: pid_t, mapping: MapEntry, to destination: LimitDestination, buffer: Buffer) throws -> LimitResult {
    var result = LimitResult(bytes: mapping.size)
    let start = now()
    let fd: Int32
    switch destination {
    case let .file(path):
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw BenchError("cannot create \(path): \(errnoText())") }
    case let .pipe(pipe):
        fd = pipe.writeFD
    }
    defer { if case .file = destination { close(fd) } }
    var address = mapping.start
    while address < mapping.end {
        let count = Int(min(UInt64(buffer.size), mapping.end - address))
        let t0 = now()
        try readRemote(pid, address, into: buffer.pointer, count: count)
        let t1 = now()
        try writeAll(fd, buffer.pointer, count, what: "the limit's destination")
        let t2 = now()
        result.readNs += t1 - t0
        result.writeNs += t2 - t1
        address += UInt64(count)
    }
    if case .file = destination {
        let t0 = now()
        guard fsync(fd) == 0 else { throw BenchError("fsync: \(errnoText())") }
        result.syncNs = now() - t0
    }
    result.totalNs = now() - start
    return result
}

/// The floor of a restore on this VM: fresh anonymous memory of the workload's size.
struct FreshMemoryResult {
    /// mmap + MADV_POPULATE_WRITE: the kernel allocates and zeroes every page.
    var populateNs: UInt64
    /// Writing every byte of the now-resident memory.
    var writeResidentNs: UInt64
    /// process_vm_writev from a 4 MiB buffer into a fresh anonymous mapping of the same size in
    /// another process (a helper): the kernel path stasis' restore writes pages with.
    var remoteWriteFreshNs: UInt64 = 0
    /// The same into a helper's mapping that it populated (MADV_POPULATE_WRITE) beforehand:
    /// what writing the pages costs once the target memory is resident.
    var remoteWriteResidentNs: UInt64 = 0
}

/// process_vm_writev of `source` over and over into [address, address + bytes) of process `pid`.
func remoteWrite(_ source: Buffer, pid: pid_t, address: UInt64, bytes: Int) throws -> UInt64 {
    let start = now()
    var offset = 0
    while offset < bytes {
        let count = min(source.size, bytes - offset)
        var local = iovec(iov_base: source.pointer, iov_len: count)
        var remote = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(address) + UInt(offset)), iov_len: count)
        let wrote = stasis_process_vm_writev(pid, &local, 1, &remote, 1)
        if wrote == -Int(EINTR) { continue }
        guard wrote > 0 else { throw BenchError("process_vm_writev pid \(pid): \(errnoText(Int32(-wrote)))") }
        offset += wrote
    }
    return now() - start
}

/// Populates `bytes` of fresh anonymous memory in the bench, then writes it once resident.
func freshMemory(bytes: Int) throws -> FreshMemoryResult {
    guard let memory = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
          memory != MAP_FAILED
    else { throw BenchError("mmap \(bytes) bytes: \(errnoText())") }
    defer { munmap(memory, bytes) }
    let t0 = now()
    guard madvise(memory, bytes, 23 /* MADV_POPULATE_WRITE */) == 0 else {
        throw BenchError("madvise(MADV_POPULATE_WRITE): \(errnoText())")
    }
    let t1 = now()
    memset(memory, 0x5a, bytes)
    let t2 = now()
    return FreshMemoryResult(populateNs: t1 - t0, writeResidentNs: t2 - t1)
}

/// The hidden `--serve-memory` mode: a process that maps `bytes` of anonymous memory
/// (populated first if asked), prints its address, and waits to be killed.
func runMemoryHelper(bytes: Int, populate: Bool) -> Never {
    guard let memory = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), memory != MAP_FAILED else { exit(1) }
    if populate && madvise(memory, bytes, 23 /* MADV_POPULATE_WRITE */) != 0 { exit(1) }
    let line = Array(("0x" + String(UInt(bitPattern: memory), radix: 16) + "\n").utf8)
    _ = line.withUnsafeBytes { write(1, $0.baseAddress!, $0.count) }
    while true { pause() }
}

/// Populates and frees `bytes` of anonymous memory. On this VM, memory freed some seconds ago
/// has been handed back to the host by the balloon and is slow to touch again; memory freed just
/// now is not. Called right before each measured file write (stasis' and the limit's alike), so
/// that the page cache each one allocates is equally warm, whichever runs first.
func prewarmFreeMemory(bytes: Int) {
    guard let memory = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), memory != MAP_FAILED else { return }
    _ = madvise(memory, bytes, 23 /* MADV_POPULATE_WRITE */)
    munmap(memory, bytes)
}

/// Reading an image file (in the page cache after the snapshot wrote it) in 4 MiB reads,
/// into a resident buffer and, separately, straight into fresh anonymous memory: the second is
/// the floor of any restore that copies every page into new anonymous memory.
struct ImageReadResult {
    var bytes: UInt64
    var intoBufferNs: UInt64
    var intoFreshNs: UInt64
    /// mmap of the whole image MAP_PRIVATE + MADV_POPULATE_READ: the page-cache pages mapped
    /// copy-on-write, no copy and no fresh memory (what a restore that maps image pages pays).
    var mapPrivateNs: UInt64
}

func readImage(_ path: String, buffer: Buffer) throws -> ImageReadResult {
    var info = stat()
    guard stat(path, &info) == 0 else { throw BenchError("stat \(path): \(errnoText())") }
    let size = Int(info.st_size)
    func pass(_ target: (Int) -> UnsafeMutableRawPointer) throws -> UInt64 {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BenchError("open \(path): \(errnoText())") }
        defer { close(fd) }
        let start = now()
        var done = 0
        while done < size {
            let got = read(fd, target(done), min(buffer.size, size - done))
            if got < 0 && errno == EINTR { continue }
            guard got > 0 else { throw BenchError("read \(path): \(got == 0 ? "early end of file" : errnoText())") }
            done += got
        }
        return now() - start
    }
    let intoBuffer = try pass { _ in buffer.pointer }
    guard let memory = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), memory != MAP_FAILED
    else { throw BenchError("mmap \(size) bytes: \(errnoText())") }
    defer { munmap(memory, size) }
    let intoFresh = try pass { memory + $0 }

    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw BenchError("open \(path): \(errnoText())") }
    defer { close(fd) }
    let t0 = now()
    guard let mapped = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0), mapped != MAP_FAILED
    else { throw BenchError("mmap \(path): \(errnoText())") }
    defer { munmap(mapped, size) }
    guard madvise(mapped, size, 22 /* MADV_POPULATE_READ */) == 0 else { throw BenchError("madvise(MADV_POPULATE_READ): \(errnoText())") }
    let mapNs = now() - t0
    return ImageReadResult(bytes: UInt64(size), intoBufferNs: intoBuffer, intoFreshNs: intoFresh, mapPrivateNs: mapNs)
}

/// CPU cost of stasis' per-byte passes, per GiB, on a cache-warm 4 MiB buffer as stasis has
/// its page blocks: CRC-32C (every page block, at snapshot and at restore) and the zero-page
/// test (every page at snapshot).
struct PassCosts {
    var crcNsPerGiB: Double
    var zeroTestNsPerGiB: Double
}

func measurePassCosts(buffer: Buffer) -> PassCosts {
    // Non-zero data, so the zero test reads each page's first bytes and returns (as with
    // wl-bench's pages); a page that is zero would be read in full.
    for index in 0..<(buffer.size / 8) { buffer.pointer.storeBytes(of: UInt64(index) &* 0x9E37_79B9_7F4A_7C15 | 1, toByteOffset: index * 8, as: UInt64.self) }
    let rounds = 256  // 1 GiB through the 4 MiB buffer
    var crc: UInt32 = 0
    let t0 = now()
    for _ in 0..<rounds { crc = stasis_crc32c(crc, buffer.pointer, buffer.size) }
    let t1 = now()
    var zeros: Int32 = 0
    for _ in 0..<rounds {
        for page in stride(from: 0, to: buffer.size, by: 4096) { zeros &+= stasis_page_is_zero(buffer.pointer + page) }
    }
    let t2 = now()
    if crc == 1 && zeros == 12345 { print("") }  // keep the results alive
    let scale = Double(1 << 30) / Double(rounds * buffer.size)
    return PassCosts(crcNsPerGiB: Double(t1 - t0) * scale, zeroTestNsPerGiB: Double(t2 - t1) * scale)
}

/// What the capture phase's /proc reads cost on this workload, measured by the bench while the
/// workload runs: /proc/PID/smaps (which walks every page to count Rss/Pss), /proc/PID/maps,
/// and a PAGEMAP_SCAN of the workload's memory for present, non-zero-page pages.
struct CaptureCosts {
    var smapsNs: UInt64
    var mapsNs: UInt64
    var pagemapScanNs: UInt64
    var scanRegions: Int
}

func measureCaptureCosts(pid: pid_t, mapping: MapEntry) throws -> CaptureCosts {
    let t0 = now()
    let smaps = readTextFile("/proc/\(pid)/smaps", limit: 64 << 20)
    let t1 = now()
    let maps = readTextFile("/proc/\(pid)/maps", limit: 64 << 20)
    let t2 = now()
    guard !smaps.isEmpty, !maps.isEmpty else { throw BenchError("cannot read /proc/\(pid)/smaps") }
    let fd = open("/proc/\(pid)/pagemap", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw BenchError("open /proc/\(pid)/pagemap: \(errnoText())") }
    defer { close(fd) }
    var regions = [stasis_page_region](repeating: stasis_page_region(), count: 4096)
    let anyOf = UInt64(STASIS_PAGE_IS_PRESENT | STASIS_PAGE_IS_SWAPPED)
    let excluded = UInt64(STASIS_PAGE_IS_PFNZERO)
    var cursor = mapping.start
    var found = 0
    let t3 = now()
    while cursor < mapping.end {
        var walkEnd: UInt64 = 0
        let count = regions.withUnsafeMutableBufferPointer {
            stasis_pagemap_scan(fd, cursor, mapping.end, excluded, excluded, anyOf, anyOf, $0.baseAddress!, UInt64($0.count), &walkEnd)
        }
        guard count >= 0 else { throw BenchError("PAGEMAP_SCAN: \(errnoText(Int32(-count)))") }
        found += count
        if walkEnd <= cursor { break }
        cursor = walkEnd
    }
    let t4 = now()
    return CaptureCosts(smapsNs: t1 - t0, mapsNs: t2 - t1, pagemapScanNs: t4 - t3, scanRegions: found)
}

// MARK: - Checking a restored workload

/// wl-bench's page contents: page `index` is a xorshift64 stream seeded with splitmix64(index) | 1.
func wlBenchFirstWord(page index: UInt64) -> UInt64 {
    var x = index &+ 0x9E37_79B9_7F4A_7C15
    x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
    x = (x ^ (x >> 27)) &* 0x94D0_49BB_133111EB
    x = (x ^ (x >> 31)) | 1
    x ^= x << 13
    x ^= x >> 7
    x ^= x << 17
    return x
}

/// Checks that the restored process holds wl-bench's data: the first word of each of its
/// N MiB of pages. Returns the pages checked.
func verifyWorkloadMemory(pid: pid_t, mebibytes: Int, buffer: Buffer) throws -> Int {
    let mapping = try workloadMemory(pid, mebibytes: mebibytes)
    let length = UInt64(mebibytes) << 20
    // mmap places the data at one end of the (possibly merged) anonymous mapping.
    var base: UInt64?
    for candidate in [mapping.start, mapping.end - length] {
        var word: UInt64 = 0
        try readRemote(pid, candidate, into: &word, count: 8)
        if word == wlBenchFirstWord(page: 0) { base = candidate; break }
    }
    guard let base else { throw BenchError("restored pid \(pid): wl-bench's first page is not where expected") }
    var offset: UInt64 = 0
    while offset < length {
        let count = Int(min(UInt64(buffer.size), length - offset))
        try readRemote(pid, base + offset, into: buffer.pointer, count: count)
        for page in 0..<(count / 4096) {
            let index = (offset >> 12) + UInt64(page)
            let word = buffer.pointer.load(fromByteOffset: page * 4096, as: UInt64.self)
            if word != wlBenchFirstWord(page: index) {
                throw BenchError("restored pid \(pid): page \(index) at 0x\(String(base + index * 4096, radix: 16)) holds 0x\(String(word, radix: 16)), expected 0x\(String(wlBenchFirstWord(page: index), radix: 16))")
            }
        }
        offset += UInt64(count)
    }
    return Int(length / 4096)
}
