//! Next-token selection: greedy, temperature and nucleus (top-p) sampling with a seeded RNG.
//!
//! The RNG is [`crate::rng`]'s xoshiro256**, so a seed on the command line reproduces the same
//! text next year.

use crate::rng::Xoshiro256StarStar;
use crate::{Error, Result};

/// Picks the next token from a logits row.
///
/// `temperature == 0` is greedy decoding (argmax, lowest index on ties, like `torch.argmax`).
/// Otherwise the logits are divided by the temperature, soft-maxed in f64, optionally cut to the
/// top-p nucleus, and sampled with the seeded generator, so the same seed and logits always give
/// the same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f64,
    top_p: Option<f64>,
    seed: u64,
    rng: Xoshiro256StarStar,
}

impl Sampler {
    /// A sampler; `temperature` must be finite and ≥ 0, `top_p` (if given) in (0, 1].
    pub fn new(temperature: f64, top_p: Option<f64>, seed: u64) -> Result<Self> {
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(Error::Usage(format!("temperature must be a finite number >= 0, got {temperature}")));
        }
        if let Some(p) = top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Usage(format!("top-p must be in (0, 1], got {p}")));
            }
        }
        Ok(Self { temperature, top_p, seed, rng: Xoshiro256StarStar::seed_from_u64(seed) })
    }

    /// Greedy decoding (temperature 0); the seed is irrelevant.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_p: None, seed: 0, rng: Xoshiro256StarStar::seed_from_u64(0) }
    }

    /// The temperature this sampler was built with.
    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    /// The nucleus threshold, if any.
    pub fn top_p(&self) -> Option<f64> {
        self.top_p
    }

    /// The seed the generator started from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next token id for one row of logits (`[V]`).
    ///
    /// NaN logits are an error rather than a silent pick: they mean the model diverged.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::Usage("cannot sample from an empty logits row".into()));
        }
        if let Some(i) = logits.iter().position(|l| l.is_nan()) {
            return Err(Error::Usage(format!(
                "logits contain NaN (first at token {i}); the model output is not usable"
            )));
        }
        if logits.iter().all(|&l| l == f32::NEG_INFINITY) {
            return Err(Error::Usage("every logit is -inf; no token can be sampled".into()));
        }
        if self.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let probs = softmax_with_temperature(logits, self.temperature);
        // Candidates in descending probability, ties by ascending index (stable sort), so the
        // walk below is deterministic.
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let keep = match self.top_p {
            Some(p) => nucleus_len(&order, &probs, p),
            None => order.len(),
        };
        let kept = &order[..keep];
        let total: f64 = kept.iter().map(|&i| probs[i]).sum();
        let mut target = self.rng.next_f64() * total;
        for &i in kept {
            target -= probs[i];
            if target < 0.0 {
                return Ok(i as u32);
            }
        }
        // Rounding can leave a sliver of mass at the end: it belongs to the last kept token.
        Ok(kept[kept.len() - 1] as u32)
    }
}

/// Index of the largest logit; the lowest index wins ties (as `torch.argmax` does).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate().skip(1) {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `softmax(logits / temperature)` in f64 (max-subtracted, so large logits cannot overflow).
/// `+inf` logits share all the mass, as the limit of the softmax does.
fn softmax_with_temperature(logits: &[f32], temperature: f64) -> Vec<f64> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
    let mut probs: Vec<f64> = logits
        .iter()
        .map(|&l| match max {
            f64::INFINITY => f64::from(u8::from(l == f32::INFINITY)),
            _ => ((l as f64 - max) / temperature).exp(),
        })
        .collect();
    let sum: f64 = probs.iter().sum();
    for p in &mut probs {
        *p /= sum;
    }
    probs
}

/// How many of the descending-sorted candidates form the smallest set with mass ≥ `p`
/// (at least one, so the most likely token always survives).
fn nucleus_len(order: &[usize], probs: &[f64], p: f64) -> usize {
    let mut cumulative = 0.0;
    for (n, &i) in order.iter().enumerate() {
        cumulative += probs[i];
        if cumulative >= p {
            return n + 1;
        }
    }
    order.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_lowest_index_on_ties() {
        let mut s = Sampler::greedy();
        assert_eq!(s.sample(&[0.5, 2.0, -1.0, 2.0]).unwrap(), 1);
        assert_eq!(s.sample(&[3.0, 3.0, 3.0]).unwrap(), 0);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, -1e30, f32::NEG_INFINITY]).unwrap(), 1);
        assert!(s.sample(&[f32::NEG_INFINITY; 3]).is_err());
        assert_eq!(argmax(&[1.0, f32::INFINITY, f32::INFINITY]), 1);
    }

    #[test]
    fn nan_and_empty_logits_are_errors() {
        let mut s = Sampler::greedy();
        assert!(s.sample(&[]).is_err());
        let err = s.sample(&[0.0, f32::NAN]).unwrap_err().to_string();
        assert!(err.contains("token 1"), "{err}");
    }

    #[test]
    fn invalid_settings_are_rejected() {
        assert!(Sampler::new(-0.1, None, 0).is_err());
        assert!(Sampler::new(f64::NAN, None, 0).is_err());
        assert!(Sampler::new(1.0, Some(0.0), 0).is_err());
        assert!(Sampler::new(1.0, Some(1.5), 0).is_err());
        assert!(Sampler::new(1.0, Some(1.0), 0).is_ok());
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probs ∝ [0.1, 0.4, 0.2, 0.3] → descending order 1, 3, 2, 0
        let logits: Vec<f32> = [0.1f32, 0.4, 0.2, 0.3].iter().map(|p| p.ln()).collect();
        let probs = softmax_with_temperature(&logits, 1.0);
        let mut order: Vec<usize> = (0..4).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        assert_eq!(order, [1, 3, 2, 0]);
        assert_eq!(nucleus_len(&order, &probs, 0.4), 1);
        assert_eq!(nucleus_len(&order, &probs, 0.5), 2);
        assert_eq!(nucleus_len(&order, &probs, 0.7), 2);
        assert_eq!(nucleus_len(&order, &probs, 0.75), 3);
        assert_eq!(nucleus_len(&order, &probs, 1.0), 4);

        // Sampling with p = 0.65 only ever returns tokens 1 and 3, and both of them.
        let mut s = Sampler::new(1.0, Some(0.65), 7).unwrap();
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits).unwrap() as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2], 0, "{seen:?}");
        assert!(seen[1] > seen[3] && seen[3] > 0, "{seen:?}");
    }

    #[test]
    fn ties_in_top_p_are_broken_by_index() {
        // Four equal tokens, p = 0.5: the two lowest indices form the nucleus.
        let mut s = Sampler::new(1.0, Some(0.5), 3).unwrap();
        for _ in 0..200 {
            assert!(s.sample(&[1.0, 1.0, 1.0, 1.0]).unwrap() < 2);
        }
    }

    #[test]
    fn same_seed_gives_same_sequence() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(0.8, Some(0.9), seed).unwrap();
            (0..64).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn infinite_logits_take_all_the_mass() {
        let mut s = Sampler::new(1.0, Some(0.9), 1).unwrap();
        for _ in 0..50 {
            let t = s.sample(&[0.0, f32::INFINITY, 5.0, f32::INFINITY, f32::NEG_INFINITY]).unwrap();
            assert!(t == 1 || t == 3, "{t}");
        }
    }

    #[test]
    fn tiny_temperature_equals_greedy() {
        let logits = [0.3f32, 2.5, 2.4999, -7.0, 1.0];
        let mut s = Sampler::new(1e-6, None, 11).unwrap();
        let mut g = Sampler::greedy();
        for _ in 0..100 {
            assert_eq!(s.sample(&logits).unwrap(), g.sample(&logits).unwrap());
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p ∝ [1, 3]: token 1 should come out about 75% of the time.
        let logits = [0.0f32, 3f32.ln()];
        let mut s = Sampler::new(1.0, None, 5).unwrap();
        let ones = (0..20_000).filter(|_| s.sample(&logits).unwrap() == 1).count();
        let frac = ones as f64 / 20_000.0;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }
}
