//! The embedded SQLite store: WAL journal, `synchronous=FULL` (a committed transition survives
//! kill -9 and power loss), one connection owned by the coordinator core.
use std::path::Path;

use bt_common::{JobId, WorkerId};
use bt_proto::{job_event, JobEvent, JobState, TrainMetrics, WorkerState};
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::{
    AttemptRecord, CheckpointRecord, DeviceRecord, JobRecord, RankRecord, Store, Tx, WorkerRecord,
};
use crate::error::{Error, Result};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', 0);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    spec_toml TEXT NOT NULL,
    priority INTEGER NOT NULL,
    world_size INTEGER NOT NULL,
    state INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    restarts_used INTEGER NOT NULL,
    max_restarts INTEGER NOT NULL,
    failure_reason TEXT NOT NULL,
    total_steps INTEGER NOT NULL,
    last_metrics BLOB
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_ms);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    resume_from TEXT NOT NULL,
    master_addr TEXT NOT NULL,
    master_port INTEGER NOT NULL,
    PRIMARY KEY (job_id, epoch)
);
CREATE INDEX IF NOT EXISTS attempts_ended ON attempts (ended_ms);
CREATE TABLE IF NOT EXISTS attempt_ranks (
    job_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    device INTEGER NOT NULL,
    started_ms INTEGER,
    exited_ms INTEGER,
    exit_success INTEGER,
    exit_info TEXT NOT NULL,
    PRIMARY KEY (job_id, epoch, rank)
);
CREATE INDEX IF NOT EXISTS attempt_ranks_exited ON attempt_ranks (exited_ms);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    host TEXT NOT NULL,
    devices TEXT NOT NULL,
    port_start INTEGER NOT NULL,
    port_end INTEGER NOT NULL,
    state INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
"#;

pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Internal(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
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

fn parse_job_id(s: &str) -> Result<JobId> {
    s.parse().map_err(Error::Corrupt)
}

fn parse_worker_id(s: &str) -> Result<WorkerId> {
    s.parse().map_err(Error::Corrupt)
}

fn job_state(v: i32) -> Result<JobState> {
    JobState::try_from(v).map_err(|_| Error::Corrupt(format!("job state {v}")))
}

const JOB_COLS: &str = "id, name, kind, spec_toml, priority, world_size, state, created_ms, \
    updated_ms, epoch, attempts, restarts_used, max_restarts, failure_reason, total_steps, last_metrics";

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<(String, JobRecordRaw)> {
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
        },
    ))
}

struct JobRecordRaw {
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
}

fn job_finish((id, r): (String, JobRecordRaw)) -> Result<JobRecord> {
    let last_metrics = match r.last_metrics {
        Some(b) => Some(
            TrainMetrics::decode(b.as_slice())
                .map_err(|e| Error::Corrupt(format!("last_metrics of job {id}: {e}")))?,
        ),
        None => None,
    };
    Ok(JobRecord {
        id: parse_job_id(&id)?,
        name: r.name,
        kind: r.kind,
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
        failure_reason: r.failure_reason,
        total_steps: r.total_steps,
        last_metrics,
    })
}

type WorkerRaw = (String, String, String, String, u32, u32, i32, i64);

fn worker_from_row(r: &Row<'_>) -> rusqlite::Result<WorkerRaw> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

fn worker_finish(w: WorkerRaw) -> Result<WorkerRecord> {
    let devices: Vec<DeviceRecord> = serde_json::from_str(&w.3)
        .map_err(|e| Error::Corrupt(format!("devices of worker {}: {e}", w.0)))?;
    Ok(WorkerRecord {
        id: parse_worker_id(&w.0)?,
        name: w.1,
        host: w.2,
        devices,
        port_start: w.4,
        port_end: w.5,
        state: WorkerState::try_from(w.6)
            .map_err(|_| Error::Corrupt(format!("worker state {}", w.6)))?,
        last_seen_ms: w.7,
    })
}

const WORKER_COLS: &str = "id, name, host, devices, port_start, port_end, state, last_seen_ms";

fn event_kind(ev: &JobEvent) -> &'static str {
    match ev.kind {
        Some(job_event::Kind::State(_)) => "state",
        Some(job_event::Kind::Metrics(_)) => "metrics",
        Some(job_event::Kind::Eval(_)) => "eval",
        Some(job_event::Kind::Checkpoint(_)) => "checkpoint",
        Some(job_event::Kind::Notice(_)) => "notice",
        Some(job_event::Kind::Missed(_)) => "missed",
        None => "none",
    }
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
                outcome,
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
        let metrics = j.last_metrics.as_ref().map(|m| m.encode_to_vec());
        self.tx.execute(
            &format!(
                "INSERT OR REPLACE INTO jobs ({JOB_COLS}) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
            ),
            params![
                j.id.to_string(),
                j.name,
                j.kind,
                j.spec_toml,
                j.priority,
                j.world_size,
                j.state as i32,
                j.created_ms,
                j.updated_ms,
                j.epoch as i64,
                j.attempts,
                j.restarts_used,
                j.max_restarts,
                j.failure_reason,
                j.total_steps as i64,
                metrics,
            ],
        )?;
        Ok(())
    }

    fn list_jobs(&mut self, states: &[JobState]) -> Result<Vec<JobRecord>> {
        let sql = if states.is_empty() {
            format!("SELECT {JOB_COLS} FROM jobs ORDER BY created_ms, rowid")
        } else {
            let list: Vec<String> = states.iter().map(|s| (*s as i32).to_string()).collect();
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
                a.outcome,
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
                "INSERT OR REPLACE INTO workers ({WORKER_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ),
            params![
                w.id.to_string(),
                w.name,
                w.host,
                devices,
                w.port_start,
                w.port_end,
                w.state as i32,
                w.last_seen_ms
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
        let payload = ev.encode_to_vec();
        self.tx.execute(
            "INSERT INTO events (job_id, step, kind, time_ms, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                ev.job_id,
                ev.step as i64,
                event_kind(ev),
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
            "SELECT seq, payload FROM events WHERE job_id = ?1 \
             AND (kind = 'state' OR step >= ?2) AND (?3 IS NULL OR kind = ?3) ORDER BY seq",
        )?;
        let rows = st
            .query_map(
                params![
                    job_id.to_string(),
                    from_step.min(i64::MAX as u64) as i64,
                    only_kind
                ],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(seq, payload)| {
                let mut ev = JobEvent::decode(payload.as_slice())
                    .map_err(|e| Error::Corrupt(format!("event {seq}: {e}")))?;
                ev.seq = seq as u64;
                Ok(ev)
            })
            .collect()
    }

    fn commit(self: Box<Self>) -> Result<()> {
        self.tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bt_proto::StateChange;

    fn job(id: JobId, created_ms: i64) -> JobRecord {
        JobRecord {
            id,
            name: "j".into(),
            kind: "pretrain".into(),
            spec_toml: "world_size = 1\n".into(),
            priority: 0,
            world_size: 1,
            state: JobState::Queued,
            created_ms,
            updated_ms: created_ms,
            epoch: 0,
            attempts: 0,
            restarts_used: 0,
            max_restarts: 2,
            failure_reason: String::new(),
            total_steps: 0,
            last_metrics: None,
        }
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.db");
        let id = JobId::new();
        let wid = WorkerId::new();
        {
            let mut s = SqliteStore::open(&path).unwrap();
            let mut tx = s.begin().unwrap();
            assert_eq!(tx.next_epoch().unwrap(), 1);
            assert_eq!(tx.next_epoch().unwrap(), 2);
            let mut j = job(id, 5);
            j.last_metrics = Some(TrainMetrics {
                step: 7,
                loss: 1.5,
                ..Default::default()
            });
            tx.put_job(&j).unwrap();
            tx.put_worker(&WorkerRecord {
                id: wid,
                name: "w".into(),
                host: "h".into(),
                devices: vec![DeviceRecord {
                    index: 0,
                    kind: "cpu".into(),
                    name: "cpu0".into(),
                }],
                port_start: 100,
                port_end: 200,
                state: WorkerState::Online,
                last_seen_ms: 9,
            })
            .unwrap();
            tx.put_attempt(&AttemptRecord {
                job_id: id,
                epoch: 2,
                started_ms: 1,
                ended_ms: None,
                outcome: String::new(),
                reason: String::new(),
                resume_from: String::new(),
                master_addr: "h".into(),
                master_port: 102,
                ranks: vec![RankRecord {
                    rank: 0,
                    worker_id: wid,
                    device: 0,
                    started_ms: None,
                    exited_ms: None,
                    exit_success: None,
                    exit_info: String::new(),
                }],
            })
            .unwrap();
            tx.put_checkpoint(&CheckpointRecord {
                job_id: id,
                step: 10,
                epoch: 1,
                path: "/c/10".into(),
                size_bytes: 3,
                sha256: "ab".into(),
                created_ms: 4,
                deleted: false,
            })
            .unwrap();
            let mut ev = JobEvent {
                job_id: id.to_string(),
                step: 0,
                kind: Some(job_event::Kind::State(StateChange {
                    state: JobState::Queued as i32,
                    reason: "submitted".into(),
                    epoch: 0,
                })),
                ..Default::default()
            };
            tx.append_event(&mut ev).unwrap();
            assert!(ev.seq > 0);
            tx.commit().unwrap();
            // A rolled-back transaction leaves nothing behind.
            let mut tx = s.begin().unwrap();
            tx.put_job(&job(JobId::new(), 6)).unwrap();
            drop(tx);
        }
        let mut s = SqliteStore::open(&path).unwrap();
        let mut tx = s.begin().unwrap();
        assert_eq!(tx.next_epoch().unwrap(), 3, "the epoch counter is durable");
        let j = tx.get_job(id).unwrap().unwrap();
        assert_eq!(j.last_metrics.unwrap().step, 7);
        assert_eq!(tx.list_jobs(&[]).unwrap().len(), 1);
        assert_eq!(tx.list_jobs(&[JobState::Running]).unwrap().len(), 0);
        let a = tx.get_attempt(id, 2).unwrap().unwrap();
        assert_eq!(a.ranks.len(), 1);
        assert_eq!(a.ranks[0].worker_id, wid);
        assert_eq!(tx.open_attempts().unwrap().len(), 1);
        assert_eq!(tx.get_worker_by_name("w").unwrap().unwrap().id, wid);
        assert_eq!(tx.list_checkpoints(id, false).unwrap()[0].path, "/c/10");
        let evs = tx.list_events(id, 100, None).unwrap();
        assert_eq!(evs.len(), 1, "state events are replayed whatever from_step");
        assert_eq!(tx.list_events(id, 0, Some("eval")).unwrap().len(), 0);
    }
}
