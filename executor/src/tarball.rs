//! The tar format of workspace archives and caches, and cache-key templates.
//!
//! Saving: Docker's archive API gives a tar of a directory whose entries start with the
//! directory's own name; [`select`] keeps the entries matching glob patterns, re-rooted
//! under a destination, and writes them zstd-compressed. Restoring: [`rebase`] reads a
//! stored archive (zstd, or a plain tar of an older version) and moves every entry under
//! the absolute `dest_dir`, for Docker to extract at `/`.
//!
//! What a round trip keeps (the contract of `docs/SPEC.md`): regular files with content,
//! mode (setuid, setgid and sticky bits included), mtime and owner; directories, empty ones
//! included, with their mode and mtime (Docker sets directory times after extracting their
//! contents); symlinks with their target as written (never followed); hard links as links
//! (their target re-rooted like any path). The root of a selection itself is not part of
//! it: restoring never changes the mode of `dest_dir`.
//!
//! Nothing outside `dest_dir` can be written by a restore: an entry with an absolute name
//! or `..`, an entry below a symlink of the archive, and a hard link to anything but an
//! earlier entry of the archive are refused before they reach Docker.
use anyhow::Context as _;
use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use flotilla_store::ost::tarstream::decompressed;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Compiles the `paths` of a save step; `*` stays within a path segment, `**` crosses.
/// No pattern, `.` or `**` select everything.
pub fn patterns(paths: &[String]) -> anyhow::Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    if paths.is_empty() {
        b.add(GlobBuilder::new("**").build().expect("static glob"));
    }
    for p in paths {
        let p = p.trim_start_matches("./");
        let p = if p == "." || p.is_empty() { "**" } else { p };
        let glob = GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .with_context(|| format!("invalid path pattern {p:?}"))?;
        b.add(glob);
    }
    b.build().context("invalid path patterns")
}

/// A relative path without `.`, `..`, root or prefix components.
fn clean_relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

fn refused(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Builds one compressed archive from several [`select`] calls.
pub struct Selection<W: Write> {
    builder: tar::Builder<zstd::stream::write::Encoder<'static, W>>,
    /// Directories written so far (several selections may share parents).
    dirs: BTreeSet<PathBuf>,
}

impl<W: Write> Selection<W> {
    /// An archive compressed at zstd `level` (see `limits::ARCHIVE_ZSTD_LEVEL`).
    pub fn new(out: W, level: i32) -> io::Result<Self> {
        let mut builder = tar::Builder::new(zstd::stream::write::Encoder::new(out, level)?);
        builder.follow_symlinks(false);
        Ok(Selection { builder, dirs: BTreeSet::new() })
    }

    /// Writes the end of the archive and of the compressed frame.
    pub fn finish(self) -> io::Result<W> {
        self.builder.into_inner()?.finish()
    }
}

/// An unselected regular file of the source archive: where its data is, for a selected
/// hard link to it (which then carries the content itself).
struct Skipped {
    data_position: u64,
    header: tar::Header,
}

/// Copies the entries of the tar at `raw` (a Docker archive of one directory) whose path
/// inside that directory matches `globs`, placed under `dest` (relative), with their
/// parent directories. Returns the number of entries copied.
///
/// A selected hard link keeps pointing at its target if the target was selected too;
/// otherwise the first selected link of the group gets the content (read again from
/// `raw`) and the others link to it.
pub fn select<W: Write>(raw: &Path, globs: &GlobSet, dest: &str, sel: &mut Selection<W>) -> io::Result<u64> {
    let dest =
        clean_relative(Path::new(dest)).ok_or_else(|| refused(format!("invalid destination {dest:?}")))?;
    let mut archive = tar::Archive::new(io::BufReader::new(std::fs::File::open(raw)?));
    let mut again: Option<std::fs::File> = None;
    let (builder, dirs) = (&mut sel.builder, &mut sel.dirs);
    // Source path (without the archived dir's name) -> path written, for hard links.
    let mut copied: HashMap<PathBuf, PathBuf> = HashMap::new();
    let mut skipped: HashMap<PathBuf, Skipped> = HashMap::new();
    // Every source directory's header, for the parents of selected entries.
    let mut dir_headers: HashMap<PathBuf, tar::Header> = HashMap::new();
    let mut count = 0;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let clean = clean_relative(&path)
            .ok_or_else(|| refused(format!("archive entry {path:?} escapes its directory")))?;
        // Drop the archived directory's own name.
        let rel: PathBuf = clean.components().skip(1).collect();
        if rel.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        let selected = globs.is_match(&rel);
        if kind.is_dir() {
            dir_headers.insert(rel.clone(), entry.header().clone());
            if selected {
                let target = dest.join(&rel);
                add_parents(builder, dirs, &target, &dest, &dir_headers)?;
                if dirs.insert(target.clone()) {
                    let mut h = entry.header().clone();
                    h.set_size(0);
                    builder.append_data(&mut h, &target, io::empty())?;
                    count += 1;
                }
            }
            continue;
        }
        if !selected {
            if kind.is_file() {
                let skip =
                    Skipped { data_position: entry.raw_file_position(), header: entry.header().clone() };
                skipped.insert(rel, skip);
            }
            continue;
        }
        let target = dest.join(&rel);
        add_parents(builder, dirs, &target, &dest, &dir_headers)?;
        let mut h = entry.header().clone();
        if kind.is_hard_link() {
            let link = entry.link_name()?.map(|l| l.into_owned()).unwrap_or_default();
            let link_rel: PathBuf = clean_relative(&link)
                .ok_or_else(|| {
                    refused(format!("hard link {path:?} points to {link:?}, outside the directory"))
                })?
                .components()
                .skip(1)
                .collect();
            if let Some(written) = copied.get(&link_rel) {
                builder.append_link(&mut h, &target, written)?;
            } else if let Some(s) = skipped.remove(&link_rel) {
                if again.is_none() {
                    again = Some(std::fs::File::open(raw)?);
                }
                let file = again.as_mut().expect("opened above");
                file.seek(SeekFrom::Start(s.data_position))?;
                let mut h = s.header;
                let size = h.size()?;
                builder.append_data(&mut h, &target, Read::take(&mut *file, size))?;
                copied.insert(link_rel, target.clone());
            } else {
                return Err(refused(format!(
                    "hard link {path:?} points to {link:?}, which the archive lacks"
                )));
            }
        } else if kind.is_symlink() {
            let link = entry.link_name()?.map(|l| l.into_owned()).unwrap_or_default();
            builder.append_link(&mut h, &target, link)?;
        } else if kind.is_file() {
            builder.append_data(&mut h, &target, &mut entry)?;
        } else {
            // Devices, fifos, sockets: not build outputs; a restore could not create
            // most of them unprivileged anyway.
            continue;
        }
        copied.insert(rel, target);
        count += 1;
    }
    Ok(count)
}

/// Writes a directory entry for each missing ancestor of `target`, outermost first: the
/// source directory's own header for those inside the selection, mode 0755 and the
/// current time for `dest` and its parents (they have no source).
fn add_parents<W: Write>(
    builder: &mut tar::Builder<W>,
    dirs: &mut BTreeSet<PathBuf>,
    target: &Path,
    dest: &Path,
    headers: &HashMap<PathBuf, tar::Header>,
) -> io::Result<()> {
    let mut missing: Vec<&Path> =
        target.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty() && !dirs.contains(*p)).collect();
    missing.reverse();
    for parent in missing {
        dirs.insert(parent.to_path_buf());
        let source = parent.strip_prefix(dest).ok().filter(|r| !r.as_os_str().is_empty());
        let mut h = match source.and_then(|r| headers.get(r)) {
            Some(h) => h.clone(),
            None => {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_mtime(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                );
                h
            }
        };
        h.set_size(0);
        builder.append_data(&mut h, parent, io::empty())?;
    }
    Ok(())
}

/// Copies the stored archive `input` with every entry moved under `prefix` (an absolute
/// directory), as a plain tar for extraction at `/` (Docker creates missing parents of
/// `prefix`). Refuses, before writing it, any entry that could land outside `prefix`:
/// absolute names and `..`, entries below a symlink of the archive, hard links to
/// anything but an earlier entry.
pub fn rebase<R: Read, W: Write>(input: R, prefix: &str, out: W) -> io::Result<W> {
    let root = clean_relative(Path::new(prefix.trim_start_matches('/')))
        .ok_or_else(|| refused(format!("invalid directory {prefix:?}")))?;
    let mut archive = tar::Archive::new(decompressed(input)?);
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut symlinks: BTreeSet<PathBuf> = BTreeSet::new();
    let mut written: BTreeSet<PathBuf> = BTreeSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let rel = clean_relative(&path)
            .ok_or_else(|| refused(format!("archive entry {path:?} escapes its root; refused")))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        if let Some(link) = rel.ancestors().skip(1).find(|a| symlinks.contains(*a)) {
            return Err(refused(format!(
                "archive entry {path:?} lies below the symlink {link:?} of the same archive; refused"
            )));
        }
        let target = root.join(&rel);
        let mut h = entry.header().clone();
        let kind = h.entry_type();
        if kind.is_dir() {
            written.remove(&rel);
            symlinks.remove(&rel);
            h.set_size(0);
            builder.append_data(&mut h, &target, io::empty())?;
        } else if kind.is_hard_link() {
            let link = entry.link_name()?.map(|l| l.into_owned()).unwrap_or_default();
            let link_rel = clean_relative(&link).filter(|l| written.contains(l)).ok_or_else(|| {
                refused(format!("hard link {path:?} points to {link:?}, not an earlier entry; refused"))
            })?;
            symlinks.remove(&rel);
            builder.append_link(&mut h, &target, root.join(link_rel))?;
            written.insert(rel);
        } else if kind.is_symlink() {
            let link = entry.link_name()?.map(|l| l.into_owned()).unwrap_or_default();
            written.remove(&rel);
            symlinks.insert(rel.clone());
            builder.append_link(&mut h, &target, link)?;
        } else if kind.is_file() {
            symlinks.remove(&rel);
            builder.append_data(&mut h, &target, &mut entry)?;
            written.insert(rel);
        }
        // Anything else (a pax global header, a device) is not restored.
    }
    builder.into_inner()
}

/// The first regular file's content in a tar (a Docker archive of one file), at most
/// `limit` bytes.
pub fn first_file<R: Read>(input: R, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries()? {
        let entry = entry?;
        if entry.header().entry_type().is_file() {
            let mut buf = Vec::new();
            entry.take(limit).read_to_end(&mut buf)?;
            return Ok(Some(buf));
        }
    }
    Ok(None)
}

/// One piece of a cache-key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    /// `{{ md5sum FILE }}`: hex md5 of a file in the container (relative to the working dir).
    Md5sum(String),
    /// `{{ env NAME }}`: a variable of the task's environment.
    Env(String),
    /// `{{ epoch }}`, `{{ year }}`, `{{ month }}`, `{{ day }}`, `{{ arch }}`.
    Var(String),
}

/// Parses `deps-{{ md5sum go.sum }}` and friends; arguments may be quoted.
pub fn parse_template(t: &str) -> anyhow::Result<Vec<Part>> {
    let mut parts = Vec::new();
    let mut rest = t;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            parts.push(Part::Text(rest[..start].to_string()));
        }
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| anyhow::anyhow!("unclosed '{{{{' in {t:?}"))?;
        let words: Vec<&str> = after[..end].split_whitespace().map(|w| w.trim_matches('"')).collect();
        parts.push(match words.as_slice() {
            ["md5sum", file] => Part::Md5sum(file.to_string()),
            ["env", name] => Part::Env(name.to_string()),
            [v @ ("epoch" | "year" | "month" | "day" | "arch")] => Part::Var(v.to_string()),
            _ => return Err(anyhow::anyhow!("unknown template function {:?} in {t:?} (md5sum FILE, env NAME, epoch, year, month, day, arch)", after[..end].trim())),
        });
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    Ok(parts)
}

/// (year, month, day) of a Unix time in UTC.
pub fn civil_date(epoch_s: u64) -> (i64, u32, u32) {
    // Howard Hinnant's days-to-civil algorithm.
    let z = (epoch_s / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// Writes a tar of `dir` the way Docker's archive API does: entries named
    /// `<name>/...` in pre-order (a directory before its contents), full modes, whole
    /// seconds, symlinks as they are, the second path of a hard-link group as a link to
    /// the first (`<name>/first`).
    fn docker_like_tar(dir: &Path, name: &str, out: &Path) {
        let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
        let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            let full = dir.join(&rel);
            let meta = std::fs::symlink_metadata(&full).unwrap();
            let archived = Path::new(name).join(&rel);
            let mut h = tar::Header::new_gnu();
            h.set_mode(meta.mode() & 0o7777);
            h.set_mtime(meta.mtime() as u64);
            h.set_uid(meta.uid() as u64);
            h.set_gid(meta.gid() as u64);
            h.set_size(0);
            let ft = meta.file_type();
            if ft.is_dir() {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, &archived, io::empty()).unwrap();
                let mut children: Vec<PathBuf> =
                    std::fs::read_dir(&full).unwrap().map(|e| rel.join(e.unwrap().file_name())).collect();
                children.sort();
                children.reverse();
                todo.extend(children);
            } else if ft.is_symlink() {
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, &archived, std::fs::read_link(&full).unwrap()).unwrap();
            } else if let Some(first) = inodes.get(&(meta.dev(), meta.ino())) {
                h.set_entry_type(tar::EntryType::Link);
                b.append_link(&mut h, &archived, Path::new(name).join(first)).unwrap();
            } else {
                inodes.insert((meta.dev(), meta.ino()), rel.clone());
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(meta.len());
                b.append_data(&mut h, &archived, std::fs::File::open(&full).unwrap()).unwrap();
            }
        }
        b.into_inner().unwrap();
    }

    /// Extracts a plain tar at `root` as Docker does: modes with their special bits, mtimes,
    /// and directory times set once their contents are in.
    fn extract(tar_bytes: &[u8], root: &Path) {
        let mut a = tar::Archive::new(tar_bytes);
        a.set_preserve_permissions(true);
        a.set_preserve_mtime(true);
        a.unpack(root).unwrap();
        let mut dirs: Vec<(PathBuf, u64)> = tar::Archive::new(tar_bytes)
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.header().entry_type().is_dir())
            .map(|e| (root.join(e.path().unwrap()), e.header().mtime().unwrap()))
            .collect();
        dirs.sort();
        for (d, mtime) in dirs.into_iter().rev() {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
            std::fs::File::open(&d).unwrap().set_modified(t).unwrap();
        }
    }

    /// What a round trip must keep, per path under `dir`: kind, mode, mtime, content or
    /// link target, and the other paths sharing the inode (hard links).
    fn describe(dir: &Path) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut by_inode: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            let full = dir.join(&rel);
            let meta = std::fs::symlink_metadata(&full).unwrap();
            let ft = meta.file_type();
            let what = if ft.is_dir() {
                todo.extend(std::fs::read_dir(&full).unwrap().map(|e| rel.join(e.unwrap().file_name())));
                format!("dir {:o} {}", meta.permissions().mode() & 0o7777, meta.mtime())
            } else if ft.is_symlink() {
                format!("symlink -> {}", std::fs::read_link(&full).unwrap().display())
            } else {
                by_inode.entry(meta.ino()).or_default().push(rel.clone());
                let content = std::fs::read(&full).unwrap();
                format!("file {:o} {} {:?}", meta.permissions().mode() & 0o7777, meta.mtime(), content)
            };
            if !rel.as_os_str().is_empty() {
                out.insert(rel, what);
            }
        }
        for group in by_inode.values().filter(|g| g.len() > 1) {
            for p in group {
                let mut others: Vec<_> = group.iter().filter(|o| *o != p).collect();
                others.sort();
                out.get_mut(p).unwrap().push_str(&format!(" linked with {others:?}"));
            }
        }
        out
    }

    /// Saves `src` (as `work/...`) with `paths` into `dest`, then restores under
    /// `/restored/here`; returns the extraction root.
    fn round_trip(src: &Path, paths: &[&str], dest: &str) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("raw.tar");
        docker_like_tar(src, "work", &raw);
        let mut sel = Selection::new(Vec::new(), 3).unwrap();
        let globs = patterns(&paths.iter().map(|p| p.to_string()).collect::<Vec<_>>()).unwrap();
        select(&raw, &globs, dest, &mut sel).unwrap();
        let stored = sel.finish().unwrap();
        assert_eq!(stored[..4], flotilla_store::ost::tarstream::ZSTD_MAGIC, "archives are stored compressed");
        let plain = rebase(&stored[..], "/restored/here", Vec::new()).unwrap();
        let out = tempfile::tempdir().unwrap();
        // Docker's upload needs its target: the container's dest_dir exists (or is made).
        std::fs::create_dir_all(out.path().join("restored/here")).unwrap();
        extract(&plain, out.path());
        out
    }

    fn names(tar_bytes: &[u8]) -> Vec<String> {
        tar::Archive::new(tar_bytes)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    fn write(root: &Path, rel: &str, content: &str, mode: u32, mtime: u64) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
        std::fs::File::open(&p).unwrap().set_modified(t).unwrap();
    }

    fn set_dir(root: &Path, rel: &str, mode: u32, mtime: u64) {
        let p = root.join(rel);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
        std::fs::File::open(&p).unwrap().set_modified(t).unwrap();
    }

    /// The gzip report of issue 26: `make install DESTDIR=pkg` hard-links `uncompress`
    /// to `gunzip`; an empty 1777 `tmp` and a 0700 dir with an old mtime.
    #[test]
    fn a_round_trip_keeps_hard_links_empty_dirs_and_directory_modes_and_times() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        write(s, "pkg/usr/bin/gunzip", "#!/bin/sh\n", 0o4755, 1_600_000_000);
        std::fs::hard_link(s.join("pkg/usr/bin/gunzip"), s.join("pkg/usr/bin/uncompress")).unwrap();
        std::os::unix::fs::symlink("gunzip", s.join("pkg/usr/bin/zcat")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", s.join("pkg/outside")).unwrap();
        set_dir(s, "pkg/tmp", 0o1777, 1_500_000_000);
        set_dir(s, "pkg/private", 0o700, 1_400_000_000);
        set_dir(s, "pkg/usr/bin", 0o2755, 1_300_000_000);
        let out = round_trip(s, &["pkg/**"], ".");
        let restored = out.path().join("restored/here");
        assert_eq!(describe(&restored.join("pkg")), describe(&s.join("pkg")));
        let before = describe(s);
        let after = describe(&restored);
        assert_eq!(after.len(), before.len());
    }

    #[test]
    fn a_hard_link_whose_target_is_not_selected_carries_the_content() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        write(s, "a/first", "data", 0o640, 1_600_000_000);
        std::fs::hard_link(s.join("a/first"), s.join("a/second")).unwrap();
        std::fs::create_dir_all(s.join("b")).unwrap();
        std::fs::hard_link(s.join("a/first"), s.join("b/third")).unwrap();
        std::fs::hard_link(s.join("a/first"), s.join("b/fourth")).unwrap();
        let out = round_trip(s, &["b/**"], "o");
        let r = out.path().join("restored/here/o/b");
        assert_eq!(std::fs::read_to_string(r.join("third")).unwrap(), "data");
        let (m3, m4) =
            (std::fs::metadata(r.join("third")).unwrap(), std::fs::metadata(r.join("fourth")).unwrap());
        assert_eq!(m3.ino(), m4.ino(), "the selected links stay one file");
        assert_eq!(m3.permissions().mode() & 0o7777, 0o640);
        assert!(!out.path().join("restored/here/o/a").exists());
    }

    #[test]
    fn select_keeps_matching_entries_under_dest_with_their_parents() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        for f in ["bin/app", "bin/sub/lib", "src/main.c", "top"] {
            write(s, f, "x", 0o644, 1_000);
        }
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("raw.tar");
        docker_like_tar(s, "work", &raw);
        let mut sel = Selection::new(Vec::new(), 1).unwrap();
        assert_eq!(select(&raw, &patterns(&["bin/**".into()]).unwrap(), "out", &mut sel).unwrap(), 3);
        // A second selection into the same archive (several `contents`).
        assert_eq!(
            select(&raw, &patterns(&["*".into()]).unwrap(), ".", &mut sel).unwrap(),
            3,
            "'*' does not cross '/' (bin, src, top)"
        );
        let out = zstd::decode_all(&sel.finish().unwrap()[..]).unwrap();
        assert_eq!(
            names(&out),
            ["out", "out/bin", "out/bin/app", "out/bin/sub", "out/bin/sub/lib", "bin", "src", "top"]
        );
        let mut sel = Selection::new(Vec::new(), 1).unwrap();
        assert!(select(&raw, &patterns(&[]).unwrap(), "../x", &mut sel).is_err());
    }

    fn evil_tar(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(if kind.is_file() { 1 } else { 0 });
            // tar::Builder refuses '..' in paths; write names into the header directly.
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_cksum();
            let data: &[u8] = if kind.is_file() { b"x" } else { b"" };
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn rebase_moves_everything_under_dest_and_refuses_whatever_could_land_outside() {
        use tar::EntryType::{Directory, Link, Regular, Symlink};
        let ok = evil_tar(&[
            ("d", Directory, ""),
            ("d/f", Regular, ""),
            ("d/l", Link, "d/f"),
            ("s", Symlink, "/etc"),
        ]);
        let out = rebase(&ok[..], "/work/dest", Vec::new()).unwrap();
        assert_eq!(names(&out), ["work/dest/d", "work/dest/d/f", "work/dest/d/l", "work/dest/s"]);
        let links: Vec<String> = tar::Archive::new(&out[..])
            .entries()
            .unwrap()
            .filter_map(|e| e.unwrap().link_name().unwrap().map(|l| l.display().to_string()))
            .collect();
        assert_eq!(links, ["work/dest/d/f", "/etc"], "hard links re-rooted, symlinks as they were");
        // Plain (old, uncompressed) and zstd archives are both read.
        let compressed = zstd::encode_all(&ok[..], 3).unwrap();
        assert_eq!(rebase(&compressed[..], "/work/dest", Vec::new()).unwrap(), out);
        for (evil, why) in [
            (evil_tar(&[("../escape", Regular, "")]), "escapes"),
            (evil_tar(&[("/etc/x", Regular, "")]), "escapes"),
            (evil_tar(&[("s", Symlink, "/etc"), ("s/passwd", Regular, "")]), "below the symlink"),
            (evil_tar(&[("l", Link, "/etc/passwd")]), "not an earlier entry"),
            (evil_tar(&[("l", Link, "../x")]), "not an earlier entry"),
            (evil_tar(&[("l", Link, "later"), ("later", Regular, "")]), "not an earlier entry"),
        ] {
            let err = rebase(&evil[..], "/work", Vec::new()).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Dir { parent: usize, mode: u32, mtime: u64 },
            File { parent: usize, mode: u32, mtime: u64, content: Vec<u8> },
            Symlink { parent: usize, target: usize, absolute: bool },
            HardLink { parent: usize, to: usize },
        }

        fn op() -> impl Strategy<Value = Op> {
            let mtime = 1_000_000_000u64..1_800_000_000;
            let dir_mode = prop::sample::select(vec![0o755u32, 0o700, 0o1777, 0o2775, 0o750, 0o711]);
            let file_mode =
                prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o4755, 0o2755, 0o1644, 0o444, 0o6711]);
            prop_oneof![
                (any::<usize>(), dir_mode, mtime.clone()).prop_map(|(parent, mode, mtime)| Op::Dir {
                    parent,
                    mode,
                    mtime
                }),
                (any::<usize>(), file_mode, mtime, prop::collection::vec(any::<u8>(), 0..600))
                    .prop_map(|(parent, mode, mtime, content)| Op::File { parent, mode, mtime, content }),
                (any::<usize>(), any::<usize>(), any::<bool>())
                    .prop_map(|(parent, target, absolute)| Op::Symlink { parent, target, absolute }),
                (any::<usize>(), any::<usize>()).prop_map(|(parent, to)| Op::HardLink { parent, to }),
            ]
        }

        /// Builds the tree of `ops` under `root`; directory modes and times are set last,
        /// deepest first (creating entries changes them).
        fn build(root: &Path, ops: &[Op]) {
            let mut dirs = vec![PathBuf::new()];
            let mut files: Vec<PathBuf> = Vec::new();
            let mut dir_meta: Vec<(PathBuf, u32, u64)> = Vec::new();
            for (n, op) in ops.iter().enumerate() {
                let parent = |p: usize| dirs[p % dirs.len()].clone();
                match op {
                    Op::Dir { parent: p, mode, mtime } => {
                        let rel = parent(*p).join(format!("d{n}"));
                        std::fs::create_dir(root.join(&rel)).unwrap();
                        dir_meta.push((rel.clone(), *mode, *mtime));
                        dirs.push(rel);
                    }
                    Op::File { parent: p, mode, mtime, content } => {
                        let rel = parent(*p).join(format!("f{n}"));
                        let full = root.join(&rel);
                        std::fs::write(&full, content).unwrap();
                        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(*mode)).unwrap();
                        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(*mtime);
                        std::fs::OpenOptions::new().write(true).open(&full).unwrap().set_modified(t).unwrap();
                        files.push(rel);
                    }
                    Op::Symlink { parent: p, target, absolute } => {
                        let rel = parent(*p).join(format!("s{n}"));
                        let target = if *absolute {
                            PathBuf::from(format!("/outside/t{target}"))
                        } else {
                            PathBuf::from(format!("../x{target}/y"))
                        };
                        std::os::unix::fs::symlink(target, root.join(&rel)).unwrap();
                    }
                    Op::HardLink { parent: p, to } if !files.is_empty() => {
                        let rel = parent(*p).join(format!("h{n}"));
                        std::fs::hard_link(root.join(&files[to % files.len()]), root.join(&rel)).unwrap();
                    }
                    Op::HardLink { .. } => {}
                }
            }
            dir_meta.sort();
            for (rel, mode, mtime) in dir_meta.into_iter().rev() {
                let full = root.join(&rel);
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                std::fs::File::open(&full).unwrap().set_modified(t).unwrap();
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode)).unwrap();
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn save_then_restore_reproduces_any_tree_exactly(ops in prop::collection::vec(op(), 0..40)) {
                let src = tempfile::tempdir().unwrap();
                build(src.path(), &ops);
                let out = round_trip(src.path(), &["."], ".");
                prop_assert_eq!(describe(&out.path().join("restored/here")), describe(src.path()));
            }
        }
    }

    #[test]
    fn templates() {
        assert_eq!(
            parse_template("deps-{{ md5sum go.sum }}-{{env \"OS\"}}-{{ year }}").unwrap(),
            [
                Part::Text("deps-".into()),
                Part::Md5sum("go.sum".into()),
                Part::Text("-".into()),
                Part::Env("OS".into()),
                Part::Text("-".into()),
                Part::Var("year".into())
            ]
        );
        assert_eq!(parse_template("plain").unwrap(), [Part::Text("plain".into())]);
        assert!(parse_template("x-{{ nope }}").is_err());
        assert!(parse_template("x-{{ md5sum a").is_err());
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(1_795_000_000), (2026, 11, 18));
        assert_eq!(civil_date(951_782_400), (2000, 2, 29));
    }
}
