//! Upper bounds on every numeric field of a job spec, in one place. A submitter cannot ask for
//! more than a node can hold: each bound is set from what one node of the target shape (8 GPUs of
//! 80 GiB, 2 TiB of host memory, 256 cores) can give one job, with headroom, and the combined
//! per-rank memory of the loader's buffers and the cross-correlation matrix is bounded too.
//! `btctl` and the coordinator check them through [`JobSpec::validate`](super::JobSpec::validate);
//! every error names its field. The README's "Job spec bounds" points here.
use super::{JobSpec, SpecError, MAX_WORLD_SIZE};

/// Longest job name (characters). Names are printable: no control characters (newlines, tabs,
/// escapes), since they appear in logs, metrics labels and terminals.
pub const MAX_NAME_CHARS: usize = 200;

/// Every numeric field's largest accepted value.
pub const UPPER: &[(&str, u64)] = &[
    ("world_size", MAX_WORLD_SIZE as u64),
    // Priorities are a small ordered set, both signs.
    ("priority", 1_000_000),
    ("data.limit", 1_000_000_000),
    ("data.image_size", 1024),
    ("data.threads", 256),
    ("data.prefetch", 64),
    ("model.width", 1024),
    ("model.projector (layers)", 8),
    // C is D x D floats: 16384 is 1 GiB per rank (the paper's widest run).
    ("model.projector (width)", 16_384),
    // The whole batch passes through every rank's all-gather and C: 65536 x 16384 x 4 bytes of
    // embeddings is 4 GiB.
    ("train.batch_size", 65_536),
    ("train.batch_size / world_size", 4096),
    ("train.epochs", 100_000),
    ("train.max_steps", 1_000_000_000),
    ("train.log_every", 1_000_000),
    ("train.picture_every", 1_000_000),
    ("train.torch_threads", 256),
    ("checkpoint.every_steps", 1_000_000_000),
    ("checkpoint.keep_last", 1000),
    ("checkpoint.keep_every_epochs", 100_000),
    ("restart.max_restarts", 1000),
    ("elastic.min_world_size", MAX_WORLD_SIZE as u64),
    ("dist.timeout_secs", 86_400),
    ("eval.knn_every_epochs", 100_000),
    ("eval.knn_k", 10_000),
    ("eval.bank_size", 1_000_000),
    ("eval.test_size", 1_000_000),
    ("eval.probe_epochs", 10_000),
];

/// Most memory one rank's loader may hold in prefetched batches: `prefetch` x the rank's share
/// of the batch x two views x 3 x `image_size`² bytes.
pub const MAX_LOADER_BYTES: u64 = 32 << 30;

/// The bound of `field` in [`UPPER`].
pub fn upper(field: &str) -> u64 {
    UPPER
        .iter()
        .find(|(f, _)| *f == field)
        .map(|(_, v)| *v)
        .unwrap_or(u64::MAX)
}

/// A job name's problem, if any.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("must not be empty".into());
    }
    let n = name.chars().count();
    if n > MAX_NAME_CHARS {
        return Err(format!(
            "must be at most {MAX_NAME_CHARS} characters, got {n}"
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "must be printable: control character {:?} is not allowed",
            c
        ));
    }
    Ok(())
}

impl JobSpec {
    /// Checks every field against its bound in [`UPPER`] (and the loader's memory).
    pub(super) fn check_bounds(&self) -> Result<(), SpecError> {
        let (d, m, t, c, e) = (
            &self.data,
            &self.model,
            &self.train,
            &self.checkpoint,
            &self.eval,
        );
        let values: [(&str, u64); 25] = [
            ("world_size", self.world_size.into()),
            ("priority", self.priority.unsigned_abs().into()),
            ("data.limit", d.limit),
            ("data.image_size", d.image_size.into()),
            ("data.threads", d.threads.into()),
            ("data.prefetch", d.prefetch.into()),
            ("model.width", m.width.into()),
            ("model.projector (layers)", m.projector.len() as u64),
            (
                "model.projector (width)",
                m.projector
                    .iter()
                    .map(|w| w.unsigned_abs())
                    .max()
                    .unwrap_or(0),
            ),
            ("train.batch_size", t.batch_size.into()),
            (
                "train.batch_size / world_size",
                u64::from(t.batch_size) / u64::from(self.world_size.max(1)),
            ),
            ("train.epochs", t.epochs.into()),
            ("train.max_steps", t.max_steps),
            ("train.log_every", t.log_every.into()),
            ("train.picture_every", t.picture_every.into()),
            ("train.torch_threads", t.torch_threads.into()),
            ("checkpoint.every_steps", c.every_steps),
            ("checkpoint.keep_last", c.keep_last.into()),
            ("checkpoint.keep_every_epochs", c.keep_every_epochs.into()),
            ("restart.max_restarts", self.restart.max_restarts.into()),
            ("elastic.min_world_size", self.elastic.min_world_size.into()),
            ("dist.timeout_secs", self.dist.timeout_secs.into()),
            ("eval.knn_every_epochs", e.knn_every_epochs.into()),
            ("eval.knn_k", e.knn_k.into()),
            ("eval.bank_size", e.bank_size.into()),
        ];
        let more: [(&str, u64); 2] = [
            ("eval.test_size", e.test_size.into()),
            ("eval.probe_epochs", e.probe_epochs.into()),
        ];
        for (f, v) in values.into_iter().chain(more) {
            let max = upper(f);
            if v > max {
                // "model.projector (width)" names the field `model.projector`.
                let field = f.split(' ').next().unwrap_or(f);
                let field = if f.starts_with("train.batch_size /") {
                    "train.batch_size"
                } else {
                    field
                };
                return Err(SpecError::new(
                    field,
                    format!("{f} must be at most {max}, got {v}"),
                ));
            }
        }
        let per_rank = u64::from(t.batch_size) / u64::from(self.world_size.max(1));
        let loader = u64::from(d.prefetch)
            .saturating_mul(per_rank)
            .saturating_mul(2 * 3)
            .saturating_mul(u64::from(d.image_size).pow(2));
        if loader > MAX_LOADER_BYTES {
            return Err(SpecError::new(
                "data.prefetch",
                format!(
                    "the loader would hold {:.1} GiB per rank (prefetch {} x {} images x 2 views \
                     x 3 x {}²); at most {} GiB",
                    loader as f64 / (1u64 << 30) as f64,
                    d.prefetch,
                    per_rank,
                    d.image_size,
                    MAX_LOADER_BYTES >> 30
                ),
            ));
        }
        Ok(())
    }
}
