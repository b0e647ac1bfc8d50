//! Compiles every `src/*.cu` to PTX with nvcc and the PTX to a cubin with ptxas, into OUT_DIR,
//! when the `cuda` feature is on; does nothing otherwise.
//!
//! Flags (one PTX module per file):
//!   nvcc  --ptx -arch=sm_$CAP -O3 -std=c++17      (no --use_fast_math: the kernels are checked
//!                                                  against CPU references, so expf / division /
//!                                                  sqrt keep their IEEE-accurate forms)
//!   ptxas -arch=sm_$CAP -O3 -v                     (the cubin the loader prefers: no JIT at run time;
//!                                                  a note that wgmma is serialised fails the build)
//! `$CAP` is `CUDA_COMPUTE_CAP` (`90` or `9.0`; default 90; 90 compiles as `90a`, see below). nvcc is `$NVCC`, else
//! `$CUDA_HOME/bin/nvcc` (or `$CUDA_PATH`), else `nvcc` on PATH; ptxas sits beside it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src");
    for var in ["CUDA_COMPUTE_CAP", "NVCC", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap: String = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "90".into())
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    if cap.is_empty() {
        panic!("CUDA_COMPUTE_CAP must be a compute capability such as 90 or 9.0");
    }
    // Compute capability 9.0 builds for sm_90a: the same GPUs (H100, H200), plus the
    // architecture-specific instructions (wgmma) that flash_wg.cu needs; its cubin and PTX run on
    // 9.0 devices only, as an sm_90 cubin would.
    let cap = if cap == "90" { "90a".to_string() } else { cap };
    println!("cargo:rustc-env=SHARDSMITH_KERNELS_ARCH=sm_{cap}");
    let nvcc = nvcc();
    let ptxas = match nvcc.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join("ptxas"),
        _ => PathBuf::from("ptxas"),
    };

    let mut sources: Vec<PathBuf> = std::fs::read_dir("src")
        .expect("kernels/src")
        .map(|e| e.expect("kernels/src entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    // One thread per file: flash_attn.cu dominates, the rest finish alongside it.
    std::thread::scope(|s| {
        let jobs: Vec<_> =
            sources.iter().map(|src| s.spawn(|| compile(&nvcc, &ptxas, src, &out, &cap))).collect();
        for j in jobs {
            j.join().expect("kernel compile thread");
        }
    });
}

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return p.into();
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let p = Path::new(&home).join("bin").join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}

fn compile(nvcc: &Path, ptxas: &Path, src: &Path, out: &Path, cap: &str) {
    let stem = src.file_stem().and_then(|s| s.to_str()).expect("utf-8 kernel file name");
    let ptx = out.join(format!("{stem}.ptx"));
    let cubin = out.join(format!("{stem}.cubin"));
    let arch = format!("-arch=sm_{cap}");
    run(Command::new(nvcc).args(["--ptx", &arch, "-O3", "-std=c++17", "-o"]).arg(&ptx).arg(src));
    // -v for its notes (printed only then): "Potential Performance Loss: wgmma.mma_async
    // instructions are serialized due to …" (C7510–C7520: a wgmma in a divergent path, an
    // accumulator written mid-flight, too few registers…) means each product of the kernel waits
    // for the one before, a silent loss of much of the tensor-core rate: it fails the build.
    let notes = run(Command::new(ptxas).args([&arch, "-O3", "-v", "-o"]).arg(&cubin).arg(&ptx));
    // ptxas sometimes runs two notes together on one line.
    let serialised: Vec<&str> = notes
        .split("ptxas info")
        .filter(|n| n.contains("wgmma.mma_async instructions are serialized"))
        .collect();
    if !serialised.is_empty() {
        panic!("{}: ptxas serialises wgmma:\n{}", src.display(), serialised.join("\n"));
    }
    // Any word from ptxas about setmaxnreg means it did not take it as written (it ignores the
    // instruction when it cannot tell the kernel's register count at entry, say): the
    // warp-specialised kernels' consumers would then run capped at the launch count and spill.
    let setmaxnreg: Vec<&str> = notes.lines().filter(|l| l.contains("setmaxnreg")).collect();
    if !setmaxnreg.is_empty() {
        panic!("{}: ptxas on setmaxnreg:\n{}", src.display(), setmaxnreg.join("\n"));
    }
}

/// Runs `cmd`, panicking with its output on failure; its stdout and stderr otherwise.
fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {shown}: {e} (install CUDA, or `source shared/tools/cuda-toolchain.sh`)")
    });
    if !out.status.success() {
        panic!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
