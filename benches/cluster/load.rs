//! The load generator both systems get: N concurrent clients, each doing one operation after
//! another for a fixed time; every operation's latency is kept, so that several slices of
//! load (see `kv`, which alternates the two systems) add up to one figure.
//!
//! `FLOTILLA_BENCH_TRACE=DIR` (diagnosis): `kv` writes every operation of its write points
//! to `DIR/{flotilla,etcd}-{clients}.txt`, one line each: when it started (µs since the
//! Unix epoch, to line up with the nodes' logs) and its latency (µs).

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub struct Stats {
    /// Operations done, over every slice.
    pub ops: f64,
    /// Time under load, over every slice.
    pub secs: f64,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// What one or more slices of load measured: time under load, and every operation's
/// start and latency.
#[derive(Default)]
pub struct Sample {
    elapsed: Duration,
    ops: Vec<(Instant, Duration)>,
}

impl Sample {
    pub fn add(&mut self, other: Sample) {
        self.elapsed += other.elapsed;
        self.ops.extend(other.ops);
    }

    /// Writes every operation, in the order they started, as `start_µs latency_µs` lines
    /// (the start since the Unix epoch).
    pub fn write_trace(&self, path: &Path) -> std::io::Result<()> {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut ops = self.ops.clone();
        ops.sort();
        let mut out = String::with_capacity(ops.len() * 24);
        for (start, latency) in ops {
            let since_epoch = (wall - (now - start)).duration_since(UNIX_EPOCH).unwrap_or_default();
            out.push_str(&format!("{} {}\n", since_epoch.as_micros(), latency.as_micros()));
        }
        std::fs::write(path, out)
    }

    pub fn stats(self) -> Stats {
        let mut all: Vec<Duration> = self.ops.iter().map(|(_, latency)| *latency).collect();
        all.sort();
        Stats {
            ops: all.len() as f64,
            secs: self.elapsed.as_secs_f64(),
            ops_per_s: all.len() as f64 / self.elapsed.as_secs_f64(),
            p50_ms: percentile_ms(&all, 0.5),
            p99_ms: percentile_ms(&all, 0.99),
        }
    }
}

/// Runs `op(client, i)` from `clients` tasks for `duration`. An error fails the benchmark:
/// a figure that counts failed operations would be worthless.
pub async fn drive<F, Fut, E>(clients: usize, duration: Duration, op: F) -> Sample
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut ops = Vec::with_capacity(4096);
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if let Err(e) = op(c, i).await {
                        panic!("client {c}, operation {i}: {e}");
                    }
                    ops.push((t, t.elapsed()));
                    i += 1;
                }
                ops
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("a load client panicked"));
    }
    Sample { elapsed: start.elapsed(), ops: all }
}

/// The `p` quantile (nearest rank) of sorted durations, in milliseconds; NaN when empty.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}
