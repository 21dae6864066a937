//! All-reduce, all-gather, broadcast and barrier at W = 1, 2, 4; persistent gradient buckets; the
//! all-gather that keeps the local slice in the autograd graph.
use anyhow::{ensure, Result};
use bt_worker::dist::ProcessGroup;
use tch::{Device, Kind, Tensor};

use crate::harness::*;

fn check_collectives(world: usize) {
    let out = run_ranks(world, TIMEOUT, move |pg| {
        let r = pg.rank() as f64;
        let w = pg.world_size() as f64;
        ensure!(pg.world_size() == world);

        // all_reduce (contiguous float, non-contiguous view, int64)
        let t = Tensor::full([5], r + 1.0, (Kind::Float, Device::Cpu));
        pg.all_reduce_sum(&t)?;
        let expect = w * (w + 1.0) / 2.0;
        ensure!(
            t.eq(expect).all().int64_value(&[]) == 1,
            "all_reduce: {t:?}"
        );
        let base = data(&[4, 6], r);
        let view = base.transpose(0, 1); // non-contiguous
        let sum_ref = {
            let mut acc = Tensor::zeros([4, 6], (Kind::Float, Device::Cpu));
            for q in 0..world {
                acc += data(&[4, 6], q as f64);
            }
            acc
        };
        pg.all_reduce_sum(&view)?;
        assert_close("all_reduce of a transposed view", &base, &sum_ref, 1e-6)?;
        let ints = Tensor::from_slice(&[pg.rank() as i64, 1]);
        pg.all_reduce_sum(&ints)?;
        let got: Vec<i64> = Vec::<i64>::try_from(&ints)?;
        ensure!(
            got == vec![(0..world as i64).sum(), world as i64],
            "int all_reduce {got:?}"
        );

        // all_gather: rank q contributes rows filled with q
        let mine = Tensor::full([2, 3], r, (Kind::Float, Device::Cpu));
        let all = pg.all_gather(&mine)?;
        ensure!(
            all.size() == vec![2 * world as i64, 3],
            "all_gather shape {:?}",
            all.size()
        );
        for q in 0..world as i64 {
            let rows = all.narrow(0, 2 * q, 2);
            ensure!(
                rows.eq(q as f64).all().int64_value(&[]) == 1,
                "all_gather slice {q}"
            );
        }

        // broadcast from the last rank
        let root = world - 1;
        let b = Tensor::full([7], r * 10.0, (Kind::Float, Device::Cpu));
        pg.broadcast(&b, root)?;
        ensure!(
            b.eq(root as f64 * 10.0).all().int64_value(&[]) == 1,
            "broadcast {b:?}"
        );
        ensure!(
            pg.broadcast(&b, world).is_err(),
            "broadcast from a rank outside the group"
        );

        pg.barrier()?;
        Ok(())
    });
    all_ok(out);
}

#[test]
fn collectives_world_2() {
    check_collectives(2);
}

#[test]
fn collectives_world_4() {
    check_collectives(4);
}

#[test]
fn world_of_one_needs_no_rendezvous() -> Result<()> {
    // port 1 would fail if a store were started
    let pg = ProcessGroup::new(&rendezvous(0, 1, 1, TIMEOUT))?;
    let t = Tensor::from_slice(&[1.0f32, 2.0]);
    pg.all_reduce_sum(&t)?;
    ensure!(Vec::<f32>::try_from(&t)? == vec![1.0, 2.0]);
    ensure!(pg.all_gather(&t)?.size() == vec![2]);
    pg.barrier()?;
    pg.check_agreement("config", b"x")?;
    ensure!(
        ProcessGroup::new(&rendezvous(2, 2, 1, TIMEOUT)).is_err(),
        "rank >= world"
    );
    Ok(())
}

#[test]
fn world_of_one_can_join_alone() -> Result<()> {
    // What the one-GPU NCCL check does: a real backend with a single rank.
    let mut rv = rendezvous(0, 1, free_port(), TIMEOUT);
    rv.join_alone = true;
    let pg = ProcessGroup::new(&rv)?;
    let t = Tensor::from_slice(&[1.0f32, 2.0]);
    pg.all_reduce_sum(&t)?;
    ensure!(Vec::<f32>::try_from(&t)? == vec![1.0, 2.0]);
    let out = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    pg.all_gather_into(&t, &out)?;
    ensure!(Vec::<f32>::try_from(&out)? == vec![1.0, 2.0]);
    pg.broadcast(&t, 0)?;
    pg.barrier()?;
    Ok(())
}

/// Persistent gradient buckets: grads alias the buckets (also a channels-last weight), two
/// backward passes with an in-place zero_grad in between give the sum over ranks of the second
/// pass, a parameter backward never reached gets zero, and the buckets serve step after step.
#[test]
fn grad_buckets_sum_over_ranks_in_place() {
    use bt_worker::amp::{is_channels_last, MemoryFormat};
    let out = run_ranks(2, TIMEOUT, |pg| {
        let r = pg.rank() as f64 + 1.0;
        let conv = data(&[4, 3, 2, 2], 0.1).set_requires_grad(true);
        MemoryFormat::ChannelsLast.apply_to_weights(std::slice::from_ref(&conv))?;
        ensure!(is_channels_last(&conv));
        let mut params = vec![conv];
        for (i, n) in [5i64, 300, 7].into_iter().enumerate() {
            params.push(data(&[n], i as f64).set_requires_grad(true));
        }
        let unused = data(&[3], 9.0).set_requires_grad(true);
        params.push(unused.shallow_clone());
        // 1 KiB buckets: the 300-element tensor fills one alone
        let mut buckets = pg.grad_buckets(&params, 1 << 10)?;
        ensure!(buckets.len() >= 3, "{} buckets", buckets.len());
        let loss = |scale: f64| -> Result<()> {
            let mut l = Tensor::zeros([], (Kind::Float, Device::Cpu));
            for p in &params[..4] {
                l += (p * p).sum(Kind::Float) * scale;
            }
            l.f_backward()?;
            Ok(())
        };
        loss(100.0)?; // discarded by the first zero_grad
        for step in 0..2 {
            for p in &params {
                p.shallow_clone().zero_grad();
            }
            loss(r)?;
            buckets.all_reduce()?;
            // d/dp of Σ_ranks r·p² = 2p·(1 + 2)
            for (i, p) in params[..4].iter().enumerate() {
                let want = p.detach() * 6.0;
                assert_close(
                    &format!("step {step} param {i} grad"),
                    &p.grad(),
                    &want,
                    1e-6,
                )?;
            }
            ensure!(params[0].grad().size() == vec![4, 3, 2, 2]);
            ensure!(
                is_channels_last(&params[0].grad()),
                "grad keeps the weight's layout"
            );
            ensure!(unused.grad().abs().sum(Kind::Float).double_value(&[]) == 0.0);
        }
        Ok(())
    });
    all_ok(out);
}

/// A toy loss in the shape of Barlow Twins': cross-correlation of the gathered global batch.
fn toy_loss(z: &Tensor) -> Tensor {
    let zn = (z - z.mean_dim(0, true, Kind::Float)) / (z.std_dim(0, true, true) + 1e-3);
    let c = zn.transpose(0, 1).matmul(&zn) / z.size()[0] as f64;
    let eye = Tensor::eye(c.size()[0], (Kind::Float, Device::Cpu));
    (&c - eye).pow_tensor_scalar(2).sum(Kind::Float)
}

fn check_gather_with_grad(world: usize) {
    const N: i64 = 8;
    const D: i64 = 5;
    const E: i64 = 4;
    // Reference: one process with the whole batch.
    let x = data(&[N, D], 0.3);
    let w_ref = data(&[D, E], 1.1).set_requires_grad(true);
    let loss_ref = toy_loss(&x.matmul(&w_ref));
    loss_ref.backward();
    let grad_ref: Vec<f32> = Vec::try_from(&w_ref.grad().view(-1)).unwrap();
    let loss_ref = loss_ref.double_value(&[]);

    let out = run_ranks(world, TIMEOUT, move |pg| {
        let b = N / world as i64;
        let x = data(&[N, D], 0.3).narrow(0, pg.rank() as i64 * b, b);
        let w = data(&[D, E], 1.1).set_requires_grad(true);
        let z = x.matmul(&w);
        let global = pg.all_gather_with_grad(&z)?;
        ensure!(global.size() == vec![N, E]);
        let loss = toy_loss(&global);
        loss.backward();
        pg.allreduce_grads(std::slice::from_ref(&w), 1 << 20)?;
        Ok((
            loss.double_value(&[]),
            Vec::<f32>::try_from(&w.grad().view(-1))?,
        ))
    });
    for (rank, (loss, grad)) in all_ok(out).into_iter().enumerate() {
        assert!(
            (loss - loss_ref).abs() <= 1e-5 * loss_ref.abs().max(1.0),
            "rank {rank} loss"
        );
        let g = Tensor::from_slice(&grad);
        let g_ref = Tensor::from_slice(&grad_ref);
        assert_close(&format!("rank {rank} summed gradient"), &g, &g_ref, 1e-5).unwrap();
    }
}

#[test]
fn all_gather_with_grad_gives_each_rank_its_share_w2() {
    check_gather_with_grad(2);
}

#[test]
fn all_gather_with_grad_gives_each_rank_its_share_w4() {
    check_gather_with_grad(4);
}

#[test]
fn ranks_meet_by_host_name_when_rank_0_starts_last() {
    // the other ranks wait for rank 0's store; "localhost" may resolve to several addresses
    let port = free_port();
    let world = 3;
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            std::thread::spawn(move || -> Result<f64> {
                if rank == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1500));
                }
                let rv = bt_worker::dist::Rendezvous::new(rank, world, "localhost", port, TIMEOUT);
                let pg = ProcessGroup::new(&rv)?;
                let t = Tensor::ones([3], (Kind::Float, Device::Cpu));
                pg.all_reduce_sum(&t)?;
                Ok(t.double_value(&[0]))
            })
        })
        .collect();
    for (rank, h) in handles.into_iter().enumerate() {
        let sum = h.join().expect("rank thread").expect("rank result");
        assert_eq!(sum, world as f64, "rank {rank}");
    }
}
