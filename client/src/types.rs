//! JSON shapes of the public API, shared by the server and the typed client. Only shapes:
//! what a server does with them lives in `flotilla-api`.

use std::collections::BTreeMap;

use flotilla_store::run::Depend;
use serde::{Deserialize, Serialize};

/// Every refusal, whatever the route: `{"code": "...", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// One member of the cluster as [`ClusterStatus`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeStatus {
    /// The Raft node id (`flotilla_raft::NodeId`).
    pub id: u64,
    pub addr: String,
    /// `voter` or `learner`.
    pub role: String,
    /// Last log index known to be on that node (leader's view; `null` when unknown).
    pub matched_index: Option<u64>,
    /// How many entries it is behind the leader's last log index (`null` when unknown).
    pub lag: Option<u64>,
}

/// `GET /api/v1/cluster`: a node's view of the Raft cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClusterStatus {
    pub leader_id: Option<u64>,
    /// The node that answered.
    pub node_id: u64,
    pub state: String,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub membership_index: Option<u64>,
    /// On a leader: it heard from a quorum within the election timeout, so it may serve
    /// linearizable reads and take writes. On any other node: it knows a leader.
    pub quorum: bool,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct KvPutRequest {
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Revision {
    pub revision: u64,
}

/// `POST /api/v1/kv`: several puts at once, each what `PUT /api/v1/kv/{key}` would carry,
/// written and answered as that put alone would be (not a transaction: each stands or
/// fails by itself). At most [`MAX_KV_PUTS`], one per key. The client sends the puts
/// that queue while one request is on its way together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct KvPuts {
    pub puts: Vec<KvPutItem>,
}

/// The most puts one `POST /api/v1/kv` carries.
pub const MAX_KV_PUTS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct KvPutItem {
    pub key: String,
    pub value: String,
    /// As `?prev_revision=N` of the single put (0: only if the key does not exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_revision: Option<u64>,
}

/// The answer to [`KvPuts`]: each put's outcome, in their order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KvPutOutcomes {
    pub outcomes: Vec<KvPutOutcome>,
}

/// What the put alone would have been answered: `status` 200 and the `revision`, or an
/// error's status (409 `revision_mismatch`, 400 for a bad key or value, 503...) and the
/// error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KvPutOutcome {
    pub key: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KvItem {
    pub key: String,
    pub value: String,
    pub revision: u64,
    pub create_revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KvList {
    pub items: Vec<KvItem>,
    /// More keys match after the last item (continue with `start_after`).
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LocalMaintenance {
    pub node_id: u64,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InitRequest {
    /// Node id (as a string, JSON object keys are strings) → node address.
    pub nodes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddLearnerRequest {
    pub id: u64,
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VotersRequest {
    pub ids: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    pub status: String,
    pub node_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunList {
    pub runs: Vec<Run>,
    /// More runs match after the last one (continue with `start=<last id>`).
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AnnotationsRequest {
    /// Merged into the task's annotations; `null` removes a key.
    pub annotations: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecutorList {
    pub executors: Vec<Executor>,
}

/// An executor task as an executor receives it: the replicated spec plus the data
/// regenerated from the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecutorTaskView {
    pub id: String,
    pub spec: ExecutorTaskSpecView,
    pub status: ExecutorTaskStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecutorTaskSpecView {
    #[serde(flatten)]
    pub spec: ExecutorTaskSpec,
    /// What the executor needs to start the task. Always given, except to a listing asked
    /// with `data=notstarted` ([`TaskDataFor::NotStarted`]): then only for the tasks that
    /// have not started, the ones an executor may still start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<TaskData>,
}

/// Which tasks of an executor's listing carry their `spec.data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskDataFor {
    /// Every task (`data=all`, the default).
    All,
    /// Only the tasks that have not started (`data=notstarted`): what an executor asks for.
    /// A task it runs or ran needs nothing of it again, so every change to the executor's
    /// tasks no longer sends each task's steps, environment and registry credentials again.
    NotStarted,
}

impl TaskDataFor {
    /// The value of the `data` query parameter.
    pub fn as_query(self) -> &'static str {
        match self {
            TaskDataFor::All => "all",
            TaskDataFor::NotStarted => "notstarted",
        }
    }

    /// The `data` query parameter read back: absent is [`TaskDataFor::All`], a value no
    /// variant writes is `None`.
    pub fn from_query(value: Option<&str>) -> Option<TaskDataFor> {
        let Some(value) = value else { return Some(TaskDataFor::All) };
        [TaskDataFor::All, TaskDataFor::NotStarted].into_iter().find(|d| d.as_query() == value)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecutorTasks {
    /// Pass back as `since` to wait for the next change.
    pub revision: u64,
    pub tasks: Vec<ExecutorTaskView>,
    /// The cluster's name (see `State::cluster_id`); the executor labels its containers
    /// with it. `None` until the first leader named the cluster.
    #[serde(default)]
    pub cluster_id: Option<String>,
}

/// `PUT /api/v1/executor/{id}/tasks`: the statuses of several of the executor's tasks at
/// once, each what `PUT /api/v1/executor/{id}/tasks/{task_id}` would carry (an executor
/// sends the reports that queued while one was on its way together). At most
/// [`MAX_TASK_REPORTS`], one per task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskReports {
    pub reports: Vec<TaskReport>,
}

/// The most reports one `PUT /api/v1/executor/{id}/tasks` carries.
pub const MAX_TASK_REPORTS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskReport {
    /// The executor task's id.
    pub id: String,
    pub status: ExecutorTaskStatus,
}

/// The answer to [`TaskReports`]: each report's outcome, in their order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskReportOutcomes {
    pub outcomes: Vec<TaskReportOutcome>,
}

/// What the report alone would have been answered: `status` 204, or an error's status
/// (404 once the task is gone, 409 for a final status changed, 503...) and the error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskReportOutcome {
    pub id: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// `GET /api/v1/executor/{id}/siblings`: the registered executors of the caller's group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Siblings {
    pub executors: Vec<String>,
}

/// `PUT /api/v1/runs/{id}/actions` with `"action": "restart"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RestartRequest {
    pub action: String,
    /// Run every task again (default: keep the tasks that succeeded or were skipped).
    #[serde(default)]
    pub from_start: bool,
    /// Replaces the run's whole `environment` map when given.
    #[serde(default)]
    pub environment: Option<BTreeMap<String, String>>,
}

/// `GET /api/v1/runs/{id}/tasks`: the tasks in DAG order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunOutline {
    pub tasks: Vec<TaskOutline>,
}

/// One task of a [`RunOutline`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskOutline {
    pub name: String,
    /// 0 for tasks without dependencies, else 1 + the highest level of a parent.
    pub level: usize,
    pub depends: Vec<Depend>,
    pub steps: Vec<StepOutline>,
}

/// One step: its type (`run`, `save_to_workspace`...) and, for a `run` step, its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepOutline {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Answer to a log append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogAppended {
    /// Bytes the server holds for this log; the next append starts there.
    pub size: u64,
    /// The log is complete and stored in the object storage.
    pub stored: bool,
}

/// Answer to an archive or cache upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Stored {
    pub key: String,
    pub size: u64,
}

/// Answer to a cache lookup: the first key (in byte order) matching.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CacheMatch {
    pub key: Option<String>,
}

/// `GET /api/v1/archive`: what the archive holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArchiveStatus {
    /// Bumped by every archive pass that changed the manifest.
    pub generation: u64,
    /// Archive files in the object storage.
    pub files: u64,
    /// Runs in those files.
    pub runs: u64,
    pub bytes: u64,
    /// Runs still in the replicated state (not archived yet).
    pub runs_in_state: u64,
}

/// `POST /api/v1/archive/index`: where the full run index was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IndexDumped {
    /// Its object storage key.
    pub key: String,
    pub runs: u64,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_parameter_reads_back_what_it_writes() {
        for d in [TaskDataFor::All, TaskDataFor::NotStarted] {
            assert_eq!(TaskDataFor::from_query(Some(d.as_query())), Some(d));
        }
        assert_eq!(TaskDataFor::from_query(None), Some(TaskDataFor::All), "absent: every task's");
        for bad in ["", "some", "All", "notstarted "] {
            assert_eq!(TaskDataFor::from_query(Some(bad)), None, "{bad:?}");
        }
    }
}
