import CStasis
import Glibc

/// Copies a directory tree, keeping each entry's type, mode, owner and timestamps: regular files
/// as reflinks (FICLONE: the copy shares the original's extents, constant time per file) when
/// the filesystem allows it, by `copy_file_range` otherwise; directories, symbolic links and
/// FIFOs are recreated. Hard links become separate files.
///
/// Guarantees: either the whole tree is copied or an error names the entry that could not be.
/// Sockets and device nodes are refused (they cannot be kept as data).
final class DirectoryCopier {
    /// Whether to try FICLONE first; cleared at the first file the filesystem refuses it for.
    private(set) var reflink: Bool
    /// Top-level names of the source not to copy (the store, when it lies inside the source).
    let skipping: Set<String>
    private(set) var files = 0
    private(set) var bytes: UInt64 = 0

    init(reflink: Bool, skipping: Set<String> = []) {
        self.reflink = reflink
        self.skipping = skipping
    }

    /// Copies the contents of directory `source` into the existing directory `destination`.
    func copyContents(of source: String, into destination: String) throws {
        for name in try Self.entries(of: source) where !skipping.contains(name) {
            try copy(source + "/" + name, to: destination + "/" + name)
        }
        try copyAttributes(from: source, to: destination)
    }

    private func copy(_ source: String, to destination: String) throws {
        var st = stat()
        guard lstat(source, &st) == 0 else { throw SystemCallError(call: "lstat", subject: source, errno: .init(rawValue: errno)) }
        switch st.st_mode & S_IFMT {
        case S_IFDIR:
            guard mkdir(destination, 0o700) == 0 else { throw SystemCallError(call: "mkdir", subject: destination, errno: .init(rawValue: errno)) }
            for name in try Self.entries(of: source) { try copy(source + "/" + name, to: destination + "/" + name) }
            try copyAttributes(from: source, to: destination)
        case S_IFREG:
            try copyFile(source, to: destination, status: st)
        case S_IFLNK:
            let target = try readLink(source)
            guard symlink(target, destination) == 0 else { throw SystemCallError(call: "symlink", subject: destination, errno: .init(rawValue: errno)) }
            _ = lchown(destination, st.st_uid, st.st_gid)
            var times = [st.st_atim, st.st_mtim]
            _ = utimensat(AT_FDCWD, destination, &times, AT_SYMLINK_NOFOLLOW)
        case S_IFIFO:
            guard mkfifo(destination, 0o600) == 0 else { throw SystemCallError(call: "mkfifo", subject: destination, errno: .init(rawValue: errno)) }
            try copyAttributes(from: source, to: destination)
        default:
            throw StasisError.usage("cannot keep \(source): a socket or device node is not data")
        }
    }

    /// One regular file, its attributes set through its fd (no second path lookup).
    private func copyFile(_ source: String, to destination: String, status st: stat) throws {
        let input = try FileHandle.open(source, O_RDONLY | O_CLOEXEC | 0o1000000 /* O_NOATIME: copying must not change what it copies */)
        let output = try FileHandle.open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, permissions: 0o600)
        files += 1
        bytes += UInt64(st.st_size)
        try copyData(input, to: output, source: source, destination: destination)
        guard fchown(output.rawValue, st.st_uid, st.st_gid) == 0 else { throw SystemCallError(call: "fchown", subject: destination, errno: .init(rawValue: errno)) }
        guard fchmod(output.rawValue, st.st_mode & 0o7777) == 0 else { throw SystemCallError(call: "fchmod", subject: destination, errno: .init(rawValue: errno)) }
        var times = [st.st_atim, st.st_mtim]
        guard futimens(output.rawValue, &times) == 0 else { throw SystemCallError(call: "futimens", subject: destination, errno: .init(rawValue: errno)) }
    }

    private func copyData(_ input: FileHandle, to output: FileHandle, source: String, destination: String) throws {
        if reflink {
            let result = stasis_ficlone(output.rawValue, input.rawValue)
            if result == 0 { return }
            if result == -Int(EOPNOTSUPP) || result == -Int(EXDEV) || result == -Int(EINVAL) || result == -Int(ENOTTY) {
                reflink = false  // this filesystem cannot: copy the bytes from now on
            } else {
                _ = try checked(result, "ioctl(FICLONE)", "\(source) -> \(destination)")
            }
        }
        while true {
            let copied = try checked(stasis_copy_file_range(input.rawValue, output.rawValue, 1 << 30), "copy_file_range", "\(source) -> \(destination)")
            if copied == 0 { break }
        }
    }

    /// Mode, owner and timestamps of `source` onto `destination` (which is not a symbolic link).
    private func copyAttributes(from source: String, to destination: String) throws {
        var st = stat()
        guard lstat(source, &st) == 0 else { throw SystemCallError(call: "lstat", subject: source, errno: .init(rawValue: errno)) }
        guard chown(destination, st.st_uid, st.st_gid) == 0 else { throw SystemCallError(call: "chown", subject: destination, errno: .init(rawValue: errno)) }
        guard chmod(destination, st.st_mode & 0o7777) == 0 else { throw SystemCallError(call: "chmod", subject: destination, errno: .init(rawValue: errno)) }
        var times = [st.st_atim, st.st_mtim]
        guard utimensat(AT_FDCWD, destination, &times, 0) == 0 else { throw SystemCallError(call: "utimensat", subject: destination, errno: .init(rawValue: errno)) }
    }

    /// The names in a directory, without "." and "..".
    static func entries(of directory: String) throws -> [String] {
        guard let dir = opendir(directory) else { throw SystemCallError(call: "opendir", subject: directory, errno: .init(rawValue: errno)) }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// Removes everything inside `directory` (not the directory itself), but `skipping` at its top.
    static func removeContents(of directory: String, skipping: Set<String> = []) throws {
        for name in try entries(of: directory) where !skipping.contains(name) { try removeTree(directory + "/" + name) }
    }

    static func removeTree(_ path: String) throws {
        var st = stat()
        guard lstat(path, &st) == 0 else {
            if errno == ENOENT { return }
            throw SystemCallError(call: "lstat", subject: path, errno: .init(rawValue: errno))
        }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            for name in try entries(of: path) { try removeTree(path + "/" + name) }
            guard rmdir(path) == 0 else { throw SystemCallError(call: "rmdir", subject: path, errno: .init(rawValue: errno)) }
        } else {
            guard unlink(path) == 0 else { throw SystemCallError(call: "unlink", subject: path, errno: .init(rawValue: errno)) }
        }
    }
}
