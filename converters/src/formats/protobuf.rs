//! The protobuf wire format, read field by field: all that the SentencePiece `ModelProto`
//! readers need (the converters' splice editor in `convert::sentencepiece` and the core's
//! tokenizer builder). Hand-written rather than a protobuf crate because both read a dozen
//! fields of three messages and the editor needs each record's byte span, which generated code
//! does not give; the core depends on this crate, so the one reader serves both.
//!
//! No groups (wire types 3 and 4): proto2 groups do not occur in these messages, and a reader
//! that skipped them wrongly would misparse, so they are refused.

use std::ops::Range;

/// One field's value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Wire<'a> {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 1 (little-endian).
    Fixed64(u64),
    /// Wire type 2: a string, bytes or an embedded message.
    Bytes(&'a [u8]),
    /// Wire type 5 (little-endian).
    Fixed32(u32),
}

/// One field of a message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Field<'a> {
    /// The field number.
    pub number: u64,
    /// Its value.
    pub value: Wire<'a>,
    /// The whole record (key, length and payload) within the message.
    pub span: (usize, usize),
}

impl Field<'_> {
    /// The record's byte range within the message.
    pub fn range(&self) -> Range<usize> {
        self.span.0..self.span.1
    }
}

/// A reader over the fields of one message. Errors say what is wrong and at which byte.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Read the message `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// The next field, `None` at the end of the message.
    pub fn next_field(&mut self) -> Result<Option<Field<'a>>, String> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let start = self.pos;
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"))),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "protobuf length overflows")?;
                Wire::Bytes(self.take(len)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"))),
            other => return Err(format!("unsupported protobuf wire type {other} at byte {start}")),
        };
        Ok(Some(Field { number: key >> 3, value, span: (start, self.pos) }))
    }

    /// Every remaining field.
    pub fn fields(mut self) -> Result<Vec<Field<'a>>, String> {
        let mut out = Vec::new();
        while let Some(f) = self.next_field()? {
            out.push(f);
        }
        Ok(out)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| format!("truncated protobuf varint at byte {}", self.pos))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("protobuf varint longer than 10 bytes at byte {}", self.pos))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(len).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!("truncated protobuf: {len} bytes wanted at byte {} of {}", self.pos, self.buf.len())
        })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
}

/// Append `v` as a varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// `put_varint` and the reader are inverse for every u64, and a varint field's span is
        /// its key plus its value.
        #[test]
        fn varints_round_trip(v in any::<u64>(), number in 1u64..1 << 20) {
            let mut msg = Vec::new();
            put_varint(&mut msg, number << 3);
            put_varint(&mut msg, v);
            let fields = Reader::new(&msg).fields().unwrap();
            prop_assert_eq!(fields, vec![Field { number, value: Wire::Varint(v), span: (0, msg.len()) }]);
        }

        /// Arbitrary bytes give fields whose spans tile the message, or an error; never a panic.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(fields) = Reader::new(&bytes).fields() {
                let mut at = 0;
                for f in &fields {
                    prop_assert_eq!(f.span.0, at);
                    at = f.span.1;
                }
                prop_assert_eq!(at, bytes.len());
            }
        }
    }

    #[test]
    fn truncation_and_groups_are_named() {
        assert!(Reader::new(&[0x0a, 5, 1]).fields().unwrap_err().contains("truncated protobuf"));
        assert!(Reader::new(&[0x0b]).fields().unwrap_err().contains("wire type 3 at byte 0"));
        assert!(Reader::new(&[0x08, 0xff]).fields().unwrap_err().contains("truncated protobuf varint"));
    }
}
