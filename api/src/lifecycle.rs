//! The run lifecycle routes: restarting a finished run
//! (`PUT /api/v1/runs/{id}/actions {"action":"restart"}`) and idempotent creation
//! (`POST /api/v1/runs` with an `Idempotency-Key` header).
//!
//! Both end in one Raft command (`RestartRun`, `CreateRunIdempotent`), so what they decide
//! is replicated: a client retrying after a failover, through any node, finds the run the
//! first attempt created.

use std::collections::BTreeMap;

use bytes::Bytes;
use flotilla_scheduler::now_ms;
use flotilla_store::command::validate_idempotency_key;
use flotilla_store::executor::{executor_task_id, task_levels};
use flotilla_store::ost::keys;
use flotilla_store::run::{Run, RunConfig, RunCreate, RunTask, TaskStatus};
use flotilla_store::{Command, Response};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::handler::{json, unexpected, write_at, Ctx, Reply, Request};

pub use flotilla_client::types::RestartRequest;

/// Header set on the answer to a create that found its idempotency key.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// `POST /api/v1/runs` with an `Idempotency-Key`: 201 with a new run, or 200 with the run
/// the key created within the last 24 h (as it is now) and `Idempotent-Replayed: true`;
/// 422 if the key came with another body.
pub(crate) async fn create_run_idempotent(
    ctx: &Ctx,
    req: &Request<'_>,
    key: &str,
) -> Result<Reply, ApiError> {
    validate_idempotency_key(key)?;
    // Strictly (objects only, as every body), then as a value for the body's hash.
    let create: RunCreate = req.json()?;
    let value: serde_json::Value = req.json()?;
    create.validate().map_err(|e| ApiError::bad_request(format!("invalid run: {e}")))?;
    let cmd = Command::CreateRunIdempotent {
        create: Box::new(create),
        now_ms: now_ms(),
        key: key.to_string(),
        body_sha256: json_sha256(&value),
    };
    let (index, response) = write_at(ctx, req.acted(cmd)).await?;
    let (run_id, replayed) = match response {
        Response::RunCreated { run_id } => (run_id, false),
        Response::RunReplayed { run_id } => (run_id, true),
        other => return Err(unexpected(other)),
    };
    ctx.node.wait_applied(index).await?;
    let run = current_run(ctx, &run_id).await?.ok_or_else(|| {
        ApiError::not_found(format!("run {run_id}, created with this Idempotency-Key, has been deleted"))
    })?;
    if !replayed {
        return Ok(json(201, &run));
    }
    let mut resp = warp::Reply::into_response(json(200, &run));
    resp.headers_mut().insert(REPLAYED_HEADER, warp::http::HeaderValue::from_static("true"));
    Ok(Reply::Raw(resp))
}

/// `PUT /api/v1/runs/{id}/actions {"action":"restart","from_start":bool,"environment":{..}}`:
/// 201 with a new run of the same configuration (`restarted_from` = `id`).
pub(crate) async fn restart(ctx: &Ctx, id: &str, req: &Request<'_>) -> Result<Reply, ApiError> {
    let body: RestartRequest = req.json()?;
    ctx.node.linearizable_barrier().await?;
    let (live, manifest) = {
        let sm = ctx.node.state.read();
        let live = sm.state.runs.get(id).cloned().zip(sm.state.run_configs.get(id).cloned());
        (live, sm.state.archive.clone())
    };
    // An archived run's configuration is read back from its archive data file.
    let (run, config) = match live {
        Some(found) => found,
        None => match ctx.archive.get(&manifest, id).await? {
            Some(a) => (a.run, a.config),
            None => return Err(ApiError::not_found(format!("run {id} not found"))),
        },
    };
    if !run.phase.is_final() {
        return Err(ApiError::conflict(format!(
            "run {id} is {}; only a finished, cancelled or setuperror run can be restarted",
            flotilla_store::run::phase_word(run.phase)
        )));
    }
    let mut create = config.clone();
    if let Some(environment) = body.environment {
        create.environment = environment;
    }
    create.validate().map_err(|e| ApiError::bad_request(format!("invalid run: {e}")))?;
    let keep = if body.from_start { BTreeMap::new() } else { kept_tasks(&run, &config) };
    let cmd = Command::RestartRun {
        create: Box::new(create),
        now_ms: now_ms(),
        restarted_from: id.to_string(),
        keep: keep.clone(),
        // The restarted event names who asked (the token's name; none without tokens).
        actor: req.caller.as_ref().map(|c| c.name.clone()),
    };
    let (index, response) = write_at(ctx, cmd).await?;
    let Response::RunCreated { run_id } = response else { return Err(unexpected(response)) };
    // The new run uses the kept tasks' logs and archives too: one reference object each,
    // so the GC keeps them until the last run using them is deleted.
    for (name, rt) in keep.iter().filter(|(_, rt)| rt.status == TaskStatus::Success) {
        let task_id = executor_task_id(rt.outputs_run(id), name);
        for kind in [keys::LOGS, keys::ARCHIVES] {
            ctx.ost.put_bytes(&keys::run_ref(kind, &task_id, &run_id), Bytes::new(), true).await?;
        }
    }
    ctx.node.wait_applied(index).await?;
    match current_run(ctx, &run_id).await? {
        Some(run) => Ok(json(201, &run)),
        None => {
            tracing::error!(run_id, "a restarted run is neither in the state nor in the archive");
            Err(ApiError::internal())
        }
    }
}

/// The tasks a restart keeps from `run`: those that succeeded or were skipped, and whose
/// parents are all kept too. A task below one that runs again runs again (its inputs may
/// change: a skipped deploy runs once the failed test it waited on succeeds). Each kept
/// task points at the run holding its outputs.
pub fn kept_tasks(run: &Run, config: &RunConfig) -> BTreeMap<String, RunTask> {
    let levels = task_levels(config);
    let mut order: Vec<_> = config.tasks.iter().collect();
    order.sort_by_key(|t| (levels.get(&t.name).copied().unwrap_or(0), t.name.clone()));
    let mut keep: BTreeMap<String, RunTask> = BTreeMap::new();
    for t in order {
        let Some(rt) = run.tasks.get(&t.name) else { continue };
        let done = matches!(rt.status, TaskStatus::Success | TaskStatus::Skipped);
        if done && t.depends.iter().all(|d| keep.contains_key(&d.task)) {
            let mut kept = rt.clone();
            kept.restored_from = Some(rt.outputs_run(&run.id).to_string());
            keep.insert(t.name.clone(), kept);
        }
    }
    keep
}

/// A run as it is now: from the state, else from the archive; `None` once deleted.
async fn current_run(ctx: &Ctx, run_id: &str) -> Result<Option<Run>, ApiError> {
    let manifest = {
        let sm = ctx.node.state.read();
        if let Some(run) = sm.state.runs.get(run_id) {
            return Ok(Some(run.clone()));
        }
        sm.state.archive.clone()
    };
    Ok(ctx.archive.get(&manifest, run_id).await?.map(|a| a.run))
}

/// SHA-256 (hex) of `v` as canonical JSON (object keys sorted at every level), so that two
/// bodies equal as JSON hash alike whatever their key order or spacing. The canonical text
/// is written straight into the hash, never held; a digest stored by an older node (24 h of
/// idempotency keys) is the same digest.
pub fn json_sha256(v: &serde_json::Value) -> String {
    /// The hash as a writer, for serde_json to write keys and scalars into.
    struct Hashing(Sha256);
    impl std::io::Write for Hashing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    fn entries<'a>(
        entries: impl Iterator<Item = (&'a String, &'a serde_json::Value)>,
        out: &mut Hashing,
    ) -> serde_json::Result<()> {
        out.0.update(b"{");
        for (i, (k, v)) in entries.enumerate() {
            if i > 0 {
                out.0.update(b",");
            }
            serde_json::to_writer(&mut *out, k)?;
            out.0.update(b":");
            canonical(v, out)?;
        }
        out.0.update(b"}");
        Ok(())
    }
    fn canonical(v: &serde_json::Value, out: &mut Hashing) -> serde_json::Result<()> {
        match v {
            // serde_json's map iterates in key order (unless its `preserve_order` feature
            // is on somewhere in the build): sorted only if it does not.
            serde_json::Value::Object(m) if m.keys().is_sorted() => entries(m.iter(), out),
            serde_json::Value::Object(m) => {
                let mut sorted: Vec<_> = m.iter().collect();
                sorted.sort_by(|a, b| a.0.cmp(b.0));
                entries(sorted.into_iter(), out)
            }
            serde_json::Value::Array(a) => {
                out.0.update(b"[");
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.0.update(b",");
                    }
                    canonical(v, out)?;
                }
                out.0.update(b"]");
                Ok(())
            }
            scalar => serde_json::to_writer(&mut *out, scalar),
        }
    }
    let mut hashing = Hashing(Sha256::new());
    canonical(v, &mut hashing).expect("writing into a hash cannot fail");
    hex::encode(hashing.0.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_store::run::{Depend, TaskConfig};

    #[test]
    fn bodies_equal_as_json_hash_alike() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"name":"r","tasks":[{"a":1,"b":[1,2]}]}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{ "tasks" : [ {"b":[1,2], "a":1} ], "name":"r" }"#).unwrap();
        let c: serde_json::Value =
            serde_json::from_str(r#"{"name":"r","tasks":[{"a":1,"b":[2,1]}]}"#).unwrap();
        assert_eq!(json_sha256(&a), json_sha256(&b));
        assert_ne!(json_sha256(&a), json_sha256(&c));
        assert_eq!(json_sha256(&a).len(), 64);
    }

    /// The digest is the SHA-256 of the canonical text (keys sorted, no spaces, serde_json's
    /// escapes and numbers), as every earlier version computed it — the reference below is
    /// the earlier code — so that a key stored before an upgrade still matches its retry.
    #[test]
    fn the_digest_is_that_of_the_canonical_text() {
        fn reference(v: &serde_json::Value, out: &mut String) {
            match v {
                serde_json::Value::Object(m) => {
                    let mut entries: Vec<_> = m.iter().collect();
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                    out.push('{');
                    for (i, (k, v)) in entries.into_iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(&serde_json::Value::String(k.clone()).to_string());
                        out.push(':');
                        reference(v, out);
                    }
                    out.push('}');
                }
                serde_json::Value::Array(a) => {
                    out.push('[');
                    for (i, v) in a.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        reference(v, out);
                    }
                    out.push(']');
                }
                other => out.push_str(&other.to_string()),
            }
        }
        let bodies = [
            r#"{"z":{"y":[1,-2.5,1e300,null,true,false,"\u00e9\"\n\u0001\ud83d\ude00"],"b":{}},"a":[],"é":"x","A":0}"#,
            r#"{"name":"r","group":"/g","tasks":[{"name":"t","image":"busybox","steps":[{"run":{"command":"true"}}]}]}"#,
            r#"[]"#,
            r#""s""#,
            r#"18446744073709551615"#,
        ];
        for body in bodies {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            let mut text = String::new();
            reference(&v, &mut text);
            assert_eq!(json_sha256(&v), hex::encode(Sha256::digest(text.as_bytes())), "{body}");
        }
        let v: serde_json::Value =
            serde_json::from_str(r#"{ "b" : [ 1, {"d":1,"c":"\n"} ], "a" : null }"#).unwrap();
        let text = r#"{"a":null,"b":[1,{"c":"\n","d":1}]}"#;
        assert_eq!(json_sha256(&v), hex::encode(Sha256::digest(text.as_bytes())));
    }

    #[test]
    fn a_restart_keeps_done_tasks_whose_parents_are_kept() {
        let dep = |t: &str| Depend { task: t.into(), conditions: vec![] };
        let mut config = RunCreate::new(
            "r",
            "/p",
            vec![
                TaskConfig::new("build", "i", "true"),
                TaskConfig::new("test", "i", "true"),
                TaskConfig::new("deploy", "i", "true"),
                TaskConfig::new("lint", "i", "true"),
            ],
        );
        config.tasks[1].depends = vec![dep("build")];
        config.tasks[2].depends = vec![dep("test")];
        let mut run = flotilla_store::run::new_run(&config, 7, 1, 1, 0);
        run.tasks.get_mut("build").unwrap().status = TaskStatus::Success;
        run.tasks.get_mut("test").unwrap().status = TaskStatus::Failed;
        run.tasks.get_mut("deploy").unwrap().status = TaskStatus::Skipped;
        run.tasks.get_mut("lint").unwrap().status = TaskStatus::Success;
        run.tasks.get_mut("lint").unwrap().restored_from = Some("0000000000000003".into());
        let keep = kept_tasks(&run, &config);
        assert_eq!(keep.keys().collect::<Vec<_>>(), ["build", "lint"]);
        assert_eq!(keep["build"].restored_from.as_deref(), Some(run.id.as_str()));
        assert_eq!(keep["lint"].restored_from.as_deref(), Some("0000000000000003"), "the run that ran it");
    }
}
