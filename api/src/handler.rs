//! What every handler shares: the node's context ([`Ctx`]), a request as handlers see it
//! ([`Request`]), their answers ([`Reply`]) and the write and read paths through Raft. The
//! accept loop and the dispatch on the route table are `server.rs`; the handlers live in
//! `server.rs` (cluster, kv, maintenance), `runs.rs`, `lifecycle.rs`, `objects.rs`,
//! `tasks.rs` and `ui.rs`, and depend on this module, never on `server.rs`: the modules of
//! this crate have no import cycles.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_raft::network::{LOG_FORMAT, LOG_FORMAT_HEADER, MSGPACK};
use flotilla_raft::RaftNode;
use flotilla_store::limits::{BODY_PERMIT_WAIT_MS, MAX_LARGE_API_BODIES, MAX_LARGE_RAFT_BODIES};
use flotilla_store::ost::{ObjectStream, Ost};
use flotilla_store::{Command, Response};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use warp::http::{Method, StatusCode};

use crate::auth::{Caller, Need};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// How a node serves its API: tokens, CORS, the leader-only jobs' settings, connections, TLS.
pub struct ServerConfig {
    /// Where the tokens come from (`--tokens-file`, `--token-file`, …), read at start and
    /// again on `SIGHUP` ([`Ctx::reload_tokens`]). No token at all: every request passes.
    pub tokens: crate::auth::TokenFiles,
    /// Cross-origin requests (`--allowed-origins`; off by default).
    pub cors: crate::cors::Cors,
    pub scheduler: flotilla_scheduler::SchedulerConfig,
    /// `--ost` URL; `None` means `file://<data dir>/ost`.
    pub ost_url: Option<String>,
    /// Garbage collection of the object storage (leader only).
    pub gc: flotilla_scheduler::gc::GcConfig,
    /// The run archive (leader only).
    pub archive: flotilla_scheduler::archive::ArchiveConfig,
    /// Open connections served at once (`--max-connections`, default `MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// HTTPS on the listener (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
    pub tls: Option<crate::tls::ServerTls>,
}

/// What every handler can reach.
pub struct Ctx {
    pub node: Arc<RaftNode>,
    pub cfg: ServerConfig,
    pub metrics: Metrics,
    pub scheduler_stats: Arc<flotilla_scheduler::SchedulerStats>,
    pub ost: Ost,
    pub(crate) archive: crate::archive::Archive,
    pub(crate) live_logs: crate::spool::LiveLogs,
    pub(crate) peers: reqwest::Client,
    /// For forwarded requests whose answers stream (no overall timeout).
    pub(crate) streams: reqwest::Client,
    /// Turns true when the server starts shutting down: ends long polls and event streams
    /// so that a graceful shutdown does not wait for them.
    pub(crate) closing_tx: watch::Sender<bool>,
    /// Open event streams, bounded by `MAX_EVENT_SUBSCRIBERS`.
    pub(crate) event_subscribers: Arc<std::sync::atomic::AtomicUsize>,
    /// Permits to read a large body: API routes, Raft routes.
    pub(crate) large_bodies: [tokio::sync::Semaphore; 2],
    /// The tokens in force (replaced whole by a reload).
    pub(crate) tokens: std::sync::RwLock<Arc<crate::auth::Tokens>>,
    /// Heartbeats that only refresh `last_seen`, written in batches.
    pub(crate) refreshes: crate::refresh::Refreshes,
}

impl Ctx {
    /// `spool_dir` holds the logs being written on this node (emptied at start).
    pub fn new(
        node: Arc<RaftNode>,
        cfg: ServerConfig,
        ost: Ost,
        spool_dir: std::path::PathBuf,
    ) -> std::io::Result<Arc<Ctx>> {
        // Idle connections are let go before a server closes them (HEADER_READ_TIMEOUT_MS).
        let idle = Duration::from_secs(15);
        let peers = flotilla_raft::tls::client_builder()
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(2))
            .pool_idle_timeout(idle)
            .build()
            .expect("static client settings");
        let streams = flotilla_raft::tls::client_builder()
            .connect_timeout(Duration::from_millis(500))
            .pool_idle_timeout(idle)
            .build()
            .expect("static client settings");
        let (closing_tx, _) = watch::channel(false);
        let live_logs = crate::spool::LiveLogs::new(spool_dir)?;
        let tokens = cfg.tokens.load().map_err(std::io::Error::other)?;
        Ok(Arc::new(Ctx {
            refreshes: crate::refresh::Refreshes::start(&node),
            node,
            cfg,
            metrics: Metrics::default(),
            scheduler_stats: Arc::default(),
            archive: crate::archive::Archive::new(ost.clone()),
            ost,
            live_logs,
            peers,
            streams,
            closing_tx,
            event_subscribers: Default::default(),
            tokens: std::sync::RwLock::new(Arc::new(tokens)),
            large_bodies: [
                tokio::sync::Semaphore::new(MAX_LARGE_API_BODIES),
                tokio::sync::Semaphore::new(MAX_LARGE_RAFT_BODIES),
            ],
        }))
    }

    /// A permit to read one large body, waited for at most `BODY_PERMIT_WAIT_MS`.
    pub(crate) async fn body_permit(&self, raft: bool) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
        let wait = Duration::from_millis(BODY_PERMIT_WAIT_MS);
        match tokio::time::timeout(wait, self.large_bodies[usize::from(raft)].acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::new(
                503,
                "busy",
                format!(
                    "this node is reading {} large request bodies already; retry shortly",
                    if raft { MAX_LARGE_RAFT_BODIES } else { MAX_LARGE_API_BODIES }
                ),
            )),
        }
    }

    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.closing_tx.subscribe()
    }

    /// Re-reads every token file (`SIGHUP`). A file that does not load changes nothing.
    pub fn reload_tokens(&self) -> Result<usize, String> {
        let tokens = self.cfg.tokens.load()?;
        let n = tokens.len();
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
        Ok(n)
    }

    /// The caller of a request that needs `need`: 401 without a known token, 403 when its
    /// role does not allow the route. A node without tokens lets everyone through.
    pub(crate) fn authorize(
        &self,
        need: Need,
        authorization: Option<&str>,
    ) -> Result<Option<Caller>, ApiError> {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner()).clone();
        if need == Need::Nothing || tokens.is_open() {
            return Ok(tokens.authenticate(authorization));
        }
        let caller = tokens.authenticate(authorization).ok_or_else(ApiError::unauthorized)?;
        if !caller.role.may(need) {
            return Err(ApiError::new(
                403,
                "forbidden",
                format!(
                    "token {:?} has the role {}; this route needs {}",
                    caller.name,
                    caller.role.name(),
                    need.name()
                ),
            ));
        }
        Ok(Some(caller))
    }
}

pub(crate) enum Reply {
    Json(u16, Vec<u8>),
    Text(u16, &'static str, String),
    Msgpack(Vec<u8>),
    Empty,
    /// A streamed response (server-sent events).
    Raw(warp::reply::Response),
}

pub(crate) fn json<T: Serialize>(status: u16, v: &T) -> Reply {
    Reply::Json(status, serde_json::to_vec(v).unwrap_or_default())
}

impl warp::Reply for Reply {
    fn into_response(self) -> warp::reply::Response {
        let raft = matches!(self, Reply::Msgpack(_));
        let (status, ct, body): (u16, &str, Vec<u8>) = match self {
            Reply::Json(s, b) => (s, "application/json", b),
            Reply::Text(s, ct, t) => (s, ct, t.into_bytes()),
            Reply::Msgpack(b) => (200, MSGPACK, b),
            Reply::Empty => (204, "application/json", Vec::new()),
            Reply::Raw(resp) => return resp,
        };
        let mut resp = warp::reply::Response::new(body.into());
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        resp.headers_mut().insert(
            "content-type",
            warp::http::HeaderValue::from_static(match ct {
                "application/json" => "application/json",
                MSGPACK => MSGPACK,
                _ => "text/plain; version=0.0.4; charset=utf-8",
            }),
        );
        if raft {
            // What this node can read of a leader's log: see `LOG_FORMAT`.
            resp.headers_mut().insert(LOG_FORMAT_HEADER, warp::http::HeaderValue::from(LOG_FORMAT));
        }
        resp
    }
}

pub(crate) struct Request<'a> {
    pub method: Method,
    pub segments: &'a [&'a str],
    pub query: HashMap<String, String>,
    pub raw_query: String,
    pub auth: Option<String>,
    /// Sent on by another node (never forwarded again).
    pub forwarded: bool,
    /// The `Idempotency-Key` header (`POST /api/v1/runs`).
    pub idempotency_key: Option<String>,
    /// The `content-length` header (the size of a streamed upload, when given).
    pub content_length: Option<u64>,
    /// The body read whole (empty for a streamed upload).
    pub body: Bytes,
    /// Who sent it: the name and role of its token (`None` on a node without tokens).
    pub caller: Option<crate::auth::Caller>,
}

impl Request<'_> {
    /// `cmd` on behalf of the caller: its events name the caller's token (nothing changes
    /// on a node without named tokens).
    pub(crate) fn acted(&self, cmd: Command) -> Command {
        match &self.caller {
            Some(c) => Command::Acted { actor: c.name.clone(), cmd: Box::new(cmd) },
            None => cmd,
        }
    }

    pub(crate) fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.body.is_empty() {
            return Err(ApiError::bad_request("request body is empty; a JSON object is expected"));
        }
        // Strict: a struct only from a JSON object, at any depth (serde alone also reads a
        // struct from a positional array).
        crate::strict_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }

    pub(crate) fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.query.get(name).map(String::as_str) {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") | Some("") => Ok(true),
            Some(other) => {
                Err(ApiError::bad_request(format!("query parameter {name}={other:?} is not a boolean")))
            }
        }
    }

    pub(crate) fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.query
            .get(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::bad_request(format!("query parameter {name}={v:?} is not a number"))
                })
            })
            .transpose()
    }
}

pub(crate) fn unexpected(r: Response) -> ApiError {
    match r {
        Response::Rejected(e) => e.into(),
        other => {
            tracing::error!(response = ?other, "unexpected response to a command");
            ApiError::internal()
        }
    }
}

/// A decoded segment encoded again for a URL (a request forwarded to the leader).
pub(crate) fn encode_segment(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

/// Proposes a command and records its latency; refusals become 4xx errors.
pub(crate) async fn write(ctx: &Ctx, cmd: Command) -> Result<Response, ApiError> {
    Ok(write_at(ctx, cmd).await?.1)
}

/// [`write`], also returning the log index of the write.
pub(crate) async fn write_at(ctx: &Ctx, cmd: Command) -> Result<(u64, Response), ApiError> {
    let kind = cmd.kind();
    settle(ctx, kind, ctx.node.write(cmd)).await
}

/// Awaits a proposal of a command of `kind` (however it was sent), records its latency and
/// turns a refusal into a 4xx error.
pub(crate) async fn settle(
    ctx: &Ctx,
    kind: &'static str,
    proposal: impl std::future::Future<Output = Result<(u64, Response), flotilla_raft::NodeError>>,
) -> Result<(u64, Response), ApiError> {
    let start = Instant::now();
    let result = proposal.await;
    ctx.metrics.write(
        kind,
        matches!(&result, Ok((_, r)) if !matches!(r, Response::Rejected(_))),
        start.elapsed(),
    );
    let (index, response) = result?;
    match response {
        Response::Rejected(e) => Err(e.into()),
        ok => Ok((index, ok)),
    }
}

/// Linearizable unless `?stale=true`.
pub(crate) async fn read_barrier(ctx: &Ctx, req: &Request<'_>) -> Result<(), ApiError> {
    if !req.flag("stale")? {
        ctx.node.linearizable_barrier().await?;
    }
    Ok(())
}

/// A 200 streaming `stream` as `application/octet-stream` (text for logs is fine too).
pub(crate) fn stream_reply(mut stream: ObjectStream) -> Reply {
    // warp wants a Sync stream: relay through a channel.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    let body = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut resp = warp::Reply::into_response(warp::reply::stream(body));
    resp.headers_mut()
        .insert("content-type", warp::http::HeaderValue::from_static("application/octet-stream"));
    Reply::Raw(resp)
}
