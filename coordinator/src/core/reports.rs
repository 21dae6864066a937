//! Trainer reports relayed by a daemon: fenced by the attempt epoch, validated, persisted as events.
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use bt_common::domain::{AttemptOutcome, EventKind, JobState, Notice, NoticeLevel};
use bt_common::{now_ms, JobId, JobSpec, WorkerId};
use bt_proto::{trainer_report, DeleteCheckpoints, TrainerExit, TrainerReport};
use tracing::{debug, info, warn};

use super::jobs::{checkpoint_info, fail_attempt, set_state};
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
    let (epoch, rank) = (r.epoch, r.rank);
    let Some(mut job) = tx.get_job(job_id)? else {
        warn!(worker_id = %worker_id, job_id = %job_id, "report for an unknown job ignored");
        return Ok(());
    };
    let Some(mut attempt) = tx.get_attempt(job_id, epoch)? else {
        warn!(worker_id = %worker_id, job_id = %job_id, epoch, current_epoch = job.epoch,
              "report with an unknown epoch ignored (stale)");
        return Ok(());
    };
    if rank >= job.world_size {
        warn!(worker_id = %worker_id, job_id = %job_id, rank, world_size = job.world_size,
              "report with a rank outside the world size ignored");
        return Ok(());
    }
    let Some(placed) = attempt.ranks.get(rank as usize) else {
        warn!(job_id = %job_id, epoch, rank, "report for a rank the attempt does not have ignored");
        return Ok(());
    };
    if placed.worker_id != worker_id {
        warn!(worker_id = %worker_id, job_id = %job_id, epoch, rank, placed_on = %placed.worker_id,
              "report for a rank placed on another worker ignored");
        return Ok(());
    }
    let current = epoch == job.epoch && attempt.is_active() && !job.state.is_terminal();
    match body {
        trainer_report::Body::Exit(e) => {
            let slot = &mut attempt.ranks[rank as usize];
            if slot.exited_ms.is_some() {
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
                exit_reason(rank, &worker_name, &e)
            };
            rt.vanished.remove(&(job_id, epoch, rank));
            fx.schedule = true;
            if !current {
                info!(job_id = %job_id, epoch, rank, success = e.success, "exit of a past attempt recorded");
                tx.put_attempt(&attempt)?;
                return Ok(());
            }
            info!(job_id = %job_id, epoch, rank, success = e.success, code = e.code, signal = e.signal,
                  user_error = e.user_error, "trainer exited");
            if e.success {
                let all_ok = attempt.ranks.iter().all(|r| r.exit_success == Some(true));
                if all_ok {
                    attempt.ended_ms = Some(now_ms());
                    attempt.outcome = Some(AttemptOutcome::Succeeded);
                    tx.put_attempt(&attempt)?;
                    set_state(tx, fx, &mut job, JobState::Succeeded, "all ranks finished")?;
                } else {
                    tx.put_attempt(&attempt)?;
                }
                Ok(())
            } else {
                let why = exit_reason(rank, &worker_name, &e);
                fail_attempt(tx, fx, &mut job, &mut attempt, e.user_error, why)
            }
        }
        _ if !current => {
            debug!(job_id = %job_id, epoch, current_epoch = job.epoch, rank, "report of a past attempt ignored");
            Ok(())
        }
        trainer_report::Body::Started(s) => {
            let slot = &mut attempt.ranks[rank as usize];
            if slot.started_ms.is_none() {
                slot.started_ms = Some(now_ms());
                tx.put_attempt(&attempt)?;
                info!(job_id = %job_id, epoch, rank, pid = s.pid, "trainer started");
            }
            if job.state == JobState::Scheduled
                && attempt.ranks.iter().all(|r| r.started_ms.is_some())
            {
                let why = format!("all {} ranks started", job.world_size);
                set_state(tx, fx, &mut job, JobState::Running, &why)?;
            }
            Ok(())
        }
        trainer_report::Body::Metrics(m) => {
            if rank != 0 {
                debug!(job_id = %job_id, rank, "metrics from a rank other than 0 ignored");
                return Ok(());
            }
            if !rt.metrics_allowed(job_id, epoch, config.limits.max_metrics_per_sec) {
                return Ok(());
            }
            let m = bt_common::domain::TrainMetrics::from(m);
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
        trainer_report::Body::Eval(ev) => {
            if rank != 0 {
                debug!(job_id = %job_id, rank, "eval from a rank other than 0 ignored");
                return Ok(());
            }
            let ev = match bt_common::domain::EvalResult::try_from(ev) {
                Ok(ev) => ev,
                Err(e) => return refuse_report(tx, fx, &job, worker_id, "eval", e),
            };
            info!(job_id = %job_id, step = ev.step, kind = %ev.kind, top1 = ev.top1, "eval result");
            emit(tx, fx, job_id, ev.step, EventKind::Eval(ev))
        }
        trainer_report::Body::Notice(n) => {
            let step = job.last_metrics.as_ref().map_or(0, |m| m.step);
            let n = match Notice::try_from(n) {
                Ok(n) => n,
                Err(e) => return refuse_report(tx, fx, &job, worker_id, "notice", e),
            };
            emit(tx, fx, job_id, step, EventKind::Notice(n))
        }
        trainer_report::Body::Checkpoint(c) => {
            if rank != 0 {
                warn!(job_id = %job_id, rank, "checkpoint from a rank other than 0 ignored");
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
                let step = job.last_metrics.as_ref().map_or(0, |m| m.step);
                return emit(
                    tx,
                    fx,
                    job_id,
                    step,
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
            if job.run.auto_eval {
                // The probe's spec is derived from the job's: parsed here, once per checkpoint
                // of a job that asked for evaluations.
                match JobSpec::from_toml_str(&job.spec_toml) {
                    Ok(spec) => {
                        let probe = spec.probe_for(&rec.path);
                        let probe_job = super::jobs::insert_job(tx, fx, &probe, &job.owner)?;
                        info!(job_id = %job_id, probe_job = %probe_job.id, path = %rec.path, "checkpoint evaluation queued");
                    }
                    Err(e) => {
                        warn!(job_id = %job_id, error = %e, "stored spec does not parse; no evaluation queued")
                    }
                }
            }
            apply_retention(config, tx, fx, &job, &attempt, worker_id)
        }
    }
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
    let max = config.limits.max_metric_events_per_job;
    let mut n = tx.count_events(job_id, "metrics")?;
    let before = n;
    while n > max {
        let dropped = tx.thin_metric_events(job_id, n / 2)?;
        if dropped == 0 {
            break;
        }
        n -= dropped;
    }
    if n != before {
        info!(job_id = %job_id, metric_events = before, kept = n, "metric history thinned");
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
    _config: &CoordinatorConfig,
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
