//! CPU GEMMs on AVX-512 for the model's projections, which [`super::matmul`] runs: bf16 on
//! AVX512-BF16 (`vdpbf16ps`) and f32 on AVX512-F (`vfmadd231ps`).
//!
//! Why hand-written: no maintained Rust crate has a CPU bf16 GEMM (`gemm` covers f16/f32/f64;
//! candle's CPU matmul widens bf16 operands to f32 on every call), and `vdpbf16ps` does two
//! bf16 products per f32 lane per instruction: twice the rate of the f32 FMA path. For f32 the
//! `gemm` crate (candle's CPU matmul) is fast when B is row-major but runs at 40–50 % of that
//! when B is a transposed view with K > N — x·Wᵀ for `o_proj` and `down_proj` (measured 2 threads,
//! M = 256: 79 vs 208 GFLOP/s for K 2048 × N 768); packing makes every layout the same speed.
//!
//! Shapes and layout: `C [M, N] (f32, row-major) = A [M, K] · B [K, N]`, A and B given as
//! strided views (element (i, j) at `data[i·rs + j·cs]`), so the transposes the model and its
//! backward need — x·Wᵀ, dy·W, dyᵀ·x — are only strides, and any M, N, K (odd edges included)
//! works. Operands are packed into panels of 32-bit *units*, each holding `Element::KU`
//! consecutive k values of one row or column (bf16: the k-pair `vdpbf16ps` consumes, low half
//! even; f32: one value):
//! - A panel (MR rows): `[K/KU][MR]` units;
//! - B panel (NR cols): `[K/KU][NR]` units: one zmm per 16 columns;
//!
//! zero-padded to MR rows, NR columns and whole units. The MR×NR = 8×48 microkernel keeps 24 zmm
//! accumulators; per unit it loads 3 B vectors and broadcasts 8 A units. Blocking: K in blocks
//! of ≤ KCU units (a B micro-panel, 96 KiB, stays in L2), M in blocks of ≤ MC (packed A stays in
//! L2); the threads run (M-chunk, N-chunk) tasks, each packing its B micro-panels one at a time. When
//! M is tiny (bf16 decode) and both operands are K-contiguous (x·Wᵀ), a packing-free
//! dot-product kernel reads W once instead.
//!
//! Numerics: bf16×bf16 products are exact in f32 and accumulate in f32, as in the widened f32
//! path, up to summation order; bf16 outputs are rounded to nearest even. f32 accumulates in
//! f32 by FMA. Each C tile is summed by one task in a fixed order: results do not depend on the
//! thread count.
//!
//! Only x86-64 with AVX-512 (detected at run time: [`bf16_available`], [`f32_available`]);
//! everywhere else callers keep candle's matmul.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result};
use half::bf16;
use std::mem::MaybeUninit;

/// Microkernel rows.
const MR: usize = 8;
/// Microkernel columns (3 zmm of 16 f32).
const NR: usize = 48;
/// Largest K block, in units: a packed B micro-panel is KCU·NR·4 bytes = 96 KiB, L2-resident
/// (the microkernel needs 192 bytes of B per 24 multiply-adds, far below L2 bandwidth), and few
/// K blocks keep C's read-modify-write passes few.
const KCU: usize = 512;
/// Largest M block: packed A for one K block is MC·KCU·4 bytes = 512 KiB.
const MC: usize = 256;
/// Up to this many rows, bf16 x·Wᵀ runs the packing-free dot-product kernel.
pub(crate) const DOT_MAX_M: usize = 4;

/// A strided matrix view: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    /// The elements (the view may skip some).
    pub data: &'a [T],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride, in elements.
    pub rs: usize,
    /// Column stride, in elements.
    pub cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    fn check(&self, what: &str) -> Result<()> {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            if last >= self.data.len() {
                bail!(
                    "cpu-gemm: {what} view [{}, {}] overruns its {} elements",
                    self.rows,
                    self.cols,
                    self.data.len()
                );
            }
        }
        Ok(())
    }
}

/// A microkernel: `C[..rows, ..cols] (+)= Apanel · Bpanel` over `ku` units (args: ku, A panel,
/// B panel, C, ldc, rows, cols, accumulate).
///
/// # Safety
/// The CPU has the kernel's features; the panels hold `ku` units; C has `rows` rows of `cols`
/// writable elements `ldc` apart.
type Kernel = unsafe fn(usize, *const u32, *const u32, *mut f32, usize, usize, usize, bool);

/// Off x86-64 there are no kernels, and the public entries refuse before reaching one.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_bf16(
    _: usize,
    _: *const u32,
    _: *const u32,
    _: *mut f32,
    _: usize,
    _: usize,
    _: usize,
    _: bool,
) {
    unreachable!("no packed GEMM off x86-64")
}
#[cfg(not(target_arch = "x86_64"))]
use kernel_bf16 as kernel_f32;

/// An element type of the packed GEMM: how k values pack into 32-bit units, and the microkernel.
trait Element: Copy + Send + Sync + 'static {
    /// Consecutive k values per packed unit.
    const KU: usize;

    /// The unit of `v`'s row or column `r` (along the non-K dimension, stride `rstride`) that
    /// starts at k index `k0` (stride `kstride`), zero past `k`.
    fn unit(v: &MatRef<Self>, r: usize, k0: usize, k: usize, kstride: usize, rstride: usize) -> u32;

    /// One unit from `KU` contiguous k values (all inside K).
    fn unit_of(values: &[Self]) -> u32;

    /// Units of `live` consecutive columns from K-rows `rows[0..KU]` (a row past K is `None`:
    /// zeros), into `dst[..live]`.
    fn units_of_rows(rows: [Option<&[Self]>; 2], dst: &mut [u32]);

    /// The microkernel for this element type.
    const KERNEL: Kernel;

    /// Run the product on a packing-free path instead, where one applies (returns whether it
    /// did); C as in [`gemm_into`].
    fn dot_product(_a: &MatRef<Self>, _b: &MatRef<Self>, _c: &mut [MaybeUninit<f32>]) -> bool {
        false
    }
}

impl Element for bf16 {
    const KU: usize = 2;

    #[inline(always)]
    fn unit(v: &MatRef<bf16>, r: usize, k0: usize, k: usize, kstride: usize, rstride: usize) -> u32 {
        let base = r * rstride + k0 * kstride;
        let lo = v.data[base].to_bits() as u32;
        let hi = if k0 + 1 < k { v.data[base + kstride].to_bits() as u32 } else { 0 };
        lo | (hi << 16)
    }

    #[inline(always)]
    fn unit_of(values: &[bf16]) -> u32 {
        values[0].to_bits() as u32 | (values[1].to_bits() as u32) << 16
    }

    fn units_of_rows(rows: [Option<&[bf16]>; 2], dst: &mut [u32]) {
        let lo = rows[0].expect("the first row of a unit is inside K");
        match rows[1] {
            Some(hi) => {
                for ((d, l), h) in dst.iter_mut().zip(lo).zip(hi) {
                    *d = l.to_bits() as u32 | (h.to_bits() as u32) << 16;
                }
            }
            None => {
                for (d, l) in dst.iter_mut().zip(lo) {
                    *d = l.to_bits() as u32;
                }
            }
        }
    }

    const KERNEL: Kernel = kernel_bf16;

    /// A few rows with K-contiguous rows of A and columns of B (x·Wᵀ in decode): [`dot_gemm`].
    fn dot_product(a: &MatRef<bf16>, b: &MatRef<bf16>, c: &mut [MaybeUninit<f32>]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if a.rows <= DOT_MAX_M && a.cs == 1 && b.rs == 1 {
            dot_gemm(*a, *b, c);
            return true;
        }
        let _ = (a, b, c);
        false
    }
}

impl Element for f32 {
    const KU: usize = 1;

    #[inline(always)]
    fn unit(v: &MatRef<f32>, r: usize, k0: usize, _k: usize, kstride: usize, rstride: usize) -> u32 {
        v.data[r * rstride + k0 * kstride].to_bits()
    }

    #[inline(always)]
    fn unit_of(values: &[f32]) -> u32 {
        values[0].to_bits()
    }

    fn units_of_rows(rows: [Option<&[f32]>; 2], dst: &mut [u32]) {
        let row = rows[0].expect("the row of a unit is inside K");
        for (d, x) in dst.iter_mut().zip(row) {
            *d = x.to_bits();
        }
    }

    const KERNEL: Kernel = kernel_f32;
}

/// Whether this CPU runs the bf16 kernels (x86-64 with AVX512-F/BW/BF16), detected once.
/// `SHARDSMITH_NO_BF16_GEMM=1` turns them off (the widened f32 path instead).
pub fn bf16_available() -> bool {
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

/// Whether this CPU runs the f32 kernel (x86-64 with AVX512-F), detected once.
/// `SHARDSMITH_NO_F32_GEMM=1` turns it off (candle's matmul instead).
pub fn f32_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("SHARDSMITH_NO_F32_GEMM").is_none() && is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

use super::par::{chunks_mut, for_each as parallel_for, threads as pool_threads, with_scratch, SendPtr};

/// `c` as memory a product writes: every product here stores each element of C before it reads
/// any (the first K block stores, later blocks add to what it stored), so C may start
/// uninitialised ([`gemm_new`]).
fn as_out(c: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and only initialised f32 are written through it.
    unsafe { &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// The checks and dispatch of every pool-threaded entry: the CPU has the kernel, shapes agree,
/// views stay inside their data; the empty cases (K = 0 zeroes C); the dot-product kernel for a
/// bf16 x·Wᵀ of a few rows; else the packed product.
fn gemm_into<T: PackElement>(a: MatRef<T>, b: BSource<T>, c: &mut [MaybeUninit<f32>]) -> Result<()> {
    require_kernel(T::KIND)?;
    let (m, k, n) = (a.rows, a.cols, b.cols());
    match &b {
        BSource::View(b) => {
            if b.rows != k || c.len() != m * n {
                bail!("cpu-gemm: A [{m}, {k}] · B [{}, {n}] into {} elements", b.rows, c.len());
            }
            b.check("B")?;
        }
        BSource::Packed(p) => {
            if p.kind != T::KIND {
                bail!("cpu-gemm: B was packed as {:?}, A is {:?}", p.kind, T::KIND);
            }
            if p.k != k || c.len() != m * n {
                bail!("cpu-gemm: A [{m}, {k}] · packed B [{}, {n}] into {} elements", p.k, c.len());
            }
        }
    }
    a.check("A")?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        c.fill(MaybeUninit::new(0.0));
        return Ok(());
    }
    if let BSource::View(bv) = &b {
        if T::dot_product(&a, bv, c) {
            return Ok(());
        }
    }
    packed_gemm(a, b, c, Threads::Pool, false);
    Ok(())
}

/// bf16 `C = A · B` with C [M, N] f32 row-major (overwritten). Errors when the CPU lacks the
/// kernels or the shapes disagree.
pub fn gemm(a: MatRef<bf16>, b: MatRef<bf16>, c: &mut [f32]) -> Result<()> {
    gemm_into(a, BSource::View(b), as_out(c))
}

/// f32 `C = A · B` with C [M, N] row-major (overwritten). Errors when the CPU lacks AVX512-F or
/// the shapes disagree.
pub fn gemm_f32(a: MatRef<f32>, b: MatRef<f32>, c: &mut [f32]) -> Result<()> {
    gemm_into(a, BSource::View(b), as_out(c))
}

/// `C = A · B` against a B packed beforehand ([`PackedB::new`]), with C [M, N] f32 row-major
/// (overwritten): the same sums as [`gemm()`] / [`gemm_f32`], without packing B.
pub fn gemm_prepacked<T: PackElement>(a: MatRef<T>, b: &PackedB, c: &mut [f32]) -> Result<()> {
    gemm_into(a, BSource::Packed(b), as_out(c))
}

/// `A · B` as a new f32 row-major [M, N] (B a view, or packed beforehand). The output is not
/// zero-filled first (every element is written before it is read): zeroing each product's
/// output — calloc's memset once the heap recycles — was a tenth of a bf16 train step.
pub fn gemm_new<T: PackElement>(a: MatRef<T>, b: BSource<T>) -> Result<Vec<f32>> {
    let len = a.rows * b.cols();
    let mut c = Vec::with_capacity(len);
    gemm_into(a, b, &mut c.spare_capacity_mut()[..len])?;
    // SAFETY: `gemm_into` returned Ok, so it wrote all `len` elements.
    unsafe { c.set_len(len) };
    Ok(c)
}

/// f32 `C (+)= A · B` on the calling thread alone, for kernels that are already one task of a
/// parallel loop (the pool cannot be entered again from inside one of its tasks): per head of
/// an attention, say. Adds into C when `accumulate`, else overwrites it.
pub fn gemm_f32_serial(a: MatRef<f32>, b: MatRef<f32>, c: &mut [f32], accumulate: bool) -> Result<()> {
    require_kernel(PackKind::F32)?;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || c.len() != m * n {
        bail!("cpu-gemm: A [{m}, {k}] · B [{}, {n}] into {} elements", b.rows, c.len());
    }
    a.check("A")?;
    b.check("B")?;
    if k == 0 && !accumulate {
        c.fill(0.0);
    }
    if m > 0 && n > 0 && k > 0 {
        packed_gemm(a, BSource::View(b), as_out(c), Threads::Caller, accumulate);
    }
    Ok(())
}

/// (units, K blocks, units per block) of a K: equal blocks of at most KCU units. A product and
/// a pre-packed B must agree on it.
fn k_blocking<T: Element>(k: usize) -> (usize, usize, usize) {
    let units = k.div_ceil(T::KU);
    let kblocks = units.div_ceil(KCU).max(1);
    (units, kblocks, units.div_ceil(kblocks))
}

/// Where a product's B comes from: a strided view (packed per call), or panels packed beforehand.
pub enum BSource<'a, T> {
    /// B [K, N] as a view.
    View(MatRef<'a, T>),
    /// B packed by [`PackedB::new`] (its kind must be T's).
    Packed(&'a PackedB),
}

impl<T> BSource<'_, T> {
    fn cols(&self) -> usize {
        match self {
            BSource::View(b) => b.cols,
            BSource::Packed(p) => p.n,
        }
    }
}

/// The element type a [`PackedB`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackKind {
    Bf16,
    F32,
}

/// An error where this CPU has no packed kernel for `kind`.
fn require_kernel(kind: PackKind) -> Result<()> {
    let available = match kind {
        PackKind::Bf16 => bf16_available(),
        PackKind::F32 => f32_available(),
    };
    if !available {
        bail!("cpu-gemm: this CPU has no kernel for {kind:?}");
    }
    Ok(())
}

/// An element type B can be pre-packed in.
#[allow(private_bounds)]
pub trait PackElement: Element {
    const KIND: PackKind;
}
impl PackElement for bf16 {
    const KIND: PackKind = PackKind::Bf16;
}
impl PackElement for f32 {
    const KIND: PackKind = PackKind::F32;
}

/// B [K, N] packed once into the panels a product would pack on the fly (`[kblock][panel]`, each
/// `[units][NR]`), for a matrix that meets many products: a frozen weight, Wᵀ in x·Wᵀ. Packing
/// per product read the weight column by column — 48 strided streams from DRAM, a fifth of a
/// bf16 prefill — where a product over packed panels streams them in order. Same blocking, so
/// the same sums: results are bit-identical to [`gemm()`] / [`gemm_f32`].
pub struct PackedB {
    kind: PackKind,
    k: usize,
    n: usize,
    /// Units per K block (the last block may hold fewer).
    kcu: usize,
    units: usize,
    n_panels: usize,
    panels: Vec<u32>,
}

impl PackedB {
    /// Pack B (any strided view). Errors where the CPU has no kernel for `T`.
    pub fn new<T: PackElement>(b: MatRef<T>) -> Result<Self> {
        require_kernel(T::KIND)?;
        b.check("B")?;
        let (k, n) = (b.rows, b.cols);
        let (units, kblocks, kcu) = k_blocking::<T>(k);
        let n_panels = n.div_ceil(NR);
        let mut panels = vec![0u32; kblocks * n_panels * kcu * NR];
        chunks_mut(&mut panels, kcu * NR, |i, slot| {
            let (kb, pn) = (i / n_panels, i % n_panels);
            let (u0, jc) = (kb * kcu, pn * NR);
            let ku = kcu.min(units - u0);
            pack_panels::<T, NR>(&b, jc, NR.min(n - jc), u0, ku, &mut slot[..ku * NR]);
        });
        Ok(PackedB { kind: T::KIND, k, n, kcu, units, n_panels, panels })
    }

    /// [`PackedB::new`] if the process-wide budget for pre-packed copies still has its bytes:
    /// `SHARDSMITH_PACK_BUDGET_MB` (default 2048; 0 turns pre-packing off). A pre-packed weight
    /// is a second copy of it, so the budget bounds what pre-packing adds to the footprint.
    pub fn within_budget<T: PackElement>(b: MatRef<T>) -> Result<Option<Self>> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::OnceLock;
        static LEFT: OnceLock<AtomicUsize> = OnceLock::new();
        let left = LEFT.get_or_init(|| {
            let mb = std::env::var("SHARDSMITH_PACK_BUDGET_MB").ok().and_then(|v| v.parse::<usize>().ok());
            AtomicUsize::new(mb.unwrap_or(2048) << 20)
        });
        let (_, kblocks, kcu) = k_blocking::<T>(b.rows);
        let bytes = kblocks * b.cols.div_ceil(NR) * kcu * NR * 4;
        let took = left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(bytes)).is_ok();
        if !took {
            return Ok(None);
        }
        Self::new(b).map(Some)
    }

    /// Panel `pn` of K block `kb`: [units of the block][NR].
    fn panel(&self, kb: usize, pn: usize) -> &[u32] {
        let ku = self.kcu.min(self.units - kb * self.kcu);
        let at = (kb * self.n_panels + pn) * self.kcu * NR;
        &self.panels[at..at + ku * NR]
    }

    /// (K, N) of the packed matrix.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The element type of the panels.
    pub fn kind(&self) -> PackKind {
        self.kind
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.panels.len() * 4
    }
}

thread_local! {
    /// This thread's packed B micro-panel (every element is rewritten by each `pack_panels`, so it
    /// is reused without zeroing).
    static B_PANEL: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// This thread's packed A block, reused the same way (`pack_a` rewrites every unit a product
    /// reads; a zero-filled 512 KiB per product was 2 % of a bf16 train step).
    static A_PACK: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where a GEMM runs: spread over the pool, or on the calling thread only.
#[derive(Clone, Copy, PartialEq)]
enum Threads {
    Pool,
    Caller,
}

/// f32 → bf16, round to nearest even (NaN stays NaN), vectorisable and in parallel, into a
/// new vector that is not zero-filled first.
pub fn round_bf16(c: &[f32]) -> Vec<bf16> {
    super::convert(c, to_bf16)
}

/// f32 → bf16, round to nearest even, NaN kept quiet: `bf16::from_f32` as branch-free bit
/// arithmetic that vectorises.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> bf16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    bf16::from_bits(if x.is_nan() { (bits >> 16) as u16 | 0x40 } else { rounded })
}

/// Pack rows `i0..i0+rows` × units `u0..u0+ku` of A into MR-row panels `[ku][MR]`: A's rows
/// are the columns of Aᵀ [K, M], packed as B's columns are.
fn pack_a<T: Element>(
    a: &MatRef<T>,
    i0: usize,
    rows: usize,
    u0: usize,
    ku: usize,
    out: &mut [u32],
    threads: Threads,
) {
    let at = a.t();
    let pack = |blk: usize, panel: &mut [u32]| {
        let r0 = i0 + blk * MR;
        pack_panels::<T, MR>(&at, r0, MR.min(i0 + rows - r0), u0, ku, panel);
    };
    match threads {
        Threads::Pool => chunks_mut(out, ku * MR, pack),
        Threads::Caller => out.chunks_mut(ku * MR).enumerate().for_each(|(blk, panel)| pack(blk, panel)),
    }
}

/// Pack columns `j0..j0+cols` × units `u0..u0+ku` of B [K, N] into WIDTH-column panels `[ku][WIDTH]`
/// (B's NR-column panels, and A's MR-row ones through Aᵀ).
fn pack_panels<T: Element, const WIDTH: usize>(
    b: &MatRef<T>,
    j0: usize,
    cols: usize,
    u0: usize,
    ku: usize,
    out: &mut [u32],
) {
    let k = b.rows;
    for (blk, panel) in out.chunks_exact_mut(ku * WIDTH).enumerate() {
        let c0 = j0 + blk * WIDTH;
        let live = WIDTH.min(j0 + cols - c0);
        if live < WIDTH {
            panel.fill(0);
        }
        if b.rs == 1 {
            // K contiguous (Wᵀ: W's rows; x, dy as Aᵀ): whole units from each column, a line of a
            // column at a time (16 units), scattered into the panel's rows. The columns are K
            // elements apart — 4 KiB multiples for the model's K — so they alias in L1: a
            // unit-at-a-time walk over all `live` columns kept 48 lines of one L1 set alive and
            // re-missed on every unit (packing took more time than the kernel at K 2048). The
            // panel's 16-unit strip (3 KiB) stays in L1 while it is written.
            let full = (k - T::KU * u0).min(T::KU * ku) / T::KU; // units wholly inside K
            let per_line = 64 / (T::KU * std::mem::size_of::<T>());
            // A's 8-row panels neither alias nor tile: each row in one run (strips cost ~2 % of
            // an f32 stage-1 step there).
            let strip_len = if WIDTH >= 16 { per_line } else { full.max(1) };
            for strip in (0..full).step_by(strip_len) {
                let end = (strip + strip_len).min(full);
                // Whole 16 × 16 tiles by register transposes (a unit is 32 bits for either
                // element type, so a 64-byte line of a column is 16 units), the rest by units.
                let mut tiled = 0;
                #[cfg(target_arch = "x86_64")]
                if end - strip == 16 {
                    while tiled + 16 <= live {
                        let start = (c0 + tiled) * b.cs + T::KU * (u0 + strip);
                        // Whole units of 16 columns inside the view (`full` units are in K).
                        let last = start + 15 * b.cs + T::KU * 16;
                        let src = &b.data[start..last];
                        // SAFETY: packed GEMMs run only where AVX512-F is (`require_kernel`); the 16
                        // rows of 64 bytes, `b.cs` elements apart, are inside `src`; the panel
                        // holds rows strip..strip+16 of WIDTH ≥ tiled + 16 units.
                        unsafe {
                            transpose_16x16(
                                src.as_ptr() as *const u32,
                                b.cs * std::mem::size_of::<T>(),
                                panel[strip * WIDTH + tiled..].as_mut_ptr(),
                                WIDTH,
                            )
                        };
                        tiled += 16;
                    }
                }
                for c in tiled..live {
                    let start = (c0 + c) * b.cs + T::KU * u0;
                    let col = &b.data[start + T::KU * strip..start + T::KU * end];
                    // The same column's next lines, so they are in flight when it comes round.
                    prefetch(col.as_ptr().wrapping_add(PREFETCH_AHEAD_BYTES / std::mem::size_of::<T>()));
                    for (i, unit) in col.chunks_exact(T::KU).enumerate() {
                        panel[(strip + i) * WIDTH + c] = T::unit_of(unit);
                    }
                }
            }
            if full < ku {
                for c in 0..live {
                    panel[full * WIDTH + c] = T::unit(b, c0 + c, T::KU * (u0 + full), k, b.rs, b.cs);
                }
            }
        } else if b.cs == 1 {
            // N contiguous (W in dy·W, x in dyᵀ·x): each unit row from KU runs of `live` values.
            for u in 0..ku {
                let k0 = T::KU * (u0 + u);
                let run = |kk: usize| (kk < k).then(|| &b.data[kk * b.rs + c0..kk * b.rs + c0 + live]);
                T::units_of_rows(
                    [run(k0), if T::KU == 2 { run(k0 + 1) } else { None }],
                    &mut panel[u * WIDTH..u * WIDTH + live],
                );
            }
        } else {
            for u in 0..ku {
                for c in 0..live {
                    panel[u * WIDTH + c] = T::unit(b, c0 + c, T::KU * (u0 + u), k, b.rs, b.cs);
                }
            }
        }
    }
}

/// `dst[r·dst_stride + c] = src_c[r]` for a 16 × 16 tile of 32-bit units, where source row c
/// starts `c · src_stride_bytes` bytes after `src` (16 units, 64 bytes): four rounds of
/// 32-, 64- and 128-bit interleaves. Each source row is prefetched `PREFETCH_AHEAD_BYTES` on.
///
/// # Safety
/// AVX512-F; the 16 source rows and the 16 destination rows of 16 units are valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_16x16(src: *const u32, src_stride_bytes: usize, dst: *mut u32, dst_stride: usize) {
    use std::arch::x86_64::*;
    let row = |c: usize| (src as *const u8).add(c * src_stride_bytes);
    let r: [__m512; 16] = std::array::from_fn(|c| {
        prefetch(row(c).wrapping_add(PREFETCH_AHEAD_BYTES));
        _mm512_loadu_ps(row(c) as *const f32)
    });
    // 32-bit interleave of row pairs: t[2i] = (r[2i][0], r[2i+1][0], r[2i][1], r[2i+1][1], ...)
    // within each 128-bit lane.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // 64-bit interleave of pairs of those: each 128-bit lane now holds one column of 4 rows.
    let pd = _mm512_castps_pd;
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (base, j) = (i / 4 * 4, i % 4);
        let (a, b) = (pd(t[base + j / 2]), pd(t[base + 2 + j / 2]));
        _mm512_castpd_ps(if j % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) })
    });
    // 128-bit lane shuffles across the four groups of four rows.
    let v: [__m512; 16] = std::array::from_fn(|i| {
        let (half, j) = (i / 8, i % 8);
        let (a, b) = (u[half * 8 + j % 4], u[half * 8 + 4 + j % 4]);
        if j < 4 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        }
    });
    for i in 0..16 {
        let (a, b) = (v[i % 8], v[8 + i % 8]);
        let out = if i < 8 { _mm512_shuffle_f32x4::<0x88>(a, b) } else { _mm512_shuffle_f32x4::<0xdd>(a, b) };
        _mm512_storeu_ps(dst.add(i * dst_stride) as *mut f32, out);
    }
}

/// How far ahead of the packing position a column stream is prefetched.
const PREFETCH_AHEAD_BYTES: usize = 512;

/// Hint the line holding `p` into L1 (no fault if `p` is past the data).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `C = A · B` (or `C += A · B` with `accumulate_into`) by packed panels.
fn packed_gemm<T: Element>(
    a: MatRef<T>,
    b: BSource<T>,
    c: &mut [MaybeUninit<f32>],
    run_on: Threads,
    accumulate_into: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols());
    let (units, kblocks, kcu) = k_blocking::<T>(k);
    let threads = if run_on == Threads::Pool { pool_threads() } else { 1 };
    let n_panels = n.div_ceil(NR);
    let a_len = MC.min(m.div_ceil(MR) * MR) * kcu;
    with_scratch(&A_PACK, a_len, |a_pack| {
        let cptr = SendPtr::new(c);
        for i0 in (0..m).step_by(MC) {
            let rows = MC.min(m - i0);
            let m_panels = rows.div_ceil(MR);
            for kb in 0..kblocks {
                let u0 = kb * kcu;
                let ku = kcu.min(units - u0);
                let a_pack = &mut a_pack[..m_panels * MR * ku];
                pack_a(&a, i0, rows, u0, ku, a_pack, run_on);
                let a_pack = &*a_pack;
                // Tasks: one B micro-panel each on the pool (finer tasks balance the threads: N/48
                // panels in 8 chunks left one thread 20 % more work), M split too when N is too
                // narrow to feed the threads; one task on the caller's thread.
                let (n_chunks, m_chunks) = match run_on {
                    Threads::Caller => (1, 1),
                    Threads::Pool if n_panels >= 2 * threads => (n_panels, 1),
                    Threads::Pool => (n_panels, m_panels.min((2 * threads).div_ceil(n_panels))),
                };
                let per_n = n_panels.div_ceil(n_chunks);
                let per_m = m_panels.div_ceil(m_chunks);
                let accumulate = kb > 0 || accumulate_into;
                let task = |task: usize| {
                    let (nc, mc) = (task / m_chunks, task % m_chunks);
                    let (pn0, pn1) = (nc * per_n, ((nc + 1) * per_n).min(n_panels));
                    let (pm0, pm1) = (mc * per_m, ((mc + 1) * per_m).min(m_panels));
                    if pn0 >= pn1 || pm0 >= pm1 {
                        return;
                    }
                    // Every A panel against one B micro-panel while it is hot.
                    let run_panel = |pn: usize, bp: &[u32]| {
                        let jc = pn * NR;
                        let ncols = NR.min(n - jc);
                        for ip in pm0..pm1 {
                            let ic = i0 + ip * MR;
                            let nrows = MR.min(m - ic);
                            let ap = &a_pack[ip * MR * ku..(ip + 1) * MR * ku];
                            // SAFETY: the public entry checked the CPU's features; tasks write
                            // disjoint tiles of C (rows ic..ic+nrows < m, columns jc..jc+ncols < n);
                            // panels hold ku units.
                            unsafe {
                                (T::KERNEL)(
                                    ku,
                                    ap.as_ptr(),
                                    bp.as_ptr(),
                                    cptr.get().add(ic * n + jc) as *mut f32,
                                    n,
                                    nrows,
                                    ncols,
                                    accumulate,
                                );
                            }
                        }
                    };
                    match &b {
                        BSource::Packed(p) => (pn0..pn1).for_each(|pn| run_panel(pn, p.panel(kb, pn))),
                        BSource::View(b) => with_scratch(&B_PANEL, ku * NR, |bp| {
                            for pn in pn0..pn1 {
                                let jc = pn * NR;
                                pack_panels::<T, NR>(b, jc, NR.min(n - jc), u0, ku, bp);
                                run_panel(pn, bp);
                            }
                        }),
                    }
                };
                match run_on {
                    Threads::Pool => parallel_for(n_chunks * m_chunks, task),
                    Threads::Caller => (0..n_chunks * m_chunks).for_each(task),
                }
            }
        }
    })
}

/// Write (or add) an MR×NR accumulator tile into C's first `rows` × `cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_tile(
    acc: &[[std::arch::x86_64::__m512; 3]; MR],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
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

/// The bf16 microkernel: per k-pair, 3 B vectors × 8 broadcast A pairs, `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_bf16(
    ku: usize,
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
    for p in 0..ku {
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
    store_tile(&acc, c, ldc, rows, cols, accumulate)
}

/// The f32 microkernel: per k, 3 B vectors × 8 broadcast A values, `vfmadd231ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_f32(
    ku: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let (a, b) = (a as *const f32, b as *const f32);
    let mut acc = [[_mm512_setzero_ps(); 3]; MR];
    for p in 0..ku {
        let bp = b.add(p * NR);
        let (b0, b1, b2) = (_mm512_loadu_ps(bp), _mm512_loadu_ps(bp.add(16)), _mm512_loadu_ps(bp.add(32)));
        let ap = a.add(p * MR);
        for (r, acc) in acc.iter_mut().enumerate() {
            let ar = _mm512_set1_ps(*ap.add(r));
            acc[0] = _mm512_fmadd_ps(ar, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(ar, b1, acc[1]);
            acc[2] = _mm512_fmadd_ps(ar, b2, acc[2]);
        }
    }
    store_tile(&acc, c, ldc, rows, cols, accumulate)
}

/// Small M with K-contiguous rows of A and columns of B (x·Wᵀ in decode): dot products straight
/// from the operands, B read once, columns split across threads.
#[cfg(target_arch = "x86_64")]
fn dot_gemm(a: MatRef<bf16>, b: MatRef<bf16>, c: &mut [MaybeUninit<f32>]) {
    let (m, n) = (a.rows, b.cols);
    let cptr = SendPtr::new(c);
    let chunk = 64;
    parallel_for(n.div_ceil(chunk), |blk| {
        let (j0, j1) = (blk * chunk, ((blk + 1) * chunk).min(n));
        // SAFETY: `bf16_available()` checked the CPU; `check` bounded every row/column read; each
        // task writes its own columns.
        unsafe { dot_columns(&a, &b, j0, j1, cptr.get() as *mut f32, n, m) }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_columns(
    a: &MatRef<bf16>,
    b: &MatRef<bf16>,
    j0: usize,
    j1: usize,
    c: *mut f32,
    ldc: usize,
    m: usize,
) {
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
// Views of candle storages
// ---------------------------------------------------------------------------------------------

/// The 2-D strided view of a 2-D layout over `data`.
fn view_of<'a, T>(data: &'a [T], l: &Layout, what: &str) -> Result<MatRef<'a, T>> {
    let (rows, cols) = l.shape().dims2()?;
    let (rs, cs) = match l.stride() {
        [rs, cs] => (*rs, *cs),
        other => bail!("cpu-gemm: {what} has strides {other:?}"),
    };
    Ok(MatRef { data: &data[l.start_offset()..], rows, cols, rs, cs })
}

/// The 2-D strided view of a bf16 storage.
pub(crate) fn view<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<MatRef<'a, bf16>> {
    let CpuStorage::BF16(v) = s else { bail!("cpu-gemm: {what} is {:?}, not bf16", s.dtype()) };
    view_of(v, l, what)
}

/// The 2-D strided view of an f32 storage.
pub(crate) fn view_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<MatRef<'a, f32>> {
    let CpuStorage::F32(v) = s else { bail!("cpu-gemm: {what} is {:?}, not f32", s.dtype()) };
    view_of(v, l, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A stored [M, K] (or [K, M] viewed transposed) and B [K, N] (or [N, K] transposed).
    fn views<T>(
        av: &[T],
        bv: &[T],
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
    ) -> (MatRef<'static, T>, MatRef<'static, T>)
    where
        T: Clone + 'static,
    {
        let (av, bv): (&'static [T], &'static [T]) = (av.to_vec().leak(), bv.to_vec().leak());
        let a = if ta {
            MatRef { data: av, rows: k, cols: m, rs: m, cs: 1 }.t()
        } else {
            MatRef { data: av, rows: m, cols: k, rs: k, cs: 1 }
        };
        let b = if tb {
            MatRef { data: bv, rows: n, cols: k, rs: k, cs: 1 }.t()
        } else {
            MatRef { data: bv, rows: k, cols: n, rs: n, cs: 1 }
        };
        (a, b)
    }

    /// C against an f64 reference of op(A)·op(B); the elements as f64 by `f`.
    fn compare<T: Copy>(a: MatRef<T>, b: MatRef<T>, c: &[f32], f: impl Fn(T) -> f64, what: &str) {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        for i in 0..m {
            for j in 0..n {
                let (mut want, mut mag) = (0f64, 0f64);
                for p in 0..k {
                    let x = f(a.data[i * a.rs + p * a.cs]) * f(b.data[p * b.rs + j * b.cs]);
                    want += x;
                    mag += x.abs();
                }
                let got = c[i * n + j] as f64;
                // f32 accumulation: error ≤ ~K·2⁻²⁴·Σ|x| (bf16 products are exact, f32 ones
                // round once more: the +2).
                let tol = 1e-6 + (k as f64 + 2.0) * 6e-8 * mag;
                assert!(
                    (got - want).abs() <= tol,
                    "{what} [{m}x{k}]·[{k}x{n}] at ({i},{j}): {got} vs {want}"
                );
            }
        }
    }

    /// Both kernels (where the CPU has them) on one shape and layout.
    fn check(m: usize, n: usize, k: usize, ta: bool, tb: bool, seed: u64) {
        let (af, bf) = (values(m * k, seed), values(k * n, seed ^ 0x55));
        let what = format!("ta={ta} tb={tb}");
        if bf16_available() {
            let to = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
            let (a, b) = views(&to(&af), &to(&bf), m, n, k, ta, tb);
            let mut c = vec![f32::NAN; m * n];
            gemm(a, b, &mut c).unwrap();
            compare(a, b, &c, |x| x.to_f64(), &format!("bf16 {what}"));
            if m > DOT_MAX_M {
                // Pre-packed B: the same bits (rows ≤ DOT_MAX_M may take the dot kernel).
                let mut pre = vec![f32::NAN; m * n];
                gemm_prepacked(a, &PackedB::new(b).unwrap(), &mut pre).unwrap();
                assert!(pre.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()), "bf16 prepacked {what}");
            }
        }
        if f32_available() {
            let (a, b) = views(&af, &bf, m, n, k, ta, tb);
            let mut c = vec![f32::NAN; m * n];
            gemm_f32(a, b, &mut c).unwrap();
            compare(a, b, &c, |x| x as f64, &format!("f32 {what}"));
            // On the caller's thread: the same sums in the same order, so the same bits; and
            // accumulating into C adds the product to what was there.
            let mut pre = vec![f32::NAN; m * n];
            gemm_prepacked(a, &PackedB::new(b).unwrap(), &mut pre).unwrap();
            assert!(pre.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()), "f32 prepacked {what}");
            let mut serial = vec![f32::NAN; m * n];
            gemm_f32_serial(a, b, &mut serial, false).unwrap();
            assert!(serial.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()), "serial {what}");
            let base = values(m * n, seed ^ 0x77);
            let mut acc = base.clone();
            gemm_f32_serial(a, b, &mut acc, true).unwrap();
            let added: Vec<f32> = acc.iter().zip(&base).map(|(x, b)| x - b).collect();
            compare(a, b, &added, |x| x as f64, &format!("f32 accumulate {what}"));
        }
    }

    #[test]
    fn edges_and_transposes() {
        if !bf16_available() && !f32_available() {
            eprintln!("skipped: no avx512");
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

    #[test]
    fn overrunning_views_and_mismatched_shapes_are_errors() {
        if !f32_available() {
            return;
        }
        let data = vec![0f32; 12];
        let a = MatRef { data: &data, rows: 3, cols: 4, rs: 4, cs: 1 };
        let short = MatRef { data: &data[..10], rows: 4, cols: 3, rs: 3, cs: 1 };
        let mut c = vec![0f32; 9];
        assert!(gemm_f32(a, short, &mut c).unwrap_err().to_string().contains("overruns"));
        let b = MatRef { data: &data, rows: 4, cols: 3, rs: 3, cs: 1 };
        assert!(gemm_f32(a, b, &mut c[..8]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_f64_reference(m in 1usize..70, n in 1usize..120, k in 1usize..600, ta: bool, tb: bool, seed: u64) {
            check(m, n, k, ta, tb, seed);
        }
    }
}
