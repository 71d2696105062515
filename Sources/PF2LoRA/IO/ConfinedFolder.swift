import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Why a path a request named was refused. Messages name the path as the caller gave it (escaped and
/// cut to 120 characters), the rule, sizes and what to do; never a byte of a file's content.
public enum ConfinedPathError: Error, CustomStringConvertible, Equatable {
    case noFolder(param: String)
    case outside(param: String, path: String, why: String)
    case symlink(param: String, path: String)
    case notRegularFile(param: String, path: String)
    case notFolder(param: String, path: String)
    case missing(param: String, path: String)
    case tooLarge(param: String, path: String, size: Int, limit: Int)
    case forbidden(param: String, path: String)
    case badName(param: String, path: String, why: String)
    case io(param: String, path: String, why: String)

    public var description: String {
        switch self {
        case let .noFolder(p):
            return "\(p) names a file, but this server has no exchange folder: start it with `pf2lora serve --exchange-dir DIR` and give paths inside DIR (or send the adapter inline as {\"safetensors\": base64})"
        case let .outside(p, path, why):
            return "\(p) '\(path)' \(why); paths in requests are relative to the server's --exchange-dir (or absolute inside it), without '..', hidden components or empty names"
        case let .symlink(p, path):
            return "\(p) '\(path)' goes through a symlink; files a request names are opened without following links — put the real file inside the exchange folder"
        case let .notRegularFile(p, path):
            return "\(p) '\(path)' is not a regular file"
        case let .notFolder(p, path):
            return "\(p) '\(path)' is not a folder"
        case let .missing(p, path):
            return "\(p) '\(path)' does not exist in the exchange folder"
        case let .tooLarge(p, path, size, limit):
            return "\(p) '\(path)' is \(size) bytes, over the limit of \(limit) bytes for a file a request names; refused unread (raise --exchange-max-mb if it is genuinely this large)"
        case let .forbidden(p, path):
            return "\(p) '\(path)' leads into the adapter store; request paths may not reach the store's files — the store is changed only by publishing"
        case let .badName(p, path, why):
            return "\(p) '\(path)': \(why)"
        case let .io(p, path, why):
            return "\(p) '\(path)': \(why)"
        }
    }

    /// A caller's path as it may appear in a message: control and non-ASCII characters escaped, at
    /// most 120 characters.
    public static func shown(_ path: String) -> String {
        var out = ""
        for u in path.unicodeScalars {
            if out.count >= 120 { out += "…"; break }
            if u.value >= 0x20 && u.value < 0x7F && u != "'" && u != "\\" { out.unicodeScalars.append(u) } else { out += String(format: "\\u{%X}", u.value) }
        }
        return out
    }
}

/// A folder that files are read from and written to only through it (the exchange folder a
/// federated node's requests name files in, `serve --exchange-dir`): a path is split into
/// components and opened one component at a time with `openat(…, O_NOFOLLOW)`, so nothing outside
/// the folder is reached, whatever links exist in it or appear in it meanwhile. Files are
/// size-checked with `fstat` before a byte is read; writes go to a temporary file in the same
/// folder (opened relative to that folder's descriptor), are fsynced, renamed over the destination
/// and the folder is fsynced — the store's atomic publish, never a raw write. Folders named in
/// `excluding` (the adapter store) are never entered, however they are reached (checked by device
/// and inode at every step).
public struct ConfinedFolder: Sendable {
    /// The folder, resolved with realpath when it was opened.
    public let root: String
    /// The largest file read, in bytes.
    public let readLimit: Int
    private let given: String
    private let excluded: [[UInt64]]

    /// - Parameters:
    ///   - path: the folder (must exist).
    ///   - readLimit: the largest file read.
    ///   - excluding: folders that must be neither this folder, inside it, nor contain it (the
    ///     adapter store's root and base folder). Missing ones are ignored.
    public init(_ path: String, readLimit: Int, excluding: [String] = []) throws {
        guard let r = realpath(path, nil) else {
            throw ConfinedPathError.io(param: "--exchange-dir", path: ConfinedPathError.shown(path), why: "cannot be opened (\(String(cString: strerror(errno))))")
        }
        root = String(cString: r)
        free(r)
        given = path.hasSuffix("/") && path.count > 1 ? String(path.dropLast()) : path
        self.readLimit = readLimit
        var st = stat()
        guard stat(root, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
            throw ConfinedPathError.notFolder(param: "--exchange-dir", path: ConfinedPathError.shown(path))
        }
        var ex: [[UInt64]] = []
        for e in excluding {
            guard let rr = realpath(e, nil) else { continue }
            let real = String(cString: rr)
            free(rr)
            func inside(_ a: String, _ b: String) -> Bool { a == b || b == "/" || a.hasPrefix(b + "/") }
            if inside(real, root) || inside(root, real) {
                throw ConfinedPathError.outside(param: "--exchange-dir", path: ConfinedPathError.shown(path),
                                                why: "overlaps the adapter store \(ConfinedPathError.shown(real)); name a folder apart from the store")
            }
            var es = stat()
            if stat(real, &es) == 0 { ex.append([UInt64(es.st_dev), UInt64(es.st_ino)]) }
        }
        excluded = ex
    }

    /// The components of `path` below the folder: a relative path, or an absolute one that starts
    /// with the folder (as given or resolved). Refuses `..`, hidden components (starting with `.`,
    /// other than a lone `.`), NUL and paths outside. An empty result is the folder itself.
    public func components(_ path: String, param: String) throws -> [String] {
        let shown = ConfinedPathError.shown(path)
        guard !path.isEmpty else { throw ConfinedPathError.outside(param: param, path: shown, why: "is empty") }
        guard !path.utf8.contains(0) else { throw ConfinedPathError.outside(param: param, path: shown, why: "contains a NUL byte") }
        guard path.utf8.count <= 4096 else { throw ConfinedPathError.outside(param: param, path: shown, why: "is longer than 4096 bytes") }
        var rest = Substring(path)
        if path.hasPrefix("/") {
            var matched = false
            for prefix in [root, given] where prefix.hasPrefix("/") {
                if path == prefix { rest = ""; matched = true; break }
                if path.hasPrefix(prefix + "/") { rest = path.dropFirst(prefix.count + 1); matched = true; break }
            }
            guard matched else { throw ConfinedPathError.outside(param: param, path: shown, why: "is outside the exchange folder") }
        }
        var comps: [String] = []
        for c in rest.split(separator: "/", omittingEmptySubsequences: true) {
            if c == "." { continue }
            if c == ".." { throw ConfinedPathError.outside(param: param, path: shown, why: "contains '..'") }
            if c.hasPrefix(".") { throw ConfinedPathError.outside(param: param, path: shown, why: "has a hidden component") }
            comps.append(String(c))
        }
        return comps
    }

    /// Opens the folder `comps` (all components folders) and returns its descriptor.
    func openFolder(_ comps: [String], param: String, shown: String) throws -> Int32 {
        var fd = Glibc.open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw ConfinedPathError.io(param: param, path: shown, why: "the exchange folder cannot be opened (\(String(cString: strerror(errno))))") }
        do { try checkAllowed(fd, param: param, shown: shown) } catch { close(fd); throw error }
        for c in comps {
            let next = openat(fd, c, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            let err = errno
            if next < 0 {
                let kind = entryKind(fd, c)
                close(fd)
                if kind == S_IFLNK { throw ConfinedPathError.symlink(param: param, path: shown) }
                if err == ENOENT { throw ConfinedPathError.missing(param: param, path: shown) }
                if err == ENOTDIR { throw ConfinedPathError.notFolder(param: param, path: shown) }
                throw ConfinedPathError.io(param: param, path: shown, why: String(cString: strerror(err)))
            }
            close(fd)
            fd = next
            do { try checkAllowed(fd, param: param, shown: shown) } catch { close(fd); throw error }
        }
        return fd
    }

    private func entryKind(_ dirfd: Int32, _ name: String) -> mode_t {
        var st = stat()
        return fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 ? st.st_mode & S_IFMT : 0
    }

    private func checkAllowed(_ fd: Int32, param: String, shown: String) throws {
        guard !excluded.isEmpty else { return }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return }
        if excluded.contains([UInt64(st.st_dev), UInt64(st.st_ino)]) { throw ConfinedPathError.forbidden(param: param, path: shown) }
    }

    /// Whether `comps` names a folder (no link followed).
    public func isFolder(_ comps: [String], param: String, path: String) throws -> Bool {
        do {
            let fd = try openFolder(comps, param: param, shown: ConfinedPathError.shown(path))
            close(fd)
            return true
        } catch ConfinedPathError.notFolder { return false }
    }

    /// Reads the regular file `comps` whole, refusing it unread when it is larger than `limit`
    /// (default: the folder's `readLimit`). Returns nil when it does not exist.
    public func read(_ comps: [String], param: String, path: String, limit: Int? = nil) throws -> Data? {
        let shown = ConfinedPathError.shown(path)
        guard let name = comps.last else { throw ConfinedPathError.notRegularFile(param: param, path: shown) }
        let dfd = try openFolder(Array(comps.dropLast()), param: param, shown: shown)
        defer { close(dfd) }
        let fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        if fd < 0 {
            let err = errno
            if err == ENOENT { return nil }
            if err == ELOOP || entryKind(dfd, name) == S_IFLNK { throw ConfinedPathError.symlink(param: param, path: shown) }
            throw ConfinedPathError.io(param: param, path: shown, why: "cannot be opened (\(String(cString: strerror(err))))")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw ConfinedPathError.io(param: param, path: shown, why: String(cString: strerror(errno))) }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw ConfinedPathError.notRegularFile(param: param, path: shown) }
        let size = Int(st.st_size), cap = min(limit ?? readLimit, readLimit)
        guard size <= cap else { throw ConfinedPathError.tooLarge(param: param, path: shown, size: size, limit: cap) }
        var data = Data(count: size)
        var done = 0
        let ok: Bool = data.withUnsafeMutableBytes { raw in
            while done < size {
                let n = Glibc.read(fd, raw.baseAddress! + done, size - done)
                if n < 0 { if errno == EINTR { continue }; return false }
                if n == 0 { break }
                done += n
            }
            return true
        }
        guard ok else { throw ConfinedPathError.io(param: param, path: shown, why: "read failed (\(String(cString: strerror(errno))))") }
        if done < size { data.count = done }
        return data
    }

    /// Replaces the file `comps` with `data` atomically: a temporary file in the same folder (opened
    /// relative to the folder's descriptor, O_EXCL | O_NOFOLLOW), fsync, rename over the name, fsync
    /// of the folder. A crash leaves the old file or the new one, whole. The folder must exist.
    public func writeAtomically(_ data: Data, to comps: [String], param: String, path: String) throws {
        let shown = ConfinedPathError.shown(path)
        guard let name = comps.last else { throw ConfinedPathError.badName(param: param, path: shown, why: "names the exchange folder itself, not a file") }
        let dfd = try openFolder(Array(comps.dropLast()), param: param, shown: shown)
        defer { close(dfd) }
        if entryKind(dfd, name) == S_IFDIR { throw ConfinedPathError.notRegularFile(param: param, path: shown) }
        let tmp = ".tmp-\(name.prefix(64))-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ConfinedPathError.io(param: param, path: shown, why: "cannot write (\(String(cString: strerror(errno)))); give a writable folder") }
        var renamed = false
        defer { if !renamed { unlinkat(dfd, tmp, 0) } }
        var err: Int32 = 0
        let written: Bool = data.withUnsafeBytes { raw in
            var off = 0
            while off < raw.count {
                let n = Glibc.write(fd, raw.baseAddress! + off, raw.count - off)
                if n < 0 { if errno == EINTR { continue }; err = errno; return false }
                off += n
            }
            return true
        }
        if written && fsync(fd) != 0 { err = errno }
        close(fd)
        guard written, err == 0 else { throw ConfinedPathError.io(param: param, path: shown, why: "cannot write (\(String(cString: strerror(err)))); check the disk has room") }
        guard renameat(dfd, tmp, dfd, name) == 0 else {
            throw ConfinedPathError.io(param: param, path: shown, why: "cannot rename into place (\(String(cString: strerror(errno))))")
        }
        renamed = true
        fsync(dfd)
    }
}
