//! `--config FILE`: values from a TOML file under the flags and environment variables
//! (flag > env > file > default), unknown keys refused naming them, `config example`,
//! and `completions`.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, free_port};

fn flotilla(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin());
    c.args(args).env_remove("FLOTILLA_SERVER").env_remove("FLOTILLA_CONFIG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run flotilla")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A server node started from a config file alone, killed on drop.
struct Node(std::process::Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_health(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if flotilla(&["health", "--server", url], &[]).status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no node answered at {url}");
}

#[test]
fn a_server_runs_from_a_config_file_and_flags_and_env_win_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let cfg = dir.path().join("flotilla.toml");
    std::fs::write(
        &cfg,
        format!(
            "log_format = \"json\"\n\
             [server]\nid = 1\nlisten = \"127.0.0.1:{port}\"\ndata-dir = \"{}\"\nheartbeat_ms = 50\n\
             [client]\nserver = \"http://127.0.0.1:1\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let child = Command::new(bin())
        .args(["server", "--config", cfg])
        .env_remove("FLOTILLA_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _node = Node(child);
    wait_health(&url);
    assert!(dir.path().join("data").exists(), "the data dir comes from the file");

    // [client] server points nowhere: the file alone fails, env and flag win over it.
    let from_file = flotilla(&["health", "--config", cfg], &[]);
    assert!(!from_file.status.success(), "{}", text(&from_file));
    let from_env = flotilla(&["health", "--config", cfg], &[("FLOTILLA_SERVER", &url)]);
    assert!(from_env.status.success(), "{}", text(&from_env));
    let from_flag = flotilla(
        &["health", "--config", cfg, "--server", &url],
        &[("FLOTILLA_SERVER", "http://127.0.0.1:1")],
    );
    assert!(from_flag.status.success(), "{}", text(&from_flag));
    // FLOTILLA_CONFIG names the file too.
    let via_env = flotilla(&["health"], &[("FLOTILLA_CONFIG", cfg)]);
    assert!(!via_env.status.success(), "the file's unreachable server is used: {}", text(&via_env));
}

#[test]
fn unknown_keys_and_tables_and_bad_values_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[server]\nlisen = \"127.0.0.1:1\"\n", "lisen"),
        ("[servre]\nid = 1\n", "servre"),
        ("log_formt = \"json\"\n", "log_formt"),
        ("[client]\ntoken = \"x\"\n", "token"),
        ("[server]\nid = [1, 2]\n", "id"),
        ("[server\nid = 1\n", "flotilla.toml"),
    ];
    for (content, named) in cases {
        let cfg = dir.path().join("flotilla.toml");
        std::fs::write(&cfg, content).unwrap();
        let out = flotilla(&["server", "--config", cfg.to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(2), "{content:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{content:?}: the error names {named:?}: {err}");
    }
    let out = flotilla(&["health", "--config", "/nonexistent/flotilla.toml"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"), "{}", text(&out));
    // A value the flag's parser refuses: clap's usage error, exit 2.
    std::fs::write(dir.path().join("bad.toml"), "[server]\nid = \"one\"\n").unwrap();
    let out = flotilla(&["server", "--config", dir.path().join("bad.toml").to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn the_example_lists_every_server_and_executor_flag_and_loads_when_uncommented() {
    let out = flotilla(&["config", "example"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let example = String::from_utf8(out.stdout).unwrap();
    for key in [
        "[server]",
        "# election_timeout_ms = 250",
        "[executor]",
        "# drain_timeout_s = 10",
        "[client]",
        "# server = ",
    ] {
        assert!(example.contains(key), "{key:?} missing in:\n{example}");
    }
    // Uncommenting every key with a value gives a file every command accepts.
    let uncommented: String = example
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(kv) if kv.contains(" = ") && !kv.starts_with(' ') && !kv.contains("= \"\"") => {
                kv.to_string()
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("all.toml");
    std::fs::write(&cfg, &uncommented).unwrap();
    for cmd in [&["server", "--help"][..], &["executor", "--help"], &["run", "list", "--help"]] {
        let mut args = cmd.to_vec();
        args.extend(["--config", cfg.to_str().unwrap()]);
        let out = flotilla(&args, &[]);
        assert!(out.status.success(), "{args:?} with the uncommented example: {}\n{uncommented}", text(&out));
    }
}

#[test]
fn completions_are_printed_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let out = flotilla(&["completions", shell], &[]);
        assert!(out.status.success(), "{shell}: {}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains("flotilla") && script.contains("executor"), "{shell}: {script}");
    }
    let out = flotilla(&["completions", "tcsh"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}
