import Foundation
import Testing
@testable import PF2LoRA

@Suite struct SafeTensorsTests {
    @Test func roundTripF32AndF16() throws {
        let a = Tensor([1, -2.5, 3.25, 0, 65504, 1e-3], shape: [2, 3])
        let data = SafeTensorsWriter.serialize(["a": a], metadata: ["k": "v"])
        let file = try data.withUnsafeBytes { raw in try SafeTensorsFile(bytes: raw, owner: data as NSData, name: "mem") }
        #expect(file.metadata == ["k": "v"])
        #expect(try file.tensor("a").array == a.array)
        let h = SafeTensorsWriter.serialize(["a": a], dtype: .f16)
        let fh = try h.withUnsafeBytes { raw in try SafeTensorsFile(bytes: raw, owner: h as NSData, name: "mem") }
        let back = try fh.tensor("a").array
        for (x, y) in zip(back, a.array) { #expect(abs(x - y) <= abs(y) * 1e-3) }
    }
}
