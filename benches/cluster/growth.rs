//! The run archive's effect, side by side in one run: two one-node clusters get the same
//! N finished runs through the API; one archives them (`--archive-after-s 0`), the
//! baseline keeps them in the Raft state. Reported: Raft snapshot size and server RSS.
//! Then the full run index of 1,000,000 runs: encoded size and time to write it to a
//! POSIX object storage.
//!
//! `cargo bench --bench archive [-- --quick]` (--quick: 10,000 runs instead of 100,000)

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use flotilla_api::types::RunCreate;
use flotilla_store::run::RunPhase;
use futures::StreamExt;

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()).unwrap_or(0.0)
        / 1024.0
}

async fn metric(url: &str, name: &str) -> u64 {
    let text = reqwest::Client::new().get(format!("{url}/metrics")).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

async fn fill(c: &Cluster, n: usize) -> Duration {
    let client = c.client(1);
    let t = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move {
                let create: RunCreate = serde_json::from_value(serde_json::json!({
                    "name": format!("r{i}"), "group": format!("/project/{}/branch/main", i % 100),
                    "setup_errors": ["benchmark"], "annotations": {"commit": format!("{i:040x}")},
                    "tasks": [{"name": "build", "image": "busybox", "steps": [{"run": {"command": "make all && make test"}}]}]
                }))
                .unwrap();
                client.run_create(&create).await.expect("create")
            }
        })
        .buffer_unordered(64)
        .for_each(|_| async {})
        .await;
    t.elapsed()
}

/// Writes enough keys to make the node build a new snapshot (every 5,000 entries).
async fn force_snapshot(c: &Cluster) {
    let client = c.client(1);
    futures::stream::iter(0..5_100)
        .map(|i| {
            let client = client.clone();
            async move { client.kv_put(&format!("tick/{i}"), "x", None).await.unwrap() }
        })
        .buffer_unordered(64)
        .for_each(|_| async {})
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 10_000 } else { 100_000 };
    let common = ["--snapshot-logs", "5000", "--archive-interval-ms", "500", "--index-dump-interval-s", "0"];
    let archiving = Cluster::bootstrap(1, &[&common[..], &["--archive-after-s", "0"]].concat()).await;
    let baseline = Cluster::bootstrap(1, &[&common[..], &["--archive-after-s", "100000000"]].concat()).await;
    let fill_a = fill(&archiving, n).await;
    let fill_b = fill(&baseline, n).await;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let s = archiving.client(1).archive_status().await.unwrap();
        if s["runs_in_state"] == serde_json::json!(0) {
            break;
        }
        assert!(Instant::now() < deadline, "archiving did not finish: {s}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    force_snapshot(&archiving).await;
    force_snapshot(&baseline).await;
    let pid = |c: &Cluster| c.nodes[&1].child.as_ref().unwrap().id();
    let snap_a = metric(&archiving.url(1), "flotilla_raft_snapshot_bytes").await;
    let snap_b = metric(&baseline.url(1), "flotilla_raft_snapshot_bytes").await;
    let (rss_a, rss_b) = (rss_mib(pid(&archiving)), rss_mib(pid(&baseline)));
    let status = archiving.client(1).archive_status().await.unwrap();
    println!("{n} finished runs created through the API (64 in flight), then a new snapshot");
    println!("{:<28} {:>16} {:>12} {:>14}", "", "snapshot bytes", "RSS MiB", "create s");
    println!("{:<28} {:>16} {:>12.1} {:>14.1}", "kept in Raft (baseline)", snap_b, rss_b, fill_b.as_secs_f64());
    println!("{:<28} {:>16} {:>12.1} {:>14.1}", "archived to the ost", snap_a, rss_a, fill_a.as_secs_f64());
    println!("ratio archived/baseline: snapshot {:.3}, RSS {:.2}", snap_a as f64 / snap_b.max(1) as f64, rss_a / rss_b.max(0.1));
    println!("archive: {status}");

    // The full index of 1,000,000 runs.
    let dir = tempfile::tempdir().unwrap();
    let ost = flotilla_store::ost::Ost::posix(dir.path().join("ost")).unwrap();
    let entries: Vec<(String, String, RunPhase)> =
        (0..1_000_000u64).map(|i| (format!("{i:016}"), format!("/project/{}/branch/main", i % 1000), RunPhase::Finished)).collect();
    let t = Instant::now();
    let bytes = flotilla_store::archive::encode_index(entries.iter().map(|(i, g, p)| (i.as_str(), g.as_str(), *p)));
    let size = bytes.len();
    ost.put_bytes(flotilla_store::archive::FULL_INDEX_KEY, bytes, true).await.unwrap();
    let write = t.elapsed();
    let t = Instant::now();
    let back = flotilla_store::archive::read_index(&ost, flotilla_store::archive::FULL_INDEX_KEY).await.unwrap();
    let read = t.elapsed();
    assert_eq!(back.len(), 1_000_000);
    println!(
        "index of 1,000,000 runs: {:.1} MB ({:.0} bytes/run; limit 100 MB), encoded and written (fsync) in {:.0} ms, read and parsed in {:.0} ms",
        size as f64 / 1e6,
        size as f64 / 1e6,
        write.as_secs_f64() * 1000.0,
        read.as_secs_f64() * 1000.0
    );
}
