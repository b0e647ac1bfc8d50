//! Where the wgmma attention kernels' warps spend their cycles. Their profiled instantiations
//! (kernels/src/phases.cuh, flash_wg.cu's `PROF`) read the SM's cycle counter at every phase
//! boundary of every warp and sum the cycles and the runs of each phase over the grid; this
//! module names the phases, runs those kernels, and reads the counters back. It is how a stall
//! is found without a profiler on the device: `shardsmith bench attention --phases` prints each
//! phase's share beside the plain kernels' times.
//!
//! A share is a fraction of the warps' summed lifetimes (the phases tile each warp's life), not
//! of the kernel's wall time: a phase that only some warps run (the backward's `skipped`) or a
//! tail of late blocks weighs by warp-cycles. The profiled kernels compute exactly what the plain
//! ones do (the parity tests compare them bit for bit) but run a few more instructions per
//! boundary, so their times are printed beside the plain kernels'.

use super::{FlashBackward, FlashForward};
use candle_core::{bail, Result, Tensor};

/// The phases of the causal wgmma forward (flash_wg.cu's `WgFwdPhase`, in order), as a warp of
/// a 128-query block meets them:
/// - `prologue`: Q and the first K tile requested, Q's wait and barrier, Q into registers;
/// - per key tile: `tile_wait` (its cp.async wait and the barrier after it), `issue` (S = Q·Kᵀ
///   and the previous tile's P·V issued, the next tiles requested), `wait_s` (until S is done),
///   `softmax` (mask, row max, exponentials), `wait_pv` (until the previous P·V is done),
///   `rescale` (O rescaled, P packed as the next P·V's operand);
/// - `last_pv`: the last tile's P·V with its wait and barrier; `epilogue`: O and lse stored.
pub const FORWARD: [&str; 9] =
    ["prologue", "tile_wait", "issue", "wait_s", "softmax", "wait_pv", "rescale", "last_pv", "epilogue"];

/// The phases of the warp-specialised TMA forward (flash_wg.cu's `WsFwdPhase`, in order). A consumer
/// warp (8 a block) meets:
/// - `prologue`: until Q has landed (the producer's: until it starts loading);
/// - per key tile: `tile_wait` (until K_j and V_{j−1} are signalled), `turn` (until the other
///   consumer's S has landed: ping-pong), `issue_wait_s` (S and the previous P·V issued, until S
///   has landed: one phase, since a clock read between the issue and the wait makes ptxas
///   serialise the products), `softmax`, `wait_pv`, `rescale`;
/// - `last_pv` and `epilogue` as in [`FORWARD`].
///
/// The loading producer warp (the first of 4 a block; the others only pass their prologue) meets,
/// per K and per V tile: `load_wait` (until the buffer's consumers have released it) and
/// `load_issue` (the TMA requests; their landing is signalled without the producer waiting).
pub const WS_FORWARD: [&str; 11] = [
    "prologue",
    "tile_wait",
    "turn",
    "issue_wait_s",
    "softmax",
    "wait_pv",
    "rescale",
    "last_pv",
    "epilogue",
    "load_wait",
    "load_issue",
];

/// The phases of the wgmma backward (flash_wg.cu's `WgBwdPhase`, in order), as a warp of a
/// 128-key block meets them:
/// - `prologue`: K, V and the first step's tiles requested;
/// - per 64-query step: `tile_wait` (the step's cp.async wait and barrier), then in a warpgroup
///   whose keys some query reaches `issue` (Sᵀ and dPᵀ issued, the next step's tiles requested),
///   `wait_s` (until Sᵀ is done), `p` (Pᵀ, dV += Pᵀ·dO issued), `wait_dp` (until dPᵀ is done),
///   `ds` (dSᵀ computed and stored, dK += dSᵀ·Q issued), or in one whose keys all lie past the
///   step's queries `skipped` (its dSᵀ rows zeroed); then `barrier` (the barrier before dQ),
///   `dq` (dQ += dS·K issued, and it, dV and dK waited for), `atomics` (dQ added to global);
/// - `epilogue`: dK and dV stored.
pub const BACKWARD: [&str; 12] = [
    "prologue",
    "tile_wait",
    "issue",
    "wait_s",
    "p",
    "wait_dp",
    "ds",
    "skipped",
    "barrier",
    "dq",
    "atomics",
    "epilogue",
];

/// The phases of the warp-specialised TMA backward (flash_wg.cu's `WsBwdPhase`, in order): a
/// consumer warp meets [`BACKWARD`]'s phases but with `tile_wait` the wait for the producer's
/// signal (no barrier), `issue` and `wait_s` one phase (`issue_wait_s`: a clock read between them
/// serialises the products), and `atomics` the staging of dQ in shared memory, the barrier after
/// it and the bulk reduce's issue; a producer warp meets, per step, `load_wait` (until the buffer
/// is released) and `load_issue` (the requests, whose landing is signalled without the producer
/// waiting for it), after its `prologue` and the K, V requests.
pub const WS_BACKWARD: [&str; 13] = [
    "prologue",
    "tile_wait",
    "issue_wait_s",
    "p",
    "wait_dp",
    "ds",
    "skipped",
    "barrier",
    "dq",
    "atomics",
    "epilogue",
    "load_wait",
    "load_issue",
];

/// One phase's totals over every warp of the grid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseTime {
    pub phase: &'static str,
    /// SM clock cycles, summed over warps.
    pub cycles: u64,
    /// Times a warp ran it, summed over warps.
    pub runs: u64,
}

/// A profiled kernel's cycles by phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseProfile {
    pub kernel: &'static str,
    pub phases: Vec<PhaseTime>,
}

impl PhaseProfile {
    /// From a kernel's counters as phases.cuh writes them: cycles of each of `names`, then runs.
    pub fn from_counters(
        kernel: &'static str,
        names: &[&'static str],
        counters: &[u64],
    ) -> Result<PhaseProfile> {
        if counters.len() != 2 * names.len() {
            bail!(
                "{kernel}: {} phase counters, expected {} (cycles and runs of {} phases)",
                counters.len(),
                2 * names.len(),
                names.len()
            );
        }
        let n = names.len();
        let phases =
            (0..n).map(|i| PhaseTime { phase: names[i], cycles: counters[i], runs: counters[n + i] });
        Ok(PhaseProfile { kernel, phases: phases.collect() })
    }

    /// All warps' cycles together (the phases tile each warp's life).
    pub fn total_cycles(&self) -> u64 {
        self.phases.iter().map(|p| p.cycles).sum()
    }

    /// An error naming the first phase that ran another number of times than `expected` (one
    /// entry a phase, from [`forward_runs`] or [`backward_runs`]).
    pub fn check_runs(&self, expected: &[u64]) -> Result<()> {
        if expected.len() != self.phases.len() {
            bail!("{}: {} expected run counts for {} phases", self.kernel, expected.len(), self.phases.len());
        }
        for (p, &want) in self.phases.iter().zip(expected) {
            if p.runs != want {
                bail!(
                    "{}: phase {} ran {} times over the grid's warps, expected {want}",
                    self.kernel,
                    p.phase,
                    p.runs
                );
            }
        }
        Ok(())
    }

    /// `{"kernel", "total_cycles", "phases": [{"phase", "share", "runs", "cycles_per_run"}]}`.
    pub fn to_json(&self) -> serde_json::Value {
        let total = self.total_cycles().max(1) as f64;
        let phases: Vec<_> = self
            .phases
            .iter()
            .map(|p| {
                serde_json::json!({
                    "phase": p.phase,
                    "share": p.cycles as f64 / total,
                    "runs": p.runs,
                    "cycles_per_run": if p.runs == 0 { 0.0 } else { p.cycles as f64 / p.runs as f64 },
                })
            })
            .collect();
        serde_json::json!({"kernel": self.kernel, "total_cycles": self.total_cycles(), "phases": phases})
    }
}

/// Warps a block of the wgmma kernels (2 warpgroups); the warp-specialised forward has a
/// producer warpgroup besides.
const WARPS: u64 = 8;
const WS_PRODUCER_WARPS: u64 = 4;
/// Query rows a forward block, keys a backward block, queries a backward step (flash_wg.cu).
const FWD_ROWS: usize = 128;
const BWD_KEYS: usize = 128;
const BWD_QUERIES: usize = 64;

/// Key tiles of `keys` keys the causal wgmma forward runs over B·Hq heads of T queries: each
/// 128-query block's tiles up to the end of its diagonal.
pub fn forward_tiles(b: usize, hq: usize, t: usize, keys: usize) -> u64 {
    let per_head: usize = (0..t.div_ceil(FWD_ROWS)).map(|i| ((i + 1) * FWD_ROWS).min(t).div_ceil(keys)).sum();
    (b * hq * per_head) as u64
}

/// Steps of the wgmma backward over B·Hq heads of T positions: each 128-key block takes its
/// group's query heads × the 64-query tiles from its first key on.
pub fn backward_steps(b: usize, hq: usize, t: usize) -> u64 {
    let per_head: usize = (0..t.div_ceil(BWD_KEYS)).map(|i| (t - i * BWD_KEYS).div_ceil(BWD_QUERIES)).sum();
    (b * hq * per_head) as u64
}

/// How many times the warps of the causal wgmma forward run each phase of [`FORWARD`].
pub fn forward_runs(b: usize, hq: usize, t: usize, keys: usize) -> Vec<u64> {
    let blocks = WARPS * (b * hq * t.div_ceil(FWD_ROWS)) as u64;
    let tiles = WARPS * forward_tiles(b, hq, t, keys);
    vec![blocks, tiles, tiles, tiles, tiles, tiles, tiles, blocks, blocks]
}

/// How many times the warps of the warp-specialised forward run each phase of [`WS_FORWARD`]:
/// per block 8 consumer and 4 producer warps, 128-key tiles; the first producer warp (whose
/// thread 0 issues the TMA copies) requests Q and then K and V per tile.
pub fn ws_forward_runs(b: usize, hq: usize, t: usize) -> Vec<u64> {
    let blocks = (b * hq * t.div_ceil(FWD_ROWS)) as u64;
    let tiles = forward_tiles(b, hq, t, 128);
    let (c, p) = (WARPS, WS_PRODUCER_WARPS);
    let per_tile = c * tiles;
    vec![
        (c + p) * blocks,
        per_tile,
        per_tile,
        per_tile,
        per_tile,
        per_tile,
        per_tile,
        c * blocks,
        c * blocks,
        2 * tiles,          // load_wait, the one loading warp's
        blocks + 2 * tiles, // load_issue: Q, then K and V per tile
    ]
}

/// The phase names of `variant`'s profiled forward and how often each runs on the causal
/// forward over B·Hq heads of T queries (head dim 128).
pub fn forward_phases_of(
    variant: FlashForward,
    b: usize,
    hq: usize,
    t: usize,
) -> Result<(&'static [&'static str], Vec<u64>)> {
    if variant.tma(128) {
        return Ok((&WS_FORWARD, ws_forward_runs(b, hq, t)));
    }
    match variant.wgmma_keys(128) {
        Some(keys) => Ok((&FORWARD, forward_runs(b, hq, t, keys))),
        None => bail!("phase profile: {} is not a wgmma forward (wgmma, wgmma128, tma)", variant.name()),
    }
}

/// How many times the warps of the wgmma backward run each phase of [`BACKWARD`] over B × Hk
/// K/V heads (Hq query heads): warpgroup 1 skips the first step of each query head in a block
/// (its keys start 64 past the step's last query), every other step is worked by both.
pub fn backward_runs(b: usize, hq: usize, hk: usize, t: usize) -> Vec<u64> {
    let blocks = WARPS * (b * hk * t.div_ceil(BWD_KEYS)) as u64;
    let steps = WARPS * backward_steps(b, hq, t);
    let skipped = WARPS / 2 * (b * hq * t.div_ceil(BWD_KEYS)) as u64;
    let worked = steps - skipped;
    vec![blocks, steps, worked, worked, worked, worked, worked, skipped, steps, steps, steps, blocks]
}

/// How many times the warps of the warp-specialised backward run each phase of [`WS_BACKWARD`]:
/// the consumers as [`backward_runs`]'s warps, the 4 producer warps of a block once a step (the
/// K, V requests once a block besides).
pub fn ws_backward_runs(b: usize, hq: usize, hk: usize, t: usize) -> Vec<u64> {
    let wg = backward_runs(b, hq, hk, t);
    let blocks = (b * hk * t.div_ceil(BWD_KEYS)) as u64;
    let steps = backward_steps(b, hq, t);
    let p = WS_PRODUCER_WARPS;
    // backward_runs: prologue, tile_wait, issue, wait_s, p, wait_dp, ds, skipped, barrier, dq,
    // atomics, epilogue (issue and wait_s merge here)
    vec![
        wg[0] + p * blocks,
        wg[1],
        wg[3],
        wg[4],
        wg[5],
        wg[6],
        wg[7],
        wg[8],
        wg[9],
        wg[10],
        wg[11],
        p * steps,
        p * (blocks + steps),
    ]
}

/// The phase names of `variant`'s profiled backward and how often each runs over B × Hk K/V heads
/// (Hq query heads) of T positions (head dim 128).
pub fn backward_phases_of(
    variant: FlashBackward,
    b: usize,
    hq: usize,
    hk: usize,
    t: usize,
) -> Result<(&'static [&'static str], Vec<u64>)> {
    match variant {
        FlashBackward::Wgmma => Ok((&BACKWARD, backward_runs(b, hq, hk, t))),
        FlashBackward::Tma => Ok((&WS_BACKWARD, ws_backward_runs(b, hq, hk, t))),
        other => bail!("phase profile: {} is not a wgmma backward (wgmma, tma)", other.name()),
    }
}

/// Why the profiles need a GPU build.
#[cfg(not(feature = "cuda"))]
const NEEDS_CUDA: &str =
    "phase profiles run the CUDA kernels: build with --features cuda for compute capability 9.0";

/// The causal wgmma forward `variant` (`wgmma`: 64-key tiles, `wgmma128`: 128, `tma`: 128,
/// warp-specialised), profiled on q [B, Hq, T, 128], k, v [B, Hk, T, 128] (bf16 on CUDA, 16-byte
/// aligned): (o, lse, its profile).
pub fn profile_forward(
    variant: FlashForward,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, PhaseProfile)> {
    let (kernel, names): (_, &'static [&'static str]) = match variant.wgmma_keys(128) {
        _ if variant.tma(128) => ("flash_fwd_tma_prof_bf16_d128", &WS_FORWARD),
        Some(64) => ("flash_fwd_wg_prof_bf16_d128", &FORWARD),
        Some(_) => ("flash_fwd_wg_prof_bf16_d128_n128", &FORWARD),
        None => bail!("phase profile: {} is not a wgmma forward (wgmma, wgmma128, tma)", variant.name()),
    };
    #[cfg(feature = "cuda")]
    {
        let (o, lse, c) =
            super::super::cuda::attention_fwd_profiled(q, k, v, scale as f32, variant, names.len())?;
        Ok((o, lse, PhaseProfile::from_counters(kernel, names, &c)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (kernel, names, q, k, v, scale);
        bail!("{NEEDS_CUDA}")
    }
}

/// The wgmma backward `variant` (`wgmma`, or `tma`: warp-specialised) profiled on the forward's
/// inputs, o, lse and the output gradient g (bf16 on CUDA, head dim 128, 16-byte aligned):
/// ((dq, dk, dv), its profile).
#[allow(clippy::too_many_arguments)]
pub fn profile_backward(
    variant: FlashBackward,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    scale: f64,
) -> Result<((Tensor, Tensor, Tensor), PhaseProfile)> {
    let (kernel, names): (_, &'static [&'static str]) = match variant {
        FlashBackward::Wgmma => ("flash_bwd_wg_prof_bf16_d128", &BACKWARD),
        FlashBackward::Tma => ("flash_bwd_tma_prof_bf16_d128", &WS_BACKWARD),
        other => bail!("phase profile: {} is not a wgmma backward (wgmma, tma)", other.name()),
    };
    #[cfg(feature = "cuda")]
    {
        let (grads, c) = super::super::cuda::attention_bwd_profiled(
            q,
            k,
            v,
            o,
            lse,
            g,
            scale as f32,
            variant,
            names.len(),
        )?;
        Ok((grads, PhaseProfile::from_counters(kernel, names, &c)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (kernel, names, q, k, v, o, lse, g, scale);
        bail!("{NEEDS_CUDA}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels index their counters by flash_wg.cu's enums and the host sizes the buffer
    /// from these name arrays: a phase added on one side only would write past it.
    #[test]
    fn names_match_the_kernels_enums() {
        let src = include_str!("../../../kernels/src/flash_wg.cu");
        let phases = |enum_name: &str, prefix: &str| -> Vec<String> {
            let body = src.split(&format!("enum {enum_name} {{")).nth(1).expect("the enum in flash_wg.cu");
            let body = &body[..body.find('}').expect("the enum's end")];
            let names: Vec<_> = body.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
            assert_eq!(
                names.last(),
                Some(&format!("{prefix}PHASES").as_str()),
                "{enum_name} ends with its count"
            );
            names[..names.len() - 1]
                .iter()
                .map(|n| n.strip_prefix(prefix).expect("the enum's prefix").to_lowercase())
                .collect()
        };
        assert_eq!(phases("WgFwdPhase", "WF_"), FORWARD);
        assert_eq!(phases("WgBwdPhase", "WB_"), BACKWARD);
        assert_eq!(phases("WsFwdPhase", "WS_"), WS_FORWARD);
        assert_eq!(phases("WsBwdPhase", "WSB_"), WS_BACKWARD);
    }

    #[test]
    fn geometry_counts_match_hand_counted_grids() {
        // T 300, 128-query blocks: tiles of 64 keys up to 128, 256, 300 → 2 + 4 + 5 per head.
        assert_eq!(forward_tiles(1, 1, 300, 64), 11);
        // 128-key tiles: 1 + 2 + 3.
        assert_eq!(forward_tiles(2, 3, 300, 128), 2 * 3 * 6);
        assert_eq!(forward_tiles(1, 1, 1, 64), 1);
        // T 300, 128-key blocks from 0, 128, 256: 64-query steps from there to 300 → 5 + 3 + 1.
        assert_eq!(backward_steps(1, 1, 300), 9);
        assert_eq!(backward_steps(2, 4, 300), 72);
        // One block of Hq 4 / Hk 2 heads at T 40: 8 warps, one step per query head, warpgroup 1
        // (4 warps) skipping each.
        let runs = backward_runs(1, 4, 2, 40);
        assert_eq!(runs[0], 2 * 8, "prologue: a block per K/V head");
        assert_eq!(runs[1], 4 * 8, "tile_wait: a step per query head");
        assert_eq!((runs[2], runs[7]), (4 * 4, 4 * 4), "issue and skipped split the warps");
        assert_eq!(runs[11], 2 * 8);
        let f = forward_runs(1, 1, 300, 64);
        assert_eq!((f[0], f[1], f[7]), (3 * 8, 11 * 8, 3 * 8));
        assert_eq!(f.len(), FORWARD.len());
        assert_eq!(backward_runs(1, 1, 1, 1).len(), BACKWARD.len());
        // The warp-specialised forward at T 300: 3 blocks, 1 + 2 + 3 128-key tiles; 12 warps a
        // block, one producer warp requesting Q once and K, V per tile (the others only pass
        // their prologue).
        let w = ws_forward_runs(1, 1, 300);
        assert_eq!(w.len(), WS_FORWARD.len());
        assert_eq!((w[0], w[1], w[7]), (3 * 12, 6 * 8, 3 * 8));
        assert_eq!((w[9], w[10]), (12, 3 + 12));
        let (names, runs) = forward_phases_of(FlashForward::Tma, 1, 1, 300).unwrap();
        assert_eq!((names, runs), (&WS_FORWARD[..], w));
        let (names, runs) = forward_phases_of(FlashForward::Wgmma, 1, 1, 300).unwrap();
        assert_eq!((names, runs), (&FORWARD[..], forward_runs(1, 1, 300, 64)));
        assert!(forward_phases_of(FlashForward::MmaSync, 1, 1, 300).is_err());
        // The warp-specialised backward at Hq 4 / Hk 2, T 40: 2 blocks of 12 warps, 4 steps, the
        // producers once a step plus the K, V requests once a block.
        let w = ws_backward_runs(1, 4, 2, 40);
        assert_eq!(w.len(), WS_BACKWARD.len());
        assert_eq!((w[0], w[1], w[7], w[10]), (2 * 12, 4 * 8, 4 * 8, 2 * 8));
        assert_eq!((w[2], w[6]), (4 * 4, 4 * 4), "issue_wait_s and skipped split the consumer warps");
        assert_eq!((w[11], w[12]), (4 * 4, 4 * (2 + 4)));
        // TMA loads K, V, Q, dO by one thread, but all 4 producer warps stage lse and Δ.
        assert_eq!(backward_phases_of(FlashBackward::Tma, 1, 4, 2, 40).unwrap(), (&WS_BACKWARD[..], w));
        assert!(backward_phases_of(FlashBackward::Split, 1, 4, 2, 40).is_err());
    }

    #[test]
    fn profiles_read_the_counters_and_name_what_is_off() {
        let names = ["a", "b"];
        let p = PhaseProfile::from_counters("k", &names, &[30, 10, 3, 2]).unwrap();
        assert_eq!(p.total_cycles(), 40);
        assert_eq!(p.phases[1], PhaseTime { phase: "b", cycles: 10, runs: 2 });
        let j = p.to_json();
        assert_eq!(j["phases"][0]["share"], 0.75);
        assert_eq!(j["phases"][1]["cycles_per_run"], 5.0);
        p.check_runs(&[3, 2]).unwrap();
        let e = p.check_runs(&[3, 4]).unwrap_err().to_string();
        assert!(e.contains("phase b ran 2 times") && e.contains("expected 4"), "{e}");
        let e = PhaseProfile::from_counters("k", &names, &[1, 2, 3]).unwrap_err().to_string();
        assert!(e.contains("3 phase counters, expected 4"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn profiles_without_a_gpu_build_say_what_they_need() {
        let x = Tensor::zeros((1, 1, 4, 128), candle_core::DType::BF16, &candle_core::Device::Cpu).unwrap();
        let e = profile_forward(FlashForward::Wgmma, &x, &x, &x, 1.0).unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
        let e = profile_forward(FlashForward::MmaSync, &x, &x, &x, 1.0).unwrap_err().to_string();
        assert!(e.contains("not a wgmma forward"), "{e}");
        let e = profile_backward(FlashBackward::Wgmma, &x, &x, &x, &x, &x, &x, 1.0).unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
