import CStasis
import Glibc
import Stasis

/// `stasis snapshot` runs as two processes: the one the user started (the supervisor) and a
/// worker — the same command, re-executed — that traces the workload and writes the image.
///
/// Why: if a tracer dies, the kernel detaches its tracees and lets them run on whatever
/// registers they have at that moment, and a live snapshot's clone would be left as a zombie
/// child of the workload. A SIGKILL of the command must not do that. So the command the user
/// can kill is not the tracer: when the supervisor dies (SIGKILL included), the worker gets
/// SIGTERM (PR_SET_PDEATHSIG), discards the snapshot at the next safe point — registers put
/// back, clone killed and reaped, partial image removed — and exits. SIGINT, SIGTERM and
/// SIGHUP sent to the supervisor are forwarded to the worker, which discards the same way; the
/// supervisor exits with the worker's status.
enum SnapshotWorker {
    static let environmentKey = "STASIS_SNAPSHOT_SUPERVISOR"

    /// The supervisor's PID when this process is the worker.
    static var supervisorPID: pid_t? {
        guard let value = getenv(environmentKey) else { return nil }
        return pid_t(String(cString: value))
    }

    /// Starts the worker with this command's arguments and waits for it; never returns.
    static func superviseWorker() -> Never {
        let arguments = CommandLine.arguments
        let environment = ["\(environmentKey)=\(getpid())"] + currentEnvironment().filter { !$0.hasPrefix(environmentKey + "=") }
        let executable = "/proc/self/exe"
        let child = withCStrings(arguments) { argv in
            withCStrings(environment) { envp in stasis_spawn_plain(executable, argv, envp) }
        }
        if child < 0 {
            FileHandle.standardError.write(line: "stasis: cannot start the snapshot worker: \(String(cString: strerror(Int32(-child))))")
            exit(1)
        }
        _ = stasis_forward_signals_to(pid_t(child))
        // A parent may have started us with these blocked (a thread pool's mask is inherited
        // through posix_spawn); they must reach the handlers.
        var forwarded = sigset_t()
        sigemptyset(&forwarded)
        for signal in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&forwarded, signal) }
        sigprocmask(SIG_UNBLOCK, &forwarded, nil)
        var status: Int32 = 0
        while waitpid(pid_t(child), &status, 0) < 0 && errno == EINTR {}
        if stasis_wifexited(status) != 0 { exit(stasis_wexitstatus(status)) }
        let signal = stasis_wtermsig(status)
        FileHandle.standardError.write(line: "stasis: the snapshot worker \(child) was killed by signal \(signal)")
        exit(128 + signal)
    }

    /// Prepares this process to be the worker: cancellation signals are recorded, and the
    /// supervisor's death turns into a SIGTERM.
    static func becomeWorker(of supervisor: pid_t) {
        Cancellation.installHandlers()
        _ = stasis_prctl(1 /* PR_SET_PDEATHSIG */, UInt64(SIGTERM), 0, 0, 0)
        if getppid() != supervisor { _ = Glibc.kill(getpid(), SIGTERM) }
    }

    private static func currentEnvironment() -> [String] {
        var result: [String] = []
        var cursor = environ
        while let entry = cursor.pointee {
            result.append(String(cString: entry))
            cursor += 1
        }
        return result
    }

    private static func withCStrings<R>(_ strings: [String], _ body: ([UnsafeMutablePointer<CChar>?]) -> R) -> R {
        var pointers = strings.map { strdup($0) }
        pointers.append(nil)
        defer { pointers.forEach { free($0) } }
        return body(pointers)
    }
}
