import CStasis
import Glibc

/// Reads and writes another process's memory.
///
/// `read`/`write` use process_vm_readv/writev, which honour the target's page protections;
/// `forceWrite` goes through /proc/PID/mem, which (like a debugger) may write read-only private
/// pages. Short transfers are errors naming the PID and address.
public struct RemoteMemory {
    public let pid: pid_t

    public init(pid: pid_t) { self.pid = pid }

    /// Copies `count` bytes at `address` in the target into `buffer`.
    public func read(_ address: UInt64, into buffer: UnsafeMutableRawPointer, count: Int) throws {
        var done = 0
        while done < count {
            var local = iovec(iov_base: buffer + done, iov_len: count - done)
            var remote = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(address) + UInt(done)),
                               iov_len: count - done)
            let got = try checked(stasis_process_vm_readv(pid, &local, 1, &remote, 1),
                                  "process_vm_readv", "pid \(pid) address 0x\(String(address + UInt64(done), radix: 16))")
            if got == 0 {
                throw SystemCallError(call: "process_vm_readv", subject: "pid \(pid) address 0x\(String(address + UInt64(done), radix: 16))", errno: .badAddress)
            }
            done += got
        }
    }

    public func read(_ address: UInt64, count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { (raw) throws in
            try read(address, into: raw.baseAddress!, count: count)
        }
        return bytes
    }

    public func readValue<T>(_ address: UInt64, as type: T.Type) throws -> T {
        let bytes = try read(address, count: MemoryLayout<T>.size)
        return bytes.withUnsafeBytes { $0.loadUnaligned(as: T.self) }
    }

    /// Copies `count` bytes from `buffer` to `address` in the target.
    public func write(_ address: UInt64, from buffer: UnsafeRawPointer, count: Int) throws {
        var done = 0
        while done < count {
            var local = iovec(iov_base: UnsafeMutableRawPointer(mutating: buffer + done), iov_len: count - done)
            var remote = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(address) + UInt(done)),
                               iov_len: count - done)
            let wrote = try checked(stasis_process_vm_writev(pid, &local, 1, &remote, 1),
                                    "process_vm_writev", "pid \(pid) address 0x\(String(address + UInt64(done), radix: 16))")
            if wrote == 0 {
                throw SystemCallError(call: "process_vm_writev", subject: "pid \(pid) address 0x\(String(address + UInt64(done), radix: 16))", errno: .badAddress)
            }
            done += wrote
        }
    }

    public func write(_ address: UInt64, bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { (raw) throws in
            try write(address, from: raw.baseAddress!, count: raw.count)
        }
    }
}
