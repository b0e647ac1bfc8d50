//! A linear layer's epilogue as one pass: y = act(x + b) (+ r), outside autograd.
//!
//! The CLIP vision tower (frozen in every training stage, so never differentiated) ran each
//! projection's bias as a broadcast add, quick GELU as three more element-wise ops and each
//! residual as another add: five passes over [B·577, 4096] after fc1 alone. Here each is one
//! pass — `kernels/src/bias_act.cu` on CUDA, the element-wise pool on the CPU — computed in f32
//! and rounded to the dtype once (the composed ops round after each step, so bf16 results differ
//! by rounding; f32 agrees to a few ulp).
//!
//! Shapes: x [.., C] (any leading dims), b `[C]`, r like x.

use super::{as_f32, elementwise, Operand};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// What follows the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Nothing: y = x + b.
    Identity,
    /// CLIP's quick GELU, v·σ(1.702·v) = v / (1 + e^(−1.702·v)).
    QuickGelu,
}

impl Act {
    /// The kernel's `act` code (bias_act.cu).
    #[cfg(feature = "cuda")]
    pub(super) fn code(self) -> i32 {
        match self {
            Act::Identity => 0,
            Act::QuickGelu => 1,
        }
    }

    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        match self {
            Act::Identity => v,
            Act::QuickGelu => v / (1.0 + (-1.702 * v).exp()),
        }
    }
}

struct BiasAct {
    act: Act,
}

impl BiasAct {
    /// C (the row length), checking b [C] and the residual against x [.., C].
    fn cols(&self, x: &Layout, b: &Layout, r: Option<&Layout>) -> Result<usize> {
        let c = x.dims().last().copied().unwrap_or(1);
        if b.dims() != [c] {
            bail!("bias-act: bias {:?} does not match rows of {c} (x {:?})", b.shape(), x.shape());
        }
        if let Some(r) = r.filter(|r| r.shape() != x.shape()) {
            bail!("bias-act: residual {:?} differs from x {:?}", r.shape(), x.shape());
        }
        Ok(c)
    }

    fn cpu(
        &self,
        x: (&CpuStorage, &Layout),
        b: (&CpuStorage, &Layout),
        r: Option<(&CpuStorage, &Layout)>,
    ) -> Result<CpuStorage> {
        const OP: &str = "bias-act";
        let c = self.cols(x.1, b.1, r.map(|r| r.1))?;
        let bias = as_f32(b.0, b.1, OP)?;
        // Whole rows per task, so an element's column is its index in the chunk modulo C.
        let chunk = c * (1usize << 14).div_ceil(c.max(1));
        let act = self.act;
        let dtype = x.0.dtype();
        let xs = Operand::new(x.0, x.1, OP)?;
        match r {
            None => elementwise([xs], 1, chunk, dtype, OP, |[x], out| {
                for (i, (o, &v)) in out[0].iter_mut().zip(x).enumerate() {
                    *o = act.apply(v + bias[i % c]);
                }
            }),
            Some(r) => elementwise([xs, Operand::new(r.0, r.1, OP)?], 1, chunk, dtype, OP, |[x, r], out| {
                for (i, ((o, &v), &rv)) in out[0].iter_mut().zip(x).zip(r).enumerate() {
                    *o = act.apply(v + bias[i % c]) + rv;
                }
            }),
        }
    }
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((self.cpu((s1, l1), (s2, l2), None)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let c = self.cols(l1, l2, None)?;
        Ok((super::cuda::bias_act((s1, l1), Some((s2, l2)), None, c, self.act)?, l1.shape().clone()))
    }
}

impl CustomOp3 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((self.cpu((s1, l1), (s2, l2), Some((s3, l3)))?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let c = self.cols(l1, l2, Some(l3))?;
        Ok((
            super::cuda::bias_act((s1, l1), Some((s2, l2)), Some((s3, l3)), c, self.act)?,
            l1.shape().clone(),
        ))
    }
}

/// act(x + b) (+ `residual`) in x's dtype: one pass (f32, bf16; f16 on the CPU) outside
/// autograd; candle's composed, differentiable ops when an input needs a gradient or no kernel
/// takes the dtype (f16 on CUDA).
pub fn bias_act(x: &Tensor, b: &Tensor, act: Act, residual: Option<&Tensor>) -> Result<Tensor> {
    let tracked = x.track_op() || b.track_op() || residual.is_some_and(|r| r.track_op());
    if tracked || (!x.device().is_cpu() && !matches!(x.dtype(), DType::F32 | DType::BF16)) {
        let y = x.broadcast_add(b)?;
        let y = match act {
            Act::Identity => y,
            Act::QuickGelu => (&y * candle_nn::ops::sigmoid(&(&y * 1.702)?)?)?,
        };
        return match residual {
            Some(r) => y + r,
            None => Ok(y),
        };
    }
    let op = BiasAct { act };
    let (x, b) = (x.contiguous()?, b.contiguous()?);
    match residual {
        None => x.apply_op2_no_bwd(&b, &op),
        Some(r) => x.apply_op3_no_bwd(&b, &r.contiguous()?, &op),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, randn};

    /// Against the composed broadcast add, quick GELU (x·σ(1.702x)) and residual add.
    #[test]
    fn matches_the_composed_ops() {
        for dtype in [DType::F32, DType::BF16] {
            let x = randn(&[2, 5, 24], 1).affine(3.0, 0.0).unwrap().to_dtype(dtype).unwrap();
            let b = randn(&[24], 2).to_dtype(dtype).unwrap();
            let r = randn(&[2, 5, 24], 3).to_dtype(dtype).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let sum = f(&x).broadcast_add(&f(&b)).unwrap();
            let gelu = (&sum * candle_nn::ops::sigmoid(&(&sum * 1.702).unwrap()).unwrap()).unwrap();
            let tol = if dtype == DType::F32 { 1e-5 } else { 5e-2 };
            for (act, res, want) in [
                (Act::Identity, None, sum.clone()),
                (Act::QuickGelu, None, gelu.clone()),
                (Act::QuickGelu, Some(&r), (&gelu + f(&r)).unwrap()),
                (Act::Identity, Some(&r), (&sum + f(&r)).unwrap()),
            ] {
                let got = bias_act(&x, &b, act, res).unwrap();
                assert_eq!(got.dtype(), dtype);
                let d = max_diff(&f(&got), &want);
                assert!(d < tol, "{dtype:?} {act:?} residual {}: {d}", res.is_some());
            }
        }
    }

    #[test]
    fn a_mismatched_bias_is_a_named_error() {
        let err = bias_act(&randn(&[3, 8], 1), &randn(&[7], 2), Act::Identity, None).unwrap_err();
        assert!(err.to_string().contains("bias-act: bias [7]"), "{err}");
    }
}
