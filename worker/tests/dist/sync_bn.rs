//! Synchronized batch norm against plain batch norm over the global batch.
use anyhow::Result;
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

fn bn_case(shape: &[i64], pg: Option<&ProcessGroup>) -> Result<BnResult> {
    let c = shape[1];
    let (rank, world) = pg.map(|g| (g.rank(), g.world_size())).unwrap_or((0, 1));
    let b = shape[0] / world as i64;
    let x_all = data(shape, 0.2) * 3.0 + 1.5;
    let r_all = data(shape, 2.9);
    let x = x_all
        .narrow(0, rank as i64 * b, b)
        .copy()
        .set_requires_grad(true);
    let r = r_all.narrow(0, rank as i64 * b, b);
    let w = (data(&[c], 0.5) + 1.0).set_requires_grad(true);
    let bias = data(&[c], 4.0).set_requires_grad(true);
    let rm = data(&[c], 7.0) * 0.1;
    let rv = data(&[c], 8.0).abs() + 0.5;
    let y = match pg {
        Some(g) => sync_batch_norm(g, &x, Some(&w), Some(&bias), &rm, &rv, 0.1, 1e-5)?,
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
    let loss = (&y * &r).sum(Kind::Float) + y.pow_tensor_scalar(2).sum(Kind::Float) * 0.1;
    loss.f_backward()?;
    let (dw, db) = (w.grad(), bias.grad());
    if let Some(g) = pg {
        g.all_reduce_sum(&dw)?;
        g.all_reduce_sum(&db)?;
    }
    Ok(BnResult {
        y: y.detach(),
        dx: x.grad(),
        dw,
        db,
        rm,
        rv,
    })
}

fn check_sync_bn(shape: &'static [i64]) {
    let reference = bn_case(shape, None).unwrap();
    let out = run_ranks(2, TIMEOUT, move |pg| {
        let r = bn_case(shape, Some(&pg))?;
        Ok(vec![r.y, r.dx, r.dw, r.db, r.rm, r.rv])
    });
    let ranks = all_ok(out);
    let cat = |i: usize| Tensor::cat(&[&ranks[0][i], &ranks[1][i]], 0);
    assert_close("output", &cat(0), &reference.y, 1e-5).unwrap();
    assert_close("input gradient", &cat(1), &reference.dx, 1e-5).unwrap();
    for (rank, t) in ranks.iter().enumerate() {
        assert_close(
            &format!("rank {rank} weight gradient"),
            &t[2],
            &reference.dw,
            1e-5,
        )
        .unwrap();
        assert_close(
            &format!("rank {rank} bias gradient"),
            &t[3],
            &reference.db,
            1e-5,
        )
        .unwrap();
        assert_close(
            &format!("rank {rank} running mean"),
            &t[4],
            &reference.rm,
            1e-5,
        )
        .unwrap();
        assert_close(
            &format!("rank {rank} running var"),
            &t[5],
            &reference.rv,
            1e-5,
        )
        .unwrap();
    }
}

#[test]
fn sync_batch_norm_2d_matches_batch_norm_over_the_global_batch() {
    check_sync_bn(&[8, 3, 4, 5]);
}

#[test]
fn sync_batch_norm_1d_matches_batch_norm_over_the_global_batch() {
    check_sync_bn(&[6, 7]);
}
