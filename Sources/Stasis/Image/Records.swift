/// The records of a Stasis image. Each is a JSON object inside a checksummed frame (see
/// docs/image-format.md); page data travels in binary page blocks. Fields added later must be
/// optional so that older images still decode; an incompatible change bumps the format's major
/// version.

/// The identity of a file at snapshot time, used to check at restore that the same file is
/// still there before mapping or reopening it.
public struct FileIdentity: Codable, Sendable, Equatable {
    public var device: UInt64
    public var inode: UInt64
    public var size: Int64
    /// Modification time in nanoseconds since the epoch.
    public var modifiedNanoseconds: Int64
}

/// What the process was, as a whole: everything that is not per-thread, per-mapping or per-fd.
public struct ProcessRecord: Codable, Sendable {
    public var pid: Int32
    /// The process's name (comm of the main thread).
    public var name: String
    /// The command line, for people (`inspect`); not used to restore.
    public var commandLine: [String]
    public var executable: String
    public var executableIdentity: FileIdentity?
    public var workingDirectory: String
    public var umask: UInt32
    public var personality: UInt32
    public var credentials: Credentials
    public var limits: [ResourceLimit]
    public var memoryLayout: MemoryLayoutRecord
    /// The ELF auxiliary vector (/proc/PID/auxv), restored with PR_SET_MM_MAP.
    public var auxiliaryVector: [UInt64]
    public var signalActions: [SignalAction]
    /// siginfo records (128 bytes each) queued for the whole process.
    public var sharedPendingSignals: [[UInt8]]
    /// The kernel that took the image (uname -r), to check vDSO compatibility.
    public var kernelRelease: String
    /// Wall-clock time of the freeze, in nanoseconds since the epoch.
    public var snapshotTimeNanoseconds: Int64
    /// The process's start time (clock ticks after boot, /proc/PID/stat field 22) and the
    /// boot it ran in: together they tell whether a live process with the same PID is the
    /// original.
    public var startTime: UInt64?
    public var bootID: String?
}

public struct Credentials: Codable, Sendable, Equatable {
    /// Real, effective, saved and filesystem user IDs, as in /proc/PID/status.
    public var uids: [UInt32]
    public var gids: [UInt32]
    public var groups: [UInt32]
}

public struct ResourceLimit: Codable, Sendable, Equatable {
    public var resource: Int32
    public var soft: UInt64
    public var hard: UInt64
}

/// The mm fields that PR_SET_MM_MAP restores: where the kernel thinks code, data, heap, stack,
/// arguments and environment are.
public struct MemoryLayoutRecord: Codable, Sendable, Equatable {
    public var startCode, endCode, startData, endData, startBrk, brk, startStack: UInt64
    public var argStart, argEnd, envStart, envEnd: UInt64
}

/// One signal's disposition, in the kernel's `struct sigaction` terms.
public struct SignalAction: Codable, Sendable, Equatable {
    public var signal: Int32
    /// SIG_DFL (0), SIG_IGN (1) or the handler's address.
    public var handler: UInt64
    public var flags: UInt64
    public var restorer: UInt64
    public var mask: UInt64
}

/// One thread: its identity and everything the CPU and the kernel hold for it.
public struct ThreadRecord: Codable, Sendable {
    public var tid: Int32
    public var name: String
    /// Registers as they must be when the thread resumes (an interrupted system call already
    /// turned into its restart; see `GeneralRegisters.normalizedForResume`).
    public var registers: GeneralRegisters
    /// The XSAVE area (x87, SSE, AVX, AVX-512 …) from PTRACE_GETREGSET(NT_X86_XSTATE).
    public var extendedState: [UInt8]
    public var blockedSignals: UInt64
    /// siginfo records (128 bytes each) queued for this thread only.
    public var pendingSignals: [[UInt8]]
    public var alternateStack: AlternateStack
    public var rseq: RseqRegistration?
    public var robustListHead: UInt64
    public var robustListLength: UInt64
    /// The address the kernel clears and futex-wakes when the thread exits (set_tid_address).
    public var clearChildTID: UInt64
    /// The TID inside the tree's own PID namespace, when the image is of one.
    public var namespaceTID: Int32?
    /// PR_SET_PDEATHSIG: the signal the thread gets when its parent dies (0: none).
    public var parentDeathSignal: Int32?
}

/// A thread's sigaltstack(2) state.
public struct AlternateStack: Codable, Sendable, Equatable {
    public var base: UInt64
    public var flags: Int32
    public var size: UInt64
    public static let disabled = AlternateStack(base: 0, flags: 2 /* SS_DISABLE */, size: 0)
}

/// What backs a mapping, and so how restore recreates it.
public enum MappingBacking: String, Codable, Sendable {
    /// Private anonymous memory (heap, stacks, mmap(MAP_ANONYMOUS)): recreated empty, pages
    /// come from the image.
    case anonymous
    /// A private mapping of a file: the file is mapped again (after checking its identity) and
    /// the pages the process had written come from the image.
    case privateFile
    /// A shared mapping of a regular file: mapped again; its data lives in the file.
    case sharedFile
    /// The kernel's [vdso] and [vvar*] pages: moved into place, never stored.
    case vdso, vvar, vvarClock
    /// A shared memory object (MAP_SHARED|MAP_ANONYMOUS or a memfd), possibly mapped by several
    /// processes of a tree: recreated once, its contents from the image's object data, and
    /// mapped by each process that had it.
    case sharedMemory
}

public struct MappingRecord: Codable, Sendable, Equatable {
    public var start: UInt64
    public var end: UInt64
    public var readable, writable, executable: Bool
    public var backing: MappingBacking
    /// The pseudo-name or path from /proc/PID/maps ("[heap]", "/usr/lib/…/libc.so.6").
    public var name: String
    public var fileOffset: UInt64
    public var fileIdentity: FileIdentity?
    /// VmFlags that restore re-applies with madvise or mmap flags ("gd", "dc", "wf", "dd", "hg", "nh").
    public var flags: [String]
    /// How many pages of this mapping were resident (and not the shared zero page) at the
    /// freeze. The image stores these pages except those found to hold only zero bytes, so
    /// the stored count can be lower (`stasis inspect` reports the bytes actually stored).
    public var residentPages: UInt64
    /// The `SharedMemoryRecord` behind a `sharedMemory` mapping.
    public var sharedMemory: UInt64?

    public var size: UInt64 { end - start }
}

public struct MappingTable: Codable, Sendable {
    public var mappings: [MappingRecord]

    public init(mappings: [MappingRecord]) { self.mappings = mappings }
}

/// The kind of an open file description.
public enum FileKind: String, Codable, Sendable {
    case regular
    case devNull
    /// An end of a pipe(2); which end follows from the flags (O_WRONLY: the write end).
    case pipe
    /// A FIFO opened by path.
    case fifo
    /// A memfd held open.
    case memfd
    /// A regular file that was open but already deleted (its path no longer names it): its
    /// contents travel in the image (`DeletedFileRecord`) and it comes back unlinked.
    case deletedFile
}

public struct FileDescriptorRecord: Codable, Sendable, Equatable {
    public var fd: Int32
    public var kind: FileKind
    public var path: String
    /// open(2) flags as in /proc/PID/fdinfo, without O_CLOEXEC (see `closeOnExec`).
    public var flags: Int32
    public var closeOnExec: Bool
    public var offset: Int64
    public var identity: FileIdentity?
    /// The `OpenFileDescription` (tree record) this fd refers to; fds with the same one share
    /// their offset and flags. Absent in single-process images of format 1.0.
    public var description: Int?
}

public struct FileTable: Codable, Sendable {
    public var descriptors: [FileDescriptorRecord]

    public init(descriptors: [FileDescriptorRecord]) { self.descriptors = descriptors }
}

/// The last record: what the image holds, so a reader knows it got all of it.
public struct Trailer: Codable, Sendable {
    public var records: UInt64
    public var pageBlocks: UInt64
    public var pages: UInt64
}
