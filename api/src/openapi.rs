//! `GET /api/v1/openapi.json`: the API described as OpenAPI 3.1, generated from the code.
//!
//! The operations come from the route table ([`Endpoint::every`], each with its method
//! and path template); what each one takes and answers is [`Endpoint::doc`], one
//! exhaustive `match` (a new route does not compile without it). The JSON schemas are
//! derived from the serde types themselves (`utoipa::ToSchema`, which reads the serde
//! attributes), so a renamed or added field changes the document with the code. The error
//! answers of an operation follow from the table too: the token it asks for, whether it
//! has path parameters, whether it writes, whether it reads a body.

use std::borrow::Cow;
use std::collections::BTreeMap;

use flotilla_client::types as t;
use serde_json::{json, Map, Value};
use utoipa::openapi::{RefOr, Schema};
use utoipa::ToSchema;

use crate::auth::Need;
use crate::routes::{Access, Body, Endpoint};
use crate::ui::RunGraph;

/// A JSON shape named in `components.schemas`, with the shapes it refers to.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    name: fn() -> Cow<'static, str>,
    collect: fn(&mut Vec<(String, RefOr<Schema>)>),
}

fn shape<T: ToSchema>() -> Shape {
    Shape {
        name: T::name,
        collect: |into| {
            into.push((T::name().into_owned(), T::schema()));
            T::schemas(into);
        },
    }
}

/// What a request carries or an answer holds.
#[derive(Clone)]
pub(crate) enum Content {
    /// `application/json` of one shape.
    Json(Shape),
    /// `application/json` of one of these shapes.
    JsonOneOf(Vec<Shape>),
    /// A JSON object with no schema of its own (this document).
    AnyJson,
    /// Bytes of this media type (logs, archives, an export, Raft's msgpack).
    Bytes(&'static str),
    /// Text of this media type (metrics, the event stream, the dashboard's files).
    Text(&'static str),
}

/// A query parameter: name, JSON type (`string`, `integer`, `boolean`), whether it is
/// required, and what it does.
pub(crate) type Query = (&'static str, &'static str, bool, &'static str);

/// What an operation takes and answers (the route table gives its method, path and
/// token; [`errors`] its refusals).
pub(crate) struct Doc {
    pub summary: &'static str,
    pub query: &'static [Query],
    /// A request header: name and what it does.
    pub header: Option<(&'static str, &'static str)>,
    pub body: Option<Content>,
    /// Success answers: status, what it means, and the content (`None`: no body).
    pub ok: Vec<(u16, &'static str, Option<Content>)>,
}

const STALE: Query = (
    "stale",
    "boolean",
    false,
    "Answer from this node's applied state without confirming leadership (may lag).",
);

/// The refusals an operation documents, each answered with an `Error` body. They follow
/// from the route table: every request may be refused a malformed query (400); a route
/// asking a token may be refused 401/403 and answered 503 when no leader or quorum can
/// be reached (or, outside the routes open in maintenance, during maintenance); a path
/// parameter names something that may not exist (404); a write may conflict (409) or
/// name what does not exist (404); a body may be malformed (400) or too large (413).
pub(crate) fn errors(e: &Endpoint<'_>) -> Vec<u16> {
    let (method, template) = e.template();
    let mut codes = vec![400];
    if e.access() != Access::Anyone {
        codes.extend([401, 403, 503]);
    }
    let writes = method != "GET" && method != "HEAD";
    if (template.contains('{') && !template.starts_with("/ui/")) || (writes && e.access() == Access::Api) {
        codes.push(404);
    }
    if writes && e.access() != Access::Cluster {
        codes.push(409);
    }
    if writes {
        codes.push(413);
    }
    if matches!(e, Endpoint::CreateRun) {
        codes.push(422);
    }
    codes.sort_unstable();
    codes.dedup();
    codes
}

/// The document as served, built once.
pub(crate) fn bytes() -> &'static [u8] {
    static DOCUMENT: std::sync::LazyLock<Vec<u8>> =
        std::sync::LazyLock::new(|| serde_json::to_vec(&document()).expect("the document is JSON"));
    &DOCUMENT
}

/// The whole document.
pub(crate) fn document() -> Value {
    let mut schemas: Vec<(String, RefOr<Schema>)> = Vec::new();
    (shape::<t::ErrorBody>().collect)(&mut schemas);
    let mut paths: BTreeMap<&'static str, Map<String, Value>> = BTreeMap::new();
    for e in Endpoint::every() {
        let (method, template) = e.template();
        let doc = e.doc();
        let mut op = Map::new();
        op.insert("operationId".into(), json!(operation_id(method, template)));
        op.insert("summary".into(), json!(doc.summary));
        let who = match e.need() {
            Need::Nothing => "No token needed.".to_string(),
            need => format!("Needs a bearer token whose role allows `{}` (docs/security.md).", need.name()),
        };
        op.insert("description".into(), json!(who));
        op.insert("tags".into(), json!([e.label()]));
        let mut params: Vec<Value> = path_params(template)
            .map(|name| {
                json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "minLength": 1},
                       "description": param_description(name)})
            })
            .collect();
        for &(name, kind, required, what) in doc.query {
            params.push(json!({"name": name, "in": "query", "required": required,
                               "schema": {"type": kind}, "description": what}));
        }
        if let Some((name, what)) = doc.header {
            params.push(json!({"name": name, "in": "header", "required": false,
                               "schema": {"type": "string", "maxLength": 256}, "description": what}));
        }
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(body) = doc.body {
            let limit = match e.body() {
                Body::Streamed => "streamed, up to the archive size limit".to_string(),
                b => format!("up to {} bytes", b.max_bytes().unwrap_or_default()),
            };
            op.insert(
                "requestBody".into(),
                json!({"required": true, "description": limit, "content": content(body, &mut schemas)}),
            );
        }
        let mut responses = Map::new();
        for (status, what, body) in doc.ok {
            let mut r = json!({"description": what});
            if let Some(body) = body {
                r["content"] = content(body, &mut schemas);
            }
            responses.insert(status.to_string(), r);
        }
        for code in errors(&e) {
            responses.entry(code.to_string()).or_insert_with(|| {
                json!({"description": error_description(code),
                       "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
            });
        }
        op.insert("responses".into(), Value::Object(responses));
        let security = match e.access() {
            Access::Anyone => json!([]),
            _ => json!([{"bearer": []}]),
        };
        op.insert("security".into(), security);
        paths.entry(template).or_default().insert(method.to_ascii_lowercase(), Value::Object(op));
    }
    let schemas: Map<String, Value> = schemas
        .into_iter()
        .map(|(name, schema)| (name, serde_json::to_value(schema).expect("a schema is JSON")))
        .collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "flotilla",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "A run scheduler: runs are DAGs of tasks run in Docker containers by \
                executors; servers keep the state replicated with Raft. Every route of a node, \
                generated from its route table and its serde types. Each operation's description \
                names the token role it needs (docs/security.md).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}

fn content(c: Content, schemas: &mut Vec<(String, RefOr<Schema>)>) -> Value {
    let mut reference = |s: Shape| {
        (s.collect)(schemas);
        json!({"$ref": format!("#/components/schemas/{}", (s.name)())})
    };
    match c {
        Content::Json(s) => json!({"application/json": {"schema": reference(s)}}),
        Content::JsonOneOf(shapes) => {
            let one_of: Vec<Value> = shapes.into_iter().map(&mut reference).collect();
            json!({"application/json": {"schema": {"oneOf": one_of}}})
        }
        Content::AnyJson => json!({"application/json": {"schema": {"type": "object"}}}),
        Content::Bytes(media) => json!({media: {"schema": {"type": "string", "contentMediaType": media}}}),
        Content::Text(media) => json!({media: {"schema": {"type": "string"}}}),
    }
}

fn path_params(template: &str) -> impl Iterator<Item = &str> {
    template.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

fn param_description(name: &str) -> &'static str {
    match name {
        "run_id" => "A run's id.",
        "task" => "A task's name in the run.",
        "task_id" => "An executor task's id.",
        "executor_id" => "An executor's id.",
        "node_id" => "A Raft node id.",
        "step" => "A step's number (from 0), or `setup`.",
        "key" => "The key: the rest of the path, slashes included.",
        "path" => "A file of the dashboard, or a page of it (its deep links).",
        _ => "",
    }
}

fn operation_id(method: &str, template: &str) -> String {
    let words: Vec<String> = template
        .split(['/', '.', '_'])
        .filter(|s| !s.is_empty() && *s != "api" && *s != "v1")
        .map(|s| s.trim_start_matches('{').trim_end_matches('}'))
        .map(|s| {
            let mut c = s.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect();
    format!("{}{}", method.to_ascii_lowercase(), words.concat())
}

fn error_description(code: u16) -> &'static str {
    match code {
        400 => "The request is malformed: its query, path or body (the message says which).",
        401 => "No token, or an unknown one.",
        403 => "The token's role does not allow this operation.",
        404 => "What the path names does not exist.",
        409 => "The request conflicts with the current state (phase, revision, maintenance).",
        413 => "The body is larger than this operation accepts.",
        422 => "The idempotency key was used before with another body.",
        503 => "No leader or quorum can be reached in time, or the node is in maintenance.",
        _ => "Refused.",
    }
}

impl Endpoint<'_> {
    /// What this operation takes and answers, for the OpenAPI document.
    pub(crate) fn doc(&self) -> Doc {
        use Content::{Bytes, Json, JsonOneOf, Text};
        use Endpoint as E;
        const NONE: &[Query] = &[];
        let no_content = || vec![(204, "Done.", None)];
        let d = |summary, query, body, ok| Doc { summary, query, header: None, body, ok };
        match self {
            E::Healthz => d("The process is up.", NONE, None, vec![(200, "Up.", Some(Json(shape::<t::Health>())))]),
            E::Readyz => d(
                "The node is ready: it knows a leader (a leader: it hears from a quorum) and has applied the log.",
                NONE,
                None,
                vec![
                    (200, "Ready.", Some(Json(shape::<t::Ready>()))),
                    (503, "Not ready (no leader known, no quorum, or far behind the log).", Some(Json(shape::<t::Ready>()))),
                ],
            ),
            E::Metrics => d("Prometheus metrics.", NONE, None, vec![(200, "The metrics.", Some(Text("text/plain")))]),
            E::Raft { .. } => d(
                "A Raft RPC between nodes (cluster token; msgpack).",
                NONE,
                Some(Bytes("application/msgpack")),
                vec![(200, "The RPC's answer.", Some(Bytes("application/msgpack")))],
            ),
            E::ClusterStatus => d(
                "This node's view of the cluster: leader, term, indexes, members and their lag, quorum.",
                &[STALE],
                None,
                vec![(200, "The cluster.", Some(Json(shape::<t::ClusterStatus>())))],
            ),
            E::ClusterInit => d(
                "Initialise a new cluster with these voters (admin).",
                NONE,
                Some(Json(shape::<t::InitRequest>())),
                vec![(200, "The cluster.", Some(Json(shape::<t::ClusterStatus>())))],
            ),
            E::AddLearner => d(
                "Add a node as a learner (admin); it catches up from the leader.",
                NONE,
                Some(Json(shape::<t::AddLearnerRequest>())),
                vec![(200, "The cluster.", Some(Json(shape::<t::ClusterStatus>())))],
            ),
            E::SetVoters => d(
                "Make exactly these nodes the voters (admin).",
                NONE,
                Some(Json(shape::<t::VotersRequest>())),
                vec![(200, "The cluster.", Some(Json(shape::<t::ClusterStatus>())))],
            ),
            E::RemoveNode { .. } => d("Remove a node from the cluster (admin).", NONE, None, no_content()),
            E::KvList => d(
                "Keys in byte order, one page.",
                &[
                    ("prefix", "string", false, "Only keys starting with this."),
                    ("start_after", "string", false, "Continue after this key."),
                    ("limit", "integer", false, "At most this many items."),
                    STALE,
                ],
                None,
                vec![(200, "A page of keys.", Some(Json(shape::<t::KvList>())))],
            ),
            E::KvPuts => d(
                "Set several keys (at most 256, one per key), each as its own put would be.",
                NONE,
                Some(Json(shape::<t::KvPuts>())),
                vec![(200, "Each put's outcome, in order.", Some(Json(shape::<t::KvPutOutcomes>())))],
            ),
            E::KvGet { .. } => {
                d("A key's value.", &[STALE], None, vec![(200, "The item.", Some(Json(shape::<t::KvItem>())))])
            }
            E::KvPut { .. } => d(
                "Set a key (compare-and-set with prev_revision).",
                &[("prev_revision", "integer", false, "Only if the key's revision is this (0: absent).")],
                Some(Json(shape::<t::KvPutRequest>())),
                vec![(200, "The new revision.", Some(Json(shape::<t::Revision>())))],
            ),
            E::KvDelete { .. } => d(
                "Delete a key (compare-and-delete with prev_revision).",
                &[("prev_revision", "integer", false, "Only if the key's revision is this.")],
                None,
                no_content(),
            ),
            E::MaintenanceStatus => d(
                "The maintenance flag, and each node's applied view of it (with local: this node's).",
                &[("local", "boolean", false, "This node's applied flag only."), STALE],
                None,
                vec![(200, "The flag.", Some(JsonOneOf(vec![shape::<t::Maintenance>(), shape::<t::LocalMaintenance>()])))],
            ),
            E::MaintenanceEnable => d("Enter maintenance: the scheduler pauses (admin).", NONE, None, no_content()),
            E::MaintenanceDisable => d("Leave maintenance (admin).", NONE, None, no_content()),
            E::Export => d(
                "A consistent export of the whole state and archive (admin).",
                &[STALE],
                None,
                vec![(200, "The export file.", Some(Bytes("application/octet-stream")))],
            ),
            E::Import => d(
                "Replace the state with an export file, in maintenance only (admin).",
                NONE,
                Some(Bytes("application/octet-stream")),
                no_content(),
            ),
            E::ListRuns => d(
                "Live and archived runs, newest first, one page.",
                &[
                    ("group", "string", false, "Only runs of this group or below it."),
                    ("phase", "string", false, "Only runs in this phase."),
                    ("start", "string", false, "Continue after this run id."),
                    ("asc", "boolean", false, "Oldest first."),
                    ("limit", "integer", false, "At most this many runs."),
                    STALE,
                ],
                None,
                vec![(200, "A page of runs.", Some(Json(shape::<t::RunList>())))],
            ),
            E::CreateRun => Doc {
                summary: "Create a run from its definition (write).",
                query: NONE,
                header: Some((
                    "Idempotency-Key",
                    "A retry with the same key and body within 24 h answers the first run (200, \
                     Idempotent-Replayed: true) instead of creating another.",
                )),
                body: Some(Json(shape::<t::RunCreate>())),
                ok: vec![(201, "The new run.", Some(Json(shape::<t::Run>()))), (200, "The run this key created before.", Some(Json(shape::<t::Run>())))],
            },
            E::GetRun { .. } => d("A run, live or archived.", &[STALE], None, vec![(200, "The run.", Some(Json(shape::<t::Run>())))]),
            E::DeleteRun { .. } => d("Delete a finished run (write).", NONE, None, no_content()),
            E::RunAction { .. } => d(
                "stop or cancel a run, or restart a finished one (write).",
                NONE,
                Some(JsonOneOf(vec![shape::<t::ActionRequest>(), shape::<t::RestartRequest>()])),
                vec![(204, "Stopped or cancelled.", None), (201, "The restarted run.", Some(Json(shape::<t::Run>())))],
            ),
            E::RunGraph { .. } => d(
                "A run's task graph as the dashboard draws it (names, dependencies, layers, step labels).",
                &[STALE],
                None,
                vec![(200, "The graph.", Some(Json(shape::<RunGraph>())))],
            ),
            E::RunTasks { .. } => d(
                "A run's tasks in DAG order with their steps.",
                &[STALE],
                None,
                vec![(200, "The tasks.", Some(Json(shape::<t::RunOutline>())))],
            ),
            E::TaskAnnotations { .. } => d(
                "Merge annotations into a task (write).",
                NONE,
                Some(Json(shape::<t::AnnotationsRequest>())),
                no_content(),
            ),
            E::TaskAction { .. } => d(
                "approve a task waiting for approval (write; the token's name is the approver).",
                NONE,
                Some(Json(shape::<t::ActionRequest>())),
                no_content(),
            ),
            E::TaskLogs { .. } => d(
                "A step's log (or a service container's), live or stored.",
                &[
                    ("step", "string", false, "A step's number, its name, or `setup` (default: the first run step, or the failing one)."),
                    ("container", "string", false, "A service container's whole output instead of a step's."),
                    ("follow", "boolean", false, "Keep the answer open while the step runs."),
                    STALE,
                ],
                None,
                vec![(200, "The log.", Some(Bytes("application/octet-stream")))],
            ),
            E::TaskWorkspace { .. } => d(
                "A task's saved workspace as a tar stream, or one file of it.",
                &[("path", "string", false, "Only this file of the workspace."), STALE],
                None,
                vec![(200, "The workspace.", Some(Bytes("application/x-tar")))],
            ),
            E::ArchiveStatus => d(
                "The archive: files, runs and bytes in the object storage.",
                &[STALE],
                None,
                vec![(200, "The archive.", Some(Json(shape::<t::ArchiveStatus>())))],
            ),
            E::DumpArchiveIndex => d(
                "Write the full run index to the object storage (admin).",
                &[STALE],
                None,
                vec![(200, "Where it was written.", Some(Json(shape::<t::IndexDumped>())))],
            ),
            E::Events => d(
                "Server-sent events: every run and task change this node applies from now on.",
                &[("group", "string", false, "Only runs of this group or below it.")],
                None,
                vec![(200, "The event stream (`id` = revision, `event` = run or task, `data` = an Event).", Some(Text("text/event-stream")))],
            ),
            E::ListExecutors => d(
                "The registered executors.",
                &[STALE],
                None,
                vec![(200, "The executors.", Some(Json(shape::<t::ExecutorList>())))],
            ),
            E::DeleteExecutor { .. } => d("Forget an executor (admin).", NONE, None, no_content()),
            E::OpenApi => d(
                "This document.",
                NONE,
                None,
                vec![(200, "The OpenAPI 3.1 document.", Some(Content::AnyJson))],
            ),
            E::ExecutorHeartbeat { .. } => d(
                "Register an executor or renew its lease (executor token).",
                NONE,
                Some(Json(shape::<t::ExecutorInfo>())),
                no_content(),
            ),
            E::ExecutorTasks { .. } => d(
                "An executor's tasks, once they changed past `since` (long poll).",
                &[
                    ("since", "integer", false, "The revision the executor has."),
                    ("wait_ms", "integer", false, "Wait this long for a change (at most 60000)."),
                    ("data", "string", false, "`all` (default): every task's `spec.data`; `notstarted`: only for the tasks that have not started."),
                    STALE,
                ],
                None,
                vec![(200, "The tasks.", Some(Json(shape::<t::ExecutorTasks>())))],
            ),
            E::ExecutorSiblings { .. } => d(
                "The executors of the caller's group.",
                &[STALE],
                None,
                vec![(200, "Their ids.", Some(Json(shape::<t::Siblings>())))],
            ),
            E::SetTaskStatus { .. } => d(
                "Report an executor task's status.",
                NONE,
                Some(Json(shape::<t::ExecutorTaskStatus>())),
                no_content(),
            ),
            E::SetTaskStatuses { .. } => d(
                "Report several executor tasks' statuses (at most 256, one per task), each as its own report would be.",
                NONE,
                Some(Json(shape::<t::TaskReports>())),
                vec![(200, "Each report's outcome, in order.", Some(Json(shape::<t::TaskReportOutcomes>())))],
            ),
            E::AppendLog { .. } => d(
                "Append to a step's log from `offset`; `final` stores it.",
                &[
                    ("offset", "integer", true, "Where these bytes start in the log."),
                    ("final", "boolean", false, "This is the end of the log."),
                ],
                Some(Bytes("application/octet-stream")),
                vec![(200, "What the server holds.", Some(Json(shape::<t::LogAppended>())))],
            ),
            E::UploadArchive { .. } => d(
                "Store a step's workspace archive.",
                NONE,
                Some(Bytes("application/octet-stream")),
                vec![(201, "Stored.", Some(Json(shape::<t::Stored>())))],
            ),
            E::DownloadArchive { .. } => d(
                "A stored workspace archive.",
                NONE,
                None,
                vec![(200, "The archive.", Some(Bytes("application/octet-stream")))],
            ),
            E::UploadCache { .. } => d(
                "Store a cache (the first save of a key wins).",
                &[("group", "string", true, "The cache group."), ("key", "string", true, "The cache key.")],
                Some(Bytes("application/octet-stream")),
                vec![(201, "Stored.", Some(Json(shape::<t::Stored>()))), (200, "Kept: the key was saved before.", Some(Json(shape::<t::Stored>())))],
            ),
            E::DownloadCache { .. } => d(
                "A stored cache.",
                &[("group", "string", true, "The cache group."), ("key", "string", true, "The cache key.")],
                None,
                vec![(200, "The cache.", Some(Bytes("application/octet-stream")))],
            ),
            E::MatchCache { .. } => d(
                "The first cache key (in byte order) starting with a prefix.",
                &[("group", "string", true, "The cache group."), ("prefix", "string", false, "The key's prefix.")],
                None,
                vec![(200, "The key, or null.", Some(Json(shape::<t::CacheMatch>())))],
            ),
            E::Ui { .. } => d(
                "The dashboard: its files, or the page for a deep link.",
                NONE,
                None,
                vec![(200, "A file of the dashboard.", Some(Text("text/html")))],
            ),
            E::UiHead { .. } => d("The dashboard's files, headers only.", NONE, None, vec![(200, "Found.", None)]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_an_operation_of_the_document_and_nothing_else_is() {
        let doc = document();
        let mut listed: Vec<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object().unwrap().keys().map(|m| (m.to_uppercase(), path.clone()))
            })
            .collect();
        let mut routes: Vec<(String, String)> = Endpoint::every()
            .iter()
            .map(|e| (e.template().0.to_string(), e.template().1.to_string()))
            .collect();
        listed.sort();
        routes.sort();
        assert_eq!(listed, routes);
    }

    #[test]
    fn every_reference_resolves_and_every_operation_documents_its_errors() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for piece in text.split("\"#/components/schemas/").skip(1) {
            let name = piece.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "{name} is referred to but not in components");
        }
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                assert!(responses.contains_key("400"), "{method} {path}");
                if path.starts_with("/api/") {
                    for code in ["401", "403", "503"] {
                        assert!(responses.contains_key(code), "{method} {path} lacks {code}");
                    }
                }
                for name in path_params(path) {
                    let params = op["parameters"].as_array().unwrap();
                    assert!(params.iter().any(|p| p["name"] == name && p["in"] == "path"), "{method} {path}");
                }
            }
        }
        // The shapes carry their serde names: a run's definition has its tasks, a step is
        // externally tagged, an error has code and message.
        assert!(schemas["RunCreate"]["properties"]["tasks"].is_object());
        assert_eq!(schemas["ErrorBody"]["required"], json!(["code", "message"]));
        assert!(schemas["Run"]["properties"]["phase"].is_object());
        // Each operation names the role its token needs.
        let create = doc["paths"]["/api/v1/runs"]["post"]["description"].as_str().unwrap();
        assert!(create.contains("`write`"), "{create}");
        assert_eq!(doc["paths"]["/healthz"]["get"]["description"], "No token needed.");
    }
}
