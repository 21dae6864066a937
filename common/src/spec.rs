//! The job spec: what a user submits (`btctl submit job.toml`), validated by the same code in
//! `btctl` (early, friendly) and in the coordinator (authoritative).
//!
//! Every error names the field it is about (`train.batch_size: must be greater than 0`).
pub mod bounds;
mod defaults;
mod validate;

use serde::{Deserialize, Serialize};

/// The largest world size a job may ask for. The design targets 32 GPUs; anything past this is
/// certainly a typo.
pub const MAX_WORLD_SIZE: u32 = 256;

/// The default λ (`train.lambda`), the weight of the off-diagonal term: the official code's
/// (the paper gives 5·10⁻³). The one definition; the worker's loss uses it too.
pub const DEFAULT_LAMBDA: f64 = 0.0051;

/// A spec error that names the field (dotted path) it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A closed set of spellings as an enum: each variant's TOML spelling is given once and serves
/// serde, [`as_str`](DataSource::as_str), `Display` and `FromStr`. A spelling outside the set is a
/// parse error at the field's path that lists the valid ones.
macro_rules! closed_set {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $spelling:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $spelling)] $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling in a job spec.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $spelling, )+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let all: Vec<&str> = $name::ALL.iter().map(|v| v.as_str()).collect();
                        format!("unknown value {s:?}, expected one of {}", all.join(", "))
                    })
            }
        }
    };
}

closed_set! {
    /// `data.source`: where the images come from.
    pub enum DataSource {
        /// Fashion-MNIST IDX files.
        FashionMnist = "fashion-mnist",
        /// MNIST IDX files (read like Fashion-MNIST's).
        Mnist = "mnist",
        /// An ImageFolder tree (`train/` and `val/`, or one folder of class folders).
        ImageFolder = "image-folder",
        /// Generated images (tests and benchmarks).
        Synthetic = "synthetic",
    }
}

closed_set! {
    /// `model.backbone`: the ResNet.
    pub enum Backbone {
        Resnet18 = "resnet18",
        Resnet34 = "resnet34",
        Resnet50 = "resnet50",
    }
}

closed_set! {
    /// `train.loss_form`: how the loss's off-diagonal sum is computed.
    pub enum LossForm {
        /// Gram when the global batch is smaller than the embedding, else cross.
        Auto = "auto",
        /// Through the D × D cross-correlation matrix.
        Cross = "cross",
        /// Through the two N × N Gram matrices.
        Gram = "gram",
    }
}

closed_set! {
    /// `train.precision`: numeric precision of forward and backward.
    pub enum Precision {
        /// bf16 autocast on CUDA, fp32 on CPU.
        Auto = "auto",
        Fp32 = "fp32",
        /// bf16 autocast on any device (on CPU only for checks: it is slower there).
        Bf16 = "bf16",
    }
}

closed_set! {
    /// `train.memory_format`: memory format of images and convolution weights.
    pub enum MemoryFormat {
        /// Channels-last on CUDA, contiguous on CPU.
        Auto = "auto",
        Contiguous = "contiguous",
        ChannelsLast = "channels-last",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Barlow Twins pretraining.
    #[default]
    Pretrain,
    /// Linear probe on a frozen checkpoint.
    LinearProbe,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(default = "defaults::name")]
    pub name: String,
    #[serde(default)]
    pub kind: JobKind,
    /// Number of trainer ranks (devices); the job starts only when all can be placed.
    #[serde(default = "defaults::one")]
    pub world_size: u32,
    /// Higher runs first; FIFO within a priority.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub data: DataSpec,
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub restart: RestartSpec,
    #[serde(default)]
    pub elastic: ElasticSpec,
    #[serde(default)]
    pub dist: DistSpec,
    #[serde(default)]
    pub eval: EvalSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// "fashion-mnist", "mnist", "image-folder" or "synthetic".
    #[serde(default = "defaults::source")]
    pub source: DataSource,
    /// Directory of the data set (IDX files, or an ImageFolder tree).
    #[serde(default = "defaults::data_path")]
    pub path: String,
    /// Use only the first N training images (0: all).
    #[serde(default)]
    pub limit: u64,
    /// Side of the random resized crop.
    #[serde(default = "defaults::image_size")]
    pub image_size: u32,
    /// Smallest crop scale of the random resized crop (paper: 0.08).
    #[serde(default = "defaults::min_scale")]
    pub min_scale: f64,
    /// Largest aspect-ratio change of the random resized crop: ratios in [1/r, r] (paper: 4/3;
    /// 1 keeps the image's shape, which helps on centred, size-normalized data like
    /// Fashion-MNIST: docs/QUALITY.md).
    #[serde(default = "defaults::max_ratio")]
    pub max_ratio: f64,
    /// Random erasing: the probability that a view gets one rectangle (2-25 % of its area, aspect
    /// ratio 0.3-3.3) filled with a random grey level (0: off, the paper's recipe).
    #[serde(default)]
    pub erase_p: f64,
    /// Gaussian blur (off by default for small images, as usual for 32×32 data).
    #[serde(default)]
    pub blur: bool,
    /// CPU threads decoding and cropping.
    #[serde(default = "defaults::threads")]
    pub threads: u32,
    /// Batches prepared ahead.
    #[serde(default = "defaults::prefetch")]
    pub prefetch: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// "resnet18", "resnet34" or "resnet50".
    #[serde(default = "defaults::backbone")]
    pub backbone: Backbone,
    /// 3×3 stride-1 first convolution and no max-pool (for small images).
    #[serde(default = "defaults::yes")]
    pub cifar_stem: bool,
    /// Stride of the CIFAR stem's 3×3 convolution: 1 (the layers see 28, 14, 7, 4 on 28×28
    /// images) or 2 (14, 7, 4, 2: about a quarter of the backbone's FLOPs, the budget a wider
    /// network can spend). Needs `cifar_stem`.
    #[serde(default = "defaults::one")]
    pub stem_stride: u32,
    /// Widths of the projector's linear layers.
    #[serde(default = "defaults::projector")]
    pub projector: Vec<i64>,
    /// Batch-norm statistics over the global batch (all ranks).
    #[serde(default = "defaults::yes")]
    pub sync_bn: bool,
    /// Channels of the ResNet's stem and layer1 (64: torchvision's layout); layer k has
    /// `width · 2^(k-1)` and the representation `8 · width` (ResNet-50: `32 · width`) features.
    /// Compute and parameters scale with about (width / 64)².
    #[serde(default = "defaults::width")]
    pub width: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Global batch size (split evenly over the ranks).
    #[serde(default = "defaults::batch_size")]
    pub batch_size: u32,
    #[serde(default = "defaults::one")]
    pub epochs: u32,
    /// Stop after this many steps (0: run all epochs).
    #[serde(default)]
    pub max_steps: u64,
    #[serde(default = "defaults::lr_weights")]
    pub lr_weights: f64,
    #[serde(default = "defaults::lr_biases")]
    pub lr_biases: f64,
    #[serde(default = "defaults::weight_decay")]
    pub weight_decay: f64,
    /// λ, the weight of the off-diagonal term.
    #[serde(default = "defaults::lambda")]
    pub lambda: f64,
    #[serde(default = "defaults::warmup_epochs")]
    pub warmup_epochs: f64,
    /// Multiplies the gradient before the optimizer (1/32 reproduces the official 32-GPU step).
    #[serde(default = "defaults::one_f")]
    pub loss_scale: f64,
    #[serde(default)]
    pub seed: u64,
    /// Report metrics every k steps.
    #[serde(default = "defaults::log_every")]
    pub log_every: u32,
    /// Send the downsampled |C| picture every k steps (at the first logged step from there;
    /// 0: never). The dashboard draws it; `btctl tensorboard` writes it as an image.
    #[serde(default = "defaults::picture_every")]
    pub picture_every: u32,
    /// "auto", "cross" or "gram".
    #[serde(default = "defaults::loss_form")]
    pub loss_form: LossForm,
    /// Intra-op threads per trainer (0: libtorch's default).
    #[serde(default = "defaults::one")]
    pub torch_threads: u32,
    /// Numeric precision of forward and backward: "auto" (bf16 autocast on CUDA, fp32 on CPU),
    /// "fp32", or "bf16" (autocast on any device; on CPU only for checks, it is slower there).
    /// The loss and the optimizer always run in fp32 on fp32 master weights.
    #[serde(default = "defaults::precision")]
    pub precision: Precision,
    /// Memory format of images and convolution weights: "auto" (channels-last on CUDA,
    /// contiguous on CPU), "contiguous" or "channels-last".
    #[serde(default = "defaults::memory_format")]
    pub memory_format: MemoryFormat,
    /// CPU trainers only: pin rank r's trainer (all its threads: compute, data, collectives) to
    /// `torch_threads` cores of its own, r·t … r·t+t−1 among the cores the process may use
    /// (wrapping around). For a job that has a machine's cores to itself, as the demo's two ranks
    /// on one host: Gloo's per-layer SyncBN round trips then stop migrating between cores.
    #[serde(default)]
    pub pin_cpus: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Write a checkpoint every N steps (0: only at the end).
    #[serde(default)]
    pub every_steps: u64,
    /// Keep the last N checkpoints (0: keep all).
    #[serde(default = "defaults::keep_last")]
    pub keep_last: u32,
    /// Also keep one checkpoint every K epochs (0: none).
    #[serde(default)]
    pub keep_every_epochs: u32,
    /// Evaluate every committed checkpoint with a linear probe: a job of its own
    /// (`kind = "linear_probe"`, one device), scheduled on free devices like any job, so the
    /// pretraining job is never stopped. Retention keeps a checkpoint until its probe has ended.
    #[serde(default)]
    pub auto_eval: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSpec {
    /// Attempts that may be restarted after an infrastructure failure (lost worker, crashed trainer).
    #[serde(default = "defaults::max_restarts")]
    pub max_restarts: u32,
}

/// Restarts on fewer ranks: see [`JobSpec::allowed_world_sizes`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElasticSpec {
    /// The fewest ranks a restart may run on when `world_size` cannot be placed (0: not elastic).
    #[serde(default)]
    pub min_world_size: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistSpec {
    /// Collective and rendezvous timeout.
    #[serde(default = "defaults::timeout_secs")]
    pub timeout_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Run the kNN monitor every N epochs (0: only at the end when `knn_at_end`).
    #[serde(default)]
    pub knn_every_epochs: u32,
    #[serde(default = "defaults::yes")]
    pub knn_at_end: bool,
    #[serde(default = "defaults::knn_k")]
    pub knn_k: u32,
    #[serde(default = "defaults::knn_temperature")]
    pub knn_temperature: f64,
    /// Standardize every feature with the bank's per-dimension mean and standard deviation before
    /// the kNN's cosine vote (the pretrained backbone and the random-init baseline; the raw-pixel
    /// baseline is standardized either way, as the linear probe standardizes all three). `false`:
    /// the plain protocol of published kNN monitors (L2-normalized features only).
    #[serde(default = "defaults::yes")]
    pub knn_standardize: bool,
    /// Labelled training images embedded as the kNN bank.
    #[serde(default = "defaults::bank_size")]
    pub bank_size: u32,
    /// Held-out images classified.
    #[serde(default = "defaults::test_size")]
    pub test_size: u32,
    /// Report the same evaluation of a randomly initialised backbone next to it.
    #[serde(default = "defaults::yes")]
    pub baseline: bool,
    /// For `kind = "linear_probe"`: the checkpoint directory to evaluate.
    #[serde(default)]
    pub checkpoint: String,
    /// Linear-probe epochs.
    #[serde(default = "defaults::probe_epochs")]
    pub probe_epochs: u32,
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                toml::from_str("").expect("all fields have defaults")
            }
        }
    )*};
}
default_from_serde!(
    JobSpec,
    DataSpec,
    ModelSpec,
    TrainSpec,
    CheckpointSpec,
    RestartSpec,
    DistSpec,
    EvalSpec
);

impl JobSpec {
    /// Parses and validates TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, SpecError> {
        Self::from_toml_with_overrides(text, &[])
    }

    /// Parses TOML text, applies `key=value` overrides (dotted keys, TOML values; bare words are
    /// strings), then validates.
    pub fn from_toml_with_overrides(text: &str, overrides: &[String]) -> Result<Self, SpecError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            SpecError::new("spec", format!("not valid TOML: {}", e.message()))
        })?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let spec: JobSpec =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let path = e.path().to_string();
                let field = if path == "." || path.is_empty() {
                    "spec".to_string()
                } else {
                    path
                };
                SpecError::new(field, e.into_inner().to_string().trim().to_string())
            })?;
        spec.validate()?;
        Ok(spec)
    }

    /// The spec of a linear-probe job for `checkpoint`, written by this pretraining job: the same
    /// data set and evaluation settings, one device.
    pub fn probe_for(&self, checkpoint: &str) -> JobSpec {
        let mut p = JobSpec {
            name: format!("{}-probe", self.name),
            kind: JobKind::LinearProbe,
            world_size: 1,
            priority: self.priority,
            data: self.data.clone(),
            eval: self.eval.clone(),
            ..JobSpec::default()
        };
        p.eval.checkpoint = checkpoint.to_string();
        p.train.seed = self.train.seed;
        p.train.torch_threads = self.train.torch_threads;
        p.restart.max_restarts = 0;
        p
    }

    /// The paths on the workers' disks this job reads, by field: what the coordinator and the
    /// daemons confine to their allowed roots.
    pub fn read_paths(&self) -> Vec<(&'static str, &str)> {
        let mut v = Vec::new();
        if self.data.source != DataSource::Synthetic {
            v.push(("data.path", self.data.path.as_str()));
        }
        if self.kind == JobKind::LinearProbe {
            v.push(("eval.checkpoint", self.eval.checkpoint.as_str()));
        }
        v
    }

    /// The canonical TOML text of this spec (every field explicit).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a job spec always serializes")
    }

    /// The batch each rank processes per step.
    pub fn per_rank_batch(&self) -> u32 {
        self.train.batch_size / self.world_size.max(1)
    }

    /// The world sizes the job may run at, largest first: `world_size`, then, when elastic, every
    /// smaller size down to `elastic.min_world_size` that splits the global batch evenly (and, for
    /// pretraining, into at least 2 samples per rank for batch norm). The global batch, hence the
    /// results, are the same at each: only the per-rank batch (global / W) changes.
    pub fn allowed_world_sizes(&self) -> Vec<u32> {
        let (w, b) = (self.world_size, self.train.batch_size);
        // 0 (not elastic) is `w` itself.
        let min = match self.elastic.min_world_size {
            0 => w,
            m => m.clamp(1, w.max(1)),
        };
        let mut sizes = vec![w];
        sizes.extend(
            (min..w)
                .rev()
                .filter(|n| b.is_multiple_of(*n) && (self.kind != JobKind::Pretrain || b / n >= 2)),
        );
        sizes
    }
}

/// Applies one `a.b.c=value` override to a TOML table.
fn apply_override(table: &mut toml::Table, kv: &str) -> Result<(), SpecError> {
    let (key, raw) = kv
        .split_once('=')
        .ok_or_else(|| SpecError::new(kv, "an override must look like key=value"))?;
    let key = key.trim();
    let raw = raw.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(SpecError::new(
            kv,
            "an override needs a dotted key, like train.batch_size=64",
        ));
    }
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for (i, p) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| {
            SpecError::new(
                parts[..=i].join("."),
                "is not a table, so it has no sub-keys",
            )
        })?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests;
