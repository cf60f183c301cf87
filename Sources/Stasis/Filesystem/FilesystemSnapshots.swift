import CStasis
import Glibc

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Keeps the contents of directories (`stasis snapshot --fs PATH`) at the instant the tree is
/// frozen, lists and drops what is kept (`stasis fs list`, `stasis fs drop`), and rolls a
/// directory back to it (`stasis restore`).
///
/// Per directory, the cheapest consistent mechanism: a read-only btrfs snapshot when the
/// directory is a btrfs subvolume (constant time); a reflink copy (FICLONE) on xfs or btrfs; a
/// plain copy elsewhere, with a warning that the freeze grows with the data. What is kept lives on
/// the same filesystem, under `<mount point>/.stasis-fs/ID/N`, so reflinks and snapshots work; a
/// registry entry `/var/lib/stasis/fs/ID.json` names it.
///
/// Guarantees: `take` runs while every process of the tree is stopped, after a `syncfs` of each
/// filesystem, so the kept contents and the processes' memory are of the same instant; `drop`
/// removes both the kept contents and the registry entry; `rollBack` leaves the directory holding
/// exactly the kept contents, or throws naming the entry it could not restore.
public enum FilesystemSnapshots {
    /// A directory to keep, examined before the freeze.
    public struct Target: Sendable {
        public var path: String
        public var mountPoint: String
        public var filesystemType: String
        public var mechanism: FilesystemMechanism
    }

    public static let registry = "/var/lib/stasis/fs"
    static let storeDirectory = ".stasis-fs"

    /// Resolves and examines each path; refuses what is not a directory. A plain copy gets a
    /// warning from the caller (`Target.mechanism == .copy`).
    public static func prepare(_ paths: [String]) throws -> [Target] {
        try paths.map { given in
            guard let resolved = realpath(given, nil) else {
                throw StasisError.usage("--fs \(given): \(String(cString: strerror(errno)))")
            }
            let path = String(cString: resolved)
            free(resolved)
            var st = stat()
            guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
                throw StasisError.usage("--fs \(given): not a directory")
            }
            let handle = try FileHandle.open(path, O_RDONLY | O_DIRECTORY)
            var magic: Int64 = 0
            _ = try checked(stasis_statfs_type(handle.rawValue, &magic), "fstatfs", path)
            let type = typeName(magic)
            let mechanism: FilesystemMechanism
            switch type {
            case "btrfs": mechanism = st.st_ino == 256 ? .btrfsSnapshot : .reflink
            case "xfs": mechanism = .reflink
            default: mechanism = .copy
            }
            return Target(path: path, mountPoint: mountPoint(of: path), filesystemType: type, mechanism: mechanism)
        }
    }

    /// A new ID for one snapshot's directories.
    public static func newID(root: pid_t) -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return "\(root)-\(now.tv_sec)-\(String(UInt32.random(in: 0...0xffff), radix: 16))"
    }

    /// Flushes each target's filesystem (`syncfs`); run once before the freeze, so that the one
    /// inside it has little left to write.
    public static func sync(_ targets: [Target]) throws {
        for target in targets {
            let handle = try FileHandle.open(target.path, O_RDONLY | O_DIRECTORY)
            _ = try checked(stasis_syncfs(handle.rawValue), "syncfs", target.path)
        }
    }

    /// Keeps every target's contents now (the tree is frozen). On failure, what was kept so far
    /// is removed before the error is thrown.
    public static func take(_ targets: [Target], id: String) throws -> [FilesystemSnapshotRecord] {
        try sync(targets)
        var records: [FilesystemSnapshotRecord] = []
        var current: String?
        do {
            for (index, target) in targets.enumerated() {
                let parent = target.mountPoint + "/" + storeDirectory + "/" + id
                try makeDirectories(parent)
                let store = parent + "/\(index)"
                current = store
                switch target.mechanism {
                case .btrfsSnapshot:
                    let source = try FileHandle.open(target.path, O_RDONLY | O_DIRECTORY)
                    let directory = try FileHandle.open(parent, O_RDONLY | O_DIRECTORY)
                    _ = try "\(index)".withCString {
                        try checked(stasis_btrfs_snapshot(source.rawValue, directory.rawValue, $0, 1), "ioctl(BTRFS_IOC_SNAP_CREATE_V2)", target.path)
                    }
                case .reflink, .copy:
                    guard mkdir(store, 0o700) == 0 else { throw SystemCallError(call: "mkdir", subject: store, errno: .init(rawValue: errno)) }
                    let copier = DirectoryCopier(reflink: target.mechanism == .reflink, skipping: skipped(target.path, target.mountPoint))
                    try copier.copyContents(of: target.path, into: store)
                }
                records.append(FilesystemSnapshotRecord(id: id, path: target.path, mechanism: target.mechanism, store: store,
                                                        filesystemType: target.filesystemType))
            }
        } catch {
            drop(records, removingRegistry: false)
            if let current, !records.contains(where: { $0.store == current }) { try? DirectoryCopier.removeTree(current) }
            removeEmptyParents(targets, id: id)
            throw error
        }
        return records
    }

    /// Writes the registry entry for a completed snapshot.
    public static func register(_ records: [FilesystemSnapshotRecord], image: String?) throws {
        guard let id = records.first?.id else { return }
        try makeDirectories(registry)
        let entry = RegistryEntry(id: id, created: Int64(time(nil)), image: image, directories: records)
        let data = try JSONEncoder().encode(entry)
        let path = registry + "/\(id).json"
        let handle = try FileHandle.open(path + ".tmp", O_WRONLY | O_CREAT | O_TRUNC, permissions: 0o600)
        try handle.writeAll(Array(data))
        try handle.fsync()
        _ = try checked(Int(rename(path + ".tmp", path)).negatedErrnoIfFailed(), "rename", path)
    }

    /// One registry entry: what `stasis fs list` shows.
    public struct RegistryEntry: Codable, Sendable {
        public var id: String
        /// When it was taken (seconds since the epoch).
        public var created: Int64
        /// The image file it belongs to, if the image went to a file.
        public var image: String?
        public var directories: [FilesystemSnapshotRecord]
    }

    /// Every registry entry, oldest first.
    public static func list() -> [RegistryEntry] {
        let names = (try? DirectoryCopier.entries(of: registry)) ?? []
        return names.filter { $0.hasSuffix(".json") }.compactMap { name in
            guard let text = try? readTextFile(registry + "/" + name) else { return nil }
            return try? JSONDecoder().decode(RegistryEntry.self, from: Data(text.utf8))
        }.sorted { $0.created < $1.created }
    }

    /// Removes a snapshot's kept contents and its registry entry.
    public static func drop(id: String) throws {
        guard let entry = list().first(where: { $0.id == id }) else {
            throw StasisError.usage("no filesystem snapshot \(id) (see `stasis fs list`)")
        }
        drop(entry.directories, removingRegistry: true)
        removeEmptyParents(entry.directories.map { Target(path: $0.path, mountPoint: mountPoint(of: $0.path), filesystemType: "", mechanism: $0.mechanism) }, id: id)
    }

    /// Best effort: kept contents, then the registry entry.
    static func drop(_ records: [FilesystemSnapshotRecord], removingRegistry: Bool) {
        for record in records where !record.store.isEmpty {
            if record.mechanism == .btrfsSnapshot {
                let parent = String(record.store[..<record.store.lastIndex(of: "/")!])
                let name = String(record.store[record.store.index(after: record.store.lastIndex(of: "/")!)...])
                if let directory = try? FileHandle.open(parent, O_RDONLY | O_DIRECTORY) {
                    _ = name.withCString { stasis_btrfs_destroy_subvolume(directory.rawValue, $0) }
                }
            } else {
                try? DirectoryCopier.removeTree(record.store)
            }
        }
        if removingRegistry, let id = records.first?.id { unlink(registry + "/\(id).json") }
    }

    private static func removeEmptyParents(_ targets: [Target], id: String) {
        for target in targets {
            rmdir(target.mountPoint + "/" + storeDirectory + "/" + id)
            rmdir(target.mountPoint + "/" + storeDirectory)
        }
    }

    /// Checks that every kept directory is still there (restore refuses an image whose
    /// filesystem snapshot was dropped).
    public static func checkKept(_ records: [FilesystemSnapshotRecord]) throws {
        for record in records where record.embedded != true && !pathExists(record.store) {
            throw StasisError.fileChanged(path: record.path, reason: "cannot be rolled back: its filesystem snapshot \(record.id) is gone (\(record.store) is missing; dropped with `stasis fs drop`?)")
        }
    }

    /// Makes `record.path` hold exactly the kept contents again (reflinked back where the
    /// filesystem allows it).
    public static func rollBack(_ record: FilesystemSnapshotRecord) throws {
        try checkKept([record])
        let mount = mountPoint(of: record.path)
        let skip = skipped(record.path, mount)
        if record.mechanism == .btrfsSnapshot, try swapSubvolume(record) { return }
        if !pathExists(record.path) { try makeDirectories(record.path) }
        do {
            try DirectoryCopier.removeContents(of: record.path, skipping: skip)
            try DirectoryCopier(reflink: record.mechanism != .copy).copyContents(of: record.store, into: record.path)
        } catch {
            throw StasisError.fileChanged(path: record.path, reason: "could not be rolled back to filesystem snapshot \(record.id): \(error)")
        }
    }

    /// A btrfs subvolume is rolled back in constant time: it is deleted and replaced by a
    /// writable snapshot of the kept one. Returns false (and changes nothing) when the path is no
    /// longer a subvolume of that filesystem, so that the caller copies instead.
    private static func swapSubvolume(_ record: FilesystemSnapshotRecord) throws -> Bool {
        var st = stat(), kept = stat()
        guard stat(record.path, &st) == 0, st.st_ino == 256, stat(record.store, &kept) == 0, kept.st_dev != 0,
              let slash = record.path.lastIndex(of: "/") else { return false }
        let parent = slash == record.path.startIndex ? "/" : String(record.path[..<slash])
        let name = String(record.path[record.path.index(after: slash)...])
        var parentStat = stat()
        guard stat(parent, &parentStat) == 0 else { return false }
        let directory = try FileHandle.open(parent, O_RDONLY | O_DIRECTORY)
        let source = try FileHandle.open(record.store, O_RDONLY | O_DIRECTORY)
        let destroyed = name.withCString { stasis_btrfs_destroy_subvolume(directory.rawValue, $0) }
        if destroyed < 0 { return false }
        let made = name.withCString { stasis_btrfs_snapshot(source.rawValue, directory.rawValue, $0, 0) }
        if made < 0 {
            throw StasisError.fileChanged(path: record.path, reason: "was deleted to be rolled back, but the snapshot of \(record.store) could not replace it: \(String(cString: strerror(Int32(-made))))")
        }
        return true
    }

    /// Whether `path` lies inside one of the directories (so its identity is the kept one's).
    public static func isUnder(_ path: String, _ records: [FilesystemSnapshotRecord]) -> Bool {
        records.contains { path == $0.path || path.hasPrefix($0.path + "/") }
    }

    /// The store's name at the top of a directory that is its filesystem's mount point.
    private static func skipped(_ path: String, _ mount: String) -> Set<String> {
        path == mount ? [storeDirectory] : []
    }

    static func makeDirectories(_ path: String) throws {
        var built = ""
        for component in path.split(separator: "/") {
            built += "/" + component
            if mkdir(built, 0o700) != 0 && errno != EEXIST {
                throw SystemCallError(call: "mkdir", subject: built, errno: .init(rawValue: errno))
            }
        }
    }

    /// The mount point of the filesystem `path` is on (the longest mount point that contains it).
    static func mountPoint(of path: String) -> String {
        guard let text = try? readTextFile("/proc/self/mountinfo") else { return "/" }
        var best = "/"
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count > 4 else { continue }
            let mount = String(fields[4])
            if (path == mount || path.hasPrefix(mount == "/" ? "/" : mount + "/")) && mount.count > best.count { best = mount }
        }
        return best
    }

    static func typeName(_ magic: Int64) -> String {
        switch UInt32(truncatingIfNeeded: magic) {
        case 0x9123_683E: "btrfs"
        case 0x5846_5342: "xfs"
        case 0xEF53: "ext4"
        case 0x0102_1994: "tmpfs"
        case 0x794C_7630: "overlayfs"
        default: "0x" + String(UInt32(truncatingIfNeeded: magic), radix: 16)
        }
    }
}

/// The `--fs` part of one snapshot: examined before the freeze, taken during it, registered once
/// the image is complete, or discarded with the snapshot.
public final class FilesystemCapture {
    public let targets: [FilesystemSnapshots.Target]
    public let id: String
    public private(set) var records: [FilesystemSnapshotRecord] = []
    /// How long `take` kept the tree frozen, ms.
    public private(set) var milliseconds: Double = 0
    private var committed = false

    /// Whether the contents travel in the image (`--fs-embed`) instead of being kept.
    public let embed: Bool

    /// Examines `paths` (refusing what is not a directory) and flushes their filesystems.
    public init(paths: [String], root: pid_t, embed: Bool = false) throws {
        self.embed = embed
        targets = try FilesystemSnapshots.prepare(paths)
        id = FilesystemSnapshots.newID(root: root)
        try FilesystemSnapshots.sync(targets)
    }

    /// Keeps every directory now; the tree must be frozen.
    func take() throws {
        guard !targets.isEmpty else { return }
        let start = monotonicNanoseconds()
        records = try FilesystemSnapshots.take(targets, id: id)
        if embed { for index in records.indices { records[index].embedded = true } }
        milliseconds = Double(monotonicNanoseconds() - start) / 1e6
    }

    /// The image is complete: record the snapshot in the registry — or, when its contents are
    /// embedded in the image, free what was kept for writing them.
    func commit(image: String?) throws {
        guard !records.isEmpty else { return }
        if embed {
            discard()
            return
        }
        try FilesystemSnapshots.register(records, image: image)
        committed = true
    }

    /// The snapshot failed: remove what was kept.
    func discard() {
        guard !committed, !records.isEmpty else { return }
        FilesystemSnapshots.drop(records, removingRegistry: true)
        for target in targets {
            rmdir(target.mountPoint + "/" + FilesystemSnapshots.storeDirectory + "/" + id)
            rmdir(target.mountPoint + "/" + FilesystemSnapshots.storeDirectory)
        }
        records = []
    }
}
