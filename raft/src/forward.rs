//! Requests a follower sends to the leader: writes from its clients (executors reporting,
//! runs created through it), linearizable read indexes, membership changes.
//!
//! A request with no effect (a read index, a status) may be sent again after any failure;
//! a write only when it provably never reached the leader's log (connection refused, or
//! the leader said it is not the leader). While a write is in flight, the election of
//! another leader means the old one is cut off or stopped: the write's fate is unknown and
//! the caller hears so at once, instead of waiting out the timeout.
//!
//! Writes go out together, as the leader's own [`crate::batch`] proposes them: while
//! [`IN_FLIGHT`] forwarded requests wait for the leader, the writes that arrive meanwhile
//! queue and leave as one [`LeaderRequest::Writes`] (one HTTP request on both sides
//! instead of one each). The leader runs each on its own and answers each, so a write's
//! outcome, and whether it may be retried, is what it would be alone; a transport failure
//! is every write's. A leader is sent batches only once it has answered naming
//! [`FORWARD_BATCH_FORMAT`] (an older leader cannot decode them: a rolling upgrade).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_store::Command;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::{ErrorKind, NodeError};
use crate::network::{paths, PeerClient, TransportError};
use crate::node::{Attempt, LeaderRequest, LeaderResponse, NOT_LEADER};
use crate::{NodeId, Raft};

/// The [`crate::network::LOG_FORMAT`] from which a node answers [`LeaderRequest::Writes`].
pub const FORWARD_BATCH_FORMAT: u32 = 3;

/// Forwarded requests waiting for the leader at once before writes queue.
const IN_FLIGHT: usize = 2;

/// Most writes in one forwarded request: each is at most an API body (1 MiB), so a batch
/// stays well under the leader's limit for a Raft body (64 MiB).
const MAX_WRITES: usize = 32;

struct Queued {
    leader: NodeId,
    addr: String,
    cmd: Command,
    deadline: Instant,
    reply: oneshot::Sender<Result<LeaderResponse, Attempt>>,
}

pub(crate) struct Forwarder {
    peers: PeerClient,
    raft: Raft,
    writes: mpsc::UnboundedSender<Queued>,
    pub(crate) counts: Arc<Counts>,
}

/// Writes forwarded to the leader in a request with others, and alone (for `/metrics`).
#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) together: AtomicU64,
    pub(crate) alone: AtomicU64,
}

impl Forwarder {
    /// Starts the loop that sends queued writes (it stops when the `Forwarder` is dropped).
    pub(crate) fn start(peers: PeerClient, raft: Raft) -> Forwarder {
        let (writes, rx) = mpsc::unbounded_channel();
        let counts = Arc::new(Counts::default());
        tokio::spawn(write_loop(peers.clone(), raft.clone(), rx, counts.clone()));
        Forwarder { peers, raft, writes, counts }
    }

    /// Sends `req` to `leader` at `addr`.
    pub(crate) async fn send(
        &self,
        leader: NodeId,
        addr: &str,
        req: &LeaderRequest,
        deadline: Instant,
    ) -> Result<LeaderResponse, Attempt> {
        if let LeaderRequest::Write(cmd) = req {
            if cmd.batchable() && self.peers.read_by(FORWARD_BATCH_FORMAT, std::iter::once(addr)) {
                let (reply, rx) = oneshot::channel();
                let queued = Queued { leader, addr: addr.to_string(), cmd: cmd.clone(), deadline, reply };
                if self.writes.send(queued).is_err() {
                    return Err(Attempt::Fail(NodeError::unavailable("This node is shutting down.")));
                }
                return match tokio::time::timeout_at(deadline.into(), rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(Attempt::Fail(NodeError::unavailable("This node is shutting down."))),
                    // Sent with others or not (a write whose caller is gone is not sent).
                    Err(_) => Err(Attempt::Fail(NodeError::unavailable(format!(
                        "The leader, node {leader}, did not answer within the request timeout; the request may or may not have been applied."
                    )))),
                };
            }
        }
        if matches!(req, LeaderRequest::Write(_)) {
            self.counts.alone.fetch_add(1, Ordering::Relaxed);
        }
        let harmless = matches!(req, LeaderRequest::ReadIndex | LeaderRequest::Status);
        send(&self.peers, &self.raft, leader, addr, req, deadline, harmless)
            .await
            .and_then(|r| answer(r, harmless))
    }
}

async fn write_loop(
    peers: PeerClient,
    raft: Raft,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    counts: Arc<Counts>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carry: Option<Queued> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let first = match carry.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_WRITES {
            let Ok(next) = rx.try_recv() else { break };
            if next.leader != batch[0].leader || next.addr != batch[0].addr {
                carry = Some(next);
                break;
            }
            batch.push(next);
        }
        let (peers, raft, counts) = (peers.clone(), raft.clone(), counts.clone());
        tokio::spawn(async move {
            send_writes(&peers, &raft, batch, &counts).await;
            drop(slot);
        });
    }
}

/// Sends `batch` (writes to one leader) as one request, alone as a plain write. A write
/// whose caller stopped waiting is not sent; one past its deadline is answered, unsent,
/// with a retry (which finds the deadline passed: nothing was applied).
async fn send_writes(peers: &PeerClient, raft: &Raft, batch: Vec<Queued>, counts: &Counts) {
    let now = Instant::now();
    let (mut batch, expired): (Vec<Queued>, Vec<Queued>) =
        batch.into_iter().filter(|q| !q.reply.is_closed()).partition(|q| q.deadline > now);
    for q in expired {
        let _ = q.reply.send(Err(Attempt::Retry("the request timeout passed before it was sent".into())));
    }
    if batch.is_empty() {
        return;
    }
    let form = if batch.len() == 1 { &counts.alone } else { &counts.together };
    form.fetch_add(batch.len() as u64, Ordering::Relaxed);
    let (leader, addr) = (batch[0].leader, batch[0].addr.clone());
    let deadline = batch.iter().map(|q| q.deadline).min().expect("a batch is never empty");
    if batch.len() == 1 {
        let q = batch.pop().expect("one write");
        let req = LeaderRequest::Write(q.cmd);
        let _ = q.reply.send(
            send(peers, raft, leader, &addr, &req, deadline, false).await.and_then(|r| answer(r, false)),
        );
        return;
    }
    let (cmds, replies): (Vec<Command>, Vec<_>) = batch.into_iter().map(|q| (q.cmd, q.reply)).unzip();
    let n = cmds.len();
    match send(peers, raft, leader, &addr, &LeaderRequest::Writes(cmds), deadline, false).await {
        Ok(Ok(LeaderResponse::Writes(answers))) if answers.len() == n => {
            for (reply, a) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer(a, false));
            }
        }
        Ok(other) => {
            let e = NodeError::internal("forwarded writes", format!("unexpected leader response {other:?}"));
            for reply in replies {
                let _ = reply.send(Err(Attempt::Fail(e.clone())));
            }
        }
        Err(attempt) => {
            for reply in replies {
                let _ = reply.send(Err(attempt.clone()));
            }
        }
    }
}

/// What the leader answered for one request, as an attempt: refused because it is not
/// the leader (nothing happened) is retried, so is an unavailable leader for a request
/// with no effect; any other error is the request's.
fn answer(r: Result<LeaderResponse, NodeError>, harmless: bool) -> Result<LeaderResponse, Attempt> {
    match r {
        Ok(resp) => Ok(resp),
        Err(e) if e.kind == ErrorKind::Unavailable && e.message.starts_with(NOT_LEADER) => {
            Err(Attempt::Retry(e.message))
        }
        Err(e) if harmless && e.kind == ErrorKind::Unavailable => Err(Attempt::Retry(e.message)),
        Err(e) => Err(Attempt::Fail(e)),
    }
}

/// One request to the leader: its answer, or why there is none.
async fn send(
    peers: &PeerClient,
    raft: &Raft,
    leader: NodeId,
    addr: &str,
    req: &LeaderRequest,
    deadline: Instant,
    harmless: bool,
) -> Result<Result<LeaderResponse, NodeError>, Attempt> {
    if let Some(now) = raft.metrics().borrow().current_leader.filter(|l| *l != leader) {
        // Learned before sending (a write queued for the old leader): nothing was sent.
        return Err(Attempt::Retry(format!("the leader changed from node {leader} to node {now}")));
    }
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
    let call = peers.call::<_, Result<LeaderResponse, NodeError>>(addr, paths::LEADER, req, left);
    let mut metrics = raft.metrics();
    let replaced = metrics.wait_for(|m| m.current_leader.is_some() && m.current_leader != Some(leader));
    let result = tokio::select! {
        r = call => r,
        Ok(m) = replaced => {
            let now = m.current_leader.map_or("another node".to_string(), |l| format!("node {l}"));
            tracing::info!(old = leader, new = %now, harmless, "leader replaced while a forwarded request was in flight");
            if harmless {
                return Err(Attempt::Retry(format!("the leader changed from node {leader} to {now}")));
            }
            return Err(Attempt::Fail(NodeError::unavailable(format!(
                "The leader, node {leader}, stopped answering and {now} was elected meanwhile; the request may or may not have been applied."
            ))));
        }
    };
    match result {
        Ok(answer) => Ok(answer),
        Err(e @ TransportError::Connect { .. }) => {
            tracing::debug!(error = %e, "leader {leader} refused the connection");
            Err(Attempt::Retry(format!("the leader, node {leader}, could not be reached")))
        }
        Err(e) if harmless => {
            tracing::debug!(error = %e, "read forwarded to leader {leader} failed");
            Err(Attempt::Retry(format!("the leader, node {leader}, did not answer")))
        }
        Err(e) => {
            tracing::warn!(error = %e, "request forwarded to leader {leader} failed");
            Err(Attempt::Fail(NodeError::unavailable(format!(
                "Lost contact with the leader, node {leader}, during the request (or it did not answer within {} ms); it may or may not have been applied.",
                left.as_millis()
            ))))
        }
    }
}
