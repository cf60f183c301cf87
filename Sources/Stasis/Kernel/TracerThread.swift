import CStasis
import Glibc

/// The one OS thread from which Stasis issues every ptrace request.
///
/// The kernel ties a ptrace relationship to the *thread* that attached: requests from any other
/// thread fail with ESRCH, and a child created with PR_SET_PDEATHSIG dies with the thread that
/// created it. `TracerThread` makes that rule part of the types: a `Tracer` — the only value
/// with ptrace methods — is created on this thread, handed to the closure given to `perform`,
/// and is not `Sendable`, so it cannot be carried to another thread.
///
/// Guarantees: closures run one at a time, in order, on the same pthread for the thread's
/// whole life; `perform` blocks its caller until the closure returns and rethrows its error.
public final class TracerThread: @unchecked Sendable {
    private var thread = pthread_t()
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var pending: [() -> Void] = []
    private var stopping = false
    /// The kernel TID of the tracer thread.
    public private(set) var tid: pid_t = 0

    public init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
        let box = Unmanaged.passRetained(self)
        let started = pthread_create(&thread, nil, { context in
            let me = Unmanaged<TracerThread>.fromOpaque(context!).takeRetainedValue()
            me.runLoop()
            return nil
        }, box.toOpaque())
        precondition(started == 0, "pthread_create for the tracer thread failed: \(started)")
        // Wait until the thread has published its TID.
        pthread_mutex_lock(mutex)
        while tid == 0 { pthread_cond_wait(condition, mutex) }
        pthread_mutex_unlock(mutex)
    }

    private func runLoop() {
        // The tracer must receive no asynchronous signals of its own (SIGINT handling is
        // done elsewhere); blocking them keeps waitpid() from being interrupted.
        var all = sigset_t()
        sigfillset(&all)
        pthread_sigmask(SIG_BLOCK, &all, nil)
        pthread_mutex_lock(mutex)
        tid = pid_t(stasis_gettid())
        pthread_cond_broadcast(condition)
        while true {
            while pending.isEmpty && !stopping { pthread_cond_wait(condition, mutex) }
            if pending.isEmpty && stopping { break }
            let job = pending.removeFirst()
            pthread_mutex_unlock(mutex)
            job()
            pthread_mutex_lock(mutex)
        }
        pthread_mutex_unlock(mutex)
    }

    /// Runs `body` on the tracer thread with the thread's `Tracer`, and waits for it.
    public func perform<T>(_ body: (Tracer) throws -> T) throws -> T {
        let completion = Completion<T>()
        withoutActuallyEscaping(body) { escapable in
            // The queued job holds only the box; the box drops the closure before the waiting
            // caller is woken, so the closure never outlives this scope.
            let box = BodyBox(escapable)
            enqueue {
                let tracer = Tracer(threadTID: pid_t(stasis_gettid()))
                completion.finish(box.runOnce(tracer))
            }
            completion.wait()
        }
        return try completion.result!.get()
    }

    private func enqueue(_ job: @escaping @Sendable () -> Void) {
        pthread_mutex_lock(mutex)
        pending.append(job)
        pthread_cond_broadcast(condition)
        pthread_mutex_unlock(mutex)
    }

    /// Lets the thread finish its queue and exit. Children created with a parent-death signal
    /// on this thread receive it when the thread exits.
    public func shutdown() {
        pthread_mutex_lock(mutex)
        stopping = true
        pthread_cond_broadcast(condition)
        pthread_mutex_unlock(mutex)
        pthread_join(thread, nil)
    }
}

/// The caller's closure, handed to the tracer thread while the caller blocks in `perform`.
private final class BodyBox<T>: @unchecked Sendable {
    private var body: ((Tracer) throws -> T)?
    init(_ body: @escaping (Tracer) throws -> T) { self.body = body }

    func runOnce(_ tracer: Tracer) -> Result<T, any Error> {
        let result = Result { try body!(tracer) }
        body = nil
        return result
    }
}

/// A one-shot result handed from the tracer thread to the thread waiting in `perform`.
private final class Completion<T>: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private(set) var result: Result<T, any Error>?

    init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        pthread_cond_destroy(condition)
        mutex.deallocate()
        condition.deallocate()
    }

    func finish(_ value: Result<T, any Error>) {
        pthread_mutex_lock(mutex)
        result = value
        pthread_cond_signal(condition)
        pthread_mutex_unlock(mutex)
    }

    func wait() {
        pthread_mutex_lock(mutex)
        while result == nil { pthread_cond_wait(condition, mutex) }
        pthread_mutex_unlock(mutex)
    }
}
