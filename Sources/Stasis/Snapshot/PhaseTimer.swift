import Glibc

/// Accumulates how long named phases take, for `STASIS_PROFILE=1` (printed to stderr by the
/// CLI when the command ends). Costs one clock read per phase when enabled, nothing otherwise.
public enum PhaseTimer {
    nonisolated(unsafe) static var totals: [String: (nanoseconds: UInt64, count: Int)] = [:]
    public static let enabled = getenv("STASIS_PROFILE") != nil

    /// Runs `body`, adding its duration to `phase`.
    @inline(__always)
    static func measure<T>(_ phase: String, _ body: () throws -> T) rethrows -> T {
        guard enabled else { return try body() }
        let start = monotonicNanoseconds()
        defer {
            let spent = monotonicNanoseconds() - start
            let old = totals[phase] ?? (0, 0)
            totals[phase] = (old.nanoseconds + spent, old.count + 1)
        }
        return try body()
    }

    /// Adds the time since `start` (from `now()`) to `phase`.
    static func add(_ phase: String, since start: UInt64) {
        guard enabled else { return }
        let spent = monotonicNanoseconds() - start
        let old = totals[phase] ?? (0, 0)
        totals[phase] = (old.nanoseconds + spent, old.count + 1)
    }

    static func now() -> UInt64 { enabled ? monotonicNanoseconds() : 0 }

    /// One line per phase: total ms, count, µs each.
    public static func report() -> String {
        totals.sorted { $0.value.nanoseconds > $1.value.nanoseconds }.map { phase, value in
            let ms = Double(value.nanoseconds) / 1e6
            return "\(phase): \((ms * 100).rounded() / 100) ms in \(value.count) (\(Int(Double(value.nanoseconds) / 1e3 / Double(value.count))) µs each)"
        }.joined(separator: "\n")
    }
}
