//! The trainer process: one rank of one attempt. (in progress)

/// Entry point of `bt-worker train`; returns the process exit code.
pub fn main(_device_kind: &str) -> u8 {
    1
}
