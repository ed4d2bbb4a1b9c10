//! Benchmark 3, per-task overhead of the Docker executor: a run of one task with one `true` step,
//! from `POST /runs` to the run finished (scheduling, container create/start, one exec,
//! log push and store, status reports), side by side in the same run with the baseline
//! `docker run --rm IMAGE true` on the same engine, the two alternating. The executor
//! removes the container after reporting the outcome; the next measurement of either side
//! starts only once it is gone.
//! The cluster has three nodes and one executor.
//!
//! A two-container pod task (the steps' container and one service sharing its network)
//! is measured the same way against its `docker` equivalent: a service container
//! started detached, `docker run --rm --network container:SVC IMAGE true`, then
//! `docker rm -f SVC`.
//!
//! Then the one-container task again with the executor keeping a warm container of the
//! image (`--warm-image`, one ready): the container was started before the task existed,
//! so the task's path has no create or start. Each measurement of either side starts once
//! the used container is removed and its replacement is running.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::report::Row;
use flotilla_api::types::RunCreate;

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    (ms(v[v.len() / 2]), mean, ms(v[v.len() - 1]))
}

/// One warm-up each (executor registration, first connections, page cache), then `n` of
/// each, alternating so that both see the same machine: (docker's, flotilla's).
async fn alternate(
    n: usize,
    docker: impl Fn() -> Duration,
    mut flotilla: impl AsyncFnMut() -> Duration,
) -> (Vec<Duration>, Vec<Duration>) {
    flotilla().await;
    docker();
    let (mut d, mut f) = (Vec::new(), Vec::new());
    for _ in 0..n {
        d.push(docker());
        f.push(flotilla().await);
    }
    (d, f)
}

pub async fn run(quick: bool) -> Vec<Row> {
    let n = if quick { 5 } else { 20 };
    require_docker_image();

    let cluster = Cluster::bootstrap(3, &[]).await;
    let mut exec = ExecutorProc::start(&cluster, "bench-exec", &[]);
    // Ready for the next measurement: the executor has no container but its warm one (if
    // any), running, and known ready (its `made`-th: one at start, one per warm run).
    let log_path = exec.log.clone();
    let settled = |warm: Option<usize>| match warm {
        None => containers_with_label("flotilla.executor", "bench-exec").is_empty(),
        Some(made) => sole_warm_container("bench-exec", &log_path, made).is_some(),
    };
    let warm: std::cell::Cell<Option<usize>> = std::cell::Cell::new(None);
    let c = cluster.client(cluster.wait_for_leader().await);
    let create: RunCreate = serde_json::from_value(serde_json::json!({
        "name": "overhead", "group": "/bench",
        "tasks": [{"name": "t", "image": IMAGE, "steps": [{"run": {"command": "true"}}]}]
    }))
    .unwrap();
    let pod: RunCreate = serde_json::from_value(serde_json::json!({
        "name": "overhead-pod", "group": "/bench",
        "tasks": [{"name": "t", "containers": [
            {"image": IMAGE},
            {"name": "svc", "image": IMAGE, "entrypoint": ["sleep"], "command": ["3600"]}
        ], "steps": [{"run": {"command": "true"}}]}]
    }))
    .unwrap();
    let flotilla_run = |create: &RunCreate| {
        let (c, create, settled, warm) = (&c, create.clone(), &settled, &warm);
        async move {
            let t = Instant::now();
            let run = c.run_create(&create).await.unwrap();
            let elapsed = loop {
                let r = c.run_get(&run.id).await.unwrap();
                if r.phase.is_final() {
                    assert_eq!(r.result, flotilla_store::run::RunResult::Success);
                    break t.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            // The executor removes the container after reporting; wait for that (untimed), so
            // that the next measurement of either side does not share the engine with it.
            if let Some(made) = warm.get() {
                warm.set(Some(made + 1));
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while !settled(warm.get()) {
                assert!(
                    Instant::now() < deadline,
                    "the executor did not remove its container (or, warm, did not replace it)"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            elapsed
        }
    };
    let docker_run = || {
        let t = Instant::now();
        let ok = Command::new("docker").args(["run", "--rm", IMAGE, "true"]).status().unwrap().success();
        assert!(ok, "docker run --rm {IMAGE} true failed");
        t.elapsed()
    };
    let (docker, flotilla) = alternate(n, docker_run, async || flotilla_run(&create).await).await;
    let docker_pod = || {
        let t = Instant::now();
        let svc = "flotilla-bench-pod-svc";
        let docker = |args: &[&str]| {
            let ok = Command::new("docker").args(args).stdout(std::process::Stdio::null()).status().unwrap();
            assert!(ok.success(), "docker {args:?} failed");
        };
        docker(&["run", "-d", "--name", svc, IMAGE, "sleep", "3600"]);
        docker(&["run", "--rm", "--network", &format!("container:{svc}"), IMAGE, "true"]);
        docker(&["rm", "-f", svc]);
        t.elapsed()
    };
    let (docker2, flotilla2) = alternate(n, docker_pod, async || flotilla_run(&pod).await).await;
    // The same executor again, keeping one container of the image warm.
    exec.terminate();
    exec.args = vec!["--warm-image".into(), IMAGE.into()];
    exec.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !settled(Some(1)) {
        assert!(Instant::now() < deadline, "no warm container");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    warm.set(Some(1));
    let (docker3, flotilla3) = alternate(n, docker_run, async || flotilla_run(&create).await).await;
    let (dp50, dmean, dmax) = stats(docker);
    let (fp50, fmean, fmax) = stats(flotilla);
    println!("== per-task overhead: one task, one `true` step, {n} runs each, sequential");
    println!("{:<40} {:>9} {:>9} {:>9}", "", "p50 ms", "mean ms", "max ms");
    println!("{:<40} {:>9.0} {:>9.0} {:>9.0}", "docker run --rm (baseline)", dp50, dmean, dmax);
    println!("{:<40} {:>9.0} {:>9.0} {:>9.0}", "flotilla run (create → finished)", fp50, fmean, fmax);
    let (dp50_2, dmean_2, dmax_2) = stats(docker2);
    let (fp50_2, fmean_2, fmax_2) = stats(flotilla2);
    println!("== per-task overhead of a two-container pod (steps + one service), {n} runs each");
    println!(
        "{:<40} {:>9.0} {:>9.0} {:>9.0}",
        "docker run -d svc; run --network (baseline)", dp50_2, dmean_2, dmax_2
    );
    println!(
        "{:<40} {:>9.0} {:>9.0} {:>9.0}",
        "flotilla pod run (create → finished)", fp50_2, fmean_2, fmax_2
    );
    let (dp50_3, dmean_3, dmax_3) = stats(docker3);
    let (fp50_3, fmean_3, fmax_3) = stats(flotilla3);
    println!("== per-task overhead with a warm container (--warm-image), {n} runs each");
    println!("{:<40} {:>9.0} {:>9.0} {:>9.0}", "docker run --rm (baseline)", dp50_3, dmean_3, dmax_3);
    println!(
        "{:<40} {:>9.0} {:>9.0} {:>9.0}",
        "flotilla run, warm (create → finished)", fp50_3, fmean_3, fmax_3
    );
    vec![
        Row::new("task_overhead_p50", "ms", fp50, "docker run --rm", dp50, false),
        Row::new("task_overhead_mean", "ms", fmean, "docker run --rm", dmean, false),
        Row::new("pod_task_overhead_p50", "ms", fp50_2, "docker run, 2 containers", dp50_2, false),
        Row::new("task_overhead_warm_p50", "ms", fp50_3, "docker run --rm", dp50_3, false),
    ]
}
