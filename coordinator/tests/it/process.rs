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
