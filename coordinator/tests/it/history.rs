//! Trainer logs (StreamLogs: tail, rank filter, follow from before the start to the end, rate
//! limit) and job deletion (rows gone from the store; running jobs and checkpoints under
//! evaluation untouched).

use bt_proto::job_service_client::JobServiceClient;
use bt_proto::{
    trainer_report, CheckpointInfo, DeleteJobRequest, JobState, LogLine, LogLines,
    StreamLogsRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::harness::*;

fn logs(lines: &[&str]) -> trainer_report::Body {
    trainer_report::Body::Logs(LogLines {
        lines: lines.iter().map(|l| l.to_string()).collect(),
        dropped: 0,
        time_ms: 1,
    })
}

async fn stream(
    jobs: &mut JobServiceClient<Channel>,
    job_id: &str,
    ranks: &[u32],
    tail: u32,
    follow: bool,
) -> Streaming<LogLine> {
    jobs.stream_logs(StreamLogsRequest {
        job_id: job_id.into(),
        ranks: ranks.to_vec(),
        tail,
        follow,
    })
    .await
    .unwrap()
    .into_inner()
}

/// Every line of a finite stream (with a deadline per line).
async fn texts(mut s: Streaming<LogLine>) -> Vec<String> {
    let mut out = vec![];
    while let Some(l) = tokio::time::timeout(WAIT, s.message())
        .await
        .expect("log stream stalled")
        .expect("log stream failed")
    {
        out.push(format!("{}:{}", l.rank, l.text));
    }
    out
}

#[tokio::test]
async fn logs_are_kept_filtered_tailed_and_followed_to_the_end() {
    let c = Coord::start().await;
    let job = c.submit(&spec(2, 0)).await;
    let mut jobs = c.jobs().await;
    // A follower from before the job starts: it waits, then streams, then ends with the job.
    let follower = tokio::spawn(texts(stream(&mut jobs, &job.id, &[], 0, true).await));
    let mut d = FakeDaemon::connect(&c, "node-a", 2).await;
    let a0 = d.next_assignment().await;
    let a1 = d.next_assignment().await;
    let (a0, a1) = if a0.rank == 0 { (a0, a1) } else { (a1, a0) };
    d.started(&a0).await;
    d.started(&a1).await;
    d.report(&a0, logs(&["r0 a", "r0 b"])).await;
    d.report(&a1, logs(&["r1 a", "r1 b", "r1 c"])).await;
    d.report(&a1, logs(&["r1 d", "r1 e", "r1 f"])).await;
    d.report(&a0, logs(&["r0 c"])).await;
    d.exit_ok(&a1).await;
    d.exit_ok(&a0).await;
    c.wait_state(&job.id, JobState::Succeeded).await;

    let all = [
        "0:r0 a", "0:r0 b", "1:r1 a", "1:r1 b", "1:r1 c", "1:r1 d", "1:r1 e", "1:r1 f", "0:r0 c",
    ];
    let followed = tokio::time::timeout(WAIT, follower)
        .await
        .expect("the follower ends when the job does")
        .unwrap();
    assert_eq!(followed, all);
    assert_eq!(
        texts(stream(&mut jobs, &job.id, &[], 0, false).await).await,
        all
    );
    assert_eq!(
        texts(stream(&mut jobs, &job.id, &[1], 5, false).await).await,
        ["1:r1 b", "1:r1 c", "1:r1 d", "1:r1 e", "1:r1 f"]
    );
    assert_eq!(
        texts(stream(&mut jobs, &job.id, &[0], 0, true).await).await,
        ["0:r0 a", "0:r0 b", "0:r0 c"]
    );
    // Lines carry their attempt and an increasing sequence number.
    let mut s = stream(&mut jobs, &job.id, &[], 0, false).await;
    let mut last = 0;
    while let Some(l) = s.message().await.unwrap() {
        assert!(l.seq > last);
        assert_eq!(l.epoch, a0.epoch);
        last = l.seq;
    }
    // An unknown job is an error of the call itself.
    let e = jobs
        .stream_logs(StreamLogsRequest {
            job_id: "00000000-0000-0000-0000-000000000000".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn log_lines_over_the_rate_limit_are_dropped_and_counted() {
    let c = Coord::start_with(|cfg| cfg.limits.max_log_lines_per_sec = 3).await;
    let job = c.submit(&spec(1, 0)).await;
    let mut d = FakeDaemon::connect(&c, "node-a", 1).await;
    let a = d.next_assignment().await;
    d.started(&a).await;
    let long = "x".repeat(10_000);
    d.report(&a, logs(&["1", "2", "3", "4", "5", &long])).await;
    d.exit_ok(&a).await;
    c.wait_state(&job.id, JobState::Succeeded).await;
    let mut jobs = c.jobs().await;
    let got = texts(stream(&mut jobs, &job.id, &[], 0, false).await).await;
    assert_eq!(got, ["0:1", "0:2", "0:3"], "three lines fit the budget");
    // The next window's first lines say what went, and an overlong line is cut.
    let c2 = Coord::start_with(|cfg| cfg.limits.max_log_lines_per_sec = 1).await;
    let job = c2.submit(&spec(1, 0)).await;
    let mut d = FakeDaemon::connect(&c2, "node-a", 1).await;
    let a = d.next_assignment().await;
    d.started(&a).await;
    d.report(&a, logs(&["first", "second"])).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await; // the next one-second window
    d.report(&a, logs(&[&long])).await;
    d.exit_ok(&a).await;
    c2.wait_state(&job.id, JobState::Succeeded).await;
    let mut jobs = c2.jobs().await;
    let got = texts(stream(&mut jobs, &job.id, &[], 0, false).await).await;
    assert_eq!(got[0], "0:first");
    assert!(
        got[1].contains("1 log line(s) of this rank dropped"),
        "{got:?}"
    );
    assert!(got[2].len() < 4200 && got[2].contains("[cut at 4096 bytes]"));
}

/// Rows of `table` filed under `job_id`, read from the coordinator's SQLite file.
fn rows(db: &std::path::Path, table: &str, job_id: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    let col = if table == "jobs" { "id" } else { "job_id" };
    conn.query_row(
        &format!("SELECT COUNT(*) FROM {table} WHERE {col} = ?1"),
        [job_id],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test]
async fn delete_removes_a_finished_job_and_nothing_running_or_under_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("state.db");
    let c = Coord::start_in(tmp.path(), |_| {}).await;
    let mut d = FakeDaemon::connect(&c, "node-a", 1).await;
    let mut jobs = c.jobs().await;

    // A finished job with events, a checkpoint (on disk too) and log lines.
    let done = c.submit(&spec(1, 0)).await;
    let a = d.next_assignment().await;
    d.started(&a).await;
    d.report_step(&a, 1).await;
    let ck = format!("{}/00000001", a.checkpoint_dir);
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::write(format!("{ck}/model.safetensors"), b"x").unwrap();
    d.report(
        &a,
        trainer_report::Body::Checkpoint(CheckpointInfo {
            step: 1,
            path: ck.clone(),
            ..Default::default()
        }),
    )
    .await;
    d.report(&a, logs(&["hello"])).await;
    d.exit_ok(&a).await;
    c.wait_state(&done.id, JobState::Succeeded).await;
    eventually("the checkpoint to be committed", || async {
        !c.checkpoints(&done.id).await.is_empty()
    })
    .await;

    // A running job cannot be deleted.
    let running = c.submit(&spec(1, 0)).await;
    let b = d.next_assignment().await;
    d.started(&b).await;
    c.wait_state(&running.id, JobState::Running).await;
    let e = jobs
        .delete_job(DeleteJobRequest {
            job_id: running.id.clone(),
            delete_files: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("only a finished job"), "{e:?}");

    // Nor one whose checkpoint a probe (queued behind the running job) evaluates.
    let probe = c
        .submit(&format!(
            "kind = \"linear_probe\"\n[eval]\ncheckpoint = \"{ck}\"\n"
        ))
        .await;
    let e = jobs
        .delete_job(DeleteJobRequest {
            job_id: done.id.clone(),
            delete_files: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&probe.id), "{e:?}");
    assert!(std::path::Path::new(&ck).is_dir(), "refused: files stay");
    for t in ["jobs", "events", "checkpoints", "log_lines", "attempts"] {
        assert!(rows(&db, t, &done.id) > 0, "{t} rows before the delete");
    }

    // Once the probe has ended, the delete goes through: rows and files gone.
    jobs.cancel_job(bt_proto::CancelJobRequest {
        job_id: probe.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let out = jobs
        .delete_job(DeleteJobRequest {
            job_id: done.id.clone(),
            delete_files: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        out.events > 0 && out.checkpoints == 1 && out.log_lines == 1,
        "{out:?}"
    );
    assert_eq!(out.files_removed, 1);
    for t in [
        "jobs",
        "events",
        "checkpoints",
        "log_lines",
        "attempts",
        "attempt_ranks",
    ] {
        assert_eq!(rows(&db, t, &done.id), 0, "{t} rows after the delete");
    }
    assert!(!std::path::Path::new(&a.checkpoint_dir).exists());
    let e = jobs
        .get_job(bt_proto::GetJobRequest {
            job_id: done.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The running job is untouched.
    assert_eq!(c.job(&running.id).await.state, JobState::Running as i32);
    assert!(rows(&db, "jobs", &running.id) == 1);
}
