//! Logs, workspace archives and caches through real server processes into a real S3
//! server (s3s-fs) and into the default POSIX object storage; the executor side is played
//! by the test over the executor HTTP API. Also: the object-storage garbage collector, and
//! a clear 503 (not a hang) while S3 is down.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Cluster;
use flotilla_api::types::{ExecutorInfo, ExecutorTaskView, RunCreate};
use flotilla_api::Client;
use flotilla_store::ost::test_servers::{Kind, S3Server};
use flotilla_store::ost::Ost;
use flotilla_store::run::Phase;
use serde_json::json;

const EXECUTOR: &str = "exec-1";

async fn register(c: &Client) {
    let info: ExecutorInfo =
        serde_json::from_value(json!({"archs": ["amd64"], "active_tasks_limit": 4})).unwrap();
    c.executor_heartbeat(EXECUTOR, &info).await.expect("heartbeat");
}

/// Waits until the executor has a task named `name` (not stopped) and returns it.
async fn task_named(c: &Client, name: &str) -> ExecutorTaskView {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        register(c).await;
        let tasks = c.executor_tasks(EXECUTOR, 0, 0).await.expect("tasks");
        if let Some(t) = tasks.tasks.into_iter().find(|t| t.spec.spec.task_name == name) {
            return t;
        }
        assert!(Instant::now() < deadline, "task {name} never reached the executor");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn report(c: &Client, t: &ExecutorTaskView, phase: Phase) {
    let mut s = t.status.clone();
    s.phase = phase;
    for step in &mut s.steps {
        step.phase = phase;
        step.exit_status = phase.is_final().then_some(0);
    }
    c.executor_task_status(EXECUTOR, &t.id, &s).await.expect("status report");
}

fn gen(len: usize) -> Bytes {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect::<Vec<u8>>().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_archives_and_caches_flow_through_any_node_into_s3() {
    let mut s3 = S3Server::start(Kind::S3sFs);
    // Create the bucket; servers fail fast on few attempts so the outage check is quick.
    let direct = s3.ost("flotilla", "prod/ost").await.unwrap();
    let url = format!("{}&max_attempts=3&initial_backoff_ms=50", s3.url("flotilla", "prod/ost"));
    // Ended runs are archived at once: their logs must stay readable from the archive.
    let cluster = Cluster::bootstrap_with_env(
        3,
        &["--ost", &url, "--archive-after-s", "0", "--archive-interval-ms", "100"],
        &s3.env(),
    )
    .await;
    let leader = cluster.wait_for_leader().await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let (api, exec, reader) =
        (cluster.client(leader), cluster.client(followers[0]), cluster.client(followers[1]));

    let create: RunCreate = serde_json::from_value(json!({
        "name": "ost", "group": "/p/1", "cache_group": "/p",
        "tasks": [
            {"name": "build", "image": "busybox", "steps": [
                {"run": {"command": "make"}},
                {"save_to_workspace": {"contents": [{"source_dir": ".", "dest_dir": ".", "paths": ["bin/**"]}]}}
            ]},
            {"name": "test", "image": "busybox", "depends": [{"task": "build"}], "steps": [
                {"restore_workspace": {"dest_dir": "."}}
            ]}
        ]
    }))
    .unwrap();
    let run = api.run_create(&create).await.unwrap();
    register(&exec).await;
    let build = task_named(&exec, "build").await;
    report(&exec, &build, Phase::Running).await;

    // A reader on another follower follows the log before a byte exists.
    let follow = {
        let (reader, id) = (reader.clone(), run.id.clone());
        tokio::spawn(async move {
            let mut log = reader.run_log(&id, "build", "0", true).await.expect("follow");
            let mut got = Vec::new();
            let mut first_at = None;
            while let Some(chunk) = log.chunk().await.expect("chunk") {
                first_at.get_or_insert(Instant::now());
                got.extend_from_slice(&chunk);
            }
            (got, first_at)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Appends through a follower (forwarded to the leader), with the resend rules.
    let a = exec.executor_log_append(EXECUTOR, &build.id, "0", 0, "line 1\n".into(), false).await.unwrap();
    assert_eq!((a.size, a.stored), (7, false));
    let live_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = exec
        .executor_log_append(EXECUTOR, &build.id, "0", 0, "line 1\nline 2\n".into(), false)
        .await
        .unwrap();
    assert_eq!(a.size, 14, "an overlapping resend appends only what is new");
    let a = exec.executor_log_append(EXECUTOR, &build.id, "0", 100, "gap".into(), false).await.unwrap();
    assert_eq!(a.size, 14, "an append past the end is refused by size, not stored");
    let a = exec.executor_log_append(EXECUTOR, &build.id, "0", 14, "done\n".into(), true).await.unwrap();
    assert_eq!((a.size, a.stored), (19, true));
    let e =
        exec.executor_log_append(EXECUTOR, &build.id, "1", u64::MAX, "x".into(), false).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "an offset past u64 is refused, not a panic: {e}");
    let again = exec.executor_log_append(EXECUTOR, &build.id, "0", 14, "done\n".into(), true).await.unwrap();
    assert_eq!((again.size, again.stored), (19, true), "a retried final append is a no-op");
    let (got, first_at) =
        tokio::time::timeout(Duration::from_secs(10), follow).await.expect("follow ends").unwrap();
    assert_eq!(String::from_utf8(got).unwrap(), "line 1\nline 2\ndone\n");
    assert!(
        first_at.expect("bytes arrived") < live_at + Duration::from_millis(450),
        "the first line arrived while the step ran"
    );

    // The archive: streamed up through a follower, 3 MiB.
    let archive = gen(3 * 1024 * 1024 + 17);
    let stored = exec
        .executor_archive_put(EXECUTOR, &build.id, 1, archive.clone().into(), Some(archive.len() as u64))
        .await
        .unwrap();
    assert_eq!(stored.size, archive.len() as u64);
    report(&exec, &build, Phase::Success).await;

    // The child restores it from another node.
    let test = task_named(&exec, "test").await;
    assert_eq!(test.spec.data.as_ref().expect("data by default").workspace.len(), 1);
    let w = &test.spec.data.as_ref().expect("data by default").workspace[0];
    let restored =
        reader.executor_archive_get(EXECUTOR, &w.task_id, w.step).await.unwrap().bytes().await.unwrap();
    assert!(restored == archive, "restored archive differs");
    report(&exec, &test, Phase::Success).await;

    // Everything is in S3 under the base path, with one reference per run.
    let keys: Vec<String> = direct.list_all("").await.unwrap().into_iter().map(|o| o.key).collect();
    for want in [
        format!("logs/{}/0.log", build.id),
        format!("logs/{}/runs/{}", build.id, run.id),
        format!("workspacearchives/{}/1.tar", build.id),
        format!("workspacearchives/{}/runs/{}", build.id, run.id),
    ] {
        assert!(keys.contains(&want), "{want} missing from {keys:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.archive_status().await.unwrap()["runs"] != json!(1) {
        assert!(Instant::now() < deadline, "the finished run was not archived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Any node reads the stored log of the archived run; the CLI prints it.
    for id in 1..=3 {
        let log =
            cluster.client(id).run_log(&run.id, "build", "0", false).await.unwrap().bytes().await.unwrap();
        assert_eq!(log, "line 1\nline 2\ndone\n");
    }
    let (code, out, err) = cluster.cli(followers[1], &["run", "logs", &run.id, "build", "--step", "0"]);
    assert_eq!((code, out.as_str()), (0, "line 1\nline 2\ndone\n"), "{err}");

    // Bad requests: clear 4xx.
    let e = reader.run_log(&run.id, "build", "7", false).await.err().unwrap();
    assert_eq!(e.status(), Some(404), "{e}");
    let e = reader.run_log(&run.id, "nope", "0", false).await.err().unwrap();
    assert_eq!(e.status(), Some(404), "{e}");
    // Steps are addressed by name too: an unknown name is a missing step.
    let e = reader.run_log(&run.id, "build", "x", false).await.err().unwrap();
    assert_eq!(e.status(), Some(404), "{e}");
    let e = reader.run_log(&run.id, "test", "0", false).await.err().unwrap();
    assert_eq!(e.status(), Some(404), "a step that wrote no log: {e}");
    let (code, _, err) = cluster.cli(leader, &["run", "logs", &run.id, "nope"]);
    assert_eq!(code, 1, "{err}");

    // Caches: first save wins, lookup by prefix, exact get.
    let c1 = exec.executor_cache_put(EXECUTOR, "/p", "deps-abc", "v1".into(), None).await.unwrap();
    assert_eq!(c1.size, 2);
    exec.executor_cache_put(EXECUTOR, "/p", "deps-abc", "v2-ignored".into(), None).await.unwrap();
    assert_eq!(
        exec.executor_cache_match(EXECUTOR, "/p", "deps-").await.unwrap().key.as_deref(),
        Some("deps-abc")
    );
    assert_eq!(exec.executor_cache_match(EXECUTOR, "/p", "other-").await.unwrap().key, None);
    assert_eq!(
        exec.executor_cache_match(EXECUTOR, "/q", "deps-").await.unwrap().key,
        None,
        "caches are per group"
    );
    assert_eq!(
        reader.executor_cache_get(EXECUTOR, "/p", "deps-abc").await.unwrap().bytes().await.unwrap(),
        "v1"
    );
    assert!(keys_now(&direct).await.contains(&"caches/p/deps-abc.tar".to_string()));
    let e = exec.executor_cache_put(EXECUTOR, "/p", "a/b", "x".into(), None).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let e = exec.executor_cache_get(EXECUTOR, "/p", "missing").await.err().unwrap();
    assert_eq!(e.status(), Some(404), "{e}");

    // S3 down: an upload fails with a clear 503 quickly; nothing stored is lost.
    s3.stop();
    let started = Instant::now();
    let e = exec.executor_cache_put(EXECUTOR, "/p", "deps-new", gen(1000).into(), None).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    assert!(e.to_string().contains("object storage"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(20));
    s3.restart();
    let log = reader.run_log(&run.id, "build", "0", false).await.unwrap().bytes().await.unwrap();
    assert_eq!(log, "line 1\nline 2\ndone\n");
}

async fn keys_now(ost: &Ost) -> Vec<String> {
    ost.list_all("").await.unwrap().into_iter().map(|o| o.key).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_collects_unreferenced_logs_those_of_deleted_runs_and_old_caches() {
    let cluster = Cluster::bootstrap(
        1,
        &["--ost-gc-interval-s", "1", "--ost-gc-grace-s", "0", "--cache-max-age-s", "3"],
    )
    .await;
    let c = cluster.client(1);
    let def = |name: &str| -> RunCreate {
        serde_json::from_value(json!({
            "name": name, "group": "/g", "setup_errors": ["x"],
            "tasks": [{"name": "t", "image": "busybox", "steps": [{"run": {"command": "true"}}]}]
        }))
        .unwrap()
    };
    let kept_run = c.run_create(&def("kept")).await.unwrap();
    let gone_run = c.run_create(&def("gone")).await.unwrap();
    // The default object storage: <data dir>/ost, written to directly by the test.
    let ost = Ost::posix(cluster.nodes[&1].data_dir.join("ost")).unwrap();
    let kept =
        [format!("logs/{}.t/0.log", kept_run.id), format!("logs/{}.t/runs/{}", kept_run.id, kept_run.id)];
    let collected = [
        "logs/0000000000009999.t/0.log".to_string(),
        format!("workspacearchives/{}.t/0.tar", gone_run.id),
        format!("workspacearchives/{}.t/runs/{}", gone_run.id, gone_run.id),
    ];
    for k in kept.iter().chain(&collected) {
        ost.put_bytes(k, "x", true).await.unwrap();
    }
    ost.put_bytes("caches/g/deps-1.tar", "c", true).await.unwrap();
    // Deleting a run drops its references; its data goes once nothing references it.
    c.run_delete(&gone_run.id).await.unwrap();
    assert_eq!(c.run_get(&gone_run.id).await.unwrap_err().status(), Some(404));
    assert_eq!(c.run_delete(&gone_run.id).await.unwrap_err().status(), Some(404));

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let keys = keys_now(&ost).await;
        let garbage_gone = collected.iter().all(|k| !keys.contains(k));
        if garbage_gone {
            assert!(kept.iter().all(|k| keys.contains(k)), "referenced objects were collected: {keys:?}");
            if !keys.contains(&"caches/g/deps-1.tar".to_string()) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "not collected: {keys:?}\n{}", cluster.all_logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(keys_now(&ost).await.iter().all(|k| kept.contains(k)));
}
