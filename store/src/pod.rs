//! Task pods (Agola's RunConfigTask containers): the containers a task runs in, the
//! registry credentials its images are pulled with, and the checks a submission of them
//! must pass.
//!
//! Container 0 runs the steps (the executor keeps it alive; its entrypoint and command
//! are not run); the others are *services* started before the first step in container 0's
//! network namespace, reachable from the steps as `localhost` and by their name. The old
//! task-level `image`/`privileged` stay valid as a one-container shorthand ([`pod_of`]).
//!
//! Registry credentials are secrets: their `Debug` never shows them, [`redact_auths`]
//! replaces them by `"***"` for any answer, and they reach an executor only inside the
//! regenerated `spec.data` of its own task.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::*;
use crate::run::{StringMap, TaskConfig};

/// Name of container 0 when the submission gives it none.
pub const MAIN_CONTAINER: &str = "main";
/// What a secret is shown as in every answer.
pub const REDACTED: &str = "***";

/// One container of a task's pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ContainerConfig {
    /// Required for services; container 0 is `main` unless named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub image: String,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// `uid[:gid]` or a user name; the image's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default)]
    pub privileged: bool,
    /// Replaces the image's ENTRYPOINT (services only: container 0 runs the steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's CMD (services only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Absolute path in the container.
    pub path: String,
    /// So far the only kind of volume: a tmpfs (mode 1777).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs: Option<Tmpfs>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Tmpfs {
    /// Bytes, or a number with `Ki`/`Mi`/`Gi`; Docker's default (half the RAM) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Size>,
}

/// A size as written: `1048576` or `"64Mi"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    /// The size in bytes, or why it cannot be read.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(t) => parse_size(t),
        }
    }
}

/// `"123"`, `"64Ki"`, `"64Mi"`, `"2Gi"` (also `K`/`M`/`G`, powers of 1024 all the same).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let shift = match unit {
        "" | "B" => 0,
        "Ki" | "K" | "k" | "KiB" => 10,
        "Mi" | "M" | "m" | "MiB" => 20,
        "Gi" | "G" | "g" | "GiB" => 30,
        _ => return Err(format!("{text:?} is not a size (bytes, or a number with Ki, Mi or Gi)")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (bytes, or a number with Ki, Mi or Gi)"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

/// Credentials for one registry (`docker_registries_auth`, keyed by registry host).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    /// `basic` (username and password) or `encodedauth` (auth: base64 of `user:password`).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("auth", &self.auth.as_ref().map(|_| REDACTED))
            .finish()
    }
}

impl RegistryAuth {
    /// The same entry with its secrets replaced by `"***"`.
    pub fn redacted(&self) -> RegistryAuth {
        RegistryAuth {
            kind: self.kind.clone(),
            username: self.username.clone(),
            password: self.password.as_ref().map(|_| REDACTED.into()),
            auth: self.auth.as_ref().map(|_| REDACTED.into()),
        }
    }
}

pub type RegistriesAuth = BTreeMap<String, RegistryAuth>;

/// Every entry of `auths` with its secrets replaced by `"***"`.
pub fn redact_auths(auths: &RegistriesAuth) -> RegistriesAuth {
    auths.iter().map(|(k, v)| (k.clone(), v.redacted())).collect()
}

/// Replaces every registry credential of a run's configuration (run and tasks) by
/// `"***"`: for an export, or a run archived (an ended run needs no more pulls).
pub fn redact_config(config: &mut crate::run::RunCreate) {
    config.docker_registries_auth = redact_auths(&config.docker_registries_auth);
    for t in &mut config.tasks {
        t.docker_registries_auth = redact_auths(&t.docker_registries_auth);
    }
}

/// Checks a `docker_registries_auth` map; `what` names where it was given.
pub fn validate_auths(what: impl std::fmt::Display, auths: &RegistriesAuth) -> Result<(), String> {
    if auths.len() > MAX_REGISTRIES_AUTH {
        return Err(format!("{what} has {} registries, the limit is {MAX_REGISTRIES_AUTH}", auths.len()));
    }
    for (registry, a) in auths {
        let at = format!("{what} {registry:?}");
        if registry.is_empty()
            || registry.len() > MAX_NAME_BYTES
            || registry.chars().any(|c| c.is_control() || c.is_whitespace() || c == '/')
        {
            return Err(format!(
                "{what} key {registry:?} must be a registry host (1 to {MAX_NAME_BYTES} bytes, no '/')"
            ));
        }
        let long =
            [&a.username, &a.password, &a.auth].into_iter().flatten().any(|v| v.len() > MAX_MAP_VALUE_BYTES);
        if long {
            return Err(format!("{at}: a credential is longer than {MAX_MAP_VALUE_BYTES} bytes"));
        }
        match a.kind.as_str() {
            "basic" => {
                if a.username.as_deref().unwrap_or("").is_empty() || a.password.is_none() || a.auth.is_some()
                {
                    return Err(format!("{at}: type basic needs username and password (and no auth)"));
                }
            }
            "encodedauth" => {
                if a.auth.as_deref().unwrap_or("").is_empty() || a.username.is_some() || a.password.is_some()
                {
                    return Err(format!("{at}: type encodedauth needs auth (and no username or password)"));
                }
            }
            other => {
                return Err(format!("{at}: unknown type {other:?} (known: basic, encodedauth)"));
            }
        }
    }
    Ok(())
}

/// The pod a task runs in: its `containers`, or the one container its `image` describes.
/// Container 0 gets its name (`main` unless named); the task's `privileged` and `user`
/// apply to container 0 when it sets none of its own.
pub fn pod_of(task: &TaskConfig) -> Vec<ContainerConfig> {
    let mut pod = if task.containers.is_empty() {
        vec![ContainerConfig {
            name: None,
            image: task.image.clone(),
            environment: StringMap::new(),
            user: None,
            privileged: false,
            entrypoint: None,
            command: None,
            volumes: Vec::new(),
        }]
    } else {
        task.containers.clone()
    };
    let main = &mut pod[0];
    main.name.get_or_insert_with(|| MAIN_CONTAINER.to_string());
    main.privileged |= task.privileged;
    if main.user.is_none() {
        main.user = task.user.clone();
    }
    pod
}

/// A container name is a host name in container 0's /etc/hosts: 1 to 63 letters, digits
/// and '-' (not first or last).
pub fn validate_hostname(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} must be a host name: 1 to 63 letters, digits and '-' (not first or last)"
        ))
    }
}

/// Whether any container of the task asks to be privileged.
pub fn needs_privileged(task: &TaskConfig) -> bool {
    task.privileged || task.containers.iter().any(|c| c.privileged)
}

/// Checks a task's pod fields: `image` or `containers` (not both), container names,
/// images, volumes, and the task's `timeout_s` and `docker_registries_auth`.
pub fn validate_pod(t: &TaskConfig) -> Result<(), String> {
    let n = &t.name;
    if !t.containers.is_empty() && !t.image.is_empty() {
        return Err(format!("task {n:?}: give either image or containers, not both"));
    }
    if t.containers.is_empty() && (t.image.is_empty() || t.image.len() > MAX_GROUP_BYTES) {
        return Err(format!("task {n:?}: image must be 1 to {MAX_GROUP_BYTES} bytes (or give containers)"));
    }
    if t.containers.len() > MAX_CONTAINERS_PER_TASK {
        return Err(format!(
            "task {n:?} containers: {} containers, the limit is {MAX_CONTAINERS_PER_TASK}",
            t.containers.len()
        ));
    }
    let mut names = BTreeSet::new();
    for (i, c) in t.containers.iter().enumerate() {
        let at = format!("task {n:?} containers[{i}]");
        let name = match (&c.name, i) {
            (Some(name), _) => name.as_str(),
            (None, 0) => MAIN_CONTAINER,
            (None, _) => return Err(format!("{at}: a service container needs a name")),
        };
        validate_hostname(&format!("{at} name"), name)?;
        if !names.insert(name) {
            return Err(format!("task {n:?} containers: the name {name:?} is used twice"));
        }
        if c.image.is_empty() || c.image.len() > MAX_GROUP_BYTES {
            return Err(format!("{at} image must be 1 to {MAX_GROUP_BYTES} bytes"));
        }
        crate::run::validate_map_pub(format_args!("{at} environment"), &c.environment)?;
        if c.user.as_ref().is_some_and(|u| u.is_empty() || u.len() > MAX_NAME_BYTES) {
            return Err(format!("{at} user must be 1 to {MAX_NAME_BYTES} bytes"));
        }
        for (field, list) in [("entrypoint", &c.entrypoint), ("command", &c.command)] {
            if let Some(list) = list {
                if list.len() > MAX_MAP_ENTRIES || list.iter().any(|a| a.len() > MAX_MAP_VALUE_BYTES) {
                    return Err(format!(
                        "{at} {field}: at most {MAX_MAP_ENTRIES} arguments of {MAX_MAP_VALUE_BYTES} bytes"
                    ));
                }
            }
        }
        if c.volumes.len() > MAX_VOLUMES_PER_CONTAINER {
            return Err(format!("{at} volumes: the limit is {MAX_VOLUMES_PER_CONTAINER}"));
        }
        let mut paths = BTreeSet::new();
        for v in &c.volumes {
            let vat = format!("{at} volume {:?}", v.path);
            if !v.path.starts_with('/')
                || v.path == "/"
                || v.path.len() > MAX_GROUP_BYTES
                || v.path.chars().any(|c| c.is_control() || c == ',' || c == ':')
            {
                return Err(format!(
                    "{vat}: path must be absolute, not '/', at most {MAX_GROUP_BYTES} bytes, without ',' or ':'"
                ));
            }
            if !paths.insert(v.path.trim_end_matches('/')) {
                return Err(format!("{vat}: the path is used twice"));
            }
            let Some(tmpfs) = &v.tmpfs else {
                return Err(format!("{vat}: only tmpfs volumes exist (give tmpfs: {{size: 64Mi}})"));
            };
            if let Some(size) = &tmpfs.size {
                let bytes = size.bytes().map_err(|e| format!("{vat} tmpfs size: {e}"))?;
                if bytes == 0 {
                    return Err(format!("{vat} tmpfs size must be more than 0"));
                }
            }
        }
    }
    if let Some(timeout) = t.timeout_s {
        if timeout < 1 || timeout > MAX_TASK_TIMEOUT_S as i64 {
            return Err(format!(
                "task {n:?} timeout_s must be 1 to {MAX_TASK_TIMEOUT_S} seconds (got {timeout})"
            ));
        }
    }
    validate_auths(format_args!("task {n:?} docker_registries_auth"), &t.docker_registries_auth)?;
    Ok(())
}

/// The registry host an image is pulled from (`docker.io` for Docker Hub names).
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => first,
        _ => "docker.io",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::RunCreate;

    fn run(task_yaml: serde_json::Value) -> Result<(), String> {
        let create: RunCreate =
            serde_json::from_value(serde_json::json!({"name": "r", "tasks": [task_yaml]})).unwrap();
        create.validate()
    }

    fn pod_task(containers: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"name": "t", "containers": containers, "steps": [{"run": {"command": "true"}}]})
    }

    #[test]
    fn sizes_read_bytes_and_binary_units() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("64Mi"), Ok(64 << 20));
        assert_eq!(parse_size("2Gi"), Ok(2 << 30));
        assert_eq!(parse_size("3Ki"), Ok(3 << 10));
        assert!(parse_size("64Mx").is_err());
        assert!(parse_size("Mi").is_err());
        assert!(parse_size("99999999999999Gi").is_err());
    }

    #[test]
    fn a_pod_is_valid_and_its_main_container_is_named_main() {
        let ok = pod_task(serde_json::json!([
            {"image": "i", "volumes": [{"path": "/scratch", "tmpfs": {"size": "64Mi"}}]},
            {"name": "db", "image": "i", "entrypoint": ["/bin/sh", "-c"], "command": ["exec httpd -f"]}
        ]));
        assert_eq!(run(ok.clone()), Ok(()));
        let t: TaskConfig = serde_json::from_value(ok).unwrap();
        let pod = pod_of(&t);
        assert_eq!(pod[0].name.as_deref(), Some("main"));
        assert_eq!(pod[1].name.as_deref(), Some("db"));
    }

    #[test]
    fn bad_pods_are_refused_naming_the_field() {
        let dup = pod_task(serde_json::json!([{"name": "a", "image": "i"}, {"name": "a", "image": "i"}]));
        assert!(run(dup).unwrap_err().contains("\"a\" is used twice"));
        let unnamed = pod_task(serde_json::json!([{"image": "i"}, {"image": "i"}]));
        assert!(run(unnamed).unwrap_err().contains("containers[1]: a service container needs a name"));
        let size = pod_task(
            serde_json::json!([{"image": "i", "volumes": [{"path": "/x", "tmpfs": {"size": "lots"}}]}]),
        );
        assert!(run(size).unwrap_err().contains("tmpfs size"));
        let both = serde_json::json!({"name": "t", "image": "i", "containers": [{"image": "i"}]});
        assert!(run(both).unwrap_err().contains("either image or containers"));
        let zero = serde_json::json!({"name": "t", "image": "i", "timeout_s": 0});
        assert!(run(zero).unwrap_err().contains("timeout_s"));
        let negative = serde_json::json!({"name": "t", "image": "i", "timeout_s": -5});
        assert!(run(negative).unwrap_err().contains("timeout_s"));
        let auth = serde_json::json!({"name": "t", "image": "i",
            "docker_registries_auth": {"r:5000": {"type": "token", "auth": "x"}}});
        assert!(run(auth).unwrap_err().contains("docker_registries_auth \"r:5000\": unknown type \"token\""));
    }

    #[test]
    fn secrets_never_show_in_debug_or_redacted_answers() {
        let a = RegistryAuth {
            kind: "basic".into(),
            username: Some("ci".into()),
            password: Some("s3cret".into()),
            auth: None,
        };
        assert!(!format!("{a:?}").contains("s3cret"));
        let r = serde_json::to_string(&a.redacted()).unwrap();
        assert!(!r.contains("s3cret") && r.contains(REDACTED) && r.contains("ci"), "{r}");
    }

    #[test]
    fn registries_are_read_from_image_names() {
        assert_eq!(registry_of("127.0.0.1:5000/busybox:latest"), "127.0.0.1:5000");
        assert_eq!(registry_of("quay.io/a/b"), "quay.io");
        assert_eq!(registry_of("library/busybox"), "docker.io");
        assert_eq!(registry_of("busybox:1"), "docker.io");
        assert_eq!(registry_of("localhost/x"), "localhost");
    }
}
