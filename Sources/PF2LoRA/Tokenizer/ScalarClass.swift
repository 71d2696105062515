/// The four classes the GPT-2 pre-tokenizer regex tells apart.
enum ScalarClass: UInt8 {
    case other = 0       // [^\s\p{L}\p{N}]
    case letter = 1      // \p{L}
    case number = 2      // \p{N}
    case whitespace = 3  // \s
}

/// Class of every code point, one byte each (1.1 MB), expanded once from `gpt2ScalarClassRuns` and
/// never freed. A flat table keeps the scanner's lookup to one load. Written once by the lazy
/// initializer (which Swift runs once, thread-safely), read-only after.
nonisolated(unsafe) let scalarClassTable: UnsafePointer<UInt8> = {
    let t = UnsafeMutablePointer<UInt8>.allocate(capacity: 0x110000)
    t.initialize(repeating: 0, count: 0x110000)
    let runs = gpt2ScalarClassRuns
    for i in 0..<runs.count {
        let start = Int(runs[i] >> 2)
        let end = i + 1 < runs.count ? Int(runs[i + 1] >> 2) : 0x110000
        let cls = UInt8(runs[i] & 3)
        if cls != 0 { (t + start).update(repeating: cls, count: end - start) }
    }
    return UnsafePointer(t)
}()
