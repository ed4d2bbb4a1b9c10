//! Garbage collection of the object storage, on the leader only: every log and archive
//! has a reference to its run written before its data, so an object with no reference
//! after a grace period, or whose run is gone, is garbage.
//!
//! Logs and workspace archives of an executor task carry one `runs/<run id>` reference
//! object per run using them; deleting a run deletes its references, and data with no
//! reference left is deleted here. Caches are deleted once older than a maximum age (a
//! later run saves them again). Archive data files the manifest does not name (left by
//! an interrupted archive step or replaced) are deleted. Everything unreferenced must
//! also be older than a grace period, so an upload in progress (reference first, data
//! second) or an archive step being committed is never collected under its feet.
//!
//! Deciding is a pure function of the listing, the known runs and the clock ([`plan`]);
//! the loop only lists and deletes.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotilla_raft::RaftNode;
use flotilla_store::archive::DATA_PREFIX;
use flotilla_store::defaults;
use flotilla_store::ost::keys::{ARCHIVES, CACHES, LOGS};
use flotilla_store::ost::{ObjectInfo, Ost};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct GcConfig {
    /// Period of a collection round.
    pub interval_ms: u64,
    /// Unreferenced objects younger than this are kept.
    pub grace_ms: u64,
    /// Caches older than this are deleted.
    pub cache_max_age_ms: u64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            interval_ms: defaults::OST_GC_INTERVAL_S * 1000,
            grace_ms: defaults::OST_GC_GRACE_S * 1000,
            cache_max_age_ms: defaults::CACHE_MAX_AGE_S * 1000,
        }
    }
}

/// The keys to delete, given every object under `logs/`, `workspacearchives/`, `caches/`
/// and the archive's data prefix, whether the archive manifest names a key, and the time.
pub fn plan(
    objects: &[ObjectInfo],
    in_manifest: impl Fn(&str) -> bool,
    now_ms: u64,
    cfg: &GcConfig,
) -> Vec<String> {
    let old = |o: &ObjectInfo, age: u64| o.last_modified_ms.saturating_add(age) <= now_ms;
    // Per task: its data objects and how many run references it has.
    let mut groups: BTreeMap<&str, (Vec<&ObjectInfo>, usize)> = BTreeMap::new();
    let mut delete = Vec::new();
    for o in objects {
        if o.key.starts_with(DATA_PREFIX) {
            if !in_manifest(&o.key) && old(o, cfg.grace_ms) {
                delete.push(o.key.clone());
            }
            continue;
        }
        let mut parts = o.key.splitn(3, '/');
        let (kind, task, rest) = (parts.next(), parts.next(), parts.next());
        match (kind, task, rest) {
            (Some(CACHES), _, _) if old(o, cfg.cache_max_age_ms) => delete.push(o.key.clone()),
            (Some(CACHES), _, _) => {}
            (Some(LOGS | ARCHIVES), Some(_), Some(rest)) => {
                let group = &o.key[..o.key.len() - rest.len()];
                let entry = groups.entry(group).or_default();
                match rest.strip_prefix("runs/") {
                    Some(run_id) if !run_id.contains('/') => entry.1 += 1,
                    _ => entry.0.push(o),
                }
            }
            _ => {}
        }
    }
    for (data, refs) in groups.values() {
        if *refs == 0 {
            delete.extend(data.iter().filter(|o| old(o, cfg.grace_ms)).map(|o| o.key.clone()));
        }
    }
    delete.sort();
    delete
}

/// Runs collection rounds on the leader until `shutdown` turns true.
pub async fn run(node: Arc<RaftNode>, ost: Ost, cfg: GcConfig, shutdown: watch::Receiver<bool>) {
    let mut ticks = crate::LeaderTicks::new(cfg.interval_ms.max(100), shutdown);
    while ticks.next(&node).await {
        match round(&node, &ost, &cfg).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "object storage garbage collected"),
            Err(e) => {
                tracing::warn!(error = %e, "object storage garbage collection failed; retrying next round")
            }
        }
    }
}

async fn round(node: &RaftNode, ost: &Ost, cfg: &GcConfig) -> Result<usize, flotilla_store::ost::OstError> {
    let mut objects = Vec::new();
    for prefix in [LOGS, ARCHIVES, CACHES] {
        objects.extend(ost.list_all(&format!("{prefix}/")).await?);
    }
    objects.extend(ost.list_all(DATA_PREFIX).await?);
    let delete = {
        let sm = node.state.read();
        let files = &sm.state.archive.files;
        plan(&objects, |k| files.iter().any(|f| f.key == k || f.index_key == k), crate::now_ms(), cfg)
    };
    for key in &delete {
        ost.delete(key).await?;
    }
    Ok(delete.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(key: &str, at: u64) -> ObjectInfo {
        ObjectInfo { key: key.into(), size: 1, last_modified_ms: at }
    }

    #[test]
    fn unreferenced_old_data_old_caches_and_orphan_archive_files_go_referenced_and_young_stay() {
        let cfg = GcConfig { interval_ms: 1, grace_ms: 100, cache_max_age_ms: 1000 };
        let objects = vec![
            // referenced: kept
            o("logs/1.a/0.log", 0),
            o("logs/1.a/runs/1", 0),
            // no reference at all, old: goes; young: stays
            o("logs/2.a/0.log", 0),
            o("logs/2.a/setup.log", 0),
            o("workspacearchives/3.a/0.tar", 0),
            o("workspacearchives/4.a/0.tar", 950),
            // shared by two runs, one deleted already: kept
            o("workspacearchives/5.a/1.tar", 0),
            o("workspacearchives/5.a/runs/5", 0),
            // caches by age
            o("caches/p/deps-1.tar", 0),
            o("caches/p/deps-2.tar", 500),
            // archive files: named by the manifest, orphaned, orphaned but young
            o("datamanager/data/a.dat", 0),
            o("datamanager/data/a.idx", 0),
            o("datamanager/data/b.dat", 0),
            o("datamanager/data/c.dat", 990),
            // unknown layout: never touched
            o("exports/x", 0),
        ];
        let named = |k: &str| k.starts_with("datamanager/data/a.");
        assert_eq!(
            plan(&objects, named, 1000, &cfg),
            [
                "caches/p/deps-1.tar",
                "datamanager/data/b.dat",
                "logs/2.a/0.log",
                "logs/2.a/setup.log",
                "workspacearchives/3.a/0.tar",
            ]
        );
        // Before the grace period nothing unreferenced goes.
        assert_eq!(plan(&objects, named, 50, &cfg), Vec::<String>::new());
    }
}
