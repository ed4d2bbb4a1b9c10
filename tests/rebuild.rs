//! sled can fail to reopen (or reopen empty) after an abrupt stop. A node must then refuse
//! to start with a clear message, and the documented rebuild — remove, wipe, re-add as a
//! learner, promote — must bring it back with every write, caught up by snapshot.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_a_corrupt_store_refuses_to_start_and_is_rebuilt_from_its_peers() {
    let mut c = Cluster::bootstrap(3, &["--snapshot-logs", "50", "--max-logs-keep", "10"]).await;
    let leader = c.wait_for_leader().await;
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    let survivor = leader;
    for i in 0..200 {
        c.client(survivor).kv_put(&format!("data/{i:03}"), &i.to_string(), None).await.unwrap();
    }
    c.wait_applied(victim, c.local_status(survivor).await.commit_index).await;

    // Damage the victim's store while it is down: garbage over sled's data file.
    c.kill(victim);
    let db_file = c.nodes[&victim].data_dir.join("raft").join("db");
    let len = std::fs::metadata(&db_file).unwrap().len().max(4096) as usize;
    let garbage: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(151).wrapping_add(7)).collect();
    std::fs::write(&db_file, garbage).unwrap();

    c.start(victim);
    let status = c.wait_exit(victim, Duration::from_secs(20)).expect("the node must refuse to start");
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(&c.nodes[&victim].log).unwrap();
    assert!(log.contains("cannot open the store"), "unclear failure:\n{log}");
    assert!(log.contains("Rebuilding a node"), "no pointer to the rebuild procedure:\n{log}");

    // The cluster keeps working on two nodes meanwhile.
    c.client(survivor).kv_put("during", "outage", None).await.unwrap();

    // The documented rebuild, through the CLI.
    let id = victim.to_string();
    let (code, _, err) = c.cli(survivor, &["cluster", "remove", &id]);
    assert_eq!(code, 0, "remove: {err}");
    let data_dir = c.nodes[&victim].data_dir.clone();
    std::fs::rename(&data_dir, data_dir.with_extension("broken")).unwrap();
    c.start(victim);
    c.wait_healthy(victim).await;
    let node_arg = format!("{victim}={}", c.url(victim));
    let (code, _, err) = c.cli(survivor, &["cluster", "add-learner", "--node", &node_arg]);
    assert_eq!(code, 0, "add-learner: {err}");
    let (code, out, err) = c.cli(survivor, &["cluster", "promote", &id, "--json"]);
    assert_eq!(code, 0, "promote: {err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let voters = status["nodes"].as_array().unwrap().iter().filter(|n| n["role"] == "voter").count();
    assert_eq!(voters, 3, "{status}");

    let commit = c.client(survivor).cluster(false).await.unwrap().commit_index;
    c.wait_applied(victim, commit).await;
    let local = c.local_status(victim).await;
    assert!(local.snapshot_index.is_some(), "the rebuilt node did not catch up by snapshot: {local:?}");
    let rebuilt = c.client(victim);
    for i in [0, 57, 199] {
        assert_eq!(rebuilt.kv_get(&format!("data/{i:03}"), true).await.unwrap().value, i.to_string());
    }
    assert_eq!(rebuilt.kv_get("during", true).await.unwrap().value, "outage");
    let all = rebuilt.kv_list("data/", None, 1000, true).await.unwrap();
    assert_eq!(all.items.len(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_dir_of_another_node_is_refused() {
    let mut c = Cluster::bootstrap(1, &[]).await;
    c.kill(1);
    // Reuse node 1's data dir under another id.
    let mut other = Cluster::new(&[]);
    other.nodes.insert(
        7,
        NodeProc {
            id: 7,
            port: free_port(),
            data_dir: c.nodes[&1].data_dir.clone(),
            log: c.dir.path().join("n7.log"),
            child: None,
            https: false,
        },
    );
    other.start(7);
    let status = other.wait_exit(7, Duration::from_secs(20)).expect("must refuse");
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(c.dir.path().join("n7.log")).unwrap();
    assert!(log.contains("belongs to node 1, not node 7"), "{log}");
}

/// The Raft log's own files (docs/durability.md): a torn tail, as a power cut leaves it,
/// is truncated and logged; a byte flipped before the end is corruption and refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_torn_log_tail_is_truncated_and_a_corrupt_log_refused() {
    let mut c = Cluster::bootstrap(1, &[]).await;
    for i in 0..50 {
        c.client(1).kv_put(&format!("k/{i:02}"), &i.to_string(), None).await.unwrap();
    }
    c.kill(1);
    let dir = c.nodes[&1].data_dir.join("raft-log");
    let segment = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .max()
        .expect("a segment file");
    let intact = std::fs::read(&segment).unwrap();

    // A half-written record at the end: what a cut during an append leaves.
    let mut torn = intact.clone();
    torn.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 1, 9, 9]);
    std::fs::write(&segment, &torn).unwrap();
    c.start(1);
    c.wait_for_leader().await;
    assert_eq!(c.client(1).kv_get("k/49", false).await.unwrap().value, "49");
    let log = std::fs::read_to_string(&c.nodes[&1].log).unwrap();
    assert!(log.contains("truncating the torn tail of the Raft log"), "not logged:\n{log}");
    c.kill(1);

    // A flipped byte in the first entry, valid records after it: refused, with the way out.
    let mut flipped = std::fs::read(&segment).unwrap();
    flipped[12] ^= 0x40;
    std::fs::write(&segment, &flipped).unwrap();
    c.start(1);
    let status = c.wait_exit(1, Duration::from_secs(20)).expect("the node must refuse to start");
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(&c.nodes[&1].log).unwrap();
    assert!(log.contains("the Raft log is corrupt"), "unclear failure:\n{log}");
    assert!(log.contains("Rebuilding a node"), "no pointer to the rebuild procedure:\n{log}");
}
