//! Every bound of the system in one place (TigerBeetle style): a request, a key or a list
//! that crosses one of these is refused at the boundary with a 4xx, never half-processed.

/// Longest coordination key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest coordination value, in bytes of UTF-8.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most items one `GET /api/v1/kv?prefix=` may return.
pub const MAX_LIST_LIMIT: usize = 1000;
/// Items returned by a list when the client names no limit.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// Largest body accepted on the public API routes.
pub const MAX_API_BODY_BYTES: u64 = 1024 * 1024;
/// Largest body accepted on the node-to-node Raft routes (append batches, snapshot chunks).
pub const MAX_RAFT_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Most nodes a cluster may have (voters and learners together).
pub const MAX_CLUSTER_NODES: usize = 15;
/// Longest node address (`http://host:port`).
pub const MAX_NODE_ADDR_BYTES: usize = 256;
/// Longest task, run or executor name (and group path component), in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest group path, image name or cache group, in bytes.
pub const MAX_GROUP_BYTES: usize = 512;
/// Most entries in one annotations, environment or labels map.
pub const MAX_MAP_ENTRIES: usize = 256;
/// Longest value in such a map (also a step command, a setup error), in bytes.
pub const MAX_MAP_VALUE_BYTES: usize = 16 * 1024;
/// Most tasks in one run.
pub const MAX_TASKS_PER_RUN: usize = 500;
/// Most steps in one task.
pub const MAX_STEPS_PER_TASK: usize = 100;
/// Most setup errors a run may be created with.
pub const MAX_SETUP_ERRORS: usize = 100;
/// Highest `approvers_required`.
pub const MAX_APPROVERS_REQUIRED: u32 = 100;
/// Most archs one executor may declare.
pub const MAX_ARCHS: usize = 16;
/// Most executors registered at once.
pub const MAX_EXECUTORS: usize = 10_000;
/// Longest an executor's task long-poll may wait, in milliseconds.
pub const MAX_LONG_POLL_MS: u64 = 60_000;
/// Events buffered per server-sent-events subscriber before it is cut off as too slow.
pub const EVENT_BUFFER: usize = 4096;
/// Most event streams one node serves at once (more get 503).
pub const MAX_EVENT_SUBSCRIBERS: usize = 256;

/// Largest workspace archive or cache an executor may upload.
pub const MAX_ARCHIVE_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// zstd level of workspace archives and caches. Measured on a 6 MB source tree (gzip's
/// unpacked sources) and a 100 MB build tree: see `scripts/archive-timing.sh`; level 3
/// (zstd's default) is the knee of size against save time.
pub const ARCHIVE_ZSTD_LEVEL: i32 = 3;
/// Largest log of one step; an executor truncates beyond it.
pub const MAX_LOG_BYTES: u64 = 64 * 1024 * 1024;
/// Largest export accepted by an import (it travels as one Raft entry, under
/// `MAX_RAFT_BODY_BYTES`).
pub const MAX_IMPORT_BYTES: u64 = 48 * 1024 * 1024;
