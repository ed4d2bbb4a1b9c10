//! A typed client of the public API. A refused request keeps the server's status, code and
//! message, so the CLI can print exactly what the server said.

use std::collections::BTreeMap;
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ErrorBody;
use crate::types::*;

/// Characters escaped in a key path segment ('/' is kept: keys may be paths).
/// Characters escaped in a single path segment.
const SEGMENT: &AsciiSet = &KEY.add(b'/');

const KEY: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}');

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{message} (HTTP {status}, {code})")]
    Api { status: u16, code: String, message: String },
    /// The server could not be reached or the answer could not be read.
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            ClientError::Transport { .. } => None,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(60))
            .build()
            .expect("static client settings");
        Client { base: base.trim_end_matches('/').to_string(), token, http }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Option<T>, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let transport =
            |e: reqwest::Error| ClientError::Transport { url: url.clone(), message: e.to_string() };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(transport)?;
        if !(200..300).contains(&status) {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => ClientError::Api { status, code: e.code, message: e.message },
                Err(_) => ClientError::Api {
                    status,
                    code: "unknown".into(),
                    message: String::from_utf8_lossy(&bytes).chars().take(300).collect(),
                },
            });
        }
        if status == 204 || bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes).map(Some).map_err(|e| ClientError::Transport {
            url: url.clone(),
            message: format!("unreadable answer: {e}"),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send::<T>(reqwest::Method::GET, path, None::<&()>).await?.ok_or_else(|| self.empty(path))
    }

    async fn with_body<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.send::<T>(method, path, Some(body)).await?.ok_or_else(|| self.empty(path))
    }

    async fn no_content(&self, method: reqwest::Method, path: &str) -> Result<(), ClientError> {
        self.send::<serde_json::Value>(method, path, None::<&()>).await.map(|_| ())
    }

    fn empty(&self, path: &str) -> ClientError {
        ClientError::Transport { url: format!("{}{}", self.base, path), message: "empty answer".into() }
    }

    fn key_path(key: &str) -> String {
        format!("/api/v1/kv/{}", utf8_percent_encode(key.trim_start_matches('/'), KEY))
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/healthz").await
    }

    pub async fn kv_put(
        &self,
        key: &str,
        value: &str,
        prev_revision: Option<u64>,
    ) -> Result<u64, ClientError> {
        let mut path = Self::key_path(key);
        if let Some(p) = prev_revision {
            path.push_str(&format!("?prev_revision={p}"));
        }
        let r: Revision =
            self.with_body(reqwest::Method::PUT, &path, &KvPutRequest { value: value.into() }).await?;
        Ok(r.revision)
    }

    pub async fn kv_get(&self, key: &str, stale: bool) -> Result<KvItem, ClientError> {
        let mut path = Self::key_path(key);
        if stale {
            path.push_str("?stale=true");
        }
        self.get(&path).await
    }

    pub async fn kv_delete(&self, key: &str, prev_revision: Option<u64>) -> Result<(), ClientError> {
        let mut path = Self::key_path(key);
        if let Some(p) = prev_revision {
            path.push_str(&format!("?prev_revision={p}"));
        }
        self.no_content(reqwest::Method::DELETE, &path).await
    }

    pub async fn kv_list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        stale: bool,
    ) -> Result<KvList, ClientError> {
        let mut q = vec![("prefix", prefix.to_string()), ("limit", limit.to_string())];
        if let Some(a) = start_after {
            q.push(("start_after", a.to_string()));
        }
        if stale {
            q.push(("stale", "true".into()));
        }
        let qs = serde_urlencoded::to_string(&q).unwrap_or_default();
        self.get(&format!("/api/v1/kv?{qs}")).await
    }

    pub async fn maintenance(&self) -> Result<Maintenance, ClientError> {
        self.get("/api/v1/maintenance").await
    }

    pub async fn set_maintenance(&self, enabled: bool) -> Result<(), ClientError> {
        let method = if enabled { reqwest::Method::PUT } else { reqwest::Method::DELETE };
        self.no_content(method, "/api/v1/maintenance").await
    }

    pub async fn cluster(&self, stale: bool) -> Result<ClusterStatus, ClientError> {
        self.get(if stale { "/api/v1/cluster?stale=true" } else { "/api/v1/cluster" }).await
    }

    pub async fn cluster_init(&self, nodes: &[(u64, String)]) -> Result<ClusterStatus, ClientError> {
        let body = InitRequest { nodes: nodes.iter().map(|(id, a)| (id.to_string(), a.clone())).collect() };
        self.with_body(reqwest::Method::POST, "/api/v1/cluster/init", &body).await
    }

    pub async fn add_learner(&self, id: u64, addr: &str) -> Result<ClusterStatus, ClientError> {
        self.with_body(
            reqwest::Method::POST,
            "/api/v1/cluster/learners",
            &AddLearnerRequest { id, addr: addr.into() },
        )
        .await
    }

    pub async fn set_voters(&self, ids: &[u64]) -> Result<ClusterStatus, ClientError> {
        self.with_body(reqwest::Method::POST, "/api/v1/cluster/voters", &VotersRequest { ids: ids.to_vec() })
            .await
    }

    pub async fn remove_node(&self, id: u64) -> Result<(), ClientError> {
        self.no_content(reqwest::Method::DELETE, &format!("/api/v1/cluster/nodes/{id}")).await
    }

    async fn put_no_content(&self, path: &str, body: &impl Serialize) -> Result<(), ClientError> {
        self.send::<serde_json::Value>(reqwest::Method::PUT, path, Some(body)).await.map(|_| ())
    }

    fn seg(s: &str) -> String {
        utf8_percent_encode(s, SEGMENT).to_string()
    }

    pub async fn run_create(&self, create: &RunCreate) -> Result<Run, ClientError> {
        self.with_body(reqwest::Method::POST, "/api/v1/runs", create).await
    }

    pub async fn run_get(&self, id: &str) -> Result<Run, ClientError> {
        self.get(&format!("/api/v1/runs/{}", Self::seg(id))).await
    }

    pub async fn run_list(&self, q: &RunQuery) -> Result<RunList, ClientError> {
        let mut pairs = vec![("limit", q.limit.to_string())];
        if let Some(g) = &q.group {
            pairs.push(("group", g.clone()));
        }
        if let Some(p) = &q.phase {
            pairs.push(("phase", p.clone()));
        }
        if let Some(s) = &q.start {
            pairs.push(("start", s.clone()));
        }
        if q.asc {
            pairs.push(("asc", "true".into()));
        }
        let qs = serde_urlencoded::to_string(&pairs).unwrap_or_default();
        self.get(&format!("/api/v1/runs?{qs}")).await
    }

    pub async fn run_stop(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("/api/v1/runs/{}/actions", Self::seg(id));
        self.put_no_content(&path, &ActionRequest { action: "stop".into() }).await
    }

    pub async fn task_annotate(
        &self,
        id: &str,
        task: &str,
        annotations: BTreeMap<String, Option<String>>,
    ) -> Result<(), ClientError> {
        let path = format!("/api/v1/runs/{}/tasks/{}/annotations", Self::seg(id), Self::seg(task));
        self.put_no_content(&path, &AnnotationsRequest { annotations }).await
    }

    pub async fn task_approve(&self, id: &str, task: &str) -> Result<(), ClientError> {
        let path = format!("/api/v1/runs/{}/tasks/{}/actions", Self::seg(id), Self::seg(task));
        self.put_no_content(&path, &ActionRequest { action: "approve".into() }).await
    }

    pub async fn executors(&self) -> Result<ExecutorList, ClientError> {
        self.get("/api/v1/executors").await
    }

    pub async fn executor_delete(&self, id: &str) -> Result<(), ClientError> {
        self.no_content(reqwest::Method::DELETE, &format!("/api/v1/executors/{}", Self::seg(id))).await
    }

    /// Registers the executor or records its heartbeat.
    pub async fn executor_heartbeat(&self, id: &str, info: &ExecutorInfo) -> Result<(), ClientError> {
        self.put_no_content(&format!("/api/v1/executor/{}", Self::seg(id)), info).await
    }

    /// The executor's tasks, waiting up to `wait_ms` for a change after revision `since`.
    pub async fn executor_tasks(
        &self,
        id: &str,
        since: u64,
        wait_ms: u64,
    ) -> Result<ExecutorTasks, ClientError> {
        self.get(&format!("/api/v1/executor/{}/tasks?since={since}&wait_ms={wait_ms}", Self::seg(id))).await
    }

    pub async fn executor_task_status(
        &self,
        id: &str,
        task_id: &str,
        status: &ExecutorTaskStatus,
    ) -> Result<(), ClientError> {
        let path = format!("/api/v1/executor/{}/tasks/{}", Self::seg(id), Self::seg(task_id));
        self.put_no_content(&path, status).await
    }

    /// Subscribes to the event stream (optionally of one group and below).
    pub async fn events(&self, group: Option<&str>) -> Result<EventStream, ClientError> {
        let mut path = "/api/v1/events".to_string();
        if let Some(g) = group {
            path.push_str(&format!("?{}", serde_urlencoded::to_string([("group", g)]).unwrap_or_default()));
        }
        let url = format!("{}{}", self.base, path);
        let resp = self.open(reqwest::Method::GET, &path, None, None).await?;
        Ok(EventStream { resp, buf: Vec::new(), url })
    }

    /// Sends a request whose answer (or body) streams: no total timeout, only a connect
    /// timeout. A non-2xx answer becomes the server's error.
    async fn open(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<reqwest::Body>,
        size: Option<u64>,
    ) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}{}", self.base, path);
        let transport =
            |e: reqwest::Error| ClientError::Transport { url: url.clone(), message: e.to_string() };
        let http =
            reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build().map_err(transport)?;
        let mut req = http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(size) = size {
            req = req.header(reqwest::header::CONTENT_LENGTH, size);
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let bytes = resp.bytes().await.unwrap_or_default();
            let e: ErrorBody = serde_json::from_slice(&bytes).unwrap_or(ErrorBody {
                code: "unknown".into(),
                message: String::from_utf8_lossy(&bytes).into(),
            });
            return Err(ClientError::Api { status, code: e.code, message: e.message });
        }
        Ok(resp)
    }

    /// Deletes a finished run (live or archived).
    pub async fn run_delete(&self, id: &str) -> Result<(), ClientError> {
        self.no_content(reqwest::Method::DELETE, &format!("/api/v1/runs/{}", Self::seg(id))).await
    }

    /// The archive's state: `{generation, files, runs, bytes, runs_in_state}`.
    pub async fn archive_status(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/api/v1/archive").await
    }

    /// Dumps the full run index to the object storage now: `{key, runs, bytes}`.
    pub async fn archive_dump_index(&self) -> Result<serde_json::Value, ClientError> {
        self.with_body(reqwest::Method::POST, "/api/v1/archive/index", &serde_json::json!({})).await
    }

    /// The export of the whole replicated state (versioned, checksummed).
    pub async fn export(&self) -> Result<Download, ClientError> {
        let path = "/api/v1/export";
        Ok(Download {
            url: format!("{}{path}", self.base),
            resp: self.open(reqwest::Method::GET, path, None, None).await?,
        })
    }

    /// Replaces the whole state with an export (the cluster must be in maintenance).
    pub async fn import(&self, export: bytes::Bytes) -> Result<(), ClientError> {
        self.open(reqwest::Method::POST, "/api/v1/import", Some(export.into()), None).await.map(|_| ())
    }

    /// The registered executors of executor `id`'s group.
    pub async fn executor_siblings(&self, id: &str) -> Result<Siblings, ClientError> {
        self.get(&format!("/api/v1/executor/{}/siblings", Self::seg(id))).await
    }

    /// A step's log (`step` is a number or `setup`); with `follow`, streams until the step
    /// ends.
    pub async fn run_log(
        &self,
        id: &str,
        task: &str,
        step: &str,
        follow: bool,
    ) -> Result<Download, ClientError> {
        // An empty `step` leaves the choice to the server (the failing step of a failed
        // task, else the first `run` step).
        let mut params = vec![("follow", if follow { "true" } else { "false" })];
        if !step.is_empty() {
            params.push(("step", step));
        }
        let q = serde_urlencoded::to_string(params).unwrap_or_default();
        let path = format!("/api/v1/runs/{}/tasks/{}/logs?{q}", Self::seg(id), Self::seg(task));
        Ok(Download {
            url: format!("{}{path}", self.base),
            resp: self.open(reqwest::Method::GET, &path, None, None).await?,
        })
    }

    /// The saved workspace of a task as a plain tar stream, or with `path` one file of it.
    pub async fn task_workspace(
        &self,
        id: &str,
        task: &str,
        path: Option<&str>,
    ) -> Result<Download, ClientError> {
        let mut path_q = format!("/api/v1/runs/{}/tasks/{}/workspace", Self::seg(id), Self::seg(task));
        if let Some(p) = path {
            path_q = format!("{path_q}?{}", serde_urlencoded::to_string([("path", p)]).unwrap_or_default());
        }
        Ok(Download {
            url: format!("{}{path_q}", self.base),
            resp: self.open(reqwest::Method::GET, &path_q, None, None).await?,
        })
    }

    /// The tasks of a run in DAG order, with their dependencies and step names.
    pub async fn run_outline(&self, id: &str) -> Result<crate::tasks::RunOutline, ClientError> {
        self.get(&format!("/api/v1/runs/{}/tasks", Self::seg(id))).await
    }

    /// Appends log bytes starting at `offset`; the answer says how much the server holds.
    pub async fn executor_log_append(
        &self,
        id: &str,
        task_id: &str,
        step: &str,
        offset: u64,
        data: bytes::Bytes,
        last: bool,
    ) -> Result<crate::objects::LogAppended, ClientError> {
        let path = format!(
            "/api/v1/executor/{}/tasks/{}/logs/{}?offset={offset}&final={last}",
            Self::seg(id),
            Self::seg(task_id),
            Self::seg(step)
        );
        let resp = self.open(reqwest::Method::POST, &path, Some(data.into()), None).await?;
        Self::read_json(&path, resp).await
    }

    async fn read_json<T: DeserializeOwned>(path: &str, resp: reqwest::Response) -> Result<T, ClientError> {
        let transport = |m: String| ClientError::Transport { url: path.to_string(), message: m };
        let bytes = resp.bytes().await.map_err(|e| transport(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| transport(format!("unreadable answer: {e}")))
    }

    /// Uploads a workspace archive (streamed).
    pub async fn executor_archive_put(
        &self,
        id: &str,
        task_id: &str,
        step: usize,
        body: reqwest::Body,
        size: Option<u64>,
    ) -> Result<crate::objects::Stored, ClientError> {
        let path = format!("/api/v1/executor/{}/tasks/{}/archives/{step}", Self::seg(id), Self::seg(task_id));
        let resp = self.open(reqwest::Method::PUT, &path, Some(body), size).await?;
        Self::read_json(&path, resp).await
    }

    pub async fn executor_archive_get(
        &self,
        id: &str,
        task_id: &str,
        step: usize,
    ) -> Result<Download, ClientError> {
        let path = format!("/api/v1/executor/{}/archives/{}/{step}", Self::seg(id), Self::seg(task_id));
        Ok(Download {
            url: format!("{}{path}", self.base),
            resp: self.open(reqwest::Method::GET, &path, None, None).await?,
        })
    }

    /// The first cache key of `group` starting with `prefix`.
    pub async fn executor_cache_match(
        &self,
        id: &str,
        group: &str,
        prefix: &str,
    ) -> Result<crate::objects::CacheMatch, ClientError> {
        let q = serde_urlencoded::to_string([("group", group), ("prefix", prefix)]).unwrap_or_default();
        self.get(&format!("/api/v1/executor/{}/caches/match?{q}", Self::seg(id))).await
    }

    pub async fn executor_cache_get(
        &self,
        id: &str,
        group: &str,
        key: &str,
    ) -> Result<Download, ClientError> {
        let q = serde_urlencoded::to_string([("group", group), ("key", key)]).unwrap_or_default();
        let path = format!("/api/v1/executor/{}/caches?{q}", Self::seg(id));
        Ok(Download {
            url: format!("{}{path}", self.base),
            resp: self.open(reqwest::Method::GET, &path, None, None).await?,
        })
    }

    /// Saves a cache (streamed); a key already saved is kept as it is.
    pub async fn executor_cache_put(
        &self,
        id: &str,
        group: &str,
        key: &str,
        body: reqwest::Body,
        size: Option<u64>,
    ) -> Result<crate::objects::Stored, ClientError> {
        let q = serde_urlencoded::to_string([("group", group), ("key", key)]).unwrap_or_default();
        let path = format!("/api/v1/executor/{}/caches?{q}", Self::seg(id));
        let resp = self.open(reqwest::Method::PUT, &path, Some(body), size).await?;
        Self::read_json(&path, resp).await
    }
}

/// A streamed answer (a log, an archive, a cache).
pub struct Download {
    resp: reqwest::Response,
    url: String,
}

impl Download {
    /// The next chunk; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, ClientError> {
        self.resp
            .chunk()
            .await
            .map_err(|e| ClientError::Transport { url: self.url.clone(), message: e.to_string() })
    }

    /// The whole answer as a stream of chunks.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send {
        use futures::TryStreamExt;
        self.resp.bytes_stream().map_err(std::io::Error::other)
    }

    /// Reads everything (tests and small answers).
    pub async fn bytes(self) -> Result<bytes::Bytes, ClientError> {
        let url = self.url;
        self.resp.bytes().await.map_err(|e| ClientError::Transport { url, message: e.to_string() })
    }
}

/// Filters of `GET /api/v1/runs`.
#[derive(Debug, Clone, Default)]
pub struct RunQuery {
    pub group: Option<String>,
    pub phase: Option<String>,
    pub start: Option<String>,
    pub limit: usize,
    pub asc: bool,
}

/// A server-sent-events subscription.
pub struct EventStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
    url: String,
}

impl EventStream {
    /// The next event; `None` when the server closed the stream. A server that cut the
    /// stream because this reader lagged is an error: events were missed.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let block = String::from_utf8_lossy(&block);
                let mut kind = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                match kind.as_deref() {
                    Some("run") | Some("task") => {
                        let e = serde_json::from_str(&data).map_err(|e| ClientError::Transport {
                            url: self.url.clone(),
                            message: format!("unreadable event: {e}"),
                        })?;
                        return Ok(Some(e));
                    }
                    Some("lagged") => {
                        return Err(ClientError::Transport {
                            url: self.url.clone(),
                            message: format!("the server dropped this slow subscriber: {data}"),
                        })
                    }
                    _ => continue,
                }
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(ClientError::Transport { url: self.url.clone(), message: e.to_string() })
                }
            }
        }
    }
}
