//! The export format: the whole replicated state (maintenance flag excluded), versioned
//! and checksummed, so an import can refuse a corrupt, truncated or foreign file before
//! anything changes.
//!
//! Layout: the line `flotilla-export\n`, the format version (u32, big-endian), the body's
//! length (u64, big-endian), the SHA-256 of the body (32 bytes), then the body: the state
//! and the archived runs, in msgpack.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::archive::ArchivedRun;
use crate::state::State;

#[derive(Serialize, Deserialize)]
struct Body {
    state: State,
    /// The runs of the archive (its data files' contents; the manifest is not kept: an
    /// import writes them again into the importing cluster's object storage).
    archived: Vec<ArchivedRun>,
}

pub const MAGIC: &[u8] = b"flotilla-export\n";
pub const VERSION: u32 = 1;
const HEADER: usize = MAGIC.len() + 4 + 8 + 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    #[error("not a flotilla export (bad header)")]
    NotAnExport,
    #[error("export format version {0} is not supported (this server reads version {VERSION})")]
    Version(u32),
    #[error("the export is truncated or has trailing bytes: {found} body bytes, {expected} announced")]
    Length { expected: u64, found: u64 },
    #[error("the export is corrupt: checksum mismatch")]
    Checksum,
    #[error("the export cannot be decoded: {0}")]
    Decode(String),
    #[error("the exported state is inconsistent: {0}")]
    Invalid(String),
}

/// Encodes `state` (its maintenance flag and archive manifest cleared) and the archived
/// runs. Registry credentials are exported as `"***"`: an export is a GET answer, and
/// secrets never leave the cluster in one.
pub fn encode(state: &State, archived: Vec<ArchivedRun>) -> Vec<u8> {
    let mut state = state.clone();
    state.maintenance = false;
    state.archive = Default::default();
    state.run_configs.values_mut().for_each(crate::pod::redact_config);
    let mut archived = archived;
    archived.iter_mut().for_each(|a| crate::pod::redact_config(&mut a.config));
    let body = rmp_serde::to_vec_named(&Body { state, archived }).expect("the state always serialises");
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    out
}

/// Decodes and checks an export: the state and the archived runs.
pub fn decode(bytes: &[u8]) -> Result<(State, Vec<ArchivedRun>), ExportError> {
    if bytes.len() < HEADER || !bytes.starts_with(MAGIC) {
        return Err(ExportError::NotAnExport);
    }
    let mut at = MAGIC.len();
    let version = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    at += 4;
    if version != VERSION {
        return Err(ExportError::Version(version));
    }
    let expected = u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    at += 8;
    let sum = &bytes[at..at + 32];
    let body = &bytes[HEADER..];
    if body.len() as u64 != expected {
        return Err(ExportError::Length { expected, found: body.len() as u64 });
    }
    if Sha256::digest(body).as_slice() != sum {
        return Err(ExportError::Checksum);
    }
    let body: Body = rmp_serde::from_slice(body).map_err(|e| ExportError::Decode(e.to_string()))?;
    body.state.validate_import().map_err(ExportError::Invalid)?;
    for a in &body.archived {
        if a.run.id.is_empty() || body.state.runs.contains_key(&a.run.id) {
            return Err(ExportError::Invalid(format!("archived run {:?} is also in the state", a.run.id)));
        }
    }
    Ok((body.state, body.archived))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use crate::run::{RunCreate, TaskConfig};

    fn sample() -> State {
        let mut s = State::default();
        s.apply(1, &Command::KvPut { key: "a".into(), value: "1".into(), prev_revision: None });
        let create = RunCreate::new("r", "/g", vec![TaskConfig::new("t", "img", "true")]);
        s.apply(2, &Command::CreateRun { create: Box::new(create), now_ms: 5 });
        s.apply(3, &Command::SetMaintenance { enabled: true });
        s
    }

    #[test]
    fn round_trip_clears_maintenance_and_keeps_everything_else() {
        let s = sample();
        let (back, archived) = decode(&encode(&s, Vec::new())).unwrap();
        let mut want = s.clone();
        want.maintenance = false;
        assert_eq!(back, want);
        assert!(archived.is_empty());
    }

    #[test]
    fn corrupt_truncated_and_foreign_exports_are_refused() {
        let good = encode(&sample(), Vec::new());
        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        assert_eq!(decode(&flipped), Err(ExportError::Checksum));
        assert!(matches!(decode(&good[..good.len() - 1]), Err(ExportError::Length { .. })));
        assert_eq!(decode(&good[..10]), Err(ExportError::NotAnExport));
        assert_eq!(decode(b"{\"json\": true}"), Err(ExportError::NotAnExport));
        let mut v2 = good.clone();
        v2[MAGIC.len() + 3] = 2;
        assert_eq!(decode(&v2), Err(ExportError::Version(2)));
    }

    #[test]
    fn import_applies_only_in_maintenance_and_keeps_ids_growing() {
        let (exported, _) = decode(&encode(&sample(), Vec::new())).unwrap();
        let mut target = State::default();
        let r = target.apply(1, &Command::Import(Box::new(exported.clone())));
        assert!(matches!(r, crate::Response::Rejected(crate::CommandError::Conflict { .. })));
        assert_eq!(target, State::default());
        target.apply(2, &Command::SetMaintenance { enabled: true });
        target.last_run_seq = 99;
        assert_eq!(
            target.apply(3, &Command::Import(Box::new(exported.clone()))),
            crate::Response::Done { revision: 3 }
        );
        assert!(target.maintenance, "the cluster stays in maintenance after an import");
        assert_eq!(target.runs, exported.runs);
        assert_eq!(target.kv, exported.kv);
        assert_eq!(target.last_run_seq, 99, "run ids never go back");
        assert_eq!(target.active_runs.len(), 1);
    }
}
