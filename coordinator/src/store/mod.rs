//! Durable coordinator state behind a `Store` trait. Every state transition runs inside one
//! transaction (`Store::begin` → `Tx` → `Tx::commit`); dropping a `Tx` without committing rolls back.
mod sqlite;

pub use sqlite::SqliteStore;

use bt_common::domain::{
    AttemptOutcome, DeviceKind, JobEvent, JobState, LogLine, TrainMetrics, WorkerState,
};
use bt_common::JobKind;
use bt_common::{JobId, WorkerId};
use serde::{Deserialize, Serialize};

use crate::error::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub name: String,
    pub kind: JobKind,
    pub spec_toml: String,
    pub priority: i32,
    pub world_size: u32,
    pub state: JobState,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// The current (or last) attempt's fencing epoch; 0 before the first attempt.
    pub epoch: u64,
    pub attempts: u32,
    /// Restarts after infrastructure failures (the budget `max_restarts` bounds).
    pub restarts_used: u32,
    pub max_restarts: u32,
    /// Attempts ended by a preemption (requeued without spending the restart budget).
    pub preemptions: u32,
    pub failure_reason: String,
    pub total_steps: u64,
    pub last_metrics: Option<TrainMetrics>,
    /// Who submitted it (a token's name; empty with authentication off).
    pub owner: String,
    /// What the coordinator needs from the spec at run time, taken from it once at insertion.
    pub run: JobRunInfo,
}

/// The parts of a job's spec the coordinator acts on while the job runs (stored as columns, so
/// no hot path parses the spec again).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobRunInfo {
    /// The checkpoint a linear-probe job evaluates ("" for other kinds).
    pub probe_checkpoint: String,
    /// Retention: keep the last N checkpoints (0: all) ...
    pub keep_last: u32,
    /// ... and the newest of every K epochs (0: none).
    pub keep_every_epochs: u32,
    /// Queue a linear probe for every committed checkpoint.
    pub auto_eval: bool,
}

impl JobRunInfo {
    pub fn of(spec: &bt_common::JobSpec) -> Self {
        JobRunInfo {
            probe_checkpoint: match spec.kind {
                bt_common::JobKind::LinearProbe => spec.eval.checkpoint.clone(),
                bt_common::JobKind::Pretrain => String::new(),
            },
            keep_last: spec.checkpoint.keep_last,
            keep_every_epochs: spec.checkpoint.keep_every_epochs,
            auto_eval: spec.checkpoint.auto_eval,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RankRecord {
    pub rank: u32,
    pub worker_id: WorkerId,
    pub device: u32,
    pub started_ms: Option<i64>,
    pub exited_ms: Option<i64>,
    pub exit_success: Option<bool>,
    pub exit_info: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    pub job_id: JobId,
    pub epoch: u64,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    /// None while the attempt runs.
    pub outcome: Option<AttemptOutcome>,
    pub reason: String,
    pub resume_from: String,
    pub master_addr: String,
    pub master_port: u32,
    pub ranks: Vec<RankRecord>,
}

impl RankRecord {
    /// Records that this rank ended without success at `now`, and why.
    pub fn mark_failed(&mut self, now: i64, why: impl Into<String>) {
        self.exited_ms = Some(now);
        self.exit_success = Some(false);
        self.exit_info = why.into();
    }
}

impl AttemptRecord {
    pub fn is_active(&self) -> bool {
        self.ended_ms.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub index: u32,
    pub kind: DeviceKind,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub name: String,
    pub host: String,
    pub devices: Vec<DeviceRecord>,
    pub port_start: u32,
    pub port_end: u32,
    pub state: WorkerState,
    pub last_seen_ms: i64,
    /// Why an operator drained the worker; empty: it takes work.
    pub drained: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRecord {
    pub job_id: JobId,
    pub step: u64,
    /// Training epoch at which the checkpoint was written.
    pub epoch: u32,
    pub path: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub created_ms: i64,
    pub deleted: bool,
}

/// One transaction. Reads see the transaction's own writes.
pub trait Tx {
    /// The next value of the global fencing counter (unique across jobs, never reused).
    fn next_epoch(&mut self) -> Result<u64>;
    fn get_job(&mut self, id: JobId) -> Result<Option<JobRecord>>;
    fn put_job(&mut self, job: &JobRecord) -> Result<()>;
    /// Jobs in any of `states` (all when empty), oldest first.
    fn list_jobs(&mut self, states: &[JobState]) -> Result<Vec<JobRecord>>;
    /// Linear-probe jobs evaluating any of `checkpoints`, oldest first (an indexed lookup).
    fn probe_jobs(&mut self, checkpoints: &[String]) -> Result<Vec<JobRecord>>;
    fn get_attempt(&mut self, job_id: JobId, epoch: u64) -> Result<Option<AttemptRecord>>;
    fn put_attempt(&mut self, attempt: &AttemptRecord) -> Result<()>;
    /// Attempts that are active or still have a rank that has not exited.
    fn open_attempts(&mut self) -> Result<Vec<AttemptRecord>>;
    fn get_worker(&mut self, id: WorkerId) -> Result<Option<WorkerRecord>>;
    fn get_worker_by_name(&mut self, name: &str) -> Result<Option<WorkerRecord>>;
    fn put_worker(&mut self, worker: &WorkerRecord) -> Result<()>;
    /// All workers, by name.
    fn list_workers(&mut self) -> Result<Vec<WorkerRecord>>;
    fn put_checkpoint(&mut self, ckpt: &CheckpointRecord) -> Result<()>;
    /// Checkpoints of a job by step (ascending).
    fn list_checkpoints(
        &mut self,
        job_id: JobId,
        include_deleted: bool,
    ) -> Result<Vec<CheckpointRecord>>;
    /// Persists an event and sets its `seq`.
    fn append_event(&mut self, event: &mut JobEvent) -> Result<()>;
    /// Events of a job by seq: state changes always, others with `step >= from_step`.
    /// With `only_kind`, just that kind ("state", "metrics", "eval", "checkpoint", "notice").
    fn list_events(
        &mut self,
        job_id: JobId,
        from_step: u64,
        only_kind: Option<&str>,
    ) -> Result<Vec<JobEvent>>;
    /// How many events of `kind` a job has.
    fn count_events(&mut self, job_id: JobId, kind: &str) -> Result<u64>;
    /// Deletes every other one of the job's `oldest` oldest events of `kind` ("metrics",
    /// "picture"); returns how many went.
    fn thin_events(&mut self, job_id: JobId, kind: &str, oldest: u64) -> Result<u64>;
    /// Persists a rank's log lines (in order, one `time_ms`); returns the last line's `seq`.
    fn append_logs(
        &mut self,
        job_id: JobId,
        epoch: u64,
        rank: u32,
        time_ms: i64,
        lines: &[String],
    ) -> Result<u64>;
    /// A job's log lines with `seq > after` (of `ranks` only, unless empty), in order: the first
    /// `limit`, or with `tail` the last `tail` of them.
    fn list_logs(&mut self, job_id: JobId, q: &LogQuery) -> Result<Vec<LogLine>>;
    /// How many log lines a job has.
    fn count_logs(&mut self, job_id: JobId) -> Result<u64>;
    /// Deletes a job's `n` oldest log lines; returns how many went.
    fn drop_oldest_logs(&mut self, job_id: JobId, n: u64) -> Result<u64>;
    /// Removes a job and everything filed under it (attempts, ranks, events, checkpoint records,
    /// log lines).
    fn delete_job(&mut self, job_id: JobId) -> Result<Deleted>;
    /// History housekeeping: for every finished job last updated before `before_ms`, deletes its
    /// metric and picture events and its log lines (state changes, evaluations, checkpoints and
    /// notices stay); returns (jobs touched, rows deleted).
    fn prune_finished_history(&mut self, before_ms: i64) -> Result<(u64, u64)>;
    fn commit(self: Box<Self>) -> Result<()>;
}

/// Which log lines `Tx::list_logs` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogQuery {
    /// Only these ranks (empty: all).
    pub ranks: Vec<u32>,
    /// Lines after this `seq`.
    pub after: u64,
    /// The last `tail` lines (0: from the first).
    pub tail: u64,
    /// At most this many (0: no bound).
    pub limit: u64,
}

/// Rows `Tx::delete_job` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub events: u64,
    pub checkpoints: u64,
    pub log_lines: u64,
}

pub trait Store: Send {
    fn begin(&mut self) -> Result<Box<dyn Tx + '_>>;
}
