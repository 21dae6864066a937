//! A black-holed link between a daemon and the coordinator (the coordinator's node vanished:
//! packets dropped, no FIN, no RST, both sockets open): the daemon notices within 30 s by its
//! receive deadline (the coordinator acknowledges every heartbeat), keeps its trainer running and
//! keeps retrying; the coordinator marks the daemon lost within its heartbeat timeout.
use std::time::{Duration, Instant};

use bt_tests::{wait_for, Cluster, TINY};

const MINUTE: Duration = Duration::from_secs(60);

/// Daemon `i` as `btctl workers -o json` shows it.
fn worker_json(c: &Cluster, i: usize) -> Option<serde_json::Value> {
    let name = format!("worker-{i}");
    let ws = c.btctl_json(&["workers"])?;
    ws.as_array()?
        .iter()
        .find(|w| w["name"] == name.as_str())
        .cloned()
}

#[test]
fn a_black_hole_is_noticed_by_the_daemon_within_30_s_and_by_the_coordinator_within_its_timeout() {
    let heartbeat_timeout = Duration::from_millis(5000);
    let c = Cluster::start_partitionable(1, 1, heartbeat_timeout.as_millis() as u64, &[]);
    let w = worker_json(&c, 0).expect("the worker");
    // A daemon of this build: every protocol feature on, the heartbeat acknowledgement included.
    assert!(w["protocol_version"].as_u64().unwrap_or(0) > 0, "{w}");
    assert_eq!(w["features_off"], serde_json::json!([]), "{w}");
    let id = c.submit(
        TINY,
        &[
            "world_size=1",
            "train.max_steps=100000",
            "train.epochs=1000",
            "eval.knn_at_end=false",
            "restart.max_restarts=0",
            "name=black-holed",
        ],
    );
    c.wait_state(&id, &["running"], 2 * MINUTE);
    let trainer = wait_for("the trainer", MINUTE, || {
        c.trainer_pids_of(0).first().copied()
    });
    let log = c.path("worker-0.log");
    let seen = std::fs::read_to_string(&log).unwrap_or_default().len();
    let t0 = Instant::now();
    c.partition_worker(0, true);
    let mut lost = None;
    let mut noticed = None;
    wait_for("both ends to notice the black hole", MINUTE, || {
        if lost.is_none() && worker_json(&c, 0).is_some_and(|w| w["state"] == "lost") {
            lost = Some(t0.elapsed());
        }
        if noticed.is_none() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text
                .get(seen..)
                .is_some_and(|t| t.contains("nothing from the coordinator"))
            {
                noticed = Some(t0.elapsed());
            }
        }
        (lost.is_some() && noticed.is_some()).then_some(())
    });
    let (lost, noticed) = (lost.unwrap(), noticed.unwrap());
    let alive = bt_tests::alive(trainer);
    eprintln!(
        "black hole: the daemon noticed after {:.1} s (receive deadline), the coordinator marked \
         it lost after {:.1} s (heartbeat timeout {:.1} s); trainer alive when the daemon \
         noticed: {alive}",
        noticed.as_secs_f64(),
        lost.as_secs_f64(),
        heartbeat_timeout.as_secs_f64()
    );
    assert!(
        noticed < Duration::from_secs(30),
        "the daemon took {noticed:?} to notice"
    );
    // The liveness check runs every heartbeat interval (1 s); btctl polls on top.
    assert!(
        lost <= heartbeat_timeout + Duration::from_secs(3),
        "the coordinator took {lost:?} to mark the daemon lost"
    );
    assert!(
        alive,
        "the daemon keeps its trainer when the coordinator vanishes"
    );
    // It keeps retrying meanwhile (each try times out in the black hole)...
    wait_for("a second failed try", MINUTE, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text
            .get(seen..)?
            .matches("coordinator session failed")
            .count()
            >= 2)
            .then_some(())
    });
    // ...and once the link is back it is online again; the trainer of the attempt that failed
    // meanwhile is fenced (stopped).
    c.partition_worker(0, false);
    wait_for("the worker back online", MINUTE, || {
        (worker_json(&c, 0)?["state"] == "online").then_some(())
    });
    wait_for("the fenced trainer to stop", MINUTE, || {
        (!bt_tests::alive(trainer)).then_some(())
    });
}
