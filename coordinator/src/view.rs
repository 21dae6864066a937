//! What the coordinator answers about a job or a worker, in domain terms (the core builds these),
//! and their one conversion to the wire (`bt_proto::Job`, `bt_proto::Worker`), used by the gRPC
//! service and the metrics scrape alike.
use bt_common::domain::EvalResult;
use bt_common::WorkerId;

use crate::store::{JobRecord, WorkerRecord};

/// A job as clients see it: its record, where its current attempt runs, its evaluations.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub job: JobRecord,
    /// The current attempt's ranks (empty before the first placement).
    pub placement: Vec<Placement>,
    /// Rank 0's store address of the current attempt ("" before the first placement).
    pub rendezvous: String,
    /// Evaluation results, oldest first.
    pub evals: Vec<EvalResult>,
    /// Why a queued job waits, from the latest scheduling pass ("" otherwise).
    pub pending_reason: String,
}

/// Where one rank runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub rank: u32,
    pub worker_id: WorkerId,
    /// The worker's name and host ("" when the worker record is gone).
    pub worker_name: String,
    pub host: String,
    pub device: u32,
}

/// A worker daemon as clients see it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    pub worker: WorkerRecord,
    /// The latest heartbeat (fresher than the record, which is written less often).
    pub last_seen_ms: i64,
    /// Devices a rank of an open attempt holds.
    pub busy_devices: u32,
    /// The protocol version of its current session (0: none) and the features off for it.
    pub protocol_version: u32,
    pub features_off: Vec<&'static str>,
    /// Why its daemon registered the node as unhealthy (empty: healthy).
    pub unhealthy: String,
}

impl From<JobView> for bt_proto::Job {
    fn from(v: JobView) -> Self {
        let j = v.job;
        bt_proto::Job {
            id: j.id.to_string(),
            name: j.name,
            kind: bt_common::domain::job_kind_name(j.kind).into(),
            job_kind: bt_proto::JobKind::from(j.kind) as i32,
            state: bt_proto::JobState::from(j.state) as i32,
            spec_toml: j.spec_toml,
            priority: j.priority,
            world_size: j.world_size,
            created_at_ms: j.created_ms,
            updated_at_ms: j.updated_ms,
            epoch: j.epoch,
            attempts: j.attempts,
            restarts_used: j.restarts_used,
            max_restarts: j.max_restarts,
            preemptions: j.preemptions,
            failure_reason: j.failure_reason,
            total_steps: j.total_steps,
            last_metrics: j.last_metrics.map(Into::into),
            placement: v.placement.into_iter().map(Into::into).collect(),
            evals: v.evals.into_iter().map(Into::into).collect(),
            rendezvous: v.rendezvous,
            owner: j.owner,
            pending_reason: v.pending_reason,
        }
    }
}

impl From<Placement> for bt_proto::RankPlacement {
    fn from(p: Placement) -> Self {
        bt_proto::RankPlacement {
            rank: p.rank,
            worker_id: p.worker_id.to_string(),
            worker_name: p.worker_name,
            host: p.host,
            device: p.device,
        }
    }
}

impl From<WorkerView> for bt_proto::Worker {
    fn from(v: WorkerView) -> Self {
        let w = v.worker;
        bt_proto::Worker {
            id: w.id.to_string(),
            name: w.name,
            host: w.host,
            devices: w
                .devices
                .into_iter()
                .map(|d| bt_proto::Device {
                    index: d.index,
                    kind: d.kind.name().into(),
                    device_kind: bt_proto::DeviceKind::from(d.kind) as i32,
                    name: d.name,
                })
                .collect(),
            state: bt_proto::WorkerState::from(w.state) as i32,
            last_seen_ms: v.last_seen_ms,
            busy_devices: v.busy_devices,
            drained: w.drained,
            protocol_version: v.protocol_version,
            features_off: v.features_off.into_iter().map(String::from).collect(),
            unhealthy: v.unhealthy,
        }
    }
}
