//! Benchmark 4, failover: under a steady write load (16 writers spread over the three nodes, each moving
//! to the next node on an error), SIGKILL the leader and time the kill to the first write
//! accepted after it; the killed node is restarted on its data dir and caught up before the
//! next kill. The baseline is the same load and the same kills on the three-member etcd.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::etcd::{self, Etcd};
use crate::load::percentile_ms;
use crate::report::Row;

const WRITERS: usize = 16;

/// The writers and, for each accepted write, when it was sent and when it was accepted.
struct Load {
    accepted: Arc<Mutex<Vec<(Instant, Instant)>>>,
    stop: Arc<AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `put(node, key)` writes through the client of `node` (0..3).
    fn start<F, Fut>(put: F) -> Load
    where
        F: Fn(usize, String) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = bool> + Send,
    {
        let accepted: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let writers = (0..WRITERS)
            .map(|w| {
                let (put, accepted, stop) = (put.clone(), accepted.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut at, mut n) = (w, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let sent = Instant::now();
                        if put(at % 3, format!("load/{w}/{n}")).await {
                            accepted.lock().unwrap().push((sent, Instant::now()));
                        } else {
                            at += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                })
            })
            .collect();
        Load { accepted, stop, writers }
    }

    /// From the kill to the first write sent after it and accepted (a write committed
    /// before the kill whose answer arrives later says nothing about recovery).
    async fn first_write_after(&self, killed_at: Instant) -> Duration {
        let deadline = killed_at + Duration::from_secs(30);
        loop {
            let first = self
                .accepted
                .lock()
                .unwrap()
                .iter()
                .filter(|(sent, _)| *sent > killed_at)
                .map(|(_, at)| *at)
                .min();
            if let Some(t) = first {
                return t - killed_at;
            }
            assert!(Instant::now() < deadline, "no write accepted within 30 s of a kill");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.writers {
            w.abort();
            let _ = w.await;
        }
    }
}

async fn flotilla(kills: usize) -> Vec<Duration> {
    let mut cluster = Cluster::bootstrap(3, &[]).await;
    let clients: Arc<Vec<_>> = Arc::new((1..=3).map(|i| cluster.client(i)).collect());
    let load = Load::start(move |node, key| {
        let clients = clients.clone();
        async move { clients[node].kv_put(&key, "v", None).await.is_ok() }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut recoveries = Vec::new();
    for _ in 0..kills {
        let leader = cluster.wait_for_leader().await;
        let killed_at = Instant::now();
        cluster.kill(leader);
        let took = load.first_write_after(killed_at).await;
        recoveries.push(took);
        if took > Duration::from_secs(1) {
            // The slow ones are what the failover goal is about: show how the election went.
            println!("kill of leader {leader} took {} ms; the survivors' logs end:", took.as_millis());
            for id in (1..=3).filter(|id| *id != leader) {
                // The election's lines (all of them with FLOTILLA_NODE_RUST_LOG=info).
                let log = cluster.log_text(id);
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("vote") || l.contains("elect") || l.contains("leader="))
                    .collect();
                println!("--- node {id} ---\n{}", lines[lines.len().saturating_sub(30)..].join("\n"));
            }
        }
        cluster.start(leader);
        cluster.wait_healthy(leader).await;
        cluster.wait_caught_up().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    load.stop().await;
    recoveries
}

async fn etcd(kills: usize) -> Vec<Duration> {
    let mut etcd = Etcd::start(3).await;
    let mut clients = Vec::new();
    for i in 0..etcd.len() {
        clients.push(etcd::connect(&etcd.endpoint(i)).await.expect("connect to etcd").kv_client());
    }
    let clients = Arc::new(clients);
    let load = Load::start(move |node, key| {
        let mut kv = clients[node].clone();
        async move { kv.put(key, "v", None).await.is_ok() }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut recoveries = Vec::new();
    for _ in 0..kills {
        let leader = etcd.wait_for_leader().await;
        let killed_at = Instant::now();
        etcd.kill(leader);
        recoveries.push(load.first_write_after(killed_at).await);
        etcd.restart(leader);
        etcd.wait_for_leader().await;
        // Caught up: the restarted member answers a linearizable read.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = etcd::connect(&etcd.endpoint(leader)).await {
                if c.get("load/0/1", None).await.is_ok() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "restarted etcd member did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    load.stop().await;
    recoveries
}

pub async fn run(quick: bool) -> Vec<Row> {
    // 20 kills in the full mode: the goal is on the worst of them (issue 24).
    let kills = if quick { 3 } else { 20 };
    etcd::require();
    println!(
        "== failover: 3 nodes, {WRITERS} writers moving to the next node on errors, {kills} leader SIGKILLs"
    );
    let mut f = flotilla(kills).await;
    let mut e = etcd(kills).await;
    f.sort();
    e.sort();
    let ms = |v: &[Duration]| {
        v.iter().map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0)).collect::<Vec<_>>().join(" ")
    };
    println!("kill → first accepted write, ms: flotilla {} | etcd {}", ms(&f), ms(&e));
    vec![
        Row::new(
            "failover_kill_to_write_p50",
            "ms",
            percentile_ms(&f, 0.5),
            "etcd",
            percentile_ms(&e, 0.5),
            false,
        ),
        Row::new(
            "failover_kill_to_write_p99",
            "ms",
            percentile_ms(&f, 0.99),
            "etcd",
            percentile_ms(&e, 0.99),
            false,
        ),
        Row::new(
            "failover_kill_to_write_max",
            "ms",
            percentile_ms(&f, 1.0),
            "etcd",
            percentile_ms(&e, 1.0),
            false,
        ),
    ]
}
