//! Heartbeats that only refresh an executor's `last_seen` go out together. A heartbeat
//! with the offer already recorded, recorded less than a third of the executor timeout ago,
//! is answered without a write (`runs::executor_heartbeat`); one recorded longer ago must
//! be written, but nothing waits on it but the executor itself. So such refreshes wait
//! here up to [`LINGER`] for others and are proposed as one [`Command::Batch`]: one log
//! entry, one replication round and one fsync per node for all of them, where each was
//! its own before. With thousands of executors that was most of the leader's CPU (one
//! entry per executor every 20–25 s: 66 entries/s in the benchmark's window at 2,000
//! executors, each an append, AppendEntries to every follower and an fsync everywhere).
//! A change of the offer is never held back: it is written at once, as before.
//!
//! A refresh is answered only once its batch is committed and applied (or refused), so an
//! executor's 204 still means "recorded". Just before proposing, a refresh whose executor
//! this node has meanwhile seen recorded with another offer or a later heartbeat is left
//! out (and answered as done), and so is one whose request is gone (the executor gave up
//! on it): an older heartbeat should not set a newer record back. The check reads this
//! node's state, which may be behind the leader's: a record made through another node
//! in the last moments can still be set back, until the executor's next heartbeat (the
//! same holds for any two writes of one executor through two nodes).

use std::sync::{Arc, Weak};
use std::time::Duration;

use flotilla_raft::{NodeError, RaftNode};
use flotilla_store::limits::{MAX_BATCH_BYTES, MAX_BATCH_COMMANDS};
use flotilla_store::{Command, Response};
use tokio::sync::{mpsc, oneshot};

/// How long the first refresh of a batch waits for others. Refreshes are one heartbeat in
/// several of each executor (the rest are answered at once), so this delays an executor's
/// heartbeat answer now and then, never a task or a change of its offer.
pub(crate) const LINGER: Duration = Duration::from_millis(250);

/// The entry's index and the refresh's response, as `RaftNode::write` answers.
type Outcome = Result<(u64, Response), NodeError>;

struct Pending {
    cmd: Command,
    /// The command's encoded size (a batch stays within `MAX_BATCH_BYTES`).
    size: usize,
    reply: oneshot::Sender<Outcome>,
}

/// The node's queue of refreshes; its loop ends when this is dropped.
pub(crate) struct Refreshes {
    tx: mpsc::UnboundedSender<Pending>,
}

impl Refreshes {
    /// Starts the collecting loop (it holds the node weakly: it never keeps it alive).
    pub(crate) fn start(node: &Arc<RaftNode>) -> Refreshes {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(collect(Arc::downgrade(node), rx));
        Refreshes { tx }
    }

    /// Writes `cmd` (a `PutExecutor` with the recorded offer) with the others of its batch.
    pub(crate) async fn write(&self, cmd: Command) -> Outcome {
        // Measured as the log writes it (named fields), without building it.
        let mut count = flotilla_store::count::ByteCount::default();
        let size = rmp_serde::encode::write_named(&mut count, &cmd).map_or(MAX_BATCH_BYTES, |()| count.0);
        let (reply, rx) = oneshot::channel();
        self.tx.send(Pending { cmd, size, reply }).map_err(|_| closing())?;
        rx.await.map_err(|_| closing())?
    }
}

fn closing() -> NodeError {
    NodeError::unavailable("the server is shutting down")
}

/// Collects a batch for [`LINGER`] from its first refresh (or until it is full) and hands
/// it to its own task, so that the next batch collects while this one is written.
async fn collect(node: Weak<RaftNode>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut bytes = first.size;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            let Ok(Some(next)) = tokio::time::timeout_at(deadline, rx.recv()).await else { break };
            if bytes + next.size > MAX_BATCH_BYTES {
                carry = Some(next);
                break;
            }
            bytes += next.size;
            batch.push(next);
        }
        let Some(node) = node.upgrade() else { return };
        tokio::spawn(async move { propose(&node, batch).await });
    }
}

/// Proposes the refreshes still worth writing, as one entry, and answers each.
async fn propose(node: &RaftNode, batch: Vec<Pending>) {
    let mut cmds = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for p in batch {
        if p.reply.is_closed() {
            continue; // nobody waits for it: the executor has moved on
        }
        if superseded(node, &p.cmd) {
            let _ = p.reply.send(Ok((0, Response::Done { revision: 0 })));
        } else {
            cmds.push(p.cmd);
            replies.push(p.reply);
        }
    }
    let outcomes: Vec<Outcome> = match cmds.len() {
        0 => return,
        1 => vec![node.write(cmds.pop().expect("one refresh")).await],
        n => match node.write(Command::Batch(cmds)).await {
            // A batch refused whole cannot happen for a batch built here.
            Ok((i, r)) => r.into_batch_answers(n).into_iter().map(|r| Ok((i, r))).collect(),
            Err(e) => vec![Err(e); n],
        },
    };
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
}

/// Whether this node's state already records the executor with another offer or a
/// heartbeat at least as recent: then the refresh would only set an older one back.
fn superseded(node: &RaftNode, cmd: &Command) -> bool {
    let Command::PutExecutor { id, info, now_ms } = cmd else { return false };
    let sm = node.state.read();
    sm.state.executors.get(id).is_some_and(|e| e.info != *info || e.last_seen >= *now_ms)
}
