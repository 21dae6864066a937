//! Models: the ResNet backbone (torchvision layout and names), the projector, and the
//! Barlow Twins model combining them, with safetensors import/export.
//!
//! Names. Tensors are reported through [`NamedTensor`] in PyTorch `state_dict` order. The full
//! model state uses `backbone.<torchvision name>` and `projector.<index>.<name>` (the official
//! code's names); [`BarlowTwinsModel::backbone_state`] uses bare torchvision names
//! (`layer1.0.conv1.weight`), so an exported backbone loads into
//! `torchvision.models.resnet18()` with `strict=False` missing only `fc.weight`/`fc.bias`.
//!
//! Inputs are always (N, 3, H, W): grayscale data is replicated to RGB by the data pipeline.
pub mod batch_norm;
pub mod projector;
pub mod resnet;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Tensor};

use crate::dist::ProcessGroup;
use crate::{Error, Result};

pub use batch_norm::{BatchNorm, BnMode};
pub use projector::Projector;
pub use resnet::ResNet;

/// Backbone architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Resnet18,
    Resnet34,
    Resnet50,
}

impl From<bt_common::spec::Backbone> for Arch {
    /// The architecture of a job spec's `model.backbone`.
    fn from(b: bt_common::spec::Backbone) -> Self {
        use bt_common::spec::Backbone;
        match b {
            Backbone::Resnet18 => Arch::Resnet18,
            Backbone::Resnet34 => Arch::Resnet34,
            Backbone::Resnet50 => Arch::Resnet50,
        }
    }
}

fn default_stem_stride() -> i64 {
    1
}

fn default_projector() -> Vec<i64> {
    vec![8192, 8192, 8192]
}
fn default_true() -> bool {
    true
}
fn default_width() -> i64 {
    STANDARD_WIDTH
}

/// torchvision's ResNet width: 64 channels in the stem and layer1.
pub const STANDARD_WIDTH: i64 = 64;

/// Model section of the job config, e.g. `{ backbone = "resnet18", cifar_stem = true,
/// projector = [2048, 2048] }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub backbone: Arch,
    /// 3×3 stride-1 first conv and no max-pool (for 32×32 images).
    #[serde(default)]
    pub cifar_stem: bool,
    /// Stride of the CIFAR stem's convolution (1, or 2 for a quarter of the FLOPs); checkpoints
    /// written before it existed have 1.
    #[serde(default = "default_stem_stride")]
    pub stem_stride: i64,
    /// Output widths of the projector's Linear layers (default 8192-8192-8192).
    #[serde(default = "default_projector")]
    pub projector: Vec<i64>,
    /// Batch statistics over the global batch (all ranks) in every BN layer when training on
    /// more than one rank. The official run does this; local statistics change the method.
    #[serde(default = "default_true")]
    pub sync_bn: bool,
    /// Start the last BN γ of every residual block at 0 (torchvision's `zero_init_residual`).
    /// A pretraining init: every residual branch starts switched off, so a network built this way
    /// and never trained is a degenerate feature extractor. Evaluation baselines use
    /// [`ModelConfig::default_init`] instead.
    #[serde(default = "default_true")]
    pub zero_init_residual: bool,
    /// Channels of the stem and layer1 (64: torchvision's layout); layer k has `width·2^(k-1)`.
    #[serde(default = "default_width")]
    pub width: i64,
}

impl ModelConfig {
    pub fn new(backbone: Arch) -> Self {
        ModelConfig {
            backbone,
            cifar_stem: false,
            stem_stride: 1,
            projector: default_projector(),
            sync_bn: true,
            zero_init_residual: true,
            width: STANDARD_WIDTH,
        }
    }

    /// The same architecture with the framework's default random initialization (torchvision's
    /// `zero_init_residual=False`): what "a random-init network" means as an evaluation baseline.
    pub fn default_init(&self) -> Self {
        ModelConfig {
            zero_init_residual: false,
            ..self.clone()
        }
    }
}

/// Whether a tensor is trained (parameter) or a buffer (BN running statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    Parameter,
    Buffer,
}

/// A model tensor (shallow clone: shares storage with the model) and its state_dict name.
#[derive(Debug)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
    pub role: TensorRole,
}

impl NamedTensor {
    pub(crate) fn new(prefix: &str, leaf: &str, t: &Tensor, role: TensorRole) -> Self {
        NamedTensor {
            name: join(prefix, leaf),
            tensor: t.shallow_clone(),
            role,
        }
    }
}

/// `f` applied to each view, in order.
pub(crate) fn each(xs: &[Tensor], f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<Vec<Tensor>> {
    xs.iter().map(f).collect()
}

pub(crate) fn relu(xs: &[Tensor]) -> Result<Vec<Tensor>> {
    each(xs, |x| Ok(x.f_relu()?))
}

pub(crate) fn join(prefix: &str, leaf: &str) -> String {
    if prefix.is_empty() {
        leaf.to_string()
    } else {
        format!("{prefix}.{leaf}")
    }
}

/// Backbone + projector. `forward` gives the embeddings the loss takes; `backbone_forward` the
/// representation used for evaluation.
pub struct BarlowTwinsModel {
    pub backbone: ResNet,
    pub projector: Projector,
    cfg: ModelConfig,
    group: Option<Arc<ProcessGroup>>,
}

impl BarlowTwinsModel {
    /// Creates the variables under `vs_root` (sub-paths `backbone` and `projector`).
    pub fn new(vs_root: &nn::Path, cfg: &ModelConfig) -> Result<Self> {
        let backbone = ResNet::new(
            &(vs_root / "backbone"),
            cfg.backbone,
            cfg.cifar_stem,
            cfg.stem_stride,
            cfg.zero_init_residual,
            cfg.width,
        )?;
        let projector =
            Projector::new(&(vs_root / "projector"), backbone.out_dim(), &cfg.projector)?;
        Ok(BarlowTwinsModel {
            backbone,
            projector,
            cfg: cfg.clone(),
            group: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The process group SyncBN uses (only when `sync_bn` is set and the group has >1 rank).
    pub fn set_group(&mut self, group: Option<Arc<ProcessGroup>>) {
        self.group = group;
    }

    /// Batch norm's mode: `train`, over the group when `sync_bn` is set.
    fn bn_mode(&self, train: bool) -> BnMode<'_> {
        let group = if self.cfg.sync_bn {
            self.group.as_deref()
        } else {
            None
        };
        BnMode { train, group }
    }

    /// Pooled representation, (N, 512) or (N, 2048). `train` selects BN's mode. The input must be a
    /// floating-point (N, 3, H, W) batch (the data pipeline replicates grayscale to 3 channels);
    /// anything else is an error that says what was expected and what came.
    pub fn backbone_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.backbone_forward_views(std::slice::from_ref(x), train)?;
        Ok(h.remove(0))
    }

    /// [`Self::backbone_forward`] of several views (batches) at once, layer by layer: each is
    /// normalized as its own batch, and with SyncBN the ranks meet once per layer for all of
    /// them.
    pub fn backbone_forward_views(&self, xs: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        for x in xs {
            let size = x.size();
            if size.len() != 4 || size[1] != 3 || size[0] == 0 || !x.is_floating_point() {
                return Err(Error::Other(format!(
                    "model input: expected a non-empty floating-point batch of shape (N, 3, H, W) \
                     (grayscale replicated to 3 channels), got {:?} {size:?}",
                    x.kind()
                )));
            }
        }
        self.backbone.forward(xs, self.bn_mode(train))
    }

    /// Projector embeddings, (N, projector.last()).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut z = self.forward_views(std::slice::from_ref(x), train)?;
        Ok(z.remove(0))
    }

    /// Projector embeddings of several views, one per view: the same values as
    /// [`Self::forward`] of each in turn (running statistics included), computed layer by layer
    /// so that SyncBN meets once per layer for all views (Barlow Twins' two augmentations).
    pub fn forward_views(&self, xs: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        let h = self.backbone_forward_views(xs, train)?;
        self.projector.forward(&h, self.bn_mode(train))
    }

    /// Every parameter and buffer, `backbone.*` then `projector.*`.
    pub fn state(&self) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        self.backbone.collect("backbone", &mut out);
        self.projector.collect("projector", &mut out);
        out
    }

    /// Trainable tensors only, in state order (the optimizer's parameter list).
    pub fn parameters(&self) -> Vec<NamedTensor> {
        self.state()
            .into_iter()
            .filter(|t| t.role == TensorRole::Parameter)
            .collect()
    }

    /// The backbone's parameters and buffers with bare torchvision names.
    pub fn backbone_state(&self) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        self.backbone.collect("", &mut out);
        out
    }

    /// Writes the backbone with torchvision key names (no `fc.*`).
    pub fn save_backbone_safetensors(&self, path: &Path) -> Result<()> {
        write_safetensors(&self.backbone_state(), path)
    }

    /// Loads torchvision-named backbone weights (e.g. converted from
    /// `torchvision.models.resnet50(weights=...).state_dict()`). `fc.*` keys are ignored; any
    /// other missing or unknown key, or a shape mismatch, is an error naming it.
    pub fn load_backbone_safetensors(&self, path: &Path) -> Result<()> {
        let src = read_safetensors(path)?;
        load_named_into(&self.backbone_state(), src, path, |k| k.starts_with("fc."))
    }

    /// Writes the full state (`backbone.*`, `projector.*`).
    pub fn save_state_safetensors(&self, path: &Path) -> Result<()> {
        write_safetensors(&self.state(), path)
    }

    /// Loads a full state written by [`Self::save_state_safetensors`] (strict).
    pub fn load_state_safetensors(&self, path: &Path) -> Result<()> {
        let src = read_safetensors(path)?;
        load_named_into(&self.state(), src, path, |_| false)
    }
}

/// Writes named tensors (moved to CPU, contiguous) as safetensors.
pub fn write_safetensors(tensors: &[NamedTensor], path: &Path) -> Result<()> {
    let cpu = tensors
        .iter()
        .map(|t| {
            let c = t
                .tensor
                .f_detach()?
                .f_to_device(Device::Cpu)?
                .f_contiguous()?;
            Ok((t.name.clone(), c))
        })
        .collect::<Result<Vec<(String, Tensor)>>>()?;
    Tensor::write_safetensors(&cpu, path).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("writing safetensors: {e}"),
    })
}

/// Reads every tensor of a safetensors file (on CPU).
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let v = Tensor::read_safetensors(path).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("reading safetensors: {e}"),
    })?;
    Ok(v.into_iter().collect())
}

/// Copies `src` into the tensors of `dst` (in place, under no_grad, converting dtype/device).
/// Every `dst` name must be present with the same shape; a `src` key not in `dst` is an error
/// unless `ignore(key)` holds. Errors name `path`, the key and both shapes.
pub fn load_named_into(
    dst: &[NamedTensor],
    mut src: HashMap<String, Tensor>,
    path: &Path,
    ignore: impl Fn(&str) -> bool,
) -> Result<()> {
    let err = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let missing: Vec<&str> = dst
        .iter()
        .filter(|t| !src.contains_key(&t.name))
        .map(|t| t.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(err(format!(
            "{} tensor(s) missing, first: {}",
            missing.len(),
            missing
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for t in dst {
        let s = &src[&t.name];
        if s.size() != t.tensor.size() {
            return Err(err(format!(
                "key {}: shape {:?} in the file, {:?} in the model",
                t.name,
                s.size(),
                t.tensor.size()
            )));
        }
    }
    let dst_names: BTreeSet<&str> = dst.iter().map(|t| t.name.as_str()).collect();
    let unexpected: Vec<String> = src
        .keys()
        .filter(|k| !dst_names.contains(k.as_str()) && !ignore(k))
        .cloned()
        .collect();
    if !unexpected.is_empty() {
        let mut u = unexpected;
        u.sort();
        return Err(err(format!(
            "{} unexpected tensor(s) (another architecture?), first: {}",
            u.len(),
            u.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    tch::no_grad(|| -> Result<()> {
        for t in dst {
            let s = src.remove(&t.name).expect("checked above");
            let mut d = t.tensor.shallow_clone();
            d.f_copy_(&s)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests;
