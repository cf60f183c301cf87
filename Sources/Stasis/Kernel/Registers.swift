import CStasis

/// x86-64 general-purpose registers, named as in the kernel's `struct user_regs_struct`
/// (PTRACE_GETREGS), including the TLS bases `fs_base`/`gs_base`.
public struct GeneralRegisters: Codable, Sendable, Equatable {
    public var r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi: UInt64
    /// The syscall number of an interrupted system call, or -1 (all ones) when not in one.
    public var orig_rax: UInt64
    public var rip, cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs: UInt64

    init(_ r: user_regs_struct) {
        r15 = UInt64(r.r15); r14 = UInt64(r.r14); r13 = UInt64(r.r13); r12 = UInt64(r.r12)
        rbp = UInt64(r.rbp); rbx = UInt64(r.rbx); r11 = UInt64(r.r11); r10 = UInt64(r.r10)
        r9 = UInt64(r.r9); r8 = UInt64(r.r8); rax = UInt64(r.rax); rcx = UInt64(r.rcx)
        rdx = UInt64(r.rdx); rsi = UInt64(r.rsi); rdi = UInt64(r.rdi); orig_rax = UInt64(r.orig_rax)
        rip = UInt64(r.rip); cs = UInt64(r.cs); eflags = UInt64(r.eflags); rsp = UInt64(r.rsp)
        ss = UInt64(r.ss); fs_base = UInt64(r.fs_base); gs_base = UInt64(r.gs_base)
        ds = UInt64(r.ds); es = UInt64(r.es); fs = UInt64(r.fs); gs = UInt64(r.gs)
    }

    var kernelLayout: user_regs_struct {
        var r = user_regs_struct()
        r.r15 = r15; r.r14 = r14; r.r13 = r13; r.r12 = r12; r.rbp = rbp; r.rbx = rbx
        r.r11 = r11; r.r10 = r10; r.r9 = r9; r.r8 = r8; r.rax = rax; r.rcx = rcx; r.rdx = rdx
        r.rsi = rsi; r.rdi = rdi; r.orig_rax = orig_rax; r.rip = rip; r.cs = cs
        r.eflags = eflags; r.rsp = rsp; r.ss = ss; r.fs_base = fs_base; r.gs_base = gs_base
        r.ds = ds; r.es = es; r.fs = fs; r.gs = gs
        return r
    }

    /// The value `orig_rax` holds when the thread is not inside a system call.
    public static let noSystemCall = UInt64.max

    /// The registers with an interrupted system call turned into what the kernel would do when
    /// the thread resumes with no signal handler to run: a restartable call
    /// (-ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND) is re-issued by stepping back over the
    /// 2-byte `syscall` instruction; a call that needs the kernel's per-thread restart block
    /// (-ERESTART_RESTARTBLOCK: nanosleep, clock_nanosleep, poll with timeout) is re-issued as
    /// restart_syscall when `keepRestartBlock` (the same kernel thread resumes). Otherwise (a
    /// restored thread has no restart block) a relative nanosleep/clock_nanosleep that passed a
    /// `rem` pointer is re-issued for the time left at the freeze, which the kernel stored there;
    /// any other such call returns -EINTR, exactly as after a signal.
    /// `orig_rax` is cleared so that no further fix-up is applied, wherever the thread resumes.
    public func normalizedForResume(keepRestartBlock: Bool) -> GeneralRegisters {
        var regs = self
        guard Int64(bitPattern: orig_rax) >= 0 else { return regs }
        switch Int64(bitPattern: rax) {
        case -512, -513, -514:  // ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND
            regs.rax = orig_rax
            regs.rip &-= 2
        case -516:  // ERESTART_RESTARTBLOCK
            if keepRestartBlock {
                regs.rax = 219  // __NR_restart_syscall
                regs.rip &-= 2
            } else if orig_rax == 35 && rsi != 0 {
                // nanosleep(req, rem): the kernel wrote the time left into *rem before the
                // stop; sleep for that: nanosleep(rem, rem).
                regs.rax = orig_rax
                regs.rdi = rsi
                regs.rip &-= 2
            } else if orig_rax == 230 && r10 != 0 {
                // clock_nanosleep(clock, flags, req, rem), relative (an absolute one restarts
                // with -ERESTARTNOHAND): likewise clock_nanosleep(clock, flags, rem, rem).
                regs.rax = orig_rax
                regs.rdx = r10
                regs.rip &-= 2
            } else {
                regs.rax = UInt64(bitPattern: -4)  // -EINTR
            }
        default:
            break
        }
        regs.orig_rax = Self.noSystemCall
        return regs
    }
}

/// A thread's rseq (restartable sequences) registration: the area glibc registered, its
/// length and the signature that must precede abort handlers.
public struct RseqRegistration: Codable, Sendable, Equatable {
    public var address: UInt64
    public var length: UInt32
    public var signature: UInt32
}
