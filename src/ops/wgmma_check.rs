//! The wgmma self-check: Hopper's warpgroup MMA reads its operands through shared-memory
//! descriptors and register fragments whose conventions (`kernels/src/wgmma.cuh`) were written
//! from the PTX ISA and checked only against the emulator's reading of the same text. A wrong
//! convention gives wrong attention, not a crash. So before the first wgmma attention launch on
//! a GPU, flash_wg.cu's `wgmma_probe` runs the seven wgmma forms the kernels use, each on one tile
//! laid out as the kernels lay theirs out, and its outputs are compared here with their plain
//! definitions; a failure refuses the wgmma kernels that use a wrong form on that GPU (the
//! forward and the backward each need their own forms: [`WgmmaKernels`]) with a report that says
//! which form is wrong and, from two index-pattern runs, where its elements came from.
//!
//! Inputs are small integers (|x| ≤ 2), so every product and sum is exact in f32 and s is exact
//! in bf16: the outputs must equal the references bit for bit.

use candle_core::Result;
use std::fmt;

/// Tile rows and columns of the probe (flash_wg.cu), and v's columns.
const N: usize = 64;
const VN: usize = 128;
/// f32 values in the probe's output: s [64, 64], o [64, 128], p [64, 64], u [64, 64], q [64, 64],
/// w [64, 128], x [64, 128].
pub const PROBE_OUT: usize = 4 * N * N + 3 * N * VN;

/// One run's inputs, row-major, as f32 holding bf16-exact integers: a, b, c [64, 64], v [64, 128].
#[derive(Clone, Debug)]
pub struct ProbeInputs {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
    pub v: Vec<f32>,
}

/// The seven products the probe outputs, in its order.
struct Form {
    name: &'static str,
    /// The wgmma form and the attention products that use it.
    what: &'static str,
    /// Offset and columns of the output block.
    at: usize,
    cols: usize,
}

const FORMS: [Form; 7] = [
    Form { name: "s = a·bᵀ", what: "ss, A and B K-major: Sᵀ, dPᵀ", at: 0, cols: N },
    Form {
        name: "o = bf16(s)·v",
        what: "rs, B MN-major, n128: O = P·V at D 128, dV, dK",
        at: N * N,
        cols: VN,
    },
    Form {
        name: "p = bf16(s)·c", what: "rs, B MN-major, n64: O = P·V at D 64", at: N * N + N * VN, cols: N
    },
    Form {
        name: "u = aᵀ·v[:, 64..]",
        what: "ss, A and B MN-major, B at a column offset: dQ = dS·K",
        at: 2 * N * N + N * VN,
        cols: N,
    },
    Form {
        name: "q = a·bᵀ",
        what: "rs, A from registers (wg_load_a), B K-major: S = Q·Kᵀ",
        at: 3 * N * N + N * VN,
        cols: N,
    },
    Form {
        name: "w = a·[b; c]ᵀ",
        what: "rs, A from registers, B K-major, n128: S = Q·Kᵀ over 128-key tiles",
        at: 4 * N * N + N * VN,
        cols: VN,
    },
    Form {
        name: "x = a·[b; c]ᵀ",
        what: "ss, A and B K-major, n128: S = Q·Kᵀ of the warp-specialised forward",
        at: 4 * N * N + 2 * N * VN,
        cols: VN,
    },
];

impl ProbeInputs {
    /// Integers in [-2, 2] from a fixed generator (a 64-bit LCG: the same inputs every run).
    pub fn random(seed: u64) -> ProbeInputs {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut ints = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state =
                        state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    ((state >> 33) % 5) as f32 - 2.0
                })
                .collect()
        };
        ProbeInputs { a: ints(N * N), b: ints(N * N), c: ints(N * N), v: ints(N * VN) }
    }

    /// Index patterns: a = b = I, and c, v hold (row + 1) or (column + 1) in every element, so
    /// an output element of the P·V forms and of u names the element of c or v it came from.
    fn pv_pattern(rows: bool) -> ProbeInputs {
        let eye = |i: usize| if i / N == i % N { 1.0 } else { 0.0 };
        let index = |cols: usize| -> Vec<f32> {
            (0..N * cols).map(|i| if rows { i / cols } else { i % cols } as f32 + 1.0).collect()
        };
        ProbeInputs {
            a: (0..N * N).map(eye).collect(),
            b: (0..N * N).map(eye).collect(),
            c: index(N),
            v: index(VN),
        }
    }

    /// Index patterns for s: a = I and b holding (row + 1) or (column + 1), so s[m][n] names the
    /// element of b it came from (b[n][m] when right).
    fn s_pattern(rows: bool) -> ProbeInputs {
        let mut x = ProbeInputs::pv_pattern(rows);
        x.b = (0..N * N).map(|i| if rows { i / N } else { i % N } as f32 + 1.0).collect();
        x
    }
}

/// What the probe must output for `x`, given the s it output (the P·V forms multiply bf16(s),
/// which is s itself for these inputs: integers of magnitude ≤ 256).
fn expected(x: &ProbeInputs, s: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; PROBE_OUT];
    let (os, rest) = out.split_at_mut(N * N);
    let (oo, rest) = rest.split_at_mut(N * VN);
    let (op, rest) = rest.split_at_mut(N * N);
    let (ou, rest) = rest.split_at_mut(N * N);
    let (oq, rest) = rest.split_at_mut(N * N);
    let (ow, ox) = rest.split_at_mut(N * VN);
    for m in 0..N {
        for n in 0..N {
            let (mut sv, mut uv, mut cv) = (0f64, 0f64, 0f64);
            for k in 0..N {
                sv += f64::from(x.a[m * N + k]) * f64::from(x.b[n * N + k]);
                uv += f64::from(x.a[k * N + m]) * f64::from(x.v[k * VN + N + n]);
                cv += f64::from(x.a[m * N + k]) * f64::from(x.c[n * N + k]);
            }
            os[m * N + n] = sv as f32;
            oq[m * N + n] = sv as f32;
            ow[m * VN + n] = sv as f32;
            ow[m * VN + N + n] = cv as f32;
            ox[m * VN + n] = sv as f32;
            ox[m * VN + N + n] = cv as f32;
            ou[m * N + n] = uv as f32;
        }
        for n in 0..VN {
            oo[m * VN + n] =
                (0..N).map(|k| f64::from(s[m * N + k]) * f64::from(x.v[k * VN + n])).sum::<f64>() as f32;
        }
        for n in 0..N {
            op[m * N + n] =
                (0..N).map(|k| f64::from(s[m * N + k]) * f64::from(x.c[k * N + n])).sum::<f64>() as f32;
        }
    }
    out
}

/// One form's result.
#[derive(Clone, Debug)]
pub struct FormResult {
    pub name: &'static str,
    pub what: &'static str,
    /// Elements that differ from the reference, of `total`.
    pub wrong: usize,
    pub total: usize,
    /// For a wrong form: where some wrong elements came from, from the index-pattern runs.
    pub diagnosis: Vec<String>,
}

/// The self-check's verdict on every form.
#[derive(Clone, Debug)]
pub struct WgmmaReport {
    pub forms: Vec<FormResult>,
}

impl WgmmaReport {
    pub fn passed(&self) -> bool {
        self.forms.iter().all(|f| f.wrong == 0)
    }

    /// Whether every form `kernels` use came out exact.
    pub fn passed_for(&self, kernels: WgmmaKernels) -> bool {
        kernels.forms().iter().all(|&i| self.forms.get(i).is_some_and(|f| f.wrong == 0))
    }
}

/// The wgmma attention kernels, by the probe forms (indices into the report) they use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgmmaKernels {
    /// flash_fwd_wg: S = Q·Kᵀ with Q in registers (q; w over 128-key tiles), O += P·V at D 128
    /// (o) and 64 (p).
    Forward,
    /// flash_fwd_tma: S with Q in shared memory (x), O += P·V (o). The probe lays its tiles out
    /// without swizzle; the TMA kernels' 128-byte swizzled descriptors are checked by the
    /// parity tests (tests/cuda_parity.rs), not here.
    ForwardTma,
    /// flash_bwd_wg and flash_bwd_tma: Sᵀ, dPᵀ (s), dV, dK (o), dQ (u).
    Backward,
}

impl WgmmaKernels {
    fn forms(self) -> &'static [usize] {
        match self {
            WgmmaKernels::Forward => &[1, 2, 4, 5],
            WgmmaKernels::ForwardTma => &[1, 6],
            WgmmaKernels::Backward => &[0, 1, 3],
        }
    }

    /// The kernels and the variable that picks them, for messages.
    pub fn name(self) -> &'static str {
        match self {
            WgmmaKernels::Forward => "forward (SHARDSMITH_FLASH_FWD=wgmma, wgmma128)",
            WgmmaKernels::ForwardTma => "warp-specialised forward (SHARDSMITH_FLASH_FWD=tma)",
            WgmmaKernels::Backward => {
                "backward (SHARDSMITH_FLASH_BWD=tma, the default in this build, or wgmma)"
            }
        }
    }

    /// How to run without these kernels.
    pub fn remedy(self) -> &'static str {
        match self {
            WgmmaKernels::Forward | WgmmaKernels::ForwardTma => {
                "Unset SHARDSMITH_FLASH_FWD (or set it to mma) to run the mma.sync forward."
            }
            WgmmaKernels::Backward => {
                "Set SHARDSMITH_FLASH_BWD=split (or wide, fused) to run the mma.sync backward."
            }
        }
    }
}

impl fmt::Display for WgmmaReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.forms.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let verdict =
                if r.wrong == 0 { "exact".to_string() } else { format!("{} of {} wrong", r.wrong, r.total) };
            write!(f, "{} ({}): {verdict}", r.name, r.what)?;
            for line in &r.diagnosis {
                write!(f, "\n    {line}")?;
            }
        }
        Ok(())
    }
}

/// Wrong elements shown per form.
const SHOWN: usize = 6;

/// Runs the check, `run` executing the probe on the given inputs and returning its
/// [`PROBE_OUT`] f32 outputs (on CUDA: `self_check`; tests pass CPU models of right and wrong
/// hardware).
pub fn check_with(mut run: impl FnMut(&ProbeInputs) -> Result<Vec<f32>>) -> Result<WgmmaReport> {
    let mut probe = |x: &ProbeInputs| -> Result<Vec<f32>> {
        let out = run(x)?;
        if out.len() != PROBE_OUT {
            candle_core::bail!("wgmma probe: {} outputs, expected {PROBE_OUT}", out.len());
        }
        Ok(out)
    };
    let x = ProbeInputs::random(7);
    let got = probe(&x)?;
    let want = expected(&x, &got[..N * N]);
    let mut forms: Vec<FormResult> = FORMS
        .iter()
        .map(|form| {
            let n = N * form.cols;
            let (g, w) = (&got[form.at..form.at + n], &want[form.at..form.at + n]);
            let wrong = g.iter().zip(w).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            FormResult { name: form.name, what: form.what, wrong, total: n, diagnosis: Vec::new() }
        })
        .collect();
    if forms.iter().all(|f| f.wrong == 0) {
        return Ok(WgmmaReport { forms });
    }
    // Where the wrong elements come from: with identities for the A side, each output element
    // is one element of the B-side matrix, whose value names its row (one run) or column (the
    // other). Right, element (m, n) reads b[n][m] (s, q), v[m][n] (o), c[m][n] (p), v[m][64 + n]
    // (u), and b[n][m] or c[n − 64][m] (w, x).
    let s_runs = (probe(&ProbeInputs::s_pattern(true))?, probe(&ProbeInputs::s_pattern(false))?);
    let pv_runs = (probe(&ProbeInputs::pv_pattern(true))?, probe(&ProbeInputs::pv_pattern(false))?);
    let s_is_identity =
        pv_runs.0[..N * N].iter().enumerate().all(|(i, &e)| e == if i / N == i % N { 1.0 } else { 0.0 });
    for (idx, (form, result)) in FORMS.iter().zip(&mut forms).enumerate() {
        if result.wrong == 0 {
            continue;
        }
        let reads_b = matches!(idx, 0 | 4 | 5 | 6); // the S forms: a = I, b (and c) the patterns
        let (rows, cols) = if reads_b { (&s_runs.0, &s_runs.1) } else { (&pv_runs.0, &pv_runs.1) };
        let source = |m: usize, n: usize| -> (usize, usize) {
            match idx {
                0 | 4 | 5 | 6 => (n % N, m),
                3 => (m, N + n),
                _ => (m, n),
            }
        };
        let name = |n: usize| match idx {
            0 | 4 => "b",
            5 | 6 if n < N => "b",
            2 | 5 | 6 => "c",
            _ => "v",
        };
        if !reads_b && !s_is_identity {
            result
                .diagnosis
                .push("(the pattern runs multiply bf16(s), and s was not the identity: read s first)".into());
        }
        let mut shown = 0;
        let mut misplaced = 0;
        for m in 0..N {
            for n in 0..form.cols {
                let at = form.at + m * form.cols + n;
                let want = source(m, n);
                let found = (describe(rows[at]), describe(cols[at]));
                if found == (Some(want.0), Some(want.1)) {
                    continue;
                }
                misplaced += 1;
                if shown < SHOWN {
                    shown += 1;
                    let show = |v: f32, i: Option<usize>| i.map_or(format!("{v}?"), |i| i.to_string());
                    let name = name(n);
                    result.diagnosis.push(format!(
                        "[{m}][{n}] read {name}[{}][{}], should read {name}[{}][{}]",
                        show(rows[at], found.0),
                        show(cols[at], found.1),
                        want.0,
                        want.1
                    ));
                }
            }
        }
        result.diagnosis.push(format!(
            "{misplaced} of {} elements read the wrong place in the index patterns (`v?`: the element \
             held v, a mix or nothing)",
            result.total
        ));
    }
    Ok(WgmmaReport { forms })
}

/// The index a pattern value names (value − 1), when it is one.
fn describe(v: f32) -> Option<usize> {
    (v >= 1.0 && v.fract() == 0.0 && v <= VN as f32).then(|| v as usize - 1)
}

#[cfg(feature = "cuda")]
mod device {
    use super::{check_with, WgmmaKernels, WgmmaReport};
    use candle_core::{bail, CudaDevice, Result};
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    /// [`check_with`] on `dev`'s GPU, run now.
    pub fn self_check(dev: &CudaDevice) -> Result<WgmmaReport> {
        check_with(|x| super::super::cuda::wgmma_probe(dev, x))
    }

    /// Ok once every form `kernels` use passed the self-check on `dev` (run at the first call
    /// per device, kept for the process); else an error with the report.
    pub(crate) fn ensure_verified(dev: &CudaDevice, kernels: WgmmaKernels) -> Result<()> {
        type Verdicts =
            Mutex<HashMap<candle_core::cuda_backend::DeviceId, std::result::Result<WgmmaReport, String>>>;
        static VERDICTS: OnceLock<Verdicts> = OnceLock::new();
        let mut verdicts = VERDICTS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        let verdict = match verdicts.get(&dev.id()) {
            Some(v) => v.clone(),
            None => {
                let v = self_check(dev).map_err(|e| format!("the probe kernel failed: {e}"));
                verdicts.insert(dev.id(), v.clone());
                v
            }
        };
        let why = match verdict {
            Ok(report) if report.passed_for(kernels) => return Ok(()),
            Ok(report) => format!("its results are wrong on this GPU:\n{report}"),
            Err(why) => why,
        };
        bail!(
            "the wgmma attention {} failed its self-check, so it is refused: {why}\n{}",
            kernels.name(),
            kernels.remedy()
        )
    }
}

#[cfg(feature = "cuda")]
pub(crate) use device::ensure_verified;
#[cfg(feature = "cuda")]
pub use device::self_check;

#[cfg(test)]
mod tests {
    use super::*;

    /// What right hardware outputs: the definitions, with bf16(s) for the P·V forms.
    fn right(x: &ProbeInputs) -> Result<Vec<f32>> {
        let s = expected(x, &[0.0; N * N]);
        Ok(expected(x, &s[..N * N]))
    }

    /// Right hardware but for one [64, 64] block of output starting at `at` with rows `stride`
    /// apart: element (m, n) becomes Σ_k a(m, k)·b(n, k) over k < 64, `a` and `b` given the
    /// right output's s and the inputs (wrong hardware reading the wrong place).
    fn right_but(
        x: &ProbeInputs,
        (at, stride): (usize, usize),
        a: impl Fn(&[f32], usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
    ) -> Result<Vec<f32>> {
        let mut out = right(x)?;
        let s = out[..N * N].to_vec();
        for m in 0..N {
            for n in 0..N {
                let v: f64 = (0..N).map(|k| f64::from(a(&s, m, k)) * f64::from(b(n, k))).sum();
                out[at + m * stride + n] = v as f32;
            }
        }
        Ok(out)
    }

    #[test]
    fn right_hardware_passes_every_form() {
        let report = check_with(right).unwrap();
        assert!(report.passed(), "{report}");
        assert!(report.passed_for(WgmmaKernels::Forward) && report.passed_for(WgmmaKernels::Backward));
        assert!(report.passed_for(WgmmaKernels::ForwardTma));
        assert_eq!(report.forms.len(), 7);
        assert!(report.to_string().lines().all(|l| l.ends_with("exact")), "{report}");
    }

    #[test]
    fn the_random_inputs_are_small_integers_of_every_value() {
        let x = ProbeInputs::random(7);
        for m in [&x.a, &x.b, &x.c, &x.v] {
            assert!(m.iter().all(|&e| e.fract() == 0.0 && e.abs() <= 2.0));
            for want in -2..=2 {
                assert!(m.contains(&(want as f32)), "{want} missing");
            }
        }
    }

    /// Hardware whose K-major operands of the ss form swap the two core matrices along K of
    /// every 16-column step (LBO read as SBO, say) is caught, named, and located.
    #[test]
    fn a_wrong_form_is_named_and_located() {
        let swapped = |x: &ProbeInputs| -> Result<Vec<f32>> {
            let mut a = x.a.clone();
            for m in 0..N {
                for k in 0..N {
                    // column k read from column k ^ 8 (the other core matrix of its 16)
                    a[m * N + k] = x.a[m * N + (k ^ 8)];
                }
            }
            let y = ProbeInputs { a, ..x.clone() };
            let s = expected(&y, &[0.0; N * N]);
            let mut out = expected(x, &s[..N * N]);
            out[..N * N].copy_from_slice(&s[..N * N]);
            Ok(out)
        };
        let report = check_with(swapped).unwrap();
        assert!(!report.passed());
        let text = report.to_string();
        assert!(report.forms[0].wrong > 0 && report.forms[1..].iter().all(|f| f.wrong == 0), "{text}");
        assert!(report.passed_for(WgmmaKernels::Forward) && !report.passed_for(WgmmaKernels::Backward));
        // s[0][1] = Σ_k a[0][k ^ 8] b[1][k]: with a = I that is b[1][8] (should be b[1][0])
        assert!(text.contains("[0][1] read b[1][8], should read b[1][0]"), "{text}");
        assert!(text.contains("s = a·bᵀ (ss, A and B K-major"), "{text}");
    }

    /// The register-A form with the two 8-row halves of each warp's fragment exchanged (a[i]
    /// read for row g + 8 where it holds row g): only q is wrong, located through b.
    #[test]
    fn a_wrong_register_fragment_is_named_and_located() {
        let halves = |x: &ProbeInputs| {
            right_but(x, (FORMS[4].at, N), |_, m, k| x.a[(m ^ 8) * N + k], |n, k| x.b[n * N + k])
        };
        let report = check_with(halves).unwrap();
        let text = report.to_string();
        assert!(
            report.forms[4].wrong > 0 && report.forms.iter().filter(|f| f.wrong > 0).count() == 1,
            "{text}"
        );
        // Only the forward uses the register-A form: the backward stays verified.
        assert!(!report.passed_for(WgmmaKernels::Forward) && report.passed_for(WgmmaKernels::Backward));
        // q[0][1] = Σ_k a[8][k] b[1][k]: with a = I that is b[1][8] (should be b[1][0])
        assert!(text.contains("[0][1] read b[1][8], should read b[1][0]"), "{text}");
        assert!(text.contains("q = a·bᵀ (rs, A from registers"), "{text}");
    }

    /// The n128 register-A form reading the second half of its B (c's rows) with neighbouring
    /// rows exchanged: w is wrong, located in c, and only the forward is refused.
    #[test]
    fn a_wrong_wide_form_is_located_in_its_second_operand() {
        let rows_swapped = |x: &ProbeInputs| {
            right_but(x, (FORMS[5].at + N, VN), |_, m, k| x.a[m * N + k], |n, k| x.c[(n ^ 1) * N + k])
        };
        let report = check_with(rows_swapped).unwrap();
        let text = report.to_string();
        assert!(
            report.forms[5].wrong > 0 && report.forms.iter().filter(|f| f.wrong > 0).count() == 1,
            "{text}"
        );
        // w[0][64] = Σ_k a[0][k] c[1][k]: with a = I that is c[1][0] (should be c[0][0])
        assert!(text.contains("[0][64] read c[1][0], should read c[0][0]"), "{text}");
        assert!(!report.passed_for(WgmmaKernels::Forward) && report.passed_for(WgmmaKernels::Backward));
    }

    /// The n128 shared-memory form (the warp-specialised forward's S) reading the first half of
    /// its B with neighbouring rows exchanged: x alone is wrong, located in b.
    #[test]
    fn a_wrong_shared_memory_wide_form_is_located() {
        let rows_swapped = |x: &ProbeInputs| {
            right_but(x, (FORMS[6].at, VN), |_, m, k| x.a[m * N + k], |n, k| x.b[(n ^ 1) * N + k])
        };
        let report = check_with(rows_swapped).unwrap();
        let text = report.to_string();
        assert!(
            report.forms[6].wrong > 0 && report.forms.iter().filter(|f| f.wrong > 0).count() == 1,
            "{text}"
        );
        // x[0][0] = Σ_k a[0][k] b[1][k]: with a = I that is b[1][0] (should be b[0][0])
        assert!(text.contains("[0][0] read b[1][0], should read b[0][0]"), "{text}");
        assert!(text.contains("x = a·[b; c]ᵀ (ss, A and B K-major, n128"), "{text}");
        // Only the warp-specialised forward uses it: the other forwards and the backward stay.
        assert!(!report.passed_for(WgmmaKernels::ForwardTma));
        assert!(report.passed_for(WgmmaKernels::Forward) && report.passed_for(WgmmaKernels::Backward));
    }

    /// A P·V form reading its B with rows and columns of each 8×8 core matrix exchanged.
    #[test]
    fn a_transposed_operand_shows_in_the_index_patterns() {
        // p[m][n] = Σ_k s[m][k]·c[k][n], c's element (k, n) read from its core matrix transposed
        let transposed = |x: &ProbeInputs| {
            right_but(
                x,
                (FORMS[2].at, N),
                |s, m, k| s[m * N + k],
                |n, k| x.c[(k / 8 * 8 + n % 8) * N + n / 8 * 8 + k % 8],
            )
        };
        let report = check_with(transposed).unwrap();
        let text = report.to_string();
        assert_eq!(report.forms.iter().filter(|f| f.wrong > 0).count(), 1, "{text}");
        // p[0][1] = c[0 + 1][0] with the core matrix transposed
        assert!(text.contains("[0][1] read c[1][0], should read c[0][1]"), "{text}");
        assert!(!text.contains("read s first"), "{text}");
    }

    #[test]
    fn a_probe_with_the_wrong_output_size_is_an_error() {
        let err = check_with(|_| Ok(vec![0.0; 10])).unwrap_err().to_string();
        assert!(err.contains("10 outputs, expected 40960"), "{err}");
    }
}
