//! Per-task overhead of the Docker executor: a run of one task with one `true` step,
//! from `POST /runs` to the run finished (scheduling, container create/start, one exec,
//! log push and store, status reports, container removal), side by side in the same run
//! with the baseline `docker run --rm IMAGE true` on the same engine.
//!
//! `cargo bench --bench task_overhead [-- --quick]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use flotilla_api::types::RunCreate;

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    (ms(v[v.len() / 2]), mean, ms(v[v.len() - 1]))
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 5 } else { 20 };
    require_docker_image();

    let mut docker = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let ok = Command::new("docker").args(["run", "--rm", IMAGE, "true"]).status().unwrap().success();
        assert!(ok);
        docker.push(t.elapsed());
    }

    let cluster = Cluster::bootstrap(1, &[]).await;
    let _exec = ExecutorProc::start(&cluster, "bench-exec", &[]);
    let c = cluster.client(1);
    let create: RunCreate = serde_json::from_value(serde_json::json!({
        "name": "overhead", "group": "/bench",
        "tasks": [{"name": "t", "image": IMAGE, "steps": [{"run": {"command": "true"}}]}]
    }))
    .unwrap();
    // One warm-up run (executor registration, first connections).
    let mut flotilla = Vec::new();
    for i in 0..=n {
        let t = Instant::now();
        let run = c.run_create(&create).await.unwrap();
        loop {
            let r = c.run_get(&run.id).await.unwrap();
            if r.phase.is_final() {
                assert_eq!(r.result, flotilla_store::run::RunResult::Success);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if i > 0 {
            flotilla.push(t.elapsed());
        }
    }
    let (dp50, dmean, dmax) = stats(docker);
    let (fp50, fmean, fmax) = stats(flotilla);
    println!("one task, one `true` step, {n} runs each, sequential");
    println!("{:<40} {:>9} {:>9} {:>9}", "", "p50 ms", "mean ms", "max ms");
    println!("{:<40} {:>9.0} {:>9.0} {:>9.0}", "docker run --rm (baseline)", dp50, dmean, dmax);
    println!("{:<40} {:>9.0} {:>9.0} {:>9.0}", "flotilla run (create → finished)", fp50, fmean, fmax);
    println!("ratio flotilla / docker run: p50 {:.2}, mean {:.2}", fp50 / dp50, fmean / dmean);
}
