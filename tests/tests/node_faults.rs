//! End-to-end node faults, each on its own through the real binaries: a preempted node (SIGTERM
//! of its daemon), an operator drain, a partition, a daemon killed with SIGKILL, a stopped
//! trainer. `chaos.rs` mixes them under a seeded schedule.
use std::time::{Duration, Instant};

use bt_tests::{stderr, stdout, wait_for, Cluster, TINY};

const MINUTE: Duration = Duration::from_secs(60);

/// Submits the tiny job for 40 steps (a metric line each), with `overrides` on top, and waits
/// until it has reported step `after`; returns its id.
fn submit_running(c: &Cluster, overrides: &[&str], after: u64) -> String {
    let base = ["train.max_steps=40", "train.epochs=20", "train.log_every=1"];
    let all: Vec<&str> = base.iter().chain(overrides).copied().collect();
    let id = c.submit(TINY, &all);
    wait_for("a few steps", 2 * MINUTE, || {
        let j = c.btctl_json(&["get", &id])?;
        (j["last_metrics"]["step"].as_u64()? >= after).then_some(())
    });
    id
}

/// The first of the `n` daemons that runs a trainer.
fn busy_worker(c: &Cluster, n: usize) -> usize {
    (0..n)
        .find(|&i| !c.trainer_pids_of(i).is_empty())
        .expect("a worker running a rank")
}

/// Daemon `i` as `btctl workers -o json` shows it (None while the coordinator does not answer).
fn worker_json(c: &Cluster, i: usize) -> Option<serde_json::Value> {
    let name = format!("worker-{i}");
    let ws = c.btctl_json(&["workers"])?;
    ws.as_array()?
        .iter()
        .find(|w| w["name"] == name.as_str())
        .cloned()
}

#[test]
fn sigterm_to_a_daemon_preempts_its_job_which_resumes_from_the_stop_checkpoint() {
    let mut c = Cluster::start(2, 1);
    // No periodic checkpoint before the end: the one saved on the stop is the only resume point.
    let id = submit_running(
        &c,
        &[
            "checkpoint.every_steps=1000",
            "restart.max_restarts=0",
            "name=preempted",
        ],
        3,
    );
    // A terminating node: its trainer and the other node's agree on a step, rank 0 saves it,
    // both stop, the daemon reports their exits and leaves within its stop grace.
    c.signal_worker(1, libc::SIGTERM);
    let status = c.wait_worker_exit(1, MINUTE);
    assert!(
        status.success(),
        "the drained daemon exits cleanly: {status:?}"
    );
    let job = wait_for("the job to be requeued", MINUTE, || {
        let j = c.btctl_json(&["get", &id])?;
        (j["state"] == "queued" && j["preemptions"] == 1).then_some(j)
    });
    assert_eq!(
        job["restarts_used"], 0,
        "a preemption spends no restart: {job}"
    );
    let cps = c.btctl_json(&["checkpoints", &id]).expect("checkpoints");
    let saved: Vec<u64> = cps
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["step"].as_u64())
        .collect();
    assert_eq!(saved.len(), 1, "the stop checkpoint: {cps}");
    assert!(saved[0] >= 3, "saved at the stop step: {saved:?}");
    wait_for("the other node's trainer to stop", MINUTE, || {
        c.trainer_pids().is_empty().then_some(())
    });
    // The node comes back: the job resumes from the stop checkpoint and finishes, although its
    // restart budget was 0.
    c.start_worker(1, 1);
    let job = c.wait_state(&id, &["succeeded"], 3 * MINUTE);
    assert_eq!(job["restarts_used"], 0);
    let out = stdout(&c.btctl(&["watch", "--plain", &id]));
    assert!(
        out.contains(&format!("at step {}", saved[0])),
        "no resume from step {} in:\n{out}",
        saved[0]
    );
    assert!(out.contains("preempted"), "{out}");
}

#[test]
fn btctl_drain_moves_a_running_job_off_a_worker_which_stays_up_until_undrained() {
    let c = Cluster::start(3, 1);
    let id = submit_running(
        &c,
        &[
            "checkpoint.every_steps=1000",
            "restart.max_restarts=0",
            "name=drained",
        ],
        3,
    );
    let victim = busy_worker(&c, 3);
    let name = format!("worker-{victim}");
    // btctl runs with the admin token here (the auth tests refuse drains to other roles).
    let out = c.btctl(&["drain", &name, "--reason", "kernel upgrade"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("kernel upgrade"), "{}", stdout(&out));
    let job = wait_for("the job to be requeued", MINUTE, || {
        let j = c.btctl_json(&["get", &id])?;
        (j["preemptions"] == 1).then_some(j)
    });
    assert_eq!(job["restarts_used"], 0, "a drain spends no restart: {job}");
    // It runs again on the two other workers and finishes from the stop checkpoint; the drained
    // daemon stays up with no trainer.
    let job = c.wait_state(&id, &["succeeded"], 3 * MINUTE);
    assert_eq!(job["restarts_used"], 0);
    let out = stdout(&c.btctl(&["watch", "--plain", &id]));
    assert!(out.contains("resumed from"), "no resume in:\n{out}");
    assert!(
        bt_tests::alive(c.worker_pid(victim)),
        "the drained daemon stays up"
    );
    assert!(c.trainer_pids_of(victim).is_empty());
    let w = worker_json(&c, victim).expect("the drained worker");
    assert_eq!(w["drained"], "kernel upgrade", "{w}");
    // Undrained, it takes work again: a 3-rank job needs every worker.
    let out = c.btctl(&["undrain", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let three = c.submit(
        TINY,
        &[
            "world_size=3",
            "train.batch_size=12",
            "train.max_steps=2",
            "eval.knn_at_end=false",
            "name=after-undrain",
        ],
    );
    c.wait_state(&three, &["succeeded"], 3 * MINUTE);
    let ws = c.btctl_json(&["workers"]).expect("workers");
    assert!(
        ws.as_array().unwrap().iter().all(|w| w["drained"] == ""),
        "{ws}"
    );
}

#[test]
fn a_partitioned_daemon_is_lost_its_job_moves_and_on_return_it_is_fenced_then_takes_work() {
    // Every daemon reaches the coordinator through a proxy that can go silent without closing.
    let c = Cluster::start_partitionable(3, 1, 3000, &[]);
    let id = submit_running(&c, &["checkpoint.every_steps=4", "name=partitioned"], 5);
    let victim = busy_worker(&c, 3);
    let attempts = c.job(&id)["attempts"].as_u64().unwrap();
    let t0 = Instant::now();
    c.partition_worker(victim, true);
    // No heartbeat gets through: after the heartbeat timeout the worker is lost and the job
    // restarts on the two other workers, although the daemon's socket never closed.
    let lost = wait_for("the worker to be lost", MINUTE, || {
        (worker_json(&c, victim)?["state"] == "lost").then(|| t0.elapsed())
    });
    let job = wait_for("the job to restart elsewhere", MINUTE, || {
        let j = c.btctl_json(&["get", &id])?;
        (j["attempts"].as_u64()? > attempts && j["state"] == "running").then_some(j)
    });
    eprintln!(
        "partition: worker lost after {:.1} s, job running again after {:.1} s",
        lost.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert!(job["restarts_used"].as_u64().unwrap() >= 1, "{job}");
    // The partition heals: the daemon's old session is gone, it opens a new one, any trainer of
    // the old attempt is stopped, and the worker is online again.
    c.partition_worker(victim, false);
    wait_for("the worker back online", MINUTE, || {
        (worker_json(&c, victim)?["state"] == "online").then_some(())
    });
    wait_for("the stale trainer to be gone", MINUTE, || {
        c.trainer_pids_of(victim).is_empty().then_some(())
    });
    let job = c.wait_state(&id, &["succeeded"], 3 * MINUTE);
    let out = stdout(&c.btctl(&["watch", "--plain", &id]));
    assert!(out.contains("resumed from"), "no resume in:\n{out}");
    assert_eq!(job["state"], "succeeded");
}

#[test]
fn a_daemon_killed_with_sigkill_takes_its_trainers_with_it() {
    let mut c = Cluster::start(2, 1);
    let id = c.submit(TINY, &["train.max_steps=100000", "train.epochs=1000"]);
    c.wait_state(&id, &["running"], MINUTE);
    let orphans = wait_for("worker-0's trainer", MINUTE, || {
        let p = c.trainer_pids_of(0);
        (!p.is_empty()).then_some(p)
    });
    c.kill9_worker(0);
    // Its trainer dies with it (parent-death signal): no orphan keeps the device or the port.
    wait_for(
        "the orphaned trainer to exit",
        Duration::from_secs(10),
        || orphans.iter().all(|p| !bt_tests::alive(*p)).then_some(()),
    );
}

#[test]
fn a_stopped_trainer_is_declared_hung_and_the_job_restarts() {
    // A short watchdog: 4 s without any report (the step reports come every ~0.1-1 s).
    let c = Cluster::start_configured(
        2,
        1,
        3000,
        &[
            ("BT_COORDINATOR_WATCHDOG__MIN_MS", "4000"),
            ("BT_COORDINATOR_WATCHDOG__MULTIPLE", "10"),
        ],
    );
    let id = c.submit(
        TINY,
        &[
            "train.max_steps=30",
            "train.epochs=10",
            "train.log_every=1",
            "checkpoint.every_steps=5",
            "restart.max_restarts=1",
            "name=hung",
        ],
    );
    wait_for("a few steps", 2 * MINUTE, || {
        let j = c.btctl_json(&["get", &id])?;
        (j["last_metrics"]["step"].as_u64()? >= 2).then_some(())
    });
    let pids = c.trainer_pids();
    assert_eq!(pids.len(), 2);
    // SIGSTOP: the rank neither dies nor reports; its peer waits in the next collective.
    // SAFETY: kill(2) on a trainer of this cluster.
    unsafe {
        libc::kill(pids[0] as i32, libc::SIGSTOP);
    }
    let job = wait_for("the job to be declared hung", MINUTE, || {
        let j = c.btctl_json(&["get", &id])?;
        (j["restarts_used"] == 1).then_some(j)
    });
    let reason = job["failure_reason"].as_str().unwrap_or("");
    assert!(reason.contains("hung: no report"), "{reason}");
    // The stopped trainer is killed (SIGTERM stays pending while stopped, SIGKILL does not), the
    // job resumes from its latest checkpoint and finishes.
    let job = c.wait_state(&id, &["succeeded"], 3 * MINUTE);
    assert_eq!(job["restarts_used"], 1);
    assert!(!bt_tests::alive(pids[0]), "the stopped trainer is gone");
}
