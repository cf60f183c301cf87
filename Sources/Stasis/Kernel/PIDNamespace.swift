import Glibc

/// Which PID namespace a tree lives in, as far as a snapshot cares.
///
/// Stasis snapshots a tree either in its own PID namespace (the root and every process shown
/// with the same PIDs as Stasis sees them) or as the whole of a child namespace whose init is
/// the root (`stasis run --pidns`). Anything else — a root deeper in a namespace it does not
/// lead, a process of the tree in yet another namespace — is refused, naming the PID.
enum TreeNamespace {
    /// The identity of a process's PID namespace ("pid:[4026531836]").
    static func of(_ pid: pid_t) -> String? { try? readLink("/proc/\(pid)/ns/pid") }

    /// Whether `root` is the init of a PID namespace below Stasis's own (true), or in Stasis's
    /// namespace (false); refuses anything else.
    static func isOwnNamespace(root: pid_t) throws -> Bool {
        guard let ours = of(getpid()), let theirs = of(root) else { throw StasisError.noSuchProcess(pid: root) }
        if ours == theirs { return false }
        let ids = namespacePIDs(root)
        let depth = namespacePIDs(getpid()).count
        guard ids.count == depth + 1 else {
            throw StasisError.unsupported(pid: root, what: "it is in a PID namespace nested \(ids.count - depth) levels below Stasis's")
        }
        guard ids.last == 1 else {
            throw StasisError.unsupported(pid: root, what: "it is PID \(ids.last ?? 0) of a PID namespace whose init is not part of the tree; snapshot the namespace's init instead")
        }
        return true
    }

    /// Every frozen process must be in the root's namespace.
    static func checkMembers(_ tree: FrozenTree, pidNamespace: Bool) throws {
        let expected = of(tree.root)
        for member in tree.members where member.zombie == nil {
            guard of(member.pid) == expected else {
                throw StasisError.unsupported(pid: member.pid, what: "it is in another PID namespace than the tree's root \(tree.root)")
            }
            if pidNamespace && member.namespacePID == nil {
                throw StasisError.unsupported(pid: member.pid, what: "its PID inside the tree's namespace is not known")
            }
        }
    }

    /// How many PID namespaces Stasis itself is nested in (1 for the initial one).
    static let ownDepth = namespacePIDs(getpid()).count

    /// `pid`'s PID inside its own namespace, when that is below Stasis's.
    static func namespacePID(_ pid: pid_t) -> Int32? {
        let ids = namespacePIDs(pid)
        return ids.count > ownDepth ? ids.last : nil
    }

    /// The NSpid line of /proc/PID/status: the PID in each namespace from the outermost in.
    static func namespacePIDs(_ pid: pid_t) -> [Int32] {
        let status = (try? ProcFS.status("/proc/\(pid)/status")) ?? [:]
        return (status["NSpid"] ?? "").split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { Int32($0) }
    }

    /// The TIDs of `pid`'s threads inside its own namespace, by TID in Stasis's namespace.
    static func namespaceTIDs(_ pid: pid_t, threads: [pid_t]) -> [pid_t: Int32] {
        var result: [pid_t: Int32] = [:]
        for tid in threads {
            let status = (try? ProcFS.status("/proc/\(pid)/task/\(tid)/status")) ?? [:]
            let ids = (status["NSpid"] ?? "").split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { Int32($0) }
            if ids.count > ownDepth, let last = ids.last { result[tid] = last }
        }
        return result
    }
}
