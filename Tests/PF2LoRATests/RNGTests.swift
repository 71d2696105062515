import Testing
@testable import PF2LoRA

@Suite struct RNGTests {
    /// SplitMix64 from seed 0 against the first outputs of the reference implementation
    /// (Vigna, splitmix64.c), which seeds every `RNG` and the benchmarks' deterministic texts.
    @Test func splitMix64MatchesTheReference() {
        var g = SplitMix64(seed: 0)
        #expect(g.next() == 0xE220_A839_7B1D_CDAF)
        #expect(g.next() == 0x6E78_9E6A_A1B9_65F4)
        #expect(g.next() == 0x06C4_5D18_8009_454F)
    }

    /// Equal seeds give equal streams; `derive` does not advance its parent and keys give distinct children.
    @Test func streamsFollowTheirSeeds() {
        var a = RNG(seed: 7), b = RNG(seed: 7), c = RNG(seed: 8)
        let xs = (0..<8).map { _ in a.next() }, ys = (0..<8).map { _ in b.next() }, zs = (0..<8).map { _ in c.next() }
        #expect(xs == ys && xs != zs)
        var d1 = a.derive(1), d1again = a.derive(1), d2 = a.derive(2)
        let first = d1.next()
        #expect(first == d1again.next() && first != d2.next() && a.next() == b.next())
    }
}
