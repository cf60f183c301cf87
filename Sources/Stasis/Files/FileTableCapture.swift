import Glibc

/// Reads a process's file descriptor table from /proc/PID/fd and /proc/PID/fdinfo.
///
/// Supported: regular files (path, open flags, offset, O_APPEND, close-on-exec), /dev/null, ends
/// of pipes, FIFOs and memfds (whose contents `TreeCapture` reads). Every record carries the
/// file's identity (device and inode), by which `TreeCapture` finds the fds that share one open
/// file description. Anything else is refused with the PID, the fd number and what it is.
enum FileTableCapture {
    static func capture(pid: pid_t) throws -> FileTable {
        var descriptors: [FileDescriptorRecord] = []
        let fds: [Int32]
        do { fds = try ProcFS.fileDescriptors(pid) } catch { throw StasisError.noSuchProcess(pid: pid) }
        for fd in fds {
            let link = "/proc/\(pid)/fd/\(fd)"
            guard let target = try? readLink(link), let st = try? statPath(link),
                  let info = try? ProcFS.fdInfo(pid, fd)
            else { continue }  // closed meanwhile
            let rawFlags = Int32(info["flags"] ?? "0", radix: 8) ?? 0
            let offset = Int64(info["pos"] ?? "0") ?? 0
            let kind: FileKind
            if target.hasPrefix("pipe:[") && (st.st_mode & S_IFMT) == S_IFIFO {
                kind = .pipe
            } else if !target.hasPrefix("/") {
                throw StasisError.unsupported(pid: pid, what: "fd \(fd) is \(describe(st, target)) (\(target))")
            } else {
            switch st.st_mode & S_IFMT {
            case S_IFREG where target.hasPrefix("/memfd:") && target.hasSuffix(" (deleted)"):
                kind = .memfd
            case S_IFIFO:
                if target.hasSuffix(" (deleted)") {
                    throw StasisError.unsupported(pid: pid, what: "fd \(fd) is a FIFO that was deleted (\(target))")
                }
                kind = .fifo
            case S_IFREG where target.hasSuffix(" (deleted)"):
                kind = .deletedFile
            case S_IFREG:
                kind = .regular
            case S_IFCHR where target == "/dev/null":
                kind = .devNull
            default:
                throw StasisError.unsupported(pid: pid, what: "fd \(fd) is \(describe(st, target)) (\(target))")
            }
            }
            let path = kind == .deletedFile ? String(target.dropLast(" (deleted)".count)) : target
            descriptors.append(FileDescriptorRecord(
                fd: fd, kind: kind, path: path, flags: rawFlags & ~O_CLOEXEC, closeOnExec: rawFlags & O_CLOEXEC != 0,
                offset: offset,
                identity: FileIdentity(
                    device: UInt64(st.st_dev), inode: UInt64(st.st_ino), size: Int64(st.st_size),
                    modifiedNanoseconds: Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec))))
        }
        return FileTable(descriptors: descriptors)
    }

    static func describe(_ st: stat, _ target: String) -> String {
        switch st.st_mode & S_IFMT {
        case S_IFSOCK: return "a socket"
        case S_IFIFO: return "a pipe"
        case S_IFCHR: return target.hasPrefix("/dev/pts") || target.hasPrefix("/dev/tty") ? "a terminal" : "a character device"
        case S_IFBLK: return "a block device"
        case S_IFDIR: return "a directory"
        default:
            if target.hasPrefix("anon_inode:") { return "an anonymous inode (\(target.dropFirst(11)))" }
            return "an unsupported kind of file"
        }
    }
}
