import CStasis
import Glibc

/// A request to abandon the snapshot in progress, made by a signal (SIGINT, SIGTERM, SIGHUP,
/// or the parent-death signal of the snapshot worker).
///
/// Guarantees: the request is only recorded by the signal handler; the engine observes it at
/// safe points — never between an injected system call and the restoring of the thread's
/// registers — through `check()`, and a write blocked on a full pipe or a slow disk returns
/// (EINTR) to observe it. Process-wide, as signal handlers are.
public enum Cancellation {
    /// Installs the recording handler for each of `signals`, without SA_RESTART.
    public static func installHandlers(for signals: [Int32] = [SIGINT, SIGTERM, SIGHUP]) {
        for signal in signals { _ = stasis_install_cancel_handler(signal) }
    }

    /// Makes cancellation signals interrupt the blocking calls of `tracerThread` (a write to a
    /// full pipe, a slow disk): the thread accepts these signals, and the handler forwards them
    /// to it when they land on another thread.
    public static func interruptBlockingCalls(of tracerThread: TracerThread, signals: [Int32] = [SIGINT, SIGTERM, SIGHUP]) {
        try? tracerThread.perform { _ in
            var set = sigset_t()
            sigemptyset(&set)
            for signal in signals { sigaddset(&set, signal) }
            pthread_sigmask(SIG_UNBLOCK, &set, nil)
            stasis_set_cancel_interrupt_thread(pid_t(stasis_gettid()))
        }
    }

    /// The signal that asked for cancellation, or nil.
    public static var requestedBy: Int32? {
        let signal = stasis_cancel_signal()
        return signal == 0 ? nil : signal
    }

    /// Throws `StasisError.cancelled` once a cancellation was requested.
    public static func check() throws {
        if let signal = requestedBy { throw StasisError.cancelled(signal: signal) }
    }
}

/// Runs a write-like call in the -errno convention, retrying EINTR unless a cancellation was
/// requested meanwhile (then `StasisError.cancelled` is thrown).
@inline(__always)
func retryingInterruptsUnlessCancelled(
    _ call: @autoclosure () -> String, _ subject: @autoclosure () -> String, _ body: () -> Int
) throws -> Int {
    while true {
        let result = body()
        if result == -Int(EINTR) {
            try Cancellation.check()
            continue
        }
        return try checked(result, call(), subject())
    }
}
