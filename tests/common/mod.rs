//! Test harness: real `flotilla server` processes on loopback ports, with their own data
//! dirs, killed with SIGKILL and restarted on the same port and data dir.

#![allow(dead_code)]

mod rng;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_api::types::ClusterStatus;
use flotilla_api::Client;

pub const TOKEN: &str = "test-token-7f3a";

/// The `flotilla` binary under test: this build's, or `FLOTILLA_BIN` (a benchmark of an
/// older build side by side with this one, docs/benchmarks.md).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("FLOTILLA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_flotilla").into())
    })
}

/// A loopback port for a server this test starts: free now, never handed out twice by
/// this process, and below the kernel's ephemeral range.
///
/// A port from `bind(":0")` is an ephemeral one, released before the server binds it: in
/// that gap any outgoing connection (a node's to its peers, the test's own clients) can be
/// given it as its local port, and the next `bind(":0")` can return it again — a node then
/// fails with "Address already in use", or two nodes share an address (one node talking to
/// "a peer" that is itself: openraft asserts and the node stops; seen once in ~300 runs).
/// Outgoing connections never take a port below the ephemeral range; the set keeps this
/// process from reusing one; random picks keep test processes running at once apart.
pub fn free_port() -> u16 {
    use std::sync::{Mutex, OnceLock};
    static GIVEN: OnceLock<Mutex<(Rng, std::collections::HashSet<u16>)>> = OnceLock::new();
    let (low, high) = (10_000u16, ephemeral_low().clamp(10_001, 32_768));
    let given = GIVEN.get_or_init(|| {
        Mutex::new((Rng::new(rng::clock_seed() ^ u64::from(std::process::id())), Default::default()))
    });
    let mut given = given.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..10_000 {
        let port = low + given.0.below(u64::from(high - low)) as u16;
        if !given.1.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.1.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// The last 40 lines of a process's log: what a failure message shows.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The first port of the kernel's ephemeral range (Linux: 32768 unless configured).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

pub struct NodeProc {
    pub id: u64,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// Serves HTTPS (the cluster's `tls`).
    pub https: bool,
}

impl NodeProc {
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }
}

/// Starts `flotilla server` (node 1, a fresh data dir under `dir`) with `args`, expecting
/// it to refuse to start: asserts exit code 2, that its stderr names `want`, and that
/// nothing listens on its port. Returns stderr.
pub fn assert_server_refuses(dir: &std::path::Path, args: &[String], want: &str) -> String {
    let port = free_port();
    let out = Command::new(bin())
        .args(["server", "--id", "1", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.join("refused-data"))
        .args(args)
        .output()
        .expect("run flotilla server");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: wants {want:?} in {err}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "{args:?}: nothing listens");
    err
}

/// A node's certificate and key, and the CA that signed them (trusted by every client).
#[derive(Clone)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A self-signed CA, made with rcgen at test time (no key is ever committed).
pub fn make_ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap()
}

/// `dir/NAME.pem` and `dir/NAME-key.pem`: a certificate for 127.0.0.1 and localhost, good
/// for servers and clients (nodes show it to each other), signed by `issuer`; expired
/// (2020) when asked.
pub fn make_leaf(
    dir: &std::path::Path,
    name: &str,
    issuer: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    expired: bool,
) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose};
    let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
}

/// A CA (`dir/ca.pem`) and a node certificate signed by it.
pub fn make_pki(dir: &std::path::Path) -> TlsPaths {
    let ca = make_ca("flotilla test CA");
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    make_leaf(dir, "node", &ca, false);
    TlsPaths { cert: dir.join("node.pem"), key: dir.join("node-key.pem"), ca: dir.join("ca.pem") }
}

/// This process's HTTP clients trust `ca` (once per process: later calls change nothing).
pub fn trust_ca(ca: &std::path::Path) {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| flotilla_raft::tls::configure(Some(ca), None).unwrap());
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub token_file: PathBuf,
    pub nodes: BTreeMap<u64, NodeProc>,
    /// Extra flags for every server (e.g. a small snapshot interval).
    pub extra_args: Vec<String>,
    /// Extra environment for every server (e.g. S3 credentials).
    pub env: Vec<(String, String)>,
    /// HTTPS with mTLS between the nodes (`--tls-*`), when set.
    pub tls: Option<TlsPaths>,
}

#[allow(unused_imports)] // not every test binary draws random numbers
pub use rng::Rng;

impl Cluster {
    pub fn new(extra_args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, TOKEN).unwrap();
        Cluster {
            dir,
            token_file,
            nodes: BTreeMap::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            tls: None,
        }
    }

    /// Starts `n` nodes (ids 1..=n) and bootstraps them into one cluster.
    pub async fn bootstrap(n: u64, extra_args: &[&str]) -> Cluster {
        Self::bootstrap_with_env(n, extra_args, &[]).await
    }

    /// [`Cluster::bootstrap`] with extra environment for the servers.
    pub async fn bootstrap_with_env(n: u64, extra_args: &[&str], env: &[(&str, &str)]) -> Cluster {
        Self::bootstrap_with(n, extra_args, env, None).await
    }

    /// [`Cluster::bootstrap`] over HTTPS with mTLS between the nodes; this process then
    /// trusts the CA of `tls`.
    pub async fn bootstrap_tls(n: u64, extra_args: &[&str], tls: TlsPaths) -> Cluster {
        trust_ca(&tls.ca);
        Self::bootstrap_with(n, extra_args, &[], Some(tls)).await
    }

    async fn bootstrap_with(
        n: u64,
        extra_args: &[&str],
        env: &[(&str, &str)],
        tls: Option<TlsPaths>,
    ) -> Cluster {
        let mut c = Cluster::new(extra_args);
        c.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        c.tls = tls;
        for id in 1..=n {
            c.add_process(id);
        }
        for id in 1..=n {
            c.wait_healthy(id).await;
        }
        let nodes: Vec<(u64, String)> = c.nodes.values().map(|p| (p.id, p.url())).collect();
        c.client(1).cluster_init(&nodes).await.expect("cluster init");
        c.wait_for_leader().await;
        c
    }

    /// Creates a node process entry (new port, new data dir) and starts it.
    pub fn add_process(&mut self, id: u64) {
        let node = NodeProc {
            id,
            port: free_port(),
            data_dir: self.dir.path().join(format!("node{id}")),
            log: self.dir.path().join(format!("node{id}.log")),
            child: None,
            https: self.tls.is_some(),
        };
        self.nodes.insert(id, node);
        self.start(id);
    }

    pub fn start(&mut self, id: u64) {
        let mut extra = self.extra_args.clone();
        if let Some(t) = &self.tls {
            for (flag, path) in [
                ("--tls-cert", &t.cert),
                ("--tls-key", &t.key),
                ("--tls-client-ca", &t.ca),
                ("--tls-ca", &t.ca),
            ] {
                extra.extend([flag.to_string(), path.display().to_string()]);
            }
        }
        let env = self.env.clone();
        let token_file = self.token_file.clone();
        let node = self.nodes.get_mut(&id).unwrap();
        assert!(node.child.is_none(), "node {id} already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
        let child = Command::new(bin())
            .args(["server", "--id", &id.to_string(), "--listen", &format!("127.0.0.1:{}", node.port)])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--token-file")
            .arg(&token_file)
            .args(&extra)
            // FLOTILLA_NODE_RUST_LOG: the nodes' log filter when diagnosing a test or a bench.
            .env(
                "RUST_LOG",
                std::env::var("FLOTILLA_NODE_RUST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn flotilla server");
        node.child = Some(child);
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.nodes.get_mut(&id).unwrap().child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM: the node stops serving, stops Raft and flushes its store.
    pub fn terminate(&mut self, id: u64) {
        let pid = self.nodes[&id].child.as_ref().expect("running").id();
        let ok = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success();
        assert!(ok, "kill -TERM {pid} failed");
    }

    /// Waits for a started node to exit on its own (e.g. refusing a broken store).
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let node = self.nodes.get_mut(&id).unwrap();
        let child = node.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                node.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the CLI against node `via`; returns (exit code, stdout, stderr).
    pub fn cli(&self, via: u64, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin())
            .args(args)
            .env("FLOTILLA_SERVER", self.url(via))
            .env("FLOTILLA_TOKEN_FILE", &self.token_file)
            .output()
            .expect("run cli");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.nodes[&id].child.is_some()
    }

    pub fn client(&self, id: u64) -> Client {
        Client::new(&self.nodes[&id].url(), Some(TOKEN.into()))
    }

    pub fn url(&self, id: u64) -> String {
        self.nodes[&id].url()
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes.values().filter(|n| n.child.is_some()).map(|n| n.id).collect()
    }

    pub async fn wait_healthy(&self, id: u64) {
        let c = self.client(id);
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.health().await.is_err() {
            assert!(Instant::now() < deadline, "node {id} did not come up; log:\n{}", self.log_tail(id));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node reports the same leader, which is running too.
    pub async fn wait_for_leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut leaders = Vec::new();
            for id in self.running() {
                leaders.push(self.client(id).cluster(true).await.ok().and_then(|s| s.leader_id));
            }
            if let Some(Some(l)) = leaders.first() {
                if leaders.iter().all(|x| *x == Some(*l)) && self.running().contains(l) {
                    return *l;
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}\n{}", self.all_logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// This node's own view.
    pub async fn local_status(&self, id: u64) -> ClusterStatus {
        self.client(id).cluster(true).await.expect("local status")
    }

    /// Waits until `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = self.client(id).cluster(true).await {
                if s.applied_index >= index {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not apply index {index}\n{}",
                self.log_tail(id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node has applied all the leader has committed.
    pub async fn wait_caught_up(&self) {
        let leader = self.wait_for_leader().await;
        let commit = self.client(leader).cluster(false).await.expect("cluster status").commit_index;
        for id in self.running() {
            self.wait_applied(id, commit).await;
        }
    }

    /// Node `id`'s whole log.
    pub fn log_text(&self, id: u64) -> String {
        std::fs::read_to_string(&self.nodes[&id].log).unwrap_or_default()
    }

    pub fn log_tail(&self, id: u64) -> String {
        last_lines(&self.log_text(id))
    }

    /// Every node's last lines, and before them any panic of the node's whole log (a
    /// panicking Raft core leaves only its consequences in the tail).
    pub fn all_logs(&self) -> String {
        self.nodes
            .keys()
            .map(|id| {
                let text = self.log_text(*id);
                let lines: Vec<&str> = text.lines().collect();
                let panics: Vec<String> = lines
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.contains("panicked at"))
                    .map(|(i, _)| lines[i..(i + 3).min(lines.len())].join("\n"))
                    .collect();
                let panics = if panics.is_empty() {
                    String::new()
                } else {
                    format!("PANICS:\n{}\n", panics.join("\n"))
                };
                format!("--- node {id} ---\n{panics}{}", last_lines(&text))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.all_logs());
        }
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

/// The local test image (built by scripts/test-image.sh from Debian's busybox-static).
pub const IMAGE: &str = "flotilla-busybox:latest";

/// Fails clearly when Docker or the test image is missing (CI builds it first).
pub fn require_docker_image() {
    let ok = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match ok {
        Ok(s) if s.success() => {}
        Ok(_) => {
            let built = Command::new("bash")
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-image.sh"))
                .status();
            assert!(
                built.is_ok_and(|s| s.success()),
                "the test image {IMAGE} is missing and scripts/test-image.sh could not build it"
            );
        }
        Err(e) => panic!("docker is needed by the executor tests and cannot be run: {e}"),
    }
}

/// Ids of containers (running or not) carrying label `key=value`.
pub fn containers_with_label(key: &str, value: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={key}={value}")])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect()
}

/// The one warm container (`--warm-image`) of executor `executor`, by id (12 characters,
/// as `docker ps` gives), once it is the executor's only container, running, and the
/// `made`-th the executor logged ready (to `log`): Docker shows a container running a
/// moment before the executor hears that it started.
pub fn sole_warm_container(executor: &str, log: &std::path::Path, made: usize) -> Option<String> {
    let out = Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label=flotilla.executor={executor}")])
        .args(["--filter", "label=flotilla.warm=true", "--filter", "status=running"])
        .output()
        .expect("docker ps");
    let running: Vec<String> =
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
    let [only] = running.as_slice() else { return None };
    let logged = std::fs::read_to_string(log).unwrap_or_default().matches("warm container ready").count();
    (logged == made && containers_with_label("flotilla.executor", executor).len() == 1).then(|| only.clone())
}

/// A `flotilla executor` process.
pub struct ExecutorProc {
    pub id: String,
    pub args: Vec<String>,
    pub work_dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    servers: String,
    token_file: PathBuf,
}

impl ExecutorProc {
    /// Starts executor `id` against the cluster's running nodes, with `extra` flags.
    pub fn start(cluster: &Cluster, id: &str, extra: &[&str]) -> ExecutorProc {
        let servers: Vec<String> = cluster.running().into_iter().map(|n| cluster.url(n)).collect();
        let mut e = ExecutorProc {
            id: id.to_string(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            work_dir: cluster.dir.path().join(format!("executor-{id}")),
            log: cluster.dir.path().join(format!("executor-{id}.log")),
            child: None,
            servers: servers.join(","),
            token_file: cluster.token_file.clone(),
        };
        e.restart();
        e
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "executor {} already running", self.id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(bin())
            .args(["executor", "--id", &self.id, "--servers", &self.servers])
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--work-dir")
            .arg(&self.work_dir)
            .arg("--token-file")
            .arg(&self.token_file)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn flotilla executor");
        self.child = Some(child);
    }

    /// SIGKILL, no cleanup.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(40);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_tail(&self) -> String {
        last_lines(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for ExecutorProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- executor {} ---\n{}", self.id, self.log_tail());
        }
        self.kill();
        // Whatever the test did, leave no container behind.
        for c in containers_with_label("flotilla.executor", &self.id) {
            let _ = Command::new("docker").args(["rm", "-f", &c]).stdout(Stdio::null()).status();
        }
    }
}

/// A raw API call (any method, optional token and JSON body): the status and the body as
/// JSON (`null` when it is not JSON). For tests of refusals the typed client would not send.
pub async fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, serde_json::Value) {
    let client = reqwest::Client::new();
    let mut req = client.request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}
