//! The store's per-attempt prefix and its bound address: a peer without the attempt's prefix meets
//! nobody, the store listens on the single master address only, and bad prefixes are refused
//! without being named.
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bt_worker::dist::{ProcessGroup, Rendezvous};
use tch::{Device, Kind, Tensor};

use crate::harness::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const STRAY_SECRET: &str = "feedfacefeedfacefeedfacefeedface";

fn with_prefix(mut rv: Rendezvous, prefix: &str) -> Rendezvous {
    rv.store_prefix = prefix.to_string();
    rv
}

fn wait_until_listening(port: u16) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "rank 0's store never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A real group of two ranks (prefix SECRET) and two strays that claim rank 1 with another prefix:
/// one (a thread) arrives before the real rank 1, one (a process) after the group formed. Both
/// strays time out; the group forms whatever the order and sums correctly. The store's own
/// arrival count (TCPStore's waitWorkers, an unprefixed key every client bumps) would have let
/// the early stray stand in for rank 1; the ranks now count themselves under the prefix.
#[test]
fn a_peer_without_the_attempts_store_prefix_cannot_join() {
    let port = free_port();
    let stray_timeout = Duration::from_secs(2);
    let real = |rank: usize| {
        std::thread::spawn(move || -> Result<(f32, Option<String>)> {
            let rv = with_prefix(rendezvous(rank, 2, port, TIMEOUT), SECRET);
            let pg = ProcessGroup::new(&rv).with_context(|| format!("rank {rank} joining"))?;
            let mut stray_err = None;
            if rank == 0 {
                // a second stray, against the live group's store; rank 0 keeps the store up until
                // it has given up
                let mut child = Command::new(env!("CARGO_BIN_EXE_bt-dist-probe"))
                    .args(["--rank", "1", "--world", "2", "--port", &port.to_string()])
                    .args(["--timeout", &stray_timeout.as_secs_f64().to_string()])
                    .args(["--store-prefix", STRAY_SECRET, "loop", "--seconds", "5"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("spawn the stray probe")?;
                let mut err = String::new();
                child.stderr.take().unwrap().read_to_string(&mut err)?;
                let st = child.wait()?;
                anyhow::ensure!(st.code() == Some(3), "stray probe exit {st:?}: {err}");
                stray_err = Some(err);
            }
            let t = Tensor::full([4], (rank + 1) as f64, (Kind::Float, Device::Cpu));
            pg.all_reduce_sum(&t)?;
            pg.barrier()?;
            Ok((t.double_value(&[0]) as f32, stray_err))
        })
    };
    let start = Instant::now();
    let rank0 = real(0);
    wait_until_listening(port);
    let early_stray = std::thread::spawn(move || {
        let rv = with_prefix(rendezvous(1, 2, port, stray_timeout), STRAY_SECRET);
        let t = Instant::now();
        (ProcessGroup::new(&rv).map(|_| ()), t.elapsed())
    });
    // give the stray the head start (the outcome does not depend on whether it took it)
    std::thread::sleep(Duration::from_millis(300));
    let rank1 = real(1);
    let (r0, r1) = (rank0.join().unwrap(), rank1.join().unwrap());
    let (early, early_took) = early_stray.join().unwrap();
    let (sum0, late) = r0.expect("rank 0");
    let (sum1, _) = r1.expect("rank 1");
    assert_eq!((sum0, sum1), (3.0, 3.0));

    let early = early
        .expect_err("a stray with another prefix must not join")
        .to_string();
    assert!(
        early_took < stray_timeout + Duration::from_secs(3),
        "{early_took:?}"
    );
    let late = late.expect("rank 0 ran the late stray");
    for (which, msg) in [("early", &early), ("late", &late)] {
        let lower = msg.to_lowercase();
        assert!(
            lower.contains("timeout") || lower.contains("timed out"),
            "{which} stray: {msg}"
        );
        assert!(
            !msg.contains(STRAY_SECRET) && !msg.contains(SECRET),
            "{which} stray names a prefix: {msg}"
        );
        eprintln!("{which} stray: {}", msg.trim());
    }
    eprintln!("group with two strays took {:?}", start.elapsed());
}

#[test]
fn a_missing_rank_is_a_timeout_that_does_not_name_the_prefix() {
    let timeout = Duration::from_secs(1);
    let rv = with_prefix(rendezvous(0, 2, free_port(), timeout), SECRET);
    let err = ProcessGroup::new(&rv)
        .expect_err("rank 0 alone")
        .to_string();
    assert!(err.contains("1 of 2 joined"), "{err}");
    assert!(!err.contains(SECRET), "{err}");
}

#[test]
fn the_store_listens_on_the_single_master_address_only() {
    let port = free_port();
    let mut rv = rendezvous(0, 1, port, TIMEOUT);
    rv.join_alone = true;
    let pg = ProcessGroup::new(&rv).expect("a group of one with its own store");
    // the port is taken on 127.0.0.1 but free on the rest of the loopback net: no wildcard
    assert!(TcpListener::bind(("127.0.0.1", port)).is_err());
    TcpListener::bind(("127.0.0.2", port))
        .expect("the store must not hold the port on every address");
    pg.barrier().unwrap();
}

#[test]
fn a_master_address_that_is_not_local_is_a_clean_error() {
    let port = free_port();
    let mut rv = Rendezvous::new(0, 2, "192.0.2.1", port, Duration::from_secs(2));
    rv.local_addr = Some("127.0.0.1".into());
    let start = Instant::now();
    let msg = ProcessGroup::new(&rv)
        .expect_err("rank 0 cannot host a store on another host's address")
        .to_string();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(msg.contains(&format!("192.0.2.1:{port}")), "{msg}");
}

#[test]
fn bad_store_prefixes_are_refused_without_naming_them() {
    let port = free_port();
    let long = "x".repeat(129);
    for bad in [
        "",
        "sec/ret",
        "sec ret",
        "sec\0ret",
        "sécret",
        long.as_str(),
    ] {
        let start = Instant::now();
        let msg = ProcessGroup::new(&with_prefix(rendezvous(0, 2, port, TIMEOUT), bad))
            .expect_err("a bad prefix must be refused")
            .to_string();
        assert!(start.elapsed() < Duration::from_secs(1), "{msg}");
        assert!(msg.contains("store_prefix"), "{msg}");
        assert!(bad.is_empty() || !msg.contains(bad), "{msg}");
    }
    // the longest one allowed
    bt_worker::dist::validate_store_prefix(&"A-_9".repeat(32)).unwrap();
}

#[test]
fn an_assignment_without_a_store_prefix_is_refused_at_world_two() {
    let mut a = bt_proto::Assignment {
        rank: 1,
        world_size: 2,
        master_addr: "127.0.0.1".into(),
        master_port: 29500,
        ..Default::default()
    };
    let msg = Rendezvous::from_assignment(&a, TIMEOUT)
        .expect_err("no secret at world 2")
        .to_string();
    assert!(msg.contains("store_prefix"), "{msg}");

    a.store_prefix = SECRET.into();
    let rv = Rendezvous::from_assignment(&a, TIMEOUT).unwrap();
    assert_eq!(rv.store_prefix, SECRET);
    assert!(
        !format!("{rv:?}").contains(SECRET),
        "Debug shows the secret"
    );

    a.store_prefix = "not/allowed".into();
    assert!(Rendezvous::from_assignment(&a, TIMEOUT).is_err());
    a.master_port = 70000;
    a.store_prefix = SECRET.into();
    assert!(Rendezvous::from_assignment(&a, TIMEOUT).is_err());

    // a world of one needs no store
    let solo = bt_proto::Assignment {
        world_size: 1,
        ..Default::default()
    };
    Rendezvous::from_assignment(&solo, TIMEOUT).unwrap();
}
