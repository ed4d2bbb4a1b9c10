//! The one byte encoding of everything Raft stores or sends: log entries, votes,
//! snapshots, state machine records and the RPCs between nodes are MessagePack with named
//! fields (rmp-serde), so a field added with `#[serde(default)]` reads older bytes.

use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(v)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}
