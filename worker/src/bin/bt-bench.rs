//! `bt-bench`: benchmark figures for the training pipeline.
//!
//! - `bt-bench data`: the data pipeline (two augmented views per image), images/s and images/s
//!   per core, against torchvision + PIL doing the same augmentations.
//!
//! - `bt-bench step`: one rank's training step: the model's forward + backward alone, the loss in
//!   both forms, the LARS step, and the whole step fed by the loader, with its breakdown; with
//!   `--world N`, also the gradient all-reduce phase with its overlap with backward off and on, and
//!   the scaling efficiency (per-rank step at W=1, timed between the rounds on every rank at once
//!   and on rank 0 alone, vs W=N).
//!
//! - `bt-bench pretrain SPEC.toml [--set k=v]... [--world N]`: a job spec trained in this process
//!   (or N processes on loopback), no coordinator or daemon: metrics, kNN evaluations with their
//!   baselines and checkpoints printed as lines, and the wall time. The quick loop for recipe
//!   experiments (docs/QUALITY.md).
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use bt_worker::data::bench::{run_data_bench, BenchRow, DataBenchConfig};

#[derive(Parser)]
#[command(name = "bt-bench", version, about = "bt benchmark figures")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Data pipeline: loader and augmentation throughput vs torchvision + PIL.
    Data(DataArgs),
    /// One rank's training step: model fwd+bwd alone, loss forms, LARS, whole step with breakdown.
    Step(StepArgs),
    /// Train a job spec here, without a coordinator; events printed as lines.
    Pretrain(PretrainArgs),
}

#[derive(clap::Args)]
struct PretrainArgs {
    /// The job spec (TOML), as `btctl submit` takes it.
    spec: PathBuf,
    /// Overrides, `key=value` (as `btctl submit --set`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Ranks, one process each on loopback (the spec's world_size is set to it).
    #[arg(long, default_value_t = 1)]
    world: usize,
    /// Checkpoints go under this folder (default: a temporary one, removed at the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The device kind to train on ("cpu" or "cuda").
    #[arg(long, default_value = "cpu")]
    device_kind: bt_common::domain::DeviceKind,
    /// (set for the child processes) this process's rank.
    #[arg(long, hide = true)]
    rank: Option<usize>,
    /// (set for the child processes) rank 0's store port.
    #[arg(long, hide = true)]
    port: Option<u16>,
}

#[derive(clap::Args)]
struct StepArgs {
    /// The backbone, spelled as `model.backbone` in a job spec (resnet18, resnet34, ...).
    #[arg(long, default_value = "resnet18")]
    backbone: String,
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    cifar_stem: bool,
    #[arg(long, value_delimiter = ',', default_value = "2048,2048")]
    projector: Vec<i64>,
    #[arg(long, default_value_t = 32)]
    image_size: usize,
    /// Images per view per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Timed steps per figure (after one warm-up step); the whole-step comparison pairs each
    /// whole step with a model-alone step and compares the medians.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    loader_threads: usize,
    /// torch intra-op threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    torch_threads: i32,
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    fashion_dir: PathBuf,
    /// N and D of the loss comparison.
    #[arg(long, default_value_t = 256)]
    loss_n: i64,
    #[arg(long, default_value_t = 8192)]
    loss_d: i64,
    /// cpu, cuda or cuda:N (default: cuda if available).
    #[arg(long)]
    device: Option<String>,
    /// Ranks: more than 1 runs the step in a real process group (Gloo on CPU, NCCL on CUDA
    /// device `rank`), one child process per rank on loopback; rank 0 prints.
    #[arg(long, default_value_t = 1)]
    world: usize,
    /// (set for the child processes) this process's rank.
    #[arg(long, hide = true)]
    rank: Option<usize>,
    /// (set for the child processes) rank 0's store port.
    #[arg(long, hide = true)]
    port: Option<u16>,
    /// ResNet width (channels of the stem and layer1; 64: torchvision).
    #[arg(long, default_value_t = 64)]
    width: i64,
    /// As `train.precision`: auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16.
    #[arg(long, default_value = "auto")]
    precision: String,
    /// As `train.memory_format`: auto (channels-last on CUDA), contiguous or channels-last.
    #[arg(long, default_value = "auto")]
    memory_format: String,
    /// Also time the PyTorch recipe's step (bench/torch_step.py: torchvision ResNet, the D x D
    /// loss, LARS as a per-parameter Python loop) on the same batch shape and threads,
    /// interleaved with bt's own step on fixed inputs, and print both medians and the ratio.
    #[arg(long)]
    against_torch: bool,
    /// Rounds of the side-by-side (each: bt's steps, then the recipe's).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Python with torch and torchvision for --against-torch.
    #[arg(long, env = "BT_PYTHON", default_value = "python3")]
    python: String,
    /// With --world N > 1: only the all-reduce overlap and scaling-efficiency rounds.
    #[arg(long)]
    scaling_only: bool,
    /// As `train.pin_cpus` (needs --torch-threads): rank r on cores r·t … r·t+t−1, and at
    /// --world > 1 Gloo's TCP I/O thread in the idle scheduling class.
    #[arg(long)]
    pin_cpus: bool,
}

/// Starts `world` copies of this command, one per rank, and waits for all of them.
fn spawn_ranks(world: usize) -> anyhow::Result<()> {
    let port = bt_common::net::free_loopback_port()?;
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let children = (0..world)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(&args)
                .args(["--rank", &r.to_string(), "--port", &port.to_string()])
                .spawn()
                .with_context(|| format!("starting rank {r}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut failed = Vec::new();
    for (r, mut c) in children.into_iter().enumerate() {
        if !c.wait()?.success() {
            failed.push(r);
        }
    }
    anyhow::ensure!(failed.is_empty(), "ranks {failed:?} failed");
    Ok(())
}

fn step(a: StepArgs) -> anyhow::Result<()> {
    if a.world > 1 && a.rank.is_none() {
        return spawn_ranks(a.world);
    }
    use bt_common::spec;
    let parse = |flag: &str, e: String| anyhow::anyhow!("--{flag}: {e}");
    let backbone: spec::Backbone = a.backbone.parse().map_err(|e| parse("backbone", e))?;
    let arch = bt_worker::model::Arch::from(backbone);
    let precision: spec::Precision = a.precision.parse().map_err(|e| parse("precision", e))?;
    let memory_format: spec::MemoryFormat = a
        .memory_format
        .parse()
        .map_err(|e| parse("memory-format", e))?;
    let mut device = parse_device(a.device.as_deref())?;
    let pin_cpus = a.pin_cpus && !device.is_cuda();
    if pin_cpus {
        // Before libtorch starts its threads: they inherit the mask.
        bt_worker::trainer::affinity::pin_rank(
            a.rank.unwrap_or(0),
            a.torch_threads.max(0) as usize,
        );
    }
    if a.torch_threads > 0 {
        tch::set_num_threads(a.torch_threads);
    }
    let rendezvous = match (a.rank, a.port) {
        (Some(rank), Some(port)) if a.world > 1 => {
            let mut rv = bt_worker::dist::Rendezvous::new(
                rank,
                a.world,
                "127.0.0.1",
                port,
                std::time::Duration::from_secs(120),
            );
            if device.is_cuda() {
                device = tch::Device::Cuda(rank);
                rv.backend = bt_worker::dist::Backend::Nccl { device_index: rank };
            }
            Some(rv)
        }
        _ => None,
    };
    let cfg = bt_worker::trainer::bench::StepBenchConfig {
        arch,
        cifar_stem: a.cifar_stem,
        width: a.width,
        projector: a.projector,
        image_size: a.image_size,
        batch: a.batch,
        steps: a.steps.max(1),
        loader_threads: a.loader_threads,
        fashion_dir: a.fashion_dir,
        loss_n: a.loss_n,
        loss_d: a.loss_d,
        device,
        precision: bt_worker::trainer::precision(precision, device),
        layout: bt_worker::trainer::memory_format(memory_format, device),
        rendezvous,
        scaling_only: a.scaling_only,
        pin_cpus,
        against_torch: a
            .against_torch
            .then(|| bt_worker::trainer::bench::AgainstTorch {
                python: a.python.clone(),
                script: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/torch_step.py"),
                rounds: a.rounds.max(1),
            }),
    };
    bt_worker::trainer::bench::run_step_bench(&cfg).context("step benchmark")
}

#[derive(clap::Args)]
struct DataArgs {
    /// Directory with the Fashion-MNIST IDX files.
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    fashion_dir: PathBuf,
    /// Comma-separated thread counts (default: 1 and all cores).
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Batch for the 28/32-pixel cases.
    #[arg(long, default_value_t = 256)]
    batch_small: usize,
    /// Batch for the 224-pixel JPEG case.
    #[arg(long, default_value_t = 32)]
    batch_large: usize,
    /// Timed steps per figure (after one warm-up step).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// JPEGs to generate for the 224 case.
    #[arg(long, default_value_t = 256)]
    jpeg_count: usize,
    /// Size of the generated JPEGs, WIDTHxHEIGHT.
    #[arg(long, default_value = "400x300")]
    jpeg_size: String,
    /// Keep/reuse the generated JPEGs here (default: a temporary folder).
    #[arg(long)]
    jpeg_dir: Option<PathBuf>,
    /// Python with torch + torchvision for the reference pipeline.
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Skip the torchvision reference.
    #[arg(long)]
    no_reference: bool,
    /// Device for the device-stage figure: cpu, cuda, cuda:N (default: cuda if available).
    #[arg(long)]
    device: Option<String>,
}

fn parse_device(s: Option<&str>) -> anyhow::Result<tch::Device> {
    Ok(match s {
        None => tch::Device::cuda_if_available(),
        Some("cpu") => tch::Device::Cpu,
        Some("cuda") => tch::Device::Cuda(0),
        Some(d) => match d.strip_prefix("cuda:") {
            Some(i) => tch::Device::Cuda(i.parse().context("--device cuda:N")?),
            None => anyhow::bail!("--device {d}: expected cpu, cuda or cuda:N"),
        },
    })
}

fn print_row(r: &BenchRow) {
    let fmt = |v: Option<f64>| {
        v.map(|v| format!("{v:>10.0}"))
            .unwrap_or_else(|| format!("{:>10}", "-"))
    };
    println!(
        "{:<32} {:<30} {:>7} {} {} {}",
        r.case,
        r.stage,
        r.threads,
        fmt(r.images_per_s),
        fmt(r.per_core()),
        r.note
    );
}

fn data(a: DataArgs) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut threads = a.threads.clone();
    if threads.is_empty() {
        threads = if cores > 1 { vec![1, cores] } else { vec![1] };
    }
    let (w, h) = a
        .jpeg_size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        .context("--jpeg-size: expected WIDTHxHEIGHT, e.g. 400x300")?;
    let cfg = DataBenchConfig {
        fashion_dir: a.fashion_dir,
        threads,
        batch_small: a.batch_small,
        batch_large: a.batch_large,
        steps: a.steps.max(1),
        jpeg_count: a.jpeg_count.max(a.batch_large),
        jpeg_size: (w, h),
        jpeg_dir: a.jpeg_dir,
        python: (!a.no_reference).then_some(a.python),
        device: parse_device(a.device.as_deref())?,
    };
    println!("# bt-bench data: {cores} cores; figures are source images/s (two views each)");
    println!(
        "{:<32} {:<30} {:>7} {:>10} {:>10} note",
        "case", "stage", "threads", "img/s", "img/s/core"
    );
    let rows = run_data_bench(&cfg, print_row).context("data benchmark")?;
    println!("# per-core speed-up of bt end-to-end over torchvision+PIL (target: at least 2x)");
    for bt in rows.iter().filter(|r| r.stage == "bt cpu end-to-end") {
        let tv = rows
            .iter()
            .find(|r| r.case == bt.case && r.threads == bt.threads && r.stage == "torchvision+PIL");
        if let (Some(x), Some(y)) = (bt.per_core(), tv.and_then(|r| r.per_core())) {
            println!("{:<32} threads {:>2}: {:.1}x", bt.case, bt.threads, x / y);
        }
    }
    Ok(())
}

fn pretrain(a: PretrainArgs) -> anyhow::Result<()> {
    if a.world > 1 && a.rank.is_none() {
        return spawn_ranks(a.world);
    }
    let text = std::fs::read_to_string(&a.spec)
        .with_context(|| format!("reading {}", a.spec.display()))?;
    let mut set = a.set.clone();
    set.push(format!("world_size={}", a.world));
    let spec = bt_common::JobSpec::from_toml_with_overrides(&text, &set)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.spec.display()))?;
    let tmp = tempfile_dir()?;
    let dir = a.work_dir.clone().unwrap_or_else(|| tmp.clone());
    let rank = a.rank.unwrap_or(0);
    let assignment = bt_proto::Assignment {
        job_id: "bench".into(),
        epoch: 1,
        rank: rank as u32,
        world_size: a.world as u32,
        master_addr: "127.0.0.1".into(),
        master_port: u32::from(a.port.unwrap_or(0)),
        store_prefix: "bench-pretrain".into(),
        spec_toml: spec.to_toml(),
        checkpoint_dir: dir.display().to_string(),
        ..Default::default()
    };
    if rank == 0 {
        println!(
            "# bt-bench pretrain {} ({} rank(s)): {:?}, width {}, cifar_stem {} (stride {}), \
             projector {:?}, batch {}, {} epoch(s), {} images",
            a.spec.display(),
            a.world,
            spec.model.backbone,
            spec.model.width,
            spec.model.cifar_stem,
            spec.model.stem_stride,
            spec.model.projector,
            spec.train.batch_size,
            spec.train.epochs,
            spec.data.limit
        );
    }
    let t0 = std::time::Instant::now();
    let mut rep = if rank == 0 {
        bt_worker::trainer::Reporter::lines()
    } else {
        bt_worker::trainer::Reporter::collecting()
    };
    let out = bt_worker::trainer::run(&assignment, a.device_kind, &mut rep);
    let _ = std::fs::remove_dir_all(&tmp);
    out.map_err(|e| anyhow::anyhow!("rank {rank}: {e}"))?;
    if rank == 0 {
        println!("# done in {:.1}s", t0.elapsed().as_secs_f64());
    }
    Ok(())
}

/// A fresh folder under the system's temporary directory.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "bt-bench-pretrain-{}-{}",
        std::process::id(),
        bt_common::now_ms()
    ));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Data(a) => data(a),
        Cmd::Step(a) => step(a),
        Cmd::Pretrain(a) => pretrain(a),
    }
}
