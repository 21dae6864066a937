//! The rendezvous secret seen from outside (issue 32). The ranks of an attempt meet in rank 0's
//! TCPStore under `bt/<store_prefix>/`, the prefix a per-attempt secret from the coordinator. An
//! outsider here is anything that reaches the store's port without being given the secret: a
//! thread of this process joining with another prefix, and a Python process speaking libtorch's
//! store protocol (`torch.distributed.TCPStore`, `$BT_PYTHON` else `python3`, as the venv of
//! `scripts/env.sh` provides).
//!
//! What holds (asserted below, while a live two-rank group all-reduces and checks every result):
//! - a peer that joins with a wrong prefix (a guess, the test default `bt-local`) meets nobody
//!   and times out; claiming rank 0 fails at once (rank 0 holds the port);
//! - guessed keys (`bt/<guess>/joined/1`, unprefixed `joined/1`, ...) are absent, and `get` /
//!   `wait` on them time out;
//! - writes, `add` and `compare_set` on guessed or unprefixed keys (TCPStore's own `init/` arrival
//!   counter, unused since the shim counts ranks under the secret), deleting guessed keys, 200
//!   connections at once and garbage bytes on raw connections leave the group's collectives
//!   correct, and the store keeps answering;
//! - once formed, a group no longer uses the store: even overwriting and then deleting its own
//!   keys does not disturb it, and a late joiner with the secret then times out.
//!
//! What does NOT hold: libtorch's TCPStore has no authentication and no access control.
//! - `list_keys` (LIST_KEYS) hands any client every key, and with it the secret
//!   (`bt/<secret>/joined/1` once rank 1 has arrived, and the Gloo address keys under it, which
//!   name every rank's Gloo listener); `num_keys` and `get` of the listed keys work too;
//! - so an outsider that watches the store while an attempt forms can take a rank that has not
//!   arrived yet and become a member of the group: it sees every collective's data and poisons
//!   the sums ([`an_outsider_that_lists_the_keys_can_take_a_missing_rank`]);
//! - it can also write, overwrite and delete any key, and fill rank 0's memory (8 MiB per value,
//!   any number of keys); before the group forms that can redirect or break the rendezvous.
//!
//! So the secret keeps honest strays out (a stale rank of an earlier attempt on a reused port, a
//! misconfigured job); keeping hostile clients off is the network's job: the workers' rendezvous
//! port range (`bt-worker --port-range`, rank 0's TCPStore) and the Gloo/NCCL ports must be
//! reachable only from the worker pods of the cluster (a NetworkPolicy that admits ingress to
//! them from pods with the worker label only), never from other tenants' pods, the coordinator's
//! clients or outside the cluster.
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bt_worker::dist::{ProcessGroup, Rendezvous};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::harness::*;

/// A fresh secret, as the coordinator would hand out per attempt.
fn secret() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn with_prefix(mut rv: Rendezvous, prefix: &str) -> Rendezvous {
    rv.store_prefix = prefix.to_string();
    rv
}

/// The outsider's side: libtorch's own store client, from Python.
const OUTSIDER_PY: &str = r#"
import datetime, json, socket, sys, time
import torch.distributed as dist

mode, port = sys.argv[1], int(sys.argv[2])

def client(seconds=2.0):
    return dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=seconds))

def times_out(f):
    try:
        f()
        return False
    except Exception as e:
        return "timeout" in str(e).lower()

out = {}
s = client()
if mode == "hijack":
    # wait for the first rank's arrival key, then hand its prefix over
    deadline = time.time() + 30
    while time.time() < deadline:
        keys = [k for k in s.list_keys() if k.startswith("bt/") and "/joined/" in k]
        if keys:
            out["learned"] = keys[0].split("/")[1]
            break
        time.sleep(0.02)
    print(json.dumps(out), flush=True)
    sys.exit(0)

guesses = ["bt-local", "", "default", "secret", "0" * 32, "f" * 32, "attempt-1", "job", "pg0"]
probe = [f"bt/{g}/joined/1" for g in guesses] + [f"bt/{g}/pg0/0/0" for g in guesses]
probe += ["joined/1", "/joined/1", "pg0/0/0", "bt/joined/1", "0", "1"]
out["guessed_hits"] = [k for k in probe if s.check([k])]
out["num_keys"] = s.num_keys()
out["get_guess_times_out"] = times_out(lambda: client(1.0).get("bt/bt-local/joined/1"))
out["wait_guess_times_out"] = times_out(lambda: client(1.0).wait(["bt/default/pg0/0/1"]))

# writes an outsider can make without the secret
out["init_add"] = s.add("init/", 7)
out["init_cas"] = s.compare_set("init/", "7", "-100").decode()
for g in guesses:
    s.set(f"bt/{g}/joined/1", b"1")
    s.set(f"bt/{g}/pg0/0/1", b"not a gloo address")
s.set("joined/1", b"1")
out["deleted_missing"] = [s.delete_key(f"bt/nope{i}/joined/0") for i in range(3)]
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
for i, x in enumerate(socks):
    if i % 2:
        x.sendall(b"\xff\x00 not the store protocol \x01" * 8)
for x in socks:
    x.close()
out["answers_after_flood"] = client().num_keys()

# what every client can do: list the keys, and with them the secret
keys = s.list_keys()
out["listed"] = keys
mine = set(f"bt/{g}/joined/1" for g in guesses) | set(f"bt/{g}/pg0/0/1" for g in guesses)
mine |= {"joined/1", "init/"}
theirs = [k for k in keys if k not in mine]
out["theirs"] = theirs
out["read_theirs"] = {k: len(s.get(k)) for k in theirs}
for k in theirs:
    s.set(k, b"overwritten by an outsider")
out["deleted_theirs"] = [s.delete_key(k) for k in theirs]
out["answers_at_end"] = client().num_keys()
print(json.dumps(out), flush=True)
"#;

fn python() -> String {
    std::env::var("BT_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Starts the outsider script in `mode` against the store on `port`.
fn spawn_outsider(mode: &str, port: u16) -> std::process::Child {
    Command::new(python())
        .args(["-c", OUTSIDER_PY, mode, &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} (a Python with torch: set BT_PYTHON or source scripts/env.sh): {e}",
                python()
            )
        })
}

/// Waits for the outsider and returns the JSON it printed.
fn outsider_result(mut child: std::process::Child) -> Value {
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "the outsider failed ({st:?}):\n{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("outsider said {out:?}: {e}\n{err}"))
}

/// A live group's collective loop: every round all-reduces `(rank + 1) * (round + 1)` and checks
/// the sum; rank 0's stop flag rides in the same all-reduce, so both ranks stop at one round.
fn live_rank(pg: ProcessGroup, rounds: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> Result<u64> {
    let rank = pg.rank();
    let mut round = 0u64;
    loop {
        let v = ((rank + 1) as f64) * (round + 1) as f64;
        let t = Tensor::full([65], v, (Kind::Double, Device::Cpu));
        let flag = if rank == 0 && stop.load(Ordering::SeqCst) {
            1.0
        } else {
            0.0
        };
        let _ = t.get(64).fill_(flag);
        pg.all_reduce_sum(&t)
            .with_context(|| format!("round {round}"))?;
        let want = Tensor::full([64], 3.0 * (round + 1) as f64, (Kind::Double, Device::Cpu));
        assert_close(
            &format!("round {round} sum"),
            &t.narrow(0, 0, 64),
            &want,
            0.0,
        )?;
        let g = pg.all_gather(&Tensor::from_slice(&[rank as f64, round as f64]))?;
        let gathered = Vec::<f64>::try_from(&g.view([-1]))?;
        ensure!(
            gathered == [0.0, round as f64, 1.0, round as f64],
            "round {round} gather {gathered:?}"
        );
        round += 1;
        if rank == 0 {
            rounds.store(round, Ordering::SeqCst);
        }
        if t.double_value(&[64]) >= 1.0 {
            return Ok(round);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The round counter advances by at least `n` within 20 s (the group is live and correct).
fn progresses(rounds: &AtomicU64, n: u64, after: &str) {
    let from = rounds.load(Ordering::SeqCst);
    let start = Instant::now();
    while rounds.load(Ordering::SeqCst) < from + n {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the live group stalled after {after} (round {})",
            rounds.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_outsider_without_the_secret_meets_nobody_and_the_live_group_is_unaffected() {
    let port = free_port();
    let secret = secret();
    let rounds = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let (secret, rounds, stop) = (secret.clone(), rounds.clone(), stop.clone());
            std::thread::spawn(move || -> Result<u64> {
                let rv = with_prefix(rendezvous(rank, 2, port, TIMEOUT), &secret);
                let pg = ProcessGroup::new(&rv).with_context(|| format!("rank {rank} joining"))?;
                live_rank(pg, rounds, stop).with_context(|| format!("rank {rank}"))
            })
        })
        .collect();
    progresses(&rounds, 3, "forming");

    // (b) and (c): the store protocol itself, from another process
    let before = rounds.load(Ordering::SeqCst);
    let o = outsider_result(spawn_outsider("probe", port));
    eprintln!(
        "outsider: {}",
        serde_json::to_string(&o)
            .unwrap()
            .replace(&secret, "<secret>")
    );
    assert!(
        rounds.load(Ordering::SeqCst) > before,
        "no round during the outsider's run"
    );
    assert_eq!(o["guessed_hits"], serde_json::json!([]), "{o}");
    assert_eq!(o["get_guess_times_out"], true, "{o}");
    assert_eq!(o["wait_guess_times_out"], true, "{o}");
    assert_eq!(
        o["init_add"], 7,
        "TCPStore's own counter, untouched by the shim: {o}"
    );
    assert_eq!(o["init_cas"], "-100", "{o}");
    assert_eq!(
        o["deleted_missing"],
        serde_json::json!([false, false, false])
    );
    assert!(o["answers_after_flood"].as_u64().is_some(), "{o}");
    // What does not hold: LIST_KEYS gives every key away, the secret with them. The group's keys
    // are all under bt/<secret>/ (its arrival key and the Gloo address keys).
    let theirs: Vec<&str> = o["theirs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let joined = format!("bt/{secret}/joined/1");
    assert!(
        theirs.contains(&joined.as_str()),
        "list_keys no longer reveals the secret; update this module's docs: {o}"
    );
    assert!(
        theirs
            .iter()
            .all(|k| k.starts_with(&format!("bt/{secret}/"))),
        "a key of the group outside its prefix: {theirs:?}"
    );
    assert!(theirs.len() >= 3, "joined/1 and two Gloo keys: {theirs:?}");
    assert_eq!(
        o["deleted_theirs"],
        serde_json::json!(vec![true; theirs.len()]),
        "the outsider can delete the group's keys: {o}"
    );
    progresses(&rounds, 5, "the outsider's writes, flood and deletes");

    // (a) joining with a wrong prefix (after the outsider's probe, so that its key list holds the
    // group's keys only): nobody there, a timeout that names no prefix
    let stray_timeout = Duration::from_secs(2);
    for wrong in [
        "bt-local",
        "guessed-prefix",
        "0123456789abcdef0123456789abcdef",
    ] {
        let start = Instant::now();
        let err = ProcessGroup::new(&with_prefix(rendezvous(1, 2, port, stray_timeout), wrong))
            .expect_err("a peer with a wrong prefix must not join")
            .to_string();
        let took = start.elapsed();
        assert!(took < stray_timeout + Duration::from_secs(3), "{took:?}");
        assert!(err.to_lowercase().contains("timeout"), "{err}");
        assert!(!err.contains(&secret), "{err}");
        progresses(&rounds, 2, "a stray rank 1");
    }
    let err = ProcessGroup::new(&with_prefix(
        rendezvous(0, 2, port, stray_timeout),
        "guessed-prefix",
    ))
    .expect_err("a second rank 0 cannot host the store")
    .to_string();
    assert!(err.contains("cannot host the store"), "{err}");
    progresses(&rounds, 2, "a stray rank 0");

    // With the secret (learned above) but after the group formed and its keys are gone: a late
    // rank 1 meets nobody either.
    let start = Instant::now();
    let err = ProcessGroup::new(&with_prefix(rendezvous(1, 2, port, stray_timeout), &secret))
        .expect_err("the formed group takes no late joiner")
        .to_string();
    assert!(err.to_lowercase().contains("timeout"), "{err}");
    assert!(start.elapsed() < stray_timeout + Duration::from_secs(3));
    progresses(&rounds, 3, "a late joiner with the secret");

    stop.store(true, Ordering::SeqCst);
    let done: Vec<u64> = ranks
        .into_iter()
        .map(|h| h.join().expect("rank panicked").expect("live rank"))
        .collect();
    assert_eq!(done[0], done[1], "the ranks stopped at different rounds");
    eprintln!("the live group ran {} correct rounds", done[0]);
}

/// What the secret does not do: an outsider watching the store learns it from `list_keys` as soon
/// as rank 1 arrives, takes rank 2 before the real one, and is in the group: it reads the sum and
/// its contribution poisons everyone's.
#[test]
fn an_outsider_that_lists_the_keys_can_take_a_missing_rank() {
    let port = free_port();
    let secret = secret();
    let real: Vec<_> = (0..2)
        .map(|rank| {
            let secret = secret.clone();
            std::thread::spawn(move || -> Result<f64> {
                let rv = with_prefix(rendezvous(rank, 3, port, TIMEOUT), &secret);
                let pg = ProcessGroup::new(&rv).with_context(|| format!("rank {rank} joining"))?;
                let t = Tensor::full([4], (rank + 1) as f64, (Kind::Double, Device::Cpu));
                pg.all_reduce_sum(&t)?;
                pg.barrier()?;
                Ok(t.double_value(&[0]))
            })
        })
        .collect();
    // the outsider connects once the store listens, and polls the key list
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "no store");
        std::thread::sleep(Duration::from_millis(10));
    }
    let o = outsider_result(spawn_outsider("hijack", port));
    let learned = o["learned"]
        .as_str()
        .expect("the outsider learned a prefix");
    assert_eq!(learned, secret, "list_keys revealed the attempt's secret");
    let pg = ProcessGroup::new(&with_prefix(rendezvous(2, 3, port, TIMEOUT), learned))
        .expect("the outsider joins as rank 2");
    let t = Tensor::full([4], 1000.0, (Kind::Double, Device::Cpu));
    pg.all_reduce_sum(&t).expect("the outsider's all-reduce");
    pg.barrier().unwrap();
    let sums: Vec<f64> = real
        .into_iter()
        .map(|h| h.join().unwrap().expect("real rank"))
        .collect();
    // 1 + 2 + 3 had the real rank 2 been there
    assert_eq!(
        sums,
        [1003.0, 1003.0],
        "the outsider's data is in every sum"
    );
    assert_eq!(t.double_value(&[0]), 1003.0, "the outsider sees the sum");
    eprintln!("outsider took rank 2 after {:?}", start.elapsed());
}
