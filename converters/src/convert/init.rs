//! Seeded initialisation of a fresh NeVA projector (`shardsmith assemble --init-seed N`).
//!
//! Distribution: PyTorch's `nn.Linear` default, which is what LLaVA and NeMo start the projector
//! from: `kaiming_uniform_(a=√5)` for the weight, whose bound works out to `1/√fan_in`, and
//! `U(−1/√fan_in, 1/√fan_in)` for the bias. So every weight and bias of a linear with `fan_in`
//! inputs is drawn from `U(−1/√fan_in, 1/√fan_in)`.
//!
//! Generator: SplitMix64 (Steele, Lea & Flood, 2014), chosen because it is a dozen lines with no
//! platform- or library-dependent behaviour, so a seed means the same bytes everywhere (PyTorch's
//! generator would tie the values to one library's Mersenne Twister and its float conversions).
//! Tensor `k` of the projector (in [`ProjectorType::shapes`] order: weight, bias, per linear) is
//! filled by its own SplitMix64 seeded with the `k`-th output of `SplitMix64(seed)`, in row-major
//! order; each draw `x` becomes `u = (x >> 11) · 2⁻⁵³ ∈ [0, 1)` and the value
//! `bound · (2u − 1)`, computed in f64 and rounded once to the target dtype.

use crate::checkpoint::{ByteSource, TensorEntry, TensorMap};
use crate::dtype::cast_bytes;
use crate::names::neva::ProjectorType;
use crate::DType;
use std::path::Path;
use std::sync::Arc;

/// SplitMix64: a 64-bit state advanced by the golden-ratio increment and finalised by two
/// xor-shift-multiply rounds.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose first state is `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform double in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform double in `(0, 1)`, never 0 (53 random bits, centred in their bucket), for
    /// logarithms.
    pub fn uniform_open(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// A standard normal sample (Box–Muller, one of the pair).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform_open(), self.uniform_open());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// A freshly initialised projector mapping vision width `c` to LLM width `h` (see the module
/// comment for the distribution and the generator), canonical names, lazily generated.
pub fn init_projector(kind: ProjectorType, c: usize, h: usize, seed: u64, dtype: DType) -> TensorMap {
    let origin: Arc<Path> = Arc::from(Path::new("<initialised projector>"));
    let mut seeds = SplitMix64::new(seed);
    let mut out = TensorMap::new();
    // A bias follows its weight, whose second dimension is the linear's fan_in.
    let mut fan_in = 1;
    for (name, shape) in kind.shapes(c, h) {
        if let [_, cols] = shape[..] {
            fan_in = cols;
        }
        let tensor_seed = seeds.next_u64();
        let n: usize = shape.iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt();
        let source = ByteSource::derived(move || {
            let mut rng = SplitMix64::new(tensor_seed);
            let wide: Vec<u8> =
                (0..n).flat_map(|_| (bound * (2.0 * rng.uniform() - 1.0)).to_le_bytes()).collect();
            Ok(cast_bytes(&wide, DType::F64, dtype).expect("float dtype"))
        });
        out.insert(name, TensorEntry::new(dtype, shape, source, origin.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // First outputs of the reference C implementation for seed 1234567.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    #[test]
    fn projector_init_is_seeded_bounded_and_shaped() {
        let kind = ProjectorType::MlpGelu { depth: 2 };
        let a = init_projector(kind, 48, 64, 7, DType::F32);
        let b = init_projector(kind, 48, 64, 7, DType::F32);
        let c = init_projector(kind, 48, 64, 8, DType::F32);
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            kind.shapes(48, 64).iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
        for (name, t) in &a {
            let bytes = t.bytes(name).unwrap();
            assert!(bytes == b[name.as_str()].bytes(name).unwrap(), "same seed, same bytes");
            assert!(bytes != c[name.as_str()].bytes(name).unwrap(), "another seed, other bytes");
            let fan_in = if name.starts_with("mm_projector.0.") { 48.0f32 } else { 64.0 };
            let bound = 1.0 / fan_in.sqrt();
            let values: Vec<f32> =
                bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            assert!(values.iter().all(|v| v.abs() <= bound), "{name} within ±{bound}");
            let mean = values.iter().sum::<f32>() / values.len() as f32;
            assert!(mean.abs() < bound / 4.0, "{name}: mean {mean}");
        }
    }
}
