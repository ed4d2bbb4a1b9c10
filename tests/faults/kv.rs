//! The key/value workload and its linearizability check.
//!
//! Clients (outside the namespaces, each bound to one node) do put / get /
//! compare-and-swap / delete on a few keys. Every operation is recorded with its invoke
//! and completion time and its outcome: `ok` (the answer is known), `fail` (certainly not
//! applied: refused before the log, a 503 saying nothing was applied, connection refused)
//! or `unknown` (timeout, lost connection, a 503 saying it may have been applied). Unknown
//! operations are kept, never dropped: they complete "at infinity", so the checker may
//! place them anywhere after their invocation, including "never happened" (at the end).
//!
//! The checker is porcupine-rs (a port of Anish Athalye's porcupine, the WGL search with
//! a state cache). This file only supplies the model: a register per key that holds a
//! value and the revision of the entry that wrote it (revisions are Raft log indexes,
//! shared by the writes of one batched entry, so they never decrease).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use porcupine_rs::{CheckResult, Model, Operation};
use serde::{Deserialize, Serialize};

use crate::nodes::{url, REQUEST_TIMEOUT_MS, TOKEN};
use crate::Rng;

/// How long a client waits for any answer: the servers' request timeout plus slack for a
/// loaded machine. No answer by then is a hung request (the servers must answer 503).
pub const CLIENT_TIMEOUT_MS: u64 = REQUEST_TIMEOUT_MS + 4000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Fail,
    Unknown,
}

/// What a client asked and what it saw.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum KvOp {
    /// `revision`: the answer (None when unknown).
    Put { value: String, revision: Option<u64> },
    /// `prev`: the revision compared with (0 = absent). `revision`: the new one when it
    /// won; `won`: None when unknown.
    Cas { prev: u64, value: String, won: Option<bool>, revision: Option<u64> },
    /// `found`: None when the key was absent.
    Get { found: Option<(String, u64)> },
    /// `existed`: Some(true) 204, Some(false) 404, None unknown.
    Delete { existed: Option<bool> },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub client: u32,
    pub node: u64,
    pub key: String,
    pub invoke_us: i64,
    pub complete_us: i64,
    pub outcome: Outcome,
    pub op: KvOp,
    /// The server's message or the transport error (for failed and unknown operations).
    pub detail: Option<String>,
}

/// State of one key: absent, or its value and the revision of its last write (None after
/// a write whose answer was lost: the revision is learnt from the next read).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Register(Option<(String, Option<u64>)>);

#[derive(Clone, Debug)]
pub struct KvModel;

impl Model for KvModel {
    type State = Register;
    type Op = KvOp;
    type Metadata = ();

    fn init() -> Register {
        Register(None)
    }

    fn step(state: &Register, op: &KvOp) -> (bool, Register) {
        let current_rev = state.0.as_ref().map(|(_, r)| *r);
        match op {
            KvOp::Put { value, revision } => {
                // Revisions never go back.
                let monotonic = match (current_rev.flatten(), revision) {
                    (Some(old), Some(new)) => *new >= old,
                    _ => true,
                };
                (monotonic, Register(Some((value.clone(), *revision))))
            }
            KvOp::Get { found: None } => (state.0.is_none(), state.clone()),
            KvOp::Get { found: Some((v, r)) } => match &state.0 {
                Some((sv, Some(sr))) => (sv == v && sr == r, state.clone()),
                // A lost answer's revision is learnt here.
                Some((sv, None)) => (sv == v, Register(Some((v.clone(), Some(*r))))),
                None => (false, state.clone()),
            },
            KvOp::Cas { prev, value, won, revision } => {
                let matches = match &state.0 {
                    None => Some(*prev == 0),
                    Some((_, Some(r))) => Some(r == prev),
                    // Unknown revision: cannot tell; accept what was observed.
                    Some((_, None)) => None,
                };
                let after_win = Register(Some((value.clone(), *revision)));
                match (won, matches) {
                    (Some(true), Some(m)) => (m, after_win),
                    (Some(true), None) => (true, after_win),
                    (Some(false), Some(m)) => (!m, state.clone()),
                    (Some(false), None) => (true, state.clone()),
                    (None, Some(true)) => (true, after_win),
                    (None, _) => (true, state.clone()),
                }
            }
            KvOp::Delete { existed: Some(true) } => (state.0.is_some(), Register(None)),
            KvOp::Delete { existed: Some(false) } => (state.0.is_none(), state.clone()),
            KvOp::Delete { existed: None } => (true, Register(None)),
        }
    }
}

pub type History = Arc<Mutex<Vec<Record>>>;

/// One client: sequential operations on `keys` through node `node` until `stop`.
pub async fn client(
    client: u32,
    node: u64,
    keys: Vec<String>,
    seed: u64,
    start: Instant,
    history: History,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(1000))
        .timeout(Duration::from_millis(CLIENT_TIMEOUT_MS))
        .build()
        .unwrap();
    let mut rng = Rng::new(seed);
    let base = format!("{}/api/v1/kv", url(node));
    // The last (value, revision) this client read per key: its CASes compare with it.
    let mut seen: std::collections::BTreeMap<String, u64> = Default::default();
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let key = keys[rng.below(keys.len() as u64) as usize].clone();
        let value = format!("c{client}-{n}");
        let dice = rng.below(100);
        let invoke = start.elapsed().as_micros() as i64;
        let (outcome, op, detail) = if dice < 40 {
            let r = http.get(format!("{base}/{key}")).bearer_auth(TOKEN).send().await;
            match answer(r).await {
                Answer::Status(200, body) => {
                    let item: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let (v, rev) = (
                        item["value"].as_str().unwrap_or("").to_string(),
                        item["revision"].as_u64().unwrap_or(0),
                    );
                    seen.insert(key.clone(), rev);
                    (Outcome::Ok, KvOp::Get { found: Some((v, rev)) }, None)
                }
                Answer::Status(404, _) => {
                    seen.insert(key.clone(), 0);
                    (Outcome::Ok, KvOp::Get { found: None }, None)
                }
                a => (a.outcome(), KvOp::Get { found: None }, Some(a.detail())),
            }
        } else if dice < 90 {
            let prev = if dice < 65 { None } else { Some(*seen.get(&key).unwrap_or(&0)) };
            let q = prev.map_or(String::new(), |p| format!("?prev_revision={p}"));
            let r = http
                .put(format!("{base}/{key}{q}"))
                .bearer_auth(TOKEN)
                .json(&serde_json::json!({"value": value}))
                .send()
                .await;
            let a = answer(r).await;
            let revision = match &a {
                Answer::Status(200 | 201, body) => {
                    serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v["revision"].as_u64())
                }
                _ => None,
            };
            match (prev, a) {
                (None, Answer::Status(200 | 201, _)) => (Outcome::Ok, KvOp::Put { value, revision }, None),
                (None, a) => (a.outcome(), KvOp::Put { value, revision: None }, Some(a.detail())),
                (Some(prev), Answer::Status(200 | 201, _)) => {
                    (Outcome::Ok, KvOp::Cas { prev, value, won: Some(true), revision }, None)
                }
                (Some(prev), Answer::Status(409, body)) => {
                    (Outcome::Ok, KvOp::Cas { prev, value, won: Some(false), revision: None }, Some(body))
                }
                (Some(prev), a) => {
                    (a.outcome(), KvOp::Cas { prev, value, won: None, revision: None }, Some(a.detail()))
                }
            }
        } else {
            let r = http.delete(format!("{base}/{key}")).bearer_auth(TOKEN).send().await;
            match answer(r).await {
                Answer::Status(204, _) => (Outcome::Ok, KvOp::Delete { existed: Some(true) }, None),
                Answer::Status(404, _) => (Outcome::Ok, KvOp::Delete { existed: Some(false) }, None),
                a => (a.outcome(), KvOp::Delete { existed: None }, Some(a.detail())),
            }
        };
        let complete = start.elapsed().as_micros() as i64;
        history.lock().unwrap().push(Record {
            client,
            node,
            key,
            invoke_us: invoke,
            complete_us: complete,
            outcome,
            op,
            detail,
        });
        tokio::time::sleep(Duration::from_millis(5 + rng.below(20))).await;
    }
}

enum Answer {
    Status(u16, String),
    /// Certainly never reached the server.
    Refused(String),
    /// May have reached it.
    Lost(String),
}

impl Answer {
    fn outcome(&self) -> Outcome {
        match self {
            Answer::Status(503, body) if body.contains("may or may not") => Outcome::Unknown,
            Answer::Status(s, _) if *s >= 500 && *s != 503 => Outcome::Unknown,
            Answer::Status(..) | Answer::Refused(_) => Outcome::Fail,
            Answer::Lost(_) => Outcome::Unknown,
        }
    }
    fn detail(&self) -> String {
        match self {
            Answer::Status(s, b) => format!("HTTP {s}: {b}"),
            Answer::Refused(e) | Answer::Lost(e) => e.clone(),
        }
    }
}

async fn answer(r: reqwest::Result<reqwest::Response>) -> Answer {
    match r {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.text().await {
                Ok(body) => Answer::Status(status, body),
                Err(e) => Answer::Lost(format!("reading the answer: {e}")),
            }
        }
        Err(e) if e.is_connect() => Answer::Refused(format!("connect: {e}")),
        Err(e) => Answer::Lost(format!("{e}{}", if e.is_timeout() { " (timeout)" } else { "" })),
    }
}

/// The verdict on one key's history.
pub struct KeyVerdict {
    pub key: String,
    pub result: CheckResult,
    pub ops: usize,
    /// For a violation: the longest linearizable prefix found and the operations that
    /// could not follow it, as text.
    pub explanation: Option<String>,
}

/// Checks every key's history (failed operations are left out: they did not happen; a
/// failed read tells nothing either).
pub fn check(history: &[Record], timeout: Duration, html_dir: &std::path::Path) -> Vec<KeyVerdict> {
    let mut keys: Vec<&str> = history.iter().map(|r| r.key.as_str()).collect();
    keys.sort();
    keys.dedup();
    let end = history.iter().map(|r| r.complete_us).max().unwrap_or(0) + 1;
    let mut out = Vec::new();
    for key in keys {
        let recs: Vec<&Record> = history
            .iter()
            .filter(|r| r.key == key && r.outcome != Outcome::Fail)
            .filter(|r| !(r.outcome == Outcome::Unknown && matches!(r.op, KvOp::Get { .. })))
            .collect();
        let ops: Vec<Operation<KvModel>> = recs
            .iter()
            .map(|r| Operation {
                client_id: Some(r.client),
                call_time: r.invoke_us,
                return_time: if r.outcome == Outcome::Unknown { end } else { r.complete_us },
                op: r.op.clone(),
                metadata: None,
            })
            .collect();
        let (result, info) = porcupine_rs::check_operations_info_timeout::<KvModel>(&ops, timeout);
        let explanation = (result == CheckResult::Illegal).then(|| {
            let _ = porcupine_rs::visualize_path::<KvModel>(&info, &html_dir.join(format!("{key}.html")));
            explain(&recs, &info)
        });
        out.push(KeyVerdict { key: key.to_string(), result, ops: ops.len(), explanation });
    }
    out
}

/// The end of the longest linearizable prefix and the operations pending right after it:
/// the smallest window of the history where no order works.
fn explain(recs: &[&Record], info: &porcupine_rs::LinearizationInfo<KvModel>) -> String {
    let longest: Vec<usize> =
        info.partial_linearizations.iter().flatten().max_by_key(|s| s.len()).cloned().unwrap_or_default();
    let mut text = format!(
        "longest linearizable prefix: {} of {} operations; its last ones:\n",
        longest.len(),
        recs.len()
    );
    for &i in longest.iter().rev().take(6).collect::<Vec<_>>().iter().rev() {
        text += &format!("  {}\n", line(recs[*i]));
    }
    let placed: std::collections::BTreeSet<usize> = longest.iter().copied().collect();
    let frontier = longest.last().map_or(0, |&i| recs[i].invoke_us);
    let mut pending: Vec<&&Record> = recs
        .iter()
        .enumerate()
        .filter(|(i, r)| !placed.contains(i) && r.complete_us >= frontier)
        .map(|(_, r)| r)
        .collect();
    pending.sort_by_key(|r| r.invoke_us);
    text += "none of these could come next:\n";
    for r in pending.iter().take(8) {
        text += &format!("  {}\n", line(r));
    }
    text
}

fn line(r: &Record) -> String {
    format!(
        "[{:>9.3}s..{:>9.3}s] client {} via node {} {:?} {}",
        r.invoke_us as f64 / 1e6,
        r.complete_us as f64 / 1e6,
        r.client,
        r.node,
        r.outcome,
        serde_json::to_string(&r.op).unwrap_or_default()
    )
}
