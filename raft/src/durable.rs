//! Making files durable: what an fsync covers, in one place.
//!
//! - [`replace`]: a small file replaced atomically (temp file, fsync, rename, fsync of the
//!   directory): the node-id marker, the Raft log's `meta` (vote, last purged id).
//! - [`create_dir`] / [`sync_dir`]: a new file or directory's entry is durable only once
//!   its parent directory is fsynced.
//! - [`sync_store`], for sled, where the snapshots live: sled's `flush` makes its main file
//!   durable with `sync_file_range` (no file size or metadata, no device-cache flush),
//!   keeps any value over 128 KiB (every snapshot) in a blob file of its own that it never
//!   fsyncs, and never fsyncs its directories. A power cut right after a snapshot could
//!   therefore take it, while the log it covers is already purged. `sync_store` fsyncs
//!   every file under sled's directory and the directories themselves: called after each
//!   snapshot is persisted and before openraft may purge the log behind it, and after the
//!   node id is first stored. Snapshots are rare (every `SNAPSHOT_LOGS` entries), so
//!   syncing everything is cheap; the Raft log itself does not live in sled
//!   (`log_store.rs`).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Fsyncs a directory: the entries created, renamed or removed in it become durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and missing parents) and makes its entry durable in its parent.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => Ok(()),
    }
}

/// Replaces `path` with `bytes` atomically and durably: a temp file beside it, fsync,
/// rename, fsync of the directory. A reader sees the old content or the new, never a mix.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => Ok(()),
    }
}

/// Fsyncs every regular file under `dir` (recursively), then each directory. Blocking:
/// call it after `sled::Db::flush`, off the async runtime. Returns the number of files.
pub fn sync_store(dir: &Path) -> io::Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        // sled deletes files it no longer needs at any time.
        let kind = match entry.file_type() {
            Ok(k) => k,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        if kind.is_dir() {
            count += sync_store(&entry.path())?;
        } else if kind.is_file() {
            match File::open(entry.path()) {
                Ok(f) => f.sync_all()?,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            }
            count += 1;
        }
    }
    sync_dir(dir)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_the_main_file_and_the_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        db.insert("big", vec![2u8; 300 * 1024]).unwrap();
        db.flush().unwrap();
        assert!(dir.path().join("blobs").read_dir().unwrap().count() >= 1, "a 300 KiB value is a blob");
        // conf, db, at least one blob.
        assert!(sync_store(dir.path()).unwrap() >= 3);
    }
}
