//! The replicated domain of flotilla: the state every server node holds, the one
//! [`Command`] enum that changes it, and the limits that bound it.
//!
//! Everything here is pure: [`State::apply`] is a deterministic function of the current
//! state, the Raft log index and the command, with no I/O, clocks or randomness, so every
//! replica and every replay of the log reaches the same state.
//!
//! The one exception is [`ost`], the object storage client (POSIX files or S3): it does
//! I/O, but the replicated state never calls it. This crate must never depend on
//! openraft, sled or the node's network code: it is the bottom of the stack
//! (store ← raft ← scheduler ← api).

mod apply;
pub mod archive;
pub mod command;
pub mod count;
pub mod defaults;
pub mod event;
pub mod executor;
pub mod export;
pub mod limits;
pub mod ost;
pub mod pod;
pub mod run;
pub mod state;
pub mod validate;

pub use command::{Command, CommandError, Response, RunPatch, RunUpdate};
pub use event::Event;
pub use state::{KvEntry, State};
