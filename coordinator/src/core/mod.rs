//! The coordinator's state machine. All transitions run synchronously under one lock, inside one
//! store transaction each, on a blocking thread (`Core::call`); their side effects (events for
//! watchers, messages down worker sessions, a scheduling pass) are applied only after the commit.
#[cfg(test)]
mod fuzz_tests;
mod history;
mod jobs;
mod liveness;
mod registration;
mod reports;
mod workers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bt_common::domain::{EventKind, JobEvent, JobState, LogLine};
use bt_common::{now_ms, JobId, WorkerId};
use bt_proto::CoordinatorMessage;
use tokio::sync::{broadcast, mpsc, Notify};
use tonic::Status;

use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use crate::store::{LogQuery, Store, Tx};

pub(crate) type Outbound = mpsc::UnboundedSender<Result<CoordinatorMessage, Status>>;

/// A connected worker session.
struct SessionHandle {
    conn_id: u64,
    tx: Outbound,
    /// Told when the coordinator drops this session, so its reader stops.
    kill: Arc<Notify>,
    /// The protocol version its hello announced (this coordinator's, or N-1).
    protocol: u32,
}

/// In-memory state that is not persisted: live sessions, liveness clocks and watcher fan-out.
/// What a one-second rate window says of one more report.
enum Window {
    Allowed,
    /// Over the limit, the first time in this window (warn once).
    FirstDrop,
    Dropped,
}

/// One more report of `key` against `per_sec` in its current one-second window: (window start,
/// count, warned) per key; entries idle for a minute go once the map holds 4096.
fn one_second_window<K: std::hash::Hash + Eq>(
    windows: &mut HashMap<K, (i64, u32, bool)>,
    key: K,
    per_sec: u32,
) -> Window {
    let now = now_ms();
    if windows.len() > 4096 {
        windows.retain(|_, e| now - e.0 < 60_000);
    }
    let e = windows.entry(key).or_insert((now, 0, false));
    if now - e.0 >= 1000 {
        *e = (now, 0, false);
    }
    if e.1 < per_sec {
        e.1 += 1;
        Window::Allowed
    } else if !e.2 {
        e.2 = true;
        Window::FirstDrop
    } else {
        Window::Dropped
    }
}

/// A rate-limited report stream: (job, epoch, rank, report kind).
type ReportKey = (JobId, u64, u32, &'static str);

#[derive(Default)]
struct Runtime {
    sessions: HashMap<WorkerId, SessionHandle>,
    next_conn: u64,
    /// Last sign of life of every worker considered online (heartbeat clock).
    last_seen: HashMap<WorkerId, i64>,
    watchers: HashMap<JobId, broadcast::Sender<JobEvent>>,
    /// Ranks of active attempts that were not running when their worker reconnected:
    /// (job, epoch, rank) → deadline for their exit report.
    vanished: HashMap<(JobId, u64, u32), i64>,
    /// Metric reports of each attempt's rank 0 in the current one-second window: (window start,
    /// count, warned).
    metric_rate: HashMap<(JobId, u64), (i64, u32, bool)>,
    /// Evaluation, notice and checkpoint reports of each (job, epoch, rank, kind) in the current
    /// one-second window: (window start, count, warned).
    report_rate: HashMap<ReportKey, (i64, u32, bool)>,
    /// Each owner's submission token bucket: (tokens left, last refill in ms).
    submit_tokens: HashMap<String, (f64, i64)>,
    /// Metric events appended per job since the last history-size check.
    metric_appends: HashMap<JobId, u32>,
    /// Why each job the latest scheduling pass left queued waits (shown as `pending_reason`).
    waiting: HashMap<JobId, String>,
    /// Log lines of each (job, epoch, rank) in the current one-second window: (window start,
    /// accepted, dropped since the last marker).
    log_rate: HashMap<(JobId, u64, u32), (i64, u32, u64)>,
    /// Log lines appended per job since the last size check.
    log_appends: HashMap<JobId, u32>,
    /// Workers whose daemon said it is going away (`Drain`): nothing more is placed on them
    /// until they open a new session.
    draining: std::collections::HashSet<WorkerId>,
    /// Workers whose daemon registered its node as unhealthy, and why (they offer no device).
    unhealthy: HashMap<WorkerId, String>,
    /// Signs of life of each active attempt (job, epoch), for the progress watchdog.
    progress: HashMap<(JobId, u64), Progress>,
    shutting_down: bool,
}

/// An attempt's signs of life (any report of a rank), for the progress watchdog.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Progress {
    /// The latest report of any rank.
    last_ms: i64,
    /// The latest step (metrics) report.
    last_step_ms: Option<i64>,
    /// Smoothed interval between step reports.
    step_interval_ms: Option<f64>,
}

impl Runtime {
    /// A current report of the attempt arrived (`step`: a metrics report).
    fn touch(&mut self, key: (JobId, u64), step: bool) {
        let now = now_ms();
        let p = self.progress.entry(key).or_insert(Progress {
            last_ms: now,
            last_step_ms: None,
            step_interval_ms: None,
        });
        p.last_ms = now;
        if step {
            if let Some(prev) = p.last_step_ms {
                let dt = (now - prev).max(0) as f64;
                p.step_interval_ms = Some(p.step_interval_ms.map_or(dt, |i| 0.7 * i + 0.3 * dt));
            }
            p.last_step_ms = Some(now);
        }
    }
}

/// Metric events appended between two checks of a job's history size.
const THIN_CHECK_EVERY: u32 = 256;

impl Runtime {
    /// Whether `conn_id` is the worker's current session (not replaced, not lost).
    fn is_current(&self, worker_id: WorkerId, conn_id: u64) -> bool {
        self.sessions
            .get(&worker_id)
            .is_some_and(|s| s.conn_id == conn_id)
    }

    /// `is_current`, as the error a message of a stale session gets.
    fn ensure_current(&self, worker_id: WorkerId, conn_id: u64) -> Result<()> {
        if self.is_current(worker_id, conn_id) {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(
                "this session is no longer current (the worker was lost or reconnected)".into(),
            ))
        }
    }

    /// Whether one more `kind` report (eval, notice, checkpoint) of this rank fits in its
    /// per-second budget (`limits.max_reports_per_sec`).
    fn report_allowed(&mut self, key: ReportKey, per_sec: u32) -> bool {
        match one_second_window(&mut self.report_rate, key, per_sec) {
            Window::Allowed => true,
            Window::FirstDrop => {
                tracing::warn!(job_id = %key.0, epoch = key.1, rank = key.2, kind = key.3,
                               limit = per_sec,
                               "reports over limits.max_reports_per_sec; dropping the excess");
                false
            }
            Window::Dropped => false,
        }
    }

    /// Takes one submission token from `owner`'s bucket (`burst` tokens, refilled at
    /// `per_minute`); Err: the seconds until the next token.
    fn take_submit_token(&mut self, owner: &str, per_minute: u32, burst: u32) -> Result<(), f64> {
        let now = now_ms();
        let rate = f64::from(per_minute) / 60_000.0;
        if self.submit_tokens.len() > 10_000 {
            self.submit_tokens
                .retain(|_, (t, at)| *t + (now - *at) as f64 * rate < f64::from(burst));
        }
        let (tokens, at) = self
            .submit_tokens
            .entry(owner.to_string())
            .or_insert((f64::from(burst), now));
        *tokens = (*tokens + (now - *at).max(0) as f64 * rate).min(f64::from(burst));
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - *tokens) / rate / 1000.0)
        }
    }

    /// Whether one more metric report of this attempt fits in its per-second budget.
    fn metrics_allowed(&mut self, job_id: JobId, epoch: u64, per_sec: u32) -> bool {
        match one_second_window(&mut self.metric_rate, (job_id, epoch), per_sec) {
            Window::Allowed => true,
            Window::FirstDrop => {
                tracing::warn!(job_id = %job_id, epoch, limit = per_sec,
                               "metric reports over limits.max_metrics_per_sec; dropping the excess");
                false
            }
            Window::Dropped => false,
        }
    }

    /// How many of `n` new log lines of a rank fit in its per-second budget, and how many lines
    /// were dropped before them (to be told in a marker line).
    fn log_lines_allowed(&mut self, key: (JobId, u64, u32), n: u64, per_sec: u32) -> (u64, u64) {
        let now = now_ms();
        if self.log_rate.len() > 4096 {
            self.log_rate.retain(|_, e| now - e.0 < 60_000);
        }
        let e = self.log_rate.entry(key).or_insert((now, 0, 0));
        if now - e.0 >= 1000 {
            e.0 = now;
            e.1 = 0;
        }
        let room = u64::from(per_sec.saturating_sub(e.1));
        let take = n.min(room);
        e.1 += take as u32;
        if take < n && e.2 == 0 {
            tracing::warn!(job_id = %key.0, rank = key.2, limit = per_sec,
                           "log lines over limits.max_log_lines_per_sec; dropping the excess");
        }
        let dropped_before = if take > 0 {
            std::mem::take(&mut e.2)
        } else {
            0
        };
        e.2 += n - take;
        (take, dropped_before)
    }

    /// Counts appended log lines; true when the job's log size is due for a check.
    fn log_appended(&mut self, job_id: JobId, n: u32) -> bool {
        let c = self.log_appends.entry(job_id).or_insert(0);
        *c += n;
        if *c >= THIN_CHECK_EVERY {
            *c = 0;
            true
        } else {
            false
        }
    }

    /// Counts an appended metric event; true when the history size is due for a check.
    fn metric_appended(&mut self, job_id: JobId) -> bool {
        let n = self.metric_appends.entry(job_id).or_insert(0);
        *n += 1;
        if *n >= THIN_CHECK_EVERY {
            *n = 0;
            true
        } else {
            false
        }
    }
}

struct Inner {
    store: Box<dyn Store>,
    rt: Runtime,
}

/// Side effects of a transition, applied after its transaction committed.
#[derive(Default)]
pub(crate) struct Effects {
    events: Vec<JobEvent>,
    messages: Vec<(WorkerId, CoordinatorMessage)>,
    /// Sessions to close: (worker, connection, error sent to the worker).
    close: Vec<(WorkerId, Option<u64>, Status)>,
    schedule: bool,
    /// Log lines were appended (log followers look again).
    logs: bool,
}

pub struct Core {
    config: CoordinatorConfig,
    inner: Mutex<Inner>,
    /// Wakes the scheduling loop.
    pub(crate) schedule_notify: Notify,
    /// Open `WatchJob` streams per job (apart from the state lock: a closing stream never waits
    /// on a transaction).
    watching: Mutex<HashMap<JobId, usize>>,
    /// Bumped when log lines were appended or a job ended: `StreamLogs` followers look again.
    log_tick: tokio::sync::watch::Sender<u64>,
}

/// One open `WatchJob` stream, counted against the watcher limits until dropped.
pub(crate) struct WatchSlot {
    core: Arc<Core>,
    job_id: JobId,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut w = self.core.watching.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = w.get_mut(&self.job_id) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.job_id);
            }
        }
    }
}

/// What a `WatchJob` call starts from.
pub(crate) struct WatchStart {
    pub replay: Vec<JobEvent>,
    /// `None` when the job already reached a terminal state.
    pub live: Option<broadcast::Receiver<JobEvent>>,
}

impl Core {
    /// Opens the core over `store`. Workers that were online before a restart get
    /// `heartbeat_timeout_ms` to reconnect before they are handled as lost.
    pub fn new(config: CoordinatorConfig, store: Box<dyn Store>) -> Result<Arc<Self>> {
        let core = Arc::new(Core {
            config,
            inner: Mutex::new(Inner {
                store,
                rt: Runtime::default(),
            }),
            schedule_notify: Notify::new(),
            watching: Mutex::new(HashMap::new()),
            log_tick: tokio::sync::watch::channel(0).0,
        });
        core.recover()?;
        Ok(core)
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock must not wedge the coordinator: the store rolled back the
        // transaction of the panicking call, so the state is consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on a blocking thread (SQLite work stays off the async runtime).
    pub async fn call<R, F>(self: &Arc<Self>, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Core) -> Result<R> + Send + 'static,
    {
        let core = self.clone();
        tokio::task::spawn_blocking(move || f(&core))
            .await
            .map_err(|e| Error::Internal(format!("coordinator task failed: {e}")))?
    }

    /// One transition: a transaction, then its effects. Rejected once shutdown began.
    fn transition<R>(
        &self,
        f: impl FnOnce(&CoordinatorConfig, &mut Runtime, &mut dyn Tx, &mut Effects) -> Result<R>,
    ) -> Result<R> {
        let mut guard = self.lock();
        let Inner { store, rt } = &mut *guard;
        if rt.shutting_down {
            return Err(Error::ShuttingDown);
        }
        let mut fx = Effects::default();
        let mut tx = store.begin()?;
        let r = f(&self.config, rt, &mut *tx, &mut fx)?;
        tx.commit()?;
        self.apply(rt, fx);
        Ok(r)
    }

    /// A read-only view (allowed during shutdown).
    fn read<R>(&self, f: impl FnOnce(&Runtime, &mut dyn Tx) -> Result<R>) -> Result<R> {
        let mut guard = self.lock();
        let Inner { store, rt } = &mut *guard;
        let mut tx = store.begin()?;
        let r = f(rt, &mut *tx)?;
        drop(tx);
        Ok(r)
    }

    fn apply(&self, rt: &mut Runtime, fx: Effects) {
        if fx.logs || fx.events.iter().any(JobEvent::is_terminal) {
            self.log_tick.send_modify(|n| *n = n.wrapping_add(1));
        }
        for ev in fx.events {
            let job_id = ev.job_id;
            let terminal = ev.is_terminal();
            if let Some(tx) = rt.watchers.get(&job_id) {
                // No receivers is not an error worth reporting.
                let _ = tx.send(ev);
                if terminal || tx.receiver_count() == 0 {
                    rt.watchers.remove(&job_id);
                }
            }
        }
        for (worker_id, msg) in fx.messages {
            match rt.sessions.get(&worker_id) {
                Some(s) => {
                    if s.tx.send(Ok(msg)).is_err() {
                        tracing::warn!(worker_id = %worker_id, "session closed; message dropped");
                    }
                }
                None => {
                    tracing::debug!(worker_id = %worker_id, "no session; message dropped")
                }
            }
        }
        for (worker_id, conn, status) in fx.close {
            let matches = rt
                .sessions
                .get(&worker_id)
                .is_some_and(|s| conn.is_none_or(|c| c == s.conn_id));
            if matches {
                if let Some(s) = rt.sessions.remove(&worker_id) {
                    let _ = s.tx.send(Err(status));
                    s.kill.notify_one();
                }
            }
        }
        if fx.schedule {
            self.schedule_notify.notify_one();
        }
    }

    /// Stops accepting transitions, closes every worker session and watcher stream. Workers stay
    /// ONLINE in the store: after a restart they get the reconnect grace.
    pub fn begin_shutdown(&self) {
        let mut guard = self.lock();
        let rt = &mut guard.rt;
        rt.shutting_down = true;
        for (_, s) in rt.sessions.drain() {
            let _ =
                s.tx.send(Err(Status::unavailable("the coordinator is shutting down")));
            s.kill.notify_one();
        }
        rt.watchers.clear();
    }

    /// Takes a watcher slot for `job_id`, within `limits.max_watchers_per_job` and
    /// `limits.max_watchers`.
    pub(crate) fn watch_slot(self: &Arc<Self>, job_id: JobId) -> Result<WatchSlot> {
        let l = &self.config.limits;
        let mut w = self.watching.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = w.values().sum();
        if total >= l.max_watchers {
            return Err(Error::ResourceExhausted(format!(
                "{total} watch streams are open (limits.max_watchers = {})",
                l.max_watchers
            )));
        }
        let n = w.entry(job_id).or_insert(0);
        if *n >= l.max_watchers_per_job {
            return Err(Error::ResourceExhausted(format!(
                "job {job_id} already has {} watch streams (limits.max_watchers_per_job)",
                *n
            )));
        }
        *n += 1;
        Ok(WatchSlot {
            core: self.clone(),
            job_id,
        })
    }

    /// A receiver that changes when log lines were appended or a job ended.
    pub(crate) fn log_ticks(&self) -> tokio::sync::watch::Receiver<u64> {
        self.log_tick.subscribe()
    }

    /// A job's log lines (`q`) and the job's state now.
    pub(crate) fn read_logs(
        &self,
        job_id: JobId,
        q: &LogQuery,
    ) -> Result<(Vec<LogLine>, JobState)> {
        self.read(|_, tx| {
            let job = tx.get_job(job_id)?.ok_or_else(|| Error::NotFound {
                what: "job",
                id: job_id.to_string(),
            })?;
            Ok((tx.list_logs(job_id, q)?, job.state))
        })
    }

    /// Subscribes to the job's live events first, then reads the persisted history, so no event
    /// falls between the two (the caller drops live events with `seq` <= the last replayed).
    pub(crate) fn watch(&self, job_id: JobId, from_step: u64) -> Result<WatchStart> {
        let mut guard = self.lock();
        let Inner { store, rt } = &mut *guard;
        let mut tx = store.begin()?;
        let job = tx.get_job(job_id)?.ok_or_else(|| Error::NotFound {
            what: "job",
            id: job_id.to_string(),
        })?;
        let live = if job.state.is_terminal() || rt.shutting_down {
            None
        } else {
            let cap = self.config.watch_buffer.max(1);
            Some(
                rt.watchers
                    .entry(job_id)
                    .or_insert_with(|| broadcast::channel(cap).0)
                    .subscribe(),
            )
        };
        let replay = tx.list_events(job_id, from_step, None)?;
        Ok(WatchStart { replay, live })
    }
}

/// Appends an event to the store and queues it for the watchers.
pub(crate) fn emit(
    tx: &mut dyn Tx,
    fx: &mut Effects,
    job_id: JobId,
    step: u64,
    kind: EventKind,
) -> Result<()> {
    let mut ev = JobEvent {
        seq: 0,
        time_ms: now_ms(),
        step,
        job_id,
        kind,
    };
    tx.append_event(&mut ev)?;
    fx.events.push(ev);
    Ok(())
}
