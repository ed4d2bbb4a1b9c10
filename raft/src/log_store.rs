//! The Raft log and vote on sled.
//!
//! Layout (one sled `Db` per node, shared with the snapshot store so that one `flush`
//! makes everything before it durable):
//! - tree `log`: key = log index as 8 big-endian bytes (so sled's order is log order),
//!   value = the msgpack-encoded entry;
//! - tree `meta`: `vote`, `committed`, `last_purged`, `node_id`.
//!
//! Durability: `append` inserts the entries (readable at once) and hands its callback to a
//! single flusher task. The flusher takes every callback waiting, runs *one* fsync for all
//! of them and then completes them in order: group commit, with at most one fsync in flight
//! and callbacks that are never completed before the entries they cover are on disk. A vote
//! is flushed before `save_vote` returns. Purging records the new `last_purged` durably
//! before deleting entries, so a crash can never leave a hole between the two.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode, encode};
use tokio::sync::mpsc;

use crate::{Entry, NodeId, TypeConfig};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: mpsc::UnboundedSender<LogFlushed<TypeConfig>>,
}

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl LogStore {
    /// Opens the log trees of `db` and starts the flusher task (needs a tokio runtime).
    pub fn open(db: &sled::Db) -> sled::Result<Self> {
        let log = db.open_tree("log")?;
        let meta = db.open_tree("meta")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let flusher_db = db.clone();
        std::thread::Builder::new().name("raft-fsync".into()).spawn(move || flush_loop(flusher_db, rx))?;
        Ok(LogStore { db: db.clone(), log, meta, flusher: tx })
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError<NodeId>> {
        let subject = || ErrorSubject::Store;
        match self.meta.get(key).map_err(|e| io_err(subject(), ErrorVerb::Read, e))? {
            None => Ok(None),
            Some(bytes) => decode(&bytes).map(Some).map_err(|e| io_err(subject(), ErrorVerb::Read, e)),
        }
    }

    fn write_meta<T: Serialize>(&self, key: &[u8], v: &T) -> Result<(), StorageError<NodeId>> {
        let bytes = encode(v).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        self.meta.insert(key, bytes).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn flush(&self, subject: ErrorSubject<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.db.flush_async().await.map_err(|e| io_err(subject, ErrorVerb::Write, e))?;
        Ok(())
    }

    /// Number of entries currently kept in the log (for metrics and tests).
    pub fn entry_count(&self) -> usize {
        self.log.len()
    }
}

/// Group commit: one fsync covers every append whose callback was waiting when it started.
/// A thread of its own calls sled's blocking `flush` (its `flush_async` hands every call to
/// sled's thread pool, a thread hop and often a thread start per fsync).
fn flush_loop(db: sled::Db, mut rx: mpsc::UnboundedReceiver<LogFlushed<TypeConfig>>) {
    let mut waiting = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        waiting.push(first);
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, "fsync of the raft log failed");
        }
        for callback in waiting.drain(..) {
            callback.log_io_completed(result.clone().map_err(io::Error::other));
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        for item in self.log.range((start, end)) {
            let (_, bytes) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let entry: Entry = decode(&bytes).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.read_meta(KEY_LAST_PURGED)?;
        let last = self.log.last().map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let last_log_id = match last {
            Some((_, bytes)) => {
                let entry: Entry =
                    decode(&bytes).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.write_meta(KEY_VOTE, vote)?;
        self.flush(ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.read_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        // Not flushed on its own: it rides along with the next fsync. Losing it in a crash
        // only means re-applying a little less of the log at start-up.
        self.write_meta(KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.read_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = encode(&entry).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.log.apply_batch(batch).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        if let Err(mpsc::error::SendError(callback)) = self.flusher.send(callback) {
            // The flusher only stops when the runtime does; be durable regardless.
            let result = self.db.flush().map(|_| ()).map_err(io::Error::other);
            callback.log_io_completed(result);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // Removing from the end keeps the log free of holes at every instant.
        let keys: Vec<_> = self
            .log
            .range(index_key(log_id.index)..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        for key in keys.into_iter().rev() {
            self.log.remove(key).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.write_meta(KEY_LAST_PURGED, &log_id)?;
        self.flush(ErrorSubject::Logs).await?;
        let keys: Vec<_> = self
            .log
            .range(..=index_key(log_id.index))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key);
        }
        self.log.apply_batch(batch).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        Ok(())
    }
}
