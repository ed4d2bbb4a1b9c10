//! Pure helpers for workspace and cache archives (tar) and cache-key templates. Docker's
//! archive API gives a tar of a directory whose entries start with the directory's own
//! name; [`select`] keeps the entries matching glob patterns, re-rooted under a
//! destination; [`rebase`] prefixes every entry with an absolute directory so an archive
//! can be extracted at `/` (Docker creates the missing directories on the way).

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Compiles the `paths` of a save step; `*` stays within a path segment, `**` crosses.
/// No pattern, `.` or `**` select everything.
pub fn patterns(paths: &[String]) -> Result<GlobSet, String> {
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
            .map_err(|e| format!("invalid path pattern {p:?}: {e}"))?;
        b.add(glob);
    }
    b.build().map_err(|e| format!("invalid path patterns: {e}"))
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

/// Builds one archive from several [`select`] calls.
pub struct Selection<W: Write> {
    builder: tar::Builder<W>,
    dirs: BTreeSet<PathBuf>,
}

impl<W: Write> Selection<W> {
    pub fn new(out: W) -> Self {
        let mut builder = tar::Builder::new(out);
        builder.follow_symlinks(false);
        Selection { builder, dirs: BTreeSet::new() }
    }

    /// Writes the end of the archive.
    pub fn finish(self) -> io::Result<W> {
        self.builder.into_inner()
    }
}

/// Copies the entries of `input` (a Docker archive of one directory) whose path inside
/// that directory matches `globs`, placed under `dest` (relative), with their parent
/// directories. Returns the number of files and links copied.
pub fn select<R: Read, W: Write>(
    input: R,
    globs: &GlobSet,
    dest: &str,
    sel: &mut Selection<W>,
) -> io::Result<u64> {
    let dest = clean_relative(Path::new(dest))
        .ok_or_else(|| io::Error::other(format!("invalid destination {dest:?}")))?;
    let mut archive = tar::Archive::new(input);
    let (builder, dirs) = (&mut sel.builder, &mut sel.dirs);
    let mut count = 0;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let Some(clean) = clean_relative(&path) else { continue };
        // Drop the archived directory's own name.
        let rel: PathBuf = clean.components().skip(1).collect();
        if rel.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() || !globs.is_match(&rel) {
            continue;
        }
        let target = dest.join(&rel);
        add_parents(builder, dirs, &target)?;
        let mut h = entry.header().clone();
        if kind.is_symlink() || kind.is_hard_link() {
            let link = entry.link_name()?.map(|l| l.into_owned()).unwrap_or_default();
            builder.append_link(&mut h, &target, link)?;
        } else {
            builder.append_data(&mut h, &target, &mut entry)?;
        }
        count += 1;
    }
    Ok(count)
}

/// Writes a directory entry for each missing ancestor of `target`, outermost first.
fn add_parents<W: Write>(
    builder: &mut tar::Builder<W>,
    dirs: &mut BTreeSet<PathBuf>,
    target: &Path,
) -> io::Result<()> {
    let mut missing: Vec<&Path> =
        target.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty() && !dirs.contains(*p)).collect();
    missing.reverse();
    for parent in missing {
        dirs.insert(parent.to_path_buf());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        builder.append_data(&mut h, parent, io::empty())?;
    }
    Ok(())
}

/// Copies `input` with every entry moved under `prefix` (an absolute directory), for
/// extraction at `/`. Entries escaping their root (`..`, absolute) are refused.
pub fn rebase<R: Read, W: Write>(input: R, prefix: &str, out: W) -> io::Result<W> {
    let root = clean_relative(Path::new(prefix.trim_start_matches('/')))
        .ok_or_else(|| io::Error::other(format!("invalid directory {prefix:?}")))?;
    let mut archive = tar::Archive::new(input);
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let rel = clean_relative(&path)
            .ok_or_else(|| io::Error::other(format!("archive entry {path:?} escapes its root")))?;
        let target = root.join(&rel);
        add_parents(&mut builder, &mut dirs, &target)?;
        let mut h = entry.header().clone();
        let kind = h.entry_type();
        if kind.is_dir() {
            if dirs.insert(target.clone()) {
                builder.append_data(&mut h, &target, io::empty())?;
            }
        } else if kind.is_symlink() || kind.is_hard_link() {
            let link = entry.link_name()?.map(|l| l.into_owned()).unwrap_or_default();
            let link =
                if kind.is_hard_link() { root.join(clean_relative(&link).unwrap_or_default()) } else { link };
            builder.append_link(&mut h, &target, link)?;
        } else {
            builder.append_data(&mut h, &target, &mut entry)?;
        }
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
pub fn parse_template(t: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = t;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            parts.push(Part::Text(rest[..start].to_string()));
        }
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| format!("unclosed '{{{{' in {t:?}"))?;
        let words: Vec<&str> = after[..end].split_whitespace().map(|w| w.trim_matches('"')).collect();
        parts.push(match words.as_slice() {
            ["md5sum", file] => Part::Md5sum(file.to_string()),
            ["env", name] => Part::Env(name.to_string()),
            [v @ ("epoch" | "year" | "month" | "day" | "arch")] => Part::Var(v.to_string()),
            _ => return Err(format!("unknown template function {:?} in {t:?} (md5sum FILE, env NAME, epoch, year, month, day, arch)", after[..end].trim())),
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

    fn docker_archive(files: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        b.append_data(&mut h, "work", io::empty()).unwrap();
        for (p, content) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, format!("work/{p}"), content.as_bytes()).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn names(tar_bytes: &[u8]) -> Vec<String> {
        tar::Archive::new(tar_bytes)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn select_keeps_matching_files_under_dest_with_their_parents() {
        let input =
            docker_archive(&[("bin/app", "x"), ("bin/sub/lib", "y"), ("src/main.c", "z"), ("top", "t")]);
        let mut sel = Selection::new(Vec::new());
        assert_eq!(select(&input[..], &patterns(&["bin/**".into()]).unwrap(), "out", &mut sel).unwrap(), 2);
        // A second selection into the same archive (several `contents`).
        assert_eq!(
            select(&input[..], &patterns(&["*".into()]).unwrap(), ".", &mut sel).unwrap(),
            1,
            "'*' does not cross '/'"
        );
        let out = sel.finish().unwrap();
        assert_eq!(names(&out), ["out", "out/bin", "out/bin/app", "out/bin/sub", "out/bin/sub/lib", "top"]);
        let mut sel = Selection::new(Vec::new());
        assert_eq!(select(&input[..], &patterns(&[]).unwrap(), ".", &mut sel).unwrap(), 4);
        assert!(select(&input[..], &patterns(&[]).unwrap(), "../x", &mut sel).is_err());
    }

    #[test]
    fn rebase_moves_everything_under_an_absolute_dir_and_refuses_escapes() {
        let mut sel = Selection::new(Vec::new());
        select(&docker_archive(&[("bin/app", "x")])[..], &patterns(&[]).unwrap(), ".", &mut sel).unwrap();
        let sel = sel.finish().unwrap();
        let out = rebase(&sel[..], "/work/dest", Vec::new()).unwrap();
        assert_eq!(names(&out), ["work", "work/dest", "work/dest/bin", "work/dest/bin/app"]);
        let mut evil = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        // tar::Builder refuses '..' in paths; write the name into the header directly.
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        evil.append(&h, &b"x"[..]).unwrap();
        let evil = evil.into_inner().unwrap();
        assert!(rebase(&evil[..], "/work", Vec::new()).is_err());
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
