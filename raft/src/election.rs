//! A faster failover: the node that must win an election campaigns as soon as it knows.
//!
//! When a leader dies, the follower whose election timer fires first campaigns. Under
//! write load its log is often one entry behind the other follower's (the last entry the
//! leader sent reached one of them), so the other refuses its vote — and then waits out
//! its own timer, while the candidate, told that a greater log exists, backs off by
//! openraft's `smaller_log_timeout` (twice the maximum election timeout). Measured: 3 of
//! 20 leader kills took 1.6-2.0 s to the first write, against 0.7-0.9 s for the rest.
//!
//! The refusing node knows at that moment what the timers would find out later: a
//! candidate is campaigning, so the leader is gone for it too, and only a node with a log
//! at least as complete as its own can win — itself, for instance. So it campaigns at once
//! (openraft's `trigger().elect()`), when all of these hold: it refused because its log
//! is more complete than the candidate's, it does not lead, and no leader has reached it
//! for the leader lease (the maximum election timeout; a live leader's followers refuse on
//! the lease anyway), in a term above the candidate's (below). At most once per minimum
//! election timeout. The same breaks a split vote: two candidates with equal logs each
//! refuse the other; the one with the higher id campaigns again at once instead of both
//! waiting a timeout. An election is always safe
//! in Raft; this changes only who campaigns first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use openraft::raft::{VoteRequest, VoteResponse};

use crate::{NodeId, RaftNode};

/// Milliseconds on a monotonic clock shared by the node's atomics.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// When a leader last reached this node, and when it last campaigned this way.
#[derive(Default)]
pub struct Contact {
    leader_ms: AtomicU64,
    campaign_ms: AtomicU64,
}

impl Contact {
    /// An AppendEntries (a heartbeat or entries) arrived from a leader.
    pub fn heard_from_leader(&self) {
        self.leader_ms.store(now_ms(), Ordering::Relaxed);
    }
}

impl RaftNode {
    /// Called with each vote this node answered: campaigns at once if it refused a
    /// candidate whose log is behind its own while no leader reaches it (module doc).
    pub fn after_vote(&self, req: &VoteRequest<NodeId>, resp: &VoteResponse<NodeId>) {
        let more_complete = resp.last_log_id > req.last_log_id;
        // A split vote: this node campaigns too, for itself, with the same log. Of the two,
        // the one with the higher id goes again at once; the other grants it.
        let split_and_mine = resp.last_log_id == req.last_log_id
            && resp.vote.leader_id().voted_for() == Some(self.id)
            && req.vote.leader_id().voted_for().is_some_and(|c| c < self.id);
        if resp.vote_granted || !(more_complete || split_and_mine) || self.is_leader() {
            return;
        }
        let now = now_ms();
        let lease = self.leader_lease.as_millis() as u64;
        if now.saturating_sub(self.contact.leader_ms.load(Ordering::Relaxed)) <= lease {
            return;
        }
        let last = self.contact.campaign_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.election_timeout_min_ms {
            return;
        }
        self.contact.campaign_ms.store(now, Ordering::Relaxed);
        tracing::info!(
            candidate = req.vote.leader_id().voted_for(),
            split_vote = split_and_mine,
            "refused a candidate (its log is behind this node's, or a split vote) with no leader in sight: campaigning at once"
        );
        let raft = self.raft.clone();
        // openraft campaigns in its own term + 1. A refusal for a shorter log leaves this
        // node's term below the candidate's, and the candidate has voted for itself in its
        // term: a campaign in that same term is refused, and the election waits for a timer
        // (measured: one election timeout, ~320 ms, lost in the slow failovers). So first
        // take the candidate's term by voting for itself in it (a vote request from this
        // node to itself: the usual checks, one vote per term), then campaign above it.
        let (term, me) = (req.vote.leader_id().term, self.id);
        let catch_up = (term > resp.vote.leader_id().term)
            .then(|| VoteRequest::new(openraft::Vote::new(term, me), resp.last_log_id));
        tokio::spawn(async move {
            if let Some(own) = catch_up {
                if let Err(e) = raft.vote(own).await {
                    tracing::debug!(error = %e, "could not take the candidate's term");
                }
            }
            if let Err(e) = raft.trigger().elect().await {
                tracing::debug!(error = %e, "could not campaign");
            }
        });
    }
}
