//! Namespace changes that no directory fsync has made durable yet, and how to undo them.
//!
//! Each change is applied to the backing directory at once, so lookups, opens and
//! listings stay plain pass-through, and is journaled here with what undoes it. A removed
//! entry (unlink, rmdir, or the target a rename replaces) is not deleted but moved into the
//! holding directory, so undoing the removal is a rename back. An fsync of a directory
//! commits the changes that touched it (their held entries are deleted for good); a cut
//! undoes the rest, newest first.
//!
//! Directories are named by O_PATH handles, not paths: a later rename of a parent then
//! cannot make an undo act on the wrong directory, and the open handle keeps the
//! directory's inode number from being reused while an undo may still need it. Callers
//! serialize every namespace change under one lock, and nothing else writes the backing
//! directory, which is what makes the check-then-act steps below (emptiness, targets) safe.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{renameat, renameat2, AtFlags, RenameFlags};
use nix::sys::stat::{fstatat, FileStat, SFlag};
use nix::unistd::{linkat, unlinkat, UnlinkatFlags};

/// A file's identity in the backing file system: (st_dev, st_ino).
pub type Key = (u64, u64);

pub fn key_of(st: &FileStat) -> Key {
    (st.st_dev, st.st_ino)
}

pub fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// The path through which the kernel reaches the object behind `fd`: how an O_PATH
/// handle is reopened for I/O, listed, or removed recursively.
pub fn proc_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The entry `name` in `dir`, not following a symlink.
pub fn stat_entry(dir: impl AsFd, name: &OsStr) -> io::Result<FileStat> {
    Ok(fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?)
}

/// A directory of the backing tree, as journal entries name it.
#[derive(Clone, Debug)]
pub struct DirRef {
    pub fd: Arc<OwnedFd>,
    pub key: Key,
}

#[derive(Debug)]
enum Op {
    /// `name` was created in `dir` (create, mknod, mkdir, symlink, link) and is `key`.
    Created { dir: DirRef, name: OsString, key: Key },
    /// `name` was moved from `dir` into the holding directory as `held`.
    Removed { dir: DirRef, name: OsString, held: OsString },
    /// `key` was renamed; the entry it replaced, if any, is held as `replaced`.
    Renamed {
        from: DirRef,
        from_name: OsString,
        to: DirRef,
        to_name: OsString,
        key: Key,
        replaced: Option<OsString>,
    },
    /// RENAME_EXCHANGE: its own undo.
    Exchanged { a: DirRef, a_name: OsString, b: DirRef, b_name: OsString },
}

impl Op {
    /// Whether an fsync of directory `key` makes this change durable. A rename touches
    /// both directories, and an fsync of either commits it, as one journal transaction
    /// does on ext4.
    fn touches(&self, key: Key) -> bool {
        match self {
            Op::Created { dir, .. } | Op::Removed { dir, .. } => dir.key == key,
            Op::Renamed { from, to, .. } => from.key == key || to.key == key,
            Op::Exchanged { a, b, .. } => a.key == key || b.key == key,
        }
    }

    fn held(&self) -> Option<&OsStr> {
        match self {
            Op::Removed { held, .. } => Some(held),
            Op::Renamed { replaced, .. } => replaced.as_deref(),
            Op::Created { .. } | Op::Exchanged { .. } => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Op::Created { name, .. } => format!("create of {name:?}"),
            Op::Removed { name, .. } => format!("removal of {name:?}"),
            Op::Renamed { from_name, to_name, .. } => format!("rename of {from_name:?} to {to_name:?}"),
            Op::Exchanged { a_name, b_name, .. } => format!("exchange of {a_name:?} and {b_name:?}"),
        }
    }
}

#[derive(Debug)]
pub struct Journal {
    ops: Vec<Op>,
    holding: OwnedFd,
    next_held: u64,
}

impl Journal {
    /// `holding` is an empty directory on the backing file system, hidden from the mount.
    pub fn new(holding: OwnedFd) -> Journal {
        Journal { ops: Vec::new(), holding, next_held: 0 }
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn created(&mut self, dir: DirRef, name: &OsStr, key: Key) {
        self.ops.push(Op::Created { dir, name: name.to_owned(), key });
    }

    /// unlink (`want_dir` false) or rmdir (true) with the errors those calls give.
    pub fn remove(&mut self, dir: DirRef, name: &OsStr, want_dir: bool) -> io::Result<()> {
        let st = stat_entry(&*dir.fd, name)?;
        match (want_dir, is_dir(&st)) {
            (false, true) => return Err(Errno::EISDIR.into()),
            (true, false) => return Err(Errno::ENOTDIR.into()),
            (true, true) if !dir_is_empty(&dir.fd, name)? => return Err(Errno::ENOTEMPTY.into()),
            _ => {}
        }
        let held = self.next_held_name();
        renameat(&*dir.fd, name, &self.holding, held.as_os_str())?;
        self.ops.push(Op::Removed { dir, name: name.to_owned(), held });
        Ok(())
    }

    /// rename(2)/renameat2(2) with the errors those calls give; RENAME_WHITEOUT is not
    /// supported.
    pub fn rename(
        &mut self,
        from: DirRef,
        from_name: &OsStr,
        to: DirRef,
        to_name: &OsStr,
        flags: RenameFlags,
    ) -> io::Result<()> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            renameat2(&*from.fd, from_name, &*to.fd, to_name, RenameFlags::RENAME_EXCHANGE)?;
            let (a_name, b_name) = (from_name.to_owned(), to_name.to_owned());
            self.ops.push(Op::Exchanged { a: from, a_name, b: to, b_name });
            return Ok(());
        }
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            return Err(Errno::EINVAL.into());
        }
        let src = stat_entry(&*from.fd, from_name)?;
        let dst = match stat_entry(&*to.fd, to_name) {
            Ok(st) => Some(st),
            Err(e) if e.raw_os_error() == Some(Errno::ENOENT as i32) => None,
            Err(e) => return Err(e),
        };
        // The replaced target is kept in holding: a directory (necessarily empty) is moved
        // there first; anything else gets a second hard link there, so the rename itself
        // stays one atomic replace for readers.
        let mut replaced = None;
        if let Some(dst) = dst {
            if key_of(&dst) == key_of(&src) {
                return Ok(()); // Two links to one file: rename(2) does nothing.
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST.into());
            }
            let held = self.next_held_name();
            match (is_dir(&src), is_dir(&dst)) {
                (false, true) => return Err(Errno::EISDIR.into()),
                (true, false) => return Err(Errno::ENOTDIR.into()),
                (true, true) => {
                    if !dir_is_empty(&to.fd, to_name)? {
                        return Err(Errno::ENOTEMPTY.into());
                    }
                    renameat(&*to.fd, to_name, &self.holding, held.as_os_str())?;
                }
                (false, false) => {
                    linkat(&*to.fd, to_name, &self.holding, held.as_os_str(), AtFlags::empty())?
                }
            }
            replaced = Some((held, is_dir(&dst)));
        }
        if let Err(e) = renameat(&*from.fd, from_name, &*to.fd, to_name) {
            if let Some((held, was_dir)) = replaced {
                let back = if was_dir {
                    renameat(&self.holding, held.as_os_str(), &*to.fd, to_name)
                } else {
                    unlinkat(&self.holding, held.as_os_str(), UnlinkatFlags::NoRemoveDir)
                };
                if let Err(back) = back {
                    eprintln!("lazyfs: could not put back {to_name:?} after a failed rename: {back}");
                }
            }
            return Err(e.into());
        }
        self.ops.push(Op::Renamed {
            from,
            from_name: from_name.to_owned(),
            to,
            to_name: to_name.to_owned(),
            key: key_of(&src),
            replaced: replaced.map(|(held, _)| held),
        });
        Ok(())
    }

    /// fsync of directory `key`: its changes become durable. Returns how many.
    pub fn commit_dir(&mut self, key: Key) -> usize {
        let (done, kept): (Vec<Op>, Vec<Op>) =
            std::mem::take(&mut self.ops).into_iter().partition(|op| op.touches(key));
        self.ops = kept;
        self.purge(&done);
        done.len()
    }

    /// Every change becomes durable. Returns how many there were.
    pub fn commit_all(&mut self) -> usize {
        let done = std::mem::take(&mut self.ops);
        self.purge(&done);
        done.len()
    }

    /// The power cut: undoes every change, newest first. An undo that no longer fits the
    /// tree (its entry was since moved by a committed change) is skipped with a warning;
    /// whatever stays in holding afterwards is deleted. Returns how many changes there were.
    pub fn undo_all(&mut self) -> usize {
        let ops = std::mem::take(&mut self.ops);
        for op in ops.iter().rev() {
            if let Err(e) = self.undo(op) {
                eprintln!("lazyfs: cut skipped the undo of the {}: {e}", op.describe());
            }
        }
        match std::fs::read_dir(proc_path(&self.holding)) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    self.delete_held(&entry.file_name());
                }
            }
            Err(e) => eprintln!("lazyfs: could not list the holding directory: {e}"),
        }
        ops.len()
    }

    fn undo(&self, op: &Op) -> io::Result<()> {
        match op {
            Op::Created { dir, name, key } => {
                if key_of(&stat_entry(&*dir.fd, name)?) != *key {
                    return Err(io::Error::other("the name now holds another file"));
                }
                remove_tree(&dir.fd, name)
            }
            Op::Removed { dir, name, held } => Ok(renameat2(
                &self.holding,
                held.as_os_str(),
                &*dir.fd,
                name.as_os_str(),
                RenameFlags::RENAME_NOREPLACE,
            )?),
            Op::Renamed { from, from_name, to, to_name, key, replaced } => {
                if key_of(&stat_entry(&*to.fd, to_name)?) != *key {
                    return Err(io::Error::other("the name now holds another file"));
                }
                renameat2(
                    &*to.fd,
                    to_name.as_os_str(),
                    &*from.fd,
                    from_name.as_os_str(),
                    RenameFlags::RENAME_NOREPLACE,
                )?;
                if let Some(held) = replaced {
                    renameat2(
                        &self.holding,
                        held.as_os_str(),
                        &*to.fd,
                        to_name.as_os_str(),
                        RenameFlags::RENAME_NOREPLACE,
                    )?;
                }
                Ok(())
            }
            Op::Exchanged { a, a_name, b, b_name } => Ok(renameat2(
                &*a.fd,
                a_name.as_os_str(),
                &*b.fd,
                b_name.as_os_str(),
                RenameFlags::RENAME_EXCHANGE,
            )?),
        }
    }

    fn purge(&self, done: &[Op]) {
        for held in done.iter().filter_map(Op::held) {
            self.delete_held(held);
        }
    }

    fn delete_held(&self, held: &OsStr) {
        if let Err(e) = remove_tree(&self.holding, held) {
            eprintln!("lazyfs: could not delete {held:?} from the holding directory: {e}");
        }
    }

    fn next_held_name(&mut self) -> OsString {
        self.next_held += 1;
        OsString::from(self.next_held.to_string())
    }
}

fn dir_is_empty(dir: &OwnedFd, name: &OsStr) -> io::Result<bool> {
    Ok(std::fs::read_dir(proc_path(dir).join(name))?.next().is_none())
}

/// Deletes `name` in `dir`, with everything under it if it is a directory: an entry that
/// never became durable takes its subtree with it, as on a disk.
fn remove_tree(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    if is_dir(&stat_entry(dir, name)?) {
        std::fs::remove_dir_all(proc_path(dir).join(name))
    } else {
        Ok(unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?)
    }
}
