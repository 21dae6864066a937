//! The periodic liveness checks (`Core::tick`): heartbeat timeouts and the reconnect grace, ranks
//! that vanished across a reconnect, start deadlines and the progress watchdog.
use bt_common::domain::JobState;
use bt_common::{now_ms, JobId, WorkerId};
use tracing::warn;

use super::jobs::fail_attempt;
use super::workers::{busy_devices, lose_worker, reconnect_grace};
use super::{Core, Effects, Runtime};
use crate::error::Result;
use crate::store::Tx;

/// Fails every active attempt with a rank that has not reported its start within
/// `start_deadline_ms` of placement (its daemon never spawned it, or lost the assignment).
/// A rank whose worker has no session (a coordinator restart: its start report may wait in the
/// daemon's buffer) is left to the reconnect grace, one that was not running when its worker
/// reconnected to the vanished-rank deadline.
pub(super) fn start_deadlines(
    config: &crate::config::CoordinatorConfig,
    rt: &Runtime,
    tx: &mut dyn Tx,
    fx: &mut Effects,
    now: i64,
) -> Result<()> {
    let deadline = config.start_deadline_ms.min(i64::MAX as u64) as i64;
    for mut a in tx.open_attempts()? {
        if !a.is_active() || now - a.started_ms <= deadline {
            continue;
        }
        let Some(i) = a.ranks.iter().position(|r| {
            r.started_ms.is_none()
                && r.exited_ms.is_none()
                && rt.sessions.contains_key(&r.worker_id)
                && !rt.vanished.contains_key(&(a.job_id, a.epoch, r.rank))
        }) else {
            continue;
        };
        let Some(mut job) = tx.get_job(a.job_id)? else {
            continue;
        };
        if job.epoch != a.epoch || job.state.is_terminal() {
            continue;
        }
        let wname = tx
            .get_worker(a.ranks[i].worker_id)?
            .map(|w| w.name)
            .unwrap_or_default();
        let rank = a.ranks[i].rank;
        let why = format!(
            "rank {rank} on worker {wname} did not start within {deadline} ms of its placement \
             (start_deadline_ms)"
        );
        a.ranks[i].mark_failed(now, why.clone());
        warn!(job_id = %a.job_id, epoch = a.epoch, rank, worker = %wname, "rank did not start");
        fail_attempt(tx, fx, &mut job, &mut a, false, why)?;
    }
    Ok(())
}
/// The progress watchdog (`watchdog.*`): a running attempt none of whose ranks has reported for
/// `multiple` × its recent step-report interval (at least `min_ms`) is hung; it fails as an
/// infrastructure failure (restart by the budget), its ranks are told to stop.
pub(super) fn watchdog(
    config: &crate::config::CoordinatorConfig,
    rt: &mut Runtime,
    tx: &mut dyn Tx,
    fx: &mut Effects,
    now: i64,
) -> Result<()> {
    let w = &config.watchdog;
    if w.multiple <= 0.0 {
        rt.progress.clear();
        return Ok(());
    }
    // Only attempts silent past their limit are looked up in the store (a tick reads nothing for
    // jobs that report); entries of attempts that ended go when they come due.
    let limit_of =
        |p: &super::Progress| (w.multiple * p.step_interval_ms.unwrap_or(0.0)).max(w.min_ms as f64);
    let due: Vec<((JobId, u64), super::Progress)> = rt
        .progress
        .iter()
        .filter(|(_, p)| (now - p.last_ms) as f64 > limit_of(p))
        .map(|(k, p)| (*k, *p))
        .collect();
    for (key @ (job_id, epoch), p) in due {
        let (job, attempt) = (tx.get_job(job_id)?, tx.get_attempt(job_id, epoch)?);
        let (Some(mut job), Some(mut a)) = (job, attempt) else {
            rt.progress.remove(&key);
            continue;
        };
        if job.epoch != epoch || job.state.is_terminal() || !a.is_active() {
            rt.progress.remove(&key);
            continue;
        }
        if job.state != JobState::Running {
            continue;
        }
        let silent = now - p.last_ms;
        rt.progress.remove(&key);
        let why = match p.step_interval_ms {
            Some(i) => format!(
                "hung: no report from any rank for {:.1} s, {:.0}x its recent step-report \
                 interval of {:.0} ms (watchdog.multiple {}, watchdog.min_ms {})",
                silent as f64 / 1e3,
                silent as f64 / i.max(1.0),
                i,
                w.multiple,
                w.min_ms
            ),
            None => format!(
                "hung: no report from any rank for {:.1} s (watchdog.min_ms {})",
                silent as f64 / 1e3,
                w.min_ms
            ),
        };
        warn!(job_id = %job_id, epoch, silent_ms = silent, "job declared hung");
        fail_attempt(tx, fx, &mut job, &mut a, false, why)?;
    }
    Ok(())
}

impl Core {
    /// Periodic liveness check: heartbeat timeouts (including workers that did not reconnect after
    /// a coordinator restart) and ranks that vanished across a reconnect.
    pub fn tick(&self) -> Result<()> {
        self.transition(|config, rt, tx, fx| {
            let now = now_ms();
            let timeout = config.heartbeat_timeout_ms as i64;
            let silent: Vec<(WorkerId, i64)> = rt
                .last_seen
                .iter()
                .filter(|(_, seen)| now - **seen > timeout)
                .map(|(w, s)| (*w, *s))
                .collect();
            // A worker without a session that still holds ranks of open attempts is one that
            // has not reconnected since this coordinator started (a lost session is handled when
            // it closes): it gets the reconnect grace, its trainers are still training.
            let mut holding: Option<std::collections::HashMap<WorkerId, u32>> = None;
            let grace = reconnect_grace(config);
            for (w, seen) in silent {
                let why = if rt.sessions.contains_key(&w) {
                    format!("no heartbeat for {} ms", now - seen)
                } else {
                    if holding.is_none() {
                        holding = Some(busy_devices(tx)?);
                    }
                    let busy = holding.as_ref().is_some_and(|h| h.contains_key(&w));
                    if busy && now - seen <= grace {
                        continue;
                    }
                    if busy {
                        format!(
                            "no session for {} ms: it did not reconnect within \
                             reconnect_grace_ms ({grace} ms)",
                            now - seen
                        )
                    } else {
                        format!("no session for {} ms", now - seen)
                    }
                };
                lose_worker(rt, tx, fx, w, &why)?;
            }
            let due: Vec<(JobId, u64, u32)> = rt
                .vanished
                .iter()
                .filter(|(_, d)| now >= **d)
                .map(|(k, _)| *k)
                .collect();
            for key @ (job_id, epoch, rank) in due {
                rt.vanished.remove(&key);
                let (Some(mut job), Some(mut a)) = (tx.get_job(job_id)?, tx.get_attempt(job_id, epoch)?) else {
                    continue;
                };
                let Some(r) = a.ranks.get_mut(rank as usize) else { continue };
                if r.exited_ms.is_some() || a.ended_ms.is_some() {
                    continue;
                }
                let wname = tx
                    .get_worker(r.worker_id)?
                    .map(|w| w.name)
                    .unwrap_or_default();
                a.ranks[rank as usize].mark_failed(now, "vanished across a reconnect");
                let why = format!(
                    "rank {rank} on worker {wname} was not running after its worker reconnected and never reported an exit"
                );
                fail_attempt(tx, fx, &mut job, &mut a, false, why)?;
            }
            start_deadlines(config, rt, tx, fx, now)?;
            watchdog(config, rt, tx, fx, now)
        })
    }
}
