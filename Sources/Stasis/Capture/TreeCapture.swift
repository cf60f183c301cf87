import CStasis
import Glibc

/// Contents of a tree's shared objects, read during the freeze and held until streamed.
struct SharedObjectContents {
    var pipes: [(record: PipeRecord, bytes: [UInt8])] = []
    /// Each shared memory object's data extents (holes are not stored).
    var sharedMemory: [(record: SharedMemoryRecord, extents: [(offset: UInt64, bytes: [UInt8])])] = []
    /// Each deleted-but-open file's data extents.
    var deletedFiles: [(record: DeletedFileRecord, extents: [(offset: UInt64, bytes: [UInt8])])] = []

    var byteCount: Int {
        pipes.reduce(0) { $0 + $1.bytes.count } + sharedMemory.reduce(0) { $0 + $1.extents.reduce(0) { $0 + $1.bytes.count } }
            + deletedFiles.reduce(0) { $0 + $1.extents.reduce(0) { $0 + $1.bytes.count } }
    }

    /// Writes every object's data as object-data records of at most `ObjectData.maxChunk` bytes.
    func write(to writer: ImageWriter) throws {
        func chunks(_ kind: ObjectData.Kind, _ object: UInt64, _ offset: UInt64, _ bytes: [UInt8]) throws {
            var start = 0
            while start < bytes.count {
                let end = min(bytes.count, start + ObjectData.maxChunk)
                try writer.writeBinaryRecord(.objectData, ObjectData(kind: kind, object: object, offset: offset + UInt64(start),
                                                                      bytes: bytes[start..<end]).encoded())
                start = end
            }
        }
        for pipe in pipes { try chunks(.pipe, pipe.record.id, 0, pipe.bytes) }
        for object in sharedMemory {
            for extent in object.extents { try chunks(.sharedMemory, object.record.id, extent.offset, extent.bytes) }
        }
        for file in deletedFiles {
            for extent in file.extents { try chunks(.deletedFile, file.record.id, extent.offset, extent.bytes) }
        }
    }
}

/// What makes a set of processes a tree rather than a list: the open file descriptions they
/// share, the pipes between them with the bytes in flight, the shared memory they map, and the
/// session and process-group structure restore must rebuild.
///
/// Guarantees: runs while every process of the tree is frozen, so the pipes' buffered bytes
/// and shared memory are those of the same instant as every process's registers and memory
/// (nothing in flight is lost or counted twice). Reads consume nothing: pipe contents are
/// copied with tee(2) and shared memory through /proc/PID/map_files, without faulting pages in.
/// Refuses, naming the PID, what restore could not rebuild.
enum TreeCapture {
    /// Links every fd record of `states` to an open file description, and reads the pipes and
    /// shared memory objects; returns the tree record and the objects' contents.
    static func capture(_ tree: FrozenTree, states: inout [CapturedState], pidNamespace: Bool) throws
        -> (TreeRecord, SharedObjectContents) {
        try checkSessionsAndGroups(tree.members)
        let descriptions = try linkDescriptions(&states)
        var contents = SharedObjectContents()
        var pipesSeen = Set<UInt64>()
        for description in descriptions.list {
            guard let pipe = description.pipe, pipesSeen.insert(pipe).inserted,
                  let holder = descriptions.holders[description.id] else { continue }
            contents.pipes.append(try readPipe(description, pid: holder.pid, fd: holder.fd))
        }
        contents.sharedMemory = try readSharedMemory(states, descriptions: descriptions)
        for description in descriptions.list where description.kind == .deletedFile {
            guard let holder = descriptions.holders[description.id], let id = description.deletedFile,
                  !contents.deletedFiles.contains(where: { $0.record.id == id }) else { continue }
            let path = "/proc/\(holder.pid)/fd/\(holder.fd)"
            let handle: FileHandle
            do { handle = try FileHandle.open(path, O_RDONLY) } catch {
                throw StasisError.unsupported(pid: holder.pid, what: "fd \(holder.fd), the deleted file \(description.path), cannot be read: \(error)")
            }
            let st = try handle.status()
            let extents = try readExtents(handle, size: UInt64(st.st_size))
            contents.deletedFiles.append((DeletedFileRecord(id: id, path: description.path, size: UInt64(st.st_size), mode: UInt32(st.st_mode & 0o7777),
                                                            storedBytes: extents.reduce(0) { $0 + UInt64($1.bytes.count) }), extents))
        }
        var record = TreeRecord(root: tree.root, pidNamespace: pidNamespace, members: tree.members,
                                pipes: contents.pipes.map(\.record), sharedMemory: contents.sharedMemory.map(\.record),
                                descriptions: descriptions.list)
        record.deletedFiles = contents.deletedFiles.isEmpty ? nil : contents.deletedFiles.map(\.record)
        return (record, contents)
    }

    // MARK: sessions and process groups

    /// Restore creates each process by a fork of its parent, so a process inherits its parent's
    /// session unless it leads its own, and can join only a process group of its session that
    /// some process of the tree leads (or the root's, when that lies outside the tree).
    static func checkSessionsAndGroups(_ members: [TreeMember]) throws {
        guard let root = members.first else { return }
        let byPID = Dictionary(members.map { ($0.pid, $0) }, uniquingKeysWith: { first, _ in first })
        for member in members.dropFirst() {
            guard let parent = byPID[member.parent] else {
                throw StasisError.unsupported(pid: member.pid, what: "its parent \(member.parent) is not in the tree")
            }
            if member.session != member.pid && member.session != parent.session {
                throw StasisError.unsupported(pid: member.pid, what: "it is in session \(member.session), but neither leads it nor shares it with its parent \(parent.pid); such a session cannot be recreated")
            }
            let group = member.processGroup
            let joinsOutsideGroup = group == root.processGroup && root.processGroup != root.pid
            if group != member.pid && !joinsOutsideGroup {
                guard let leader = byPID[group], leader.processGroup == group else {
                    throw StasisError.unsupported(pid: member.pid, what: "its process group \(group) has no leader in the tree")
                }
                if leader.session != member.session {
                    throw StasisError.unsupported(pid: member.pid, what: "its process group \(group) belongs to another session")
                }
            }
        }
    }

    // MARK: open file descriptions

    struct Descriptions {
        var list: [OpenFileDescription] = []
        /// One (pid, fd) holding each description, to read it through.
        var holders: [Int: (pid: pid_t, fd: Int32)] = [:]
    }

    /// Groups the fds of all processes that refer to the same file (device and inode), then
    /// asks the kernel (kcmp) which of them are the same open file description.
    static func linkDescriptions(_ states: inout [CapturedState]) throws -> Descriptions {
        var result = Descriptions()
        struct Holder { var state: Int; var record: Int; var pid: pid_t; var fd: Int32 }
        var byFile: [String: [(holder: Holder, description: Int)]] = [:]
        for stateIndex in states.indices {
            let pid = states[stateIndex].process.pid
            for recordIndex in states[stateIndex].files.descriptors.indices {
                let record = states[stateIndex].files.descriptors[recordIndex]
                let key = record.identity.map { "\($0.device):\($0.inode)" } ?? "fd \(pid):\(record.fd)"
                let holder = Holder(state: stateIndex, record: recordIndex, pid: pid, fd: record.fd)
                var found: Int?
                for candidate in byFile[key] ?? [] where stasis_kcmp_files(candidate.holder.pid, pid, candidate.holder.fd, record.fd) == 0 {
                    found = candidate.description
                    break
                }
                let id: Int
                if let found {
                    id = found
                } else {
                    id = result.list.count
                    let pipeID = record.kind == .pipe || record.kind == .fifo ? record.identity?.inode : nil
                    result.list.append(OpenFileDescription(
                        id: id, kind: record.kind, path: record.path, flags: record.flags, offset: record.offset,
                        pipe: pipeID, sharedMemory: record.kind == .memfd ? record.identity?.inode : nil,
                        identity: record.kind == .regular ? record.identity : nil,
                        deletedFile: record.kind == .deletedFile ? record.identity?.inode : nil))
                    result.holders[id] = (pid, record.fd)
                    byFile[key, default: []].append((holder, id))
                }
                states[stateIndex].files.descriptors[recordIndex].description = id
            }
        }
        return result
    }

    // MARK: pipes

    /// The bytes buffered in the pipe behind `description`, copied with tee(2) into a pipe of
    /// Stasis's own through a new read-only open of /proc/PID/fd/FD (whichever end that fd is).
    static func readPipe(_ description: OpenFileDescription, pid: pid_t, fd: Int32) throws -> (record: PipeRecord, bytes: [UInt8]) {
        let path = "/proc/\(pid)/fd/\(fd)"
        let source = try FileHandle.open(path, O_RDONLY | O_NONBLOCK)
        let capacity = Int32(try checked(stasis_fcntl(source.rawValue, 1032 /* F_GETPIPE_SZ */, 0), "fcntl(F_GETPIPE_SZ)", path))
        var buffered: Int32 = 0
        _ = try checked(stasis_ioctl(source.rawValue, UInt(FIONREAD), &buffered), "ioctl(FIONREAD)", path)
        var bytes: [UInt8] = []
        if buffered > 0 {
            var ends: [Int32] = [0, 0]
            _ = try checked(stasis_pipe2(&ends, O_CLOEXEC | O_NONBLOCK), "pipe2", "a copy of \(path)")
            let copyRead = FileHandle(adopting: .init(rawValue: ends[0]), name: "pipe copy")
            let copyWrite = FileHandle(adopting: .init(rawValue: ends[1]), name: "pipe copy")
            _ = stasis_fcntl(copyWrite.rawValue, 1031 /* F_SETPIPE_SZ */, Int(max(capacity, buffered)))
            let copied = try checked(stasis_tee(source.rawValue, copyWrite.rawValue, Int(buffered), 2 /* SPLICE_F_NONBLOCK */),
                                     "tee", path)
            guard copied == Int(buffered) else {
                throw StasisError.unsupported(pid: pid, what: "fd \(fd) (\(description.path)): only \(copied) of its \(buffered) buffered bytes could be copied")
            }
            bytes = [UInt8](repeating: 0, count: copied)
            let got = try bytes.withUnsafeMutableBytes { try copyRead.readFully(into: $0.baseAddress!, count: copied) }
            guard got == copied else {
                throw StasisError.unsupported(pid: pid, what: "fd \(fd) (\(description.path)): read \(got) of \(copied) copied bytes")
            }
        }
        let record = PipeRecord(id: description.pipe!, fifoPath: description.kind == .fifo ? description.path : nil,
                                capacity: capacity, bufferedBytes: UInt64(bytes.count))
        return (record, bytes)
    }

    // MARK: shared memory and deleted files

    /// The data extents of an open file (`SEEK_DATA`/`SEEK_HOLE`), read with `pread`; holes are
    /// not read, so no page of a shmem object is faulted in.
    static func readExtents(_ handle: FileHandle, size: UInt64) throws -> [(offset: UInt64, bytes: [UInt8])] {
        var extents: [(offset: UInt64, bytes: [UInt8])] = []
        var cursor: Int64 = 0
        while UInt64(cursor) < size {
            let dataStart = Int64(lseek(handle.rawValue, Int(cursor), 3 /* SEEK_DATA */))
            if dataStart < 0 { break }  // ENXIO: no data after cursor
            let holeStart = min(Int64(size), max(dataStart, Int64(lseek(handle.rawValue, Int(dataStart), 4 /* SEEK_HOLE */))))
            var bytes = [UInt8](repeating: 0, count: Int(holeStart - dataStart))
            var done = 0
            while done < bytes.count {
                let got = try bytes.withUnsafeMutableBytes {
                    try handle.pread(into: $0.baseAddress! + done, count: $0.count - done, offset: UInt64(dataStart) + UInt64(done))
                }
                if got == 0 { break }
                done += got
            }
            extents.append((UInt64(dataStart), Array(bytes[0..<done])))
            cursor = holeStart
        }
        return extents
    }

    /// Reads every shared memory object mapped or held open in the tree, once each, through
    /// the first mapping or fd found: the extents that hold data (SEEK_DATA/SEEK_HOLE).
    static func readSharedMemory(_ states: [CapturedState], descriptions: Descriptions)
        throws -> [(record: SharedMemoryRecord, extents: [(offset: UInt64, bytes: [UInt8])])] {
        var sources: [(id: UInt64, path: String, name: String, pid: pid_t)] = []
        var seen = Set<UInt64>()
        for state in states {
            for mapping in state.mappings where mapping.backing == .sharedMemory {
                guard let id = mapping.sharedMemory, seen.insert(id).inserted else { continue }
                sources.append((id, "/proc/\(state.process.pid)/map_files/\(String(mapping.start, radix: 16))-\(String(mapping.end, radix: 16))",
                                mapping.name, state.process.pid))
            }
        }
        for description in descriptions.list where description.kind == .memfd {
            guard let id = description.sharedMemory, seen.insert(id).inserted, let holder = descriptions.holders[description.id] else { continue }
            sources.append((id, "/proc/\(holder.pid)/fd/\(holder.fd)", description.path, holder.pid))
        }
        return try sources.map { source in
            let handle: FileHandle
            do { handle = try FileHandle.open(source.path, O_RDONLY) } catch {
                throw StasisError.unsupported(pid: source.pid, what: "shared memory \(source.name) cannot be read: \(error)")
            }
            let size = UInt64(try handle.status().st_size)
            let extents = try readExtents(handle, size: size)
            let kind: SharedMemoryKind = source.name.hasPrefix("/memfd:") ? .memfd : .anonymous
            var name = ""
            if kind == .memfd {
                name = String(source.name.dropFirst("/memfd:".count))
                if name.hasSuffix(" (deleted)") { name = String(name.dropLast(" (deleted)".count)) }
            }
            let record = SharedMemoryRecord(id: source.id, kind: kind, name: name, size: size,
                                            storedBytes: extents.reduce(0) { $0 + UInt64($1.bytes.count) })
            return (record, extents)
        }
    }
}
