//! The one error type the raft crate hands upwards. It is plain data (kind + safe message)
//! so that an error raised on the leader crosses a forwarded request unchanged: the client
//! sees the leader's status and message (a remote error keeps its status:
//! a 409 on the leader is a 409 through any node).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    NotFound,
    Conflict,
    /// No leader, quorum lost, shutting down, timed out: try again later.
    Unavailable,
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct NodeError {
    pub kind: ErrorKind,
    pub message: String,
}

impl NodeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        NodeError { kind, message: message.into() }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, m)
    }
    /// An internal failure: the details are logged here, the client gets nothing specific.
    pub fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{context}");
        Self::new(ErrorKind::Internal, "internal server error")
    }
}

/// Why a node could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "cannot open the store in {path}: {source}. If it is corrupt (sled can fail to reopen after an abrupt stop), \
         rebuild this node from its peers: stop it, move the data dir aside, start it empty and re-add it with \
         `flotilla cluster remove {id}` then `flotilla cluster add-learner --node {id}=URL` and `flotilla cluster promote {id}` \
         (README: Rebuilding a node)"
    )]
    Open { path: String, id: u64, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("the data dir {path} belongs to node {found}, not node {wanted}; refusing to start")]
    WrongNode { path: String, found: u64, wanted: u64 },
    #[error("invalid raft settings: {0}")]
    Config(String),
    #[error("cannot start raft: {0}")]
    Raft(String),
}
