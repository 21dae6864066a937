//! Synchronized batch norm against plain batch norm over the global batch.
use anyhow::Result;
use bt_worker::amp::{is_channels_last, to_channels_last};
use bt_worker::dist::{sync_batch_norm, ProcessGroup};
use tch::{Kind, Tensor};

use crate::harness::*;

struct BnResult {
    y: Tensor,
    dx: Tensor,
    dw: Tensor,
    db: Tensor,
    rm: Tensor,
    rv: Tensor,
}

/// The input's precision and layout: float32 contiguous, what the demo's bf16 + channels-last
/// trainer feeds SyncBN (bf16 activations, float parameters and statistics), and the other two
/// pairings (SyncBN's fused CPU backward has one loop for whole planes, one for channels
/// innermost, each for float and bf16).
#[derive(Clone, Copy)]
enum Input {
    Float,
    FloatChannelsLast,
    Bf16,
    Bf16ChannelsLast,
}

fn bn_case(shape: &[i64], input: Input, pg: Option<&ProcessGroup>) -> Result<BnResult> {
    let c = shape[1];
    let (rank, world) = pg.map(|g| (g.rank(), g.world_size())).unwrap_or((0, 1));
    let b = shape[0] / world as i64;
    let x_all = data(shape, 0.2) * 3.0 + 1.5;
    let r_all = data(shape, 2.9);
    let x = x_all.narrow(0, rank as i64 * b, b).copy();
    let x = match input {
        Input::Float | Input::FloatChannelsLast => x,
        Input::Bf16 | Input::Bf16ChannelsLast => x.to_kind(Kind::BFloat16),
    };
    let x = match input {
        Input::FloatChannelsLast | Input::Bf16ChannelsLast if x.dim() == 4 => {
            let cl = to_channels_last(&x)?;
            assert!(is_channels_last(&cl));
            cl
        }
        _ => x,
    }
    .set_requires_grad(true);
    let r = r_all.narrow(0, rank as i64 * b, b);
    let w = (data(&[c], 0.5) + 1.0).set_requires_grad(true);
    let bias = data(&[c], 4.0).set_requires_grad(true);
    let rm = data(&[c], 7.0) * 0.1;
    let rv = data(&[c], 8.0).abs() + 0.5;
    let y = match pg {
        Some(g) => sync_batch_norm(
            g,
            std::slice::from_ref(&x),
            Some(&w),
            Some(&bias),
            &rm,
            &rv,
            0.1,
            1e-5,
        )?
        .remove(0),
        None => x.f_batch_norm(
            Some(&w),
            Some(&bias),
            Some(&rm),
            Some(&rv),
            true,
            0.1,
            1e-5,
            false,
        )?,
    };
    // a loss that weights outputs unevenly, so every gradient term matters
    let yf = y.to_kind(Kind::Float);
    let loss = (&yf * &r).sum(Kind::Float) + yf.pow_tensor_scalar(2).sum(Kind::Float) * 0.1;
    loss.f_backward()?;
    let (dw, db) = (w.grad(), bias.grad());
    if let Some(g) = pg {
        g.all_reduce_sum(&dw)?;
        g.all_reduce_sum(&db)?;
    }
    Ok(BnResult {
        y: y.detach().to_kind(Kind::Float),
        dx: x.grad().to_kind(Kind::Float),
        dw,
        db,
        rm,
        rv,
    })
}

/// Both ranks' halves against ATen's batch norm over the whole batch, within `tol` (relative to
/// each figure's largest magnitude): float32 agrees to rounding, bf16 to its 8-bit mantissa
/// (the output and input gradient are bf16; parameters' gradients and statistics stay float).
fn check_sync_bn(shape: &'static [i64], input: Input, tol: f64) {
    let reference = bn_case(shape, input, None).unwrap();
    let out = run_ranks(2, TIMEOUT, move |pg| {
        let r = bn_case(shape, input, Some(&pg))?;
        Ok(vec![r.y, r.dx, r.dw, r.db, r.rm, r.rv])
    });
    let ranks = all_ok(out);
    let cat = |i: usize| Tensor::cat(&[&ranks[0][i], &ranks[1][i]], 0);
    assert_close("output", &cat(0), &reference.y, tol).unwrap();
    assert_close("input gradient", &cat(1), &reference.dx, tol).unwrap();
    for (rank, t) in ranks.iter().enumerate() {
        assert_close(
            &format!("rank {rank} weight gradient"),
            &t[2],
            &reference.dw,
            tol,
        )
        .unwrap();
        assert_close(
            &format!("rank {rank} bias gradient"),
            &t[3],
            &reference.db,
            tol,
        )
        .unwrap();
        assert_close(
            &format!("rank {rank} running mean"),
            &t[4],
            &reference.rm,
            tol,
        )
        .unwrap();
        assert_close(
            &format!("rank {rank} running var"),
            &t[5],
            &reference.rv,
            tol,
        )
        .unwrap();
    }
}

#[test]
fn sync_batch_norm_2d_matches_batch_norm_over_the_global_batch() {
    check_sync_bn(&[8, 3, 4, 5], Input::Float, 1e-5);
}

#[test]
fn sync_batch_norm_bf16_channels_last_matches_mixed_precision_batch_norm() {
    check_sync_bn(&[8, 6, 4, 5], Input::Bf16ChannelsLast, 1e-2);
    check_sync_bn(&[6, 7], Input::Bf16ChannelsLast, 1e-2);
    check_sync_bn(&[8, 6, 4, 5], Input::Bf16, 1e-2);
}

#[test]
fn sync_batch_norm_float_channels_last_and_3d_match_batch_norm_over_the_global_batch() {
    check_sync_bn(&[8, 6, 4, 5], Input::FloatChannelsLast, 1e-5);
    check_sync_bn(&[6, 5, 7], Input::Float, 1e-5);
}

#[test]
fn sync_batch_norm_1d_matches_batch_norm_over_the_global_batch() {
    check_sync_bn(&[6, 7], Input::Float, 1e-5);
}
