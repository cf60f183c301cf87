import CStasis

/// CRC-32C (Castagnoli) of `count` bytes, the checksum of every frame and page block.
/// Hardware-accelerated (SSE4.2) where the CPU has it.
@inline(__always)
public func crc32c(_ pointer: UnsafeRawPointer?, _ count: Int, continuing crc: UInt32 = 0) -> UInt32 {
    guard let pointer, count > 0 else { return crc }
    return stasis_crc32c(crc, pointer, count)
}
