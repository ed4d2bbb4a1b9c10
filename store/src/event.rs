//! Events: what changed in a run, as produced while applying a command. Every replica
//! produces the same events in the same order (they are a function of the log), which is
//! what lets any node serve the event stream.

use serde::{Deserialize, Serialize};

use crate::run::{Run, RunPhase, RunResult, TaskStatus};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A run was created or its phase or result changed.
    Run,
    /// A task's status changed.
    Task,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
        }
    }

    /// Events between two versions of a run: task changes (by task name), then the run's.
    pub fn diff(revision: u64, old: &Run, new: &Run, out: &mut Vec<Event>) {
        for (name, task) in &new.tasks {
            if old.tasks.get(name).map(|t| t.status) != Some(task.status) {
                let mut e = Event::run(revision, new);
                e.kind = EventKind::Task;
                e.task = Some(name.clone());
                e.status = Some(task.status);
                out.push(e);
            }
        }
        if old.phase != new.phase || old.result != new.result {
            out.push(Event::run(revision, new));
        }
    }
}
