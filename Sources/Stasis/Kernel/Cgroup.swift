import Glibc

/// A cgroup v2 directory that Stasis made for one workload, under `<cgroup2 mount>/stasis/`.
///
/// Guarantees: `create` makes a new, empty cgroup whose name starts with the given prefix;
/// `removeIfEmpty` deletes it once no process is left in it (and is harmless otherwise).
public struct StasisCgroup: Sendable {
    /// The absolute path of the cgroup directory.
    public let path: String

    /// The cgroup2 mount point, from /proc/self/mountinfo (nil when there is none).
    public static let mountPoint: String? = {
        guard let text = try? readTextFile("/proc/self/mountinfo") else { return nil }
        for line in text.split(separator: "\n") {
            let halves = line.components(separatedBy: " - ")
            guard halves.count == 2, halves[1].hasPrefix("cgroup2 ") else { continue }
            let fields = halves[0].split(separator: " ")
            if fields.count > 4 { return String(fields[4]) }
        }
        return nil
    }()

    /// The parent of every Stasis cgroup.
    public static var root: String? { mountPoint.map { $0 + "/stasis" } }

    public static func create(prefix: String) throws -> StasisCgroup {
        guard let root else {
            throw StasisError.usage("no cgroup2 filesystem is mounted; Stasis needs one to hold its workloads")
        }
        if mkdir(root, 0o755) != 0 && errno != EEXIST {
            throw SystemCallError(call: "mkdir", subject: root, errno: .init(rawValue: errno))
        }
        for attempt in 0..<1000 {
            let path = "\(root)/\(prefix)\(attempt == 0 ? "" : "-\(attempt)")"
            if mkdir(path, 0o755) == 0 { return StasisCgroup(path: path) }
            if errno != EEXIST { throw SystemCallError(call: "mkdir", subject: path, errno: .init(rawValue: errno)) }
            // A leftover from an earlier workload with the same PID: reuse the name if it is empty.
            if rmdir(path) == 0, mkdir(path, 0o755) == 0 { return StasisCgroup(path: path) }
        }
        throw StasisError.usage("could not create a cgroup under \(root)")
    }

    public init(path: String) { self.path = path }

    /// The cgroup directory opened for CLONE_INTO_CGROUP.
    public func open() throws -> FileHandle {
        try FileHandle.open(path, O_RDONLY | O_DIRECTORY)
    }

    /// Deletes the cgroup if it holds no process.
    public func removeIfEmpty() { rmdir(path) }

    /// The Stasis cgroup a process is in, if it is in one.
    public static func of(pid: pid_t) -> StasisCgroup? {
        guard let mount = mountPoint, let text = try? readTextFile("/proc/\(pid)/cgroup") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("0::") {
            let relative = String(line.dropFirst(3))
            if relative.hasPrefix("/stasis/") { return StasisCgroup(path: mount + relative) }
        }
        return nil
    }
}
