//! Executors and executor tasks.
//!
//! An [`ExecutorTask`] is one run task handed to one executor. Only its small [`ExecutorTaskSpec`]
//! (run id, task name, executor, stop flag, generation) and its [`ExecutorTaskStatus`] are
//! replicated; the bulky part an executor needs to run it ([`TaskData`]: image, steps,
//! merged environment, workspace operations) is regenerated from the run configuration by
//! [`task_data`] every time an executor fetches its tasks (the log
//! stays small and a configuration is never stored twice).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::limits::*;
use crate::run::{validate_name, Phase, Run, RunConfig, Step, StepStatus};

/// What an executor reports about itself on every heartbeat (`PUT /api/v1/executor/{id}`).
///
/// Unknown fields are ignored, not refused (unlike a run definition, where one is a typo):
/// during a rolling upgrade a newer executor may report a field an older server does not
/// know yet, and must keep its lease. It also lets [`Executor`] flatten it into one object
/// whose schema admits the fields around it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecutorInfo {
    #[serde(default)]
    pub listen_url: Option<String>,
    #[serde(default)]
    pub archs: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub dynamic: bool,
    #[serde(default)]
    pub allow_privileged_containers: bool,
    /// 0 means no limit.
    #[serde(default)]
    pub active_tasks_limit: u32,
    /// Tasks the executor says it is running (informative; the scheduler counts its own).
    #[serde(default)]
    pub active_tasks: u32,
}

impl ExecutorInfo {
    pub fn validate(&self) -> Result<(), String> {
        if self.archs.len() > MAX_ARCHS {
            return Err(format!("{} archs, the limit is {MAX_ARCHS}", self.archs.len()));
        }
        for a in &self.archs {
            validate_name("arch", a)?;
        }
        if let Some(g) = &self.group {
            validate_name("executor group", g)?;
        }
        if self.labels.len() > MAX_MAP_ENTRIES
            || self.labels.iter().any(|(k, v)| k.len() + v.len() > MAX_MAP_VALUE_BYTES)
        {
            return Err("too many or too long labels".into());
        }
        if self.listen_url.as_ref().is_some_and(|u| u.len() > MAX_NODE_ADDR_BYTES) {
            return Err("listen_url is too long".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Executor {
    pub id: String,
    #[serde(flatten)]
    pub info: ExecutorInfo,
    /// Milliseconds since the Unix epoch of the last heartbeat.
    pub last_seen: u64,
    /// Log index of the last change to the set of tasks this executor must run (a task
    /// assigned, stopped or removed). Executors long-poll on it.
    pub tasks_revision: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecutorTaskSpec {
    pub run_id: String,
    pub task_name: String,
    pub executor_id: String,
    pub stop: bool,
    /// Bumped on every change of the spec (so far: the stop flag).
    pub generation: u64,
    /// The leader whose scheduler handed the task out, set when the decision is applied.
    /// `None` only for tasks handed out before decisions were fenced by term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<Decider>,
}

/// A Raft leader: its term and node id. A scheduler decision carries the leader that made
/// it, and is applied only from a log entry that leader appended in that term (a fencing
/// token): a decision made on a view that an election has since made stale cannot land.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Decider {
    pub term: u64,
    pub node: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecutorTaskStatus {
    pub phase: Phase,
    #[serde(default)]
    pub setup_error: Option<String>,
    /// Why the task failed after its setup, as a sentence ("timed out after 3 s", "service
    /// container db exited with code 1"); copied into the run task's `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub setup_step: StepStatus,
    #[serde(default)]
    pub steps: Vec<StepStatus>,
    #[serde(default)]
    pub start_time: Option<u64>,
    #[serde(default)]
    pub end_time: Option<u64>,
}

impl ExecutorTaskStatus {
    pub fn new(steps: usize) -> Self {
        ExecutorTaskStatus {
            phase: Phase::Notstarted,
            setup_error: None,
            error: None,
            setup_step: StepStatus::default(),
            steps: vec![StepStatus::default(); steps],
            start_time: None,
            end_time: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecutorTask {
    pub id: String,
    pub spec: ExecutorTaskSpec,
    pub status: ExecutorTaskStatus,
    /// Log index of the last change.
    pub revision: u64,
}

/// The executor task id of a run task: one per run task, so no task can be handed out twice.
pub fn executor_task_id(run_id: &str, task_name: &str) -> String {
    format!("{run_id}.{task_name}")
}

/// A workspace archive to restore: the `save_to_workspace` step `step` of task `task`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkspaceArchive {
    pub task_id: String,
    pub task_name: String,
    pub step: usize,
}

/// The regenerated part of an executor task's spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskData {
    pub run_name: String,
    pub group: String,
    pub image: String,
    pub arch: Option<String>,
    pub privileged: bool,
    pub working_dir: Option<String>,
    pub shell: Option<String>,
    pub user: Option<String>,
    /// The run's static env, then its env, then the task's, then `FLOTILLA_*` (later
    /// wins); a step's own environment goes on top when it runs.
    pub environment: BTreeMap<String, String>,
    pub steps: Vec<Step>,
    pub cache_group: String,
    /// Archives saved by every ancestor, by distance from the root then task name.
    pub workspace: Vec<WorkspaceArchive>,
    /// The pod, every container named (container 0 runs the steps; `image` and
    /// `privileged` above are container 0's).
    #[serde(default)]
    pub containers: Vec<crate::pod::ContainerConfig>,
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// The run's registry credentials overlaid with the task's (the task wins per
    /// registry). The one place secrets leave the state: only to the task's executor.
    #[serde(default)]
    pub docker_registries_auth: BTreeMap<String, crate::pod::RegistryAuth>,
}

/// Builds the data an executor needs for `task` (one of `config`'s tasks) of `run`.
pub fn task_data(run: &Run, config: &RunConfig, task: &crate::run::TaskConfig) -> TaskData {
    let task_name = task.name.as_str();
    let mut environment = config.static_environment.clone();
    environment.extend(config.environment.clone());
    environment.extend(task.environment.clone());
    environment.insert("FLOTILLA_RUN_ID".into(), run.id.clone());
    environment.insert("FLOTILLA_RUN_COUNTER".into(), run.counter.to_string());
    environment.insert("FLOTILLA_TASK_NAME".into(), task_name.into());
    let cache_group = config
        .cache_group
        .clone()
        .unwrap_or_else(|| format!("/{}", crate::run::root_group_of(&config.group)));

    // Ancestors with their level (longest distance from a root), walked without recursion.
    let by_name: BTreeMap<&str, &crate::run::TaskConfig> =
        config.tasks.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut ancestors: BTreeMap<&str, ()> = BTreeMap::new();
    let mut todo: Vec<&str> = task.depends.iter().map(|d| d.task.as_str()).collect();
    while let Some(name) = todo.pop() {
        if ancestors.insert(name, ()).is_none() {
            if let Some(t) = by_name.get(name) {
                todo.extend(t.depends.iter().map(|d| d.task.as_str()));
            }
        }
    }
    let levels = task_levels(config);
    let mut workspace = Vec::new();
    for name in ancestors.keys() {
        let t = by_name[name];
        for (step, s) in t.steps.iter().enumerate() {
            if matches!(s, Step::SaveToWorkspace(_)) {
                // A task kept by a restart left its archives under the run that ran it.
                let owner = run.tasks.get(*name).map_or(run.id.as_str(), |t| t.outputs_run(&run.id));
                let task_id = crate::executor::executor_task_id(owner, name);
                workspace.push((
                    levels.get(*name).copied().unwrap_or(0),
                    WorkspaceArchive { task_id, task_name: name.to_string(), step },
                ));
            }
        }
    }
    workspace.sort_by(|a, b| (a.0, &a.1.task_name, a.1.step).cmp(&(b.0, &b.1.task_name, b.1.step)));
    let containers = crate::pod::pod_of(task);
    let mut docker_registries_auth = config.docker_registries_auth.clone();
    docker_registries_auth.extend(task.docker_registries_auth.clone());
    TaskData {
        run_name: run.name.clone(),
        group: run.group.clone(),
        image: containers[0].image.clone(),
        arch: task.arch.clone(),
        privileged: crate::pod::needs_privileged(task),
        working_dir: task.working_dir.clone(),
        shell: task.shell.clone(),
        environment,
        steps: task.steps.clone(),
        cache_group,
        workspace: workspace.into_iter().map(|(_, w)| w).collect(),
        user: containers[0].user.clone(),
        containers,
        timeout_s: task.timeout_s.map(|t| t.max(1) as u64),
        docker_registries_auth,
    }
}

/// Level of every task: 0 for roots, else 1 + the highest parent level. Iterative
/// (Kahn's order), so a long chain needs no deep recursion. Assumes a validated DAG.
pub fn task_levels(config: &RunConfig) -> BTreeMap<String, usize> {
    let mut levels: BTreeMap<String, usize> = BTreeMap::new();
    let mut remaining: Vec<&crate::run::TaskConfig> = config.tasks.iter().collect();
    while !remaining.is_empty() {
        let before = remaining.len();
        remaining.retain(|t| {
            let parent_levels: Option<Vec<usize>> =
                t.depends.iter().map(|d| levels.get(&d.task).copied()).collect();
            match parent_levels {
                Some(ls) => {
                    levels.insert(t.name.clone(), ls.into_iter().map(|l| l + 1).max().unwrap_or(0));
                    false
                }
                None => true,
            }
        });
        if remaining.len() == before {
            break; // a cycle: cannot happen for a validated run
        }
    }
    levels
}

/// Validates a status report against the task's step count.
pub fn validate_status(status: &ExecutorTaskStatus, steps: usize) -> Result<(), String> {
    if status.steps.len() != steps {
        return Err(format!("status has {} steps, the task has {steps}", status.steps.len()));
    }
    if status.setup_error.as_ref().is_some_and(|e| e.len() > MAX_MAP_VALUE_BYTES) {
        return Err(format!("setup_error is longer than {MAX_MAP_VALUE_BYTES} bytes"));
    }
    if status.error.as_ref().is_some_and(|e| e.len() > MAX_MAP_VALUE_BYTES) {
        return Err(format!("error is longer than {MAX_MAP_VALUE_BYTES} bytes"));
    }
    Ok(())
}

pub fn validate_executor_id(id: &str) -> Result<(), String> {
    validate_name("executor id", id)
}
