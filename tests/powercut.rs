//! Power cuts (docs/durability.md). Every node's data dir is a mount of `flotilla-lazyfs`
//! (the `lazyfs/` crate): a FUSE layer that keeps every byte not yet covered by an fsync
//! in memory and drops it on a cut, as a disk loses its cache when the power goes. A
//! kill -9 alone loses nothing the page cache holds; a cut loses all of it.
//!
//! Under a steady load of KV puts (some big) and run creations through every node, the
//! test cuts the leader, a follower, all three nodes at once and then random sets of
//! nodes, at random moments: kill -9, drop the unsynced data, restart on the same files.
//! Afterwards every acknowledged write must be there, every node must have started (no
//! "cannot reopen"), and the nodes' state machines must agree.
//!
//! `FLOTILLA_POWERCUT_CUTS` (default 4) sets the number of cuts, `FLOTILLA_POWERCUT_SEED`
//! the seed (printed, so a failure replays); docs/durability.md has the long run.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use flotilla_api::types::RunCreate;
use flotilla_api::Client;

/// The lazy filesystem binary, built beside this test (`cargo test --workspace` and
/// `cargo build --workspace` build it).
fn lazyfs_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("flotilla-lazyfs");
    assert!(bin.exists(), "{} is missing: build it with `cargo build -p flotilla-lazyfs`", bin.display());
    bin
}

/// One mount of the lazy filesystem; unmounted on drop.
struct LazyFs {
    child: Child,
    mount: PathBuf,
    control: PathBuf,
}

impl LazyFs {
    fn mount(backing: &Path, mount: &Path, control: &Path) -> LazyFs {
        assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing: the power-cut test needs FUSE");
        std::fs::create_dir_all(backing).unwrap();
        std::fs::create_dir_all(mount).unwrap();
        let mut child = Command::new(lazyfs_bin())
            .arg("--backing")
            .arg(backing)
            .arg("--mount")
            .arg(mount)
            .arg("--control")
            .arg(control)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start flotilla-lazyfs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "flotilla-lazyfs did not mount {}", mount.display());
        LazyFs { child, mount: mount.to_path_buf(), control: control.to_path_buf() }
    }

    /// Drops every unsynced change; returns how many files or entries lost something.
    fn cut(&self) -> u64 {
        let mut s = std::os::unix::net::UnixStream::connect(&self.control).unwrap();
        s.write_all(b"cut\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        let n = line.trim().strip_prefix("ok").unwrap_or_else(|| panic!("cut answered {line:?}"));
        n.trim().parse().unwrap_or(0)
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ =
            Command::new("fusermount3").arg("-u").arg("-z").arg(&self.mount).stderr(Stdio::null()).status();
    }
}

#[derive(Default)]
struct Acked {
    kv: BTreeMap<String, String>,
    runs: Vec<String>,
}

fn value_for(key: &str, big: bool) -> String {
    // Some values near the 64 KiB limit: a batch of them makes entries of several hundred KB.
    let pad = if big { 60_000 } else { 100 };
    format!("{key}:{}", "v".repeat(pad))
}

fn tiny_run(n: u64) -> RunCreate {
    serde_json::from_value(serde_json::json!({
        "name": format!("powercut-{n}"),
        "group": "/powercut",
        "tasks": [{"name": "a", "image": "flotilla-busybox:latest", "steps": [{"run": {"command": "true"}}]}]
    }))
    .unwrap()
}

/// Writers through random nodes until `stop`; only acknowledged writes are recorded.
async fn load(urls: Vec<String>, writer: usize, seed: u64, acked: Arc<Mutex<Acked>>, stop: Arc<AtomicBool>) {
    let clients: Vec<Client> = urls.iter().map(|u| Client::new(u, Some(TOKEN.into()))).collect();
    let mut rng = Rng::new(seed);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let c = &clients[rng.below(clients.len() as u64) as usize];
        if writer == 0 && seq.is_multiple_of(5) {
            if let Ok(Ok(run)) =
                tokio::time::timeout(Duration::from_secs(5), c.run_create(&tiny_run(seq))).await
            {
                acked.lock().unwrap().runs.push(run.id);
            }
            continue;
        }
        let key = format!("pc/{writer}/{seq:06}");
        let value = value_for(&key, rng.below(8) == 0);
        match tokio::time::timeout(Duration::from_secs(5), c.kv_put(&key, &value, None)).await {
            Ok(Ok(_)) => {
                acked.lock().unwrap().kv.insert(key, value);
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Every key the load wrote, as `c`'s node sees it (`stale`: its own applied view).
async fn all_keys(c: &Client, stale: bool) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = c.retrying(|c| {
            let after = after.clone();
            async move { c.kv_list("pc/", after.as_deref(), 1000, stale).await }
        });
        let page = page.await.expect("list keys");
        let full = page.items.len() == 1000;
        let last = page.items.last().map(|i| i.key.clone());
        out.extend(page.items.into_iter().map(|i| (i.key, i.value)));
        match last {
            Some(k) if full => after = Some(k),
            _ => return out,
        }
    }
}

/// kill -9, drop the unsynced data, restart: the nodes in `victims` at the same moment.
async fn power_cut(c: &mut Cluster, disks: &BTreeMap<u64, LazyFs>, victims: &[u64]) -> u64 {
    for v in victims {
        c.kill(*v);
    }
    let dropped: u64 = victims.iter().map(|v| disks[v].cut()).sum();
    for v in victims {
        c.start(*v);
    }
    for v in victims {
        c.wait_healthy(*v).await;
    }
    dropped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cuts_of_one_a_follower_and_every_node_lose_no_acknowledged_write() {
    let cuts: usize = std::env::var("FLOTILLA_POWERCUT_CUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let seed: u64 = std::env::var("FLOTILLA_POWERCUT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| Rng::from_time().next() % 1_000_000);
    eprintln!("power cuts: {cuts} cuts, seed {seed} (FLOTILLA_POWERCUT_SEED={seed} replays)");
    let mut rng = Rng::new(seed);

    // Small snapshot intervals: cuts also land during snapshots and log purges.
    let mut c = Cluster::new(&["--snapshot-logs", "300", "--max-logs-keep", "100"]);
    let mut disks = BTreeMap::new();
    for id in 1..=3u64 {
        let root = c.dir.path().to_path_buf();
        let fs = LazyFs::mount(
            &root.join(format!("disk{id}")),
            &root.join(format!("node{id}")),
            &root.join(format!("lazyfs{id}.sock")),
        );
        disks.insert(id, fs);
        c.add_process(id);
    }
    for id in 1..=3 {
        c.wait_healthy(id).await;
    }
    let nodes: Vec<(u64, String)> = (1..=3).map(|id| (id, c.url(id))).collect();
    c.client(1).cluster_init(&nodes).await.expect("cluster init");
    c.wait_for_leader().await;

    let acked = Arc::new(Mutex::new(Acked::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let urls: Vec<String> = (1..=3).map(|id| c.url(id)).collect();
    let writers: Vec<_> = (0..6)
        .map(|w| tokio::spawn(load(urls.clone(), w, seed + w as u64, acked.clone(), stop.clone())))
        .collect();

    let mut dropped_total = 0;
    for n in 0..cuts {
        tokio::time::sleep(Duration::from_millis(1500 + rng.below(2500))).await;
        let leader = c.wait_for_leader().await;
        let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
        let victims: Vec<u64> = match n {
            0 => vec![leader],
            1 => vec![followers[rng.below(2) as usize]],
            2 => vec![1, 2, 3],
            _ => match rng.below(3) {
                0 => vec![1 + rng.below(3)],
                1 => vec![1, 2, 3],
                _ => vec![leader],
            },
        };
        let before = acked.lock().unwrap().kv.len();
        let dropped = power_cut(&mut c, &disks, &victims).await;
        dropped_total += dropped;
        eprintln!("cut {n}: nodes {victims:?} (leader was {leader}), {dropped} unsynced files or entries dropped, {before} puts acknowledged so far");
        c.wait_for_leader().await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.kv.len() > 100, "too little load to mean anything: {} puts", acked.kv.len());
    assert!(dropped_total > 0, "no cut dropped anything: is the lazy filesystem under the nodes?");

    // Every acknowledged write survived, read linearizably through the leader.
    let leader = c.wait_for_leader().await;
    let found = all_keys(&c.client(leader), false).await;
    let lost: Vec<&String> =
        acked.kv.iter().filter(|(k, v)| found.get(*k) != Some(*v)).map(|(k, _)| k).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged puts lost after power cuts, e.g. {:?}",
        lost.len(),
        acked.kv.len(),
        &lost[..lost.len().min(5)]
    );
    for id in &acked.runs {
        let got = c.client(leader).retrying(|cl| async move { cl.run_get(id).await }).await;
        assert!(got.is_ok(), "acknowledged run {id} lost: {got:?}");
    }

    // The state machines agree: every node's own view, once caught up, is the leader's.
    c.wait_caught_up().await;
    for id in 1..=3 {
        let local = all_keys(&c.client(id), true).await;
        assert!(local == found, "node {id} disagrees: {} keys vs the leader's {}", local.len(), found.len());
    }
    eprintln!(
        "power cuts: PASS — {cuts} cuts, {} puts and {} runs acknowledged, none lost, {} keys on every node",
        acked.kv.len(),
        acked.runs.len(),
        found.len()
    );
    // Nodes stop before their file systems go.
    for id in 1..=3 {
        c.kill(id);
    }
    drop(disks);
}
