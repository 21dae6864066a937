//! Security, round two: what an authenticated but hostile peer could do, each through the real
//! server with tokens (and TLS where it matters): forged metric series, an inflatable /metrics
//! page, daemon impersonation, the admin acting as a daemon, log forgery (and `process.rs`), wrong
//! status codes for malformed messages, file modes. Bounds on what a peer can make the
//! coordinator hold are in `limits.rs`; the helpers in `secured.rs`.
use std::path::Path;

use bt_coordinator::config::{AuthMode, CoordinatorConfig};
use bt_proto::client::ClientOptions;
use bt_proto::worker_service_client::WorkerServiceClient;
use bt_proto::*;
use prost::Message;
use tonic::Code;

use crate::harness::{eventually, register_request, spec, Coord, FakeDaemon};
use crate::secured::*;

/// Findings 1 and 6: names with control characters are refused naming `name`; printable hostile
/// names are accepted and stay inside their label's quotes, so the page parses and carries no
/// series bt does not define.
#[tokio::test]
async fn hostile_job_names_are_refused_or_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let maddr = format!("127.0.0.1:{}", free_port());
    let m2 = maddr.clone();
    let c = secured(tmp.path(), move |c| c.metrics_listen = m2).await;
    let mut jobs = jobs_as(&c, "tok-alice").await;
    for bad in [
        "evil\nbt_forged_series 1",
        "tab\there",
        "esc\u{1b}[2J",
        "cr\rx",
        &"n".repeat(201),
    ] {
        let e = jobs
            .submit_job(SubmitJobRequest {
                spec_toml: format!("name = {}\n", toml::Value::String(bad.into())),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
        assert!(e.message().starts_with("name:"), "{bad:?}: {}", e.message());
    }
    // Printable but hostile: accepted, and escaped on the metrics page.
    let hostile = r#"evil"} bt_forged_series 1 # \"#;
    let mut d = FakeDaemon::connect_as(&c, "tok-fleet", "w1", 1).await;
    let job = jobs
        .submit_job(SubmitJobRequest {
            spec_toml: format!(
                "name = {}\nworld_size = 1\n",
                toml::Value::String(hostile.into())
            ),
        })
        .await
        .unwrap()
        .into_inner();
    let a = d.next_assignment().await;
    d.started(&a).await;
    d.report_step(&a, 7).await;
    eventually("the job's series on /metrics", || async {
        metrics_page(&maddr).await.contains("bt_job_step{")
    })
    .await;
    let page = metrics_page(&maddr).await;
    let samples = parse_exposition(&page);
    assert!(
        samples.iter().all(|(name, _)| name.starts_with("bt_")),
        "a series bt does not define:\n{page}"
    );
    let step = samples
        .iter()
        .find(|(name, _)| name == "bt_job_step")
        .expect("bt_job_step");
    assert_eq!(
        step.1.get("job_id").map(String::as_str),
        Some(job.id.as_str())
    );
    assert_eq!(
        step.1.get("name").map(String::as_str),
        Some(hostile),
        "the name round-trips"
    );
    assert!(
        page.contains(r#"name="evil\"} bt_forged_series 1 # \\"}"#),
        "the name escaped per the exposition format:\n{page}"
    );
}

/// Finding 2: calls to made-up method paths, with and without a token, do not grow /metrics:
/// RPC series are labelled from the closed set of methods, refusals by reason only.
#[tokio::test]
async fn made_up_paths_cannot_inflate_the_metrics_page() {
    let tmp = tempfile::tempdir().unwrap();
    let maddr = format!("127.0.0.1:{}", free_port());
    let m2 = maddr.clone();
    let c = secured(tmp.path(), move |c| c.metrics_listen = m2).await;
    // One of each kind first, so every series that can exist exists.
    let ch = channel(&c, "tok-root").await;
    let mut grpc = tonic::client::Grpc::new(ch);
    let mut anon = tonic::client::Grpc::new(ClientOptions::new(c.url()).connect().await.unwrap());
    let codec = || tonic_prost::ProstCodec::<ListWorkersRequest, ListWorkersResponse>::default();
    for i in 0..300 {
        let p: http::uri::PathAndQuery = format!("/bt.v1.JobService/Made{i}Up").parse().unwrap();
        grpc.ready().await.unwrap();
        let _ = grpc
            .unary(
                tonic::Request::new(ListWorkersRequest::default()),
                p.clone(),
                codec(),
            )
            .await;
        anon.ready().await.unwrap();
        let _ = anon
            .unary(
                tonic::Request::new(ListWorkersRequest::default()),
                p,
                codec(),
            )
            .await;
        if i == 0 {
            // The page after one made-up call of each kind: the baseline.
            continue;
        }
    }
    let page = metrics_page(&maddr).await;
    assert!(
        !page.contains("Made"),
        "a made-up path became a label:\n{page}"
    );
    let before = page.len();
    for i in 300..600 {
        let p: http::uri::PathAndQuery = format!("/x.Y/Z{i}").parse().unwrap();
        anon.ready().await.unwrap();
        let _ = anon
            .unary(
                tonic::Request::new(ListWorkersRequest::default()),
                p,
                codec(),
            )
            .await;
    }
    let after = metrics_page(&maddr).await;
    assert!(
        after.len() <= before + 64,
        "/metrics grew from {before} to {} bytes",
        after.len()
    );
    assert!(
        after.contains("bt_rpc_refused_total{reason=\"unauthenticated\"}"),
        "{after}"
    );
}

/// Findings 3 and 4: a worker token bound to another node can neither register as a node nor
/// open its session; a fleet token cannot take over a live node; an admin is not a daemon.
#[tokio::test]
async fn daemons_cannot_impersonate_other_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let c = secured(tmp.path(), |_| {}).await;
    let a_id = register_as(&c, "tok-node-a", "a", 1).await.unwrap();
    let e = register_as(&c, "tok-node-b", "a", 1).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("name: "), "{}", e.message());
    let e = open_session(&c, "tok-node-b", &a_id).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("hello.worker_id: "), "{}", e.message());
    // The node itself gets in; then a fleet token can neither re-register nor open a second
    // session for it while it is live.
    let (_up, mut down) = open_session(&c, "tok-node-a", &a_id).await.unwrap();
    let e = register_as(&c, "tok-fleet", "a", 8).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = open_session(&c, "tok-fleet", &a_id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("live session"), "{}", e.message());
    // The admin is not a daemon.
    let e = register_as(&c, "tok-root", "c", 1).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The victim is unharmed: its work still reaches it.
    let job = jobs_as(&c, "tok-alice")
        .await
        .submit_job(SubmitJobRequest {
            spec_toml: spec(1, 0),
        })
        .await
        .unwrap()
        .into_inner();
    let a = loop {
        let m = tokio::time::timeout(crate::harness::WAIT, down.message())
            .await
            .expect("an assignment")
            .unwrap()
            .expect("the session is open");
        if let Some(coordinator_message::Msg::Assign(a)) = m.msg {
            break a;
        }
    };
    assert_eq!(a.job_id, job.id);
    let workers = jobs_as(&c, "tok-root")
        .await
        .list_workers(ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    let w = workers.iter().find(|w| w.name == "a").unwrap();
    assert_eq!(
        w.devices.len(),
        1,
        "the refused registration changed nothing"
    );
}

/// The descriptor-driven part: every worker-service method refuses a worker token bound to
/// another node, and an admin token.
#[tokio::test]
async fn every_worker_method_refuses_another_nodes_token_and_the_admin() {
    let tmp = tempfile::tempdir().unwrap();
    let c = secured(tmp.path(), |_| {}).await;
    let a_id = register_as(&c, "tok-node-a", "a", 1).await.unwrap();
    let set = prost_types::FileDescriptorSet::decode(bt_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut checked = 0;
    for f in &set.file {
        for s in f.service.iter().filter(|s| s.name() == "WorkerService") {
            for m in &s.method {
                for token in ["tok-node-b", "tok-root"] {
                    let code = match m.name() {
                        "Register" => register_as(&c, token, "a", 1)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.code()),
                        "Session" => open_session(&c, token, &a_id)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.code()),
                        other => panic!("WorkerService/{other} is not covered by this test"),
                    };
                    assert_eq!(code, Err(Code::PermissionDenied), "{} as {token}", m.name());
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 4);
}

/// Finding 7: a message that does not decode is INVALID_ARGUMENT, not INTERNAL.
#[tokio::test]
async fn malformed_messages_are_invalid_argument() {
    #[derive(Clone, PartialEq, prost::Message)]
    struct NotUtf8 {
        #[prost(bytes = "vec", tag = "1")]
        spec_toml: Vec<u8>,
    }
    let tmp = tempfile::tempdir().unwrap();
    let c = secured(tmp.path(), |_| {}).await;
    let mut grpc = tonic::client::Grpc::new(channel(&c, "tok-alice").await);
    grpc.ready().await.unwrap();
    let p: http::uri::PathAndQuery = "/bt.v1.JobService/SubmitJob".parse().unwrap();
    let codec = tonic_prost::ProstCodec::<NotUtf8, Job>::default();
    let e = grpc
        .unary(
            tonic::Request::new(NotUtf8 {
                spec_toml: vec![0xff, 0xfe, 0x00],
            }),
            p,
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("malformed message"), "{}", e.message());
}

/// Finding 8: a state directory the coordinator creates is 0700, its database 0600 (and so are
/// SQLite's -wal and -shm files).
#[tokio::test]
async fn the_state_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let db = dir.join("bt.db");
    let db2 = db.clone();
    let c = Coord::start_in(tmp.path(), move |c| c.db_path = db2).await;
    c.submit(&spec(1, 0)).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    assert_eq!(mode(&db), 0o600, "{}", db.display());
    for suffix in ["-wal", "-shm"] {
        let p = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
}

/// With mutual TLS a node's client certificate names its node: its daemon registers only as that
/// node, even with a fleet token; a token bound to another node than the certificate is refused.
/// The fleet certificate (`bt-worker`) binds nothing.
#[tokio::test]
async fn a_node_certificate_binds_the_daemon_to_its_node() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let issued = bt_coordinator::secrets::issue_with_nodes(&[], &["n1".to_string()]).unwrap();
    let (n1_cert, n1_key) = &issued.nodes[0].1;
    for (name, text) in [
        ("ca.pem", &issued.ca_pem),
        ("server.pem", &issued.server.0),
        ("server.key", &issued.server.1),
        ("worker.pem", &issued.worker.0),
        ("worker.key", &issued.worker.1),
        ("n1.pem", n1_cert),
        ("n1.key", n1_key),
    ] {
        std::fs::write(d.join(name), text).unwrap();
    }
    let tokens = write_tokens(d);
    let (cert, key, ca) = (d.join("server.pem"), d.join("server.key"), d.join("ca.pem"));
    let ca2 = ca.clone();
    let c = Coord::start_with(move |c: &mut CoordinatorConfig| {
        c.auth.mode = AuthMode::On;
        c.auth.tokens_file = Some(tokens);
        c.tls.cert = Some(cert);
        c.tls.key = Some(key);
        c.tls.client_ca = Some(ca2);
    })
    .await;
    let addr = c.addr.to_string();
    let with = |cert: &str, token: &str| ClientOptions {
        ca_cert: Some(d.join("ca.pem")),
        client_cert: Some(d.join(format!("{cert}.pem"))),
        client_key: Some(d.join(format!("{cert}.key"))),
        token: Some(token.to_string()),
        ..ClientOptions::new(addr.clone())
    };
    let register = |o: ClientOptions, name: &'static str| async move {
        WorkerServiceClient::new(o.connect().await.unwrap())
            .register(register_request(name, 1))
            .await
    };
    register(with("n1", "tok-fleet"), "n1").await.unwrap();
    let e = register(with("n1", "tok-fleet"), "n2").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("\"n1\""), "{}", e.message());
    let e = register(with("n1", "tok-node-b"), "b").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("client certificate"),
        "{}",
        e.message()
    );
    // The fleet certificate names no node: a fleet token registers any node not online.
    register(with("worker", "tok-fleet"), "n3").await.unwrap();
}
