/// How a snapshot keeps the process from running.
public enum SnapshotMode: String, Codable, Sendable {
    /// Frozen only while its state is captured and its memory made copy-on-write (a clone);
    /// the pages stream out while it runs (the default).
    case live
    /// Frozen until every page is written (the classic checkpoint; the baseline).
    case stopTheWorld = "stop-the-world"
}

/// Measurements of one snapshot, written by `--stats` as JSON.
public struct SnapshotStats: Codable, Sendable {
    public var mode: SnapshotMode
    /// How long any thread of the workload was kept from running: first thread stopped to last
    /// thread running again (for `--kill` in stop-the-world mode: to SIGKILL), ms.
    public var freeze_ms: Double
    /// From the start of the command's work to the image being complete, ms.
    public var total_ms: Double
    /// Time spent capturing registers and kernel state while frozen, ms.
    public var capture_ms: Double
    /// Time spent making the memory copy-on-write while frozen (the clone), ms; 0 in stop-the-world mode.
    public var cow_ms: Double
    /// From the first page read to the image being complete and synced, ms.
    public var stream_ms: Double
    /// Time spent writing pages (same as stream_ms; kept for scripts of the first version), ms.
    public var write_ms: Double
    /// Pages the workload wrote while the image streamed whose frozen contents had to be
    /// kept for the snapshot (0 in stop-the-world mode).
    public var cow_pages: UInt64
    /// Extra memory the snapshot held at its peak (sampled): kept page copies, the clone's page
    /// tables, pages read during the freeze, and Stasis's own buffer.
    public var peak_extra_bytes: UInt64
    /// How long one thread of the workload was stopped again at the end to reap the clone, ms.
    public var cleanup_stop_ms: Double
    /// Pages stored in the image.
    public var pages: UInt64
    /// Bytes of the image.
    public var bytes: UInt64
    /// Resident pages not stored because they held only zeros.
    public var zero_pages: UInt64
    /// Threads and mappings of all processes of the tree.
    public var threads: Int
    public var mappings: Int
    public var pid: Int32
    /// Processes in the tree (zombies included), and pipe and shared memory bytes read during the freeze.
    public var processes: Int?
    public var zombies: Int?
    public var shared_bytes: UInt64?
    /// Set when a live snapshot had to be taken stop-the-world instead, and why.
    public var fallback: String?
    /// How long keeping the `--fs` directories kept the tree frozen, ms (0 without `--fs`).
    public var fs_ms: Double?
    /// Per `--fs` directory: "PATH: mechanism (filesystem type)".
    public var fs: [String]?
    /// The filesystem snapshot's ID (`stasis fs list`), with `--fs`.
    public var fs_id: String?
}
