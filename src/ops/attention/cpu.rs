//! Causal attention on the CPU, forward and backward, in f32 whatever the storage dtype.
//!
//! Blocked by query rows: a block of QB queries [i0, i1) sees keys [0, i1) only, so the scores
//! are one [QB, i1] matrix (never T×T, and only the diagonal block wastes its upper triangle).
//! Per block the products are GEMMs on the calling thread ([`cpu_gemm::gemm_f32_serial`]; a
//! triple loop where the CPU has no AVX-512) and the softmax is [`vmath`]'s vectorised exp;
//! heads run in parallel on the pool.
//!
//! Forward, per query block (s = scale):
//!   S = Q_b Kᵀ [QB, i1];  m_i = s·max_j S_ij (j ≤ i);  P_ij = exp(s·S_ij − m_i), 0 for j > i;
//!   l_i = Σ_j P_ij;  O_b = (P V) / l;  lse_i = m_i + ln l_i (saved for the backward).
//! Backward (FlashAttention-2's, recomputing P from lse), per K/V head so that the query heads
//! of a GQA group add into one dK/dV without sharing it across threads:
//!   D_i = dO_i·O_i;  P = exp(s·S − lse);  dV += Pᵀ dO_b;  dP = dO_b Vᵀ;
//!   dS = s·P∘(dP − D);  dQ_b = dS K;  dK += dSᵀ Q_b.
//!
//! Numerics: f32 products and sums (GEMM blocking order), the exp within 2 ulp; outputs rounded
//! to the dtype once. Against the materialised reference: ≤ 1e-6 on unit-scale inputs (tests).

use super::super::cpu_gemm::{f32_available, gemm_f32_serial, MatRef};
use super::super::par::{self, FirstError, SendPtr};
use super::super::vmath;
use candle_core::Result;

/// Query rows per block: the scores and their gradient are two [QB, T] f32 buffers per thread.
const QB: usize = 64;

/// (B, Hq, Hk, T, D) of the operands: q [B, Hq, T, D], k and v [B, Hk, T, D], contiguous.
pub(super) type Dims = (usize, usize, usize, usize, usize);

/// `C (+)= A · B` on this thread: the packed AVX-512 GEMM, or plain loops without it.
fn gemm(a: MatRef<f32>, b: MatRef<f32>, c: &mut [f32], accumulate: bool) -> Result<()> {
    if f32_available() {
        return gemm_f32_serial(a, b, c, accumulate);
    }
    let (m, k, n) = (a.rows, a.cols, b.cols);
    for i in 0..m {
        for j in 0..n {
            let dot: f32 = (0..k).map(|p| a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs]).sum();
            let c = &mut c[i * n + j];
            *c = if accumulate { *c + dot } else { dot };
        }
    }
    Ok(())
}

/// Rows `r0..r0 + rows` of a row-major [_, D] matrix.
fn rows_of(x: &[f32], r0: usize, rows: usize, d: usize) -> MatRef<'_, f32> {
    MatRef { data: &x[r0 * d..(r0 + rows) * d], rows, cols: d, rs: d, cs: 1 }
}

/// P for query rows `i0..i0 + rows` into `s` [rows, i0 + rows]: S = Q_b · K[0..keys]ᵀ, then
/// P_ij = exp(scale·S_ij − shift_i) for j ≤ i and 0 above the diagonal. The shift is the row's
/// scaled max (written to `shifts`, with Σ_j P_ij to `sums`) or, with `lse`, the saved
/// log-sum-exp (P is then already normalised).
#[allow(clippy::too_many_arguments)]
fn probabilities(
    q: &[f32],
    k: &[f32],
    (i0, rows, d): (usize, usize, usize),
    scale: f32,
    lse: Option<&[f32]>,
    s: &mut [f32],
    shifts: &mut [f32],
    sums: &mut [f32],
) -> Result<()> {
    let keys = i0 + rows;
    gemm(rows_of(q, i0, rows, d), rows_of(k, 0, keys, d).t(), s, false)?;
    for (r, row) in s.chunks_exact_mut(keys).enumerate() {
        let (live, above) = row.split_at_mut(i0 + r + 1);
        above.fill(0.0);
        shifts[r] = match lse {
            Some(lse) => lse[i0 + r],
            // The largest scaled score: scale · the max (scale is 1/√D > 0 in the models), or
            // scale · the min for a negative scale.
            None if scale >= 0.0 => scale * vmath::max(live),
            None => -scale * vmath::max(&live.iter().map(|x| -x).collect::<Vec<_>>()),
        };
        sums[r] = vmath::exp_affine_sum(live, scale, shifts[r]);
    }
    Ok(())
}

/// Forward: (o [B, Hq, T, D], lse [B, Hq, T]) from contiguous f32 q, k, v.
pub(super) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    scale: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (b, hq, hk, t, d) = dims;
    let group = hq / hk;
    let mut o = vec![0f32; b * hq * t * d];
    let mut lse = vec![0f32; b * hq * t];
    let failed = FirstError::new();
    par::chunks_mut2(&mut o, t * d, &mut lse, t, |bh, o, lse| {
        let kv = (bh / hq * hk + bh % hq / group) * t * d;
        let (q, k, v) = (&q[bh * t * d..(bh + 1) * t * d], &k[kv..kv + t * d], &v[kv..kv + t * d]);
        let (mut s, mut m, mut l) = (vec![0f32; QB.min(t) * t], [0f32; QB], [0f32; QB]);
        failed.record((|| {
            for i0 in (0..t).step_by(QB) {
                let rows = QB.min(t - i0);
                let keys = i0 + rows;
                let s = &mut s[..rows * keys];
                probabilities(q, k, (i0, rows, d), scale, None, s, &mut m, &mut l)?;
                let ob = &mut o[i0 * d..keys * d];
                gemm(
                    MatRef { data: s, rows, cols: keys, rs: keys, cs: 1 },
                    rows_of(v, 0, keys, d),
                    ob,
                    false,
                )?;
                for (r, orow) in ob.chunks_exact_mut(d).enumerate() {
                    orow.iter_mut().for_each(|x| *x /= l[r]);
                    lse[i0 + r] = m[r] + l[r].ln();
                }
            }
            Ok(())
        })());
    });
    failed.into_result()?;
    Ok((o, lse))
}

/// Backward: (dq [B, Hq, T, D], dk, dv [B, Hk, T, D]) from contiguous f32 q, k, v, the forward's
/// o and lse, and the output gradient g (shaped as o).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    g: &[f32],
    dims: Dims,
    scale: f32,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (b, hq, hk, t, d) = dims;
    let group = hq / hk;
    let mut dq = vec![0f32; b * hq * t * d];
    let (mut dk, mut dv) = (vec![0f32; b * hk * t * d], vec![0f32; b * hk * t * d]);
    let dq_ptr = SendPtr::new(&mut dq);
    let failed = FirstError::new();
    // One task per K/V head: its group's query heads add into its dK and dV in turn.
    par::chunks_mut2(&mut dk, t * d, &mut dv, t * d, |bk, dk, dv| {
        let kv = bk * t * d;
        let (k, v) = (&k[kv..kv + t * d], &v[kv..kv + t * d]);
        let qh0 = bk / hk * hq + bk % hk * group; // the group's first query head
                                                  // SAFETY: task bk alone writes its group's query heads (disjoint across tasks).
        let dq = unsafe { dq_ptr.slice(qh0 * t * d, group * t * d) };
        let (mut s, mut ds) = (vec![0f32; QB.min(t) * t], vec![0f32; QB.min(t) * t]);
        let (mut shifts, mut sums, mut dot) = ([0f32; QB], [0f32; QB], vec![0f32; t]);
        failed.record((|| {
            for (h, dq) in dq.chunks_exact_mut(t * d).enumerate() {
                let (head, rows) = ((qh0 + h) * t * d, (qh0 + h) * t);
                let (q, o, g) = (&q[head..head + t * d], &o[head..head + t * d], &g[head..head + t * d]);
                let lse = &lse[rows..rows + t];
                // D_i = dO_i · O_i (= Σ_j P_ij dP_ij).
                for (i, dot) in dot.iter_mut().enumerate() {
                    *dot = g[i * d..(i + 1) * d].iter().zip(&o[i * d..(i + 1) * d]).map(|(a, b)| a * b).sum();
                }
                for i0 in (0..t).step_by(QB) {
                    let rows = QB.min(t - i0);
                    let keys = i0 + rows;
                    let (s, ds) = (&mut s[..rows * keys], &mut ds[..rows * keys]);
                    probabilities(q, k, (i0, rows, d), scale, Some(lse), s, &mut shifts, &mut sums)?;
                    let p = MatRef { data: &*s, rows, cols: keys, rs: keys, cs: 1 };
                    let g_b = rows_of(g, i0, rows, d);
                    gemm(p.t(), g_b, &mut dv[..keys * d], true)?; // dV += Pᵀ dO
                    gemm(g_b, rows_of(v, 0, keys, d).t(), ds, false)?; // dP = dO Vᵀ
                    for (r, (ds, p)) in ds.chunks_exact_mut(keys).zip(s.chunks_exact(keys)).enumerate() {
                        let di = dot[i0 + r];
                        ds.iter_mut().zip(p).for_each(|(x, &p)| *x = scale * p * (*x - di));
                    }
                    let ds = MatRef { data: &*ds, rows, cols: keys, rs: keys, cs: 1 };
                    gemm(ds, rows_of(k, 0, keys, d), &mut dq[i0 * d..keys * d], false)?; // dQ = dS K
                    gemm(ds.t(), rows_of(q, i0, rows, d), &mut dk[..keys * d], true)?;
                    // dK += dSᵀ Q
                }
            }
            Ok(())
        })());
    });
    failed.into_result()?;
    Ok((dq, dk, dv))
}
