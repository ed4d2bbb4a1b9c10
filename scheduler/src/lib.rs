//! The scheduler: loops that run on the Raft leader only and decide, as pure functions of
//! the replicated state, what to propose next (advance runs, assign executor tasks, fail
//! tasks of lost executors). It reads through `flotilla_raft::SharedState` and changes
//! state only by proposing `flotilla_store::Command`s; it never touches sled or HTTP.
//!
//! Empty for now: runs and executors come with their own issue.
