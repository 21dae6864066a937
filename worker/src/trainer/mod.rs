//! The trainer process (`bt-worker train`): one rank of one attempt of a job. It reads its
//! assignment (a prost `Assignment`) on stdin, trains, and writes `TrainerEvent`s to stdout.
//! Logs go to stderr; the daemon keeps them and sends the last lines with the exit report.
//!
//! This module is the trainer's plumbing: its error type and how a failure is classed
//! ([`Fault`]), the [`Outcome`] of a job, the mapping from a job spec to the library's
//! configuration, and the dispatch on the job's kind. The jobs themselves are its children, which
//! depend on this module and not on each other:
//! - [`pretrain`]: Barlow Twins pretraining (setup, then [`pretrain::train_step`] per step);
//! - [`probe`]: the linear probe of a committed checkpoint;
//! - [`bench`]: `bt-bench step`, which times the same [`pretrain::train_step`];
//! - [`report`]: where the events go.
//!
//! Exit codes: 0 finished, 2 the job's own error (bad spec or data: no restart helps),
//! 3 an infrastructure error (collective timeout, lost peer, I/O), 143 stopped by SIGTERM.
pub mod affinity;
pub mod bench;
pub mod pretrain;
pub mod probe;
mod report;

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bt_common::domain::DeviceKind;
use bt_common::spec::{self, DataSource};
use bt_common::{JobKind, JobSpec};
use bt_proto::Assignment;
use prost::Message;
use tch::Device;
use tracing::{error, info};

use crate::amp::{MemoryFormat, Precision};
use crate::data::{self, Source, SourceSpec};
use crate::loss::LossForm;
use crate::model::{Arch, ModelConfig};
use crate::Error;

pub use report::Reporter;

pub const EXIT_USER_ERROR: u8 = 2;
pub const EXIT_INFRA_ERROR: u8 = 3;
pub const EXIT_STOPPED: u8 = 143;

/// Size of the persistent gradient buckets (one all-reduce each), in the trainer and in the step
/// benchmark.
pub const GRAD_BUCKET_BYTES: usize = 25 << 20;

/// How a job's run ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Stopped,
}

/// Whose fault a failure is, decided where the error is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The job's own (bad spec, bad data, corrupt checkpoint): no restart helps.
    Job,
    /// The infrastructure's (collective timeout, lost peer, I/O): a restart may help.
    Infra,
}

#[derive(Debug, thiserror::Error)]
enum Cause {
    #[error("job spec: {0}")]
    Spec(String),
    #[error(transparent)]
    Worker(Error),
}

/// A trainer failure and its [`Fault`].
#[derive(Debug, thiserror::Error)]
#[error("{cause}")]
pub struct TrainerError {
    fault: Fault,
    cause: Cause,
}

impl TrainerError {
    /// The job spec (or the assignment's fit with it) is wrong: the job's fault.
    pub fn spec(message: impl Into<String>) -> Self {
        TrainerError {
            fault: Fault::Job,
            cause: Cause::Spec(message.into()),
        }
    }

    /// `e`, classed as the job's fault whatever its kind.
    pub fn job(e: impl Into<Error>) -> Self {
        TrainerError {
            fault: Fault::Job,
            cause: Cause::Worker(e.into()),
        }
    }

    /// `e`, classed as the infrastructure's fault whatever its kind.
    pub fn infra(e: impl Into<Error>) -> Self {
        TrainerError {
            fault: Fault::Infra,
            cause: Cause::Worker(e.into()),
        }
    }

    pub fn fault(&self) -> Fault {
        self.fault
    }

    /// Errors in the job itself (spec, data, checkpoint): restarting the attempt cannot help.
    pub fn is_user_error(&self) -> bool {
        self.fault == Fault::Job
    }
}

/// The fault of a library error, by the kind its maker gave it.
fn fault_of(e: &Error) -> Fault {
    match e {
        Error::Data { .. } | Error::Config(_) | Error::Checkpoint { .. } | Error::Eval(_) => {
            Fault::Job
        }
        Error::Torch(_) | Error::Io { .. } | Error::Dist(_) | Error::Other(_) => Fault::Infra,
    }
}

impl From<Error> for TrainerError {
    fn from(e: Error) -> Self {
        TrainerError {
            fault: fault_of(&e),
            cause: Cause::Worker(e),
        }
    }
}

impl From<tch::TchError> for TrainerError {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e).into()
    }
}

pub type TResult<T> = std::result::Result<T, TrainerError>;

/// Data source of a job spec.
pub fn source_spec(spec: &JobSpec) -> SourceSpec {
    let d = &spec.data;
    match d.source {
        DataSource::FashionMnist | DataSource::Mnist => SourceSpec::FashionMnist {
            dir: PathBuf::from(&d.path),
        },
        DataSource::ImageFolder => {
            let root = PathBuf::from(&d.path);
            let (train, test) = if root.join("train").is_dir() {
                (
                    root.join("train"),
                    Some(root.join("val")).filter(|p| p.is_dir()),
                )
            } else {
                (root, None)
            };
            SourceSpec::ImageFolder { train, test }
        }
        DataSource::Synthetic => SourceSpec::Synthetic {
            train_len: if d.limit > 0 { d.limit as usize } else { 4096 },
            test_len: 512,
            image_size: d.image_size as usize,
            num_classes: 10,
            seed: spec.train.seed,
            fail_every: 0,
        },
    }
}

/// Model config of a job spec.
pub fn model_config(spec: &JobSpec) -> ModelConfig {
    let mut cfg = ModelConfig::new(Arch::from(spec.model.backbone));
    cfg.cifar_stem = spec.model.cifar_stem;
    cfg.stem_stride = i64::from(spec.model.stem_stride);
    cfg.projector = spec.model.projector.clone();
    cfg.sync_bn = spec.model.sync_bn;
    cfg.width = i64::from(spec.model.width);
    cfg
}

/// The loss form of `train.loss_form`.
pub fn loss_form(f: spec::LossForm) -> LossForm {
    match f {
        spec::LossForm::Auto => LossForm::Auto,
        spec::LossForm::Cross => LossForm::Cross,
        spec::LossForm::Gram => LossForm::Gram,
    }
}

/// The precision of `train.precision` on `device` (auto: bf16 on CUDA, fp32 elsewhere). bf16 on a
/// CPU without native bf16 arithmetic (AVX-512 BF16 or AMX) is emulated and slower than fp32:
/// that gets a warning, once.
pub fn precision(p: spec::Precision, device: Device) -> Precision {
    let resolved = match p {
        spec::Precision::Auto if device.is_cuda() => Precision::Bf16,
        spec::Precision::Auto | spec::Precision::Fp32 => Precision::Fp32,
        spec::Precision::Bf16 => Precision::Bf16,
    };
    if resolved == Precision::Bf16 && device == Device::Cpu && !crate::amp::cpu_has_native_bf16() {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "train.precision = bf16 on a CPU without AVX-512 BF16 or AMX: bf16 is emulated \
                 there and slower than fp32; set train.precision = \"auto\" on this machine"
            )
        });
    }
    resolved
}

/// The memory format of `train.memory_format` on `device` (auto: channels-last on CUDA only).
pub fn memory_format(m: spec::MemoryFormat, device: Device) -> MemoryFormat {
    match m {
        spec::MemoryFormat::Auto if device.is_cuda() => MemoryFormat::ChannelsLast,
        spec::MemoryFormat::Auto | spec::MemoryFormat::Contiguous => MemoryFormat::Contiguous,
        spec::MemoryFormat::ChannelsLast => MemoryFormat::ChannelsLast,
    }
}

/// The first `limit` items of a source (all when 0).
pub fn limited(src: Arc<dyn Source>, limit: u64) -> Arc<dyn Source> {
    if limit == 0 || limit as usize >= src.len() {
        src
    } else {
        Arc::new(data::Subset::new(src, limit as usize))
    }
}

/// Runs the job of assignment `a` on this rank: parses its spec and dispatches on its kind.
pub fn run(a: &Assignment, device_kind: DeviceKind, rep: &mut Reporter) -> TResult<Outcome> {
    let spec =
        JobSpec::from_toml_str(&a.spec_toml).map_err(|e| TrainerError::spec(e.to_string()))?;
    let device = match device_kind {
        DeviceKind::Cuda => Device::Cuda(a.device as usize),
        DeviceKind::Cpu => Device::Cpu,
    };
    // Pinned first: libtorch's thread pool is created after, with this thread's mask.
    if spec.train.pin_cpus && device == Device::Cpu {
        affinity::pin_rank(a.rank as usize, spec.train.torch_threads as usize);
    }
    if spec.train.torch_threads > 0 {
        tch::set_num_threads(spec.train.torch_threads as i32);
    }
    match spec.kind {
        JobKind::Pretrain => pretrain::run(a, &spec, device, rep),
        JobKind::LinearProbe => probe::run(&spec, device, rep),
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

/// True once SIGTERM (or SIGINT) arrived: the loop stops at the next step boundary.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        // A file-size limit (RLIMIT_FSIZE) is a write that fails (EFBIG), like a full volume: a
        // checkpoint write that is refused, not a trainer killed by SIGXFSZ.
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Entry point of `bt-worker train`; returns the process exit code.
pub fn main(device_kind: DeviceKind) -> u8 {
    install_signal_handlers();
    let mut buf = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut buf) {
        error!(error = %e, "cannot read the assignment on stdin");
        return EXIT_INFRA_ERROR;
    }
    let a = match Assignment::decode(buf.as_slice()) {
        Ok(a) => a,
        Err(e) => {
            error!(error = %e, "the assignment on stdin is not a valid message");
            return EXIT_INFRA_ERROR;
        }
    };
    info!(job_id = %a.job_id, epoch = a.epoch, rank = a.rank, world_size = a.world_size, %device_kind, "trainer starting");
    let mut reporter = Reporter::stdout();
    match run(&a, device_kind, &mut reporter) {
        Ok(Outcome::Finished) => {
            info!("trainer finished");
            0
        }
        Ok(Outcome::Stopped) => {
            info!("trainer stopped on request");
            EXIT_STOPPED
        }
        Err(e) => {
            error!(fault = ?e.fault(), "error: {e}");
            exit_code(&e)
        }
    }
}

/// The exit code of a failed run: its fault's.
pub fn exit_code(e: &TrainerError) -> u8 {
    match e.fault() {
        Fault::Job => EXIT_USER_ERROR,
        Fault::Infra => EXIT_INFRA_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure's fault is fixed where it is made: by the constructor, or by the kind of the
    /// library error it wraps; the exit code follows from it.
    #[test]
    fn faults_are_classed_where_made() {
        let spec = TrainerError::spec("train.batch_size: too small");
        assert_eq!(spec.fault(), Fault::Job);
        assert_eq!(spec.to_string(), "job spec: train.batch_size: too small");
        assert_eq!(exit_code(&spec), EXIT_USER_ERROR);
        let data = Error::Data {
            path: "/d".into(),
            message: "empty".into(),
        };
        let ck = Error::Checkpoint {
            path: "/c".into(),
            message: "bad hash".into(),
        };
        for (e, fault) in [
            (data, Fault::Job),
            (ck, Fault::Job),
            (Error::Config("x".into()), Fault::Job),
            (Error::Eval("x".into()), Fault::Job),
            (Error::Dist("timeout".into()), Fault::Infra),
            (Error::io("/x", std::io::Error::other("disk")), Fault::Infra),
            (Error::Other("x".into()), Fault::Infra),
        ] {
            let msg = e.to_string();
            let t = TrainerError::from(e);
            assert_eq!(t.fault(), fault, "{msg}");
            assert_eq!(t.to_string(), msg);
            assert_eq!(t.is_user_error(), fault == Fault::Job);
        }
        let infra = TrainerError::infra(Error::Config("peer sent a bad config".into()));
        assert_eq!(infra.fault(), Fault::Infra);
        assert_eq!(exit_code(&infra), EXIT_INFRA_ERROR);
        assert_eq!(
            TrainerError::job(Error::Dist("x".into())).fault(),
            Fault::Job
        );
    }

    /// The spec's closed sets map to the library's settings as the library's own parsers of the
    /// same spellings do, on either device.
    #[test]
    fn spec_settings_map_like_the_library_parses_them() {
        for device in [Device::Cpu, Device::Cuda(0)] {
            for &p in spec::Precision::ALL {
                let parsed = Precision::resolve(p.as_str(), device).unwrap();
                assert_eq!(precision(p, device), parsed, "{p} on {device:?}");
            }
            for &m in spec::MemoryFormat::ALL {
                let parsed = MemoryFormat::resolve(m.as_str(), device).unwrap();
                assert_eq!(memory_format(m, device), parsed, "{m} on {device:?}");
            }
        }
        for &f in spec::LossForm::ALL {
            let parsed: LossForm = serde_json::from_value(serde_json::json!(f.as_str())).unwrap();
            assert_eq!(loss_form(f), parsed, "{f}");
        }
        for &b in spec::Backbone::ALL {
            let parsed: Arch = serde_json::from_value(serde_json::json!(b.as_str())).unwrap();
            assert_eq!(Arch::from(b), parsed, "{b}");
        }
    }
}
