//! Black-box tests: each one mounts the real `flotilla-lazyfs` binary over a temporary
//! backing directory, works through the mount with ordinary file calls, cuts over the
//! control socket, and checks what the mount and the backing directory hold.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Mounting takes milliseconds; this only bounds a hang.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed `flotilla-lazyfs`'s mount may take to go (see its test).
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `flotilla-lazyfs`. Dropping it stops the process and removes the mount, even
/// when the test failed.
struct Mounted {
    child: Child,
    mount: PathBuf,
    backing: PathBuf,
    control: PathBuf,
    // Last, so that it is deleted after the unmount in `drop`.
    _dir: tempfile::TempDir,
}

impl Mounted {
    /// Mounts over a backing directory that `prepare` fills first.
    fn start_with(prepare: impl FnOnce(&Path)) -> Mounted {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: these tests mount a real FUSE file system \
             (load the fuse module, or give the container --device /dev/fuse)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let (backing, mount, control) =
            (dir.path().join("backing"), dir.path().join("mount"), dir.path().join("control.sock"));
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mount).unwrap();
        prepare(&backing);
        let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-lazyfs"))
            .arg("--backing")
            .arg(&backing)
            .arg("--mount")
            .arg(&mount)
            .arg("--control")
            .arg(&control)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting flotilla-lazyfs");
        let stdout = child.stdout.take().unwrap();
        let mounted = Mounted { child, mount, backing, control, _dir: dir };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            lines.for_each(drop); // Keep the pipe open and drained.
        });
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(Some(Ok(line))) if line == "ready" => mounted,
            other => panic!("flotilla-lazyfs did not print `ready` (got {other:?}); see its stderr above"),
        }
    }

    fn start() -> Mounted {
        Mounted::start_with(|_| {})
    }

    fn command(&self, command: &str) -> String {
        let mut stream = UnixStream::connect(&self.control).expect("control socket");
        writeln!(stream, "{command}").unwrap();
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).unwrap();
        reply.trim_end().to_string()
    }

    /// Cuts and returns how many files and entries were dropped.
    fn cut(&self) -> usize {
        let reply = self.command("cut");
        reply.strip_prefix("ok ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("cut: {reply}"))
    }

    fn m(&self, name: &str) -> PathBuf {
        self.mount.join(name)
    }

    fn b(&self, name: &str) -> PathBuf {
        self.backing.join(name)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Only while it runs: once reaped, its pid may belong to another process.
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            if self.wait_exit(EXIT_TIMEOUT).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // Harmless when already unmounted; needed when the process could not do it.
        let _ =
            Command::new("fusermount3").arg("-u").arg("-z").arg(&self.mount).stderr(Stdio::null()).status();
    }
}

fn fsync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

fn is_mounted(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    let path = path.to_str().unwrap();
    mounts.lines().any(|line| line.split(' ').nth(1) == Some(path))
}

#[test]
fn unsynced_overwrite_is_seen_by_reads_and_gone_after_cut() {
    let fs = Mounted::start_with(|b| fs::write(b.join("f"), b"old content").unwrap());
    let mut f = OpenOptions::new().write(true).open(fs.m("f")).unwrap();
    f.write_all(b"NEW").unwrap();
    drop(f);
    assert_eq!(fs::read(fs.m("f")).unwrap(), b"NEW content");
    assert_eq!(fs::read(fs.b("f")).unwrap(), b"old content", "unsynced data reached the backing file");
    assert_eq!(fs.cut(), 1);
    assert_eq!(fs::read(fs.m("f")).unwrap(), b"old content");
}

#[test]
fn a_read_while_unsynced_sees_the_new_bytes_over_the_old_ones() {
    let fs = Mounted::start_with(|b| fs::write(b.join("f"), vec![b'a'; 10_000]).unwrap());
    let mut f = OpenOptions::new().read(true).write(true).open(fs.m("f")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"XYZ", 4095).unwrap();
    f.write_all_at(b"tail", 10_000).unwrap();
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    let mut expected = vec![b'a'; 10_000];
    expected[4095..4098].copy_from_slice(b"XYZ");
    expected.extend_from_slice(b"tail");
    assert_eq!(all, expected);
    assert_eq!(fs::metadata(fs.m("f")).unwrap().len(), 10_004);
    assert_eq!(fs::metadata(fs.b("f")).unwrap().len(), 10_000);
}

#[test]
fn fsynced_file_whose_directory_was_not_fsynced_vanishes_after_cut() {
    let fs = Mounted::start();
    let mut f = File::create(fs.m("segment-1")).unwrap();
    f.write_all(b"entries").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(fs.b("segment-1")).unwrap(), b"entries", "fsync wrote the backing file");
    fs.cut();
    assert!(!fs.m("segment-1").exists());
    assert!(!fs.b("segment-1").exists());
}

#[test]
fn file_and_directory_both_fsynced_survive_cut() {
    let fs = Mounted::start();
    fs::create_dir(fs.m("wal")).unwrap();
    fsync_dir(&fs.mount);
    let mut f = File::create(fs.m("wal/segment-1")).unwrap();
    f.write_all(b"entries").unwrap();
    f.sync_data().unwrap();
    drop(f);
    fsync_dir(&fs.m("wal"));
    assert_eq!(fs.command("stats"), "ok unsynced_files=0 unsynced_bytes=0 unsynced_entries=0");
    assert_eq!(fs.cut(), 0);
    assert_eq!(fs::read(fs.m("wal/segment-1")).unwrap(), b"entries");
}

#[test]
fn unsynced_truncate_is_undone_by_cut() {
    let content: Vec<u8> = (0..100u8).collect();
    let fs = Mounted::start_with(|b| fs::write(b.join("f"), (0..100u8).collect::<Vec<_>>()).unwrap());
    OpenOptions::new().write(true).open(fs.m("f")).unwrap().set_len(10).unwrap();
    assert_eq!(fs::read(fs.m("f")).unwrap(), &content[..10]);
    // Growing it again shows zeros, not the truncated bytes.
    OpenOptions::new().write(true).open(fs.m("f")).unwrap().set_len(20).unwrap();
    let mut expected = content[..10].to_vec();
    expected.resize(20, 0);
    assert_eq!(fs::read(fs.m("f")).unwrap(), expected);
    fs.cut();
    assert_eq!(fs::read(fs.m("f")).unwrap(), content);
}

#[test]
fn truncating_open_is_undone_by_cut() {
    let fs = Mounted::start_with(|b| fs::write(b.join("f"), b"durable").unwrap());
    fs::write(fs.m("f"), b"x").unwrap(); // O_TRUNC, then a write
    assert_eq!(fs::read(fs.m("f")).unwrap(), b"x");
    fs.cut();
    assert_eq!(fs::read(fs.m("f")).unwrap(), b"durable");
}

#[test]
fn symlinks_hard_links_and_fifos_are_created_and_undone() {
    let fs = Mounted::start_with(|b| fs::write(b.join("f"), b"data").unwrap());
    std::os::unix::fs::symlink("f", fs.m("sym")).unwrap();
    fs::hard_link(fs.m("f"), fs.m("hard")).unwrap();
    nix::unistd::mkfifo(&fs.m("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert_eq!(fs::read_link(fs.m("sym")).unwrap(), Path::new("f"));
    assert_eq!(fs::read(fs.m("sym")).unwrap(), b"data");
    assert_eq!(fs::read(fs.m("hard")).unwrap(), b"data");
    assert_eq!(fs::metadata(fs.m("f")).unwrap().nlink(), 2);
    assert!(fs::metadata(fs.m("fifo")).unwrap().file_type().is_fifo());
    assert_eq!(fs.cut(), 3);
    let names: Vec<_> = fs::read_dir(&fs.mount).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["f"]);
    assert_eq!(fs::metadata(fs.m("f")).unwrap().nlink(), 1);
}

#[test]
fn unsynced_rename_is_undone_by_cut() {
    let fs = Mounted::start_with(|b| fs::write(b.join("a"), b"A").unwrap());
    fs::rename(fs.m("a"), fs.m("b")).unwrap();
    assert!(!fs.m("a").exists());
    assert_eq!(fs.cut(), 1);
    assert_eq!(fs::read(fs.m("a")).unwrap(), b"A");
    assert!(!fs.m("b").exists());
}

#[test]
fn unsynced_rename_over_a_file_brings_both_back_after_cut() {
    let fs = Mounted::start_with(|b| {
        fs::write(b.join("tmp"), b"new").unwrap();
        fs::write(b.join("current"), b"old").unwrap();
    });
    fs::rename(fs.m("tmp"), fs.m("current")).unwrap();
    assert_eq!(fs::read(fs.m("current")).unwrap(), b"new");
    fs.cut();
    assert_eq!(fs::read(fs.m("tmp")).unwrap(), b"new");
    assert_eq!(fs::read(fs.m("current")).unwrap(), b"old");
}

#[test]
fn rename_made_durable_by_a_directory_fsync_survives_cut() {
    let fs = Mounted::start_with(|b| {
        fs::write(b.join("tmp"), b"new").unwrap();
        fs::write(b.join("current"), b"old").unwrap();
    });
    fs::rename(fs.m("tmp"), fs.m("current")).unwrap();
    fsync_dir(&fs.mount);
    assert_eq!(fs.cut(), 0);
    assert_eq!(fs::read(fs.m("current")).unwrap(), b"new");
    assert!(!fs.m("tmp").exists());
    assert_eq!(fs::read_dir(&fs.backing).unwrap().count(), 2, "the replaced file was deleted for good");
}

#[test]
fn unsynced_unlink_and_rmdir_are_undone_by_cut() {
    let fs = Mounted::start_with(|b| {
        fs::create_dir(b.join("d")).unwrap();
        fs::write(b.join("d/f"), b"kept").unwrap();
    });
    fs::remove_file(fs.m("d/f")).unwrap();
    fs::remove_dir(fs.m("d")).unwrap();
    assert!(!fs.m("d").exists());
    assert_eq!(fs.cut(), 2);
    assert_eq!(fs::read(fs.m("d/f")).unwrap(), b"kept");
}

#[test]
fn unsynced_directory_takes_its_fsynced_contents_with_it() {
    let fs = Mounted::start();
    fs::create_dir(fs.m("d")).unwrap();
    let mut f = File::create(fs.m("d/f")).unwrap();
    f.write_all(b"x").unwrap();
    f.sync_all().unwrap();
    drop(f);
    fsync_dir(&fs.m("d"));
    fs.cut();
    assert!(!fs.m("d").exists());
    assert!(!fs.b("d").exists());
}

#[test]
fn appends_after_an_fsync_are_cut_back_to_the_fsynced_prefix() {
    let fs = Mounted::start();
    let mut f = File::create(fs.m("log")).unwrap();
    fsync_dir(&fs.mount);
    f.write_all(b"first;").unwrap();
    f.sync_data().unwrap();
    f.write_all(b"second;").unwrap();
    f.write_all(b"third;").unwrap();
    drop(f);
    assert_eq!(fs::read(fs.m("log")).unwrap(), b"first;second;third;");
    assert_eq!(fs.command("stats"), "ok unsynced_files=1 unsynced_bytes=4096 unsynced_entries=0");
    assert_eq!(fs.cut(), 1);
    assert_eq!(fs::read(fs.m("log")).unwrap(), b"first;");
}

#[test]
fn o_append_writes_land_at_the_end() {
    let fs = Mounted::start_with(|b| fs::write(b.join("log"), b"synced;").unwrap());
    for record in ["one;", "two;"] {
        let mut f = OpenOptions::new().append(true).open(fs.m("log")).unwrap();
        f.write_all(record.as_bytes()).unwrap();
        f.write_all(b"|").unwrap();
    }
    assert_eq!(fs::read(fs.m("log")).unwrap(), b"synced;one;|two;|");
    OpenOptions::new().append(true).open(fs.m("log")).unwrap().sync_all().unwrap();
    assert_eq!(fs::read(fs.b("log")).unwrap(), b"synced;one;|two;|");
}

#[test]
fn ten_megabytes_in_64k_chunks_read_back_identical_after_fsync() {
    let fs = Mounted::start();
    // xorshift bytes: incompressible enough that a page mix-up would show.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..10 * 1024 * 1024)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    let mut f = File::create(fs.m("big")).unwrap();
    for chunk in data.chunks(64 * 1024) {
        f.write_all(chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    fsync_dir(&fs.mount);
    assert!(fs::read(fs.m("big")).unwrap() == data, "read back through the mount differs");
    assert!(fs::read(fs.b("big")).unwrap() == data, "backing file differs");
    assert_eq!(fs.cut(), 0);
    assert!(fs::read(fs.m("big")).unwrap() == data, "read back after the cut differs");
}

#[test]
fn the_holding_directory_is_invisible_through_the_mount() {
    let fs = Mounted::start_with(|b| fs::write(b.join("f"), b"x").unwrap());
    fs::remove_file(fs.m("f")).unwrap();
    let names: Vec<_> = fs::read_dir(&fs.mount).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.is_empty(), "{names:?}");
    assert!(!fs.m(".lazyfs-holding").exists());
    assert!(fs.b(".lazyfs-holding").exists());
}

#[test]
fn sigterm_unmounts_drops_unsynced_data_and_exits_zero() {
    let mut fs = Mounted::start();
    fs::write(fs.m("unsynced"), b"x").unwrap();
    assert!(is_mounted(&fs.mount));
    kill(Pid::from_raw(fs.child.id() as i32), Signal::SIGTERM).unwrap();
    let status = fs.wait_exit(EXIT_TIMEOUT).expect("exited after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&fs.mount));
    assert!(!fs.b("unsynced").exists());
    assert!(!fs.b(".lazyfs-holding").exists());
    assert!(!fs.control.exists());
}

#[test]
fn a_killed_lazyfs_leaves_no_mount_behind() {
    let mut fs = Mounted::start();
    fs.child.kill().unwrap();
    fs.child.wait().unwrap();
    // fusermount3 (auto_unmount) notices the closed control socket and unmounts. That
    // takes milliseconds, but the daemon is one more process to schedule: in one CI run,
    // beside every other suite on two cores, 10 s were not enough. The test is about
    // whether the mount goes, not how fast, so the bound only catches a hang.
    let deadline = Instant::now() + UNMOUNT_TIMEOUT;
    while is_mounted(&fs.mount) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !is_mounted(&fs.mount),
        "still mounted after {UNMOUNT_TIMEOUT:?}; fusermount3 daemons:\n{}",
        fusermounts()
    );
}

/// The fusermount3 processes with their state and wait channel, for a failure message.
fn fusermounts() -> String {
    let ps = Command::new("ps").args(["-eo", "pid,ppid,stat,wchan:32,etimes,args"]).output();
    ps.map(|out| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let header = lines.next().unwrap_or_default().to_string();
        lines.filter(|line| line.contains("fusermount")).fold(header, |all, line| all + "\n" + line)
    })
    .unwrap_or_else(|e| format!("ps: {e}"))
}

#[test]
fn unknown_control_commands_get_an_error_line() {
    let fs = Mounted::start();
    assert!(fs.command("format c:").starts_with("err unknown command"));
    assert_eq!(fs.command("sync"), "ok");
}
