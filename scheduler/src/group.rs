//! Per-group admission: `max_running_in_group: N` on a run keeps it `queued` while N older
//! runs of exactly its group are running, and queued runs of a group start in `counter`
//! order (Agola starts a group's runs one at a time).
//!
//! The check is a pure function of the committed state, read by [`crate::decide::decide_run`]
//! (whether a queued run may start) and by [`crate::decide::run_fingerprint`] (so that a
//! waiting run is decided again as soon as an older run of its group ends: its own inputs
//! do not move then).
//!
//! Why "older runs are not queued" rather than "fewer than N are running": runs decided in
//! one round all read the same state, so two queued runs of a group would both see room
//! and both start. Waiting until every older run has left `queued` in the *committed*
//! state makes the bound hold whatever the order in which a round's updates apply, at
//! the price of one round (milliseconds: rounds are woken by every applied entry) per
//! run of a burst. A run without a limit is never held back, so groups that do not ask
//! for ordering pay nothing.

use flotilla_store::run::{Run, RunPhase};
use flotilla_store::State;

/// Whether queued `run`, whose configuration asks for `limit`, may start now: no older run
/// of its group is still queued (one asked to stop does not count: it is being cancelled)
/// and fewer than `limit` older ones are running.
pub fn admits(state: &State, run: &Run, limit: Option<u32>) -> bool {
    let Some(limit) = limit else { return true };
    let mut running = 0u32;
    // Ids grow with creation, as counters do within a root group: older = smaller id.
    // Nearest first, so a burst finds the run it waits behind at once.
    let older = (std::ops::Bound::Unbounded, std::ops::Bound::Excluded(run.id.as_str()));
    for id in state.active_runs.range::<str, _>(older).rev() {
        let Some(other) = state.runs.get(id) else { continue };
        if other.group != run.group {
            continue;
        }
        match other.phase {
            RunPhase::Queued if !other.stop => return false,
            RunPhase::Running => {
                running += 1;
                if running >= limit {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use flotilla_store::executor::ExecutorInfo;
    use flotilla_store::run::{Phase, RunCreate, RunResult, TaskConfig};
    use flotilla_store::{Command, Response};
    use proptest::prelude::*;

    use super::*;
    use crate::decide::checked_round;

    const NOW: u64 = 1_000_000;

    fn executor() -> ExecutorInfo {
        ExecutorInfo { archs: vec!["amd64".into()], ..ExecutorInfo::default() }
    }

    struct Sim {
        state: State,
        index: u64,
        settled: BTreeMap<String, u64>,
    }

    impl Sim {
        fn apply(&mut self, cmd: Command) -> Response {
            self.index += 1;
            let r = self.state.apply(self.index, &cmd);
            crate::check_kept_counts(&self.state);
            r
        }
        fn apply_update(&mut self, u: flotilla_store::RunPatch) -> Response {
            self.index += 1;
            crate::apply_as_proposed(&mut self.state, self.index, u)
        }

        /// One scheduler round as the loop makes it (skipping runs by fingerprint), checking
        /// that a skipped run really had nothing to do: else a waiting run could starve.
        fn round(&mut self) -> bool {
            let updates = checked_round(&self.state, NOW, &mut self.settled);
            let any = !updates.is_empty();
            for u in updates {
                let r = self.apply_update(u);
                assert!(matches!(r, Response::Done { .. }), "{r:?}");
            }
            any
        }

        /// Checks the group rules on the current state.
        fn check(&self, limits: &BTreeMap<String, u32>) -> Result<(), TestCaseError> {
            let mut by_group: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
            for r in self.state.runs.values() {
                by_group.entry(r.group.as_str()).or_default().push(r);
            }
            for (group, runs) in by_group {
                let running = runs.iter().filter(|r| r.phase == RunPhase::Running).count();
                prop_assert!(running as u32 <= limits[group], "{running} running in {group}");
                // Started runs (running or ended after a start) come before every queued one.
                for (i, r) in runs.iter().enumerate() {
                    if r.start_time.is_some() {
                        for older in &runs[..i] {
                            prop_assert!(
                                older.phase != RunPhase::Queued || older.stop,
                                "run {} started before older run {} of {group}",
                                r.id,
                                older.id
                            );
                        }
                    }
                }
            }
            Ok(())
        }
    }

    /// What happens between two rounds.
    #[derive(Clone, Debug)]
    enum Event {
        /// Every running executor task reports success (true) or failure (false).
        Report(bool),
        /// Stop the n-th run.
        Stop(usize),
        /// Executor e1 vanishes (its tasks fail) and registers again.
        Vanish,
        /// Nothing: the round alone.
        Round,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => any::<bool>().prop_map(Event::Report),
            1 => (0usize..12).prop_map(Event::Stop),
            1 => Just(Event::Vanish),
            1 => Just(Event::Round),
        ]
    }

    fn report(sim: &mut Sim, success: bool) {
        let tasks: Vec<_> =
            sim.state.executor_tasks.values().filter(|t| !t.status.phase.is_final()).cloned().collect();
        for et in tasks {
            let mut status = et.status.clone();
            status.phase = match (et.spec.stop, success) {
                (true, _) => Phase::Stopped,
                (false, true) => Phase::Success,
                (false, false) => Phase::Failed,
            };
            status.start_time = Some(NOW);
            status.end_time = Some(NOW);
            let cmd = Command::SetExecutorTaskStatus { id: et.id, executor_id: et.spec.executor_id, status };
            assert!(matches!(sim.apply(cmd), Response::Done { .. }));
        }
    }

    proptest! {
        /// Runs of two groups with limits, under random outcomes, stops and an executor
        /// vanishing: never more than the limit running in a group, never a run started
        /// before an older queued one, and every run ends (no starvation).
        #[test]
        fn groups_never_exceed_their_limit_start_in_order_and_never_starve(
            runs in prop::collection::vec((0usize..2, 1u32..4), 1..12),
            events in prop::collection::vec(event(), 0..40),
        ) {
            let mut sim = Sim { state: State::default(), index: 0, settled: BTreeMap::new() };
            sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(), now_ms: NOW });
            sim.apply(Command::PutExecutor { id: "e2".into(), info: executor(), now_ms: NOW });
            // One limit per group (the waiting run's own N decides; equal N makes the bound
            // a property of the group).
            let mut limits = BTreeMap::new();
            let mut ids = Vec::new();
            for (g, n) in &runs {
                let group = format!("/p/g{g}");
                let limit = *limits.entry(group.clone()).or_insert(*n);
                let mut c = RunCreate::new("r", &group, vec![TaskConfig::new("t", "busybox", "true")]);
                c.max_running_in_group = Some(limit);
                match sim.apply(Command::CreateRun { create: Box::new(c), now_ms: NOW }) {
                    Response::RunCreated { run_id } => ids.push(run_id),
                    other => panic!("{other:?}"),
                }
            }
            for e in events {
                sim.round();
                sim.check(&limits)?;
                match e {
                    Event::Report(ok) => report(&mut sim, ok),
                    Event::Stop(n) => {
                        let _ = sim.apply(Command::StopRun { run_id: ids[n % ids.len()].clone() });
                    }
                    Event::Vanish => {
                        sim.apply(Command::DeleteExecutor { id: "e1".into(), if_last_seen: None });
                        sim.round();
                        sim.check(&limits)?;
                        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(), now_ms: NOW });
                    }
                    Event::Round => {}
                }
                sim.check(&limits)?;
            }
            // Then let everything end: all runs finish, whatever happened before.
            for _ in 0..1000 {
                let moved = sim.round();
                sim.check(&limits)?;
                let busy = sim.state.executor_tasks.values().any(|t| !t.status.phase.is_final());
                report(&mut sim, true);
                if !moved && !busy && sim.state.active_runs.is_empty() {
                    break;
                }
            }
            for id in &ids {
                let r = &sim.state.runs[id];
                prop_assert!(r.phase.is_final(), "run {} never ended: {:?}", id, r.phase);
                prop_assert!(r.result != RunResult::Unknown);
            }
        }
    }

    #[test]
    fn a_queued_run_waits_for_older_runs_of_its_exact_group_only() {
        let mut sim = Sim { state: State::default(), index: 0, settled: BTreeMap::new() };
        sim.apply(Command::PutExecutor { id: "e1".into(), info: executor(), now_ms: NOW });
        let mut create = |group: &str, limit: Option<u32>| {
            let mut c = RunCreate::new("r", group, vec![TaskConfig::new("t", "busybox", "true")]);
            c.max_running_in_group = limit;
            match sim.apply(Command::CreateRun { create: Box::new(c), now_ms: NOW }) {
                Response::RunCreated { run_id } => run_id,
                other => panic!("{other:?}"),
            }
        };
        let a = create("/p/main", Some(1));
        let b = create("/p/main", Some(1));
        let sub = create("/p/main/sub", Some(1));
        let free = create("/p/main", None);
        for _ in 0..5 {
            sim.round();
        }
        let phase = |sim: &Sim, id: &str| sim.state.runs[id].phase;
        assert_eq!(phase(&sim, &a), RunPhase::Running);
        assert_eq!(phase(&sim, &b), RunPhase::Queued, "one at a time");
        assert_eq!(phase(&sim, &sub), RunPhase::Running, "a subgroup is another group");
        assert_eq!(phase(&sim, &free), RunPhase::Running, "a run without a limit is not held");
        report(&mut sim, false);
        for _ in 0..5 {
            sim.round();
        }
        assert_eq!(phase(&sim, &a), RunPhase::Finished);
        assert_eq!(phase(&sim, &b), RunPhase::Running, "b starts once a failed");
    }
}
