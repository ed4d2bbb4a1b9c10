//! The servers an executor talks to. Any node answers executor requests (writes and log
//! appends are forwarded to the leader), so following the leader across a failover is
//! retrying on the next node: on a transport error or a 5xx the call moves on to the
//! next server and retries with backoff, for a bounded time; a 4xx is an answer.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_client::report::Reporter;
use flotilla_client::types::TaskReport;
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

/// The agent's status reports, sent together when they queue ([`Reporter`]), through
/// [`Servers::call`]. The reports of a request answered with a 5xx (the leader changed
/// under them) are sent again, alone of the others: a report repeated is accepted, and
/// the others keep their answers. A server that does not take reports together (405: an
/// older release, during a rolling upgrade) gets them one by one for [`ALONE_FOR`], then
/// the request is tried again.
pub fn reporter(servers: Arc<Servers>, executor: String) -> Reporter {
    let alone_until: Arc<Mutex<Option<Instant>>> = Arc::default();
    Reporter::start(move |reports: Vec<TaskReport>| {
        let (servers, executor, alone_until) = (servers.clone(), executor.clone(), alone_until.clone());
        async move {
            let (executor, reports) = (&executor, &reports);
            let alone =
                alone_until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| Instant::now() < t);
            if !alone {
                match together(&servers, executor, reports).await {
                    Err(ClientError::Api { status: 405, .. }) => {
                        *alone_until.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(Instant::now() + ALONE_FOR);
                    }
                    other => return other,
                }
            }
            let alone = reports.iter().map(|r| {
                servers.call("status report", move |c| async move {
                    c.executor_task_status(executor, &r.id, &r.status).await
                })
            });
            Ok(futures::future::join_all(alone).await)
        }
    })
}

/// How long an executor sends its reports one by one after a server did not take them
/// together.
const ALONE_FOR: Duration = Duration::from_secs(300);

/// One request of `reports`, then again the reports answered with a 5xx (moving on to the
/// next server, as [`Servers::call`] does) until each has an answer or the patience ends.
async fn together(
    servers: &Servers,
    executor: &str,
    reports: &[TaskReport],
) -> Result<Vec<Result<(), ClientError>>, ClientError> {
    let outcomes: Mutex<Vec<Option<Result<(), ClientError>>>> = Mutex::new(vec![None; reports.len()]);
    let retryable = |e: &ClientError| e.status().is_none_or(|s| s >= 500);
    let last = servers
        .call("status reports", |c| {
            let outcomes = &outcomes;
            async move {
                let left: Vec<usize> = {
                    let outcomes = outcomes.lock().unwrap_or_else(|e| e.into_inner());
                    (0..reports.len()).filter(|i| outcomes[*i].is_none()).collect()
                };
                let sent: Vec<TaskReport> = left.iter().map(|i| reports[*i].clone()).collect();
                let answers = c.executor_task_statuses(executor, &sent).await?;
                let mut outcomes = outcomes.lock().unwrap_or_else(|e| e.into_inner());
                let mut unanswered = None;
                for (i, answer) in left.into_iter().zip(answers) {
                    match answer {
                        Err(e) if retryable(&e) => unanswered = Some(e),
                        answer => outcomes[i] = Some(answer),
                    }
                }
                unanswered.map_or(Ok(()), Err)
            }
        })
        .await;
    let outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    match last {
        // Not one answer (a 405 among them): the request's own error.
        Err(e) if outcomes.iter().all(Option::is_none) => Err(e),
        // The reports still unanswered when the patience ended get the last error.
        last => Ok(outcomes.into_iter().map(|o| o.unwrap_or_else(|| last.clone())).collect()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use flotilla_store::executor::ExecutorTaskStatus;
    use flotilla_store::run::Phase;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    use super::*;

    /// A server of an older release over real TCP: reports one by one (204), and 405 for
    /// reports sent together, the request lines it got recorded.
    async fn older_server(lines: Arc<Mutex<Vec<String>>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let lines = lines.clone();
                tokio::spawn(async move {
                    let mut conn = BufReader::new(conn);
                    loop {
                        let mut head = Vec::new();
                        let mut length = 0;
                        loop {
                            let mut line = String::new();
                            if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                                length = v.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                            head.push(line.trim_end().to_string());
                        }
                        conn.read_exact(&mut vec![0; length]).await.unwrap();
                        let request = head[0].clone();
                        lines.lock().unwrap().push(request.clone());
                        let answer = if request.starts_with("PUT /api/v1/executor/e1/tasks ") {
                            let body = r#"{"code":"method_not_allowed","message":"GET only"}"#;
                            format!(
                                "HTTP/1.1 405 Method Not Allowed\r\nallow: GET\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        } else {
                            "HTTP/1.1 204 No Content\r\n\r\n".to_string()
                        };
                        conn.get_mut().write_all(answer.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn an_older_server_gets_the_reports_one_by_one_after_its_405() {
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let url = older_server(lines.clone()).await;
        let reporter = reporter(Arc::new(Servers::new(&[url], None)), "e1".into());
        let status = ExecutorTaskStatus { phase: Phase::Running, ..ExecutorTaskStatus::new(1) };
        let first = futures::future::join_all((0..3).map(|i| {
            let (reporter, status) = (reporter.clone(), status.clone());
            async move { reporter.report(&format!("r.t{i}"), &status).await }
        }))
        .await;
        assert!(first.iter().all(|r| r.is_ok()), "{first:?}");
        reporter.report("r.t9", &status).await.unwrap();
        let lines = lines.lock().unwrap().clone();
        let together = lines.iter().filter(|l| l.starts_with("PUT /api/v1/executor/e1/tasks ")).count();
        assert_eq!(together, 1, "asked together once, then one by one: {lines:?}");
        for t in ["r.t0", "r.t1", "r.t2", "r.t9"] {
            let line = format!("PUT /api/v1/executor/e1/tasks/{t} HTTP/1.1");
            assert_eq!(lines.iter().filter(|l| **l == line).count(), 1, "{t}: {lines:?}");
        }
    }
}
