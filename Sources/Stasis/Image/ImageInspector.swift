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

    /// One process of the tree.
    public struct Process: Codable, Sendable {
        public var pid: Int32
        /// Its PID inside the tree's own PID namespace, for a namespace image.
        public var namespace_pid: Int32?
        public var parent: Int32
        public var process_group: Int32
        public var session: Int32
        public var name: String
        public var command_line: [String]
        public var executable: String
        public var working_directory: String
        /// For a zombie: its wait status; it has no threads, mappings or files.
        public var zombie_wait_status: Int32?
        public var threads: [Thread]
        public var mappings: [Mapping]
        public var files: [File]
        public var signal_actions: Int
        public var stored_bytes: UInt64
    }

    public struct Pipe: Codable, Sendable {
        public var id: UInt64
        public var fifo: String?
        public var capacity: Int32
        public var buffered_bytes: UInt64
    }

    public struct SharedMemory: Codable, Sendable {
        public var id: UInt64
        public var kind: String
        public var name: String
        public var size: UInt64
        public var stored_bytes: UInt64
    }

    public var format_version: String
    /// The root process (the first of `processes`), as for a single-process image.
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
    /// The whole tree, the root first; zombies included.
    public var pid_namespace: Bool
    public var processes: [Process]
    public var pipes: [Pipe]
    public var shared_memory: [SharedMemory]
    public var open_file_descriptions: Int
    public var total_pages: UInt64
    public var total_page_bytes: UInt64
    public var image_bytes: UInt64
    public var page_blocks: UInt64

    /// Reads and checks the whole image.
    public static func read(from reader: ImageReader) throws -> ImageSummary {
        let metadata = try TreeMetadata.read(from: reader)
        var stored = metadata.processes.map { [UInt64](repeating: 0, count: $0.mappings.count) }
        var current: Int? = metadata.processes.count == 1 ? 0 : nil
        var blocks: UInt64 = 0
        let live = metadata.tree.liveMembers
        while let item = try reader.next() {
            switch item {
            case let .pages(runs, _):
                blocks += 1
                guard let index = current else { throw reader.malformed("page data before any process-pages record", kind: .pages) }
                for run in runs {
                    guard let mapping = metadata.processes[index].mappingIndex(containing: run) else {
                        throw reader.malformed("pages at 0x\(String(run.address, radix: 16)) fall outside the private mappings of PID \(live[index].pid)", kind: .pages)
                    }
                    stored[index][mapping] += run.pages * 4096
                }
            case let .record(kind, payload) where kind == .processPages:
                let marker = try reader.decode(ProcessPagesRecord.self, payload, kind: kind)
                guard let index = live.firstIndex(where: { $0.pid == marker.pid }) else {
                    throw reader.malformed("pages for PID \(marker.pid), which the tree does not hold", kind: kind)
                }
                current = index
            case let .record(kind, payload) where kind == .objectData:
                guard ObjectData.decode(payload) != nil else { throw reader.malformed("object data record does not decode", kind: kind) }
            default:
                break
            }
        }
        func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }
        var processes: [Process] = []
        for member in metadata.tree.members {
            guard let index = live.firstIndex(where: { $0.pid == member.pid }) else {
                processes.append(Process(pid: member.pid, namespace_pid: member.namespacePID, parent: member.parent,
                                         process_group: member.processGroup, session: member.session, name: "", command_line: [],
                                         executable: "", working_directory: "", zombie_wait_status: member.zombie?.waitStatus,
                                         threads: [], mappings: [], files: [], signal_actions: 0, stored_bytes: 0))
                continue
            }
            let section = metadata.processes[index]
            let record = section.process
            processes.append(Process(
                pid: member.pid, namespace_pid: member.namespacePID, parent: member.parent,
                process_group: member.processGroup, session: member.session, name: record.name,
                command_line: record.commandLine, executable: record.executable, working_directory: record.workingDirectory,
                zombie_wait_status: nil,
                threads: section.threads.map {
                    Thread(tid: $0.tid, name: $0.name, rip: hex($0.registers.rip), rsp: hex($0.registers.rsp),
                           blocked_signals: hex($0.blockedSignals), pending_signals: $0.pendingSignals.count, rseq: $0.rseq != nil)
                },
                mappings: section.mappings.enumerated().map { mappingIndex, mapping in
                    Mapping(start: hex(mapping.start), end: hex(mapping.end),
                            permissions: (mapping.readable ? "r" : "-") + (mapping.writable ? "w" : "-") + (mapping.executable ? "x" : "-")
                                + (mapping.backing == .sharedFile || mapping.backing == .sharedMemory ? "s" : "p"),
                            backing: mapping.backing.rawValue, name: mapping.name, size: mapping.size,
                            stored_bytes: stored[index][mappingIndex], flags: mapping.flags)
                },
                files: section.files.descriptors.map {
                    File(fd: $0.fd, kind: $0.kind.rawValue, path: $0.path, flags: "0" + String($0.flags, radix: 8),
                         offset: $0.offset, cloexec: $0.closeOnExec)
                },
                signal_actions: record.signalActions.count,
                stored_bytes: stored[index].reduce(0, +)))
        }
        let root = processes[0]
        let rootRecord = metadata.processes[0].process
        return ImageSummary(
            format_version: "\(reader.majorVersion).\(reader.minorVersion)",
            pid: root.pid, name: root.name, command_line: root.command_line,
            executable: root.executable, working_directory: root.working_directory,
            kernel: rootRecord.kernelRelease, snapshot_time_ns: rootRecord.snapshotTimeNanoseconds,
            threads: root.threads, mappings: root.mappings, files: root.files, signal_actions: root.signal_actions,
            pid_namespace: metadata.tree.pidNamespace,
            processes: processes,
            pipes: metadata.tree.pipes.map { Pipe(id: $0.id, fifo: $0.fifoPath, capacity: $0.capacity, buffered_bytes: $0.bufferedBytes) },
            shared_memory: metadata.tree.sharedMemory.map {
                SharedMemory(id: $0.id, kind: $0.kind.rawValue, name: $0.name, size: $0.size, stored_bytes: $0.storedBytes)
            },
            open_file_descriptions: metadata.tree.descriptions.count,
            total_pages: reader.trailer?.pages ?? 0,
            total_page_bytes: (reader.trailer?.pages ?? 0) * 4096,
            image_bytes: reader.offset,
            page_blocks: blocks)
    }
}
