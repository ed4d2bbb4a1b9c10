//! Rolling restart: under a steady load of writes that retry across the servers, each of
//! the three servers in turn gets SIGTERM (a leader hands leadership over first), stays
//! down for 2 s and restarts on its data dir. No request fails, no acknowledged write is
//! lost, every node exits 0 on SIGTERM; the longest write gap of each restart is printed
//! (a figure for docs, not an assertion: speed is measured in benches, not tests).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cluster, TOKEN};
use flotilla_api::Client;

/// What the writers saw: acknowledged (key, value) pairs, completion times, failures.
#[derive(Default)]
struct Record {
    acked: Vec<(String, String)>,
    completions: Vec<Instant>,
    failed: Vec<String>,
}

/// Puts `key` through the servers in turn until one acknowledges it, for up to 20 s.
/// A put of a fixed value is safe to retry whatever happened to the first attempt.
async fn put_with_retries(clients: &[Client], start: usize, key: &str, value: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = start;
    loop {
        match clients[i % clients.len()].kv_put(key, value, None).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(format!("{key}: {e}")),
            Err(_) => {
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_under_load_fails_no_request_and_loses_no_write() {
    let mut cluster = Cluster::bootstrap(3, &[]).await;
    let urls: Vec<String> = (1..=3).map(|id| cluster.url(id)).collect();
    let record = Arc::new(Mutex::new(Record::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut writers = Vec::new();
    for w in 0..4usize {
        let clients: Vec<Client> = urls.iter().map(|u| Client::new(u, Some(TOKEN.into()))).collect();
        let (record, stop) = (record.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (key, value) = (format!("rolling/w{w}/{n}"), format!("v{n}"));
                let result = put_with_retries(&clients, w + n as usize, &key, &value).await;
                let mut r = record.lock().unwrap();
                match result {
                    Ok(()) => {
                        r.acked.push((key, value));
                        r.completions.push(Instant::now());
                    }
                    Err(e) => r.failed.push(e),
                }
                n += 1;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut windows = Vec::new();
    for id in 1..=3u64 {
        let was_leader = cluster.wait_for_leader().await == id;
        let began = Instant::now();
        cluster.terminate(id);
        let status = cluster.wait_exit(id, Duration::from_secs(30));
        let status =
            status.unwrap_or_else(|| panic!("node {id} did not exit on SIGTERM\n{}", cluster.log_tail(id)));
        assert!(status.success(), "node {id} exited with {status:?} on SIGTERM\n{}", cluster.log_tail(id));
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.start(id);
        let ready = Client::new(&cluster.url(id), None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while ready.ready().await.is_err() {
            assert!(Instant::now() < deadline, "node {id} not ready after restart\n{}", cluster.log_tail(id));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        windows.push((id, was_leader, began, Instant::now()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }

    // The writers are done: take what they saw (no lock held across the checks below).
    let record = std::mem::take(&mut *record.lock().unwrap());
    assert!(record.failed.is_empty(), "failed requests: {:?}", record.failed);
    assert!(record.acked.len() > 100, "too few writes to mean anything: {}", record.acked.len());
    for (id, was_leader, began, ended) in &windows {
        let mut times: Vec<Instant> =
            record.completions.iter().copied().filter(|t| t >= began && t <= ended).collect();
        times.sort();
        let gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
        let first = times.first().map(|t| *t - *began).unwrap_or_default();
        println!(
            "restart of node {id}{}: longest write gap {} ms ({} writes during the restart, first after {} ms)",
            if *was_leader { " (leader)" } else { "" },
            gap.max(first).as_millis(),
            times.len(),
            first.as_millis()
        );
    }

    // Every acknowledged write is there, read linearizably through each node.
    cluster.wait_caught_up().await;
    for id in 1..=3u64 {
        let c = cluster.client(id);
        for (key, value) in record.acked.iter().step_by(7) {
            let got = c.kv_get(key, false).await.unwrap_or_else(|e| panic!("{key} via node {id}: {e}"));
            assert_eq!(&got.value, value, "{key} via node {id}");
        }
    }
    let c = cluster.client(1);
    for (key, value) in &record.acked {
        assert_eq!(&c.kv_get(key, false).await.unwrap().value, value, "{key}");
    }
}
