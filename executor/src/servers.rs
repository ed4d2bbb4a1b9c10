//! The servers an executor talks to. Any node answers executor requests (writes and log
//! appends are forwarded to the leader), so following the leader across a failover is
//! retrying on the next node: on a transport error or a 5xx the call moves on to the
//! next server and retries with backoff, for a bounded time; a 4xx is an answer.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flotilla_client::{Client, ClientError};

pub struct Servers {
    clients: Vec<Client>,
    current: AtomicUsize,
    /// How long one call keeps retrying.
    pub patience: Duration,
}

impl Servers {
    pub fn new(urls: &[String], token: Option<String>) -> Servers {
        let clients = urls.iter().map(|u| Client::new(u, token.clone())).collect();
        Servers { clients, current: AtomicUsize::new(0), patience: Duration::from_secs(60) }
    }

    /// The server in use now.
    pub fn client(&self) -> Client {
        self.clients[self.current.load(Ordering::Relaxed) % self.clients.len()].clone()
    }

    fn rotate(&self, from: usize) {
        let _ =
            self.current.compare_exchange(from, from.wrapping_add(1), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Runs `f` against the current server, moving on to the next on transport errors and
    /// 5xx, with backoff, for at most [`Servers::patience`].
    pub async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let deadline = Instant::now() + self.patience;
        let mut backoff = Duration::from_millis(50);
        loop {
            let at = self.current.load(Ordering::Relaxed);
            let client = self.clients[at % self.clients.len()].clone();
            match f(client).await {
                Err(e) if e.status().is_none_or(|s| s >= 500) && Instant::now() < deadline => {
                    tracing::debug!(what, error = %e, "retrying on the next server");
                    self.rotate(at);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }
}
