//! A run's tasks as people look at them: the tasks in DAG order with their dependencies
//! and step names (`GET /runs/{id}/tasks`), a step addressed by name, and a task's saved
//! workspace (`GET /runs/{id}/tasks/{task}/workspace[?path=P]`) — for live and archived
//! runs alike, with the API token like every user route (never the executor's routes).
//!
//! A task's workspace is what its `save_to_workspace` steps stored, in step order, as one
//! plain tar stream (each stored archive decompressed, entries copied as they are); with
//! `?path=` one regular file of it (the last step that saved it wins, as in a restore).
//! Archives stream from the object storage through a blocking thread running the tar
//! code: nothing is held whole in memory.

use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use flotilla_store::executor::{executor_task_id, task_levels};
use flotilla_store::ost::keys::{self, LogStep};
use flotilla_store::ost::tarstream::{
    channel_writer, decompressed, BlockingReader, ChannelWriter, CHUNK_BYTES,
};
use flotilla_store::ost::Ost;
use flotilla_store::run::{Phase, Run, RunConfig, Step, TaskStatus};

use crate::error::ApiError;
use crate::handler::{json, read_barrier, stream_reply, Ctx, Reply, Request};

pub use flotilla_client::types::{RunOutline, StepOutline, TaskOutline};

/// The run and its configuration, live or archived.
pub(crate) async fn find_run(
    ctx: &Ctx,
    run_id: &str,
    req: &Request<'_>,
) -> Result<(Run, RunConfig), ApiError> {
    read_barrier(ctx, req).await?;
    let manifest = {
        let sm = ctx.node.state.read();
        if let (Some(run), Some(config)) = (sm.state.runs.get(run_id), sm.state.run_configs.get(run_id)) {
            return Ok((run.clone(), config.clone()));
        }
        sm.state.archive.clone()
    };
    match ctx.archive.get(&manifest, run_id).await? {
        Some(a) => Ok((a.run, a.config)),
        None => Err(ApiError::not_found(format!("run {run_id} not found"))),
    }
}

pub(crate) fn outline(config: &RunConfig) -> RunOutline {
    let levels = task_levels(config);
    let mut tasks: Vec<TaskOutline> = config
        .tasks
        .iter()
        .map(|t| TaskOutline {
            name: t.name.clone(),
            level: levels.get(&t.name).copied().unwrap_or(0),
            depends: t.depends.clone(),
            steps: t
                .steps
                .iter()
                .map(|s| {
                    let (kind, name) = match s {
                        Step::Run(r) => ("run", r.name.clone()),
                        Step::SaveToWorkspace(_) => ("save_to_workspace", None),
                        Step::RestoreWorkspace(_) => ("restore_workspace", None),
                        Step::SaveCache(_) => ("save_cache", None),
                        Step::RestoreCache(_) => ("restore_cache", None),
                    };
                    StepOutline { kind: kind.into(), name }
                })
                .collect(),
        })
        .collect();
    // Stable: tasks of one level keep the order of the run definition.
    tasks.sort_by_key(|t| t.level);
    RunOutline { tasks }
}

/// `GET /api/v1/runs/{id}/tasks`.
pub(crate) async fn get_outline(ctx: &Ctx, run_id: &str, req: &Request<'_>) -> Result<Reply, ApiError> {
    let (_, config) = find_run(ctx, run_id, req).await?;
    Ok(json(200, &outline(&config)))
}

/// Which log `?step=` names: `setup`, a number, or a `run` step's name. Without it: the
/// failing step of a failed task (`setup` if its setup failed), else its first `run` step.
pub(crate) fn resolve_step(
    run: &Run,
    config: &RunConfig,
    task: &str,
    step: Option<&str>,
) -> Result<LogStep, ApiError> {
    let not_found = || ApiError::not_found(format!("task {task:?} not found in run {}", run.id));
    let tc = config.task(task).ok_or_else(not_found)?;
    let rt = run.tasks.get(task).ok_or_else(not_found)?;
    let Some(step) = step else {
        if rt.status == TaskStatus::Failed {
            if rt.setup_step.phase == Phase::Failed {
                return Ok(LogStep::Setup);
            }
            if let Some(i) = rt.steps.iter().position(|s| s.phase == Phase::Failed) {
                return Ok(LogStep::Step(i));
            }
        }
        let first_run = tc.steps.iter().position(|s| matches!(s, Step::Run(_)));
        return Ok(LogStep::Step(first_run.unwrap_or(0)));
    };
    // (A service container's log is asked for with `container=`, not as a step.)
    if let Some(parsed) = LogStep::parse(step).filter(|s| !matches!(s, LogStep::Container(_))) {
        return Ok(parsed);
    }
    let named = tc.steps.iter().position(|s| matches!(s, Step::Run(r) if r.name.as_deref() == Some(step)));
    named.map(LogStep::Step).ok_or_else(|| {
        let names: Vec<&str> = tc
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Run(r) => r.name.as_deref(),
                _ => None,
            })
            .collect();
        ApiError::not_found(format!(
            "task {task:?} has no step named {step:?} (named steps: {names:?}; or give a number from 0, or 'setup')"
        ))
    })
}

/// `GET /api/v1/runs/{id}/tasks/{task}/workspace[?path=P]`.
pub(crate) async fn get_workspace(
    ctx: &Arc<Ctx>,
    run_id: &str,
    task: &str,
    req: &Request<'_>,
) -> Result<Reply, ApiError> {
    let path = req.query.get("path").map(|p| wanted_path(p)).transpose()?;
    let (run, config) = find_run(ctx, run_id, req).await?;
    let tc = config
        .task(task)
        .ok_or_else(|| ApiError::not_found(format!("task {task:?} not found in run {run_id}")))?;
    let saving: Vec<usize> = tc
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, Step::SaveToWorkspace(_)))
        .map(|(i, _)| i)
        .collect();
    if saving.is_empty() {
        return Err(ApiError::not_found(format!("task {task:?} has no save_to_workspace step")));
    }
    let task_id = executor_task_id(&run.id, task);
    let mut stored = Vec::new();
    for step in saving {
        let key = keys::archive(&task_id, step);
        if ctx.ost.exists(&key).await? {
            stored.push(key);
        }
    }
    if stored.is_empty() {
        return Err(ApiError::not_found(format!(
            "task {task:?} of run {run_id} saved no workspace (its save_to_workspace steps did not run, or it is still running)"
        )));
    }
    let ost = ctx.ost.clone();
    match path {
        None => {
            let (out, body) = channel_writer();
            tokio::task::spawn_blocking(move || {
                let failer = out.failer();
                if let Err(e) = concat(&ost, &stored, out) {
                    tracing::warn!(error = %e, "workspace stream failed");
                    failer.fail(&e);
                }
            });
            Ok(tar_reply(stream_reply(body)))
        }
        Some(path) => {
            // Find it first (so a missing file is a clean 404), then stream its content.
            let (o, p) = (ost.clone(), path.clone());
            let found = tokio::task::spawn_blocking(move || locate(&o, &stored, &p))
                .await
                .map_err(|_| ApiError::internal())?
                .map_err(|e| {
                    tracing::warn!(error = %e, "workspace read failed");
                    ApiError::internal()
                })?;
            let (key, index) = match found {
                Located::File { key, index } => (key, index),
                Located::Missing => {
                    return Err(ApiError::not_found(format!(
                        "{} is not in the workspace of task {task:?}",
                        path.display()
                    )))
                }
                Located::Other(what) => {
                    return Err(ApiError::bad_request(format!(
                        "{} is {what} in the workspace of task {task:?}, not a regular file",
                        path.display()
                    )))
                }
            };
            let (out, body) = channel_writer();
            tokio::task::spawn_blocking(move || {
                let failer = out.failer();
                if let Err(e) = copy_entry(&ost, &key, index, out) {
                    tracing::warn!(error = %e, "workspace file stream failed");
                    failer.fail(&e);
                }
            });
            Ok(stream_reply(body))
        }
    }
}

fn tar_reply(reply: Reply) -> Reply {
    match reply {
        Reply::Raw(mut resp) => {
            resp.headers_mut()
                .insert("content-type", warp::http::HeaderValue::from_static("application/x-tar"));
            Reply::Raw(resp)
        }
        other => other,
    }
}

/// `?path=` as a clean relative path (`./a/b` and `/a/b` name `a/b`); `..` is refused.
fn wanted_path(p: &str) -> Result<PathBuf, ApiError> {
    let mut out = PathBuf::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir | Component::RootDir => {}
            _ => return Err(ApiError::bad_request(format!("path {p:?} may not contain '..'"))),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(ApiError::bad_request("path names no file; leave it out to get the whole workspace"));
    }
    Ok(out)
}

/// A stored archive as a tar reader (blocking; call from a blocking thread).
fn open(ost: &Ost, key: &str) -> io::Result<tar::Archive<Box<dyn Read>>> {
    let handle = tokio::runtime::Handle::current();
    let stream = handle.block_on(ost.get(key)).map_err(io::Error::other)?;
    let reader = BlockingReader::new(stream);
    Ok(tar::Archive::new(decompressed(io::BufReader::with_capacity(CHUNK_BYTES, reader))?))
}

fn clean(p: &Path) -> PathBuf {
    p.components().filter(|c| matches!(c, Component::Normal(_))).collect()
}

/// Every entry of the archives `keys`, in order, as one plain tar.
fn concat(ost: &Ost, keys: &[String], out: ChannelWriter) -> io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    for key in keys {
        let mut archive = open(ost, key)?;
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.into_owned();
            let mut h = entry.header().clone();
            let kind = h.entry_type();
            if kind.is_hard_link() || kind.is_symlink() {
                let link = entry.link_name()?.map(|l| l.into_owned()).unwrap_or_default();
                builder.append_link(&mut h, &path, link)?;
            } else if kind.is_dir() {
                h.set_size(0);
                builder.append_data(&mut h, &path, io::empty())?;
            } else if kind.is_file() {
                builder.append_data(&mut h, &path, &mut entry)?;
            }
        }
    }
    builder.into_inner()?.flush()
}

enum Located {
    File {
        key: String,
        index: usize,
    },
    /// Present, but a directory or a symlink.
    Other(&'static str),
    Missing,
}

/// Where the content of `path` is: the last archive holding it, its last entry there (a
/// hard link followed to its target).
fn locate(ost: &Ost, keys: &[String], path: &Path) -> io::Result<Located> {
    for key in keys.iter().rev() {
        let mut wanted = path.to_path_buf();
        let mut found: Option<(usize, tar::EntryType, PathBuf)> = None;
        let mut archive = open(ost, key)?;
        let mut index_of_files: Vec<(PathBuf, usize)> = Vec::new();
        for (index, entry) in archive.entries()?.enumerate() {
            let entry = entry?;
            let p = clean(&entry.path()?);
            let kind = entry.header().entry_type();
            if kind.is_file() {
                index_of_files.push((p.clone(), index));
            }
            if p == wanted {
                let link = entry.link_name()?.map(|l| clean(&l)).unwrap_or_default();
                found = Some((index, kind, link));
            }
        }
        let Some((index, kind, link)) = found else { continue };
        if kind.is_hard_link() {
            wanted = link;
            // The target is an earlier regular file of the same archive.
            return Ok(match index_of_files.iter().rev().find(|(p, i)| *p == wanted && *i < index) {
                Some((_, i)) => Located::File { key: key.clone(), index: *i },
                None => Located::Missing,
            });
        }
        return Ok(if kind.is_file() {
            Located::File { key: key.clone(), index }
        } else if kind.is_dir() {
            Located::Other("a directory")
        } else if kind.is_symlink() {
            Located::Other("a symlink")
        } else {
            Located::Other("a special file")
        });
    }
    Ok(Located::Missing)
}

/// Streams the content of entry `index` of archive `key`.
fn copy_entry(ost: &Ost, key: &str, index: usize, mut out: ChannelWriter) -> io::Result<()> {
    let mut archive = open(ost, key)?;
    if let Some(entry) = archive.entries()?.nth(index) {
        io::copy(&mut entry?, &mut out)?;
    }
    out.flush()
}
