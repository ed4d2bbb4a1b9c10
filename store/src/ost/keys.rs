//! Where each kind of object lives (logs, workspace archives, caches, the run archive and
//! the references that let the garbage collector tell what is in use): every key is built
//! here, nowhere else.
//!
//! - `logs/<executor task id>/<step>.log` (`setup.log` for the setup step)
//! - `workspacearchives/<executor task id>/<step>.tar`
//! - `logs/<task id>/runs/<run id>`, `workspacearchives/<task id>/runs/<run id>`: empty
//!   reference objects, one per run using the logs or archives; the data is garbage once
//!   no reference is left.
//! - `caches/<cache group without the leading />/<key>.tar`

use super::{validate_key, OstError};
use crate::limits::MAX_EVALUATED_CACHE_KEY_BYTES;

pub const LOGS: &str = "logs";
pub const ARCHIVES: &str = "workspacearchives";
pub const CACHES: &str = "caches";

/// Which log of a task.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LogStep {
    Setup,
    Step(usize),
    /// The whole output of a service container of the task's pod, by name.
    Container(String),
}

/// How a container's log is named where a step number could be: `container-<name>`.
pub const CONTAINER_LOG_PREFIX: &str = "container-";

impl LogStep {
    /// `setup`, the step number, or `container-<name>`.
    pub fn parse(s: &str) -> Option<LogStep> {
        match s {
            "setup" => Some(LogStep::Setup),
            n => match n.strip_prefix(CONTAINER_LOG_PREFIX) {
                Some(name) => crate::pod::validate_hostname("container", name)
                    .ok()
                    .map(|_| LogStep::Container(name.to_string())),
                None => n.parse().ok().map(LogStep::Step),
            },
        }
    }
}

impl std::fmt::Display for LogStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogStep::Setup => f.write_str("setup"),
            LogStep::Step(n) => write!(f, "{n}"),
            LogStep::Container(name) => write!(f, "{CONTAINER_LOG_PREFIX}{name}"),
        }
    }
}

pub fn log(task_id: &str, step: LogStep) -> String {
    format!("{LOGS}/{task_id}/{step}.log")
}

pub fn archive(task_id: &str, step: usize) -> String {
    format!("{ARCHIVES}/{task_id}/{step}.tar")
}

/// The reference object saying run `run_id` uses the logs or archives (`kind` is
/// [`LOGS`] or [`ARCHIVES`]) of `task_id`.
pub fn run_ref(kind: &str, task_id: &str, run_id: &str) -> String {
    format!("{kind}/{task_id}/runs/{run_id}")
}

/// Checks a cache key: one path segment (no `/`), at most 200 bytes, valid as a key.
pub fn validate_cache_key(key: &str) -> Result<(), OstError> {
    let bad = |reason| Err(OstError::InvalidKey { key: key.to_string(), reason });
    if key.contains('/') {
        return bad("a cache key cannot contain '/'");
    }
    if key.len() > MAX_EVALUATED_CACHE_KEY_BYTES {
        return bad("a cache key is at most 200 bytes");
    }
    validate_key(key)
}

/// The prefix holding the caches of `group` (a path like `/project/42`).
pub fn cache_dir(group: &str) -> Result<String, OstError> {
    let trimmed = group.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(format!("{CACHES}/"));
    }
    validate_key(trimmed)?;
    Ok(format!("{CACHES}/{trimmed}/"))
}

pub fn cache(group: &str, key: &str) -> Result<String, OstError> {
    validate_cache_key(key)?;
    Ok(format!("{}{key}.tar", cache_dir(group)?))
}

/// The cache key an object key under `cache_dir(group)` holds, if any.
pub fn cache_key_of<'a>(dir: &str, object: &'a str) -> Option<&'a str> {
    object.strip_prefix(dir)?.strip_suffix(".tar").filter(|k| !k.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(log("0000000000000001.build", LogStep::Setup), "logs/0000000000000001.build/setup.log");
        assert_eq!(log("1.b", LogStep::Step(2)), "logs/1.b/2.log");
        assert_eq!(archive("1.b", 0), "workspacearchives/1.b/0.tar");
        assert_eq!(run_ref(LOGS, "1.b", "1"), "logs/1.b/runs/1");
        assert_eq!(cache("/project/42", "deps-abc").unwrap(), "caches/project/42/deps-abc.tar");
        assert_eq!(cache("/", "k").unwrap(), "caches/k.tar");
        assert!(cache("/p/../q", "k").is_err());
        assert!(cache("/p", "a/b").is_err());
        assert!(cache("/p", "..").is_err());
        assert_eq!(cache_key_of("caches/p/", "caches/p/deps-1.tar"), Some("deps-1"));
        assert_eq!(cache_key_of("caches/p/", "caches/p/sub/x.tar"), None);
        assert_eq!(LogStep::parse("setup"), Some(LogStep::Setup));
        assert_eq!(LogStep::parse("3"), Some(LogStep::Step(3)));
        assert_eq!(LogStep::parse("x"), None);
        assert_eq!(LogStep::parse("container-db"), Some(LogStep::Container("db".into())));
        assert_eq!(LogStep::parse("container-../x"), None);
        assert_eq!(log("1.b", LogStep::Container("db".into())), "logs/1.b/container-db.log");
    }
}
