//! The coordinator's domain model, apart from the wire: job and worker states, training metrics,
//! evaluation results, checkpoints and job events. `bt-proto` converts between these and its
//! generated messages (`bt_proto::convert`); nothing here depends on the protocol, so a proto edit
//! is never a silent change of what the coordinator stores.
use serde::{Deserialize, Serialize};

use crate::JobId;

/// The job state machine: `Queued → Scheduled → Running → Succeeded | Failed | Cancelled`, with
/// `Restarting` between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Scheduled,
    Running,
    Restarting,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Scheduled,
        JobState::Running,
        JobState::Restarting,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// A job in a terminal state never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Lower-case display name ("running").
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Restarting => "restarting",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerState {
    Online,
    Lost,
}

/// A closed set of names: each variant has one lower-case name (its text on the wire and on
/// disk), and parsing accepts exactly those.
macro_rules! named {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vm])* $v,)*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $($name::$v => $s,)*
                }
            }

            /// The variant named `s`, if any.
            pub fn parse(s: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|v| v.name() == s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            /// Exactly one of the names; the error lists them.
            fn from_str(s: &str) -> Result<Self, String> {
                Self::parse(s).ok_or_else(|| {
                    let names: Vec<&str> = Self::ALL.iter().map(|v| v.name()).collect();
                    format!("unknown value {s:?} (one of: {})", names.join(", "))
                })
            }
        }
    };
}

named! {
    /// How an attempt ended.
    AttemptOutcome {
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
        /// A rank stopped on request (its node drained or terminated) after saving its state:
        /// the job requeues without spending its restart budget.
        Preempted = "preempted",
    }
}

named! {
    /// What a device slot is.
    DeviceKind {
        Cpu = "cpu",
        Cuda = "cuda",
    }
}

named! {
    /// Which evaluation produced a result.
    EvalKind {
        /// The kNN monitor (during or at the end of pretraining).
        Knn = "knn",
        /// A linear probe on a frozen checkpoint.
        LinearProbe = "linear_probe",
        /// One epoch of a linear probe (progress).
        LinearProbeEpoch = "linear_probe_epoch",
        /// One epoch of the probe's default-init baseline (progress).
        LinearProbeBaselineEpoch = "linear_probe_baseline_epoch",
        /// One epoch of the probe's raw-pixel baseline (progress).
        LinearProbeRawPixelsEpoch = "linear_probe_raw_pixels_epoch",
    }
}

named! {
    /// Where the evaluation of a checkpoint stands (the newest probe job pointed at it decides).
    CheckpointEvalState {
        Pending = "pending",
        Running = "running",
        Done = "done",
        Failed = "failed",
    }
}

named! {
    /// How much a notice matters.
    NoticeLevel {
        Info = "info",
        Warn = "warn",
        Error = "error",
    }
}

/// A job kind's name (the spec's `kind`, as jobs are listed and stored).
pub fn job_kind_name(k: crate::JobKind) -> &'static str {
    match k {
        crate::JobKind::Pretrain => "pretrain",
        crate::JobKind::LinearProbe => "linear_probe",
    }
}

/// The job kind named `s`, if any.
pub fn parse_job_kind(s: &str) -> Option<crate::JobKind> {
    [crate::JobKind::Pretrain, crate::JobKind::LinearProbe]
        .into_iter()
        .find(|k| job_kind_name(*k) == s)
}

/// Serde for the `f64` figures of the domain types: a finite value is a JSON number; NaN and the
/// infinities (a diverged loss is worth keeping) are the strings "NaN", "inf" and "-inf", which
/// JSON numbers cannot hold. Reading also takes `null` (what a plain `f64` field wrote for them)
/// as NaN.
pub mod float {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any {
            Num(f64),
            Text(String),
            Null(()),
        }
        match Option::<Any>::deserialize(d)? {
            Some(Any::Num(v)) => Ok(v),
            Some(Any::Text(t)) => match t.as_str() {
                "NaN" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                other => Err(serde::de::Error::custom(format!(
                    "expected a number, \"NaN\", \"inf\" or \"-inf\", found {other:?}"
                ))),
            },
            Some(Any::Null(())) | None => Ok(f64::NAN),
        }
    }
}

/// Training metrics of one logged step (rank 0's view of the global batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainMetrics {
    pub step: u64,
    pub epoch: u32,
    pub total_steps: u64,
    #[serde(with = "float")]
    pub loss: f64,
    /// Sum_i (1 - C_ii)^2
    #[serde(with = "float")]
    pub on_diag: f64,
    /// Sum_{i != j} C_ij^2 (before lambda)
    #[serde(with = "float")]
    pub off_diag: f64,
    /// lambda * off_diag
    #[serde(with = "float")]
    pub off_diag_scaled: f64,
    #[serde(with = "float")]
    pub mean_diag: f64,
    #[serde(with = "float")]
    pub mean_abs_off_diag: f64,
    #[serde(with = "float")]
    pub max_abs_off_diag: f64,
    #[serde(with = "float")]
    pub lr: f64,
    #[serde(with = "float")]
    pub images_per_sec: f64,
    pub skipped_images: u64,
    #[serde(with = "float")]
    pub step_time_ms: f64,
}

/// One evaluation of a network (kNN monitor or linear probe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub step: u64,
    pub epoch: u32,
    pub kind: EvalKind,
    #[serde(with = "float")]
    pub top1: f64,
    #[serde(with = "float")]
    pub top5: f64,
    #[serde(with = "float")]
    pub baseline_top1: f64,
    pub detail: String,
    #[serde(with = "float")]
    pub raw_pixels_top1: f64,
    #[serde(with = "float")]
    pub margin: f64,
    pub has_baselines: bool,
}

/// A committed checkpoint, with the state of its evaluation when one was requested.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckpointInfo {
    pub job_id: String,
    pub step: u64,
    pub epoch: u32,
    pub path: String,
    pub created_at_ms: i64,
    pub size_bytes: u64,
    pub sha256: String,
    /// None: no evaluation was requested.
    pub eval_state: Option<CheckpointEvalState>,
    pub eval_job_id: String,
    pub eval: Option<EvalResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateChange {
    pub state: JobState,
    pub reason: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    pub level: NoticeLevel,
    pub message: String,
}

/// The downsampled |C| of one logged step: `side`² cells (row-major), each the mean |C_ij| of
/// its block quantized to 0..=255 (cell / 255, clamped to [0, 1]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorrelationPicture {
    pub step: u64,
    pub side: u32,
    pub cells: Vec<u8>,
    #[serde(with = "float")]
    pub mean_diag: f64,
    #[serde(with = "float")]
    pub mean_abs_off_diag: f64,
}

impl CorrelationPicture {
    /// Largest side accepted from a peer (the trainer sends 64).
    pub const MAX_SIDE: u32 = 256;

    /// Quantizes `values` (`side`², row-major |C| block means) into a picture.
    pub fn quantize(
        step: u64,
        side: u32,
        values: &[f32],
        mean_diag: f64,
        mean_abs_off_diag: f64,
    ) -> CorrelationPicture {
        let cells = values
            .iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        CorrelationPicture {
            step,
            side,
            cells,
            mean_diag,
            mean_abs_off_diag,
        }
    }

    /// Why the picture is not one: a side out of 1..=MAX_SIDE or a cell count other than side².
    pub fn check(&self) -> Result<(), String> {
        if self.side == 0 || self.side > Self::MAX_SIDE {
            return Err(format!(
                "side {} is not in 1..={}",
                self.side,
                Self::MAX_SIDE
            ));
        }
        let want = (self.side as usize).pow(2);
        if self.cells.len() != want {
            return Err(format!(
                "{} cells for side {} (want {want})",
                self.cells.len(),
                self.side
            ));
        }
        Ok(())
    }
}

/// One line a trainer wrote to stderr, as the coordinator keeps it; `seq` (set by the store)
/// increases over the whole log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub seq: u64,
    pub job_id: JobId,
    pub epoch: u64,
    pub rank: u32,
    pub time_ms: i64,
    pub text: String,
}

impl LogLine {
    /// Longest line kept (bytes); a longer one is cut at a character boundary and marked.
    pub const MAX_BYTES: usize = 4096;

    /// `text` within [`LogLine::MAX_BYTES`], without its line ending.
    pub fn bounded(text: &str) -> String {
        let text = text.trim_end_matches(['\n', '\r']);
        if text.len() <= Self::MAX_BYTES {
            return text.to_string();
        }
        let mut end = Self::MAX_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… [cut at {} bytes]", &text[..end], Self::MAX_BYTES)
    }
}

/// What happened to a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    State(StateChange),
    Metrics(TrainMetrics),
    Eval(EvalResult),
    Checkpoint(CheckpointInfo),
    Notice(Notice),
    Picture(CorrelationPicture),
}

impl EventKind {
    /// The kind's name, as the store files it ("state", "metrics", ...).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::State(_) => "state",
            EventKind::Metrics(_) => "metrics",
            EventKind::Eval(_) => "eval",
            EventKind::Checkpoint(_) => "checkpoint",
            EventKind::Notice(_) => "notice",
            EventKind::Picture(_) => "picture",
        }
    }
}

/// One persisted event of a job's history; `seq` orders a job's events (set by the store).
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    pub seq: u64,
    pub time_ms: i64,
    pub step: u64,
    pub job_id: JobId,
    pub kind: EventKind,
}

impl JobEvent {
    /// A state change into a terminal state: the last event of a job.
    pub fn is_terminal(&self) -> bool {
        matches!(&self.kind, EventKind::State(s) if s.state.is_terminal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_figures_survive_json_and_null_reads_as_nan() {
        let m = TrainMetrics {
            step: 3,
            loss: f64::NAN,
            on_diag: f64::INFINITY,
            off_diag: f64::NEG_INFINITY,
            lr: 0.5,
            ..Default::default()
        };
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains(r#""loss":"NaN""#), "{text}");
        let back: TrainMetrics = serde_json::from_str(&text).unwrap();
        assert!(back.loss.is_nan());
        assert_eq!(back.on_diag, f64::INFINITY);
        assert_eq!(back.off_diag, f64::NEG_INFINITY);
        assert_eq!((back.step, back.lr), (3, 0.5));
        // What a plain f64 field wrote for NaN before: null.
        let old: TrainMetrics = serde_json::from_str(r#"{"step":1,"loss":null}"#).unwrap();
        assert!(old.loss.is_nan());
        assert!(serde_json::from_str::<TrainMetrics>(r#"{"loss":"fast"}"#).is_err());
    }
}
