import ArgumentParser
import Foundation
import PF2LoRA

/// `pf2lora bench tokenizer`: encode throughput on one text, cold and warm cache, as JSON.
struct BenchTokenizer: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tokenizer",
        abstract: "Measure tokenizer encode throughput (MB/s) with a cold and a warm word cache; prints JSON.",
        discussion: """
            Encodes the text of --file (default: a generated ~1 MB mixed text of prose, code, digits and \
            Unicode) in one call, first right after emptying the word cache (cold), then --repeat times \
            with the cache filled (warm, best run). It does the same line by line, the way a server meets \
            many short prompts. MB is 10^6 bytes of UTF-8 input. Build with `swift build -c release` \
            before timing.

            Prints one JSON object with the keys: bytes, tokens, load_seconds, cold_seconds, \
            cold_mb_per_s, warm_seconds, warm_mb_per_s, lines, lines_cold_seconds, lines_cold_mb_per_s, \
            lines_warm_seconds, lines_warm_mb_per_s.

            Benchmarks/tokenizer_bench.py runs this next to Hugging Face tokenizers on the same text.
            """)

    @Option(help: ArgumentHelp("Model or tokenizer folder (tokenizer.json, or vocab.json + merges.txt).", valueName: "DIR"))
    var model: String

    @Option(help: ArgumentHelp("UTF-8 text file to encode (default: a generated ~1 MB mixed text).", valueName: "F"))
    var file: String?

    @Option(help: "Warm runs; the best one is reported.")
    var `repeat`: Int = 5

    func validate() throws {
        guard self.repeat >= 1 else { throw ValidationError("--repeat must be >= 1") }
    }

    func run() throws {
        let t0 = DispatchTime.now()
        let tokenizer = try BPETokenizer(folder: model)
        let loadSeconds = seconds(since: t0)

        let text: String
        if let file {
            guard let data = FileManager.default.contents(atPath: file) else { throw CLIError("\(file): cannot read the text file") }
            guard let s = String(validating: data, as: UTF8.self) else { throw CLIError("\(file): not valid UTF-8") }
            text = s
        } else {
            text = Self.mixedText(bytes: 1_000_000)
        }
        let bytes = text.utf8.count
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map { String($0) + "\n" }

        tokenizer.clearCache()
        var t = DispatchTime.now()
        let tokens = tokenizer.encode(text).count
        let cold = seconds(since: t)
        var warm = Double.infinity
        for _ in 0..<self.repeat {
            t = DispatchTime.now()
            _ = tokenizer.encode(text)
            warm = min(warm, seconds(since: t))
        }

        tokenizer.clearCache()
        t = DispatchTime.now()
        for line in lines { _ = tokenizer.encode(line) }
        let linesCold = seconds(since: t)
        var linesWarm = Double.infinity
        for _ in 0..<self.repeat {
            t = DispatchTime.now()
            for line in lines { _ = tokenizer.encode(line) }
            linesWarm = min(linesWarm, seconds(since: t))
        }

        let mb = Double(bytes) / 1e6
        func f(_ x: Double) -> String { String(format: "%.6f", x) }
        print("""
            {"bytes": \(bytes), "tokens": \(tokens), "load_seconds": \(f(loadSeconds)), \
            "cold_seconds": \(f(cold)), "cold_mb_per_s": \(f(mb / cold)), \
            "warm_seconds": \(f(warm)), "warm_mb_per_s": \(f(mb / warm)), "lines": \(lines.count), \
            "lines_cold_seconds": \(f(linesCold)), "lines_cold_mb_per_s": \(f(mb / linesCold)), \
            "lines_warm_seconds": \(f(linesWarm)), "lines_warm_mb_per_s": \(f(mb / linesWarm))}
            """)
    }

    private func seconds(since t: DispatchTime) -> Double {
        Double(DispatchTime.now().uptimeNanoseconds - t.uptimeNanoseconds) / 1e9
    }

    /// A deterministic mixed text of about `bytes` bytes (SplitMix64, fixed seed).
    static func mixedText(bytes: Int) -> String {
        var rng = SplitMix64(seed: 0x5EED)
        func next() -> UInt64 { rng.next() }
        func pick<T>(_ a: [T]) -> T { a[Int(next() % UInt64(a.count))] }
        let words = ("the of and to in is was for that with as on by at from this which be are his it an not or had have but were "
            + "they one all their there been has when who will more no if out so said what up its about into than them can only "
            + "federated personalization low-rank adaptation client server gradient bilevel optimization tokenizer Mr people").split(separator: " ").map(String.init)
        let unicode = ["café", "naïve", "Zürich", "東京", "日本語", "中文", "한국어", "👍", "🤖", "مرحبا", "שלום", "Ελληνικά", "русский"]
        let code = ["for (int i = 0; i < n; ++i) {", "    x[i] += y[i] * 2;", "}", "def main():", "    return 0", "let ids = tok.encode(text)"]
        var out = ""
        out.reserveCapacity(bytes + 256)
        while out.utf8.count < bytes {
            let r = next() % 100
            if r < 75 {
                for k in 0..<(5 + Int(next() % 20)) {
                    if k > 0 { out += " " }
                    let w = next() % 100
                    out += w < 8 ? pick(unicode) : w < 14 ? String(next() % 100_000) : w < 20 ? pick(words).capitalized : pick(words)
                    if next() % 10 == 0 { out += pick([",", ";", "'s", "'ll", "n't", "...", ":"]) }
                }
                out += pick([". ", ".\n", "! ", "? ", ".\n\n", ".  "])
            } else if r < 92 {
                out += pick(code) + "\n"
            } else {
                out += pick(["\t", "  ", "   ", "\n\n\n", " \n", "    "]) + pick(words)
            }
        }
        return out
    }
}
