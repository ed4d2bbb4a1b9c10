//! What a process needs to talk to flotilla servers without being one: the typed HTTP
//! client ([`client`], over [`http`]), the JSON shapes of the public API ([`types`]), the
//! process's TLS client settings ([`tls`]) and the TLS of a plain listener ([`server_tls`]:
//! a node's, or an executor's health port). The CLI, the executor, the tests and the
//! server's own forwarding all use it.
//!
//! It exists so that an executor host builds and links no server: this crate must never
//! depend on `flotilla-raft`, `flotilla-scheduler`, `flotilla-api`, openraft, warp or sled
//! (`scripts/test.sh` checks the executor's dependency tree). Below it there is only
//! `flotilla-store`, for the domain types. Server-side meaning (routes, auth, what a
//! handler answers) stays in `flotilla-api`.

pub mod client;
mod coalesce;
pub mod http;
pub mod report;
pub mod server_tls;
pub mod tls;
pub mod types;

pub use client::{Client, ClientError};
