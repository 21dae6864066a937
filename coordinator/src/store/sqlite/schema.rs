//! The database schema, created on open (idempotent), and the migrations from earlier ones.
use rusqlite::OptionalExtension;

pub(super) const SCHEMA: &str = r#"
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
    last_metrics BLOB,
    owner TEXT NOT NULL DEFAULT '',
    probe_checkpoint TEXT NOT NULL DEFAULT '',
    keep_last INTEGER NOT NULL DEFAULT 0,
    keep_every_epochs INTEGER NOT NULL DEFAULT 0,
    auto_eval INTEGER NOT NULL DEFAULT 0,
    preemptions INTEGER NOT NULL DEFAULT 0
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
    last_seen_ms INTEGER NOT NULL,
    drained TEXT NOT NULL DEFAULT ''
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
CREATE TABLE IF NOT EXISTS log_lines (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS log_lines_job ON log_lines (job_id, rank, seq);
"#;

/// The schema version this coordinator writes (`meta.schema`). A database without one was written
/// by the first schema: events and last metrics as protobuf messages of the wire protocol.
///
/// - 2: event bodies and a job's last metrics in their own stored form (versioned JSON, see
///   `stored`), no longer the wire's encoding.
/// - 3: what the coordinator needs from a job's spec at run time as columns of `jobs`
///   (`probe_checkpoint`, `keep_last`, `keep_every_epochs`, `auto_eval`), taken from the spec once.
/// - 4: a preempted attempt has its own outcome (`preempted`); before, it was stored as `failed`
///   with a reason beginning "preempted: ".
pub(super) const SCHEMA_VERSION: i64 = 4;

/// Columns added to `jobs` after the first schema: (name, definition).
const ADDED_JOB_COLUMNS: [(&str, &str); 6] = [
    ("owner", "TEXT NOT NULL DEFAULT ''"),
    ("probe_checkpoint", "TEXT NOT NULL DEFAULT ''"),
    ("keep_last", "INTEGER NOT NULL DEFAULT 0"),
    ("keep_every_epochs", "INTEGER NOT NULL DEFAULT 0"),
    ("auto_eval", "INTEGER NOT NULL DEFAULT 0"),
    ("preemptions", "INTEGER NOT NULL DEFAULT 0"),
];

/// Columns added to `workers` after the first schema: (name, definition).
const ADDED_WORKER_COLUMNS: [(&str, &str); 1] = [("drained", "TEXT NOT NULL DEFAULT ''")];

/// Brings a database written by an earlier version up to this schema (idempotent), in one
/// transaction.
pub(super) fn migrate(conn: &mut rusqlite::Connection) -> crate::error::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let added = ADDED_JOB_COLUMNS
        .iter()
        .map(|c| ("jobs", c))
        .chain(ADDED_WORKER_COLUMNS.iter().map(|c| ("workers", c)));
    for (table, (name, def)) in added {
        let has = tx
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists([name])?;
        if !has {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {def};"))?;
        }
    }
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS events_job_kind ON events (job_id, kind, seq);\n\
         CREATE INDEX IF NOT EXISTS jobs_probe ON jobs (kind, probe_checkpoint);",
    )?;
    let version: i64 = tx
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(1);
    if version > SCHEMA_VERSION {
        return Err(crate::error::Error::Corrupt(format!(
            "the database has schema version {version}, newer than this coordinator's \
             ({SCHEMA_VERSION}): run a newer coordinator"
        )));
    }
    if version < 2 {
        legacy::events_and_metrics_to_stored_form(&tx)?;
    }
    if version < 3 {
        run_info_from_specs(&tx)?;
    }
    if version < 4 {
        tx.execute(
            "UPDATE attempts SET outcome = 'preempted' \
             WHERE outcome = 'failed' AND reason LIKE 'preempted: %'",
            [],
        )?;
    }
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?1)",
        [SCHEMA_VERSION],
    )?;
    tx.commit()?;
    Ok(())
}

/// Schema 3: the run-time parts of every stored spec, parsed this once. A spec that no longer
/// parses keeps the defaults (no probe checkpoint, keep every checkpoint, no auto-eval), which is
/// what the coordinator did with it before.
fn run_info_from_specs(tx: &rusqlite::Transaction<'_>) -> crate::error::Result<()> {
    let jobs: Vec<(String, String)> = tx
        .prepare("SELECT id, spec_toml FROM jobs")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (id, spec) in jobs {
        let Ok(spec) = bt_common::JobSpec::from_toml_str(&spec) else {
            tracing::warn!(job_id = %id, "stored spec does not parse; run-time columns keep their defaults");
            continue;
        };
        let run = super::super::JobRunInfo::of(&spec);
        tx.execute(
            "UPDATE jobs SET probe_checkpoint = ?1, keep_last = ?2, keep_every_epochs = ?3, \
             auto_eval = ?4 WHERE id = ?5",
            rusqlite::params![
                run.probe_checkpoint,
                run.keep_last,
                run.keep_every_epochs,
                run.auto_eval,
                id
            ],
        )?;
    }
    Ok(())
}

/// Reading what schema 1 wrote: the wire's protobuf encoding, converted once, at migration.
mod legacy {
    use bt_common::domain;
    use prost::Message;
    use rusqlite::params;

    use crate::error::{Error, Result};

    pub(super) fn events_and_metrics_to_stored_form(tx: &rusqlite::Transaction<'_>) -> Result<()> {
        let rows: Vec<(i64, Vec<u8>)> = tx
            .prepare("SELECT seq, payload FROM events")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (seq, payload) in rows {
            let what = format!("event {seq} (schema 1)");
            let wire = bt_proto::JobEvent::decode(payload.as_slice())
                .map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
            let kind = match domain::JobEvent::try_from(wire.clone()) {
                Ok(ev) => ev.kind,
                // A value outside today's closed sets (an eval kind no longer produced): kept
                // as a warning that says what it was, never dropped and never guessed.
                Err(e) => domain::EventKind::Notice(domain::Notice {
                    level: domain::NoticeLevel::Warn,
                    message: format!("unreadable event from schema 1 ({e}): {:?}", wire.kind),
                }),
            };
            tx.execute(
                "UPDATE events SET payload = ?1, kind = ?2 WHERE seq = ?3",
                params![super::super::stored::encode_event(&kind)?, kind.name(), seq],
            )?;
        }
        let jobs: Vec<(String, Vec<u8>)> = tx
            .prepare("SELECT id, last_metrics FROM jobs WHERE last_metrics IS NOT NULL")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (id, blob) in jobs {
            let wire = bt_proto::TrainMetrics::decode(blob.as_slice())
                .map_err(|e| Error::Corrupt(format!("last_metrics of job {id} (schema 1): {e}")))?;
            let m = domain::TrainMetrics::from(wire);
            tx.execute(
                "UPDATE jobs SET last_metrics = ?1 WHERE id = ?2",
                params![super::super::stored::encode_metrics(&m)?, id],
            )?;
        }
        Ok(())
    }
}
