import ArgumentParser
import Glibc
import Stasis

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a command detached, in a cgroup of its own; print its PID and return.")

    @Option(help: "File for the command's standard input (default /dev/null).")
    var stdin: String?
    @Option(help: "File the command's standard output is appended to (default /dev/null).")
    var stdout: String?
    @Option(help: "File the command's standard error is appended to (default /dev/null).")
    var stderr: String?
    @Flag(help: "Do not put the command in a cgroup of its own.")
    var noCgroup = false
    @Flag(name: .customLong("pidns"), help: "Start the command as PID 1 of its own PID namespace (with its own /proc); its snapshots restore into fresh namespaces.")
    var pidNamespace = false
    @Argument(parsing: .captureForPassthrough, help: "The command and its arguments (after --).")
    var command: [String] = []

    func run() throws {
        let words = command.first == "--" ? Array(command.dropFirst()) : command
        do {
            let (pid, _) = try Launcher.launch(words, options: .init(
                standardInput: stdin, standardOutput: stdout, standardError: stderr, useCgroup: !noCgroup, pidNamespace: pidNamespace))
            print(pid)
        } catch { fail(error) }
    }
}
