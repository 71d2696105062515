import Foundation
import Synchronization
import CMemory

/// A persistent pool of threads that run one job together, SPMD style: every participant (the
/// caller is participant 0) runs the same closure with its own index and meets the others at
/// `barrier()`s inside it.
///
/// The process's only parallelism: OpenBLAS runs one thread, its large products split over a pool
/// (`BLAS.gemm`). Why our own and not OpenBLAS's threads: batch-1 decode is 49 matrix-vector
/// products of 0.5-9 MB per token, each ~50-400 µs. OpenBLAS hands each call to its workers and back, and its profile
/// shows the hand-offs (`sched_yield`) as about 30% of decode time. Here the workers are woken once
/// per token and the phases of a token meet at spin barriers of well under a microsecond.
///
/// Workers spin for a short while after a job (the next token usually follows within
/// microseconds), then sleep on a condition variable, so an idle server uses no CPU.
/// One job runs at a time: a caller that finds the pool busy runs its job alone (`count` 1)
/// instead of waiting, so concurrent engines never deadlock or oversubscribe the cores.
///
/// Shared between threads by design: `job` is written by the caller before the `generation` bump
/// (sequentially consistent) and read by workers after they see it; `policy` and `adaptive` are
/// touched only by a caller holding `busy` (acquired and released atomically) or outside jobs;
/// `sleepers` only while holding `sleep`; everything else is atomic or immutable.
public final class WorkerPool: @unchecked Sendable {
    /// The participants of a job: `index` in 0..<count.
    public struct Context {
        public let index: Int
        public let count: Int
        /// Unretained: a job never outlives its pool, and copying a context then touches no reference
        /// count (an atomic instruction, which waits for the weight streams' loads in flight).
        unowned(unsafe) let pool: WorkerPool?

        /// Waits until every participant has reached this barrier.
        @inline(__always) public func barrier() { if count > 1 { pool!.barrier(caller: index == 0) } }

        /// Runs `body` on chunks of 0..<n: each participant owns a contiguous share and takes it in
        /// order from its front, half of what is left at a time but at least `size` (CMemory.h's
        /// `pf2lora_take_front`: each take is a locked instruction, which waits for the weight
        /// stream's loads in flight); a participant whose share is gone takes the others' from their
        /// backs a quarter chunk at a time, so one slowed by anything (an interrupt, a busier memory
        /// channel) does less and the participants finish within about a chunk of each other.
        /// Chunks start at multiples of `size / 4` (`size` a multiple of 16 keeps q8_0's 4-row groups
        /// whole). Contiguous shares matter for the weight streams: with chunks handed out in turn
        /// from one counter, two cores each jump a chunk ahead every chunk, and a q8_0 decode step read
        /// its weights at 0.74x of two cores' plain read against 0.91-0.97x with shares
        /// (Benchmarks/q8_0x4_threads_microbench.c). Which participant computes a chunk never changes its
        /// values. `phase` numbers the calls of one job 0, 1, 2, ... with at least one barrier between
        /// consecutive calls; each participant resets its own counter two phases ahead (its cache
        /// line then stays in its own cache), and all are reset at the start of each job.
        @inline(__always) public func chunks(_ n: Int, size: Int, phase: Int, _ body: (Range<Int>) -> Void) {
            if count == 1 { body(0..<n); return }
            let p = pool!
            pf2lora_store_relaxed(p.range(slot: (phase + 2) & 3, participant: index), 0)
            let unit = max(1, size / 4), units = (n + unit - 1) / unit, most = max(1, size / unit)
            for k in 0..<count {
                let o = (index + k) % count
                let s0 = shareStart(units, o), len = shareStart(units, o + 1) - s0
                let c = p.range(slot: phase & 3, participant: o)
                while true {
                    var got = 1
                    let i = k == 0 ? pf2lora_take_front(c, len, most, &got) : pf2lora_take_back(c, len)
                    if i < 0 { break }
                    let lo = (s0 + i) * unit
                    body(lo..<min(n, lo + got * unit))
                }
            }
        }

        /// The rows of 0..<n that `chunks(n, size:)` gives this participant before it steals: its
        /// own share (minus what others steal from its back).
        @inline(__always) public func ownShare(_ n: Int, size: Int) -> Range<Int> {
            if count == 1 { return 0..<n }
            let unit = max(1, size / 4), units = (n + unit - 1) / unit
            return min(n, shareStart(units, index) * unit)..<min(n, shareStart(units, index + 1) * unit)
        }

        /// The first of `units` units in participant o's share (o = count: the end).
        @inline(__always) private func shareStart(_ units: Int, _ o: Int) -> Int { units * o / count }

        /// `barrier()`, asking for up to `bytes` at `next` while it waits for the others (512 bytes
        /// per check): the reads this participant starts with after the barrier, so that waiting
        /// for a slower participant streams them into its caches instead of idling. Hints only.
        @inline(__always) public func barrier(prefetching next: UnsafeRawPointer?, bytes: Int) {
            if count > 1 { pool!.barrier(caller: index == 0, prefetch: next, bytes: bytes) }
        }

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
    private let stallNanos = Atomic<Int>(0)      // this job's caller waits past their spinning phase
    /// `Context.chunks`' taken counts: 4 phase slots x `count` participants, one 64-byte line each
    /// (written only through CMemory's atomic helpers).
    private let ranges: UnsafeMutablePointer<UInt64>
    private var job: ((Context) -> Void)?        // written before `generation` is bumped, read after
    /// Where idle workers sleep: a heap-allocated mutex and condition variable (a pthread_mutex_t
    /// stored inline in a class and passed as `&mutex` has no stable address in Swift).
    private let sleep = NSCondition()
    private var sleepers = 0                     // guarded by `sleep`
    /// Spins a worker makes on an unchanged generation before it sleeps (about 1-2 ms).
    private let spinLimit = 200_000

    /// A pool of `threads` participants: the caller plus threads - 1 workers.
    public init(threads: Int) {
        count = max(1, threads)
        let raw = UnsafeMutableRawPointer.allocate(byteCount: 4 * count * 64, alignment: 64)
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: 4 * count * 64)
        ranges = raw.bindMemory(to: UInt64.self, capacity: 4 * count * 8)
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
    public static var preferredThreads: Int {
        get { preferred.load(ordering: .relaxed) }
        set { preferred.store(newValue, ordering: .relaxed) }
    }
    private static let preferred = Atomic<Int>(0)

    /// Runs `body` on every participant and returns when all are done. If another job is running,
    /// runs `body` alone on the calling thread.
    /// Runs alone on the caller while the contention policy says so (see `ContentionPolicy`).
    public func run(_ body: @escaping (Context) -> Void) {
        if count == 1 || !busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged {
            body(Context(index: 0, count: 1, pool: nil))
            return
        }
        if adaptive && policy.solo {
            policy.soloJobDone()
            busy.store(false, ordering: .releasing)
            body(Context(index: 0, count: 1, pool: nil))
            return
        }
        let t0 = Self.monotonicNanos()
        stallNanos.store(0, ordering: .relaxed)
        job = body
        finished.store(0, ordering: .relaxed)
        for slot in 0..<4 { resetRanges(slot: slot) }
        generation.add(1, ordering: .sequentiallyConsistent)
        sleep.lock()
        if sleepers > 0 { sleep.broadcast() }
        sleep.unlock()
        body(Context(index: 0, count: count, pool: self))
        var spins = 0, since: UInt64 = 0
        while finished.load(ordering: .acquiring) < count - 1 { Self.backOff(&spins, &since) }
        endWait(since)
        job = nil
        // Accounted whether or not the policy may act (its statistics are `bench`'s to report).
        policy.record(jobNanos: Double(Self.monotonicNanos() &- t0), stallNanos: Double(stallNanos.load(ordering: .relaxed)))
        busy.store(false, ordering: .releasing)
    }

    /// Whether the contention policy may run jobs alone; off, every job uses every participant
    /// (`bench decode --pool-policy always` measures that). Set before jobs run.
    public var adaptive = true
    /// The contention state (read by `bench` and tests; updated only by the job's caller).
    public private(set) var policy = ContentionPolicy()

    @inline(__always) fileprivate func range(slot: Int, participant: Int) -> UnsafeMutablePointer<UInt64> {
        ranges + (slot * count + participant) * 8
    }

    @inline(__always) fileprivate func resetRanges(slot: Int) {
        for p in 0..<count { pf2lora_store_relaxed(range(slot: slot, participant: p), 0) }
    }

    private func barrier(caller: Bool, prefetch: UnsafeRawPointer? = nil, bytes: Int = 0) {
        let round = barrierRound.load(ordering: .acquiring)
        if arrived.add(1, ordering: .acquiringAndReleasing).newValue == count {
            arrived.store(0, ordering: .relaxed)
            barrierRound.add(1, ordering: .releasing)
        } else {
            var spins = 0, since: UInt64 = 0, next = prefetch, left = bytes
            while barrierRound.load(ordering: .acquiring) == round {
                if left > 0, let p = next {
                    pf2lora_prefetch(p, min(left, 512))
                    next = p + 512; left -= 512
                } else {
                    Self.backOff(&spins, &since)
                }
            }
            if caller { endWait(since) }
        }
    }

    /// A waiting participant spins first (the others are usually microseconds away), then yields
    /// its core on every check: when the cores are oversubscribed (training beside serving, more
    /// participants than cores) the one it waits for may be the one that needs the core.
    /// `since` is set when the wait leaves the spinning phase, for the stall accounting.
    @inline(__always) private static func backOff(_ spins: inout Int, _ since: inout UInt64) {
        spins += 1
        if spins > 4096 {
            if since == 0 { since = monotonicNanos() }
            sched_yield()
        }
    }

    /// Adds the time a wait of the caller (participant 0) spent past its spinning phase to the job's
    /// stall total. The caller waits at every barrier and at the end of the job, so whoever is late,
    /// the caller's stalls measure it.
    @inline(__always) private func endWait(_ since: UInt64) {
        if since != 0 { stallNanos.add(Int(Self.monotonicNanos() &- since), ordering: .relaxed) }
    }

    @inline(__always) static func monotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    private func workerLoop(index: Int) {
        var seen = 0
        while true {
            var spins = 0
            while generation.load(ordering: .sequentiallyConsistent) == seen {
                spins += 1
                if spins < spinLimit { continue }
                sleep.lock()
                sleepers += 1
                while generation.load(ordering: .sequentiallyConsistent) == seen { sleep.wait() }
                sleepers -= 1
                sleep.unlock()
            }
            seen = generation.load(ordering: .acquiring)
            job?(Context(index: index, count: count, pool: self))
            finished.add(1, ordering: .releasing)
        }
    }
}

/// When to run the pool's jobs on the caller alone.
///
/// The pool's barriers assume every participant has a core. When the machine is oversubscribed (a
/// build, a training thread beside serving, another process), a participant that lost its core holds
/// up every barrier until the scheduler gives it back: with one spinning process beside it, a 2-thread
/// decode step of the 124M shape took 2.4x the time of a 1-thread one (Benchmarks/README.md). So
/// every pooled job measures how long its caller waited for the others past the spinning phase of its
/// waits ("stalls"; the caller waits at every barrier, so whoever is late shows up there).
///
/// Measured per decode step on 2 cores: a quiet machine stalls 1-3% of a step; the first few steps
/// after a prefill stalled 35-65% while OpenBLAS ran its own threads (they spin for ~0.1 s after a
/// GEMM; since session 13 OpenBLAS runs one thread and large products are split over this pool, see
/// `BLAS`); with one spinning process beside it, 80-96% on every step. A job whose stalls exceed
/// `stallFraction` (50%) and last at least `minStallNanos` (0.5 ms) counts as contended: a
/// participant that lost its core is gone for a scheduler slice (milliseconds), while a short job's
/// uneven split shows as tens of microseconds (session 15, AMD Zen 2: a 512-token SmolLM2 prefill's
/// per-layer attention jobs, 3 KV heads on 2 participants, took 30-140 us and the caller waited
/// 25-70 % of that; three in a row sent the pool solo, the solo periods doubled, and the decode after
/// the prefill ran on one core in a third of the runs: 75-83 instead of 116-140 tok/s). After
/// `trigger` (3) contended jobs in a row the pool
/// runs the next `soloJobs` jobs on the caller alone (no barriers, no wake-ups), then tries the pool
/// again. Each relapse doubles the solo period, from `minSoloJobs` (32) up to `maxSoloJobs`; an
/// uncontended pooled job resets it. A job's result does not depend on how many ran it.
public struct ContentionPolicy: Sendable, Equatable {
    public var stallFraction = 0.5
    public var minStallNanos = 500_000.0
    public var trigger = 3
    public var minSoloJobs = 32
    public var maxSoloJobs = 4096
    /// Contended pooled jobs in a row.
    public private(set) var streak = 0
    /// Solo jobs left before the pool is tried again.
    public private(set) var soloLeft = 0
    /// The next solo period.
    public private(set) var soloJobs = 32
    /// Jobs run alone because of contention, and times the policy switched to solo (for `bench`).
    public private(set) var soloRuns = 0
    public private(set) var switches = 0
    /// Pooled jobs accounted and the sum of their stall fractions (`bench` reports the mean).
    public private(set) var pooledJobs = 0
    public private(set) var stallFractionSum = 0.0

    public init() {}

    public var solo: Bool { soloLeft > 0 }

    /// Accounts one pooled job.
    public mutating func record(jobNanos: Double, stallNanos: Double) {
        pooledJobs += 1
        if jobNanos > 0 { stallFractionSum += stallNanos / jobNanos }
        if jobNanos > 0 && stallNanos > stallFraction * jobNanos && stallNanos >= minStallNanos {
            streak += 1
            if streak >= trigger {
                soloLeft = soloJobs
                soloJobs = min(maxSoloJobs, soloJobs * 2)
                streak = 0
                switches += 1
            }
        } else {
            streak = 0
            soloJobs = minSoloJobs
        }
    }

    /// Accounts one job run alone.
    public mutating func soloJobDone() {
        if soloLeft > 0 { soloLeft -= 1; soloRuns += 1 }
    }
}

extension WorkerPool {
    /// The sum of every element of `tensors`, each participant reading a contiguous share of each
    /// tensor with SIMD adds, with or without the decode kernels' software prefetch (6 KB ahead): the
    /// least work per byte there is, so the faster form's time is the memory-read limit for streaming
    /// those bytes (`pf2lora bench blas` times both and reports it as the bandwidth bound; which form
    /// is faster depends on the CPU, see CMemory.c).
    public func sumAll(_ tensors: [Tensor], prefetch: Bool = true) -> Float {
        let totals = Tensor(zeros: [count])
        run { ctx in
            var acc0 = SIMD16<Float>(), acc1 = SIMD16<Float>()
            var tail: Float = 0
            for t in tensors {
                let part = ctx.share(t.count, align: 32)
                var p = t.data + part.lowerBound
                let end = t.data + part.upperBound
                while p + 32 <= end {
                    if prefetch { pf2lora_prefetch(p + 1536, 128) }   // 6 KB ahead, as the decode kernels' weight streams with AVX-VNNI
                    acc0 += UnsafeRawPointer(p).loadUnaligned(as: SIMD16<Float>.self)
                    acc1 += UnsafeRawPointer(p + 16).loadUnaligned(as: SIMD16<Float>.self)
                    p += 32
                }
                while p < end { tail += p.pointee; p += 1 }
            }
            totals.data[ctx.index] = (acc0 + acc1).sum() + tail
        }
        return (0..<count).reduce(0) { $0 + totals.data[$1] }
    }
}
