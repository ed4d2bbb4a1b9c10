//! `--config FILE` (or `FLOTILLA_CONFIG`): every flag's value from a TOML file, and
//! `flotilla config example`, which prints one.
//!
//! The file's values become the flags' defaults before the command line is parsed, so the
//! precedence is clap's own: a flag beats its environment variable, which beats the file,
//! which beats the built-in default. Tables name the commands: `[server]`, `[dev]`,
//! `[executor]`, and `[client]` for the flags every client command shares (`server`,
//! `token_file`, `json`); a top-level key is a global flag (`log_format`). A key is a long
//! flag's name with `_` or `-`. A key or table no command has is an error naming it, so a
//! typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};

/// The commands that take a table of their own.
const COMMAND_TABLES: &[&str] = &["server", "dev", "executor"];
/// The table of the client flags, and a command that has all of them.
const CLIENT_TABLE: &str = "client";
const CLIENT_PROBE: &str = "health";
/// Flags that make no sense in a file.
const NOT_IN_FILE: &[&str] = &["help", "version", "config"];

/// The config file named on the command line (`--config F`, `--config=F`) or by
/// `FLOTILLA_CONFIG`; clap itself parses `--config` later, only to accept and document it.
pub fn path_from(args: &[std::ffi::OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("FLOTILLA_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Reads `path` and makes its values the defaults of `cmd`'s flags.
pub fn apply(mut cmd: Command, path: &Path) -> Result<Command, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("config file {}: {}", path.display(), e.message()))?;
    let file = path.display().to_string();
    for (key, value) in &table {
        match value {
            toml::Value::Table(t) if COMMAND_TABLES.contains(&key.as_str()) => {
                let mut sub = cmd.find_subcommand(key).cloned().expect("a command table names a command");
                for (k, v) in t {
                    sub = set_default(sub, k, v).map_err(|e| format!("{file}: [{key}] {e}"))?;
                }
                cmd = cmd.mut_subcommand(key, |_| sub);
            }
            toml::Value::Table(t) if key == CLIENT_TABLE => {
                let probe = cmd.find_subcommand(CLIENT_PROBE).cloned().expect("the health command exists");
                for (k, v) in t {
                    // Checked once against a command that has every client flag ...
                    set_default(probe.clone(), k, v).map_err(|e| format!("{file}: [{CLIENT_TABLE}] {e}"))?;
                }
                // ... then set on every command that has them.
                let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
                for name in names {
                    let mut sub = cmd.find_subcommand(&name).cloned().expect("listed above");
                    for (k, v) in t {
                        if find_arg(&sub, k).is_some() {
                            sub = set_default(sub, k, v)
                                .map_err(|e| format!("{file}: [{CLIENT_TABLE}] {e}"))?;
                        }
                    }
                    cmd = cmd.mut_subcommand(&name, |_| sub);
                }
            }
            toml::Value::Table(_) => {
                return Err(format!(
                    "{file}: unknown table [{key}] (known: {}, {CLIENT_TABLE})",
                    COMMAND_TABLES.join(", ")
                ))
            }
            v => cmd = set_default(cmd, key, v).map_err(|e| format!("{file}: {e}"))?,
        }
    }
    Ok(cmd)
}

fn normalize(key: &str) -> String {
    key.replace('-', "_")
}

fn find_arg<'a>(cmd: &'a Command, key: &str) -> Option<&'a Arg> {
    let key = normalize(key);
    cmd.get_arguments().find(|a| {
        a.get_long().is_some_and(|l| normalize(l) == key) && !NOT_IN_FILE.contains(&a.get_id().as_str())
    })
}

/// Strings live for the whole process: clap keeps `&'static str` defaults.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn scalar(key: &str, v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err(format!("key {key:?}: a string, number or boolean is expected")),
    }
}

fn set_default(cmd: Command, key: &str, value: &toml::Value) -> Result<Command, String> {
    let Some(arg) = find_arg(&cmd, key) else {
        return Err(format!(
            "unknown key {key:?}: `flotilla {}` has no flag --{}",
            cmd.get_name(),
            key.replace('_', "-")
        ));
    };
    let id = arg.get_id().clone();
    let many = matches!(arg.get_action(), ArgAction::Append)
        || arg.get_num_args().is_some_and(|n| n.max_values() > 1);
    let values: Vec<&'static str> = match value {
        toml::Value::Array(items) if many => {
            items.iter().map(|v| scalar(key, v).map(leak)).collect::<Result<_, _>>()?
        }
        toml::Value::Array(_) => return Err(format!("key {key:?} takes one value, not a list")),
        v => vec![leak(scalar(key, v)?)],
    };
    // A value from the file satisfies a flag the command line must otherwise give.
    Ok(cmd.mut_arg(id, |a| a.default_values(values).required(false)))
}

/// `flotilla config example`: every flag of the server, dev, executor and client commands
/// with its help and default, commented out.
pub fn example(cmd: &Command) -> String {
    let mut out = String::from(
        "# flotilla configuration (flotilla --config FILE, or FLOTILLA_CONFIG=FILE).\n\
         # Every key is a flag; a flag on the command line wins over its environment\n\
         # variable, which wins over this file, which wins over the built-in default.\n\n",
    );
    section(&mut out, cmd, None);
    let client = cmd.find_subcommand(CLIENT_PROBE).expect("the health command exists");
    out.push_str(&format!("[{CLIENT_TABLE}]  # every client command (run, cluster, kv, ...)\n"));
    for a in client.get_arguments().filter(|a| a.is_global_set() && is_flag(a)) {
        entry(&mut out, a);
    }
    out.push('\n');
    for name in COMMAND_TABLES {
        let sub = cmd.find_subcommand(name).expect("a command table names a command");
        section(&mut out, sub, Some(name));
    }
    out
}

fn is_flag(a: &Arg) -> bool {
    a.get_long().is_some() && !NOT_IN_FILE.contains(&a.get_id().as_str())
}

fn section(out: &mut String, cmd: &Command, table: Option<&str>) {
    if let Some(t) = table {
        out.push_str(&format!("[{t}]\n"));
    }
    for a in cmd.get_arguments().filter(|a| is_flag(a) && (table.is_none() || !a.is_global_set())) {
        entry(out, a);
    }
    out.push('\n');
}

fn entry(out: &mut String, a: &Arg) {
    if let Some(help) = a.get_help() {
        for line in help.to_string().lines() {
            out.push_str(&format!("# {line}\n"));
        }
    }
    if let Some(env) = a.get_env() {
        out.push_str(&format!("#   (environment: {})\n", env.to_string_lossy()));
    }
    let key = normalize(a.get_long().unwrap_or_default());
    let defaults: Vec<String> =
        a.get_default_values().iter().map(|v| toml_value(&v.to_string_lossy())).collect();
    let value = match (defaults.len(), matches!(a.get_action(), ArgAction::SetTrue)) {
        (_, true) => "false".to_string(),
        (0, _) => "\"\"".to_string(),
        (1, _) if a.get_action().takes_values() && !matches!(a.get_action(), ArgAction::Append) => {
            defaults[0].clone()
        }
        _ => format!("[{}]", defaults.join(", ")),
    };
    out.push_str(&format!("# {key} = {value}\n"));
}

/// A default as TOML: numbers and booleans bare, everything else a quoted string.
fn toml_value(s: &str) -> String {
    if s.parse::<i64>().is_ok() || s == "true" || s == "false" {
        s.to_string()
    } else {
        toml::Value::String(s.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_flag_is_found_before_parsing() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(path_from(&args(&["f", "server", "--config", "a.toml"])), Some("a.toml".into()));
        assert_eq!(path_from(&args(&["f", "--config=b.toml", "dev"])), Some("b.toml".into()));
        assert_ne!(path_from(&args(&["f", "run", "--", "--config", "x"])), Some("x".into()));
    }
}
