//! The Raft log and vote in files of flotilla's own: append-only, checksummed segments
//! with an explicit `fdatasync` before an append is acknowledged.
//!
//! Why not sled (which holds the snapshots): sled 0.34 makes a write "durable" with
//! `sync_file_range`, which persists no file size or metadata and flushes no device cache,
//! and keeps values over 128 KiB in blob files it never fsyncs; a power cut could take
//! acknowledged entries with it (docs/durability.md has the trace and the test that shows
//! it). A log is the easy case for files: it is appended at the end, cut at the end
//! (conflicting entries of an old term) and dropped from the front (after a snapshot).
//!
//! Layout of the directory (`data-dir/raft-log/`):
//! - `<first index, 20 digits>.wal`: a segment, named after the index of its first entry.
//!   Records follow each other: `len: u32 LE`, `crc: u32 LE` (CRC-32 of the length bytes
//!   and the body), then `len` bytes of body: a kind byte and its payload — an entry
//!   (`1`, its index as u64 LE, the msgpack entry) or the committed log id (`2`, msgpack;
//!   written after the entries it covers, never synced on its own: losing it only means
//!   applying less of the log at start-up). A segment is closed (fsynced) before the next is
//!   created at [`SEGMENT_BYTES`]; the directory is fsynced after each create.
//! - `meta`: the vote and the last purged log id (msgpack behind the same length and
//!   checksum), replaced atomically: temp file, fsync, rename, fsync of the directory.
//!
//! Durability: `append` writes the records (readable at once, by `pread`) and hands its
//! callback to one flusher thread, which takes every callback waiting, runs one
//! `fdatasync` for all of them and completes them in order: group commit. A vote is durable
//! before `save_vote` returns. A purge records the new last purged id durably before it
//! deletes segments; a truncation deletes later segments, then cuts the one holding the
//! first removed entry and fsyncs it before returning, so an entry appended after it can
//! never sit behind a removed one.
//!
//! Start-up reads every segment. A record cut short or failing its checksum at the end of
//! the last segment is a write the power cut interrupted (it was never acknowledged): the
//! tail is truncated there and logged. Anything wrong before that (a bad record followed
//! by more data, a bad record in an older segment, a gap between segments) is corruption:
//! the node refuses to start and says how to rebuild it from its peers.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::codec::{decode, encode};
use crate::durable::{create_dir, replace, sync_dir};
use crate::{Entry, NodeId, TypeConfig};

/// A segment is closed and a new one started once it holds this many bytes: big enough
/// that rolling over (an fsync of the old file and of the directory) is rare, small enough
/// that a purge after a snapshot frees space soon.
pub const SEGMENT_BYTES: u64 = 64 << 20;

const KIND_ENTRY: u8 = 1;
const KIND_COMMITTED: u8 = 2;
/// The one record of `meta`.
const KIND_META: u8 = 3;
const HEADER: usize = 8;
/// No record is larger: a bigger length field is a torn or corrupted header.
const MAX_RECORD: u32 = 1 << 30;
const META: &str = "meta";

/// What `meta` holds.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
}

/// Where one entry's record is.
#[derive(Clone)]
struct Slot {
    file: Arc<File>,
    offset: u64,
    len: u32,
}

/// The newest entries as they were appended, kept decoded and encoded: openraft reads
/// every entry back soon after its append, once per follower's replication stream on the
/// leader and for the state machine, and a clone is cheaper than decoding the record again
/// (perf of the scheduler benchmark had `read_entry`'s decoding at 13% of the leader's
/// CPU); the encoding is what the leader sends its followers ([`EntryBytes`]), so that an
/// entry is encoded once, not once more per follower (9% of the leader's CPU). Bounded;
/// older entries (a follower catching up, a restart) are read from the segments.
#[derive(Default)]
struct Recent {
    /// Consecutive entries, the newest last, each with its encoding (the record's payload;
    /// so `entries[i]` is entry `first_index + i`).
    entries: VecDeque<(Entry, Bytes)>,
    bytes: usize,
}

/// What [`Recent`] keeps at most: entries, and bytes of their records.
const RECENT_ENTRIES: usize = 1024;
const RECENT_BYTES: usize = 2 << 20;

impl Recent {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, entry: Entry, encoded: Bytes) {
        let bytes = encoded.len();
        let follows = self.entries.back().is_none_or(|(e, _)| e.log_id.index + 1 == entry.log_id.index);
        if !follows {
            self.entries.clear();
            self.bytes = 0;
        }
        self.entries.push_back((entry, encoded));
        self.bytes += bytes;
        while self.entries.len() > RECENT_ENTRIES || (self.bytes > RECENT_BYTES && self.entries.len() > 1) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, b)) = self.entries.pop_front() {
            self.bytes -= b.len();
        }
    }

    /// Forgets the entries from `index` on (a truncation).
    fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|(e, _)| e.log_id.index >= index) {
            let (_, b) = self.entries.pop_back().expect("checked");
            self.bytes -= b.len();
        }
    }

    /// Forgets the entries up to `index` (a purge).
    fn purge(&mut self, index: u64) {
        while self.first_index().is_some_and(|f| f <= index) {
            self.pop_front();
        }
    }

    fn slot(&self, index: u64) -> Option<&(Entry, Bytes)> {
        let first = self.first_index()?;
        let i = usize::try_from(index.checked_sub(first)?).ok()?;
        self.entries.get(i)
    }

    fn get(&self, index: u64) -> Option<Entry> {
        self.slot(index).map(|(e, _)| e.clone())
    }

    /// The encoding of `entry` if it is held (the same log id: the same entry).
    fn encoded(&self, entry: &Entry) -> Option<Bytes> {
        self.slot(entry.log_id.index).filter(|(e, _)| e.log_id == entry.log_id).map(|(_, b)| b.clone())
    }
}

/// The encodings of the log's recent entries, for the network: an append to a follower is
/// written from them ([`crate::network`]) instead of encoding each entry again.
#[derive(Clone)]
pub struct EntryBytes(Arc<Mutex<Wal>>);

impl EntryBytes {
    /// Each entry's encoding, as its record holds it; `None` if any is no longer recent.
    pub fn get(&self, entries: &[Entry]) -> Option<Vec<Bytes>> {
        let wal = self.0.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().map(|e| wal.recent.encoded(e)).collect()
    }
}

struct Segment {
    first_index: u64,
    path: PathBuf,
    file: Arc<File>,
    len: u64,
}

struct Wal {
    dir: PathBuf,
    /// In log order; the last one is appended to.
    segments: Vec<Segment>,
    /// The entries after the last purged one, in order: `slots[0]` is entry `first`.
    /// `None` is a hole, which only openraft's storage suite makes (it appends 1 then 3);
    /// such a log is refused when reopened, and openraft itself never writes one.
    slots: VecDeque<Option<Slot>>,
    first: u64,
    last_log_id: Option<LogId<NodeId>>,
    meta: Meta,
    committed: Option<LogId<NodeId>>,
    /// While opening: the index after the last entry read (purged ones included).
    next_scan: u64,
    /// [`SEGMENT_BYTES`]; smaller in tests.
    segment_bytes: u64,
    recent: Recent,
    /// The entries of the last append received from a leader, as it encoded them
    /// ([`LogStore::offer_encoded`]): appending one of them writes these bytes instead of
    /// encoding the decoded entry again.
    offered: Vec<(LogId<NodeId>, Bytes)>,
}

/// One append's wait for its fsync.
struct Flush {
    file: Arc<File>,
    callback: LogFlushed<TypeConfig>,
}

#[derive(Clone)]
pub struct LogStore {
    wal: Arc<Mutex<Wal>>,
    flusher: mpsc::UnboundedSender<Flush>,
    /// The last log id of the snapshot on disk, when the state machine says it.
    snapshot_on_disk: Option<watch::Receiver<Option<LogId<NodeId>>>>,
}

/// How long a purge waits for the snapshot that covers it to be on disk before it goes
/// ahead anyway (an install that failed; openraft retries it).
const PURGE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn io_err(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: io::Error) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn record(kind: u8, index: Option<u64>, payload: &[u8], out: &mut Vec<u8>) {
    let len = 1 + index.map_or(0, |_| 8) + payload.len();
    let start = out.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    if let Some(i) = index {
        out.extend_from_slice(&i.to_le_bytes());
    }
    out.extend_from_slice(payload);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start..start + 4]);
    crc.update(&out[start + HEADER..]);
    out[start + 4..start + HEADER].copy_from_slice(&crc.finalize().to_le_bytes());
}

/// The body of the record at the start of `bytes`, or why there is none.
fn parse(bytes: &[u8]) -> Result<&[u8], &'static str> {
    if bytes.len() < HEADER {
        return Err("a record header cut short");
    }
    let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_RECORD {
        return Err("an impossible record length");
    }
    let Some(body) = bytes.get(HEADER..HEADER + len as usize) else {
        return Err("a record cut short");
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[..4]);
    crc.update(body);
    if crc.finalize().to_le_bytes() != bytes[4..HEADER] {
        return Err("a checksum mismatch");
    }
    Ok(body)
}

/// Whether a record whose checksum failed is followed by a valid one: a bit flipped in
/// place, not a write cut short (a torn write leaves nothing readable after it).
fn valid_record_follows(bytes: &[u8]) -> bool {
    let len = u32::from_le_bytes(bytes.get(..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]));
    let next = HEADER + len as usize;
    len > 0 && len <= MAX_RECORD && next < bytes.len() && parse(&bytes[next..]).is_ok()
}

fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}.wal")
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).append(true).create(true).open(path)
}

fn write_meta(dir: &Path, meta: &Meta) -> io::Result<()> {
    let mut bytes = Vec::new();
    record(KIND_META, None, &encode(meta).map_err(io::Error::other)?, &mut bytes);
    replace(&dir.join(META), &bytes)
}

fn read_meta(dir: &Path) -> io::Result<Meta> {
    let bytes = match std::fs::read(dir.join(META)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Meta::default()),
        Err(e) => return Err(e),
    };
    // Written whole under a temporary name and renamed: never torn.
    let body = parse(&bytes).map_err(|why| invalid(format!("{}: {why}", dir.join(META).display())))?;
    if body[0] != KIND_META {
        return Err(invalid(format!("{}: not a meta record", dir.join(META).display())));
    }
    decode(&body[1..]).map_err(|e| invalid(format!("{}: {e}", dir.join(META).display())))
}

/// The refusal for corruption before the tail.
fn corrupt(path: &Path, offset: u64, why: &str) -> io::Error {
    invalid(format!(
        "the Raft log is corrupt: {why} at byte {offset} of {}, before its end. This node's copy \
         cannot be trusted; rebuild it from its peers (docs/operations.md, \"Rebuilding a node\")",
        path.display()
    ))
}

impl Wal {
    /// Reads the directory (see the module doc for what is truncated and what refused).
    fn open(dir: &Path, segment_bytes: u64) -> io::Result<Wal> {
        let meta = read_meta(dir)?;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            if let Some(first) = name.strip_suffix(".wal").and_then(|n| n.parse::<u64>().ok()) {
                names.push((first, path));
            }
        }
        names.sort();
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            segments: Vec::new(),
            slots: VecDeque::new(),
            first: meta.last_purged.map_or(0, |l| l.index + 1),
            last_log_id: meta.last_purged,
            meta,
            committed: None,
            next_scan: 0,
            segment_bytes,
            recent: Recent::default(),
            offered: Vec::new(),
        };
        let count = names.len();
        for (n, (first_index, path)) in names.into_iter().enumerate() {
            wal.load_segment(first_index, path, n + 1 == count)?;
        }
        Ok(wal)
    }

    fn load_segment(&mut self, first_index: u64, path: PathBuf, last: bool) -> io::Result<()> {
        // Every index below `floor` is purged; below `covered`, purged or loaded.
        let floor = self.meta.last_purged.map_or(0, |l| l.index + 1);
        let covered = self.next_scan.max(floor);
        let starts_right = if self.next_scan > floor {
            first_index == self.next_scan
        } else {
            // The first segment with live entries; with nothing purged yet the log may start
            // anywhere (openraft starts at 0; its storage suite does not).
            first_index <= covered || self.meta.last_purged.is_none() && self.segments.is_empty()
        };
        if !starts_right {
            return Err(corrupt(
                &path,
                0,
                &format!("a segment starting at entry {first_index} after entry {covered}"),
            ));
        }
        let file = Arc::new(open_append(&path)?);
        let bytes = std::fs::read(&path)?;
        let mut next = first_index;
        let mut offset = 0usize;
        while offset < bytes.len() {
            let body = match parse(&bytes[offset..]) {
                Ok(body) => body,
                Err(why) if last && !valid_record_follows(&bytes[offset..]) => {
                    // The end of the newest segment: everything after the last fsync lives
                    // here, and a power cut may leave any of it torn.
                    tracing::warn!(
                        file = %path.display(), offset, dropped_bytes = bytes.len() - offset, reason = why,
                        "truncating the torn tail of the Raft log (a write a crash or power cut interrupted; it was never acknowledged)"
                    );
                    file.set_len(offset as u64)?;
                    file.sync_all()?;
                    break;
                }
                Err(why) => return Err(corrupt(&path, offset as u64, why)),
            };
            let at = offset as u64;
            offset += HEADER + body.len();
            match body[0] {
                KIND_ENTRY if body.len() > 9 => {
                    let index = u64::from_le_bytes(body[1..9].try_into().expect("8 bytes"));
                    if index != next {
                        return Err(corrupt(&path, at, &format!("entry {index} where {next} belongs")));
                    }
                    next += 1;
                    if index < floor {
                        continue;
                    }
                    let entry: Entry = decode(&body[9..]).map_err(|e| corrupt(&path, at, &e.to_string()))?;
                    if self.slots.is_empty() {
                        self.first = index;
                    }
                    self.slots.push_back(Some(Slot {
                        file: file.clone(),
                        offset: at,
                        len: body.len() as u32 - 9,
                    }));
                    self.last_log_id = Some(entry.log_id);
                }
                KIND_COMMITTED => {
                    self.committed = decode(&body[1..]).map_err(|e| corrupt(&path, at, &e.to_string()))?;
                }
                _ => return Err(corrupt(&path, at, "an unknown record kind")),
            }
        }
        self.next_scan = next;
        if next <= floor {
            // Every entry in it is purged (a purge that a crash interrupted, or one past the
            // end of the log): nothing in it is needed, and appending the next entry after
            // its last one would leave a gap inside it.
            std::fs::remove_file(&path)?;
            return Ok(());
        }
        let len = file.metadata()?.len();
        self.segments.push(Segment { first_index, path, file, len });
        Ok(())
    }

    fn next_index(&self) -> u64 {
        self.last_log_id.map_or(0, |l| l.index + 1)
    }

    /// The segment to append to, rolling over to a new one when the current one is full.
    fn current(&mut self) -> io::Result<&mut Segment> {
        let full = self.segments.last().is_none_or(|s| s.len >= self.segment_bytes);
        if full {
            self.roll_over(self.next_index())?;
        }
        Ok(self.segments.last_mut().expect("a segment exists"))
    }

    /// Closes the current segment (fsync) and starts one named `first_index`.
    fn roll_over(&mut self, first_index: u64) -> io::Result<()> {
        {
            if let Some(old) = self.segments.last() {
                old.file.sync_data()?;
            }
            let path = self.dir.join(segment_name(first_index));
            let file = Arc::new(open_append(&path)?);
            file.set_len(0)?;
            sync_dir(&self.dir)?;
            self.segments.push(Segment { first_index, path, file, len: 0 });
            if self.committed.is_some() {
                self.save_committed(self.committed)?;
            }
        }
        Ok(())
    }

    /// Records the committed log id after what is written (not synced on its own).
    fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> io::Result<()> {
        self.committed = committed;
        if self.segments.is_empty() {
            // Written at the head of the next segment.
            return Ok(());
        }
        let mut buf = Vec::new();
        record(KIND_COMMITTED, None, &encode(&committed).map_err(io::Error::other)?, &mut buf);
        self.write(&buf).map(|_| ())
    }

    /// Appends `buf` to the current segment; returns the file and the offset written at.
    fn write(&mut self, buf: &[u8]) -> io::Result<(Arc<File>, u64)> {
        let seg = self.current()?;
        let at = seg.len;
        (&*seg.file).write_all(buf)?;
        seg.len += buf.len() as u64;
        Ok((seg.file.clone(), at))
    }

    /// The offered encoding of the entry `log_id` names, if it was offered.
    fn take_offered(&mut self, log_id: &LogId<NodeId>) -> Option<Bytes> {
        let first = self.offered.first()?.0.index;
        let i = usize::try_from(log_id.index.checked_sub(first)?).ok()?;
        let (id, bytes) = self.offered.get_mut(i)?;
        (id == log_id).then(|| std::mem::take(bytes)).filter(|b| !b.is_empty())
    }

    fn append(&mut self, entries: Vec<Entry>) -> io::Result<Option<Arc<File>>> {
        let mut last = None;
        for entry in entries {
            let index = entry.log_id.index;
            let next = self.next_index();
            assert!(
                index >= next || self.slots.is_empty(),
                "entry {index} appended over {next} without a truncate"
            );
            if index != next {
                // An empty log may start anywhere (openraft's storage suite starts at 2, and
                // leaves holes); segments are named after their first entry.
                self.roll_over(index)?;
                if !self.slots.is_empty() {
                    self.slots.extend((next..index).map(|_| None));
                }
            }
            let mut buf = Vec::new();
            let payload = match self.take_offered(&entry.log_id) {
                Some(bytes) => bytes,
                None => Bytes::from(encode(&entry).map_err(io::Error::other)?),
            };
            record(KIND_ENTRY, Some(index), &payload, &mut buf);
            let (file, at) = self.write(&buf)?;
            if self.slots.is_empty() {
                self.first = index;
            }
            self.slots.push_back(Some(Slot {
                file: file.clone(),
                offset: at,
                len: (buf.len() - HEADER - 9) as u32,
            }));
            self.last_log_id = Some(entry.log_id);
            self.recent.push(entry, payload);
            last = Some(file);
        }
        Ok(last)
    }

    fn truncate(&mut self, index: u64) -> io::Result<()> {
        if index >= self.next_index() || index < self.first {
            return Ok(());
        }
        let keep = (index - self.first) as usize;
        let cut = self.slots.range(keep..).flatten().next().cloned();
        self.recent.truncate(index);
        // Later segments first, from the end: a crash in between leaves old entries at the
        // end (uncommitted ones, cut again by the leader), never a hole.
        let mut removed = false;
        while self.segments.last().is_some_and(|s| s.first_index > index) {
            let seg = self.segments.pop().expect("checked");
            std::fs::remove_file(&seg.path)?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        if let Some(slot) = cut {
            if let Some(seg) = self.segments.iter_mut().find(|s| Arc::ptr_eq(&s.file, &slot.file)) {
                seg.file.set_len(slot.offset)?;
                seg.file.sync_all()?;
                seg.len = slot.offset;
            }
        }
        self.slots.truncate(keep);
        while self.slots.back().is_some_and(|s| s.is_none()) {
            self.slots.pop_back();
        }
        self.last_log_id = match self.slots.back() {
            Some(Some(s)) => Some(read_entry(s, self.first + self.slots.len() as u64 - 1)?.log_id),
            _ => self.meta.last_purged,
        };
        Ok(())
    }

    fn purge(&mut self, log_id: LogId<NodeId>) -> io::Result<()> {
        if self.meta.last_purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        let mut meta = self.meta.clone();
        meta.last_purged = Some(log_id);
        write_meta(&self.dir, &meta)?;
        self.meta = meta;
        let drop = ((log_id.index + 1).saturating_sub(self.first) as usize).min(self.slots.len());
        self.slots.drain(..drop);
        self.recent.purge(log_id.index);
        // (A purge below the first entry kept leaves `first` where it is.)
        self.first = self.first.max(log_id.index + 1);
        if self.last_log_id.is_none_or(|l| l.index <= log_id.index) {
            // Everything is purged (a snapshot from the leader went past this log): the next
            // entry starts a segment of its own, named after it.
            self.last_log_id = Some(log_id);
            for seg in self.segments.drain(..) {
                std::fs::remove_file(&seg.path)?;
            }
            return Ok(());
        }
        // Whole segments whose entries are all purged: those followed by one starting at or
        // before the first kept entry.
        while self.segments.len() > 1 && self.segments[1].first_index <= self.first {
            let seg = self.segments.remove(0);
            std::fs::remove_file(&seg.path)?;
        }
        Ok(())
    }
}

/// The encoded entry a slot points to (its record's payload, after the header and the
/// log id's index).
fn read_payload(slot: &Slot) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; slot.len as usize];
    slot.file.read_exact_at(&mut buf, slot.offset + HEADER as u64 + 9)?;
    Ok(buf)
}

/// The entry a slot points to, checked to be entry `index` (a read racing a truncation
/// must fail, not return another entry).
fn read_entry(slot: &Slot, index: u64) -> io::Result<Entry> {
    let entry: Entry = decode(&read_payload(slot)?).map_err(|e| invalid(format!("entry {index}: {e}")))?;
    if entry.log_id.index != index {
        return Err(invalid(format!("entry {index} expected, entry {} read", entry.log_id.index)));
    }
    Ok(entry)
}

impl LogStore {
    /// Opens the log in `dir`, creating it when `create` (a new node); a node whose data
    /// dir says it held a store (`create == false`) and has no log is refused.
    /// `legacy` is the sled store of an older flotilla that kept the log there: its log and
    /// vote are moved into `dir` once. Starts the flusher thread.
    pub fn open(dir: &Path, legacy: Option<&sled::Db>, create: bool) -> io::Result<Self> {
        if !dir.exists() {
            let moved = match legacy {
                Some(db) => migrate(db, dir)?,
                None => false,
            };
            if !moved && !create {
                return Err(invalid(format!(
                    "{} is missing, although this data dir held this node's store; rebuild the node \
                     from its peers (docs/operations.md, \"Rebuilding a node\")",
                    dir.display()
                )));
            }
            create_dir(dir)?;
        }
        let wal = Wal::open(dir, SEGMENT_BYTES)?;
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new().name("raft-fsync".into()).spawn(move || flush_loop(rx))?;
        Ok(LogStore { wal: Arc::new(Mutex::new(wal)), flusher: tx, snapshot_on_disk: None })
    }

    fn lock(&self) -> MutexGuard<'_, Wal> {
        self.wal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries about to be appended (a leader's append, `encoded[i]` being the leader's
    /// encoding of `entries[i]`, consecutive): their records are written from these bytes.
    /// Only the last offer is kept. An entry is named by its log id, which no other entry
    /// shares, so bytes of the same id are the same entry's.
    pub fn offer_encoded(&self, entries: &[Entry], encoded: Vec<Bytes>) {
        let consecutive =
            entries.windows(2).all(|w| w[0].log_id.index.checked_add(1) == Some(w[1].log_id.index));
        let offered = if consecutive && entries.len() == encoded.len() {
            entries.iter().map(|e| e.log_id).zip(encoded).collect()
        } else {
            Vec::new()
        };
        self.lock().offered = offered;
    }

    /// The recent entries' encodings, for the network.
    pub fn entry_bytes(&self) -> EntryBytes {
        EntryBytes(self.wal.clone())
    }

    /// Number of entries currently kept in the log (for metrics and tests).
    pub fn entry_count(&self) -> usize {
        self.lock().slots.len()
    }

    /// Purges wait until the snapshot on disk (as `on_disk` tells) covers them.
    pub fn purge_after_snapshot(&mut self, on_disk: watch::Receiver<Option<LogId<NodeId>>>) {
        self.snapshot_on_disk = Some(on_disk);
    }
}

/// Moves an older version's log out of sled into `dir`: written under a temporary name,
/// fsynced, renamed, then removed from sled. Returns whether there was one.
fn migrate(db: &sled::Db, dir: &Path) -> io::Result<bool> {
    let log = db.open_tree("log").map_err(io::Error::other)?;
    let meta_tree = db.open_tree("meta").map_err(io::Error::other)?;
    let vote: Option<Vote<NodeId>> = match meta_tree.get("vote").map_err(io::Error::other)? {
        Some(b) => Some(decode(&b).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    if vote.is_none() && log.is_empty() {
        return Ok(false);
    }
    let get = |key: &str| -> io::Result<Option<LogId<NodeId>>> {
        match meta_tree.get(key).map_err(io::Error::other)? {
            Some(b) => decode::<Option<LogId<NodeId>>>(&b).map_err(|e| invalid(e.to_string())),
            None => Ok(None),
        }
    };
    let last_purged = get("last_purged")?;
    let committed = get("committed")?;
    let tmp = dir.with_extension("new");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    write_meta(&tmp, &Meta { vote, last_purged })?;
    let mut wal = Wal::open(&tmp, SEGMENT_BYTES)?;
    let mut entries = Vec::new();
    for item in log.iter() {
        let (_, bytes) = item.map_err(io::Error::other)?;
        entries.push(decode::<Entry>(&bytes).map_err(|e| invalid(e.to_string()))?);
    }
    let count = entries.len();
    wal.append(entries)?;
    wal.save_committed(committed)?;
    if let Some(seg) = wal.segments.last() {
        seg.file.sync_all()?;
    }
    sync_dir(&tmp)?;
    std::fs::rename(&tmp, dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    log.clear().map_err(io::Error::other)?;
    for key in ["vote", "committed", "last_purged"] {
        meta_tree.remove(key).map_err(io::Error::other)?;
    }
    db.flush().map_err(io::Error::other)?;
    tracing::info!(entries = count, dir = %dir.display(), "moved the Raft log out of sled into its own files");
    Ok(true)
}

/// Group commit: one `fdatasync` covers every append whose callback was waiting when it
/// started (each file once: a rollover may leave two).
fn flush_loop(mut rx: mpsc::UnboundedReceiver<Flush>) {
    let mut waiting: Vec<Flush> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        waiting.push(first);
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let mut synced: Vec<&Arc<File>> = Vec::new();
        let mut result: Result<(), String> = Ok(());
        for w in &waiting {
            if !synced.iter().any(|f| Arc::ptr_eq(f, &w.file)) {
                if let Err(e) = w.file.sync_data() {
                    tracing::error!(error = %e, "fsync of the raft log failed");
                    result = Err(e.to_string());
                }
                synced.push(&w.file);
            }
        }
        for w in waiting.drain(..) {
            w.callback.log_io_completed(result.clone().map_err(io::Error::other));
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        // Recent entries are cloned under the lock; the others are read after it.
        let wanted: Vec<Result<Entry, (Slot, u64)>> = {
            let wal = self.lock();
            let end = wal.first + wal.slots.len() as u64;
            let start = match range.start_bound() {
                Bound::Included(i) => *i,
                Bound::Excluded(i) => i + 1,
                Bound::Unbounded => 0,
            }
            .max(wal.first);
            let stop = match range.end_bound() {
                Bound::Included(i) => i + 1,
                Bound::Excluded(i) => *i,
                Bound::Unbounded => end,
            }
            .min(end);
            (start..stop.max(start))
                .filter_map(|i| {
                    let slot = wal.slots[(i - wal.first) as usize].as_ref()?;
                    Some(wal.recent.get(i).ok_or_else(|| (slot.clone(), i)))
                })
                .collect()
        };
        wanted
            .into_iter()
            .map(|w| w.or_else(|(slot, index)| read_entry(&slot, index)))
            .collect::<io::Result<_>>()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let wal = self.lock();
        Ok(LogState { last_purged_log_id: wal.meta.last_purged, last_log_id: wal.last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let (dir, mut meta) = {
            let wal = self.lock();
            (wal.dir.clone(), wal.meta.clone())
        };
        meta.vote = Some(*vote);
        let written = meta.clone();
        tokio::task::spawn_blocking(move || write_meta(&dir, &written))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        self.lock().meta = meta;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().meta.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        self.lock().save_committed(committed).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let file = self
            .lock()
            .append(entries.into_iter().collect())
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        let Some(file) = file else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        if let Err(mpsc::error::SendError(f)) = self.flusher.send(Flush { file, callback }) {
            // The flusher only stops with the process; be durable regardless.
            f.callback.log_io_completed(f.file.sync_data());
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.lock().truncate(log_id.index).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        if let Some(on_disk) = &self.snapshot_on_disk {
            // A follower installing the leader's snapshot is told to purge up to it at once,
            // while the state machine is still storing it: purged first and killed before the
            // snapshot is stored, the node would restart with its log purged past its
            // snapshot (openraft refuses that state). So wait for the snapshot.
            let mut on_disk = on_disk.clone();
            let covered = on_disk.wait_for(|s| s.is_some_and(|s| s.index >= log_id.index));
            if tokio::time::timeout(PURGE_WAIT, covered).await.is_err() {
                tracing::warn!(upto = %log_id, "no snapshot on disk covers this purge yet; purging anyway");
            }
        }
        self.lock().purge(log_id).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    fn indexes(wal: &Wal) -> Vec<u64> {
        (wal.first..)
            .zip(&wal.slots)
            .filter_map(|(i, s)| s.as_ref().map(|s| read_entry(s, i).unwrap().log_id.index))
            .collect()
    }

    /// A follower told to purge up to a snapshot it is still storing waits for it.
    #[tokio::test]
    async fn a_purge_waits_for_the_snapshot_that_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(&dir.path().join("log"), None, true).unwrap();
        store.lock().append((0..=9).map(entry).collect()).unwrap();
        let at = |index| LogId::new(CommittedLeaderId::new(1, 1), index);
        let (on_disk, rx) = watch::channel(Some(at(3)));
        store.purge_after_snapshot(rx);
        {
            let mut purge = std::pin::pin!(RaftLogStorage::purge(&mut store, at(7)));
            let early = tokio::time::timeout(std::time::Duration::from_millis(200), purge.as_mut()).await;
            assert!(early.is_err(), "purged past the snapshot on disk");
            on_disk.send_replace(Some(at(7)));
            purge.await.unwrap();
        }
        assert_eq!(store.lock().meta.last_purged, Some(at(7)));
        RaftLogStorage::purge(&mut store, at(5)).await.unwrap();
    }

    #[test]
    fn a_torn_tail_is_truncated_and_corruption_before_it_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Small segments: entries 0..=9 in several files.
        let mut wal = Wal::open(dir.path(), 100).unwrap();
        wal.append((0..=9).map(entry).collect()).unwrap();
        assert!(wal.segments.len() >= 3, "{} segments", wal.segments.len());
        let paths: Vec<PathBuf> = wal.segments.iter().map(|s| s.path.clone()).collect();
        drop(wal);
        let last = paths.last().unwrap();
        let full = std::fs::read(last).unwrap();
        // A power cut in the middle of the last record: the tail is truncated, with a log line.
        std::fs::write(last, &full[..full.len() - 3]).unwrap();
        let wal = Wal::open(dir.path(), 100).unwrap();
        assert_eq!(indexes(&wal), (0..=8).collect::<Vec<_>>());
        assert!(std::fs::metadata(last).unwrap().len() < full.len() as u64 - 3, "the torn bytes are gone");
        drop(wal);
        // A flipped byte in the last segment with valid records after it is no torn write.
        let one = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(one.path(), SEGMENT_BYTES).unwrap();
        wal.append((0..5).map(entry).collect()).unwrap();
        let path = wal.segments[0].path.clone();
        drop(wal);
        let mut flipped = std::fs::read(&path).unwrap();
        flipped[HEADER + 2] ^= 0xff;
        std::fs::write(&path, &flipped).unwrap();
        let err = Wal::open(one.path(), SEGMENT_BYTES).err().expect("refused").to_string();
        assert!(err.contains("checksum mismatch") && err.contains("rebuild"), "{err}");
        // A flipped byte in an older segment is corruption: the node refuses to start.
        let first = std::fs::read(&paths[0]).unwrap();
        let mut bad = first.clone();
        bad[HEADER + 3] ^= 0xff;
        std::fs::write(&paths[0], &bad).unwrap();
        let err = Wal::open(dir.path(), 100).err().expect("refused").to_string();
        assert!(err.contains("corrupt") && err.contains("rebuild"), "{err}");
        std::fs::write(&paths[0], &first).unwrap();
        // So is a missing segment in the middle (a hole in the log).
        std::fs::remove_file(&paths[1]).unwrap();
        let err = Wal::open(dir.path(), 100).err().expect("refused").to_string();
        assert!(err.contains("segment starting at entry"), "{err}");
    }

    /// A data dir of the previous version keeps its log in sled: it is moved once.
    #[tokio::test]
    async fn an_older_log_in_sled_is_moved_into_segments() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path().join("raft")).open().unwrap();
        let (log, meta) = (db.open_tree("log").unwrap(), db.open_tree("meta").unwrap());
        for i in 3..=7u64 {
            log.insert(i.to_be_bytes(), encode(&entry(i)).unwrap()).unwrap();
        }
        let vote = Vote::new(4, 2);
        meta.insert("vote", encode(&vote).unwrap()).unwrap();
        meta.insert("last_purged", encode(&LogId::new(CommittedLeaderId::new(1, 1), 2)).unwrap()).unwrap();
        meta.insert("committed", encode(&Some(LogId::new(CommittedLeaderId::new(1, 1), 6))).unwrap())
            .unwrap();
        let wal_dir = dir.path().join("raft-log");
        let mut store = LogStore::open(&wal_dir, Some(&db), false).unwrap();
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        assert_eq!(store.read_committed().await.unwrap().unwrap().index, 6);
        let state = store.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id.unwrap().index, state.last_log_id.unwrap().index), (2, 7));
        assert_eq!(store.try_get_log_entries(0..100).await.unwrap().len(), 5);
        assert!(log.is_empty() && meta.get("vote").unwrap().is_none(), "sled keeps no second copy");
        // Opened again: the files are the log now.
        drop(store);
        let mut store = LogStore::open(&wal_dir, Some(&db), false).unwrap();
        assert_eq!(store.try_get_log_entries(0..100).await.unwrap().len(), 5);
        // A data dir that held a store but has neither log is refused.
        let err = LogStore::open(&dir.path().join("elsewhere"), Some(&db), false).err().unwrap();
        assert!(err.to_string().contains("Rebuilding a node"), "{err}");
    }

    /// Reads served from the recent entries give what the segments hold, through appends,
    /// a truncation and a new term, a purge, and past both of the cache's bounds.
    #[tokio::test]
    async fn recent_entries_read_back_as_the_segments_hold_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(&dir.path().join("log"), None, true).unwrap();
        let at = |term, index| LogId::new(CommittedLeaderId::new(term, 1), index);
        let blank = |term, index| Entry { log_id: at(term, index), payload: EntryPayload::Blank };
        let last = RECENT_ENTRIES as u64 + 20;
        store.lock().append((0..=last).map(|i| blank(1, i)).collect()).unwrap();
        store.lock().truncate(last - 5).unwrap();
        store.lock().append((last - 5..=last).map(|i| blank(2, i)).collect()).unwrap();
        store.lock().purge(at(1, 10)).unwrap();
        let on_disk = |store: &LogStore| {
            let wal = store.lock();
            (wal.first..)
                .zip(&wal.slots)
                .map(|(i, s)| read_entry(s.as_ref().unwrap(), i).unwrap().log_id)
                .collect::<Vec<_>>()
        };
        let read: Vec<_> =
            store.try_get_log_entries(..).await.unwrap().into_iter().map(|e| e.log_id).collect();
        assert_eq!(read, on_disk(&store));
        assert_eq!(
            (read[0], read[read.len() - 6], read[read.len() - 1]),
            (at(1, 11), at(2, last - 5), at(2, last))
        );
        let recent = store.lock().recent.entries.len();
        assert_eq!(recent, RECENT_ENTRIES, "the newest entries are kept, up to the bound");
        // Big entries: the byte bound keeps fewer (never none: the newest stays).
        let big = |index| Entry {
            log_id: at(2, index),
            payload: EntryPayload::Normal(Arc::new(flotilla_store::command::Command::KvPut {
                key: "k".into(),
                value: "v".repeat(RECENT_BYTES / 2 + 1),
                prev_revision: None,
            })),
        };
        store.lock().append((last + 1..=last + 3).map(big).collect()).unwrap();
        let recent = {
            let wal = store.lock();
            (wal.recent.first_index(), wal.recent.entries.len())
        };
        assert_eq!(recent, (Some(last + 3), 1));
        let read = store.try_get_log_entries(last + 1..).await.unwrap();
        assert_eq!(read.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), [last + 1, last + 2, last + 3]);
        assert!(read.iter().all(|e| matches!(&e.payload, EntryPayload::Normal(_))));
    }

    /// What the network writes an append from is each entry's record, and only for the
    /// very entry (an entry of another term at the same index, one no longer recent: none).
    #[test]
    fn entry_bytes_are_the_records_of_the_same_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(&dir.path().join("log"), None, true).unwrap();
        let at = |term, index| LogId::new(CommittedLeaderId::new(term, 1), index);
        let put = |term, index| Entry {
            log_id: at(term, index),
            payload: EntryPayload::Normal(Arc::new(flotilla_store::command::Command::KvPut {
                key: format!("k{index}"),
                value: "v".into(),
                prev_revision: None,
            })),
        };
        store.lock().append((0..=9).map(|i| put(1, i)).collect()).unwrap();
        let bytes = store.entry_bytes();
        let wanted: Vec<Entry> = (3..=5).map(|i| put(1, i)).collect();
        let got = bytes.get(&wanted).expect("recent entries");
        let record = |index: u64| {
            let wal = store.lock();
            read_payload(wal.slots[(index - wal.first) as usize].as_ref().unwrap()).unwrap()
        };
        let records: Vec<Vec<u8>> = (3..=5).map(record).collect();
        assert_eq!(got.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), records);
        assert_eq!(got[0].to_vec(), encode(&wanted[0]).unwrap());
        assert!(bytes.get(&[put(2, 4)]).is_none(), "another term's entry at the same index");
        store.lock().truncate(5).unwrap();
        store.lock().append(vec![put(2, 5)]).unwrap();
        assert!(bytes.get(&[put(1, 5)]).is_none(), "a truncated entry");
        assert_eq!(bytes.get(&[put(2, 5)]).unwrap()[0].to_vec(), encode(&put(2, 5)).unwrap());
        assert!(bytes.get(&[put(1, 10)]).is_none(), "an entry not in the log");
        assert_eq!(bytes.get(&[]).unwrap().len(), 0);

        // A follower writes the records of a leader's append from the leader's bytes (here
        // another encoding of the same entries, the unnamed one, to tell them apart), each
        // only for the entry it was offered for.
        let offered: Vec<Entry> = (6..=8).map(|i| put(2, i)).collect();
        let theirs: Vec<Bytes> = offered.iter().map(|e| rmp_serde::to_vec(e).unwrap().into()).collect();
        store.offer_encoded(&offered, theirs.clone());
        store.lock().append(vec![put(2, 6), put(3, 7)]).unwrap();
        assert_eq!(record(6), theirs[0].to_vec(), "the offered bytes");
        assert_eq!(record(7), encode(&put(3, 7)).unwrap(), "another entry at that index: encoded");
        assert_eq!(decode::<Entry>(&record(6)).unwrap().log_id, at(2, 6));
        assert_eq!(bytes.get(&[put(2, 6)]).unwrap()[0], theirs[0], "and sent on as they came");
        store.offer_encoded(&offered[..2], theirs.clone());
        assert!(store.lock().offered.is_empty(), "an offer that does not match is dropped");
    }

    #[test]
    fn truncate_purge_and_reopen_keep_the_log_without_holes() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        wal.append((0..=10).map(entry).collect()).unwrap();
        wal.truncate(7).unwrap();
        assert_eq!(indexes(&wal), [0, 1, 2, 3, 4, 5, 6]);
        wal.append((7..=8).map(entry).collect()).unwrap();
        wal.purge(LogId::new(CommittedLeaderId::new(1, 1), 3)).unwrap();
        assert_eq!(indexes(&wal), [4, 5, 6, 7, 8]);
        drop(wal);
        let mut wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(indexes(&wal), [4, 5, 6, 7, 8]);
        assert_eq!(wal.meta.last_purged.unwrap().index, 3);
        // A purge past the end (a snapshot installed from the leader) empties the log and
        // the next append starts a segment at the next index.
        // The same, with a crash before the purge deleted the segments.
        let kept: Vec<PathBuf> = wal.segments.iter().map(|s| s.path.clone()).collect();
        let copies: Vec<Vec<u8>> = kept.iter().map(|p| std::fs::read(p).unwrap()).collect();
        wal.purge(LogId::new(CommittedLeaderId::new(1, 1), 20)).unwrap();
        for (p, bytes) in kept.iter().zip(&copies) {
            std::fs::write(p, bytes).unwrap();
        }
        drop(wal);
        let mut wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert!(wal.slots.is_empty());
        assert_eq!(wal.last_log_id.unwrap().index, 20);
        wal.append(vec![entry(21)]).unwrap();
        drop(wal);
        let wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(indexes(&wal), [21]);
    }
}
