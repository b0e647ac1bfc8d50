//! shardsmith's CUDA kernels as compiled modules (PTX text and an sm-specific cubin each).
//!
//! With the `cuda` feature, `build.rs` compiles every `src/*.cu` (see its docs for the flags) and
//! this crate exposes one `Module` per file; the launchers live in the main crate's `ops`
//! (each kernel file's header comment gives its shapes, launch geometry and numerics). Without
//! the feature the crate is empty and needs no CUDA toolchain.

/// One compiled kernel file.
#[cfg(feature = "cuda")]
#[derive(Clone, Copy, Debug)]
pub struct Module {
    /// The file stem, e.g. `"rmsnorm"`; unique, used as a cache key.
    pub name: &'static str,
    /// PTX for the virtual architecture of [`ARCH`], JIT-compiled by the driver when the cubin
    /// does not fit the device.
    pub ptx: &'static str,
    /// SASS for [`ARCH`] (loaded directly: no JIT).
    pub cubin: &'static [u8],
}

/// The architecture the modules were compiled for (`sm_` + `CUDA_COMPUTE_CAP`).
#[cfg(feature = "cuda")]
pub const ARCH: &str = env!("SHARDSMITH_KERNELS_ARCH");

#[cfg(feature = "cuda")]
macro_rules! modules {
    ($($(#[$doc:meta])* $id:ident = $file:literal;)*) => {$(
        $(#[$doc])*
        pub const $id: Module = Module {
            name: $file,
            ptx: include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx")),
            cubin: include_bytes!(concat!(env!("OUT_DIR"), "/", $file, ".cubin")),
        };
    )*};
}

#[cfg(feature = "cuda")]
modules! {
    /// `rmsnorm_{fwd,bwd}_{f32,bf16}`.
    RMSNORM = "rmsnorm";
    /// `bias_act_{f32,bf16}`.
    BIAS_ACT = "bias_act";
    /// `cast_f32_bf16`, `cast_bf16_f32`.
    CAST = "cast";
    /// `rope_{f32_f32,bf16_bf16,bf16_f32}`, `rope_qkv_cache_*`, `rope_heads_*` (same suffixes).
    ROPE = "rope";
    /// `softmax_{f32,bf16}`.
    SOFTMAX = "softmax";
    /// `swiglu_{fwd,bwd}_{f32,bf16}`.
    SWIGLU = "swiglu";
    /// `cross_entropy_{f32,bf16}`, `cross_entropy_bwd_{f32,bf16}`.
    CROSS_ENTROPY = "cross_entropy";
    /// `adamw_f32`.
    ADAMW = "adamw";
    /// `decode_attn_{f32,bf16}_d{32,64,96,128}`, `decode_attn_combine_{f32,bf16}`.
    DECODE_ATTN = "decode_attn";
    /// `embed_rows_{f32,bf16}`.
    GATHER = "gather";
    /// `gemv_{f32,bf16}_m{1..8}`, `gemv_add_*`, `gemv_swiglu_*` (same suffixes), and
    /// `gemv_norm_{f32,bf16}_m{1,2}`, `gemv_norm_swiglu_*` (same suffixes).
    GEMV = "gemv";
    /// `flash_{fwd,bwd_pre,bwd}_f32_d*`, `flash_{fwd,fwd_full,bwd_pre,bwd_dq,bwd_dkdv,bwd_dkdv64,
    /// bwd_dkdvdq}_bf16_d*` (d 32, 64, 96, 128).
    FLASH_ATTN = "flash_attn";
    /// `flash_fwd_wg_bf16_d{64,128}`, `flash_fwd_full_wg_bf16_d{64,128}`, `flash_bwd_wg_bf16_d128`,
    /// the profiled `flash_fwd_wg_prof_bf16_d128{,_n128}`, `flash_bwd_wg_prof_bf16_d128` (wgmma;
    /// only in an sm_90a build, see [`WGMMA`]).
    FLASH_WG = "flash_wg";
}

/// Whether the modules hold the wgmma (sm_90a) kernels of `flash_wg.cu`.
#[cfg(feature = "cuda")]
pub const WGMMA: bool = matches!(ARCH.as_bytes(), b"sm_90a");
