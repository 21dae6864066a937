//! btctl: the command line of bt. Talks to the coordinator over gRPC.
mod output;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bt_proto::job_service_client::JobServiceClient;
use bt_proto::*;
use clap::{Parser, Subcommand, ValueEnum};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "btctl",
    version,
    about = "Submit and follow Barlow Twins pretraining jobs"
)]
struct Cli {
    /// Coordinator address (host:port or http://host:port).
    #[arg(
        long,
        global = true,
        env = "BT_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Text,
    Json,
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
    /// List jobs.
    List {
        #[arg(short, long, value_enum, default_value = "text")]
        output: Format,
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
    /// List a job's committed checkpoints.
    Checkpoints {
        job_id: String,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Format,
    },
}

fn endpoint(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

async fn connect(addr: &str) -> Result<JobServiceClient<Channel>> {
    let url = endpoint(addr);
    let ch = Channel::from_shared(url.clone())
        .with_context(|| format!("bad coordinator address {addr:?}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach the coordinator at {url} (set --coordinator or BT_COORDINATOR)")
        })?;
    Ok(JobServiceClient::new(ch).max_decoding_message_size(64 << 20))
}

/// Turns a gRPC status into a one-line error a person can act on.
fn rpc_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
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
            return submit(&cli.coordinator, &spec, watch).await;
        }
        Cmd::Eval {
            checkpoint,
            set,
            watch,
        } => {
            let base = format!(
                "kind = \"linear_probe\"\nname = \"probe\"\n[eval]\ncheckpoint = {}\n",
                toml_string(&checkpoint)
            );
            let spec = bt_common::JobSpec::from_toml_with_overrides(&base, &set)
                .map_err(|e| anyhow::anyhow!("invalid probe spec: {e}"))?;
            return submit(&cli.coordinator, &spec, watch).await;
        }
        Cmd::List { output } => {
            let mut c = connect(&cli.coordinator).await?;
            let jobs = c
                .list_jobs(ListJobsRequest::default())
                .await
                .map_err(rpc_err)?
                .into_inner()
                .jobs;
            output::print_jobs(&jobs, output == Format::Json);
        }
        Cmd::Get { job_id, output } => {
            let mut c = connect(&cli.coordinator).await?;
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
            let mut c = connect(&cli.coordinator).await?;
            return watch::watch(&mut c, &job_id, from_step, plain).await;
        }
        Cmd::Cancel { job_id, reason } => {
            let mut c = connect(&cli.coordinator).await?;
            let job = c
                .cancel_job(CancelJobRequest { job_id, reason })
                .await
                .map_err(rpc_err)?
                .into_inner();
            println!("{} {}", job.id, job.state().name());
        }
        Cmd::Workers { output } => {
            let mut c = connect(&cli.coordinator).await?;
            let ws = c
                .list_workers(ListWorkersRequest {})
                .await
                .map_err(rpc_err)?
                .into_inner()
                .workers;
            output::print_workers(&ws, output == Format::Json);
        }
        Cmd::Checkpoints { job_id, output } => {
            let mut c = connect(&cli.coordinator).await?;
            let cps = c
                .list_checkpoints(ListCheckpointsRequest { job_id })
                .await
                .map_err(rpc_err)?
                .into_inner()
                .checkpoints;
            output::print_checkpoints(&cps, output == Format::Json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends a validated spec; prints the job id, then follows it when asked.
async fn submit(addr: &str, spec: &bt_common::JobSpec, watch: bool) -> Result<ExitCode> {
    let mut c = connect(addr).await?;
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

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
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
