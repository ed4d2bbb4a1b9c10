//! Object storage ("ost"): where bulky data lives — step logs, workspace archives,
//! caches, exports and run index dumps. Nothing here is replicated by Raft; the
//! replicated state only ever names objects by key.
//!
//! One interface, [`Ost`], two backends chosen by URL (SPEC §1):
//! - `file:///abs/path` — [`PosixOst`]: objects are plain files under the base directory
//!   (hierarchical, like minio or s3s-fs: a key cannot be both an object and a "directory"
//!   of other objects; such a put is a [`OstError::Conflict`]).
//! - `s3://bucket/base/path?endpoint=..&region=..&path_style=true` — [`S3Ost`] through
//!   aws-sdk-s3, with retries and timeouts.
//!
//! Every key is relative to the configured base path and validated by [`validate_key`]
//! the same way on both backends, so a key accepted by one is accepted by the other.
//! Reads and writes stream: no object is ever held whole in memory.

pub mod keys;
mod posix;
mod s3;
pub mod tarstream;
#[cfg(feature = "test-servers")]
pub mod test_servers;

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use crate::limits::{MAX_BASE_BYTES, MAX_LIST_PAGE, MAX_OBJECT_KEY_BYTES};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};

pub use posix::PosixOst;
pub use s3::{S3Ost, S3Settings};

/// A stream of object bytes, read or to be written.
pub type ObjectStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Name prefix of the temporary files the POSIX backend writes before renaming them into
/// place; no key may have a segment starting with it.
pub(crate) const TMP_PREFIX: &str = ".ost-tmp.";

/// What [`Ost::stat`] and [`Ost::list`] tell about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// Milliseconds since the Unix epoch; 0 when the backend did not say.
    pub last_modified_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OstError {
    #[error("object {key:?} not found")]
    NotFound { key: String },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("object key {key:?} conflicts with an existing object: {reason}")]
    Conflict { key: String, reason: &'static str },
    #[error("object {key:?} is larger than {limit} bytes")]
    TooLarge { key: String, limit: u64 },
    #[error("object storage configuration: {0}")]
    Config(String),
    #[error("object storage I/O on {key:?}: {source}")]
    Io { key: String, source: io::Error },
    #[error("object storage request on {key:?} failed: {message}")]
    Backend { key: String, message: String },
}

impl OstError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, OstError::NotFound { .. })
    }

    pub(crate) fn io(key: &str, source: io::Error) -> OstError {
        if source.kind() == io::ErrorKind::NotFound {
            OstError::NotFound { key: key.to_string() }
        } else {
            OstError::Io { key: key.to_string(), source }
        }
    }
}

/// Checks that `key` can name an object on every backend: non-empty, at most
/// [`MAX_OBJECT_KEY_BYTES`], `/`-separated segments that are neither empty, `.` nor `..`, no
/// leading or trailing `/`, no control characters. Spaces and any other Unicode are fine.
pub fn validate_key(key: &str) -> Result<(), OstError> {
    let bad = |reason| Err(OstError::InvalidKey { key: key.to_string(), reason });
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > MAX_OBJECT_KEY_BYTES {
        return bad("longer than 768 bytes");
    }
    if key.chars().any(char::is_control) {
        return bad("control characters are not allowed");
    }
    for segment in key.split('/') {
        match segment {
            "" => return bad("empty path segment (leading, trailing or double '/')"),
            "." | ".." => return bad("'.' and '..' segments are not allowed"),
            s if s.starts_with(TMP_PREFIX) => return bad("segments starting with '.ost-tmp.' are reserved"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a list prefix: empty, or a key prefix with no `.`/`..` segment, no leading `/`
/// and no control characters (it may end in `/` or in the middle of a segment).
pub fn validate_prefix(prefix: &str) -> Result<(), OstError> {
    if prefix.is_empty() {
        return Ok(());
    }
    let bad = |reason| Err(OstError::InvalidKey { key: prefix.to_string(), reason });
    if prefix.len() > MAX_OBJECT_KEY_BYTES {
        return bad("longer than 768 bytes");
    }
    if prefix.starts_with('/') || prefix.contains("//") {
        return bad("empty path segment (leading or double '/')");
    }
    if prefix.chars().any(char::is_control) {
        return bad("control characters are not allowed");
    }
    if prefix.split('/').any(|s| s == "." || s == "..") {
        return bad("'.' and '..' segments are not allowed");
    }
    Ok(())
}

/// Normalises a base path: no leading or trailing `/`, segments validated like keys.
pub(crate) fn normalize_base(base: &str) -> Result<String, OstError> {
    let trimmed = base.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if trimmed.len() > MAX_BASE_BYTES {
        return Err(OstError::Config(format!("base path longer than {MAX_BASE_BYTES} bytes")));
    }
    validate_key(trimmed).map_err(|e| OstError::Config(format!("base path: {e}")))?;
    Ok(trimmed.to_string())
}

#[derive(Debug)]
enum Backend {
    Posix(PosixOst),
    S3(S3Ost),
}

/// A handle on the object storage; cheap to clone.
#[derive(Debug, Clone)]
pub struct Ost {
    backend: Arc<Backend>,
}

impl Ost {
    /// Opens the object storage named by `url` (`file:///abs/path` or `s3://...`).
    pub async fn open(url: &str) -> Result<Ost, OstError> {
        let parsed = url::Url::parse(url).map_err(|e| OstError::Config(format!("{url:?}: {e}")))?;
        match parsed.scheme() {
            "file" => {
                let path = parsed
                    .to_file_path()
                    .map_err(|_| OstError::Config(format!("{url:?}: not an absolute local path")))?;
                Ok(Ost::posix(path)?)
            }
            "s3" => {
                Ok(Ost { backend: Arc::new(Backend::S3(S3Ost::open(S3Settings::from_url(&parsed)?).await?)) })
            }
            other => Err(OstError::Config(format!("{url:?}: unknown scheme {other:?} (file:// or s3://)"))),
        }
    }

    /// A POSIX object storage rooted at `dir` (created if missing).
    pub fn posix(dir: impl Into<PathBuf>) -> Result<Ost, OstError> {
        Ok(Ost { backend: Arc::new(Backend::Posix(PosixOst::new(dir.into())?)) })
    }

    pub fn s3(s3: S3Ost) -> Ost {
        Ost { backend: Arc::new(Backend::S3(s3)) }
    }

    /// Where the objects go, for logs (never includes credentials).
    pub fn describe(&self) -> String {
        match &*self.backend {
            Backend::Posix(p) => format!("file://{}", p.base().display()),
            Backend::S3(s) => s.describe(),
        }
    }

    /// Stores the stream under `key`, replacing any object there. Readers see the old
    /// object or the whole new one, never a part. `size` (when known) picks single or
    /// multipart upload on S3; `persist` makes the POSIX backend fsync before answering
    /// (archives and data files need it; a log being written need not). Returns the size.
    pub async fn put(
        &self,
        key: &str,
        body: ObjectStream,
        size: Option<u64>,
        persist: bool,
    ) -> Result<u64, OstError> {
        validate_key(key)?;
        match &*self.backend {
            Backend::Posix(p) => p.put(key, body, persist).await,
            Backend::S3(s) => s.put(key, body, size).await,
        }
    }

    pub async fn put_bytes(&self, key: &str, data: impl Into<Bytes>, persist: bool) -> Result<u64, OstError> {
        let data: Bytes = data.into();
        let size = data.len() as u64;
        self.put(key, Box::pin(futures::stream::once(async move { Ok(data) })), Some(size), persist).await
    }

    /// Streams the whole object.
    pub async fn get(&self, key: &str) -> Result<ObjectStream, OstError> {
        self.get_range(key, 0, None).await
    }

    /// Streams `len` bytes (to the end when `None`) from `offset`; a range past the end
    /// yields what there is (possibly nothing).
    pub async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<ObjectStream, OstError> {
        validate_key(key)?;
        match &*self.backend {
            Backend::Posix(p) => p.get_range(key, offset, len).await,
            Backend::S3(s) => s.get_range(key, offset, len).await,
        }
    }

    /// Reads a whole object that must not exceed `limit` bytes.
    pub async fn get_bytes(&self, key: &str, limit: u64) -> Result<Bytes, OstError> {
        let mut stream = self.get(key).await?;
        let mut buf = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| OstError::io(key, e))?;
            if (buf.len() + chunk.len()) as u64 > limit {
                return Err(OstError::TooLarge { key: key.to_string(), limit });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    pub async fn stat(&self, key: &str) -> Result<ObjectInfo, OstError> {
        validate_key(key)?;
        match &*self.backend {
            Backend::Posix(p) => p.stat(key).await,
            Backend::S3(s) => s.stat(key).await,
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, OstError> {
        match self.stat(key).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes the object; deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), OstError> {
        validate_key(key)?;
        match &*self.backend {
            Backend::Posix(p) => p.delete(key).await,
            Backend::S3(s) => s.delete(key).await,
        }
    }

    /// Up to `limit` objects whose key starts with `prefix` and sorts after `start_after`,
    /// in key (byte) order. Page by passing the last key back as `start_after`.
    pub async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>, OstError> {
        validate_prefix(prefix)?;
        let limit = limit.clamp(1, MAX_LIST_PAGE);
        match &*self.backend {
            Backend::Posix(p) => p.list(prefix, start_after, limit).await,
            Backend::S3(s) => s.list(prefix, start_after, limit).await,
        }
    }

    /// Every object under `prefix`, paging as needed (for the garbage collector and tests;
    /// callers that may face millions of keys page with [`Ost::list`]).
    pub async fn list_all(&self, prefix: &str) -> Result<Vec<ObjectInfo>, OstError> {
        let mut out: Vec<ObjectInfo> = Vec::new();
        loop {
            let after = out.last().map(|o| o.key.clone());
            let page = self.list(prefix, after.as_deref(), 1000).await?;
            let done = page.len() < 1000;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }
}

/// Wraps an [`tokio::io::AsyncRead`] as an [`ObjectStream`] of chunks of up to `chunk` bytes.
pub fn reader_stream<R>(reader: R, chunk: usize) -> ObjectStream
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
{
    use tokio::io::AsyncReadExt;
    Box::pin(futures::stream::try_unfold(reader, move |mut r| async move {
        let mut buf = BytesMut::with_capacity(chunk);
        while buf.len() < chunk {
            if r.read_buf(&mut buf).await? == 0 {
                break;
            }
        }
        if buf.is_empty() {
            Ok(None)
        } else {
            Ok(Some((buf.freeze(), r)))
        }
    }))
}

/// Reads up to `len` bytes of a local file from `from` (fewer at its end).
pub async fn read_file_range(path: &std::path::Path, from: u64, len: u64) -> io::Result<Bytes> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(path).await?;
    f.seek(io::SeekFrom::Start(from)).await?;
    let mut buf = Vec::with_capacity(len.min(16 * 1024 * 1024) as usize);
    f.take(len).read_to_end(&mut buf).await?;
    Ok(buf.into())
}

/// Collects a stream into one buffer of at most `limit` bytes (tests and small objects).
pub async fn collect(stream: ObjectStream, limit: usize) -> io::Result<Bytes> {
    let chunks: Vec<Bytes> = stream.try_collect().await?;
    let total: usize = chunks.iter().map(Bytes::len).sum();
    if total > limit {
        return Err(io::Error::other(format!("object larger than {limit} bytes")));
    }
    let mut buf = BytesMut::with_capacity(total);
    for c in chunks {
        buf.extend_from_slice(&c);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated_alike_for_every_backend() {
        for good in ["a", "logs/1.t/0.log", "with space/ünïcødé ✓", "a..b", ".hidden", "x/.y"] {
            assert!(validate_key(good).is_ok(), "{good}");
        }
        for bad in ["", "/a", "a/", "a//b", "..", "a/../b", "./a", "a/.", "a\nb", "a\0b", ".ost-tmp.1"] {
            assert!(matches!(validate_key(bad), Err(OstError::InvalidKey { .. })), "{bad:?}");
        }
        assert!(validate_key(&"k".repeat(MAX_OBJECT_KEY_BYTES)).is_ok());
        assert!(validate_key(&"k".repeat(MAX_OBJECT_KEY_BYTES + 1)).is_err());
        for good in ["", "a", "a/", "caches/g/deps-"] {
            assert!(validate_prefix(good).is_ok(), "{good}");
        }
        for bad in ["/a", "a//", "../x", "a/../"] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base_paths_are_normalised() {
        assert_eq!(normalize_base("").unwrap(), "");
        assert_eq!(normalize_base("/").unwrap(), "");
        assert_eq!(normalize_base("/a/b/").unwrap(), "a/b");
        assert!(normalize_base("a/../b").is_err());
    }
}
