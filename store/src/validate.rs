//! Field-level checks of a run definition: every string and list bounded (limits in
//! [`crate::limits`]), no control character where a value reaches Docker or a shell
//! path, no workspace or cache path that leaves the workspace.
//!
//! One function per type, called by [`RunCreate::validate`] after its structural checks
//! (names, dependencies, cycles); a new field gets its line in its type's function.

use std::fmt::Display;
use std::path::{Component, Path};

use crate::limits::*;
use crate::run::{RunCreate, RunStep, SaveContent, Step, StringMap, TaskConfig};

pub fn run_create(c: &RunCreate) -> Result<(), String> {
    environment(&"environment", &c.environment)?;
    environment(&"static_environment", &c.static_environment)?;
    for t in &c.tasks {
        task(t)?;
    }
    Ok(())
}

pub fn task(t: &TaskConfig) -> Result<(), String> {
    // The context of an error is only formatted for an error: a valid run (every one the
    // state machine applies, on every node) formats nothing.
    let name = &t.name;
    docker_text(&format_args!("task {name:?} image"), &t.image, MAX_GROUP_BYTES)?;
    if let Some(dir) = &t.working_dir {
        docker_text(&format_args!("task {name:?} working_dir"), dir, MAX_PATH_BYTES)?;
    }
    if let Some(shell) = &t.shell {
        docker_text(&format_args!("task {name:?} shell"), shell, MAX_PATH_BYTES)?;
    }
    if let Some(user) = &t.user {
        docker_text(&format_args!("task {name:?} user"), user, MAX_USER_BYTES)?;
    }
    environment(&format_args!("task {name:?} environment"), &t.environment)?;
    for d in &t.depends {
        let mut seen = d.conditions.clone();
        seen.sort();
        seen.dedup();
        if d.conditions.len() > MAX_CONDITIONS || seen.len() != d.conditions.len() {
            return Err(format!("task {name:?} depends: conditions of {:?} must be distinct", d.task));
        }
    }
    for (i, s) in t.steps.iter().enumerate() {
        step(&format_args!("task {name:?} step {i}"), s)?;
    }
    Ok(())
}

pub fn step(what: &dyn Display, s: &Step) -> Result<(), String> {
    match s {
        Step::Run(r) => run_step(what, r),
        Step::SaveToWorkspace(s) => contents(what, &s.contents),
        Step::RestoreWorkspace(r) => workspace_path(&format_args!("{what} dest_dir"), &r.dest_dir),
        Step::SaveCache(s) => {
            docker_text(&format_args!("{what} key"), &s.key, MAX_CACHE_KEY_BYTES)?;
            contents(what, &s.contents)
        }
        Step::RestoreCache(r) => {
            if r.keys.len() > MAX_RESTORE_CACHE_KEYS {
                return Err(format!(
                    "{what}: restore_cache has {} keys, the limit is {MAX_RESTORE_CACHE_KEYS}",
                    r.keys.len()
                ));
            }
            for k in &r.keys {
                docker_text(&format_args!("{what} key"), k, MAX_CACHE_KEY_BYTES)?;
            }
            workspace_path(&format_args!("{what} dest_dir"), &r.dest_dir)
        }
    }
}

fn run_step(what: &dyn Display, r: &RunStep) -> Result<(), String> {
    if let Some(name) = &r.name {
        docker_text(&format_args!("{what} name"), name, MAX_NAME_BYTES)?;
    }
    // A command is a shell script: line breaks and tabs belong in it, NUL never does.
    if r.command.contains('\0') {
        return Err(format!("{what}: the command contains a NUL character"));
    }
    if let Some(dir) = &r.working_dir {
        docker_text(&format_args!("{what} working_dir"), dir, MAX_PATH_BYTES)?;
    }
    if let Some(shell) = &r.shell {
        docker_text(&format_args!("{what} shell"), shell, MAX_PATH_BYTES)?;
    }
    environment(&format_args!("{what} environment"), &r.environment)
}

fn contents(what: &dyn Display, list: &[SaveContent]) -> Result<(), String> {
    if list.len() > MAX_SAVE_CONTENTS {
        return Err(format!("{what}: {} contents entries, the limit is {MAX_SAVE_CONTENTS}", list.len()));
    }
    for c in list {
        workspace_path(&format_args!("{what} source_dir"), &c.source_dir)?;
        if let Some(dest) = &c.dest_dir {
            workspace_path(&format_args!("{what} dest_dir"), dest)?;
        }
        if c.paths.len() > MAX_PATHS_PER_CONTENT {
            return Err(format!("{what}: {} paths, the limit is {MAX_PATHS_PER_CONTENT}", c.paths.len()));
        }
        for p in &c.paths {
            workspace_path(&format_args!("{what} path"), p)?;
            if p.starts_with('/') {
                return Err(format!("{what}: path {p:?} must be relative to its source_dir"));
            }
        }
    }
    Ok(())
}

/// A string handed to Docker (image, directory, shell, user, cache key): bounded, and
/// no control characters (a NUL or line break there is never meant and may be read as
/// a separator).
fn docker_text(what: &dyn Display, value: &str, max_bytes: usize) -> Result<(), String> {
    if value.len() > max_bytes {
        return Err(format!("{what} is {} bytes, the limit is {max_bytes}", value.len()));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{what} must not contain control characters (line breaks, tabs, NUL)"));
    }
    Ok(())
}

/// A workspace or cache directory (relative to the working dir): it may not leave the
/// workspace, so no `..` component.
fn workspace_path(what: &dyn Display, p: &str) -> Result<(), String> {
    docker_text(what, p, MAX_PATH_BYTES)?;
    if Path::new(p).components().any(|c| c == Component::ParentDir) {
        return Err(format!("{what} {p:?} leaves the workspace ('..' is not allowed)"));
    }
    Ok(())
}

/// Environment values go to Docker as `KEY=VALUE` strings: NUL would cut them.
fn environment(what: &dyn Display, env: &StringMap) -> Result<(), String> {
    if let Some(k) = env.iter().find(|(_, v)| v.contains('\0')).map(|(k, _)| k) {
        return Err(format!("{what} value of {k:?} contains a NUL character"));
    }
    if let Some(k) = env.keys().find(|k| k.contains('=')) {
        return Err(format!("{what} key {k:?} must not contain '='"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{RestoreCache, RestoreWorkspace, SaveToWorkspace};

    fn with_step(step: Step) -> RunCreate {
        let mut t = TaskConfig::new("a", "busybox", "true");
        t.steps.push(step);
        RunCreate::new("r", "/p", vec![t])
    }

    fn content(source: &str, dest: Option<&str>, paths: &[&str]) -> SaveContent {
        SaveContent {
            source_dir: source.into(),
            dest_dir: dest.map(Into::into),
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn workspace_paths_may_not_leave_the_workspace() {
        for bad in ["../../..", "a/../../b", ".."] {
            let save = Step::SaveToWorkspace(SaveToWorkspace { contents: vec![content(bad, None, &[])] });
            assert!(with_step(save).validate().unwrap_err().contains("leaves the workspace"), "{bad}");
            let save =
                Step::SaveToWorkspace(SaveToWorkspace { contents: vec![content(".", Some(bad), &[])] });
            assert!(with_step(save).validate().is_err(), "{bad}");
            let save = Step::SaveToWorkspace(SaveToWorkspace { contents: vec![content(".", None, &[bad])] });
            assert!(with_step(save).validate().is_err(), "{bad}");
            let restore = Step::RestoreWorkspace(RestoreWorkspace { dest_dir: bad.into() });
            assert!(with_step(restore).validate().is_err(), "{bad}");
            let restore = Step::RestoreCache(RestoreCache { keys: vec!["k".into()], dest_dir: bad.into() });
            assert!(with_step(restore).validate().is_err(), "{bad}");
        }
        let abs = Step::SaveToWorkspace(SaveToWorkspace { contents: vec![content(".", None, &["/etc/*"])] });
        assert!(with_step(abs).validate().is_err());
        let ok =
            Step::SaveToWorkspace(SaveToWorkspace { contents: vec![content(".", Some("out"), &["bin/**"])] });
        assert_eq!(with_step(ok).validate(), Ok(()));
    }

    #[test]
    fn every_string_and_list_is_bounded() {
        let mut c = with_step(Step::RestoreWorkspace(RestoreWorkspace { dest_dir: ".".into() }));
        c.tasks[0].working_dir = Some("w".repeat(900 * 1024));
        assert!(c.validate().unwrap_err().contains("working_dir"));
        let keys = (0..50_000).map(|i| format!("k{i}")).collect();
        let c = with_step(Step::RestoreCache(RestoreCache { keys, dest_dir: ".".into() }));
        assert!(c.validate().unwrap_err().contains("keys"));
        let many = (0..=MAX_SAVE_CONTENTS).map(|_| content(".", None, &[])).collect();
        assert!(with_step(Step::SaveToWorkspace(SaveToWorkspace { contents: many })).validate().is_err());
        let paths: Vec<String> = (0..=MAX_PATHS_PER_CONTENT).map(|i| format!("p{i}")).collect();
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        let c =
            with_step(Step::SaveToWorkspace(SaveToWorkspace { contents: vec![content(".", None, &paths)] }));
        assert!(c.validate().is_err());
    }

    #[test]
    fn control_characters_are_refused_where_docker_or_a_shell_path_reads_them() {
        for (field, value) in
            [("shell", "/bin/sh\0-x"), ("shell", "/bin/sh\n-c"), ("working_dir", "/w\tx"), ("user", "1000\r")]
        {
            let mut c = with_step(Step::RestoreWorkspace(RestoreWorkspace { dest_dir: ".".into() }));
            let t = &mut c.tasks[0];
            match field {
                "shell" => t.shell = Some(value.into()),
                "working_dir" => t.working_dir = Some(value.into()),
                _ => t.user = Some(value.into()),
            }
            assert!(c.validate().unwrap_err().contains("control characters"), "{field}={value:?}");
        }
        let mut c = with_step(Step::RestoreWorkspace(RestoreWorkspace { dest_dir: ".".into() }));
        c.tasks[0].image = "busybox\nlatest".into();
        assert!(c.validate().is_err());
        let mut c = with_step(Step::RestoreWorkspace(RestoreWorkspace { dest_dir: ".".into() }));
        c.tasks[0].environment.insert("A".into(), "x\0y".into());
        assert!(c.validate().unwrap_err().contains("NUL"));
        // A multi-line command and a multi-line environment value are fine.
        let mut c = with_step(Step::RestoreWorkspace(RestoreWorkspace { dest_dir: ".".into() }));
        c.tasks[0].environment.insert("CERT".into(), "line 1\nline 2".into());
        if let Step::Run(r) = &mut c.tasks[0].steps[0] {
            r.command = "set -e\n\tmake\n".into();
        }
        assert_eq!(c.validate(), Ok(()));
    }
}
