import Foundation

/// The weight files of a model folder: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` names (`weight_map`: tensor name -> shard file), each memory-mapped
/// on its own; a tensor is read from its shard in place (f32) or converted (f16, bf16).
public final class Checkpoint: Sendable {
    public let folder: String
    /// The files, in the order the index first names them (one file when not sharded).
    public let files: [SafeTensorsFile]
    /// Tensor name -> (index into `files`, where it sits).
    public let tensors: [String: (file: Int, info: TensorInfo)]
    /// The index file, when sharded.
    public let index: String?

    /// The name errors use for the whole checkpoint: the single file, or the index.
    public var name: String { index ?? files.first?.name ?? folder }

    /// The stored element types, by how many tensors use each.
    public var dtypes: [DType: Int] {
        var n: [DType: Int] = [:]
        for (_, t) in tensors { n[t.info.dtype, default: 0] += 1 }
        return n
    }

    /// Bytes of tensor data stored.
    public var storedBytes: Int { tensors.values.reduce(0) { $0 + $1.info.end - $1.info.begin } }

    init(folder: String, files: [SafeTensorsFile], tensors: [String: (file: Int, info: TensorInfo)], index: String?) {
        self.folder = folder; self.files = files; self.tensors = tensors; self.index = index
    }

    /// Opens `folder/model.safetensors`, else `folder/model.safetensors.index.json` and its shards.
    /// A missing shard, an index naming a tensor its shard does not hold, or an unreadable index is
    /// one error that names the file.
    public static func open(folder: String) throws -> Checkpoint {
        let single = folder + "/model.safetensors", indexPath = folder + "/model.safetensors.index.json"
        let fm = FileManager.default
        if fm.fileExists(atPath: single) {
            let st = try SafeTensorsFile(path: single)
            var t: [String: (file: Int, info: TensorInfo)] = [:]
            for (name, info) in st.tensors { t[name] = (0, info) }
            return Checkpoint(folder: folder, files: [st], tensors: t, index: nil)
        }
        guard let data = fm.contents(atPath: indexPath) else {
            throw ModelError.missingFile(single, hint: "A model folder needs model.safetensors, or model.safetensors.index.json and its shards (PyTorch .bin checkpoints are not read; convert with safetensors).")
        }
        guard let json = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any],
              let map = json["weight_map"] as? [String: Any], !map.isEmpty else {
            throw ModelError.badConfig(file: indexPath, why: "is not a safetensors index (a JSON object with a non-empty \"weight_map\" of tensor name -> shard file)")
        }
        var shardOrder: [String] = []
        var wanted: [(tensor: String, shard: String)] = []
        for name in map.keys.sorted() {
            guard let shard = map[name] as? String, !shard.isEmpty, !shard.contains("/"), shard != "..", !shard.hasPrefix(".") else {
                throw ModelError.badConfig(file: indexPath, why: "weight_map entry \(FileText.name(name)) does not name a shard file in the folder")
            }
            if !shardOrder.contains(shard) { shardOrder.append(shard) }
            wanted.append((name, shard))
        }
        shardOrder.sort()
        var files: [SafeTensorsFile] = []
        for shard in shardOrder {
            let path = folder + "/" + shard
            guard fm.fileExists(atPath: path) else {
                throw ModelError.missingFile(folder + "/" + FileText.fileName(shard), hint: "\(indexPath) names this shard; copy every shard of the checkpoint into the folder.")
            }
            files.append(try SafeTensorsFile(path: path))
        }
        var t: [String: (file: Int, info: TensorInfo)] = [:]
        for (name, shard) in wanted {
            let i = shardOrder.firstIndex(of: shard)!
            guard let info = files[i].tensors[name] else {
                throw ModelError.badConfig(file: indexPath, why: "names tensor \(FileText.name(name)) in \(FileText.fileName(shard)), which does not hold it; the index and the shards do not belong together")
            }
            t[name] = (i, info)
        }
        return Checkpoint(folder: folder, files: files, tensors: t, index: indexPath)
    }

    /// The tensor `name` as f32: a view of its shard for aligned f32 data, else a converted copy.
    public func tensor(_ name: String) throws -> Tensor {
        guard let (f, info) = tensors[name] else { throw SafeTensorsError.missingTensor(file: self.name, tensor: name) }
        return files[f].tensor(info)
    }

    /// The base fingerprint of a model folder's weights, from their headers only:
    /// `baseFingerprint(ofSafetensorsAt:)` of model.safetensors; for a sharded checkpoint FNV-1a over
    /// the index's bytes and each shard's fingerprint, shards in name order.
    public static func fingerprint(folder: String) throws -> String {
        let single = folder + "/model.safetensors", indexPath = folder + "/model.safetensors.index.json"
        if FileManager.default.fileExists(atPath: single) || !FileManager.default.fileExists(atPath: indexPath) {
            return try baseFingerprint(ofSafetensorsAt: single)
        }
        let data = try Data(contentsOf: URL(fileURLWithPath: indexPath))
        guard let json = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any], let map = json["weight_map"] as? [String: Any] else {
            throw ModelError.badConfig(file: indexPath, why: "is not a safetensors index (a JSON object with a \"weight_map\")")
        }
        let shards = Set(map.values.compactMap { $0 as? String }).filter { !$0.contains("/") && !$0.hasPrefix(".") }.sorted()
        var h = FNV1a64()
        h.add(Array(data))
        for s in shards { h.add(Array(try baseFingerprint(ofSafetensorsAt: folder + "/" + s).utf8)) }
        return h.hex
    }
}
