//! Honest baselines for every evaluation (kNN monitor, linear probe): a pretrained backbone's
//! accuracy says what pretraining bought only next to what costs no pretraining at all.
//!
//! - **Random init**: the same architecture built with the framework's *default* random
//!   initialization ([`ModelConfig::default_init`]: torchvision's `zero_init_residual=False`),
//!   never trained, evaluated exactly like the pretrained backbone (BN in eval mode). Zero-init
//!   residuals are a pretraining init only: untrained, every residual branch is switched off and
//!   the network is a degenerate feature extractor (≈23 % kNN top-1 on Fashion-MNIST where the
//!   default init gives ≈72 %), which once made a short run look like it had learned a lot.
//! - **Raw pixels**: the evaluation transform's output itself (the tensor the backbone would see),
//!   flattened, each pixel standardized with the mean and standard deviation of the bank (kNN) or
//!   of the training split (probe), put through the same kNN vote or linear probe.
//!
//! The margin is the pretrained top-1 minus the better of the two.
use tch::{nn, Device, Kind, Tensor};

use crate::model::{BarlowTwinsModel, ModelConfig};
use crate::Result;

/// Top-1 accuracies (fractions) of the two baselines of one evaluation.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Baselines {
    /// The same architecture with its default random initialization, untrained.
    pub random_init: f64,
    /// Standardized, flattened pixels.
    pub raw_pixels: f64,
}

impl Baselines {
    /// The better of the two.
    pub fn best(&self) -> f64 {
        self.random_init.max(self.raw_pixels)
    }

    /// `top1` minus the better baseline (a fraction: 0.05 is 5 points).
    pub fn margin(&self, top1: f64) -> f64 {
        top1 - self.best()
    }

    /// Writes both baselines and the margin over `e.top1` into an evaluation report.
    pub fn fill(&self, e: &mut bt_proto::EvalResult) {
        e.baseline_top1 = self.random_init;
        e.raw_pixels_top1 = self.raw_pixels;
        e.margin = self.margin(e.top1);
        e.has_baselines = true;
    }
}

/// The random-init baseline network: `cfg`'s architecture with the default initialization
/// (zero-init residuals off whatever `cfg` says), drawn from `seed`. The seed reseeds libtorch's
/// global generator; call this outside a training loop's random draws, or after them.
pub fn random_init_model(
    cfg: &ModelConfig,
    device: Device,
    seed: i64,
) -> Result<(nn::VarStore, BarlowTwinsModel)> {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(device);
    let model = BarlowTwinsModel::new(&vs.root(), &cfg.default_init())?;
    Ok((vs, model))
}

/// The raw-pixel "feature function": a normalized (N, C, H, W) evaluation batch, flattened to
/// (N, C·H·W). Standardize the result with a [`Standardizer`] fitted on the reference split.
pub fn raw_pixels(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_flatten(1, -1)?.f_to_kind(Kind::Float)?)
}

/// Per-feature standardization with a reference split's statistics: `(x − mean) / std`, the
/// standard deviation biased (over n, like batch norm). A feature that is constant on the
/// reference split (std ≤ 1e-6: for example a border pixel that is always black) carries no
/// information there and is set to 0 everywhere, instead of being blown up by a tiny divisor
/// on the rows where it is not constant.
pub struct Standardizer {
    mean: Tensor,
    inv_std: Tensor,
}

/// Below this standard deviation a feature counts as constant.
const MIN_STD: f64 = 1e-6;

impl Standardizer {
    /// Fits on `reference` ([n, d], n ≥ 1).
    pub fn fit(reference: &Tensor) -> Result<Self> {
        let x = reference.f_to_kind(Kind::Float)?;
        let mean = x.f_mean_dim(0, true, Kind::Float)?;
        let std = x.f_std_dim(0, false, true)?;
        let keep = std.f_gt(MIN_STD)?.f_to_kind(Kind::Float)?;
        let inv_std = keep.f_div(&std.f_clamp_min(MIN_STD)?)?;
        Ok(Standardizer { mean, inv_std })
    }

    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_to_kind(Kind::Float)?
            .f_sub(&self.mean)?
            .f_mul(&self.inv_std)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standardizer_uses_reference_statistics_and_drops_constant_features() {
        // Column 0 varies, column 1 is constant on the reference.
        let r = Tensor::from_slice2(&[[1f32, 5.0], [3.0, 5.0], [5.0, 5.0], [7.0, 5.0]]);
        let s = Standardizer::fit(&r).unwrap();
        let q = Tensor::from_slice2(&[[4f32, 9.0], [9.0, 5.0]]);
        let out: Vec<f32> = Vec::try_from(s.apply(&q).unwrap().flatten(0, -1)).unwrap();
        let sd = 5f32.sqrt(); // biased std of 1, 3, 5, 7
        let want = [0.0, 0.0, 5.0 / sd, 0.0];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?} vs {want:?}");
        }
        let b = Baselines {
            random_init: 0.7,
            raw_pixels: 0.8,
        };
        assert_eq!(b.best(), 0.8);
        assert!((b.margin(0.86) - 0.06).abs() < 1e-12);
    }
}
