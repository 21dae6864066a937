//! The wire protocol of bt: generated gRPC code for `bt.v1`, the protocol version, and small helpers.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("bt.v1");
}

pub use v1::*;

pub mod client;
pub mod codec;
pub mod convert;

/// The protocol this build speaks. A coordinator serves daemons of its own version and of the one
/// before ([`MIN_PROTOCOL_VERSION`], N-1), with the [`FEATURES`] that version lacks off for them;
/// a daemon newer than its coordinator, or older than N-1, is refused with `FailedPrecondition`
/// (so: upgrade the coordinator first, then the daemons).
///
/// - 2: sessions, heartbeats, buffered reports, drains.
/// - 3: `HeartbeatAck` (the daemon's receive deadline), `Hello.exited` (exits buffered across a
///   coordinator outage are awaited through the reconnect grace).
pub const PROTOCOL_VERSION: u32 = 3;

/// The oldest daemon protocol a coordinator of this build serves (N-1).
pub const MIN_PROTOCOL_VERSION: u32 = PROTOCOL_VERSION - 1;

/// A protocol feature: its name (as `btctl workers` shows it when off), the first version that
/// has it, and what a daemon without it misses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub since: u32,
    pub what: &'static str,
}

/// Features added since [`MIN_PROTOCOL_VERSION`]; off for daemons older than `since`.
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "heartbeat-ack",
        since: 3,
        what: "the coordinator acknowledges heartbeats; without it the daemon notices a vanished \
               coordinator only by HTTP/2 and TCP keepalive",
    },
    Feature {
        name: "exit-replay",
        since: 3,
        what: "the hello names trainers that exited while the coordinator was away; without it \
               their buffered exits must arrive within the heartbeat timeout of the reconnect",
    },
];

/// Whether a daemon speaking `version` has `feature` (a name from [`FEATURES`]).
pub fn has_feature(version: u32, feature: &str) -> bool {
    FEATURES
        .iter()
        .find(|f| f.name == feature)
        .is_none_or(|f| version >= f.since)
}

/// The names of the features off for a daemon speaking `version` (empty: none, or unknown).
pub fn features_off(version: u32) -> Vec<&'static str> {
    if version == 0 {
        return Vec::new();
    }
    FEATURES
        .iter()
        .filter(|f| version < f.since)
        .map(|f| f.name)
        .collect()
}

/// Encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("bt_descriptor");

impl JobState {
    /// A job in a terminal state never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
    /// Lower-case display name ("running").
    pub fn name(self) -> &'static str {
        match self {
            JobState::Unspecified => "unspecified",
            JobState::Queued => "queued",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Restarting => "restarting",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_version_has_the_new_features_off() {
        assert!(features_off(PROTOCOL_VERSION).is_empty());
        assert_eq!(
            features_off(MIN_PROTOCOL_VERSION),
            ["heartbeat-ack", "exit-replay"]
        );
        assert!(has_feature(PROTOCOL_VERSION, "heartbeat-ack"));
        assert!(!has_feature(MIN_PROTOCOL_VERSION, "exit-replay"));
        assert!(features_off(0).is_empty());
    }
}
