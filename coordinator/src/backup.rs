//! Online backups of the state database and restoring one.
//!
//! A backup is `VACUUM INTO` from a connection of its own: one read transaction, so it is a
//! consistent snapshot of every committed transition while the coordinator keeps writing (WAL
//! readers and the writer do not block each other). It is written to a temporary file (mode
//! 0600) next to its destination, checked (`PRAGMA integrity_check`), synced, and renamed into
//! place, so a backup file is always whole. In a directory, backups are named
//! `bt-state-<UTC time>.db` and the oldest beyond `keep` are deleted.
//!
//! `bt-coordinator backup` takes one by hand; with `backup.dir` set the coordinator takes them
//! itself every `backup.interval_s`. `bt-coordinator restore` checks a backup (integrity, a bt
//! schema, that this coordinator can open it) before it replaces a database, and refuses to
//! replace a non-empty one without `--force` or one a running coordinator has open. A restored
//! database's fencing counter moves on by [`RESTORE_EPOCH_JUMP`]: attempts the lost coordinator
//! started after the backup may still have trainers running, and their epochs must stay stale.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rusqlite::{Connection, OpenFlags};
use tracing::{error, info};

use crate::config::BackupConfig;

/// Backups in a directory: `bt-state-<UTC time>.db`; the name sorts by time.
pub const BACKUP_PREFIX: &str = "bt-state-";
pub const BACKUP_SUFFIX: &str = ".db";

/// Tables every bt state database has (schema 1 and later).
const BT_TABLES: [&str; 8] = [
    "meta",
    "jobs",
    "attempts",
    "attempt_ranks",
    "workers",
    "checkpoints",
    "events",
    "log_lines",
];

/// What a backup wrote.
#[derive(Debug, Clone)]
pub struct BackupInfo {
    pub path: PathBuf,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Older backups deleted by the retention.
    pub removed: Vec<PathBuf>,
}

/// What a database (or a backup) holds, as far as a person wants to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `meta.schema` (1 when absent: the first schema).
    pub schema: i64,
    pub jobs: u64,
    pub events: u64,
}

/// How far a restore moves the fencing counter (`meta.epoch`) on: beyond every attempt epoch the
/// lost coordinator may have handed out after the backup, so that none is ever issued twice (a
/// trainer of such an attempt may still be running, and its reports must stay stale).
pub const RESTORE_EPOCH_JUMP: i64 = 1_000_000;

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreInfo {
    pub summary: Summary,
    /// Where the database it replaced was kept (with `--force`).
    pub previous: Option<PathBuf>,
}

/// `ms` since the Unix epoch as `YYYYMMDDTHHMMSS.mmmZ` (sorts by time, no `:` in file names).
fn stamp(ms: i64) -> String {
    let (y, mo, d, h, mi, s, ms) = bt_common::utc_parts(ms);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}.{ms:03}Z")
}

/// A temporary file removed on drop unless it was kept.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    /// Creates `dir/.NAME.tmp-PID-N`, empty, mode 0600.
    fn create(dir: &Path, name: &str) -> anyhow::Result<TempFile> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = dir.join(format!(
            ".{name}.tmp-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(TempFile { path, keep: false })
    }

    fn utf8(&self) -> anyhow::Result<&str> {
        self.path
            .to_str()
            .with_context(|| format!("{} is not a UTF-8 path", self.path.display()))
    }

    /// Syncs it, renames it to `to` and syncs the directory: `to` is whole or absent.
    fn install(mut self, to: &Path) -> anyhow::Result<()> {
        File::open(&self.path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", self.path.display()))?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("setting the mode of {}", self.path.display()))?;
        std::fs::rename(&self.path, to)
            .with_context(|| format!("renaming {} to {}", self.path.display(), to.display()))?;
        self.keep = true;
        sync_dir(to);
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
            for ext in ["-journal", "-wal", "-shm"] {
                let mut p = self.path.as_os_str().to_owned();
                p.push(ext);
                let _ = std::fs::remove_file(PathBuf::from(p));
            }
        }
    }
}

/// Creates `dir` (and its parents) private to this user when missing; an existing one is left
/// as it is.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

fn sync_dir(file: &Path) {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

fn sidecar(db: &Path, ext: &str) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(ext);
    PathBuf::from(p)
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks that `conn` holds a bt state database; returns what it holds. `what` names it in errors.
fn bt_summary(conn: &Connection, what: &str) -> anyhow::Result<Summary> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .and_then(|mut st| {
            st.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<_>>()
        })
        .with_context(|| format!("{what} is not a readable SQLite database"))?;
    if let Some(missing) = BT_TABLES.iter().find(|t| !tables.iter().any(|n| n == *t)) {
        bail!("{what} is not a bt state database (it has no `{missing}` table)");
    }
    let meta = |key: &str| -> rusqlite::Result<Option<i64>> {
        use rusqlite::OptionalExtension;
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
    };
    let read = || -> rusqlite::Result<Summary> {
        if meta("epoch")?.is_none() {
            return Err(rusqlite::Error::QueryReturnedNoRows);
        }
        Ok(Summary {
            schema: meta("schema")?.unwrap_or(1),
            jobs: conn.query_row("SELECT count(*) FROM jobs", [], |r| r.get::<_, i64>(0))? as u64,
            events: conn.query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))?
                as u64,
        })
    };
    read()
        .with_context(|| format!("{what} is not a bt state database (its meta table is not bt's)"))
}

/// `PRAGMA integrity_check` on `conn`: Ok if it says "ok", else an error naming `what` and the
/// first problems it lists.
fn integrity(conn: &Connection, what: &str) -> anyhow::Result<()> {
    let rows: Vec<String> = conn
        .prepare("PRAGMA integrity_check(20)")
        .and_then(|mut st| {
            st.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<_>>()
        })
        .with_context(|| format!("{what} is corrupt or not a SQLite database"))?;
    if rows.len() == 1 && rows[0] == "ok" {
        return Ok(());
    }
    bail!(
        "{what} is corrupt (integrity_check: {})",
        rows.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
    )
}

/// Opens an existing database at `db` without creating it and without touching its schema.
fn open_existing(db: &Path, flags: OpenFlags) -> anyhow::Result<Connection> {
    if !db.is_file() {
        bail!("{} does not exist (or is not a file)", db.display());
    }
    let conn = Connection::open_with_flags(db, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .with_context(|| format!("opening {}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

/// Where a backup of `out` goes: `out` itself, or a timestamped file in it when it is a
/// directory (`as_dir`, or it exists as one, or is written with a trailing `/`; created if
/// missing). Returns (dir, file name, whether in a directory).
fn destination(out: &Path, keep: usize, as_dir: bool) -> anyhow::Result<(PathBuf, String, bool)> {
    let as_dir = as_dir || out.is_dir() || out.as_os_str().to_string_lossy().ends_with('/');
    if as_dir {
        create_private_dir(out)?;
        let name = format!(
            "{BACKUP_PREFIX}{}{BACKUP_SUFFIX}",
            stamp(bt_common::now_ms())
        );
        return Ok((out.to_path_buf(), name, true));
    }
    if keep > 0 {
        bail!(
            "--keep needs --out to be a directory (it keeps the newest {BACKUP_PREFIX}*{BACKUP_SUFFIX} \
             there); {} is not one",
            out.display()
        );
    }
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} is not a file name", out.display()))?
        .to_string();
    let dir = parent_of(out);
    create_private_dir(&dir)?;
    Ok((dir, name, false))
}

/// An online backup of the state database `db` to `out` (a file, or a directory for a
/// timestamped file); in a directory, keeps the newest `keep` backups (0: all).
pub fn backup(db: &Path, out: &Path, keep: usize) -> anyhow::Result<BackupInfo> {
    backup_inner(db, destination(out, keep, false)?, keep)
}

/// An online backup of `db` to a timestamped file in `dir` (created if missing), keeping the
/// newest `keep` (0: all).
pub fn backup_to_dir(db: &Path, dir: &Path, keep: usize) -> anyhow::Result<BackupInfo> {
    backup_inner(db, destination(dir, keep, true)?, keep)
}

fn backup_inner(
    db: &Path,
    (dir, name, in_dir): (PathBuf, String, bool),
    keep: usize,
) -> anyhow::Result<BackupInfo> {
    let started = Instant::now();
    let path = dir.join(&name);
    if path.exists() {
        bail!("{} exists already; name another file", path.display());
    }
    let src = open_existing(db, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .context("opening the state database to back it up")?;
    bt_summary(&src, &format!("{}", db.display()))?;
    let tmp = TempFile::create(&dir, &name)?;
    src.execute("VACUUM INTO ?1", [tmp.utf8()?])
        .with_context(|| format!("backing up {} into {}", db.display(), tmp.path.display()))?;
    drop(src);
    {
        // A self-contained file (no -wal beside it), checked before it counts as a backup.
        let out = Connection::open_with_flags(&tmp.path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        let mode: String = out.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("delete") {
            bail!("the backup {} stays in {mode} mode", tmp.path.display());
        }
        integrity(&out, &format!("the new backup {}", tmp.path.display()))?;
    }
    tmp.install(&path)?;
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let removed = if in_dir && keep > 0 {
        prune(&dir, keep)?
    } else {
        Vec::new()
    };
    Ok(BackupInfo {
        path,
        bytes,
        elapsed: started.elapsed(),
        removed,
    })
}

/// The backups in `dir` (by name, so oldest first).
pub fn list_backups(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with(BACKUP_PREFIX)
                && n.ends_with(BACKUP_SUFFIX)
                && e.file_type().is_ok_and(|t| t.is_file())
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// Deletes all but the newest `keep` backups in `dir`; returns what it deleted.
fn prune(dir: &Path, keep: usize) -> anyhow::Result<Vec<PathBuf>> {
    let all = list_backups(dir)?;
    let extra = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for p in all.into_iter().take(extra) {
        std::fs::remove_file(&p).with_context(|| format!("deleting {}", p.display()))?;
        removed.push(p);
    }
    Ok(removed)
}

/// Checks a backup before it is restored: it exists, `PRAGMA integrity_check` passes, and it is
/// a bt state database. Every error names its path.
pub fn verify_backup(from: &Path) -> anyhow::Result<Summary> {
    let what = format!("backup {}", from.display());
    let conn = open_existing(from, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("{what} cannot be opened"))?;
    integrity(&conn, &what)?;
    bt_summary(&conn, &what)
}

/// Whether a process (a running coordinator) has the database open: it cannot be locked
/// exclusively.
fn in_use(db: &Path) -> bool {
    let Ok(conn) = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE) else {
        return false;
    };
    let locked = conn
        .execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; COMMIT;")
        .is_err();
    let _ = conn.close();
    locked
}

/// Restores the backup `from` as the state database `db`. Refuses a backup that fails
/// [`verify_backup`], a `db` a coordinator has open, and a non-empty `db` unless `force` (the
/// replaced database is then kept beside it as `DB.pre-restore-<time>`).
pub fn restore(from: &Path, db: &Path, force: bool) -> anyhow::Result<RestoreInfo> {
    let summary = verify_backup(from)?;
    let wal = sidecar(db, "-wal");
    let occupied = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.len() > 0);
    let existing = db.exists() && (occupied(db) || occupied(&wal));
    if existing {
        if in_use(db) {
            bail!(
                "{} is in use (a coordinator has it open): stop the coordinator before restoring",
                db.display()
            );
        }
        if !force {
            let held = open_existing(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .and_then(|c| bt_summary(&c, "it"))
                .map(|s| format!("{} jobs, {} events", s.jobs, s.events))
                .unwrap_or_else(|e| format!("{e:#}"));
            bail!(
                "{} exists and is not empty ({held}); pass --force to replace it (it is then kept \
                 as {}.pre-restore-<time>)",
                db.display(),
                db.display()
            );
        }
    }
    let dir = parent_of(db);
    create_private_dir(&dir)?;
    let name = db
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} is not a file name", db.display()))?
        .to_string();
    let tmp = TempFile::create(&dir, &name)?;
    {
        let src = open_existing(from, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        src.execute("VACUUM INTO ?1", [tmp.utf8()?])
            .with_context(|| format!("copying backup {}", from.display()))?;
    }
    // The copy must open as this coordinator's state: schema migrations run now, and a backup
    // from a newer coordinator is refused here rather than at start.
    drop(
        crate::store::SqliteStore::open(&tmp.path)
            .map_err(|e| anyhow::anyhow!("backup {}: {e}", from.display()))?,
    );
    {
        let c = Connection::open_with_flags(&tmp.path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        c.execute(
            "UPDATE meta SET value = value + ?1 WHERE key = 'epoch'",
            [RESTORE_EPOCH_JUMP],
        )
        .context("moving the fencing counter on")?;
    }
    let tmp_wal = sidecar(&tmp.path, "-wal");
    if occupied(&tmp_wal) {
        bail!("{} was left behind; not restoring", tmp_wal.display());
    }
    let mut previous = None;
    if existing {
        // Kept, with what its WAL held, before anything of it is removed.
        let keep = sidecar(db, &format!(".pre-restore-{}", stamp(bt_common::now_ms())));
        let old = open_existing(db, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        let kept = keep
            .to_str()
            .context("not a UTF-8 path")
            .and_then(|k| Ok(old.execute("VACUUM INTO ?1", [k])?));
        drop(old);
        match kept {
            Ok(_) => {
                let _ = std::fs::set_permissions(&keep, std::fs::Permissions::from_mode(0o600));
                previous = Some(keep);
            }
            Err(e) => {
                // --force: an unreadable database is replaced all the same.
                let _ = std::fs::remove_file(&keep);
                tracing::warn!(error = %format!("{e:#}"), db = %db.display(),
                    "the replaced database could not be kept");
            }
        }
    }
    // A WAL left beside the old database would be replayed into the restored one.
    for ext in ["-wal", "-shm", "-journal"] {
        let p = sidecar(db, ext);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("removing {}: {e}", p.display()),
        }
    }
    tmp.install(db)?;
    Ok(RestoreInfo { summary, previous })
}

/// Scheduled backups (`backup.dir` set): one at start, then every `interval_s`, each in a
/// blocking thread (the coordinator's own connection is not involved).
pub async fn scheduled(db: PathBuf, cfg: BackupConfig) {
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.interval_s.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(dir = %cfg.dir.display(), interval_s = cfg.interval_s, keep = cfg.keep,
          "scheduled backups of the state database");
    loop {
        tick.tick().await;
        let (db, dir, keep) = (db.clone(), cfg.dir.clone(), cfg.keep);
        match tokio::task::spawn_blocking(move || backup_to_dir(&db, &dir, keep)).await {
            Ok(Ok(b)) => info!(path = %b.path.display(), bytes = b.bytes,
                               ms = b.elapsed.as_millis() as u64, removed = b.removed.len(),
                               "state database backed up"),
            Ok(Err(e)) => error!(error = %format!("{e:#}"), dir = %cfg.dir.display(),
                                 "scheduled backup failed"),
            Err(e) => error!(error = %e, "scheduled backup task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_db(dir: &Path) -> PathBuf {
        let db = dir.join("state/coordinator.db");
        drop(crate::store::SqliteStore::open(&db).unwrap());
        let c = Connection::open(&db).unwrap();
        c.execute_batch(
            "INSERT INTO events (job_id, step, kind, time_ms, payload) VALUES ('j', 1, 'x', 1, x'00');",
        )
        .unwrap();
        db
    }

    #[test]
    fn stamps_sort_and_are_civil() {
        assert_eq!(stamp(0), "19700101T000000.000Z");
        assert_eq!(stamp(1_796_694_330_123), "20261208T014530.123Z");
        assert!(stamp(1_000) < stamp(10_000));
    }

    #[test]
    fn backs_up_into_a_directory_with_retention_and_restores() {
        let t = tempfile::tempdir().unwrap();
        let db = state_db(t.path());
        let dir = t.path().join("backups");
        let mut made = Vec::new();
        for _ in 0..3 {
            let b = backup(&db, &PathBuf::from(format!("{}/", dir.display())), 2).unwrap();
            let mode = std::fs::metadata(&b.path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", b.path.display());
            assert!(b.bytes > 0);
            made.push(b.path);
            std::thread::sleep(Duration::from_millis(3));
        }
        // The scheduled form: a directory that does not exist yet.
        let sched = t.path().join("not/yet");
        let b = backup_to_dir(&db, &sched, 1).unwrap();
        assert!(b.path.starts_with(&sched), "{}", b.path.display());
        backup_to_dir(&db, &sched, 1).unwrap();
        assert_eq!(list_backups(&sched).unwrap().len(), 1);
        let left = list_backups(&dir).unwrap();
        assert_eq!(left, made[1..].to_vec());
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        let s = verify_backup(&left[1]).unwrap();
        assert_eq!(s.events, 1);

        let target = t.path().join("fresh/state.db");
        let r = restore(&left[1], &target, false).unwrap();
        assert_eq!(r.summary.events, 1);
        assert!(r.previous.is_none());
        let epoch = |p: &Path| -> i64 {
            Connection::open(p)
                .unwrap()
                .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                    r.get(0)
                })
                .unwrap()
        };
        assert_eq!(epoch(&target), epoch(&db) + RESTORE_EPOCH_JUMP);
        let dir_mode = std::fs::metadata(target.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        // Not over a database with something in it, unless forced; then the old one is kept.
        let e = format!("{:#}", restore(&left[0], &target, false).unwrap_err());
        assert!(e.contains("--force") && e.contains("not empty"), "{e}");
        let r = restore(&left[0], &target, true).unwrap();
        assert!(r.previous.as_ref().unwrap().exists());
        drop(crate::store::SqliteStore::open(&target).unwrap());
    }

    #[test]
    fn a_file_destination_refuses_keep_and_an_existing_file() {
        let t = tempfile::tempdir().unwrap();
        let db = state_db(t.path());
        let out = t.path().join("one.db");
        let e = format!("{:#}", backup(&db, &out, 3).unwrap_err());
        assert!(e.contains("--keep needs --out to be a directory"), "{e}");
        backup(&db, &out, 0).unwrap();
        let e = format!("{:#}", backup(&db, &out, 0).unwrap_err());
        assert!(e.contains("exists already"), "{e}");
        let e = format!(
            "{:#}",
            backup(&t.path().join("nope.db"), &t.path().join("x.db"), 0).unwrap_err()
        );
        assert!(e.contains("nope.db") && e.contains("does not exist"), "{e}");
    }

    #[test]
    fn a_corrupt_backup_is_refused_with_its_path() {
        let t = tempfile::tempdir().unwrap();
        let db = state_db(t.path());
        let good = t.path().join("good.db");
        backup(&db, &good, 0).unwrap();
        let target = t.path().join("restored/state.db");

        // Garbage over the middle of the file: pages of tables and indexes.
        let mut bytes = std::fs::read(&good).unwrap();
        assert!(bytes.len() >= 8192, "{}", bytes.len());
        let bad = t.path().join("bad.db");
        for b in &mut bytes[4096..] {
            *b = 0x5a;
        }
        std::fs::write(&bad, &bytes).unwrap();
        let e = format!("{:#}", restore(&bad, &target, false).unwrap_err());
        assert!(
            e.contains(&bad.display().to_string()) && e.contains("corrupt"),
            "{e}"
        );
        assert!(
            !target.exists(),
            "nothing is restored from a corrupt backup"
        );

        // Not a database at all.
        let text = t.path().join("notes.db");
        std::fs::write(&text, "hello, not a database\n".repeat(300)).unwrap();
        let e = format!("{:#}", restore(&text, &target, false).unwrap_err());
        assert!(e.contains(&text.display().to_string()), "{e}");

        // A sound SQLite file that is not bt's.
        let other = t.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE jobs (x); CREATE TABLE meta (key, value);")
            .unwrap();
        let e = format!("{:#}", restore(&other, &target, false).unwrap_err());
        assert!(
            e.contains(&other.display().to_string()) && e.contains("not a bt state database"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            restore(&t.path().join("gone.db"), &target, false).unwrap_err()
        );
        assert!(e.contains("gone.db"), "{e}");
        assert!(!target.exists());
    }

    #[test]
    fn restore_refuses_a_database_in_use() {
        let t = tempfile::tempdir().unwrap();
        let db = state_db(t.path());
        let b = t.path().join("b.db");
        backup(&db, &b, 0).unwrap();
        let store = crate::store::SqliteStore::open(&db).unwrap();
        let e = format!("{:#}", restore(&b, &db, true).unwrap_err());
        assert!(e.contains("in use"), "{e}");
        drop(store);
        restore(&b, &db, true).unwrap();
    }
}
