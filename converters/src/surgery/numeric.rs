//! The few value-level helpers surgery needs: float tensors to and from `f32`, and a seeded,
//! platform-independent random source.
//!
//! Arithmetic is f32 (as the operations promise), with every reduction in a fixed order, so a
//! result depends only on the inputs: running a surgery twice gives identical bytes. Casting back
//! rounds to nearest-even like `torch.Tensor.to` ([`crate::dtype::cast_bytes`]).

use crate::checkpoint::{ByteSource, TensorEntry};
use crate::dtype::cast_bytes;
use crate::error::{Error, Result};
use crate::DType;
use std::path::Path;
use std::sync::Arc;

/// A float tensor's values as f32 (exact for f16, bf16 and f32; f64 rounds once).
pub fn to_f32(name: &str, t: &TensorEntry) -> Result<Vec<f32>> {
    if !t.dtype.is_float() {
        return Err(Error::InvalidCast { tensor: name.to_string(), from: t.dtype, to: DType::F32 });
    }
    let bytes = t.bytes(name)?;
    let f32s;
    let raw: &[u8] = if t.dtype == DType::F32 {
        &bytes
    } else {
        f32s = cast_bytes(&bytes, t.dtype, DType::F32).expect("float dtypes checked above");
        &f32s
    };
    Ok(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// f32 values as little-endian bytes of `dtype` (a float type), rounding to nearest-even.
pub fn from_f32(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    if dtype == DType::F32 {
        bytes
    } else {
        cast_bytes(&bytes, DType::F32, dtype).expect("callers pass float dtypes")
    }
}

/// A tensor of `dtype` and `shape` whose f32 values `f` computes when a writer asks for them.
pub fn derived_f32(
    dtype: DType,
    shape: Vec<usize>,
    origin: Arc<Path>,
    f: impl Fn() -> Result<Vec<f32>> + Send + Sync + 'static,
) -> TensorEntry {
    let n: usize = shape.iter().product();
    let name = origin.display().to_string();
    let source = ByteSource::derived(move || {
        let v = f()?;
        if v.len() != n {
            return Err(Error::invalid(
                &name,
                format!("internal: computed {} values, expected {n}", v.len()),
            ));
        }
        Ok(from_f32(&v, dtype))
    });
    TensorEntry::new(dtype, shape, source, origin)
}

pub use crate::convert::init::SplitMix64;

/// Per-column mean and standard deviation of the first `rows` rows of a `[R, C]` matrix, summed
/// in f64 in row order.
pub fn column_stats(values: &[f32], cols: usize, rows: usize) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0f64; cols];
    for row in values.chunks_exact(cols).take(rows) {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += f64::from(*x);
        }
    }
    let n = rows.max(1) as f64;
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0f64; cols];
    for row in values.chunks_exact(cols).take(rows) {
        for ((v, m), x) in var.iter_mut().zip(&mean).zip(row) {
            let d = f64::from(*x) - m;
            *v += d * d;
        }
    }
    let std = var.into_iter().map(|v| (v / n).sqrt()).collect();
    (mean, std)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_and_bf16_rounding() {
        let t = TensorEntry::new(
            DType::F32,
            vec![3],
            ByteSource::owned(from_f32(&[1.0, -2.5, 1.0 + 2f32.powi(-8)], DType::F32)),
            Arc::from(Path::new("t")),
        );
        assert_eq!(to_f32("t", &t).unwrap(), [1.0, -2.5, 1.0 + 2f32.powi(-8)]);
        let bf = from_f32(&[1.0 + 2f32.powi(-8)], DType::BF16);
        assert_eq!(bf, half::bf16::from_f32(1.0).to_le_bytes(), "ties to even");
    }

    #[test]
    fn rng_is_fixed_and_normalish() {
        let mut r = SplitMix64::new(7);
        let first = r.next_u64();
        assert_eq!(first, SplitMix64::new(7).next_u64());
        let xs: Vec<f64> = (0..20000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.05, "{mean} {var}");
    }

    #[test]
    fn column_stats_of_small_matrix() {
        let (m, s) = column_stats(&[1.0, 2.0, 3.0, 6.0, 100.0, 100.0], 2, 2);
        assert_eq!(m, [2.0, 4.0]);
        assert_eq!(s, [1.0, 2.0]);
    }
}
