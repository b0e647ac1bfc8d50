//! Attention heads in and out of the projections' layout, rotated on the way: one op where
//! the model had four.
//!
//! A projection's output is [B, T, H·D]; attention wants [B, H, T, D]. Composed from candle ops
//! that is a reshape, a transpose, a contiguous copy and rope — four graph nodes, and in the
//! backward each node's gradient is zero-filled and added into (candle's `GradStore`), plus a
//! strided copy. [`split_heads`] is one pass (and one node) each way, [`merge_heads`] its
//! inverse after attention. The values are those of the composed ops (a permutation is exact;
//! the rotation is rope's arithmetic, rounded once).
//!
//! On CUDA the same pass is rope.cu's `rope_heads` (f32 and bf16), which also reads the rows of a
//! column view (one projection's slice of a fused product) without a copy; on other devices and
//! dtypes these are the composed ops.

use super::{as_f32, contiguous, par, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// The permutation [B, T, H·D] ⇄ [B, H, T, D], with the rotary rotation applied by angle +θ
/// (`sign` 1), −θ (`sign` −1, the transpose) or not at all.
#[derive(Clone, Copy)]
struct Heads {
    heads: usize,
    /// [B, T, H·D] → [B, H, T, D] (else the inverse permutation).
    split: bool,
    rotate: bool,
    sign: f32,
}

impl Heads {
    /// The op whose forward is this op's backward: the inverse permutation and rotation.
    fn transposed(self) -> Self {
        Heads { split: !self.split, sign: -self.sign, ..self }
    }

    /// The permutation's sizes and output shape for input layout `l1`, with the tables' layouts
    /// checked when rotating: a bad shape is an error naming the op.
    fn plan(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(Geometry, Shape)> {
        let h = self.heads;
        let (b, t, d, out_shape) = if self.split {
            let (b, t, hd) = l1.shape().dims3()?;
            if h == 0 || !hd.is_multiple_of(h) || !(hd / h).is_multiple_of(2) {
                bail!("split-heads: last dim {hd} is not {h} heads of an even size");
            }
            (b, t, hd / h, Shape::from((b, h, t, hd / h)))
        } else {
            let (b, hh, t, d) = l1.shape().dims4()?;
            if hh != h {
                bail!("merge-heads: {hh} heads, expected {h}");
            }
            (b, t, d, Shape::from((b, t, h * d)))
        };
        if self.rotate {
            // Rotation pairs the two halves of a head: an odd size would leave an element unwritten.
            if !d.is_multiple_of(2) {
                bail!("{}: rotary heads need an even size, got {d}", self.name());
            }
            let half = d / 2;
            for l in [l2, l3] {
                if !l.is_contiguous() || l.shape().elem_count() < t * half {
                    bail!(
                        "{}: tables cover {} positions × {half} (contiguous: {}), need {t}",
                        self.name(),
                        l.shape().elem_count() / half.max(1),
                        l.is_contiguous()
                    );
                }
            }
        }
        Ok((Geometry { b, h, t, d, split: self.split }, out_shape))
    }
}

impl CustomOp3 for Heads {
    fn name(&self) -> &'static str {
        if self.split {
            "split-heads"
        } else {
            "merge-heads"
        }
    }

    /// x [B, T, H·D] (split) or [B, H, T, D] (merge); cos/sin [T, D/2] (read when rotating).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (geometry, out_shape) = self.plan(l1, l2, l3)?;
        let (cos, sin) = if self.rotate {
            (as_f32(s2, l2, self.name())?, as_f32(s3, l3, self.name())?)
        } else {
            Default::default()
        };
        let rotation = self.rotate.then_some((&cos[..], &sin[..], self.sign));
        let out = match s1 {
            CpuStorage::F32(v) => {
                CpuStorage::F32(permute(contiguous(v, l1, self.name())?, geometry, rotation))
            }
            CpuStorage::BF16(v) => {
                CpuStorage::BF16(permute(contiguous(v, l1, self.name())?, geometry, rotation))
            }
            CpuStorage::F16(v) => {
                CpuStorage::F16(permute(contiguous(v, l1, self.name())?, geometry, rotation))
            }
            other => bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        };
        Ok((out, out_shape))
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
        let (g, out_shape) = self.plan(l1, l2, l3)?;
        let dims = [g.b, g.t, g.h, g.d];
        let rotation = self.rotate.then_some(self.sign);
        Ok((super::cuda::rope_heads(s1, l1, (s2, l2), (s3, l3), dims, g.split, rotation)?, out_shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.contiguous()?.apply_op3(cos, sin, self.transposed())?), None, None))
    }
}

/// Sizes of a permutation between [B, T, H, D] and [B, H, T, D].
#[derive(Clone, Copy)]
struct Geometry {
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    split: bool,
}

/// Move every D-run between [b, t, h, :] and [b, h, t, :] (direction by `g.split`), rotating
/// each by `(cos, sin, sign)` when given: rope's arithmetic in f32, rounded once.
fn permute<T: Float>(x: &[T], g: Geometry, rotation: Option<(&[f32], &[f32], f32)>) -> Vec<T> {
    let Geometry { h, t, d, .. } = g;
    let half = d / 2;
    // Written straight into the spare capacity: every (b, h, p) run is written below, and
    // zero-filling first was one more pass over the activations.
    let mut y = Vec::with_capacity(x.len());
    let yp = par::SendPtr::new(&mut y.spare_capacity_mut()[..x.len()]);
    // One task per (batch, head).
    par::for_each(g.b * h, |bh| {
        let (bi, hi) = (bh / h, bh % h);
        for p in 0..t {
            let in_heads = (bh * t + p) * d; // [b, h, p, :]
            let in_tokens = ((bi * t + p) * h + hi) * d; // [b, p, h, :]
            let (from, to) = if g.split { (in_tokens, in_heads) } else { (in_heads, in_tokens) };
            let src = &x[from..from + d];
            // SAFETY: (b, h, p) names a distinct D-run of y for every task and position.
            let dst = unsafe { yp.slice(to, d) };
            let Some((cos, sin, sign)) = rotation else {
                dst.iter_mut().zip(src).for_each(|(d, &v)| {
                    d.write(v);
                });
                continue;
            };
            let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
            for i in 0..half {
                let (a, bb, si) = (src[i].widen(), src[i + half].widen(), sign * s[i]);
                dst[i].write(T::narrow(a * c[i] - bb * si));
                dst[i + half].write(T::narrow(bb * c[i] + a * si));
            }
        }
    });
    // SAFETY: the tasks wrote every D-run of all B·H·T positions: x.len() elements.
    unsafe { y.set_len(x.len()) };
    y
}

/// x [B, T, H·D] → [B, H, T, D], rotated by rope's tables cos/sin [T, D/2] when given;
/// differentiable in x.
pub fn split_heads(x: &Tensor, heads: usize, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    if !one_pass_here(x) {
        let y = x.reshape((b, t, heads, hd / heads))?.transpose(1, 2)?.contiguous()?;
        return match rope {
            Some((cos, sin)) => super::rope(&y, cos, sin),
            None => Ok(y),
        };
    }
    let op = Heads { heads, split: true, rotate: rope.is_some(), sign: 1.0 };
    let (cos, sin) = tables(x, rope)?;
    // The CUDA kernel reads rows at any stride; the CPU pass wants them contiguous.
    let x = if x.device().is_cuda() && x.stride()[2] == 1 { x.clone() } else { x.contiguous()? };
    x.apply_op3(&cos, &sin, op)
}

/// y [B, H, T, D] → [B, T, H·D] (attention's output back into the projections' layout);
/// differentiable.
pub fn merge_heads(y: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = y.dims4()?;
    if !one_pass_here(y) {
        return y.transpose(1, 2)?.reshape((b, t, h * d));
    }
    let (cos, sin) = tables(y, None)?;
    y.contiguous()?.apply_op3(&cos, &sin, Heads { heads: h, split: false, rotate: false, sign: 1.0 })
}

/// The gradient of [`split_heads`] outside autograd (hand-written backwards): g [B, H, T, D] →
/// [B, T, H·D], rotated back by −θ when the split rotated.
pub fn split_heads_backward(g: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let (b, h, t, d) = g.dims4()?;
    if !one_pass_here(g) {
        let g = match rope {
            Some((cos, sin)) => super::rope(g, cos, &sin.neg()?)?,
            None => g.clone(),
        };
        return g.transpose(1, 2)?.reshape((b, t, h * d));
    }
    let op = Heads { heads: h, split: true, rotate: rope.is_some(), sign: 1.0 }.transposed();
    let (cos, sin) = tables(g, rope)?;
    g.contiguous()?.apply_op3_no_bwd(&cos, &sin, &op)
}

/// The gradient of several [`split_heads`] of column blocks of one product [B, T, ΣHᵢ·D] (q, k
/// and v of a fused projection) outside autograd: each gᵢ [B, Hᵢ, T, D] merged back into its
/// columns, rotated by −θ where its split rotated (tables [≥ T, D/2]). On CUDA each part is
/// written straight into its columns (one launch a part); elsewhere the parts' merges are
/// concatenated.
pub fn split_heads_backward_cat(parts: &[(&Tensor, Option<(&Tensor, &Tensor)>)]) -> Result<Tensor> {
    let Some((first, _)) = parts.first() else { bail!("split-heads backward: no parts") };
    let (b, _, t, d) = first.dims4()?;
    for (g, rope) in parts {
        let (gb, _, gt, gd) = g.dims4()?;
        if (gb, gt, gd) != (b, t, d) || g.dtype() != first.dtype() || !g.device().same_device(first.device())
        {
            bail!(
                "split-heads backward: parts {:?} {:?} and {:?} {:?} differ in batch, length, head size, dtype or device",
                first.shape(),
                first.dtype(),
                g.shape(),
                g.dtype()
            );
        }
        if let Some((c, s)) = rope {
            // Rotation pairs the two halves of a head: an odd size would leave an element unwritten.
            if !d.is_multiple_of(2) {
                bail!("split-heads backward: rotary heads need an even size, got {d}");
            }
            for table in [c, s] {
                if table.elem_count() < t * d / 2 {
                    bail!(
                        "split-heads backward: tables cover {} positions × {}, need {t}",
                        table.elem_count() / (d / 2).max(1),
                        d / 2
                    );
                }
            }
        }
    }
    #[cfg(feature = "cuda")]
    if first.device().is_cuda() && matches!(first.dtype(), DType::F32 | DType::BF16) {
        let parts = parts
            .iter()
            .map(|(g, rope)| {
                let tables =
                    rope.map(|(c, s)| Ok::<_, candle_core::Error>((c.contiguous()?, s.contiguous()?)));
                Ok((g.contiguous()?, tables.transpose()?))
            })
            .collect::<Result<Vec<_>>>()?;
        return super::cuda::merge_heads_cat(&parts);
    }
    let merged = parts.iter().map(|(g, rope)| split_heads_backward(g, *rope)).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&merged, 2)
}

/// Whether x's device and dtype have the one-pass op: the CPU's (any float), CUDA's kernel (f32,
/// bf16).
fn one_pass_here(x: &Tensor) -> bool {
    x.device().is_cpu() || (x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16))
}

/// The rotary tables, contiguous, or empty stand-ins (never read) when not rotating.
fn tables(x: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> Result<(Tensor, Tensor)> {
    match rope {
        Some((c, s)) => Ok((c.contiguous()?, s.contiguous()?)),
        None => {
            let empty = Tensor::zeros(0, x.dtype(), x.device())?;
            Ok((empty.clone(), empty))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, randn};
    use candle_core::{DType, Var};

    /// Forward and gradient equal the composed reshape/transpose/contiguous/rope, in f32 and
    /// bf16, with and without the rotation; merge inverts split.
    #[test]
    fn split_and_merge_match_the_composed_ops() {
        let (b, t, h, d) = (2, 5, 3, 8);
        let cos = randn(&[t, d / 2], 7);
        let sin = randn(&[t, d / 2], 8);
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(&randn(&[b, t, h * d], 1).to_dtype(dtype).unwrap()).unwrap();
            let probe = randn(&[b, h, t, d], 2);
            for rope in [None, Some((&cos, &sin))] {
                let rope_dt = rope.map(|(c, s)| (c.to_dtype(dtype).unwrap(), s.to_dtype(dtype).unwrap()));
                let rope_ref = rope_dt.as_ref().map(|(c, s)| (c, s));
                let ours = split_heads(x.as_tensor(), h, rope_ref).unwrap();
                let composed = {
                    let y = x.as_tensor().reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap();
                    let y = y.contiguous().unwrap();
                    match rope_ref {
                        Some((c, s)) => crate::ops::rope(&y, c, s).unwrap(),
                        None => y,
                    }
                };
                assert_eq!(max_diff(&ours, &composed), 0.0, "{dtype:?} forward, rope {}", rope.is_some());
                let loss =
                    |y: &Tensor| (y.to_dtype(DType::F32).unwrap() * &probe).unwrap().sum_all().unwrap();
                let (g1, g2) = (loss(&ours).backward().unwrap(), loss(&composed).backward().unwrap());
                let (g1, g2) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
                assert_eq!(max_diff(g1, g2), 0.0, "{dtype:?} gradient, rope {}", rope.is_some());
                if rope.is_none() {
                    assert_eq!(max_diff(&merge_heads(&ours).unwrap(), x.as_tensor()), 0.0);
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_named() {
        let err = split_heads(&randn(&[1, 2, 9], 1), 2, None).unwrap_err();
        assert!(err.to_string().contains("split-heads"), "{err}");
    }
}
