//! How a command changes the [`State`]: `State::apply(index, &cmd) -> Response`, pure and
//! deterministic (same state, index and command give the same state, response and events
//! on every replica and every replay).

use std::collections::BTreeMap;

use crate::command::{Command, CommandError, Response, RunPatch, RunUpdate};
use crate::event::{Event, RunAction};
use crate::executor::{
    executor_task_id, validate_status, Decider, Executor, ExecutorTask, ExecutorTaskSpec, ExecutorTaskStatus,
};
use crate::limits::{IDEMPOTENCY_TTL_MS, MAX_EXECUTORS, MAX_IDEMPOTENCY_KEYS, MAX_MAP_ENTRIES};
use crate::run::{approvers, new_run, root_group_of, Run, RunPhase, TaskStatus, APPROVER_PREFIX};
use crate::state::{IdempotencyEntry, KvEntry, Sha256, SharedKey, State};

/// A run update decided by another leader or term than the one whose entry carries it.
fn stale(decided: Option<Decider>, entry: Option<Decider>) -> Option<Response> {
    match (decided, entry) {
        (Some(decided), Some(entry)) if decided != entry => {
            Some(Response::Rejected(CommandError::StaleDecision { decided, entry }))
        }
        _ => None,
    }
}

fn revision_mismatch(run_id: &str, expected: u64, actual: u64) -> Response {
    Response::Rejected(CommandError::RevisionMismatch { key: format!("run {run_id}"), expected, actual })
}

/// The executor tasks a run update creates, stops and deletes.
#[derive(Clone, Copy)]
struct RunChanges<'a> {
    create: &'a [ExecutorTaskSpec],
    stop: &'a [String],
    delete: &'a [String],
}

/// The scheduler moves runs and tasks forward only: a run or task in a final phase keeps
/// it (a restart is a new run). Checked in debug builds, where the property tests of the
/// scheduler drive thousands of rounds through here.
fn debug_assert_forward(cur: &Run, run: &Run) {
    debug_assert_run_forward(&cur.id, cur.phase, run.phase);
    for (name, t) in &cur.tasks {
        debug_assert_task_forward(&cur.id, t.status, run.tasks.get(name).map(|t| t.status));
    }
}

/// [`debug_assert_forward`] for the run's phase alone.
pub(crate) fn debug_assert_run_forward(run_id: &str, from: RunPhase, to: RunPhase) {
    debug_assert!(!from.is_final() || to == from, "run {run_id} left its final phase: {from:?} -> {to:?}");
}

/// [`debug_assert_forward`] for one task's status (`None`: the task is gone).
pub(crate) fn debug_assert_task_forward(run_id: &str, from: TaskStatus, to: Option<TaskStatus>) {
    debug_assert!(!from.is_final() || to == Some(from), "a task of run {run_id} left its final status");
}

fn missing(what: impl Into<String>) -> Response {
    Response::Rejected(CommandError::ObjectNotFound { what: what.into() })
}

fn conflict(reason: impl Into<String>) -> Response {
    Response::Rejected(CommandError::Conflict { reason: reason.into() })
}

/// Executor task phases only move forward: not started, running, then a final one.
fn phase_rank(p: crate::run::Phase) -> u8 {
    match p {
        crate::run::Phase::Notstarted => 0,
        crate::run::Phase::Running => 1,
        _ => 2,
    }
}

fn rejected_invalid(reason: impl Into<String>) -> Response {
    Response::Rejected(CommandError::Invalid { reason: reason.into() })
}

impl State {
    /// Applies `cmd`, written at log index `index`, and says what happened. Pure: the same
    /// state, index and command always give the same new state and response.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Response {
        self.apply_with_events(index, cmd, &mut Vec::new())
    }

    /// [`State::apply`], also appending the events the change produced (run phase or
    /// result changes, task status changes), in a deterministic order.
    pub fn apply_with_events(&mut self, index: u64, cmd: &Command, events: &mut Vec<Event>) -> Response {
        self.apply_entry(index, None, cmd, events)
    }

    /// [`State::apply_with_events`] for a command read from a log entry appended by
    /// `leader` (its term and node): a scheduler decision made by another leader or in
    /// another term is refused (see [`Decider`]). `None` skips that check (tests, replays of
    /// commands without their entry).
    pub fn apply_entry(
        &mut self,
        index: u64,
        leader: Option<Decider>,
        cmd: &Command,
        events: &mut Vec<Event>,
    ) -> Response {
        if let Err(e) = cmd.validate() {
            return Response::Rejected(e);
        }
        match cmd {
            Command::Batch(cmds) => {
                Response::Batch(cmds.iter().map(|c| self.apply_entry(index, leader, c, events)).collect())
            }
            Command::Acted { actor, cmd } => {
                let first = events.len();
                let response = self.apply_entry(index, leader, cmd, events);
                for e in &mut events[first..] {
                    e.actor.get_or_insert_with(|| actor.clone());
                }
                response
            }
            Command::KvPut { key, value, prev_revision } => {
                let current = self.kv.get(key);
                if let Some(expected) = *prev_revision {
                    let actual = current.map_or(0, |e| e.revision);
                    if actual != expected {
                        return Response::Rejected(CommandError::RevisionMismatch {
                            key: key.clone(),
                            expected,
                            actual,
                        });
                    }
                }
                let create_revision = current.map_or(index, |e| e.create_revision);
                self.kv
                    .insert(key.clone(), KvEntry { value: value.clone(), revision: index, create_revision });
                Response::KvPut { revision: index }
            }
            Command::KvDelete { key, prev_revision } => {
                let Some(current) = self.kv.get(key) else {
                    return match *prev_revision {
                        Some(expected) if expected != 0 => {
                            Response::Rejected(CommandError::RevisionMismatch {
                                key: key.clone(),
                                expected,
                                actual: 0,
                            })
                        }
                        _ => Response::Rejected(CommandError::KeyNotFound { key: key.clone() }),
                    };
                };
                if let Some(expected) = *prev_revision {
                    if current.revision != expected {
                        let actual = current.revision;
                        return Response::Rejected(CommandError::RevisionMismatch {
                            key: key.clone(),
                            expected,
                            actual,
                        });
                    }
                }
                self.kv.remove(key);
                Response::KvDelete { revision: index }
            }
            Command::SetClusterId { id } => {
                if let Some(have) = &self.cluster_id {
                    return conflict(format!("the cluster is already named {have}"));
                }
                self.cluster_id = Some(id.clone());
                // Task lists carry the cluster id: the executors' long polls answer with it.
                self.touched_executors.0.extend(self.executors.keys().cloned());
                Response::Done { revision: index }
            }
            Command::SetMaintenance { enabled } => {
                self.maintenance = *enabled;
                Response::Maintenance { enabled: *enabled }
            }
            Command::CreateRun { create, now_ms } => {
                let run = self.new_run(index, create, *now_ms);
                events.push(Event::run(index, &run));
                Response::RunCreated { run_id: self.insert_run(run, create) }
            }
            Command::CreateRunIdempotent { create, now_ms, key, body_sha256 } => {
                let fresh = |e: &IdempotencyEntry| e.created_ms.saturating_add(IDEMPOTENCY_TTL_MS) > *now_ms;
                // Validated as 64 hex digits.
                let Some(body_sha256) = Sha256::from_hex(body_sha256) else {
                    return Response::Rejected(CommandError::Invalid {
                        reason: "body_sha256 must be 64 hex digits".into(),
                    });
                };
                match self.idempotency_keys.get(key.as_str()).filter(|e| fresh(e)) {
                    Some(e) if e.body_sha256 == body_sha256 => {
                        return Response::RunReplayed { run_id: e.run_id.clone() }
                    }
                    Some(e) => {
                        return Response::Rejected(CommandError::KeyReused {
                            reason: format!(
                                "Idempotency-Key {key:?} was used for another request body (run {}); use a new key for a new run",
                                e.run_id
                            ),
                        })
                    }
                    None => {}
                }
                let run = self.new_run(index, create, *now_ms);
                events.push(Event::run(index, &run));
                let run_id = self.insert_run(run, create);
                let entry = IdempotencyEntry { run_id: run_id.clone(), body_sha256, created_ms: *now_ms };
                let key = SharedKey::from(key.as_str());
                if self.idempotency_keys.insert(key.clone(), entry).is_none() {
                    self.idempotency_order.push_back(key);
                }
                // Bounded: past the limit the oldest keys are forgotten early.
                while self.idempotency_keys.len() > MAX_IDEMPOTENCY_KEYS {
                    let Some(oldest) = self.idempotency_order.pop_front() else { break };
                    self.idempotency_keys.remove(&oldest);
                }
                Response::RunCreated { run_id }
            }
            Command::RestartRun { create, now_ms, restarted_from, keep, actor } => {
                if let Some(src) = self.runs.get(restarted_from) {
                    if !src.phase.is_final() {
                        return conflict(format!(
                            "run {restarted_from} is {}; only a finished, cancelled or setuperror run can be restarted",
                            crate::run::phase_word(src.phase)
                        ));
                    }
                }
                let mut run = self.new_run(index, create, *now_ms);
                run.restarted_from = Some(restarted_from.clone());
                if run.phase == RunPhase::Queued {
                    for (name, kept) in keep {
                        if let Some(rt) = run.tasks.get_mut(name) {
                            *rt = kept.clone();
                        }
                    }
                }
                events.push(Event::action(index, &run, RunAction::Restarted, actor.as_deref()));
                Response::RunCreated { run_id: self.insert_run(run, create) }
            }
            Command::PruneIdempotencyKeys { now_ms } => {
                self.idempotency_keys
                    .retain(|_, e| e.created_ms.saturating_add(IDEMPOTENCY_TTL_MS) > *now_ms);
                let keys = &self.idempotency_keys;
                self.idempotency_order.retain(|k| keys.contains_key(k));
                Response::Done { revision: index }
            }
            Command::UpdateRun(update) => {
                stale(update.decided_by, leader).unwrap_or_else(|| self.update_run(index, update, events))
            }
            Command::PatchRun(patch) => {
                stale(patch.decided_by, leader).unwrap_or_else(|| self.patch_run(index, patch, events))
            }
            Command::StopRun { run_id } => {
                let Some(run) = self.runs.get_mut(run_id) else { return missing(format!("run {run_id}")) };
                if !matches!(run.phase, RunPhase::Queued | RunPhase::Running) {
                    return conflict(
                        format!(
                            "run {run_id} is {:?}; only a queued or running run can be stopped",
                            run.phase
                        )
                        .to_lowercase(),
                    );
                }
                run.stop = true;
                run.revision = index;
                Response::Done { revision: index }
            }
            Command::SetTaskAnnotations { run_id, task, annotations } => {
                let Some(run) = self.runs.get_mut(run_id) else { return missing(format!("run {run_id}")) };
                if run.phase.is_final() {
                    return conflict(format!(
                        "run {run_id} has ended ({}): its annotations can no longer change",
                        crate::run::phase_word(run.phase)
                    ));
                }
                let Some(rt) = run.tasks.get_mut(task) else {
                    return missing(format!("task {task:?} of run {run_id}"));
                };
                let mut merged = rt.annotations.clone();
                for (k, v) in annotations {
                    match v {
                        Some(v) => merged.insert(k.clone(), v.clone()),
                        None => merged.remove(k),
                    };
                }
                if merged.len() > MAX_MAP_ENTRIES {
                    return rejected_invalid(format!(
                        "a task may carry at most {MAX_MAP_ENTRIES} annotations"
                    ));
                }
                rt.annotations = merged;
                run.revision = index;
                Response::Done { revision: index }
            }
            Command::ApproveTask { run_id, task, approver } => {
                let config = self.run_configs.get(run_id).and_then(|c| c.task(task));
                let (needs, required) =
                    (config.map(|t| t.needs_approval), config.map_or(1, |t| t.approvers_required));
                let Some(run) = self.runs.get_mut(run_id) else { return missing(format!("run {run_id}")) };
                let Some(rt) = run.tasks.get_mut(task) else {
                    return missing(format!("task {task:?} of run {run_id}"));
                };
                if needs != Some(true) {
                    return conflict(format!("task {task:?} does not need approval"));
                }
                if rt.approved {
                    return conflict(format!("task {task:?} is already approved"));
                }
                if run.phase.is_final() || rt.status.is_final() {
                    return conflict(format!("task {task:?} has already ended"));
                }
                if let Some(name) = approver {
                    if rt.annotations.len() >= MAX_MAP_ENTRIES {
                        return conflict(format!("a task may carry at most {MAX_MAP_ENTRIES} annotations"));
                    }
                    rt.annotations.insert(format!("{APPROVER_PREFIX}{name}"), String::new());
                }
                if approver.is_none() || approvers(&rt.annotations) >= required as usize {
                    rt.approved = true;
                    rt.waiting_approval = false;
                }
                run.revision = index;
                let mut event = Event::action(index, run, RunAction::Approved, approver.as_deref());
                event.task = Some(task.clone());
                events.push(event);
                Response::Done { revision: index }
            }
            Command::PutExecutor { id, info, now_ms } => {
                let tasks_revision = match self.executors.get(id) {
                    Some(e) => e.tasks_revision,
                    None if self.executors.len() >= MAX_EXECUTORS => {
                        return conflict(format!("{MAX_EXECUTORS} executors are registered already"))
                    }
                    None => index,
                };
                let executor =
                    Executor { id: id.clone(), info: info.clone(), last_seen: *now_ms, tasks_revision };
                self.executors.insert(id.clone(), executor);
                Response::Done { revision: index }
            }
            Command::DeleteExecutor { id, if_last_seen } => {
                if let (Some(e), Some(seen)) = (self.executors.get(id), if_last_seen) {
                    if e.last_seen != *seen {
                        return conflict(format!("executor {id:?} heartbeated again"));
                    }
                }
                match self.executors.remove(id) {
                    Some(_) => {
                        // Its long poll answers "not registered" now rather than at its deadline.
                        self.touched_executors.0.insert(id.clone());
                        Response::Done { revision: index }
                    }
                    None => missing(format!("executor {id:?}")),
                }
            }
            Command::SetExecutorTaskStatus { id, executor_id, status } => {
                self.set_executor_task_status(index, id, executor_id, status)
            }
            Command::ArchiveRuns { prev_generation, replace, files, run_ids } => {
                let mut archived = Vec::new();
                let r =
                    self.archive_runs(*prev_generation, replace.as_deref(), files, run_ids, &mut archived);
                events.extend(
                    archived
                        .iter()
                        .map(|run| Event::action(index, run, RunAction::Archived, Some("archiver"))),
                );
                r
            }
            Command::DeleteRun { run_id, prev_generation, replace, with } => {
                self.delete_run(run_id, *prev_generation, replace.as_deref(), with.as_ref())
            }
            Command::Import(imported) => {
                if !self.maintenance {
                    return conflict("an import is only accepted in maintenance mode");
                }
                let mut new = (**imported).clone();
                new.maintenance = true;
                new.last_run_seq = new.last_run_seq.max(self.last_run_seq);
                // The importer wrote the archived runs into new files and put them in the
                // manifest; the generation only grows, so no older archive command applies.
                new.archive.generation = new.archive.generation.max(self.archive.generation) + 1;
                new.active_runs = new
                    .runs
                    .values()
                    .filter(|r| matches!(r.phase, RunPhase::Queued | RunPhase::Running))
                    .map(|r| r.id.clone())
                    .collect();
                // Every executor's long poll, of the old state's executors and the new's,
                // answers from the new state.
                let mut touched = std::mem::take(&mut self.touched_executors.0);
                touched.extend(self.executors.keys().cloned());
                touched.extend(new.executors.keys().cloned());
                *self = new;
                self.touched_executors.0 = touched;
                events.extend(self.runs.values().map(|r| Event::action(index, r, RunAction::Imported, None)));
                Response::Done { revision: index }
            }
        }
    }

    fn archive_runs(
        &mut self,
        prev_generation: u64,
        replace: Option<&str>,
        files: &[crate::archive::DataFile],
        run_ids: &[String],
        archived: &mut Vec<Run>,
    ) -> Response {
        if self.archive.generation != prev_generation {
            return conflict(format!(
                "the archive changed (generation {} != {prev_generation})",
                self.archive.generation
            ));
        }
        if replace.is_some_and(|k| !self.archive.files.iter().any(|f| f.key == k)) {
            return conflict("the archive file to replace is gone");
        }
        for id in run_ids {
            let Some(run) = self.runs.get(id) else {
                return conflict(format!("run {id} is no longer in the state"));
            };
            if !crate::archive::archivable(run.phase) {
                return conflict(format!("run {id} is not finished"));
            }
            if self.executor_tasks.values().any(|t| &t.spec.run_id == id) {
                return conflict(format!("run {id} still has executor tasks"));
            }
        }
        for id in run_ids {
            archived.extend(self.runs.remove(id));
            self.run_configs.remove(id);
            self.active_runs.remove(id);
        }
        if let Some(k) = replace {
            self.archive.files.retain(|f| f.key != k);
        }
        self.archive.files.extend(files.iter().cloned());
        self.archive.generation += 1;
        Response::ArchiveChanged { generation: self.archive.generation }
    }

    /// Deletes a finished run: from the state, or from the archive by replacing its data
    /// file (`replace`) with one without it (`with`, none when it was the last run).
    fn delete_run(
        &mut self,
        run_id: &str,
        prev_generation: u64,
        replace: Option<&str>,
        with: Option<&crate::archive::DataFile>,
    ) -> Response {
        match replace {
            None => {
                let Some(run) = self.runs.get(run_id) else { return missing(format!("run {run_id}")) };
                if !crate::archive::archivable(run.phase) {
                    return conflict(format!("run {run_id} is not finished; stop it first"));
                }
                if self.executor_tasks.values().any(|t| t.spec.run_id == run_id) {
                    return conflict(format!("run {run_id} still has executor tasks"));
                }
                self.runs.remove(run_id);
                self.run_configs.remove(run_id);
                self.active_runs.remove(run_id);
                Response::ArchiveChanged { generation: self.archive.generation }
            }
            Some(old) => {
                if self.archive.generation != prev_generation {
                    return conflict(format!(
                        "the archive changed (generation {} != {prev_generation})",
                        self.archive.generation
                    ));
                }
                let Some(pos) = self.archive.files.iter().position(|f| f.key == old) else {
                    return conflict("the archive file to replace is gone");
                };
                match with {
                    Some(f) => self.archive.files[pos] = f.clone(),
                    None => {
                        self.archive.files.remove(pos);
                    }
                }
                self.archive.generation += 1;
                Response::ArchiveChanged { generation: self.archive.generation }
            }
        }
    }

    /// Checks that an imported state holds together: every run has its configuration and
    /// valid names, every executor task belongs to a known run, every key is valid.
    pub fn validate_import(&self) -> Result<(), String> {
        for key in self.kv.keys() {
            crate::command::validate_key(key).map_err(|e| e.to_string())?;
        }
        for (id, run) in &self.runs {
            if &run.id != id {
                return Err(format!("run {id:?} is stored under another id ({:?})", run.id));
            }
            let config =
                self.run_configs.get(id).ok_or_else(|| format!("run {id:?} has no configuration"))?;
            config.validate().map_err(|e| format!("run {id:?}: {e}"))?;
        }
        for (id, t) in &self.executor_tasks {
            if !self.runs.contains_key(&t.spec.run_id) {
                return Err(format!("executor task {id:?} belongs to an unknown run"));
            }
        }
        for id in self.executors.keys() {
            crate::executor::validate_executor_id(id)?;
        }
        Ok(())
    }

    fn set_executor_task_status(
        &mut self,
        index: u64,
        id: &str,
        executor_id: &str,
        status: &ExecutorTaskStatus,
    ) -> Response {
        let Some(et) = self.executor_tasks.get(id) else { return missing(format!("executor task {id:?}")) };
        if et.spec.executor_id != executor_id {
            return conflict(format!("executor task {id:?} is assigned to another executor"));
        }
        let steps = self
            .run_configs
            .get(&et.spec.run_id)
            .and_then(|c| c.task(&et.spec.task_name))
            .map_or(0, |t| t.steps.len());
        if let Err(e) = validate_status(status, steps) {
            return rejected_invalid(e);
        }
        if et.status.phase.is_final() {
            if et.status == *status {
                return Response::Done { revision: et.revision };
            }
            return conflict(
                format!("executor task {id:?} has already ended ({:?})", et.status.phase).to_lowercase(),
            );
        }
        if phase_rank(status.phase) < phase_rank(et.status.phase) {
            return conflict(
                format!(
                    "executor task {id:?} cannot go back from {:?} to {:?}",
                    et.status.phase, status.phase
                )
                .to_lowercase(),
            );
        }
        self.keep_active_counts();
        let et = self.executor_tasks.get_mut(id).expect("looked up at the top of this function");
        et.status = status.clone();
        et.revision = index;
        let (run_id, executor_id) = (et.spec.run_id.clone(), et.spec.executor_id.clone());
        if status.phase.is_final() {
            self.count_active_task(&executor_id, false);
        }
        self.touch_run_tasks(&run_id, index);
        Response::Done { revision: index }
    }

    /// Applies one scheduler round: all of it or, if anything is stale, none of it.
    fn update_run(&mut self, index: u64, u: &RunUpdate, events: &mut Vec<Event>) -> Response {
        let run_id = &u.run.id;
        let Some(cur) = self.runs.get(run_id) else { return missing(format!("run {run_id}")) };
        if cur.revision != u.prev_revision {
            return revision_mismatch(run_id, u.prev_revision, cur.revision);
        }
        if !cur.tasks.keys().eq(u.run.tasks.keys()) {
            return rejected_invalid("a run update must keep the run's tasks");
        }
        let changes = RunChanges { create: &u.create_tasks, stop: &u.stop_tasks, delete: &u.delete_tasks };
        let steps = match self.check_run_changes(run_id, changes) {
            Ok(steps) => steps,
            Err(refused) => return refused,
        };
        let mut run = u.run.clone();
        run.revision = index;
        let cur = self.runs.get_mut(run_id).expect("looked up above");
        debug_assert_forward(cur, &run);
        Event::diff(index, cur, &run, events);
        *cur = run;
        self.commit_run_changes(index, run_id, changes, steps, u.decided_by)
    }

    /// [`Command::PatchRun`]: as [`Command::UpdateRun`] with the run the patch makes of the
    /// current one, made in place.
    fn patch_run(&mut self, index: u64, p: &RunPatch, events: &mut Vec<Event>) -> Response {
        let run_id = &p.run_id;
        let Some(cur) = self.runs.get(run_id) else { return missing(format!("run {run_id}")) };
        if cur.revision != p.prev_revision {
            return revision_mismatch(run_id, p.prev_revision, cur.revision);
        }
        if let Some(name) = p.tasks.keys().find(|name| !cur.tasks.contains_key(*name)) {
            return rejected_invalid(format!(
                "a run update must keep the run's tasks: run {run_id} has no task {name:?}"
            ));
        }
        let changes = RunChanges { create: &p.create_tasks, stop: &p.stop_tasks, delete: &p.delete_tasks };
        let steps = match self.check_run_changes(run_id, changes) {
            Ok(steps) => steps,
            Err(refused) => return refused,
        };
        let run = self.runs.get_mut(run_id).expect("looked up above");
        p.apply_to(index, run, events);
        self.commit_run_changes(index, run_id, changes, steps, p.decided_by)
    }

    /// Checks a run update's executor task changes against the state (the round applies
    /// whole or not at all); the steps of each task to create.
    fn check_run_changes(&self, run_id: &str, changes: RunChanges<'_>) -> Result<Vec<usize>, Response> {
        let Some(config) = self.run_configs.get(run_id) else {
            return Err(missing(format!("configuration of run {run_id}")));
        };
        let mut added: BTreeMap<&str, u32> = BTreeMap::new();
        let mut steps = Vec::with_capacity(changes.create.len());
        for spec in changes.create {
            let id = executor_task_id(run_id, &spec.task_name);
            let Some(task) = config.task(&spec.task_name).filter(|_| spec.run_id == run_id) else {
                return Err(rejected_invalid(format!(
                    "executor task {id:?} does not belong to run {run_id}"
                )));
            };
            steps.push(task.steps.len());
            if self.executor_tasks.contains_key(&id) {
                return Err(conflict(format!("executor task {id:?} exists already")));
            }
            let Some(executor) = self.executors.get(&spec.executor_id) else {
                return Err(conflict(format!("executor {:?} is gone", spec.executor_id)));
            };
            let extra = added.entry(spec.executor_id.as_str()).or_insert(0);
            *extra += 1;
            let limit = executor.info.active_tasks_limit;
            if limit > 0 && self.active_tasks(&spec.executor_id) + *extra > limit {
                return Err(conflict(format!(
                    "executor {:?} is at its limit of {limit} active tasks",
                    spec.executor_id
                )));
            }
        }
        for id in changes.stop.iter().chain(changes.delete) {
            match self.executor_tasks.get(id) {
                Some(et) if et.spec.run_id == run_id => {}
                _ => return Err(conflict(format!("executor task {id:?} of run {run_id} does not exist"))),
            }
        }
        Ok(steps)
    }

    /// The rest of a run update, once the run is stored as of `index`: its executor task
    /// changes (checked by [`State::check_run_changes`], which gave `steps`) and whether the
    /// run is still active.
    fn commit_run_changes(
        &mut self,
        index: u64,
        run_id: &str,
        changes: RunChanges<'_>,
        steps: Vec<usize>,
        decided_by: Option<Decider>,
    ) -> Response {
        self.keep_active_counts();
        for (spec, steps) in changes.create.iter().zip(steps) {
            let id = executor_task_id(run_id, &spec.task_name);
            let status = ExecutorTaskStatus::new(steps);
            let spec = ExecutorTaskSpec { decided_by, ..spec.clone() };
            let executor_id = spec.executor_id.clone();
            let replaced =
                self.executor_tasks.insert(id.clone(), ExecutorTask { id, spec, status, revision: index });
            // (Only an update naming one task twice replaces a task it creates.)
            if let Some(old) = replaced.filter(|old| !old.status.phase.is_final()) {
                self.count_active_task(&old.spec.executor_id, false);
            }
            self.count_active_task(&executor_id, true);
            self.touch_executor(&executor_id, index);
        }
        for id in changes.stop {
            let et = self.executor_tasks.get_mut(id).expect("every stop_tasks id was checked to exist above");
            if !et.spec.stop {
                et.spec.stop = true;
                et.spec.generation += 1;
                et.revision = index;
                let executor_id = et.spec.executor_id.clone();
                self.touch_executor(&executor_id, index);
            }
        }
        for id in changes.delete {
            if let Some(et) = self.executor_tasks.remove(id) {
                if !et.status.phase.is_final() {
                    self.count_active_task(&et.spec.executor_id, false);
                }
                self.touch_executor(&et.spec.executor_id, index);
            }
        }
        if self.runs.get(run_id).is_some_and(|r| r.phase.is_final()) {
            self.active_runs.remove(run_id);
            self.run_tasks_touched.0.remove(run_id);
        } else {
            if !self.active_runs.contains(run_id) {
                self.active_runs.insert(run_id.to_string());
            }
            if !(changes.create.is_empty() && changes.stop.is_empty() && changes.delete.is_empty()) {
                self.touch_run_tasks(run_id, index);
            }
        }
        Response::Done { revision: index }
    }

    /// The run `create` becomes at `index`: the next id and the next counter of its root
    /// group (not stored yet: see [`State::insert_run`]).
    fn new_run(&mut self, index: u64, create: &crate::run::RunCreate, now_ms: u64) -> Run {
        let seq = (self.last_run_seq + 1).max(index);
        self.last_run_seq = seq;
        let counter = self.run_counters.entry(root_group_of(&create.group).to_string()).or_insert(0);
        *counter += 1;
        new_run(create, seq, *counter, index, now_ms)
    }

    /// Stores a new run beside its configuration; returns its id.
    fn insert_run(&mut self, run: Run, create: &crate::run::RunCreate) -> String {
        if !run.phase.is_final() {
            self.active_runs.insert(run.id.clone());
        }
        let run_id = run.id.clone();
        self.run_configs.insert(run_id.clone(), create.clone());
        self.runs.insert(run_id.clone(), run);
        run_id
    }

    fn touch_executor(&mut self, id: &str, index: u64) {
        if let Some(e) = self.executors.get_mut(id) {
            e.tasks_revision = index;
            self.touched_executors.0.insert(id.to_string());
        }
    }

    /// Executor tasks assigned to `executor_id` that have not ended.
    pub fn active_tasks(&self, executor_id: &str) -> u32 {
        match &self.active_counts.0 {
            Some(counts) => counts.get(executor_id).copied().unwrap_or(0),
            None => self
                .executor_tasks
                .values()
                .filter(|t| t.spec.executor_id == executor_id && !t.status.phase.is_final())
                .count() as u32,
        }
    }

    /// Keys starting with `prefix` and strictly after `start_after`, in key order, at most
    /// `limit` of them; the flag says whether more matched.
    pub fn kv_list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> (Vec<(&String, &KvEntry)>, bool) {
        use std::ops::Bound;
        let lower = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        let mut matching =
            self.kv.range::<String, _>((lower, Bound::Unbounded)).take_while(|(k, _)| k.starts_with(prefix));
        let items: Vec<_> = matching.by_ref().take(limit).collect();
        let more = matching.next().is_some();
        (items, more)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use proptest::prelude::*;

    fn put(key: &str, value: &str, prev: Option<u64>) -> Command {
        Command::KvPut { key: key.into(), value: value.into(), prev_revision: prev }
    }

    #[test]
    fn put_sets_revision_to_log_index_and_keeps_create_revision() {
        let mut s = State::default();
        assert_eq!(s.apply(3, &put("a", "1", None)), Response::KvPut { revision: 3 });
        assert_eq!(s.apply(7, &put("a", "2", None)), Response::KvPut { revision: 7 });
        let e = &s.kv["a"];
        assert_eq!((e.value.as_str(), e.revision, e.create_revision), ("2", 7, 3));
    }

    #[test]
    fn a_batch_applies_its_commands_in_order_each_with_its_own_response() {
        let mut s = State::default();
        s.apply(1, &put("k", "old", None));
        let batch = Command::Batch(vec![
            put("a", "1", None),
            put("k", "new", Some(1)),
            // Sees the previous command of the batch: k is now at revision 5, not 1.
            put("k", "lost", Some(1)),
            put("", "bad key", None),
            Command::KvDelete { key: "a".into(), prev_revision: Some(5) },
        ]);
        assert_eq!(batch.validate(), Ok(()));
        let Response::Batch(rs) = s.apply(5, &batch) else { panic!("a batch answers with a batch") };
        assert_eq!(rs.len(), 5);
        assert_eq!(rs[0], Response::KvPut { revision: 5 });
        assert_eq!(rs[1], Response::KvPut { revision: 5 });
        assert_eq!(
            rs[2],
            Response::Rejected(CommandError::RevisionMismatch { key: "k".into(), expected: 1, actual: 5 })
        );
        assert!(matches!(rs[3], Response::Rejected(CommandError::Invalid { .. })), "{:?}", rs[3]);
        assert_eq!(rs[4], Response::KvDelete { revision: 5 });
        assert_eq!(s.kv["k"].value, "new");
        assert!(!s.kv.contains_key("a"));
        // Each waiter gets its own answer; a batch refused whole gives each the refusal.
        assert_eq!(Response::Batch(rs.clone()).into_batch_answers(5), rs);
        let refused = Response::Rejected(CommandError::Invalid { reason: "no".into() });
        assert_eq!(refused.clone().into_batch_answers(2), vec![refused.clone(), refused]);
    }

    #[test]
    fn batches_do_not_nest_or_carry_imports_and_are_bounded() {
        let nested = Command::Batch(vec![Command::Batch(vec![put("a", "1", None)])]);
        assert!(matches!(nested.validate(), Err(CommandError::Invalid { .. })));
        let import = Command::Batch(vec![Command::Import(Box::default())]);
        assert!(matches!(import.validate(), Err(CommandError::Invalid { .. })));
        assert!(matches!(Command::Batch(vec![]).validate(), Err(CommandError::Invalid { .. })));
        let big = Command::Batch(vec![put("a", "1", None); crate::limits::MAX_BATCH_COMMANDS + 1]);
        assert!(matches!(big.validate(), Err(CommandError::Invalid { .. })));
        let mut s = State::default();
        assert!(matches!(s.apply(1, &nested), Response::Rejected(_)));
        assert!(s.kv.is_empty());
    }

    #[test]
    fn compare_and_swap_only_succeeds_on_the_current_revision() {
        let mut s = State::default();
        assert_eq!(s.apply(1, &put("k", "a", Some(0))), Response::KvPut { revision: 1 });
        let stale = s.apply(2, &put("k", "b", Some(0)));
        assert_eq!(
            stale,
            Response::Rejected(CommandError::RevisionMismatch { key: "k".into(), expected: 0, actual: 1 })
        );
        assert_eq!(s.kv["k"].value, "a");
        assert_eq!(s.apply(3, &put("k", "c", Some(1))), Response::KvPut { revision: 3 });
    }

    #[test]
    fn delete_of_a_missing_key_is_not_found_and_changes_nothing() {
        let mut s = State::default();
        s.apply(1, &put("x", "1", None));
        let before = s.clone();
        let r = s.apply(2, &Command::KvDelete { key: "y".into(), prev_revision: None });
        assert_eq!(r, Response::Rejected(CommandError::KeyNotFound { key: "y".into() }));
        assert_eq!(s, before);
    }

    #[test]
    fn invalid_commands_are_rejected_at_apply_too() {
        let mut s = State::default();
        let huge = "v".repeat(crate::limits::MAX_VALUE_BYTES + 1);
        assert!(matches!(
            s.apply(1, &put("k", &huge, None)),
            Response::Rejected(CommandError::Invalid { .. })
        ));
        assert!(matches!(s.apply(2, &put("", "v", None)), Response::Rejected(CommandError::Invalid { .. })));
        assert!(matches!(
            s.apply(3, &put("a\nb", "v", None)),
            Response::Rejected(CommandError::Invalid { .. })
        ));
        assert_eq!(s, State::default());
    }

    #[test]
    fn list_pages_by_prefix_and_start_after() {
        let mut s = State::default();
        for (i, k) in ["a/1", "a/2", "a/3", "b/1"].iter().enumerate() {
            s.apply(i as u64 + 1, &put(k, "v", None));
        }
        let (items, more) = s.kv_list("a/", None, 2);
        assert_eq!(items.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a/1", "a/2"]);
        assert!(more);
        let (items, more) = s.kv_list("a/", Some("a/2"), 2);
        assert_eq!(items.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a/3"]);
        assert!(!more);
    }

    fn idem(key: &str, body: &str, now_ms: u64) -> Command {
        let create =
            crate::run::RunCreate::new("r", "/p", vec![crate::run::TaskConfig::new("t", "busybox", "true")]);
        Command::CreateRunIdempotent {
            create: Box::new(create),
            now_ms,
            key: key.into(),
            body_sha256: body.repeat(64),
        }
    }

    /// The compact in-memory form (shared key text, digest as bytes) serializes exactly as
    /// the strings did, both ways: snapshots stay readable by and for other versions.
    #[test]
    fn idempotency_keys_keep_their_serialized_form() {
        #[derive(serde::Serialize)]
        struct OldEntry<'a> {
            run_id: &'a str,
            body_sha256: &'a str,
            created_ms: u64,
        }
        let mut s = State::default();
        let Response::RunCreated { run_id } = s.apply(1, &idem("k", "A", 1000)) else { panic!() };
        let body = "A".repeat(64);
        let old = rmp_serde::to_vec_named(&(
            BTreeMap::from([(
                "k",
                OldEntry { run_id: &run_id, body_sha256: &body.to_lowercase(), created_ms: 1000 },
            )]),
            vec!["k"],
        ))
        .unwrap();
        let new = rmp_serde::to_vec_named(&(&s.idempotency_keys, &s.idempotency_order)).unwrap();
        assert_eq!(new, old);
        let back: (BTreeMap<SharedKey, IdempotencyEntry>, std::collections::VecDeque<SharedKey>) =
            rmp_serde::from_slice(&old).unwrap();
        assert_eq!((back.0, back.1), (s.idempotency_keys.clone(), s.idempotency_order.clone()));
        // The digest compares by value: the same body in upper case replays.
        assert_eq!(s.apply(2, &idem("k", "a", 2000)), Response::RunReplayed { run_id });
        let bad =
            rmp_serde::to_vec_named(&OldEntry { run_id: "r", body_sha256: "xyz", created_ms: 1 }).unwrap();
        assert!(rmp_serde::from_slice::<IdempotencyEntry>(&bad).is_err(), "not a digest: refused");
    }

    #[test]
    fn an_idempotency_key_replays_its_run_refuses_another_body_and_expires_after_a_day() {
        use crate::limits::IDEMPOTENCY_TTL_MS;
        let mut s = State::default();
        let Response::RunCreated { run_id } = s.apply(1, &idem("k", "a", 1000)) else { panic!() };
        assert_eq!(s.apply(2, &idem("k", "a", 2000)), Response::RunReplayed { run_id: run_id.clone() });
        assert!(matches!(
            s.apply(3, &idem("k", "b", 2000)),
            Response::Rejected(CommandError::KeyReused { .. })
        ));
        assert_eq!(s.runs.len(), 1);
        // Pruning by the command's clock: not yet, then gone.
        s.apply(4, &Command::PruneIdempotencyKeys { now_ms: 1000 + IDEMPOTENCY_TTL_MS - 1 });
        assert!(s.idempotency_keys.contains_key("k"));
        s.apply(5, &Command::PruneIdempotencyKeys { now_ms: 1000 + IDEMPOTENCY_TTL_MS });
        assert!(s.idempotency_keys.is_empty() && s.idempotency_order.is_empty());
        // An expired key (not pruned yet) creates anew.
        s.apply(6, &idem("j", "a", 0));
        let Response::RunCreated { run_id: again } = s.apply(7, &idem("j", "b", IDEMPOTENCY_TTL_MS)) else {
            panic!()
        };
        assert_ne!(again, run_id);
        assert_eq!(s.idempotency_keys["j"].run_id, again);
        // Bad keys are refused at validation.
        assert!(matches!(s.apply(8, &idem(&"x".repeat(257), "a", 0)), Response::Rejected(_)));
        assert!(matches!(s.apply(9, &idem("", "a", 0)), Response::Rejected(_)));
        assert!(matches!(s.apply(10, &idem("a\nb", "a", 0)), Response::Rejected(_)));
    }

    #[test]
    fn an_acted_command_names_its_actor_on_the_events_it_produces() {
        let create =
            crate::run::RunCreate::new("r", "/p", vec![crate::run::TaskConfig::new("a", "i", "true")]);
        let mut s = State::default();
        let mut events = Vec::new();
        let cmd = Command::CreateRun { create: Box::new(create), now_ms: 0 };
        let acted = Command::Acted { actor: "ci".into(), cmd: Box::new(cmd) };
        assert!(matches!(s.apply_with_events(1, &acted, &mut events), Response::RunCreated { .. }));
        assert!(!events.is_empty() && events.iter().all(|e| e.actor.as_deref() == Some("ci")), "{events:?}");
        let nested = Command::Acted { actor: "a".into(), cmd: Box::new(acted) };
        assert!(matches!(nested.validate(), Err(CommandError::Invalid { .. })));
    }

    #[test]
    fn a_task_needing_two_approvers_is_approved_by_two_distinct_names_only() {
        let mut gated = crate::run::TaskConfig::new("deploy", "i", "true");
        gated.needs_approval = true;
        gated.approvers_required = 2;
        let create = crate::run::RunCreate::new("r", "/p", vec![gated]);
        let mut s = State::default();
        let Response::RunCreated { run_id } =
            s.apply(1, &Command::CreateRun { create: Box::new(create), now_ms: 0 })
        else {
            panic!()
        };
        let approve = |name: &str| Command::ApproveTask {
            run_id: run_id.clone(),
            task: "deploy".into(),
            approver: Some(name.into()),
        };
        let mut events = Vec::new();
        assert_eq!(s.apply_with_events(2, &approve("alice"), &mut events), Response::Done { revision: 2 });
        assert_eq!(
            (events[0].action, events[0].actor.as_deref()),
            (Some(RunAction::Approved), Some("alice"))
        );
        assert!(!s.runs[&run_id].tasks["deploy"].approved, "one of two");
        s.apply(3, &approve("alice"));
        assert!(!s.runs[&run_id].tasks["deploy"].approved, "the same name twice counts once");
        s.apply(4, &approve("bob"));
        assert!(s.runs[&run_id].tasks["deploy"].approved, "two distinct names");
        assert!(matches!(s.apply(5, &approve("carol")), Response::Rejected(CommandError::Conflict { .. })));
    }

    #[test]
    fn a_run_update_lands_only_from_an_entry_of_the_leader_and_term_that_decided_it() {
        let create =
            crate::run::RunCreate::new("r", "/p", vec![crate::run::TaskConfig::new("a", "i", "true")]);
        let mut s = State::default();
        let Response::RunCreated { run_id } =
            s.apply(1, &Command::CreateRun { create: Box::new(create), now_ms: 0 })
        else {
            panic!()
        };
        let info = crate::executor::ExecutorInfo::default();
        s.apply(2, &Command::PutExecutor { id: "e1".into(), info, now_ms: 0 });
        let decided = Decider { term: 3, node: 1 };
        let update = RunUpdate {
            run: s.runs[&run_id].clone(),
            prev_revision: s.runs[&run_id].revision,
            create_tasks: vec![ExecutorTaskSpec {
                run_id: run_id.clone(),
                task_name: "a".into(),
                executor_id: "e1".into(),
                stop: false,
                generation: 0,
                decided_by: None,
            }],
            stop_tasks: vec![],
            delete_tasks: vec![],
            decided_by: Some(decided),
        };
        let cmd = Command::Batch(vec![Command::UpdateRun(Box::new(update))]);
        assert!(s.take_touched_executors().is_empty(), "registering wakes no long poll");
        let before = s.clone();
        let mut events = Vec::new();
        for entry in
            [Decider { term: 4, node: 2 }, Decider { term: 4, node: 1 }, Decider { term: 3, node: 2 }]
        {
            let r = s.apply_entry(3, Some(entry), &cmd, &mut events);
            assert_eq!(
                r,
                Response::Batch(vec![Response::Rejected(CommandError::StaleDecision { decided, entry })])
            );
            assert_eq!(s, before, "a stale decision changes nothing");
        }
        assert_eq!(
            s.apply_entry(3, Some(decided), &cmd, &mut events),
            Response::Batch(vec![Response::Done { revision: 3 }])
        );
        let task = &s.executor_tasks[&crate::executor::executor_task_id(&run_id, "a")];
        assert_eq!(task.spec.decided_by, Some(decided), "the task remembers who handed it out");
        let woken = s.take_touched_executors();
        assert_eq!(woken, ["e1".to_string()].into(), "the stale tries woke nobody; the task wakes e1");
        assert!(s.take_touched_executors().is_empty());
    }

    /// The scheduler skips a run whose fingerprint did not move; its executor tasks count
    /// in it through `run_tasks_revision`, which must move on every change to one of them.
    #[test]
    fn every_change_to_a_runs_executor_tasks_moves_its_tasks_revision_while_it_is_active() {
        let tasks = ["a", "b"].map(|n| crate::run::TaskConfig::new(n, "i", "true")).to_vec();
        let mut s = State::default();
        let create = Box::new(crate::run::RunCreate::new("r", "/p", tasks));
        let Response::RunCreated { run_id } = s.apply(1, &Command::CreateRun { create, now_ms: 0 }) else {
            panic!()
        };
        s.apply(2, &Command::PutExecutor { id: "e1".into(), info: Default::default(), now_ms: 0 });
        assert_eq!(s.run_tasks_revision(&run_id), 0, "no executor task yet");
        let spec = |task: &str| ExecutorTaskSpec {
            run_id: run_id.clone(),
            task_name: task.into(),
            executor_id: "e1".into(),
            stop: false,
            generation: 0,
            decided_by: None,
        };
        let update = |s: &State, phase, create_tasks, stop_tasks, delete_tasks| {
            let mut run = s.runs[&run_id].clone();
            run.phase = phase;
            let prev_revision = run.revision;
            Command::UpdateRun(Box::new(RunUpdate {
                run,
                prev_revision,
                create_tasks,
                stop_tasks,
                delete_tasks,
                decided_by: None,
            }))
        };
        let (a, b) = (executor_task_id(&run_id, "a"), executor_task_id(&run_id, "b"));
        let handed = update(&s, RunPhase::Running, vec![spec("a"), spec("b")], vec![], vec![]);
        assert_eq!(s.apply(3, &handed), Response::Done { revision: 3 });
        assert_eq!(s.run_tasks_revision(&run_id), 3, "created");
        let mut running = ExecutorTaskStatus::new(1);
        running.phase = crate::run::Phase::Running;
        let report =
            Command::SetExecutorTaskStatus { id: a.clone(), executor_id: "e1".into(), status: running };
        assert_eq!(s.apply(4, &report), Response::Done { revision: 4 });
        assert_eq!(s.run_tasks_revision(&run_id), 4, "a status report");
        let unchanged = update(&s, RunPhase::Running, vec![], vec![], vec![]);
        s.apply(5, &unchanged);
        assert_eq!(s.run_tasks_revision(&run_id), 4, "a run update that leaves its tasks alone");
        assert_eq!(
            s.apply(6, &update(&s, RunPhase::Running, vec![], vec![a], vec![])),
            Response::Done { revision: 6 }
        );
        assert_eq!(s.run_tasks_revision(&run_id), 6, "a stop");
        assert_eq!(
            s.apply(7, &update(&s, RunPhase::Running, vec![], vec![], vec![b])),
            Response::Done { revision: 7 }
        );
        assert_eq!(s.run_tasks_revision(&run_id), 7, "a removal");
        s.apply(8, &update(&s, RunPhase::Cancelled, vec![], vec![], vec![]));
        assert!(s.run_tasks_touched.0.is_empty(), "kept for active runs only");
    }

    /// The counts a replica keeps equal those of its executor tasks, even for an update
    /// that names one task twice (the second replaces the first) and after a restart.
    #[test]
    fn kept_active_task_counts_follow_a_task_created_twice_in_one_update() {
        let mut s = State::default();
        let create = Box::new(crate::run::RunCreate::new(
            "r",
            "/p",
            vec![crate::run::TaskConfig::new("a", "i", "true")],
        ));
        let Response::RunCreated { run_id } = s.apply(1, &Command::CreateRun { create, now_ms: 0 }) else {
            panic!()
        };
        for (i, e) in ["e1", "e2"].into_iter().enumerate() {
            s.apply(
                2 + i as u64,
                &Command::PutExecutor { id: e.into(), info: Default::default(), now_ms: 0 },
            );
        }
        let spec = |e: &str| ExecutorTaskSpec {
            run_id: run_id.clone(),
            task_name: "a".into(),
            executor_id: e.into(),
            stop: false,
            generation: 0,
            decided_by: None,
        };
        let run = s.runs[&run_id].clone();
        let update = RunUpdate {
            prev_revision: run.revision,
            run,
            create_tasks: vec![spec("e1"), spec("e2")],
            stop_tasks: vec![],
            delete_tasks: vec![],
            decided_by: None,
        };
        assert_eq!(s.apply(4, &Command::UpdateRun(Box::new(update))), Response::Done { revision: 4 });
        assert_eq!(*s.active_task_counts(), BTreeMap::from([("e2".to_string(), 1)]));
        assert_eq!(*s.active_task_counts(), s.count_active_tasks());
        let restored: State = rmp_serde::from_slice(&rmp_serde::to_vec_named(&s).unwrap()).unwrap();
        assert!(restored.active_counts.0.is_none(), "not serialized: counted again");
        assert_eq!(*restored.active_task_counts(), *s.active_task_counts());
    }

    #[test]
    fn a_patch_makes_the_run_and_events_the_whole_update_makes_in_a_fraction_of_the_bytes() {
        let tasks = (0..20).map(|i| crate::run::TaskConfig::new(&format!("t{i}"), "i", "true")).collect();
        let create = crate::run::RunCreate::new("r", "/p", tasks);
        let mut s = State::default();
        let Response::RunCreated { run_id } =
            s.apply(1, &Command::CreateRun { create: Box::new(create), now_ms: 0 })
        else {
            panic!()
        };
        let cur = s.runs[&run_id].clone();
        let mut t3 = cur.tasks["t3"].clone();
        t3.status = crate::run::TaskStatus::Failed;
        t3.error = Some("executor lost".into());
        let patch = Box::new(RunPatch {
            run_id: run_id.clone(),
            prev_revision: cur.revision,
            phase: RunPhase::Running,
            result: cur.result,
            stop: cur.stop,
            setup_errors: cur.setup_errors.clone(),
            enqueue_time: cur.enqueue_time,
            start_time: Some(7),
            end_time: None,
            tasks: [("t3".to_string(), t3.clone())].into(),
            create_tasks: vec![],
            stop_tasks: vec![],
            delete_tasks: vec![],
            decided_by: None,
        });
        // The whole update it stands for: the run with the patch's fields and tasks.
        let update = patch.clone().into_update(&cur);
        let mut run = cur.clone();
        run.phase = RunPhase::Running;
        run.start_time = Some(7);
        run.tasks.insert("t3".into(), t3);
        assert_eq!(update.run, run);
        assert_eq!(update.prev_revision, cur.revision);
        let (whole_bytes, patch_bytes) = (
            rmp_serde::to_vec_named(&Command::UpdateRun(Box::new(update.clone()))).unwrap().len(),
            rmp_serde::to_vec_named(&Command::PatchRun(patch.clone())).unwrap().len(),
        );
        assert!(patch_bytes * 5 < whole_bytes, "patch {patch_bytes} bytes, whole {whole_bytes}");
        let back: Command =
            rmp_serde::from_slice(&rmp_serde::to_vec_named(&Command::PatchRun(patch.clone())).unwrap())
                .unwrap();
        assert_eq!(back, Command::PatchRun(patch.clone()));

        let (mut whole, mut events_whole, mut events_patch) = (s.clone(), Vec::new(), Vec::new());
        let r_whole =
            whole.apply_with_events(2, &Command::UpdateRun(Box::new(update.clone())), &mut events_whole);
        let r_patch = s.apply_with_events(2, &Command::PatchRun(patch.clone()), &mut events_patch);
        assert_eq!((r_patch, &s, &events_patch), (r_whole, &whole, &events_whole));
        assert_eq!(s.runs[&run_id].tasks["t3"].status, crate::run::TaskStatus::Failed);

        // Replayed or decided on an older revision: refused like the whole update, nothing changes.
        let before = s.clone();
        let r = s.apply(3, &Command::PatchRun(patch.clone()));
        assert!(
            matches!(r, Response::Rejected(CommandError::RevisionMismatch { expected: 1, actual: 2, .. })),
            "{r:?}"
        );
        // A task the run does not have.
        let mut alien = patch.clone();
        alien.prev_revision = 2;
        alien.tasks.insert("nope".into(), cur.tasks["t0"].clone());
        assert!(matches!(
            s.apply(3, &Command::PatchRun(alien)),
            Response::Rejected(CommandError::Invalid { .. })
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn a_restart_creates_a_new_run_with_the_kept_tasks_and_refuses_an_active_source() {
        let create = crate::run::RunCreate::new(
            "r",
            "/p",
            vec![
                crate::run::TaskConfig::new("a", "i", "true"),
                crate::run::TaskConfig::new("b", "i", "true"),
            ],
        );
        let mut s = State::default();
        let Response::RunCreated { run_id: src } =
            s.apply(1, &Command::CreateRun { create: Box::new(create.clone()), now_ms: 0 })
        else {
            panic!()
        };
        let mut kept = s.runs[&src].tasks["a"].clone();
        kept.status = crate::run::TaskStatus::Success;
        kept.restored_from = Some(src.clone());
        let restart = Command::RestartRun {
            create: Box::new(create),
            now_ms: 5,
            restarted_from: src.clone(),
            keep: [("a".to_string(), kept.clone())].into(),
            actor: None,
        };
        let mut events = Vec::new();
        let r = s.apply_with_events(2, &restart, &mut events);
        assert!(
            matches!(&r, Response::Rejected(CommandError::Conflict { reason }) if reason.contains("queued")),
            "{r:?}"
        );
        s.runs.get_mut(&src).unwrap().phase = RunPhase::Finished;
        let Response::RunCreated { run_id } = s.apply_with_events(3, &restart, &mut events) else { panic!() };
        let run = &s.runs[&run_id];
        assert_eq!(run.restarted_from.as_deref(), Some(src.as_str()));
        assert_eq!(run.tasks["a"], kept);
        assert_eq!(run.tasks["b"].status, crate::run::TaskStatus::Notstarted);
        assert_eq!(events.last().unwrap().action, Some(RunAction::Restarted));
        assert_eq!(events.last().unwrap().restarted_from.as_deref(), Some(src.as_str()));
    }

    #[test]
    fn an_expiry_removes_an_executor_only_if_it_did_not_heartbeat_since() {
        let mut s = State::default();
        let info = crate::executor::ExecutorInfo::default();
        s.apply(1, &Command::PutExecutor { id: "e1".into(), info: info.clone(), now_ms: 10 });
        // Decided on last_seen 10, applied after a heartbeat at 20: the executor stays.
        s.apply(2, &Command::PutExecutor { id: "e1".into(), info, now_ms: 20 });
        let expire = |seen| Command::DeleteExecutor { id: "e1".into(), if_last_seen: Some(seen) };
        assert!(matches!(s.apply(3, &expire(10)), Response::Rejected(CommandError::Conflict { .. })));
        assert!(s.executors.contains_key("e1"));
        assert!(s.take_touched_executors().is_empty());
        assert_eq!(s.apply(4, &expire(20)), Response::Done { revision: 4 });
        assert!(s.executors.is_empty());
        assert_eq!(s.take_touched_executors(), ["e1".to_string()].into(), "its long poll learns at once");
    }

    fn command_strategy() -> impl Strategy<Value = Command> {
        let key = prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(String::from);
        let prev = prop::option::of(0u64..12);
        prop_oneof![
            (key.clone(), "[a-z]{0,4}", prev.clone())
                .prop_map(|(key, value, prev_revision)| Command::KvPut { key, value, prev_revision }),
            (key, prev).prop_map(|(key, prev_revision)| Command::KvDelete { key, prev_revision }),
            any::<bool>().prop_map(|enabled| Command::SetMaintenance { enabled }),
        ]
    }

    proptest! {
        /// The state machine agrees with a plain model of a CAS map, command by command.
        #[test]
        fn apply_matches_a_model_of_a_cas_map(cmds in prop::collection::vec(command_strategy(), 0..60)) {
            let mut s = State::default();
            let mut model: HashMap<String, (String, u64)> = HashMap::new();
            let mut maintenance = false;
            for (i, cmd) in cmds.iter().enumerate() {
                let index = i as u64 + 1;
                let got = s.apply(index, cmd);
                match cmd {
                    Command::KvPut { key, value, prev_revision } => {
                        let actual = model.get(key).map_or(0, |e| e.1);
                        if prev_revision.is_none_or(|p| p == actual) {
                            model.insert(key.clone(), (value.clone(), index));
                            prop_assert_eq!(got, Response::KvPut { revision: index });
                        } else {
                            prop_assert!(matches!(got, Response::Rejected(CommandError::RevisionMismatch { .. })), "expected a mismatch, got {:?}", got);
                        }
                    }
                    Command::KvDelete { key, prev_revision } => {
                        let actual = model.get(key).map_or(0, |e| e.1);
                        let exists = model.contains_key(key);
                        if exists && prev_revision.is_none_or(|p| p == actual) {
                            model.remove(key);
                            prop_assert_eq!(got, Response::KvDelete { revision: index });
                        } else {
                            prop_assert!(matches!(got, Response::Rejected(_)), "expected a rejection, got {:?}", got);
                        }
                    }
                    Command::SetMaintenance { enabled } => {
                        maintenance = *enabled;
                        prop_assert_eq!(got, Response::Maintenance { enabled: *enabled });
                    }
                    other => unreachable!("the strategy makes only kv and maintenance commands, not {other:?}"),
                }
                prop_assert_eq!(s.maintenance, maintenance);
                prop_assert_eq!(s.kv.len(), model.len());
                for (k, (v, rev)) in &model {
                    prop_assert_eq!(&s.kv[k].value, v);
                    prop_assert_eq!(s.kv[k].revision, *rev);
                }
            }
        }

        /// Replaying the same log always gives the same state, and a state survives its
        /// snapshot encoding unchanged.
        #[test]
        fn replay_is_deterministic_and_snapshots_round_trip(cmds in prop::collection::vec(command_strategy(), 0..60)) {
            let mut a = State::default();
            let mut b = State::default();
            let ra: Vec<_> = cmds.iter().enumerate().map(|(i, c)| a.apply(i as u64 + 1, c)).collect();
            let rb: Vec<_> = cmds.iter().enumerate().map(|(i, c)| b.apply(i as u64 + 1, c)).collect();
            prop_assert_eq!(ra, rb);
            prop_assert_eq!(&a, &b);
            let bytes = rmp_serde::to_vec_named(&a).unwrap();
            let back: State = rmp_serde::from_slice(&bytes).unwrap();
            prop_assert_eq!(back, a);
        }

        /// Every command survives the wire encoding used by the Raft log.
        #[test]
        fn commands_round_trip_through_msgpack(cmd in command_strategy()) {
            let bytes = rmp_serde::to_vec_named(&cmd).unwrap();
            let back: Command = rmp_serde::from_slice(&bytes).unwrap();
            prop_assert_eq!(back, cmd);
        }
    }
}
