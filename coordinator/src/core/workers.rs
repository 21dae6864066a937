//! Workers: registration, sessions, liveness, and the one lost-worker handler.
use std::collections::HashSet;
use std::sync::Arc;

use bt_common::domain::{AttemptOutcome, JobState, WorkerState};
use bt_common::{now_ms, JobId, WorkerId};
use bt_proto::{
    worker_message, CancelAssignment, CoordinatorMessage, Device, Hello, RegisterRequest,
    StopTrainers, WorkerMessage, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, Notify};
use tonic::Status;
use tracing::{info, warn};

use super::jobs::fail_attempt;
use super::{Core, Effects, Runtime, SessionHandle};
use crate::error::{Error, Result};
use crate::store::{DeviceRecord, Tx, WorkerRecord};
use crate::view::WorkerView;

/// A session accepted by `Core::open_session`.
pub(crate) struct OpenedSession {
    pub worker_id: WorkerId,
    pub worker_name: String,
    pub conn_id: u64,
    pub rx: mpsc::UnboundedReceiver<std::result::Result<CoordinatorMessage, Status>>,
    pub kill: Arc<Notify>,
}

/// A coordinator serves daemons of its protocol version and of the one before (N-1, with the
/// features it lacks off); a newer daemon is told to upgrade the coordinator first, an older one
/// to upgrade the daemon.
fn check_version(field: &str, v: u32) -> Result<()> {
    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&v) {
        return Ok(());
    }
    warn!(
        field,
        daemon_version = v,
        coordinator_version = PROTOCOL_VERSION,
        "protocol version mismatch"
    );
    let why = if v > PROTOCOL_VERSION {
        format!(
            "the daemon speaks protocol version {v}, newer than this coordinator's \
             {PROTOCOL_VERSION}: upgrade the coordinator first (a coordinator serves daemons of \
             its own version and one older), then the daemons"
        )
    } else {
        format!(
            "the daemon speaks protocol version {v}, older than the {MIN_PROTOCOL_VERSION} this \
             coordinator (version {PROTOCOL_VERSION}) still serves: upgrade bt-worker on this node"
        )
    };
    Err(Error::FailedPrecondition(format!("{field}: {why}")))
}

/// Validates a registration (at most `max_devices` devices); errors name the field.
pub(crate) fn validate_register(
    req: &RegisterRequest,
    max_devices: usize,
) -> Result<Vec<DeviceRecord>> {
    check_version("protocol_version", req.protocol_version)?;
    let name = req.name.trim();
    if name.is_empty() {
        return Err(Error::invalid("name", "must not be empty"));
    }
    if name.len() > 253 || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::invalid(
            "name",
            "must be at most 253 characters without whitespace or control characters",
        ));
    }
    let host = req.host.trim();
    if host.is_empty() {
        return Err(Error::invalid(
            "host",
            "must not be empty (the address other nodes reach this one at)",
        ));
    }
    if host.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::invalid("host", "must not contain whitespace"));
    }
    if req.devices.is_empty() && req.unhealthy.trim().is_empty() {
        return Err(Error::invalid("devices", "at least one device is required"));
    }
    if req.devices.len() > max_devices {
        return Err(Error::invalid(
            "devices",
            format!(
                "{} devices declared; at most {max_devices} per worker (limits.max_devices_per_worker)",
                req.devices.len()
            ),
        ));
    }
    if host.len() > 253 {
        return Err(Error::invalid("host", "must be at most 253 characters"));
    }
    let mut seen = HashSet::new();
    let mut devices = Vec::with_capacity(req.devices.len());
    for (i, dev) in req.devices.iter().enumerate() {
        let Device { index, name, .. } = dev;
        if name.len() > 128 || name.chars().any(char::is_control) {
            return Err(Error::invalid(
                format!("devices[{i}].name"),
                "must be at most 128 characters without control characters",
            ));
        }
        let kind = bt_proto::convert::device_kind(dev).map_err(|_| {
            Error::invalid(
                format!("devices[{i}].kind"),
                format!("must be \"cpu\" or \"cuda\", got {:?}", dev.kind),
            )
        })?;
        if !seen.insert(*index) {
            return Err(Error::invalid(
                format!("devices[{i}].index"),
                format!("device index {index} appears twice"),
            ));
        }
        devices.push(DeviceRecord {
            index: *index,
            kind,
            name: name.clone(),
        });
    }
    bt_common::net::check_port_range(req.port_range_start, req.port_range_end)
        .map_err(|e| Error::invalid(e.field, e.message))?;
    Ok(devices)
}

/// How long after a coordinator restart a worker holding ranks gets to reconnect (ms): the
/// configured grace, never less than the heartbeat timeout.
fn reconnect_grace(config: &crate::config::CoordinatorConfig) -> i64 {
    config
        .reconnect_grace_ms
        .max(config.heartbeat_timeout_ms)
        .min(i64::MAX as u64 / 2) as i64
}

/// Why a registering daemon says its node is unhealthy (None: healthy), bounded and on one line.
/// An unhealthy worker offers no device, whatever its request lists, so nothing is placed on it.
pub(crate) fn unhealthy_reason(req: &RegisterRequest) -> Option<String> {
    const MAX_CHARS: usize = 1000;
    let why = req.unhealthy.trim();
    (!why.is_empty()).then(|| {
        why.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(MAX_CHARS)
            .collect()
    })
}

/// Fails every active attempt with a rank that has not reported its start within
/// `start_deadline_ms` of placement (its daemon never spawned it, or lost the assignment).
/// A rank whose worker has no session (a coordinator restart: its start report may wait in the
/// daemon's buffer) is left to the reconnect grace, one that was not running when its worker
/// reconnected to the vanished-rank deadline.
fn start_deadlines(
    config: &crate::config::CoordinatorConfig,
    rt: &Runtime,
    tx: &mut dyn Tx,
    fx: &mut Effects,
    now: i64,
) -> Result<()> {
    let deadline = config.start_deadline_ms.min(i64::MAX as u64) as i64;
    for mut a in tx.open_attempts()? {
        if !a.is_active() || now - a.started_ms <= deadline {
            continue;
        }
        let Some(i) = a.ranks.iter().position(|r| {
            r.started_ms.is_none()
                && r.exited_ms.is_none()
                && rt.sessions.contains_key(&r.worker_id)
                && !rt.vanished.contains_key(&(a.job_id, a.epoch, r.rank))
        }) else {
            continue;
        };
        let Some(mut job) = tx.get_job(a.job_id)? else {
            continue;
        };
        if job.epoch != a.epoch || job.state.is_terminal() {
            continue;
        }
        let wname = tx
            .get_worker(a.ranks[i].worker_id)?
            .map(|w| w.name)
            .unwrap_or_default();
        let rank = a.ranks[i].rank;
        let why = format!(
            "rank {rank} on worker {wname} did not start within {deadline} ms of its placement \
             (start_deadline_ms)"
        );
        a.ranks[i].mark_failed(now, why.clone());
        warn!(job_id = %a.job_id, epoch = a.epoch, rank, worker = %wname, "rank did not start");
        fail_attempt(tx, fx, &mut job, &mut a, false, why)?;
    }
    Ok(())
}

/// The progress watchdog (`watchdog.*`): a running attempt none of whose ranks has reported for
/// `multiple` × its recent step-report interval (at least `min_ms`) is hung; it fails as an
/// infrastructure failure (restart by the budget), its ranks are told to stop.
fn watchdog(
    config: &crate::config::CoordinatorConfig,
    rt: &mut Runtime,
    tx: &mut dyn Tx,
    fx: &mut Effects,
    now: i64,
) -> Result<()> {
    let w = &config.watchdog;
    if w.multiple <= 0.0 {
        rt.progress.clear();
        return Ok(());
    }
    // Only attempts silent past their limit are looked up in the store (a tick reads nothing for
    // jobs that report); entries of attempts that ended go when they come due.
    let limit_of =
        |p: &super::Progress| (w.multiple * p.step_interval_ms.unwrap_or(0.0)).max(w.min_ms as f64);
    let due: Vec<((JobId, u64), super::Progress)> = rt
        .progress
        .iter()
        .filter(|(_, p)| (now - p.last_ms) as f64 > limit_of(p))
        .map(|(k, p)| (*k, *p))
        .collect();
    for (key @ (job_id, epoch), p) in due {
        let (job, attempt) = (tx.get_job(job_id)?, tx.get_attempt(job_id, epoch)?);
        let (Some(mut job), Some(mut a)) = (job, attempt) else {
            rt.progress.remove(&key);
            continue;
        };
        if job.epoch != epoch || job.state.is_terminal() || !a.is_active() {
            rt.progress.remove(&key);
            continue;
        }
        if job.state != JobState::Running {
            continue;
        }
        let silent = now - p.last_ms;
        rt.progress.remove(&key);
        let why = match p.step_interval_ms {
            Some(i) => format!(
                "hung: no report from any rank for {:.1} s, {:.0}x its recent step-report \
                 interval of {:.0} ms (watchdog.multiple {}, watchdog.min_ms {})",
                silent as f64 / 1e3,
                silent as f64 / i.max(1.0),
                i,
                w.multiple,
                w.min_ms
            ),
            None => format!(
                "hung: no report from any rank for {:.1} s (watchdog.min_ms {})",
                silent as f64 / 1e3,
                w.min_ms
            ),
        };
        warn!(job_id = %job_id, epoch, silent_ms = silent, "job declared hung");
        fail_attempt(tx, fx, &mut job, &mut a, false, why)?;
    }
    Ok(())
}

/// The one handler for a lost worker: marks it LOST, ends every active attempt with a rank on it
/// (cancelling the surviving ranks) and requeues or fails those jobs per their restart budget.
pub(crate) fn lose_worker(
    rt: &mut Runtime,
    tx: &mut dyn Tx,
    fx: &mut Effects,
    worker_id: WorkerId,
    reason: &str,
) -> Result<()> {
    let Some(mut w) = tx.get_worker(worker_id)? else {
        return Ok(());
    };
    let now = now_ms();
    let last_seen = rt.last_seen.remove(&worker_id).unwrap_or(w.last_seen_ms);
    warn!(worker_id = %worker_id, worker = %w.name, reason, "worker lost");
    w.state = WorkerState::Lost;
    w.last_seen_ms = last_seen;
    tx.put_worker(&w)?;
    fx.close.push((
        worker_id,
        None,
        Status::unavailable(crate::error::bounded_message(format!(
            "worker {} considered lost: {reason}",
            w.name
        ))),
    ));
    for mut a in tx.open_attempts()? {
        let mine: Vec<u32> = a
            .ranks
            .iter()
            .filter(|r| r.worker_id == worker_id && r.exited_ms.is_none())
            .map(|r| r.rank)
            .collect();
        if mine.is_empty() {
            continue;
        }
        for r in a
            .ranks
            .iter_mut()
            .filter(|r| r.worker_id == worker_id && r.exited_ms.is_none())
        {
            r.mark_failed(now, format!("worker lost: {reason}"));
        }
        rt.vanished
            .retain(|(j, e, _), _| !(*j == a.job_id && *e == a.epoch));
        if !a.is_active() {
            tx.put_attempt(&a)?;
            continue;
        }
        let why = format!(
            "worker {} lost ({reason}) while running rank{} {}",
            w.name,
            if mine.len() > 1 { "s" } else { "" },
            mine.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        match tx.get_job(a.job_id)? {
            Some(mut job) => fail_attempt(tx, fx, &mut job, &mut a, false, why)?,
            None => {
                a.ended_ms = Some(now);
                a.outcome = Some(AttemptOutcome::Failed);
                tx.put_attempt(&a)?;
            }
        }
    }
    fx.schedule = true;
    Ok(())
}

/// Devices a rank of an open attempt holds, per worker.
fn busy_devices(tx: &mut dyn Tx) -> Result<std::collections::HashMap<WorkerId, u32>> {
    let mut busy = std::collections::HashMap::new();
    for a in tx.open_attempts()? {
        for r in a.ranks.iter().filter(|r| r.exited_ms.is_none()) {
            *busy.entry(r.worker_id).or_default() += 1;
        }
    }
    Ok(busy)
}

/// Longest drain reason kept (characters).
const MAX_DRAIN_REASON: usize = 200;

/// The message that asks a drained worker's trainers to checkpoint and stop.
fn stop_trainers(w: &WorkerRecord) -> CoordinatorMessage {
    StopTrainers {
        reason: format!("worker {} drained: {}", w.name, w.drained),
    }
    .into()
}

fn worker_view(rt: &Runtime, w: &WorkerRecord, busy: u32) -> WorkerView {
    let protocol = rt.sessions.get(&w.id).map_or(0, |s| s.protocol);
    WorkerView {
        last_seen_ms: rt.last_seen.get(&w.id).copied().unwrap_or(w.last_seen_ms),
        busy_devices: busy,
        protocol_version: protocol,
        features_off: bt_proto::features_off(protocol),
        unhealthy: rt.unhealthy.get(&w.id).cloned().unwrap_or_default(),
        worker: w.clone(),
    }
}

/// A trainer a daemon says is alive: (job, epoch, rank).
type RunningKey = (JobId, u64, u32);

/// What the hello that opens a session says.
struct HelloInfo {
    worker_id: WorkerId,
    /// The daemon's protocol version (checked: this one or N-1).
    protocol: u32,
    /// The trainers it still runs.
    running: Vec<RunningKey>,
    /// (v3) Trainers that exited while it was disconnected: their exit reports follow.
    exited: Vec<RunningKey>,
}

fn parse_trainers(field: &str, ts: &[bt_proto::RunningTrainer]) -> Result<Vec<RunningKey>> {
    let mut out = Vec::with_capacity(ts.len());
    for (i, r) in ts.iter().enumerate() {
        let job: JobId = r
            .job_id
            .parse()
            .map_err(|e: String| Error::invalid(format!("hello.{field}[{i}].job_id"), e))?;
        out.push((job, r.epoch, r.rank));
    }
    Ok(out)
}

/// The hello that opens a session: the worker's id and protocol version (checked), the trainers
/// it still runs and those whose exit reports it still holds.
fn parse_hello(first: Option<WorkerMessage>) -> Result<HelloInfo> {
    let hello: Hello = match first.and_then(|m| m.msg) {
        Some(worker_message::Msg::Hello(h)) => h,
        Some(
            worker_message::Msg::Heartbeat(_)
            | worker_message::Msg::Report(_)
            | worker_message::Msg::Drain(_),
        )
        | None => {
            return Err(Error::invalid(
                "msg",
                "the first message of a session must be a hello",
            ))
        }
    };
    let worker_id: WorkerId = hello
        .worker_id
        .parse()
        .map_err(|e: String| Error::invalid("hello.worker_id", e))?;
    check_version("hello.protocol_version", hello.protocol_version)?;
    let running = parse_trainers("running", &hello.running)?;
    let exited = if bt_proto::has_feature(hello.protocol_version, "exit-replay") {
        parse_trainers("exited", &hello.exited)?
    } else {
        Vec::new()
    };
    Ok(HelloInfo {
        worker_id,
        protocol: hello.protocol_version,
        running,
        exited,
    })
}

/// The refusal a second session (or registration) for a worker that still has a live one gets:
/// a live session is never taken over. Live: its session is open and it was heard from within
/// the heartbeat timeout; once that passes it is lost, and a new session is accepted.
fn refuse_if_live(rt: &Runtime, w: &WorkerRecord, now: i64, timeout_ms: u64) -> Result<()> {
    if !rt.sessions.contains_key(&w.id) {
        return Ok(());
    }
    let heard = rt.last_seen.get(&w.id).copied().unwrap_or(w.last_seen_ms);
    if now - heard > timeout_ms as i64 {
        return Ok(());
    }
    warn!(worker_id = %w.id, worker = %w.name, "a second session for a live worker refused");
    Err(Error::FailedPrecondition(format!(
        "worker {:?} already has a live session (heard from {} ms ago); a second one is refused, \
         not a takeover. A daemon that lost its connection is accepted again once the old \
         session closes or has been silent for heartbeat_timeout_ms ({timeout_ms} ms)",
        w.name,
        (now - heard).max(0)
    )))
}

/// Makes a new connection the worker's current session; an older one is told it was replaced.
fn install_session(
    rt: &mut Runtime,
    worker_id: WorkerId,
    protocol: u32,
) -> (
    u64,
    mpsc::UnboundedReceiver<std::result::Result<CoordinatorMessage, Status>>,
    Arc<Notify>,
) {
    rt.next_conn += 1;
    rt.draining.remove(&worker_id);
    let conn_id = rt.next_conn;
    let (out, rx) = mpsc::unbounded_channel();
    let kill = Arc::new(Notify::new());
    let handle = SessionHandle {
        conn_id,
        tx: out,
        kill: kill.clone(),
        protocol,
    };
    if let Some(old) = rt.sessions.insert(worker_id, handle) {
        let _ = old.tx.send(Err(Status::aborted(
            "replaced by a newer session of this worker",
        )));
        old.kill.notify_one();
    }
    (conn_id, rx, kill)
}

/// Trainers alive on the node that are not part of a current attempt are cancelled; returns the
/// ones that are (they keep running).
fn cancel_stale_trainers(
    tx: &mut dyn Tx,
    fx: &mut Effects,
    w: &WorkerRecord,
    running: &[RunningKey],
) -> Result<HashSet<RunningKey>> {
    let mut cancelled = HashSet::new();
    let mut keep = HashSet::new();
    for &(job_id, epoch, rank) in running {
        let current = match (tx.get_job(job_id)?, tx.get_attempt(job_id, epoch)?) {
            (Some(j), Some(a)) => {
                j.epoch == epoch
                    && a.is_active()
                    && a.ranks
                        .get(rank as usize)
                        .is_some_and(|r| r.worker_id == w.id && r.exited_ms.is_none())
            }
            _ => false,
        };
        if current {
            keep.insert((job_id, epoch, rank));
        } else if cancelled.insert((job_id, epoch)) {
            info!(worker = %w.name, job_id = %job_id, epoch, "cancelling a trainer of a finished attempt");
            fx.messages.push((
                w.id,
                CancelAssignment {
                    job_id: job_id.to_string(),
                    epoch,
                    reason: "this attempt is no longer current".into(),
                }
                .into(),
            ));
        }
    }
    Ok(keep)
}

/// When a reconnected worker's ranks must have reported their exit, per what its hello said.
struct MissingDeadlines<'a> {
    /// Ranks whose exit the hello announced (`Hello.exited`, v3): their reports wait behind the
    /// rest of the daemon's buffer, so they get the reconnect grace.
    exited: &'a HashSet<RunningKey>,
    exited_deadline: i64,
    /// Any other rank not running: its exit report, if any, comes right after the hello.
    deadline: i64,
}

/// Ranks placed on the worker that are not running: an active attempt gets until a deadline for
/// their (buffered) exit reports; an ended one just frees the device. A rank its daemon runs, or
/// ran, counts as started (its start report may still be in the daemon's buffer, and the start
/// deadline must not fail it meanwhile).
fn await_missing_ranks(
    rt: &mut Runtime,
    tx: &mut dyn Tx,
    worker_id: WorkerId,
    keep: &HashSet<RunningKey>,
    now: i64,
    d: &MissingDeadlines<'_>,
) -> Result<()> {
    for mut a in tx.open_attempts()? {
        let mut changed = false;
        for r in a.ranks.iter_mut() {
            if r.worker_id != worker_id || r.exited_ms.is_some() {
                continue;
            }
            let key = (a.job_id, a.epoch, r.rank);
            let announced = d.exited.contains(&key);
            if (keep.contains(&key) || announced) && a.ended_ms.is_none() && r.started_ms.is_none()
            {
                r.started_ms = Some(now);
                changed = true;
            }
            if keep.contains(&key) {
                continue;
            }
            if a.ended_ms.is_none() {
                let due = if announced {
                    d.exited_deadline
                } else {
                    d.deadline
                };
                rt.vanished.insert(key, due);
            } else {
                r.mark_failed(now, "not running after its worker reconnected");
                changed = true;
            }
        }
        if changed {
            tx.put_attempt(&a)?;
        }
    }
    Ok(())
}

impl Core {
    /// Registers (or re-registers, by name) a worker daemon; returns its id. `bound_node`: the
    /// node the caller's credential is bound to (it may register only as that node). A worker
    /// with a live session cannot be registered again (its record is not overwritten).
    pub fn register(&self, req: &RegisterRequest, bound_node: Option<&str>) -> Result<WorkerId> {
        let devices = validate_register(req, self.config().limits.max_devices_per_worker)?;
        let unhealthy = unhealthy_reason(req);
        let devices = if unhealthy.is_some() {
            Vec::new()
        } else {
            devices
        };
        if let Some(bound) = bound_node {
            if req.name.trim() != bound {
                return Err(Error::PermissionDenied(format!(
                    "name: this credential is bound to node {bound:?}; it cannot register as {:?}",
                    req.name.trim()
                )));
            }
        }
        self.transition(|config, rt, tx, _fx| {
            let now = now_ms();
            let name = req.name.trim().to_string();
            let existing = tx.get_worker_by_name(&name)?;
            if let Some(w) = &existing {
                refuse_if_live(rt, w, now, config.heartbeat_timeout_ms)?;
            }
            let id = existing.as_ref().map_or_else(WorkerId::new, |w| w.id);
            let w = WorkerRecord {
                id,
                name: name.clone(),
                host: req.host.trim().to_string(),
                devices,
                port_start: req.port_range_start,
                port_end: req.port_range_end,
                state: WorkerState::Online,
                last_seen_ms: now,
                // An operator's drain holds across the daemon's restarts.
                drained: existing
                    .as_ref()
                    .map(|w| w.drained.clone())
                    .unwrap_or_default(),
            };
            tx.put_worker(&w)?;
            rt.last_seen.insert(id, now);
            match &unhealthy {
                Some(why) => {
                    warn!(worker_id = %id, worker = %name, reason = %why,
                          "worker registered unhealthy: nothing is placed on it");
                    rt.unhealthy.insert(id, why.clone());
                }
                None => {
                    rt.unhealthy.remove(&id);
                }
            }
            info!(worker_id = %id, worker = %name, host = %w.host, devices = w.devices.len(),
                  known = existing.is_some(), "worker registered");
            Ok(id)
        })
    }

    /// Accepts the first message of a session (which must be a `Hello`).
    pub(crate) fn open_session(&self, first: Option<WorkerMessage>) -> Result<OpenedSession> {
        let hello = parse_hello(first)?;
        let (worker_id, running) = (hello.worker_id, &hello.running);
        self.transition(|config, rt, tx, fx| {
            let mut w = tx.get_worker(worker_id)?.ok_or_else(|| Error::NotFound {
                what: "worker",
                id: format!("{worker_id} (register first)"),
            })?;
            let now = now_ms();
            refuse_if_live(rt, &w, now, config.heartbeat_timeout_ms)?;
            let (conn_id, rx, kill) = install_session(rt, worker_id, hello.protocol);
            w.state = WorkerState::Online;
            w.last_seen_ms = now;
            tx.put_worker(&w)?;
            rt.last_seen.insert(worker_id, now);
            let keep = cancel_stale_trainers(tx, fx, &w, running)?;
            if !w.drained.is_empty() && !keep.is_empty() {
                // Drained while the coordinator was away (or before the daemon restarted): the
                // trainers it still runs are asked again to checkpoint and stop.
                fx.messages.push((worker_id, stop_trainers(&w)));
            }
            let exited: HashSet<RunningKey> = hello.exited.iter().copied().collect();
            let deadlines = MissingDeadlines {
                exited: &exited,
                exited_deadline: now + reconnect_grace(config),
                deadline: now + config.heartbeat_timeout_ms as i64,
            };
            await_missing_ranks(rt, tx, worker_id, &keep, now, &deadlines)?;
            fx.schedule = true;
            info!(worker_id = %worker_id, worker = %w.name, conn_id, protocol = hello.protocol,
                  running = running.len(), exited = exited.len(), "session opened");
            if hello.protocol < PROTOCOL_VERSION {
                info!(worker = %w.name, protocol = hello.protocol,
                      features_off = ?bt_proto::features_off(hello.protocol),
                      "an older daemon (N-1): served with the newer features off");
            }
            Ok(OpenedSession {
                worker_id,
                worker_name: w.name.clone(),
                conn_id,
                rx,
                kill,
            })
        })
    }

    /// Handles one message of an open session. An error closes the session (and the worker is
    /// then handled as lost by the caller).
    pub(crate) fn handle_message(
        &self,
        worker_id: WorkerId,
        conn_id: u64,
        msg: WorkerMessage,
    ) -> Result<()> {
        if let Some(worker_message::Msg::Heartbeat(hb)) = &msg.msg {
            // The common case needs no transaction: only the liveness clock moves, and a daemon
            // of protocol 3 or later is answered (its receive deadline).
            let mut guard = self.lock();
            let rt = &mut guard.rt;
            if rt.shutting_down {
                return Err(Error::ShuttingDown);
            }
            rt.ensure_current(worker_id, conn_id)?;
            rt.last_seen.insert(worker_id, now_ms());
            if let Some(s) = rt.sessions.get(&worker_id) {
                if bt_proto::has_feature(s.protocol, "heartbeat-ack") {
                    let ack = bt_proto::HeartbeatAck {
                        time_ms: hb.time_ms,
                    };
                    let _ = s.tx.send(Ok(CoordinatorMessage {
                        msg: Some(bt_proto::coordinator_message::Msg::HeartbeatAck(ack)),
                    }));
                }
            }
            return Ok(());
        }
        self.transition(|config, rt, tx, fx| {
            rt.ensure_current(worker_id, conn_id)?;
            rt.last_seen.insert(worker_id, now_ms());
            match msg.msg {
                Some(worker_message::Msg::Heartbeat(_)) => Ok(()),
                Some(worker_message::Msg::Hello(_)) => Err(Error::invalid(
                    "msg",
                    "hello is only valid as the first message",
                )),
                Some(worker_message::Msg::Report(r)) => {
                    super::reports::handle_report(config, rt, tx, fx, worker_id, r)
                }
                Some(worker_message::Msg::Drain(d)) => {
                    if rt.draining.insert(worker_id) {
                        info!(worker_id = %worker_id, reason = %d.reason,
                              "worker draining: nothing more is placed on it");
                    }
                    Ok(())
                }
                None => Err(Error::invalid("msg", "empty message")),
            }
        })
    }

    /// The session's stream ended or failed. Only the current session of the worker counts.
    pub(crate) fn session_closed(
        &self,
        worker_id: WorkerId,
        conn_id: u64,
        reason: &str,
    ) -> Result<()> {
        match self.transition(|_, rt, tx, fx| {
            if !rt.is_current(worker_id, conn_id) {
                return Ok(());
            }
            lose_worker(rt, tx, fx, worker_id, reason)
        }) {
            Err(Error::ShuttingDown) => Ok(()),
            other => other,
        }
    }

    /// Periodic liveness check: heartbeat timeouts (including workers that did not reconnect after
    /// a coordinator restart) and ranks that vanished across a reconnect.
    pub fn tick(&self) -> Result<()> {
        self.transition(|config, rt, tx, fx| {
            let now = now_ms();
            let timeout = config.heartbeat_timeout_ms as i64;
            let silent: Vec<(WorkerId, i64)> = rt
                .last_seen
                .iter()
                .filter(|(_, seen)| now - **seen > timeout)
                .map(|(w, s)| (*w, *s))
                .collect();
            // A worker without a session that still holds ranks of open attempts is one that
            // has not reconnected since this coordinator started (a lost session is handled when
            // it closes): it gets the reconnect grace, its trainers are still training.
            let mut holding: Option<std::collections::HashMap<WorkerId, u32>> = None;
            let grace = reconnect_grace(config);
            for (w, seen) in silent {
                let why = if rt.sessions.contains_key(&w) {
                    format!("no heartbeat for {} ms", now - seen)
                } else {
                    if holding.is_none() {
                        holding = Some(busy_devices(tx)?);
                    }
                    let busy = holding.as_ref().is_some_and(|h| h.contains_key(&w));
                    if busy && now - seen <= grace {
                        continue;
                    }
                    if busy {
                        format!(
                            "no session for {} ms: it did not reconnect within \
                             reconnect_grace_ms ({grace} ms)",
                            now - seen
                        )
                    } else {
                        format!("no session for {} ms", now - seen)
                    }
                };
                lose_worker(rt, tx, fx, w, &why)?;
            }
            let due: Vec<(JobId, u64, u32)> = rt
                .vanished
                .iter()
                .filter(|(_, d)| now >= **d)
                .map(|(k, _)| *k)
                .collect();
            for key @ (job_id, epoch, rank) in due {
                rt.vanished.remove(&key);
                let (Some(mut job), Some(mut a)) = (tx.get_job(job_id)?, tx.get_attempt(job_id, epoch)?) else {
                    continue;
                };
                let Some(r) = a.ranks.get_mut(rank as usize) else { continue };
                if r.exited_ms.is_some() || a.ended_ms.is_some() {
                    continue;
                }
                let wname = tx
                    .get_worker(r.worker_id)?
                    .map(|w| w.name)
                    .unwrap_or_default();
                a.ranks[rank as usize].mark_failed(now, "vanished across a reconnect");
                let why = format!(
                    "rank {rank} on worker {wname} was not running after its worker reconnected and never reported an exit"
                );
                fail_attempt(tx, fx, &mut job, &mut a, false, why)?;
            }
            start_deadlines(config, rt, tx, fx, now)?;
            watchdog(config, rt, tx, fx, now)
        })
    }

    /// Drains the worker named `worker` (a name or an id) for `reason`, or with `undo` lets it take
    /// work again. Draining places nothing more on it and asks its trainers to checkpoint and
    /// stop: their jobs requeue as preemptions. Stored, so it holds across restarts.
    pub fn drain_worker(&self, worker: &str, reason: &str, undo: bool) -> Result<WorkerView> {
        let worker = worker.trim();
        if worker.is_empty() {
            return Err(Error::invalid("worker", "a worker name or id is needed"));
        }
        self.transition(|_, rt, tx, fx| {
            let found = match worker.parse::<WorkerId>() {
                Ok(id) => tx.get_worker(id)?,
                Err(_) => None,
            };
            let mut w = match found {
                Some(w) => w,
                None => tx.get_worker_by_name(worker)?.ok_or_else(|| Error::NotFound {
                    what: "worker",
                    id: worker.to_string(),
                })?,
            };
            if undo {
                if !w.drained.is_empty() {
                    info!(worker_id = %w.id, worker = %w.name, "worker undrained: it takes work again");
                    w.drained.clear();
                    tx.put_worker(&w)?;
                    fx.schedule = true;
                }
            } else {
                let first = w.drained.is_empty();
                w.drained = reason.trim().chars().take(MAX_DRAIN_REASON).collect();
                if w.drained.is_empty() {
                    w.drained = "drained by an operator".into();
                }
                tx.put_worker(&w)?;
                if first {
                    info!(worker_id = %w.id, worker = %w.name, reason = %w.drained,
                          "worker drained: nothing more is placed on it, its trainers stop");
                }
                if rt.sessions.contains_key(&w.id) {
                    fx.messages.push((w.id, stop_trainers(&w)));
                }
            }
            let busy = busy_devices(tx)?.get(&w.id).copied().unwrap_or(0);
            Ok(worker_view(rt, &w, busy))
        })
    }

    /// The name of the worker whose id is `id` (None: not a known worker, or not an id).
    pub fn worker_name(&self, id: &str) -> Result<Option<String>> {
        let Ok(id) = id.parse::<WorkerId>() else {
            return Ok(None);
        };
        self.read(|_, tx| Ok(tx.get_worker(id)?.map(|w| w.name)))
    }

    pub fn list_workers(&self) -> Result<Vec<WorkerView>> {
        self.read(|rt, tx| {
            let busy = busy_devices(tx)?;
            Ok(tx
                .list_workers()?
                .iter()
                .map(|w| worker_view(rt, w, busy.get(&w.id).copied().unwrap_or(0)))
                .collect())
        })
    }
}
