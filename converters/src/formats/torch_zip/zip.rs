//! The zip container: records of an existing archive located through the `zip` crate, and the
//! hand-written layout of the stored zip the writer produces (see the module docs of
//! [`super`] for why the writer is not the `zip` crate's).

use super::malformed;
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

/// One stored record: its name relative to the archive prefix and its bytes in the mapping.
pub(super) struct Record {
    /// The full name, as stored.
    pub(super) name: String,
    /// Where its data starts in the mapping.
    pub(super) start: usize,
    /// Data length in bytes.
    pub(super) len: usize,
    crc: u32,
}

/// The records of one torch zip image.
pub(super) struct Archive {
    /// The top-level directory every record sits in (torch names it after the file stem).
    pub(super) prefix: String,
    records: HashMap<String, Record>,
}

impl Archive {
    /// Index the stored zip `image`, which starts at offset `base` of its mapping.
    pub(super) fn open(image: &[u8], base: usize, origin: &Path) -> Result<Archive> {
        let zip_err = |e: zip::result::ZipError| Error::malformed(origin, "zip", e.to_string());
        let mut zip = zip::ZipArchive::new(Cursor::new(image)).map_err(zip_err)?;
        // Local headers must agree with the central directory and entries must not overlap: the
        // data offsets we map come from the local headers.
        zip.validate_header_consistency().map_err(zip_err)?;
        let mut prefix: Option<String> = None;
        let mut records = HashMap::new();
        for i in 0..zip.len() {
            let f = zip.by_index_raw(i).map_err(zip_err)?;
            let name = f.name().map_err(zip_err)?.into_owned();
            // torch takes the archive's directory from the first central-directory entry.
            let pre: &str = match &prefix {
                Some(p) => p,
                None => {
                    let Some((dir, _)) = name.split_once('/') else {
                        return Err(malformed(
                            origin,
                            format!("first entry '{name}' is not inside a top-level directory"),
                        ));
                    };
                    prefix.insert(dir.to_string())
                }
            };
            if f.is_dir() {
                continue;
            }
            let Some(rel) = name.strip_prefix(pre).and_then(|r| r.strip_prefix('/')) else {
                continue;
            };
            if f.compression() != zip::CompressionMethod::Stored {
                return Err(malformed(
                    origin,
                    format!(
                        "record '{name}' is compressed ({:?}); torch stores records uncompressed",
                        f.compression()
                    ),
                ));
            }
            if f.encrypted() {
                return Err(malformed(origin, format!("record '{name}' is encrypted")));
            }
            let start = f.data_start().ok_or_else(|| {
                Error::malformed(origin, "zip", format!("no data offset for record '{name}'"))
            })?;
            let (size, stored) = (f.size(), f.compressed_size());
            let end = start
                .checked_add(size)
                .filter(|&e| e <= image.len() as u64 && stored == size)
                .ok_or_else(|| {
                    malformed(
                        origin,
                        format!(
                            "record '{name}' ({size} bytes at offset {start}) does not fit the {}-byte archive",
                            image.len()
                        ),
                    )
                })?;
            let (start, end) = (start as usize, end as usize);
            records.insert(
                rel.to_string(),
                Record { name: name.clone(), start: base + start, len: end - start, crc: f.crc32() },
            );
        }
        let prefix = prefix.ok_or_else(|| malformed(origin, "archive has no entries"))?;
        Ok(Archive { prefix, records })
    }

    /// The record at `rel` under the prefix.
    pub(super) fn get(&self, rel: &str) -> Option<&Record> {
        self.records.get(rel)
    }

    /// A small record's bytes, CRC-checked (tensor records are not read here, so not checked).
    pub(super) fn small<'m>(&self, map: &'m Mmap, rec: &Record, origin: &Path) -> Result<&'m [u8]> {
        let bytes = &map[rec.start..rec.start + rec.len];
        let crc = crc32(bytes);
        if crc != rec.crc {
            return Err(malformed(
                origin,
                format!("record '{}': CRC-32 {crc:08x} does not match the stored {:08x}", rec.name, rec.crc),
            ));
        }
        Ok(bytes)
    }
}

/// The CRC-32 zip stores for `bytes`.
pub(super) fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

/// Byte layout of the zip: computed once from record names and sizes, shared by
/// [`super::encoded_len`] and the writer so the two cannot disagree.
pub(super) struct ZipLayout {
    /// One per record, in archive order.
    pub(super) entries: Vec<EntryLayout>,
    central_offset: u64,
    central_size: u64,
    /// Length of the whole archive.
    pub(super) total: u64,
}

/// Where one record goes and which ZIP64 fields it needs.
pub(super) struct EntryLayout {
    name: String,
    size: u64,
    offset: u64,
    zip64_size: bool,
    zip64_offset: bool,
    pad: usize,
}

const U32_LIMIT: u64 = 0xFFFF_FFFF;
const LOCAL_HEADER: u64 = 30;
const CENTRAL_HEADER: u64 = 46;
const EOCD: u64 = 22;
const ZIP64_EOCD: u64 = 56;
const ZIP64_LOCATOR: u64 = 20;
/// torch aligns record data to this many bytes (`kFieldAlignment`).
const ALIGN: u64 = 64;
/// DOS date 1980-01-01 (time 00:00): fixed so output is byte-for-byte reproducible.
const DOS_DATE: u16 = (1 << 5) | 1;

impl ZipLayout {
    /// Lay out records given as (name, size), in order; `force_zip64` puts ZIP64 fields on every
    /// entry (so tests cover that path without writing 4 GiB).
    pub(super) fn new<'n>(records: impl IntoIterator<Item = (&'n str, u64)>, force_zip64: bool) -> ZipLayout {
        let mut entries = Vec::new();
        let mut at = 0u64;
        for (name, size) in records {
            let zip64_size = force_zip64 || size >= U32_LIMIT;
            let zip64_offset = force_zip64 || at >= U32_LIMIT;
            let fixed = LOCAL_HEADER + name.len() as u64 + if zip64_size { 20 } else { 0 } + 4;
            let pad = ((ALIGN - (at + fixed) % ALIGN) % ALIGN) as usize;
            entries.push(EntryLayout {
                name: name.to_string(),
                size,
                offset: at,
                zip64_size,
                zip64_offset,
                pad,
            });
            at += fixed + pad as u64 + size;
        }
        let central_offset = at;
        let central_size: u64 =
            entries.iter().map(|e| CENTRAL_HEADER + e.name.len() as u64 + e.central_extra_len()).sum();
        let mut layout = ZipLayout { entries, central_offset, central_size, total: 0 };
        layout.total = central_offset + central_size + layout.end_len();
        layout
    }

    fn needs_zip64_end(&self) -> bool {
        self.entries.len() >= 0xFFFF
            || self.central_offset >= U32_LIMIT
            || self.central_size >= U32_LIMIT
            || self.entries.iter().any(|e| e.zip64_size || e.zip64_offset)
    }

    fn end_len(&self) -> u64 {
        EOCD + if self.needs_zip64_end() { ZIP64_EOCD + ZIP64_LOCATOR } else { 0 }
    }

    /// The ZIP64 end records (when needed) and the end of central directory record.
    pub(super) fn end_records(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.end_len() as usize);
        let n = self.entries.len() as u64;
        if self.needs_zip64_end() {
            let zip64_eocd_offset = self.central_offset + self.central_size;
            b.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
            b.extend_from_slice(&(ZIP64_EOCD - 12).to_le_bytes());
            b.extend_from_slice(&45u16.to_le_bytes()); // version made by
            b.extend_from_slice(&45u16.to_le_bytes()); // version needed
            b.extend_from_slice(&0u32.to_le_bytes()); // this disk
            b.extend_from_slice(&0u32.to_le_bytes()); // disk with the central directory
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&self.central_size.to_le_bytes());
            b.extend_from_slice(&self.central_offset.to_le_bytes());
            b.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&zip64_eocd_offset.to_le_bytes());
            b.extend_from_slice(&1u32.to_le_bytes());
        }
        let n16 = u16::try_from(n).ok().filter(|&v| v < 0xFFFF).unwrap_or(0xFFFF);
        b.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&n16.to_le_bytes());
        b.extend_from_slice(&n16.to_le_bytes());
        b.extend_from_slice(&clamp32(self.central_size).to_le_bytes());
        b.extend_from_slice(&clamp32(self.central_offset).to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes()); // comment length
        b
    }
}

fn clamp32(v: u64) -> u32 {
    u32::try_from(v).ok().filter(|&v| u64::from(v) < U32_LIMIT).unwrap_or(u32::MAX)
}

impl EntryLayout {
    fn version_needed(&self) -> u16 {
        if self.zip64_size || self.zip64_offset {
            45
        } else {
            20
        }
    }

    fn flags(&self) -> u16 {
        // Bit 11: the name is UTF-8.
        if self.name.is_ascii() {
            0
        } else {
            1 << 11
        }
    }

    fn central_extra_len(&self) -> u64 {
        let fields = if self.zip64_size { 16 } else { 0 } + if self.zip64_offset { 8 } else { 0 };
        if fields == 0 {
            0
        } else {
            4 + fields
        }
    }

    /// The fields local and central headers share, from "version needed" to "extra field
    /// length".
    fn shared_fields(&self, b: &mut Vec<u8>, crc: u32, extra_len: usize) {
        let size32 = if self.zip64_size { u32::MAX } else { clamp32(self.size) };
        b.extend_from_slice(&self.version_needed().to_le_bytes());
        b.extend_from_slice(&self.flags().to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes()); // method: stored
        b.extend_from_slice(&0u16.to_le_bytes()); // time
        b.extend_from_slice(&DOS_DATE.to_le_bytes());
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(&size32.to_le_bytes()); // compressed size
        b.extend_from_slice(&size32.to_le_bytes()); // uncompressed size
        b.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        b.extend_from_slice(&(extra_len as u16).to_le_bytes());
    }

    /// The local file header, with torch's `FB` alignment padding, that precedes the data.
    /// Where the entry's local header starts, relative to the archive start.
    pub(super) fn offset(&self) -> u64 {
        self.offset
    }

    /// Where the whole central directory starts, relative to the archive start.
    pub(super) fn central_offset(layout: &ZipLayout) -> u64 {
        layout.central_offset
    }

    pub(super) fn local_header(&self, crc: u32) -> Vec<u8> {
        let extra_len = if self.zip64_size { 20 } else { 0 } + 4 + self.pad;
        let mut b = Vec::with_capacity(LOCAL_HEADER as usize + self.name.len() + extra_len);
        b.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        self.shared_fields(&mut b, crc, extra_len);
        b.extend_from_slice(self.name.as_bytes());
        if self.zip64_size {
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&16u16.to_le_bytes());
            b.extend_from_slice(&self.size.to_le_bytes());
            b.extend_from_slice(&self.size.to_le_bytes());
        }
        b.extend_from_slice(b"FB");
        b.extend_from_slice(&(self.pad as u16).to_le_bytes());
        b.resize(b.len() + self.pad, b'Z');
        b
    }

    /// The central-directory header of this entry.
    pub(super) fn central_header(&self, crc: u32) -> Vec<u8> {
        let offset32 = if self.zip64_offset { u32::MAX } else { clamp32(self.offset) };
        let extra_len = self.central_extra_len();
        let mut b = Vec::with_capacity(CENTRAL_HEADER as usize + self.name.len() + extra_len as usize);
        b.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        b.extend_from_slice(&45u16.to_le_bytes()); // version made by
        self.shared_fields(&mut b, crc, extra_len as usize);
        b.extend_from_slice(&0u16.to_le_bytes()); // comment length
        b.extend_from_slice(&0u16.to_le_bytes()); // disk number
        b.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        b.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        b.extend_from_slice(&offset32.to_le_bytes());
        b.extend_from_slice(self.name.as_bytes());
        if extra_len > 0 {
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&((extra_len - 4) as u16).to_le_bytes());
            if self.zip64_size {
                b.extend_from_slice(&self.size.to_le_bytes());
                b.extend_from_slice(&self.size.to_le_bytes());
            }
            if self.zip64_offset {
                b.extend_from_slice(&self.offset.to_le_bytes());
            }
        }
        b
    }
}
