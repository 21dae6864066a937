//! Fuzz-style tests on stable Rust: seeded random and mutated job specs and protocol messages fed
//! to the coordinator's handlers. None may panic; every rejection must say which field it is about
//! (`InvalidArgument` naming a field), except the protocol's own answers (`NotFound` for an unknown
//! id, `FailedPrecondition` for a protocol version mismatch).
use std::panic::{catch_unwind, AssertUnwindSafe};

use bt_common::JobSpec;
use bt_proto::*;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::Core;
use crate::config::{AuthConfig, AuthMode, CoordinatorConfig};
use crate::error::Error;
use crate::store::SqliteStore;

/// A core over a database on tmpfs when there is one (the fuzz commits thousands of transactions).
fn core(dir: &std::path::Path) -> std::sync::Arc<Core> {
    let mut config = CoordinatorConfig {
        db_path: dir.join("state.db"),
        checkpoint_root: dir.join("ckpt"),
        auth: AuthConfig {
            mode: AuthMode::Off,
            ..Default::default()
        },
        ..Default::default()
    };
    config.limits.max_queued_per_owner = usize::MAX;
    config.limits.submit_burst = u32::MAX;
    config.limits.submit_per_minute = u32::MAX;
    let store = SqliteStore::open(&config.db_path).unwrap();
    Core::new(config, Box::new(store)).unwrap()
}

fn tmp() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

const KEYS: &[&str] = &[
    "name",
    "kind",
    "world_size",
    "priority",
    "data.source",
    "data.path",
    "data.limit",
    "data.image_size",
    "data.min_scale",
    "data.threads",
    "data.prefetch",
    "model.backbone",
    "model.projector",
    "model.cifar_stem",
    "model.stem_stride",
    "train.batch_size",
    "train.epochs",
    "train.max_steps",
    "train.lr_weights",
    "train.lambda",
    "train.warmup_epochs",
    "train.loss_form",
    "train.precision",
    "train.memory_format",
    "train.pin_cpus",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "restart.max_restarts",
    "dist.timeout_secs",
    "eval.checkpoint",
    "eval.knn_k",
    "eval.probe_epochs",
    "bogus.key",
    "train.nope",
];

fn value(rng: &mut StdRng) -> String {
    match rng.gen_range(0..14) {
        0 => rng.gen::<i64>().to_string(),
        1 => rng.gen_range(-3i64..300).to_string(),
        2 => format!("{}", rng.gen::<f64>() * 10.0),
        3 => "nan".into(),
        4 => "-inf".into(),
        5 => "true".into(),
        6 => "\"\"".into(),
        7 => format!(
            "\"{}\"",
            [
                "resnet18",
                "synthetic",
                "/",
                "../etc",
                "linear_probe",
                "bf16",
                "x"
            ][rng.gen_range(0..7)]
        ),
        8 => "[]".into(),
        9 => format!("[{}, {}]", rng.gen_range(-5i64..5000), rng.gen::<u32>()),
        10 => format!("\"{}\"", "a".repeat(rng.gen_range(0..300))),
        11 => "{ a = 1 }".into(),
        12 => "18446744073709551615".into(),
        _ => "0".into(),
    }
}

/// A random spec: a valid base, then a few mutations of its text.
fn random_spec(rng: &mut StdRng, bases: &[String]) -> String {
    let mut text = bases[rng.gen_range(0..bases.len())].clone();
    for _ in 0..rng.gen_range(1..4) {
        match rng.gen_range(0..7) {
            0 | 1 => {
                // set a field through a table header
                let key = KEYS[rng.gen_range(0..KEYS.len())];
                let v = value(rng);
                match key.split_once('.') {
                    Some((t, k)) if rng.gen() => text.push_str(&format!("\n[{t}]\n{k} = {v}\n")),
                    _ => text = format!("{key} = {v}\n{text}"),
                }
            }
            2 => {
                // drop a line
                let lines: Vec<&str> = text.lines().collect();
                if !lines.is_empty() {
                    let i = rng.gen_range(0..lines.len());
                    text = lines
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, l)| *l)
                        .collect::<Vec<_>>()
                        .join("\n");
                }
            }
            3 => {
                // flip bytes
                let mut b = text.into_bytes();
                for _ in 0..rng.gen_range(1..4) {
                    if !b.is_empty() {
                        let i = rng.gen_range(0..b.len());
                        b[i] = rng.gen();
                    }
                }
                text = String::from_utf8_lossy(&b).into_owned();
            }
            4 => {
                // truncate
                let cut = rng.gen_range(0..=text.len());
                text = String::from_utf8_lossy(&text.as_bytes()[..cut]).into_owned();
            }
            5 => {
                // random bytes
                let n = rng.gen_range(0..64);
                let b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                text = String::from_utf8_lossy(&b).into_owned();
            }
            _ => {
                // a valid override of a number, possibly out of range
                let key =
                    ["train.batch_size", "world_size", "data.image_size"][rng.gen_range(0..3)];
                if let Ok(s) = JobSpec::from_toml_with_overrides(
                    &text,
                    &[format!("{key}={}", rng.gen_range(0..600))],
                ) {
                    text = s.to_toml();
                }
            }
        }
    }
    text
}

fn check_rejection(what: &str, input: &dyn std::fmt::Debug, e: &Error) {
    match e {
        Error::InvalidArgument { field, .. } if !field.trim().is_empty() => {}
        Error::NotFound { .. } => {}
        Error::FailedPrecondition(m)
            if m.contains("protocol version") || m.contains("live session") => {}
        // A credential bound to another node: the message starts with the field.
        Error::PermissionDenied(m) if m.starts_with("name: ") => {}
        other => panic!("{what}: rejection without a field: {other:?}\ninput: {input:?}"),
    }
}

#[test]
fn ten_thousand_random_specs() {
    let dir = tmp();
    let core = core(dir.path());
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    let bases = vec![
        JobSpec::default().to_toml(),
        "world_size = 2\n[data]\nsource = \"synthetic\"\n[train]\nbatch_size = 8\n".to_string(),
        format!(
            "kind = \"linear_probe\"\n[eval]\ncheckpoint = \"{}/j/1\"\n",
            dir.path().join("ckpt").display()
        ),
    ];
    let (mut accepted, mut rejected, mut panics) = (0, 0, 0);
    for i in 0..10_000 {
        let spec = random_spec(&mut rng, &bases);
        match catch_unwind(AssertUnwindSafe(|| core.submit(&spec, "fuzz"))) {
            Ok(Ok(_)) => accepted += 1,
            Ok(Err(e)) => {
                check_rejection("submit", &spec, &e);
                rejected += 1;
            }
            Err(_) => {
                panics += 1;
                eprintln!("spec #{i} panicked:\n{spec}");
            }
        }
    }
    eprintln!("random specs: {accepted} accepted, {rejected} rejected, {panics} panics");
    assert_eq!(panics, 0);
    assert!(accepted > 0 && rejected > 5_000, "{accepted} / {rejected}");
}

fn pick<'a>(rng: &mut StdRng, v: &'a [String]) -> &'a str {
    &v[rng.gen_range(0..v.len())]
}

fn random_f64(rng: &mut StdRng) -> f64 {
    [f64::NAN, f64::INFINITY, -1.0, 0.0, 1e308, rng.gen()][rng.gen_range(0..6)]
}

fn random_report(rng: &mut StdRng, job_ids: &[String], paths: &[String]) -> TrainerReport {
    use trainer_report::Body;
    let body = match rng.gen_range(0..7) {
        0 => None,
        1 => Some(Body::Started(TrainerStarted { pid: rng.gen() })),
        2 => Some(Body::Metrics(TrainMetrics {
            step: rng.gen_range(0..1_000_000),
            total_steps: rng.gen(),
            loss: random_f64(rng),
            images_per_sec: random_f64(rng),
            ..Default::default()
        })),
        3 => Some(Body::Eval(EvalResult {
            step: rng.gen(),
            kind: ["knn", "linear_probe", "", "x"][rng.gen_range(0..4)].into(),
            top1: random_f64(rng),
            ..Default::default()
        })),
        4 => Some(Body::Checkpoint(CheckpointInfo {
            step: rng.gen_range(0..100),
            path: pick(rng, paths).to_string(),
            size_bytes: rng.gen(),
            ..Default::default()
        })),
        5 => Some(Body::Notice(Notice {
            level: ["info", "warn", "error", ""][rng.gen_range(0..4)].into(),
            message: "n".repeat(rng.gen_range(0..100)),
            ..Default::default()
        })),
        _ => Some(Body::Exit(TrainerExit {
            success: rng.gen(),
            code: rng.gen(),
            signal: rng.gen_range(-1..20),
            user_error: rng.gen(),
            reason: "r".into(),
            last_log_lines: vec!["l".into(); rng.gen_range(0..3)],
            preempted: rng.gen(),
        })),
    };
    TrainerReport {
        job_id: pick(rng, job_ids).to_string(),
        epoch: [0, 1, 2, 3, rng.gen()][rng.gen_range(0..5)],
        rank: [0, 1, 7, u32::MAX][rng.gen_range(0..4)],
        body,
    }
}

#[test]
fn ten_thousand_random_protocol_messages() {
    let dir = tmp();
    let core = core(dir.path());
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    let register = RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        name: "fuzz-node".into(),
        host: "127.0.0.1".into(),
        devices: vec![
            Device {
                index: 0,
                kind: "cpu".into(),
                name: "c0".into(),
                ..Default::default()
            },
            Device {
                index: 1,
                kind: "cpu".into(),
                name: "c1".into(),
                ..Default::default()
            },
        ],
        port_range_start: 30000,
        port_range_end: 30010,
        unhealthy: String::new(),
    };
    let worker_id = core.register(&register, None).unwrap();
    let hello = |running| WorkerMessage {
        msg: Some(worker_message::Msg::Hello(Hello {
            worker_id: worker_id.to_string(),
            protocol_version: PROTOCOL_VERSION,
            running,
            exited: vec![],
        })),
    };
    let mut session = core.open_session(Some(hello(vec![]))).unwrap();
    let mut job_ids = vec![
        String::new(),
        "not-a-uuid".into(),
        uuid::Uuid::new_v4().to_string(),
    ];
    for ws in [1, 2] {
        let j = core
            .submit(
                &format!(
                    "world_size = {ws}\n[data]\nsource = \"synthetic\"\n[train]\nbatch_size = 8\n"
                ),
                "fuzz",
            )
            .unwrap();
        job_ids.push(j.job.id.to_string());
    }
    let root = dir.path().join("ckpt");
    let mut paths = vec![
        "/".to_string(),
        String::new(),
        "..".into(),
        format!("{}/../../etc", root.display()),
        root.display().to_string(),
    ];
    for id in &job_ids[3..] {
        paths.push(format!("{}/{id}/10", root.display()));
        paths.push(format!("{}/{id}/../x", root.display()));
    }
    let (mut ok, mut rejected, mut panics) = (0, 0, 0);
    for i in 0..10_000 {
        if i % 500 == 0 {
            let _ = core.schedule();
        }
        let kind = rng.gen_range(0..10);
        let r = catch_unwind(AssertUnwindSafe(|| match kind {
            0 => {
                // raw bytes that happen to decode
                let n = rng.gen_range(0..48);
                let b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                match WorkerMessage::decode(b.as_slice()) {
                    Ok(m) => core.handle_message(worker_id, session.conn_id, m),
                    Err(_) => Ok(()),
                }
            }
            1 => {
                let mut r = register.clone();
                match rng.gen_range(0..8) {
                    0 => r.protocol_version = rng.gen(),
                    1 => {
                        r.name = ["", " ", "a b", &"n".repeat(300), "x\ny", "fuzz-node"]
                            [rng.gen_range(0..6)]
                        .into()
                    }
                    2 => r.devices[1].index = 0,
                    3 => r.port_range_end = rng.gen(),
                    4 => {
                        // Any number of devices, up to far past the cap.
                        let n = rng.gen_range(0..5000);
                        r.devices = (0..n)
                            .map(|i| Device {
                                index: i,
                                kind: "cpu".into(),
                                ..Default::default()
                            })
                            .collect();
                    }
                    5 => {
                        r.host = ["h\n", &"h".repeat(1000), "\u{1b}[2J"][rng.gen_range(0..3)].into()
                    }
                    6 => r.devices[0].name = "gpu\n0".repeat(rng.gen_range(1..100)),
                    _ => r.devices[0].kind = "tpu".into(),
                }
                // A credential bound to another node, half the time.
                let bound = rng.gen_bool(0.5).then_some("other-node");
                core.register(&r, bound).map(|_| ())
            }
            2 => {
                let m = match rng.gen_range(0..3) {
                    0 => WorkerMessage { msg: None },
                    1 => WorkerMessage {
                        msg: Some(worker_message::Msg::Hello(Hello {
                            worker_id: pick(&mut rng, &job_ids).to_string(),
                            protocol_version: rng.gen_range(0..4),
                            running: vec![RunningTrainer {
                                job_id: pick(&mut rng, &job_ids).to_string(),
                                epoch: rng.gen(),
                                rank: rng.gen(),
                            }],
                            exited: vec![],
                        })),
                    },
                    _ => WorkerMessage {
                        msg: Some(worker_message::Msg::Heartbeat(Heartbeat {
                            time_ms: rng.gen(),
                        })),
                    },
                };
                core.open_session(Some(m)).map(|_| ())
            }
            _ => {
                let rep = random_report(&mut rng, &job_ids, &paths);
                core.handle_message(
                    worker_id,
                    session.conn_id,
                    WorkerMessage {
                        msg: Some(worker_message::Msg::Report(rep)),
                    },
                )
            }
        }));
        match r {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                check_rejection("protocol message", &kind, &e);
                rejected += 1;
            }
            Err(_) => {
                panics += 1;
                eprintln!("message #{i} (kind {kind}) panicked");
            }
        }
        // A successful hello replaced the session: use the current one.
        while let Ok(m) = session.rx.try_recv() {
            if m.is_err() {
                session = core.open_session(Some(hello(vec![]))).unwrap();
                break;
            }
        }
    }
    eprintln!("protocol messages: {ok} handled, {rejected} rejected, {panics} panics");
    assert_eq!(panics, 0);
    assert!(ok > 1000 && rejected > 500, "{ok} / {rejected}");
    // No forged checkpoint outside its job's directory was committed.
    for id in &job_ids[3..] {
        let id: bt_common::JobId = id.parse().unwrap();
        for c in core.list_checkpoints(id).unwrap() {
            let ok = bt_common::paths::lexically_within(
                "p",
                std::path::Path::new(&c.path),
                &root.join(id.to_string()),
            );
            assert!(ok.is_ok(), "committed {}", c.path);
        }
    }
}
