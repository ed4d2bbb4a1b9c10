//! flotilla's HTTP face: the warp server of a node ([`server`]), its JSON error type
//! ([`error`]) and its metrics ([`metrics`]). The JSON shapes ([`types`]) and the typed
//! client ([`client`]) are `flotilla-client`'s, re-exported here under their old paths;
//! the executor uses that crate directly, so it never links this one.
//!
//! Handlers translate HTTP into calls on `flotilla_raft::RaftNode` and back; they hold no
//! state of their own and never touch sled: every change is a Raft command.

pub mod archive;
pub mod auth;
pub mod cors;
pub mod error;
mod handler;
pub mod lifecycle;
pub mod metrics;
pub mod objects;
mod openapi;
mod refresh;
mod routes;
mod runs;
pub mod server;
mod spool;
mod strict_json;
pub mod tasks;
pub mod tls;
pub mod ui;

pub use error::{ApiError, ErrorBody};
pub use flotilla_client::{client, report, types, Client, ClientError};
