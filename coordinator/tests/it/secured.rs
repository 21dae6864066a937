//! Helpers of the security tests (`security.rs`, `limits.rs`): a coordinator with tokens of every
//! kind (fleet and node-bound worker tokens among them), clients that present them, sessions, and
//! a strict reader of the Prometheus text format.
use std::path::Path;

use bt_coordinator::auth::{token_hash, Role, TokenEntry, TokenFile};
use bt_coordinator::config::{AuthMode, CoordinatorConfig};
use bt_proto::client::ClientOptions;
use bt_proto::job_service_client::JobServiceClient;
use bt_proto::worker_service_client::WorkerServiceClient;
use bt_proto::*;
use tokio_stream::wrappers::ReceiverStream;

use crate::harness::{register_request, Coord};

/// Tokens: an admin, a submitter, a fleet worker token and one token bound to each of nodes a
/// and b.
pub(crate) fn write_tokens(dir: &Path) -> std::path::PathBuf {
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

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) async fn secured(dir: &Path, f: impl FnOnce(&mut CoordinatorConfig)) -> Coord {
    let tokens = write_tokens(dir);
    Coord::start_with(move |c: &mut CoordinatorConfig| {
        c.auth.mode = AuthMode::On;
        c.auth.tokens_file = Some(tokens);
        f(c);
    })
    .await
}

pub(crate) async fn channel(c: &Coord, token: &str) -> bt_proto::client::AuthChannel {
    ClientOptions {
        token: Some(token.to_string()),
        ..ClientOptions::new(c.url())
    }
    .connect()
    .await
    .unwrap()
}

pub(crate) async fn jobs_as(
    c: &Coord,
    token: &str,
) -> JobServiceClient<bt_proto::client::AuthChannel> {
    JobServiceClient::new(channel(c, token).await)
}

pub(crate) async fn workers_as(
    c: &Coord,
    token: &str,
) -> WorkerServiceClient<bt_proto::client::AuthChannel> {
    WorkerServiceClient::new(channel(c, token).await)
}

/// Opens a session for `worker_id` as `token`; the error of the call if refused.
pub(crate) async fn open_session(
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

pub(crate) async fn get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

pub(crate) async fn metrics_page(addr: &str) -> String {
    let text = get(addr, "/metrics").await;
    text.split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or(text)
}

/// The samples of a text-format page, parsed strictly (label values unescaped as the format
/// says); panics on a line that is not a comment, blank or `name{labels} value`.
pub(crate) fn parse_exposition(
    page: &str,
) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
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

/// Registers `name` with `devices` CPU slots as `token`: its worker id, or the refusal.
pub(crate) async fn register_as(
    c: &Coord,
    token: &str,
    name: &str,
    devices: u32,
) -> Result<String, tonic::Status> {
    Ok(workers_as(c, token)
        .await
        .register(register_request(name, devices))
        .await?
        .into_inner()
        .worker_id)
}

/// The persisted history of job `id`, read as `token`.
pub(crate) async fn history_as(c: &Coord, token: &str, id: &str) -> Vec<JobEvent> {
    let mut s = jobs_as(c, token)
        .await
        .watch_job(WatchJobRequest {
            job_id: id.into(),
            from_step: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = vec![];
    while let Some(ev) = s.message().await.unwrap() {
        out.push(ev);
    }
    out
}
