use super::*;
use crate::store::DeviceRecord;
use bt_proto::StateChange;
use bt_proto::{job_event, TrainMetrics, WorkerState};

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
        owner: String::new(),
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
