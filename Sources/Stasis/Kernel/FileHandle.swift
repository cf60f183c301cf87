import CStasis
import Glibc
import SystemPackage

/// An owned file descriptor that is closed when the handle goes away.
///
/// Guarantees: every read and write either completes fully or throws `SystemCallError` naming
/// the descriptor's path; EINTR is retried (writes and fsync stop retrying once a
/// `Cancellation` was requested). Not thread-safe; move it, don't share it.
public final class FileHandle: Sendable {
    public let descriptor: FileDescriptor
    /// What the descriptor refers to, for error messages.
    public let name: String
    private let owned: Bool

    public init(adopting descriptor: FileDescriptor, name: String, owned: Bool = true) {
        self.descriptor = descriptor
        self.name = name
        self.owned = owned
    }

    deinit {
        if owned { try? descriptor.close() }
    }

    public var rawValue: Int32 { descriptor.rawValue }

    /// open(2) of `path` with the given flags (O_CLOEXEC is always added).
    public static func open(
        _ path: String, _ flags: Int32, permissions: mode_t = 0o644
    ) throws -> FileHandle {
        let fd = try retryingInterrupts("open", path) {
            Int(Glibc.open(path, flags | O_CLOEXEC, permissions)).negatedErrnoIfFailed()
        }
        return FileHandle(adopting: FileDescriptor(rawValue: Int32(fd)), name: path)
    }

    /// Reads up to `count` bytes; returns 0 at end of file.
    public func read(into buffer: UnsafeMutableRawPointer, count: Int) throws -> Int {
        try retryingInterrupts("read", name) {
            Glibc.read(rawValue, buffer, count).negatedErrnoIfFailed()
        }
    }

    /// Reads exactly `count` bytes unless the end of the stream comes first; returns how many were read.
    public func readFully(into buffer: UnsafeMutableRawPointer, count: Int) throws -> Int {
        var done = 0
        while done < count {
            let got = try read(into: buffer + done, count: count - done)
            if got == 0 { break }
            done += got
        }
        return done
    }

    /// Writes all `count` bytes.
    public func writeAll(_ buffer: UnsafeRawPointer, count: Int) throws {
        var done = 0
        while done < count {
            done += try retryingInterruptsUnlessCancelled("write", name) {
                Glibc.write(rawValue, buffer + done, count - done).negatedErrnoIfFailed()
            }
            if done < count { try Cancellation.check() }  // a signal can end a write early
        }
    }

    public func writeAll(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { (raw) throws in
            try writeAll(raw.baseAddress!, count: raw.count)
        }
    }

    public func pread(into buffer: UnsafeMutableRawPointer, count: Int, offset: UInt64) throws -> Int {
        try retryingInterrupts("pread", "\(name) at offset \(offset)") {
            stasis_pread(rawValue, buffer, count, offset)
        }
    }

    public func fsync() throws {
        _ = try retryingInterruptsUnlessCancelled("fsync", name) { Int(Glibc.fsync(rawValue)).negatedErrnoIfFailed() }
    }

    /// fstat(2).
    public func status() throws -> stat {
        var st = stat()
        _ = try checked(Int(fstat(rawValue, &st)).negatedErrnoIfFailed(), "fstat", name)
        return st
    }

    /// Whether the descriptor is a pipe or FIFO (streams cannot seek).
    public var isPipe: Bool {
        guard let st = try? status() else { return false }
        return (st.st_mode & S_IFMT) == S_IFIFO
    }
}

extension Int {
    /// Converts a libc-style result (-1 and errno) into the -errno convention.
    @inline(__always)
    func negatedErrnoIfFailed() -> Int { self == -1 ? -Int(Glibc.errno) : self }
}

/// Reads a whole small file (procfs, sysfs) into a string.
func readTextFile(_ path: String) throws -> String {
    let handle = try FileHandle.open(path, O_RDONLY)
    // An uninitialized chunk: zeroing a large buffer for every small /proc file costs more than
    // reading it.
    let chunkSize = 16384
    let chunk = UnsafeMutableRawPointer.allocate(byteCount: chunkSize, alignment: 16)
    defer { chunk.deallocate() }
    var bytes: [UInt8] = []
    while true {
        let got = try handle.read(into: chunk, count: chunkSize)
        if got == 0 { break }
        bytes.append(contentsOf: UnsafeRawBufferPointer(start: chunk, count: got))
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// Writes a small string to a file (cgroup and procfs control files).
func writeTextFile(_ path: String, _ text: String) throws {
    let handle = try FileHandle.open(path, O_WRONLY)
    try handle.writeAll(Array(text.utf8))
}

/// readlink(2) as a String.
func readLink(_ path: String) throws -> String {
    var buffer = [CChar](repeating: 0, count: 4097)
    let count = try checked(Glibc.readlink(path, &buffer, 4096).negatedErrnoIfFailed(), "readlink", path)
    return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// stat(2) of a path (following links).
func statPath(_ path: String) throws -> stat {
    var st = stat()
    let result: Int32 = stat(path, &st)
    _ = try checked(Int(result).negatedErrnoIfFailed(), "stat", path)
    return st
}

func pathExists(_ path: String) -> Bool { access(path, F_OK) == 0 }
