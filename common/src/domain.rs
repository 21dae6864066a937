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

/// Training metrics of one logged step (rank 0's view of the global batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainMetrics {
    pub step: u64,
    pub epoch: u32,
    pub total_steps: u64,
    pub loss: f64,
    /// Sum_i (1 - C_ii)^2
    pub on_diag: f64,
    /// Sum_{i != j} C_ij^2 (before lambda)
    pub off_diag: f64,
    /// lambda * off_diag
    pub off_diag_scaled: f64,
    pub mean_diag: f64,
    pub mean_abs_off_diag: f64,
    pub max_abs_off_diag: f64,
    pub lr: f64,
    pub images_per_sec: f64,
    pub skipped_images: u64,
    pub step_time_ms: f64,
}

/// One evaluation of a network (kNN monitor or linear probe).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalResult {
    pub step: u64,
    pub epoch: u32,
    /// "knn" or "linear_probe"
    pub kind: String,
    pub top1: f64,
    pub top5: f64,
    pub baseline_top1: f64,
    pub detail: String,
    pub raw_pixels_top1: f64,
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
    /// "" (none requested), "pending", "running", "done" or "failed".
    pub eval_state: String,
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
    /// "info", "warn" or "error"
    pub level: String,
    pub message: String,
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
