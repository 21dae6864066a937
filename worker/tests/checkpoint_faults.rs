//! A checkpoint volume that cannot take the write (full, or a file-size limit): each failed write
//! is a warning notice on the job and never a checkpoint report, so the coordinator never commits
//! it and the previous committed checkpoint stays the resume point; training goes on, and the
//! half-written directory is refused by verification (no `meta.json`).
use std::os::unix::process::CommandExt;

use bt_proto::trainer_event::Body;
use bt_proto::{Assignment, TrainerEvent};
use prost::Message;

mod common;
use common::{assignment, fashion_data, start_trainer, trainer_command, TINY_MODEL};

#[test]
fn a_failed_checkpoint_write_is_a_notice_not_a_checkpoint_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "world_size = 1\n{data}{TINY_MODEL}[train]\nbatch_size = 16\nmax_steps = 4\n\
         warmup_epochs = 0\nlog_every = 1\n[checkpoint]\nevery_steps = 2\n[eval]\n\
         knn_at_end = false\n",
        data = fashion_data(64)
    );
    let a: Assignment = assignment("full-disk", spec, dir.path());
    let mut cmd = trainer_command();
    // SAFETY: setrlimit(2) only, between fork and exec. No file may grow past 4 KiB: every
    // checkpoint write fails part-way, as on a full volume (the trainer ignores SIGXFSZ, so the
    // write fails with EFBIG instead of killing it).
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 4096,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = start_trainer(cmd, &a);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the trainer goes on: {stderr}");
    let mut buf = out.stdout.as_slice();
    let (mut steps, mut failed, mut reported) = (Vec::new(), Vec::new(), 0);
    while !buf.is_empty() {
        match TrainerEvent::decode_length_delimited(&mut buf)
            .expect("event")
            .body
        {
            Some(Body::Metrics(m)) => steps.push(m.step),
            Some(Body::Notice(n)) if n.message.contains("checkpoint at step") => {
                failed.push(n.message)
            }
            Some(Body::Checkpoint(_)) => reported += 1,
            _ => {}
        }
    }
    assert_eq!(steps, vec![1, 2, 3, 4], "every step trained");
    assert_eq!(
        reported, 0,
        "a failed write is never reported as a checkpoint"
    );
    assert_eq!(failed.len(), 2, "one notice per failed write: {failed:?}");
    assert!(
        failed[0].contains("step 2") && failed[0].contains("failed"),
        "{failed:?}"
    );
    assert!(
        failed.iter().all(|m| m.contains("File too large")),
        "the notice says why: {failed:?}"
    );
    // What the failed write left behind is not a checkpoint.
    let e = bt_worker::checkpoint::verify(&dir.path().join("00000002"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("meta.json"), "{e}");
}
