//! Maintenance mode's effects on real server processes: every node switches on its own
//! applied view, serves only the maintenance, cluster, health and metrics routes (and the
//! executor-facing ones), answers 503 `maintenance` elsewhere, and the scheduler pauses.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, TOKEN};
use flotilla_api::types::{ExecutorInfo, RunCreate};
use serde_json::json;

async fn status(
    url: &str,
    method: reqwest::Method,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut r = reqwest::Client::new().request(method, url).bearer_auth(TOKEN);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("request");
    let code = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (code, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_maintenance_every_node_serves_only_its_routes_and_the_scheduler_pauses() {
    let c = Cluster::bootstrap(3, &[]).await;
    let api = c.client(1);
    let create: RunCreate = serde_json::from_value(json!({
        "name": "m", "group": "/m", "tasks": [{"name": "t", "image": "busybox", "steps": [{"run": {"command": "true"}}]}]
    }))
    .unwrap();
    // A run queued before maintenance, with no executor yet to take it.
    let run = api.run_create(&create).await.unwrap();
    api.kv_put("k", "v", None).await.unwrap();

    c.client(2).set_maintenance(true).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = api.maintenance().await.unwrap();
        if m.nodes.len() == 3 && m.nodes.values().all(|on| *on) {
            break;
        }
        assert!(Instant::now() < deadline, "not every node switched: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for id in 1..=3 {
        let base = c.url(id);
        for (method, path, body) in [
            (reqwest::Method::GET, "/api/v1/kv/k", None),
            (reqwest::Method::PUT, "/api/v1/kv/k", Some(json!({"value": "w"}))),
            (reqwest::Method::GET, "/api/v1/runs", None),
            (reqwest::Method::POST, "/api/v1/runs", Some(serde_json::to_value(&create).unwrap())),
            (reqwest::Method::GET, "/api/v1/events", None),
            (reqwest::Method::GET, "/api/v1/executors", None),
        ] {
            let (code, body) = status(&format!("{base}{path}"), method.clone(), body).await;
            assert_eq!(code, 503, "node {id} {method} {path}: {body}");
            assert_eq!(body["code"], "maintenance", "node {id} {method} {path}: {body}");
        }
        for path in ["/healthz", "/metrics", "/api/v1/cluster", "/api/v1/maintenance"] {
            let (code, body) = status(&format!("{base}{path}"), reqwest::Method::GET, None).await;
            assert_eq!(code, 200, "node {id} {path} must stay open: {body}");
        }
    }

    // Executors keep heartbeating but get nothing: the scheduler is paused.
    let exec = c.client(3);
    let info: ExecutorInfo = serde_json::from_value(json!({"archs": ["amd64"]})).unwrap();
    exec.executor_heartbeat("maint-exec", &info).await.expect("heartbeat in maintenance");
    // An active scheduler dispatches within milliseconds; give it a full second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    exec.executor_heartbeat("maint-exec", &info).await.unwrap();
    let tasks = exec.executor_tasks("maint-exec", 0, 0).await.unwrap();
    assert!(tasks.tasks.is_empty(), "no task is dispatched in maintenance: {tasks:?}");

    // Back to normal: the queued run is dispatched and everything answers again.
    api.set_maintenance(false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        exec.executor_heartbeat("maint-exec", &info).await.unwrap();
        let tasks = exec.executor_tasks("maint-exec", 0, 500).await;
        if tasks.is_ok_and(|t| t.tasks.iter().any(|t| t.spec.spec.run_id == run.id)) {
            break;
        }
        assert!(Instant::now() < deadline, "the run was not dispatched after maintenance");
    }
    assert_eq!(api.kv_get("k", false).await.unwrap().value, "v");
}
