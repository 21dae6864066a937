//! bt-dist-probe: one rank of a c10d process group, for multi-process tests and benchmarks.
//!
//! `bt-dist-probe --rank R --world W --port P bench` prints collective timings (rank 0);
//! `... loop` all-reduces until a peer fails (exit code 3 with the error on stderr), so tests can
//! kill a rank and watch the others fail within the timeout.
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bt_worker::dist::{bench, Backend, ProcessGroup, Rendezvous};
use clap::{Parser, Subcommand};
use tch::{Kind, Tensor};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    world: usize,
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    #[arg(long)]
    port: u16,
    /// Rendezvous and collective timeout, seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Intra-op threads for libtorch.
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// Use NCCL on CUDA device `rank` (needs a build with `--features nccl`).
    #[arg(long)]
    nccl: bool,
    /// Build the backend even at --world 1 (a one-GPU NCCL check runs real collectives).
    #[arg(long)]
    join_alone: bool,
    /// The store prefix every rank of the group shares (a real job's is the attempt's secret).
    #[arg(long, default_value = bt_worker::dist::DEFAULT_STORE_PREFIX)]
    store_prefix: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print collective timings from rank 0.
    Bench {
        #[arg(long, value_delimiter = ',', default_value = "25,100")]
        bucket_mb: Vec<usize>,
        #[arg(long, default_value_t = 100)]
        grad_mb: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// All-reduce in a loop for up to `seconds`; prints "ready" once joined.
    Loop {
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
    },
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(3);
        }
    }
}

fn run(args: Args) -> Result<()> {
    tch::set_num_threads(args.threads);
    let mut rv = Rendezvous::new(
        args.rank,
        args.world,
        args.master_addr.clone(),
        args.port,
        Duration::from_secs_f64(args.timeout),
    );
    rv.join_alone = args.join_alone;
    rv.store_prefix = args.store_prefix.clone();
    if args.nccl {
        rv.backend = Backend::Nccl {
            device_index: args.rank,
        };
    }
    let t = Instant::now();
    let pg = ProcessGroup::new(&rv).context("joining the process group")?;
    let join_ms = t.elapsed().as_secs_f64() * 1e3;
    match args.cmd {
        Cmd::Bench {
            bucket_mb,
            grad_mb,
            reps,
        } => {
            let rows = bench::run(&pg, &bucket_mb, grad_mb, 64, 8192, reps)?;
            if pg.rank() == 0 {
                println!(
                    "rust-c10d W={} rendezvous: {join_ms:.1} ms",
                    pg.world_size()
                );
                for r in rows {
                    let bw = if r.bytes > 0 && r.name.starts_with("all") {
                        format!(" ({:.2} GB/s)", r.gb_per_s())
                    } else {
                        String::new()
                    };
                    println!(
                        "rust-c10d W={} {}: {:.2} ms{bw}",
                        pg.world_size(),
                        r.name,
                        r.median_ms
                    );
                }
            }
        }
        Cmd::Loop { seconds } => {
            println!("ready rank {}", pg.rank());
            let end = Instant::now() + Duration::from_secs_f64(seconds);
            let t = Tensor::ones([1024], (Kind::Float, pg.device()));
            while Instant::now() < end {
                pg.all_reduce_sum(&t)?;
                let _ = t.shallow_clone().fill_(1.0);
                std::thread::sleep(Duration::from_millis(20));
            }
            bail!("loop ended without a failure");
        }
    }
    Ok(())
}
