//! Group commit of client writes on the leader: writes that arrive while earlier proposals
//! are in flight wait, and go out together as one [`Command::Batch`] log entry, so that one
//! append, one replication round and one fsync per node carry many writes.
//!
//! At most [`IN_FLIGHT`] proposals are outstanding. A write that finds a free slot is
//! proposed at once (no added latency when idle); under load the queue grows while the slot
//! is busy and the next proposal takes all of it (up to the batch limits).
//! Each waiter gets the log index of the entry and its own response.
//!
//! Reads get the same treatment: a linearizable read needs the leader to confirm it still
//! leads (a heartbeat round) after the read arrived; one confirmation started after every
//! waiting read arrived serves all of them.

use std::sync::Arc;

use flotilla_store::{Command, Response};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::{Node, NodeId, Raft};
use flotilla_store::limits::MAX_BATCH_BYTES;

/// Proposals in flight at once: one measured best (the largest batches; a lone write still
/// goes out at once).
const IN_FLIGHT: usize = 1;

pub type WriteResult = Result<(u64, Response), RaftError<NodeId, ClientWriteError<NodeId, Node>>>;
pub type ReadResult = Result<u64, RaftError<NodeId, CheckIsLeaderError<NodeId, Node>>>;

struct Pending {
    cmd: Command,
    size: usize,
    reply: oneshot::Sender<WriteResult>,
}

#[derive(Clone)]
pub struct Batcher {
    writes: mpsc::UnboundedSender<Pending>,
    reads: mpsc::UnboundedSender<oneshot::Sender<ReadResult>>,
}

impl Batcher {
    /// Starts the write and read loops (they stop when every `Batcher` is dropped).
    pub fn start(raft: Raft) -> Batcher {
        let (writes, wrx) = mpsc::unbounded_channel();
        let (reads, rrx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(raft.clone(), wrx));
        tokio::spawn(read_loop(raft, rrx));
        Batcher { writes, reads }
    }

    /// Proposes `cmd` (alone or with others) and returns its entry's index and its response.
    pub async fn write(&self, cmd: Command) -> Option<WriteResult> {
        let size = if cmd.batchable() {
            crate::codec::encoded_len(&cmd).unwrap_or(MAX_BATCH_BYTES)
        } else {
            MAX_BATCH_BYTES
        };
        let (reply, rx) = oneshot::channel();
        self.writes.send(Pending { cmd, size, reply }).ok()?;
        rx.await.ok()
    }

    /// The log index a linearizable read must wait for, confirmed after the call.
    pub async fn read_index(&self) -> Option<ReadResult> {
        let (reply, rx) = oneshot::channel();
        self.reads.send(reply).ok()?;
        rx.await.ok()
    }
}

async fn write_loop(raft: Raft, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carry: Option<Pending> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut batch = vec![first];
        let mut bytes = batch[0].size;
        if batch[0].cmd.batchable() {
            while batch.len() < flotilla_store::limits::MAX_BATCH_COMMANDS {
                let Ok(next) = rx.try_recv() else { break };
                if !next.cmd.batchable() || bytes + next.size > MAX_BATCH_BYTES {
                    carry = Some(next);
                    break;
                }
                bytes += next.size;
                batch.push(next);
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            propose(&raft, batch).await;
            drop(slot);
        });
    }
}

async fn propose(raft: &Raft, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        let p = batch.pop().expect("one pending write");
        let result = raft.client_write(Arc::new(p.cmd)).await.map(|r| (r.log_id.index, r.data));
        let _ = p.reply.send(result);
        return;
    }
    let (cmds, replies): (Vec<Command>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let n = cmds.len();
    match raft.client_write(Arc::new(Command::Batch(cmds))).await {
        Ok(r) => {
            let index = r.log_id.index;
            // A batch refused whole cannot happen for a batch the loop built.
            for (reply, response) in replies.into_iter().zip(r.data.into_batch_answers(n)) {
                let _ = reply.send(Ok((index, response)));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

async fn read_loop(raft: Raft, mut rx: mpsc::UnboundedReceiver<oneshot::Sender<ReadResult>>) {
    while let Some(first) = rx.recv().await {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        // Every waiting read arrived before this call: its answer is fresh enough for all.
        let result = raft.get_read_log_id().await.map(|(read, _applied)| read.map_or(0, |l| l.index));
        for reply in waiting {
            let _ = reply.send(result.clone());
        }
    }
}
