//! The normal life of a job, validation at the edges, and durability across a restart.
use bt_proto::{
    coordinator_message, trainer_report, CancelJobRequest, CheckpointInfo, EvalResult,
    GetJobRequest, JobState, ListCheckpointsRequest, ListJobsRequest, ListWorkersRequest,
    SubmitJobRequest, TrainMetrics, WorkerState,
};
use tonic::Code;

use crate::harness::*;

#[tokio::test]
async fn job_runs_to_success_with_metrics_checkpoints_and_evals() {
    let c = Coord::start().await;
    let mut d = FakeDaemon::connect(&c, "node-a", 2).await;
    let spec = format!("{}[checkpoint]\nkeep_last = 1\n", spec(2, 1));
    let job = c.submit(&spec).await;
    assert_eq!(job.state, JobState::Queued as i32);
    let a0 = d.next_assignment().await;
    let a1 = d.next_assignment().await;
    let mut ranks = [a0.rank, a1.rank];
    ranks.sort();
    assert_eq!(ranks, [0, 1]);
    let (a0, a1) = if a0.rank == 0 { (a0, a1) } else { (a1, a0) };
    assert_eq!(a0.job_id, job.id);
    assert_eq!(a0.epoch, a1.epoch);
    assert!(a0.epoch > 0);
    assert_eq!(a0.world_size, 2);
    assert_ne!(a0.device, a1.device);
    assert_eq!(a0.master_addr, "127.0.0.1");
    assert!((30000..30100).contains(&a0.master_port));
    assert_eq!(a0.master_port, a1.master_port);
    assert!(
        a0.checkpoint_dir.ends_with(&job.id),
        "{}",
        a0.checkpoint_dir
    );
    assert_eq!(a0.resume_from, "");
    assert!(a0.spec_toml.contains("world_size = 2"));

    let j = c.wait_state(&job.id, JobState::Scheduled).await;
    assert_eq!(j.placement.len(), 2);
    assert_eq!(j.placement[0].worker_name, "node-a");
    assert_eq!(j.rendezvous, format!("127.0.0.1:{}", a0.master_port));
    let busy = c
        .jobs()
        .await
        .list_workers(ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(busy.workers[0].busy_devices, 2);

    d.started(&a0).await;
    d.started(&a1).await;
    c.wait_state(&job.id, JobState::Running).await;

    for step in [10, 20] {
        d.report(
            &a0,
            trainer_report::Body::Metrics(TrainMetrics {
                step,
                total_steps: 20,
                loss: 100.0 / step as f64,
                ..Default::default()
            }),
        )
        .await;
    }
    // A stale epoch (an older attempt's trainer) is ignored: fencing.
    d.report_as(
        &job.id,
        a0.epoch - 1,
        0,
        trainer_report::Body::Metrics(TrainMetrics {
            step: 999,
            ..Default::default()
        }),
    )
    .await;
    d.report_as(
        &job.id,
        a0.epoch + 7,
        0,
        trainer_report::Body::Metrics(TrainMetrics {
            step: 998,
            ..Default::default()
        }),
    )
    .await;
    // Two checkpoints with keep_last = 1: the first is deleted on the worker.
    for step in [10u64, 20] {
        d.report(
            &a0,
            trainer_report::Body::Checkpoint(CheckpointInfo {
                step,
                epoch: 0,
                path: format!("{}/{step}", a0.checkpoint_dir),
                size_bytes: 5,
                sha256: "00".into(),
                ..Default::default()
            }),
        )
        .await;
    }
    match d.next().await {
        coordinator_message::Msg::DeleteCheckpoints(del) => {
            assert_eq!(del.paths, vec![format!("{}/10", a0.checkpoint_dir)])
        }
        other => panic!("expected a deletion, got {other:?}"),
    }
    d.report(
        &a0,
        trainer_report::Body::Eval(EvalResult {
            step: 20,
            kind: "knn".into(),
            top1: 0.7,
            ..Default::default()
        }),
    )
    .await;
    let j = c.wait_job(&job.id, "eval", |j| !j.evals.is_empty()).await;
    assert_eq!(
        j.last_metrics.as_ref().unwrap().step,
        20,
        "stale metrics must be ignored"
    );
    assert_eq!(j.total_steps, 20);
    assert_eq!(j.evals[0].kind, "knn");
    let ck = c.checkpoints(&job.id).await;
    assert_eq!(ck.len(), 1);
    assert_eq!(ck[0].step, 20);

    d.exit_ok(&a1).await;
    d.exit_ok(&a0).await;
    let j = c.wait_state(&job.id, JobState::Succeeded).await;
    assert_eq!(j.attempts, 1);
    assert_eq!(j.restarts_used, 0);
    let workers = c
        .jobs()
        .await
        .list_workers(ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(workers.workers[0].busy_devices, 0);
    assert_eq!(workers.workers[0].state, WorkerState::Online as i32);
}

#[tokio::test]
async fn gang_scheduling_waits_priority_first_and_cancel() {
    let c = Coord::start().await;
    let mut d = FakeDaemon::connect(&c, "node-a", 2).await;
    let big = c.submit(&spec(4, 0)).await;
    let small = c.submit(&spec(1, 0)).await;
    // A scheduling pass has seen both jobs once each says why it waits.
    let j = c
        .wait_job(&big.id, "the big job's pending reason", |j| {
            !j.pending_reason.is_empty()
        })
        .await;
    assert_eq!(
        j.state,
        JobState::Queued as i32,
        "4 ranks cannot fit on 2 devices"
    );
    assert_eq!(
        j.pending_reason,
        "needs 4 devices at once; 2 free on 1 online worker"
    );
    let j = c
        .wait_job(&small.id, "the small job's pending reason", |j| {
            !j.pending_reason.is_empty()
        })
        .await;
    assert_eq!(
        j.state,
        JobState::Queued as i32,
        "no backfill past the head of the queue"
    );
    assert_eq!(
        j.pending_reason,
        format!("behind job {}, which is placed first", big.id)
    );
    // Cancelling a queued job is immediate; then the small one starts.
    let mut jobs = c.jobs().await;
    let j = jobs
        .cancel_job(CancelJobRequest {
            job_id: big.id.clone(),
            reason: "too big".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.state, JobState::Cancelled as i32);
    let a = d.next_assignment().await;
    assert_eq!(a.job_id, small.id);
    d.started(&a).await;
    c.wait_state(&small.id, JobState::Running).await;
    // Cancelling a running job cancels its ranks.
    jobs.cancel_job(CancelJobRequest {
        job_id: small.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    match d.next().await {
        coordinator_message::Msg::Cancel(x) => {
            assert_eq!(x.job_id, small.id);
            assert_eq!(x.epoch, a.epoch);
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
    // Cancelling a terminal job returns it unchanged.
    let again = jobs
        .cancel_job(CancelJobRequest {
            job_id: small.id.clone(),
            reason: "x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.state, JobState::Cancelled as i32);
    let list = jobs
        .list_jobs(ListJobsRequest {
            states: vec![JobState::Cancelled as i32],
            limit: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.jobs.len(), 2);
}

#[tokio::test]
async fn priority_orders_the_queue() {
    let c = Coord::start().await;
    let low = c.submit(&spec(1, 0)).await;
    let high = c.submit(&format!("priority = 5\n{}", spec(1, 0))).await;
    // No worker yet: both wait; then one device appears.
    let mut d = FakeDaemon::connect(&c, "node-a", 1).await;
    let a = d.next_assignment().await;
    assert_eq!(a.job_id, high.id);
    assert_eq!(c.job(&low.id).await.state, JobState::Queued as i32);
}

#[tokio::test]
async fn bad_requests_get_precise_errors() {
    let c = Coord::start().await;
    let mut jobs = c.jobs().await;
    let e = jobs
        .submit_job(SubmitJobRequest {
            spec_toml: "world_size = 0\n".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("world_size:"), "{}", e.message());
    let e = jobs
        .get_job(GetJobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = jobs
        .get_job(GetJobRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = jobs
        .cancel_job(CancelJobRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = jobs
        .list_checkpoints(ListCheckpointsRequest { job_id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let mut w = c.workers().await;
    let mut r = register_request("n", 1);
    r.protocol_version = 999;
    assert_eq!(
        w.register(r).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    for (field, f) in [
        (
            "name",
            Box::new(|r: &mut bt_proto::RegisterRequest| r.name = " ".into())
                as Box<dyn Fn(&mut _)>,
        ),
        (
            "host",
            Box::new(|r: &mut bt_proto::RegisterRequest| r.host.clear()),
        ),
        (
            "devices",
            Box::new(|r: &mut bt_proto::RegisterRequest| r.devices.clear()),
        ),
        (
            "devices[0].kind",
            Box::new(|r: &mut bt_proto::RegisterRequest| r.devices[0].kind = "tpu".into()),
        ),
        (
            "port_range_start",
            Box::new(|r: &mut bt_proto::RegisterRequest| r.port_range_start = 0),
        ),
        (
            "port_range_end",
            Box::new(|r: &mut bt_proto::RegisterRequest| r.port_range_end = r.port_range_start),
        ),
    ] {
        let mut r = register_request("n", 1);
        f(&mut r);
        let e = w.register(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}");
        assert!(
            e.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            e.message()
        );
    }
    // Same name → same id.
    let a = w
        .register(register_request("same", 1))
        .await
        .unwrap()
        .into_inner();
    let b = w
        .register(register_request("same", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.worker_id, b.worker_id);
    assert_eq!(a.heartbeat_interval_ms, 200);
}

#[tokio::test]
async fn state_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Coord::start_in(tmp.path(), |_| {}).await;
    let mut d = FakeDaemon::connect(&c, "node-a", 1).await;
    let done = c.submit(&spec(1, 0)).await;
    let a = d.next_assignment().await;
    d.started(&a).await;
    d.report(
        &a,
        trainer_report::Body::Metrics(TrainMetrics {
            step: 5,
            total_steps: 5,
            ..Default::default()
        }),
    )
    .await;
    d.report(
        &a,
        trainer_report::Body::Checkpoint(CheckpointInfo {
            step: 5,
            path: format!("{}/5", a.checkpoint_dir),
            ..Default::default()
        }),
    )
    .await;
    d.exit_ok(&a).await;
    c.wait_state(&done.id, JobState::Succeeded).await;
    let queued = c.submit(&spec(4, 0)).await;
    drop(d);
    c.stop().await;

    let c = Coord::start_in(tmp.path(), |_| {}).await;
    let j = c.job(&done.id).await;
    assert_eq!(j.state, JobState::Succeeded as i32);
    assert_eq!(j.last_metrics.unwrap().step, 5);
    assert_eq!(j.epoch, a.epoch);
    let ck = c.checkpoints(&done.id).await;
    assert_eq!(ck.len(), 1);
    assert_eq!(c.job(&queued.id).await.state, JobState::Queued as i32);
    // The fencing counter continues: a new attempt gets a larger epoch.
    let mut d = FakeDaemon::connect(&c, "node-a", 1).await;
    let j2 = c.submit(&spec(1, 0)).await;
    let mut jobs = c.jobs().await;
    jobs.cancel_job(CancelJobRequest {
        job_id: queued.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let a2 = d.next_assignment().await;
    assert_eq!(a2.job_id, j2.id);
    assert!(a2.epoch > a.epoch);
}
