//! Real S3 servers for tests, started on free loopback ports and killed on drop:
//! s3s-fs (crates.io; enforces request signing) and moto (PyPI; an independent
//! implementation). A missing server binary is a clear panic, never a skipped test:
//! `scripts/test.sh` installs both.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Ost, OstError, S3Ost, S3Settings};

pub const ACCESS_KEY: &str = "flotilla-test";
pub const SECRET_KEY: &str = "flotilla-test-secret";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    S3sFs,
    Moto,
}

/// One running S3 server; killed (and its data removed) on drop.
pub struct S3Server {
    pub kind: Kind,
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// A free port below the kernel's ephemeral range (32768+), so it cannot collide with the
/// `bind(0)` ports other tests pick for server nodes at the same moment.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        ^ (u64::from(std::process::id()) << 20)
        ^ SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9);
    let mut x = seed | 1;
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20_000 + (x % 10_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..30000");
}

fn binary(kind: Kind) -> String {
    let (var, name, how) = match kind {
        Kind::S3sFs => {
            ("S3S_FS_BIN", "s3s-fs", "cargo install s3s-fs --version 0.14.1 --features binary --locked")
        }
        Kind::Moto => ("MOTO_SERVER_BIN", "moto_server", "pip install 'moto[server]'"),
    };
    if let Ok(path) = std::env::var(var) {
        return path;
    }
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(found, "{name} is not installed (needed by the object-storage tests): run scripts/test.sh or `{how}`, or set {var}");
    name.to_string()
}

impl S3Server {
    pub fn start(kind: Kind) -> S3Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = S3Server { kind, port: free_port(), child: None, dir };
        server.restart();
        server
    }

    /// (Re)starts the server on its port, keeping its data (s3s-fs keeps files on disk;
    /// moto keeps nothing across restarts).
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port.to_string();
        let mut cmd = Command::new(binary(self.kind));
        match self.kind {
            Kind::S3sFs => {
                cmd.args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port,
                    "--access-key",
                    ACCESS_KEY,
                    "--secret-key",
                    SECRET_KEY,
                ])
                .arg(self.dir.path());
            }
            Kind::Moto => {
                cmd.args(["-H", "127.0.0.1", "-p", &port]);
            }
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start the S3 server");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("{:?} exited at start: {status}", self.kind);
            }
            assert!(Instant::now() < deadline, "{:?} did not listen on {addr} within 30 s", self.kind);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `--ost` URL for `bucket` and `base` on this server (credentials come from the
    /// AWS env vars, see [`S3Server::env`]).
    pub fn url(&self, bucket: &str, base: &str) -> String {
        format!("s3://{bucket}/{base}?endpoint={}&region=us-east-1&path_style=true", self.endpoint())
    }

    /// Environment for a flotilla process using this server.
    pub fn env(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", "us-east-1"),
        ]
    }

    /// Settings for `bucket`/`base` with the test credentials and quick retries.
    pub fn settings(&self, bucket: &str, base: &str) -> S3Settings {
        let url = url::Url::parse(&self.url(bucket, base)).unwrap();
        let mut s = S3Settings::from_url(&url).unwrap();
        s.credentials = Some((ACCESS_KEY.to_string(), SECRET_KEY.to_string()));
        s
    }

    /// An [`Ost`] on `bucket`/`base`, creating the bucket.
    pub async fn ost(&self, bucket: &str, base: &str) -> Result<Ost, OstError> {
        self.ost_with(self.settings(bucket, base)).await
    }

    pub async fn ost_with(&self, settings: S3Settings) -> Result<Ost, OstError> {
        let s3 = S3Ost::open(settings).await?;
        s3.ensure_bucket().await?;
        Ok(Ost::s3(s3))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
