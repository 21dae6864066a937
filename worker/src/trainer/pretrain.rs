//! Barlow Twins pretraining on one rank: the setup, then [`train_step`] (data → two views →
//! model → all-gather → global-batch loss → backward → gradient all-reduce → LARS) step after
//! step, with metrics, checkpoints and the kNN monitor. The step benchmark runs the same
//! [`train_step`].
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bt_common::domain::NoticeLevel;
use bt_common::JobSpec;
use bt_proto::trainer_event::Body;
use bt_proto::{Assignment, CheckpointInfo, CorrelationPicture, EvalResult, TrainMetrics};
use tch::{nn, Device, Kind, Tensor};
use tracing::{info, warn};

use super::{
    limited, loss_form, memory_format, model_config, precision, source_spec, stop_requested,
    Outcome, Reporter, TResult, TrainerError, GRAD_BUCKET_BYTES,
};
use crate::amp::{with_autocast, MemoryFormat, Precision};
use crate::data::{self, Loader, LoaderConfig, Split};
use crate::dist::{GradBuckets, ProcessGroup, Rendezvous};
use crate::loss::{self, LossForm};
use crate::model::BarlowTwinsModel;
use crate::optim::{Lars, LarsConfig};
use crate::{checkpoint, eval, Error};

/// What one step of a rank needs, fixed for a run: the model, the optimizer and the gradient
/// buckets it reads, the process group, and the numerics settings.
pub struct TrainState {
    // Fields drop in this order: the buckets first, the group last.
    /// Persistent flat gradient buckets: backward accumulates into them in place and starts
    /// their all-reduces (overlap on unless [`TrainState::set_overlap`] turned it off).
    grad_buckets: GradBuckets,
    pub opt: Lars,
    pub model: BarlowTwinsModel,
    pub group: Arc<ProcessGroup>,
    pub device: Device,
    pub precision: Precision,
    pub layout: MemoryFormat,
    /// λ of the loss.
    pub lambda: f64,
    pub form: LossForm,
}

/// The numerics settings of a [`TrainState`].
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    pub device: Device,
    pub precision: Precision,
    pub layout: MemoryFormat,
    pub lambda: f64,
    pub form: LossForm,
}

impl TrainState {
    /// Builds the gradient buckets over `opt`'s parameters ([`GRAD_BUCKET_BYTES`] each).
    pub fn new(
        model: BarlowTwinsModel,
        opt: Lars,
        group: Arc<ProcessGroup>,
        s: StepSettings,
    ) -> crate::Result<Self> {
        let grad_buckets = group.grad_buckets(&opt.param_tensors(), GRAD_BUCKET_BYTES)?;
        Ok(TrainState {
            model,
            opt,
            group,
            grad_buckets,
            device: s.device,
            precision: s.precision,
            layout: s.layout,
            lambda: s.lambda,
            form: s.form,
        })
    }

    /// Turns the overlap of the gradient all-reduce with backward on or off (on by default; the
    /// step benchmark compares both).
    pub fn set_overlap(&mut self, on: bool) -> crate::Result<()> {
        self.grad_buckets.set_overlap(on)
    }

    /// The model's forward of both views as training runs it: the layout, autocast (bf16 when
    /// configured), and the embeddings out as fp32, so that the gather, the loss and (outside
    /// autocast) the backward start from fp32.
    pub fn forward_views(&self, va: &Tensor, vb: &Tensor) -> crate::Result<(Tensor, Tensor)> {
        with_autocast(self.precision, self.device, || {
            let xs = [self.layout.apply(va)?, self.layout.apply(vb)?];
            let z = self.model.forward_views(&xs, true)?;
            Ok((z[0].f_to_kind(Kind::Float)?, z[1].f_to_kind(Kind::Float)?))
        })
    }
}

/// The parts of a training step, in order; an observer hears of each as it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    DataWait,
    DeviceAugment,
    Forward,
    Gather,
    Loss,
    Backward,
    AllReduce,
    Optimizer,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::DataWait,
        Phase::DeviceAugment,
        Phase::Forward,
        Phase::Gather,
        Phase::Loss,
        Phase::Backward,
        Phase::AllReduce,
        Phase::Optimizer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::DataWait => "data wait",
            Phase::DeviceAugment => "device augment",
            Phase::Forward => "forward",
            Phase::Gather => "gather",
            Phase::Loss => "loss",
            Phase::Backward => "backward",
            Phase::AllReduce => "all-reduce",
            Phase::Optimizer => "optimizer",
        }
    }
}

/// Hears of each [`Phase`] of [`train_step`] as it ends (the step benchmark's laps).
pub trait StepObserver {
    fn phase_done(&mut self, phase: Phase);
}

/// What one step produced.
pub struct StepOutput {
    pub loss: loss::LossOutput,
    /// The learning rate of the weights at this step.
    pub lr: f64,
    /// Images of the batch the loader skipped (unreadable).
    pub skipped: u64,
}

/// One training step: the next batch → two views → [`step_on_views`]. With `want_stats` the loss
/// statistics are filled (one device sync).
pub fn train_step(
    st: &mut TrainState,
    loader: &mut Loader,
    step: u64,
    want_stats: bool,
    mut observer: Option<&mut dyn StepObserver>,
) -> crate::Result<StepOutput> {
    let batch = loader.next_batch()?;
    lap(&mut observer, Phase::DataWait);
    let (va, vb) = batch.views(st.device)?;
    lap(&mut observer, Phase::DeviceAugment);
    let (loss, lr) = step_on_views(st, &va, &vb, step, want_stats, observer)?;
    Ok(StepOutput {
        loss,
        lr,
        skipped: batch.skipped,
    })
}

/// The step from two views on: model → all-gather → global-batch loss → backward → gradient
/// all-reduce → LARS step number `step` (counted from 0). Returns the loss and the weights'
/// learning rate. [`train_step`] and the benchmark's side-by-side with the PyTorch recipe (fixed
/// inputs, no loader) both call it.
pub fn step_on_views(
    st: &mut TrainState,
    va: &Tensor,
    vb: &Tensor,
    step: u64,
    want_stats: bool,
    mut observer: Option<&mut dyn StepObserver>,
) -> crate::Result<(loss::LossOutput, f64)> {
    let (za, zb) = st.forward_views(va, vb)?;
    lap(&mut observer, Phase::Forward);
    let ga = st.group.all_gather_with_grad(&za)?;
    let gb = st.group.all_gather_with_grad(&zb)?;
    lap(&mut observer, Phase::Gather);
    let out = loss::barlow_twins_loss(&ga, &gb, st.lambda, st.form, want_stats)?;
    lap(&mut observer, Phase::Loss);
    // The backward's hooks start each gradient bucket's all-reduce as soon as it is complete;
    // all_reduce() starts the rest and waits.
    st.grad_buckets.arm()?;
    st.opt.zero_grad();
    out.loss.f_backward()?;
    lap(&mut observer, Phase::Backward);
    st.grad_buckets.all_reduce()?;
    lap(&mut observer, Phase::AllReduce);
    let lr = st.opt.step(step)?;
    lap(&mut observer, Phase::Optimizer);
    Ok((out, lr))
}

fn lap(observer: &mut Option<&mut dyn StepObserver>, phase: Phase) {
    if let Some(o) = observer.as_deref_mut() {
        o.phase_done(phase);
    }
}

/// A run of this rank, set up for its first step.
struct Setup {
    /// The variables' store, kept for the run like the model it made.
    vs: nn::VarStore,
    st: TrainState,
    loader: Loader,
    monitor: Option<eval::KnnMonitor>,
    global_batch: usize,
    steps_per_epoch: u64,
    total_steps: u64,
    /// The step to start from (the checkpoint's when resuming).
    start_step: u64,
}

/// Pretraining on this rank: [`setup`], then the steps with metrics, checkpoints and the kNN
/// monitor.
pub fn run(a: &Assignment, spec: &JobSpec, device: Device, rep: &mut Reporter) -> TResult<Outcome> {
    let Setup {
        vs: _vs,
        mut st,
        mut loader,
        mut monitor,
        global_batch,
        steps_per_epoch,
        total_steps,
        start_step,
    } = setup(a, spec, device, rep)?;
    let is_rank0 = a.rank == 0;
    let t = &spec.train;
    let knn_every = knn_every(spec, steps_per_epoch);
    let ckpt = Checkpointer {
        job_id: &a.job_id,
        root: PathBuf::from(&a.checkpoint_dir),
        spec,
        steps_per_epoch,
    };

    let mut skipped_total = 0u64;
    let mut window_imgs = 0u64;
    let mut window_start = Instant::now();
    let mut last_ckpt_step = start_step;
    let mut step = start_step;
    let picture_every = u64::from(t.picture_every);
    let mut next_picture = start_step + picture_every;
    info!(total_steps, steps_per_epoch, start_step, "training");
    while step < total_steps {
        if stop_agreed(&st.group, stop_requested())? {
            // Every rank stops at this same step; rank 0 saves it, and the others leave only
            // after that checkpoint is reported, so the resume point is this step.
            if is_rank0 && step > last_ckpt_step {
                ckpt.save(rep, &st.model, &st.opt, step)?;
            }
            st.group.barrier()?;
            info!(step, "stopped on request, state saved");
            return Ok(Outcome::Stopped);
        }
        let step_start = Instant::now();
        let want_stats = is_rank0
            && ((step + 1).is_multiple_of(u64::from(t.log_every)) || step + 1 == total_steps);
        let out = train_step(&mut st, &mut loader, step, want_stats, None)?;
        skipped_total += out.skipped;
        let lr = out.lr;
        step += 1;
        window_imgs += global_batch as u64;
        if want_stats {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let s = &out.loss.stats;
            let m = TrainMetrics {
                step,
                epoch: (step.saturating_sub(1) / steps_per_epoch) as u32,
                total_steps,
                loss: s.loss,
                on_diag: s.on_diag,
                off_diag: s.off_diag,
                off_diag_scaled: s.off_diag_scaled,
                mean_diag: s.mean_diag,
                mean_abs_off_diag: s.mean_abs_off_diag,
                max_abs_off_diag: s.max_abs_off_diag,
                lr,
                images_per_sec: window_imgs as f64 / secs,
                skipped_images: skipped_total,
                step_time_ms: step_start.elapsed().as_secs_f64() * 1e3,
            };
            info!(
                step,
                loss = s.loss,
                lr,
                images_per_sec = m.images_per_sec,
                "step"
            );
            rep.send(Body::Metrics(m));
            if picture_every > 0 && step >= next_picture {
                if let Some(p) = &out.loss.picture {
                    rep.send(Body::Picture(CorrelationPicture::from(
                        bt_common::domain::CorrelationPicture::quantize(
                            step,
                            p.side as u32,
                            &p.values,
                            s.mean_diag,
                            s.mean_abs_off_diag,
                        ),
                    )));
                }
                next_picture = step + picture_every;
            }
            window_imgs = 0;
            window_start = Instant::now();
        }
        if is_rank0
            && spec.checkpoint.every_steps > 0
            && step.is_multiple_of(spec.checkpoint.every_steps)
            && step < total_steps
        {
            ckpt.save(rep, &st.model, &st.opt, step)?;
            last_ckpt_step = step;
        }
        if knn_every > 0 && step.is_multiple_of(knn_every) && step < total_steps {
            knn_monitor(
                rep,
                spec,
                &mut monitor,
                &st.model,
                &st.group,
                step,
                steps_per_epoch,
            )?;
        }
    }
    if is_rank0 && (step > last_ckpt_step || spec.checkpoint.every_steps == 0) {
        ckpt.save(rep, &st.model, &st.opt, step)?;
    }
    if spec.eval.knn_at_end {
        knn_monitor(
            rep,
            spec,
            &mut monitor,
            &st.model,
            &st.group,
            step,
            steps_per_epoch,
        )?;
    }
    st.group.barrier()?;
    Ok(Outcome::Finished)
}

/// Where to resume: `resume_from` if it verifies, else the newest of `resume_fallbacks` that does
/// (each one skipped with a notice naming it and why); every rank must pick the same. None: start
/// fresh. When none verifies, the newest one's error (with its path).
fn resume_point(
    a: &Assignment,
    group: &ProcessGroup,
    rep: &mut Reporter,
) -> TResult<Option<String>> {
    if a.resume_from.is_empty() {
        return Ok(None);
    }
    let mut first_err = None;
    let mut pick = None;
    for p in std::iter::once(&a.resume_from).chain(&a.resume_fallbacks) {
        match checkpoint::verify(Path::new(p)) {
            Ok(_) => {
                pick = Some(p.clone());
                break;
            }
            Err(e) => {
                warn!(path = %p, error = %e, "checkpoint does not verify; trying the one before");
                if a.rank == 0 {
                    rep.notice(
                        NoticeLevel::Warn,
                        format!("checkpoint {p} is not usable ({e}); resuming from an earlier one"),
                    );
                }
                first_err.get_or_insert(e);
            }
        }
    }
    match (pick, first_err) {
        (Some(pick), _) => {
            group.check_agreement("resume checkpoint", pick.as_bytes())?;
            Ok(Some(pick))
        }
        (None, Some(e)) => Err(e.into()),
        (None, None) => Ok(None),
    }
}

/// Whether any rank was asked to stop (SIGTERM: its node drains or terminates): one tiny
/// all-reduce per step, so that all ranks stop together at the same step instead of leaving the
/// others blocked in the next collective.
fn stop_agreed(group: &ProcessGroup, local: bool) -> TResult<bool> {
    if group.world_size() == 1 {
        return Ok(local);
    }
    let flag = Tensor::from(if local { 1f32 } else { 0f32 }).to_device(group.device());
    group.all_reduce_sum(&flag)?;
    Ok(flag.f_double_value(&[])? > 0.0)
}

/// Steps between kNN monitor runs (0: none before the end).
fn knn_every(spec: &JobSpec, steps_per_epoch: u64) -> u64 {
    u64::from(spec.eval.knn_every_epochs) * steps_per_epoch
}

/// Checks the assignment against the spec, opens the data (a bad data set is the job's own error
/// and costs no collective), joins the process group, builds the model (rank 0's weights on every
/// rank), the optimizer and the gradient buckets, resumes from the assignment's checkpoint, and
/// starts the loader and the kNN monitor.
fn setup(a: &Assignment, spec: &JobSpec, device: Device, rep: &mut Reporter) -> TResult<Setup> {
    // An elastic restart runs on fewer ranks than `world_size`: the same global batch, split
    // over the assignment's ranks (nothing else, the checkpoint included, depends on W).
    let allowed = spec.allowed_world_sizes();
    if !allowed.contains(&a.world_size) || a.rank >= a.world_size {
        return Err(TrainerError::spec(format!(
            "assignment rank {} of {} does not fit the job: world_size {} runs at {}",
            a.rank,
            a.world_size,
            spec.world_size,
            allowed
                .iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    let rank = a.rank as usize;
    let world = a.world_size as usize;
    let t = &spec.train;

    // Data first: a bad data set is the job's own error and costs no collective.
    let src_spec = source_spec(spec);
    let train_src = limited(data::open_source(&src_spec, Split::Train)?, spec.data.limit);
    info!(source = %train_src.describe(), "training data");
    let global_batch = t.batch_size as usize;
    if train_src.len() < global_batch {
        return Err(TrainerError::job(Error::Data {
            path: PathBuf::from(&spec.data.path),
            message: format!(
                "{} training images is fewer than one global batch of {global_batch}",
                train_src.len()
            ),
        }));
    }
    let steps_per_epoch = (train_src.len() / global_batch) as u64;
    let mut total_steps = steps_per_epoch * u64::from(t.epochs);
    if t.max_steps > 0 {
        total_steps = total_steps.min(t.max_steps);
    }
    let warmup_steps = (t.warmup_epochs * steps_per_epoch as f64).round() as u64;
    let settings = StepSettings {
        device,
        precision: precision(t.precision, device),
        layout: memory_format(t.memory_format, device),
        lambda: t.lambda,
        form: loss_form(t.loss_form),
    };

    // Rendezvous with the other ranks.
    let t0 = Instant::now();
    // The attempt's store prefix (a secret: never logged); refused when missing at world > 1.
    let mut rv =
        Rendezvous::from_assignment(a, Duration::from_secs(u64::from(spec.dist.timeout_secs)))?;
    if let Device::Cuda(i) = device {
        rv.backend = crate::dist::Backend::Nccl { device_index: i };
    }
    let group = Arc::new(ProcessGroup::new(&rv)?);
    if t.pin_cpus && device == Device::Cpu && world > 1 {
        super::affinity::demote_collective_io_logged();
    }
    info!(
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "process group ready"
    );

    tch::manual_seed(t.seed as i64);
    let vs = nn::VarStore::new(device);
    let mcfg = model_config(spec);
    let mut model = BarlowTwinsModel::new(&vs.root(), &mcfg)?;
    if world > 1 && mcfg.sync_bn {
        model.set_group(Some(group.clone()));
    }
    let state: Vec<Tensor> = model.state().into_iter().map(|n| n.tensor).collect();
    let shapes: Vec<(String, Vec<i64>, tch::Kind)> = model
        .state()
        .iter()
        .map(|n| (n.name.clone(), n.tensor.size(), n.tensor.kind()))
        .collect();
    let mut agreement = a.spec_toml.clone().into_bytes();
    agreement.extend(crate::dist::shape_signature(&shapes));
    group.check_agreement("job config and model shape", &agreement)?;
    group.broadcast_params(&state, 0)?;

    let (precision, layout) = (settings.precision, settings.layout);
    layout.apply_to_weights(&state)?;
    if precision != Precision::Fp32 || layout != MemoryFormat::Contiguous {
        info!(?precision, ?layout, "mixed precision / memory format");
    }

    let params = model.parameters();
    let lars_cfg = LarsConfig {
        lr_weights: t.lr_weights,
        lr_biases: t.lr_biases,
        weight_decay: t.weight_decay,
        loss_scale: t.loss_scale,
        ..LarsConfig::default()
    };
    let opt = Lars::new(&params, lars_cfg, global_batch, warmup_steps, total_steps);
    let mut st = TrainState::new(model, opt, group, settings)?;

    let mut start_step = 0u64;
    if let Some(from) = resume_point(a, &st.group, rep)? {
        let ck = checkpoint::load(Path::new(&from), &st.model, &mut st.opt)?;
        start_step = ck.step;
        info!(step = start_step, path = %from, "resumed from checkpoint");
        rep.notice(
            NoticeLevel::Info,
            format!("rank {rank} resumed from {from} at step {start_step}"),
        );
    }

    let loader_cfg = LoaderConfig {
        per_rank_batch: global_batch / world,
        rank,
        world_size: world,
        seed: t.seed,
        threads: spec.data.threads as usize,
        prefetch: spec.data.prefetch as usize,
        augment: data::AugmentConfig {
            crop_size: spec.data.image_size as usize,
            min_scale: spec.data.min_scale,
            min_ratio: 1.0 / spec.data.max_ratio,
            max_ratio: spec.data.max_ratio,
            erase_p: spec.data.erase_p,
            blur: spec.data.blur,
            ..data::AugmentConfig::default()
        },
        drop_last: true,
        colour_on_cpu: device == Device::Cpu,
    };
    let loader = Loader::new(train_src.clone(), loader_cfg, start_step)?;
    let monitor = if knn_every(spec, steps_per_epoch) > 0 || spec.eval.knn_at_end {
        Some(
            eval::KnnMonitor::new(
                data::open_source(&src_spec, Split::Train)?,
                data::open_source(&src_spec, Split::Test)?,
                spec.eval.bank_size as usize,
                spec.eval.test_size as usize,
                spec.data.image_size as usize,
                i64::from(spec.eval.knn_k),
                spec.eval.knn_temperature,
                device,
            )?
            .with_standardize(spec.eval.knn_standardize),
        )
    } else {
        None
    };
    Ok(Setup {
        vs,
        st,
        loader,
        monitor,
        global_batch,
        steps_per_epoch,
        total_steps,
        start_step,
    })
}

/// Rank 0's checkpoint writer: `<root>/<step>/`, reported to the daemon when written.
struct Checkpointer<'a> {
    job_id: &'a str,
    root: PathBuf,
    spec: &'a JobSpec,
    steps_per_epoch: u64,
}

impl Checkpointer<'_> {
    fn save(
        &self,
        rep: &mut Reporter,
        model: &BarlowTwinsModel,
        opt: &Lars,
        step: u64,
    ) -> TResult<()> {
        let dir = self.root.join(format!("{step:08}"));
        let epoch = (step / self.steps_per_epoch) as u32;
        let t0 = Instant::now();
        match checkpoint::save(&dir, model, opt, step, epoch, &self.spec.to_toml()) {
            Ok(saved) => {
                info!(step, path = %dir.display(), ms = t0.elapsed().as_millis() as u64, "checkpoint written");
                rep.send(Body::Checkpoint(CheckpointInfo {
                    job_id: self.job_id.to_string(),
                    step,
                    epoch,
                    path: dir.display().to_string(),
                    created_at_ms: bt_common::now_ms(),
                    size_bytes: saved.size_bytes,
                    sha256: saved.sha256,
                    ..Default::default()
                }));
            }
            Err(e) => {
                // A failed checkpoint write is reported, not fatal: training goes on.
                warn!(step, path = %dir.display(), error = %e, "checkpoint write failed");
                rep.notice(
                    NoticeLevel::Warn,
                    format!("checkpoint at step {step} failed: {e}"),
                );
            }
        }
        Ok(())
    }
}

/// The kNN monitor (bank = labelled training images, queries = held-out images), run by every
/// rank together; rank 0 reports it with both baselines when `eval.baseline` is set (measured at the
/// first call, repeated in later reports).
fn knn_monitor(
    rep: &mut Reporter,
    spec: &JobSpec,
    monitor: &mut Option<eval::KnnMonitor>,
    model: &BarlowTwinsModel,
    group: &ProcessGroup,
    step: u64,
    steps_per_epoch: u64,
) -> TResult<()> {
    let Some(monitor) = monitor.as_mut() else {
        return Ok(());
    };
    let e = &spec.eval;
    // The random-init network's seed: the job's, offset so that it is not the pretraining init.
    let seed = spec.train.seed as i64 + 1;
    let Some(r) = monitor.evaluate(model, Some(group), e.baseline, seed)? else {
        return Ok(());
    };
    let detail = format!(
        "k={} T={}{} bank={} test={} in {:.1}s",
        e.knn_k,
        e.knn_temperature,
        if e.knn_standardize {
            " standardized"
        } else {
            ""
        },
        r.bank,
        r.test,
        r.secs
    );
    info!(
        step,
        top1 = r.trained.top1,
        random_init = r.baselines.map(|b| b.random_init),
        raw_pixels = r.baselines.map(|b| b.raw_pixels),
        margin = r.baselines.map(|b| b.margin(r.trained.top1)),
        secs = r.secs,
        "knn monitor"
    );
    let mut ev = EvalResult {
        step,
        epoch: (step / steps_per_epoch) as u32,
        kind: "knn".into(),
        top1: r.trained.top1,
        top5: r.trained.top5,
        detail,
        ..Default::default()
    };
    if let Some(b) = r.baselines {
        b.fill(&mut ev);
    }
    rep.send(Body::Eval(ev));
    Ok(())
}
