//! The two-view training loader.
//!
//! Data order (../shared/design/BARLOW_TWINS.md): each epoch is a permutation of the source seeded
//! by (seed, epoch); global step s of epoch e covers permutation positions
//! `[(s mod spe)·W·b, (s mod spe + 1)·W·b)` and rank r takes the r-th slice of b positions, so the
//! union over ranks of one step is exactly the global batch whatever W is. All per-sample randomness
//! (crop, flip, colour, blur, solarize) comes from an RNG seeded by (seed, epoch, position), so the
//! batches do not depend on the world size, the thread count or where a run was resumed.
//!
//! A source item that fails to decode is skipped with a warning: its slot takes the item at the
//! next permutation position (still augmented with the slot's own RNG), and the batch's `skipped`
//! counts it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::augment::{apply_erase, sample_view, AugmentConfig, View, ViewSample};
use super::colour_cpu::{colour_view, ColourScratch};
use super::colour_device::device_stage;
use super::resample::{resample_chw, Filter};
use super::source::{mix64, Source};
use crate::error::{Error, Result};

/// Consecutive unreadable items after which a batch fails instead of skipping further.
pub const MAX_CONSECUTIVE_SKIPS: u64 = 64;

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
fn default_prefetch() -> usize {
    2
}
fn default_true() -> bool {
    true
}

/// Loader settings of one rank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderConfig {
    /// b: images per rank per step; the global batch is `world_size · per_rank_batch`.
    pub per_rank_batch: usize,
    pub rank: usize,
    pub world_size: usize,
    pub seed: u64,
    /// CPU threads decoding and cropping (0 = all cores).
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Batches prepared ahead of the consumer (channel capacity, at least 1).
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    #[serde(default)]
    pub augment: AugmentConfig,
    /// Only `true` is supported: the last partial global batch of each epoch is dropped.
    #[serde(default = "default_true")]
    pub drop_last: bool,
    /// Run the colour stage (jitter, grayscale, blur, solarize, normalize) on the loader's threads,
    /// fused per image ([`colour_cpu`](super::colour_cpu)), so batches arrive as finished f32
    /// views. For training on the CPU; on a GPU the batched device stage is faster.
    #[serde(default)]
    pub colour_on_cpu: bool,
}

impl LoaderConfig {
    /// A single-rank configuration with default threads/prefetch.
    pub fn new(per_rank_batch: usize, seed: u64, augment: AugmentConfig) -> Self {
        LoaderConfig {
            per_rank_batch,
            rank: 0,
            world_size: 1,
            seed,
            threads: default_threads(),
            prefetch: default_prefetch(),
            augment,
            drop_last: true,
            colour_on_cpu: false,
        }
    }
}

/// The pure data order: which source index goes where, for any step.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub len: usize,
    pub per_rank_batch: usize,
    pub rank: usize,
    pub world_size: usize,
    pub seed: u64,
}

impl Schedule {
    pub fn global_batch(&self) -> usize {
        self.per_rank_batch * self.world_size
    }

    /// Full global batches per epoch (the remainder is dropped).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.len / self.global_batch()) as u64
    }

    pub fn epoch_of(&self, step: u64) -> u64 {
        step / self.steps_per_epoch()
    }

    /// The permutation of epoch `epoch` (Fisher–Yates from a seed derived from (seed, epoch)).
    pub fn permutation(&self, epoch: u64) -> Vec<u32> {
        let mut p: Vec<u32> = (0..self.len as u32).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix64(mix64(self.seed) ^ epoch));
        p.shuffle(&mut rng);
        p
    }

    /// First permutation position of this rank's slice at `step`.
    pub fn first_position(&self, step: u64) -> usize {
        let in_epoch = (step % self.steps_per_epoch()) as usize;
        in_epoch * self.global_batch() + self.rank * self.per_rank_batch
    }

    /// Seed of the per-sample RNG at permutation position `pos` of `epoch`.
    pub fn sample_seed(&self, epoch: u64, pos: usize) -> u64 {
        mix64(mix64(mix64(self.seed ^ 0x5eed) ^ epoch) ^ pos as u64)
    }
}

/// One rank's share of one training step: two augmented views, as u8 after the CPU stage (or
/// finished f32 views when the loader runs the colour stage itself).
pub struct TwoViewBatch {
    pub step: u64,
    pub epoch: u64,
    /// View A on the CPU: u8 [b, 3, S, S] with crop, resize and flip applied; with
    /// `colour_on_cpu`, the finished normalized f32 [b, 3, S, S].
    pub a: Tensor,
    /// View B, like `a`.
    pub b: Tensor,
    /// Per-sample parameters of the device stage (and the crop/flip already applied).
    pub params_a: Vec<ViewSample>,
    pub params_b: Vec<ViewSample>,
    /// Class labels, i64 [b], when the source has labels (not used by training).
    pub labels: Option<Tensor>,
    /// Source indices of the samples.
    pub indices: Vec<usize>,
    /// Unreadable items skipped while filling this batch.
    pub skipped: u64,
    augment: Arc<AugmentConfig>,
}

impl TwoViewBatch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Both views on `device` after the batched device stage (colour jitter, grayscale, blur,
    /// solarize) and normalization: f32 [b, 3, S, S]. Views the loader already finished
    /// (`colour_on_cpu`) are only moved.
    pub fn views(&self, device: Device) -> Result<(Tensor, Tensor)> {
        let a = self.a.f_to_device(device)?;
        let b = self.b.f_to_device(device)?;
        if self.a.kind() == Kind::Float {
            return Ok((a, b));
        }
        Ok((
            device_stage(&self.augment, &a, &self.params_a)?,
            device_stage(&self.augment, &b, &self.params_b)?,
        ))
    }
}

struct Shared {
    source: Arc<dyn Source>,
    schedule: Schedule,
    augment: Arc<AugmentConfig>,
    colour_on_cpu: bool,
}

struct SampleMeta {
    index: usize,
    label: Option<i64>,
    va: ViewSample,
    vb: ViewSample,
    skipped: u64,
}

impl Shared {
    /// Decodes and crops the sample at permutation position `pos` into `out_a`/`out_b`.
    fn sample(
        &self,
        perm: &[u32],
        epoch: u64,
        pos: usize,
        out_a: &mut [u8],
        out_b: &mut [u8],
    ) -> Result<SampleMeta> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.schedule.sample_seed(epoch, pos));
        let mut skipped = 0;
        let (index, img) = loop {
            let index = perm[(pos + skipped as usize) % perm.len()] as usize;
            match self.source.get(index) {
                Ok(img) => break (index, img),
                Err(e) => {
                    tracing::warn!(index, epoch, error = %e, "skipping unreadable image");
                    skipped += 1;
                    if skipped >= MAX_CONSECUTIVE_SKIPS {
                        return Err(Error::Other(format!(
                            "{skipped} consecutive unreadable images in {} (last: {e}); \
                             check the dataset",
                            self.source.describe()
                        )));
                    }
                }
            }
        };
        let s = self.augment.crop_size;
        let va = sample_view(&self.augment, View::A, img.height, img.width, &mut rng);
        let vb = sample_view(&self.augment, View::B, img.height, img.width, &mut rng);
        resample_chw(&img, va.crop, s, s, va.flip, Filter::Bicubic, out_a);
        resample_chw(&img, vb.crop, s, s, vb.flip, Filter::Bicubic, out_b);
        apply_erase(&va, s, out_a);
        apply_erase(&vb, s, out_b);
        Ok(SampleMeta {
            index,
            label: self.source.label(index),
            va,
            vb,
            skipped,
        })
    }

    fn batch(&self, step: u64, perm: &[u32], pool: &rayon::ThreadPool) -> Result<TwoViewBatch> {
        let b = self.schedule.per_rank_batch;
        let s = self.augment.crop_size;
        let per = 3 * s * s;
        let epoch = self.schedule.epoch_of(step);
        let first = self.schedule.first_position(step);
        let mut buf_a = vec![0u8; b * per];
        let mut buf_b = vec![0u8; b * per];
        let metas: Vec<SampleMeta> = pool.install(|| {
            buf_a
                .par_chunks_mut(per)
                .zip(buf_b.par_chunks_mut(per))
                .enumerate()
                .map(|(k, (ca, cb))| self.sample(perm, epoch, first + k, ca, cb))
                .collect::<Result<Vec<_>>>()
        })?;
        let shape = [b as i64, 3, s as i64, s as i64];
        let (a, b_view) = if self.colour_on_cpu {
            let finish = |src: &[u8], params: &[ViewSample]| -> Tensor {
                let mut out = vec![0f32; src.len()];
                pool.install(|| {
                    out.par_chunks_mut(per)
                        .zip(src.par_chunks(per))
                        .zip(params)
                        .for_each_init(ColourScratch::default, |scratch, ((o, i), p)| {
                            colour_view(&self.augment, p, i, s, o, scratch)
                        })
                });
                Tensor::from_slice(&out).view(shape)
            };
            let pa: Vec<ViewSample> = metas.iter().map(|m| m.va).collect();
            let pb: Vec<ViewSample> = metas.iter().map(|m| m.vb).collect();
            (finish(&buf_a, &pa), finish(&buf_b, &pb))
        } else {
            (
                Tensor::from_slice(&buf_a).view(shape),
                Tensor::from_slice(&buf_b).view(shape),
            )
        };
        let labels = if self.source.num_classes().is_some() {
            metas
                .iter()
                .map(|m| m.label)
                .collect::<Option<Vec<i64>>>()
                .map(|l| Tensor::from_slice(&l))
        } else {
            None
        };
        Ok(TwoViewBatch {
            step,
            epoch,
            a,
            b: b_view,
            params_a: metas.iter().map(|m| m.va).collect(),
            params_b: metas.iter().map(|m| m.vb).collect(),
            labels,
            indices: metas.iter().map(|m| m.index).collect(),
            skipped: metas.iter().map(|m| m.skipped).sum(),
            augment: self.augment.clone(),
        })
    }
}

/// Streams [`TwoViewBatch`]es of one rank, in step order from `start_step` on (across epochs,
/// without end), prepared by a pool of CPU threads at most `prefetch` batches ahead.
pub struct Loader {
    rx: Option<Receiver<Result<TwoViewBatch>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    schedule: Schedule,
    next_step: u64,
}

impl Loader {
    pub fn new(source: Arc<dyn Source>, cfg: LoaderConfig, start_step: u64) -> Result<Self> {
        cfg.augment.validate()?;
        let bad = |m: String| Err(Error::Config(format!("loader.{m}")));
        if cfg.per_rank_batch == 0 {
            return bad("per_rank_batch must be positive".into());
        }
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return bad(format!(
                "rank {} outside world of size {}",
                cfg.rank, cfg.world_size
            ));
        }
        if !cfg.drop_last {
            return bad(
                "drop_last: only true is supported (every step needs a full global batch)".into(),
            );
        }
        let schedule = Schedule {
            len: source.len(),
            per_rank_batch: cfg.per_rank_batch,
            rank: cfg.rank,
            world_size: cfg.world_size,
            seed: cfg.seed,
        };
        if schedule.steps_per_epoch() == 0 {
            return bad(format!(
                "per_rank_batch: the global batch of {} is larger than the {} images of {}",
                schedule.global_batch(),
                source.len(),
                source.describe()
            ));
        }
        let threads = if cfg.threads == 0 {
            default_threads()
        } else {
            cfg.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("bt-data-{i}"))
            .build()
            .map_err(|e| Error::Other(format!("cannot start loader threads: {e}")))?;
        let (tx, rx) = bounded(cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Shared {
            source,
            schedule: schedule.clone(),
            augment: Arc::new(cfg.augment),
            colour_on_cpu: cfg.colour_on_cpu,
        };
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("bt-loader".into())
            .spawn(move || {
                let mut perm: Option<(u64, Vec<u32>)> = None;
                let mut step = start_step;
                while !stop2.load(Ordering::Relaxed) {
                    let epoch = shared.schedule.epoch_of(step);
                    if perm.as_ref().map(|(e, _)| *e) != Some(epoch) {
                        perm = Some((epoch, shared.schedule.permutation(epoch)));
                    }
                    let p = &perm.as_ref().expect("permutation set above").1;
                    let batch = shared.batch(step, p, &pool);
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                    step += 1;
                }
            })
            .map_err(|e| Error::Other(format!("cannot start loader thread: {e}")))?;
        Ok(Loader {
            rx: Some(rx),
            handle: Some(handle),
            stop,
            schedule,
            next_step: start_step,
        })
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.schedule.steps_per_epoch()
    }

    /// The step of the batch that [`Loader::next_batch`] returns next.
    pub fn next_step(&self) -> u64 {
        self.next_step
    }

    /// The next batch, blocking until it is ready.
    pub fn next_batch(&mut self) -> Result<TwoViewBatch> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| Error::Other("loader stopped".into()))?;
        match rx.recv() {
            Ok(batch) => {
                let batch = batch?;
                self.next_step = batch.step + 1;
                Ok(batch)
            }
            Err(_) => Err(Error::Other(
                "loader thread stopped (after an earlier error or a panic)".into(),
            )),
        }
    }
}

impl Iterator for Loader {
    type Item = Result<TwoViewBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.next_batch())
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a producer waiting on a full channel.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::tests::fixture_dir;
    use crate::data::source::{IdxSource, ImageFolderSource, Split, SyntheticSource};

    fn fashion() -> Arc<dyn Source> {
        Arc::new(IdxSource::open_dir(&fixture_dir(), Split::Train).unwrap())
    }

    fn cfg(b: usize, rank: usize, w: usize, threads: usize) -> LoaderConfig {
        LoaderConfig {
            per_rank_batch: b,
            rank,
            world_size: w,
            seed: 42,
            threads,
            prefetch: 2,
            augment: AugmentConfig::small(32),
            drop_last: true,
            colour_on_cpu: false,
        }
    }

    fn take(src: &Arc<dyn Source>, c: LoaderConfig, start: u64, n: usize) -> Vec<TwoViewBatch> {
        let mut l = Loader::new(src.clone(), c, start).unwrap();
        (0..n).map(|_| l.next_batch().unwrap()).collect()
    }

    fn same(x: &TwoViewBatch, y: &TwoViewBatch) {
        assert_eq!(x.step, y.step);
        assert_eq!(x.indices, y.indices);
        assert_eq!(x.params_a, y.params_a);
        assert_eq!(x.params_b, y.params_b);
        assert!(x.a.equal(&y.a) && x.b.equal(&y.b));
    }

    #[test]
    fn batches_have_expected_shapes_and_labels() {
        let src = fashion();
        let mut l = Loader::new(src.clone(), cfg(16, 0, 1, 2), 0).unwrap();
        assert_eq!(l.steps_per_epoch(), 32);
        let b = l.next_batch().unwrap();
        assert_eq!(b.a.size(), vec![16, 3, 32, 32]);
        assert_eq!(b.a.kind(), tch::Kind::Uint8);
        assert_eq!(b.len(), 16);
        assert_eq!(b.skipped, 0);
        let labels: Vec<i64> = Vec::try_from(b.labels.as_ref().unwrap()).unwrap();
        let want: Vec<i64> = b.indices.iter().map(|&i| src.label(i).unwrap()).collect();
        assert_eq!(labels, want);
        let (va, vb) = b.views(Device::Cpu).unwrap();
        assert_eq!(va.size(), vec![16, 3, 32, 32]);
        assert_eq!(va.kind(), tch::Kind::Float);
        // Two views differ, and the normalized values lie in the normalized [0,1] range.
        assert!(!va.equal(&vb));
        let max = f64::try_from(va.max()).unwrap();
        assert!(max <= (1.0 - 0.406) / 0.225 + 1e-4, "{max}");
        assert_eq!(l.next_batch().unwrap().step, 1);
    }

    #[test]
    fn same_seed_same_batches_regardless_of_threads() {
        let src = fashion();
        let one = take(&src, cfg(8, 0, 1, 1), 0, 3);
        let three = take(&src, cfg(8, 0, 1, 3), 0, 3);
        for (x, y) in one.iter().zip(&three) {
            same(x, y);
        }
        let other = take(
            &src,
            LoaderConfig {
                seed: 7,
                ..cfg(8, 0, 1, 1)
            },
            0,
            1,
        );
        assert_ne!(other[0].indices, one[0].indices);
        // Each epoch is a permutation: the first epoch visits distinct indices.
        let epoch = take(&src, cfg(64, 0, 1, 2), 0, 8);
        let mut seen: Vec<usize> = epoch.iter().flat_map(|b| b.indices.clone()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 512);
    }

    #[test]
    fn ranks_partition_the_global_batch() {
        let src = fashion();
        let global = take(&src, cfg(8, 0, 1, 2), 0, 2);
        let r0 = take(&src, cfg(4, 0, 2, 1), 0, 2);
        let r1 = take(&src, cfg(4, 1, 2, 2), 0, 2);
        for s in 0..2 {
            let idx: Vec<usize> = r0[s]
                .indices
                .iter()
                .chain(&r1[s].indices)
                .copied()
                .collect();
            assert_eq!(idx, global[s].indices);
            let a = Tensor::cat(&[&r0[s].a, &r1[s].a], 0);
            let b = Tensor::cat(&[&r0[s].b, &r1[s].b], 0);
            assert!(a.equal(&global[s].a) && b.equal(&global[s].b));
            let pa: Vec<_> = r0[s]
                .params_a
                .iter()
                .chain(&r1[s].params_a)
                .copied()
                .collect();
            assert_eq!(pa, global[s].params_a);
        }
    }

    #[test]
    fn resume_matches_uninterrupted_run_across_epochs() {
        let src = fashion();
        // 512 images / 128 per step = 4 steps per epoch; steps 0..7 cross an epoch boundary.
        let full = take(&src, cfg(128, 0, 1, 2), 0, 7);
        let resumed = take(&src, cfg(128, 0, 1, 2), 3, 4);
        for (x, y) in full[3..].iter().zip(&resumed) {
            same(x, y);
        }
        assert_eq!(full[4].epoch, 1);
        assert_ne!(full[0].indices, full[4].indices);
    }

    #[test]
    fn corrupt_images_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        for c in ["a", "b"] {
            std::fs::create_dir(dir.path().join(c)).unwrap();
            for k in 0..4 {
                image::RgbImage::from_fn(20, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 9, k]))
                    .save(dir.path().join(c).join(format!("{k}.png")))
                    .unwrap();
            }
        }
        std::fs::write(dir.path().join("a/bad.jpg"), b"\xff\xd8garbage").unwrap();
        let src: Arc<dyn Source> = Arc::new(ImageFolderSource::open(dir.path()).unwrap());
        assert_eq!(src.len(), 9);
        // One step covers 9 of 9 positions; the garbage file is replaced, so exactly one skip and
        // a full batch without the bad item.
        let mut c = cfg(9, 0, 1, 2);
        c.augment = AugmentConfig::small(12);
        let b = take(&src, c, 0, 1).pop().unwrap();
        assert_eq!(b.skipped, 1);
        assert_eq!(b.len(), 9);
        assert_eq!(b.a.size(), vec![9, 3, 12, 12]);
        assert!(!b.indices.contains(&4), "{:?}", b.indices); // bad.jpg sorts as item 4
                                                             // Over several batches of a synthetic source failing every 4th item, the count matches.
        let syn: Arc<dyn Source> = Arc::new(
            SyntheticSource::new(64, 10, 10, 3, 1)
                .unwrap()
                .with_fail_every(4),
        );
        let mut c = cfg(16, 0, 1, 2);
        c.augment = AugmentConfig::small(8);
        let total: u64 = take(&syn, c, 0, 4).iter().map(|b| b.skipped).sum();
        assert!(total >= 14, "{total}"); // 16 failing items, less those hidden behind a failure
    }

    #[test]
    fn unreadable_dataset_fails_with_a_clear_error() {
        let syn: Arc<dyn Source> = Arc::new(
            SyntheticSource::new(200, 10, 10, 3, 1)
                .unwrap()
                .with_fail_every(1),
        );
        let mut c = cfg(4, 0, 1, 1);
        c.augment = AugmentConfig::small(8);
        let mut l = Loader::new(syn, c, 0).unwrap();
        let err = l.next_batch().err().unwrap().to_string();
        assert!(err.contains("consecutive unreadable"), "{err}");
        assert!(l.next_batch().is_err());
    }

    /// The loader's fused colour stage gives the views the tensor stage gives, for the same
    /// batches (the tolerance is float rounding; see `colour_cpu`).
    #[test]
    fn colour_on_cpu_matches_the_tensor_stage() {
        let src = fashion();
        let mut aug = AugmentConfig::imagenet();
        aug.crop_size = 32;
        aug.blur_kernel = Some(5);
        let plain = LoaderConfig {
            augment: aug,
            ..cfg(8, 0, 1, 2)
        };
        let fused = LoaderConfig {
            colour_on_cpu: true,
            ..plain.clone()
        };
        for (x, y) in take(&src, plain, 3, 2).iter().zip(&take(&src, fused, 3, 2)) {
            assert_eq!(x.params_a, y.params_a);
            assert_eq!(y.a.kind(), Kind::Float);
            let (xa, xb) = x.views(Device::Cpu).unwrap();
            let (ya, yb) = y.views(Device::Cpu).unwrap();
            for (p, q) in [(xa, ya), (xb, yb)] {
                let d = (p - q).abs().max().double_value(&[]);
                assert!(d < 2e-5, "max abs difference {d}");
            }
        }
    }

    #[test]
    fn config_errors() {
        let src = fashion();
        assert!(Loader::new(src.clone(), cfg(1024, 0, 1, 1), 0).is_err());
        assert!(Loader::new(src.clone(), cfg(8, 2, 2, 1), 0).is_err());
        let c = LoaderConfig {
            drop_last: false,
            ..cfg(8, 0, 1, 1)
        };
        assert!(Loader::new(src, c, 0).is_err());
    }
}
