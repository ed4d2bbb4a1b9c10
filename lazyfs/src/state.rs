//! The file system's state and operations, without the FUSE protocol: inodes, open
//! handles, unsynced file data (`pages`) and unsynced namespace changes (`journal`).
//!
//! Inodes are O_PATH handles on backing files, keyed by (st_dev, st_ino) and numbered by
//! us. Handles rather than paths because a rename then needs no bookkeeping here, and an
//! open handle keeps its inode number from being reused while the kernel may still name
//! it. One mutex guards all state: the workload is a few hundred small writes a second,
//! and one lock makes every namespace change atomic with its journal entry. Only reads of
//! files without unsynced data and the fsyncs of backing files run outside it.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirEntryExt, FileExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};
use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{fstat, mkdirat, mknodat, utimensat, FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::statvfs::{fstatvfs, Statvfs};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, linkat, symlinkat, Gid, Uid};

use crate::journal::{key_of, proc_path, stat_entry, DirRef, Journal, Key};
use crate::pages::Dirty;

/// The holding directory of `journal`, at the backing root, hidden from the mount.
pub const HOLDING_NAME: &str = ".lazyfs-holding";

/// The kernel never forgets the root; this count keeps it from being dropped.
const PINNED: u64 = u64::MAX / 2;

const ROOT: u64 = INodeNo::ROOT.0;

#[derive(Debug)]
struct Node {
    fd: Arc<OwnedFd>,
    key: Key,
    /// Lookups the kernel holds: the node goes when it forgets them all and the file has
    /// no unsynced data (which needs the handle to be written back).
    nlookup: u64,
}

#[derive(Debug)]
struct DirtyFile {
    data: Dirty,
    mtime: SystemTime,
}

#[derive(Debug)]
pub struct DirEntryOut {
    pub ino: u64,
    pub kind: FileType,
    pub name: OsString,
}

/// The attribute changes of one setattr request.
#[derive(Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

/// The caller of a create-like request, who owns what it creates.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// What `stats` reports.
#[derive(Debug)]
pub struct Stats {
    pub unsynced_files: usize,
    pub unsynced_bytes: u64,
    pub unsynced_entries: usize,
}

#[derive(Debug)]
struct State {
    nodes: HashMap<u64, Node>,
    inos: HashMap<Key, u64>,
    next_ino: u64,
    /// Open files: inode and backing file, opened for reads of unchanged ranges.
    files: HashMap<u64, (u64, Arc<File>)>,
    /// Open directories: the listing taken at opendir, so offsets stay stable.
    dirs: HashMap<u64, Vec<DirEntryOut>>,
    next_fh: u64,
    dirty: HashMap<u64, DirtyFile>,
    journal: Journal,
}

/// The state shared by the FUSE threads and the control server.
#[derive(Debug)]
pub struct Shared {
    state: Mutex<State>,
}

fn err(e: Errno) -> io::Error {
    e.into()
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = Duration::from_nanos(nsecs as u64);
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

fn kind_of(st: &FileStat) -> FileType {
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFDIR => FileType::Directory,
        SFlag::S_IFLNK => FileType::Symlink,
        SFlag::S_IFIFO => FileType::NamedPipe,
        SFlag::S_IFSOCK => FileType::Socket,
        SFlag::S_IFCHR => FileType::CharDevice,
        SFlag::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn hidden(parent: u64, name: &OsStr) -> bool {
    parent == ROOT && name == HOLDING_NAME
}

/// The mode bits a create-like request asks for (the kernel may or may not have applied
/// the umask already; applying it twice changes nothing).
fn perm(mode: u32, umask: u32) -> Mode {
    Mode::from_bits_truncate(mode & !umask & 0o7777)
}

/// pread until `buf` is full or the file ends; the rest of `buf` is left as it is.
fn read_full_at(file: &File, mut offset: u64, mut buf: &mut [u8]) -> io::Result<usize> {
    let mut total = 0;
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                offset += n as u64;
                buf = &mut buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Opens the object behind an O_PATH handle for I/O: read-write where possible (root
/// may), else read-only.
fn reopen(fd: &OwnedFd) -> io::Result<File> {
    let path = proc_path(fd);
    File::options().read(true).write(true).open(&path).or_else(|_| File::open(&path))
}

fn open_path(dir: &OwnedFd, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(openat(dir, name, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())?)
}

/// Opens a directory to serve (the backing root, the holding directory) as a handle.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?)
}

impl Shared {
    /// Serves `backing` (an open directory) with `holding` as the journal's holding area.
    pub fn new(backing: OwnedFd, holding: OwnedFd) -> io::Result<Shared> {
        let st = fstat(&backing)?;
        let root = Node { fd: Arc::new(backing), key: key_of(&st), nlookup: PINNED };
        let state = State {
            inos: HashMap::from([(root.key, ROOT)]),
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            files: HashMap::new(),
            dirs: HashMap::new(),
            next_fh: 0,
            dirty: HashMap::new(),
            journal: Journal::new(holding),
        };
        Ok(Shared { state: Mutex::new(state) })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("a lazyfs handler panicked while holding the state")
    }

    /// The power cut: drops all unsynced data and undoes all unsynced namespace changes.
    /// Returns how many files and entries were dropped, and the inodes whose kernel
    /// caches the caller should invalidate (after this returns, without our lock).
    pub fn cut(&self) -> (usize, Vec<u64>) {
        let mut state = self.lock();
        let dropped: Vec<u64> = state.dirty.drain().map(|(ino, _)| ino).collect();
        let undone = state.journal.undo_all();
        for &ino in &dropped {
            state.maybe_drop(ino);
        }
        (dropped.len() + undone, state.nodes.keys().copied().collect())
    }

    /// Makes everything durable, as if every file and directory had been fsynced.
    pub fn sync(&self) -> io::Result<()> {
        let mut state = self.lock();
        let inos: Vec<u64> = state.dirty.keys().copied().collect();
        for ino in inos {
            if let Some(file) = state.write_back(ino)? {
                file.sync_all()?;
            }
        }
        state.journal.commit_all();
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        let state = self.lock();
        Stats {
            unsynced_files: state.dirty.len(),
            unsynced_bytes: state.dirty.values().map(|d| d.data.held_bytes()).sum(),
            unsynced_entries: state.journal.len(),
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> io::Result<FileAttr> {
        if hidden(parent, name) {
            return Err(err(Errno::ENOENT));
        }
        let mut state = self.lock();
        let fd = open_path(&state.node(parent)?.fd, name)?;
        let st = fstat(&fd)?;
        let ino = state.intern(fd, &st);
        Ok(state.attr(ino, &st))
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        let mut state = self.lock();
        if let Some(node) = state.nodes.get_mut(&ino) {
            node.nlookup = node.nlookup.saturating_sub(nlookup);
            state.maybe_drop(ino);
        }
    }

    pub fn getattr(&self, ino: u64) -> io::Result<FileAttr> {
        self.lock().getattr(ino)
    }

    pub fn setattr(&self, ino: u64, change: SetAttr) -> io::Result<FileAttr> {
        let mut state = self.lock();
        let fd = state.node(ino)?.fd.clone();
        if let Some(mode) = change.mode {
            std::fs::set_permissions(proc_path(&*fd), std::fs::Permissions::from_mode(mode & 0o7777))?;
        }
        if change.uid.is_some() || change.gid.is_some() {
            let (uid, gid) = (change.uid.map(Uid::from_raw), change.gid.map(Gid::from_raw));
            fchownat(&*fd, "", uid, gid, AtFlags::AT_EMPTY_PATH)?;
        }
        if let Some(size) = change.size {
            let dirty = state.dirty(ino)?;
            dirty.data.truncate(size);
            dirty.mtime = SystemTime::now();
        }
        if change.atime.is_some() || change.mtime.is_some() {
            let spec = |t: Option<TimeOrNow>| match t {
                None => TimeSpec::UTIME_OMIT,
                Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
                Some(TimeOrNow::SpecificTime(t)) => {
                    TimeSpec::from_duration(t.duration_since(UNIX_EPOCH).unwrap_or_default())
                }
            };
            let (atime, mtime) = (spec(change.atime), spec(change.mtime));
            let path = proc_path(&*fd);
            utimensat(nix::fcntl::AT_FDCWD, &path, &atime, &mtime, UtimensatFlags::FollowSymlink)?;
            if let (Some(dirty), Some(t)) = (state.dirty.get_mut(&ino), change.mtime) {
                dirty.mtime = match t {
                    TimeOrNow::Now => SystemTime::now(),
                    TimeOrNow::SpecificTime(t) => t,
                };
            }
        }
        state.getattr(ino)
    }

    pub fn readlink(&self, ino: u64) -> io::Result<OsString> {
        let fd = self.lock().node(ino)?.fd.clone();
        Ok(nix::fcntl::readlinkat(&*fd, "")?)
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        owner: Owner,
    ) -> io::Result<FileAttr> {
        self.create_entry(parent, name, Some(owner), |dir| {
            let kind = SFlag::from_bits_truncate(mode) & SFlag::S_IFMT;
            Ok(mknodat(dir, name, kind, perm(mode, umask), rdev.into())?)
        })
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        owner: Owner,
    ) -> io::Result<FileAttr> {
        self.create_entry(parent, name, Some(owner), |dir| Ok(mkdirat(dir, name, perm(mode, umask))?))
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &Path, owner: Owner) -> io::Result<FileAttr> {
        self.create_entry(parent, name, Some(owner), |dir| Ok(symlinkat(target, dir, name)?))
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> io::Result<FileAttr> {
        let fd = self.lock().node(ino)?.fd.clone();
        // AT_EMPTY_PATH links the inode behind the handle itself (we run as root).
        self.create_entry(newparent, newname, None, |dir| {
            Ok(linkat(&*fd, "", dir, newname, AtFlags::AT_EMPTY_PATH)?)
        })
    }

    /// Creates and opens a regular file; returns its attributes and file handle.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        owner: Owner,
    ) -> io::Result<(FileAttr, u64)> {
        let mut file = None;
        let attr = self.create_entry(parent, name, Some(owner), |dir| {
            let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC;
            file = Some(File::from(openat(dir, name, flags, perm(mode, umask))?));
            Ok(())
        })?;
        let file = file.expect("set by a successful create");
        let mut state = self.lock();
        let fh = state.new_fh();
        state.files.insert(fh, (attr.ino.0, Arc::new(file)));
        Ok((attr, fh))
    }

    /// unlink (`want_dir` false) or rmdir (true).
    pub fn remove(&self, parent: u64, name: &OsStr, want_dir: bool) -> io::Result<()> {
        if hidden(parent, name) {
            return Err(err(Errno::ENOENT));
        }
        let mut state = self.lock();
        let dir = state.dir_ref(parent)?;
        state.journal.remove(dir, name, want_dir)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> io::Result<()> {
        if hidden(parent, name) || hidden(newparent, newname) {
            return Err(err(Errno::EPERM));
        }
        let flags = RenameFlags::from_bits(flags).ok_or(err(Errno::EINVAL))?;
        let mut state = self.lock();
        let (from, to) = (state.dir_ref(parent)?, state.dir_ref(newparent)?);
        state.journal.rename(from, name, to, newname, flags)
    }

    pub fn open(&self, ino: u64) -> io::Result<u64> {
        let mut state = self.lock();
        let file = reopen(&state.node(ino)?.fd)?;
        let fh = state.new_fh();
        state.files.insert(fh, (ino, Arc::new(file)));
        Ok(fh)
    }

    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let state = self.lock();
        let file = state.file(fh)?;
        if let Some(dirty) = state.dirty.get(&ino) {
            let mut base = |off: u64, buf: &mut [u8]| read_full_at(&file, off, buf).map(drop);
            return dirty.data.read(offset, size.into(), &mut base);
        }
        // Nothing unsynced: a plain pread, without holding up other requests.
        drop(state);
        let mut buf = vec![0u8; size as usize];
        let n = read_full_at(&file, offset, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        let file = state.file(fh)?;
        let dirty = state.dirty(ino)?;
        let mut base = |off: u64, buf: &mut [u8]| read_full_at(&file, off, buf).map(drop);
        dirty.data.write(offset, data, &mut base)?;
        dirty.mtime = SystemTime::now();
        Ok(())
    }

    pub fn release(&self, fh: u64) {
        self.lock().files.remove(&fh);
    }

    /// fsync/fdatasync of a file: its data becomes durable (its name does not).
    pub fn fsync(&self, ino: u64, datasync: bool) -> io::Result<()> {
        // Written back under the lock, fsynced outside it so other requests go on.
        let written = self.lock().write_back(ino)?;
        match written {
            Some(file) if datasync => file.sync_data(),
            Some(file) => file.sync_all(),
            None => Ok(()),
        }
    }

    pub fn opendir(&self, ino: u64) -> io::Result<u64> {
        let mut state = self.lock();
        let entries = state.list_dir(ino)?;
        let fh = state.new_fh();
        state.dirs.insert(fh, entries);
        Ok(fh)
    }

    /// Passes the entries of an open directory from `offset` on to `add`, with the offset
    /// of the entry after each, until `add` returns true (the reply is full).
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntryOut, u64) -> bool,
    ) -> io::Result<()> {
        let state = self.lock();
        let entries = state.dirs.get(&fh).ok_or(err(Errno::EBADF))?;
        for (i, entry) in entries.iter().enumerate().skip(offset as usize) {
            if add(entry, i as u64 + 1) {
                break;
            }
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        self.lock().dirs.remove(&fh);
    }

    /// fsync of a directory: the namespace changes that touched it become durable.
    pub fn fsyncdir(&self, ino: u64) -> io::Result<()> {
        let fd = {
            let mut state = self.lock();
            let (key, fd) = state.node(ino).map(|n| (n.key, n.fd.clone()))?;
            state.journal.commit_dir(key);
            fd
        };
        File::open(proc_path(&*fd))?.sync_all()
    }

    pub fn statfs(&self) -> io::Result<Statvfs> {
        let root = self.lock().node(ROOT)?.fd.clone();
        Ok(fstatvfs(&*root)?)
    }

    /// A create-like request: `make` creates `name` in the directory it is given, then the
    /// entry is journaled, given to `owner` (not for hard links) and looked up.
    fn create_entry(
        &self,
        parent: u64,
        name: &OsStr,
        owner: Option<Owner>,
        make: impl FnOnce(&OwnedFd) -> io::Result<()>,
    ) -> io::Result<FileAttr> {
        if hidden(parent, name) {
            return Err(err(Errno::EPERM));
        }
        let mut state = self.lock();
        let dir = state.dir_ref(parent)?;
        make(&dir.fd)?;
        let st = stat_entry(&*dir.fd, name)?;
        state.journal.created(dir.clone(), name, key_of(&st));
        let fd = open_path(&dir.fd, name)?;
        if let Some(owner) = owner.filter(|o| (o.uid, o.gid) != (st.st_uid, st.st_gid)) {
            let (uid, gid) = (Some(Uid::from_raw(owner.uid)), Some(Gid::from_raw(owner.gid)));
            fchownat(&fd, "", uid, gid, AtFlags::AT_EMPTY_PATH)?;
        }
        let st = fstat(&fd)?;
        let ino = state.intern(fd, &st);
        Ok(state.attr(ino, &st))
    }
}

impl State {
    fn node(&self, ino: u64) -> io::Result<&Node> {
        self.nodes.get(&ino).ok_or(err(Errno::ESTALE))
    }

    fn dir_ref(&self, ino: u64) -> io::Result<DirRef> {
        let node = self.node(ino)?;
        Ok(DirRef { fd: node.fd.clone(), key: node.key })
    }

    fn file(&self, fh: u64) -> io::Result<Arc<File>> {
        self.files.get(&fh).map(|(_, file)| file.clone()).ok_or(err(Errno::EBADF))
    }

    fn new_fh(&mut self) -> u64 {
        self.next_fh += 1;
        self.next_fh
    }

    fn attr(&self, ino: u64, st: &FileStat) -> FileAttr {
        let mut attr = FileAttr {
            ino: INodeNo(ino),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: kind_of(st),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: 4096,
            flags: 0,
        };
        if let Some(dirty) = self.dirty.get(&ino) {
            attr.size = dirty.data.size();
            attr.blocks = attr.size.div_ceil(512);
            attr.mtime = dirty.mtime;
            attr.ctime = dirty.mtime;
        }
        attr
    }

    fn getattr(&self, ino: u64) -> io::Result<FileAttr> {
        Ok(self.attr(ino, &fstat(&*self.node(ino)?.fd)?))
    }

    /// Counts one kernel lookup of the object behind `fd`, numbering it if it is new.
    fn intern(&mut self, fd: OwnedFd, st: &FileStat) -> u64 {
        let key = key_of(st);
        if let Some(&ino) = self.inos.get(&key) {
            self.nodes.get_mut(&ino).expect("inos and nodes agree").nlookup += 1;
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inos.insert(key, ino);
        self.nodes.insert(ino, Node { fd: Arc::new(fd), key, nlookup: 1 });
        ino
    }

    fn maybe_drop(&mut self, ino: u64) {
        let unused = self.nodes.get(&ino).is_some_and(|n| n.nlookup == 0) && !self.dirty.contains_key(&ino);
        if unused {
            let node = self.nodes.remove(&ino).expect("checked above");
            self.inos.remove(&node.key);
        }
    }

    /// The unsynced state of `ino`, created from the backing file on first use.
    fn dirty(&mut self, ino: u64) -> io::Result<&mut DirtyFile> {
        if !self.dirty.contains_key(&ino) {
            let st = fstat(&*self.node(ino)?.fd)?;
            if kind_of(&st) != FileType::RegularFile {
                return Err(err(Errno::EINVAL));
            }
            let data = Dirty::new(st.st_size as u64);
            self.dirty.insert(ino, DirtyFile { data, mtime: SystemTime::now() });
        }
        Ok(self.dirty.get_mut(&ino).expect("inserted above"))
    }

    /// Writes the unsynced data of `ino` to its backing file and forgets it; the caller
    /// fsyncs the returned file.
    fn write_back(&mut self, ino: u64) -> io::Result<Option<File>> {
        let Some(dirty) = self.dirty.remove(&ino) else { return Ok(None) };
        let result = self
            .node(ino)
            .and_then(|node| reopen(&node.fd))
            .and_then(|file| dirty.data.write_back(&file).map(|()| file));
        match result {
            Ok(file) => {
                self.maybe_drop(ino);
                Ok(Some(file))
            }
            Err(e) => {
                // Keep the data: the application may retry the fsync.
                self.dirty.insert(ino, dirty);
                Err(e)
            }
        }
    }

    fn list_dir(&self, ino: u64) -> io::Result<Vec<DirEntryOut>> {
        let node = self.node(ino)?;
        let mut out = vec![
            DirEntryOut { ino, kind: FileType::Directory, name: ".".into() },
            DirEntryOut { ino: ROOT, kind: FileType::Directory, name: "..".into() },
        ];
        for entry in std::fs::read_dir(proc_path(&*node.fd))? {
            let entry = entry?;
            let name = entry.file_name();
            if hidden(ino, &name) {
                continue;
            }
            let kind = entry.file_type().ok().and_then(FileType::from_std).unwrap_or(FileType::RegularFile);
            out.push(DirEntryOut { ino: entry.ino(), kind, name });
        }
        Ok(out)
    }
}
