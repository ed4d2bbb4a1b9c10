//! What `run get` shows a person, and `run artifacts`: getting a task's outputs out.
//!
//! `run get` prints the tasks in DAG order (by level, then as defined) with what each
//! waits for, and for a failed task the step that failed (name and exit code) and the
//! task's `error`. `run artifacts` writes a task's saved workspace into a directory (or
//! one file of it, or the tar itself to stdout with `-o -`).

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use flotilla_api::tasks::{RunOutline, StepOutline};
use flotilla_api::types::Run;
use flotilla_api::Client;
use flotilla_store::run::{Phase, RunPhase, RunTask, TaskStatus};

use crate::run_cmd::word;
use crate::Failure;

/// How a person names a step: `3 (build)` for a named run step, `1 (save_to_workspace)`.
pub fn step_label(index: usize, step: Option<&StepOutline>) -> String {
    match step {
        Some(StepOutline { name: Some(n), .. }) => format!("{index} ({n})"),
        Some(s) => format!("{index} ({})", s.kind),
        None => index.to_string(),
    }
}

/// Where a task that failed or was stopped ended: the one reading of a task's records
/// that `run get` and `run wait` both print.
pub enum EndedAt {
    Setup,
    Step {
        index: usize,
        exit_code: Option<i32>,
    },
    /// Failed without a failed step (e.g. its executor went away).
    Elsewhere,
}

pub fn ended_at(t: &RunTask) -> EndedAt {
    if t.setup_step.phase == Phase::Failed {
        return EndedAt::Setup;
    }
    match t.steps.iter().position(|s| matches!(s.phase, Phase::Failed | Phase::Stopped)) {
        Some(index) => EndedAt::Step { index, exit_code: t.steps[index].exit_status },
        None => EndedAt::Elsewhere,
    }
}

/// The lines saying why `task` failed: its failing step and the task's error.
pub fn failure_lines(t: &RunTask, steps: &[StepOutline]) -> Vec<String> {
    let mut lines = Vec::new();
    if t.status != TaskStatus::Failed {
        return lines;
    }
    match ended_at(t) {
        EndedAt::Setup => lines.push("failed in setup (flotilla run logs ID TASK --step setup)".to_string()),
        EndedAt::Step { index, exit_code } => {
            let code = exit_code.map_or("no exit code".to_string(), |c| format!("exit code {c}"));
            lines.push(format!("failed at step {}: {code}", step_label(index, steps.get(index))));
        }
        EndedAt::Elsewhere => {}
    }
    if let Some(e) = &t.error {
        lines.push(format!("error: {e}"));
    }
    lines
}

pub fn print_run(r: &Run, outline: Option<&RunOutline>) {
    println!("run {}  #{}  {}  {}", r.id, r.counter, r.name, r.group);
    println!(
        "phase: {}  result: {}{}",
        word(&r.phase),
        word(&r.result),
        if r.stop { "  (stop requested)" } else { "" }
    );
    for e in &r.setup_errors {
        println!("setup error: {e}");
    }
    if r.phase == RunPhase::Setuperror && r.tasks.is_empty() {
        return;
    }
    // DAG order from the outline; a server without the route gives name order.
    let order: Vec<(String, usize, Vec<String>, Vec<StepOutline>)> = match outline {
        Some(o) => o
            .tasks
            .iter()
            .map(|t| {
                (t.name.clone(), t.level, t.depends.iter().map(|d| d.task.clone()).collect(), t.steps.clone())
            })
            .collect(),
        None => r.tasks.keys().map(|n| (n.clone(), 0, Vec::new(), Vec::new())).collect(),
    };
    println!(
        "{:<4} {:<24} {:<11} {:<10} {:<16} {:>8}  AFTER",
        "LVL", "TASK", "STATUS", "APPROVAL", "EXECUTOR", "SECONDS"
    );
    for (name, level, depends, steps) in &order {
        let Some(t) = r.tasks.get(name) else { continue };
        let approval = if t.approved {
            "approved"
        } else if t.waiting_approval {
            "waiting"
        } else {
            "-"
        };
        let secs = match (t.start_time, t.end_time) {
            (Some(s), Some(e)) => format!("{:.1}", e.saturating_sub(s) as f64 / 1000.0),
            _ => "-".into(),
        };
        let executor = t.executor_id.as_deref().unwrap_or("-");
        let after = if depends.is_empty() { "-".to_string() } else { depends.join(", ") };
        println!(
            "{:<4} {:<24} {:<11} {:<10} {:<16} {:>8}  {after}",
            level,
            name,
            word(&t.status),
            approval,
            executor,
            secs
        );
        let lines = failure_lines(t, steps);
        if lines.is_empty() {
            if let Some(e) = &t.error {
                println!("     {e}");
            }
        }
        for line in lines {
            println!("     {line}");
        }
        print_pod(t);
    }
}

/// A task's containers (when it has services) and its timeout, under its row.
fn print_pod(t: &flotilla_store::run::RunTask) {
    if t.containers.len() > 1 {
        for c in &t.containers {
            println!("     container {c}");
        }
    }
    if let Some(s) = t.timeout_s {
        println!("     timeout {s} s");
    }
}

/// `flotilla run artifacts ID TASK [-o DIR] [--path P]`.
pub async fn artifacts(
    c: &Client,
    id: &str,
    task: &str,
    output: &str,
    path: Option<&str>,
) -> Result<(), Failure> {
    let download = c.task_workspace(id, task, path).await?;
    let stream: flotilla_store::ost::ObjectStream = Box::pin(download.into_stream());
    let (output, path) = (output.to_string(), path.map(str::to_string));
    tokio::task::spawn_blocking(move || -> Result<(), Failure> {
        let input = flotilla_store::ost::tarstream::BlockingReader::new(stream);
        let mut input = std::io::BufReader::with_capacity(256 * 1024, input);
        let failed = |e: std::io::Error| Failure::Refused(format!("the workspace download failed: {e}"));
        if output == "-" {
            let mut out = std::io::stdout().lock();
            std::io::copy(&mut input, &mut out).map_err(failed)?;
            return out.flush().map_err(failed);
        }
        let dir = PathBuf::from(&output);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Failure::Refused(format!("cannot create {}: {e}", dir.display())))?;
        match path {
            Some(p) => {
                let name = Path::new(&p)
                    .file_name()
                    .ok_or_else(|| Failure::Usage(format!("--path {p:?} names no file")))?;
                let target = dir.join(name);
                let mut f = std::fs::File::create(&target)
                    .map_err(|e| Failure::Refused(format!("cannot write {}: {e}", target.display())))?;
                std::io::copy(&mut input, &mut f).map_err(failed)?;
                eprintln!("{}", target.display());
                Ok(())
            }
            None => {
                let n = unpack(input, &dir).map_err(failed)?;
                eprintln!("{n} entries written under {}", dir.display());
                Ok(())
            }
        }
    })
    .await
    .map_err(|e| Failure::Refused(format!("the workspace download failed: {e}")))?
}

/// Unpacks a workspace tar under `dir`: modes (special bits included) and mtimes kept,
/// directory times set once their contents are in; an entry that would land outside
/// `dir` is refused. Returns the number of entries.
fn unpack<R: Read>(input: R, dir: &Path) -> std::io::Result<usize> {
    let mut archive = tar::Archive::new(input);
    let mut dirs: Vec<(PathBuf, u64)> = Vec::new();
    let mut n = 0;
    for entry in archive.entries()? {
        let mut entry = entry?;
        entry.set_preserve_permissions(true);
        entry.set_preserve_mtime(true);
        let path = entry.path()?.into_owned();
        if path.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(std::io::Error::other(format!(
                "entry {} escapes the output directory",
                path.display()
            )));
        }
        if !entry.unpack_in(dir)? {
            return Err(std::io::Error::other(format!(
                "entry {} escapes the output directory",
                path.display()
            )));
        }
        if entry.header().entry_type().is_dir() {
            dirs.push((dir.join(&path), entry.header().mtime().unwrap_or(0)));
        }
        n += 1;
    }
    dirs.sort();
    for (d, mtime) in dirs.into_iter().rev() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
        if let Ok(f) = std::fs::File::open(&d) {
            let _ = f.set_modified(t);
        }
    }
    Ok(n)
}
