//! Task pods end to end (docs/SPEC.md, "Task pods"): service containers sharing the
//! steps' network namespace, user/entrypoint/tmpfs, `timeout_s`, a service dying,
//! `ignore_failure` and `skip`, cleanup after an executor's kill -9, exact container
//! ownership between two `flotilla dev` on one engine, and the 400s of bad pods. Real
//! `flotilla` processes and a real Docker engine with the local busybox image.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{containers_with_label, free_port, require_docker_image, Cluster, ExecutorProc, IMAGE};
use flotilla_api::types::{Run, RunCreate};
use flotilla_api::{Client, ClientError};
use flotilla_store::run::{Phase, RunResult, TaskStatus};
use serde_json::json;

async fn create(c: &Client, body: serde_json::Value) -> Run {
    let create: RunCreate = serde_json::from_value(body).expect("valid RunCreate");
    c.run_create(&create).await.expect("run created")
}

async fn wait_final(c: &Client, id: &str, what: &dyn Fn() -> String) -> Run {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let run = c.run_get(id).await.expect("run");
        if run.phase.is_final() {
            return run;
        }
        assert!(Instant::now() < deadline, "run {id} did not end: {run:#?}\n{}", what());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn step_log(c: &Client, run: &str, task: &str, step: &str) -> String {
    let bytes = c.run_log(run, task, step, false).await.expect("log").bytes().await.unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Every container labeled with executor `id` is gone within a few seconds.
fn assert_no_containers(id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = containers_with_label("flotilla.executor", id);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "containers of executor {id} left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A service serving a page on port 8080 (busybox httpd), announcing itself on stdout.
fn web_service(name: &str) -> serde_json::Value {
    json!({
        "name": name, "image": IMAGE,
        "entrypoint": ["/bin/sh", "-c"],
        "command": ["echo service-$SVC up; mkdir -p /www; echo hello-from-$SVC > /www/index.html; exec httpd -f -p 8080 -h /www"],
        "environment": {"SVC": name}
    })
}

/// Polls (inside the step) until the service answers: it starts concurrently with step 0.
const WAIT_DB: &str =
    "for i in $(seq 100); do wget -q -O /dev/null http://db:8080/ && break; sleep 0.1; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_reaches_its_service_by_name_and_on_localhost_with_user_entrypoint_and_tmpfs() {
    require_docker_image();
    let cluster = Cluster::bootstrap(1, &[]).await;
    let exec = ExecutorProc::start(&cluster, "pod-net", &[]);
    let c = cluster.client(1);
    let run = create(&c, json!({"name": "pod", "group": "/pods", "tasks": [{
        "name": "integration",
        "containers": [
            {"image": IMAGE, "user": "1000:1000", "environment": {"MAIN": "yes"},
             "volumes": [{"path": "/scratch", "tmpfs": {"size": "64Mi"}}]},
            web_service("db")
        ],
        "timeout_s": 120,
        "steps": [
            {"run": {"command": WAIT_DB}},
            {"run": {"command": "wget -q -O - http://db:8080/; wget -q -O - http://localhost:8080/"}},
            {"run": {"command": "echo uid=$(id -u) main=$MAIN; mount | grep ' /scratch '; echo x > /scratch/f && echo written"}}
        ]
    }]})).await;
    let done = wait_final(&c, &run.id, &|| exec.log_tail()).await;
    let t = &done.tasks["integration"];
    assert_eq!(t.status, TaskStatus::Success, "{done:#?}\n{}", exec.log_tail());
    assert_eq!(done.result, RunResult::Success);

    let both = step_log(&c, &run.id, "integration", "1").await;
    assert_eq!(both.matches("hello-from-db").count(), 2, "by name and on localhost: {both}");
    let env = step_log(&c, &run.id, "integration", "2").await;
    assert!(env.contains("uid=1000 main=yes"), "{env}");
    assert!(env.contains("tmpfs") && env.contains("size=65536k"), "tmpfs of 64 MiB: {env}");
    assert!(env.contains("written"), "uid 1000 may write in the tmpfs (mode 1777): {env}");

    // The service's whole output, through the API and the CLI.
    let bytes =
        c.run_container_log(&run.id, "integration", "db", false).await.unwrap().bytes().await.unwrap();
    assert!(String::from_utf8_lossy(&bytes).contains("service-db up"), "{bytes:?}");
    let (code, out, err) = cluster.cli(1, &["run", "logs", &run.id, "integration", "--container", "db"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("service-db up"), "{out}");
    let (code, out, err) = cluster.cli(1, &["run", "get", &run.id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("container db {IMAGE}")) && out.contains("timeout 120 s"), "{out}");
    let missing = c.run_container_log(&run.id, "integration", "nope", false).await.err();
    assert_eq!(missing.and_then(|e| e.status()), Some(404));
    assert_no_containers(&exec.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_service_exit_ignore_failure_and_skip_end_tasks_as_configured() {
    require_docker_image();
    let cluster = Cluster::bootstrap(1, &[]).await;
    let exec = ExecutorProc::start(&cluster, "pod-end", &["--active-tasks-limit", "4"]);
    let c = cluster.client(1);
    let run = create(&c, json!({"name": "ends", "group": "/pods", "tasks": [
        {"name": "hangs", "containers": [{"image": IMAGE}, web_service("db")],
         "timeout_s": 3, "ignore_failure": true,
         "steps": [{"run": {"command": "echo sleeping; sleep 600"}}]},
        {"name": "after_hang", "image": IMAGE, "depends": [{"task": "hangs", "conditions": ["on_failure"]}],
         "steps": [{"run": {"command": "echo hang seen as failed"}}]},
        {"name": "needs_hang", "image": IMAGE, "depends": [{"task": "hangs"}],
         "steps": [{"run": {"command": "true"}}]},
        {"name": "skipped", "image": IMAGE, "skip": true, "steps": [{"run": {"command": "exit 1"}}]},
        {"name": "on_skip", "image": IMAGE, "depends": [{"task": "skipped", "conditions": ["on_skipped"]}],
         "steps": [{"run": {"command": "true"}}]}
    ]})).await;
    assert_eq!(run.tasks["skipped"].status, TaskStatus::Skipped, "created skipped");
    let dying = create(
        &c,
        json!({"name": "dies", "group": "/pods", "tasks": [
            {"name": "dies", "containers": [
                {"image": IMAGE},
                {"name": "db", "image": IMAGE, "command": ["sh", "-c", "echo going down; sleep 2; exit 3"]}
             ],
             "steps": [{"run": {"command": "sleep 60"}}]}
        ]}),
    )
    .await;

    let done = wait_final(&c, &run.id, &|| exec.log_tail()).await;
    let hangs = &done.tasks["hangs"];
    assert_eq!(hangs.status, TaskStatus::Failed, "{done:#?}");
    assert_eq!(hangs.error.as_deref(), Some("timed out after 3 s"), "{hangs:#?}");
    assert_eq!(hangs.steps[0].phase, Phase::Failed);
    assert_eq!(hangs.steps[0].reason.as_deref(), Some("timeout"));
    let took = hangs.end_time.unwrap() - hangs.start_time.unwrap();
    assert!(took < 10_000, "a 3 s timeout took {took} ms to fail the task");
    assert_eq!(done.tasks["after_hang"].status, TaskStatus::Success, "children see it failed");
    assert_eq!(done.tasks["needs_hang"].status, TaskStatus::Skipped);
    assert_eq!(done.tasks["skipped"].status, TaskStatus::Skipped);
    assert_eq!(done.tasks["on_skip"].status, TaskStatus::Success);
    assert_eq!(done.result, RunResult::Success, "an ignored failure does not fail the run");

    let died = wait_final(&c, &dying.id, &|| exec.log_tail()).await;
    let t = &died.tasks["dies"];
    assert_eq!(t.status, TaskStatus::Failed, "{died:#?}");
    assert_eq!(t.error.as_deref(), Some("service container db exited with code 3"));
    assert!(t.end_time.unwrap() - t.start_time.unwrap() < 30_000, "ended long before its sleep 60");
    assert_eq!(died.result, RunResult::Failed);
    let bytes = c.run_container_log(&dying.id, "dies", "db", false).await.unwrap().bytes().await.unwrap();
    assert!(String::from_utf8_lossy(&bytes).contains("going down"));
    assert_no_containers(&exec.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_killed_mid_task_removes_the_whole_pod_when_it_restarts() {
    require_docker_image();
    let cluster = Cluster::bootstrap(1, &[]).await;
    let mut exec = ExecutorProc::start(&cluster, "pod-kill", &[]);
    let c = cluster.client(1);
    let run = create(
        &c,
        json!({"name": "kill", "group": "/pods", "tasks": [{
            "name": "long", "containers": [{"image": IMAGE}, web_service("db")],
            "steps": [{"run": {"command": "echo started; sleep 300"}}]
        }]}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while containers_with_label("flotilla.executor", "pod-kill").len() < 2 {
        assert!(Instant::now() < deadline, "the pod never started\n{}", exec.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    exec.kill();
    assert_eq!(containers_with_label("flotilla.executor", "pod-kill").len(), 2, "a kill -9 cleans nothing");
    exec.restart();
    let done = wait_final(&c, &run.id, &|| exec.log_tail()).await;
    assert_eq!(done.tasks["long"].status, TaskStatus::Failed);
    assert!(done.tasks["long"].error.as_deref().unwrap_or("").contains("restarted"), "{done:#?}");
    assert_no_containers("pod-kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pods_are_refused_with_400_naming_the_field_and_nothing_is_created() {
    let cluster = Cluster::bootstrap(1, &[]).await;
    let c = cluster.client(1);
    let task = |extra: serde_json::Value| {
        let mut t = json!({"name": "t", "steps": [{"run": {"command": "true"}}]});
        t.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!({"name": "bad", "group": "/bad", "tasks": [t]})
    };
    let cases = [
        (
            task(json!({"containers": [{"name": "a", "image": IMAGE}, {"name": "a", "image": IMAGE}]})),
            "\"a\" is used twice",
        ),
        (
            task(json!({"containers": [{"image": IMAGE}, {"image": IMAGE}]})),
            "containers[1]: a service container needs a name",
        ),
        (
            task(
                json!({"containers": [{"image": IMAGE, "volumes": [{"path": "/x", "tmpfs": {"size": "64Mx"}}]}]}),
            ),
            "tmpfs size",
        ),
        (task(json!({"image": IMAGE, "timeout_s": 0})), "timeout_s"),
        (task(json!({"image": IMAGE, "timeout_s": -3})), "timeout_s"),
        (
            task(
                json!({"image": IMAGE, "docker_registries_auth": {"r:5000": {"type": "token", "auth": "eA=="}}}),
            ),
            "docker_registries_auth \"r:5000\": unknown type \"token\"",
        ),
        (
            json!({"name": "bad", "tasks": [{"name": "t", "image": IMAGE}],
                "docker_registries_auth": {"r:5000": {"type": "basic", "username": "u"}}}),
            "needs username and password",
        ),
        (task(json!({"containers": [{"name": "has.dot", "image": IMAGE}]})), "host name"),
    ];
    for (body, wanted) in cases {
        let create: RunCreate = serde_json::from_value(body.clone()).expect("parses");
        match c.run_create(&create).await {
            Err(ClientError::Api { status: 400, message, .. }) => {
                assert!(message.contains(wanted), "{message:?} should name {wanted:?}")
            }
            other => panic!("{body} was not refused with a 400: {other:?}"),
        }
    }
    let list = c.run_list(&Default::default()).await.unwrap();
    assert!(list.runs.is_empty(), "nothing was created: {:?}", list.runs);
}

/// A `flotilla dev` process on its own port and data dir.
struct Dev {
    child: Child,
    url: String,
    log: std::path::PathBuf,
}

impl Dev {
    fn start(dir: &std::path::Path, name: &str) -> Dev {
        let port = free_port();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(common::bin())
            .args(["dev", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.join(name))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn flotilla dev");
        Dev { child, url: format!("http://127.0.0.1:{port}"), log }
    }
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.url, self.log_tail());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_healthy(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.health().await.is_err() {
        assert!(Instant::now() < deadline, "a dev instance did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dev_instances_on_one_docker_engine_run_side_by_side() {
    require_docker_image();
    let dir = tempfile::tempdir().unwrap();
    // Same executor id (`local`), same task names, run ids from the same low numbers: only
    // the cluster id tells the two instances' containers apart. B starts while A's pod
    // runs (B's start-up cleanup must leave it alone), then both run side by side.
    let body = json!({"name": "same", "group": "/dev", "tasks": [{
        "name": "sidebyside", "containers": [{"image": IMAGE}, web_service("db")],
        "steps": [{"run": {"command": format!("{WAIT_DB}; sleep 6; wget -q -O - http://db:8080/")}}]
    }]});
    let a = Dev::start(dir.path(), "a");
    let ca = Client::new(&a.url, None);
    wait_healthy(&ca).await;
    let first = create(&ca, body.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ca.run_get(&first.id).await.unwrap().tasks["sidebyside"].steps[0].phase != Phase::Running {
        assert!(Instant::now() < deadline, "A's task never ran\n{}", a.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = Dev::start(dir.path(), "b");
    let cb = Client::new(&b.url, None);
    wait_healthy(&cb).await;
    let runs = vec![
        (&ca, &a, first),
        (&cb, &b, create(&cb, body.clone()).await),
        (&ca, &a, create(&ca, body.clone()).await),
        (&cb, &b, create(&cb, body.clone()).await),
    ];
    for (c, dev, run) in runs {
        let done = wait_final(c, &run.id, &|| dev.log_tail()).await;
        assert_eq!(done.result, RunResult::Success, "{done:#?}\n{}", dev.log_tail());
        assert!(step_log(c, &run.id, "sidebyside", "0").await.contains("hello-from-db"));
    }
    // Both removed their own pods once the tasks ended.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("docker")
            .args(["ps", "-aq", "--filter", "name=-local-0000000000000.*\\.sidebyside\\."])
            .output()
            .unwrap();
        let left = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "pods left behind: {left}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Debian's `docker-registry` (the reference registry) on a free loopback port with
/// htpasswd (bcrypt) auth, stopped on drop. Docker treats loopback registries as insecure
/// by default, so plain HTTP needs no daemon change.
struct Registry {
    child: Child,
    host: String,
    dir: tempfile::TempDir,
}

impl Registry {
    fn start(user: &str, password: &str) -> Registry {
        for (bin, pkg) in [("docker-registry", "docker-registry"), ("htpasswd", "apache2-utils")] {
            let found = Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().unwrap();
            assert!(
                found.status.success(),
                "{bin} is needed (apt-get install {pkg}; scripts/test.sh installs it)"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = Command::new("htpasswd").args(["-Bbn", user, password]).output().unwrap();
        assert!(htpasswd.status.success());
        std::fs::write(dir.path().join("htpasswd"), &htpasswd.stdout).unwrap();
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\nhttp:\n  addr: {host}\nauth:\n  htpasswd:\n    realm: flotilla-test\n    path: {pw}\n",
            root = dir.path().join("data").display(),
            pw = dir.path().join("htpasswd").display(),
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .expect("spawn docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&host).is_err() {
            assert!(Instant::now() < deadline, "the registry did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { child, host, dir }
    }

    /// `docker` with a config dir of its own (a login never touches the user's).
    fn docker(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_CONFIG", self.dir.path().join("docker")).args(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_pulled_from_a_private_registry_with_the_tasks_credentials_kept_secret() {
    require_docker_image();
    let password = format!("s3cret-{}", free_port());
    let registry = Registry::start("ci", &password);
    let host = registry.host.clone();
    let image = format!("{host}/flotilla-pods-test:latest");
    let login = registry.docker(&["login", &host, "-u", "ci", "--password-stdin"], Some(&password));
    assert!(login.status.success(), "docker login: {}", String::from_utf8_lossy(&login.stderr));
    assert!(registry.docker(&["tag", IMAGE, &image], None).status.success());
    let push = registry.docker(&["push", &image], None);
    assert!(push.status.success(), "docker push: {}", String::from_utf8_lossy(&push.stderr));
    let untag = || {
        let _ = registry.docker(&["rmi", &image], None);
    };
    untag();

    let cluster = Cluster::bootstrap(1, &[]).await;
    let exec = ExecutorProc::start(&cluster, "pod-registry", &[]);
    let c = cluster.client(1);
    let basic = |p: &str| json!({"type": "basic", "username": "ci", "password": p});
    let task = |auth: serde_json::Value| {
        json!({"name": "pull", "image": image, "docker_registries_auth": auth,
               "steps": [{"run": {"command": "echo pulled"}}]})
    };
    // The task's entry wins over the run's for the same registry.
    let run = create(
        &c,
        json!({"name": "auth", "group": "/reg",
        "docker_registries_auth": {host.clone(): basic("wrong")},
        "tasks": [task(json!({host.clone(): basic(&password)}))]}),
    )
    .await;
    let done = wait_final(&c, &run.id, &|| exec.log_tail()).await;
    assert_eq!(done.result, RunResult::Success, "{done:#?}\n{}", exec.log_tail());
    untag();
    // encodedauth (base64 of user:password), given on the run.
    let encoded = base64_encode(&format!("ci:{password}"));
    let run = create(
        &c,
        json!({"name": "auth", "group": "/reg",
        "docker_registries_auth": {host.clone(): {"type": "encodedauth", "auth": encoded}},
        "tasks": [task(json!({}))]}),
    )
    .await;
    let done = wait_final(&c, &run.id, &|| exec.log_tail()).await;
    assert_eq!(done.result, RunResult::Success, "{done:#?}\n{}", exec.log_tail());
    untag();
    // Wrong credentials: the setup step fails with the registry's refusal.
    let run = create(
        &c,
        json!({"name": "auth", "group": "/reg",
        "tasks": [task(json!({host.clone(): basic("not-the-password")}))]}),
    )
    .await;
    let done = wait_final(&c, &run.id, &|| exec.log_tail()).await;
    let t = &done.tasks["pull"];
    assert_eq!((t.status, t.setup_step.phase), (TaskStatus::Failed, Phase::Failed), "{done:#?}");
    let error = t.error.clone().unwrap_or_default();
    assert!(error.contains("cannot be pulled") && error.contains("unauthorized"), "{error}");
    assert!(step_log(&c, &run.id, "pull", "setup").await.contains("unauthorized"));
    untag();

    // The password is in no answer, no export, no log of the server or the executor.
    let answers = format!("{:?}", c.run_list(&Default::default()).await.unwrap());
    let export = c.export().await.unwrap().bytes().await.unwrap();
    let server_log = std::fs::read_to_string(&cluster.nodes[&1].log).unwrap();
    let executor_log = std::fs::read_to_string(&exec.log).unwrap();
    for (what, text) in [
        ("run answers", answers),
        ("the export", String::from_utf8_lossy(&export).into_owned()),
        ("the server's log", server_log),
        ("the executor's log", executor_log),
    ] {
        assert!(!text.contains(&password), "the password shows in {what}");
    }
    assert!(String::from_utf8_lossy(&export).contains("***"), "the export shows credentials as ***");
}

fn base64_encode(s: &str) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
