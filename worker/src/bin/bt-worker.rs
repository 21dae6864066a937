//! `bt-worker`: the worker daemon (default) and, as `bt-worker train`, the trainer process it spawns.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bt-worker", version, about = "bt worker daemon and trainer")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// Config file (TOML or YAML); BT_WORKER_* environment variables override it, flags override both.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Coordinator address (host:port or http://host:port).
    #[arg(long)]
    coordinator: Option<String>,
    /// Stable daemon name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Address other nodes use to reach this node's rank-0 trainer.
    #[arg(long)]
    host: Option<String>,
    /// CPU trainer slots when the node has no CUDA device (never on a GPU node).
    #[arg(long)]
    cpu_slots: Option<u32>,
    /// GPUs this node must have (default: every GPU CUDA finds; 0: CPU slots only). A node where
    /// CUDA finds another number registers unhealthy, with the reason, and offers nothing.
    #[arg(long, value_name = "N")]
    gpus: Option<u32>,
    /// Ports for rank-0 TCPStores, START-END (end exclusive).
    #[arg(long, value_name = "START-END")]
    port_range: Option<String>,
    /// Trainer logs and scratch space.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Milliseconds a trainer gets after SIGTERM before SIGKILL.
    #[arg(long)]
    stop_grace_ms: Option<u64>,
    /// Checkpoint storage (the coordinator's checkpoint root, at the same path): trainers write
    /// and the daemon deletes checkpoints only inside it.
    #[arg(long)]
    checkpoint_root: Option<PathBuf>,
    /// File holding the worker token (or set BT_WORKER_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) of the coordinator: TLS, with the server verified.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    #[arg(long)]
    client_cert: Option<PathBuf>,
    #[arg(long)]
    client_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (the default).
    Daemon,
    /// Run one trainer rank (spawned by the daemon; reads its assignment on stdin).
    Train {
        /// The device kind of the slot it runs on ("cpu" or "cuda").
        #[arg(long, default_value = "cpu")]
        device_kind: bt_common::domain::DeviceKind,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    bt_common::init_tracing();
    match cli.cmd {
        Some(Cmd::Train { device_kind }) => ExitCode::from(bt_worker::trainer::main(device_kind)),
        Some(Cmd::Daemon) | None => match daemon(cli.daemon) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn daemon(a: DaemonArgs) -> anyhow::Result<()> {
    let mut o: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            o.push((k.to_string(), v));
        }
    };
    set("coordinator", a.coordinator);
    set("name", a.name);
    set("host", a.host);
    set("cpu_slots", a.cpu_slots.map(|v| v.to_string()));
    set("gpus", a.gpus.map(|v| v.to_string()));
    set("work_dir", a.work_dir.map(|p| p.display().to_string()));
    set("stop_grace_ms", a.stop_grace_ms.map(|v| v.to_string()));
    let path = |p: Option<PathBuf>| p.map(|p| p.display().to_string());
    set("checkpoint_root", path(a.checkpoint_root));
    set("token_file", path(a.token_file));
    set("ca_cert", path(a.ca_cert));
    set("client_cert", path(a.client_cert));
    set("client_key", path(a.client_key));
    if let Some(r) = a.port_range {
        let (s, e) = r
            .split_once('-')
            .ok_or_else(|| anyhow::anyhow!("--port-range must look like 29500-29600"))?;
        set("port_range_start", Some(s.trim().to_string()));
        set("port_range_end", Some(e.trim().to_string()));
    }
    let cfg: bt_worker::agent::WorkerConfig =
        bt_common::config::load(a.config.as_deref(), "BT_WORKER", &o)
            .map_err(|e| anyhow::anyhow!("worker configuration: {e}"))?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(bt_worker::agent::run(cfg, bt_common::shutdown_signal()))
}
