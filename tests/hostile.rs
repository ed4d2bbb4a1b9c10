//! Hostile input, class by class (issue 25): each test sends what a probe found accepted
//! and asserts a clear 4xx and an unchanged state, through real server processes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn assert_error(case: &str, got: &(u16, Value), status: u16) {
    assert_eq!(got.0, status, "{case}: {:?}", got.1);
    assert!(
        got.1["code"].is_string() && got.1["message"].is_string(),
        "{case}: not a JSON error: {:?}",
        got.1
    );
}

/// The leader's commit index: any accepted change of the replicated state moves it.
async fn commit_index(c: &Cluster) -> u64 {
    c.client(1).cluster(false).await.expect("cluster status").commit_index
}

/// The commit index once the scheduler has nothing more to write (unchanged for 1 s).
async fn settled_commit_index(c: &Cluster) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = commit_index(c).await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = commit_index(c).await;
        if now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "the state never settled");
        last = now;
    }
}

fn a_run(name: &str) -> Value {
    json!({"name": name, "group": "/hostile", "tasks": [{"name": "a", "image": "busybox", "needs_approval": true,
        "steps": [{"run": {"command": "true"}}, {"run": {"command": "true"}}]}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn json_arrays_are_never_read_as_objects() {
    let c = Cluster::bootstrap(1, &[]).await;
    let base = format!("{}/api/v1", c.url(1));
    let t = Some(TOKEN);
    let run = c.client(1).run_create(&serde_json::from_value(a_run("r")).unwrap()).await.unwrap();
    let heartbeat = json!({"archs": ["amd64"], "active_tasks_limit": 3});
    let (s, _) =
        call("PUT", &format!("{base}/executor/e1"), t, Some(heartbeat.to_string().into_bytes())).await;
    assert_eq!(s, 204);
    let executors_before = c.client(1).executors().await.unwrap();
    let before = settled_commit_index(&c).await;

    let create_as_array = json!(["r", "/hostile", {}, {}, {}, null, [], [["a", "busybox"]]]);
    let nested_array = json!({"name": "r", "tasks": [["a", "busybox"]]});
    let step_as_array =
        json!({"name": "r", "tasks": [{"name": "a", "image": "i", "steps": [{"run": [null, "x"]}]}]});
    let cases: Vec<(&str, String, Value)> = vec![
        ("kv put", format!("{base}/kv/k"), json!(["x"])),
        ("run create", format!("{base}/runs"), create_as_array),
        ("run create, a task as an array", format!("{base}/runs"), nested_array),
        ("run create, a step as an array", format!("{base}/runs"), step_as_array),
        ("run stop", format!("{base}/runs/{}/actions", run.id), json!(["stop"])),
        ("annotations", format!("{base}/runs/{}/tasks/a/annotations", run.id), json!([{"x": "y"}])),
        ("approve", format!("{base}/runs/{}/tasks/a/actions", run.id), json!(["approve"])),
        ("heartbeat", format!("{base}/executor/e1"), json!([])),
        ("learners", format!("{base}/cluster/learners"), json!([5, "http://127.0.0.1:1"])),
        ("voters", format!("{base}/cluster/voters"), json!([[1]])),
        ("init", format!("{base}/cluster/init"), json!([{"1": "http://127.0.0.1:1"}])),
    ];
    for (case, url, body) in cases {
        let method = if url.ends_with("/runs") || url.contains("/cluster/") { "POST" } else { "PUT" };
        let got = call(method, &url, t, Some(body.to_string().into_bytes())).await;
        assert_error(case, &got, 400);
        assert!(got.1["message"].as_str().unwrap().contains("JSON object"), "{case}: {:?}", got.1);
    }
    assert_eq!(commit_index(&c).await, before, "a refused body changed the state");
    assert!(c.client(1).kv_get("k", false).await.is_err());
    assert!(!c.client(1).run_get(&run.id).await.unwrap().stop);
    assert_eq!(c.client(1).executors().await.unwrap().executors[0].info, executors_before.executors[0].info);
}

/// Registers executor `id` (no process: the test plays it) and waits until the scheduler
/// has given it task `a` of `run_id`; returns the executor task id.
async fn fake_executor_task(c: &Cluster, id: &str, run_id: &str) -> String {
    let base = format!("{}/api/v1", c.url(1));
    let (s, body) = call("PUT", &format!("{base}/executor/{id}"), Some(TOKEN), Some(b"{}".to_vec())).await;
    assert_eq!(s, 204, "{body:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, body) = call("GET", &format!("{base}/executor/{id}/tasks"), Some(TOKEN), None).await;
        assert_eq!(s, 200, "{body:?}");
        if let Some(t) = body["tasks"].as_array().and_then(|t| {
            t.iter().find(|t| {
                t["spec"]["spec"]["run_id"] == run_id || t["id"].as_str().unwrap_or("").starts_with(run_id)
            })
        }) {
            return t["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no task for {id}: {body:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn status(phase: &str, steps: usize) -> Vec<u8> {
    let step = json!({"phase": "notstarted", "log_phase": "notavailable"});
    json!({"phase": phase, "setup_step": step, "steps": vec![step.clone(); steps]}).to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_in_the_wrong_phase_are_refused() {
    let c = Cluster::bootstrap(1, &[]).await;
    let base = format!("{}/api/v1", c.url(1));
    let t = Some(TOKEN);
    let mut def = a_run("r");
    def["tasks"][0]["needs_approval"] = json!(false);
    let run = c.client(1).run_create(&serde_json::from_value(def).unwrap()).await.unwrap();
    let task_id = fake_executor_task(&c, "e1", &run.id).await;
    let task_url = format!("{base}/executor/e1/tasks/{task_id}");

    // A status going backwards.
    let (s, body) = call("PUT", &task_url, t, Some(status("running", 2))).await;
    assert_eq!(s, 204, "{body:?}");
    assert_error(
        "running -> notstarted",
        &call("PUT", &task_url, t, Some(status("notstarted", 2))).await,
        409,
    );

    // A log for a step the task does not have; the steps it has are accepted.
    let log = |step: &str| format!("{task_url}/logs/{step}?offset=0");
    assert_error("log of step 99", &call("POST", &log("99"), t, Some(b"hello".to_vec())).await, 404);
    assert_error("log of step 2", &call("POST", &log("2"), t, Some(b"hello".to_vec())).await, 404);
    let (s, body) = call("POST", &log("1"), t, Some(b"hello".to_vec())).await;
    assert_eq!(s, 200, "{body:?}");

    // Annotations of a run that ended (created in setuperror, a final phase).
    let mut ended = a_run("ended");
    ended["setup_errors"] = json!(["the config is broken"]);
    let ended = c.client(1).run_create(&serde_json::from_value(ended).unwrap()).await.unwrap();
    let before = c.client(1).run_get(&ended.id).await.unwrap();
    let annotations = json!({"annotations": {"approver/x": "approved"}}).to_string().into_bytes();
    let url = format!("{base}/runs/{}/tasks/a/annotations", ended.id);
    assert_error("annotations of an ended run", &call("PUT", &url, t, Some(annotations)).await, 409);
    assert_eq!(c.client(1).run_get(&ended.id).await.unwrap(), before);

    // A query parameter given twice.
    let rev = c.client(1).kv_put("k", "v", None).await.unwrap();
    let twice = format!("{base}/kv/k?prev_revision={rev}&prev_revision=1");
    assert_error(
        "prev_revision twice",
        &call("PUT", &twice, t, Some(br#"{"value":"w"}"#.to_vec())).await,
        400,
    );
    assert_eq!(c.client(1).kv_get("k", false).await.unwrap().value, "v");

    // Cluster addresses with line breaks, tabs or spaces.
    for addr in
        ["http://127.0.0.1:1\r\nx: y", "http://127.0.0.1:\t1", "http://127.0.0.1:1\n", "http://127.0 .0.1:1"]
    {
        let body = json!({"id": 7, "addr": addr}).to_string().into_bytes();
        assert_error(addr, &call("POST", &format!("{base}/cluster/learners"), t, Some(body)).await, 400);
    }
    assert_eq!(c.client(1).cluster(false).await.unwrap().nodes.len(), 1);
}

const TRICKY_KEYS: &[&str] = &[
    "../maintenance",
    "..",
    ".",
    "a/../b",
    "./x",
    "a/./b",
    "a/..",
    "..\\maintenance",
    "%2e%2e/maintenance",
    "%2E%2E",
    ".%2e",
    "a%2Fb",
    "a b",
    "a?b=c",
    "a#frag",
    "/leading",
    "trailing/",
    "a//b",
    "ü/ß/日本",
    "...",
    ".hidden",
    "a\\b",
    "%",
    "100%",
    "a;b=c",
    "a&b",
    "+plus+",
    "executors/e1",
];

/// Every key either lands as exactly itself or is refused with a message; nothing else
/// in the state moves (maintenance stays off, the executor stays registered).
async fn check_tricky_keys(c: &Cluster, put: impl AsyncFn(&str, &str) -> Result<(), String>) {
    let mut accepted = std::collections::BTreeSet::new();
    for (i, key) in TRICKY_KEYS.iter().enumerate() {
        let value = format!("v{i}");
        match put(key, &value).await {
            Ok(()) => {
                let item = c.client(1).kv_get(key, false).await.unwrap_or_else(|e| panic!("{key:?}: {e}"));
                assert_eq!((item.key.as_str(), item.value.as_str()), (*key, value.as_str()), "{key:?}");
                accepted.insert(key.to_string());
            }
            Err(message) => assert!(!message.trim().is_empty(), "{key:?}: refused without a message"),
        }
    }
    let stored: std::collections::BTreeSet<String> =
        c.client(1).kv_list("", None, 1000, false).await.unwrap().items.into_iter().map(|i| i.key).collect();
    assert_eq!(stored, accepted, "keys stored other than those written");
    assert!(accepted.contains("../maintenance") && accepted.contains("a/../b"), "{accepted:?}");
    assert!(!c.client(1).maintenance().await.unwrap().enabled, "a key turned maintenance on");
    assert_eq!(c.client(1).executors().await.unwrap().executors.len(), 1, "a key removed the executor");
}

async fn cluster_with_an_executor() -> Cluster {
    let c = Cluster::bootstrap(1, &[]).await;
    let url = format!("{}/api/v1/executor/e1", c.url(1));
    assert_eq!(call("PUT", &url, Some(TOKEN), Some(b"{}".to_vec())).await.0, 204);
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn tricky_keys_through_the_typed_client_land_as_themselves_or_are_refused() {
    let c = cluster_with_an_executor().await;
    let client = c.client(1);
    check_tricky_keys(&c, async |k: &str, v: &str| {
        client.kv_put(k, v, None).await.map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
    for key in TRICKY_KEYS {
        let _ = client.kv_delete(key, None).await;
        let _ = client.executor_delete(key).await;
        let _ = client.run_get(key).await;
        let _ = client.run_stop(key).await;
    }
    assert!(!client.maintenance().await.unwrap().enabled);
    assert_eq!(client.executors().await.unwrap().executors.len(), 1, "a tricky id removed the executor");
    let err = client.executor_delete("..").await.unwrap_err().to_string();
    assert!(err.contains("\"..\""), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tricky_keys_through_the_cli_land_as_themselves_or_are_refused() {
    let c = cluster_with_an_executor().await;
    check_tricky_keys(&c, async |k: &str, v: &str| {
        let (code, _, stderr) = c.cli(1, &["kv", "put", "--", k, v]);
        if code == 0 {
            Ok(())
        } else {
            Err(stderr)
        }
    })
    .await;
    for key in ["../executors/e1", "../maintenance", "..", "."] {
        c.cli(1, &["kv", "del", "--", key]);
    }
    assert!(!c.client(1).maintenance().await.unwrap().enabled, "kv del changed maintenance");
    assert_eq!(c.client(1).executors().await.unwrap().executors.len(), 1, "kv del removed the executor");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_refuses_dot_segments_where_an_identifier_is_expected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = cluster_with_an_executor().await;
    // Raw requests: no client-side URL normalisation.
    for path in
        ["/api/v1/kv/..", "/api/v1/kv/%2e%2e", "/api/v1/executors/.", "/api/v1/runs/../tasks/a/actions"]
    {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", c.nodes[&1].port)).await.unwrap();
        let req = format!(
            "DELETE {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("\"code\":\"bad_request\""), "{path}: {answer}");
    }
    assert_eq!(c.client(1).executors().await.unwrap().executors.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn run_create_reads_a_bounded_amount_and_never_prints_the_file() {
    let c = Cluster::bootstrap(1, &[]).await;
    let start = Instant::now();
    let (code, _, stderr) = c.cli(1, &["run", "create", "-f", "/dev/zero"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("larger than"), "{stderr}");
    assert!(start.elapsed() < Duration::from_secs(30), "reading /dev/zero took {:?}", start.elapsed());

    // A file that is no run definition: a shadow-like file with a password hash.
    let secret = "$6$Qx9u2Sy0$hV5xSecretHash0123456789";
    let shadow = c.dir.path().join("shadow");
    std::fs::write(&shadow, format!("root:{secret}:19700:0:99999:7:::\nbin:*:19700:0:99999:7:::\n")).unwrap();
    let as_map = c.dir.path().join("shadow-map");
    std::fs::write(&as_map, format!("root: {secret}\nbin: x\n")).unwrap();
    for file in [&shadow, &as_map] {
        let (code, stdout, stderr) = c.cli(1, &["run", "create", "-f", file.to_str().unwrap()]);
        assert_eq!(code, 2, "{stderr}");
        let stderr = stderr.replace(file.to_str().unwrap(), "FILE");
        for piece in ["Qx9u2Sy0", "SecretHash", "19700", "root", "bin"] {
            assert!(!stderr.contains(piece) && !stdout.contains(piece), "printed {piece:?}: {stderr}");
        }
        assert!(stderr.contains("not a valid run definition"), "{stderr}");
    }
    assert!(c
        .client(1)
        .run_list(&flotilla_api::client::RunQuery { limit: 10, ..Default::default() })
        .await
        .unwrap()
        .runs
        .is_empty());
}

/// Sends `head` (and `body`) on a fresh connection and returns what arrives until the
/// answer's headers are complete, the connection closes or `wait` passes.
async fn raw_exchange(port: u16, head: &str, body: &[u8], wait: Duration) -> (String, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(body).await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), s)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_is_checked_before_the_body_is_read() {
    let c = Cluster::bootstrap(1, &[]).await;
    let port = c.nodes[&1].port;
    for (path, len) in [
        ("/raft/append", 60_000_000u64),
        ("/api/v1/import", 40_000_000),
        ("/api/v1/kv/k", 900_000),
        ("/api/v1/executor/e1", 900_000),
    ] {
        // Headers only: a server that waits for the body before checking never answers.
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer nope\r\ncontent-length: {len}\r\n\r\n"
        );
        let (answer, _conn) = raw_exchange(port, &head, b"", Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_are_read_a_few_at_a_time_and_small_ones_never_wait() {
    use flotilla_store::limits::MAX_LARGE_API_BODIES;
    let c = Cluster::bootstrap(1, &[]).await;
    let port = c.nodes[&1].port;
    // Authenticated large bodies that stall hold every permit.
    let head = format!(
        "PUT /api/v1/kv/big HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: 900000\r\n\r\n"
    );
    let mut stalled = Vec::new();
    for _ in 0..MAX_LARGE_API_BODIES {
        stalled.push(raw_exchange(port, &head, b"{\"value\":\"", Duration::from_millis(300)).await.1);
    }
    let start = Instant::now();
    c.client(1).kv_put("small", "x", None).await.expect("a small body does not wait");
    assert!(start.elapsed() < Duration::from_secs(4), "a small body waited {:?}", start.elapsed());
    let big = json!({"value": "x".repeat(100 * 1024)}).to_string().into_bytes();
    let got = call("PUT", &format!("{}/api/v1/kv/big", c.url(1)), Some(TOKEN), Some(big.clone())).await;
    assert_error("a large body while all permits are held", &got, 503);
    assert_eq!(got.1["code"], "busy");
    drop(stalled);
    // The permits come back: the same body is read again (and refused for its size).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = call("PUT", &format!("{}/api/v1/kv/big", c.url(1)), Some(TOKEN), Some(big.clone())).await;
        if got.0 != 503 {
            assert_error("a large body once permits are back", &got, 400);
            break;
        }
        assert!(Instant::now() < deadline, "permits never came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    use flotilla_store::limits::{BODY_IDLE_TIMEOUT_MS, HEADER_READ_TIMEOUT_MS};
    let c = Cluster::bootstrap(1, &["--max-connections", "24"]).await;
    let port = c.nodes[&1].port;

    // A stalled body: 408 once it pauses past the idle timeout.
    let head = format!(
        "PUT /api/v1/kv/k HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: 100\r\n\r\n"
    );
    let wait = Duration::from_millis(BODY_IDLE_TIMEOUT_MS) + Duration::from_secs(20);
    let start = Instant::now();
    let (answer, _s) = raw_exchange(port, &head, b"{\"value\":", wait).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "stalled body: {answer:?} after {:?}", start.elapsed());

    // Trickled headers: the connection is closed.
    let wait = Duration::from_millis(HEADER_READ_TIMEOUT_MS) + Duration::from_secs(20);
    let start = Instant::now();
    let (answer, _s) = raw_exchange(port, "GET /healthz HTTP/1.1\r\nhost: x\r\n", b"", wait).await;
    let waited = start.elapsed();
    assert!(waited < wait, "a connection with unfinished headers was kept {waited:?}");
    assert!(!answer.contains("200 OK"), "{answer:?}");

    // The connection cap: idle connections fill it, the next ones are closed at once.
    let mut open = Vec::new();
    let mut refused = false;
    for _ in 0..40 {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 16];
        let closed = matches!(
            tokio::time::timeout(Duration::from_millis(300), s.peek(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        );
        if closed {
            refused = true;
            break;
        }
        open.push(s);
    }
    assert!(refused, "{} connections open, none refused", open.len());
    assert!(open.len() <= 24, "{} connections were open", open.len());
    let log = std::fs::read_to_string(&c.nodes[&1].log).unwrap();
    assert!(log.contains("connection limit reached"), "no log line:\n{}", c.log_tail(1));
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.client(1).health().await.is_err() {
        assert!(Instant::now() < deadline, "the node did not serve again once connections closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn event_streams_of_departed_clients_free_their_slots() {
    use flotilla_store::limits::MAX_EVENT_SUBSCRIBERS;
    let c = Cluster::bootstrap(1, &[]).await;
    let client = c.client(1);
    // More streams than the cap, one after the other, each dropped once open.
    for i in 0..MAX_EVENT_SUBSCRIBERS + 44 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match client.events(None).await {
                Ok(stream) => {
                    drop(stream);
                    break;
                }
                Err(e) if e.status() == Some(503) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("stream {i} refused although every earlier one was dropped: {e}"),
            }
        }
    }
    let mut last = client.events(None).await.expect("a new stream after 300 dropped ones");
    // It is live: a change arrives on it.
    let run = c.client(1).run_create(&serde_json::from_value(a_run("after")).unwrap()).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(20), last.next()).await.expect("an event").unwrap();
    assert_eq!(event.expect("stream open").run_id, run.id);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_fields_control_characters_and_escaping_paths_are_refused() {
    let c = Cluster::bootstrap(1, &[]).await;
    let url = format!("{}/api/v1/runs", c.url(1));
    let with_task = |f: &dyn Fn(&mut Value)| {
        let mut def = a_run("r");
        f(&mut def["tasks"][0]);
        def
    };
    let keys: Vec<String> = (0..50_000).map(|i| format!("k{i}")).collect();
    let cases: Vec<(&str, Value)> = vec![
        ("a 900 KB working_dir", with_task(&|t| t["working_dir"] = json!("w".repeat(900 * 1024)))),
        (
            "50,000 restore_cache keys",
            with_task(&|t| t["steps"] = json!([{"restore_cache": {"keys": keys, "dest_dir": "."}}])),
        ),
        ("a shell with NUL", with_task(&|t| t["shell"] = json!("/bin/sh\u{0}-x"))),
        ("a shell with a newline", with_task(&|t| t["shell"] = json!("/bin/sh\n-c"))),
        ("an image with a newline", with_task(&|t| t["image"] = json!("busybox\nlatest"))),
        (
            "save_to_workspace out of the workspace",
            with_task(&|t| {
                t["steps"] = json!([{"save_to_workspace": {"contents": [{"source_dir": "../../..", "paths": ["**"]}]}}])
            }),
        ),
        (
            "save_to_workspace dest out of the workspace",
            with_task(&|t| {
                t["steps"] = json!([{"save_to_workspace": {"contents": [{"source_dir": ".", "dest_dir": "a/../../x"}]}}])
            }),
        ),
        (
            "restore_workspace out of the workspace",
            with_task(&|t| t["steps"] = json!([{"restore_workspace": {"dest_dir": "../../../etc"}}])),
        ),
        (
            "restore_cache out of the workspace",
            with_task(&|t| t["steps"] = json!([{"restore_cache": {"keys": ["k"], "dest_dir": "../.."}}])),
        ),
        ("an environment value with NUL", with_task(&|t| t["environment"] = json!({"A": "x\u{0}y"}))),
    ];
    let before = settled_commit_index(&c).await;
    for (case, def) in cases {
        let got = call("POST", &url, Some(TOKEN), Some(def.to_string().into_bytes())).await;
        assert_error(case, &got, 400);
        assert!(got.1["message"].as_str().unwrap().len() < 1000, "{case}: the message echoes the value");
    }
    assert_eq!(commit_index(&c).await, before, "a refused run changed the state");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_routes_path_with_another_method_gets_405_with_allow_and_unknown_paths_404() {
    let c = cluster_with_an_executor().await;
    let base = c.url(1);
    let client = reqwest::Client::new();
    for (method, path, allow) in [
        // The two that drifted to 404 while each route family kept its own 405 list.
        ("POST", "/api/v1/executor/e1/siblings", "GET"),
        ("PUT", "/api/v1/runs/0000000000000001/tasks/a/logs", "GET"),
        ("DELETE", "/api/v1/runs/0000000000000001/tasks/a/workspace", "GET"),
        ("POST", "/api/v1/executor/e1/caches", "GET, PUT"),
        ("PATCH", "/api/v1/kv/a/b", "GET, PUT, DELETE"),
        ("GET", "/raft/vote", "POST"),
        ("POST", "/ui/runs", "GET, HEAD"),
    ] {
        let resp = client
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), 405, "{method} {path}");
        let allowed = resp.headers().get("allow").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(allowed.as_deref(), Some(allow), "{method} {path}");
        let body: Value = resp.json().await.expect("a JSON error");
        assert_eq!(body["code"], "method_not_allowed", "{method} {path}: {body}");
        assert!(body["message"].as_str().unwrap().contains(allow), "{method} {path}: {body}");
    }
    // Without the right token a wrong method or an unknown path tells nothing.
    let siblings = format!("{base}/api/v1/executor/e1/siblings");
    assert_error("405 without a token", &call("POST", &siblings, Some("nope"), None).await, 401);
    let bogus = format!("{base}/api/v1/runs/0000000000000001/tasks/a/bogus");
    assert_error("404 without a token", &call("GET", &bogus, None, None).await, 401);
    assert_error("unknown path", &call("GET", &bogus, Some(TOKEN), None).await, 404);
    assert_error(
        "unknown raft route",
        &call("POST", &format!("{base}/raft/bogus"), Some(TOKEN), None).await,
        404,
    );
    // Counted under their route's label.
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    for series in
        [r#"route="executor",status="405""#, r#"route="runs",status="405""#, r#"route="other",status="404""#]
    {
        assert!(metrics.contains(series), "no {series} in\n{metrics}");
    }
}
