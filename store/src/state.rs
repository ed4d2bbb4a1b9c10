//! The replicated state machine's data and its deterministic `apply`.
//!
//! Maps are `BTreeMap`s so that iteration, serialization and therefore snapshots are
//! identical on every replica.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandError, Response, RunUpdate};
use crate::event::Event;
use crate::executor::{executor_task_id, validate_status, Executor, ExecutorTask, ExecutorTaskStatus};
use crate::limits::{MAX_EXECUTORS, MAX_MAP_ENTRIES};
use crate::run::{new_run, root_group_of, Run, RunConfig, RunPhase};

/// One coordination key's value. Revisions are Raft log indexes, so they are unique,
/// increase with every write and are the same on every node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub value: String,
    /// Log index of the last write to this key.
    pub revision: u64,
    /// Log index of the write that created this key.
    pub create_revision: u64,
}

/// Everything the cluster agrees on (besides Raft membership, which openraft tracks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub kv: BTreeMap<String, KvEntry>,
    pub maintenance: bool,
    #[serde(default)]
    pub runs: BTreeMap<String, Run>,
    /// Each run's submission, kept beside it (never changed after creation).
    #[serde(default)]
    pub run_configs: BTreeMap<String, RunConfig>,
    /// Ids of runs that are queued or running: what the scheduler looks at.
    #[serde(default)]
    pub active_runs: BTreeSet<String>,
    /// Last run counter per root group.
    #[serde(default)]
    pub run_counters: BTreeMap<String, u64>,
    /// Sequence of the last run id handed out (ids only grow, even after an import).
    #[serde(default)]
    pub last_run_seq: u64,
    #[serde(default)]
    pub executors: BTreeMap<String, Executor>,
    #[serde(default)]
    pub executor_tasks: BTreeMap<String, ExecutorTask>,
    /// The run archive in the object storage (only its manifest lives here).
    #[serde(default)]
    pub archive: crate::archive::Manifest,
}

fn missing(what: impl Into<String>) -> Response {
    Response::Rejected(CommandError::Missing { what: what.into() })
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
        if let Err(e) = cmd.validate() {
            return Response::Rejected(e);
        }
        match cmd {
            Command::Batch(cmds) => {
                Response::Batch(cmds.iter().map(|c| self.apply_with_events(index, c, events)).collect())
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
                        _ => Response::Rejected(CommandError::NotFound { key: key.clone() }),
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
            Command::SetMaintenance { enabled } => {
                self.maintenance = *enabled;
                Response::Maintenance { enabled: *enabled }
            }
            Command::CreateRun { create, now_ms } => {
                let seq = (self.last_run_seq + 1).max(index);
                self.last_run_seq = seq;
                let counter = self.run_counters.entry(root_group_of(&create.group).to_string()).or_insert(0);
                *counter += 1;
                let run = new_run(create, seq, *counter, index, *now_ms);
                events.push(Event::run(index, &run));
                if !run.phase.is_final() {
                    self.active_runs.insert(run.id.clone());
                }
                let run_id = run.id.clone();
                self.run_configs.insert(run_id.clone(), (**create).clone());
                self.runs.insert(run_id.clone(), run);
                Response::RunCreated { run_id }
            }
            Command::UpdateRun(update) => self.update_run(index, update, events),
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
            Command::ApproveTask { run_id, task } => {
                let needs = self.run_configs.get(run_id).and_then(|c| c.task(task)).map(|t| t.needs_approval);
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
                rt.approved = true;
                rt.waiting_approval = false;
                run.revision = index;
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
            Command::DeleteExecutor { id } => match self.executors.remove(id) {
                Some(_) => Response::Done { revision: index },
                None => missing(format!("executor {id:?}")),
            },
            Command::SetExecutorTaskStatus { id, executor_id, status } => {
                self.set_executor_task_status(index, id, executor_id, status)
            }
            Command::ArchiveRuns { prev_generation, replace, files, run_ids } => {
                self.archive_runs(*prev_generation, replace.as_deref(), files, run_ids)
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
                *self = new;
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
            self.runs.remove(id);
            self.run_configs.remove(id);
            self.active_runs.remove(id);
        }
        if let Some(k) = replace {
            self.archive.files.retain(|f| f.key != k);
        }
        self.archive.files.extend(files.iter().cloned());
        self.archive.generation += 1;
        Response::Done { revision: self.archive.generation }
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
                Response::Done { revision: self.archive.generation }
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
                Response::Done { revision: self.archive.generation }
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
        let et = self.executor_tasks.get_mut(id).expect("checked above");
        et.status = status.clone();
        et.revision = index;
        Response::Done { revision: index }
    }

    /// Applies one scheduler round: all of it or, if anything is stale, none of it.
    fn update_run(&mut self, index: u64, u: &RunUpdate, events: &mut Vec<Event>) -> Response {
        let run_id = &u.run.id;
        let Some(cur) = self.runs.get(run_id) else { return missing(format!("run {run_id}")) };
        if cur.revision != u.prev_revision {
            return Response::Rejected(CommandError::RevisionMismatch {
                key: format!("run {run_id}"),
                expected: u.prev_revision,
                actual: cur.revision,
            });
        }
        if !cur.tasks.keys().eq(u.run.tasks.keys()) {
            return rejected_invalid("a run update must keep the run's tasks");
        }
        let Some(config) = self.run_configs.get(run_id) else {
            return missing(format!("configuration of run {run_id}"));
        };
        // Check everything first: the round applies whole or not at all.
        let mut added: BTreeMap<&str, u32> = BTreeMap::new();
        for spec in &u.create_tasks {
            let id = executor_task_id(run_id, &spec.task_name);
            if spec.run_id != *run_id || config.task(&spec.task_name).is_none() {
                return rejected_invalid(format!("executor task {id:?} does not belong to run {run_id}"));
            }
            if self.executor_tasks.contains_key(&id) {
                return conflict(format!("executor task {id:?} exists already"));
            }
            let Some(executor) = self.executors.get(&spec.executor_id) else {
                return conflict(format!("executor {:?} is gone", spec.executor_id));
            };
            let extra = added.entry(spec.executor_id.as_str()).or_insert(0);
            *extra += 1;
            let limit = executor.info.active_tasks_limit;
            if limit > 0 && self.active_tasks(&spec.executor_id) + *extra > limit {
                return conflict(format!(
                    "executor {:?} is at its limit of {limit} active tasks",
                    spec.executor_id
                ));
            }
        }
        for id in u.stop_tasks.iter().chain(&u.delete_tasks) {
            match self.executor_tasks.get(id) {
                Some(et) if et.spec.run_id == *run_id => {}
                _ => return conflict(format!("executor task {id:?} of run {run_id} does not exist")),
            }
        }
        let steps: Vec<usize> =
            u.create_tasks.iter().map(|s| config.task(&s.task_name).map_or(0, |t| t.steps.len())).collect();
        let mut run = u.run.clone();
        run.revision = index;
        Event::diff(index, cur, &run, events);

        for (spec, steps) in u.create_tasks.iter().zip(steps) {
            let id = executor_task_id(run_id, &spec.task_name);
            let status = ExecutorTaskStatus::new(steps);
            self.executor_tasks
                .insert(id.clone(), ExecutorTask { id, spec: spec.clone(), status, revision: index });
            self.touch_executor(&spec.executor_id, index);
        }
        for id in &u.stop_tasks {
            let et = self.executor_tasks.get_mut(id).expect("checked above");
            if !et.spec.stop {
                et.spec.stop = true;
                et.spec.generation += 1;
                et.revision = index;
                let executor_id = et.spec.executor_id.clone();
                self.touch_executor(&executor_id, index);
            }
        }
        for id in &u.delete_tasks {
            if let Some(et) = self.executor_tasks.remove(id) {
                self.touch_executor(&et.spec.executor_id, index);
            }
        }
        if run.phase.is_final() {
            self.active_runs.remove(run_id);
        } else {
            self.active_runs.insert(run_id.clone());
        }
        self.runs.insert(run_id.clone(), run);
        Response::Done { revision: index }
    }

    fn touch_executor(&mut self, id: &str, index: u64) {
        if let Some(e) = self.executors.get_mut(id) {
            e.tasks_revision = index;
        }
    }

    /// Executor tasks assigned to `executor_id` that have not ended.
    pub fn active_tasks(&self, executor_id: &str) -> u32 {
        self.executor_tasks
            .values()
            .filter(|t| t.spec.executor_id == executor_id && !t.status.phase.is_final())
            .count() as u32
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
    }

    #[test]
    fn batches_do_not_nest_or_carry_imports_and_are_bounded() {
        let nested = Command::Batch(vec![Command::Batch(vec![put("a", "1", None)])]);
        assert!(matches!(nested.validate(), Err(CommandError::Invalid { .. })));
        let import = Command::Batch(vec![Command::Import(Box::default())]);
        assert!(matches!(import.validate(), Err(CommandError::Invalid { .. })));
        assert!(matches!(Command::Batch(vec![]).validate(), Err(CommandError::Invalid { .. })));
        let big = Command::Batch(vec![put("a", "1", None); crate::command::MAX_BATCH_COMMANDS + 1]);
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
        assert_eq!(r, Response::Rejected(CommandError::NotFound { key: "y".into() }));
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
