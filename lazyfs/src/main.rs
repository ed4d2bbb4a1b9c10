//! `flotilla-lazyfs`: a FUSE file system for tests that simulates power cuts under a
//! directory, after LazyFS (which does it for file data only).
//!
//! It serves the files of `--backing` at `--mount`. Reads pass through; every change that
//! no fsync has made durable is kept aside so that a `cut` on the control socket drops it,
//! after which the backing directory holds what a disk would hold after losing power.
//! Test-only: it runs as root and must never sit under data that matters.
//!
//! # Semantics ("durable" means: survives a cut)
//!
//! - **Reads see the latest writes**, synced or not: unsynced pages overlay the backing
//!   file, and `stat` shows the pending size.
//! - **File data.** `write` and size changes (`truncate`, `ftruncate`, `O_TRUNC`) are kept
//!   in memory per file, as 4 KiB pages over the backing file's content plus a pending
//!   size. `fsync` or `fdatasync` of the file (FUSE `fsync`, either flag) writes them to
//!   the backing file and fsyncs it: from then on they are durable. `close` (FUSE `flush`,
//!   `release`) persists nothing. `sync_file_range(2)`, `sync(2)` and `syncfs(2)` never
//!   reach this file system and are no durability points here (use the control `sync`).
//! - **Namespace.** A create, mknod, mkdir, symlink, link, unlink, rmdir or rename is
//!   durable once a directory it changed is fsynced (`fsync` on a directory fd, FUSE
//!   `fsyncdir`). A rename changes two directories and an fsync of either commits it, as
//!   one journal transaction does on ext4. An fsync of a file does not make its name
//!   durable (POSIX allows this; ext4 is kinder). Changes are applied to the backing
//!   directory at once and journaled with their undo; unlinked and rmdir'd entries, and
//!   the targets renames replace, wait in a hidden holding directory (`.lazyfs-holding` at
//!   the backing root, invisible through the mount) until committed.
//! - **Cut** drops all unsynced file data, then undoes the uncommitted namespace changes
//!   newest first: a created entry is deleted (a directory with everything under it, even
//!   fsynced content, which became unreachable), a removed one comes back with its
//!   content, a rename is reversed (and the target it replaced comes back). So a file whose
//!   data was fsynced but whose directory never was vanishes, as a new WAL segment would
//!   whose directory fsync was forgotten. An undo that no longer fits the tree (its name
//!   was moved since by a committed change, e.g. a cross-directory rename committed by an
//!   fsync of the other directory) is skipped with a warning on stderr.
//!
//! Simplifications: chmod, chown and utimes apply at once and are never undone (kinder
//! than a disk); after a write-back the backing file's mtime is the time of the fsync.
//! Not supported: RENAME_WHITEOUT, xattrs, fallocate (the kernel answers EOPNOTSUPP).
//! File locks work (the kernel keeps them).
//!
//! # Control socket (`--control`)
//!
//! One command a line, one reply line each; an unknown command gets `err ...`.
//! - `cut` → `ok N`: the power cut above; N counts the files whose unsynced data was
//!   dropped plus the namespace changes undone.
//! - `sync` → `ok`: everything becomes durable, as if every file and directory had been
//!   fsynced.
//! - `stats` → `ok unsynced_files=F unsynced_bytes=B unsynced_entries=E`: files with
//!   unsynced data, the memory their pages hold, and uncommitted namespace changes.
//!
//! # Caching, and what a user must know
//!
//! Entry and attribute TTLs are zero and each open drops the kernel's cached pages of the
//! file; a cut also invalidates every inode the kernel holds. Still, no process should
//! have files open under the mount during a cut: its descriptors keep pointing at files a
//! cut may have deleted. The harness stops the node, cuts, and restarts it on the same
//! mount. SIGTERM or SIGINT unmounts, cuts (unsynced data is simply lost) and exits 0. If
//! this process dies otherwise, fusermount3 (`auto_unmount`) still removes the mount, but
//! nothing is undone; a leftover holding directory is deleted at the next start.
//!
//! Needs root, /dev/fuse and fusermount3. Prints `ready` on stdout once the mount is up
//! and the control socket listens.

mod control;
mod fs;
mod journal;
mod pages;
mod state;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use fuser::{Config, MountOption, Session, SessionACL};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::fs::LazyFs;
use crate::state::{Shared, HOLDING_NAME};

/// FUSE worker threads: one per core of the test machines; the state lock serializes
/// most requests anyway, this only overlaps reads of unchanged data.
const FUSE_THREADS: usize = 2;
/// How long shutdown waits for the kernel to end the FUSE session after the unmount;
/// past it we cut and exit anyway (exiting closes /dev/fuse, which ends it too).
const UNMOUNT_WAIT: Duration = Duration::from_secs(5);

/// Serves DIR --backing at --mount, keeping every unsynced change so that `cut` on the
/// control socket can drop it like a power loss.
#[derive(Parser, Debug)]
#[command(name = "flotilla-lazyfs", version)]
struct Args {
    /// The directory whose files are served; it holds what a disk would.
    #[arg(long, value_name = "DIR")]
    backing: PathBuf,
    /// The empty directory to mount on.
    #[arg(long, value_name = "DIR")]
    mount: PathBuf,
    /// Unix socket for the commands `cut`, `sync` and `stats`, one a line.
    #[arg(long, value_name = "SOCKET_PATH")]
    control: PathBuf,
}

enum Event {
    Signal,
    SessionEnded(std::io::Result<()>),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flotilla-lazyfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    // Create requests carry their final mode (the caller's umask is already in it or
    // beside it); ours must not mask it a second time.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    raise_fd_limit();
    check_dirs(args)?;
    let backing =
        state::open_dir(&args.backing).with_context(|| format!("backing {}", args.backing.display()))?;
    let holding = prepare_holding(&args.backing)?;
    let shared = Arc::new(Shared::new(backing, holding)?);
    let listener = bind_control(&args.control)?;

    let (events_tx, events) = mpsc::channel();
    // Registered before mounting, so a signal during the mount still unmounts cleanly.
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("signal handlers")?;
    let tx = events_tx.clone();
    std::thread::spawn(move || {
        for _ in signals.forever() {
            let _ = tx.send(Event::Signal);
        }
    });

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("flotilla-lazyfs".into()),
        MountOption::Subtype("lazyfs".into()),
        MountOption::DefaultPermissions,
        // fusermount3 stays behind and unmounts if this process dies without doing so.
        MountOption::AutoUnmount,
    ];
    // auto_unmount needs allow_root or allow_other; root only is the narrower one.
    config.acl = SessionACL::RootAndOwner;
    config.n_threads = Some(FUSE_THREADS);
    config.clone_fd = true;
    let session = match Session::new(LazyFs(shared.clone()), &args.mount, &config) {
        Ok(session) => session,
        Err(e) => {
            cleanup(&shared, &args.backing, &args.control);
            return Err(anyhow::Error::new(e).context(format!("mounting on {}", args.mount.display())));
        }
    };
    let notifier = session.notifier();
    let tx = events_tx.clone();
    std::thread::spawn(move || {
        let _ = tx.send(Event::SessionEnded(session.run()));
    });
    let control_shared = shared.clone();
    std::thread::spawn(move || control::serve(listener, control_shared, notifier));

    // A closed stdout only means nobody waits for `ready`; serving goes on.
    let mut stdout = std::io::stdout();
    if let Err(e) = writeln!(stdout, "ready").and_then(|()| stdout.flush()) {
        eprintln!("lazyfs: could not print ready: {e}");
    }

    let result = match events.recv().expect("the signal thread keeps a sender") {
        Event::Signal => {
            detach(&args.mount);
            wait_for_session_end(&events)
        }
        Event::SessionEnded(ended) => {
            detach(&args.mount);
            match ended {
                Ok(()) => Err(anyhow::anyhow!("the mount went away (unmounted from outside?)")),
                Err(e) => Err(anyhow::Error::new(e).context("FUSE session failed")),
            }
        }
    };
    cleanup(&shared, &args.backing, &args.control);
    result
}

fn wait_for_session_end(events: &mpsc::Receiver<Event>) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + UNMOUNT_WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match events.recv_timeout(left) {
            Ok(Event::Signal) => continue,
            Ok(Event::SessionEnded(ended)) => return ended.context("FUSE session failed"),
            Err(_) => {
                eprintln!("lazyfs: the FUSE session did not end within {UNMOUNT_WAIT:?}; exiting anyway");
                return Ok(());
            }
        }
    }
}

/// The last act, however we stop: a stop is a power cut, and the holding directory and
/// the control socket go.
fn cleanup(shared: &Shared, backing: &Path, control: &Path) {
    let (dropped, _) = shared.cut();
    eprintln!("lazyfs: stopped; dropped {dropped} unsynced files and entries");
    if let Err(e) = std::fs::remove_dir(backing.join(HOLDING_NAME)) {
        eprintln!("lazyfs: could not remove the holding directory: {e}");
    }
    let _ = std::fs::remove_file(control);
}

/// Unmounts lazily (MNT_DETACH): never refused, and the kernel ends the FUSE session
/// once the last file under the mount is closed. Not through fuser's unmount: with
/// auto_unmount that only closes fusermount3's socket, and fusermount3 leaves a mount
/// alone while its server still answers.
fn detach(mount: &Path) {
    match nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => {}
        // Already gone (unmounted from outside).
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            eprintln!("lazyfs: umount {}: {e}; trying fusermount3 -u -z", mount.display());
            let status = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(mount).status();
            if let Err(e) = status {
                eprintln!("lazyfs: fusermount3 -u -z: {e}");
            }
        }
    }
}

/// The holding directory of the namespace journal, empty. One left by a run that died is
/// deleted: without its journal its entries cannot be put back.
fn prepare_holding(backing: &Path) -> anyhow::Result<OwnedFd> {
    let path = backing.join(HOLDING_NAME);
    if path.exists() {
        eprintln!("lazyfs: deleting {} left by an earlier run", path.display());
        std::fs::remove_dir_all(&path).with_context(|| format!("deleting {}", path.display()))?;
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    Ok(state::open_dir(&path)?)
}

fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        // A socket left by an earlier run.
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("control socket {}", path.display()))?;
    // Our umask is 0 (see `run`): only root may cut.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Refuses a mount inside the backing tree or the other way round (every access would
/// loop through us), and clears a mount left dead by a lazyfs that was killed.
fn check_dirs(args: &Args) -> anyhow::Result<()> {
    if let Err(e) = std::fs::metadata(&args.mount) {
        if e.raw_os_error() != Some(nix::errno::Errno::ENOTCONN as i32) {
            return Err(anyhow::Error::new(e).context(format!("mount point {}", args.mount.display())));
        }
        eprintln!("lazyfs: {} is a dead FUSE mount; detaching it", args.mount.display());
        detach(&args.mount);
    }
    let mount = args.mount.canonicalize().with_context(|| format!("mount point {}", args.mount.display()))?;
    let backing =
        args.backing.canonicalize().with_context(|| format!("backing {}", args.backing.display()))?;
    if mount.starts_with(&backing) || backing.starts_with(&mount) {
        bail!("--mount {} and --backing {} must not contain each other", mount.display(), backing.display());
    }
    Ok(())
}

/// We hold one O_PATH handle per inode the kernel knows: let the soft limit on open files
/// go up to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
