//! The run lifecycle end to end (issue 18): restart (kept tasks share their logs and
//! workspace archives with the source run, which may be deleted or archived first),
//! per-group ordering, idempotent creates across a leader kill, `run wait` exit codes
//! through a leader kill, lifecycle events and refusals of bad input. Real server and
//! executor processes, a real Docker engine where tasks must run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_docker_image, Cluster, ExecutorProc, IMAGE, TOKEN};
use flotilla_api::types::{Run, RunCreate};
use flotilla_api::{Client, ClientError};
use flotilla_store::run::{RunPhase, RunResult, TaskStatus};
use serde_json::json;

fn def(body: serde_json::Value) -> RunCreate {
    let mut body = body;
    if let Some(tasks) = body["tasks"].as_array_mut() {
        for t in tasks {
            if t.get("image").is_none() {
                t["image"] = json!(IMAGE);
            }
        }
    }
    serde_json::from_value(body).expect("valid RunCreate")
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_final(c: &Client, id: &str) -> Run {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(run) = c.run_get(id).await {
            if run.phase.is_final() {
                return run;
            }
            assert!(Instant::now() < deadline, "run {id} did not end: {run:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn log(c: &Client, run: &str, task: &str, step: &str) -> String {
    let bytes = c.run_log(run, task, step, false).await.expect("log").bytes().await.unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Sends a raw request; returns (status, headers' idempotent-replayed, JSON body).
async fn raw(
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    body: &serde_json::Value,
) -> (u16, bool, serde_json::Value) {
    let mut req = reqwest::Client::new().request(method, url).bearer_auth(TOKEN).json(body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let replayed = resp.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, replayed, body)
}

fn objects_under(dir: &std::path::Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_succeeded_tasks_whose_outputs_outlive_the_deleted_source_until_the_last_run_goes() {
    require_docker_image();
    // A GC round every second with no grace: anything unreferenced goes at once.
    let cluster = Cluster::bootstrap(1, &["--ost-gc-interval-s", "1", "--ost-gc-grace-s", "0"]).await;
    let exec = ExecutorProc::start(&cluster, "lc-restart", &["--active-tasks-limit", "4"]);
    let c = cluster.client(1);
    let ost = cluster.nodes[&1].data_dir.join("ost");
    let source = c
        .run_create(&def(json!({
            "name": "pipeline", "group": "/lc/restart", "environment": {"PASS": "no"},
            "tasks": [
                {"name": "build", "steps": [
                    {"run": {"command": "mkdir -p out && echo built-once > out/app && echo build-ran"}},
                    {"save_to_workspace": {"contents": [{"source_dir": ".", "dest_dir": ".", "paths": ["out/**"]}]}}
                ]},
                {"name": "test", "depends": [{"task": "build"}], "steps": [
                    {"restore_workspace": {"dest_dir": "."}},
                    {"run": {"command": "cat out/app; echo PASS=$PASS; [ \"$PASS\" = yes ]"}}
                ]},
                {"name": "deploy", "depends": [{"task": "test"}], "steps": [{"run": {"command": "echo deployed"}}]}
            ]
        })))
        .await
        .unwrap();
    let source = wait_final(&c, &source.id).await;
    assert_eq!(source.result, RunResult::Failed);
    assert_eq!(source.tasks["test"].status, TaskStatus::Failed);
    assert_eq!(source.tasks["deploy"].status, TaskStatus::Skipped);

    // Restart from the failed task with a new environment: build is kept, test and the
    // skipped deploy below it run.
    let (code, out, err) =
        cluster.cli(1, &["run", "restart", &source.id, "--env", "PASS=yes", "--env", "EXTRA=1"]);
    assert_eq!(code, 0, "{err}");
    let second_id = out.trim().to_string();
    let second = wait_final(&c, &second_id).await;
    assert_eq!(second.restarted_from.as_deref(), Some(source.id.as_str()));
    assert_eq!((second.group.as_str(), second.result), ("/lc/restart", RunResult::Success), "{second:#?}");
    let build = &second.tasks["build"];
    assert_eq!(build.status, TaskStatus::Success);
    assert_eq!(build.restored_from.as_deref(), Some(source.id.as_str()), "build was kept, not run");
    assert_eq!(build.start_time, source.tasks["build"].start_time, "its step records are the source's");
    assert_eq!(second.tasks["deploy"].status, TaskStatus::Success, "a skipped task below a rerun one runs");
    // The rerun test restored the kept build's workspace, saved by the source run.
    let test_log = log(&c, &second_id, "test", "1").await;
    assert!(test_log.contains("built-once") && test_log.contains("PASS=yes"), "{test_log}");
    assert!(log(&c, &second_id, "build", "0").await.contains("build-ran"), "kept logs readable");
    // Nothing was copied: the only build outputs are the source's executor task's.
    let objects = objects_under(&ost);
    assert!(!objects.iter().any(|k| k.contains(&format!("{second_id}.build/"))), "{objects:?}");
    let src_task = format!("{}.build", source.id);
    assert!(objects.contains(&format!("workspacearchives/{src_task}/runs/{second_id}")), "{objects:?}");

    // Delete the source: its own references go, the restarted run's keep the data.
    c.run_delete(&source.id).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // a few GC rounds
    let objects = objects_under(&ost);
    let data = |kind: &str| {
        let prefix = format!("{kind}/{src_task}/");
        objects.iter().filter(|k| k.starts_with(&prefix) && !k[prefix.len()..].starts_with("runs/")).count()
    };
    assert!(data("workspacearchives") > 0 && data("logs") > 0, "the kept outputs stay: {objects:?}");
    assert!(log(&c, &second_id, "build", "0").await.contains("build-ran"));

    // A restart of the restart keeps everything; each kept task points at the run that
    // ran it (build: the deleted source, whose outputs are still referenced).
    let mut env = BTreeMap::new();
    env.insert("PASS".to_string(), "yes".to_string());
    let third = c.run_restart(&second_id, false, Some(env)).await.unwrap();
    assert_eq!(third.tasks["build"].restored_from.as_deref(), Some(source.id.as_str()));
    assert_eq!(third.tasks["test"].restored_from.as_deref(), Some(second_id.as_str()), "test kept too");
    let third = wait_final(&c, &third.id).await;
    assert_eq!(third.result, RunResult::Success);

    // from_start runs everything again, under its own executor tasks.
    let fourth = c.run_restart(&second_id, true, None).await.unwrap();
    assert!(fourth.tasks.values().all(|t| t.restored_from.is_none() && t.status == TaskStatus::Notstarted));
    let fourth = wait_final(&c, &fourth.id).await;
    assert_eq!(fourth.result, RunResult::Success, "the replaced environment carries over: PASS=yes");
    assert_eq!(fourth.tasks["build"].status, TaskStatus::Success);
    assert!(log(&c, &fourth.id, "test", "1").await.contains("PASS=yes"));
    assert!(log(&c, &fourth.id, "build", "0").await.contains("build-ran"));

    // Once every run using the first build's outputs is gone, the GC takes them.
    for id in [&second_id, &third.id] {
        c.run_delete(id).await.unwrap();
    }
    wait_until("the shared build outputs to be collected", Duration::from_secs(20), async || {
        !objects_under(&ost).iter().any(|k| k.starts_with(&format!("workspacearchives/{src_task}/")))
    })
    .await;
    drop(exec);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_runs_restart_from_their_archive_and_lifecycle_events_are_reported() {
    // Runs archive as soon as they end (no executor: setup errors end a run at once).
    let cluster = Cluster::bootstrap(1, &["--archive-after-s", "0", "--archive-interval-ms", "200"]).await;
    let c = cluster.client(1);
    let mut events = c.events(Some("/lc/archived")).await.unwrap();
    let created = c
        .run_create(&def(json!({
            "name": "broken", "group": "/lc/archived", "setup_errors": ["the config did not parse"],
            "environment": {"A": "1"},
            "tasks": [{"name": "t", "steps": [{"run": {"command": "true"}}]}]
        })))
        .await
        .unwrap();
    assert_eq!(created.phase, RunPhase::Setuperror);
    wait_until("the run to be archived", Duration::from_secs(20), async || {
        c.archive_status().await.is_ok_and(|a| a["runs"].as_u64() >= Some(1))
    })
    .await;
    let restarted = c.run_restart(&created.id, false, None).await.expect("an archived run restarts");
    assert_eq!(restarted.restarted_from.as_deref(), Some(created.id.as_str()));
    assert_eq!(restarted.phase, RunPhase::Setuperror, "same configuration, same setup errors");
    assert_eq!(restarted.setup_errors, ["the config did not parse"]);

    // The stream said: created, archived (by the archiver), restarted.
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|e| e["action"] == "restarted") {
        assert!(Instant::now() < deadline, "no restarted event: {seen:?}");
        let e = tokio::time::timeout(Duration::from_secs(20), events.next()).await.unwrap().unwrap().unwrap();
        seen.push(serde_json::to_value(&e).unwrap());
    }
    let archived = seen.iter().find(|e| e["action"] == "archived" && e["run_id"] == created.id.as_str());
    assert_eq!(archived.expect("an archived event")["actor"], "archiver", "{seen:?}");
    let restart = seen.iter().find(|e| e["action"] == "restarted").unwrap();
    assert_eq!(restart["run_id"], restarted.id.as_str());
    assert_eq!(restart["restarted_from"], created.id.as_str());

    // An import reports every run it brings (in the state: a run with no executor stays
    // running, never archived).
    let live = c
        .run_create(&def(
            json!({"name": "live", "group": "/lc/archived", "tasks": [{"name": "t", "steps": []}]}),
        ))
        .await
        .unwrap();
    let export = c.export().await.unwrap().bytes().await.unwrap();
    let mut events = c.events(Some("/lc/archived")).await.unwrap();
    c.set_maintenance(true).await.unwrap();
    c.import(export).await.unwrap();
    // One `imported` event per run the import brings, in no particular order: wait for
    // the live run's.
    let e = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = events.next().await.unwrap().unwrap();
            if e.action.is_some() && e.run_id == live.id {
                return e;
            }
        }
    })
    .await
    .expect("an imported event for the live run");
    assert_eq!(serde_json::to_value(e.action).unwrap(), "imported");
    c.set_maintenance(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lifecycle_input_is_refused_with_json_and_creates_nothing() {
    let cluster = Cluster::bootstrap(1, &[]).await;
    let c = cluster.client(1);
    let base = cluster.url(1);
    let runs = format!("{base}/api/v1/runs");
    let body = json!({"name": "r", "group": "/lc/bad", "tasks": [{"name": "t", "image": "i", "steps": []}]});
    let all = flotilla_api::client::RunQuery { limit: 1000, ..Default::default() };
    let count = async || c.run_list(&all).await.unwrap().runs.len();
    let before = count().await;

    let mut zero = body.clone();
    zero["max_running_in_group"] = json!(0);
    let (status, _, e) = raw(reqwest::Method::POST, &runs, None, &zero).await;
    assert_eq!((status, e["code"].as_str()), (400, Some("bad_request")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("max_running_in_group"), "{e}");
    zero["max_running_in_group"] = json!(-1);
    let (status, _, e) = raw(reqwest::Method::POST, &runs, None, &zero).await;
    assert_eq!(status, 400, "{e}");

    let long_key = "k".repeat(257);
    let (status, _, e) = raw(reqwest::Method::POST, &runs, Some(&long_key), &body).await;
    assert_eq!(status, 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("256"), "{e}");
    assert_eq!(count().await, before, "nothing created");

    // The same key: the same body (other key order) replays, another body is refused.
    let (status, replayed, first) = raw(reqwest::Method::POST, &runs, Some("key-1"), &body).await;
    assert_eq!((status, replayed), (201, false), "{first}");
    let reordered: serde_json::Value = serde_json::from_str(
        r#"{"tasks": [{"steps": [], "image": "i", "name": "t"}], "group": "/lc/bad", "name": "r"}"#,
    )
    .unwrap();
    let (status, replayed, again) = raw(reqwest::Method::POST, &runs, Some("key-1"), &reordered).await;
    assert_eq!((status, replayed), (200, true), "{again}");
    assert_eq!(again["id"], first["id"]);
    let mut other = body.clone();
    other["name"] = json!("another");
    let (status, _, e) = raw(reqwest::Method::POST, &runs, Some("key-1"), &other).await;
    assert_eq!((status, e["code"].as_str()), (422, Some("idempotency_key_reused")), "{e}");
    assert_eq!(count().await, before + 1, "one run for key-1");

    // Restart: a queued run (no executor: it stays running or queued), an unknown run, a
    // bad body.
    let id = first["id"].as_str().unwrap();
    let actions = format!("{runs}/{id}/actions");
    let (status, _, e) = raw(reqwest::Method::PUT, &actions, None, &json!({"action": "restart"})).await;
    assert_eq!(status, 409, "{e}");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("queued") || msg.contains("running"), "the phase is named: {msg}");
    let (status, _, e) = raw(
        reqwest::Method::PUT,
        &format!("{runs}/9999999999999999/actions"),
        None,
        &json!({"action": "restart"}),
    )
    .await;
    assert_eq!((status, e["code"].as_str()), (404, Some("not_found")), "{e}");
    let (status, _, e) =
        raw(reqwest::Method::PUT, &actions, None, &json!({"action": "restart", "from_start": "yes"})).await;
    assert_eq!(status, 400, "{e}");
    let (status, _, e) = raw(reqwest::Method::PUT, &actions, None, &json!({"action": "explode"})).await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(count().await, before + 1, "no restart created anything");
    // The CLI says the same and exits 1.
    let (code, _, err) = cluster.cli(1, &["run", "restart", id]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("only a finished"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_a_group_with_a_limit_start_one_at_a_time_in_order() {
    // No executor: a started run stays running (its task waits for one) until stopped.
    let cluster = Cluster::bootstrap(1, &[]).await;
    let c = cluster.client(1);
    let mk = |group: &str, limit: Option<u32>| {
        let mut d = def(json!({"name": "r", "group": group, "tasks": [{"name": "t", "steps": []}]}));
        d.max_running_in_group = limit;
        d
    };
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(c.run_create(&mk("/lc/one", Some(1))).await.unwrap().id);
    }
    let two_a = c.run_create(&mk("/lc/two", Some(2))).await.unwrap().id;
    let two_b = c.run_create(&mk("/lc/two", Some(2))).await.unwrap().id;
    let phase = async |id: &str| c.run_get(id).await.unwrap().phase;
    wait_until("the first runs to start", Duration::from_secs(20), async || {
        phase(&ids[0]).await == RunPhase::Running
            && phase(&two_a).await == RunPhase::Running
            && phase(&two_b).await == RunPhase::Running
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // a few scheduler sweeps
    assert_eq!(phase(&ids[1]).await, RunPhase::Queued);
    assert_eq!(phase(&ids[2]).await, RunPhase::Queued);
    // Stopping the running one lets the next start, and only the next.
    c.run_stop(&ids[0]).await.unwrap();
    wait_until("the second run to start", Duration::from_secs(20), async || {
        phase(&ids[1]).await == RunPhase::Running
    })
    .await;
    assert!(phase(&ids[0]).await.is_final());
    assert_eq!(phase(&ids[2]).await, RunPhase::Queued);
    // Stopping a queued run cancels it without waiting its turn; the last one then waits
    // only for the running one.
    c.run_stop(&ids[2]).await.unwrap();
    wait_until("the stopped queued run to be cancelled", Duration::from_secs(20), async || {
        phase(&ids[2]).await == RunPhase::Cancelled
    })
    .await;
    assert_eq!(phase(&ids[1]).await, RunPhase::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_retried_creates_through_a_leader_kill_yields_exactly_one_run_each() {
    let mut cluster = Cluster::bootstrap(3, &[]).await;
    let servers: Vec<String> = (1..=3).map(|id| cluster.url(id)).collect();
    let c = Client::new(&servers.join(","), Some(TOKEN.into()));
    let logical = 60usize;
    let mut handles = Vec::new();
    for i in 0..logical {
        let c = c.clone();
        handles.push(tokio::spawn(async move {
            // Spread over time, so the kill lands in the middle of the burst.
            tokio::time::sleep(Duration::from_millis(40 * i as u64)).await;
            let d = def(json!({"name": format!("create-{i}"), "group": "/lc/burst", "tasks": [{"name": "t", "steps": []}]}));
            // Another start server per create, so some go through followers.
            let c = c.at(&c.servers()[i % 3].clone());
            c.run_create(&d).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(40 * logical as u64 / 2)).await;
    let leader = cluster.wait_for_leader().await;
    cluster.kill(leader);
    let mut failed: Vec<ClientError> = Vec::new();
    let mut created = BTreeMap::new();
    for h in handles {
        match h.await.unwrap() {
            Ok(run) => {
                created.insert(run.name.clone(), run.id);
            }
            Err(e) => failed.push(e),
        }
    }
    assert!(failed.is_empty(), "every create succeeds with retries: {failed:?}");
    assert_eq!(created.len(), logical);
    cluster.start(leader);
    cluster.wait_caught_up().await;
    let c = cluster.client(leader);
    let list = c
        .run_list(&flotilla_api::client::RunQuery {
            group: Some("/lc/burst".into()),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut per_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &list.runs {
        per_name.entry(r.name.clone()).or_default().push(r.id.clone());
    }
    assert_eq!(per_name.len(), logical);
    for (name, ids) in &per_name {
        assert_eq!(ids.len(), 1, "{name} was created {} times: {ids:?}", ids.len());
        assert_eq!(&created[name], &ids[0], "the answer named the one run");
    }
}

/// `flotilla run wait` as a child process against all three servers.
fn spawn_wait(servers: &str, token_file: &std::path::Path, args: &[&str]) -> std::process::Child {
    Command::new(common::bin())
        .args(["run", "wait"])
        .args(args)
        .env("FLOTILLA_SERVER", servers)
        .env("FLOTILLA_TOKEN_FILE", token_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run wait")
}

fn finish(child: std::process::Child, timeout: Duration) -> (i32, String, String) {
    let deadline = Instant::now() + timeout;
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("run wait did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_wait_exit_codes_survive_a_leader_kill() {
    require_docker_image();
    let mut cluster = Cluster::bootstrap(3, &[]).await;
    let exec = ExecutorProc::start(&cluster, "lc-wait", &["--active-tasks-limit", "4"]);
    let servers: Vec<String> = (1..=3).map(|id| cluster.url(id)).collect();
    let all = servers.join(",");
    let c = Client::new(&all, Some(TOKEN.into()));
    let token_file = cluster.token_file.clone();
    let ok = c
        .run_create(&def(json!({"name": "slow-ok", "group": "/lc/wait",
            "tasks": [{"name": "t", "steps": [{"run": {"command": "sleep 6"}}]}]})))
        .await
        .unwrap();
    let bad = c
        .run_create(&def(json!({"name": "slow-bad", "group": "/lc/wait",
        "tasks": [{"name": "t", "steps": [
            {"run": {"command": "sleep 6"}},
            {"run": {"name": "check", "command": "exit 7"}}
        ]}]})))
        .await
        .unwrap();
    let w_ok = spawn_wait(&all, &token_file, &[&ok.id, "--timeout-s", "120"]);
    let w_bad = spawn_wait(&all, &token_file, &[&bad.id, "--timeout-s", "120"]);
    let w_short = spawn_wait(&all, &token_file, &[&ok.id, "--timeout-s", "1"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = cluster.wait_for_leader().await;
    cluster.kill(leader);

    let (code, out, err) = finish(w_ok, Duration::from_secs(150));
    assert_eq!(
        code,
        0,
        "a successful run exits 0 through the leader kill: {out}\n{err}\n{}",
        exec.log_tail()
    );
    let (code, out, err) = finish(w_bad, Duration::from_secs(150));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("task t failed at step 1 (exit code 7)"), "names the failed task and step: {err}");
    let (code, _, err) = finish(w_short, Duration::from_secs(30));
    assert_eq!(code, 3, "a timeout exits 3: {err}");

    // An unknown run is refused (1); no reachable server is 3.
    let (code, _, err) =
        finish(spawn_wait(&all, &token_file, &["9999999999999999"]), Duration::from_secs(60));
    assert_eq!(code, 1, "{err}");
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let (code, _, err) =
        finish(spawn_wait(&dead, &token_file, &[&ok.id, "--timeout-s", "2"]), Duration::from_secs(30));
    assert_eq!(code, 3, "{err}");
    cluster.start(leader);
    drop(exec);
}
