//! A few SGD steps of a tiny BN network give the same result whatever the world size.
use anyhow::Result;
use bt_worker::dist::{sync_batch_norm, ProcessGroup};
use tch::{Device, Kind, Tensor};

use crate::harness::*;

/// A small Barlow-Twins-shaped network built from explicit tensors (no global RNG, so every
/// thread builds the same one): conv → BN → ReLU → pool → linear → BN1d → ReLU → linear.
struct TinyNet {
    params: Vec<Tensor>,
    running: Vec<Tensor>,
}

impl TinyNet {
    fn new() -> Self {
        let p = |shape: &[i64], salt: f64, scale: f64| {
            (data(shape, salt) * scale).set_requires_grad(true)
        };
        let params = vec![
            p(&[6, 3, 3, 3], 0.1, 0.4),                            // conv
            (data(&[6], 0.2) * 0.1 + 1.0).set_requires_grad(true), // bn2d weight
            p(&[6], 0.3, 0.1),                                     // bn2d bias
            p(&[8, 6], 0.4, 0.5),                                  // linear 1
            (data(&[8], 0.5) * 0.1 + 1.0).set_requires_grad(true), // bn1d weight
            p(&[8], 0.6, 0.1),                                     // bn1d bias
            p(&[5, 8], 0.7, 0.5),                                  // linear 2
        ];
        let running = vec![
            Tensor::zeros([6], (Kind::Float, Device::Cpu)),
            Tensor::ones([6], (Kind::Float, Device::Cpu)),
            Tensor::zeros([8], (Kind::Float, Device::Cpu)),
            Tensor::ones([8], (Kind::Float, Device::Cpu)),
        ];
        TinyNet { params, running }
    }

    fn bn(&self, x: &Tensor, i: usize, r: usize, g: Option<&ProcessGroup>) -> Result<Tensor> {
        let (w, b) = (&self.params[i], &self.params[i + 1]);
        let (rm, rv) = (&self.running[r], &self.running[r + 1]);
        Ok(match g {
            Some(g) => sync_batch_norm(
                g,
                std::slice::from_ref(x),
                Some(w),
                Some(b),
                rm,
                rv,
                0.1,
                1e-5,
            )?
            .remove(0),
            None => x.f_batch_norm(Some(w), Some(b), Some(rm), Some(rv), true, 0.1, 1e-5, false)?,
        })
    }

    fn forward(&self, x: &Tensor, g: Option<&ProcessGroup>) -> Result<Tensor> {
        let h = x.conv2d(&self.params[0], None::<Tensor>, [1], [1], [1], 1);
        let h = self
            .bn(&h, 1, 0, g)?
            .relu()
            .mean_dim([2, 3].as_slice(), false, Kind::Float);
        let h = h.linear(&self.params[3], None::<Tensor>);
        let h = self.bn(&h, 4, 2, g)?.relu();
        Ok(h.linear(&self.params[6], None::<Tensor>))
    }
}

/// `steps` SGD steps of the tiny net on the global batch of `n` images split over the group's
/// ranks; returns the loss of every step and the final parameters and running statistics.
/// `sync_bn` false normalises with local statistics only (what SyncBN exists to avoid).
fn train_tiny(
    pg: &ProcessGroup,
    n: i64,
    steps: usize,
    sync_bn: bool,
) -> Result<(Vec<f64>, Vec<Tensor>)> {
    let net = TinyNet::new();
    let b = n / pg.world_size() as i64;
    let group = sync_bn.then_some(pg);
    let mut losses = Vec::new();
    let mut buckets = pg.grad_buckets(&net.params, 1 << 10)?;
    for step in 0..steps {
        let images = data(&[n, 3, 6, 6], step as f64 * 0.31);
        let local = images.narrow(0, pg.rank() as i64 * b, b);
        let view_a = local.copy();
        let view_b = local.flip([3]) * 0.8 + 0.1;
        let za = pg.all_gather_with_grad(&net.forward(&view_a, group)?)?;
        let zb = pg.all_gather_with_grad(&net.forward(&view_b, group)?)?;
        // Barlow Twins: standardize over the global batch, cross-correlation, invariance +
        // redundancy reduction
        let std = |z: &Tensor| {
            (z - z.mean_dim(0, true, Kind::Float)) / (z.std_dim(0, false, true) + 1e-5)
        };
        let c = std(&za).transpose(0, 1).matmul(&std(&zb)) / n as f64;
        let diag = c.diagonal(0, 0, 1);
        let on = (diag.ones_like() - &diag)
            .pow_tensor_scalar(2)
            .sum(Kind::Float);
        let off =
            c.pow_tensor_scalar(2).sum(Kind::Float) - diag.pow_tensor_scalar(2).sum(Kind::Float);
        let loss = on + off * 0.05;
        losses.push(loss.double_value(&[]));
        for p in &net.params {
            p.grad().defined().then(|| p.grad().zero_());
        }
        loss.f_backward()?;
        buckets.all_reduce()?; // tiny buckets: several all-reduces
        tch::no_grad(|| {
            for p in &net.params {
                let _ = p.shallow_clone().f_sub_(&(p.grad() * 0.05));
            }
        });
    }
    let mut state: Vec<Tensor> = net.params.iter().map(|p| p.detach().copy()).collect();
    state.extend(net.running.iter().map(|t| t.copy()));
    Ok((losses, state))
}

fn run_tiny(world: usize, sync_bn: bool) -> (Vec<f64>, Vec<Tensor>) {
    let mut out = all_ok(run_ranks(world, TIMEOUT, move |pg| {
        train_tiny(&pg, 16, 4, sync_bn)
    }));
    for (rank, (losses, _)) in out.iter().enumerate() {
        assert_eq!(
            losses, &out[0].0,
            "rank {rank} computed a different loss than rank 0"
        );
    }
    out.swap_remove(0)
}

#[test]
fn training_steps_do_not_depend_on_the_world_size() {
    let (loss1, state1) = run_tiny(1, true);
    for world in [2, 4] {
        let (loss, state) = run_tiny(world, true);
        for (s, (a, b)) in loss.iter().zip(&loss1).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
                "W={world} step {s}: loss {a} vs {b}"
            );
        }
        for (i, (a, b)) in state.iter().zip(&state1).enumerate() {
            assert_close(&format!("W={world} tensor {i}"), a, b, 1e-4).unwrap();
        }
    }
    // Without SyncBN each rank normalises with its own statistics: a different computation.
    let (loss_local, _) = run_tiny(2, false);
    eprintln!("losses W=1: {loss1:?}; W=2 with local BN: {loss_local:?}");
    let gap = (loss_local[0] - loss1[0]).abs();
    assert!(
        gap > 1e-3 * loss1[0].abs(),
        "local BN should change the loss: {} vs {}",
        loss_local[0],
        loss1[0]
    );
}
