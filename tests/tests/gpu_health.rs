//! GPU truth through the real binaries, on a machine without a GPU: a daemon told to expect GPUs
//! (`--gpus` / `BT_WORKER_GPUS`, or `NVIDIA_VISIBLE_DEVICES` as the device plugin sets it) where
//! CUDA finds none registers unhealthy with the reason, offers no CPU slot in their place, and
//! the coordinator places nothing on it; a healthy CPU daemon next to it takes the work.
use std::ffi::OsStr;
use std::time::Duration;

use bt_tests::{wait_for, Cluster, TINY};
use serde_json::Value;

const MINUTE: Duration = Duration::from_secs(60);

fn worker(c: &Cluster, name: &str) -> Option<Value> {
    c.btctl_json(&["workers"])?
        .as_array()?
        .iter()
        .find(|w| w["name"] == name)
        .cloned()
}

#[test]
fn a_gpu_node_without_cuda_is_unhealthy_offers_nothing_and_gets_nothing() {
    // worker-0: a CPU daemon, one slot.
    let mut c = Cluster::start(1, 1);
    // worker-1: four CPU slots asked for, but GPUs expected: none of them may be offered.
    let gpus = c.add_worker(4, &[("BT_WORKER_GPUS", OsStr::new("2"))]);
    // worker-2: GPUs expected from the device plugin's variable (no count).
    let plugin = c.add_worker(
        4,
        &[("NVIDIA_VISIBLE_DEVICES", OsStr::new("GPU-0f3c0d2e-test"))],
    );
    c.wait_workers_online(3);
    for (i, says) in [
        (gpus, "2 GPU(s) expected"),
        (plugin, "NVIDIA_VISIBLE_DEVICES"),
    ] {
        let w = worker(&c, &format!("worker-{i}")).expect("listed");
        let why = w["unhealthy"].as_str().unwrap_or("");
        assert!(why.contains(says), "worker-{i}: {w}");
        assert!(why.contains("CUDA"), "{why}");
        assert_eq!(w["devices"].as_array().map(Vec::len), Some(0), "{w}");
    }
    let healthy = worker(&c, "worker-0").expect("listed");
    assert_eq!(healthy["unhealthy"], "");
    assert_eq!(healthy["devices"].as_array().map(Vec::len), Some(1));
    // The text view says it too.
    let text = bt_tests::stdout(&c.btctl(&["workers"]));
    assert!(
        text.lines()
            .any(|l| l.contains("worker-1") && l.contains("unhealthy: 2 GPU(s) expected")),
        "{text}"
    );

    // One rank runs, on worker-0.
    let narrow = c.submit(TINY, &["name=narrow", "world_size=1"]);
    let j = c.wait_state(&narrow, &["succeeded"], 3 * MINUTE);
    let placed: Vec<&str> = j["placement"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["worker_name"].as_str())
        .collect();
    assert_eq!(placed, ["worker-0"], "{j}");
    // Two ranks cannot be placed: the only device is worker-0's.
    let wide = c.submit(TINY, &["name=wide"]);
    let w = wait_for("the wide job's pending reason", MINUTE, || {
        let j = c.btctl_json(&["get", &wide])?;
        (j["pending_reason"] != "").then_some(j)
    });
    assert_eq!(w["state"], "queued", "{w}");
    assert_eq!(w["attempts"], 0, "{w}");
    // The unhealthy daemons never started a trainer.
    for i in [gpus, plugin] {
        assert!(c.trainer_pids_of(i).is_empty());
        let dir = c.path(&format!("worker-{i}"));
        let logs = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(logs, 0, "{} holds no trainer log", dir.display());
    }
    // They say why in their own log too.
    let log = std::fs::read_to_string(c.path(&format!("worker-{gpus}.log"))).unwrap();
    assert!(log.contains("unhealthy"), "{log}");

    // Without the expectation, the same node is a CPU daemon again and takes the wide job.
    c.kill9_worker(gpus);
    c.start_worker(gpus, 2);
    let w = wait_for("worker-1 healthy again", MINUTE, || {
        let w = worker(&c, "worker-1")?;
        (w["state"] == "online" && w["unhealthy"] == "").then_some(w)
    });
    assert_eq!(w["devices"].as_array().map(Vec::len), Some(2), "{w}");
    c.wait_state(&wide, &["running", "succeeded"], 3 * MINUTE);
}
