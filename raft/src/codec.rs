//! The one byte encoding of everything Raft stores or sends: log entries, votes,
//! snapshots, state machine records and the RPCs between nodes are MessagePack with named
//! fields (rmp-serde), so a field added with `#[serde(default)]` reads older bytes.

use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(v)
}

/// The length of `v`'s encoding, counted as it is written out, never held.
pub(crate) fn encoded_len<T: Serialize>(v: &T) -> Result<usize, rmp_serde::encode::Error> {
    let mut count = flotilla_store::count::ByteCount::default();
    rmp_serde::encode::write_named(&mut count, v)?;
    Ok(count.0)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use flotilla_store::Command;

    use super::*;

    /// Entries carry their command behind an `Arc` (a cached entry is cloned by a count, not
    /// by copying a whole run); serde's `rc` encodes it as the command itself, so the bytes
    /// on disk and on the wire are those of older versions, both ways.
    #[test]
    fn a_shared_command_encodes_as_the_command() {
        let cmd = Command::KvPut { key: "k".into(), value: "v".into(), prev_revision: Some(3) };
        let shared = encode(&Arc::new(cmd.clone())).unwrap();
        assert_eq!(shared, encode(&cmd).unwrap());
        let back: Arc<Command> = decode(&encode(&cmd).unwrap()).unwrap();
        assert_eq!(encode(&*back).unwrap(), shared);
    }

    #[test]
    fn the_counted_length_is_the_encoding_s() {
        let cmd = Command::KvPut { key: "k".repeat(300), value: "v".repeat(70_000), prev_revision: Some(3) };
        let batch = Command::Batch(vec![cmd.clone(), cmd.clone()]);
        for c in [&cmd, &batch] {
            assert_eq!(encoded_len(c).unwrap(), encode(c).unwrap().len());
        }
    }
}
