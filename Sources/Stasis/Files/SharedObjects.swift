import CStasis
import Glibc

/// The kernel objects a restored tree shares, created once in Stasis itself — pipes (with their
/// buffered bytes), FIFOs, shared memory objects (with their contents) and every open file
/// description — and handed to each restored process that had them.
///
/// How a process gets one: every restore stub inherits a pidfd of Stasis (`pidfdNumber`), and
/// an injected pidfd_getfd(2) duplicates Stasis's descriptor into the process. What it gets is
/// the same open file description, so fds that shared one (across fork, dup, or between
/// processes) share its offset and flags again, and a pipe's ends are the same pipe in every
/// process. It works across PID namespaces.
///
/// Guarantees: `close()` (also on deinit) closes everything Stasis holds, so that a pipe end no
/// restored process holds is closed (readers see end-of-file, writers EPIPE, as before).
final class SharedObjects {
    /// Where Stasis's pidfd is in each restore stub.
    let pidfdNumber: Int32
    private let pidfd: FileHandle
    private(set) var sharedMemory: [UInt64: Int32] = [:]
    private var pipes: [UInt64: (read: FileHandle, write: FileHandle)] = [:]
    private var fifoKeepers: [UInt64: FileHandle] = [:]
    private var handles: [FileHandle] = []
    private var descriptions: [Int: Int32] = [:]
    private var deletedFiles: [UInt64: FileHandle] = [:]
    /// Ends of pipes and memfds already given to one description (a second one gets its own).
    private var usedEnds = Set<String>()
    private let tree: TreeRecord

    /// Creates the pipes, FIFO holders and (empty) shared memory objects the tree record lists,
    /// and a pidfd of Stasis to be inherited by the stubs.
    init(tree: TreeRecord) throws {
        self.tree = tree
        let fd = try checked(stasis_pidfd_open(getpid(), 0), "pidfd_open", "stasis \(getpid())")
        pidfd = FileHandle(adopting: .init(rawValue: Int32(fd)), name: "pidfd of stasis")
        pidfdNumber = Int32(fd)
        for pipe in tree.pipes {
            if let path = pipe.fifoPath {
                // Holding the FIFO open for reading and writing keeps its buffer while the
                // restored processes' own opens are made.
                fifoKeepers[pipe.id] = try FileHandle.open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC)
                continue
            }
            var ends: [Int32] = [0, 0]
            _ = try checked(stasis_pipe2(&ends, O_CLOEXEC), "pipe2", "pipe:[\(pipe.id)]")
            let read = FileHandle(adopting: .init(rawValue: ends[0]), name: "pipe:[\(pipe.id)]")
            let write = FileHandle(adopting: .init(rawValue: ends[1]), name: "pipe:[\(pipe.id)]")
            if pipe.capacity > 0 { _ = stasis_fcntl(write.rawValue, 1031 /* F_SETPIPE_SZ */, Int(pipe.capacity)) }
            pipes[pipe.id] = (read, write)
        }
        for object in tree.sharedMemory {
            let handle: FileHandle
            switch object.kind {
            case .memfd:
                let fd = try object.name.withCString { try checked(stasis_memfd_create($0, 1 /* MFD_CLOEXEC */), "memfd_create", object.name) }
                handle = FileHandle(adopting: .init(rawValue: Int32(fd)), name: "/memfd:\(object.name)")
                _ = try checked(Int(ftruncate(handle.rawValue, Int(object.size))).negatedErrnoIfFailed(), "ftruncate", handle.name)
            case .anonymous:
                // The same kind of object as mmap(MAP_SHARED|MAP_ANONYMOUS) makes ("/dev/zero
                // (deleted)" in /proc/PID/maps), reached through /proc/self/map_files.
                var address: UInt64 = 0
                let size = max(object.size, 4096)
                _ = try checked(stasis_mmap_shared_anonymous(size, &address), "mmap(MAP_SHARED|MAP_ANONYMOUS)", "\(size) bytes")
                defer { _ = stasis_munmap(address, size) }
                handle = try FileHandle.open("/proc/self/map_files/\(String(address, radix: 16))-\(String(address + size, radix: 16))",
                                             O_RDWR | O_CLOEXEC)
            }
            handles.append(handle)
            sharedMemory[object.id] = handle.rawValue
        }
        for file in tree.deletedFiles ?? [] {
            // Unnamed again, in the directory it was in if that is still there.
            let parent = file.path.contains("/") ? String(file.path[..<file.path.lastIndex(of: "/")!]) : "."
            let directory = pathExists(parent.isEmpty ? "/" : parent) ? (parent.isEmpty ? "/" : parent)
                : (getenv("TMPDIR").map { String(cString: $0) } ?? "/var/tmp")
            let handle = try FileHandle.open(directory, O_RDWR | 0o20200000 /* O_TMPFILE */ | O_CLOEXEC, permissions: mode_t(file.mode))
            _ = try checked(Int(ftruncate(handle.rawValue, Int(file.size))).negatedErrnoIfFailed(), "ftruncate", "the deleted file \(file.path)")
            deletedFiles[file.id] = handle
        }
    }

    deinit { close() }

    /// Puts one object-data record's bytes where they belong.
    func apply(_ data: ObjectData) throws {
        switch data.kind {
        case .pipe:
            guard let target = pipes[data.object]?.write ?? fifoKeepers[data.object] else {
                throw StasisError.usage("image corrupt: data for pipe \(data.object), which the tree record does not list")
            }
            // Non-blocking while it is filled (nobody reads it yet: a pipe too small must fail,
            // not hang); the descriptions handed out later set their own flags.
            let flags = try checked(stasis_fcntl(target.rawValue, F_GETFL, 0), "fcntl(F_GETFL)", target.name)
            _ = try checked(stasis_fcntl(target.rawValue, F_SETFL, flags | Int(O_NONBLOCK)), "fcntl(F_SETFL)", target.name)
            defer { _ = stasis_fcntl(target.rawValue, F_SETFL, flags) }
            do {
                try Array(data.bytes).withUnsafeBytes { try target.writeAll($0.baseAddress!, count: $0.count) }
            } catch {
                throw StasisError.restoreFailed(pid: tree.root, step: "refilling \(target.name) with the \(data.bytes.count) bytes it held at offset \(data.offset)",
                                                reason: "\(error) (a pipe can hold at most /proc/sys/fs/pipe-max-size bytes here)")
            }
        case .embeddedFile:
            throw StasisError.usage("image corrupt: embedded file data after the tree's processes")
        case .deletedFile:
            guard let handle = deletedFiles[data.object] else {
                throw StasisError.usage("image corrupt: data for deleted file \(data.object), which the tree record does not list")
            }
            try write(Array(data.bytes), to: handle.rawValue, at: data.offset, what: "the deleted file \(data.object)")
        case .sharedMemory:
            guard let fd = sharedMemory[data.object] else {
                throw StasisError.usage("image corrupt: data for shared memory \(data.object), which the tree record does not list")
            }
            try write(Array(data.bytes), to: fd, at: data.offset, what: "shared memory \(data.object)")
        }
    }

    private func write(_ bytes: [UInt8], to fd: Int32, at offset: UInt64, what: String) throws {
        var done = 0
        while done < bytes.count {
            let wrote = bytes.withUnsafeBytes { stasis_pwrite(fd, $0.baseAddress! + done, $0.count - done, offset + UInt64(done)) }
            _ = try checked(wrote, "pwrite", "\(what) at \(offset + UInt64(done))")
            done += wrote
        }
    }

    /// Stasis's descriptor for what `record` (an fd of process `pid`) refers to, opened on first use.
    func descriptor(for record: FileDescriptorRecord, of pid: pid_t) throws -> Int32 {
        if let id = record.description, let open = descriptions[id] { return open }
        let description = record.description.flatMap { id in tree.descriptions.first { $0.id == id } }
            ?? OpenFileDescription(id: -1, kind: record.kind, path: record.path, flags: record.flags, offset: record.offset,
                                   pipe: nil, sharedMemory: nil, identity: record.identity)
        let handle: FileHandle
        do { handle = try open(description) } catch {
            throw StasisError.restoreFailed(pid: pid, step: "reopening fd \(record.fd) (\(record.path))", reason: "\(error)")
        }
        handles.append(handle)
        if let id = record.description { descriptions[id] = handle.rawValue }
        return handle.rawValue
    }

    private func open(_ description: OpenFileDescription) throws -> FileHandle {
        let flags = description.flags & ~(O_CREAT | O_EXCL | O_TRUNC | O_NOCTTY)
        switch description.kind {
        case .regular, .devNull:
            let handle = try FileHandle.open(description.kind == .devNull ? "/dev/null" : description.path, flags | O_CLOEXEC)
            if description.kind == .regular {
                _ = try checked(Int(lseek(handle.rawValue, Int(description.offset), SEEK_SET)).negatedErrnoIfFailed(), "lseek", description.path)
            }
            return handle
        case .fifo:
            let handle = try FileHandle.open(description.path, flags | O_NONBLOCK | O_CLOEXEC)
            _ = try checked(stasis_fcntl(handle.rawValue, F_SETFL, Int(flags)), "fcntl(F_SETFL)", description.path)
            return handle
        case .pipe:
            guard let id = description.pipe, let pipe = pipes[id] else {
                throw StasisError.usage("image corrupt: \(description.path) is not among the tree's pipes")
            }
            let end = (flags & O_ACCMODE) == O_WRONLY ? pipe.write : pipe.read
            return try sameObject(end, key: "pipe \(id) \(end.rawValue)", flags: flags)
        case .deletedFile:
            guard let id = description.deletedFile, let file = deletedFiles[id] else {
                throw StasisError.usage("image corrupt: \(description.path) is not among the tree's deleted files")
            }
            let handle = try sameObject(file, key: "deleted \(id)", flags: flags)
            _ = try checked(Int(lseek(handle.rawValue, Int(description.offset), SEEK_SET)).negatedErrnoIfFailed(), "lseek", description.path)
            return handle
        case .memfd:
            guard let id = description.sharedMemory, let fd = sharedMemory[id] else {
                throw StasisError.usage("image corrupt: \(description.path) is not among the tree's shared memory objects")
            }
            let handle = try sameObject(FileHandle(adopting: .init(rawValue: fd), name: description.path, owned: false),
                                        key: "memfd \(id)", flags: flags)
            _ = try checked(Int(lseek(handle.rawValue, Int(description.offset), SEEK_SET)).negatedErrnoIfFailed(), "lseek", description.path)
            return handle
        }
    }

    /// A descriptor of `object` with `flags`: a dup of Stasis's own the first time (the same open
    /// file description), a fresh open of it through /proc/self/fd after that.
    private func sameObject(_ object: FileHandle, key: String, flags: Int32) throws -> FileHandle {
        let handle: FileHandle
        if usedEnds.insert(key).inserted {
            let fd = try checked(stasis_fcntl(object.rawValue, F_DUPFD_CLOEXEC, 0), "fcntl(F_DUPFD_CLOEXEC)", object.name)
            handle = FileHandle(adopting: .init(rawValue: Int32(fd)), name: object.name)
        } else {
            handle = try FileHandle.open("/proc/self/fd/\(object.rawValue)", (flags & O_ACCMODE) | O_NONBLOCK | O_CLOEXEC)
        }
        _ = try checked(stasis_fcntl(handle.rawValue, F_SETFL, Int(flags)), "fcntl(F_SETFL)", object.name)
        return handle
    }

    /// Duplicates Stasis's descriptor `fd` into the process `caller` runs in (pidfd_getfd, which
    /// sets FD_CLOEXEC); returns the new fd number there.
    func pull(_ fd: Int32, into caller: RemoteSyscaller, from pidfdInProcess: Int32? = nil, what: String) throws -> UInt64 {
        try caller.call(.pidfdGetfd, UInt64(pidfdInProcess ?? pidfdNumber), UInt64(fd), 0, what: "pidfd_getfd of \(what)")
    }

    /// Closes everything Stasis holds.
    func close() {
        handles.removeAll()
        pipes.removeAll()
        fifoKeepers.removeAll()
        descriptions.removeAll()
        sharedMemory.removeAll()
        deletedFiles.removeAll()
    }
}
