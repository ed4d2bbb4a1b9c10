//! Black-box tests of a replicated cluster: real `flotilla server` processes on loopback,
//! real sled files, real TCP, SIGKILL.

mod common;
#[path = "common/metrics.rs"]
mod metrics;
#[path = "common/sim_executor.rs"]
mod sim_executor;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_write_through_a_follower_is_read_from_every_node() {
    let c = Cluster::bootstrap(3, &[]).await;
    let leader = c.wait_for_leader().await;
    let follower = c.running().into_iter().find(|id| *id != leader).unwrap();

    let rev = c.client(follower).kv_put("greeting", "hello", None).await.expect("put via follower");
    for id in 1..=3 {
        let item = c.client(id).kv_get("greeting", false).await.expect("linearizable read");
        assert_eq!((item.value.as_str(), item.revision), ("hello", rev), "node {id}");
    }
    let status = c.client(follower).cluster(false).await.unwrap();
    assert_eq!(status.leader_id, Some(leader));
    assert_eq!(status.nodes.len(), 3);
    assert!(status.nodes.iter().all(|n| n.role == "voter"));
    assert!(status.commit_index >= rev);
}

/// Writers that record every acknowledged write, spread over all nodes.
struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, String>>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(c: &Cluster, count: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let seq = Arc::new(AtomicU64::new(0));
        let urls: Vec<(u64, String)> = c.nodes.keys().map(|id| (*id, c.url(*id))).collect();
        let handles = (0..count)
            .map(|w| {
                let (stop, acked, seq, urls) = (stop.clone(), acked.clone(), seq.clone(), urls.clone());
                tokio::spawn(async move {
                    let clients: Vec<_> = urls
                        .iter()
                        .map(|(id, u)| (*id, flotilla_api::Client::new(u, Some(TOKEN.into()))))
                        .collect();
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        let n = seq.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                        let (via, client) = &clients[i % clients.len()];
                        // The value names the node the write went through: a failure says it.
                        let (key, value) = (format!("w/{n:08}"), format!("v{n} via node {via}"));
                        if client.kv_put(&key, &value, None).await.is_ok() {
                            acked.lock().unwrap().insert(key, value);
                        } else {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        Writers { stop, acked, handles }
    }

    async fn stop(self) -> BTreeMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.await.unwrap();
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Every acknowledged write is readable, linearizably, through every running node.
async fn assert_all_present(c: &Cluster, acked: &BTreeMap<String, String>) {
    assert!(!acked.is_empty(), "no write was acknowledged at all");
    for id in c.running() {
        let mut found = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let page = c.client(id).kv_list("w/", after.as_deref(), 1000, false).await.expect("list");
            for item in &page.items {
                found.insert(item.key.clone(), item.value.clone());
            }
            after = page.items.last().map(|i| i.key.clone());
            if !page.more {
                break;
            }
        }
        for (k, v) in acked {
            if found.get(k) != Some(v) {
                panic!("node {id} lost acknowledged write {k} ({v}): {}", lost_write_facts(c, id, k).await);
            }
        }
    }
}

/// What the nodes say when an acknowledged write is missing on `id`: whether it shows up
/// later (a late read, not a lost write), what each node holds and its view of the log.
async fn lost_write_facts(c: &Cluster, id: u64, key: &str) -> String {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut facts = Vec::new();
    let got = c.client(id).kv_get(key, false).await.map(|i| (i.value, i.revision));
    facts.push(format!("2 s later on node {id} (linearizable read): {got:?}"));
    for n in c.running() {
        let s = c.client(n).cluster(true).await;
        facts.push(format!(
            "node {n}: {:?}",
            s.map(|s| (
                s.leader_id,
                s.term,
                s.last_log_index,
                s.commit_index,
                s.applied_index,
                s.membership_index
            ))
        ));
        let got = c.client(n).kv_get(key, true).await.map(|i| (i.value, i.revision));
        facts.push(format!("node {n} holds (stale read): {got:?}"));
    }
    format!(
        "(leader, term, last log, commit, applied, membership index) per node and reads:\n{}",
        facts.join("\n")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_leader_elects_another_and_loses_no_acknowledged_write() {
    let mut c = Cluster::bootstrap(3, &[]).await;
    let writers = Writers::start(&c, 4);
    tokio::time::sleep(Duration::from_millis(800)).await;

    let old = c.wait_for_leader().await;
    c.kill(old);
    let new = c.wait_for_leader().await;
    assert_ne!(new, old);
    // Writes continue on the new leader.
    let before = writers.acked.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while writers.acked.lock().unwrap().len() < before + 20 {
        assert!(Instant::now() < deadline, "writes did not resume after the leader was killed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.start(old);
    c.wait_healthy(old).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = writers.stop().await;

    // The restarted node catches up.
    c.wait_caught_up().await;
    assert_all_present(&c, &acked).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_random_kills_under_write_load_lose_no_acknowledged_write() {
    let mut c = Cluster::bootstrap(3, &["--snapshot-logs", "200", "--max-logs-keep", "50"]).await;
    let writers = Writers::start(&c, 4);
    let mut rng = Rng::from_time();
    for round in 0..20 {
        let victim = 1 + rng.below(3);
        // Every fourth round a majority dies at once: only what is on disk survives.
        let second = (round % 4 == 3).then(|| 1 + (victim + rng.below(2)) % 3);
        c.kill(victim);
        if let Some(s) = second {
            c.kill(s);
        }
        tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        for id in [Some(victim), second].into_iter().flatten() {
            c.start(id);
            c.wait_healthy(id).await;
        }
        c.wait_for_leader().await;
        // The cluster recovers every time: writes are acknowledged again before the next kill.
        let before = writers.acked.lock().unwrap().len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while writers.acked.lock().unwrap().len() < before + 10 {
            assert!(
                Instant::now() < deadline,
                "round {round}: writes did not resume after killing node {victim}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "round {round}: killed node {victim} {second:?}; {} writes acknowledged",
            writers.acked.lock().unwrap().len()
        );
    }
    let acked = writers.stop().await;
    c.wait_caught_up().await;
    assert_all_present(&c, &acked).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_every_node_at_once_loses_no_acknowledged_write() {
    let mut c = Cluster::bootstrap(3, &[]).await;
    let writers = Writers::start(&c, 4);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for id in 1..=3 {
        c.kill(id);
    }
    let acked = writers.stop().await;
    for id in 1..=3 {
        c.start(id);
    }
    for id in 1..=3 {
        c.wait_healthy(id).await;
    }
    c.wait_caught_up().await;
    assert_all_present(&c, &acked).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_learner_is_added_promoted_and_an_original_voter_removed_while_writing() {
    let mut c = Cluster::bootstrap(3, &[]).await;
    let writers = Writers::start(&c, 2);
    c.add_process(4);
    c.wait_healthy(4).await;

    let status = c.client(2).add_learner(4, &c.url(4)).await.expect("add learner");
    let n4 = status.nodes.iter().find(|n| n.id == 4).expect("node 4 listed");
    assert_eq!(n4.role, "learner");

    let status = c.client(3).set_voters(&[1, 2, 3, 4]).await.expect("promote");
    assert!(status.nodes.iter().all(|n| n.role == "voter"));

    let leader = c.wait_for_leader().await;
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    c.client(4).remove_node(victim).await.expect("remove voter");
    let status = c.client(4).cluster(false).await.unwrap();
    let ids: Vec<u64> = status.nodes.iter().map(|n| n.id).collect();
    assert!(!ids.contains(&victim), "removed node still listed: {ids:?}");
    assert_eq!(ids.len(), 3);
    c.kill(victim);

    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = writers.stop().await;
    // Node 4 holds everything, including what was written before it joined.
    let item = c.client(4).kv_get(acked.keys().next().unwrap(), true).await.expect("stale read on node 4");
    assert_eq!(&item.value, acked.values().next().unwrap());
    assert_all_present(&c, &acked).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_behind_the_purged_log_catches_up_by_snapshot() {
    let mut c = Cluster::bootstrap(3, &["--snapshot-logs", "50", "--max-logs-keep", "0"]).await;
    let leader = c.wait_for_leader().await;
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    c.client(leader).kv_put("early", "1", None).await.unwrap();
    c.kill(lagging);
    let client = c.client(leader);
    for i in 0..300 {
        client.kv_put(&format!("bulk/{i:04}"), &i.to_string(), None).await.unwrap();
    }
    let status = client.cluster(false).await.unwrap();
    let purged = status.purged_index.expect("the leader purged its log after a snapshot");
    assert!(purged > 100, "purged only up to {purged}");

    c.start(lagging);
    c.wait_applied(lagging, status.commit_index).await;
    let local = c.local_status(lagging).await;
    assert!(local.snapshot_index.is_some_and(|s| s > 100), "no snapshot installed: {local:?}");
    let last = c.client(lagging).kv_get("bulk/0299", true).await.unwrap();
    assert_eq!(last.value, "299");
    assert_eq!(c.client(lagging).kv_get("early", true).await.unwrap().value, "1");
    // The log stays bounded: after compaction only entries since the snapshot are kept.
    let metrics = reqwest::get(format!("{}/metrics", c.url(leader))).await.unwrap().text().await.unwrap();
    let entries: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("flotilla_raft_log_entries "))
        .and_then(|v| v.parse().ok())
        .expect("log entries metric");
    assert!(entries < 120, "log holds {entries} entries after snapshots");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_compare_and_swap_has_exactly_one_winner_per_round() {
    let c = Cluster::bootstrap(3, &[]).await;
    let first = c.client(1).kv_put("lock", "init", Some(0)).await.expect("create");
    let mut revision = first;
    for round in 0..10 {
        let attempts = (1..=3u64).flat_map(|id| (0..3).map(move |w| (id, w))).map(|(id, w)| {
            let client = c.client(id);
            async move { client.kv_put("lock", &format!("n{id}w{w}r{round}"), Some(revision)).await }
        });
        let results = futures::future::join_all(attempts).await;
        let winners: Vec<u64> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
        let conflicts = results.iter().filter(|r| matches!(r, Err(e) if e.status() == Some(409))).count();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert_eq!(conflicts, results.len() - 1, "round {round}: losers must get 409: {results:?}");
        let item = c.client(2).kv_get("lock", false).await.unwrap();
        assert_eq!(item.revision, winners[0]);
        revision = winners[0];
    }
    // Delete with a stale revision is refused; with the current one it succeeds.
    let stale = c.client(1).kv_delete("lock", Some(first)).await.unwrap_err();
    assert_eq!(stale.status(), Some(409));
    c.client(1).kv_delete("lock", Some(revision)).await.expect("delete at current revision");
    assert_eq!(c.client(3).kv_get("lock", false).await.unwrap_err().status(), Some(404));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_a_node_cleanly_and_it_restarts_with_its_data() {
    let mut c = Cluster::bootstrap(3, &[]).await;
    let rev = c.client(1).kv_put("kept", "yes", None).await.unwrap();
    c.wait_applied(3, rev).await;
    c.terminate(3);
    let status = c.wait_exit(3, Duration::from_secs(20)).expect("node 3 did not stop on SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(c.client(3).health().await.is_err(), "still serving after exit");
    c.client(1).kv_put("while-down", "1", None).await.expect("two of three still commit");
    c.start(3);
    c.wait_healthy(3).await;
    let commit = c.client(1).cluster(false).await.unwrap().commit_index;
    c.wait_applied(3, commit).await;
    assert_eq!(c.client(3).kv_get("kept", true).await.unwrap().revision, rev);
    assert_eq!(c.client(3).kv_get("while-down", true).await.unwrap().value, "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_maintenance_flag_is_replicated_and_every_node_reports_its_view() {
    let mut c = Cluster::bootstrap(3, &[]).await;
    let m = c.client(2).maintenance().await.unwrap();
    assert!(!m.enabled);
    assert_eq!(m.nodes.len(), 3);
    assert!(m.nodes.values().all(|on| !on));

    c.client(3).set_maintenance(true).await.expect("enable through a follower");
    let m = wait_maintenance_views(&c, 1, true).await;
    assert!(m.enabled);

    // A node that was down sees it after restart; an unreachable one is reported as such.
    c.kill(2);
    let m = c.client(1).maintenance().await.unwrap();
    assert_eq!(m.unreachable, vec![2]);
    c.start(2);
    c.wait_healthy(2).await;
    c.client(1).set_maintenance(false).await.expect("disable");
    let m = wait_maintenance_views(&c, 2, false).await;
    assert!(!m.enabled);
}

/// Every node applies the flag within a few heartbeats; waits until all three report `on`.
async fn wait_maintenance_views(c: &Cluster, via: u64, on: bool) -> flotilla_api::types::Maintenance {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = c.client(via).maintenance().await.unwrap();
        if m.nodes.len() == 3 && m.nodes.values().all(|v| *v == on) {
            return m;
        }
        assert!(Instant::now() < deadline, "not every node reports maintenance={on}: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A three-node cluster with executor `e1` registered through a follower (its reports
/// are forwarded), and a run of `tasks` one-step tasks `t00`, `t01`...: the cluster, its
/// leader, the executor's client, the run's id.
async fn follower_executor_and_run(tasks: usize) -> (Cluster, u64, flotilla_api::Client, String) {
    use flotilla_api::types::{ExecutorInfo, RunCreate};
    let c = Cluster::bootstrap(3, &[]).await;
    let leader = c.wait_for_leader().await;
    let exec = c.client((1..=3).find(|id| *id != leader).unwrap());
    let info: ExecutorInfo = serde_json::from_value(serde_json::json!({"archs": ["amd64"]})).unwrap();
    exec.executor_heartbeat("e1", &info).await.unwrap();
    let create: RunCreate = serde_json::from_value(serde_json::json!({
        "name": "load", "group": "/load",
        "tasks": (0..tasks).map(|i| serde_json::json!({"name": format!("t{i:02}"), "image": "busybox", "steps": [{"run": {"command": "true"}}]})).collect::<Vec<_>>()
    }))
    .unwrap();
    let id = c.client(leader).run_create(&create).await.unwrap().id;
    (c, leader, exec, id)
}

/// A listing asked with `data=notstarted` gives a task's data (steps, environment, registry
/// credentials) only while the task has not started, through a follower as through the
/// leader; the default listing gives it for every task.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_data_is_listed_only_while_it_has_not_started_when_asked_so() {
    use flotilla_api::types::TaskDataFor;
    use flotilla_store::run::Phase;
    let (c, leader, exec, id) = follower_executor_and_run(2).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let tasks = exec.executor_tasks_with("e1", 0, 500, TaskDataFor::NotStarted).await.unwrap().tasks;
        if tasks.len() == 2 {
            break tasks;
        }
        assert!(Instant::now() < deadline, "the run's tasks were not handed out: {tasks:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        listed.iter().all(|t| t.status.phase == Phase::Notstarted && t.spec.data.is_some()),
        "{listed:?}"
    );
    let first = &listed[0];
    exec.executor_task_status("e1", &first.id, &sim_executor::status(first, Phase::Running)).await.unwrap();
    for via in [exec.clone(), c.client(leader)] {
        let lean = via.executor_tasks_with("e1", 0, 0, TaskDataFor::NotStarted).await.unwrap().tasks;
        let data = |tasks: &[flotilla_api::types::ExecutorTaskView]| {
            tasks.iter().map(|t| (t.id.clone(), t.status.phase, t.spec.data.is_some())).collect::<Vec<_>>()
        };
        assert_eq!(
            data(&lean),
            vec![(first.id.clone(), Phase::Running, false), (listed[1].id.clone(), Phase::Notstarted, true)],
            "run {id}"
        );
        let whole = via.executor_tasks("e1", 0, 0).await.unwrap().tasks;
        assert!(whole.iter().all(|t| t.spec.data.is_some()), "{whole:?}");
        // The rest of each task is listed alike either way.
        let strip = |tasks: Vec<flotilla_api::types::ExecutorTaskView>| {
            tasks
                .into_iter()
                .map(|mut t| {
                    t.spec.data = None;
                    t
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(lean), strip(whole));
    }
}

/// Scheduler decisions travel as patches of the run once every member reads them (all run
/// this release here), and every node makes the same run of them as the leader.
#[tokio::test(flavor = "multi_thread")]
async fn run_updates_travel_as_patches_and_every_node_holds_the_same_run() {
    use flotilla_store::run::{Phase, RunPhase, RunResult};
    let (c, leader, exec, id) = follower_executor_and_run(5).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut since = 0;
    loop {
        let run = c.client(leader).run_get(&id).await.unwrap();
        if run.phase == RunPhase::Finished {
            assert_eq!(run.result, RunResult::Success, "{run:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the run did not finish: {run:?}");
        let tasks = exec.executor_tasks("e1", since, 500).await.unwrap();
        since = tasks.revision;
        for t in tasks.tasks {
            let next = match t.status.phase {
                Phase::Notstarted => Phase::Running,
                Phase::Running => Phase::Success,
                _ => continue,
            };
            exec.executor_task_status("e1", &t.id, &sim_executor::status(&t, next)).await.unwrap();
        }
    }
    let url = c.url(leader);
    let series = |form: &str| format!("flotilla_scheduler_run_updates_total{{form=\"{form}\"}}");
    let (patches, whole) =
        (metrics::metric(&url, &series("patch")).await, metrics::metric(&url, &series("whole")).await);
    // Each task: handed out, running, succeeded; then the run ends.
    assert!(patches >= 3, "patches {patches}, whole {whole}");
    c.wait_caught_up().await;
    let mut runs = Vec::new();
    for n in 1..=3 {
        runs.push(c.client(n).run_get(&id).await.unwrap());
    }
    assert!(runs.iter().all(|r| *r == runs[0]), "the nodes differ: {runs:#?}");
}

/// Writes arriving together at a follower go to the leader in one request (once the
/// leader has answered that it reads them), and each still gets its own answer: a refused
/// compare-and-swap among accepted writes is refused alone, and nothing else is lost.
#[tokio::test(flavor = "multi_thread")]
async fn writes_a_follower_forwards_together_each_get_their_own_answer() {
    let c = Cluster::bootstrap(3, &[]).await;
    let leader = c.wait_for_leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let f = c.client(follower);
    // The first answer tells the follower which format the leader reads.
    f.kv_put("warm", "up", None).await.unwrap();
    let results = futures::future::join_all((0..200).map(|i| {
        let f = f.clone();
        // Every third write expects a revision the key never had.
        let prev = (i % 3 == 0).then_some(1_000_000);
        async move { (i, prev, f.kv_put(&format!("k{i:03}"), &format!("v{i}"), prev).await) }
    }))
    .await;
    let l = c.client(leader);
    for (i, prev, r) in &results {
        let got = l.kv_get(&format!("k{i:03}"), false).await;
        match (prev, r) {
            (None, Ok(rev)) => {
                let got = got.unwrap();
                assert_eq!((got.value, got.revision), (format!("v{i}"), *rev), "write {i}");
            }
            (Some(_), Err(flotilla_api::ClientError::Api { status: 409, .. })) => {
                assert!(got.is_err(), "write {i} was refused but its key exists")
            }
            other => panic!("write {i}: {other:?}"),
        }
    }
    let url = c.url(follower);
    let series = |form: &str| format!("flotilla_forwarded_writes_total{{form=\"{form}\"}}");
    let (together, alone) =
        (metrics::metric(&url, &series("together")).await, metrics::metric(&url, &series("alone")).await);
    assert_eq!(together + alone, 201, "every write was forwarded once");
    assert!(together > 0, "no write went with others ({alone} alone)");
}

/// An executor's reports sent together (`PUT /api/v1/executor/{id}/tasks`, through a
/// follower) are each answered as they would be alone, in order: accepted, the task
/// unknown (404), a final status changed (409), the same final status again (accepted);
/// a request naming a task twice or carrying too many reports is refused whole. The
/// agent's reporter sends the reports that queue together, and each caller gets its own.
#[tokio::test(flavor = "multi_thread")]
async fn reports_sent_together_are_each_answered_as_alone() {
    use flotilla_api::report::Reporter;
    use flotilla_api::types::{TaskReport, MAX_TASK_REPORTS};
    use flotilla_store::run::{Phase, TaskStatus};
    let (c, leader, exec, _) = follower_executor_and_run(40).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let tasks = loop {
        let tasks = exec.executor_tasks("e1", 0, 500).await.unwrap().tasks;
        if tasks.len() == 40 {
            break tasks;
        }
        assert!(Instant::now() < deadline, "the tasks were not handed out: {}", tasks.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let report = |i: usize, phase| TaskReport {
        id: tasks[i].id.clone(),
        status: sim_executor::status(&tasks[i], phase),
    };
    let gone = TaskReport { id: "nope.t00".into(), status: sim_executor::status(&tasks[0], Phase::Running) };

    let outcomes = exec
        .executor_task_statuses("e1", &[report(0, Phase::Success), report(1, Phase::Running), gone])
        .await
        .unwrap();
    assert!(outcomes[0].is_ok() && outcomes[1].is_ok(), "{outcomes:?}");
    assert!(matches!(outcomes[2], Err(flotilla_api::ClientError::Api { status: 404, .. })), "{outcomes:?}");
    let outcomes = exec
        .executor_task_statuses(
            "e1",
            &[
                report(2, Phase::Running),
                report(0, Phase::Running),
                report(1, Phase::Failed),
                report(0, Phase::Success),
            ],
        )
        .await;
    assert_eq!(outcomes.unwrap_err().status(), Some(400), "a task reported twice");
    let outcomes = exec
        .executor_task_statuses("e1", &[report(0, Phase::Running), report(1, Phase::Failed)])
        .await
        .unwrap();
    // A final status cannot change: 409 while the executor task is kept, 404 once the
    // scheduler copied it into the run and deleted it (it may have by now).
    assert!(
        matches!(outcomes[0], Err(flotilla_api::ClientError::Api { status: 409 | 404, .. })),
        "{outcomes:?}"
    );
    assert!(outcomes[1].is_ok(), "{outcomes:?}");
    let again = exec.executor_task_statuses("e1", &[report(1, Phase::Failed)]).await.unwrap();
    assert!(
        matches!(again[0], Ok(()) | Err(flotilla_api::ClientError::Api { status: 404, .. })),
        "the same final status again: {again:?}"
    );
    let mut many: Vec<TaskReport> = (1..=MAX_TASK_REPORTS)
        .map(|i| TaskReport { id: format!("x.{i}"), ..report(2, Phase::Running) })
        .collect();
    many.push(report(2, Phase::Running));
    assert_eq!(exec.executor_task_statuses("e1", &many).await.unwrap_err().status(), Some(400));
    // What the leader holds: the accepted reports, nothing of the refused ones.
    let held = c.client(leader).executor_tasks("e1", 0, 0).await.unwrap().tasks;
    let phase = |i: usize| held.iter().find(|t| t.id == tasks[i].id).map(|t| t.status.phase);
    // Final ones are deleted once the scheduler copied them into the run.
    assert!(matches!(phase(1), None | Some(Phase::Failed)), "{:?}", phase(1));
    assert!(matches!(phase(0), None | Some(Phase::Success)), "{:?}", phase(0));
    let run_id = tasks[0].spec.spec.run_id.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = c.client(leader).run_get(&run_id).await.unwrap();
        let (t0, t1) = (run.tasks["t00"].status, run.tasks["t01"].status);
        if (t0, t1) == (TaskStatus::Success, TaskStatus::Failed) {
            break;
        }
        assert!(Instant::now() < deadline, "the run has t00 {t0:?}, t01 {t1:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Task 2 was in both refused requests: nothing of them was written.
    assert_eq!(phase(2), Some(Phase::Notstarted));

    // Through the reporter: every other task at once, with an unknown task and a final
    // status changed among them; each caller gets its own outcome.
    let reporter = {
        let exec = exec.clone();
        Reporter::start(move |reports: Vec<TaskReport>| {
            let exec = exec.clone();
            async move { exec.executor_task_statuses("e1", &reports).await }
        })
    };
    let mut reports: Vec<TaskReport> =
        (2..40).map(|i| report(i, if i % 2 == 0 { Phase::Success } else { Phase::Running })).collect();
    reports.insert(7, TaskReport { id: "nope.t99".into(), ..report(2, Phase::Running) });
    reports.insert(20, report(1, Phase::Running));
    let outcomes = futures::future::join_all(reports.iter().map(|r| {
        let (reporter, r) = (reporter.clone(), r.clone());
        async move { reporter.report(&r.id, &r.status).await }
    }))
    .await;
    for (i, (r, o)) in reports.iter().zip(&outcomes).enumerate() {
        let status = o.as_ref().err().and_then(|e| e.status());
        match r.id.as_str() {
            "nope.t99" => assert_eq!(status, Some(404), "report {i}"),
            id if id == tasks[1].id => assert!(matches!(status, Some(409 | 404)), "report {i}: {o:?}"),
            _ => assert!(o.is_ok(), "report {i} ({}): {o:?}", r.id),
        }
    }
    let held = c.client(leader).executor_tasks("e1", 0, 0).await.unwrap().tasks;
    for (i, task) in tasks.iter().enumerate().skip(2) {
        let p = held.iter().find(|t| t.id == task.id).map(|t| t.status.phase);
        let expected =
            if i % 2 == 0 { matches!(p, None | Some(Phase::Success)) } else { p == Some(Phase::Running) };
        assert!(expected, "task {i}: {p:?}");
    }
}

/// Puts sent together (`POST /api/v1/kv`, through a follower) are each answered as they
/// would be alone, in order: written, a revision mismatch (409), a bad key (400); a
/// request putting one key twice or carrying too many puts is refused whole and writes
/// nothing. Puts made at once through one client share requests (fewer requests than
/// puts reach the server), and each caller gets its own revision.
#[tokio::test(flavor = "multi_thread")]
async fn kv_puts_sent_together_are_each_answered_as_alone() {
    use flotilla_api::types::{KvPutItem, MAX_KV_PUTS};
    use flotilla_api::ClientError;
    let c = Cluster::bootstrap(3, &[]).await;
    let leader = c.wait_for_leader().await;
    let follower = (1..=3).find(|&n| n != leader).unwrap();
    let client = c.client(follower);
    let put =
        |key: &str, prev_revision| KvPutItem { key: key.into(), value: format!("v-{key}"), prev_revision };

    let a = client.kv_put_alone("a", "first", None).await.unwrap();
    let outcomes =
        client.kv_puts(&[put("a", Some(a)), put("b", None), put("c", Some(a)), put("", None)]).await.unwrap();
    let revision =
        |i: usize| outcomes[i].as_ref().copied().unwrap_or_else(|e| panic!("{i}: {e} {outcomes:?}"));
    assert!(revision(0) > a && revision(1) > a, "{outcomes:?}");
    assert!(
        matches!(&outcomes[2], Err(ClientError::Api { status: 409, code, .. }) if code == "revision_mismatch")
    );
    assert_eq!(outcomes[3].as_ref().unwrap_err().status(), Some(400), "{outcomes:?}");
    let item = client.kv_get("a", false).await.unwrap();
    assert_eq!((item.value.as_str(), item.revision), ("v-a", revision(0)));
    assert_eq!(client.kv_get("b", false).await.unwrap().value, "v-b");
    assert_eq!(client.kv_get("c", false).await.unwrap_err().status(), Some(404));

    let twice = client.kv_puts(&[put("d", None), put("e", None), put("d", None)]).await;
    assert_eq!(twice.unwrap_err().status(), Some(400), "a key put twice");
    let many: Vec<KvPutItem> = (0..=MAX_KV_PUTS).map(|i| put(&format!("many/{i}"), None)).collect();
    assert_eq!(client.kv_puts(&many).await.unwrap_err().status(), Some(400), "too many puts");
    assert_eq!(client.kv_get("d", false).await.unwrap_err().status(), Some(404), "a refused request wrote");
    assert!(client.kv_list("many/", None, 10, false).await.unwrap().items.is_empty());

    // 64 puts at once through one client of the leader: fewer requests than puts.
    let series = r#"flotilla_http_requests_total{route="kv",status="200"}"#;
    let url = c.url(leader);
    let before = metrics::metric(&url, series).await;
    let client = std::sync::Arc::new(c.client(leader));
    let puts: Vec<_> = (0..64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.kv_put(&format!("at-once/{i}"), &format!("{i}"), None).await })
        })
        .collect();
    let mut revisions = std::collections::BTreeSet::new();
    for p in puts {
        revisions.insert(p.await.unwrap().unwrap());
    }
    let requests = metrics::metric(&url, series).await - before;
    assert!(requests < 64, "64 puts at once took {requests} requests");
    let items = client.kv_list("at-once/", None, 100, false).await.unwrap().items;
    assert_eq!(items.len(), 64);
    for item in &items {
        let i = item.key.trim_start_matches("at-once/");
        assert_eq!(item.value, i, "{item:?}");
        assert!(revisions.contains(&item.revision), "{item:?} was answered another revision");
    }
    // A put of a key already on its way waits for the next request: both land, in order.
    let (first, second) = tokio::join!(client.kv_put("same", "1", None), client.kv_put("same", "2", None));
    let (first, second) = (first.unwrap(), second.unwrap());
    assert!(first < second, "{first} {second}");
    assert_eq!(client.kv_get("same", false).await.unwrap().value, "2");
}
