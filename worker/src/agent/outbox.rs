//! The daemon's outbox: trainers' reports waiting to go up to the coordinator, in order, while the
//! session is down or behind earlier ones, bounded (the least valuable go first when full) and
//! replayed paced under the coordinator's per-kind rate limits after a reconnect.
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bt_proto::worker_message::Msg as Up;
use bt_proto::{trainer_report, TrainerReport, WorkerMessage};
use tokio::sync::mpsc;
use tracing::warn;

/// Buffered reports other than metrics, starts and exits replayed per trainer and kind per
/// second (under the coordinator's per-kind limit).
const REPLAY_OTHERS_PER_SEC: f64 = 10.0;

/// The replay pacing class of a report: None for starts and exits (never held back).
fn pace_kind(r: &TrainerReport) -> Option<&'static str> {
    use trainer_report::Body;
    match r.body.as_ref()? {
        Body::Started(_) | Body::Exit(_) => None,
        Body::Metrics(_) => Some("metrics"),
        Body::Eval(_) => Some("eval"),
        Body::Checkpoint(_) => Some("checkpoint"),
        Body::Notice(_) => Some("notice"),
        Body::Picture(_) => Some("picture"),
        Body::Logs(_) => Some("logs"),
    }
}

pub(super) struct Outbox {
    pending: VecDeque<TrainerReport>,
    /// Replay pacing: per (job, epoch, rank, kind), when the next may go.
    pace: HashMap<(String, u64, u32, &'static str), tokio::time::Instant>,
    max: usize,
    metrics_per_sec: u32,
}

impl Outbox {
    pub(super) fn new(max: usize, metrics_per_sec: u32) -> Self {
        Outbox {
            pending: VecDeque::new(),
            pace: HashMap::new(),
            max,
            metrics_per_sec,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &TrainerReport> {
        self.pending.iter()
    }

    /// A new session: the replay pacing starts over.
    pub(super) fn restart_pacing(&mut self) {
        self.pace.clear();
    }

    /// Sends buffered reports in order, as far as the channel and the replay pacing allow;
    /// returns when to try again.
    pub(super) fn flush(&mut self, up: &mpsc::Sender<WorkerMessage>) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let per_sec = f64::from(self.metrics_per_sec.max(1));
        let metrics_gap = Duration::from_secs_f64(1.0 / per_sec);
        let others_gap = Duration::from_secs_f64(1.0 / REPLAY_OTHERS_PER_SEC);
        while let Some(r) = self.pending.front() {
            let kind = pace_kind(r);
            let key = kind.map(|k| (r.job_id.clone(), r.epoch, r.rank, k));
            if let Some(at) = key.as_ref().and_then(|k| self.pace.get(k)) {
                if *at > now {
                    return *at;
                }
            }
            let Ok(permit) = up.try_reserve() else {
                return now + Duration::from_millis(20);
            };
            let Some(r) = self.pending.pop_front() else {
                break;
            };
            if let (Some(k), Some(kind)) = (key, kind) {
                let gap = if kind == "metrics" {
                    metrics_gap
                } else {
                    others_gap
                };
                self.pace.insert(k, now + gap);
            }
            permit.send(WorkerMessage {
                msg: Some(Up::Report(r)),
            });
        }
        now
    }

    /// Queues `r`; when full, drops the least valuable report first.
    pub(super) fn push(&mut self, r: TrainerReport) {
        if self.pending.len() >= self.max.max(1) {
            // Full: the oldest log lines go first, then pictures, then metrics; starts, exits,
            // checkpoints, evaluations and notices are kept.
            use trainer_report::Body;
            let oldest = |f: fn(&Body) -> bool| {
                self.pending
                    .iter()
                    .position(|p| p.body.as_ref().is_some_and(f))
            };
            let victim = oldest(|b| matches!(b, Body::Logs(_)))
                .or_else(|| oldest(|b| matches!(b, Body::Picture(_))))
                .or_else(|| oldest(|b| matches!(b, Body::Metrics(_))));
            if victim.is_none() {
                warn!(
                    buffered = self.pending.len(),
                    "report buffer full of starts, exits, checkpoints, evaluations and notices; \
                     dropping the oldest"
                );
            }
            match victim {
                Some(i) => {
                    self.pending.remove(i);
                }
                None => {
                    self.pending.pop_front();
                }
            }
        }
        self.pending.push_back(r);
    }
}
