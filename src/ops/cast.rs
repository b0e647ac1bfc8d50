//! f32 ⇄ bf16 casts that stay differentiable, run on the pool's threads and vectorise.
//!
//! Training casts every f32 master weight to bf16 once per step (the compute copy the GEMMs
//! read) and candle's CPU `to_dtype` does it element by element on one thread (`half`'s
//! branchy `from_f32`): 5 % of a 134M bf16 step. On CUDA kernels/src/cast.cu moves 8 elements a
//! thread with a thread per 8 (candle's cast launches a thread per element, most of its blocks
//! only starting to exit; a 7B layer's weights are 1.2 GB of cast traffic a step). Same rounding
//! (nearest even, NaN kept quiet), so the same bits.

use super::{contiguous, convert, cpu_gemm::to_bf16, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

struct Cast {
    to: DType,
}

impl CustomOp1 for Cast {
    fn name(&self) -> &'static str {
        "cast"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (s, self.to) {
            (CpuStorage::F32(v), DType::BF16) => {
                CpuStorage::BF16(convert(contiguous(v, l, "cast")?, to_bf16))
            }
            (CpuStorage::BF16(v), DType::F32) => {
                CpuStorage::F32(convert(contiguous(v, l, "cast")?, Float::widen))
            }
            _ => s.to_dtype(l, self.to)?,
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = match super::cuda::cast(s, l, self.to)? {
            Some(y) => y,
            None => s.to_dtype(l, self.to)?,
        };
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(cast(grad, arg.dtype())?))
    }
}

/// `t.to_dtype(dtype)`, differentiable like it; f32 → bf16 and bf16 → f32 on the CPU run as one
/// parallel vectorised pass (the module docs) and on CUDA as cast.cu (a thread per 8 elements),
/// everything else is candle's cast.
pub fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let fast = matches!((t.dtype(), dtype), (DType::F32, DType::BF16) | (DType::BF16, DType::F32));
    if t.dtype() == dtype
        || !fast
        || !(t.device().is_cpu() || (cfg!(feature = "cuda") && t.device().is_cuda()))
    {
        return t.to_dtype(dtype);
    }
    t.contiguous()?.apply_op1(Cast { to: dtype })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::randn;
    use candle_core::Var;

    /// The same bits as candle's casts both ways (specials included), and the same gradient.
    #[test]
    fn matches_candle_bits_and_gradient() {
        let specials = Tensor::new(
            &[f32::NAN, -f32::NAN, f32::INFINITY, -0.0, 1e-40, 3.4e38, 1.0039062],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let x = Tensor::cat(&[&(randn(&[50_000], 1) * 100.0).unwrap(), &specials], 0).unwrap();
        let bits = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        let ours = cast(&x, DType::BF16).unwrap();
        assert_eq!(ours.dtype(), DType::BF16);
        assert_eq!(bits(&ours), bits(&x.to_dtype(DType::BF16).unwrap()));
        let back = cast(&ours, DType::F32).unwrap();
        assert_eq!(bits(&back), bits(&ours.to_dtype(DType::F32).unwrap()));
        let v = Var::from_tensor(&randn(&[4, 7], 2)).unwrap();
        let probe = randn(&[4, 7], 3).to_dtype(DType::BF16).unwrap();
        let grad = |y: Tensor| {
            (y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
                .get(&v)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        assert_eq!(
            grad(cast(v.as_tensor(), DType::BF16).unwrap()),
            grad(v.as_tensor().to_dtype(DType::BF16).unwrap())
        );
    }
}
