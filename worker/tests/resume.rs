//! A run resumed from a checkpoint continues exactly: the same losses, step for step, as the run
//! that was not interrupted (CPU, fixed seed). Also: the trainer refuses a corrupt checkpoint.
use bt_proto::trainer_event::Body;
use bt_proto::Assignment;
use bt_worker::trainer::{run, Reporter};

mod common;

fn spec() -> String {
    format!(
        r#"world_size = 1
{data}{model}
[train]
batch_size = 16
epochs = 2
max_steps = 8
warmup_epochs = 0.5
log_every = 1
seed = 7
[checkpoint]
every_steps = 3
[eval]
knn_at_end = false
"#,
        data = common::fashion_data(96),
        model = common::TINY_MODEL,
    )
}

fn assignment(dir: &std::path::Path, resume_from: &str) -> Assignment {
    Assignment {
        resume_from: resume_from.into(),
        ..common::assignment("resume-test", spec(), dir)
    }
}

fn losses(rep: &Reporter) -> Vec<(u64, f64)> {
    rep.collected
        .iter()
        .filter_map(|e| match &e.body {
            Some(Body::Metrics(m)) => Some((m.step, m.loss)),
            _ => None,
        })
        .collect()
}

#[test]
fn resumed_run_matches_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut full = Reporter::collecting();
    run(
        &assignment(dir.path(), ""),
        bt_common::domain::DeviceKind::Cpu,
        &mut full,
    )
    .expect("full run");
    let full = losses(&full);
    assert_eq!(full.len(), 8);

    // Resume from the checkpoint written after step 3: mid-epoch (6 steps per epoch), so the loader
    // must continue at the exact position of the permutation.
    let ck = dir.path().join("00000003");
    assert!(ck.join("meta.json").exists(), "no checkpoint at step 3");
    let dir2 = tempfile::tempdir().unwrap();
    let mut resumed = Reporter::collecting();
    run(
        &assignment(dir2.path(), ck.to_str().unwrap()),
        bt_common::domain::DeviceKind::Cpu,
        &mut resumed,
    )
    .expect("resumed run");
    let resumed = losses(&resumed);
    assert_eq!(resumed.first().map(|l| l.0), Some(4));
    for (r, f) in resumed.iter().zip(&full[3..]) {
        assert_eq!(r.0, f.0);
        // Same operations on the same inputs in the same order: bit-identical on CPU.
        assert_eq!(r.1, f.1, "loss at step {} differs after resuming", r.0);
    }
    assert_eq!(resumed.len(), 5);
}

#[test]
fn corrupt_checkpoint_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut rep = Reporter::collecting();
    let spec = spec().replace("max_steps = 8", "max_steps = 3");
    let mut a = assignment(dir.path(), "");
    a.spec_toml = spec.clone();
    run(&a, bt_common::domain::DeviceKind::Cpu, &mut rep).expect("run");
    let ck = dir.path().join("00000003");
    let model = ck.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let mut a = assignment(dir.path(), ck.to_str().unwrap());
    a.spec_toml = spec;
    let err = match run(
        &a,
        bt_common::domain::DeviceKind::Cpu,
        &mut Reporter::collecting(),
    ) {
        Ok(_) => panic!("a truncated checkpoint was accepted"),
        Err(e) => e,
    };
    assert!(err.is_user_error());
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn a_corrupt_newest_checkpoint_falls_back_to_the_one_before() {
    // Checkpoints at steps 3 and 6; the newest one is then truncated.
    let dir = tempfile::tempdir().unwrap();
    let spec = spec().replace("max_steps = 8", "max_steps = 6");
    let mut a = assignment(dir.path(), "");
    a.spec_toml = spec.clone();
    let mut full = Reporter::collecting();
    run(&a, bt_common::domain::DeviceKind::Cpu, &mut full).expect("run");
    let (older, newest) = (dir.path().join("00000003"), dir.path().join("00000006"));
    let model = newest.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();

    let dir2 = tempfile::tempdir().unwrap();
    let mut a = assignment(dir2.path(), newest.to_str().unwrap());
    a.spec_toml = spec.clone();
    a.resume_fallbacks = vec![older.to_str().unwrap().into()];
    let mut rep = Reporter::collecting();
    run(&a, bt_common::domain::DeviceKind::Cpu, &mut rep).expect("resumed from the older one");
    let resumed = losses(&rep);
    assert_eq!(resumed.first().map(|l| l.0), Some(4), "resumed at step 3");
    assert_eq!(resumed, losses(&full)[3..], "and continues exactly");
    let notices: Vec<String> = rep
        .collected
        .iter()
        .filter_map(|e| match &e.body {
            Some(Body::Notice(n)) => Some(n.message.clone()),
            _ => None,
        })
        .collect();
    assert!(
        notices
            .iter()
            .any(|n| n.contains("00000006") && n.contains("not usable")),
        "{notices:?}"
    );
    assert!(
        notices.iter().any(|n| n.contains("resumed from")),
        "{notices:?}"
    );
}
