//! Element types and the float casts between them.
//!
//! Casts round to nearest, ties to even, exactly like `torch.Tensor.to` (the `half` crate
//! implements IEEE rounding for f16 and bf16, including NaN and infinity handling). Converting
//! f64 straight to f16/bf16 rounds once, never through f32, so no double rounding.

use half::{bf16, f16};
use std::fmt;

/// The element types a checkpoint tensor may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE binary64.
    F64,
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the top half of an f32).
    BF16,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// One byte per element, 0 or 1.
    Bool,
}

impl DType {
    /// Every dtype, for tests and listings.
    pub const ALL: [DType; 10] = [
        DType::F64,
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::Bool,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Whether this is one of the floating-point types that [`cast_bytes`] converts between.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }

    /// The safetensors header spelling (`F32`, `BF16`, `BOOL`, ...).
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// The PyTorch storage class that holds this dtype (`torch.FloatStorage`, ...).
    pub const fn torch_storage(self) -> &'static str {
        match self {
            DType::F64 => "DoubleStorage",
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::I64 => "LongStorage",
            DType::I32 => "IntStorage",
            DType::I16 => "ShortStorage",
            DType::I8 => "CharStorage",
            DType::U8 => "ByteStorage",
            DType::Bool => "BoolStorage",
        }
    }

    /// The inverse of [`DType::torch_storage`].
    pub fn from_torch_storage(class: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.torch_storage() == class)
    }

    /// The `torch.<name>` dtype attribute (`float32`, `bfloat16`, ...).
    pub const fn torch_name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// Parse a `torch.<name>` dtype attribute, including the aliases torch accepts.
    pub fn from_torch_name(name: &str) -> Option<Self> {
        Some(match name {
            "float64" | "double" => DType::F64,
            "float32" | "float" => DType::F32,
            "float16" | "half" => DType::F16,
            "bfloat16" => DType::BF16,
            "int64" | "long" => DType::I64,
            "int32" | "int" => DType::I32,
            "int16" | "short" => DType::I16,
            "int8" => DType::I8,
            "uint8" => DType::U8,
            "bool" => DType::Bool,
            _ => return None,
        })
    }

    /// Parse a user-facing name: `f32`, `fp16`, `bf16`, `float32`, `F32`, ...
    pub fn parse(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        Some(match lower.as_str() {
            "f64" | "fp64" => DType::F64,
            "f32" | "fp32" => DType::F32,
            "f16" | "fp16" => DType::F16,
            "bf16" => DType::BF16,
            "i64" => DType::I64,
            "i32" => DType::I32,
            "i16" => DType::I16,
            "i8" => DType::I8,
            "u8" => DType::U8,
            other => return Self::from_torch_name(other),
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
        })
    }
}

impl serde::Serialize for DType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Convert little-endian float bytes of dtype `from` to little-endian bytes of dtype `to`.
///
/// Returns `None` when either side is not a float type. `src.len()` must be a multiple of
/// `from.size()`; trailing bytes are ignored (callers check sizes before casting).
pub fn cast_bytes(src: &[u8], from: DType, to: DType) -> Option<Vec<u8>> {
    if !from.is_float() || !to.is_float() {
        return None;
    }
    if from == to {
        return Some(src.to_vec());
    }
    let n = src.len() / from.size();
    let mut out = Vec::with_capacity(n * to.size());
    // f64 is decoded as f64 so f64 → f16/bf16 rounds once; everything else goes through f32,
    // which represents f16 and bf16 exactly.
    if from == DType::F64 {
        for c in src.chunks_exact(8) {
            let x = f64::from_le_bytes(c.try_into().expect("chunk of 8"));
            match to {
                DType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
                DType::F16 => out.extend_from_slice(&f16::from_f64(x).to_le_bytes()),
                DType::BF16 => out.extend_from_slice(&bf16::from_f64(x).to_le_bytes()),
                _ => unreachable!("float targets only"),
            }
        }
        return Some(out);
    }
    let decode = |c: &[u8]| -> f32 {
        match from {
            DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            DType::F16 => f16::from_le_bytes([c[0], c[1]]).to_f32(),
            DType::BF16 => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            _ => unreachable!("float sources only"),
        }
    };
    for c in src.chunks_exact(from.size()) {
        let x = decode(c);
        match to {
            DType::F64 => out.extend_from_slice(&(x as f64).to_le_bytes()),
            DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
            _ => unreachable!("float targets only"),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even mantissa (1.0).
        let halfway = 1.0f32 + 2f32.powi(-8);
        let out = cast_bytes(&halfway.to_le_bytes(), DType::F32, DType::BF16).unwrap();
        assert_eq!(bf16::from_le_bytes([out[0], out[1]]).to_f32(), 1.0);
        // Slightly above halfway rounds up.
        let above = f32::from_bits(halfway.to_bits() + 1);
        let out = cast_bytes(&above.to_le_bytes(), DType::F32, DType::BF16).unwrap();
        assert_eq!(bf16::from_le_bytes([out[0], out[1]]).to_f32(), 1.0 + 2f32.powi(-7));
    }

    #[test]
    fn integer_casts_are_refused() {
        assert!(cast_bytes(&[0; 8], DType::I64, DType::F32).is_none());
        assert!(cast_bytes(&[0; 4], DType::F32, DType::I32).is_none());
    }

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_torch_storage(d.torch_storage()), Some(d));
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(d));
            assert_eq!(DType::parse(&d.to_string()), Some(d));
        }
    }

    proptest! {
        // Widening then narrowing is the identity for every representable value.
        #[test]
        fn widen_then_narrow_is_identity(bits in any::<u16>(), wide in prop_oneof![Just(DType::F32), Just(DType::F64)]) {
            for narrow in [DType::F16, DType::BF16] {
                let src = bits.to_le_bytes();
                let w = cast_bytes(&src, narrow, wide).unwrap();
                let back = cast_bytes(&w, wide, narrow).unwrap();
                let is_nan = match narrow {
                    DType::F16 => f16::from_bits(bits).is_nan(),
                    _ => bf16::from_bits(bits).is_nan(),
                };
                if !is_nan { prop_assert_eq!(back, src.to_vec()); }
            }
        }
    }
}
