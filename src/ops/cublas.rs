//! 2-D products on cuBLAS called directly, for [`super::linear`]'s CUDA GEMMs when
//! `SHARDSMITH_GEMM` picks [`GemmBackend::Cublas`] or [`GemmBackend::CublasLt`].
//!
//! Why not candle's matmul: it calls `cublasGemmStridedBatchedEx` with a batch of one on a handle
//! with cuBLAS's default workspace, and measured well below PyTorch's GEMMs at the same shapes
//! (targets.md, H200: 734 against 858 TFLOP/s at 4096³, 774 against 892 at 8192³); in a 7B layer
//! the GEMMs are three quarters of the time. PyTorch's matmul calls `cublasGemmEx` on a handle
//! given a 32 MiB workspace on Hopper (NVIDIA's recommendation), and its addmm cuBLASLt. Both
//! are here, on candle's stream with a 32 MiB workspace (per thread: `Handles`), for `bench` to
//! decide between on the GPU. They also take what candle's call refuses: row strides larger
//! than the row (views into a fused projection's output), and an f32 result from bf16 operands
//! without a rounding (weight gradients for f32 master weights).
//!
//! Layout: cuBLAS is column-major, so C [M, N] (row-major, contiguous) = A · B is computed as
//! Cᵀ = Bᵀ · Aᵀ: cuBLAS's "A" is our B and its "B" our A, each passed as stored with a
//! transpose flag chosen from its strides; ldc = N (`ops::blas_plan`, checked on the CPU).

use super::blas_plan::{plan, BlasPlan};
use super::cuda::strided_view;
use super::linear::GemmBackend;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{self, sys as blas_sys};
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys as lt_sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// The workspace each handle gets (NVIDIA's recommendation for Hopper; cudarc's cuBLASLt
/// default there).
const WORKSPACE_BYTES: usize = 32 << 20;

/// One thread's handles for one device: a cuBLAS handle of our own (candle's keeps its default
/// workspace) and a cuBLASLt handle, sharing one workspace. Per thread because candle's stream
/// is the per-thread default stream: the products of two threads (tensor-parallel ranks) run on
/// two streams and may overlap, so they must not share a workspace; one thread's calls are
/// ordered on its stream and never overlap. The cost: tensor-parallel ranks run in threads made
/// for each call (`parallel::run_ranks`), so each rank makes its handles, workspace and
/// algorithm choices anew every call, and its exit synchronises the device (cublasDestroy).
struct Handles {
    /// Raw, not cudarc's `CudaBlas`, whose drop panics when the destroy fails (a sticky CUDA
    /// error from any earlier kernel), which in a thread-local destructor aborts the process.
    blas: blas_sys::cublasHandle_t,
    lt: lt_sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// candle's stream, which both handles run on.
    stream: Arc<CudaStream>,
    /// cuBLASLt's algorithm for each problem seen (its heuristic is a host-side search).
    algos: HashMap<AlgoKey, lt_sys::cublasLtMatmulAlgo_t>,
}

impl Drop for Handles {
    fn drop(&mut self) {
        // SAFETY: made in `new_handles`, used by nothing after this (work already queued keeps
        // running; cublasDestroy synchronises the device, and the workspace is freed after it,
        // in stream order). Errors are ignored: the process may be ending on a CUDA error.
        unsafe {
            let _ = lt::destroy_handle(self.lt);
            let _ = cublas::result::destroy_handle(self.blas);
        }
    }
}

/// Runs `f` with this thread's handles for `dev`, made at the thread's first product on it.
fn with_handles<T>(dev: &CudaDevice, f: impl FnOnce(&mut Handles) -> Result<T>) -> Result<T> {
    thread_local! {
        static HANDLES: RefCell<HashMap<DeviceId, Handles>> = RefCell::new(HashMap::new());
    }
    HANDLES.with(|cell| {
        let mut map = cell.borrow_mut();
        let h = match map.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(new_handles(dev)?),
        };
        f(h)
    })
}

fn new_handles(dev: &CudaDevice) -> Result<Handles> {
    let stream = dev.cuda_stream();
    let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.w()?;
    let blas = cublas::result::create_handle().w()?;
    let lt = match lt::create_handle() {
        Ok(lt) => lt,
        Err(e) => {
            // SAFETY: just made, used by nothing.
            let _ = unsafe { cublas::result::destroy_handle(blas) };
            return lt_ok(Err(e), "cublasLtCreate");
        }
    };
    // From here `Handles` owns both and destroys them whatever follows.
    let mut h = Handles { blas, lt, workspace, stream, algos: HashMap::new() };
    let (ptr, _guard) = h.workspace.device_ptr_mut(&h.stream);
    // SAFETY: the handle is ours; the stream is candle's (set first: cublasSetStream resets a
    // user workspace); the buffer lives as long as the handle (both in `Handles`).
    unsafe {
        cublas::result::set_stream(h.blas, h.stream.cu_stream() as _).w()?;
        let status = blas_sys::cublasSetWorkspace_v2(h.blas, ptr as *mut _, WORKSPACE_BYTES);
        if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            bail!("cublasSetWorkspace: {status:?}");
        }
    }
    drop(_guard);
    Ok(h)
}

/// `a [M, K] · b [K, N]` (2-D strided views, same dtype) through `backend`, into a new
/// contiguous [M, N] of the operands' dtype, or f32 with `widen`. `None` where it does not
/// apply (the Candle backend, f32 operands, strides cuBLAS cannot read, sizes past i32): the
/// caller runs candle's matmul.
pub(super) fn gemm(
    backend: GemmBackend,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    (m, n, k): (usize, usize, usize),
    widen: bool,
) -> Result<Option<CudaStorage>> {
    let dtype = s1.dtype();
    if backend == GemmBackend::Candle || !matches!(dtype, DType::BF16 | DType::F16) || s2.dtype() != dtype {
        return Ok(None);
    }
    // cuBLAS's A = our B read as Bᵀ [N, K]; its B = our A read as Aᵀ [K, M] (blas_plan).
    let strides = |l: &Layout| [l.stride()[0], l.stride()[1]];
    let Some(dims) = plan((m, n, k), strides(l1), strides(l2)) else { return Ok(None) };
    let dev = s1.device();
    with_handles(dev, |h| {
        macro_rules! run {
            ($T:ty, $O:ty) => {{
                let (a, b) = (strided_view::<$T>(s2, l2)?, strided_view::<$T>(s1, l1)?);
                // SAFETY: every element is written (beta = 0).
                let mut c = unsafe { dev.alloc::<$O>(m * n)? };
                if !call::<$T, $O>(backend, h, &dims, &a, &b, &mut c)? {
                    return Ok(None); // the library has no algorithm for it: candle's matmul
                }
                CudaStorage::wrap_cuda_slice(c, dev.clone())
            }};
        }
        Ok(Some(match (dtype, widen) {
            (DType::BF16, false) => run!(bf16, bf16),
            (DType::BF16, true) => run!(bf16, f32),
            (DType::F16, false) => run!(f16, f16),
            _ => run!(f16, f32),
        }))
    })
}

/// The cudaDataType of an operand or result type, as cuBLAS's and cuBLASLt's bindings spell it.
trait BlasType: CudaDType {
    const DATA: blas_sys::cudaDataType_t;
    const LT: lt_sys::cudaDataType_t;
}
impl BlasType for bf16 {
    const DATA: blas_sys::cudaDataType_t = blas_sys::cudaDataType_t::CUDA_R_16BF;
    const LT: lt_sys::cudaDataType_t = lt_sys::cudaDataType_t::CUDA_R_16BF;
}
impl BlasType for f16 {
    const DATA: blas_sys::cudaDataType_t = blas_sys::cudaDataType_t::CUDA_R_16F;
    const LT: lt_sys::cudaDataType_t = lt_sys::cudaDataType_t::CUDA_R_16F;
}
impl BlasType for f32 {
    const DATA: blas_sys::cudaDataType_t = blas_sys::cudaDataType_t::CUDA_R_32F;
    const LT: lt_sys::cudaDataType_t = lt_sys::cudaDataType_t::CUDA_R_32F;
}

/// cuBLAS's transpose flag.
fn blas_op(transpose: bool) -> blas_sys::cublasOperation_t {
    if transpose {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

/// Runs the product on `backend`: true when done, false when the library reports
/// CUBLAS_STATUS_NOT_SUPPORTED (no algorithm for these types, sizes and alignments).
fn call<T: BlasType, O: BlasType>(
    backend: GemmBackend,
    h: &mut Handles,
    d: &BlasPlan,
    a: &CudaView<T>,
    b: &CudaView<T>,
    c: &mut CudaSlice<O>,
) -> Result<bool> {
    match backend {
        GemmBackend::Cublas => {
            let stream = h.stream.clone();
            let (pa, _ga) = a.device_ptr(&stream);
            let (pb, _gb) = b.device_ptr(&stream);
            let (pc, _gc) = c.device_ptr_mut(&stream);
            let (alpha, beta) = (1f32, 0f32);
            // SAFETY: the views hold op(A), op(B) as the plan describes them (blas_plan checked the
            // leading dimensions) and c holds m·n elements; alpha and beta are f32 for a
            // CUBLAS_COMPUTE_32F product.
            let done = unsafe {
                cublas::result::gemm_ex(
                    h.blas,
                    blas_op(d.ta),
                    blas_op(d.tb),
                    d.m as i32,
                    d.n as i32,
                    d.k as i32,
                    &alpha as *const f32 as *const _,
                    pa as *const _,
                    T::DATA,
                    d.lda as i32,
                    pb as *const _,
                    T::DATA,
                    d.ldb as i32,
                    &beta as *const f32 as *const _,
                    pc as *mut _,
                    O::DATA,
                    d.ldc as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
            };
            match done {
                Ok(()) => Ok(true),
                Err(e) if e.0 == blas_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => Ok(false),
                Err(e) => Err(e).w(),
            }
        }
        GemmBackend::CublasLt => lt_matmul(h, d, a, b, c),
        GemmBackend::Candle => bail!("gemm: the candle backend runs candle's matmul"),
    }
}

/// A cuBLASLt status as candle's error, naming the call.
fn lt_ok<T>(r: std::result::Result<T, lt::CublasError>, call: &str) -> Result<T> {
    r.map_err(|e| candle_core::Error::Msg(format!("{call}: {:?}", e.0)))
}

/// A cuBLASLt attribute setter (`set_matmul_desc_attribute`, `set_matmul_pref_attribute`)
/// called with `value`, whose type must be the one the API documents for `attr`.
///
/// # Safety
/// `object` is live and `V` is `attr`'s documented type.
unsafe fn lt_attr<O, A, V>(
    setter: unsafe fn(O, A, *const std::ffi::c_void, usize) -> std::result::Result<(), lt::CublasError>,
    object: O,
    attr: A,
    value: &V,
) -> std::result::Result<(), lt::CublasError> {
    setter(object, attr, value as *const V as *const _, std::mem::size_of::<V>())
}

/// A cuBLASLt object destroyed when dropped.
struct LtObject<T: Copy>(T, unsafe fn(T) -> std::result::Result<(), lt::CublasError>);

impl<T: Copy> Drop for LtObject<T> {
    fn drop(&mut self) {
        // SAFETY: made by the matching create call and used by nothing after this.
        let _ = unsafe { (self.1)(self.0) };
    }
}

/// What picks a cuBLASLt algorithm: the problem (transposes, sizes, leading dimensions), the
/// operand and result types, and the pointers' alignments (the heuristic may pick an algorithm
/// that needs 16-byte or better aligned operands only when told they are).
type AlgoKey = ([bool; 2], [usize; 6], [i32; 2], [u32; 3]);

/// The largest power of two (at most 256, cuBLASLt's default assumption) dividing `addr`.
fn alignment(addr: u64) -> u32 {
    1u32 << addr.trailing_zeros().min(8)
}

/// cuBLASLt: D = op(A)·op(B) (C = D, beta 0) with the heuristic's first algorithm for these
/// descriptors, asked once per [`AlgoKey`] on this thread, and the shared workspace.
fn lt_matmul<T: BlasType, O: BlasType>(
    h: &mut Handles,
    d: &BlasPlan,
    a: &CudaView<T>,
    b: &CudaView<T>,
    c: &mut CudaSlice<O>,
) -> Result<bool> {
    let not_supported = |e: &lt::CublasError| e.0 == lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED;
    let layout =
        |ty, rows: usize, cols: usize, ld: usize| -> Result<LtObject<lt_sys::cublasLtMatrixLayout_t>> {
            let l = lt_ok(
                lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64),
                "cublasLtMatrixLayoutCreate",
            )?;
            Ok(LtObject(l, lt::destroy_matrix_layout))
        };
    let ((ar, ac), (br, bc)) = d.stored();
    let (la, lb, lc) =
        (layout(T::LT, ar, ac, d.lda)?, layout(T::LT, br, bc, d.ldb)?, layout(O::LT, d.m, d.n, d.ldc)?);
    let desc = LtObject(
        lt_ok(
            lt::create_matmul_desc(
                lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lt_sys::cudaDataType_t::CUDA_R_32F,
            ),
            "cublasLtMatmulDescCreate",
        )?,
        lt::destroy_matmul_desc,
    );
    let stream = h.stream.clone();
    let (pa, _ga) = a.device_ptr(&stream);
    let (pb, _gb) = b.device_ptr(&stream);
    let (pc, _gc) = c.device_ptr_mut(&stream);
    let aligns = [alignment(pa), alignment(pb), alignment(pc)];
    let key: AlgoKey =
        ([d.ta, d.tb], [d.m, d.n, d.k, d.lda, d.ldb, d.ldc], [T::LT as i32, O::LT as i32], aligns);
    // SAFETY: the descriptors are live (dropped at the end); attribute buffers are the types the
    // cuBLASLt API documents (i32 transposes, u64 workspace bytes, u32 alignments); the pointers
    // are live device buffers of the sizes the layouts describe, and the workspace is
    // WORKSPACE_BYTES.
    unsafe {
        for (attr, t) in [
            (lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, d.ta),
            (lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, d.tb),
        ] {
            // cublasOperation_t, an i32 attribute (cuBLASLt's bindings reuse cuBLAS's enum)
            let op = blas_op(t);
            lt_ok(
                lt_attr(lt::set_matmul_desc_attribute, desc.0, attr, &(op as i32)),
                "cublasLtMatmulDescSetAttribute",
            )?;
        }
        let algo = match h.algos.get(&key) {
            Some(algo) => *algo,
            None => {
                use lt_sys::cublasLtMatmulPreferenceAttributes_t as Pref;
                let pref = LtObject(
                    lt_ok(lt::create_matmul_pref(), "cublasLtMatmulPreferenceCreate")?,
                    lt::destroy_matmul_pref,
                );
                const SET: &str = "cublasLtMatmulPreferenceSetAttribute";
                let (pref_set, workspace) = (lt::set_matmul_pref_attribute, WORKSPACE_BYTES as u64);
                lt_ok(
                    lt_attr(pref_set, pref.0, Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace),
                    SET,
                )?;
                for (attr, align) in [
                    (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aligns[0]),
                    (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, aligns[1]),
                    (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, aligns[2]),
                    (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, aligns[2]),
                ] {
                    lt_ok(lt_attr(pref_set, pref.0, attr, &align), SET)?;
                }
                let heuristic =
                    match lt::get_matmul_algo_heuristic(h.lt, desc.0, la.0, lb.0, lc.0, lc.0, pref.0) {
                        Err(e) if not_supported(&e) => return Ok(false),
                        r => lt_ok(r, "cublasLtMatmulAlgoGetHeuristic")?,
                    };
                h.algos.insert(key, heuristic.algo);
                heuristic.algo
            }
        };
        let (pw, _gw) = h.workspace.device_ptr(&stream);
        let (alpha, beta) = (1f32, 0f32);
        let done = lt::matmul(
            h.lt,
            desc.0,
            &alpha as *const f32 as *const _,
            &beta as *const f32 as *const _,
            pa as *const _,
            la.0,
            pb as *const _,
            lb.0,
            pc as *const _,
            lc.0,
            pc as *mut _,
            lc.0,
            &algo as *const _,
            pw as *mut _,
            WORKSPACE_BYTES,
            stream.cu_stream() as *mut _,
        );
        match done {
            Err(e) if not_supported(&e) => Ok(false),
            r => lt_ok(r, "cublasLtMatmul").map(|()| true),
        }
    }
}
