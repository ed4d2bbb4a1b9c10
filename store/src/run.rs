//! Runs: what a user submits ([`RunCreate`]), what the cluster tracks ([`Run`], [`RunTask`])
//! and how a submission is checked before it may enter the log.
//!
//! A [`RunCreate`] is kept as the run's configuration ([`RunConfig`]) beside the run; the
//! run itself holds only status. Everything an executor needs (image, steps, merged
//! environment, workspace operations) is derived from the configuration when the executor
//! asks for its tasks (see [`crate::executor::task_data`]), never stored twice.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::limits::*;

pub type StringMap = BTreeMap<String, String>;

/// A run as submitted (`POST /api/v1/runs`, `flotilla run create -f`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RunCreate {
    pub name: String,
    #[serde(default = "root_group")]
    pub group: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub static_environment: BTreeMap<String, String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_group: Option<String>,
    #[serde(default)]
    pub setup_errors: Vec<String>,
    #[serde(default)]
    pub tasks: Vec<TaskConfig>,
    /// Registry credentials for every task's images (a task's own entry for a registry
    /// wins). Secrets: see [`crate::pod`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub docker_registries_auth: BTreeMap<String, crate::pod::RegistryAuth>,
    // Run lifecycle (issue 18): additions to the submission kept together here.
    /// The run stays `queued` while this many older runs of exactly its group are running,
    /// and queued runs of the group start in `counter` order (Agola runs a group's runs one
    /// at a time with 1). None: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running_in_group: Option<u32>,
}

/// Every field name of a run definition (runs, tasks, steps, containers, registry
/// credentials). The CLI shows these in the path of a parse error, and any other map key
/// (an environment variable, an annotation, text of a file that is no definition) as `…`;
/// the fuzz test draws keys from them.
pub const DEFINITION_FIELDS: &[&str] = &[
    "name",
    "group",
    "annotations",
    "static_environment",
    "environment",
    "cache_group",
    "setup_errors",
    "tasks",
    "image",
    "arch",
    "privileged",
    "working_dir",
    "shell",
    "user",
    "needs_approval",
    "approvers_required",
    "depends",
    "steps",
    "task",
    "conditions",
    "run",
    "command",
    "tty",
    "save_to_workspace",
    "restore_workspace",
    "save_cache",
    "restore_cache",
    "contents",
    "source_dir",
    "dest_dir",
    "paths",
    "key",
    "keys",
    "containers",
    "entrypoint",
    "volumes",
    "path",
    "tmpfs",
    "size",
    "timeout_s",
    "ignore_failure",
    "skip",
    "docker_registries_auth",
    "max_running_in_group",
    "type",
    "username",
    "password",
    "auth",
];

fn root_group() -> String {
    "/".into()
}

/// The stored configuration of a run: exactly what was submitted.
pub type RunConfig = RunCreate;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub name: String,
    /// Shorthand for a pod of one container; empty when `containers` is given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// The task's pod: container 0 runs the steps, the others are services (see
    /// [`crate::pod`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<crate::pod::ContainerConfig>,
    /// Running longer than this fails the task (reason `timeout`). Signed so that a
    /// negative value is refused by [`RunCreate::validate`] with a sentence, not by serde.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<i64>,
    /// A failure of this task does not make the run's result `failed` (the task's own
    /// status stays `failed`, and its children see it so).
    #[serde(default)]
    pub ignore_failure: bool,
    /// The task is created `skipped` (children with `on_skipped` run).
    #[serde(default)]
    pub skip: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub docker_registries_auth: BTreeMap<String, crate::pod::RegistryAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(default)]
    pub privileged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// User (name or uid[:gid]) the steps run as; the image's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub needs_approval: bool,
    #[serde(default = "one")]
    pub approvers_required: u32,
    #[serde(default)]
    pub depends: Vec<Depend>,
    #[serde(default)]
    pub steps: Vec<Step>,
}

fn one() -> u32 {
    1
}

impl TaskConfig {
    /// A task with the defaults of a submission: no arch, not privileged, no approval,
    /// no dependencies, and one `run` step of `command`.
    pub fn new(name: &str, image: &str, command: &str) -> TaskConfig {
        TaskConfig {
            name: name.into(),
            image: image.into(),
            containers: Vec::new(),
            timeout_s: None,
            ignore_failure: false,
            skip: false,
            docker_registries_auth: BTreeMap::new(),
            arch: None,
            privileged: false,
            working_dir: None,
            shell: None,
            user: None,
            environment: StringMap::new(),
            needs_approval: false,
            approvers_required: 1,
            depends: Vec::new(),
            steps: vec![Step::Run(RunStep {
                name: None,
                command: command.into(),
                environment: StringMap::new(),
                working_dir: None,
                shell: None,
                tty: false,
            })],
        }
    }
}

impl RunCreate {
    /// A run in `group` with these tasks and nothing else set.
    pub fn new(name: &str, group: &str, tasks: Vec<TaskConfig>) -> RunCreate {
        RunCreate {
            name: name.into(),
            group: group.into(),
            annotations: StringMap::new(),
            static_environment: StringMap::new(),
            environment: StringMap::new(),
            cache_group: None,
            setup_errors: vec![],
            tasks,
            docker_registries_auth: BTreeMap::new(),
            max_running_in_group: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Depend {
    pub task: String,
    /// Empty means `[on_success]`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    OnSuccess,
    OnFailure,
    OnSkipped,
}

impl Depend {
    /// Whether a parent that ended with `status` lets this dependency pass.
    pub fn satisfied_by(&self, status: TaskStatus) -> bool {
        let wanted = match status {
            TaskStatus::Success => Condition::OnSuccess,
            TaskStatus::Failed => Condition::OnFailure,
            TaskStatus::Skipped => Condition::OnSkipped,
            _ => return false,
        };
        if self.conditions.is_empty() {
            wanted == Condition::OnSuccess
        } else {
            self.conditions.contains(&wanted)
        }
    }
}

/// One step of a task; in JSON/YAML a one-key object naming its type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Run(RunStep),
    SaveToWorkspace(SaveToWorkspace),
    RestoreWorkspace(RestoreWorkspace),
    SaveCache(SaveCache),
    RestoreCache(RestoreCache),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RunStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub command: String,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default)]
    pub tty: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SaveContent {
    pub source_dir: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_dir: Option<String>,
    #[serde(default)]
    pub paths: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SaveToWorkspace {
    pub contents: Vec<SaveContent>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RestoreWorkspace {
    pub dest_dir: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SaveCache {
    pub key: String,
    pub contents: Vec<SaveContent>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RestoreCache {
    pub keys: Vec<String>,
    pub dest_dir: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RunPhase {
    Setuperror,
    Queued,
    Cancelled,
    Running,
    Finished,
}

impl RunPhase {
    /// Phases a run never leaves.
    pub fn is_final(self) -> bool {
        matches!(self, RunPhase::Setuperror | RunPhase::Cancelled | RunPhase::Finished)
    }
}

/// The phase as its JSON word (`finished`), for messages.
pub fn phase_word(p: RunPhase) -> &'static str {
    match p {
        RunPhase::Setuperror => "setuperror",
        RunPhase::Queued => "queued",
        RunPhase::Cancelled => "cancelled",
        RunPhase::Running => "running",
        RunPhase::Finished => "finished",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RunResult {
    Unknown,
    Stopped,
    Success,
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Notstarted,
    Skipped,
    Cancelled,
    Running,
    Stopped,
    Success,
    Failed,
}

impl TaskStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, TaskStatus::Notstarted | TaskStatus::Running)
    }
}

/// Phase of an executor task and of each of its steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Notstarted,
    Cancelled,
    Running,
    Stopped,
    Success,
    Failed,
}

impl Phase {
    pub fn is_final(self) -> bool {
        !matches!(self, Phase::Notstarted | Phase::Running)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LogPhase {
    Notavailable,
    Sent,
    Error,
}

/// Status of a setup step or a step. Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepStatus {
    pub phase: Phase,
    #[serde(default)]
    pub exit_status: Option<i32>,
    #[serde(default)]
    pub start_time: Option<u64>,
    #[serde(default)]
    pub end_time: Option<u64>,
    pub log_phase: LogPhase,
    /// Why the step ended other than by its own exit: `timeout` (the task's `timeout_s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// [`StepStatus::reason`] of the step (or setup) a task's timeout stopped.
pub const REASON_TIMEOUT: &str = "timeout";

impl Default for StepStatus {
    fn default() -> Self {
        StepStatus {
            phase: Phase::Notstarted,
            exit_status: None,
            start_time: None,
            end_time: None,
            log_phase: LogPhase::Notavailable,
            reason: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunTask {
    pub status: TaskStatus,
    pub approved: bool,
    pub waiting_approval: bool,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    pub setup_step: StepStatus,
    pub steps: Vec<StepStatus>,
    #[serde(default)]
    pub executor_id: Option<String>,
    /// Why the task failed outside its steps (setup error, executor lost).
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub start_time: Option<u64>,
    #[serde(default)]
    pub end_time: Option<u64>,
    /// The task's pod, as `NAME IMAGE` (container 0 first), and its `timeout_s`: what
    /// `run get` shows of the configuration (no secret is in either).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<i64>,
    /// Set on a task kept from the run it was restarted from: the id of the run whose
    /// executor task produced its logs and workspace archives (read from there, shared
    /// through `runid` references, never copied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
}

impl RunTask {
    /// The run whose executor task holds this task's logs and archives: `run_id` unless
    /// the task was kept from an earlier run by a restart.
    pub fn outputs_run<'a>(&'a self, run_id: &'a str) -> &'a str {
        self.restored_from.as_deref().unwrap_or(run_id)
    }
}

/// A run's status. Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Run {
    /// Sortable and monotonic: 16 decimal digits of a sequence that only grows.
    pub id: String,
    /// Per root group (`/project/42/...` counts under `project`).
    pub counter: u64,
    pub name: String,
    pub group: String,
    pub annotations: BTreeMap<String, String>,
    pub phase: RunPhase,
    pub result: RunResult,
    pub stop: bool,
    pub tasks: BTreeMap<String, RunTask>,
    #[serde(default)]
    pub setup_errors: Vec<String>,
    pub enqueue_time: Option<u64>,
    pub start_time: Option<u64>,
    pub end_time: Option<u64>,
    /// Log index of the last change to this run (compare-and-swap token).
    pub revision: u64,
    /// The run this one was restarted from (`PUT /runs/{id}/actions {"action":"restart"}`).
    #[serde(default)]
    pub restarted_from: Option<String>,
}

/// The run id for sequence number `seq`: fixed width so string order is numeric order.
pub fn run_id(seq: u64) -> String {
    format!("{seq:016}")
}

/// The root of a group path (`/project/42/branch` → `project`), the scope of run counters.
pub fn root_group_of(group: &str) -> &str {
    group.trim_start_matches('/').split('/').next().unwrap_or("")
}

/// Whether `group` is `filter` or lies below it (`/a/b` is under `/a`, `/ab` is not).
pub fn group_matches(group: &str, filter: &str) -> bool {
    let filter = filter.trim_end_matches('/');
    filter.is_empty()
        || group == filter
        || (group.starts_with(filter) && group[filter.len()..].starts_with('/'))
}

/// Names of tasks, runs, executors: short and safe in URLs and object-storage keys.
pub fn validate_name(what: impl std::fmt::Display, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!("{what} {name:?} must be 1 to {MAX_NAME_BYTES} bytes"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || name.starts_with('.')
    {
        return Err(format!("{what} {name:?} may only hold letters, digits, '-', '_' and '.' (not first)"));
    }
    Ok(())
}

fn validate_group(what: impl std::fmt::Display, group: &str) -> Result<(), String> {
    if !group.starts_with('/') || group.len() > MAX_GROUP_BYTES {
        return Err(format!(
            "{what} {group:?} must be a path starting with '/' of at most {MAX_GROUP_BYTES} bytes"
        ));
    }
    for part in group.split('/').skip(1).filter(|p| !p.is_empty()) {
        validate_name(format_args!("{what} component"), part)?;
    }
    Ok(())
}

/// [`validate_map`] for the pod module.
pub(crate) fn validate_map_pub(what: impl std::fmt::Display, map: &StringMap) -> Result<(), String> {
    validate_map(what, map)
}

fn validate_map(what: impl std::fmt::Display, map: &StringMap) -> Result<(), String> {
    if map.len() > MAX_MAP_ENTRIES {
        return Err(format!("{what} has {} entries, the limit is {MAX_MAP_ENTRIES}", map.len()));
    }
    for (k, v) in map {
        if k.is_empty() || k.len() > MAX_NAME_BYTES || k.chars().any(char::is_control) {
            return Err(format!(
                "{what} key {k:?} must be 1 to {MAX_NAME_BYTES} bytes with no control characters"
            ));
        }
        if v.len() > MAX_MAP_VALUE_BYTES {
            return Err(format!(
                "{what} value of {k:?} is {} bytes, the limit is {MAX_MAP_VALUE_BYTES}",
                v.len()
            ));
        }
    }
    Ok(())
}

impl RunCreate {
    /// Checks everything a run must satisfy before it may be stored: names, limits,
    /// dependencies (known, no self-dependency, no cycle) and step contents.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES || self.name.chars().any(char::is_control)
        {
            return Err(format!("run name must be 1 to {MAX_NAME_BYTES} bytes with no control characters"));
        }
        validate_group("group", &self.group)?;
        if let Some(cg) = &self.cache_group {
            validate_group("cache_group", cg)?;
        }
        validate_map("annotations", &self.annotations)?;
        validate_map("static_environment", &self.static_environment)?;
        validate_map("environment", &self.environment)?;
        crate::pod::validate_auths("docker_registries_auth", &self.docker_registries_auth)?;
        if self.setup_errors.len() > MAX_SETUP_ERRORS {
            return Err(format!("{} setup_errors, the limit is {MAX_SETUP_ERRORS}", self.setup_errors.len()));
        }
        if let Some(e) = self.setup_errors.iter().find(|e| e.len() > MAX_MAP_VALUE_BYTES) {
            return Err(format!("a setup error is {} bytes, the limit is {MAX_MAP_VALUE_BYTES}", e.len()));
        }
        if self.tasks.is_empty() && self.setup_errors.is_empty() {
            return Err("a run needs at least one task".into());
        }
        if self.tasks.len() > MAX_TASKS_PER_RUN {
            return Err(format!("the run has {} tasks, the limit is {MAX_TASKS_PER_RUN}", self.tasks.len()));
        }
        let mut names = BTreeSet::new();
        for t in &self.tasks {
            validate_name("task name", &t.name)?;
            if !names.insert(t.name.as_str()) {
                return Err(format!("task name {:?} is used twice", t.name));
            }
        }
        for t in &self.tasks {
            validate_task(t, &names)?;
        }
        if let Some(cycle) = find_cycle(&self.tasks) {
            return Err(format!("the task dependencies form a cycle: {}", cycle.join(" -> ")));
        }
        if self.max_running_in_group.is_some_and(|n| n == 0 || n > MAX_RUNNING_IN_GROUP) {
            return Err(format!(
                "max_running_in_group must be 1 to {MAX_RUNNING_IN_GROUP} (leave it out for no limit)"
            ));
        }
        crate::validate::run_create(self)
    }

    pub fn task(&self, name: &str) -> Option<&TaskConfig> {
        self.tasks.iter().find(|t| t.name == name)
    }
}

fn validate_task(t: &TaskConfig, names: &BTreeSet<&str>) -> Result<(), String> {
    let n = &t.name;
    crate::pod::validate_pod(t)?;
    if let Some(arch) = &t.arch {
        validate_name(format_args!("task {n:?} arch"), arch)?;
    }
    validate_map(format_args!("task {n:?} environment"), &t.environment)?;
    if t.approvers_required == 0 || t.approvers_required > MAX_APPROVERS_REQUIRED {
        return Err(format!("task {n:?}: approvers_required must be 1 to {MAX_APPROVERS_REQUIRED}"));
    }
    if t.steps.len() > MAX_STEPS_PER_TASK {
        return Err(format!("task {n:?} has {} steps, the limit is {MAX_STEPS_PER_TASK}", t.steps.len()));
    }
    if t.depends.len() > MAX_TASKS_PER_RUN {
        return Err(format!("task {n:?} has too many dependencies"));
    }
    let mut parents = BTreeSet::new();
    for d in &t.depends {
        if d.task == *n {
            return Err(format!("task {n:?} depends on itself"));
        }
        if !names.contains(d.task.as_str()) {
            return Err(format!("task {n:?} depends on unknown task {:?}", d.task));
        }
        if !parents.insert(d.task.as_str()) {
            return Err(format!("task {n:?} lists dependency {:?} twice", d.task));
        }
    }
    for (i, step) in t.steps.iter().enumerate() {
        let bad = |why: &str| Err(format!("task {n:?} step {i}: {why}"));
        match step {
            Step::Run(r) => {
                if r.command.is_empty() || r.command.len() > MAX_MAP_VALUE_BYTES {
                    return bad(&format!("command must be 1 to {MAX_MAP_VALUE_BYTES} bytes"));
                }
                validate_map(format_args!("task {n:?} step {i} environment"), &r.environment)?;
            }
            Step::SaveToWorkspace(s) if s.contents.is_empty() => {
                return bad("save_to_workspace needs contents")
            }
            Step::SaveCache(s) if s.key.is_empty() || s.contents.is_empty() => {
                return bad("save_cache needs a key and contents")
            }
            Step::RestoreCache(r) if r.keys.is_empty() => return bad("restore_cache needs at least one key"),
            _ => {}
        }
    }
    Ok(())
}

/// A dependency cycle, as the list of task names walked, or `None` for a DAG. Iterative
/// (no recursion depth tied to user input).
fn find_cycle(tasks: &[TaskConfig]) -> Option<Vec<String>> {
    let index: BTreeMap<&str, usize> = tasks.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
    // 0 = unvisited, 1 = on the current path, 2 = done.
    let mut mark = vec![0u8; tasks.len()];
    for start in 0..tasks.len() {
        if mark[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = 1;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            let deps = &tasks[node].depends;
            if *next < deps.len() {
                let child = index[deps[*next].task.as_str()];
                *next += 1;
                match mark[child] {
                    0 => {
                        mark[child] = 1;
                        stack.push((child, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|(n, _)| *n == child).unwrap_or(0);
                        let mut cycle: Vec<String> =
                            stack[from..].iter().map(|(n, _)| tasks[*n].name.clone()).collect();
                        cycle.push(tasks[child].name.clone());
                        return Some(cycle);
                    }
                    _ => {}
                }
            } else {
                mark[node] = 2;
                stack.pop();
            }
        }
    }
    None
}

/// The run a validated [`RunCreate`] becomes at log index `index` with sequence `seq`.
pub fn new_run(create: &RunCreate, seq: u64, counter: u64, index: u64, now_ms: u64) -> Run {
    let setuperror = !create.setup_errors.is_empty();
    let tasks = create
        .tasks
        .iter()
        .map(|t| {
            let task = RunTask {
                status: if t.skip && !setuperror { TaskStatus::Skipped } else { TaskStatus::Notstarted },
                approved: false,
                waiting_approval: false,
                annotations: StringMap::new(),
                setup_step: StepStatus::default(),
                steps: vec![StepStatus::default(); t.steps.len()],
                executor_id: None,
                error: None,
                start_time: None,
                end_time: None,
                containers: crate::pod::pod_of(t)
                    .iter()
                    .map(|c| {
                        format!("{} {}", c.name.as_deref().unwrap_or(crate::pod::MAIN_CONTAINER), c.image)
                    })
                    .collect(),
                timeout_s: t.timeout_s,
                restored_from: None,
            };
            (t.name.clone(), task)
        })
        .collect();
    Run {
        id: run_id(seq),
        counter,
        name: create.name.clone(),
        group: create.group.clone(),
        annotations: create.annotations.clone(),
        phase: if setuperror { RunPhase::Setuperror } else { RunPhase::Queued },
        result: if setuperror { RunResult::Failed } else { RunResult::Unknown },
        stop: false,
        tasks,
        setup_errors: create.setup_errors.clone(),
        enqueue_time: Some(now_ms),
        start_time: None,
        end_time: if setuperror { Some(now_ms) } else { None },
        revision: index,
        restarted_from: None,
    }
}

/// Distinct approvers recorded in a task's annotations (`approver/<name>` keys).
pub fn approvers(annotations: &StringMap) -> usize {
    annotations.keys().filter(|k| k.strip_prefix(APPROVER_PREFIX).is_some_and(|n| !n.is_empty())).count()
}

/// Annotation key prefix that records one approver: `approver/alice`.
pub const APPROVER_PREFIX: &str = "approver/";

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str, deps: &[&str]) -> TaskConfig {
        let mut t = TaskConfig::new(name, "busybox", "true");
        t.depends = deps.iter().map(|d| Depend { task: d.to_string(), conditions: vec![] }).collect();
        t
    }

    fn create(tasks: Vec<TaskConfig>) -> RunCreate {
        RunCreate::new("r", "/p/1", tasks)
    }

    #[test]
    fn a_dag_is_valid() {
        let c = create(vec![task("a", &[]), task("b", &["a"]), task("c", &["a"]), task("d", &["b", "c"])]);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn a_cycle_is_named() {
        let c = create(vec![task("a", &["c"]), task("b", &["a"]), task("c", &["b"]), task("d", &[])]);
        let err = c.validate().unwrap_err();
        assert!(err.contains("cycle") && err.contains("a -> c -> b -> a"), "{err}");
    }

    #[test]
    fn unknown_and_duplicate_names_are_refused() {
        assert!(create(vec![task("a", &["zz"])]).validate().unwrap_err().contains("unknown task \"zz\""));
        assert!(create(vec![task("a", &[]), task("a", &[])]).validate().unwrap_err().contains("used twice"));
        assert!(create(vec![task("a", &["a"])]).validate().unwrap_err().contains("itself"));
        assert!(create(vec![task("a/b", &[])]).validate().is_err());
        assert!(create(vec![]).validate().is_err());
    }

    #[test]
    fn too_many_tasks_are_refused() {
        let tasks = (0..=MAX_TASKS_PER_RUN).map(|i| task(&format!("t{i}"), &[])).collect();
        assert!(create(tasks).validate().unwrap_err().contains("limit"));
    }

    #[test]
    fn a_deep_chain_needs_no_deep_recursion() {
        let mut tasks = vec![task("t0", &[])];
        for i in 1..MAX_TASKS_PER_RUN {
            tasks.push(task(&format!("t{i}"), &[&format!("t{}", i - 1)]));
        }
        assert_eq!(create(tasks).validate(), Ok(()));
    }

    #[test]
    fn unknown_step_types_fail_to_parse_with_their_name() {
        let json = r#"{"name":"r","tasks":[{"name":"a","image":"i","steps":[{"explode":{}}]}]}"#;
        let err = serde_json::from_str::<RunCreate>(json).unwrap_err().to_string();
        assert!(err.contains("explode"), "{err}");
    }

    #[test]
    fn conditions_default_to_on_success() {
        let d = Depend { task: "a".into(), conditions: vec![] };
        assert!(d.satisfied_by(TaskStatus::Success));
        assert!(!d.satisfied_by(TaskStatus::Failed));
        let d = Depend { task: "a".into(), conditions: vec![Condition::OnFailure, Condition::OnSkipped] };
        assert!(d.satisfied_by(TaskStatus::Failed) && d.satisfied_by(TaskStatus::Skipped));
        assert!(!d.satisfied_by(TaskStatus::Success) && !d.satisfied_by(TaskStatus::Cancelled));
    }

    #[test]
    fn groups_match_by_path_component() {
        assert!(group_matches("/a/b", "/a"));
        assert!(group_matches("/a", "/a/"));
        assert!(!group_matches("/ab", "/a"));
        assert!(group_matches("/x", "/"));
        assert_eq!(root_group_of("/project/42/b"), "project");
    }
}
