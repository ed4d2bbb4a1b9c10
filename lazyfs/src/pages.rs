//! Unsynced file data: a copy-on-write page map over the backing file's content.
//!
//! Pages rather than extents because that is what a kernel page cache does, and it keeps
//! every path simple: a write fills a page from what the file showed before (backing bytes
//! below `base_len`, zeros past it) and then changes it; a read takes each byte from a page
//! if there is one and from the backing file otherwise; an fsync writes whole pages back.
//! Nothing here touches the backing file except `write_back`; reads of it go through the
//! `read_base` callback so that this module is tested without a file system.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The unit of unsynced data: the page size of the machines we run on, so that a small
/// append costs one page of memory, as it would in a kernel page cache.
pub const PAGE_BYTES: u64 = 4096;

/// Reads backing bytes at an offset into a buffer; bytes past the backing file's end are
/// left as they are (zeros).
pub type ReadBase<'a> = &'a mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>;

/// The unsynced state of one file: its pending size and its changed pages.
#[derive(Debug)]
pub struct Dirty {
    /// The size the application sees.
    size: u64,
    /// Backing bytes at or past this offset are hidden (a truncate cut them off, or the
    /// backing file never had them). Invariant: `base_len <= size`.
    base_len: u64,
    /// Page index to `PAGE_BYTES` bytes. Invariant: bytes at or past `size` are zero, so
    /// that growing the file again shows zeros, as POSIX requires.
    pages: BTreeMap<u64, Box<[u8]>>,
}

impl Dirty {
    /// The state of a file whose backing file is `backing_len` bytes and unchanged.
    pub fn new(backing_len: u64) -> Dirty {
        Dirty { size: backing_len, base_len: backing_len, pages: BTreeMap::new() }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Memory held for this file: its changed pages.
    pub fn held_bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE_BYTES
    }

    pub fn write(&mut self, offset: u64, data: &[u8], read_base: ReadBase) -> io::Result<()> {
        if data.is_empty() {
            // A zero-byte write changes nothing, not even the size.
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let index = pos / PAGE_BYTES;
            let page_start = index * PAGE_BYTES;
            let in_page = (pos - page_start) as usize;
            let n = (PAGE_BYTES - in_page as u64).min(end - pos) as usize;
            if !self.pages.contains_key(&index) {
                let mut page = vec![0u8; PAGE_BYTES as usize].into_boxed_slice();
                if n < PAGE_BYTES as usize {
                    self.fill_from_base(page_start, &mut page, read_base)?;
                }
                self.pages.insert(index, page);
            }
            let page = self.pages.get_mut(&index).expect("page inserted above");
            let from = (pos - offset) as usize;
            page[in_page..in_page + n].copy_from_slice(&data[from..from + n]);
            pos += n as u64;
        }
        self.size = self.size.max(end);
        Ok(())
    }

    pub fn truncate(&mut self, new_size: u64) {
        if new_size < self.size {
            let first_gone = new_size.div_ceil(PAGE_BYTES);
            drop(self.pages.split_off(&first_gone));
            let tail = (new_size % PAGE_BYTES) as usize;
            if tail != 0 {
                if let Some(page) = self.pages.get_mut(&(new_size / PAGE_BYTES)) {
                    page[tail..].fill(0);
                }
            }
            self.base_len = self.base_len.min(new_size);
        }
        self.size = new_size;
        debug_assert!(self.base_len <= self.size);
    }

    /// Up to `len` bytes at `offset` as the application sees them (short at end of file).
    pub fn read(&self, offset: u64, len: u64, read_base: ReadBase) -> io::Result<Vec<u8>> {
        if offset >= self.size || len == 0 {
            return Ok(Vec::new());
        }
        let end = self.size.min(offset.saturating_add(len));
        let mut buf = vec![0u8; (end - offset) as usize];
        let base_end = end.min(self.base_len);
        if offset < base_end {
            read_base(offset, &mut buf[..(base_end - offset) as usize])?;
        }
        for (&index, page) in self.pages.range(offset / PAGE_BYTES..=(end - 1) / PAGE_BYTES) {
            let page_start = index * PAGE_BYTES;
            let from = page_start.max(offset);
            let to = (page_start + PAGE_BYTES).min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&page[(from - page_start) as usize..(to - page_start) as usize]);
        }
        Ok(buf)
    }

    /// Makes `file` (the backing file) hold exactly what the application sees. The caller
    /// fsyncs it afterwards.
    pub fn write_back(&self, file: &File) -> io::Result<()> {
        // Cut hidden backing bytes first: a page-less range between `base_len` and a later
        // page must read as zeros, not as the old content.
        file.set_len(self.base_len)?;
        for (&index, page) in &self.pages {
            let page_start = index * PAGE_BYTES;
            if page_start >= self.size {
                break;
            }
            let n = PAGE_BYTES.min(self.size - page_start) as usize;
            file.write_all_at(&page[..n], page_start)?;
        }
        file.set_len(self.size)
    }

    fn fill_from_base(&self, page_start: u64, page: &mut [u8], read_base: ReadBase) -> io::Result<()> {
        let visible_end = (page_start + PAGE_BYTES).min(self.base_len);
        if page_start < visible_end {
            read_base(page_start, &mut page[..(visible_end - page_start) as usize])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model file: the bytes an application must see after the same operations.
    fn base_reader(base: &[u8]) -> impl FnMut(u64, &mut [u8]) -> io::Result<()> + '_ {
        move |offset, buf| {
            let start = (offset as usize).min(base.len());
            let end = (start + buf.len()).min(base.len());
            buf[..end - start].copy_from_slice(&base[start..end]);
            Ok(())
        }
    }

    fn model_write(model: &mut Vec<u8>, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset as usize + data.len();
        if model.len() < end {
            model.resize(end, 0);
        }
        model[offset as usize..end].copy_from_slice(data);
    }

    fn read_all(dirty: &Dirty, base: &[u8]) -> Vec<u8> {
        dirty.read(0, u64::MAX, &mut base_reader(base)).unwrap()
    }

    #[test]
    fn a_write_overlays_the_backing_bytes_around_it() {
        let base = vec![7u8; 10_000];
        let mut dirty = Dirty::new(base.len() as u64);
        dirty.write(5000, b"hello", &mut base_reader(&base)).unwrap();
        let mut model = base.clone();
        model_write(&mut model, 5000, b"hello");
        assert_eq!(read_all(&dirty, &base), model);
        assert_eq!(dirty.read(4998, 4, &mut base_reader(&base)).unwrap(), b"\x07\x07he");
    }

    #[test]
    fn truncate_then_grow_shows_zeros_not_the_old_bytes() {
        let base = vec![1u8; 3 * PAGE_BYTES as usize];
        let mut dirty = Dirty::new(base.len() as u64);
        dirty.write(100, b"xy", &mut base_reader(&base)).unwrap();
        dirty.truncate(10);
        dirty.write(2 * PAGE_BYTES + 5, b"z", &mut base_reader(&base)).unwrap();
        let mut model = vec![1u8; 10];
        model_write(&mut model, 2 * PAGE_BYTES + 5, b"z");
        assert_eq!(read_all(&dirty, &base), model);
    }

    #[test]
    fn write_back_makes_the_backing_file_equal_what_reads_showed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let base: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        std::fs::write(&path, &base).unwrap();
        let mut dirty = Dirty::new(base.len() as u64);
        dirty.truncate(5000);
        dirty.write(9000, &[9u8; 100], &mut base_reader(&base)).unwrap();
        dirty.write(4000, &[4u8; 10], &mut base_reader(&base)).unwrap();
        let expected = read_all(&dirty, &base);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        dirty.write_back(&file).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn random_writes_and_truncates_match_a_plain_byte_vector() {
        // xorshift: deterministic, no dependency, enough to cover page boundaries.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        for _ in 0..50 {
            let base: Vec<u8> = (0..next(3 * PAGE_BYTES)).map(|i| (i % 251) as u8).collect();
            let mut model = base.clone();
            let mut dirty = Dirty::new(base.len() as u64);
            for step in 0..40u8 {
                if next(5) == 0 {
                    let size = next(4 * PAGE_BYTES);
                    dirty.truncate(size);
                    model.resize(size as usize, 0);
                } else {
                    let offset = next(4 * PAGE_BYTES);
                    let data = vec![step.wrapping_add(1); next(2 * PAGE_BYTES) as usize];
                    dirty.write(offset, &data, &mut base_reader(&base)).unwrap();
                    model_write(&mut model, offset, &data);
                }
                assert_eq!(dirty.size(), model.len() as u64);
                assert_eq!(read_all(&dirty, &base), model);
            }
        }
    }
}
