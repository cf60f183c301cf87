/// The records that describe a process tree as a whole: which processes it holds and how they
/// are related, and the kernel objects they share (pipes, open file descriptions, shared
/// memory). The tree record comes right after the image header; the shared objects' contents
/// follow it in object-data records; then one section per process (process, threads,
/// mappings, files, page blocks), in the tree record's order.

/// One process of the tree and its place in it.
public struct TreeMember: Codable, Sendable, Equatable {
    /// The PID as Stasis saw it (in its own PID namespace) at the snapshot.
    public var pid: Int32
    /// The parent's PID (in Stasis's namespace); 0 for the root, whose parent is not in the tree.
    public var parent: Int32
    /// Process group and session IDs (in Stasis's namespace).
    public var processGroup: Int32
    public var session: Int32
    /// The PID inside the tree's own PID namespace, when the tree is one (`TreeRecord.pidNamespace`).
    public var namespacePID: Int32?
    /// Set for a zombie: a child that exited and that its parent has not reaped yet. A zombie
    /// has no process section; restore recreates it and lets it exit with this status.
    public var zombie: ZombieRecord?
}

/// How a zombie ended, as its parent's wait() will report it.
public struct ZombieRecord: Codable, Sendable, Equatable {
    /// The raw wait status (exit code << 8, or the terminating signal).
    public var waitStatus: Int32
}

/// A pipe (or the pipe behind a FIFO) at least one process of the tree holds an end of.
public struct PipeRecord: Codable, Sendable, Equatable {
    /// An ID unique in the image (the pipe's inode number at the snapshot).
    public var id: UInt64
    /// The FIFO's path, for a named pipe; nil for a pipe(2).
    public var fifoPath: String?
    /// F_GETPIPE_SZ at the snapshot.
    public var capacity: Int32
    /// How many bytes were buffered in it; they follow in object-data records.
    public var bufferedBytes: UInt64
}

/// What kind of object a shared memory region is.
public enum SharedMemoryKind: String, Codable, Sendable {
    /// mmap(MAP_SHARED | MAP_ANONYMOUS), shown as "/dev/zero (deleted)".
    case anonymous
    /// memfd_create(2), shown as "/memfd:NAME (deleted)".
    case memfd
}

/// A shared memory object (shmem inode) mapped or held open by processes of the tree.
public struct SharedMemoryRecord: Codable, Sendable, Equatable {
    /// An ID unique in the image (the object's inode number at the snapshot).
    public var id: UInt64
    public var kind: SharedMemoryKind
    /// The memfd name (without "/memfd:" and " (deleted)"); empty for anonymous memory.
    public var name: String
    /// The object's size in bytes.
    public var size: UInt64
    /// Bytes of data stored for it in object-data records (its holes are not stored).
    public var storedBytes: UInt64
}

/// One open file description (what open(2) returns and dup/fork share): file descriptors of
/// the tree that refer to the same description share its offset and status flags after a
/// restore, as before.
public struct OpenFileDescription: Codable, Sendable, Equatable {
    public var id: Int
    public var kind: FileKind
    /// The path of a regular file or FIFO; "pipe:[inode]" for a pipe; the memfd's name.
    public var path: String
    /// open(2) flags as in /proc/PID/fdinfo, without O_CLOEXEC.
    public var flags: Int32
    public var offset: Int64
    /// The pipe this description is an end of (`kind` pipe or fifo).
    public var pipe: UInt64?
    /// The shared memory object (`kind` memfd).
    public var sharedMemory: UInt64?
    public var identity: FileIdentity?
    /// The `DeletedFileRecord` (`kind` deletedFile).
    public var deletedFile: UInt64?
}

/// The first record of a tree image.
public struct TreeRecord: Codable, Sendable {
    /// The PID the snapshot was asked for (in Stasis's namespace).
    public var root: Int32
    /// The root was the init (PID 1) of a PID namespace of its own, holding just the tree:
    /// restore recreates such a namespace (with its own /proc) by default.
    public var pidNamespace: Bool
    /// Every process, parents before their children, the root first.
    public var members: [TreeMember]
    public var pipes: [PipeRecord]
    public var sharedMemory: [SharedMemoryRecord]
    public var descriptions: [OpenFileDescription]
    /// The directories captured with `--fs` (format 2.1; absent before).
    public var filesystems: [FilesystemSnapshotRecord]?
    /// Files that were open but already deleted (format 2.1; absent before).
    public var deletedFiles: [DeletedFileRecord]?

    /// The members that have a process section (every one but the zombies), in image order.
    public var liveMembers: [TreeMember] { members.filter { $0.zombie == nil } }
}

/// What an object-data record holds: part of a pipe's buffered bytes or of a shared memory
/// object, at `offset`. Its payload is a 24-byte binary header (kind u32, reserved u32, object
/// ID u64, offset u64, little-endian) followed by the bytes.
public struct ObjectData: Sendable {
    public enum Kind: UInt32, Sendable {
        case pipe = 1
        case sharedMemory = 2
        case deletedFile = 3
        case embeddedFile = 4
    }

    public var kind: Kind
    public var object: UInt64
    public var offset: UInt64
    public var bytes: ArraySlice<UInt8>

    public static let headerSize = 24
    /// The most data one record carries.
    public static let maxChunk = 1 << 20

    func encoded() -> [UInt8] {
        var payload: [UInt8] = []
        payload.reserveCapacity(Self.headerSize + bytes.count)
        payload.appendLE(kind.rawValue)
        payload.appendLE(UInt32(0))
        payload.appendLE(object)
        payload.appendLE(offset)
        payload.append(contentsOf: bytes)
        return payload
    }

    static func decode(_ payload: [UInt8]) -> ObjectData? {
        guard payload.count >= headerSize, let kind = Kind(rawValue: payload.readLE(UInt32.self, at: 0)) else { return nil }
        return ObjectData(kind: kind, object: payload.readLE(UInt64.self, at: 8), offset: payload.readLE(UInt64.self, at: 16),
                          bytes: payload[headerSize...])
    }
}

/// Marks where the page blocks of one process begin: every page block up to the next such
/// record belongs to the process with this PID (as in its process record).
public struct ProcessPagesRecord: Codable, Sendable {
    public var pid: Int32
}

/// How the contents of a directory named with `snapshot --fs` were kept.
public enum FilesystemMechanism: String, Codable, Sendable {
    /// A read-only btrfs snapshot of the subvolume (constant time).
    case btrfsSnapshot
    /// A copy whose files share their extents with the originals (FICLONE), on xfs or btrfs.
    case reflink
    /// A plain copy of every byte (time grows with the data).
    case copy
}

/// One directory whose contents belong to a snapshot, kept at the instant of the freeze.
public struct FilesystemSnapshotRecord: Codable, Sendable, Equatable {
    /// The filesystem snapshot's ID, shared by every directory of one `stasis snapshot`
    /// (`stasis fs list`, `stasis fs drop ID`).
    public var id: String
    /// The directory, as an absolute path without symbolic links.
    public var path: String
    public var mechanism: FilesystemMechanism
    /// Where the kept contents are (on the same filesystem as `path`).
    public var store: String
    /// The filesystem's type (btrfs, xfs, ext4, …).
    public var filesystemType: String
    /// `--fs-embed`: the contents travel in the image (file-entry and object-data records right
    /// after the tree record); `store` was only used while the image was written.
    public var embedded: Bool?
}

/// One entry of an embedded `--fs` directory (`--fs-embed`): a file-entry record. A regular
/// file's bytes follow as object data of kind 4 with `object` = this entry's `sequence`.
public struct FileEntryRecord: Codable, Sendable, Equatable {
    public enum EntryType: String, Codable, Sendable { case directory, file, symlink, fifo }
    /// Which `filesystems` record (index) it belongs to.
    public var directory: Int
    /// Its path relative to that directory.
    public var path: String
    public var type: EntryType
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var accessedNanoseconds: Int64
    public var modifiedNanoseconds: Int64
    public var size: UInt64
    /// A symbolic link's target.
    public var target: String?
    /// Numbers the entries of the image, for the object data of files.
    public var sequence: UInt64
}

/// A regular file that processes of the tree held open after it was deleted (an unlinked temp
/// file still in use). Its data extents follow as object data; restore recreates it as an
/// unnamed file (O_TMPFILE) in the directory it was in (or $TMPDIR, if that is gone).
public struct DeletedFileRecord: Codable, Sendable, Equatable {
    /// An ID unique in the image (the file's inode number at the snapshot).
    public var id: UInt64
    /// Its path before it was deleted.
    public var path: String
    public var size: UInt64
    public var mode: UInt32
    public var storedBytes: UInt64
}
