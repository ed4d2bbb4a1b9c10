//! `flotilla run wait`: follow a run until it ends, through failovers.
//!
//! The exit code must say what happened to the *run*, never what happened to one request:
//! a 503 while the cluster elects a leader, or a node killed under the connection, is
//! retried (on the next server given) until `--timeout-s`. Only an answer that refuses the
//! request itself (an unknown run, a bad token: a 4xx other than 503) ends it with exit 1.

use std::time::{Duration, Instant};

use flotilla_api::types::Run;
use flotilla_api::{Client, ClientError};
use flotilla_store::limits::{CLIENT_RETRY_BACKOFF_MS, WAIT_UNREACHABLE_GIVE_UP_MS};
use flotilla_store::run::TaskStatus;

use crate::run_cmd::word;
use crate::Failure;

/// Follows the event stream until the run is final, re-reading the run after every
/// (re)connection so nothing between two streams is missed; moves to the next server on
/// a transport error or 503.
pub async fn wait(c: &Client, id: &str, timeout_s: u64) -> Result<Run, Failure> {
    let start = Instant::now();
    let deadline = (timeout_s > 0).then(|| start + Duration::from_secs(timeout_s));
    let servers = c.servers().to_vec();
    let mut server = 0usize;
    // Since when no server has answered (None: the last attempt reached one).
    let mut unreachable_since: Option<Instant> = None;
    let mut last_error = String::new();
    loop {
        let remaining = match deadline {
            Some(d) => d.checked_duration_since(Instant::now()).ok_or_else(|| {
                Failure::Timeout(format!(
                    "run {id} did not end within {timeout_s} s{}",
                    last_seen(&last_error)
                ))
            })?,
            None => Duration::from_secs(24 * 60 * 60),
        };
        let client = c.at(&servers[server % servers.len()]);
        let mut reached = false;
        let step = follow(&client, id, &mut reached);
        let outcome = tokio::time::timeout(remaining, step).await;
        match outcome {
            Ok(Ok(Some(run))) => return Ok(run),
            Ok(Ok(None)) => {
                // The stream ended (the node went away politely): reconnect.
                unreachable_since = None;
                tokio::time::sleep(Duration::from_millis(CLIENT_RETRY_BACKOFF_MS * 2)).await;
            }
            Ok(Err(e)) if !e.is_retryable() => return Err(e.into()),
            Ok(Err(e)) => {
                last_error = e.to_string();
                eprintln!("(waiting for run {id}: {e}; retrying)");
                if reached {
                    unreachable_since = None;
                } else {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if deadline.is_none()
                        && since.elapsed() >= Duration::from_millis(WAIT_UNREACHABLE_GIVE_UP_MS)
                    {
                        return Err(Failure::Timeout(format!(
                            "no server answered for {} s; last error: {last_error}",
                            WAIT_UNREACHABLE_GIVE_UP_MS / 1000
                        )));
                    }
                }
                server += 1;
                // A full pass over the servers without an answer waits a little longer.
                let pause = if server.is_multiple_of(servers.len()) { 4 } else { 1 };
                tokio::time::sleep(Duration::from_millis(CLIENT_RETRY_BACKOFF_MS * pause)).await;
            }
            Err(_) => {
                return Err(Failure::Timeout(format!(
                    "run {id} did not end within {timeout_s} s{}",
                    last_seen(&last_error)
                )))
            }
        }
    }
}

fn last_seen(last_error: &str) -> String {
    if last_error.is_empty() {
        String::new()
    } else {
        format!(" (last error: {last_error})")
    }
}

/// One connection's worth of waiting: the run if it is (or becomes) final, `None` if the
/// stream ended first. `reached` turns true once the server answered anything.
async fn follow(c: &Client, id: &str, reached: &mut bool) -> Result<Option<Run>, ClientError> {
    let run = c.run_get(id).await?;
    *reached = true;
    if run.phase.is_final() {
        return Ok(Some(run));
    }
    // Subscribe, then read again: an end between the two reads is seen either way.
    let mut events = c.events(Some(&run.group)).await?;
    let run = c.run_get(id).await?;
    if run.phase.is_final() {
        return Ok(Some(run));
    }
    while let Some(e) = events.next().await? {
        if e.run_id == id && e.phase.is_final() {
            return Ok(Some(c.run_get(id).await?));
        }
    }
    Ok(None)
}

/// Says on stderr why a run did not succeed: its setup errors, and for each failed task
/// the failing step (number, name when it has one, exit code) or the task's error.
pub fn explain_failure(run: &Run) {
    eprintln!("run {} ended {} with result {}", run.id, word(&run.phase), word(&run.result));
    for e in &run.setup_errors {
        eprintln!("  setup error: {e}");
    }
    for (name, t) in &run.tasks {
        if !matches!(t.status, TaskStatus::Failed | TaskStatus::Stopped) {
            continue;
        }
        let mut line = format!("  task {name} {}", word(&t.status));
        match crate::run_view::ended_at(t) {
            crate::run_view::EndedAt::Setup => line.push_str(" in its setup step"),
            crate::run_view::EndedAt::Step { index, exit_code } => {
                line.push_str(&format!(" at step {index}"));
                if let Some(code) = exit_code {
                    line.push_str(&format!(" (exit code {code})"));
                }
            }
            crate::run_view::EndedAt::Elsewhere => {}
        }
        if let Some(e) = &t.error {
            line.push_str(&format!(": {e}"));
        }
        eprintln!("{line}");
    }
}
