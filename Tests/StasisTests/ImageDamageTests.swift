import Foundation
import Glibc
import Stasis
import Testing

/// Truncated, corrupted and foreign images: a clear error naming the damaged record, and no
/// process left behind.
@Suite("damaged images", .serialized, .timeLimit(.minutes(3)))
struct ImageDamageTests {
    /// One image of a small multi-threaded workload, taken with --kill so its PID is free.
    nonisolated(unsafe) static let fixture: (image: [UInt8], pid: pid_t) = {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let workload = try! VerifyingWorkload([Products.path("wl-threads"), "--threads", "2"], scratch: scratch, cleanup: cleanup)
        let path = scratch.file("good.stasis")
        let result = try! stasis("snapshot", "\(workload.pid)", "-o", path, "--kill")
        precondition(result.succeeded, result.stderr)
        return (Array(FileManager.default.contents(atPath: path)!), workload.pid)
    }()

    func restoreFails(_ bytes: [UInt8], expecting words: [String]) throws {
        let pid = Self.fixture.pid
        let scratch = ScratchDirectory()
        let path = scratch.file("damaged.stasis")
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
        let result = try stasis("restore", path, "--detach")
        if result.succeeded { killAndForget(pid) }
        #expect(!result.succeeded, "a damaged image was restored")
        #expect(words.contains { result.stderr.contains($0) }, "unclear error: \(result.stderr)")
        #expect(result.stderr.split(separator: "\n").count == 1)
        #expect(access("/proc/\(pid)", F_OK) != 0, "a process was left behind")
        #expect(!stasisCgroups().contains("\(pid)"), "a cgroup was left behind")
    }

    @Test("truncation at many offsets")
    func truncated() throws {
        let image = Self.fixture.image
        var offsets = [0, 4, 8, 31, 32, 40, 100, 1000, 5000]
        offsets += stride(from: 8192, to: image.count - 1, by: max(4096, image.count / 24)).map { $0 }
        offsets += [image.count - 200, image.count - 30, image.count - 1]
        for offset in offsets where offset < image.count {
            try restoreFails(Array(image[0..<offset]), expecting: ["truncated", "incomplete", "not a Stasis image"])
        }
    }

    @Test("byte flips in the header, records and page data")
    func corrupted() throws {
        let image = Self.fixture.image
        var offsets = [0, 9, 12, 28, 33, 40, 60, 300, 2000]
        offsets += stride(from: 4096, to: image.count, by: max(4096, image.count / 24)).map { $0 + 17 }
        offsets.append(image.count - 10)
        for offset in offsets where offset < image.count {
            var damaged = image
            damaged[offset] ^= 0x5a
            try restoreFails(damaged, expecting: ["corrupt", "not a Stasis image", "not supported", "truncated", "incomplete"])
        }
    }

    @Test("a foreign file")
    func foreign() throws {
        try restoreFails(Array(FileManager.default.contents(atPath: "/bin/sh")!.prefix(100_000)), expecting: ["not a Stasis image"])
        try restoreFails(Array(repeating: 0, count: 10_000), expecting: ["not a Stasis image"])
    }

    @Test("every damaged record is named")
    func namesTheRecord() throws {
        var damaged = Self.fixture.image
        damaged[32 + 24 + 5] ^= 1  // inside the first record's payload
        let scratch = ScratchDirectory()
        let path = scratch.file("named.stasis")
        FileManager.default.createFile(atPath: path, contents: Data(damaged))
        let result = try stasis("restore", path)
        #expect(result.stderr.contains("record #0 (tree) at byte 32"), "\(result.stderr)")
    }
}
