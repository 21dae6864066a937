//! The one place where the wire meets the domain: conversions between `bt_common::domain` types
//! and the generated `bt.v1` messages. Domain → wire is total (`From`); wire → domain is checked
//! (`TryFrom`, the error naming the field), since a peer may send anything.
use bt_common::domain as d;

/// A wire value with no domain meaning (an unspecified enum, a missing oneof).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct WireError {
    pub field: &'static str,
    pub message: String,
}

impl WireError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        WireError {
            field,
            message: message.into(),
        }
    }
}

impl From<d::JobState> for crate::JobState {
    fn from(s: d::JobState) -> Self {
        match s {
            d::JobState::Queued => crate::JobState::Queued,
            d::JobState::Scheduled => crate::JobState::Scheduled,
            d::JobState::Running => crate::JobState::Running,
            d::JobState::Restarting => crate::JobState::Restarting,
            d::JobState::Succeeded => crate::JobState::Succeeded,
            d::JobState::Failed => crate::JobState::Failed,
            d::JobState::Cancelled => crate::JobState::Cancelled,
        }
    }
}

impl TryFrom<crate::JobState> for d::JobState {
    type Error = WireError;
    fn try_from(s: crate::JobState) -> Result<Self, WireError> {
        Ok(match s {
            crate::JobState::Unspecified => {
                return Err(WireError::new("state", "the job state is unspecified"))
            }
            crate::JobState::Queued => d::JobState::Queued,
            crate::JobState::Scheduled => d::JobState::Scheduled,
            crate::JobState::Running => d::JobState::Running,
            crate::JobState::Restarting => d::JobState::Restarting,
            crate::JobState::Succeeded => d::JobState::Succeeded,
            crate::JobState::Failed => d::JobState::Failed,
            crate::JobState::Cancelled => d::JobState::Cancelled,
        })
    }
}

/// A job state as it travels (the enum's number), checked.
pub fn job_state_from_i32(v: i32) -> Result<d::JobState, WireError> {
    crate::JobState::try_from(v)
        .map_err(|_| WireError::new("state", format!("unknown job state {v}")))?
        .try_into()
}

impl From<d::WorkerState> for crate::WorkerState {
    fn from(s: d::WorkerState) -> Self {
        match s {
            d::WorkerState::Online => crate::WorkerState::Online,
            d::WorkerState::Lost => crate::WorkerState::Lost,
        }
    }
}

impl From<d::TrainMetrics> for crate::TrainMetrics {
    fn from(m: d::TrainMetrics) -> Self {
        crate::TrainMetrics {
            step: m.step,
            epoch: m.epoch,
            total_steps: m.total_steps,
            loss: m.loss,
            on_diag: m.on_diag,
            off_diag: m.off_diag,
            off_diag_scaled: m.off_diag_scaled,
            mean_diag: m.mean_diag,
            mean_abs_off_diag: m.mean_abs_off_diag,
            max_abs_off_diag: m.max_abs_off_diag,
            lr: m.lr,
            images_per_sec: m.images_per_sec,
            skipped_images: m.skipped_images,
            step_time_ms: m.step_time_ms,
        }
    }
}

impl From<crate::TrainMetrics> for d::TrainMetrics {
    fn from(m: crate::TrainMetrics) -> Self {
        d::TrainMetrics {
            step: m.step,
            epoch: m.epoch,
            total_steps: m.total_steps,
            loss: m.loss,
            on_diag: m.on_diag,
            off_diag: m.off_diag,
            off_diag_scaled: m.off_diag_scaled,
            mean_diag: m.mean_diag,
            mean_abs_off_diag: m.mean_abs_off_diag,
            max_abs_off_diag: m.max_abs_off_diag,
            lr: m.lr,
            images_per_sec: m.images_per_sec,
            skipped_images: m.skipped_images,
            step_time_ms: m.step_time_ms,
        }
    }
}

impl From<d::EvalResult> for crate::EvalResult {
    fn from(e: d::EvalResult) -> Self {
        crate::EvalResult {
            step: e.step,
            epoch: e.epoch,
            kind: e.kind,
            top1: e.top1,
            top5: e.top5,
            baseline_top1: e.baseline_top1,
            detail: e.detail,
            raw_pixels_top1: e.raw_pixels_top1,
            margin: e.margin,
            has_baselines: e.has_baselines,
        }
    }
}

impl From<crate::EvalResult> for d::EvalResult {
    fn from(e: crate::EvalResult) -> Self {
        d::EvalResult {
            step: e.step,
            epoch: e.epoch,
            kind: e.kind,
            top1: e.top1,
            top5: e.top5,
            baseline_top1: e.baseline_top1,
            detail: e.detail,
            raw_pixels_top1: e.raw_pixels_top1,
            margin: e.margin,
            has_baselines: e.has_baselines,
        }
    }
}

impl From<d::CheckpointInfo> for crate::CheckpointInfo {
    fn from(c: d::CheckpointInfo) -> Self {
        crate::CheckpointInfo {
            job_id: c.job_id,
            step: c.step,
            epoch: c.epoch,
            path: c.path,
            created_at_ms: c.created_at_ms,
            size_bytes: c.size_bytes,
            sha256: c.sha256,
            eval_state: c.eval_state,
            eval_job_id: c.eval_job_id,
            eval: c.eval.map(Into::into),
        }
    }
}

impl From<crate::CheckpointInfo> for d::CheckpointInfo {
    fn from(c: crate::CheckpointInfo) -> Self {
        d::CheckpointInfo {
            job_id: c.job_id,
            step: c.step,
            epoch: c.epoch,
            path: c.path,
            created_at_ms: c.created_at_ms,
            size_bytes: c.size_bytes,
            sha256: c.sha256,
            eval_state: c.eval_state,
            eval_job_id: c.eval_job_id,
            eval: c.eval.map(Into::into),
        }
    }
}

impl From<d::Notice> for crate::Notice {
    fn from(n: d::Notice) -> Self {
        crate::Notice {
            level: n.level,
            message: n.message,
        }
    }
}

impl From<crate::Notice> for d::Notice {
    fn from(n: crate::Notice) -> Self {
        d::Notice {
            level: n.level,
            message: n.message,
        }
    }
}

impl From<d::StateChange> for crate::StateChange {
    fn from(s: d::StateChange) -> Self {
        crate::StateChange {
            state: crate::JobState::from(s.state) as i32,
            reason: s.reason,
            epoch: s.epoch,
        }
    }
}

impl TryFrom<crate::StateChange> for d::StateChange {
    type Error = WireError;
    fn try_from(s: crate::StateChange) -> Result<Self, WireError> {
        Ok(d::StateChange {
            state: job_state_from_i32(s.state)?,
            reason: s.reason,
            epoch: s.epoch,
        })
    }
}

impl From<d::EventKind> for crate::job_event::Kind {
    fn from(k: d::EventKind) -> Self {
        use crate::job_event::Kind;
        match k {
            d::EventKind::State(s) => Kind::State(s.into()),
            d::EventKind::Metrics(m) => Kind::Metrics(m.into()),
            d::EventKind::Eval(e) => Kind::Eval(e.into()),
            d::EventKind::Checkpoint(c) => Kind::Checkpoint(c.into()),
            d::EventKind::Notice(n) => Kind::Notice(n.into()),
        }
    }
}

impl From<d::JobEvent> for crate::JobEvent {
    fn from(e: d::JobEvent) -> Self {
        crate::JobEvent {
            seq: e.seq,
            time_ms: e.time_ms,
            step: e.step,
            job_id: e.job_id.to_string(),
            kind: Some(e.kind.into()),
        }
    }
}

/// A job event as an older coordinator stored it (the wire message); `Missed` is never stored.
impl TryFrom<crate::JobEvent> for d::JobEvent {
    type Error = WireError;
    fn try_from(e: crate::JobEvent) -> Result<Self, WireError> {
        use crate::job_event::Kind;
        let kind = match e.kind {
            Some(Kind::State(s)) => d::EventKind::State(s.try_into()?),
            Some(Kind::Metrics(m)) => d::EventKind::Metrics(m.into()),
            Some(Kind::Eval(v)) => d::EventKind::Eval(v.into()),
            Some(Kind::Checkpoint(c)) => d::EventKind::Checkpoint(c.into()),
            Some(Kind::Notice(n)) => d::EventKind::Notice(n.into()),
            Some(Kind::Missed(_)) => {
                return Err(WireError::new(
                    "kind",
                    "a missed-events marker is not an event",
                ))
            }
            None => return Err(WireError::new("kind", "the event has no kind")),
        };
        Ok(d::JobEvent {
            seq: e.seq,
            time_ms: e.time_ms,
            step: e.step,
            job_id: e
                .job_id
                .parse()
                .map_err(|m: String| WireError::new("job_id", m))?,
            kind,
        })
    }
}

macro_rules! down {
    ($msg:ident, $variant:ident) => {
        impl From<crate::$msg> for crate::CoordinatorMessage {
            fn from(m: crate::$msg) -> Self {
                crate::CoordinatorMessage {
                    msg: Some(crate::coordinator_message::Msg::$variant(m)),
                }
            }
        }
    };
}
down!(Assignment, Assign);
down!(CancelAssignment, Cancel);
down!(DeleteCheckpoints, DeleteCheckpoints);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_states_round_trip_and_unspecified_is_refused() {
        for s in d::JobState::ALL {
            let w = crate::JobState::from(s);
            assert_eq!(d::JobState::try_from(w), Ok(s));
            assert_eq!(job_state_from_i32(w as i32), Ok(s));
        }
        assert!(d::JobState::try_from(crate::JobState::Unspecified).is_err());
        assert!(job_state_from_i32(99).is_err());
    }
}
