import Foundation
import Glibc
import Stasis
import Testing

/// A filesystem of `type` made in a file and mounted through a loop device for one test; unmounted
/// and deleted when the test ends, also on failure.
final class LoopFilesystem {
    let mountPoint: String
    private let image: String
    private var mounted = false

    init(_ type: String, scratch: ScratchDirectory) throws {
        image = scratch.file("\(type).img")
        mountPoint = scratch.file("mnt-\(type)")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        guard truncate(image, 512 << 20) == 0 || FileManager.default.createFile(atPath: image, contents: nil) && truncate(image, 512 << 20) == 0 else {
            throw TestFailure("cannot create \(image)")
        }
        let make = try runCommand(["/usr/sbin/mkfs.\(type)", "-q", image], timeout: 60)
        guard make.succeeded else { throw TestFailure("mkfs.\(type) failed: \(make.stderr)") }
        let mount = try runCommand(["/usr/bin/mount", "-o", "loop", image, mountPoint], timeout: 60)
        guard mount.succeeded else { throw TestFailure("mount -o loop failed: \(mount.stderr)") }
        mounted = true
    }

    deinit {
        if mounted { _ = try? runCommand(["/usr/bin/umount", mountPoint], timeout: 60) }
        unlink(image)
    }
}

/// `snapshot --fs`: directories kept with the memory, rolled back by restore.
@Suite("filesystem-consistent snapshots", .serialized, .timeLimit(.minutes(3)))
struct FilesystemTests {
    static var records: String {
        URL(fileURLWithPath: Products.pythonWorkload).deletingLastPathComponent().appendingPathComponent("py_records.py").path
    }

    /// A fresh directory on `type`: a btrfs subvolume on btrfs, a plain directory elsewhere.
    static func directory(on filesystem: LoopFilesystem, _ type: String) throws -> String {
        let path = filesystem.mountPoint + "/data"
        if type == "btrfs" {
            let made = try runCommand(["/usr/bin/btrfs", "subvolume", "create", path])
            guard made.succeeded else { throw TestFailure("btrfs subvolume create: \(made.stderr)") }
        } else {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        }
        return path
    }

    @Test("a workload's records file and memory agree after snapshot --fs, garbage, restore",
          arguments: [("btrfs", "btrfsSnapshot"), ("xfs", "reflink"), ("ext4", "copy")])
    func rollBack(type: String, mechanism: String) throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let filesystem = try LoopFilesystem(type, scratch: scratch)
        let data = try Self.directory(on: filesystem, type)
        let log = data + "/records.log"
        let workload = try VerifyingWorkload([Products.python, Self.records, "--file", log], scratch: scratch, cleanup: cleanup)
        defer { killAndForget(workload.pid) }
        let image = scratch.file("fs.stasis"), stats = scratch.file("stats.json")
        // Live: the workload keeps appending between the freeze and the kill; the rollback undoes that.
        let snap = try stasis("snapshot", "\(workload.pid)", "-o", image, "--fs", data, "--kill", "--stats", stats)
        try #require(snap.succeeded, "\(snap.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(contents(stats).utf8)) as? [String: Any] ?? [:]
        let kept = json["fs"] as? [String] ?? []
        #expect(kept.count == 1 && kept[0].contains(mechanism), "\(kept)")
        #expect(json["fs_ms"] is Double)
        let id = try #require(json["fs_id"] as? String)
        #expect(try stasis("fs", "list").stdout.contains(id))
        if mechanism == "copy" { #expect(snap.stderr.contains("warning"), "a plain copy is announced: \(snap.stderr)") }
        try "garbage that was never in memory\n".appendLine(to: log)
        let restore = try stasis("restore", image, "--detach")
        try #require(restore.succeeded, "\(restore.stderr)")
        cleanup.track(workload.pid)
        let first = try workload.check()
        #expect(first.ok, "\(first.detail)")
        usleep(200_000)
        let second = try workload.check()
        #expect(second.ok && second.progress > first.progress, "\(second.detail)")
        killAndForget(workload.pid)
        // Dropped: gone from the list, and the image can no longer be restored.
        #expect(try stasis("fs", "drop", id).succeeded)
        #expect(!(try stasis("fs", "list").stdout.contains(id)))
        let refused = try stasis("restore", image, "--detach")
        #expect(!refused.succeeded && refused.stderr.contains("filesystem snapshot \(id) is gone"), "\(refused.stderr)")
        #expect(!FileManager.default.fileExists(atPath: filesystem.mountPoint + "/.stasis-fs"), "nothing kept is left behind")
    }

    @Test("--fs-embed: the directory travels in the stream through pipes and is restored onto a fresh directory")
    func embedded() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let filesystem = try LoopFilesystem("xfs", scratch: scratch)
        let data = try Self.directory(on: filesystem, "xfs")
        try FileManager.default.createDirectory(atPath: data + "/sub", withIntermediateDirectories: true)
        try "kept\n".write(toFile: data + "/sub/note.txt", atomically: false, encoding: .utf8)
        try FileManager.default.createSymbolicLink(atPath: data + "/link", withDestinationPath: "sub/note.txt")
        let log = data + "/records.log"
        let workload = try VerifyingWorkload([Products.python, Self.records, "--file", log], scratch: scratch, cleanup: cleanup)
        defer { killAndForget(workload.pid) }
        let image = scratch.file("embedded.stasis")
        // Into a pipe (cat writes the file), then from a pipe.
        let snap = try runCommand(["/bin/sh", "-c", "'\(Products.stasis)' snapshot \(workload.pid) -o - --fs '\(data)' --fs-embed --kill | cat > '\(image)'"], timeout: 60)
        try #require(snap.succeeded, "\(snap.stderr)")
        #expect(!(try stasis("fs", "list", "--json").stdout.contains(data)), "embedded: nothing is kept on this machine")
        #expect(!FileManager.default.fileExists(atPath: filesystem.mountPoint + "/.stasis-fs"))
        try FileManager.default.removeItem(atPath: data)
        let restore = try runCommand(["/bin/sh", "-c", "cat '\(image)' | '\(Products.stasis)' restore - --detach"], timeout: 60)
        try #require(restore.succeeded, "\(restore.stderr)")
        cleanup.track(workload.pid)
        #expect(contents(data + "/sub/note.txt") == "kept\n")
        #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: data + "/link")) == "sub/note.txt")
        let report = try workload.check()
        #expect(report.ok, "\(report.detail)")
        let leftovers = try directoryEntries(filesystem.mountPoint).filter { $0.contains("stasis-staging") }
        #expect(leftovers.isEmpty, "staging directories left: \(leftovers)")
    }

    @Test("without --fs, a file the process had open that changed since the snapshot is refused at restore")
    func changedOpenFileRefused() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let log = scratch.file("records.log")
        let workload = try VerifyingWorkload([Products.python, Self.records, "--file", log], scratch: scratch, cleanup: cleanup)
        defer { killAndForget(workload.pid) }
        // Live: it goes on appending while the image streams, until the kill.
        let image = scratch.file("live.stasis")
        let snap = try stasis("snapshot", "\(workload.pid)", "-o", image, "--kill")
        try #require(snap.succeeded, "\(snap.stderr)")
        let refused = try stasis("restore", image, "--detach")
        #expect(!refused.succeeded)
        #expect(refused.stderr.contains(log) && refused.stderr.contains("was modified since the snapshot")
                && refused.stderr.contains("--fs"), "\(refused.stderr)")
        #expect(kill(workload.pid, 0) != 0, "nothing was restored")
        // Stop-the-world: nothing is written after the freeze; the file is as it was.
        let again = try VerifyingWorkload([Products.python, Self.records, "--file", scratch.file("other.log")], scratch: scratch, cleanup: cleanup)
        defer { killAndForget(again.pid) }
        let quiet = scratch.file("quiet.stasis")
        let stopped = try stasis("snapshot", "\(again.pid)", "-o", quiet, "--kill", "--stop-the-world")
        try #require(stopped.succeeded, "\(stopped.stderr)")
        let restore = try stasis("restore", quiet, "--detach")
        try #require(restore.succeeded, "\(restore.stderr)")
        cleanup.track(again.pid)
        #expect(try again.check().ok)
    }

    @Test("a file deleted while open comes back, unlinked, with its contents")
    func deletedOpenFile() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let program = URL(fileURLWithPath: Products.pythonWorkload).deletingLastPathComponent().appendingPathComponent("py_deleted_file.py").path
        let workload = try VerifyingWorkload([Products.python, program, "--dir", scratch.path], scratch: scratch, cleanup: cleanup)
        let before = try workload.check()
        #expect(before.ok, "\(before.detail)")
        let image = scratch.file("deleted.stasis")
        try cycle(workload.pid, image: image, cleanup: cleanup)
        let after = try workload.check()
        #expect(after.ok, "\(after.detail)")
        #expect(after.progress > before.progress)
        #expect(try inspect(image).files.contains { $0.kind == "deletedFile" })
    }

    @Test("a discarded snapshot removes its filesystem snapshot too")
    func discardRemovesIt() throws {
        let scratch = ScratchDirectory(), cleanup = Cleanup()
        let filesystem = try LoopFilesystem("xfs", scratch: scratch)
        let data = try Self.directory(on: filesystem, "xfs")
        let workload = try VerifyingWorkload([Products.python, Self.records, "--file", data + "/records.log"], scratch: scratch, cleanup: cleanup)
        defer { killAndForget(workload.pid) }
        let before = Set(FilesystemSnapshots.list().map(\.id))
        // The reader goes away at once: the stream fails with EPIPE after the directory was kept.
        let snapshot = try BackgroundStasis(["snapshot", "\(workload.pid)", "-o", "-", "--fs", data], closedOutput: true)
        let (status, message) = try snapshot.finish(within: 30)
        #expect(status != 0)
        #expect(message.contains("discarded"), "\(message)")
        #expect(Set(FilesystemSnapshots.list().map(\.id)) == before, "no filesystem snapshot registered")
        #expect(!FileManager.default.fileExists(atPath: filesystem.mountPoint + "/.stasis-fs"), "nothing kept is left behind")
        #expect(try workload.check().ok)
    }
}

/// The names in a directory.
func directoryEntries(_ path: String) throws -> [String] {
    try FileManager.default.contentsOfDirectory(atPath: path)
}

extension String {
    func appendLine(to path: String) throws {
        let handle = try Foundation.FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seekToEnd()
        try handle.write(contentsOf: Data(utf8))
    }
}
