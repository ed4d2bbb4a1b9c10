//! The baseline: a three-member etcd cluster of Debian's `etcd-server`, each member a process
//! on loopback with its own data dir on the same disk as flotilla's, killed with SIGKILL and
//! restarted on its data dir like flotilla's nodes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::free_port;

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Etcd {
    _dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
}

/// The `etcd` binary and its version line, or a clear failure.
pub fn require() -> String {
    let out = Command::new("etcd").arg("--version").output().unwrap_or_else(|e| {
        panic!("the etcd baseline needs the `etcd` binary ({e}): install Debian's etcd-server (scripts/bench.sh does)")
    });
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().unwrap_or("etcd").trim().to_string()
}

impl Etcd {
    pub async fn start(n: usize) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (1..=n)
            .map(|i| Member {
                name: format!("e{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.path().join(format!("e{i}")),
                log: dir.path().join(format!("e{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd { _dir: dir, members, initial_cluster };
        for i in 0..n {
            etcd.spawn(i);
        }
        etcd.wait_for_leader().await;
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        assert!(m.child.is_none());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log).unwrap();
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "flotilla-bench", "--log-level", "warn"])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        m.child = Some(child);
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The running members' processes, member `leader` first (for CPU accounting).
    pub fn procs(&self, leader: usize) -> crate::cpu::Procs {
        let pid = |m: &Member| m.child.as_ref().map(|c| c.id());
        let followers =
            self.members.iter().enumerate().filter(|(i, _)| *i != leader).filter_map(|(_, m)| pid(m));
        crate::cpu::Procs {
            leader: pid(&self.members[leader]).expect("the leader runs"),
            followers: followers.collect(),
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    /// The index of the member that leads, asked of the running members.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            let Ok(mut c) = connect(&self.endpoint(i)).await else { continue };
            let Ok(status) = c.status().await else { continue };
            let Some(header) = status.header() else { continue };
            if status.leader() != 0 && status.leader() == header.member_id() {
                return Some(i);
            }
        }
        None
    }

    pub async fn wait_for_leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = self.leader().await {
                return i;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| std::fs::read_to_string(&m.log).unwrap_or_default())
                    .collect();
                panic!("etcd elected no leader within 30 s:\n{}", logs.join("\n---\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

pub async fn connect(endpoint: &str) -> Result<etcd_client::Client, etcd_client::Error> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(10));
    etcd_client::Client::connect([endpoint], Some(opts)).await
}
