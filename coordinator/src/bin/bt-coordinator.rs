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
    /// Plain-text listener for the gRPC health service only (Kubernetes probes), e.g. 0.0.0.0:7071.
    #[arg(long)]
    health_listen: Option<String>,
    /// Plain-HTTP listener for Prometheus metrics (`GET /metrics`), e.g. 0.0.0.0:9090.
    #[arg(long)]
    metrics_listen: Option<String>,
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
    /// Bearer-token authentication: on (the default; needs a tokens file) or off (trusted
    /// single-user machines only: anyone who reaches the port can do anything).
    #[arg(long, value_name = "on|off")]
    auth: Option<String>,
    /// Tokens file (TOML `[[tokens]]` with name, role, sha256); re-read when it changes.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Server certificate (PEM): TLS on the listener. Needs --tls-key.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// CA (PEM) for client certificates: daemons must then present one it signed (mutual TLS).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// The web dashboard at / on the listen address: on (the default) or off. gRPC-web stays on.
    #[arg(long, value_name = "on|off")]
    dashboard: Option<String>,
    /// An origin (scheme://host[:port]) whose pages may call the API from a browser (CORS);
    /// repeatable; replaces dashboard.cors_origins. Default: none (same origin only).
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Create what a secured cluster needs in DIR: a CA, a server certificate for the given hosts,
    /// a client certificate for daemons, and admin and worker tokens (tokens.toml keeps only their
    /// hashes; the tokens themselves go to admin.token and worker.token, readable by you only).
    InitSecrets {
        #[arg(long)]
        dir: PathBuf,
        /// Names and addresses the server certificate is valid for (localhost and 127.0.0.1 are
        /// always included).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Also a daemon client certificate bound to this node name (`node-NAME.pem`/`.key`;
        /// repeatable): with mutual TLS, its daemon may register only as NAME.
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Add a token to a tokens file (the running coordinator picks it up within a second) and
    /// print it once.
    AddToken {
        #[arg(long)]
        tokens_file: PathBuf,
        #[arg(long)]
        name: String,
        /// admin, submitter, viewer or worker.
        #[arg(long)]
        role: String,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        token_out: Option<PathBuf>,
        /// Bind a worker token to this node: its daemon may register only as NODE (a per-node
        /// token; without it a worker token may register as any node that is not online).
        #[arg(long)]
        node: Option<String>,
    },
    /// Back up the state database while the coordinator runs (a consistent snapshot, written
    /// atomically, mode 0600): to a file, or to `bt-state-<UTC time>.db` in a directory.
    Backup {
        /// The state database.
        #[arg(long = "db")]
        db: PathBuf,
        /// A file, or a directory (existing, or written with a trailing `/`).
        #[arg(long, value_name = "DIR_OR_FILE")]
        out: PathBuf,
        /// Keep only the newest N backups in the directory (0: all).
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep: usize,
    },
    /// Restore the state database from a backup (stop the coordinator first). The backup must
    /// pass `PRAGMA integrity_check` and be a bt state database.
    Restore {
        /// The backup file.
        #[arg(long = "from", value_name = "BACKUP")]
        from: PathBuf,
        /// The state database to create.
        #[arg(long = "db")]
        db: PathBuf,
        /// Replace a database that is not empty (it is kept as DB.pre-restore-<time>).
        #[arg(long)]
        force: bool,
    },
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
    match &args.cmd {
        Some(Cmd::InitSecrets {
            dir,
            hosts,
            nodes,
            force,
        }) => return bt_coordinator::secrets::init_secrets(dir, hosts, nodes, *force),
        Some(Cmd::AddToken {
            tokens_file,
            name,
            role,
            token_out,
            node,
        }) => {
            let role = role.parse().map_err(anyhow::Error::msg)?;
            let token =
                bt_coordinator::secrets::add_token(tokens_file, name, role, node.as_deref())?;
            match token_out {
                Some(p) => {
                    bt_coordinator::secrets::write_private(p, &format!("{token}\n"))?;
                    println!(
                        "token for {name} ({}) written to {}",
                        role.name(),
                        p.display()
                    );
                }
                None => println!("{token}"),
            }
            return Ok(());
        }
        Some(Cmd::Backup { db, out, keep }) => {
            let b = bt_coordinator::backup::backup(db, out, *keep)?;
            println!(
                "backed up {} to {} ({} bytes, {} ms)",
                db.display(),
                b.path.display(),
                b.bytes,
                b.elapsed.as_millis()
            );
            for p in &b.removed {
                println!("deleted the older backup {}", p.display());
            }
            return Ok(());
        }
        Some(Cmd::Restore { from, db, force }) => {
            let r = bt_coordinator::backup::restore(from, db, *force)?;
            if let Some(p) = &r.previous {
                println!("kept the replaced database as {}", p.display());
            }
            println!(
                "restored {} to {} (schema {}, {} jobs, {} events)",
                from.display(),
                db.display(),
                r.summary.schema,
                r.summary.jobs,
                r.summary.events
            );
            return Ok(());
        }
        None => {}
    }
    let mut overrides: Vec<(String, String)> = Vec::new();
    if let Some(v) = &args.listen {
        overrides.push(("listen".into(), v.clone()));
    }
    if let Some(v) = &args.metrics_listen {
        overrides.push(("metrics_listen".into(), v.clone()));
    }
    if let Some(v) = &args.health_listen {
        overrides.push(("health_listen".into(), v.clone()));
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
    if let Some(v) = &args.auth {
        overrides.push(("auth.mode".into(), v.clone()));
    }
    if let Some(v) = &args.dashboard {
        overrides.push(("dashboard.mode".into(), v.clone()));
    }
    for (k, v) in [
        ("auth.tokens_file", &args.tokens_file),
        ("tls.cert", &args.tls_cert),
        ("tls.key", &args.tls_key),
        ("tls.client_ca", &args.tls_client_ca),
    ] {
        if let Some(v) = v {
            overrides.push((k.into(), v.display().to_string()));
        }
    }
    let mut config: CoordinatorConfig =
        bt_common::config::load(args.config.as_deref(), "BT_COORDINATOR", &overrides)
            .map_err(anyhow::Error::msg)
            .context("loading the coordinator configuration")?;
    if !args.cors_origins.is_empty() {
        config.dashboard.cors_origins = args.cors_origins.clone();
    }
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
