import Foundation
import Synchronization

/// A persistent pool of threads that run one job together, SPMD style: every participant (the
/// caller is participant 0) runs the same closure with its own index and meets the others at
/// `barrier()`s inside it.
///
/// Why our own and not OpenBLAS's threads: batch-1 decode is 49 matrix-vector products of 0.5-9 MB
/// per token, each ~50-400 µs. OpenBLAS hands each call to its workers and back, and its profile
/// shows the hand-offs (`sched_yield`) as about 30% of decode time. Here the workers are woken once
/// per token and the phases of a token meet at spin barriers of well under a microsecond.
///
/// Workers spin for a short while after a job (the next token usually follows within
/// microseconds), then sleep on a condition variable, so an idle server uses no CPU.
/// One job runs at a time: a caller that finds the pool busy runs its job alone (`count` 1)
/// instead of waiting, so concurrent engines never deadlock or oversubscribe the cores.
public final class WorkerPool: @unchecked Sendable {
    /// The participants of a job: `index` in 0..<count.
    public struct Context {
        public let index: Int
        public let count: Int
        let pool: WorkerPool?

        /// Waits until every participant has reached this barrier.
        @inline(__always) public func barrier() { if count > 1 { pool!.barrier() } }

        /// The part [lo, hi) of 0..<n that this participant takes, in multiples of `align`.
        @inline(__always) public func share(_ n: Int, align: Int = 1) -> Range<Int> {
            if count == 1 { return 0..<n }
            let units = (n + align - 1) / align
            let lo = min(n, units * index / count * align), hi = min(n, units * (index + 1) / count * align)
            return lo..<hi
        }
    }

    /// Participants of a job, the caller included.
    public let count: Int

    private let generation = Atomic<Int>(0)      // bumped once per job
    private let finished = Atomic<Int>(0)        // workers done with the current job
    private let arrived = Atomic<Int>(0)         // barrier arrivals
    private let barrierRound = Atomic<Int>(0)    // barrier generation
    private let busy = Atomic<Bool>(false)
    private var job: ((Context) -> Void)?
    private var sleepers = 0                     // guarded by `mutex`
    private var mutex = pthread_mutex_t()
    private var wake = pthread_cond_t()
    /// Spins a worker makes on an unchanged generation before it sleeps (about 1-2 ms).
    private let spinLimit = 200_000

    /// A pool of `threads` participants: the caller plus threads - 1 workers.
    public init(threads: Int) {
        count = max(1, threads)
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&wake, nil)
        for w in 1..<count {
            let t = Thread { self.workerLoop(index: w) }   // pools live as long as the process
            t.name = "pf2lora-worker-\(w)"
            t.stackSize = 1 << 20
            t.start()
        }
    }

    /// The process-wide pool used by inference: `preferredThreads`, else `PF2LORA_THREADS`, else one
    /// participant per active core. It is made on first use and lives for the whole process.
    public static let shared: WorkerPool = {
        let env = ProcessInfo.processInfo.environment["PF2LORA_THREADS"].flatMap { Int($0) } ?? 0
        let n = preferredThreads > 0 ? preferredThreads : env > 0 ? env : ProcessInfo.processInfo.activeProcessorCount
        return WorkerPool(threads: n)
    }()

    /// Participants of `shared` when set before its first use (the CLI's `--threads`).
    public static var preferredThreads = 0

    /// Runs `body` on every participant and returns when all are done. If another job is running,
    /// runs `body` alone on the calling thread.
    public func run(_ body: @escaping (Context) -> Void) {
        if count == 1 || !busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged {
            body(Context(index: 0, count: 1, pool: nil))
            return
        }
        job = body
        finished.store(0, ordering: .relaxed)
        generation.add(1, ordering: .sequentiallyConsistent)
        pthread_mutex_lock(&mutex)
        if sleepers > 0 { pthread_cond_broadcast(&wake) }
        pthread_mutex_unlock(&mutex)
        body(Context(index: 0, count: count, pool: self))
        var spins = 0
        while finished.load(ordering: .acquiring) < count - 1 { Self.backOff(&spins) }
        job = nil
        busy.store(false, ordering: .releasing)
    }

    private func barrier() {
        let round = barrierRound.load(ordering: .acquiring)
        if arrived.add(1, ordering: .acquiringAndReleasing).newValue == count {
            arrived.store(0, ordering: .relaxed)
            barrierRound.add(1, ordering: .releasing)
        } else {
            var spins = 0
            while barrierRound.load(ordering: .acquiring) == round { Self.backOff(&spins) }
        }
    }

    /// A waiting participant spins first (the others are usually microseconds away), then yields
    /// its core on every check: when the cores are oversubscribed (training beside serving, more
    /// participants than cores) the one it waits for may be the one that needs the core.
    @inline(__always) private static func backOff(_ spins: inout Int) {
        spins += 1
        if spins > 4096 { sched_yield() }
    }

    private func workerLoop(index: Int) {
        var seen = 0
        while true {
            var spins = 0
            while generation.load(ordering: .sequentiallyConsistent) == seen {
                spins += 1
                if spins < spinLimit { continue }
                pthread_mutex_lock(&mutex)
                sleepers += 1
                while generation.load(ordering: .sequentiallyConsistent) == seen { pthread_cond_wait(&wake, &mutex) }
                sleepers -= 1
                pthread_mutex_unlock(&mutex)
            }
            seen = generation.load(ordering: .acquiring)
            job?(Context(index: index, count: count, pool: self))
            finished.add(1, ordering: .releasing)
        }
    }
}
