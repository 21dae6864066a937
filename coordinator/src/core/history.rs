//! Job history: forgetting a finished job (`delete_job`, with its checkpoint directory) and the
//! retention housekeeping that prunes finished jobs' history (`prune_history`).
use bt_common::{now_ms, JobId};
use tracing::info;

use super::jobs::not_found;
use super::Core;
use crate::error::{Error, Result};
use crate::store::Deleted;

impl Core {
    /// Forgets a finished job: its rows in the store (record, attempts, events, checkpoint
    /// records, log lines; returned with how many checkpoint directories went) and, with
    /// `delete_files`, its checkpoint directory
    /// `<checkpoint_root>/<job>`. Refused for a job that has not finished and for one with a
    /// checkpoint a linear probe is evaluating; with `only_owner` (a submitter), for anyone
    /// else's job.
    pub fn delete_job(
        &self,
        id: JobId,
        delete_files: bool,
        only_owner: Option<&str>,
    ) -> Result<(Deleted, u64)> {
        let root = self.config.checkpoint_root.clone();
        self.transition(|_, rt, tx, _| {
            let job = tx.get_job(id)?.ok_or_else(|| not_found(id))?;
            if only_owner.is_some_and(|o| o != job.owner) {
                return Err(Error::PermissionDenied(
                    "a submitter may delete only its own jobs".into(),
                ));
            }
            if !job.state.is_terminal() {
                return Err(Error::FailedPrecondition(format!(
                    "job {id} is {}; only a finished job can be deleted (cancel it first)",
                    job.state.name()
                )));
            }
            let paths: Vec<String> = tx
                .list_checkpoints(id, true)?
                .into_iter()
                .map(|c| c.path)
                .collect();
            if let Some(p) = tx
                .probe_jobs(&paths)?
                .into_iter()
                .find(|p| !p.state.is_terminal())
            {
                return Err(Error::FailedPrecondition(format!(
                    "checkpoint {} of job {id} is being evaluated by job {} ({}); wait for it or \
                     cancel it first",
                    p.run.probe_checkpoint,
                    p.id,
                    p.state.name()
                )));
            }
            let files_removed = if delete_files {
                remove_checkpoint_dir(&root, id)?
            } else {
                0
            };
            let d = tx.delete_job(id)?;
            rt.waiting.remove(&id);
            rt.metric_appends.remove(&id);
            rt.log_appends.remove(&id);
            info!(job_id = %id, events = d.events, checkpoints = d.checkpoints,
                  log_lines = d.log_lines, files_removed, "job deleted");
            Ok((d, files_removed))
        })
    }

    /// History housekeeping (`retention.finished_history_days`): finished jobs past it lose their
    /// metric curve, pictures and log lines. Returns (jobs, rows deleted).
    pub fn prune_history(&self) -> Result<(u64, u64)> {
        let days = self.config.retention.finished_history_days;
        if days == 0 {
            return Ok((0, 0));
        }
        let before = now_ms() - i64::from(days) * 86_400_000;
        let (jobs, rows) = self.transition(|_, _, tx, _| tx.prune_finished_history(before))?;
        if jobs > 0 {
            info!(
                jobs,
                rows, days, "finished jobs' history pruned (retention.finished_history_days)"
            );
        }
        Ok((jobs, rows))
    }
}

/// Removes `<root>/<job>` (every checkpoint of the job), confined to the root; returns how many
/// checkpoint directories it held.
fn remove_checkpoint_dir(root: &std::path::Path, id: JobId) -> Result<u64> {
    let dir = root.join(id.to_string());
    if !root.exists() {
        return Ok(0);
    }
    let target = bt_common::paths::deletable_within("checkpoint directory", &dir, root)
        .map_err(Error::FailedPrecondition)?;
    let Some(target) = target else {
        return Ok(0);
    };
    let n = std::fs::read_dir(&target)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .count() as u64
        })
        .unwrap_or(0);
    std::fs::remove_dir_all(&target)
        .map_err(|e| Error::Internal(format!("cannot remove {}: {e}", target.display())))?;
    Ok(n)
}
