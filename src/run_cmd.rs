//! `flotilla run ...`: the client side of the runs API.
//!
//! A run definition (`-f`) is a YAML or JSON file, a `file:///abs/path` reference or an
//! `http(s)://` URL fetched here (Drydock's design references); it is parsed into a
//! `RunCreate` locally, so a malformed file is reported before anything is sent.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Subcommand;
use flotilla_api::client::RunQuery;
use flotilla_api::types::RunCreate;
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
        /// A service container of the task's pod: its whole output (instead of a step's).
        #[arg(long, conflicts_with = "step")]
        container: Option<String>,
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
    /// Wait until a run ends. Exit 0: it succeeded; 1: it ended unsuccessfully (failed,
    /// stopped, cancelled, setuperror; the failed tasks and steps are named) or the request
    /// was refused (unknown run, bad token); 3: --timeout-s passed or no server could be
    /// reached. Transport errors and 503 are retried against every server of --server.
    Wait {
        id: String,
        /// Give up after this many seconds with exit 3 (0: never; without it, exit 3 comes
        /// only after 60 s without any server answering).
        #[arg(long, default_value_t = 0)]
        timeout_s: u64,
    },
    /// Restart a finished (or cancelled, setuperror) run, live or archived, as a new run of
    /// the same configuration; prints the new run's id. Tasks that succeeded or were skipped
    /// are kept (their logs and workspace archives shared, not copied) unless --from-start.
    ///
    /// Example: `flotilla run restart 0000000000000042 --env DEPLOY_TARGET=staging`
    Restart {
        id: String,
        /// Run every task again.
        #[arg(long)]
        from_start: bool,
        /// Replace the run's environment with these variables (repeatable); without any,
        /// the environment stays as it was.
        #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
        env: Vec<(String, String)>,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not K=V")),
    }
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
        RunCmd::Logs { id, task, step, container, follow } => {
            use std::io::Write;
            let mut log = match container {
                Some(name) => c.run_container_log(&id, &task, &name, follow).await?,
                None => c.run_log(&id, &task, step.as_deref().unwrap_or(""), follow).await?,
            };
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
            let run = crate::wait_cmd::wait(c, &id, timeout_s).await?;
            if json {
                print_json(&run);
            } else {
                println!("run {} {}: {}", run.id, word(&run.phase), word(&run.result));
            }
            if run.result != RunResult::Success || run.phase != flotilla_store::run::RunPhase::Finished {
                crate::wait_cmd::explain_failure(&run);
                return Err(Failure::Quiet);
            }
        }
        RunCmd::Restart { id, from_start, env } => {
            let environment = (!env.is_empty()).then(|| env.into_iter().collect());
            let run = c.run_restart(&id, from_start, environment).await?;
            if json {
                print_json(&run);
            } else {
                println!("{}", run.id);
            }
        }
    }
    Ok(())
}

/// Reads and parses a run definition (YAML is a superset of JSON: one parser for both).
///
/// At most `MAX_API_BODY_BYTES + 1` bytes are read from any source (`/dev/zero`, a pipe
/// or a file whose reported size is 0 included). A parse error says where and what, never
/// a piece of the file: `-f` may point at a file that is not a run definition at all.
pub async fn load_definition(reference: &str) -> Result<RunCreate, Failure> {
    let bytes = if reference.starts_with("http://") || reference.starts_with("https://") {
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
        read_bounded(path).map_err(|e| Failure::Usage(format!("cannot read {path}: {e}")))?
    };
    if bytes.len() as u64 > MAX_API_BODY_BYTES {
        return Err(Failure::Usage(format!("{reference} is larger than {MAX_API_BODY_BYTES} bytes")));
    }
    parse_definition(&bytes)
        .map_err(|e| Failure::Usage(format!("{reference} is not a valid run definition: {e}")))
}

/// The first `MAX_API_BODY_BYTES + 1` bytes of `path` (one more than allowed, to tell a
/// file at the limit from a larger one).
fn read_bounded(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_API_BODY_BYTES + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Parses a run definition; the error names the position and the problem only.
pub fn parse_definition(bytes: &[u8]) -> Result<RunCreate, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("it is not UTF-8 text (invalid byte at offset {})", e.valid_up_to()))?;
    // Through a JSON value: serde_norway (like serde_yaml 0.9) reads enums only as YAML
    // tags (`!run`), while the contract writes a step as a one-key map (`run: {...}`).
    let value: serde_json::Value = serde_norway::from_str(text).map_err(|e| {
        let at =
            e.location().map(|l| format!(" at line {} column {}", l.line(), l.column())).unwrap_or_default();
        format!("YAML error{at}: {}", redact(&e.to_string()))
    })?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let at = describe_path(e.path());
        format!("at {at}: {}", redact(&e.inner().to_string()))
    })
}

fn describe_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(if flotilla_store::run::DEFINITION_FIELDS.contains(&key.as_str()) {
                    key
                } else {
                    "…"
                });
            }
            Segment::Unknown => out.push_str(".?"),
        }
    }
    if out.is_empty() {
        "the top level".into()
    } else {
        out
    }
}

/// A parser's message without the input it quotes. serde and libyaml quote input in
/// backticks or double quotes before `, expected …`; what follows `expected` is the
/// parser's own vocabulary (field and variant names) and stays. `missing field` and
/// `duplicate field` only ever quote a field name of the definition.
pub fn redact(message: &str) -> String {
    let (head, tail) = match message.find(", expected") {
        Some(i) => message.split_at(i),
        None => (message, ""),
    };
    if head.starts_with("missing field") || head.starts_with("duplicate field") {
        return message.to_string();
    }
    let mut out = String::with_capacity(head.len());
    let mut chars = head.chars();
    while let Some(c) = chars.next() {
        match c {
            '`' | '"' | '\'' => {
                out.push_str("(content not shown)");
                let mut escaped = false;
                for d in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' {
                        escaped = true;
                    } else if d == c {
                        break;
                    }
                }
            }
            c => out.push(c),
        }
    }
    out.push_str(tail);
    out
}

async fn fetch(url: &str) -> Result<Vec<u8>, Failure> {
    let http = flotilla_raft::tls::client_builder()
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
    Ok(body)
}

pub(crate) fn word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-hash-$6$abcdef";

    fn error_of(text: &str) -> String {
        parse_definition(text.as_bytes()).unwrap_err()
    }

    #[test]
    fn parse_errors_name_the_place_and_never_the_content() {
        let cases = [
            format!("root:{SECRET}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"),
            format!("root: {SECRET}\n"),
            format!("name: r\ntasks:\n  - name: a\n    image: i\n    {SECRET}: 1\n"),
            format!("name: r\ntasks:\n  - name: a\n    image: i\n    steps: [{{{SECRET}: {{}}}}]\n"),
            format!("name: r\ntasks:\n  - name: a\n    image: [\"{SECRET}\"]\n"),
            format!("name: r\ntasks:\n  - name: a\n    image: i\n    approvers_required: {SECRET}\n"),
            format!("name: r\nenvironment: {{{SECRET}: [1]}}\ntasks: []\n"),
            format!("{{\"name\": \"{SECRET}"),
            format!("- [\"{SECRET}\""),
            format!("name: r\n  bad: indent: {SECRET}\n"),
            format!("*{SECRET}\n"),
            format!("!{SECRET} x\n"),
        ];
        for text in cases {
            let err = error_of(&text);
            for piece in ["s3cr3t", "abcdef", "19000", "daemon"] {
                assert!(!err.contains(piece), "{text:?} -> {err}");
            }
            assert!(err.contains("at "), "{text:?} -> {err} names no position");
        }
        let err = error_of("name: r\ntasks:\n  - name: a\n    image: i\n    stepz: []\n");
        assert!(err.contains("tasks[0]") && err.contains("unknown field"), "{err}");
        let err = error_of("name: r\ntasks:\n  - image: i\n");
        assert!(err.contains("missing field `name`"), "{err}");
    }

    /// Every key of the examples is a known field, except the keys of maps whose keys
    /// are the user's (environment variables, annotations, registry hosts).
    #[test]
    fn the_examples_use_only_known_field_names() {
        fn walk(v: &serde_norway::Value, path: &str, unknown: &mut Vec<String>) {
            match v {
                serde_norway::Value::Mapping(m) => {
                    for (k, v) in m {
                        let k = k.as_str().unwrap_or("?");
                        if !flotilla_store::run::DEFINITION_FIELDS.contains(&k) {
                            unknown.push(format!("{path}.{k}"));
                        }
                        let users =
                            ["environment", "static_environment", "annotations", "docker_registries_auth"];
                        if users.contains(&k) {
                            for inner in v.as_mapping().into_iter().flat_map(|m| m.values()) {
                                walk(inner, &format!("{path}.{k}.*"), unknown);
                            }
                        } else {
                            walk(v, &format!("{path}.{k}"), unknown);
                        }
                    }
                }
                serde_norway::Value::Sequence(s) => s.iter().for_each(|v| walk(v, path, unknown)),
                _ => {}
            }
        }
        for name in ["build.yaml", "pipeline.yaml", "pod.yaml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name);
            let v: serde_norway::Value =
                serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            let mut unknown = Vec::new();
            walk(&v, name, &mut unknown);
            assert!(unknown.is_empty(), "not in DEFINITION_FIELDS: {unknown:?}");
        }
    }

    #[test]
    fn a_valid_definition_still_parses() {
        let text = "name: r\ntasks:\n  - name: a\n    image: i\n    steps:\n      - run: {command: make}\n";
        assert_eq!(parse_definition(text.as_bytes()).unwrap().tasks[0].name, "a");
    }
}
