//! The coordinator's configuration: defaults, then a file, `BT_COORDINATOR_*`, then flags.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// gRPC listen address (the binary binds it; `run` takes a bound listener).
    pub listen: String,
    /// A second, plain-text listener serving only the gRPC health service (for Kubernetes'
    /// built-in gRPC probes, which cannot speak TLS); empty: none.
    pub health_listen: String,
    /// A plain-HTTP listener serving Prometheus metrics at `/metrics` (no TLS, no token: bind it
    /// where only the scraper reaches it); empty: none.
    pub metrics_listen: String,
    /// SQLite database file.
    pub db_path: PathBuf,
    /// Root of the checkpoint storage; a job's checkpoints go to `<root>/<job_id>`.
    pub checkpoint_root: PathBuf,
    /// How often daemons send heartbeats.
    pub heartbeat_interval_ms: u64,
    /// A connected worker silent this long is lost (a worker with no session and no rank to
    /// run, too).
    pub heartbeat_timeout_ms: u64,
    /// After a coordinator restart, how long a worker that still holds ranks of running attempts
    /// gets to reconnect before it is lost and those attempts fail. Its trainers keep training
    /// meanwhile and their buffered reports arrive on the reconnect, so a restart within the
    /// grace costs no job a restart. Sized for the coordinator's pod being rescheduled (a new
    /// pod scheduled, its volume attached, the process started) plus the Service endpoint
    /// propagating to every node; never less than `heartbeat_timeout_ms`.
    pub reconnect_grace_ms: u64,
    /// Events buffered per `WatchJob` subscriber before it gets a `Missed` event.
    pub watch_buffer: usize,
    /// A placed rank whose trainer has not reported its start this long after placement fails
    /// its attempt (restarted or failed by the job's restart budget).
    pub start_deadline_ms: u64,
    /// Roots a job's `data.path` must lie under (besides the checkpoint root, always allowed).
    pub data_roots: Vec<PathBuf>,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub dashboard: DashboardConfig,
    pub retention: RetentionConfig,
    pub watchdog: WatchdogConfig,
    pub backup: BackupConfig,
}

/// Scheduled online backups of the state database, taken by the coordinator itself (a consistent
/// snapshot while it runs; see `bt-coordinator backup` for one by hand). Off unless `dir` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Directory for the backups, `bt-state-<UTC time>.db` (mode 0600, written atomically), e.g.
    /// a volume other than the database's; empty (the default): no scheduled backups.
    pub dir: PathBuf,
    /// Seconds between backups; the first is taken at start.
    pub interval_s: u64,
    /// Backups kept in `dir` (the oldest beyond it are deleted); 0: every one.
    pub keep: usize,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            dir: PathBuf::new(),
            interval_s: 3600,
            keep: 24,
        }
    }
}

/// The progress watchdog: a running job none of whose ranks has reported anything (steps,
/// evaluations, checkpoints, log lines) for `multiple` × its recent interval between step reports,
/// and at least `min_ms`, is declared hung (a stopped process, a deadlocked collective) and
/// restarted through the same path as a lost worker, well before the collective timeout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    /// Multiple of the recent step-report interval (0: no watchdog).
    pub multiple: f64,
    /// Never sooner than this (above the longest silent phase, such as a kNN evaluation).
    pub min_ms: u64,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            multiple: 10.0,
            min_ms: 300_000,
        }
    }
}

/// Housekeeping of finished jobs' history (run at start and every hour).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days a finished job keeps its metric curve, |C| pictures and log lines after it ended
    /// (its state history, evaluations, checkpoint records and notices stay until `btctl delete`);
    /// 0: forever.
    pub finished_history_days: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            finished_history_days: 30,
        }
    }
}

/// `dashboard.mode`: the web dashboard served at `/` on the gRPC port (`on`, the default), or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DashboardMode {
    #[default]
    On,
    Off,
}

/// The web dashboard: static files at `/` (no token needed: they carry no data) and gRPC-web on the
/// same port (the browser sends the bearer token like any client).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardConfig {
    pub mode: DashboardMode,
    /// Other origins whose pages may call the gRPC-web API (CORS), e.g. `https://ops.example.com`;
    /// empty (the default): only pages served by this coordinator.
    pub cors_origins: Vec<String>,
}

/// `auth.mode`: bearer tokens required (`on`, the default) or not checked at all (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    On,
    Off,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// A TOML file of `[[tokens]]` entries (name, role, sha256 of the token); re-read when it
    /// changes. A Kubernetes Secret mounted as a file in deploy/.
    pub tokens_file: Option<PathBuf>,
    /// The same TOML text inline (for example from `BT_COORDINATOR_AUTH__TOKENS`).
    pub tokens: String,
    /// Health and reflection need a token too (they are open to probes by default).
    pub protect_probes: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Server certificate chain and private key (PEM): TLS on every listener when set.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// CA (PEM) for client certificates: mutual TLS. Daemons must then present a certificate it
    /// signed to use the worker service; other clients may connect without one.
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

/// Bounds on what a peer can make the coordinator hold; each has a clear error when exceeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest job spec accepted (bytes of TOML).
    pub max_spec_bytes: usize,
    /// Largest gRPC message accepted from a peer (bytes; responses are not bounded by it).
    pub max_message_bytes: usize,
    /// Concurrent `WatchJob` streams per job, and in total.
    pub max_watchers_per_job: usize,
    pub max_watchers: usize,
    /// Metric reports accepted per trainer per second (more are dropped, with one warning).
    pub max_metrics_per_sec: u32,
    /// Metric events kept per job; beyond it the oldest metric events are thinned (every other
    /// one dropped), state changes, evaluations, checkpoints and notices are always kept.
    pub max_metric_events_per_job: u64,
    /// |C| pictures kept per job (about 4 KiB each at the trainer's 64 × 64); beyond it the oldest
    /// are thinned like metric events.
    pub max_pictures_per_job: u64,
    /// Jobs waiting (queued or restarting) per owner.
    pub max_queued_per_owner: usize,
    /// Trainer log lines accepted per rank per second (more are dropped and counted in a marker
    /// line).
    pub max_log_lines_per_sec: u32,
    /// Log lines kept per job; beyond it the oldest go.
    pub max_log_lines_per_job: u64,
    /// Evaluation, notice and checkpoint reports accepted per trainer per second, for each kind
    /// (more are dropped, with one warning per window).
    pub max_reports_per_sec: u32,
    /// Devices one worker may declare when it registers.
    pub max_devices_per_worker: usize,
    /// Submissions per owner: a token bucket of `submit_burst` that refills at
    /// `submit_per_minute` (next to `max_queued_per_owner`, which cancel-and-resubmit would
    /// otherwise sidestep).
    pub submit_per_minute: u32,
    pub submit_burst: u32,
    /// Largest page a listing RPC returns (jobs, workers, checkpoints); the rest comes with a
    /// `next_page_token`.
    pub max_page_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_spec_bytes: 64 << 10,
            max_message_bytes: 4 << 20,
            max_watchers_per_job: 64,
            max_watchers: 1024,
            max_metrics_per_sec: 50,
            max_metric_events_per_job: 100_000,
            max_pictures_per_job: 500,
            max_queued_per_owner: 1000,
            max_log_lines_per_sec: 500,
            max_log_lines_per_job: 100_000,
            max_reports_per_sec: 20,
            max_devices_per_worker: 64,
            submit_per_minute: 60,
            submit_burst: 30,
            max_page_size: 1000,
        }
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: "127.0.0.1:7070".into(),
            health_listen: String::new(),
            metrics_listen: String::new(),
            db_path: "bt-coordinator.db".into(),
            checkpoint_root: "checkpoints".into(),
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 10_000,
            reconnect_grace_ms: 120_000,
            watch_buffer: 256,
            start_deadline_ms: 60_000,
            data_roots: vec!["/usr/share/datasets".into()],
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            dashboard: DashboardConfig::default(),
            retention: RetentionConfig::default(),
            watchdog: WatchdogConfig::default(),
            backup: BackupConfig::default(),
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
        if self.start_deadline_ms == 0 {
            return Err("start_deadline_ms: must be greater than 0".into());
        }
        if !(self.watchdog.multiple >= 0.0 && self.watchdog.multiple.is_finite()) {
            return Err("watchdog.multiple: must be 0 (off) or a positive number".into());
        }
        if !self.backup.dir.as_os_str().is_empty() && self.backup.interval_s == 0 {
            return Err("backup.interval_s: must be greater than 0".into());
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
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err("tls.cert: the certificate and tls.key must be set together".into());
        }
        if self.tls.client_ca.is_some() && !self.tls.enabled() {
            return Err("tls.client_ca: mutual TLS needs tls.cert and tls.key".into());
        }
        let l = &self.limits;
        for (k, v) in [
            ("limits.max_spec_bytes", l.max_spec_bytes),
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.max_watchers_per_job", l.max_watchers_per_job),
            ("limits.max_watchers", l.max_watchers),
            ("limits.max_queued_per_owner", l.max_queued_per_owner),
            ("limits.max_devices_per_worker", l.max_devices_per_worker),
            ("limits.max_page_size", l.max_page_size),
        ] {
            if v == 0 {
                return Err(format!("{k}: must be greater than 0"));
            }
        }
        for (k, v) in [
            ("limits.max_metrics_per_sec", l.max_metrics_per_sec),
            ("limits.max_reports_per_sec", l.max_reports_per_sec),
            ("limits.submit_per_minute", l.submit_per_minute),
            ("limits.submit_burst", l.submit_burst),
        ] {
            if v == 0 {
                return Err(format!("{k}: must be greater than 0"));
            }
        }
        for o in &self.dashboard.cors_origins {
            let rest = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"));
            let ok = rest.is_some_and(|r| {
                !r.is_empty() && !r.contains('/') && r.bytes().all(|b| b.is_ascii_graphic())
            });
            if !ok {
                return Err(format!(
                    "dashboard.cors_origins: {o:?} is not an origin (scheme://host[:port], no path)"
                ));
            }
        }
        if l.max_metric_events_per_job < 100 {
            return Err("limits.max_metric_events_per_job: must be at least 100".into());
        }
        if l.max_pictures_per_job < 2 {
            return Err("limits.max_pictures_per_job: must be at least 2".into());
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

    #[test]
    fn dashboard_origins_are_checked() {
        let mut c = CoordinatorConfig::default();
        assert_eq!(c.dashboard.mode, DashboardMode::On);
        assert!(c.dashboard.cors_origins.is_empty());
        c.dashboard.cors_origins = vec!["https://ops.example.com:8443".into()];
        c.validate().unwrap();
        for bad in ["ops.example.com", "https://x/", "https://", "ftp://x"] {
            c.dashboard.cors_origins = vec![bad.into()];
            let e = c.validate().unwrap_err();
            assert!(e.contains("dashboard.cors_origins"), "{bad}: {e}");
        }
    }
}
