//! The gradient all-reduce overlapped with backward: buckets started by the parameters'
//! post-accumulate-grad hooks sum to the same bits as the buckets summed after backward and as
//! the packed all-reduce, also with a parameter that gets no gradient in a step, one used twice
//! in the graph and a grad replaced by another tensor; the hooks go with their buckets.
use anyhow::{ensure, Result};
use bt_worker::amp::MemoryFormat;
use bt_worker::dist::ProcessGroup;
use tch::{Device, Kind, Tensor};

use crate::harness::*;

/// 64-byte buckets: over the reversed list below, `big`, `bias`, `shared`, `conv`, `skip` each
/// get one of their own, `skip` (first parameter) the last.
const BUCKET: usize = 64;

/// [skip 5, conv 4x3x2x2 (channels-last), shared 4x4, bias 4, big 300], the same on every rank.
fn params() -> Result<Vec<Tensor>> {
    let conv = data(&[4, 3, 2, 2], 0.1).set_requires_grad(true);
    MemoryFormat::ChannelsLast.apply_to_weights(std::slice::from_ref(&conv))?;
    Ok(vec![
        data(&[5], 0.2).set_requires_grad(true),
        conv,
        data(&[4, 4], 0.3).set_requires_grad(true),
        data(&[4], 0.4).set_requires_grad(true),
        data(&[300], 0.5).set_requires_grad(true),
    ])
}

/// A loss on this rank's data: `shared` is used twice in the graph, `skip` only at even steps.
fn loss(p: &[Tensor], rank: usize, step: usize) -> Tensor {
    let salt = rank as f64 * 0.37 + step as f64 * 0.11;
    let x = data(&[2, 3, 3, 3], salt);
    let h = x
        .conv2d(&p[1], None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
        .mean_dim([2, 3].as_slice(), false, Kind::Float);
    let z = h.matmul(&p[2]) + (&h * 0.5).matmul(&p[2]) + &p[3];
    let mut l = z.tanh().pow_tensor_scalar(2).sum(Kind::Float)
        + (p[4].sin() * data(&[300], salt)).sum(Kind::Float);
    if step.is_multiple_of(2) {
        l += (&p[0] * &p[0]).sum(Kind::Float) * (rank as f64 + 1.0);
    }
    l
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    /// `ProcessGroup::allreduce_grads`: packed per call after backward.
    Packed,
    /// Persistent buckets, overlap off: all summed in `all_reduce()`.
    Serial,
    /// Persistent buckets, started by the hooks during backward.
    Overlap,
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    let v: Vec<f32> = Vec::try_from(&t.contiguous().view(-1))?;
    Ok(v.into_iter().map(f32::to_bits).collect())
}

/// Four SGD steps in `mode`; every step's summed gradients, as bits.
fn train(pg: &ProcessGroup, mode: Mode) -> Result<Vec<Vec<Vec<u32>>>> {
    let p = params()?;
    let mut buckets = match mode {
        Mode::Packed => None,
        Mode::Serial => Some(pg.grad_buckets_with(&p, BUCKET, false)?),
        Mode::Overlap => {
            // Off at first, then on: the hooks are installed by set_overlap.
            let mut b = pg.grad_buckets_with(&p, BUCKET, false)?;
            b.set_overlap(true)?;
            Some(b)
        }
    };
    if let Some(b) = &buckets {
        ensure!(b.len() == 5, "{} buckets", b.len());
    }
    let mut out = Vec::new();
    for step in 0..4 {
        if let Some(b) = &mut buckets {
            b.arm()?;
        }
        for q in &p {
            q.shallow_clone().zero_grad();
        }
        if step == 1 {
            // A grad replaced by another tensor (no longer the bucket's slice), also channels-last.
            for i in [1, 2] {
                let mut g = p[i].grad();
                g.set_data(&Tensor::zeros(p[i].size(), (Kind::Float, Device::Cpu)));
            }
        }
        loss(&p, pg.rank(), step).f_backward()?;
        match &mut buckets {
            None => pg.allreduce_grads(&p, BUCKET)?,
            Some(b) => {
                let started = b.started();
                let want = match mode {
                    Mode::Overlap if step.is_multiple_of(2) => 5,
                    // `skip` got no gradient: its bucket (the last) waits for all_reduce()
                    Mode::Overlap => 4,
                    _ => 0,
                };
                ensure!(
                    started == want,
                    "{mode:?} step {step}: {started} buckets started during backward, want {want}"
                );
                b.all_reduce()?;
                ensure!(b.started() == 0);
            }
        }
        if !step.is_multiple_of(2) {
            ensure!(
                p[0].grad().abs().sum(Kind::Float).double_value(&[]) == 0.0,
                "{mode:?} step {step}: a parameter without a gradient sums to zero"
            );
        }
        out.push(p.iter().map(|q| bits(&q.grad())).collect::<Result<_>>()?);
        tch::no_grad(|| {
            for q in &p {
                let _ = q.shallow_clone().f_sub_(&(q.grad() * 0.1));
            }
        });
    }
    Ok(out)
}

/// Overlap on and off (and the packed all-reduce) give the same bits, step after step, on both
/// ranks.
#[test]
fn overlapped_all_reduce_sums_the_same_bits_as_after_backward() {
    let out = all_ok(run_ranks(2, TIMEOUT, |pg| {
        let packed = train(&pg, Mode::Packed)?;
        let serial = train(&pg, Mode::Serial)?;
        let overlap = train(&pg, Mode::Overlap)?;
        ensure!(
            serial == packed,
            "overlap off differs from the packed all-reduce"
        );
        ensure!(overlap == serial, "overlap on differs from overlap off");
        Ok(overlap)
    }));
    assert_eq!(out[0], out[1], "the ranks hold different sums");
}

/// Σ over ranks of (rank + 1)·p² per parameter: the summed gradient is 2p·(1 + 2) = 6p.
fn simple_backward(p: &[Tensor], rank: usize) -> Result<()> {
    let mut l = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for q in p {
        l += (q * q).sum(Kind::Float) * (rank as f64 + 1.0);
    }
    Ok(l.f_backward()?)
}

fn check_six_p(p: &[Tensor]) -> Result<()> {
    for (i, q) in p.iter().enumerate() {
        assert_close(&format!("param {i}"), &q.grad(), &(q.detach() * 6.0), 1e-6)?;
    }
    Ok(())
}

/// Freed buckets take their hooks with them (a later backward does nothing collective), and the
/// hooks of a newer set over the same parameters survive the older set's free.
#[test]
fn freed_buckets_leave_no_active_hooks() {
    all_ok(run_ranks(2, TIMEOUT, |pg| {
        let p = params()?;
        let mut first = pg.grad_buckets(&p, BUCKET)?;
        first.arm()?;
        drop(first); // armed, then freed
        simple_backward(&p, pg.rank())?;

        let older = pg.grad_buckets(&p, BUCKET)?;
        let mut newer = pg.grad_buckets(&p, BUCKET)?;
        drop(older);
        newer.arm()?;
        for q in &p {
            q.shallow_clone().zero_grad();
        }
        simple_backward(&p, pg.rank())?;
        ensure!(newer.started() == newer.len(), "the newer set's hooks fire");
        newer.all_reduce()?;
        check_six_p(&p)
    }));
}

/// A second backward after arm() lands in buckets already being summed: all_reduce() says so, and
/// the next step is right again.
#[test]
fn a_second_backward_in_an_armed_step_is_an_error() {
    all_ok(run_ranks(2, TIMEOUT, |pg| {
        let p = params()?;
        let mut b = pg.grad_buckets(&p, BUCKET)?;
        b.arm()?;
        simple_backward(&p, pg.rank())?;
        simple_backward(&p, pg.rank())?;
        let err = b.all_reduce().expect_err("a late gradient");
        ensure!(
            format!("{err}").contains("already started"),
            "unexpected error: {err}"
        );
        // Without arm(), several backward passes accumulate and are summed after.
        for q in &p {
            q.shallow_clone().zero_grad();
        }
        simple_backward(&p, pg.rank())?;
        simple_backward(&p, pg.rank())?;
        ensure!(b.started() == 0);
        b.all_reduce()?;
        for (i, q) in p.iter().enumerate() {
            assert_close(&format!("param {i}"), &q.grad(), &(q.detach() * 12.0), 1e-6)?;
        }
        b.arm()?;
        for q in &p {
            q.shallow_clone().zero_grad();
        }
        simple_backward(&p, pg.rank())?;
        b.all_reduce()?;
        check_six_p(&p)
    }));
}

/// A single-rank group has no buckets: arm, all_reduce and set_overlap do nothing.
#[test]
fn single_rank_buckets_do_nothing() -> Result<()> {
    let pg = ProcessGroup::new(&rendezvous(0, 1, 1, TIMEOUT))?;
    let p = params()?;
    let mut b = pg.grad_buckets(&p, BUCKET)?;
    ensure!(b.is_empty() && b.overlap());
    b.set_overlap(false)?;
    b.arm()?;
    simple_backward(&p, 2)?;
    b.all_reduce()?;
    ensure!(b.started() == 0);
    for q in &p {
        assert_close("grad", &q.grad(), &(q.detach() * 6.0), 1e-6)?;
    }
    Ok(())
}
