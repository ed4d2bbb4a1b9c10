//! Scheduling decisions as pure functions of the replicated state and the time.
//!
//! [`decide_run`] reads the stored run (copying only the tasks it changes) and makes every
//! decision by reading the *task statuses the pass began with* (never the half-updated
//! result), so neither map order nor the order of tasks can change which status a task
//! gets. Passes repeat until nothing changes, so one round settles everything the current
//! state allows (a skipped task skips its own children in the same round) and the run is
//! written once, as a patch of what changed.
//!
//! [`run_fingerprint`] sums up what a run's decision reads, so that the loop can skip the
//! runs it already found nothing to do for (most of them, under load) until their inputs
//! change; it costs a few lookups per run, not a walk of the run's executor tasks.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use flotilla_store::executor::{executor_task_id, ExecutorTask, ExecutorTaskSpec, ExecutorTaskStatus};
use flotilla_store::limits::TASK_TIMEOUT_GRACE_MS;
use flotilla_store::run::{
    approvers, Phase, Run, RunPhase, RunResult, RunTask, TaskConfig, TaskStatus, REASON_TIMEOUT,
};
use flotilla_store::{RunPatch, State};

#[derive(Clone, Debug)]
pub struct Settings {
    /// An executor whose last heartbeat is older than this gets no new tasks, and a
    /// dynamic one is removed.
    pub executor_timeout_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { executor_timeout_ms: flotilla_store::defaults::EXECUTOR_TIMEOUT_MS }
    }
}

/// Active (not ended) executor tasks per executor, the load the scheduler balances (an
/// executor with none is absent); the round adds the tasks it hands out.
pub fn active_counts(state: &State) -> BTreeMap<String, u32> {
    state.active_task_counts().into_owned()
}

/// Dynamic executors that stopped heartbeating, with the last heartbeat recorded: to be
/// removed unless they heartbeat again first.
pub fn expired_executors(state: &State, now_ms: u64, settings: &Settings) -> Vec<(String, u64)> {
    state
        .executors
        .values()
        .filter(|e| e.info.dynamic && now_ms.saturating_sub(e.last_seen) > settings.executor_timeout_ms)
        .map(|e| (e.id.clone(), e.last_seen))
        .collect()
}

/// Executor tasks of `run_id` (ids are `<run id>.<task>`, so they sit together in the map).
pub fn run_executor_tasks<'a>(state: &'a State, run_id: &str) -> impl Iterator<Item = &'a ExecutorTask> + 'a {
    let prefix = format!("{run_id}.");
    state
        .executor_tasks
        .range(prefix.clone()..)
        .take_while(move |(k, _)| k.starts_with(&prefix))
        .map(|(_, v)| v)
}

/// What the executors offer to decisions at `now_ms`: which exist, which are live, what
/// they accept and, for those with a task limit, their load. Seeds [`run_fingerprint`].
pub fn executors_fingerprint(
    state: &State,
    active: &BTreeMap<String, u32>,
    now_ms: u64,
    settings: &Settings,
) -> u64 {
    let mut h = DefaultHasher::new();
    for e in state.executors.values() {
        let live = now_ms.saturating_sub(e.last_seen) <= settings.executor_timeout_ms;
        (&e.id, live, &e.info.archs, e.info.allow_privileged_containers, e.info.active_tasks_limit)
            .hash(&mut h);
        if e.info.active_tasks_limit > 0 {
            active.get(&e.id).hash(&mut h);
        }
    }
    h.finish()
}

/// Everything [`decide_run`] reads for `run_id`, as one number: the run (its revision moves
/// on every change), its executor tasks (their [`State::run_tasks_revision`] moves on every
/// change to one of them, without walking them) and the executors (`executors`, from
/// [`executors_fingerprint`]). The configuration never changes. Between two rounds with
/// the same fingerprint, only the clock differs; the loop's periodic full sweep covers that.
pub fn run_fingerprint(state: &State, run_id: &str, executors: u64) -> Option<u64> {
    let run = state.runs.get(run_id)?;
    let mut h = DefaultHasher::new();
    (executors, run.revision, state.run_tasks_revision(run_id)).hash(&mut h);
    // A queued run held back by its group moves when an older run of the group does.
    if run.phase == RunPhase::Queued {
        let limit = state.run_configs.get(run_id).and_then(|c| c.max_running_in_group);
        crate::group::admits(state, run, limit).hash(&mut h);
    }
    Some(h.finish())
}

/// What one round decides for one run, as a patch of it, or `None` when nothing is to
/// change. `active` is the executors' load, updated with the tasks handed out here so
/// that several runs decided in one round share it.
pub fn decide_run(
    state: &State,
    run_id: &str,
    now_ms: u64,
    settings: &Settings,
    active: &mut BTreeMap<String, u32>,
) -> Option<RunPatch> {
    let cur = state.runs.get(run_id)?;
    let config = state.run_configs.get(run_id)?;
    let mut run = Draft::new(cur);
    let mut create_tasks = Vec::new();
    let mut stop_tasks = Vec::new();
    let mut delete_tasks = Vec::new();
    let etasks: Vec<&ExecutorTask> = run_executor_tasks(state, run_id).collect();

    if run.phase == RunPhase::Queued {
        if cur.stop {
            for name in cur.tasks.iter().filter(|(_, rt)| !rt.status.is_final()).map(|(n, _)| n) {
                run.task_mut(name).expect("a task of the run").status = TaskStatus::Cancelled;
            }
            run.phase = RunPhase::Cancelled;
            run.result = RunResult::Stopped;
            run.end_time = Some(now_ms);
        } else if !crate::group::admits(state, cur, config.max_running_in_group) {
            return None; // waits behind older runs of its group
        } else {
            run.phase = RunPhase::Running;
            run.start_time = Some(now_ms);
        }
    }

    // Executor tasks still alive after this round, by task name.
    let mut assigned: BTreeSet<String> = BTreeSet::new();
    for et in &etasks {
        let name = et.spec.task_name.as_str();
        let Some(stored) = run.task(name) else { continue };
        let ended = et.status.phase.is_final();
        if run.phase != RunPhase::Running {
            // Leftovers of an ended run: stop what runs, drop what ended.
            if ended {
                delete_tasks.push(et.id.clone());
            } else if !et.spec.stop {
                stop_tasks.push(et.id.clone());
            }
            continue;
        }
        if !ended && !state.executors.contains_key(&et.spec.executor_id) {
            let rt = run.task_mut(name).expect("checked");
            fail_task(rt, format!("executor {:?} is gone", et.spec.executor_id), now_ms);
            delete_tasks.push(et.id.clone());
            continue;
        }
        // Most reports were copied in an earlier round: the task is copied only to change.
        if copy_changes(stored, &et.status) {
            copy_status(run.task_mut(name).expect("checked"), &et.status);
        } else {
            debug_assert!({
                let mut copied = stored.clone();
                copy_status(&mut copied, &et.status);
                copied == *stored
            });
        }
        if !ended {
            let timeout_s = config.task(name).and_then(|t| t.timeout_s);
            if let Some(why) = past_timeout(run.task(name).expect("checked"), timeout_s, now_ms) {
                // The executor did not end it in time (partitioned, hung): the run moves on
                // and the executor, no longer finding the task, stops its containers.
                let rt = run.task_mut(name).expect("checked");
                fail_task(rt, why, now_ms);
                mark_timeout(rt, now_ms);
                delete_tasks.push(et.id.clone());
                continue;
            }
        }
        if ended {
            delete_tasks.push(et.id.clone());
        } else {
            assigned.insert(et.spec.task_name.clone());
            if cur.stop && !et.spec.stop {
                stop_tasks.push(et.id.clone());
            }
        }
    }

    if run.phase == RunPhase::Running {
        // Where each configured task is, for its children to find its status (a DAG only).
        let position: BTreeMap<&str, usize> = if config.tasks.iter().any(|t| !t.depends.is_empty()) {
            config.tasks.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect()
        } else {
            BTreeMap::new()
        };
        loop {
            // A pass decides from the statuses it began with (a task skipped in this pass
            // moves its children in the next); it changes only tasks it decides on, each in
            // its own turn, and the loop ends with a pass that changed nothing.
            let statuses: Vec<Option<TaskStatus>> =
                config.tasks.iter().map(|t| Some(run.task(&t.name)?.status)).collect();
            let status_of = |name: &str| position.get(name).and_then(|&i| statuses[i]);
            let mut changed = false;
            for (task, status) in config.tasks.iter().zip(&statuses) {
                let name = &task.name;
                if *status != Some(TaskStatus::Notstarted) || assigned.contains(name) {
                    continue;
                }
                let parents: Option<Vec<TaskStatus>> =
                    task.depends.iter().map(|d| status_of(&d.task).filter(|s| s.is_final())).collect();
                if parents.is_none() && !cur.stop {
                    continue; // waits for a parent to end, untouched
                }
                let stored = run.task(name).expect("a run has a status for each configured task");
                let start = match parents {
                    _ if cur.stop => Start::Cancel,
                    Some(parents) if !task.depends.iter().zip(&parents).all(|(d, s)| d.satisfied_by(*s)) => {
                        Start::Skip
                    }
                    _ if task.needs_approval && !stored.approved => {
                        if approvers(&stored.annotations) >= task.approvers_required as usize {
                            Start::Approve
                        } else if !stored.waiting_approval {
                            Start::AwaitApproval
                        } else {
                            continue; // still waits for approvers
                        }
                    }
                    _ => match choose_executor(state, task, active, now_ms, settings) {
                        Choice::Wait => continue,
                        Choice::Fail(why) => Start::Fail(why),
                        Choice::Executor(executor_id) => Start::Assign(executor_id),
                    },
                };
                // Copied into the draft only to change.
                let rt = run.task_mut(name).expect("looked up above");
                match start {
                    Start::Cancel => rt.status = TaskStatus::Cancelled,
                    Start::Skip => rt.status = TaskStatus::Skipped,
                    Start::Approve => {
                        rt.approved = true;
                        rt.waiting_approval = false;
                    }
                    Start::AwaitApproval => rt.waiting_approval = true,
                    Start::Fail(why) => {
                        fail_task(rt, why, now_ms);
                        rt.setup_step.phase = Phase::Failed;
                        rt.setup_step.end_time = Some(now_ms);
                    }
                    Start::Assign(executor_id) => {
                        *active.entry(executor_id.clone()).or_insert(0) += 1;
                        rt.executor_id = Some(executor_id.clone());
                        assigned.insert(name.clone());
                        create_tasks.push(ExecutorTaskSpec {
                            run_id: cur.id.clone(),
                            task_name: name.clone(),
                            executor_id,
                            stop: false,
                            generation: 0,
                            decided_by: None,
                        });
                    }
                }
                changed = true;
            }
            if !changed {
                break;
            }
        }
        let statuses = || cur.tasks.keys().filter_map(|n| Some((n, run.task(n)?.status)));
        if assigned.is_empty() && statuses().all(|(_, s)| s.is_final()) {
            // A failure the task's configuration ignores does not fail the run.
            let counts = |name: &String| config.task(name).is_none_or(|t| !t.ignore_failure);
            let result = if statuses().any(|(n, s)| s == TaskStatus::Failed && counts(n)) {
                RunResult::Failed
            } else if cur.stop || statuses().any(|(_, s)| s == TaskStatus::Stopped) {
                RunResult::Stopped
            } else {
                RunResult::Success
            };
            run.phase = RunPhase::Finished;
            run.end_time = Some(now_ms);
            run.result = result;
        }
    }

    let tasks = run.changed_tasks();
    let Draft { phase, result, start_time, end_time, .. } = run;
    let same = (phase, result, start_time, end_time) == (cur.phase, cur.result, cur.start_time, cur.end_time);
    if same && tasks.is_empty() && create_tasks.is_empty() && stop_tasks.is_empty() && delete_tasks.is_empty()
    {
        return None;
    }
    debug_assert!(create_tasks
        .iter()
        .all(|s| !state.executor_tasks.contains_key(&executor_task_id(run_id, &s.task_name))));
    Some(RunPatch {
        run_id: cur.id.clone(),
        prev_revision: cur.revision,
        phase,
        result,
        stop: cur.stop,
        setup_errors: cur.setup_errors.clone(),
        enqueue_time: cur.enqueue_time,
        start_time,
        end_time,
        tasks,
        create_tasks,
        stop_tasks,
        delete_tasks,
        decided_by: None,
    })
}

/// A run as a round changes it: what a decision can change of the stored run, and a copy
/// of each task it touched (the rest is read from the stored run, never copied).
struct Draft<'a> {
    cur: &'a Run,
    phase: RunPhase,
    result: RunResult,
    start_time: Option<u64>,
    end_time: Option<u64>,
    tasks: BTreeMap<String, RunTask>,
}

impl<'a> Draft<'a> {
    fn new(cur: &'a Run) -> Draft<'a> {
        Draft {
            cur,
            phase: cur.phase,
            result: cur.result,
            start_time: cur.start_time,
            end_time: cur.end_time,
            tasks: BTreeMap::new(),
        }
    }

    fn task(&self, name: &str) -> Option<&RunTask> {
        self.tasks.get(name).or_else(|| self.cur.tasks.get(name))
    }

    /// The task to change, copied from the stored run on first touch.
    fn task_mut(&mut self, name: &str) -> Option<&mut RunTask> {
        if !self.tasks.contains_key(name) {
            let stored = self.cur.tasks.get(name)?.clone();
            self.tasks.insert(name.to_string(), stored);
        }
        self.tasks.get_mut(name)
    }

    /// The touched tasks that differ from the stored ones: what the patch carries.
    fn changed_tasks(&mut self) -> BTreeMap<String, RunTask> {
        let cur = self.cur;
        let mut tasks = std::mem::take(&mut self.tasks);
        tasks.retain(|name, t| cur.tasks.get(name) != Some(t));
        tasks
    }
}

enum Choice {
    Executor(String),
    Wait,
    Fail(String),
}

/// What a pass does to a task that has not started: each one changes the task (`Assign`
/// also hands it to an executor), so a pass that makes one is followed by another.
enum Start {
    Cancel,
    Skip,
    Approve,
    AwaitApproval,
    Fail(String),
    Assign(String),
}

/// The least loaded live executor that supports the task's arch and has room; if
/// executors for the arch exist but none allows a privileged task, the task fails.
fn choose_executor(
    state: &State,
    task: &TaskConfig,
    active: &BTreeMap<String, u32>,
    now_ms: u64,
    settings: &Settings,
) -> Choice {
    let arch_ok: Vec<_> = state
        .executors
        .values()
        .filter(|e| now_ms.saturating_sub(e.last_seen) <= settings.executor_timeout_ms)
        .filter(|e| task.arch.as_ref().is_none_or(|a| e.info.archs.contains(a)))
        .collect();
    if arch_ok.is_empty() {
        return Choice::Wait;
    }
    let privileged = flotilla_store::pod::needs_privileged(task);
    let allowed: Vec<_> =
        arch_ok.into_iter().filter(|e| !privileged || e.info.allow_privileged_containers).collect();
    if allowed.is_empty() {
        return Choice::Fail(
            "the task asks for a privileged container, but no executor for its arch allows privileged containers".into(),
        );
    }
    allowed
        .into_iter()
        .map(|e| (active.get(&e.id).copied().unwrap_or(0), e))
        .filter(|(n, e)| e.info.active_tasks_limit == 0 || *n < e.info.active_tasks_limit)
        .min_by(|(na, a), (nb, b)| (na, &a.id).cmp(&(nb, &b.id)))
        .map_or(Choice::Wait, |(_, e)| Choice::Executor(e.id.clone()))
}

/// The run task status an executor task's phase stands for.
fn task_status(phase: Phase) -> TaskStatus {
    match phase {
        Phase::Notstarted => TaskStatus::Notstarted,
        Phase::Running => TaskStatus::Running,
        Phase::Cancelled => TaskStatus::Cancelled,
        Phase::Stopped => TaskStatus::Stopped,
        Phase::Success => TaskStatus::Success,
        Phase::Failed => TaskStatus::Failed,
    }
}

/// Whether [`copy_status`] would change `rt`: field by field as it copies them.
fn copy_changes(rt: &RunTask, s: &ExecutorTaskStatus) -> bool {
    let error = match (&s.error, &s.setup_error) {
        (Some(e), _) => rt.error.as_ref() != Some(e),
        (None, Some(e)) => rt.error.as_deref().and_then(|r| r.strip_prefix("setup failed: ")) != Some(e),
        (None, None) => false,
    };
    rt.status != task_status(s.phase)
        || rt.setup_step != s.setup_step
        || (s.steps.len() == rt.steps.len() && rt.steps != s.steps)
        || rt.start_time != s.start_time
        || rt.end_time != s.end_time
        || error
}

/// Copies what the executor reported into the run task.
fn copy_status(rt: &mut RunTask, s: &ExecutorTaskStatus) {
    rt.status = task_status(s.phase);
    rt.setup_step = s.setup_step.clone();
    if s.steps.len() == rt.steps.len() {
        rt.steps = s.steps.clone();
    }
    rt.start_time = s.start_time;
    rt.end_time = s.end_time;
    if let Some(e) = &s.setup_error {
        rt.error = Some(format!("setup failed: {e}"));
    }
    if let Some(e) = &s.error {
        rt.error = Some(e.clone());
    }
}

/// Why a running task is past its `timeout_s` (counted from the start its executor
/// reported, plus [`TASK_TIMEOUT_GRACE_MS`] for the executor to end it itself), if it is.
fn past_timeout(rt: &RunTask, timeout_s: Option<i64>, now_ms: u64) -> Option<String> {
    let timeout_s = u64::try_from(timeout_s?).ok()?;
    let start = rt.start_time?;
    let deadline = start.saturating_add(timeout_s.saturating_mul(1000)).saturating_add(TASK_TIMEOUT_GRACE_MS);
    (now_ms > deadline).then(|| format!("timed out after {timeout_s} s"))
}

/// Records `timeout` on the setup or step that was running when a timeout ended the task.
fn mark_timeout(rt: &mut RunTask, now_ms: u64) {
    for step in std::iter::once(&mut rt.setup_step).chain(rt.steps.iter_mut()) {
        if step.end_time == Some(now_ms) && step.phase == Phase::Failed && step.reason.is_none() {
            step.reason = Some(REASON_TIMEOUT.to_string());
        }
    }
}

/// Marks a task failed for a reason outside its steps, closing whatever was running.
fn fail_task(rt: &mut RunTask, why: String, now_ms: u64) {
    rt.status = TaskStatus::Failed;
    rt.error = Some(why);
    rt.end_time = Some(now_ms);
    for step in std::iter::once(&mut rt.setup_step).chain(rt.steps.iter_mut()) {
        if step.phase == Phase::Running {
            step.phase = Phase::Failed;
            step.end_time = Some(now_ms);
        }
    }
}

/// One scheduler round as the loop makes it (a run whose fingerprint is the one it had
/// when it was last left unchanged is skipped), for the property tests of this module and
/// of `group.rs`: the updates to apply. Checks that the skipping is sound: a skipped run
/// really had nothing to do (else a waiting run could starve).
#[cfg(test)]
pub(crate) fn checked_round(state: &State, now: u64, settled: &mut BTreeMap<String, u64>) -> Vec<RunPatch> {
    let settings = Settings::default();
    let mut active = active_counts(state);
    let executors = executors_fingerprint(state, &active, now, &settings);
    let mut updates = Vec::new();
    let mut now_settled = BTreeMap::new();
    for id in state.active_runs.iter() {
        let fingerprint = run_fingerprint(state, id, executors).expect("an active run exists");
        let decided = decide_run(state, id, now, &settings, &mut active);
        if settled.get(id) == Some(&fingerprint) {
            assert!(decided.is_none(), "run {id} was skipped by its fingerprint but had work: {decided:?}");
        }
        match decided {
            Some(u) => updates.push(u),
            None => {
                now_settled.insert(id.clone(), fingerprint);
            }
        }
    }
    *settled = now_settled;
    updates
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_store::executor::ExecutorInfo;
    use flotilla_store::run::{Condition, Depend, RunCreate};
    use flotilla_store::{Command, Response};
    use proptest::prelude::*;

    const NOW: u64 = 1_000_000;

    fn task(name: &str, deps: Vec<Depend>) -> TaskConfig {
        let mut t = TaskConfig::new(name, "busybox", "true");
        t.depends = deps;
        t
    }

    fn dep(task: &str, conditions: &[Condition]) -> Depend {
        Depend { task: task.into(), conditions: conditions.to_vec() }
    }

    fn create(tasks: Vec<TaskConfig>) -> RunCreate {
        RunCreate::new("r", "/p", tasks)
    }

    fn executor(limit: u32, privileged: bool) -> ExecutorInfo {
        ExecutorInfo {
            archs: vec!["amd64".into()],
            allow_privileged_containers: privileged,
            active_tasks_limit: limit,
            ..ExecutorInfo::default()
        }
    }

    /// A cluster in one `State`: the log index counts up with every command.
    struct Sim {
        state: State,
        index: u64,
        assignments: BTreeMap<String, usize>,
        /// Fingerprints of the runs the last round left unchanged (as the loop keeps them).
        settled: BTreeMap<String, u64>,
    }

    impl Sim {
        fn new() -> Sim {
            Sim { state: State::default(), index: 0, assignments: BTreeMap::new(), settled: BTreeMap::new() }
        }
        fn apply(&mut self, cmd: Command) -> Response {
            self.index += 1;
            let r = self.state.apply(self.index, &cmd);
            crate::check_kept_counts(&self.state);
            r
        }
        fn apply_update(&mut self, u: RunPatch) -> Response {
            self.index += 1;
            crate::apply_as_proposed(&mut self.state, self.index, u)
        }
        fn create(&mut self, c: RunCreate) -> String {
            match self.apply(Command::CreateRun { create: Box::new(c), now_ms: NOW }) {
                Response::RunCreated { run_id } => run_id,
                other => panic!("{other:?}"),
            }
        }
        /// One scheduler round over every active run; true if anything was written. Checks
        /// that the loop's skipping is sound: a run whose fingerprint is the one it had when
        /// it was last left unchanged is left unchanged again.
        fn round(&mut self) -> bool {
            let updates = checked_round(&self.state, NOW, &mut self.settled);
            let any = !updates.is_empty();
            for u in updates {
                for s in &u.create_tasks {
                    *self.assignments.entry(s.task_name.clone()).or_insert(0) += 1;
                }
                let r = self.apply_update(u);
                assert!(matches!(r, Response::Done { .. }), "{r:?}");
            }
            any
        }
        /// The executor side: every task it holds reports `outcome(task)` (or stopped).
        fn executors_report(&mut self, outcome: &dyn Fn(&str) -> Phase) -> bool {
            let tasks: Vec<ExecutorTask> =
                self.state.executor_tasks.values().filter(|t| !t.status.phase.is_final()).cloned().collect();
            for et in &tasks {
                let mut status = et.status.clone();
                status.phase = if et.spec.stop { Phase::Stopped } else { outcome(&et.spec.task_name) };
                status.start_time = Some(NOW);
                status.end_time = Some(NOW);
                let id = et.id.clone();
                let r = self.apply(Command::SetExecutorTaskStatus {
                    id,
                    executor_id: et.spec.executor_id.clone(),
                    status,
                });
                assert!(matches!(r, Response::Done { .. }), "{r:?}");
            }
            !tasks.is_empty()
        }
        fn settle(&mut self, outcome: &dyn Fn(&str) -> Phase) {
            for _ in 0..10_000 {
                let a = self.round();
                let b = self.executors_report(outcome);
                if !a && !b {
                    return;
                }
            }
            panic!("the scheduler never settled");
        }
        fn status(&self, run: &str, task: &str) -> TaskStatus {
            self.state.runs[run].tasks[task].status
        }
    }

    #[test]
    fn fingerprint_moves_with_every_input_of_a_decision() {
        let mut sim = Sim::new();
        let run = sim.create(create(vec![task("a", vec![]), task("b", vec![dep("a", &[])])]));
        let fp = |sim: &Sim| {
            let active = active_counts(&sim.state);
            let executors = executors_fingerprint(&sim.state, &active, NOW, &Settings::default());
            run_fingerprint(&sim.state, &run, executors).unwrap()
        };
        let f0 = fp(&sim);
        assert_eq!(f0, fp(&sim), "same state, same fingerprint");
        sim.round(); // queued -> running, nothing to run on
        let f1 = fp(&sim);
        assert_ne!(f0, f1, "the run changed");
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(0, false), now_ms: NOW });
        let f2 = fp(&sim);
        assert_ne!(f1, f2, "an executor came");
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(0, false), now_ms: NOW + 1 });
        assert_eq!(f2, fp(&sim), "a heartbeat alone changes nothing a decision reads");
        assert!(sim.round(), "a is handed out");
        let f3 = fp(&sim);
        sim.round();
        assert_eq!(f3, fp(&sim), "nothing to do while a runs");
        sim.executors_report(&|_| Phase::Running);
        assert_ne!(f3, fp(&sim), "the executor reported");
        let f4 = fp(&sim);
        let stale = Settings::default().executor_timeout_ms + 10;
        let active = active_counts(&sim.state);
        let later = executors_fingerprint(&sim.state, &active, NOW + stale, &Settings::default());
        assert_ne!(f4, run_fingerprint(&sim.state, &run, later).unwrap(), "the executor went stale");
    }

    fn outcome_fails(failing: &'static [&'static str]) -> impl Fn(&str) -> Phase {
        move |t| if failing.contains(&t) { Phase::Failed } else { Phase::Success }
    }

    #[test]
    fn failed_parent_runs_on_failure_children_and_skips_on_success_ones() {
        let mut sim = Sim::new();
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(0, false), now_ms: NOW });
        let run = sim.create(create(vec![
            task("a", vec![]),
            task("b", vec![dep("a", &[])]),
            task("c", vec![dep("a", &[])]),
            task("on_fail", vec![dep("b", &[Condition::OnFailure])]),
            task("after_b", vec![dep("b", &[Condition::OnSuccess])]),
            task("on_skip", vec![dep("after_b", &[Condition::OnSkipped])]),
            task("join", vec![dep("b", &[]), dep("c", &[])]),
        ]));
        sim.settle(&outcome_fails(&["b"]));
        let expect = [
            ("a", TaskStatus::Success),
            ("b", TaskStatus::Failed),
            ("c", TaskStatus::Success),
            ("on_fail", TaskStatus::Success),
            ("after_b", TaskStatus::Skipped),
            ("on_skip", TaskStatus::Success),
            ("join", TaskStatus::Skipped),
        ];
        for (t, s) in expect {
            assert_eq!(sim.status(&run, t), s, "task {t}");
        }
        let r = &sim.state.runs[&run];
        assert_eq!((r.phase, r.result), (RunPhase::Finished, RunResult::Failed));
        assert!(sim.state.executor_tasks.is_empty(), "executor tasks are deleted once reported");
        assert!(sim.assignments.values().all(|n| *n == 1));
    }

    #[test]
    fn approval_waits_for_enough_approvers_while_other_tasks_go_on() {
        let mut sim = Sim::new();
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(0, false), now_ms: NOW });
        let mut gated = task("deploy", vec![]);
        gated.needs_approval = true;
        gated.approvers_required = 2;
        let run = sim.create(create(vec![gated, task("test", vec![])]));
        sim.settle(&outcome_fails(&[]));
        assert_eq!(sim.status(&run, "test"), TaskStatus::Success);
        assert!(sim.state.runs[&run].tasks["deploy"].waiting_approval);
        assert_eq!(sim.status(&run, "deploy"), TaskStatus::Notstarted);
        let approve = |who: &str| Command::SetTaskAnnotations {
            run_id: run.clone(),
            task: "deploy".into(),
            annotations: [(format!("approver/{who}"), Some("yes".to_string()))].into(),
        };
        sim.apply(approve("alice"));
        sim.settle(&outcome_fails(&[]));
        assert_eq!(sim.status(&run, "deploy"), TaskStatus::Notstarted);
        sim.apply(approve("bob"));
        sim.settle(&outcome_fails(&[]));
        assert_eq!(sim.status(&run, "deploy"), TaskStatus::Success);
        assert!(sim.state.runs[&run].tasks["deploy"].approved);
        assert_eq!(sim.state.runs[&run].result, RunResult::Success);
    }

    #[test]
    fn executor_limit_is_never_exceeded_and_privileged_tasks_need_permission() {
        let mut sim = Sim::new();
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(2, false), now_ms: NOW });
        let mut p = task("priv", vec![]);
        p.privileged = true;
        let run = sim.create(create(vec![task("a", vec![]), task("b", vec![]), task("c", vec![]), p]));
        sim.round();
        assert_eq!(sim.state.executor_tasks.len(), 2, "limit 2");
        let r = &sim.state.runs[&run].tasks["priv"];
        assert_eq!(r.status, TaskStatus::Failed);
        assert!(r.error.as_deref().unwrap().contains("privileged"));
        sim.settle(&outcome_fails(&[]));
        assert_eq!(sim.status(&run, "c"), TaskStatus::Success);
    }

    #[test]
    fn tasks_of_a_deleted_executor_fail_with_end_times() {
        let mut sim = Sim::new();
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(0, false), now_ms: NOW });
        let run = sim.create(create(vec![task("a", vec![]), task("b", vec![dep("a", &[])])]));
        sim.round();
        let et = sim.state.executor_tasks.values().next().unwrap().clone();
        let mut status = et.status.clone();
        status.phase = Phase::Running;
        status.steps[0].phase = Phase::Running;
        status.steps[0].start_time = Some(NOW - 5);
        sim.apply(Command::SetExecutorTaskStatus { id: et.id.clone(), executor_id: "e1".into(), status });
        sim.round();
        assert_eq!(sim.status(&run, "a"), TaskStatus::Running);
        sim.apply(Command::DeleteExecutor { id: "e1".into(), if_last_seen: None });
        sim.settle(&outcome_fails(&[]));
        let a = &sim.state.runs[&run].tasks["a"];
        assert_eq!(a.status, TaskStatus::Failed);
        assert_eq!(a.end_time, Some(NOW));
        assert_eq!((a.steps[0].phase, a.steps[0].end_time), (Phase::Failed, Some(NOW)));
        assert_eq!(sim.status(&run, "b"), TaskStatus::Skipped);
        assert_eq!(sim.state.runs[&run].phase, RunPhase::Finished);
    }

    #[test]
    fn stop_cancels_pending_tasks_and_stops_running_ones() {
        let mut sim = Sim::new();
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(0, false), now_ms: NOW });
        let run = sim.create(create(vec![task("a", vec![]), task("b", vec![dep("a", &[])])]));
        sim.round();
        sim.apply(Command::StopRun { run_id: run.clone() });
        sim.settle(&outcome_fails(&[]));
        let r = &sim.state.runs[&run];
        assert_eq!((r.phase, r.result), (RunPhase::Finished, RunResult::Stopped));
        assert_eq!(r.tasks["a"].status, TaskStatus::Stopped);
        assert_eq!(r.tasks["b"].status, TaskStatus::Cancelled);
    }

    #[test]
    fn a_skipped_task_is_created_skipped_and_runs_its_on_skipped_children() {
        let mut sim = Sim::new();
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(0, false), now_ms: NOW });
        let mut skipped = task("lint", vec![]);
        skipped.skip = true;
        let run = sim.create(create(vec![
            skipped,
            task("after", vec![dep("lint", &[])]),
            task("cleanup", vec![dep("lint", &[Condition::OnSkipped])]),
        ]));
        assert_eq!(sim.status(&run, "lint"), TaskStatus::Skipped, "skipped from creation on");
        sim.settle(&outcome_fails(&[]));
        assert_eq!(sim.status(&run, "lint"), TaskStatus::Skipped);
        assert_eq!(sim.status(&run, "after"), TaskStatus::Skipped);
        assert_eq!(sim.status(&run, "cleanup"), TaskStatus::Success);
        assert_eq!(sim.assignments.get("lint"), None, "a skipped task never reaches an executor");
        assert_eq!(sim.state.runs[&run].result, RunResult::Success);
    }

    #[test]
    fn an_ignored_failure_stays_failed_for_children_but_not_for_the_run_result() {
        let mut sim = Sim::new();
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(0, false), now_ms: NOW });
        let mut flaky = task("flaky", vec![]);
        flaky.ignore_failure = true;
        let run = sim.create(create(vec![
            flaky,
            task("needs_success", vec![dep("flaky", &[])]),
            task("on_failure", vec![dep("flaky", &[Condition::OnFailure])]),
        ]));
        sim.settle(&outcome_fails(&["flaky"]));
        assert_eq!(sim.status(&run, "flaky"), TaskStatus::Failed);
        assert_eq!(sim.status(&run, "needs_success"), TaskStatus::Skipped);
        assert_eq!(sim.status(&run, "on_failure"), TaskStatus::Success);
        let r = &sim.state.runs[&run];
        assert_eq!((r.phase, r.result), (RunPhase::Finished, RunResult::Success));

        // The same failure without ignore_failure fails the run.
        let mut sim = Sim::new();
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(0, false), now_ms: NOW });
        let run = sim.create(create(vec![task("flaky", vec![])]));
        sim.settle(&outcome_fails(&["flaky"]));
        assert_eq!(sim.state.runs[&run].result, RunResult::Failed);
    }

    #[test]
    fn a_report_is_copied_only_when_copying_changes_the_task() {
        let mut sim = Sim::new();
        let run = sim.create(create(vec![task("t", vec![])]));
        let stored = sim.state.runs[&run].tasks["t"].clone();
        let base = ExecutorTaskStatus::new(stored.steps.len());
        let mut copied = stored.clone();
        copy_status(&mut copied, &base);
        let step = |phase| flotilla_store::run::StepStatus { phase, ..Default::default() };
        type Change = Box<dyn Fn(&mut ExecutorTaskStatus)>;
        let changes: Vec<Change> = vec![
            Box::new(|_| {}),
            Box::new(|s| s.phase = Phase::Running),
            Box::new(move |s| s.setup_step = step(Phase::Running)),
            Box::new(move |s| s.steps[0] = step(Phase::Failed)),
            Box::new(move |s| s.steps.push(step(Phase::Failed))), // another length: not copied
            Box::new(|s| s.start_time = Some(5)),
            Box::new(|s| s.end_time = Some(6)),
            Box::new(|s| s.error = Some("boom".into())),
            Box::new(|s| s.setup_error = Some("no image".into())),
            Box::new(|s| {
                s.setup_error = Some("no image".into());
                s.error = Some("boom".into());
            }),
        ];
        for rt in [stored.clone(), copied] {
            for error in [None, Some("boom"), Some("setup failed: no image"), Some("other")] {
                let rt = RunTask { error: error.map(String::from), ..rt.clone() };
                for (i, change) in changes.iter().enumerate() {
                    let mut s = base.clone();
                    change(&mut s);
                    let mut after = rt.clone();
                    copy_status(&mut after, &s);
                    assert_eq!(
                        copy_changes(&rt, &s),
                        after != rt,
                        "change {i} on a task with error {error:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_scheduler_fails_a_task_its_executor_did_not_end_after_its_timeout() {
        let mut sim = Sim::new();
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(0, false), now_ms: NOW });
        let mut slow = task("slow", vec![]);
        slow.timeout_s = Some(3);
        let run = sim.create(create(vec![slow, task("next", vec![dep("slow", &[Condition::OnFailure])])]));
        sim.round();
        let et = sim.state.executor_tasks.values().next().unwrap().clone();
        let mut status = et.status.clone();
        status.phase = Phase::Running;
        status.start_time = Some(NOW);
        status.steps[0].phase = Phase::Running;
        status.steps[0].start_time = Some(NOW);
        sim.apply(Command::SetExecutorTaskStatus { id: et.id.clone(), executor_id: "e1".into(), status });
        // Within the timeout and its grace: nothing happens (the executor's to end it).
        let settings = Settings::default();
        let mut active = active_counts(&sim.state);
        let just_in = NOW + 3_000 + TASK_TIMEOUT_GRACE_MS;
        let u = decide_run(&sim.state, &run, just_in, &settings, &mut active).expect("status copied");
        assert_eq!(u.tasks["slow"].status, TaskStatus::Running);
        assert!(u.delete_tasks.is_empty());
        // Past it: failed in the run, its executor task dropped (the executor stops it).
        let late = just_in + 1;
        let u = decide_run(&sim.state, &run, late, &settings, &mut active).expect("a decision");
        let slow = &u.tasks["slow"];
        assert_eq!(slow.status, TaskStatus::Failed);
        assert_eq!(slow.error.as_deref(), Some("timed out after 3 s"));
        assert_eq!(slow.steps[0].phase, Phase::Failed);
        assert_eq!(slow.steps[0].reason.as_deref(), Some(REASON_TIMEOUT));
        assert_eq!(u.delete_tasks, vec![et.id.clone()]);
        let r = sim.apply(Command::PatchRun(Box::new(u)));
        assert!(matches!(r, Response::Done { .. }), "{r:?}");
        sim.settle(&outcome_fails(&[]));
        assert_eq!(sim.status(&run, "slow"), TaskStatus::Failed);
        assert_eq!(sim.status(&run, "next"), TaskStatus::Success);
    }

    /// A random DAG: task i may depend on any earlier task, with random conditions.
    fn dag_strategy() -> impl Strategy<Value = (Vec<TaskConfig>, Vec<bool>)> {
        (1usize..14).prop_flat_map(|n| {
            let deps =
                prop::collection::vec(prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..3), n);
            let fails = prop::collection::vec(any::<bool>(), n);
            (deps, fails).prop_map(move |(deps, fails)| {
                let tasks = deps
                    .into_iter()
                    .enumerate()
                    .map(|(i, ds)| {
                        let mut parents: Vec<Depend> = Vec::new();
                        if i > 0 {
                            for (idx, mask) in ds {
                                let p = format!("t{}", idx.index(i));
                                if parents.iter().any(|d| d.task == p) {
                                    continue;
                                }
                                let all = [Condition::OnSuccess, Condition::OnFailure, Condition::OnSkipped];
                                let conds = all
                                    .iter()
                                    .enumerate()
                                    .filter(|(b, _)| mask & (1 << b) != 0)
                                    .map(|(_, c)| *c)
                                    .collect::<Vec<_>>();
                                parents.push(dep(&p, &conds));
                            }
                        }
                        task(&format!("t{i}"), parents)
                    })
                    .collect();
                (tasks, fails)
            })
        })
    }

    fn simulate(tasks: &[TaskConfig], fails: &[bool]) -> Sim {
        let mut sim = Sim::new();
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(3, false), now_ms: NOW });
        sim.apply(Command::PutExecutor { id: "e2".into(), info: executor(1, false), now_ms: NOW });
        sim.create(create(tasks.to_vec()));
        let failing: BTreeSet<String> =
            fails.iter().enumerate().filter(|(_, f)| **f).map(|(i, _)| format!("t{i}")).collect();
        sim.settle(&|t: &str| if failing.contains(t) { Phase::Failed } else { Phase::Success });
        sim
    }

    proptest! {
        /// Any DAG with any outcomes ends finished, with every task final, each task run
        /// at most once and only when its dependencies allowed it.
        #[test]
        fn random_dags_always_finish_with_every_task_final((tasks, fails) in dag_strategy()) {
            let sim = simulate(&tasks, &fails);
            let run = sim.state.runs.values().next().unwrap();
            prop_assert_eq!(run.phase, RunPhase::Finished);
            prop_assert!(sim.state.executor_tasks.is_empty());
            for t in &tasks {
                let rt = &run.tasks[&t.name];
                prop_assert!(rt.status.is_final());
                let ran = matches!(rt.status, TaskStatus::Success | TaskStatus::Failed);
                prop_assert_eq!(sim.assignments.get(&t.name).copied().unwrap_or(0), usize::from(ran));
                let allowed = t.depends.iter().all(|d| d.satisfied_by(run.tasks[&d.task].status));
                prop_assert_eq!(ran, allowed, "task {} ran={} allowed={}", t.name, ran, allowed);
            }
            let any_failed = run.tasks.values().any(|t| t.status == TaskStatus::Failed);
            prop_assert_eq!(run.result, if any_failed { RunResult::Failed } else { RunResult::Success });
        }

        /// The same input always gives the same states, step by step.
        #[test]
        fn decisions_are_deterministic((tasks, fails) in dag_strategy()) {
            let a = simulate(&tasks, &fails);
            let b = simulate(&tasks, &fails);
            prop_assert_eq!(a.state, b.state);
            prop_assert_eq!(a.index, b.index);
        }
    }
}
