//! The fault harness: three `flotilla server` nodes, each in its own network namespace,
//! under a nemesis (partitions, pauses, kills, a bad link) while clients outside the
//! namespaces run a key/value workload and a run workload; then a heal, a quiet period
//! and the checks: the key/value history is linearizable (porcupine-rs, per key), no
//! acknowledged run is lost, every run ends, no task is started twice, no request hangs.
//!
//! `cargo test --test faults -- --quick` (the default: fixed seed, under 5 minutes; what
//! scripts/test.sh runs) or `-- --long [--duration-s 1800] [--seed N]`; see
//! docs/faults.md. Needs root, `ip`, `iptables`, `tc`. Exit status 0 only on a pass.

mod kv;
mod net;
mod nodes;
mod runs;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use kv::{Outcome, Record};
use net::Net;
use nodes::Nodes;

#[path = "../common/rng.rs"]
mod rng;
pub use rng::Rng;

const NODES: [u64; 3] = [1, 2, 3];
const KEYS: usize = 3;
const KV_CLIENTS: u32 = 6;
const EXECUTORS: usize = 3;
/// Seed of `--quick`, so that a CI failure replays with the same schedule.
const QUICK_SEED: u64 = 19;

struct Opts {
    long: bool,
    seed: u64,
    duration: Duration,
    fault_hold: Duration,
    heal_gap: Duration,
    quiet: Duration,
    out: PathBuf,
}

fn parse_args() -> Result<Opts, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut long = false;
    let mut seed = None;
    let mut duration_s = None;
    let mut out = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => long = false,
            "--long" => long = true,
            "--seed" => seed = Some(it.next().and_then(|s| s.parse().ok()).ok_or("--seed needs a number")?),
            "--duration-s" => {
                duration_s =
                    Some(it.next().and_then(|s| s.parse().ok()).ok_or("--duration-s needs a number")?)
            }
            "--out" => out = Some(PathBuf::from(it.next().ok_or("--out needs a directory")?)),
            // What cargo test passes to every test binary.
            "--test-threads" | "--format" | "--color" => {
                it.next();
            }
            s if s.starts_with("--test-threads=") || s == "--nocapture" || s == "--exact" => {}
            s if !s.starts_with('-') => {} // a test name filter: the harness is one test
            other => {
                return Err(format!(
                "unknown argument {other:?} (expected --quick, --long, --seed N, --duration-s N, --out DIR)"
            ))
            }
        }
    }
    let seed = seed.unwrap_or_else(|| {
        if long {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        } else {
            QUICK_SEED
        }
    });
    let out = out.unwrap_or_else(|| {
        let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        PathBuf::from(target).join("faults").join(format!("seed-{seed}"))
    });
    Ok(Opts {
        long,
        seed,
        duration: Duration::from_secs(duration_s.unwrap_or(if long { 1800 } else { 0 })),
        fault_hold: Duration::from_secs(if long { 8 } else { 5 }),
        heal_gap: Duration::from_secs(if long { 6 } else { 4 }),
        quiet: Duration::from_secs(8),
        out,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum FaultKind {
    IsolateLeader,
    RandomSplit,
    IsolateFollower,
    Pause,
    KillRestart,
    Netem,
}

const ALL_FAULTS: [FaultKind; 6] = [
    FaultKind::IsolateLeader,
    FaultKind::RandomSplit,
    FaultKind::IsolateFollower,
    FaultKind::Pause,
    FaultKind::KillRestart,
    FaultKind::Netem,
];

#[derive(Clone, Debug, Serialize)]
struct Fault {
    kind: FaultKind,
    /// The node cut off, paused, killed or slowed.
    target: u64,
    /// The leader when the fault began.
    leader_before: Option<u64>,
    start_s: f64,
    heal_s: f64,
    /// Fault start to a new leader agreed by a majority (leader faults only).
    failover_ms: Option<u64>,
    /// Fault start to the first acknowledged write invoked after it.
    first_write_after_fault_ms: Option<u64>,
    /// Heal to the first acknowledged write invoked after it.
    first_write_after_heal_ms: Option<u64>,
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let code = rt.block_on(async {
        // Ctrl-C: stop the nodes and remove the network before leaving.
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: cleaning up");
                net::cleanup_stale();
                std::process::exit(130);
            }
        });
        match run(&opts).await {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

async fn run(o: &Opts) -> Result<bool, String> {
    let mode = if o.long { "long" } else { "quick" };
    println!(
        "faults: mode {mode}, seed {} (replay: cargo test --test faults -- --{mode} --seed {})",
        o.seed, o.seed
    );
    // The harness's own checks must be able to fail: each refuses a known-bad history first.
    runs::check_the_checks()?;
    let _ = std::fs::remove_dir_all(&o.out);
    std::fs::create_dir_all(&o.out).map_err(|e| format!("cannot create {}: {e}", o.out.display()))?;
    println!("faults: output in {}", o.out.display());
    // Declared first, dropped last: the nodes stop before the network goes.
    let net = Net::create(&NODES)?;
    let mut nodes = Nodes::new(&o.out, &NODES);
    for id in NODES {
        nodes.start(id);
    }
    nodes.init().await?;
    println!("faults: cluster of {} nodes ready (leader {:?})", NODES.len(), nodes.leader().await);

    let mut rng = Rng::new(o.seed);
    let start = Instant::now();
    let now_s = move || start.elapsed().as_secs_f64();
    let history: kv::History = Arc::new(Mutex::new(Vec::new()));
    let runlog: runs::Shared = Arc::new(Mutex::new(runs::RunLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let keys: Vec<String> = (0..KEYS).map(|k| format!("faults/k{k}")).collect();
    let mut workers = Vec::new();
    for c in 0..KV_CLIENTS {
        let node = NODES[c as usize % NODES.len()];
        workers.push(tokio::spawn(kv::client(
            c,
            node,
            keys.clone(),
            rng.next(),
            start,
            history.clone(),
            stop.clone(),
        )));
    }
    // The executors keep working after the load stops, until the final check has seen
    // every acknowledged run end (a run needs them to finish).
    let executors_stop = Arc::new(AtomicBool::new(false));
    let mut executors = Vec::new();
    for e in 0..EXECUTORS {
        executors.push(tokio::spawn(runs::executor(
            format!("flt-exec-{e}"),
            NODES.to_vec(),
            e,
            runlog.clone(),
            executors_stop.clone(),
        )));
    }
    workers.push(tokio::spawn(runs::submitter(
        NODES.to_vec(),
        rng.next(),
        300,
        runlog.clone(),
        stop.clone(),
    )));

    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut faults: Vec<Fault> = Vec::new();
    let mut order: Vec<FaultKind> = ALL_FAULTS.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut next = 0;
    loop {
        let kind = if next < order.len() {
            order[next]
        } else if o.long && start.elapsed() < o.duration {
            ALL_FAULTS[rng.below(ALL_FAULTS.len() as u64) as usize]
        } else {
            break;
        };
        next += 1;
        let leader = nodes.leader().await;
        let random = NODES[rng.below(NODES.len() as u64) as usize];
        let target = match kind {
            FaultKind::IsolateLeader => leader.unwrap_or(random),
            FaultKind::IsolateFollower => {
                let followers: Vec<u64> = NODES.iter().copied().filter(|n| Some(*n) != leader).collect();
                followers[rng.below(followers.len() as u64) as usize]
            }
            _ => random,
        };
        let fault_start = now_s();
        println!("faults: [{fault_start:>7.1}s] {kind:?} on node {target} (leader {leader:?})");
        match kind {
            FaultKind::IsolateLeader | FaultKind::RandomSplit | FaultKind::IsolateFollower => {
                net.split(&[target])?
            }
            FaultKind::Pause => nodes.signal(target, "-STOP"),
            FaultKind::KillRestart => nodes.kill(target),
            FaultKind::Netem => net.netem(target, &["delay", "60ms", "40ms", "loss", "5%"])?,
        }
        // Watch for a new leader while the fault holds.
        let mut failover_ms = None;
        let leader_fault = leader == Some(target)
            && matches!(
                kind,
                FaultKind::IsolateLeader | FaultKind::RandomSplit | FaultKind::Pause | FaultKind::KillRestart
            );
        let hold_until = Instant::now() + o.fault_hold;
        while Instant::now() < hold_until {
            if leader_fault && failover_ms.is_none() {
                if let Some(l) = nodes.leader().await {
                    if Some(l) != leader {
                        failover_ms = Some(((now_s() - fault_start) * 1000.0) as u64);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match kind {
            FaultKind::Pause => nodes.signal(target, "-CONT"),
            FaultKind::KillRestart => nodes.start(target),
            _ => net.heal()?,
        }
        let heal = now_s();
        println!("faults: [{heal:>7.1}s] healed");
        faults.push(Fault {
            kind,
            target,
            leader_before: leader,
            start_s: fault_start,
            heal_s: heal,
            failover_ms,
            first_write_after_fault_ms: None,
            first_write_after_heal_ms: None,
        });
        tokio::time::sleep(o.heal_gap).await;
    }
    net.heal()?;
    println!("faults: [{:>7.1}s] final heal; quiet for {} s", now_s(), o.quiet.as_secs());
    tokio::time::sleep(o.quiet).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_millis(kv::CLIENT_TIMEOUT_MS + 2000), w).await;
    }
    let run_problems = runs::final_check(&NODES, &runlog, Duration::from_secs(60)).await;
    executors_stop.store(true, Ordering::Relaxed);
    for e in executors {
        let _ = tokio::time::timeout(Duration::from_millis(kv::CLIENT_TIMEOUT_MS + 2000), e).await;
    }
    let elapsed = now_s();
    drop(nodes);
    drop(net);

    // Reports.
    let history = history.lock().unwrap().clone();
    for f in &mut faults {
        let first_after = |t: f64| {
            history
                .iter()
                .filter(|r| r.outcome == Outcome::Ok && !matches!(r.op, kv::KvOp::Get { .. }))
                .filter(|r| r.invoke_us as f64 >= t * 1e6)
                .map(|r| ((r.complete_us as f64 / 1e3) - t * 1e3) as u64)
                .min()
        };
        f.first_write_after_fault_ms = first_after(f.start_s);
        f.first_write_after_heal_ms = first_after(f.heal_s);
    }
    let mut lines = String::new();
    for r in &history {
        lines += &serde_json::to_string(r).unwrap();
        lines.push('\n');
    }
    std::fs::write(o.out.join("history.jsonl"), lines).map_err(|e| e.to_string())?;
    std::fs::write(o.out.join("faults.json"), serde_json::to_string_pretty(&faults).unwrap())
        .map_err(|e| e.to_string())?;

    let count = |o: Outcome| history.iter().filter(|r| r.outcome == o).count();
    let (ok, fail, unknown) = (count(Outcome::Ok), count(Outcome::Fail), count(Outcome::Unknown));
    // A request with no answer within the client timeout hung, unless its node was
    // paused or killed meanwhile, or its link was the slowed one (then nobody answers).
    let disrupted = |r: &Record| {
        faults.iter().any(|f| {
            f.target == r.node
                && matches!(f.kind, FaultKind::Pause | FaultKind::KillRestart | FaultKind::Netem)
                && (r.invoke_us as f64) < (f.heal_s + 3.0) * 1e6
                && (r.complete_us as f64) > f.start_s * 1e6
        })
    };
    let hung: Vec<&Record> = history
        .iter()
        .filter(|r| r.detail.as_deref().is_some_and(|d| d.contains("(timeout)")) && !disrupted(r))
        .collect();
    let slowest_answer_ms = history
        .iter()
        .filter(|r| !disrupted(r))
        .map(|r| (r.complete_us - r.invoke_us) / 1000)
        .max()
        .unwrap_or(0);

    println!("faults: checking {} operations on {} keys", history.len(), KEYS);
    let verdicts = kv::check(&history, Duration::from_secs(120), &o.out);
    let mut pass = true;
    for v in &verdicts {
        println!("faults: key {}: {} operations checked: {:?}", v.key, v.ops, v.result);
        if let Some(e) = &v.explanation {
            println!("{e}");
        }
        if v.result != porcupine_rs::CheckResult::Ok {
            pass = false;
        }
    }
    for f in &faults {
        println!(
            "faults: {:<16} node {} (leader {:?}): new leader after {} ms, first write after the fault {} ms, after the heal {} ms",
            format!("{:?}", f.kind),
            f.target,
            f.leader_before,
            f.failover_ms.map_or("-".into(), |v| v.to_string()),
            f.first_write_after_fault_ms.map_or("-".into(), |v| v.to_string()),
            f.first_write_after_heal_ms.map_or("-".into(), |v| v.to_string()),
        );
    }
    for h in hung.iter().take(10) {
        println!("faults: hung request: {}", serde_json::to_string(h).unwrap());
    }
    for p in &run_problems {
        println!("faults: run workload: {p}");
    }
    let rl = runlog.lock().unwrap();
    if !hung.is_empty() || !run_problems.is_empty() {
        pass = false;
    }
    if ok < 100 || rl.acked.is_empty() {
        println!(
            "faults: too little work got through to judge anything ({ok} kv operations, {} runs)",
            rl.acked.len()
        );
        pass = false;
    }
    let summary = format!(
        "faults: {} seed={} elapsed={:.0}s faults={} kv_ops={} ok={} fail={} unknown={} hung={} slowest_answer_ms={} runs_acked={} runs_unknown={} runs_failed={} tasks_started={} deciding_terms={} verdict={}",
        mode,
        o.seed,
        elapsed,
        faults.len(),
        history.len(),
        ok,
        fail,
        unknown,
        hung.len(),
        slowest_answer_ms,
        rl.acked.len(),
        rl.unknown,
        rl.failed,
        rl.started.len(),
        rl.decided_by.values().flatten().map(|d| d.term).collect::<std::collections::BTreeSet<_>>().len(),
        if pass { "PASS" } else { "FAIL" }
    );
    println!("{summary}");
    std::fs::write(o.out.join("summary.txt"), format!("{summary}\n")).map_err(|e| e.to_string())?;
    if pass {
        // The data dirs only matter for a post-mortem.
        for id in NODES {
            let _ = std::fs::remove_dir_all(o.out.join(format!("node{id}")));
        }
    } else {
        println!("faults: history, logs and data dirs kept in {}", o.out.display());
    }
    Ok(pass)
}
