//! `JobSpec::validate`: every rule a spec must meet, each error naming its field.
use super::*;

impl JobSpec {
    /// Checks every rule a spec must meet; the first error found names its field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |f: &str, m: String| Err(SpecError::new(f, m));
        if let Err(m) = bounds::check_name(&self.name) {
            return err("name", m);
        }
        self.check_bounds()?;
        if self.world_size == 0 || self.world_size > MAX_WORLD_SIZE {
            return err(
                "world_size",
                format!(
                    "must be between 1 and {MAX_WORLD_SIZE}, got {}",
                    self.world_size
                ),
            );
        }
        let t = &self.train;
        if t.batch_size == 0 {
            return err("train.batch_size", "must be greater than 0".into());
        }
        if !t.batch_size.is_multiple_of(self.world_size) {
            return err(
                "train.batch_size",
                format!(
                    "{} is not divisible by world_size {}; each rank must get the same share",
                    t.batch_size, self.world_size
                ),
            );
        }
        if self.kind == JobKind::Pretrain && t.batch_size / self.world_size < 2 {
            return err(
                "train.batch_size",
                "each rank needs at least 2 samples (batch norm)".into(),
            );
        }
        if t.epochs == 0 {
            return err("train.epochs", "must be greater than 0".into());
        }
        for (f, v) in [
            ("train.lr_weights", t.lr_weights),
            ("train.lr_biases", t.lr_biases),
            ("train.loss_scale", t.loss_scale),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return err(f, format!("must be a positive number, got {v}"));
            }
        }
        for (f, v) in [
            ("train.weight_decay", t.weight_decay),
            ("train.lambda", t.lambda),
            ("train.warmup_epochs", t.warmup_epochs),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return err(f, format!("must be zero or positive, got {v}"));
            }
        }
        if t.log_every == 0 {
            return err("train.log_every", "must be greater than 0".into());
        }
        let d = &self.data;
        if d.source != DataSource::Synthetic && d.path.trim().is_empty() {
            return err("data.path", "must name the data set directory".into());
        }
        if !(8..=1024).contains(&d.image_size) {
            return err(
                "data.image_size",
                format!("must be between 8 and 1024, got {}", d.image_size),
            );
        }
        if !(d.min_scale > 0.0 && d.min_scale <= 1.0) {
            return err(
                "data.min_scale",
                format!("must be in (0, 1], got {}", d.min_scale),
            );
        }
        if !(d.max_ratio >= 1.0 && d.max_ratio <= 10.0) {
            return err(
                "data.max_ratio",
                format!("must be in [1, 10], got {}", d.max_ratio),
            );
        }
        if !(0.0..=1.0).contains(&d.erase_p) {
            return err(
                "data.erase_p",
                format!("must be a probability in [0, 1], got {}", d.erase_p),
            );
        }
        if d.threads == 0 || d.threads > 256 {
            return err(
                "data.threads",
                format!("must be between 1 and 256, got {}", d.threads),
            );
        }
        if d.prefetch == 0 {
            return err("data.prefetch", "must be greater than 0".into());
        }
        let m = &self.model;
        if !(4..=1024).contains(&m.width) {
            return err(
                "model.width",
                format!(
                    "must be between 4 and 1024 channels (64: torchvision's ResNet), got {}",
                    m.width
                ),
            );
        }
        if !(1..=2).contains(&m.stem_stride) {
            return err(
                "model.stem_stride",
                format!("must be 1 or 2, got {}", m.stem_stride),
            );
        }
        if m.stem_stride != 1 && !m.cifar_stem {
            return err(
                "model.stem_stride",
                "applies to the CIFAR stem only: set model.cifar_stem = true (the ImageNet stem \
                 is a 7x7 stride-2 convolution and a max-pool)"
                    .into(),
            );
        }
        if m.projector.is_empty() {
            return err("model.projector", "needs at least one layer width".into());
        }
        if let Some(w) = m.projector.iter().find(|w| **w <= 0 || **w > 65536) {
            return err(
                "model.projector",
                format!("widths must be between 1 and 65536, got {w}"),
            );
        }
        if self.dist.timeout_secs == 0 {
            return err("dist.timeout_secs", "must be greater than 0".into());
        }
        let e = &self.eval;
        if e.knn_k == 0 {
            return err("eval.knn_k", "must be greater than 0".into());
        }
        if !(e.knn_temperature.is_finite() && e.knn_temperature > 0.0) {
            return err("eval.knn_temperature", "must be a positive number".into());
        }
        if (e.knn_every_epochs > 0 || e.knn_at_end) && e.bank_size < e.knn_k {
            return err(
                "eval.bank_size",
                format!(
                    "the kNN bank ({}) must hold at least k = {} images",
                    e.bank_size, e.knn_k
                ),
            );
        }
        if self.kind == JobKind::LinearProbe && self.world_size != 1 {
            return err(
                "world_size",
                "a linear probe runs on one device: world_size must be 1".into(),
            );
        }
        let min = self.elastic.min_world_size;
        if min > self.world_size {
            return err(
                "elastic.min_world_size",
                format!(
                    "must be between 1 and world_size {} (0: not elastic), got {min}",
                    self.world_size
                ),
            );
        }
        if min > 0 && min < self.world_size && self.allowed_world_sizes().len() == 1 {
            return err(
                "elastic.min_world_size",
                format!(
                    "no world size from {min} to {} divides train.batch_size {} evenly, so the \
                     job could never shrink",
                    self.world_size - 1,
                    t.batch_size
                ),
            );
        }
        if self.kind == JobKind::LinearProbe && e.checkpoint.trim().is_empty() {
            return err(
                "eval.checkpoint",
                "a linear probe needs the checkpoint to evaluate".into(),
            );
        }
        Ok(())
    }
}
