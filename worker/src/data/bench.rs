//! Data-pipeline benchmark behind `bt-bench data`: two augmented views per image, measured for
//! Fashion-MNIST IDX at 28 and 32 pixels and for JPEG files at 224, against torchvision + PIL doing
//! the same augmentations in a torch `DataLoader` (the `bench_torchvision.py` script, run with the
//! given Python).
//!
//! Stages reported per case and thread count:
//! - `bt cpu stage`: the [`Loader`] alone (decode, crop, resize, flip → u8), what the training step
//!   waits on when the colour stage runs on a GPU;
//! - `bt cpu end-to-end`: the loader with `colour_on_cpu` (its threads also run the fused colour
//!   stage: jitter, grayscale, blur, solarize, normalize), as a CPU training job runs it; this is
//!   the figure comparable to torchvision's full CPU pipeline;
//! - `bt cpu end-to-end (tensor ops)`: the loader plus [`TwoViewBatch::views`] on the CPU (the
//!   batched tensor colour stage with `threads` intra-op threads), for comparison;
//! - `bt device stage`: `views` alone on the requested device, once per case (when it is not the CPU);
//! - `torchvision+PIL`: the reference pipeline with `threads` worker processes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use tch::Device;

use super::augment::AugmentConfig;
use super::loader::{Loader, LoaderConfig, TwoViewBatch};
use super::source::{IdxSource, ImageFolderSource, Source, Split};
use crate::error::{Error, Result};

/// The reference pipeline, run by `python3 - <args>`.
pub const TORCHVISION_SCRIPT: &str = include_str!("bench_torchvision.py");

/// Settings of `bt-bench data`.
#[derive(Clone, Debug)]
pub struct DataBenchConfig {
    /// Directory with the Fashion-MNIST IDX files.
    pub fashion_dir: PathBuf,
    /// Thread counts to measure (loader threads = torchvision workers = torch intra-op threads).
    pub threads: Vec<usize>,
    /// Per-step batch for the 28/32-pixel cases.
    pub batch_small: usize,
    /// Per-step batch for the 224-pixel JPEG case.
    pub batch_large: usize,
    /// Timed steps per measurement (after one warm-up step).
    pub steps: usize,
    /// Number of JPEGs to generate (Fashion-MNIST upscaled to `jpeg_size`, tinted per class).
    pub jpeg_count: usize,
    /// (width, height) of the generated JPEGs.
    pub jpeg_size: (u32, u32),
    /// Where to keep the JPEGs (reused when it already holds images); a temporary folder if `None`.
    pub jpeg_dir: Option<PathBuf>,
    /// Python with torch and torchvision for the reference; `None` skips it.
    pub python: Option<PathBuf>,
    /// Device of the device-stage measurement.
    pub device: Device,
}

/// One measured figure.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub case: String,
    pub stage: String,
    pub threads: usize,
    /// Source images per second (each yields two views); `None` when the stage could not run.
    pub images_per_s: Option<f64>,
    pub note: String,
}

impl BenchRow {
    pub fn per_core(&self) -> Option<f64> {
        self.images_per_s.map(|r| r / self.threads.max(1) as f64)
    }
}

struct Case {
    name: String,
    source: Arc<dyn Source>,
    augment: AugmentConfig,
    batch: usize,
    py_kind: &'static str,
    py_path: PathBuf,
}

/// Writes `count` JPEGs `<dir>/<class>/<i>.jpg` from Fashion-MNIST images, upscaled (bilinear) to
/// `size` and tinted per class.
pub fn generate_jpegs(
    fashion: &IdxSource,
    dir: &Path,
    count: usize,
    size: (u32, u32),
) -> Result<()> {
    const TINTS: [[f32; 3]; 10] = [
        [1.0, 0.6, 0.6],
        [0.6, 1.0, 0.6],
        [0.6, 0.6, 1.0],
        [1.0, 1.0, 0.5],
        [0.5, 1.0, 1.0],
        [1.0, 0.5, 1.0],
        [0.9, 0.7, 0.5],
        [0.5, 0.7, 0.9],
        [0.8, 0.8, 0.8],
        [1.0, 0.8, 0.6],
    ];
    for i in 0..count.min(fashion.len()) {
        let img = fashion.get(i)?;
        let class = fashion.label(i).unwrap_or(0) as usize % 10;
        let small = image::RgbImage::from_fn(img.width as u32, img.height as u32, |x, y| {
            let p = img.pixel(y as usize, x as usize);
            let t = TINTS[class];
            image::Rgb([
                (p[0] as f32 * t[0]) as u8,
                (p[1] as f32 * t[1]) as u8,
                (p[2] as f32 * t[2] + 20.0).min(255.0) as u8,
            ])
        });
        let big = image::imageops::resize(&small, size.0, size.1, image::imageops::Triangle);
        let cdir = dir.join(format!("class{class}"));
        std::fs::create_dir_all(&cdir).map_err(|e| Error::io(&cdir, e))?;
        let path = cdir.join(format!("{i:05}.jpg"));
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = std::io::BufWriter::new(file);
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut w, 90)
            .encode_image(&big)
            .map_err(|e| Error::Data {
                path: path.clone(),
                message: format!("cannot encode JPEG: {e}"),
            })?;
    }
    Ok(())
}

/// What `loader_rate` measures.
#[derive(Clone, Copy, PartialEq)]
enum Stage {
    /// Loader only: u8 views after crop/resize/flip.
    LoaderOnly,
    /// Loader with the fused colour stage on its threads.
    Fused,
    /// Loader, then the batched tensor colour stage on the CPU.
    TensorOps,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::LoaderOnly => "bt cpu stage",
            Stage::Fused => "bt cpu end-to-end",
            Stage::TensorOps => "bt cpu end-to-end (tensor ops)",
        }
    }
}

fn loader_rate(case: &Case, threads: usize, steps: usize, stage: Stage) -> Result<f64> {
    let end_to_end = stage == Stage::TensorOps;
    let cfg = LoaderConfig {
        per_rank_batch: case.batch,
        rank: 0,
        world_size: 1,
        seed: 1,
        threads,
        prefetch: 2,
        augment: case.augment.clone(),
        drop_last: true,
        colour_on_cpu: stage == Stage::Fused,
    };
    tch::set_num_threads(threads as i32);
    let mut loader = Loader::new(case.source.clone(), cfg, 0)?;
    let warm = loader.next_batch()?;
    if end_to_end {
        let _ = warm.views(Device::Cpu)?;
    }
    let t0 = Instant::now();
    let mut n = 0;
    for _ in 0..steps {
        let b = loader.next_batch()?;
        if end_to_end {
            let (va, vb) = b.views(Device::Cpu)?;
            debug_assert!(va.numel() > 0 && vb.numel() > 0);
        }
        n += b.len();
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

fn device_rate(batch: &TwoViewBatch, device: Device, steps: usize) -> Result<f64> {
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let _ = batch.views(device)?;
    sync();
    let t0 = Instant::now();
    for _ in 0..steps {
        let _ = batch.views(device)?;
    }
    sync();
    Ok((steps * batch.len()) as f64 / t0.elapsed().as_secs_f64())
}

fn torchvision_rate(
    python: &Path,
    script: &Path,
    case: &Case,
    threads: usize,
    steps: usize,
) -> std::result::Result<f64, String> {
    let out = Command::new(python)
        .arg(script)
        .args(["--kind", case.py_kind, "--path"])
        .arg(&case.py_path)
        .args(["--crop", &case.augment.crop_size.to_string()])
        .args(["--blur", if case.augment.blur { "1" } else { "0" }])
        .args(["--workers", &threads.to_string()])
        .args(["--batch", &case.batch.to_string()])
        .args(["--steps", &steps.to_string()])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").to_string();
        return Err(format!("reference failed ({}): {last}", out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("bad reference output {line:?}: {e}"))?;
    v["images_per_s"]
        .as_f64()
        .ok_or_else(|| format!("no images_per_s in {line:?}"))
}

/// Runs every measurement, calling `report` as each figure is ready, and returns them all.
pub fn run_data_bench(
    cfg: &DataBenchConfig,
    mut report: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>> {
    let fashion = IdxSource::open_dir(&cfg.fashion_dir, Split::Train)?;
    let scratch = std::env::temp_dir().join(format!("bt-bench-{}", std::process::id()));
    let jpeg_dir = cfg.jpeg_dir.clone().unwrap_or_else(|| scratch.join("jpeg"));
    let have_jpegs = ImageFolderSource::open(&jpeg_dir)
        .map(|s| s.len() >= cfg.jpeg_count)
        .unwrap_or(false);
    if !have_jpegs {
        generate_jpegs(&fashion, &jpeg_dir, cfg.jpeg_count, cfg.jpeg_size)?;
    }
    let fashion: Arc<dyn Source> = Arc::new(fashion);
    let jpegs: Arc<dyn Source> = Arc::new(ImageFolderSource::open(&jpeg_dir)?);
    let (w, h) = cfg.jpeg_size;
    let cases = vec![
        Case {
            name: "fashion-mnist idx 28 -> 28".into(),
            source: fashion.clone(),
            augment: AugmentConfig::small(28),
            batch: cfg.batch_small,
            py_kind: "idx",
            py_path: cfg.fashion_dir.clone(),
        },
        Case {
            name: "fashion-mnist idx 28 -> 32".into(),
            source: fashion,
            augment: AugmentConfig::small(32),
            batch: cfg.batch_small,
            py_kind: "idx",
            py_path: cfg.fashion_dir.clone(),
        },
        Case {
            name: format!("jpeg {w}x{h} -> 224 (blur)"),
            source: jpegs,
            augment: AugmentConfig::imagenet(),
            batch: cfg.batch_large,
            py_kind: "jpeg",
            py_path: jpeg_dir.clone(),
        },
    ];
    let script = scratch.join("bench_torchvision.py");
    if cfg.python.is_some() {
        std::fs::create_dir_all(&scratch).map_err(|e| Error::io(&scratch, e))?;
        std::fs::write(&script, TORCHVISION_SCRIPT).map_err(|e| Error::io(&script, e))?;
    }
    let mut rows = Vec::new();
    let mut push = |row: BenchRow, rows: &mut Vec<BenchRow>| {
        report(&row);
        rows.push(row);
    };
    for case in &cases {
        for &t in &cfg.threads {
            for stage in [Stage::LoaderOnly, Stage::Fused, Stage::TensorOps] {
                let r = loader_rate(case, t, cfg.steps, stage)?;
                push(
                    BenchRow {
                        case: case.name.clone(),
                        stage: stage.label().into(),
                        threads: t,
                        images_per_s: Some(r),
                        note: String::new(),
                    },
                    &mut rows,
                );
            }
            if let Some(py) = &cfg.python {
                let (rate, note) = match torchvision_rate(py, &script, case, t, cfg.steps) {
                    Ok(r) => (Some(r), String::new()),
                    Err(e) => (None, e),
                };
                push(
                    BenchRow {
                        case: case.name.clone(),
                        stage: "torchvision+PIL".into(),
                        threads: t,
                        images_per_s: rate,
                        note,
                    },
                    &mut rows,
                );
            }
        }
        if cfg.device != Device::Cpu {
            let lc = LoaderConfig {
                threads: cfg.threads.iter().copied().max().unwrap_or(1),
                ..LoaderConfig::new(case.batch, 1, case.augment.clone())
            };
            let batch = Loader::new(case.source.clone(), lc, 0)?.next_batch()?;
            let r = device_rate(&batch, cfg.device, cfg.steps)?;
            push(
                BenchRow {
                    case: case.name.clone(),
                    stage: format!("bt device stage ({:?})", cfg.device),
                    threads: 1,
                    images_per_s: Some(r),
                    note: "colour/blur/solarize/normalize only".into(),
                },
                &mut rows,
            );
        }
    }
    // Only our own temporary files live here (a `jpeg_dir` given by the user is kept).
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(rows)
}
