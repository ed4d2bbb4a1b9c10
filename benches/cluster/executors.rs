//! Benchmark 7, executors: how the cluster carries many executors (issue 24, goal 7). A
//! three-node cluster, started as the scheduler benchmark starts one, and N simulated
//! executors speaking the executor HTTP API (no Docker), spread over the three nodes: each
//! heartbeats every 5 s (first heartbeats spread evenly over 5 s, so they are not
//! synchronised) and long-polls its tasks. For each N, two figures:
//!
//! 1. the leader's CPU for the heartbeats and idle long polls alone (no runs): its
//!    utime + stime from `/proc/PID/stat` over a window, as percent of one core (the
//!    followers' maximum beside it, for context);
//! 2. the task fetch latency: runs of one one-step task submitted at a steady rate
//!    through random nodes; for each, from the run's creation being acknowledged (the
//!    task is runnable from then) to the executor's long poll returning the task. The
//!    executor then reports running and success, so the runs finish.
//!
//! The baseline of every figure is the same figure at the smallest N of the same run, so
//! that the ratio is the growth. Goals (docs/benchmarks.md): leader CPU ≤ 10 % of a core
//! and p99 ≤ 100 ms at 2,000 executors. Nothing here asserts a speed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::cpu;
use crate::load::percentile_ms;
use crate::report::Row;
use crate::sim_executor::status;
use flotilla_api::types::{ExecutorInfo, RunCreate, TaskDataFor};
use flotilla_api::Client;
use flotilla_store::run::{Phase, RunPhase};

/// Every executor heartbeats this often; the first heartbeats are spread over one period.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// The executors' long poll (the client's own timeout is 60 s).
const LONG_POLL_MS: u64 = 30_000;
/// The name of the one task of every run: its executor task id is `<run_id>.t`.
const TASK: &str = "t";

/// What one scale is run with.
struct Plan {
    executors: Vec<usize>,
    /// The CPU window, with heartbeats and long polls only.
    window: Duration,
    runs: usize,
    runs_per_s: f64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan { executors: vec![100, 200], window: Duration::from_secs(5), runs: 60, runs_per_s: 20.0 }
        } else {
            Plan {
                executors: vec![500, 1000, 2000],
                window: Duration::from_secs(30),
                runs: 500,
                runs_per_s: 50.0,
            }
        }
    }
}

/// What the simulated executors share with the benchmark.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    registered: AtomicU64,
    heartbeats: AtomicU64,
    heartbeat_errors: AtomicU64,
    poll_errors: AtomicU64,
    status_errors: AtomicU64,
    /// Tasks reported running then success.
    finished: AtomicU64,
    /// Executor task id → when the long poll that carried it first returned.
    fetched: Mutex<HashMap<String, Instant>>,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn info() -> ExecutorInfo {
    serde_json::from_value(serde_json::json!({"archs": ["amd64"]})).unwrap()
}

/// One simulated executor: from `start_at`, registers, heartbeats every [`HEARTBEAT`] and
/// long-polls its tasks; a new task is recorded as fetched and reported running then
/// success (off the poll loop, so that the next poll is not held up by the reports).
async fn executor(c: Client, id: String, start_at: tokio::time::Instant, shared: Arc<Shared>) {
    tokio::time::sleep_until(start_at).await;
    let info = info();
    // Registration is the first heartbeat; retried, in case a node is briefly busy.
    while c.executor_heartbeat(&id, &info).await.is_err() {
        shared.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
        if shared.stopped() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shared.heartbeats.fetch_add(1, Ordering::Relaxed);
    shared.registered.fetch_add(1, Ordering::Relaxed);
    let beats = async {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !shared.stopped() {
            tick.tick().await;
            match c.executor_heartbeat(&id, &info).await {
                Ok(()) => shared.heartbeats.fetch_add(1, Ordering::Relaxed),
                Err(_) => shared.heartbeat_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    };
    let polls = async {
        // Dropped (so aborted) with this executor.
        let mut reports = tokio::task::JoinSet::new();
        let mut since = 0;
        let mut seen: HashSet<String> = HashSet::new();
        while !shared.stopped() {
            let tasks = match c.executor_tasks_with(&id, since, LONG_POLL_MS, TaskDataFor::NotStarted).await {
                Ok(t) => t,
                Err(_) => {
                    shared.poll_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let got = Instant::now();
            since = tasks.revision;
            seen.retain(|s| tasks.tasks.iter().any(|t| t.id == *s));
            for t in tasks.tasks {
                if t.status.phase != Phase::Notstarted || !seen.insert(t.id.clone()) {
                    continue;
                }
                shared.fetched.lock().unwrap().entry(t.id.clone()).or_insert(got);
                let (c, id, shared) = (c.clone(), id.clone(), shared.clone());
                reports.spawn(async move {
                    for phase in [Phase::Running, Phase::Success] {
                        if c.executor_task_status(&id, &t.id, &status(&t, phase)).await.is_err() {
                            shared.status_errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    shared.finished.fetch_add(1, Ordering::Relaxed);
                });
            }
            while reports.try_join_next().is_some() {}
        }
    };
    futures::future::join(beats, polls).await;
}

unsafe extern "C" {
    fn getrlimit(resource: std::ffi::c_int, rlim: *mut RLimit) -> std::ffi::c_int;
    fn setrlimit(resource: std::ffi::c_int, rlim: *const RLimit) -> std::ffi::c_int;
}

/// `struct rlimit` (Linux: two `rlim_t`, unsigned long).
#[repr(C)]
struct RLimit {
    cur: std::ffi::c_ulong,
    max: std::ffi::c_ulong,
}

/// Linux's `RLIMIT_NOFILE` (every architecture but Alpha, MIPS and SPARC).
const RLIMIT_NOFILE: std::ffi::c_int = 7;

/// Raises this process's open-file limit to its hard limit (the servers started after it
/// inherit it): 2,000 long polls and their heartbeats need more than the usual 1,024
/// descriptors, here and on the nodes. Returns the soft limit now in force.
fn raise_fd_limit() -> u64 {
    let mut l = RLimit { cur: 0, max: 0 };
    // SAFETY: `l` is a valid `struct rlimit` for the call to fill in or read.
    unsafe {
        if getrlimit(RLIMIT_NOFILE, &mut l) != 0 {
            return 0;
        }
        if l.cur < l.max {
            let raised = RLimit { cur: l.max, max: l.max };
            if setrlimit(RLIMIT_NOFILE, &raised) == 0 {
                l.cur = l.max;
            }
        }
    }
    l.cur
}

/// Waits until `done()` or `limit` passed; false on the timeout.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

struct Figures {
    executors: usize,
    leader_cpu_pct: f64,
    follower_cpu_pct_max: f64,
    heartbeats_per_s: f64,
    /// Raft log entries applied per second in the CPU window (heartbeats batched together).
    entries_per_s: f64,
    /// This process (the simulated executors) in the same window: the nodes share the cores.
    own_cpu_pct: f64,
    fetch_p50_ms: f64,
    fetch_p99_ms: f64,
    fetch_max_ms: f64,
    fetched: usize,
    errors: (u64, u64, u64),
}

async fn measure(n: usize, plan: &Plan) -> Figures {
    let cluster = Cluster::bootstrap(3, &[]).await;
    let shared = Arc::new(Shared::default());
    // One HTTP client (connection pool) per node, shared by the executors on that node.
    let clients: Vec<Client> = (1..=3).map(|id| cluster.client(id)).collect();
    let t0 = tokio::time::Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let start_at = t0 + HEARTBEAT * i as u32 / n as u32;
            let c = clients[i % 3].clone();
            tokio::spawn(executor(c, format!("sim-{i}"), start_at, shared.clone()))
        })
        .collect();
    let all_in = wait_until(HEARTBEAT + Duration::from_secs(30), || {
        shared.registered.load(Ordering::Relaxed) as usize >= n
    })
    .await;
    assert!(all_in, "only {} of {n} executors registered", shared.registered.load(Ordering::Relaxed));
    // Every executor is in its heartbeat cycle and long poll: let it settle, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leader = cluster.wait_for_leader().await;
    let (ids, mut pids): (Vec<u64>, Vec<u32>) =
        cluster.nodes.values().map(|p| (p.id, p.child.as_ref().expect("running").id())).unzip();
    pids.push(std::process::id());
    let beats_before = shared.heartbeats.load(Ordering::Relaxed);
    let index_before = cluster.local_status(leader).await.applied_index;
    let w = Instant::now();
    let ((), used) = cpu::during(&pids, tokio::time::sleep(plan.window)).await;
    let secs = w.elapsed().as_secs_f64();
    let beats = shared.heartbeats.load(Ordering::Relaxed) - beats_before;
    let entries = cluster.local_status(leader).await.applied_index.saturating_sub(index_before);
    let pct_of_core = |cpu_secs: f64| cpu_secs / secs * 100.0;
    let own_pct = pct_of_core(used[ids.len()]);
    let pct: Vec<(u64, f64)> = ids.iter().zip(&used).map(|(id, s)| (*id, pct_of_core(*s))).collect();
    if cluster.wait_for_leader().await != leader {
        println!("warning: the leader changed during the CPU window of {n} executors");
    }
    let leader_cpu_pct = pct.iter().find(|(id, _)| *id == leader).map_or(f64::NAN, |p| p.1);
    let follower_cpu_pct_max = pct.iter().filter(|(id, _)| *id != leader).map(|p| p.1).fold(0.0, f64::max);

    // Task fetch latency: one-task runs at a steady rate through random nodes.
    let create: RunCreate = serde_json::from_value(serde_json::json!({
        "name": "fetch", "group": "/executors",
        "tasks": [{"name": TASK, "image": IMAGE, "steps": [{"run": {"command": "true"}}]}]
    }))
    .unwrap();
    let mut rng = Rng::from_time();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.runs_per_s));
    let mut creates = Vec::with_capacity(plan.runs);
    for _ in 0..plan.runs {
        tick.tick().await;
        let (c, create) = (clients[rng.below(3) as usize].clone(), create.clone());
        creates.push(tokio::spawn(async move {
            let run = c.run_create(&create).await.expect("create a run");
            (run.id, Instant::now())
        }));
    }
    let mut acked = Vec::with_capacity(plan.runs);
    for h in creates {
        acked.push(h.await.expect("a create panicked"));
    }
    let runs = plan.runs as u64;
    let all_done =
        wait_until(Duration::from_secs(60), || shared.finished.load(Ordering::Relaxed) >= runs).await;
    let fetched = shared.fetched.lock().unwrap().clone();
    assert!(
        all_done,
        "{} of {runs} tasks fetched, {} finished within 60 s",
        fetched.len(),
        shared.finished.load(Ordering::Relaxed)
    );
    let mut latencies: Vec<Duration> = acked
        .iter()
        .filter_map(|(run, at)| {
            let got = fetched.get(&format!("{run}.{TASK}"))?;
            Some(got.saturating_duration_since(*at))
        })
        .collect();
    latencies.sort();
    assert_eq!(latencies.len(), plan.runs, "every run's task was fetched under its own id");
    // The runs finish: the last one created is finished (the scheduler copied the success).
    let api = cluster.client(leader);
    let last = &acked.last().expect("runs were created").0;
    let mut finished = false;
    for _ in 0..100 {
        if api.run_get(last).await.is_ok_and(|r| r.phase == RunPhase::Finished) {
            finished = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(finished, "run {last} did not finish");

    shared.stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.abort();
        let _ = h.await;
    }
    let errors = (
        shared.heartbeat_errors.load(Ordering::Relaxed),
        shared.poll_errors.load(Ordering::Relaxed),
        shared.status_errors.load(Ordering::Relaxed),
    );
    drop(cluster); // kills the nodes
    Figures {
        executors: n,
        leader_cpu_pct,
        follower_cpu_pct_max,
        heartbeats_per_s: beats as f64 / secs,
        entries_per_s: entries as f64 / secs,
        own_cpu_pct: own_pct,
        fetch_p50_ms: percentile_ms(&latencies, 0.5),
        fetch_p99_ms: percentile_ms(&latencies, 0.99),
        fetch_max_ms: percentile_ms(&latencies, 1.0),
        fetched: latencies.len(),
        errors,
    }
}

pub struct Out {
    pub rows: Vec<Row>,
    /// (executors, leader CPU % of a core, p99 task fetch ms) for `bench-executors.svg`.
    pub chart: Vec<(usize, f64, f64)>,
}

pub async fn run(quick: bool) -> Out {
    let plan = Plan::new(quick);
    let fds = raise_fd_limit();
    println!(
        "== executors: {:?} simulated executors (HTTP) over 3 nodes, heartbeat every {} s, long poll {} s; \
         leader CPU over {} s with no runs, then {} one-task runs at {}/s (open files: {fds})",
        plan.executors,
        HEARTBEAT.as_secs(),
        LONG_POLL_MS / 1000,
        plan.window.as_secs(),
        plan.runs,
        plan.runs_per_s
    );
    let mut all = Vec::new();
    for &n in &plan.executors {
        let f = measure(n, &plan).await;
        println!(
            "{:>6} executors: leader CPU {:5.1} % (followers max {:5.1} %, executors {:5.1} %), {:6.1} heartbeats/s in {:6.1} log entries/s; \
             task fetch p50 {:6.1} ms p99 {:6.1} ms max {:6.1} ms ({} tasks); errors hb/poll/status {:?}",
            f.executors,
            f.leader_cpu_pct,
            f.follower_cpu_pct_max,
            f.own_cpu_pct,
            f.heartbeats_per_s,
            f.entries_per_s,
            f.fetch_p50_ms,
            f.fetch_p99_ms,
            f.fetch_max_ms,
            f.fetched,
            f.errors
        );
        all.push(f);
    }
    let base = &all[0];
    let base_name = format!("flotilla, {} executors", base.executors);
    let mut rows = Vec::new();
    for f in &all {
        let n = f.executors;
        rows.push(Row::new(
            format!("executors_heartbeat_leader_cpu_pct_{n}"),
            "% of a core",
            f.leader_cpu_pct,
            base_name.clone(),
            base.leader_cpu_pct,
            false,
        ));
        rows.push(Row::new(
            format!("executors_follower_cpu_pct_max_{n}"),
            "% of a core",
            f.follower_cpu_pct_max,
            base_name.clone(),
            base.follower_cpu_pct_max,
            false,
        ));
        rows.push(Row::new(
            format!("executors_task_fetch_p50_ms_{n}"),
            "ms",
            f.fetch_p50_ms,
            base_name.clone(),
            base.fetch_p50_ms,
            false,
        ));
        rows.push(Row::new(
            format!("executors_task_fetch_p99_ms_{n}"),
            "ms",
            f.fetch_p99_ms,
            base_name.clone(),
            base.fetch_p99_ms,
            false,
        ));
    }
    let chart = all.iter().map(|f| (f.executors, f.leader_cpu_pct, f.fetch_p99_ms)).collect();
    Out { rows, chart }
}
