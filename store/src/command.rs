//! The one way replicated state changes: a [`Command`] goes through the Raft log and is
//! applied by [`crate::State::apply`], which answers with a [`Response`].
//!
//! Application-level refusals (a compare-and-swap mismatch, a missing key) are *responses*,
//! not errors of the log: the entry is committed and applied like any other, it simply
//! changes nothing. Storage errors would stop a node; a user's mistake must not.
//!
//! The enum is externally tagged and serialized with field names (msgpack maps), so new
//! variants and new optional fields can be added without breaking logs already written.
//! Run and executor commands carry the time they were stamped with by the node that
//! proposed them (`now_ms`), so applying them never reads a clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::executor::{validate_executor_id, Decider, ExecutorInfo, ExecutorTaskSpec, ExecutorTaskStatus};
use crate::limits::{
    MAX_BATCH_COMMANDS, MAX_IDEMPOTENCY_KEY_BYTES, MAX_KEY_BYTES, MAX_MAP_ENTRIES, MAX_MAP_VALUE_BYTES,
    MAX_NAME_BYTES, MAX_VALUE_BYTES,
};
use crate::run::{validate_name, Run, RunCreate, RunPhase, RunResult, RunTask, TaskStatus};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Set `key` to `value`. With `prev_revision`, only if the key's current revision is
    /// exactly that (0 means "only if the key does not exist").
    KvPut { key: String, value: String, prev_revision: Option<u64> },
    /// Delete `key`; with `prev_revision`, only if its revision is exactly that.
    KvDelete { key: String, prev_revision: Option<u64> },
    /// Turn maintenance mode on or off for the whole cluster.
    SetMaintenance { enabled: bool },
    /// Create a run from a submission (validated again on apply).
    CreateRun { create: Box<RunCreate>, now_ms: u64 },
    /// One scheduler decision round for one run, applied atomically.
    UpdateRun(Box<RunUpdate>),
    /// Ask a queued or running run to stop.
    StopRun { run_id: String },
    /// Merge annotations into a run task (`None` removes a key).
    SetTaskAnnotations { run_id: String, task: String, annotations: BTreeMap<String, Option<String>> },
    /// Approve a task that waits for approval. With `approver` (the caller's token name)
    /// the approval is recorded as the annotation `approver/<name>` and the task is
    /// approved once `approvers_required` distinct names are recorded (the same name twice
    /// counts once); without one (entries written before named tokens) it is approved.
    ApproveTask {
        run_id: String,
        task: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        approver: Option<String>,
    },
    /// Register an executor or record its heartbeat.
    PutExecutor { id: String, info: ExecutorInfo, now_ms: u64 },
    /// Forget an executor (its tasks are left to the scheduler). With `if_last_seen` (an
    /// expiry), only if its recorded last heartbeat is still that one: an executor that
    /// heartbeated again after the decision stays.
    DeleteExecutor {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_last_seen: Option<u64>,
    },
    /// An executor reports the status of one of its tasks.
    SetExecutorTaskStatus { id: String, executor_id: String, status: ExecutorTaskStatus },
    /// Move finished runs out of the state into archive data files already written to the
    /// object storage: accepted only if the manifest is still at `prev_generation` and
    /// every run is still there, finished, without executor tasks. `replace` is the data
    /// file the new `files` supersede (the last, not yet full, one).
    ArchiveRuns {
        prev_generation: u64,
        replace: Option<String>,
        files: Vec<crate::archive::DataFile>,
        run_ids: Vec<String>,
    },
    /// Delete a finished run: from the state (`replace` none), or from the archive by
    /// swapping data file `replace` for `with` (a copy without the run; none if empty).
    DeleteRun {
        run_id: String,
        prev_generation: u64,
        replace: Option<String>,
        with: Option<crate::archive::DataFile>,
    },
    /// Replace the whole state with an export (only in maintenance; the cluster stays in
    /// maintenance after it).
    Import(Box<crate::state::State>),
    /// Create a run under an idempotency key (`Idempotency-Key` on `POST /api/v1/runs`): a
    /// key seen within [`crate::limits::IDEMPOTENCY_TTL_MS`] with the same body (its
    /// `body_sha256`, of the canonical JSON) answers with the first run; with another body
    /// it is refused.
    CreateRunIdempotent { create: Box<RunCreate>, now_ms: u64, key: String, body_sha256: String },
    /// Create a run restarting `restarted_from` (finished, live or archived): `create` is
    /// its configuration (environment possibly replaced), `keep` the task statuses kept
    /// from it (succeeded or skipped tasks, each with `restored_from` naming the run
    /// holding its outputs); every other task starts again.
    RestartRun {
        create: Box<RunCreate>,
        now_ms: u64,
        restarted_from: String,
        #[serde(default)]
        keep: BTreeMap<String, RunTask>,
        #[serde(default)]
        actor: Option<String>,
    },
    /// Forget the idempotency keys older than the TTL at `now_ms`: the proposing leader's
    /// clock, carried in the command so that every replay prunes the same keys.
    PruneIdempotencyKeys { now_ms: u64 },
    /// `cmd` done on behalf of `actor` (the caller's token name): applied as `cmd`, and every
    /// event it produces without an actor names this one. No acted command, batch or
    /// import inside.
    Acted { actor: String, cmd: Box<Command> },
    /// Several commands proposed as one log entry by the leader (group commit): applied in
    /// order, each as if alone and with its own response, all at the entry's index. A batch
    /// holds no batch and no import, and at most [`MAX_BATCH_COMMANDS`](crate::limits::MAX_BATCH_COMMANDS) commands.
    Batch(Vec<Command>),
    /// Name the cluster once (proposed by the first leader that finds it unnamed): every
    /// container an executor creates is labeled with it, so that clusters sharing a Docker
    /// engine never touch each other's containers. Refused when the cluster has a name.
    SetClusterId { id: String },
    /// A scheduler round for one run, as [`UpdateRun`](Command::UpdateRun) but carrying only
    /// what changed (see [`RunPatch`]). Proposed only once every member reads it (see
    /// `flotilla_raft::network::LOG_FORMAT`): nodes of older releases cannot decode it.
    PatchRun(Box<RunPatch>),
}

/// A [`RunUpdate`] told as a change of the run at `prev_revision`: the run's own status
/// fields whole, and of its tasks only those that differ. A round changes one or two tasks
/// of a run, so the entry every node encodes, sends, decodes and stores is a fraction of
/// the whole run (issue 24: encoding and decoding whole runs was half of a follower's CPU
/// under the scheduler benchmark). Applied, it makes exactly the run the update names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPatch {
    pub run_id: String,
    pub prev_revision: u64,
    pub phase: RunPhase,
    pub result: RunResult,
    pub stop: bool,
    #[serde(default)]
    pub setup_errors: Vec<String>,
    pub enqueue_time: Option<u64>,
    pub start_time: Option<u64>,
    pub end_time: Option<u64>,
    /// The tasks whose status changed, whole; every other task stays as it is.
    pub tasks: BTreeMap<String, RunTask>,
    #[serde(default)]
    pub create_tasks: Vec<ExecutorTaskSpec>,
    #[serde(default)]
    pub stop_tasks: Vec<String>,
    #[serde(default)]
    pub delete_tasks: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<Decider>,
}

impl RunPatch {
    /// This patch as the whole update it stands for: `cur` (the run at `prev_revision`,
    /// holding every task of the patch) with the patch's fields and tasks. For a cluster
    /// not every member of which reads patches yet (a rolling upgrade), and for tests.
    pub fn into_update(self, cur: &Run) -> RunUpdate {
        let RunPatch {
            run_id,
            prev_revision,
            phase,
            result,
            stop,
            setup_errors,
            enqueue_time,
            start_time,
            end_time,
            tasks,
            create_tasks,
            stop_tasks,
            delete_tasks,
            decided_by,
        } = self;
        debug_assert_eq!((run_id.as_str(), prev_revision), (cur.id.as_str(), cur.revision));
        // Exhaustive: a new field of `Run` must be placed here, kept from `cur` or patched.
        let Run {
            id,
            counter,
            name,
            group,
            annotations,
            phase: _,
            result: _,
            stop: _,
            tasks: cur_tasks,
            setup_errors: _,
            enqueue_time: _,
            start_time: _,
            end_time: _,
            revision,
            restarted_from,
        } = cur;
        let mut whole_tasks = cur_tasks.clone();
        whole_tasks.extend(tasks);
        let run = Run {
            id: id.clone(),
            counter: *counter,
            name: name.clone(),
            group: group.clone(),
            annotations: annotations.clone(),
            phase,
            result,
            stop,
            tasks: whole_tasks,
            setup_errors,
            enqueue_time,
            start_time,
            end_time,
            revision: *revision,
            restarted_from: restarted_from.clone(),
        };
        RunUpdate { run, prev_revision, create_tasks, stop_tasks, delete_tasks, decided_by }
    }

    /// Makes `run` — the run at `prev_revision`, holding every task of the patch (the
    /// caller checks both) — what this patch says, as of `index`, in place; with the
    /// events [`Event::diff`] gives for the two versions, in the same order.
    pub fn apply_to(&self, index: u64, run: &mut Run, events: &mut Vec<Event>) {
        let before = (run.phase, run.result);
        crate::apply::debug_assert_run_forward(&run.id, run.phase, self.phase);
        run.phase = self.phase;
        run.result = self.result;
        run.stop = self.stop;
        run.setup_errors.clone_from(&self.setup_errors);
        run.enqueue_time = self.enqueue_time;
        run.start_time = self.start_time;
        run.end_time = self.end_time;
        run.revision = index;
        let mut moved = Vec::new();
        for (name, task) in &self.tasks {
            let Some(t) = run.tasks.get_mut(name) else { continue };
            crate::apply::debug_assert_task_forward(&run.id, t.status, Some(task.status));
            if t.status != task.status {
                moved.push(name);
            }
            t.clone_from(task);
        }
        for name in moved {
            events.push(Event::task(index, run, name));
        }
        if before != (run.phase, run.result) {
            events.push(Event::run(index, run));
        }
    }
}

/// What a scheduler round decided for one run: the run's new status (accepted only if the
/// run is still at `prev_revision`), the executor tasks to create, to stop and to delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunUpdate {
    pub run: Run,
    pub prev_revision: u64,
    #[serde(default)]
    pub create_tasks: Vec<ExecutorTaskSpec>,
    #[serde(default)]
    pub stop_tasks: Vec<String>,
    #[serde(default)]
    pub delete_tasks: Vec<String>,
    /// The leader that decided this update. When set, the update is applied only from a
    /// log entry appended by that leader in that term (see [`Decider`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<Decider>,
}

impl Command {
    /// A short stable name, used for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::KvPut { .. } => "kv_put",
            Command::KvDelete { .. } => "kv_delete",
            Command::SetMaintenance { .. } => "set_maintenance",
            Command::CreateRun { .. } => "create_run",
            Command::UpdateRun(_) => "update_run",
            Command::PatchRun(_) => "patch_run",
            Command::StopRun { .. } => "stop_run",
            Command::SetTaskAnnotations { .. } => "set_task_annotations",
            Command::ApproveTask { .. } => "approve_task",
            Command::PutExecutor { .. } => "put_executor",
            Command::DeleteExecutor { .. } => "delete_executor",
            Command::SetExecutorTaskStatus { .. } => "set_executor_task_status",
            Command::ArchiveRuns { .. } => "archive_runs",
            Command::DeleteRun { .. } => "delete_run",
            Command::Import(_) => "import",
            Command::Batch(_) => "batch",
            Command::Acted { cmd, .. } => cmd.kind(),
            Command::SetClusterId { .. } => "set_cluster_id",
            Command::CreateRunIdempotent { .. } => "create_run_idempotent",
            Command::RestartRun { .. } => "restart_run",
            Command::PruneIdempotencyKeys { .. } => "prune_idempotency_keys",
        }
    }

    /// Checks the command against the limits. Called at the API boundary before a command
    /// is proposed, and again (defensively) when it is applied.
    pub fn validate(&self) -> Result<(), CommandError> {
        match self {
            Command::KvPut { key, value, .. } => {
                validate_key(key)?;
                if value.len() > MAX_VALUE_BYTES {
                    return Err(CommandError::Invalid {
                        reason: format!("value is {} bytes, the limit is {MAX_VALUE_BYTES}", value.len()),
                    });
                }
                Ok(())
            }
            Command::KvDelete { key, .. } => validate_key(key),
            Command::SetMaintenance { .. } => Ok(()),
            Command::CreateRun { create, .. } => create.validate().map_err(invalid),
            Command::UpdateRun(_) | Command::PatchRun(_) | Command::StopRun { .. } => Ok(()),
            Command::ApproveTask { approver, .. } => match approver {
                Some(name) => validate_name("approver", name).map_err(invalid),
                None => Ok(()),
            },
            Command::SetTaskAnnotations { task, annotations, .. } => {
                validate_name("task name", task).map_err(invalid)?;
                if annotations.len() > MAX_MAP_ENTRIES {
                    return Err(invalid(format!(
                        "{} annotations, the limit is {MAX_MAP_ENTRIES}",
                        annotations.len()
                    )));
                }
                for (k, v) in annotations {
                    if k.is_empty() || k.len() > MAX_NAME_BYTES || k.chars().any(char::is_control) {
                        return Err(invalid(format!(
                            "annotation key {k:?} must be 1 to {MAX_NAME_BYTES} bytes"
                        )));
                    }
                    if v.as_ref().is_some_and(|v| v.len() > MAX_MAP_VALUE_BYTES) {
                        return Err(invalid(format!(
                            "annotation {k:?} is longer than {MAX_MAP_VALUE_BYTES} bytes"
                        )));
                    }
                }
                Ok(())
            }
            Command::PutExecutor { id, info, .. } => {
                validate_executor_id(id).map_err(invalid)?;
                info.validate().map_err(invalid)
            }
            Command::DeleteExecutor { id, .. } | Command::SetExecutorTaskStatus { executor_id: id, .. } => {
                validate_executor_id(id).map_err(invalid)
            }
            Command::Import(state) => state.validate_import().map_err(invalid),
            Command::ArchiveRuns { run_ids, files, .. } => {
                if run_ids.is_empty()
                    || run_ids.len() > crate::limits::MAX_ARCHIVE_BATCH
                    || files.len() > 1000
                {
                    return Err(invalid("an archive batch moves 1 to 20,000 runs in at most 1,000 files"));
                }
                Ok(())
            }
            Command::DeleteRun { .. } => Ok(()),
            Command::SetClusterId { id } => validate_name("cluster id", id).map_err(invalid),
            Command::CreateRunIdempotent { create, key, body_sha256, .. } => {
                validate_idempotency_key(key)?;
                if body_sha256.len() != 64 || !body_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid("body_sha256 must be 64 hex digits"));
                }
                create.validate().map_err(invalid)
            }
            Command::RestartRun { create, restarted_from, keep, .. } => {
                validate_name("run id", restarted_from).map_err(invalid)?;
                create.validate().map_err(invalid)?;
                for (name, rt) in keep {
                    let Some(t) = create.task(name) else {
                        return Err(invalid(format!("kept task {name:?} is not in the run")));
                    };
                    if !matches!(rt.status, TaskStatus::Success | TaskStatus::Skipped) {
                        return Err(invalid(format!(
                            "only succeeded or skipped tasks are kept, not {name:?}"
                        )));
                    }
                    if rt.steps.len() != t.steps.len() || rt.restored_from.is_none() {
                        return Err(invalid(format!("kept task {name:?} does not match its configuration")));
                    }
                }
                Ok(())
            }
            Command::PruneIdempotencyKeys { .. } => Ok(()),
            // Each command is validated when it is applied, so that one bad command rejects
            // only itself; here only the batch's shape.
            Command::Acted { actor, cmd } => {
                validate_name("actor", actor).map_err(invalid)?;
                if matches!(**cmd, Command::Acted { .. } | Command::Batch(_) | Command::Import(_)) {
                    return Err(invalid(format!(
                        "a {} command cannot be acted on behalf of someone",
                        cmd.kind()
                    )));
                }
                cmd.validate()
            }
            Command::Batch(cmds) => {
                if cmds.is_empty() || cmds.len() > MAX_BATCH_COMMANDS {
                    return Err(invalid(format!("a batch holds 1 to {MAX_BATCH_COMMANDS} commands")));
                }
                match cmds.iter().find(|c| !c.batchable()) {
                    Some(c) => Err(invalid(format!("a {} command cannot be batched", c.kind()))),
                    None => Ok(()),
                }
            }
        }
    }

    /// Whether the command may travel in a [`Command::Batch`]: an import replaces the whole
    /// state (and is large), and batches do not nest.
    pub fn batchable(&self) -> bool {
        !matches!(self, Command::Import(_) | Command::Batch(_))
    }
}

/// An `Idempotency-Key` is 1 to [`MAX_IDEMPOTENCY_KEY_BYTES`] bytes of visible ASCII
/// (what an HTTP header value carries without encoding).
pub fn validate_idempotency_key(key: &str) -> Result<(), CommandError> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(invalid(format!(
            "an Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes, this one is {}",
            key.len()
        )));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(invalid("an Idempotency-Key may only hold visible ASCII characters and spaces"));
    }
    Ok(())
}

fn invalid(reason: impl Into<String>) -> CommandError {
    CommandError::Invalid { reason: reason.into() }
}

/// A key is 1..=MAX_KEY_BYTES bytes of UTF-8 with no control characters.
pub fn validate_key(key: &str) -> Result<(), CommandError> {
    if key.is_empty() {
        return Err(CommandError::Invalid { reason: "key must not be empty".into() });
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(CommandError::Invalid {
            reason: format!("key is {} bytes, the limit is {MAX_KEY_BYTES}", key.len()),
        });
    }
    if key.chars().any(char::is_control) {
        return Err(CommandError::Invalid { reason: "key must not contain control characters".into() });
    }
    Ok(())
}

/// What applying a command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Blank and membership entries, which carry no command.
    None,
    KvPut {
        revision: u64,
    },
    KvDelete {
        revision: u64,
    },
    Maintenance {
        enabled: bool,
    },
    /// A run was created with this id.
    RunCreated {
        run_id: String,
    },
    /// An idempotent create found its key: the run created the first time.
    RunReplayed {
        run_id: String,
    },
    /// The change was made at this log index.
    Done {
        revision: u64,
    },
    /// The archive manifest changed (runs archived, or a run deleted from the state or
    /// from the archive): its new generation, which a later archive command names.
    ArchiveChanged {
        generation: u64,
    },
    /// The command was applied and changed nothing, for this reason.
    Rejected(CommandError),
    /// The responses to the commands of a [`Command::Batch`], in order.
    Batch(Vec<Response>),
}

impl Response {
    /// The answers to the `n` commands of a [`Command::Batch`], from the batch's answer:
    /// its responses in order, or, for a batch answered as a whole (refused), that answer
    /// for each.
    pub fn into_batch_answers(self, n: usize) -> Vec<Response> {
        match self {
            Response::Batch(rs) if rs.len() == n => rs,
            other => vec![other; n],
        }
    }
}

/// Why a command changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum CommandError {
    /// `prev_revision` did not match; `actual` is 0 when the key does not exist.
    #[error("revision mismatch on key {key:?}: expected {expected}, found {actual}")]
    RevisionMismatch { key: String, expected: u64, actual: u64 },
    /// A coordination key does not exist (kv compare-and-delete).
    #[error("key {key:?} not found")]
    #[serde(rename = "not_found")]
    KeyNotFound { key: String },
    #[error("{reason}")]
    Invalid { reason: String },
    /// The named object (run, task, executor, executor task) does not exist.
    #[error("{what} not found")]
    #[serde(rename = "missing")]
    ObjectNotFound { what: String },
    /// The object exists but is in a state where the command makes no sense (wrong phase).
    #[error("{reason}")]
    Conflict { reason: String },
    /// An idempotency key was used before with another request body.
    #[error("{reason}")]
    KeyReused { reason: String },
    /// A scheduler decision reached the log through another leader or term than the one
    /// that made it: refused, the current leader decides again.
    #[error("decision of node {} in term {} reached the log in term {} of node {}", decided.node, decided.term, entry.term, entry.node)]
    StaleDecision { decided: Decider, entry: Decider },
}
