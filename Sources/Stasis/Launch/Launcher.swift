import CStasis
import Glibc

/// Starts workloads the way `stasis run` does: detached, in a cgroup of its own, as the leader
/// of a new session (with `pidNamespace`, as PID 1 of new PID and mount namespaces), with stdio
/// on /dev/null unless files are named.
///
/// Guarantees: when `launch` returns, the program has been exec'd (a missing or non-executable
/// program is an error, not a PID), it runs in its cgroup from its first instruction, and it
/// holds no file descriptor of Stasis' beyond 0, 1 and 2.
public enum Launcher {
    public struct Options: Sendable {
        public var standardInput: String?
        public var standardOutput: String?
        public var standardError: String?
        public var useCgroup = true
        /// Start the command as PID 1 of new PID and mount namespaces (with a /proc of its own),
        /// so that its whole tree can be restored into fresh namespaces, several times at once.
        public var pidNamespace = false

        public init(standardInput: String? = nil, standardOutput: String? = nil, standardError: String? = nil,
                    useCgroup: Bool = true, pidNamespace: Bool = false) {
            self.standardInput = standardInput
            self.standardOutput = standardOutput
            self.standardError = standardError
            self.useCgroup = useCgroup
            self.pidNamespace = pidNamespace
        }
    }

    public static func launch(_ command: [String], options: Options = Options()) throws -> (pid: pid_t, cgroup: StasisCgroup?) {
        guard let program = command.first else { throw StasisError.usage("run: no command given") }
        guard let path = resolveExecutable(program) else {
            throw StasisError.usage("run: \(program): command not found")
        }
        let input = try FileHandle.open(options.standardInput ?? "/dev/null", O_RDONLY)
        let output = try FileHandle.open(options.standardOutput ?? "/dev/null", O_WRONLY | O_CREAT | O_APPEND)
        let error = options.standardError == options.standardOutput && options.standardOutput != nil
            ? output : try FileHandle.open(options.standardError ?? "/dev/null", O_WRONLY | O_CREAT | O_APPEND)
        // cgroup2 cannot rename a cgroup, and the PID is known only once the process runs in
        // it: name it after this stasis process, which is unique while it lives.
        let cgroup = options.useCgroup && StasisCgroup.root != nil ? try StasisCgroup.create(prefix: "run-\(getpid())") : nil
        let cgroupHandle = try cgroup?.open()
        let environment = currentEnvironment()
        let result = withCStrings(command) { argv in
            withCStrings(environment) { envp in
                stasis_spawn_detached(path, argv, envp, input.rawValue, output.rawValue, error.rawValue, cgroupHandle?.rawValue ?? -1,
                                      options.pidNamespace ? 1 : 0)
            }
        }
        guard result > 0 else {
            cgroup?.removeIfEmpty()
            throw StasisError.usage("run: cannot start \(path): \(String(cString: strerror(Int32(-result))))")
        }
        let pid = pid_t(result)
        return (pid, cgroup)
    }

    /// The path execve should run for `name`: itself if it has a slash, else the first
    /// executable match on $PATH.
    public static func resolveExecutable(_ name: String) -> String? {
        if name.contains("/") { return access(name, X_OK) == 0 ? name : nil }
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/local/bin:/usr/bin:/bin"
        for directory in path.split(separator: ":") {
            let candidate = "\(directory)/\(name)"
            var st = stat()
            let found: Int32 = stat(candidate, &st)
            if found == 0 && (st.st_mode & S_IFMT) == S_IFREG && access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    static func currentEnvironment() -> [String] {
        var result: [String] = []
        var pointer = environ
        while let entry = pointer.pointee {
            result.append(String(cString: entry))
            pointer += 1
        }
        return result
    }
}

/// Calls `body` with a NULL-terminated C array of the strings.
func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
    var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
    pointers.append(nil)
    defer { for pointer in pointers { free(pointer) } }
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}
