//! The executor agent: runs executor tasks in Docker containers through bollard and talks
//! to the servers only over HTTP with `flotilla_api::Client`. It must never depend on the
//! raft or scheduler crates.
//!
//! Empty for now: the Docker executor comes with its own issue.
