//! The stored forms of what the store keeps as documents (an event's body, a job's last metrics):
//! versioned JSON of the domain types, apart from the wire, so a proto edit never changes what is
//! on disk. `v` is the form's version; a reader refuses one it does not know.
use bt_common::domain::{EventKind, TrainMetrics};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The version this coordinator writes.
const V: u32 = 1;

#[derive(Deserialize)]
struct StoredEvent {
    v: u32,
    kind: EventKind,
}

#[derive(Serialize, Deserialize)]
struct StoredMetrics {
    v: u32,
    metrics: TrainMetrics,
}

fn check_version(v: u32, what: &str) -> Result<()> {
    if v == V {
        Ok(())
    } else {
        Err(Error::Corrupt(format!(
            "{what}: stored form version {v} is not one this coordinator reads (it reads {V})"
        )))
    }
}

pub(super) fn encode_event(kind: &EventKind) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Out<'a> {
        v: u32,
        kind: &'a EventKind,
    }
    serde_json::to_vec(&Out { v: V, kind })
        .map_err(|e| Error::Internal(format!("encode event: {e}")))
}

pub(super) fn decode_event(bytes: &[u8], what: &str) -> Result<EventKind> {
    let s: StoredEvent =
        serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
    check_version(s.v, what)?;
    Ok(s.kind)
}

pub(super) fn encode_metrics(metrics: &TrainMetrics) -> Result<Vec<u8>> {
    serde_json::to_vec(&StoredMetrics {
        v: V,
        metrics: *metrics,
    })
    .map_err(|e| Error::Internal(format!("encode metrics: {e}")))
}

pub(super) fn decode_metrics(bytes: &[u8], what: &str) -> Result<TrainMetrics> {
    let s: StoredMetrics =
        serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
    check_version(s.v, what)?;
    Ok(s.metrics)
}
