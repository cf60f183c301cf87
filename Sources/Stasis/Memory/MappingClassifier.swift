import Glibc

/// Decides, for each line of /proc/PID/maps, how a restore recreates it — or refuses it.
enum MappingClassifier {
    /// VmFlags that restore re-applies.
    static let keptFlags: Set<String> = ["gd", "dc", "wf", "dd", "hg", "nh"]

    /// `stat` results of mapped files by device and inode, shared by the processes of a tree
    /// (a hundred processes map the same libc).
    final class FileCache {
        var entries: [String: stat] = [:]
        init() {}
    }

    static func classify(_ entries: [ProcFS.MapEntry], pid: pid_t, cache: FileCache = FileCache()) throws -> [MappingRecord] {
        var records: [MappingRecord] = []
        for entry in entries {
            let range = "0x\(String(entry.start, radix: 16))-0x\(String(entry.end, radix: 16))"
            let backing: MappingBacking
            var identity: FileIdentity?
            switch entry.name {
            case "[vsyscall]":
                continue  // the kernel gives every process this page; nothing to restore
            case "[vdso]": backing = .vdso
            case "[vvar]": backing = .vvar
            case "[vvar_vclock]": backing = .vvarClock
            default:
                if entry.name.hasPrefix("/SYSV") {
                    throw StasisError.unsupported(pid: pid, what: "System V shared memory at \(range) (\(entry.name))")
                }
                if entry.shared && (entry.name.hasPrefix("/dev/zero") || entry.name.hasPrefix("/memfd:")) {
                    records.append(try sharedMemory(entry, pid: pid, range: range))
                    continue
                }
                if entry.shared && entry.inode == 0 {
                    throw StasisError.unsupported(pid: pid, what: "shared anonymous memory at \(range) with no object behind it")
                }
                if entry.name.hasSuffix(" (deleted)") {
                    throw StasisError.unsupported(pid: pid, what: "mapping \(range) of deleted file \(entry.name)")
                }
                if entry.inode == 0 {
                    if entry.shared {
                        throw StasisError.unsupported(pid: pid, what: "shared anonymous memory at \(range)")
                    }
                    if entry.name.hasPrefix("[") && !(entry.name == "[heap]" || entry.name == "[stack]" || entry.name.hasPrefix("[anon:")) {
                        throw StasisError.unsupported(pid: pid, what: "special mapping \(entry.name) at \(range)")
                    }
                    backing = .anonymous
                } else {
                    guard entry.name.hasPrefix("/") else {
                        throw StasisError.unsupported(pid: pid, what: "mapping \(range) of \(entry.name.isEmpty ? "an unnamed object" : entry.name)")
                    }
                    let mapFile = "/proc/\(pid)/map_files/\(String(entry.start, radix: 16))-\(String(entry.end, radix: 16))"
                    let key = "\(entry.deviceMajor):\(entry.deviceMinor):\(entry.inode)"
                    let st: stat
                    if let known = cache.entries[key] {
                        st = known
                    } else {
                        do { st = try statPath(mapFile) } catch {
                            throw StasisError.unsupported(pid: pid, what: "mapping \(range) of \(entry.name): \(error)")
                        }
                        cache.entries[key] = st
                    }
                    if (st.st_mode & S_IFMT) != S_IFREG {
                        throw StasisError.unsupported(pid: pid, what: "mapping \(range) of \(entry.name), which is not a regular file")
                    }
                    if entry.shared && st.st_nlink == 0 {
                        throw StasisError.unsupported(pid: pid, what: "shared mapping \(range) of an unlinked file (memfd or shm) \(entry.name)")
                    }
                    if !entry.shared && entry.name.hasPrefix("/memfd:") {
                        throw StasisError.unsupported(pid: pid, what: "private mapping \(range) of \(entry.name)")
                    }
                    identity = FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino), size: Int64(st.st_size),
                                            modifiedNanoseconds: Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec))
                    backing = entry.shared ? .sharedFile : .privateFile
                }
            }
            records.append(MappingRecord(
                start: entry.start, end: entry.end, readable: entry.readable, writable: entry.writable,
                executable: entry.executable, backing: backing, name: entry.name, fileOffset: entry.offset,
                fileIdentity: identity, flags: entry.vmFlags.filter { keptFlags.contains($0) }, residentPages: 0))
        }
        return records
    }

    /// A MAP_SHARED mapping of a shared memory object (anonymous shared memory or a memfd):
    /// identified by its inode, which every process mapping the same object shares.
    private static func sharedMemory(_ entry: ProcFS.MapEntry, pid: pid_t, range: String) throws -> MappingRecord {
        let mapFile = "/proc/\(pid)/map_files/\(String(entry.start, radix: 16))-\(String(entry.end, radix: 16))"
        let st: stat
        do { st = try statPath(mapFile) } catch {
            throw StasisError.unsupported(pid: pid, what: "shared memory at \(range) (\(entry.name)): \(error)")
        }
        return MappingRecord(
            start: entry.start, end: entry.end, readable: entry.readable, writable: entry.writable,
            executable: entry.executable, backing: .sharedMemory, name: entry.name, fileOffset: entry.offset,
            fileIdentity: nil, flags: entry.vmFlags.filter { keptFlags.contains($0) }, residentPages: 0,
            sharedMemory: UInt64(st.st_ino))
    }
}
