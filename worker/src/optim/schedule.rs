//! Learning-rate schedule of the official Barlow Twins code, recomputed from the global step.
//!
//! base = global_batch / 256; steps [0, warmup) ramp linearly from 0 (lr = base·step/warmup, so
//! step 0 has lr 0 as in the official code); then cosine from base to base/1000 over the
//! remaining steps. The factor multiplies both parameter groups' learning rates.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub base: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn new(global_batch: usize, warmup_steps: u64, total_steps: u64) -> Self {
        LrSchedule {
            base: global_batch as f64 / 256.0,
            warmup_steps,
            total_steps,
        }
    }

    /// The multiplier applied at (0-based) global step `step`.
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base * step as f64 / self.warmup_steps as f64;
        }
        let s = (step - self.warmup_steps) as f64;
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let q = 0.5 * (1.0 + (std::f64::consts::PI * s.min(span) / span).cos());
        let end = self.base * 0.001;
        self.base * q + end * (1.0 - q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_shape() {
        let s = LrSchedule::new(2048, 100, 1000);
        assert_eq!(s.base, 8.0);
        assert_eq!(s.factor(0), 0.0);
        assert!((s.factor(50) - 4.0).abs() < 1e-12);
        assert!((s.factor(100) - 8.0).abs() < 1e-12);
        assert!((s.factor(550) - (8.0 + 0.008) / 2.0).abs() < 1e-12);
        assert!((s.factor(1000) - 0.008).abs() < 1e-12);
        assert!(
            (s.factor(5000) - 0.008).abs() < 1e-12,
            "clamped past the end"
        );
        let v: Vec<f64> = (100..=1000).map(|i| s.factor(i)).collect();
        assert!(
            v.windows(2).all(|w| w[1] <= w[0]),
            "cosine part is non-increasing"
        );
        let w: Vec<f64> = (0..=100).map(|i| s.factor(i)).collect();
        assert!(w.windows(2).all(|w| w[1] > w[0]), "warm-up increases");
        // No warm-up: starts at base.
        let s = LrSchedule::new(256, 0, 10);
        assert_eq!(s.factor(0), 1.0);
        assert!((s.factor(10) - 0.001).abs() < 1e-15);
    }
}
