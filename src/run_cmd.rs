//! `flotilla run ...`: the client side of the runs API.
//!
//! A run definition (`-f`) is a YAML or JSON file, a `file:///abs/path` reference or an
//! `http(s)://` URL fetched here (Drydock's design references); it is parsed into a
//! `RunCreate` locally, so a malformed file is reported before anything is sent.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Subcommand;
use flotilla_api::client::RunQuery;
use flotilla_api::types::{Run, RunCreate};
use flotilla_api::Client;
use flotilla_store::limits::MAX_API_BODY_BYTES;
use flotilla_store::run::{RunResult, APPROVER_PREFIX};

use crate::{print_json, Failure};

#[derive(Subcommand)]
pub enum RunCmd {
    /// Create a run from a YAML/JSON definition: a path, file:///abs/path or http(s):// URL.
    Create {
        #[arg(short = 'f', long = "file")]
        file: String,
    },
    /// List runs, newest first.
    List {
        /// Only runs of this group or below it.
        #[arg(long)]
        group: Option<String>,
        /// Only runs in this phase (setuperror, queued, cancelled, running, finished).
        #[arg(long)]
        phase: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Continue after this run id.
        #[arg(long)]
        start: Option<String>,
        /// Oldest first.
        #[arg(long)]
        asc: bool,
    },
    /// Show a run and its tasks.
    Get { id: String },
    /// Stop a run: running tasks are stopped, pending ones cancelled.
    Stop { id: String },
    /// Delete a finished run (live or archived); its logs and archives go once no run
    /// references them.
    Delete { id: String },
    /// Record an approval of a task; the scheduler approves it once enough approvers did.
    Approve {
        id: String,
        task: String,
        /// Who approves (default: $USER).
        #[arg(long, env = "USER", default_value = "cli")]
        approver: String,
        /// Approve at once, whatever the number of approvers.
        #[arg(long)]
        force: bool,
    },
    /// Print a step's log (`--step setup` for the container setup); with --follow, stream
    /// it while the step runs.
    Logs {
        id: String,
        task: String,
        /// Step: a number (from 0, in the task's steps order), `setup`, or a `run` step's
        /// name. Default: the failing step of a failed task, else the first `run` step.
        #[arg(long)]
        step: Option<String>,
        #[arg(long)]
        follow: bool,
    },
    /// Write a task's saved workspace (what its save_to_workspace steps stored) into a
    /// directory, or one file of it with --path; `-o -` writes the tar (or the file) to stdout.
    Artifacts {
        id: String,
        task: String,
        /// Output directory (created if missing), or `-` for stdout.
        #[arg(short = 'o', long = "output", default_value = ".")]
        output: String,
        /// One file of the workspace (as saved, e.g. `pkg/app.tar.gz`), written as
        /// DIR/<its file name>.
        #[arg(long)]
        path: Option<String>,
    },
    /// Wait until a run ends; exit 0 if it succeeded, 1 otherwise.
    Wait {
        id: String,
        /// Give up after this many seconds (0: never).
        #[arg(long, default_value_t = 0)]
        timeout_s: u64,
    },
}

pub async fn run(c: &Client, json: bool, cmd: RunCmd) -> Result<(), Failure> {
    match cmd {
        RunCmd::Create { file } => {
            let create = load_definition(&file).await?;
            let run = c.run_create(&create).await?;
            if json {
                print_json(&run);
            } else {
                println!("{}", run.id);
            }
        }
        RunCmd::List { group, phase, limit, start, asc } => {
            let list = c.run_list(&RunQuery { group, phase, start, limit, asc }).await?;
            if json {
                print_json(&list);
            } else {
                println!(
                    "{:<16} {:<8} {:<10} {:<8} {:<24} NAME",
                    "ID", "COUNTER", "PHASE", "RESULT", "GROUP"
                );
                for r in &list.runs {
                    println!(
                        "{:<16} {:<8} {:<10} {:<8} {:<24} {}",
                        r.id,
                        r.counter,
                        word(&r.phase),
                        word(&r.result),
                        r.group,
                        r.name
                    );
                }
                if list.more {
                    eprintln!(
                        "(more runs; continue with --start {})",
                        list.runs.last().map_or("", |r| r.id.as_str())
                    );
                }
            }
        }
        RunCmd::Get { id } => {
            let run = c.run_get(&id).await?;
            if json {
                print_json(&run);
            } else {
                // The DAG order and step names; an older server lacks the route.
                let outline = c.run_outline(&id).await.ok();
                crate::run_view::print_run(&run, outline.as_ref());
            }
        }
        RunCmd::Stop { id } => c.run_stop(&id).await?,
        RunCmd::Approve { id, task, approver, force } => {
            if force {
                c.task_approve(&id, &task).await?;
            } else {
                let key = format!("{APPROVER_PREFIX}{approver}");
                c.task_annotate(&id, &task, BTreeMap::from([(key, Some("approved".to_string()))])).await?;
            }
        }
        RunCmd::Delete { id } => {
            c.run_delete(&id).await?;
            eprintln!("run {id} deleted");
        }
        RunCmd::Logs { id, task, step, follow } => {
            use std::io::Write;
            let mut log = c.run_log(&id, &task, step.as_deref().unwrap_or(""), follow).await?;
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = log.chunk().await? {
                // A closed stdout (e.g. `| head`) ends the command quietly.
                if out.write_all(&chunk).and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
        }
        RunCmd::Artifacts { id, task, output, path } => {
            crate::run_view::artifacts(c, &id, &task, &output, path.as_deref()).await?
        }
        RunCmd::Wait { id, timeout_s } => {
            let run = wait(c, &id, timeout_s).await?;
            if json {
                print_json(&run);
            } else {
                println!("run {} {}: {}", run.id, word(&run.phase), word(&run.result));
                // Which task failed, at which step, and why.
                let outline = c.run_outline(&run.id).await.ok();
                for (name, t) in &run.tasks {
                    let steps = outline
                        .as_ref()
                        .and_then(|o| o.tasks.iter().find(|x| &x.name == name))
                        .map_or(&[][..], |x| &x.steps[..]);
                    for line in crate::run_view::failure_lines(t, steps) {
                        println!("task {name}: {line}");
                    }
                }
            }
            if run.result != RunResult::Success {
                return Err(Failure::Quiet);
            }
        }
    }
    Ok(())
}

/// Follows the event stream until the run is final, re-reading the run after every
/// (re)connection so nothing between two streams is missed.
async fn wait(c: &Client, id: &str, timeout_s: u64) -> Result<Run, Failure> {
    let deadline = (timeout_s > 0).then(|| Instant::now() + Duration::from_secs(timeout_s));
    let group = c.run_get(id).await?.group;
    loop {
        let remaining = match deadline {
            Some(d) => d
                .checked_duration_since(Instant::now())
                .ok_or_else(|| Failure::Refused(format!("run {id} did not end within {timeout_s} s")))?,
            None => Duration::from_secs(u64::MAX / 4),
        };
        let step = async {
            let mut events = c.events(Some(&group)).await?;
            let run = c.run_get(id).await?;
            if run.phase.is_final() {
                return Ok::<_, flotilla_api::ClientError>(Some(run));
            }
            while let Some(e) = events.next().await? {
                if e.run_id == id && e.phase.is_final() {
                    return Ok(Some(c.run_get(id).await?));
                }
            }
            Ok(None)
        };
        match tokio::time::timeout(remaining, step).await {
            Ok(Ok(Some(run))) => return Ok(run),
            Ok(Ok(None)) => {}
            Ok(Err(e)) if e.status().is_some_and(|s| s < 500) => return Err(e.into()),
            Ok(Err(e)) => eprintln!("(event stream interrupted: {e}; reconnecting)"),
            Err(_) => return Err(Failure::Refused(format!("run {id} did not end within {timeout_s} s"))),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads and parses a run definition (YAML is a superset of JSON: one parser for both).
pub async fn load_definition(reference: &str) -> Result<RunCreate, Failure> {
    let text = if reference.starts_with("http://") || reference.starts_with("https://") {
        fetch(reference).await?
    } else {
        let path = match reference.strip_prefix("file://") {
            Some(p) if p.starts_with('/') => p,
            Some(_) => {
                return Err(Failure::Usage(format!(
                    "{reference:?}: a file:// reference needs an absolute path"
                )))
            }
            None => reference,
        };
        let meta = std::fs::metadata(path).map_err(|e| Failure::Usage(format!("cannot read {path}: {e}")))?;
        if meta.len() > MAX_API_BODY_BYTES {
            return Err(Failure::Usage(format!("{path} is larger than {MAX_API_BODY_BYTES} bytes")));
        }
        std::fs::read_to_string(path).map_err(|e| Failure::Usage(format!("cannot read {path}: {e}")))?
    };
    // Through a JSON value: serde_norway (like serde_yaml 0.9) reads enums only as YAML
    // tags (`!run`), while the contract writes a step as a one-key map (`run: {...}`).
    let bad = |e: String| Failure::Usage(format!("{reference} is not a valid run definition: {e}"));
    let value: serde_json::Value = serde_norway::from_str(&text).map_err(|e| bad(e.to_string()))?;
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

async fn fetch(url: &str) -> Result<String, Failure> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| Failure::Refused(e.to_string()))?;
    let fail = |e: reqwest::Error| Failure::Refused(format!("cannot fetch {url}: {e}"));
    let mut resp = http.get(url).send().await.map_err(fail)?;
    if !resp.status().is_success() {
        return Err(Failure::Refused(format!("cannot fetch {url}: HTTP {}", resp.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(fail)? {
        body.extend_from_slice(&chunk);
        if body.len() as u64 > MAX_API_BODY_BYTES {
            return Err(Failure::Refused(format!("{url} is larger than {MAX_API_BODY_BYTES} bytes")));
        }
    }
    String::from_utf8(body).map_err(|_| Failure::Refused(format!("{url} is not UTF-8 text")))
}

fn word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}
