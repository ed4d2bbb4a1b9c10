//! Export and import through real clusters: a cluster with runs in every phase is
//! exported, imported into a fresh three-node cluster, and every run, key and executor
//! reads the same there, from every node. Imports are refused outside maintenance and
//! when the file is corrupt, truncated or of another version, changing nothing.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use flotilla_api::types::{ExecutorInfo, RunCreate};
use flotilla_api::Client;
use flotilla_store::ost::test_servers::{Kind, S3Server};
use flotilla_store::run::{Phase, RunPhase};
use serde_json::json;

fn def(name: &str, arch: &str, setup_errors: &[&str]) -> RunCreate {
    serde_json::from_value(json!({
        "name": name, "group": format!("/exp/{name}"), "setup_errors": setup_errors,
        "tasks": [{"name": "t", "image": "busybox", "arch": arch, "steps": [{"run": {"command": "true"}}]}]
    }))
    .unwrap()
}

/// Plays executor `ex-1`: takes the task of `run_id` and reports `phase`.
async fn report(c: &Client, run_id: &str, phase: Phase) {
    let info: ExecutorInfo = serde_json::from_value(json!({"archs": ["amd64"]})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        c.executor_heartbeat("ex-1", &info).await.unwrap();
        let tasks = c.executor_tasks("ex-1", 0, 0).await.unwrap();
        if let Some(t) = tasks.tasks.into_iter().find(|t| t.spec.spec.run_id == run_id) {
            let mut s = t.status.clone();
            s.phase = phase;
            s.setup_step.phase = Phase::Success;
            for step in &mut s.steps {
                step.phase = phase;
            }
            c.executor_task_status("ex-1", &t.id, &s).await.unwrap();
            return;
        }
        assert!(Instant::now() < deadline, "task of {run_id} never dispatched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_phase(c: &Client, id: &str, phase: RunPhase) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.run_get(id).await.unwrap().phase != phase {
        assert!(Instant::now() < deadline, "run {id} never reached {phase:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn export(c: &Client) -> bytes::Bytes {
    c.export().await.unwrap().bytes().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_import_round_trip_between_three_node_clusters_and_bad_files_change_nothing() {
    // Finished runs are archived at once on the source, so the export carries archived
    // runs. Both clusters keep their objects on S3 (a cluster's nodes share one ost).
    let s3 = S3Server::start(Kind::S3sFs);
    s3.ost("source", "").await.unwrap();
    s3.ost("imported", "").await.unwrap();
    let a = Cluster::bootstrap_with_env(
        3,
        &["--ost", &s3.url("source", ""), "--archive-after-s", "0", "--archive-interval-ms", "100"],
        &s3.env(),
    )
    .await;
    let api = a.client(1);
    // Every phase a run rests in here (`queued` and `cancelled` last only until the next
    // scheduler round; the store's unit tests import queued runs).
    let setuperror = api.run_create(&def("setuperror", "amd64", &["bad config"])).await.unwrap();
    let waiting = api.run_create(&def("waiting", "s390x", &[])).await.unwrap();
    let running = api.run_create(&def("running", "amd64", &[])).await.unwrap();
    report(&api, &running.id, Phase::Running).await;
    let finished = api.run_create(&def("finished", "amd64", &[])).await.unwrap();
    report(&api, &finished.id, Phase::Success).await;
    let stopped = api.run_create(&def("stopped", "amd64", &[])).await.unwrap();
    report(&api, &stopped.id, Phase::Running).await;
    api.run_stop(&stopped.id).await.unwrap();
    report(&api, &stopped.id, Phase::Stopped).await;
    wait_phase(&api, &finished.id, RunPhase::Finished).await;
    wait_phase(&api, &stopped.id, RunPhase::Finished).await;
    wait_phase(&api, &running.id, RunPhase::Running).await;
    wait_phase(&api, &waiting.id, RunPhase::Running).await;
    api.kv_put("config/color", "blue", None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.archive_status().await.unwrap()["runs"] != json!(3) {
        assert!(Instant::now() < deadline, "the three ended runs were not archived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids = [&setuperror.id, &waiting.id, &running.id, &finished.id, &stopped.id];
    let results: Vec<String> = futures::future::join_all(ids.iter().map(|id| api.run_get(id)))
        .await
        .into_iter()
        .map(|r| {
            let r = r.unwrap();
            format!("{:?}/{:?}", r.phase, r.result)
        })
        .collect();
    assert_eq!(
        results,
        ["Setuperror/Failed", "Running/Unknown", "Running/Unknown", "Finished/Success", "Finished/Stopped"]
    );

    // Through the CLI, from a follower, to a file.
    let file = a.dir.path().join("cluster.export");
    let (code, _, err) = a.cli(2, &["export", "-o", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let exported = std::fs::read(&file).unwrap();

    let b = Cluster::bootstrap_with_env(3, &["--ost", &s3.url("imported", "")], &s3.env()).await;
    let target = b.client(2);
    let (code, _, err) = b.cli(1, &["import", "-i", file.to_str().unwrap()]);
    assert_eq!(code, 1, "import outside maintenance must be refused");
    assert!(err.contains("maintenance"), "{err}");
    assert_eq!(target.import(exported.clone().into()).await.unwrap_err().status(), Some(409));
    target.set_maintenance(true).await.unwrap();
    let before = export(&target).await;
    let mut corrupt = exported.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x01;
    let mut wrong_version = exported.clone();
    wrong_version[19] = 9;
    for (what, bad) in [
        ("corrupt", corrupt),
        ("truncated", exported[..exported.len() - 100].to_vec()),
        ("wrong version", wrong_version),
        ("not an export", b"{\"runs\": []}".to_vec()),
    ] {
        let e = target.import(bad.into()).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{what}: {e}");
    }
    assert_eq!(export(&target).await, before, "refused imports changed nothing");

    let (code, _, err) = b.cli(3, &["import", "-i", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(target.maintenance().await.unwrap().enabled, "the cluster stays in maintenance after an import");
    // Every node applies the import (through Raft) before maintenance ends.
    b.wait_caught_up().await;
    target.set_maintenance(false).await.unwrap();
    b.wait_caught_up().await;
    for node in 1..=3 {
        let c = b.client(node);
        for id in ids {
            let want = serde_json::to_value(api.run_get(id).await.unwrap()).unwrap();
            let got = serde_json::to_value(c.run_get(id).await.unwrap()).unwrap();
            assert_eq!(got, want, "run {id} on node {node}");
        }
        assert_eq!(c.kv_get("config/color", false).await.unwrap().value, "blue");
        let list = |l: flotilla_api::types::RunList| l.runs.into_iter().map(|r| r.id).collect::<Vec<_>>();
        let q = flotilla_api::client::RunQuery { limit: 100, ..Default::default() };
        assert_eq!(list(c.run_list(&q).await.unwrap()), list(api.run_list(&q).await.unwrap()));
        let ex: Vec<String> = c.executors().await.unwrap().executors.into_iter().map(|e| e.id).collect();
        assert_eq!(ex, ["ex-1"]);
        let archived = c.archive_status().await.unwrap();
        assert_eq!(
            (archived["runs"].clone(), archived["runs_in_state"].clone()),
            (json!(3), json!(2)),
            "node {node}"
        );
    }
    // New runs get ids after the imported ones.
    let next = target.run_create(&def("after", "s390x", &[])).await.unwrap();
    assert!(ids.iter().all(|id| next.id.as_str() > id.as_str()), "{} after {ids:?}", next.id);
}
