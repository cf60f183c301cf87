/// The records that precede an image's page blocks, read and checked as a whole.
public struct ImageMetadata: Sendable {
    public var process: ProcessRecord
    public var threads: [ThreadRecord]
    public var mappings: [MappingRecord]
    public var files: FileTable

    /// Reads records from `reader` up to and including the file table, which is the last
    /// record of a process section (`first`, if given, is its first record, already read).
    /// Throws an `ImageError` naming the record that is missing, out of order or inconsistent.
    public static func read(from reader: ImageReader, first: ImageItem? = nil) throws -> ImageMetadata {
        var process: ProcessRecord?
        var threads: [ThreadRecord] = []
        var mappings: [MappingRecord]?
        var pending = first
        while true {
            let next = pending
            pending = nil
            guard let item = try next ?? reader.next() else {
                throw ImageError(problem: .malformed("the image ends before its file table"), recordIndex: reader.recordIndex,
                                 kind: nil, offset: reader.offset)
            }
            guard case let .record(kind, payload) = item else {
                throw reader.malformed("page data before the process, thread, mapping and file records", kind: .pages)
            }
            switch kind {
            case .process:
                guard process == nil else { throw reader.malformed("a second process record", kind: kind) }
                process = try reader.decode(ProcessRecord.self, payload, kind: kind)
            case .thread:
                guard process != nil else { throw reader.malformed("thread record before the process record", kind: kind) }
                threads.append(try reader.decode(ThreadRecord.self, payload, kind: kind))
            case .mappings:
                guard mappings == nil else { throw reader.malformed("a second mappings record", kind: kind) }
                mappings = try reader.decode(MappingTable.self, payload, kind: kind).mappings
            case .files:
                let files = try reader.decode(FileTable.self, payload, kind: kind)
                guard let process, let mappings else {
                    throw reader.malformed("file table before the process and mapping records", kind: kind)
                }
                guard let first = threads.first, first.tid == process.pid else {
                    throw reader.malformed("the first thread record is not the main thread \(process.pid)", kind: kind)
                }
                guard Set(threads.map(\.tid)).count == threads.count else {
                    throw reader.malformed("two thread records with the same TID", kind: kind)
                }
                let metadata = ImageMetadata(process: process, threads: threads, mappings: mappings, files: files)
                if let overlap = metadata.firstOverlap() {
                    throw reader.malformed("mappings overlap at 0x\(String(overlap, radix: 16))", kind: .mappings)
                }
                return metadata
            case .pages, .end, .tree, .objectData, .processPages, .fileEntry:
                throw reader.malformed("\(kind) record before the file table", kind: kind)
            }
        }
    }

    /// The start of the first mapping that overlaps its predecessor, if any.
    func firstOverlap() -> UInt64? {
        let sorted = mappings.sorted { $0.start < $1.start }
        for (previous, next) in zip(sorted, sorted.dropFirst()) where next.start < previous.end { return next.start }
        for mapping in mappings where mapping.end <= mapping.start || mapping.start % 4096 != 0 || mapping.end % 4096 != 0 {
            return mapping.start
        }
        return nil
    }

    /// The index of the restorable mapping that wholly contains a run, if any.
    func mappingIndex(containing run: PageRun) -> Int? {
        let end = run.address + run.pages * 4096
        return mappings.firstIndex { ($0.backing == .anonymous || $0.backing == .privateFile) && $0.start <= run.address && end <= $0.end }
    }
}

/// The metadata of a whole image: the tree and every process section, everything that precedes
/// the shared objects' contents and the page blocks.
public struct TreeMetadata: Sendable {
    public var tree: TreeRecord
    /// One per live member of the tree, in the tree's order.
    public var processes: [ImageMetadata]

    /// Reads a tree image's metadata, or a single-process image of format 1.0 (no tree record),
    /// for which it makes a tree of one member. Embedded `--fs` contents (file-entry and
    /// object-data records between the tree record and the first process) are handed to
    /// `embedded` as they come (with the tree record), or skipped when it is nil.
    public static func read(from reader: ImageReader,
                            embedded: ((TreeRecord, ImageItem) throws -> Void)? = nil) throws -> TreeMetadata {
        guard let first = try reader.next() else {
            throw ImageError(problem: .malformed("the image holds no records"), recordIndex: reader.recordIndex, kind: nil, offset: reader.offset)
        }
        guard case let .record(kind, payload) = first, kind == .tree else {
            let single = try ImageMetadata.read(from: reader, first: first)
            let record = single.process
            let member = TreeMember(pid: record.pid, parent: 0, processGroup: 0, session: 0, namespacePID: nil, zombie: nil)
            let tree = TreeRecord(root: record.pid, pidNamespace: false, members: [member], pipes: [], sharedMemory: [], descriptions: [])
            return TreeMetadata(tree: tree, processes: [single])
        }
        let tree = try reader.decode(TreeRecord.self, payload, kind: kind)
        let live = tree.liveMembers
        guard let root = tree.members.first, root.pid == tree.root, root.zombie == nil, !live.isEmpty else {
            throw reader.malformed("the tree record's first member is not its live root \(tree.root)", kind: kind)
        }
        guard Set(tree.members.map(\.pid)).count == tree.members.count else {
            throw reader.malformed("two tree members with the same PID", kind: kind)
        }
        if tree.pidNamespace, tree.members.contains(where: { $0.namespacePID == nil }) || root.namespacePID != 1 {
            throw reader.malformed("a PID namespace tree whose members lack namespace PIDs or whose root is not PID 1", kind: kind)
        }
        var processes: [ImageMetadata] = []
        var pending: ImageItem?
        while let item = try reader.next() {
            if case let .record(kind, _) = item, kind == .fileEntry || kind == .objectData {
                try embedded?(tree, item)
                continue
            }
            pending = item
            break
        }
        for member in live {
            let first = pending
            pending = nil
            let section = try ImageMetadata.read(from: reader, first: first)
            guard section.process.pid == member.pid else {
                throw reader.malformed("process section for PID \(section.process.pid) where the tree lists \(member.pid)", kind: .process)
            }
            if tree.pidNamespace, section.threads.contains(where: { $0.namespaceTID == nil }) {
                throw reader.malformed("a thread of PID \(member.pid) lacks its namespace TID", kind: .thread)
            }
            processes.append(section)
        }
        return TreeMetadata(tree: tree, processes: processes)
    }
}
