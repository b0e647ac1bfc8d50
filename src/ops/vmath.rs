//! Vectorised f32 math for the CPU kernels: exp (with the affine argument softmax needs) and
//! max over slices.
//!
//! Why hand-written: the crate builds for baseline x86-64 (SSE2), so `f32::exp` is a libm call
//! per element (`__expf_fma`: 2–5 % of a prefill in softmax, SiLU and attention), and no
//! maintained crate offers a runtime-dispatched AVX-512 exp. Where the CPU has AVX512-F the
//! loops below run 16 lanes at a time; elsewhere they fall back to `f32::exp`.
//!
//! Accuracy of the AVX-512 exp: Cody–Waite reduction x = n·ln 2 + r (|r| ≤ ln 2 / 2) and Cephes'
//! degree-6 polynomial for eʳ, then `vscalefps` for 2ⁿ (exact, and correct into the denormals and
//! to 0 / ∞ at the ends): within 2 ulp of the exact value over the whole f32 range (tested
//! against f64). NaN stays NaN; −∞ gives 0.

/// `xs[i] ← exp(scale·xs[i] − shift)`, returning the sum of the new values (f32, summed
/// lane-wise then across lanes).
pub(crate) fn exp_affine_sum(xs: &mut [f32], scale: f32, shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX512-F (checked just above).
        return unsafe { avx512::exp_affine_sum(xs, scale, shift) };
    }
    let mut sum = 0f32;
    for x in xs {
        *x = (scale * *x - shift).exp();
        sum += *x;
    }
    sum
}

/// The largest element (−∞ for an empty slice; NaNs are skipped).
pub(crate) fn max(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX512-F (checked just above).
        return unsafe { avx512::max(xs) };
    }
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// e^x for 16 lanes (module docs: method and accuracy).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp(x: __m512) -> __m512 {
        // Past these, e^x is 0 / ∞ in f32 anyway; clamping keeps n finite. max(lo, x) returns x
        // when x is NaN (the second operand), so NaN passes through both.
        let x = _mm512_min_ps(_mm512_set1_ps(88.8), _mm512_max_ps(_mm512_set1_ps(-104.0), x));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        // r = x − n·ln 2, with ln 2 split in two so n·C1 is exact.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        // eʳ ≈ 1 + r + r²·p
        let er = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(er, n)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_affine_sum(xs: &mut [f32], scale: f32, shift: f32) -> f32 {
        let (vs, vb) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
        let mut acc = _mm512_setzero_ps();
        let mut chunks = xs.chunks_exact_mut(16);
        for c in &mut chunks {
            let y = exp(_mm512_fmsub_ps(_mm512_loadu_ps(c.as_ptr()), vs, vb));
            _mm512_storeu_ps(c.as_mut_ptr(), y);
            acc = _mm512_add_ps(acc, y);
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let mask = ((1u32 << tail.len()) - 1) as __mmask16;
            let y = exp(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mask, tail.as_ptr()), vs, vb));
            _mm512_mask_storeu_ps(tail.as_mut_ptr(), mask, y);
            acc = _mm512_mask_add_ps(acc, mask, acc, y);
        }
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max(xs: &[f32]) -> f32 {
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut chunks = xs.chunks_exact(16);
        for c in &mut chunks {
            // max(x, acc) keeps acc where x is NaN.
            acc = _mm512_max_ps(_mm512_loadu_ps(c.as_ptr()), acc);
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            let mask = ((1u32 << tail.len()) - 1) as __mmask16;
            acc = _mm512_mask_max_ps(acc, mask, _mm512_maskz_loadu_ps(mask, tail.as_ptr()), acc);
        }
        _mm512_reduce_max_ps(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32s of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_2_ulp_of_f64_over_the_f32_range() {
        // Every 997th f32 bit pattern in [-104, 89], both signs, plus the edges.
        let mut xs: Vec<f32> = (0..u32::MAX / 997)
            .map(|i| f32::from_bits(i * 997))
            .filter(|x| x.is_finite() && *x > -104.0 && *x < 89.0)
            .collect();
        xs.extend([0.0, -0.0, 1.0, -1.0, 88.7, -87.3, -103.9, 1e-30, -1e-30]);
        let mut ys = xs.clone();
        exp_affine_sum(&mut ys, 1.0, 0.0);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (x as f64).exp() as f32;
            if want == 0.0 || want.is_infinite() || want < f32::MIN_POSITIVE {
                // Underflow into the denormals / overflow: absolute error below the smallest normal.
                assert!((y - want).abs() <= f32::MIN_POSITIVE || y == want, "exp({x}) = {y}, want {want}");
            } else {
                assert!(ulps(y, want) <= 2, "exp({x}) = {y}, want {want} ({} ulp)", ulps(y, want));
            }
        }
    }

    #[test]
    fn exp_edges_and_the_affine_sum() {
        let mut v = vec![f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -200.0, 200.0];
        exp_affine_sum(&mut v, 1.0, 0.0);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[1], f32::INFINITY);
        assert!(v[2].is_nan());
        assert_eq!(v[3], 0.0);
        assert_eq!(v[4], f32::INFINITY);
        // A length with a tail: the sum counts the live lanes only.
        let mut v: Vec<f32> = (0..37).map(|i| i as f32 * 0.1).collect();
        let want: f64 = v.iter().map(|&x| (0.5 * x as f64 - 1.0).exp()).sum();
        let sum = exp_affine_sum(&mut v, 0.5, 1.0);
        assert!((sum as f64 - want).abs() < 1e-5 * want, "{sum} vs {want}");
        assert!((v[36] as f64 - (0.5f64 * 3.6 - 1.0).exp()).abs() < 1e-6);
    }

    #[test]
    fn max_with_tails_and_nans() {
        for n in [0, 1, 15, 16, 17, 40] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 31) as f32 - 10.0).collect();
            let want = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&v), want, "n = {n}");
        }
        assert_eq!(max(&[1.0, f32::NAN, 3.0]), 3.0);
    }
}
