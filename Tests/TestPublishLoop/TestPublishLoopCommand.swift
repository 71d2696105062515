import ArgumentParser
import Foundation
import PF2LoRA

/// `TestPublishLoop`: a test-only executable (not a product; it never ships in `pf2lora`). It
/// publishes client (and every fourth time shared) adapters into a store in a loop, printing `ack
/// <level> <client|-> <version> <seq>` on stdout after each publish returns, so the reliability
/// tests can SIGKILL it at arbitrary points of a write, or run two of them against one store. Each
/// adapter's values are a function of its `test_seq` metadata (`reliabilityValue`), so a reader can
/// check a file is whole.
@main
struct TestPublishLoopCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "TestPublishLoop",
        abstract: "Test helper (reliability tests only): publish adapters in a loop.")

    @Option(help: "Model folder (its base fingerprint and shapes).")
    var model: String
    @Option(help: "Adapter store folder.")
    var store: String
    @Option(help: "Comma-separated client ids to publish for, in turn.")
    var clients: String = "alice"
    @Option(help: "Publishes to make (then exit 0).")
    var count: Int = 1_000_000
    @Option(help: "First sequence number (tags the adapters' content).")
    var seq: Int = 0
    @Option(help: "Rank of the client pairs.")
    var rank: Int = 2
    @Option(name: .customLong("keep-versions"), help: "Versions kept per adapter.")
    var keepVersions: Int = 3

    /// The value of element `i` of every tensor of the adapter tagged `seq` (exact in f32).
    static func reliabilityValue(seq: Int, index i: Int) -> Float { Float((seq &* 31 &+ i) % 1000) / 1024 }

    static func adapter(base: BaseModelInfo, level: AdapterLevel, rank: Int, seq: Int, client: String?) -> LoRAAdapter {
        var modules: [String: LoRAPair] = [:]
        for (path, (din, dout)) in base.linears {
            let a = Tensor(zeros: [rank, din]), b = Tensor(zeros: [dout, rank])
            for i in 0..<a.count { a.data[i] = reliabilityValue(seq: seq, index: i) }
            for i in 0..<b.count { b.data[i] = reliabilityValue(seq: seq, index: i) }
            modules[path] = LoRAPair(a: a, b: b)
        }
        let meta = AdapterMetadata(baseName: base.name, baseFingerprint: base.fingerprint, clientID: client, extra: ["test_seq": String(seq)])
        return LoRAAdapter(level: level, rank: rank, alpha: Float(rank), modules: modules, metadata: meta)
    }

    func run() throws {
        let base = try BaseModelInfo.load(folder: model)
        let s = try AdapterStore.open(root: store, base: base, keepVersions: keepVersions, cacheBytes: 0)
        let ids = clients.split(separator: ",").map(String.init)
        // Each ack is one write(2) as soon as its publish returns (no stdio buffer to lose at SIGKILL).
        func ack(_ line: String) { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }
        for n in 0..<count {
            let q = seq + n
            if n % 4 == 3 || s.currentVersion(level: .shared) == nil {
                let v = try s.publishShared(Self.adapter(base: base, level: .shared, rank: 4, seq: q, client: nil))
                ack("ack shared - \(v) \(q)")
            } else {
                let id = ids[n % ids.count]
                let v = try s.publishClient(id: id, Self.adapter(base: base, level: .client, rank: rank, seq: q, client: id))
                ack("ack client \(id) \(v) \(q)")
            }
        }
    }
}
