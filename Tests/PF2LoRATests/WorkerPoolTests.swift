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
}
