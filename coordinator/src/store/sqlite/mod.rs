//! The embedded SQLite store: WAL journal, `synchronous=FULL` (a committed transition survives
//! kill -9 and power loss), one connection owned by the coordinator core.
use std::path::Path;

use bt_common::domain::{JobEvent, JobState, LogLine};
use bt_common::{JobId, WorkerId};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::{
    AttemptRecord, CheckpointRecord, Deleted, JobRecord, LogQuery, RankRecord, Store, Tx,
    WorkerRecord,
};
use crate::error::{Error, Result};

mod rows;
mod schema;
mod stored;
#[cfg(test)]
mod tests;

use rows::*;
use schema::SCHEMA;

pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`. The state is private to the
    /// coordinator's user: a state directory it creates is 0700, the database (and SQLite's
    /// `-wal` and `-shm` files, which take the database's mode) 0600; an existing database
    /// readable by others is made 0600, an existing directory that others can read is reported.
    pub fn open(path: &Path) -> Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| {
                        Error::Internal(format!("cannot create directory {}: {e}", dir.display()))
                    })?;
            } else if std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
                tracing::warn!(dir = %dir.display(),
                               "the state directory is accessible to other users; make it 0700");
            }
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::Internal(format!("cannot create {}: {e}", path.display())))?;
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let p = std::path::PathBuf::from(p);
            if let Ok(m) = std::fs::metadata(&p) {
                if m.permissions().mode() & 0o077 != 0 {
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).map_err(
                        |e| Error::Internal(format!("cannot make {} private: {e}", p.display())),
                    )?;
                }
            }
        }
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        schema::migrate(&mut conn)?;
        Ok(SqliteStore { conn })
    }
}

impl Store for SqliteStore {
    fn begin(&mut self) -> Result<Box<dyn Tx + '_>> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        Ok(Box::new(SqliteTx { tx }))
    }
}

struct SqliteTx<'a> {
    tx: Transaction<'a>,
}

impl SqliteTx<'_> {
    fn ranks_of(&self, job_id: &str, epoch: u64) -> Result<Vec<RankRecord>> {
        let mut st = self.tx.prepare_cached(
            "SELECT rank, worker_id, device, started_ms, exited_ms, exit_success, exit_info \
             FROM attempt_ranks WHERE job_id = ?1 AND epoch = ?2 ORDER BY rank",
        )?;
        let rows = st
            .query_map(params![job_id, epoch as i64], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<bool>>(5)?,
                    r.get::<_, String>(6)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(
                |(rank, w, device, started_ms, exited_ms, exit_success, exit_info)| {
                    Ok(RankRecord {
                        rank,
                        worker_id: parse_worker_id(&w)?,
                        device,
                        started_ms,
                        exited_ms,
                        exit_success,
                        exit_info,
                    })
                },
            )
            .collect()
    }

    fn attempts_where(
        &self,
        cond: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<AttemptRecord>> {
        let sql = format!(
            "SELECT job_id, epoch, started_ms, ended_ms, outcome, reason, resume_from, master_addr, \
             master_port FROM attempts a WHERE {cond} ORDER BY epoch"
        );
        let mut st = self.tx.prepare(&sql)?;
        let rows = st
            .query_map(args, |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, u32>(8)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (
            job,
            epoch,
            started_ms,
            ended_ms,
            outcome,
            reason,
            resume_from,
            master_addr,
            master_port,
        ) in rows
        {
            let ranks = self.ranks_of(&job, epoch)?;
            out.push(AttemptRecord {
                job_id: parse_job_id(&job)?,
                epoch,
                started_ms,
                ended_ms,
                outcome: attempt_outcome(&outcome)?,
                reason,
                resume_from,
                master_addr,
                master_port,
                ranks,
            });
        }
        Ok(out)
    }
}

impl Tx for SqliteTx<'_> {
    fn next_epoch(&mut self) -> Result<u64> {
        self.tx
            .execute("UPDATE meta SET value = value + 1 WHERE key = 'epoch'", [])?;
        let v: i64 = self
            .tx
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })?;
        Ok(v as u64)
    }

    fn get_job(&mut self, id: JobId) -> Result<Option<JobRecord>> {
        let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1");
        let raw = self
            .tx
            .query_row(&sql, params![id.to_string()], job_from_row)
            .optional()?;
        raw.map(job_finish).transpose()
    }

    fn put_job(&mut self, j: &JobRecord) -> Result<()> {
        let metrics = j
            .last_metrics
            .as_ref()
            .map(stored::encode_metrics)
            .transpose()?;
        self.tx.execute(
            &format!(
                "INSERT OR REPLACE INTO jobs ({JOB_COLS}) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
                 ?19, ?20, ?21, ?22)"
            ),
            params![
                j.id.to_string(),
                j.name,
                bt_common::domain::job_kind_name(j.kind),
                j.spec_toml,
                j.priority,
                j.world_size,
                job_state_code(j.state),
                j.created_ms,
                j.updated_ms,
                j.epoch as i64,
                j.attempts,
                j.restarts_used,
                j.max_restarts,
                j.failure_reason,
                j.total_steps as i64,
                metrics,
                j.owner,
                j.run.probe_checkpoint,
                j.run.keep_last,
                j.run.keep_every_epochs,
                j.run.auto_eval,
                j.preemptions,
            ],
        )?;
        Ok(())
    }

    fn list_jobs(&mut self, states: &[JobState]) -> Result<Vec<JobRecord>> {
        let sql = if states.is_empty() {
            format!("SELECT {JOB_COLS} FROM jobs ORDER BY created_ms, rowid")
        } else {
            let list: Vec<String> = states
                .iter()
                .map(|s| job_state_code(*s).to_string())
                .collect();
            format!(
                "SELECT {JOB_COLS} FROM jobs WHERE state IN ({}) ORDER BY created_ms, rowid",
                list.join(",")
            )
        };
        let mut st = self.tx.prepare(&sql)?;
        let raws = st
            .query_map([], job_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raws.into_iter().map(job_finish).collect()
    }

    fn probe_jobs(&mut self, checkpoints: &[String]) -> Result<Vec<JobRecord>> {
        if checkpoints.is_empty() {
            return Ok(Vec::new());
        }
        let marks = vec!["?"; checkpoints.len()].join(", ");
        let sql = format!(
            "SELECT {JOB_COLS} FROM jobs WHERE kind = 'linear_probe' AND probe_checkpoint IN \
             ({marks}) ORDER BY created_ms, rowid"
        );
        let mut st = self.tx.prepare(&sql)?;
        let raws = st
            .query_map(rusqlite::params_from_iter(checkpoints), job_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raws.into_iter().map(job_finish).collect()
    }

    fn get_attempt(&mut self, job_id: JobId, epoch: u64) -> Result<Option<AttemptRecord>> {
        let id = job_id.to_string();
        Ok(self
            .attempts_where("job_id = ?1 AND epoch = ?2", &[&id, &(epoch as i64)])?
            .pop())
    }

    fn put_attempt(&mut self, a: &AttemptRecord) -> Result<()> {
        let id = a.job_id.to_string();
        self.tx.execute(
            "INSERT OR REPLACE INTO attempts (job_id, epoch, started_ms, ended_ms, outcome, reason, \
             resume_from, master_addr, master_port) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                id,
                a.epoch as i64,
                a.started_ms,
                a.ended_ms,
                a.outcome.map_or("", |o| o.name()),
                a.reason,
                a.resume_from,
                a.master_addr,
                a.master_port
            ],
        )?;
        let mut st = self.tx.prepare_cached(
            "INSERT OR REPLACE INTO attempt_ranks (job_id, epoch, rank, worker_id, device, \
             started_ms, exited_ms, exit_success, exit_info) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for r in &a.ranks {
            st.execute(params![
                id,
                a.epoch as i64,
                r.rank,
                r.worker_id.to_string(),
                r.device,
                r.started_ms,
                r.exited_ms,
                r.exit_success,
                r.exit_info
            ])?;
        }
        Ok(())
    }

    fn open_attempts(&mut self) -> Result<Vec<AttemptRecord>> {
        self.attempts_where(
            "a.ended_ms IS NULL OR EXISTS (SELECT 1 FROM attempt_ranks r WHERE r.job_id = a.job_id \
             AND r.epoch = a.epoch AND r.exited_ms IS NULL)",
            &[],
        )
    }

    fn get_worker(&mut self, id: WorkerId) -> Result<Option<WorkerRecord>> {
        let raw = self
            .tx
            .query_row(
                &format!("SELECT {WORKER_COLS} FROM workers WHERE id = ?1"),
                params![id.to_string()],
                worker_from_row,
            )
            .optional()?;
        raw.map(worker_finish).transpose()
    }

    fn get_worker_by_name(&mut self, name: &str) -> Result<Option<WorkerRecord>> {
        let raw = self
            .tx
            .query_row(
                &format!("SELECT {WORKER_COLS} FROM workers WHERE name = ?1"),
                params![name],
                worker_from_row,
            )
            .optional()?;
        raw.map(worker_finish).transpose()
    }

    fn put_worker(&mut self, w: &WorkerRecord) -> Result<()> {
        let devices = serde_json::to_string(&w.devices)
            .map_err(|e| Error::Internal(format!("encode devices: {e}")))?;
        self.tx.execute(
            &format!(
                "INSERT OR REPLACE INTO workers ({WORKER_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ),
            params![
                w.id.to_string(),
                w.name,
                w.host,
                devices,
                w.port_start,
                w.port_end,
                worker_state_code(w.state),
                w.last_seen_ms,
                w.drained
            ],
        )?;
        Ok(())
    }

    fn list_workers(&mut self) -> Result<Vec<WorkerRecord>> {
        let mut st = self
            .tx
            .prepare(&format!("SELECT {WORKER_COLS} FROM workers ORDER BY name"))?;
        let raws = st
            .query_map([], worker_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raws.into_iter().map(worker_finish).collect()
    }

    fn put_checkpoint(&mut self, c: &CheckpointRecord) -> Result<()> {
        self.tx.execute(
            "INSERT OR REPLACE INTO checkpoints (job_id, step, epoch, path, size_bytes, sha256, \
             created_ms, deleted) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                c.job_id.to_string(),
                c.step as i64,
                c.epoch,
                c.path,
                c.size_bytes as i64,
                c.sha256,
                c.created_ms,
                c.deleted
            ],
        )?;
        Ok(())
    }

    fn list_checkpoints(
        &mut self,
        job_id: JobId,
        include_deleted: bool,
    ) -> Result<Vec<CheckpointRecord>> {
        let mut st = self.tx.prepare_cached(
            "SELECT step, epoch, path, size_bytes, sha256, created_ms, deleted FROM checkpoints \
             WHERE job_id = ?1 AND (?2 OR deleted = 0) ORDER BY step",
        )?;
        let rows = st
            .query_map(params![job_id.to_string(), include_deleted], |r| {
                Ok(CheckpointRecord {
                    job_id,
                    step: r.get::<_, i64>(0)? as u64,
                    epoch: r.get(1)?,
                    path: r.get(2)?,
                    size_bytes: r.get::<_, i64>(3)? as u64,
                    sha256: r.get(4)?,
                    created_ms: r.get(5)?,
                    deleted: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn append_event(&mut self, ev: &mut JobEvent) -> Result<()> {
        ev.seq = 0;
        let payload = stored::encode_event(&ev.kind)?;
        self.tx.execute(
            "INSERT INTO events (job_id, step, kind, time_ms, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                ev.job_id.to_string(),
                ev.step as i64,
                ev.kind.name(),
                ev.time_ms,
                payload
            ],
        )?;
        ev.seq = self.tx.last_insert_rowid() as u64;
        Ok(())
    }

    fn list_events(
        &mut self,
        job_id: JobId,
        from_step: u64,
        only_kind: Option<&str>,
    ) -> Result<Vec<JobEvent>> {
        let mut st = self.tx.prepare_cached(
            "SELECT seq, time_ms, step, payload FROM events WHERE job_id = ?1 \
             AND (kind = 'state' OR step >= ?2) AND (?3 IS NULL OR kind = ?3) ORDER BY seq",
        )?;
        let rows = st
            .query_map(
                params![
                    job_id.to_string(),
                    from_step.min(i64::MAX as u64) as i64,
                    only_kind
                ],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(seq, time_ms, step, payload)| {
                Ok(JobEvent {
                    seq: seq as u64,
                    time_ms,
                    step: step as u64,
                    job_id,
                    kind: stored::decode_event(&payload, &format!("event {seq}"))?,
                })
            })
            .collect()
    }

    fn count_events(&mut self, job_id: JobId, kind: &str) -> Result<u64> {
        let n: i64 = self.tx.query_row(
            "SELECT COUNT(*) FROM events WHERE job_id = ?1 AND kind = ?2",
            params![job_id.to_string(), kind],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    fn thin_events(&mut self, job_id: JobId, kind: &str, oldest: u64) -> Result<u64> {
        // Every other one of the `oldest` oldest events of the kind goes; a curve keeps its shape.
        let n = self.tx.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM (SELECT seq, ROW_NUMBER() OVER \
             (ORDER BY seq) AS i FROM events WHERE job_id = ?1 AND kind = ?3 ORDER BY seq \
             LIMIT ?2) WHERE i % 2 = 0)",
            params![job_id.to_string(), oldest.min(i64::MAX as u64) as i64, kind],
        )?;
        Ok(n as u64)
    }

    fn append_logs(
        &mut self,
        job_id: JobId,
        epoch: u64,
        rank: u32,
        time_ms: i64,
        lines: &[String],
    ) -> Result<u64> {
        let id = job_id.to_string();
        let mut st = self.tx.prepare_cached(
            "INSERT INTO log_lines (job_id, epoch, rank, time_ms, text) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for line in lines {
            st.execute(params![id, epoch as i64, rank, time_ms, line])?;
        }
        Ok(self.tx.last_insert_rowid() as u64)
    }

    fn list_logs(&mut self, job_id: JobId, q: &LogQuery) -> Result<Vec<LogLine>> {
        let ranks = if q.ranks.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = q.ranks.iter().map(|r| r.to_string()).collect();
            format!(" AND rank IN ({})", list.join(","))
        };
        let cap = |n: u64| {
            if n == 0 {
                -1
            } else {
                n.min(i64::MAX as u64) as i64
            }
        };
        // With a tail, the newest first (then put back in order); else the oldest first.
        let (order, limit) = if q.tail > 0 {
            ("DESC", cap(q.tail))
        } else {
            ("ASC", cap(q.limit))
        };
        let sql = format!(
            "SELECT seq, epoch, rank, time_ms, text FROM log_lines WHERE job_id = ?1 AND seq > ?2\
             {ranks} ORDER BY seq {order} LIMIT ?3"
        );
        let mut st = self.tx.prepare_cached(&sql)?;
        let mut lines = st
            .query_map(
                params![
                    job_id.to_string(),
                    q.after.min(i64::MAX as u64) as i64,
                    limit
                ],
                |r| {
                    Ok(LogLine {
                        seq: r.get::<_, i64>(0)? as u64,
                        job_id,
                        epoch: r.get::<_, i64>(1)? as u64,
                        rank: r.get(2)?,
                        time_ms: r.get(3)?,
                        text: r.get(4)?,
                    })
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        if q.tail > 0 {
            lines.reverse();
        }
        Ok(lines)
    }

    fn count_logs(&mut self, job_id: JobId) -> Result<u64> {
        let n: i64 = self.tx.query_row(
            "SELECT COUNT(*) FROM log_lines WHERE job_id = ?1",
            [job_id.to_string()],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    fn drop_oldest_logs(&mut self, job_id: JobId, n: u64) -> Result<u64> {
        let gone = self.tx.execute(
            "DELETE FROM log_lines WHERE seq IN (SELECT seq FROM log_lines WHERE job_id = ?1 \
             ORDER BY seq LIMIT ?2)",
            params![job_id.to_string(), n.min(i64::MAX as u64) as i64],
        )?;
        Ok(gone as u64)
    }

    fn delete_job(&mut self, job_id: JobId) -> Result<Deleted> {
        let id = job_id.to_string();
        let del = |tx: &Transaction, table: &str| -> Result<u64> {
            Ok(tx.execute(&format!("DELETE FROM {table} WHERE job_id = ?1"), [&id])? as u64)
        };
        let deleted = Deleted {
            events: del(&self.tx, "events")?,
            checkpoints: del(&self.tx, "checkpoints")?,
            log_lines: del(&self.tx, "log_lines")?,
        };
        del(&self.tx, "attempt_ranks")?;
        del(&self.tx, "attempts")?;
        self.tx.execute("DELETE FROM jobs WHERE id = ?1", [&id])?;
        Ok(deleted)
    }

    fn prune_finished_history(&mut self, before_ms: i64) -> Result<(u64, u64)> {
        let finished: Vec<String> = [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
            .iter()
            .map(|s| job_state_code(*s).to_string())
            .collect();
        let finished = finished.join(",");
        let jobs_sql = format!(
            "SELECT id FROM jobs WHERE state IN ({finished}) AND updated_ms < ?1 AND (\
             EXISTS (SELECT 1 FROM events e WHERE e.job_id = jobs.id \
                     AND e.kind IN ('metrics', 'picture')) \
             OR EXISTS (SELECT 1 FROM log_lines l WHERE l.job_id = jobs.id))"
        );
        let ids = self
            .tx
            .prepare(&jobs_sql)?
            .query_map([before_ms], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut rows = 0u64;
        for id in &ids {
            rows += self.tx.execute(
                "DELETE FROM events WHERE job_id = ?1 AND kind IN ('metrics', 'picture')",
                [id],
            )? as u64;
            rows += self
                .tx
                .execute("DELETE FROM log_lines WHERE job_id = ?1", [id])?
                as u64;
        }
        Ok((ids.len() as u64, rows))
    }

    fn commit(self: Box<Self>) -> Result<()> {
        self.tx.commit()?;
        Ok(())
    }
}
