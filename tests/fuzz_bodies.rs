//! Property test of the request handling of a real server: arbitrary JSON values (with
//! keys biased towards the API's field names, so they reach past the first check) and
//! arbitrary bytes, at every route that reads a body. Never a 5xx, never a dead node, and
//! a 4xx never changes the state (the export, the maintenance flag and the membership
//! compared before and after).
//!
//! `FUZZ_CASES` sets the number of cases per property (default 200: bounded for CI).

mod common;

use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};

/// Names that occur in the API's bodies besides a run definition's fields
/// (`flotilla_store::run::DEFINITION_FIELDS`): keys are drawn from both most of the time.
const API_FIELDS: &[&str] = &[
    "value",
    "action",
    "id",
    "addr",
    "ids",
    "nodes",
    "phase",
    "setup_error",
    "setup_step",
    "exit_status",
    "start_time",
    "end_time",
    "log_phase",
    "listen_url",
    "archs",
    "labels",
    "dynamic",
    "allow_privileged_containers",
    "active_tasks_limit",
    "active_tasks",
];

/// Words that occur as values: enum variants, actions, names.
const WORDS: &[&str] = &[
    "stop",
    "approve",
    "restart",
    "running",
    "notstarted",
    "success",
    "failed",
    "cancelled",
    "stopped",
    "sent",
    "notavailable",
    "on_success",
    "on_failure",
    "on_skipped",
    "a",
    "b",
    "busybox",
    "/",
    "/p",
    ".",
    "..",
    "../..",
    "",
    "x",
    "amd64",
];

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(WORDS).prop_map(String::from),
        2 => "\\PC{0,12}",
        1 => any::<String>(),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![4 => proptest::sample::select(
        flotilla_store::run::DEFINITION_FIELDS.iter().chain(API_FIELDS).copied().collect::<Vec<_>>()
    ).prop_map(String::from), 1 => string()]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (0u64..5).prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        string().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Every route that reads a body; `{run}` is a run waiting for approval, `{task}` its
/// executor task id.
const ROUTES: &[(&str, &str)] = &[
    ("PUT", "/api/v1/kv/fuzz"),
    ("POST", "/api/v1/runs"),
    ("PUT", "/api/v1/runs/{run}/actions"),
    ("PUT", "/api/v1/runs/{run}/tasks/a/annotations"),
    ("PUT", "/api/v1/runs/{run}/tasks/a/actions"),
    ("PUT", "/api/v1/executor/e1"),
    ("PUT", "/api/v1/executor/e1/tasks/{task}"),
    ("POST", "/api/v1/executor/e1/tasks/{task}/logs/0?offset=0"),
    ("POST", "/api/v1/cluster/init"),
    ("POST", "/api/v1/cluster/learners"),
    ("POST", "/api/v1/cluster/voters"),
    ("POST", "/api/v1/import"),
    ("POST", "/raft/vote"),
    ("POST", "/raft/append"),
];

struct Target {
    base: String,
    run: String,
    http: reqwest::Client,
}

impl Target {
    async fn digest(&self) -> Vec<u8> {
        let get = |path: &str| self.http.get(format!("{}{path}", self.base)).bearer_auth(TOKEN).send();
        let mut out = get("/api/v1/export").await.unwrap().bytes().await.unwrap().to_vec();
        out.extend(get("/api/v1/maintenance").await.unwrap().bytes().await.unwrap());
        let cluster: Value = get("/api/v1/cluster").await.unwrap().json().await.unwrap();
        out.extend(cluster["nodes"].to_string().into_bytes());
        out
    }

    /// The digest once nothing moves any more (the scheduler may act on an accepted run).
    async fn settled(&self) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = self.digest().await;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.digest().await;
            if now == last {
                return now;
            }
            assert!(Instant::now() < deadline, "the state never settled");
            last = now;
        }
    }

    async fn send(&self, route: usize, body: Vec<u8>, digest: &mut Vec<u8>) -> Result<(), TestCaseError> {
        let (method, path) = ROUTES[route];
        let path = path.replace("{run}", &self.run).replace("{task}", &format!("{}.a", self.run));
        let resp = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| TestCaseError::fail(format!("{method} {path}: no answer: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        prop_assert!(status < 500, "{} {}: {} {}", method, path, status, text);
        if status >= 400 {
            let e: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            prop_assert!(e["code"].is_string() && e["message"].is_string(), "{} {}: {}", method, path, text);
            let after = self.digest().await;
            prop_assert!(
                after == *digest,
                "{} {} answered {} and changed the state: {}",
                method,
                path,
                status,
                text
            );
        } else {
            *digest = self.settled().await;
        }
        Ok(())
    }
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

/// A one-node cluster with an executor (played by no process) and a run waiting for
/// approval, so the routes naming them reach their handlers.
fn setup(rt: &tokio::runtime::Runtime) -> (Cluster, Target, Vec<u8>) {
    rt.block_on(async {
        let c = Cluster::bootstrap(1, &["--executor-timeout-ms", "3600000"]).await;
        let http = reqwest::Client::new();
        let base = c.url(1);
        let resp = http
            .put(format!("{base}/api/v1/executor/e1"))
            .bearer_auth(TOKEN)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 204);
        let def = json!({"name": "fuzz", "group": "/fuzz", "tasks": [{"name": "a", "image": "busybox",
            "needs_approval": true, "steps": [{"run": {"command": "true"}}]}]});
        let run = c.client(1).run_create(&serde_json::from_value(def).unwrap()).await.unwrap();
        let target = Target { base, run: run.id, http };
        let digest = target.settled().await;
        (c, target, digest)
    })
}

#[test]
fn arbitrary_json_bodies_never_get_a_5xx_and_a_4xx_changes_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (c, target, digest) = setup(&rt);
    let digest = std::cell::RefCell::new(digest);
    let config = Config { cases: cases(), failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    runner
        .run(&(0..ROUTES.len(), json_value()), |(route, value)| {
            rt.block_on(target.send(route, value.to_string().into_bytes(), &mut digest.borrow_mut()))
        })
        .unwrap();
    rt.block_on(async { c.client(1).health().await.expect("the node is alive") });
}

#[test]
fn arbitrary_bytes_never_get_a_5xx_and_a_4xx_changes_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (c, target, digest) = setup(&rt);
    let digest = std::cell::RefCell::new(digest);
    let config = Config { cases: cases(), failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let bytes = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        // Almost JSON: a valid value with bytes cut, flipped or appended.
        (json_value(), any::<usize>(), any::<u8>()).prop_map(|(v, at, b)| {
            let mut s = v.to_string().into_bytes();
            if !s.is_empty() {
                let i = at % s.len();
                s[i] = b;
                s.truncate(s.len() - (at % 3).min(s.len() - 1));
            }
            s
        }),
    ];
    runner
        .run(&(0..ROUTES.len(), bytes), |(route, body)| {
            rt.block_on(target.send(route, body, &mut digest.borrow_mut()))
        })
        .unwrap();
    rt.block_on(async { c.client(1).health().await.expect("the node is alive") });
}
