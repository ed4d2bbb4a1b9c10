//! CORS with real preflight requests: off by default (no CORS header, preflights 403),
//! `--allowed-origins` answers exactly the listed origins, never with `*`.

mod common;

use common::{Cluster, TOKEN};

async fn preflight(http: &reqwest::Client, url: &str, origin: &str, method: &str) -> reqwest::Response {
    http.request(reqwest::Method::OPTIONS, url)
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header("access-control-request-headers", "authorization, content-type")
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_is_off_by_default_and_answers_only_the_allowed_origins() {
    let http = reqwest::Client::new();
    let off = Cluster::bootstrap(1, &[]).await;
    let runs = format!("{}/api/v1/runs", off.url(1));
    let r = preflight(&http, &runs, "https://ci.example.com", "POST").await;
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r =
        http.get(&runs).bearer_auth(TOKEN).header("origin", "https://ci.example.com").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none(), "no CORS header when off");

    let on =
        Cluster::bootstrap(1, &["--allowed-origins", "https://ci.example.com,http://localhost:8080"]).await;
    let runs = format!("{}/api/v1/runs", on.url(1));
    let r = preflight(&http, &runs, "https://ci.example.com", "POST").await;
    assert_eq!(r.status().as_u16(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://ci.example.com");
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("POST") && methods.contains("GET"), "{methods}");
    assert!(h["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
    assert!(h.get("access-control-allow-credentials").is_none());
    // Another origin, a method the route does not have, and an unknown route: 403.
    assert_eq!(preflight(&http, &runs, "https://evil.example", "POST").await.status().as_u16(), 403);
    assert_eq!(preflight(&http, &runs, "https://ci.example.com", "DELETE").await.status().as_u16(), 403);
    let nowhere = format!("{}/api/v1/nowhere", on.url(1));
    assert_eq!(preflight(&http, &nowhere, "https://ci.example.com", "GET").await.status().as_u16(), 403);
    // Answers to an allowed origin carry it, others nothing.
    let r =
        http.get(&runs).bearer_auth(TOKEN).header("origin", "http://localhost:8080").send().await.unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "http://localhost:8080");
    assert!(r.headers().get_all("vary").iter().any(|v| v.to_str().unwrap().contains("Origin")));
    let r = http.get(&runs).bearer_auth(TOKEN).header("origin", "https://evil.example").send().await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[test]
fn a_bad_origin_stops_the_server_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--allowed-origins".to_string(), "https://ci.example.com/path".to_string()];
    common::assert_server_refuses(dir.path(), &args, "allowed origin");
}
