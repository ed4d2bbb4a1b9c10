//! Warm containers (`--warm-image IMAGE`, `--warm-per-image N`): step containers created
//! and started before any task asks for them, so that a task whose pod is one plain
//! container of such an image skips Docker's create and start — ~160–200 ms of a ~270 ms
//! one-step task on the benchmark machines (docs/benchmarks.md, section 3).
//!
//! A warm container is what setup would make for such a task, less what only the task
//! knows: the task's environment goes on each step's exec (where it goes for every task),
//! and its name is given when a task takes it. Labels cannot change after creation, so a
//! taken container's `flotilla.task` label stays empty and `flotilla.warm=true` says why;
//! the task holds its id, and a crash leaves it to the next start's orphan sweep like any
//! container of this executor. One task uses it, then it is removed as always; taking one
//! starts a replacement in the background. Only a container of the image's current id is
//! taken: after the tag moved (a pull), the stale ones are removed and the task starts cold.
//!
//! Which tasks may take one ([`eligible`]): a pod of one container named `main`, of a warm
//! image, not privileged, with no user or volumes of its own, the default shell and
//! working directory. Every other task starts cold, as it always did. A warm container
//! found dead (an engine restart, a `docker rm`) is dropped at the next heartbeat and
//! replaced.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_store::executor::TaskData;
use flotilla_store::pod::MAIN_CONTAINER;

use crate::docker::{ContainerSpec, LABEL_WARM};
use crate::Agent;

/// After a failed creation (an image that cannot be pulled, an engine refusing), the pool
/// of that image is not refilled for this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Most warm containers kept per image.
pub const MAX_PER_IMAGE: usize = 64;

/// The warm containers of one executor.
pub struct Pool {
    images: Vec<String>,
    per_image: usize,
    state: Mutex<State>,
    /// Makes the Docker names unique within this life of the executor (the previous
    /// life's containers are removed before the pool fills).
    serial: AtomicU64,
}

#[derive(Default)]
struct State {
    ready: HashMap<String, Vec<Warm>>,
    /// Creations under way, per image.
    starting: HashMap<String, usize>,
    failed: HashMap<String, Instant>,
    /// Set at shutdown: nothing is added any more; a creation that ends removes its container.
    closed: bool,
}

struct Warm {
    id: String,
    /// The image id it was created from.
    image_id: String,
}

/// `image` as Docker reads it, less Docker Hub's implied prefixes, with the implied
/// `:latest` when it names no tag or digest: `--warm-image alpine` serves a task of
/// `docker.io/library/alpine:latest` and the other way round.
fn canonical(image: &str) -> String {
    let short = ["docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/"]
        .iter()
        .find_map(|p| image.strip_prefix(p))
        .unwrap_or(image);
    let last = short.rsplit('/').next().unwrap_or(short);
    if last.contains(':') || last.contains('@') {
        short.to_string()
    } else {
        format!("{short}:latest")
    }
}

/// The image of container 0 if the task may run in a warm container of it (see the module
/// documentation), whatever images are warm.
pub fn eligible<'a>(data: &'a TaskData, shell: &str, working_dir: &str) -> Option<&'a str> {
    let [main] = data.containers.as_slice() else { return None };
    let plain = !main.privileged
        && main.user.is_none()
        && main.volumes.is_empty()
        && main.name.as_deref().is_none_or(|n| n == MAIN_CONTAINER);
    let defaults = shell == crate::task::DEFAULT_SHELL && working_dir == crate::task::DEFAULT_WORKING_DIR;
    (plain && defaults).then_some(main.image.as_str())
}

impl Pool {
    pub fn new(images: Vec<String>, per_image: usize) -> Pool {
        let mut unique: Vec<String> = Vec::new();
        for image in images.iter().filter(|i| !i.is_empty()).map(|i| canonical(i)) {
            if !unique.contains(&image) {
                unique.push(image);
            }
        }
        Pool {
            images: unique,
            per_image: per_image.min(MAX_PER_IMAGE),
            state: Mutex::new(State::default()),
            serial: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A started container of `image` (whose id on this host is now `image_id`), taken out
    /// of the pool for one task; `None`: start cold. Never waits: a caller dropped right
    /// after cannot lose the container in between. Stale containers found on the way are
    /// removed, and replacements started, in the background.
    pub fn take(&self, agent: &Arc<Agent>, image: &str, image_id: &str) -> Option<String> {
        let image = &canonical(image);
        let (found, stale) = {
            let mut st = self.lock();
            let ready = st.ready.get_mut(image)?;
            let stale: Vec<String> =
                ready.iter().filter(|w| w.image_id != image_id).map(|w| w.id.clone()).collect();
            ready.retain(|w| w.image_id == image_id);
            (ready.pop().map(|w| w.id), stale)
        };
        if found.is_some() || !stale.is_empty() {
            self.fill(agent);
        }
        if !stale.is_empty() {
            tracing::info!(image, containers = stale.len(), "removing warm containers of an older image");
            let agent = agent.clone();
            tokio::spawn(async move { crate::pod::remove_all(&agent, stale).await });
        }
        found
    }

    /// Starts the creations that bring every warm image to its count (in the background).
    pub fn fill(&self, agent: &Arc<Agent>) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        for image in &self.images {
            if st.failed.get(image).is_some_and(|t| t.elapsed() < RETRY_AFTER) {
                continue;
            }
            let have = st.ready.get(image).map_or(0, Vec::len) + st.starting.get(image).copied().unwrap_or(0);
            for _ in have..self.per_image {
                *st.starting.entry(image.clone()).or_default() += 1;
                tokio::spawn(create(agent.clone(), image.clone()));
            }
        }
    }

    /// At each heartbeat: drops (and removes) the ready containers that stopped running
    /// (an engine restart, an OOM kill, a `docker rm`), then refills.
    pub async fn tend(&self, agent: &Arc<Agent>) {
        // Only what was ready before the listing is judged: a creation ending meanwhile
        // may be listed as not yet running.
        let judged: Vec<String> =
            self.lock().ready.values().flat_map(|v| v.iter().map(|w| w.id.clone())).collect();
        if !judged.is_empty() {
            let labels = [
                (crate::docker::LABEL_CLUSTER, agent.cluster_id.as_str()),
                (crate::docker::LABEL_EXECUTOR, agent.cfg.id.as_str()),
                (LABEL_WARM, "true"),
            ];
            let Ok(listed) = agent.docker.list(&labels).await else { return };
            let alive: Vec<String> = listed.into_iter().filter(|c| c.running).map(|c| c.id).collect();
            let dead: Vec<String> = judged.into_iter().filter(|id| !alive.contains(id)).collect();
            if !dead.is_empty() {
                self.lock().ready.values_mut().for_each(|v| v.retain(|w| !dead.contains(&w.id)));
                tracing::warn!(containers = dead.len(), "warm containers stopped running; replacing them");
                crate::pod::remove_all(agent, dead).await;
            }
        }
        self.fill(agent);
    }

    /// At shutdown, before draining: removes the ready containers; the pool takes and
    /// makes no more. [`Pool::settle`] waits for the creations under way.
    pub async fn close(&self, agent: &Agent) {
        let ids: Vec<String> = {
            let mut st = self.lock();
            st.closed = true;
            st.ready.drain().flat_map(|(_, v)| v.into_iter().map(|w| w.id)).collect()
        };
        crate::pod::remove_all(agent, ids).await;
    }

    /// After [`Pool::close`]: waits (bounded) for the creations under way, which remove
    /// what they made.
    pub async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.lock().starting.values().any(|n| *n > 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Creates and starts one warm container of `image` (pulling a missing image, without
/// credentials: a private image is warm only once a task has pulled it), then adds it to
/// the pool.
async fn create(agent: Arc<Agent>, image: String) {
    let pool = &agent.warm;
    let made = async {
        let image_id = match agent.docker.image_id(&image).await? {
            Some(id) => id,
            None => {
                agent.docker.pull(&image, agent.cfg.pull_timeout, None).await?;
                let id = agent.docker.image_id(&image).await?;
                id.ok_or_else(|| crate::docker::DockerError(format!("{image} is gone after its pull")))?
            }
        };
        let serial = pool.serial.fetch_add(1, Ordering::Relaxed);
        let name = format!("flotilla-{}-{}-warm-{serial}", agent.cluster_id, agent.cfg.id);
        let mut labels = crate::pod::labels(&agent, "", MAIN_CONTAINER);
        labels.insert(LABEL_WARM.to_string(), "true".to_string());
        // Created from the id just read: a tag moving meanwhile cannot mislabel it.
        let spec = ContainerSpec {
            name: &name,
            image: &image_id,
            keep_alive_shell: Some(crate::task::DEFAULT_SHELL),
            entrypoint: None,
            cmd: None,
            working_dir: Some(crate::task::DEFAULT_WORKING_DIR),
            user: None,
            env: Vec::new(),
            privileged: false,
            labels,
            network_mode: None,
            extra_hosts: Vec::new(),
            tmpfs: HashMap::new(),
        };
        let id = agent.docker.start(&spec).await?;
        Ok::<Warm, crate::docker::DockerError>(Warm { id, image_id })
    };
    let made = made.await;
    let leftover = {
        let mut st = pool.lock();
        if st.closed {
            // Still counted as starting until removed below, so that `close` waits for it.
            Some(made)
        } else {
            match made {
                Ok(w) => {
                    tracing::info!(image, container = w.id, "warm container ready");
                    st.failed.remove(&image);
                    st.ready.entry(image.clone()).or_default().push(w);
                }
                Err(e) => {
                    tracing::warn!(image, error = %e, "cannot start a warm container; retrying in 30 s");
                    st.failed.insert(image.clone(), Instant::now());
                }
            }
            None
        }
    };
    if let Some(Ok(w)) = leftover {
        crate::pod::remove_all(&agent, vec![w.id]).await;
    }
    if let Some(n) = pool.lock().starting.get_mut(&image) {
        *n = n.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_store::pod::{ContainerConfig, Volume};

    fn data(containers: Vec<ContainerConfig>) -> TaskData {
        let mut d: TaskData = serde_json::from_value(serde_json::json!({
            "run_name": "r", "group": "/g", "image": "img", "arch": null, "privileged": false,
            "working_dir": null, "shell": null, "user": null, "environment": {}, "steps": [],
            "cache_group": "", "workspace": [], "containers": [], "timeout_s": null,
            "docker_registries_auth": {}
        }))
        .unwrap();
        d.containers = containers;
        d
    }

    fn container(image: &str) -> ContainerConfig {
        serde_json::from_value(serde_json::json!({"image": image})).unwrap()
    }

    #[test]
    fn an_untagged_image_is_latest() {
        assert_eq!(canonical("alpine"), "alpine:latest");
        assert_eq!(canonical("alpine:3"), "alpine:3");
        assert_eq!(canonical("localhost:5000/team/app"), "localhost:5000/team/app:latest");
        assert_eq!(canonical("localhost:5000/app:v1"), "localhost:5000/app:v1");
        assert_eq!(canonical("app@sha256:abc"), "app@sha256:abc");
        assert_eq!(canonical("docker.io/library/alpine"), "alpine:latest");
        assert_eq!(canonical("docker.io/team/app:1"), "team/app:1");
    }

    #[test]
    fn only_a_plain_lone_container_with_the_default_shell_and_directory_may_be_warm() {
        let (sh, wd) = (crate::task::DEFAULT_SHELL, crate::task::DEFAULT_WORKING_DIR);
        let mut env = container("img");
        env.environment.insert("K".into(), "v".into());
        env.name = Some("main".into());
        assert_eq!(eligible(&data(vec![env]), sh, wd), Some("img"), "its environment goes on the execs");
        assert_eq!(eligible(&data(vec![container("img")]), sh, "/elsewhere"), None);
        assert_eq!(eligible(&data(vec![container("img")]), "/bin/bash", wd), None);
        assert_eq!(eligible(&data(vec![container("img"), container("svc")]), sh, wd), None);
        assert_eq!(eligible(&data(vec![]), sh, wd), None);
        let mut c = container("img");
        c.name = Some("build".into());
        assert_eq!(eligible(&data(vec![c]), sh, wd), None, "its label would say main");
        let mut c = container("img");
        c.privileged = true;
        assert_eq!(eligible(&data(vec![c]), sh, wd), None);
        let mut c = container("img");
        c.user = Some("1000".into());
        assert_eq!(eligible(&data(vec![c]), sh, wd), None);
        let mut c = container("img");
        c.volumes.push(Volume { path: "/cache".into(), tmpfs: None });
        assert_eq!(eligible(&data(vec![c]), sh, wd), None);
    }
}
