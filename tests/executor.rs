//! The Docker executor end to end: real `flotilla server` and `flotilla executor`
//! processes, a real Docker engine, the local busybox image. Every test uses its own
//! executor id and checks that none of its containers is left.

mod common;

use std::time::{Duration, Instant};

use common::{
    containers_with_label, require_docker_image, sole_warm_container, Cluster, ExecutorProc, IMAGE,
};
use flotilla_api::types::{Run, RunCreate};
use flotilla_api::Client;
use flotilla_store::run::{LogPhase, Phase, RunResult, TaskStatus};
use serde_json::json;

async fn create(c: &Client, mut body: serde_json::Value) -> Run {
    for t in body["tasks"].as_array_mut().unwrap() {
        if t.get("image").is_none() && t.get("containers").is_none() {
            t["image"] = json!(IMAGE);
        }
    }
    let create: RunCreate = serde_json::from_value(body).expect("valid RunCreate");
    c.run_create(&create).await.expect("run created")
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_final(c: &Client, id: &str, exec: &ExecutorProc) -> Run {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let run = c.run_get(id).await.expect("run");
        if run.phase.is_final() {
            return run;
        }
        assert!(Instant::now() < deadline, "run {id} did not end: {run:#?}\n{}", exec.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn log(c: &Client, run: &str, task: &str, step: &str) -> String {
    let bytes = c.run_log(run, task, step, false).await.expect("log").bytes().await.unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The executor removes a task's container right after reporting its outcome: once the
/// runs ended, every container of `exec` is gone within a few seconds.
fn assert_no_containers(exec: &ExecutorProc) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = containers_with_label("flotilla.executor", &exec.id);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "containers of executor {} left behind: {left:?}", exec.id);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_flows_between_tasks_caches_persist_across_runs_and_a_failing_step_stops_its_task() {
    require_docker_image();
    let cluster = Cluster::bootstrap(1, &[]).await;
    let exec = ExecutorProc::start(&cluster, "ws-exec", &["--active-tasks-limit", "4"]);
    let c = cluster.client(1);
    let definition = json!({
        "name": "ws", "group": "/ws/main", "cache_group": "/ws",
        "static_environment": {"A": "static", "B": "static", "C": "static", "D": "static"},
        "environment": {"B": "run", "C": "run", "D": "run"},
        "tasks": [
            {"name": "make", "environment": {"C": "task", "D": "task"}, "steps": [
                {"restore_cache": {"keys": ["deps-"], "dest_dir": "."}},
                {"run": {"command": "mkdir -p out deps; if [ -f deps/stamp ]; then echo cache-hit; else echo cache-miss; date +%s%N > deps/stamp; fi; echo built > out/app; echo skip > notes.txt; echo \"$A $B $C $D\"", "environment": {"D": "step"}}},
                {"save_to_workspace": {"contents": [{"source_dir": ".", "dest_dir": "artifacts", "paths": ["out/**"]}]}},
                {"save_cache": {"key": "deps-{{ md5sum deps/stamp }}", "contents": [{"source_dir": ".", "paths": ["deps/**"]}]}}
            ]},
            {"name": "check", "depends": [{"task": "make"}], "steps": [
                {"restore_workspace": {"dest_dir": "restored"}},
                {"run": {"command": "cat restored/artifacts/out/app; test ! -e restored/notes.txt"}}
            ]},
            {"name": "broken", "depends": [{"task": "check"}], "steps": [
                {"run": {"command": "echo before; exit 3"}},
                {"run": {"command": "echo never"}}
            ]},
            {"name": "cleanup", "depends": [{"task": "broken", "conditions": ["on_failure"]}], "steps": [
                {"run": {"command": "echo cleaning up"}}
            ]}
        ]
    });
    let first = create(&c, definition.clone()).await;
    let run = wait_final(&c, &first.id, &exec).await;
    let status = |r: &Run, t: &str| r.tasks[t].status;
    assert_eq!(status(&run, "make"), TaskStatus::Success, "{run:#?}");
    assert_eq!(status(&run, "check"), TaskStatus::Success, "{run:#?}");
    assert_eq!(status(&run, "broken"), TaskStatus::Failed);
    assert_eq!(status(&run, "cleanup"), TaskStatus::Success, "a failed parent runs its on_failure child");
    assert_eq!(run.result, RunResult::Failed);

    // Environment precedence: static < environment < task < step.
    let make_log = log(&c, &run.id, "make", "1").await;
    assert!(make_log.contains("cache-miss"), "{make_log}");
    assert!(make_log.contains("static run task step"), "{make_log}");
    // The workspace reached the child, selected by pattern and placed under dest_dir.
    assert!(log(&c, &run.id, "check", "1").await.contains("built"));
    // The failing step: its exit status and log; the next step never ran.
    let broken = &run.tasks["broken"];
    assert_eq!(broken.steps[0].phase, Phase::Failed);
    assert_eq!(broken.steps[0].exit_status, Some(3));
    assert_eq!(broken.steps[0].log_phase, LogPhase::Sent);
    assert_eq!(broken.steps[1].phase, Phase::Notstarted, "no step runs after a failed one");
    assert!(log(&c, &run.id, "broken", "0").await.contains("before"));
    assert!(log(&c, &run.id, "broken", "setup").await.contains("container"));
    for (name, t) in &run.tasks {
        assert!(t.start_time.is_some() && t.end_time.is_some(), "{name}: {t:?}");
        assert_eq!(t.setup_step.phase, Phase::Success, "{name}");
    }

    // A second run restores the cache the first one saved.
    let second = create(&c, definition).await;
    let run2 = wait_final(&c, &second.id, &exec).await;
    assert_eq!(run2.tasks["make"].status, TaskStatus::Success);
    let restore = log(&c, &run2.id, "make", "0").await;
    assert!(restore.contains("restored cache deps-"), "{restore}");
    assert!(log(&c, &run2.id, "make", "1").await.contains("cache-hit"));
    assert_no_containers(&exec);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_live_and_a_stop_kills_the_running_container() {
    require_docker_image();
    let cluster = Cluster::bootstrap(1, &[]).await;
    let exec = ExecutorProc::start(&cluster, "live-exec", &[]);
    let c = cluster.client(1);
    let run = create(&c, json!({"name": "live", "group": "/live", "tasks": [
        {"name": "talk", "steps": [{"run": {"command": "for i in 1 2 3 4; do echo line $i; sleep 1; done"}}]},
        {"name": "hang", "steps": [{"run": {"command": "echo started; sleep 300"}}]}
    ]}))
    .await;

    // Follow `talk` from before it starts: the first line comes while the step runs.
    let mut follow = c.run_log(&run.id, "talk", "0", true).await.expect("follow");
    let started = Instant::now();
    let mut text = String::new();
    let mut first_at = None;
    while let Some(chunk) =
        tokio::time::timeout(Duration::from_secs(60), follow.chunk()).await.expect("log stalled").unwrap()
    {
        if first_at.is_none() && !chunk.is_empty() {
            first_at = Some(started.elapsed());
        }
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let ended_at = started.elapsed();
    assert_eq!(text, "line 1\nline 2\nline 3\nline 4\n");
    let first_at = first_at.unwrap();
    assert!(
        ended_at - first_at >= Duration::from_secs(2),
        "lines came at once ({first_at:?} then end {ended_at:?}): not live"
    );

    // Stop while `hang` runs: its container is killed and the task ends stopped.
    wait_until("hang running", Duration::from_secs(30), async || {
        log_has(&c, &run.id, "hang", "started").await
    })
    .await;
    let task_id = format!("{}.hang", run.id);
    assert_eq!(containers_with_label("flotilla.task", &task_id).len(), 1);
    c.run_stop(&run.id).await.unwrap();
    let stopped_at = Instant::now();
    let done = wait_final(&c, &run.id, &exec).await;
    assert!(stopped_at.elapsed() < Duration::from_secs(30));
    assert_eq!(done.tasks["hang"].status, TaskStatus::Stopped, "{done:#?}");
    assert_eq!(done.tasks["hang"].steps[0].phase, Phase::Stopped);
    assert_eq!(done.result, RunResult::Stopped);
    assert!(
        containers_with_label("flotilla.task", &task_id).is_empty(),
        "the stopped task's container is gone"
    );
    assert_no_containers(&exec);
}

async fn log_has(c: &Client, run: &str, task: &str, what: &str) -> bool {
    match c.run_log(run, task, "0", false).await {
        Ok(d) => String::from_utf8_lossy(&d.bytes().await.unwrap_or_default()).contains(what),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_killed_mid_task_removes_its_orphan_on_restart_and_the_task_fails() {
    require_docker_image();
    let cluster = Cluster::bootstrap(1, &[]).await;
    let mut exec = ExecutorProc::start(&cluster, "crash-exec", &[]);
    let c = cluster.client(1);
    let run = create(
        &c,
        json!({"name": "crash", "group": "/crash", "tasks": [
            {"name": "crashy", "steps": [{"run": {"command": "echo working; sleep 300"}}]}
        ]}),
    )
    .await;
    // Task ids repeat across tests (each has its own cluster): names are unique per test.
    let task_id = format!("{}.crashy", run.id);
    wait_until("the task's container", Duration::from_secs(30), async || {
        !containers_with_label("flotilla.task", &task_id).is_empty()
    })
    .await;
    exec.kill();
    assert_eq!(
        containers_with_label("flotilla.task", &task_id).len(),
        1,
        "SIGKILL leaves the container running"
    );
    exec.restart();
    let done = wait_final(&c, &run.id, &exec).await;
    assert_eq!(done.tasks["crashy"].status, TaskStatus::Failed, "{done:#?}");
    assert!(done.tasks["crashy"].end_time.is_some());
    assert!(containers_with_label("flotilla.task", &task_id).is_empty(), "the orphan container was removed");
    assert!(exec.log_tail().contains("orphan"), "{}", exec.log_tail());
    assert_no_containers(&exec);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_tasks_are_refused_without_permission_and_missing_images_fail_setup_clearly() {
    require_docker_image();
    let cluster = Cluster::bootstrap(1, &[]).await;
    // Registered as allowing privileged containers, so the scheduler sends it one...
    let mut exec =
        ExecutorProc::start(&cluster, "strict-exec", &["--allow-privileged", "--pull-timeout-s", "10"]);
    let c = cluster.client(1);
    wait_until("executor registered", Duration::from_secs(30), async || {
        c.executors().await.is_ok_and(|l| l.executors.iter().any(|e| e.id == "strict-exec"))
    })
    .await;
    exec.kill();
    let run = create(&c, json!({"name": "priv", "group": "/priv", "tasks": [
        {"name": "root", "privileged": true, "steps": [{"run": {"command": "true"}}]},
        {"name": "ghost", "image": "flotilla-no-such-image:never", "steps": [{"run": {"command": "true"}}]}
    ]}))
    .await;
    // ...and comes back without the permission: the task fails its setup, clearly.
    exec.args = vec!["--pull-timeout-s".into(), "10".into()];
    exec.restart();
    let started = Instant::now();
    let done = wait_final(&c, &run.id, &exec).await;
    assert!(started.elapsed() < Duration::from_secs(60), "a missing image must not hang");
    for (task, want) in [("root", "privileged"), ("ghost", "flotilla-no-such-image:never")] {
        let t = &done.tasks[task];
        assert_eq!(t.status, TaskStatus::Failed, "{task}: {done:#?}");
        assert_eq!(t.setup_step.phase, Phase::Failed, "{task}");
        assert_eq!(t.steps[0].phase, Phase::Notstarted, "{task}");
        let setup = log(&c, &run.id, task, "setup").await;
        assert!(setup.contains(want), "{task}: {setup}");
    }
    assert!(log(&c, &run.id, "ghost", "setup").await.contains("not present on this host"));
    assert_no_containers(&exec);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sibling_removes_the_containers_of_a_dynamic_executor_that_vanished() {
    require_docker_image();
    let cluster = Cluster::bootstrap(1, &["--executor-timeout-ms", "1500"]).await;
    let c = cluster.client(1);
    let mut dynamic = ExecutorProc::start(&cluster, "dyn-exec", &["--group", "pool-a", "--dynamic"]);
    let run = create(
        &c,
        json!({"name": "dyn", "group": "/dyn", "tasks": [
            {"name": "orphaned", "steps": [{"run": {"command": "sleep 300"}}]}
        ]}),
    )
    .await;
    let task_id = format!("{}.orphaned", run.id);
    wait_until("the dynamic executor's container", Duration::from_secs(30), async || {
        !containers_with_label("flotilla.task", &task_id).is_empty()
    })
    .await;
    // The dynamic executor dies for good; a sibling of its group lives on this host.
    dynamic.kill();
    let sibling = ExecutorProc::start(&cluster, "sib-exec", &["--group", "pool-a"]);
    let done = wait_final(&c, &run.id, &sibling).await;
    assert_eq!(
        done.tasks["orphaned"].status,
        TaskStatus::Failed,
        "the vanished executor's task fails: {done:#?}"
    );
    wait_until("the sibling to remove the orphan", Duration::from_secs(40), async || {
        containers_with_label("flotilla.task", &task_id).is_empty()
    })
    .await;
    assert!(sibling.log_tail().contains("vanished dynamic sibling"), "{}", sibling.log_tail());
    assert_no_containers(&sibling);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_running_through_a_leader_failover_succeeds_with_its_whole_log() {
    require_docker_image();
    let s3 =
        flotilla_store::ost::test_servers::S3Server::start(flotilla_store::ost::test_servers::Kind::S3sFs);
    s3.ost("failover", "").await.unwrap();
    let mut cluster = Cluster::bootstrap_with_env(3, &["--ost", &s3.url("failover", "")], &s3.env()).await;
    let exec = ExecutorProc::start(&cluster, "fo-exec", &[]);
    let leader = cluster.wait_for_leader().await;
    let other = (1..=3).find(|i| *i != leader).unwrap();
    let c = cluster.client(other);
    let run = create(&c, json!({"name": "fo", "group": "/fo", "tasks": [
        {"name": "ticker", "steps": [{"run": {"command": "for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 0.5; done"}}]}
    ]}))
    .await;
    wait_until("the step to print", Duration::from_secs(30), async || {
        log_has(&c, &run.id, "ticker", "tick 2").await
    })
    .await;
    cluster.kill(leader);
    let done = wait_final(&c, &run.id, &exec).await;
    assert_eq!(done.tasks["ticker"].status, TaskStatus::Success, "{done:#?}");
    assert_eq!(done.tasks["ticker"].steps[0].log_phase, LogPhase::Sent);
    let text = log(&c, &run.id, "ticker", "0").await;
    let want: String = (1..=8).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(text, want, "the whole log, once, after the failover");
    assert_no_containers(&exec);
}

fn docker(args: &[&str]) {
    let out = std::process::Command::new("docker").args(args).output().expect("docker");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_container_runs_a_plain_task_as_a_cold_one_would_and_dead_or_stale_ones_are_replaced() {
    require_docker_image();
    // A tag of this test's own, moved to another image half way.
    let image = "flotilla-warm-test:v";
    docker(&["tag", IMAGE, image]);
    let cluster = Cluster::bootstrap(1, &[]).await;
    let mut exec = ExecutorProc::start(&cluster, "warm-exec", &["--warm-image", image]);
    let c = cluster.client(1);
    // The executor's only container is the `made`-th warm one it readied.
    let one_warm = async |made: usize| {
        let mut ready = None;
        wait_until("one warm container", Duration::from_secs(30), async || {
            ready = sole_warm_container("warm-exec", &exec.log, made);
            ready.is_some()
        })
        .await;
        ready.unwrap()
    };
    // One that dies while waiting (an OOM kill, a `docker kill`) is dropped and replaced at
    // a heartbeat, not handed to a task.
    let dead = one_warm(1).await;
    docker(&["kill", &dead]);
    let first = one_warm(2).await;
    assert_ne!(first, dead);

    // A plain task takes it: container 0's environment under the task's under the step's,
    // the default directory and user, and one container for all the steps.
    let plain = json!({"name": "plain", "environment": {"T": "task", "S": "task"},
    "containers": [{"image": image, "environment": {"C": "container", "T": "container"}}],
    "steps": [
        {"run": {"command": "echo \"$C $T $S\"; pwd; id -u; echo kept > f", "environment": {"S": "step"}}},
        {"run": {"command": "cat f"}}
    ]});
    let run = create(&c, json!({"name": "warm", "group": "/warm", "tasks": [plain]})).await;
    let done = wait_final(&c, &run.id, &exec).await;
    assert_eq!(done.result, RunResult::Success, "{done:#?}");
    let setup = log(&c, &run.id, "plain", "setup").await;
    assert!(setup.contains(&format!("({first}) started, warm")), "{setup}");
    let out = log(&c, &run.id, "plain", "0").await;
    assert!(out.contains("container task step\n/work\n0\n"), "{out}");
    assert!(log(&c, &run.id, "plain", "1").await.contains("kept"));
    // Used once, removed, replaced.
    let second = one_warm(3).await;
    assert_ne!(second, first);

    // A pod with a volume starts cold and leaves the warm one alone.
    let run = create(
        &c,
        json!({"name": "cold", "group": "/warm", "tasks": [{"name": "vol",
        "containers": [{"image": image, "volumes": [{"path": "/scratch", "tmpfs": {}}]}],
        "steps": [{"run": {"command": "touch /scratch/x"}}]}]}),
    )
    .await;
    let done = wait_final(&c, &run.id, &exec).await;
    assert_eq!(done.result, RunResult::Success, "{done:#?}");
    let setup = log(&c, &run.id, "vol", "setup").await;
    assert!(setup.contains("started") && !setup.contains("started, warm"), "{setup}");
    assert_eq!(one_warm(3).await, second);

    // The tag moves to a new image: the warm container of the old one is not used (the
    // task starts cold, in the new image), and a warm one of the new image replaces it.
    let _ = std::process::Command::new("docker").args(["rm", "-f", "flotilla-warm-test-commit"]).output();
    docker(&["run", "--name", "flotilla-warm-test-commit", IMAGE, "touch", "/marker"]);
    docker(&["commit", "flotilla-warm-test-commit", image]);
    docker(&["rm", "flotilla-warm-test-commit"]);
    // A run of one task in the new image; its setup log.
    let in_new_image = async |name: &str| {
        let body = json!({"name": name, "group": "/warm", "tasks": [{"name": "new",
            "image": image, "steps": [{"run": {"command": "test -e /marker"}}]}]});
        let run = create(&c, body).await;
        let done = wait_final(&c, &run.id, &exec).await;
        assert_eq!(done.result, RunResult::Success, "{done:#?}");
        log(&c, &run.id, "new", "setup").await
    };
    assert!(!in_new_image("moved").await.contains("started, warm"));
    let third = one_warm(4).await;
    assert_ne!(third, second, "the stale warm container was replaced");
    assert!(in_new_image("again").await.contains(&format!("({third}) started, warm")));

    // A clean stop removes the warm containers too.
    one_warm(5).await;
    exec.terminate();
    assert_no_containers(&exec);
    docker(&["rmi", image]);
}
