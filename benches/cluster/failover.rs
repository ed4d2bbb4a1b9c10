//! Failover: under a steady write load (16 clients spread over the nodes, retrying on the
//! next node), SIGKILL the leader 10 times; the time from each kill to the first write
//! accepted after it. The baseline, side by side in the same run, is the same load with
//! no kill: the gap between two consecutive accepted writes (p50 / max).
//!
//! `cargo bench --bench failover [-- --quick]` (--quick: 3 kills)

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let kills = if quick { 3 } else { 10 };
    let mut cluster = Cluster::bootstrap(3, &[]).await;
    let accepted: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (1..=3).map(|i| cluster.client(i)).collect();
    let mut writers = Vec::new();
    for w in 0..16usize {
        let (clients, accepted, stop) = (clients.clone(), accepted.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut at = w;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                match clients[at % 3].kv_put(&format!("load/{w}/{n}"), "v", None).await {
                    Ok(_) => accepted.lock().unwrap().push(Instant::now()),
                    Err(_) => {
                        at += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }));
    }
    // Baseline: gaps between accepted writes with no kill.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let base: Vec<Duration> = {
        let a = accepted.lock().unwrap();
        a.windows(2).map(|w| w[1].saturating_duration_since(w[0])).collect()
    };
    let mut recoveries = Vec::new();
    for _ in 0..kills {
        let leader = cluster.wait_for_leader().await;
        let killed_at = Instant::now();
        cluster.kill(leader);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let first = accepted.lock().unwrap().iter().copied().find(|t| *t > killed_at);
            if let Some(t) = first {
                recoveries.push(t - killed_at);
                break;
            }
            assert!(Instant::now() < deadline, "no write accepted within 30 s of a kill");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cluster.start(leader);
        cluster.wait_healthy(leader).await;
        cluster.wait_caught_up().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    println!("3 nodes, 16 writers retrying on the next node, {kills} leader SIGKILLs");
    println!("{:<40} {:>10} {:>10}", "", "p50 ms", "max ms");
    println!("{:<40} {:>10.1} {:>10.1}", "gap between accepted writes (no kill)", pct(base.clone(), 0.5), pct(base, 1.0));
    println!("{:<40} {:>10.1} {:>10.1}", "kill → first accepted write", pct(recoveries.clone(), 0.5), pct(recoveries, 1.0));
}
