//! A step's log: written to a local file as the step runs, and pushed to the servers by
//! a background task in appends carrying their offset (the server answers with what it
//! holds, so a lost append or a new leader simply means resending from there). The
//! local file is the truth until the server says the log is stored in the object
//! storage; then it is deleted.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_store::limits::MAX_LOG_BYTES;
use flotilla_store::run::LogPhase;
use tokio::sync::watch;

use crate::servers::Servers;

/// Most bytes per append request (the API caps bodies at 1 MiB).
const APPEND_MAX: u64 = 512 * 1024;
/// How often new output is pushed while a step runs.
const PUSH_EVERY: Duration = Duration::from_millis(150);

pub struct StepLog {
    file: std::fs::File,
    written: u64,
    truncated: bool,
    done: watch::Sender<bool>,
    pusher: tokio::task::JoinHandle<LogPhase>,
}

impl StepLog {
    /// Creates the local file and starts pushing it as `step` (`setup` or a number).
    pub fn start(
        servers: Arc<Servers>,
        executor: String,
        task_id: String,
        step: String,
        path: PathBuf,
    ) -> std::io::Result<StepLog> {
        let file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&path)?;
        let (done, done_rx) = watch::channel(false);
        let pusher = tokio::spawn(push(servers, executor, task_id, step, path, done_rx));
        Ok(StepLog { file, written: 0, truncated: false, done, pusher })
    }

    /// Appends output (beyond the size limit, drops it and says so once).
    pub fn write(&mut self, data: &[u8]) {
        if self.truncated {
            return;
        }
        let room = MAX_LOG_BYTES.saturating_sub(self.written + 64);
        let (data, cut) =
            if data.len() as u64 > room { (&data[..room as usize], true) } else { (data, false) };
        if self.file.write_all(data).is_ok() {
            self.written += data.len() as u64;
        }
        if cut {
            let note = b"\n[flotilla: log truncated at its size limit]\n";
            let _ = self.file.write_all(note);
            self.written += note.len() as u64;
            self.truncated = true;
        }
    }

    pub fn line(&mut self, text: &str) {
        self.write(format!("{text}\n").as_bytes());
    }

    /// Ends the log and waits until the server stored it (or gave up): `sent` or `error`.
    pub async fn finish(self) -> LogPhase {
        let _ = self.file.sync_all();
        drop(self.file);
        let _ = self.done.send(true);
        self.pusher.await.unwrap_or(LogPhase::Error)
    }
}

async fn push(
    servers: Arc<Servers>,
    executor: String,
    task_id: String,
    step: String,
    path: PathBuf,
    mut done: watch::Receiver<bool>,
) -> LogPhase {
    let mut sent = 0u64;
    loop {
        let finished = *done.borrow();
        let len = tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or(0);
        if sent < len || finished {
            let end = len.min(sent + APPEND_MAX);
            let chunk = match flotilla_store::ost::read_file_range(&path, sent, end - sent).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(task_id, step, error = %e, "cannot read the local log");
                    return LogPhase::Error;
                }
            };
            let last = finished && end == len;
            let r = servers
                .call("log append", |c| {
                    let chunk = chunk.clone();
                    let (executor, task_id, step) = (executor.clone(), task_id.clone(), step.clone());
                    async move { c.executor_log_append(&executor, &task_id, &step, sent, chunk, last).await }
                })
                .await;
            match r {
                Ok(a) if a.stored => {
                    let _ = tokio::fs::remove_file(&path).await;
                    return LogPhase::Sent;
                }
                // The server holds `size` bytes: continue from there (it may have lost
                // some after a failover; it never holds more than was sent).
                Ok(a) => {
                    sent = a.size.min(len);
                    if sent < len {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(task_id, step, error = %e, "log push failed");
                    if finished || e.status().is_some_and(|s| s < 500) {
                        return LogPhase::Error;
                    }
                }
            }
        }
        if !finished {
            let _ = tokio::time::timeout(PUSH_EVERY, done.changed()).await;
        }
    }
}
