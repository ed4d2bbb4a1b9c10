//! Workspaces, caches and artifacts through a real Docker engine (issue 26): a save ->
//! restore round trip reproduces a tree exactly (modes with special bits, mtimes, empty
//! directories, symlinks, hard links), for workspaces and caches alike; the user route
//! and `flotilla run artifacts` get the saved workspace out; steps are addressed by
//! name; `run get` shows the DAG and why a task failed; an archive that would write
//! outside `dest_dir` is refused by the executor.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{containers_with_label, require_docker_image, Cluster, ExecutorProc, IMAGE};
use flotilla_api::types::{Run, RunCreate};
use flotilla_api::{Client, ClientError};
use flotilla_store::run::TaskStatus;
use serde_json::json;

async fn create(c: &Client, mut body: serde_json::Value) -> Run {
    for t in body["tasks"].as_array_mut().unwrap() {
        t["image"] = json!(IMAGE);
    }
    let create: RunCreate = serde_json::from_value(body).expect("valid RunCreate");
    c.run_create(&create).await.expect("run created")
}

async fn wait_final(c: &Client, id: &str, exec: &ExecutorProc) -> Run {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let run = c.run_get(id).await.expect("run");
        if run.phase.is_final() {
            return run;
        }
        assert!(Instant::now() < deadline, "run {id} did not end: {run:#?}\n{}", exec.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn log(c: &Client, run: &str, task: &str, step: &str) -> String {
    let bytes = c.run_log(run, task, step, false).await.expect("log").bytes().await.unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The text between the listing markers of a step log.
fn listing(log: &str) -> String {
    let start = log.find("=== BEGIN\n").unwrap_or_else(|| panic!("no listing in {log}")) + 10;
    let end = log[start..].find("=== END").unwrap_or_else(|| panic!("unterminated listing in {log}"));
    log[start..start + end].to_string()
}

/// Builds the tree of issue 26 under `tree/`: a setuid file hard-linked under another
/// name, a relative and an absolute symlink, an empty dir, a 1777 `tmp`, a 0700 and a
/// 2750 dir, a deep file; fixed mtimes, directories last and deepest first.
const BUILD: &str = r#"
mkdir -p tree/bin tree/empty tree/tmp tree/private tree/deep/a/b
printf 'gzip-app' > tree/bin/gunzip; chmod 4755 tree/bin/gunzip
ln tree/bin/gunzip tree/bin/uncompress
ln -s gunzip tree/bin/zcat
ln -s /etc/passwd tree/outside
printf 'deep' > tree/deep/a/b/file; chmod 640 tree/deep/a/b/file
printf 'secret' > tree/private/key; chmod 600 tree/private/key
touch -t 200102030405.06 tree/bin/gunzip tree/deep/a/b/file
touch -t 199912312359.59 tree/private/key
touch -h -t 201001010000.00 tree/bin/zcat tree/outside
chmod 1777 tree/tmp; chmod 700 tree/private; chmod 2750 tree/deep
touch -t 200506070809.10 tree/deep/a/b tree/deep/a tree/deep tree/empty tree/tmp tree/private tree/bin
"#;

/// Lists a tree (the first argument) so that two equal listings mean equal trees.
const LIST: &str = r#"
list() (
  cd "$1"
  echo "=== BEGIN"
  find . -mindepth 1 | sort | while read -r p; do
    if [ -L "$p" ]; then echo "$p link $(readlink "$p") $(stat -c %Y "$p")"
    elif [ -d "$p" ]; then echo "$p dir $(stat -c '%a %Y' "$p")"
    else echo "$p file $(stat -c '%a %Y %h %s' "$p") $(md5sum < "$p" | cut -c1-32)"; fi
  done
  [ "$(stat -c %i bin/gunzip)" = "$(stat -c %i bin/uncompress)" ] && echo "hard link kept"
  echo "=== END"
)
"#;

fn assert_no_containers(exec: &ExecutorProc) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !containers_with_label("flotilla.executor", &exec.id).is_empty() {
        assert!(Instant::now() < deadline, "containers of executor {} left behind", exec.id);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_and_caches_round_trip_exactly_and_come_out_through_the_api_and_the_cli() {
    require_docker_image();
    let cluster = Cluster::bootstrap(1, &[]).await;
    let exec = ExecutorProc::start(&cluster, "ws26-exec", &["--active-tasks-limit", "4"]);
    let c = cluster.client(1);
    let cache_group = format!("/ws26/{}", std::process::id());
    let run = create(
        &c,
        json!({
            "name": "fidelity", "group": "/ws26/main", "cache_group": cache_group,
            "tasks": [
                {"name": "make", "steps": [
                    {"run": {"name": "build", "command": format!("{BUILD}\n{LIST}\nlist tree")}},
                    {"save_to_workspace": {"contents": [{"source_dir": "tree", "dest_dir": "tree"}]}},
                    {"save_cache": {"key": "tree-{{ md5sum tree/bin/gunzip }}", "contents": [{"source_dir": "tree", "dest_dir": "tree"}]}}
                ]},
                {"name": "check", "depends": [{"task": "make"}], "steps": [
                    {"restore_workspace": {"dest_dir": "restored"}},
                    {"run": {"name": "compare", "command": format!("{LIST}\nlist restored/tree")}}
                ]},
                {"name": "cached", "depends": [{"task": "make"}], "steps": [
                    {"restore_cache": {"keys": ["nothing-{{ arch }}-", "tree-"], "dest_dir": "fromcache"}},
                    {"run": {"name": "compare", "command": format!("{LIST}\nlist fromcache/tree")}},
                    {"restore_cache": {"keys": ["absent-{{ arch }}"], "dest_dir": "none"}}
                ]},
                {"name": "broken", "depends": [{"task": "check"}], "steps": [
                    {"restore_workspace": {"dest_dir": "."}},
                    {"run": {"name": "fail", "command": "echo about to fail; exit 3"}}
                ]}
            ]
        }),
    )
    .await;
    let run = wait_final(&c, &run.id, &exec).await;
    let status = |t: &str| run.tasks[t].status;
    assert_eq!(status("make"), TaskStatus::Success, "{run:#?}\n{}", log(&c, &run.id, "make", "0").await);
    assert_eq!(status("check"), TaskStatus::Success, "{}", log(&c, &run.id, "check", "0").await);
    assert_eq!(status("cached"), TaskStatus::Success, "{}", log(&c, &run.id, "cached", "0").await);
    assert_eq!(status("broken"), TaskStatus::Failed);

    // Steps by name; the default is the first run step, or the failing one.
    let original = listing(&log(&c, &run.id, "make", "build").await);
    assert_eq!(listing(&log(&c, &run.id, "make", "").await), original, "default: the first run step");
    for expected in [
        "./bin/gunzip file 4755 981173106 2 8",
        "./bin/uncompress file 4755 981173106 2 8",
        "./bin/zcat link gunzip",
        "./outside link /etc/passwd",
        "./empty dir 755 1118131750",
        "./tmp dir 1777 1118131750",
        "./private dir 700 1118131750",
        "./deep dir 2750 1118131750",
        "./deep/a/b/file file 640 981173106 1 4",
        "hard link kept",
    ] {
        assert!(original.contains(expected), "{expected:?} missing from the original tree:\n{original}");
    }
    // The round trips: workspace and cache.
    assert_eq!(listing(&log(&c, &run.id, "check", "compare").await), original, "workspace round trip");
    assert_eq!(listing(&log(&c, &run.id, "cached", "compare").await), original, "cache round trip");
    let cached = log(&c, &run.id, "cached", "0").await;
    assert!(cached.contains("restored cache tree-"), "{cached}");
    let miss = log(&c, &run.id, "cached", "2").await;
    assert!(
        miss.contains("no cache matches the keys [\"absent-amd64\"]") || miss.contains("[\"absent-arm64\"]"),
        "a miss names the evaluated keys: {miss}"
    );
    // The evaluated keys come first; the templates only follow, after "(from".
    let evaluated = miss.split(" (from").next().unwrap_or_default();
    assert!(!evaluated.contains("{{") && miss.contains("(from [\"absent-{{ arch }}\"])"), "{miss}");
    let failing = log(&c, &run.id, "broken", "").await;
    assert!(failing.contains("about to fail"), "default for a failed task: its failing step: {failing}");
    match c.run_log(&run.id, "make", "nope", false).await {
        Err(ClientError::Api { status: 404, message, .. }) => assert!(message.contains("build"), "{message}"),
        other => panic!("unknown step name: {:?}", other.map(|_| ())),
    }

    // The workspace as a tar through the user route.
    let tar_bytes = c.task_workspace(&run.id, "make", None).await.expect("workspace").bytes().await.unwrap();
    let mut entries = BTreeMap::new();
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().display().to_string();
        let h = e.header().clone();
        let link = e.link_name().unwrap().map(|l| l.display().to_string()).unwrap_or_default();
        let mut content = String::new();
        let _ = e.read_to_string(&mut content);
        entries.insert(path, (h.entry_type(), h.mode().unwrap(), h.mtime().unwrap(), link, content));
    }
    let gunzip = &entries["tree/bin/gunzip"];
    // Permission bits (the header may carry the file type bits too, as st_mode does).
    assert_eq!((gunzip.1 & 0o7777, gunzip.2, gunzip.4.as_str()), (0o4755, 981173106, "gzip-app"));
    assert!(entries["tree/bin/uncompress"].0.is_hard_link());
    assert_eq!(entries["tree/bin/uncompress"].3, "tree/bin/gunzip");
    assert!(entries["tree/outside"].0.is_symlink() && entries["tree/outside"].3 == "/etc/passwd");
    assert!(entries["tree/empty"].0.is_dir() && entries["tree/tmp"].1 & 0o7777 == 0o1777);
    // One file of it (a hard link resolves to its content); refusals are clear.
    let one =
        c.task_workspace(&run.id, "make", Some("tree/bin/uncompress")).await.unwrap().bytes().await.unwrap();
    assert_eq!(&one[..], b"gzip-app");
    for (path, code) in [("tree/empty", 400), ("tree/none", 404), ("../etc/passwd", 400)] {
        match c.task_workspace(&run.id, "make", Some(path)).await {
            Err(ClientError::Api { status, .. }) => assert_eq!(status, code, "{path}"),
            other => panic!("{path}: {:?}", other.map(|_| ())),
        }
    }
    match c.task_workspace(&run.id, "check", None).await {
        Err(ClientError::Api { status: 404, .. }) => {}
        other => panic!("a task without save_to_workspace: {:?}", other.map(|_| ())),
    }

    // The CLI writes it into a directory, modes and times kept.
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("artifacts");
    let (code, _, err) = cluster.cli(1, &["run", "artifacts", &run.id, "make", "-o", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let meta = std::fs::metadata(dir.join("tree/bin/gunzip")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(std::fs::read_to_string(dir.join("tree/bin/uncompress")).unwrap(), "gzip-app");
    assert_eq!(std::fs::read_link(dir.join("tree/outside")).unwrap().to_str(), Some("/etc/passwd"));
    assert!(dir.join("tree/empty").is_dir());
    let (code, _, err) = cluster.cli(
        1,
        &[
            "run",
            "artifacts",
            &run.id,
            "make",
            "--path",
            "tree/deep/a/b/file",
            "-o",
            out.path().to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(out.path().join("file")).unwrap(), "deep");

    // `run get`: DAG order with dependencies, and why a task failed.
    let (code, text, err) = cluster.cli(1, &["run", "get", &run.id]);
    assert_eq!(code, 0, "{err}");
    let pos =
        |name: &str| text.find(&format!(" {name} ")).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
    assert!(pos("make") < pos("check") && pos("check") < pos("broken"), "DAG order:\n{text}");
    assert!(pos("check") < pos("cached"), "definition order within a level:\n{text}");
    assert!(text.contains("failed at step 1 (fail): exit code 3"), "{text}");
    let outline = c.run_outline(&run.id).await.unwrap();
    let levels: Vec<(String, usize)> = outline.tasks.iter().map(|t| (t.name.clone(), t.level)).collect();
    assert_eq!(levels, [("make".into(), 0), ("check".into(), 1), ("cached".into(), 1), ("broken".into(), 2)]);
    assert_no_containers(&exec);
}

/// A tar entry with any name and link name (the tar crate's builder refuses '..').
fn raw_entry(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_cksum();
    b.append(&h, data).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_that_would_write_outside_dest_dir_is_refused_by_the_executor() {
    require_docker_image();
    let cluster = Cluster::bootstrap(1, &[]).await;
    let exec = ExecutorProc::start(&cluster, "ws26-evil", &[]);
    let c = cluster.client(1);
    let group = format!("/ws26evil/{}", std::process::id());
    use tar::EntryType::{Regular, Symlink};
    /// (name, entries as (path, type, link target, content), what the refusal names)
    type Case<'a> = (&'a str, Vec<(&'a str, tar::EntryType, &'a str, &'a [u8])>, &'a str);
    let evil: [Case; 2] = [
        (
            "via-symlink",
            vec![
                ("ok", Regular, "", &b"ok"[..]),
                ("s", Symlink, "/etc", &b""[..]),
                ("s/evil", Regular, "", &b"x"[..]),
            ],
            "below the symlink",
        ),
        ("via-dotdot", vec![("../../../etc/evil", Regular, "", &b"x"[..])], "escapes"),
    ];
    for (key, entries, _) in &evil {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, link, data) in entries {
            raw_entry(&mut b, name, *kind, link, data);
        }
        let packed = zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap();
        let size = packed.len() as u64;
        c.executor_cache_put(&exec.id, &group, key, reqwest::Body::from(packed), Some(size)).await.unwrap();
    }
    for (key, _, why) in &evil {
        let run = create(
            &c,
            json!({
                "name": "evil", "group": "/ws26evil", "cache_group": group,
                "tasks": [{"name": "restore", "steps": [
                    {"restore_cache": {"keys": [key], "dest_dir": "x"}},
                    {"run": {"command": "echo never"}}
                ]}]
            }),
        )
        .await;
        let run = wait_final(&c, &run.id, &exec).await;
        assert_eq!(run.tasks["restore"].status, TaskStatus::Failed, "{key}");
        let text = log(&c, &run.id, "restore", "").await;
        assert!(text.contains("refused") && text.contains(why), "{key}: {text}");
    }
    assert_no_containers(&exec);
}

/// `examples/pipeline.yaml` as its header says a newcomer runs it: created from the
/// file with the CLI, run twice (the second restores the `deps-` cache), and the package
/// fetched with `run artifacts`, its checksum matching the one the pipeline printed.
#[tokio::test(flavor = "multi_thread")]
async fn the_example_pipeline_runs_twice_with_its_cache_and_its_package_comes_out() {
    require_docker_image();
    let cluster = Cluster::bootstrap(1, &[]).await;
    let exec = ExecutorProc::start(&cluster, "ws26-example", &[]);
    let c = cluster.client(1);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/pipeline.yaml");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (code, out, err) = cluster.cli(1, &["run", "create", "-f", example]);
        assert_eq!(code, 0, "run create: {err}");
        let id = out.trim().to_string();
        let run = wait_final(&c, &id, &exec).await;
        assert_eq!(run.result, flotilla_store::run::RunResult::Success, "{run:#?}\n{}", exec.log_tail());
        ids.push(id);
    }
    // The build task's step 1 is its restore_cache.
    let cache_log = |id: &str| cluster.cli(1, &["run", "logs", id, "build", "--step", "1"]).1;
    let first = cache_log(&ids[0]);
    assert!(first.contains("no cache matches"), "the first run has no cache yet: {first}");
    let second = cache_log(&ids[1]);
    assert!(second.contains("restored cache deps-"), "the second run restores the cache: {second}");

    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let (code, _, err) = cluster.cli(1, &["run", "artifacts", &ids[1], "package", "-o", dir]);
    assert_eq!(code, 0, "run artifacts: {err}");
    let tarball = out.path().join("dist/wordfreq-1.0.tar.gz");
    let bytes = std::fs::read(&tarball).unwrap_or_else(|e| panic!("{}: {e}", tarball.display()));
    let sums = std::fs::read_to_string(out.path().join("dist/SHA256SUMS")).unwrap();
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(&bytes));
    assert!(sums.starts_with(&digest), "{sums} vs {digest}");
    let printed = cluster.cli(1, &["run", "logs", &ids[1], "package", "--step", "tarball"]).1;
    assert!(printed.contains(&digest), "the pipeline printed the same checksum: {printed}");
}
