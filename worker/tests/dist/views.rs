//! The model's forward of both views layer by layer (one SyncBN meeting per layer for both)
//! against a forward of each view in turn: the same values to the bit.
use anyhow::{ensure, Result};
use bt_worker::amp::{to_channels_last, with_autocast, MemoryFormat, Precision};
use bt_worker::dist::{sync_batch_norm, ProcessGroup};
use bt_worker::model::{Arch, BarlowTwinsModel, ModelConfig, TensorRole};
use std::sync::Arc;
use tch::{nn, Device, Kind, Tensor};

use crate::harness::*;

/// A small ResNet-18 (CIFAR stem, width 8) + projector with SyncBN, every tensor set from
/// `data` (no global RNG: every thread builds the same one), in `layout`.
fn tiny_model(
    pg: Arc<ProcessGroup>,
    layout: MemoryFormat,
) -> Result<(nn::VarStore, BarlowTwinsModel)> {
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = ModelConfig {
        cifar_stem: true,
        width: 8,
        projector: vec![32, 16],
        ..ModelConfig::new(Arch::Resnet18)
    };
    let mut m = BarlowTwinsModel::new(&vs.root(), &cfg)?;
    let params: Vec<Tensor> = m.parameters().into_iter().map(|t| t.tensor).collect();
    tch::no_grad(|| -> Result<()> {
        for (i, t) in params.iter().enumerate() {
            let v = data(&t.size(), i as f64) * 0.3 + if t.dim() == 1 { 1.0 } else { 0.0 };
            t.shallow_clone().f_copy_(&v)?;
        }
        Ok(())
    })?;
    layout.apply_to_weights(&params)?;
    m.set_group(Some(pg));
    Ok((vs, m))
}

/// One training forward and backward of two views on this rank's share: `together` steps them
/// through the model at once, otherwise one after the other. Returns the embeddings, then every
/// parameter's gradient, then every buffer.
fn step(
    pg: Arc<ProcessGroup>,
    together: bool,
    precision: Precision,
    layout: MemoryFormat,
) -> Result<Vec<Tensor>> {
    let salt = pg.rank() as f64;
    let (_vs, m) = tiny_model(pg, layout)?;
    let views = [
        layout.apply(&data(&[4, 3, 16, 16], 0.5 + salt))?,
        layout.apply(&data(&[4, 3, 16, 16], 1.5 + salt))?,
    ];
    let z = with_autocast(precision, Device::Cpu, || {
        let z = if together {
            m.forward_views(&views, true)?
        } else {
            vec![m.forward(&views[0], true)?, m.forward(&views[1], true)?]
        };
        Ok(z.iter().map(|t| t.to_kind(Kind::Float)).collect::<Vec<_>>())
    })?;
    let loss = (&z[0] * &z[1]).sum(Kind::Float) + (&z[0] - 0.5).square().sum(Kind::Float);
    loss.f_backward()?;
    let mut out: Vec<Tensor> = z.iter().map(Tensor::detach).collect();
    for t in m.state() {
        out.push(match t.role {
            TensorRole::Parameter => t.tensor.grad(),
            TensorRole::Buffer => t.tensor.copy(),
        });
    }
    Ok(out)
}

fn check_views_together(world: usize, precision: Precision, layout: MemoryFormat) {
    for (rank, (apart, together)) in all_ok(run_ranks(world, TIMEOUT, move |pg| {
        let pg = Arc::new(pg);
        Ok((
            step(Arc::clone(&pg), false, precision, layout)?,
            step(pg, true, precision, layout)?,
        ))
    }))
    .into_iter()
    .enumerate()
    {
        assert_eq!(apart.len(), together.len());
        for (i, (a, t)) in apart.iter().zip(&together).enumerate() {
            assert!(
                a.defined() && a.equal(t),
                "world {world}, rank {rank}: tensor {i} of {} differs by {}",
                apart.len(),
                max_diff(&a.to_kind(Kind::Double), &t.to_kind(Kind::Double))
            );
        }
    }
}

#[test]
fn both_views_through_the_model_together_match_one_after_the_other_bit_for_bit() {
    check_views_together(2, Precision::Fp32, MemoryFormat::Contiguous);
    check_views_together(2, Precision::Fp32, MemoryFormat::ChannelsLast);
    check_views_together(1, Precision::Fp32, MemoryFormat::Contiguous);
    // bf16 at one rank only: ranks that are threads of one process make a bf16 matmul's
    // gradient vary from run to run, in either order (trainers are processes of their own); the
    // synchronized batch norm's bf16 views are checked on their own below.
    check_views_together(1, Precision::Bf16, MemoryFormat::ChannelsLast);
}

/// This rank's outputs, input gradients and the parameters' gradients and running statistics of
/// two views through one synchronized batch norm, together or in two calls.
fn bn_views(
    pg: &ProcessGroup,
    shape: &[i64],
    bf16_cl: bool,
    together: bool,
) -> Result<Vec<Tensor>> {
    let c = shape[1];
    let salt = pg.rank() as f64;
    let prepare = |x: Tensor| -> Result<Tensor> {
        let x = if bf16_cl {
            to_channels_last(&x.to_kind(Kind::BFloat16))?
        } else {
            x
        };
        Ok(x.set_requires_grad(true))
    };
    let xs = [
        prepare(data(shape, salt) * 2.0 + 1.0)?,
        prepare(data(shape, salt + 0.5) - 0.3)?,
    ];
    let w = (data(&[c], 0.5) + 1.0).set_requires_grad(true);
    let b = data(&[c], 4.0).set_requires_grad(true);
    let (rm, rv) = (data(&[c], 7.0) * 0.1, data(&[c], 8.0).abs() + 0.5);
    let ys = if together {
        sync_batch_norm(pg, &xs, Some(&w), Some(&b), &rm, &rv, 0.1, 1e-5)?
    } else {
        let mut ys = Vec::new();
        for x in &xs {
            let one = std::slice::from_ref(x);
            ys.extend(sync_batch_norm(
                pg,
                one,
                Some(&w),
                Some(&b),
                &rm,
                &rv,
                0.1,
                1e-5,
            )?);
        }
        ys
    };
    let (ya, yb) = (ys[0].to_kind(Kind::Float), ys[1].to_kind(Kind::Float));
    let r = data(&ya.size(), 2.9);
    let loss = (&ya * &r).sum(Kind::Float) + (&ya * &yb).sum(Kind::Float) * 0.1;
    loss.f_backward()?;
    Ok(vec![
        ya,
        yb,
        xs[0].grad(),
        xs[1].grad(),
        w.grad(),
        b.grad(),
        rm,
        rv,
    ])
}

#[test]
fn sync_batch_norm_views_match_one_call_per_view_bit_for_bit() {
    for (shape, bf16_cl) in [
        (&[8i64, 6, 4, 5][..], true),
        (&[8, 6, 4, 5], false),
        (&[6, 7], false),
    ] {
        let shape = shape.to_vec();
        for (rank, (apart, together)) in all_ok(run_ranks(2, TIMEOUT, move |pg| {
            Ok((
                bn_views(&pg, &shape, bf16_cl, false)?,
                bn_views(&pg, &shape, bf16_cl, true)?,
            ))
        }))
        .into_iter()
        .enumerate()
        {
            for (i, (a, t)) in apart.iter().zip(&together).enumerate() {
                assert!(
                    a.equal(t),
                    "rank {rank}, bf16/channels-last {bf16_cl}: tensor {i} differs"
                );
            }
        }
    }
}

#[test]
fn sync_batch_norm_views_that_disagree_are_an_error() {
    for r in run_ranks(2, TIMEOUT, |pg| -> Result<()> {
        let (rm, rv) = (
            Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            Tensor::ones([4], (Kind::Float, Device::Cpu)),
        );
        let views = [data(&[3, 4], 0.1), data(&[3, 5], 0.2)];
        let err = sync_batch_norm(&pg, &views, None, None, &rm, &rv, 0.1, 1e-5)
            .expect_err("views with different channel counts accepted");
        ensure!(err.to_string().contains("share the channel count"), "{err}");
        Ok(())
    }) {
        r.unwrap();
    }
}
