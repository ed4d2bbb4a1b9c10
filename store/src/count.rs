//! How many bytes an encoding takes, counted as it is written out and never held.

/// An [`std::io::Write`] that only counts: `rmp_serde::encode::write_named(&mut count, v)`
/// or `serde_json::to_writer(&mut count, v)` measure an encoding without allocating it.
#[derive(Debug, Default)]
pub struct ByteCount(pub usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
