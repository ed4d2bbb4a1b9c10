//! Dispatch latency: from an executor reporting a task's success to the same executor
//! receiving the child task that success made ready (status write → scheduler round →
//! run update → long poll answered). Three-node cluster with the executor on a follower,
//! and side by side in the same run, as the baseline, a one-node cluster. For scale: a
//! fixed 2-second poll (Agola's scheduler and executor loops) averages about 1,000 ms
//! per hop, 2,000 ms at worst.
//!
//! `cargo bench --bench dispatch [-- --quick]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use flotilla_api::types::{ExecutorInfo, ExecutorTaskStatus, ExecutorTaskView, RunCreate};
use flotilla_store::run::Phase;

fn status(t: &ExecutorTaskView, phase: Phase) -> ExecutorTaskStatus {
    let mut s = t.status.clone();
    s.phase = phase;
    for step in &mut s.steps {
        step.phase = phase;
    }
    s
}

async fn measure(c: &Cluster, exec_node: u64, api_node: u64, runs: usize) -> Vec<Duration> {
    let exec = c.client(exec_node);
    let api = c.client(api_node);
    let info: ExecutorInfo = serde_json::from_value(serde_json::json!({"archs": ["amd64"]})).unwrap();
    exec.executor_heartbeat("e1", &info).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(ExecutorTaskView, Instant)>();
    let poller = {
        let exec = exec.clone();
        tokio::spawn(async move {
            let mut since = 0;
            let mut seen = std::collections::BTreeSet::new();
            loop {
                let tasks = exec.executor_tasks("e1", since, 5000).await.expect("poll");
                let now = Instant::now();
                since = tasks.revision;
                for t in tasks.tasks {
                    if seen.insert(t.id.clone()) {
                        let _ = tx.send((t, now));
                    }
                }
            }
        })
    };
    let create: RunCreate = serde_json::from_value(serde_json::json!({"name": "chain", "tasks": [
        {"name": "a", "image": "busybox", "steps": [{"run": {"command": "true"}}]},
        {"name": "b", "image": "busybox", "depends": [{"task": "a"}], "steps": [{"run": {"command": "true"}}]},
    ]}))
    .unwrap();
    let mut latencies = Vec::new();
    for _ in 0..runs {
        api.run_create(&create).await.unwrap();
        let (a, _) = rx.recv().await.unwrap();
        exec.executor_task_status("e1", &a.id, &status(&a, Phase::Running)).await.unwrap();
        let sent = Instant::now();
        exec.executor_task_status("e1", &a.id, &status(&a, Phase::Success)).await.unwrap();
        let (b, arrived) = rx.recv().await.unwrap();
        assert!(b.id.ends_with(".b"), "{}", b.id);
        latencies.push(arrived.saturating_duration_since(sent));
        exec.executor_task_status("e1", &b.id, &status(&b, Phase::Running)).await.unwrap();
        exec.executor_task_status("e1", &b.id, &status(&b, Phase::Success)).await.unwrap();
    }
    poller.abort();
    latencies.sort();
    latencies
}

fn pct(all: &[Duration], p: f64) -> f64 {
    all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 50 } else { 200 };
    println!(
        "cores: {}; {runs} runs of a two-task chain each",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let three = {
        let c = Cluster::bootstrap(3, &[]).await;
        let leader = c.wait_for_leader().await;
        let follower = (1..=3).find(|i| *i != leader).unwrap();
        measure(&c, follower, leader, runs).await
    };
    let one = {
        let c = Cluster::bootstrap(1, &[]).await;
        measure(&c, 1, 1, runs).await
    };
    println!("{:>28} {:>10} {:>10} {:>10}", "report → child received", "p50 ms", "p99 ms", "max ms");
    for (name, l) in [("3 nodes, executor on follower", &three), ("1 node (baseline)", &one)] {
        println!("{:>28} {:>10.2} {:>10.2} {:>10.2}", name, pct(l, 0.5), pct(l, 0.99), pct(l, 1.0));
    }
    println!("ratio p50 3-node/1-node: {:.2}", pct(&three, 0.5) / pct(&one, 0.5));
}
