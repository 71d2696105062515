// libFuzzer target: adapter file validation (LoRAAdapter.decode) on arbitrary bytes, both as a
// compressed file and as the raw safetensors inside one. Built by Fuzz/build.sh.
import Foundation

let fuzzBase: BaseModelInfo = {
    var linears: [String: (inFeatures: Int, outFeatures: Int)] = [:]
    for i in 0..<2 {
        linears["transformer.h.\(i).attn.c_attn"] = (8, 24)
        linears["transformer.h.\(i).attn.c_proj"] = (8, 8)
        linears["transformer.h.\(i).mlp.c_fc"] = (8, 32)
        linears["transformer.h.\(i).mlp.c_proj"] = (32, 8)
    }
    return BaseModelInfo(name: "tiny", fingerprint: "0123456789abcdef", linears: linears)
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func adapterFuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let raw = UnsafeRawBufferPointer(start: data, count: size)
    // As a file from the store (zstd frame of a safetensors file), with a 1 MiB size bound.
    do { _ = try LoRAAdapter.decode(compressed: raw, name: "fuzz", base: fuzzBase, sizeLimit: 1 << 20) } catch {
        precondition(error is AdapterError, "decode threw a non-AdapterError: \(error)")
    }
    // As the safetensors inside: copy into owned aligned bytes, as the decoder does.
    let owned = AlignedBytes(count: size)
    if size > 0 { owned.pointer.copyMemory(from: data, byteCount: size) }
    do { _ = try LoRAAdapter.decodeSafetensors(owned.readOnly, owner: owned, name: "fuzz", base: fuzzBase, expectedLevel: nil) } catch {
        precondition(error is AdapterError, "decodeSafetensors threw a non-AdapterError: \(error)")
    }
    return 0
}
