import CStasis
import Glibc

/// Rebuilds a whole tree on the tracer thread, in the order the kernel's rules impose:
///
/// 1. the stubs, parents before children — each child is forked by its own parent's stub (an
///    injected clone3 with set_tid, from a stub already cleared of Stasis's memory, so each child
///    is born ready to fork its own), so parent links are real; a session leader calls setsid
///    before it forks the children that share its session; then process groups (leaders first);
///    then zombies exit with their recorded status, and their parents' SIGCHLD is taken back;
/// 2. each process's address space (shared memory mapped from the objects Stasis holds);
/// 3. the shared objects' contents and every process's pages, as the stream brings them;
/// 4. per process: protections, mm layout, files, cwd/umask/personality/limits, signal
///    actions, threads, per-thread kernel state, pending signals, credentials, registers;
/// 5. every process detached at the end, together.
///
/// Guarantees: if any step fails, every process made so far (and the namespace's init) is
/// killed, and the error names the process (by the image's PID) and the step.
final class TreeBuilder {
    let metadata: TreeMetadata
    let tracer: Tracer
    let newNamespace: Bool
    let cgroupFD: Int32
    private var made: [RestoredProcess] = []
    private var byImagePID: [pid_t: RestoredProcess] = [:]
    private var topPID: pid_t = 0
    private var topIsReaper = false

    init(metadata: TreeMetadata, tracer: Tracer, newNamespace: Bool, cgroupFD: Int32) {
        self.metadata = metadata
        self.tracer = tracer
        self.newNamespace = newNamespace
        self.cgroupFD = cgroupFD
    }

    struct Result {
        var rootPID: pid_t
        var topPID: pid_t
        var pagesMilliseconds: Double
    }

    /// The PID a member gets, as the restored processes see it: the one inside the image's own
    /// namespace for a namespace image, the original one otherwise.
    private func localID(_ imagePID: Int32) -> pid_t {
        guard metadata.tree.pidNamespace else { return imagePID }
        return metadata.tree.members.first { $0.pid == imagePID }?.namespacePID ?? imagePID
    }

    private func localTID(_ thread: ThreadRecord) -> pid_t {
        metadata.tree.pidNamespace ? (thread.namespaceTID ?? thread.tid) : thread.tid
    }

    func build(pages: ImageReader) throws -> Result {
        let objects = try SharedObjects(tree: metadata.tree)
        do {
            try PhaseTimer.measure("restore: spawn tree") { try spawnTree(objects: objects) }
            let live = metadata.tree.liveMembers
            var builders: [AddressSpaceBuilder] = []
            for (index, member) in live.enumerated() {
                let builder = try PhaseTimer.measure("restore: builder") {
                    try AddressSpaceBuilder(process: byImagePID[member.pid]!, metadata: metadata.processes[index], objects: objects)
                }
                try PhaseTimer.measure("restore: prepare mappings") { try builder.prepareMappings() }
                builders.append(builder)
            }
            let pagesMilliseconds = try PhaseTimer.measure("restore: contents") { try streamContents(pages, objects: objects, builders: builders) }
            for builder in builders {
                try PhaseTimer.measure("restore: finish mappings") { try builder.finishMappings() }
                try PhaseTimer.measure("restore: mm layout") { try builder.restoreMemoryLayout() }
            }
            for (index, builder) in builders.enumerated() {
                try PhaseTimer.measure("restore: finish process") { try finish(builder, metadata: metadata.processes[index], objects: objects) }
            }
            // Nothing but the restored processes may hold the pipes now: a pipe end none of them
            // holds is closed, as it was.
            objects.close()
            try PhaseTimer.measure("restore: detach") { for process in made where !process.isZombie { try process.detachAll() } }
            return Result(rootPID: made[0].pid, topPID: topPID, pagesMilliseconds: pagesMilliseconds)
        } catch {
            abandon()
            throw error
        }
    }

    // MARK: 1. stubs, sessions, groups, zombies

    private func spawnTree(objects: SharedObjects) throws {
        let members = metadata.tree.members
        let root = members[0]
        let placement: RestoredProcess.RootPlacement = !newNamespace ? .samePIDNamespace
            : (metadata.tree.pidNamespace ? .namespaceInit : .belowNamespaceInit)
        let (rootProcess, top) = try RestoredProcess.spawnRoot(localPID: localID(root.pid), placement: placement, cgroupFD: cgroupFD,
                                                               keepFD: objects.pidfdNumber, tracer: tracer)
        topPID = top
        topIsReaper = placement == .belowNamespaceInit
        made.append(rootProcess)
        byImagePID[root.pid] = rootProcess
        try rootProcess.prepareStub()
        if root.session == root.pid { try rootProcess.leadSession() }
        for member in members.dropFirst() {
            guard let parent = byImagePID[member.parent] else {
                throw StasisError.restoreFailed(pid: localID(member.pid), step: "creating the process", reason: "its parent \(member.parent) is not restored before it")
            }
            let child = try PhaseTimer.measure("restore: fork") { try parent.fork(childPID: localID(member.pid)) }
            made.append(child)
            byImagePID[member.pid] = child
            if member.session == member.pid { try child.leadSession() }
        }
        // Process groups: leaders make theirs, then the others join. A group outside the tree
        // (the root's, when it leads none) is the one the root has now, which all inherited.
        let outsideGroup = root.processGroup != root.pid ? root.processGroup : nil
        for leadersPass in [true, false] {
            for member in members where member.session != member.pid && member.processGroup != outsideGroup {
                guard (member.processGroup == member.pid) == leadersPass else { continue }
                try byImagePID[member.pid]!.joinProcessGroup(leadersPass ? 0 : localID(member.processGroup))
            }
        }
        for member in members {
            guard let zombie = member.zombie else { continue }
            try byImagePID[member.pid]!.exitAsZombie(waitStatus: zombie.waitStatus)
            try byImagePID[member.parent]!.drainChildSignal()
        }
    }

    // MARK: 3. contents

    /// Applies object data and writes each process's page blocks. Returns the milliseconds spent.
    private func streamContents(_ reader: ImageReader, objects: SharedObjects, builders: [AddressSpaceBuilder]) throws -> Double {
        let live = metadata.tree.liveMembers
        // A single-process image of format 1.0 has no process-pages record.
        var current: AddressSpaceBuilder? = builders.count == 1 ? builders[0] : nil
        let start = monotonicNanoseconds()
        while let item = try reader.next() {
            switch item {
            case let .pages(runs, data):
                guard let current else { throw reader.malformed("page data before any process-pages record", kind: .pages) }
                try current.writePages(runs, data: data, reader: reader)
            case let .record(kind, payload) where kind == .objectData:
                guard let data = ObjectData.decode(payload) else { throw reader.malformed("object data record does not decode", kind: kind) }
                try objects.apply(data)
            case let .record(kind, payload) where kind == .processPages:
                let marker = try reader.decode(ProcessPagesRecord.self, payload, kind: kind)
                guard let index = live.firstIndex(where: { $0.pid == marker.pid }) else {
                    throw reader.malformed("pages for PID \(marker.pid), which the tree does not hold", kind: kind)
                }
                current = builders[index]
            case let .record(kind, _) where kind == .end:
                break
            case let .record(kind, _):
                throw reader.malformed("unexpected \(kind) record among page blocks", kind: kind)
            }
        }
        return milliseconds(monotonicNanoseconds() - start)
    }

    // MARK: 4. the rest of each process

    private func finish(_ builder: AddressSpaceBuilder, metadata: ImageMetadata, objects: SharedObjects) throws {
        let process = builder.process
        let caller = builder.caller
        let scratch = builder.scratch!
        let record = metadata.process
        try PhaseTimer.measure("restore: files") { try FileTableRestore.restore(metadata.files, caller: caller, executor: builder.executor, scratch: scratch,
                                                                           objects: objects, process: process) }
        try PhaseTimer.measure("restore: limits") { try Restorer.restoreLimits(record.limits, pid: process.pid) }
        // cwd, umask, personality and signal actions in one batch.
        scratch.reset()
        var calls: [StubExecutor.Call] = [
            .init(.chdir, try scratch.place(cString: record.workingDirectory), what: "chdir \(record.workingDirectory)"),
            .init(.umask, UInt64(record.umask), what: "umask"),
            .init(.personality, UInt64(record.personality), what: "personality"),
        ]
        // The stub reset every disposition to SIG_DFL; set the ones the process had changed.
        for action in record.signalActions {
            let address = try scratch.place(words: [action.handler, action.flags, action.restorer, action.mask])
            calls.append(.init(.rtSigaction, UInt64(action.signal), address, 0, 8, what: "sigaction \(action.signal)"))
        }
        try builder.executor.run(calls)

        try ThreadBuilder.createThreads(metadata.threads, process: process, caller: caller, scratch: scratch, localTID: localTID)
        // The parent-death signal: the root's parent is Stasis, which is about to go, so the
        // root gets none; every other process gets its own again (its parent is restored too).
        let isRoot = process === made[0]
        for thread in metadata.threads {
            let tid = process.localThreads[localTID(thread)]!
            try ThreadBuilder.restoreKernelState(thread, tid: tid, executor: builder.executor, scratch: scratch,
                                                 parentDeathSignal: isRoot ? 0 : thread.parentDeathSignal ?? 0)
        }
        try Restorer.queuePendingSignals(metadata, caller: caller, scratch: scratch, pid: process.localPID, localTID: localTID)
        try Restorer.restoreCredentials(record.credentials, executor: builder.executor, scratch: scratch)
        try builder.executor.remove(caller: caller)
        try caller.call(.munmap, scratch.address, scratch.size, what: "drop the scratch area")
        for thread in metadata.threads {
            try ThreadBuilder.restoreCPUState(thread, tid: process.localThreads[localTID(thread)]!, tracer: process.tracer)
        }
    }

    /// Kills everything made so far, children first.
    private func abandon() {
        for process in made.reversed() { process.abandon() }
        if topIsReaper && topPID > 0 {
            _ = kill(topPID, SIGKILL)
            var status: Int32 = 0
            _ = stasis_waitpid(topPID, &status, 0)
        }
    }
}
