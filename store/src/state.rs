//! The replicated state machine's data (its deterministic `apply` is `apply.rs`).
//!
//! Maps are `BTreeMap`s so that iteration, serialization and therefore snapshots are
//! identical on every replica.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::executor::{Executor, ExecutorTask};
use crate::run::{Run, RunConfig};

/// One coordination key's value. Revisions are Raft log indexes, so they are unique,
/// increase with every write and are the same on every node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub value: String,
    /// Log index of the last write to this key.
    pub revision: u64,
    /// Log index of the write that created this key.
    pub create_revision: u64,
}

/// Everything the cluster agrees on (besides Raft membership, which openraft tracks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub kv: BTreeMap<String, KvEntry>,
    pub maintenance: bool,
    #[serde(default)]
    pub runs: BTreeMap<String, Run>,
    /// Each run's submission, kept beside it (never changed after creation).
    #[serde(default)]
    pub run_configs: BTreeMap<String, RunConfig>,
    /// Ids of runs that are queued or running: what the scheduler looks at.
    #[serde(default)]
    pub active_runs: BTreeSet<String>,
    /// Last run counter per root group.
    #[serde(default)]
    pub run_counters: BTreeMap<String, u64>,
    /// Sequence of the last run id handed out (ids only grow, even after an import).
    #[serde(default)]
    pub last_run_seq: u64,
    #[serde(default)]
    pub executors: BTreeMap<String, Executor>,
    #[serde(default)]
    pub executor_tasks: BTreeMap<String, ExecutorTask>,
    /// The run archive in the object storage (only its manifest lives here).
    #[serde(default)]
    pub archive: crate::archive::Manifest,
    /// The cluster's name, set once ([`Command::SetClusterId`]); labels executors' containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// `Idempotency-Key`s of run creates in the last 24 h (pruned by a replicated command).
    /// Up to [`MAX_IDEMPOTENCY_KEYS`] of them, so they are kept small: each key's text is
    /// held once (shared with `idempotency_order`) and the body's digest as bytes — the
    /// same serialized form as strings, ~10 MiB less per 100,000 keys (docs/benchmarks.md).
    #[serde(default)]
    pub idempotency_keys: BTreeMap<SharedKey, IdempotencyEntry>,
    /// The same keys in the order they were first used (oldest first), to forget the
    /// oldest beyond [`MAX_IDEMPOTENCY_KEYS`].
    #[serde(default)]
    pub idempotency_order: std::collections::VecDeque<SharedKey>,
    /// Executors whose task list changed (a task handed to, stopped on or taken from them)
    /// or that were removed, since [`State::take_touched_executors`]: the state machine
    /// takes them after each apply to wake just those executors' long polls. A set, so it
    /// stays bounded by the executors when nobody takes it (tests, simulations).
    #[serde(skip)]
    pub(crate) touched_executors: Bookkeeping<BTreeSet<String>>,
    /// For each active run, the log index of the last change to one of its executor tasks
    /// that this replica applied (see [`State::run_tasks_revision`]).
    #[serde(skip)]
    pub(crate) run_tasks_touched: Bookkeeping<HashMap<String, u64>>,
    /// Executor tasks that have not ended, per executor (an executor with none is absent):
    /// what the scheduler balances and executor limits cap. `None` until this replica
    /// first changes an executor task (after a start, a snapshot or an import), when they
    /// are counted once.
    #[serde(skip)]
    pub(crate) active_counts: Bookkeeping<Option<BTreeMap<String, u32>>>,
}

/// Bookkeeping of one replica, not agreed state: never serialized (empty in a state
/// restored from a snapshot), and equal to any other, so that two states are equal by
/// what they agree on.
#[derive(Clone, Debug, Default)]
pub(crate) struct Bookkeeping<T>(pub(crate) T);

impl<T> PartialEq for Bookkeeping<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Bookkeeping<T> {}

impl State {
    /// The executors touched since the last call (see [`State::touched_executors`]).
    pub fn take_touched_executors(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.touched_executors.0)
    }

    /// A number that moves whenever an executor task of the active run `run_id` is
    /// created, changes or is removed: the index of the last such change this replica
    /// applied, 0 before any (since it started, restored a snapshot or imported). Lets the
    /// scheduler see that a run's inputs changed without walking its executor tasks.
    pub fn run_tasks_revision(&self, run_id: &str) -> u64 {
        self.run_tasks_touched.0.get(run_id).copied().unwrap_or(0)
    }

    /// Executor tasks that have not ended, per executor (an executor with none is absent).
    pub fn active_task_counts(&self) -> Cow<'_, BTreeMap<String, u32>> {
        match &self.active_counts.0 {
            Some(counts) => Cow::Borrowed(counts),
            None => Cow::Owned(self.count_active_tasks()),
        }
    }

    /// [`State::active_task_counts`] counted from the executor tasks, one by one.
    pub fn count_active_tasks(&self) -> BTreeMap<String, u32> {
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for et in self.executor_tasks.values().filter(|et| !et.status.phase.is_final()) {
            match counts.get_mut(&et.spec.executor_id) {
                Some(n) => *n += 1,
                None => {
                    counts.insert(et.spec.executor_id.clone(), 1);
                }
            }
        }
        counts
    }

    /// Counts the active tasks if they are not kept yet: before the executor tasks change.
    pub(crate) fn keep_active_counts(&mut self) {
        if self.active_counts.0.is_none() {
            self.active_counts.0 = Some(self.count_active_tasks());
        }
    }

    /// Records that an executor task of `executor_id` began (`true`) or ended or went away
    /// while active (`false`); kept counts only ([`State::keep_active_counts`] first).
    pub(crate) fn count_active_task(&mut self, executor_id: &str, began: bool) {
        let Some(counts) = &mut self.active_counts.0 else { return };
        match (counts.get_mut(executor_id), began) {
            (Some(n), true) => *n += 1,
            (None, true) => {
                counts.insert(executor_id.to_string(), 1);
            }
            (Some(n), false) if *n > 1 => *n -= 1,
            (Some(_), false) => {
                counts.remove(executor_id);
            }
            (None, false) => debug_assert!(false, "an active task of {executor_id} was not counted"),
        }
    }

    /// Records a change at `index` to an executor task of `run_id` (kept for active runs
    /// only: the map is bounded by them).
    pub(crate) fn touch_run_tasks(&mut self, run_id: &str, index: u64) {
        if let Some(at) = self.run_tasks_touched.0.get_mut(run_id) {
            *at = index;
        } else if self.active_runs.contains(run_id) {
            self.run_tasks_touched.0.insert(run_id.to_string(), index);
        }
    }
}

/// What an idempotent create remembers about its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyEntry {
    pub run_id: String,
    /// SHA-256 of the request body as canonical JSON.
    pub body_sha256: Sha256,
    /// The proposer's clock when the key was first used.
    pub created_ms: u64,
}

/// A string held once however many places refer to it (an idempotency key in the map and
/// in the order); serialized as the string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SharedKey(Arc<str>);

impl From<&str> for SharedKey {
    fn from(s: &str) -> SharedKey {
        SharedKey(s.into())
    }
}

impl std::borrow::Borrow<str> for SharedKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for SharedKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SharedKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(SharedKey::from(&*std::borrow::Cow::<'de, str>::deserialize(d)?))
    }
}

/// A SHA-256 digest: 32 bytes in memory, 64 lowercase hex digits when serialized.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// From 64 hex digits (either case); `None` for anything else.
    pub fn from_hex(digits: &str) -> Option<Sha256> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(digits, &mut out).ok()?;
        Some(Sha256(out))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let hex = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Sha256::from_hex(&hex).ok_or_else(|| serde::de::Error::custom("a SHA-256 must be 64 hex digits"))
    }
}
