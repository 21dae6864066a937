//! Backups through the real binaries: `bt-coordinator backup` while a job runs on real daemons
//! (and the coordinator's own scheduled backups next to it), `bt-coordinator restore` into an
//! empty state directory, and a coordinator started on the restored database that answers with
//! the same jobs, states and event histories as the live one did up to the backup.
use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bt_tests::{bin, stderr, stdout, wait_for, Cluster, TINY};
use serde_json::Value;

const MINUTE: Duration = Duration::from_secs(60);

/// What `btctl watch --plain` prints for a job (its replayed history, then what follows): until
/// the stream ends (a finished job) or nothing new has come for `quiet`.
fn replay(mut child: Child, quiet: Duration) -> Vec<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + 2 * MINUTE;
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(quiet) {
            Ok(l) => lines.push(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => break,
        }
        assert!(Instant::now() < deadline, "watch never went quiet");
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    lines
}

/// A coordinator on a restored database: plain text, no tokens, on loopback (the test's own).
struct Restored {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Restored {
    fn start(db: &Path, checkpoint_root: &Path, dir: &Path) -> Restored {
        let addr_file = dir.join("restored.addr");
        let log = dir.join("restored.log");
        let f = std::fs::File::create(&log).expect("log");
        let child = Command::new(bin("bt-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--auth", "off"])
            .arg("--addr-file")
            .arg(&addr_file)
            .arg("--db")
            .arg(db)
            .arg("--checkpoint-root")
            .arg(checkpoint_root)
            // The live daemons never reach this coordinator: a long reconnect grace keeps the
            // running job as the backup has it instead of restarting it.
            .args(["--heartbeat-timeout-ms", "600000"])
            .stdout(Stdio::from(f.try_clone().expect("dup")))
            .stderr(Stdio::from(f))
            .stdin(Stdio::null())
            .spawn()
            .expect("start the restored coordinator");
        let addr = wait_for("the restored coordinator's address", MINUTE, || {
            std::fs::read_to_string(&addr_file)
                .ok()
                .filter(|s| !s.trim().is_empty())
        });
        Restored {
            child,
            addr: addr.trim().to_string(),
            log,
        }
    }

    fn btctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("btctl"));
        cmd.args(args)
            .env("BT_COORDINATOR", &self.addr)
            .env_remove("BT_TOKEN")
            .env_remove("BT_TOKEN_FILE")
            .env_remove("BT_CA_CERT")
            .stdin(Stdio::null());
        cmd
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.btctl(&a).output().expect("btctl");
        assert!(out.status.success(), "btctl {args:?}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("json")
    }

    fn replay(&self, job: &str) -> Vec<String> {
        let child = self
            .btctl(&["watch", job, "--plain"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("btctl watch");
        replay(child, Duration::from_secs(2))
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(t) = std::fs::read_to_string(&self.log) {
                eprintln!("===== restored coordinator =====\n{t}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn live_replay(c: &Cluster, job: &str) -> Vec<String> {
    replay(
        c.btctl_spawn(&["watch", job, "--plain"]),
        Duration::from_secs(5),
    )
}

fn step_of(j: &Value) -> u64 {
    j["last_metrics"]["step"].as_u64().unwrap_or(0)
}

fn coordinator(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(bin("bt-coordinator"))
        .args(args)
        .output()
        .expect("run bt-coordinator")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn a_backup_taken_while_a_job_runs_restores_its_jobs_states_and_histories() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let scheduled = scratch.path().join("scheduled");
    let sched = scheduled.display().to_string();
    // The coordinator's own backups every second, the newest two kept, next to the manual one.
    let c = Cluster::start_configured(
        2,
        1,
        3000,
        &[
            ("BT_COORDINATOR_BACKUP__DIR", &sched),
            ("BT_COORDINATOR_BACKUP__INTERVAL_S", "1"),
            ("BT_COORDINATOR_BACKUP__KEEP", "2"),
        ],
    );
    // A finished job, with its whole history, checkpoints and kNN evaluation.
    let done = c.submit(TINY, &["name=finished"]);
    c.wait_state(&done, &["succeeded"], 3 * MINUTE);
    // A running one: a metric report every step.
    let running = c.submit(
        TINY,
        &[
            "name=running",
            "train.max_steps=50",
            "train.epochs=5",
            "train.log_every=1",
            "checkpoint.every_steps=10",
            "eval.knn_at_end=false",
        ],
    );
    wait_for("the job to report a few steps", 2 * MINUTE, || {
        let j = c.btctl_json(&["get", &running])?;
        (j["state"] == "running" && step_of(&j) >= 3).then_some(())
    });

    let before = c.job(&running);
    let out_dir = scratch.path().join("manual");
    let out = coordinator(&[
        "backup".as_ref(),
        "--db".as_ref(),
        c.path("coordinator.db").as_os_str(),
        "--out".as_ref(),
        format!("{}/", out_dir.display()).as_ref(),
        "--keep".as_ref(),
        "3".as_ref(),
    ]);
    assert!(out.status.success(), "backup failed: {}", stderr(&out));
    let after = c.job(&running);
    assert_eq!(after["state"], "running", "the job ran through the backup");
    println!("{}", stdout(&out).trim());
    let backups: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .expect("backup dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(backups.len(), 1, "one file, no temporary left: {backups:?}");
    let backup = &backups[0];
    let name = backup.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.starts_with("bt-state-") && name.ends_with("Z.db"),
        "{name}"
    );
    assert_eq!(mode(backup), 0o600);

    // The live side as the backup saw it: the finished job's whole record and history now,
    // the running job's history once it has finished too (the restored one is a prefix of it).
    let live_list = c.btctl_json(&["list"]).expect("list");
    let live_done = c.job(&done);
    let live_done_history = live_replay(&c, &done);
    let live_done_cps = c.btctl_json(&["checkpoints", &done]).expect("checkpoints");
    assert!(
        live_done_history.iter().any(|l| l.starts_with("eval:")),
        "{live_done_history:?}"
    );
    c.wait_state(&running, &["succeeded"], 5 * MINUTE);
    let live_running_history = live_replay(&c, &running);

    // Restore into an empty state directory, and start a coordinator on it.
    let state = scratch.path().join("restored-state");
    let db = state.join("coordinator.db");
    let out = coordinator(&[
        "restore".as_ref(),
        "--from".as_ref(),
        backup.as_os_str(),
        "--db".as_ref(),
        db.as_os_str(),
    ]);
    assert!(out.status.success(), "restore failed: {}", stderr(&out));
    println!("{}", stdout(&out).trim());
    assert_eq!(mode(&db), 0o600);
    // Once there is something there, not again without --force.
    let again = coordinator(&[
        "restore".as_ref(),
        "--from".as_ref(),
        backup.as_os_str(),
        "--db".as_ref(),
        db.as_os_str(),
    ]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));

    let r = Restored::start(&db, &c.path("checkpoints"), scratch.path());
    // The same jobs.
    let restored_list = r.json(&["list"]);
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&restored_list), ids(&live_list));
    // The finished job: the same record, history and checkpoints.
    assert_eq!(r.json(&["get", &done]), live_done);
    assert_eq!(r.replay(&done), live_done_history);
    assert_eq!(r.json(&["checkpoints", &done]), live_done_cps);
    let listed = |v: &Value, id: &str| -> Value {
        v.as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(listed(&restored_list, &done), live_done);

    // The running job: as it was at the backup, between the looks before and after it.
    let restored = r.json(&["get", &running]);
    assert_eq!(restored["state"], "running", "{restored}");
    for k in [
        "attempts",
        "epoch",
        "restarts_used",
        "world_size",
        "spec",
        "name",
    ] {
        assert_eq!(restored[k], before[k], "{k}");
    }
    let (s0, s, s1) = (step_of(&before), step_of(&restored), step_of(&after));
    assert!(
        s0 <= s && s <= s1,
        "step {s} at the backup, {s0} before, {s1} after"
    );
    let history = r.replay(&running);
    assert!(
        live_running_history.starts_with(&history),
        "the restored history is the live one up to the backup:\nrestored {history:#?}\nlive {live_running_history:#?}"
    );
    let steps: Vec<&String> = history.iter().filter(|l| l.starts_with("step ")).collect();
    assert!(
        steps
            .last()
            .is_some_and(|l| l.starts_with(&format!("step {s}/"))),
        "its last metric is the job's: {steps:?}"
    );
    assert!(
        history.len() < live_running_history.len(),
        "the live job went on after the backup"
    );
    println!(
        "restored: {} jobs; the running job at step {s} (looked {s0} before, {s1} after the \
         backup), {} of its {} history lines",
        ids(&restored_list).len(),
        history.len(),
        live_running_history.len()
    );
    drop(r);

    // The coordinator's scheduled backups: whole, private, the newest two kept.
    let files = wait_for("two scheduled backups", MINUTE, || {
        let mut f: Vec<PathBuf> = std::fs::read_dir(&scheduled)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "db"))
            .collect();
        f.sort();
        (f.len() == 2).then_some(f)
    });
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    let check = scratch.path().join("check/state.db");
    let out = coordinator(&[
        "restore".as_ref(),
        "--from".as_ref(),
        files[1].as_os_str(),
        "--db".as_ref(),
        check.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    // A corrupt backup is refused, naming it; nothing is written.
    let mut bytes = std::fs::read(backup).expect("read backup");
    let half = bytes.len() / 2;
    for b in &mut bytes[4096.min(half)..] {
        *b ^= 0xa5;
    }
    let bad = scratch.path().join("corrupt-backup.db");
    std::fs::write(&bad, &bytes).expect("write");
    let target = scratch.path().join("never/state.db");
    let out = coordinator(&[
        "restore".as_ref(),
        "--from".as_ref(),
        bad.as_os_str(),
        "--db".as_ref(),
        target.as_os_str(),
    ]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains(&bad.display().to_string()) && e.contains("corrupt"),
        "{e}"
    );
    assert!(!target.exists());
}
