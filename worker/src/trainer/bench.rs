//! `bt-bench step`: timings of one rank's training step and its parts — the model's forward +
//! backward alone, the loss in both forms, the LARS step, and the whole step fed by the real loader
//! with its breakdown (data wait / device augmentations / forward / gather / loss / backward /
//! all-reduce / optimizer). The whole step is the trainer's own [`train_step`], timed by an
//! observer, so the benchmark measures what trains. With a rendezvous, every rank runs it in a
//! real process group (the trainer's all-gather with grad, SyncBN and bucketed gradient
//! all-reduce) and rank 0 prints; then the all-reduce phase with its overlap with backward off and
//! on, and the scaling efficiency against a single-rank step run in between, twice: on every
//! rank at once (the machine as loaded) and on rank 0 alone.
use std::sync::Arc;
use std::time::Instant;

use tch::{nn, Device, Kind, Tensor};

use bt_common::spec::DEFAULT_LAMBDA;

use super::pretrain::{step_on_views, train_step, Phase, StepObserver, StepSettings, TrainState};
use crate::amp::{MemoryFormat, Precision};
use crate::data::{self, AugmentConfig, Loader, LoaderConfig, SourceSpec, Split};
use crate::dist::bench::median;
use crate::dist::{ProcessGroup, Rendezvous};
use crate::loss::{barlow_twins_loss, LossForm};
use crate::model::{Arch, BarlowTwinsModel, ModelConfig};
use crate::optim::{Lars, LarsConfig};
use crate::Result;

#[derive(Debug, Clone)]
pub struct StepBenchConfig {
    pub arch: Arch,
    pub cifar_stem: bool,
    /// ResNet width (64: torchvision).
    pub width: i64,
    pub projector: Vec<i64>,
    pub image_size: usize,
    pub batch: usize,
    pub steps: usize,
    pub loader_threads: usize,
    pub fashion_dir: std::path::PathBuf,
    pub loss_n: i64,
    pub loss_d: i64,
    pub device: Device,
    pub precision: Precision,
    pub layout: MemoryFormat,
    /// Join this group (several ranks); `None`: a single rank, no collectives.
    pub rendezvous: Option<Rendezvous>,
    /// At W > 1, skip to the overlap and scaling rounds.
    pub scaling_only: bool,
    /// The ranks are pinned (`train.pin_cpus`): at W > 1 Gloo's I/O threads go to the idle
    /// scheduling class too, as in training.
    pub pin_cpus: bool,
    /// Time the PyTorch recipe's step beside bt's (single rank only).
    pub against_torch: Option<AgainstTorch>,
}

/// The PyTorch side of the side-by-side (`bench/torch_step.py`).
#[derive(Debug, Clone)]
pub struct AgainstTorch {
    pub python: String,
    pub script: std::path::PathBuf,
    /// Interleaved rounds; each runs `steps` of bt, then `steps` of the recipe.
    pub rounds: usize,
}

/// This process's peak resident set (KiB), from getrusage.
pub fn peak_rss_kib() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } == 0 {
        u.ru_maxrss
    } else {
        0
    }
}

/// Waits for queued CUDA work so that wall-clock laps measure the work itself.
fn sync(dev: Device) {
    if let Device::Cuda(i) = dev {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Lap times of the phases of [`train_step`] (each lap waits for queued device work first).
struct Laps {
    device: Device,
    t: Instant,
    /// Milliseconds per phase, summed over the recorded steps.
    ms: [f64; Phase::ALL.len()],
    record: bool,
}

impl StepObserver for Laps {
    fn phase_done(&mut self, phase: Phase) {
        sync(self.device);
        if self.record {
            self.ms[phase as usize] += self.t.elapsed().as_secs_f64() * 1e3;
        }
        self.t = Instant::now();
    }
}

fn time_it(steps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let t = Instant::now();
    for _ in 0..steps {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3 / steps as f64)
}

/// A group of one rank (no rendezvous, no collectives).
fn single_group() -> Result<ProcessGroup> {
    ProcessGroup::new(&Rendezvous::new(
        0,
        1,
        "127.0.0.1",
        0,
        std::time::Duration::from_secs(1),
    ))
}

/// The model (seeded), its layout, LARS and the gradient buckets over `group`, as training builds
/// them; returns the variables' store (kept alive with the model), the state and the number of
/// parameters.
fn new_state(
    c: &StepBenchConfig,
    group: Arc<ProcessGroup>,
) -> Result<(nn::VarStore, TrainState, i64)> {
    let world = group.world_size();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(c.device);
    let mut mcfg = ModelConfig::new(c.arch);
    mcfg.cifar_stem = c.cifar_stem;
    mcfg.width = c.width;
    mcfg.projector = c.projector.clone();
    let mut model = BarlowTwinsModel::new(&vs.root(), &mcfg)?;
    if world > 1 {
        model.set_group(Some(group.clone()));
    }
    let state: Vec<Tensor> = model.state().into_iter().map(|n| n.tensor).collect();
    c.layout.apply_to_weights(&state)?;
    let params = model.parameters();
    let n_params: i64 = params.iter().map(|p| p.tensor.numel() as i64).sum();
    let opt = Lars::new(&params, LarsConfig::default(), c.batch * world, 0, 1000);
    let settings = StepSettings {
        device: c.device,
        precision: c.precision,
        layout: c.layout,
        lambda: DEFAULT_LAMBDA,
        form: LossForm::Auto,
    };
    let st = TrainState::new(model, opt, group, settings)?;
    Ok((vs, st, n_params))
}

/// Runs the step benchmark and prints its figures.
pub fn run_step_bench(c: &StepBenchConfig) -> Result<()> {
    let dev = c.device;
    let group = Arc::new(match &c.rendezvous {
        Some(rv) => ProcessGroup::new(rv)?,
        None => single_group()?,
    });
    let world = group.world_size();
    let rank0 = group.rank() == 0;
    if c.pin_cpus && world > 1 {
        super::affinity::demote_collective_io_logged();
    }
    // Only rank 0 prints; every rank runs the same collectives.
    macro_rules! say {
        ($($t:tt)*) => { if rank0 { println!($($t)*); } };
    }
    let (_vs, mut st, n_params) = new_state(c, group.clone())?;
    let b = c.batch as i64;
    let s = c.image_size as i64;
    say!(
        "# bt-bench step: {:?} width={} cifar_stem={} projector={:?}, {} params, batch {} per view at {}x{}, {} torch threads, device {:?}, {:?}, {:?}",
        c.arch, c.width, c.cifar_stem, c.projector, n_params, b, s, s, tch::get_num_threads(), dev, c.precision, c.layout
    );
    let xa = Tensor::randn([b, 3, s, s], (Kind::Float, dev));
    let xb = Tensor::randn([b, 3, s, s], (Kind::Float, dev));
    if world > 1 && c.scaling_only {
        return overlap_and_scaling(c, &mut st, &xa, &xb);
    }

    // 1. the model alone: forward both views (as training runs it), a trivial scalar, backward.
    let model_alone = |st: &mut TrainState| -> Result<()> {
        st.opt.zero_grad();
        let (za, zb) = st.forward_views(&xa, &xb)?;
        (za * zb).mean(Kind::Float).f_backward()?;
        sync(dev);
        Ok(())
    };
    let model_ms = time_it(c.steps, || model_alone(&mut st))?;
    say!(
        "model forward+backward (2 views)      {model_ms:>9.1} ms   {:>8.1} img/s",
        b as f64 * 1e3 / model_ms
    );

    // 2. the loss, both forms, forward + backward w.r.t. the embeddings.
    let za = Tensor::randn([c.loss_n, c.loss_d], (Kind::Float, dev)).set_requires_grad(true);
    let zb = Tensor::randn([c.loss_n, c.loss_d], (Kind::Float, dev)).set_requires_grad(true);
    let mut loss_ms = Vec::new();
    for form in [LossForm::Cross, LossForm::Gram] {
        let ms = time_it(c.steps.min(5), || {
            let out = barlow_twins_loss(&za, &zb, st.lambda, form, false)?;
            out.loss.f_backward()?;
            let _ = za.grad().zero_();
            let _ = zb.grad().zero_();
            sync(dev);
            Ok(())
        })?;
        say!(
            "loss {:<6} N={} D={} fwd+bwd     {ms:>9.1} ms",
            format!("{form:?}"),
            c.loss_n,
            c.loss_d
        );
        loss_ms.push(ms);
    }
    say!(
        "gram speed-up over cross              {:>9.2}x",
        loss_ms[0] / loss_ms[1]
    );

    // 3. the optimizer step alone (gradients from the last backward are still there).
    {
        st.opt.zero_grad();
        let (za, _) = st.forward_views(&xa, &xb)?;
        za.mean(Kind::Float).f_backward()?;
    }
    let mut step_no = 0u64;
    let fused = st.opt.is_fused();
    let mut lars_ms = |st: &mut TrainState| {
        time_it(c.steps, || {
            step_no += 1;
            st.opt.step(step_no)?;
            sync(dev);
            Ok(())
        })
    };
    if fused {
        st.opt.set_fused(false);
        let per_tensor_ms = lars_ms(&mut st)?;
        st.opt.set_fused(true);
        let fused_ms = lars_ms(&mut st)?;
        say!("LARS step, per-tensor ops             {per_tensor_ms:>9.1} ms");
        say!(
            "LARS step, fused (used)               {fused_ms:>9.1} ms   {:>8.2}x",
            per_tensor_ms / fused_ms
        );
    } else {
        let opt_ms = lars_ms(&mut st)?;
        say!("LARS step (per-tensor ops)            {opt_ms:>9.1} ms");
    }
    // What training keeps per parameter: the fp32 value, its gradient (at W > 1 the .grad
    // tensors alias the all-reduce buckets, so no second copy) and the momentum buffer.
    say!(
        "memory per parameter: 4 B value + 4 B gradient + 4 B momentum = 12 B; {} parameters = {:.0} MiB",
        n_params,
        n_params as f64 * 12.0 / (1 << 20) as f64
    );

    // 4. side by side with the PyTorch recipe: the same step on fixed inputs, interleaved rounds.
    if let Some(t) = &c.against_torch {
        if world > 1 || c.width != 64 {
            say!(
                "against torch: skipped (single rank, width 64 only: the recipe is torchvision's)"
            );
        } else {
            against_torch(c, t, &mut st, &xa, &xb)?;
        }
    }

    // 5. the whole step fed by the loader, with its breakdown.
    let src = data::open_source(
        &SourceSpec::FashionMnist {
            dir: c.fashion_dir.clone(),
        },
        Split::Train,
    )?;
    let mut lc = LoaderConfig::new(c.batch, 0, AugmentConfig::small(c.image_size));
    lc.rank = group.rank();
    lc.world_size = world;
    lc.threads = c.loader_threads;
    lc.prefetch = 4;
    lc.colour_on_cpu = dev == Device::Cpu;
    let mut loader = Loader::new(Arc::clone(&src), lc, 0)?;
    let mut laps = Laps {
        device: dev,
        t: Instant::now(),
        ms: [0.0; Phase::ALL.len()],
        record: false,
    };
    group.barrier()?;
    // Each whole step follows one model-alone step, so that both figures see the same machine
    // state (a shared 2-core machine drifts by ±20% over the seconds the sections take); the
    // comparison uses the medians of the pairs. Step 0 is a warm-up, not recorded.
    let (mut whole, mut alone) = (Vec::new(), Vec::new());
    for i in 0..=c.steps {
        let t_alone = Instant::now();
        model_alone(&mut st)?;
        if i > 0 {
            alone.push(t_alone.elapsed().as_secs_f64() * 1e3);
        }
        laps.record = i > 0;
        let step_t = Instant::now();
        laps.t = step_t;
        train_step(&mut st, &mut loader, i as u64 + 1, false, Some(&mut laps))?;
        if i > 0 {
            whole.push(step_t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let step_ms = whole.iter().sum::<f64>() / c.steps as f64;
    say!(
        "whole step (loader, {} thread(s), {world} rank(s)) {step_ms:>9.1} ms   {:>8.1} img/s per rank",
        c.loader_threads,
        b as f64 * 1e3 / step_ms
    );
    for (p, v) in Phase::ALL.iter().zip(laps.ms) {
        say!(
            "  {:<18}                  {:>9.1} ms",
            p.name(),
            v / c.steps as f64
        );
    }
    let (whole_med, alone_med) = (median(&mut whole), median(&mut alone));
    say!("median whole step / model alone, interleaved {whole_med:>9.1} / {alone_med:.1} ms");
    say!(
        "whole step vs model fwd+bwd alone     {:>+8.1} %",
        100.0 * (whole_med - alone_med) / alone_med
    );
    drop(loader);

    // 6. at W > 1: the gradient all-reduce overlapped with backward or not, and the scaling.
    if world > 1 {
        overlap_and_scaling(c, &mut st, &xa, &xb)?;
    }
    Ok(())
}

/// One [`step_on_views`] on fixed inputs: the whole step and each phase, in milliseconds.
struct StepTimes {
    whole: f64,
    phases: [f64; Phase::ALL.len()],
}

impl StepTimes {
    fn phase(&self, p: Phase) -> f64 {
        self.phases[p as usize]
    }
}

fn timed_step(st: &mut TrainState, xa: &Tensor, xb: &Tensor, step: u64) -> Result<StepTimes> {
    let mut laps = Laps {
        device: st.device,
        t: Instant::now(),
        ms: [0.0; Phase::ALL.len()],
        record: true,
    };
    let t0 = laps.t;
    step_on_views(st, xa, xb, step, false, Some(&mut laps))?;
    sync(st.device);
    Ok(StepTimes {
        whole: t0.elapsed().as_secs_f64() * 1e3,
        phases: laps.ms,
    })
}

/// The recorded [`StepTimes`] of one way of running the step; medians per figure.
#[derive(Default)]
struct Series(Vec<StepTimes>);

impl Series {
    fn whole(&self) -> f64 {
        median(&mut self.0.iter().map(|t| t.whole).collect::<Vec<_>>())
    }
    fn phase(&self, p: Phase) -> f64 {
        median(&mut self.0.iter().map(|t| t.phase(p)).collect::<Vec<_>>())
    }
    /// "forward F, gather G, loss L, backward B, all-reduce A, optimizer O ms" (medians): the
    /// phases after the data ones, which fixed inputs skip.
    fn breakdown(&self) -> String {
        Phase::ALL
            .iter()
            .skip_while(|&&p| p != Phase::Forward)
            .map(|&p| format!("{} {:.1}", p.name(), self.phase(p)))
            .collect::<Vec<_>>()
            .join(", ")
            + " ms"
    }
}

/// Interleaved rounds on fixed inputs, each:
/// 1. the step at W ranks with the gradient all-reduce after backward (overlap off), then the
///    same with it overlapped (on, as training runs);
/// 2. every rank steps its own single-rank model at once (same per-rank batch and threads, no
///    collectives): W=1 on a machine as loaded as at W ranks;
/// 3. rank 0 alone steps its single-rank model while the others wait at a barrier: W=1 with the
///    machine to itself.
///
/// Prints the medians of the all-reduce phase both ways and the scaling efficiency (per-rank step
/// time at W=1 over that at W=N, overlap on) against both W=1 figures. Ranks that share one
/// machine also share its memory bandwidth and caches: (2) takes that out of the comparison, so
/// what is left is the cost of training together (collectives and waiting for each other); (3)
/// includes it.
fn overlap_and_scaling(
    c: &StepBenchConfig,
    st: &mut TrainState,
    xa: &Tensor,
    xb: &Tensor,
) -> Result<()> {
    let group = st.group.clone();
    let world = group.world_size();
    let rank0 = group.rank() == 0;
    let (_single_vs, mut single, _) = new_state(c, Arc::new(single_group()?))?;
    let rounds = c.steps.max(3);
    let (mut off, mut on, mut loaded, mut alone) = (
        Series::default(),
        Series::default(),
        Series::default(),
        Series::default(),
    );
    let mut step = 1000u64;
    // Round 0 warms every way up and is not recorded.
    let keep = |series: &mut Series, t: StepTimes, round: usize| {
        if round > 0 {
            series.0.push(t);
        }
    };
    for round in 0..=rounds {
        for (series, overlap) in [(&mut off, false), (&mut on, true)] {
            st.set_overlap(overlap)?;
            step += 1;
            keep(series, timed_step(st, xa, xb, step)?, round);
        }
        step += 1;
        group.barrier()?;
        keep(&mut loaded, timed_step(&mut single, xa, xb, step)?, round);
        group.barrier()?;
        if rank0 {
            step += 1;
            keep(&mut alone, timed_step(&mut single, xa, xb, step)?, round);
        }
        group.barrier()?;
    }
    st.set_overlap(true)?;
    if !rank0 {
        return Ok(());
    }
    println!(
        "# gradient all-reduce and scaling, fixed inputs, medians of {rounds} interleaved rounds at W={world}"
    );
    for (series, name) in [(&off, "overlap off"), (&on, "overlap on ")] {
        println!(
            "  all-reduce phase, {name}         {:>9.1} ms   (backward {:.1} ms, whole step {:.1} ms)",
            series.phase(Phase::AllReduce),
            series.phase(Phase::Backward),
            series.whole()
        );
    }
    let per_rank_n = on.whole();
    println!(
        "  W={world}, overlap on: {:.1} ms; {}",
        per_rank_n,
        on.breakdown()
    );
    for (series, name) in [
        (&loaded, "W=1, every rank at once"),
        (&alone, "W=1, rank 0 alone"),
    ] {
        println!("  {name}: {:.1} ms; {}", series.whole(), series.breakdown());
    }
    println!(
        "scaling efficiency W={world} vs W=1 on a machine as loaded: {:.1} % (per-rank step {per_rank_n:.1} ms vs {:.1} ms)",
        100.0 * loaded.whole() / per_rank_n,
        loaded.whole()
    );
    println!(
        "scaling efficiency W={world} vs W=1 alone on the machine: {:.1} % (per-rank step {per_rank_n:.1} ms vs {:.1} ms)",
        100.0 * alone.whole() / per_rank_n,
        alone.whole()
    );
    Ok(())
}

/// Rounds of bt's [`step_on_views`] on fixed inputs interleaved with rounds of the PyTorch
/// recipe's step (a child process running `bench/torch_step.py`, same batch shape and threads);
/// prints both medians, the ratio, and both processes' peak resident memory.
fn against_torch(
    c: &StepBenchConfig,
    t: &AgainstTorch,
    st: &mut TrainState,
    xa: &Tensor,
    xb: &Tensor,
) -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let bench_err = |m: String| crate::Error::Other(format!("against torch: {m}"));
    let arch = match c.arch {
        Arch::Resnet18 => "resnet18",
        Arch::Resnet34 => "resnet34",
        Arch::Resnet50 => "resnet50",
    };
    let projector = c
        .projector
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let threads = tch::get_num_threads();
    let mut child = Command::new(&t.python)
        .arg(&t.script)
        .args([
            arch,
            if c.cifar_stem { "1" } else { "0" },
            &projector,
            &c.batch.to_string(),
            &c.image_size.to_string(),
            &threads.to_string(),
            // The recipe runs with bt's precision and layout: a like-for-like step.
            match c.precision {
                Precision::Bf16 => "bf16",
                _ => "fp32",
            },
            match c.layout {
                MemoryFormat::ChannelsLast => "channels-last",
                _ => "contiguous",
            },
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| bench_err(format!("starting {} {}: {e}", t.python, t.script.display())))?;
    let mut stdin = child.stdin.take().expect("stdin piped");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout piped")).lines();
    let mut next_line = || -> Result<String> {
        lines
            .next()
            .ok_or_else(|| bench_err("the recipe process ended early".into()))?
            .map_err(|e| bench_err(e.to_string()))
    };
    let ready = next_line()?;
    if !ready.starts_with("ready") {
        return Err(bench_err(format!("unexpected first line {ready:?}")));
    }
    // bt's warm-up step (allocations, momentum buffers), not timed.
    step_on_views(st, xa, xb, 1, false, None)?;
    sync(c.device);
    let (mut bt_ms, mut torch_ms) = (Vec::new(), Vec::new());
    let mut torch_rss = 0i64;
    let mut step = 1u64;
    for _ in 0..t.rounds {
        for _ in 0..c.steps {
            step += 1;
            let t0 = Instant::now();
            step_on_views(st, xa, xb, step, false, None)?;
            sync(c.device);
            bt_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        writeln!(stdin, "run {}", c.steps).map_err(|e| bench_err(e.to_string()))?;
        let reply: serde_json::Value =
            serde_json::from_str(&next_line()?).map_err(|e| bench_err(format!("reply: {e}")))?;
        torch_ms.extend(
            reply["ms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_f64()),
        );
        torch_rss = reply["peak_rss_kib"].as_i64().unwrap_or(0);
    }
    let _ = writeln!(stdin, "quit");
    drop(stdin);
    let _ = child.wait();
    let (bt_med, torch_med) = (median(&mut bt_ms), median(&mut torch_ms));
    let b = c.batch as f64;
    println!(
        "# side by side, fixed inputs, {} interleaved rounds of {} steps, {threads} thread(s) each",
        t.rounds, c.steps
    );
    println!("# both sides {:?} / {:?}", c.precision, c.layout);
    println!(
        "  PyTorch recipe step (torchvision, D x D loss, per-parameter LARS) {torch_med:>9.1} ms   {:>8.1} img/s",
        b * 1e3 / torch_med
    );
    println!(
        "  bt step (forward, loss {:?}, backward, LARS)                      {bt_med:>9.1} ms   {:>8.1} img/s",
        st.form,
        b * 1e3 / bt_med
    );
    println!(
        "  bt speed-up over the recipe                                      {:>9.2}x",
        torch_med / bt_med
    );
    println!(
        "  peak resident memory: bt {:.0} MiB, recipe {:.0} MiB",
        peak_rss_kib() as f64 / 1024.0,
        torch_rss as f64 / 1024.0
    );
    Ok(())
}
