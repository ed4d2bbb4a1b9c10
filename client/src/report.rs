//! An executor's task status reports, sent together when they queue: a report that finds
//! none on its way leaves at once, alone; those that arrive while one request is out go in
//! the next request, together (`PUT /api/v1/executor/{id}/tasks`, at most
//! [`MAX_TASK_REPORTS`]). Under load, one request carries many reports instead of one
//! request each (issue 24: the executors' reports were a request per task transition).
//!
//! One request is out at a time, so reports leave in the order they were made; two reports
//! of one task that queue together go as the newer one (a report is the task's whole
//! status), and both callers get its outcome. Each caller gets its own report's outcome, as
//! the report alone would have been answered. A request stays under [`BATCH_BYTES`] of
//! JSON (a report bigger than that goes alone), so it never meets the server's body limits.

use std::collections::HashMap;
use std::future::Future;

use crate::coalesce::{json_len, Coalescer, Grouped, Queued, Rules};
use crate::types::{ExecutorTaskStatus, TaskReport, MAX_TASK_REPORTS};
use crate::ClientError;

/// The JSON one request of reports carries at most (unless one report alone is bigger):
/// under the size from which a server makes a body wait for a large-body permit
/// (`flotilla_store::limits::LARGE_BODY_BYTES`), far under its API body limit.
pub const BATCH_BYTES: usize = 60 * 1024;

type Outcome = Result<(), ClientError>;

/// Sends an executor's reports through `send` (one request of reports → their outcomes in
/// order, or the request's own error for all of them). Cloned, it feeds the same queue; the
/// loop ends when every clone is dropped.
#[derive(Clone)]
pub struct Reporter {
    queue: Coalescer<TaskReport, ()>,
}

impl Reporter {
    pub fn start<S, F>(send: S) -> Reporter
    where
        S: Fn(Vec<TaskReport>) -> F + Send + 'static,
        F: Future<Output = Result<Vec<Outcome>, ClientError>> + Send + 'static,
    {
        let rules =
            Rules { items: MAX_TASK_REPORTS, bytes: BATCH_BYTES, joins: |_, _| true, group: together };
        Reporter { queue: Coalescer::start(rules, send) }
    }

    /// Reports `status` of task `id` and waits for its outcome.
    pub async fn report(&self, id: &str, status: &ExecutorTaskStatus) -> Outcome {
        let report = TaskReport { id: id.to_string(), status: status.clone() };
        let bytes = json_len(&report, BATCH_BYTES);
        let gone = || ClientError::Refused("the executor's reporter has stopped".into());
        let rx = self.queue.submit(report, bytes).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// The reports to send, one per task (the newest of each, where the oldest stood), and
/// for each the callers waiting for its outcome.
fn together(queued: Vec<Queued<TaskReport, ()>>) -> Grouped<TaskReport, ()> {
    let mut at: HashMap<String, usize> = HashMap::new();
    let (mut reports, mut waiting): (Vec<TaskReport>, Vec<Vec<_>>) = (Vec::new(), Vec::new());
    for Queued { item: report, reply, .. } in queued {
        match at.get(&report.id) {
            Some(&i) => {
                reports[i] = report;
                waiting[i].push(reply);
            }
            None => {
                at.insert(report.id.clone(), reports.len());
                reports.push(report);
                waiting.push(vec![reply]);
            }
        }
    }
    (reports, waiting)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use flotilla_store::run::Phase;

    use super::*;

    fn status(phase: Phase) -> ExecutorTaskStatus {
        ExecutorTaskStatus { phase, ..ExecutorTaskStatus::new(1) }
    }

    type Requests = Arc<Mutex<Vec<Vec<TaskReport>>>>;

    /// A reporter over a fake server (pure logic: the queue's rules) that records each
    /// request, holds the first one until `release` turns true, and refuses task "gone"
    /// with a 404.
    fn held_reporter() -> (Reporter, Requests, tokio::sync::watch::Sender<bool>) {
        let sent: Requests = Arc::default();
        let (release, held) = tokio::sync::watch::channel(false);
        let recorded = sent.clone();
        let reporter = Reporter::start(move |reports: Vec<TaskReport>| {
            let (sent, mut held) = (recorded.clone(), held.clone());
            async move {
                let first = {
                    let mut sent = sent.lock().unwrap();
                    sent.push(reports.clone());
                    sent.len() == 1
                };
                if first {
                    held.wait_for(|r| *r).await.unwrap();
                }
                Ok(reports
                    .iter()
                    .map(|r| match r.id.as_str() {
                        "gone" => Err(ClientError::Api {
                            status: 404,
                            code: "not_found".into(),
                            message: "gone".into(),
                        }),
                        _ => Ok(()),
                    })
                    .collect())
            }
        });
        (reporter, sent, release)
    }

    #[tokio::test]
    async fn reports_that_queue_go_together_in_order_each_caller_gets_its_own_outcome() {
        let (reporter, sent, release) = held_reporter();
        let report = |id: &'static str, phase| {
            let reporter = reporter.clone();
            tokio::spawn(async move { reporter.report(id, &status(phase)).await })
        };
        let alone = report("a", Phase::Running);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // While the first request is out: b twice (the newer one goes), a gone task, c.
        let queued = vec![
            report("b", Phase::Running),
            report("gone", Phase::Running),
            report("b", Phase::Success),
            report("c", Phase::Failed),
        ];
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.send(true).unwrap();
        assert!(alone.await.unwrap().is_ok());
        let outcomes: Vec<Outcome> =
            futures::future::join_all(queued).await.into_iter().map(|r| r.unwrap()).collect();
        assert!(outcomes[0].is_ok() && outcomes[2].is_ok() && outcomes[3].is_ok(), "{outcomes:?}");
        assert!(matches!(outcomes[1], Err(ClientError::Api { status: 404, .. })), "{outcomes:?}");
        let sent = sent.lock().unwrap().clone();
        let shape: Vec<Vec<(&str, Phase)>> =
            sent.iter().map(|r| r.iter().map(|r| (r.id.as_str(), r.status.phase)).collect()).collect();
        assert_eq!(
            shape,
            vec![
                vec![("a", Phase::Running)],
                vec![("b", Phase::Success), ("gone", Phase::Running), ("c", Phase::Failed)],
            ]
        );
    }

    /// Big reports (long errors) are sent in requests of at most [`BATCH_BYTES`], in order.
    #[tokio::test]
    async fn requests_stay_under_the_byte_budget() {
        let (reporter, sent, release) = held_reporter();
        let big = ExecutorTaskStatus { error: Some("e".repeat(20_000)), ..status(Phase::Failed) };
        let report = |id: String| {
            let (reporter, big) = (reporter.clone(), big.clone());
            tokio::spawn(async move { reporter.report(&id, &big).await })
        };
        let first = report("first".into());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued: Vec<_> = (0..10).map(|i| report(format!("t{i}"))).collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.send(true).unwrap();
        first.await.unwrap().unwrap();
        for q in queued {
            q.await.unwrap().unwrap();
        }
        let sent = sent.lock().unwrap().clone();
        assert!(sent.len() >= 4, "10 reports of 20 KB in requests of at most 60 KB: {}", sent.len());
        for reports in &sent {
            let bytes =
                serde_json::to_vec(&crate::types::TaskReports { reports: reports.clone() }).unwrap().len();
            assert!(bytes <= BATCH_BYTES + 64, "a request of {bytes} bytes");
        }
        let order: Vec<&str> = sent.iter().flatten().map(|r| r.id.as_str()).collect();
        let expected: Vec<String> =
            std::iter::once("first".to_string()).chain((0..10).map(|i| format!("t{i}"))).collect();
        assert_eq!(order, expected);
    }

    #[tokio::test]
    async fn a_sender_that_panics_fails_its_request_and_the_reporter_goes_on() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reporter = {
            let calls = calls.clone();
            Reporter::start(move |reports: Vec<TaskReport>| {
                let calls = calls.clone();
                async move {
                    if calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                        panic!("the first request's sender panics");
                    }
                    Ok(reports.iter().map(|_| Ok(())).collect())
                }
            })
        };
        let r = reporter.report("a", &status(Phase::Running)).await;
        assert!(matches!(r, Err(ClientError::Refused(_))), "{r:?}");
        reporter.report("a", &status(Phase::Success)).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_request_is_every_report_s_outcome() {
        let reporter = Reporter::start(|_reports: Vec<TaskReport>| async {
            Err(ClientError::Transport { url: "u".into(), message: "refused".into() })
        });
        let r = reporter.report("a", &status(Phase::Running)).await;
        assert!(matches!(r, Err(ClientError::Transport { .. })), "{r:?}");
    }
}
