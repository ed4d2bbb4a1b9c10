//! The run archive through real servers: 10,000 finished runs leave the Raft state for
//! data files in the object storage (POSIX), the snapshot stays small, and every run is
//! still served by id and by filtered, paged listing; the index dump; deletion. Then on
//! S3 with three nodes: the leader killed while archiving loses and duplicates nothing.

mod common;
#[path = "common/metrics.rs"]
mod metrics;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Cluster, TOKEN};
use flotilla_api::client::RunQuery;
use flotilla_api::types::{Run, RunCreate};
use flotilla_api::{Client, ClientError};
use flotilla_store::ost::test_servers::{Kind, S3Server};
use flotilla_store::ost::Ost;
use futures::StreamExt;
use metrics::metric;
use serde_json::json;

fn def(i: usize) -> RunCreate {
    let group = ["/a/x", "/a/y", "/b"][i % 3];
    serde_json::from_value(json!({
        "name": format!("r{i}"), "group": group, "setup_errors": ["generated for the archive test"],
        "annotations": {"n": i.to_string()},
        "tasks": [{"name": "t", "image": "busybox", "steps": [{"run": {"command": "echo a fairly ordinary step"}}]}]
    }))
    .unwrap()
}

/// Creates runs `range` with 32 requests in flight, spreading them over `clients` and,
/// with several, retrying what a failover refuses; returns them. With one server any
/// failure fails the test.
/// One create without an `Idempotency-Key`: these tests are about runs leaving the Raft
/// state, and every keyed create leaves its key in the state for 24 h (about 240 bytes,
/// by design), which would hide what they measure.
async fn create_unkeyed(c: &Client, create: &RunCreate) -> Result<Run, ClientError> {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/runs", c.base()))
        .bearer_auth(TOKEN)
        .json(create)
        .send()
        .await
        .map_err(|e| ClientError::Transport { url: c.base().to_string(), message: e.to_string() })?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap_or_default();
    if status != 201 {
        return Err(ClientError::Api {
            status,
            code: "unexpected".into(),
            message: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    serde_json::from_slice(&body)
        .map_err(|e| ClientError::Transport { url: c.base().to_string(), message: e.to_string() })
}

async fn create_many(clients: &[Client], range: std::ops::Range<usize>) -> Vec<Run> {
    futures::stream::iter(range)
        .map(|i| {
            let clients = clients.to_vec();
            async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut at = i;
                loop {
                    match create_unkeyed(&clients[at % clients.len()], &def(i)).await {
                        Ok(run) => return run,
                        // A retried create may have been applied already: a duplicate run
                        // (callers compare sets, not counts).
                        Err(e)
                            if clients.len() > 1
                                && e.status().is_none_or(|s| s >= 500)
                                && Instant::now() < deadline =>
                        {
                            eprintln!("create {i}: {e}; retrying");
                            at += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("run {i} not created: {e}"),
                    }
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await
}

/// The archive status; a retryable refusal (no quorum confirmed yet, a node restarting:
/// 503 or a transport error) is asked again for up to 30 s, as any client would.
async fn archive_status(c: &Client) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.archive_status().await {
            Ok(s) => return s,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("archive status: {e:?}"),
        }
    }
}

/// Waits until no finished run is left in the state and at least `total` are archived;
/// returns the archive status.
async fn wait_archived(c: &Client, total: u64, cluster: &Cluster) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = archive_status(c).await;
        if s["runs"].as_u64().unwrap_or(0) >= total && s["runs_in_state"] == json!(0) {
            return s;
        }
        assert!(Instant::now() < deadline, "not archived: {s}\n{}", cluster.all_logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every run id a listing returns, paging with `start`.
async fn list_all(c: &Client, group: Option<&str>, asc: bool) -> Vec<String> {
    let mut ids = Vec::new();
    let mut start = None;
    loop {
        let q = RunQuery {
            group: group.map(str::to_string),
            start: start.clone(),
            limit: 1000,
            asc,
            ..Default::default()
        };
        // A read that finds no leader in time (the node just restarted, an election) is
        // a 503 to retry, as any client does.
        let deadline = Instant::now() + Duration::from_secs(30);
        let page = loop {
            match c.run_list(&q).await {
                Ok(page) => break page,
                Err(e) if e.status() == Some(503) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("list: {e}"),
            }
        };
        ids.extend(page.runs.iter().map(|r| r.id.clone()));
        if !page.more {
            return ids;
        }
        start = ids.last().cloned();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_finished_runs_move_to_the_archive_and_stay_served() {
    let cluster = Cluster::bootstrap(
        1,
        &[
            "--archive-after-s",
            "0",
            "--archive-interval-ms",
            "200",
            "--archive-max-file-bytes",
            "1048576",
            "--snapshot-logs",
            "500",
            "--max-logs-keep",
            "100",
            "--index-dump-interval-s",
            "0",
        ],
    )
    .await;
    let c = cluster.client(1);
    let mut created = create_many(std::slice::from_ref(&c), 0..10_000).await;
    created.sort_by(|a, b| a.id.cmp(&b.id));
    let total = wait_archived(&c, 10_000, &cluster).await["runs"].as_u64().unwrap();

    // The Raft state no longer holds the runs: after more writes force a new snapshot,
    // it is small (10,000 runs in it would be several MB).
    for i in 0..600 {
        c.kv_put(&format!("after/{i}"), "x", None).await.unwrap();
    }
    let archive = archive_status(&c).await;
    let snap = metric(&cluster.url(1), "flotilla_raft_snapshot_bytes").await;
    let archived_bytes = archive["bytes"].as_u64().unwrap();
    assert!(snap > 0 && snap < 256 * 1024, "snapshot {snap} bytes with every run archived ({archive})");
    assert!(archived_bytes > 20 * snap, "archive {archived_bytes} bytes vs snapshot {snap}");

    // Data files respect their size bound and each has its index.
    let ost = Ost::posix(cluster.nodes[&1].data_dir.join("ost")).unwrap();
    let files = ost.list_all("datamanager/data/").await.unwrap();
    let dat: Vec<_> = files.iter().filter(|f| f.key.ends_with(".dat")).collect();
    assert_eq!(dat.len() as u64, archive["files"].as_u64().unwrap(), "no orphan once settled: {files:?}");
    assert!(dat.len() >= 5, "1 MiB files for ~{archived_bytes} bytes: {}", dat.len());
    assert!(dat.iter().all(|f| f.size <= 1024 * 1024 + 64), "{dat:?}");

    // By id, from the archive: the same run as created (phase, group, annotations).
    for run in created.iter().step_by(197) {
        let got = c.run_get(&run.id).await.unwrap();
        assert_eq!(
            (&got.id, &got.group, got.phase, &got.annotations),
            (&run.id, &run.group, run.phase, &run.annotations)
        );
    }
    // Listing: everything, newest first, paged; by group (from the index); oldest first.
    let all = list_all(&c, None, false).await;
    assert_eq!(all.len() as u64, total, "each archived run listed once");
    assert!(all.windows(2).all(|w| w[0] > w[1]), "newest first, no duplicate");
    let listed: BTreeSet<&String> = all.iter().collect();
    assert!(created.iter().all(|r| listed.contains(&r.id)), "every created run is listed");
    let ax = list_all(&c, Some("/a/x"), true).await;
    assert!(ax.windows(2).all(|w| w[0] < w[1]));
    let want_ax: Vec<String> = created.iter().filter(|r| r.group == "/a/x").map(|r| r.id.clone()).collect();
    let ax_set: BTreeSet<&String> = ax.iter().collect();
    assert!(want_ax.iter().all(|id| ax_set.contains(id)));
    for id in ax.iter().step_by(700) {
        assert_eq!(c.run_get(id).await.map(|r| r.group).ok().as_deref(), Some("/a/x"), "{id}");
    }
    let a_all = list_all(&c, Some("/a"), false).await;
    assert!(a_all.len() >= created.iter().filter(|r| r.group.starts_with("/a/")).count());
    assert!(a_all.len() < all.len());
    // A new live run lists before the archived ones.
    let live = c
        .run_create(
            &serde_json::from_value(json!({"name": "live", "group": "/a/x", "tasks": [
        {"name": "t", "image": "busybox", "arch": "s390x", "steps": [{"run": {"command": "true"}}]}]}))
            .unwrap(),
        )
        .await
        .unwrap();
    let first =
        c.run_list(&RunQuery { group: Some("/a/x".into()), limit: 2, ..Default::default() }).await.unwrap();
    assert_eq!(first.runs[0].id, live.id);
    assert_eq!(first.runs[1].id, *ax.last().unwrap());
    assert!(first.more);

    // The index dump: one line per run, well under 100 bytes each.
    let dump = c.archive_dump_index().await.unwrap();
    assert_eq!(dump["runs"], json!(total + 1));
    let bytes = ost.get_bytes("datamanager/index/runs.idx", 64 * 1024 * 1024).await.unwrap();
    assert_eq!(bytes.iter().filter(|b| **b == b'\n').count() as u64, total + 1);
    assert!((bytes.len() as u64) < (total + 1) * 100, "{} bytes", bytes.len());

    // Deleting an archived run rewrites its file without it.
    let victim = &created[4321].id;
    c.run_delete(victim).await.unwrap();
    assert_eq!(c.run_get(victim).await.unwrap_err().status(), Some(404));
    assert_eq!(archive_status(&c).await["runs"], json!(total - 1));
    assert!(!list_all(&c, None, true).await.contains(victim));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_while_archiving_on_s3_loses_and_duplicates_no_run() {
    let s3 = S3Server::start(Kind::S3sFs);
    s3.ost("flotilla", "arch").await.unwrap(); // the bucket
    let url = s3.url("flotilla", "arch");
    let mut cluster = Cluster::bootstrap_with_env(
        3,
        &[
            "--ost",
            &url,
            "--archive-after-s",
            "0",
            "--archive-interval-ms",
            "100",
            "--archive-max-file-bytes",
            "262144",
        ],
        &s3.env(),
    )
    .await;
    let clients: Vec<Client> = (1..=3).map(|i| cluster.client(i)).collect();
    let mut created = create_many(&clients, 0..1500).await;
    // Archiving is under way: kill the leader now, and keep creating through the others.
    let leader = cluster.wait_for_leader().await;
    let before = archive_status(&clients[(leader as usize) % 3]).await;
    cluster.kill(leader);
    let others: Vec<Client> = (1..=3).filter(|i| *i != leader).map(|i| cluster.client(i)).collect();
    created.extend(create_many(&others, 1500..3000).await);
    cluster.start(leader);
    cluster.wait_healthy(leader).await;
    wait_archived(&others[0], 3000, &cluster).await;
    cluster.wait_caught_up().await;
    assert!(before["generation"].as_u64().unwrap() > 0, "archiving had started before the kill: {before}");

    let want: BTreeSet<String> = created.iter().map(|r| r.id.clone()).collect();
    let total = archive_status(&others[0]).await["runs"].as_u64().unwrap();
    for node in 1..=3 {
        let c = cluster.client(node);
        let ids = list_all(&c, None, true).await;
        let unique: BTreeSet<String> = ids.iter().cloned().collect();
        assert_eq!(ids.len(), unique.len(), "node {node} lists a run twice");
        assert_eq!(ids.len() as u64, total, "node {node}: every archived run, once");
        assert!(want.is_subset(&unique), "node {node} lost runs");
        for run in created.iter().step_by(251) {
            assert_eq!(c.run_get(&run.id).await.unwrap().id, run.id);
        }
    }
}
