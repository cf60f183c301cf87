import CStasis
import Glibc
import SystemPackage

/// A system call that failed: which call, on what (PID, TID, fd, address, path), and the
/// kernel's reason. This is the only place errno values surface; everything above the kernel
/// layer sees `SystemCallError` or `StasisError`.
public struct SystemCallError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The call, e.g. `ptrace(PTRACE_SEIZE)` or `openat`.
    public let call: String
    /// What it was applied to, e.g. `tid 4243` or `/proc/4242/maps`.
    public let subject: String
    /// The kernel's reason.
    public let errno: Errno

    public init(call: String, subject: String, errno: Errno) {
        self.call = call
        self.subject = subject
        self.errno = errno
    }

    public var description: String { "\(call) on \(subject) failed: \(errno)" }
}

/// Checks a result in the CStasis -errno convention: non-negative is success.
@inline(__always)
func checked(
    _ result: Int, _ call: @autoclosure () -> String, _ subject: @autoclosure () -> String
) throws -> Int {
    if result >= 0 { return result }
    throw SystemCallError(call: call(), subject: subject(), errno: Errno(rawValue: Int32(-result)))
}

/// Runs a call in the -errno convention, retrying while it is interrupted by a signal.
@inline(__always)
func retryingInterrupts(
    _ call: @autoclosure () -> String, _ subject: @autoclosure () -> String, _ body: () -> Int
) throws -> Int {
    while true {
        let result = body()
        if result == -Int(EINTR) { continue }
        return try checked(result, call(), subject())
    }
}
