//! The three `flotilla server` processes, each started inside its own namespace with
//! `ip netns exec` (which execs the server, so the pid is the server's own: SIGSTOP,
//! SIGCONT and SIGKILL reach it directly).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::net::{node_ip, ns, PID_DIR};

pub const TOKEN: &str = "faults-token-51c2";
pub const PORT: u16 = 7700;
/// `--request-timeout-ms` of every node (the default, written out so reports can name it).
pub const REQUEST_TIMEOUT_MS: u64 = 2000;

pub fn url(id: u64) -> String {
    format!("http://{}:{PORT}", node_ip(id))
}

pub struct Nodes {
    pub dir: PathBuf,
    token_file: PathBuf,
    children: BTreeMap<u64, Child>,
    pub ids: Vec<u64>,
}

impl Nodes {
    pub fn new(dir: &Path, ids: &[u64]) -> Nodes {
        let token_file = dir.join("token");
        std::fs::write(&token_file, TOKEN).unwrap();
        std::fs::create_dir_all(PID_DIR).unwrap();
        Nodes { dir: dir.to_path_buf(), token_file, children: BTreeMap::new(), ids: ids.to_vec() }
    }

    pub fn start(&mut self, id: u64) {
        assert!(!self.children.contains_key(&id), "node {id} already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node{id}.log")))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns(id), env!("CARGO_BIN_EXE_flotilla"), "server"])
            .args(["--id", &id.to_string(), "--listen", &format!("{}:{PORT}", node_ip(id))])
            .arg("--data-dir")
            .arg(self.dir.join(format!("node{id}")))
            .arg("--token-file")
            .arg(&self.token_file)
            .args(["--request-timeout-ms", &REQUEST_TIMEOUT_MS.to_string()])
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start flotilla server in its namespace");
        std::fs::write(Path::new(PID_DIR).join(format!("n{id}")), child.id().to_string()).unwrap();
        self.children.insert(id, child);
    }

    pub fn pid(&self, id: u64) -> String {
        self.children[&id].id().to_string()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.children.remove(&id) {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_file(Path::new(PID_DIR).join(format!("n{id}")));
        }
    }

    pub fn signal(&self, id: u64, sig: &str) {
        let _ = Command::new("kill").args([sig, &self.pid(id)]).status();
    }

    pub fn client(&self, id: u64) -> flotilla_api::Client {
        flotilla_api::Client::new(&url(id), Some(TOKEN.into()))
    }

    /// Bootstraps the cluster and waits for a leader every node agrees on.
    pub async fn init(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        for &id in &self.ids {
            while self.client(id).health().await.is_err() {
                if Instant::now() > deadline {
                    return Err(format!("node {id} did not come up (see node{id}.log)"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let members: Vec<(u64, String)> = self.ids.iter().map(|&id| (id, url(id))).collect();
        self.client(self.ids[0]).cluster_init(&members).await.map_err(|e| format!("cluster init: {e}"))?;
        self.wait_ready(deadline).await
    }

    /// Waits until every node answers `/readyz` 200.
    pub async fn wait_ready(&self, deadline: Instant) -> Result<(), String> {
        let http = reqwest::Client::new();
        for &id in &self.ids {
            loop {
                let ok = http
                    .get(format!("{}/readyz", url(id)))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("node {id} is not ready (see node{id}.log)"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The leader as most nodes see it, if they agree.
    pub async fn leader(&self) -> Option<u64> {
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        for &id in &self.ids {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(1), self.client(id).cluster(true)).await
            {
                if let Some(l) = s.leader_id {
                    *votes.entry(l).or_default() += 1;
                }
            }
        }
        votes.into_iter().find(|(_, n)| *n * 2 > self.ids.len()).map(|(l, _)| l)
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.children.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}
