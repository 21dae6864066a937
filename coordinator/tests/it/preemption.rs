//! Preemption: a rank that stopped on request requeues its job without spending the restart
//! budget (counted in `preemptions`), the checkpoint rank 0 saved on the stop is kept even when it
//! arrives after the attempt ended, and a draining worker gets nothing more.

use bt_proto::{trainer_report, worker_message, CheckpointInfo, Drain, JobState, TrainerExit};

use crate::harness::*;

fn preempted_exit() -> trainer_report::Body {
    trainer_report::Body::Exit(TrainerExit {
        success: false,
        code: 143,
        preempted: true,
        reason: "trainer stopped on request (state saved)".into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_preempted_attempt_requeues_without_spending_restarts_and_resumes_from_its_stop() {
    let c = Coord::start().await;
    let mut a_node = FakeDaemon::connect(&c, "node-a", 1).await;
    let mut b_node = FakeDaemon::connect(&c, "node-b", 1).await;
    // max_restarts = 0: any infrastructure failure would fail the job.
    let job = c.submit(&spec(2, 0)).await;
    let (r0, r1) = (
        a_node.next_assignment().await,
        b_node.next_assignment().await,
    );
    let (a_node, b_node, r0, r1) = if r0.rank == 0 {
        (a_node, b_node, r0, r1)
    } else {
        (b_node, a_node, r1, r0)
    };
    a_node.started(&r0).await;
    b_node.started(&r1).await;
    a_node.report_step(&r0, 7).await;
    c.wait_state(&job.id, JobState::Running).await;

    // Node b drains: its rank exits first, preempted; rank 0's stop checkpoint comes after.
    b_node
        .send(worker_message::Msg::Drain(Drain {
            reason: "terminating".into(),
        }))
        .await;
    b_node.report(&r1, preempted_exit()).await;
    let j = c
        .wait_job(&job.id, "requeued", |j| {
            j.state == JobState::Queued as i32 && j.preemptions == 1
        })
        .await;
    assert_eq!(j.restarts_used, 0);
    let stop = format!("{}/00000007", r0.checkpoint_dir);
    a_node
        .report(
            &r0,
            trainer_report::Body::Checkpoint(CheckpointInfo {
                step: 7,
                path: stop.clone(),
                ..Default::default()
            }),
        )
        .await;
    a_node.report(&r0, preempted_exit()).await;
    eventually("the late stop checkpoint to be committed", || async {
        c.checkpoints(&job.id)
            .await
            .iter()
            .any(|cp| cp.path == stop)
    })
    .await;
    let j = c.job(&job.id).await;
    assert_eq!((j.preemptions, j.restarts_used), (1, 0), "counted once");

    // Node b is draining: the job waits for a second node instead of going back onto it.
    let j = c
        .wait_job(&job.id, "a pending reason", |j| {
            !j.pending_reason.is_empty()
        })
        .await;
    assert_eq!(j.state, JobState::Queued as i32);
    let mut c_node = FakeDaemon::connect(&c, "node-c", 1).await;
    let mut a_node = a_node;
    let n0 = a_node.next_assignment().await;
    let n1 = c_node.next_assignment().await;
    assert!(n0.epoch > r0.epoch);
    for a in [&n0, &n1] {
        assert_eq!(
            a.resume_from, stop,
            "the next attempt resumes from the stop"
        );
    }
    drop(b_node);
}

#[tokio::test]
async fn a_late_stop_checkpoint_counts_until_the_next_attempt_starts() {
    let c = Coord::start().await;
    let mut d = FakeDaemon::connect(&c, "node-a", 1).await;
    let job = c.submit(&spec(1, 0)).await;
    let a = d.next_assignment().await;
    // The node drains before its trainer started: the daemon refuses, a preemption too.
    d.send(worker_message::Msg::Drain(Drain {
        reason: "terminating".into(),
    }))
    .await;
    d.report(&a, preempted_exit()).await;
    c.wait_job(&job.id, "requeued", |j| j.preemptions == 1)
        .await;
    // Rank 0's checkpoint of that attempt is taken while no newer attempt ran...
    let first = format!("{}/00000003", a.checkpoint_dir);
    d.report(
        &a,
        trainer_report::Body::Checkpoint(CheckpointInfo {
            step: 3,
            path: first.clone(),
            ..Default::default()
        }),
    )
    .await;
    eventually("the stop checkpoint to be committed", || async {
        !c.checkpoints(&job.id).await.is_empty()
    })
    .await;
    // ... but not once the next attempt (on another node: this one drains) has started.
    let mut e = FakeDaemon::connect(&c, "node-b", 1).await;
    let b = e.next_assignment().await;
    assert!(b.epoch > a.epoch);
    assert_eq!(b.resume_from, first);
    d.report(
        &a,
        trainer_report::Body::Checkpoint(CheckpointInfo {
            step: 4,
            path: format!("{}/00000004", a.checkpoint_dir),
            ..Default::default()
        }),
    )
    .await;
    e.started(&b).await;
    e.report_step(&b, 5).await;
    c.wait_job(&job.id, "step 5", |j| {
        j.last_metrics.as_ref().is_some_and(|m| m.step == 5)
    })
    .await;
    let paths: Vec<String> = c
        .checkpoints(&job.id)
        .await
        .into_iter()
        .map(|c| c.path)
        .collect();
    assert_eq!(paths, [first]);
}

#[tokio::test]
async fn a_restart_names_the_earlier_checkpoints_as_fallbacks_newest_first() {
    let c = Coord::start().await;
    let mut d = FakeDaemon::connect(&c, "node-a", 1).await;
    let job = c.submit(&spec(1, 1)).await;
    let a = d.next_assignment().await;
    assert!(a.resume_from.is_empty() && a.resume_fallbacks.is_empty());
    d.started(&a).await;
    let path = |step: u64| format!("{}/{step:08}", a.checkpoint_dir);
    for step in [2, 4, 6] {
        d.report(
            &a,
            trainer_report::Body::Checkpoint(CheckpointInfo {
                step,
                path: path(step),
                ..Default::default()
            }),
        )
        .await;
    }
    eventually("three checkpoints", || async {
        c.checkpoints(&job.id).await.len() == 3
    })
    .await;
    d.report(
        &a,
        trainer_report::Body::Exit(TrainerExit {
            code: 3,
            reason: "lost the collective".into(),
            ..Default::default()
        }),
    )
    .await;
    let b = d.next_assignment().await;
    assert_eq!(b.resume_from, path(6));
    assert_eq!(b.resume_fallbacks, [path(4), path(2)]);
}

/// `btctl drain`: the drained worker's trainers are asked to stop (their job requeues as a
/// preemption and goes to another worker), nothing more is placed on it, the drain is stored
/// across a coordinator restart and a daemon re-registration, and undrain gives it work again.
#[tokio::test]
async fn an_operator_drain_stops_the_trainers_requeues_and_holds_until_undone() {
    use bt_proto::{coordinator_message, DrainWorkerRequest, ListWorkersRequest};
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Coord::start_in(tmp.path(), |_| {}).await;
    let mut a_node = FakeDaemon::connect(&c, "node-a", 1).await;
    let job = c.submit(&spec(1, 0)).await;
    let r = a_node.next_assignment().await;
    a_node.started(&r).await;
    c.wait_state(&job.id, JobState::Running).await;

    let mut jobs = c.jobs().await;
    for (worker, code) in [
        ("", tonic::Code::InvalidArgument),
        ("node-zz", tonic::Code::NotFound),
    ] {
        let e = jobs
            .drain_worker(DrainWorkerRequest {
                worker: worker.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{worker:?}: {e}");
    }
    let w = jobs
        .drain_worker(DrainWorkerRequest {
            worker: "node-a".into(),
            reason: "kernel upgrade".into(),
            undo: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (w.name.as_str(), w.drained.as_str()),
        ("node-a", "kernel upgrade")
    );
    match a_node.next().await {
        coordinator_message::Msg::StopTrainers(s) => {
            assert!(s.reason.contains("kernel upgrade"), "{}", s.reason)
        }
        other => panic!("expected StopTrainers, got {other:?}"),
    }
    a_node.report(&r, preempted_exit()).await;
    let j = c
        .wait_job(&job.id, "requeued", |j| {
            j.state == JobState::Queued as i32 && j.preemptions == 1
        })
        .await;
    assert_eq!(j.restarts_used, 0);
    // Nothing more goes to node-a; a second worker takes the job.
    let mut b_node = FakeDaemon::connect(&c, "node-b", 1).await;
    let n = b_node.next_assignment().await;
    assert!(n.epoch > r.epoch);
    b_node.started(&n).await;
    b_node.exit_ok(&n).await;
    c.wait_state(&job.id, JobState::Succeeded).await;

    // Stored: after a coordinator restart and node-a's re-registration it is still drained.
    drop((a_node, b_node, jobs));
    c.stop().await;
    let c = Coord::start_in(tmp.path(), |_| {}).await;
    let mut a_node = FakeDaemon::connect(&c, "node-a", 1).await;
    let second = c.submit(&spec(1, 0)).await;
    let j = c
        .wait_job(&second.id, "a pending reason", |j| {
            !j.pending_reason.is_empty()
        })
        .await;
    assert_eq!(j.state, JobState::Queued as i32);
    let mut jobs = c.jobs().await;
    let listed = jobs
        .list_workers(ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    let a = listed.iter().find(|w| w.name == "node-a").unwrap();
    assert_eq!(a.drained, "kernel upgrade");
    // Undrained (by id this time): it takes the waiting job.
    let w = jobs
        .drain_worker(DrainWorkerRequest {
            worker: a.id.clone(),
            undo: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.drained, "");
    let n = a_node.next_assignment().await;
    assert_eq!(n.job_id, second.id);
}
