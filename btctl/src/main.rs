//! btctl: the command line of bt. Talks to the coordinator over gRPC.
mod export;
mod output;
mod tensorboard;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bt_proto::job_service_client::JobServiceClient;
use bt_proto::*;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "btctl",
    version,
    about = "Submit and follow Barlow Twins pretraining jobs"
)]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How to reach the coordinator. Flags and environment first, then the config file
/// (`--config`, `BT_CONFIG`, or `~/.config/bt/btctl.toml` when it exists), then defaults.
#[derive(clap::Args, Clone)]
struct Conn {
    /// Coordinator address (host:port, http://host:port or https://host:port; default
    /// 127.0.0.1:7070).
    #[arg(long, global = true, env = "BT_COORDINATOR")]
    coordinator: Option<String>,
    /// File holding your token (or put the token itself in BT_TOKEN).
    #[arg(long, global = true, env = "BT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the coordinator's certificate: TLS, server verified.
    #[arg(long, global = true, env = "BT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Client certificate and key (PEM) when the coordinator asks for one.
    #[arg(long, global = true, env = "BT_CLIENT_CERT")]
    client_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "BT_CLIENT_KEY")]
    client_key: Option<PathBuf>,
    /// btctl's config file (TOML: coordinator, token_file, ca_cert, client_cert, client_key).
    #[arg(long, global = true, env = "BT_CONFIG")]
    config: Option<PathBuf>,
}

/// btctl's config file.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    coordinator: Option<String>,
    token_file: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

impl Conn {
    fn options(&self) -> Result<bt_proto::client::ClientOptions> {
        let default_file = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".config/bt/btctl.toml"))
            .filter(|p| p.exists());
        let file: FileConfig = match self.config.clone().or(default_file) {
            Some(p) => {
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read btctl config {}", p.display()))?;
                toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("btctl config {}: {}", p.display(), e.message()))?
            }
            None => FileConfig::default(),
        };
        let token_file = self.token_file.clone().or(file.token_file);
        let token = match (
            std::env::var("BT_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty()),
            &token_file,
        ) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => Some(bt_proto::client::read_token_file(f)?),
            (None, None) => None,
        };
        Ok(bt_proto::client::ClientOptions {
            addr: self
                .coordinator
                .clone()
                .or(file.coordinator)
                .unwrap_or_else(|| "127.0.0.1:7070".into()),
            token,
            ca_cert: self.ca_cert.clone().or(file.ca_cert),
            client_cert: self.client_cert.clone().or(file.client_cert),
            client_key: self.client_key.clone().or(file.client_key),
            tls_domain: None,
            connect_timeout: Some(std::time::Duration::from_secs(5)),
        })
    }
}

pub(crate) type Client = JobServiceClient<bt_proto::client::AuthChannel>;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

/// A job state, as `btctl list --state` takes it.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum StateFilter {
    Queued,
    Scheduled,
    Running,
    Restarting,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StateFilter> for JobState {
    fn from(s: StateFilter) -> Self {
        match s {
            StateFilter::Queued => JobState::Queued,
            StateFilter::Scheduled => JobState::Scheduled,
            StateFilter::Running => JobState::Running,
            StateFilter::Restarting => JobState::Restarting,
            StateFilter::Succeeded => JobState::Succeeded,
            StateFilter::Failed => JobState::Failed,
            StateFilter::Cancelled => JobState::Cancelled,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Submit a job spec (TOML); prints the job id.
    Submit {
        file: PathBuf,
        /// Override a spec field, e.g. --set train.batch_size=64 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Check the spec and print it with every default filled in; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Follow the job's progress after submitting (like `btctl watch`).
        #[arg(long)]
        watch: bool,
    },
    /// Submit a linear-probe job for a committed checkpoint (frozen backbone, linear classifier);
    /// prints the job id.
    Eval {
        /// The checkpoint directory (as listed by `btctl checkpoints`).
        checkpoint: String,
        /// Override a spec field, e.g. --set eval.probe_epochs=20 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Follow the probe's progress after submitting.
        #[arg(long)]
        watch: bool,
    },
    /// List jobs, newest first.
    #[command(
        after_help = "Examples:\n  btctl list --state running --state queued\n  btctl list --state failed --limit 5 -o json"
    )]
    List {
        #[arg(short, long, value_enum, default_value = "text")]
        output: Format,
        /// Only jobs in this state (repeatable; default: every state).
        #[arg(long = "state", value_enum)]
        states: Vec<StateFilter>,
        /// At most this many jobs (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Show one job: state, placement, failure reason, latest metrics and evaluations.
    Get {
        job_id: String,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Format,
    },
    /// Stream a job's progress until it ends; exits 0 if it succeeded, 1 if it failed, 3 if cancelled.
    Watch {
        job_id: String,
        /// Replay history from this step.
        #[arg(long, default_value_t = 0)]
        from_step: u64,
        /// Print one line per event instead of a progress bar.
        #[arg(long)]
        plain: bool,
    },
    /// Cancel a job (its trainers are stopped).
    Cancel {
        job_id: String,
        #[arg(long, default_value = "cancelled by user")]
        reason: String,
    },
    /// List worker daemons and their devices.
    Workers {
        #[arg(short, long, value_enum, default_value = "text")]
        output: Format,
    },
    /// Drain a worker (admins): nothing more is placed on it, and its trainers checkpoint and
    /// stop, so their jobs requeue on other workers without spending their restart budget. The
    /// drain holds (across restarts) until `btctl undrain`.
    Drain {
        /// The worker's name or id (see `btctl workers`).
        worker: String,
        /// Why (shown by `btctl workers`).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Let a drained worker take work again.
    Undrain {
        /// The worker's name or id.
        worker: String,
    },
    /// List a job's committed checkpoints.
    Checkpoints {
        job_id: String,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Format,
    },
    /// Export a checkpoint's backbone as a PyTorch state dict with torchvision's key names
    /// (.pth: torch.save format; .safetensors), after verifying its hashes; prints a snippet
    /// that loads it.
    #[command(
        after_help = "Examples:\n  btctl export JOB -o backbone.pth          the job's newest checkpoint\n  \
                            btctl export JOB@600 -o backbone.safetensors\n  \
                            btctl export runs/demo/checkpoints/JOB/00000600 -o b.pth --projector"
    )]
    Export {
        /// A checkpoint directory (as `btctl checkpoints` lists it), `JOB` (its newest committed
        /// checkpoint) or `JOB@STEP`.
        checkpoint: String,
        /// The file to write: .pth / .pt or .safetensors.
        #[arg(short, long)]
        output: PathBuf,
        /// Include the projector (keys `projector.*`).
        #[arg(long)]
        projector: bool,
    },
    /// Print a job's trainer log lines (every rank's stderr, relayed by the daemons); with
    /// --follow, wait for a job that has not started and stream new lines until it ends.
    #[command(
        after_help = "Examples:\n  btctl logs JOB -f                  every rank, following until the job ends\n  \
                            btctl logs JOB --rank 1 --tail 5   the last five lines of rank 1"
    )]
    Logs {
        job_id: String,
        /// Only this rank (repeatable; default: every rank, each line prefixed with its rank).
        #[arg(long = "rank", value_name = "R")]
        ranks: Vec<u32>,
        /// Stream new lines until the job ends.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines so far (0: all).
        #[arg(long, default_value_t = 0, value_name = "N")]
        tail: u32,
        /// Prefix each line with the time the daemon read it (UTC).
        #[arg(long)]
        timestamps: bool,
    },
    /// Delete a finished job: its record, events, checkpoint records and log lines (refused for a
    /// job still running and for one whose checkpoint is being evaluated).
    #[command(
        after_help = "Examples:\n  btctl delete JOB\n  btctl delete JOB --files   also remove its checkpoint files"
    )]
    Delete {
        job_id: String,
        /// Also remove the job's checkpoint files from the checkpoint root.
        #[arg(long)]
        files: bool,
    },
    /// Write a job's persisted history (training metrics, evaluations) as TensorBoard event
    /// files under DIR/JOB (view with `tensorboard --logdir DIR`).
    Tensorboard { job_id: String, dir: PathBuf },
    /// Print a shell completion script, e.g. `btctl completion bash > ~/.local/share/bash-completion/completions/btctl`.
    Completion { shell: clap_complete::Shell },
}

async fn connect(conn: &Conn) -> Result<Client> {
    let opts = conn.options()?;
    let ch = opts.connect().await.map_err(|e| {
        anyhow::anyhow!("{e} (set --coordinator or BT_COORDINATOR; with TLS, --ca-cert)")
    })?;
    Ok(JobServiceClient::new(ch).max_decoding_message_size(64 << 20))
}

/// Turns a gRPC status into a one-line error a person can act on.
fn rpc_err(s: tonic::Status) -> anyhow::Error {
    let hint = match s.code() {
        tonic::Code::Unauthenticated => {
            " (give a token: --token-file, BT_TOKEN_FILE, BT_TOKEN or token_file in the config file)"
        }
        tonic::Code::PermissionDenied => " (your token's role does not allow this)",
        _ => "",
    };
    anyhow::anyhow!("{:?}: {}{hint}", s.code(), s.message())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Submit {
            file,
            set,
            dry_run,
            watch,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read job spec {}", file.display()))?;
            let spec = bt_common::JobSpec::from_toml_with_overrides(&text, &set)
                .map_err(|e| anyhow::anyhow!("invalid job spec {}: {e}", file.display()))?;
            if dry_run {
                print!("{}", spec.to_toml());
                return Ok(ExitCode::SUCCESS);
            }
            return submit(&cli.conn, &spec, watch).await;
        }
        Cmd::Eval {
            checkpoint,
            set,
            watch,
        } => {
            let base = probe_spec_toml(&checkpoint)?;
            let spec = bt_common::JobSpec::from_toml_with_overrides(&base, &set)
                .map_err(|e| anyhow::anyhow!("invalid probe spec: {e}"))?;
            return submit(&cli.conn, &spec, watch).await;
        }
        Cmd::List {
            output,
            states,
            limit,
        } => {
            let mut c = connect(&cli.conn).await?;
            let states: Vec<i32> = states
                .into_iter()
                .map(|s| JobState::from(s) as i32)
                .collect();
            // Page by page (the coordinator caps each page at its limits.max_page_size).
            let (mut jobs, mut token) = (Vec::new(), String::new());
            loop {
                let page = c
                    .list_jobs(ListJobsRequest {
                        states: states.clone(),
                        limit,
                        page_token: token,
                        page_size: 0,
                    })
                    .await
                    .map_err(rpc_err)?
                    .into_inner();
                jobs.extend(page.jobs);
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            output::print_jobs(&jobs, output == Format::Json);
        }
        Cmd::Get { job_id, output } => {
            let mut c = connect(&cli.conn).await?;
            let job = c
                .get_job(GetJobRequest { job_id })
                .await
                .map_err(rpc_err)?
                .into_inner();
            output::print_job(&job, output == Format::Json);
        }
        Cmd::Watch {
            job_id,
            from_step,
            plain,
        } => {
            let mut c = connect(&cli.conn).await?;
            return watch::watch(&mut c, &job_id, from_step, plain).await;
        }
        Cmd::Cancel { job_id, reason } => {
            let mut c = connect(&cli.conn).await?;
            let job = c
                .cancel_job(CancelJobRequest { job_id, reason })
                .await
                .map_err(rpc_err)?
                .into_inner();
            println!("{} {}", job.id, job.state().name());
        }
        Cmd::Workers { output } => {
            let mut c = connect(&cli.conn).await?;
            let (mut ws, mut token) = (Vec::new(), String::new());
            loop {
                let page = c
                    .list_workers(ListWorkersRequest {
                        page_token: token,
                        page_size: 0,
                    })
                    .await
                    .map_err(rpc_err)?
                    .into_inner();
                ws.extend(page.workers);
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            output::print_workers(&ws, output == Format::Json);
        }
        Cmd::Drain { worker, reason } => {
            let w = drain(&cli.conn, worker, reason, false).await?;
            println!("worker {} drained: {}", w.name, w.drained);
        }
        Cmd::Undrain { worker } => {
            let w = drain(&cli.conn, worker, String::new(), true).await?;
            println!("worker {} takes work again", w.name);
        }
        Cmd::Checkpoints { job_id, output } => {
            let mut c = connect(&cli.conn).await?;
            let cps = c
                .list_checkpoints(ListCheckpointsRequest { job_id })
                .await
                .map_err(rpc_err)?
                .into_inner()
                .checkpoints;
            output::print_checkpoints(&cps, output == Format::Json);
        }
        Cmd::Export {
            checkpoint,
            output,
            projector,
        } => export::export(&cli.conn, &checkpoint, &output, projector).await?,
        Cmd::Logs {
            job_id,
            ranks,
            follow,
            tail,
            timestamps,
        } => {
            let mut c = connect(&cli.conn).await?;
            let prefix = ranks.len() != 1;
            let mut stream = c
                .stream_logs(StreamLogsRequest {
                    job_id,
                    ranks,
                    tail,
                    follow,
                })
                .await
                .map_err(rpc_err)?
                .into_inner();
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            while let Some(line) = stream.message().await.map_err(rpc_err)? {
                let mut head = String::new();
                if timestamps {
                    head.push_str(&output::utc_time(line.time_ms));
                    head.push(' ');
                }
                if prefix {
                    head.push_str(&format!("[rank {}] ", line.rank));
                }
                if writeln!(out, "{head}{}", line.text).is_err() {
                    break; // a closed pipe (| head): done
                }
                if follow {
                    let _ = out.flush();
                }
            }
        }
        Cmd::Delete { job_id, files } => {
            let mut c = connect(&cli.conn).await?;
            let d = c
                .delete_job(DeleteJobRequest {
                    job_id: job_id.clone(),
                    delete_files: files,
                })
                .await
                .map_err(rpc_err)?
                .into_inner();
            print!(
                "{job_id} deleted: {} events, {} checkpoint records, {} log lines",
                d.events, d.checkpoints, d.log_lines
            );
            if files {
                print!(", {} checkpoint directories removed", d.files_removed);
            }
            println!();
        }
        Cmd::Tensorboard { job_id, dir } => {
            tensorboard::tensorboard(&cli.conn, &job_id, &dir).await?
        }
        Cmd::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "btctl", &mut std::io::stdout())
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends a validated spec; prints the job id, then follows it when asked.
/// Drains (or, with `undo`, undrains) a worker; returns it as the coordinator now has it.
async fn drain(conn: &Conn, worker: String, reason: String, undo: bool) -> Result<Worker> {
    let mut c = connect(conn).await?;
    Ok(c.drain_worker(DrainWorkerRequest {
        worker,
        reason,
        undo,
    })
    .await
    .map_err(rpc_err)?
    .into_inner())
}

async fn submit(conn: &Conn, spec: &bt_common::JobSpec, watch: bool) -> Result<ExitCode> {
    let mut c = connect(conn).await?;
    let job = c
        .submit_job(SubmitJobRequest {
            spec_toml: spec.to_toml(),
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    println!("{}", job.id);
    if watch {
        return watch::watch(&mut c, &job.id, 0, false).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// The base spec of `btctl eval`: a linear probe of `checkpoint`, built as a TOML value (the
/// serializer quotes the path, whatever it holds).
fn probe_spec_toml(checkpoint: &str) -> anyhow::Result<String> {
    let mut eval = toml::Table::new();
    eval.insert("checkpoint".into(), checkpoint.into());
    let mut spec = toml::Table::new();
    spec.insert("kind".into(), "linear_probe".into());
    spec.insert("name".into(), "probe".into());
    spec.insert("eval".into(), eval.into());
    Ok(toml::to_string(&spec)?)
}

/// Exit code of `watch` for a job's final state.
pub(crate) fn exit_for(state: JobState) -> Result<ExitCode> {
    Ok(match state {
        JobState::Succeeded => ExitCode::SUCCESS,
        JobState::Failed => ExitCode::from(1),
        JobState::Cancelled => ExitCode::from(3),
        s => bail!("the watch ended while the job was {}", s.name()),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_probe_spec_quotes_any_checkpoint_path() {
        let path = "/ck/a \"quoted\" \\ back\tslash/10";
        let spec =
            bt_common::JobSpec::from_toml_str(&super::probe_spec_toml(path).unwrap()).unwrap();
        assert_eq!(spec.eval.checkpoint, path);
        assert_eq!(spec.kind, bt_common::JobKind::LinearProbe);
    }
}
