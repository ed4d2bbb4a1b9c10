//! Benchmark 5, growth: 100,000 finished runs written through the API to a three-node cluster that
//! archives them to the object storage (`--archive-after-s 0`; a POSIX directory shared by
//! the three nodes, as an NFS mount would be), side by side with the baseline, the same
//! cluster keeping every run in the Raft state. Reported: Raft log entries and snapshot size,
//! sled disk use and RSS of each node, the write throughput of the first and the last
//! 10,000 runs, and the full run index dump (`POST /api/v1/archive/index`: from the per-file
//! indexes in the ost, or from the state for the baseline): its size and how long it takes.
//!
//! `growth1m` (only with `--only growth1m`, about 3 minutes on 2 cores): 1,000,000 runs
//! archived, the index dump and the nodes' RSS, each against the same figure at 100,000
//! runs in the same run.

use std::path::Path;
use std::time::{Duration, Instant};

#[path = "../../tests/common/metrics.rs"]
mod metrics;

use crate::common::*;
use crate::report::Row;
use flotilla_api::types::RunCreate;
use futures::StreamExt;
use metrics::metric;

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn disk_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Creates `n` finished runs (64 in flight) and returns the instant each one was acknowledged.
async fn fill(c: &Cluster, n: usize) -> (Instant, Vec<Instant>) {
    let client = c.client(c.wait_for_leader().await);
    let start = Instant::now();
    let mut done: Vec<Instant> = futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move {
                let create: RunCreate = serde_json::from_value(serde_json::json!({
                    "name": format!("r{i}"), "group": format!("/project/{}/branch/main", i % 100),
                    "setup_errors": ["benchmark"], "annotations": {"commit": format!("{i:040x}")},
                    "tasks": [{"name": "build", "image": "busybox", "steps": [{"run": {"command": "make all && make test"}}]}]
                }))
                .unwrap();
                client.run_create(&create).await.expect("create");
                Instant::now()
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    done.sort();
    (start, done)
}

/// Writes enough log entries to make every node build a new snapshot (every 5,000
/// entries): one write at a time, so that the leader does not batch them into fewer. A
/// write refused in an election (503) is sent again, to the new leader (bounded).
async fn force_snapshot(c: &Cluster) {
    let mut client = c.client(c.wait_for_leader().await);
    for i in 0..5_100 {
        let mut attempt = 0;
        while let Err(e) = client.kv_put(&format!("tick/{i}"), "x", None).await {
            attempt += 1;
            assert!(attempt < 20, "tick/{i} not written after {attempt} attempts: {e}");
            eprintln!("growth: tick/{i}: {e}; again");
            tokio::time::sleep(Duration::from_millis(200)).await;
            client = c.client(c.wait_for_leader().await);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// While the cluster grows, a linearizable read to the leader every 20 ms: the slowest
/// answer, in ms. A node whose runtime stalls (a snapshot of a large state encoded while
/// writers and readers wait for its lock) shows here long before it loses an election.
fn probe_reads(c: &Cluster, leader: u64) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<f64>) {
    let client = c.client(leader);
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let probe = tokio::spawn(async move {
        let mut slowest = Duration::ZERO;
        // Until told to stop, or until the teller is gone (a failed measurement).
        while matches!(stopped.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty)) {
            let t = Instant::now();
            // Absent is an answer too; a refusal (an election) counts with its time.
            let _ = client.kv_get("growth/probe", false).await;
            slowest = slowest.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slowest.as_secs_f64() * 1e3
    });
    (stop, probe)
}

struct Figures {
    read_max_ms: f64,
    /// Raft terms begun while the cluster grew: elections (none is expected).
    elections: u64,
    first_per_s: f64,
    last_per_s: f64,
    log_entries: u64,
    snapshot_bytes: u64,
    sled_bytes: Vec<u64>,
    rss_mib: Vec<f64>,
    index_bytes: u64,
    index_s: f64,
}

async fn measure(n: usize, archive: bool) -> Figures {
    let ost = tempfile::tempdir().unwrap();
    let ost_url = format!("file://{}", ost.path().display());
    let after = if archive { "0" } else { "100000000" };
    let args = [
        "--snapshot-logs",
        "5000",
        "--archive-interval-ms",
        "500",
        "--index-dump-interval-s",
        "0",
        "--archive-after-s",
        after,
        "--ost",
        &ost_url,
    ];
    let c = Cluster::bootstrap(3, &args).await;
    let first = c.wait_for_leader().await;
    let term = metric(&c.url(first), "flotilla_raft_term").await;
    let (stop_probe, probe) = probe_reads(&c, first);
    let (start, done) = fill(&c, n).await;
    let chunk = n / 10;
    let first_per_s = chunk as f64 / (done[chunk - 1] - start).as_secs_f64();
    let last_per_s = chunk as f64 / (done[n - 1] - done[n - chunk - 1]).as_secs_f64();
    if archive {
        let deadline = Instant::now() + Duration::from_secs(600.max(n as u64 / 1000));
        loop {
            let s = c.client(1).archive_status().await.unwrap();
            if s["runs_in_state"] == serde_json::json!(0) {
                break;
            }
            assert!(Instant::now() < deadline, "archiving did not finish: {s}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let leader = c.wait_for_leader().await;
    let t = Instant::now();
    let dump = c.client(leader).archive_dump_index().await.expect("index dump");
    let index_s = t.elapsed().as_secs_f64();
    assert_eq!(dump["runs"].as_u64(), Some(n as u64), "every run is in the index: {dump}");
    let index_bytes = dump["bytes"].as_u64().expect("dump size");
    force_snapshot(&c).await;
    let _ = stop_probe.send(());
    let read_max_ms = probe.await.unwrap();
    c.wait_caught_up().await;
    let leader = c.wait_for_leader().await;
    let mut f = Figures {
        read_max_ms,
        elections: metric(&c.url(leader), "flotilla_raft_term").await - term,
        index_bytes,
        index_s,
        first_per_s,
        last_per_s,
        log_entries: metric(&c.url(leader), "flotilla_raft_log_entries").await,
        snapshot_bytes: metric(&c.url(leader), "flotilla_raft_snapshot_bytes").await,
        sled_bytes: Vec::new(),
        rss_mib: Vec::new(),
    };
    for node in c.nodes.values() {
        f.sled_bytes.push(disk_bytes(&node.data_dir));
        f.rss_mib.push(rss_mib(node.child.as_ref().unwrap().id()));
    }
    f
}

pub async fn run(quick: bool) -> Vec<Row> {
    let n = if quick { 10_000 } else { 100_000 };
    println!("== growth: {n} finished runs through the API (64 in flight), 3 nodes, then a new snapshot");
    let a = measure(n, true).await;
    let b = measure(n, false).await;
    let chunk = n / 10;
    println!(
        "{:<26} {:>10} {:>12} {:>12} {:>12} {:>12} {:>14} {:>26} {:>22}",
        "",
        "elections",
        "read max ms",
        "first runs/s",
        "last runs/s",
        "log entries",
        "snapshot B",
        "sled disk B per node",
        "RSS MiB per node"
    );
    for (name, f) in [("kept in Raft (baseline)", &b), ("archived to the ost", &a)] {
        println!(
            "{name:<26} {:>10} {:>12.1} {:>12.0} {:>12.0} {:>12} {:>14} {:>26} {:>22}",
            f.elections,
            f.read_max_ms,
            f.first_per_s,
            f.last_per_s,
            f.log_entries,
            f.snapshot_bytes,
            format!("{:?}", f.sled_bytes),
            format!("{:?}", f.rss_mib.iter().map(|r| r.round() as u64).collect::<Vec<_>>())
        );
    }
    let max_u = |v: &[u64]| v.iter().copied().max().unwrap_or(0) as f64;
    let max_f = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let base = "flotilla, runs kept in Raft";
    let mut rows = vec![
        Row::new(
            format!("growth_runs_per_s_first_{chunk}"),
            "runs/s",
            a.first_per_s,
            base,
            b.first_per_s,
            true,
        ),
        Row::new(format!("growth_runs_per_s_last_{chunk}"), "runs/s", a.last_per_s, base, b.last_per_s, true),
        Row::new(
            "growth_last_over_first",
            "ratio",
            a.last_per_s / a.first_per_s,
            base,
            b.last_per_s / b.first_per_s,
            true,
        ),
        Row::new(
            "growth_raft_log_entries",
            "entries",
            a.log_entries as f64,
            base,
            b.log_entries as f64,
            false,
        ),
        Row::new(
            "growth_snapshot_size",
            "bytes",
            a.snapshot_bytes as f64,
            base,
            b.snapshot_bytes as f64,
            false,
        ),
        Row::new(
            "growth_sled_disk_max_node",
            "bytes",
            max_u(&a.sled_bytes),
            base,
            max_u(&b.sled_bytes),
            false,
        ),
    ];
    for (i, (ra, rb)) in a.rss_mib.iter().zip(&b.rss_mib).enumerate() {
        rows.push(Row::new(format!("growth_rss_node{}", i + 1), "MiB", *ra, base, *rb, false));
    }
    rows.push(Row::new("growth_rss_max_node", "MiB", max_f(&a.rss_mib), base, max_f(&b.rss_mib), false));
    rows.push(Row::new(
        "growth_index_dump_bytes",
        "bytes",
        a.index_bytes as f64,
        base,
        b.index_bytes as f64,
        false,
    ));
    rows.push(Row::new("growth_index_dump_s", "s", a.index_s, base, b.index_s, false));
    rows.push(Row::new("growth_read_max_ms", "ms", a.read_max_ms, base, b.read_max_ms, false));
    rows.push(Row::new("growth_elections", "terms", a.elections as f64, base, b.elections as f64, false));
    rows
}

/// `growth1m`: 1,000,000 runs archived (100,000 and 10,000 in `--quick`), against the same
/// cluster at a tenth of that. Goals (issue 24): index dump ≤ 100 MB and ≤ 10 s.
pub async fn run_1m(quick: bool) -> Vec<Row> {
    let n = if quick { 100_000 } else { 1_000_000 };
    println!("== growth1m: {n} finished runs archived, index dump and RSS, against {}", n / 10);
    let small = measure(n / 10, true).await;
    let big = measure(n, true).await;
    for (k, f) in [(n / 10, &small), (n, &big)] {
        println!(
            "{k:>9} runs: index dump {} bytes in {:.2} s; RSS MiB per node {:?}; runs/s first / last tenth {:.0} / {:.0}",
            f.index_bytes,
            f.index_s,
            f.rss_mib.iter().map(|r| r.round() as u64).collect::<Vec<_>>(),
            f.first_per_s,
            f.last_per_s
        );
    }
    let base = format!("flotilla, {} runs", n / 10);
    let max_f = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let tag = if quick { "100k" } else { "1m" };
    vec![
        Row::new(
            format!("growth{tag}_index_dump_bytes"),
            "bytes",
            big.index_bytes as f64,
            &base,
            small.index_bytes as f64,
            false,
        ),
        Row::new(format!("growth{tag}_index_dump_s"), "s", big.index_s, &base, small.index_s, false),
        Row::new(format!("growth{tag}_rss_node1"), "MiB", big.rss_mib[0], &base, small.rss_mib[0], false),
        Row::new(
            format!("growth{tag}_rss_max_node"),
            "MiB",
            max_f(&big.rss_mib),
            &base,
            max_f(&small.rss_mib),
            false,
        ),
        Row::new(
            format!("growth{tag}_runs_per_s_last_tenth"),
            "runs/s",
            big.last_per_s,
            &base,
            small.last_per_s,
            true,
        ),
    ]
}
