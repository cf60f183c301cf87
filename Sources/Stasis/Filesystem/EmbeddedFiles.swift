import CStasis
import Glibc

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `snapshot --fs PATH --fs-embed`: the kept contents of the directories travel inside the image,
/// so that it can be restored on another machine. The writer walks what `FilesystemSnapshots.take`
/// kept (so the files are those of the freeze instant, whatever happened to the originals since)
/// and emits one file-entry record per directory, file, symbolic link and FIFO, each file's
/// bytes following as object data (`ObjectData.Kind.embeddedFile`, ≤ 1 MiB a record).
enum EmbeddedFiles {
    static func write(_ records: [FilesystemSnapshotRecord], to writer: ImageWriter) throws {
        var sequence: UInt64 = 0
        let chunk = UnsafeMutableRawPointer.allocate(byteCount: ObjectData.maxChunk, alignment: 4096)
        defer { chunk.deallocate() }
        func walk(_ directory: Int, _ root: String, _ relative: String) throws {
            let here = relative.isEmpty ? root : root + "/" + relative
            for name in try DirectoryCopier.entries(of: here).sorted() {
                let path = relative.isEmpty ? name : relative + "/" + name
                let full = root + "/" + path
                var st = stat()
                guard lstat(full, &st) == 0 else { throw SystemCallError(call: "lstat", subject: full, errno: .init(rawValue: errno)) }
                let type: FileEntryRecord.EntryType
                switch st.st_mode & S_IFMT {
                case S_IFDIR: type = .directory
                case S_IFREG: type = .file
                case S_IFLNK: type = .symlink
                case S_IFIFO: type = .fifo
                default: throw StasisError.usage("cannot embed \(full): a socket or device node is not data")
                }
                sequence += 1
                let entry = FileEntryRecord(
                    directory: directory, path: path, type: type, mode: UInt32(st.st_mode & 0o7777), uid: st.st_uid, gid: st.st_gid,
                    accessedNanoseconds: Int64(st.st_atim.tv_sec) * 1_000_000_000 + Int64(st.st_atim.tv_nsec),
                    modifiedNanoseconds: Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec),
                    size: type == .file ? UInt64(st.st_size) : 0, target: type == .symlink ? try readLink(full) : nil, sequence: sequence)
                try writer.writeRecord(.fileEntry, entry)
                if type == .file {
                    let file = try FileHandle.open(full, O_RDONLY | O_CLOEXEC)
                    var offset: UInt64 = 0
                    while true {
                        let got = try file.read(into: chunk, count: ObjectData.maxChunk)
                        if got == 0 { break }
                        let bytes = Array(UnsafeRawBufferPointer(start: chunk, count: got))
                        try writer.writeBinaryRecord(.objectData, ObjectData(kind: .embeddedFile, object: sequence, offset: offset,
                                                                              bytes: bytes[...]).encoded())
                        offset += UInt64(got)
                        try Cancellation.check()
                    }
                }
                if type == .directory { try walk(directory, root, path) }
            }
        }
        for (index, record) in records.enumerated() where record.embedded == true {
            // The directory itself first (path ""), for its mode, owner and times.
            var st = stat()
            guard lstat(record.store, &st) == 0 else { throw SystemCallError(call: "lstat", subject: record.store, errno: .init(rawValue: errno)) }
            sequence += 1
            try writer.writeRecord(.fileEntry, FileEntryRecord(
                directory: index, path: "", type: .directory, mode: UInt32(st.st_mode & 0o7777), uid: st.st_uid, gid: st.st_gid,
                accessedNanoseconds: Int64(st.st_atim.tv_sec) * 1_000_000_000 + Int64(st.st_atim.tv_nsec),
                modifiedNanoseconds: Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec),
                size: 0, target: nil, sequence: sequence))
            try walk(index, record.store, "")
        }
    }
}

/// At restore: receives embedded `--fs` contents into a staging directory beside each target
/// (same filesystem, so that installing is a rename), and, once the restore's checks passed,
/// replaces each target's contents with them.
///
/// Guarantees: nothing in the target directories changes until `install`; `discard` (also on
/// deinit, unless installed) removes the staging directories.
public final class EmbeddedFilesReceiver {
    private var staging: [Int: String] = [:]
    private var records: [FilesystemSnapshotRecord] = []
    private var current: (sequence: UInt64, handle: FileHandle)?
    private var attributes: [(path: String, entry: FileEntryRecord)] = []
    /// Each embedded directory's own entry (path ""), applied to the directory itself.
    private var rootEntries: [Int: FileEntryRecord] = [:]
    private var installed = false

    public init() {}

    deinit { if !installed { discard() } }

    /// Takes one item that `TreeMetadata.read` handed over.
    public func receive(_ tree: TreeRecord, _ item: ImageItem, reader: ImageReader) throws {
        if records.isEmpty { records = tree.filesystems ?? [] }
        guard case let .record(kind, payload) = item else { return }
        switch kind {
        case .fileEntry:
            let entry = try reader.decode(FileEntryRecord.self, payload, kind: kind)
            guard entry.directory >= 0, entry.directory < records.count, records[entry.directory].embedded == true,
                  !entry.path.split(separator: "/").contains(where: { $0 == ".." || $0 == "." }), !entry.path.hasPrefix("/") else {
                throw reader.malformed("file entry \(entry.path) for directory \(entry.directory), which the tree record does not embed", kind: kind)
            }
            let root = try stagingDirectory(entry.directory)
            current = nil
            if entry.path.isEmpty {
                guard entry.type == .directory else { throw reader.malformed("the top of an embedded directory is not a directory", kind: kind) }
                rootEntries[entry.directory] = entry
                return
            }
            let path = root + "/" + entry.path
            switch entry.type {
            case .directory:
                guard mkdir(path, 0o700) == 0 else { throw SystemCallError(call: "mkdir", subject: path, errno: .init(rawValue: errno)) }
            case .file:
                current = (entry.sequence, try FileHandle.open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, permissions: 0o600))
            case .symlink:
                guard symlink(entry.target ?? "", path) == 0 else { throw SystemCallError(call: "symlink", subject: path, errno: .init(rawValue: errno)) }
            case .fifo:
                guard mkfifo(path, 0o600) == 0 else { throw SystemCallError(call: "mkfifo", subject: path, errno: .init(rawValue: errno)) }
            }
            attributes.append((path, entry))
        case .objectData:
            guard let data = ObjectData.decode(payload), data.kind == .embeddedFile, let current, current.sequence == data.object else {
                throw reader.malformed("object data before the tree's processes that is not the current embedded file's", kind: kind)
            }
            let bytes = Array(data.bytes)
            var done = 0
            while done < bytes.count {
                let wrote = bytes.withUnsafeBytes { stasis_pwrite(current.handle.rawValue, $0.baseAddress! + done, $0.count - done, data.offset + UInt64(done)) }
                _ = try checked(wrote, "pwrite", "embedded file \(data.object)")
                done += wrote
            }
        default:
            return
        }
    }

    private func stagingDirectory(_ index: Int) throws -> String {
        if let known = staging[index] { return known }
        let target = records[index].path
        let parent = target.contains("/") ? String(target[..<target.lastIndex(of: "/")!]) : "."
        try FilesystemSnapshots.makeDirectories(parent.isEmpty ? "/" : parent)
        let path = target + ".stasis-staging-\(records[index].id)"
        try? DirectoryCopier.removeTree(path)
        guard mkdir(path, 0o700) == 0 else { throw SystemCallError(call: "mkdir", subject: path, errno: .init(rawValue: errno)) }
        staging[index] = path
        return path
    }

    /// Replaces each embedded directory's contents with what was received.
    public func install() throws {
        current = nil
        // Owners, modes and times last, deepest first (adding entries changes a directory's mtime).
        for (path, entry) in attributes.reversed() { Self.apply(entry, to: path) }
        for (index, record) in records.enumerated() where record.embedded == true {
            let source = try stagingDirectory(index)
            do {
                if !pathExists(record.path) { try FilesystemSnapshots.makeDirectories(record.path) }
                let mount = FilesystemSnapshots.mountPoint(of: record.path)
                try DirectoryCopier.removeContents(of: record.path, skipping: record.path == mount ? [FilesystemSnapshots.storeDirectory] : [])
                for name in try DirectoryCopier.entries(of: source) {
                    guard rename(source + "/" + name, record.path + "/" + name) == 0 else {
                        throw SystemCallError(call: "rename", subject: record.path + "/" + name, errno: .init(rawValue: errno))
                    }
                }
                rmdir(source)
                if let top = rootEntries[index] { Self.apply(top, to: record.path) }
            } catch {
                throw StasisError.fileChanged(path: record.path, reason: "could not be rolled back to the contents embedded in the image: \(error)")
            }
        }
        installed = true
    }

    private static func apply(_ entry: FileEntryRecord, to path: String) {
        if entry.type == .symlink {
            _ = lchown(path, entry.uid, entry.gid)
        } else {
            _ = chown(path, entry.uid, entry.gid)
            _ = chmod(path, mode_t(entry.mode))
        }
        var times = [timespec(tv_sec: Int(entry.accessedNanoseconds / 1_000_000_000), tv_nsec: Int(entry.accessedNanoseconds % 1_000_000_000)),
                     timespec(tv_sec: Int(entry.modifiedNanoseconds / 1_000_000_000), tv_nsec: Int(entry.modifiedNanoseconds % 1_000_000_000))]
        _ = utimensat(AT_FDCWD, path, &times, AT_SYMLINK_NOFOLLOW)
    }

    /// Removes the staging directories.
    public func discard() {
        current = nil
        for path in staging.values { try? DirectoryCopier.removeTree(path) }
        staging = [:]
    }
}
