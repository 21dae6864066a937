//! The worker daemon: registers this node's devices with the coordinator, keeps one session stream
//! alive (reconnecting with backoff), spawns one trainer process per assigned rank and relays its
//! events. A crashing trainer never takes the daemon down.
mod confine;
mod devices;
mod outbox;
mod supervisor;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bt_common::domain::NoticeLevel;
use bt_proto::coordinator_message::Msg as Down;
use bt_proto::worker_message::Msg as Up;
use bt_proto::worker_service_client::WorkerServiceClient;
use bt_proto::*;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tracing::{info, warn};

pub use confine::confine_assignment;
use confine::delete_checkpoint;
pub use devices::{detect_devices, plan_devices, CudaProbe, DevicePlan, GpuExpectation};
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
    /// CPU trainer slots offered when the node has no CUDA device (never by a GPU daemon).
    #[serde(default = "d::cpu_slots")]
    pub cpu_slots: u32,
    /// GPUs this node must have. Unset: every GPU CUDA finds (expected when
    /// `NVIDIA_VISIBLE_DEVICES` names devices, as for a pod given `nvidia.com/gpu`), else
    /// `cpu_slots`; N: exactly N; 0: a CPU daemon. A node short of what is expected registers
    /// unhealthy, with the reason, offering nothing (see `devices`).
    #[serde(default)]
    pub gpus: Option<u32>,
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
    /// Reports kept while the coordinator is unreachable (and replayed on the reconnect, in
    /// order). When full, the oldest log lines go first, then pictures, then metrics; starts,
    /// exits, checkpoints, evaluations and notices are kept. 10,000 holds two minutes of the
    /// coordinator's most (50 metric reports a second) for a whole node, a restarted
    /// coordinator's reconnect grace.
    #[serde(default = "d::max_buffered")]
    pub max_buffered_reports: usize,
    /// Nothing heard down the session (a coordinator of protocol 3 or later acknowledges every
    /// heartbeat) for this long: the coordinator, its node or the link is gone (a black hole
    /// sends no FIN or RST). The daemon reconnects, and keeps retrying; its trainers keep
    /// running and their reports are buffered.
    #[serde(default = "d::session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// Buffered metric reports replayed after a reconnect, per trainer per second: under the
    /// coordinator's `limits.max_metrics_per_sec` (50), so none is dropped as a burst. Other
    /// buffered reports replay at up to 10 per trainer and kind per second; starts and exits at
    /// once.
    #[serde(default = "d::replay_metrics_per_sec")]
    pub replay_metrics_per_sec: u32,
    /// For staged upgrades and their tests only: the protocol version to announce. The
    /// previous one (`PROTOCOL_VERSION - 1`) behaves as the previous release did; the next one
    /// only shows that a coordinator refuses a daemon newer than itself. Default: this build's.
    #[serde(default)]
    pub protocol_version: Option<u32>,
    /// Checkpoint storage (the coordinator's checkpoint root, mounted here at the same path): the
    /// only place this daemon lets trainers write checkpoints and deletes them on request.
    #[serde(default = "d::checkpoint_root")]
    pub checkpoint_root: PathBuf,
    /// Roots a job's data may be read from (besides the checkpoint root).
    #[serde(default = "d::data_roots")]
    pub data_roots: Vec<PathBuf>,
    /// The worker token (`BT_WORKER_TOKEN`), or a file holding it.
    #[serde(default)]
    pub token: bt_common::Secret,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the coordinator's: TLS, with the server verified.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// This daemon's client certificate and key (PEM), for mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Name to verify in the coordinator's certificate (default: the address's host).
    #[serde(default)]
    pub tls_domain: Option<String>,
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
    pub fn session_timeout_ms() -> u64 {
        15_000
    }
    pub fn replay_metrics_per_sec() -> u32 {
        25
    }
    pub fn checkpoint_root() -> PathBuf {
        PathBuf::from("checkpoints")
    }
    pub fn data_roots() -> Vec<PathBuf> {
        vec![PathBuf::from("/usr/share/datasets")]
    }
}

impl WorkerConfig {
    /// How to reach the coordinator: address, TLS and the token (read from its file now).
    pub fn client_options(&self) -> anyhow::Result<bt_proto::client::ClientOptions> {
        let token = match (&self.token_file, self.token.0.trim()) {
            (Some(f), _) => Some(bt_proto::client::read_token_file(f)?),
            (None, "") => None,
            (None, t) => Some(t.to_string()),
        };
        Ok(bt_proto::client::ClientOptions {
            addr: self.coordinator.clone(),
            token,
            ca_cert: self.ca_cert.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
            tls_domain: self.tls_domain.clone(),
            connect_timeout: Some(Duration::from_secs(3)),
        })
    }

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

/// Why an assignment is refused, which decides how its job goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The job's own fault (paths outside the roots): no restart helps.
    Job,
    /// This node's (missing device, spawn failure): a restart elsewhere may work.
    Infra,
    /// The node is draining: a preemption, the job requeues.
    Draining,
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
    client: bt_proto::client::ClientOptions,
    name: String,
    devices: Vec<Device>,
    /// Why this node is unhealthy (it then offers no device); sent when registering.
    unhealthy: Option<String>,
    trainers: HashMap<(String, u64, u32), TrainerHandle>,
    /// Reports waiting to go up (while disconnected, or behind others still waiting).
    outbox: outbox::Outbox,
    local_tx: mpsc::UnboundedSender<Local>,
    trainer_bin: PathBuf,
    /// SIGTERM came: assignments are refused, trainers are stopping.
    draining: bool,
    /// The protocol version announced (`PROTOCOL_VERSION` unless configured).
    protocol: u32,
}

/// How long connecting, registering and opening the session may take together (a black-holed
/// coordinator answers none of them).
const CONNECT_DEADLINE: Duration = Duration::from_secs(15);

/// Runs the daemon until `shutdown` resolves; then stops its trainers (SIGTERM, then SIGKILL).
pub async fn run(
    cfg: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let DevicePlan { devices, unhealthy } = detect_devices(cfg.gpus, cfg.cpu_slots);
    match &unhealthy {
        // Registered all the same, so that `btctl workers` says why nothing runs here.
        Some(why) => tracing::error!(reason = %why, "this node is unhealthy: it offers no device"),
        None => anyhow::ensure!(
            !devices.is_empty(),
            "this node offers no device (cpu_slots = 0 and no CUDA device)"
        ),
    }
    bt_common::net::check_port_range(cfg.port_range_start, cfg.port_range_end)?;
    std::fs::create_dir_all(&cfg.work_dir)
        .map_err(|e| anyhow::anyhow!("cannot create work_dir {}: {e}", cfg.work_dir.display()))?;
    std::fs::create_dir_all(&cfg.checkpoint_root).map_err(|e| {
        anyhow::anyhow!(
            "cannot create checkpoint_root {}: {e}",
            cfg.checkpoint_root.display()
        )
    })?;
    // Fails early on an unreadable token or certificate file.
    let client = cfg.client_options()?;
    client.endpoint()?;
    let trainer_bin = match &cfg.trainer_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?,
    };
    check_trainer_bin(&trainer_bin).await?;
    let protocol = cfg.protocol_version.unwrap_or(PROTOCOL_VERSION);
    anyhow::ensure!(
        (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION + 1).contains(&protocol),
        "protocol_version {protocol}: this build speaks {PROTOCOL_VERSION} (or announces \
         {MIN_PROTOCOL_VERSION}, the previous one, or {} to check a refusal)",
        PROTOCOL_VERSION + 1
    );
    if protocol != PROTOCOL_VERSION {
        warn!(
            protocol,
            features_off = ?bt_proto::features_off(protocol),
            "announcing protocol version {protocol} instead of {PROTOCOL_VERSION} \
             (protocol_version)"
        );
    }
    let (local_tx, mut local_rx) = mpsc::unbounded_channel();
    let mut d = Daemon {
        client,
        name: cfg.resolved_name(),
        outbox: outbox::Outbox::new(cfg.max_buffered_reports, cfg.replay_metrics_per_sec),
        cfg,
        devices,
        unhealthy,
        trainers: HashMap::new(),
        local_tx,
        trainer_bin,
        draining: false,
        protocol,
    };
    info!(name = %d.name, devices = d.devices.len(), coordinator = %d.cfg.coordinator, "worker daemon starting");
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = d.session(&mut local_rx, shutdown.as_mut()).await;
        if d.draining {
            if let Err(e) = result {
                warn!(error = %e, "session lost while draining");
            }
            break;
        }
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
        mut shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> anyhow::Result<()> {
        let (up_tx, up_rx) = mpsc::channel::<WorkerMessage>(1024);
        let opened = tokio::time::timeout(CONNECT_DEADLINE, self.open(&up_tx, up_rx)).await;
        let (reg, mut down) = match opened {
            Ok(r) => r?,
            Err(_) => anyhow::bail!(
                "the coordinator did not answer within {} s (connect, register, open the session)",
                CONNECT_DEADLINE.as_secs()
            ),
        };
        let hb = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.clamp(100, 60_000)));
        let mut tick = tokio::time::interval(hb);
        // A coordinator of protocol 3 or later answers every heartbeat: silence past the session
        // timeout means it (or the link) is gone, even with the socket open.
        let acked = bt_proto::has_feature(self.protocol, "heartbeat-ack")
            && bt_proto::has_feature(reg.protocol_version, "heartbeat-ack");
        let recv_timeout =
            Duration::from_millis(self.cfg.session_timeout_ms.max(2 * hb.as_millis() as u64));
        let mut heard = tokio::time::Instant::now();
        // Reports that piled up while we were away go first, paced (`flush`).
        self.outbox.restart_pacing();
        let mut next_flush = tokio::time::Instant::now();
        // Draining: until every trainer has exited (or this deadline), then the session ends.
        let mut give_up: Option<tokio::time::Instant> = None;
        loop {
            if self.draining && self.trainers.is_empty() && self.outbox.is_empty() {
                // Every exit went up; close our half and let the coordinator read it all.
                drop(up_tx);
                let _ = tokio::time::timeout(Duration::from_secs(3), async {
                    while let Some(Ok(_)) = down.next().await {}
                })
                .await;
                info!("drained: every trainer stopped and reported");
                return Ok(());
            }
            tokio::select! {
                _ = shutdown.as_mut(), if !self.draining => {
                    give_up = Some(self.begin_drain(&up_tx).await?);
                }
                _ = tokio::time::sleep_until(give_up.unwrap_or_else(tokio::time::Instant::now)), if give_up.is_some() => {
                    warn!(trainers = self.trainers.len(), "trainers still running after the stop grace; leaving");
                    return Ok(());
                }
                _ = tokio::time::sleep_until(heard + recv_timeout), if acked => {
                    anyhow::bail!(
                        "nothing from the coordinator for {} ms (session_timeout_ms): it or the \
                         link is gone; reconnecting, trainers keep running",
                        recv_timeout.as_millis()
                    );
                }
                _ = tokio::time::sleep_until(next_flush), if !self.outbox.is_empty() => {
                    next_flush = self.outbox.flush(&up_tx);
                }
                _ = tick.tick() => {
                    // Never waits: a full channel means the link is stuck, and the receive
                    // deadline above must still run.
                    let _ = up_tx.try_send(WorkerMessage {
                        msg: Some(Up::Heartbeat(Heartbeat { time_ms: bt_common::now_ms() })),
                    });
                }
                msg = down.next() => match msg {
                    Some(Ok(m)) => {
                        heard = tokio::time::Instant::now();
                        self.command(m).await
                    }
                    Some(Err(s)) => anyhow::bail!("session stream: {s}"),
                    None => return Ok(()),
                },
                Some(ev) = local_rx.recv() => self.local(ev, Some(&up_tx)),
            }
        }
    }

    /// Connects, registers and opens the session with its hello; returns the registration and
    /// the stream down.
    async fn open(
        &mut self,
        up_tx: &mpsc::Sender<WorkerMessage>,
        up_rx: mpsc::Receiver<WorkerMessage>,
    ) -> anyhow::Result<(RegisterResponse, tonic::Streaming<CoordinatorMessage>)> {
        let channel = self.client.connect().await?;
        let mut client = WorkerServiceClient::new(channel);
        let reg = client
            .register(RegisterRequest {
                protocol_version: self.protocol,
                name: self.name.clone(),
                host: self.cfg.host.clone(),
                devices: self.devices.clone(),
                port_range_start: self.cfg.port_range_start,
                port_range_end: self.cfg.port_range_end,
                unhealthy: self.unhealthy.clone().unwrap_or_default(),
            })
            .await;
        let reg = match reg {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                tracing::error!(message = %s.message(), "coordinator refused registration");
                anyhow::bail!("registration refused: {}", s.message());
            }
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                tracing::error!(message = %s.message(),
                    "coordinator refused our credentials (set token / token_file to a worker token)");
                anyhow::bail!("registration refused: {}", s.message());
            }
            Err(s) if s.code() == tonic::Code::PermissionDenied => {
                tracing::error!(message = %s.message(),
                    "coordinator refused registration: the token's role is not `worker`");
                anyhow::bail!("registration refused: {}", s.message());
            }
            Err(s) => anyhow::bail!("register: {s}"),
        };
        info!(worker_id = %reg.worker_id, coordinator_protocol = reg.protocol_version,
              buffered = self.outbox.len(), "registered with coordinator");
        let key = |(job_id, epoch, rank): (&String, u64, u32)| RunningTrainer {
            job_id: job_id.clone(),
            epoch,
            rank,
        };
        let running = self
            .trainers
            .keys()
            .map(|(j, e, r)| key((j, *e, *r)))
            .collect();
        // Trainers that ended while we were away: their exits wait in the buffer.
        let exited = if bt_proto::has_feature(self.protocol, "exit-replay") {
            self.outbox
                .iter()
                .filter(|r| matches!(r.body, Some(trainer_report::Body::Exit(_))))
                .map(|r| key((&r.job_id, r.epoch, r.rank)))
                .collect()
        } else {
            Vec::new()
        };
        up_tx
            .send(WorkerMessage {
                msg: Some(Up::Hello(Hello {
                    worker_id: reg.worker_id.clone(),
                    protocol_version: self.protocol,
                    running,
                    exited,
                })),
            })
            .await?;
        let down = client
            .session(ReceiverStream::new(up_rx))
            .await?
            .into_inner();
        Ok((reg, down))
    }

    /// Handles a trainer event: forward it if connected (and nothing buffered is still to go
    /// before it), else buffer it.
    fn local(&mut self, ev: Local, up: Option<&mpsc::Sender<WorkerMessage>>) {
        match ev {
            Local::Report(r) => {
                let r = *r;
                let Some(tx) = up.filter(|_| self.outbox.is_empty()) else {
                    self.outbox.push(r);
                    return;
                };
                if let Err(e) = tx.try_send(WorkerMessage {
                    msg: Some(Up::Report(r)),
                }) {
                    if let WorkerMessage {
                        msg: Some(Up::Report(r)),
                    } = e.into_inner()
                    {
                        self.outbox.push(r);
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
            Some(Down::StopTrainers(s)) => {
                // An operator drained this node: every trainer checkpoints and stops, as on
                // SIGTERM of the daemon, but the daemon stays up (the coordinator places nothing
                // here until the drain is undone).
                info!(trainers = self.trainers.len(), reason = %s.reason,
                      "drained: stopping trainers (they checkpoint first)");
                for t in self.trainers.values() {
                    t.stop(Duration::from_millis(self.cfg.stop_grace_ms));
                }
            }
            Some(Down::DeleteCheckpoints(d)) => {
                for p in d.paths {
                    let root = self.cfg.checkpoint_root.clone();
                    let notices = self.local_tx.clone();
                    let (job_id, epoch) = (d.job_id.clone(), d.epoch);
                    tokio::task::spawn_blocking(move || {
                        if let Err(why) = delete_checkpoint(&p, &root) {
                            warn!(error = %why, "checkpoint deletion refused");
                            let _ = notices.send(Local::Report(Box::new(TrainerReport {
                                job_id,
                                epoch,
                                rank: 0,
                                body: Some(trainer_report::Body::Notice(
                                    bt_common::domain::Notice {
                                        level: NoticeLevel::Warn,
                                        message: format!("checkpoint deletion refused: {why}"),
                                    }
                                    .into(),
                                )),
                            })));
                        }
                    });
                }
            }
            // The answer to a heartbeat: it only shows the coordinator is there.
            Some(Down::HeartbeatAck(_)) | None => {}
        }
    }

    fn assign(&mut self, a: Assignment) {
        let key = (a.job_id.clone(), a.epoch, a.rank);
        if self.trainers.contains_key(&key) {
            return;
        }
        if self.draining {
            let why = format!("worker {} is draining", self.name);
            self.refuse(&a, why, Refusal::Draining);
            return;
        }
        let Some(device) = self.devices.iter().find(|d| d.index == a.device) else {
            warn!(
                device = a.device,
                "assignment names a device this node does not have"
            );
            let why = format!("device {} does not exist on worker {}", a.device, self.name);
            self.refuse(&a, why, Refusal::Infra);
            return;
        };
        let kind = match bt_proto::convert::device_kind(device) {
            Ok(kind) => kind,
            Err(e) => {
                let why = format!("worker {}: device {}: {e}", self.name, a.device);
                self.refuse(&a, why, Refusal::Infra);
                return;
            }
        };
        if let Err(why) = confine_assignment(&a, &self.cfg) {
            warn!(job_id = %a.job_id, error = %why, "assignment refused");
            let why = format!("worker {} refused the assignment: {why}", self.name);
            self.refuse(&a, why, Refusal::Job);
            return;
        }
        info!(job_id = %a.job_id, epoch = a.epoch, rank = a.rank, world_size = a.world_size, "starting trainer");
        let a_ref = Assignment {
            spec_toml: String::new(),
            store_prefix: String::new(),
            ..a.clone()
        };
        match supervisor::spawn(
            &self.trainer_bin,
            &self.cfg.work_dir,
            a,
            kind,
            self.local_tx.clone(),
        ) {
            Ok(h) => {
                self.trainers.insert(key, h);
            }
            Err(e) => {
                warn!(error = %e, "cannot start trainer");
                let why = format!("worker {} cannot start a trainer: {e}", self.name);
                self.refuse(&a_ref, why, Refusal::Infra);
            }
        }
    }

    /// Reports that the rank of `a` will not run here: a notice for the job, then its exit.
    /// `user_error`: the job's own fault (no restart helps).
    fn refuse(&self, a: &Assignment, reason: String, why: Refusal) {
        let report = |body| {
            Local::Report(Box::new(TrainerReport {
                job_id: a.job_id.clone(),
                epoch: a.epoch,
                rank: a.rank,
                body: Some(body),
            }))
        };
        let _ = self.local_tx.send(report(trainer_report::Body::Notice(
            bt_common::domain::Notice {
                level: NoticeLevel::Error,
                message: reason.clone(),
            }
            .into(),
        )));
        let _ = self
            .local_tx
            .send(report(trainer_report::Body::Exit(TrainerExit {
                success: false,
                code: -1,
                user_error: why == Refusal::Job,
                preempted: why == Refusal::Draining,
                reason,
                ..Default::default()
            })));
    }

    /// SIGTERM (a terminating or drained node): tells the coordinator to place nothing more here
    /// and asks every trainer to stop; they agree on a step, rank 0 checkpoints it, and their
    /// exits (preemptions: the jobs requeue without spending their restart budget) still go up
    /// this session. Returns when to give up waiting for them.
    async fn begin_drain(
        &mut self,
        up: &mpsc::Sender<WorkerMessage>,
    ) -> anyhow::Result<tokio::time::Instant> {
        self.draining = true;
        let grace = Duration::from_millis(self.cfg.stop_grace_ms);
        info!(
            trainers = self.trainers.len(),
            grace_ms = self.cfg.stop_grace_ms,
            "draining: stopping trainers (they checkpoint first)"
        );
        up.send(WorkerMessage {
            msg: Some(Up::Drain(Drain {
                reason: format!("worker {} is terminating", self.name),
            })),
        })
        .await?;
        for t in self.trainers.values() {
            t.stop(grace);
        }
        Ok(tokio::time::Instant::now() + grace + Duration::from_secs(2))
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

/// Refuses to start a daemon whose trainer executable cannot run: it would register, accept work
/// and fail every rank it is given.
async fn check_trainer_bin(bin: &Path) -> anyhow::Result<()> {
    let run = tokio::process::Command::new(bin)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => anyhow::bail!(
            "trainer_bin {}: `--version` failed ({s}); set trainer_bin (BT_WORKER_TRAINER_BIN) \
             to a bt-worker executable",
            bin.display()
        ),
        Ok(Err(e)) => anyhow::bail!(
            "trainer_bin {} cannot be run: {e}; set trainer_bin (BT_WORKER_TRAINER_BIN) to a \
             bt-worker executable",
            bin.display()
        ),
        Err(_) => anyhow::bail!(
            "trainer_bin {}: `--version` did not return within 30 s",
            bin.display()
        ),
    }
}
