//! Disagreeing ranks, timeouts, dead peers and busy ports: each a clean error within its bound.
use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::Context;
use bt_worker::dist::{sync_batch_norm, ProcessGroup};
use tch::{Device, Kind, Tensor};

use crate::harness::*;

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
        if rank != 0 {
            // bt polls for rank 0's store itself: libtorch's client back-off (seconds, random)
            // once stretched this past the bound above
            let msg = err.to_string();
            assert!(msg.contains("did not accept connections"), "{msg}");
            assert!(took < timeout + Duration::from_secs(1), "took {took:?}");
        }
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
        let y = sync_batch_norm(
            &pg,
            std::slice::from_ref(&x),
            None,
            None,
            &rm,
            &rv,
            0.1,
            1e-5,
        )?
        .remove(0);
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
