//! The run archive ("datamanager", seeds 001–003): finished runs leave the replicated
//! state for data files in the object storage, so the Raft state stays small however
//! many runs there are. The state keeps only a [`Manifest`]: the list of data files,
//! each with its index file (`id group phase` per run). A data file holds at most
//! `max_file_bytes` (10 MiB by default) of runs with their configurations; archiving a
//! batch rewrites only the last, not yet full, file and adds new ones.
//!
//! Files are written first, under fresh names, and committed by one Raft command that
//! checks the manifest generation: a leader killed before the commit leaves only
//! unreferenced files (collected later), never a half-visible archive.

use serde::{Deserialize, Serialize};

use crate::run::{phase_word, Run, RunConfig, RunPhase};

pub const DATA_PREFIX: &str = "datamanager/data/";
pub const FULL_INDEX_KEY: &str = "datamanager/index/runs.idx";

/// One data file of the archive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    /// Object key of the runs (msgpack).
    pub key: String,
    /// Object key of its index (`id\tgroup\tphase\n` lines, by id).
    pub index_key: String,
    pub runs: u64,
    pub bytes: u64,
}

/// What the replicated state knows of the archive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Bumped by every change; archive commands carry the generation they were built on.
    pub generation: u64,
    pub files: Vec<DataFile>,
}

impl Manifest {
    pub fn archived_runs(&self) -> u64 {
        self.files.iter().map(|f| f.runs).sum()
    }
}

/// A run as archived: its last status and its configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedRun {
    pub run: Run,
    pub config: RunConfig,
}

/// One line of an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: String,
    pub group: String,
    pub phase: RunPhase,
}

fn parse_phase(w: &str) -> Option<RunPhase> {
    Some(match w {
        "setuperror" => RunPhase::Setuperror,
        "queued" => RunPhase::Queued,
        "cancelled" => RunPhase::Cancelled,
        "running" => RunPhase::Running,
        "finished" => RunPhase::Finished,
        _ => return None,
    })
}

/// A run may be archived once it can no longer change.
pub fn archivable(phase: RunPhase) -> bool {
    matches!(phase, RunPhase::Setuperror | RunPhase::Cancelled | RunPhase::Finished)
}

pub fn data_key(name: &str) -> String {
    format!("{DATA_PREFIX}{name}.dat")
}

pub fn index_key(name: &str) -> String {
    format!("{DATA_PREFIX}{name}.idx")
}

pub fn encode_data(runs: &[ArchivedRun]) -> Vec<u8> {
    rmp_serde::to_vec_named(runs).expect("runs always serialise")
}

pub fn decode_data(bytes: &[u8]) -> Result<Vec<ArchivedRun>, String> {
    rmp_serde::from_slice(bytes).map_err(|e| format!("unreadable archive data file: {e}"))
}

/// Index lines (`id\tgroup\tphase\n`); ids and groups never hold tabs or newlines.
pub fn encode_index<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str, RunPhase)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, group, phase) in entries {
        out.extend_from_slice(id.as_bytes());
        out.push(b'\t');
        out.extend_from_slice(group.as_bytes());
        out.push(b'\t');
        out.extend_from_slice(phase_word(phase).as_bytes());
        out.push(b'\n');
    }
    out
}

pub fn decode_index(bytes: &[u8]) -> Result<Vec<IndexEntry>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "index is not UTF-8".to_string())?;
    text.lines()
        .map(|line| {
            let mut f = line.split('\t');
            match (f.next(), f.next(), f.next().and_then(parse_phase), f.next()) {
                (Some(id), Some(group), Some(phase), None) => {
                    Ok(IndexEntry { id: id.into(), group: group.into(), phase })
                }
                _ => Err(format!("bad index line {line:?}")),
            }
        })
        .collect()
}

/// Cuts runs (sorted by id) into chunks whose encoding stays under `max_bytes` (a run
/// bigger than that alone gets a chunk of its own).
pub fn split(runs: Vec<ArchivedRun>, max_bytes: u64) -> Vec<Vec<ArchivedRun>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut size = 0u64;
    for r in runs {
        let len = rmp_serde::to_vec_named(&r).map(|v| v.len() as u64).unwrap_or(0) + 8;
        if !current.is_empty() && size + len > max_bytes {
            chunks.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(r);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// A fresh file name: never reused, so an unfinished archive step can only leave files
/// nobody references.
pub fn fresh_name(generation: u64, node: u64, now_ms: u64, n: usize) -> String {
    format!("{generation:012}-{node}-{now_ms}-{n}")
}

/// Writes `runs` (sorted by id) as data files of at most `max_bytes`, each with its index,
/// fsynced; returns them in order. Names come from `name(n)`.
pub async fn write_files(
    ost: &crate::ost::Ost,
    runs: Vec<ArchivedRun>,
    max_bytes: u64,
    name: impl Fn(usize) -> String,
) -> Result<Vec<DataFile>, crate::ost::OstError> {
    let mut files = Vec::new();
    for (n, chunk) in split(runs, max_bytes).into_iter().enumerate() {
        let base = name(n);
        let data = encode_data(&chunk);
        let index =
            encode_index(chunk.iter().map(|r| (r.run.id.as_str(), r.run.group.as_str(), r.run.phase)));
        let file = DataFile {
            key: data_key(&base),
            index_key: index_key(&base),
            runs: chunk.len() as u64,
            bytes: data.len() as u64,
        };
        ost.put_bytes(&file.key, data, true).await?;
        ost.put_bytes(&file.index_key, index, true).await?;
        files.push(file);
    }
    Ok(files)
}

/// Reads one data file.
pub async fn read_file(ost: &crate::ost::Ost, key: &str) -> Result<Vec<ArchivedRun>, crate::ost::OstError> {
    let bytes = ost.get_bytes(key, 1024 * 1024 * 1024).await?;
    decode_data(&bytes).map_err(|message| crate::ost::OstError::Backend { key: key.to_string(), message })
}

/// Reads one index file.
pub async fn read_index(ost: &crate::ost::Ost, key: &str) -> Result<Vec<IndexEntry>, crate::ost::OstError> {
    let bytes = ost.get_bytes(key, 1024 * 1024 * 1024).await?;
    decode_index(&bytes).map_err(|message| crate::ost::OstError::Backend { key: key.to_string(), message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{new_run, RunCreate, TaskConfig};

    fn archived(seq: u64, group: &str) -> ArchivedRun {
        let config = RunCreate::new("r", group, vec![TaskConfig::new("t", "img", "true")]);
        let run = new_run(&config, seq, 1, seq, 0);
        ArchivedRun { run, config }
    }

    #[test]
    fn data_and_index_round_trip_and_split_bounds_file_size() {
        let runs: Vec<ArchivedRun> = (1..=300).map(|i| archived(i, "/p/x")).collect();
        assert_eq!(decode_data(&encode_data(&runs)).unwrap(), runs);
        let idx =
            encode_index(runs.iter().map(|r| (r.run.id.as_str(), r.run.group.as_str(), RunPhase::Finished)));
        let back = decode_index(&idx).unwrap();
        assert_eq!(back.len(), 300);
        assert_eq!(
            back[0],
            IndexEntry { id: runs[0].run.id.clone(), group: "/p/x".into(), phase: RunPhase::Finished }
        );
        let one = encode_data(&runs[..1]).len() as u64;
        let chunks = split(runs.clone(), one * 10);
        assert!(chunks.len() >= 30, "{}", chunks.len());
        assert!(chunks.iter().all(|c| (encode_data(c).len() as u64) <= one * 10 + 16));
        assert_eq!(chunks.concat(), runs);
        assert!(decode_index(b"a\tb\n").is_err());
    }
}
