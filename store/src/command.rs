//! The one way replicated state changes: a [`Command`] goes through the Raft log and is
//! applied by [`crate::State::apply`], which answers with a [`Response`].
//!
//! Application-level refusals (a compare-and-swap mismatch, a missing key) are *responses*,
//! not errors of the log: the entry is committed and applied like any other, it simply
//! changes nothing. Storage errors would stop a node; a user's mistake must not.
//!
//! The enum is externally tagged and serialized with field names (msgpack maps), so new
//! variants and new optional fields can be added without breaking logs already written.
//! Runs, executors and executor tasks slot in as further variants.

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_KEY_BYTES, MAX_VALUE_BYTES};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Set `key` to `value`. With `prev_revision`, only if the key's current revision is
    /// exactly that (0 means "only if the key does not exist").
    KvPut { key: String, value: String, prev_revision: Option<u64> },
    /// Delete `key`; with `prev_revision`, only if its revision is exactly that.
    KvDelete { key: String, prev_revision: Option<u64> },
    /// Turn maintenance mode on or off for the whole cluster.
    SetMaintenance { enabled: bool },
}

impl Command {
    /// A short stable name, used for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::KvPut { .. } => "kv_put",
            Command::KvDelete { .. } => "kv_delete",
            Command::SetMaintenance { .. } => "set_maintenance",
        }
    }

    /// Checks the command against the limits. Called at the API boundary before a command
    /// is proposed, and again (defensively) when it is applied.
    pub fn validate(&self) -> Result<(), CommandError> {
        match self {
            Command::KvPut { key, value, .. } => {
                validate_key(key)?;
                if value.len() > MAX_VALUE_BYTES {
                    return Err(CommandError::Invalid {
                        reason: format!("value is {} bytes, the limit is {MAX_VALUE_BYTES}", value.len()),
                    });
                }
                Ok(())
            }
            Command::KvDelete { key, .. } => validate_key(key),
            Command::SetMaintenance { .. } => Ok(()),
        }
    }
}

/// A key is 1..=MAX_KEY_BYTES bytes of UTF-8 with no control characters.
pub fn validate_key(key: &str) -> Result<(), CommandError> {
    if key.is_empty() {
        return Err(CommandError::Invalid { reason: "key must not be empty".into() });
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(CommandError::Invalid {
            reason: format!("key is {} bytes, the limit is {MAX_KEY_BYTES}", key.len()),
        });
    }
    if key.chars().any(char::is_control) {
        return Err(CommandError::Invalid { reason: "key must not contain control characters".into() });
    }
    Ok(())
}

/// What applying a command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Blank and membership entries, which carry no command.
    None,
    KvPut { revision: u64 },
    KvDelete { revision: u64 },
    Maintenance { enabled: bool },
    /// The command was applied and changed nothing, for this reason.
    Rejected(CommandError),
}

/// Why a command changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum CommandError {
    /// `prev_revision` did not match; `actual` is 0 when the key does not exist.
    #[error("revision mismatch on key {key:?}: expected {expected}, found {actual}")]
    RevisionMismatch { key: String, expected: u64, actual: u64 },
    #[error("key {key:?} not found")]
    NotFound { key: String },
    #[error("{reason}")]
    Invalid { reason: String },
}
