//! World-size invariance through the real trainer (model with SyncBN, data loader, all-gathered
//! global-batch loss, bucketed gradient all-reduce, LARS): one rank with global batch N, two with N/2
//! and four with N/4 give the same losses and the same parameters. With SyncBN off they differ, so
//! the test can fail. An elastic restart (a checkpoint written at four ranks, resumed at two)
//! continues as the four-rank run does.
use std::collections::HashMap;
use std::path::Path;

use bt_proto::trainer_event::Body;

use bt_proto::{Assignment, TrainerEvent};
use prost::Message;
use tch::Tensor;

mod common;
use common::{assignment, fashion_data, start_trainer, trainer_command, TINY_MODEL};

fn spec(world: u32, sync_bn: bool, extra_train: &str) -> String {
    format!(
        r#"world_size = {world}
{data}{TINY_MODEL}sync_bn = {sync_bn}
[train]
batch_size = 16
max_steps = 3
warmup_epochs = 0
log_every = 1
seed = 3
lr_weights = 0.5
{extra_train}
[eval]
knn_at_end = false
[dist]
timeout_secs = 30
"#,
        data = fashion_data(128)
    )
}

fn free_port() -> u32 {
    bt_common::net::free_loopback_port()
        .expect("a free port")
        .into()
}

/// Runs `world` ranks as real trainer processes (`bt-worker train`, assignment on stdin, events on
/// stdout); returns rank 0's losses and final parameters.
fn train(world: u32, sync_bn: bool, dir: &Path) -> (Vec<f64>, HashMap<String, Tensor>) {
    train_with(world, sync_bn, "", dir)
}

fn train_with(
    world: u32,
    sync_bn: bool,
    extra_train: &str,
    dir: &Path,
) -> (Vec<f64>, HashMap<String, Tensor>) {
    let losses = run_ranks(&spec(world, sync_bn, extra_train), world, dir, "");
    let params = bt_worker::model::read_safetensors(&dir.join("00000003/model.safetensors"))
        .expect("final checkpoint");
    (losses.into_iter().map(|(_, l)| l).collect(), params)
}

/// Runs `spec` on `world` ranks (the assignment's world size, whatever the spec's), checkpoints
/// under `dir`, resuming from `resume_from` when not empty; returns rank 0's (step, loss) pairs.
fn run_ranks(spec: &str, world: u32, dir: &Path, resume_from: &str) -> Vec<(u64, f64)> {
    let port = free_port();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            let a = Assignment {
                rank,
                world_size: world,
                master_port: port,
                resume_from: resume_from.into(),
                ..assignment("inv", spec.to_string(), dir)
            };
            start_trainer(trainer_command(), &a)
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("trainer"))
        .collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r} of {world} failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mut buf = outs[0].stdout.as_slice();
    let mut losses = Vec::new();
    while !buf.is_empty() {
        let ev = TrainerEvent::decode_length_delimited(&mut buf).expect("event");
        if let Some(Body::Metrics(m)) = ev.body {
            losses.push((m.step, m.loss));
        }
    }
    losses
}

fn max_rel_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for (k, ta) in a {
        let tb = &b[k];
        if ta.kind() == tch::Kind::Int64 {
            continue;
        }
        let d = (ta - tb).abs().max().double_value(&[]);
        let scale = ta.abs().max().double_value(&[]).max(1e-3);
        if d / scale > worst.0 {
            worst = (d / scale, k.clone());
        }
    }
    worst
}

/// Per tensor (integer ones skipped): how many elements of `b` differ from `a`'s by more than
/// `tol` of the tensor's largest magnitude (at least 1e-3), and how many it has.
fn elements_beyond(
    a: &HashMap<String, Tensor>,
    b: &HashMap<String, Tensor>,
    tol: f64,
) -> Vec<(String, i64, i64)> {
    let mut out = Vec::new();
    for (k, ta) in a {
        if ta.kind() == tch::Kind::Int64 {
            continue;
        }
        let scale = ta.abs().max().double_value(&[]).max(1e-3);
        let beyond = (ta - &b[k])
            .abs()
            .gt(tol * scale)
            .sum(tch::Kind::Int64)
            .int64_value(&[]);
        out.push((k.clone(), beyond, ta.numel() as i64));
    }
    out
}

#[test]
fn one_two_and_four_ranks_train_identically() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (l1, p1) = train(1, true, dirs[0].path());
    let (l2, p2) = train(2, true, dirs[1].path());
    let (l4, p4) = train(4, true, dirs[2].path());
    assert_eq!(l1.len(), 3);
    // fp32 with sums taken in a different order per split: agreement to ~1e-5 relative is what
    // rounding allows after three steps; 1e-4 leaves margin while still catching any real change
    // (local BN statistics move the loss by whole percents, see below).
    for (w, l) in [(2, &l2), (4, &l4)] {
        for (a, b) in l1.iter().zip(l.iter()) {
            assert!(
                (a - b).abs() <= 1e-4 * a.abs(),
                "W={w}: losses {l1:?} vs {l:?}"
            );
        }
        let (d, k) = max_rel_diff(&p1, if w == 2 { &p2 } else { &p4 });
        eprintln!("W={w} vs W=1: losses {l:?} vs {l1:?}; worst parameter {k}: {d:e} relative");
        assert!(d < 1e-4, "W={w}: parameter {k} differs by {d:e} (relative)");
    }
    // Without SyncBN each rank normalises with its own half batch: the method changes.
    let (l2_local, _) = train(2, false, dirs[3].path());
    let rel = l1
        .iter()
        .zip(&l2_local)
        .map(|(a, b)| (a - b).abs() / a.abs())
        .fold(0.0, f64::max);
    eprintln!("W=2 without SyncBN: losses {l2_local:?} (up to {rel:.3} relative)");
    assert!(
        rel > 1e-2,
        "local BN gave the same losses ({l1:?} vs {l2_local:?})"
    );
}

/// The GPU settings forced on the CPU (bf16 autocast, channels-last), through two real trainer
/// processes: training runs, the checkpoint holds fp32 weights in torchvision's (contiguous)
/// order, and the losses and parameters stay close to the fp32 run's without being equal (bf16
/// really ran). bf16 keeps 8 significant bits, so after three steps a few percent is expected.
#[test]
fn bf16_channels_last_training_stays_close_to_fp32() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (l32, p32) = train(1, true, dirs[0].path());
    let (l16, p16) = train_with(
        2,
        true,
        "precision = \"bf16\"\nmemory_format = \"channels-last\"",
        dirs[1].path(),
    );
    assert_eq!(l16.len(), 3);
    let rel = l32
        .iter()
        .zip(&l16)
        .map(|(a, b)| (a - b).abs() / a.abs())
        .fold(0.0, f64::max);
    // Whole-model relative distance ‖p16 − p32‖ / ‖p32‖ over the float tensors (per-tensor
    // ratios are meaningless for BN biases that start at zero and moved three small steps).
    let (mut num, mut den) = (0.0, 0.0);
    for (name, a) in &p32 {
        if a.kind() != tch::Kind::Float {
            continue;
        }
        let b = &p16[name];
        num += (a - b).square().sum(tch::Kind::Double).double_value(&[]);
        den += a.square().sum(tch::Kind::Double).double_value(&[]);
    }
    let d = (num / den).sqrt();
    eprintln!("bf16 vs fp32: losses {l16:?} vs {l32:?} (up to {rel:e}); parameters {d:e}");
    assert!(
        rel < 5e-2,
        "bf16 losses too far from fp32: {l16:?} vs {l32:?}"
    );
    assert!(
        rel > 0.0 && d > 0.0,
        "bf16 run identical to fp32: autocast off?"
    );
    assert!(d < 1e-2, "parameters differ by {d:e} from the fp32 run");
    for (name, t) in &p16 {
        assert_eq!(t.kind(), p32[name].kind(), "{name}: checkpoint kind");
    }
}

/// World size 4, elastic down to 2, a checkpoint after every step, six steps (one LR schedule
/// over all six, so a run stopped early is not the same run: the resume starts from run A's own
/// step-3 checkpoint).
fn elastic_spec() -> String {
    format!(
        r#"world_size = 4
{data}{TINY_MODEL}sync_bn = true
[train]
batch_size = 16
max_steps = 6
warmup_epochs = 0.25
log_every = 1
seed = 3
lr_weights = 0.5
[checkpoint]
every_steps = 1
keep_last = 0
[elastic]
min_world_size = 2
[eval]
knn_at_end = false
[dist]
timeout_secs = 30
"#,
        data = fashion_data(128)
    )
}

/// An elastic restart: the checkpoint run A (4 ranks) wrote after step 3, resumed on 2 ranks,
/// gives steps 4–6 the losses and the final parameters of run A's own steps 4–6.
#[test]
fn resume_at_two_ranks_from_a_four_rank_checkpoint_continues_identically() {
    let spec = elastic_spec();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let full = run_ranks(&spec, 4, a.path(), "");
    assert_eq!(
        full.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    let ck = a.path().join("00000003");
    assert!(ck.join("meta.json").exists(), "no checkpoint at step 3");
    let resumed = run_ranks(&spec, 2, b.path(), ck.to_str().unwrap());
    assert_eq!(
        resumed.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [4, 5, 6],
        "the resume continues at step 4"
    );
    let mut worst_loss: f64 = 0.0;
    for ((step, l2), (_, l4)) in resumed.iter().zip(&full[3..]) {
        let rel = (l2 - l4).abs() / l4.abs();
        worst_loss = worst_loss.max(rel);
        assert!(
            rel <= 1e-4,
            "step {step}: loss {l2} at W=2 after the resume, {l4} at W=4 ({rel:e} relative)"
        );
    }
    let read = |d: &Path| {
        bt_worker::model::read_safetensors(&d.join("00000006/model.safetensors"))
            .expect("final checkpoint")
    };
    let (pa, pb) = (read(a.path()), read(b.path()));
    let (d, k) = max_rel_diff(&pa, &pb);
    eprintln!(
        "resume at W=2 from W=4's step 3: losses {resumed:?} vs {:?} (up to {worst_loss:e} \
         relative); worst parameter {k}: {d:e} relative",
        &full[3..]
    );
    // Four ranks and two sum in different orders, and the rounding can put a value that sits on
    // a ReLU's edge on the other side: the few elements it feeds then move by a whole update
    // (one channel of a batch norm's γ and β, at 1e-2 of the tensor's scale). Every tensor must
    // agree to 1e-4 of its scale in all but 1 % of its elements; a resume that lost state (the
    // momentum, running statistics, the schedule's step) moves nearly all of them.
    for (name, beyond, n) in elements_beyond(&pa, &pb, 1e-4) {
        assert!(
            beyond * 100 <= n,
            "{name}: {beyond} of {n} elements differ by more than 1e-4 (relative)"
        );
    }
}

/// A world size the spec does not allow (3 does not split the global batch of 16) is refused
/// before any rendezvous, naming the sizes it allows.
#[test]
fn an_assignment_outside_the_allowed_world_sizes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = Assignment {
        world_size: 3,
        ..assignment("inv", elastic_spec(), dir.path())
    };
    let mut rep = bt_worker::trainer::Reporter::collecting();
    let e = bt_worker::trainer::run(&a, bt_common::domain::DeviceKind::Cpu, &mut rep)
        .expect_err("a 3-rank assignment of a 4-rank job elastic to 2");
    let msg = e.to_string();
    assert!(msg.contains("world_size 4 runs at 4 or 2"), "{msg}");
}
