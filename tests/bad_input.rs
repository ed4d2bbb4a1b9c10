//! Bad input never crashes a node or changes state: every case gets a 4xx JSON error.

mod common;

use common::*;
use serde_json::Value;

/// Sends a request whose body the server refuses before reading it all: the write may
/// fail with a broken pipe, the answer must still be a 413 JSON error.
async fn raw_oversized_put(url: &str, body_bytes: usize) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let u = reqwest::Url::parse(url).unwrap();
    let mut stream =
        tokio::net::TcpStream::connect((u.host_str().unwrap(), u.port().unwrap())).await.unwrap();
    let head = format!(
        "PUT {} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {body_bytes}\r\nconnection: close\r\n\r\n",
        u.path()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(&vec![b'x'; body_bytes]).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body =
        text.split("\r\n\r\n").nth(1).and_then(|b| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
    (status, body)
}

fn assert_error(case: &str, got: (u16, Value), status: u16) {
    assert_eq!(got.0, status, "{case}: {:?}", got.1);
    assert!(
        got.1["code"].is_string() && got.1["message"].is_string(),
        "{case}: not a JSON error: {:?}",
        got.1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_json_4xx_errors_and_change_nothing() {
    let c = Cluster::bootstrap(3, &[]).await;
    let base = c.url(2);
    let kv = format!("{base}/api/v1/kv/k");
    let t = Some(TOKEN);
    let revision = c.client(1).kv_put("k", "original", None).await.unwrap();
    let before = c.client(1).cluster(false).await.unwrap();

    assert_error("malformed JSON", call("PUT", &kv, t, Some(b"{\"value\":".to_vec())).await, 400);
    assert_error("missing field", call("PUT", &kv, t, Some(b"{}".to_vec())).await, 400);
    assert_error(
        "unknown field",
        call("PUT", &kv, t, Some(br#"{"value":"x","extra":1}"#.to_vec())).await,
        400,
    );
    assert_error("wrong type", call("PUT", &kv, t, Some(br#"{"value":5}"#.to_vec())).await, 400);
    assert_error("empty body", call("PUT", &kv, t, Some(Vec::new())).await, 400);
    assert_error("huge body", raw_oversized_put(&kv, 2 * 1024 * 1024).await, 413);
    let big_value = format!("{{\"value\":\"{}\"}}", "x".repeat(70 * 1024));
    assert_error("value over the limit", call("PUT", &kv, t, Some(big_value.into_bytes())).await, 400);
    assert_error(
        "bad prev_revision",
        call("PUT", &format!("{kv}?prev_revision=abc"), t, Some(br#"{"value":"x"}"#.to_vec())).await,
        400,
    );
    assert_error(
        "wrong token",
        call("PUT", &kv, Some("nope"), Some(br#"{"value":"x"}"#.to_vec())).await,
        401,
    );
    assert_error("missing token", call("GET", &kv, None, None).await, 401);
    assert_error(
        "wrong cluster token",
        call("POST", &format!("{base}/raft/append"), Some("nope"), Some(vec![1, 2])).await,
        401,
    );
    assert_error(
        "garbage raft RPC",
        call("POST", &format!("{base}/raft/vote"), t, Some(b"not msgpack".to_vec())).await,
        400,
    );
    assert_error("unknown route", call("GET", &format!("{base}/api/v1/nothing"), t, None).await, 404);
    assert_error("wrong method", call("PATCH", &kv, t, None).await, 405);
    assert_error("missing key", call("GET", &format!("{base}/api/v1/kv/absent"), t, None).await, 404);
    assert_error("list limit", call("GET", &format!("{base}/api/v1/kv?limit=100000"), t, None).await, 400);
    let puts = format!("{base}/api/v1/kv");
    let body = |b: &str| Some(b.as_bytes().to_vec());
    assert_error("puts: not JSON", call("POST", &puts, t, body("{\"puts\":[")).await, 400);
    assert_error(
        "puts: a key not a string",
        call("POST", &puts, t, body(r#"{"puts":[{"key":1,"value":"v"}]}"#)).await,
        400,
    );
    assert_error(
        "puts: an unknown field",
        call("POST", &puts, t, body(r#"{"puts":[],"atomic":true}"#)).await,
        400,
    );
    assert_error(
        "tasks listing: unknown data",
        call("GET", &format!("{base}/api/v1/executor/e1/tasks?data=some"), t, None).await,
        400,
    );
    assert_error(
        "init twice",
        call(
            "POST",
            &format!("{base}/api/v1/cluster/init"),
            t,
            Some(format!(r#"{{"nodes":{{"2":"{base}"}}}}"#).into_bytes()),
        )
        .await,
        409,
    );
    assert_error(
        "remove unknown node",
        call("DELETE", &format!("{base}/api/v1/cluster/nodes/99"), t, None).await,
        404,
    );
    assert_error(
        "promote a non-member",
        call("POST", &format!("{base}/api/v1/cluster/voters"), t, Some(br#"{"ids":[1,2,3,9]}"#.to_vec()))
            .await,
        400,
    );
    assert_error(
        "learner with a bad address",
        call(
            "POST",
            &format!("{base}/api/v1/cluster/learners"),
            t,
            Some(br#"{"id":5,"addr":"not a url"}"#.to_vec()),
        )
        .await,
        400,
    );
    assert_error(
        "learner that is a voter",
        call(
            "POST",
            &format!("{base}/api/v1/cluster/learners"),
            t,
            Some(format!(r#"{{"id":1,"addr":"{base}"}}"#).into_bytes()),
        )
        .await,
        409,
    );

    // Nothing changed: same value, same membership, every node alive.
    let item = c.client(3).kv_get("k", false).await.unwrap();
    assert_eq!((item.value.as_str(), item.revision), ("original", revision));
    let members = |s: &flotilla_api::types::ClusterStatus| {
        s.nodes.iter().map(|n| (n.id, n.addr.clone(), n.role.clone())).collect::<Vec<_>>()
    };
    let after = c.client(1).cluster(false).await.unwrap();
    assert_eq!(members(&after), members(&before));
    for id in 1..=3 {
        c.client(id).health().await.expect("node still up");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_exit_codes_follow_the_spec() {
    let c = Cluster::bootstrap(1, &[]).await;
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .env("FLOTILLA_TOKEN", TOKEN)
            .env("FLOTILLA_SERVER", c.url(1))
            .output()
            .expect("run cli")
    };
    let ok = run(&["kv", "put", "a", "1"]);
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    let got = run(&["kv", "get", "a"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "1");

    let url = c.url(1);
    let twice = run(&["cluster", "init", "--node", &format!("1={url}")]);
    assert_eq!(twice.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains("already"),
        "{}",
        String::from_utf8_lossy(&twice.stderr)
    );

    let refused = run(&["kv", "get", "missing"]);
    assert_eq!(refused.status.code(), Some(1));
    let usage = run(&["kv", "frobnicate"]);
    assert_eq!(usage.status.code(), Some(2));
    let bad_node = run(&["cluster", "add-learner", "--node", "x=y"]);
    assert_eq!(bad_node.status.code(), Some(2));

    let status = run(&["cluster", "status", "--json"]);
    let v: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(v["leader_id"], 1);
    assert_eq!(v["nodes"][0]["role"], "voter");
}
