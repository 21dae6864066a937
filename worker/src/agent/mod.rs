//! The worker daemon: registers this node's devices with the coordinator, keeps one session stream
//! alive (reconnecting with backoff), spawns one trainer process per assigned rank and relays its
//! events. A crashing trainer never takes the daemon down.
mod supervisor;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use bt_proto::coordinator_message::Msg as Down;
use bt_proto::worker_message::Msg as Up;
use bt_proto::worker_service_client::WorkerServiceClient;
use bt_proto::*;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tracing::{info, warn};

pub use supervisor::TrainerHandle;

/// Daemon configuration: file, `BT_WORKER_*` environment, then flags.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Coordinator address (host:port or http://host:port).
    #[serde(default = "d::coordinator")]
    pub coordinator: String,
    /// Stable daemon name (one per node); defaults to the host name.
    #[serde(default)]
    pub name: String,
    /// Address other nodes' trainers use to reach this node's rank 0.
    #[serde(default = "d::host")]
    pub host: String,
    /// CPU trainer slots offered when the node has no CUDA device.
    #[serde(default = "d::cpu_slots")]
    pub cpu_slots: u32,
    /// Ports for the rank-0 TCPStore of jobs whose rank 0 lands here, [start, end).
    #[serde(default = "d::port_start")]
    pub port_range_start: u32,
    #[serde(default = "d::port_end")]
    pub port_range_end: u32,
    /// Trainer logs and scratch space.
    #[serde(default = "d::work_dir")]
    pub work_dir: PathBuf,
    /// How long a trainer gets after SIGTERM before SIGKILL.
    #[serde(default = "d::stop_grace_ms")]
    pub stop_grace_ms: u64,
    /// The trainer executable (default: this binary's `train` subcommand).
    #[serde(default)]
    pub trainer_bin: Option<PathBuf>,
    /// Reports kept while the coordinator is unreachable.
    #[serde(default = "d::max_buffered")]
    pub max_buffered_reports: usize,
}

mod d {
    use std::path::PathBuf;
    pub fn coordinator() -> String {
        "http://127.0.0.1:7070".into()
    }
    pub fn host() -> String {
        "127.0.0.1".into()
    }
    pub fn cpu_slots() -> u32 {
        1
    }
    pub fn port_start() -> u32 {
        29500
    }
    pub fn port_end() -> u32 {
        29600
    }
    pub fn work_dir() -> PathBuf {
        PathBuf::from("bt-worker")
    }
    pub fn stop_grace_ms() -> u64 {
        10_000
    }
    pub fn max_buffered() -> usize {
        10_000
    }
}

impl WorkerConfig {
    fn resolved_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "worker".into())
    }
}

/// The devices this node offers: every CUDA device, or `cpu_slots` CPU slots.
pub fn detect_devices(cpu_slots: u32) -> Vec<Device> {
    let cuda = tch::Cuda::device_count();
    if cuda > 0 {
        return (0..cuda as u32)
            .map(|i| Device {
                index: i,
                kind: "cuda".into(),
                name: format!("cuda:{i}"),
            })
            .collect();
    }
    (0..cpu_slots)
        .map(|i| Device {
            index: i,
            kind: "cpu".into(),
            name: format!("cpu-slot-{i}"),
        })
        .collect()
}

fn endpoint(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Events the daemon's main loop handles, from trainer supervisors.
#[derive(Debug)]
pub(crate) enum Local {
    Report(Box<TrainerReport>),
    Exited {
        job_id: String,
        epoch: u64,
        rank: u32,
    },
}

struct Daemon {
    cfg: WorkerConfig,
    name: String,
    devices: Vec<Device>,
    trainers: HashMap<(String, u64, u32), TrainerHandle>,
    pending: VecDeque<TrainerReport>,
    local_tx: mpsc::UnboundedSender<Local>,
    trainer_bin: PathBuf,
}

/// Runs the daemon until `shutdown` resolves; then stops its trainers (SIGTERM, then SIGKILL).
pub async fn run(
    cfg: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let devices = detect_devices(cfg.cpu_slots);
    anyhow::ensure!(
        !devices.is_empty(),
        "this node offers no device (cpu_slots = 0 and no CUDA device)"
    );
    anyhow::ensure!(
        cfg.port_range_start > 0
            && cfg.port_range_start < cfg.port_range_end
            && cfg.port_range_end <= 65536,
        "port_range_start..port_range_end must be a non-empty range of ports"
    );
    std::fs::create_dir_all(&cfg.work_dir)
        .map_err(|e| anyhow::anyhow!("cannot create work_dir {}: {e}", cfg.work_dir.display()))?;
    let trainer_bin = match &cfg.trainer_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?,
    };
    let (local_tx, mut local_rx) = mpsc::unbounded_channel();
    let mut d = Daemon {
        name: cfg.resolved_name(),
        cfg,
        devices,
        trainers: HashMap::new(),
        pending: VecDeque::new(),
        local_tx,
        trainer_bin,
    };
    info!(name = %d.name, devices = d.devices.len(), coordinator = %d.cfg.coordinator, "worker daemon starting");
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = tokio::select! {
            _ = &mut shutdown => break,
            r = d.session(&mut local_rx) => r,
        };
        match result {
            Ok(()) => {
                info!("session ended; reconnecting");
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "coordinator session failed");
            }
        }
        // While disconnected, keep draining trainer events into the buffer.
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = &mut shutdown => { d.stop_all().await; return Ok(()); }
                Some(ev) = local_rx.recv() => d.local(ev, None),
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(3));
    }
    d.stop_all().await;
    info!("worker daemon stopped");
    Ok(())
}

impl Daemon {
    /// One connection: register, open the session, serve it until it breaks.
    async fn session(
        &mut self,
        local_rx: &mut mpsc::UnboundedReceiver<Local>,
    ) -> anyhow::Result<()> {
        let url = endpoint(&self.cfg.coordinator);
        let channel = tonic::transport::Endpoint::from_shared(url)?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await?;
        let mut client = WorkerServiceClient::new(channel);
        let reg = client
            .register(RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                name: self.name.clone(),
                host: self.cfg.host.clone(),
                devices: self.devices.clone(),
                port_range_start: self.cfg.port_range_start,
                port_range_end: self.cfg.port_range_end,
            })
            .await;
        let reg = match reg {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                tracing::error!(message = %s.message(), "coordinator refused registration");
                anyhow::bail!("registration refused: {}", s.message());
            }
            Err(s) => anyhow::bail!("register: {s}"),
        };
        info!(worker_id = %reg.worker_id, "registered with coordinator");
        let (up_tx, up_rx) = mpsc::channel::<WorkerMessage>(1024);
        let running = self
            .trainers
            .keys()
            .map(|(job_id, epoch, rank)| RunningTrainer {
                job_id: job_id.clone(),
                epoch: *epoch,
                rank: *rank,
            })
            .collect();
        up_tx
            .send(WorkerMessage {
                msg: Some(Up::Hello(Hello {
                    worker_id: reg.worker_id.clone(),
                    protocol_version: PROTOCOL_VERSION,
                    running,
                })),
            })
            .await?;
        let mut down = client
            .session(ReceiverStream::new(up_rx))
            .await?
            .into_inner();
        // Reports that piled up while we were away.
        while let Some(r) = self.pending.pop_front() {
            up_tx
                .send(WorkerMessage {
                    msg: Some(Up::Report(r)),
                })
                .await?;
        }
        let hb = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.clamp(100, 60_000)));
        let mut tick = tokio::time::interval(hb);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    up_tx.send(WorkerMessage { msg: Some(Up::Heartbeat(Heartbeat { time_ms: bt_common::now_ms() })) }).await?;
                }
                msg = down.next() => match msg {
                    Some(Ok(m)) => self.command(m).await,
                    Some(Err(s)) => anyhow::bail!("session stream: {s}"),
                    None => return Ok(()),
                },
                Some(ev) = local_rx.recv() => self.local(ev, Some(&up_tx)),
            }
        }
    }

    /// Handles a trainer event: forward it if connected, else buffer it.
    fn local(&mut self, ev: Local, up: Option<&mpsc::Sender<WorkerMessage>>) {
        match ev {
            Local::Report(r) => {
                let r = *r;
                let Some(tx) = up else {
                    self.buffer(r);
                    return;
                };
                if let Err(e) = tx.try_send(WorkerMessage {
                    msg: Some(Up::Report(r)),
                }) {
                    if let WorkerMessage {
                        msg: Some(Up::Report(r)),
                    } = e.into_inner()
                    {
                        self.buffer(r);
                    }
                }
            }
            Local::Exited {
                job_id,
                epoch,
                rank,
            } => {
                self.trainers.remove(&(job_id, epoch, rank));
            }
        }
    }

    fn buffer(&mut self, r: TrainerReport) {
        if self.pending.len() >= self.cfg.max_buffered_reports {
            // Drop the oldest metrics first; exits, checkpoints and evals are kept.
            if let Some(i) = self
                .pending
                .iter()
                .position(|p| matches!(p.body, Some(trainer_report::Body::Metrics(_))))
            {
                self.pending.remove(i);
            } else {
                self.pending.pop_front();
            }
        }
        self.pending.push_back(r);
    }

    async fn command(&mut self, m: CoordinatorMessage) {
        match m.msg {
            Some(Down::Assign(a)) => self.assign(a),
            Some(Down::Cancel(c)) => {
                let keys: Vec<_> = self
                    .trainers
                    .keys()
                    .filter(|(j, e, _)| *j == c.job_id && (c.epoch == 0 || *e == c.epoch))
                    .cloned()
                    .collect();
                for k in keys {
                    info!(job_id = %k.0, epoch = k.1, rank = k.2, reason = %c.reason, "stopping trainer");
                    if let Some(t) = self.trainers.get(&k) {
                        t.stop(Duration::from_millis(self.cfg.stop_grace_ms));
                    }
                }
            }
            Some(Down::DeleteCheckpoints(d)) => {
                for p in d.paths {
                    let path = PathBuf::from(&p);
                    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&path) {
                        Ok(()) => info!(path = %path.display(), "deleted checkpoint"),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            warn!(path = %path.display(), error = %e, "cannot delete checkpoint")
                        }
                    });
                }
            }
            None => {}
        }
    }

    fn assign(&mut self, a: Assignment) {
        let key = (a.job_id.clone(), a.epoch, a.rank);
        if self.trainers.contains_key(&key) {
            return;
        }
        if !self.devices.iter().any(|d| d.index == a.device) {
            warn!(
                device = a.device,
                "assignment names a device this node does not have"
            );
            let _ = self.local_tx.send(Local::Report(Box::new(TrainerReport {
                job_id: a.job_id.clone(),
                epoch: a.epoch,
                rank: a.rank,
                body: Some(trainer_report::Body::Exit(TrainerExit {
                    success: false,
                    code: -1,
                    reason: format!("device {} does not exist on worker {}", a.device, self.name),
                    ..Default::default()
                })),
            })));
            return;
        }
        let kind = self
            .devices
            .iter()
            .find(|d| d.index == a.device)
            .map(|d| d.kind.clone())
            .unwrap_or_default();
        info!(job_id = %a.job_id, epoch = a.epoch, rank = a.rank, world_size = a.world_size, "starting trainer");
        match supervisor::spawn(
            &self.trainer_bin,
            &self.cfg.work_dir,
            a,
            &kind,
            self.local_tx.clone(),
        ) {
            Ok(h) => {
                self.trainers.insert(key, h);
            }
            Err(e) => warn!(error = %e, "cannot start trainer"),
        }
    }

    async fn stop_all(&mut self) {
        let grace = Duration::from_millis(self.cfg.stop_grace_ms);
        for t in self.trainers.values() {
            t.stop(grace);
        }
        let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(1);
        for (_, t) in self.trainers.drain() {
            let _ = tokio::time::timeout_at(deadline, t.wait()).await;
        }
    }
}
