//! The scheduler: a loop that runs on the Raft leader only and decides, as pure functions
//! of the replicated state ([`decide`]), what to propose next: advance runs, hand ready
//! tasks to executors, stop tasks of stopped runs, fail tasks whose executor is gone and
//! remove dynamic executors that stopped heartbeating.
//!
//! It reads through `flotilla_raft::SharedState` and changes state only by proposing
//! `flotilla_store::Command`s with [`flotilla_raft::RaftNode::write_if_leader`]; it never
//! touches sled or HTTP. Leadership makes the scheduler the one active orchestrator: the
//! loop is idle on followers, and a stale ex-leader cannot win a write: Raft refuses it,
//! every run update is a compare-and-swap on the run's revision, and every run update
//! carries the leader and term that decided it, applied only from a log entry of that
//! leader in that term (a fencing token; counted in [`SchedulerStats`] when refused).
//!
//! Scheduling is event-driven: every applied log entry wakes the loop (a watch channel,
//! so a burst of entries costs one round), and a slow periodic sweep is only a safety net
//! and the clock for time-based decisions (executor expiry).

pub mod archive;
pub mod decide;
pub mod gc;
pub mod group;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_raft::RaftNode;
use flotilla_store::executor::Decider;
use flotilla_store::{Command, CommandError, Response, RunPatch};
use tokio::sync::watch;

pub use decide::Settings;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub settings: Settings,
    /// Period of the safety-net sweep.
    pub sweep_interval_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { settings: Settings::default(), sweep_interval_ms: 1000 }
    }
}

/// What the scheduler counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Run updates refused because they reached the log through another leader or term
    /// than the one that decided them (the run is decided again).
    pub stale_decisions: AtomicU64,
    /// Run updates proposed as patches ([`Command::PatchRun`]) and whole
    /// ([`Command::UpdateRun`]: before every member reads patches, e.g. during a rolling
    /// upgrade, or for a change a patch does not carry).
    pub patched_updates: AtomicU64,
    pub whole_updates: AtomicU64,
}

/// The ticks of a periodic leader-only loop (the archiver, the ost GC). Missed ticks are
/// skipped, and so are the ticks on which this node is not the leader or the cluster is in
/// maintenance, so that each loop only says what one round does.
pub(crate) struct LeaderTicks {
    interval: tokio::time::Interval,
    shutdown: watch::Receiver<bool>,
}

impl LeaderTicks {
    pub(crate) fn new(period_ms: u64, shutdown: watch::Receiver<bool>) -> LeaderTicks {
        let mut interval = tokio::time::interval(Duration::from_millis(period_ms));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        LeaderTicks { interval, shutdown }
    }

    /// Waits for the next tick on which to work; false once `shutdown` turns true.
    pub(crate) async fn next(&mut self, node: &RaftNode) -> bool {
        loop {
            tokio::select! {
                _ = self.interval.tick() => {}
                _ = self.shutdown.changed() => {}
            }
            if *self.shutdown.borrow() {
                return false;
            }
            if node.is_leader() && !node.state.read().state.maintenance {
                return true;
            }
        }
    }
}

/// 64 random bits in hex: a name no other cluster sharing a Docker engine will have.
/// (std's `RandomState` is seeded from the OS's random source for every instance.)
pub fn new_cluster_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Runs the scheduler until `shutdown` turns true.
pub async fn run(
    node: Arc<RaftNode>,
    cfg: SchedulerConfig,
    stats: Arc<SchedulerStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut applied = node.state.subscribe();
    let mut sweep = tokio::time::interval(Duration::from_millis(cfg.sweep_interval_ms.max(10)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_leader = false;
    // Runs the last round left unchanged, with their fingerprints then: skipped until their
    // inputs change. The sweep decides on every run (the clock is not in the fingerprint).
    let mut settled: HashMap<String, u64> = HashMap::new();
    let mut full = true;
    let mut last_prune = tokio::time::Instant::now();
    let mut term = None;
    loop {
        let leader = node.is_leader();
        if leader != was_leader {
            tracing::info!(leader, "scheduler {}", if leader { "active" } else { "idle" });
            was_leader = leader;
        }
        // A new term may follow a snapshot installed meanwhile, which restarts the replica's
        // bookkeeping the fingerprints read: start over.
        let now_term = node.leadership().map(|d| d.term);
        if now_term != term {
            settled.clear();
            term = now_term;
        }
        if leader {
            if full {
                settled.clear();
            }
            round(&node, &cfg, &stats, &mut settled, full).await;
            prune_idempotency_keys(&node, &mut last_prune).await;
        } else {
            settled.clear();
        }
        full = tokio::select! {
            r = applied.changed() => if r.is_err() { return } else { false },
            _ = sweep.tick() => true,
            _ = shutdown.changed() => return,
        };
        if *shutdown.borrow() {
            return;
        }
    }
}

/// One round: decide on every active run whose inputs changed since it was last left
/// unchanged (`settled`), from one consistent view, then propose. Executors expire by the
/// clock, so only the periodic sweep (`full`) looks for expired ones.
async fn round(
    node: &RaftNode,
    cfg: &SchedulerConfig,
    stats: &SchedulerStats,
    settled: &mut HashMap<String, u64>,
    full: bool,
) {
    let now = now_ms();
    // Read before the view: a decision carries the term in which its inputs were read.
    let Some(decider) = node.leadership() else { return };
    // Updates travel as patches once every member reads them (a rolling upgrade is over).
    let patches = node.members_read(PATCH_RUN_FORMAT);
    let (updates, expired, unnamed) = {
        let sm = node.state.read();
        let state = &sm.state;
        if state.maintenance {
            // An import may bring back runs under old revisions.
            settled.clear();
            return;
        }
        let unnamed = state.cluster_id.is_none();
        let expired = if full { decide::expired_executors(state, now, &cfg.settings) } else { Vec::new() };
        let updates = decide_runs(state, now, &cfg.settings, decider, settled);
        let updates: Vec<Command> = updates.into_iter().map(|u| run_command(state, u, patches)).collect();
        let patched = updates.iter().filter(|c| matches!(c, Command::PatchRun(_))).count() as u64;
        stats.patched_updates.fetch_add(patched, Ordering::Relaxed);
        stats.whole_updates.fetch_add(updates.len() as u64 - patched, Ordering::Relaxed);
        (updates, expired, unnamed)
    };
    // A cluster is named by its first leader, right after `cluster init` (or `flotilla dev`).
    if unnamed && propose(node, Command::SetClusterId { id: new_cluster_id() }).await == Proposed::Failed {
        return;
    }
    // Removals of expired executors first, one by one (rare); a run update that hands a task
    // to one of them is refused at apply and decided again.
    for (id, last_seen) in expired {
        let cmd = Command::DeleteExecutor { id, if_last_seen: Some(last_seen) };
        if propose(node, cmd).await == Proposed::Failed {
            return;
        }
    }
    // The runs are independent (each update is a compare-and-swap on its own run): proposed
    // together, they leave the leader as one batched log entry instead of one round trip each.
    let outcomes = futures::future::join_all(updates.into_iter().map(|cmd| propose(node, cmd))).await;
    let stale = outcomes.iter().filter(|o| matches!(o, Proposed::Stale)).count() as u64;
    if stale > 0 {
        stats.stale_decisions.fetch_add(stale, Ordering::Relaxed);
        tracing::warn!(
            stale,
            term = decider.term,
            "run updates refused: decided in a term this node no longer leads"
        );
    }
}

/// The log format from which nodes read [`Command::PatchRun`].
const PATCH_RUN_FORMAT: u32 = 2;

/// The command that proposes `patch`: as is when `patches` (every member reads them),
/// else as the whole update it stands for.
fn run_command(state: &flotilla_store::State, patch: RunPatch, patches: bool) -> Command {
    if patches {
        return Command::PatchRun(Box::new(patch));
    }
    let cur = state.runs.get(&patch.run_id).expect("a run is decided from the view it is proposed from");
    Command::UpdateRun(Box::new(patch.into_update(cur)))
}

/// For the scheduler's tests: applies `patch` at `index` as the loop proposes it, checking
/// that the whole update it stands for (what goes to older members) would have made the
/// same state, answer and events.
#[cfg(test)]
pub(crate) fn apply_as_proposed(state: &mut flotilla_store::State, index: u64, patch: RunPatch) -> Response {
    let mut whole = state.clone();
    let (mut expected_events, mut events) = (Vec::new(), Vec::new());
    let update = run_command(state, patch.clone(), false);
    assert!(matches!(update, Command::UpdateRun(_)), "the whole update of a stored run");
    let expected = whole.apply_with_events(index, &update, &mut expected_events);
    let cmd = run_command(state, patch, true);
    assert!(matches!(cmd, Command::PatchRun(_)), "a scheduler decision is a patch");
    let r = state.apply_with_events(index, &cmd, &mut events);
    assert_eq!(r, expected);
    assert!(*state == whole, "the patch and the whole update differ");
    assert_eq!(events, expected_events);
    check_kept_counts(state);
    r
}

/// For the scheduler's tests: the active task counts each replica keeps as it applies are
/// those of its executor tasks.
#[cfg(test)]
pub(crate) fn check_kept_counts(state: &flotilla_store::State) {
    assert_eq!(
        *state.active_task_counts(),
        state.count_active_tasks(),
        "the kept active task counts drifted"
    );
}

/// The updates of the active runs whose inputs changed since the last round left them
/// unchanged (`settled`, updated here), each carrying `decider`.
fn decide_runs(
    state: &flotilla_store::State,
    now: u64,
    settings: &decide::Settings,
    decider: Decider,
    settled: &mut HashMap<String, u64>,
) -> Vec<RunPatch> {
    if state.active_runs.is_empty() {
        // Skip the per-executor maps: heartbeats and kv writes wake the loop too, and
        // there may be thousands of executors.
        settled.clear();
        return Vec::new();
    }
    let mut active = decide::active_counts(state);
    let executors = decide::executors_fingerprint(state, &active, now, settings);
    let mut still = HashMap::with_capacity(settled.len());
    let mut updates = Vec::new();
    for id in &state.active_runs {
        let fingerprint = decide::run_fingerprint(state, id, executors);
        if let Some(f) = fingerprint.filter(|f| settled.get(id) == Some(f)) {
            still.insert(id.clone(), f);
            continue;
        }
        match decide::decide_run(state, id, now, settings, &mut active) {
            Some(patch) => updates.push(RunPatch { decided_by: Some(decider), ..patch }),
            None => {
                if let Some(f) = fingerprint {
                    still.insert(id.clone(), f);
                }
            }
        }
    }
    *settled = still;
    updates
}

/// Every [`IDEMPOTENCY_PRUNE_INTERVAL_MS`], if any idempotency key is past its TTL by this
/// leader's clock, proposes forgetting them; the clock travels in the command, so every
/// replica (and every replay) forgets the same keys.
async fn prune_idempotency_keys(node: &RaftNode, last: &mut tokio::time::Instant) {
    use flotilla_store::limits::{IDEMPOTENCY_PRUNE_INTERVAL_MS, IDEMPOTENCY_TTL_MS};
    if last.elapsed() < Duration::from_millis(IDEMPOTENCY_PRUNE_INTERVAL_MS) {
        return;
    }
    *last = tokio::time::Instant::now();
    let now = now_ms();
    let expired = {
        let sm = node.state.read();
        sm.state.idempotency_keys.values().any(|e| e.created_ms.saturating_add(IDEMPOTENCY_TTL_MS) <= now)
    };
    if expired {
        propose(node, Command::PruneIdempotencyKeys { now_ms: now }).await;
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Proposed {
    /// Applied, or refused by the state (decided again next round).
    Applied,
    /// Refused as decided by another leader or term.
    Stale,
    /// Not written: this node can no longer write.
    Failed,
}

/// Proposes one scheduler decision.
async fn propose(node: &RaftNode, cmd: Command) -> Proposed {
    let kind = cmd.kind();
    match node.write_if_leader(cmd).await {
        Ok((_, Response::Rejected(CommandError::StaleDecision { .. }))) => Proposed::Stale,
        Ok((_, Response::Rejected(e))) => {
            tracing::debug!(kind, error = %e, "scheduler proposal refused; will decide again");
            Proposed::Applied
        }
        Ok(_) => Proposed::Applied,
        Err(e) => {
            tracing::debug!(kind, error = %e, "scheduler proposal failed");
            Proposed::Failed
        }
    }
}
