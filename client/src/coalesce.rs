//! Calls of one kind sent together when they queue: a call that finds no request on its
//! way leaves at once, alone; those made while one request is out go in the next one,
//! together, each caller getting its own outcome. Under load one request carries many
//! calls instead of one request each (issue 24); a lone call pays nothing but a hop
//! through the loop's task. After a request the loop lets the callers it answered run
//! before it gathers the next one, so that callers who call again at once stay together.
//!
//! One request is out at a time, so calls leave in the order they were made. A request
//! carries at most [`Rules::items`] calls and [`Rules::bytes`] of body (a call bigger than
//! that goes alone). Two users: an executor's task reports ([`crate::report`]) and the
//! client's kv puts ([`crate::Client::kv_put`]).

use std::future::Future;

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::ClientError;

/// The most turns the loop yields, after a request, for the callers it answered to call
/// again (see `send_loop`).
const GATHER_TURNS: usize = 8;

pub(crate) type Outcome<O> = Result<O, ClientError>;

/// A request's items, and for each the callers waiting for its outcome.
pub(crate) type Grouped<T, O> = (Vec<T>, Vec<Vec<oneshot::Sender<Outcome<O>>>>);

/// How the calls gathered for a request become its items ([`Rules::group`]).
pub(crate) type Group<T, O> = fn(Vec<Queued<T, O>>) -> Grouped<T, O>;

pub(crate) struct Queued<T, O> {
    pub item: T,
    /// Its share of a request's body.
    pub bytes: usize,
    pub reply: oneshot::Sender<Outcome<O>>,
}

/// How the calls that queued become one request.
pub(crate) struct Rules<T, O> {
    /// The most calls one request carries.
    pub items: usize,
    /// The most body one request carries (unless one call alone is bigger).
    pub bytes: usize,
    /// Whether `item` may join the calls gathered so far (else it opens the next request).
    pub joins: fn(&[Queued<T, O>], &T) -> bool,
    /// The request's items, and for each the callers waiting for its outcome.
    pub group: Group<T, O>,
}

/// Each caller alone with its own item (the `group` of calls that never merge).
pub(crate) fn each_alone<T, O>(queued: Vec<Queued<T, O>>) -> Grouped<T, O> {
    queued.into_iter().map(|q| (q.item, vec![q.reply])).unzip()
}

/// The queue of one kind of call. Cloned, it feeds the same loop, which ends when every
/// clone is dropped (or with the runtime it was started on).
pub(crate) struct Coalescer<T, O> {
    queue: mpsc::UnboundedSender<Queued<T, O>>,
}

impl<T, O> Clone for Coalescer<T, O> {
    fn clone(&self) -> Self {
        Coalescer { queue: self.queue.clone() }
    }
}

impl<T: Send + 'static, O: Clone + Send + 'static> Coalescer<T, O> {
    /// Starts the loop that sends the queued calls through `send` (one request of items →
    /// their outcomes in order, or the request's own error for all of them).
    pub fn start<S, F>(rules: Rules<T, O>, send: S) -> Coalescer<T, O>
    where
        S: Fn(Vec<T>) -> F + Send + 'static,
        F: Future<Output = Result<Vec<Outcome<O>>, ClientError>> + Send + 'static,
    {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(send_loop(rx, rules, send));
        Coalescer { queue }
    }

    /// Queues `item` (`bytes` of body) for the next request; the item back when the loop
    /// is gone.
    pub fn submit(&self, item: T, bytes: usize) -> Result<oneshot::Receiver<Outcome<O>>, T> {
        let (reply, rx) = oneshot::channel();
        self.queue.send(Queued { item, bytes, reply }).map_err(|e| e.0.item)?;
        Ok(rx)
    }
}

async fn send_loop<T, O: Clone, S, F>(
    mut rx: mpsc::UnboundedReceiver<Queued<T, O>>,
    rules: Rules<T, O>,
    send: S,
) where
    S: Fn(Vec<T>) -> F,
    F: Future<Output = Result<Vec<Outcome<O>>, ClientError>>,
{
    let mut next: Option<Queued<T, O>> = None;
    loop {
        let first = match next.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut bytes = first.bytes;
        let mut queued = vec![first];
        while queued.len() < rules.items {
            let Ok(q) = rx.try_recv() else { break };
            if bytes + q.bytes > rules.bytes || !(rules.joins)(&queued, &q.item) {
                next = Some(q); // the first of the next request
                break;
            }
            bytes += q.bytes;
            queued.push(q);
        }
        let (items, waiting) = (rules.group)(queued);
        // A sender that panics fails its request's calls, not the loop.
        let sent = std::panic::AssertUnwindSafe(send(items)).catch_unwind().await;
        let failed = |e: ClientError| waiting.iter().map(|_| Err(e.clone())).collect::<Vec<_>>();
        let outcomes = match sent {
            Ok(Ok(outcomes)) if outcomes.len() == waiting.len() => outcomes,
            Ok(Ok(outcomes)) => failed(ClientError::Refused(format!(
                "{} outcomes for {} calls sent together",
                outcomes.len(),
                waiting.len()
            ))),
            Ok(Err(e)) => failed(e),
            Err(_) => failed(ClientError::Refused("sending the request failed (a panic)".into())),
        };
        for (replies, outcome) in waiting.into_iter().zip(outcomes) {
            for reply in replies {
                let _ = reply.send(outcome.clone());
            }
        }
        // The callers just answered are woken now, and a caller in a loop calls again at
        // once: let them run before the next request is gathered, so that their calls join
        // those that queued meanwhile — as long as calls keep coming (a few turns at most).
        // Without this the first caller back found the loop waiting and went alone, the
        // rest queued behind its request, and the load split into two groups taking turns,
        // each call waiting for a request of the other group before its own (issue 24: at
        // 64 writers, batches of 63 and 1 alternating).
        let mut queued = rx.len();
        for _ in 0..GATHER_TURNS {
            tokio::task::yield_now().await;
            if rx.len() == queued || rx.len() >= rules.items {
                break;
            }
            queued = rx.len();
        }
    }
}

/// The length of `item` as JSON (and a comma), counted as it is written out; `otherwise`
/// if it cannot be written.
pub(crate) fn json_len(item: &impl serde::Serialize, otherwise: usize) -> usize {
    let mut count = flotilla_store::count::ByteCount::default();
    serde_json::to_writer(&mut count, item).map_or(otherwise, |_| count.0 + 1)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    /// Callers in a loop, each calling again as soon as it is answered (the kv benchmark's
    /// writers), on a multi-threaded runtime (where a woken task runs next on its worker):
    /// once every caller is in, each request carries all of them — the load does not split
    /// into groups taking turns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_answered_together_call_again_together() {
        const CALLERS: usize = 16;
        const ROUNDS: usize = 40;
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let rules = Rules { items: 256, bytes: 1 << 20, joins: |_, _| true, group: each_alone };
        let recorded = sizes.clone();
        let queue: Coalescer<usize, ()> = Coalescer::start(rules, move |items: Vec<usize>| {
            recorded.lock().unwrap().push(items.len());
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(items.iter().map(|_| Ok(())).collect())
            }
        });
        let callers: Vec<_> = (0..CALLERS)
            .map(|c| {
                let queue = queue.clone();
                tokio::spawn(async move {
                    for _ in 0..ROUNDS {
                        queue.submit(c, 1).map_err(|_| "the loop is gone").unwrap().await.unwrap().unwrap();
                    }
                })
            })
            .collect();
        for c in callers {
            c.await.unwrap();
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), CALLERS * ROUNDS);
        // Split into two groups, the same calls would take about twice as many requests.
        let full = sizes.iter().filter(|&&n| n == CALLERS).count();
        assert!(
            full >= ROUNDS - 5,
            "requests of all {CALLERS} callers: {full} of {}: {sizes:?}",
            sizes.len()
        );
    }
}
