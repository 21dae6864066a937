//! The progress watchdog: a running job whose ranks stop reporting (a stopped process, a
//! deadlocked collective) is declared hung and restarted; log lines count as signs of life.

use std::time::Duration;

use bt_proto::{coordinator_message, trainer_report, JobState, LogLines};

use crate::harness::*;

#[tokio::test]
async fn a_job_whose_ranks_go_silent_is_declared_hung_and_restarted() {
    let c = Coord::start_with(|cfg| {
        cfg.watchdog.multiple = 5.0;
        cfg.watchdog.min_ms = 600;
        // Longer than the test: the worker stays online while its rank is silent.
        cfg.heartbeat_timeout_ms = 60_000;
    })
    .await;
    let mut d = FakeDaemon::connect(&c, "node-a", 1).await;
    let job = c.submit(&spec(1, 1)).await;
    let a = d.next_assignment().await;
    d.started(&a).await;
    for step in 1..=10 {
        d.report_step(&a, step).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // No steps for longer than the limit, but log lines keep coming: alive (a long evaluation).
    for _ in 0..8 {
        d.report(
            &a,
            trainer_report::Body::Logs(LogLines {
                lines: vec!["kNN: embedding the bank".into()],
                ..Default::default()
            }),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let j = c.job(&job.id).await;
    assert_eq!(j.state, JobState::Running as i32, "{}", j.failure_reason);
    // Then nothing at all: hung, restarted (the budget says one restart).
    let j = c
        .wait_job(&job.id, "declared hung", |j| j.restarts_used == 1)
        .await;
    assert!(
        j.failure_reason.contains("hung: no report"),
        "{}",
        j.failure_reason
    );
    loop {
        match d.next().await {
            coordinator_message::Msg::Cancel(cancel) => {
                assert_eq!(cancel.epoch, a.epoch);
                assert!(cancel.reason.contains("hung"), "{}", cancel.reason);
                // The daemon stops the hung trainer (SIGTERM, then SIGKILL): its device is free.
                d.report(
                    &a,
                    trainer_report::Body::Exit(bt_proto::TrainerExit {
                        code: -1,
                        signal: 9,
                        ..Default::default()
                    }),
                )
                .await;
                break;
            }
            other => eprintln!("skipping {other:?}"),
        }
    }
    let b = d.next_assignment().await;
    assert!(b.epoch > a.epoch, "restarted as a new attempt");
}
