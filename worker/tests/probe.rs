//! The linear-probe job on a small real cut of Fashion-MNIST: its loss falls, its accuracy beats
//! chance, both baselines (default-init network, raw pixels) and the margin are reported next to it;
//! a missing checkpoint is a clear error.
use bt_proto::trainer_event::Body;
use bt_proto::EvalResult;
use bt_worker::trainer::{run, Reporter};

mod common;
use common::{assignment, fashion_data, TINY_MODEL};

fn pretrain_spec() -> String {
    format!(
        r#"{data}{TINY_MODEL}
[train]
batch_size = 32
max_steps = 2
warmup_epochs = 0
log_every = 1
[eval]
knn_at_end = false
"#,
        data = fashion_data(128)
    )
}

fn probe_spec(ck: &str) -> String {
    format!(
        r#"
kind = "linear_probe"
[data]
limit = 512
[eval]
checkpoint = "{ck}"
test_size = 256
probe_epochs = 10
baseline = true
"#
    )
}

fn evals(rep: &Reporter) -> Vec<EvalResult> {
    rep.collected
        .iter()
        .filter_map(|e| match &e.body {
            Some(Body::Eval(r)) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn train_loss(e: &EvalResult) -> f64 {
    e.detail
        .rsplit("train loss ")
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no train loss in {:?}", e.detail))
}

#[test]
fn probe_learns_and_reports_baseline() {
    let dir = tempfile::tempdir().unwrap();
    run(
        &assignment("probe-test", pretrain_spec(), dir.path()),
        bt_common::domain::DeviceKind::Cpu,
        &mut Reporter::collecting(),
    )
    .expect("pretrain");
    let ck = dir.path().join("00000002");
    let mut rep = Reporter::collecting();
    run(
        &assignment("probe-test", probe_spec(ck.to_str().unwrap()), dir.path()),
        bt_common::domain::DeviceKind::Cpu,
        &mut rep,
    )
    .expect("probe");
    let ev = evals(&rep);
    let epochs: Vec<&EvalResult> = ev
        .iter()
        .filter(|e| e.kind == "linear_probe_epoch")
        .collect();
    assert_eq!(epochs.len(), 10);
    let (first, last) = (train_loss(epochs[0]), train_loss(epochs[9]));
    assert!(last < first, "probe loss did not fall: {first} -> {last}");
    let summary = ev
        .iter()
        .find(|e| e.kind == "linear_probe")
        .expect("summary");
    // 10 classes: chance is 10%.
    assert!(summary.top1 > 0.3, "top-1 {}", summary.top1);
    assert!(summary.top5 >= summary.top1);
    assert!(summary.baseline_top1 > 0.0, "no baseline");
    // Both baselines, each the best epoch of its own probe, and the margin over the better.
    assert!(summary.has_baselines);
    let best = |kind: &str| {
        ev.iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.top1)
            .fold(0.0, f64::max)
    };
    assert_eq!(summary.baseline_top1, best("linear_probe_baseline_epoch"));
    assert_eq!(
        summary.raw_pixels_top1,
        best("linear_probe_raw_pixels_epoch")
    );
    // Raw pixels of Fashion-MNIST are linearly separable far above chance.
    assert!(summary.raw_pixels_top1 > 0.5, "{}", summary.raw_pixels_top1);
    let better = summary.baseline_top1.max(summary.raw_pixels_top1);
    assert!((summary.margin - (summary.top1 - better)).abs() < 1e-12);
}

#[test]
fn probe_of_missing_checkpoint_is_a_clear_user_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-checkpoint");
    let err = match run(
        &assignment(
            "probe-test",
            probe_spec(missing.to_str().unwrap()),
            dir.path(),
        ),
        bt_common::domain::DeviceKind::Cpu,
        &mut Reporter::collecting(),
    ) {
        Ok(_) => panic!("probe of a missing checkpoint succeeded"),
        Err(e) => e,
    };
    assert!(err.is_user_error());
    assert!(err.to_string().contains("no-such-checkpoint"), "{err}");
}
