import Glibc

/// Parsers for the /proc files Stasis reads. Each returns plain values; a file that cannot be
/// read is a `SystemCallError` naming its path.
public enum ProcFS {
    /// One line of /proc/PID/maps.
    public struct MapEntry: Sendable, Equatable {
        public var start: UInt64
        public var end: UInt64
        public var readable, writable, executable, shared: Bool
        public var offset: UInt64
        public var deviceMajor: UInt32
        public var deviceMinor: UInt32
        public var inode: UInt64
        /// The path or pseudo-name ([heap], [stack], [vdso], …); empty for anonymous memory.
        public var name: String
        /// The two-letter VmFlags from /proc/PID/smaps (e.g. "gd", "dc", "hg").
        public var vmFlags: [String] = []
    }

    static func task(_ pid: pid_t) -> String { "/proc/\(pid)" }

    /// The TIDs under /proc/PID/task, sorted.
    public static func threadIDs(_ pid: pid_t) throws -> [pid_t] {
        let path = "/proc/\(pid)/task"
        guard let dir = opendir(path) else {
            throw SystemCallError(call: "opendir", subject: path, errno: .init(rawValue: errno))
        }
        defer { closedir(dir) }
        var tids: [pid_t] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if let tid = pid_t(name) { tids.append(tid) }
        }
        return tids.sorted()
    }

    /// The numeric entries of /proc/PID/fd, sorted.
    public static func fileDescriptors(_ pid: pid_t) throws -> [Int32] {
        let path = "/proc/\(pid)/fd"
        guard let dir = opendir(path) else {
            throw SystemCallError(call: "opendir", subject: path, errno: .init(rawValue: errno))
        }
        defer { closedir(dir) }
        var fds: [Int32] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if let fd = Int32(name) { fds.append(fd) }
        }
        return fds.sorted()
    }

    /// /proc/PID/maps (no VmFlags; unlike smaps, reading it does not walk the page tables).
    public static func mapEntries(_ pid: pid_t) throws -> [MapEntry] {
        try readTextFile("/proc/\(pid)/maps").split(separator: "\n").compactMap(parseMapLine)
    }

    /// /proc/PID/smaps reduced to the maps lines plus each mapping's VmFlags.
    public static func mappings(_ pid: pid_t) throws -> [MapEntry] {
        let text = try readTextFile("/proc/\(pid)/smaps")
        var entries: [MapEntry] = []
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            if line.hasPrefix("VmFlags:") {
                if !entries.isEmpty {
                    entries[entries.count - 1].vmFlags = line.dropFirst(8).split(separator: " ").map(String.init)
                }
                continue
            }
            if let entry = parseMapLine(line) { entries.append(entry) }
        }
        return entries
    }

    /// Parses one maps line; returns nil for the smaps detail lines ("Rss:   4 kB").
    /// Byte-wise ("start-end perms offset major:minor inode   name"): this runs for every
    /// mapping of every process while the tree is frozen.
    static func parseMapLine(_ line: Substring) -> MapEntry? {
        let bytes = line.utf8
        var index = bytes.startIndex
        func skipSpaces() { while index < bytes.endIndex && bytes[index] == 0x20 { index = bytes.index(after: index) } }
        func hex(until terminator: UInt8) -> UInt64? {
            var value: UInt64 = 0
            var digits = 0
            while index < bytes.endIndex, bytes[index] != terminator {
                let byte = bytes[index]
                let digit: UInt64
                switch byte {
                case 0x30...0x39: digit = UInt64(byte - 0x30)
                case 0x61...0x66: digit = UInt64(byte - 0x61 + 10)
                default: return nil
                }
                value = value << 4 | digit
                digits += 1
                index = bytes.index(after: index)
            }
            guard digits > 0, index < bytes.endIndex else { return nil }
            index = bytes.index(after: index)  // the terminator
            return value
        }
        guard let start = hex(until: 0x2d /* - */), let end = hex(until: 0x20) else { return nil }
        var perms: [UInt8] = []
        while index < bytes.endIndex, bytes[index] != 0x20 { perms.append(bytes[index]); index = bytes.index(after: index) }
        guard perms.count == 4 else { return nil }
        skipSpaces()
        guard let offset = hex(until: 0x20), let major = hex(until: 0x3a /* : */), let minor = hex(until: 0x20) else { return nil }
        var inode: UInt64 = 0
        var inodeDigits = 0
        while index < bytes.endIndex, bytes[index] >= 0x30 && bytes[index] <= 0x39 {
            inode = inode * 10 + UInt64(bytes[index] - 0x30)
            inodeDigits += 1
            index = bytes.index(after: index)
        }
        guard inodeDigits > 0 else { return nil }
        skipSpaces()
        let name = String(line[index...])
        return MapEntry(
            start: start, end: end, readable: perms[0] == 0x72, writable: perms[1] == 0x77,
            executable: perms[2] == 0x78, shared: perms[3] == 0x73, offset: offset,
            deviceMajor: UInt32(major), deviceMinor: UInt32(minor), inode: inode, name: name)
    }

    /// The "Key:\tvalue" lines of /proc/PID/status (or /proc/PID/task/TID/status).
    public static func status(_ path: String) throws -> [String: String] {
        let text = try readTextFile(path)
        var result: [String: String] = [:]
        result.reserveCapacity(64)
        // Byte-wise: "Key:\t value\n", the value trimmed of spaces and tabs.
        let bytes = text.utf8
        var lineStart = bytes.startIndex
        while lineStart < bytes.endIndex {
            let lineEnd = bytes[lineStart...].firstIndex(of: UInt8(ascii: "\n")) ?? bytes.endIndex
            if let colon = bytes[lineStart..<lineEnd].firstIndex(of: UInt8(ascii: ":")) {
                var valueStart = bytes.index(after: colon)
                while valueStart < lineEnd, bytes[valueStart] == 0x20 || bytes[valueStart] == 0x09 { valueStart = bytes.index(after: valueStart) }
                var valueEnd = lineEnd
                while valueEnd > valueStart {
                    let last = bytes[bytes.index(before: valueEnd)]
                    guard last == 0x20 || last == 0x09 else { break }
                    valueEnd = bytes.index(before: valueEnd)
                }
                result[String(text[lineStart..<colon])] = String(text[valueStart..<valueEnd])
            }
            lineStart = lineEnd < bytes.endIndex ? bytes.index(after: lineEnd) : lineEnd
        }
        return result
    }

    /// The fields of /proc/PID/stat after the command name, numbered as in proc(5) (field 3 is
    /// the state). The command name itself may contain spaces and parentheses.
    public static func stat(_ pid: pid_t) throws -> [Int: String] {
        let text = try readTextFile("/proc/\(pid)/stat")
        guard let close = text.lastIndex(of: ")") else {
            throw SystemCallError(call: "parse", subject: "/proc/\(pid)/stat", errno: .invalidArgument)
        }
        var result: [Int: String] = [:]
        for (index, field) in text[text.index(after: close)...].split(separator: " ").enumerated() {
            result[index + 3] = String(field).trimmingCharacters()
        }
        return result
    }

    /// /proc/PID/fdinfo/FD as key/value pairs ("pos", "flags", "mnt_id", "ino").
    public static func fdInfo(_ pid: pid_t, _ fd: Int32) throws -> [String: String] {
        try status("/proc/\(pid)/fdinfo/\(fd)")
    }

    /// /proc/PID/limits: the soft and hard limit of each resource, in RLIMIT_* order. Read
    /// from /proc rather than with prlimit(2), which needs CAP_SYS_RESOURCE for another uid.
    public static func limits(_ pid: pid_t) throws -> [ResourceLimit] {
        let lines = try readTextFile("/proc/\(pid)/limits").split(separator: "\n").dropFirst()
        var result: [ResourceLimit] = []
        for (index, line) in lines.enumerated() {
            let tokens = line.split(separator: " ")
            guard let first = tokens.firstIndex(where: { $0 == "unlimited" || UInt64($0) != nil }),
                  first + 1 < tokens.count else {
                throw SystemCallError(call: "parse", subject: "/proc/\(pid)/limits line \(index + 1)", errno: .invalidArgument)
            }
            func value(_ token: Substring) -> UInt64 { token == "unlimited" ? UInt64.max : UInt64(token) ?? 0 }
            result.append(ResourceLimit(resource: Int32(index), soft: value(tokens[first]), hard: value(tokens[first + 1])))
        }
        return result
    }

    /// /proc/PID/auxv, the ELF auxiliary vector as raw bytes.
    public static func auxiliaryVector(_ pid: pid_t) throws -> [UInt8] {
        let handle = try FileHandle.open("/proc/\(pid)/auxv", O_RDONLY)
        var bytes = [UInt8](repeating: 0, count: 4096)
        let count = try bytes.withUnsafeMutableBytes { (raw) throws in
            try handle.readFully(into: raw.baseAddress!, count: raw.count)
        }
        return Array(bytes[0..<count])
    }
}

extension StringProtocol {
    func trimmingCharacters() -> String {
        String(drop(while: { $0 == " " || $0 == "\t" || $0 == "\n" }).reversed()
            .drop(while: { $0 == " " || $0 == "\t" || $0 == "\n" }).reversed())
    }
}
