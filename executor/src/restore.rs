//! Restoring a stored archive (workspace or cache) into a container as one stream:
//! the download from the servers is decompressed and rebased under `dest_dir` on a
//! blocking thread while Docker's upload-to-container extracts what has already been
//! rebased. No temp file, no whole archive in memory: at most a few chunks in flight.

use anyhow::Context as _;
use std::io::{self, Write};

use bytes::Bytes;
use flotilla_store::ost::tarstream::{channel_writer, BlockingReader, CHUNK_BYTES};
use futures::Stream;

use crate::docker::Driver;
use crate::tarball;

/// Streams the archive `download` into `container`, every entry under `dest` (absolute).
/// An archive refused by [`tarball::rebase`] fails the restore with its reason; what was
/// extracted before the refused entry stays (all of it inside `dest`).
pub async fn into_container(
    docker: &Driver,
    container: &str,
    download: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    dest: &str,
) -> anyhow::Result<()> {
    let (out, body) = channel_writer();
    let dest = dest.to_string();
    let worker = tokio::task::spawn_blocking(move || {
        let input = io::BufReader::with_capacity(CHUNK_BYTES, BlockingReader::new(Box::pin(download)));
        let failer = out.failer();
        let result = tarball::rebase(input, &dest, out).and_then(|mut w| w.flush());
        if let Err(e) = &result {
            // Cut the upload short so Docker does not take a truncated tar for a whole one.
            failer.fail(e);
        }
        result
    });
    let uploaded = docker.upload(container, "/", body).await;
    let rebased = worker.await.context("the restore thread failed")?;
    match (rebased, uploaded) {
        (Err(e), _) if e.kind() != io::ErrorKind::BrokenPipe => Err(anyhow::anyhow!("invalid archive: {e}")),
        (_, Err(e)) => Err(e.into()),
        (Err(e), Ok(())) => Err(anyhow::anyhow!("invalid archive: {e}")),
        (Ok(()), Ok(())) => Ok(()),
    }
}
