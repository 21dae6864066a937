//! WatchJob: replay, follow, and a slow watcher that falls behind.

use bt_proto::job_service_client::JobServiceClient;
use bt_proto::{job_event, trainer_report, JobEvent, JobState, Notice, WatchJobRequest};
use tonic::transport::Channel;
use tonic::Streaming;

use crate::harness::*;

async fn watch(
    jobs: &mut JobServiceClient<Channel>,
    job_id: &str,
    from_step: u64,
    follow: bool,
) -> Streaming<JobEvent> {
    jobs.watch_job(WatchJobRequest {
        job_id: job_id.to_string(),
        from_step,
        follow,
    })
    .await
    .unwrap()
    .into_inner()
}

async fn collect(mut s: Streaming<JobEvent>) -> Vec<JobEvent> {
    let mut out = vec![];
    loop {
        match tokio::time::timeout(WAIT, s.message())
            .await
            .expect("watch stream stalled")
        {
            Ok(Some(e)) => out.push(e),
            Ok(None) => return out,
            Err(e) => panic!("watch stream failed: {e}"),
        }
    }
}

fn states(evs: &[JobEvent]) -> Vec<i32> {
    evs.iter()
        .filter_map(|e| match &e.kind {
            Some(job_event::Kind::State(s)) => Some(s.state),
            _ => None,
        })
        .collect()
}

fn metric_steps(evs: &[JobEvent]) -> Vec<u64> {
    evs.iter()
        .filter_map(|e| match &e.kind {
            Some(job_event::Kind::Metrics(m)) => Some(m.step),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn replay_then_follow_until_the_job_ends() {
    let c = Coord::start().await;
    let mut d = FakeDaemon::connect(&c, "node-a", 1).await;
    let job = c.submit(&spec(1, 0)).await;
    let a = d.next_assignment().await;
    d.started(&a).await;
    for step in 1..=5 {
        d.report_step(&a, step).await;
    }
    c.wait_job(&job.id, "metrics", |j| {
        j.last_metrics.as_ref().is_some_and(|m| m.step == 5)
    })
    .await;

    // Replay only, from step 3: all state changes, metrics 3..=5, then the stream ends.
    let mut jobs = c.jobs().await;
    let s = watch(&mut jobs, &job.id, 3, false).await;
    let evs = collect(s).await;
    assert_eq!(metric_steps(&evs), vec![3, 4, 5]);
    assert_eq!(
        states(&evs),
        vec![
            JobState::Queued as i32,
            JobState::Scheduled as i32,
            JobState::Running as i32
        ]
    );
    let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "events in order: {seqs:?}"
    );

    // Follow: the replay, then live events, ending after the terminal state.
    // The live steps are sent once the replay has reached step 5, so they take the live path.
    let mut s = watch(&mut jobs, &job.id, 0, true).await;
    let mut evs = vec![];
    while metric_steps(&evs).last() != Some(&5) {
        let e = tokio::time::timeout(WAIT, s.message())
            .await
            .expect("watch stream stalled")
            .expect("watch stream failed")
            .expect("the replay reaches step 5 before the stream ends");
        evs.push(e);
    }
    let reader = tokio::spawn(collect(s));
    for step in 6..=8 {
        d.report_step(&a, step).await;
    }
    d.exit_ok(&a).await;
    evs.extend(reader.await.unwrap());
    assert_eq!(
        metric_steps(&evs),
        (1..=8).collect::<Vec<_>>(),
        "no duplicates, no gaps"
    );
    assert_eq!(*states(&evs).last().unwrap(), JobState::Succeeded as i32);

    // Watching a finished job with follow ends after the replay.
    let s = watch(&mut jobs, &job.id, 0, true).await;
    let evs = collect(s).await;
    assert_eq!(*states(&evs).last().unwrap(), JobState::Succeeded as i32);
}

#[tokio::test]
async fn a_slow_watcher_misses_events_but_blocks_nobody() {
    let c = Coord::start_with(|cfg| cfg.watch_buffer = 8).await;
    let mut d = FakeDaemon::connect(&c, "node-a", 1).await;
    let job = c.submit(&spec(1, 0)).await;
    let a = d.next_assignment().await;
    d.started(&a).await;
    c.wait_state(&job.id, JobState::Running).await;
    let mut jobs = c.jobs().await;
    // Subscribed, but not reading.
    let mut slow = watch(&mut jobs, &job.id, 0, true).await;
    // Enough bytes to fill every transport buffer between the coordinator and the watcher.
    let big = "x".repeat(16 * 1024);
    let n = 600u64;
    for i in 0..n {
        d.report(
            &a,
            trainer_report::Body::Notice(Notice {
                level: "info".into(),
                message: format!("{i} {big}"),
                ..Default::default()
            }),
        )
        .await;
        d.report_step(&a, i + 1).await;
    }
    // Training is not held up by the watcher: every report was processed.
    c.wait_job(&job.id, "all metrics", |j| {
        j.last_metrics.as_ref().is_some_and(|m| m.step == n)
    })
    .await;
    d.exit_ok(&a).await;
    c.wait_state(&job.id, JobState::Succeeded).await;
    let mut evs = vec![];
    loop {
        match tokio::time::timeout(WAIT, slow.message())
            .await
            .expect("stalled")
        {
            Ok(Some(e)) => evs.push(e),
            Ok(None) => break,
            Err(e) => panic!("watch failed: {e}"),
        }
    }
    let missed: u64 = evs
        .iter()
        .filter_map(|e| match &e.kind {
            Some(job_event::Kind::Missed(m)) => Some(m.count),
            _ => None,
        })
        .sum();
    assert!(
        missed > 0,
        "the slow watcher must be told it missed events ({} received)",
        evs.len()
    );
    assert_eq!(
        *states(&evs).last().unwrap(),
        JobState::Succeeded as i32,
        "it still sees the end"
    );
    // The full history is still there for a replay.
    let s = watch(&mut jobs, &job.id, 0, false).await;
    assert_eq!(metric_steps(&collect(s).await).len() as u64, n);
}
