import Glibc

/// Reopens a process's file descriptors inside the process being rebuilt: each regular file
/// by path with its original flags, at its original offset and fd number; /dev/null likewise.
enum FileTableRestore {
    static func restore(_ table: FileTable, caller: RemoteSyscaller, scratch: RemoteScratch, pid: pid_t) throws {
        for record in table.descriptors.sorted(by: { $0.fd < $1.fd }) {
            let path: String
            switch record.kind {
            case .regular: path = record.path
            case .devNull: path = "/dev/null"
            }
            scratch.reset()
            let pathAddress = try scratch.place(cString: path)
            let flags = (record.flags & ~(O_CREAT | O_EXCL | O_TRUNC | O_NOCTTY)) | (record.closeOnExec ? O_CLOEXEC : 0)
            let opened: UInt64
            do {
                opened = try caller.call(.open, pathAddress, UInt64(UInt32(bitPattern: flags)), 0, what: "reopen fd \(record.fd) \(path)")
            } catch {
                throw StasisError.restoreFailed(pid: pid, step: "reopening fd \(record.fd) (\(path))", reason: "\(error)")
            }
            if opened != UInt64(record.fd) {
                try caller.call(.dup3, opened, UInt64(record.fd), record.closeOnExec ? UInt64(O_CLOEXEC) : 0, what: "dup3 onto fd \(record.fd)")
                try caller.call(.close, opened)
            }
            if record.kind == .regular {
                try caller.call(.lseek, UInt64(record.fd), UInt64(bitPattern: record.offset), UInt64(SEEK_SET), what: "seek fd \(record.fd)")
            }
        }
    }
}
