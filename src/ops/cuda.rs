//! Launchers of the kernels in `kernels/` (one function per op, called from the `cuda_fwd` of
//! the matching CustomOp or from the op's backward). Every kernel's shapes, launch geometry and
//! numerics are in the header comment of its `.cu` file; the grid/block choices here follow them.
//!
//! Modules are loaded once per device from the cubin built for `shardsmith_kernels::ARCH`
//! (falling back to the PTX, JIT-compiled by the driver, on another architecture) and launched
//! on candle's stream, with every buffer allocated by candle, so outputs are ordinary tensors.

use super::attention::{
    attention_dims, decode_splits, decode_want, AttentionGridOrder, FlashBackward, FlashForward,
};
use super::fused::AdamWScalars;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;
use shardsmith_kernels::{self as kernels, Module};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Static shared memory a block gets without opting in.
const DEFAULT_SMEM: u32 = 48 * 1024;

fn function(dev: &CudaDevice, m: &Module, name: &str) -> Result<CudaFunction> {
    function_smem(dev, m, name, 0)
}

/// A loaded module and the functions looked up in it so far, each with the dynamic shared
/// memory it is allowed.
struct Loaded {
    module: Arc<CudaModule>,
    functions: HashMap<String, (CudaFunction, u32)>,
}

/// The function, allowed `smem` bytes of dynamic shared memory. Modules, functions and the
/// shared-memory opt-in are looked up in the driver once per device and cached: a decode step
/// launches ~15 kernels per layer, and each lookup (`cuModuleGetFunction`, a `CString`, and
/// `cuFuncSetAttribute` for the attention kernels) was host time on every launch.
fn function_smem(dev: &CudaDevice, m: &Module, name: &str, smem: u32) -> Result<CudaFunction> {
    type Cache = Mutex<HashMap<(DeviceId, &'static str), Loaded>>;
    static MODULES: OnceLock<Cache> = OnceLock::new();
    let mut cache = MODULES.get_or_init(Default::default).lock().expect("kernel module cache");
    let loaded = match cache.entry((dev.id(), m.name)) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let ctx = dev.cuda_stream().context().clone();
            let module = match ctx.load_module(Ptx::from_binary(m.cubin.to_vec())) {
                Ok(module) => module,
                // Another architecture than the cubin's: let the driver JIT the PTX.
                Err(_) => ctx.load_module(Ptx::from_src(m.ptx)).w()?,
            };
            if [kernels::FLASH_ATTN.name, kernels::FLASH_WG.name].contains(&m.name) {
                set_attention_grid_order(&module, dev)?;
            }
            e.insert(Loaded { module, functions: HashMap::new() })
        }
    };
    let allow = |f: &CudaFunction| -> Result<()> {
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .w()
    };
    match loaded.functions.get_mut(name) {
        Some((f, allowed)) => {
            if smem > *allowed {
                allow(f)?;
                *allowed = smem;
            }
            Ok(f.clone())
        }
        None => {
            let f = loaded.module.load_function(name).w()?;
            if smem > DEFAULT_SMEM {
                allow(&f)?;
            }
            loaded.functions.insert(name.to_string(), (f.clone(), smem.max(DEFAULT_SMEM)));
            Ok(f)
        }
    }
}

/// The attention kernels' block order ([`AttentionGridOrder`]): common.cuh's `attn_head_major`
/// in a freshly loaded attention module, 1 for [`AttentionGridOrder::HeadMajor`] (0, the
/// heaviest-first order, as loaded).
fn set_attention_grid_order(module: &Arc<CudaModule>, dev: &CudaDevice) -> Result<()> {
    if AttentionGridOrder::from_env()? == AttentionGridOrder::HeadMajor {
        let stream = dev.cuda_stream();
        let mut flag = module.get_global("attn_head_major", &stream).w()?;
        stream.memcpy_htod(&1i32.to_ne_bytes(), &mut flag).w()?;
    }
    Ok(())
}

fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem }
}

/// A 1-D grid-stride launch over `n` items, 256 threads a block.
fn cfg_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    cfg((blocks, 1, 1), 256, 0)
}

/// Threads for one block per row of length `n`: a multiple of 32, at most `max`.
fn row_block(n: usize, max: usize) -> u32 {
    n.div_ceil(32).clamp(1, max / 32) as u32 * 32
}

/// rmsnorm.cu's forward block for rows of `h`: two 16-byte chunks of 8 a thread (its fast path
/// keeps them in registers), a multiple of 32 threads, at most 1024.
fn rms_block(h: usize) -> u32 {
    row_block(h.div_ceil(16), 1024)
}

/// The backward's block: as the forward's, at most 512 threads (its `__launch_bounds__`: the
/// backward keeps four arrays of chunks in registers, more than 1024 threads could hold; rows
/// past 8192 take its one-element path).
fn rms_block_bwd(h: usize) -> u32 {
    row_block(h.div_ceil(16), 512)
}

/// The contiguous elements of `l` in `s`.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// The elements of `l` in `s` from its first to its last (any strides, all non-negative): what a
/// kernel indexing the view by its strides may touch.
pub(super) fn strided_view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let start = l.start_offset();
    let last: usize = l.dims().iter().zip(l.stride()).map(|(&n, &st)| n.saturating_sub(1) * st).sum();
    let end = if l.shape().elem_count() == 0 { start } else { start + last + 1 };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

fn cuda_of<'a>(s: &'a Storage, op: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("{op}: every input must be on the same cuda device"),
    }
}

fn tensor<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// The kernel-name suffix of a float dtype, or an error naming the op.
fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => bail!("{op}: no cuda kernel for {other:?} (f32 and bf16 only)"),
    }
}

/// Run `$body` with `$T` bound to the Rust type of `$dtype` (f32 or bf16).
macro_rules! with_float {
    ($dtype:expr, $op:expr, |$T:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            other => bail!("{}: no cuda kernel for {other:?} (f32 and bf16 only)", $op),
        }
    };
}

/// `parts` stacked along dim 0 (`Tensor::cat(parts, 0)`, outside autograd) by one
/// device-to-device copy each, where every part is a contiguous CUDA tensor of one float dtype
/// and the same trailing dims; `None` otherwise. candle's cat runs its copy2d kernel, one element
/// a thread: the training layer node's q/k/v weight stacking (96 MB a 7B layer, every step).
pub(super) fn cat_rows(parts: &[Tensor]) -> Result<Option<Tensor>> {
    const OP: &str = "cat";
    let Some(first) = parts.first() else { return Ok(None) };
    let candle_core::Device::Cuda(dev) = first.device() else { return Ok(None) };
    let (dtype, tail) = (first.dtype(), first.dims().get(1..).unwrap_or(&[]).to_vec());
    let fits = |t: &Tensor| {
        t.device().same_device(first.device())
            && t.dtype() == dtype
            && t.rank() >= 1
            && t.dims()[1..] == tail[..]
            && t.layout().contiguous_offsets().is_some()
    };
    if !matches!(dtype, DType::F32 | DType::BF16) || !parts.iter().all(fits) {
        return Ok(None);
    }
    let mut dims = first.dims().to_vec();
    dims[0] = parts.iter().map(|t| t.dim(0)).sum::<candle_core::Result<usize>>()?;
    let total = dims.iter().product::<usize>();
    with_float!(dtype, OP, |T| {
        // SAFETY: every element is written by the copies below (the parts tile the rows).
        let mut out = unsafe { dev.alloc::<T>(total)? };
        let stream = dev.cuda_stream();
        let mut at = 0;
        for t in parts {
            let (s, l) = t.storage_and_layout();
            let v = view::<T>(cuda_of(&s, OP)?, l, OP)?;
            let n = t.elem_count();
            stream.memcpy_dtod(&v, &mut out.slice_mut(at..at + n)).w()?;
            at += n;
        }
        Ok(Some(tensor(out, dev, dims)))
    })
}

// ---------------------------------------------------------------------------------------------
// RMSNorm, rope, softmax (the cuda_fwd of the CustomOps in ops.rs)
// ---------------------------------------------------------------------------------------------

pub(super) fn rms_norm_fwd(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f32,
) -> Result<CudaStorage> {
    const OP: &str = "rms-norm";
    let h = xl.dims().last().copied().unwrap_or(1);
    let rows = xl.shape().elem_count() / h.max(1);
    if wl.shape().elem_count() != h {
        bail!("{OP}: weight has {} elements, rows have {h}", wl.shape().elem_count());
    }
    if w.dtype() != x.dtype() {
        bail!("{OP}: weight dtype {:?} differs from the input's {:?}", w.dtype(), x.dtype());
    }
    let dev = x.device();
    let f = rms_norm_function(dev, x.dtype())?;
    with_float!(x.dtype(), OP, |T| {
        let (xv, wv) = (view::<T>(x, xl, OP)?, view::<T>(w, wl, OP)?);
        let mut y = unsafe { dev.alloc::<T>(rows * h)? };
        let stream = dev.cuda_stream();
        {
            let ((xa, _gx), (wa, _gw)) = (xv.device_ptr(&stream), wv.device_ptr(&stream));
            let (ya, _gy) = y.device_ptr_mut(&stream);
            // SAFETY: every buffer holds rows·h elements (w: h) of the launch's dtype.
            unsafe { launch_rms_norm(&stream, &f, [xa, wa, ya], rows, h, eps) }?;
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

/// (dx in x's dtype, dw f32) of RMSNorm for x, g [.., H], w [H]; with `skip` [.., H] (the
/// gradient around the norm by the residual connection), dx + skip in the same pass.
pub(super) fn rms_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    skip: Option<&Tensor>,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "rms-norm backward";
    let h = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / h.max(1);
    let like_x = |t: &Tensor| -> Result<Tensor> {
        if t.shape() != x.shape() {
            bail!("{OP}: gradient of shape {:?} for x of shape {:?}", t.shape(), x.shape());
        }
        t.to_dtype(x.dtype())?.contiguous()
    };
    let (x, w, g) = (x.contiguous()?, w.to_dtype(x.dtype())?.contiguous()?, like_x(g)?);
    let skip = skip.map(like_x).transpose()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let skip_sl = skip.as_ref().map(|s| s.storage_and_layout());
    let (xs, ws, gs) = (cuda_of(&xs, OP)?, cuda_of(&ws, OP)?, cuda_of(&gs, OP)?);
    let dev = xs.device();
    let name = format!("rmsnorm_bwd_{}", suffix(x.dtype(), OP)?);
    let smem = (4 * h) as u32;
    let f = function_smem(dev, &kernels::RMSNORM, &name, smem)?;
    // A few blocks per SM, each striding over rows: fewer dw atomics than one block per row.
    let grid = rows.clamp(1, 256) as u32;
    with_float!(x.dtype(), OP, |T| {
        let (xv, wv, gv) = (view::<T>(xs, xl, OP)?, view::<T>(ws, wl, OP)?, view::<T>(gs, gl, OP)?);
        let skip_v = match &skip_sl {
            Some((s, l)) => Some(view::<T>(cuda_of(s, OP)?, l, OP)?),
            None => None,
        };
        let null = 0u64;
        let mut dx = unsafe { dev.alloc::<T>(rows * h)? };
        let mut dw = dev.alloc_zeros::<f32>(h)?;
        let (rows32, h32) = (rows as i32, h as i32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&xv).arg(&wv).arg(&gv);
        match &skip_v {
            Some(v) => b.arg(v),
            None => b.arg(&null),
        };
        b.arg(&mut dx).arg(&mut dw);
        b.arg(&rows32).arg(&h32).arg(&eps);
        // SAFETY: matches rmsnorm.cu; dw is zero-filled, smem holds h floats, skip (or a null
        // pointer) holds rows·h elements like x.
        unsafe { b.launch(cfg((grid, 1, 1), rms_block_bwd(h), smem)) }.w()?;
        Ok((tensor(dx, dev, x.shape().clone()), tensor(dw, dev, h)))
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rope(
    x: &CudaStorage,
    xl: &Layout,
    cos: &CudaStorage,
    cl: &Layout,
    sin: &CudaStorage,
    sl: &Layout,
) -> Result<CudaStorage> {
    const OP: &str = "rope";
    let (_, _, t, d) = xl.shape().dims4()?;
    let half = d / 2;
    let n = xl.shape().elem_count();
    if cl.shape().elem_count() < t * half || sl.shape().elem_count() < t * half {
        bail!("{OP}: tables cover {} positions × {half}, need {t}", cl.shape().elem_count() / half.max(1));
    }
    if cos.dtype() != sin.dtype() {
        bail!("{OP}: cos is {:?} but sin is {:?}", cos.dtype(), sin.dtype());
    }
    let dev = x.device();
    let (pairs, t32, d32) = ((n / 2) as i64, t as i32, d as i32);
    macro_rules! go {
        ($T:ty, $C:ty, $name:literal) => {{
            let f = function(dev, &kernels::ROPE, $name)?;
            let (xv, cv, sv) = (view::<$T>(x, xl, OP)?, view::<$C>(cos, cl, OP)?, view::<$C>(sin, sl, OP)?);
            let mut y = unsafe { dev.alloc::<$T>(n)? };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&cv).arg(&sv).arg(&mut y).arg(&pairs).arg(&t32).arg(&d32);
            // SAFETY: matches rope.cu; the tables hold at least t·d/2 elements (checked above).
            unsafe { b.launch(cfg_1d(n / 2)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }};
    }
    match (x.dtype(), cos.dtype()) {
        (DType::F32, DType::F32) => go!(f32, f32, "rope_f32_f32"),
        (DType::BF16, DType::BF16) => go!(bf16, bf16, "rope_bf16_bf16"),
        (DType::BF16, DType::F32) => go!(bf16, f32, "rope_bf16_f32"),
        (a, b) => bail!("{OP}: no cuda kernel for x {a:?} with tables {b:?}"),
    }
}

/// One launch of rope.cu's rope_heads: sizes [B, T, H, D], the tokens side's batch and token
/// strides (elements), the direction, and the rotation's sign (none: moved as they are).
#[derive(Clone, Copy)]
struct HeadsLaunch {
    dims: [usize; 4],
    tokens_strides: (usize, usize),
    split: bool,
    rotation: Option<f32>,
}

/// rope_heads' name for x's and the tables' dtypes.
fn rope_heads_name(x: DType, tables: DType) -> Result<&'static str> {
    Ok(match (x, tables) {
        (DType::F32, DType::F32) => "rope_heads_f32_f32",
        (DType::BF16, DType::BF16) => "rope_heads_bf16_bf16",
        (DType::BF16, DType::F32) => "rope_heads_bf16_f32",
        (a, c) => bail!("heads: no cuda kernel for x {a:?} with tables {c:?}"),
    })
}

/// Launch rope_heads from x into y (both views starting at their first element).
///
/// # Safety
/// x and y span what rope.cu's header says for `l` (the tokens side (B−1)·sb + (T−1)·st + H·D
/// elements, the heads side B·H·T·D), the tables (read only when rotating) T·D/2 each.
unsafe fn launch_rope_heads<T, C>(
    f: &CudaFunction,
    stream: &Arc<CudaStream>,
    (x, y): (&CudaView<T>, &mut CudaViewMut<T>),
    (cos, sin): (&CudaView<C>, &CudaView<C>),
    l: HeadsLaunch,
) -> Result<()> {
    let [b, t, h, d] = l.dims;
    let [b32, t32, h32, d32] = l.dims.map(|v| v as i32);
    let (sb, st) = (l.tokens_strides.0 as i64, l.tokens_strides.1 as i64);
    let (split, rotate, sign) = (l.split as i32, l.rotation.is_some() as i32, l.rotation.unwrap_or(1.0));
    let mut a = stream.launch_builder(f);
    a.arg(x).arg(y).arg(cos).arg(sin).arg(&b32).arg(&t32).arg(&h32).arg(&d32);
    a.arg(&sb).arg(&st).arg(&split).arg(&rotate).arg(&sign);
    // Work items of 8 elements (a rotated pair's 2·8 when rotating) on the kernel's 16-byte path.
    let items = (b * h * t * d).div_ceil(if rotate != 0 { 16 } else { 8 });
    unsafe { a.launch(cfg_1d(items)) }.w()?;
    Ok(())
}

/// Heads between [B, T, H·D] and [B, H, T, D] (ops::heads; rope.cu's rope_heads), rotated by
/// sign·θ with cos/sin [≥ T, D/2] when `rotation` is some sign. `split`: x is [B, T, H·D] with
/// unit-stride rows at any batch and token strides (a column view of a fused product), else
/// [B, H, T, D] contiguous; the output is the other layout, contiguous. Shapes checked by the
/// caller.
pub(super) fn rope_heads(
    x: &CudaStorage,
    xl: &Layout,
    (cos, cl): (&CudaStorage, &Layout),
    (sin, sl): (&CudaStorage, &Layout),
    dims: [usize; 4],
    split: bool,
    rotation: Option<f32>,
) -> Result<CudaStorage> {
    const OP: &str = "heads";
    let [b, t, h, d] = dims;
    let tokens_strides = if split {
        match xl.stride() {
            &[sb, st, 1] => (sb, st),
            other => bail!("{OP}: rows of [B, T, H·D] must be unit-stride, strides {other:?}"),
        }
    } else {
        (t * h * d, h * d)
    };
    if cos.dtype() != sin.dtype() {
        bail!("{OP}: cos is {:?} but sin is {:?}", cos.dtype(), sin.dtype());
    }
    let name = rope_heads_name(x.dtype(), cos.dtype())?;
    let dev = x.device();
    let f = function(dev, &kernels::ROPE, name)?;
    let n = b * h * t * d;
    let l = HeadsLaunch { dims, tokens_strides, split, rotation };
    macro_rules! go {
        ($T:ty, $C:ty) => {{
            let xv = if split { strided_view::<$T>(x, xl)? } else { view::<$T>(x, xl, OP)? };
            let (cv, sv) = (view::<$C>(cos, cl, OP)?, view::<$C>(sin, sl, OP)?);
            let mut y = unsafe { dev.alloc::<$T>(n)? };
            // SAFETY: x's view spans its layout (strided_view, or contiguous B·H·T·D), y holds
            // B·H·T·D, the tables T·D/2 each (checked by the caller).
            unsafe { launch_rope_heads(&f, &dev.cuda_stream(), (&xv, &mut y.slice_mut(..)), (&cv, &sv), l) }?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }};
    }
    match name {
        "rope_heads_f32_f32" => go!(f32, f32),
        "rope_heads_bf16_bf16" => go!(bf16, bf16),
        _ => go!(bf16, f32),
    }
}

/// ops::heads' `split_heads_backward_cat` on CUDA: each part g [B, Hᵢ, T, D] (contiguous) merged
/// into its column block of one [B, T, ΣHᵢ·D] tensor, rotated by −θ where it has tables
/// (contiguous [≥ T, D/2]); one rope_heads launch a part. Shapes checked by the caller.
pub(super) fn merge_heads_cat(parts: &[(Tensor, Option<(Tensor, Tensor)>)]) -> Result<Tensor> {
    const OP: &str = "split-heads backward (concatenated)";
    let Some((first, _)) = parts.first() else { bail!("{OP}: no parts") };
    let (b, _, t, d) = first.dims4()?;
    let width: usize = parts.iter().map(|(g, _)| g.dim(1).unwrap_or(0) * d).sum();
    let (fs, _) = first.storage_and_layout();
    let dev = cuda_of(&fs, OP)?.device().clone();
    drop(fs);
    let stream = dev.cuda_stream();
    with_float!(first.dtype(), OP, |T| {
        let mut y = unsafe { dev.alloc::<T>(b * t * width)? };
        let mut col = 0;
        for (g, tables) in parts {
            let h = g.dim(1)?;
            let (gs, gl) = g.storage_and_layout();
            let gv = view::<T>(cuda_of(&gs, OP)?, gl, OP)?;
            let l = HeadsLaunch {
                dims: [b, t, h, d],
                tokens_strides: (t * width, width),
                split: false,
                rotation: None,
            };
            // The output's columns col.. of every row: the view starts there and runs to the end.
            let mut out = y.slice_mut(col..);
            match tables {
                None => {
                    let f = function(&dev, &kernels::ROPE, rope_heads_name(g.dtype(), g.dtype())?)?;
                    let empty = gv.slice(0..0);
                    // SAFETY: g holds B·H·T·D; from column `col` the output spans
                    // (B−1)·T·W + (T−1)·W + H·D ≤ B·T·W − col elements; no tables are read.
                    unsafe { launch_rope_heads(&f, &stream, (&gv, &mut out), (&empty, &empty), l) }?;
                }
                Some((cos, sin)) => {
                    let (cs, cl) = cos.storage_and_layout();
                    let (ss, sl) = sin.storage_and_layout();
                    let (cs, ss) = (cuda_of(&cs, OP)?, cuda_of(&ss, OP)?);
                    let f = function(&dev, &kernels::ROPE, rope_heads_name(g.dtype(), cs.dtype())?)?;
                    let l = HeadsLaunch { rotation: Some(-1.0), ..l };
                    macro_rules! rotated {
                        ($C:ty) => {{
                            let (cv, sv) = (view::<$C>(cs, cl, OP)?, view::<$C>(ss, sl, OP)?);
                            // SAFETY: as above, and the tables hold T·D/2 each (the caller's check).
                            unsafe { launch_rope_heads(&f, &stream, (&gv, &mut out), (&cv, &sv), l) }?
                        }};
                    }
                    match cs.dtype() {
                        DType::F32 => rotated!(f32),
                        _ => rotated!(T),
                    }
                }
            }
            col += h * d;
        }
        Ok(tensor(y, &dev, (b, t, width)))
    })
}

/// One inference step into attention (ops::kv_step): q, k, v [B, T, H·D] views with unit-stride
/// rows; q rotated is returned as [B, Hq, T, D], k rotated and v written into the cache `kv`
/// [2, B, G, cap, D] (contiguous) at positions pos..pos+T. Shapes checked by the caller.
pub(super) fn rope_qkv_cache(
    [q, k, v]: [&Tensor; 3],
    (cos, sin): (&Tensor, &Tensor),
    kv: &mut CudaStorage,
    n: &super::kv_step::Dims,
    pos: usize,
) -> Result<Tensor> {
    const OP: &str = "rope-qkv-into-cache";
    let guards = [q, k, v, cos, sin].map(|x| x.storage_and_layout());
    let mut st = Vec::with_capacity(5);
    for (s, l) in &guards {
        st.push((cuda_of(s, OP)?, *l));
    }
    let strides = |i: usize| (st[i].1.stride()[0] as i64, st[i].1.stride()[1] as i64);
    let dev = kv.device().clone();
    let f = rope_qkv_function(&dev, q.dtype(), cos.dtype())?;
    macro_rules! go {
        ($T:ty, $C:ty) => {{
            let qv = strided_view::<$T>(st[0].0, st[0].1)?;
            let kv_in = strided_view::<$T>(st[1].0, st[1].1)?;
            let vv = strided_view::<$T>(st[2].0, st[2].1)?;
            let (cv, sv) = (view::<$C>(st[3].0, st[3].1, OP)?, view::<$C>(st[4].0, st[4].1, OP)?);
            let mut q_out = unsafe { dev.alloc::<$T>(n.b * n.hq * n.t * n.d)? };
            let mut cache =
                kv.as_cuda_slice_mut::<$T>()?.slice_mut(n.start..n.start + 2 * n.b * n.g * n.cap * n.d);
            let stream = dev.cuda_stream();
            {
                let ((qa, _g0), (ka, _g1), (va, _g2)) =
                    (qv.device_ptr(&stream), kv_in.device_ptr(&stream), vv.device_ptr(&stream));
                let ((ca, _g3), (sa, _g4)) = (cv.device_ptr(&stream), sv.device_ptr(&stream));
                let ((qo, _g5), (cache_a, _g6)) =
                    (q_out.device_ptr_mut(&stream), cache.device_ptr_mut(&stream));
                let args = RopeQkvArgs {
                    q: (qa, strides(0)),
                    k: (ka, strides(1)),
                    v: (va, strides(2)),
                    tables: (ca, sa),
                    q_out: qo,
                    kv: cache_a,
                };
                // SAFETY: every view reaches its last row (sliced to it), the tables hold T rows,
                // the cache 2·B·G·cap·D elements and pos + T ≤ cap (checked by the op), and
                // q_out's B·Hq·T·D elements are all written.
                unsafe { launch_rope_qkv(&stream, &f, &args, n, StepPos::Host(pos)) }?;
            }
            Ok(tensor(q_out, &dev, (n.b, n.hq, n.t, n.d)))
        }};
    }
    match (q.dtype(), cos.dtype()) {
        (DType::F32, DType::F32) => go!(f32, f32),
        (DType::BF16, DType::BF16) => go!(bf16, bf16),
        (DType::BF16, DType::F32) => go!(bf16, f32),
        (a, b) => bail!("{OP}: no cuda kernel for q {a:?} with tables {b:?}"),
    }
}

/// softmax(scale·x) over the last dimension.
pub(super) fn softmax(x: &CudaStorage, l: &Layout, scale: f32) -> Result<CudaStorage> {
    const OP: &str = "softmax-last-dim";
    let n = l.dims().last().copied().unwrap_or(1);
    let rows = l.shape().elem_count() / n.max(1);
    let dev = x.device();
    let f = function(dev, &kernels::SOFTMAX, &format!("softmax_{}", suffix(x.dtype(), OP)?))?;
    with_float!(x.dtype(), OP, |T| {
        let xv = view::<T>(x, l, OP)?;
        let mut y = unsafe { dev.alloc::<T>(rows * n)? };
        let n32 = n as i32;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&xv).arg(&mut y).arg(&n32).arg(&scale);
        // SAFETY: matches softmax.cu.
        unsafe { b.launch(cfg((rows as u32, 1, 1), row_block(n, 256), 0)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

// ---------------------------------------------------------------------------------------------
// SwiGLU, cross-entropy, AdamW
// ---------------------------------------------------------------------------------------------

pub(super) fn swiglu_fwd(g: &CudaStorage, gl: &Layout, u: &CudaStorage, ul: &Layout) -> Result<CudaStorage> {
    const OP: &str = "swiglu";
    let n = gl.shape().elem_count();
    if ul.shape() != gl.shape() || u.dtype() != g.dtype() {
        bail!("{OP}: gate {:?} {:?} and up {:?} {:?} differ", gl.shape(), g.dtype(), ul.shape(), u.dtype());
    }
    let dev = g.device();
    let f = function(dev, &kernels::SWIGLU, &format!("swiglu_fwd_{}", suffix(g.dtype(), OP)?))?;
    with_float!(g.dtype(), OP, |T| {
        let (gv, uv) = (view::<T>(g, gl, OP)?, view::<T>(u, ul, OP)?);
        let mut y = unsafe { dev.alloc::<T>(n)? };
        let n64 = n as i64;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&gv).arg(&uv).arg(&mut y).arg(&n64);
        // SAFETY: matches swiglu.cu (8 elements a thread).
        unsafe { b.launch(cfg_1d(n.div_ceil(8))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

/// act(x + b) (+ r) for x, r [.., C] and b [C] (ops::epilogue; checked by the caller); without
/// b, act(x) (+ r) (ops::add_detached: x + r).
pub(super) fn bias_act(
    (x, xl): (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
    r: Option<(&CudaStorage, &Layout)>,
    cols: usize,
    act: super::epilogue::Act,
) -> Result<CudaStorage> {
    const OP: &str = "bias-act";
    let dtype = x.dtype();
    if b.is_some_and(|(b, _)| b.dtype() != dtype) || r.is_some_and(|(r, _)| r.dtype() != dtype) {
        bail!("{OP}: x, the bias and the residual must share a dtype");
    }
    let n = xl.shape().elem_count();
    let dev = x.device();
    let f = function(dev, &kernels::BIAS_ACT, &format!("bias_act_{}", suffix(dtype, OP)?))?;
    with_float!(dtype, OP, |T| {
        let xv = view::<T>(x, xl, OP)?;
        let bv = b.map(|(b, bl)| view::<T>(b, bl, OP)).transpose()?;
        let rv = r.map(|(r, rl)| view::<T>(r, rl, OP)).transpose()?;
        let mut y = unsafe { dev.alloc::<T>(n)? };
        let (n64, c32, act) = (n as i64, cols as i32, act.code());
        let null = 0u64; // no bias, no residual
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&f);
        launch.arg(&xv);
        match &bv {
            Some(bv) => launch.arg(bv),
            None => launch.arg(&null),
        };
        match &rv {
            Some(rv) => launch.arg(rv),
            None => launch.arg(&null),
        };
        launch.arg(&mut y).arg(&n64).arg(&c32).arg(&act);
        // SAFETY: matches bias_act.cu: x, r and y hold n elements, b (if any) one row of `cols`.
        unsafe { launch.launch(cfg_1d(n.div_ceil(8))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

/// x [..] (contiguous) cast f32 → bf16 or bf16 → f32 by cast.cu (a thread per 8 elements);
/// `None` for other pairs.
pub(super) fn cast(x: &CudaStorage, xl: &Layout, to: DType) -> Result<Option<CudaStorage>> {
    /// y [n] of B from x of A by cast.cu's `name`.
    fn run<A: CudaDType, B: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        x: &CudaStorage,
        xl: &Layout,
        name: &str,
    ) -> Result<CudaStorage> {
        let n = xl.shape().elem_count();
        let dev = x.device();
        let f = function(dev, &kernels::CAST, name)?;
        let (xv, n64) = (view::<A>(x, xl, "cast")?, n as i64);
        let mut y = unsafe { dev.alloc::<B>(n)? };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&xv).arg(&mut y).arg(&n64);
        // SAFETY: matches cast.cu: x and y hold n elements.
        unsafe { b.launch(cfg_1d(n.div_ceil(8))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    Ok(match (x.dtype(), to) {
        (DType::F32, DType::BF16) => Some(run::<f32, bf16>(x, xl, "cast_f32_bf16")?),
        (DType::BF16, DType::F32) => Some(run::<bf16, f32>(x, xl, "cast_bf16_f32")?),
        _ => None,
    })
}

/// [2·N]: d gate then d up.
#[allow(clippy::too_many_arguments)]
pub(super) fn swiglu_bwd(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
    dy: &CudaStorage,
    dl: &Layout,
) -> Result<CudaStorage> {
    const OP: &str = "swiglu backward";
    let n = gl.shape().elem_count();
    if ul.shape() != gl.shape()
        || dl.shape() != gl.shape()
        || u.dtype() != g.dtype()
        || dy.dtype() != g.dtype()
    {
        bail!("{OP}: gate, up and the gradient must share shape and dtype");
    }
    let dev = g.device();
    let f = function(dev, &kernels::SWIGLU, &format!("swiglu_bwd_{}", suffix(g.dtype(), OP)?))?;
    with_float!(g.dtype(), OP, |T| {
        let (gv, uv, dv) = (view::<T>(g, gl, OP)?, view::<T>(u, ul, OP)?, view::<T>(dy, dl, OP)?);
        let mut out = unsafe { dev.alloc::<T>(2 * n)? };
        let n64 = n as i64;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&gv).arg(&uv).arg(&dv).arg(&mut out).arg(&n64);
        // SAFETY: matches swiglu.cu; out holds 2n elements.
        unsafe { b.launch(cfg_1d(n.div_ceil(8))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    })
}

/// (loss [N] f32, dlogits [N, V] in the logits' dtype) for logits [N, V] and targets [N] i64.
pub(super) fn cross_entropy(
    logits: &CudaStorage,
    ll: &Layout,
    targets: &CudaStorage,
    tl: &Layout,
    ignore_index: i64,
) -> Result<(CudaStorage, Tensor)> {
    const OP: &str = "cross-entropy";
    let (n, v) = ll.shape().dims2()?;
    if tl.shape().elem_count() != n {
        bail!("{OP}: {} targets for {n} rows of logits", tl.shape().elem_count());
    }
    let dev = logits.device();
    let f =
        function(dev, &kernels::CROSS_ENTROPY, &format!("cross_entropy_{}", suffix(logits.dtype(), OP)?))?;
    let tv = view::<i64>(targets, tl, OP)?;
    with_float!(logits.dtype(), OP, |T| {
        let lv = view::<T>(logits, ll, OP)?;
        let mut loss = unsafe { dev.alloc::<f32>(n)? };
        let mut dlogits = unsafe { dev.alloc::<T>(n * v)? };
        let v32 = v as i32;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&lv).arg(&tv).arg(&mut loss).arg(&mut dlogits).arg(&v32).arg(&ignore_index);
        // SAFETY: matches cross_entropy.cu.
        unsafe { b.launch(cfg((n as u32, 1, 1), row_block(v, 1024), 0)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(loss, dev.clone()), tensor(dlogits, dev, (n, v))))
    })
}

/// d logits = round_T(dlogits · dloss[row]) for dlogits [N, V] and dloss [N] (f32).
pub(super) fn cross_entropy_bwd(dlogits: &Tensor, dloss: &Tensor) -> Result<Tensor> {
    const OP: &str = "cross-entropy backward";
    let (n, v) = dlogits.dims2()?;
    let dloss = dloss.to_dtype(DType::F32)?.contiguous()?;
    let (ds, dl) = dlogits.storage_and_layout();
    let (gs, gl) = dloss.storage_and_layout();
    let (ds, gs) = (cuda_of(&ds, OP)?, cuda_of(&gs, OP)?);
    let dev = ds.device();
    let f =
        function(dev, &kernels::CROSS_ENTROPY, &format!("cross_entropy_bwd_{}", suffix(ds.dtype(), OP)?))?;
    with_float!(ds.dtype(), OP, |T| {
        let (dv, gv) = (view::<T>(ds, dl, OP)?, view::<f32>(gs, gl, OP)?);
        let mut dx = unsafe { dev.alloc::<T>(n * v)? };
        let (nv, v32) = ((n * v) as i64, v as i32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&dv).arg(&gv).arg(&mut dx).arg(&nv).arg(&v32);
        // SAFETY: matches cross_entropy.cu (cross_entropy_bwd).
        unsafe { b.launch(cfg_1d((n * v).div_ceil(8))) }.w()?;
        Ok(tensor(dx, dev, (n, v)))
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adamw(
    p: &mut CudaStorage,
    pl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    m: &mut CudaStorage,
    ml: &Layout,
    v: &mut CudaStorage,
    vl: &Layout,
    s: &AdamWScalars,
) -> Result<()> {
    const OP: &str = "adamw";
    let n = pl.shape().elem_count();
    for (what, l) in [("grad", gl), ("exp_avg", ml), ("exp_avg_sq", vl)] {
        if l.shape().elem_count() != n {
            bail!("{OP}: {what} has {} elements, the parameter {n}", l.shape().elem_count());
        }
    }
    let range = |l: &Layout| match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => bail!("{OP}: every tensor must be contiguous"),
    };
    let (pr, mr, vr) = (range(pl)?, range(ml)?, range(vl)?);
    let dev = p.device().clone();
    let f = function(&dev, &kernels::ADAMW, "adamw_f32")?;
    let gv = view::<f32>(g, gl, OP)?;
    let mut pv = p.as_cuda_slice_mut::<f32>()?.slice_mut(pr);
    let mut mv = m.as_cuda_slice_mut::<f32>()?.slice_mut(mr);
    let mut vv = v.as_cuda_slice_mut::<f32>()?.slice_mut(vr);
    let (n64, decay_on, decay) = (n as i64, s.decay.is_some() as i32, s.decay.unwrap_or(1.0));
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut pv).arg(&gv).arg(&mut mv).arg(&mut vv).arg(&n64);
    b.arg(&s.grad_scale).arg(&decay_on).arg(&decay);
    b.arg(&s.w).arg(&s.one_minus_w).arg(&s.beta2).arg(&s.one_minus_beta2);
    b.arg(&s.neg_step_size).arg(&s.bc2_sqrt).arg(&s.eps);
    // SAFETY: matches adamw.cu; all four buffers hold n f32 (checked above).
    unsafe { b.launch(cfg_1d(n.div_ceil(8))) }.w()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Decode GEMV
// ---------------------------------------------------------------------------------------------

/// What follows the product in the GEMV kernel (gemv.cu's epilogues).
#[derive(Clone, Copy)]
pub(super) enum GemvEpilogue<'a> {
    /// y = a·b.
    Plain,
    /// y = a·b + r, r [M, N] contiguous: the residual add after a projection.
    Add(&'a CudaStorage, &'a Layout),
    /// b = wᵀ [K, 2N] for w = gate rows then up rows: y = silu(a·b_gate)·(a·b_up), N columns.
    SwiGlu,
}

impl GemvEpilogue<'_> {
    fn kind(&self) -> GemvKind {
        match self {
            GemvEpilogue::Plain => GemvKind::Plain,
            GemvEpilogue::Add(..) => GemvKind::Add,
            GemvEpilogue::SwiGlu => GemvKind::SwiGlu,
        }
    }
}

/// `a · b` (then `epilogue`) through gemv.cu when it is a few rows against a linear's weight:
/// a [M, K] with rows of unit stride, M ≤ [`super::cuda_gemv_rows`], b = wᵀ [K, N] for a row-major
/// w [N, K] (strides [1, ldw]), same float dtype, K, the row strides and both offsets multiples
/// of 8 (16-byte loads). `None` for anything else: the caller runs cuBLAS (and the epilogue).
pub(super) fn gemv(
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
    epilogue: GemvEpilogue,
) -> Result<Option<CudaStorage>> {
    const OP: &str = "matmul (gemv)";
    let ((m, k), (k2, wn)) = (la.shape().dims2()?, lb.shape().dims2()?);
    // Output columns: the weight's rows, or half of them (gate, then up) for SwiGLU.
    let swiglu = matches!(epilogue, GemvEpilogue::SwiGlu);
    let n = if swiglu { wn / 2 } else { wn };
    let dtype = a.dtype();
    if !(1..=super::cuda_gemv_rows()?).contains(&m)
        || n == 0
        || (swiglu && wn % 2 != 0)
        || k == 0
        || k != k2
        || i32::try_from(wn.max(k)).is_err()
        || b.dtype() != dtype
        || !matches!(dtype, DType::F32 | DType::BF16)
    {
        return Ok(None);
    }
    let (sa, sb) = (la.stride(), lb.stride());
    // A single row's stride is never used; the kernel still wants it 16-byte aligned.
    let ldx = if m == 1 { k } else { sa[0] };
    let ldw = if wn == 1 { k } else { sb[1] };
    let aligned = |v: usize| v.is_multiple_of(8);
    if sa[1] != 1
        || sb[0] != 1
        || ![k, ldx, ldw, la.start_offset(), lb.start_offset()].into_iter().all(aligned)
    {
        return Ok(None);
    }
    let residual = match epilogue {
        GemvEpilogue::Add(r, lr) => match lr.contiguous_offsets() {
            Some((start, end)) if end - start == m * n && r.dtype() == dtype => Some((r, start)),
            _ => return Ok(None),
        },
        _ => None,
    };
    let dev = a.device();
    let f = gemv_function(dev, epilogue.kind(), dtype, m)?;
    with_float!(dtype, OP, |T| {
        let (xv, wv) = (strided_view::<T>(a, la)?, strided_view::<T>(b, lb)?);
        let rv = residual
            .map(|(r, start)| r.as_cuda_slice::<T>().map(|s| s.slice(start..start + m * n)))
            .transpose()?;
        let mut y = unsafe { dev.alloc::<T>(m * n)? };
        let stream = dev.cuda_stream();
        {
            let ((x, _gx), (w, _gw)) = (xv.device_ptr(&stream), wv.device_ptr(&stream));
            let r = rv.as_ref().map(|r| r.device_ptr(&stream));
            let (ya, _gy) = y.device_ptr_mut(&stream);
            let args =
                GemvArgs { x, ldx, w, ldw, r: r.as_ref().map(|(a, _)| *a), y: ya, m, n, k, norm: None };
            // SAFETY: x holds M rows ldx apart, w N (2N for SwiGLU) rows ldw apart (sliced to
            // exactly that), both 16-byte aligned: every CudaStorage is a candle allocation
            // (cuMemAllocAsync: 256-byte aligned) and the offsets and strides were checked to be
            // multiples of 8 elements; r M·N elements; all M·N outputs are written.
            unsafe { launch_gemv(&stream, &f, &args) }?;
        }
        GEMV_LAUNCHES.with(|c| c.set(c.get() + 1));
        Ok(Some(CudaStorage::wrap_cuda_slice(y, dev.clone())))
    })
}

/// [`gemv`] on tensors, outside autograd: x [.., K] (its rows one run), wt = wᵀ, the residual
/// r [.., N] for [`GemvEpilogue::Add`] (`swiglu` false) or SwiGLU of the gate/up halves
/// (`swiglu` true). The result has x's leading dims; `None` where the kernel does not apply.
pub(super) fn gemv_tensor(
    x: &Tensor,
    wt: &Tensor,
    r: Option<&Tensor>,
    swiglu: bool,
) -> Result<Option<Tensor>> {
    const OP: &str = "matmul (gemv)";
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = wt.storage_and_layout();
    let rows = match super::linear::rows_view(xl) {
        Ok(l) => l,
        Err(_) => return Ok(None),
    };
    let Ok((_, wn)) = wl.shape().dims2() else { return Ok(None) }; // the caller's matmul names it
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has rows") = if swiglu { wn / 2 } else { wn };
    if r.is_some_and(|r| r.dims() != dims) {
        return Ok(None); // the caller's add reports (or broadcasts) a mismatched residual
    }
    let rg = r.map(|r| r.storage_and_layout());
    let epilogue = match &rg {
        Some((rs, rl)) => GemvEpilogue::Add(cuda_of(rs, OP)?, rl),
        None if swiglu => GemvEpilogue::SwiGlu,
        None => GemvEpilogue::Plain,
    };
    let Some(y) = gemv(cuda_of(&xs, OP)?, &rows, cuda_of(&ws, OP)?, wl, epilogue)? else { return Ok(None) };
    Ok(Some(Tensor::from_storage(Storage::Cuda(y), dims, BackpropOp::none(), false)))
}

/// Warps per GEMV block (gemv.cu's GEMV_WARPS).
const GEMV_WARPS: usize = 4;

/// Output columns per GEMV warp for M rows (gemv.cu's gemv_cols).
fn gemv_cols(m: usize) -> usize {
    match m {
        0..=2 => 1,
        3..=4 => 2,
        _ => 4,
    }
}

thread_local! {
    static GEMV_LAUNCHES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// GEMV kernel launches so far on this thread (tests check that a product took the kernel; per
/// thread, so tests running alongside do not count).
pub fn gemv_launches() -> usize {
    GEMV_LAUNCHES.with(|c| c.get())
}

// ---------------------------------------------------------------------------------------------
// Decode attention
// ---------------------------------------------------------------------------------------------

const DECODE_THREADS: u32 = 128;

/// [B, 1, Hq·D] attention output of q [B, Hq, 1, D] against k, v [B, Hk, S, D]: each read in
/// place when its rows of D are contiguous and its offset and strides are multiples of 8
/// elements (16-byte loads; the KV cache's views are), else copied first.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_attention(
    q: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    lk: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    (b, hq, hk, s, d): (usize, usize, usize, usize, usize),
    scale: f32,
) -> Result<CudaStorage> {
    const OP: &str = "decode-attention";
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype {
        bail!("{OP}: q {dtype:?}, k {:?} and v {:?} must share a dtype", k.dtype(), v.dtype());
    }
    if !ATTENTION_HEAD_DIMS.contains(&d) {
        bail!("{OP}: no kernel for head dim {d} (one of {ATTENTION_HEAD_DIMS:?})");
    }
    // A fresh contiguous copy of a view (for views the 16-byte loads cannot read in place).
    let copy = |x: &CudaStorage, l: &Layout| -> Result<CudaStorage> {
        // SAFETY: every element is written by the copy.
        let mut c = unsafe { x.device().alloc_uninit(l.shape(), dtype)? };
        x.copy_strided_src(&mut c, 0, l)?;
        Ok(c)
    };
    let qc;
    let (q, q0) = match lq.contiguous_offsets() {
        Some((q0, _)) if q0 % 8 == 0 => (q, q0),
        _ => {
            qc = copy(q, lq)?;
            (&qc, 0)
        }
    };
    // K/V views the kernel reads in place: rows of D contiguous, offset and strides multiples of
    // 8, and K and V alike (one pair of strides goes to the kernel).
    let in_place = |l: &Layout| {
        let st = l.stride();
        st[3] == 1 && st[2] == d && [l.start_offset(), st[0], st[1]].iter().all(|x| x % 8 == 0)
    };
    let (kc, vc, packed);
    let ((k, lk), (v, lv)) = if in_place(lk) && in_place(lv) && lk.stride() == lv.stride() {
        ((k, lk), (v, lv))
    } else {
        (kc, vc, packed) = (copy(k, lk)?, copy(v, lv)?, Layout::contiguous(lk.shape()));
        ((&kc, &packed), (&vc, &packed))
    };
    let (sb, sh) = (lk.stride()[0] as i64, lk.stride()[1] as i64);
    let ns = decode_splits(b * hq, s);
    let dev = q.device();
    let (attend, combine) = decode_attention_functions(dev, dtype, d)?;
    let stream = dev.cuda_stream();
    with_float!(dtype, OP, |T| {
        let qv = q.as_cuda_slice::<T>()?.slice(q0..q0 + b * hq * d);
        let (kv, vv) = (strided_view::<T>(k, lk)?, strided_view::<T>(v, lv)?);
        let mut out = unsafe { dev.alloc::<T>(b * hq * d)? };
        // Several splits leave their partials (po, pm, pl) for the combine kernel; one split
        // writes out directly.
        let rows = b * hq;
        let mut partials = if ns > 1 {
            // SAFETY: the splits write every partial before the combine reads it.
            unsafe {
                Some((
                    dev.alloc::<f32>(rows * ns * d)?,
                    dev.alloc::<f32>(rows * ns)?,
                    dev.alloc::<f32>(rows * ns)?,
                ))
            }
        } else {
            None
        };
        {
            let ((qa, _g0), (ka, _g1), (va, _g2)) =
                (qv.device_ptr(&stream), kv.device_ptr(&stream), vv.device_ptr(&stream));
            let (oa, _g3) = out.device_ptr_mut(&stream);
            let parts = partials.as_mut().map(|(po, pm, pl)| {
                (po.device_ptr_mut(&stream), pm.device_ptr_mut(&stream), pl.device_ptr_mut(&stream))
            });
            let args = DecodeAttnArgs {
                q: qa,
                k: ka,
                v: va,
                strides: (sb, sh),
                out: oa,
                partials: parts.as_ref().map(|((po, _), (pm, _), (pl, _))| (*po, *pm, *pl)),
                dims: (b, hq, hk, d),
                splits: ns,
                keys: StepPos::Host(s),
                scale,
                // No counts: this thread's stream may run beside another's on the device (the
                // ranks of a tensor-parallel model decode at once), and a shared count would mix
                // their splits; the combine kernel follows instead (the same arithmetic).
                counts: 0,
            };
            // SAFETY: q holds B·Hq rows of D, k and v every (b, h, j) row the strides reach
            // (sliced to exactly that), NS = decode_splits for S; po/pm/pl hold every split's
            // partials.
            unsafe { launch_decode_attention(&stream, (&attend, &combine), &args) }?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    })
}

// ---------------------------------------------------------------------------------------------
// Launches on device addresses: the one place each decode kernel's argument list is written,
// shared by the tensor launchers above and by the CUDA-graph decode step (ops::decode_graph),
// which records them over buffers it owns. Each is `unsafe`: the caller vouches that every
// address holds what the kernel's header comment says.
// ---------------------------------------------------------------------------------------------

/// A device address for a kernel's pointer argument (0 is null).
pub(super) type Addr = u64;

/// The device address of contiguous `t`'s first element (f32, bf16 or u32; `op` names it in
/// errors).
pub(super) fn tensor_address(t: &Tensor, stream: &CudaStream, op: &str) -> Result<Addr> {
    let (s, l) = t.storage_and_layout();
    let s = cuda_of(&s, op)?;
    if s.dtype() == DType::U32 {
        return Ok(view::<u32>(s, l, op)?.device_ptr(stream).0);
    }
    with_float!(s.dtype(), op, |T| Ok(view::<T>(s, l, op)?.device_ptr(stream).0))
}

/// Where a decode kernel finds the position: an argument (eager steps), or a device int
/// (a step replayed from a CUDA graph, whose launches never change).
#[derive(Clone, Copy)]
pub(super) enum StepPos {
    Host(usize),
    Device(Addr),
}

impl StepPos {
    /// The kernel's (int value, int pointer) pair for this position.
    fn args(self) -> (i32, Addr) {
        match self {
            StepPos::Host(p) => (p as i32, 0),
            StepPos::Device(a) => (-1, a),
        }
    }
}

pub(super) fn rms_norm_function(dev: &CudaDevice, dtype: DType) -> Result<CudaFunction> {
    function(dev, &kernels::RMSNORM, &format!("rmsnorm_fwd_{}", suffix(dtype, "rms-norm")?))
}

/// rmsnorm.cu's forward: y [rows, h] = RMSNorm(x [rows, h]) · w [h].
///
/// # Safety
/// `x`, `y` hold rows·h elements and `w` h of the function's dtype.
pub(super) unsafe fn launch_rms_norm(
    stream: &CudaStream,
    f: &CudaFunction,
    [x, w, y]: [Addr; 3],
    rows: usize,
    h: usize,
    eps: f32,
) -> Result<()> {
    let h32 = h as i32;
    let mut b = stream.launch_builder(f);
    b.arg(&x).arg(&w).arg(&y).arg(&h32).arg(&eps);
    unsafe { b.launch(cfg((rows as u32, 1, 1), rms_block(h), 0)) }.w()?;
    Ok(())
}

/// The kernel family of a GEMV launch (gemv.cu's epilogues).
#[derive(Clone, Copy)]
pub(super) enum GemvKind {
    Plain,
    Add,
    SwiGlu,
    /// Plain, of the RMSNorm of x ([`GemvNormArgs`]; 1 or 2 rows).
    Norm,
    /// SwiGLU, of the RMSNorm of x ([`GemvNormArgs`]; 1 or 2 rows).
    NormSwiGlu,
}

pub(super) fn gemv_function(
    dev: &CudaDevice,
    kind: GemvKind,
    dtype: DType,
    m: usize,
) -> Result<CudaFunction> {
    let kind = match kind {
        GemvKind::Plain => "gemv",
        GemvKind::Add => "gemv_add",
        GemvKind::SwiGlu => "gemv_swiglu",
        GemvKind::Norm => "gemv_norm",
        GemvKind::NormSwiGlu => "gemv_norm_swiglu",
    };
    function(dev, &kernels::GEMV, &format!("{kind}_{}_m{m}", suffix(dtype, "matmul (gemv)")?))
}

/// One GEMV launch: y [m, n] = x [m, k] (rows `ldx` apart) · wᵀ, w rows `ldw` apart (2n rows
/// for SwiGLU), plus r [m, n] for the add epilogue.
pub(super) struct GemvArgs {
    pub x: Addr,
    pub ldx: usize,
    pub w: Addr,
    pub ldw: usize,
    pub r: Option<Addr>,
    pub y: Addr,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The RMSNorm the `Norm` kinds apply to x first.
    pub norm: Option<GemvNormArgs>,
}

/// The RMSNorm before a GEMV (gemv.cu's `gemv_norm`): weight `w` [k] (16-byte aligned), eps, and
/// the size of x's elements (the launch's shared memory holds the normalised rows).
#[derive(Clone, Copy)]
pub(super) struct GemvNormArgs {
    pub w: Addr,
    pub eps: f32,
    pub dtype: DType,
}

/// Most threads of the RMSNorm a gemv_norm block replays: two virtual warps for each of its 4
/// (gemv.cu's GEMV_NORM_VW · 32 · GEMV_WARPS), so rows of at most 4096.
const GEMV_NORM_MAX_VB: usize = 256;

/// Whether gemv_norm can normalise `m` rows of `k` exactly as rmsnorm.cu does (its 16-byte path
/// with [`rms_block`] threads: k a multiple of 8, at most two chunks of 8 a thread, at most
/// [`GEMV_NORM_MAX_VB`] threads), with kernels for 1 or 2 rows (so at most 2·4096 f32 of shared
/// memory: 32 KiB, within the default 48).
pub(super) fn gemv_norm_fits(m: usize, k: usize) -> bool {
    let vb = rms_block(k) as usize;
    k.is_multiple_of(8) && k.div_ceil(8).div_ceil(vb) <= 2 && vb <= GEMV_NORM_MAX_VB && (1..=2).contains(&m)
}

/// # Safety
/// The buffers hold what [`GemvArgs`] says, x and w 16-byte aligned with k, ldx and ldw
/// multiples of 8 (gemv.cu's header), 1 ≤ m ≤ 8, `r` is given exactly for `GemvKind::Add`,
/// `norm` exactly for the `Norm` kinds (with [`gemv_norm_fits`]).
pub(super) unsafe fn launch_gemv(stream: &CudaStream, f: &CudaFunction, a: &GemvArgs) -> Result<()> {
    let (ldx, ldw, n32, k32) = (a.ldx as i64, a.ldw as i64, a.n as i32, a.k as i32);
    let mut b = stream.launch_builder(f);
    b.arg(&a.x).arg(&ldx).arg(&a.w).arg(&ldw);
    if let Some(r) = &a.r {
        b.arg(r);
    }
    b.arg(&a.y).arg(&n32).arg(&k32);
    let vb = rms_block(a.k) as i32;
    let mut smem = 0;
    if let Some(norm) = &a.norm {
        b.arg(&norm.w).arg(&norm.eps).arg(&vb);
        smem = (a.m * a.k * norm.dtype.size_in_bytes()) as u32;
    }
    let blocks = a.n.div_ceil(GEMV_WARPS * gemv_cols(a.m));
    unsafe { b.launch(cfg((blocks as u32, 1, 1), 32 * GEMV_WARPS as u32, smem)) }.w()?;
    Ok(())
}

pub(super) fn rope_qkv_function(dev: &CudaDevice, x: DType, tables: DType) -> Result<CudaFunction> {
    let name = match (x, tables) {
        (DType::F32, DType::F32) => "rope_qkv_cache_f32_f32",
        (DType::BF16, DType::BF16) => "rope_qkv_cache_bf16_bf16",
        (DType::BF16, DType::F32) => "rope_qkv_cache_bf16_f32",
        (a, b) => bail!("rope-qkv-into-cache: no cuda kernel for q {a:?} with tables {b:?}"),
    };
    function(dev, &kernels::ROPE, name)
}

/// The buffers of a rope + KV-cache write (rope.cu's rope_qkv_cache): q, k, v with their
/// (batch, position) strides, the (cos, sin) tables, q_out [B, Hq, T, D], kv [2, B, G, cap, D].
pub(super) struct RopeQkvArgs {
    pub q: (Addr, (i64, i64)),
    pub k: (Addr, (i64, i64)),
    pub v: (Addr, (i64, i64)),
    pub tables: (Addr, Addr),
    pub q_out: Addr,
    pub kv: Addr,
}

/// # Safety
/// The buffers hold what rope.cu's header says for `n` (its `start` unused: `a.kv` is the
/// cache's first element; the tables T rows from the position for [`StepPos::Host`], every row
/// below `cap` for [`StepPos::Device`]), position + T ≤ cap.
pub(super) unsafe fn launch_rope_qkv(
    stream: &CudaStream,
    f: &CudaFunction,
    a: &RopeQkvArgs,
    n: &super::kv_step::Dims,
    pos: StepPos,
) -> Result<()> {
    let (b, t, hq, g, d, cap) = (n.b as i32, n.t as i32, n.hq as i32, n.g as i32, n.d as i32, n.cap as i32);
    let (pos32, pos_dev) = pos.args();
    let pairs = n.b * n.t * (n.hq + 2 * n.g) * n.d / 2;
    let mut l = stream.launch_builder(f);
    l.arg(&a.q.0).arg(&a.q.1 .0).arg(&a.q.1 .1);
    l.arg(&a.k.0).arg(&a.k.1 .0).arg(&a.k.1 .1);
    l.arg(&a.v.0).arg(&a.v.1 .0).arg(&a.v.1 .1);
    l.arg(&a.tables.0).arg(&a.tables.1).arg(&a.q_out).arg(&a.kv);
    l.arg(&b).arg(&t).arg(&hq).arg(&g).arg(&d).arg(&cap).arg(&pos32).arg(&pos_dev);
    unsafe { l.launch(cfg_1d(pairs)) }.w()?;
    Ok(())
}

pub(super) fn embed_rows_function(dev: &CudaDevice, dtype: DType) -> Result<CudaFunction> {
    function(dev, &kernels::GATHER, &format!("embed_rows_{}", suffix(dtype, "embedding")?))
}

/// gather.cu: out [rows, h] = table [vocab, h] at ids [rows] (u32, device memory; an id ≥ vocab
/// gives zeros).
///
/// # Safety
/// `ids` holds `rows` u32, `table` vocab·h and `out` rows·h elements of the function's dtype.
pub(super) unsafe fn launch_embed_rows(
    stream: &CudaStream,
    f: &CudaFunction,
    [ids, table, out]: [Addr; 3],
    (rows, h, vocab): (usize, usize, usize),
) -> Result<()> {
    let (rows32, h32, vocab32) = (rows as i32, h as i32, vocab as i32);
    let mut l = stream.launch_builder(f);
    l.arg(&ids).arg(&table).arg(&out).arg(&rows32).arg(&h32).arg(&vocab32);
    unsafe { l.launch(cfg_1d(rows * h)) }.w()?;
    Ok(())
}

/// decode_attn.cu's (attention, combine) kernels for a dtype and head dim.
pub(super) fn decode_attention_functions(
    dev: &CudaDevice,
    dtype: DType,
    d: usize,
) -> Result<(CudaFunction, CudaFunction)> {
    const OP: &str = "decode-attention";
    let t = suffix(dtype, OP)?;
    Ok((
        function(dev, &kernels::DECODE_ATTN, &format!("decode_attn_{t}_d{d}"))?,
        function(dev, &kernels::DECODE_ATTN, &format!("decode_attn_combine_{t}"))?,
    ))
}

/// One decode-attention launch: q [B, Hq, D], k/v rows of D with (batch, head) strides, out
/// [B, Hq·D], the partials (po [B, Hq, NS, D], pm, pl [B, Hq, NS], f32) when NS > 1.
pub(super) struct DecodeAttnArgs {
    pub q: Addr,
    pub k: Addr,
    pub v: Addr,
    pub strides: (i64, i64),
    pub out: Addr,
    pub partials: Option<(Addr, Addr, Addr)>,
    /// (B, Hq, Hk, D).
    pub dims: (usize, usize, usize, usize),
    /// NS: the grid's z, [`decode_splits`] for the keys (for `StepPos::Device`,
    /// [`super::attention::decode_graph_splits`] of the cache's capacity).
    pub splits: usize,
    /// S: the keys attended to.
    pub keys: StepPos,
    pub scale: f32,
    /// [B, Hq] u32 zeros (0: none) when NS > 1: the last split of each row combines and the
    /// combine launch is skipped (decode_attn.cu's `counts`). Only a CUDA-graph step's own.
    pub counts: Addr,
}

/// # Safety
/// The buffers hold what decode_attn.cu's header says; `partials` is given exactly when
/// `splits` > 1, and `counts`, when not 0, holds B·Hq zeroed u32 that no launch on any stream
/// uses meanwhile;
/// the functions are [`decode_attention_functions`] for the buffers' dtype and D.
pub(super) unsafe fn launch_decode_attention(
    stream: &CudaStream,
    (attend, combine): (&CudaFunction, &CudaFunction),
    a: &DecodeAttnArgs,
) -> Result<()> {
    let (b, hq, hk, d) = a.dims;
    let (hq32, hk32, d32, ns32) = (hq as i32, hk as i32, d as i32, a.splits as i32);
    let want32 = decode_want(b * hq) as i32;
    let (s32, s_dev) = a.keys.args();
    let (po, pm, pl) = a.partials.unwrap_or((0, 0, 0));
    let counts: Addr = if a.splits > 1 { a.counts } else { 0 };
    let mut l = stream.launch_builder(attend);
    l.arg(&a.q).arg(&a.k).arg(&a.v).arg(&a.strides.0).arg(&a.strides.1).arg(&a.out);
    l.arg(&po).arg(&pm).arg(&pl).arg(&hq32).arg(&hk32).arg(&s32).arg(&want32).arg(&a.scale).arg(&s_dev);
    l.arg(&counts);
    unsafe { l.launch(cfg((hq as u32, b as u32, a.splits as u32), DECODE_THREADS, 0)) }.w()?;
    if a.splits > 1 && counts == 0 {
        let mut l = stream.launch_builder(combine);
        l.arg(&po).arg(&pm).arg(&pl).arg(&a.out).arg(&hq32).arg(&d32).arg(&ns32);
        unsafe { l.launch(cfg((hq as u32, b as u32, 1), row_block(d, 128), 0)) }.w()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Causal flash attention
// ---------------------------------------------------------------------------------------------

/// Head dims the attention kernels are instantiated for.
pub(super) const ATTENTION_HEAD_DIMS: [usize; 4] = [32, 64, 96, 128];
/// Head dims of the wgmma forward (flash_wg.cu) and its block size (2 warpgroups).
const ATTENTION_WGMMA_HEAD_DIMS: [usize; 2] = [64, 128];
const ATTN_WG_THREADS: u32 = 256;
/// Block size of the warp-specialised forward (flash_fwd_tma: a producer and two consumer warpgroups).
const ATTN_WS_THREADS: u32 = 384;

/// Bytes of padding per shared-memory row of the f32 kernels (flash_attn.cu's PAD).
fn attn_pad(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

/// bf16 (tensor-core) kernels: threads per block (fwd and dq; dkdv), query rows per fwd/dq
/// block, keys per dkdv block, and shared rows of D + 8 bf16 (flash_attn.cu's TC_* constants and
/// *_tc_smem_bytes; the kernels trap on another block size or less shared memory).
const ATTN_TC_FWD_THREADS: u32 = 128;
const ATTN_TC_DQ_THREADS: u32 = 128;
const ATTN_TC_THREADS: u32 = 256;
const ATTN_TC_BM: usize = 128;
const ATTN_TC_BK: usize = 128;

fn attn_tc_smem(rows: usize, d: usize) -> u32 {
    (rows * (d + 8) * 2) as u32
}

/// The 64-query dK/dV kernels (flash_attn.cu's kv64_tc_smem_bytes): K, V [128], Q, dO [2][64]
/// rows of D + 8; Pᵀ, dSᵀ [128][64 + 8]; lse, Δ [2][64] f32.
fn attn_kv64_smem(d: usize) -> u32 {
    attn_tc_smem(2 * 128 + 4 * 64, d) + (2 * 128 * (64 + 8) * 2 + 4 * 64 * 4) as u32
}

fn attn_fwd_smem(dtype: DType, d: usize) -> u32 {
    if dtype == DType::BF16 {
        // Q [128], K, V [2][64] rows.
        return attn_tc_smem(128 + 4 * 64, d);
    }
    let p = attn_pad(dtype);
    // Q, K [64][D+p] and Vᵀ [D][64+p].
    ((2 * 64 * (d + p) + d * (64 + p)) * dtype.size_in_bytes()) as u32
}

fn attn_bwd_smem(dtype: DType, d: usize) -> u32 {
    let p = attn_pad(dtype);
    // K, V [64][D+p], Kᵀ [D][64+p], Q, dO [32][D+p], Qᵀ, dOᵀ [D][32+p], dS [32][64+p]; lse, delta.
    let elems = 2 * 64 * (d + p) + d * (64 + p) + 2 * 32 * (d + p) + 2 * d * (32 + p) + 32 * (64 + p);
    (elems * dtype.size_in_bytes() + 2 * 32 * 4) as u32
}

/// (o [B, Hq, T, D], lse [B, Hq, T] f32) of causal attention, or with `causal` false of
/// unmasked attention (bf16 only: `flash_fwd_full_bf16_dD`). With `prof` (zero-filled, 2 × the
/// phases of ops::attention::phases::FORWARD), the profiled instantiation of the causal wgmma
/// kernel runs instead and adds its cycle counts there (an error where that kernel does not).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_fwd(
    qs: &CudaStorage,
    ql: &Layout,
    ks: &CudaStorage,
    kl: &Layout,
    vs: &CudaStorage,
    vl: &Layout,
    scale: f32,
    causal: bool,
    variant: FlashForward,
    prof: Option<&mut CudaSlice<u64>>,
) -> Result<(CudaStorage, Tensor)> {
    let op = if causal { "causal-attention" } else { "full-attention" };
    let (b, hq, hk, t, d) = attention_dims(ql.shape(), kl.shape(), vl.shape())?;
    if !ATTENTION_HEAD_DIMS.contains(&d) {
        bail!("{op}: no cuda kernel for head dim {d} (have {ATTENTION_HEAD_DIMS:?})");
    }
    let dtype = qs.dtype();
    if ks.dtype() != dtype || vs.dtype() != dtype {
        bail!("{op}: q, k and v must share a dtype");
    }
    if !causal && dtype != DType::BF16 {
        bail!("{op}: the unmasked kernel is bf16 only, got {dtype:?}");
    }
    let dev = qs.device();
    // The wgmma kernel reads every input with 16-byte cp.async or TMA (no unaligned fallback).
    let wgmma = variant.wgmma_keys(d).is_some()
        && kernels::WGMMA
        && dtype == DType::BF16
        && ATTENTION_WGMMA_HEAD_DIMS.contains(&d)
        && [ql, kl, vl].iter().all(|l| l.start_offset().is_multiple_of(8));
    let tma = wgmma && variant.tma(d);
    if prof.is_some() && !(wgmma && causal && d == 128) {
        bail!("{op}: the phase profile needs the causal wgmma kernel (sm_90a build, bf16, head dim 128, 16-byte aligned inputs, a wgmma variant); got {variant:?}, head dim {d}, {dtype:?}");
    }
    if wgmma {
        use super::wgmma_check::WgmmaKernels;
        let family = if tma { WgmmaKernels::ForwardTma } else { WgmmaKernels::Forward };
        super::wgmma_check::ensure_verified(qs.device(), family)?;
    }
    let (module, smem, name) = if tma {
        let kind = match (causal, prof.is_some()) {
            (true, true) => "tma_prof_bf16",
            (true, false) => "tma_bf16",
            (false, _) => "full_tma_bf16",
        };
        // Q [128] and K, V [2][128] rows of D bf16, and 1 KB to align them (flash_wg.cu's
        // tma_fwd_smem_bytes<D>).
        let smem = ((128 + 4 * 128) * d * 2 + 1024) as u32;
        (&kernels::FLASH_WG, smem, format!("flash_fwd_{kind}_d{d}"))
    } else if wgmma {
        let kind = match (causal, prof.is_some()) {
            (true, true) => "wg_prof_bf16",
            (true, false) => "wg_bf16",
            (false, _) => "full_wg_bf16",
        };
        let keys = variant.wgmma_keys(d).unwrap_or(64);
        let tiles = if keys == 64 { String::new() } else { format!("_n{keys}") };
        // Q [128] and K, V [2][keys] rows of D bf16 (flash_wg.cu's wg_fwd_smem_bytes<D, keys>).
        (&kernels::FLASH_WG, ((128 + 4 * keys) * d * 2) as u32, format!("flash_fwd_{kind}_d{d}{tiles}"))
    } else {
        let kind = if causal { suffix(dtype, op)? } else { "full_bf16" };
        (&kernels::FLASH_ATTN, attn_fwd_smem(dtype, d), format!("flash_fwd_{kind}_d{d}"))
    };
    let f = function_smem(dev, module, &name, smem)?;
    with_float!(dtype, op, |T| {
        let (qv, kv, vv) = (view::<T>(qs, ql, op)?, view::<T>(ks, kl, op)?, view::<T>(vs, vl, op)?);
        let mut o = unsafe { dev.alloc::<T>(b * hq * t * d)? };
        let mut lse = unsafe { dev.alloc::<f32>(b * hq * t)? };
        let (hq32, hk32, t32) = (hq as i32, hk as i32, t as i32);
        let stream = dev.cuda_stream();
        let maps = match tma {
            true => Some([
                attention_tensor_map(qv.device_ptr(&stream).0, b * hq, t, d, 128)?,
                attention_tensor_map(kv.device_ptr(&stream).0, b * hk, t, d, 128)?,
                attention_tensor_map(vv.device_ptr(&stream).0, b * hk, t, d, 128)?,
            ]),
            false => None,
        };
        let mut bld = stream.launch_builder(&f);
        match &maps {
            Some([mq, mk, mv]) => bld.arg(mq).arg(mk).arg(mv),
            None => bld.arg(&qv).arg(&kv).arg(&vv),
        };
        bld.arg(&mut o).arg(&mut lse);
        bld.arg(&hq32).arg(&hk32).arg(&t32).arg(&scale);
        if let Some(p) = prof {
            bld.arg(p);
        }
        let (rows_per_block, threads) = match (wgmma, dtype) {
            (true, _) if tma => (128, ATTN_WS_THREADS),
            (true, _) => (128, ATTN_WG_THREADS),
            (false, DType::BF16) => (ATTN_TC_BM, ATTN_TC_FWD_THREADS),
            _ => (64, 128),
        };
        let grid = (t.div_ceil(rows_per_block) as u32, hq as u32, b as u32);
        // SAFETY: matches flash_wg.cu (flash_fwd_wg<D, keys, causal, prof> or flash_fwd_tma<D,
        // causal, prof>: bf16, 16-byte aligned inputs, for tma as tensor maps over them, alive
        // until the kernel ends as the views are; the profiled kernel's prof holds 2 × its
        // phases) or
        // flash_attn.cu (flash_fwd_tc<D, causal> for bf16, flash_fwd for f32); smem from the same
        // formula as the kernel's (which traps on less, or on another block size).
        unsafe { bld.launch(cfg(grid, threads, smem)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(o, dev.clone()), tensor(lse, dev, (b, hq, t))))
    })
}

/// A TMA tensor map (the driver's 128-byte CUtensorMap), passed by value: the kernels take it as
/// a `__grid_constant__` parameter.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct TensorMap(candle_core::cuda_backend::cudarc::driver::sys::CUtensorMap);
// SAFETY: plain bytes the driver copies into the kernel's parameter space, as the kernel declares.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for TensorMap {}

/// The tensor map flash_fwd_tma and flash_bwd_tma load x through: bf16
/// [planes][t][d] contiguous at `addr` (16-byte aligned), boxes of `rows` rows × 64 columns,
/// 128-byte swizzled (the layout their wgmma descriptors read), rows past t zero-filled.
fn attention_tensor_map(addr: u64, planes: usize, t: usize, d: usize, rows: u32) -> Result<TensorMap> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let dims = [d as u64, t as u64, planes as u64];
    let strides = [(d * 2) as u64, (t * d * 2) as u64]; // bytes, of dims 1 and 2
    let boxes = [64u32, rows, 1];
    let element_strides = [1u32; 3];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array has the rank's entries (strides rank − 1); the driver writes map.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("causal-attention: cuTensorMapEncodeTiled failed ({r:?}) for a [{planes}][{t}][{d}] bf16 tensor at {addr:#x}");
    }
    // SAFETY: initialised by the successful call.
    Ok(TensorMap(unsafe { map.assume_init() }))
}

/// Dynamic shared memory of flash_wg.cu's `wgmma_probe`: a, b, c [64][64] and v [64][128] bf16.
const WGMMA_PROBE_SMEM: u32 = (3 * 64 * 64 + 64 * 128) * 2;

/// flash_wg.cu's `wgmma_probe` on `x` (ops::wgmma_check): its f32 outputs, on the host.
pub(super) fn wgmma_probe(dev: &CudaDevice, x: &super::wgmma_check::ProbeInputs) -> Result<Vec<f32>> {
    if !kernels::WGMMA {
        bail!("wgmma probe: this build has no wgmma kernels (CUDA_COMPUTE_CAP=90 builds them)");
    }
    let f = function_smem(dev, &kernels::FLASH_WG, "wgmma_probe", WGMMA_PROBE_SMEM)?;
    let stream = dev.cuda_stream();
    let upload = |m: &[f32]| stream.clone_htod(&m.iter().map(|&e| bf16::from_f32(e)).collect::<Vec<_>>()).w();
    let (a, b, c, v) = (upload(&x.a)?, upload(&x.b)?, upload(&x.c)?, upload(&x.v)?);
    let mut out = stream.alloc_zeros::<f32>(super::wgmma_check::PROBE_OUT).w()?;
    let mut bld = stream.launch_builder(&f);
    bld.arg(&a).arg(&b).arg(&c).arg(&v).arg(&mut out);
    // SAFETY: matches flash_wg.cu (wgmma_probe): one block of 256 threads, the inputs' and the
    // output's sizes as its header says, WGMMA_PROBE_SMEM bytes of shared memory.
    unsafe { bld.launch(cfg((1, 1, 1), ATTN_WG_THREADS, WGMMA_PROBE_SMEM)) }.w()?;
    stream.clone_dtoh(&out).w()
}

/// (dq, dk, dv) of causal attention from the forward's o and lse and the output gradient `g`;
/// bf16 through the tensor-core kernels `variant` names, f32 through the scalar one. With
/// `prof` (zero-filled, 2 × the phases of ops::attention::phases::BACKWARD), the profiled
/// instantiation of the wgmma kernel runs and adds its cycle counts there (an error where the
/// wgmma kernel does not run).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    scale: f32,
    variant: FlashBackward,
    prof: Option<&mut CudaSlice<u64>>,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "causal-attention backward";
    let (b, hq, hk, t, d) = attention_dims(q.shape(), k.shape(), v.shape())?;
    let dtype = q.dtype();
    let (q, k, v, o) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, o.contiguous()?);
    let g = g.to_dtype(dtype)?.contiguous()?;
    let lse = lse.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (os, ol) = o.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (ls, ll) = lse.storage_and_layout();
    let (qs, ks, vs) = (cuda_of(&qs, OP)?, cuda_of(&ks, OP)?, cuda_of(&vs, OP)?);
    let (os, gs, ls) = (cuda_of(&os, OP)?, cuda_of(&gs, OP)?, cuda_of(&ls, OP)?);
    let dev = qs.device();
    let sfx = suffix(dtype, OP)?;
    let rows = b * hq * t;
    let pre = function(dev, &kernels::FLASH_ATTN, &format!("flash_bwd_pre_{sfx}_d{d}"))?;
    let stream = dev.cuda_stream();
    if prof.is_some() && dtype != DType::BF16 {
        bail!("{OP}: the phase profile needs the bf16 wgmma kernel, got {dtype:?}");
    }
    if dtype == DType::BF16 {
        // Δ = rowsum(dO ⊙ O), then dK/dV per 128-key block and dQ per 128-query block (Split,
        // Wide) or added by the dK/dV blocks with atomics (Fused). See flash_attn.cu.
        let (qv, kv, vv) = (view::<bf16>(qs, ql, OP)?, view::<bf16>(ks, kl, OP)?, view::<bf16>(vs, vl, OP)?);
        let (ov, gv, lv) = (view::<bf16>(os, ol, OP)?, view::<bf16>(gs, gl, OP)?, view::<f32>(ls, ll, OP)?);
        let mut delta = unsafe { dev.alloc::<f32>(rows)? };
        let (rows64, hq32, hk32, t32) = (rows as i64, hq as i32, hk as i32, t as i32);
        let mut bld = stream.launch_builder(&pre);
        bld.arg(&ov).arg(&gv).arg(&mut delta).arg(&rows64);
        // SAFETY: matches flash_attn.cu (flash_bwd_pre): one warp per row, 4 rows a block.
        unsafe { bld.launch(cfg((rows.div_ceil(4) as u32, 1, 1), 128, 0)) }.w()?;

        let mut dk = unsafe { dev.alloc::<bf16>(b * hk * t * d)? };
        let mut dv = unsafe { dev.alloc::<bf16>(b * hk * t * d)? };
        let kv_grid = (t.div_ceil(ATTN_TC_BK) as u32, hk as u32, b as u32);
        // The wgmma kernel reads every input with 16-byte cp.async (no unaligned fallback).
        let wgmma = variant.is_wgmma()
            && kernels::WGMMA
            && d == 128
            && [ql, kl, vl, gl].iter().all(|l| l.start_offset().is_multiple_of(8));
        let tma = wgmma && variant == FlashBackward::Tma;
        if prof.is_some() && !wgmma {
            bail!("{OP}: the phase profile needs a wgmma kernel (sm_90a build, head dim 128, 16-byte aligned inputs, variant wgmma or tma); got {variant:?}, head dim {d}");
        }
        if wgmma {
            super::wgmma_check::ensure_verified(dev, super::wgmma_check::WgmmaKernels::Backward)?;
        }
        // Wgmma where its kernel does not apply (D ≠ 128, unaligned) runs Split, the
        // bit-reproducible kernels, not Fused: it is the default on Hopper builds.
        if variant == FlashBackward::Fused || wgmma {
            let (module, name, smem, threads) = if tma {
                // K, V [128], Q, dO [2][64] rows of D; dSᵀ [2][128][64] bf16; lse, Δ [2][64], dQ
                // [64] rows of D f32; 1 KB to align the tiles (flash_wg.cu's tma_bwd_smem_bytes).
                let smem =
                    ((2 * 128 + 4 * 64) * d * 2 + 2 * 128 * 64 * 2 + 4 * 64 * 4 + 64 * d * 4 + 1024) as u32;
                let kind = if prof.is_some() { "tma_prof" } else { "tma" };
                (&kernels::FLASH_WG, format!("flash_bwd_{kind}_{sfx}_d{d}"), smem, ATTN_WS_THREADS)
            } else if wgmma {
                // K, V [128], Q, dO [2][64] rows of D; dSᵀ [128][64] bf16; lse, Δ [2][64] f32
                // (flash_wg.cu's wg_bwd_smem_bytes).
                let smem = ((2 * 128 + 4 * 64) * d * 2 + 128 * 64 * 2 + 4 * 64 * 4) as u32;
                let kind = if prof.is_some() { "wg_prof" } else { "wg" };
                (&kernels::FLASH_WG, format!("flash_bwd_{kind}_{sfx}_d{d}"), smem, ATTN_WG_THREADS)
            } else {
                (
                    &kernels::FLASH_ATTN,
                    format!("flash_bwd_dkdvdq_{sfx}_d{d}"),
                    attn_kv64_smem(d),
                    ATTN_TC_THREADS,
                )
            };
            let f = function_smem(dev, module, &name, smem)?;
            let mut dq_acc = dev.alloc_zeros::<f32>(rows * d)?;
            let maps = match tma {
                true => Some([
                    attention_tensor_map(qv.device_ptr(&stream).0, b * hq, t, d, 64)?,
                    attention_tensor_map(kv.device_ptr(&stream).0, b * hk, t, d, 128)?,
                    attention_tensor_map(vv.device_ptr(&stream).0, b * hk, t, d, 128)?,
                    attention_tensor_map(gv.device_ptr(&stream).0, b * hq, t, d, 64)?,
                ]),
                false => None,
            };
            let mut bld = stream.launch_builder(&f);
            match &maps {
                Some([mq, mk, mv, mo]) => bld.arg(mq).arg(mk).arg(mv).arg(mo),
                None => bld.arg(&qv).arg(&kv).arg(&vv).arg(&gv),
            };
            bld.arg(&lv).arg(&delta).arg(&mut dk).arg(&mut dv);
            bld.arg(&mut dq_acc).arg(&hq32).arg(&hk32).arg(&t32).arg(&scale);
            if let Some(p) = prof {
                bld.arg(p);
            }
            // SAFETY: matches flash_attn.cu (flash_bwd_kv64_tc<D, true>) or flash_wg.cu
            // (flash_bwd_tma<128, prof> or flash_bwd_wg<128, prof>: 16-byte aligned inputs, for tma as
            // tensor maps over them, alive until the kernel ends as the views are; 384 or 256
            // threads; the profiled kernel's prof holds
            // 2 × its phases), same arguments and grid; every dk/dv row < T is written; dq_acc is
            // zero-filled and only added to.
            unsafe { bld.launch(cfg(kv_grid, threads, smem)) }.w()?;
            let dq = tensor(dq_acc, dev, (b, hq, t, d)).to_dtype(DType::BF16)?;
            return Ok((dq, tensor(dk, dev, (b, hk, t, d)), tensor(dv, dev, (b, hk, t, d))));
        }

        let smem_dq = attn_tc_smem(2 * 128 + 4 * 32, d);
        let dqf = function_smem(dev, &kernels::FLASH_ATTN, &format!("flash_bwd_dq_{sfx}_d{d}"), smem_dq)?;
        let mut dq = unsafe { dev.alloc::<bf16>(rows * d)? };
        let mut bld = stream.launch_builder(&dqf);
        bld.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lv).arg(&delta).arg(&mut dq);
        bld.arg(&hq32).arg(&hk32).arg(&t32).arg(&scale);
        let grid = (t.div_ceil(ATTN_TC_BM) as u32, hq as u32, b as u32);
        // SAFETY: matches flash_attn.cu (flash_bwd_dq_tc); every dq row < T is written.
        unsafe { bld.launch(cfg(grid, ATTN_TC_DQ_THREADS, smem_dq)) }.w()?;

        let (name, smem) = match variant {
            FlashBackward::Wide => ("dkdv64", attn_kv64_smem(d)),
            _ => ("dkdv", attn_tc_smem(2 * 128 + 4 * 32, d) + 4 * 32 * 4),
        };
        let dkdvf = function_smem(dev, &kernels::FLASH_ATTN, &format!("flash_bwd_{name}_{sfx}_d{d}"), smem)?;
        let mut bld = stream.launch_builder(&dkdvf);
        bld.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lv).arg(&delta).arg(&mut dk).arg(&mut dv);
        bld.arg(&hq32).arg(&hk32).arg(&t32).arg(&scale);
        // SAFETY: matches flash_attn.cu (flash_bwd_dkdv_tc, flash_bwd_kv64_tc<D, false>); every
        // dk/dv row < T is written.
        unsafe { bld.launch(cfg(kv_grid, ATTN_TC_THREADS, smem)) }.w()?;
        return Ok((
            tensor(dq, dev, (b, hq, t, d)),
            tensor(dk, dev, (b, hk, t, d)),
            tensor(dv, dev, (b, hk, t, d)),
        ));
    }
    let smem = attn_bwd_smem(dtype, d);
    let main = function_smem(dev, &kernels::FLASH_ATTN, &format!("flash_bwd_{sfx}_d{d}"), smem)?;
    with_float!(dtype, OP, |T| {
        let (qv, kv, vv) = (view::<T>(qs, ql, OP)?, view::<T>(ks, kl, OP)?, view::<T>(vs, vl, OP)?);
        let (ov, gv, lv) = (view::<T>(os, ol, OP)?, view::<T>(gs, gl, OP)?, view::<f32>(ls, ll, OP)?);
        let mut delta = unsafe { dev.alloc::<f32>(rows)? };
        let (rows64, hq32, hk32, t32) = (rows as i64, hq as i32, hk as i32, t as i32);
        let mut bld = stream.launch_builder(&pre);
        bld.arg(&ov).arg(&gv).arg(&mut delta).arg(&rows64);
        // SAFETY: matches flash_attn.cu (flash_bwd_pre): one warp per row, 4 rows a block.
        unsafe { bld.launch(cfg((rows.div_ceil(4) as u32, 1, 1), 128, 0)) }.w()?;

        let mut dq_acc = dev.alloc_zeros::<f32>(rows * d)?;
        let mut dk = unsafe { dev.alloc::<T>(b * hk * t * d)? };
        let mut dv = unsafe { dev.alloc::<T>(b * hk * t * d)? };
        let mut bld = stream.launch_builder(&main);
        bld.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lv).arg(&delta);
        bld.arg(&mut dq_acc).arg(&mut dk).arg(&mut dv);
        bld.arg(&hq32).arg(&hk32).arg(&t32).arg(&scale);
        let grid = (t.div_ceil(64) as u32, hk as u32, b as u32);
        // SAFETY: matches flash_attn.cu (flash_bwd, f32 only); dq_acc is zero-filled.
        unsafe { bld.launch(cfg(grid, 128, smem)) }.w()?;
        // f32: dq_acc is dq.
        let dq = tensor(dq_acc, dev, (b, hq, t, d));
        Ok((dq, tensor(dk, dev, (b, hk, t, d)), tensor(dv, dev, (b, hk, t, d))))
    })
}

/// The causal wgmma forward's profiled instantiation on q, k, v (ops::attention::phases): o,
/// lse and its counters (cycles, then runs, of each of `phases` phases, summed over the grid).
pub(super) fn attention_fwd_profiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    variant: FlashForward,
    phases: usize,
) -> Result<(Tensor, Tensor, Vec<u64>)> {
    const OP: &str = "causal-attention phase profile";
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (qs, ks, vs) = (cuda_of(&qs, OP)?, cuda_of(&ks, OP)?, cuda_of(&vs, OP)?);
    let dev = qs.device();
    let mut counters = dev.alloc_zeros::<u64>(2 * phases)?;
    let (o, lse) = attention_fwd(qs, ql, ks, kl, vs, vl, scale, true, variant, Some(&mut counters))?;
    let o = Tensor::from_storage(Storage::Cuda(o), ql.shape().clone(), BackpropOp::none(), false);
    Ok((o, lse, dev.cuda_stream().clone_dtoh(&counters).w()?))
}

/// The wgmma backward's profiled instantiation (ops::attention::phases): (dq, dk, dv) and its
/// counters (cycles, then runs, of each of `phases` phases, summed over the grid).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_bwd_profiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    scale: f32,
    variant: FlashBackward,
    phases: usize,
) -> Result<((Tensor, Tensor, Tensor), Vec<u64>)> {
    let dev = match q.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        other => bail!("causal-attention phase profile: q is on {other:?}, not a cuda device"),
    };
    let mut counters = dev.alloc_zeros::<u64>(2 * phases)?;
    let grads = attention_bwd(q, k, v, o, lse, g, scale, variant, Some(&mut counters))?;
    Ok((grads, dev.cuda_stream().clone_dtoh(&counters).w()?))
}

/// Stop cudarc's per-buffer event tracking on `dev`'s context. cudarc gives every buffer a read
/// and a write event (two `cuEventCreate` per allocation, two `cuEventDestroy` per free), which
/// it only uses to order work across the streams of a context that has several. candle runs a
/// device on the per-thread default stream and makes no other, so the events order nothing,
/// while candle allocates every op's output: a decode step paid ~4 event calls per launch for
/// them. `SHARDSMITH_CUDA_EVENTS=1` keeps them (for comparisons).
pub fn quiet_event_tracking(dev: &CudaDevice) {
    if super::cuda_events_kept() {
        return;
    }
    // SAFETY: cudarc would only consult the events once the context had a second stream, and
    // neither candle nor shardsmith makes one: stream order already orders every access.
    unsafe { dev.disable_event_tracking() };
}

/// Keep freed device memory in the driver's default memory pool instead of handing it back at
/// every synchronisation. candle allocates each tensor with `cuMemAllocAsync` from that pool,
/// whose release threshold is 0 by default: a training step that synchronises (its loss read
/// back) then maps its working set of several GB afresh every step. PyTorch's caching allocator
/// keeps freed blocks the same way (and, like it, this memory is not handed back for other
/// allocations of the process). `SHARDSMITH_CUDA_POOL_KEEP=0` leaves the driver's default (for
/// comparisons); a device without memory pools is left as it is.
pub fn keep_pool_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    if std::env::var("SHARDSMITH_CUDA_POOL_KEEP").is_ok_and(|v| v == "0") {
        return Ok(());
    }
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        return Ok(()); // no memory pools on this device/driver: candle allocates synchronously
    }
    ctx.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the context is current; `pool` and `threshold` outlive the calls, and the
    // attribute takes a u64 (cuMemPoolSetAttribute's documentation).
    let (got, set) = unsafe {
        let got = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
        let set = if got == sys::CUresult::CUDA_SUCCESS {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        } else {
            got
        };
        (got, set)
    };
    if got != sys::CUresult::CUDA_SUCCESS || set != sys::CUresult::CUDA_SUCCESS {
        // Only speed is at stake: run with the driver's default rather than refuse the device.
        eprintln!("warning: cuda: freed memory goes back to the device at each sync ({got:?}, {set:?})");
    }
    Ok(())
}
