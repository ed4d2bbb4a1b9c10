//! Every default of a setting in one place: the CLI's flags (`src/main.rs`) and the
//! `Default` impls of the configurations (`RaftConfig`, `Settings`, `ArchiveConfig`,
//! `GcConfig`) read these, so a default is written once. Bounds are in `limits.rs`.

// --- Raft timing (`--heartbeat-ms`, `--election-timeout-ms`, snapshots).

/// Heartbeat interval: every AppendEntries call must finish within it.
pub const HEARTBEAT_MS: u64 = 100;
/// Minimum election timeout; the maximum is 1.5 times this ([`election_timeout_max_ms`]).
/// A follower that heard from a leader campaigns after the leader's lease (the maximum)
/// plus its own random timeout: 625 to 750 ms with these defaults.
pub const ELECTION_TIMEOUT_MS: u64 = 250;
/// Build a snapshot every this many log entries.
pub const SNAPSHOT_LOGS: u64 = 5000;
/// Log entries kept behind the last snapshot for slow followers.
pub const MAX_LOGS_KEEP: u64 = 1000;
/// Longest a write or a linearizable read may take on a server (finding the leader,
/// forwarding, committing, catching up) before it answers 503 `unavailable`: long enough
/// for two election rounds (~1.5 s with the default Raft timing), short enough that a
/// client retrying through another node is not stuck behind a partitioned leader.
pub const REQUEST_TIMEOUT_MS: u64 = 2000;

/// The maximum election timeout for a minimum one.
pub const fn election_timeout_max_ms(min_ms: u64) -> u64 {
    min_ms * 3 / 2
}

// --- The scheduler.

/// An executor silent for this long gets no new tasks; a dynamic one is removed.
pub const EXECUTOR_TIMEOUT_MS: u64 = 60_000;

// --- The object storage's garbage collector (leader only).

/// Period of a collection round.
pub const OST_GC_INTERVAL_S: u64 = 600;
/// Unreferenced logs and archives younger than this are kept.
pub const OST_GC_GRACE_S: u64 = 3600;
/// Caches older than this are deleted.
pub const CACHE_MAX_AGE_S: u64 = 7 * 24 * 3600;

// --- The run archive (leader only).

/// Runs finished for this long move from the replicated state to the archive.
pub const ARCHIVE_AFTER_S: u64 = 3600;
/// Period of an archive round.
pub const ARCHIVE_INTERVAL_MS: u64 = 10_000;
/// Size bound of an archive data file.
pub const ARCHIVE_MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;
/// Runs one archive round moves at most (under `limits::MAX_ARCHIVE_BATCH`).
pub const ARCHIVE_BATCH: usize = 5_000;
/// Period of the full run index dump (0: only on demand).
pub const INDEX_DUMP_INTERVAL_S: u64 = 3600;
