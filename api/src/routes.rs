//! Every HTTP route of a node, declared once.
//!
//! A route is a variant of [`Endpoint`], parsed from the method and the decoded path
//! segments by [`Endpoint::parse`]. Everything else about a route is a `match` on the
//! variant: its handler (`server::dispatch`), its metrics label, the token it asks for
//! ([`Access`]), whether it is served in maintenance, how its body is read ([`Body`]), and
//! its method and path template (for an OpenAPI document). Adding a route is adding a
//! variant and its arm in `at`; the compiler names every other place to fill in (and
//! warns about a variant `at` never builds).
//!
//! A path some route has, asked with another method, answers 405 with an `Allow` header
//! listing that path's methods; any other path 404. Both are decided from the headers,
//! after the token check and before the body is read.

use flotilla_raft::rpc::RpcKind;
use flotilla_store::limits::{MAX_API_BODY_BYTES, MAX_IMPORT_BYTES, MAX_RAFT_BODY_BYTES};
use warp::http::Method;

use crate::auth::Need;

/// One route: the method and the path it answers, with the path's parameters (decoded
/// segments). A `{key}` or `{path}` is the rest of the path, any number of segments.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Endpoint<'a> {
    // Health and metrics: open to all.
    Healthz,
    Readyz,
    Metrics,

    // Node to node, with the cluster token.
    Raft {
        rpc: RpcKind,
    },

    // Cluster membership.
    ClusterStatus,
    ClusterInit,
    AddLearner,
    SetVoters,
    RemoveNode {
        node_id: &'a str,
    },

    // The key-value store.
    KvList,
    /// Several puts at once (`POST /api/v1/kv`).
    KvPuts,
    KvGet {
        key: &'a [&'a str],
    },
    KvPut {
        key: &'a [&'a str],
    },
    KvDelete {
        key: &'a [&'a str],
    },

    // Maintenance, export and import.
    MaintenanceStatus,
    MaintenanceEnable,
    MaintenanceDisable,
    Export,
    Import,

    // Runs, their tasks, the archive, events, executor admin.
    ListRuns,
    CreateRun,
    GetRun {
        run_id: &'a str,
    },
    DeleteRun {
        run_id: &'a str,
    },
    RunAction {
        run_id: &'a str,
    },
    RunGraph {
        run_id: &'a str,
    },
    RunTasks {
        run_id: &'a str,
    },
    TaskAnnotations {
        run_id: &'a str,
        task: &'a str,
    },
    TaskAction {
        run_id: &'a str,
        task: &'a str,
    },
    TaskLogs {
        run_id: &'a str,
        task: &'a str,
    },
    TaskWorkspace {
        run_id: &'a str,
        task: &'a str,
    },
    ArchiveStatus,
    DumpArchiveIndex,
    Events,
    ListExecutors,
    DeleteExecutor {
        executor_id: &'a str,
    },
    /// This API, described (`openapi.rs`).
    OpenApi,

    // Executor-facing, with the executor token.
    ExecutorHeartbeat {
        executor_id: &'a str,
    },
    ExecutorTasks {
        executor_id: &'a str,
    },
    ExecutorSiblings {
        executor_id: &'a str,
    },
    SetTaskStatus {
        executor_id: &'a str,
        task_id: &'a str,
    },
    SetTaskStatuses {
        executor_id: &'a str,
    },
    AppendLog {
        executor_id: &'a str,
        task_id: &'a str,
        step: &'a str,
    },
    UploadArchive {
        executor_id: &'a str,
        task_id: &'a str,
        step: &'a str,
    },
    // These four handlers do not look at the executor id of the path: an archive or a
    // cache is read (and a cache saved) with the executor token whichever executor asks.
    #[allow(dead_code)]
    DownloadArchive {
        executor_id: &'a str,
        task_id: &'a str,
        step: &'a str,
    },
    #[allow(dead_code)]
    UploadCache {
        executor_id: &'a str,
    },
    #[allow(dead_code)]
    DownloadCache {
        executor_id: &'a str,
    },
    #[allow(dead_code)]
    MatchCache {
        executor_id: &'a str,
    },

    // The dashboard's files: open to all (they hold no token).
    Ui {
        path: &'a [&'a str],
    },
    UiHead {
        path: &'a [&'a str],
    },
}

/// The token a route asks for. (Issue 21 turns this into a role.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// No token: health, metrics, the dashboard's files.
    Anyone,
    /// The cluster token: node-to-node Raft RPCs.
    Cluster,
    /// The executor token: `/api/v1/executor/*`.
    Executor,
    /// The API token: the rest of `/api/v1/*`.
    Api,
}

impl Access {
    /// What a path with no route asks of its caller before it is told 404 or 405: the
    /// least role of its family (any API token may learn that an API path does not exist).
    pub(crate) fn least_need(self) -> Need {
        match self {
            Access::Anyone => Need::Nothing,
            Access::Cluster => Need::Cluster,
            Access::Executor => Need::Executor,
            Access::Api => Need::Read,
        }
    }

    /// The token asked of a path no route has (or has with another method), by its
    /// prefix, before it is told 404 or 405: without the right token a client learns
    /// nothing about which routes exist. Each route's own [`Endpoint::access`] is the
    /// same as this today (a test checks it).
    pub(crate) fn of_path(segments: &[&str]) -> Access {
        match segments {
            ["raft", ..] => Access::Cluster,
            ["api", "v1", "executor", ..] => Access::Executor,
            ["api", "v1", ..] => Access::Api,
            _ => Access::Anyone,
        }
    }
}

/// How a route's request body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// Streamed through to the object storage, never buffered (archive and cache
    /// uploads; their limit is `MAX_ARCHIVE_BYTES`, applied while streaming).
    Streamed,
    /// Read whole, up to `MAX_RAFT_BODY_BYTES`, with a permit of the Raft pool when large.
    Raft,
    /// Read whole, up to `MAX_IMPORT_BYTES` (an export file).
    Import,
    /// Read whole, up to `MAX_API_BODY_BYTES`.
    Api,
}

impl Body {
    /// The largest body read whole (`None`: streamed).
    pub(crate) fn max_bytes(self) -> Option<u64> {
        match self {
            Body::Streamed => None,
            Body::Raft => Some(MAX_RAFT_BODY_BYTES),
            Body::Import => Some(MAX_IMPORT_BYTES),
            Body::Api => Some(MAX_API_BODY_BYTES),
        }
    }
}

/// Why a request has no endpoint.
#[derive(Debug)]
pub(crate) enum NoRoute<'a> {
    /// No route has this path.
    NotFound,
    /// Routes have this path, with other methods: these (never empty).
    MethodNotAllowed { at: Vec<Endpoint<'a>> },
}

impl<'a> Endpoint<'a> {
    /// The endpoint answering `method` on the (decoded) path `segments`.
    pub(crate) fn parse(method: &Method, segments: &'a [&'a str]) -> Result<Endpoint<'a>, NoRoute<'a>> {
        let at = at(segments);
        if let Some(e) = at.iter().find(|e| e.method() == method.as_str()) {
            return Ok(*e);
        }
        if at.is_empty() {
            Err(NoRoute::NotFound)
        } else {
            Err(NoRoute::MethodNotAllowed { at })
        }
    }

    pub(crate) fn method(&self) -> &'static str {
        self.spec().method
    }

    /// The method and the path template, as an OpenAPI document names an operation.
    pub(crate) fn template(&self) -> (&'static str, &'static str) {
        let spec = self.spec();
        (spec.method, spec.template)
    }

    /// The `route` label of `flotilla_http_requests_total`: a bounded set, one per route
    /// family (a request with no route is counted as `other`).
    pub(crate) fn label(&self) -> &'static str {
        self.spec().label
    }

    /// The token this route asks for, checked from the headers before the body is read.
    pub(crate) fn access(&self) -> Access {
        match self.need() {
            Need::Nothing => Access::Anyone,
            Need::Cluster => Access::Cluster,
            Need::Executor => Access::Executor,
            Need::Read | Need::Write | Need::Admin => Access::Api,
        }
    }

    /// The role a caller's token must allow (`--tokens-file`, `docs/security.md`): reads
    /// need `read`, changes to runs and kv need `write`, membership, maintenance, export,
    /// import and executor admin need `admin`; executor routes `executor`, Raft `cluster`.
    pub(crate) fn need(&self) -> Need {
        self.spec().need
    }

    /// Served while this node applies the maintenance flag. Health, metrics, Raft, the
    /// dashboard's files and the executor-facing routes always are (executors keep
    /// heartbeating and finish what they run; the paused scheduler gives them nothing
    /// new); of the API, only what takes a cluster in and out of maintenance.
    pub(crate) fn open_in_maintenance(&self) -> bool {
        self.spec().in_maintenance == Maintenance::Open
    }

    /// How the body is read, and its size limit.
    pub(crate) fn body(&self) -> Body {
        self.spec().body
    }

    /// Everything the table says about this route, in one row per route.
    fn spec(&self) -> Spec {
        use Body::{Api as Small, Import as ExportFile, Raft as RaftBody, Streamed};
        use Endpoint as E;
        use Maintenance::{Closed, Open};
        use Need::{Admin, Cluster, Executor, Nothing, Read, Write};
        use RpcKind as R;
        let (method, template, label, need, in_maintenance, body) = match self {
            E::Healthz => ("GET", "/healthz", "healthz", Nothing, Open, Small),
            E::Readyz => ("GET", "/readyz", "readyz", Nothing, Open, Small),
            E::Metrics => ("GET", "/metrics", "metrics", Nothing, Open, Small),
            E::Raft { rpc: R::Append } => ("POST", "/raft/append", "raft", Cluster, Open, RaftBody),
            E::Raft { rpc: R::Vote } => ("POST", "/raft/vote", "raft", Cluster, Open, RaftBody),
            E::Raft { rpc: R::Snapshot } => ("POST", "/raft/snapshot", "raft", Cluster, Open, RaftBody),
            E::Raft { rpc: R::Leader } => ("POST", "/raft/leader", "raft", Cluster, Open, RaftBody),
            E::Raft { rpc: R::Elect } => ("POST", "/raft/elect", "raft", Cluster, Open, RaftBody),
            E::ClusterStatus => ("GET", "/api/v1/cluster", "cluster", Read, Open, Small),
            E::ClusterInit => ("POST", "/api/v1/cluster/init", "cluster", Admin, Open, Small),
            E::AddLearner => ("POST", "/api/v1/cluster/learners", "cluster", Admin, Open, Small),
            E::SetVoters => ("POST", "/api/v1/cluster/voters", "cluster", Admin, Open, Small),
            E::RemoveNode { .. } => {
                ("DELETE", "/api/v1/cluster/nodes/{node_id}", "cluster", Admin, Open, Small)
            }
            E::KvList => ("GET", "/api/v1/kv", "kv", Read, Closed, Small),
            E::KvPuts => ("POST", "/api/v1/kv", "kv", Write, Closed, Small),
            E::KvGet { .. } => ("GET", "/api/v1/kv/{key}", "kv", Read, Closed, Small),
            E::KvPut { .. } => ("PUT", "/api/v1/kv/{key}", "kv", Write, Closed, Small),
            E::KvDelete { .. } => ("DELETE", "/api/v1/kv/{key}", "kv", Write, Closed, Small),
            E::MaintenanceStatus => ("GET", "/api/v1/maintenance", "maintenance", Read, Open, Small),
            E::MaintenanceEnable => ("PUT", "/api/v1/maintenance", "maintenance", Admin, Open, Small),
            E::MaintenanceDisable => ("DELETE", "/api/v1/maintenance", "maintenance", Admin, Open, Small),
            E::Export => ("GET", "/api/v1/export", "export", Admin, Open, Small),
            E::Import => ("POST", "/api/v1/import", "import", Admin, Open, ExportFile),
            E::ListRuns => ("GET", "/api/v1/runs", "runs", Read, Closed, Small),
            E::CreateRun => ("POST", "/api/v1/runs", "runs", Write, Closed, Small),
            E::GetRun { .. } => ("GET", "/api/v1/runs/{run_id}", "runs", Read, Closed, Small),
            E::DeleteRun { .. } => ("DELETE", "/api/v1/runs/{run_id}", "runs", Write, Closed, Small),
            E::RunAction { .. } => ("PUT", "/api/v1/runs/{run_id}/actions", "runs", Write, Closed, Small),
            E::RunGraph { .. } => ("GET", "/api/v1/runs/{run_id}/graph", "runs", Read, Closed, Small),
            E::RunTasks { .. } => ("GET", "/api/v1/runs/{run_id}/tasks", "runs", Read, Closed, Small),
            E::TaskAnnotations { .. } => {
                ("PUT", "/api/v1/runs/{run_id}/tasks/{task}/annotations", "runs", Write, Closed, Small)
            }
            E::TaskAction { .. } => {
                ("PUT", "/api/v1/runs/{run_id}/tasks/{task}/actions", "runs", Write, Closed, Small)
            }
            E::TaskLogs { .. } => {
                ("GET", "/api/v1/runs/{run_id}/tasks/{task}/logs", "runs", Read, Closed, Small)
            }
            E::TaskWorkspace { .. } => {
                ("GET", "/api/v1/runs/{run_id}/tasks/{task}/workspace", "runs", Read, Closed, Small)
            }
            E::ArchiveStatus => ("GET", "/api/v1/archive", "archive", Read, Closed, Small),
            E::DumpArchiveIndex => ("POST", "/api/v1/archive/index", "archive", Admin, Closed, Small),
            E::Events => ("GET", "/api/v1/events", "events", Read, Closed, Small),
            E::ListExecutors => ("GET", "/api/v1/executors", "executors", Read, Closed, Small),
            E::DeleteExecutor { .. } => {
                ("DELETE", "/api/v1/executors/{executor_id}", "executors", Admin, Closed, Small)
            }
            E::OpenApi => ("GET", "/api/v1/openapi.json", "openapi", Read, Open, Small),
            E::ExecutorHeartbeat { .. } => {
                ("PUT", "/api/v1/executor/{executor_id}", "executor", Executor, Open, Small)
            }
            E::ExecutorTasks { .. } => {
                ("GET", "/api/v1/executor/{executor_id}/tasks", "executor", Executor, Open, Small)
            }
            E::ExecutorSiblings { .. } => {
                ("GET", "/api/v1/executor/{executor_id}/siblings", "executor", Executor, Open, Small)
            }
            E::SetTaskStatus { .. } => {
                ("PUT", "/api/v1/executor/{executor_id}/tasks/{task_id}", "executor", Executor, Open, Small)
            }
            E::SetTaskStatuses { .. } => {
                ("PUT", "/api/v1/executor/{executor_id}/tasks", "executor", Executor, Open, Small)
            }
            E::AppendLog { .. } => (
                "POST",
                "/api/v1/executor/{executor_id}/tasks/{task_id}/logs/{step}",
                "executor",
                Executor,
                Open,
                Small,
            ),
            E::UploadArchive { .. } => (
                "PUT",
                "/api/v1/executor/{executor_id}/tasks/{task_id}/archives/{step}",
                "executor",
                Executor,
                Open,
                Streamed,
            ),
            E::DownloadArchive { .. } => (
                "GET",
                "/api/v1/executor/{executor_id}/archives/{task_id}/{step}",
                "executor",
                Executor,
                Open,
                Small,
            ),
            E::UploadCache { .. } => {
                ("PUT", "/api/v1/executor/{executor_id}/caches", "executor", Executor, Open, Streamed)
            }
            E::DownloadCache { .. } => {
                ("GET", "/api/v1/executor/{executor_id}/caches", "executor", Executor, Open, Small)
            }
            E::MatchCache { .. } => {
                ("GET", "/api/v1/executor/{executor_id}/caches/match", "executor", Executor, Open, Small)
            }
            E::Ui { .. } => ("GET", "/ui/{path}", "ui", Nothing, Open, Small),
            E::UiHead { .. } => ("HEAD", "/ui/{path}", "ui", Nothing, Open, Small),
        };
        Spec { method, template, label, need, in_maintenance, body }
    }
}

/// Whether a route is served while the node applies the maintenance flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Maintenance {
    Open,
    Closed,
}

/// One row of the route table.
struct Spec {
    method: &'static str,
    template: &'static str,
    label: &'static str,
    need: Need,
    in_maintenance: Maintenance,
    body: Body,
}

/// The endpoints of a path, one per method (none: no route has this path). The one
/// parser: a path is matched here and nowhere else.
pub(crate) fn at<'a>(s: &'a [&'a str]) -> Vec<Endpoint<'a>> {
    use Endpoint as E;
    match s {
        ["healthz"] => vec![E::Healthz],
        ["readyz"] => vec![E::Readyz],
        ["metrics"] => vec![E::Metrics],
        ["raft", rpc] => {
            let rpc = match *rpc {
                "append" => RpcKind::Append,
                "vote" => RpcKind::Vote,
                "snapshot" => RpcKind::Snapshot,
                "leader" => RpcKind::Leader,
                "elect" => RpcKind::Elect,
                _ => return vec![],
            };
            vec![E::Raft { rpc }]
        }
        ["api", "v1", rest @ ..] => match rest {
            ["cluster"] => vec![E::ClusterStatus],
            ["cluster", "init"] => vec![E::ClusterInit],
            ["cluster", "learners"] => vec![E::AddLearner],
            ["cluster", "voters"] => vec![E::SetVoters],
            ["cluster", "nodes", node_id] => vec![E::RemoveNode { node_id }],
            ["kv"] => vec![E::KvList, E::KvPuts],
            ["kv", key @ ..] => vec![E::KvGet { key }, E::KvPut { key }, E::KvDelete { key }],
            ["maintenance"] => vec![E::MaintenanceStatus, E::MaintenanceEnable, E::MaintenanceDisable],
            ["export"] => vec![E::Export],
            ["import"] => vec![E::Import],
            ["runs"] => vec![E::ListRuns, E::CreateRun],
            ["runs", run_id] => vec![E::GetRun { run_id }, E::DeleteRun { run_id }],
            ["runs", run_id, "actions"] => vec![E::RunAction { run_id }],
            ["runs", run_id, "graph"] => vec![E::RunGraph { run_id }],
            ["runs", run_id, "tasks"] => vec![E::RunTasks { run_id }],
            ["runs", run_id, "tasks", task, "annotations"] => vec![E::TaskAnnotations { run_id, task }],
            ["runs", run_id, "tasks", task, "actions"] => vec![E::TaskAction { run_id, task }],
            ["runs", run_id, "tasks", task, "logs"] => vec![E::TaskLogs { run_id, task }],
            ["runs", run_id, "tasks", task, "workspace"] => vec![E::TaskWorkspace { run_id, task }],
            ["archive"] => vec![E::ArchiveStatus],
            ["archive", "index"] => vec![E::DumpArchiveIndex],
            ["events"] => vec![E::Events],
            ["openapi.json"] => vec![E::OpenApi],
            ["executors"] => vec![E::ListExecutors],
            ["executors", executor_id] => vec![E::DeleteExecutor { executor_id }],
            ["executor", executor_id] => vec![E::ExecutorHeartbeat { executor_id }],
            ["executor", executor_id, "tasks"] => {
                vec![E::ExecutorTasks { executor_id }, E::SetTaskStatuses { executor_id }]
            }
            ["executor", executor_id, "siblings"] => vec![E::ExecutorSiblings { executor_id }],
            ["executor", executor_id, "tasks", task_id] => vec![E::SetTaskStatus { executor_id, task_id }],
            ["executor", executor_id, "tasks", task_id, "logs", step] => {
                vec![E::AppendLog { executor_id, task_id, step }]
            }
            ["executor", executor_id, "tasks", task_id, "archives", step] => {
                vec![E::UploadArchive { executor_id, task_id, step }]
            }
            ["executor", executor_id, "archives", task_id, step] => {
                vec![E::DownloadArchive { executor_id, task_id, step }]
            }
            ["executor", executor_id, "caches"] => {
                vec![E::DownloadCache { executor_id }, E::UploadCache { executor_id }]
            }
            ["executor", executor_id, "caches", "match"] => vec![E::MatchCache { executor_id }],
            _ => vec![],
        },
        // Any path under `/ui/`: an asset or the app (a deep link), decided by its handler.
        ["ui", path @ ..] => vec![E::Ui { path }, E::UiHead { path }],
        _ => vec![],
    }
}

impl Endpoint<'static> {
    /// One endpoint of every route (path parameters are placeholders): what the OpenAPI
    /// document lists. A test checks it against the arms of [`Endpoint::template`].
    pub(crate) fn every() -> Vec<Endpoint<'static>> {
        use Endpoint as E;
        const ID: &str = "x";
        const PATH: &[&str] = &["x"];
        let mut every = vec![E::Healthz, E::Readyz, E::Metrics];
        every.extend(
            [RpcKind::Append, RpcKind::Vote, RpcKind::Snapshot, RpcKind::Leader, RpcKind::Elect]
                .map(|rpc| E::Raft { rpc }),
        );
        every.extend([
            E::ClusterStatus,
            E::ClusterInit,
            E::AddLearner,
            E::SetVoters,
            E::RemoveNode { node_id: ID },
            E::KvList,
            E::KvPuts,
            E::KvGet { key: PATH },
            E::KvPut { key: PATH },
            E::KvDelete { key: PATH },
            E::MaintenanceStatus,
            E::MaintenanceEnable,
            E::MaintenanceDisable,
            E::Export,
            E::Import,
            E::ListRuns,
            E::CreateRun,
            E::GetRun { run_id: ID },
            E::DeleteRun { run_id: ID },
            E::RunAction { run_id: ID },
            E::RunGraph { run_id: ID },
            E::RunTasks { run_id: ID },
            E::TaskAnnotations { run_id: ID, task: ID },
            E::TaskAction { run_id: ID, task: ID },
            E::TaskLogs { run_id: ID, task: ID },
            E::TaskWorkspace { run_id: ID, task: ID },
            E::ArchiveStatus,
            E::DumpArchiveIndex,
            E::Events,
            E::ListExecutors,
            E::DeleteExecutor { executor_id: ID },
            E::OpenApi,
            E::ExecutorHeartbeat { executor_id: ID },
            E::ExecutorTasks { executor_id: ID },
            E::ExecutorSiblings { executor_id: ID },
            E::SetTaskStatus { executor_id: ID, task_id: ID },
            E::SetTaskStatuses { executor_id: ID },
            E::AppendLog { executor_id: ID, task_id: ID, step: ID },
            E::UploadArchive { executor_id: ID, task_id: ID, step: ID },
            E::DownloadArchive { executor_id: ID, task_id: ID, step: ID },
            E::UploadCache { executor_id: ID },
            E::DownloadCache { executor_id: ID },
            E::MatchCache { executor_id: ID },
            E::Ui { path: PATH },
            E::UiHead { path: PATH },
        ]);
        every
    }
}

/// The `Allow` header of a 405: the path's methods.
pub(crate) fn allow(at: &[Endpoint<'_>]) -> String {
    at.iter().map(Endpoint::method).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::Access::{Anyone, Api, Cluster, Executor};
    use super::*;

    const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];

    /// Every route, as (method, path template, label, access, open in maintenance): the
    /// answers the hand-kept `route_label`, `required_token` and `open_in_maintenance`
    /// gave before this table (except `export`/`import`, labelled `other` then).
    #[rustfmt::skip]
    const ROUTES: &[(&str, &str, &str, Access, bool)] = &[
        ("GET", "/healthz", "healthz", Anyone, true),
        ("GET", "/readyz", "readyz", Anyone, true),
        ("GET", "/metrics", "metrics", Anyone, true),
        ("POST", "/raft/append", "raft", Cluster, true),
        ("POST", "/raft/vote", "raft", Cluster, true),
        ("POST", "/raft/snapshot", "raft", Cluster, true),
        ("POST", "/raft/leader", "raft", Cluster, true),
        ("POST", "/raft/elect", "raft", Cluster, true),
        ("GET", "/api/v1/cluster", "cluster", Api, true),
        ("POST", "/api/v1/cluster/init", "cluster", Api, true),
        ("POST", "/api/v1/cluster/learners", "cluster", Api, true),
        ("POST", "/api/v1/cluster/voters", "cluster", Api, true),
        ("DELETE", "/api/v1/cluster/nodes/{node_id}", "cluster", Api, true),
        ("GET", "/api/v1/kv", "kv", Api, false),
        ("POST", "/api/v1/kv", "kv", Api, false),
        ("GET", "/api/v1/kv/{key}", "kv", Api, false),
        ("PUT", "/api/v1/kv/{key}", "kv", Api, false),
        ("DELETE", "/api/v1/kv/{key}", "kv", Api, false),
        ("GET", "/api/v1/maintenance", "maintenance", Api, true),
        ("PUT", "/api/v1/maintenance", "maintenance", Api, true),
        ("DELETE", "/api/v1/maintenance", "maintenance", Api, true),
        ("GET", "/api/v1/export", "export", Api, true),
        ("POST", "/api/v1/import", "import", Api, true),
        ("GET", "/api/v1/runs", "runs", Api, false),
        ("POST", "/api/v1/runs", "runs", Api, false),
        ("GET", "/api/v1/runs/{run_id}", "runs", Api, false),
        ("DELETE", "/api/v1/runs/{run_id}", "runs", Api, false),
        ("PUT", "/api/v1/runs/{run_id}/actions", "runs", Api, false),
        ("GET", "/api/v1/runs/{run_id}/graph", "runs", Api, false),
        ("GET", "/api/v1/runs/{run_id}/tasks", "runs", Api, false),
        ("PUT", "/api/v1/runs/{run_id}/tasks/{task}/annotations", "runs", Api, false),
        ("PUT", "/api/v1/runs/{run_id}/tasks/{task}/actions", "runs", Api, false),
        ("GET", "/api/v1/runs/{run_id}/tasks/{task}/logs", "runs", Api, false),
        ("GET", "/api/v1/runs/{run_id}/tasks/{task}/workspace", "runs", Api, false),
        ("GET", "/api/v1/archive", "archive", Api, false),
        ("POST", "/api/v1/archive/index", "archive", Api, false),
        ("GET", "/api/v1/events", "events", Api, false),
        ("GET", "/api/v1/executors", "executors", Api, false),
        ("DELETE", "/api/v1/executors/{executor_id}", "executors", Api, false),
        ("GET", "/api/v1/openapi.json", "openapi", Api, true),
        ("PUT", "/api/v1/executor/{executor_id}", "executor", Executor, true),
        ("GET", "/api/v1/executor/{executor_id}/tasks", "executor", Executor, true),
        ("GET", "/api/v1/executor/{executor_id}/siblings", "executor", Executor, true),
        ("PUT", "/api/v1/executor/{executor_id}/tasks/{task_id}", "executor", Executor, true),
        ("PUT", "/api/v1/executor/{executor_id}/tasks", "executor", Executor, true),
        ("POST", "/api/v1/executor/{executor_id}/tasks/{task_id}/logs/{step}", "executor", Executor, true),
        ("PUT", "/api/v1/executor/{executor_id}/tasks/{task_id}/archives/{step}", "executor", Executor, true),
        ("GET", "/api/v1/executor/{executor_id}/archives/{task_id}/{step}", "executor", Executor, true),
        ("PUT", "/api/v1/executor/{executor_id}/caches", "executor", Executor, true),
        ("GET", "/api/v1/executor/{executor_id}/caches", "executor", Executor, true),
        ("GET", "/api/v1/executor/{executor_id}/caches/match", "executor", Executor, true),
        ("GET", "/ui/{path}", "ui", Anyone, true),
        ("HEAD", "/ui/{path}", "ui", Anyone, true),
    ];

    /// A request path for a template: `{name}` becomes `x-name` (a `{key}` two segments,
    /// `x-key/y`, as keys may have).
    fn example(template: &str) -> Vec<String> {
        template
            .trim_start_matches('/')
            .split('/')
            .flat_map(|s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some("key") => vec!["x-key".to_string(), "y".to_string()],
                Some(name) => vec![format!("x-{name}")],
                None => vec![s.to_string()],
            })
            .collect()
    }

    fn method(m: &str) -> Method {
        Method::from_bytes(m.as_bytes()).unwrap()
    }

    /// The role table of `docs/security.md`, written independently of `need()`: every
    /// route × every role is allowed or refused as documented.
    #[test]
    fn every_route_and_every_role_is_allowed_or_refused_as_documented() {
        use crate::auth::Role;
        const ADMIN: &[(&str, &str)] = &[
            ("POST", "/api/v1/cluster/init"),
            ("POST", "/api/v1/cluster/learners"),
            ("POST", "/api/v1/cluster/voters"),
            ("DELETE", "/api/v1/cluster/nodes/{node_id}"),
            ("PUT", "/api/v1/maintenance"),
            ("DELETE", "/api/v1/maintenance"),
            ("GET", "/api/v1/export"),
            ("POST", "/api/v1/import"),
            ("POST", "/api/v1/archive/index"),
            ("DELETE", "/api/v1/executors/{executor_id}"),
        ];
        let roles = [Role::Read, Role::Write, Role::Admin, Role::Executor, Role::Cluster];
        for &(m, template, _, access, _) in ROUTES {
            let expected = match access {
                Anyone => Need::Nothing,
                Cluster => Need::Cluster,
                Executor => Need::Executor,
                Api if ADMIN.contains(&(m, template)) => Need::Admin,
                Api if m == "GET" => Need::Read,
                Api => Need::Write,
            };
            let owned = example(template);
            let path: Vec<&str> = owned.iter().map(String::as_str).collect();
            let e = Endpoint::parse(&method(m), &path).unwrap();
            for role in roles {
                assert_eq!(role.may(e.need()), role.may(expected), "{} on {m} {template}", role.name());
            }
        }
    }

    #[test]
    fn every_route_parses_back_to_itself_with_todays_label_token_and_maintenance() {
        for &(m, template, label, access, open) in ROUTES {
            let owned = example(template);
            let path: Vec<&str> = owned.iter().map(String::as_str).collect();
            let e = Endpoint::parse(&method(m), &path)
                .unwrap_or_else(|no| panic!("{m} {template}: {no:?} for /{}", path.join("/")));
            assert_eq!(e.template(), (m, template), "{m} /{} parsed as {e:?}", path.join("/"));
            // Every parameter of the template is captured by the variant.
            let debug = format!("{e:?}");
            for value in path.iter().filter(|s| s.starts_with("x-")) {
                assert!(debug.contains(value), "{m} {template}: {debug} lost {value}");
            }
            assert_eq!(e.label(), label, "{m} {template}");
            assert_eq!(e.access(), access, "{m} {template}");
            assert_eq!(
                Access::of_path(&path),
                access,
                "{m} {template}: the path's prefix asks another token"
            );
            assert_eq!(e.open_in_maintenance(), open, "{m} {template}");
            let streamed = matches!(e, Endpoint::UploadArchive { .. } | Endpoint::UploadCache { .. });
            assert_eq!(e.body() == Body::Streamed, streamed, "{m} {template}");
        }
    }

    /// `spec` is an exhaustive `match`, so the compiler makes a new variant give it an
    /// arm; this makes that arm a row of `ROUTES`, so the tests above walk every variant.
    #[test]
    fn routes_has_one_row_per_arm_of_spec() {
        let src = include_str!("routes.rs");
        let body = src.split("fn spec(").nth(1).unwrap().split("struct Spec {").next().unwrap();
        // rustfmt may break a long row over lines: one space between tokens.
        let body = body.split_whitespace().collect::<Vec<_>>().join(" ").replace("( \"", "(\"");
        let mut arms: Vec<(&str, &str)> = body
            .split("(\"")
            .skip(1)
            .map(|piece| {
                let (m, rest) = piece.split_once('"').unwrap();
                (m, rest.trim_start_matches(", \"").split('"').next().unwrap())
            })
            .collect();
        let mut rows: Vec<(&str, &str)> = ROUTES.iter().map(|r| (r.0, r.1)).collect();
        arms.sort_unstable();
        rows.sort_unstable();
        let unique = rows.len();
        rows.dedup();
        assert_eq!(rows.len(), unique, "a route is listed twice in ROUTES");
        assert_eq!(rows, arms, "ROUTES and the arms of Endpoint::spec differ");
    }

    #[test]
    fn every_lists_each_row_of_routes_once() {
        let mut every: Vec<(&str, &str)> = Endpoint::every().iter().map(Endpoint::template).collect();
        let mut rows: Vec<(&str, &str)> = ROUTES.iter().map(|r| (r.0, r.1)).collect();
        every.sort_unstable();
        rows.sort_unstable();
        assert_eq!(every, rows);
    }

    #[test]
    fn other_methods_on_a_route_path_get_405_with_the_paths_methods() {
        for &(_, template, ..) in ROUTES {
            let owned = example(template);
            let path: Vec<&str> = owned.iter().map(String::as_str).collect();
            let mut methods: Vec<&str> = ROUTES.iter().filter(|r| r.1 == template).map(|r| r.0).collect();
            methods.sort_unstable();
            for m in METHODS {
                match Endpoint::parse(&method(m), &path) {
                    Ok(e) => assert!(methods.contains(&m) && e.template() == (m, template), "{m} {template}"),
                    Err(NoRoute::MethodNotAllowed { at }) => {
                        assert!(!methods.contains(&m), "{m} {template} is a route");
                        let header = allow(&at);
                        let mut allowed: Vec<&str> = header.split(", ").collect();
                        allowed.sort_unstable();
                        assert_eq!(allowed, methods, "Allow of {m} {template}");
                        // The token asked before the 405 is the routes' own.
                        assert!(at.iter().all(|e| e.access() == Access::of_path(&path)));
                    }
                    Err(NoRoute::NotFound) => panic!("{m} {template}: 404 for a route's path"),
                }
            }
        }
    }

    #[test]
    fn the_two_drifted_cases_get_405() {
        let cases: [(&str, &[&str], &str); 2] = [
            ("POST", &["api", "v1", "executor", "e1", "siblings"], "GET"),
            ("PUT", &["api", "v1", "runs", "1", "tasks", "a", "logs"], "GET"),
        ];
        for (m, path, allowed) in cases {
            match Endpoint::parse(&method(m), path) {
                Err(NoRoute::MethodNotAllowed { at }) => assert_eq!(allow(&at), allowed),
                other => panic!("{m} /{}: {other:?}", path.join("/")),
            }
        }
    }

    #[test]
    fn paths_no_route_has_are_404_with_the_prefixs_token() {
        let cases: [(&[&str], Access); 12] = [
            (&[], Access::Anyone),
            (&["api"], Access::Anyone),
            (&["api", "v2", "runs"], Access::Anyone),
            (&["healthz", "x"], Access::Anyone),
            (&["raft"], Access::Cluster),
            (&["raft", "bogus"], Access::Cluster),
            (&["api", "v1"], Access::Api),
            (&["api", "v1", "nothing"], Access::Api),
            (&["api", "v1", "cluster", "nodes"], Access::Api),
            (&["api", "v1", "runs", "1", "tasks", "a", "bogus"], Access::Api),
            (&["api", "v1", "executor"], Access::Executor),
            (&["api", "v1", "executor", "e1", "caches", "nope"], Access::Executor),
        ];
        for (path, access) in cases {
            for m in METHODS {
                assert!(
                    matches!(Endpoint::parse(&method(m), path), Err(NoRoute::NotFound)),
                    "{m} /{}",
                    path.join("/")
                );
            }
            assert_eq!(Access::of_path(path), access, "/{}", path.join("/"));
        }
    }

    #[test]
    fn body_limits_are_the_raft_import_and_api_ones() {
        let raft = Endpoint::Raft { rpc: RpcKind::Append };
        assert_eq!(raft.body().max_bytes(), Some(MAX_RAFT_BODY_BYTES));
        assert_eq!(Endpoint::Import.body().max_bytes(), Some(MAX_IMPORT_BYTES));
        assert_eq!(Endpoint::KvPut { key: &["k"] }.body().max_bytes(), Some(MAX_API_BODY_BYTES));
        assert_eq!(Endpoint::UploadCache { executor_id: "e" }.body().max_bytes(), None);
    }
}
