import Foundation
import Synchronization
import Testing
@testable import PF2LoRA

/// The worker pool's contention policy: when its jobs run alone, and that a job's answer does not
/// depend on whether it ran pooled or alone.
@Suite struct WorkerPoolTests {
    @Test func policySwitchesToSoloAfterContendedJobsAndBacksOff() {
        var p = ContentionPolicy()
        // Quiet jobs: stalls well under a quarter of the time. Nothing changes.
        for _ in 0..<100 { p.record(jobNanos: 1_000_000, stallNanos: 10_000) }
        #expect(!p.solo && p.switches == 0)
        // Two contended jobs, then a quiet one: the streak resets.
        p.record(jobNanos: 1_000_000, stallNanos: 600_000); p.record(jobNanos: 1_000_000, stallNanos: 600_000)
        p.record(jobNanos: 1_000_000, stallNanos: 0)
        #expect(!p.solo)
        // Three in a row: solo for minSoloJobs jobs.
        for _ in 0..<3 { p.record(jobNanos: 1_000_000, stallNanos: 600_000) }
        #expect(p.solo && p.soloLeft == p.minSoloJobs && p.switches == 1)
        for _ in 0..<p.minSoloJobs { p.soloJobDone() }
        #expect(!p.solo && p.soloRuns == p.minSoloJobs)
        // Still contended when the pool is tried again: the next solo period is twice as long.
        for _ in 0..<3 { p.record(jobNanos: 1_000_000, stallNanos: 900_000) }
        #expect(p.soloLeft == 2 * p.minSoloJobs && p.switches == 2)
        for _ in 0..<p.soloLeft { p.soloJobDone() }
        // Quiet again: back to pooled jobs, and the period resets.
        p.record(jobNanos: 1_000_000, stallNanos: 0)
        #expect(!p.solo && p.soloJobs == p.minSoloJobs)
        // The period is bounded.
        for _ in 0..<40 {
            for _ in 0..<3 { p.record(jobNanos: 1_000_000, stallNanos: 900_000) }
            while p.solo { p.soloJobDone() }
        }
        #expect(p.soloJobs == p.maxSoloJobs)
    }

    /// More participants than cores with a busy loop on every core: the pool's waits stall, the
    /// policy notices within a few hundred jobs, and every job still computes the same sum.
    @Test func oversubscribedPoolGoesSoloAndStaysCorrect() throws {
        let cores = ProcessInfo.processInfo.activeProcessorCount
        let pool = WorkerPool(threads: cores + 2)
        let t = Tensor(zeros: [1 << 16])
        for i in 0..<t.count { t.data[i] = Float(i % 7) }
        let expected = (0..<t.count).reduce(Float(0)) { $0 + Float($1 % 7) }
        let stop = Atomic<Bool>(false)
        let hogs = (0..<cores).map { _ in Thread { while !stop.load(ordering: .relaxed) {} } }
        hogs.forEach { $0.start() }
        defer { stop.store(true, ordering: .relaxed) }
        let deadline = Date().addingTimeInterval(20)
        while pool.policy.switches == 0 && Date() < deadline {
            #expect(pool.sumAll([t]) == expected)
        }
        #expect(pool.policy.switches >= 1, "the policy never saw the contention")
        // Solo jobs give the same answer.
        #expect(pool.sumAll([t]) == expected)
    }

    /// `Context.chunks` hands out every chunk exactly once, in any phase, with any participant late
    /// (the others steal its share); each participant streams its own share: the chunks it takes
    /// from it are the share's first ones in order, before any it steals, and it steals from the
    /// backs. Fails with chunks handed out in turn from one counter (two cores then interleave
    /// their reads chunk by chunk, the 2-thread q8_0 decode miss of issue 14).
    @Test(arguments: [2, 3]) func chunksCoverEverythingOnceAndStreamContiguousShares(participants: Int) {
        let pool = WorkerPool(threads: participants)
        pool.adaptive = false
        let cases: [(n: Int, size: Int)] = [(0, 64), (1, 64), (63, 64), (64, 64), (65, 64), (640, 64), (1000, 64), (49152, 256), (5, 1)]
        for late in [-1] + Array(0..<participants) {
            // Per participant: (phase, chunk start) in the order taken; written only by that participant.
            let logs = (0..<participants).map { _ in Box<[(Int, Int)]>([]) }
            pool.run { ctx in
                for (phase, c) in cases.enumerated() {
                    if ctx.index == late && phase % 2 == 1 { usleep(20_000) }   // the others steal its share
                    ctx.chunks(c.n, size: c.size, phase: phase) { r in
                        precondition(r.count == min(c.size, c.n - r.lowerBound))
                        logs[ctx.index].value.append((phase, r.lowerBound))
                    }
                    ctx.barrier()
                }
            }
            for (phase, c) in cases.enumerated() {
                let total = (c.n + c.size - 1) / c.size
                var seen = [Int](repeating: 0, count: total)
                for t in 0..<participants {
                    let taken = logs[t].value.filter { $0.0 == phase }.map { $0.1 / c.size }
                    taken.forEach { seen[$0] += 1 }
                    let s0 = total * t / participants, s1 = total * (t + 1) / participants
                    let own = taken.prefix { (s0..<s1).contains($0) }
                    #expect(Array(own) == Array(s0..<(s0 + own.count)), "participant \(t) of \(participants), late \(late), case \(c): own share not streamed in order: \(taken.prefix(8))")
                    #expect(!taken.dropFirst(own.count).contains { (s0..<s1).contains($0) }, "participant \(t): own chunks after stolen ones")
                    if late != t && late >= 0 && phase % 2 == 1 && total >= 4 * participants {
                        // Stolen chunks come from the backs of the victims' shares, descending.
                        let stolen = taken.dropFirst(own.count).filter { total * late / participants <= $0 && $0 < total * (late + 1) / participants }
                        #expect(stolen == stolen.sorted(by: >), "participant \(t): stole out of order \(stolen.prefix(8))")
                    }
                }
                #expect(seen == [Int](repeating: 1, count: total), "participants \(participants), late \(late), case \(c): a chunk taken \(seen.max() ?? 0) times or never")
            }
        }
    }
}

/// A mutable value shared by reference with a pooled job's participants (each writes its own).
private final class Box<T>: @unchecked Sendable {
    var value: T
    init(_ v: T) { value = v }
}
