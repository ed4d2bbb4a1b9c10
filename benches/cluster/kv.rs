//! Benchmark 1, coordination writes and linearizable reads: a three-node flotilla cluster
//! through its HTTP API client against a three-member etcd through its gRPC client
//! (`etcd-client`), both driven by the same load generator with the same client counts,
//! taking turns in one-second slices for each count. Every load client talks to the leader
//! of its system; writes are durable puts of 128-byte values to distinct keys, reads are
//! linearizable gets of existing keys.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{Cluster, TOKEN};
use crate::cpu::{self, Procs, Split};
use crate::etcd::{self, Etcd};
use crate::load::{drive, Sample, Stats};
use crate::report::Row;
use etcd_client::KvClient;

pub const CLIENTS: [usize; 4] = [1, 16, 64, 256];
const READ_KEYS: u64 = 1000;

pub struct Outcome {
    pub rows: Vec<Row>,
    /// (clients, flotilla writes/s, etcd writes/s) for the chart.
    pub chart: Vec<(usize, f64, f64)>,
}

pub async fn run(quick: bool, clients: &[usize]) -> Outcome {
    let etcd_version = etcd::require();
    let duration = Duration::from_secs(if quick { 1 } else { 5 });
    let slices: u32 = if quick { 1 } else { 5 };
    let slice_len = duration / slices;
    let cluster = Cluster::bootstrap(3, &[]).await;
    let etcd = Etcd::start(3).await;
    let (leader, etcd_leader) = (cluster.wait_for_leader().await, etcd.wait_for_leader().await);
    let flotilla = Arc::new(flotilla_api::Client::new(&cluster.url(leader), Some(TOKEN.into())));
    let etcd_kv = etcd::connect(&etcd.endpoint(etcd_leader)).await.expect("connect to etcd").kv_client();
    let procs = (Procs::flotilla(&cluster, leader), etcd.procs(etcd_leader));
    let value = Arc::new("x".repeat(128));
    println!("== coordination writes and linearizable reads: flotilla (3 nodes) vs {etcd_version} (3 members), {} s per point", duration.as_secs());

    for k in 0..READ_KEYS {
        flotilla.kv_put(&format!("read/{k}"), &value, None).await.expect("flotilla put");
        etcd_kv.clone().put(format!("read/{k}"), value.as_bytes(), None).await.expect("etcd put");
    }

    let mut rows = Vec::new();
    let mut chart = Vec::new();
    for &n in clients {
        let ((fw, fcpu), (ew, ecpu)) = take_turns(
            slices,
            (|s| flotilla_writes(&flotilla, &value, n, s, slice_len, Puts::Together), &procs.0),
            (|s| etcd_writes(&etcd_kv, &value, n, s, slice_len), &procs.1),
        )
        .await;
        if let Some(dir) = std::env::var_os("FLOTILLA_BENCH_TRACE") {
            for (side, sample) in [("flotilla", &fw), ("etcd", &ew)] {
                let path = std::path::Path::new(&dir).join(format!("{side}-{n}.txt"));
                sample.write_trace(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
        let (f, e) = (fw.stats(), ew.stats());
        print_point("write", n, &f, &e);
        print_cpu(n, (&f, &fcpu), (&e, &ecpu));
        chart.push((n, f.ops_per_s, e.ops_per_s));
        push_rows(&mut rows, "write", n, &f, &e);
        push_cpu_rows(&mut rows, n, (&f, &fcpu), (&e, &ecpu));
        if n == 64 {
            // The same point with a request per put (the client before it sent queued
            // puts together), beside etcd again.
            let ((fw, fcpu), (ew, ecpu)) = take_turns(
                slices,
                (|s| flotilla_writes(&flotilla, &value, n, s + slices, slice_len, Puts::Alone), &procs.0),
                (|s| etcd_writes(&etcd_kv, &value, n, s + slices, slice_len), &procs.1),
            )
            .await;
            let (f, e) = (fw.stats(), ew.stats());
            print_point("alone", n, &f, &e);
            print_cpu(n, (&f, &fcpu), (&e, &ecpu));
            let name = |what: &str| format!("kv_write_{what}_{n}_clients_one_request_each");
            rows.push(Row::new(name("throughput"), "writes/s", f.ops_per_s, "etcd", e.ops_per_s, true));
            rows.push(Row::new(name("p99"), "ms", f.p99_ms, "etcd", e.p99_ms, false));
        }
        // scripts/flamegraph.sh profiles the write load alone.
        if std::env::var_os("FLOTILLA_BENCH_KV_WRITES_ONLY").is_some() {
            continue;
        }
        let ((fr, _), (er, _)) = take_turns(
            slices,
            (|_| flotilla_reads(&flotilla, n, slice_len), &procs.0),
            (|_| etcd_reads(&etcd_kv, n, slice_len), &procs.1),
        )
        .await;
        let (f, e) = (fr.stats(), er.stats());
        print_point("read", n, &f, &e);
        push_rows(&mut rows, "read", n, &f, &e);
    }
    Outcome { rows, chart }
}

/// The two systems take turns in short slices (and take turns going first), so that a slow
/// spell of the machine hits both alike; each side's slices add up to its sample, and
/// the CPU its processes (and this one, the client) spent during them to its split.
async fn take_turns<F, E, FF, EF>(
    slices: u32,
    f: (F, &Procs),
    e: (E, &Procs),
) -> ((Sample, Split), (Sample, Split))
where
    F: Fn(u32) -> FF,
    E: Fn(u32) -> EF,
    FF: std::future::Future<Output = Sample>,
    EF: std::future::Future<Output = Sample>,
{
    let (mut fs, mut es) = ((Sample::default(), Split::default()), (Sample::default(), Split::default()));
    for slice in 0..slices {
        let mut turn = [0, 1];
        if slice % 2 == 1 {
            turn.reverse();
        }
        for side in turn {
            if side == 0 {
                fs.0.add(f.1.measure(&mut fs.1, f.0(slice)).await);
            } else {
                es.0.add(e.1.measure(&mut es.1, e.0(slice)).await);
            }
        }
    }
    (fs, es)
}

/// How the load's puts travel: as the client sends them (those that queue together), or
/// each in a request of its own.
#[derive(Clone, Copy)]
enum Puts {
    Together,
    Alone,
}

/// Durable puts of distinct keys through flotilla's HTTP API client.
async fn flotilla_writes(
    c: &Arc<flotilla_api::Client>,
    v: &Arc<String>,
    n: usize,
    slice: u32,
    d: Duration,
    puts: Puts,
) -> Sample {
    let (c, v) = (c.clone(), v.clone());
    drive(n, d, move |w, i| {
        let (c, v) = (c.clone(), v.clone());
        async move {
            let key = format!("bench/{n}/{slice}/{w}/{i}");
            match puts {
                Puts::Together => c.kv_put(&key, &v, None).await,
                Puts::Alone => c.kv_put_alone(&key, &v, None).await,
            }
            .map(|_| ())
        }
    })
    .await
}

/// The same puts through etcd's gRPC client.
async fn etcd_writes(kv: &KvClient, v: &Arc<String>, n: usize, slice: u32, d: Duration) -> Sample {
    let (kv, v) = (kv.clone(), v.clone());
    drive(n, d, move |w, i| {
        let (mut kv, v) = (kv.clone(), v.clone());
        async move { kv.put(format!("bench/{n}/{slice}/{w}/{i}"), v.as_bytes(), None).await.map(|_| ()) }
    })
    .await
}

/// Linearizable gets of existing keys.
async fn flotilla_reads(c: &Arc<flotilla_api::Client>, n: usize, d: Duration) -> Sample {
    let c = c.clone();
    drive(n, d, move |w, i| {
        let c = c.clone();
        async move { c.kv_get(&read_key(w, i), false).await.map(|_| ()) }
    })
    .await
}

/// The same gets from etcd (linearizable is its default).
async fn etcd_reads(kv: &KvClient, n: usize, d: Duration) -> Sample {
    let kv = kv.clone();
    drive(n, d, move |w, i| {
        let mut kv = kv.clone();
        async move {
            let resp = kv.get(read_key(w, i), None).await?;
            assert_eq!(resp.kvs().len(), 1, "etcd lost a key");
            Ok::<_, etcd_client::Error>(())
        }
    })
    .await
}

fn read_key(client: usize, i: u64) -> String {
    format!("read/{}", (client as u64 * 7919 + i) % READ_KEYS)
}

fn print_point(what: &str, n: usize, f: &Stats, e: &Stats) {
    println!(
        "{what:>5} {n:>4} clients: flotilla {:>8.0}/s p50 {:>6.2} ms p99 {:>7.2} ms | etcd {:>8.0}/s p50 {:>6.2} ms p99 {:>7.2} ms",
        f.ops_per_s, f.p50_ms, f.p99_ms, e.ops_per_s, e.p50_ms, e.p99_ms
    );
}

/// Where each system's CPU went per write, and how busy the machine's cores were.
fn print_cpu(n: usize, f: (&Stats, &Split), e: (&Stats, &Split)) {
    let busy = |(s, c): (&Stats, &Split)| (c.servers() + c.client) / s.secs / cpu::cores() * 100.0;
    println!("  cpu  {n:>4} clients: flotilla {} (cores {:>3.0}% busy)", f.1.line(f.0.ops), busy(f));
    println!("  cpu  {n:>4} clients: etcd     {} (cores {:>3.0}% busy)", e.1.line(e.0.ops), busy(e));
}

/// CPU per write on the servers (all three, and the leader alone), each against etcd's.
fn push_cpu_rows(rows: &mut Vec<Row>, n: usize, f: (&Stats, &Split), e: (&Stats, &Split)) {
    let us = |s: f64, stats: &Stats| Split::per_op_us(s, stats.ops);
    rows.push(Row::new(
        format!("kv_write_cpu_us_{n}_clients"),
        "µs CPU",
        us(f.1.servers(), f.0),
        "etcd",
        us(e.1.servers(), e.0),
        false,
    ));
    rows.push(Row::new(
        format!("kv_write_leader_cpu_us_{n}_clients"),
        "µs CPU",
        us(f.1.leader, f.0),
        "etcd",
        us(e.1.leader, e.0),
        false,
    ));
}

fn push_rows(rows: &mut Vec<Row>, what: &str, n: usize, f: &Stats, e: &Stats) {
    let unit = if what == "write" { "writes/s" } else { "reads/s" };
    rows.push(Row::new(
        format!("kv_{what}_throughput_{n}_clients"),
        unit,
        f.ops_per_s,
        "etcd",
        e.ops_per_s,
        true,
    ));
    rows.push(Row::new(format!("kv_{what}_p50_{n}_clients"), "ms", f.p50_ms, "etcd", e.p50_ms, false));
    rows.push(Row::new(format!("kv_{what}_p99_{n}_clients"), "ms", f.p99_ms, "etcd", e.p99_ms, false));
}

/// The cost of TLS: 64 clients writing to a three-node cluster over HTTPS with mTLS
/// between the nodes, against the same load on a plain-HTTP cluster, taking turns. The
/// baseline is flotilla itself: the ratio is what TLS costs (no target).
pub async fn tls(quick: bool) -> Vec<Row> {
    const N: usize = 64;
    let duration = Duration::from_secs(if quick { 1 } else { 5 });
    let slices: u32 = if quick { 1 } else { 5 };
    let pki_dir = tempfile::tempdir().expect("temp dir");
    let pki = crate::common::make_pki(pki_dir.path());
    let plain = Cluster::bootstrap(3, &[]).await;
    let secure = Cluster::bootstrap_tls(3, &[], pki).await;
    let client = |c: &Cluster, id: u64| Arc::new(flotilla_api::Client::new(&c.url(id), Some(TOKEN.into())));
    let (pl, tl) = (plain.wait_for_leader().await, secure.wait_for_leader().await);
    let (p, t) = (client(&plain, pl), client(&secure, tl));
    let procs = (Procs::flotilla(&secure, tl), Procs::flotilla(&plain, pl));
    let value = Arc::new("x".repeat(128));
    println!("== the cost of TLS: {N} clients writing, HTTPS + mTLS vs plain HTTP (both flotilla, 3 nodes)");
    let ((ts, tcpu), (ps, pcpu)) = take_turns(
        slices,
        (|s| flotilla_writes(&t, &value, N, s, duration / slices, Puts::Together), &procs.0),
        (|s| flotilla_writes(&p, &value, N, s, duration / slices, Puts::Together), &procs.1),
    )
    .await;
    let (ts, ps) = (ts.stats(), ps.stats());
    println!("  cpu  {N:>4} clients: tls   {}", tcpu.line(ts.ops));
    println!("  cpu  {N:>4} clients: plain {}", pcpu.line(ps.ops));
    println!(
        "tls   {N} clients: {:>8.0}/s p50 {:>6.2} ms p99 {:>7.2} ms | plain {:>8.0}/s p50 {:>6.2} ms p99 {:>7.2} ms",
        ts.ops_per_s, ts.p50_ms, ts.p99_ms, ps.ops_per_s, ps.p50_ms, ps.p99_ms
    );
    vec![
        Row::new(
            format!("kv_write_throughput_{N}_clients_tls"),
            "writes/s",
            ts.ops_per_s,
            "flotilla plain HTTP",
            ps.ops_per_s,
            true,
        ),
        Row::new(
            format!("kv_write_p99_{N}_clients_tls"),
            "ms",
            ts.p99_ms,
            "flotilla plain HTTP",
            ps.p99_ms,
            false,
        ),
    ]
}
