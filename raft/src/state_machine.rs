//! The state machine: the replicated [`State`] in memory, its snapshots on sled.
//!
//! `apply` is pure computation on memory (no I/O): the Raft log is the durable record of
//! every change, and the state is rebuilt at start-up from the last snapshot plus the
//! committed entries after it (openraft re-applies them, since the log store keeps the
//! committed index). Snapshots are persisted (tree `snapshot`, flushed) before openraft may
//! purge the log entries they cover, so the pair "snapshot + log" always holds every
//! committed write.
//!
//! Readers share the state through [`SharedState`]; `applied` publishes the last applied
//! index so that a linearizable read can wait until this replica has caught up, and
//! [`SharedState::watch_executor`] wakes one executor's task long poll only when its task
//! list changes (not on every applied entry: with thousands of idle executors, waking them
//! all on each heartbeat was most of a node's CPU).

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use flotilla_store::executor::Decider;
use flotilla_store::{Event, Response, State};
use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::codec::{decode, encode};
use crate::{Entry, Node, NodeId, TypeConfig};

const KEY_CURRENT: &[u8] = b"current";

/// The state machine's data: what a snapshot holds.
#[derive(Debug, Default)]
pub struct StateMachineData {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, Node>,
    pub state: State,
}

/// A snapshot as kept on disk: its metadata and the encoded [`State`].
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// Read access to the replicated state for the API and the scheduler.
#[derive(Clone)]
pub struct SharedState {
    inner: Arc<RwLock<StateMachineData>>,
    applied: watch::Receiver<u64>,
    events: broadcast::Sender<Arc<Event>>,
    executors: Arc<ExecutorWakers>,
}

/// One wake-up channel per executor that someone waits on, by id. A channel's value is
/// the log index of the last change that woke it; an entry goes when its last waiter does.
#[derive(Default)]
struct ExecutorWakers(Mutex<HashMap<String, watch::Sender<u64>>>);

impl ExecutorWakers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn watch(wakers: &Arc<ExecutorWakers>, id: &str) -> ExecutorWatch {
        let rx = wakers.lock().entry(id.to_string()).or_insert_with(|| watch::channel(0).0).subscribe();
        ExecutorWatch { rx, id: id.to_string(), wakers: wakers.clone() }
    }

    /// Wakes the waiters of `ids`, or every waiter when `ids` is `None` (a new snapshot).
    fn wake(&self, ids: Option<&std::collections::BTreeSet<String>>, index: u64) {
        let wakers = self.lock();
        match ids {
            Some(ids) => {
                for id in ids {
                    if let Some(tx) = wakers.get(id) {
                        tx.send_replace(index);
                    }
                }
            }
            None => wakers.values().for_each(|tx| {
                tx.send_replace(index);
            }),
        }
    }
}

/// A waiter on one executor's task list ([`SharedState::watch_executor`]).
pub struct ExecutorWatch {
    rx: watch::Receiver<u64>,
    id: String,
    wakers: Arc<ExecutorWakers>,
}

impl ExecutorWatch {
    /// Resolves when the executor's task list may have changed since the watch was made
    /// (or since the last call).
    pub async fn changed(&mut self) {
        // The sender stays in the map while this receiver lives: it cannot be gone.
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await
        }
    }
}

impl Drop for ExecutorWatch {
    fn drop(&mut self) {
        // Under the lock no waiter can join: a count of one is this watch alone.
        let mut wakers = self.wakers.lock();
        if wakers.get(&self.id).is_some_and(|tx| tx.receiver_count() == 1) {
            wakers.remove(&self.id);
        }
    }
}

impl SharedState {
    /// A read guard on the state; hold it briefly (never across an `.await`).
    pub fn read(&self) -> RwLockReadGuard<'_, StateMachineData> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Last applied log index on this replica.
    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// A receiver that changes whenever this replica applies entries.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Wakes when executor `id`'s task list may have changed: a task handed to, stopped on
    /// or taken from it, its removal, or a snapshot installed. Make the watch before reading
    /// the state, so that no change falls between the read and the wait.
    pub fn watch_executor(&self, id: &str) -> ExecutorWatch {
        ExecutorWakers::watch(&self.executors, id)
    }

    /// Events of the entries this replica applies from now on, in log order. A receiver
    /// that falls more than `EVENT_BUFFER` events behind gets `Lagged` and must resync.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }
}

#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<RwLock<StateMachineData>>,
    db: sled::Db,
    snapshots: sled::Tree,
    /// sled's directory, fsynced whole after each snapshot (see [`crate::durable`]).
    dir: Arc<std::path::PathBuf>,
    applied_tx: Arc<watch::Sender<u64>>,
    events_tx: broadcast::Sender<Arc<Event>>,
    executors: Arc<ExecutorWakers>,
    snapshot_seq: Arc<AtomicU64>,
    /// Held while a snapshot is stored, so that a snapshot built in the background from an
    /// older state never replaces a newer one installed meanwhile (openraft builds off its
    /// state machine task, and purges the log up to what it installed: an older snapshot
    /// stored last would leave the log purged past it, and the node broken at its next
    /// start).
    storing: Arc<tokio::sync::Mutex<()>>,
    /// The last log id of the snapshot on disk; the log store purges no entry before a
    /// snapshot holding it is on disk ([`crate::log_store::LogStore::purge_after_snapshot`]).
    on_disk: Arc<watch::Sender<Option<LogId<NodeId>>>>,
}

fn sm_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::new(ErrorSubject::StateMachine, verb, openraft::AnyError::new(&e)).into()
}

fn snap_err(
    meta: Option<&SnapshotMeta<NodeId, Node>>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<NodeId> {
    let subject = match meta {
        Some(m) => ErrorSubject::Snapshot(Some(m.signature())),
        None => ErrorSubject::Snapshot(None),
    };
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

impl StateMachineStore {
    /// Opens the snapshot tree and loads the last snapshot, if any, into memory.
    pub fn open(db: &sled::Db) -> Result<Self, StorageError<NodeId>> {
        let snapshots = db.open_tree("snapshot").map_err(|e| snap_err(None, ErrorVerb::Read, e))?;
        let mut data = StateMachineData::default();
        if let Some(bytes) = snapshots.get(KEY_CURRENT).map_err(|e| snap_err(None, ErrorVerb::Read, e))? {
            let stored: StoredSnapshot = decode(&bytes).map_err(|e| snap_err(None, ErrorVerb::Read, e))?;
            data.state =
                decode(&stored.data).map_err(|e| snap_err(Some(&stored.meta), ErrorVerb::Read, e))?;
            data.last_applied = stored.meta.last_log_id;
            data.last_membership = stored.meta.last_membership.clone();
        }
        let on_disk = Arc::new(watch::channel(data.last_applied).0);
        let applied = data.last_applied.map_or(0, |l| l.index);
        let (applied_tx, _) = watch::channel(applied);
        Ok(StateMachineStore {
            inner: Arc::new(RwLock::new(data)),
            db: db.clone(),
            snapshots,
            dir: Arc::new(db.context.get_path()),
            applied_tx: Arc::new(applied_tx),
            events_tx: broadcast::channel(flotilla_store::limits::EVENT_BUFFER).0,
            executors: Arc::default(),
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            storing: Arc::default(),
            on_disk,
        })
    }

    pub fn shared(&self) -> SharedState {
        SharedState {
            inner: self.inner.clone(),
            applied: self.applied_tx.subscribe(),
            events: self.events_tx.clone(),
            executors: self.executors.clone(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, StateMachineData> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    async fn persist_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, Node>,
        data: &[u8],
    ) -> Result<bool, StorageError<NodeId>> {
        let _storing = self.storing.lock().await;
        let on_disk = *self.on_disk.borrow();
        if meta.last_log_id < on_disk {
            tracing::info!(
                last_log_id = ?meta.last_log_id,
                stored = ?on_disk,
                "a snapshot older than the stored one is not stored (a newer one was installed while it was built)"
            );
            return Ok(false);
        }
        let stored = StoredSnapshot { meta: meta.clone(), data: data.to_vec() };
        let bytes = encode(&stored).map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        self.snapshots.insert(KEY_CURRENT, bytes).map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        self.db.flush_async().await.map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        sync_store(&self.dir).await.map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        self.on_disk.send_replace(meta.last_log_id);
        Ok(true)
    }

    /// The last log id of the snapshot on disk, as it changes.
    pub fn snapshot_on_disk(&self) -> watch::Receiver<Option<LogId<NodeId>>> {
        self.on_disk.subscribe()
    }

    /// Size in bytes of the snapshot kept on disk (0 when there is none).
    pub fn snapshot_size_bytes(&self) -> u64 {
        self.snapshots.get(KEY_CURRENT).ok().flatten().map_or(0, |b| b.len() as u64)
    }
}

/// [`crate::durable::sync_store`] off the async runtime.
async fn sync_store(dir: &Arc<std::path::PathBuf>) -> std::io::Result<()> {
    let dir = dir.clone();
    tokio::task::spawn_blocking(move || crate::durable::sync_store(&dir).map(|_| ()))
        .await
        .map_err(std::io::Error::other)?
}

/// A snapshot being built: the state as encoded when openraft asked for a builder, and the
/// store to persist it in.
pub struct SnapshotBuilder {
    store: StateMachineStore,
    /// Taken by the first `build_snapshot`; a second one (openraft makes none) takes anew.
    taken: Option<Result<Taken, StorageError<NodeId>>>,
}

/// The state encoded at one applied log id.
struct Taken {
    data: Vec<u8>,
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, Node>,
    encode_ms: u128,
}

impl StateMachineStore {
    /// Encodes the state for a snapshot. Called from openraft's state machine task, which
    /// waits here: no entry is applied meanwhile, so the read lock taken on a blocking
    /// thread never has a writer queued behind it. (Encoding from the spawned builder task
    /// instead, as before, held the read lock while `apply` waited for the write lock on a
    /// runtime worker, and std's lock then held every later reader — each API request —
    /// behind that writer: with a large state both runtime workers could block for the
    /// whole encoding, long enough for the followers to start an election.)
    async fn take(&self) -> Result<Taken, StorageError<NodeId>> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let sm = inner.read().unwrap_or_else(|p| p.into_inner());
            let data = encode(&sm.state).map_err(|e| sm_err(ErrorVerb::Read, e))?;
            let encode_ms = started.elapsed().as_millis();
            Ok(Taken {
                data,
                last_applied: sm.last_applied,
                last_membership: sm.last_membership.clone(),
                encode_ms,
            })
        })
        .await
        .map_err(|e| sm_err(ErrorVerb::Read, e))?
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let taken = match self.taken.take() {
            Some(taken) => taken?,
            None => self.store.take().await?,
        };
        let seq = self.store.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match taken.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, seq),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: taken.last_applied,
            last_membership: taken.last_membership,
            snapshot_id,
        };
        let data = taken.data;
        if self.store.persist_snapshot(&meta, &data).await? {
            tracing::info!(
                last_log_id = ?meta.last_log_id,
                size_bytes = data.len(),
                encode_ms = taken.encode_ms as u64,
                "snapshot built"
            );
        }
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        let sm = self.inner.read().unwrap_or_else(|p| p.into_inner());
        Ok((sm.last_applied, sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let mut events = Vec::new();
        let (last, touched) = {
            let mut sm = self.write();
            for entry in entries {
                // openraft hands entries over in log order, once each: an entry at or before
                // the last applied one would apply a command twice (a corrupted store).
                assert!(
                    sm.last_applied.is_none_or(|last| entry.log_id.index > last.index),
                    "entry {} applied after {:?}",
                    entry.log_id,
                    sm.last_applied
                );
                sm.last_applied = Some(entry.log_id);
                let response = match entry.payload {
                    EntryPayload::Blank => Response::None,
                    EntryPayload::Normal(cmd) => {
                        let leader = &entry.log_id.leader_id;
                        let leader = Decider { term: leader.term, node: leader.node_id };
                        sm.state.apply_entry(entry.log_id.index, Some(leader), &cmd, &mut events)
                    }
                    EntryPayload::Membership(m) => {
                        sm.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        Response::None
                    }
                };
                responses.push(response);
            }
            (sm.last_applied.map_or(0, |l| l.index), sm.state.take_touched_executors())
        };
        self.applied_tx.send_replace(last);
        if !touched.is_empty() {
            self.executors.wake(Some(&touched), last);
        }
        for e in events {
            // No receiver is not an error: nobody is listening.
            let _ = self.events_tx.send(Arc::new(e));
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { store: self.clone(), taken: Some(self.take().await) }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let state: State = decode(&data).map_err(|e| snap_err(Some(meta), ErrorVerb::Read, e))?;
        // Persist first: if we crash after this, start-up loads the new snapshot. (A newer
        // one already on disk stays: openraft installs nothing older than what it applied.)
        self.persist_snapshot(meta, &data).await?;
        {
            let mut sm = self.write();
            sm.state = state;
            sm.last_applied = meta.last_log_id;
            sm.last_membership = meta.last_membership.clone();
        }
        let index = meta.last_log_id.map_or(0, |l| l.index);
        self.applied_tx.send_replace(index);
        self.executors.wake(None, index);
        tracing::info!(last_log_id = ?meta.last_log_id, size_bytes = data.len(), "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let Some(bytes) = self.snapshots.get(KEY_CURRENT).map_err(|e| snap_err(None, ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot = decode(&bytes).map_err(|e| snap_err(None, ErrorVerb::Read, e))?;
        Ok(Some(Snapshot { meta: stored.meta, snapshot: Box::new(Cursor::new(stored.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(w: &mut ExecutorWatch) -> bool {
        use std::future::Future;
        let fut = std::pin::pin!(w.changed());
        fut.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())).is_ready()
    }

    /// A snapshot built from an older state finishes after a newer one was installed: the
    /// newer one stays on disk (the log is purged up to it), also after a restart.
    #[tokio::test]
    async fn an_older_snapshot_never_replaces_a_newer_one_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let meta = |index| SnapshotMeta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("s{index}"),
        };
        let data = encode(&State::default()).unwrap();
        let last_on_disk = |db: &sled::Db| {
            let bytes = db.open_tree("snapshot").unwrap().get(KEY_CURRENT).unwrap().unwrap();
            decode::<StoredSnapshot>(&bytes).unwrap().meta.last_log_id.map(|l| l.index)
        };
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let store = StateMachineStore::open(&db).unwrap();
            assert!(store.persist_snapshot(&meta(1049), &data).await.unwrap());
            assert!(!store.persist_snapshot(&meta(906), &data).await.unwrap(), "older: not stored");
            assert_eq!(last_on_disk(&db), Some(1049));
            assert!(store.persist_snapshot(&meta(1200), &data).await.unwrap());
        }
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = StateMachineStore::open(&db).unwrap();
        assert_eq!(last_on_disk(&db), Some(1200));
        assert!(!store.persist_snapshot(&meta(1100), &data).await.unwrap(), "known after a restart too");
    }

    /// A builder holds the state as it was when openraft asked for it (the state machine
    /// task waits meanwhile): entries applied before it builds are not in its snapshot, and
    /// its metadata names the last entry that is.
    #[tokio::test]
    async fn a_snapshot_holds_the_state_at_the_builders_request() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let mut store = StateMachineStore::open(&db).unwrap();
        let put = |index: u64| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Arc::new(flotilla_store::command::Command::KvPut {
                key: format!("k{index}"),
                value: "v".into(),
                prev_revision: None,
            })),
        };
        store.apply((1..=100).map(put)).await.unwrap();
        let mut builder = store.get_snapshot_builder().await;
        store.apply((101..=110).map(put)).await.unwrap();
        let snapshot = builder.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(100));
        let state: State = decode(snapshot.snapshot.get_ref()).unwrap();
        assert_eq!(state.kv.len(), 100, "no entry applied after the request is in it");
        assert!(state.kv.contains_key("k100") && !state.kv.contains_key("k101"));
        assert_eq!(store.shared().read().state.kv.len(), 110, "the live state went on");
    }

    #[test]
    fn an_executor_watch_wakes_for_its_own_executor_only_and_leaves_no_entry_behind() {
        let wakers = Arc::new(ExecutorWakers::default());
        let watch = |id| ExecutorWakers::watch(&wakers, id);
        let (mut a, mut b, mut b2) = (watch("a"), watch("b"), watch("b"));
        assert!(!ready(&mut a) && !ready(&mut b));
        wakers.wake(Some(&["b".to_string(), "gone".to_string()].into()), 7);
        assert!(!ready(&mut a), "a change of b's tasks does not wake a");
        assert!(ready(&mut b) && ready(&mut b2), "every waiter of b wakes");
        assert!(!ready(&mut b), "once per change");
        wakers.wake(None, 8);
        assert!(ready(&mut a) && ready(&mut b), "a new snapshot wakes everyone");
        drop(b);
        assert_eq!(wakers.lock().len(), 2, "b still has a waiter");
        drop((a, b2));
        assert!(wakers.lock().is_empty(), "no waiter, no entry");
    }
}
