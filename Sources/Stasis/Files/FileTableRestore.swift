import Glibc

/// Gives a process being rebuilt its file descriptors: each one the open file description
/// `SharedObjects` made for it in Stasis, duplicated in with pidfd_getfd and moved to its
/// number, with its close-on-exec flag. Then the stub's pidfd of Stasis is closed.
enum FileTableRestore {
    static func restore(_ table: FileTable, caller: RemoteSyscaller, objects: SharedObjects, process: RestoredProcess) throws {
        let records = table.descriptors.sorted(by: { $0.fd < $1.fd })
        var pidfd = UInt64(objects.pidfdNumber)
        if let highest = records.last?.fd, records.contains(where: { UInt64($0.fd) == pidfd }) {
            // The pidfd sits where the process had a file of its own: move it out of the way.
            let moved = try caller.call(.fcntl, pidfd, UInt64(F_DUPFD_CLOEXEC), UInt64(highest) + 1, what: "move the pidfd of stasis")
            try caller.call(.close, pidfd)
            pidfd = moved
        }
        for record in records {
            let source = try objects.descriptor(for: record, of: process.localPID)
            let pulled: UInt64
            do {
                pulled = try objects.pull(source, into: caller, from: Int32(pidfd), what: "fd \(record.fd) (\(record.path))")
            } catch {
                throw StasisError.restoreFailed(pid: process.localPID, step: "reopening fd \(record.fd) (\(record.path))", reason: "\(error)")
            }
            if pulled != UInt64(record.fd) {
                try caller.call(.dup3, pulled, UInt64(record.fd), record.closeOnExec ? UInt64(O_CLOEXEC) : 0, what: "dup3 onto fd \(record.fd)")
                try caller.call(.close, pulled)
            } else if !record.closeOnExec {
                try caller.call(.fcntl, pulled, UInt64(F_SETFD), 0, what: "clear close-on-exec of fd \(record.fd)")
            }
        }
        try caller.call(.close, pidfd, what: "close the pidfd of stasis")
    }
}
