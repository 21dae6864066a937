//! The Barlow Twins projector: `Linear(no bias)-BN-ReLU-...-Linear(no bias)`.
//!
//! Keys follow the official code's `nn.Sequential` numbering (`projector.0.weight`,
//! `projector.1.weight` (BN), `projector.3.weight`, ...; ReLUs take an index but hold nothing).
//! The final affine-free normaliser of the official code is not here: the loss standardises the
//! embeddings over the global batch itself (crate::loss).
use tch::nn::{self, Init};
use tch::Tensor;

use crate::{Error, Result};

use super::batch_norm::{BatchNorm, BnMode};
use super::{each, join, relu, NamedTensor, TensorRole};

#[derive(Debug)]
struct Stage {
    /// Index of the Linear in the Sequential.
    index: usize,
    /// Linear weight (out, in), PyTorch layout.
    weight: Tensor,
    /// BN after every Linear but the last (at index + 1; ReLU at index + 2).
    bn: Option<BatchNorm>,
}

#[derive(Debug)]
pub struct Projector {
    stages: Vec<Stage>,
    out_dim: i64,
}

impl Projector {
    /// `widths` are the output widths of the Linears (e.g. [8192, 8192, 8192]).
    /// Linear weights use PyTorch's default `nn.Linear` init (uniform ±1/√fan_in).
    pub fn new(p: &nn::Path, in_dim: i64, widths: &[i64]) -> Result<Self> {
        if widths.is_empty() || widths.iter().any(|&w| w <= 0) {
            return Err(Error::Config(format!(
                "model.projector: need at least one positive width, got {widths:?}"
            )));
        }
        let mut stages = Vec::with_capacity(widths.len());
        let mut d_in = in_dim;
        for (i, &d_out) in widths.iter().enumerate() {
            let index = 3 * i;
            let bound = 1.0 / (d_in as f64).sqrt();
            let weight = (p / index).f_var(
                "weight",
                &[d_out, d_in],
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?;
            let bn = if i + 1 < widths.len() {
                Some(BatchNorm::new(&(p / (index + 1)), d_out, 1.0)?)
            } else {
                None
            };
            stages.push(Stage { index, weight, bn });
            d_in = d_out;
        }
        Ok(Projector {
            stages,
            out_dim: d_in,
        })
    }

    pub fn out_dim(&self) -> i64 {
        self.out_dim
    }

    /// Embeddings, one per view.
    pub fn forward(&self, xs: &[Tensor], m: BnMode) -> Result<Vec<Tensor>> {
        let mut h: Vec<Tensor> = xs.iter().map(Tensor::shallow_clone).collect();
        for s in &self.stages {
            h = each(&h, |x| Ok(x.f_linear(&s.weight, None::<&Tensor>)?))?;
            if let Some(bn) = &s.bn {
                h = relu(&bn.forward(&h, m)?)?;
            }
        }
        Ok(h)
    }

    pub fn collect(&self, prefix: &str, out: &mut Vec<NamedTensor>) {
        for s in &self.stages {
            let lp = join(prefix, &s.index.to_string());
            out.push(NamedTensor::new(
                &lp,
                "weight",
                &s.weight,
                TensorRole::Parameter,
            ));
            if let Some(bn) = &s.bn {
                bn.collect(&join(prefix, &(s.index + 1).to_string()), out);
            }
        }
    }
}
