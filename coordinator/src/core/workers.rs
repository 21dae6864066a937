//! Workers: sessions, drains, listings, and the one lost-worker handler (registration is in
//! `registration.rs`, the periodic liveness checks in `liveness.rs`).
use std::collections::HashSet;
use std::sync::Arc;

use bt_common::domain::{AttemptOutcome, WorkerState};
use bt_common::{now_ms, JobId, WorkerId};
use bt_proto::{
    worker_message, CancelAssignment, CoordinatorMessage, Hello, StopTrainers, WorkerMessage,
    PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, Notify};
use tonic::Status;
use tracing::{info, warn};

use super::jobs::fail_attempt;
use super::registration::{check_version, refuse_if_live};
use super::{Core, Effects, Runtime, SessionHandle};
use crate::error::{Error, Result};
use crate::store::{Tx, WorkerRecord};
use crate::view::WorkerView;

/// A session accepted by `Core::open_session`.
pub(crate) struct OpenedSession {
    pub worker_id: WorkerId,
    pub worker_name: String,
    pub conn_id: u64,
    pub rx: mpsc::UnboundedReceiver<std::result::Result<CoordinatorMessage, Status>>,
    pub kill: Arc<Notify>,
}

/// How long after a coordinator restart a worker holding ranks gets to reconnect (ms): the
/// configured grace, never less than the heartbeat timeout.
pub(super) fn reconnect_grace(config: &crate::config::CoordinatorConfig) -> i64 {
    config
        .reconnect_grace_ms
        .max(config.heartbeat_timeout_ms)
        .min(i64::MAX as u64 / 2) as i64
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
pub(super) fn busy_devices(tx: &mut dyn Tx) -> Result<std::collections::HashMap<WorkerId, u32>> {
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
