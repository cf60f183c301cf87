/// A small read-write area inside the process being rebuilt, where Stasis places the
/// arguments of the system calls it injects (paths, structs, arrays).
///
/// Guarantees: each `place` returns an address inside the area holding exactly the given
/// bytes, 16-byte aligned; the area is recycled with `reset()` between unrelated calls.
final class RemoteScratch {
    let address: UInt64
    let size: UInt64
    private var used: UInt64 = 0
    private let memory: RemoteMemory

    init(address: UInt64, size: UInt64, pid: Int32) {
        self.address = address
        self.size = size
        self.memory = RemoteMemory(pid: pid)
    }

    func reset() { used = 0 }

    func place(_ bytes: [UInt8]) throws -> UInt64 {
        let aligned = (used + 15) & ~15
        guard aligned + UInt64(bytes.count) <= size else {
            throw StasisError.usage("internal: scratch area of \(size) bytes is too small for \(bytes.count) more")
        }
        let target = address + aligned
        try memory.write(target, bytes: bytes)
        used = aligned + UInt64(bytes.count)
        return target
    }

    func place(cString: String) throws -> UInt64 { try place(Array(cString.utf8) + [0]) }

    func place(words: [UInt64]) throws -> UInt64 {
        var bytes: [UInt8] = []
        for word in words { bytes.appendLE(word) }
        return try place(bytes)
    }
}

/// Finds free room for `size` bytes, avoiding every range in `occupied`, at or above `floor`.
func findFreeRange(size: UInt64, avoiding occupied: [Range<UInt64>], floor: UInt64 = 0x1000_0000) -> UInt64? {
    let sorted = occupied.sorted { $0.lowerBound < $1.lowerBound }
    var candidate = floor
    for range in sorted {
        if range.upperBound <= candidate { continue }
        if range.lowerBound >= candidate + size { return candidate }
        candidate = (range.upperBound + 0xffff) & ~0xffff
    }
    return candidate + size <= 0x7fff_ffff_f000 ? candidate : nil
}
