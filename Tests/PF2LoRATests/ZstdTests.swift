import Foundation
import Testing
@testable import PF2LoRA

@Suite struct ZstdTests {
    static let payload: Data = {
        var d = Data()
        for i in 0..<20_000 { d.append(UInt8(truncatingIfNeeded: (i * 31) ^ (i >> 3))) }
        return d
    }()

    @Test func roundTripRecordsSizeAndChecksum() throws {
        let c = try Zstd.compress(Self.payload, level: 3)
        #expect(c.count < Self.payload.count)
        let n = try c.withUnsafeBytes { try Zstd.frameContentSize($0, name: "x") }
        #expect(n == Self.payload.count)
        // Frame header descriptor: bit 2 is the content checksum flag.
        #expect(c[4] & 0x04 != 0)
        #expect(try Zstd.decompress(c, limit: 1 << 20) == Self.payload)
        #expect(try Zstd.decompress(Zstd.compress(Data()), limit: 10) == Data())
    }

    @Test func rejectsNonZstd() {
        #expect(throws: ZstdError.notZstd(name: "x")) { try Zstd.decompress(Data("hello world".utf8), limit: 100, name: "x") }
        #expect(throws: ZstdError.notZstd(name: "x")) { try Zstd.decompress(Data(), limit: 100, name: "x") }
    }

    @Test func rejectsTruncationAtEveryLength() throws {
        let c = try Zstd.compress(Self.payload)
        for len in [1, 3, 4, 5, 8, 12, 17, c.count / 2, c.count - 5, c.count - 1] {
            let cut = c.prefix(len)
            #expect(throws: ZstdError.truncated(name: "x", size: len)) { try Zstd.decompress(cut, limit: 1 << 20, name: "x") }
        }
    }

    @Test func rejectsClaimAboveLimit() throws {
        let c = try Zstd.compress(Self.payload)
        #expect(throws: ZstdError.tooLarge(name: "x", claimed: UInt64(Self.payload.count), limit: 1000)) {
            try Zstd.decompress(c, limit: 1000, name: "x")
        }
    }

    @Test func detectsBitFlipsInTheBody() throws {
        let c = try Zstd.compress(Self.payload)
        var detected = 0, tried = 0
        for pos in stride(from: 10, to: c.count, by: max(1, c.count / 40)) {
            for bit in [0, 3, 7] {
                var bad = c
                bad[pos] ^= UInt8(1 << bit)
                tried += 1
                do {
                    let out = try Zstd.decompress(bad, limit: 1 << 20, name: "x")
                    #expect(out != Self.payload, "a flip that decompresses must not give the original")
                } catch is ZstdError { detected += 1 }
            }
        }
        // With the content checksum, every flip is caught.
        #expect(detected == tried)
    }

    @Test func rejectsTrailingBytes() throws {
        var c = try Zstd.compress(Self.payload)
        c.append(contentsOf: [1, 2, 3])
        #expect(throws: ZstdError.trailingBytes(name: "x", count: 3)) { try Zstd.decompress(c, limit: 1 << 20, name: "x") }
    }
}
