//! Batch normalisation with torchvision's parameter and buffer names, optionally synchronised
//! across ranks (SyncBatchNorm semantics: training-mode statistics over the global batch).
use tch::{nn, Kind, Tensor};

use crate::dist::{self, ProcessGroup};
use crate::Result;

use super::{each, NamedTensor, TensorRole};

/// PyTorch's defaults for `nn.BatchNorm1d/2d`.
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// How the batch norms of a forward pass run: training mode normalises with batch statistics
/// (global ones, SyncBN, when `group` is given and has more than one rank) and updates the
/// running statistics; eval mode uses the running ones.
#[derive(Debug, Clone, Copy)]
pub struct BnMode<'a> {
    pub train: bool,
    pub group: Option<&'a ProcessGroup>,
}

/// `nn.BatchNorm{1,2}d` state: `weight` (γ), `bias` (β), `running_mean`, `running_var`,
/// `num_batches_tracked`, created under the given path so VarStore keys read `bn1.weight` etc.
#[derive(Debug)]
pub struct BatchNorm {
    /// Always set by [`BatchNorm::new`]; optional for the functional batch norms it feeds
    /// (an affine-free normaliser is the loss's standardization, not a `BatchNorm`).
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
    pub eps: f64,
    pub momentum: f64,
}

impl BatchNorm {
    /// γ = `gamma_init` (1, or 0 for zero_init_residual), β = 0, running stats 0/1.
    pub fn new(p: &nn::Path, features: i64, gamma_init: f64) -> Result<Self> {
        let weight = p.f_var("weight", &[features], nn::Init::Const(gamma_init))?;
        let bias = p.f_zeros("bias", &[features])?;
        Self::with_affine(p, features, Some(weight), Some(bias))
    }

    fn with_affine(
        p: &nn::Path,
        features: i64,
        weight: Option<Tensor>,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        let running_mean = p.f_zeros_no_train("running_mean", &[features])?;
        let running_var = p.f_ones_no_train("running_var", &[features])?;
        let nbt = Tensor::f_zeros([], (Kind::Int64, p.device()))?;
        let num_batches_tracked = p.add("num_batches_tracked", nbt, false);
        Ok(BatchNorm {
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
        })
    }

    /// Normalises each view (a batch through this layer) as its own batch, as `mode` says (the
    /// ranks meet once for all the views); training mode updates the running statistics view by
    /// view.
    pub fn forward(&self, xs: &[Tensor], mode: BnMode) -> Result<Vec<Tensor>> {
        let BnMode { train, group } = mode;
        if train {
            let mut nbt = self.num_batches_tracked.shallow_clone();
            let _ = tch::no_grad(|| nbt.f_add_scalar_(xs.len() as i64))?;
        }
        match group {
            Some(g) if train && g.world_size() > 1 => dist::sync_batch_norm(
                g,
                xs,
                self.weight.as_ref(),
                self.bias.as_ref(),
                &self.running_mean,
                &self.running_var,
                self.momentum,
                self.eps,
            ),
            _ => each(xs, |x| {
                Ok(x.f_batch_norm(
                    self.weight.as_ref(),
                    self.bias.as_ref(),
                    Some(&self.running_mean),
                    Some(&self.running_var),
                    train,
                    self.momentum,
                    self.eps,
                    true,
                )?)
            }),
        }
    }

    pub(crate) fn collect(&self, prefix: &str, out: &mut Vec<NamedTensor>) {
        if let Some(w) = &self.weight {
            out.push(NamedTensor::new(prefix, "weight", w, TensorRole::Parameter));
        }
        if let Some(b) = &self.bias {
            out.push(NamedTensor::new(prefix, "bias", b, TensorRole::Parameter));
        }
        out.push(NamedTensor::new(
            prefix,
            "running_mean",
            &self.running_mean,
            TensorRole::Buffer,
        ));
        out.push(NamedTensor::new(
            prefix,
            "running_var",
            &self.running_var,
            TensorRole::Buffer,
        ));
        out.push(NamedTensor::new(
            prefix,
            "num_batches_tracked",
            &self.num_batches_tracked,
            TensorRole::Buffer,
        ));
    }
}
