//! The coordinator binary: flags → config → bind → `bt_coordinator::run`.
use std::path::PathBuf;

use anyhow::Context;
use bt_coordinator::CoordinatorConfig;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "bt-coordinator",
    version,
    about = "The bt coordinator: jobs, workers, scheduling"
)]
struct Args {
    /// Configuration file (TOML or YAML); BT_COORDINATOR_* variables and flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address, e.g. 0.0.0.0:7070 (port 0 picks a free port; see --addr-file).
    #[arg(long)]
    listen: Option<String>,
    /// SQLite state database.
    #[arg(long = "db")]
    db: Option<PathBuf>,
    /// Root directory of checkpoint storage.
    #[arg(long)]
    checkpoint_root: Option<PathBuf>,
    /// Heartbeat interval asked of the daemons.
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    /// A worker silent this long is lost.
    #[arg(long)]
    heartbeat_timeout_ms: Option<u64>,
    /// Events buffered per watcher before it is told it missed some.
    #[arg(long)]
    watch_buffer: Option<usize>,
    /// After binding, write the bound address (host:port) to this file, atomically.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    bt_common::init_tracing();
    match real_main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("bt-coordinator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut overrides: Vec<(String, String)> = Vec::new();
    if let Some(v) = &args.listen {
        overrides.push(("listen".into(), v.clone()));
    }
    if let Some(v) = &args.db {
        overrides.push(("db_path".into(), v.display().to_string()));
    }
    if let Some(v) = &args.checkpoint_root {
        overrides.push(("checkpoint_root".into(), v.display().to_string()));
    }
    if let Some(v) = args.heartbeat_interval_ms {
        overrides.push(("heartbeat_interval_ms".into(), v.to_string()));
    }
    if let Some(v) = args.heartbeat_timeout_ms {
        overrides.push(("heartbeat_timeout_ms".into(), v.to_string()));
    }
    if let Some(v) = args.watch_buffer {
        overrides.push(("watch_buffer".into(), v.to_string()));
    }
    let config: CoordinatorConfig =
        bt_common::config::load(args.config.as_deref(), "BT_COORDINATOR", &overrides)
            .map_err(anyhow::Error::msg)
            .context("loading the coordinator configuration")?;
    config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid coordinator configuration")?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    if let Some(path) = &args.addr_file {
        write_atomically(path, &addr.to_string())
            .with_context(|| format!("writing the bound address to {}", path.display()))?;
    }
    bt_coordinator::run(config, listener, bt_common::shutdown_signal()).await
}
