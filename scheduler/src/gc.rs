//! Garbage collection of the object storage, on the leader only (seed 002).
//!
//! Logs and workspace archives of an executor task carry one `runs/<run id>` reference
//! object per run using them. A reference whose run is no longer known is dropped; data
//! with no reference left is deleted. Caches are deleted once older than a maximum age
//! (a later run saves them again). Everything unreferenced must also be older than a
//! grace period, so an upload in progress (reference first, data second) or a run being
//! created is never collected under its feet.
//!
//! Deciding is a pure function of the listing, the known runs and the clock ([`plan`]);
//! the loop only lists and deletes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_raft::RaftNode;
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
        GcConfig { interval_ms: 10 * 60 * 1000, grace_ms: 60 * 60 * 1000, cache_max_age_ms: 7 * 24 * 60 * 60 * 1000 }
    }
}

/// The keys to delete, given every object under `logs/`, `workspacearchives/` and
/// `caches/`, whether a run id is known, and the time.
pub fn plan(objects: &[ObjectInfo], run_known: impl Fn(&str) -> bool, now_ms: u64, cfg: &GcConfig) -> Vec<String> {
    let old = |o: &ObjectInfo, age: u64| o.last_modified_ms.saturating_add(age) <= now_ms;
    let mut groups: BTreeMap<&str, (Vec<&ObjectInfo>, Vec<(&ObjectInfo, &str)>)> = BTreeMap::new();
    let mut delete = Vec::new();
    for o in objects {
        let mut parts = o.key.splitn(3, '/');
        let (kind, task, rest) = (parts.next(), parts.next(), parts.next());
        match (kind, task, rest) {
            (Some(CACHES), _, _) => {
                if old(o, cfg.cache_max_age_ms) {
                    delete.push(o.key.clone());
                }
            }
            (Some(LOGS | ARCHIVES), Some(_), Some(rest)) => {
                let group = &o.key[..o.key.len() - rest.len()];
                let entry = groups.entry(group).or_default();
                match rest.strip_prefix("runs/") {
                    Some(run_id) if !run_id.contains('/') => entry.1.push((o, run_id)),
                    _ => entry.0.push(o),
                }
            }
            _ => {}
        }
    }
    for (data, refs) in groups.values() {
        let mut live = 0;
        for (r, run_id) in refs {
            if run_known(run_id) {
                live += 1;
            } else if old(r, cfg.grace_ms) {
                delete.push(r.key.clone());
            } else {
                live += 1; // young: maybe a run being created
            }
        }
        if live == 0 {
            delete.extend(data.iter().filter(|o| old(o, cfg.grace_ms)).map(|o| o.key.clone()));
        }
    }
    delete.sort();
    delete
}

/// Runs collection rounds on the leader until `shutdown` turns true.
pub async fn run(node: Arc<RaftNode>, ost: Ost, cfg: GcConfig, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms.max(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        if !node.is_leader() || node.state.read().state.maintenance {
            continue;
        }
        match round(&node, &ost, &cfg).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "object storage garbage collected"),
            Err(e) => tracing::warn!(error = %e, "object storage garbage collection failed; retrying next round"),
        }
    }
}

async fn round(node: &RaftNode, ost: &Ost, cfg: &GcConfig) -> Result<usize, flotilla_store::ost::OstError> {
    let mut objects = Vec::new();
    for prefix in [LOGS, ARCHIVES, CACHES] {
        objects.extend(ost.list_all(&format!("{prefix}/")).await?);
    }
    let delete = {
        let sm = node.state.read();
        plan(&objects, |id| sm.state.runs.contains_key(id), crate::now_ms(), cfg)
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
    fn unreferenced_old_data_and_old_caches_go_referenced_and_young_stay() {
        let cfg = GcConfig { interval_ms: 1, grace_ms: 100, cache_max_age_ms: 1000 };
        let objects = vec![
            // referenced by a known run: kept
            o("logs/1.a/0.log", 0),
            o("logs/1.a/runs/1", 0),
            // reference of a forgotten run: reference and data go
            o("logs/2.a/0.log", 0),
            o("logs/2.a/setup.log", 0),
            o("logs/2.a/runs/2", 0),
            // no reference at all, old: goes; young: stays
            o("workspacearchives/3.a/0.tar", 0),
            o("workspacearchives/4.a/0.tar", 950),
            // shared by a forgotten run and a known one: only the stale reference goes
            o("workspacearchives/5.a/1.tar", 0),
            o("workspacearchives/5.a/runs/2", 0),
            o("workspacearchives/5.a/runs/5", 0),
            // caches by age
            o("caches/p/deps-1.tar", 0),
            o("caches/p/deps-2.tar", 500),
            // unknown layout: never touched
            o("exports/x", 0),
        ];
        let known = |id: &str| id == "1" || id == "5";
        assert_eq!(
            plan(&objects, known, 1000, &cfg),
            [
                "caches/p/deps-1.tar",
                "logs/2.a/0.log",
                "logs/2.a/runs/2",
                "logs/2.a/setup.log",
                "workspacearchives/3.a/0.tar",
                "workspacearchives/5.a/runs/2",
            ]
        );
        // Before the grace period nothing unreferenced goes.
        assert_eq!(plan(&objects, known, 50, &cfg), Vec::<String>::new());
    }
}
