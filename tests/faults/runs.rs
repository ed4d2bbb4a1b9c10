//! The run workload beside the key/value one: runs submitted through random nodes, driven
//! by simulated executors speaking the executor HTTP API (as the scheduler benchmark
//! does; no Docker), each moving to another node when its node stops answering.
//!
//! Checked at the end: every run whose creation was acknowledged exists and reached a
//! final phase after the heal; no executor task was started by two executors, and no task
//! whose running or success report was acknowledged was later handed out as not started
//! (that would be a lost acknowledged write or a task executed twice); every task handed
//! out names the leader and term whose scheduler decided it, and no term has two deciding
//! nodes (a stale leader's decision would show up as a second node in a term, or as a task
//! without a decider).

#[path = "../common/sim_executor.rs"]
mod sim_executor;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_api::types::ExecutorInfo;
use flotilla_store::executor::Decider;
use flotilla_store::run::Phase;

use crate::nodes::{url, TOKEN};
use crate::Rng;
use sim_executor::status;

#[derive(Default)]
pub struct RunLog {
    /// Runs whose creation answered 201.
    pub acked: Vec<String>,
    /// Creations whose fate is unknown (timeout, lost connection, "may or may not").
    pub unknown: usize,
    pub failed: usize,
    /// Executor task id -> executors that started it.
    pub started: BTreeMap<String, Vec<String>>,
    /// Executor task id -> the leader that handed it out, as the executors saw it.
    pub decided_by: BTreeMap<String, Option<Decider>>,
    /// Violations seen while running.
    pub violations: Vec<String>,
}

pub type Shared = Arc<Mutex<RunLog>>;

fn create_body(n: u64) -> serde_json::Value {
    serde_json::json!({
        "name": format!("faults-{n}"),
        "group": "/faults",
        "tasks": [
            {"name": "a", "image": "flotilla-busybox:latest", "steps": [{"run": {"command": "true"}}]},
            {"name": "b", "image": "flotilla-busybox:latest", "steps": [{"run": {"command": "true"}}],
             "depends": [{"task": "a"}]}
        ]
    })
}

/// Submits a run every ~`every_ms` through a random node until `stop`.
pub async fn submitter(nodes: Vec<u64>, seed: u64, every_ms: u64, log: Shared, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_millis(crate::kv::CLIENT_TIMEOUT_MS))
        .build()
        .unwrap();
    let mut rng = Rng::new(seed);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let node = nodes[rng.below(nodes.len() as u64) as usize];
        let r = http
            .post(format!("{}/api/v1/runs", url(node)))
            .bearer_auth(TOKEN)
            .json(&create_body(n))
            .send()
            .await;
        // Read the answer first; the log is locked only in between awaits.
        let (status, body) = match r {
            Ok(resp) => {
                let status = resp.status().as_u16();
                (Some(status), resp.text().await.ok())
            }
            Err(e) if e.is_connect() => (None, None),
            Err(_) => (Some(0), None),
        };
        {
            let mut l = log.lock().unwrap();
            match (status, body) {
                (Some(201), Some(body)) => {
                    let run: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    match run["id"].as_str() {
                        Some(id) => l.acked.push(id.to_string()),
                        None => l.violations.push(format!("a 201 to a run creation carried no id: {body}")),
                    }
                }
                // A 201 whose body was lost: created, id unknown.
                (Some(201), None) => l.unknown += 1,
                (Some(503), Some(body)) if body.contains("may or may not") => l.unknown += 1,
                // Transport failure after connecting: may have been created.
                (Some(0), _) => l.unknown += 1,
                _ => l.failed += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
    }
}

/// One simulated executor: starts on `first` node, moves on when it stops answering.
pub async fn executor(id: String, nodes: Vec<u64>, first: usize, log: Shared, stop: Arc<AtomicBool>) {
    let info: ExecutorInfo = serde_json::from_value(serde_json::json!({"archs": ["amd64"]})).unwrap();
    let mut at = first;
    let client = |at: usize| flotilla_api::Client::new(&url(nodes[at % nodes.len()]), Some(TOKEN.into()));
    let mut c = client(at);
    let mut last_beat: Option<Instant> = None;
    // What this executor did with each task, and whether the server acknowledged it.
    let mut mine: BTreeMap<String, Phase> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        if last_beat.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
            match tokio::time::timeout(Duration::from_secs(5), c.executor_heartbeat(&id, &info)).await {
                Ok(Ok(())) => last_beat = Some(Instant::now()),
                _ => {
                    at += 1;
                    c = client(at);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let tasks = match tokio::time::timeout(Duration::from_secs(5), c.executor_tasks(&id, 0, 500)).await {
            Ok(Ok(t)) => t,
            _ => {
                at += 1;
                c = client(at);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        for t in tasks.tasks {
            log.lock().unwrap().decided_by.insert(t.id.clone(), t.spec.spec.decided_by);
            let next = match (mine.get(&t.id), t.status.phase) {
                (None, Phase::Notstarted) => Phase::Running,
                (Some(Phase::Running), Phase::Notstarted) | (Some(Phase::Success), Phase::Notstarted) => {
                    log.lock().unwrap().violations.push(format!(
                        "executor {id}: task {} is handed out as not started again after its {:?} report was acknowledged",
                        t.id,
                        mine[&t.id]
                    ));
                    continue;
                }
                (Some(Phase::Running), Phase::Running) => Phase::Success,
                // Our running report timed out but was applied: the task is ours and
                // running, so finish it (ignoring it left the run running for ever: the
                // liveness finding of docs/faults.md was this executor's, not the server's).
                (None, Phase::Running) => {
                    log.lock().unwrap().started.entry(t.id.clone()).or_default().push(id.clone());
                    Phase::Success
                }
                _ => continue,
            };
            if next == Phase::Running && t.spec.spec.stop {
                continue;
            }
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                c.executor_task_status(&id, &t.id, &status(&t, next)),
            )
            .await;
            if matches!(r, Ok(Ok(()))) {
                if next == Phase::Running {
                    log.lock().unwrap().started.entry(t.id.clone()).or_default().push(id.clone());
                }
                mine.insert(t.id.clone(), next);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After the heal: every acknowledged run exists and reaches a final phase within `wait`.
pub async fn final_check(nodes: &[u64], log: &Shared, wait: Duration) -> Vec<String> {
    let mut problems = log.lock().unwrap().violations.clone();
    for (task, by) in &log.lock().unwrap().started {
        if by.len() > 1 {
            problems.push(format!("task {task} was started by more than one executor: {by:?}"));
        }
    }
    problems.extend(decider_problems(&log.lock().unwrap().decided_by));
    let acked = log.lock().unwrap().acked.clone();
    let deadline = Instant::now() + wait;
    let mut i = 0;
    for id in &acked {
        loop {
            i += 1;
            let c = flotilla_api::Client::new(&url(nodes[i % nodes.len()]), Some(TOKEN.into()));
            match c.run_get(id).await {
                Ok(run) if run.phase.is_final() => break,
                Ok(run) if Instant::now() > deadline => {
                    problems.push(format!(
                        "run {id} is still {:?} {} s after the heal; tasks: {:?}",
                        run.phase,
                        wait.as_secs(),
                        run.tasks.iter().map(|(n, t)| (n.clone(), t.status)).collect::<Vec<_>>()
                    ));
                    break;
                }
                Err(e) if e.status() == Some(404) => {
                    problems.push(format!("run {id} was acknowledged (201) but does not exist: {e}"));
                    break;
                }
                Err(e) if Instant::now() > deadline => {
                    problems.push(format!("run {id} could not be read after the heal: {e}"));
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    problems
}

/// [`decider_problems`] on histories whose verdict is known: one clean, one with a task
/// handed out without its decider, one with a term where two nodes decided.
pub fn check_the_checks() -> Result<(), String> {
    let d = |term, node| Some(Decider { term, node });
    let history = |entries: &[(&str, Option<Decider>)]| -> BTreeMap<String, Option<Decider>> {
        entries.iter().map(|(t, d)| (t.to_string(), *d)).collect()
    };
    let cases = [
        (history(&[("r1.a", d(2, 1)), ("r1.b", d(2, 1)), ("r2.a", d(3, 2))]), 0),
        (history(&[("r1.a", d(2, 1)), ("r1.b", None)]), 1),
        (history(&[("r1.a", d(2, 1)), ("r2.a", d(2, 3)), ("r3.a", d(4, 3))]), 1),
    ];
    for (i, (history, expected)) in cases.iter().enumerate() {
        let found = decider_problems(history);
        if found.len() != *expected {
            return Err(format!("decider check, case {i}: {expected} problem(s) expected, found {found:?}"));
        }
    }
    Ok(())
}

/// Every handed-out task names its decider, and each term has one deciding node.
fn decider_problems(decided_by: &BTreeMap<String, Option<Decider>>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut by_term: BTreeMap<u64, BTreeMap<u64, usize>> = BTreeMap::new();
    for (task, d) in decided_by {
        match d {
            None => problems.push(format!("task {task} was handed out without the leader that decided it")),
            Some(d) => *by_term.entry(d.term).or_default().entry(d.node).or_default() += 1,
        }
    }
    for (term, nodes) in by_term {
        if nodes.len() > 1 {
            problems.push(format!(
                "term {term} has tasks decided by more than one node (node: tasks): {nodes:?}"
            ));
        }
    }
    problems
}
