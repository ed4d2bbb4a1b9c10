//! Benchmark 2, scheduler (control plane) throughput: runs of many independent one-step tasks driven to
//! completion by simulated executors speaking the executor HTTP API (no Docker), on a
//! three-node cluster with the executors spread over all nodes; the same load on a
//! one-node cluster is the baseline, side by side in the same run. Reported: task state
//! transitions per second (each task goes notstarted → running → success through two
//! executor reports) and run completions per second.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::cpu::{self, Procs, Split};
use crate::report::Row;
use crate::sim_executor::status;
use flotilla_api::report::Reporter;
use flotilla_api::types::{ExecutorInfo, RunCreate, TaskDataFor, TaskReport};
use flotilla_api::Client;
use flotilla_store::run::{Phase, RunPhase};
use futures::StreamExt;

const EXECUTORS: usize = 8;

/// One simulated executor: long-polls its tasks and moves each to running then success.
async fn executor(
    c: Client,
    id: String,
    transitions: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let info: ExecutorInfo = serde_json::from_value(serde_json::json!({"archs": ["amd64"]})).unwrap();
    c.executor_heartbeat(&id, &info).await.unwrap();
    let reporter = {
        let (c, id) = (c.clone(), id.clone());
        Reporter::start(move |reports: Vec<TaskReport>| {
            let (c, id) = (c.clone(), id.clone());
            async move { c.executor_task_statuses(&id, &reports).await }
        })
    };
    // FLOTILLA_BENCH_REPORTS_ALONE=1: every report its own request, all at once (what
    // sending them together gains; not the benchmark's own setting).
    let alone = std::env::var_os("FLOTILLA_BENCH_REPORTS_ALONE").is_some();
    let mut since = 0;
    let mut last_beat = Instant::now();
    let mut reported: BTreeMap<String, Phase> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        if last_beat.elapsed() > Duration::from_secs(2) {
            let _ = c.executor_heartbeat(&id, &info).await;
            last_beat = Instant::now();
        }
        // As the agent asks: a task's data only while it has not started.
        let Ok(tasks) = c.executor_tasks_with(&id, since, 1000, TaskDataFor::NotStarted).await else {
            continue;
        };
        since = tasks.revision;
        let mut todo = Vec::new();
        for t in tasks.tasks {
            let next = match (reported.get(&t.id), t.status.phase) {
                (None, Phase::Notstarted) => Phase::Running,
                (Some(Phase::Running), Phase::Running) => Phase::Success,
                _ => continue,
            };
            reported.insert(t.id.clone(), next);
            todo.push((t, next));
        }
        let again = todo.iter().any(|(_, p)| *p == Phase::Running);
        // Every task reports at once, as the agent's tasks do; the reporter sends the
        // reports that queue behind one request together, as the agent's does.
        futures::future::join_all(todo.into_iter().map(|(t, next)| {
            let (reporter, transitions, c, id) = (&reporter, transitions.clone(), &c, &id);
            async move {
                let status = status(&t, next);
                let r = if alone {
                    c.executor_task_status(id, &t.id, &status).await
                } else {
                    reporter.report(&t.id, &status).await
                };
                if r.is_ok() {
                    transitions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }))
        .await;
        if again {
            since = 0; // the running ones are due for success at once
        }
        reported.retain(|_, p| *p != Phase::Success);
    }
}

struct Result {
    transitions: f64,
    transitions_per_s: f64,
    runs_per_s: f64,
    secs: f64,
    /// CPU spent while the load ran: the leader, the other nodes, this process (the
    /// simulated executors and the client creating runs).
    cpu: Split,
}

async fn measure(nodes: u64, runs: usize, tasks: usize) -> Result {
    let cluster = Cluster::bootstrap(nodes, &[]).await;
    let transitions = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::new();
    // FLOTILLA_BENCH_EXECUTORS_ON_LEADER=1: every executor on the leader, none forwarded
    // (what the forwarding hop costs; not the benchmark's own setting).
    let on_leader = std::env::var_os("FLOTILLA_BENCH_EXECUTORS_ON_LEADER").is_some();
    let leader = cluster.wait_for_leader().await;
    for e in 0..EXECUTORS {
        let c = cluster.client(if on_leader { leader } else { 1 + (e as u64 % nodes) });
        handles.push(tokio::spawn(executor(c, format!("sim-{e}"), transitions.clone(), stop.clone())));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let api = cluster.client(1);
    let create: RunCreate = serde_json::from_value(serde_json::json!({
        "name": "load", "group": "/load",
        "tasks": (0..tasks).map(|i| serde_json::json!({"name": format!("t{i}"), "image": "busybox", "steps": [{"run": {"command": "true"}}]})).collect::<Vec<_>>()
    }))
    .unwrap();
    let procs = Procs::flotilla(&cluster, leader);
    let mut cpu = Split::default();
    let start = Instant::now();
    let ids = procs.measure(&mut cpu, create_and_finish(&api, &create, runs)).await;
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.abort();
    }
    let run = api.run_get(&ids[0]).await.unwrap();
    assert_eq!(run.phase, RunPhase::Finished);
    let transitions = transitions.load(Ordering::Relaxed) as f64;
    Result {
        transitions,
        transitions_per_s: transitions / secs,
        runs_per_s: ids.len() as f64 / secs,
        secs,
        cpu,
    }
}

/// Creates `runs` runs of `create` and waits until every one has finished; their ids.
async fn create_and_finish(api: &Client, create: &RunCreate, runs: usize) -> Vec<String> {
    let ids: Vec<String> = futures::stream::iter(0..runs)
        .map(|_| {
            let (api, create) = (api.clone(), create.clone());
            async move { api.run_create(&create).await.unwrap().id }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    // Done when no run is queued or running any more (every run was created above): two
    // answers of at most one run each per poll, so that waiting costs neither the servers
    // nor this process more than the load it measures.
    let deadline = Instant::now() + Duration::from_secs(600);
    let active = |phase: &str| flotilla_api::client::RunQuery {
        phase: Some(phase.into()),
        limit: 1,
        ..Default::default()
    };
    loop {
        let queued = api.run_list(&active("queued")).await.unwrap();
        let running = api.run_list(&active("running")).await.unwrap();
        if queued.runs.is_empty() && running.runs.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "load did not finish in 600 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ids
}

pub async fn run(quick: bool) -> Vec<Row> {
    let (runs, tasks) = if quick { (100, 10) } else { (500, 20) };
    println!("== scheduler: {runs} runs x {tasks} one-step tasks, {EXECUTORS} simulated executors (HTTP), 2 reports per task");
    let three = measure(3, runs, tasks).await;
    let one = measure(1, runs, tasks).await;
    println!("{:<34} {:>16} {:>10} {:>8}", "", "transitions/s", "runs/s", "secs");
    println!(
        "{:<34} {:>16.0} {:>10.1} {:>8.1}",
        "1 node (baseline)", one.transitions_per_s, one.runs_per_s, one.secs
    );
    println!(
        "{:<34} {:>16.0} {:>10.1} {:>8.1}",
        "3 nodes, executors on every node", three.transitions_per_s, three.runs_per_s, three.secs
    );
    for (name, r) in [("1 node", &one), ("3 nodes", &three)] {
        let busy = (r.cpu.servers() + r.cpu.client) / r.secs / cpu::cores() * 100.0;
        println!("  cpu {name:<8} {} per transition (cores {busy:>3.0}% busy)", r.cpu.line(r.transitions));
    }
    let us = |s: f64, r: &Result| Split::per_op_us(s, r.transitions);
    vec![
        Row::new(
            "scheduler_task_transitions",
            "transitions/s",
            three.transitions_per_s,
            "flotilla, 1 node",
            one.transitions_per_s,
            true,
        ),
        Row::new(
            "scheduler_run_completions",
            "runs/s",
            three.runs_per_s,
            "flotilla, 1 node",
            one.runs_per_s,
            true,
        ),
        Row::new(
            "scheduler_cpu_us_per_transition",
            "µs CPU",
            us(three.cpu.servers(), &three),
            "flotilla, 1 node",
            us(one.cpu.servers(), &one),
            false,
        ),
        Row::new(
            "scheduler_leader_cpu_us_per_transition",
            "µs CPU",
            us(three.cpu.leader, &three),
            "flotilla, 1 node",
            us(one.cpu.leader, &one),
            false,
        ),
    ]
}
