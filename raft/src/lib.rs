//! Consensus for flotilla: openraft over sled, HTTP transport between nodes, and the
//! [`RaftNode`] that the API layer drives (writes forwarded to the leader, linearizable
//! reads, membership changes).
//!
//! Three pieces, as in openraft's own examples: the log store ([`log_store`]), the state
//! machine ([`state_machine`]) and the network ([`network`]). This crate knows the domain
//! only through `flotilla_store::{Command, Response, State}`; it must never contain domain
//! decisions, HTTP routing or anything of the scheduler.

// openraft's storage traits return its StorageError (over 200 bytes) by design.
#![allow(clippy::result_large_err)]

pub mod batch;
mod codec;
pub mod drain;
pub mod durable;
pub mod election;
pub mod error;
mod forward;
pub mod log_store;
pub mod network;
pub mod node;
pub mod rpc;
pub mod state_machine;
pub mod tls;

pub use error::{ErrorKind, NodeError, StartError};
pub use node::{ClusterStatus, LeaderRequest, LeaderResponse, NodeConfig, NodeStatus, RaftNode};
pub use state_machine::SharedState;

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Entry = openraft::Entry<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig>;

openraft::declare_raft_types!(
    /// Types of flotilla's Raft.
    pub TypeConfig:
        D = std::sync::Arc<flotilla_store::Command>,
        R = flotilla_store::Response,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);
