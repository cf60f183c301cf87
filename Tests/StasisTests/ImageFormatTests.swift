import Foundation
import Glibc
import Stasis
import Testing

/// The image format without any process: writer/reader round trip and checksums.
@Suite("image format")
struct ImageFormatTests {
    @Test("CRC-32C matches the standard check value")
    func crcCheckValue() {
        let bytes = Array("123456789".utf8)
        #expect(bytes.withUnsafeBytes { crc32c($0.baseAddress, $0.count) } == 0xE306_9283)
    }

    @Test("records and page blocks round-trip, aligned to 4096 in the stream")
    func roundTrip() throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        let path = NSTemporaryDirectory() + "roundtrip-\(getpid()).stasis"
        defer { unlink(path) }
        let sink = try Stasis.FileHandle.open(path, O_WRONLY | O_CREAT | O_TRUNC)
        let writer = try ImageWriter(sink: sink)
        try writer.writeRecord(.files, FileTable(descriptors: []))
        let pages = UnsafeMutableRawPointer.allocate(byteCount: 3 * 4096, alignment: 4096)
        defer { pages.deallocate() }
        for index in 0..<(3 * 4096) { pages.storeBytes(of: UInt8(truncatingIfNeeded: index &* 7), toByteOffset: index, as: UInt8.self) }
        let runs = [PageRun(address: 0x10000, pages: 2), PageRun(address: 0x40000, pages: 1)]
        try writer.writePageBlock(runs: runs, data: pages)
        try writer.finish()
        close(fds[0]); close(fds[1])

        let reader = try ImageReader(source: try Stasis.FileHandle.open(path, O_RDONLY))
        guard case let .record(kind, _)? = try reader.next() else { Issue.record("no record"); return }
        #expect(kind == .files)
        guard case let .pages(readRuns, data)? = try reader.next() else { Issue.record("no page block"); return }
        #expect(readRuns == runs)
        #expect(memcmp(data.baseAddress!, pages, 3 * 4096) == 0)
        #expect(reader.offset % 4096 == 0, "page data must end on a page boundary, as it starts on one")
        guard case let .record(end, _)? = try reader.next() else { Issue.record("no end record"); return }
        #expect(end == .end)
        #expect(try reader.next() == nil)
        #expect(reader.trailer?.pages == 3)
    }
}
