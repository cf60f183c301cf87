import ArgumentParser
import Glibc
import Stasis

/// `stasis`: checkpoint and restore Linux processes from user space.
struct StasisCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stasis",
        abstract: "Snapshot running Linux processes to an image and restore them exactly where they were.",
        subcommands: [Run.self, Snapshot.self, Restore.self, Inspect.self, Filesystems.self, Demo.self])
}

/// Prints an error the way every command does: one line on stderr, then exit 1.
func fail(_ error: Error) -> Never {
    let message: String
    if let described = error as? CustomStringConvertible { message = described.description } else { message = "\(error)" }
    FileHandle.standardError.write(line: "stasis: \(message)")
    exit(1)
}

extension Stasis.FileHandle {
    static let standardError = Stasis.FileHandle(adopting: .init(rawValue: 2), name: "stderr", owned: false)
    static let standardOutput = Stasis.FileHandle(adopting: .init(rawValue: 1), name: "stdout", owned: false)
    static let standardInput = Stasis.FileHandle(adopting: .init(rawValue: 0), name: "stdin", owned: false)

    func write(line: String) {
        try? writeAll(Array((line + "\n").utf8))
    }
}

/// Writes a Codable value as pretty JSON to a path.
func writeJSON<T: Encodable>(_ value: T, to path: String) throws {
    let handle = try Stasis.FileHandle.open(path, O_WRONLY | O_CREAT | O_TRUNC)
    try handle.writeAll(Array(try encodeJSON(value).utf8) + [10])
}
