//! Authentication, authorization, TLS and path confinement at the coordinator.
use std::path::Path;

use bt_coordinator::auth::{access_for, token_hash, Role, TokenEntry, TokenFile, POLICY};
use bt_coordinator::config::{AuthMode, CoordinatorConfig};
use bt_proto::client::ClientOptions;
use bt_proto::job_service_client::JobServiceClient;
use bt_proto::worker_service_client::WorkerServiceClient;
use bt_proto::*;
use prost::Message;
use tonic::Code;

use crate::harness::{eventually, history, register_request, spec, Coord, FakeDaemon};

/// The message with no fields: every request decodes it as its defaults, every response as it.
type Empty = ();

/// Tokens of every role (and a second submitter) in a tokens file under `dir`.
fn write_tokens(dir: &Path) -> std::path::PathBuf {
    let tokens = TokenFile {
        tokens: [
            ("root", Role::Admin),
            ("alice", Role::Submitter),
            ("bob", Role::Submitter),
            ("dash", Role::Viewer),
            ("node", Role::Worker),
        ]
        .into_iter()
        .map(|(n, r)| TokenEntry {
            name: n.into(),
            role: r,
            sha256: token_hash(&format!("tok-{n}")),
            node: None,
        })
        .collect(),
    };
    let p = dir.join("tokens.toml");
    std::fs::write(&p, tokens.to_toml()).unwrap();
    p
}

async fn secured(dir: &Path) -> Coord {
    let tokens = write_tokens(dir);
    Coord::start_with(move |c: &mut CoordinatorConfig| {
        c.auth.mode = AuthMode::On;
        c.auth.tokens_file = Some(tokens);
    })
    .await
}

fn opts(c: &Coord, token: Option<&str>) -> ClientOptions {
    ClientOptions {
        token: token.map(str::to_string),
        ..ClientOptions::new(c.url())
    }
}

/// Calls `path` with an empty request (all fields default) and returns the status code.
async fn call(c: &Coord, path: &str, token: Option<&str>) -> Code {
    use tonic::codec::Streaming;
    let ch = opts(c, token).connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let p: http::uri::PathAndQuery = path.parse().unwrap();
    let codec = tonic_prost::ProstCodec::<Empty, Empty>::default();
    let streaming_out = path.ends_with("/WatchJob") || path.ends_with("/Session");
    let r = if path.ends_with("/Session") {
        let up = tokio_stream::iter(Vec::<Empty>::new());
        grpc.streaming(tonic::Request::new(up), p, codec)
            .await
            .map(|_: tonic::Response<Streaming<Empty>>| ())
    } else if streaming_out {
        grpc.server_streaming(tonic::Request::new(()), p, codec)
            .await
            .map(|_| ())
    } else {
        grpc.unary(tonic::Request::new(()), p, codec)
            .await
            .map(|_| ())
    };
    match r {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[test]
fn every_rpc_has_a_policy() {
    let set = prost_types::FileDescriptorSet::decode(bt_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut n = 0;
    for f in &set.file {
        for s in &f.service {
            for m in &s.method {
                let path = format!("/{}.{}/{}", f.package(), s.name(), m.name());
                assert!(
                    POLICY.iter().any(|(p, _)| *p == path),
                    "{path} has no entry in bt_coordinator::auth::POLICY"
                );
                n += 1;
            }
        }
    }
    assert_eq!(n, POLICY.len(), "POLICY names a method that does not exist");
}

#[tokio::test]
async fn every_rpc_rejects_no_token_a_wrong_token_and_the_wrong_role() {
    let tmp = tempfile::tempdir().unwrap();
    let c = secured(tmp.path()).await;
    for (path, access) in POLICY {
        assert_eq!(
            call(&c, path, None).await,
            Code::Unauthenticated,
            "{path} without a token"
        );
        assert_eq!(
            call(&c, path, Some("tok-nobody")).await,
            Code::Unauthenticated,
            "{path} with a wrong token"
        );
        for (name, role) in [
            ("root", Role::Admin),
            ("alice", Role::Submitter),
            ("dash", Role::Viewer),
            ("node", Role::Worker),
        ] {
            let code = call(&c, path, Some(&format!("tok-{name}"))).await;
            if role.allows(*access) {
                assert!(
                    code != Code::Unauthenticated && code != Code::PermissionDenied,
                    "{path} as {role:?} was refused: {code:?}"
                );
            } else {
                assert_eq!(code, Code::PermissionDenied, "{path} as {role:?}");
            }
        }
    }
    // Probes stay open; an unknown method is refused even to an admin.
    assert_eq!(
        call(&c, "/grpc.health.v1.Health/Check", None).await,
        Code::Ok
    );
    assert_eq!(access_for("/bt.v1.JobService/Secret", false), None);
    assert_eq!(
        call(&c, "/bt.v1.JobService/Secret", Some("tok-root")).await,
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn submitters_own_their_jobs_and_tokens_rotate_without_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let c = secured(tmp.path()).await;
    let client = |t: &str| {
        let o = opts(&c, Some(t));
        async move { JobServiceClient::new(o.connect().await.unwrap()) }
    };
    let job = client("tok-alice")
        .await
        .submit_job(SubmitJobRequest {
            spec_toml: spec(1, 0),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.owner, "alice");
    let cancel = |id: String| CancelJobRequest {
        job_id: id,
        reason: String::new(),
    };
    let e = client("tok-bob")
        .await
        .cancel_job(cancel(job.id.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = client("tok-node")
        .await
        .submit_job(SubmitJobRequest {
            spec_toml: spec(1, 0),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "a worker token cannot submit"
    );
    let j = client("tok-alice")
        .await
        .cancel_job(cancel(job.id.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.state, JobState::Cancelled as i32);

    // Rotation: replace bob's token in the file; the running coordinator picks it up.
    let tokens = tmp.path().join("tokens.toml");
    let text = std::fs::read_to_string(&tokens)
        .unwrap()
        .replace(&token_hash("tok-bob"), &token_hash("tok-bob-2"));
    std::fs::write(&tokens, text).unwrap();
    eventually("the rotated token to be accepted", || async {
        call(&c, "/bt.v1.JobService/ListJobs", Some("tok-bob-2")).await == Code::Ok
    })
    .await;
    assert_eq!(
        call(&c, "/bt.v1.JobService/ListJobs", Some("tok-bob")).await,
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn tls_and_mutual_tls_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let issued = bt_coordinator::secrets::issue(&[]).unwrap();
    let other = bt_coordinator::secrets::issue(&[]).unwrap();
    for (name, text) in [
        ("ca.pem", &issued.ca_pem),
        ("server.pem", &issued.server.0),
        ("server.key", &issued.server.1),
        ("worker.pem", &issued.worker.0),
        ("worker.key", &issued.worker.1),
        ("other-ca.pem", &other.ca_pem),
        ("rogue.pem", &other.worker.0),
        ("rogue.key", &other.worker.1),
    ] {
        std::fs::write(d.join(name), text).unwrap();
    }
    let (cert, key, ca) = (d.join("server.pem"), d.join("server.key"), d.join("ca.pem"));
    let ca2 = ca.clone();
    let c = Coord::start_with(move |c: &mut CoordinatorConfig| {
        c.tls.cert = Some(cert);
        c.tls.key = Some(key);
        c.tls.client_ca = Some(ca2);
    })
    .await;
    let addr = c.addr.to_string();
    let tls = |ca: &str| ClientOptions {
        ca_cert: Some(d.join(ca)),
        ..ClientOptions::new(addr.clone())
    };
    // A client verifying the server with the right CA gets through; without TLS or with another
    // CA it does not.
    let mut jobs = JobServiceClient::new(tls("ca.pem").connect().await.unwrap());
    jobs.list_jobs(ListJobsRequest::default()).await.unwrap();
    let plain = ClientOptions::new(format!("http://{addr}"));
    match plain.connect().await {
        Err(_) => {}
        Ok(ch) => {
            let r = JobServiceClient::new(ch)
                .list_jobs(ListJobsRequest::default())
                .await;
            assert!(r.is_err(), "plain text reached a TLS listener");
        }
    }
    assert!(
        tls("other-ca.pem").connect().await.is_err(),
        "a server certificate from another CA was accepted"
    );
    // The worker service needs a client certificate signed by the configured CA.
    let e = WorkerServiceClient::new(tls("ca.pem").connect().await.unwrap())
        .register(register_request("n1", 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let with_cert = |cert: &str, key: &str| ClientOptions {
        client_cert: Some(d.join(cert)),
        client_key: Some(d.join(key)),
        ..tls("ca.pem")
    };
    let r = WorkerServiceClient::new(
        with_cert("worker.pem", "worker.key")
            .connect()
            .await
            .unwrap(),
    )
    .register(register_request("n1", 1))
    .await
    .unwrap()
    .into_inner();
    assert!(!r.worker_id.is_empty());
    // A certificate from another CA fails the handshake (or the call).
    if let Ok(ch) = with_cert("rogue.pem", "rogue.key").connect().await {
        let r = WorkerServiceClient::new(ch)
            .register(register_request("n2", 1))
            .await;
        assert!(
            r.is_err(),
            "a client certificate from another CA was accepted"
        );
    }
}

#[tokio::test]
async fn forged_and_stale_checkpoint_reports_are_refused() {
    let c = Coord::start().await;
    let mut d = FakeDaemon::connect(&c, "w1", 1).await;
    let job = c.submit(&spec(1, 0)).await;
    let a = d.next_assignment().await;
    assert!(
        !a.store_prefix.is_empty(),
        "every attempt carries a store secret"
    );
    d.started(&a).await;
    let root = Path::new(&a.checkpoint_dir).parent().unwrap().to_path_buf();
    let forged = [
        "/".to_string(),
        format!("{}/../../etc", a.checkpoint_dir),
        root.display().to_string(),
        format!("{}/other-job/5", root.display()),
    ];
    for (i, p) in forged.iter().enumerate() {
        d.report(
            &a,
            trainer_report::Body::Checkpoint(CheckpointInfo {
                step: i as u64 + 1,
                path: p.clone(),
                ..Default::default()
            }),
        )
        .await;
    }
    // A stale epoch's report (a past attempt) is not committed either.
    d.report_as(
        &job.id,
        a.epoch - 1,
        0,
        trainer_report::Body::Checkpoint(CheckpointInfo {
            step: 50,
            path: format!("{}/50", a.checkpoint_dir),
            ..Default::default()
        }),
    )
    .await;
    // A good one is, and it is the only one.
    let good = format!("{}/60", a.checkpoint_dir);
    d.report(
        &a,
        trainer_report::Body::Checkpoint(CheckpointInfo {
            step: 60,
            path: good.clone(),
            ..Default::default()
        }),
    )
    .await;
    eventually("the good checkpoint to be committed", || async {
        !c.checkpoints(&job.id).await.is_empty()
    })
    .await;
    let cps = c.checkpoints(&job.id).await;
    assert_eq!(
        cps.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
        vec![good.as_str()]
    );
    let j = c.job(&job.id).await;
    assert_eq!(j.state, JobState::Running as i32);
}

#[tokio::test]
async fn specs_reading_outside_the_allowed_roots_are_refused() {
    let c = Coord::start().await;
    let mut jobs = c.jobs().await;
    for (spec, field) in [
        (
            "[data]\nsource = \"image-folder\"\npath = \"/etc\"\n",
            "data.path",
        ),
        (
            "[data]\npath = \"/usr/share/datasets/../../etc\"\n",
            "data.path",
        ),
        (
            "kind = \"linear_probe\"\n[eval]\ncheckpoint = \"/etc/passwd\"\n",
            "eval.checkpoint",
        ),
    ] {
        let e = jobs
            .submit_job(SubmitJobRequest {
                spec_toml: spec.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    let big = format!("name = \"{}\"\n", "x".repeat(70_000));
    let e = jobs
        .submit_job(SubmitJobRequest { spec_toml: big })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("spec_toml:"), "{}", e.message());
}

#[tokio::test]
async fn watchers_are_bounded() {
    let c = Coord::start_with(|c: &mut CoordinatorConfig| c.limits.max_watchers_per_job = 2).await;
    let job = c.submit(&spec(1, 0)).await;
    let mut jobs = c.jobs().await;
    let watch = || WatchJobRequest {
        job_id: job.id.clone(),
        from_step: 0,
        follow: true,
    };
    let _a = jobs.watch_job(watch()).await.unwrap().into_inner();
    let _b = jobs.watch_job(watch()).await.unwrap().into_inner();
    let e = jobs.watch_job(watch()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    drop(_a);
    eventually("a freed watcher slot", || async {
        c.jobs().await.watch_job(watch()).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn metric_reports_over_the_rate_limit_are_dropped() {
    let c = Coord::start_with(|c: &mut CoordinatorConfig| c.limits.max_metrics_per_sec = 5).await;
    let mut d = FakeDaemon::connect(&c, "w1", 1).await;
    let job = c.submit(&spec(1, 0)).await;
    let a = d.next_assignment().await;
    d.started(&a).await;
    for step in 1..=40 {
        d.report_step(&a, step).await;
    }
    d.exit_ok(&a).await;
    c.wait_state(&job.id, JobState::Succeeded).await;
    let metrics = history(&c, &job.id)
        .await
        .iter()
        .filter(|ev| matches!(ev.kind, Some(job_event::Kind::Metrics(_))))
        .count();
    // 40 reports sent within a few windows of one second: most were dropped.
    assert!((5..40).contains(&metrics), "{metrics} metric events kept");
}

#[tokio::test]
async fn metric_history_is_thinned_past_its_limit() {
    let c = Coord::start_with(|c: &mut CoordinatorConfig| c.limits.max_metric_events_per_job = 100)
        .await;
    let mut d = FakeDaemon::connect(&c, "w1", 1).await;
    let job = c.submit(&spec(1, 0)).await;
    let a = d.next_assignment().await;
    d.started(&a).await;
    let n = 600;
    for step in 1..=n {
        d.report_step(&a, step).await;
    }
    d.exit_ok(&a).await;
    c.wait_state(&job.id, JobState::Succeeded).await;
    let (mut steps, mut states) = (vec![], 0);
    for ev in history(&c, &job.id).await {
        match ev.kind {
            Some(job_event::Kind::Metrics(m)) => steps.push(m.step),
            Some(job_event::Kind::State(_)) => states += 1,
            _ => {}
        }
    }
    // At most the limit plus one check interval (256 appends) is kept, the newest always, in
    // order, and no state change is lost (queued, scheduled, running, succeeded).
    assert!(steps.len() <= 100 + 256, "{} kept", steps.len());
    assert!(steps.len() >= 50, "{} kept", steps.len());
    assert_eq!(*steps.last().unwrap(), n);
    assert!(steps.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(states, 4);
}
