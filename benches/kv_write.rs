//! Rough coordination-write throughput: durable 128-byte puts to distinct keys through the
//! HTTP API, N concurrent clients, against a three-node cluster and — side by side in the
//! same run, as the baseline — a one-node cluster (same binary, same client, same disk),
//! so the ratio is the cost of replication. The etcd comparison is its own issue.
//!
//! `cargo bench --bench kv_write [-- --quick]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

struct Result {
    writes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn measure(c: &Cluster, clients: usize, duration: Duration) -> Result {
    let leader = c.wait_for_leader().await;
    let url = Arc::new(c.url(leader));
    let value = "x".repeat(128);
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|w| {
            let (url, value) = (url.clone(), value.clone());
            tokio::spawn(async move {
                let client = flotilla_api::Client::new(&url, Some(TOKEN.into()));
                let mut latencies = Vec::new();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let start = Instant::now();
                    client.kv_put(&format!("bench/{w}/{i}"), &value, None).await.expect("put");
                    latencies.push(start.elapsed());
                    i += 1;
                }
                latencies
            })
        })
        .collect();
    let mut all: Vec<Duration> = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0;
    Result { writes_per_s: all.len() as f64 / duration.as_secs_f64(), p50_ms: pct(0.5), p99_ms: pct(0.99) }
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let duration = Duration::from_secs(if quick { 2 } else { 5 });
    println!("cores: {}", std::thread::available_parallelism().map_or(0, |n| n.get()));
    println!("{:>8} {:>14} {:>10} {:>10} {:>14} {:>10} {:>10} {:>8}", "clients", "3-node w/s", "p50 ms", "p99 ms", "1-node w/s", "p50 ms", "p99 ms", "ratio");
    for clients in [1, 16, 64] {
        let three = {
            let c = Cluster::bootstrap(3, &[]).await;
            measure(&c, clients, duration).await
        };
        let one = {
            let c = Cluster::bootstrap(1, &[]).await;
            measure(&c, clients, duration).await
        };
        println!(
            "{:>8} {:>14.0} {:>10.2} {:>10.2} {:>14.0} {:>10.2} {:>10.2} {:>8.2}",
            clients, three.writes_per_s, three.p50_ms, three.p99_ms, one.writes_per_s, one.p50_ms, one.p99_ms,
            three.writes_per_s / one.writes_per_s
        );
    }
}
