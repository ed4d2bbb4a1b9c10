//! A typed client of the public API. A refused request keeps the server's status, code and
//! message, so the CLI can print exactly what the server said.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::coalesce::{each_alone, json_len, Coalescer, Rules};
use crate::http::{header, Answer, Auth, Base, HeaderName, HeaderValue, Http};
use crate::types::*;
use bytes::Bytes;
use flotilla_store::limits::{CLIENT_RETRY_BACKOFF_MS, CLIENT_RETRY_BUDGET_MS};
use http::Method;

/// Characters escaped in a user-supplied path segment (a key, run id, task name, executor
/// id). `/` is escaped, so a key with slashes stays one segment, and `\`, which URL
/// parsing turns into `/` in http(s) URLs. A segment that is exactly `.` or `..` cannot
/// be escaped (URL parsing treats `%2e` as `.`): [`check_path`] refuses it.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'/')
    .add(b'\\');

/// Refuses a path with a `.` or `..` segment, however encoded: URL normalisation would
/// resolve it and send the request to another route (`kv put ../maintenance` once
/// enabled maintenance mode).
fn check_path(path: &str) -> Result<(), ClientError> {
    let path = path.split('?').next().unwrap_or("");
    for segment in path.split('/') {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        if decoded == "." || decoded == ".." {
            return Err(ClientError::Refused(format!(
                "{decoded:?} cannot be used as a key, run id, task name or executor id \
                 (a URL path would resolve it into another route)"
            )));
        }
    }
    Ok(())
}

/// The error a refusal's body describes: the server's `{code, message}`, or the start of
/// whatever else answered (a proxy's page).
fn api_error(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Api { status, code: e.code, message: e.message },
        Err(_) => ClientError::Api {
            status,
            code: "unknown".into(),
            message: String::from_utf8_lossy(body).chars().take(300).collect(),
        },
    }
}

/// The error of one call's outcome in an answer to several (`status` and its `{code,
/// message}`).
fn outcome_error(status: u16, error: Option<ErrorBody>) -> ClientError {
    let e = error.unwrap_or(ErrorBody { code: "unknown".into(), message: String::new() });
    ClientError::Api { status, code: e.code, message: e.message }
}

/// The JSON one request of puts carries at most (unless one put alone is bigger), as for
/// an executor's reports: under the size from which a server makes a body wait for a
/// large-body permit.
pub const PUTS_BATCH_BYTES: usize = crate::report::BATCH_BYTES;

/// How long a client sends its puts one by one after a server did not take them together.
const ALONE_FOR: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{message} (HTTP {status}, {code})")]
    Api { status: u16, code: String, message: String },
    /// The server could not be reached or the answer could not be read.
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    /// Refused here, before anything was sent (as the server would with a 400).
    #[error("{0}")]
    Refused(String),
}

pub use crate::http::describe;

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            ClientError::Transport { .. } => None,
            ClientError::Refused(_) => Some(400),
        }
    }

    /// Worth sending again, maybe elsewhere: the server was not reached, or it answered
    /// 503 (no leader, maintenance, a request timeout: nothing was refused).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Transport { .. } | ClientError::Api { status: 503, .. })
    }
}

/// A fresh `Idempotency-Key`: the time, the process and the std library's per-process
/// random hasher keys, so two calls (or two processes) never share one.
pub fn new_idempotency_key() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    format!("flotilla-{nanos:x}-{:x}-{:016x}", std::process::id(), h.finish())
}

/// The time a request and its answer get, and the connect timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Client {
    base: String,
    /// `base` parsed once (a request's URI is it plus the path), or why it is no URL.
    target: Result<Base, String>,
    token: Option<String>,
    /// `Authorization: Bearer <token>`, made once (and marked sensitive), or why the
    /// token cannot be sent.
    auth: Auth,
    http: Http,
    /// Every server given (`--server a,b,c`); `base` is the one requests go to, and the
    /// calls that retry ([`Client::run_create`]) move along this list.
    servers: Vec<String>,
    /// The queue of [`Client::kv_put`], started at its first call (one per `base`).
    puts: Arc<OnceLock<Coalescer<KvPutItem, u64>>>,
}

impl Client {
    /// A client of `base`: one server URL, or several separated by commas (requests go to
    /// the first; the retrying calls move to the next on transport errors and 503).
    pub fn new(base: &str, token: Option<String>) -> Self {
        // Servers close idle connections after HEADER_READ_TIMEOUT_MS: let go first.
        let http = Http::new(CONNECT_TIMEOUT, Duration::from_secs(15), usize::MAX);
        let mut servers: Vec<String> = base
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            servers.push(base.trim().trim_end_matches('/').to_string());
        }
        let auth = Auth::new(token.as_deref());
        Client {
            target: Base::parse(&servers[0]),
            base: servers[0].clone(),
            token,
            auth,
            http,
            servers,
            puts: Arc::default(),
        }
    }

    /// Every server this client was given, in order.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// The same client (token, connection pool, server list) sending to `server`.
    pub fn at(&self, server: &str) -> Client {
        let base = server.trim_end_matches('/').to_string();
        Client { target: Base::parse(&base), base, puts: Arc::default(), ..self.clone() }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends one request with a small body (`json`) and reads its answer whole; a token
    /// goes along when this client has one. Errors name the URL.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        json: Option<Vec<u8>>,
        extra: Option<(HeaderName, HeaderValue)>,
    ) -> Result<Answer, ClientError> {
        check_path(path)?;
        // The URL as text only for an error.
        let url = || format!("{}{}", self.base, path);
        let transport = |message: String| ClientError::Transport { url: url(), message };
        let uri = self.target.as_ref().map_err(|e| transport(e.clone()))?.uri(path).map_err(transport)?;
        let mut headers = self.auth.headers().map_err(ClientError::Refused)?;
        if json.is_some() {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if let Some((name, value)) = extra {
            headers.insert(name, value);
        }
        let body = json.map(Bytes::from).unwrap_or_default();
        let answer = self
            .http
            .send(method, uri, headers, body, REQUEST_TIMEOUT)
            .await
            .map_err(|e| transport(e.to_string()))?;
        if !(200..300).contains(&answer.status) {
            return Err(api_error(answer.status, &answer.body));
        }
        Ok(answer)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Option<T>, ClientError> {
        let json = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Refused(format!("cannot encode the request: {e}")))?;
        let answer = self.exchange(method, path, json, None).await?;
        if answer.status == 204 || answer.body.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&answer.body).map(Some).map_err(|e| ClientError::Transport {
            url: format!("{}{}", self.base, path),
            message: format!("unreadable answer: {e}"),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send::<T>(Method::GET, path, None::<&()>).await?.ok_or_else(|| self.empty(path))
    }

    async fn with_body<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.send::<T>(method, path, Some(body)).await?.ok_or_else(|| self.empty(path))
    }

    async fn no_content(&self, method: Method, path: &str) -> Result<(), ClientError> {
        self.send::<serde_json::Value>(method, path, None::<&()>).await.map(|_| ())
    }

    /// Checks that the outcomes of calls sent together (named by `answers`) answer the calls
    /// `sent`, one by one, in order.
    fn check_answers<'a, 'b>(
        &self,
        path: &str,
        answers: impl ExactSizeIterator<Item = &'a str>,
        sent: impl ExactSizeIterator<Item = &'b str>,
        what: &str,
    ) -> Result<(), ClientError> {
        let (got, asked) = (answers.len(), sent.len());
        if got == asked && answers.zip(sent).all(|(a, s)| a == s) {
            return Ok(());
        }
        Err(ClientError::Transport {
            url: format!("{}{path}", self.base),
            message: format!("the {got} outcomes do not answer the {asked} {what}"),
        })
    }

    fn empty(&self, path: &str) -> ClientError {
        ClientError::Transport { url: format!("{}{}", self.base, path), message: "empty answer".into() }
    }

    fn key_path(key: &str) -> String {
        format!("/api/v1/kv/{}", utf8_percent_encode(key, SEGMENT))
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/healthz").await
    }

    /// `/readyz`: Ok when the node can serve linearizable requests, an error (503 with
    /// the node's view: leader, applied and commit index) when it cannot.
    pub async fn ready(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/readyz").await
    }

    /// Puts `value` at `key` (only if its revision is `prev_revision`, when given) and
    /// returns the write's revision. Puts made through one client while its request is on
    /// its way queue and go together in its next one (`POST /api/v1/kv`, at most
    /// [`MAX_KV_PUTS`] and [`PUTS_BATCH_BYTES`] of JSON, one per key); a lone put goes at
    /// once as `PUT /api/v1/kv/{key}`. Each gets what it would have got alone.
    pub async fn kv_put(
        &self,
        key: &str,
        value: &str,
        prev_revision: Option<u64>,
    ) -> Result<u64, ClientError> {
        check_path(&Self::key_path(key))?;
        let put = KvPutItem { key: key.into(), value: value.into(), prev_revision };
        let bytes = json_len(&put, PUTS_BATCH_BYTES);
        let queue = self.puts.get_or_init(|| self.start_puts());
        match queue.submit(put, bytes) {
            Ok(answer) => answer.await.map_err(|_| ClientError::Transport {
                url: format!("{}{}", self.base, Self::key_path(key)),
                message: "the client's queue of puts stopped".into(),
            })?,
            // The queue's loop ended with the runtime it was started on: alone.
            Err(put) => self.kv_put_alone(&put.key, &put.value, put.prev_revision).await,
        }
    }

    /// [`Client::kv_put`] in a request of its own, never joined with others.
    pub async fn kv_put_alone(
        &self,
        key: &str,
        value: &str,
        prev_revision: Option<u64>,
    ) -> Result<u64, ClientError> {
        let mut path = Self::key_path(key);
        if let Some(p) = prev_revision {
            path.push_str(&format!("?prev_revision={p}"));
        }
        let r: Revision = self.with_body(Method::PUT, &path, &KvPutRequest { value: value.into() }).await?;
        Ok(r.revision)
    }

    /// Several puts in one request (see [`KvPuts`]): each put's outcome as
    /// [`Client::kv_put_alone`] would give it, in order.
    pub async fn kv_puts(&self, puts: &[KvPutItem]) -> Result<Vec<Result<u64, ClientError>>, ClientError> {
        let path = "/api/v1/kv";
        let answer: KvPutOutcomes =
            self.with_body(Method::POST, path, &KvPuts { puts: puts.to_vec() }).await?;
        self.check_answers(
            path,
            answer.outcomes.iter().map(|o| o.key.as_str()),
            puts.iter().map(|p| p.key.as_str()),
            "puts",
        )?;
        Ok(answer
            .outcomes
            .into_iter()
            .map(|o| match (o.status, o.revision) {
                (200..=299, Some(revision)) => Ok(revision),
                (status, _) => Err(outcome_error(status, o.error)),
            })
            .collect())
    }

    /// The loop behind [`Client::kv_put`]: a lone put alone, queued ones together; to a
    /// server that does not take puts together (405: an older release, during a rolling
    /// upgrade), one by one for [`ALONE_FOR`].
    fn start_puts(&self) -> Coalescer<KvPutItem, u64> {
        // A client of the same server that sends, never queues (no cycle to keep the loop).
        let client = Client { puts: Arc::default(), ..self.clone() };
        let alone_until: Arc<Mutex<Option<Instant>>> = Arc::default();
        let rules: Rules<KvPutItem, u64> = Rules {
            items: MAX_KV_PUTS,
            bytes: PUTS_BATCH_BYTES,
            joins: |queued, put| queued.iter().all(|q| q.item.key != put.key),
            group: each_alone,
        };
        Coalescer::start(rules, move |puts: Vec<KvPutItem>| {
            let (client, alone_until) = (client.clone(), alone_until.clone());
            async move {
                let until = || alone_until.lock().unwrap_or_else(|e| e.into_inner());
                if puts.len() > 1 && until().is_none_or(|t| Instant::now() >= t) {
                    match client.kv_puts(&puts).await {
                        Err(ClientError::Api { status: 405, .. }) => {
                            *until() = Some(Instant::now() + ALONE_FOR)
                        }
                        other => return other,
                    }
                }
                let alone = puts.iter().map(|p| client.kv_put_alone(&p.key, &p.value, p.prev_revision));
                Ok(futures::future::join_all(alone).await)
            }
        })
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
        self.no_content(Method::DELETE, &path).await
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
        let method = if enabled { Method::PUT } else { Method::DELETE };
        self.no_content(method, "/api/v1/maintenance").await
    }

    pub async fn cluster(&self, stale: bool) -> Result<ClusterStatus, ClientError> {
        self.get(if stale { "/api/v1/cluster?stale=true" } else { "/api/v1/cluster" }).await
    }

    pub async fn cluster_init(&self, nodes: &[(u64, String)]) -> Result<ClusterStatus, ClientError> {
        let body = InitRequest { nodes: nodes.iter().map(|(id, a)| (id.to_string(), a.clone())).collect() };
        self.with_body(Method::POST, "/api/v1/cluster/init", &body).await
    }

    pub async fn add_learner(&self, id: u64, addr: &str) -> Result<ClusterStatus, ClientError> {
        self.with_body(Method::POST, "/api/v1/cluster/learners", &AddLearnerRequest { id, addr: addr.into() })
            .await
    }

    pub async fn set_voters(&self, ids: &[u64]) -> Result<ClusterStatus, ClientError> {
        self.with_body(Method::POST, "/api/v1/cluster/voters", &VotersRequest { ids: ids.to_vec() }).await
    }

    pub async fn remove_node(&self, id: u64) -> Result<(), ClientError> {
        self.no_content(Method::DELETE, &format!("/api/v1/cluster/nodes/{id}")).await
    }

    async fn put_no_content(&self, path: &str, body: &impl Serialize) -> Result<(), ClientError> {
        self.send::<serde_json::Value>(Method::PUT, path, Some(body)).await.map(|_| ())
    }

    fn seg(s: &str) -> String {
        utf8_percent_encode(s, SEGMENT).to_string()
    }

    /// Creates a run under one fresh `Idempotency-Key`, retried with that key on transport
    /// errors and 503 (moving to the next server given) for up to
    /// [`CLIENT_RETRY_BUDGET_MS`]: however often it is sent, at most one run is created.
    pub async fn run_create(&self, create: &RunCreate) -> Result<Run, ClientError> {
        let key = new_idempotency_key();
        self.retrying(|c| {
            let key = key.clone();
            async move { c.run_create_with_key(create, &key).await.map(|(run, _)| run) }
        })
        .await
    }

    /// One attempt of an idempotent create: the run, and whether the server replayed the
    /// key (the run was created by an earlier attempt).
    pub async fn run_create_with_key(
        &self,
        create: &RunCreate,
        key: &str,
    ) -> Result<(Run, bool), ClientError> {
        let path = "/api/v1/runs";
        let json = serde_json::to_vec(create)
            .map_err(|e| ClientError::Refused(format!("cannot encode the request: {e}")))?;
        let key = HeaderValue::try_from(key)
            .map_err(|_| ClientError::Refused(format!("{key:?} cannot be an Idempotency-Key")))?;
        let answer = self
            .exchange(Method::POST, path, Some(json), Some((HeaderName::from_static("idempotency-key"), key)))
            .await?;
        let replayed = answer.headers.get("idempotent-replayed").is_some_and(|v| v.as_bytes() == b"true");
        let run = serde_json::from_slice(&answer.body).map_err(|e| ClientError::Transport {
            url: format!("{}{path}", self.base),
            message: format!("unreadable answer: {e}"),
        })?;
        Ok((run, replayed))
    }

    /// Runs `call` against the current server, then the next ones in turn, while it fails
    /// with a transport error or a 503 and the retry budget lasts; the last error otherwise.
    pub async fn retrying<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let deadline = std::time::Instant::now() + Duration::from_millis(CLIENT_RETRY_BUDGET_MS);
        let start = self.servers.iter().position(|s| *s == self.base).unwrap_or(0);
        let mut attempt = 0usize;
        loop {
            let server = &self.servers[(start + attempt) % self.servers.len()];
            match call(self.at(server)).await {
                Err(e) if e.is_retryable() && std::time::Instant::now() < deadline => {
                    attempt += 1;
                    // Each full pass over the servers waits a little longer (an election
                    // takes about a second).
                    let pass = (attempt / self.servers.len()).min(5) as u64;
                    tokio::time::sleep(Duration::from_millis(CLIENT_RETRY_BACKOFF_MS * (1 + pass))).await;
                }
                other => return other,
            }
        }
    }

    /// Restarts a finished run: a new run of the same configuration, keeping the tasks
    /// that succeeded or were skipped unless `from_start`; `environment` replaces the
    /// run's environment when given.
    pub async fn run_restart(
        &self,
        id: &str,
        from_start: bool,
        environment: Option<BTreeMap<String, String>>,
    ) -> Result<Run, ClientError> {
        let path = format!("/api/v1/runs/{}/actions", Self::seg(id));
        let body = RestartRequest { action: "restart".into(), from_start, environment };
        self.with_body(Method::PUT, &path, &body).await
    }

    pub async fn run_get(&self, id: &str) -> Result<Run, ClientError> {
        self.get(&format!("/api/v1/runs/{}", Self::seg(id))).await
    }

    pub async fn run_list(&self, q: &RunQuery) -> Result<RunList, ClientError> {
        let mut pairs = Vec::new();
        if q.limit > 0 {
            pairs.push(("limit", q.limit.to_string()));
        }
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
        self.no_content(Method::DELETE, &format!("/api/v1/executors/{}", Self::seg(id))).await
    }

    /// Registers the executor or records its heartbeat.
    pub async fn executor_heartbeat(&self, id: &str, info: &ExecutorInfo) -> Result<(), ClientError> {
        self.put_no_content(&format!("/api/v1/executor/{}", Self::seg(id)), info).await
    }

    /// The executor's tasks, each with its `spec.data`, waiting up to `wait_ms` for a
    /// change after revision `since`.
    pub async fn executor_tasks(
        &self,
        id: &str,
        since: u64,
        wait_ms: u64,
    ) -> Result<ExecutorTasks, ClientError> {
        self.executor_tasks_with(id, since, wait_ms, TaskDataFor::All).await
    }

    /// [`Client::executor_tasks`], with `spec.data` for the tasks `data` says. A server
    /// older than the parameter gives it for every task.
    pub async fn executor_tasks_with(
        &self,
        id: &str,
        since: u64,
        wait_ms: u64,
        data: TaskDataFor,
    ) -> Result<ExecutorTasks, ClientError> {
        let query = format!("since={since}&wait_ms={wait_ms}&data={}", data.as_query());
        self.get(&format!("/api/v1/executor/{}/tasks?{query}", Self::seg(id))).await
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

    /// Several of the executor's task statuses in one request (see [`TaskReports`]): each
    /// report's outcome as [`Client::executor_task_status`] would give it, in order.
    pub async fn executor_task_statuses(
        &self,
        id: &str,
        reports: &[TaskReport],
    ) -> Result<Vec<Result<(), ClientError>>, ClientError> {
        let path = format!("/api/v1/executor/{}/tasks", Self::seg(id));
        let body = TaskReports { reports: reports.to_vec() };
        let answer: TaskReportOutcomes = self.with_body(Method::PUT, &path, &body).await?;
        self.check_answers(
            &path,
            answer.outcomes.iter().map(|o| o.id.as_str()),
            reports.iter().map(|r| r.id.as_str()),
            "reports",
        )?;
        Ok(answer
            .outcomes
            .into_iter()
            .map(|o| match o.status {
                200..=299 => Ok(()),
                status => Err(outcome_error(status, o.error)),
            })
            .collect())
    }

    /// Subscribes to the event stream (optionally of one group and below).
    pub async fn events(&self, group: Option<&str>) -> Result<EventStream, ClientError> {
        let mut path = "/api/v1/events".to_string();
        if let Some(g) = group {
            path.push_str(&format!("?{}", serde_urlencoded::to_string([("group", g)]).unwrap_or_default()));
        }
        let url = format!("{}{}", self.base, path);
        let resp = self.open(Method::GET, &path, None, None).await?;
        Ok(EventStream { resp, buf: Vec::new(), url })
    }

    /// Sends a request whose answer (or body) streams: no total timeout, only a connect
    /// timeout. A non-2xx answer becomes the server's error.
    async fn open(
        &self,
        method: Method,
        path: &str,
        body: Option<reqwest::Body>,
        size: Option<u64>,
    ) -> Result<reqwest::Response, ClientError> {
        check_path(path)?;
        let url = format!("{}{}", self.base, path);
        let transport =
            |e: reqwest::Error| ClientError::Transport { url: url.clone(), message: describe(&e) };
        let http = crate::tls::client_builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(transport)?;
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
            return Err(api_error(status, &resp.bytes().await.unwrap_or_default()));
        }
        Ok(resp)
    }

    /// Deletes a finished run (live or archived).
    pub async fn run_delete(&self, id: &str) -> Result<(), ClientError> {
        self.no_content(Method::DELETE, &format!("/api/v1/runs/{}", Self::seg(id))).await
    }

    /// The archive's state: `{generation, files, runs, bytes, runs_in_state}`.
    pub async fn archive_status(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/api/v1/archive").await
    }

    /// Dumps the full run index to the object storage now: `{key, runs, bytes}`.
    pub async fn archive_dump_index(&self) -> Result<serde_json::Value, ClientError> {
        self.with_body(Method::POST, "/api/v1/archive/index", &serde_json::json!({})).await
    }

    /// The export of the whole replicated state (versioned, checksummed).
    pub async fn export(&self) -> Result<Download, ClientError> {
        let path = "/api/v1/export";
        Ok(Download {
            url: format!("{}{path}", self.base),
            resp: self.open(Method::GET, path, None, None).await?,
        })
    }

    /// Replaces the whole state with an export (the cluster must be in maintenance).
    pub async fn import(&self, export: bytes::Bytes) -> Result<(), ClientError> {
        self.open(Method::POST, "/api/v1/import", Some(export.into()), None).await.map(|_| ())
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
            resp: self.open(Method::GET, &path, None, None).await?,
        })
    }

    /// The whole output of service container `container` of a task's pod.
    pub async fn run_container_log(
        &self,
        id: &str,
        task: &str,
        container: &str,
        follow: bool,
    ) -> Result<Download, ClientError> {
        let q = serde_urlencoded::to_string([
            ("container", container),
            ("follow", if follow { "true" } else { "false" }),
        ])
        .unwrap_or_default();
        let path = format!("/api/v1/runs/{}/tasks/{}/logs?{q}", Self::seg(id), Self::seg(task));
        Ok(Download {
            url: format!("{}{path}", self.base),
            resp: self.open(Method::GET, &path, None, None).await?,
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
            resp: self.open(Method::GET, &path_q, None, None).await?,
        })
    }

    /// The tasks of a run in DAG order, with their dependencies and step names.
    pub async fn run_outline(&self, id: &str) -> Result<RunOutline, ClientError> {
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
    ) -> Result<LogAppended, ClientError> {
        let path = format!(
            "/api/v1/executor/{}/tasks/{}/logs/{}?offset={offset}&final={last}",
            Self::seg(id),
            Self::seg(task_id),
            Self::seg(step)
        );
        let resp = self.open(Method::POST, &path, Some(data.into()), None).await?;
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
    ) -> Result<Stored, ClientError> {
        let path = format!("/api/v1/executor/{}/tasks/{}/archives/{step}", Self::seg(id), Self::seg(task_id));
        let resp = self.open(Method::PUT, &path, Some(body), size).await?;
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
            resp: self.open(Method::GET, &path, None, None).await?,
        })
    }

    /// The first cache key of `group` starting with `prefix`.
    pub async fn executor_cache_match(
        &self,
        id: &str,
        group: &str,
        prefix: &str,
    ) -> Result<CacheMatch, ClientError> {
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
            resp: self.open(Method::GET, &path, None, None).await?,
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
    ) -> Result<Stored, ClientError> {
        let q = serde_urlencoded::to_string([("group", group), ("key", key)]).unwrap_or_default();
        let path = format!("/api/v1/executor/{}/caches?{q}", Self::seg(id));
        let resp = self.open(Method::PUT, &path, Some(body), size).await?;
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
    /// Most runs in the answer; 0: the server's default.
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

#[cfg(test)]
mod tests {
    use super::Client;

    #[test]
    fn a_request_goes_to_the_base_with_its_path_verbatim() {
        let paths = [
            "/api/v1/kv/bench%2F1%2F2",
            "/api/v1/kv/a%20b?prev_revision=7",
            "/api/v1/runs/r-1/tasks/build/logs?step=0&follow=true",
            "/healthz",
            // Appended, never taken for another authority.
            "//evil:1/x",
        ];
        for base in
            ["http://127.0.0.1:7001", "http://127.0.0.1:7001/", "https://[::1]:8443", "http://Node-A:80"]
        {
            let c = Client::new(base, None);
            let target = c.target.as_ref().expect("a server URL is parsed once");
            for path in paths {
                let uri = target.uri(path).unwrap();
                assert_eq!(uri.to_string(), format!("{}{path}", c.base), "{base} + {path}");
            }
        }
        let c = Client::new("http://127.0.0.1:7001/prefix", None);
        assert_eq!(c.target.unwrap().uri("/healthz").unwrap(), "http://127.0.0.1:7001/prefix/healthz");
        assert!(Client::new("not a url", None).target.is_err());
        let moved = Client::new("http://a:1", None).at("http://b:2/");
        assert_eq!(moved.target.unwrap().uri("/x").unwrap(), "http://b:2/x");
    }
}
