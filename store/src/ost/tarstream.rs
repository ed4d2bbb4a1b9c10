//! Stored archives (workspaces and caches) as streams: recognising their compression and
//! bridging the sync tar code to async bodies. An archive is a zstd-compressed tar; one
//! saved before compression existed is a plain tar, told apart by the zstd magic.

use std::io::{self, Read, Write};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::ObjectStream;

/// The first four bytes of a zstd frame.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Size of the chunks a [`ChannelWriter`] sends.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks buffered between a [`ChannelWriter`] and its reader.
const CHUNKS_IN_FLIGHT: usize = 8;

/// A stored archive as a plain tar stream: zstd-decompressed unless it is a plain tar.
pub fn decompressed<'a, R: Read + 'a>(mut input: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match input.read(&mut magic[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let input = io::Cursor::new(magic[..n].to_vec()).chain(input);
    if n == magic.len() && magic == ZSTD_MAGIC {
        Ok(Box::new(zstd::stream::read::Decoder::new(input)?))
    } else {
        Ok(Box::new(input))
    }
}

/// A `Read` over an object stream, for a blocking thread of the runtime (the sync tar
/// code reads archives through it while they stream).
pub struct BlockingReader {
    stream: ObjectStream,
    handle: tokio::runtime::Handle,
    chunk: Bytes,
}

impl BlockingReader {
    /// Call from a `spawn_blocking` thread (it blocks on the runtime for each chunk).
    pub fn new(stream: ObjectStream) -> BlockingReader {
        BlockingReader { stream, handle: tokio::runtime::Handle::current(), chunk: Bytes::new() }
    }
}

impl Read for BlockingReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        use futures::StreamExt;
        while self.chunk.is_empty() {
            match self.handle.block_on(self.stream.next()) {
                Some(chunk) => self.chunk = chunk?,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len());
        out[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// A `Write` for a blocking thread, sending [`CHUNK_BYTES`] chunks to an async reader.
/// [`ChannelWriter::fail`] ends the stream with an error (so a half-written archive is
/// never taken for a whole one).
pub struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

/// A writer and the stream of what is written to it.
pub fn channel_writer() -> (ChannelWriter, ObjectStream) {
    let (tx, mut rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    (ChannelWriter { tx, buf: Vec::with_capacity(CHUNK_BYTES) }, Box::pin(stream))
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader of the stream went away"))
    }

    /// Another handle on the same stream, to end it with [`ChannelWriter::fail`].
    pub fn failer(&self) -> ChannelWriter {
        ChannelWriter { tx: self.tx.clone(), buf: Vec::new() }
    }

    /// Ends the stream with `error` (blocking).
    pub fn fail(self, error: &io::Error) {
        let _ = self.tx.blocking_send(Err(io::Error::new(error.kind(), error.to_string())));
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_and_plain_archives_are_both_read() {
        let plain = b"plain tar bytes".to_vec();
        let mut out = Vec::new();
        decompressed(&plain[..]).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, plain);
        let packed = zstd::encode_all(&plain[..], 3).unwrap();
        let mut out = Vec::new();
        decompressed(&packed[..]).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, plain);
        let mut out = Vec::new();
        decompressed(&b"ab"[..]).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ab", "shorter than the magic");
    }
}
