//! The database schema, created on open (idempotent).

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
    owner TEXT NOT NULL DEFAULT ''
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

/// Brings a database written by an earlier version up to this schema (idempotent).
pub(super) fn migrate(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let has_owner = conn
        .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'owner'")?
        .exists([])?;
    if !has_owner {
        conn.execute_batch("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';")?;
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS events_job_kind ON events (job_id, kind, seq);")
}
