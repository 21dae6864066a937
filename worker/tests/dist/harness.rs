//! Running ranks as threads, each with its own process group on a fresh loopback port, and
//! tensor comparisons.
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bt_worker::dist::{ProcessGroup, Rendezvous};
use tch::{Device, Kind, Tensor};

pub(crate) const TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) fn free_port() -> u16 {
    bt_common::net::free_loopback_port().expect("a free port")
}

pub(crate) fn rendezvous(rank: usize, world: usize, port: u16, timeout: Duration) -> Rendezvous {
    Rendezvous::new(rank, world, "127.0.0.1", port, timeout)
}

/// Runs `f(group)` on `world` ranks (threads) and returns every rank's result, in rank order.
pub(crate) fn run_ranks<T, F>(world: usize, timeout: Duration, f: F) -> Vec<Result<T>>
where
    T: Send + 'static,
    F: Fn(ProcessGroup) -> Result<T> + Send + Sync + 'static,
{
    let port = free_port();
    let f = Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || -> Result<T> {
                let pg = ProcessGroup::new(&rendezvous(rank, world, port, timeout))
                    .with_context(|| format!("rank {rank} joining"))?;
                f(pg).with_context(|| format!("rank {rank}"))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("rank panicked")))
        })
        .collect()
}

pub(crate) fn all_ok<T>(results: Vec<Result<T>>) -> Vec<T> {
    results
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r} failed: {e:#}")))
        .collect()
}

/// Deterministic "random" data without the global RNG (shared by threads).
pub(crate) fn data(shape: &[i64], salt: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.7548776662 + salt)
        .sin()
        .multiply_scalar(1.7)
        .to_kind(Kind::Float)
        .view(shape)
}

pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

pub(crate) fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    ensure!(
        a.size() == b.size(),
        "{what}: shapes {:?} vs {:?}",
        a.size(),
        b.size()
    );
    let scale = b.abs().max().double_value(&[]).max(1.0);
    let d = max_diff(a, b);
    ensure!(
        d <= tol * scale,
        "{what}: max difference {d} > {tol} (scale {scale})"
    );
    Ok(())
}
