//! The coordinator's configuration: defaults, then a file, `BT_COORDINATOR_*`, then flags.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// gRPC listen address (the binary binds it; `run` takes a bound listener).
    pub listen: String,
    /// SQLite database file.
    pub db_path: PathBuf,
    /// Root of the checkpoint storage; a job's checkpoints go to `<root>/<job_id>`.
    pub checkpoint_root: PathBuf,
    /// How often daemons send heartbeats.
    pub heartbeat_interval_ms: u64,
    /// A connected worker silent this long is lost; also the grace after a coordinator restart for
    /// previously-online workers to reconnect.
    pub heartbeat_timeout_ms: u64,
    /// Events buffered per `WatchJob` subscriber before it gets a `Missed` event.
    pub watch_buffer: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: "127.0.0.1:7070".into(),
            db_path: "bt-coordinator.db".into(),
            checkpoint_root: "checkpoints".into(),
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 10_000,
            watch_buffer: 256,
        }
    }
}

impl CoordinatorConfig {
    /// Checks the values; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval_ms == 0 {
            return Err("heartbeat_interval_ms: must be greater than 0".into());
        }
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms {
            return Err(format!(
                "heartbeat_timeout_ms: must be greater than heartbeat_interval_ms ({})",
                self.heartbeat_interval_ms
            ));
        }
        if self.watch_buffer == 0 {
            return Err("watch_buffer: must be greater than 0".into());
        }
        if self.db_path.as_os_str().is_empty() {
            return Err("db_path: must not be empty".into());
        }
        if self.checkpoint_root.as_os_str().is_empty() {
            return Err("checkpoint_root: must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_defaults_file_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "db_path = \"/x/y.db\"\nwatch_buffer = 8\n").unwrap();
        let c: CoordinatorConfig = bt_common::config::load(
            Some(&f),
            "BT_COORDTEST_UNUSED",
            &[("heartbeat_timeout_ms".into(), "5000".into())],
        )
        .unwrap();
        assert_eq!(c.db_path, PathBuf::from("/x/y.db"));
        assert_eq!(c.watch_buffer, 8);
        assert_eq!(c.heartbeat_timeout_ms, 5000);
        assert_eq!(c.listen, "127.0.0.1:7070");
        c.validate().unwrap();
        std::fs::write(&f, "db_pth = \"x\"\n").unwrap();
        let e = bt_common::config::load::<CoordinatorConfig>(Some(&f), "BT_COORDTEST_UNUSED", &[])
            .unwrap_err();
        assert!(e.contains("db_pth"), "{e}");
    }
}
