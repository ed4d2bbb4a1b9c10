//! Every benchmark of flotilla, each side by side with its baseline in the same run on the
//! same machine, so that the ratio holds on a noisy machine:
//!
//! 1. `kv`: coordination writes and linearizable reads, three flotilla nodes vs three etcd
//!    members, 1/16/64/256 clients;
//! 2. `scheduler`: task transitions/s driven by simulated executors over HTTP;
//! 3. `overhead`: a one-step `true` task end to end vs `docker run --rm IMAGE true`;
//! 4. `failover`: leader SIGKILLs under write load, kill to first accepted write;
//! 5. `growth`: 100,000 runs written and archived, sizes, RSS, write throughput and the
//!    full run index dump (`growth1m`, only when named: the same with 1,000,000 runs);
//! 6. `tls`: 64 clients writing over HTTPS with mTLS vs plain HTTP (the cost of TLS);
//! 7. `executors`: 500/1,000/2,000 simulated executors heartbeating and long-polling, the
//!    leader's CPU and the task fetch latency, each against the smallest scale.
//!
//! `cargo bench --bench cluster -- [--quick] [--only NAME[,NAME]] [--clients N[,N]] [--out DIR]` (or
//! `scripts/bench.sh`, which installs etcd first). Writes `DIR/bench-results.json` and
//! `DIR/bench-throughput.svg`, and `DIR/bench-executors.svg` when `executors` ran (DIR defaults
//! to the current directory, the package root).

#[path = "../../tests/common/mod.rs"]
mod common;
mod cpu;
mod etcd;
mod executors;
mod failover;
mod growth;
mod kv;
mod load;
mod overhead;
mod report;
mod scheduler;
#[path = "../../tests/common/sim_executor.rs"]
mod sim_executor;

use std::path::PathBuf;
use std::time::Instant;

const ALL: [&str; 7] = ["kv", "scheduler", "overhead", "failover", "growth", "tls", "executors"];
/// Run only when named in `--only` (too long for the 20-minute full mode).
const OPTIONAL: [&str; 1] = ["growth1m"];

struct Args {
    quick: bool,
    only: Vec<String>,
    out: PathBuf,
    clients: Vec<usize>,
}

fn parse_args() -> Args {
    let mut args = Args {
        quick: false,
        only: ALL.iter().map(|s| s.to_string()).collect(),
        out: PathBuf::from("."),
        clients: kv::CLIENTS.to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--only" => {
                let list = it.next().unwrap_or_else(|| usage("--only needs a list"));
                args.only = list.split(',').map(str::to_string).collect();
                if let Some(bad) =
                    args.only.iter().find(|n| !ALL.contains(&n.as_str()) && !OPTIONAL.contains(&n.as_str()))
                {
                    usage(&format!("unknown benchmark {bad:?}"));
                }
            }
            "--clients" => {
                let list = it.next().unwrap_or_else(|| usage("--clients needs a list"));
                args.clients = list
                    .split(',')
                    .map(|n| n.parse().unwrap_or_else(|_| usage(&format!("bad client count {n:?}"))))
                    .collect();
            }
            "--out" => {
                args.out = PathBuf::from(it.next().unwrap_or_else(|| usage("--out needs a directory")))
            }
            // cargo bench passes --bench to harness=false targets.
            "--bench" => {}
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    args
}

fn usage(why: &str) -> ! {
    eprintln!("error: {why}\nusage: cargo bench --bench cluster -- [--quick] [--only {}] [--clients N[,N]] [--out DIR]", ALL.iter().chain(&OPTIONAL).copied().collect::<Vec<_>>().join(","));
    std::process::exit(2);
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let started = Instant::now();
    let mode = if args.quick { "quick" } else { "full" };
    println!(
        "flotilla benchmarks ({mode}) on {} cores ({}), {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        report::cpu_model(),
        report::today()
    );
    let mut rows = Vec::new();
    let mut chart = Vec::new();
    let mut executors_chart = Vec::new();
    for name in ALL.iter().chain(&OPTIONAL).filter(|n| args.only.iter().any(|o| o == *n)) {
        let t = Instant::now();
        match *name {
            "kv" => {
                let out = kv::run(args.quick, &args.clients).await;
                rows.extend(out.rows);
                chart = out.chart;
            }
            "scheduler" => rows.extend(scheduler::run(args.quick).await),
            "overhead" => rows.extend(overhead::run(args.quick).await),
            "failover" => rows.extend(failover::run(args.quick).await),
            "growth" => rows.extend(growth::run(args.quick).await),
            "growth1m" => rows.extend(growth::run_1m(args.quick).await),
            "tls" => rows.extend(kv::tls(args.quick).await),
            "executors" => {
                let out = executors::run(args.quick).await;
                rows.extend(out.rows);
                executors_chart = out.chart;
            }
            _ => unreachable!(),
        }
        println!("({name}: {:.0} s)", t.elapsed().as_secs_f64());
    }
    report::print_table(&rows);
    std::fs::create_dir_all(&args.out).expect("create the output directory");
    let json = args.out.join("bench-results.json");
    report::write_json(&json, &rows, mode).expect("write bench-results.json");
    println!("\nwrote {}", json.display());
    if !chart.is_empty() {
        let svg = args.out.join("bench-throughput.svg");
        report::write_chart(&svg, &chart).expect("write the chart");
        println!("wrote {}", svg.display());
    }
    if !executors_chart.is_empty() {
        let svg = args.out.join("bench-executors.svg");
        report::write_executors_chart(&svg, &executors_chart).expect("write the executors chart");
        println!("wrote {}", svg.display());
    }
    println!("total {:.0} s", started.elapsed().as_secs_f64());
}
