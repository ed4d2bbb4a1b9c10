//! Bulky data through the servers: step logs (appended live by executors, stored in the
//! object storage when the step ends, read by clients while running and after), workspace
//! archives and caches (streamed between executors and the object storage). Executors
//! push everything here; they need no inbound connectivity and no ost credentials.
//!
//! Live logs are spooled to a file under the data dir of the node receiving them. Log
//! appends reaching a follower are forwarded to the leader, and a follower asked for a
//! log it does not hold forwards the request too, so a running step's log lives on the
//! leader. After a failover the new leader has no spool: appends carry the executor's
//! offset, the answer carries the server's size, and the executor resends from there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_store::executor::executor_task_id;
use flotilla_store::limits::{MAX_ARCHIVE_BYTES, MAX_LOG_BYTES};
use flotilla_store::ost::keys::{self, LogStep};
use flotilla_store::ost::{read_file_range, reader_stream, ObjectStream, OstError};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::error::ApiError;
use crate::handler::{json, stream_reply, Ctx, Reply, Request};
use crate::spool::{LiveLog, LiveState};

pub use flotilla_client::types::{CacheMatch, LogAppended, Stored};

/// Header marking a request one node forwarded to another (never forwarded again).
pub const FORWARDED: &str = "x-flotilla-forwarded";

/// `POST /api/v1/executor/{id}/tasks/{task_id}/logs/{step}?offset=N[&final=true]`.
pub(crate) async fn append_log(
    ctx: &Arc<Ctx>,
    executor: &str,
    task_id: &str,
    step: &str,
    req: &Request<'_>,
) -> Result<Reply, ApiError> {
    let step = LogStep::parse(step)
        .ok_or_else(|| ApiError::bad_request(format!("log step {step:?} is not a number or 'setup'")))?;
    let offset = req.number("offset")?.ok_or_else(|| ApiError::bad_request("offset is required"))?;
    let is_final = req.flag("final")?;
    if !ctx.node.is_leader() && !req.forwarded {
        return forward_to_leader(ctx, req).await;
    }
    let run_id = task_owner(ctx, executor, task_id).await?;
    check_step_exists(ctx, task_id, &step)?;
    let key = keys::log(task_id, step.clone());
    let live = ctx.live_logs.get_or_create(task_id, &step);
    let _guard = live.write.lock().await;
    let mut state = *live.state.borrow();
    if state.size == 0 && !state.stored {
        // Nothing here: the log may already be stored (a retried final append).
        if let Ok(info) = ctx.ost.stat(&key).await {
            state = LiveState { size: info.size, stored: true };
            live.state.send_replace(state);
        }
    }
    if state.stored {
        return Ok(json(200, &LogAppended { size: state.size, stored: true }));
    }
    let end = offset
        .checked_add(req.body.len() as u64)
        .ok_or_else(|| ApiError::bad_request("offset out of range"))?;
    if offset <= state.size && end > state.size {
        if end > MAX_LOG_BYTES {
            return Err(ApiError::new(
                413,
                "payload_too_large",
                format!("a step log is at most {MAX_LOG_BYTES} bytes"),
            ));
        }
        let new = &req.body[(state.size - offset) as usize..];
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&live.path)
            .await
            .map_err(spool_error)?;
        file.write_all(new).await.map_err(spool_error)?;
        file.flush().await.map_err(spool_error)?;
        state.size = end;
        live.state.send_replace(state);
    }
    if is_final && end == state.size {
        // Reference first, data second: data without a reference is garbage to collect.
        ctx.ost.put_bytes(&keys::run_ref(keys::LOGS, task_id, &run_id), Bytes::new(), true).await?;
        let file = match tokio::fs::File::open(&live.path).await {
            Ok(f) => reader_stream(f, 256 * 1024),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Box::pin(futures::stream::empty()),
            Err(e) => return Err(spool_error(e)),
        };
        ctx.ost.put(&key, file, Some(state.size), true).await?;
        state.stored = true;
        live.state.send_replace(state);
        // Readers still tailing the spool switch to the object once they see `stored`.
        let (logs, path) = (ctx.clone(), live.path.clone());
        let task_id = task_id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            logs.live_logs.remove(&task_id, &step);
            let _ = tokio::fs::remove_file(path).await;
        });
    }
    Ok(json(200, &LogAppended { size: state.size, stored: state.stored }))
}

/// The run of executor task `task_id`, checked to belong to `executor`, read after a
/// linearizable barrier (a lagging node must not answer 404 for a task it has not
/// applied yet).
async fn task_owner(ctx: &Ctx, executor: &str, task_id: &str) -> Result<String, ApiError> {
    ctx.node.linearizable_barrier().await?;
    let sm = ctx.node.state.read();
    let task = sm
        .state
        .executor_tasks
        .get(task_id)
        .ok_or_else(|| ApiError::not_found(format!("executor task {task_id:?} not found")))?;
    if task.spec.executor_id != executor {
        return Err(ApiError::conflict(format!("executor task {task_id:?} belongs to another executor")));
    }
    Ok(task.spec.run_id.clone())
}

/// A log is stored only for a step the task has (404 for step 99 of a 2-step task).
fn check_step_exists(ctx: &Ctx, task_id: &str, step: &LogStep) -> Result<(), ApiError> {
    let LogStep::Step(n) = *step else { return Ok(()) };
    let sm = ctx.node.state.read();
    let steps = sm.state.executor_tasks.get(task_id).and_then(|t| {
        sm.state
            .run_configs
            .get(&t.spec.run_id)
            .and_then(|c| c.task(&t.spec.task_name))
            .map(|t| t.steps.len())
    });
    match steps {
        Some(steps) if n < steps => Ok(()),
        Some(steps) => Err(ApiError::not_found(format!(
            "executor task {task_id:?} has {steps} steps (numbered from 0): there is no step {n}"
        ))),
        None => Err(ApiError::not_found(format!("executor task {task_id:?} not found"))),
    }
}

fn spool_error(e: std::io::Error) -> ApiError {
    tracing::error!(error = %e, "log spool I/O failed");
    ApiError::internal()
}

/// `GET /api/v1/runs/{id}/tasks/{task}/logs?step=N|setup[&follow=true]`.
pub(crate) async fn get_log(
    ctx: &Arc<Ctx>,
    run_id: &str,
    task: &str,
    req: &Request<'_>,
) -> Result<Reply, ApiError> {
    let follow = req.flag("follow")?;
    // The run may be live or archived: its logs outlive its place in the state.
    let (run, config) = crate::tasks::find_run(ctx, run_id, req).await?;
    let step = match (req.query.get("container"), req.query.get("step")) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give either step or container, not both")),
        // A service container's whole output (`run logs ID TASK --container db`).
        (Some(name), None) => {
            flotilla_store::pod::validate_hostname("container", name).map_err(ApiError::bad_request)?;
            LogStep::Container(name.clone())
        }
        // `step=N`, `step=setup`, `step=<a run step's name>`, or none: see `resolve_step`.
        (None, step) => crate::tasks::resolve_step(&run, &config, task, step.map(String::as_str))?,
    };
    let steps = run.tasks.get(task).map_or(0, |t| t.steps.len());
    let restored_from = run.tasks.get(task).and_then(|t| t.restored_from.clone());
    if let LogStep::Step(n) = step {
        if n >= steps {
            return Err(ApiError::not_found(format!("task {task:?} has {steps} steps (numbered from 0)")));
        }
    }
    // A task kept by a restart shares the logs of the run that ran it.
    let task_id = executor_task_id(restored_from.as_deref().unwrap_or(run_id), task);
    let key = keys::log(&task_id, step.clone());
    if let Some(live) = ctx.live_logs.get(&task_id, &step) {
        return Ok(stream_reply(tail(ctx.clone(), live, key, follow, run_id.to_string(), task.to_string())));
    }
    match ctx.ost.get(&key).await {
        Ok(stream) => return Ok(stream_reply(stream)),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    if !ctx.node.is_leader() && !req.forwarded {
        return forward_to_leader(ctx, req).await;
    }
    if !follow {
        return Err(ApiError::not_found(format!(
            "the log of step {step} of task {task:?} is not available (not started, or lost)"
        )));
    }
    // Follow a log that has not started yet: wait for it, or for the task to end.
    let (ctx2, run_id, task) = (ctx.clone(), run_id.to_string(), task.to_string());
    let waiting: ObjectStream = Box::pin(
        futures::stream::once(async move {
            let mut closing = ctx2.closing();
            loop {
                if let Some(live) = ctx2.live_logs.get(&task_id, &step) {
                    return tail(ctx2.clone(), live, key, true, run_id, task);
                }
                if let Ok(s) = ctx2.ost.get(&key).await {
                    return s;
                }
                if task_ended(&ctx2, &run_id, &task) || *closing.borrow() {
                    return Box::pin(futures::stream::empty()) as ObjectStream;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = closing.changed() => {}
                }
            }
        })
        .flatten(),
    );
    Ok(stream_reply(waiting))
}

/// The bytes of a live log from the start; with `follow`, until it is stored (or the
/// task ended without storing it: a lost executor). Once stored, the rest comes from the
/// object storage, so a slow reader never misses the end when the spool is removed.
fn tail(
    ctx: Arc<Ctx>,
    live: Arc<LiveLog>,
    key: String,
    follow: bool,
    run_id: String,
    task: String,
) -> ObjectStream {
    enum Mode {
        Spool(u64, watch::Receiver<LiveState>),
        Rest(ObjectStream),
        Done,
    }
    let path = live.path.clone();
    let start = Mode::Spool(0, live.state.subscribe());
    Box::pin(futures::stream::unfold(start, move |mode| {
        let (ctx, path, key, run_id, task) =
            (ctx.clone(), path.clone(), key.clone(), run_id.clone(), task.clone());
        async move {
            match mode {
                Mode::Done => None,
                Mode::Rest(mut s) => s.next().await.map(|item| (item, Mode::Rest(s))),
                Mode::Spool(pos, mut rx) => loop {
                    let state = *rx.borrow_and_update();
                    if pos < state.size {
                        if let Ok(chunk) =
                            read_file_range(&path, pos, (state.size - pos).min(256 * 1024)).await
                        {
                            if !chunk.is_empty() {
                                let next = pos + chunk.len() as u64;
                                return Some((Ok(chunk), Mode::Spool(next, rx)));
                            }
                        }
                    }
                    if state.stored || pos < state.size {
                        return match ctx.ost.get_range(&key, pos, None).await {
                            Ok(mut s) => s.next().await.map(|item| (item, Mode::Rest(s))),
                            Err(e) => Some((Err(std::io::Error::other(e)), Mode::Done)),
                        };
                    }
                    if !follow || *ctx.closing().borrow() || task_ended(&ctx, &run_id, &task) {
                        return None;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
                },
            }
        }
    }))
}

fn task_ended(ctx: &Ctx, run_id: &str, task: &str) -> bool {
    let sm = ctx.node.state.read();
    sm.state.runs.get(run_id).and_then(|r| r.tasks.get(task)).is_none_or(|t| t.status.is_final())
}

/// Sends the request on to the leader and relays its answer (streamed).
pub(crate) async fn forward_to_leader(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let leader =
        ctx.node.leader_url().ok_or_else(|| ApiError::unavailable("no leader known; retry shortly"))?;
    let mut url = format!(
        "{leader}/{}",
        req.segments.iter().map(|s| crate::handler::encode_segment(s)).collect::<Vec<_>>().join("/")
    );
    if !req.raw_query.is_empty() {
        url = format!("{url}?{}", req.raw_query);
    }
    let mut r = ctx.streams.request(req.method.clone(), url).header(FORWARDED, "1").body(req.body.clone());
    if let Some(auth) = &req.auth {
        r = r.header("authorization", auth);
    }
    let resp = r.send().await.map_err(|e| ApiError::unavailable(format!("cannot reach the leader: {e}")))?;
    let status = resp.status().as_u16();
    let content_type = resp.headers().get("content-type").cloned();
    let stream: ObjectStream = Box::pin(resp.bytes_stream().map(|r| r.map_err(std::io::Error::other)));
    let Reply::Raw(mut out) = stream_reply(stream) else { unreachable!() };
    *out.status_mut() =
        warp::http::StatusCode::from_u16(status).unwrap_or(warp::http::StatusCode::BAD_GATEWAY);
    if let Some(ct) = content_type {
        out.headers_mut().insert("content-type", ct);
    }
    Ok(Reply::Raw(out))
}

/// The body of a streamed upload, refused over `MAX_ARCHIVE_BYTES` from its declared size
/// and cut off with an error once it passes it, with its declared size.
fn upload_body(
    req: &Request<'_>,
    body: Option<ObjectStream>,
) -> Result<(ObjectStream, Option<u64>), ApiError> {
    let body = body.ok_or_else(|| {
        tracing::error!(path = ?req.segments, "an upload route was dispatched with its body read");
        ApiError::internal()
    })?;
    let size = req.content_length;
    if size.is_some_and(|s| s > MAX_ARCHIVE_BYTES) {
        return Err(ApiError::payload_too_large(MAX_ARCHIVE_BYTES));
    }
    Ok((capped(body, MAX_ARCHIVE_BYTES), size))
}

/// `PUT /api/v1/executor/{id}/tasks/{task_id}/archives/{step}`, the body streamed into
/// the ost.
pub(crate) async fn upload_archive(
    ctx: &Ctx,
    executor: &str,
    task_id: &str,
    step: &str,
    req: &Request<'_>,
    body: Option<ObjectStream>,
) -> Result<Reply, ApiError> {
    let (body, size) = upload_body(req, body)?;
    let step: usize =
        step.parse().map_err(|_| ApiError::bad_request(format!("step {step:?} is not a number")))?;
    let run_id = task_owner(ctx, executor, task_id).await?;
    ctx.ost.put_bytes(&keys::run_ref(keys::ARCHIVES, task_id, &run_id), Bytes::new(), true).await?;
    let key = keys::archive(task_id, step);
    let size = ctx.ost.put(&key, body, size, true).await?;
    Ok(json(201, &Stored { key, size }))
}

/// `PUT /api/v1/executor/{id}/caches?group=G&key=K`, the body streamed into the ost.
pub(crate) async fn upload_cache(
    ctx: &Ctx,
    req: &Request<'_>,
    body: Option<ObjectStream>,
) -> Result<Reply, ApiError> {
    let (body, size) = upload_body(req, body)?;
    let (group, key) = cache_params(&req.query)?;
    let object = keys::cache(group, key)?;
    // A cache key names one content: the first save wins, later ones are no-ops.
    if ctx.ost.exists(&object).await? {
        return Ok(json(200, &Stored { key: key.to_string(), size: ctx.ost.stat(&object).await?.size }));
    }
    let size = ctx.ost.put(&object, body, size, true).await?;
    Ok(json(201, &Stored { key: key.to_string(), size }))
}

fn cache_params(query: &HashMap<String, String>) -> Result<(&str, &str), ApiError> {
    let group =
        query.get("group").map(String::as_str).ok_or_else(|| ApiError::bad_request("group is required"))?;
    let key = query.get("key").map(String::as_str).ok_or_else(|| ApiError::bad_request("key is required"))?;
    Ok((group, key))
}

/// Ends the stream with an error once it passed `limit` bytes.
fn capped(body: ObjectStream, limit: u64) -> ObjectStream {
    let mut seen = 0u64;
    Box::pin(body.map(move |chunk| {
        let chunk = chunk?;
        seen += chunk.len() as u64;
        if seen > limit {
            return Err(std::io::Error::other(format!("upload larger than {limit} bytes")));
        }
        Ok(chunk)
    }))
}

/// `GET /api/v1/executor/{id}/archives/{task_id}/{step}`: an archive of an ancestor task.
pub(crate) async fn download_archive(ctx: &Ctx, task_id: &str, step: &str) -> Result<Reply, ApiError> {
    let step: usize =
        step.parse().map_err(|_| ApiError::bad_request(format!("step {step:?} is not a number")))?;
    Ok(stream_reply(ctx.ost.get(&keys::archive(task_id, step)).await?))
}

/// `GET /api/v1/executor/{id}/caches?group=G&key=K`: the cache itself.
pub(crate) async fn download_cache(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let (group, key) = cache_params(&req.query)?;
    Ok(stream_reply(ctx.ost.get(&keys::cache(group, key)?).await?))
}

/// `GET /api/v1/executor/{id}/caches/match?group=G&prefix=P`: the first key by prefix.
pub(crate) async fn match_cache(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let group = req
        .query
        .get("group")
        .map(String::as_str)
        .ok_or_else(|| ApiError::bad_request("group is required"))?;
    let prefix = req.query.get("prefix").map(String::as_str).unwrap_or("");
    if prefix.contains('/') {
        return Err(OstError::InvalidKey {
            key: prefix.to_string(),
            reason: "a cache key cannot contain '/'",
        }
        .into());
    }
    let dir = keys::cache_dir(group)?;
    let found = ctx.ost.list(&format!("{dir}{prefix}"), None, 100).await?;
    let key = found.iter().find_map(|o| keys::cache_key_of(&dir, &o.key)).map(str::to_string);
    Ok(json(200, &CacheMatch { key }))
}
