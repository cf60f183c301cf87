/// A summary of an image for people and scripts (`stasis inspect`), built by reading the
/// whole image and checking every checksum on the way.
public struct ImageSummary: Codable, Sendable {
    public struct Thread: Codable, Sendable {
        public var tid: Int32
        public var name: String
        public var rip: String
        public var rsp: String
        public var blocked_signals: String
        public var pending_signals: Int
        public var rseq: Bool
    }

    public struct Mapping: Codable, Sendable {
        public var start: String
        public var end: String
        public var permissions: String
        public var backing: String
        public var name: String
        public var size: UInt64
        public var stored_bytes: UInt64
        public var flags: [String]
    }

    public struct File: Codable, Sendable {
        public var fd: Int32
        public var kind: String
        public var path: String
        public var flags: String
        public var offset: Int64
        public var cloexec: Bool
    }

    public var format_version: String
    public var pid: Int32
    public var name: String
    public var command_line: [String]
    public var executable: String
    public var working_directory: String
    public var kernel: String
    public var snapshot_time_ns: Int64
    public var threads: [Thread]
    public var mappings: [Mapping]
    public var files: [File]
    public var signal_actions: Int
    public var total_pages: UInt64
    public var total_page_bytes: UInt64
    public var image_bytes: UInt64
    public var page_blocks: UInt64

    /// Reads and checks the whole image.
    public static func read(from reader: ImageReader) throws -> ImageSummary {
        let metadata = try ImageMetadata.read(from: reader)
        var stored = [UInt64](repeating: 0, count: metadata.mappings.count)
        var blocks: UInt64 = 0
        while let item = try reader.next() {
            if case let .pages(runs, _) = item {
                blocks += 1
                for run in runs {
                    guard let index = metadata.mappingIndex(containing: run) else {
                        throw reader.malformed("pages at 0x\(String(run.address, radix: 16)) fall outside the image's private mappings", kind: .pages)
                    }
                    stored[index] += run.pages * 4096
                }
            }
        }
        func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }
        let process = metadata.process
        return ImageSummary(
            format_version: "\(reader.majorVersion).\(reader.minorVersion)",
            pid: process.pid, name: process.name, command_line: process.commandLine,
            executable: process.executable, working_directory: process.workingDirectory,
            kernel: process.kernelRelease, snapshot_time_ns: process.snapshotTimeNanoseconds,
            threads: metadata.threads.map {
                Thread(tid: $0.tid, name: $0.name, rip: hex($0.registers.rip), rsp: hex($0.registers.rsp),
                       blocked_signals: hex($0.blockedSignals), pending_signals: $0.pendingSignals.count, rseq: $0.rseq != nil)
            },
            mappings: metadata.mappings.enumerated().map { index, mapping in
                Mapping(start: hex(mapping.start), end: hex(mapping.end),
                        permissions: (mapping.readable ? "r" : "-") + (mapping.writable ? "w" : "-") + (mapping.executable ? "x" : "-")
                            + (mapping.backing == .sharedFile ? "s" : "p"),
                        backing: mapping.backing.rawValue, name: mapping.name, size: mapping.size,
                        stored_bytes: stored[index], flags: mapping.flags)
            },
            files: metadata.files.descriptors.map {
                File(fd: $0.fd, kind: $0.kind.rawValue, path: $0.path, flags: "0" + String($0.flags, radix: 8),
                     offset: $0.offset, cloexec: $0.closeOnExec)
            },
            signal_actions: process.signalActions.count,
            total_pages: reader.trailer?.pages ?? 0,
            total_page_bytes: (reader.trailer?.pages ?? 0) * 4096,
            image_bytes: reader.offset,
            page_blocks: blocks)
    }
}
