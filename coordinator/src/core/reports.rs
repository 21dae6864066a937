//! Trainer reports relayed by a daemon: fenced by the attempt epoch, validated, persisted as events.
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use bt_common::domain::{
    AttemptOutcome, CorrelationPicture, EventKind, JobState, Notice, NoticeLevel,
};
use bt_common::{now_ms, JobId, JobSpec, WorkerId};
use bt_proto::{trainer_report, DeleteCheckpoints, TrainerExit, TrainerReport};
use tracing::{debug, info, warn};

use super::jobs::{checkpoint_info, fail_attempt, preempt_attempt, set_state};
use super::{emit, Effects, Runtime};
use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use crate::store::{AttemptRecord, CheckpointRecord, JobRecord, Tx};

/// A human-readable failure of one rank: where, how, why, and the trainer's last log lines.
fn exit_reason(rank: u32, worker: &str, e: &TrainerExit) -> String {
    let how = if e.signal != 0 {
        format!("killed by signal {}", e.signal)
    } else {
        format!("exit code {}", e.code)
    };
    let mut s = format!("rank {rank} on worker {worker} failed ({how})");
    if !e.reason.trim().is_empty() {
        s.push_str(": ");
        s.push_str(e.reason.trim());
    }
    if !e.last_log_lines.is_empty() {
        s.push_str("\nlast log lines:");
        for l in e.last_log_lines.iter().rev().take(50).rev() {
            s.push_str("\n  ");
            s.push_str(l);
        }
    }
    s
}

/// A report of a rank that is placed where it came from: the job, the attempt the report's
/// epoch names, and whether that attempt is the job's current, running one.
struct Fenced {
    job: JobRecord,
    attempt: AttemptRecord,
    rank: u32,
    current: bool,
}

impl Fenced {
    /// The job's last reported step (where notices and state changes are filed).
    fn step(&self) -> u64 {
        self.job.last_metrics.as_ref().map_or(0, |m| m.step)
    }
}

pub(crate) fn handle_report(
    config: &CoordinatorConfig,
    rt: &mut Runtime,
    tx: &mut dyn Tx,
    fx: &mut Effects,
    worker_id: WorkerId,
    r: TrainerReport,
) -> Result<()> {
    let job_id: JobId = r
        .job_id
        .parse()
        .map_err(|e: String| Error::invalid("report.job_id", e))?;
    let body = r
        .body
        .ok_or_else(|| Error::invalid("report.body", "a report must carry a body"))?;
    let Some(at) = fence(tx, worker_id, job_id, r.epoch, r.rank)? else {
        return Ok(());
    };
    if at.current {
        let step = matches!(body, trainer_report::Body::Metrics(_));
        rt.touch((job_id, r.epoch), step);
    }
    let limited = match &body {
        trainer_report::Body::Eval(_) => Some("eval"),
        trainer_report::Body::Notice(_) => Some("notice"),
        trainer_report::Body::Checkpoint(_) => Some("checkpoint"),
        _ => None,
    };
    if let Some(kind) = limited {
        if !rt.report_allowed(
            (job_id, r.epoch, r.rank, kind),
            config.limits.max_reports_per_sec,
        ) {
            return Ok(());
        }
    }
    match body {
        trainer_report::Body::Exit(e) => on_exit(rt, tx, fx, worker_id, at, &e),
        // A past attempt's last lines still tell why it ended.
        trainer_report::Body::Logs(l) => on_logs(config, rt, tx, fx, at, l),
        // The checkpoint rank 0 saved when its attempt was preempted may arrive after another
        // rank's exit ended the attempt: it is the resume point, as long as no newer attempt ran.
        trainer_report::Body::Checkpoint(c) if saved_on_preemption(&at, r.epoch) => {
            on_checkpoint(config, tx, fx, worker_id, at, c)
        }
        _ if !at.current => {
            debug!(job_id = %job_id, epoch = r.epoch, current_epoch = at.job.epoch, rank = r.rank,
                   "report of a past attempt ignored");
            Ok(())
        }
        trainer_report::Body::Started(s) => on_started(tx, fx, at, s.pid),
        trainer_report::Body::Metrics(m) => on_metrics(config, rt, tx, fx, at, m.into()),
        trainer_report::Body::Eval(_) if at.rank != 0 => {
            debug!(job_id = %job_id, rank = at.rank, "eval from a rank other than 0 ignored");
            Ok(())
        }
        trainer_report::Body::Eval(ev) => match bt_common::domain::EvalResult::try_from(ev) {
            Ok(ev) => {
                info!(job_id = %job_id, step = ev.step, kind = %ev.kind, top1 = ev.top1, "eval result");
                emit(tx, fx, job_id, ev.step, EventKind::Eval(ev))
            }
            Err(e) => refuse_report(tx, fx, &at.job, worker_id, "eval", e),
        },
        trainer_report::Body::Notice(n) => match Notice::try_from(n) {
            Ok(n) => emit(tx, fx, job_id, at.step(), EventKind::Notice(n)),
            Err(e) => refuse_report(tx, fx, &at.job, worker_id, "notice", e),
        },
        trainer_report::Body::Checkpoint(c) => on_checkpoint(config, tx, fx, worker_id, at, c),
        trainer_report::Body::Picture(p) => on_picture(config, rt, tx, fx, worker_id, at, p),
    }
}

/// Whether a report of a past attempt comes from the job's latest attempt, ended by a preemption,
/// with no newer attempt since.
fn saved_on_preemption(at: &Fenced, epoch: u64) -> bool {
    !at.current
        && at.job.epoch == epoch
        && !at.job.state.is_terminal()
        && at.attempt.outcome == Some(AttemptOutcome::Preempted)
}

/// Fencing: a report counts only for a known job, an attempt its epoch names, a rank inside the
/// attempt's world size (an elastic restart may have fewer ranks than the spec) that is placed on
/// the reporting worker. Anything else is stale or stray: ignored.
fn fence(
    tx: &mut dyn Tx,
    worker_id: WorkerId,
    job_id: JobId,
    epoch: u64,
    rank: u32,
) -> Result<Option<Fenced>> {
    let Some(job) = tx.get_job(job_id)? else {
        warn!(worker_id = %worker_id, job_id = %job_id, "report for an unknown job ignored");
        return Ok(None);
    };
    let Some(attempt) = tx.get_attempt(job_id, epoch)? else {
        warn!(worker_id = %worker_id, job_id = %job_id, epoch, current_epoch = job.epoch,
              "report with an unknown epoch ignored (stale)");
        return Ok(None);
    };
    let Some(placed) = attempt.ranks.get(rank as usize) else {
        warn!(worker_id = %worker_id, job_id = %job_id, epoch, rank,
              world_size = attempt.ranks.len(), "report with a rank outside the world size ignored");
        return Ok(None);
    };
    if placed.worker_id != worker_id {
        warn!(worker_id = %worker_id, job_id = %job_id, epoch, rank, placed_on = %placed.worker_id,
              "report for a rank placed on another worker ignored");
        return Ok(None);
    }
    let current = epoch == job.epoch && attempt.is_active() && !job.state.is_terminal();
    Ok(Some(Fenced {
        job,
        attempt,
        rank,
        current,
    }))
}

/// A rank's exit, of the current attempt (it may end the attempt) or of a past one (recorded, so
/// its device is free again).
fn on_exit(
    rt: &mut Runtime,
    tx: &mut dyn Tx,
    fx: &mut Effects,
    worker_id: WorkerId,
    at: Fenced,
    e: &TrainerExit,
) -> Result<()> {
    let Fenced {
        mut job,
        mut attempt,
        rank,
        current,
    } = at;
    let (job_id, epoch) = (job.id, attempt.epoch);
    if attempt.ranks[rank as usize].exited_ms.is_some() {
        debug!(job_id = %job_id, epoch, rank, "duplicate exit report ignored");
        return Ok(());
    }
    let worker_name = tx
        .get_worker(worker_id)?
        .map(|w| w.name)
        .unwrap_or_default();
    let slot = &mut attempt.ranks[rank as usize];
    slot.exited_ms = Some(now_ms());
    slot.exit_success = Some(e.success);
    slot.exit_info = if e.success {
        "success".into()
    } else {
        exit_reason(rank, &worker_name, e)
    };
    rt.vanished.remove(&(job_id, epoch, rank));
    fx.schedule = true;
    if !current {
        info!(job_id = %job_id, epoch, rank, success = e.success, "exit of a past attempt recorded");
        return tx.put_attempt(&attempt);
    }
    info!(job_id = %job_id, epoch, rank, success = e.success, code = e.code, signal = e.signal,
          user_error = e.user_error, "trainer exited");
    if !e.success && e.preempted && !e.user_error {
        let why = format!("rank {rank} on worker {worker_name} stopped on request (node draining)");
        return preempt_attempt(tx, fx, &mut job, &mut attempt, why);
    }
    if !e.success {
        let why = exit_reason(rank, &worker_name, e);
        return fail_attempt(tx, fx, &mut job, &mut attempt, e.user_error, why);
    }
    if attempt.ranks.iter().all(|r| r.exit_success == Some(true)) {
        attempt.ended_ms = Some(now_ms());
        attempt.outcome = Some(AttemptOutcome::Succeeded);
        tx.put_attempt(&attempt)?;
        set_state(tx, fx, &mut job, JobState::Succeeded, "all ranks finished")
    } else {
        tx.put_attempt(&attempt)
    }
}

/// A rank's trainer is up; the job runs once every rank is.
fn on_started(tx: &mut dyn Tx, fx: &mut Effects, at: Fenced, pid: u32) -> Result<()> {
    let Fenced {
        mut job,
        mut attempt,
        rank,
        ..
    } = at;
    let slot = &mut attempt.ranks[rank as usize];
    if slot.started_ms.is_none() {
        slot.started_ms = Some(now_ms());
        tx.put_attempt(&attempt)?;
        info!(job_id = %job.id, epoch = attempt.epoch, rank, pid, "trainer started");
    }
    if job.state == JobState::Scheduled && attempt.ranks.iter().all(|r| r.started_ms.is_some()) {
        let why = format!("all {} ranks started", attempt.ranks.len());
        set_state(tx, fx, &mut job, JobState::Running, &why)?;
    }
    Ok(())
}

/// Rank 0's metrics, within the per-second budget: the job's progress and one history event.
fn on_metrics(
    config: &CoordinatorConfig,
    rt: &mut Runtime,
    tx: &mut dyn Tx,
    fx: &mut Effects,
    at: Fenced,
    m: bt_common::domain::TrainMetrics,
) -> Result<()> {
    let Fenced {
        mut job,
        attempt,
        rank,
        ..
    } = at;
    let job_id = job.id;
    if rank != 0 {
        debug!(job_id = %job_id, rank, "metrics from a rank other than 0 ignored");
        return Ok(());
    }
    if !rt.metrics_allowed(job_id, attempt.epoch, config.limits.max_metrics_per_sec) {
        return Ok(());
    }
    job.total_steps = m.total_steps.max(job.total_steps);
    job.last_metrics = Some(m);
    job.updated_ms = now_ms();
    tx.put_job(&job)?;
    emit(tx, fx, job_id, m.step, EventKind::Metrics(m))?;
    if rt.metric_appended(job_id) {
        thin_metrics(config, tx, job_id)?;
    }
    Ok(())
}

/// Rank 0 wrote a checkpoint: commit it (inside the job's checkpoint directory only), queue its
/// evaluation if the job asked for one, then apply retention.
fn on_checkpoint(
    config: &CoordinatorConfig,
    tx: &mut dyn Tx,
    fx: &mut Effects,
    worker_id: WorkerId,
    at: Fenced,
    c: bt_proto::CheckpointInfo,
) -> Result<()> {
    let job_id = at.job.id;
    if at.rank != 0 {
        warn!(job_id = %job_id, rank = at.rank, "checkpoint from a rank other than 0 ignored");
        return Ok(());
    }
    if c.path.trim().is_empty() {
        warn!(job_id = %job_id, step = c.step, "checkpoint report without a path ignored");
        return Ok(());
    }
    let job_root = config.checkpoint_root.join(job_id.to_string());
    if let Err(e) =
        bt_common::paths::lexically_within("checkpoint.path", Path::new(&c.path), &job_root)
    {
        warn!(job_id = %job_id, worker_id = %worker_id, step = c.step, error = %e,
              "checkpoint report refused");
        return emit(
            tx,
            fx,
            job_id,
            at.step(),
            EventKind::Notice(Notice {
                level: NoticeLevel::Warn,
                message: format!("checkpoint report refused: {e}"),
            }),
        );
    }
    let rec = CheckpointRecord {
        job_id,
        step: c.step,
        epoch: c.epoch,
        path: c.path.clone(),
        size_bytes: c.size_bytes,
        sha256: c.sha256.clone(),
        created_ms: if c.created_at_ms > 0 {
            c.created_at_ms
        } else {
            now_ms()
        },
        deleted: false,
    };
    tx.put_checkpoint(&rec)?;
    info!(job_id = %job_id, step = c.step, path = %c.path, "checkpoint committed");
    emit(
        tx,
        fx,
        job_id,
        c.step,
        EventKind::Checkpoint(checkpoint_info(&rec)),
    )?;
    if at.job.run.auto_eval {
        queue_evaluation(tx, fx, &at.job, &rec.path)?;
    }
    apply_retention(tx, fx, &at.job, &at.attempt, worker_id)
}

/// A linear-probe job for a committed checkpoint of `job`. The probe's spec is derived from the
/// job's: parsed here, once per checkpoint of a job that asked for evaluations.
fn queue_evaluation(tx: &mut dyn Tx, fx: &mut Effects, job: &JobRecord, path: &str) -> Result<()> {
    match JobSpec::from_toml_str(&job.spec_toml) {
        Ok(spec) => {
            let probe = super::jobs::insert_job(tx, fx, &spec.probe_for(path), &job.owner)?;
            info!(job_id = %job.id, probe_job = %probe.id, path, "checkpoint evaluation queued");
        }
        Err(e) => {
            warn!(job_id = %job.id, error = %e, "stored spec does not parse; no evaluation queued")
        }
    }
    Ok(())
}

/// A report whose content this coordinator cannot represent (a value outside a closed set) is
/// not recorded; the job gets a warning saying so, and the session stays up.
fn refuse_report(
    tx: &mut dyn Tx,
    fx: &mut Effects,
    job: &JobRecord,
    worker_id: WorkerId,
    what: &str,
    e: bt_proto::convert::WireError,
) -> Result<()> {
    warn!(job_id = %job.id, worker_id = %worker_id, error = %e, "{what} report refused");
    let step = job.last_metrics.as_ref().map_or(0, |m| m.step);
    emit(
        tx,
        fx,
        job.id,
        step,
        EventKind::Notice(Notice {
            level: NoticeLevel::Warn,
            message: format!("{what} report refused: {what}.{e}"),
        }),
    )
}

/// Keeps a job's metric history within `limits.max_metric_events_per_job`: past it, every other
/// one of the older half of its metric events is dropped (the curve keeps its shape, coarser in
/// the past). State changes, evaluations, checkpoints and notices are never dropped.
fn thin_metrics(config: &CoordinatorConfig, tx: &mut dyn Tx, job_id: JobId) -> Result<()> {
    thin(
        tx,
        job_id,
        "metrics",
        config.limits.max_metric_events_per_job,
    )
}

/// Thins the job's events of `kind` (every other one of the older half) until at most `max` stay.
fn thin(tx: &mut dyn Tx, job_id: JobId, kind: &str, max: u64) -> Result<()> {
    let mut n = tx.count_events(job_id, kind)?;
    let before = n;
    while n > max {
        let dropped = tx.thin_events(job_id, kind, n / 2)?;
        if dropped == 0 {
            break;
        }
        n -= dropped;
    }
    if n != before {
        info!(job_id = %job_id, kind, events = before, kept = n, "event history thinned");
    }
    Ok(())
}

/// Rank 0's |C| picture: a checked event under the metrics' rate limit, the job's pictures
/// thinned past their limit.
fn on_picture(
    config: &CoordinatorConfig,
    rt: &mut Runtime,
    tx: &mut dyn Tx,
    fx: &mut Effects,
    worker_id: WorkerId,
    at: Fenced,
    p: bt_proto::CorrelationPicture,
) -> Result<()> {
    if at.rank != 0 {
        debug!(job_id = %at.job.id, rank = at.rank, "picture from a rank other than 0 ignored");
        return Ok(());
    }
    if !rt.metrics_allowed(
        at.job.id,
        at.attempt.epoch,
        config.limits.max_metrics_per_sec,
    ) {
        return Ok(());
    }
    match CorrelationPicture::try_from(p) {
        Ok(p) => {
            emit(tx, fx, at.job.id, p.step, EventKind::Picture(p))?;
            thin(tx, at.job.id, "picture", config.limits.max_pictures_per_job)
        }
        Err(e) => refuse_report(tx, fx, &at.job, worker_id, "picture", e),
    }
}

/// Lines a rank wrote to stderr: bounded per report and line, rate-limited per rank (what goes
/// is counted in a marker line), persisted, and the job's oldest lines dropped past its limit.
fn on_logs(
    config: &CoordinatorConfig,
    rt: &mut Runtime,
    tx: &mut dyn Tx,
    fx: &mut Effects,
    at: Fenced,
    l: bt_proto::LogLines,
) -> Result<()> {
    let job_id = at.job.id;
    let per_sec = config.limits.max_log_lines_per_sec;
    let offered = l.lines.len() as u64;
    let (take, dropped_here) =
        rt.log_lines_allowed((job_id, at.attempt.epoch, at.rank), offered, per_sec);
    let dropped = dropped_here.saturating_add(l.dropped);
    if take == 0 && dropped == 0 {
        return Ok(());
    }
    let mut lines = Vec::with_capacity(take as usize + 1);
    if dropped > 0 {
        lines.push(format!(
            "[bt: {dropped} log line(s) of this rank dropped over the rate limit]"
        ));
    }
    lines.extend(
        l.lines
            .iter()
            .take(take as usize)
            .map(|t| bt_common::domain::LogLine::bounded(t)),
    );
    if lines.is_empty() {
        return Ok(());
    }
    let time_ms = if l.time_ms > 0 { l.time_ms } else { now_ms() };
    tx.append_logs(job_id, at.attempt.epoch, at.rank, time_ms, &lines)?;
    fx.logs = true;
    if rt.log_appended(job_id, lines.len() as u32) {
        let n = tx.count_logs(job_id)?;
        let max = config.limits.max_log_lines_per_job;
        if n > max {
            let gone = tx.drop_oldest_logs(job_id, n - max)?;
            info!(job_id = %job_id, lines = n, dropped = gone, "oldest log lines dropped (limits.max_log_lines_per_job)");
        }
    }
    Ok(())
}

/// Which checkpoints (by index in `ckpts`, sorted by step) retention keeps: the last `keep_last`
/// (0: all), the newest of every `keep_every_epochs` window, and the one the attempt resumed from.
pub(crate) fn retained(
    ckpts: &[CheckpointRecord],
    keep_last: u32,
    keep_every_epochs: u32,
    resume_from: &str,
) -> HashSet<usize> {
    let mut keep = HashSet::new();
    if keep_last == 0 {
        return (0..ckpts.len()).collect();
    }
    let n = ckpts.len();
    keep.extend(n.saturating_sub(keep_last as usize)..n);
    if keep_every_epochs > 0 {
        let mut newest: BTreeMap<u32, usize> = BTreeMap::new();
        for (i, c) in ckpts.iter().enumerate() {
            newest.insert(c.epoch.checked_div(keep_every_epochs).unwrap_or(0), i);
        }
        keep.extend(newest.values().copied());
    }
    for (i, c) in ckpts.iter().enumerate() {
        if !resume_from.is_empty() && c.path == resume_from {
            keep.insert(i);
        }
    }
    keep
}

fn apply_retention(
    tx: &mut dyn Tx,
    fx: &mut Effects,
    job: &JobRecord,
    attempt: &AttemptRecord,
    worker_id: WorkerId,
) -> Result<()> {
    let ckpts = tx.list_checkpoints(job.id, false)?;
    let keep = retained(
        &ckpts,
        job.run.keep_last,
        job.run.keep_every_epochs,
        &attempt.resume_from,
    );
    // Checkpoints a probe job has yet to read are kept until it ends.
    let candidates: Vec<String> = ckpts
        .iter()
        .enumerate()
        .filter(|(i, _)| !keep.contains(i))
        .map(|(_, c)| c.path.clone())
        .collect();
    let under_eval: HashSet<String> = tx
        .probe_jobs(&candidates)?
        .into_iter()
        .filter(|j| !j.state.is_terminal())
        .map(|j| j.run.probe_checkpoint)
        .collect();
    let mut paths = Vec::new();
    for (i, c) in ckpts.iter().enumerate() {
        if keep.contains(&i) || under_eval.contains(&c.path) {
            continue;
        }
        let mut c = c.clone();
        c.deleted = true;
        tx.put_checkpoint(&c)?;
        paths.push(c.path);
    }
    if !paths.is_empty() {
        info!(job_id = %job.id, deleted = paths.len(), "checkpoint retention");
        fx.messages.push((
            worker_id,
            DeleteCheckpoints {
                paths,
                job_id: job.id.to_string(),
                epoch: attempt.epoch,
            }
            .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ck(step: u64, epoch: u32) -> CheckpointRecord {
        CheckpointRecord {
            job_id: JobId::new(),
            step,
            epoch,
            path: format!("/c/{step}"),
            size_bytes: 1,
            sha256: String::new(),
            created_ms: 0,
            deleted: false,
        }
    }

    #[test]
    fn retention_keeps_last_windows_and_resume_point() {
        let c: Vec<_> = (0..10).map(|i| ck(i * 10, i as u32)).collect();
        let mut k: Vec<usize> = retained(&c, 2, 0, "").into_iter().collect();
        k.sort();
        assert_eq!(k, vec![8, 9]);
        let mut k: Vec<usize> = retained(&c, 2, 4, "/c/10").into_iter().collect();
        k.sort();
        // Windows of 4 epochs: 0-3 → idx 3, 4-7 → idx 7, 8-9 → idx 9; resume point idx 1.
        assert_eq!(k, vec![1, 3, 7, 8, 9]);
        assert_eq!(retained(&c, 0, 0, "").len(), 10, "keep_last = 0 keeps all");
    }
}
