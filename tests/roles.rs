//! Named tokens with roles (`--tokens-file`): what each role may do on a real node, two
//! distinct approvers for `approvers_required: 2`, approvals and their actor in events,
//! and a revoked token refused after `SIGHUP` reloads the file.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Cluster;
use flotilla_api::types::RunCreate;
use flotilla_api::{Client, ClientError};
use flotilla_store::run::TaskConfig;

const TOKENS: &str = r#"
[[token]]
name = "viewer"
role = "read"
secret = "viewer-secret"

[[token]]
name = "ci"
role = "write"
# sha256("ci-secret")
sha256 = "SHA_CI"

[[token]]
name = "bob"
role = "write"
secret = "bob-secret"

[[token]]
name = "agent"
role = "executor"
secret = "agent-secret"

[[token]]
name = "peer"
role = "cluster"
secret = "peer-secret"
"#;

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

async fn cluster_with_tokens() -> (Cluster, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let file = dir.join("tokens.toml");
    std::fs::write(&file, TOKENS.replace("SHA_CI", &sha256_hex("ci-secret"))).unwrap();
    let c = Cluster::bootstrap(1, &["--tokens-file", file.to_str().unwrap()]).await;
    (c, file)
}

fn as_(c: &Cluster, secret: &str) -> Client {
    Client::new(&c.url(1), Some(secret.to_string()))
}

fn status(r: Result<impl Sized, ClientError>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(e) => e.status().unwrap_or(0),
    }
}

fn gated() -> RunCreate {
    let mut t = TaskConfig::new("deploy", "i", "true");
    t.needs_approval = true;
    t.approvers_required = 2;
    RunCreate::new("gated", "/roles", vec![t])
}

#[tokio::test(flavor = "multi_thread")]
async fn each_role_may_do_what_the_table_says_and_nothing_more() {
    let (c, _) = cluster_with_tokens().await;
    let (viewer, ci, agent, peer) =
        (as_(&c, "viewer-secret"), as_(&c, "ci-secret"), as_(&c, "agent-secret"), as_(&c, "peer-secret"));
    let admin = c.client(1);
    let nobody = as_(&c, "not-a-token");

    // Unknown token: 401; a known token without the role: 403.
    assert_eq!(status(nobody.run_list(&Default::default()).await), 401);
    // read: reads only.
    assert_eq!(status(viewer.run_list(&Default::default()).await), 200);
    assert_eq!(status(viewer.kv_get("k", false).await), 404);
    assert_eq!(status(viewer.cluster(false).await), 200);
    assert_eq!(status(viewer.run_create(&gated()).await), 403);
    assert_eq!(status(viewer.kv_put("k", "v", None).await), 403);
    let puts = [flotilla_api::types::KvPutItem { key: "k".into(), value: "v".into(), prev_revision: None }];
    assert_eq!(status(viewer.kv_puts(&puts).await), 403);
    // write: runs and kv, not the cluster, maintenance, export or executors' admin.
    let run = ci.run_create(&gated()).await.expect("write creates runs");
    assert_eq!(status(ci.kv_put("k", "v", None).await), 200);
    assert!(matches!(ci.kv_puts(&puts).await.as_deref(), Ok([Ok(_)])), "write puts together");
    assert_eq!(status(ci.set_maintenance(true).await), 403);
    assert_eq!(status(ci.export().await), 403);
    assert_eq!(status(ci.remove_node(7).await), 403);
    assert_eq!(status(ci.executor_delete("nobody").await), 403);
    // executor: only the executor routes.
    assert_eq!(status(agent.run_list(&Default::default()).await), 403);
    assert_eq!(status(agent.executor_tasks("e1", 0, 0).await), 404, "not registered: past the role check");
    // cluster: only /raft/*.
    assert_eq!(status(peer.run_get(&run.id).await), 403);
    assert_eq!(status(peer.executor_tasks("e1", 0, 0).await), 403);
    // admin: everything.
    assert_eq!(status(admin.export().await), 200);
    assert_eq!(status(admin.set_maintenance(true).await), 200);
    assert_eq!(status(admin.set_maintenance(false).await), 200);
    // Health and metrics need no token.
    assert_eq!(status(nobody.health().await), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_approvers_need_two_distinct_names_and_events_name_them() {
    let (c, _) = cluster_with_tokens().await;
    let (ci, bob, viewer) = (as_(&c, "ci-secret"), as_(&c, "bob-secret"), as_(&c, "viewer-secret"));
    let run = ci.run_create(&gated()).await.unwrap();
    // No executor: the task waits for approval once the scheduler has seen it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ci.run_get(&run.id).await.unwrap().tasks["deploy"].waiting_approval {
        assert!(Instant::now() < deadline, "the task never waited for approval");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The event stream (live only) carries who approved: listen before approving.
    let stream = Command::new("curl")
        .args(["-sN", "--max-time", "8", "-H", "Authorization: Bearer viewer-secret"])
        .arg(format!("{}/api/v1/events", c.url(1)))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status(viewer.task_approve(&run.id, "deploy").await), 403, "read cannot approve");
    let other = bob.run_create(&gated()).await.unwrap();
    ci.task_approve(&run.id, "deploy").await.unwrap();
    ci.task_approve(&run.id, "deploy").await.unwrap();
    let t = &ci.run_get(&run.id).await.unwrap().tasks["deploy"];
    assert!(!t.approved, "the same token twice counts once: {t:?}");
    assert!(t.annotations.contains_key("approver/ci"), "{t:?}");
    bob.task_approve(&run.id, "deploy").await.unwrap();
    let t = &ci.run_get(&run.id).await.unwrap().tasks["deploy"];
    assert!(t.approved && t.annotations.contains_key("approver/bob"), "{t:?}");
    // A restart names who asked too (no executor: stop the run, then restart it).
    ci.run_stop(&run.id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ci.run_get(&run.id).await.unwrap().phase.is_final() {
        assert!(Instant::now() < deadline, "the stopped run did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bob.run_restart(&run.id, true, None).await.unwrap();

    let out = stream.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"action\":\"approved\"")
            && text.contains("\"actor\":\"bob\"")
            && text.contains("\"actor\":\"ci\"")
            && text
                .lines()
                .any(|l| l.contains("\"action\":\"restarted\"") && l.contains("\"actor\":\"bob\""))
            && text.lines().any(|l| l.contains(&other.id) && l.contains("\"actor\":\"bob\"")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_is_refused_after_sighup_and_a_bad_file_keeps_the_old_tokens() {
    let (c, file) = cluster_with_tokens().await;
    let viewer = as_(&c, "viewer-secret");
    assert_eq!(status(viewer.run_list(&Default::default()).await), 200);
    let pid = c.nodes[&1].child.as_ref().unwrap().id().to_string();

    // A broken file: the reload is refused (logged), the old tokens stay.
    std::fs::write(&file, "[[token]]\nname = \"x\"\n").unwrap();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status(viewer.run_list(&Default::default()).await), 200);
    assert!(c.log_tail(1).contains("tokens file not reloaded"), "{}", c.log_tail(1));

    // Without the viewer: refused after the reload.
    let without = TOKENS
        .replace("SHA_CI", &sha256_hex("ci-secret"))
        .replace("name = \"viewer\"", "name = \"viewer2\"")
        .replace("viewer-secret", "other-secret");
    std::fs::write(&file, without).unwrap();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(viewer.run_list(&Default::default()).await) != 401 {
        assert!(Instant::now() < deadline, "the revoked token still works");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status(as_(&c, "other-secret").run_list(&Default::default()).await), 200);
    let logs = c.all_logs();
    for secret in ["viewer-secret", "other-secret", "ci-secret", "bob-secret"] {
        assert!(!logs.contains(secret), "a secret in the logs: {secret}");
    }
}

#[test]
fn bad_tokens_files_stop_the_server_at_start_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[[token]]\nname = \"a\"\nrole = \"read\"\nsecret = \"s\"\n[[token]]\nname = \"a\"\nrole = \"write\"\nsecret = \"t\"\n", "used twice"),
        ("[[token]]\nname = \"a\"\nrole = \"boss\"\nsecret = \"s\"\n", "tokens file"),
        ("[[token]]\nname = \"a\"\nrole = \"read\"\nsecret = \"\"\n", "empty secret"),
    ];
    for (text, want) in cases {
        let file = dir.path().join("tokens.toml");
        std::fs::write(&file, text).unwrap();
        let args = ["--tokens-file".to_string(), file.display().to_string()];
        common::assert_server_refuses(dir.path(), &args, want);
    }
}
