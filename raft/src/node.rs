//! [`RaftNode`]: one server's Raft instance plus what the API needs from it.
//!
//! Any node accepts any request. A request that must run on the leader
//! ([`LeaderRequest`]) runs locally when this node leads and is otherwise forwarded once to
//! the leader over `/raft/leader`; the leader never forwards further. A request is retried
//! only while it is certain it was not proposed (no leader known, the peer was not the
//! leader, the connection was refused); once a request may have reached the log, its
//! outcome is reported, never silently repeated, so a compare-and-swap cannot win twice.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_store::defaults;
use flotilla_store::executor::Decider;
use flotilla_store::{Command, Response};
use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, InitializeError, RaftError,
};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use crate::batch::Batcher;
use crate::error::{NodeError, StartError};
use crate::log_store::LogStore;
use crate::network::{NetworkFactory, PeerClient};
use crate::state_machine::{SharedState, StateMachineStore};
use crate::{Node, NodeId, Raft};

/// The JSON shapes of `GET /api/v1/cluster` (`NodeId` is `u64`): defined beside the
/// client that reads them.
pub use flotilla_client::types::{ClusterStatus, NodeStatus};

/// Settings of one node. Timing defaults suit nodes on one LAN with an fsync well under
/// the heartbeat interval (each AppendEntries call must finish within it). A follower that
/// has seen a leader waits for the leader's lease (openraft: the maximum election timeout)
/// plus its own election timeout before it campaigns: 625 to 750 ms with the defaults, so
/// that a dead leader is replaced in under a second (see the failover benchmark).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    pub data_dir: PathBuf,
    pub cluster_token: Option<String>,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_logs: u64,
    /// Entries kept in the log behind the last snapshot (for slow followers).
    pub max_logs_keep: u64,
    /// How long a write or linearizable read may take in all (finding a leader,
    /// forwarding, committing, catching up) before it answers 503 `unavailable`.
    pub request_timeout_ms: u64,
    pub cache_capacity_bytes: u64,
}

impl NodeConfig {
    pub fn new(id: NodeId, data_dir: PathBuf) -> Self {
        NodeConfig {
            id,
            data_dir,
            cluster_token: None,
            heartbeat_ms: defaults::HEARTBEAT_MS,
            election_timeout_min_ms: defaults::ELECTION_TIMEOUT_MS,
            election_timeout_max_ms: defaults::election_timeout_max_ms(defaults::ELECTION_TIMEOUT_MS),
            snapshot_logs: defaults::SNAPSHOT_LOGS,
            max_logs_keep: defaults::MAX_LOGS_KEEP,
            request_timeout_ms: defaults::REQUEST_TIMEOUT_MS,
            cache_capacity_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What only the leader can do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum LeaderRequest {
    Write(Command),
    /// Writes a follower forwards together ([`crate::forward`]; only to a leader that reads
    /// [`crate::forward::FORWARD_BATCH_FORMAT`]), answered with [`LeaderResponse::Writes`].
    Writes(Vec<Command>),
    /// The leader confirms its leadership with a quorum and returns the index a follower
    /// must have applied before it may serve a linearizable read (ReadIndex).
    ReadIndex,
    AddLearner {
        id: NodeId,
        addr: String,
    },
    SetVoters {
        ids: BTreeSet<NodeId>,
    },
    RemoveNode {
        id: NodeId,
    },
    Status,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum LeaderResponse {
    Written {
        index: u64,
        response: Response,
    },
    ReadIndex(u64),
    Membership {
        index: u64,
    },
    Status(ClusterStatus),
    /// The answers to [`LeaderRequest::Writes`], in order.
    Writes(Vec<Result<LeaderResponse, NodeError>>),
}

/// A failed attempt: retry (it certainly did not take effect) or give up with this error.
#[derive(Clone, Debug)]
pub(crate) enum Attempt {
    Retry(String),
    Fail(NodeError),
}

pub struct RaftNode {
    pub id: NodeId,
    pub raft: Raft,
    pub state: SharedState,
    pub(crate) peers: PeerClient,
    db: sled::Db,
    pub(crate) log: LogStore,
    sm: StateMachineStore,
    batcher: Batcher,
    forwarder: crate::forward::Forwarder,
    request_timeout: Duration,
    /// Set while this leader hands leadership over (`drain.rs`): its requests wait.
    pub(crate) handing_over: std::sync::atomic::AtomicBool,
    /// openraft's leader lease: the maximum election timeout.
    pub(crate) leader_lease: Duration,
    pub(crate) election_timeout_min_ms: u64,
    /// When a leader last reached this node (`election.rs`).
    pub(crate) contact: crate::election::Contact,
    /// A leader that has not heard from a quorum for longer than this refuses
    /// linearizable reads and writes and reports `quorum: false`: the election timeout as
    /// the followers see it (openraft's leader lease, the maximum election timeout, plus
    /// the minimum one: 625 ms by default), the earliest another leader may be elected.
    /// Not shorter, so that a loaded machine's slow heartbeat replies do not refuse
    /// requests a healthy cluster can serve.
    quorum_window: Duration,
}

impl RaftNode {
    /// Opens (or creates) the node's store under `data_dir/raft` and starts Raft.
    pub async fn start(cfg: NodeConfig) -> Result<Arc<RaftNode>, StartError> {
        let path = cfg.data_dir.join("raft");
        let (db, fresh) = open_store(&cfg, &path)?;
        let open_err = |e: Box<dyn std::error::Error + Send + Sync>| StartError::Open {
            path: path.display().to_string(),
            id: cfg.id,
            source: e,
        };

        let log_dir = cfg.data_dir.join("raft-log");
        let mut log = LogStore::open(&log_dir, Some(&db), fresh).map_err(|e| StartError::Open {
            path: log_dir.display().to_string(),
            id: cfg.id,
            source: Box::new(e),
        })?;
        if fresh {
            // Last: a crash before it leaves a data dir that is still new.
            write_marker(&cfg.data_dir.join("node-id"), cfg.id).map_err(|e| open_err(Box::new(e)))?;
        }
        let sm = StateMachineStore::open(&db).map_err(|e| open_err(Box::new(e)))?;
        log.purge_after_snapshot(sm.snapshot_on_disk());
        let state = sm.shared();

        let raft_config = openraft::Config {
            cluster_name: "flotilla".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_min_ms,
            election_timeout_max: cfg.election_timeout_max_ms,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_logs),
            max_in_snapshot_log_to_keep: cfg.max_logs_keep,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;

        let peers = PeerClient::new(cfg.cluster_token.clone());
        let network = NetworkFactory { client: peers.clone(), entries: log.entry_bytes() };
        let raft = Raft::new(cfg.id, Arc::new(raft_config), network, log.clone(), sm.clone())
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;

        Ok(Arc::new(RaftNode {
            id: cfg.id,
            batcher: Batcher::start(raft.clone()),
            forwarder: crate::forward::Forwarder::start(peers.clone(), raft.clone()),
            raft,
            state,
            peers,
            db,
            log,
            sm,
            request_timeout: Duration::from_millis(cfg.request_timeout_ms),
            handing_over: std::sync::atomic::AtomicBool::new(false),
            leader_lease: Duration::from_millis(cfg.election_timeout_max_ms),
            election_timeout_min_ms: cfg.election_timeout_min_ms,
            contact: Default::default(),
            quorum_window: Duration::from_millis(cfg.election_timeout_min_ms + cfg.election_timeout_max_ms),
        }))
    }

    /// Stops Raft and flushes the store. Stop serving RPCs before calling this.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        if let Err(e) = self.db.flush_async().await {
            tracing::error!(error = %e, "final flush of the store failed");
        }
    }

    pub fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        self.current_leader() == Some(self.id)
    }

    /// This node and its term while it leads, read together: what a scheduler decision
    /// carries so that it lands only from this leader's log entries in this term.
    pub fn leadership(&self) -> Option<Decider> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        (m.current_leader == Some(self.id)).then_some(Decider { term: m.current_term, node: self.id })
    }

    /// Whether every other member of the cluster (voters and learners) has answered this
    /// node's last RPC to it saying that it reads log `format` ([`crate::network::LOG_FORMAT`]):
    /// a leader proposes a newer form of an entry only then. False until each has answered
    /// once (a new leader starts with the older forms).
    pub fn members_read(&self, format: u32) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let others =
            m.membership_config.nodes().filter(|(id, _)| **id != self.id).map(|(_, n)| n.addr.as_str());
        self.peers.read_by(format, others)
    }

    /// The URL of the current leader, when one is known.
    pub fn leader_url(&self) -> Option<String> {
        self.leader_addr(self.current_leader()?)
    }

    fn leader_addr(&self, leader: NodeId) -> Option<String> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
    }

    /// Writes this node forwarded to the leader in a request with others, and alone (for
    /// metrics).
    pub fn forwarded_writes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.forwarder.counts.together.load(Relaxed), self.forwarder.counts.alone.load(Relaxed))
    }

    /// Entries kept in the log, and the size of the snapshot on disk (for metrics).
    pub fn storage_sizes(&self) -> (usize, u64) {
        (self.log.entry_count(), self.sm.snapshot_size_bytes())
    }

    /// Proposes `cmd` through the leader and returns its log index and response.
    pub async fn write(&self, cmd: Command) -> Result<(u64, Response), NodeError> {
        cmd.validate().map_err(|e| NodeError::bad_request(e.to_string()))?;
        match self.leader_request(LeaderRequest::Write(cmd)).await? {
            LeaderResponse::Written { index, response } => Ok((index, response)),
            other => Err(NodeError::internal("write", format!("unexpected leader response {other:?}"))),
        }
    }

    /// Proposes `cmd` only if this node leads (never forwarded): for the leader-only
    /// scheduler, whose decisions are worthless once another node leads.
    pub async fn write_if_leader(&self, cmd: Command) -> Result<(u64, Response), NodeError> {
        cmd.validate().map_err(|e| NodeError::bad_request(e.to_string()))?;
        if !self.is_leader() {
            return Err(NodeError::unavailable(format!("{NOT_LEADER}: node {} is not the leader", self.id)));
        }
        match self.run_on_leader(LeaderRequest::Write(cmd), Instant::now() + self.request_timeout).await {
            Ok(LeaderResponse::Written { index, response }) => Ok((index, response)),
            Ok(other) => Err(NodeError::internal("write", format!("unexpected leader response {other:?}"))),
            Err(Attempt::Retry(why)) => Err(NodeError::unavailable(why)),
            Err(Attempt::Fail(e)) => Err(e),
        }
    }

    /// Returns once this replica has applied every write acknowledged before the call.
    pub async fn linearizable_barrier(&self) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.request_timeout;
        let index = match self.leader_request_until(LeaderRequest::ReadIndex, deadline).await? {
            LeaderResponse::ReadIndex(i) => i,
            other => {
                return Err(NodeError::internal(
                    "read index",
                    format!("unexpected leader response {other:?}"),
                ))
            }
        };
        self.wait_applied_until(index, deadline).await
    }

    /// Waits until this replica has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<(), NodeError> {
        self.wait_applied_until(index, Instant::now() + self.request_timeout).await
    }

    async fn wait_applied_until(&self, index: u64, deadline: Instant) -> Result<(), NodeError> {
        let mut rx = self.state.subscribe();
        let left = deadline.saturating_duration_since(Instant::now());
        let result = tokio::time::timeout(left, rx.wait_for(|applied| *applied >= index)).await;
        match result.map(|r| r.map(|_| ())) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(NodeError::unavailable("This node is shutting down.")),
            Err(_) => Err(NodeError::unavailable(format!(
                "This node has not caught up with the leader (log index {index}) within the request timeout of {} ms; try another node or again later.",
                self.request_timeout.as_millis()
            ))),
        }
    }

    /// Whether this node leads and has heard from a quorum within the election timeout:
    /// only then may it serve linearizable reads and take writes. A leader cut off from
    /// the others keeps believing it leads (openraft steps down only on seeing a higher
    /// term), so leadership alone says nothing about being able to commit.
    pub fn has_quorum(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        quorum_fresh(&m, self.id, self.quorum_window)
    }

    /// Waits (one to two quorum windows) until this leader has heard from a quorum
    /// recently: a leader elected a moment ago has no acknowledgement yet, and one cut off
    /// from the others must refuse promptly instead of proposing what cannot commit.
    async fn ensure_quorum(&self, deadline: Instant) -> Result<(), Attempt> {
        let mut metrics = self.raft.metrics();
        let (id, window) = (self.id, self.quorum_window);
        // Up to two windows (within the request's deadline): on a loaded machine a healthy
        // leader's acknowledgements can lag a window behind, while a leader cut off from
        // its majority still refuses promptly.
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .saturating_sub(Duration::from_millis(100))
            .min(window * 2)
            .max(window);
        let waited = tokio::time::timeout(
            wait,
            metrics.wait_for(|m| m.current_leader != Some(id) || quorum_fresh(m, id, window)),
        )
        .await
        .map(|r| r.is_ok());
        if !self.is_leader() {
            return Err(Attempt::Retry(format!("{NOT_LEADER}: node {} is not the leader", self.id)));
        }
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => Err(Attempt::Fail(NodeError::unavailable("This node is shutting down."))),
            Err(_) => Err(Attempt::Fail(NodeError::unavailable(format!(
                "Node {id} leads but has not heard from a majority of the cluster for over {} ms (a network partition?), so it refused the request; nothing was applied. Try another node.",
                window.as_millis()
            )))),
        }
    }

    /// Runs `req` on the leader, wherever it is, retrying only what surely did not happen.
    pub async fn leader_request(&self, req: LeaderRequest) -> Result<LeaderResponse, NodeError> {
        self.leader_request_until(req, Instant::now() + self.request_timeout).await
    }

    async fn leader_request_until(
        &self,
        req: LeaderRequest,
        deadline: Instant,
    ) -> Result<LeaderResponse, NodeError> {
        let mut delay = Duration::from_millis(10);
        loop {
            let attempt = match self.current_leader() {
                Some(leader) if leader == self.id => self.run_on_leader(req.clone(), deadline).await,
                Some(leader) => match self.leader_addr(leader) {
                    Some(addr) => self.forwarder.send(leader, &addr, &req, deadline).await,
                    None => Err(Attempt::Retry(format!(
                        "the leader, node {leader}, is not in this node's membership yet"
                    ))),
                },
                None => Err(Attempt::Retry(
                    "no leader is elected (an election is under way, a majority is unreachable, or the cluster is not initialized)".into(),
                )),
            };
            match attempt {
                Ok(resp) => return Ok(resp),
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry(why)) => {
                    if Instant::now() + delay > deadline {
                        tracing::info!(%why, "request timed out waiting for a leader");
                        return Err(NodeError::unavailable(format!(
                            "No leader could take the request within the request timeout of {} ms: {why}. Nothing was applied; try again.",
                            self.request_timeout.as_millis()
                        )));
                    }
                    tracing::debug!(%why, "retrying leader request");
                    // Again as soon as this node learns of another leader (an election
                    // just ended), or after the back-off.
                    let known = self.current_leader();
                    let mut metrics = self.raft.metrics();
                    let _ = tokio::time::timeout(
                        delay,
                        metrics.wait_for(|m| m.current_leader.is_some() && m.current_leader != known),
                    )
                    .await;
                    delay = (delay * 2).min(Duration::from_millis(200));
                }
            }
        }
    }

    /// Entry point of `/raft/leader`: runs the request here, and only if this node leads;
    /// the writes a follower forwarded together each on its own, with its own answer.
    pub async fn handle_leader_request(&self, req: LeaderRequest) -> Result<LeaderResponse, NodeError> {
        let deadline = Instant::now() + self.request_timeout;
        let on_leader = |req| async move {
            self.run_on_leader(req, deadline).await.map_err(|a| match a {
                Attempt::Retry(why) => NodeError::unavailable(why),
                Attempt::Fail(e) => e,
            })
        };
        match req {
            LeaderRequest::Writes(cmds) => {
                let each = cmds.into_iter().map(|cmd| on_leader(LeaderRequest::Write(cmd)));
                Ok(LeaderResponse::Writes(futures::future::join_all(each).await))
            }
            req => on_leader(req).await,
        }
    }

    async fn run_on_leader(&self, req: LeaderRequest, deadline: Instant) -> Result<LeaderResponse, Attempt> {
        if self.handing_over.load(std::sync::atomic::Ordering::SeqCst) {
            // Nothing may reach the followers while their lease runs out (drain.rs); the
            // caller retries and finds the new leader.
            return Err(Attempt::Retry(format!("{NOT_LEADER}: node {} is handing over leadership", self.id)));
        }
        let work = async {
            if matches!(req, LeaderRequest::Write(_) | LeaderRequest::ReadIndex) {
                self.ensure_quorum(deadline).await?;
            }
            match req {
                LeaderRequest::Write(cmd) => match self.batcher.write(cmd).await {
                    Some(r) => {
                        let (index, response) = r.map_err(write_err)?;
                        Ok(LeaderResponse::Written { index, response })
                    }
                    None => Err(Attempt::Fail(NodeError::unavailable("This node is shutting down."))),
                },
                LeaderRequest::Writes(_) => Err(Attempt::Fail(NodeError::bad_request(
                    "writes forwarded together are answered one by one",
                ))),
                LeaderRequest::ReadIndex => match self.batcher.read_index().await {
                    Some(r) => Ok(LeaderResponse::ReadIndex(r.map_err(read_err)?)),
                    None => Err(Attempt::Fail(NodeError::unavailable("This node is shutting down."))),
                },
                LeaderRequest::AddLearner { id, addr } => self.add_learner(id, addr).await,
                LeaderRequest::SetVoters { ids } => self.set_voters(ids).await,
                LeaderRequest::RemoveNode { id } => self.remove_node(id).await,
                LeaderRequest::Status => {
                    if !self.is_leader() {
                        return Err(Attempt::Retry(format!(
                            "{NOT_LEADER}: node {} is not the leader",
                            self.id
                        )));
                    }
                    Ok(LeaderResponse::Status(self.local_status().await))
                }
            }
        };
        match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), work).await {
            Ok(r) => r,
            Err(_) => Err(Attempt::Fail(NodeError::unavailable(format!(
                "The leader, node {}, did not commit the request within the request timeout of {} ms (has it lost its majority?); it may or may not be applied later.",
                self.id,
                self.request_timeout.as_millis()
            )))),
        }
    }

    async fn add_learner(&self, id: NodeId, addr: String) -> Result<LeaderResponse, Attempt> {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let m = membership.membership();
        if m.voter_ids().any(|v| v == id) {
            return Err(Attempt::Fail(NodeError::conflict(format!("node {id} is already a voter"))));
        }
        if let Some(existing) = m.get_node(&id) {
            if existing.addr != addr {
                return Err(Attempt::Fail(NodeError::conflict(format!(
                    "node {id} is already a learner at {}; remove it first to change its address",
                    existing.addr
                ))));
            }
        }
        if m.nodes().count() >= flotilla_store::limits::MAX_CLUSTER_NODES {
            return Err(Attempt::Fail(NodeError::conflict("the cluster already has the most nodes allowed")));
        }
        let r = self
            .raft
            .change_membership(ChangeMembers::AddNodes(BTreeMap::from([(id, Node::new(addr))])), true)
            .await
            .map_err(write_err)?;
        Ok(LeaderResponse::Membership { index: r.log_id.index })
    }

    async fn set_voters(&self, ids: BTreeSet<NodeId>) -> Result<LeaderResponse, Attempt> {
        if ids.is_empty() {
            return Err(Attempt::Fail(NodeError::bad_request("the set of voters must not be empty")));
        }
        let membership = self.raft.metrics().borrow().membership_config.clone();
        for id in &ids {
            if membership.membership().get_node(id).is_none() {
                return Err(Attempt::Fail(NodeError::bad_request(format!(
                    "node {id} is not a member; add it as a learner first"
                ))));
            }
        }
        let r = self
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(ids), true)
            .await
            .map_err(write_err)?;
        Ok(LeaderResponse::Membership { index: r.log_id.index })
    }

    async fn remove_node(&self, id: NodeId) -> Result<LeaderResponse, Attempt> {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let m = membership.membership();
        if m.get_node(&id).is_none() {
            return Err(Attempt::Fail(NodeError::not_found(format!(
                "node {id} is not a member of the cluster"
            ))));
        }
        let voters: BTreeSet<NodeId> = m.voter_ids().collect();
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(Attempt::Fail(NodeError::conflict(format!(
                    "node {id} is the last voter; it cannot be removed"
                ))));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        let r = self.raft.change_membership(change, false).await.map_err(write_err)?;
        Ok(LeaderResponse::Membership { index: r.log_id.index })
    }

    /// Bootstraps a new cluster from this node; returns once a leader has committed the
    /// first membership.
    pub async fn initialize(&self, nodes: BTreeMap<NodeId, String>) -> Result<(), NodeError> {
        if nodes.is_empty() {
            return Err(NodeError::bad_request("at least one node is needed"));
        }
        if nodes.len() > flotilla_store::limits::MAX_CLUSTER_NODES {
            return Err(NodeError::bad_request("too many nodes"));
        }
        let members: BTreeMap<NodeId, Node> =
            nodes.into_iter().map(|(id, addr)| (id, Node::new(addr))).collect();
        self.raft.initialize(members).await.map_err(|e| match e {
            RaftError::APIError(InitializeError::NotAllowed(_)) => NodeError::conflict(
                "this node is already part of an initialized cluster; nothing was changed",
            ),
            RaftError::APIError(InitializeError::NotInMembers(_)) => {
                NodeError::bad_request(format!("this node (id {}) must be one of the nodes", self.id))
            }
            RaftError::Fatal(f) => {
                tracing::error!(error = %f, "raft stopped");
                NodeError::unavailable("The Raft engine of this node has stopped; see its log.")
            }
        })?;
        let wait = self.raft.wait(Some(self.request_timeout * 2));
        wait.metrics(
            |m| {
                m.current_leader.is_some()
                    && m.last_applied.map(|l| l.index) >= m.membership_config.log_id().map(|l| l.index)
            },
            "a leader commits the initial membership",
        )
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "no leader after initialization");
            NodeError::unavailable(
                "The cluster was initialized, but no leader was elected yet; check that a majority of the nodes can reach each other.",
            )
        })?;
        Ok(())
    }

    /// The cluster as the leader sees it (with replication progress), from any node.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, NodeError> {
        match self.leader_request(LeaderRequest::Status).await? {
            LeaderResponse::Status(s) => Ok(s),
            other => Err(NodeError::internal("status", format!("unexpected leader response {other:?}"))),
        }
    }

    /// This node's own view, without asking anyone.
    pub async fn local_status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let commit_index =
            self.raft.with_raft_state(|s| s.committed.map_or(0, |l| l.index)).await.unwrap_or(0);
        let last_log_index = m.last_log_index.unwrap_or(0);
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let nodes = membership
            .nodes()
            .map(|(id, node)| {
                let matched_index = if *id == m.id {
                    m.last_log_index
                } else {
                    m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| l.index)
                };
                let matched_index =
                    if m.state == ServerState::Leader || *id == m.id { matched_index } else { None };
                NodeStatus {
                    id: *id,
                    addr: node.addr.clone(),
                    role: if voters.contains(id) { "voter" } else { "learner" }.into(),
                    matched_index,
                    lag: matched_index.map(|i| last_log_index.saturating_sub(i)),
                }
            })
            .collect();
        ClusterStatus {
            leader_id: m.current_leader,
            node_id: m.id,
            state: format!("{:?}", m.state).to_lowercase(),
            term: m.current_term,
            commit_index,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            last_log_index,
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            membership_index: m.membership_config.log_id().map(|l| l.index),
            quorum: if m.state == ServerState::Leader {
                quorum_fresh(&m, self.id, self.quorum_window)
            } else {
                m.current_leader.is_some()
            },
            nodes,
        }
    }
}

/// Opens sled and checks that it holds this node's store.
///
/// sled can come back *empty* from a damaged file instead of failing (seen here when its
/// `db` file was overwritten): a node that silently forgot its vote and log would break
/// Raft's safety. So a marker file outside sled (`data-dir/node-id`) records that this
/// data dir once held node N's store; a store that lost its `node_id` while the marker is
/// there is refused with the rebuild instructions. A panic inside sled's recovery is
/// turned into the same clear error. Also says whether the data dir is new (no marker
/// yet): only then may the Raft log be created empty; the caller writes the marker once
/// the log exists.
fn open_store(cfg: &NodeConfig, path: &std::path::Path) -> Result<(sled::Db, bool), StartError> {
    let open_err = |e: Box<dyn std::error::Error + Send + Sync>| StartError::Open {
        path: path.display().to_string(),
        id: cfg.id,
        source: e,
    };
    let marker = cfg.data_dir.join("node-id");
    let marked: Option<u64> = match std::fs::read_to_string(&marker) {
        Ok(text) => Some(
            text.trim()
                .parse()
                .map_err(|_| open_err(format!("unreadable marker file {}", marker.display()).into()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(open_err(Box::new(e))),
    };
    if let Some(found) = marked {
        if found != cfg.id {
            return Err(StartError::WrongNode {
                path: cfg.data_dir.display().to_string(),
                found,
                wanted: cfg.id,
            });
        }
    }
    if !path.exists() {
        crate::durable::create_dir(path).map_err(|e| open_err(Box::new(e)))?;
    }
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sled::Config::new()
            .path(path)
            .cache_capacity(cfg.cache_capacity_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
    }));
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Err(open_err(Box::new(e))),
        Err(_) => return Err(open_err("sled panicked while recovering the store".into())),
    };
    let meta = db.open_tree("meta").map_err(|e| open_err(Box::new(e)))?;
    match meta.get("node_id").map_err(|e| open_err(Box::new(e)))? {
        Some(found) => {
            let found = u64::from_be_bytes(found.as_ref().try_into().unwrap_or([0; 8]));
            if found != cfg.id {
                return Err(StartError::WrongNode {
                    path: path.display().to_string(),
                    found,
                    wanted: cfg.id,
                });
            }
        }
        None if marked.is_some() => {
            return Err(open_err(
                "the store is empty or unreadable, although this data dir held this node's store".into(),
            ));
        }
        None => {
            meta.insert("node_id", &cfg.id.to_be_bytes()).map_err(|e| open_err(Box::new(e)))?;
            db.flush().map_err(|e| open_err(Box::new(e)))?;
            // sled's flush is no fsync (see durable.rs): a power cut must not take the id.
            crate::durable::sync_store(path).map_err(|e| open_err(Box::new(e)))?;
        }
    }
    Ok((db, marked.is_none()))
}

/// Writes the marker durably (see [`crate::durable::replace`]).
fn write_marker(marker: &std::path::Path, id: NodeId) -> std::io::Result<()> {
    crate::durable::replace(marker, format!("{id}\n").as_bytes())
}

/// Prefix of the message a non-leader answers on `/raft/leader`, so the caller retries.
pub(crate) const NOT_LEADER: &str = "not the leader";

/// Whether `m` shows this node leading with a quorum acknowledgement younger than `window`.
fn quorum_fresh(m: &openraft::RaftMetrics<NodeId, Node>, id: NodeId, window: Duration) -> bool {
    m.state == ServerState::Leader
        && m.current_leader == Some(id)
        && m.millis_since_quorum_ack.is_some_and(|ms| u128::from(ms) <= window.as_millis())
}

/// "the leader is node 2" or "no leader is known", for messages.
fn leader_phrase(leader: Option<NodeId>) -> String {
    match leader {
        Some(id) => format!("the leader is node {id}"),
        None => "no leader is known yet".into(),
    }
}

fn write_err(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> Attempt {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            Attempt::Retry(format!("{NOT_LEADER}; {}", leader_phrase(f.leader_id)))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            tracing::info!(error = %c, "membership change refused");
            match c {
                ChangeMembershipError::InProgress(_) => Attempt::Fail(NodeError::conflict(
                    "Another membership change is in progress; try again once it is committed.",
                )),
                ChangeMembershipError::EmptyMembership(_) => {
                    Attempt::Fail(NodeError::bad_request("The new membership must not be empty."))
                }
                ChangeMembershipError::LearnerNotFound(l) => Attempt::Fail(NodeError::bad_request(format!(
                    "Node {} is not a learner; add it as a learner before making it a voter.",
                    l.node_id
                ))),
            }
        }
        RaftError::Fatal(f) => {
            tracing::error!(error = %f, "raft stopped");
            Attempt::Fail(NodeError::unavailable("The Raft engine of this node has stopped; see its log."))
        }
    }
}

fn read_err(e: RaftError<NodeId, CheckIsLeaderError<NodeId, Node>>) -> Attempt {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
            Attempt::Retry(format!("{NOT_LEADER}; {}", leader_phrase(f.leader_id)))
        }
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
            tracing::info!(error = %q, "leadership not confirmed by a quorum");
            Attempt::Fail(NodeError::unavailable(
                "The leader could not confirm its leadership with a majority of the cluster; try again.",
            ))
        }
        RaftError::Fatal(f) => {
            tracing::error!(error = %f, "raft stopped");
            Attempt::Fail(NodeError::unavailable("The Raft engine of this node has stopped; see its log."))
        }
    }
}
