#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc

/// One item of an image, in stream order.
public enum ImageItem {
    /// A JSON record and its payload bytes.
    case record(RecordKind, [UInt8])
    /// A page block: its runs and their data, valid until the next call to `next()`.
    case pages([PageRun], UnsafeRawBufferPointer)
}

/// Reads a Stasis image front to back from a file or a pipe, checking every checksum.
///
/// Guarantees: `next()` returns only items whose frame and data checksums matched; any
/// damage, truncation or foreign input throws an `ImageError` naming the record index, its
/// kind and its byte offset; after the end record, `next()` returns nil, and a stream that
/// stops before it throws `.incomplete`/`.truncated`.
public final class ImageReader {
    private let source: FileHandle
    private let buffer: UnsafeMutableRawPointer
    private let bufferSize = 1 << 20
    private var bufferStart = 0
    private var bufferEnd = 0
    private let pageData: UnsafeMutableRawPointer
    /// The stream offset of the next unread byte.
    public private(set) var offset: UInt64 = 0
    /// Index of the next record.
    public private(set) var recordIndex = 0
    /// Index and offset of the item `next()` returned last, for errors about its contents.
    public private(set) var lastRecordIndex = 0
    public private(set) var lastRecordOffset: UInt64 = 0
    public private(set) var sawEnd = false
    public private(set) var trailer: Trailer?
    private var pageBlocks: UInt64 = 0
    private var pages: UInt64 = 0
    public let majorVersion: UInt16
    public let minorVersion: UInt16
    private let decoder = JSONDecoder()

    public init(source: FileHandle) throws {
        self.source = source
        buffer = UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 4096)
        pageData = UnsafeMutableRawPointer.allocate(
            byteCount: ImageFormat.maxPagesPerBlock * ImageFormat.pageSize, alignment: 4096)
        var header = [UInt8](repeating: 0, count: ImageFormat.headerSize)
        let got = try Self.fill(source, buffer, bufferSize, &bufferStart, &bufferEnd, into: &header, count: header.count)
        if got < 8 || Array(header[0..<8]) != ImageFormat.magic {
            throw ImageError(problem: got < 8 && got > 0 && Array(header[0..<got]) == Array(ImageFormat.magic[0..<got]) ? .truncated : .notAnImage,
                             recordIndex: nil, kind: nil, offset: 0)
        }
        if got < header.count { throw ImageError(problem: .truncated, recordIndex: nil, kind: nil, offset: 0) }
        majorVersion = header.readLE(UInt16.self, at: 8)
        minorVersion = header.readLE(UInt16.self, at: 10)
        if header.readLE(UInt32.self, at: 28) != crc32c(Array(header[0..<28])) {
            throw ImageError(problem: .checksumMismatch(part: "header"), recordIndex: nil, kind: nil, offset: 0)
        }
        if !ImageFormat.readableMajorVersions.contains(majorVersion) {
            throw ImageError(problem: .unsupportedVersion(major: majorVersion, minor: minorVersion),
                             recordIndex: nil, kind: nil, offset: 0)
        }
        let headerSize = Int(header.readLE(UInt32.self, at: 12))
        guard headerSize == ImageFormat.headerSize else {
            throw ImageError(problem: .malformed("header size \(headerSize)"), recordIndex: nil, kind: nil, offset: 0)
        }
        offset = UInt64(header.count)
    }

    deinit {
        buffer.deallocate()
        pageData.deallocate()
    }

    /// Reads up to `count` bytes into `target` through the buffer; returns how many were read.
    private static func fill(
        _ source: FileHandle, _ buffer: UnsafeMutableRawPointer, _ bufferSize: Int,
        _ start: inout Int, _ end: inout Int, into target: UnsafeMutableRawPointer, count: Int
    ) throws -> Int {
        var done = 0
        while done < count {
            if start == end {
                if count - done >= bufferSize {
                    let got = try source.read(into: target + done, count: count - done)
                    if got == 0 { return done }
                    done += got
                    continue
                }
                start = 0
                end = try source.read(into: buffer, count: bufferSize)
                if end == 0 { return done }
            }
            let take = min(end - start, count - done)
            (target + done).copyMemory(from: buffer + start, byteCount: take)
            start += take
            done += take
        }
        return done
    }

    private static func fill(
        _ source: FileHandle, _ buffer: UnsafeMutableRawPointer, _ bufferSize: Int,
        _ start: inout Int, _ end: inout Int, into bytes: inout [UInt8], count: Int
    ) throws -> Int {
        try bytes.withUnsafeMutableBytes { (raw) throws in
            try fill(source, buffer, bufferSize, &start, &end, into: raw.baseAddress!, count: count)
        }
    }

    private func error(_ problem: ImageError.Problem, kind: RecordKind?, at recordOffset: UInt64) -> ImageError {
        ImageError(problem: problem, recordIndex: recordIndex, kind: kind?.description, offset: recordOffset)
    }

    private func readExactly(_ count: Int, kind: RecordKind?, recordOffset: UInt64) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let got = try Self.fill(source, buffer, bufferSize, &bufferStart, &bufferEnd, into: &bytes, count: count)
        offset += UInt64(got)
        if got < count { throw error(.truncated, kind: kind, at: recordOffset) }
        return bytes
    }

    /// The next item, or nil after the end record.
    public func next() throws -> ImageItem? {
        if sawEnd { return nil }
        let recordOffset = offset
        var frame = [UInt8](repeating: 0, count: ImageFormat.frameSize)
        let got = try Self.fill(source, buffer, bufferSize, &bufferStart, &bufferEnd, into: &frame, count: frame.count)
        offset += UInt64(got)
        if got == 0 { throw error(.incomplete, kind: nil, at: recordOffset) }
        if got < frame.count { throw error(.truncated, kind: nil, at: recordOffset) }
        if frame.readLE(UInt32.self, at: 20) != crc32c(Array(frame[0..<20])) {
            throw error(.checksumMismatch(part: "frame header"), kind: nil, at: recordOffset)
        }
        let rawKind = frame.readLE(UInt32.self, at: 0)
        guard let kind = RecordKind(rawValue: rawKind) else {
            throw error(.malformed("unknown record kind \(rawKind)"), kind: nil, at: recordOffset)
        }
        let length = frame.readLE(UInt64.self, at: 8)
        guard length <= 64 << 20 else {
            throw error(.malformed("record length \(length) is implausible"), kind: kind, at: recordOffset)
        }
        let payload = try readExactly(Int(length), kind: kind, recordOffset: recordOffset)
        if frame.readLE(UInt32.self, at: 16) != crc32c(payload) {
            throw error(.checksumMismatch(part: "payload"), kind: kind, at: recordOffset)
        }
        lastRecordIndex = recordIndex
        lastRecordOffset = recordOffset
        defer { recordIndex += 1 }
        switch kind {
        case .pages:
            return try readPageBlock(payload, recordOffset: recordOffset)
        case .end:
            let trailer = try decode(Trailer.self, payload, kind: kind, at: recordOffset)
            guard trailer.records == UInt64(recordIndex + 1), trailer.pageBlocks == pageBlocks, trailer.pages == pages else {
                throw error(.malformed("end record counts \(trailer.records) records, \(trailer.pageBlocks) page blocks, \(trailer.pages) pages; the stream held \(recordIndex + 1), \(pageBlocks), \(pages)"),
                            kind: kind, at: recordOffset)
            }
            self.trailer = trailer
            sawEnd = true
            return .record(kind, payload)
        default:
            return .record(kind, payload)
        }
    }

    private func readPageBlock(_ payload: [UInt8], recordOffset: UInt64) throws -> ImageItem {
        guard payload.count >= 16 else {
            throw error(.malformed("page block header too short"), kind: .pages, at: recordOffset)
        }
        let runCount = Int(payload.readLE(UInt32.self, at: 0))
        let pageCount = Int(payload.readLE(UInt32.self, at: 4))
        let dataCRC = payload.readLE(UInt32.self, at: 8)
        guard runCount > 0, runCount <= ImageFormat.maxRunsPerBlock, payload.count == 16 + runCount * 16,
              pageCount > 0, pageCount <= ImageFormat.maxPagesPerBlock
        else {
            throw error(.malformed("page block with \(runCount) runs and \(pageCount) pages"), kind: .pages, at: recordOffset)
        }
        var runs: [PageRun] = []
        runs.reserveCapacity(runCount)
        var total: UInt64 = 0
        for index in 0..<runCount {
            let run = PageRun(address: payload.readLE(UInt64.self, at: 16 + index * 16),
                              pages: payload.readLE(UInt64.self, at: 24 + index * 16))
            guard run.address % UInt64(ImageFormat.pageSize) == 0, run.pages > 0 else {
                throw error(.malformed("page run at 0x\(String(run.address, radix: 16)) is not page-aligned or empty"),
                            kind: .pages, at: recordOffset)
            }
            total += run.pages
            runs.append(run)
        }
        guard total == UInt64(pageCount) else {
            throw error(.malformed("page runs add up to \(total) pages, block says \(pageCount)"), kind: .pages, at: recordOffset)
        }
        let padding = (ImageFormat.pageSize - Int(offset % UInt64(ImageFormat.pageSize))) % ImageFormat.pageSize
        if padding > 0, try readExactly(padding, kind: .pages, recordOffset: recordOffset).contains(where: { $0 != 0 }) {
            throw error(.malformed("non-zero bytes in the padding before the page data"), kind: .pages, at: recordOffset)
        }
        let dataSize = pageCount * ImageFormat.pageSize
        let got = try Self.fill(source, buffer, bufferSize, &bufferStart, &bufferEnd, into: pageData, count: dataSize)
        offset += UInt64(got)
        if got < dataSize { throw error(.truncated, kind: .pages, at: recordOffset) }
        if crc32c(pageData, dataSize) != dataCRC {
            throw error(.checksumMismatch(part: "page data"), kind: .pages, at: recordOffset)
        }
        pageBlocks += 1
        pages += UInt64(pageCount)
        return .pages(runs, UnsafeRawBufferPointer(start: pageData, count: dataSize))
    }

    /// Decodes a record's JSON payload, naming the record if it does not fit `type`.
    public func decode<T: Decodable>(_ type: T.Type, _ payload: [UInt8], kind: RecordKind, at recordOffset: UInt64? = nil) throws -> T {
        do {
            return try decoder.decode(type, from: Data(payload))
        } catch {
            throw malformed("\(kind) record does not decode: \(error)", kind: kind)
        }
    }

    /// An error about the contents of the item `next()` returned last.
    public func malformed(_ reason: String, kind: RecordKind) -> ImageError {
        ImageError(problem: .malformed(reason), recordIndex: lastRecordIndex, kind: kind.description, offset: lastRecordOffset)
    }
}
