//! A CPU bf16 GEMM on AVX512-BF16 (`vdpbf16ps`), and the candle op that puts it under `Proj`.
//!
//! Why hand-written: no maintained Rust crate has a CPU bf16 GEMM (`gemm` covers f16/f32/f64;
//! candle's CPU matmul widens bf16 operands to f32 on every call), and `vdpbf16ps` does two
//! bf16 products per f32 lane per instruction: twice the rate of the f32 FMA path.
//!
//! Shapes and layout: `C [M, N] (f32, row-major) = A [M, K] · B [K, N]`, A and B bf16 given as
//! strided views (element (i, j) at `data[i·rs + j·cs]`), so the transposes the model and its
//! backward need — x·Wᵀ, dy·W, dyᵀ·x — are only strides, and any M, N, K (odd edges included)
//! works. Operands are packed into k-pair-interleaved panels, the layout `vdpbf16ps` consumes:
//! - A panel (MR rows): `[K/2][MR]` u32, each u32 the pair (A[i, 2p], A[i, 2p+1]), low half even;
//! - B panel (NR cols): `[K/2][NR]` u32 pairs (B[2p, j], B[2p+1, j]): one zmm per 16 columns;
//!
//! zero-padded to MR rows, NR columns and an even K. The MR×NR = 8×48 microkernel keeps 24 zmm
//! accumulators; per k-pair it loads 3 B vectors and broadcasts 8 A pairs. Blocking: K in blocks
//! of ≤ KC (a B micro-panel stays in L2), M in blocks of ≤ MC (packed A stays in L2); rayon runs
//! (M-chunk, N-chunk) tasks, each packing its B micro-panels one at a time. When M is tiny (decode) and both
//! operands are K-contiguous (x·Wᵀ), a packing-free dot-product kernel reads W once instead.
//!
//! Numerics: bf16×bf16 products are exact in f32 and accumulate in f32, as in the widened f32
//! path, up to summation order. bf16 outputs are rounded to nearest even.
//!
//! Only x86-64 with `avx512f`, `avx512bw` and `avx512bf16` (detected at run time: [`available`]);
//! everywhere else callers keep the widened f32 path.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Microkernel rows.
const MR: usize = 8;
/// Microkernel columns (3 zmm of 16 f32).
const NR: usize = 48;
/// Largest K block (even): a packed B micro-panel is KC·NR·2 bytes = 96 KiB, L2-resident (the
/// microkernel needs 192 bytes of B per 24 `vdpbf16ps`, far below L2 bandwidth), and few K
/// blocks keep C's read-modify-write passes few.
const KC: usize = 1024;
/// Largest M block: packed A for one K block is MC·KC·2 bytes = 512 KiB.
const MC: usize = 256;
/// Up to this many rows, x·Wᵀ runs the packing-free dot-product kernel.
const DOT_MAX_M: usize = 4;

/// A strided bf16 matrix view: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// The elements (the view may skip some).
    pub data: &'a [bf16],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride, in elements.
    pub rs: usize,
    /// Column stride, in elements.
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    fn check(&self, what: &str) -> Result<()> {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            if last >= self.data.len() {
                bail!(
                    "bf16-gemm: {what} view [{}, {}] overruns its {} elements",
                    self.rows,
                    self.cols,
                    self.data.len()
                );
            }
        }
        Ok(())
    }
}

/// Whether this CPU runs the bf16 kernels (x86-64 with AVX512-F/BW/BF16), detected once.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("SHARDSMITH_NO_BF16_GEMM").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A raw pointer to C that tasks writing disjoint tiles may share.
#[derive(Clone, Copy)]
struct CPtr(*mut f32);
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

impl CPtr {
    /// Through a method, so closures capture the whole (Sync) wrapper, not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `C = A · B` with C [M, N] f32 row-major (overwritten). Errors when the CPU lacks the kernels
/// or the shapes disagree.
pub fn gemm(a: MatRef, b: MatRef, c: &mut [f32]) -> Result<()> {
    if !available() {
        bail!("bf16-gemm: this CPU has no avx512_bf16");
    }
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || c.len() != m * n {
        bail!("bf16-gemm: A [{m}, {k}] · B [{}, {n}] into {} elements", b.rows, c.len());
    }
    a.check("A")?;
    b.check("B")?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        c.fill(0.0);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        if m <= DOT_MAX_M && a.cs == 1 && b.rs == 1 {
            dot_gemm(a, b, c);
        } else {
            packed_gemm(a, b, c);
        }
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("available() is false off x86-64")
}

/// `A · B` rounded to bf16 (nearest even), row-major [M, N].
pub fn gemm_bf16(a: MatRef, b: MatRef) -> Result<Vec<bf16>> {
    let mut c = vec![0f32; a.rows * b.cols];
    gemm(a, b, &mut c)?;
    Ok(round_bf16(&c))
}

/// f32 → bf16, round to nearest even (NaN stays NaN), vectorisable and in parallel.
pub fn round_bf16(c: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; c.len()];
    out.par_chunks_mut(1 << 14).zip(c.par_chunks(1 << 14)).for_each(|(o, c)| {
        for (o, &x) in o.iter_mut().zip(c) {
            let bits = x.to_bits();
            let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
            *o = bf16::from_bits(if x.is_nan() { (bits >> 16) as u16 | 0x40 } else { rounded });
        }
    });
    out
}

/// The k-pair (M[r, k0], M[r, k0+1]) of a view whose K index is `kdim` (0: rows, 1: columns),
/// as one u32 (low half even), 0 past K.
#[inline(always)]
fn pair(v: &MatRef, r: usize, k0: usize, k: usize, kstride: usize, rstride: usize) -> u32 {
    let base = r * rstride + k0 * kstride;
    let lo = v.data[base].to_bits() as u32;
    let hi = if k0 + 1 < k { v.data[base + kstride].to_bits() as u32 } else { 0 };
    lo | (hi << 16)
}

/// Pack rows `i0..i0+rows` × k-pairs `p0..p0+kp` of A into MR-row panels `[kp][MR]` u32.
fn pack_a(a: &MatRef, i0: usize, rows: usize, p0: usize, kp: usize, out: &mut [u32]) {
    let k = a.cols;
    out.par_chunks_mut(kp * MR).enumerate().for_each(|(blk, panel)| {
        let r0 = i0 + blk * MR;
        let live = MR.min(i0 + rows - r0);
        if live < MR {
            panel.fill(0);
        }
        // Row by row: with K contiguous (x, dy) each row is a sequential read.
        for r in 0..live {
            for p in 0..kp {
                panel[p * MR + r] = pair(a, r0 + r, 2 * (p0 + p), k, a.cs, a.rs);
            }
        }
    });
}

/// Pack columns `j0..j0+cols` × k-pairs `p0..p0+kp` of B into NR-column panels `[kp][NR][2]`.
fn pack_b(b: &MatRef, j0: usize, cols: usize, p0: usize, kp: usize, out: &mut [u32]) {
    let k = b.rows;
    for (blk, panel) in out.chunks_exact_mut(kp * NR).enumerate() {
        let c0 = j0 + blk * NR;
        let live = NR.min(j0 + cols - c0);
        if live < NR {
            panel.fill(0);
        }
        if b.rs == 1 {
            // K contiguous (Wᵀ: W's rows): whole pairs as u32 reads, one column at a time.
            let full = (k - 2 * p0).min(2 * kp) / 2; // pairs with both halves inside K
            for c in 0..live {
                let col = &b.data[(c0 + c) * b.cs + 2 * p0..];
                let src = &col[..2 * full];
                for (p, two) in src.chunks_exact(2).enumerate() {
                    panel[p * NR + c] = two[0].to_bits() as u32 | (two[1].to_bits() as u32) << 16;
                }
                if full < kp {
                    panel[full * NR + c] = pair(b, c0 + c, 2 * (p0 + full), k, b.rs, b.cs);
                }
            }
        } else {
            for p in 0..kp {
                for c in 0..live {
                    panel[p * NR + c] = pair(b, c0 + c, 2 * (p0 + p), k, b.rs, b.cs);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn packed_gemm(a: MatRef, b: MatRef, c: &mut [f32]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let pairs = k.div_ceil(2);
    // Equal K blocks of at most KC/2 pairs.
    let kblocks = pairs.div_ceil(KC / 2);
    let kcp = pairs.div_ceil(kblocks);
    let threads = rayon::current_num_threads().max(1);
    let n_panels = n.div_ceil(NR);
    let mut a_pack = vec![0u32; MC.min(m.div_ceil(MR) * MR) * kcp];
    let cptr = CPtr(c.as_mut_ptr());
    for i0 in (0..m).step_by(MC) {
        let rows = MC.min(m - i0);
        let m_panels = rows.div_ceil(MR);
        for kb in 0..kblocks {
            let p0 = kb * kcp;
            let kp = kcp.min(pairs - p0);
            let a_pack = &mut a_pack[..m_panels * MR * kp];
            pack_a(&a, i0, rows, p0, kp, a_pack);
            let a_pack = &*a_pack;
            // Tasks: N chunks (each packs its B chunk), a few per thread; M split too when N is
            // too narrow to feed the threads.
            let n_chunks = n_panels.min(4 * threads);
            let m_chunks =
                if n_chunks >= 2 * threads { 1 } else { m_panels.min((2 * threads).div_ceil(n_chunks)) };
            let per_n = n_panels.div_ceil(n_chunks);
            let per_m = m_panels.div_ceil(m_chunks);
            let accumulate = kb > 0;
            (0..n_chunks * m_chunks).into_par_iter().for_each(|task| {
                let (nc, mc) = (task / m_chunks, task % m_chunks);
                let (pn0, pn1) = (nc * per_n, ((nc + 1) * per_n).min(n_panels));
                let (pm0, pm1) = (mc * per_m, ((mc + 1) * per_m).min(m_panels));
                if pn0 >= pn1 || pm0 >= pm1 {
                    return;
                }
                // One B micro-panel at a time, used against every A panel while it is hot.
                let mut bp = vec![0u32; kp * NR];
                for pn in pn0..pn1 {
                    let jc = pn * NR;
                    let ncols = NR.min(n - jc);
                    pack_b(&b, jc, ncols, p0, kp, &mut bp);
                    for ip in pm0..pm1 {
                        let ic = i0 + ip * MR;
                        let nrows = MR.min(m - ic);
                        let ap = &a_pack[ip * MR * kp..(ip + 1) * MR * kp];
                        // SAFETY: `available()` checked the CPU; tasks write disjoint tiles of C
                        // (rows ic..ic+nrows < m, columns jc..jc+ncols < n); panels hold kp pairs.
                        unsafe {
                            kernel(
                                kp,
                                ap.as_ptr(),
                                bp.as_ptr(),
                                cptr.get().add(ic * n + jc),
                                n,
                                nrows,
                                ncols,
                                accumulate,
                            );
                        }
                    }
                }
            });
        }
    }
}

/// One MR×NR tile: `C[..rows, ..cols] (+)= Apanel · Bpanel` over `kp` k-pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 3]; MR];
    for p in 0..kp {
        let bp = b.add(p * NR);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16) as *const _));
        let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(32) as *const _));
        let ap = a.add(p * MR);
        for (r, acc) in acc.iter_mut().enumerate() {
            let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], ar, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], ar, b1);
            acc[2] = _mm512_dpbf16_ps(acc[2], ar, b2);
        }
    }
    let masks: [__mmask16; 3] = std::array::from_fn(|v| {
        let live = cols.saturating_sub(16 * v).min(16);
        ((1u32 << live) - 1) as __mmask16
    });
    for (r, acc) in acc.iter().enumerate().take(rows) {
        let row = c.add(r * ldc);
        for v in 0..3 {
            let ptr = row.add(16 * v);
            let mut x = acc[v];
            if masks[v] == 0xffff {
                if accumulate {
                    x = _mm512_add_ps(x, _mm512_loadu_ps(ptr));
                }
                _mm512_storeu_ps(ptr, x);
            } else if masks[v] != 0 {
                if accumulate {
                    x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(masks[v], ptr));
                }
                _mm512_mask_storeu_ps(ptr, masks[v], x);
            }
        }
    }
}

/// Small M with K-contiguous rows of A and columns of B (x·Wᵀ in decode): dot products straight
/// from the operands, B read once, columns split across threads.
#[cfg(target_arch = "x86_64")]
fn dot_gemm(a: MatRef, b: MatRef, c: &mut [f32]) {
    let (m, n) = (a.rows, b.cols);
    let cptr = CPtr(c.as_mut_ptr());
    let chunk = 64;
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|blk| {
        let (j0, j1) = (blk * chunk, ((blk + 1) * chunk).min(n));
        // SAFETY: `available()` checked the CPU; `check` bounded every row/column read; each
        // task writes its own columns.
        unsafe { dot_columns(&a, &b, j0, j1, cptr.get(), n, m) }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_columns(a: &MatRef, b: &MatRef, j0: usize, j1: usize, c: *mut f32, ldc: usize, m: usize) {
    use std::arch::x86_64::*;
    let k = a.cols;
    let tail = k % 32;
    let tmask: __mmask32 = if tail == 0 { 0 } else { (1u32 << tail) - 1 };
    let (ap, bp) = (a.data.as_ptr() as *const u16, b.data.as_ptr() as *const u16);
    for j in j0..j1 {
        let col = bp.add(j * b.cs);
        let mut acc = [_mm512_setzero_ps(); DOT_MAX_M];
        let mut kk = 0;
        while kk + 32 <= k {
            let bv: __m512bh = std::mem::transmute(_mm512_loadu_si512(col.add(kk) as *const _));
            for (i, acc) in acc.iter_mut().enumerate().take(m) {
                let av: __m512bh = std::mem::transmute(_mm512_loadu_si512(ap.add(i * a.rs + kk) as *const _));
                *acc = _mm512_dpbf16_ps(*acc, av, bv);
            }
            kk += 32;
        }
        if tail != 0 {
            let bv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(tmask, col.add(kk) as *const _));
            for (i, acc) in acc.iter_mut().enumerate().take(m) {
                let av: __m512bh =
                    std::mem::transmute(_mm512_maskz_loadu_epi16(tmask, ap.add(i * a.rs + kk) as *const _));
                *acc = _mm512_dpbf16_ps(*acc, av, bv);
            }
        }
        for (i, acc) in acc.iter().enumerate().take(m) {
            *c.add(i * ldc + j) = _mm512_reduce_add_ps(*acc);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The candle op
// ---------------------------------------------------------------------------------------------

/// The 2-D strided view of a bf16 storage.
fn view<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<MatRef<'a>> {
    let CpuStorage::BF16(v) = s else { bail!("bf16-matmul: {what} is {:?}, not bf16", s.dtype()) };
    let (rows, cols) = l.shape().dims2()?;
    let (rs, cs) = match l.stride() {
        [rs, cs] => (*rs, *cs),
        other => bail!("bf16-matmul: {what} has strides {other:?}"),
    };
    let data = &v[l.start_offset()..];
    Ok(MatRef { data, rows, cols, rs, cs })
}

struct Bf16Matmul;

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    /// a [M, K], b [K, N] (any 2-D strides) → a·b [M, N] bf16, accumulated in f32.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (view(s1, l1, "a")?, view(s2, l2, "b")?);
        let out = gemm_bf16(a, b)?;
        Ok((CpuStorage::BF16(out), Shape::from((a.rows, b.cols))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // da = g·bᵀ, db = aᵀ·g: the same GEMM over transposed views (strides only).
        let g = g.to_dtype(DType::BF16)?;
        Ok((Some(matmul(&g, &b.t()?)?), Some(matmul(&a.t()?, &g)?)))
    }
}

/// `a [M, K] · b [K, N]` for bf16 CPU tensors through the AVX512-BF16 GEMM (transposed views
/// cost nothing), differentiable in both. Callers check [`available`] first.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() != DType::BF16 || b.dtype() != DType::BF16 || !a.device().is_cpu() {
        bail!("bf16-matmul: needs bf16 CPU tensors, got {:?} and {:?}", a.dtype(), b.dtype());
    }
    a.apply_op2(b, Bf16Matmul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn values(n: usize, seed: u64) -> Vec<bf16> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect()
    }

    /// f64 reference of C = op(A)·op(B), with A stored [M, K] or [K, M] and B [K, N] or [N, K].
    fn check(m: usize, n: usize, k: usize, ta: bool, tb: bool, seed: u64) {
        let (av, bv) = (values(m * k, seed), values(k * n, seed ^ 0x55));
        let a = if ta {
            MatRef { data: &av, rows: k, cols: m, rs: m, cs: 1 }.t()
        } else {
            MatRef { data: &av, rows: m, cols: k, rs: k, cs: 1 }
        };
        let b = if tb {
            MatRef { data: &bv, rows: n, cols: k, rs: k, cs: 1 }.t()
        } else {
            MatRef { data: &bv, rows: k, cols: n, rs: n, cs: 1 }
        };
        let mut c = vec![f32::NAN; m * n];
        gemm(a, b, &mut c).unwrap();
        for i in 0..m {
            for j in 0..n {
                let (mut want, mut mag) = (0f64, 0f64);
                for p in 0..k {
                    let x = a.data[i * a.rs + p * a.cs].to_f64() * b.data[p * b.rs + j * b.cs].to_f64();
                    want += x;
                    mag += x.abs();
                }
                let got = c[i * n + j] as f64;
                // f32 accumulation of exact products: error ≤ ~K·2⁻²⁴·Σ|x|.
                let tol = 1e-6 + (k as f64 + 2.0) * 6e-8 * mag;
                assert!(
                    (got - want).abs() <= tol,
                    "[{m}x{k}]·[{k}x{n}] ta={ta} tb={tb} at ({i},{j}): {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn edges_and_transposes() {
        if !available() {
            eprintln!("skipped: no avx512_bf16");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 7, 3),
            (3, 48, 64),
            (8, 49, 257),
            (9, 95, 513),
            (17, 130, 1),
            (600, 50, 40),
            (10, 50, 2101),
            (300, 60, 2049),
        ] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                check(m, n, k, ta, tb, (m * 31 + n * 7 + k) as u64);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_f64_reference(m in 1usize..70, n in 1usize..120, k in 1usize..600, ta: bool, tb: bool, seed: u64) {
            if available() {
                check(m, n, k, ta, tb, seed);
            }
        }
    }

    #[test]
    fn op_forward_and_gradients_match_widened_f32() {
        if !available() {
            eprintln!("skipped: no avx512_bf16");
            return;
        }
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        let x = Var::from_vec(values(5 * 70, 1), (5, 70), &dev).unwrap();
        let w = Var::from_vec(values(33 * 70, 2), (33, 70), &dev).unwrap();
        let probe = Tensor::from_vec(values(5 * 33, 3), (5, 33), &dev).unwrap();
        let y = matmul(x.as_tensor(), &w.as_tensor().t().unwrap()).unwrap();
        let grads = (y.to_dtype(DType::F32).unwrap() * probe.to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (xf, wf, pf) = (f(x.as_tensor()), f(w.as_tensor()), f(&probe));
        let close = |got: &Tensor, want: Tensor| {
            let want = want.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
            let d = (f(got) - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let scale =
                want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() <= scale * 1e-2, "{d} vs scale {scale}");
        };
        close(&y, xf.matmul(&wf.t().unwrap()).unwrap());
        close(grads.get(&x).unwrap(), pf.matmul(&wf).unwrap());
        close(grads.get(&w).unwrap(), pf.t().unwrap().matmul(&xf).unwrap());
    }
}
