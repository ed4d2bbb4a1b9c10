//! One executor task from start to end: its pod ([`crate::pod`]), each `run` step an exec
//! inside container 0, workspace and cache steps through Docker's archive API and the
//! servers, every step's log pushed live, status reported after every change. A stop
//! request, the task's `timeout_s` or a service exiting ends it; every container of the
//! pod is removed however the task ends.

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::ClientError;
use flotilla_store::executor::{ExecutorTaskStatus, TaskData};
use flotilla_store::limits::ARCHIVE_ZSTD_LEVEL;
use flotilla_store::ost::reader_stream;
use flotilla_store::run::{Phase, SaveContent, Step, StepStatus, REASON_TIMEOUT};
use futures::StreamExt;
use md5::{Digest, Md5};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::logs::StepLog;
use crate::pod;
use crate::tarball;
use crate::Agent;

pub const DEFAULT_WORKING_DIR: &str = "/work";
pub const DEFAULT_SHELL: &str = "/bin/sh";

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How a step ended.
enum Outcome {
    Success,
    Failed(String),
    Stopped,
    TimedOut,
}

/// Runs the task to its end; returns the final status once reported (or given up on: the
/// agent reports it again while the servers still show the task running).
pub async fn run(
    agent: Arc<Agent>,
    id: String,
    mut status: ExecutorTaskStatus,
    data: TaskData,
    mut stop: watch::Receiver<bool>,
) -> ExecutorTaskStatus {
    status.steps.resize(data.steps.len(), StepStatus::default());
    status.phase = Phase::Running;
    status.start_time = Some(now_ms());
    status.setup_step.phase = Phase::Running;
    status.setup_step.start_time = status.start_time;
    report(&agent, &id, &status).await;
    // `timeout_s` counts from here, setup (pulls) included.
    let deadline = data.timeout_s.map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    let timed_out = || format!("timed out after {} s", data.timeout_s.unwrap_or(0));

    let dir = agent.cfg.work_dir.join(&id);
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        tracing::error!(task = id, error = %e, "cannot create the task's work dir");
    }
    let working_dir = data.working_dir.clone().unwrap_or_else(|| DEFAULT_WORKING_DIR.into());
    let shell = data.shell.clone().unwrap_or_else(|| DEFAULT_SHELL.into());

    // Setup: the pod.
    let mut log = match StepLog::start(
        agent.servers.clone(),
        agent.cfg.id.clone(),
        id.clone(),
        "setup".into(),
        dir.join("setup.log"),
    ) {
        Ok(l) => l,
        Err(e) => {
            return fail_setup(&agent, &id, status, None, format!("cannot write the setup log: {e}")).await
        }
    };
    let setup = tokio::select! {
        r = pod::start(&agent, &id, &data, &shell, &working_dir, &mut log) => r,
        _ = stopped(&mut stop) => Err(anyhow::anyhow!("stopped during setup")),
        _ = until(deadline) => {
            status.setup_step.reason = Some(REASON_TIMEOUT.into());
            status.error = Some(timed_out());
            Err(anyhow::anyhow!(timed_out()))
        }
    };
    let (pod, mut exits) = match setup {
        Ok(p) => p,
        Err(e) => {
            let message = format!("{e:#}");
            log.line(&format!("setup failed: {message}"));
            pod::remove_task_containers(&agent, &id).await;
            let stopped = *stop.borrow();
            let mut status = status;
            if stopped {
                status.phase = Phase::Stopped;
            }
            return fail_setup(&agent, &id, status, Some(log), message).await;
        }
    };
    let container = pod.main.clone();
    let environment = pod::base_environment(&data);
    status.setup_step.phase = Phase::Success;
    status.setup_step.end_time = Some(now_ms());
    status.setup_step.log_phase = log.finish().await;
    report(&agent, &id, &status).await;

    // Steps, in order; the first failure ends the task.
    let mut final_phase = Phase::Success;
    for (i, step) in data.steps.iter().enumerate() {
        if *stop.borrow() {
            final_phase = Phase::Stopped;
            break;
        }
        status.steps[i].phase = Phase::Running;
        status.steps[i].start_time = Some(now_ms());
        report(&agent, &id, &status).await;
        let mut log = match StepLog::start(
            agent.servers.clone(),
            agent.cfg.id.clone(),
            id.clone(),
            i.to_string(),
            dir.join(format!("{i}.log")),
        ) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(task = id, error = %e, "cannot write a step log");
                final_phase = Phase::Failed;
                status.steps[i].phase = Phase::Failed;
                status.steps[i].end_time = Some(now_ms());
                break;
            }
        };
        let env = StepEnv {
            agent: &agent,
            id: &id,
            container: &container,
            data: &data,
            working_dir: &working_dir,
            environment: &environment,
        };
        let result = tokio::select! {
            r = run_step(
                &env,
                i,
                step,
                &mut log,
                &mut status.steps[i].exit_status,
            ) => r,
            _ = stopped(&mut stop) => Outcome::Stopped,
            _ = until(deadline) => Outcome::TimedOut,
            Some((name, code)) = exits.recv() => Outcome::Failed(format!("service container {name} exited with code {code}")),
        };
        let step_status = &mut status.steps[i];
        step_status.end_time = Some(now_ms());
        match result {
            Outcome::Success => step_status.phase = Phase::Success,
            Outcome::Failed(message) => {
                if message.starts_with("service container ") {
                    status.error = Some(message.clone());
                }
                if !message.is_empty() {
                    log.line(&format!("[flotilla] {message}"));
                }
                step_status.phase = Phase::Failed;
                final_phase = Phase::Failed;
            }
            Outcome::TimedOut => {
                log.line(&format!("[flotilla] {}", timed_out()));
                step_status.phase = Phase::Failed;
                step_status.reason = Some(REASON_TIMEOUT.into());
                status.error = Some(timed_out());
                final_phase = Phase::Failed;
            }
            Outcome::Stopped => {
                log.line("[flotilla] stopped");
                pod::remove_all(&agent, pod.ids()).await;
                step_status.phase = Phase::Stopped;
                final_phase = Phase::Stopped;
            }
        }
        status.steps[i].log_phase = log.finish().await;
        if final_phase != Phase::Success {
            break;
        }
    }
    if !pod.services.is_empty() {
        pod::store_service_logs(&agent, &id, &dir, &pod).await;
    }
    status.phase = final_phase;
    status.end_time = Some(now_ms());
    report(&agent, &id, &status).await;
    // Cleanup once the outcome is out: nothing the task produced is in its containers any
    // more (logs and archives went up step by step), so its result does not wait for Docker
    // to kill and remove them. A crash before this point leaves labeled containers that the
    // next start of the executor removes.
    pod::remove_all(&agent, pod.ids()).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    status
}

/// Waits until `deadline`, or forever without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn fail_setup(
    agent: &Agent,
    id: &str,
    mut status: ExecutorTaskStatus,
    log: Option<StepLog>,
    message: String,
) -> ExecutorTaskStatus {
    tracing::info!(task = id, message, "task setup failed");
    let now = now_ms();
    if status.phase != Phase::Stopped {
        status.phase = Phase::Failed;
        status.setup_step.phase = Phase::Failed;
    } else {
        status.setup_step.phase = Phase::Stopped;
    }
    status.setup_error = Some(message);
    status.setup_step.end_time = Some(now);
    status.end_time = Some(now);
    if let Some(log) = log {
        status.setup_step.log_phase = log.finish().await;
    }
    report(agent, id, &status).await;
    let _ = tokio::fs::remove_dir_all(agent.cfg.work_dir.join(id)).await;
    status
}

/// Reports a status; a task the server no longer has (deleted once final) is fine.
pub async fn report(agent: &Agent, id: &str, status: &ExecutorTaskStatus) {
    let r = agent.reporter.report(id, status).await;
    match r {
        Ok(()) => {}
        Err(ClientError::Api { status: 404, .. }) => {}
        Err(e) => tracing::warn!(task = id, error = %e, "status report failed"),
    }
}

fn env_list(
    base: &flotilla_store::run::StringMap,
    step: Option<&flotilla_store::run::StringMap>,
) -> Vec<String> {
    let mut env = base.clone();
    if let Some(step) = step {
        env.extend(step.clone());
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// `dir` made absolute against the working dir.
fn absolute(working_dir: &str, dir: &str) -> String {
    let p = Path::new(working_dir).join(dir);
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            std::path::Component::Normal(s) => out.push(s),
            std::path::Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out.display().to_string()
}

/// Where a task's steps run: what every step needs besides the step itself.
#[derive(Clone, Copy)]
struct StepEnv<'a> {
    agent: &'a Agent,
    /// The executor task's id.
    id: &'a str,
    /// Container 0 of the task's pod, where the steps run.
    container: &'a str,
    data: &'a TaskData,
    working_dir: &'a str,
    /// Every step's environment before its own (container 0's, the task's over it).
    environment: &'a flotilla_store::run::StringMap,
}

async fn run_step(
    env: &StepEnv<'_>,
    index: usize,
    step: &Step,
    log: &mut StepLog,
    exit_status: &mut Option<i32>,
) -> Outcome {
    let StepEnv { agent, id, container, data, working_dir, environment } = *env;
    let result = match step {
        Step::Run(r) => {
            let shell = r.shell.as_deref().or(data.shell.as_deref()).unwrap_or(DEFAULT_SHELL).to_string();
            let wd = r
                .working_dir
                .as_deref()
                .map_or_else(|| working_dir.to_string(), |d| absolute(working_dir, d));
            let cmd = vec![shell, "-e".into(), "-c".into(), r.command.clone()];
            let env = env_list(environment, Some(&r.environment));
            match agent
                .docker
                .exec(
                    container,
                    crate::docker::ExecSpec {
                        cmd,
                        env,
                        working_dir: &wd,
                        user: data.user.as_deref(),
                        tty: r.tty,
                    },
                    |b| log.write(&b),
                )
                .await
            {
                Ok(code) => {
                    *exit_status = Some(code as i32);
                    if code == 0 {
                        Ok(())
                    } else {
                        Err(anyhow::anyhow!("exit status {code}"))
                    }
                }
                Err(e) => Err(e.into()),
            }
        }
        Step::SaveToWorkspace(s) => {
            save_to_workspace(agent, id, container, working_dir, index, &s.contents, log).await
        }
        Step::RestoreWorkspace(r) => {
            restore_workspace(agent, container, data, &absolute(working_dir, &r.dest_dir), log).await
        }
        Step::SaveCache(s) => save_cache(env, &s.key, &s.contents, log).await,
        Step::RestoreCache(r) => restore_cache(env, &r.keys, &absolute(working_dir, &r.dest_dir), log).await,
    };
    match result {
        Ok(()) => Outcome::Success,
        Err(e) => Outcome::Failed(format!("{e:#}")),
    }
}

/// Builds the archive of `contents` (from the container) into a temp file in the task's
/// work dir; returns the file and the number of entries.
async fn build_archive(
    agent: &Agent,
    id: &str,
    container: &str,
    working_dir: &str,
    contents: &[SaveContent],
) -> anyhow::Result<(PathBuf, u64)> {
    let dir = agent.cfg.work_dir.join(id);
    let stamp = now_ms();
    let mut raws = Vec::new();
    for (n, c) in contents.iter().enumerate() {
        let globs = tarball::patterns(&c.paths)?;
        let src = absolute(working_dir, &c.source_dir);
        let raw_path = dir.join(format!("raw-{stamp}-{n}.tar"));
        let mut raw = tokio::fs::File::create(&raw_path).await?;
        let mut s = agent.docker.download(container, &src);
        while let Some(chunk) = s.next().await {
            let chunk = chunk.with_context(|| format!("cannot read {src} in the container"))?;
            raw.write_all(&chunk).await?;
        }
        raw.flush().await?;
        raws.push((raw_path, globs, c.dest_dir.clone().unwrap_or_else(|| ".".into()), src));
    }
    let out_path = dir.join(format!("archive-{stamp}.tar"));
    let out = out_path.clone();
    let total = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let file = std::fs::File::create(&out).context("cannot create a temp archive")?;
        let mut sel = tarball::Selection::new(std::io::BufWriter::new(file), ARCHIVE_ZSTD_LEVEL)
            .context("cannot start a compressed archive")?;
        let mut total = 0;
        for (raw_path, globs, dest, src) in &raws {
            total += tarball::select(raw_path, globs, dest, &mut sel)
                .with_context(|| format!("cannot archive {src}"))?;
            let _ = std::fs::remove_file(raw_path);
        }
        let file = sel.finish()?.into_inner()?;
        file.sync_all()?;
        Ok(total)
    })
    .await??;
    Ok((out_path, total))
}

async fn file_body(path: &Path) -> anyhow::Result<(reqwest::Body, u64)> {
    let f = tokio::fs::File::open(path).await?;
    let size = f.metadata().await?.len();
    Ok((reqwest::Body::wrap_stream(reader_stream(f, 256 * 1024)), size))
}

async fn save_to_workspace(
    agent: &Agent,
    id: &str,
    container: &str,
    working_dir: &str,
    index: usize,
    contents: &[SaveContent],
    log: &mut StepLog,
) -> anyhow::Result<()> {
    let (path, count) = build_archive(agent, id, container, working_dir, contents).await?;
    log.line(&format!("[flotilla] saving {count} files to the workspace"));
    let r = agent
        .servers
        .call("archive upload", |c| {
            let path = path.clone();
            let (exec, id) = (agent.cfg.id.clone(), id.to_string());
            async move {
                let (body, size) = file_body(&path)
                    .await
                    .map_err(|e| ClientError::Transport { url: String::new(), message: format!("{e:#}") })?;
                c.executor_archive_put(&exec, &id, index, body, Some(size)).await
            }
        })
        .await;
    let _ = tokio::fs::remove_file(&path).await;
    let stored = r.context("the workspace archive could not be stored")?;
    log.line(&format!("[flotilla] workspace archive stored ({} bytes)", stored.size));
    Ok(())
}

/// Streams an archive from the servers into the container under `dest`.
async fn extract(
    agent: &Agent,
    container: &str,
    download: flotilla_client::client::Download,
    dest: &str,
) -> anyhow::Result<()> {
    crate::restore::into_container(&agent.docker, container, download.into_stream(), dest).await
}

async fn restore_workspace(
    agent: &Agent,
    container: &str,
    data: &TaskData,
    dest: &str,
    log: &mut StepLog,
) -> anyhow::Result<()> {
    for w in &data.workspace {
        let r = agent
            .servers
            .call("archive download", |c| {
                let (exec, tid) = (agent.cfg.id.clone(), w.task_id.clone());
                async move { c.executor_archive_get(&exec, &tid, w.step).await }
            })
            .await;
        match r {
            Ok(d) => {
                extract(agent, container, d, dest).await?;
                log.line(&format!(
                    "[flotilla] restored the workspace of task {} (step {}) into {dest}",
                    w.task_name, w.step
                ));
            }
            Err(ClientError::Api { status: 404, .. }) => {
                log.line(&format!(
                    "[flotilla] task {} saved no workspace (step {}); skipped",
                    w.task_name, w.step
                ));
            }
            Err(e) => return Err(anyhow::anyhow!("cannot fetch the workspace of task {}: {e}", w.task_name)),
        }
    }
    Ok(())
}

/// Renders a cache key template against the container and the task's environment.
async fn render_key(
    agent: &Agent,
    container: &str,
    data: &TaskData,
    working_dir: &str,
    template: &str,
) -> anyhow::Result<String> {
    let mut key = String::new();
    for part in tarball::parse_template(template)? {
        match part {
            tarball::Part::Text(t) => key.push_str(&t),
            tarball::Part::Env(name) => {
                key.push_str(data.environment.get(&name).map(String::as_str).unwrap_or(""))
            }
            tarball::Part::Var(v) => {
                let now = now_ms() / 1000;
                let (y, m, d) = tarball::civil_date(now);
                key.push_str(&match v.as_str() {
                    "epoch" => now.to_string(),
                    "year" => y.to_string(),
                    "month" => format!("{m:02}"),
                    "day" => format!("{d:02}"),
                    _ => agent.arch.clone(),
                });
            }
            tarball::Part::Md5sum(file) => {
                let path = absolute(working_dir, &file);
                let mut tar = Vec::new();
                let mut s = agent.docker.download(container, &path);
                while let Some(chunk) = s.next().await {
                    tar.extend_from_slice(&chunk.with_context(|| format!("md5sum {file}"))?);
                    if tar.len() > 256 * 1024 * 1024 {
                        return Err(anyhow::anyhow!("md5sum {file}: file too large"));
                    }
                }
                let content = tarball::first_file(&tar[..], u64::MAX)
                    .with_context(|| format!("md5sum {file}"))?
                    .ok_or_else(|| anyhow::anyhow!("md5sum {file}: not a regular file"))?;
                let digest = Md5::digest(&content);
                key.push_str(&hex::encode(digest));
            }
        }
    }
    flotilla_store::ost::keys::validate_cache_key(&key)?;
    Ok(key)
}

async fn save_cache(
    env: &StepEnv<'_>,
    template: &str,
    contents: &[SaveContent],
    log: &mut StepLog,
) -> anyhow::Result<()> {
    let StepEnv { agent, id, container, data, working_dir, .. } = *env;
    let key = render_key(agent, container, data, working_dir, template).await?;
    let group = data.cache_group.clone();
    let found = agent
        .servers
        .call("cache lookup", |c| {
            let (exec, group, key) = (agent.cfg.id.clone(), group.clone(), key.clone());
            async move { c.executor_cache_match(&exec, &group, &key).await }
        })
        .await
        .context("cache lookup failed")?;
    if found.key.as_deref() == Some(key.as_str()) {
        log.line(&format!("[flotilla] cache {key} already saved; not saved again"));
        return Ok(());
    }
    let (path, count) = build_archive(agent, id, container, working_dir, contents).await?;
    let r = agent
        .servers
        .call("cache upload", |c| {
            let path = path.clone();
            let (exec, group, key) = (agent.cfg.id.clone(), group.clone(), key.clone());
            async move {
                let (body, size) = file_body(&path)
                    .await
                    .map_err(|e| ClientError::Transport { url: String::new(), message: format!("{e:#}") })?;
                c.executor_cache_put(&exec, &group, &key, body, Some(size)).await
            }
        })
        .await;
    let _ = tokio::fs::remove_file(&path).await;
    let stored = r.context("the cache could not be stored")?;
    log.line(&format!("[flotilla] cache {key} saved ({count} files, {} bytes)", stored.size));
    Ok(())
}

async fn restore_cache(
    env: &StepEnv<'_>,
    templates: &[String],
    dest: &str,
    log: &mut StepLog,
) -> anyhow::Result<()> {
    let StepEnv { agent, container, data, working_dir, .. } = *env;
    let group = data.cache_group.clone();
    let mut tried = Vec::new();
    for template in templates {
        let prefix = render_key(agent, container, data, working_dir, template).await?;
        tried.push(prefix.clone());
        let found = agent
            .servers
            .call("cache lookup", |c| {
                let (exec, group, prefix) = (agent.cfg.id.clone(), group.clone(), prefix.clone());
                async move { c.executor_cache_match(&exec, &group, &prefix).await }
            })
            .await
            .context("cache lookup failed")?;
        let Some(key) = found.key else { continue };
        let d = agent
            .servers
            .call("cache download", |c| {
                let (exec, group, key) = (agent.cfg.id.clone(), group.clone(), key.clone());
                async move { c.executor_cache_get(&exec, &group, &key).await }
            })
            .await
            .context("cache download failed")?;
        extract(agent, container, d, dest).await?;
        log.line(&format!("[flotilla] restored cache {key} into {dest}"));
        return Ok(());
    }
    log.line(&format!("[flotilla] no cache matches the keys {tried:?} (from {templates:?})"));
    Ok(())
}
