//! Writing a tensor's bytes at a known offset of an output file, streamed.
//!
//! Every writer here knows each tensor's offset from headers alone, so tensors are written
//! positionally from several threads. [`write_tensor_at`] turns a tensor's [`Segment`]s into
//! those writes with as few copies as the source allows:
//!
//! * a mapped range of a registered input file goes file to file with `copy_file_range(2)`: the
//!   kernel copies page-cache pages, nothing is faulted into our address space and nothing passes
//!   through a user buffer (what `cp` does; std exposes no positional form, hence `libc`);
//! * when the caller needs a CRC-32 as well (zip records), a mapped range is read once in
//!   [`CRC_CHUNK`] pieces, each checksummed and then written while it is still in cache;
//! * bytes in memory are written as they are; zeros come from a static buffer;
//! * strided gathers arrive already cut into bounded chunks (see `transforms`), so no tensor is
//!   ever assembled whole on the way to disk.
//!
//! Where `copy_file_range` is unavailable (another filesystem on an old kernel, a sandbox), the
//! range is written from the mapping instead, and later ranges skip the attempt.

use crate::checkpoint::{Segment, TensorEntry};
use crate::error::{Error, IoContext, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes checksummed and written per step when a CRC is wanted: the piece is still in cache when
/// the write copies it.
pub const CRC_CHUNK: usize = 1 << 20;

/// Tensors smaller than this are left to the kernel's own writeback.
const WRITEBACK_MIN: u64 = 1 << 20;

/// Cleared after the first `copy_file_range` that the kernel or filesystem refuses.
static COPY_RANGE_WORKS: AtomicBool = AtomicBool::new(true);

/// Streams segments into `file` from byte `pos` on.
pub struct PositionalSink<'a> {
    file: &'a File,
    dest: &'a Path,
    start: u64,
    pos: u64,
    crc: Option<flate2::Crc>,
}

impl<'a> PositionalSink<'a> {
    /// A sink writing `file` (named `dest` in errors) from `pos`, computing a CRC-32 when asked.
    pub fn new(file: &'a File, dest: &'a Path, pos: u64, with_crc: bool) -> Self {
        PositionalSink { file, dest, start: pos, pos, crc: with_crc.then(flate2::Crc::new) }
    }

    /// The CRC-32 of everything written so far (when asked for at creation).
    pub fn crc(&self) -> Option<u32> {
        self.crc.as_ref().map(flate2::Crc::sum)
    }

    /// Where the next byte goes.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Ask the kernel to start writing what this sink wrote to disk now, without waiting. The
    /// output's final fsync (see [`crate::atomic`]) then finds most pages clean, so the disk works
    /// while we produce the next tensors instead of all at the end. Advisory: errors are ignored
    /// (the fsync reports real ones).
    pub fn start_writeback(&self) {
        let len = self.pos - self.start;
        if len < WRITEBACK_MIN {
            return;
        }
        // SAFETY: a plain syscall on an open descriptor; no memory is passed.
        let _ = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.start as i64,
                len as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }

    /// Write one segment.
    pub fn put(&mut self, seg: Segment<'_>) -> Result<()> {
        match seg {
            Segment::Bytes(b) => self.bytes(b),
            Segment::Zeros(mut n) => {
                static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
                while n > 0 {
                    let k = n.min(ZEROS.len());
                    self.bytes(&ZEROS[..k])?;
                    n -= k;
                }
                Ok(())
            }
            Segment::Mapped { map, offset, len } => {
                let bytes = seg.as_slice().ok_or_else(|| {
                    Error::invalid(self.dest, "a mapped tensor range lies outside its file")
                })?;
                if self.crc.is_some() {
                    for piece in bytes.chunks(CRC_CHUNK) {
                        self.bytes(piece)?;
                    }
                    return Ok(());
                }
                match crate::progress::file_of(map) {
                    Some(src) if self.copy_range(&src, offset as u64, len)? => Ok(()),
                    _ => self.bytes(bytes),
                }
            }
        }
    }

    fn bytes(&mut self, b: &[u8]) -> Result<()> {
        if let Some(crc) = &mut self.crc {
            crc.update(b);
        }
        self.file.write_all_at(b, self.pos).at(self.dest)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Copy `len` bytes of `src` at `offset` to the sink in the kernel. `Ok(false)` (nothing
    /// written) when the kernel or filesystem cannot; the caller writes the bytes itself then.
    fn copy_range(&mut self, src: &File, offset: u64, len: usize) -> Result<bool> {
        if !COPY_RANGE_WORKS.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mut off_in = i64::try_from(offset).map_err(|_| Error::invalid(self.dest, "offset past 2^63"))?;
        let mut off_out =
            i64::try_from(self.pos).map_err(|_| Error::invalid(self.dest, "offset past 2^63"))?;
        let mut left = len;
        while left > 0 {
            // SAFETY: both descriptors are open files owned by `src` and `self.file`, and the
            // offsets are passed by pointer to locals, as copy_file_range(2) requires.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    self.file.as_raw_fd(),
                    &mut off_out,
                    left,
                    0,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                let unsupported = matches!(
                    err.raw_os_error(),
                    Some(libc::ENOSYS | libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL | libc::EPERM)
                );
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if unsupported && left == len {
                    COPY_RANGE_WORKS.store(false, Ordering::Relaxed);
                    return Ok(false);
                }
                return Err(err).at(self.dest);
            }
            if n == 0 {
                return Err(Error::invalid(
                    self.dest,
                    format!("input file ended {left} bytes before a mapped tensor range did"),
                ));
            }
            left -= n as usize;
        }
        self.pos += len as u64;
        Ok(true)
    }
}

/// Write tensor `name` at byte `offset` of `file` (named `dest` in errors), streamed; returns the
/// CRC-32 of its bytes when `with_crc`. The length is checked against dtype × shape.
pub fn write_tensor_at(
    file: &File,
    dest: &Path,
    offset: u64,
    name: &str,
    entry: &TensorEntry,
    with_crc: bool,
) -> Result<Option<u32>> {
    let mut sink = PositionalSink::new(file, dest, offset, with_crc);
    entry.stream(name, &mut |seg| sink.put(seg))?;
    sink.start_writeback();
    Ok(sink.crc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::ByteSource;
    use crate::DType;
    use std::io::Write;
    use std::sync::Arc;

    fn mapped_file(bytes: &[u8]) -> (tempfile::NamedTempFile, Arc<memmap2::Mmap>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        let map = crate::formats::map_file(f.path()).unwrap();
        (f, map)
    }

    #[test]
    fn every_segment_kind_lands_at_its_offset_with_its_crc() {
        let data: Vec<u8> = (0..=255u8).cycle().take(3 * CRC_CHUNK + 17).collect();
        let (_keep, map) = mapped_file(&data);
        let out = tempfile::tempfile().unwrap();
        for with_crc in [false, true] {
            let mut sink = PositionalSink::new(&out, Path::new("out"), 5, with_crc);
            sink.put(Segment::Bytes(b"head")).unwrap();
            sink.put(Segment::Zeros(70_000)).unwrap();
            sink.put(Segment::Mapped { map: &map, offset: 3, len: data.len() - 3 }).unwrap();
            let mut want = vec![0u8; 5];
            want.extend_from_slice(b"head");
            want.extend(std::iter::repeat_n(0u8, 70_000));
            want.extend_from_slice(&data[3..]);
            assert_eq!(sink.pos(), want.len() as u64);
            let mut got = vec![0u8; want.len()];
            out.read_exact_at(&mut got, 0).unwrap();
            assert_eq!(got[5..], want[5..]);
            let mut crc = flate2::Crc::new();
            crc.update(&want[5..]);
            assert_eq!(sink.crc(), with_crc.then(|| crc.sum()));
        }
    }

    #[test]
    fn a_range_outside_the_map_or_a_short_tensor_is_an_error() {
        let (_keep, map) = mapped_file(&[1, 2, 3, 4]);
        let out = tempfile::tempfile().unwrap();
        let mut sink = PositionalSink::new(&out, Path::new("out"), 0, false);
        assert!(sink.put(Segment::Mapped { map: &map, offset: 2, len: 3 }).is_err());
        let short =
            TensorEntry::new(DType::F32, vec![2], ByteSource::owned(vec![0u8; 4]), Arc::from(Path::new("x")));
        let err = write_tensor_at(&out, Path::new("out"), 0, "w", &short, false).unwrap_err();
        assert!(err.to_string().contains('w'), "{err}");
    }
}
