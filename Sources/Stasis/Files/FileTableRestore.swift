import Glibc

/// Gives a process being rebuilt its file descriptors: each one the open file description
/// `SharedObjects` made for it in Stasis, duplicated in with pidfd_getfd and moved to its
/// number, with its close-on-exec flag. Then the stub's pidfd of Stasis is closed.
///
/// Two batches (`StubExecutor`): every description is pulled in (the kernel picks the lowest
/// free numbers, which may be numbers other fds must get), then each is copied to a number
/// above every recorded one (F_DUPFD gives them in order, as nothing is open up there), the
/// pulled copies closed, each moved to its own number, and the high copies closed.
enum FileTableRestore {
    static func restore(_ table: FileTable, caller: RemoteSyscaller, executor: StubExecutor, scratch: RemoteScratch,
                        objects: SharedObjects, process: RestoredProcess) throws {
        let records = table.descriptors.sorted(by: { $0.fd < $1.fd })
        var pidfd = UInt64(objects.pidfdNumber)
        let highest = UInt64(records.last?.fd ?? 0)
        if records.contains(where: { UInt64($0.fd) == pidfd }) {
            // The pidfd sits where the process had a file of its own: move it out of the way.
            let moved = try caller.call(.fcntl, pidfd, UInt64(F_DUPFD_CLOEXEC), highest + 1, what: "move the pidfd of stasis")
            try caller.call(.close, pidfd)
            pidfd = moved
        }
        var pulls: [StubExecutor.Call] = []
        for record in records {
            let source = try objects.descriptor(for: record, of: process.localPID)
            pulls.append(.init(.pidfdGetfd, pidfd, UInt64(source), 0, what: "pidfd_getfd of fd \(record.fd) (\(record.path))"))
        }
        scratch.reset()
        let pulled: [UInt64]
        do { pulled = try executor.run(pulls) } catch {
            throw StasisError.restoreFailed(pid: process.localPID, step: "reopening its files", reason: "\(error)")
        }
        let high = max(highest, pidfd) + 1
        var moves: [StubExecutor.Call] = []
        for (index, fd) in pulled.enumerated() {
            moves.append(.init(.fcntl, fd, UInt64(F_DUPFD_CLOEXEC), high + UInt64(index), what: "copy fd \(records[index].fd) up"))
        }
        for fd in pulled { moves.append(.init(.close, fd, what: "close a pulled fd")) }
        for (index, record) in records.enumerated() {
            moves.append(.init(.dup3, high + UInt64(index), UInt64(record.fd), record.closeOnExec ? UInt64(O_CLOEXEC) : 0,
                               what: "dup3 onto fd \(record.fd)"))
        }
        for index in records.indices { moves.append(.init(.close, high + UInt64(index), what: "close a copy")) }
        moves.append(.init(.close, pidfd, what: "close the pidfd of stasis"))
        scratch.reset()
        let results = try executor.run(moves)
        for index in records.indices where results[index] != high + UInt64(index) {
            throw StasisError.restoreFailed(pid: process.localPID, step: "placing fd \(records[index].fd)",
                                            reason: "F_DUPFD gave \(results[index]), expected \(high + UInt64(index))")
        }
    }
}
