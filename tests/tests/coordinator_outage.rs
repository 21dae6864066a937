//! A coordinator restart fails no job: the coordinator is killed with SIGKILL while a job trains,
//! stays down for a minute, and comes back on the same state. The trainers train on meanwhile,
//! their daemons buffer every report and replay it on the reconnect (within the coordinator's
//! reconnect grace), and the job finishes without a restart and without a gap in its metrics.
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bt_tests::{stdout, wait_for, Cluster, TINY};

const MINUTE: Duration = Duration::from_secs(60);
const OUTAGE: Duration = Duration::from_secs(60);
const STEPS: u64 = 100;

/// The steps of the job's metric events, from a `btctl watch --plain` replay.
fn metric_steps(c: &Cluster, id: &str) -> (BTreeSet<u64>, String) {
    let out = stdout(&c.btctl(&["watch", "--plain", id]));
    let steps = out
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("step "))
        .filter_map(|l| l.split('/').next()?.trim().parse().ok())
        .collect();
    (steps, out)
}

#[test]
fn a_job_survives_a_minute_long_coordinator_outage_with_no_restart_and_no_missing_step() {
    // Heartbeat timeout 3 s (the harness's): only the reconnect grace (120 s by default) keeps
    // the restarted coordinator from losing the daemons before they are back.
    let mut c = Cluster::start(2, 1);
    let steps = STEPS.to_string();
    let id = c.submit(
        TINY,
        &[
            &format!("train.max_steps={steps}"),
            "train.epochs=1000",
            "train.log_every=1",
            // Slower steps, so the job outlasts the outage: 32 px, one thread each.
            "data.image_size=32",
            "checkpoint.every_steps=20",
            "eval.knn_at_end=false",
            "name=outage",
        ],
    );
    let step_at = |n: u64| {
        wait_for(&format!("step {n}"), 2 * MINUTE, || {
            let j = c.btctl_json(&["get", &id])?;
            let s = j["last_metrics"]["step"].as_u64()?;
            (s >= n).then_some((s, Instant::now()))
        })
    };
    let (s0, t0) = step_at(3);
    let (before, t1) = step_at(8);
    let per_step = (t1 - t0).as_secs_f64() / (before - s0).max(1) as f64;
    let trainers = c.trainer_pids();
    assert_eq!(trainers.len(), 2, "two trainers: {trainers:?}");
    c.kill_coordinator();
    let down = Instant::now();
    std::thread::sleep(OUTAGE);
    // The trainers trained on while the coordinator was gone (on a fast machine they may even
    // have finished: their exits then wait in the daemons' buffers too).
    let alive = trainers.iter().filter(|p| bt_tests::alive(**p)).count();
    c.start_coordinator();
    let back = Instant::now();
    let at_restart = c.job(&id)["last_metrics"]["step"].as_u64().unwrap_or(0);
    c.wait_workers_online(2);
    let online = back.elapsed();
    let job = c.wait_state(&id, &["succeeded", "failed", "cancelled"], 8 * MINUTE);
    let finished = back.elapsed();
    let (seen, text) = metric_steps(&c, &id);
    let missing: Vec<u64> = (1..=STEPS).filter(|s| !seen.contains(s)).collect();
    eprintln!(
        "outage: {per_step:.2} s a step; coordinator down {:.1} s at step {before}; its record \
         said step {at_restart} on restart, trainers still training {alive} of 2; daemons \
         online {:.1} s after the restart; job {} {:.1} s after it, restarts_used {}, \
         attempts {}, metric steps {} of {STEPS}, missing {missing:?}",
        (back - down).as_secs_f64(),
        online.as_secs_f64(),
        job["state"],
        finished.as_secs_f64(),
        job["restarts_used"],
        job["attempts"],
        seen.len(),
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["restarts_used"], 0, "{job}");
    assert!(
        missing.is_empty(),
        "metric steps missing from the history: {missing:?}\n{text}"
    );
}
