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

/// Maps between a domain enum and its wire enum, both ways, variant for variant.
macro_rules! enum_map {
    ($dom:ident <=> $wire:ident { $($dv:ident <=> $wv:ident,)* }) => {
        impl From<d::$dom> for crate::$wire {
            fn from(v: d::$dom) -> Self {
                match v {
                    $(d::$dom::$dv => crate::$wire::$wv,)*
                }
            }
        }

        impl TryFrom<crate::$wire> for d::$dom {
            type Error = ();
            fn try_from(v: crate::$wire) -> Result<Self, ()> {
                match v {
                    crate::$wire::Unspecified => Err(()),
                    $(crate::$wire::$wv => Ok(d::$dom::$dv),)*
                }
            }
        }
    };
}

enum_map!(EvalKind <=> EvalKind {
    Knn <=> Knn,
    LinearProbe <=> LinearProbe,
    LinearProbeEpoch <=> LinearProbeEpoch,
    LinearProbeBaselineEpoch <=> LinearProbeBaselineEpoch,
    LinearProbeRawPixelsEpoch <=> LinearProbeRawPixelsEpoch,
});
enum_map!(DeviceKind <=> DeviceKind { Cpu <=> Cpu, Cuda <=> Cuda, });
enum_map!(NoticeLevel <=> NoticeLevel { Info <=> Info, Warn <=> Warn, Error <=> Error, });
enum_map!(CheckpointEvalState <=> CheckpointEvalState {
    Pending <=> Pending,
    Running <=> Running,
    Done <=> Done,
    Failed <=> Failed,
});

impl From<bt_common::JobKind> for crate::JobKind {
    fn from(k: bt_common::JobKind) -> Self {
        match k {
            bt_common::JobKind::Pretrain => crate::JobKind::Pretrain,
            bt_common::JobKind::LinearProbe => crate::JobKind::LinearProbe,
        }
    }
}

/// Reads a closed set that travels twice: as an enum (preferred, when set) and as its name (what
/// older peers send). A message carrying both must not contradict itself.
fn prefer_enum<T: Copy + PartialEq>(
    field: &'static str,
    wire: Result<T, ()>,
    name: &str,
    parse: impl Fn(&str) -> Option<T>,
    names: &[&str],
) -> Result<T, WireError> {
    if let Ok(v) = wire {
        if name.is_empty() || parse(name) == Some(v) {
            return Ok(v);
        }
        return Err(WireError::new(
            field,
            format!("{name:?} contradicts the enum value sent with it"),
        ));
    }
    parse(name).ok_or_else(|| {
        WireError::new(
            field,
            format!("{name:?} is not one of {}", names.join(", ")),
        )
    })
}

fn names<T: Copy>(all: &[T], name: impl Fn(T) -> &'static str) -> Vec<&'static str> {
    all.iter().map(|v| name(*v)).collect()
}

/// An evaluation's kind: `eval_kind` when set, else `kind`.
pub fn eval_kind(e: &crate::EvalResult) -> Result<d::EvalKind, WireError> {
    let wire = crate::EvalKind::try_from(e.eval_kind)
        .map_err(|_| ())
        .and_then(d::EvalKind::try_from);
    prefer_enum(
        "kind",
        wire,
        &e.kind,
        d::EvalKind::parse,
        &names(d::EvalKind::ALL, d::EvalKind::name),
    )
}

/// A device's kind: `device_kind` when set, else `kind`.
pub fn device_kind(dev: &crate::Device) -> Result<d::DeviceKind, WireError> {
    let wire = crate::DeviceKind::try_from(dev.device_kind)
        .map_err(|_| ())
        .and_then(d::DeviceKind::try_from);
    prefer_enum(
        "kind",
        wire,
        &dev.kind,
        d::DeviceKind::parse,
        &names(d::DeviceKind::ALL, d::DeviceKind::name),
    )
}

/// A notice's level: `severity` when set, else `level` (its name).
pub fn notice_level(n: &crate::Notice) -> Result<d::NoticeLevel, WireError> {
    let wire = crate::NoticeLevel::try_from(n.severity)
        .map_err(|_| ())
        .and_then(d::NoticeLevel::try_from);
    prefer_enum(
        "level",
        wire,
        &n.level,
        d::NoticeLevel::parse,
        &names(d::NoticeLevel::ALL, d::NoticeLevel::name),
    )
}

/// A checkpoint's evaluation state: `eval_status` when set, else `eval_state` ("" is none).
pub fn checkpoint_eval_state(
    c: &crate::CheckpointInfo,
) -> Result<Option<d::CheckpointEvalState>, WireError> {
    let wire = crate::CheckpointEvalState::try_from(c.eval_status)
        .map_err(|_| ())
        .and_then(d::CheckpointEvalState::try_from);
    if wire.is_err() && c.eval_state.is_empty() {
        return Ok(None);
    }
    prefer_enum(
        "eval_state",
        wire,
        &c.eval_state,
        d::CheckpointEvalState::parse,
        &names(d::CheckpointEvalState::ALL, d::CheckpointEvalState::name),
    )
    .map(Some)
}

/// A job's kind: `job_kind` when set, else `kind`.
pub fn job_kind(j: &crate::Job) -> Result<bt_common::JobKind, WireError> {
    let wire = match crate::JobKind::try_from(j.job_kind) {
        Ok(crate::JobKind::Pretrain) => Ok(bt_common::JobKind::Pretrain),
        Ok(crate::JobKind::LinearProbe) => Ok(bt_common::JobKind::LinearProbe),
        Ok(crate::JobKind::Unspecified) | Err(_) => Err(()),
    };
    prefer_enum(
        "kind",
        wire,
        &j.kind,
        d::parse_job_kind,
        &["pretrain", "linear_probe"],
    )
}

impl From<d::EvalResult> for crate::EvalResult {
    fn from(e: d::EvalResult) -> Self {
        crate::EvalResult {
            step: e.step,
            epoch: e.epoch,
            kind: e.kind.name().into(),
            eval_kind: crate::EvalKind::from(e.kind) as i32,
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

impl TryFrom<crate::EvalResult> for d::EvalResult {
    type Error = WireError;
    fn try_from(e: crate::EvalResult) -> Result<Self, WireError> {
        Ok(d::EvalResult {
            step: e.step,
            epoch: e.epoch,
            kind: eval_kind(&e)?,
            top1: e.top1,
            top5: e.top5,
            baseline_top1: e.baseline_top1,
            detail: e.detail,
            raw_pixels_top1: e.raw_pixels_top1,
            margin: e.margin,
            has_baselines: e.has_baselines,
        })
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
            eval_state: c.eval_state.map_or("", |s| s.name()).into(),
            eval_status: c
                .eval_state
                .map_or(crate::CheckpointEvalState::Unspecified, Into::into)
                as i32,
            eval_job_id: c.eval_job_id,
            eval: c.eval.map(Into::into),
        }
    }
}

impl TryFrom<crate::CheckpointInfo> for d::CheckpointInfo {
    type Error = WireError;
    fn try_from(c: crate::CheckpointInfo) -> Result<Self, WireError> {
        Ok(d::CheckpointInfo {
            eval_state: checkpoint_eval_state(&c)?,
            job_id: c.job_id,
            step: c.step,
            epoch: c.epoch,
            path: c.path,
            created_at_ms: c.created_at_ms,
            size_bytes: c.size_bytes,
            sha256: c.sha256,
            eval_job_id: c.eval_job_id,
            eval: c.eval.map(TryInto::try_into).transpose()?,
        })
    }
}

impl From<d::Notice> for crate::Notice {
    fn from(n: d::Notice) -> Self {
        crate::Notice {
            level: n.level.name().into(),
            message: n.message,
            severity: crate::NoticeLevel::from(n.level) as i32,
        }
    }
}

impl TryFrom<crate::Notice> for d::Notice {
    type Error = WireError;
    fn try_from(n: crate::Notice) -> Result<Self, WireError> {
        Ok(d::Notice {
            level: notice_level(&n)?,
            message: n.message,
        })
    }
}

impl From<d::CorrelationPicture> for crate::CorrelationPicture {
    fn from(p: d::CorrelationPicture) -> Self {
        crate::CorrelationPicture {
            step: p.step,
            side: p.side,
            cells: p.cells,
            mean_diag: p.mean_diag,
            mean_abs_off_diag: p.mean_abs_off_diag,
        }
    }
}

impl TryFrom<crate::CorrelationPicture> for d::CorrelationPicture {
    type Error = WireError;
    fn try_from(p: crate::CorrelationPicture) -> Result<Self, WireError> {
        let p = d::CorrelationPicture {
            step: p.step,
            side: p.side,
            cells: p.cells,
            mean_diag: p.mean_diag,
            mean_abs_off_diag: p.mean_abs_off_diag,
        };
        p.check().map_err(|m| WireError::new("picture.cells", m))?;
        Ok(p)
    }
}

impl From<d::LogLine> for crate::LogLine {
    fn from(l: d::LogLine) -> Self {
        crate::LogLine {
            seq: l.seq,
            epoch: l.epoch,
            rank: l.rank,
            time_ms: l.time_ms,
            text: l.text,
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
            d::EventKind::Picture(p) => Kind::Picture(p.into()),
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
            Some(Kind::Eval(v)) => d::EventKind::Eval(v.try_into()?),
            Some(Kind::Checkpoint(c)) => d::EventKind::Checkpoint(c.try_into()?),
            Some(Kind::Notice(n)) => d::EventKind::Notice(n.try_into()?),
            Some(Kind::Picture(p)) => d::EventKind::Picture(p.try_into()?),
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
down!(StopTrainers, StopTrainers);

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

    #[test]
    fn readers_prefer_the_enum_and_fall_back_to_the_name() {
        let old = crate::EvalResult {
            kind: "linear_probe".into(),
            ..Default::default()
        };
        assert_eq!(eval_kind(&old), Ok(d::EvalKind::LinearProbe));
        let new = crate::EvalResult {
            eval_kind: crate::EvalKind::LinearProbe as i32,
            ..Default::default()
        };
        assert_eq!(eval_kind(&new), Ok(d::EvalKind::LinearProbe));
        let contradiction = crate::EvalResult {
            kind: "knn".into(),
            eval_kind: crate::EvalKind::LinearProbe as i32,
            ..Default::default()
        };
        assert!(eval_kind(&contradiction).is_err());
        let bad = crate::EvalResult {
            kind: "svm".into(),
            ..Default::default()
        };
        assert!(eval_kind(&bad).unwrap_err().to_string().contains("svm"));
        let dev = crate::Device {
            kind: "cuda".into(),
            ..Default::default()
        };
        assert_eq!(device_kind(&dev), Ok(d::DeviceKind::Cuda));
        let none = crate::CheckpointInfo::default();
        assert_eq!(checkpoint_eval_state(&none), Ok(None));
        let done = crate::CheckpointInfo {
            eval_status: crate::CheckpointEvalState::Done as i32,
            ..Default::default()
        };
        assert_eq!(
            checkpoint_eval_state(&done),
            Ok(Some(d::CheckpointEvalState::Done))
        );
        // Domain -> wire fills both carriers.
        let w = crate::EvalResult::from(d::EvalResult::try_from(old).unwrap());
        assert_eq!(
            (w.kind.as_str(), w.eval_kind),
            ("linear_probe", crate::EvalKind::LinearProbe as i32)
        );
        for k in d::NoticeLevel::ALL {
            let n = crate::Notice::from(d::Notice {
                level: *k,
                message: String::new(),
            });
            assert_eq!(notice_level(&n), Ok(*k));
        }
    }
}
