import CStasis
import Glibc

/// Runs a batch of system calls inside a restore stub in one ptrace round trip.
///
/// Why: an injected system call costs two ptrace stops (60–90 µs here); rebuilding a small
/// process takes ~100 of them, so a tree of a hundred processes would spend most of its restore
/// waiting on the tracer. A stub is Stasis's own process until it is detached, so instead of
/// stepping it through each call, Stasis gives it a 55-byte loop (in a page of its own) that
/// reads a table of calls — number, six arguments, a slot for the result — issues each one, and
/// stops with `int3` after the last or at the first error. Only restore stubs run it: a process
/// being snapshotted never executes anything of Stasis's (it gets single injected system calls).
///
/// Guarantees: calls run in table order in the given thread; `run` returns every result, or
/// throws a `RemoteCallError` naming the first call that failed (the ones after it did not run).
/// The calls must not create tasks (clone) or end the thread.
final class StubExecutor {
    /// One call of a batch.
    struct Call {
        var number: SyscallNumber
        var arguments: [UInt64]
        var what: String

        init(_ number: SyscallNumber, _ arguments: UInt64..., what: String) {
            self.number = number
            self.arguments = arguments
            self.what = what
        }
    }

    /// The loop, with the table's address in rbx; each entry is 64 bytes: number, six
    /// arguments, result. A negative number ends the table.
    static let code: [UInt8] = [
        0x48, 0x8b, 0x03,              // 0: mov rax, [rbx]
        0x48, 0x85, 0xc0,              // 3: test rax, rax
        0x78, 0x2c,                    // 6: js done (52)
        0x48, 0x8b, 0x7b, 0x08,        // 8: mov rdi, [rbx+8]
        0x48, 0x8b, 0x73, 0x10,        // mov rsi, [rbx+16]
        0x48, 0x8b, 0x53, 0x18,        // mov rdx, [rbx+24]
        0x4c, 0x8b, 0x53, 0x20,        // mov r10, [rbx+32]
        0x4c, 0x8b, 0x43, 0x28,        // mov r8, [rbx+40]
        0x4c, 0x8b, 0x4b, 0x30,        // mov r9, [rbx+48]
        0x0f, 0x05,                    // 32: syscall
        0x48, 0x89, 0x43, 0x38,        // 34: mov [rbx+56], rax
        0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff,  // 38: cmp rax, -4095
        0x73, 0x06,                    // 44: jae done (52)
        0x48, 0x83, 0xc3, 0x40,        // 46: add rbx, 64
        0xeb, 0xcc,                    // 50: jmp 0
        0xcc,                          // 52: done: int3
        0xeb, 0xfd,                    // 53: jmp done
    ]

    static let entrySize = 64

    let tracer: Tracer
    let process: RestoredProcess
    /// Where the loop is, in the stub.
    let codeAddress: UInt64
    private let scratch: RemoteScratch

    /// Maps a page for the loop in the stub (through `caller`) and writes the loop into it.
    init(process: RestoredProcess, caller: RemoteSyscaller, scratch: RemoteScratch, near hint: UInt64) throws {
        self.tracer = process.tracer
        self.process = process
        self.scratch = scratch
        codeAddress = try caller.call(.mmap, hint, 4096, UInt64(PROT_READ | PROT_WRITE | PROT_EXEC),
                                      UInt64(MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE), UInt64.max, 0, what: "executor page")
        try RemoteMemory(pid: process.pid).write(codeAddress, bytes: Self.code)
    }

    /// Unmaps the loop's page (through `caller`).
    func remove(caller: RemoteSyscaller) throws {
        try caller.call(.munmap, codeAddress, 4096, what: "drop the executor page")
    }

    /// Runs `calls` in thread `tid` (the main thread by default) and returns their results.
    /// Arguments that point into the scratch area must be placed before; the table is placed
    /// after them, so call `scratch.reset()` only between batches.
    @discardableResult
    func run(_ calls: [Call], in tid: pid_t? = nil) throws -> [UInt64] {
        guard !calls.isEmpty else { return [] }
        let thread = tid ?? process.pid
        var table: [UInt8] = []
        table.reserveCapacity((calls.count + 1) * Self.entrySize)
        for call in calls {
            table.appendLE(call.number.rawValue)
            for index in 0..<6 { table.appendLE(index < call.arguments.count ? call.arguments[index] : 0) }
            table.appendLE(UInt64(0))
        }
        table.appendLE(UInt64.max)  // the end
        table += [UInt8](repeating: 0, count: Self.entrySize - 8)
        let tableAddress = try scratch.place(table)
        let saved = try tracer.registers(thread)
        var regs = saved
        regs.rip = codeAddress
        regs.rbx = tableAddress
        regs.orig_rax = GeneralRegisters.noSystemCall
        try tracer.setRegisters(thread, regs)
        try tracer.resume(thread)
        while true {
            let event = try tracer.waitForEvent(thread)
            guard case let .stopped(signal, eventCode) = event else {
                throw StasisError.restoreFailed(pid: process.localPID, step: "running \(calls.count) system calls (\(calls[0].what) …)",
                                                reason: "the stub ended: \(event)")
            }
            if signal == SIGTRAP && eventCode == 0 { break }
            // Anything else (a stray stop) is passed over without delivering a signal.
            try tracer.resume(thread)
        }
        try tracer.setRegisters(thread, saved)
        let done = try RemoteMemory(pid: process.pid).read(tableAddress, count: calls.count * Self.entrySize)
        var results: [UInt64] = []
        results.reserveCapacity(calls.count)
        for (index, call) in calls.enumerated() {
            let result = Int64(bitPattern: done.readLE(UInt64.self, at: index * Self.entrySize + 56))
            if result < 0 && result > -4096 {
                throw RemoteCallError(call: "\(call.number) (\(call.what))", tid: thread, detail: String(cString: strerror(Int32(-result))))
            }
            results.append(UInt64(bitPattern: result))
        }
        return results
    }
}
