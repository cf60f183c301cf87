// swift-tools-version: 6.1
import PackageDescription

/// Test workloads: small C programs that the end-to-end tests and benchmarks
/// checkpoint and restore. Each is its own executable product.
let workloads = ["stasis-counter", "wl-threads", "wl-memory", "wl-files", "wl-sweep", "wl-bench", "wl-pipe", "wl-shared", "wl-zombies", "wl-blocked", "wl-tree", "wl-forker"]

let package = Package(
    name: "Stasis",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "Stasis", targets: ["Stasis"]),
        .executable(name: "stasis", targets: ["StasisCLI"]),
        .executable(name: "stasis-bench", targets: ["StasisBench"]),
    ] + workloads.map { .executable(name: $0, targets: [$0]) },
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
    ],
    targets: [
        // The only C in the engine: what Swift cannot call (variadic ptrace/syscall/ioctl,
        // GNU extensions, function-like macros) and kernel structs newer than Debian 12's headers.
        .target(
            name: "CStasis",
            cSettings: [.unsafeFlags(["-msse4.2"])]
        ),
        .target(
            name: "Stasis",
            dependencies: [
                "CStasis",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .executableTarget(
            name: "StasisCLI",
            dependencies: [
                "Stasis",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(
            name: "StasisBench",
            dependencies: [
                "Stasis",
                "CStasis",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "StasisTests",
            dependencies: ["Stasis", "CStasis"]
        ),
        // What the workloads share: the report protocol's file writes, JSON escaping, timing.
        .target(
            name: "WorkloadSupport",
            path: "Sources/Workloads/support",
            cSettings: [.unsafeFlags(["-O2"])]
        ),
    ] + workloads.map {
        .executableTarget(
            name: $0,
            dependencies: ["WorkloadSupport"],
            path: "Sources/Workloads/\($0)",
            cSettings: [.unsafeFlags(["-O2", "-pthread"])],
            linkerSettings: [.linkedLibrary("pthread")]
        )
    }
)
