//! Runs end to end through real server processes. The executor side is played by the test
//! through the real executor HTTP API (register, long-poll tasks, report status), so the
//! scheduler's behaviour is checked without Docker (the Docker executor has its own tests).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Cluster;
use flotilla_api::types::{Event, ExecutorInfo, ExecutorTaskStatus, ExecutorTaskView, Run, RunCreate};
use flotilla_api::{Client, ClientError};
use flotilla_store::event::EventKind;
use flotilla_store::run::{Phase, RunPhase, RunResult, TaskStatus};
use serde_json::json;

/// What the fake executor does with a task.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Succeed,
    Fail,
    /// Report running and keep running until told to stop.
    Hold,
}

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, String)>>>);

impl Received {
    /// (executor id, executor task id) pairs, in the order tasks were received.
    fn all(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap().clone()
    }
    fn count(&self, task_id: &str) -> usize {
        self.all().iter().filter(|(_, t)| t == task_id).count()
    }
    fn executor_of(&self, task_name: &str) -> Option<String> {
        self.all().into_iter().find(|(_, t)| t.ends_with(&format!(".{task_name}"))).map(|(e, _)| e)
    }
}

fn info(archs: &[&str], privileged: bool, dynamic: bool) -> ExecutorInfo {
    serde_json::from_value(json!({
        "archs": archs, "allow_privileged_containers": privileged, "dynamic": dynamic, "active_tasks_limit": 4
    }))
    .unwrap()
}

/// Retries what a real executor retries: transport errors and 5xx (elections, failover).
async fn retry<T, F, Fut>(what: &str, f: F) -> Result<T, ClientError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Err(e) if e.status().is_none_or(|s| s >= 500) && Instant::now() < deadline => {
                eprintln!("{what}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

fn status_of(t: &ExecutorTaskView, phase: Phase) -> ExecutorTaskStatus {
    let now = flotilla_scheduler::now_ms();
    let mut s = t.status.clone();
    s.phase = phase;
    s.start_time = s.start_time.or(Some(now));
    for step in &mut s.steps {
        step.phase = phase;
        step.start_time = step.start_time.or(Some(now));
        if phase.is_final() {
            step.end_time = Some(now);
            step.exit_status = Some(if phase == Phase::Success { 0 } else { 1 });
        }
    }
    if phase.is_final() {
        s.end_time = Some(now);
    }
    s
}

/// A test executor: registers, heartbeats, long-polls its tasks and plays `outcome`.
/// It talks to the first of `servers` that answers, so it survives a node's death.
fn spawn_executor(
    servers: Vec<Client>,
    id: &str,
    info: ExecutorInfo,
    outcome: impl Fn(&str) -> Outcome + Send + Sync + 'static,
) -> (Received, tokio::task::JoinHandle<()>) {
    let received = Received::default();
    let rec = received.clone();
    let id = id.to_string();
    let handle = tokio::spawn(async move {
        let mut current = 0usize;
        let mut since = 0u64;
        let mut seen: BTreeMap<String, Phase> = BTreeMap::new();
        let mut last_heartbeat = Instant::now() - Duration::from_secs(10);
        loop {
            let c = &servers[current % servers.len()];
            if last_heartbeat.elapsed() > Duration::from_millis(500) {
                if c.executor_heartbeat(&id, &info).await.is_err() {
                    current += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                last_heartbeat = Instant::now();
            }
            let tasks = match c.executor_tasks(&id, since, 1000).await {
                Ok(t) => t,
                Err(e) if e.status() == Some(404) => {
                    last_heartbeat = Instant::now() - Duration::from_secs(10);
                    continue;
                }
                Err(_) => {
                    current += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            since = tasks.revision;
            for t in tasks.tasks {
                let reported = seen.get(&t.id).copied();
                if reported.is_some_and(|p| p.is_final()) {
                    continue;
                }
                let next = if t.spec.spec.stop {
                    if reported.is_none() {
                        Phase::Cancelled
                    } else {
                        Phase::Stopped
                    }
                } else if reported.is_none() {
                    rec.0.lock().unwrap().push((id.clone(), t.id.clone()));
                    Phase::Running
                } else {
                    match outcome(&t.spec.spec.task_name) {
                        Outcome::Succeed => Phase::Success,
                        Outcome::Fail => Phase::Failed,
                        Outcome::Hold => continue,
                    }
                };
                let status = status_of(&t, next);
                let r = retry("report status", || c.executor_task_status(&id, &t.id, &status)).await;
                match r {
                    Ok(()) => {}
                    Err(e) if e.status() == Some(404) => {} // already reported and removed
                    Err(e) => panic!("status report for {} refused: {e}", t.id),
                }
                seen.insert(t.id.clone(), next);
                if next == Phase::Running {
                    since = 0; // look again at once: the next step for this task is due
                }
            }
        }
    });
    (received, handle)
}

async fn create(c: &Client, body: serde_json::Value) -> Run {
    let create: RunCreate = serde_json::from_value(body).expect("valid RunCreate");
    c.run_create(&create).await.expect("run created")
}

async fn wait_final(c: &Client, id: &str) -> Run {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(run) = c.run_get(id).await {
            if run.phase.is_final() {
                return run;
            }
            assert!(Instant::now() < deadline, "run {id} did not end: {run:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn task(name: &str, depends: serde_json::Value) -> serde_json::Value {
    json!({"name": name, "image": "busybox", "depends": depends, "steps": [{"run": {"command": "true"}}]})
}

fn statuses(run: &Run) -> BTreeMap<&str, TaskStatus> {
    run.tasks.iter().map(|(k, t)| (k.as_str(), t.status)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diamond_with_a_failing_branch_runs_on_failure_children_and_streams_events_in_order() {
    let cluster = Cluster::bootstrap(3, &[]).await;
    let leader = cluster.wait_for_leader().await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    // Events from one follower, executor on the other, API calls via the leader.
    let mut events = cluster.client(followers[0]).events(None).await.unwrap();
    let (received, _exec) =
        spawn_executor(vec![cluster.client(followers[1])], "e1", info(&["amd64"], false, false), |t| {
            if t == "b" {
                Outcome::Fail
            } else {
                Outcome::Succeed
            }
        });
    let c = cluster.client(leader);
    let run = create(
        &c,
        json!({"name": "diamond", "group": "/project/1", "tasks": [
            task("a", json!([])),
            task("b", json!([{"task": "a"}])),
            task("c", json!([{"task": "a"}])),
            task("on_b_failure", json!([{"task": "b", "conditions": ["on_failure"]}])),
            task("on_b_success", json!([{"task": "b", "conditions": ["on_success"]}])),
            task("on_skipped", json!([{"task": "on_b_success", "conditions": ["on_skipped"]}])),
            task("join", json!([{"task": "b"}, {"task": "c"}])),
        ]}),
    )
    .await;
    assert_eq!(run.phase, RunPhase::Queued);
    let done = wait_final(&c, &run.id).await;
    let want = BTreeMap::from([
        ("a", TaskStatus::Success),
        ("b", TaskStatus::Failed),
        ("c", TaskStatus::Success),
        ("on_b_failure", TaskStatus::Success),
        ("on_b_success", TaskStatus::Skipped),
        ("on_skipped", TaskStatus::Success),
        ("join", TaskStatus::Skipped),
    ]);
    assert_eq!(statuses(&done), want);
    assert_eq!((done.phase, done.result), (RunPhase::Finished, RunResult::Failed));
    for name in ["a", "b", "c", "on_b_failure", "on_skipped"] {
        assert_eq!(received.count(&format!("{}.{name}", run.id)), 1, "task {name} handed out once");
        let t = &done.tasks[name];
        assert!(t.start_time.is_some() && t.end_time.is_some(), "{name} has times");
    }
    assert_eq!(received.all().len(), 5, "skipped tasks never reach an executor");

    // The whole run as events, in log order, from a node that is not the leader.
    let mut got: Vec<Event> = Vec::new();
    while !got.last().is_some_and(|e| e.kind == EventKind::Run && e.phase == RunPhase::Finished) {
        let e = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("event in time")
            .unwrap()
            .expect("stream open");
        got.push(e);
    }
    assert!(got.windows(2).all(|w| w[0].revision <= w[1].revision), "events in log order");
    let run_phases: Vec<RunPhase> =
        got.iter().filter(|e| e.kind == EventKind::Run).map(|e| e.phase).collect();
    assert_eq!(run_phases, [RunPhase::Queued, RunPhase::Running, RunPhase::Finished]);
    assert_eq!(got.last().unwrap().result, RunResult::Failed);
    for (name, final_status) in &want {
        let seq: Vec<TaskStatus> =
            got.iter().filter(|e| e.task.as_deref() == Some(*name)).filter_map(|e| e.status).collect();
        let expected = if *final_status == TaskStatus::Skipped {
            vec![TaskStatus::Skipped]
        } else {
            vec![TaskStatus::Running, *final_status]
        };
        assert_eq!(seq, expected, "events of task {name}");
    }
    // `run wait` reports the failure with exit code 1.
    let (code, out, _) = cluster.cli(followers[0], &["run", "wait", &run.id, "--timeout-s", "10"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("failed"), "{out}");
}

#[tokio::test]
async fn a_run_with_setup_errors_is_created_in_setuperror_and_never_scheduled() {
    let cluster = Cluster::bootstrap(1, &[]).await;
    let c = cluster.client(1);
    c.executor_heartbeat("e1", &info(&["amd64"], false, false)).await.unwrap();
    let run = create(
        &c,
        json!({"name": "broken", "setup_errors": ["config: unknown key 'foo'"], "tasks": [task("a", json!([]))]}),
    )
    .await;
    assert_eq!((run.phase, run.result), (RunPhase::Setuperror, RunResult::Failed));
    assert_eq!(run.setup_errors, ["config: unknown key 'foo'"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tasks = c.executor_tasks("e1", 0, 0).await.unwrap();
    assert!(tasks.tasks.is_empty(), "{tasks:?}");
    let again = c.run_get(&run.id).await.unwrap();
    assert_eq!(again.tasks["a"].status, TaskStatus::Notstarted);
    let listed = c
        .run_list(&flotilla_api::client::RunQuery {
            phase: Some("setuperror".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), [run.id.as_str()]);
    let err = c.run_stop(&run.id).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_needing_two_approvers_waits_for_both_while_the_rest_of_the_run_goes_on() {
    let cluster = Cluster::bootstrap(1, &[]).await;
    let c = cluster.client(1);
    let (_, _exec) =
        spawn_executor(vec![c.clone()], "e1", info(&["amd64"], false, false), |_| Outcome::Succeed);
    let mut gated = task("deploy", json!([{"task": "build"}]));
    gated["needs_approval"] = json!(true);
    gated["approvers_required"] = json!(2);
    let run = create(
        &c,
        json!({"name": "gated", "tasks": [task("build", json!([])), gated, task("lint", json!([]))]}),
    )
    .await;
    wait_for("deploy waiting for approval", async || {
        c.run_get(&run.id).await.is_ok_and(|r| r.tasks["deploy"].waiting_approval)
    })
    .await;
    wait_for("the other tasks to end", async || {
        c.run_get(&run.id).await.is_ok_and(|r| r.tasks["lint"].status == TaskStatus::Success)
    })
    .await;
    let (code, _, err) = cluster.cli(1, &["run", "approve", &run.id, "deploy", "--approver", "alice"]);
    assert_eq!(code, 0, "{err}");
    // The same approver twice still counts once.
    let (code, _, err) = cluster.cli(1, &["run", "approve", &run.id, "deploy", "--approver", "alice"]);
    assert_eq!(code, 0, "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = c.run_get(&run.id).await.unwrap();
    assert_eq!(r.tasks["deploy"].status, TaskStatus::Notstarted);
    assert!(r.tasks["deploy"].waiting_approval && !r.tasks["deploy"].approved);
    assert_eq!(r.phase, RunPhase::Running);

    let (code, _, err) = cluster.cli(1, &["run", "approve", &run.id, "deploy", "--approver", "bob"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cluster.cli(1, &["run", "wait", &run.id, "--timeout-s", "20"]);
    assert_eq!(code, 0, "{out}{err}");
    let done = c.run_get(&run.id).await.unwrap();
    assert_eq!(done.result, RunResult::Success);
    assert!(done.tasks["deploy"].approved);
    assert_eq!(done.tasks["deploy"].status, TaskStatus::Success);
    // Approving a task that needs no approval is a conflict, an unknown task a 404.
    assert_eq!(c.task_approve(&run.id, "lint").await.unwrap_err().status(), Some(409));
    assert_eq!(c.task_approve(&run.id, "nope").await.unwrap_err().status(), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_running_run_stops_running_tasks_and_cancels_pending_ones() {
    let cluster = Cluster::bootstrap(1, &[]).await;
    let c = cluster.client(1);
    let (_, _exec) = spawn_executor(vec![c.clone()], "e1", info(&["amd64"], false, false), |t| {
        if t == "long" {
            Outcome::Hold
        } else {
            Outcome::Succeed
        }
    });
    let run = create(&c, json!({"name": "stoppable", "tasks": [task("long", json!([])), task("after", json!([{"task": "long"}]))]})).await;
    wait_for("the long task to run", async || {
        c.run_get(&run.id).await.is_ok_and(|r| r.tasks["long"].status == TaskStatus::Running)
    })
    .await;
    let (code, _, err) = cluster.cli(1, &["run", "stop", &run.id]);
    assert_eq!(code, 0, "{err}");
    let done = wait_final(&c, &run.id).await;
    assert_eq!((done.phase, done.result), (RunPhase::Finished, RunResult::Stopped));
    assert_eq!(done.tasks["long"].status, TaskStatus::Stopped);
    assert_eq!(done.tasks["after"].status, TaskStatus::Cancelled);
    assert!(done.stop);
    let (code, _, err) = cluster.cli(1, &["run", "stop", &run.id]);
    assert_eq!(code, 1, "stopping a finished run is refused");
    assert!(err.contains("409"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_executor_mid_run_fails_its_tasks_with_end_times() {
    let cluster = Cluster::bootstrap(1, &[]).await;
    let c = cluster.client(1);
    let (_, exec) = spawn_executor(vec![c.clone()], "e1", info(&["amd64"], false, false), |_| Outcome::Hold);
    let run = create(
        &c,
        json!({"name": "orphaned", "tasks": [task("a", json!([])), task("b", json!([{"task": "a"}]))]}),
    )
    .await;
    wait_for("task a to run", async || {
        c.run_get(&run.id).await.is_ok_and(|r| r.tasks["a"].status == TaskStatus::Running)
    })
    .await;
    exec.abort(); // the host is gone; an admin removes it
    let _ = exec.await;
    c.executor_delete("e1").await.unwrap();
    assert!(c.executors().await.unwrap().executors.is_empty());
    let done = wait_final(&c, &run.id).await;
    let a = &done.tasks["a"];
    assert_eq!(a.status, TaskStatus::Failed);
    assert!(a.error.as_deref().unwrap_or("").contains("e1"), "{a:?}");
    let end = a.end_time.expect("task end time");
    assert!(end >= a.start_time.unwrap());
    assert!(a.steps.iter().all(|s| s.phase == Phase::Failed && s.end_time.is_some()), "{:?}", a.steps);
    assert_eq!(done.tasks["b"].status, TaskStatus::Skipped);
    assert_eq!((done.phase, done.result), (RunPhase::Finished, RunResult::Failed));
    assert_eq!(c.executor_delete("e1").await.unwrap_err().status(), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_go_to_executors_of_their_arch_and_privileged_ones_only_where_allowed() {
    let cluster = Cluster::bootstrap(1, &[]).await;
    let c = cluster.client(1);
    let (received_x86, _a) =
        spawn_executor(vec![c.clone()], "x86", info(&["amd64"], false, false), |_| Outcome::Succeed);
    let (received_arm, _b) =
        spawn_executor(vec![c.clone()], "arm", info(&["arm64"], true, false), |_| Outcome::Succeed);
    wait_for("both executors", async || c.executors().await.is_ok_and(|l| l.executors.len() == 2)).await;
    let with = |name: &str, extra: serde_json::Value| {
        let mut t = task(name, json!([]));
        t.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        t
    };
    let run = create(
        &c,
        json!({"name": "archs", "tasks": [
            with("on_amd", json!({"arch": "amd64"})),
            with("on_arm", json!({"arch": "arm64"})),
            with("priv_amd", json!({"arch": "amd64", "privileged": true})),
            with("priv_any", json!({"privileged": true})),
        ]}),
    )
    .await;
    let done = wait_final(&c, &run.id).await;
    assert_eq!(received_x86.executor_of("on_amd").as_deref(), Some("x86"));
    assert_eq!(received_arm.executor_of("on_arm").as_deref(), Some("arm"));
    assert_eq!(received_arm.executor_of("priv_any").as_deref(), Some("arm"));
    assert_eq!(received_x86.executor_of("priv_amd").or(received_arm.executor_of("priv_amd")), None);
    let p = &done.tasks["priv_amd"];
    assert_eq!(p.status, TaskStatus::Failed);
    assert_eq!(p.setup_step.phase, Phase::Failed);
    assert!(p.error.as_deref().unwrap().contains("privileged"), "{p:?}");
    assert_eq!(done.tasks["priv_any"].status, TaskStatus::Success);
    assert_eq!(done.result, RunResult::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_run_finishes_the_run_on_the_new_leader_with_no_task_run_twice() {
    let mut cluster = Cluster::bootstrap(3, &[]).await;
    let leader = cluster.wait_for_leader().await;
    let others: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let servers: Vec<Client> =
        others.iter().map(|i| cluster.client(*i)).chain([cluster.client(leader)]).collect();
    let (received, _exec) =
        spawn_executor(servers, "e1", info(&["amd64"], false, false), |_| Outcome::Succeed);
    let c = cluster.client(others[0]);
    let names: Vec<String> = (0..8).map(|i| format!("step{i}")).collect();
    let tasks: Vec<serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| task(n, if i == 0 { json!([]) } else { json!([{"task": names[i - 1]}]) }))
        .collect();
    let run = create(&c, json!({"name": "chain", "tasks": tasks})).await;
    wait_for("half the chain", async || {
        c.run_get(&run.id).await.is_ok_and(|r| r.tasks["step3"].status == TaskStatus::Success)
    })
    .await;
    cluster.kill(leader);
    let done = wait_final(&c, &run.id).await;
    assert_eq!((done.phase, done.result), (RunPhase::Finished, RunResult::Success), "{done:#?}");
    for n in &names {
        assert_eq!(received.count(&format!("{}.{n}", run.id)), 1, "task {n} was handed out exactly once");
    }
    let new_leader = cluster.wait_for_leader().await;
    assert_ne!(new_leader, leader);
    // The killed node comes back and agrees.
    cluster.start(leader);
    cluster.wait_caught_up().await;
    let seen_by_old: Run = cluster.client(leader).run_get(&run.id).await.unwrap();
    assert_eq!(seen_by_old, done);
}

#[tokio::test]
async fn bad_run_definitions_are_refused_with_400_and_create_nothing() {
    let cluster = Cluster::bootstrap(1, &[]).await;
    let url = format!("{}/api/v1/runs", cluster.url(1));
    let http = reqwest::Client::new();
    let many: Vec<serde_json::Value> =
        (0..10_000).map(|i| json!({"name": format!("t{i}"), "image": "b"})).collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("cycle", serde_json::to_vec(&json!({"name": "r", "tasks": [task("a", json!([{"task": "b"}])), task("b", json!([{"task": "a"}]))]})).unwrap(), "cycle"),
        ("unknown dependency", serde_json::to_vec(&json!({"name": "r", "tasks": [task("a", json!([{"task": "ghost"}]))]})).unwrap(), "ghost"),
        ("unknown step type", serde_json::to_vec(&json!({"name": "r", "tasks": [{"name": "a", "image": "b", "steps": [{"explode": {}}]}]})).unwrap(), "explode"),
        ("10,000 tasks", serde_json::to_vec(&json!({"name": "r", "tasks": many})).unwrap(), "limit"),
        ("duplicate task", serde_json::to_vec(&json!({"name": "r", "tasks": [task("a", json!([])), task("a", json!([]))]})).unwrap(), "twice"),
        ("unknown condition", serde_json::to_vec(&json!({"name": "r", "tasks": [task("a", json!([])), task("b", json!([{"task": "a", "conditions": ["on_tuesday"]}]))]})).unwrap(), "on_tuesday"),
        ("misspelled field", serde_json::to_vec(&json!({"name": "r", "taks": []})).unwrap(), "taks"),
        ("malformed JSON", b"{\"name\": \"r\", \"tasks\": [".to_vec(), "invalid JSON"),
        ("bad task name", serde_json::to_vec(&json!({"name": "r", "tasks": [task("a/../b", json!([]))]})).unwrap(), "task name"),
    ];
    for (what, body, needle) in cases {
        let resp = http.post(&url).bearer_auth(common::TOKEN).body(body).send().await.unwrap();
        let status = resp.status().as_u16();
        let err: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(status, 400, "{what}: {err}");
        assert_eq!(err["code"], "bad_request", "{what}");
        assert!(err["message"].as_str().unwrap().contains(needle), "{what}: {err}");
    }
    let list = cluster
        .client(1)
        .run_list(&flotilla_api::client::RunQuery { limit: 10, ..Default::default() })
        .await
        .unwrap();
    assert!(list.runs.is_empty(), "nothing was created: {list:?}");

    // The CLI parses locally: a malformed file is a usage error, a cycle a refusal.
    let dir = tempfile::tempdir().unwrap();
    let bad_yaml = dir.path().join("bad.yaml");
    std::fs::write(&bad_yaml, "name: r\ntasks: [\n").unwrap();
    let (code, _, err) = cluster.cli(1, &["run", "create", "-f", bad_yaml.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    let cycle = dir.path().join("cycle.yaml");
    std::fs::write(&cycle, "name: r\ntasks:\n  - {name: a, image: b, depends: [{task: a}]}\n").unwrap();
    let (code, _, err) = cluster.cli(1, &["run", "create", "-f", &format!("file://{}", cycle.display())]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("itself"), "{err}");
    let (code, _, err) = cluster.cli(1, &["run", "create", "-f", "file://relative.yaml"]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn yaml_definitions_by_path_and_url_create_runs_that_list_by_group() {
    let cluster = Cluster::bootstrap(1, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = "name: build\ngroup: /project/42/branch/main\ntasks:\n  - name: compile\n    image: busybox\n    steps:\n      - run: {command: make}\n      - save_to_workspace: {contents: [{source_dir: \".\", paths: [\"bin/**\"]}]}\n";
    let path = dir.path().join("run.yaml");
    std::fs::write(&path, yaml).unwrap();
    let (code, out, err) = cluster.cli(1, &["run", "create", "-f", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let first = out.trim().to_string();
    // Served over HTTP by a one-shot server in the test.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let body = yaml.replace("/project/42/branch/main", "/project/7");
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            body.len(),
            body
        );
    });
    let (code, out, err) = cluster.cli(1, &["run", "create", "-f", &format!("http://{addr}/run.yaml")]);
    assert_eq!(code, 0, "{err}");
    let second = out.trim().to_string();
    assert!(first < second, "run ids sort in creation order: {first} {second}");
    let c = cluster.client(1);
    let q = |group: &str| flotilla_api::client::RunQuery {
        group: Some(group.into()),
        limit: 10,
        ..Default::default()
    };
    let ids = |l: flotilla_api::types::RunList| l.runs.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(c.run_list(&q("/project")).await.unwrap()), [second.clone(), first.clone()]);
    assert_eq!(ids(c.run_list(&q("/project/42")).await.unwrap()), [first.as_str()]);
    assert_eq!(ids(c.run_list(&q("/project/4")).await.unwrap()), Vec::<String>::new());
    let r = c.run_get(&second).await.unwrap();
    assert_eq!((r.counter, r.group.as_str()), (2, "/project/7"), "counters count per root group");
    let (code, out, _) = cluster.cli(1, &["run", "get", &first]);
    assert_eq!(code, 0);
    assert!(out.contains("compile"), "{out}");
}

#[tokio::test]
async fn a_heartbeat_is_written_only_when_it_brings_something_new() {
    // Default executor timeout (60 s): a heartbeat with the same offer within 20 s of the
    // recorded one is answered without a replicated write.
    let cluster = Cluster::bootstrap(3, &[]).await;
    let c = cluster.client(1);
    let seen = async |c: &Client| {
        let list = c.executors().await.unwrap().executors;
        let e = list.into_iter().find(|e| e.id == "e1").expect("e1 is registered");
        (e.last_seen, e.info.archs)
    };
    c.executor_heartbeat("e1", &info(&["amd64"], false, false)).await.unwrap();
    let (first, _) = seen(&c).await;
    // Repeated through every node, leader and followers alike.
    for n in [1, 2, 3, 1, 2, 3] {
        tokio::time::sleep(Duration::from_millis(20)).await;
        cluster.client(n).executor_heartbeat("e1", &info(&["amd64"], false, false)).await.unwrap();
    }
    assert_eq!(seen(&c).await, (first, vec!["amd64".to_string()]), "nothing new: nothing written");
    // A changed offer is written at once, with the time it was seen.
    cluster.client(2).executor_heartbeat("e1", &info(&["amd64", "arm64"], false, false)).await.unwrap();
    let (changed, archs) = seen(&cluster.client(2)).await;
    assert!(changed > first, "last_seen {changed} after {first}");
    assert_eq!(archs, vec!["amd64".to_string(), "arm64".to_string()]);
}

#[tokio::test]
async fn heartbeats_that_only_refresh_last_seen_are_written_together() {
    // Executor timeout 3 s: a heartbeat with the recorded offer is written again once the
    // record is 1 s old, and such refreshes go out as one entry.
    let cluster = Cluster::bootstrap(3, &["--executor-timeout-ms", "3000"]).await;
    let leader = cluster.wait_for_leader().await;
    let c = cluster.client(leader);
    let offer = info(&["amd64"], false, false);
    let ids: Vec<String> = (0..24).map(|i| format!("e{i}")).collect();
    for id in &ids {
        c.executor_heartbeat(id, &offer).await.unwrap();
    }
    let seen = async || -> BTreeMap<String, u64> {
        c.executors().await.unwrap().executors.into_iter().map(|e| (e.id, e.last_seen)).collect()
    };
    let first = seen().await;
    assert_eq!(first.len(), ids.len());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let entries_before = cluster.local_status(leader).await.last_log_index;
    // One every 8 ms, a third through each node (two thirds forwarded by followers): too
    // far apart for the leader's group commit to put them together (each write is done
    // before the next arrives), close enough for one batch per node.
    let beats = ids.iter().enumerate().map(|(i, id)| {
        let node = cluster.client(1 + i as u64 % 3);
        let offer = offer.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(8 * i as u64)).await;
            retry("a refresh", || node.executor_heartbeat(id, &offer)).await
        }
    });
    for r in futures::future::join_all(beats).await {
        r.expect("a refresh is answered 204 once written");
    }
    // Answered means written: a linearizable read on any node sees every refresh.
    let refreshed = seen().await;
    for id in &ids {
        assert!(refreshed[id] > first[id], "{id}: last_seen {} after {}", refreshed[id], first[id]);
    }
    let entries = cluster.local_status(leader).await.last_log_index - entries_before;
    // One batch per node (at most two if a batch's linger ended mid-burst); each refresh
    // was its own entry before.
    assert!(entries <= 6, "{} refreshes took {entries} log entries", ids.len());
}

#[tokio::test]
async fn a_dynamic_executor_that_stops_heartbeating_is_removed() {
    let cluster = Cluster::bootstrap(1, &["--executor-timeout-ms", "1000"]).await;
    let c = cluster.client(1);
    c.executor_heartbeat("dyn", &info(&["amd64"], false, true)).await.unwrap();
    c.executor_heartbeat("static", &info(&["amd64"], false, false)).await.unwrap();
    let ids =
        async || c.executors().await.unwrap().executors.into_iter().map(|e| e.id).collect::<BTreeSet<_>>();
    assert_eq!(ids().await, BTreeSet::from(["dyn".to_string(), "static".to_string()]));
    wait_for("the dynamic executor to be removed", async || {
        ids().await == BTreeSet::from(["static".to_string()])
    })
    .await;
    // Executor routes use the executor token; the API token is the default for it.
    let resp = reqwest::Client::new()
        .put(format!("{}/api/v1/executor/x", cluster.url(1)))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}
