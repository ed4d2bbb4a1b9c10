//! Object-storage throughput: a 256 MiB object streamed up then down through each
//! backend (POSIX on local disk, s3s-fs and moto on loopback), with the process's peak
//! RSS during each transfer. The POSIX backend is the baseline for the ratios; a flat
//! RSS (a few part buffers, not the object) shows that nothing is held whole in memory.
//!
//! `cargo bench --bench ost [-- --quick]` (--quick: 64 MiB)

use std::time::Instant;

use bytes::Bytes;
use flotilla_store::ost::test_servers::{Kind, S3Server};
use flotilla_store::ost::{ObjectStream, Ost};
use futures::StreamExt;

const MIB: u64 = 1024 * 1024;

/// Peak resident set since the last reset, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn source(size: u64) -> ObjectStream {
    let chunk = Bytes::from(vec![0x5au8; MIB as usize]);
    Box::pin(futures::stream::iter((0..size / MIB).map(move |_| Ok(chunk.clone()))))
}

struct Row {
    name: &'static str,
    up_mib_s: f64,
    down_mib_s: f64,
    rss_up: f64,
    rss_down: f64,
}

async fn measure(name: &'static str, ost: &Ost, size: u64) -> Row {
    reset_peak_rss();
    let t = Instant::now();
    let n = ost.put("bench/object", source(size), None, true).await.expect("upload");
    assert_eq!(n, size);
    let up = t.elapsed().as_secs_f64();
    let rss_up = peak_rss_mib();
    reset_peak_rss();
    let t = Instant::now();
    let mut stream = ost.get("bench/object").await.expect("download");
    let mut got = 0u64;
    while let Some(c) = stream.next().await {
        got += c.expect("chunk").len() as u64;
    }
    assert_eq!(got, size);
    let down = t.elapsed().as_secs_f64();
    let rss_down = peak_rss_mib();
    ost.delete("bench/object").await.unwrap();
    let mib = (size / MIB) as f64;
    Row { name, up_mib_s: mib / up, down_mib_s: mib / down, rss_up, rss_down }
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let size = if quick { 64 * MIB } else { 256 * MIB };
    let dir = tempfile::tempdir().unwrap();
    let posix = Ost::posix(dir.path().join("ost")).unwrap();
    let s3s = S3Server::start(Kind::S3sFs);
    let moto = S3Server::start(Kind::Moto);
    let mut rows = vec![measure("posix", &posix, size).await];
    rows.push(measure("s3s-fs", &s3s.ost("bench", "base").await.unwrap(), size).await);
    rows.push(measure("moto", &moto.ost("bench", "base").await.unwrap(), size).await);
    println!("object of {} MiB, streamed up (put of unknown size) then down (get)", size / MIB);
    println!(
        "{:<8} {:>10} {:>10} {:>9} {:>9} {:>12} {:>12}",
        "backend", "up MiB/s", "down MiB/s", "up/posix", "dn/posix", "peak RSS up", "peak RSS dn"
    );
    let (bu, bd) = (rows[0].up_mib_s, rows[0].down_mib_s);
    for r in &rows {
        println!(
            "{:<8} {:>10.1} {:>10.1} {:>9.2} {:>9.2} {:>9.1} MiB {:>8.1} MiB",
            r.name,
            r.up_mib_s,
            r.down_mib_s,
            r.up_mib_s / bu,
            r.down_mib_s / bd,
            r.rss_up,
            r.rss_down
        );
    }
}
