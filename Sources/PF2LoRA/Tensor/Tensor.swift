import Foundation

/// A dense, row-major buffer of `Float` with a shape.
///
/// A tensor either owns its memory (allocated once, 64-byte aligned, zeroed) or views memory owned
/// by someone else, such as a memory-mapped safetensors file; `owner` keeps that memory alive.
/// Tensors are reference types on purpose: the model's weights and run state are allocated once and
/// then only written in place by the kernels, as in llm.c.
///
/// Sendable as a buffer is: the shape is immutable, the elements are not. Sharing a tensor between
/// threads is safe while nobody writes it (the model's weights after loading, a published adapter);
/// a tensor that is written (run state, a trainer's parameters, the KV cache) belongs to one thread at
/// a time, and whoever hands it over synchronizes (the scheduler's lock, a thread's start and join).
public final class Tensor: @unchecked Sendable {
    /// The dimensions, outermost first.
    public let shape: [Int]
    /// The number of elements (product of `shape`).
    public let count: Int
    /// The first element. Row-major, contiguous.
    public let data: UnsafeMutablePointer<Float>
    private let owned: Bool
    /// For owned memory from `LargeBuffer` (huge pages): its mapped size; 0 for the heap.
    private let mappedBytes: Int
    private let owner: AnyObject?

    /// A new zero-filled tensor of `shape` (at least 2 MB: in transparent huge pages, `LargeBuffer`).
    public init(zeros shape: [Int]) {
        let n = shape.reduce(1, *)
        self.shape = shape
        self.count = n
        let bytes = max(n, 1) * MemoryLayout<Float>.stride
        let (raw, mapped) = LargeBuffer.allocateZeroed(byteCount: bytes)
        self.data = raw.bindMemory(to: Float.self, capacity: max(n, 1))
        self.owned = true
        self.mappedBytes = mapped
        self.owner = nil
    }

    /// A new tensor holding `values`; `values.count` must equal the product of `shape`.
    public convenience init(_ values: [Float], shape: [Int]) {
        precondition(values.count == shape.reduce(1, *), "Tensor: \(values.count) values for shape \(shape)")
        self.init(zeros: shape)
        values.withUnsafeBufferPointer { src in
            if let base = src.baseAddress { data.update(from: base, count: values.count) }
        }
    }

    /// A view of memory owned by `owner` (kept alive as long as this tensor lives).
    public init(viewing pointer: UnsafeMutablePointer<Float>, shape: [Int], owner: AnyObject?) {
        self.shape = shape
        self.count = shape.reduce(1, *)
        self.data = pointer
        self.owned = false
        self.mappedBytes = 0
        self.owner = owner
    }

    deinit {
        if owned { LargeBuffer.free(UnsafeMutableRawPointer(data), mappedBytes: mappedBytes) }
    }

    /// Whether this tensor owns its memory (false: a view, e.g. of a memory-mapped checkpoint).
    public var ownsMemory: Bool { owned }

    /// Whether this tensor views a memory-mapped file (a checkpoint's bytes read in place).
    var viewsMappedFile: Bool { owner is MappedFile }

    /// The whole tensor as a buffer pointer.
    @inlinable public var buffer: UnsafeMutableBufferPointer<Float> {
        UnsafeMutableBufferPointer(start: data, count: count)
    }

    /// Rows and columns of a tensor read as a matrix: the last dimension is the columns.
    public var rows: Int { shape.count <= 1 ? 1 : count / (shape.last ?? 1) }
    public var cols: Int { shape.last ?? 1 }

    /// A copy of the values, for tests and serialization.
    public var array: [Float] { Array(buffer) }

    /// Element at a flat index (slow; for tests and debugging).
    public subscript(i: Int) -> Float {
        get { data[i] }
        set { data[i] = newValue }
    }

    /// A view of rows `[start, start + count)` of a tensor read as a matrix.
    public func rowsView(_ start: Int, _ n: Int) -> Tensor {
        precondition(start >= 0 && start + n <= rows)
        return Tensor(viewing: data + start * cols, shape: [n, cols], owner: self)
    }

    /// Sets every element to `value`.
    public func fill(_ value: Float) {
        data.update(repeating: value, count: count)
    }

    /// Copies all of `other` (same element count) into this tensor.
    public func copy(from other: Tensor) {
        precondition(other.count == count, "copy: \(other.shape) into \(shape)")
        data.update(from: other.data, count: count)
    }

    /// A deep copy that owns its memory.
    public func clone() -> Tensor {
        let t = Tensor(zeros: shape)
        t.copy(from: self)
        return t
    }
}

extension Tensor: CustomStringConvertible {
    public var description: String {
        let head = (0..<min(count, 6)).map { String(format: "%.4g", data[$0]) }.joined(separator: ", ")
        return "Tensor(\(shape): [\(head)\(count > 6 ? ", …" : "")])"
    }
}

extension Tensor {
    /// A new (cols, rows) tensor holding this matrix's transpose, copied in 32 x 32 tiles so both
    /// sides stay in cache.
    public func transposed() -> Tensor {
        let r = rows, c = cols
        let t = Tensor(zeros: [c, r])
        let src = data, dst = t.data
        let tile = 32
        var i0 = 0
        while i0 < r {
            let i1 = min(i0 + tile, r)
            var j0 = 0
            while j0 < c {
                let j1 = min(j0 + tile, c)
                for i in i0..<i1 { for j in j0..<j1 { dst[j * r + i] = src[i * c + j] } }
                j0 = j1
            }
            i0 = i1
        }
        return t
    }
}

/// Zeroed memory for the large buffers of weights and activations. From 2 MB on (Linux): an
/// anonymous mapping aligned to 2 MB and advised `MADV_HUGEPAGE`, so the kernel backs it with
/// transparent huge pages (the machine's THP mode is `madvise`: nothing else gets them). Streaming a
/// weight matrix from huge pages measured 8-14% more bytes per CPU-second than from 4 KB pages
/// (anonymous or the checkpoint's file mapping: no page walk per 4 KB, the prefetchers are not
/// stopped at every 4 KB boundary; C prototype, Benchmarks/README.md "Huge pages"), which is what
/// batch-1 decode is. Smaller buffers come from the heap, 64-byte aligned.
enum LargeBuffer {
    static let hugePage = 2 << 20

    /// `byteCount` zeroed bytes, 64-byte aligned (2 MB aligned when mapped), and the mapped size to
    /// give `free` (0: heap memory).
    static func allocateZeroed(byteCount: Int) -> (UnsafeMutableRawPointer, Int) {
        #if os(Linux)
        if byteCount >= hugePage {
            // Whole 4 KB pages: the kernel backs the aligned 2 MB extents with huge pages and the
            // tail past the last one with small pages, so a 2.2 MB tensor does not hold 4 MB.
            let size = (byteCount + 4095) / 4096 * 4096
            // Map one huge page more than needed and unmap the misaligned head and tail.
            let want = size + hugePage
            if let m = mmap(nil, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), m != MAP_FAILED {
                let start = Int(bitPattern: m), aligned = (start + hugePage - 1) / hugePage * hugePage
                if aligned > start { munmap(m, aligned - start) }
                let end = start + want, tail = end - (aligned + size)
                if tail > 0 { munmap(UnsafeMutableRawPointer(bitPattern: aligned + size), tail) }
                let p = UnsafeMutableRawPointer(bitPattern: aligned)!
                _ = madvise(p, size, Int32(MADV_HUGEPAGE))   // advice only: without THP these are 4 KB pages
                return (p, size)                             // anonymous pages read as zeros
            }
        }
        #endif
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 1), alignment: 64)
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: max(byteCount, 1))
        return (raw, 0)
    }

    static func free(_ p: UnsafeMutableRawPointer, mappedBytes: Int) {
        #if os(Linux)
        if mappedBytes > 0 { munmap(p, mappedBytes); return }
        #endif
        p.deallocate()
    }
}
