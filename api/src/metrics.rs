//! Prometheus text metrics, written by hand: a few counters and one latency histogram per
//! write kind do not justify a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the write latency buckets, in seconds.
const BUCKETS_S: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS_S.len()],
    count: u64,
    sum_s: f64,
}

#[derive(Default)]
pub struct Metrics {
    /// (route label, status) → count.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// (write kind, outcome) → latency histogram.
    writes: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        *lock(&self.requests).entry((route, status)).or_default() += 1;
    }

    pub fn write(&self, kind: &'static str, ok: bool, took: Duration) {
        let mut writes = lock(&self.writes);
        let h = writes.entry((kind, if ok { "ok" } else { "error" })).or_default();
        let s = took.as_secs_f64();
        for (i, bound) in BUCKETS_S.iter().enumerate() {
            if s <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum_s += s;
    }

    /// Appends the request and write metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP flotilla_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE flotilla_http_requests_total counter\n");
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ =
                writeln!(out, "flotilla_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        out.push_str(
            "# HELP flotilla_write_duration_seconds Time from receiving a write to its commit and apply.\n",
        );
        out.push_str("# TYPE flotilla_write_duration_seconds histogram\n");
        for ((kind, outcome), h) in lock(&self.writes).iter() {
            let labels = format!("kind=\"{kind}\",outcome=\"{outcome}\"");
            for (i, bound) in BUCKETS_S.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "flotilla_write_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {}",
                    h.counts[i]
                );
            }
            let _ =
                writeln!(out, "flotilla_write_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "flotilla_write_duration_seconds_sum{{{labels}}} {}", h.sum_s);
            let _ = writeln!(out, "flotilla_write_duration_seconds_count{{{labels}}} {}", h.count);
        }
    }
}
