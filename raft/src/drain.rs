//! Leadership handover before a node stops (the SIGTERM drain of a rolling restart).
//!
//! openraft 0.9 has no leadership transfer; it has `trigger().elect()`, which makes any
//! node campaign at once. A follower refuses its vote while its leader's lease (openraft:
//! the maximum election timeout) runs since the leader last reached it, so a handover is:
//! the leader stops replicating (heartbeats off; its own requests wait, see
//! `RaftNode::run_on_leader`), picks a voter whose log matches its own, lets the lease
//! run out, and asks that voter to campaign over `/raft/elect`. Requests that reach this
//! node meanwhile retry and are forwarded to the new leader as soon as it is known.
//!
//! The write gap is therefore about the lease plus one election round (~0.45 s with the
//! default timings), against the lease plus a follower's own election timeout when a
//! leader just vanishes (0.6-0.8 s) — and no vote is split, since only one node campaigns.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::network::paths;
use crate::{NodeId, RaftNode};

/// How long a handover may take before the node gives up and stops as it is.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(3);

/// Margin past the followers' lease before the chosen voter campaigns (clock granularity
/// and the time the last append took to arrive).
const LEASE_MARGIN: Duration = Duration::from_millis(40);

impl RaftNode {
    /// If this node leads, hands leadership to an up-to-date voter and returns its id.
    /// On failure (no voter caught up, the campaign lost) the node keeps leading.
    pub async fn hand_over_leadership(&self) -> Result<NodeId, String> {
        if !self.is_leader() {
            return Err(format!("node {} is not the leader", self.id));
        }
        if !self.has_other_voter() {
            return Err("no other voter to hand over to".into());
        }
        self.handing_over.store(true, Ordering::SeqCst);
        self.raft.runtime_config().heartbeat(false);
        let result = self.try_hand_over().await;
        if result.is_err() {
            self.raft.runtime_config().heartbeat(true);
        }
        // Requests waiting on the gate now find either the new leader or this one again.
        self.handing_over.store(false, Ordering::SeqCst);
        result
    }

    async fn try_hand_over(&self) -> Result<NodeId, String> {
        let deadline = Instant::now() + HANDOVER_TIMEOUT;
        // A voter that has every entry of this leader's log (writes already proposed
        // finish replicating first; new ones wait at the gate).
        let (target, addr) = loop {
            if let Some(found) = self.caught_up_voter() {
                break found;
            }
            if Instant::now() > deadline {
                return Err("no voter caught up with the leader's log in time".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        tokio::time::sleep(self.leader_lease + LEASE_MARGIN).await;
        let timeout = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(200));
        let answer: Result<Result<(), crate::NodeError>, _> =
            self.peers.call(&addr, paths::ELECT, &(), timeout).await;
        match answer {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("node {target} could not campaign: {}", e.message)),
            Err(e) => return Err(format!("node {target} could not be asked to campaign: {e}")),
        }
        let mut metrics = self.raft.metrics();
        let elected = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            metrics.wait_for(|m| m.current_leader.is_some() && m.current_leader != Some(self.id)),
        )
        .await;
        match elected {
            Ok(Ok(m)) => Ok(m.current_leader.unwrap_or(target)),
            _ => Err(format!("node {target} was not elected in time")),
        }
    }

    fn has_other_voter(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let others = m.membership_config.membership().voter_ids().any(|id| id != self.id);
        others
    }

    /// A voter other than this node whose matched index is this leader's last log index.
    fn caught_up_voter(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let last = m.last_log_index?;
        let membership = m.membership_config.membership();
        let replication = m.replication.as_ref()?;
        membership
            .voter_ids()
            .filter(|id| *id != self.id)
            .find(|id| replication.get(id).cloned().flatten().map(|l| l.index) == Some(last))
            .and_then(|id| membership.get_node(&id).map(|n| (id, n.addr.clone())))
    }

    /// Entry point of `/raft/elect`: campaign now (the leader asking is handing over).
    pub async fn campaign(&self) -> Result<(), crate::NodeError> {
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| crate::NodeError::unavailable(format!("this node cannot campaign: {e}")))
    }
}
