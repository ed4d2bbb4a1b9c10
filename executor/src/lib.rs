//! The executor agent: runs executor tasks in Docker containers through bollard and talks
//! to the servers only over HTTP with `flotilla_client::Client`. It must never depend on the
//! server crates (raft, scheduler, api) nor link openraft, warp or sled: an executor host
//! builds and runs none of the server (`scripts/test.sh` checks the dependency tree).
//!
//! The agent registers and heartbeats, long-polls its tasks, starts a runner per new task
//! ([`task::run`]), passes stop requests on, and keeps Docker clean: at start it removes
//! the containers it left behind (a crash), and it removes the containers of a dynamic
//! sibling (same group, same Docker host) that the servers no longer know. A task the
//! servers believe running but this agent does not know (it restarted) is reported
//! failed: its container is gone. With `--warm-image`, it keeps started containers ready
//! for plain tasks of those images ([`warm`]).

pub mod docker;
pub mod logs;
pub mod pod;
pub mod restore;
pub mod servers;
pub mod tarball;
pub mod task;
pub mod warm;

use anyhow::Context as _;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::types::{ExecutorInfo, TaskDataFor};
use flotilla_client::ClientError;
use flotilla_store::executor::ExecutorTaskStatus;
use flotilla_store::run::{Phase, StringMap};
use tokio::sync::watch;

use crate::docker::Driver;
use crate::servers::Servers;

#[derive(Clone, Debug)]
pub struct Config {
    pub id: String,
    pub servers: Vec<String>,
    pub token: Option<String>,
    /// Where this agent answers health checks (`None`: nowhere).
    pub listen: Option<std::net::SocketAddr>,
    pub group: Option<String>,
    /// Empty: the Docker host's architecture.
    pub archs: Vec<String>,
    pub labels: StringMap,
    pub active_tasks_limit: u32,
    pub allow_privileged: bool,
    pub dynamic: bool,
    /// Local logs and temporary archives.
    pub work_dir: PathBuf,
    pub heartbeat: Duration,
    pub pull_timeout: Duration,
    /// On shutdown, how long running tasks may go on to finish (and report) before they
    /// are stopped. No new task starts meanwhile.
    pub drain_timeout: Duration,
    /// HTTPS on the health listener (`--tls-cert`, `--tls-key`).
    pub tls: Option<flotilla_client::server_tls::ServerTls>,
    /// Images kept warm ([`warm`]), `warm_per_image` started containers each.
    pub warm_images: Vec<String>,
    pub warm_per_image: usize,
}

/// Ten seconds: `docker stop`'s own grace period, long enough for a short step to end and
/// report, short enough for a rolling restart of executors.
pub const DEFAULT_DRAIN_TIMEOUT_S: u64 = 10;

impl Config {
    pub fn new(id: &str, servers: Vec<String>, work_dir: PathBuf) -> Config {
        Config {
            id: id.to_string(),
            servers,
            token: None,
            listen: None,
            group: None,
            archs: Vec::new(),
            labels: StringMap::new(),
            active_tasks_limit: 0,
            allow_privileged: false,
            dynamic: false,
            work_dir,
            heartbeat: Duration::from_secs(2),
            pull_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(DEFAULT_DRAIN_TIMEOUT_S),
            tls: None,
            warm_images: Vec::new(),
            warm_per_image: 1,
        }
    }
}

/// What every task runner shares.
pub struct Agent {
    pub cfg: Config,
    pub servers: Arc<Servers>,
    pub docker: Driver,
    /// Architecture of the Docker host.
    pub arch: String,
    /// The cluster this agent serves (`State::cluster_id`), on every container's labels.
    pub cluster_id: String,
    /// Task status reports, sent together when they queue.
    pub reporter: flotilla_client::report::Reporter,
    /// Started containers waiting for a task (`--warm-image`).
    pub warm: warm::Pool,
}

struct Running {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<ExecutorTaskStatus>,
}

/// Runs the agent until `shutdown` turns true. Fails only when Docker cannot be reached
/// at start or the configuration is invalid.
pub async fn run(cfg: Config, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    if cfg.servers.is_empty() {
        anyhow::bail!("at least one server URL is needed (--servers)");
    }
    flotilla_store::executor::validate_executor_id(&cfg.id).map_err(anyhow::Error::msg)?;
    let docker = Driver::connect().await?;
    let arch = docker.arch().await?;
    std::fs::create_dir_all(&cfg.work_dir)
        .with_context(|| format!("cannot create {}", cfg.work_dir.display()))?;
    let servers = Arc::new(Servers::new(&cfg.servers, cfg.token.clone()));
    let Some(cluster_id) = cluster_id(&cfg, &arch, &servers, &mut shutdown).await else { return Ok(()) };
    let reporter = servers::reporter(servers.clone(), cfg.id.clone());
    let warm = warm::Pool::new(cfg.warm_images.clone(), cfg.warm_per_image);
    let agent = Arc::new(Agent { cfg, servers, docker, arch, cluster_id, reporter, warm });

    // What a previous life of this agent left: containers (killed) and local files. Only
    // containers labeled exactly with this cluster and this executor are ours; no task
    // runs yet, so none of them is claimed.
    let ours =
        [(docker::LABEL_CLUSTER, agent.cluster_id.as_str()), (docker::LABEL_EXECUTOR, agent.cfg.id.as_str())];
    let orphans = agent.docker.list(&ours).await?;
    for c in orphans.iter().filter(|c| c.cluster == agent.cluster_id && c.executor == agent.cfg.id) {
        tracing::info!(container = c.id, task = c.task, "removing an orphan container of this executor");
        if let Err(e) = agent.docker.remove(&c.id).await {
            tracing::warn!(container = c.id, error = %e, "cannot remove an orphan container");
        }
    }
    if let Ok(entries) = std::fs::read_dir(&agent.cfg.work_dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    if let Some(addr) = agent.cfg.listen {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        tokio::spawn(health(listener, agent.cfg.tls.clone()));
    }
    tracing::info!(id = agent.cfg.id, arch = agent.arch, servers = ?agent.cfg.servers, "executor started");

    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    // Tasks ended here, with their final status: the report may not be visible in the
    // next poll yet, or may have been lost (then it is sent again).
    let mut ended: BTreeMap<String, Option<ExecutorTaskStatus>> = BTreeMap::new();
    let mut since_ended: BTreeSet<String> = BTreeSet::new();
    let mut since = 0u64;
    // A task's data (steps, environment, registry credentials) comes only while it has not
    // started; a listing that lacks the data of a task to start is asked again whole.
    let mut data_for = TaskDataFor::NotStarted;
    let mut last_heartbeat = tokio::time::Instant::now() - agent.cfg.heartbeat * 2;
    let mut last_sweep = tokio::time::Instant::now();
    // The heartbeat in flight: it runs beside the polls, so that one that waits (a refresh
    // the server writes with others, up to 250 ms; a slow server) or the warm pool's check
    // of a slow engine never holds up the next poll.
    let mut beating: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let finished: Vec<String> =
            running.iter().filter(|(_, r)| r.handle.is_finished()).map(|(id, _)| id.clone()).collect();
        for id in finished {
            if let Some(r) = running.remove(&id) {
                ended.insert(id, r.handle.await.ok());
            }
        }
        if last_heartbeat.elapsed() >= agent.cfg.heartbeat && beating.as_ref().is_none_or(|h| h.is_finished())
        {
            let (a, active) = (agent.clone(), running.len() as u32);
            beating = Some(tokio::spawn(async move {
                heartbeat(&a, active).await;
                // Bounded: a stuck engine must not hold up the next heartbeats.
                let _ = tokio::time::timeout(Duration::from_secs(5), a.warm.tend(&a)).await;
            }));
            last_heartbeat = tokio::time::Instant::now();
        }
        if last_sweep.elapsed() >= Duration::from_secs(10) {
            remove_lost_siblings(&agent).await;
            last_sweep = tokio::time::Instant::now();
        }
        let wait_ms = agent.cfg.heartbeat.as_millis() as u64;
        let client = agent.servers.client();
        let polled = tokio::select! {
            r = client.executor_tasks_with(&agent.cfg.id, since, wait_ms, data_for) => r,
            _ = shutdown.changed() => continue,
        };
        let tasks = match polled {
            Ok(t) => t,
            Err(ClientError::Api { status: 404, .. }) => {
                // Not registered (yet): let the heartbeat in flight finish, then register.
                if let Some(h) = beating.take() {
                    let _ = h.await;
                }
                last_heartbeat -= agent.cfg.heartbeat * 2;
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "task poll failed; trying the next server");
                let _ = agent.servers.call("poll", |c| async move { c.health().await }).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        since = tasks.revision;
        data_for = TaskDataFor::NotStarted;
        let listed: BTreeSet<String> = tasks.tasks.iter().map(|t| t.id.clone()).collect();
        for t in tasks.tasks {
            if let Some(r) = running.get(&t.id) {
                if t.spec.spec.stop {
                    let _ = r.stop.send(true);
                }
                continue;
            }
            if t.status.phase.is_final() {
                continue;
            }
            if let Some(last) = ended.get(&t.id) {
                // Ended here but not final there after a poll: the report was lost.
                if let Some(status) = last.clone() {
                    if since_ended.contains(&t.id) {
                        task::report(&agent, &t.id, &status).await;
                    }
                }
                continue;
            }
            match (t.status.phase, t.spec.spec.stop) {
                (Phase::Notstarted, true) => {
                    let mut s = t.status.clone();
                    s.phase = Phase::Cancelled;
                    task::report(&agent, &t.id, &s).await;
                    ended.insert(t.id.clone(), Some(s));
                }
                (Phase::Notstarted, false) => {
                    let Some(data) = t.spec.data else {
                        tracing::warn!(
                            task = t.id,
                            "task to start listed without its data; asking for every task's"
                        );
                        (data_for, since) = (TaskDataFor::All, 0);
                        continue;
                    };
                    let (stop, stop_rx) = watch::channel(false);
                    let id = t.id.clone();
                    tracing::info!(task = id, "starting task");
                    let handle = tokio::spawn(task::run(agent.clone(), t.id, t.status, data, stop_rx));
                    running.insert(id, Running { stop, handle });
                }
                // Running on the servers, unknown here: this agent restarted mid-task and
                // removed the container at start.
                (_, _) => {
                    let mut s: ExecutorTaskStatus = t.status.clone();
                    s.phase = Phase::Failed;
                    s.setup_error.get_or_insert_with(|| {
                        format!(
                            "executor {} restarted while the task ran; its container was lost",
                            agent.cfg.id
                        )
                    });
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    s.end_time = Some(now);
                    for step in &mut s.steps {
                        if step.phase == Phase::Running {
                            step.phase = Phase::Failed;
                            step.end_time = Some(now);
                        }
                    }
                    tracing::warn!(
                        task = t.id,
                        "task was running before this executor restarted; reporting it failed"
                    );
                    task::report(&agent, &t.id, &s).await;
                    ended.insert(t.id.clone(), Some(s));
                }
            }
        }
        // Tasks gone from the servers (e.g. the executor was deleted): stop them.
        for (id, r) in &running {
            if !listed.contains(id) {
                let _ = r.stop.send(true);
            }
        }
        ended.retain(|id, _| listed.contains(id));
        // Ended before this poll: a task still not final at the next one is re-reported.
        since_ended = ended.keys().cloned().collect();
    }
    // Draining heartbeats on its own; the pool closes next, with no check of it under way.
    if let Some(h) = beating.take() {
        h.abort();
        let _ = h.await;
    }
    agent.warm.close(&agent).await;
    drain(&agent, &mut running).await;
    if !running.is_empty() {
        tracing::info!(tasks = running.len(), "executor stopping; stopping its remaining tasks");
    }
    for r in running.values() {
        let _ = r.stop.send(true);
    }
    for (_, r) in running {
        let _ = tokio::time::timeout(Duration::from_secs(30), r.handle).await;
    }
    agent.warm.settle().await;
    Ok(())
}

/// The cluster's id, asked of the servers (registering first): waits until the cluster
/// is named (its first leader does that right after `cluster init`). `None` on shutdown.
async fn cluster_id(
    cfg: &Config,
    arch: &str,
    servers: &Servers,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<String> {
    let mut said = false;
    loop {
        if *shutdown.borrow() {
            return None;
        }
        let info = heartbeat_info(cfg, 0, arch);
        let r = servers
            .call("register", |c| {
                let (id, info) = (cfg.id.clone(), info.clone());
                async move {
                    c.executor_heartbeat(&id, &info).await?;
                    c.executor_tasks(&id, u64::MAX, 0).await
                }
            })
            .await;
        match r {
            Ok(t) if t.cluster_id.as_deref().is_some_and(|c| !c.is_empty()) => return t.cluster_id,
            Ok(_) if !said => {
                tracing::info!("waiting for the cluster to be named (by its leader, after cluster init)");
                said = true;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot reach the servers yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Lets running tasks finish for up to the drain timeout, polling for no new task but
/// still heartbeating (so the servers do not take this executor for gone).
async fn drain(agent: &Agent, running: &mut BTreeMap<String, Running>) {
    running.retain(|_, r| !r.handle.is_finished());
    if running.is_empty() || agent.cfg.drain_timeout.is_zero() {
        return;
    }
    tracing::info!(
        tasks = running.len(),
        timeout_s = agent.cfg.drain_timeout.as_secs(),
        "draining: waiting for running tasks to finish"
    );
    let deadline = tokio::time::Instant::now() + agent.cfg.drain_timeout;
    let mut last_heartbeat = tokio::time::Instant::now();
    while !running.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        running.retain(|_, r| !r.handle.is_finished());
        if last_heartbeat.elapsed() >= agent.cfg.heartbeat {
            heartbeat(agent, running.len() as u32).await;
            last_heartbeat = tokio::time::Instant::now();
        }
    }
}

fn heartbeat_info(cfg: &Config, active: u32, arch: &str) -> ExecutorInfo {
    let archs = if cfg.archs.is_empty() { vec![arch.to_string()] } else { cfg.archs.clone() };
    ExecutorInfo {
        listen_url: cfg.listen.map(|a| format!("http://{a}")),
        archs,
        labels: cfg.labels.clone(),
        group: cfg.group.clone(),
        dynamic: cfg.dynamic,
        allow_privileged_containers: cfg.allow_privileged,
        active_tasks_limit: cfg.active_tasks_limit,
        active_tasks: active,
    }
}

async fn heartbeat(agent: &Agent, active: u32) {
    let info = heartbeat_info(&agent.cfg, active, &agent.arch);
    let r = agent
        .servers
        .call("heartbeat", |c| {
            let (id, info) = (agent.cfg.id.clone(), info.clone());
            async move { c.executor_heartbeat(&id, &info).await }
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "heartbeat failed");
    }
}

/// Removes containers of dynamic siblings (same group, this Docker host) that the servers
/// no longer list: they died without cleaning up.
async fn remove_lost_siblings(agent: &Agent) {
    let Some(group) = &agent.cfg.group else { return };
    let labels = [(docker::LABEL_CLUSTER, agent.cluster_id.as_str()), (docker::LABEL_GROUP, group.as_str())];
    let Ok(containers) = agent.docker.list(&labels).await else { return };
    let others: Vec<_> = containers
        .into_iter()
        .filter(|c| c.cluster == agent.cluster_id && c.executor != agent.cfg.id && c.dynamic)
        .collect();
    if others.is_empty() {
        return;
    }
    let known = match agent
        .servers
        .call("siblings", |c| async move { c.executor_siblings(&agent.cfg.id).await })
        .await
    {
        Ok(k) => k,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list sibling executors");
            return;
        }
    };
    for c in others {
        if !known.executors.iter().any(|e| e == &c.executor) {
            tracing::info!(
                container = c.id,
                executor = c.executor,
                "removing a container of a vanished dynamic sibling"
            );
            let _ = agent.docker.remove(&c.id).await;
        }
    }
}

/// Answers every connection with a 200 (`GET /healthz` for probes).
async fn health(listener: tokio::net::TcpListener, tls: Option<flotilla_client::server_tls::ServerTls>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((conn, _)) = listener.accept().await else { continue };
        let tls = tls.clone();
        tokio::spawn(async move {
            let mut conn: Box<dyn flotilla_client::server_tls::Conn> = match tls {
                None => Box::new(conn),
                Some(tls) => match tls.accept(conn).await {
                    Ok(Some(a)) => Box::new(a.stream),
                    _ => return,
                },
            };
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let body = "{\"status\":\"ok\"}";
            let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
