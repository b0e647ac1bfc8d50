//! One inference step's projections into attention as one op: q rotated into [B, Hq, T, D], k
//! rotated and v copied into the KV cache at their positions. Decode ran two rotations, up to
//! three head splits and two cache writes per layer and token for this; on CUDA it is now one
//! kernel (`rope_qkv_cache_*` in `kernels/src/rope.cu`), on the CPU one pass.
//!
//! Shapes: q [B, T, Hq·D], k and v [B, T, G·D] — any views whose rows have unit stride (column
//! blocks of one fused projection are read in place); cos/sin [T, D/2], the rotary tables of
//! positions pos..pos+T; the cache kv [2, B, G, cap, D] contiguous (keys, then values) with
//! pos + T ≤ cap. The rotation is rope's arithmetic ((a, b) → (a·c − b·s, b·c + a·s) in f32,
//! each product and sum rounded on its own, then rounded to the dtype once), so q and the keys
//! are bit-identical to `split_heads` with the tables followed by a cache write.

use super::{as_f32, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor};
use std::sync::Mutex;

struct QkvIntoCache {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    pos: usize,
    heads: usize,
    /// The rotated q, made by the forward ([`rope_qkv_into_cache`] takes it).
    q_out: Mutex<Option<Tensor>>,
}

/// (B, T, Hq, G, D, cap) of the step, checked.
pub(super) struct Dims {
    pub b: usize,
    pub t: usize,
    pub hq: usize,
    pub g: usize,
    pub d: usize,
    pub cap: usize,
    /// The cache's first element in its storage.
    pub start: usize,
}

const OP: &str = "rope-qkv-into-cache";

/// (B, T, G, D) of a step's q [B, T, heads·D], k and v [B, T, G·D], checked: nothing empty, an
/// even head size, k and v alike.
pub fn step_dims(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<(usize, usize, usize, usize)> {
    let (b, t, qw) = q.dims3()?;
    let (_, _, kw) = k.dims3()?;
    let d = qw / heads.max(1);
    if heads == 0 || b == 0 || t == 0 || d == 0 || qw != heads * d || !d.is_multiple_of(2) {
        bail!("{OP}: q {:?} is not [B, T, {heads} heads × an even head size] with B, T ≥ 1", q.shape());
    }
    let g = kw / d;
    if g == 0 || k.dims() != [b, t, g * d] || v.dims() != k.dims() {
        bail!("{OP}: k {:?} and v {:?} are not [{b}, {t}, G × {d}] with G ≥ 1", k.shape(), v.shape());
    }
    Ok((b, t, g, d))
}

impl QkvIntoCache {
    fn dims(&self, kv: &Layout) -> Result<Dims> {
        let (b, t, g, d) = step_dims(&self.q, &self.k, &self.v, self.heads)?;
        let (two, cb, cg, cap, cd) = kv.shape().dims5()?;
        if two != 2 || (cb, cg, cd) != (b, g, d) || !kv.is_contiguous() {
            bail!("{OP}: the cache must be a contiguous [2, {b}, {g}, cap, {d}], got {:?}", kv.shape());
        }
        for (what, x) in [("cos", &self.cos), ("sin", &self.sin)] {
            if x.rank() != 2 || x.dim(0)? < t || x.dim(1)? != d / 2 {
                bail!("{OP}: {what} {:?} is not [≥ {t} positions, {}]", x.shape(), d / 2);
            }
        }
        if self.pos + t > cap {
            bail!("{OP}: positions {}..{} past the cache's capacity {cap}", self.pos, self.pos + t);
        }
        Ok(Dims { b, t, hq: self.heads, g, d, cap, start: kv.start_offset() })
    }
}

/// Element (b, t, j) of a [B, T, W] view with unit stride along W: its offset.
fn at(l: &Layout, b: usize, t: usize) -> usize {
    l.start_offset() + b * l.stride()[0] + t * l.stride()[1]
}

/// The CPU forward in the cache's element type: q, k, v (`src`) are read as stored, and the
/// rotated q is returned as a [B, Hq, T, D] tensor.
fn cpu_step<T: Float + candle_core::WithDType>(
    op: &QkvIntoCache,
    kv: &mut [T],
    n: &Dims,
    src: &[(&CpuStorage, &Layout)],
) -> Result<Tensor> {
    let cpu = |x: &Tensor| x.to_device(&candle_core::Device::Cpu);
    let (cos, sin) = (cpu(&op.cos)?, cpu(&op.sin)?);
    let (cos_s, cos_l) = cos.storage_and_layout();
    let (sin_s, sin_l) = sin.storage_and_layout();
    let (Storage::Cpu(cs), Storage::Cpu(ss)) = (&*cos_s, &*sin_s) else { unreachable!("moved to the CPU") };
    let (cos, sin) = (as_f32(cs, cos_l, OP)?, as_f32(ss, sin_l, OP)?);
    let (half, d) = (n.d / 2, n.d);
    let rotate = |x: &[T], p: usize, out: &mut [T]| {
        let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
        for i in 0..half {
            let (a, b) = (x[i].widen(), x[i + half].widen());
            out[i] = T::narrow(a * c[i] - b * s[i]);
            out[i + half] = T::narrow(b * c[i] + a * s[i]);
        }
    };
    let get = |i: usize| -> Result<(&[T], &Layout)> { Ok((src[i].0.as_slice::<T>()?, src[i].1)) };
    let [(q, ql), (k, kl), (v, vl)] = [get(0)?, get(1)?, get(2)?];
    let mut q_out = vec![T::default(); n.b * n.hq * n.t * d];
    let values = n.b * n.g * n.cap * d; // where the values' half of the cache starts
    for b in 0..n.b {
        for p in 0..n.t {
            for h in 0..n.hq {
                let o = ((b * n.hq + h) * n.t + p) * d;
                rotate(&q[at(ql, b, p) + h * d..][..d], p, &mut q_out[o..o + d]);
            }
            for g in 0..n.g {
                let o = ((b * n.g + g) * n.cap + op.pos + p) * d;
                rotate(&k[at(kl, b, p) + g * d..][..d], p, &mut kv[o..o + d]);
                kv[values + o..][..d].copy_from_slice(&v[at(vl, b, p) + g * d..][..d]);
            }
        }
    }
    Tensor::from_vec(q_out, (n.b, n.hq, n.t, d), &candle_core::Device::Cpu)
}

impl InplaceOp1 for QkvIntoCache {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let n = self.dims(l)?;
        let guards = [&self.q, &self.k, &self.v].map(|x| x.storage_and_layout());
        let mut src = Vec::with_capacity(3);
        for (storage, layout) in &guards {
            let Storage::Cpu(c) = &**storage else { bail!("{}: q, k and v must be on the CPU", self.name()) };
            src.push((c, *layout));
        }
        let q_out = match s {
            CpuStorage::F32(kv) => cpu_step(self, &mut kv[n.start..], &n, &src)?,
            CpuStorage::BF16(kv) => cpu_step(self, &mut kv[n.start..], &n, &src)?,
            other => bail!("{}: no CPU path for {:?} (f32 and bf16)", self.name(), other.dtype()),
        };
        *self.q_out.lock().expect("q_out") = Some(q_out);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        let n = self.dims(l)?;
        let q_out = super::cuda::rope_qkv_cache(
            [&self.q, &self.k, &self.v],
            (&self.cos, &self.sin),
            s,
            &n,
            self.pos,
        )?;
        *self.q_out.lock().expect("q_out") = Some(q_out);
        Ok(())
    }
}

/// Rotate q into [B, Hq, T, D] (returned) and write k rotated and v into the cache `kv`
/// [2, B, G, cap, D] at positions pos..pos+T. Shapes in the module docs; q, k, v, the tables and
/// the cache share a device, and q, k, v the cache's dtype (f32 or bf16). Outside autograd.
pub fn rope_qkv_into_cache(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    kv: &Tensor,
    pos: usize,
    heads: usize,
) -> Result<Tensor> {
    let rows = |x: &Tensor| -> Result<Tensor> {
        Ok(if x.rank() == 3 && x.stride()[2] == 1 { x.clone() } else { x.contiguous()? })
    };
    for x in [q, k, v] {
        if x.dtype() != kv.dtype() || !matches!(kv.dtype(), DType::F32 | DType::BF16) {
            bail!(
                "rope-qkv-into-cache: q, k, v {:?} and the cache {:?} must share f32 or bf16",
                x.dtype(),
                kv.dtype()
            );
        }
    }
    let op = QkvIntoCache {
        q: rows(q)?,
        k: rows(k)?,
        v: rows(v)?,
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        pos,
        heads,
        q_out: Mutex::new(None),
    };
    kv.inplace_op1(&op)?;
    let q_out = op.q_out.lock().expect("q_out").take();
    match q_out {
        Some(q) => Ok(q),
        None => bail!("{OP}: the op left no q"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::randn;
    use candle_core::{Device, IndexOp};

    /// Against split_heads with the tables and a cache write: bit-identical q and keys, the
    /// values copied, every other cache row untouched; q, k, v as column views of one product.
    #[test]
    fn matches_split_heads_and_a_cache_write() {
        for dtype in [DType::F32, DType::BF16] {
            let (b, t, hq, g, d, cap, pos) = (2, 3, 4, 2, 8, 9, 4);
            let y = randn(&[b, t, (hq + 2 * g) * d], 1).to_dtype(dtype).unwrap();
            let (q, k, v) = (
                y.narrow(2, 0, hq * d).unwrap(),
                y.narrow(2, hq * d, g * d).unwrap(),
                y.narrow(2, (hq + g) * d, g * d).unwrap(),
            );
            let (cos, sin) = (randn(&[t, d / 2], 2), randn(&[t, d / 2], 3));
            let before = randn(&[2, b, g, cap, d], 4).to_dtype(dtype).unwrap();
            let kv = before.copy().unwrap();
            let q_rot = rope_qkv_into_cache(&q, &k, &v, (&cos, &sin), &kv, pos, hq).unwrap();
            let same = |a: &Tensor, b: &Tensor| {
                let f = |x: &Tensor| {
                    x.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
                };
                assert_eq!(f(a), f(b));
            };
            same(&q_rot, &crate::ops::split_heads(&q, hq, Some((&cos, &sin))).unwrap());
            let keys = crate::ops::split_heads(&k, g, Some((&cos, &sin))).unwrap();
            let values = crate::ops::split_heads(&v, g, None).unwrap();
            same(&kv.i(0).unwrap().narrow(2, pos, t).unwrap(), &keys);
            same(&kv.i(1).unwrap().narrow(2, pos, t).unwrap(), &values);
            for half in 0..2 {
                same(
                    &kv.i(half).unwrap().narrow(2, 0, pos).unwrap(),
                    &before.i(half).unwrap().narrow(2, 0, pos).unwrap(),
                );
                let rest = cap - pos - t;
                same(
                    &kv.i(half).unwrap().narrow(2, pos + t, rest).unwrap(),
                    &before.i(half).unwrap().narrow(2, pos + t, rest).unwrap(),
                );
            }
        }
    }

    #[test]
    fn bad_shapes_are_named_errors() {
        let kv = Tensor::zeros((2, 1, 2, 4, 8), DType::F32, &Device::Cpu).unwrap();
        let (q, kv_row) = (randn(&[1, 1, 32], 1), randn(&[1, 1, 16], 2));
        let tables = (randn(&[1, 4], 3), randn(&[1, 4], 4));
        let err = rope_qkv_into_cache(&q, &kv_row, &kv_row, (&tables.0, &tables.1), &kv, 4, 4).unwrap_err();
        assert!(err.to_string().contains("past the cache's capacity 4"), "{err}");
        let err = rope_qkv_into_cache(&q, &q, &kv_row, (&tables.0, &tables.1), &kv, 0, 4).unwrap_err();
        assert!(err.to_string().contains("k [1, 1, 32]"), "{err}");
        let wide = (randn(&[1, 8], 3), randn(&[1, 8], 4)); // [T, D] tables: not this op's
        let err = rope_qkv_into_cache(&q, &kv_row, &kv_row, (&wide.0, &wide.1), &kv, 0, 4).unwrap_err();
        assert!(err.to_string().contains("cos [1, 8] is not"), "{err}");
    }
}
