use super::*;
use crate::store::DeviceRecord;
use bt_common::domain::{EventKind, StateChange, TrainMetrics, WorkerState};

fn job(id: JobId, created_ms: i64) -> JobRecord {
    JobRecord {
        id,
        name: "j".into(),
        kind: bt_common::JobKind::Pretrain,
        spec_toml: "world_size = 1\n".into(),
        priority: 0,
        world_size: 1,
        state: JobState::Queued,
        created_ms,
        updated_ms: created_ms,
        epoch: 0,
        attempts: 0,
        restarts_used: 0,
        preemptions: 0,
        max_restarts: 2,
        failure_reason: String::new(),
        total_steps: 0,
        last_metrics: None,
        owner: String::new(),
        run: Default::default(),
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
                kind: bt_common::domain::DeviceKind::Cpu,
                name: "cpu0".into(),
            }],
            port_start: 100,
            port_end: 200,
            state: WorkerState::Online,
            last_seen_ms: 9,
            drained: "disk swap".into(),
        })
        .unwrap();
        tx.put_attempt(&AttemptRecord {
            job_id: id,
            epoch: 2,
            started_ms: 1,
            ended_ms: None,
            outcome: None,
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
            seq: 0,
            time_ms: 0,
            job_id: id,
            step: 0,
            kind: EventKind::State(StateChange {
                state: JobState::Queued,
                reason: "submitted".into(),
                epoch: 0,
            }),
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
    let w = tx.get_worker_by_name("w").unwrap().unwrap();
    assert_eq!((w.id, w.drained.as_str()), (wid, "disk swap"));
    assert_eq!(tx.list_checkpoints(id, false).unwrap()[0].path, "/c/10");
    let evs = tx.list_events(id, 100, None).unwrap();
    assert_eq!(evs.len(), 1, "state events are replayed whatever from_step");
    assert_eq!(tx.list_events(id, 0, Some("eval")).unwrap().len(), 0);
}

/// The `jobs` columns of schema 1 (no owner, no run-time columns).
const SCHEMA_1_JOB_COLUMNS: &str = "id TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, \
    spec_toml TEXT NOT NULL, priority INTEGER NOT NULL, world_size INTEGER NOT NULL, \
    state INTEGER NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, \
    epoch INTEGER NOT NULL, attempts INTEGER NOT NULL, restarts_used INTEGER NOT NULL, \
    max_restarts INTEGER NOT NULL, failure_reason TEXT NOT NULL, total_steps INTEGER NOT NULL, \
    last_metrics BLOB";

/// Today's schema with an earlier `jobs` table.
fn schema_with_jobs_columns(cols: &str) -> String {
    let start = SCHEMA.find("CREATE TABLE IF NOT EXISTS jobs (").unwrap();
    let end = start + SCHEMA[start..].find(");\n").unwrap() + 3;
    format!(
        "{}CREATE TABLE IF NOT EXISTS jobs ({cols});\n{}",
        &SCHEMA[..start],
        &SCHEMA[end..]
    )
}

/// A database as the first schema wrote it (events and last metrics as the wire's protobuf, no
/// `meta.schema`): the rows are inserted with raw SQL exactly as that code wrote them, and the new
/// code reads them as domain values after its migration (run twice: idempotent).
#[test]
fn reads_a_database_written_by_schema_1() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let id = JobId::new();
    {
        let conn = Connection::open(&path).unwrap();
        // Schema 1 had no `owner` column and no kind index either; the tables otherwise match.
        conn.execute_batch(&schema_with_jobs_columns(SCHEMA_1_JOB_COLUMNS))
            .unwrap();
        let metrics = bt_proto::TrainMetrics {
            step: 12,
            loss: 0.5,
            total_steps: 40,
            ..Default::default()
        };
        conn.execute(
            "INSERT INTO jobs (id, name, kind, spec_toml, priority, world_size, state, created_ms, \
             updated_ms, epoch, attempts, restarts_used, max_restarts, failure_reason, total_steps, \
             last_metrics) VALUES (?1, 'old', 'pretrain', 'world_size = 1', 0, 1, 3, 5, 6, 1, 1, 0, \
             2, '', 40, ?2)",
            params![id.to_string(), metrics.encode_to_vec()],
        )
        .unwrap();
        let events = [
            bt_proto::job_event::Kind::State(bt_proto::StateChange {
                state: bt_proto::JobState::Running as i32,
                reason: "all 1 ranks started".into(),
                epoch: 1,
            }),
            bt_proto::job_event::Kind::Metrics(metrics),
            bt_proto::job_event::Kind::Eval(bt_proto::EvalResult {
                step: 12,
                kind: "knn".into(),
                top1: 0.25,
                ..Default::default()
            }),
            bt_proto::job_event::Kind::Checkpoint(bt_proto::CheckpointInfo {
                job_id: id.to_string(),
                step: 12,
                path: "/c/12".into(),
                ..Default::default()
            }),
            bt_proto::job_event::Kind::Notice(bt_proto::Notice {
                level: "warn".into(),
                message: "slow".into(),
                ..Default::default()
            }),
            bt_proto::job_event::Kind::Eval(bt_proto::EvalResult {
                kind: "svm".into(),
                ..Default::default()
            }),
        ];
        let names = ["state", "metrics", "eval", "checkpoint", "notice", "eval"];
        for (i, (kind, name)) in events.into_iter().zip(names).enumerate() {
            let ev = bt_proto::JobEvent {
                seq: 0,
                time_ms: 100 + i as i64,
                step: 12,
                job_id: id.to_string(),
                kind: Some(kind),
            };
            conn.execute(
                "INSERT INTO events (job_id, step, kind, time_ms, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id.to_string(), 12i64, name, ev.time_ms, ev.encode_to_vec()],
            )
            .unwrap();
        }
    }
    for _ in 0..2 {
        let mut s = SqliteStore::open(&path).unwrap();
        let mut tx = s.begin().unwrap();
        let j = tx.get_job(id).unwrap().unwrap();
        assert_eq!(j.state, JobState::Running);
        assert_eq!(j.owner, "");
        let m = j.last_metrics.unwrap();
        assert_eq!((m.step, m.loss, m.total_steps), (12, 0.5, 40));
        let evs = tx.list_events(id, 0, None).unwrap();
        assert_eq!(evs.len(), 6);
        assert_eq!(
            evs[0].kind,
            EventKind::State(StateChange {
                state: JobState::Running,
                reason: "all 1 ranks started".into(),
                epoch: 1,
            })
        );
        assert!(matches!(&evs[1].kind, EventKind::Metrics(m) if m.step == 12 && m.loss == 0.5));
        assert!(
            matches!(&evs[2].kind, EventKind::Eval(e) if e.kind == bt_common::domain::EvalKind::Knn && e.top1 == 0.25)
        );
        assert!(matches!(&evs[3].kind, EventKind::Checkpoint(c) if c.path == "/c/12"));
        assert!(
            matches!(&evs[4].kind, EventKind::Notice(n) if n.level == bt_common::domain::NoticeLevel::Warn)
        );
        assert_eq!(evs[4].time_ms, 104);
        // An eval of a kind outside today's set is kept, as a warning that says what it was.
        assert!(
            matches!(&evs[5].kind, EventKind::Notice(n) if n.message.contains("svm")),
            "{:?}",
            evs[5]
        );
        assert_eq!(tx.list_events(id, 0, Some("eval")).unwrap().len(), 1);
        // New rows after the migration are written (and read back) in the stored form.
        let mut ev = JobEvent {
            seq: 0,
            time_ms: 1,
            step: 13,
            job_id: id,
            kind: EventKind::Notice(bt_common::domain::Notice {
                level: bt_common::domain::NoticeLevel::Info,
                message: "new".into(),
            }),
        };
        tx.append_event(&mut ev).unwrap();
        assert_eq!(
            tx.list_events(id, 13, Some("notice")).unwrap().last(),
            Some(&ev)
        );
        // Not committed: the next round sees the migrated rows only.
    }
}

/// The stored form is versioned: a row of an unknown version is reported, never misread.
#[test]
fn an_event_of_an_unknown_stored_version_is_corrupt_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(&dir.path().join("s.db")).unwrap();
    let id = JobId::new();
    let tx = s.begin().unwrap();
    drop(tx);
    s.conn
        .execute(
            "INSERT INTO events (job_id, step, kind, time_ms, payload) VALUES (?1, 0, 'notice', 0, ?2)",
            params![id.to_string(), br#"{"v":99,"kind":{"notice":{"level":"info","message":"x"}}}"#.to_vec()],
        )
        .unwrap();
    let mut tx = s.begin().unwrap();
    let e = tx.list_events(id, 0, None).unwrap_err().to_string();
    assert!(e.contains("version 99"), "{e}");
}

/// A database as schema 2 wrote it (no run-time columns; the spec only in `spec_toml`): after the
/// migration the probe checkpoint, retention and auto-eval come from the columns, and a probe job
/// is found by its checkpoint.
#[test]
fn schema_2_jobs_get_their_run_time_columns_from_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.db");
    let (pretrain, probe, broken) = (JobId::new(), JobId::new(), JobId::new());
    {
        let conn = Connection::open(&path).unwrap();
        let cols = format!("{SCHEMA_1_JOB_COLUMNS}, owner TEXT NOT NULL DEFAULT ''");
        conn.execute_batch(&schema_with_jobs_columns(&cols))
            .unwrap();
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema', 2)", [])
            .unwrap();
        let specs = [
            (
                pretrain,
                "pretrain",
                "world_size = 1\n[checkpoint]\nkeep_last = 3\nkeep_every_epochs = 5\nauto_eval = true\n",
            ),
            (
                probe,
                "linear_probe",
                "kind = \"linear_probe\"\n[eval]\ncheckpoint = \"/c/j/10\"\n",
            ),
            (broken, "pretrain", "this is not toml ["),
        ];
        for (i, (id, kind, spec)) in specs.iter().enumerate() {
            conn.execute(
                "INSERT INTO jobs (id, name, kind, spec_toml, priority, world_size, state, \
                 created_ms, updated_ms, epoch, attempts, restarts_used, max_restarts, \
                 failure_reason, total_steps, last_metrics, owner) VALUES \
                 (?1, 'j', ?2, ?3, 0, 1, 1, ?4, 0, 0, 0, 0, 0, '', 0, NULL, 'alice')",
                params![id.to_string(), kind, spec, i as i64],
            )
            .unwrap();
        }
    }
    let mut s = SqliteStore::open(&path).unwrap();
    let mut tx = s.begin().unwrap();
    let p = tx.get_job(pretrain).unwrap().unwrap();
    assert_eq!(
        p.run,
        crate::store::JobRunInfo {
            probe_checkpoint: String::new(),
            keep_last: 3,
            keep_every_epochs: 5,
            auto_eval: true,
        }
    );
    assert_eq!(p.owner, "alice");
    let q = tx.get_job(probe).unwrap().unwrap();
    assert_eq!(q.kind, bt_common::JobKind::LinearProbe);
    assert_eq!(q.run.probe_checkpoint, "/c/j/10");
    let found = tx
        .probe_jobs(&["/c/j/10".to_string(), "/c/j/20".to_string()])
        .unwrap();
    assert_eq!(found.iter().map(|j| j.id).collect::<Vec<_>>(), vec![probe]);
    assert!(tx.probe_jobs(&["/c/j/20".to_string()]).unwrap().is_empty());
    // A spec that does not parse keeps every checkpoint, as before.
    assert_eq!(tx.get_job(broken).unwrap().unwrap().run, Default::default());
    drop(tx);
    let v: i64 = s
        .conn
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(v, super::schema::SCHEMA_VERSION);
}

/// A database as schema 3 wrote it: a preempted attempt was stored as `failed` with a reason
/// beginning "preempted: "; after the migration its outcome is `preempted`, and a real failure
/// stays `failed`.
#[test]
fn schema_3_preempted_attempts_get_their_own_outcome() {
    use bt_common::domain::AttemptOutcome;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v3.db");
    let id = JobId::new();
    {
        let mut s = SqliteStore::open(&path).unwrap();
        let mut tx = s.begin().unwrap();
        tx.put_job(&job(id, 1)).unwrap();
        tx.commit().unwrap();
        for (epoch, reason) in [
            (1, "preempted: rank 1 stopped on request"),
            (2, "rank 0 died"),
        ] {
            s.conn
                .execute(
                    "INSERT INTO attempts (job_id, epoch, started_ms, ended_ms, outcome, reason, \
                     resume_from, master_addr, master_port) \
                     VALUES (?1, ?2, 0, 1, 'failed', ?3, '', '127.0.0.1', 1)",
                    params![id.to_string(), epoch, reason],
                )
                .unwrap();
        }
        s.conn
            .execute("UPDATE meta SET value = 3 WHERE key = 'schema'", [])
            .unwrap();
    }
    let mut s = SqliteStore::open(&path).unwrap();
    let mut tx = s.begin().unwrap();
    let outcome =
        |tx: &mut dyn crate::store::Tx, e| tx.get_attempt(id, e).unwrap().unwrap().outcome;
    assert_eq!(outcome(&mut *tx, 1), Some(AttemptOutcome::Preempted));
    assert_eq!(outcome(&mut *tx, 2), Some(AttemptOutcome::Failed));
}

#[test]
fn retention_prunes_curves_and_logs_of_long_finished_jobs_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(&dir.path().join("state.db")).unwrap();
    let mut tx = s.begin().unwrap();
    let event = |id: JobId, kind: EventKind| JobEvent {
        seq: 0,
        time_ms: 0,
        job_id: id,
        step: 1,
        kind,
    };
    // old: finished long ago; recent: finished just now; running: old but still running.
    let (old, recent, running) = (JobId::new(), JobId::new(), JobId::new());
    for (id, state, updated) in [
        (old, JobState::Succeeded, 1_000),
        (recent, JobState::Failed, 9_000),
        (running, JobState::Running, 1_000),
    ] {
        let mut j = job(id, 1);
        j.state = state;
        j.updated_ms = updated;
        tx.put_job(&j).unwrap();
        for kind in [
            EventKind::Metrics(TrainMetrics::default()),
            EventKind::State(StateChange {
                state,
                reason: String::new(),
                epoch: 1,
            }),
        ] {
            tx.append_event(&mut event(id, kind)).unwrap();
        }
        tx.append_logs(id, 1, 0, 5, &["a".into(), "b".into()])
            .unwrap();
    }
    assert_eq!(tx.prune_finished_history(5_000).unwrap(), (1, 3));
    assert_eq!(
        tx.prune_finished_history(5_000).unwrap(),
        (0, 0),
        "idempotent"
    );
    let kinds = |tx: &mut dyn Tx, id| -> Vec<&'static str> {
        tx.list_events(id, 0, None)
            .unwrap()
            .iter()
            .map(|e| e.kind.name())
            .collect()
    };
    assert_eq!(kinds(&mut *tx, old), ["state"], "the state history stays");
    assert_eq!(tx.count_logs(old).unwrap(), 0);
    for id in [recent, running] {
        assert_eq!(kinds(&mut *tx, id).len(), 2);
        assert_eq!(tx.count_logs(id).unwrap(), 2);
    }
    // Logs: tail and rank filters, oldest dropped first.
    tx.append_logs(recent, 2, 1, 6, &["c".into(), "d".into(), "e".into()])
        .unwrap();
    let q = |ranks: Vec<u32>, tail| LogQuery {
        ranks,
        tail,
        ..Default::default()
    };
    let text = |l: Vec<LogLine>| l.into_iter().map(|l| l.text).collect::<Vec<_>>();
    assert_eq!(
        text(tx.list_logs(recent, &q(vec![1], 2)).unwrap()),
        ["d", "e"]
    );
    assert_eq!(
        text(tx.list_logs(recent, &q(vec![0], 0)).unwrap()),
        ["a", "b"]
    );
    assert_eq!(tx.drop_oldest_logs(recent, 3).unwrap(), 3);
    assert_eq!(
        text(tx.list_logs(recent, &q(vec![], 0)).unwrap()),
        ["d", "e"]
    );
}
