//! The POSIX backend: one plain file per object under the base directory. A put writes
//! a temporary file next to the target and renames it into place, so a reader sees the
//! old object or the whole new one; with `persist` the file and its directory are
//! fsynced before the put answers.

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{reader_stream, ObjectInfo, ObjectStream, OstError, TMP_PREFIX};

const READ_CHUNK: usize = 256 * 1024;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
pub struct PosixOst {
    base: PathBuf,
}

impl PosixOst {
    pub fn new(base: PathBuf) -> Result<PosixOst, OstError> {
        if !base.is_absolute() {
            return Err(OstError::Config(format!(
                "{}: the POSIX base path must be absolute",
                base.display()
            )));
        }
        std::fs::create_dir_all(&base)
            .map_err(|e| OstError::Config(format!("cannot create {}: {e}", base.display())))?;
        Ok(PosixOst { base })
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    fn path(&self, key: &str) -> PathBuf {
        self.base.join(key)
    }

    pub async fn put(&self, key: &str, mut body: ObjectStream, persist: bool) -> Result<u64, OstError> {
        let target = self.path(key);
        let dir = target.parent().expect("a key path has a parent").to_path_buf();
        if let Err(e) = tokio::fs::create_dir_all(&dir).await {
            return Err(match e.kind() {
                io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory => {
                    OstError::Conflict { key: key.to_string(), reason: "a prefix of the key is an object" }
                }
                _ => OstError::io(key, e),
            });
        }
        if tokio::fs::metadata(&target).await.map(|m| m.is_dir()).unwrap_or(false) {
            return Err(OstError::Conflict {
                key: key.to_string(),
                reason: "other objects live under this key",
            });
        }
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{}.{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                size += chunk.len() as u64;
                file.write_all(&chunk).await?;
            }
            file.flush().await?;
            if persist {
                file.sync_all().await?;
            }
            drop(file);
            tokio::fs::rename(&tmp, &target).await?;
            if persist {
                sync_dir(&dir).await?;
            }
            Ok::<u64, io::Error>(size)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result.map_err(|e| match e.kind() {
            io::ErrorKind::IsADirectory | io::ErrorKind::DirectoryNotEmpty => {
                OstError::Conflict { key: key.to_string(), reason: "other objects live under this key" }
            }
            _ => OstError::Io { key: key.to_string(), source: e },
        })
    }

    pub async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<ObjectStream, OstError> {
        let path = self.path(key);
        let mut file = tokio::fs::File::open(&path).await.map_err(|e| OstError::io(key, e))?;
        let meta = file.metadata().await.map_err(|e| OstError::io(key, e))?;
        if !meta.is_file() {
            return Err(OstError::NotFound { key: key.to_string() });
        }
        if offset > 0 {
            file.seek(SeekFrom::Start(offset)).await.map_err(|e| OstError::io(key, e))?;
        }
        Ok(match len {
            Some(len) => reader_stream(file.take(len), READ_CHUNK),
            None => reader_stream(file, READ_CHUNK),
        })
    }

    pub async fn stat(&self, key: &str) -> Result<ObjectInfo, OstError> {
        let meta = tokio::fs::metadata(self.path(key)).await.map_err(|e| OstError::io(key, e))?;
        if !meta.is_file() {
            return Err(OstError::NotFound { key: key.to_string() });
        }
        Ok(info(key.to_string(), &meta))
    }

    pub async fn delete(&self, key: &str) -> Result<(), OstError> {
        let path = self.path(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::IsADirectory => return Ok(()),
            Err(e) => return Err(OstError::io(key, e)),
        }
        // Remove the directories the object leaves empty, up to the base; a concurrent
        // put may refill one, so failures are fine.
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == self.base || tokio::fs::remove_dir(&d).await.is_err() {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        Ok(())
    }

    pub async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>, OstError> {
        let base = self.base.clone();
        let prefix = prefix.to_string();
        let start_after = start_after.map(str::to_string);
        tokio::task::spawn_blocking(move || list_blocking(&base, &prefix, start_after.as_deref(), limit))
            .await
            .map_err(|e| OstError::Io { key: String::new(), source: io::Error::other(e) })?
    }
}

fn info(key: String, meta: &std::fs::Metadata) -> ObjectInfo {
    let last_modified_ms = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ObjectInfo { key, size: meta.len(), last_modified_ms }
}

async fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all())
        .await
        .map_err(io::Error::other)?
}

/// Walks the directory holding the prefix and returns the first `limit` keys after
/// `start_after`, sorted by bytes like S3 (a directory walk alone would not give that
/// order: `a-b` sorts before `a/b`).
fn list_blocking(
    base: &Path,
    prefix: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<Vec<ObjectInfo>, OstError> {
    let dir_part = match prefix.rfind('/') {
        Some(i) => &prefix[..i],
        None => "",
    };
    let mut keys = Vec::new();
    let mut stack = vec![(base.join(dir_part), dir_part.to_string())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory => {
                continue
            }
            Err(e) => return Err(OstError::io(&rel, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| OstError::io(&rel, e))?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            if name.starts_with(TMP_PREFIX) {
                continue;
            }
            let key = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            // Only descend into directories that can hold keys matching the prefix.
            let relevant = key.starts_with(prefix) || prefix.starts_with(&format!("{key}/"));
            if !relevant {
                continue;
            }
            let file_type = entry.file_type().map_err(|e| OstError::io(&key, e))?;
            if file_type.is_dir() {
                stack.push((entry.path(), key));
            } else if file_type.is_file() && start_after.is_none_or(|s| key.as_str() > s) {
                let meta = entry.metadata().map_err(|e| OstError::io(&key, e))?;
                keys.push(info(key, &meta));
            }
        }
    }
    keys.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    keys.truncate(limit);
    Ok(keys)
}
