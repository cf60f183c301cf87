#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc

/// Writes a Stasis image front to back to a file or a pipe.
///
/// Guarantees: every frame carries a CRC-32C of its header and payload, every page block a
/// CRC-32C of its data; page data starts at a multiple of 4096 bytes from the start of the
/// stream (so a file's pages can be mapped directly); the image is complete only once
/// `finish` wrote the end record. Nothing is ever seeked, so a pipe works as well as a file.
public final class ImageWriter {
    private let sink: FileHandle
    /// Bytes written so far (the stream offset of the next byte).
    public private(set) var offset: UInt64 = 0
    private var staging: [UInt8] = []
    private var records: UInt64 = 0
    private var pageBlocks: UInt64 = 0
    private var pages: UInt64 = 0
    private let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return encoder
    }()

    public init(sink: FileHandle) throws {
        self.sink = sink
        staging.reserveCapacity(65536)
        var header: [UInt8] = ImageFormat.magic
        header.appendLE(ImageFormat.majorVersion)
        header.appendLE(ImageFormat.minorVersion)
        header.appendLE(UInt32(ImageFormat.headerSize))
        header.appendLE(UInt32(0))  // flags
        header.appendLE(UInt64(0))  // reserved
        header.appendLE(crc32c(header))
        staging.append(contentsOf: header)
    }

    /// Appends one JSON record.
    public func writeRecord<T: Encodable>(_ kind: RecordKind, _ value: T) throws {
        let payload = Array(try encoder.encode(value))
        appendFrame(kind, payload)
        if staging.count >= 65536 { try flush() }
    }

    /// Appends one record whose payload is binary (object data).
    public func writeBinaryRecord(_ kind: RecordKind, _ payload: [UInt8]) throws {
        appendFrame(kind, payload)
        if staging.count >= 65536 { try flush() }
    }

    private func appendFrame(_ kind: RecordKind, _ payload: [UInt8]) {
        var frame: [UInt8] = []
        frame.reserveCapacity(ImageFormat.frameSize)
        frame.appendLE(kind.rawValue)
        frame.appendLE(UInt32(0))
        frame.appendLE(UInt64(payload.count))
        frame.appendLE(crc32c(payload))
        frame.appendLE(crc32c(frame))
        staging.append(contentsOf: frame)
        staging.append(contentsOf: payload)
        records += 1
    }

    /// Appends one page block: the runs it covers and their data, `runs`' pages in order,
    /// contiguous at `data`.
    public func writePageBlock(runs: [PageRun], data: UnsafeRawPointer) throws {
        let pageCount = runs.reduce(0) { $0 + Int($1.pages) }
        precondition(pageCount > 0 && pageCount <= ImageFormat.maxPagesPerBlock && runs.count <= ImageFormat.maxRunsPerBlock)
        let dataSize = pageCount * ImageFormat.pageSize
        var payload: [UInt8] = []
        payload.reserveCapacity(16 + runs.count * 16)
        payload.appendLE(UInt32(runs.count))
        payload.appendLE(UInt32(pageCount))
        payload.appendLE(crc32c(data, dataSize))
        payload.appendLE(UInt32(0))
        for run in runs {
            payload.appendLE(run.address)
            payload.appendLE(run.pages)
        }
        appendFrame(.pages, payload)
        let unaligned = (Int(offset) + staging.count) % ImageFormat.pageSize
        if unaligned != 0 { staging.append(contentsOf: repeatElement(0, count: ImageFormat.pageSize - unaligned)) }
        try flush(then: data, count: dataSize)
        pageBlocks += 1
        pages += UInt64(pageCount)
    }

    /// Writes the end record and flushes. The image is complete when this returns.
    @discardableResult
    public func finish() throws -> Trailer {
        let trailer = Trailer(records: records + 1, pageBlocks: pageBlocks, pages: pages)
        try writeRecord(.end, trailer)
        try flush()
        return trailer
    }

    /// Writes the staged bytes, then `count` bytes at `data` (one writev where possible).
    public func flush(then data: UnsafeRawPointer? = nil, count: Int = 0) throws {
        var stagedDone = 0
        var dataDone = 0
        let stagedCount = staging.count
        try staging.withUnsafeBytes { (staged) throws in
            while stagedDone < stagedCount || dataDone < count {
                var vectors = [iovec]()
                if stagedDone < stagedCount {
                    vectors.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: staged.baseAddress! + stagedDone),
                                         iov_len: stagedCount - stagedDone))
                }
                if dataDone < count, let data {
                    vectors.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: data + dataDone), iov_len: count - dataDone))
                }
                let wrote = try retryingInterruptsUnlessCancelled("writev", sink.name) {
                    Glibc.writev(sink.rawValue, vectors, Int32(vectors.count)).negatedErrnoIfFailed()
                }
                // A signal can also end a blocked write early with a partial count.
                try Cancellation.check()
                let fromStaged = min(wrote, stagedCount - stagedDone)
                stagedDone += fromStaged
                dataDone += wrote - fromStaged
            }
        }
        offset += UInt64(stagedCount + count)
        staging.removeAll(keepingCapacity: true)
    }
}
