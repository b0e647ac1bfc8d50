//! Attention of one new query position per sequence against its KV cache (decode), as one op
//! with the heads merged on the way out.
//!
//! The composed decode path runs, per layer and token, a batched q·Kᵀ GEMM, a softmax, a
//! batched P·V GEMM and a head merge (four launches, two of them cuBLAS batched GEMMs of a
//! single row). On CUDA this op is `kernels/src/decode_attn.cu`: the keys split over enough
//! blocks to fill the GPU ([`splits`]), plus a combine launch when there are several. The CPU
//! forward is the reference it is tested
//! against (f32 throughout, one rounding); the models keep their composed path on the CPU.
//!
//! Shapes: q [B, Hq, 1, D]; k, v [B, Hk, S, D] (the cache's views: on CUDA read in place when
//! rows of D are contiguous); Hq % Hk = 0 (GQA as in `models::llama`). Every key precedes the
//! query, so there is no mask. Output [B, 1, Hq·D] (merge_heads' layout), no backward.

use super::super::{as_f32, store};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

/// Checked (B, Hq, Hk, S, D).
fn decode_dims(q: &Shape, k: &Shape, v: &Shape) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, hq, t, d) = q.dims4()?;
    let (bk, hk, s, dk) = k.dims4()?;
    if t != 1 || (bk, dk) != (b, d) || v.dims() != k.dims() || hk == 0 || hq % hk != 0 || s == 0 {
        bail!(
            "decode-attention: q {q:?} and k {k:?} / v {v:?} need [B, Hq, 1, D] and [B, Hk, S, D] with Hq % Hk = 0, S ≥ 1"
        );
    }
    Ok((b, hq, hk, s, d))
}

struct DecodeAttention {
    scale: f32,
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    /// Per (b, h): s_j = scale·q·k_j, o = Σ softmax(s)_j v_j, in f32, rounded once.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, hq, hk, s, d) = decode_dims(l1.shape(), l2.shape(), l3.shape())?;
        let (q, k, v) =
            (as_f32(s1, l1, self.name())?, as_f32(s2, l2, self.name())?, as_f32(s3, l3, self.name())?);
        let mut out = vec![0f32; b * hq * d];
        let mut p = vec![0f32; s];
        for (row, o) in out.chunks_exact_mut(d).enumerate() {
            let (bi, h) = (row / hq, row % hq);
            let base = (bi * hk + h / (hq / hk)) * s * d;
            let qr = &q[row * d..][..d];
            let (kh, vh) = (&k[base..base + s * d], &v[base..base + s * d]);
            for (pj, kj) in p.iter_mut().zip(kh.chunks_exact(d)) {
                *pj = qr.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * self.scale;
            }
            let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            p.iter_mut().for_each(|x| *x = (*x - m).exp());
            let l: f32 = p.iter().sum();
            for (pj, vj) in p.iter().zip(vh.chunks_exact(d)) {
                o.iter_mut().zip(vj).for_each(|(o, v)| *o += pj * v);
            }
            o.iter_mut().for_each(|x| *x /= l);
        }
        Ok((store(out, s1.dtype(), self.name())?, Shape::from((b, 1, hq * d))))
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
        let (b, hq, hk, s, d) = decode_dims(l1.shape(), l2.shape(), l3.shape())?;
        let out =
            super::super::cuda::decode_attention(s1, l1, s2, l2, s3, l3, (b, hq, hk, s, d), self.scale)?;
        Ok((out, Shape::from((b, 1, hq * d))))
    }
}

/// How the CUDA kernel splits the keys: the grid's arithmetic, mirrored by decode_attn.cu and
/// tested on every build (only the CUDA launchers use it).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) mod splits {
    /// Most and fewest keys per split of the CUDA kernel (decode_attn.cu's DECODE_CHUNK,
    /// DECODE_MIN_CHUNK).
    pub(super) const DECODE_CHUNK: usize = 512;
    pub(super) const DECODE_MIN_CHUNK: usize = 64;
    /// Blocks a decode-attention launch aims for: about twice an H100's or H200's 132 SMs. One
    /// block per (sequence, head) left a batch-1 step with 32 heads on 32 SMs, each reading its
    /// keys one after another.
    const DECODE_BLOCKS: usize = 256;

    /// Splits over the keys wanted for `rows` = B·Hq query rows (decode_attn.cu's `want`).
    pub(crate) fn decode_want(rows: usize) -> usize {
        DECODE_BLOCKS.div_ceil(rows.max(1))
    }

    /// Keys per split for `keys` keys (decode_attn.cu's decode_chunk: the same arithmetic).
    pub(super) fn decode_chunk(keys: usize, want: usize) -> usize {
        keys.div_ceil(want).next_multiple_of(DECODE_MIN_CHUNK).clamp(DECODE_MIN_CHUNK, DECODE_CHUNK)
    }

    /// NS, the splits of an eager step's grid for `rows` = B·Hq query rows over `keys` keys.
    pub(crate) fn decode_splits(rows: usize, keys: usize) -> usize {
        keys.div_ceil(decode_chunk(keys, decode_want(rows)))
    }

    /// NS for a CUDA-graph step, whose grid serves every key count up to the cache's `capacity`:
    /// each S ≤ capacity has [`decode_splits`] ≤ NS (while S ≤ DECODE_CHUNK·want its chunk holds
    /// ⌈S / want⌉ keys, else DECODE_CHUNK) and the splits past them are empty. The chunk depends
    /// on S and B·Hq only, so an eager step and a graph step split alike.
    pub(crate) fn decode_graph_splits(rows: usize, capacity: usize) -> usize {
        decode_want(rows).max(capacity.div_ceil(DECODE_CHUNK))
    }
}

/// Whether [`decode_attention`] runs a kernel for a query head dim of `head_dim` on `dev` in
/// `dtype` (CUDA, f32 or bf16, D ∈ {32, 64, 96, 128}). The models take it only then.
pub fn decode_kernel_supports(dev: &Device, dtype: DType, head_dim: usize) -> bool {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        return matches!(dtype, DType::F32 | DType::BF16)
            && super::super::cuda::ATTENTION_HEAD_DIMS.contains(&head_dim);
    }
    let _ = (dev, dtype, head_dim);
    false
}

/// softmax(q·kᵀ·scale)·v for one query position per sequence, heads merged: q [B, Hq, 1, D],
/// k and v [B, Hk, S, D] → [B, 1, Hq·D]. Forward only (inference).
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    decode_dims(q.shape(), k.shape(), v.shape())?;
    let op = DecodeAttention { scale: scale as f32 };
    if q.device().is_cuda() {
        // The cache's views go in as they are; the launcher copies only what it cannot read.
        return q.contiguous()?.apply_op3_no_bwd(k, v, &op);
    }
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

#[cfg(test)]
mod tests {
    use super::splits::*;
    use super::*;
    use crate::ops::testing::{max_diff, randn};

    /// Every key count a CUDA graph may replay with (1..=capacity) fits the grid sized for the
    /// capacity, and splits as the eager step does (the same chunk); chunks stay in range.
    #[test]
    fn decode_splits_cover_every_key_count_up_to_the_capacity() {
        for rows in [1, 3, 32, 64, 256, 300] {
            for cap in [1, 63, 64, 300, 512, 513, 4096, 5000] {
                let grid = decode_graph_splits(rows, cap);
                for s in 1..=cap {
                    let chunk = decode_chunk(s, decode_want(rows));
                    assert!(
                        (DECODE_MIN_CHUNK..=DECODE_CHUNK).contains(&chunk)
                            && chunk.is_multiple_of(DECODE_MIN_CHUNK)
                    );
                    let eager = decode_splits(rows, s);
                    assert_eq!(eager, s.div_ceil(chunk));
                    assert!(eager <= grid, "rows {rows} cap {cap} S {s}: {eager} splits, grid {grid}");
                }
            }
        }
        // A batch-1 step of a 32-head model: 256 keys in 4 splits of 64, 4096 in 8 of 512; at
        // batch 8 one split per 512 keys, as before.
        assert_eq!(decode_splits(32, 256), 4);
        assert_eq!(decode_splits(32, 4096), 8);
        assert_eq!(decode_splits(8 * 32, 256), 1);
        assert_eq!(decode_splits(8 * 32, 4096), 8);
    }

    /// The op against the materialised softmax(q kᵀ·scale) v with its heads merged, GQA, keys in
    /// a larger cache (narrowed views), f32 and bf16.
    #[test]
    fn cpu_op_matches_the_materialised_attention() {
        for (hq, hk, s, dtype) in [(4, 2, 13, DType::F32), (3, 3, 1, DType::F32), (2, 1, 70, DType::BF16)] {
            let d = 16;
            let q = randn(&[2, hq, 1, d], 1).to_dtype(dtype).unwrap();
            let kc = randn(&[2, hk, s + 5, d], 2).to_dtype(dtype).unwrap();
            let vc = randn(&[2, hk, s + 5, d], 3).to_dtype(dtype).unwrap();
            let (k, v) = (kc.narrow(2, 0, s).unwrap(), vc.narrow(2, 0, s).unwrap());
            let scale = 1.0 / (d as f64).sqrt();
            let ours = decode_attention(&q, &k, &v, scale).unwrap();
            assert_eq!(ours.dims(), &[2, 1, hq * d]);
            let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let rep = |x: &Tensor| {
                let (b, hk, s, d) = x.dims4().unwrap();
                let x = f(x).unsqueeze(2).unwrap().broadcast_as((b, hk, hq / hk, s, d)).unwrap();
                x.reshape((b, hq, s, d)).unwrap()
            };
            let scores = (f(&q).matmul(&rep(&k).t().unwrap()).unwrap() * scale).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let want = p.matmul(&rep(&v)).unwrap().transpose(1, 2).unwrap().reshape((2, 1, hq * d)).unwrap();
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            let diff = max_diff(&f(&ours), &want);
            assert!(diff < tol, "Hq {hq} Hk {hk} S {s} {dtype:?}: {diff}");
        }
    }

    #[test]
    fn shape_errors_name_the_op() {
        let q = randn(&[1, 2, 2, 8], 1);
        let k = randn(&[1, 1, 4, 8], 2);
        let err = decode_attention(&q, &k, &k, 1.0).unwrap_err().to_string();
        assert!(err.contains("decode-attention") && err.contains("[B, Hq, 1, D]"), "{err}");
    }
}
