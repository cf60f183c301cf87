import Glibc

/// Why Stasis refused or failed, in words a user can act on. Every case names the process,
/// thread, file descriptor, address or path concerned.
public enum StasisError: Error, CustomStringConvertible, Sendable {
    case noSuchProcess(pid: pid_t)
    case notTraceable(pid: pid_t, reason: String)
    case unsupported(pid: pid_t, what: String)
    case pidTaken(pid: pid_t, by: String)
    case fileChanged(path: String, reason: String)
    case restoreFailed(pid: pid_t, step: String, reason: String)
    case usage(String)
    /// A snapshot was asked to stop (by this signal) and was discarded.
    case cancelled(signal: Int32)
    /// A snapshot failed after the process was frozen; it was discarded and the process runs on.
    case discarded(pid: pid_t, reason: String)

    public var description: String {
        switch self {
        case let .noSuchProcess(pid): "no such process: PID \(pid)"
        case let .notTraceable(pid, reason): "cannot trace PID \(pid): \(reason)"
        case let .unsupported(pid, what): "PID \(pid) uses something Stasis cannot snapshot yet: \(what)"
        case let .pidTaken(pid, by): "cannot restore: PID \(pid) is taken by \(by)"
        case let .fileChanged(path, reason): "cannot restore: \(path) \(reason)"
        case let .restoreFailed(pid, step, reason): "restore of PID \(pid) failed while \(step): \(reason)"
        case let .usage(message): message
        case let .cancelled(signal): "snapshot cancelled by \(signalName(signal)) and discarded; the process runs on as before"
        case let .discarded(pid, reason): "snapshot of PID \(pid) discarded: \(reason); the process runs on as before"
        }
    }
}

/// "SIGTERM" for 15, and so on.
func signalName(_ signal: Int32) -> String {
    let names: [Int32: String] = [SIGHUP: "SIGHUP", SIGINT: "SIGINT", SIGQUIT: "SIGQUIT", SIGKILL: "SIGKILL",
                                  SIGPIPE: "SIGPIPE", SIGTERM: "SIGTERM", SIGUSR1: "SIGUSR1", SIGUSR2: "SIGUSR2"]
    return names[signal] ?? "signal \(signal)"
}
