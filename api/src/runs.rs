//! Handlers for runs, events and executors (their routes are declared in `routes.rs`).
//!
//! User-facing: create, list, get, stop, annotate and approve runs; the event stream;
//! executor admin. Executor-facing (`/api/v1/executor/{id}/...`, executor token):
//! heartbeat, fetch tasks (a long poll on the executor's `tasks_revision`, so a task made
//! ready reaches its executor as soon as the scheduler's write is applied), and status.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use flotilla_scheduler::now_ms;
use flotilla_store::executor::{task_data, validate_executor_id, ExecutorInfo, ExecutorTaskStatus};
use flotilla_store::limits::{
    DEFAULT_LIST_LIMIT, EVENT_KEEPALIVE_MS, MAX_EVENT_SUBSCRIBERS, MAX_LIST_LIMIT, MAX_LONG_POLL_MS,
};
use flotilla_store::run::{group_matches, Phase, RunCreate, RunPhase};
use flotilla_store::{Command, Response};
use tokio::sync::broadcast::error::RecvError;

use crate::error::ApiError;
use crate::handler::{json, read_barrier, settle, unexpected, write, write_at, Ctx, Reply, Request};
use crate::types::*;

/// `POST /api/v1/runs`, with or without an `Idempotency-Key`.
pub(crate) async fn create_run(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    match &req.idempotency_key {
        Some(key) => crate::lifecycle::create_run_idempotent(ctx, req, key).await,
        None => create_new_run(ctx, req).await,
    }
}

/// `GET /api/v1/runs/{id}`: live or archived.
pub(crate) async fn get_run(ctx: &Ctx, id: &str, req: &Request<'_>) -> Result<Reply, ApiError> {
    read_barrier(ctx, req).await?;
    let manifest = {
        let sm = ctx.node.state.read();
        if let Some(run) = sm.state.runs.get(id) {
            return Ok(json(200, run));
        }
        sm.state.archive.clone()
    };
    match ctx.archive.get(&manifest, id).await? {
        Some(a) => Ok(json(200, &a.run)),
        None => Err(ApiError::not_found(format!("run {id} not found"))),
    }
}

/// `GET /api/v1/archive`.
pub(crate) async fn archive_status(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    read_barrier(ctx, req).await?;
    let sm = ctx.node.state.read();
    let a = &sm.state.archive;
    let body = crate::types::ArchiveStatus {
        generation: a.generation,
        files: a.files.len() as u64,
        runs: a.archived_runs(),
        bytes: a.files.iter().map(|f| f.bytes).sum(),
        runs_in_state: sm.state.runs.len() as u64,
    };
    Ok(json(200, &body))
}

/// `POST /api/v1/archive/index`.
pub(crate) async fn dump_archive_index(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    read_barrier(ctx, req).await?;
    let dump = flotilla_scheduler::archive::dump_index(&ctx.node, &ctx.ost).await?;
    Ok(json(200, &crate::types::IndexDumped { key: dump.key, runs: dump.runs, bytes: dump.bytes }))
}

/// `PUT /api/v1/runs/{id}/actions`: stop or restart.
pub(crate) async fn run_action(ctx: &Ctx, id: &str, req: &Request<'_>) -> Result<Reply, ApiError> {
    let body: serde_json::Value = req.json()?;
    if !body.is_object() {
        return Err(ApiError::bad_request("invalid JSON body: the body must be a JSON object"));
    }
    match body.get("action").and_then(|a| a.as_str()) {
        Some("stop") => {
            let _: ActionRequest = req.json()?;
            expect_done(write(ctx, req.acted(Command::StopRun { run_id: id.to_string() })).await?)
        }
        Some("restart") => crate::lifecycle::restart(ctx, id, req).await,
        other => Err(ApiError::bad_request(format!(
            "unknown run action {:?}; known: stop, restart",
            other.unwrap_or_default()
        ))),
    }
}

/// `PUT /api/v1/runs/{id}/tasks/{task}/annotations`.
pub(crate) async fn set_annotations(
    ctx: &Ctx,
    id: &str,
    task: &str,
    req: &Request<'_>,
) -> Result<Reply, ApiError> {
    let body: AnnotationsRequest = req.json()?;
    let cmd = Command::SetTaskAnnotations {
        run_id: id.to_string(),
        task: task.to_string(),
        annotations: body.annotations,
    };
    expect_done(write(ctx, req.acted(cmd)).await?)
}

/// `PUT /api/v1/runs/{id}/tasks/{task}/actions`: approve.
pub(crate) async fn task_action(
    ctx: &Ctx,
    id: &str,
    task: &str,
    req: &Request<'_>,
) -> Result<Reply, ApiError> {
    let body: ActionRequest = req.json()?;
    match body.action.as_str() {
        "approve" => {
            // The caller is recorded as an approver (`approver/<token name>`); a node without
            // named tokens approves at once, as before.
            let approver = req.caller.as_ref().map(|c| c.name.clone());
            let cmd = Command::ApproveTask { run_id: id.to_string(), task: task.to_string(), approver };
            expect_done(write(ctx, cmd).await?)
        }
        other => Err(ApiError::bad_request(format!("unknown task action {other:?}; known: approve"))),
    }
}

/// `GET /api/v1/executors`, each with its count of active tasks.
pub(crate) async fn list_executors(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    read_barrier(ctx, req).await?;
    let sm = ctx.node.state.read();
    let counts = flotilla_scheduler::decide::active_counts(&sm.state);
    let executors = sm
        .state
        .executors
        .values()
        .map(|e| {
            let mut e = e.clone();
            e.info.active_tasks = counts.get(&e.id).copied().unwrap_or(0);
            e
        })
        .collect();
    Ok(json(200, &ExecutorList { executors }))
}

/// `DELETE /api/v1/executors/{id}`.
pub(crate) async fn delete_executor(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    expect_done(write(ctx, Command::DeleteExecutor { id: id.to_string(), if_last_seen: None }).await?)
}

fn expect_done(r: Response) -> Result<Reply, ApiError> {
    match r {
        Response::Done { .. } | Response::ArchiveChanged { .. } => Ok(Reply::Empty),
        other => Err(unexpected(other)),
    }
}

async fn create_new_run(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let create: RunCreate = req.json()?;
    create.validate().map_err(|e| ApiError::bad_request(format!("invalid run: {e}")))?;
    let (index, response) =
        write_at(ctx, req.acted(Command::CreateRun { create: Box::new(create), now_ms: now_ms() })).await?;
    let Response::RunCreated { run_id } = response else { return Err(unexpected(response)) };
    // The write is applied on the leader; this node may be a follower a little behind.
    ctx.node.wait_applied(index).await?;
    let manifest = {
        let sm = ctx.node.state.read();
        if let Some(run) = sm.state.runs.get(&run_id) {
            return Ok(json(201, run));
        }
        sm.state.archive.clone()
    };
    // A run created ended (setup errors) may be archived already.
    match ctx.archive.get(&manifest, &run_id).await? {
        Some(a) => Ok(json(201, &a.run)),
        None => {
            tracing::error!(run_id, "a created run is neither in the state nor in the archive");
            Err(ApiError::internal())
        }
    }
}

/// `GET /api/v1/runs`: live and archived runs, one page.
pub(crate) async fn list_runs(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let limit = req.number("limit")?.map_or(DEFAULT_LIST_LIMIT, |l| l as usize);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_LIST_LIMIT}")));
    }
    let phase: Option<RunPhase> = req
        .query
        .get("phase")
        .map(|p| {
            serde_json::from_value(serde_json::Value::String(p.clone()))
                .map_err(|_| ApiError::bad_request(format!("unknown phase {p:?}")))
        })
        .transpose()?;
    let group = req.query.get("group").cloned();
    let start = req.query.get("start").cloned();
    let asc = req.flag("asc")?;
    read_barrier(ctx, req).await?;
    let (live, manifest) = {
        let sm = ctx.node.state.read();
        let runs = &sm.state.runs;
        use std::ops::Bound::{Excluded, Unbounded};
        let range: Box<dyn Iterator<Item = &Run>> = match (&start, asc) {
            (Some(s), true) => {
                Box::new(runs.range::<String, _>((Excluded(s.clone()), Unbounded)).map(|(_, r)| r))
            }
            (Some(s), false) => {
                Box::new(runs.range::<String, _>((Unbounded, Excluded(s.clone()))).rev().map(|(_, r)| r))
            }
            (None, true) => Box::new(runs.values()),
            (None, false) => Box::new(runs.values().rev()),
        };
        let live: Vec<Run> = range
            .filter(|r| group.as_deref().is_none_or(|g| group_matches(&r.group, g)))
            .filter(|r| phase.is_none_or(|p| r.phase == p))
            .take(limit + 1)
            .cloned()
            .collect();
        (live, sm.state.archive.clone())
    };
    // Archived runs from the index (no data file is read to filter), same order.
    let archived: Vec<crate::archive::Row> = if manifest.files.is_empty() {
        Vec::new()
    } else {
        let rows = ctx.archive.rows(&manifest).await?;
        let keep = |r: &&crate::archive::Row| {
            group.as_deref().is_none_or(|g| group_matches(&r.group, g))
                && phase.is_none_or(|p| r.phase == p)
                && start.as_deref().is_none_or(|s| if asc { r.id.as_str() > s } else { r.id.as_str() < s })
        };
        if asc {
            rows.iter().filter(keep).take(limit + 1).cloned().collect()
        } else {
            rows.iter().rev().filter(keep).take(limit + 1).cloned().collect()
        }
    };
    // Merge the two ordered pages.
    let mut page: Vec<Result<Run, crate::archive::Row>> = Vec::with_capacity(limit + 1);
    let (mut a, mut b) = (live.into_iter().peekable(), archived.into_iter().peekable());
    while page.len() < limit + 1 {
        let take_live = match (a.peek(), b.peek()) {
            (Some(l), Some(r)) => (l.id.as_str() < r.id.as_str()) == asc,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        page.push(if take_live { Ok(a.next().expect("peeked")) } else { Err(b.next().expect("peeked")) });
    }
    let more = page.len() > limit;
    page.truncate(limit);
    let rows: Vec<crate::archive::Row> = page.iter().filter_map(|p| p.as_ref().err().cloned()).collect();
    let mut loaded = ctx.archive.load(&rows).await?.into_iter();
    let runs = page.into_iter().filter_map(|p| match p {
        Ok(run) => Some(run),
        Err(_) => loaded.next().map(|a| a.run),
    });
    Ok(json(200, &RunList { runs: runs.collect(), more }))
}

/// `DELETE /api/v1/runs/{id}`: a finished run, from the state or from the archive (its
/// data file rewritten without it). Its `runs/<id>` references next to logs and
/// workspace archives are deleted after; the GC removes what no run references any more.
pub(crate) async fn delete_run(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    let mut attempts = 0;
    let tasks: Vec<(String, String)> = loop {
        attempts += 1;
        ctx.node.linearizable_barrier().await?;
        let (in_state, manifest) = {
            let sm = ctx.node.state.read();
            (sm.state.runs.get(id).map(task_owners), sm.state.archive.clone())
        };
        if let Some(tasks) = in_state {
            let cmd = Command::DeleteRun {
                run_id: id.to_string(),
                prev_generation: manifest.generation,
                replace: None,
                with: None,
            };
            expect_done(write(ctx, cmd).await?)?;
            break tasks;
        }
        let rows = ctx.archive.rows(&manifest).await?;
        let Ok(i) = rows.binary_search_by(|r| r.id.as_str().cmp(id)) else {
            return Err(ApiError::not_found(format!("run {id} not found")));
        };
        let old = manifest
            .files
            .iter()
            .find(|f| *f.key == *rows[i].file)
            .cloned()
            .ok_or_else(ApiError::internal)?;
        let runs = flotilla_store::archive::read_file(&ctx.ost, &old.key).await?;
        let tasks = runs.iter().find(|a| a.run.id == id).map(|a| task_owners(&a.run)).unwrap_or_default();
        let rest: Vec<_> = runs.into_iter().filter(|a| a.run.id != id).collect();
        let stamp = flotilla_scheduler::now_ms();
        let with = if rest.is_empty() {
            None
        } else {
            let name = |n| {
                format!(
                    "del-{}",
                    flotilla_store::archive::fresh_name(manifest.generation + 1, ctx.node.id, stamp, n)
                )
            };
            // One file in, at most one file out: it only shrinks.
            flotilla_store::archive::write_files(&ctx.ost, rest, u64::MAX, name).await?.pop()
        };
        let cmd = Command::DeleteRun {
            run_id: id.to_string(),
            prev_generation: manifest.generation,
            replace: Some(old.key.clone()),
            with: with.clone(),
        };
        match write(ctx, cmd).await {
            Ok(_) => {
                let _ = ctx.ost.delete(&old.key).await;
                let _ = ctx.ost.delete(&old.index_key).await;
                break tasks;
            }
            // The archive moved on meanwhile (an archive round): try again on the new one.
            Err(e) if e.status == 409 && attempts < 5 => {
                if let Some(f) = with {
                    let _ = ctx.ost.delete(&f.key).await;
                    let _ = ctx.ost.delete(&f.index_key).await;
                }
            }
            Err(e) => return Err(e),
        }
    };
    for (task, owner) in tasks {
        let task_id = flotilla_store::executor::executor_task_id(&owner, &task);
        for kind in [flotilla_store::ost::keys::LOGS, flotilla_store::ost::keys::ARCHIVES] {
            ctx.ost.delete(&flotilla_store::ost::keys::run_ref(kind, &task_id, id)).await?;
        }
    }
    Ok(Reply::Empty)
}

/// Each task of `run` with the run holding its logs and archives (another one for a task
/// kept by a restart).
fn task_owners(run: &Run) -> Vec<(String, String)> {
    run.tasks.iter().map(|(name, t)| (name.clone(), t.outputs_run(&run.id).to_string())).collect()
}

/// `GET /api/v1/events`: every event this node applies from now on, as server-sent
/// events (`id` = log index, `event` = `run` or `task`, `data` = the JSON event). A
/// subscriber that falls too far behind gets an `event: lagged` and the stream ends, so a
/// client never silently misses events; it reconnects and re-reads the runs it follows.
pub(crate) fn events(ctx: &Ctx, req: &Request<'_>) -> Result<Reply, ApiError> {
    let group = req.query.get("group").cloned();
    let subscribers = ctx.event_subscribers.clone();
    if subscribers.fetch_add(1, Ordering::SeqCst) >= MAX_EVENT_SUBSCRIBERS {
        subscribers.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::unavailable(format!(
            "this node already serves {MAX_EVENT_SUBSCRIBERS} event streams"
        )));
    }
    let mut rx = ctx.node.state.subscribe_events();
    let mut closing = ctx.closing();
    let (tx, mut out) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let _guard = Decrement(subscribers);
        let _ = tx.send(Ok(Bytes::from_static(b": connected\n\n"))).await;
        loop {
            let chunk = tokio::select! {
                e = rx.recv() => match e {
                    Ok(e) if group.as_deref().is_none_or(|g| group_matches(&e.group, g)) => {
                        let kind = match e.kind { flotilla_store::event::EventKind::Run => "run", _ => "task" };
                        let data = serde_json::to_string(&*e).unwrap_or_default();
                        format!("id: {}\nevent: {kind}\ndata: {data}\n\n", e.revision)
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => {
                        let _ = tx.send(Ok(Bytes::from(format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n")))).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = tokio::time::sleep(Duration::from_millis(EVENT_KEEPALIVE_MS)) => ": keep-alive\n\n".to_string(),
                _ = closing.changed() => return,
                // The client went away (hyper dropped the response body): free the slot
                // now, not at the next event.
                _ = tx.closed() => return,
            };
            if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                return; // the client went away
            }
        }
    });
    let stream = futures::stream::poll_fn(move |cx| out.poll_recv(cx));
    let mut resp = warp::Reply::into_response(warp::reply::stream(stream));
    let h = resp.headers_mut();
    h.insert("content-type", warp::http::HeaderValue::from_static("text/event-stream"));
    h.insert("cache-control", warp::http::HeaderValue::from_static("no-cache"));
    Ok(Reply::Raw(resp))
}

/// Gives back an event-stream slot when the stream's task ends, however it ends.
struct Decrement(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `PUT /api/v1/executor/{id}`: registration and heartbeat. Only a heartbeat that brings
/// something new is written at once; one that only refreshes `last_seen` goes out with
/// the others of its moment ([`crate::refresh`]); the rest are answered here.
pub(crate) async fn executor_heartbeat(ctx: &Ctx, id: &str, req: &Request<'_>) -> Result<Reply, ApiError> {
    validate_executor_id(id).map_err(ApiError::bad_request)?;
    let info: ExecutorInfo = req.json()?;
    let now = now_ms();
    let cmd = |info| Command::PutExecutor { id: id.to_string(), info, now_ms: now };
    match recorded(ctx, id, &info, now) {
        Recorded::Fresh => Ok(Reply::Empty),
        Recorded::Stale => {
            // Its own kind in the write metrics: it waits for others on purpose.
            expect_done(settle(ctx, "put_executor_refresh", ctx.refreshes.write(cmd(info))).await?.1)
        }
        Recorded::New => expect_done(write(ctx, cmd(info)).await?),
    }
}

/// What this node's state holds of a heartbeat's executor.
enum Recorded {
    /// This very offer, seen less than a third of the executor timeout ago: the heartbeat
    /// is answered without a replicated write. Thousands of executors heartbeating every
    /// few seconds were otherwise a stream of log entries that changed nothing but
    /// `last_seen`. The recorded `last_seen` then lags the last heartbeat by at most that
    /// third (plus one heartbeat period and the refresh's linger), so a live executor is
    /// never taken for silent; one that stops is, a third earlier at most. A node whose
    /// state is behind writes more often; one cut off from the leader answers so for at
    /// most that third too, then its write fails with 503 and the executor moves on to
    /// another server.
    Fresh,
    /// This very offer, seen longer ago: only `last_seen` is to be written.
    Stale,
    /// Nothing, or another offer: written at once.
    New,
}

fn recorded(ctx: &Ctx, id: &str, info: &ExecutorInfo, now: u64) -> Recorded {
    let refresh_ms = ctx.cfg.scheduler.settings.executor_timeout_ms / 3;
    let sm = ctx.node.state.read();
    match sm.state.executors.get(id) {
        Some(e) if e.info == *info && now.saturating_sub(e.last_seen) < refresh_ms => Recorded::Fresh,
        Some(e) if e.info == *info => Recorded::Stale,
        _ => Recorded::New,
    }
}

/// `GET /api/v1/executor/{id}/siblings`: the executors of its group (itself included).
pub(crate) async fn executor_siblings(ctx: &Ctx, id: &str, req: &Request<'_>) -> Result<Reply, ApiError> {
    read_barrier(ctx, req).await?;
    let sm = ctx.node.state.read();
    let me = sm
        .state
        .executors
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("executor {id:?} is not registered")))?;
    let executors =
        sm.state.executors.values().filter(|e| e.info.group == me.info.group).map(|e| e.id.clone()).collect();
    Ok(json(200, &crate::types::Siblings { executors }))
}

/// `PUT /api/v1/executor/{id}/tasks/{task_id}`: a task's status.
pub(crate) async fn set_task_status(
    ctx: &Ctx,
    id: &str,
    task_id: &str,
    req: &Request<'_>,
) -> Result<Reply, ApiError> {
    let status: ExecutorTaskStatus = req.json()?;
    let cmd = Command::SetExecutorTaskStatus { id: task_id.to_string(), executor_id: id.to_string(), status };
    expect_done(write(ctx, cmd).await?)
}

/// `PUT /api/v1/executor/{id}/tasks`: several tasks' statuses, each written as its own
/// report would be (the writes leave together, batched by the leader or forwarded
/// together by a follower) and answered report by report.
pub(crate) async fn set_task_statuses(ctx: &Ctx, id: &str, req: &Request<'_>) -> Result<Reply, ApiError> {
    let body: TaskReports = req.json()?;
    if body.reports.len() > MAX_TASK_REPORTS {
        return Err(ApiError::bad_request(format!(
            "{} reports: at most {MAX_TASK_REPORTS} go in one request",
            body.reports.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = body.reports.iter().find(|r| !seen.insert(r.id.as_str())) {
        return Err(ApiError::bad_request(format!(
            "task {:?} is reported twice: send its newest status once",
            twice.id
        )));
    }
    let writes = body.reports.into_iter().map(|r| async move {
        let cmd = Command::SetExecutorTaskStatus {
            id: r.id.clone(),
            executor_id: id.to_string(),
            status: r.status,
        };
        let error = write(ctx, cmd).await.and_then(expect_done).err();
        TaskReportOutcome {
            id: r.id,
            status: error.as_ref().map_or(204, |e| e.status),
            error: error.map(|e| ErrorBody { code: e.code.to_string(), message: e.message }),
        }
    });
    let outcomes = futures::future::join_all(writes).await;
    Ok(json(200, &TaskReportOutcomes { outcomes }))
}

/// `GET /api/v1/executor/{id}/tasks?since=R&wait_ms=W`: the executor's tasks, once its
/// `tasks_revision` is past `since` or `wait_ms` passed.
pub(crate) async fn executor_tasks(ctx: &Ctx, id: &str, req: &Request<'_>) -> Result<Reply, ApiError> {
    let since = req.number("since")?.unwrap_or(0);
    let wait_ms = req.number("wait_ms")?.unwrap_or(0).min(MAX_LONG_POLL_MS);
    let data = req.query.get("data").map(String::as_str);
    let data_for = TaskDataFor::from_query(data).ok_or_else(|| {
        ApiError::bad_request(format!(
            "query parameter data={:?}: expected {:?} or {:?}",
            data.unwrap_or_default(),
            TaskDataFor::All.as_query(),
            TaskDataFor::NotStarted.as_query()
        ))
    })?;
    read_barrier(ctx, req).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let mut changed = ctx.node.state.watch_executor(id);
    let mut closing = ctx.closing();
    loop {
        {
            let sm = ctx.node.state.read();
            let state = &sm.state;
            let executor = state
                .executors
                .get(id)
                .ok_or_else(|| ApiError::not_found(format!("executor {id:?} is not registered")))?;
            if executor.tasks_revision > since || tokio::time::Instant::now() >= deadline || *closing.borrow()
            {
                let tasks = state
                    .executor_tasks
                    .values()
                    .filter(|t| t.spec.executor_id == id)
                    .filter_map(|t| {
                        let run = state.runs.get(&t.spec.run_id)?;
                        let config = state.run_configs.get(&t.spec.run_id)?;
                        let task = config.task(&t.spec.task_name)?;
                        // Built only where it is asked for: it is most of a listing's
                        // bytes, and carries the registry credentials.
                        let wanted = data_for == TaskDataFor::All || t.status.phase == Phase::Notstarted;
                        let data = wanted.then(|| task_data(run, config, task));
                        let spec = ExecutorTaskSpecView { spec: t.spec.clone(), data };
                        Some(ExecutorTaskView { id: t.id.clone(), spec, status: t.status.clone() })
                    })
                    .collect();
                let cluster_id = state.cluster_id.clone();
                return Ok(json(
                    200,
                    &ExecutorTasks { revision: executor.tasks_revision, tasks, cluster_id },
                ));
            }
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = closing.changed() => {}
        }
    }
}
