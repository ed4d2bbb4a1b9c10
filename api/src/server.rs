//! The HTTP server of a node: public API, health and metrics, and the node-to-node Raft
//! routes, all on one listener.
//!
//! One warp filter gathers the request; `handle` parses it into a [`crate::routes::Endpoint`]
//! (the one route table), checks its token, refuses it in maintenance, reads its body and
//! `dispatch`es it with one `match` on the endpoint. That keeps every answer — unknown
//! routes, wrong methods, oversized or malformed bodies, auth failures — in the same JSON
//! error shape, decided in one place. Bodies are read as a stream with a hard cap per
//! route, so a huge or chunked body is refused without being buffered.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flotilla_raft::rpc;
use flotilla_raft::{LeaderRequest, RaftNode};
use flotilla_store::limits::{
    BODY_IDLE_TIMEOUT_MS, BODY_READ_TIMEOUT_MS, DEFAULT_LIST_LIMIT, HEADER_READ_TIMEOUT_MS, LARGE_BODY_BYTES,
    MAX_LIST_LIMIT, MAX_NODE_ADDR_BYTES, READY_APPLY_LAG,
};
use flotilla_store::ost::{ObjectStream, Ost};
use flotilla_store::{Command, Response};
use futures::{Stream, StreamExt};
use percent_encoding::percent_decode_str;
use tokio::net::TcpListener;
use warp::http::Method;
use warp::Filter;

use crate::error::ApiError;
use crate::handler::{json, read_barrier, unexpected, write, Reply, Request};
pub use crate::handler::{Ctx, ServerConfig};
use crate::routes::{Access, Body, Endpoint, NoRoute};
use crate::types::*;

/// Serves `ctx` on `listener` until `shutdown` resolves; in-flight requests finish first.
pub async fn run(listener: TcpListener, ctx: Arc<Ctx>, shutdown: impl Future<Output = ()> + Send + 'static) {
    let routes = warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::header::optional::<String>("content-length"))
        .and(warp::header::optional::<String>(crate::objects::FORWARDED))
        .and(warp::header::optional::<String>("transfer-encoding"))
        .and(other_headers())
        .and(warp::body::stream())
        .then({
            let ctx = ctx.clone();
            move |method: Method,
                  path: warp::path::FullPath,
                  query: String,
                  auth,
                  len,
                  fwd: Option<String>,
                  te: Option<String>,
                  other: OtherHeaders,
                  body| {
                let ctx = ctx.clone();
                let path = path.as_str().to_string();
                let origin = other.origin.clone();
                let head = Head {
                    auth,
                    content_length: len,
                    forwarded: fwd.is_some(),
                    chunked: te.is_some(),
                    other,
                };
                async move {
                    let mut resp = warp::Reply::into_response(
                        handle(ctx.clone(), method, path, query, head, body).await,
                    );
                    ctx.cfg.cors.decorate(origin.as_deref(), &mut resp);
                    resp
                }
            }
        });
    let max_connections = ctx.cfg.max_connections;
    let ctx_tls = ctx.cfg.tls.clone();
    let closing = async move {
        shutdown.await;
        ctx.closing_tx.send_replace(true);
    };
    // The accept loop (warp's own has no connection cap and no header timeout): at most
    // `max_connections` open connections, each with `HEADER_READ_TIMEOUT_MS` to send a
    // request's headers (idle keep-alive connections included); on shutdown, stops
    // accepting and waits for the connections' in-flight requests.
    let svc = warp::service(routes);
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(closing);
    let mut warned: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(
                    limit = max_connections,
                    %peer,
                    "connection limit reached: {max_connections} connections are open, new ones are closed until some end (--max-connections)"
                );
                warned = Some(Instant::now());
            }
            drop(stream);
            continue;
        };
        let svc = svc.clone();
        let watcher = graceful.watcher();
        let tls = ctx_tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let (io, client_cert): (Box<dyn crate::tls::Conn>, bool) = match tls {
                None => (Box::new(stream), false),
                Some(tls) => match tls.accept(stream).await {
                    Ok(Some(a)) => (Box::new(a.stream), a.client_cert),
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, %peer, "TLS connection refused");
                        return;
                    }
                },
            };
            // Whether this connection presented a verified client certificate travels with
            // each request as a header only this node sets.
            let svc = tower::ServiceExt::map_request(svc, move |mut req: warp::http::Request<_>| {
                let h = req.headers_mut();
                h.remove(crate::tls::CLIENT_CERT_HEADER);
                if client_cert {
                    h.insert(crate::tls::CLIENT_CERT_HEADER, warp::http::HeaderValue::from_static("1"));
                }
                req
            });
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_millis(HEADER_READ_TIMEOUT_MS));
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Headers read without a rejection: a value that is not text comes through lossily and
/// is refused with a JSON 400 by the route that reads it.
struct OtherHeaders {
    /// `Idempotency-Key` (run creation).
    idempotency_key: Option<String>,
    /// `Origin` (CORS).
    origin: Option<String>,
    /// `Access-Control-Request-Method`: with `OPTIONS` and `Origin`, a CORS preflight.
    preflight_method: Option<String>,
    /// The connection presented a verified client certificate (set by the accept loop).
    client_cert: bool,
}

fn other_headers() -> impl Filter<Extract = (OtherHeaders,), Error = std::convert::Infallible> + Clone {
    warp::header::headers_cloned().map(|h: warp::http::HeaderMap| {
        let text = |name: &str| h.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        OtherHeaders {
            idempotency_key: text("idempotency-key"),
            origin: text("origin"),
            preflight_method: text("access-control-request-method"),
            client_cert: h.contains_key(crate::tls::CLIENT_CERT_HEADER),
        }
    })
}

/// Binds the listener (so a port conflict is reported before anything starts). Accepted
/// connections inherit TCP_NODELAY from it (Linux): an answer leaves at once instead of
/// waiting for the peer's delayed ACK of the previous one (up to 40 ms on a busy
/// keep-alive or HTTP/2 connection).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// What `handle` needs of the request headers.
struct Head {
    auth: Option<String>,
    content_length: Option<String>,
    /// Sent on by another node (never forwarded again).
    forwarded: bool,
    /// A body of unknown length follows (`transfer-encoding`).
    chunked: bool,
    other: OtherHeaders,
}

async fn handle<S, B>(
    ctx: Arc<Ctx>,
    method: Method,
    path: String,
    raw_query: String,
    head: Head,
    body: S,
) -> Reply
where
    S: Stream<Item = Result<B, warp::Error>> + Send + Unpin + 'static,
    B: Buf + Send + 'static,
{
    let decoded = decode_segments(&path);
    let segments: Vec<&str> = match &decoded {
        Ok(d) => d.iter().map(String::as_str).collect(),
        Err(_) => Vec::new(),
    };
    let routed = Endpoint::parse(&method, &segments);
    let label = match &routed {
        Ok(endpoint) => endpoint.label(),
        Err(NoRoute::MethodNotAllowed { at }) => at[0].label(),
        Err(NoRoute::NotFound) => "other",
    };
    let Head { auth, content_length, forwarded, chunked, other } = head;
    let OtherHeaders { idempotency_key, origin, preflight_method, client_cert } = other;
    let result = async {
        decoded.as_ref().map_err(Clone::clone)?;
        let query = parse_query(&raw_query)?;
        let content_length = content_length
            .map(|len| len.trim().parse::<u64>().map_err(|_| ApiError::bad_request("invalid content-length")))
            .transpose()?;
        // The token is checked from the headers, before a byte of the body is read. A path
        // with no route asks for its prefix's token before it is told so.
        if method == Method::OPTIONS {
            if let (Some(origin), Some(asked)) = (&origin, &preflight_method) {
                // A CORS preflight carries no token; it is answered from the route table.
                let methods: Vec<&str> = crate::routes::at(&segments).iter().map(|e| e.method()).collect();
                return match ctx.cfg.cors.preflight(Some(origin), asked, &methods) {
                    Some(resp) => Ok(Reply::Raw(resp)),
                    None => Err(ApiError::new(
                        403,
                        "forbidden",
                        "cross-origin requests are not allowed from this origin for this route (--allowed-origins)",
                    )),
                };
            }
        }
        let (access, need) = match &routed {
            Ok(endpoint) => (endpoint.access(), endpoint.need()),
            Err(NoRoute::MethodNotAllowed { at }) => (at[0].access(), at[0].need()),
            Err(NoRoute::NotFound) => {
                let access = Access::of_path(&segments);
                (access, access.least_need())
            }
        };
        let caller = ctx.authorize(need, auth.as_deref())?;
        if access == Access::Cluster && ctx.cfg.tls.as_ref().is_some_and(|t| t.client_auth) && !client_cert {
            return Err(ApiError::new(
                403,
                "forbidden",
                "this node serves /raft/* only to clients with a certificate of its --tls-client-ca",
            ));
        }
        let endpoint = match routed {
            Ok(endpoint) => endpoint,
            Err(NoRoute::NotFound) => {
                return Err(ApiError::not_found(format!("no route for {method} /{}", segments.join("/"))))
            }
            Err(NoRoute::MethodNotAllowed { at }) => return Ok(method_not_allowed(&at)),
        };
        if !endpoint.open_in_maintenance() && ctx.node.state.read().state.maintenance {
            return Err(ApiError::new(
                503,
                "maintenance",
                "the cluster is in maintenance mode: only the maintenance, export/import, cluster, health and metrics routes are served",
            ));
        }
        let (body, upload) = match endpoint.body().max_bytes() {
            // Archives and caches stream through to the object storage, never buffered.
            None => {
                let stream: ObjectStream = Box::pin(body.map(|chunk| match chunk {
                    Ok(mut buf) => Ok(buf.copy_to_bytes(buf.remaining())),
                    Err(e) => Err(std::io::Error::other(e)),
                }));
                (Bytes::new(), Some(stream))
            }
            Some(limit) => {
                if content_length.is_some_and(|len| len > limit) {
                    return Err(ApiError::payload_too_large(limit));
                }
                let large = match content_length {
                    Some(len) => len > LARGE_BODY_BYTES,
                    None => chunked,
                };
                let _permit = if large {
                    Some(ctx.body_permit(endpoint.body() == Body::Raft).await?)
                } else {
                    None
                };
                (read_body(body, limit).await?, None)
            }
        };
        let req = Request {
            method,
            segments: &segments,
            query,
            raw_query: raw_query.clone(),
            auth,
            forwarded,
            idempotency_key,
            content_length,
            body,
            caller,
        };
        dispatch(&ctx, endpoint, &req, upload).await
    }
    .await;
    let reply = result.unwrap_or_else(|e| {
        if e.status >= 500 {
            tracing::warn!(status = e.status, message = %e.message, %path, "request failed");
        }
        json(e.status, &e.body())
    });
    let status = match &reply {
        Reply::Json(s, _) | Reply::Text(s, _, _) => *s,
        Reply::Msgpack(_) => 200,
        Reply::Empty => 204,
        Reply::Raw(r) => r.status().as_u16(),
    };
    ctx.metrics.request(label, status);
    reply
}

/// 405 for a path whose routes answer other methods, with `Allow` listing theirs.
fn method_not_allowed(at: &[Endpoint<'_>]) -> Reply {
    let allow = crate::routes::allow(at);
    let e = ApiError::new(
        405,
        "method_not_allowed",
        format!("method not allowed on this route (allowed: {allow})"),
    );
    let mut resp = warp::Reply::into_response(json(405, &e.body()));
    if let Ok(value) = warp::http::HeaderValue::from_str(&allow) {
        resp.headers_mut().insert("allow", value);
    }
    Reply::Raw(resp)
}

/// The query parameters; one given twice (`?prev_revision=1&prev_revision=2`) is refused
/// rather than one of the two silently winning.
fn parse_query(raw: &str) -> Result<HashMap<String, String>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    let mut query = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        if query.contains_key(&k) {
            return Err(ApiError::bad_request(format!("query parameter {k:?} is given more than once")));
        }
        query.insert(k, v);
    }
    Ok(query)
}

/// Reads a whole body of at most `limit` bytes; a body that pauses longer than
/// `BODY_IDLE_TIMEOUT_MS` or takes longer than `BODY_READ_TIMEOUT_MS` is refused.
async fn read_body<S, B>(mut body: S, limit: u64) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(BODY_READ_TIMEOUT_MS);
    let too_slow = || {
        ApiError::new(
            408,
            "request_timeout",
            format!(
                "the request body was not received in time (a pause over {BODY_IDLE_TIMEOUT_MS} ms, or over {BODY_READ_TIMEOUT_MS} ms in all)"
            ),
        )
    };
    loop {
        let idle = tokio::time::Instant::now() + Duration::from_millis(BODY_IDLE_TIMEOUT_MS);
        let next = tokio::time::timeout_at(idle.min(deadline), body.next()).await.map_err(|_| too_slow())?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
        if (buf.len() + chunk.remaining()) as u64 > limit {
            return Err(ApiError::payload_too_large(limit));
        }
        buf.put(chunk);
    }
    Ok(buf.freeze())
}

/// Calls the handler of `endpoint`. `upload` is the body of a streamed upload
/// ([`Body::Streamed`]); every other body is read whole into `req.body`.
async fn dispatch(
    ctx: &Arc<Ctx>,
    endpoint: Endpoint<'_>,
    req: &Request<'_>,
    upload: Option<ObjectStream>,
) -> Result<Reply, ApiError> {
    use crate::{objects, runs, tasks, ui};
    use Endpoint as E;
    let node = &ctx.node;
    match endpoint {
        E::Healthz => Ok(json(200, &Health { status: "ok".into(), node_id: node.id })),
        E::Readyz => readyz(ctx).await,
        E::Metrics => Ok(Reply::Text(200, "text/plain", render_metrics(ctx).await)),
        E::Raft { rpc: kind } => {
            let out =
                rpc::handle(node, kind, &req.body).await.map_err(|e| ApiError::bad_request(e.to_string()))?;
            Ok(Reply::Msgpack(out))
        }
        E::ClusterStatus => cluster_status(ctx, req).await,
        E::ClusterInit => cluster_init(ctx, req).await,
        E::AddLearner => add_learner(ctx, req).await,
        E::SetVoters => set_voters(ctx, req).await,
        E::RemoveNode { node_id } => remove_node(ctx, node_id).await,
        E::KvList => kv_list(ctx, req).await,
        E::KvPuts => kv_puts(ctx, req).await,
        E::KvGet { key } => kv_get(ctx, req, decode_key(key)?).await,
        E::KvPut { key } => kv_put(ctx, req, decode_key(key)?).await,
        E::KvDelete { key } => kv_delete(ctx, req, decode_key(key)?).await,
        E::MaintenanceStatus => maintenance_status(ctx, req).await,
        E::MaintenanceEnable => set_maintenance(ctx, true).await,
        E::MaintenanceDisable => set_maintenance(ctx, false).await,
        E::Export => export(ctx, req).await,
        E::Import => import(ctx, req).await,
        E::ListRuns => runs::list_runs(ctx, req).await,
        E::CreateRun => runs::create_run(ctx, req).await,
        E::GetRun { run_id } => runs::get_run(ctx, run_id, req).await,
        E::DeleteRun { run_id } => runs::delete_run(ctx, run_id).await,
        E::RunAction { run_id } => runs::run_action(ctx, run_id, req).await,
        E::RunGraph { run_id } => ui::graph(ctx, run_id, req).await,
        E::RunTasks { run_id } => tasks::get_outline(ctx, run_id, req).await,
        E::TaskAnnotations { run_id, task } => runs::set_annotations(ctx, run_id, task, req).await,
        E::TaskAction { run_id, task } => runs::task_action(ctx, run_id, task, req).await,
        E::TaskLogs { run_id, task } => objects::get_log(ctx, run_id, task, req).await,
        E::TaskWorkspace { run_id, task } => tasks::get_workspace(ctx, run_id, task, req).await,
        E::ArchiveStatus => runs::archive_status(ctx, req).await,
        E::DumpArchiveIndex => runs::dump_archive_index(ctx, req).await,
        E::Events => runs::events(ctx, req),
        E::ListExecutors => runs::list_executors(ctx, req).await,
        E::DeleteExecutor { executor_id } => runs::delete_executor(ctx, executor_id).await,
        E::OpenApi => Ok(Reply::Json(200, crate::openapi::bytes().to_vec())),
        E::ExecutorHeartbeat { executor_id } => runs::executor_heartbeat(ctx, executor_id, req).await,
        E::ExecutorTasks { executor_id } => runs::executor_tasks(ctx, executor_id, req).await,
        E::ExecutorSiblings { executor_id } => runs::executor_siblings(ctx, executor_id, req).await,
        E::SetTaskStatus { executor_id, task_id } => {
            runs::set_task_status(ctx, executor_id, task_id, req).await
        }
        E::SetTaskStatuses { executor_id } => runs::set_task_statuses(ctx, executor_id, req).await,
        E::AppendLog { executor_id, task_id, step } => {
            objects::append_log(ctx, executor_id, task_id, step, req).await
        }
        E::UploadArchive { executor_id, task_id, step } => {
            objects::upload_archive(ctx, executor_id, task_id, step, req, upload).await
        }
        E::DownloadArchive { executor_id: _, task_id, step } => {
            objects::download_archive(ctx, task_id, step).await
        }
        E::UploadCache { executor_id: _ } => objects::upload_cache(ctx, req, upload).await,
        E::DownloadCache { executor_id: _ } => objects::download_cache(ctx, req).await,
        E::MatchCache { executor_id: _ } => objects::match_cache(ctx, req).await,
        // The dashboard's own files: no token (they hold none); its API calls carry one.
        E::Ui { path } | E::UiHead { path } => ui::serve(&req.method, path),
    }
}

/// `GET /api/v1/cluster[?stale=true]`.
async fn cluster_status(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let node = &ctx.node;
    let status = if req.flag("stale")? { node.local_status().await } else { node.cluster_status().await? };
    Ok(json(200, &status))
}

/// `POST /api/v1/cluster/init`.
async fn cluster_init(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let body: InitRequest = req.json()?;
    let mut nodes = BTreeMap::new();
    for (id, addr) in body.nodes {
        let id: u64 =
            id.parse().map_err(|_| ApiError::bad_request(format!("node id {id:?} is not a number")))?;
        nodes.insert(id, check_addr(&addr)?);
    }
    ctx.node.initialize(nodes).await?;
    Ok(json(200, &ctx.node.cluster_status().await?))
}

/// `POST /api/v1/cluster/learners`.
async fn add_learner(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let body: AddLearnerRequest = req.json()?;
    let addr = check_addr(&body.addr)?;
    membership(ctx, LeaderRequest::AddLearner { id: body.id, addr }).await?;
    Ok(json(200, &ctx.node.cluster_status().await?))
}

/// `POST /api/v1/cluster/voters`.
async fn set_voters(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let body: VotersRequest = req.json()?;
    let ids: BTreeSet<u64> = body.ids.into_iter().collect();
    membership(ctx, LeaderRequest::SetVoters { ids }).await?;
    Ok(json(200, &ctx.node.cluster_status().await?))
}

/// `DELETE /api/v1/cluster/nodes/{node_id}`.
async fn remove_node(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    let id: u64 = id.parse().map_err(|_| ApiError::bad_request(format!("node id {id:?} is not a number")))?;
    membership(ctx, LeaderRequest::RemoveNode { id }).await?;
    Ok(Reply::Empty)
}

/// `PUT /api/v1/kv/{key}[?prev_revision=N]`.
async fn kv_put(ctx: &Ctx, req: &Request<'_>, key: String) -> Result<Reply, ApiError> {
    let body: KvPutRequest = req.json()?;
    let prev_revision = req.number("prev_revision")?;
    let cmd = Command::KvPut { key, value: body.value, prev_revision };
    match write(ctx, cmd).await? {
        Response::KvPut { revision } => Ok(json(200, &Revision { revision })),
        other => Err(unexpected(other)),
    }
}

/// `POST /api/v1/kv`: several puts, each written as its own put would be (the writes
/// leave together, batched by the leader or forwarded together by a follower) and
/// answered put by put.
async fn kv_puts(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let body: KvPuts = req.json()?;
    if body.puts.len() > MAX_KV_PUTS {
        return Err(ApiError::bad_request(format!(
            "{} puts: at most {MAX_KV_PUTS} go in one request",
            body.puts.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = body.puts.iter().find(|p| !seen.insert(p.key.as_str())) {
        return Err(ApiError::bad_request(format!(
            "key {:?} is put twice: send its puts in order, one request after the other",
            twice.key
        )));
    }
    let writes = body.puts.into_iter().map(|p| async move {
        let result = async {
            flotilla_store::command::validate_key(&p.key)?;
            let cmd = Command::KvPut { key: p.key.clone(), value: p.value, prev_revision: p.prev_revision };
            match write(ctx, cmd).await? {
                Response::KvPut { revision } => Ok(revision),
                other => Err(unexpected(other)),
            }
        };
        match result.await {
            Ok(revision) => KvPutOutcome { key: p.key, status: 200, revision: Some(revision), error: None },
            Err(e) => KvPutOutcome {
                key: p.key,
                status: e.status,
                revision: None,
                error: Some(ErrorBody { code: e.code.to_string(), message: e.message }),
            },
        }
    });
    let outcomes = futures::future::join_all(writes).await;
    Ok(json(200, &KvPutOutcomes { outcomes }))
}

/// `DELETE /api/v1/kv/{key}[?prev_revision=N]`.
async fn kv_delete(ctx: &Ctx, req: &Request<'_>, key: String) -> Result<Reply, ApiError> {
    let prev_revision = req.number("prev_revision")?;
    match write(ctx, Command::KvDelete { key, prev_revision }).await? {
        Response::KvDelete { .. } => Ok(Reply::Empty),
        other => Err(unexpected(other)),
    }
}

/// `PUT` (on) and `DELETE` (off) `/api/v1/maintenance`.
async fn set_maintenance(ctx: &Ctx, enabled: bool) -> Result<Reply, ApiError> {
    write(ctx, Command::SetMaintenance { enabled }).await?;
    Ok(Reply::Empty)
}

/// `GET /api/v1/export`: a consistent cut: everything applied up to a linearizable
/// point, and the archive as that state's manifest names it.
async fn export(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    read_barrier(ctx, req).await?;
    let state = ctx.node.state.read().state.clone();
    let rows = ctx.archive.rows(&state.archive).await?;
    let archived = ctx.archive.load(&rows).await?;
    let bytes = flotilla_store::export::encode(&state, archived);
    let mut resp = warp::reply::Response::new(bytes.into());
    resp.headers_mut()
        .insert("content-type", warp::http::HeaderValue::from_static("application/octet-stream"));
    Ok(Reply::Raw(resp))
}

/// `POST /api/v1/import`, in maintenance only.
async fn import(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let node = &ctx.node;
    if !node.state.read().state.maintenance {
        return Err(ApiError::conflict(
            "an import is only accepted in maintenance mode (flotilla maintenance enable)",
        ));
    }
    let (mut state, mut archived) =
        flotilla_store::export::decode(&req.body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // The archived runs go into this cluster's object storage first, under fresh names;
    // the import then points the manifest at them.
    archived.sort_by(|a, b| a.run.id.cmp(&b.run.id));
    let stamp = flotilla_scheduler::now_ms();
    let generation = node.state.read().state.archive.generation;
    let files =
        flotilla_store::archive::write_files(&ctx.ost, archived, ctx.cfg.archive.max_file_bytes, |n| {
            format!("import-{}", flotilla_store::archive::fresh_name(generation, node.id, stamp, n))
        })
        .await?;
    state.archive = flotilla_store::archive::Manifest { generation: 0, files };
    write(ctx, Command::Import(Box::new(state))).await?;
    Ok(Reply::Empty)
}

fn check_addr(addr: &str) -> Result<String, ApiError> {
    // The URL parser silently drops tabs and line breaks: refuse them (and any control
    // character or space) before it sees the address.
    let ok = (addr.starts_with("http://") || addr.starts_with("https://"))
        && addr.len() <= MAX_NODE_ADDR_BYTES
        && !addr.chars().any(|c| c.is_control() || c.is_whitespace())
        && reqwest::Url::parse(addr).map(|u| u.host().is_some()).unwrap_or(false);
    if !ok {
        return Err(ApiError::bad_request(format!(
            "node address {addr:?} must be an http(s)://host:port URL"
        )));
    }
    Ok(addr.trim_end_matches('/').to_string())
}

/// The path's segments, percent-decoded once here for every route. A segment that is
/// `.` or `..` is refused: clients resolve such segments into another route, so one that
/// arrives is never meant as an identifier (a key, run id, task name or executor id).
fn decode_segments(path: &str) -> Result<Vec<String>, ApiError> {
    path.trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|raw| {
            let s = percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| ApiError::bad_request("the request path is not valid UTF-8"))?;
            if s == "." || s == ".." {
                return Err(ApiError::bad_request(format!(
                    "the path segment {s:?} is not a valid key, run id, task name or executor id"
                )));
            }
            Ok(s.into_owned())
        })
        .collect()
}

/// A key from its (decoded) segments: `a/b` may arrive as `a%2Fb` or as two segments.
fn decode_key(segments: &[&str]) -> Result<String, ApiError> {
    let key = segments.join("/");
    flotilla_store::command::validate_key(&key)?;
    Ok(key)
}

async fn membership(ctx: &Ctx, req: LeaderRequest) -> Result<(), ApiError> {
    ctx.node.leader_request(req).await?;
    Ok(())
}

async fn kv_get(ctx: &Ctx, req: &Request<'_>, key: String) -> Result<Reply, ApiError> {
    read_barrier(ctx, req).await?;
    let sm = ctx.node.state.read();
    let entry = sm.state.kv.get(&key).ok_or_else(|| ApiError::not_found(format!("key {key:?} not found")))?;
    let item = KvItem {
        key,
        value: entry.value.clone(),
        revision: entry.revision,
        create_revision: entry.create_revision,
    };
    Ok(json(200, &item))
}

async fn kv_list(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let limit = req.number("limit")?.map_or(DEFAULT_LIST_LIMIT, |l| l as usize);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_LIST_LIMIT}")));
    }
    let prefix = req.query.get("prefix").map(String::as_str).unwrap_or("");
    let start_after = req.query.get("start_after").map(String::as_str);
    read_barrier(ctx, req).await?;
    let sm = ctx.node.state.read();
    let (items, more) = sm.state.kv_list(prefix, start_after, limit);
    let items = items
        .into_iter()
        .map(|(k, e)| KvItem {
            key: k.clone(),
            value: e.value.clone(),
            revision: e.revision,
            create_revision: e.create_revision,
        })
        .collect();
    Ok(json(200, &KvList { items, more }))
}

/// The replicated flag plus each member's own applied view, asked of every node at once.
/// With `?local=true`, this node's own applied view only.
async fn maintenance_status(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    if req.flag("local")? {
        let enabled = ctx.node.state.read().state.maintenance;
        return Ok(json(200, &LocalMaintenance { node_id: ctx.node.id, enabled }));
    }
    read_barrier(ctx, req).await?;
    let enabled = ctx.node.state.read().state.maintenance;
    let members: Vec<(u64, String)> = {
        let metrics = ctx.node.raft.metrics();
        let m = metrics.borrow();
        m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect()
    };
    let asks = members.into_iter().map(|(id, addr)| async move {
        if id == ctx.node.id {
            return (id, Some(ctx.node.state.read().state.maintenance));
        }
        // Asked with the caller's own token: every node holds the same tokens.
        let mut r = ctx.peers.get(format!("{addr}/api/v1/maintenance?local=true"));
        if let Some(auth) = &req.auth {
            r = r.header("authorization", auth);
        }
        let answer = match r.send().await {
            Ok(resp) if resp.status().is_success() => {
                resp.json::<LocalMaintenance>().await.ok().map(|l| l.enabled)
            }
            _ => None,
        };
        (id, answer)
    });
    let mut nodes = BTreeMap::new();
    let mut unreachable = Vec::new();
    for (id, answer) in futures::future::join_all(asks).await {
        match answer {
            Some(on) => {
                nodes.insert(id.to_string(), on);
            }
            None => unreachable.push(id),
        }
    }
    Ok(json(200, &Maintenance { enabled, nodes, unreachable }))
}

async fn readyz(ctx: &Ctx) -> Result<Reply, ApiError> {
    let status = ctx.node.local_status().await;
    // A leader cut off from its majority still names itself leader: `quorum` catches it.
    // Caught up: applying within READY_APPLY_LAG entries of the commit index (under write
    // load the applier always trails the commit by a few entries; a node replaying its log
    // after a restart is far behind).
    let caught_up = status.applied_index + READY_APPLY_LAG >= status.commit_index;
    let ready = status.leader_id.is_some() && status.quorum && caught_up;
    let body = Ready {
        quorum: status.quorum,
        ready,
        node_id: ctx.node.id,
        leader_id: status.leader_id,
        applied_index: status.applied_index,
        commit_index: status.commit_index,
    };
    Ok(json(if ready { 200 } else { 503 }, &body))
}

async fn render_metrics(ctx: &Ctx) -> String {
    use std::fmt::Write;
    let s = ctx.node.local_status().await;
    let (log_entries, snapshot_bytes) = ctx.node.storage_sizes();
    let mut out = String::new();
    let gauges: [(&str, &str, u64); 9] = [
        ("flotilla_raft_term", "Current Raft term.", s.term),
        ("flotilla_raft_commit_index", "Highest committed log index known here.", s.commit_index),
        ("flotilla_raft_applied_index", "Highest log index applied here.", s.applied_index),
        ("flotilla_raft_last_log_index", "Last log index stored here.", s.last_log_index),
        ("flotilla_raft_leader_id", "Id of the known leader (0 when none).", s.leader_id.unwrap_or(0)),
        (
            "flotilla_raft_is_leader",
            "1 when this node is the leader.",
            u64::from(s.leader_id == Some(ctx.node.id)),
        ),
        (
            "flotilla_raft_log_entries",
            "Entries kept in the log (purged after snapshots).",
            log_entries as u64,
        ),
        ("flotilla_raft_snapshot_bytes", "Size of the last snapshot on disk.", snapshot_bytes),
        ("flotilla_raft_members", "Voters and learners in the membership.", s.nodes.len() as u64),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
    }
    let stale = ctx.scheduler_stats.stale_decisions.load(std::sync::atomic::Ordering::Relaxed);
    let name = "flotilla_scheduler_stale_decisions_total";
    let _ = writeln!(
        out,
        "# HELP {name} Run updates refused as decided by another leader or term.\n# TYPE {name} counter\n{name} {stale}"
    );
    let name = "flotilla_scheduler_run_updates_total";
    let _ = writeln!(
        out,
        "# HELP {name} Run updates proposed by this node's scheduler, as patches or whole runs.\n# TYPE {name} counter"
    );
    for (form, n) in
        [("patch", &ctx.scheduler_stats.patched_updates), ("whole", &ctx.scheduler_stats.whole_updates)]
    {
        let _ = writeln!(out, "{name}{{form=\"{form}\"}} {}", n.load(std::sync::atomic::Ordering::Relaxed));
    }
    let name = "flotilla_forwarded_writes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Writes this node forwarded to the leader, in one request with others or alone.\n# TYPE {name} counter"
    );
    let (together, alone) = ctx.node.forwarded_writes();
    for (form, n) in [("together", together), ("alone", alone)] {
        let _ = writeln!(out, "{name}{{form=\"{form}\"}} {n}");
    }
    ctx.metrics.render(&mut out);
    out
}

/// Starts a node (store, Raft, HTTP) and serves it until `shutdown` resolves; then stops
/// serving before stopping Raft, so no RPC arrives at a stopped Raft.
pub async fn serve_node(
    node_cfg: flotilla_raft::NodeConfig,
    listen: SocketAddr,
    cfg: ServerConfig,
    on_ready: impl FnOnce(&Arc<RaftNode>, SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = bind(listen).await.map_err(|e| ServeError::Bind(listen, e))?;
    let local = listener.local_addr().map_err(|e| ServeError::Bind(listen, e))?;
    let data_dir = node_cfg.data_dir.clone();
    let node = RaftNode::start(node_cfg).await?;
    on_ready(&node, local);
    let scheduler_cfg = cfg.scheduler.clone();
    let gc_cfg = cfg.gc.clone();
    let ost_url =
        cfg.ost_url.clone().unwrap_or_else(|| format!("file://{}", node_cfg_ost_dir(&data_dir).display()));
    let ost = Ost::open(&ost_url).await?;
    tracing::info!(ost = %ost.describe(), "object storage");
    let ctx =
        Ctx::new(node.clone(), cfg, ost.clone(), data_dir.join("logspool")).map_err(ServeError::Spool)?;
    // SIGHUP re-reads the token files; one that does not load leaves the tokens as they were.
    let reloading = ctx.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
        let mut closing = reloading.closing();
        loop {
            tokio::select! {
                _ = hup.recv() => match reloading.reload_tokens() {
                    Ok(n) => tracing::info!(tokens = n, "tokens reloaded"),
                    Err(e) => tracing::warn!(error = %e, "tokens file not reloaded; the old tokens stay"),
                },
                _ = closing.changed() => return,
            }
        }
    });
    let scheduler = tokio::spawn(flotilla_scheduler::run(
        node.clone(),
        scheduler_cfg,
        ctx.scheduler_stats.clone(),
        ctx.closing(),
    ));
    let gc = tokio::spawn(flotilla_scheduler::gc::run(node.clone(), ost.clone(), gc_cfg, ctx.closing()));
    let archiver = tokio::spawn(flotilla_scheduler::archive::run(
        node.clone(),
        ost,
        ctx.cfg.archive.clone(),
        ctx.closing(),
    ));
    // SIGTERM drains: a leader hands leadership to an up-to-date voter while this node
    // still serves (requests arriving meanwhile are forwarded to the new leader), then the
    // listener stops taking connections and in-flight requests finish.
    let draining = node.clone();
    let drain = async move {
        shutdown.await;
        if draining.is_leader() {
            let started = std::time::Instant::now();
            match draining.hand_over_leadership().await {
                Ok(to) => {
                    tracing::info!(to, ms = started.elapsed().as_millis() as u64, "leadership handed over")
                }
                Err(why) => tracing::warn!(%why, "stopping without a leadership handover"),
            }
        }
    };
    run(listener, ctx, drain).await;
    let _ = scheduler.await;
    let _ = gc.await;
    let _ = archiver.await;
    tracing::info!("HTTP server stopped; stopping raft");
    node.shutdown().await;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(transparent)]
    Start(#[from] flotilla_raft::StartError),
    #[error(transparent)]
    Ost(#[from] flotilla_store::ost::OstError),
    #[error("cannot prepare the log spool: {0}")]
    Spool(std::io::Error),
}

/// The default object storage of a node: `<data dir>/ost`.
pub fn node_cfg_ost_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf()).join("ost")
}
