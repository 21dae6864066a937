//! The real binary: --addr-file, and durability across kill -9.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bt_proto::job_service_client::JobServiceClient;
use bt_proto::{GetJobRequest, JobState, SubmitJobRequest};

use crate::harness::{spec, WAIT};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start(dir: &std::path::Path) -> (Proc, String) {
    let addr_file = dir.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let child = Command::new(env!("CARGO_BIN_EXE_bt-coordinator"))
        .args(["--auth", "off", "--listen", "127.0.0.1:0", "--addr-file"])
        .arg(&addr_file)
        .arg("--db")
        .arg(dir.join("state.db"))
        .arg("--checkpoint-root")
        .arg(dir.join("ckpt"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start bt-coordinator");
    let p = Proc(child);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            if !a.is_empty() {
                return (p, format!("http://{}", a.trim()));
            }
        }
        assert!(Instant::now() < deadline, "no address file written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn acknowledged_jobs_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut p, url) = start(tmp.path()).await;
    let mut c = JobServiceClient::connect(url).await.unwrap();
    let mut ids = vec![];
    for _ in 0..5 {
        let j = c
            .submit_job(SubmitJobRequest {
                spec_toml: spec(2, 1),
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(j.id);
    }
    p.0.kill().unwrap(); // SIGKILL: no chance to flush anything
    p.0.wait().unwrap();
    let (_p, url) = start(tmp.path()).await;
    let mut c = JobServiceClient::connect(url).await.unwrap();
    for id in ids {
        let j = c
            .get_job(GetJobRequest { job_id: id })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(j.state, JobState::Queued as i32);
        assert_eq!(j.world_size, 2);
    }
}

/// Finding 6 of the security review: a value a peer sends cannot write a line of its own into the
/// coordinator's log. The real binary, authentication on, its stderr read back: a job name with a
/// newline is refused, and a drain reason with a newline, a carriage return and a terminal escape
/// (an admin's text, logged as given) stays inside its event's one line, in text and JSON logs.
#[tokio::test]
async fn peers_cannot_forge_log_lines() {
    use bt_coordinator::auth::{token_hash, Role, TokenEntry, TokenFile};
    use bt_proto::client::ClientOptions;
    use bt_proto::worker_service_client::WorkerServiceClient;
    use bt_proto::DrainWorkerRequest;
    let forged = "2026-12-08T00:00:00.000000Z  INFO job succeeded job_id=forged";
    for json in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let tokens = TokenFile {
            tokens: [("root", Role::Admin), ("node", Role::Worker)]
                .into_iter()
                .map(|(n, role)| TokenEntry {
                    name: n.into(),
                    role,
                    sha256: token_hash(&format!("tok-{n}")),
                    node: None,
                })
                .collect(),
        };
        std::fs::write(dir.join("tokens.toml"), tokens.to_toml()).unwrap();
        let addr_file = dir.join("addr");
        let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_bt-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--addr-file"])
            .arg(&addr_file)
            .arg("--tokens-file")
            .arg(dir.join("tokens.toml"))
            .arg("--db")
            .arg(dir.join("state.db"))
            .arg("--checkpoint-root")
            .arg(dir.join("ckpt"))
            .env("BT_LOG_FORMAT", if json { "json" } else { "text" })
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start bt-coordinator");
        let _p = Proc(child);
        let deadline = Instant::now() + WAIT;
        let url = loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                if !a.is_empty() {
                    break format!("http://{}", a.trim());
                }
            }
            assert!(Instant::now() < deadline, "no address file written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let opts = |t: &str| ClientOptions {
            token: Some(t.to_string()),
            ..ClientOptions::new(url.clone())
        };
        let mut jobs = JobServiceClient::new(opts("tok-root").connect().await.unwrap());
        let e = jobs
            .submit_job(SubmitJobRequest {
                spec_toml: format!("name = \"x\\n{forged}\"\n"),
            })
            .await
            .unwrap_err();
        assert!(e.message().starts_with("name:"), "{}", e.message());
        WorkerServiceClient::new(opts("tok-node").connect().await.unwrap())
            .register(crate::harness::register_request("n1", 1))
            .await
            .unwrap();
        jobs.drain_worker(DrainWorkerRequest {
            worker: "n1".into(),
            reason: format!("maintenance\n{forged}\r\u{1b}[1A"),
            undo: false,
        })
        .await
        .unwrap();
        // The drain is logged (twice: the core and the service); wait for it.
        let path = dir.join("stderr.log");
        let text = loop {
            let t = std::fs::read_to_string(&path).unwrap();
            if t.contains("drain request") {
                break t;
            }
            assert!(Instant::now() < deadline, "no drain logged:\n{t}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            text.contains("job_id=forged"),
            "the text is kept, escaped:\n{text}"
        );
        for line in text.lines() {
            assert!(
                !line.starts_with("2026-12-08T00:00:00"),
                "a forged line (json={json}):\n{text}"
            );
            assert!(!line.contains('\r') && !line.contains('\u{1b}'), "{line:?}");
            if json {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("not one JSON event per line: {e}: {line}"));
            }
        }
    }
}
