//! End-to-end: the real coordinator, worker daemons, trainer processes and btctl on loopback, a real
//! (tiny) Barlow Twins job on Fashion-MNIST. Node faults (preemption, drains, partitions, kills,
//! hangs) are in `node_faults.rs`.
use std::time::Duration;

use bt_tests::{stderr, stdout, wait_for, Cluster, TINY};

const MINUTE: Duration = Duration::from_secs(60);

#[test]
fn two_rank_job_streams_metrics_and_succeeds() {
    let c = Cluster::start(2, 1);
    let id = c.submit(TINY, &[]);
    let out = c.btctl(&["watch", "--plain", &id]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "watch failed: {text}\n{}",
        stderr(&out)
    );
    assert!(text.contains("step 2/6"), "no streamed metrics in:\n{text}");
    assert!(text.contains("step 6/6"), "no final metrics in:\n{text}");
    assert!(text.contains("eval: knn"), "no kNN result in:\n{text}");
    assert!(
        text.contains("job ") && text.contains(" succeeded"),
        "{text}"
    );
    let job = c.job(&id);
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["placement"].as_array().map(Vec::len), Some(2));
    let m = &job["last_metrics"];
    assert_eq!(m["step"], 6);
    assert!(m["loss"].as_f64().is_some_and(f64::is_finite));
    assert_eq!(job["evals"][0]["kind"], "knn");
    // Retention keeps the last 2 of the checkpoints at steps 2, 4, 6.
    let cps = c.btctl_json(&["checkpoints", &id]).expect("checkpoints");
    let steps: Vec<u64> = cps
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["step"].as_u64())
        .collect();
    assert_eq!(steps.iter().max(), Some(&6), "{cps}");
    assert!(steps.len() <= 2, "retention kept {steps:?}");
    let last = cps
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["step"] == 6)
        .unwrap();
    assert!(std::path::Path::new(last["path"].as_str().unwrap()).is_dir());
    // Both trainers have exited and the devices are free again.
    wait_for("trainers to exit", MINUTE, || {
        c.trainer_pids().is_empty().then_some(())
    });
}

#[test]
fn gang_scheduling_queues_the_second_job_until_devices_free() {
    let c = Cluster::start(2, 1);
    let first = c.submit(TINY, &["train.max_steps=12", "name=first"]);
    let second = c.submit(TINY, &["name=second"]);
    // While the first job holds both devices, the second waits in the queue.
    c.wait_state(&first, &["running"], MINUTE);
    let s = c.job(&second);
    assert_eq!(
        s["state"], "queued",
        "second job started while the first held the devices"
    );
    c.wait_state(&first, &["succeeded"], 3 * MINUTE);
    let s = c.wait_state(&second, &["succeeded"], 3 * MINUTE);
    assert_eq!(s["last_metrics"]["step"], 6);
}

#[test]
fn cancel_stops_the_trainers() {
    let c = Cluster::start(2, 1);
    let id = c.submit(TINY, &["train.max_steps=100000", "train.epochs=1000"]);
    c.wait_state(&id, &["running"], MINUTE);
    wait_for("two trainers", MINUTE, || {
        (c.trainer_pids().len() == 2).then_some(())
    });
    let out = c.btctl(&["cancel", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("cancelled"));
    // Stop deadline: SIGTERM, then SIGKILL after the daemons' 5 s grace.
    wait_for("trainers to stop", Duration::from_secs(15), || {
        c.trainer_pids().is_empty().then_some(())
    });
    assert_eq!(c.job(&id)["state"], "cancelled");
    wait_for("devices released", MINUTE, || {
        let ws = c.btctl_json(&["workers"])?;
        ws.as_array()?
            .iter()
            .all(|w| w["busy_devices"] == 0)
            .then_some(())
    });
}

#[test]
fn coordinator_kill9_and_restart_keeps_jobs_and_metrics() {
    let mut c = Cluster::start(2, 1);
    let done = c.submit(TINY, &["name=done-before"]);
    c.wait_state(&done, &["succeeded"], 3 * MINUTE);
    let id = c.submit(
        TINY,
        &[
            "train.max_steps=40",
            "train.epochs=3",
            "train.log_every=1",
            "checkpoint.every_steps=10",
            "name=survivor",
        ],
    );
    wait_for("metrics before the crash", 2 * MINUTE, || {
        let j = c.btctl_json(&["get", &id])?;
        (j["last_metrics"]["step"].as_u64()? >= 2).then_some(())
    });
    c.kill_coordinator();
    c.start_coordinator();
    // Both jobs and their history survived; the daemons came back on their own.
    assert_eq!(c.job(&done)["state"], "succeeded");
    assert!(c.job(&id)["last_metrics"]["step"].as_u64().unwrap_or(0) >= 2);
    c.wait_workers_online(2);
    let out = c.btctl(&["watch", "--plain", &id]);
    let text = stdout(&out);
    assert!(
        text.contains("step 1/40"),
        "history before the crash not replayed:\n{text}"
    );
    assert!(
        text.contains("step 2/40"),
        "history before the crash not replayed:\n{text}"
    );
    let job = c.job(&id);
    assert_eq!(job["state"], "succeeded", "{job}");
    let replay = c.btctl(&["watch", "--plain", &done]);
    assert!(stdout(&replay).contains("step 6/6"));
}

#[test]
fn killed_trainer_fails_the_job_with_the_reason() {
    let c = Cluster::start(2, 1);
    let id = c.submit(
        TINY,
        &[
            "train.max_steps=100000",
            "train.epochs=1000",
            "restart.max_restarts=0",
        ],
    );
    c.wait_state(&id, &["running"], MINUTE);
    let pids = wait_for("two trainers", MINUTE, || {
        let p = c.trainer_pids();
        (p.len() == 2).then_some(p)
    });
    // SAFETY: kill(2) on a trainer process this test's cluster started.
    unsafe {
        libc::kill(pids[0] as i32, libc::SIGKILL);
    }
    let job = c.wait_state(&id, &["failed"], MINUTE);
    let reason = job["failure_reason"].as_str().unwrap_or("");
    assert!(reason.contains("signal 9"), "failure reason: {reason}");
    let out = c.btctl(&["get", &id]);
    assert!(stdout(&out).contains("signal 9"));
    // The surviving rank is stopped too (told by the coordinator, or its collective times out).
    wait_for("the other trainer to stop", MINUTE, || {
        c.trainer_pids().is_empty().then_some(())
    });
}

#[test]
fn bad_input_gets_clear_errors() {
    let c = Cluster::start(1, 1);
    let cases: &[(&str, &[&str], &str)] = &[
        (TINY, &["train.bogus=1"], "train.bogus"),
        (TINY, &["train.batch_size=0"], "train.batch_size"),
        (TINY, &["train.batch_size=-8"], "train.batch_size"),
        (TINY, &["train.batch_size=\"many\""], "train.batch_size"),
        (TINY, &["world_size=100000"], "world_size"),
        (TINY, &["world_size=3"], "train.batch_size"),
        ("this is [not toml", &[], "spec"),
    ];
    for (spec, sets, field) in cases {
        let f = c.path("bad.toml");
        std::fs::write(&f, spec).unwrap();
        let mut args = vec!["submit", f.to_str().unwrap()];
        for s in *sets {
            args.extend(["--set", s]);
        }
        let out = c.btctl(&args);
        assert!(!out.status.success(), "{sets:?} was accepted");
        assert!(stderr(&out).contains(field), "{sets:?}: {}", stderr(&out));
    }
    assert_eq!(
        c.btctl_json(&["list"]).unwrap().as_array().unwrap().len(),
        0
    );
    let out = c.btctl(&["get", "6b1f4f9e-5d8e-4a7b-9c1d-2e3f4a5b6c7d"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));
    let out = c.btctl(&["get", "not-a-uuid"]);
    assert!(stderr(&out).contains("InvalidArgument"), "{}", stderr(&out));
    let out = c.btctl(&["cancel", "6b1f4f9e-5d8e-4a7b-9c1d-2e3f4a5b6c7d"]);
    assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));
}

/// btctl against the secured cluster with the wrong credentials, and a token added while the
/// coordinator runs (`bt-coordinator add-token`: no restart).
#[test]
fn tokens_roles_and_rotation_through_the_real_binaries() {
    let c = Cluster::start(1, 1);
    let as_token = |token_file: Option<&std::path::Path>, ca: bool, args: &[&str]| {
        let mut cmd = std::process::Command::new(bt_tests::bin("btctl"));
        cmd.args(args)
            .env("BT_COORDINATOR", &c.addr)
            .env_remove("BT_TOKEN")
            .env_remove("BT_TOKEN_FILE")
            .env_remove("BT_CA_CERT")
            .env("HOME", c.path(""));
        if let Some(f) = token_file {
            cmd.env("BT_TOKEN_FILE", f);
        }
        if ca {
            cmd.env("BT_CA_CERT", c.path("secrets/ca.pem"));
        }
        cmd.output().expect("btctl")
    };
    let out = as_token(None, true, &["list"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Unauthenticated") && stderr(&out).contains("--token-file"),
        "{}",
        stderr(&out)
    );
    let admin = c.path("secrets/admin.token");
    let out = as_token(Some(&admin), false, &["list"]);
    assert!(!out.status.success(), "plain text reached the TLS listener");
    let worker = c.path("secrets/worker.token");
    let out = as_token(Some(&worker), true, &["list"]);
    assert!(
        stderr(&out).contains("PermissionDenied"),
        "{}",
        stderr(&out)
    );
    // A viewer added to the live tokens file reads, and cannot submit.
    let viewer = c.path("viewer.token");
    let out = std::process::Command::new(bt_tests::bin("bt-coordinator"))
        .args([
            "add-token",
            "--name",
            "dash",
            "--role",
            "viewer",
            "--tokens-file",
        ])
        .arg(c.path("secrets/tokens.toml"))
        .arg("--token-out")
        .arg(&viewer)
        .output()
        .expect("add-token");
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the new token to be accepted", MINUTE, || {
        as_token(Some(&viewer), true, &["list"])
            .status
            .success()
            .then_some(())
    });
    let spec = c.path("job.toml");
    std::fs::write(&spec, TINY).unwrap();
    let out = as_token(Some(&viewer), true, &["submit", spec.to_str().unwrap()]);
    assert!(
        stderr(&out).contains("PermissionDenied"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn four_rank_job_over_two_daemons_succeeds() {
    let c = Cluster::start(2, 2);
    let id = c.submit(TINY, &["world_size=4", "name=four-ranks"]);
    let job = c.wait_state(&id, &["succeeded", "failed"], 3 * MINUTE);
    assert_eq!(job["state"], "succeeded", "{job}");
    let placement = job["placement"].as_array().expect("placement");
    assert_eq!(placement.len(), 4);
    let workers: std::collections::BTreeSet<&str> = placement
        .iter()
        .filter_map(|p| p["worker_name"].as_str())
        .collect();
    assert_eq!(workers.len(), 2, "{placement:?}");
    assert_eq!(job["last_metrics"]["step"], 6);
}

/// The design's full width: 32 trainer processes across four daemons through the coordinator.
/// Heavy for a 2-core machine (32 libtorch processes), so it runs on request:
/// `cargo nextest run -p bt-tests --run-ignored only scale_rehearsal --no-capture`.
#[test]
#[ignore]
fn scale_rehearsal_world_size_32() {
    let c = Cluster::start(4, 8);
    let t0 = std::time::Instant::now();
    let id = c.submit(
        TINY,
        &[
            "world_size=32",
            "train.batch_size=64",
            "train.max_steps=3",
            "train.log_every=1",
            "data.limit=512",
            "model.projector=[32, 32]",
            "checkpoint.every_steps=0",
            "eval.knn_at_end=false",
            "dist.timeout_secs=180",
        ],
    );
    let running = c.wait_state(&id, &["running"], 5 * MINUTE);
    let t_running = t0.elapsed();
    let job = c.wait_state(&id, &["succeeded", "failed"], 10 * MINUTE);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(running["placement"].as_array().map(Vec::len), Some(32));
    // Rendezvous time as each rank logged it.
    let mut rendezvous_ms: Vec<u64> = Vec::new();
    for i in 0..4 {
        for e in std::fs::read_dir(c.path(&format!("worker-{i}")))
            .unwrap()
            .flatten()
        {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("process group ready")) {
                if let Some(ms) = line
                    .split("elapsed_ms=")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse().ok())
                {
                    rendezvous_ms.push(ms);
                }
            }
        }
    }
    rendezvous_ms.sort_unstable();
    let (lo, hi) = (
        rendezvous_ms.first().copied().unwrap_or(0),
        rendezvous_ms.last().copied().unwrap_or(0),
    );
    eprintln!(
        "world size 32: all ranks started after {:.1}s, job done after {:.1}s; rendezvous logged by \
         {} ranks, {lo}-{hi} ms each; last step {:.0} ms",
        t_running.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        rendezvous_ms.len(),
        job["last_metrics"]["step_time_ms"].as_f64().unwrap_or(f64::NAN)
    );
    assert_eq!(rendezvous_ms.len(), 32);
}

#[test]
fn committed_checkpoint_is_evaluated_on_request() {
    let c = Cluster::start(1, 1);
    let id = c.submit(TINY, &["world_size=1", "checkpoint.every_steps=0"]);
    c.wait_state(&id, &["succeeded"], 3 * MINUTE);
    let cps = c.btctl_json(&["checkpoints", &id]).expect("checkpoints");
    let cp = &cps.as_array().expect("array")[0];
    assert_eq!(cp["eval_state"], "", "no evaluation requested yet");
    let path = cp["path"].as_str().expect("path").to_string();
    let out = c.btctl(&[
        "eval",
        &path,
        "--set",
        "data.limit=256",
        "--set",
        "eval.test_size=100",
        "--set",
        "eval.probe_epochs=3",
        "--set",
        "eval.baseline=false",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let probe = stdout(&out).trim().to_string();
    let watch = c.btctl(&["watch", "--plain", &probe]);
    let text = stdout(&watch);
    assert!(watch.status.success(), "{text}");
    assert!(text.contains("eval: linear_probe_epoch"), "{text}");
    assert!(text.contains("eval: linear_probe at step 6"), "{text}");
    let cps = c.btctl_json(&["checkpoints", &id]).expect("checkpoints");
    let cp = &cps.as_array().expect("array")[0];
    assert_eq!(cp["eval_state"], "done", "{cp}");
    assert_eq!(cp["eval_job_id"], probe.as_str());
    assert!(cp["eval"]["top1"].as_f64().unwrap_or(0.0) > 0.1, "{cp}");
    // A probe of a path outside the checkpoint root is refused at submission, naming the field.
    let out = c.btctl(&["eval", "/no/such/checkpoint"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("eval.checkpoint"), "{}", stderr(&out));
    // A probe of a checkpoint that is not there fails with the path in the reason.
    let missing = std::path::Path::new(&path).with_file_name("999");
    let missing = missing.to_str().expect("utf8");
    let out = c.btctl(&["eval", missing]);
    let bad = stdout(&out).trim().to_string();
    let job = c.wait_state(&bad, &["failed"], MINUTE);
    let reason = job["failure_reason"].as_str().unwrap_or("");
    assert!(reason.contains(missing), "{reason}");
}

#[test]
fn auto_eval_probes_each_committed_checkpoint_without_stopping_training() {
    let c = Cluster::start(2, 1);
    let id = c.submit(
        TINY,
        &[
            "world_size=1",
            "checkpoint.every_steps=3",
            "checkpoint.keep_last=1",
            "checkpoint.auto_eval=true",
            "eval.probe_epochs=2",
            "eval.baseline=false",
        ],
    );
    // The probe of the step-3 checkpoint runs on the second device while training goes on.
    let job = c.wait_state(&id, &["succeeded"], 3 * MINUTE);
    assert_eq!(job["last_metrics"]["step"], 6);
    let probes: Vec<String> = wait_for("two probe jobs", MINUTE, || {
        let jobs = c.btctl_json(&["list"])?;
        let p: Vec<String> = jobs
            .as_array()?
            .iter()
            .filter(|j| j["kind"] == "linear_probe")
            .filter_map(|j| j["id"].as_str().map(String::from))
            .collect();
        (p.len() == 2).then_some(p)
    });
    for p in &probes {
        c.wait_state(p, &["succeeded"], 3 * MINUTE);
    }
    // keep_last = 1, but the step-3 checkpoint was kept while its probe needed it; both are
    // evaluated.
    let cps = c.btctl_json(&["checkpoints", &id]).expect("checkpoints");
    let done: Vec<u64> = cps
        .as_array()
        .expect("array")
        .iter()
        .filter(|c| c["eval_state"] == "done")
        .filter_map(|c| c["step"].as_u64())
        .collect();
    assert!(done.contains(&6), "{cps}");
}

#[test]
fn a_daemon_whose_trainer_cannot_run_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bt_tests::bin("bt-worker"))
        .args(["--coordinator", "127.0.0.1:1", "--work-dir"])
        .arg(tmp.path().join("w"))
        .arg("--checkpoint-root")
        .arg(tmp.path().join("c"))
        .env("BT_WORKER_TRAINER_BIN", "/no/such/bt-worker")
        .output()
        .expect("bt-worker");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("trainer_bin /no/such/bt-worker cannot be run"),
        "{err}"
    );
}

/// A daemon that started fine (its trainer answered `--version`) but then cannot spawn the
/// trainer: the rank's exit reaches the coordinator, and the job fails with a reason naming the
/// worker well within the start deadline instead of waiting for a trainer that never comes.
#[test]
fn a_trainer_that_cannot_be_spawned_fails_the_job_naming_the_worker() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::start(0, 1);
    let wrapper = c.path("trainer.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec '{}' \"$@\"\n",
            bt_tests::bin("bt-worker").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    c.add_worker(1, &[("BT_WORKER_TRAINER_BIN", wrapper.as_os_str())]);
    c.wait_workers_online(1);
    // Registered (so the `--version` check passed); now the trainer can no longer be executed.
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o644)).unwrap();
    let id = c.submit(TINY, &["world_size=1", "restart.max_restarts=0"]);
    let started = std::time::Instant::now();
    // The coordinator's start deadline (60 s by default) is the backstop; the exit report must
    // come well before it.
    let job = c.wait_state(&id, &["failed"], Duration::from_secs(45));
    assert!(started.elapsed() < Duration::from_secs(45));
    let reason = job["failure_reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("worker-0") && reason.contains("cannot start a trainer"),
        "failure reason: {reason}"
    );
    assert!(c.trainer_pids().is_empty());
}

#[test]
fn logs_follow_a_two_rank_job_from_before_it_starts_to_its_end_then_delete_forgets_it() {
    // One slot: the 2-rank job waits in the queue until a second daemon comes.
    let mut c = Cluster::start(1, 1);
    let id = c.submit(TINY, &[]);
    c.wait_state(&id, &["queued"], MINUTE);
    let follower = c.btctl_spawn(&["logs", "-f", &id]);
    c.add_worker(1, &[]);
    c.wait_state(&id, &["succeeded"], 3 * MINUTE);
    // The follower ends by itself once the job has ended.
    let mut follower = Some(follower);
    let out = wait_for("btctl logs -f to end with the job", MINUTE, || {
        let child = follower.as_mut()?;
        child.try_wait().ok()??;
        follower
            .take()
            .map(|c| c.wait_with_output().expect("btctl output"))
    });
    let followed = stdout(&out);
    assert!(out.status.success(), "logs -f failed: {}", stderr(&out));
    for rank in [0, 1] {
        assert!(
            followed.lines().any(
                |l| l.starts_with(&format!("[rank {rank}] ")) && l.contains("trainer finished")
            ),
            "rank {rank}'s last line is missing from:\n{followed}"
        );
    }
    // What was followed is the whole persisted log.
    let all = c.btctl(&["logs", &id]);
    assert_eq!(stdout(&all), followed);
    // --rank 1 --tail 5: exactly the last five lines of rank 1, without the prefix.
    let rank1 = stdout(&c.btctl(&["logs", &id, "--rank", "1"]));
    let rank1: Vec<&str> = rank1.lines().collect();
    assert!(rank1.len() >= 5, "rank 1 wrote {} lines", rank1.len());
    for n in [5, 2] {
        let tail = c.btctl(&["logs", &id, "--rank", "1", "--tail", &n.to_string()]);
        assert!(tail.status.success(), "{}", stderr(&tail));
        assert_eq!(
            stdout(&tail).lines().collect::<Vec<_>>(),
            rank1[rank1.len() - n..]
        );
    }

    // btctl delete --files: the job, its history and its checkpoint files are gone.
    let ckpt_dir = c.path("checkpoints").join(&id);
    assert!(ckpt_dir.is_dir());
    let del = c.btctl(&["delete", &id, "--files"]);
    assert!(del.status.success(), "{}", stderr(&del));
    assert!(stdout(&del).contains("deleted"), "{}", stdout(&del));
    assert!(!ckpt_dir.exists(), "checkpoint files removed");
    let get = c.btctl(&["get", &id]);
    assert!(!get.status.success());
    assert!(stderr(&get).contains("NotFound"), "{}", stderr(&get));
}
