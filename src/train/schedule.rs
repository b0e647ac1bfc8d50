//! Learning-rate schedules, as NeMo computes them (`nemo/core/optim/lr_scheduler.py`).
//!
//! The schedule's only state is the step: [`LrSchedule::lr`]`(s)` is the learning rate of the
//! optimizer step that runs after `s` completed steps (`s` = 0 for the first step). That is the
//! PyTorch/Lightning convention NeMo uses: the scheduler is built with `last_epoch = 0`, the
//! first `optimizer.step()` uses `get_lr()` at 0, and `scheduler.step()` follows every optimizer
//! step. With `M` = max_steps, `W` = warmup steps, `C` = constant steps, `lr` the peak and
//! `min` = min_lr:
//!
//! **`CosineAnnealing`, C = 0** (`WarmupAnnealHoldPolicy.get_lr` + `_get_warmup_lr` +
//! `CosineAnnealing._get_lr` / `_cosine_annealing`):
//! ```text
//! s <= W and W > 0:  lr · (s + 1) / (W + 1)
//! s > M:             min
//! otherwise:         (lr − min) · ½ (1 + cos(π (s − W) / (M − W))) + min
//! ```
//! so warmup does not start from 0 and reaches `lr` at `s = W`.
//!
//! **`CosineAnnealing`, C > 0** (Megatron's variant, `_linear_warmup_with_cosine_annealing`),
//! with `D = M − C − W` decay steps:
//! ```text
//! s <= W and W > 0:  lr · s / W                 (starts from 0)
//! s > W + D:         min                        (the C constant steps, and past M)
//! otherwise:         min + (lr − min) · ½ (cos(π (s − W) / D) + 1)
//! ```
//!
//! **`WarmupPolicy`** (`WarmupPolicy.get_lr`): the C = 0 warmup, then `lr`; `min` past `M`.
//!
//! **`Constant`**: `lr` at every step (also what no `optim.sched` means).

use super::config::{SchedName, TrainConfig};

/// A learning-rate schedule; see the module docs for the formulas.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    kind: SchedName,
    max_lr: f64,
    min_lr: f64,
    warmup: u64,
    constant: u64,
    max_steps: u64,
}

impl LrSchedule {
    /// `lr` at every step.
    pub fn constant(lr: f64) -> Self {
        LrSchedule {
            kind: SchedName::Constant,
            max_lr: lr,
            min_lr: lr,
            warmup: 0,
            constant: 0,
            max_steps: u64::MAX,
        }
    }

    /// NeMo `CosineAnnealing` with `warmup` warmup steps and `constant` steps held at `min_lr`.
    pub fn cosine(max_lr: f64, min_lr: f64, warmup: u64, constant: u64, max_steps: u64) -> Self {
        LrSchedule { kind: SchedName::CosineAnnealing, max_lr, min_lr, warmup, constant, max_steps }
    }

    /// NeMo `WarmupPolicy`: linear warmup, then `max_lr` until `max_steps`, `min_lr` after.
    pub fn warmup_policy(max_lr: f64, min_lr: f64, warmup: u64, max_steps: u64) -> Self {
        LrSchedule { kind: SchedName::WarmupPolicy, max_lr, min_lr, warmup, constant: 0, max_steps }
    }

    /// The schedule of a (validated) config: `optim.lr`, `optim.sched`, `trainer.max_steps`.
    pub fn from_config(cfg: &TrainConfig) -> Self {
        let Some(s) = &cfg.optim.sched else { return Self::constant(cfg.optim.lr) };
        let max_steps = cfg.sched_max_steps();
        let (warmup, constant) = (s.warmup(max_steps), s.constant(max_steps));
        match s.name {
            SchedName::CosineAnnealing => Self::cosine(cfg.optim.lr, s.min_lr, warmup, constant, max_steps),
            SchedName::WarmupPolicy => Self::warmup_policy(cfg.optim.lr, s.min_lr, warmup, max_steps),
            SchedName::Constant => Self::constant(cfg.optim.lr),
        }
    }

    /// The peak learning rate.
    pub fn max_lr(&self) -> f64 {
        self.max_lr
    }

    /// The learning rate of the optimizer step taken after `step` completed steps.
    pub fn lr(&self, step: u64) -> f64 {
        let (s, w, m) = (step, self.warmup, self.max_steps);
        match self.kind {
            SchedName::Constant => self.max_lr,
            SchedName::WarmupPolicy => {
                if w > 0 && s <= w {
                    self.max_lr * (s + 1) as f64 / (w + 1) as f64
                } else if s > m {
                    self.min_lr
                } else {
                    self.max_lr
                }
            }
            SchedName::CosineAnnealing if self.constant == 0 => {
                if w > 0 && s <= w {
                    self.max_lr * (s + 1) as f64 / (w + 1) as f64
                } else if s > m {
                    self.min_lr
                } else {
                    let mult = 0.5 * (1.0 + (std::f64::consts::PI * (s - w) as f64 / (m - w) as f64).cos());
                    (self.max_lr - self.min_lr) * mult + self.min_lr
                }
            }
            SchedName::CosineAnnealing => {
                let decay = m.saturating_sub(self.constant + w);
                if w > 0 && s <= w {
                    self.max_lr * s as f64 / w as f64
                } else if s > w + decay {
                    self.min_lr
                } else {
                    let ratio = (s - w) as f64 / decay as f64;
                    let coeff = 0.5 * ((std::f64::consts::PI * ratio).cos() + 1.0);
                    self.min_lr + coeff * (self.max_lr - self.min_lr)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs() + 1e-18
    }

    /// cos²(πt/2) = ½(1 + cos πt): an independent spelling of the cosine factor.
    fn cos_factor(t: f64) -> f64 {
        (std::f64::consts::FRAC_PI_2 * t).cos().powi(2)
    }

    #[test]
    fn hand_values() {
        // lr 1, warmup 4, max 10, min 0: warmup 1/5 .. 5/5, cosine over 6 steps.
        let s = LrSchedule::cosine(1.0, 0.0, 4, 0, 10);
        let want = [0.2, 0.4, 0.6, 0.8, 1.0, 0.9330127018922194, 0.75, 0.5, 0.25, 0.0669872981077807, 0.0];
        for (step, w) in want.iter().enumerate() {
            assert!((s.lr(step as u64) - w).abs() < 1e-15, "step {step}: {} vs {w}", s.lr(step as u64));
        }
        assert_eq!(s.lr(11), 0.0);
        assert_eq!(s.lr(1_000), 0.0);
    }

    #[test]
    fn cosine_matches_an_independent_formula() {
        for &(lr, min, w, m) in
            &[(2e-3, 0.0, 10, 100), (2e-3, 2e-5, 140, 4650), (1e-4, 1e-6, 0, 37), (0.5, 0.1, 3, 3)]
        {
            let s = LrSchedule::cosine(lr, min, w, 0, m);
            for step in 0..m + 5 {
                let want = if w > 0 && step <= w {
                    lr * (step + 1) as f64 / (w + 1) as f64
                } else if step > m {
                    min
                } else {
                    min + (lr - min) * cos_factor((step - w) as f64 / (m - w) as f64)
                };
                assert!(close(s.lr(step), want), "{lr} {min} {w} {m} step {step}: {} vs {want}", s.lr(step));
            }
            // Peak at the end of warmup, floor at max_steps, never above the peak, nor below the
            // floor after warmup (warmup itself starts at lr / (W + 1), which may be below it).
            assert!(close(s.lr(w), lr));
            if m > w {
                assert!((s.lr(m) - min).abs() < 1e-15);
            }
            for step in w + 1..m + 5 {
                assert!(
                    s.lr(step) <= lr * (1.0 + 1e-15) && s.lr(step) >= min * (1.0 - 1e-15),
                    "{lr} {min} {w} {m} step {step}: {}",
                    s.lr(step)
                );
            }
        }
    }

    #[test]
    fn megatron_variant_with_constant_steps() {
        // lr 1, min 0.1, warmup 4, constant 2, max 12 → decay over 6 steps (4..10), 0.1 from 11.
        let s = LrSchedule::cosine(1.0, 0.1, 4, 2, 12);
        for step in 0..16u64 {
            let want = if step <= 4 {
                step as f64 / 4.0
            } else if step > 10 {
                0.1
            } else {
                0.1 + 0.9 * cos_factor((step - 4) as f64 / 6.0)
            };
            assert!(close(s.lr(step), want), "step {step}");
        }
        assert_eq!(s.lr(0), 0.0);
        assert_eq!(s.lr(4), 1.0);
        assert!(close(s.lr(7), 0.55));
        assert!(close(s.lr(10), 0.1));
    }

    #[test]
    fn warmup_policy_and_constant() {
        let s = LrSchedule::warmup_policy(3.0, 0.5, 2, 6);
        let got: Vec<f64> = (0..9).map(|i| s.lr(i)).collect();
        assert_eq!(got, vec![1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.5, 0.5]);
        let s = LrSchedule::constant(7e-4);
        assert!((0..1000).all(|i| s.lr(i) == 7e-4));
        // No warmup: the cosine starts at the peak.
        assert_eq!(LrSchedule::cosine(1.0, 0.0, 0, 0, 4).lr(0), 1.0);
    }

    #[test]
    fn from_config() {
        let parse = |sched: &str| {
            let text = format!(
                "model: {{checkpoint: c}}\ndata: {{data_path: d}}\noptim: {{lr: 0.01{sched}}}\n\
                 trainer: {{max_steps: 20, global_batch_size: 1, micro_batch_size: 1}}\noutput: {{dir: o}}\n"
            );
            let cfg = TrainConfig::parse(&text, Path::new("t.yaml"), Path::new("."), &[]).unwrap();
            LrSchedule::from_config(&cfg)
        };
        assert_eq!(parse(""), LrSchedule::constant(0.01));
        assert_eq!(
            parse(", sched: {name: CosineAnnealing, warmup_steps: 3, min_lr: 1e-4}"),
            LrSchedule::cosine(0.01, 1e-4, 3, 0, 20)
        );
        // warmup_ratio: int(0.25 · 20) = 5; sched.max_steps overrides trainer.max_steps.
        assert_eq!(
            parse(", sched: {name: CosineAnnealing, warmup_ratio: 0.25, constant_ratio: 0.1}"),
            LrSchedule::cosine(0.01, 0.0, 5, 2, 20)
        );
        assert_eq!(
            parse(", sched: {name: CosineAnnealing, max_steps: 50, warmup_ratio: 0.1}"),
            LrSchedule::cosine(0.01, 0.0, 5, 0, 50)
        );
        assert_eq!(
            parse(", sched: {name: WarmupPolicy, warmup_steps: 4}"),
            LrSchedule::warmup_policy(0.01, 0.0, 4, 20)
        );
        assert_eq!(parse(", sched: {name: Constant}"), LrSchedule::constant(0.01));
        assert_eq!(parse(", sched: {name: constant}").max_lr(), 0.01);
    }
}
