//! Events: what changed in a run, as produced while applying a command. Every replica
//! produces the same events in the same order (they are a function of the log), which is
//! what lets any node serve the event stream.

use serde::{Deserialize, Serialize};

use crate::run::{Run, RunPhase, RunResult, TaskStatus};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A run was created or its phase or result changed.
    Run,
    /// A task's status changed.
    Task,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// Log index of the change; several events may share one.
    pub revision: u64,
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub run_id: String,
    pub group: String,
    pub phase: RunPhase,
    pub result: RunResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TaskStatus>,
    /// What happened to the run besides a phase or result change (type `run` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<RunAction>,
    /// Who did it, where known (the archiver; a token's name once named tokens exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// With `restarted`: the run this one was restarted from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_from: Option<String>,
}

/// Lifecycle actions reported as `run` events with an `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RunAction {
    /// The run moved from the replicated state to the archive in the object storage.
    Archived,
    /// The run was created by restarting `restarted_from`.
    Restarted,
    /// The run came in with an import.
    Imported,
    /// An approval of the event's `task` was recorded by `actor` (the task is approved once
    /// enough distinct approvers are recorded; its `task` event says so).
    Approved,
}

impl Event {
    pub fn run(revision: u64, run: &Run) -> Event {
        Event {
            revision,
            kind: EventKind::Run,
            run_id: run.id.clone(),
            group: run.group.clone(),
            phase: run.phase,
            result: run.result,
            task: None,
            status: None,
            action: None,
            actor: None,
            restarted_from: None,
        }
    }

    /// A `task` event: the status `run`'s task `name` has now.
    pub fn task(revision: u64, run: &Run, name: &str) -> Event {
        let mut e = Event::run(revision, run);
        e.kind = EventKind::Task;
        e.task = Some(name.to_string());
        e.status = run.tasks.get(name).map(|t| t.status);
        e
    }

    /// A `run` event for a lifecycle action on `run`.
    pub fn action(revision: u64, run: &Run, action: RunAction, actor: Option<&str>) -> Event {
        let mut e = Event::run(revision, run);
        e.action = Some(action);
        e.actor = actor.map(str::to_string);
        if action == RunAction::Restarted {
            e.restarted_from = run.restarted_from.clone();
        }
        e
    }

    /// Events between two versions of a run: task changes (by task name), then the run's.
    pub fn diff(revision: u64, old: &Run, new: &Run, out: &mut Vec<Event>) {
        for (name, task) in &new.tasks {
            if old.tasks.get(name).map(|t| t.status) != Some(task.status) {
                out.push(Event::task(revision, new, name));
            }
        }
        if old.phase != new.phase || old.result != new.result {
            out.push(Event::run(revision, new));
        }
    }
}
