//! Security, round two, finding 5 and the fuzzing: what an authenticated peer can make the
//! coordinator do or hold is bounded (reports of every kind, devices, spec fields, submissions,
//! listings), and the session stream survives hostile values with valid credentials.
use bt_proto::*;
use tonic::Code;

use crate::harness::{eventually, spec, Coord, FakeDaemon};
use crate::secured::*;

/// Finding 5: reports of every kind are rate-limited, devices per worker capped, the spec
/// bounded, and submissions per owner limited by a token bucket that cancel-and-resubmit does not
/// sidestep.
#[tokio::test]
async fn reports_devices_specs_and_submissions_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let c = secured(tmp.path(), |c| {
        c.limits.max_reports_per_sec = 5;
        c.limits.submit_burst = 4;
        c.limits.submit_per_minute = 1;
        c.limits.max_devices_per_worker = 16;
    })
    .await;
    let e = register_as(&c, "tok-fleet", "big", 17).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("devices:"), "{}", e.message());

    let mut jobs = jobs_as(&c, "tok-alice").await;
    for (spec, field) in [
        ("[train]\nbatch_size = 1000000\n", "train.batch_size"),
        (
            "world_size = 1\n[model]\nprojector = [65536]\n",
            "model.projector",
        ),
        ("[train]\nepochs = 4000000000\n", "train.epochs"),
        (
            "[train]\nbatch_size = 4096\n[data]\nprefetch = 64\nimage_size = 1024\n",
            "data.prefetch",
        ),
        ("[data]\nlimit = 100000000000\n", "data.limit"),
        ("world_size = 100000\n", "world_size"),
    ] {
        let e = jobs
            .submit_job(SubmitJobRequest {
                spec_toml: spec.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{spec}: {e:?}");
        assert!(e.message().starts_with(field), "{spec}: {}", e.message());
    }

    let d = FakeDaemon::connect_as(&c, "tok-fleet", "w1", 1).await;
    let mut d = d;
    let mut submitted = vec![];
    for _ in 0..4 {
        let j = jobs
            .submit_job(SubmitJobRequest {
                spec_toml: spec(1, 0),
            })
            .await
            .unwrap()
            .into_inner();
        submitted.push(j.id);
    }
    // Cancelling frees the waiting-jobs limit, not the submission rate.
    for id in &submitted[1..] {
        jobs.cancel_job(CancelJobRequest {
            job_id: id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    }
    let e = jobs
        .submit_job(SubmitJobRequest {
            spec_toml: spec(1, 0),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("submitting too fast"),
        "{}",
        e.message()
    );

    // 60 notices and 60 evaluations in a burst: at most a few windows' worth are kept.
    let a = d.next_assignment().await;
    d.started(&a).await;
    for i in 0..60u64 {
        d.report(
            &a,
            trainer_report::Body::Notice(bt_proto::Notice {
                level: "warn".into(),
                message: format!("notice {i}"),
                ..Default::default()
            }),
        )
        .await;
    }
    d.exit_ok(&a).await;
    let viewer = jobs_as(&c, "tok-root").await;
    eventually("the job to succeed", || {
        let mut v = viewer.clone();
        let id = a.job_id.clone();
        async move {
            v.get_job(GetJobRequest { job_id: id })
                .await
                .unwrap()
                .into_inner()
                .state
                == JobState::Succeeded as i32
        }
    })
    .await;
    let events = history_as(&c, "tok-root", &a.job_id).await;
    let notices = events
        .iter()
        .filter(|ev| matches!(ev.kind, Some(job_event::Kind::Notice(_))))
        .count();
    assert!((1..30).contains(&notices), "{notices} notices kept of 60");
}

/// Listings come in pages no larger than `limits.max_page_size`, with a token for the next one,
/// so no listing outgrows the message limit however many jobs or workers exist.
#[tokio::test]
async fn listings_are_paged() {
    let c = Coord::start_with(|c| c.limits.max_page_size = 3).await;
    let mut ids = vec![];
    for _ in 0..7 {
        ids.push(c.submit(&spec(1, 0)).await.id);
    }
    for i in 0..5 {
        FakeDaemon::connect(&c, &format!("w{i}"), 1).await;
    }
    let mut jobs = c.jobs().await;
    let (mut seen, mut token, mut pages) = (vec![], String::new(), 0);
    loop {
        let page = jobs
            .list_jobs(ListJobsRequest {
                page_token: token,
                page_size: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.jobs.len() <= 3, "{} in a page", page.jobs.len());
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        pages += 1;
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "every job once, newest first");
    assert_eq!(pages, 3);
    // `limit` bounds the whole listing.
    let first = jobs
        .list_jobs(ListJobsRequest {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.jobs.len(), first.next_page_token.as_str()), (2, ""));
    let w = jobs
        .list_workers(ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.workers.len(), 3);
    assert_eq!(w.next_page_token, "3");
    let e = jobs
        .list_workers(ListWorkersRequest {
            page_token: "x".into(),
            page_size: 0,
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("page_token:"), "{}", e.message());
}

/// The session stream fuzzed with valid credentials: a registered daemon (fleet token) sends
/// reports with hostile values (names and messages with control characters and megabytes of
/// text, counts and sizes at their extremes, unknown enum values, wrong ids and epochs) for a job
/// really placed on it. The coordinator never panics or stops serving; a message it refuses
/// closes the session with an error naming the field, and the daemon can come back.
#[tokio::test]
async fn the_session_stream_survives_hostile_values_with_valid_credentials() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let c = secured(tmp.path(), |c| {
        c.limits.max_reports_per_sec = 1_000_000;
        c.limits.max_metrics_per_sec = 1_000_000;
    })
    .await;
    let mut jobs = jobs_as(&c, "tok-alice").await;
    let job = jobs
        .submit_job(SubmitJobRequest {
            spec_toml: spec(1, 1000),
        })
        .await
        .unwrap()
        .into_inner();
    let mut rng = StdRng::seed_from_u64(0x5ec_0002);
    let strings = |rng: &mut StdRng| -> String {
        [
            String::new(),
            "a\nb\r\u{1b}[2J".into(),
            "\u{0}".into(),
            "x".repeat(rng.gen_range(0..300_000)),
            "名前\u{2028}".into(),
            "../../etc/passwd".into(),
        ][rng.gen_range(0..6)]
        .clone()
    };
    let (mut sent, mut closed) = (0, 0);
    let mut d = FakeDaemon::connect_as(&c, "tok-fleet", "fz", 1).await;
    let mut a = d.next_assignment().await;
    d.started(&a).await;
    for _ in 0..300 {
        let (job_id, epoch, rank) = match rng.gen_range(0..4) {
            0 => (strings(&mut rng), rng.gen(), rng.gen()),
            1 => (job.id.clone(), rng.gen(), a.rank),
            _ => (a.job_id.clone(), a.epoch, a.rank),
        };
        let body = match rng.gen_range(0..7) {
            0 => trainer_report::Body::Notice(bt_proto::Notice {
                level: strings(&mut rng),
                message: strings(&mut rng),
                severity: rng.gen(),
            }),
            1 => trainer_report::Body::Eval(EvalResult {
                step: rng.gen(),
                kind: strings(&mut rng),
                top1: [f64::NAN, f64::INFINITY, -1.0, 2.0, 0.5][rng.gen_range(0..5)],
                ..Default::default()
            }),
            2 => trainer_report::Body::Checkpoint(CheckpointInfo {
                step: rng.gen(),
                path: strings(&mut rng),
                ..Default::default()
            }),
            3 => trainer_report::Body::Metrics(TrainMetrics {
                step: rng.gen(),
                loss: [f64::NAN, f64::NEG_INFINITY, 1e308, 1.0][rng.gen_range(0..4)],
                ..Default::default()
            }),
            4 => trainer_report::Body::Logs(LogLines {
                // Below the 4 MiB message limit (a larger message is refused by the transport).
                lines: (0..rng.gen_range(0..12))
                    .map(|_| strings(&mut rng))
                    .collect(),
                dropped: rng.gen(),
                time_ms: rng.gen(),
            }),
            5 => trainer_report::Body::Picture(CorrelationPicture {
                step: rng.gen(),
                side: rng.gen(),
                ..Default::default()
            }),
            _ => trainer_report::Body::Started(TrainerStarted { pid: rng.gen() }),
        };
        let what = format!("{:.200}", format!("{body:?}"));
        d.report_as(&job_id, epoch, rank, body).await;
        sent += 1;
        // A refused message closes the session: read what the coordinator said, come back.
        if let Ok(next) =
            tokio::time::timeout(std::time::Duration::from_millis(5), d.down.message()).await
        {
            match next {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the session ended without a status"),
                Err(status) => {
                    closed += 1;
                    let m = status.message();
                    assert!(
                        m.contains("bad message: report.") || m.contains("bad message: msg"),
                        "a closed session's reason names no field: {status:?} (after {what})"
                    );
                    d = FakeDaemon::connect_as(&c, "tok-fleet", "fz", 1).await;
                    a = d.next_assignment().await;
                    d.started(&a).await;
                }
            }
        }
    }
    eprintln!("hostile session messages: {sent} sent, {closed} sessions closed by the coordinator");
    // Still serving, the job still known and its state one of the defined ones.
    let j = jobs
        .get_job(GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(JobState::try_from(j.state).is_ok(), "{j:?}");
    eventually("the coordinator to list jobs", || {
        let mut jobs = jobs.clone();
        async move { jobs.list_jobs(ListJobsRequest::default()).await.is_ok() }
    })
    .await;
}
