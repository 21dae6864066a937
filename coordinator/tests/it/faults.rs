//! Faults: lost workers, failing trainers, garbage on the wire, coordinator restarts.
use std::time::Duration;

use bt_proto::{
    coordinator_message, trainer_report, worker_message, GetJobRequest, Heartbeat, Hello, JobState,
    ListWorkersRequest, RunningTrainer, TrainerExit, WorkerMessage, WorkerState, PROTOCOL_VERSION,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::harness::*;

async fn worker_state(c: &Coord, name: &str) -> i32 {
    let ws = c
        .jobs()
        .await
        .list_workers(ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    ws.iter()
        .find(|w| w.name == name)
        .map(|w| w.state)
        .unwrap_or(-1)
}

#[tokio::test]
async fn session_needs_a_hello_from_a_known_worker() {
    let c = Coord::start().await;
    let mut w = c.workers().await;
    let id = w
        .register(register_request("n", 1))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    // Not a hello first.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WorkerMessage {
        msg: Some(worker_message::Msg::Heartbeat(Heartbeat { time_ms: 1 })),
    })
    .await
    .unwrap();
    let e = w.session(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Unknown worker.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WorkerMessage {
        msg: Some(worker_message::Msg::Hello(Hello {
            worker_id: uuid::Uuid::new_v4().to_string(),
            protocol_version: PROTOCOL_VERSION,
            running: vec![],
            exited: vec![],
        })),
    })
    .await
    .unwrap();
    let e = w.session(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Wrong version in the hello.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WorkerMessage {
        msg: Some(worker_message::Msg::Hello(Hello {
            worker_id: id,
            protocol_version: 77,
            running: vec![],
            exited: vec![],
        })),
    })
    .await
    .unwrap();
    let e = w.session(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
}

#[tokio::test]
async fn lost_worker_requeues_then_fails_when_the_budget_is_spent() {
    let c = Coord::start().await;
    let mut d = FakeDaemon::connect(&c, "node-a", 1).await;
    let job = c.submit(&spec(1, 1)).await;
    let a = d.next_assignment().await;
    d.started(&a).await;
    c.wait_state(&job.id, JobState::Running).await;
    d.drop_stream();
    let j = c
        .wait_job(&job.id, "requeue", |j| j.restarts_used == 1)
        .await;
    assert!(
        j.state == JobState::Queued as i32 || j.state == JobState::Scheduled as i32,
        "{j:?}"
    );
    assert!(j.failure_reason.contains("node-a"), "{}", j.failure_reason);
    assert_eq!(worker_state(&c, "node-a").await, WorkerState::Lost as i32);

    // The daemon comes back (same name → same id) and gets a new attempt with a larger epoch.
    let mut d2 = FakeDaemon::connect(&c, "node-a", 1).await;
    assert_eq!(d2.id, d.id);
    assert_eq!(worker_state(&c, "node-a").await, WorkerState::Online as i32);
    let a2 = d2.next_assignment().await;
    assert_eq!(a2.job_id, job.id);
    assert!(a2.epoch > a.epoch);
    d2.started(&a2).await;
    c.wait_state(&job.id, JobState::Running).await;
    d2.drop_stream();
    let j = c.wait_state(&job.id, JobState::Failed).await;
    assert!(j.failure_reason.contains("lost"), "{}", j.failure_reason);
    assert!(j.failure_reason.contains("budget"), "{}", j.failure_reason);
    assert_eq!(j.attempts, 2);
}

#[tokio::test]
async fn trainer_failure_cancels_the_gang_and_user_errors_do_not_restart() {
    let c = Coord::start().await;
    let mut a_node = FakeDaemon::connect(&c, "node-a", 1).await;
    let mut b_node = FakeDaemon::connect(&c, "node-b", 1).await;
    let job = c.submit(&spec(2, 3)).await;
    let x = a_node.next_assignment().await;
    let y = b_node.next_assignment().await;
    // Name the daemons by the rank they run.
    let (r0, mut rank0_daemon, r1, mut rank1_daemon) = if x.rank == 0 {
        (x, a_node, y, b_node)
    } else {
        (y, b_node, x, a_node)
    };
    rank0_daemon.started(&r0).await;
    rank1_daemon.started(&r1).await;
    c.wait_state(&job.id, JobState::Running).await;
    // Rank 1 crashes (infrastructure): rank 0 is cancelled, the job is requeued.
    rank1_daemon
        .report(
            &r1,
            trainer_report::Body::Exit(TrainerExit {
                success: false,
                code: -1,
                signal: 9,
                reason: "oom".into(),
                last_log_lines: vec!["step 3".into(), "killed".into()],
                ..Default::default()
            }),
        )
        .await;
    let j = c
        .wait_job(&job.id, "restart", |j| j.restarts_used == 1)
        .await;
    assert!(j.failure_reason.contains("rank 1"), "{}", j.failure_reason);
    assert!(
        j.failure_reason.contains("signal 9"),
        "{}",
        j.failure_reason
    );
    assert!(j.failure_reason.contains("killed"), "{}", j.failure_reason);
    match rank0_daemon.next().await {
        coordinator_message::Msg::Cancel(cn) => assert_eq!(cn.epoch, r0.epoch),
        other => panic!("expected a cancel, got {other:?}"),
    }
    // The cancelled rank exits; the next attempt needs both devices.
    rank0_daemon
        .report(
            &r0,
            trainer_report::Body::Exit(TrainerExit {
                success: false,
                code: 143,
                ..Default::default()
            }),
        )
        .await;
    let p = rank0_daemon.next_assignment().await;
    let q = rank1_daemon.next_assignment().await;
    assert_eq!(p.epoch, q.epoch);
    assert!(p.epoch > r0.epoch);
    // A user error fails the job without a restart.
    let (u, ud) = if p.rank == 0 {
        (&p, &rank0_daemon)
    } else {
        (&q, &rank1_daemon)
    };
    ud.report(
        u,
        trainer_report::Body::Exit(TrainerExit {
            success: false,
            code: 2,
            user_error: true,
            reason: "data.path does not exist".into(),
            ..Default::default()
        }),
    )
    .await;
    let j = c.wait_state(&job.id, JobState::Failed).await;
    assert_eq!(j.restarts_used, 1);
    assert!(
        j.failure_reason.contains("data.path does not exist"),
        "{}",
        j.failure_reason
    );
}

/// A message type whose field 3 is a varint where `WorkerMessage` expects a `TrainerReport`:
/// it encodes fine and fails to decode on the coordinator.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(message, optional, tag = "1")]
    hello: Option<Hello>,
    #[prost(uint64, optional, tag = "3")]
    bad: Option<u64>,
}

#[tokio::test]
async fn garbage_on_a_session_closes_only_that_session() {
    let c = Coord::start().await;
    let mut good = FakeDaemon::connect(&c, "good", 1).await;
    let job = c.submit(&spec(1, 0)).await;
    let a = good.next_assignment().await;
    good.started(&a).await;

    let mut w = c.workers().await;
    let id = w
        .register(register_request("evil", 1))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let channel = tonic::transport::Channel::from_shared(c.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Garbage>(4);
    tx.send(Garbage {
        hello: Some(Hello {
            worker_id: id.clone(),
            protocol_version: PROTOCOL_VERSION,
            running: vec![],
            exited: vec![],
        }),
        bad: None,
    })
    .await
    .unwrap();
    let codec = tonic_prost::ProstCodec::<Garbage, bt_proto::CoordinatorMessage>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/bt.v1.WorkerService/Session");
    let mut down = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, codec)
        .await
        .unwrap()
        .into_inner();
    eventually("evil online", || async {
        worker_state(&c, "evil").await == WorkerState::Online as i32
    })
    .await;
    tx.send(Garbage {
        hello: None,
        bad: Some(7),
    })
    .await
    .unwrap();
    let end = tokio::time::timeout(WAIT, down.message()).await.unwrap();
    assert!(end.is_err(), "the session must end with an error: {end:?}");
    eventually("evil lost", || async {
        worker_state(&c, "evil").await == WorkerState::Lost as i32
    })
    .await;

    // Everyone else is still served.
    good.exit_ok(&a).await;
    c.wait_state(&job.id, JobState::Succeeded).await;
    let mut jobs = c.jobs().await;
    jobs.get_job(GetJobRequest {
        job_id: job.id.clone(),
    })
    .await
    .unwrap();
    // A structurally bad report (not a UUID) also closes the session.
    let bad = FakeDaemon::connect(&c, "sloppy", 1).await;
    bad.report_as(
        "not-a-uuid",
        1,
        0,
        trainer_report::Body::Started(Default::default()),
    )
    .await;
    eventually("sloppy lost", || async {
        worker_state(&c, "sloppy").await == WorkerState::Lost as i32
    })
    .await;
    drop(bad);
}

#[tokio::test]
async fn silent_worker_is_lost_after_the_heartbeat_timeout() {
    let c = Coord::start_with(|cfg| cfg.heartbeat_timeout_ms = 800).await;
    let mut d = FakeDaemon::connect(&c, "quiet", 1).await;
    let job = c.submit(&spec(1, 0)).await;
    let a = d.next_assignment().await;
    d.started(&a).await;
    // No heartbeats: lost, and with no restart budget the job fails.
    let j = c.wait_state(&job.id, JobState::Failed).await;
    assert!(
        j.failure_reason.contains("heartbeat"),
        "{}",
        j.failure_reason
    );
    assert_eq!(worker_state(&c, "quiet").await, WorkerState::Lost as i32);
}

#[tokio::test]
async fn after_a_coordinator_restart_workers_reconnect_or_are_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let quick = |cfg: &mut bt_coordinator::CoordinatorConfig| {
        cfg.heartbeat_timeout_ms = 1500;
        // A daemon that does not come back is lost this soon after the restart (120 s by default).
        cfg.reconnect_grace_ms = 1500;
    };
    let mut c = Coord::start_in(tmp.path(), quick).await;
    let mut a_node = FakeDaemon::connect(&c, "node-a", 1).await;
    let mut b_node = FakeDaemon::connect(&c, "node-b", 1).await;
    let ja = c.submit(&spec(1, 2)).await;
    let jb = c.submit(&spec(1, 2)).await;
    let mut assigned = vec![];
    for d in [&mut a_node, &mut b_node] {
        let a = d.next_assignment().await;
        d.started(&a).await;
        assigned.push(a);
    }
    c.wait_state(&ja.id, JobState::Running).await;
    c.wait_state(&jb.id, JobState::Running).await;
    c.stop().await;
    drop(a_node);
    drop(b_node);

    let c = Coord::start_in(tmp.path(), quick).await;
    // node-a reconnects with its trainer alive (plus a leftover trainer of an old attempt, which
    // is cancelled); node-b never comes back.
    let running = vec![
        RunningTrainer {
            job_id: assigned[0].job_id.clone(),
            epoch: assigned[0].epoch,
            rank: 0,
        },
        RunningTrainer {
            job_id: assigned[0].job_id.clone(),
            epoch: assigned[0].epoch + 100,
            rank: 0,
        },
    ];
    let mut a_node = FakeDaemon::connect_running(&c, "node-a", 1, running).await;
    match a_node.next().await {
        coordinator_message::Msg::Cancel(x) => assert_eq!(x.epoch, assigned[0].epoch + 100),
        other => panic!("expected a cancel of the stale trainer, got {other:?}"),
    }
    let keep_alive = async {
        loop {
            a_node
                .send(worker_message::Msg::Heartbeat(Heartbeat { time_ms: 0 }))
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let check = async {
        let b_job = &assigned[1].job_id;
        let j = c
            .wait_job(b_job, "requeue of node-b's job", |j| j.restarts_used == 1)
            .await;
        assert!(j.failure_reason.contains("node-b"), "{}", j.failure_reason);
        assert_eq!(worker_state(&c, "node-b").await, WorkerState::Lost as i32);
        // node-a's job kept running through the restart.
        let j = c.job(&assigned[0].job_id).await;
        assert_eq!(j.state, JobState::Running as i32, "{j:?}");
        assert_eq!(j.epoch, assigned[0].epoch);
    };
    tokio::select! {
        _ = keep_alive => unreachable!(),
        _ = check => {}
    }
    a_node.exit_ok(&assigned[0]).await;
    c.wait_state(&assigned[0].job_id, JobState::Succeeded).await;
}

#[tokio::test]
async fn a_restarted_coordinator_waits_its_reconnect_grace_and_the_exits_a_hello_announces() {
    // Timeouts far below the outage: only the reconnect grace keeps the jobs alive.
    let cfg = |cfg: &mut bt_coordinator::CoordinatorConfig| {
        cfg.heartbeat_timeout_ms = 800;
        cfg.start_deadline_ms = 500;
        cfg.reconnect_grace_ms = 60_000;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Coord::start_in(tmp.path(), cfg).await;
    let mut d = FakeDaemon::connect(&c, "node-a", 2).await;
    let (j1, j2) = (c.submit(&spec(1, 0)).await, c.submit(&spec(1, 0)).await);
    let (a1, a2) = (d.next_assignment().await, d.next_assignment().await);
    // The coordinator dies before either start report reached it; the trainers train on.
    c.stop().await;
    drop(d);
    let c = Coord::start_in(tmp.path(), cfg).await;
    // Down past the heartbeat timeout and the start deadline: nothing fails meanwhile.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for j in [&j1, &j2] {
        let j = c.job(&j.id).await;
        assert_eq!(j.state, JobState::Scheduled as i32, "{j:?}");
    }
    assert_eq!(worker_state(&c, "node-a").await, WorkerState::Online as i32);
    // The daemon is back: a1's trainer runs, a2's ended while the coordinator was away (its
    // exit waits in the daemon's buffer, behind its other reports).
    let mut w = c.workers().await;
    let id = w
        .register(register_request("node-a", 2))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let key = |a: &bt_proto::Assignment| RunningTrainer {
        job_id: a.job_id.clone(),
        epoch: a.epoch,
        rank: a.rank,
    };
    let (up, rx) = tokio::sync::mpsc::channel(64);
    let send = |m| {
        let up = up.clone();
        async move { up.send(WorkerMessage { msg: Some(m) }).await.unwrap() }
    };
    send(worker_message::Msg::Hello(Hello {
        worker_id: id,
        protocol_version: PROTOCOL_VERSION,
        running: vec![key(&a1)],
        exited: vec![key(&a2)],
    }))
    .await;
    let mut down = w
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let report = |a: &bt_proto::Assignment, body| {
        worker_message::Msg::Report(bt_proto::TrainerReport {
            job_id: a.job_id.clone(),
            epoch: a.epoch,
            rank: a.rank,
            body: Some(body),
        })
    };
    let beat = || worker_message::Msg::Heartbeat(Heartbeat { time_ms: 7 });
    // A daemon of this version hears an acknowledgement of each heartbeat.
    send(beat()).await;
    let ack = tokio::time::timeout(WAIT, async {
        loop {
            match down.message().await.unwrap().and_then(|m| m.msg) {
                Some(coordinator_message::Msg::HeartbeatAck(a)) => break a,
                Some(_) => continue,
                None => panic!("session ended"),
            }
        }
    })
    .await
    .expect("a heartbeat acknowledgement");
    assert_eq!(ack.time_ms, 7);
    // The replay is slow (paced): past the heartbeat timeout and the start deadline again
    // before a2's exit arrives. Heartbeats keep the session alive meanwhile.
    for _ in 0..8 {
        send(beat()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let j = c.job(&j2.id).await;
    assert_eq!(
        j.state,
        JobState::Scheduled as i32,
        "a2's exit is awaited: {j:?}"
    );
    let j = c.job(&j1.id).await;
    assert_eq!(j.state, JobState::Scheduled as i32, "a1 is running: {j:?}");
    let started = || trainer_report::Body::Started(bt_proto::TrainerStarted { pid: 9 });
    let ok = || {
        trainer_report::Body::Exit(TrainerExit {
            success: true,
            ..Default::default()
        })
    };
    send(report(&a2, started())).await;
    send(report(&a2, ok())).await;
    send(report(&a1, started())).await;
    c.wait_state(&j2.id, JobState::Succeeded).await;
    c.wait_state(&j1.id, JobState::Running).await;
    send(report(&a1, ok())).await;
    c.wait_state(&j1.id, JobState::Succeeded).await;
    for j in [&j1, &j2] {
        let j = c.job(&j.id).await;
        assert_eq!((j.restarts_used, j.attempts), (0, 1), "{j:?}");
    }
}

#[tokio::test]
async fn a_rank_that_never_starts_fails_its_attempt_within_the_start_deadline() {
    let c = Coord::start_with(|c| c.start_deadline_ms = 400).await;
    let mut d = FakeDaemon::connect(&c, "node-silent", 1).await;
    let job = c.submit(&spec(1, 0)).await;
    let a = d.next_assignment().await;
    assert_eq!(a.job_id, job.id);
    // The daemon never reports the trainer's start (it could not spawn it, or lost it).
    let j = c.wait_state(&job.id, JobState::Failed).await;
    assert!(
        j.failure_reason
            .contains("rank 0 on worker node-silent did not start within 400 ms"),
        "{}",
        j.failure_reason
    );
}
