//! Registration: a daemon's registration checked (protocol version, names, devices, the node its
//! credential is bound to, no live session taken over) and stored.
use std::collections::HashSet;

use bt_common::domain::WorkerState;
use bt_common::{now_ms, WorkerId};
use bt_proto::{Device, RegisterRequest, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use tracing::{info, warn};

use super::{Core, Runtime};
use crate::error::{Error, Result};
use crate::store::{DeviceRecord, WorkerRecord};

/// A coordinator serves daemons of its protocol version and of the one before (N-1, with the
/// features it lacks off); a newer daemon is told to upgrade the coordinator first, an older one
/// to upgrade the daemon.
pub(super) fn check_version(field: &str, v: u32) -> Result<()> {
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
/// The refusal a second session (or registration) for a worker that still has a live one gets:
/// a live session is never taken over. Live: its session is open and it was heard from within
/// the heartbeat timeout; once that passes it is lost, and a new session is accepted.
pub(super) fn refuse_if_live(
    rt: &Runtime,
    w: &WorkerRecord,
    now: i64,
    timeout_ms: u64,
) -> Result<()> {
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
    /// The name of the worker whose id is `id` (None: not a known worker, or not an id).
    pub fn worker_name(&self, id: &str) -> Result<Option<String>> {
        let Ok(id) = id.parse::<WorkerId>() else {
            return Ok(None);
        };
        self.read(|_, tx| Ok(tx.get_worker(id)?.map(|w| w.name)))
    }
}
