//! A task's pod on Docker: container 0, kept alive for the steps to run in, and the
//! service containers, started after it in its network namespace (`network_mode:
//! container:<id>`), so that a service listening on port P is `localhost:P` for the steps,
//! and also `<name>:P` (container 0's /etc/hosts maps every service name to 127.0.0.1).
//!
//! Ownership is exact: every container carries the cluster id, the executor id, the task
//! and its name in the pod as labels, and its Docker name holds the cluster and executor
//! ids too. Cleanup finds containers by those labels, never by a guessed name, so another
//! cluster (or `flotilla dev`) on the same engine is never touched.
//!
//! Registry credentials are used for the pull only and never written to a log.

use anyhow::Context as _;
use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use flotilla_store::executor::TaskData;
use flotilla_store::pod::{registry_of, ContainerConfig, MAIN_CONTAINER};
use tokio::sync::mpsc;

use crate::docker::{
    ContainerSpec, PullAuth, LABEL, LABEL_CLUSTER, LABEL_CONTAINER, LABEL_DYNAMIC, LABEL_EXECUTOR,
    LABEL_GROUP, LABEL_TASK,
};
use crate::logs::StepLog;
use crate::Agent;

/// The containers of one task, once started.
pub struct Pod {
    /// Container 0's id: the steps run in it.
    pub main: String,
    /// Services by name, with their container ids, in the task's order.
    pub services: Vec<(String, String)>,
}

impl Pod {
    /// Every container id, services first.
    pub fn ids(&self) -> Vec<String> {
        self.services.iter().map(|(_, id)| id.clone()).chain(std::iter::once(self.main.clone())).collect()
    }
}

/// A service that exited while the task ran: its name and exit code.
pub type Exits = mpsc::UnboundedReceiver<(String, i64)>;

/// Docker name of container `container` of task `task_id`: the cluster and the executor
/// in it, so two clusters (or executors) on one engine never collide. Container names
/// are host names (no '.'), so the last '.' splits task and container unambiguously.
pub fn container_name(cluster: &str, executor: &str, task_id: &str, container: &str) -> String {
    format!("flotilla-{cluster}-{executor}-{task_id}.{container}")
}

/// The labels of a container of ours.
pub(crate) fn labels(agent: &Agent, task_id: &str, container: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL.to_string(), "true".to_string()),
        (LABEL_CLUSTER.to_string(), agent.cluster_id.clone()),
        (LABEL_EXECUTOR.to_string(), agent.cfg.id.clone()),
        (LABEL_TASK.to_string(), task_id.to_string()),
        (LABEL_CONTAINER.to_string(), container.to_string()),
        (LABEL_GROUP.to_string(), agent.cfg.group.clone().unwrap_or_default()),
        (LABEL_DYNAMIC.to_string(), agent.cfg.dynamic.to_string()),
    ])
}

/// Removes every container of task `task_id` that is exactly ours (this cluster, this
/// executor, this task), found by label: what a failed or interrupted setup left.
pub async fn remove_task_containers(agent: &Agent, task_id: &str) {
    let ours = [
        (LABEL_CLUSTER, agent.cluster_id.as_str()),
        (LABEL_EXECUTOR, agent.cfg.id.as_str()),
        (LABEL_TASK, task_id),
    ];
    match agent.docker.list(&ours).await {
        Ok(list) => remove_all(agent, list.into_iter().map(|c| c.id).collect()).await,
        Err(e) => tracing::warn!(task = task_id, error = %e, "cannot list the task's containers"),
    }
}

/// Force-removes containers concurrently.
pub async fn remove_all(agent: &Agent, ids: Vec<String>) {
    let removals = ids.iter().map(|id| agent.docker.remove(id));
    for (id, r) in ids.iter().zip(futures::future::join_all(removals).await) {
        if let Err(e) = r {
            tracing::warn!(container = id, error = %e, "cannot remove a container of a task");
        }
    }
}

/// The credentials for pulling `image`, from the task's `docker_registries_auth`.
fn pull_auth(data: &TaskData, image: &str) -> anyhow::Result<Option<PullAuth>> {
    let registry = registry_of(image);
    let Some(a) = data.docker_registries_auth.get(registry) else { return Ok(None) };
    let (username, password) = match a.kind.as_str() {
        "encodedauth" => {
            let bad = || {
                anyhow::anyhow!(
                    "the encodedauth credentials of registry {registry} are not base64 of user:password"
                )
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(a.auth.as_deref().unwrap_or("").trim())
                .map_err(|_| bad())?;
            let text = String::from_utf8(decoded).map_err(|_| bad())?;
            let (u, p) = text.split_once(':').ok_or_else(bad)?;
            (u.to_string(), p.to_string())
        }
        _ => (a.username.clone().unwrap_or_default(), a.password.clone().unwrap_or_default()),
    };
    Ok(Some(PullAuth { registry: registry.to_string(), username, password }))
}

/// Makes `image` present on this host, pulling it (with the task's credentials for its
/// registry) if needed; its id if it was already here.
async fn ensure_image(
    agent: &Agent,
    data: &TaskData,
    image: &str,
    log: &mut StepLog,
) -> anyhow::Result<Option<String>> {
    if let Some(id) = agent.docker.image_id(image).await? {
        return Ok(Some(id));
    }
    let auth = pull_auth(data, image)?;
    let with = if auth.is_some() { " with the task's credentials for its registry" } else { "" };
    log.line(&format!("[flotilla] image {image} is not on this host; pulling it{with}"));
    agent
        .docker
        .pull(image, agent.cfg.pull_timeout, auth)
        .await
        .with_context(|| format!("image {image:?} is not present on this host and cannot be pulled"))?;
    Ok(None)
}

/// Docker's tmpfs options for a container's volumes (mode 1777: any user may write).
fn tmpfs_of(c: &ContainerConfig) -> anyhow::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for v in &c.volumes {
        let Some(t) = &v.tmpfs else { continue };
        let opts = match &t.size {
            Some(size) => format!("size={},mode=1777", size.bytes().map_err(anyhow::Error::msg)?),
            None => "mode=1777".to_string(),
        };
        out.insert(v.path.clone(), opts);
    }
    Ok(out)
}

/// What every step of the task sees before its own environment: container 0's, the
/// task's over it. A container made for the task holds it; a warm one (crate::warm) gets
/// it only through the execs, where it goes for every task.
pub fn base_environment(data: &TaskData) -> flotilla_store::run::StringMap {
    let mut env = data.containers.first().map(|c| c.environment.clone()).unwrap_or_default();
    env.extend(data.environment.clone());
    env
}

fn env_of(base: &flotilla_store::run::StringMap) -> Vec<String> {
    base.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Pulls what is missing, creates and starts container 0, then each service in its
/// network namespace, and watches the services: an exit is sent on the returned
/// receiver. On an error, what was created is left for the caller to remove (by label,
/// [`remove_task_containers`]), as it is when the caller drops this future.
pub async fn start(
    agent: &Arc<Agent>,
    task_id: &str,
    data: &TaskData,
    shell: &str,
    working_dir: &str,
    log: &mut StepLog,
) -> anyhow::Result<(Pod, Exits)> {
    let containers = &data.containers;
    let Some(main) = containers.first() else { anyhow::bail!("the task has no container") };
    if let Some(c) = containers.iter().find(|c| c.privileged) {
        if !agent.cfg.allow_privileged {
            return Err(anyhow::anyhow!(
                "container {} asks to be privileged and executor {} does not allow privileged containers (--allow-privileged)",
                c.name.as_deref().unwrap_or("main"),
                agent.cfg.id
            ));
        }
    }
    let name_of = |c: &ContainerConfig| c.name.clone().unwrap_or_else(|| MAIN_CONTAINER.into());
    let images: Vec<&str> = containers.iter().map(|c| c.image.as_str()).collect();
    log.line(&format!("[flotilla] executor {}: image {}", agent.cfg.id, images.join(", ")));
    let mut main_image_id = None;
    for (i, image) in images.iter().enumerate() {
        if !images[..i].contains(image) {
            let id = ensure_image(agent, data, image, log).await?;
            if i == 0 {
                main_image_id = id;
            }
        }
    }
    // Whatever an earlier attempt of this very task left (found by our labels only).
    remove_task_containers(agent, task_id).await;

    let main_name = name_of(main);
    let docker_name = container_name(&agent.cluster_id, &agent.cfg.id, task_id, &main_name);
    let warm = crate::warm::eligible(data, shell, working_dir)
        .zip(main_image_id)
        .and_then(|(image, image_id)| agent.warm.take(agent, image, &image_id));
    if let Some(id) = warm {
        // Nothing awaited from the take to the return: a caller dropping this future
        // cannot strand the container. The name is cosmetic: given in the background.
        let docker = agent.docker.clone();
        let (renamed, name) = (id.clone(), docker_name.clone());
        tokio::spawn(async move {
            if let Err(e) = docker.rename(&renamed, &name).await {
                tracing::debug!(container = renamed, error = %e, "cannot name a warm container");
            }
        });
        log.line(&format!("[flotilla] container {main_name} ({}) started, warm", short(&id)));
        let (_, exits) = mpsc::unbounded_channel();
        return Ok((Pod { main: id, services: Vec::new() }, exits));
    }

    let services = &containers[1..];
    let spec = ContainerSpec {
        name: &docker_name,
        image: &main.image,
        keep_alive_shell: Some(shell),
        entrypoint: None,
        cmd: None,
        working_dir: Some(working_dir),
        user: main.user.as_deref(),
        env: env_of(&base_environment(data)),
        privileged: main.privileged,
        labels: labels(agent, task_id, &main_name),
        network_mode: None,
        extra_hosts: services.iter().map(|s| format!("{}:127.0.0.1", name_of(s))).collect(),
        tmpfs: tmpfs_of(main)?,
    };
    let main_id = agent.docker.start(&spec).await?;
    log.line(&format!("[flotilla] container {main_name} ({}) started", short(&main_id)));

    let (tx, exits) = mpsc::unbounded_channel();
    let mut pod = Pod { main: main_id.clone(), services: Vec::new() };
    for s in services {
        let name = name_of(s);
        let docker_name = container_name(&agent.cluster_id, &agent.cfg.id, task_id, &name);
        let spec = ContainerSpec {
            name: &docker_name,
            image: &s.image,
            keep_alive_shell: None,
            entrypoint: s.entrypoint.clone(),
            cmd: s.command.clone(),
            working_dir: None,
            user: s.user.as_deref(),
            env: env_of(&s.environment),
            privileged: s.privileged,
            labels: labels(agent, task_id, &name),
            network_mode: Some(format!("container:{main_id}")),
            extra_hosts: Vec::new(),
            tmpfs: tmpfs_of(s)?,
        };
        let id = agent
            .docker
            .start(&spec)
            .await
            .with_context(|| format!("service container {name} could not start"))?;
        log.line(&format!("[flotilla] service container {name} ({}) started", short(&id)));
        let (docker, tx, watched) = (agent.docker.clone(), tx.clone(), id.clone());
        let service = name.clone();
        tokio::spawn(async move {
            if let Ok(code) = docker.wait_exit(&watched).await {
                let _ = tx.send((service, code));
            }
        });
        pod.services.push((name, id));
    }
    Ok((pod, exits))
}

fn short(id: &str) -> &str {
    &id[..12.min(id.len())]
}

/// Stores the whole output so far of every service of the pod as its container log
/// (`GET .../logs?container=NAME`), bounded by [`SERVICE_LOG_WAIT_MS`] in all.
///
/// [`SERVICE_LOG_WAIT_MS`]: flotilla_store::limits::SERVICE_LOG_WAIT_MS
pub async fn store_service_logs(agent: &Agent, task_id: &str, dir: &std::path::Path, pod: &Pod) {
    let work = async {
        for (name, id) in &pod.services {
            let step = format!("{}{name}", flotilla_store::ost::keys::CONTAINER_LOG_PREFIX);
            let path = dir.join(format!("{step}.log"));
            let mut log = match StepLog::start(
                agent.servers.clone(),
                agent.cfg.id.clone(),
                task_id.to_string(),
                step,
                path,
            ) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(task = task_id, container = name, error = %e, "cannot write a service log");
                    continue;
                }
            };
            if let Err(e) = agent.docker.logs(id, |b| log.write(&b)).await {
                log.line(&format!("[flotilla] cannot read the container's output: {e}"));
            }
            log.finish().await;
        }
    };
    let wait = std::time::Duration::from_millis(flotilla_store::limits::SERVICE_LOG_WAIT_MS);
    if tokio::time::timeout(wait, work).await.is_err() {
        tracing::warn!(task = task_id, "service logs were not stored in time");
    }
}
