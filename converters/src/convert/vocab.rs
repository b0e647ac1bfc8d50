//! Growing an embedding or output matrix when the tokenizer grows (NeVA's `<extra_id_0..7>`,
//! llava-hf's `<image>` / `<pad>` and its padding to a multiple of 64).
//!
//! The rule, chosen to be bit-for-bit reproducible on any machine: **every new row is the mean of
//! all existing rows**, accumulated column by column in f64 in row order (no parallel reduction,
//! no fused multiply-add), divided by the row count in f64, and rounded once to the tensor's
//! dtype (round to nearest, ties to even). The same input therefore gives the same bytes, and
//! converting twice gives identical files. NeMo leaves such rows at their random initialisation
//! and transformers samples them from a Gaussian fitted to the embeddings (formats.md §4.2,
//! §6.3): both are unreproducible, and the mean is the centre of that Gaussian. New tokens start
//! as the "average token", which keeps the logits of existing tokens unchanged in expectation.

use crate::checkpoint::{ByteSource, TensorEntry};
use crate::dtype::cast_bytes;
use crate::error::{Error, Result};
use crate::transforms;
use crate::DType;

/// `t` `[R, C]` followed by `rows − R` rows, each the mean of `t`'s rows (see the module
/// comment): `[rows, C]`, lazy (the mean is computed when the new rows are read).
pub fn extend_rows_with_mean(name: &str, t: &TensorEntry, rows: usize) -> Result<TensorEntry> {
    let bad = |detail: String| Error::invalid(t.origin.to_path_buf(), format!("tensor '{name}': {detail}"));
    let [have, cols] = t.shape[..] else {
        return Err(bad(format!("expected a 2-D [rows, hidden] matrix to extend, got shape {:?}", t.shape)));
    };
    if rows < have {
        return Err(bad(format!("cannot extend {have} rows to {rows}")));
    }
    if rows == have {
        return Ok(t.clone());
    }
    if have == 0 || !t.dtype.is_float() {
        return Err(bad(format!("cannot average the rows of a {} {:?} tensor", t.dtype, t.shape)));
    }
    let extra = rows - have;
    let (src, label, dtype) = (t.clone(), name.to_string(), t.dtype);
    let mean_rows = ByteSource::derived(move || {
        let bytes = src.bytes(&label)?;
        let row_bytes = cols * dtype.size();
        let mut sums = vec![0f64; cols];
        for row in bytes.chunks_exact(row_bytes) {
            let wide = cast_bytes(row, dtype, DType::F64).expect("float dtype checked above");
            for (s, c) in sums.iter_mut().zip(wide.chunks_exact(8)) {
                *s += f64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
        }
        let mean: Vec<u8> = sums.iter().flat_map(|s| (s / have as f64).to_le_bytes()).collect();
        let one = cast_bytes(&mean, DType::F64, dtype).expect("float dtype checked above");
        Ok(one.repeat(extra))
    });
    let tail = TensorEntry::new(dtype, vec![extra, cols], mean_rows, t.origin.clone());
    transforms::concat_rows(name, &[t.clone(), tail])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Arc;

    fn matrix(dtype: DType, values: &[f32], cols: usize) -> TensorEntry {
        let f32s: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = cast_bytes(&f32s, DType::F32, dtype).unwrap();
        TensorEntry::new(
            dtype,
            vec![values.len() / cols, cols],
            ByteSource::owned(bytes),
            Arc::from(Path::new("m")),
        )
    }

    #[test]
    fn new_rows_are_the_column_means_rounded_once() {
        let t = matrix(DType::F32, &[1.0, 2.0, 3.0, 4.0, 0.5, -1.0], 2);
        let grown = extend_rows_with_mean("e", &t, 5).unwrap();
        assert_eq!(grown.shape, [5, 2]);
        let out: Vec<f32> =
            grown.bytes("e").unwrap().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(out[..6], [1.0, 2.0, 3.0, 4.0, 0.5, -1.0]);
        let mean = [(1.0 + 3.0 + 0.5) / 3.0, (2.0 + 4.0 - 1.0) / 3.0];
        assert_eq!(out[6..], [mean[0] as f32, mean[1] as f32, mean[0] as f32, mean[1] as f32]);
        // bf16: one rounding from the f64 mean.
        let t = matrix(DType::BF16, &[1.0, 2.0, 3.0, 4.0, 0.5, -1.0], 2);
        let grown = extend_rows_with_mean("e", &t, 4).unwrap();
        let last = &grown.bytes("e").unwrap()[6 * 2..];
        assert_eq!(half::bf16::from_le_bytes([last[0], last[1]]), half::bf16::from_f64(mean[0]));
        assert!(extend_rows_with_mean("e", &t, 2).is_err());
    }
}
