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
