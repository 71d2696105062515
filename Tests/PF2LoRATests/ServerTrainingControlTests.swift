import Foundation
import Testing
@testable import PF2LoRA

/// Issue 11, item 9: training requests are bounded by memory before they allocate, and generate and
/// training requests can be cancelled by id; training methods report progress.
@Suite(.serialized) struct ServerTrainingControlTests {
    /// The estimate is the allocation: after one training call (and one evaluation) of a task, the
    /// trainer's run state plus the task's batch buffers take exactly `LMTask.runBytes` bytes.
    @Test(arguments: [(1, 4, [Int]()), (3, 8, [4, 2]), (2, 32, [8, 1]), (5, 17, [2])])
    func memoryEstimateIsTheAllocation(_ b: Int, _ t: Int, _ levelRanks: [Int]) throws {
        let w = GPT2TaskTests.weights, c = GPT2TaskTests.config.architecture
        let task = try LMTask(weights: w, clients: GPT2TaskTests.clients(), batchSize: b, seqLen: t)
        var rng = RNG(seed: 1)
        let sets = levelRanks.enumerated().map { i, r in
            GPT2TaskTests.randomized(makeLoRAParameters(modules: task.modules, rank: r, level: i == 0 ? .shared : .client, rng: &rng), seed: UInt64(i))
        }
        let adapter = TwoLevelAdapter(shared: sets.first, sharedScale: 1, local: sets.count > 1 ? sets[1] : nil, localScale: 1)
        let ranks = task.modules.flatMap { _ in levelRanks }
        // Evaluation first: forward only, one layer's activations.
        _ = task.evaluate(client: 0, adapter: adapter, split: .valid)
        #expect(task.trainer.stateBytes + 8 * b * t == LMTask.runBytes(config: c, batch: b, seq: t, ranks: ranks, training: false))
        guard !levelRanks.isEmpty else { return }   // without an adapter there is nothing to train
        var r2 = RNG(seed: 2)
        _ = task.lossAndGradients(client: 0, adapter: adapter, sharedGrad: sets.first.map { $0.zerosLike() }, localGrad: nil, rng: &r2)
        #expect(task.trainer.stateBytes + 8 * b * t == LMTask.runBytes(config: c, batch: b, seq: t, ranks: ranks, training: true))
    }

    /// Through the server: a train_local of batch 4096 × seq 256 (it aborted the process) and a
    /// personalize over `--max-train-mb` are refused with the figure and the limit, before anything is
    /// allocated or stored; the server keeps serving and a request within the bound runs.
    @Test func trainingRequestsAreBoundedByMemory() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let c = fx.gpt2.architecture
        // What a personalize of batch 8 × seq 64 needs with alice's rank-2 pair under the rank-8 shared pair.
        let needed = LMTask.runBytes(config: c, batch: 8, seq: 64, ranks: Array(repeating: [8, 2], count: 4 * c.layerCount).flatMap { $0 }, training: true)
        let limitMB = (needed >> 20) + 1
        let s = try fx.serve(["--max-train-mb", String(limitMB)] + (try ServerDrainTests.exchange(fx)))
        let manifest = PersonalizeTests.manifest(fx)
        s.request(1, "train_local", try ServerDrainTests.trainLocal(fx, extra: ["batch": 4096, "seq": 256]))
        let e1 = s.response(1, timeout: 120)
        #expect(ServerProcess.errorCode(e1) == -32602)
        let m1 = ServerHardeningTests.message(e1)
        #expect(m1.contains("batch 4096 × seq 256 needs") && m1.contains("MB") && m1.contains("the limit is \(limitMB).0 MB") && m1.contains("--max-train-mb"), "\(m1)")
        s.request(2, "personalize", ServerDrainTests.personalize(["batch": 16, "seq": 64, "steps": 2]))
        let e2 = s.response(2, timeout: 120)
        #expect(ServerProcess.errorCode(e2) == -32602 && ServerHardeningTests.message(e2).contains("batch 16 × seq 64"), "\(e2 ?? [:])")
        #expect(PersonalizeTests.manifest(fx) == manifest, "a refused request changed the store")
        // Within the bound: runs.
        s.request(3, "personalize", ServerDrainTests.personalize(["batch": 8, "seq": 64, "steps": 2]))
        #expect(ServerProcess.result(s.response(3, timeout: 120))?["version"] as? Int == 2, "\(s.stderrText.suffix(300))")
        #expect(ServerProcess.result(s.response({ s.request(4, "health"); return 4 }()))?["status"] as? String == "ok")
        #expect(s.finish() == 0)
        print("memory bound: personalize batch 8 x seq 64 needs \(needed) bytes (\(limitMB) MiB limit); train_local 4096 x 256: \(m1)")
    }

    /// `cancel` of a running generate ends it at the next step with the text streamed so far
    /// (finish_reason "cancelled"); of a waiting one answers it at once; of an unknown id says so.
    @Test func cancelGenerate() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let s = try fx.serve(["--max-batch", "1"])
        s.request(1, "generate", ["client": "alice", "prompt": "The cat", "max_tokens": 250, "temperature": 0, "ignore_eos": true, "stream": true])
        s.request(2, "generate", ["client": "alice", "prompt": "The cat", "max_tokens": 5, "temperature": 0])
        #expect(s.waitFor(count: 3) { $0["method"] as? String == "token" })
        let c2 = ServerProcess.result(s.response({ s.request(10, "cancel", ["id": 2]); return 10 }()))
        #expect(c2?["cancelled"] as? Bool == true && c2?["methods"] as? [String] == ["generate"])
        let r2 = ServerProcess.result(s.response(2))
        #expect(r2?["finish_reason"] as? String == "cancelled" && r2?["text"] as? String == "")
        #expect(ServerProcess.result(s.allLines.first { ($0["id"] as? Int) == 1 }) == nil, "the waiting one was answered before the running one ended")
        let c1 = ServerProcess.result(s.response({ s.request(11, "cancel", ["id": 1]); return 11 }()))
        #expect(c1?["cancelled"] as? Bool == true)
        let r1 = try #require(ServerProcess.result(s.response(1)))
        #expect(r1["finish_reason"] as? String == "cancelled")
        let done = (r1["usage"] as? [String: Any])?["completion_tokens"] as? Int ?? 0
        #expect(done >= 3 && done < 250)
        let streamed = s.notifications("token", id: 1).compactMap { $0["text"] as? String }.joined()
        #expect(Array(streamed.utf8) == Array((r1["text"] as? String ?? "").utf8))
        let none = ServerProcess.result(s.response({ s.request(12, "cancel", ["id": 1]); return 12 }()))
        #expect(none?["cancelled"] as? Bool == false && (none?["reason"] as? String ?? "").contains("no generate or training request"))
        #expect(ServerProcess.errorCode(s.response({ s.request(13, "cancel", [:]); return 13 }())) == -32602)
        #expect(s.finish() == 0)
    }

    /// `cancel` of a running personalize: it stops between steps and answers -32006 with the steps
    /// done; nothing is published; the training slot is free again. Progress notifications come with
    /// the request's id, the step, the steps planned and the loss.
    @Test func cancelTrainingAndProgress() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let s = try fx.serve(try ServerDrainTests.exchange(fx))
        s.request(1, "personalize", ServerDrainTests.personalize(["steps": 100_000]))
        #expect(s.waitFor(count: 2, timeout: 60) { $0["method"] as? String == "progress" })
        let c = ServerProcess.result(s.response({ s.request(2, "cancel", ["id": 1]); return 2 }()))
        #expect(c?["cancelled"] as? Bool == true && c?["methods"] as? [String] == ["personalize"])
        let e = s.response(1)
        #expect(ServerProcess.errorCode(e) == -32006, "\(e ?? [:])")
        let data = (e?["error"] as? [String: Any])?["data"] as? [String: Any]
        let stepsDone = data?["steps_done"] as? Int ?? 0
        #expect(stepsDone >= 1 && (data?["loss"] as? [Any])?.count == stepsDone)
        #expect(ServerHardeningTests.message(e).contains("nothing was published"))
        #expect(try ServerDrainTests.currentVersion(fx, "alice") == 1)
        let progress = s.notifications("progress", id: 1)
        #expect(progress.allSatisfy { $0["method"] as? String == "personalize" && $0["steps"] as? Int == 100_000 && ($0["loss"] as? Double).map { $0.isFinite } == true })
        let steps = progress.compactMap { $0["step"] as? Int }
        #expect(steps.first == 1 && steps == steps.sorted() && Set(steps).count == steps.count)

        // The slot is free: a personalize now runs to the end; its progress ends at its last step.
        s.request(3, "personalize", ServerDrainTests.personalize(["steps": 12]))
        #expect(ServerProcess.result(s.response(3, timeout: 120))?["version"] as? Int == 2)
        let p3 = s.notifications("progress", id: 3).compactMap { $0["step"] as? Int }
        #expect(p3.first == 1 && p3.last == 12, "\(p3)")
        // train_local reports its local iterations.
        s.request(4, "train_local", try ServerDrainTests.trainLocal(fx, extra: ["local_steps": 4]))
        #expect(ServerProcess.result(s.response(4, timeout: 120)) != nil)
        let p4 = s.notifications("progress", id: 4)
        #expect(p4.last?["step"] as? Int == 4 && p4.last?["steps"] as? Int == 4 && p4.last?["method"] as? String == "train_local", "\(p4)")
        // A notification (no id) gets no progress.
        s.send(["jsonrpc": "2.0", "method": "personalize", "params": ServerDrainTests.personalize(["steps": 3])])
        #expect(s.finish() == 0)
        #expect(s.allLines.filter { $0["method"] as? String == "progress" }.allSatisfy { (($0["params"] as? [String: Any])?["id"] as? Int) != nil })
        #expect(try ServerDrainTests.currentVersion(fx, "alice") == 3, "the notification's personalize ran to the end before exit")
    }
}
