//! The archiver, on the leader only: moves finished runs out of the replicated state into
//! data files in the object storage (`flotilla_store::archive`), and dumps the full run
//! index periodically.
//!
//! A round picks the finished runs old enough (by id), merges them with the last data
//! file if it is not full, writes the result as new files under fresh names, then
//! commits one `ArchiveRuns` command carrying the manifest generation it started from.
//! A leader killed anywhere in between leaves at most unreferenced files (the ost GC
//! removes them); the next leader starts over from the state. Idempotent by design.

use std::sync::Arc;
use std::time::Duration;

use flotilla_raft::RaftNode;
use flotilla_store::archive::{self, archivable, ArchivedRun, DataFile};
use flotilla_store::defaults;
use flotilla_store::ost::{Ost, OstError};
use flotilla_store::{Command, Response};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct ArchiveConfig {
    /// Period of an archive round.
    pub interval_ms: u64,
    /// Runs finished for less than this stay in the state.
    pub after_ms: u64,
    /// Size bound of a data file.
    pub max_file_bytes: u64,
    /// Most runs moved per round.
    pub batch: usize,
    /// Period of the full index dump (0: only on demand).
    pub index_interval_ms: u64,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            interval_ms: defaults::ARCHIVE_INTERVAL_MS,
            after_ms: defaults::ARCHIVE_AFTER_S * 1000,
            max_file_bytes: defaults::ARCHIVE_MAX_FILE_BYTES,
            batch: defaults::ARCHIVE_BATCH,
            index_interval_ms: defaults::INDEX_DUMP_INTERVAL_S * 1000,
        }
    }
}

pub async fn run(node: Arc<RaftNode>, ost: Ost, cfg: ArchiveConfig, shutdown: watch::Receiver<bool>) {
    let mut ticks = crate::LeaderTicks::new(cfg.interval_ms.max(50), shutdown);
    let mut last_dump = tokio::time::Instant::now();
    while ticks.next(&node).await {
        match round(&node, &ost, &cfg).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "runs archived"),
            Err(e) => tracing::warn!(error = %e, "archive round failed; retrying next round"),
        }
        if cfg.index_interval_ms > 0 && last_dump.elapsed() >= Duration::from_millis(cfg.index_interval_ms) {
            match dump_index(&node, &ost).await {
                Ok(d) => tracing::info!(runs = d.runs, bytes = d.bytes, "run index dumped"),
                Err(e) => tracing::warn!(error = %e, "run index dump failed"),
            }
            last_dump = tokio::time::Instant::now();
        }
    }
}

/// One archive round; returns how many runs moved.
pub async fn round(node: &RaftNode, ost: &Ost, cfg: &ArchiveConfig) -> Result<usize, String> {
    let now = crate::now_ms();
    let (generation, last, picked) = {
        let sm = node.state.read();
        let st = &sm.state;
        let busy: std::collections::BTreeSet<&str> =
            st.executor_tasks.values().map(|t| t.spec.run_id.as_str()).collect();
        let picked: Vec<ArchivedRun> = st
            .runs
            .values()
            .filter(|r| archivable(r.phase) && !busy.contains(r.id.as_str()))
            .filter(|r| {
                r.end_time.or(r.start_time).or(r.enqueue_time).unwrap_or(0).saturating_add(cfg.after_ms)
                    <= now
            })
            .take(cfg.batch.clamp(1, flotilla_store::limits::MAX_ARCHIVE_BATCH))
            .filter_map(|r| {
                // An ended run pulls nothing more: its credentials are not archived.
                let mut config = st.run_configs.get(&r.id)?.clone();
                flotilla_store::pod::redact_config(&mut config);
                Some(ArchivedRun { run: r.clone(), config })
            })
            .collect();
        let last = st.archive.files.last().filter(|f| f.bytes < cfg.max_file_bytes).cloned();
        (st.archive.generation, last, picked)
    };
    if picked.is_empty() {
        return Ok(0);
    }
    let run_ids: Vec<String> = picked.iter().map(|a| a.run.id.clone()).collect();
    let mut runs = match &last {
        Some(f) => archive::read_file(ost, &f.key).await.map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    runs.extend(picked);
    runs.sort_by(|a, b| a.run.id.cmp(&b.run.id));
    let files = archive::write_files(ost, runs, cfg.max_file_bytes, |n| {
        archive::fresh_name(generation + 1, node.id, now, n)
    })
    .await
    .map_err(|e| e.to_string())?;
    let cmd = Command::ArchiveRuns {
        prev_generation: generation,
        replace: last.as_ref().map(|f| f.key.clone()),
        files: files.clone(),
        run_ids,
    };
    let n = match node.write_if_leader(cmd).await {
        Ok((_, Response::ArchiveChanged { .. })) => files.iter().map(|f| f.runs as usize).sum::<usize>(),
        Ok((_, other)) => {
            remove(ost, &files).await;
            return Err(format!("archive commit refused: {other:?}"));
        }
        Err(e) => {
            // Maybe committed, maybe not: the files stay; if unreferenced, the GC takes them.
            return Err(format!("archive commit failed: {e}"));
        }
    };
    if let Some(old) = last {
        remove(ost, std::slice::from_ref(&old)).await;
        Ok(n.saturating_sub(old.runs as usize))
    } else {
        Ok(n)
    }
}

async fn remove(ost: &Ost, files: &[DataFile]) {
    for f in files {
        let _ = ost.delete(&f.key).await;
        let _ = ost.delete(&f.index_key).await;
    }
}

/// What [`dump_index`] wrote.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct IndexDump {
    pub key: String,
    pub runs: u64,
    pub bytes: u64,
}

/// Writes the full run index (archived and live runs, by id) to
/// [`archive::FULL_INDEX_KEY`].
pub async fn dump_index(node: &RaftNode, ost: &Ost) -> Result<IndexDump, OstError> {
    let (manifest, live): (archive::Manifest, Vec<(String, String, flotilla_store::run::RunPhase)>) = {
        let sm = node.state.read();
        let live = sm.state.runs.values().map(|r| (r.id.clone(), r.group.clone(), r.phase)).collect();
        (sm.state.archive.clone(), live)
    };
    let mut entries: Vec<(String, String, flotilla_store::run::RunPhase)> = live;
    for f in &manifest.files {
        entries.extend(
            archive::read_index(ost, &f.index_key).await?.into_iter().map(|e| (e.id, e.group, e.phase)),
        );
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = archive::encode_index(entries.iter().map(|(i, g, p)| (i.as_str(), g.as_str(), *p)));
    let size = bytes.len() as u64;
    ost.put_bytes(archive::FULL_INDEX_KEY, bytes, true).await?;
    Ok(IndexDump { key: archive::FULL_INDEX_KEY.to_string(), runs: entries.len() as u64, bytes: size })
}
