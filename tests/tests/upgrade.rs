//! Upgrades without interrupted jobs: a coordinator serves daemons of its own protocol version and
//! of the one before (N-1, as during a rolling upgrade of the daemons after the coordinator), and
//! says which features are off for the older ones; a daemon newer than its coordinator is refused
//! with a message that says to upgrade the coordinator first.
use std::ffi::OsStr;
use std::time::Duration;

use bt_tests::{stdout, wait_for, Cluster, TINY};

const MINUTE: Duration = Duration::from_secs(60);

fn workers(c: &Cluster) -> Vec<serde_json::Value> {
    c.btctl_json(&["workers"])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn an_n_minus_1_daemon_runs_a_job_and_an_n_plus_1_daemon_is_told_to_upgrade_the_coordinator() {
    // worker-0 is of this build; its protocol version (read back) is the coordinator's.
    let mut c = Cluster::start(1, 1);
    let current = workers(&c)
        .first()
        .and_then(|w| w["protocol_version"].as_u64())
        .expect("worker-0's protocol version");
    // worker-1 announces the previous protocol version, and behaves as that release did: it
    // expects no heartbeat acknowledgement and names no exited trainers in its hello.
    let old = (current - 1).to_string();
    c.add_worker(1, &[("BT_WORKER_PROTOCOL_VERSION", OsStr::new(&old))]);
    c.wait_workers_online(2);
    let ws = workers(&c);
    let by_name = |n: &str| {
        ws.iter()
            .find(|w| w["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} in {ws:?}"))
    };
    let (w0, w1) = (by_name("worker-0"), by_name("worker-1"));
    assert_eq!(w0["features_off"], serde_json::json!([]), "{w0}");
    assert_eq!(w1["protocol_version"], current - 1, "{w1}");
    assert_eq!(
        w1["features_off"],
        serde_json::json!(["heartbeat-ack", "exit-replay"]),
        "{w1}"
    );
    let table = stdout(&c.btctl(&["workers"]));
    assert!(
        table.contains("worker-1 speaks protocol") && table.contains("heartbeat-ack"),
        "{table}"
    );
    // A two-rank job across the old and the new daemon.
    let id = c.submit(TINY, &["name=mixed-versions", "eval.knn_at_end=false"]);
    let job = c.wait_state(&id, &["succeeded", "failed"], 3 * MINUTE);
    eprintln!(
        "N-1: worker-0 (protocol {current}) and worker-1 (protocol {}) ran job {}: {}, \
         restarts_used {}",
        current - 1,
        id,
        job["state"],
        job["restarts_used"]
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["restarts_used"], 0, "{job}");
    // A daemon newer than the coordinator (the coordinator was not upgraded first).
    let newer = (current + 1).to_string();
    let i = c.add_worker(1, &[("BT_WORKER_PROTOCOL_VERSION", OsStr::new(&newer))]);
    let log = c.path(&format!("worker-{i}.log"));
    let line = wait_for("the refusal in the newer daemon's log", MINUTE, || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.lines()
            .find(|l| l.contains("refused registration"))
            .map(str::to_string)
    });
    eprintln!("N+1: {line}");
    assert!(
        line.contains("upgrade the coordinator first"),
        "the refusal says what to do: {line}"
    );
    assert!(
        workers(&c)
            .iter()
            .all(|w| w["name"] != format!("worker-{i}").as_str()),
        "a refused daemon is not registered"
    );
}
