//! Security, round two: what an authenticated but hostile peer could do, each through the real
//! server with tokens (and TLS where it matters): forged metric series, an inflatable /metrics
//! page, daemon impersonation, the admin acting as a daemon, unbounded reports and specs, wrong
//! status codes for malformed messages, file modes.
use std::path::Path;

use bt_coordinator::auth::{token_hash, Role, TokenEntry, TokenFile};
use bt_coordinator::config::{AuthMode, CoordinatorConfig};
use bt_proto::client::ClientOptions;
use bt_proto::job_service_client::JobServiceClient;
use bt_proto::worker_service_client::WorkerServiceClient;
use bt_proto::*;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::harness::{eventually, register_request, spec, Coord, FakeDaemon};

/// Tokens: an admin, a submitter, a fleet worker token and one token bound to each of nodes a
/// and b.
fn write_tokens(dir: &Path) -> std::path::PathBuf {
    let entry = |n: &str, role, node: Option<&str>| TokenEntry {
        name: n.into(),
        role,
        sha256: token_hash(&format!("tok-{n}")),
        node: node.map(str::to_string),
    };
    let tokens = TokenFile {
        tokens: vec![
            entry("root", Role::Admin, None),
            entry("alice", Role::Submitter, None),
            entry("fleet", Role::Worker, None),
            entry("node-a", Role::Worker, Some("a")),
            entry("node-b", Role::Worker, Some("b")),
        ],
    };
    let p = dir.join("tokens.toml");
    std::fs::write(&p, tokens.to_toml()).unwrap();
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn secured(dir: &Path, f: impl FnOnce(&mut CoordinatorConfig)) -> Coord {
    let tokens = write_tokens(dir);
    Coord::start_with(move |c: &mut CoordinatorConfig| {
        c.auth.mode = AuthMode::On;
        c.auth.tokens_file = Some(tokens);
        f(c);
    })
    .await
}

async fn channel(c: &Coord, token: &str) -> bt_proto::client::AuthChannel {
    ClientOptions {
        token: Some(token.to_string()),
        ..ClientOptions::new(c.url())
    }
    .connect()
    .await
    .unwrap()
}

async fn jobs_as(c: &Coord, token: &str) -> JobServiceClient<bt_proto::client::AuthChannel> {
    JobServiceClient::new(channel(c, token).await)
}

async fn workers_as(c: &Coord, token: &str) -> WorkerServiceClient<bt_proto::client::AuthChannel> {
    WorkerServiceClient::new(channel(c, token).await)
}

/// Opens a session for `worker_id` as `token`; the error of the call if refused.
async fn open_session(
    c: &Coord,
    token: &str,
    worker_id: &str,
) -> Result<
    (
        tokio::sync::mpsc::Sender<WorkerMessage>,
        tonic::Streaming<CoordinatorMessage>,
    ),
    tonic::Status,
> {
    let (up, rx) = tokio::sync::mpsc::channel(16);
    up.send(WorkerMessage {
        msg: Some(worker_message::Msg::Hello(Hello {
            worker_id: worker_id.to_string(),
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let down = workers_as(c, token)
        .await
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((up, down))
}

async fn get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn metrics_page(addr: &str) -> String {
    let text = get(addr, "/metrics").await;
    text.split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or(text)
}

/// The samples of a text-format page, parsed strictly (label values unescaped as the format
/// says); panics on a line that is not a comment, blank or `name{labels} value`.
fn parse_exposition(page: &str) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
    let mut out = vec![];
    for line in page.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let end = line.find(['{', ' ']).expect(line);
        let name = line[..end].to_string();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        let mut labels = std::collections::BTreeMap::new();
        let mut rest = &line[end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            loop {
                let (i, _) = *chars.peek().expect(line);
                let eq = r[i..].find("=\"").expect(line) + i;
                let key = r[i..eq].to_string();
                for _ in i..eq + 2 {
                    chars.next();
                }
                let mut value = String::new();
                loop {
                    match chars.next().expect(line).1 {
                        '\\' => match chars.next().expect(line).1 {
                            'n' => value.push('\n'),
                            c @ ('\\' | '"') => value.push(c),
                            c => panic!("bad escape \\{c} in {line:?}"),
                        },
                        '"' => break,
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
                match chars.next().expect(line) {
                    (_, ',') => continue,
                    (j, '}') => {
                        rest = &r[j + 1..];
                        break;
                    }
                    (_, c) => panic!("unexpected {c:?} after a label in {line:?}"),
                }
            }
        }
        let value = rest.strip_prefix(' ').expect(line);
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value {value:?} in {line:?}"
        );
        out.push((name, labels));
    }
    out
}

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
    let a_id = workers_as(&c, "tok-node-a")
        .await
        .register(register_request("a", 1))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let e = workers_as(&c, "tok-node-b")
        .await
        .register(register_request("a", 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("name: "), "{}", e.message());
    let e = open_session(&c, "tok-node-b", &a_id).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("hello.worker_id: "), "{}", e.message());
    // The node itself gets in; then a fleet token can neither re-register nor open a second
    // session for it while it is live.
    let (_up, mut down) = open_session(&c, "tok-node-a", &a_id).await.unwrap();
    let e = workers_as(&c, "tok-fleet")
        .await
        .register(register_request("a", 8))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = open_session(&c, "tok-fleet", &a_id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("live session"), "{}", e.message());
    // The admin is not a daemon.
    let e = workers_as(&c, "tok-root")
        .await
        .register(register_request("c", 1))
        .await
        .unwrap_err();
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
    let a_id = workers_as(&c, "tok-node-a")
        .await
        .register(register_request("a", 1))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let set = prost_types::FileDescriptorSet::decode(bt_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut checked = 0;
    for f in &set.file {
        for s in f.service.iter().filter(|s| s.name() == "WorkerService") {
            for m in &s.method {
                for token in ["tok-node-b", "tok-root"] {
                    let code = match m.name() {
                        "Register" => workers_as(&c, token)
                            .await
                            .register(register_request("a", 1))
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
    let e = workers_as(&c, "tok-fleet")
        .await
        .register(register_request("big", 17))
        .await
        .unwrap_err();
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
    let mut viewer = jobs_as(&c, "tok-root").await;
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
    let mut s = viewer
        .watch_job(WatchJobRequest {
            job_id: a.job_id.clone(),
            from_step: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = vec![];
    while let Some(ev) = s.message().await.unwrap() {
        events.push(ev);
    }
    let notices = events
        .iter()
        .filter(|ev| matches!(ev.kind, Some(job_event::Kind::Notice(_))))
        .count();
    assert!((1..30).contains(&notices), "{notices} notices kept of 60");
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
