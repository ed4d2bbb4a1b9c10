//! JSON shapes of the public API, shared by the server and the typed client.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use flotilla_raft::{ClusterStatus, NodeStatus};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvPutRequest {
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvItem {
    pub key: String,
    pub value: String,
    pub revision: u64,
    pub create_revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvList {
    pub items: Vec<KvItem>,
    /// More keys match after the last item (continue with `start_after`).
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Maintenance {
    /// The replicated flag.
    pub enabled: bool,
    /// Each reachable node's own applied view of the flag, by node id.
    pub nodes: BTreeMap<String, bool>,
    /// Members that did not answer.
    #[serde(default)]
    pub unreachable: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalMaintenance {
    pub node_id: u64,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitRequest {
    /// Node id (as a string, JSON object keys are strings) → node address.
    pub nodes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddLearnerRequest {
    pub id: u64,
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VotersRequest {
    pub ids: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub node_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub ready: bool,
    pub node_id: u64,
    pub leader_id: Option<u64>,
    pub applied_index: u64,
    pub commit_index: u64,
    /// See `ClusterStatus::quorum`: false on a leader cut off from its majority.
    #[serde(default)]
    pub quorum: bool,
}

pub use flotilla_store::executor::{Executor, ExecutorInfo, ExecutorTaskSpec, ExecutorTaskStatus, TaskData};
pub use flotilla_store::run::{Run, RunCreate};
pub use flotilla_store::Event;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunList {
    pub runs: Vec<Run>,
    /// More runs match after the last one (continue with `start=<last id>`).
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnotationsRequest {
    /// Merged into the task's annotations; `null` removes a key.
    pub annotations: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorList {
    pub executors: Vec<Executor>,
}

/// An executor task as an executor receives it: the replicated spec plus the data
/// regenerated from the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorTaskView {
    pub id: String,
    pub spec: ExecutorTaskSpecView,
    pub status: ExecutorTaskStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorTaskSpecView {
    #[serde(flatten)]
    pub spec: ExecutorTaskSpec,
    pub data: TaskData,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorTasks {
    /// Pass back as `since` to wait for the next change.
    pub revision: u64,
    pub tasks: Vec<ExecutorTaskView>,
    /// The cluster's name (see `State::cluster_id`); the executor labels its containers
    /// with it. `None` until the first leader named the cluster.
    #[serde(default)]
    pub cluster_id: Option<String>,
}

/// `GET /api/v1/executor/{id}/siblings`: the registered executors of the caller's group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Siblings {
    pub executors: Vec<String>,
}
