import ArgumentParser
import Glibc
import Stasis

/// `stasis fs`: the directory snapshots that `snapshot --fs` keeps.
struct Filesystems: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fs",
        abstract: "List and drop the filesystem snapshots kept by `snapshot --fs`.",
        subcommands: [List.self, Drop.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the filesystem snapshots Stasis keeps.")
        @Flag(help: "Print JSON for machines.")
        var json = false

        func run() throws {
            let entries = FilesystemSnapshots.list()
            if json {
                do { print(try encodeJSON(entries)) } catch { fail(error) }
                return
            }
            if entries.isEmpty { print("no filesystem snapshots"); return }
            for entry in entries {
                var when = time_t(entry.created)
                var parts = tm()
                gmtime_r(&when, &parts)
                var buffer = [CChar](repeating: 0, count: 32)
                strftime(&buffer, buffer.count, "%Y-%m-%d %H:%M:%S UTC", &parts)
                print("\(entry.id)  \(String(cString: buffer))\(entry.image.map { "  image \($0)" } ?? "")")
                for directory in entry.directories {
                    print("  \(directory.path): \(directory.mechanism.rawValue) on \(directory.filesystemType), kept in \(directory.store)")
                }
            }
        }
    }

    struct Drop: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Free a filesystem snapshot (its image can then no longer be restored).")
        @Argument(help: "The snapshot's ID, as `stasis fs list` shows it.")
        var id: String

        func run() throws {
            do { try FilesystemSnapshots.drop(id: id) } catch { fail(error) }
        }
    }
}
