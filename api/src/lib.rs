//! flotilla's HTTP face: the warp server of a node ([`server`]), its JSON error type
//! ([`error`]), its metrics ([`metrics`]), the JSON shapes ([`types`]) and a typed client
//! ([`client`]) used by the CLI, the executor and the tests.
//!
//! Handlers translate HTTP into calls on `flotilla_raft::RaftNode` and back; they hold no
//! state of their own and never touch sled: every change is a Raft command.

pub mod archive;
pub mod auth;
pub mod client;
pub mod cors;
pub mod error;
pub mod lifecycle;
pub mod metrics;
pub mod objects;
mod routes;
mod runs;
pub mod server;
mod strict_json;
pub mod tasks;
pub mod tls;
pub mod types;
pub mod ui;

pub use client::{Client, ClientError};
pub use error::{ApiError, ErrorBody};
