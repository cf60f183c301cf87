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
        let zombies = s.processes.filter { $0.zombie_wait_status != nil }.count
        print("tree of \(s.processes.count) process\(s.processes.count == 1 ? "" : "es") under PID \(s.pid)\(zombies > 0 ? " (\(zombies) zombie\(zombies == 1 ? "" : "s"))" : "")\(s.pid_namespace ? ", in a PID namespace of its own" : "")")
        for p in s.processes {
            let namespaced = p.namespace_pid.map { " [\($0) inside]" } ?? ""
            if let status = p.zombie_wait_status {
                print("\nzombie \(p.pid)\(namespaced), child of \(p.parent), wait status \(status)")
                continue
            }
            print("\nprocess \(p.pid)\(namespaced) (\(p.name)): \(p.command_line.joined(separator: " "))")
            print("  parent \(p.parent), process group \(p.process_group), session \(p.session)")
            print("  executable \(p.executable)")
            print("  cwd        \(p.working_directory)")
            print("  signal actions set: \(p.signal_actions)")
            print("  threads (\(p.threads.count)):")
            for t in p.threads {
                print("    \(t.tid) \(t.name)  rip=\(t.rip) rsp=\(t.rsp) blocked=\(t.blocked_signals)\(t.pending_signals > 0 ? " pending=\(t.pending_signals)" : "")\(t.rseq ? " rseq" : "")")
            }
            print("  mappings (\(p.mappings.count)):")
            for m in p.mappings {
                let range = "\(m.start)-\(m.end)".padding(to: 29)
                print("    \(range) \(m.permissions) \(m.backing.padding(to: 12)) \(String(m.stored_bytes / 1024).leftPadding(to: 9)) KiB stored  \(m.name)")
            }
            print("  file descriptors (\(p.files.count)):")
            for f in p.files {
                print("    \(f.fd): \(f.kind) \(f.path) flags=\(f.flags) offset=\(f.offset)\(f.cloexec ? " cloexec" : "")")
            }
        }
        if !s.pipes.isEmpty || !s.shared_memory.isEmpty { print("") }
        for pipe in s.pipes {
            print("pipe \(pipe.fifo ?? "pipe:[\(pipe.id)]"): \(pipe.buffered_bytes) bytes buffered (capacity \(pipe.capacity))")
        }
        for object in s.shared_memory {
            print("shared memory \(object.kind) \(object.name.isEmpty ? "#\(object.id)" : object.name): \(object.size) bytes, \(object.stored_bytes) stored")
        }
        print("\ntotal: \(s.total_pages) pages (\(s.total_page_bytes / 1024) KiB) in \(s.page_blocks) blocks, \(s.open_file_descriptions) open file descriptions")
    }
}

extension String {
    func padding(to width: Int) -> String { count >= width ? self : self + String(repeating: " ", count: width - count) }
    func leftPadding(to width: Int) -> String { count >= width ? self : String(repeating: " ", count: width - count) + self }
}
