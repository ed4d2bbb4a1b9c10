//! TLS everywhere: a three-node cluster with mTLS between nodes and an executor over
//! https runs a Docker task end to end; clients without the CA, nodes without a client
//! certificate and plain-HTTP clients are refused with clear messages; bad certificate
//! files stop a server at start with exit 2. Certificates are made here with rcgen.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, free_port, make_ca, make_leaf, make_pki, require_docker_image, trust_ca, IMAGE, TOKEN};
use flotilla_api::types::RunCreate;
use flotilla_store::run::{RunPhase, RunResult, TaskConfig};

/// A CA, certificates it signed, and a rogue CA's, all in `dir`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn cert(&self, name: &str) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}-key.pem")))
    }
}

fn pki(dir: &Path) -> Pki {
    make_pki(dir);
    let good = make_ca("another CA");
    make_leaf(dir, "expired", &good, true);
    let rogue = make_ca("rogue CA");
    std::fs::write(dir.join("rogue-ca.pem"), rogue.pem()).unwrap();
    make_leaf(dir, "rogue", &rogue, false);
    Pki { dir: dir.to_path_buf() }
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn tls_server(dir: &Path, pki: &Pki, id: u64, port: u16, token: &Path) -> Child {
    let (cert, key) = pki.cert("node");
    let log = std::fs::File::create(dir.join(format!("node{id}.log"))).unwrap();
    Command::new(bin())
        .args(["server", "--id", &id.to_string(), "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join(format!("node{id}")))
        .arg("--token-file")
        .arg(token)
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--tls-client-ca")
        .arg(pki.ca())
        .arg("--tls-ca")
        .arg(pki.ca())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!(
                "--- {}\n{}\n",
                e.path().display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_cluster_with_mtls_runs_a_docker_task_end_to_end_and_refuses_the_rest() {
    require_docker_image();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = pki(dir);
    trust_ca(&pki.ca());
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let urls: Vec<String> = ports.iter().map(|p| format!("https://127.0.0.1:{p}")).collect();
    let mut procs = Procs(Vec::new());
    for (i, port) in ports.iter().enumerate() {
        procs.0.push(tls_server(dir, &pki, i as u64 + 1, *port, &token));
    }
    let (ca, tok) = (pki.ca().display().to_string(), token.display().to_string());
    for url in &urls {
        wait_until(&format!("{url} healthy"), Duration::from_secs(30), || {
            cli(&["health", "--server", url, "--tls-ca", &ca]).0 == 0
        });
    }

    // A client without the CA is refused, and says why.
    let (code, text) = cli(&["health", "--server", &urls[0]]);
    assert_eq!(code, 1, "{text}");
    assert!(text.to_lowercase().contains("certificate"), "the refusal names the certificate: {text}");
    // Plain HTTP to the TLS listener: a clear 400, not a hang or a reset.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", ports[0])).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("https://"), "{answer}");

    // Bootstrap over https with mTLS between the nodes.
    let mut init = vec!["cluster", "init", "--server", &urls[0], "--tls-ca", &ca, "--token-file", &tok];
    let nodes: Vec<String> = urls.iter().enumerate().map(|(i, u)| format!("{}={u}", i + 1)).collect();
    for n in &nodes {
        init.extend(["--node", n]);
    }
    let (code, text) = cli(&init);
    assert_eq!(code, 0, "cluster init over https: {text}\n{}", logs(dir));

    // A node without a client certificate cannot append: /raft/* needs one.
    let http = flotilla_raft::tls::client_builder().build().unwrap();
    let r = http
        .post(format!("{}/raft/append", urls[1]))
        .bearer_auth(TOKEN)
        .header("content-type", "application/msgpack")
        .body(vec![0x80])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "{:?}", r.text().await);
    // A certificate from another CA does not even finish the handshake.
    let (rc, rk) = pki.cert("rogue");
    let mut pem = std::fs::read(&rc).unwrap();
    pem.extend(std::fs::read(&rk).unwrap());
    let rogue = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(pki.ca()).unwrap()).unwrap())
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    assert!(rogue.post(format!("{}/raft/append", urls[1])).body(vec![0x80]).send().await.is_err());

    // An executor over https runs a real Docker task.
    let servers = urls.join(",");
    let elog = std::fs::File::create(dir.join("executor.log")).unwrap();
    procs.0.push(
        Command::new(bin())
            .args([
                "executor",
                "--id",
                "tls-e1",
                "--servers",
                &servers,
                "--tls-ca",
                &ca,
                "--token-file",
                &tok,
            ])
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--work-dir")
            .arg(dir.join("executor"))
            .stdout(Stdio::null())
            .stderr(elog)
            .spawn()
            .unwrap(),
    );
    let c = flotilla_api::Client::new(&servers, Some(TOKEN.to_string()));
    let run = c
        .run_create(&RunCreate::new("tls", "/tls", vec![TaskConfig::new("hello", IMAGE, "echo over-tls")]))
        .await
        .unwrap_or_else(|e| panic!("create: {e}\n{}", logs(dir)));
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = loop {
        let r = c.run_get(&run.id).await.unwrap();
        if r.phase == RunPhase::Finished {
            break r;
        }
        assert!(Instant::now() < deadline, "the run did not finish: {r:?}\n{}", logs(dir));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done.result, RunResult::Success, "{done:?}\n{}", logs(dir));
    let log = c.run_log(&run.id, "hello", "0", false).await.unwrap().bytes().await.unwrap();
    assert!(String::from_utf8_lossy(&log).contains("over-tls"));
}

#[test]
fn bad_certificate_files_stop_a_server_at_start_with_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = pki(dir);
    let (cert, key) = pki.cert("node");
    let (expired, expired_key) = pki.cert("expired");
    let (_, rogue_key) = pki.cert("rogue");
    let s = |p: &Path| p.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--tls-cert".into(), s(&expired), "--tls-key".into(), s(&expired_key)], "not valid now"),
        (
            vec!["--tls-cert".into(), s(&cert), "--tls-key".into(), s(&dir.join("missing.pem"))],
            "cannot read --tls-key",
        ),
        (vec!["--tls-cert".into(), s(&cert), "--tls-key".into(), s(&rogue_key)], "do not go together"),
        (vec!["--tls-cert".into(), s(&key), "--tls-key".into(), s(&key)], "--tls-cert"),
        (vec!["--tls-cert".into(), s(&cert)], "go together"),
        (vec!["--tls-client-ca".into(), s(&pki.ca())], "needs --tls-cert"),
    ];
    for (args, want) in cases {
        common::assert_server_refuses(dir, &args, want);
    }
    let (code, text) = cli(&["health", "--tls-ca", &s(&dir.join("missing-ca.pem"))]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--tls-ca"), "{text}");
}
