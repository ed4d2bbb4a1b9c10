//! What a simulated executor (HTTP only, no Docker) reports for a task, shared by the
//! scheduler benchmark and the fault harness (each includes this file with `#[path]`).

use flotilla_api::types::{ExecutorTaskStatus, ExecutorTaskView};
use flotilla_store::run::Phase;

/// `t`'s status with the task and every step at `phase`, the setup step done.
pub fn status(t: &ExecutorTaskView, phase: Phase) -> ExecutorTaskStatus {
    let mut s = t.status.clone();
    s.phase = phase;
    s.setup_step.phase = Phase::Success;
    for step in &mut s.steps {
        step.phase = phase;
    }
    s
}
