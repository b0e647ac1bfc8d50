//! `a · b` for 2-D tensors, with a backward that computes only the gradients somebody needs.
//!
//! candle's own matmul backward computes both operand gradients unconditionally. In stage-1
//! training the whole LLM is frozen but the gradient still flows through it to the image
//! tokens, so every projection paid a dW GEMM per step that nothing read: a third of the LLM's
//! GEMM work, thrown away. Here each operand is asked whether anything upstream trains
//! (`track_op`: a variable, or computed from one) before its gradient is computed.
//!
//! Forward: on a CPU with AVX-512, bf16 and (past a few rows) f32 run [`super::cpu_gemm`];
//! on CUDA a few rows against a linear's weight (decode) run the GEMV kernel of
//! `kernels/src/gemv.cu`; everything else runs the backend's matmul (the `gemm` crate on the
//! CPU, cuBLAS on CUDA), exactly what `Tensor::matmul` would run. Operands may be any 2-D
//! strided views (transposes are free).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use super::choice::EnvChoice;
use super::cpu_gemm;
use std::sync::Arc;

/// Most rows of a product the decode GEMV kernels can take on CUDA (`kernels/src/gemv.cu`'s
/// instantiations); [`super::cuda_gemv_rows`] says how many they do take, more go to cuBLAS.
pub const GEMV_MAX_ROWS: usize = 8;

struct Matmul {
    /// b packed beforehand (a frozen weight), used when the product would pack it anyway.
    packed: Option<Arc<cpu_gemm::PackedB>>,
    /// Return f32 whatever the operands ([`matmul_f32`]).
    widen: bool,
    /// The library of a CUDA product ([`GemmBackend::for_product`] when `None`).
    backend: Option<GemmBackend>,
}

/// Which library runs the CUDA products of [`matmul`] (all but decode's GEMV kernel). Chosen by
/// `SHARDSMITH_GEMM` (`candle`, `cublas` or `cublaslt`; unset: candle, and cuBLAS for products
/// widened to f32, [`GemmBackend::for_product`]) until GPU measurements settle on one
/// (`bench gemm` and `bench gpu-layer` run each). All three accumulate in f32; they differ in
/// kernel choice (summation order) only, and candle rounds a widened product to the operands'
/// dtype first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmBackend {
    /// candle's matmul: `cublasGemmStridedBatchedEx`, a batch of one, cuBLAS's default workspace.
    Candle,
    /// `cublasGemmEx` on a handle with a 32 MiB workspace, as PyTorch's matmul (bf16, f16;
    /// `ops::cublas`). A widened product is written in f32 straight from the accumulators.
    Cublas,
    /// cuBLASLt with a 32 MiB workspace and its heuristic's algorithm, as PyTorch's addmm.
    CublasLt,
}

impl EnvChoice for GemmBackend {
    const VAR: &'static str = "SHARDSMITH_GEMM";
    const NOUN: &'static str = "GEMM library";
    const CHOICES: &'static [(&'static str, GemmBackend)] = &[
        ("candle", GemmBackend::Candle),
        ("cublas", GemmBackend::Cublas),
        ("cublaslt", GemmBackend::CublasLt),
    ];
    fn cell() -> &'static std::sync::OnceLock<std::result::Result<Self, String>> {
        static CELL: std::sync::OnceLock<std::result::Result<GemmBackend, String>> =
            std::sync::OnceLock::new();
        &CELL
    }
}

impl GemmBackend {
    pub const ALL: [GemmBackend; 3] = [GemmBackend::Candle, GemmBackend::Cublas, GemmBackend::CublasLt];

    /// The `SHARDSMITH_GEMM` spelling.
    pub fn name(self) -> &'static str {
        self.spelling()
    }

    /// The backend spelled `name`, or an error listing the spellings.
    pub fn named(name: &str) -> Result<GemmBackend> {
        Self::by_name(name)
    }

    /// `SHARDSMITH_GEMM`, read once per process (unset or empty: `candle`).
    pub fn from_env() -> Result<GemmBackend> {
        Self::from_var()
    }

    /// The library for a product with an f32 result from narrower operands (`widen`: the
    /// weight gradients of f32 master weights) or not: `SHARDSMITH_GEMM` when set; unset,
    /// cuBLAS for a widened product and candle's matmul otherwise. cuBLAS writes the f32 result
    /// straight from its accumulators where candle's product is rounded to bf16 and widened by
    /// a second pass: at the 7B layer's weight-gradient shapes (M·N·K 12288·4096·8192 to
    /// 22016·4096·8192) 1.07–2.15 ms against 1.46–2.86 ms, 1.3–1.45× (H200, BENCHMARKS.md
    /// part 14, `bench gemm`), and exact to the f32 sums.
    pub fn for_product(widen: bool) -> Result<GemmBackend> {
        if Self::defaults_to_cublas(widen) {
            return Ok(GemmBackend::Cublas);
        }
        Self::from_env()
    }

    /// Whether [`GemmBackend::for_product`] picks cuBLAS by default rather than as asked.
    fn defaults_to_cublas(widen: bool) -> bool {
        static SET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        widen && !*SET.get_or_init(|| std::env::var(Self::VAR).is_ok_and(|v| !v.is_empty()))
    }
}

/// Whether the packed f32 kernel runs this product rather than the `gemm` crate: everything
/// with a row-major A past a few rows (decode stays on `gemm`: packing costs more than it
/// saves when each weight is used a handful of times). `gemm` is faster only where A is a
/// transposed view (dW = dyᵀ·x), and its rayon threads fight candle's element-wise workers
/// (see `cpu_gemm::parallel_for`). Measured, 2 threads, 134M LLaMA: f32 prefill 235 → 218 ms,
/// stage-1 train step 1.11–1.14 → 1.02 s, stage 2 unchanged (1.9–2.0 s); alone at M = 256
/// the packed kernel is 1.4–2× `gemm` for x·Wᵀ with K ≥ N (K 2048 × N 768: 163 vs 84 GFLOP/s),
/// within 10–15 % of it elsewhere.
fn f32_packed_wins(m: usize, a: &Layout) -> bool {
    m > 4 && a.stride()[1] == 1
}

/// `a [.., K]` as the 2-D [M, K] view of its rows (M = the product of the leading dims), or an
/// error when its leading dims do not merge into evenly spaced rows.
pub(super) fn rows_view(l: &Layout) -> Result<Layout> {
    let (dims, stride) = (l.dims(), l.stride());
    let r = dims.len();
    if r < 2 {
        bail!("matmul: a must have at least 2 dims, got {:?}", l.shape());
    }
    if r == 2 {
        return Ok(l.clone());
    }
    // The leading dims of more than one element, outermost first: each must step over exactly
    // the rows of the next. A dim of 1 is skipped: its stride means nothing, and comparing with
    // it hid e.g. [2, 1, 3, K] with strides [K, K, 2K, 1] (a permute), whose rows do not merge.
    let lead: Vec<(usize, usize)> =
        (0..r - 1).filter(|&i| dims[i] > 1).map(|i| (dims[i], stride[i])).collect();
    if lead.windows(2).any(|w| w[0].1 != w[1].1 * w[1].0) {
        bail!("matmul: the leading dims of a {:?} (strides {stride:?}) are not one run of rows", l.shape());
    }
    let m = dims[..r - 1].iter().product::<usize>();
    let row_stride = lead.last().map_or(dims[r - 1], |&(_, s)| s);
    Ok(Layout::new(Shape::from((m, dims[r - 1])), vec![row_stride, stride[r - 1]], l.start_offset()))
}

/// (m, n, k) of `a [M, K] · b [K, N]` (2-D views), or an error naming the shapes.
fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
    let (m, k) = l1.shape().dims2()?;
    let (k2, n) = l2.shape().dims2()?;
    if k != k2 {
        bail!("matmul: inner dimensions differ, a is {:?} and b is {:?}", l1.shape(), l2.shape());
    }
    Ok((m, n, k))
}

/// The output shape: a's leading dims, then N.
fn out_shape(l1: &Layout, n: usize) -> Shape {
    let mut dims = l1.dims().to_vec();
    *dims.last_mut().expect("rank >= 2") = n;
    Shape::from(dims)
}

impl CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (shape, l1) = (l1, &rows_view(l1)?);
        let (m, n, k) = dims(l1, l2)?;
        let (d1, d2) = (s1.dtype(), s2.dtype());
        // The pre-packed b, when it is what this product would pack (more rows than the
        // dot-product kernel takes).
        let packed = self.packed.as_deref().filter(|p| p.dims() == (k, n) && m > cpu_gemm::DOT_MAX_M);
        let out = if d1 == DType::BF16 && d2 == DType::BF16 && cpu_gemm::bf16_available() {
            let a = cpu_gemm::view(s1, l1, "a")?;
            let b = match packed.filter(|p| p.kind() == cpu_gemm::PackKind::Bf16) {
                Some(p) => cpu_gemm::BSource::Packed(p),
                None => cpu_gemm::BSource::View(cpu_gemm::view(s2, l2, "b")?),
            };
            let c = cpu_gemm::gemm_new(a, b)?;
            if self.widen {
                CpuStorage::F32(c)
            } else {
                CpuStorage::BF16(cpu_gemm::round_bf16(&c))
            }
        } else if d1 == DType::F32 && d2 == DType::F32 && f32_packed_wins(m, l1) && cpu_gemm::f32_available()
        {
            let a = cpu_gemm::view_f32(s1, l1, "a")?;
            let b = match packed.filter(|p| p.kind() == cpu_gemm::PackKind::F32) {
                Some(p) => cpu_gemm::BSource::Packed(p),
                None => cpu_gemm::BSource::View(cpu_gemm::view_f32(s2, l2, "b")?),
            };
            CpuStorage::F32(cpu_gemm::gemm_new(a, b)?)
        } else {
            let c = s1.matmul(s2, (1, m, n, k), l1, l2)?;
            if self.widen && c.dtype() != DType::F32 {
                c.to_dtype(&Layout::contiguous((m, n)), DType::F32)?
            } else {
                c
            }
        };
        Ok((out, out_shape(shape, n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (shape, l1) = (l1, &rows_view(l1)?);
        let (m, n, k) = dims(l1, l2)?;
        if !self.widen {
            if let Some(c) = super::cuda::gemv(s1, l1, s2, l2, super::cuda::GemvEpilogue::Plain)? {
                return Ok((c, out_shape(shape, n)));
            }
        }
        let backend = match self.backend {
            Some(b) => b,
            None => GemmBackend::for_product(self.widen)?,
        };
        match super::cublas::gemm(backend, s1, l1, s2, l2, (m, n, k), self.widen) {
            Ok(Some(c)) => return Ok((c, out_shape(shape, n))),
            Ok(None) => {}
            // cuBLAS picked by default (not asked for) and unable to run, e.g. no memory left
            // for its handles' workspace: candle's product, as before that default.
            Err(_) if self.backend.is_none() && GemmBackend::defaults_to_cublas(self.widen) => {}
            Err(e) => return Err(e),
        }
        // candle's matmul reads only unpadded operands (plain or transposed): a padded view the
        // library turned down (its algorithms want aligned leading dims) is copied first.
        let packed = |s: &candle_core::CudaStorage, l: &Layout| -> Result<Option<candle_core::CudaStorage>> {
            let (st, (r, c)) = (l.stride(), l.shape().dims2()?);
            if (st[1] == 1 && st[0] == c) || (st[0] == 1 && st[1] == r) {
                return Ok(None);
            }
            use candle_core::backend::BackendDevice;
            // SAFETY: every element is written by the copy below before it is read.
            let mut dst = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
            s.copy_strided_src(&mut dst, 0, l)?;
            Ok(Some(dst))
        };
        let (p1, p2) = (packed(s1, l1)?, packed(s2, l2)?);
        let (c1, c2) = (Layout::contiguous((m, k)), Layout::contiguous((k, n)));
        let (s1, l1) = p1.as_ref().map_or((s1, l1), |p| (p, &c1));
        let (s2, l2) = p2.as_ref().map_or((s2, l2), |p| (p, &c2));
        let c = s1.matmul(s2, (1, m, n, k), l1, l2)?;
        let c = if self.widen && c.dtype() != DType::F32 {
            c.to_dtype(&Layout::contiguous((m, n)), DType::F32)?
        } else {
            c
        };
        Ok((c, out_shape(shape, n)))
    }

    /// da = g·bᵀ and db = aᵀ·g, each only when that operand is trained or computed from
    /// something trained: the same op over transposed views.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.widen {
            bail!("matmul_f32 has no backward (it serves hand-written backwards)");
        }
        let g = g.to_dtype(a.dtype())?;
        let product = |x: &Tensor, y: &Tensor| apply_with(x, y, None, false, self.backend);
        let da = if a.track_op() { Some(product(&g, &b.t()?)?) } else { None };
        let db = if b.track_op() {
            // Over a's rows as one [M, K] matrix (a view when a is contiguous).
            let k = a.dim(D::Minus1)?;
            let (a2, g2) = (a.reshape(((), k))?, g.reshape(((), g.dim(D::Minus1)?))?);
            Some(product(&a2.t()?, &g2)?)
        } else {
            None
        };
        Ok((da, db))
    }
}

/// `x · wt + r` (x [.., K], wt = wᵀ [K, N], r [.., N]) outside autograd, the product rounded to
/// the dtype before the add as the composed ops round it, when decode's GEMV kernel takes it (a
/// few rows on CUDA; gemv.cu's add epilogue: the residual add after a projection without a
/// launch of its own). `None` elsewhere: the caller runs the product and the add.
pub fn gemv_add(x: &Tensor, wt: &Tensor, r: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && !(x.track_op() || wt.track_op() || r.track_op()) {
        return super::cuda::gemv_tensor(x, wt, Some(r), false);
    }
    let _ = (x, wt, r);
    Ok(None)
}

/// `silu(x · wt_gate) · (x · wt_up)` for wt = [w_gate; w_up]ᵀ [K, 2F] (a fused gate/up weight's
/// transpose) → [.., F], outside autograd, when decode's GEMV kernel takes it (gemv.cu's SwiGLU
/// epilogue: the same values as the GEMV followed by `ops::swiglu`, one launch fewer). `None`
/// elsewhere.
pub fn gemv_swiglu(x: &Tensor, wt: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && !(x.track_op() || wt.track_op()) {
        return super::cuda::gemv_tensor(x, wt, None, true);
    }
    let _ = (x, wt);
    Ok(None)
}

/// `a [.., M, K] · b [K, N] → [.., M, N]` (same dtype and device; a's leading dims are rows of
/// one matrix, so a projection of [B, T, K] needs no reshape), differentiable in whichever
/// operand needs it.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    apply(a, b, None, false)
}

/// [`matmul`] with an f32 result whatever the operands' dtype: on the CPU the bf16 GEMM's f32
/// sums as they are, not rounded to bf16 and widened again (what `matmul(..)?.to_dtype(F32)`
/// costs: two passes and a rounding), for weight gradients that go to f32 master weights;
/// elsewhere the backend's product widened. Not differentiable: for hand-written backwards.
pub fn matmul_f32(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    apply(a, b, None, true)
}

/// [`matmul`] with b also given packed ([`cpu_gemm::PackedB::new`] of exactly b's values, which
/// the caller guarantees): the CPU products that would pack b read the panels instead. The
/// result and the backward are [`matmul`]'s.
pub fn matmul_prepacked(a: &Tensor, b: &Tensor, packed: &Arc<cpu_gemm::PackedB>) -> Result<Tensor> {
    apply(a, b, Some(packed.clone()), false)
}

/// [`matmul`] (or with `widen`, [`matmul_f32`]) with the CUDA library chosen by the caller
/// (parity tests and benchmarks compare them in one process); no effect elsewhere.
pub fn matmul_with(backend: GemmBackend, a: &Tensor, b: &Tensor, widen: bool) -> Result<Tensor> {
    apply_with(a, b, None, widen, Some(backend))
}

fn apply(a: &Tensor, b: &Tensor, packed: Option<Arc<cpu_gemm::PackedB>>, widen: bool) -> Result<Tensor> {
    apply_with(a, b, packed, widen, None)
}

fn apply_with(
    a: &Tensor,
    b: &Tensor,
    packed: Option<Arc<cpu_gemm::PackedB>>,
    widen: bool,
    backend: Option<GemmBackend>,
) -> Result<Tensor> {
    if a.dtype() != b.dtype() {
        bail!("matmul: operands are {:?} and {:?}", a.dtype(), b.dtype());
    }
    let op = Matmul { packed, widen, backend };
    if a.rank() > 2 && rows_view(a.layout()).is_err() {
        return a.contiguous()?.apply_op2(b, op);
    }
    a.apply_op2(b, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, randn};
    use candle_core::{Device, Var};

    /// Forward and both gradients against candle's matmul, in f32 and bf16, with the weight
    /// given transposed (x·Wᵀ, as the projections call it).
    #[test]
    fn forward_and_gradients_match_candle() {
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(&randn(&[5, 70], 1).to_dtype(dtype).unwrap()).unwrap();
            let w = Var::from_tensor(&randn(&[33, 70], 2).to_dtype(dtype).unwrap()).unwrap();
            let probe = randn(&[5, 33], 3);
            let loss = |y: Tensor| (y.to_dtype(DType::F32).unwrap() * &probe).unwrap().sum_all().unwrap();
            let ours = matmul(x.as_tensor(), &w.as_tensor().t().unwrap()).unwrap();
            let theirs = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
            let tol = if dtype == DType::F32 { 1e-5 } else { 5e-2 };
            assert!(max_diff(&ours, &theirs) <= tol, "{dtype:?} forward");
            let (g1, g2) = (loss(ours).backward().unwrap(), loss(theirs).backward().unwrap());
            for v in [&x, &w] {
                let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(max_diff(a, b) <= tol * 4.0, "{dtype:?} gradient");
            }
        }
    }

    /// Through a pre-packed weight: the same bits as packing per product, f32 and bf16, 3-D
    /// activations; a product with too few rows (or another dtype) ignores the panels.
    #[test]
    fn prepacked_weight_gives_the_same_bits() {
        use cpu_gemm::{MatRef, PackedB};
        for dtype in [DType::F32, DType::BF16] {
            let x = randn(&[2, 9, 70], 1).to_dtype(dtype).unwrap();
            let w = randn(&[53, 70], 2).to_dtype(dtype).unwrap(); // [out, in]
            let packed = match dtype {
                DType::F32 if cpu_gemm::f32_available() => {
                    let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    PackedB::new(MatRef { data: &v, rows: 53, cols: 70, rs: 70, cs: 1 }.t()).unwrap()
                }
                DType::BF16 if cpu_gemm::bf16_available() => {
                    let v = w.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
                    PackedB::new(MatRef { data: &v, rows: 53, cols: 70, rs: 70, cs: 1 }.t()).unwrap()
                }
                _ => continue,
            };
            let packed = Arc::new(packed);
            let wt = w.t().unwrap();
            for x in [x.clone(), x.narrow(1, 0, 1).unwrap()] {
                let a = matmul_prepacked(&x, &wt, &packed).unwrap().to_dtype(DType::F32).unwrap();
                let b = matmul(&x, &wt).unwrap().to_dtype(DType::F32).unwrap();
                assert_eq!(max_diff(&a, &b), 0.0, "{dtype:?} {:?}", x.shape());
            }
        }
    }

    /// A frozen operand gets no gradient (nothing computed for it); the trained one still does.
    #[test]
    fn frozen_operand_gets_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&randn(&[4, 8], 1)).unwrap();
        let frozen = randn(&[6, 8], 2);
        let y = matmul(x.as_tensor(), &frozen.t().unwrap()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&frozen).is_none());
        let want = Tensor::ones((4, 6), DType::F32, &dev).unwrap().matmul(&frozen).unwrap();
        assert!(max_diff(grads.get(x.as_tensor()).unwrap(), &want) < 1e-5);
    }

    /// A [B, T, K] operand, contiguous or a transposed view, equals the 2-D product of its rows.
    #[test]
    fn batched_rows_match_the_2d_product() {
        let w = Var::from_tensor(&randn(&[6, 8], 2)).unwrap();
        for x in [randn(&[2, 5, 8], 1), randn(&[5, 2, 8], 3).transpose(0, 1).unwrap()] {
            let x = Var::from_tensor(&x).unwrap();
            let y = matmul(x.as_tensor(), &w.as_tensor().t().unwrap()).unwrap();
            assert_eq!(y.dims(), &[2, 5, 6]);
            let x2 = x.as_tensor().contiguous().unwrap().reshape((10, 8)).unwrap();
            let want = x2.matmul(&w.as_tensor().t().unwrap()).unwrap().reshape((2, 5, 6)).unwrap();
            assert!(max_diff(&y, &want) < 1e-5);
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g = (&y * 2.0).unwrap().reshape((10, 6)).unwrap();
            let want_dw = g.t().unwrap().matmul(&x2).unwrap();
            assert!(max_diff(grads.get(w.as_tensor()).unwrap(), &want_dw) < 1e-4);
            let want_dx = g.matmul(w.as_tensor()).unwrap().reshape((2, 5, 8)).unwrap();
            assert!(max_diff(grads.get(x.as_tensor()).unwrap(), &want_dx) < 1e-4);
        }
    }

    #[test]
    fn gemm_backends_are_named_as_the_variable_spells_them() {
        for b in GemmBackend::ALL {
            assert_eq!(GemmBackend::named(b.name()).unwrap(), b);
        }
        let err = GemmBackend::named("cutlass").unwrap_err().to_string();
        assert!(err.contains("\"cutlass\"") && err.contains("candle, cublas, cublaslt"), "{err}");
        // On the CPU every library is the CPU's product.
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let want = a.matmul(&a.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for b in GemmBackend::ALL {
            let got = matmul_with(b, &a, &a.t().unwrap(), false).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(got, want, "{b:?}");
        }
    }

    /// [A, B, 1, K] permuted to [B, 1, A, K] (strides [K, K, B·K, 1]): the leading dims do not
    /// merge into evenly spaced rows, which the size-1 dim used to hide (the product then read
    /// the wrong rows, and past the buffer). Such a view is copied first, as any other that does
    /// not merge.
    #[test]
    fn a_size_one_dim_does_not_hide_rows_that_do_not_merge() {
        let (a, b, k, n) = (3, 2, 8, 5);
        let x = randn(&[a, b, 1, k], 1).permute((1, 2, 0, 3)).unwrap();
        assert!(rows_view(x.layout()).is_err(), "strides {:?}", x.stride());
        let w = randn(&[n, k], 2);
        let got = matmul(&x, &w.t().unwrap()).unwrap();
        let want =
            x.contiguous().unwrap().matmul(&w.t().unwrap().broadcast_as((b, 1, k, n)).unwrap()).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        // Size-1 dims around a mergeable run still give one view, without a copy.
        let y = randn(&[1, 4, 1, 3, k], 3);
        let v = rows_view(y.layout()).unwrap();
        assert_eq!((v.dims(), v.stride()), (&[12, k][..], &[k, 1][..]));
    }

    #[test]
    fn mismatched_shapes_are_named() {
        let err = matmul(&randn(&[2, 3], 1), &randn(&[4, 5], 2)).unwrap_err();
        assert!(err.to_string().contains("inner dimensions"), "{err}");
    }
}
