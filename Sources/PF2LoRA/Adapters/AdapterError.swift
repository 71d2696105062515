import Foundation

/// Why an adapter file or an adapter store operation was refused. Validation on load produces the
/// cases in the order it checks them (see docs/ADAPTER_STORE.md); each message names the file, the
/// check and what to do. Messages never quote the file's bytes: values read from it (metadata
/// values, fingerprints, base names) are not shown, tensor and module names only when they are
/// names the program knows (`FileText`), numbers only as sizes and shapes. `pf2lora adapters
/// inspect FILE` shows an operator what a file holds.
public enum AdapterError: Error, CustomStringConvertible, Equatable {
    // 1. the zstd frame
    case notZstdFrame(file: String)
    case truncatedFrame(file: String, size: Int)
    case corruptFrame(file: String, why: String)
    // 2. the decompressed size bound
    case tooLarge(file: String, claimed: UInt64, limit: Int)
    case fileTooLarge(file: String, size: Int, limit: Int)
    // 3. the safetensors header
    case badSafetensors(file: String, why: String)
    // 4. dtype
    case badDType(file: String, tensor: String, dtype: String)
    // 5. metadata
    case missingMetadata(file: String, key: String)
    case badMetadata(file: String, key: String, value: String, why: String)
    // 6. level
    case levelMismatch(file: String, found: String, expected: String)
    // 7. tensor names
    case unknownTensor(file: String, tensor: String, why: String)
    // 8. pairs
    case incompletePair(file: String, module: String, missing: String)
    // 9. shapes
    case shapeMismatch(file: String, tensor: String, shape: [Int], expected: [Int], why: String)
    // 10. fingerprint
    case fingerprintMismatch(file: String, adapterBase: String, adapterFingerprint: String, base: String, baseFingerprint: String)
    // 11. values
    case nonFinite(file: String, tensor: String, index: Int)

    // Not validation: building, importing, the base description.
    case empty(file: String)
    case badBase(why: String)
    case badPEFT(folder: String, why: String)

    public var description: String {
        switch self {
        case let .notZstdFrame(f):
            return "\(f): check 1 (zstd frame) failed: not a zstd frame; adapter files are zstd-compressed safetensors (.safetensors.zst) — use `pf2lora adapters import-peft` to bring in a plain file"
        case let .truncatedFrame(f, n):
            return "\(f): check 1 (zstd frame) failed: the frame is truncated (\(n) bytes); the file was cut short — restore it or publish the adapter again"
        case let .corruptFrame(f, why):
            return "\(f): check 1 (zstd frame) failed: \(why); the file is corrupt (bit flip or partial overwrite) — restore it or publish the adapter again"
        case let .tooLarge(f, _, limit):
            return "\(f): check 2 (size bound) failed: the decompressed size the frame records is above the limit of \(limit) bytes; the file is corrupt or not an adapter for this base"
        case let .fileTooLarge(f, size, limit):
            return "\(f): check 2 (size bound) failed: the file is \(size) bytes, above the limit of \(limit) bytes; refused unread — it is corrupt or not an adapter for this base"
        case let .badSafetensors(f, why):
            return "\(f): check 3 (safetensors header) failed: \(why)"
        case let .badDType(f, t, d):
            return "\(f): check 4 (dtype) failed: tensor \(FileText.name(t)) is \(FileText.dtype(d)); adapter files store F32 or F16 (all tensors alike) — re-export the adapter"
        case let .missingMetadata(f, k):
            return "\(f): check 5 (metadata) failed: __metadata__ has no '\(k)'; this is not a pf2lora adapter file (plain PEFT files go through `pf2lora adapters import-peft`)"
        case let .badMetadata(f, k, v, why):
            return "\(f): check 5 (metadata) failed: \(FileText.name(k)) (a \(v.utf8.count)-byte value) \(why)"
        case let .levelMismatch(f, found, expected):
            return "\(f): check 6 (level) failed: the file is a \(found) adapter but it was found where a \(expected) adapter belongs; it was copied into the wrong folder"
        case let .unknownTensor(f, t, why):
            return "\(f): check 7 (tensor names) failed: tensor \(FileText.name(t)) \(why)"
        case let .incompletePair(f, m, missing):
            return "\(f): check 8 (pairs) failed: module \(FileText.name(m)) has no \(missing); every adapted module needs both halves of its pair"
        case let .shapeMismatch(f, t, shape, expected, why):
            return "\(f): check 9 (shapes) failed: \(FileText.name(t)) has shape \(shape), expected \(expected) (\(why)); the adapter was made for another model or rank"
        case let .fingerprintMismatch(f, _, _, b, bf):
            return "\(f): check 10 (base fingerprint) failed: the adapter records another base's fingerprint than this base, '\(b)' (fingerprint \(bf)); use the base it was trained on (`pf2lora adapters inspect FILE` shows it), or retrain it"
        case let .nonFinite(f, t, i):
            return "\(f): check 11 (values) failed: \(FileText.name(t)) holds a NaN or infinity at element \(i); training diverged — do not serve this adapter"
        case let .empty(f):
            return "\(f): the adapter holds no tensors"
        case let .badBase(why):
            return "base model: \(why)"
        case let .badPEFT(folder, why):
            return "PEFT folder \(folder): \(why)"
        }
    }

    /// The number of the validation check that failed (1...11), or nil for other errors.
    public var check: Int? {
        switch self {
        case .notZstdFrame, .truncatedFrame, .corruptFrame: return 1
        case .tooLarge, .fileTooLarge: return 2
        case .badSafetensors: return 3
        case .badDType: return 4
        case .missingMetadata, .badMetadata: return 5
        case .levelMismatch: return 6
        case .unknownTensor, .empty: return 7
        case .incompletePair: return 8
        case .shapeMismatch: return 9
        case .fingerprintMismatch: return 10
        case .nonFinite: return 11
        case .badBase, .badPEFT: return nil
        }
    }
}
