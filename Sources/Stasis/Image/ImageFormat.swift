/// Constants of the Stasis image format (docs/image-format.md is the full description).
public enum ImageFormat {
    /// The 8 bytes every image starts with.
    public static let magic: [UInt8] = Array("STASISIM".utf8)
    /// Incompatible changes bump the major version; readers refuse majors they were not built for.
    /// 2: process trees (tree, object-data and process-pages records).
    public static let majorVersion: UInt16 = 2
    /// Compatible additions bump the minor version.
    /// 2.1: the tree record's `filesystems` (directories captured with `--fs`).
    public static let minorVersion: UInt16 = 1
    /// The majors this build reads: 1 (one process, no tree record) and 2.
    public static let readableMajorVersions: ClosedRange<UInt16> = 1...2
    public static let headerSize = 32
    public static let frameSize = 24
    public static let pageSize = 4096
    /// Page data of one block is at most this many pages (4 MiB).
    public static let maxPagesPerBlock = 1024
    /// At most this many runs in one block (process_vm_writev's IOV_MAX).
    public static let maxRunsPerBlock = 1024
}

/// The kind of a framed record.
public enum RecordKind: UInt32, Sendable, CustomStringConvertible {
    case process = 1
    case thread = 2
    case mappings = 3
    case files = 4
    case tree = 5
    case objectData = 6
    case processPages = 7
    case fileEntry = 8
    case pages = 16
    case end = 255

    public var description: String {
        switch self {
        case .process: "process"
        case .thread: "thread"
        case .mappings: "mappings"
        case .files: "files"
        case .tree: "tree"
        case .objectData: "object data"
        case .processPages: "process pages"
        case .fileEntry: "file entry"
        case .pages: "pages"
        case .end: "end"
        }
    }
}

/// A damaged, truncated or foreign image: says which record, at which byte offset, and what is wrong.
public struct ImageError: Error, CustomStringConvertible, Sendable {
    public enum Problem: Sendable {
        case notAnImage
        case unsupportedVersion(major: UInt16, minor: UInt16)
        case truncated
        case checksumMismatch(part: String)
        case malformed(String)
        case incomplete
    }

    public var problem: Problem
    /// The 0-based index of the record, counting from the first after the header; nil for the header.
    public var recordIndex: Int?
    public var kind: String?
    public var offset: UInt64

    public var description: String {
        let place: String
        if let recordIndex {
            place = "record #\(recordIndex)\(kind.map { " (\($0))" } ?? "") at byte \(offset)"
        } else {
            place = "header at byte \(offset)"
        }
        switch problem {
        case .notAnImage: return "not a Stasis image: bad magic in the header"
        case let .unsupportedVersion(major, minor):
            return "image format \(major).\(minor) is not supported (this build reads \(ImageFormat.readableMajorVersions.map { "\($0).x" }.joined(separator: " and ")))"
        case .truncated: return "image truncated: \(place) is cut short"
        case let .checksumMismatch(part): return "image corrupt: \(place): \(part) checksum mismatch"
        case let .malformed(reason): return "image corrupt: \(place): \(reason)"
        case .incomplete: return "image incomplete: it ends where \(place) should begin, without its end record (the snapshot did not finish)"
        }
    }
}

/// One run of consecutive pages inside a page block.
public struct PageRun: Sendable, Equatable {
    public var address: UInt64
    public var pages: UInt64

    public init(address: UInt64, pages: UInt64) {
        self.address = address
        self.pages = pages
    }
}

// MARK: little-endian helpers

extension Array where Element == UInt8 {
    mutating func appendLE<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }

    func readLE<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        self.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }
}

func crc32c(_ bytes: [UInt8]) -> UInt32 {
    bytes.withUnsafeBytes { crc32c($0.baseAddress, $0.count) }
}
