import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A read-only memory map of a whole file. The base weights are read in place from one of these,
/// so however many clients are served, the weights are in memory once (shared page cache).
public final class MappedFile: @unchecked Sendable {   // read-only mapping, immutable
    public let path: String
    public let bytes: UnsafeRawBufferPointer

    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw IOError.cannotOpen(path, String(cString: strerror(errno))) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw IOError.cannotOpen(path, String(cString: strerror(errno))) }
        if (st.st_mode & S_IFMT) == S_IFDIR { throw IOError.cannotOpen(path, "it is a directory") }
        let size = Int(st.st_size)
        if size == 0 {
            bytes = UnsafeRawBufferPointer(start: nil, count: 0)
            return
        }
        let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
        guard let p, p != MAP_FAILED else { throw IOError.cannotOpen(path, "mmap failed: \(String(cString: strerror(errno)))") }
        bytes = UnsafeRawBufferPointer(start: p, count: size)
    }

    deinit {
        if let base = bytes.baseAddress { munmap(UnsafeMutableRawPointer(mutating: base), bytes.count) }
    }
}

/// Errors of file input and output, each naming the file and what to do.
public enum IOError: Error, CustomStringConvertible {
    case cannotOpen(String, String)
    case cannotWrite(String, String)
    case missing(String, String)

    public var description: String {
        switch self {
        case let .cannotOpen(path, why): return "cannot open \(path): \(why)"
        case let .cannotWrite(path, why): return "cannot write \(path): \(why); check the folder exists, is writable and the disk has room"
        case let .missing(path, hint): return "\(path) does not exist. \(hint)"
        }
    }
}

/// Crash-safe file replacement: write a temporary file in the same folder, fsync it, rename it over
/// the destination, fsync the folder. A crash at any point leaves either the old or the new file whole.
public enum AtomicFile {
    public static func write(_ data: Data, to path: String) throws {
        let url = URL(fileURLWithPath: path)
        let dir = url.deletingLastPathComponent().path
        let tmp = dir + "/.tmp-\(url.lastPathComponent)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0o644)
        guard fd >= 0 else { throw IOError.cannotWrite(path, String(cString: strerror(errno))) }
        var ok = false
        defer {
            if !ok { unlink(tmp) }
        }
        let written: Bool = data.withUnsafeBytes { raw in
            var off = 0
            while off < raw.count {
                let n = Glibc.write(fd, raw.baseAddress! + off, raw.count - off)
                if n < 0 { if errno == EINTR { continue }; return false }
                off += n
            }
            return true
        }
        guard written else {
            let err = String(cString: strerror(errno))
            close(fd)
            throw IOError.cannotWrite(path, err)
        }
        // fsync's own errno (EIO, ENOSPC on some file systems) is the one to report.
        guard fsync(fd) == 0 else {
            let err = String(cString: strerror(errno))
            close(fd)
            throw IOError.cannotWrite(path, err)
        }
        close(fd)
        guard rename(tmp, path) == 0 else { throw IOError.cannotWrite(path, String(cString: strerror(errno))) }
        ok = true
        syncDirectory(dir)
    }

    /// fsync a folder so that a rename inside it is durable.
    public static func syncDirectory(_ dir: String) {
        let dfd = open(dir, O_RDONLY | O_DIRECTORY)
        if dfd >= 0 { fsync(dfd); close(dfd) }
    }
}
