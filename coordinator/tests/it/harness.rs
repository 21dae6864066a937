//! Test harness: a coordinator in-process and a scripted worker daemon.
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bt_coordinator::CoordinatorConfig;
use bt_proto::job_service_client::JobServiceClient;
use bt_proto::worker_service_client::WorkerServiceClient;
use bt_proto::{
    coordinator_message, trainer_report, worker_message, Assignment, CheckpointInfo,
    CoordinatorMessage, Device, GetJobRequest, Hello, Job, JobEvent, JobState,
    ListCheckpointsRequest, RegisterRequest, RunningTrainer, SubmitJobRequest, TrainMetrics,
    TrainerExit, TrainerReport, TrainerStarted, WatchJobRequest, WorkerMessage, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

pub const WAIT: Duration = Duration::from_secs(20);

pub struct Coord {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _tmp: Option<tempfile::TempDir>,
}

pub fn test_config(dir: &std::path::Path) -> CoordinatorConfig {
    CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        db_path: dir.join("state.db"),
        checkpoint_root: dir.join("ckpt"),
        heartbeat_interval_ms: 200,
        heartbeat_timeout_ms: 2000,
        watch_buffer: 256,
        // The scripted daemons and clients of these tests send no token; tests/it/auth.rs
        // covers authentication.
        auth: bt_coordinator::config::AuthConfig {
            mode: bt_coordinator::config::AuthMode::Off,
            ..Default::default()
        },
        // Scripted daemons report in bursts far above a trainer's rate.
        limits: bt_coordinator::config::Limits {
            max_metrics_per_sec: 1_000_000,
            max_reports_per_sec: 1_000_000,
            submit_per_minute: 1_000_000,
            submit_burst: 1_000_000,
            ..Default::default()
        },
        ..Default::default()
    }
}

impl Coord {
    pub async fn start() -> Coord {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut CoordinatorConfig)) -> Coord {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut c = Self::start_in(&dir, f).await;
        c._tmp = Some(tmp);
        c
    }

    /// Starts a coordinator over the state in `dir` (reused across restarts).
    pub async fn start_in(dir: &std::path::Path, f: impl FnOnce(&mut CoordinatorConfig)) -> Coord {
        let mut config = test_config(dir);
        f(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(bt_coordinator::run(config, listener, async {
            let _ = rx.await;
        }));
        Coord {
            addr,
            stop: Some(stop),
            handle: Some(handle),
            _tmp: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::connect(self.url()).await.unwrap()
    }

    pub async fn workers(&self) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::connect(self.url()).await.unwrap()
    }

    /// Stops the coordinator and waits for `run` to return; keeps the temp dir alive.
    pub async fn stop(&mut self) -> Option<tempfile::TempDir> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(WAIT, h)
                .await
                .expect("run returns after shutdown")
                .unwrap()
                .unwrap();
        }
        self._tmp.take()
    }

    pub async fn submit(&self, spec: &str) -> Job {
        self.jobs()
            .await
            .submit_job(SubmitJobRequest {
                spec_toml: spec.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn job(&self, id: &str) -> Job {
        self.jobs()
            .await
            .get_job(GetJobRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner()
    }

    /// The job's committed checkpoints.
    pub async fn checkpoints(&self, id: &str) -> Vec<CheckpointInfo> {
        self.jobs()
            .await
            .list_checkpoints(ListCheckpointsRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .checkpoints
    }

    /// Polls the job until `pred` holds (with a deadline).
    pub async fn wait_job(&self, id: &str, what: &str, pred: impl Fn(&Job) -> bool) -> Job {
        let mut client = self.jobs().await;
        let deadline = Instant::now() + WAIT;
        loop {
            let j = client
                .get_job(GetJobRequest { job_id: id.into() })
                .await
                .unwrap()
                .into_inner();
            if pred(&j) {
                return j;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; job is {j:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_state(&self, id: &str, state: JobState) -> Job {
        self.wait_job(id, state.name(), |j| j.state == state as i32)
            .await
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub fn spec(world_size: u32, max_restarts: u32) -> String {
    format!(
        "name = \"test\"\nworld_size = {world_size}\n[restart]\nmax_restarts = {max_restarts}\n"
    )
}

pub fn register_request(name: &str, devices: u32) -> RegisterRequest {
    RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        name: name.into(),
        host: "127.0.0.1".into(),
        devices: (0..devices)
            .map(|i| Device {
                index: i,
                kind: "cpu".into(),
                name: format!("cpu{i}"),
                device_kind: bt_proto::DeviceKind::Cpu as i32,
            })
            .collect(),
        port_range_start: 30000,
        port_range_end: 30100,
        unhealthy: String::new(),
    }
}

/// A scripted worker daemon: one registered worker with an open session.
pub struct FakeDaemon {
    pub id: String,
    up: Option<mpsc::Sender<WorkerMessage>>,
    pub down: Streaming<CoordinatorMessage>,
}

impl FakeDaemon {
    pub async fn connect(c: &Coord, name: &str, devices: u32) -> FakeDaemon {
        Self::connect_running(c, name, devices, vec![]).await
    }

    /// [`FakeDaemon::connect`] with a bearer token (a coordinator with authentication on).
    pub async fn connect_as(c: &Coord, token: &str, name: &str, devices: u32) -> FakeDaemon {
        let ch = bt_proto::client::ClientOptions {
            token: Some(token.to_string()),
            ..bt_proto::client::ClientOptions::new(c.url())
        }
        .connect()
        .await
        .unwrap();
        Self::connect_on(WorkerServiceClient::new(ch), name, devices, vec![]).await
    }

    pub async fn connect_running(
        c: &Coord,
        name: &str,
        devices: u32,
        running: Vec<RunningTrainer>,
    ) -> FakeDaemon {
        let ch = bt_proto::client::ClientOptions::new(c.url())
            .connect()
            .await
            .unwrap();
        Self::connect_on(WorkerServiceClient::new(ch), name, devices, running).await
    }

    async fn connect_on(
        mut w: WorkerServiceClient<bt_proto::client::AuthChannel>,
        name: &str,
        devices: u32,
        running: Vec<RunningTrainer>,
    ) -> FakeDaemon {
        let id = w
            .register(register_request(name, devices))
            .await
            .unwrap()
            .into_inner()
            .worker_id;
        let (up, rx) = mpsc::channel(64);
        up.send(WorkerMessage {
            msg: Some(worker_message::Msg::Hello(Hello {
                worker_id: id.clone(),
                protocol_version: PROTOCOL_VERSION,
                running,
                exited: vec![],
            })),
        })
        .await
        .unwrap();
        let down = w
            .session(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        FakeDaemon {
            id,
            up: Some(up),
            down,
        }
    }

    pub async fn send(&self, msg: worker_message::Msg) {
        self.up
            .as_ref()
            .expect("stream open")
            .send(WorkerMessage { msg: Some(msg) })
            .await
            .unwrap();
    }

    pub async fn report(&self, a: &Assignment, body: trainer_report::Body) {
        self.report_as(&a.job_id, a.epoch, a.rank, body).await
    }

    pub async fn report_as(&self, job_id: &str, epoch: u64, rank: u32, body: trainer_report::Body) {
        self.send(worker_message::Msg::Report(TrainerReport {
            job_id: job_id.into(),
            epoch,
            rank,
            body: Some(body),
        }))
        .await
    }

    /// Reports bare training metrics for `step` (every other field left at its default).
    pub async fn report_step(&self, a: &Assignment, step: u64) {
        self.report(
            a,
            trainer_report::Body::Metrics(TrainMetrics {
                step,
                ..Default::default()
            }),
        )
        .await
    }

    pub async fn started(&self, a: &Assignment) {
        self.report(a, trainer_report::Body::Started(TrainerStarted { pid: 42 }))
            .await
    }

    pub async fn exit_ok(&self, a: &Assignment) {
        self.report(
            a,
            trainer_report::Body::Exit(TrainerExit {
                success: true,
                ..Default::default()
            }),
        )
        .await
    }

    /// Closes the upward half of the session (the coordinator sees the stream end).
    pub fn drop_stream(&mut self) {
        self.up = None;
    }

    /// The next message down, with a deadline.
    pub async fn next(&mut self) -> coordinator_message::Msg {
        let m = tokio::time::timeout(WAIT, self.down.message())
            .await
            .expect("timed out waiting for a coordinator message")
            .expect("session stream failed")
            .expect("session stream ended");
        m.msg.expect("message has a body")
    }

    pub async fn next_assignment(&mut self) -> Assignment {
        loop {
            match self.next().await {
                coordinator_message::Msg::Assign(a) => return a,
                other => eprintln!("skipping {other:?}"),
            }
        }
    }
}

/// Waits for `cond` (async) with the harness deadline.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The job's whole persisted history (no follow).
pub async fn history(c: &Coord, id: &str) -> Vec<JobEvent> {
    let mut s = c
        .jobs()
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
