import CStasis
import Glibc

/// Rebuilds a process's memory inside the restore stub: clears the stub's own mappings, moves
/// the kernel's vDSO pages to where the image had them, recreates every mapping at its exact
/// address, fills in the stored pages, then applies final protections and the mm layout.
///
/// Anonymous memory is recreated anonymous (not as a mapping of the image file), so that
/// madvise(MADV_DONTNEED), fork and /proc/PID/maps behave exactly as before the snapshot.
final class AddressSpaceBuilder {
    let process: RestoredProcess
    let metadata: ImageMetadata
    private(set) var caller: RemoteSyscaller
    private(set) var scratch: RemoteScratch!
    private let memory: RemoteMemory
    static let scratchSize: UInt64 = 64 * 1024

    private let objects: SharedObjects

    init(process: RestoredProcess, metadata: ImageMetadata, objects: SharedObjects) throws {
        self.process = process
        self.metadata = metadata
        self.objects = objects
        self.memory = RemoteMemory(pid: process.pid)
        guard let instruction = process.syscallInstruction else {
            throw StasisError.restoreFailed(pid: process.localPID, step: "preparing the stub", reason: "the stub was not prepared (no syscall instruction known)")
        }
        caller = try RemoteSyscaller(tracer: process.tracer, tid: process.pid, syscallInstruction: instruction)
        stubLayout = try ProcFS.mapEntries(process.pid)
    }

    private let stubLayout: [ProcFS.MapEntry]

    private func fail(_ step: String, _ error: Error) -> StasisError {
        StasisError.restoreFailed(pid: process.pid, step: step, reason: "\(error)")
    }

    /// Replaces the stub's address space with the image's mappings (pages still empty).
    func prepareMappings() throws {
        let pid = process.pid
        // The stub inherited the tracer thread's rseq registration; its area is about to go.
        if let rseq = try process.tracer.rseqConfiguration(pid) {
            try caller.call(.rseq, rseq.address, UInt64(rseq.length), 1 /* RSEQ_FLAG_UNREGISTER */, UInt64(rseq.signature),
                            what: "unregister the stub's rseq")
        }
        let specialNames: [MappingBacking: String] = [.vdso: "[vdso]", .vvar: "[vvar]", .vvarClock: "[vvar_vclock]"]
        let stubSpecials = stubLayout.filter { $0.name == "[vdso]" || $0.name.hasPrefix("[vvar") }
        let imageSpecials = metadata.mappings.filter { specialNames[$0.backing] != nil }
        // Everything but the vDSO pages goes (the stub's scratch page, a parent's mappings).
        try Self.unmapAllButVDSO(stubLayout, caller: caller)
        // Move each vDSO piece to where the image had it, through a free spot so that old and
        // new places may overlap.
        for special in stubSpecials {
            guard imageSpecials.contains(where: { specialNames[$0.backing] == special.name && $0.size == special.end - special.start }) ||
                  !imageSpecials.contains(where: { specialNames[$0.backing] == special.name })
            else {
                throw StasisError.restoreFailed(pid: pid, step: "placing the vDSO",
                    reason: "this kernel's \(special.name) is \(special.end - special.start) bytes, the image's (kernel \(metadata.process.kernelRelease)) differs")
            }
        }
        let occupied = metadata.mappings.map { $0.start..<$0.end } + stubSpecials.map { $0.start..<$0.end }
        let total = stubSpecials.reduce(0) { $0 + ($1.end - $1.start) }
        guard let parking = findFreeRange(size: total + Self.scratchSize + 4096, avoiding: occupied) else {
            throw StasisError.restoreFailed(pid: pid, step: "placing the vDSO", reason: "no free address range")
        }
        // Scratch room for call arguments and the batch executor's page, in a spot the image
        // does not use, right after the parking room.
        let scratchAddress = try caller.call(.mmap, parking + total, Self.scratchSize, UInt64(PROT_READ | PROT_WRITE),
                                             UInt64(MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE), UInt64.max, 0,
                                             what: "scratch area")
        scratch = RemoteScratch(address: scratchAddress, size: Self.scratchSize, pid: pid)
        executor = try StubExecutor(process: process, caller: caller, scratch: scratch, near: parking + total + Self.scratchSize)
        // One batch (the executor runs from its own page, so the vDSO may move under it): park
        // every piece, move each to the image's address, drop those the image lacks.
        var moves: [StubExecutor.Call] = []
        var parked: [(name: String, address: UInt64, size: UInt64)] = []
        var cursor = parking
        for special in stubSpecials {
            let size = special.end - special.start
            moves.append(.init(.mremap, special.start, size, size, 3 /* MREMAP_MAYMOVE|MREMAP_FIXED */, cursor, what: "park \(special.name)"))
            parked.append((special.name, cursor, size))
            cursor += size
        }
        let syscallOffset = stubSpecials.first(where: { $0.name == "[vdso]" }).map { caller.syscallInstruction - $0.start }
        var vdsoAt = parked.first(where: { $0.name == "[vdso]" })?.address
        for piece in parked {
            if let target = imageSpecials.first(where: { specialNames[$0.backing] == piece.name }) {
                moves.append(.init(.mremap, piece.address, piece.size, piece.size, 3, target.start, what: "move \(piece.name)"))
                if piece.name == "[vdso]" { vdsoAt = target.start }
            }
        }
        for piece in parked where piece.name != "[vdso]" && !imageSpecials.contains(where: { specialNames[$0.backing] == piece.name }) {
            moves.append(.init(.munmap, piece.address, piece.size, what: "drop \(piece.name), which the image does not have"))
        }
        scratch.reset()
        try executor.run(moves)
        if let syscallOffset, let vdsoAt { caller.syscallInstruction = vdsoAt + syscallOffset }

        // First batch: open every mapped file once (read-only, or read-write for writable shared
        // mappings) and pull in every shared memory object.
        var fileKeys: [String] = []
        var opens: [StubExecutor.Call] = []
        scratch.reset()
        let mapped = metadata.mappings.filter { specialNames[$0.backing] == nil }
        for mapping in mapped {
            switch mapping.backing {
            case .privateFile, .sharedFile:
                let writable = mapping.backing == .sharedFile && mapping.writable
                let key = (writable ? "rw:" : "ro:") + mapping.name
                guard !fileKeys.contains(key) else { continue }
                fileKeys.append(key)
                opens.append(.init(.open, try scratch.place(cString: mapping.name), UInt64(writable ? O_RDWR : O_RDONLY) | UInt64(O_CLOEXEC), 0,
                                   what: "open \(mapping.name)"))
            case .sharedMemory:
                guard let id = mapping.sharedMemory, let object = objects.sharedMemory[id] else {
                    throw StasisError.restoreFailed(pid: process.localPID, step: "mapping shared memory at 0x\(String(mapping.start, radix: 16))",
                                                    reason: "the image has no shared memory object \(mapping.sharedMemory ?? 0)")
                }
                let key = "shm:\(id)"
                guard !fileKeys.contains(key) else { continue }
                fileKeys.append(key)
                opens.append(.init(.pidfdGetfd, UInt64(objects.pidfdNumber), UInt64(object), 0, what: "pidfd_getfd of shared memory \(mapping.name)"))
            default:
                continue
            }
        }
        let fds = try executor.run(opens)
        var fdOf: [String: UInt64] = [:]
        for (key, fd) in zip(fileKeys, fds) { fdOf[key] = fd }

        // Second batch: every mapping at its address, its huge-page advice, then the files closed.
        var calls: [StubExecutor.Call] = []
        for mapping in mapped {
            let length = mapping.end - mapping.start
            var flags = UInt64(MAP_FIXED)
            var prot = UInt64(PROT_READ | PROT_WRITE)
            var fd = UInt64.max
            switch mapping.backing {
            case .anonymous:
                flags |= UInt64(MAP_PRIVATE | MAP_ANONYMOUS)
                if mapping.flags.contains("gd") { flags |= UInt64(MAP_GROWSDOWN) }
            case .sharedMemory:
                fd = fdOf["shm:\(mapping.sharedMemory!)"]!
                flags |= UInt64(MAP_SHARED)
                prot = protection(of: mapping)
            case .privateFile, .sharedFile:
                let shared = mapping.backing == .sharedFile
                fd = fdOf[(shared && mapping.writable ? "rw:" : "ro:") + mapping.name]!
                flags |= UInt64(shared ? MAP_SHARED : MAP_PRIVATE)
                if shared { prot = protection(of: mapping) }
            default:
                continue
            }
            calls.append(.init(.mmap, mapping.start, length, prot, flags, fd, mapping.fileOffset,
                               what: "map \(mapping.name.isEmpty ? "anonymous memory" : mapping.name) at 0x\(String(mapping.start, radix: 16))"))
            if mapping.flags.contains("hg") { calls.append(.init(.madvise, mapping.start, length, UInt64(MADV_HUGEPAGE), what: "MADV_HUGEPAGE")) }
            if mapping.flags.contains("nh") { calls.append(.init(.madvise, mapping.start, length, UInt64(MADV_NOHUGEPAGE), what: "MADV_NOHUGEPAGE")) }
        }
        for fd in fds { calls.append(.init(.close, fd, what: "close a mapped file")) }
        try runInChunks(calls)
    }

    /// The stub's batch executor (set up by `prepareMappings`).
    private(set) var executor: StubExecutor!

    /// Runs calls that do not point into the scratch area in batches that fit in it.
    func runInChunks(_ calls: [StubExecutor.Call]) throws {
        let perBatch = Int(Self.scratchSize) / StubExecutor.entrySize - 1
        var start = 0
        while start < calls.count {
            scratch.reset()
            let end = min(calls.count, start + perBatch)
            try executor.run(Array(calls[start..<end]))
            start = end
        }
    }

    /// Unmaps everything in a stub but its [vdso]/[vvar]/[vvar_vclock] pieces, from address 0
    /// to the top of user space.
    static func unmapAllButVDSO(_ maps: [ProcFS.MapEntry], caller: RemoteSyscaller) throws {
        let specials = maps.filter { $0.name == "[vdso]" || $0.name.hasPrefix("[vvar") }.sorted { $0.start < $1.start }
        var cursor: UInt64 = 0
        let top: UInt64 = 0x7fff_ffff_f000
        for special in specials + [ProcFS.MapEntry(start: top, end: top, readable: false, writable: false, executable: false,
                                                   shared: false, offset: 0, deviceMajor: 0, deviceMinor: 0, inode: 0, name: "")] {
            if special.start > cursor {
                try caller.call(.munmap, cursor, special.start - cursor, what: "clear the stub at 0x\(String(cursor, radix: 16))")
            }
            cursor = max(cursor, special.end)
        }
    }

    /// Checks a run against the image's mappings and writes its data into the process.
    func writePages(_ runs: [PageRun], data: UnsafeRawBufferPointer, reader: ImageReader) throws {
        for run in runs where metadata.mappingIndex(containing: run) == nil {
            throw reader.malformed("pages at 0x\(String(run.address, radix: 16)) (\(run.pages) pages) fall outside the image's private mappings", kind: .pages)
        }
        var local = iovec(iov_base: UnsafeMutableRawPointer(mutating: data.baseAddress!), iov_len: data.count)
        let remote = runs.map { iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt($0.address)), iov_len: Int($0.pages) * 4096) }
        let wrote = try checked(stasis_process_vm_writev(process.pid, &local, 1, remote, UInt(remote.count)),
                                "process_vm_writev", "pid \(process.pid) at 0x\(String(runs[0].address, radix: 16))")
        guard wrote == data.count else {
            throw StasisError.restoreFailed(pid: process.pid, step: "writing pages at 0x\(String(runs[0].address, radix: 16))",
                                            reason: "wrote \(wrote) of \(data.count) bytes")
        }
    }

    /// Final page protections and the madvise flags that must follow the data.
    func finishMappings() throws {
        var calls: [StubExecutor.Call] = []
        for mapping in metadata.mappings where mapping.backing == .anonymous || mapping.backing == .privateFile {
            let length = mapping.end - mapping.start
            let prot = protection(of: mapping)
            if prot != UInt64(PROT_READ | PROT_WRITE) {
                calls.append(.init(.mprotect, mapping.start, length, prot, what: "protect 0x\(String(mapping.start, radix: 16))"))
            }
            let advice: [(String, Int32)] = [("dc", MADV_DONTFORK), ("wf", 18 /* MADV_WIPEONFORK */), ("dd", MADV_DONTDUMP)]
            for (flag, value) in advice where mapping.flags.contains(flag) {
                calls.append(.init(.madvise, mapping.start, length, UInt64(value), what: "madvise \(flag) at 0x\(String(mapping.start, radix: 16))"))
            }
        }
        try runInChunks(calls)
    }

    /// Restores where the kernel thinks code, data, heap, stack, arguments and environment are,
    /// the auxiliary vector and /proc/PID/exe, with PR_SET_MM_MAP.
    func restoreMemoryLayout() throws {
        let layout = metadata.process.memoryLayout
        scratch.reset()
        let path = try scratch.place(cString: metadata.process.executable)
        let exeFD = try caller.call(.open, path, UInt64(O_RDONLY | O_CLOEXEC), 0, what: "open executable \(metadata.process.executable)")
        defer { _ = try? caller.call(.close, exeFD) }
        let auxv = try scratch.place(words: metadata.process.auxiliaryVector)
        var map: [UInt8] = []
        for value in [layout.startCode, layout.endCode, layout.startData, layout.endData, layout.startBrk, layout.brk,
                      layout.startStack, layout.argStart, layout.argEnd, layout.envStart, layout.envEnd, auxv] {
            map.appendLE(value)
        }
        map.appendLE(UInt32(metadata.process.auxiliaryVector.count * 8))
        map.appendLE(UInt32(exeFD))
        let mapAddress = try scratch.place(map)
        try caller.call(.prctl, 35 /* PR_SET_MM */, 14 /* PR_SET_MM_MAP */, mapAddress, UInt64(map.count), 0,
                        what: "PR_SET_MM_MAP")
    }

    func protection(of mapping: MappingRecord) -> UInt64 {
        UInt64((mapping.readable ? PROT_READ : 0) | (mapping.writable ? PROT_WRITE : 0) | (mapping.executable ? PROT_EXEC : 0))
    }
}
