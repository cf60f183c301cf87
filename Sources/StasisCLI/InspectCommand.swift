import ArgumentParser
import Glibc
import Stasis

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what an image holds: threads, mappings, file descriptors, totals. Checks every checksum.")

    @Argument(help: "Image file, or - for standard input.")
    var image: String
    @Flag(help: "Print JSON for machines.")
    var json = false

    func run() throws {
        do {
            let source = image == "-" ? Stasis.FileHandle.standardInput : try Stasis.FileHandle.open(image, O_RDONLY)
            let summary = try ImageSummary.read(from: ImageReader(source: source))
            if json {
                print(try encodeJSON(summary))
            } else {
                printText(summary)
            }
        } catch { fail(error) }
    }

    func printText(_ s: ImageSummary) {
        print("Stasis image, format \(s.format_version), \(s.image_bytes) bytes, taken on kernel \(s.kernel)")
        print("process \(s.pid) (\(s.name)): \(s.command_line.joined(separator: " "))")
        print("  executable \(s.executable)")
        print("  cwd        \(s.working_directory)")
        print("  signal actions set: \(s.signal_actions)")
        print("threads (\(s.threads.count)):")
        for t in s.threads {
            print("  \(t.tid) \(t.name)  rip=\(t.rip) rsp=\(t.rsp) blocked=\(t.blocked_signals)\(t.pending_signals > 0 ? " pending=\(t.pending_signals)" : "")\(t.rseq ? " rseq" : "")")
        }
        print("mappings (\(s.mappings.count)):")
        for m in s.mappings {
            let range = "\(m.start)-\(m.end)".padding(to: 29)
            print("  \(range) \(m.permissions) \(m.backing.padding(to: 11)) \(String(m.stored_bytes / 1024).leftPadding(to: 9)) KiB stored  \(m.name)")
        }
        print("file descriptors (\(s.files.count)):")
        for f in s.files {
            print("  \(f.fd): \(f.kind) \(f.path) flags=\(f.flags) offset=\(f.offset)\(f.cloexec ? " cloexec" : "")")
        }
        print("total: \(s.total_pages) pages (\(s.total_page_bytes / 1024) KiB) in \(s.page_blocks) blocks")
    }
}

extension String {
    func padding(to width: Int) -> String { count >= width ? self : self + String(repeating: " ", count: width - count) }
    func leftPadding(to width: Int) -> String { count >= width ? self : String(repeating: " ", count: width - count) + self }
}
