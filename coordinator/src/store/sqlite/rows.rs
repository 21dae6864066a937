//! Row mapping between SQLite and the store's records.
use bt_common::domain::{AttemptOutcome, JobState, WorkerState};
use bt_common::{JobId, WorkerId};
use rusqlite::Row;

use super::super::{DeviceRecord, JobRecord, WorkerRecord};
use crate::error::{Error, Result};

pub(super) fn parse_job_id(s: &str) -> Result<JobId> {
    s.parse().map_err(Error::Corrupt)
}

pub(super) fn parse_worker_id(s: &str) -> Result<WorkerId> {
    s.parse().map_err(Error::Corrupt)
}

/// An attempt's stored outcome ("" while it runs).
pub(super) fn attempt_outcome(s: &str) -> Result<Option<AttemptOutcome>> {
    if s.is_empty() {
        return Ok(None);
    }
    AttemptOutcome::parse(s)
        .map(Some)
        .ok_or_else(|| Error::Corrupt(format!("attempt outcome {s:?}")))
}

/// A job state's stored code (the numbers the first schema used; never renumbered).
pub(super) fn job_state_code(s: JobState) -> i32 {
    match s {
        JobState::Queued => 1,
        JobState::Scheduled => 2,
        JobState::Running => 3,
        JobState::Restarting => 4,
        JobState::Succeeded => 5,
        JobState::Failed => 6,
        JobState::Cancelled => 7,
    }
}

pub(super) fn job_state(v: i32) -> Result<JobState> {
    JobState::ALL
        .into_iter()
        .find(|s| job_state_code(*s) == v)
        .ok_or_else(|| Error::Corrupt(format!("job state {v}")))
}

pub(super) fn worker_state_code(s: WorkerState) -> i32 {
    match s {
        WorkerState::Online => 1,
        WorkerState::Lost => 2,
    }
}

fn worker_state(v: i32) -> Result<WorkerState> {
    [WorkerState::Online, WorkerState::Lost]
        .into_iter()
        .find(|s| worker_state_code(*s) == v)
        .ok_or_else(|| Error::Corrupt(format!("worker state {v}")))
}

pub(super) const JOB_COLS: &str = "id, name, kind, spec_toml, priority, world_size, state, created_ms, \
    updated_ms, epoch, attempts, restarts_used, max_restarts, failure_reason, total_steps, last_metrics, owner, \
    probe_checkpoint, keep_last, keep_every_epochs, auto_eval, preemptions";

pub(super) fn job_from_row(r: &Row<'_>) -> rusqlite::Result<(String, JobRecordRaw)> {
    Ok((
        r.get(0)?,
        JobRecordRaw {
            name: r.get(1)?,
            kind: r.get(2)?,
            spec_toml: r.get(3)?,
            priority: r.get(4)?,
            world_size: r.get(5)?,
            state: r.get(6)?,
            created_ms: r.get(7)?,
            updated_ms: r.get(8)?,
            epoch: r.get::<_, i64>(9)? as u64,
            attempts: r.get(10)?,
            restarts_used: r.get(11)?,
            max_restarts: r.get(12)?,
            failure_reason: r.get(13)?,
            total_steps: r.get::<_, i64>(14)? as u64,
            last_metrics: r.get(15)?,
            owner: r.get(16)?,
            run: super::super::JobRunInfo {
                probe_checkpoint: r.get(17)?,
                keep_last: r.get(18)?,
                keep_every_epochs: r.get(19)?,
                auto_eval: r.get(20)?,
            },
            preemptions: r.get(21)?,
        },
    ))
}

pub(super) struct JobRecordRaw {
    name: String,
    kind: String,
    spec_toml: String,
    priority: i32,
    world_size: u32,
    state: i32,
    created_ms: i64,
    updated_ms: i64,
    epoch: u64,
    attempts: u32,
    restarts_used: u32,
    max_restarts: u32,
    failure_reason: String,
    total_steps: u64,
    last_metrics: Option<Vec<u8>>,
    owner: String,
    run: super::super::JobRunInfo,
    preemptions: u32,
}

pub(super) fn job_finish((id, r): (String, JobRecordRaw)) -> Result<JobRecord> {
    let last_metrics = match r.last_metrics {
        Some(b) => Some(super::stored::decode_metrics(
            &b,
            &format!("last_metrics of job {id}"),
        )?),
        None => None,
    };
    Ok(JobRecord {
        id: parse_job_id(&id)?,
        name: r.name,
        kind: bt_common::domain::parse_job_kind(&r.kind)
            .ok_or_else(|| Error::Corrupt(format!("kind {:?} of job {id}", r.kind)))?,
        spec_toml: r.spec_toml,
        priority: r.priority,
        world_size: r.world_size,
        state: job_state(r.state)?,
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
        epoch: r.epoch,
        attempts: r.attempts,
        restarts_used: r.restarts_used,
        max_restarts: r.max_restarts,
        preemptions: r.preemptions,
        failure_reason: r.failure_reason,
        total_steps: r.total_steps,
        last_metrics,
        owner: r.owner,
        run: r.run,
    })
}

type WorkerRaw = (String, String, String, String, u32, u32, i32, i64, String);

pub(super) fn worker_from_row(r: &Row<'_>) -> rusqlite::Result<WorkerRaw> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

pub(super) fn worker_finish(w: WorkerRaw) -> Result<WorkerRecord> {
    let devices: Vec<DeviceRecord> = serde_json::from_str(&w.3)
        .map_err(|e| Error::Corrupt(format!("devices of worker {}: {e}", w.0)))?;
    Ok(WorkerRecord {
        id: parse_worker_id(&w.0)?,
        name: w.1,
        host: w.2,
        devices,
        port_start: w.4,
        port_end: w.5,
        state: worker_state(w.6)?,
        last_seen_ms: w.7,
        drained: w.8,
    })
}

pub(super) const WORKER_COLS: &str =
    "id, name, host, devices, port_start, port_end, state, last_seen_ms, drained";
