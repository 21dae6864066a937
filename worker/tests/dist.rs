//! Multi-rank tests of the c10d shim over Gloo on loopback. Each rank runs in its own thread with
//! its own ProcessGroup (its own Gloo context and sockets), on a fresh port, with short timeouts.
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bt_worker::dist::{sync_batch_norm, ProcessGroup, Rendezvous};
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn rendezvous(rank: usize, world: usize, port: u16, timeout: Duration) -> Rendezvous {
    Rendezvous::new(rank, world, "127.0.0.1", port, timeout)
}

/// Runs `f(group)` on `world` ranks (threads) and returns every rank's result, in rank order.
fn run_ranks<T, F>(world: usize, timeout: Duration, f: F) -> Vec<Result<T>>
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

fn all_ok<T>(results: Vec<Result<T>>) -> Vec<T> {
    results
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r} failed: {e:#}")))
        .collect()
}

/// Deterministic "random" data without the global RNG (shared by threads).
fn data(shape: &[i64], salt: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.7548776662 + salt)
        .sin()
        .multiply_scalar(1.7)
        .to_kind(Kind::Float)
        .view(shape)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
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

#[test]
fn check_agreement_names_the_disagreeing_values() {
    let out = run_ranks(3, TIMEOUT, |pg| {
        pg.check_agreement("config", b"same everywhere")?;
        let mine = if pg.rank() == 2 {
            "resnet50"
        } else {
            "resnet18"
        };
        let err = pg
            .check_agreement("model", mine.as_bytes())
            .err()
            .context("a mismatch must be an error")?;
        // the group stays usable afterwards
        pg.barrier()?;
        Ok(err.to_string())
    });
    for (rank, msg) in all_ok(out).into_iter().enumerate() {
        assert!(msg.contains("model differs"), "rank {rank}: {msg}");
        assert!(
            msg.contains("resnet50") && msg.contains("resnet18"),
            "rank {rank}: {msg}"
        );
    }
}

#[test]
fn a_rank_that_never_joins_is_a_timeout_error() {
    let timeout = Duration::from_secs(2);
    let port = free_port();
    for rank in [0, 1] {
        let start = Instant::now();
        let err = ProcessGroup::new(&rendezvous(rank, 2, port, timeout)).err();
        let took = start.elapsed();
        let err = err.unwrap_or_else(|| panic!("rank {rank} alone must not form a group"));
        assert!(
            took < timeout + Duration::from_secs(5),
            "rank {rank} took {took:?}: {err}"
        );
        eprintln!("rank {rank} alone: {err} after {took:?}");
    }
}

#[test]
fn a_peer_that_stops_participating_is_a_timeout_error() {
    let timeout = Duration::from_secs(2);
    let out = run_ranks(2, timeout, move |pg| {
        if pg.rank() == 1 {
            // alive but never calls the collective; leaves after the peer has given up
            std::thread::sleep(timeout + Duration::from_secs(4));
            return Ok(None);
        }
        let start = Instant::now();
        let res = pg.all_reduce_sum(&Tensor::ones([4], (Kind::Float, Device::Cpu)));
        Ok(Some((res.err().map(|e| e.to_string()), start.elapsed())))
    });
    let out = all_ok(out);
    let (err, took) = out[0].clone().expect("rank 0 result");
    let err = err.expect("all_reduce without the peer must fail");
    assert!(
        took < timeout + Duration::from_secs(3),
        "took {took:?}: {err}"
    );
    eprintln!("hung peer: {err} after {took:?}");
}

#[test]
fn a_peer_that_dies_is_an_error_also_inside_backward() {
    let timeout = Duration::from_secs(3);
    let out = run_ranks(2, timeout, move |pg| {
        let x = data(&[4, 3], pg.rank() as f64).set_requires_grad(true);
        let rm = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let rv = Tensor::ones([3], (Kind::Float, Device::Cpu));
        let y = sync_batch_norm(&pg, &x, None, None, &rm, &rv, 0.1, 1e-5)?;
        if pg.rank() == 1 {
            drop(pg); // closes its connections, as a crashed process would
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        let err = y.sum(Kind::Float).f_backward().err().map(|e| e.to_string());
        let err2 = pg
            .all_reduce_sum(&Tensor::ones([2], (Kind::Float, Device::Cpu)))
            .err();
        Ok(Some((err, err2.map(|e| e.to_string()), start.elapsed())))
    });
    let out = all_ok(out);
    let (bwd, after, took) = out[0].clone().expect("rank 0 result");
    let bwd = bwd.expect("backward with a dead peer must fail");
    assert!(after.is_some(), "collectives after a dead peer must fail");
    assert!(took < 2 * timeout + Duration::from_secs(3), "took {took:?}");
    eprintln!("dead peer in backward: {bwd}");
}

#[test]
fn a_store_port_in_use_is_a_clean_error() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let start = Instant::now();
    let err = ProcessGroup::new(&rendezvous(0, 2, port, Duration::from_secs(10)))
        .expect_err("rank 0 cannot host the store on a busy port");
    let msg = err.to_string();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(msg.contains(&port.to_string()), "{msg}");
    assert!(
        !msg.contains("Exception raised from"),
        "backtrace leaked: {msg}"
    );
    eprintln!("port in use: {msg}");
}

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
            Some(g) => sync_batch_norm(g, x, Some(w), Some(b), rm, rv, 0.1, 1e-5)?,
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

/// Waits for `child` to exit, up to `deadline`; kills it and fails if it does not.
fn wait_with_deadline(
    child: &mut std::process::Child,
    deadline: Duration,
) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            panic!("process {} still running after {deadline:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_rank_process_makes_the_others_fail_within_the_timeout() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let port = free_port();
    let timeout_s = 3u64;
    let spawn = |rank: usize| {
        Command::new(env!("CARGO_BIN_EXE_bt-dist-probe"))
            .args([
                "--rank",
                &rank.to_string(),
                "--world",
                "3",
                "--port",
                &port.to_string(),
            ])
            .args([
                "--timeout",
                &timeout_s.to_string(),
                "loop",
                "--seconds",
                "60",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bt-dist-probe")
    };
    let mut children: Vec<_> = (0..3).map(spawn).collect();
    // wait until every rank has joined
    let (tx, rx) = std::sync::mpsc::channel();
    for c in children.iter_mut() {
        let out = c.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                let _ = tx.send(line);
            }
        });
    }
    for _ in 0..3 {
        let line = rx.recv_timeout(Duration::from_secs(20));
        if line.is_err() {
            for c in children.iter_mut() {
                let _ = c.kill();
            }
            panic!("ranks did not all join");
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    children[2].kill().expect("kill rank 2");
    let killed_at = Instant::now();
    for (rank, c) in children.iter_mut().enumerate().take(2) {
        let st = wait_with_deadline(c, Duration::from_secs(timeout_s + 5));
        let mut err = String::new();
        c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(st.code(), Some(3), "rank {rank} exit {st:?}: {err}");
        assert!(err.contains("error: "), "rank {rank}: {err}");
        eprintln!(
            "rank {rank} failed after {:?}: {}",
            killed_at.elapsed(),
            err.lines().last().unwrap_or("")
        );
    }
    let _ = children[2].wait();
}
