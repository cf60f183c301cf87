import Glibc

/// Refuses a tree that holds an end of a pipe some process outside the tree also holds (a
/// workload whose output goes through `| tee` to a shell, say): a restore would give the tree a
/// new pipe that nobody outside holds, silently cutting that connection.
///
/// Checked before the freeze, from /proc: every fd of every process on the system is looked at
/// only when the tree has a pipe at all.
enum PipeOwnership {
    static func checkNoOutsideHolders(tree: [pid_t]) throws {
        var pipes: [String: (pid: pid_t, fd: Int32)] = [:]
        for pid in tree {
            for fd in (try? ProcFS.fileDescriptors(pid)) ?? [] {
                if let link = try? readLink("/proc/\(pid)/fd/\(fd)"), link.hasPrefix("pipe:["), pipes[link] == nil { pipes[link] = (pid, fd) }
            }
        }
        if pipes.isEmpty { return }
        let members = Set(tree)
        for other in allProcesses() where !members.contains(other) && other != getpid() {
            for fd in (try? ProcFS.fileDescriptors(other)) ?? [] {
                guard let link = try? readLink("/proc/\(other)/fd/\(fd)"), let holder = pipes[link] else { continue }
                throw StasisError.unsupported(pid: holder.pid, what: "fd \(holder.fd) is \(link), which PID \(other) outside the tree also holds (its fd \(fd)); snapshot a tree that holds both ends")
            }
        }
    }

    /// The PIDs under /proc.
    static func allProcesses() -> [pid_t] {
        guard let dir = opendir("/proc") else { return [] }
        defer { closedir(dir) }
        var result: [pid_t] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if let pid = pid_t(name) { result.append(pid) }
        }
        return result
    }
}
