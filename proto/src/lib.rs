//! The wire protocol of bt: generated gRPC code for `bt.v1`, the protocol version, and small helpers.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("bt.v1");
}

pub use v1::*;

pub mod client;
pub mod convert;

/// Checked at registration: a daemon speaking another version is refused with `FailedPrecondition`.
pub const PROTOCOL_VERSION: u32 = 2;

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
