//! Jobs: submission, cancellation, the state machine's transitions, scheduling passes, views.
use std::collections::{HashMap, HashSet};

use bt_common::domain::{
    AttemptOutcome, CheckpointEvalState, CheckpointInfo, EvalKind, EvalResult, EventKind, JobState,
    StateChange, WorkerState,
};
use bt_common::{now_ms, JobId, JobSpec, WorkerId};
use bt_proto::{Assignment, CancelAssignment};
use tracing::{info, warn};

use super::{emit, Core, Effects, Runtime};
use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use crate::scheduler::{plan_with_waits, FreeWorker, QueuedJob};
use crate::store::{AttemptRecord, JobRecord, RankRecord, Tx, WorkerRecord};
use crate::view::{JobView, Placement};

pub(super) fn not_found(id: JobId) -> Error {
    Error::NotFound {
        what: "job",
        id: id.to_string(),
    }
}

/// Moves a job to `state`, persisting the job and a `StateChange` event in the caller's transaction.
pub(crate) fn set_state(
    tx: &mut dyn Tx,
    fx: &mut Effects,
    job: &mut JobRecord,
    state: JobState,
    reason: &str,
) -> Result<()> {
    let from = job.state;
    job.state = state;
    job.updated_ms = now_ms();
    tx.put_job(job)?;
    let step = job.last_metrics.as_ref().map_or(0, |m| m.step);
    emit(
        tx,
        fx,
        job.id,
        step,
        EventKind::State(StateChange {
            state,
            reason: reason.to_string(),
            epoch: job.epoch,
        }),
    )?;
    info!(job_id = %job.id, from = from.name(), to = state.name(), epoch = job.epoch, reason, "job state");
    Ok(())
}

/// Sends a `CancelAssignment` to every worker that still has a running rank of `attempt`.
pub(crate) fn cancel_ranks(fx: &mut Effects, attempt: &AttemptRecord, reason: &str) {
    let mut seen = HashSet::new();
    for r in attempt.ranks.iter().filter(|r| r.exited_ms.is_none()) {
        if seen.insert(r.worker_id) {
            fx.messages.push((
                r.worker_id,
                CancelAssignment {
                    job_id: attempt.job_id.to_string(),
                    epoch: attempt.epoch,
                    reason: reason.to_string(),
                }
                .into(),
            ));
        }
    }
}

/// Earlier checkpoints an assignment names for a resume whose newest checkpoint is corrupt.
const RESUME_FALLBACKS: usize = 4;

/// How the reason of an attempt ended by a preemption begins (for people: code reads the
/// attempt's outcome, `AttemptOutcome::Preempted`).
pub(crate) const PREEMPTED: &str = "preempted: ";

/// Ends the job's current attempt as preempted (a rank stopped on request after saving its
/// state: its node is draining or terminating): the surviving ranks are cancelled and the job
/// goes RESTARTING → QUEUED, counted in `preemptions`, its restart budget untouched.
pub(crate) fn preempt_attempt(
    tx: &mut dyn Tx,
    fx: &mut Effects,
    job: &mut JobRecord,
    attempt: &mut AttemptRecord,
    reason: String,
) -> Result<()> {
    attempt.ended_ms = Some(now_ms());
    attempt.outcome = Some(AttemptOutcome::Preempted);
    attempt.reason = format!("{PREEMPTED}{reason}");
    cancel_ranks(fx, attempt, &format!("attempt preempted: {reason}"));
    tx.put_attempt(attempt)?;
    fx.schedule = true;
    if job.state.is_terminal() || job.epoch != attempt.epoch {
        return Ok(());
    }
    job.preemptions += 1;
    info!(job_id = %job.id, epoch = attempt.epoch, preemptions = job.preemptions,
          reason = %reason, "attempt preempted");
    set_state(
        tx,
        fx,
        job,
        JobState::Restarting,
        &format!("{PREEMPTED}{reason}"),
    )?;
    let why = format!(
        "requeued after preemption {} (restart budget untouched: {} of {} used)",
        job.preemptions, job.restarts_used, job.max_restarts
    );
    set_state(tx, fx, job, JobState::Queued, &why)
}

/// Ends the job's current attempt as failed: the surviving ranks are cancelled, then the job is
/// FAILED (user error, or the restart budget is spent) or goes RESTARTING → QUEUED.
pub(crate) fn fail_attempt(
    tx: &mut dyn Tx,
    fx: &mut Effects,
    job: &mut JobRecord,
    attempt: &mut AttemptRecord,
    user_error: bool,
    reason: String,
) -> Result<()> {
    attempt.ended_ms = Some(now_ms());
    attempt.outcome = Some(AttemptOutcome::Failed);
    attempt.reason = reason.clone();
    cancel_ranks(fx, attempt, &format!("attempt failed: {reason}"));
    tx.put_attempt(attempt)?;
    fx.schedule = true;
    if job.state.is_terminal() || job.epoch != attempt.epoch {
        return Ok(());
    }
    warn!(job_id = %job.id, epoch = attempt.epoch, user_error, restarts_used = job.restarts_used,
          max_restarts = job.max_restarts, reason = %reason, "attempt failed");
    if user_error {
        job.failure_reason = reason.clone();
        set_state(
            tx,
            fx,
            job,
            JobState::Failed,
            &format!("user error: {reason}"),
        )
    } else if job.restarts_used < job.max_restarts {
        job.failure_reason = reason.clone();
        set_state(tx, fx, job, JobState::Restarting, &reason)?;
        job.restarts_used += 1;
        let why = format!(
            "restart {} of {} after an infrastructure failure",
            job.restarts_used, job.max_restarts
        );
        set_state(tx, fx, job, JobState::Queued, &why)
    } else {
        job.failure_reason = format!(
            "{reason} (restart budget exhausted: {} of {} restarts used)",
            job.restarts_used, job.max_restarts
        );
        let why = job.failure_reason.clone();
        set_state(tx, fx, job, JobState::Failed, &why)
    }
}

/// The public view of a job: record, placement of its current attempt, eval results.
pub(crate) fn job_view(rt: &Runtime, tx: &mut dyn Tx, job: &JobRecord) -> Result<JobView> {
    let mut placement = Vec::new();
    let mut rendezvous = String::new();
    if job.epoch > 0 {
        if let Some(a) = tx.get_attempt(job.id, job.epoch)? {
            rendezvous = format!("{}:{}", a.master_addr, a.master_port);
            let mut workers: HashMap<WorkerId, Option<WorkerRecord>> = HashMap::new();
            for r in &a.ranks {
                if let std::collections::hash_map::Entry::Vacant(e) = workers.entry(r.worker_id) {
                    e.insert(tx.get_worker(r.worker_id)?);
                }
                let w = workers.get(&r.worker_id).and_then(|w| w.as_ref());
                placement.push(Placement {
                    rank: r.rank,
                    worker_id: r.worker_id,
                    worker_name: w.map(|w| w.name.clone()).unwrap_or_default(),
                    host: w.map(|w| w.host.clone()).unwrap_or_default(),
                    device: r.device,
                });
            }
        }
    }
    Ok(JobView {
        evals: evals_of(tx, job)?,
        pending_reason: match job.state {
            JobState::Queued => rt.waiting.get(&job.id).cloned().unwrap_or_default(),
            _ => String::new(),
        },
        job: job.clone(),
        placement,
        rendezvous,
    })
}

/// The job's evaluation results, oldest first.
fn evals_of(tx: &mut dyn Tx, job: &JobRecord) -> Result<Vec<EvalResult>> {
    Ok(tx
        .list_events(job.id, 0, Some("eval"))?
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Eval(ev) => Some(ev),
            EventKind::State(_)
            | EventKind::Metrics(_)
            | EventKind::Checkpoint(_)
            | EventKind::Notice(_)
            | EventKind::Picture(_) => None,
        })
        .collect())
}

pub(crate) fn checkpoint_info(c: &crate::store::CheckpointRecord) -> CheckpointInfo {
    CheckpointInfo {
        job_id: c.job_id.to_string(),
        step: c.step,
        epoch: c.epoch,
        path: c.path.clone(),
        created_at_ms: c.created_ms,
        size_bytes: c.size_bytes,
        sha256: c.sha256.clone(),
        ..Default::default()
    }
}

/// A new QUEUED job for a validated spec, inside the caller's transaction.
pub(crate) fn insert_job(
    tx: &mut dyn Tx,
    fx: &mut Effects,
    spec: &JobSpec,
    owner: &str,
) -> Result<JobRecord> {
    let now = now_ms();
    let mut job = JobRecord {
        id: JobId::new(),
        name: spec.name.clone(),
        kind: spec.kind,
        spec_toml: spec.to_toml(),
        priority: spec.priority,
        world_size: spec.world_size,
        state: JobState::Queued,
        created_ms: now,
        updated_ms: now,
        epoch: 0,
        attempts: 0,
        restarts_used: 0,
        preemptions: 0,
        max_restarts: spec.restart.max_restarts,
        failure_reason: String::new(),
        total_steps: 0,
        last_metrics: None,
        owner: owner.to_string(),
        run: crate::store::JobRunInfo::of(spec),
    };
    set_state(tx, fx, &mut job, JobState::Queued, "submitted")?;
    fx.schedule = true;
    Ok(job)
}

/// Fills each checkpoint's eval state from the newest linear-probe job pointed at its path:
/// derived on read, so it can never disagree with the probe jobs themselves.
fn attach_probe_state(tx: &mut dyn Tx, cps: &mut [CheckpointInfo]) -> Result<()> {
    if cps.is_empty() {
        return Ok(());
    }
    let paths: Vec<String> = cps.iter().map(|c| c.path.clone()).collect();
    let probes = tx.probe_jobs(&paths)?;
    for cp in cps.iter_mut() {
        let Some(job) = probes
            .iter()
            .rev()
            .find(|j| j.run.probe_checkpoint == cp.path)
        else {
            continue;
        };
        cp.eval_job_id = job.id.to_string();
        cp.eval_state = Some(match job.state {
            JobState::Running => CheckpointEvalState::Running,
            JobState::Succeeded => CheckpointEvalState::Done,
            JobState::Failed | JobState::Cancelled => CheckpointEvalState::Failed,
            JobState::Queued | JobState::Scheduled | JobState::Restarting => {
                CheckpointEvalState::Pending
            }
        });
        if job.state == JobState::Succeeded {
            cp.eval = evals_of(tx, job)?
                .into_iter()
                .rev()
                .find(|e| e.kind == EvalKind::LinearProbe);
        }
    }
    Ok(())
}

/// The paths a job reads must lie under the allowed data roots (data) or the checkpoint root
/// (data, and the checkpoint a probe reads).
pub(crate) fn check_read_paths(config: &CoordinatorConfig, spec: &JobSpec) -> Result<()> {
    for (field, p) in spec.read_paths() {
        let path = std::path::Path::new(p);
        if field == "eval.checkpoint" {
            bt_common::paths::lexically_within(field, path, &config.checkpoint_root).map_err(
                |e| Error::invalid(field, e.split_once(": ").map_or(e.clone(), |x| x.1.into())),
            )?;
            continue;
        }
        let mut roots = config.data_roots.clone();
        roots.push(config.checkpoint_root.clone());
        if !bt_common::paths::lexically_under_any(path, &roots) {
            let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
            return Err(Error::invalid(
                field,
                format!(
                    "{p} is outside the allowed data roots ({}; the coordinator's data_roots)",
                    list.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// The devices of `workers` no rank of an open attempt holds.
fn free_devices(tx: &mut dyn Tx, workers: &[WorkerRecord]) -> Result<Vec<FreeWorker>> {
    let mut busy: HashSet<(WorkerId, u32)> = HashSet::new();
    for a in tx.open_attempts()? {
        for r in a.ranks.iter().filter(|r| r.exited_ms.is_none()) {
            busy.insert((r.worker_id, r.device));
        }
    }
    Ok(workers
        .iter()
        .map(|w| FreeWorker {
            id: w.id,
            name: w.name.clone(),
            devices: w
                .devices
                .iter()
                .map(|d| d.index)
                .filter(|d| !busy.contains(&(w.id, *d)))
                .collect(),
        })
        .collect())
}

/// The world sizes a queued job may be placed at, largest first. A job runs its first attempt at
/// its `world_size`; a restart of an elastic job may take fewer ranks (`elastic.min_world_size`)
/// when the full gang no longer fits. The stored spec was validated at submit; one that does not
/// parse now is placed at its `world_size` only.
fn world_sizes(job: &JobRecord) -> Vec<u32> {
    if job.attempts == 0 {
        // A first attempt: no need to parse the spec on every scheduling pass.
        return vec![job.world_size];
    }
    match JobSpec::from_toml_str(&job.spec_toml) {
        Ok(spec) if spec.world_size == job.world_size => spec.allowed_world_sizes(),
        _ => vec![job.world_size],
    }
}

/// A new attempt of `job` on `ranks` ((worker, device) per rank): a fresh epoch, the rendezvous
/// on rank 0's worker, resuming from the newest checkpoint; the job goes SCHEDULED and every
/// rank's worker gets its assignment.
fn start_attempt(
    config: &CoordinatorConfig,
    tx: &mut dyn Tx,
    fx: &mut Effects,
    mut job: JobRecord,
    ranks: &[(WorkerId, u32)],
    by_id: &HashMap<WorkerId, &WorkerRecord>,
) -> Result<()> {
    let Some(rank0) = ranks.first().and_then(|(w, _)| by_id.get(w)) else {
        return Ok(());
    };
    let epoch = tx.next_epoch()?;
    let span = rank0.port_end.saturating_sub(rank0.port_start).max(1);
    let master_port = rank0.port_start + (epoch % span as u64) as u32;
    // The newest committed checkpoint, and the ones before it (newest first) should it be corrupt.
    let mut committed: Vec<String> = tx
        .list_checkpoints(job.id, false)?
        .into_iter()
        .map(|c| c.path)
        .collect();
    let resume_from = committed.pop().unwrap_or_default();
    let resume_fallbacks: Vec<String> =
        committed.into_iter().rev().take(RESUME_FALLBACKS).collect();
    let attempt = AttemptRecord {
        job_id: job.id,
        epoch,
        started_ms: now_ms(),
        ended_ms: None,
        outcome: None,
        reason: String::new(),
        resume_from: resume_from.clone(),
        master_addr: rank0.host.clone(),
        master_port,
        ranks: ranks
            .iter()
            .enumerate()
            .map(|(rank, (w, d))| RankRecord {
                rank: rank as u32,
                worker_id: *w,
                device: *d,
                started_ms: None,
                exited_ms: None,
                exit_success: None,
                exit_info: String::new(),
            })
            .collect(),
    };
    tx.put_attempt(&attempt)?;
    job.epoch = epoch;
    job.attempts += 1;
    let names: Vec<String> = ranks
        .iter()
        .map(|(w, d)| format!("{}:{d}", by_id.get(w).map_or("?", |w| w.name.as_str())))
        .collect();
    // Elastic: fewer ranks than the spec's world_size, the same global batch.
    let world = attempt.ranks.len() as u32;
    let why = format!(
        "attempt {} placed on {}{}{}",
        job.attempts,
        names.join(", "),
        if world < job.world_size {
            format!(" (elastic: {world} of {} ranks)", job.world_size)
        } else {
            String::new()
        },
        if resume_from.is_empty() {
            String::new()
        } else {
            format!(", resuming from {resume_from}")
        }
    );
    set_state(tx, fx, &mut job, JobState::Scheduled, &why)?;
    let checkpoint_dir = config.checkpoint_root.join(job.id.to_string());
    // A fresh secret per attempt: the ranks' keys in rank 0's store live under it.
    let store_prefix = hex::encode(rand::random::<[u8; 16]>());
    for r in &attempt.ranks {
        fx.messages.push((
            r.worker_id,
            Assignment {
                job_id: job.id.to_string(),
                epoch,
                rank: r.rank,
                world_size: world,
                device: r.device,
                master_addr: attempt.master_addr.clone(),
                master_port,
                spec_toml: job.spec_toml.clone(),
                checkpoint_dir: checkpoint_dir.to_string_lossy().into_owned(),
                resume_from: resume_from.clone(),
                store_prefix: store_prefix.clone(),
                resume_fallbacks: resume_fallbacks.clone(),
            }
            .into(),
        ));
    }
    Ok(())
}

impl Core {
    /// Validates the spec (the authoritative check: size, fields, the paths it reads) and queues
    /// the job for `owner`, within the owner's queue limit.
    pub fn submit(&self, spec_toml: &str, owner: &str) -> Result<JobView> {
        let limits = &self.config.limits;
        if spec_toml.len() > limits.max_spec_bytes {
            return Err(Error::invalid(
                "spec_toml",
                format!(
                    "{} bytes is over the limit of {} (limits.max_spec_bytes)",
                    spec_toml.len(),
                    limits.max_spec_bytes
                ),
            ));
        }
        let spec = JobSpec::from_toml_str(spec_toml).map_err(|e| Error::InvalidArgument {
            field: e.field,
            message: e.message,
        })?;
        check_read_paths(&self.config, &spec)?;
        let max_queued = limits.max_queued_per_owner;
        self.transition(|_, rt, tx, fx| {
            let waiting = tx
                .list_jobs(&[JobState::Queued, JobState::Restarting])?
                .iter()
                .filter(|j| j.owner == owner)
                .count();
            if waiting >= max_queued {
                return Err(Error::ResourceExhausted(format!(
                    "{} already has {waiting} jobs waiting (limits.max_queued_per_owner = {max_queued})",
                    if owner.is_empty() { "this user" } else { owner }
                )));
            }
            let who = if owner.is_empty() { "this user" } else { owner };
            rt.take_submit_token(owner, limits.submit_per_minute, limits.submit_burst)
                .map_err(|wait| {
                    Error::ResourceExhausted(format!(
                        "{who} is submitting too fast (limits.submit_burst = {}, refilled at \
                         limits.submit_per_minute = {}); try again in {wait:.1} s",
                        limits.submit_burst, limits.submit_per_minute
                    ))
                })?;
            let job = insert_job(tx, fx, &spec, owner)?;
            job_view(rt, tx, &job)
        })
    }

    pub fn get_job(&self, id: JobId) -> Result<JobView> {
        self.read(|rt, tx| {
            let job = tx.get_job(id)?.ok_or_else(|| not_found(id))?;
            job_view(rt, tx, &job)
        })
    }

    /// Jobs in `states` (all when empty), newest first, at most `limit` (0: all).
    pub fn list_jobs(&self, states: &[JobState], limit: usize) -> Result<Vec<JobView>> {
        self.read(|rt, tx| {
            let mut jobs = tx.list_jobs(states)?;
            jobs.reverse();
            if limit > 0 {
                jobs.truncate(limit);
            }
            jobs.iter().map(|j| job_view(rt, tx, j)).collect()
        })
    }

    /// Jobs in `states` (all when empty), newest first, from `offset`, at most `size` of them.
    pub fn list_jobs_page(
        &self,
        states: &[JobState],
        offset: usize,
        size: usize,
    ) -> Result<Vec<JobView>> {
        self.read(|rt, tx| {
            let jobs = tx.list_jobs(states)?;
            jobs.iter()
                .rev()
                .skip(offset)
                .take(size)
                .map(|j| job_view(rt, tx, j))
                .collect()
        })
    }

    pub fn list_checkpoints(&self, id: JobId) -> Result<Vec<CheckpointInfo>> {
        self.read(|_, tx| {
            tx.get_job(id)?.ok_or_else(|| not_found(id))?;
            let mut out: Vec<CheckpointInfo> = tx
                .list_checkpoints(id, false)?
                .iter()
                .map(checkpoint_info)
                .collect();
            attach_probe_state(tx, &mut out)?;
            Ok(out)
        })
    }

    /// Queued → CANCELLED at once; scheduled/running → its ranks are cancelled, then CANCELLED;
    /// a terminal job is returned unchanged.
    ///
    /// With `only_owner` (a submitter), a job of anyone else is refused.
    pub fn cancel(&self, id: JobId, reason: &str, only_owner: Option<&str>) -> Result<JobView> {
        let reason = if reason.trim().is_empty() {
            "cancelled by user".to_string()
        } else {
            reason.trim().to_string()
        };
        self.transition(|_, rt, tx, fx| {
            let mut job = tx.get_job(id)?.ok_or_else(|| not_found(id))?;
            if only_owner.is_some_and(|o| o != job.owner) {
                return Err(Error::PermissionDenied(
                    "a submitter may cancel only its own jobs".into(),
                ));
            }
            if job.state.is_terminal() {
                return job_view(rt, tx, &job);
            }
            if job.epoch > 0 {
                if let Some(mut a) = tx.get_attempt(id, job.epoch)? {
                    if a.is_active() {
                        a.ended_ms = Some(now_ms());
                        a.outcome = Some(AttemptOutcome::Cancelled);
                        a.reason = reason.clone();
                        cancel_ranks(fx, &a, &reason);
                        tx.put_attempt(&a)?;
                    }
                }
            }
            set_state(tx, fx, &mut job, JobState::Cancelled, &reason)?;
            fx.schedule = true;
            job_view(rt, tx, &job)
        })
    }

    /// One scheduling pass: places what fits and sends the assignments. Returns how many jobs
    /// were placed.
    pub fn schedule(&self) -> Result<usize> {
        self.transition(|config, rt, tx, fx| {
            let queued = tx.list_jobs(&[JobState::Queued])?;
            rt.waiting.clear();
            if queued.is_empty() {
                return Ok(0);
            }
            let workers: Vec<WorkerRecord> = tx
                .list_workers()?
                .into_iter()
                .filter(|w| {
                    w.state == WorkerState::Online
                        && rt.sessions.contains_key(&w.id)
                        && !rt.draining.contains(&w.id)
                        && w.drained.is_empty()
                })
                .collect();
            let free = free_devices(tx, &workers)?;
            let queue: Vec<QueuedJob> = queued
                .iter()
                .map(|j| QueuedJob {
                    id: j.id,
                    priority: j.priority,
                    created_ms: j.created_ms,
                    world_sizes: world_sizes(j),
                })
                .collect();
            let (placements, waits) = plan_with_waits(&queue, &free);
            rt.waiting = waits
                .into_iter()
                .map(|(id, w)| (id, w.to_string()))
                .collect();
            let by_id: HashMap<WorkerId, &WorkerRecord> =
                workers.iter().map(|w| (w.id, w)).collect();
            for p in &placements {
                let Some(job) = queued.iter().find(|j| j.id == p.job_id).cloned() else {
                    continue;
                };
                start_attempt(config, tx, fx, job, &p.ranks, &by_id)?;
            }
            Ok(placements.len())
        })
    }

    /// After a (re)start: previously-online workers get `heartbeat_timeout_ms` to reconnect.
    pub(crate) fn recover(&self) -> Result<()> {
        let mut guard = self.lock();
        let super::Inner { store, rt } = &mut *guard;
        let mut tx = store.begin()?;
        let now = now_ms();
        let mut online = 0;
        for w in tx.list_workers()? {
            if w.state == WorkerState::Online {
                rt.last_seen.insert(w.id, now);
                online += 1;
            }
        }
        let active = tx.open_attempts()?.iter().filter(|a| a.is_active()).count();
        let queued = tx.list_jobs(&[JobState::Queued])?.len();
        drop(tx);
        info!(
            online_workers = online,
            active_attempts = active,
            queued_jobs = queued,
            "state recovered"
        );
        Ok(())
    }
}
