//! Durability of sled's blob files.
//!
//! sled keeps a value or a tree node bigger than a quarter of its segment (128 KiB with the
//! default 512 KiB segments: every snapshot, a large log entry, a leaf of several big
//! entries) in a file of its own under `<db>/blobs/`, and its `flush` never fsyncs those
//! files: it syncs only its main file, which then points to a blob that a power loss may
//! take with it. (A kill -9 cannot lose them: they are in the page cache.) [`Blobs::sync`]
//! fsyncs every blob file not yet synced at its current size, then the directory.
//!
//! The state machine calls it after persisting a snapshot: the log before a snapshot is
//! purged, so a lost snapshot blob would lose everything it covers. The log's own flushes
//! do not (yet): under the scheduler's big entries sled writes and soon deletes blobs of
//! whole leaves many times a second, and syncing them cost a quarter of the scheduler's
//! throughput; the fix is to keep log pages below the blob size (see ARCHITECTURE.md).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

pub struct Blobs {
    dir: PathBuf,
    /// Blob files synced, with their size then (one still being written is synced again).
    synced: Mutex<HashMap<OsString, u64>>,
}

impl Blobs {
    pub fn new(db: &sled::Db) -> Blobs {
        Blobs { dir: db.context.get_path().join("blobs"), synced: Mutex::new(HashMap::new()) }
    }

    /// Fsyncs the blob files written since the last call; returns how many it synced.
    /// Blocking: call it after `sled::Db::flush`, off the async runtime.
    pub fn sync(&self) -> io::Result<usize> {
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        let mut present = HashMap::with_capacity(synced.len());
        let mut count = 0;
        for entry in entries {
            let entry = entry?;
            // sled deletes blobs it no longer needs at any time.
            let len = match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            let name = entry.file_name();
            if synced.get(&name) != Some(&len) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(e),
                }
                count += 1;
            }
            present.insert(name, len);
        }
        if count > 0 {
            File::open(&self.dir)?.sync_all()?;
        }
        *synced = present;
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_each_blob_once_and_only_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let blobs = Blobs::new(&db);
        db.insert("small", vec![1u8; 1024]).unwrap();
        db.flush().unwrap();
        assert_eq!(blobs.sync().unwrap(), 0, "a small value is inline in sled's log");
        db.insert("big", vec![2u8; 300 * 1024]).unwrap();
        db.flush().unwrap();
        assert!(blobs.sync().unwrap() >= 1, "a 300 KiB value is a blob file of its own");
        assert_eq!(blobs.sync().unwrap(), 0, "nothing new since");
        db.insert("big2", vec![3u8; 300 * 1024]).unwrap();
        db.flush().unwrap();
        assert!(blobs.sync().unwrap() >= 1, "the next one");
    }
}
