//! The tar layer of `.nemo` (formats.md §1.1, §8.4): list members of an in-memory image, and
//! encode headers for the writer.
//!
//! Reading walks the headers with the `tar` crate over a seekable cursor on the mapped bytes, so
//! member data is skipped, never copied: a member is just a byte range of the image. The crate
//! resolves PAX `path`/`size` records and GNU long names; on top of it this module rejects what a
//! `.nemo` must never contain (unsafe paths, duplicates, links, sparse files) and detects
//! truncation, which the crate reports as a clean end of archive.
//!
//! Writing hand-encodes POSIX ustar headers plus PAX extended headers where a path is longer than
//! 100 bytes or not ASCII, or a member is 8 GiB or more. The `tar` crate's `Builder` is not used:
//! it wants a `Read` for each member's data, while the writer streams each rank's
//! `model_weights.ckpt` straight into a seekable window of the output (the zip writer patches its
//! own headers), and it offers only GNU long-name records. The encoding is exactly what Python's
//! `tarfile` writes in PAX mode (same field formats, `././@PaxHeader` name, 10 KiB record
//! padding), so the output is deterministic and byte-comparable.

use crate::error::{Error, Result};
use std::io::Cursor;
use std::path::Path;

/// Tar block size.
pub const BLOCK: u64 = 512;
/// Python's `tarfile` (and GNU tar) pad the archive to a multiple of 20 blocks.
const RECORD: u64 = 20 * BLOCK;
/// Largest size the 11-digit octal ustar field holds.
const USTAR_MAX_SIZE: u64 = 0o777_7777_7777;

/// What a member is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
}

/// One member of a tar image, with its name normalised (no `./` prefix, no trailing `/`; the
/// archive root `.` has the empty name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarMember {
    /// Normalised path inside the archive.
    pub name: String,
    /// File or directory.
    pub kind: MemberKind,
    /// Start of the member's data in the image.
    pub offset: usize,
    /// Data length in bytes (0 for directories).
    pub len: usize,
}

/// List the members of the tar image `bytes`, in archive order; `origin` names it in errors.
///
/// Never panics and always terminates on arbitrary input: every header advances the walk by at
/// least one block, and every data range is checked against the image.
pub fn list_members(bytes: &[u8], origin: &Path) -> Result<Vec<TarMember>> {
    let bad = |detail: String| Error::malformed(origin, "tar", detail);
    if bytes.is_empty() {
        return Err(bad("empty file".into()));
    }
    let mut archive = tar::Archive::new(Cursor::new(bytes));
    let entries = archive.entries_with_seek().map_err(|e| bad(e.to_string()))?;
    let mut members = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Where the header after the last member starts; an intact archive has a zero block there.
    let mut next_header = 0u64;
    for entry in entries {
        let entry = entry.map_err(|e| bad(format!("after {} members: {e}", members.len())))?;
        let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let start = entry.raw_file_position();
        let size = entry.size();
        let end = start.checked_add(size).filter(|&e| e <= bytes.len() as u64).ok_or_else(|| {
            bad(format!(
                "member '{raw_name}' ({size} bytes at offset {start}) runs past the end of the \
                 {}-byte archive (truncated?)",
                bytes.len()
            ))
        })?;
        next_header = start + size.div_ceil(BLOCK) * BLOCK;
        let header = entry.header();
        let flag = header.as_bytes()[156];
        if flag == b'g' {
            // A PAX global header carries defaults for the whole archive, not a member.
            continue;
        }
        let name = normalize(&entry.path_bytes(), origin)?;
        let kind = match flag {
            b'0' | b'7' => MemberKind::File,
            // Old-style archives mark directories with a trailing slash only.
            0 if raw_name.ends_with('/') => MemberKind::Dir,
            0 => MemberKind::File,
            b'5' => MemberKind::Dir,
            other => {
                return Err(bad(format!(
                    "member '{raw_name}' has type '{}' ({}); a .nemo holds only files and directories",
                    other.escape_ascii(),
                    type_name(other)
                )));
            }
        };
        if kind == MemberKind::File && name.is_empty() {
            return Err(bad(format!("member '{raw_name}' is a file named like the archive root")));
        }
        if kind == MemberKind::File && !seen.insert(name.clone()) {
            return Err(bad(format!("member '{name}' appears twice (readers disagree on which copy wins)")));
        }
        let (offset, len) = (to_usize(start, origin)?, to_usize(end - start, origin)?);
        let len = if kind == MemberKind::Dir { 0 } else { len };
        members.push(TarMember { name, kind, offset, len });
    }
    // The crate treats running out of bytes at a header boundary as the end of the archive; an
    // intact archive instead ends with (at least one) zero block.
    let marker_end = next_header.checked_add(BLOCK).filter(|&e| e <= bytes.len() as u64);
    if marker_end.is_none() {
        return Err(bad(format!(
            "no end-of-archive block after byte {next_header} (file is {} bytes; truncated?)",
            bytes.len()
        )));
    }
    Ok(members)
}

fn to_usize(n: u64, origin: &Path) -> Result<usize> {
    usize::try_from(n)
        .map_err(|_| Error::malformed(origin, "tar", format!("offset {n} does not fit in memory")))
}

fn type_name(flag: u8) -> &'static str {
    match flag {
        b'1' => "hard link",
        b'2' => "symbolic link",
        b'3' => "character device",
        b'4' => "block device",
        b'6' => "fifo",
        b'S' => "GNU sparse file",
        b'L' | b'K' => "dangling GNU long-name record",
        b'x' => "PAX header",
        _ => "unknown type",
    }
}

/// Normalise a member path: strip `./` and empty components, refuse anything that could escape
/// the archive (absolute paths, `..`, Windows drive or UNC prefixes).
pub fn normalize(raw: &[u8], origin: &Path) -> Result<String> {
    let name = std::str::from_utf8(raw).map_err(|_| {
        Error::malformed(origin, "tar", format!("member name '{}' is not UTF-8", raw.escape_ascii()))
    })?;
    let unsafe_path = || Error::UnsafeMemberPath { path: origin.to_path_buf(), member: name.to_string() };
    // Backslashes are separators on Windows, drive letters make a path absolute there.
    let absolute = name.starts_with('/')
        || (name.len() >= 2 && name.as_bytes()[1] == b':' && name.as_bytes()[0].is_ascii_alphabetic());
    if absolute || name.contains(['\\', '\0']) {
        return Err(unsafe_path());
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(unsafe_path()),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// The header block(s) for a regular file of `size` bytes: a PAX extended header when needed,
/// then the ustar header. `name` is the archive path as written (e.g. `./model_config.yaml`).
pub fn file_header(name: &str, size: u64) -> Vec<u8> {
    entry_header(name, size, b'0', 0o644)
}

/// The header block(s) for a directory; `name` should end with `/` as Python writes it.
pub fn dir_header(name: &str) -> Vec<u8> {
    entry_header(name, 0, b'5', 0o755)
}

/// Zero bytes that pad `len` bytes of data to the next block boundary.
pub fn padding(len: u64) -> usize {
    (len.next_multiple_of(BLOCK) - len) as usize
}

/// The end-of-archive: two zero blocks, then zeros up to the next full record, given the bytes
/// written so far.
pub fn trailer(written: u64) -> Vec<u8> {
    let end = (written + 2 * BLOCK).next_multiple_of(RECORD);
    vec![0; (end - written) as usize]
}

fn entry_header(name: &str, size: u64, flag: u8, mode: u32) -> Vec<u8> {
    let mut records = Vec::new();
    if name.len() > 100 || !name.is_ascii() {
        records.extend(pax_record("path", name));
    }
    if size > USTAR_MAX_SIZE {
        records.extend(pax_record("size", &size.to_string()));
    }
    let mut out = Vec::with_capacity(3 * BLOCK as usize);
    if !records.is_empty() {
        let len = records.len() as u64;
        out.extend(ustar(b"././@PaxHeader", len, b'x', 0o644));
        out.extend(&records);
        out.resize(out.len() + padding(len), 0);
    }
    // With a PAX path the ustar name is only a fallback for old readers: truncate like Python.
    let short: Vec<u8> = name.bytes().map(|b| if b.is_ascii() { b } else { b'_' }).take(100).collect();
    let size_field = if size > USTAR_MAX_SIZE { 0 } else { size };
    out.extend(ustar(&short, size_field, flag, mode));
    out
}

/// One 512-byte POSIX ustar header (uid/gid 0, mtime 0, empty owner names: the output depends
/// only on the checkpoint).
fn ustar(name: &[u8], size: u64, flag: u8, mode: u32) -> [u8; BLOCK as usize] {
    let mut h = [0u8; BLOCK as usize];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0); // uid
    octal(&mut h[116..124], 0); // gid
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 0); // mtime
    h[156] = flag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], 0); // devmajor
    octal(&mut h[337..345], 0); // devminor
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    // "%06o\0" followed by the space that was already there, as Python and GNU tar write it.
    let digits = format!("{sum:06o}\0");
    h[148..155].copy_from_slice(digits.as_bytes());
    h
}

/// Zero-padded octal digits followed by a NUL, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let digits = format!("{value:0width$o}");
    field[..width].copy_from_slice(digits.as_bytes());
    field[width] = 0;
}

/// One PAX record, `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while body + len.to_string().len() != len {
        len = body + len.to_string().len();
    }
    format!("{len} {key}={value}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(members: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in members {
            match data {
                Some(d) => {
                    out.extend(file_header(name, d.len() as u64));
                    out.extend(*d);
                    out.resize(out.len() + padding(d.len() as u64), 0);
                }
                None => out.extend(dir_header(name)),
            }
        }
        let t = trailer(out.len() as u64);
        out.extend(t);
        out
    }

    #[test]
    fn lists_members_with_long_names() {
        let long = format!("./model_weights/{}/0.0.0", "k".repeat(150));
        let bytes = archive(&[("./", None), ("./a.txt", Some(b"hello")), (&long, Some(b"xy"))]);
        assert_eq!(bytes.len() % RECORD as usize, 0);
        let m = list_members(&bytes, Path::new("t.tar")).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].name.as_str(), m[0].kind), ("", MemberKind::Dir));
        assert_eq!(m[1].name, "a.txt");
        assert_eq!(&bytes[m[1].offset..m[1].offset + m[1].len], b"hello");
        assert_eq!(m[2].name, long.trim_start_matches("./"));
        assert_eq!(&bytes[m[2].offset..m[2].offset + m[2].len], b"xy");
    }

    #[test]
    fn pax_size_record_is_written_for_huge_members() {
        let h = file_header("./big", USTAR_MAX_SIZE + 1);
        assert_eq!(h.len(), 3 * BLOCK as usize);
        let text = String::from_utf8_lossy(&h[512..1024]);
        assert!(text.starts_with("19 size=8589934592\n"), "{text}");
        // A reader sees the PAX size (and then runs out of data: a named truncation error).
        let mut bytes = h.clone();
        bytes.extend(vec![0u8; 4096]);
        let err = list_members(&bytes, Path::new("t.tar")).unwrap_err().to_string();
        assert!(err.contains("8589934592") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn pax_record_lengths_are_self_consistent() {
        for n in [0, 1, 80, 89, 90, 91, 995, 996, 997, 5000] {
            let r = pax_record("path", &"a".repeat(n));
            let (len, _) = std::str::from_utf8(&r).unwrap().split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), r.len(), "n={n}");
        }
    }

    #[test]
    fn unsafe_names_are_refused() {
        for bad in ["../evil", "/etc/passwd", "./a/../../b", "a\\..\\b", "C:/x", "a/..", "a\\b"] {
            let bytes = archive(&[(bad, Some(b"x"))]);
            let err = list_members(&bytes, Path::new("t.tar")).unwrap_err();
            assert!(matches!(err, Error::UnsafeMemberPath { .. }), "{bad}: {err}");
        }
        assert_eq!(normalize(b"./a//./b/", Path::new("t")).unwrap(), "a/b");
        assert_eq!(normalize(b".", Path::new("t")).unwrap(), "");
    }

    #[test]
    fn truncation_and_garbage_are_named_errors() {
        let bytes = archive(&[("./a", Some(&[7u8; 1000])), ("./b", Some(b"z"))]);
        for cut in [0, 100, 512, 700, 1536, 2048, 2560] {
            let err = list_members(&bytes[..cut], Path::new("t.tar")).unwrap_err();
            assert!(matches!(err, Error::Malformed { format: "tar", .. }), "cut {cut}: {err}");
        }
        let mut corrupt = bytes.clone();
        corrupt[0] ^= 1;
        assert!(list_members(&corrupt, Path::new("t.tar")).is_err());
    }

    #[test]
    fn duplicates_and_links_are_refused() {
        let bytes = archive(&[("./a", Some(b"1")), ("a", Some(b"2"))]);
        assert!(list_members(&bytes, Path::new("t.tar")).unwrap_err().to_string().contains("twice"));
        let mut link = ustar(b"./l", 0, b'2', 0o777).to_vec();
        link.extend(trailer(512));
        assert!(list_members(&link, Path::new("t.tar")).unwrap_err().to_string().contains("symbolic link"));
    }

    /// Random corruption of a valid archive must give an error or a member list, never a panic.
    #[test]
    fn mutations_never_panic() {
        let long = format!("./{}", "d/".repeat(80));
        let bytes = archive(&[("./", None), ("./a", Some(&[1u8; 700])), (&format!("{long}x"), Some(b"yy"))]);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut b = bytes.clone();
            for _ in 0..(rand() % 8 + 1) {
                let i = (rand() % b.len() as u64) as usize;
                b[i] = rand() as u8;
            }
            let cut = if rand() % 4 == 0 { (rand() % b.len() as u64) as usize } else { b.len() };
            if let Ok(members) = list_members(&b[..cut], Path::new("fuzz")) {
                for m in members {
                    assert!(m.offset + m.len <= cut);
                }
            }
        }
    }
}
